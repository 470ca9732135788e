"""A small workload for compute-sanitizer (memcheck, racecheck): forward and both backwards of the CUDA
kernels on a few shapes that reach every kernel variant (planes and rows layouts, 16-byte packs and
single values, one fused launch and the split partial + apply launches), in several dtypes.

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
from cmbn_ext import reference  # noqa: E402

CASES = [  # (shape, memory format, dtype): what it reaches
    ((2, 3, 8, 8), torch.contiguous_format, torch.float32),    # planes, packs, fused
    ((2, 3, 7, 7), torch.contiguous_format, torch.float16),    # planes, single values, fused
    ((4, 2, 64, 64), torch.contiguous_format, torch.float32),  # planes, split over blocks
    ((2, 16, 4, 4), torch.channels_last, torch.float16),       # rows, packs, fused
    ((2048, 3), torch.contiguous_format, torch.float32),       # rows, single values, split
    ((4096, 16), torch.contiguous_format, torch.bfloat16),     # rows, packs, split
    ((2, 5, 3, 3, 3), torch.channels_last_3d, torch.float64),  # rows, fp64
]


def run_case(shape, memory_format, dtype):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = (torch.randn(shape, generator=gen) + 0.5).to(dtype).cuda().contiguous(memory_format=memory_format)
    grad_y = torch.randn(shape, generator=gen).to(dtype).cuda()
    weight = (torch.rand(channels, generator=gen) + 0.5).cuda()
    bias = torch.randn(channels, generator=gen).cuda()
    count = torch.randint(0, 9, (2, channels), generator=gen).cuda()
    history = (count, torch.randn(2, channels).cuda(), torch.rand(2, channels).cuda() + 0.1)
    worst = 0.0
    for ema in (None, 0.1):
        out = torch.ops.cmbn_ext.cmbn_forward(x, weight, bias, *history, 1e-5, ema, False)
        want = reference.forward(x.cpu().double(), weight.cpu().double(), bias.cpu().double(),
                                 history[0].cpu(), history[1].cpu().double(), history[2].cpu().double(),
                                 1e-5, ema)
        worst = max(worst, (out[0].cpu().double() - want[0]).abs().max().item())
        for exact in (False, True):
            grads = torch.ops.cmbn_ext.cmbn_backward(grad_y, x, weight, *out[1:], 1e-5, exact)
            want_grads = reference.backward(grad_y.cpu().double(), x.cpu().double(),
                                            weight.cpu().double(), *(t.cpu().double() for t in out[1:]),
                                            1e-5, exact)
            worst = max(worst, (grads[0].cpu().double() - want_grads[0]).abs().max().item())
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
