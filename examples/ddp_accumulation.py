"""Data-parallel training with gradient accumulation, CmBN pooling the micro-batches of every rank.

Each optimizer step sees ``--accumulate`` micro-batches of ``--micro-batch`` samples on each of the
ranks; the CmBN layers normalize each micro-batch with the statistics of everything the step has seen
so far on all ranks.

    torchrun --nproc_per_node 2 examples/ddp_accumulation.py                 # CPU processes, gloo
    torchrun --nproc_per_node 2 examples/ddp_accumulation.py --device cuda   # one GPU each, NCCL
"""
import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cmbn_ext


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )


def synthetic_batch(size, generator, device):
    """Images whose class is the quadrant and colour channel of a bright patch: learnable quickly."""
    labels = torch.randint(0, 10, (size,), generator=generator)
    images = torch.randn(size, 3, 16, 16, generator=generator) * 0.5
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label % 4, 2)
        images[i, label % 3, row * 8:row * 8 + 8, col * 8:col * 8 + 8] += 1.5 + label // 4
    return images.to(device), labels.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch and rank")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = cmbn_ext.convert_batchnorm(make_model(), window=args.accumulate,
                                       process_group=dist.group.WORLD).to(device)
    # DDP broadcasts rank 0's buffers before each forward; the CmBN state is the same on every rank
    # (it pools the same group statistics), so that changes nothing.
    model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data

    for step in range(args.steps):
        total = 0.0
        for micro in range(args.accumulate):
            images, labels = synthetic_batch(args.micro_batch, generator, device)
            last = micro == args.accumulate - 1
            # gradients are all-reduced by DDP once, on the last micro-batch of the step
            with contextlib.nullcontext() if last else model.no_sync():
                loss = torch.nn.functional.cross_entropy(model(images), labels) / args.accumulate
                loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {total:.3f}  ({world} ranks x {args.accumulate} micro-batches "
                  f"x {args.micro_batch} samples per step)", flush=True)

    model.eval()
    images, labels = synthetic_batch(256, torch.Generator().manual_seed(7), device)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    if rank == 0:
        print(f"held-out accuracy {accuracy:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
