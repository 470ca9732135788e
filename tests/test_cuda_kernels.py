"""The compiled CUDA kernels against the reference math, run in fp64 on CPU copies of the same input
(the state update against window_state on CPU copies of the same buffers, in their own dtypes).

Covers every op (the fused forward and backward, the distributed path's phase ops with a group count
other than x's own, the in-place state update of every mode, window and dtype with non-finite
channels), every mode (count-weighted and EMA pooling; history of 0, 1 and 3 slots with empty slots),
dtype (fp16, bf16, fp32, fp64, AMP fp32 parameters with half input, no affine), layout (contiguous,
channels_last, channels_last_3d, (N, C), (N, C, L)), both gradients, many odd shapes, the split
regimes, both paths of the fused ops (two-pass and single-read, forced per test; the same bits on
either; the single read up to what fits on chip, and its fallbacks), more than 2^24 values per
channel, bitwise determinism, opcheck, torch.compile and the layers against the same layers on the
reference ops; test_regime reaches every kernel instantiation in each regime and checks the bits the
design promises. Outputs are poisoned first (the caching allocator is filled with NaN bytes) so an
element a kernel forgets to write fails the comparison, and inputs lie between NaN margins so a read
outside them does.

One suite for every family of compiled kernels, one family per run (BACKEND): the emulated CUDA
kernels when CMBN_EMULATED_KERNELS runs them on the CPU (tests/emulation), else the CUDA kernels on a
GPU, else the CPU kernels of cmbn_ext._C (csrc/cpu/); CMBN_TESTED_KERNELS=cpu picks the CPU kernels on
a machine with a GPU. The CPU kernels skip what only the CUDA kernels have (launch plans, the two
paths, regimes, the CUDA profiler), and the tensors they allocate start as NaN (torch's deterministic
mode fills new tensors). Skipped where none of them is loaded.
"""
import copy
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cmbn_ext
import emulation
from cmbn_ext import activations, ops, reference, window_state

# CMBN_EMULATED_KERNELS=1 (or asan) runs this module on the CPU against the same kernels compiled for
# the CPU, which conftest.py loads (tests/emulation; tests/test_emulated_kernels.py starts that run):
# CPU tensors stand for the device.
EMULATED = emulation.requested()
if EMULATED:
    BACKEND = "emulated"
elif (torch.cuda.is_available() and cmbn_ext.has_cuda_kernels()
      and os.environ.get("CMBN_TESTED_KERNELS") != "cpu"):
    BACKEND = "cuda"
elif cmbn_ext.has_cpu_kernels():
    BACKEND = "cpu"
else:
    pytest.skip("needs compiled kernels: a GPU and the CUDA kernels, or the CPU kernels (cmbn_ext._C)",
                allow_module_level=True)
DEVICE = "cuda" if BACKEND == "cuda" else "cpu"
CUDA_KERNELS = BACKEND != "cpu"  # the CUDA kernels, on a GPU or emulated
gpu_only = pytest.mark.skipif(BACKEND != "cuda", reason="a GPU-only check (4 GiB inputs, the CUDA "
                                                        "profiler)")
cuda_kernels_only = pytest.mark.skipif(not CUDA_KERNELS, reason="what only the CUDA kernels have: "
                                                                "launch plans, two paths, regimes")

# The fused ops' two paths (cmbn_ext/kernel_plan.py), forced per test through CMBN_KERNEL_PATH, which
# the launchers read at every call: "two_pass" everywhere, "single_read" wherever it fits.
PATHS = ["two_pass", "single_read"]


@pytest.fixture
def kernel_path(request, monkeypatch):
    if not CUDA_KERNELS and request.param != PATHS[0]:
        pytest.skip("the CPU kernels have one path")
    monkeypatch.setenv("CMBN_KERNEL_PATH", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _new_tensors_start_as_nan():
    """On the CPU kernels, every tensor they allocate starts as NaN (torch's deterministic mode fills
    new tensors), as the poisoned allocator does on a GPU and the emulation for its launchers: an
    element a kernel never writes fails the comparison."""
    if BACKEND != "cpu":
        yield
        return
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)


both_paths = pytest.mark.parametrize("kernel_path", PATHS, indirect=True)

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


def poison_allocator(nbytes=1 << 20, channels=0):
    """Leave 0xFF bytes (NaN in every float dtype) in the caching allocator's free blocks, so that
    tensors allocated next start as NaN and an element a kernel never writes fails the test. Blocks of
    the size of the per-channel outputs (``channels`` fp64 values and less) are poisoned too. (The
    emulated kernels poison every tensor they allocate themselves; the CPU kernels' tensors start as
    NaN: see _new_tensors_start_as_nan.)"""
    if DEVICE == "cpu":
        return
    sizes = [max(nbytes, 1 << 20)] * 3 + [n for n in (512, 4096, 65536, 262144) for _ in range(8)]
    sizes += [channels * 8] * 16 + [channels * 4] * 16 if channels else []
    junk = [torch.full((n,), 255, dtype=torch.uint8, device=DEVICE) for n in sizes]
    del junk


def random_input(shape, dtype, memory_format=torch.contiguous_format, seed=0, offset=0.3, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale + offset
    return device_input(x.to(dtype), memory_format)


INPUT_MARGIN = 64  # elements: 128 bytes or more, a multiple of 16 so that 16-byte packs stay aligned


def device_input(x, memory_format=torch.contiguous_format):
    """``x`` on the kernels' device in ``memory_format``, inside a storage whose other elements are NaN
    (INPUT_MARGIN on each side): a kernel that reads outside its input takes a NaN into the statistics
    and fails the comparison, as the poisoned outputs catch an element it never writes."""
    x = x.contiguous(memory_format=memory_format)
    storage = torch.full((x.numel() + 2 * INPUT_MARGIN,), float("nan"), dtype=x.dtype, device=DEVICE)
    placed = storage.as_strided(x.shape, x.stride(), INPUT_MARGIN)
    placed.copy_(x)
    return placed


def random_parameters(channels, dtype, seed=1):
    if dtype is None:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(channels, generator=gen).to(dtype).to(DEVICE)
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
    return count.to(DEVICE), mean.to(dtype).to(DEVICE), var.to(dtype).to(DEVICE)


def launch_counts():
    """The emulated kernels' launches so far, per (kernel instantiation, phase); {} on a GPU."""
    return emulation.launch_counts() if EMULATED else {}


def launched_since(before):
    """The (kernel instantiation, phase) pairs launched since ``before = launch_counts()``."""
    return {key for key, n in launch_counts().items() if n > before.get(key, 0)}


def cpu64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def run_forward(x, weight, bias, history, ema):
    poison_allocator(x.numel() * x.element_size(), x.shape[1])
    return FORWARD(x, weight, bias, *history, EPS, ema, False)


def run_backward(grad_y, x, weight, stats, exact):
    poison_allocator(x.numel() * x.element_size(), x.shape[1])
    return BACKWARD(grad_y, x, weight, *stats, EPS, exact)


def assert_close(actual, expected, tol, name):
    rtol, atol = tol
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected, rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def check_against_reference(x, weight, bias, history, ema, grad_y=None):
    """Forward and both backward choices of the kernels against reference.forward / backward in fp64.
    Returns the forward's outputs and ``{exact: (grad_x, grad_weight, grad_bias)}``."""
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
    grads = {}
    for exact in (False, True):
        grad_x, grad_weight, grad_bias = grads[exact] = run_backward(grad_y, x, weight, stats, exact)
        assert grad_x.dtype == dtype and grad_x.stride() == y.stride()
        want = reference.backward(cpu64(grad_y), cpu64(x), cpu64(weight), *(cpu64(s) for s in stats),
                                  EPS, exact)
        assert_close(grad_x, want[0], OUTPUT_TOL[dtype], f"grad_x (exact={exact})")
        assert_close(grad_weight, want[1], sum_tol(m, stat_dtype), f"grad_weight (exact={exact})")
        assert_close(grad_bias, want[2], sum_tol(m, stat_dtype), f"grad_bias (exact={exact})")
    return out, grads


# ------------------------------------------------------------------------------------------ parity
@both_paths
@pytest.mark.parametrize("slots", [0, 1, 3])
@pytest.mark.parametrize("ema", [None, 0.1], ids=["count_weighted", "ema"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
def test_matches_reference(dtype_case, layout, ema, slots, kernel_path):
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
    ((3, 42, 9, 9), "C not a multiple of the pack"),
]


def layout_of(shape, name):
    """The memory format called ``name`` for ``shape`` (skips channels_last where it does not exist)."""
    if name == "contiguous":
        return torch.contiguous_format
    if len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4 or 5 dimensions")
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


@both_paths
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[name for _, name in SHAPES])
def test_shapes(shape, dtype, memory_format, kernel_path):
    memory_format = layout_of(shape, memory_format)
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


def test_misaligned_inputs_that_would_take_16_byte_loads():
    """Shapes whose planes (inner size a multiple of the pack) or rows (C a multiple of the pack)
    would be read with 16-byte loads if the data were aligned: only the alignment check stops them."""
    planes = random_input((1 + 2 * 8 * 8 * 8,), torch.float16)[1:].view(2, 8, 8, 8)
    buffer = random_input((1 + 2 * 16 * 4 * 4,), torch.float32)
    rows = buffer[1:].as_strided((2, 16, 4, 4), (256, 1, 64, 16))  # channels_last, offset by 4 bytes
    assert rows.is_contiguous(memory_format=torch.channels_last)
    for x in (planes, rows):
        assert x.data_ptr() % 16
        weight, bias = random_parameters(x.shape[1], x.dtype)
        check_against_reference(x, weight, bias, random_history(1, x.shape[1], torch.float32), None)
    aligned = random_input((2, 8, 8, 8), torch.float16)
    misaligned_grad = random_input((1 + aligned.numel(),), torch.float16, seed=5)[1:].view(aligned.shape)
    weight, bias = random_parameters(8, torch.float16)
    check_against_reference(aligned, weight, bias, random_history(1, 8, torch.float32), None,
                            misaligned_grad)


def test_expanded_grad_y():
    """The gradient of y.sum() arrives expanded (stride 0): it is made to match x's layout."""
    x = random_input((4, 6, 5, 5), torch.float32, torch.channels_last)
    weight, bias = random_parameters(6, torch.float32)
    grad_y = torch.ones((), device=DEVICE).expand(x.shape)
    check_against_reference(x, weight, bias, random_history(1, 6, torch.float32), None, grad_y)


def test_empty_micro_batch_gives_reference_statistics():
    x = torch.empty((0, 5, 3, 3), device=DEVICE)
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
    out, _ = check_against_reference(x, weight, bias, history, None)
    batch_var = out[4].cpu()
    assert torch.allclose(batch_var, torch.full_like(batch_var, 1.5 ** 2), rtol=0.01)  # randn * 1.5


@gpu_only
@pytest.mark.parametrize("shape", [(2 ** 31 // 8 + 64, 8), (1, 1, 2 ** 31 + 64)], ids=["rows", "planes"])
def test_more_than_2_pow_31_elements(shape):
    """int64 indexing: offsets beyond 2^31 elements (4 GiB of fp16). The statistics are checked against
    fp64 sums taken on the GPU in chunks, y at both ends of the tensor."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float16)
    C = shape[1]
    empty = torch.zeros(1, C, dtype=torch.long, device=DEVICE)
    y, _, _, batch_mean, batch_var, _ = FORWARD(x, None, None, empty, empty.float(), empty.float(), EPS,
                                                None, False)
    values = x.view(-1, C) if x.dim() == 2 else x.view(-1, 1)
    total = torch.zeros(C, dtype=torch.float64, device=DEVICE)
    squares = torch.zeros_like(total)
    for chunk in values.split(1 << 26):
        chunk = chunk.double()
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    m = values.shape[0]
    mean = total / m
    var = squares / m - mean * mean  # fine in fp64 for unit-variance data
    torch.testing.assert_close(batch_mean.double(), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch_var.double(), var, rtol=1e-5, atol=0)
    flat_x, flat_y = values, y.view(values.shape)
    for rows in (slice(0, 1 << 20), slice(m - (1 << 20), m)):
        expected = (flat_x[rows].float() - batch_mean) * torch.rsqrt(batch_var + EPS)
        torch.testing.assert_close(flat_y[rows].float(), expected.half().float(), rtol=2e-3, atol=2e-3)
    del x, y


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("shape,memory_format", [
    ((2, 3, 256, 256), torch.contiguous_format),  # split over many blocks
    ((8, 64, 16, 16), torch.channels_last),
    ((200003, 5), torch.contiguous_format),
    ((4, 32, 7, 7), torch.contiguous_format),  # one fused launch
])
@both_paths
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_bitwise_deterministic(shape, memory_format, dtype, kernel_path):
    x = random_input(shape, dtype, memory_format)
    weight, bias = random_parameters(shape[1], dtype)
    history = random_history(2, shape[1], torch.float32)
    grad_y = random_input(shape, dtype, memory_format, seed=3, offset=0.0)
    runs = []
    for _ in range(3):
        out = run_forward(x, weight, bias, history, None)
        grads = [g for exact in (False, True) for g in run_backward(grad_y, x, weight, out[1:], exact)]
        runs.append([t.clone() for t in (*out, *grads)])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert_same_bits(b, a, "a rerun")


@pytest.mark.skipif(BACKEND != "cpu", reason="the CPU kernels' threads (torch.set_num_threads)")
@pytest.mark.parametrize("shape,memory_format", [
    ((8, 64, 28, 28), torch.contiguous_format),
    ((8, 64, 14, 14), torch.channels_last),
    ((200003, 5), torch.contiguous_format),  # few channels, many values each
    ((2, 3, 256, 256), torch.contiguous_format),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64],
                         ids=["fp16", "fp32", "fp64"])
def test_same_bits_for_any_thread_count(shape, memory_format, dtype):
    """Each channel is reduced in a fixed order whatever thread runs it: every op gives the same bits
    on one thread and on two."""
    x = random_input(shape, dtype, memory_format)
    weight, bias = random_parameters(shape[1], dtype)
    history = random_history(2, shape[1], reference.stats_dtype(dtype))
    grad_y = random_input(shape, dtype, memory_format, seed=3, offset=0.0)
    count = torch.tensor(2 * reference.values_per_channel(x) + 1)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = run_forward(x, weight, bias, history, None)
            grads = [g for exact in (False, True) for g in run_backward(grad_y, x, weight, out[1:], exact)]
            batch_mean, batch_var = BATCH_STATS(x)
            pooled = POOLED_FORWARD(x, weight, bias, count, batch_mean, batch_var, *history, EPS, 0.25)
            sums = BACKWARD_SUMS(grad_y, x, batch_mean)
            dx = BACKWARD_DX(grad_y, x, weight, *pooled[1:3], batch_mean, batch_var, pooled[3], *sums,
                             count, EPS, True)
            runs.append([t.clone() for t in (*out, *grads, batch_mean, batch_var, *pooled, *sums, dx)])
    finally:
        torch.set_num_threads(threads)
    for i, (one, two) in enumerate(zip(*runs)):
        assert_same_bits(two, one, f"output {i} on 2 threads against 1")


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
    if DEVICE == "cuda":  # on the CPU kernels (or emulated), the CPU is the kernels' device
        with pytest.raises(RuntimeError, match="history_count"):
            FORWARD(x, None, None, count.cpu(), mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="weight"):
        FORWARD(x, torch.ones(5, device=DEVICE), None, count, mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="x must be"):
        FORWARD(x.to(torch.int32), None, None, count, mean, var, EPS, None, False)
    with pytest.raises(RuntimeError, match="history_var"):
        FORWARD(x, None, None, count, mean, var[:, :5], EPS, None, False)


# ------------------------------------------------------------------------------------- phase ops
# The distributed path's split of the fused ops: cmbn_batch_stats -> (collective) -> cmbn_pooled_forward
# and cmbn_backward_sums -> (collective) -> cmbn_backward_dx. `count` is the whole group's values per
# channel, a 0-dim int64 device tensor, usually larger than x's own m.
BATCH_STATS = torch.ops.cmbn_ext.cmbn_batch_stats
POOLED_FORWARD = torch.ops.cmbn_ext.cmbn_pooled_forward
BACKWARD_SUMS = torch.ops.cmbn_ext.cmbn_backward_sums
BACKWARD_DX = torch.ops.cmbn_ext.cmbn_backward_dx


def group_statistics(batch_mean, batch_var):
    """Statistics as if merged with other ranks: close to this rank's, but not equal to them."""
    shift = torch.linspace(-0.2, 0.3, batch_mean.numel(), device=batch_mean.device, dtype=batch_mean.dtype)
    return batch_mean + shift, batch_var * 1.25 + 0.05


def check_phase_ops(x, weight, bias, history, ema, grad_y=None, group_scale=3):
    """Each phase op against its reference in fp64, with a group count of group_scale * m + 1."""
    dtype = x.dtype
    stat_dtype = reference.stats_dtype(dtype)
    channels = x.shape[1]
    m = reference.values_per_channel(x)
    history64 = (history[0].cpu(), cpu64(history[1]), cpu64(history[2]))

    poison_allocator(x.numel() * x.element_size())
    batch_mean, batch_var = BATCH_STATS(x)
    for s in (batch_mean, batch_var):
        assert s.dtype == stat_dtype and s.shape == (channels,)
    want = reference.batch_stats(cpu64(x))
    assert_close(batch_mean, want[0], STAT_TOL[stat_dtype], "batch_stats mean")
    assert_close(batch_var, want[1], STAT_TOL[stat_dtype], "batch_stats var")

    count = torch.tensor(group_scale * m + 1, device=DEVICE)
    group_mean, group_var = group_statistics(batch_mean, batch_var)
    poison_allocator(x.numel() * x.element_size())
    y, mean, var, b = POOLED_FORWARD(x, weight, bias, count, group_mean, group_var, *history, EPS, ema)
    assert y.dtype == dtype and y.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == x.stride(), "y must keep x's memory format"
    want = reference.pooled_forward(cpu64(x), cpu64(weight), cpu64(bias), count.cpu(), cpu64(group_mean),
                                    cpu64(group_var), *history64, EPS, ema)
    assert_close(y, want[0], OUTPUT_TOL[dtype], "pooled_forward y")
    for name, actual, expected in zip(("mean", "var", "b"), (mean, var, b), want[1:]):
        assert actual.dtype == stat_dtype and actual.shape == (channels,)
        assert_close(actual, expected, STAT_TOL[stat_dtype], f"pooled_forward {name}")

    if grad_y is None:
        grad_y = random_input(x.shape, dtype, seed=7, offset=0.0, scale=1.0)
    # The distributed path takes the sums about the group's mean.
    poison_allocator(x.numel() * x.element_size())
    sum_dy, sum_dy_xc = BACKWARD_SUMS(grad_y, x, group_mean)
    want = reference.backward_sums(cpu64(grad_y), cpu64(x), cpu64(group_mean))
    assert_close(sum_dy, want[0], sum_tol(m, stat_dtype), "backward_sums sum_dy")
    assert_close(sum_dy_xc, want[1], sum_tol(m, stat_dtype), "backward_sums sum_dy_xc")

    # Sums as if all-reduced over the group.
    group_sums = (sum_dy * group_scale + 0.5, sum_dy_xc * group_scale - 0.25)
    for exact in (False, True):
        poison_allocator(x.numel() * x.element_size())
        grad_x = BACKWARD_DX(grad_y, x, weight, mean, var, group_mean, group_var, b, *group_sums, count,
                             EPS, exact)
        assert grad_x.dtype == dtype and grad_x.stride() == y.stride()
        want = reference.backward_dx(cpu64(grad_y), cpu64(x), cpu64(weight), cpu64(mean), cpu64(var),
                                     cpu64(group_mean), cpu64(group_var), cpu64(b),
                                     *(cpu64(s) for s in group_sums), count.cpu(), EPS, exact)
        assert_close(grad_x, want, OUTPUT_TOL[dtype], f"backward_dx (exact={exact})")


@pytest.mark.parametrize("ema", [None, 0.1], ids=["count_weighted", "ema"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
def test_phase_ops_match_reference(dtype_case, layout, ema):
    dtype, param_dtype = DTYPE_CASES[dtype_case]
    shape, x_format, grad_format = LAYOUT_CASES[layout]
    x = random_input(shape, dtype, x_format)
    weight, bias = random_parameters(shape[1], param_dtype)
    history_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_y = random_input(shape, dtype, grad_format, seed=5, offset=0.0, scale=1.0)
    for slots in (0, 1, 3):
        check_phase_ops(x, weight, bias, random_history(slots, shape[1], history_dtype), ema, grad_y)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[name for _, name in SHAPES])
def test_phase_ops_shapes(shape, dtype, memory_format):
    """The split regimes (partial + apply launches) of the statistics-only and given-statistics
    phases, both layouts, packs and single values."""
    memory_format = layout_of(shape, memory_format)
    x = random_input(shape, dtype, memory_format, seed=sum(shape))
    weight, bias = random_parameters(shape[1], dtype)
    check_phase_ops(x, weight, bias, random_history(2, shape[1], torch.float32), None, group_scale=1)
    check_phase_ops(x, weight, bias, random_history(1, shape[1], torch.float32), 0.25)


def test_phase_ops_on_strided_and_misaligned_inputs():
    base = random_input((2 * 8 * 6 * 6 + 1,), torch.float16)
    misaligned = base[1:].view(2, 8, 6, 6)
    strided = random_input((3, 8, 10, 6), torch.float32)[:, :, ::2]
    permuted = random_input((3, 6, 8, 5), torch.float32).permute(0, 2, 1, 3)
    expanded_grad = torch.ones((), device=DEVICE).expand(3, 8, 5, 6)
    for x, grad_y in ((misaligned, None), (strided, None), (permuted, None), (strided, expanded_grad)):
        weight, bias = random_parameters(8, x.dtype)
        check_phase_ops(x, weight, bias, random_history(1, 8, torch.float32), None, grad_y)


def test_phase_ops_on_an_empty_micro_batch():
    """A rank with no values still takes part: zero statistics and sums, the pooled statistics from the
    group's count and the history, empty outputs."""
    x = torch.empty((0, 5, 3, 3), device=DEVICE)
    history = random_history(1, 5, torch.float32)
    batch_mean, batch_var = BATCH_STATS(x)
    assert torch.equal(batch_mean.cpu(), torch.zeros(5)) and torch.equal(batch_var.cpu(), torch.zeros(5))
    count = torch.tensor(17, device=DEVICE)
    group_mean = torch.linspace(-1, 1, 5, device=DEVICE)
    group_var = torch.linspace(0.5, 2, 5, device=DEVICE)
    weight, bias = random_parameters(5, torch.float32)
    y, mean, var, b = POOLED_FORWARD(x, weight, bias, count, group_mean, group_var, *history, EPS, None)
    assert y.shape == x.shape
    want = reference.pooled_forward(cpu64(x), cpu64(weight), cpu64(bias), count.cpu(), cpu64(group_mean),
                                    cpu64(group_var), history[0].cpu(), cpu64(history[1]),
                                    cpu64(history[2]), EPS, None)
    for name, actual, expected in zip(("mean", "var", "b"), (mean, var, b), want[1:]):
        assert_close(actual, expected, STAT_TOL[torch.float32], name)
    sum_dy, sum_dy_xc = BACKWARD_SUMS(x, x, batch_mean)
    assert torch.equal(sum_dy.cpu(), torch.zeros(5)) and torch.equal(sum_dy_xc.cpu(), torch.zeros(5))
    grad_x = BACKWARD_DX(x, x, weight, mean, var, group_mean, group_var, b, group_mean, group_var, count,
                         EPS, True)
    assert grad_x.shape == x.shape


def test_phase_ops_with_no_channels():
    x = torch.empty((4, 0, 3), device=DEVICE)
    empty = torch.empty(0, device=DEVICE)
    count = torch.tensor(12, device=DEVICE)
    history = (torch.zeros(1, 0, dtype=torch.long, device=DEVICE), empty[None], empty[None])
    assert all(t.shape == (0,) for t in BATCH_STATS(x))
    y, *stats = POOLED_FORWARD(x, None, None, count, empty, empty, *history, EPS, None)
    assert y.shape == x.shape and all(t.shape == (0,) for t in stats)
    assert all(t.shape == (0,) for t in BACKWARD_SUMS(x, x, empty))
    assert BACKWARD_DX(x, x, None, *([empty] * 7), count, EPS, False).shape == x.shape


# --------------------------------------------------------------- regimes, and the bits they promise
# The forward and backward two-pass kernels are one template each, instantiated per dtype, layout
# (kPlanes: contiguous planes; kRows: channels innermost, as channels_last) and pack width (16 bytes, or
# one value when the shape or alignment rules packs out), and launched in one of four phases: kFused
# (one block per channel group), kPartial then kApply (the split regime: several blocks per channel
# group, partial results through a workspace) and kGiven (the phase ops, from statistics or sums they
# are given). The single-read kernels (the fused ops' other path) take the same instantiations and
# two phases: kBlock (one block per channel group) and kGrid (several, meeting at a grid barrier).
# REGIMES has an input for each instantiation in the fused and the split regime, run on both paths;
# each case checks the kernels against the fp64 reference, then what must hold bit for bit:
# - The phase ops composed as the distributed path composes them give the fused ops' bits, on either
#   path. cmbn_batch_stats and cmbn_backward_sums run the two-pass reduction, stopping after it (the
#   split-0 block writes its result); the single-read kernels reduce the same values in the same
#   threads and blocks with the same code (the geometry is shared). cmbn_pooled_forward and
#   cmbn_backward_dx run the same finalize and elementwise code, from the statistics or sums they are
#   given, with every multiply-add spelled out (fma), so the comparison holds on a GPU too.
#   grad_weight is left out: the fused op computes it on the device, the phase path in PyTorch.
# - Every block of a channel group finalizes the same statistics: within a channel, equal inputs give
#   bit-equal outputs wherever they lie. The inputs take a few distinct values, so each value occurs
#   in every block of its channel's group.
# Never bitwise against the reference: a GPU contracts multiply-adds and rsqrtf is not correctly
# rounded. The emulated run also checks that each case reaches the instantiation and phases it is
# named after.

# dtype -> (name in the kernel's template arguments, accumulation type, values in a 16-byte pack)
REGIME_DTYPES = {
    "fp16": (torch.float16, "Half", "float", 8),
    "bf16": (torch.bfloat16, "BFloat16", "float", 8),
    "fp32": (torch.float32, "float", "float", 4),
    "fp64": (torch.float64, "double", "double", 2),
}


def regimes():
    """name -> (shape, dtype, memory format, kernel template arguments, phases of the fused ops).

    With the geometry of make_geometry (csrc/cuda/host_utils.h; 132 SMs, emulated or an H100/H200):
      kPlanes: 16-byte packs when the plane size is a multiple of the pack, single values for planes
        smaller than two packs (3 values); a channel splits over several blocks beyond 2048 packs
        (256 threads x 4 packs x 2 rounds).
      kPlanesMasked: planes of two packs or more whose size is not a multiple of the pack (7 x 7,
        95 x 97), walked in aligned packs masked at each plane's ends; the tensor's last pack reaches
        past its end and is read value by value.
      kRows: 16-byte packs when C is a multiple of the pack. A tile of channels is at most 8 lanes of
        packs (128 bytes per row) or 32 (fp64: 16) lanes of single values; C = 9 packs, or one lane
        more than a tile, leaves a second, partial tile. 1152 rows split over blocks, 12 do not.
    """
    cases = {}
    for name, (dtype, scalar, acc, pack) in REGIME_DTYPES.items():
        single_lanes = 16 if dtype == torch.float64 else 32
        layouts = {
            "planes_packs": ("kPlanes", pack, torch.contiguous_format, 3, (4, 4), (96, 96)),
            "planes_single": ("kPlanes", 1, torch.contiguous_format, 3, (3, 1), (3, 1)),
            "planes_masked": ("kPlanesMasked", pack, torch.contiguous_format, 3, (7, 7), (95, 97)),
            "rows_packs": ("kRows", pack, torch.channels_last, 9 * pack, (2, 3), (24, 24)),
            "rows_single": ("kRows", 1, torch.channels_last, single_lanes + 9, (2, 3), (24, 24)),
        }
        for layout_name, (layout, vec, memory_format, channels, small, large) in layouts.items():
            template = f"{scalar}, {acc}, {layout}, {vec}"
            cases[f"{name}-{layout_name}-fused"] = (
                (2, channels, *small), dtype, memory_format, template, {"kFused"})
            batch = 1000 if vec == 1 and layout == "kPlanes" else 2  # 3000 values a channel: a split
            cases[f"{name}-{layout_name}-split"] = (
                (batch, channels, *large), dtype, memory_format, template, {"kPartial", "kApply"})
    # More splits per channel (264: one wave of 132 SMs x 2 blocks) than the apply launch has threads per
    # channel (256).
    cases["fp32-planes_single-over_256_splits"] = (
        (200_001, 1, 3), torch.float32, torch.contiguous_format, "float, float, kPlanes, 1",
        {"kPartial", "kApply"})
    return cases


REGIMES = regimes()


def few_valued_input(shape, dtype, memory_format, seed, levels):
    """Random input of `levels` evenly spaced values per channel (shifted from channel to channel),
    exact in every dtype: each value recurs all over its channel."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    level = torch.randint(0, levels, shape, generator=gen).to(torch.float64)
    shift = torch.linspace(-1, 1, channels, dtype=torch.float64).view(1, channels, *[1] * (len(shape) - 2))
    return device_input(((level - (levels - 1) / 2) * 0.25 + shift).to(dtype), memory_format)


def bits(t):
    """The bit patterns of `t`'s elements, as integers of the same width (NaN payloads included)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().view(integer)


def assert_same_bits(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not torch.equal(bits(actual), bits(expected)):
        differ = bits(actual) != bits(expected)
        gap = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max()
        raise AssertionError(f"{what}: {int(differ.sum())} of {differ.numel()} values differ in their "
                             f"bits, by up to {float(gap):.3g}")


def assert_one_output_per_input(output, inputs, what):
    """Within each channel, outputs whose inputs are bit-equal are bit-equal, wherever they lie."""
    shape = output.shape
    channel = torch.arange(shape[1]).view(1, shape[1], *[1] * (len(shape) - 2)).expand(shape)
    keys = torch.stack([channel.reshape(-1)] + [bits(t).reshape(-1).long() for t in inputs], dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    out = bits(output).reshape(-1)
    first = torch.zeros(int(group.max()) + 1, dtype=out.dtype)
    first[group] = out  # one output of each group
    differ = out != first[group]
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {out.numel()} values differ in their bits "
                              f"from another of the same channel and input")


def assert_phase_ops_give_the_fused_bits(x, weight, bias, history, grad_y, fused, fused_grads):
    y, mean, var, batch_mean, batch_var, b = fused
    for name, actual, expected in zip(("batch_mean", "batch_var"), BATCH_STATS(x), (batch_mean, batch_var)):
        assert_same_bits(actual, expected, f"cmbn_batch_stats {name} against cmbn_forward's")
    count = torch.tensor(reference.values_per_channel(x), device=DEVICE)
    pooled = POOLED_FORWARD(x, weight, bias, count, batch_mean, batch_var, *history, EPS, None)
    for name, actual, expected in zip(("y", "mean", "var", "b"), pooled, (y, mean, var, b)):
        assert_same_bits(actual, expected, f"cmbn_pooled_forward {name} against cmbn_forward's")
    sum_dy, sum_dy_xc = BACKWARD_SUMS(grad_y, x, batch_mean)
    for exact, (grad_x, _, grad_bias) in fused_grads.items():
        assert_same_bits(sum_dy, grad_bias, f"cmbn_backward_sums sum_dy against grad_bias (exact={exact})")
        dx = BACKWARD_DX(grad_y, x, weight, mean, var, batch_mean, batch_var, b, sum_dy, sum_dy_xc, count,
                         EPS, exact)
        assert_same_bits(dx, grad_x, f"cmbn_backward_dx against cmbn_backward's grad_x (exact={exact})")


# A channel over 264 blocks holds more than the single-read backward holds per thread: two-pass only.
REGIME_RUNS = [(case, path) for case in REGIMES for path in PATHS
               if not (case.endswith("over_256_splits") and path == "single_read")]


@cuda_kernels_only
@pytest.mark.parametrize("case,kernel_path", REGIME_RUNS, indirect=["kernel_path"])
def test_regime(case, kernel_path):
    shape, dtype, memory_format, template, phases = REGIMES[case]
    x = few_valued_input(shape, dtype, memory_format, seed=1, levels=16)
    grad_y = few_valued_input(shape, dtype, memory_format, seed=2, levels=8)
    weight, bias = random_parameters(shape[1], dtype)
    history = random_history(2, shape[1], reference.stats_dtype(dtype))
    before = launch_counts()

    fused, fused_grads = check_against_reference(x, weight, bias, history, None, grad_y)
    assert_phase_ops_give_the_fused_bits(x, weight, bias, history, grad_y, fused, fused_grads)
    assert_one_output_per_input(fused[0], [x], "y")
    for exact, (grad_x, _, _) in fused_grads.items():
        assert_one_output_per_input(grad_x, [x, grad_y], f"grad_x (exact={exact})")

    for backward in (False, True):
        assert cmbn_ext.kernel_plan(x, backward)["path"] == kernel_path
    if EMULATED:
        # The phase ops run the two-pass kernel's reduction (batch_stats, backward_sums) and its kGiven
        # phase; the fused ops the path forced, in the regime of the case.
        directions = ("forward", "backward")
        expected = {(f"cmbn_{direction}_kernel<{template}>", phase)
                    for direction in directions for phase in phases | {"kGiven"}}
        if kernel_path == "single_read":
            residency = "kBlock" if phases == {"kFused"} else "kGrid"
            expected |= {(f"cmbn_{direction}_held_kernel<{template}>", residency) for direction in directions}
        assert launched_since(before) == expected


# ------------------------------------------------------------------------------------- the two paths
# Shapes of every regime of the single-read path: one block per channel group, and a grid barrier over
# planes and rows, with a partial tile, odd counts and non-pack widths.
PATH_CASES = {
    "block_planes": ((3, 5, 7, 9), torch.float32, torch.contiguous_format),
    "grid_planes": ((2, 3, 96, 96), torch.float16, torch.contiguous_format),
    "grid_rows": ((8, 40, 12, 12), torch.bfloat16, torch.channels_last),
    "grid_rows_odd": ((4099, 24), torch.float32, torch.contiguous_format),
    "grid_fp64": ((3, 2, 61, 67), torch.float64, torch.contiguous_format),
}


# The activations the paths are compared through: none, one the backward differentiates at the
# input (SiLU), and one it recovers from the output (memory="lean": LeakyReLU).
PATH_ACTIVATIONS = {"none": (activations.IDENTITY, 0.0, False), "silu": (activations.SILU, 0.0, False),
                    "leaky_0.2_from_output": (activations.LEAKY_RELU, 0.2, True)}


def fused_outputs(x, weight, bias, history, grad_y, exact, activation):
    code, param, from_output = activation
    poison_allocator(x.numel() * x.element_size(), x.shape[1])
    out = FORWARD(x, weight, bias, *history, EPS, None, False, code, param)
    poison_allocator(x.numel() * x.element_size(), x.shape[1])
    grads = BACKWARD(grad_y, out[0] if from_output else x, weight, *out[1:], EPS, exact, bias, code,
                     param, from_output)
    return [t.clone() for t in (*out, *grads)]


@cuda_kernels_only
@pytest.mark.parametrize("activation", list(PATH_ACTIVATIONS))
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_paths_give_the_same_bits(case, activation, monkeypatch):
    """Both paths reduce the same values in the same threads and blocks with the same code, and write
    with the same fused multiply-adds: every output of the fused ops is the same bits on either, with
    an activation too, and from the output."""
    shape, dtype, memory_format = PATH_CASES[case]
    x = random_input(shape, dtype, memory_format)
    weight, bias = random_parameters(shape[1], dtype)
    history = random_history(2, shape[1], reference.stats_dtype(dtype))
    grad_y = random_input(shape, dtype, memory_format, seed=4, offset=0.0)
    runs = {}
    for path in PATHS:
        monkeypatch.setenv("CMBN_KERNEL_PATH", path)
        assert cmbn_ext.kernel_plan(x)["path"] == path
        runs[path] = [fused_outputs(x, weight, bias, history, grad_y, exact, PATH_ACTIVATIONS[activation])
                      for exact in (False, True)]
    names = ("y", "mean", "var", "batch_mean", "batch_var", "b", "grad_x", "grad_weight", "grad_bias")
    for exact, (two_pass, single_read) in enumerate(zip(runs["two_pass"], runs["single_read"])):
        for name, a, b in zip(names, two_pass, single_read):
            assert_same_bits(b, a, f"{name} (exact={bool(exact)}) on the single-read path")


# Values one thread of the single-read kernels holds (kHeldRounds x kUnroll packs, cuda/kernel_types.h)
HELD_PACKS = {"forward": 16, "backward": 8}


def boundary_shapes(resident_blocks, held_packs, pack):
    """(fits, one row too many): contiguous fp32 planes over `resident_blocks // 4` channels, each
    split over 4 blocks (the geometry's one wave of resident blocks), every thread holding exactly
    `held_packs` packs in the first shape and one more in some threads in the second."""
    channels = max(resident_blocks // 4, 1)
    width = 64
    rows = 4 * 256 * held_packs * pack // width  # 4 blocks x 256 threads x held packs, in values
    return (1, channels, rows, width), (1, channels, rows + 1, width)


@cuda_kernels_only
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_single_read_path_up_to_what_fits_on_chip(direction, monkeypatch):
    """auto takes the single-read path while every thread's share fits in its registers and the grid
    fits on the GPU at once, and the two-pass path beyond; both give the reference's results."""
    monkeypatch.delenv("CMBN_KERNEL_PATH", raising=False)
    backward = direction == "backward"
    probe = random_input((1, 1, 8, 8), torch.float32)
    resident = cmbn_ext.kernel_plan(probe)["co_resident_blocks"]
    fits, too_big = boundary_shapes(resident, HELD_PACKS[direction], pack=4)
    for shape, path in ((fits, "single_read"), (too_big, "two_pass")):
        x = random_input(shape, torch.float32, seed=shape[2])
        plan = cmbn_ext.kernel_plan(x, backward)
        assert plan["path"] == path, (shape, plan)
        assert plan["grid"] == (shape[1], 4), plan
        assert plan["bytes_held"] == (x.numel() * 4 * (2 if backward else 1) if path == "single_read" else 0)
        weight, bias = random_parameters(shape[1], torch.float32)
        before = launch_counts()
        check_against_reference(x, weight, bias, random_history(1, shape[1], torch.float32), None)
        if EMULATED:
            held = {phase for (kernel, phase) in launched_since(before)
                    if kernel.startswith(f"cmbn_{direction}_held_kernel")}
            assert held == ({"kGrid"} if path == "single_read" else set())


@pytest.mark.skipif(not EMULATED, reason="the emulation refuses a cooperative grid on request; a GPU "
                                             "refuses one only when other work holds its SMs")
def test_a_refused_cooperative_launch_falls_back_to_two_pass(monkeypatch):
    """A cooperative launch the device refuses (it cannot hold the grid now) leaves the op to the
    two-pass kernels, with the same results. The launchers learn the occupancy once per process; the
    emulated device, told afterwards to hold one block per SM, refuses the planned grid."""
    monkeypatch.delenv("CMBN_KERNEL_PATH", raising=False)
    probe = random_input((1, 1, 8, 8), torch.float32)
    cmbn_ext.kernel_plan(probe, backward=True)  # the backward learns the device's occupancy now too
    resident = cmbn_ext.kernel_plan(probe)["co_resident_blocks"]
    shape, _ = boundary_shapes(resident, HELD_PACKS["forward"], pack=4)
    x = random_input(shape, torch.float32)
    plan = cmbn_ext.kernel_plan(x)
    assert plan["path"] == "single_read" and plan["cooperative"], plan
    monkeypatch.setenv("CMBN_EMULATED_BLOCKS_PER_SM", "1")  # half the grid fits now
    weight, bias = random_parameters(shape[1], torch.float32)
    before = launch_counts()
    check_against_reference(x, weight, bias, random_history(1, shape[1], torch.float32), None)
    launched = launched_since(before)
    assert ("cmbn_forward_kernel<float, float, kPlanes, 4>", "kApply") in launched, launched
    assert not any(kernel.startswith("cmbn_forward_held_kernel") for kernel, _ in launched), launched


@pytest.mark.skipif(not EMULATED, reason="the emulation refuses a cooperative grid and reports a stream "
                                             "capture on request")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_cooperative_launch_refused_during_capture_is_an_error(direction, monkeypatch):
    """While a stream is captured into a CUDA graph, a refused cooperative launch raises an error that
    says so instead of recording the two-pass kernels into the capture; nothing else is launched."""
    monkeypatch.delenv("CMBN_KERNEL_PATH", raising=False)
    backward = direction == "backward"
    probe = random_input((1, 1, 8, 8), torch.float32)
    cmbn_ext.kernel_plan(probe, not backward)  # both directions learn the device's occupancy now
    resident = cmbn_ext.kernel_plan(probe, backward)["co_resident_blocks"]
    shape, _ = boundary_shapes(resident, HELD_PACKS[direction], pack=4)
    x = random_input(shape, torch.float32)
    plan = cmbn_ext.kernel_plan(x, backward)
    assert plan["path"] == "single_read" and plan["cooperative"], plan
    weight, bias = random_parameters(shape[1], torch.float32)
    history = random_history(1, shape[1], torch.float32)
    stats = FORWARD(x, weight, bias, *history, EPS, None, False)[1:]
    grad_y = random_input(shape, torch.float32, seed=7)
    monkeypatch.setenv("CMBN_EMULATED_BLOCKS_PER_SM", "1")  # half the planned grid fits now
    monkeypatch.setenv("CMBN_EMULATED_STREAM_CAPTURE", "1")
    before = launch_counts()
    with pytest.raises(RuntimeError, match=rf"cmbn_{direction}: the GPU refused a cooperative launch "
                                           r"of \d+ blocks .* being captured.*CMBN_KERNEL_PATH=two_pass"):
        if backward:
            BACKWARD(grad_y, x, weight, *stats, EPS, False)
        else:
            FORWARD(x, weight, bias, *history, EPS, None, False)
    assert launched_since(before) == set()
    monkeypatch.delenv("CMBN_EMULATED_STREAM_CAPTURE")  # outside a capture it falls back, as before
    check_against_reference(x, weight, bias, history, None, grad_y)


@pytest.mark.skipif(not EMULATED, reason="the emulation switches devices on request (CMBN_EMULATED_DEVICE)")
def test_occupancy_and_plans_are_per_device(monkeypatch):
    """Each device's occupancy is asked on its first plan and kept: a second device holding fewer
    blocks gets plans of its own, and the first keeps its own."""
    monkeypatch.delenv("CMBN_KERNEL_PATH", raising=False)
    probe = random_input((1, 1, 8, 8), torch.float32)
    resident = cmbn_ext.kernel_plan(probe)["co_resident_blocks"]  # device 0, as every test before
    shape, _ = boundary_shapes(resident, HELD_PACKS["forward"], pack=4)
    x = random_input(shape, torch.float32)
    assert cmbn_ext.kernel_plan(x)["cooperative"]
    monkeypatch.setenv("CMBN_EMULATED_BLOCKS_PER_SM", "1")
    monkeypatch.setenv("CMBN_EMULATED_DEVICE", "1")  # a GPU of another model: half the blocks per SM
    other = cmbn_ext.kernel_plan(x)
    assert other["co_resident_blocks"] == resident // 2, other
    assert other["path"] == "two_pass", other  # the grid does not fit there: no refused launch to pay
    monkeypatch.setenv("CMBN_EMULATED_DEVICE", "0")
    again = cmbn_ext.kernel_plan(x)
    assert again["co_resident_blocks"] == resident and again["cooperative"], again


@cuda_kernels_only
def test_the_kernels_hold_an_image_for_the_device():
    x = random_input((2, 3, 4, 4), torch.float32)
    assert torch.ops.cmbn_ext.cmbn_kernel_image(x)
    if not EMULATED:
        assert cmbn_ext.has_cuda_kernels(x.device) and cmbn_ext.has_cuda_kernels()


NO_KERNEL_IMAGE = os.environ.get("CMBN_EMULATED_NO_KERNEL_IMAGE") == "1"


@pytest.mark.skipif(not (EMULATED and NO_KERNEL_IMAGE),
                    reason="needs an emulated device without a kernel image: test_emulated_kernels.py "
                           "runs it with CMBN_EMULATED_NO_KERNEL_IMAGE=1")
def test_without_a_kernel_image_the_reference_serves_with_one_warning():
    """A library built for other GPUs: every op runs the reference (no kernel is launched), with the
    reference's exact results, and the device gets one warning that says how to rebuild."""
    x = random_input((4, 3, 5, 5), torch.float32)
    assert not torch.ops.cmbn_ext.cmbn_kernel_image(x)
    with pytest.raises(RuntimeError, match="no kernel image"):
        cmbn_ext.kernel_plan(x)
    weight, bias = random_parameters(3, torch.float32)
    history = random_history(1, 3, torch.float32)
    grad_y = random_input(x.shape, torch.float32, seed=7)
    state = make_state("cumulative", 3, 3, torch.float32, tracking=True)
    expected_state = [t.clone() for t in state]
    layer = cmbn_ext.CrossMiniBatchNorm2d(3, window=1)  # BatchNorm2d exactly
    before = launch_counts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = FORWARD(x, weight, bias, *history, EPS, None, False)
        grads = BACKWARD(grad_y, x, weight, *outputs[1:], EPS, False)
        stats = BATCH_STATS(x)
        trained = torch.ops.cmbn_ext.cmbn_train_forward(x, weight, bias, *state, EPS, None, False,
                                                        "cumulative", 3, 0.1)
        micro_batch = x.clone().requires_grad_()
        y = layer(micro_batch)
        y.backward(grad_y)
    assert launched_since(before) == set()
    for got, want in ((outputs, ops.REFERENCE["cmbn_forward"](x, weight, bias, *history, EPS, None, False)),
                      (grads, ops.REFERENCE["cmbn_backward"](grad_y, x, weight, *outputs[1:], EPS, False)),
                      (stats, reference.batch_stats(x)),
                      (trained, ops.REFERENCE["cmbn_train_forward"](x, weight, bias, *expected_state, EPS,
                                                                    None, False, "cumulative", 3, 0.1)),
                      (state, expected_state)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    x_bn = x.clone().requires_grad_()
    y_bn = torch.nn.functional.batch_norm(x_bn, None, None, training=True, eps=layer.eps)
    y_bn.backward(grad_y)
    torch.testing.assert_close(y, y_bn)
    torch.testing.assert_close(micro_batch.grad, x_bn.grad)
    messages = [str(w.message) for w in caught if "no kernel image" in str(w.message)]
    assert len(messages) == 1, messages
    assert "TORCH_CUDA_ARCH_LIST" in messages[0] and "pure-PyTorch" in messages[0], messages[0]


@cuda_kernels_only
def test_kernel_path_switch_and_plan_errors(monkeypatch):
    x = random_input((2, 3, 4, 4), torch.float32)
    monkeypatch.setenv("CMBN_KERNEL_PATH", "fastest")
    with pytest.raises(RuntimeError, match="CMBN_KERNEL_PATH must be auto, two_pass or single_read"):
        FORWARD(x, None, None, *random_history(1, 3, torch.float32), EPS, None, False)
    monkeypatch.setenv("CMBN_KERNEL_PATH", "two_pass")
    plan = cmbn_ext.kernel_plan(x)
    assert plan["path"] == "two_pass" and plan["bytes_held"] == 0 and plan["launches"] == 1
    with pytest.raises(ValueError, match="shape"):
        cmbn_ext.kernel_plan(x.flatten())


# ---------------------------------------------------------------------------------- state update
UPDATE_STATE = torch.ops.cmbn_ext.cmbn_update_state
STATE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# The kernel rounds each step as the reference does (no FMA contraction): it should agree to the last
# bit or so; a few ulps of each buffer dtype leave room for a rounding tie taken differently.
STATE_TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
             torch.float64: (1e-13, 1e-13)}
# (mode, window): the window the layer passes is the cumulative length, None for the other modes.
STATE_MODES = {
    "cumulative3": ("cumulative", 3),
    "cumulative_open": ("cumulative", None),
    "sliding1": ("sliding", 1),  # no ring slots at all
    "sliding3": ("sliding", 3),
    "ema": ("ema", None),
}


def make_state(mode, window, channels, dtype, tracking, seed=0, step=0, running_dtype=None):
    """The layer's buffers, on the CPU, with some history already in them: the window in `dtype`, the
    running statistics in `running_dtype` (default `dtype`)."""
    running_dtype = running_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    slots = window - 1 if mode == "sliding" else 1
    state = [torch.randint(0, 30, (slots, channels), generator=gen),
             torch.randn(slots, channels, generator=gen).to(dtype),
             (torch.rand(slots, channels, generator=gen) + 0.1).to(dtype),
             torch.tensor(step)]
    if tracking:
        state += [torch.randn(channels, generator=gen).to(running_dtype),
                  (torch.rand(channels, generator=gen) + 0.5).to(running_dtype), torch.tensor(3)]
    else:
        state += [None, None, None]
    return state


def micro_batch_statistics(channels, dtype, seed, non_finite, stats_dtype=None):
    """(mean, var, batch_mean, batch_var) in the statistics dtype of a `dtype` layer (or in
    `stats_dtype`), with NaN/Inf in a few channels when asked."""
    gen = torch.Generator().manual_seed(seed)
    stats_dtype = stats_dtype or reference.stats_dtype(dtype)
    stats = [torch.randn(channels, generator=gen) * 2, torch.rand(channels, generator=gen) + 0.05,
             torch.randn(channels, generator=gen) * 2, torch.rand(channels, generator=gen) + 0.05]
    stats = [s.to(stats_dtype) for s in stats]
    if non_finite:
        stats[0][0] = float("nan")
        stats[3][channels // 2] = float("inf")
        stats[1][-1] = float("-inf")
    return stats


def counts(m):
    """The count ``m`` as the kernel takes it (a 0-dim int64 tensor on its device) and as the reference
    on the CPU takes it."""
    return torch.tensor(m, device=DEVICE), torch.tensor(m)


def to_device(state):
    """A copy of the buffers on the kernels' device (a copy even when that is the CPU: the reference
    updates the originals)."""
    return [None if t is None else t.to(DEVICE, copy=True) for t in state]


def assert_same_state(kernel_state, cpu_state, dtype, what, same_statistics=True):
    """Every buffer equal; on the CUDA kernels floating ones to a few ulps of the looser of `dtype`
    (the layer's) and their own dtype, on the CPU kernels bit for bit when both updates took the same
    statistics (they round each value as the reference's tensor operations do, and no compiler
    contracts their multiply-adds); `same_statistics=False` (each side's forward computed its own)
    takes the tolerances there too."""
    names = ("window_count", "window_mean", "window_var", "window_step", "running_mean", "running_var",
             "num_batches_tracked")
    for name, got, want in zip(names, kernel_state, cpu_state):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {name}"
        if want.is_floating_point() and (CUDA_KERNELS or not same_statistics):
            rtol, atol = (max(pair) for pair in zip(STATE_TOL[dtype], STATE_TOL[want.dtype]))
            torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert torch.equal(got.cpu(), want), f"{what}: {name}: {got.cpu()} != {want}"


def run_state_steps(mode, window, channels, dtype, tracking, momentum, ms, start_step=0,
                    running_dtype=None, stats_dtype=None, every_micro_batch=False):
    """Several micro-batches through the kernel and through window_state.update_state on the CPU
    (same dtypes), comparing every buffer after each."""
    cpu_state = make_state(mode, window, channels, dtype, tracking, seed=channels, step=start_step,
                           running_dtype=running_dtype)
    kernel_state = to_device(cpu_state)
    window = window if mode in ("cumulative", "deferred") else None  # what the layer passes
    for i, m in enumerate(ms):
        stats = micro_batch_statistics(channels, dtype, seed=i, non_finite=i % 2 == 1,
                                       stats_dtype=stats_dtype)
        m_device, m_cpu = counts(m)
        UPDATE_STATE(*kernel_state, m_device, *(s.to(DEVICE) for s in stats), mode, window, momentum,
                     every_micro_batch)
        with torch.no_grad():
            window_state.update_state(*cpu_state, m_cpu, *stats, mode, window, momentum,
                                      every_micro_batch)
        assert_same_state(kernel_state, cpu_state, dtype, f"step {i} (m={m})")


@pytest.mark.parametrize("channels", [1, 7, 1500])  # 1500: threads loop over the channels
@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative_average"])
@pytest.mark.parametrize("dtype_name", list(STATE_DTYPES))
@pytest.mark.parametrize("mode_name", list(STATE_MODES))
def test_update_state_matches_reference(mode_name, dtype_name, momentum, tracking, channels):
    mode, window = STATE_MODES[mode_name]
    if mode == "ema" and momentum is None:
        pytest.skip("mode='ema' needs a float momentum")
    # Seven steps: cumulative windows of 3 commit twice, the sliding ring wraps, non-finite channels
    # every other step; m = 1 with an empty history is a count of 1 (no running update).
    run_state_steps(mode, window, channels, STATE_DTYPES[dtype_name], tracking, momentum,
                    ms=[5, 1, 12, 2, 100, 3, 7])


# (window dtype, running statistics dtype, statistics dtype): the kernel computes in the dtypes the
# reference promotes to, fp64 wherever one of them is fp64 (sliding mode leaves the window out).
STATE_DTYPE_MIXES = {
    "fp64_window_fp32_stats": (torch.float64, torch.float64, torch.float32),
    "fp64_window_fp32_running": (torch.float64, torch.float32, torch.float32),
    "fp64_running_fp32_stats": (torch.float32, torch.float64, torch.float32),
}


@pytest.mark.parametrize("mix", list(STATE_DTYPE_MIXES))
@pytest.mark.parametrize("mode_name", list(STATE_MODES))
def test_update_state_with_mixed_dtypes(mode_name, mix):
    mode, window = STATE_MODES[mode_name]
    window_dtype, running_dtype, stats_dtype = STATE_DTYPE_MIXES[mix]
    run_state_steps(mode, window, 7, window_dtype, True, 0.1, ms=[5, 1, 12, 2, 100, 3, 7],
                    running_dtype=running_dtype, stats_dtype=stats_dtype)


def test_update_state_ring_slot_follows_the_step():
    """The sliding ring writes slot window_step % S, read on the device from any step."""
    run_state_steps("sliding", 4, 6, torch.float32, True, 0.1, ms=[4, 4, 4, 4], start_step=7)


def test_update_state_count_of_one():
    """A count of 1 (m = 1, empty window): no running update, yet the window commits and
    num_batches_tracked counts it."""
    cpu_state = make_state("cumulative", 1, 4, torch.float32, True)
    cpu_state[0].zero_()
    kernel_state = to_device(cpu_state)
    stats = micro_batch_statistics(4, torch.float32, seed=0, non_finite=False)
    m_device, m_cpu = counts(1)
    UPDATE_STATE(*kernel_state, m_device, *(s.to(DEVICE) for s in stats), "cumulative", 1, None)
    window_state.update_state(*cpu_state, m_cpu, *stats, "cumulative", 1, None)
    assert_same_state(kernel_state, cpu_state, torch.float32, "m=1")
    assert int(kernel_state[6]) == 4 and int(kernel_state[3]) == 0


ZERO_COUNT_MODES = [("cumulative", 1, False), ("cumulative", 3, False), ("cumulative", None, True),
                    ("sliding", 3, False), ("sliding", 1, False), ("ema", None, False),
                    ("deferred", 2, False), ("deferred", None, True)]


@pytest.mark.parametrize("mode,window,every", ZERO_COUNT_MODES)
def test_update_state_zero_count_changes_nothing(mode, window, every):
    """m = 0 on the device (an empty micro-batch on every rank of a group): the kernel leaves every
    buffer as it was, whatever the mode, window step or statistics; so does the reference."""
    slots_window = window if mode == "sliding" else 1
    cpu_state = make_state(mode, slots_window, 5, torch.float32, True, step=2 if window != 1 else 0)
    before = [None if t is None else t.clone() for t in cpu_state]
    kernel_state = to_device(cpu_state)
    stats = micro_batch_statistics(5, torch.float32, seed=3, non_finite=True)
    window = None if mode in ("sliding", "ema") else window
    m_device, m_cpu = counts(0)
    UPDATE_STATE(*kernel_state, m_device, *(s.to(DEVICE) for s in stats), mode, window, 0.1, every)
    window_state.update_state(*cpu_state, m_cpu, *stats, mode, window, 0.1, every)
    for got, want, kept in zip(kernel_state, cpu_state, before):
        if kept is not None:
            assert torch.equal(got.cpu(), kept) and torch.equal(want, kept)


def test_update_state_count_on_the_cpu():
    """A CPU count with the state on the GPU (read on the host, a kernel argument) gives the bits of
    the same count on the device."""
    if DEVICE == "cpu":
        pytest.skip("the CPU is the kernels' device")
    for mode, window in (("cumulative", 3), ("sliding", 3), ("ema", None)):
        state = to_device(make_state(mode, window, 6, torch.float32, True))
        other = [None if t is None else t.clone() for t in state]
        window = window if mode == "cumulative" else None
        for step, m in enumerate((5, 0, 9)):
            stats = [s.to(DEVICE) for s in micro_batch_statistics(6, torch.float32, seed=step,
                                                                  non_finite=False)]
            UPDATE_STATE(*state, torch.tensor(m), *stats, mode, window, 0.1)
            UPDATE_STATE(*other, torch.tensor(m, device=DEVICE), *stats, mode, window, 0.1)
            for got, want in zip(state, other):
                assert got is None or torch.equal(got, want), (mode, step)


def test_update_state_with_no_channels():
    """C == 0: the scalars still advance (window_step, num_batches_tracked). Checked directly: the
    reference itself fails in sliding mode here (it indexes finite[0])."""
    for mode, window, step, tracked in (("cumulative", 1, 0, 4), ("cumulative", 3, 1, 3),
                                        ("sliding", 3, 1, 4), ("ema", None, 1, 4)):
        state = to_device(make_state(mode, window, 0, torch.float32, True))
        stats = [s.to(DEVICE) for s in micro_batch_statistics(0, torch.float32, seed=0, non_finite=False)]
        window = window if mode == "cumulative" else None
        UPDATE_STATE(*state, counts(4)[0], *stats, mode, window, 0.1)
        assert int(state[3]) == step and int(state[6]) == tracked, mode
        assert all(t.numel() == 0 for t in state[:3] + state[4:6])


def test_update_state_on_non_contiguous_buffers():
    """Strided buffers are updated through contiguous copies written back."""
    channels = 5
    cpu_state = make_state("sliding", 3, channels, torch.float32, True)
    kernel_state = to_device(cpu_state)
    for i in (0, 1, 2, 4, 5):  # every (S, C) buffer as the transpose of a (C, S) tensor, (C,) strided
        t = kernel_state[i]
        if t.dim() == 2:
            strided = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=DEVICE).t()
        else:
            strided = torch.empty(2 * t.shape[0], dtype=t.dtype, device=DEVICE)[::2]
        strided.copy_(t)
        assert not strided.is_contiguous()
        kernel_state[i] = strided
    for step in range(3):
        stats = micro_batch_statistics(channels, torch.float32, seed=step, non_finite=step == 1)
        m_device, m_cpu = counts(6)
        UPDATE_STATE(*kernel_state, m_device, *(s.to(DEVICE) for s in stats), "sliding", None, 0.1)
        window_state.update_state(*cpu_state, m_cpu, *stats, "sliding", None, 0.1)
        assert_same_state(kernel_state, cpu_state, torch.float32, f"step {step}")


def test_update_state_bad_arguments_name_the_argument():
    state = to_device(make_state("cumulative", 2, 4, torch.float32, True))
    before = [t.clone() for t in state]
    stats = [s.to(DEVICE) for s in micro_batch_statistics(4, torch.float32, seed=0, non_finite=False)]
    m = counts(4)[0]
    with pytest.raises(RuntimeError, match="layer_mode"):
        UPDATE_STATE(*state, m, *stats, "window", 2, 0.1)
    with pytest.raises(RuntimeError, match="batch_var"):
        UPDATE_STATE(*state, m, *stats[:3], stats[3][:3], "cumulative", 2, 0.1)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        UPDATE_STATE(*state[:6], None, m, *stats, "cumulative", 2, 0.1)
    for bad in (m.to(torch.int32), m.view(1)):
        with pytest.raises(RuntimeError, match="m must"):
            UPDATE_STATE(*state, bad, *stats, "cumulative", 2, 0.1)
    if not EMULATED:  # a CPU count is read on the host (emulated, it is the device's)
        with pytest.raises(RuntimeError, match="m must be >= 0"):
            UPDATE_STATE(*state, torch.tensor(-1), *stats, "cumulative", 2, 0.1)
    if DEVICE == "cuda":  # on the CPU kernels (or emulated), the CPU is the kernels' device
        with pytest.raises(RuntimeError, match="window_step"):
            UPDATE_STATE(*state[:3], state[3].cpu(), *state[4:], m, *stats, "cumulative", 2, 0.1)
    assert all(torch.equal(got, kept) for got, kept in zip(state, before))


# ------------------------------------------------------------------------- op contracts, phases
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_phase_ops(dtype, memory_format):
    x = random_input((4, 6, 5, 5), dtype, memory_format)
    weight, bias = random_parameters(6, torch.float32)
    history = random_history(1, 6, torch.float32)
    torch.library.opcheck(BATCH_STATS.default, (x,))
    batch_mean, batch_var = BATCH_STATS(x)
    count = torch.tensor(2 * reference.values_per_channel(x), device=DEVICE)
    for ema in (None, 0.1):
        pooled_args = (x, weight, bias, count, batch_mean, batch_var, *history, EPS, ema)
        torch.library.opcheck(POOLED_FORWARD.default, pooled_args)
    _, mean, var, b = POOLED_FORWARD(*pooled_args)
    grad_y = random_input(x.shape, dtype, memory_format, seed=9)
    torch.library.opcheck(BACKWARD_SUMS.default, (grad_y, x, batch_mean))
    sum_dy, sum_dy_xc = BACKWARD_SUMS(grad_y, x, batch_mean)
    for exact in (False, True):
        torch.library.opcheck(BACKWARD_DX.default, (grad_y, x, weight, mean, var, batch_mean, batch_var, b,
                                                    sum_dy, sum_dy_xc, count, EPS, exact))


@pytest.mark.parametrize("mode_name", list(STATE_MODES))
@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
def test_opcheck_update_state(mode_name, tracking):
    mode, window = STATE_MODES[mode_name]
    state = to_device(make_state(mode, window, 6, torch.float32, tracking))
    stats = [s.to(DEVICE) for s in micro_batch_statistics(6, torch.float32, seed=0, non_finite=True)]
    window = window if mode == "cumulative" else None
    torch.library.opcheck(UPDATE_STATE.default, (*state, counts(8)[0], *stats, mode, window, 0.1))


# ------------------------------------------------------------------------------------------ layers
class ReferenceOps(TorchDispatchMode):
    """Runs every cmbn_ext op on its reference implementation (cmbn_ext.ops.REFERENCE), whatever serves
    it otherwise: the expectation for a layer whose ops run on the kernels, in the same process even
    when the kernels serve CPU tensors (emulated)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cmbn_ext":
            return cmbn_ext.ops.REFERENCE[func._opname](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


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
@pytest.mark.parametrize("shape,memory_format,split", [
    ((4, 6, 5, 5), torch.channels_last, False),
    # 1152 rows of 40 channels: several blocks per channel group, with a partial channel tile
    ((8, 40, 12, 12), torch.channels_last, True),
    ((2, 3, 96, 96), torch.contiguous_format, True),  # the same over planes
], ids=["fused", "split_rows", "split_planes"])
def test_layer_state_matches_reference(shape, memory_format, split, options, dtype):
    """A few training steps of CrossMiniBatchNorm2d on the kernels against the same layer on the
    reference ops (on the CPU): outputs, input gradients, parameter gradients and every buffer."""
    torch.manual_seed(0)
    channels = shape[1]
    reference_layer = cmbn_ext.CrossMiniBatchNorm2d(channels, **options)
    with torch.no_grad():
        reference_layer.weight.uniform_(0.5, 1.5)
        reference_layer.bias.uniform_(-1, 1)
    kernel_layer = copy.deepcopy(reference_layer).to(DEVICE)
    inputs = [random_input(shape, dtype, memory_format, seed=s) for s in range(5)]
    before = launch_counts()
    kernel_out, kernel_grads = _train_steps(kernel_layer, inputs)
    if EMULATED:  # the shape reaches the regime it is named after
        launched = launched_since(before)
        assert any(phase in ("kPartial", "kGrid") for _, phase in launched) == split, launched
    before = launch_counts()
    with ReferenceOps():
        reference_out, reference_grads = _train_steps(reference_layer, [x.cpu() for x in inputs])
    assert not launched_since(before), "the expectation ran on the kernels"
    tol = OUTPUT_TOL[dtype]
    for step, (a, b) in enumerate(zip(kernel_out, reference_out)):
        assert_close(a, b.to(torch.float64), tol, f"y at step {step}")
    for step, (a, b) in enumerate(zip(kernel_grads, reference_grads)):
        assert_close(a, b.to(torch.float64), tol, f"x.grad at step {step}")
    for name, value in reference_layer.state_dict().items():
        got = kernel_layer.state_dict()[name]
        if value.is_floating_point():
            assert_close(got, value.to(torch.float64), (1e-4, 1e-4), name)
        else:
            assert torch.equal(got.cpu(), value), name
    m = reference.values_per_channel(inputs[0])
    for name in ("weight", "bias"):
        want = getattr(reference_layer, name).grad.to(torch.float64)
        assert_close(getattr(kernel_layer, name).grad, want, sum_tol(m * len(inputs), torch.float32),
                     f"{name}.grad")


@pytest.mark.skipif(EMULATED, reason="compiling for the emulated kernels' CPU device takes minutes")
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
    ).to(DEVICE)
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


def _gpu_work_of(function):
    """Names of the kernels, copies and memsets that `function` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@gpu_only
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (2, 3, 256, 256)], ids=["fused", "split"])
def test_training_step_launches_only_the_kernels(shape):
    """A training forward is the forward kernel(s) (1 or 2) and one state-update kernel, nothing else
    on the GPU; the backward is the backward kernel(s) (1 or 2) besides autograd's own work."""
    layer = cmbn_ext.CrossMiniBatchNorm2d(shape[1], window=2).to(DEVICE)
    x = random_input(shape, torch.float32).requires_grad_()
    grad_y = random_input(shape, torch.float32, seed=4)
    layer(x)  # warm-up: one-time initialization stays out of the count
    outputs = []
    names = _gpu_work_of(lambda: outputs.append(layer(x)))
    assert all("cmbn" in name for name in names), names
    assert sum("update_state_kernel" in name for name in names) == 1, names
    assert 2 <= len(names) <= 3, names
    names = _gpu_work_of(lambda: outputs[0].backward(grad_y))
    assert 1 <= sum("cmbn_backward" in name and "kernel" in name for name in names) <= 2, names


# ------------------------------------------------------------------------------- fused activations
# cmbn_forward / cmbn_train_forward with an activation applied before the store, and cmbn_backward
# through it: from the input (z recomputed) and, for the invertible activations, from the output
# (memory="lean": z = act^-1(out), then the normalized input). The reference applies the activation in
# fp64 here, the kernels in their statistics' dtype: the tolerances above hold. The inputs keep every
# pre-activation value away from a kink of the derivative (|z - kink| > 1e-3), where the kernels'
# rounding could take the other side.
ACTIVATIONS = {
    "identity": (activations.IDENTITY, 0.0),
    "relu": (activations.RELU, 0.0),
    "leaky_0.01": (activations.LEAKY_RELU, 0.01),
    "leaky_0.2": (activations.LEAKY_RELU, 0.2),
    "elu_1": (activations.ELU, 1.0),
    "elu_0.7": (activations.ELU, 0.7),
    "silu": (activations.SILU, 0.0),
    "mish": (activations.MISH, 0.0),
    "hardswish": (activations.HARDSWISH, 0.0),
}
# Where the derivative jumps (ELU's is continuous at 0 only for alpha = 1; kept away anyway).
KINKS = {activations.RELU: (0.0,), activations.LEAKY_RELU: (0.0,), activations.ELU: (0.0,),
         activations.HARDSWISH: (-3.0, 3.0)}
# ELU from its output loses z where exp(z) is below the output dtype's resolution next to -alpha
# (bf16: z < -6); the inputs stay above this.
ELU_LOWEST_Z = -4.0
ACTIVATION_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
                     "bf16": torch.bfloat16}
# The emulated kernels run the module on the CPU at a fraction of the speed: they take every
# activation in fp32 and a representative subset of the other combinations (heavy ones marked).
REPRESENTATIVE_ACTIVATIONS = ("leaky_0.2", "elu_0.7", "mish", "hardswish")
heavy_when_emulated = pytest.mark.skipif(EMULATED, reason="the emulated kernels run a representative "
                                                           "subset of the activation cases")


def activation_parameters(channels, dtype, seed=1):
    """weight of magnitude 0.5 to 1.5 with both signs (the lean backward divides by it), bias in
    [-1, 1]."""
    if dtype is None:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(channels, generator=gen) + 0.5
    sign = torch.where(torch.arange(channels) % 3 == 2, -1.0, 1.0)
    weight = (magnitude * sign).to(dtype).to(DEVICE)
    bias = (torch.rand(channels, generator=gen) * 2 - 1).to(dtype).to(DEVICE)
    return weight, bias


def pre_activation(x64, weight, bias, history, ema):
    """``(z, dz/dx)`` of every element in fp64, with the statistics the forward pools for ``x64``."""
    history64 = (history[0].cpu(), cpu64(history[1]), cpu64(history[2]))
    _, mean, var, *_ = reference.forward(x64, cpu64(weight), cpu64(bias), *history64, EPS, ema)
    slope = torch.rsqrt(var + EPS)
    if weight is not None:
        slope = slope * cpu64(weight)
    z = (x64 - reference.channel_view(mean, x64)) * reference.channel_view(slope, x64)
    if bias is not None:
        z = z + reference.channel_view(cpu64(bias), x64)
    return z, reference.channel_view(slope, x64)


def activation_input(shape, dtype, memory_format, weight, bias, history, ema, code, seed=0):
    """Random input whose pre-activation values keep 1e-3 from ``code``'s kinks (and, ELU, above
    ELU_LOWEST_Z): offending elements are moved to another z and the statistics taken again until
    none is left."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen).clamp(-3, 3) * 1.5 + 0.3).to(dtype).double()
    kinks = KINKS.get(code, ())
    for _ in range(50):
        if not kinks or x.numel() == 0:
            break
        z, slope = pre_activation(x, weight, bias, history, ema)
        near = torch.zeros_like(z, dtype=torch.bool)
        for kink in kinks:
            near |= (z - kink).abs() < 1e-3
        low = z < ELU_LOWEST_Z if code == activations.ELU else torch.zeros_like(near)
        if not (near | low).any():
            break
        # z moves by 0.02 to 0.1 (past what rounding x to its dtype undoes), or up to -2.
        shift = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.08 + 0.02
        target = torch.where(low, torch.full_like(z, -2.0), z + shift)
        x = torch.where(near | low, x + (target - z) / slope, x).to(dtype).double()
    else:
        raise AssertionError("could not keep the input away from the activation's kinks")
    return device_input(x.to(dtype), memory_format)


def run_activated_forward(x, weight, bias, history, ema, activation):
    poison_allocator(x.numel() * x.element_size(), x.shape[1])
    return FORWARD(x, weight, bias, *history, EPS, ema, False, *activation)


def run_activated_backward(grad_y, saved, weight, bias, stats, exact, activation, from_output):
    poison_allocator(saved.numel() * saved.element_size(), saved.shape[1])
    return BACKWARD(grad_y, saved, weight, *stats, EPS, exact, bias, *activation, from_output)


def check_activation_against_reference(x, weight, bias, history, ema, activation, grad_y=None):
    """The activated forward and every backward (both gradients; from the input, and from the output
    when the activation is invertible) against the reference in fp64. Returns the forward's outputs
    and ``{(exact, from_output): grads}``."""
    code, param = activation
    dtype = x.dtype
    stat_dtype = reference.stats_dtype(dtype)
    out = run_activated_forward(x, weight, bias, history, ema, activation)
    y, stats = out[0], out[1:]
    assert y.dtype == dtype and y.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        assert y.stride() == x.stride(), "y must keep x's memory format"
    history64 = (history[0].cpu(), cpu64(history[1]), cpu64(history[2]))
    expected = reference.forward(cpu64(x), cpu64(weight), cpu64(bias), *history64, EPS, ema, code, param)
    assert_close(y, expected[0], OUTPUT_TOL[dtype], "y")
    for name, actual, want in zip(("mean", "var", "batch_mean", "batch_var", "b"), stats, expected[1:]):
        assert_close(actual, want, STAT_TOL[stat_dtype], name)

    if grad_y is None:
        grad_y = random_input(x.shape, dtype, seed=7, offset=0.0, scale=1.0)
    m = reference.values_per_channel(x)
    grads = {}
    for from_output in (False, True) if activations.invertible(code, param) else (False,):
        saved = y if from_output else x
        for exact in (False, True):
            what = f"(exact={exact}, from_output={from_output})"
            grad_x, grad_weight, grad_bias = grads[exact, from_output] = run_activated_backward(
                grad_y, saved, weight, bias, stats, exact, activation, from_output)
            assert grad_x.dtype == dtype and grad_x.stride() == y.stride(), what
            want = reference.backward(cpu64(grad_y), cpu64(saved), cpu64(weight),
                                      *(cpu64(s) for s in stats), EPS, exact, cpu64(bias), code, param,
                                      from_output)
            assert_close(grad_x, want[0], OUTPUT_TOL[dtype], f"grad_x {what}")
            assert_close(grad_weight, want[1], sum_tol(m, stat_dtype), f"grad_weight {what}")
            assert_close(grad_bias, want[2], sum_tol(m, stat_dtype), f"grad_bias {what}")
    return out, grads


def activation_cases():
    """(activation, dtype, layout, history) for test_activation_matches_reference; outside fp32, the
    emulated kernels take the representative activations with history."""
    cases = []
    for name in ACTIVATIONS:
        for dtype in ACTIVATION_DTYPES:
            for layout in ("contiguous", "channels_last"):
                for history in ("none", "window", "ema"):
                    light = dtype == "fp32" or (name in REPRESENTATIVE_ACTIVATIONS and history == "window")
                    cases.append(pytest.param(name, dtype, layout, history,
                                              marks=() if light else heavy_when_emulated,
                                              id=f"{name}-{dtype}-{layout}-{history}"))
    return cases


# history name -> (slots, ema momentum)
ACTIVATION_HISTORIES = {"none": (0, None), "window": (3, None), "ema": (1, 0.1)}


@pytest.mark.parametrize("activation,dtype_name,layout,history_name", activation_cases())
def test_activation_matches_reference(activation, dtype_name, layout, history_name):
    code, param = ACTIVATIONS[activation]
    dtype = ACTIVATION_DTYPES[dtype_name]
    shape, x_format, grad_format = LAYOUT_CASES[layout]
    slots, ema = ACTIVATION_HISTORIES[history_name]
    weight, bias = activation_parameters(shape[1], dtype)
    history = random_history(slots, shape[1], reference.stats_dtype(dtype))
    x = activation_input(shape, dtype, x_format, weight, bias, history, ema, code)
    grad_y = random_input(shape, dtype, grad_format, seed=5, offset=0.0, scale=1.0)
    check_activation_against_reference(x, weight, bias, history, ema, (code, param), grad_y)


@pytest.mark.parametrize("activation", ["leaky_0.2", "elu_1", "silu"])
@pytest.mark.parametrize("dtype_case", ["amp_fp16", "amp_bf16", "no_affine"])
def test_activation_with_amp_parameters_and_no_affine(dtype_case, activation):
    dtype, param_dtype = DTYPE_CASES[dtype_case]
    code, param = ACTIVATIONS[activation]
    shape = (4, 6, 5, 5)
    weight, bias = activation_parameters(shape[1], param_dtype)
    history = random_history(2, shape[1], torch.float32)
    x = activation_input(shape, dtype, torch.channels_last, weight, bias, history, None, code)
    check_activation_against_reference(x, weight, bias, history, None, (code, param))


ACTIVATION_SHAPES = [
    ((4, 3, 1, 1), "1x1 spatial"),
    ((3, 1, 5, 9), "C=1"),
    ((8, 2048, 2, 2), "C=2048"),
    ((16, 2048), "(N, C) with C=2048"),
    ((1, 3, 13, 11), "N=1, odd spatial"),
    ((2, 4, 3, 5, 7), "3d odd"),
    ((3, 42, 9, 9), "C not a multiple of the pack"),
    ((2, 3, 96, 96), "large planes"),
]
SHAPE_ACTIVATIONS = ["leaky_0.01", "elu_0.7", "silu", "hardswish"]


def activation_shape_cases():
    cases = []
    for i, (shape, shape_name) in enumerate(ACTIVATION_SHAPES):
        for j, name in enumerate(SHAPE_ACTIVATIONS):
            light = j == i % len(SHAPE_ACTIVATIONS)  # emulated: one activation per shape, in turn
            cases.append(pytest.param(shape, name, marks=() if light else heavy_when_emulated,
                                      id=f"{shape_name}-{name}"))
    return cases


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape,activation", activation_shape_cases())
def test_activation_shapes(shape, activation, dtype, memory_format):
    memory_format = layout_of(shape, memory_format)
    code, param = ACTIVATIONS[activation]
    weight, bias = activation_parameters(shape[1], dtype)
    history = random_history(1, shape[1], torch.float32)
    x = activation_input(shape, dtype, memory_format, weight, bias, history, None, code, seed=sum(shape))
    check_activation_against_reference(x, weight, bias, history, None, (code, param))


def test_activation_on_strided_inputs_and_an_expanded_gradient():
    """A non-dense input, a dense permuted one and the expanded gradient of y.sum(), through an
    activation, from the input and from the output."""
    activation = ACTIVATIONS["leaky_0.2"]
    weight, bias = activation_parameters(8, torch.float32)
    history = random_history(1, 8, torch.float32)
    # Every other row of a NaN-filled tensor: a read of the rows between fails the comparison.
    strided = device_input(torch.full((3, 8, 10, 6), float("nan")))[:, :, ::2]
    strided.copy_(activation_input((3, 8, 5, 6), torch.float32, torch.contiguous_format, weight, bias,
                                   history, None, activation[0]))
    values = activation_input((3, 8, 6, 5), torch.float32, torch.contiguous_format, weight, bias,
                              history, None, activation[0])
    permuted = device_input(values.permute(0, 2, 1, 3).cpu()).permute(0, 2, 1, 3)  # dense, C in the middle
    for x in (strided, permuted):
        check_activation_against_reference(x, weight, bias, history, None, activation)
    x = activation_input((4, 8, 5, 5), torch.float32, torch.channels_last, weight, bias, history, None,
                         activation[0])
    grad_y = torch.ones((), device=DEVICE).expand(x.shape)
    check_activation_against_reference(x, weight, bias, history, None, activation, grad_y)


@pytest.mark.parametrize("activation", ["leaky_0.01", "elu_1"])
def test_backward_from_the_output_with_weights_near_zero(activation):
    """The lean backward divides by the weight: weights of magnitude below 1e-3 (zero and both signs)
    are taken as 1e-3 with their sign, as the reference takes them; larger ones as they are."""
    code, param = ACTIVATIONS[activation]
    channels = 6
    weight = torch.tensor([0.0, 1e-4, -1e-4, 1e-3, -2e-3, 0.7], device=DEVICE)
    bias = torch.linspace(-0.3, 0.4, channels, device=DEVICE)
    history = random_history(1, channels, torch.float32)
    # z is about the bias where the weight is small: the kinks lie in the channels of larger weight.
    x = activation_input((4, channels, 5, 5), torch.float32, torch.contiguous_format, weight, bias,
                         history, None, code)
    check_activation_against_reference(x, weight, bias, history, None, (code, param))


def test_empty_micro_batch_with_an_activation():
    x = torch.empty((0, 5, 3, 3), device=DEVICE)
    weight, bias = activation_parameters(5, torch.float32)
    count, mean, var = random_history(1, 5, torch.float32)
    history = (count + 1, mean, var)  # statistics in every channel
    activation = ACTIVATIONS["elu_0.7"]
    y, *stats = run_activated_forward(x, weight, bias, history, None, activation)
    assert y.shape == x.shape
    expected = reference.forward(cpu64(x), cpu64(weight), cpu64(bias), history[0].cpu(),
                                 cpu64(history[1]), cpu64(history[2]), EPS, None, *activation)
    for actual, want in zip(stats, expected[1:]):
        assert_close(actual, want, STAT_TOL[torch.float32], "statistics of an empty micro-batch")
    for from_output in (False, True):
        grad_x, grad_weight, grad_bias = run_activated_backward(x, y if from_output else x, weight, bias,
                                                                stats, True, activation, from_output)
        assert grad_x.shape == x.shape
        assert torch.equal(grad_weight.cpu(), torch.zeros(5)) and torch.equal(grad_bias.cpu(),
                                                                               torch.zeros(5))


TRAIN_FORWARD = torch.ops.cmbn_ext.cmbn_train_forward


@pytest.mark.parametrize("keep_output", [False, True], ids=["keep_input", "keep_output"])
@pytest.mark.parametrize("mode_name", ["cumulative3", "sliding3", "ema", "deferred"])
@pytest.mark.parametrize("activation,dtype", [("leaky_0.2", torch.float32), ("silu", torch.float16),
                                              ("elu_0.7", torch.bfloat16), ("mish", torch.float64),
                                              ("hardswish", torch.float32)],
                         ids=["leaky_0.2-fp32", "silu-fp16", "elu_0.7-bf16", "mish-fp64",
                              "hardswish-fp32"])
def test_train_forward_with_an_activation(activation, dtype, mode_name, keep_output):
    """cmbn_train_forward with an activation: cmbn_forward's bits with the same activation (and the
    history the mode normalizes with), the reference's values, and the state update of those
    statistics; keep_output changes nothing in the forward."""
    mode, window = ("deferred", 2) if mode_name == "deferred" else STATE_MODES[mode_name]
    code, param = ACTIVATIONS[activation]
    shape = (4, 6, 5, 5)
    state_dtype = reference.stats_dtype(dtype)
    cpu_state = make_state(mode, window if mode != "deferred" else 1, shape[1], state_dtype, True)
    kernel_state = to_device(cpu_state)
    expected_state = to_device(cpu_state)
    window = window if mode in ("cumulative", "deferred") else None
    momentum = 0.1
    history = ops.normalization_history(*expected_state[:3], mode)  # kernel_state is updated
    ema = 0.1 if mode == "ema" else None
    weight, bias = activation_parameters(shape[1], dtype)
    x = activation_input(shape, dtype, torch.channels_last, weight, bias, history, ema, code)
    poison_allocator(x.numel() * x.element_size(), shape[1])
    trained = TRAIN_FORWARD(x, weight, bias, *kernel_state, EPS, ema, False, mode, window, momentum,
                            False, code, param, keep_output)
    forward = run_activated_forward(x, weight, bias, history, ema, (code, param))
    for i, (got, want) in enumerate(zip(trained, forward)):
        assert_same_bits(got, want, f"train_forward output {i} against cmbn_forward")
    history64 = [cpu64(t) if t.is_floating_point() else t.cpu() for t in history]
    expected = reference.forward(cpu64(x), cpu64(weight), cpu64(bias), *history64, EPS, ema, code, param)
    assert_close(trained[0], expected[0], OUTPUT_TOL[dtype], "y")
    UPDATE_STATE(*expected_state, counts(reference.values_per_channel(x))[0], *forward[1:5], mode, window,
                 momentum, False)
    assert_same_state(kernel_state, [None if t is None else t.cpu() for t in expected_state], state_dtype,
                      "state after train_forward")


def test_activation_bad_arguments_name_the_argument():
    """An unknown activation code, and from_output with an activation whose output does not determine
    its input (ReLU, SiLU, Mish, Hardswish, LeakyReLU of slope <= 0, ELU of alpha <= 0): a ValueError,
    as the reference raises, from every family of kernels."""
    x = random_input((4, 6, 5, 5), torch.float32)
    weight, bias = activation_parameters(6, torch.float32)
    history = random_history(1, 6, torch.float32)
    for code in (-1, 7, 100):
        with pytest.raises(ValueError, match="activation"):
            FORWARD(x, weight, bias, *history, EPS, None, False, code, 0.0)
    out = FORWARD(x, weight, bias, *history, EPS, None, False)
    grad_y = random_input(x.shape, torch.float32, seed=3)
    for code in (-1, 7):
        with pytest.raises(ValueError, match="activation"):
            BACKWARD(grad_y, x, weight, *out[1:], EPS, False, bias, code, 0.0, False)
    for code, param in ((activations.RELU, 0.0), (activations.SILU, 0.0), (activations.MISH, 0.0),
                        (activations.HARDSWISH, 0.0), (activations.LEAKY_RELU, 0.0),
                        (activations.LEAKY_RELU, -0.1), (activations.ELU, 0.0)):
        with pytest.raises(ValueError, match="from_output"):
            BACKWARD(grad_y, out[0], weight, *out[1:], EPS, False, bias, code, param, True)
    state = to_device(make_state("cumulative", 2, 6, torch.float32, True))
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match="activation"):
        TRAIN_FORWARD(x, weight, bias, *state, EPS, None, False, "cumulative", 2, 0.1, False, 9, 0.0)
    assert all(torch.equal(got, kept) for got, kept in zip(state, before)), "a refused call changed state"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["leaky_0.2", "silu"])
def test_opcheck_with_an_activation(activation, dtype, memory_format):
    code, param = ACTIVATIONS[activation]
    weight, bias = activation_parameters(6, torch.float32)
    history = random_history(1, 6, torch.float32)
    x = activation_input((4, 6, 5, 5), dtype, memory_format, weight, bias, history, None, code)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    torch.library.opcheck(FORWARD.default, (x, weight, bias, *history, EPS, None, False, code, param))
    out = FORWARD(x.detach(), weight.detach(), bias.detach(), *history, EPS, None, True, code, param)
    grad_y = random_input(x.shape, dtype, memory_format, seed=9)
    for from_output in (False, True) if activations.invertible(code, param) else (False,):
        saved = out[0] if from_output else x.detach()
        for exact in (False, True):
            torch.library.opcheck(BACKWARD.default, (grad_y, saved, weight.detach(), *out[1:], EPS, exact,
                                                     bias.detach(), code, param, from_output))
    state = to_device(make_state("cumulative", 2, 6, torch.float32, True))
    for keep_output in (False, True) if activations.invertible(code, param) else (False,):
        torch.library.opcheck(TRAIN_FORWARD.default, (x, weight, bias, *state, EPS, None, False, "cumulative",
                                                      2, 0.1, False, code, param, keep_output))


def activated_runs(x, weight, bias, history, grad_y, activation):
    """Every output of the activated forward and backwards, cloned."""
    out = run_activated_forward(x, weight, bias, history, None, activation)
    grads = []
    for from_output in (False, True) if activations.invertible(*activation) else (False,):
        for exact in (False, True):
            grads += run_activated_backward(grad_y, out[0] if from_output else x, weight, bias, out[1:],
                                            exact, activation, from_output)
    return [t.clone() for t in (*out, *grads)]


@pytest.mark.parametrize("shape,memory_format", [
    ((2, 3, 64, 64), torch.contiguous_format),
    ((8, 32, 8, 8), torch.channels_last),
], ids=["planes", "rows"])
@pytest.mark.parametrize("activation", ["leaky_0.2", "silu"])
def test_activation_bitwise_deterministic(activation, shape, memory_format):
    """Reruns give the same bits; on the CPU kernels, one thread and two do too."""
    code, param = ACTIVATIONS[activation]
    weight, bias = activation_parameters(shape[1], torch.float32)
    history = random_history(2, shape[1], torch.float32)
    x = activation_input(shape, torch.float32, memory_format, weight, bias, history, None, code)
    grad_y = random_input(shape, torch.float32, memory_format, seed=3, offset=0.0)
    runs = [activated_runs(x, weight, bias, history, grad_y, (code, param)) for _ in range(2)]
    if BACKEND == "cpu":
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(activated_runs(x, weight, bias, history, grad_y, (code, param)))
        finally:
            torch.set_num_threads(threads)
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert_same_bits(b, a, f"output {i} of a rerun")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_identity_activation_gives_the_bits_of_no_activation(memory_format, dtype):
    """Activation code 0 is the plain op: the same bits as a call without the new arguments, and the
    backward from the output recovers x to rounding."""
    weight, bias = activation_parameters(6, dtype)
    history = random_history(2, 6, torch.float32)
    x = random_input((4, 6, 7, 5), dtype, memory_format)
    grad_y = random_input(x.shape, dtype, memory_format, seed=4, offset=0.0)
    plain = FORWARD(x, weight, bias, *history, EPS, None, False)
    coded = FORWARD(x, weight, bias, *history, EPS, None, False, activations.IDENTITY, 0.0)
    for a, b in zip(plain, coded):
        assert_same_bits(b, a, "forward with activation=0")
    for exact in (False, True):
        plain_grads = BACKWARD(grad_y, x, weight, *plain[1:], EPS, exact)
        coded_grads = BACKWARD(grad_y, x, weight, *plain[1:], EPS, exact, bias, activations.IDENTITY, 0.0,
                               False)
        for a, b in zip(plain_grads, coded_grads):
            assert_same_bits(b, a, f"backward with activation=0 (exact={exact})")
