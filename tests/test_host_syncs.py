"""A training micro-batch reads no tensor value on the host, alone and across a process group.

Every ``.item()``, ``int(t)``, ``bool(t)`` or ``.tolist()`` of a tensor runs ``aten._local_scalar_dense``,
which on a GPU waits for the device to finish all queued work: with micro-batches of a few samples
that wait, per layer, would decide the step time. A ``TorchDispatchMode`` counts those reads during the
forward and backward of each micro-batch of a window. The distributed case runs two gloo processes:
there the group's count must stay a tensor through the state update, and the ranks' window positions
are compared on the device and read only at ``end_window()``.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import cmbn_ext
import emulation

MODES = ("cumulative", "sliding", "ema", "deferred")
WINDOW = 3
WINDOWS = 2
LAYERS = 2
# num_batches_tracked after WINDOWS windows: one commit per window, or one update per micro-batch
TRACKED = {"cumulative": WINDOWS, "deferred": WINDOWS, "sliding": WINDOWS * WINDOW, "ema": WINDOWS * WINDOW}


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (``aten.item`` decomposes into
    ``_local_scalar_dense`` before it gets here; it is listed in case it does not)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(mode, device, process_group=None):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(4, mode=mode, window=WINDOW, momentum=0.3,
                                      process_group=process_group),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1),
        cmbn_ext.CrossMiniBatchNorm2d(5, mode=mode, window=WINDOW, momentum=0.3,
                                      process_group=process_group),
    ).to(device).train()


def _reads_per_micro_batch(model, device, seed):
    """Host reads during the forward and backward of each micro-batch of WINDOWS windows (ended by
    end_window() after each, as an optimizer step hook would), and during each end_window()."""
    generator = torch.Generator().manual_seed(seed)
    per_micro_batch, at_end_window = [], []
    for _ in range(WINDOWS):
        for _ in range(WINDOW):
            x = torch.randn(2, 3, 6, 6, generator=generator).to(device)
            with HostReads() as reads:
                model(x).square().mean().backward()
            per_micro_batch.append(reads.count)
        with HostReads() as reads:
            cmbn_ext.end_window(model)
        at_end_window.append(reads.count)
    return per_micro_batch, at_end_window


def _tracked(model):
    return [int(layer.num_batches_tracked) for layer in model
            if isinstance(layer, cmbn_ext.CrossMiniBatchNorm2d)]


def test_the_counter_sees_host_reads():
    """The counter this module relies on: each way of reading a tensor's value on the host is counted
    (``tolist()`` reads memory directly, unseen here: on a GPU the sync debug mode catches its copy)."""
    t = torch.tensor([3.0])
    for read in (lambda: t.item(), lambda: int(t), lambda: float(t), lambda: bool(t > 0)):
        with HostReads() as reads:
            read()
        assert reads.count >= 1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_no_host_reads_in_one_process(mode, device):
    model = _model(mode, device)
    if device == "cuda":  # besides reads, no blocking copy nor synchronization either
        _reads_per_micro_batch(_model(mode, device), device, seed=1)  # library initialization first
        torch.cuda.set_sync_debug_mode("error")
    try:
        per_micro_batch, _ = _reads_per_micro_batch(model, device, seed=1)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert per_micro_batch == [0] * (WINDOWS * WINDOW)
    assert _tracked(model) == [TRACKED[mode]] * LAYERS  # the state was updated all along


def _worker(rank, world, store_dir):
    emulation.load_if_requested()  # a spawned process: the parent's kernels are not loaded here
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    results = {}
    for mode in MODES:
        model = _model(mode, "cpu", dist.group.WORLD)
        per_micro_batch, at_end_window = _reads_per_micro_batch(model, "cpu", seed=10 + rank)
        results[mode] = {"per_micro_batch": per_micro_batch, "at_end_window": at_end_window,
                         "tracked": _tracked(model)}
    torch.save(results, os.path.join(store_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_no_host_reads_across_a_gloo_group(tmp_path):
    """Two ranks: the group's count and the window positions stay on the device at every micro-batch;
    end_window() reads at most once per layer (the ranks' agreement on the window position)."""
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for mode in MODES:
            got = results[mode]
            assert got["per_micro_batch"] == [0] * (WINDOWS * WINDOW), (rank, mode)
            assert all(reads <= LAYERS for reads in got["at_end_window"]), (rank, mode)
            assert got["tracked"] == [TRACKED[mode]] * LAYERS, (rank, mode)
