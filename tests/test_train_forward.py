"""``cmbn_train_forward``: a training micro-batch in one op (the forward and the state update), with
its autograd in C++ when ``cmbn_ext._C`` is built and in Python otherwise.

It must be, bit for bit, ``cmbn_forward`` followed by ``cmbn_update_state`` and differentiated by
``CrossMiniBatchNormFunction``: outputs, gradients and every buffer.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cmbn_ext
from cmbn_ext import ops
from cmbn_ext.ops import CrossMiniBatchNormFunction

MODES = {  # name -> (layer_mode, window, ema_momentum, slots)
    "cumulative": ("cumulative", 3, None, 1),
    "cumulative-until-end": ("cumulative", None, None, 1),
    "sliding": ("sliding", 3, None, 2),
    "ema": ("ema", None, 0.25, 1),
}
CASES = {  # name -> (shape, dtype, memory format, affine, exact grad, tracked)
    "fp32": ((3, 4, 5, 5), torch.float32, torch.contiguous_format, True, False, True),
    "fp64-exact": ((3, 4, 5, 5), torch.float64, torch.contiguous_format, True, True, True),
    "fp16-channels-last": ((2, 6, 3, 3), torch.float16, torch.channels_last, True, False, True),
    "bf16-1d": ((7, 5), torch.bfloat16, torch.contiguous_format, True, False, False),
    "no-affine": ((2, 3, 4), torch.float32, torch.contiguous_format, False, False, True),
}


def _state(channels, slots, dtype):
    history = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "window_count": torch.randint(0, 30, (slots, channels)),
        "window_mean": torch.randn(slots, channels, dtype=history),
        "window_var": torch.rand(slots, channels, dtype=history) + 0.5,
        "window_step": torch.tensor(1),
        "running_mean": torch.randn(channels, dtype=history),
        "running_var": torch.rand(channels, dtype=history) + 0.5,
        "num_batches_tracked": torch.tensor(5),
    }


def _inputs(case, mode):
    shape, dtype, memory_format, affine, exact, tracked = CASES[case]
    layer_mode, window, ema, slots = MODES[mode]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(shape[1], dtype=params) + 0.5 if affine else None
    bias = torch.randn(shape[1], dtype=params) if affine else None
    state = _state(shape[1], slots, dtype)
    if not tracked:
        state.update(running_mean=None, running_var=None, num_batches_tracked=None)
    options = dict(eps=1e-5, ema_momentum=ema, exact_grad=exact, layer_mode=layer_mode, window=window,
                   momentum=0.1)
    return x, weight, bias, state, options


def _leaves(x, weight, bias):
    return [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]


def _state_args(state, o):
    return (state["window_count"], state["window_mean"], state["window_var"], state["window_step"],
            state["running_mean"], state["running_var"], state["num_batches_tracked"])


def fused(x, weight, bias, state, o):
    return torch.ops.cmbn_ext.cmbn_train_forward(
        x, weight, bias, *_state_args(state, o), o["eps"], o["ema_momentum"], o["exact_grad"],
        o["layer_mode"], o["window"], o["momentum"])


def composed(x, weight, bias, state, o):
    """The same micro-batch through the two ops the fused one stands for."""
    outputs = CrossMiniBatchNormFunction.apply(
        x, weight, bias, state["window_count"], state["window_mean"], state["window_var"], o["eps"],
        o["ema_momentum"], o["exact_grad"])
    with torch.no_grad():
        torch.ops.cmbn_ext.cmbn_update_state(*_state_args(state, o),
                                             torch.tensor(x.numel() // x.shape[1], device=x.device),
                                             *outputs[1:5], o["layer_mode"], o["window"], o["momentum"])
    return outputs


def _run(function, x, weight, bias, state, o, dy):
    state = {k: None if v is None else v.clone() for k, v in state.items()}
    leaves = _leaves(x, weight, bias)
    outputs = function(*leaves, state, o)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outputs[0], wanted, dy)
    return outputs, grads, state


def _assert_bitwise_equal(a, b):
    (outputs_a, grads_a, state_a), (outputs_b, grads_b, state_b) = a, b
    for got, expected in zip((*outputs_a, *grads_a), (*outputs_b, *grads_b)):
        assert got.dtype == expected.dtype and got.stride() == expected.stride()
        assert torch.equal(got, expected)
    for name in state_a:
        if state_a[name] is not None:
            assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_fused_op_is_the_two_ops_bit_for_bit(case, mode):
    x, weight, bias, state, options = _inputs(case, mode)
    dy = torch.randn_like(x)
    _assert_bitwise_equal(_run(fused, x, weight, bias, state, options, dy),
                          _run(composed, x, weight, bias, state, options, dy))


def test_fused_op_without_the_compiled_autograd():
    """Without cmbn_ext._C the op's autograd is the Python fallback: the same bits."""
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import test_train_forward as t\n"
        "from cmbn_ext import ops\n"
        "assert not ops.HAS_CPP_AUTOGRAD and not ops.has_cuda_kernels()\n"
        "for case in t.CASES:\n"
        "    for mode in t.MODES:\n"
        "        t.test_fused_op_is_the_two_ops_bit_for_bit(case, mode)\n"
        "t.test_gradients_only_where_wanted()\n"
        "print('fallback ok')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), env=dict(os.environ, CMBN_DISABLE_KERNELS="1"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["cumulative", "sliding"])
def test_opcheck(case, mode):
    x, weight, bias, state, options = _inputs(case, mode)
    x, weight, bias = _leaves(x, weight, bias)
    torch.library.opcheck(torch.ops.cmbn_ext.cmbn_train_forward.default,
                          (x, weight, bias, *_state_args(state, options), *options.values()))


def test_gradients_only_where_wanted():
    """AMP-style: half input with fp32 parameters; each gradient in its tensor's dtype, None where
    not wanted."""
    x, weight, bias, state, o = _inputs("fp16-channels-last", "cumulative")
    x = x.requires_grad_()
    weight = weight.requires_grad_()
    y = fused(x, weight, bias, state, o)[0]
    grad_x, grad_weight = torch.autograd.grad(y, [x, weight], torch.randn_like(y))
    assert grad_x.dtype == torch.float16 and grad_weight.dtype == torch.float32
    y = fused(x.detach(), weight, bias.requires_grad_(), state, o)[0]
    grad_bias, = torch.autograd.grad(y, [bias], torch.randn_like(y))
    assert grad_bias.dtype == torch.float32 and torch.isfinite(grad_bias).all()


def test_empty_micro_batch_leaves_the_state():
    x, weight, bias, state, o = _inputs("fp32", "cumulative")
    before = {k: v.clone() for k, v in state.items()}
    y = fused(x[:0], weight, bias, state, o)[0]
    assert y.shape == x[:0].shape
    for name, value in before.items():
        assert torch.equal(state[name], value), name


def test_double_backward_is_refused():
    x, weight, bias, state, o = _inputs("fp32", "cumulative")
    x = x.requires_grad_()
    y = fused(x, weight, bias, state, o)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not ops.HAS_CPP_AUTOGRAD, reason="needs cmbn_ext._C (the op's autograd in C++)")
@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
def test_a_training_micro_batch_is_one_op_forward_and_one_backward(mode):
    """Below autograd (what a GPU would launch kernels for), the layer's training forward dispatches
    cmbn_train_forward and nothing else, its backward cmbn_backward and nothing else (but the
    detaches that accumulate .grad, as for any layer)."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=3,
                                          momentum=0.25 if mode == "ema" else 0.1)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x)  # the first call may set up what later calls reuse
    with _RecordOps() as forward:
        y = layer(x)
    dy = torch.ones_like(y)
    with _RecordOps() as backward:
        y.backward(dy)
    assert forward.ops == ["cmbn_ext.cmbn_train_forward"]
    assert [op for op in backward.ops if op != "aten.detach"] == ["cmbn_ext.cmbn_backward"]
