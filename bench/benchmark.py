"""Benchmark of Cross mini-Batch Normalization: the CmBN layer against torch.nn.BatchNorm2d, the
pure-PyTorch path and torch.compile of it, as times, ratios and shares of the memory floor. On a GPU
the CmBN kernels run three ways side by side: as the launchers choose (CMBN_KERNEL_PATH=auto) and with
each path forced (two_pass, single_read); the report adds each shape's launch plans and their modeled
DRAM traffic (traffic_model.py).

    python3 bench/benchmark.py --device cuda [--out DIR]   # GPU: kernels, BatchNorm2d, pure, compiled
    python3 bench/benchmark.py --device cpu  [--out DIR]   # CPU: kernels, pure, BatchNorm2d, sample

Results go to ``DIR/<device>.json`` and ``DIR/<device>.md`` (default DIR: bench/results) and the table
is printed. The GPU part holds itself to ``--budget-s`` seconds (default 140; bench/gpu_check.sh gives 90):
the pure-PyTorch path runs in a subprocess with ``CMBN_DISABLE_KERNELS=1`` so the package is used as
shipped; whatever does not fit the budget, or fails, is recorded as such in the table and the run goes
on. Timers, bandwidth and launch counts are in ``timing.py``, the tables in ``report.py``, the shapes and
dtypes in ``shapes.py``.

The CPU part (one torch thread unless ``--threads``; ``--budget-s``, default 900) times, per shape,
CrossMiniBatchNorm2d on the CPU kernels of ``cmbn_ext._C``, BatchNorm2d and the article's sample side
by side in interleaved rounds; then a subprocess with ``CMBN_DISABLE_KERNELS=1`` times the pure-PyTorch
CmBN and BatchNorm2d side by side, so that each ratio to BatchNorm2d is measured within one process.
Both also time one optimizer step of a 6-layer conv net over 16 micro-batches of 1 (CmBN in sliding
mode, window 16). The shapes are the CPU target shapes, then the GPU shapes that fit in memory.
Without ``cmbn_ext._C``'s CPU kernels the run goes on, and says that its CmBN column is the
pure-PyTorch path.

``--fused-activation`` (CPU) times instead BatchNorm + activation fused into the op (``cmbn_train_forward``
with its activation arguments, the input kept, or the output for LeakyReLU) against BatchNorm2d followed
by the activation module and against CmBN followed by it, side by side, and writes
``DIR/cpu-fused-activation.md``.
"""
import time

STARTED = time.time()  # the budget counts from here, before the slow imports

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _path in (HERE, REPO):  # run as a script from anywhere, or imported by the tests
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cmbn_ext  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402
import traffic_model  # noqa: E402
from cmbn_ext import reference  # noqa: E402
from shapes import CPU_SHAPES, DTYPES, GPU_SHAPES  # noqa: E402,F401  (bench/shapes.py)

GPU_VARIANTS = [("cmbn", "CmBN kernels (auto path)"), ("cmbn_two_pass", "CmBN kernels, two_pass forced"),
                ("cmbn_single_read", "CmBN kernels, single_read forced"), ("batchnorm", "BatchNorm2d"),
                ("pure", "pure PyTorch"), ("compiled", "compiled pure")]
KERNEL_VARIANTS = ["cmbn", "cmbn_two_pass", "cmbn_single_read", "batchnorm"]  # timed in this process
# CMBN_KERNEL_PATH while a CmBN variant runs (the launchers read it at every call).
KERNEL_PATHS = {"cmbn": "auto", "cmbn_two_pass": "two_pass", "cmbn_single_read": "single_read"}
CPU_VARIANTS = [("cmbn", "CmBN on the CPU kernels"), ("batchnorm", "BatchNorm2d"),
                ("pure", "CmBN pure PyTorch (own process)"),
                ("pure_batchnorm", "BatchNorm2d in the pure-PyTorch process"), ("sample", "article sample")]
CPU_KERNEL_SIDE = ("cmbn", "batchnorm", "sample")  # timed side by side in this process
CPU_PURE_SIDE = ("pure", "pure_batchnorm")  # timed side by side in the CMBN_DISABLE_KERNELS=1 subprocess
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-5
# Cumulative mode with a window no benchmark reaches: every call after the first has history, and it
# launches what any call inside a window launches (the commit is a torch.where, not a branch).
WINDOW = 1 << 30
SETTINGS = {  # warm-up calls, runs and timed seconds per measurement
    "cuda": {"warmup": 3, "min_runs": 10, "max_runs": 200, "seconds": 0.15},
    "cpu": {"warmup": 2, "min_runs": 5, "max_runs": 500, "seconds": 0.8},  # sub-ms calls: many rounds
    "quick": {"warmup": 1, "min_runs": 2, "max_runs": 3, "seconds": 0.0},
}
# The CPU end-to-end step: timed seconds per variant, as a multiple of the settings' "seconds".
CPU_E2E_SECONDS_FACTOR = 4
CPU_E2E_MICRO_BATCHES, CPU_E2E_WINDOW = 16, 16
# Bytes the pure-PyTorch forward and backward hold at their peak, in multiples of x (a generous guess:
# a dozen temporaries of x's size), for the check that a CPU shape fits in memory.
PURE_PEAK_X_MULTIPLE = 12
# The GPU budget, counted from the start: timing the kernels (three paths) and BatchNorm2d until 38% of
# it, the end-to-end step until 43%, their launch counts until 50%; then the pure-PyTorch subprocess
# until a few seconds before the end: the eager layer in its first 35%, torch.compile until its last
# 12%, which count launches. Whatever a stage has not reached by its end is recorded as skipped.
STAGE_ENDS = {"timing": 0.38, "e2e": 0.43, "launches": 0.50}
WORKER_EAGER_SHARE, WORKER_COUNT_SHARE = 0.35, 0.12
REPORT_RESERVE_S, WORKER_GRACE_S = 6.0, 5.0  # the worker is killed at most 1 s before the budget ends
COMPILE_GUESS_S = {"fwd+bwd": 25.0, "fwd": 12.0}  # before any compile was seen on this machine
E2E_DESCRIPTION = ("One SGD step (zero_grad, forward under fp16 autocast, cross-entropy, backward, step) "
                   "of a ResNet-style network (stem and 4 stages of 2 BasicBlocks, widths 32-256, 17 "
                   "norm layers) on a (32, 3, 64, 64) channels_last batch; CmBN rows swap every "
                   "BatchNorm2d for CrossMiniBatchNorm2d with cmbn_ext.convert_batchnorm.")
CPU_E2E_DESCRIPTION = (f"One optimizer step (SGD with momentum) of a 6-layer conv net (six 3x3 conv + norm + "
                       f"ReLU layers, widths 32, 32, 64, 64, 128, 128, stride 2 before the 64s and the "
                       f"128s, then global average pooling and a linear classifier) over "
                       f"{CPU_E2E_MICRO_BATCHES} micro-batches of one (1, 3, 32, 32) image: zero_grad, "
                       f"{CPU_E2E_MICRO_BATCHES} forwards and backwards of the cross-entropy, step. CmBN "
                       f"rows swap every BatchNorm2d for CrossMiniBatchNorm2d (mode='sliding', window "
                       f"{CPU_E2E_WINDOW}) with cmbn_ext.convert_batchnorm; each CmBN step is compared "
                       f"with the BatchNorm2d step timed beside it in the same process.")


# ----------------------------------------------------------------------------------------- workloads
class ArticleSampleCrossBatchNorm(nn.Module):
    """The article's sample implementation (shared/seed, section 4), reproduced as written.

    Kept only as a naive baseline for CPU forward timing. Its math is wrong: the momentum weights are
    swapped (it keeps 10% of the history), it normalizes with the running blend instead of the pooled
    statistics, gamma and beta are never created, and the running statistics are plain attributes that
    keep the autograd graph, so it cannot run backward twice. Do not fix it: it is the baseline.
    """

    def __init__(self, num_features, momentum=0.1):
        super(ArticleSampleCrossBatchNorm, self).__init__()
        self.num_features = num_features
        self.momentum = momentum
        # 初始化全局均值和方差
        self.running_mean = torch.zeros(num_features)
        self.running_var = torch.ones(num_features)

    def forward(self, x):
        # 计算当前小批量的均值和方差
        mean = x.mean([0, 2, 3])  # 跨批量、行、列计算均值
        var = x.var([0, 2, 3], unbiased=False)  # 跨批量、行、列计算方差
        # 更新全局均值和方差
        self.running_mean = self.running_mean * self.momentum + mean * (1 - self.momentum)
        self.running_var = self.running_var * self.momentum + var * (1 - self.momentum)
        # 使用全局均值和方差进行标准化
        x_hat = (x - self.running_mean[None, :, None, None]) / torch.sqrt(
            self.running_var[None, :, None, None] + 1e-5)
        # 可学习的缩放和平移
        gamma = self.gamma if hasattr(self, 'gamma') else torch.ones_like(mean)
        beta = self.beta if hasattr(self, 'beta') else torch.zeros_like(mean)
        return gamma[None, :, None, None] * x_hat + beta[None, :, None, None]


def make_layer(variant, channels, device, **cmbn_options):
    """A training-mode norm layer for one variant, with non-trivial affine parameters (fp32);
    ``cmbn_options`` (``activation``, ``memory``) go to a CmBN layer."""
    if variant == "sample":
        return ArticleSampleCrossBatchNorm(channels)
    if variant in ("batchnorm", "pure_batchnorm"):
        layer = nn.BatchNorm2d(channels, eps=EPS, device=device)
    else:  # a "cmbn" variant, or "pure" in a process where the kernels are disabled
        layer = cmbn_ext.CrossMiniBatchNorm2d(channels, eps=EPS, window=WINDOW, device=device,
                                              **cmbn_options)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer.train()


def make_input_sets(shape, dtype_key, device, count):
    """``count`` independent (x, dy) sets in the dtype and memory format of ``dtype_key``.

    x is drawn with a non-zero mean (never zeros: they hide unwritten outputs and can run faster);
    ``x_leaf`` is the same storage as a leaf that requires grad, for the forward+backward pass.
    """
    dtype, memory_format = DTYPES[dtype_key]
    sets = []
    for _ in range(count):
        x = (torch.randn(shape, device=device) + 0.5).to(dtype).contiguous(memory_format=memory_format)
        dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
        sets.append({"x": x, "x_leaf": x.detach().requires_grad_(), "dy": dy})
    return sets


def layer_call(layer, pass_):
    """The call timed for a layer: its training forward, or forward and the gradients of x, weight and
    bias (``torch.autograd.grad``: nothing accumulates between calls)."""
    if pass_ == "fwd":
        return lambda inputs: layer(inputs["x"])
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward_backward(inputs):
        y = layer(inputs["x_leaf"])
        torch.autograd.grad(y, [inputs["x_leaf"], *params], inputs["dy"])
    return forward_backward


def reference_forward(x, weight, bias, count, mean, var):
    """The layer's forward math (reference.forward), the function torch.compile gets."""
    return reference.forward(x, weight, bias, count, mean, var, EPS, None)[0]


def reference_train_step(x, dy, weight, bias, count, mean, var):
    """The layer's forward and renorm backward math (reference.forward, reference.backward)."""
    y, mean_p, var_p, batch_mean, batch_var, b = reference.forward(x, weight, bias, count, mean, var,
                                                                   EPS, None)
    grads = reference.backward(dy, x, weight, mean_p, var_p, batch_mean, batch_var, b, EPS, False)
    return (y, *grads)


def compiled_call(compiled, shape, pass_, device):
    """The call timed for the compiled variant: fp32 parameters and one slot of history, like the
    layer's state inside a window."""
    channels = shape[1]
    m = shape[0] * shape[2] * shape[3]
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    history = (torch.full((1, channels), 3 * m, dtype=torch.long, device=device),
               0.1 * torch.randn(1, channels, device=device), torch.rand(1, channels, device=device) + 0.5)
    if pass_ == "fwd":
        return lambda inputs: compiled(inputs["x"], weight, bias, *history)
    return lambda inputs: compiled(inputs["x"], inputs["dy"], weight, bias, *history)


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """The end-to-end network: a stem and four stages of two BasicBlocks (widths 32, 64, 128, 256)."""

    def __init__(self, widths=(32, 64, 128, 256), classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        previous = widths[0]
        for i, width in enumerate(widths):
            layers += [BasicBlock(previous, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            previous = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def measure_e2e(variant, device, settings, seconds):
    """Median time of one training step of SmallResNet with BatchNorm2d or CmBN layers."""
    record = {"variant": variant}
    try:
        model = SmallResNet()
        if variant != "batchnorm":
            model = cmbn_ext.convert_batchnorm(model, window=WINDOW)
        model = model.to(device, memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batches = [(torch.randn(32, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last),
                    torch.randint(0, 10, (32,), device=device)) for _ in range(4)]
        autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

        def step(batch):
            images, labels = batch
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        with traffic_model.kernel_path(KERNEL_PATHS.get(variant)):
            stats = timing.time_calls(step, batches, device, warmup=settings["warmup"],
                                      min_runs=settings["min_runs"], max_runs=settings["max_runs"],
                                      seconds=seconds)
        record.update(stats.as_dict())
    except Exception as error:  # one failing variant is recorded, the run goes on
        record["error"] = describe(error)
    return record


class SixLayerNet(nn.Module):
    """The CPU end-to-end network: six 3x3 conv + BatchNorm2d + ReLU layers, pooling and a classifier."""

    def __init__(self, widths=(32, 32, 64, 64, 128, 128), strides=(1, 1, 2, 1, 2, 1), classes=10):
        super().__init__()
        layers, previous = [], 3
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(previous, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            previous = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def measure_micro_batch_steps(variants, device, settings):
    """Median time of one optimizer step of SixLayerNet over CPU_E2E_MICRO_BATCHES micro-batches of
    one image, for each of ``variants`` (BatchNorm2d, or CmBN in sliding mode), timed side by side;
    one record per variant."""
    records = {variant: {"variant": variant} for variant in variants}
    steps = {}
    for variant in variants:
        try:
            torch.manual_seed(0)  # the same weights for every variant
            model = SixLayerNet()
            if variant not in ("batchnorm", "pure_batchnorm"):
                model = cmbn_ext.convert_batchnorm(model, mode="sliding", window=CPU_E2E_WINDOW)
            steps[variant] = micro_batch_step(model.to(device).train())
        except Exception as error:
            records[variant]["error"] = describe(error)
    generator = torch.Generator().manual_seed(1)
    input_sets = [[(torch.randn(1, 3, 32, 32, generator=generator).to(device),
                    torch.randint(0, 10, (1,), generator=generator).to(device))
                   for _ in range(CPU_E2E_MICRO_BATCHES)] for _ in range(2)]
    seconds = CPU_E2E_SECONDS_FACTOR * settings["seconds"] * len(steps)
    outcomes = timing.time_interleaved(steps, input_sets, device, warmup=settings["warmup"],
                                       min_runs=settings["min_runs"], max_runs=settings["max_runs"],
                                       seconds=seconds) if steps else {}
    for variant, outcome in outcomes.items():
        if isinstance(outcome, Exception):
            records[variant]["error"] = describe(outcome)
        else:
            records[variant].update(outcome.as_dict())
    return list(records.values())


def micro_batch_step(model):
    """One optimizer step of ``model`` over a list of (image, label) micro-batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        for images, labels in micro_batches:
            (F.cross_entropy(model(images), labels) / len(micro_batches)).backward()
        optimizer.step()
    return step


# ---------------------------------------------------------------------------------------- measuring
def describe(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def base_record(shape, dtype_key, pass_, variant):
    dtype = DTYPES[dtype_key][0]
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    return {"shape": list(shape), "dtype": dtype_key, "pass": pass_, "variant": variant,
            "x_bytes": numel * torch.finfo(dtype).bits // 8, "launches": None}


def skipped(shape, dtype_key, variant, why, passes=PASSES):
    return [dict(base_record(shape, dtype_key, p, variant), error=f"skipped: {why}") for p in passes]


def record_key(record):
    return (tuple(record["shape"]), record["dtype"], record["pass"], record["variant"])


def measure(record, call, input_sets, device, settings, seconds):
    """Time ``call`` into ``record``; an exception becomes the record's error."""
    try:
        stats = timing.time_calls(call, input_sets, device, warmup=settings["warmup"],
                                  min_runs=settings["min_runs"], max_runs=settings["max_runs"],
                                  seconds=seconds)
        record.update(stats.as_dict())
    except Exception as error:
        record["error"] = describe(error)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
    return record


def forced_path_not_taken(plans, variant, pass_):
    """Why a forced-path variant is not worth timing for this pass (it would time the other path
    again), or None. ``plans`` holds the shape's plans by "<CMBN_KERNEL_PATH>/<direction>"."""
    if variant != "cmbn_single_read" or not plans:
        return None
    directions = ("fwd",) if pass_ == "fwd" else ("fwd", "bwd")
    forced = [plans.get(f"single_read/{d}") or {} for d in directions]
    if all(plan.get("path") == "two_pass" for plan in forced):
        return "skipped: single_read does not fit this shape (its plan is two_pass)"
    return None


def measure_config(shape, dtype_key, variants, device, settings, cap_s, count_jobs, plans=None):
    """All passes of the layer variants on one shape and dtype, within about ``cap_s`` seconds.

    Each variant timed without error adds a job to ``count_jobs`` (when given) for counting its
    launches later, once all timing is done (see ``count_launches``). ``plans`` (the shape's kernel
    plans) lets a forced path that would fall back to the other one go untimed.
    """
    passes = [(v, p) for v in variants for p in PASSES if not (v == "sample" and p != "fwd")]
    not_taken = {(v, p): forced_path_not_taken(plans, v, p) for v, p in passes}
    records = [dict(base_record(shape, dtype_key, p, v), error=why) for (v, p), why in not_taken.items() if why]
    passes = [(v, p) for v, p in passes if not not_taken[(v, p)]]
    seconds = min(settings["seconds"], 0.5 * cap_s / max(1, len(passes)))  # the rest: warm-up, setup
    try:
        x_bytes = base_record(shape, dtype_key, "fwd", variants[0])["x_bytes"]
        input_sets = make_input_sets(shape, dtype_key, device, timing.input_sets_needed(x_bytes, device))
    except Exception as error:
        return records + [dict(base_record(shape, dtype_key, p, v), error=describe(error)) for v, p in passes]
    for variant, pass_ in passes:
        record = base_record(shape, dtype_key, pass_, variant)
        try:
            layer = make_layer(variant, shape[1], device)
        except Exception as error:
            records.append(dict(record, error=describe(error)))
            continue
        with traffic_model.kernel_path(KERNEL_PATHS.get(variant)):
            records.append(measure(record, layer_call(layer, pass_), input_sets, device, settings, seconds))
        if count_jobs is not None and not record.get("error"):
            count_jobs.append((record_key(record), layer_builder(variant, shape, dtype_key, pass_, device)))
    del input_sets
    return records


def measure_side_by_side(shape, dtype_key, variants, device, settings, cap_s):
    """All passes of the layer variants on one shape and dtype, timed side by side in interleaved
    rounds (timing.time_interleaved) for about ``cap_s`` seconds at most."""
    passes = [(v, p) for v in variants for p in PASSES if not (v == "sample" and p != "fwd")]
    records = {(v, p): base_record(shape, dtype_key, p, v) for v, p in passes}
    x_bytes = records[passes[0]]["x_bytes"]
    shortfall = memory_shortfall(x_bytes, device)
    if shortfall:
        return [dict(r, error=f"skipped: {shortfall}") for r in records.values()]
    try:
        input_sets = make_input_sets(shape, dtype_key, device, timing.input_sets_needed(x_bytes, device))
    except Exception as error:
        return [dict(r, error=describe(error)) for r in records.values()]
    calls = {}
    for key, record in records.items():
        try:
            calls[key] = layer_call(make_layer(key[0], shape[1], device), key[1])
        except Exception as error:
            record["error"] = describe(error)
    seconds = min(settings["seconds"] * len(calls), 0.5 * cap_s)  # the rest: warm-up, setup
    outcomes = timing.time_interleaved(calls, input_sets, device, warmup=settings["warmup"],
                                       min_runs=settings["min_runs"], max_runs=settings["max_runs"],
                                       seconds=seconds) if calls else {}
    for key, outcome in outcomes.items():
        if isinstance(outcome, Exception):
            records[key]["error"] = describe(outcome)
        else:
            records[key].update(outcome.as_dict())
    return list(records.values())


def memory_shortfall(x_bytes, device):
    """Why a CPU shape would not fit in the host's available memory (its input sets and the
    pure-PyTorch path's peak), or None when it fits (or on a GPU, where an out-of-memory error is
    recorded instead)."""
    if device.type != "cpu":
        return None
    available = available_host_bytes()
    needed = x_bytes * (2 * timing.input_sets_needed(x_bytes, device) + PURE_PEAK_X_MULTIPLE)
    if available is None or needed <= 0.8 * available:
        return None
    return f"needs about {needed / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB available"


def available_host_bytes():
    """MemAvailable from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def layer_builder(variant, shape, dtype_key, pass_, device):
    """A fresh layer's timed call (under the variant's CMBN_KERNEL_PATH) and one input set, for
    counting its launches."""
    def build():
        call = layer_call(make_layer(variant, shape[1], device), pass_)

        def call_on_its_path(inputs):
            with traffic_model.kernel_path(KERNEL_PATHS.get(variant)):
                return call(inputs)
        return call_on_its_path, make_input_sets(shape, dtype_key, device, 1)
    return build


def count_launches(count_jobs, device, stage_end, on_count, chunk=8):
    """Kernels per call of each job by the profiler, ``chunk`` jobs per profiler session, until
    ``stage_end``; jobs left then keep no count. Returns whether all were counted. Nothing is timed
    after this in the same process: profiling may leave hooks that slow later launches.
    """
    for first in range(0, len(count_jobs), chunk):
        if time.time() > stage_end:
            return False
        jobs = count_jobs[first:first + chunk]
        try:
            counts = timing.count_kernels([build for _, build in jobs], device)
        except Exception:  # a count is a detail: the timing of these variants already passed
            counts = [None] * len(jobs)
        for (key, _), count in zip(jobs, counts):
            on_count(key, count)
    return True


def run_configs(configs, variants, device, settings, stage_end, count_jobs, emit, plans=None,
                side_by_side=False):
    """Measure each (shape, dtype) within the stage's time, sharing what is left among those left.
    ``plans``: {(shape, dtype key): that shape's kernel plans}, or None. ``side_by_side``: time the
    variants in interleaved rounds (measure_side_by_side, the CPU), else one after the other; then a
    shape whose rounds are expected to take longer than its share of the time is skipped (the
    expectation scales the round time of the largest shape measured so far by the size of x).
    """
    largest = None  # (x bytes, seconds a round took) of the largest shape measured side by side
    for i, (shape, dtype_key) in enumerate(configs):
        left = stage_end - time.time()
        if left <= 0:
            for later_shape, later_dtype in configs[i:]:
                for variant in variants:
                    emit(skipped(later_shape, later_dtype, variant, "out of time budget",
                                 ("fwd",) if variant == "sample" else PASSES))
            return
        cap_s = left / (len(configs) - i)
        if side_by_side:
            x_bytes = base_record(shape, dtype_key, "fwd", variants[0])["x_bytes"]
            rounds = settings["warmup"] + 1 + settings["min_runs"]  # warm-up, probe, timed
            expected_s = largest and rounds * largest[1] * x_bytes / largest[0]
            if expected_s and expected_s > cap_s:
                why = "out of time budget (expected to take longer than its share)"
                for variant in variants:
                    emit(skipped(shape, dtype_key, variant, why, ("fwd",) if variant == "sample" else PASSES))
                continue
            records = measure_side_by_side(shape, dtype_key, variants, device, settings, cap_s)
            emit(records)
            round_s = sum(r["median_ms"] for r in records if not r.get("error")) / 1e3
            if round_s > 0 and (largest is None or x_bytes >= largest[0]):
                largest = (x_bytes, round_s)
            continue
        emit(measure_config(shape, dtype_key, variants, device, settings, cap_s, count_jobs,
                            (plans or {}).get((tuple(shape), dtype_key))))


def run_compiled(configs, device, settings, deadline, count_jobs, emit):
    """torch.compile of the reference math, one compile per (dtype, pass) group with dynamic shapes.

    A group starts only if its compile is expected to fit before ``deadline``; after its first shape
    the stance is fail_on_recompile, so a shape that would need a new compile is skipped, not paid for.
    """
    from torch._dynamo.utils import counters

    if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: recompiles could not be refused
        for shape, dtype_key in configs:
            emit(skipped(shape, dtype_key, "compiled", "needs torch.compiler.set_stance (torch >= 2.6)"))
        return
    seen_breaks = set()
    compiled = {"fwd": torch.compile(reference_forward, dynamic=True),
                "fwd+bwd": torch.compile(reference_train_step, dynamic=True)}
    guess = dict(COMPILE_GUESS_S)
    for pass_ in ("fwd+bwd", "fwd"):
        for dtype_key in dict.fromkeys(d for _, d in configs):
            shapes = [s for s, d in configs if d == dtype_key]
            measure_s = len(shapes) * (settings["seconds"] + 0.5)
            if time.time() + guess[pass_] + measure_s > deadline:
                for shape in shapes:
                    emit(skipped(shape, dtype_key, "compiled", "out of time budget (compile would not "
                                 f"fit, about {guess[pass_]:.0f}s)", (pass_,)))
                continue
            first_error = None
            for i, shape in enumerate(shapes):
                record = base_record(shape, dtype_key, pass_, "compiled")
                if first_error:  # compiling again would fail again, and cost the time again
                    emit([dict(record, error=f"skipped: the first shape failed ({first_error})")])
                    continue
                if time.time() > deadline:
                    emit([dict(record, error="skipped: out of time budget")])
                    continue
                try:
                    input_sets = make_input_sets(shape, dtype_key, device, timing.input_sets_needed(
                        record["x_bytes"], device))
                    call = compiled_call(compiled[pass_], shape, pass_, device)
                    stance = "default" if i == 0 else "fail_on_recompile"
                    with torch.compiler.set_stance(stance):
                        if i == 0:
                            started = time.time()
                            breaks_before = dict(counters["graph_break"])
                            graphs_before = counters["stats"]["unique_graphs"]
                            call(input_sets[0])
                            timing.synchronize(device)
                            record["compile_s"] = round(time.time() - started, 1)
                            record["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
                            reasons = [r for r, n in counters["graph_break"].items()
                                       if n > breaks_before.get(r, 0)]
                            record["graph_breaks"] = sum(counters["graph_break"].values()) - sum(
                                breaks_before.values())
                            for reason in reasons:
                                if reason not in seen_breaks:
                                    seen_breaks.add(reason)
                                    emit([{"text": "torch.compile of the reference graph-breaks ("
                                           + break_reason(reason) + "): that part runs eager"}], "note")
                            guess[pass_] = record["compile_s"]
                            if pass_ == "fwd+bwd":  # the forward graph is about half the work
                                guess["fwd"] = 0.6 * record["compile_s"]
                        emit([measure(record, call, input_sets, device, settings, settings["seconds"])])
                    del input_sets
                    if count_jobs is not None and not record.get("error"):
                        build = compiled_builder(compiled[pass_], shape, dtype_key, pass_, device)
                        count_jobs.append((record_key(record), build))
                except Exception as error:
                    record["error"] = describe(error)
                    emit([record])
                if i == 0 and record.get("error"):
                    first_error = record["error"][:80]


def break_reason(reason):
    """The telling part of a dynamo graph-break message (its debug context, else its first line)."""
    text = reason.split("Developer debug context:", 1)[-1] if "Developer debug context:" in reason \
        else reason
    return " ".join(text.strip().splitlines()[0].split())[:160] if text.strip() else "unknown"


def compiled_builder(compiled, shape, dtype_key, pass_, device):
    """The compiled variant's call, held to the graphs already compiled, and one input set."""
    def build():
        call = compiled_call(compiled, shape, pass_, device)

        def without_recompiles(inputs):
            with torch.compiler.set_stance("fail_on_recompile"):
                return call(inputs)
        return without_recompiles, make_input_sets(shape, dtype_key, device, 1)
    return build


# -------------------------------------------------------------------------------------- the worker
def run_worker(plan_path):
    """The pure-PyTorch side (a subprocess started with CMBN_DISABLE_KERNELS=1): the layer eager, the
    end-to-end step, then torch.compile of the reference; one JSON line per result, flushed at once,
    so that a run stopped at the budget keeps what it finished."""
    with open(plan_path) as f:
        plan = json.load(f)
    device = torch.device(plan["device"])
    settings = plan["settings"]
    configs = [(tuple(shape), dtype_key) for shape, dtype_key in plan["configs"]]
    if plan.get("threads"):
        torch.set_num_threads(plan["threads"])
    with open(plan["out"], "a") as out:
        def emit(records, kind="record"):
            for record in records:
                out.write(json.dumps(dict(record, type=kind)) + "\n")
            out.flush()

        emit([{"kernels_loaded": cmbn_ext.has_cuda_kernels()}], "meta")
        if plan.get("side_by_side"):
            return run_cpu_worker(plan, configs, device, settings, emit)
        if device.type == "cuda" and cmbn_ext.has_cuda_kernels():
            emit([{"text": "the pure-PyTorch subprocess still had the CUDA kernels loaded"}], "note")
            return 1
        jobs = [] if plan["profile_launches"] else None
        run_configs(configs, ["pure"], device, settings, plan["eager_end"], jobs, emit)
        if plan["e2e"]:
            emit([measure_e2e("pure", device, settings, settings["seconds"] * 10)], "e2e")
        if plan["compile"]:
            run_compiled(configs, device, settings, plan["compile_end"], jobs, emit)
        if jobs:
            count_launches(jobs, device, plan["deadline"],
                           lambda key, n: emit([{"key": list(key), "launches": n}], "launches"))
    return 0


def run_cpu_worker(plan, configs, device, settings, emit):
    """The CPU benchmark's pure-PyTorch side: the end-to-end step, then the layer on each shape, each
    beside BatchNorm2d in this process, until ``eager_end``."""
    if cpu_kernels_loaded():
        emit([{"text": "the pure-PyTorch subprocess still had the CPU kernels loaded"}], "note")
        return 1
    if plan["e2e"]:
        emit(measure_micro_batch_steps(CPU_PURE_SIDE, device, settings), "e2e")
    run_configs(configs, list(CPU_PURE_SIDE), device, settings, plan["eager_end"], None, emit,
                side_by_side=True)
    return 0


def run_pure_subprocess(device, configs, settings, *, deadline, eager_end, compile_end, compile_, e2e,
                        profile_launches, side_by_side=False, threads=None):
    """Run the worker with CMBN_DISABLE_KERNELS=1 until ``deadline``; returns (records, e2e, notes).

    The worker times the layer eager until ``eager_end``, the end-to-end step, torch.compile until
    ``compile_end``, then counts launches until ``deadline``. With ``side_by_side`` (the CPU
    benchmark) it times instead the micro-batch end-to-end step, then the layer, each beside
    BatchNorm2d (run_cpu_worker), with ``threads`` torch threads.

    The worker is its own process group, so the compile workers it spawns go with it when it is
    stopped at the deadline (or when this process is terminated).
    """
    with tempfile.TemporaryDirectory(prefix="cmbn_bench_") as tmp:
        plan = {"device": device.type, "settings": settings, "configs": [list(c) for c in configs],
                "deadline": deadline, "eager_end": eager_end, "compile_end": compile_end,
                "compile": compile_, "e2e": e2e, "side_by_side": side_by_side, "threads": threads,
                "profile_launches": profile_launches, "out": os.path.join(tmp, "results.jsonl")}
        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        log_path = os.path.join(tmp, "worker.log")
        env = dict(os.environ, CMBN_DISABLE_KERNELS="1", PYTHONUNBUFFERED="1")
        notes = []
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker-plan", plan_path],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            previous = _on_sigterm(_stop_group_and_exit(proc))
            try:
                proc.wait(timeout=max(1.0, deadline - time.time() + WORKER_GRACE_S))
            except subprocess.TimeoutExpired:
                notes.append("the pure-PyTorch subprocess was stopped at the time budget")
            finally:
                _stop_group(proc)
                _on_sigterm(signal.SIG_DFL if previous is None else previous)
        if proc.returncode not in (0, None, -signal.SIGKILL):
            with open(log_path) as f:
                tail = " | ".join(line.strip() for line in f.read().strip().splitlines()[-3:])
            notes.append(f"the pure-PyTorch subprocess exited with {proc.returncode}: {tail[-300:]}")
        records, e2e, launches = [], [], {}
        if os.path.exists(plan["out"]):
            with open(plan["out"]) as f:
                for line in f:
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a stopped worker
                        continue
                    kind = item.pop("type")
                    if kind == "record":
                        records.append(item)
                    elif kind == "e2e":
                        e2e.append(item)
                    elif kind == "note":
                        notes.append(item["text"])
                    elif kind == "launches":
                        shape, *rest = item["key"]
                        launches[(tuple(shape), *rest)] = item["launches"]
        for record in records:
            record["launches"] = launches.get(record_key(record), record.get("launches"))
    return records, e2e, notes


def _stop_group(proc):
    """Kill the worker's process group: the worker, if still running, and any compile workers left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _on_sigterm(handler):
    """Install a SIGTERM handler (bench/gpu_check.sh's timeout sends SIGTERM); returns the previous one.
    Only the main thread may; elsewhere nothing is installed."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _stop_group_and_exit(proc):
    def handler(signum, frame):
        _stop_group(proc)
        sys.exit(128 + signum)
    return handler


# ------------------------------------------------------------------------------------------ the run
# ------------------------------------------------------------------------------ fused activations
FUSED_ACTIVATION_SHAPES = [(8, 64, 56, 56), (2, 256, 28, 28), (8, 512, 28, 28), (2, 32, 32, 32)]
# name -> (activation module, invertible: whether the lean policy keeps the output)
FUSED_ACTIVATIONS = {
    "LeakyReLU(0.1)": (lambda: nn.LeakyReLU(0.1, inplace=True), True),
    "SiLU": (lambda: nn.SiLU(inplace=True), False),
}


def fused_activation_layers(channels, activation):
    """{variant: layer} for one activation: BatchNorm2d then the module, CmBN then the module, and
    CrossMiniBatchNorm2d computing the activation in its op (and its lean policy where the activation
    is invertible): the layers as a user builds them."""
    module, invertible = FUSED_ACTIVATIONS[activation]
    layers = {"BatchNorm2d + act": nn.Sequential(make_layer("batchnorm", channels, "cpu"), module()),
              "CmBN + act": nn.Sequential(make_layer("cmbn", channels, "cpu"), module()),
              "CmBN fused": make_layer("cmbn", channels, "cpu", activation=module())}
    if invertible:
        layers["CmBN fused, lean"] = make_layer("cmbn", channels, "cpu", activation=module(),
                                                memory="lean")
    return {name: layer.train() for name, layer in layers.items()}


def run_fused_activation(args):
    """The CPU table of the fused activations (``--fused-activation``), into
    ``DIR/cpu-fused-activation.md``."""
    torch.set_num_threads(args.threads or 1)
    device = torch.device("cpu")
    settings = SETTINGS["quick" if args.quick else "cpu"]
    load_before = os.getloadavg()
    rows = []
    for dtype_key in args.dtypes:
        for shape in args.shapes:
            x_bytes = base_record(shape, dtype_key, "fwd", "cmbn")["x_bytes"]
            input_sets = make_input_sets(shape, dtype_key, device, timing.input_sets_needed(x_bytes, device))
            for activation in FUSED_ACTIVATIONS:
                layers = fused_activation_layers(shape[1], activation)
                if dtype_key.endswith("-cl"):
                    layers = {k: v.to(memory_format=torch.channels_last) for k, v in layers.items()}
                calls = {(name, pass_): layer_call(layer, pass_) for name, layer in layers.items()
                         for pass_ in PASSES}
                outcomes = timing.time_interleaved(calls, input_sets, device, warmup=settings["warmup"],
                                                   min_runs=settings["min_runs"],
                                                   max_runs=settings["max_runs"],
                                                   seconds=settings["seconds"] * len(calls))
                for pass_ in PASSES:
                    times = {name: outcomes[(name, pass_)] for name in layers}
                    rows.append((shape, dtype_key, activation, pass_, times))
                    print(fused_activation_row(rows[-1]), flush=True)
            del input_sets
    load_after = os.getloadavg()
    text = fused_activation_report(rows, device, load_before, load_after, args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cpu-fused-activation.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return 0


FUSED_COLUMNS = ("BatchNorm2d + act", "CmBN + act", "CmBN fused", "CmBN fused, lean")


def fused_activation_row(row):
    shape, dtype_key, activation, pass_, times = row

    def ms(name):
        t = times.get(name)
        return "-" if t is None else (describe(t) if isinstance(t, Exception) else f"{t.median_ms:.3f}")

    def ratio(name):
        t, base = times.get(name), times.get("BatchNorm2d + act")
        if t is None or isinstance(t, Exception) or isinstance(base, Exception):
            return "-"
        return f"{t.median_ms / base.median_ms:.2f}"
    return (f"| {'x'.join(map(str, shape))} | {dtype_key} | {activation} | {pass_} | "
            + " | ".join(ms(name) for name in FUSED_COLUMNS) + " | "
            + " | ".join(ratio(name) for name in FUSED_COLUMNS[1:]) + " |")


def fused_activation_report(rows, device, load_before, load_after, args):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# CPU: BatchNorm + activation fused into CmBN's op",
        "",
        f"{device_name(device)}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s); {date}. Load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in load_before)} before the run and "
        f"{', '.join(f'{v:.2f}' for v in load_after)} after it"
        + (" (other processes shared the host)." if max(load_before[0], load_after[0]) > 1.5 else "."),
        "",
        "Median ms per call (training forward, or forward and the gradients of x, weight and bias), the "
        "variants timed side by side in interleaved rounds over rotated inputs "
        "(`python bench/benchmark.py --device cpu --fused-activation`). BatchNorm2d + act: torch's "
        "BatchNorm2d then the activation module (in place); CmBN + act: CrossMiniBatchNorm2d then the "
        "module; CmBN fused: CrossMiniBatchNorm2d(activation=the module), the activation computed in "
        "`cmbn_train_forward` and differentiated in `cmbn_backward`, the input kept; lean: "
        "memory=\"lean\", the output kept instead (invertible activations). "
        "Ratios are to BatchNorm2d + act (below 1: faster).",
        "",
        "| shape | dtype | activation | pass | " + " | ".join(f"{c} ms" for c in FUSED_COLUMNS) + " | "
        + " | ".join(f"{c} / BN+act" for c in FUSED_COLUMNS[1:]) + " |",
        "|" + "---|" * (4 + 2 * len(FUSED_COLUMNS) - 1),
    ]
    lines += [fused_activation_row(row) for row in rows]
    lines += [""] + [f"- {note}" for note in args.note]
    return "\n".join(lines).rstrip() + "\n"


def cpu_kernels_loaded():
    """Whether the CPU kernels of cmbn_ext._C serve CPU tensors in this process."""
    return cmbn_ext.has_cpu_kernels()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def collect_meta(device, args, settings):
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": device.type, "device_name": device_name(device),
        "torch_version": torch.__version__,
        "host": f"{os.cpu_count()} CPU cores; torch CPU threads: {torch.get_num_threads()}",
        "settings": settings, "budget_s": args.budget_s, "notes": list(args.note),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["cuda_version"] = torch.version.cuda
        meta["cudnn_version"] = torch.backends.cudnn.version()
        meta["l2_bytes"] = getattr(props, "L2_cache_size", None)
        meta["kernels_loaded"] = "yes" if cmbn_ext.has_cuda_kernels() else \
            "NO: the CmBN column is the pure-PyTorch path"
    else:
        meta["kernels_loaded"] = "yes (the CPU kernels of cmbn_ext._C)" if cpu_kernels_loaded() else \
            "NO: the CmBN column is the pure-PyTorch path too (cmbn_ext._C or its CPU kernels not loaded)"
    meta["method"] = method_text(device, settings, meta)
    return meta


def method_text(device, settings, meta):
    runs = (f"{settings['warmup']} warm-up calls, then as many runs as fit {settings['seconds']}s "
            f"(at least {settings['min_runs']}, at most {settings['max_runs']}), median reported")
    common = (f"fwd = the training forward (parameters require grad, x does not); fwd+bwd = forward and "
              f"torch.autograd.grad of x, weight and bias. CmBN = CrossMiniBatchNorm2d, cumulative mode, "
              f"window 2^{WINDOW.bit_length() - 1} so every timed call has history (the first warm-up "
              f"call starts the window), grad='renorm', affine with fp32 parameters (fp16 input as "
              f"under autocast). "
              f"Memory floor = bytes that must move (fwd: read x, write y; fwd+bwd: that plus read x and "
              f"dy, write dx) / the copy bandwidth measured in this run.")
    if device.type == "cpu":
        return (f"time.perf_counter around each call, {torch.get_num_threads()} torch thread(s); the "
                f"variants of a shape timed side by side in interleaved rounds (each round calls each "
                f"once): {settings['warmup']} warm-up rounds, then as many rounds as fit "
                f"{settings['seconds']}s per variant (at least {settings['min_runs']}, at most "
                f"{settings['max_runs']}), median reported; input sets rotated (at least 2, "
                f"{timing.CPU_ROTATION_BYTES >> 20} MiB in all when they fit 8 sets). {common} "
                f"CmBN runs on the CPU kernels of cmbn_ext._C; pure = the same layer in a subprocess "
                f"with CMBN_DISABLE_KERNELS=1, timed beside its own BatchNorm2d (pBN), so CmBN/BN is "
                f"measured within this process and pure/BN = pure/pBN within the subprocess "
                f"(pure/CmBN compares the two processes). Shapes whose input sets and pure-PyTorch "
                f"temporaries would not fit in memory are skipped. The article's sample runs forward "
                f"only (it cannot run backward twice).")
    l2 = meta.get("l2_bytes") or 0
    return (f"CUDA events around each call, queued back to back and read after one synchronize; {runs}; "
            f"input sets rotated so that together they exceed {timing.L2_MULTIPLE}x the L2 "
            f"({l2 / 2**20:.0f} MiB). {common} The CmBN kernels run three ways: CMBN_KERNEL_PATH=auto "
            f"(CmBN, the launchers' choice), two_pass forced (2P) and single_read forced (SR; not timed "
            f"where it does not fit and would run two_pass); the plan table gives each shape's plans. "
            f"BatchNorm2d as torch dispatches it (cuDNN "
            f"{meta.get('cudnn_version')} or native). pure = the same layer in a subprocess with "
            f"CMBN_DISABLE_KERNELS=1. compiled = torch.compile(dynamic=True) of reference.forward "
            f"(+ reference.backward for fwd+bwd): the layer's math without its O(C) state update, one "
            f"compile per dtype and pass, compile time excluded. Kernels per call: CUDA kernel events of "
            f"torch.profiler over 2 calls, halved. Whole GPU run held to {meta['budget_s']:.0f}s.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for <device>.json and <device>.md (default: bench/results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default: 140 on cuda, 900 on cpu)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated NxCxHxW shapes instead of the default list")
    parser.add_argument("--dtypes", default=None, help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2-3 runs (smoke tests)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (GPU)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end step")
    parser.add_argument("--no-profile", action="store_true", help="do not count kernel launches")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on cpu, torch's on cuda)")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    parser.add_argument("--fused-activation", action="store_true",
                        help="CPU: BatchNorm + activation fused into CmBN's op against the modules "
                             "(DIR/cpu-fused-activation.md)")
    parser.add_argument("--worker-plan", help=argparse.SUPPRESS)  # the pure-PyTorch subprocess
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 140.0 if args.device == "cuda" else 900.0
    if args.threads is None and args.device == "cpu":
        args.threads = 1  # the CPU targets are at one thread
    default_shapes = (GPU_SHAPES if args.device == "cuda" else
                      FUSED_ACTIVATION_SHAPES if args.fused_activation else CPU_SHAPES)
    args.shapes = ([tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
                   if args.shapes else default_shapes)
    if any(len(s) != 4 or min(s) < 1 for s in args.shapes):
        parser.error("--shapes takes N x C x H x W with positive sizes, e.g. 8x64x56x56")
    default_dtypes = list(DTYPES) if args.device == "cuda" else ["fp32"]
    args.dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; known: {list(DTYPES)}")
    return args


def run_gpu(args, results, settings, configs, save, device):
    """The GPU stages, each held to its share of the budget, the report saved after each (``device``
    is a parameter so that the tests can run this plumbing on the CPU)."""
    meta = results["meta"]
    deadline = STARTED + args.budget_s
    stage_end = {name: STARTED + share * args.budget_s for name, share in STAGE_ENDS.items()}
    plans = plan_configs(configs, device)
    results["plans"] = plans
    if any("error" in p for row in plans for p in row["plans"].values()):
        meta["notes"].append("kernel plans: some could not be planned (see the plan table)")
    jobs = None if args.no_profile else []
    run_configs(configs, KERNEL_VARIANTS, device, settings, stage_end["timing"], jobs,
                results["records"].extend, {(tuple(r["shape"]), r["dtype"]): r["plans"] for r in plans})
    save()  # a run stopped later still leaves the main table
    if not args.no_e2e:
        seconds = max(0.2, 0.3 * (stage_end["e2e"] - time.time()))
        results["e2e"] += [measure_e2e(v, device, settings, seconds) for v in ("cmbn", "batchnorm")]
    if jobs is not None:
        by_key = {record_key(r): r for r in results["records"]}
        if not count_launches(jobs, device, stage_end["launches"],
                              lambda key, n: by_key[key].update(launches=n)):
            meta["notes"].append("kernel launches: not all counted within the time budget")
    save()
    del jobs
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the subprocess gets the GPU's memory
    worker_deadline = deadline - REPORT_RESERVE_S
    left = worker_deadline - time.time()
    eager_share = 0.9 if args.no_compile else WORKER_EAGER_SHARE
    records, e2e, notes = run_pure_subprocess(
        device, configs, settings, deadline=worker_deadline, eager_end=time.time() + eager_share * left,
        compile_end=worker_deadline - (0 if args.no_profile else WORKER_COUNT_SHARE * left),
        compile_=not args.no_compile, e2e=not args.no_e2e, profile_launches=not args.no_profile)
    done = {record_key(r) for r in records}
    for shape, dtype_key in configs:
        for variant in ("pure",) if args.no_compile else ("pure", "compiled"):
            records += [r for r in skipped(shape, dtype_key, variant,
                                           "not reached by the pure-PyTorch subprocess")
                        if record_key(r) not in done]
    results["records"] += records
    results["e2e"] += e2e
    meta["notes"] += notes
    compiles = [f"{r['dtype']} {r['pass']} {r['compile_s']}s ({r.get('graphs')} graphs)"
                for r in records if r.get("compile_s") is not None]
    if compiles:
        meta["notes"].append("torch.compile times (not in the table): " + ", ".join(compiles))


def plan_configs(configs, device):
    """The kernel plans of every (shape, dtype) under each CMBN_KERNEL_PATH, with modeled traffic."""
    rows = []
    for shape, dtype_key in configs:
        rows += traffic_model.collect_plans([shape], {dtype_key: DTYPES[dtype_key]}, device,
                                            cmbn_ext.kernel_plan)
    return rows


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/benchmark.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    settings = SETTINGS["quick" if args.quick else device.type]
    configs = [(shape, dtype_key) for dtype_key in args.dtypes for shape in args.shapes]
    variants = GPU_VARIANTS if device.type == "cuda" else cpu_variants()
    results = {"meta": collect_meta(device, args, settings), "variants": variants, "records": [],
               "e2e": [],
               "e2e_description": E2E_DESCRIPTION if device.type == "cuda" else CPU_E2E_DESCRIPTION}
    meta = results["meta"]

    def save():
        meta["elapsed_s"] = round(time.time() - STARTED, 1)
        return report.write(results, args.out)

    meta["copy_bandwidth_bytes_per_s"] = timing.copy_bandwidth(device)
    if device.type == "cuda":
        run_gpu(args, results, settings, configs, save, device)
    else:
        run_cpu(args, results, settings, configs, save, device)
    json_path, md_path, text = save()
    print(text)
    if device.type == "cpu":
        with open(json_path) as f:
            for item in json.load(f)["summary"]:
                print(f"CPU fwd+bwd {item['ratio']}: median {shown_ratio(item['median'])}, worst "
                      f"{shown_ratio(item['worst'])} over {item['shapes']} shapes; end-to-end step "
                      f"{shown_ratio(item['e2e'])}")
    print(target_summary(json_path))
    print(f"wrote {json_path} and {md_path} in {time.time() - STARTED:.0f}s")
    return 0


def cpu_variants():
    """The CPU table's (variant, label) pairs; without the CPU kernels the CmBN column says so."""
    if cpu_kernels_loaded():
        return CPU_VARIANTS
    return [(key, "CmBN pure PyTorch (the CPU kernels are not loaded)" if key == "cmbn" else label)
            for key, label in CPU_VARIANTS]


def run_cpu(args, results, settings, configs, save, device):
    """The CPU stages: in this process the end-to-end step and the shapes (CmBN, BatchNorm2d, the
    article's sample), until half of the budget; then the pure-PyTorch subprocess (the end-to-end step,
    pure CmBN and BatchNorm2d) until the budget's end. The report is saved after this process's part."""
    meta = results["meta"]
    deadline = STARTED + args.budget_s - REPORT_RESERVE_S
    # Half the time each: this process times five calls a shape, the subprocess four but pays for its
    # start.
    own_end = time.time() + 0.5 * (deadline - time.time())
    if not args.no_e2e:
        results["e2e"] += measure_micro_batch_steps(("cmbn", "batchnorm"), device, settings)
    run_configs(configs, list(CPU_KERNEL_SIDE), device, settings, own_end, None, results["records"].extend,
                side_by_side=True)
    meta["notes"].append("The article's sample runs forward only: its running statistics keep the "
                         "autograd graph, so a second backward fails.")
    if not cpu_kernels_loaded():
        meta["notes"].append("The CPU kernels of cmbn_ext._C are not loaded: the CmBN column is the "
                             "pure-PyTorch path as well.")
    save()  # a run stopped later still leaves this process's table
    records, e2e, notes = run_pure_subprocess(
        device, configs, settings, deadline=deadline, eager_end=deadline, compile_end=deadline,
        compile_=False, e2e=not args.no_e2e, profile_launches=False, side_by_side=True,
        threads=torch.get_num_threads())
    done = {record_key(r) for r in records}
    for shape, dtype_key in configs:
        for variant in CPU_PURE_SIDE:
            records += [r for r in skipped(shape, dtype_key, variant,
                                           "not reached by the pure-PyTorch subprocess")
                        if record_key(r) not in done]
    results["records"] += records
    results["e2e"] += e2e
    meta["notes"] += notes


def shown_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def target_summary(json_path):
    """One line for the end of the log (bench/gpu_check.sh shows the last three lines)."""
    with open(json_path) as f:
        targets = json.load(f)["targets"]
    met = sum(1 for t in targets if t["met"])
    missed = [f"{t['target']}: {report.shown(t)} vs {t['goal']}" for t in targets if t["met"] is False]
    unknown = sum(1 for t in targets if t["met"] is None)
    return (f"targets met: {met} of {len(targets)}" + (f", not measured: {unknown}" if unknown else "")
            + (f"; missed: {'; '.join(missed)}" if missed else ""))


def main(argv=None):
    args = parse_args(argv)
    if args.worker_plan:
        return run_worker(args.worker_plan)
    if args.fused_activation:
        return run_fused_activation(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
