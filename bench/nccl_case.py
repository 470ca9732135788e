"""GPU check: CmBN over a one-rank NCCL process group equals the layer without a group.

Runs the distributed path (phase ops with an all-gather and an all-reduce between them) on CUDA and
compares outputs, gradients and state with the fused single-process path, in every mode. Exits
non-zero on a mismatch. Used by bench/gpu_check.sh.
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cmbn_ext  # noqa: E402


def run(layer, batches):
    outputs = []
    for x, dy in batches:
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        outputs += [y.detach(), x.grad]
    return outputs + [p.grad for p in layer.parameters()] + list(layer.state_dict().values())


def main():
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl", init_method=f"file://{store}/store", rank=0, world_size=1)
        failures = 0
        for mode, grad in (("cumulative", "renorm"), ("sliding", "exact"), ("ema", "renorm")):
            for dtype, memory_format in ((torch.float32, torch.contiguous_format),
                                         (torch.float16, torch.channels_last)):
                torch.manual_seed(0)
                batches = [(torch.randn(4, 16, 9, 9, device="cuda").to(dtype).contiguous(
                    memory_format=memory_format), torch.randn(4, 16, 9, 9, device="cuda").to(dtype))
                    for _ in range(5)]
                results = []
                for group in (None, dist.group.WORLD):
                    layer = cmbn_ext.CrossMiniBatchNorm2d(16, mode=mode, window=3, grad=grad,
                                                          process_group=group).cuda()
                    results.append(run(layer, batches))
                tol = 1e-5 if dtype == torch.float32 else 2e-3
                for alone, grouped in zip(*results):
                    if not torch.allclose(alone.double(), grouped.double(), rtol=tol, atol=tol):
                        failures += 1
                        print(f"MISMATCH {mode} {grad} {dtype}: max diff "
                              f"{(alone.double() - grouped.double()).abs().max().item():.3g}")
                print(f"{mode:10s} {grad:6s} {str(dtype):14s} checked")
        dist.destroy_process_group()
    print("nccl one-rank check:", "FAILED" if failures else "passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
