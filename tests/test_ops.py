"""The op boundary: opcheck, torch.compile against eager, and long runs that keep no graph."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import cmbn_ext
from cmbn_ext import ops


def _op_args(dtype=torch.float32, fmt=torch.contiguous_format, affine=True, slots=1, ema=None,
             exact=False, shape=(3, 4, 5, 5)):
    C = shape[1]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(C, dtype=param_dtype, requires_grad=True) if affine else None
    b = torch.randn(C, dtype=param_dtype, requires_grad=True) if affine else None
    counts = torch.randint(0, 20, (slots, C))
    mean = torch.randn(slots, C)
    var = torch.rand(slots, C) + 0.5
    return (x, w, b, counts, mean, var, 1e-5, ema, exact)


OP_CASES = {
    "fp32": {},
    "fp64-exact": dict(dtype=torch.float64, exact=True),
    "fp16-channels-last": dict(dtype=torch.float16, fmt=torch.channels_last),
    "bf16-1x1-channels-last": dict(dtype=torch.bfloat16, fmt=torch.channels_last, shape=(3, 4, 1, 1)),
    "no-affine-ema": dict(affine=False, ema=0.1),
    "sliding-ring": dict(slots=3),
    "no-history": dict(slots=0),
    "1d": dict(shape=(6, 4)),
}


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck_forward(case):
    torch.library.opcheck(torch.ops.cmbn_ext.cmbn_forward.default, _op_args(**OP_CASES[case]))


@pytest.mark.parametrize("case", ["fp32", "fp64-exact", "fp16-channels-last", "no-affine-ema"])
def test_opcheck_backward(case):
    x, w, b, counts, mean_h, var_h, eps, ema, exact = _op_args(**OP_CASES[case])
    with torch.no_grad():
        y, mean, var, batch_mean, batch_var, weight_b = torch.ops.cmbn_ext.cmbn_forward(
            x, w, b, counts, mean_h, var_h, eps, ema, exact)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.cmbn_ext.cmbn_backward.default,
                          (dy, x.detach(), w, mean, var, batch_mean, batch_var, weight_b, eps, exact))


def _net(mode, window, grad):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(8, mode=mode, window=window, grad=grad),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
        cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=window, grad=grad, track_running_stats=False),
    )


def _train_and_eval(model, batches):
    results = []
    for x in batches:
        y = model(x)
        y.square().mean().backward()
        results.append(y.detach())
    results += [p.grad.clone() for p in model.parameters()]
    model.eval()
    results.append(model(batches[0]).detach())
    model.train()
    return results


@pytest.mark.parametrize("mode,window,grad,backend", [
    ("cumulative", 3, "renorm", "inductor"),
    ("cumulative", 2, "exact", "aot_eager"),
    ("sliding", 3, "renorm", "aot_eager"),
    ("ema", 4, "exact", "aot_eager"),
])
def test_compile_fullgraph_matches_eager(mode, window, grad, backend):
    """Outputs, gradients, eval outputs and every buffer after compiled steps equal eager's (window
    commits included: 5 micro-batches cross a window end)."""
    eager = _net(mode, window, grad)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    batches = [torch.randn(2, 3, 6, 6) * (i + 1) for i in range(5)]
    for got, expected in zip(_train_and_eval(compiled, batches), _train_and_eval(eager, batches)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (name, got), expected in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["cumulative", "sliding", "ema"])
def test_200_micro_batches_keep_no_graph(mode):
    """The article's bug: statistics that keep the autograd graph make the second backward fail."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=4)
    conv = torch.nn.Conv2d(2, 4, 1)
    for _ in range(200):
        y = layer(conv(torch.randn(2, 2, 3, 3)))
        y.square().sum().backward()
    for name, buffer in layer.named_buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None, name
    assert torch.isfinite(conv.weight.grad).all()


def _serves(op, dispatch_key):
    """Where the kernel that serves ``op`` for ``dispatch_key`` was registered (the dispatcher's
    table line)."""
    table = torch._C._dispatch_dump_table(f"cmbn_ext::{op}")
    return next((line for line in table.splitlines() if line.startswith(f"{dispatch_key}:")), "")


@pytest.mark.parametrize("device,registration", [("cpu", "register_cpu.cpp"),
                                                 ("cuda", "register_cuda.cpp")])
def test_has_kernels_reports_the_extension(device, registration):
    """has_cpu_kernels() / has_cuda_kernels() are True exactly when the compiled extension is loaded
    with that family of kernels (CI compiles both; the CUDA ones import on a machine without a GPU),
    and then every op is served by them."""
    built = importlib.util.find_spec("cmbn_ext._C") is not None
    wanted = os.environ.get("CMBN_DISABLE_KERNELS") != "1"
    has_kernels = getattr(cmbn_ext, f"has_{device}_kernels")()
    registered = [registration in _serves(op, device.upper()) for op in ops.REFERENCE]
    assert registered == [has_kernels] * len(registered)
    if not (built and wanted):
        assert not has_kernels


def test_has_cuda_kernels_answers_per_device(monkeypatch):
    """With the kernels loaded, a CUDA device gets the library's own answer (whether it holds a kernel
    image for that GPU; probed here), the current device by default; any other device is False.
    tests/test_cuda_kernels.py runs the library's answer and the fallback it leads to."""
    from cmbn_ext import ops

    asked = []

    def probe(device):
        asked.append(device)
        return device.index == 0

    monkeypatch.setattr(ops, "_HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(ops, "_kernel_image", probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert cmbn_ext.has_cuda_kernels() is False
    assert cmbn_ext.has_cuda_kernels(0) is True
    assert cmbn_ext.has_cuda_kernels("cuda:0") is True
    assert cmbn_ext.has_cuda_kernels(torch.device("cuda", 1)) is False
    assert cmbn_ext.has_cuda_kernels("cuda") is False
    assert cmbn_ext.has_cuda_kernels("cpu") is False
    assert asked == [torch.device("cuda", i) for i in (1, 0, 0, 1, 1)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cmbn_ext.has_cuda_kernels() is True  # loaded, and no GPU to ask about
    monkeypatch.setattr(ops, "_HAS_CUDA_KERNELS", False)
    assert cmbn_ext.has_cuda_kernels(0) is False and len(asked) == 5


def test_kernels_can_be_disabled_from_the_environment():
    """With CMBN_DISABLE_KERNELS=1 neither family loads, and the reference serves every op on the
    CPU."""
    code = ("import cmbn_ext, test_ops\n"
            "print(cmbn_ext.has_cpu_kernels(), cmbn_ext.has_cuda_kernels())\n"
            "for op in cmbn_ext.ops.REFERENCE:\n"
            "    print(test_ops._serves(op, 'CPU'))\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, CMBN_DISABLE_KERNELS="1",
               PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(tests))
    first, *served = out.stdout.strip().splitlines()
    assert first == "False False"
    assert len(served) == len(ops.REFERENCE)
    assert all(os.path.join("cmbn_ext", "ops.py") in line for line in served), served


def test_double_backward_is_refused_clearly():
    layer = cmbn_ext.CrossMiniBatchNorm2d(3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("case", ["fp32", "fp16-channels-last", "no-affine-ema", "1d"])
def test_opcheck_phase_ops(case):
    x, w, b, counts, mean_h, var_h, eps, ema, exact = _op_args(**OP_CASES[case])
    x = x.detach()
    ops = torch.ops.cmbn_ext
    torch.library.opcheck(ops.cmbn_batch_stats.default, (x,))
    batch_mean, batch_var = ops.cmbn_batch_stats(x)
    count = torch.tensor(x.numel() // x.shape[1])
    pooled_args = (x, w, b, count, batch_mean, batch_var, counts, mean_h, var_h, eps, ema)
    torch.library.opcheck(ops.cmbn_pooled_forward.default, pooled_args)
    with torch.no_grad():
        _, mean, var, weight_b = ops.cmbn_pooled_forward(*pooled_args)
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.cmbn_backward_sums.default, (dy, x, batch_mean))
    sum_dy, sum_dy_xc = ops.cmbn_backward_sums(dy, x, batch_mean)
    torch.library.opcheck(ops.cmbn_backward_dx.default, (dy, x, w, mean, var, batch_mean, batch_var,
                                                         weight_b, sum_dy, sum_dy_xc, count, eps, exact))


@pytest.mark.parametrize("mode,slots,window,tracking", [
    ("cumulative", 1, 2, True), ("cumulative", 1, None, False), ("sliding", 3, None, True),
    ("ema", 1, None, True)])
def test_opcheck_update_state(mode, slots, window, tracking):
    """The state op declares every buffer it writes (opcheck's schema test runs it and compares)."""
    C = 4
    buffers = [torch.randint(0, 9, (slots, C)), torch.randn(slots, C), torch.rand(slots, C),
               torch.tensor(1)]
    running = [torch.randn(C), torch.rand(C) + 0.5, torch.tensor(3)] if tracking else [None] * 3
    stats = [torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5]
    for m in (8, 0):  # 0: an empty micro-batch, a no-op
        torch.library.opcheck(torch.ops.cmbn_ext.cmbn_update_state.default,
                              (*buffers, *running, torch.tensor(m), *stats, mode, window, 0.1))
