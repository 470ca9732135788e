"""What the CUDA kernels launch for an input: ``kernel_plan(x)`` for ``cmbn_forward``,
``kernel_plan(x, backward=True)`` for ``cmbn_backward``.

The fused ops take one of two paths, as ``CMBN_KERNEL_PATH`` (read at every call) asks: ``two_pass``
never takes the single read, ``single_read`` takes it wherever it fits, and ``auto`` (the default)
does the same today:

- ``single_read``: each thread holds its share of x (and grad_y) in registers from the reduction to
  the output, so the op reads its inputs once; one launch, cooperative (a grid barrier) when a channel
  group spans several blocks. Taken where the shares fit, which ``auto`` prefers.
- ``two_pass``: the reduction, then a second read of the inputs for the output; one launch when each
  channel group has one block, else a partial launch and an apply launch.

Both reduce the same values in the same blocks and threads, so the statistics are the same bits
whichever path ran. Tests assert the path with this plan; benchmarks print it.
"""
import torch

from . import ops  # noqa: F401  (defines the op)

_PATHS = ("two_pass", "single_read")
_LAYOUTS = ("planes", "rows", "planes_masked")  # the order of Layout in csrc/layout.h


def kernel_plan(x, backward=False):
    """The launch plan of the fused forward (or backward) for ``x``, a CUDA tensor of shape (N, C, *).

    Returns a dict: ``path`` ("two_pass" or "single_read"), ``grid`` (channel groups, blocks per
    group), ``block_threads``, ``launches``, ``bytes_held`` (input bytes held on chip; 0 for two_pass),
    ``pack`` (values per 16-byte pack, or 1), ``layout`` ("planes": contiguous (N, C, *); "rows":
    channels innermost; "planes_masked": planes whose size is not a multiple of the pack, walked
    in aligned packs masked at each plane's ends), ``co_resident_blocks`` (blocks the GPU holds at once, the bound of a
    cooperative grid) and ``cooperative``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("kernel_plan: x must be a tensor of shape (N, C, *)")
    try:
        values = torch.ops.cmbn_ext.cmbn_kernel_plan(x, backward)
    except NotImplementedError as error:
        raise RuntimeError(f"kernel_plan needs the compiled CUDA kernels (cmbn_ext._C) and a tensor on "
                           f"their device, got one on {x.device}") from error
    path, groups, splits, threads, launches, held, pack, layout, resident, cooperative = values
    return {
        "path": _PATHS[path],
        "grid": (groups, splits),
        "block_threads": threads,
        "launches": launches,
        "bytes_held": held,
        "pack": pack,
        "layout": _LAYOUTS[layout],
        "co_resident_blocks": resident,
        "cooperative": bool(cooperative),
    }
