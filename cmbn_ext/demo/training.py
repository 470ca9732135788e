"""The demo's training protocol: the methods compared, one training run, the learning-rate sweep run in
worker processes, and the time each method takes per optimizer step.

Every run is deterministic on the CPU: its seed sets the initial weights and the data order, and it runs
on one thread with ``torch.use_deterministic_algorithms``, so it gives the same bits in any worker, in any
order.
"""
import dataclasses
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch
import torch.nn as nn

import cmbn_ext


@dataclasses.dataclass(frozen=True)
class Method:
    """One normalization choice. ``full_batch`` methods train the same way at every micro-batch size
    (BatchNorm on the whole optimizer batch; GroupNorm, which never mixes samples), so they run once, at
    micro-batch = optimizer batch, and that result stands for every column."""
    name: str
    norm: str = "batchnorm"      # or "groupnorm"
    cmbn_mode: str = None        # None: the torch layer itself
    grad: str = "renorm"
    full_batch: bool = False
    ablation: bool = False       # reported apart from the headline methods


METHODS = (
    Method("BatchNorm, full batch", full_batch=True),
    Method("BatchNorm, micro-batch"),
    Method("CmBN cumulative", cmbn_mode="cumulative"),
    Method("CmBN sliding", cmbn_mode="sliding"),
    Method("CmBN EMA", cmbn_mode="ema"),
    # Each micro-batch normalized alone, as BatchNorm does; the window pooled for the running stats only.
    Method("CmBN deferred", cmbn_mode="deferred"),
    Method("GroupNorm", norm="groupnorm", full_batch=True),
    Method("CmBN cumulative, grad=exact", cmbn_mode="cumulative", grad="exact", ablation=True),
)


def ema_weight(window):
    """The EMA weight whose average has the mean age of a ``window``-long sliding window."""
    return 2.0 / (window + 1)


def norm_factory(method, bn_momentum):
    """``norm_layer(channels, dims=2)`` for the networks: BatchNorm1d/2d, or GroupNorm: 4 channels a group
    on feature maps, one group (LayerNorm) on ``(N, C)`` features, where groups of 4 values would leave
    little of each sample's features."""
    def norm_layer(channels, dims=2):
        if method.norm == "groupnorm":
            return nn.GroupNorm(1 if dims == 1 else channels // 4, channels)
        batch_norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return batch_norm(channels, momentum=bn_momentum)
    return norm_layer


def build_model(task, model_name, method, window):
    """The network with torch's layers, then CmBN by ``convert_batchnorm``, as a user would do it.

    In EMA mode ``momentum`` is the weight of the current micro-batch, and ``convert_batchnorm`` keeps
    each BatchNorm's momentum, so it is set when the BatchNorm is built.
    """
    bn_momentum = ema_weight(window) if method.cmbn_mode == "ema" else 0.1
    model = task.build_network(model_name, norm_factory(method, bn_momentum))
    if method.cmbn_mode is not None:
        model = cmbn_ext.convert_batchnorm(model, mode=method.cmbn_mode, window=window, grad=method.grad)
    return model


def conv_weight_norm(model):
    """The mean Frobenius norm of the conv weights (``grad="exact"`` lets it grow; SPEC section 4)."""
    norms = [m.weight.norm().item() for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(norms) / len(norms)


def optimizer_batches(num_images, batch, steps, generator):
    """``steps`` index tensors of ``batch`` training images: reshuffled epochs, last partial batch dropped."""
    batches = []
    while len(batches) < steps:
        batches.extend(torch.randperm(num_images, generator=generator).split(batch)[:num_images // batch])
    return batches[:steps]

# ------------------------------------------------------------------------------------------ one run


@dataclasses.dataclass(frozen=True)
class Config:
    """What is compared: one method on one model at one micro-batch size."""
    task: str
    model: str
    method: Method
    micro_batch: int


@dataclasses.dataclass(frozen=True)
class Run:
    config: Config
    lr: float
    seed: int


def train_step(model, optimizer, task, images, labels, micro_batch):
    """One optimizer step over the optimizer batch, accumulated over micro-batches; returns the loss."""
    micro_batches = len(images) // micro_batch
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in zip(images.split(micro_batch), labels.split(micro_batch)):
        # Scaled so the accumulated gradient is the mean over the optimizer batch.
        loss = task.loss(model(x), y) / micro_batches
        loss.backward()
        total = total + loss.detach()
    optimizer.step()  # also ends the CmBN windows (end_windows_on_step)
    return total.item()  # the one wait for a CUDA device in the step


def prepare(task, config, lr, seed, device):
    """The model (initial weights from ``seed``) and its optimizer, whose steps end the CmBN windows."""
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model = build_model(task, config.model, config.method, task.optimizer_batch // config.micro_batch)
    model.to(device)
    optimizer = task.make_optimizer(model.parameters(), lr)
    if config.method.cmbn_mode is not None:
        cmbn_ext.end_windows_on_step(optimizer, model)
    return model, optimizer


def train_one(task, run, data, device):
    """Train one model with gradient accumulation; its validation and test scores."""
    started = time.perf_counter()
    config = run.config
    model, optimizer = prepare(task, config, run.lr, run.seed, device)
    initial_norm = conv_weight_norm(model)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=task.steps)
    train_x, train_y = (t.to(device) for t in data["train"])
    order = torch.Generator().manual_seed(run.seed)  # the same data order for every method

    model.train()
    losses = []
    for batch in optimizer_batches(len(train_x), task.optimizer_batch, task.steps, order):
        batch = batch.to(device)
        losses.append(train_step(model, optimizer, task, train_x[batch], train_y[batch], config.micro_batch))
        schedule.step()

    scores = {split: task.score(model, *(t.to(device) for t in data[split])) for split in ("val", "test")}
    return {"task": task.name, "model": config.model, "method": config.method.name,
            "micro_batch": config.micro_batch, "lr": run.lr, "seed": run.seed,
            "val": scores["val"], "test": scores["test"], "final_train_loss": losses[-1],
            "diverged": not all(math.isfinite(loss) for loss in losses),
            "conv_weight_norm_growth": conv_weight_norm(model) / initial_norm,
            "seconds": time.perf_counter() - started}

# ---------------------------------------------------------------------------------- the sweep


def trained_micro_batches(task, method):
    """The micro-batch sizes a method trains at: the optimizer batch for full-batch methods, the task's
    ``ablation_micro_batches`` for ablations, else every micro-batch size of the task."""
    if method.full_batch:
        return (task.optimizer_batch,)
    return task.ablation_micro_batches if method.ablation else task.micro_batches


def plan_configs(tasks, methods=METHODS):
    """Every (task, model, method, micro-batch) that trains."""
    return [Config(task.name, model, method, micro) for task in tasks for model in task.models
            for method in methods for micro in trained_micro_batches(task, method)]


def best_lr(runs):
    """The learning rate of the best validation score (the smaller one on a tie)."""
    return max(runs, key=lambda r: (r["val"], -r["lr"]))["lr"]


def run_sweep(tasks, device, workers, progress, methods=METHODS):
    """Train every config with the same protocol and return every run's record.

    ``progress.start({config: runs})`` is called first, then ``progress.advance(config, label)`` as each
    run ends.

    Each config first trains with its task's first seed at every learning rate; the learning rate with
    the best validation score then trains with the other seeds. ``workers`` processes (1: this one).
    """
    tasks_by_name = {task.name: task for task in tasks}
    configs = plan_configs(tasks, methods)
    sweeps = {config: [] for config in configs}
    progress.start({c: len(tasks_by_name[c.task].learning_rates) + len(tasks_by_name[c.task].seeds) - 1
                    for c in configs})

    def cost(run):  # longest first, so the workers finish together
        config, task = run.config, tasks_by_name[run.config.task]
        return (task.optimizer_batch / config.micro_batch) * (2 if config.method.cmbn_mode else 1)

    first = [Run(c, lr, tasks_by_name[c.task].seeds[0]) for c in configs
             for lr in tasks_by_name[c.task].learning_rates]
    results = []
    with _executor(tasks, device, workers) as pool:
        pending = {pool.submit(_train_in_worker, run): run for run in sorted(first, key=cost, reverse=True)}
        while pending:
            for future in _next_done(pool, pending):
                run = pending.pop(future)
                record = future.result()
                results.append(record)
                progress.advance(run.config, f"{run.config.task} | {run.config.method.name} | "
                                 f"micro-batch {run.config.micro_batch} | lr {run.lr:g} | seed {run.seed}")
                task = tasks_by_name[run.config.task]
                if run.seed != task.seeds[0]:
                    continue
                sweeps[run.config].append(record)
                if len(sweeps[run.config]) == len(task.learning_rates):
                    lr = best_lr(sweeps[run.config])
                    for seed in task.seeds[1:]:
                        later = Run(run.config, lr, seed)
                        pending[pool.submit(_train_in_worker, later)] = later
    return results

# ------------------------------------------------------------------------------------------ workers


_WORKER = {}


def _init_worker(tasks, device):
    torch.set_num_threads(1)  # tiny layers: one thread per process beats threads inside one process
    # On CUDA a few ops (cross-entropy over pixels among them) have no deterministic kernel: warn there.
    torch.use_deterministic_algorithms(True, warn_only=device.startswith("cuda"))
    _WORKER.update(device=device, tasks={task.name: task for task in tasks},
                   data={task.name: task.load_data() for task in tasks})


def _train_in_worker(run):
    name = run.config.task
    return train_one(_WORKER["tasks"][name], run, _WORKER["data"][name], _WORKER["device"])


class _InProcess:
    """``ProcessPoolExecutor``'s ``submit`` for ``workers=1``: queues the call, which runs here when
    ``_next_done`` asks for it, so that runs end one at a time, in the order submitted. Restores this
    process's thread count and determinism setting when done."""

    def __init__(self, tasks, device):
        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
        self.calls = {}
        _init_worker(tasks, device)

    def submit(self, function, *args):
        future = Future()
        self.calls[future] = (function, args)
        return future

    def run(self, future):
        function, args = self.calls.pop(future)
        try:
            future.set_result(function(*args))
        except Exception as error:  # raised again by future.result(), as from a worker process
            future.set_exception(error)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        threads, deterministic, warn_only = self.saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        _WORKER.clear()


def _next_done(pool, pending):
    """Futures of ``pending`` that are done: at least one, waiting for it (running it, in process)."""
    if isinstance(pool, _InProcess):
        future = next(iter(pending))  # the first submitted
        pool.run(future)
        return [future]
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    return done


def _executor(tasks, device, workers):
    if workers <= 1:
        return _InProcess(tasks, device)
    if device.startswith("cuda"):
        # cuBLAS needs this for deterministic algorithms; spawned workers inherit it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # spawn, not fork: a forked child inherits torch's thread pools and, on CUDA, a broken context.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tasks, device))

# ------------------------------------------------------------------------------------------- cost


def _step_timer(task, config, data, device):
    """A function that runs and times one optimizer step (all its micro-batches, forward and backward,
    and the optimizer) of the model trained for ``config``, in milliseconds."""
    model, optimizer = prepare(task, config, min(task.learning_rates), 0, device)
    model.train()
    images, labels = (t[:task.optimizer_batch].to(device) for t in data["train"])

    # On the CPU, the thread's CPU time: what the step costs, whatever else the machine runs meanwhile
    # (the step runs on this one thread). On a GPU, the wall time up to the result.
    clock = time.perf_counter if device.startswith("cuda") else time.thread_time

    def timed_step():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        started = clock()
        train_step(model, optimizer, task, images, labels, config.micro_batch)  # .item() waits for CUDA
        return 1000 * (clock() - started)
    return timed_step


def time_per_step(task, config, data, device, steps=5):
    """Median milliseconds of one optimizer step after one warm-up step, on one thread for the CPU."""
    timed_step = _step_timer(task, config, data, device)
    return statistics.median([timed_step() for _ in range(steps + 1)][1:])


def time_all(tasks, devices, steps, methods=METHODS):
    """``{(task, model, method, micro-batch, device): ms per optimizer step}``, single-threaded on the
    CPU like the training runs.

    Side by side: every configuration of a task takes one warm-up step, then ``steps`` rounds each
    time one step of every configuration in turn, and each gets the median of its rounds. A change of
    the machine's load during the measurement then weighs on every method alike.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = {}
        for task in tasks:
            data = task.load_data()
            timers = {(task.name, config.model, config.method.name, config.micro_batch, device):
                      _step_timer(task, config, data, device)
                      for config in plan_configs([task], methods) for device in devices}
            rounds = [[timed_step() for timed_step in timers.values()] for _ in range(steps + 1)]
            for index, key in enumerate(timers):
                timings[key] = statistics.median(times[index] for times in rounds[1:])
        return timings
    finally:
        torch.set_num_threads(threads)


def expected_seconds(tasks, configs):
    """``{config: seconds}``, what one training run of each config should take, for the progress bar:
    the task's steps times one optimizer step, timed here on one thread after a warm-up step. Scoring
    and the number of workers are left out; the bar's measured rate accounts for them."""
    tasks_by_name = {task.name: task for task in tasks}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, data = {}, {}
        for config in configs:
            task = tasks_by_name[config.task]
            if task.name not in data:
                data[task.name] = task.load_data()
            step_ms = time_per_step(task, config, data[task.name], "cpu", steps=1)
            expected[config] = task.steps * step_ms / 1000
        return expected
    finally:
        torch.set_num_threads(threads)
