"""The op boundary: ``torch.ops.cmbn_ext.cmbn_forward`` and ``cmbn_backward``.

The schemas are defined here, once. ``reference.py`` is registered as the CPU implementation, and as the
CUDA one when the compiled kernels are missing; the compiled extension ``cmbn_ext._C`` registers its
kernels for CUDA under the same names. Fakes make the ops traceable by ``torch.compile``, and
``register_autograd`` binds the backward op to the forward one.

Both ops are functional: the layers update their buffers from the returned statistics.
"""
import importlib
import os
import importlib.util
import warnings

import torch

from . import reference

_lib = torch.library.Library("cmbn_ext", "DEF")
_lib.define(
    "cmbn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor history_count, Tensor history_mean, "
    "Tensor history_var, float eps, float? ema_momentum, bool exact_grad) "
    "-> (Tensor y, Tensor mean, Tensor var, Tensor batch_mean, Tensor batch_var, Tensor b)"
)
_lib.define(
    "cmbn_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor var, Tensor batch_mean, "
    "Tensor batch_var, Tensor b, float eps, bool exact_grad) "
    "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
)


def _load_kernels():
    """Import the compiled CUDA kernels; a package built without them still works on the reference.

    ``CMBN_DISABLE_KERNELS=1`` in the environment leaves them unloaded, so CUDA tensors take the
    pure-PyTorch path (for comparisons, and to rule the kernels out when debugging).
    """
    name = f"{__package__}._C"
    if os.environ.get("CMBN_DISABLE_KERNELS") == "1" or importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)  # registers the CUDA implementations
    except (ImportError, OSError) as error:
        warnings.warn(f"cmbn_ext: the compiled CUDA kernels failed to load ({error}); "
                      "CUDA tensors use the pure-PyTorch implementation", RuntimeWarning)
        return False
    return True


_HAS_KERNELS = _load_kernels()


def has_cuda_kernels():
    """True when the compiled CUDA kernels are loaded and serve CUDA tensors."""
    return _HAS_KERNELS


def _reference_forward(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                       exact_grad):
    return reference.forward(x, weight, bias, history_count, history_mean, history_var, eps,
                             ema_momentum)


def _reference_backward(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps, exact_grad):
    with torch.no_grad():  # the gradients are not differentiable again (see _backward)
        return reference.backward(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps,
                                  exact_grad)


for _key in ("CPU",) if _HAS_KERNELS else ("CPU", "CUDA"):
    _lib.impl("cmbn_forward", _reference_forward, _key)
    _lib.impl("cmbn_backward", _reference_backward, _key)
# The backward op is not differentiable: autograd passes straight through to the kernels.
_lib.impl("cmbn_backward", torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("cmbn_ext::cmbn_forward")
def _forward_fake(x, weight, bias, history_count, history_mean, history_var, eps, ema_momentum,
                  exact_grad):
    stat = x.new_empty(x.shape[1], dtype=reference.stats_dtype(x.dtype))
    return (torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat),
            torch.empty_like(stat), torch.empty_like(stat))


@torch.library.register_fake("cmbn_ext::cmbn_backward")
def _backward_fake(grad_y, x, weight, mean, var, batch_mean, batch_var, b, eps, exact_grad):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, _, eps, _, exact_grad = inputs
    _, mean, var, batch_mean, batch_var, b = output
    ctx.save_for_backward(x, weight, mean, var, batch_mean, batch_var, b)
    ctx.eps = eps
    ctx.exact_grad = exact_grad
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y, *_unused_statistics_grads):
    if torch.is_grad_enabled():
        raise RuntimeError("cmbn_ext: double backward (create_graph=True) through CrossMiniBatchNorm is "
                           "not supported")
    x, weight, mean, var, batch_mean, batch_var, b = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.cmbn_ext.cmbn_backward(
        grad_y, x, weight, mean, var, batch_mean, batch_var, b, ctx.eps, ctx.exact_grad)
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    return (grad_x if needs_x else None,
            grad_weight.to(weight.dtype) if needs_weight else None,
            grad_bias.to(ctx.bias_dtype) if needs_bias else None,
            None, None, None, None, None, None)


torch.library.register_autograd("cmbn_ext::cmbn_forward", _backward, setup_context=_setup_context)
