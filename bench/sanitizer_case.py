"""A small workload for compute-sanitizer (memcheck, racecheck): forward and both backwards of the CUDA
kernels on a few shapes that reach every kernel variant (planes and rows layouts, 16-byte packs and
single values, one fused launch and the split partial + apply launches), in several dtypes; the phase
ops of the distributed path (statistics only, given statistics, an empty micro-batch) on the same
shapes; and the state update in every mode (one block looping over the channels, non-finite channels).

Run it as `compute-sanitizer --tool memcheck python3 bench/sanitizer_case.py`, preferably with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an out-of-bounds
access is not hidden inside a cached block. It also checks the results loosely against the reference,
so it doubles as a smoke test where pytest is missing.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import cmbn_ext  # noqa: E402
from cmbn_ext import reference, window_state  # noqa: E402

CASES = [  # (shape, memory format, dtype): what it reaches
    ((2, 3, 8, 8), torch.contiguous_format, torch.float32),    # planes, packs, fused
    ((2, 3, 7, 7), torch.contiguous_format, torch.float16),    # planes, single values, fused
    ((4, 2, 64, 64), torch.contiguous_format, torch.float32),  # planes, split over blocks
    ((2, 16, 4, 4), torch.channels_last, torch.float16),       # rows, packs, fused
    ((2048, 3), torch.contiguous_format, torch.float32),       # rows, single values, split
    ((4096, 16), torch.contiguous_format, torch.bfloat16),     # rows, packs, split
    ((2, 5, 3, 3, 3), torch.channels_last_3d, torch.float64),  # rows, fp64
]


def largest_difference(actual, expected):
    """max |actual - expected|, infinite when either holds a NaN where the other does not (a NaN
    would otherwise slip through max())."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    if actual.numel() == 0:
        return 0.0
    difference = (actual - expected).abs()
    both_nan = actual.isnan() & expected.isnan()
    difference = torch.where(both_nan, 0.0, difference.nan_to_num(nan=float("inf")))
    return difference.max().item()


def random_inputs(shape, memory_format, dtype, seed):
    """x, grad_y, weight, bias on the GPU, and the generator for whatever else the case draws."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape, generator=gen) + 0.5).to(dtype).cuda().contiguous(memory_format=memory_format)
    grad_y = torch.randn(shape, generator=gen).to(dtype).cuda()
    weight = (torch.rand(channels, generator=gen) + 0.5).cuda()
    bias = torch.randn(channels, generator=gen).cuda()
    return x, grad_y, weight, bias, gen


def run_case(shape, memory_format, dtype):
    x, grad_y, weight, bias, gen = random_inputs(shape, memory_format, dtype, seed=0)
    channels = shape[1]
    count = torch.randint(0, 9, (2, channels), generator=gen).cuda()
    history = (count, torch.randn(2, channels).cuda(), torch.rand(2, channels).cuda() + 0.1)
    worst = 0.0
    for ema in (None, 0.1):
        out = torch.ops.cmbn_ext.cmbn_forward(x, weight, bias, *history, 1e-5, ema, False)
        want = reference.forward(x.cpu().double(), weight.cpu().double(), bias.cpu().double(),
                                 history[0].cpu(), history[1].cpu().double(), history[2].cpu().double(),
                                 1e-5, ema)
        worst = max(worst, largest_difference(out[0], want[0]))
        for exact in (False, True):
            grads = torch.ops.cmbn_ext.cmbn_backward(grad_y, x, weight, *out[1:], 1e-5, exact)
            want_grads = reference.backward(grad_y.cpu().double(), x.cpu().double(),
                                            weight.cpu().double(), *(t.cpu().double() for t in out[1:]),
                                            1e-5, exact)
            worst = max(worst, largest_difference(grads[0], want_grads[0]))
    torch.cuda.synchronize()
    return worst


def run_phase_case(shape, memory_format, dtype):
    """batch_stats -> pooled_forward and backward_sums -> backward_dx with a group count of 2m + 1 and
    the group's statistics, against the reference; then the same on an empty micro-batch."""
    ops = torch.ops.cmbn_ext
    x, grad_y, weight, bias, gen = random_inputs(shape, memory_format, dtype, seed=1)
    channels = shape[1]
    history = (torch.randint(0, 9, (2, channels), generator=gen).cuda(), torch.randn(2, channels).cuda(),
               torch.rand(2, channels).cuda() + 0.1)
    cpu = [t.cpu().double() for t in (x, grad_y, weight, bias)]
    history64 = (history[0].cpu(), history[1].cpu().double(), history[2].cpu().double())
    count = torch.tensor(2 * reference.values_per_channel(x) + 1, device="cuda")
    worst = 0.0
    batch_mean, batch_var = ops.cmbn_batch_stats(x)
    want = reference.batch_stats(cpu[0])
    worst = max(worst, largest_difference(batch_mean, want[0]), largest_difference(batch_var, want[1]))
    group_mean, group_var = batch_mean + 0.1, batch_var * 1.2
    y, mean, var, b = ops.cmbn_pooled_forward(x, weight, bias, count, group_mean, group_var, *history, 1e-5,
                                              None)
    want = reference.pooled_forward(cpu[0], cpu[2], cpu[3], count.cpu(), group_mean.cpu().double(),
                                    group_var.cpu().double(), *history64, 1e-5, None)
    worst = max(worst, *(largest_difference(a, e) for a, e in zip((y, mean, var, b), want)))
    sum_dy, sum_dy_xc = ops.cmbn_backward_sums(grad_y, x, group_mean)
    stats = [t * 2 for t in (sum_dy, sum_dy_xc)]
    for exact in (False, True):
        grad_x = ops.cmbn_backward_dx(grad_y, x, weight, mean, var, group_mean, group_var, b, *stats, count,
                                      1e-5, exact)
        want = reference.backward_dx(cpu[1], cpu[0], cpu[2], *(t.cpu().double() for t in (
            mean, var, group_mean, group_var, b, *stats)), count.cpu(), 1e-5, exact)
        worst = max(worst, largest_difference(grad_x, want))
    worst = max(worst, largest_difference(sum_dy, reference.backward_sums(cpu[1], cpu[0],
                                                                           group_mean.cpu().double())[0]))
    empty = x[:0]
    empty_stats = ops.cmbn_batch_stats(empty)
    worst = max(worst, largest_difference(empty_stats[1], torch.zeros(channels)))
    ops.cmbn_pooled_forward(empty, weight, bias, count, group_mean, group_var, *history, 1e-5, 0.1)
    ops.cmbn_backward_sums(empty, empty, empty_stats[0])
    ops.cmbn_backward_dx(empty, empty, weight, mean, var, group_mean, group_var, b, *stats, count, 1e-5, True)
    torch.cuda.synchronize()
    return worst


STATE_CASES = [  # (mode, window, channels, buffer dtype)
    ("cumulative", 2, 3, torch.float32),
    ("cumulative", None, 600, torch.float16),  # more channels than threads: the block loops
    ("sliding", 3, 600, torch.bfloat16),
    ("sliding", 1, 5, torch.float32),  # no ring slots
    ("ema", None, 7, torch.float64),
]


def run_state_case(mode, window, channels, dtype):
    """A few state updates (non-finite channels on every other one) against window_state on the CPU;
    returns the largest difference of any buffer."""
    gen = torch.Generator().manual_seed(2)
    slots = window - 1 if mode == "sliding" else 1
    cpu_state = [torch.randint(0, 9, (slots, channels), generator=gen),
                 torch.randn(slots, channels, generator=gen).to(dtype),
                 torch.rand(slots, channels, generator=gen).to(dtype), torch.tensor(0),
                 torch.randn(channels, generator=gen).to(dtype),
                 (torch.rand(channels, generator=gen) + 0.5).to(dtype), torch.tensor(0)]
    cuda_state = [t.cuda() for t in cpu_state]
    stats_dtype = reference.stats_dtype(dtype)
    window = window if mode == "cumulative" else None
    worst = 0.0
    for step in range(4):
        stats = [torch.randn(channels, generator=gen).to(stats_dtype) for _ in range(4)]
        stats[1], stats[3] = stats[1].abs(), stats[3].abs()
        if step % 2:
            stats[0][0] = float("nan")
        torch.ops.cmbn_ext.cmbn_update_state(*cuda_state, torch.tensor(6, device="cuda"),
                                             *(t.cuda() for t in stats), mode, window,
                                             None if mode != "ema" else 0.1)
        window_state.update_state(*cpu_state, torch.tensor(6), *stats, mode, window,
                                  None if mode != "ema" else 0.1)
        worst = max(worst, *(largest_difference(got, want) for got, want in zip(cuda_state, cpu_state)))
    torch.cuda.synchronize()
    return worst


def main():
    if not torch.cuda.is_available() or not cmbn_ext.has_cuda_kernels():
        print("sanitizer_case: needs a GPU and the compiled kernels", file=sys.stderr)
        return 2
    failed = False
    for shape, memory_format, dtype in CASES:
        worst = run_case(shape, memory_format, dtype)
        ok = worst < 0.05  # loose: bf16 outputs round at ~1e-2; this is a smoke check
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(shape):>18} {str(memory_format):>28} {str(dtype):>15} "
              f"max |error| vs reference {worst:.2e}")
        worst = run_phase_case(shape, memory_format, dtype)
        ok = worst < 0.05
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(shape):>18} {'phase ops':>28} {str(dtype):>15} "
              f"max |error| vs reference {worst:.2e}")
    for mode, window, channels, dtype in STATE_CASES:
        worst = run_state_case(mode, window, channels, dtype)
        ok = worst < 0.02  # bf16 buffers round at ~1e-2 of values near 1
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} state {mode:>10} window={str(window):>4} C={channels:<4} "
              f"{str(dtype):>15} max |error| vs window_state {worst:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
