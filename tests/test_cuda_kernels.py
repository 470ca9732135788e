"""The compiled CUDA kernels against the reference math, run in fp64 on CPU copies of the same input.

Covers every mode (count-weighted and EMA pooling; history of 0, 1 and 3 slots with empty slots),
dtype (fp16, bf16, fp32, fp64, AMP fp32 parameters with half input, no affine), layout (contiguous,
channels_last, channels_last_3d, (N, C), (N, C, L)), both gradients, many odd shapes, the split
regimes, more than 2^24 values per channel, bitwise determinism, opcheck, torch.compile and the layer
state. Outputs are poisoned first (the caching allocator is filled with NaN bytes) so an element a
kernel forgets to write fails the comparison. Skipped without a GPU or without the compiled kernels.
"""
import copy

import pytest
import torch

import cmbn_ext
from cmbn_ext import reference

if not torch.cuda.is_available() or not cmbn_ext.has_cuda_kernels():
    pytest.skip("needs a GPU and the compiled CUDA kernels (cmbn_ext._C)", allow_module_level=True)

FORWARD = torch.ops.cmbn_ext.cmbn_forward
BACKWARD = torch.ops.cmbn_ext.cmbn_backward
EPS = 1e-5

# Tolerances (rtol, atol) against the fp64 reference fed the same, already rounded, input. The kernels
# accumulate in fp32 (fp64 for fp64), so statistics differ by fp32 rounding (~1e-7 relative per step,
# a little more over long sums), and y / grad_x by that plus one final rounding to the output dtype:
# fp16 keeps 11 significant bits (half an ulp is 2.4e-4 relative, so ~1e-3 at the |values| <= 5 seen
# here), bf16 8 bits (2e-3 relative, ~1e-2 at 5); fp32 outputs carry the fp32 statistics' error.
OUTPUT_TOL = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-9, 1e-9),
}
STAT_TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}

# name -> (x dtype, weight/bias dtype or None for affine=False)
DTYPE_CASES = {
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "amp_fp16": (torch.float16, torch.float32),
    "amp_bf16": (torch.bfloat16, torch.float32),
    "no_affine": (torch.float32, None),
}

# name -> (shape, memory format of x, memory format of grad_y)
LAYOUT_CASES = {
    "contiguous": ((6, 5, 7, 9), torch.contiguous_format, torch.channels_last),
    "channels_last": ((6, 16, 5, 3), torch.channels_last, torch.contiguous_format),
    "channels_last_3d": ((3, 8, 4, 3, 5), torch.channels_last_3d, torch.contiguous_format),
    "nc": ((37, 24), torch.contiguous_format, torch.contiguous_format),
    "ncl": ((5, 6, 33), torch.contiguous_format, torch.contiguous_format),
}


def sum_tol(m, dtype):
    """(rtol, atol) of grad_weight / grad_bias: sums of m products of O(1) values, whose rounding
    error grows about as sqrt(m) (per-thread sums, then a tree), with a margin of ~100x."""
    if dtype == torch.float64:
        return 1e-9, 1e-12 * m ** 0.5 + 1e-10
    return 1e-4, 4e-5 * m ** 0.5 + 1e-4


def poison_cuda_allocator(nbytes=1 << 20):
    """Leave 0xFF bytes (NaN in every float dtype) in the caching allocator's free blocks, so that
    tensors allocated next start as NaN and an element a kernel never writes fails the test."""
    sizes = [max(nbytes, 1 << 20)] * 3 + [n for n in (512, 4096, 65536, 262144) for _ in range(8)]
    junk = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in sizes]
    del junk


def random_input(shape, dtype, memory_format=torch.contiguous_format, seed=0, offset=0.3, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale + offset
    x = x.to(dtype).cuda()
    return x.contiguous(memory_format=memory_format) if memory_format != torch.contiguous_format else x


def random_parameters(channels, dtype, seed=1):
    if dtype is None:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(dtype).cuda()
    bias = torch.randn(channels, generator=gen).to(dtype).cuda()
    return weight, bias


def random_history(slots, channels, dtype, seed=2, max_count=40):
    """(S, C) history with empty slots: slot 1 is empty everywhere, and about a quarter of the
    others are empty too."""
    gen = torch.Generator().manual_seed(seed)
    count = torch.randint(0, max_count + 1, (slots, channels), generator=gen)
    count[torch.rand(slots, channels, generator=gen) < 0.25] = 0
    if slots > 1:
        count[1] = 0
    mean = torch.randn(slots, channels, generator=gen) * 2
    var = torch.rand(slots, channels, generator=gen) * 2 + 0.1
    return count.cuda(), mean.to(dtype).cuda(), var.to(dtype).cuda()


def cpu64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def run_forward(x, weight, bias, history, ema):
    poison_cuda_allocator(x.numel() * x.element_size())
    return FORWARD(x, weight, bias, *history, EPS, ema, False)


def run_backward(grad_y, x, weight, stats, exact):
    poison_cuda_allocator(x.numel() * x.element_size())
    return BACKWARD(grad_y, x, weight, *stats, EPS, exact)


def assert_close(actual, expected, tol, name):
    rtol, atol = tol
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected, rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def check_against_reference(x, weight, bias, history, ema, grad_y=None):
    """Forward and both backward choices of the kernels against reference.forward / backward in fp64."""
    dtype = x.dtype
    stat_dtype = reference.stats_dtype(dtype)
    out = run_forward(x, weight, bias, history, ema)
    y, stats = out[0], out[1:]
    assert y.dtype == dtype and y.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        assert y.stride() == x.stride(), "y must keep x's memory format"
    for s in stats:
        assert s.dtype == stat_dtype and s.shape == (x.shape[1],)

    history64 = (history[0].cpu(), cpu64(history[1]), cpu64(history[2]))
    expected = reference.forward(cpu64(x), cpu64(weight), cpu64(bias), *history64, EPS, ema)
    assert_close(y, expected[0], OUTPUT_TOL[dtype], "y")
    for name, actual, want in zip(("mean", "var", "batch_mean", "batch_var", "b"), stats, expected[1:]):
        assert_close(actual, want, STAT_TOL[stat_dtype], name)

    if grad_y is None:
        grad_y = random_input(x.shape, dtype, seed=7, offset=0.0, scale=1.0)
    m = reference.values_per_channel(x)
    for exact in (False, True):
        grad_x, grad_weight, grad_bias = run_backward(grad_y, x, weight, stats, exact)
        assert grad_x.dtype == dtype and grad_x.stride() == y.stride()
        want = reference.backward(cpu64(grad_y), cpu64(x), cpu64(weight), *(cpu64(s) for s in stats),
                                  EPS, exact)
        assert_close(grad_x, want[0], OUTPUT_TOL[dtype], f"grad_x (exact={exact})")
        assert_close(grad_weight, want[1], sum_tol(m, stat_dtype), f"grad_weight (exact={exact})")
        assert_close(grad_bias, want[2], sum_tol(m, stat_dtype), f"grad_bias (exact={exact})")
    return out


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("slots", [0, 1, 3])
@pytest.mark.parametrize("ema", [None, 0.1], ids=["count_weighted", "ema"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
def test_matches_reference(dtype_case, layout, ema, slots):
    dtype, param_dtype = DTYPE_CASES[dtype_case]
    shape, x_format, grad_format = LAYOUT_CASES[layout]
    channels = shape[1]
    x = random_input(shape, dtype, x_format)
    weight, bias = random_parameters(channels, param_dtype)
    history_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    history = random_history(slots, channels, history_dtype)
    grad_y = random_input(shape, dtype, grad_format, seed=5, offset=0.0, scale=1.0)
    check_against_reference(x, weight, bias, history, ema, grad_y)


@pytest.mark.parametrize("history_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_history_in_any_float_dtype(history_dtype):
    x = random_input((4, 6, 5, 5), torch.float32)
    weight, bias = random_parameters(6, torch.float32)
    check_against_reference(x, weight, bias, random_history(2, 6, history_dtype), None)


SHAPES = [
    ((4, 3, 1, 1), "1x1 spatial"),
    ((2, 5, 7, 7), "7x7"),
    ((1, 3, 13, 11), "N=1, odd spatial"),
    ((3, 1, 5, 9), "C=1"),
    ((8, 2048, 2, 2), "C=2048"),
    ((16, 2048), "(N, C) with C=2048"),
    ((5, 3, 17), "(N, C, L) odd"),
    ((2, 4, 3, 5, 7), "3d odd"),
    ((64, 16, 32, 32), "medium: channels split over blocks"),
    ((2, 3, 256, 256), "huge-ish M, few channels"),
    ((4096, 3), "many rows, 3 channels"),
    ((100003, 8), "many rows, odd count"),
    ((3, 40, 9, 9), "C not a multiple of the pack"),
]


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[name for _, name in SHAPES])
def test_shapes(shape, dtype, memory_format):
    if memory_format == "channels_last":
        if len(shape) not in (4, 5):
            pytest.skip("channels_last needs 4 or 5 dimensions")
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    else:
        memory_format = torch.contiguous_format
    x = random_input(shape, dtype, memory_format, seed=sum(shape))
    weight, bias = random_parameters(shape[1], dtype)
    check_against_reference(x, weight, bias, random_history(1, shape[1], torch.float32), None)
    check_against_reference(x, weight, bias, random_history(3, shape[1], torch.float32), 0.25)


def test_one_value_per_channel_with_history():
    x = random_input((1, 7, 1, 1), torch.float32)
    weight, bias = random_parameters(7, torch.float32)
    count, mean, var = random_history(1, 7, torch.float32)
    check_against_reference(x, weight, bias, (count + 1, mean, var), None)
    check_against_reference(x, weight, bias, (count + 1, mean, var), 0.1)


def test_misaligned_and_strided_inputs():
    """Inputs whose data is not 16-byte aligned, non-dense inputs, and a dense but unusual layout."""
    base = random_input((2 * 8 * 6 * 6 + 1,), torch.float16)
    misaligned = base[1:].view(2, 8, 6, 6)
    strided = random_input((3, 8, 10, 6), torch.float32)[:, :, ::2]
    permuted = random_input((3, 6, 8, 5), torch.float32).permute(0, 2, 1, 3)  # dense, C in the middle
    for x in (misaligned, strided, permuted):
        weight, bias = random_parameters(8, x.dtype)
        check_against_reference(x, weight, bias, random_history(1, 8, torch.float32), None)


def test_expanded_grad_y():
    """The gradient of y.sum() arrives expanded (stride 0): it is made to match x's layout."""
    x = random_input((4, 6, 5, 5), torch.float32, torch.channels_last)
    weight, bias = random_parameters(6, torch.float32)
    grad_y = torch.ones((), device="cuda").expand(x.shape)
    check_against_reference(x, weight, bias, random_history(1, 6, torch.float32), None, grad_y)


def test_empty_micro_batch_gives_reference_statistics():
    x = torch.empty((0, 5, 3, 3), device="cuda")
    history = random_history(1, 5, torch.float32)
    y, *stats = run_forward(x, None, None, history, None)
    assert y.shape == x.shape
    expected = reference.forward(cpu64(x), None, None, history[0].cpu(), cpu64(history[1]),
                                 cpu64(history[2]), EPS, None)
    for actual, want in zip(stats, expected[1:]):
        assert_close(actual, want, STAT_TOL[torch.float32], "statistics of an empty micro-batch")


# ------------------------------------------------------------------------- beyond 2^24 per channel
@pytest.mark.parametrize("shape", [(2, 2, 2900, 2900), (2 ** 24 + 3, 2)], ids=["planes", "rows"])
def test_more_than_2_pow_24_values_per_channel(shape):
    """fp32 counts are not exact here; a large mean would also break E[x^2] - E[x]^2 in fp32."""
    x = random_input(shape, torch.float32, offset=100.0)
    assert reference.values_per_channel(x) > 2 ** 24
    weight, bias = random_parameters(2, torch.float32)
    count, mean, var = random_history(1, 2, torch.float32)
    history = (count + 3_000_000_000, mean + 100, var)  # n_h beyond int32, too
    out = check_against_reference(x, weight, bias, history, None)
    batch_var = out[4].cpu()
    assert torch.allclose(batch_var, torch.full_like(batch_var, 1.5 ** 2), rtol=0.01)  # randn * 1.5


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("shape,memory_format", [
    ((2, 3, 256, 256), torch.contiguous_format),  # split over many blocks
    ((8, 64, 16, 16), torch.channels_last),
    ((200003, 5), torch.contiguous_format),
    ((4, 32, 7, 7), torch.contiguous_format),  # one fused launch
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_bitwise_deterministic(shape, memory_format, dtype):
    x = random_input(shape, dtype, memory_format)
    weight, bias = random_parameters(shape[1], dtype)
    history = random_history(2, shape[1], torch.float32)
    grad_y = random_input(shape, dtype, memory_format, seed=3, offset=0.0)
    runs = []
    for _ in range(3):
        out = run_forward(x, weight, bias, history, None)
        grads = run_backward(grad_y, x, weight, out[1:], True)
        runs.append([t.clone() for t in (*out, *grads)])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------------------------- op contracts
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype, memory_format):
    x = random_input((4, 6, 5, 5), dtype, memory_format).requires_grad_()
    weight, bias = random_parameters(6, torch.float32)
    weight.requires_grad_()
    bias.requires_grad_()
    history = random_history(1, 6, torch.float32)
    for ema in (None, 0.1):
        torch.library.opcheck(FORWARD.default, (x, weight, bias, *history, EPS, ema, False))
    out = FORWARD(x.detach(), weight.detach(), bias.detach(), *history, EPS, None, True)
    grad_y = random_input(x.shape, dtype, memory_format, seed=9)
    for exact in (False, True):
        torch.library.opcheck(BACKWARD.default, (grad_y, x.detach(), weight.detach(), *out[1:], EPS,
                                                 exact))


def test_bad_arguments_name_the_argument():
    x = random_input((4, 6, 5, 5), torch.float32)
    count, mean, var = random_history(1, 6, torch.float32)
    with pytest.raises(RuntimeError, match="history_count"):
        FORWARD(x, None, None, count.cpu(), mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="weight"):
        FORWARD(x, torch.ones(5, device="cuda"), None, count, mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="x must be"):
        FORWARD(x.to(torch.int32), None, None, count, mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="history_var"):
        FORWARD(x, None, None, count, mean, var[:, :5], EPS, None, False)


# ------------------------------------------------------------------------------------------ layers
def _train_steps(layer, inputs):
    outputs, grads = [], []
    for x in inputs:
        x = x.clone().requires_grad_()
        y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)).sum().backward()
        outputs.append(y.detach())
        grads.append(x.grad)
    return outputs, grads


@pytest.mark.parametrize("options", [
    dict(mode="cumulative", window=3, grad="renorm"),
    dict(mode="cumulative", window=None, grad="exact"),
    dict(mode="sliding", window=3, grad="renorm"),
    dict(mode="ema", momentum=0.1, grad="exact"),
], ids=["cumulative", "cumulative_open", "sliding", "ema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "amp_fp16"])
def test_layer_state_matches_cpu(options, dtype):
    """A few training steps of CrossMiniBatchNorm2d on CUDA (channels_last input) against the same
    layer on the CPU: outputs, input gradients, parameter gradients and every buffer."""
    torch.manual_seed(0)
    cpu_layer = cmbn_ext.CrossMiniBatchNorm2d(6, **options)
    with torch.no_grad():
        cpu_layer.weight.uniform_(0.5, 1.5)
        cpu_layer.bias.uniform_(-1, 1)
    cuda_layer = copy.deepcopy(cpu_layer).cuda()
    inputs = [random_input((4, 6, 5, 5), dtype, torch.channels_last, seed=s) for s in range(5)]
    cuda_out, cuda_grads = _train_steps(cuda_layer, inputs)
    cpu_out, cpu_grads = _train_steps(cpu_layer, [x.cpu() for x in inputs])
    tol = OUTPUT_TOL[dtype]
    for step, (a, b) in enumerate(zip(cuda_out, cpu_out)):
        assert_close(a, b.to(torch.float64), tol, f"y at step {step}")
    for step, (a, b) in enumerate(zip(cuda_grads, cpu_grads)):
        assert_close(a, b.to(torch.float64), tol, f"x.grad at step {step}")
    for name, value in cpu_layer.state_dict().items():
        got = cuda_layer.state_dict()[name]
        if value.is_floating_point():
            assert_close(got, value.to(torch.float64), (1e-4, 1e-4), name)
        else:
            assert torch.equal(got.cpu(), value), name
    for name in ("weight", "bias"):
        want = getattr(cpu_layer, name).grad.to(torch.float64)
        assert_close(getattr(cuda_layer, name).grad, want, sum_tol(100 * len(inputs), torch.float32),
                     f"{name}.grad")


def test_compiled_model_matches_eager():
    """The layers inside torch.compile(fullgraph=True): outputs, gradients and every buffer after a few
    steps. Loose tolerances: the convolutions may pick other (TF32) algorithms when compiled; a lost
    state update or a wrong kernel shows as a difference of order one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(8, window=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
        cmbn_ext.CrossMiniBatchNorm2d(4, mode="ema", momentum=0.2, grad="exact"),
    ).cuda()
    eager = copy.deepcopy(model)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    for step in range(3):
        x = random_input((4, 3, 8, 8), torch.float32, seed=step)
        y_eager = eager(x)
        y_compiled = compiled(x)
        assert_close(y_compiled, y_eager.detach().to(torch.float64), (1e-3, 1e-3), f"y at step {step}")
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        assert_close(p_compiled.grad, p_eager.grad.to(torch.float64), (1e-3, 1e-3), f"{name}.grad")
    compiled_state = compiled.state_dict()
    for name, value in eager.state_dict().items():
        got = compiled_state.get(name, compiled_state.get(f"_orig_mod.{name}"))
        if value.is_floating_point():
            assert_close(got, value.to(torch.float64), (1e-3, 1e-3), name)
        else:
            assert torch.equal(got, value), name
