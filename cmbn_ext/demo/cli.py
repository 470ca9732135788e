"""Small-batch training demo: what CmBN buys over BatchNorm on micro-batches, and what it costs, offline.

    python -m cmbn_ext.demo [--quick] [--out DIR] [--device cpu|cuda] [--workers N] [--render-only]

Two tasks, trained with gradient accumulation: every run of a task uses the same optimizer batch, split
into micro-batches, and the normalization layers are the only thing that changes between methods.

1. Segmentation (the main part, ``shapes``): a U-Net on 32x32 images of shapes drawn by
   scikit-image, optimizer batch 16 in micro-batches of 1, 2 and 4, scored by mean IoU.
2. Classification (``digits``): a small CNN on scikit-learn's 8x8 digits, optimizer batch 32 in
   micro-batches of 2, 4 and 8, with a BatchNorm1d that sees 2 values per channel at micro-batch 2.

Methods (``training.METHODS``): BatchNorm on the full optimizer batch (the ceiling), BatchNorm per
micro-batch (what gradient accumulation gives), CmBN in cumulative, sliding, EMA and deferred mode with the
default gradient (deferred pools the window for the running statistics only), GroupNorm, and, as an
ablation, cumulative CmBN with ``grad="exact"``. Each method gets the same learning-rate sweep and is
reported at its best rate on a validation split; then the time per optimizer step of each, on the CPU
and, when there is one, on the GPU.

Output: a progress bar, then the headline table (segmentation) on stdout; ``results.md`` (protocol,
machine, every table), ``results.png`` (plot) and ``results.json`` (every run) in ``demo_results/``, which
git ignores (``--out`` to change; the committed run is ``results/demo/``). ``--render-only`` rewrites
results.md and results.png from a results.json. Needs the ``demo`` extra (scikit-image, scikit-learn,
matplotlib, tqdm): ``pip install -e ".[demo]"``.
"""
import argparse
import datetime
import os
import platform
import resource
import sys
import time

import torch

import cmbn_ext

from .. import ops
from . import report
from .digits import DigitsClassification
from .shapes import ShapesSegmentation
from .training import expected_seconds, run_sweep, time_all

DEFAULT_OUT = "demo_results"  # untracked (.gitignore): a run must not overwrite the committed results
TASKS = (ShapesSegmentation(), DigitsClassification())
QUICK_TASKS = (  # seconds: every method, micro-batch and code path, on a few images for a few steps
    ShapesSegmentation(seeds=(0, 1), learning_rates=(1e-3, 1e-2), steps=2, split_sizes=(32, 16, 16)),
    DigitsClassification(seeds=(0, 1), learning_rates=(0.03, 0.3), steps=2, split_sizes=(64, 32, 32)),
)
TIMING_STEPS = 9  # rounds: a median that one busy moment of the machine does not move
QUICK_TIMING_STEPS = 1


def machine_description():
    """What the times depend on: CPU model and cores, GPU, load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "cuda_kernels": cmbn_ext.has_cuda_kernels() if gpu else False,
            # the compiled extension also serves the CPU (C++ autograd): it changes the times per step
            "cpp_autograd": ops.HAS_CPP_AUTOGRAD,
            "load_before": _load(), "platform": platform.platform()}


def _load():
    try:
        return round(os.getloadavg()[0], 2)  # the 1-minute load average
    except OSError:
        return None


def _cpu_seconds():
    """CPU time of this process and its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

# ------------------------------------------------------------------------------------------ progress


class Progress:
    """The sweep's progress bar (tqdm, on stderr). It counts each run's expected seconds, not runs: runs
    differ 30-fold in length, so a count of runs makes a poor clock. tqdm's average rate since the start
    then turns the expected seconds left into wall time, whatever the workers and the cost of scoring."""

    def __init__(self, tasks, stream=sys.stderr):
        self.tasks, self.stream = tasks, stream

    def start(self, runs_per_config):
        from tqdm import tqdm  # the demo extra

        self.expected = expected_seconds(self.tasks, list(runs_per_config))
        self.runs, self.done = sum(runs_per_config.values()), 0
        total = sum(self.expected[config] * runs for config, runs in runs_per_config.items())
        self.bar = tqdm(total=total, desc="training", file=self.stream, smoothing=0,
                        mininterval=1 if self.stream.isatty() else 30,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left"
                                   "{postfix}")
        self.bar.set_postfix_str(f"0/{self.runs} runs", refresh=False)

    def advance(self, config, label=""):
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.runs} runs", refresh=False)
        self.bar.update(self.expected[config])
        if self.done == self.runs:
            self.bar.close()

# ----------------------------------------------------------------------------------------------- CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cmbn_ext.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="seconds: every method and micro-batch size, a few images and steps, 2 seeds "
                             "and 2 learning rates (a smoke test)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for results.md, results.png, results.json (default {DEFAULT_OUT}; "
                             f"the committed run is in results/demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the training runs (the times per step are measured on the CPU and, "
                             "when there is one, on the GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes (default: 1 with --quick or on CUDA, else up to 2)")
    parser.add_argument("--render-only", action="store_true",
                        help="no training: rewrite results.md and results.png in --out from the "
                             "results.json there (a committed run in the current format)")
    args = parser.parse_args(argv)
    if args.render_only:
        summary, tasks, methods = report.render(args.out)
        print(report.summary_table(summary, tasks, methods))
        print(f"\nRewrote results.md and results.png in {args.out} from its results.json.")
        return 0

    tasks = QUICK_TASKS if args.quick else TASKS
    timing_steps = QUICK_TIMING_STEPS if args.quick else TIMING_STEPS
    workers = args.workers
    if workers is None:
        workers = 1 if args.quick or args.device != "cpu" else min(2, os.cpu_count() or 1)
    kernels_off = "CMBN_DISABLE_KERNELS=1 " if os.environ.get("CMBN_DISABLE_KERNELS") == "1" else ""
    record = {"command": f"{kernels_off}python -m cmbn_ext.demo" + (" --quick" if args.quick else ""),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_description(), "device": args.device, "workers": workers,
              "torch": torch.__version__, "python": platform.python_version(),
              "timing_steps": timing_steps}
    print(f"Device: {args.device}, {workers} worker(s).\n" + "\n".join(t.describe() for t in tasks) + "\n",
          flush=True)

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    results = run_sweep(tasks, args.device, workers, Progress(tasks))
    print("Timing one optimizer step of each method...", file=sys.stderr, flush=True)
    timings = time_all(tasks, ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), timing_steps)
    record.update(wall_seconds=time.perf_counter() - started, cpu_seconds=_cpu_seconds() - cpu_started)
    record["machine"]["load_after"] = _load()

    summary = report.write(args.out, tasks, results, timings, record)
    print(report.summary_table(summary, tasks))
    print(f"\nWrote results.md (every table, the learning-rate sweeps, the times per step and the "
          f"protocol), results.png and results.json to {args.out} ({record['wall_seconds']:.0f} s).")
    diverged = [e for e in summary if e["diverged_runs"]]
    for e in diverged:
        print(f"Diverged at its chosen learning rate: {e['task']} | {e['model']} | {e['method']} | "
              f"micro-batch {e['micro_batch']} | lr {e['lr']:g}", file=sys.stderr)
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
