"""The op boundary: ``torch.ops.cmbn_ext.*``.

``cmbn_train_forward`` is what a layer calls for a training micro-batch: the forward and the state
update in one op, differentiable (in C++ when the extension ``cmbn_ext._C`` is built, else through
``CrossMiniBatchNormFunction``). It is ``cmbn_forward`` followed by ``cmbn_update_state``, the ops
that ``torch.compile`` and evaluation use; ``CrossMiniBatchNormFunction`` binds ``cmbn_backward`` to
``cmbn_forward`` for autograd. The phase ops split them where the distributed path puts its
collectives: ``cmbn_batch_stats`` then ``cmbn_pooled_forward`` in the forward, ``cmbn_backward_sums``
then ``cmbn_backward_dx`` in the backward (``distributed.py`` binds those with an
``autograd.Function``). ``cmbn_update_state`` folds a micro-batch into the layer's buffers, in place
(``window_state.py``).

The schemas are defined here, once. The compiled extension serves CPU and CUDA tensors with its
kernels where it was built with them; ``reference.py`` implements every op for each device the
extension has no kernel for, and the same ops named ``cmbn_ext_reference::*`` serve the tensors of a
GPU the compiled extension holds no kernel image for (it calls them itself). Fakes make the ops
traceable by ``torch.compile``. All ops but ``cmbn_update_state`` and ``cmbn_train_forward`` are
functional.
"""
import importlib
import os
import importlib.util

import torch

from . import reference, user_warnings, window_state

# The ops that compute (the reference implements each; so do the compiled kernels).
SCHEMAS = {
    "cmbn_forward": (
        "(Tensor x, Tensor? weight, Tensor? bias, Tensor history_count, Tensor history_mean, "
        "Tensor history_var, float eps, float? ema_momentum, bool exact_grad, int activation=0, "
        "float activation_param=0.) "
        "-> (Tensor y, Tensor mean, Tensor var, Tensor batch_mean, Tensor batch_var, Tensor b)"),
    # x: the layer's input, or its output when from_output (memory="lean", an invertible activation)
    "cmbn_backward": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor var, Tensor batch_mean, "
        "Tensor batch_var, Tensor b, float eps, bool exact_grad, Tensor? bias=None, int activation=0, "
        "float activation_param=0., bool from_output=False) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"),
    "cmbn_batch_stats": "(Tensor x) -> (Tensor batch_mean, Tensor batch_var)",
    "cmbn_pooled_forward": (
        "(Tensor x, Tensor? weight, Tensor? bias, Tensor count, Tensor batch_mean, "
        "Tensor batch_var, Tensor history_count, Tensor history_mean, Tensor history_var, float eps, "
        "float? ema_momentum) -> (Tensor y, Tensor mean, Tensor var, Tensor b)"),
    "cmbn_backward_sums": "(Tensor grad_y, Tensor x, Tensor batch_mean) -> (Tensor sum_dy, Tensor sum_dy_xc)",
    "cmbn_backward_dx": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor var, "
        "Tensor batch_mean, Tensor batch_var, Tensor b, Tensor sum_dy, Tensor sum_dy_xc, Tensor count, "
        "float eps, bool exact_grad) -> Tensor grad_x"),
    "cmbn_update_state": (
        "(Tensor(a!) window_count, Tensor(b!) window_mean, Tensor(c!) window_var, "
        "Tensor(d!) window_step, Tensor(e!)? running_mean, Tensor(f!)? running_var, "
        "Tensor(g!)? num_batches_tracked, Tensor m, Tensor mean, Tensor var, Tensor batch_mean, "
        "Tensor batch_var, str layer_mode, int? window, float? momentum, "
        "bool every_micro_batch=False) -> ()"),
    "cmbn_train_forward": (
        "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) window_count, "
        "Tensor(b!) window_mean, Tensor(c!) window_var, Tensor(d!) window_step, "
        "Tensor(e!)? running_mean, Tensor(f!)? running_var, Tensor(g!)? num_batches_tracked, float eps, "
        "float? ema_momentum, bool exact_grad, str layer_mode, int? window, float? momentum, "
        "bool every_micro_batch=False, int activation=0, float activation_param=0., "
        "bool keep_output=False) "
        "-> (Tensor y, Tensor mean, Tensor var, Tensor batch_mean, Tensor batch_var, Tensor b)"),
}
# activation / activation_param: activations.py's codes; the op returns act(y). keep_output (autograd
# only): the backward keeps the output rather than x, and calls cmbn_backward with from_output.
_lib = torch.library.Library("cmbn_ext", "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
# What cmbn_forward (backward=False) or cmbn_backward launches for x: kernel_plan.py reads the integers.
_lib.define("cmbn_kernel_plan(Tensor x, bool backward) -> int[]")
# Whether the compiled kernels run on x's device (has_cuda_kernels): they hold an image for its GPU.
_lib.define("cmbn_kernel_image(Tensor x) -> bool")
# The reference under names of its own: the compiled library calls cmbn_ext_reference::<op> for the
# tensors of a GPU it holds no kernel image for (csrc/cuda/register_cuda.cpp).
_reference_lib = torch.library.Library("cmbn_ext_reference", "DEF")
for _name, _schema in SCHEMAS.items():
    _reference_lib.define(_name + _schema)
# The warning it gives once per such GPU, raised here so that Python's warning filters see it.
_reference_lib.define("warn_no_kernel_image(Tensor x, str message) -> ()")


def _load_kernels():
    """Import the compiled kernels (CPU, and CUDA where they were built); a package built without them
    still works on the reference.

    ``CMBN_DISABLE_KERNELS=1`` in the environment leaves them unloaded, so CPU and CUDA tensors take
    the pure-PyTorch path (for comparisons, and to rule the kernels out when debugging).
    """
    name = f"{__package__}._C"
    if os.environ.get("CMBN_DISABLE_KERNELS") == "1" or importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)  # registers the kernels it was built with
    except (ImportError, OSError) as error:
        user_warnings.warn(f"cmbn_ext: the compiled kernels failed to load ({error}); "
                           "the pure-PyTorch implementation serves every device", RuntimeWarning)
        return False
    return True


def _compiled_for(dispatch_key):
    """Whether the loaded extension registered its kernels for ``dispatch_key`` (asked before the
    reference registers for the keys it left free)."""
    return _HAS_KERNELS and torch._C._dispatch_has_kernel_for_dispatch_key("cmbn_ext::cmbn_forward",
                                                                          dispatch_key)


_HAS_KERNELS = _load_kernels()
_HAS_CUDA_KERNELS = _compiled_for("CUDA")
_HAS_CPU_KERNELS = _compiled_for("CPU")


def has_cuda_kernels(device=None):
    """True when the compiled CUDA kernels serve CUDA tensors on ``device`` (an index, a string or a
    ``torch.device``; None: the current CUDA device).

    False when they are not loaded, or when they hold no kernel image for that GPU's architecture
    (they were built for others): its tensors then take the pure-PyTorch path, with a warning that
    says how to rebuild. With no device given and no GPU visible: whether they are loaded.
    """
    if not _HAS_CUDA_KERNELS:
        return False
    if device is None:
        if not torch.cuda.is_available():
            return True
        device = torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _kernel_image(device)


def _kernel_image(device):
    """The compiled library's answer for ``device`` (a CUDA device with an index)."""
    return torch.ops.cmbn_ext.cmbn_kernel_image(torch.empty(0, device=device))


def has_cpu_kernels():
    """True when the compiled CPU kernels are loaded and serve CPU tensors."""
    return _HAS_CPU_KERNELS


def _reference_forward(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                       exact_grad, activation=0, activation_param=0.0):
    return reference.forward(x, weight, bias, history_count, history_mean, history_var, eps,
                             ema_momentum, activation, activation_param)


def normalization_history(window_count, window_mean, window_var, layer_mode):
    """The history a training micro-batch is normalized with: the window buffers, or none of their
    slots in deferred mode (its window is for the running statistics only)."""
    if layer_mode == "deferred":
        return window_count[:0], window_mean[:0], window_var[:0]
    return window_count, window_mean, window_var


def _reference_train_forward(x, weight, bias, window_count, window_mean, window_var, window_step,
                             running_mean, running_var, num_batches_tracked, eps, ema_momentum,
                             exact_grad, layer_mode, window, momentum, every_micro_batch=False,
                             activation=0, activation_param=0.0, keep_output=False):
    outputs = reference.forward(x, weight, bias,
                                *normalization_history(window_count, window_mean, window_var,
                                                       layer_mode),
                                eps, ema_momentum, activation, activation_param)
    m = reference.values_per_channel(x)
    if m:  # an empty micro-batch leaves the state as it is
        window_state.update_state(window_count, window_mean, window_var, window_step, running_mean,
                                  running_var, num_batches_tracked, window_step.new_full((), m),
                                  *outputs[1:5], layer_mode, window, momentum, every_micro_batch)
    return outputs


def _without_grad(function):
    """The non-differentiable ops: their outputs never carry an autograd graph."""
    def run(*args):
        with torch.no_grad():
            return function(*args)
    return run


REFERENCE = {
    "cmbn_forward": _without_grad(_reference_forward),
    "cmbn_backward": _without_grad(reference.backward),
    "cmbn_batch_stats": _without_grad(reference.batch_stats),
    "cmbn_pooled_forward": _without_grad(reference.pooled_forward),
    "cmbn_backward_sums": _without_grad(reference.backward_sums),
    "cmbn_backward_dx": _without_grad(reference.backward_dx),
    "cmbn_update_state": _without_grad(window_state.update_state),
    "cmbn_train_forward": _without_grad(_reference_train_forward),
}
# The one differentiable op; the compiled extension gives it autograd in C++.
DIFFERENTIABLE = "cmbn_train_forward"
HAS_CPP_AUTOGRAD = torch._C._dispatch_has_kernel_for_dispatch_key(f"cmbn_ext::{DIFFERENTIABLE}",
                                                                  "Autograd")
# The registrations that kernels compiled into this process later may take over (the CPU reference and
# the Python autograd), apart from the others: make_way_for_cpu_kernels() withdraws them.
_fallbacks = torch.library.Library("cmbn_ext", "IMPL")
for _name, _function in REFERENCE.items():
    for _key, _library in (("CPU", _fallbacks), ("CUDA", _lib)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cmbn_ext::{_name}", _key):
            _library.impl(_name, _function, _key)
    if _name != DIFFERENTIABLE:
        # Not differentiable themselves: autograd passes straight through to the kernels
        # (CrossMiniBatchNormFunction and distributed.py differentiate the layer).
        _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")
    # Called from inside the compiled ops (below autograd, which they handle): the CPU stands for the
    # device under the emulated kernels (tests/emulation).
    for _key in ("CPU", "CUDA"):
        _reference_lib.impl(_name, _function, _key)
    _reference_lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")


def _no_kernel_image(x):
    """cmbn_kernel_image where the compiled kernels do not serve the device."""
    return False


_lib.impl("cmbn_kernel_image", _no_kernel_image, "CPU")
if not torch._C._dispatch_has_kernel_for_dispatch_key("cmbn_ext::cmbn_kernel_image", "CUDA"):
    _lib.impl("cmbn_kernel_image", _no_kernel_image, "CUDA")

def _warn_no_kernel_image(x, message):
    """The compiled library's warning for a GPU it holds no kernel image for, as a Python warning."""
    user_warnings.warn(message, RuntimeWarning)


for _key in ("CPU", "CUDA"):
    _reference_lib.impl("warn_no_kernel_image", _warn_no_kernel_image, _key)
_reference_lib.impl("warn_no_kernel_image", torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("cmbn_ext::cmbn_forward")
def _forward_fake(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                  exact_grad, activation=0, activation_param=0.0):
    return (torch.empty_like(x), *(_channel_stats(x) for _ in range(5)))


@torch.library.register_fake("cmbn_ext::cmbn_train_forward")
def _train_forward_fake(x, weight, bias, window_count, window_mean, window_var, window_step,
                        running_mean, running_var, num_batches_tracked, eps, ema_momentum, exact_grad,
                        layer_mode, window, momentum, every_micro_batch=False, activation=0,
                        activation_param=0.0, keep_output=False):
    return (torch.empty_like(x), *(_channel_stats(x) for _ in range(5)))


@torch.library.register_fake("cmbn_ext::cmbn_backward")
def _backward_fake(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps, exact_grad, bias=None,
                   activation=0, activation_param=0.0, from_output=False):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _channel_stats(x):
    return x.new_empty(x.shape[1], dtype=reference.stats_dtype(x.dtype))


@torch.library.register_fake("cmbn_ext::cmbn_batch_stats")
def _batch_stats_fake(x):
    return _channel_stats(x), _channel_stats(x)


@torch.library.register_fake("cmbn_ext::cmbn_pooled_forward")
def _pooled_forward_fake(x, weight, bias, count, batch_mean, batch_var, history_count, history_mean,
                         history_var, eps, ema_momentum):
    return torch.empty_like(x), _channel_stats(x), _channel_stats(x), _channel_stats(x)


@torch.library.register_fake("cmbn_ext::cmbn_backward_sums")
def _backward_sums_fake(grad_y, x, batch_mean):
    return _channel_stats(x), _channel_stats(x)


@torch.library.register_fake("cmbn_ext::cmbn_update_state")
def _update_state_fake(window_count, window_mean, window_var, window_step, running_mean, running_var,
                       num_batches_tracked, m, mean, var, batch_mean, batch_var, layer_mode, window,
                       momentum, every_micro_batch=False):
    return None


@torch.library.register_fake("cmbn_ext::cmbn_backward_dx")
def _backward_dx_fake(grad_y, x, weight, mean, var, batch_mean, batch_var, b, sum_dy, sum_dy_xc, count,
                      eps, exact_grad):
    return torch.empty_like(x)


class CrossMiniBatchNormFunction(torch.autograd.Function):
    """Autograd for one micro-batch: ``cmbn_forward``, then ``cmbn_backward`` for the gradients.

    An ``autograd.Function`` rather than ``register_autograd`` on the op: it costs a fraction of the
    per-call Python overhead, and ``torch.compile`` traces it all the same. Returns the op's outputs;
    only ``y`` is differentiable. ``keep_output``: the backward keeps ``y`` rather than ``x``
    (``memory="lean"``; the activation must be invertible).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                exact_grad, activation=0, activation_param=0.0, keep_output=False):
        y, mean, var, batch_mean, batch_var, b = torch.ops.cmbn_ext.cmbn_forward(
            x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum, exact_grad,
            activation, activation_param)
        ctx.save_for_backward(y if keep_output else x, weight, bias, mean, var, batch_mean, batch_var, b)
        ctx.eps, ctx.exact_grad = eps, exact_grad
        ctx.activation, ctx.keep_output = (activation, activation_param), keep_output
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, batch_mean, batch_var, b)
        return y, mean, var, batch_mean, batch_var, b

    @staticmethod
    def backward(ctx, grad_y, *_unused_statistics_grads):
        if torch.is_grad_enabled():
            raise RuntimeError("cmbn_ext: double backward (create_graph=True) through CrossMiniBatchNorm "
                               "is not supported")
        saved, weight, bias, mean, var, batch_mean, batch_var, b = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.cmbn_ext.cmbn_backward(
            grad_y, saved, weight, mean, var, batch_mean, batch_var, b, ctx.eps, ctx.exact_grad, bias,
            *ctx.activation, ctx.keep_output)
        return input_grads(ctx, grad_x, grad_weight, grad_bias, weight)


def input_grads(ctx, grad_x, grad_weight, grad_bias, weight):
    """What an ``autograd.Function`` of the layer returns: the gradients of ``(x, weight, bias)`` that
    are wanted, in the parameters' dtype, and None for every other input."""
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    return (grad_x if needs_x else None,
            grad_weight.to(weight.dtype) if needs_weight else None,
            grad_bias.to(ctx.bias_dtype) if needs_bias else None,
            *[None] * (len(ctx.needs_input_grad) - 3))


def _train_forward_autograd(x, weight, bias, window_count, window_mean, window_var, window_step,
                            running_mean, running_var, num_batches_tracked, eps, ema_momentum,
                            exact_grad, layer_mode, window, momentum, every_micro_batch=False,
                            activation=0, activation_param=0.0, keep_output=False):
    """``cmbn_train_forward``'s autograd where the compiled extension does not give it one in C++:
    ``CrossMiniBatchNormFunction``, then the state update (the same math, at more host cost)."""
    outputs = CrossMiniBatchNormFunction.apply(
        x, weight, bias, *normalization_history(window_count, window_mean, window_var, layer_mode),
        eps, ema_momentum, exact_grad, activation, activation_param, keep_output)
    m = reference.values_per_channel(x)
    if m:
        with torch.no_grad():
            torch.ops.cmbn_ext.cmbn_update_state(window_count, window_mean, window_var, window_step,
                                                 running_mean, running_var, num_batches_tracked,
                                                 window_step.new_full((), m), *outputs[1:5],
                                                 layer_mode, window, momentum, every_micro_batch)
    return outputs


if not HAS_CPP_AUTOGRAD:
    _fallbacks.impl(DIFFERENTIABLE, _train_forward_autograd, "Autograd")


def make_way_for_cpu_kernels():
    """Withdraws the reference's CPU implementations and the Python autograd of
    ``cmbn_train_forward``, so that kernels compiled later in this process (the emulated CUDA kernels
    of tests/emulation, which serve CPU tensors) register in their place without overriding any
    registration. Refused where the compiled extension's own kernels or autograd are loaded: a
    process has one set of CPU kernels."""
    if _HAS_CPU_KERNELS or HAS_CPP_AUTOGRAD:
        raise RuntimeError("cmbn_ext: the compiled extension (cmbn_ext._C) is loaded in this process "
                           "and serves the CPU; start the process with CMBN_DISABLE_KERNELS=1 to load "
                           "other CPU kernels")
    _fallbacks._destroy()  # a second call finds nothing left to withdraw
