"""process_group: every rank equals one process that sees the micro-batches of all ranks concatenated.

Spawns 2 and 3 gloo processes on this machine. Each rank runs the same scenario on its share of every
micro-batch and saves what it saw; the test compares with one process fed the concatenations.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cmbn_ext
import emulation

CASES = [("cumulative", "renorm"), ("cumulative", "exact"), ("sliding", "renorm"), ("ema", "exact")]
STEPS = 5
C = 3


def _sizes(world):
    """Micro-batch rows per rank and step: unequal, with empty ranks."""
    pattern = [[2, 1, 3], [1, 0, 2], [3, 2, 0], [2, 2, 1], [0, 3, 1]]
    return [row[:world] for row in pattern]


def _data(step, total):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(total, C, 2, 3, generator=generator, dtype=torch.float64) * (1 + step) + step
    dy = torch.randn(total, C, 2, 3, generator=generator, dtype=torch.float64)
    return x, dy


def _layer(mode, grad, group=None):
    layer = cmbn_ext.CrossMiniBatchNorm2d(C, mode=mode, window=3, grad=grad, process_group=group,
                                          momentum=0.2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    return layer


def _run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    result = {"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad.clone(),
              "dbias": layer.bias.grad.clone()}
    layer.weight.grad = layer.bias.grad = None
    return result


def _worker(rank, world, store_dir):
    emulation.load_if_requested()  # a spawned process: the parent's kernels are not loaded here
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    results = {}
    for mode, grad in CASES:
        # "world" names the same group, looked up at the forward
        layer = _layer(mode, grad, "world" if mode == "ema" else dist.group.WORLD)
        steps = []
        for step, sizes in enumerate(_sizes(world)):
            x, dy = _data(step, sum(sizes))
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            steps.append(_run(layer, x[rows], dy[rows]))
        results[(mode, grad)] = {"steps": steps, "state": layer.state_dict()}

    errors = {}
    layer = _layer("cumulative", "renorm", dist.group.WORLD)
    if rank == 1:
        layer.window_step.fill_(1)  # as if this rank had missed a reset_window()
    # The forwards compare the ranks' window positions on the device; end_window() reads the outcome
    # and refuses to commit.
    layer(torch.randn(2, C, 2, 2, dtype=torch.float64))
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    for attempt in ("window", "window_again"):  # it stays refused until the windows are reset
        try:
            layer.end_window()
        except RuntimeError as error:
            errors[attempt] = str(error)
    errors["uncommitted"] = all(torch.equal(value, before[name])
                                for name, value in layer.state_dict().items())
    layer.reset_window()  # on every rank: the ranks start over together
    layer(torch.randn(2, C, 2, 2, dtype=torch.float64))
    layer.end_window()
    errors["committed_after_reset"] = int(layer.num_batches_tracked)
    try:  # a gloo group cannot carry the tensors of another device
        layer.to("meta")(torch.empty(2, C, 2, 2, dtype=torch.float64, device="meta"))
    except (ValueError, RuntimeError) as error:
        errors["backend"] = str(error)
    results["errors"] = errors
    torch.save(results, os.path.join(store_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process_on_the_concatenation(world, tmp_path):
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for mode, grad in CASES:
        single = _layer(mode, grad)
        for step, sizes in enumerate(_sizes(world)):
            x, dy = _data(step, sum(sizes))
            expected = _run(single, x, dy)
            start = 0
            for rank, size in enumerate(sizes):
                got = ranks[rank][(mode, grad)]["steps"][step]
                rows = slice(start, start + size)
                torch.testing.assert_close(got["y"], expected["y"][rows])
                torch.testing.assert_close(got["dx"], expected["dx"][rows])
                start += size
            for name in ("dweight", "dbias"):  # each rank's own share; they add up
                total = sum(ranks[r][(mode, grad)]["steps"][step][name] for r in range(world))
                torch.testing.assert_close(total, expected[name])
        for rank in range(world):
            for name, value in single.state_dict().items():
                torch.testing.assert_close(ranks[rank][(mode, grad)]["state"][name], value,
                                           msg=f"{mode} {grad} rank {rank}: {name}")
    for rank in range(world):
        errors = ranks[rank]["errors"]
        assert "disagree on the window position" in errors["window"]
        assert "rank(s) [1] had" in errors["window"] and "by rank: [0, 1" in errors["window"]
        assert "disagree on the window position" in errors["window_again"]
        assert errors["uncommitted"] and errors["committed_after_reset"] == 1
        assert "gloo backend" in errors["backend"]


def test_ddp_example_runs_with_gloo():
    """The README's data-parallel example, two CPU processes, a few steps."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_accumulation.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step   1  loss" in run.stdout and "held-out accuracy" in run.stdout
    assert "OpenWindowWarning" not in run.stderr


def _ddp_step_warnings_worker(rank, world, store_dir):
    """DDP over CmBN layers, pooled across the ranks and alone: the README's loop (windows ended at each
    step) with OpenWindowWarning as an error, then the mistake (3 micro-batches a step, window=4, no
    ending), whose warnings are recorded."""
    import warnings

    emulation.load_if_requested()
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    said = {}
    for group in (None, "world"):
        torch.manual_seed(0)
        model = cmbn_ext.convert_batchnorm(torch.nn.Sequential(
            torch.nn.Conv2d(3, C, 1), torch.nn.BatchNorm2d(C), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(C * 4, 2)), window=4, process_group=group)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        handle = cmbn_ext.end_windows_on_step(optimizer, model)
        cmbn_ext.modules._warned.clear()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)
            for per_step in (4, 3, 4, 2):
                for _ in range(per_step):
                    ddp(torch.randn(2, 3, 2, 2)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            handle.remove()
            warnings.simplefilter("always")
            for _ in range(3):
                for _ in range(3):
                    ddp(torch.randn(2, 3, 2, 2)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        said[group] = [str(w.message) for w in record if issubclass(w.category, cmbn_ext.OpenWindowWarning)]
    torch.save(said, os.path.join(store_dir, f"said{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_windows_ended_at_each_step_are_not_warned(tmp_path):
    mp.start_processes(_ddp_step_warnings_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        said = torch.load(tmp_path / f"said{rank}.pt")
        for group in (None, "world"):  # the correct loop raised nothing; the mistake is said once
            assert len(said[group]) == 1 and "end_windows_on_step" in said[group][0], (rank, group)


def test_world_before_init_process_group_is_a_clear_error():
    """process_group="world" may be given before init_process_group, but training without a process
    group then says so instead of silently running alone; the state is left as it was."""
    assert not dist.is_initialized()
    layer = _layer("cumulative", "renorm", "world")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="init_process_group"):
        layer(torch.randn(4, C, 2, 3, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer.eval()(torch.randn(4, C, 2, 3, dtype=torch.float64))  # eval pools nothing: no group needed
    with pytest.raises(ValueError, match="'world'"):
        _layer("cumulative", "renorm", "everyone")
