"""Small-batch training demo: what CmBN buys over BatchNorm on micro-batches, offline.

    python -m cmbn_ext.demo [--quick] [--out DIR] [--device cpu|cuda] [--workers N]

A small CNN learns scikit-learn's 8x8 handwritten digits (they ship inside the scikit-learn wheel, so
nothing is downloaded). Every run uses the same optimizer batch; gradient accumulation splits it into
micro-batches of 2, 4 or 8, and the normalization layers are the only thing that changes:

- BatchNorm on the full optimizer batch (what you would run with enough memory: the reference),
- BatchNorm on each micro-batch (what gradient accumulation gives today),
- CmBN in cumulative, sliding and EMA mode, each with ``grad="renorm"`` and ``grad="exact"``,
- GroupNorm (normalizes each sample alone, so it is the same at every micro-batch size).

Two models: ``conv`` has BatchNorm2d after each conv layer only (every layer sees at least
``micro-batch * 16`` values per channel); ``conv+bn1d`` adds a hidden linear layer with a BatchNorm1d on
the pooled ``(N, C)`` features, which sees only ``micro-batch`` values per channel, 2 at micro-batch 2.
That pair checks the default ``grad`` (SPEC section 4).

Output: a markdown table (``results.md``), a plot of test accuracy against micro-batch size
(``accuracy.png``) and every number (``results.json``) in ``results/demo/`` (``--out`` to change).
Needs the ``demo`` extra (scikit-learn, matplotlib): ``pip install -e ".[demo]"``.
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
import torch.nn as nn
import torch.nn.functional as F

import cmbn_ext

# ------------------------------------------------------------------------------------------ protocol

NUM_DIGITS = 1797  # images in scikit-learn's digits


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything the runs share: data split, model, schedule, seeds."""
    optimizer_batch: int = 32
    micro_batches: tuple = (2, 4, 8)
    seeds: tuple = (0, 1, 2)
    steps: int = 64              # optimizer steps (2 epochs of the training split)
    train_size: int = 1000       # digits 0..1796 split once (split seed 0); the rest is the test set
    test_size: int = 0           # 0: all images not in the training split
    lr: float = 0.1              # SGD, cosine decay to 0 over the steps
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16              # channels of the first conv layer
    models: tuple = ("conv", "conv+bn1d")

    def describe(self):
        test = self.test_size or NUM_DIGITS - self.train_size
        seeds = ", ".join(map(str, self.seeds))
        micro = ", ".join(map(str, self.micro_batches))
        return (f"scikit-learn 8x8 digits, {self.train_size} training and {test} test images (fixed "
                f"split). Models: `conv` = three 3x3 conv layers ({self.width}, {2 * self.width}, "
                f"{2 * self.width} channels) each followed by a norm layer, global average pooling, a "
                f"linear classifier; `conv+bn1d` adds a hidden linear layer whose norm layer sees the "
                f"pooled (N, C) features, i.e. only micro-batch-size values per channel. Optimizer batch "
                f"{self.optimizer_batch}, split into micro-batches of {micro} with gradient accumulation "
                f"(loss / micro-batches per step, one optimizer step per batch); {self.steps} steps of SGD "
                f"(lr {self.lr}, momentum {self.sgd_momentum}, weight decay {self.weight_decay}, cosine "
                f"decay). Seeds {seeds} set the initial weights and the data order, shared by all "
                f"methods. CmBN via convert_batchnorm, window = micro-batches per step (cumulative and "
                f"sliding); EMA weight of the current micro-batch 2 / (window + 1). Test accuracy and "
                f"loss in eval mode (running statistics), mean ± standard deviation over seeds.")


DEFAULT = Protocol()
QUICK = Protocol(seeds=(0,), steps=3, train_size=256, test_size=128)


@dataclasses.dataclass(frozen=True)
class Method:
    """One normalization choice. ``full_batch`` methods train the same way at every micro-batch size
    (BatchNorm on the whole optimizer batch; GroupNorm, which never mixes samples), so they run once,
    at micro-batch = optimizer batch, and that result stands for every column."""
    name: str
    norm: str = "batchnorm"      # or "groupnorm"
    cmbn_mode: str = None        # None: the torch layer itself
    grad: str = "renorm"
    full_batch: bool = False


METHODS = (
    Method("BatchNorm, full batch", full_batch=True),
    Method("BatchNorm, micro-batch"),
    Method("CmBN cumulative, renorm", cmbn_mode="cumulative", grad="renorm"),
    Method("CmBN cumulative, exact", cmbn_mode="cumulative", grad="exact"),
    Method("CmBN sliding, renorm", cmbn_mode="sliding", grad="renorm"),
    Method("CmBN sliding, exact", cmbn_mode="sliding", grad="exact"),
    Method("CmBN ema, renorm", cmbn_mode="ema", grad="renorm"),
    Method("CmBN ema, exact", cmbn_mode="ema", grad="exact"),
    Method("GroupNorm", norm="groupnorm", full_batch=True),
)

# -------------------------------------------------------------------------------------------- data


def load_digits_split(protocol):
    """The digits as ``(N, 1, 8, 8)`` float tensors, standardized with the training split's statistics.

    Returns ``{"train": (x, y), "test": (x, y)}``. The split is fixed (seed 0) so every run sees the
    same images.
    """
    from sklearn.datasets import load_digits  # the CSV ships in the wheel: no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train = order[:protocol.train_size]
    test = order[protocol.train_size:]
    if protocol.test_size:
        test = test[:protocol.test_size]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def optimizer_batches(num_images, batch, steps, generator):
    """``steps`` index tensors of ``batch`` training images: reshuffled epochs, last partial batch dropped."""
    batches = []
    while len(batches) < steps:
        batches.extend(torch.randperm(num_images, generator=generator).split(batch)[:num_images // batch])
    return batches[:steps]

# ------------------------------------------------------------------------------------------- model


def norm_layer(kind, channels, bn_momentum):
    """BatchNorm (1d or 2d, picked by the caller through ``kind``) or GroupNorm with 4 channels a group."""
    if kind == "groupnorm":
        return nn.GroupNorm(channels // 4, channels)
    cls = nn.BatchNorm1d if kind == "batchnorm1d" else nn.BatchNorm2d
    return cls(channels, momentum=bn_momentum)


class DigitsNet(nn.Module):
    """Three 3x3 conv layers with a norm layer each, global average pooling, a linear classifier.

    With ``pooled_norm`` a hidden linear layer and a norm layer on the pooled ``(N, C)`` features sit
    before the classifier: as BatchNorm1d it sees only N values per channel.
    """

    def __init__(self, norm="batchnorm", pooled_norm=False, width=16, bn_momentum=0.1):
        super().__init__()
        conv_norm = "groupnorm" if norm == "groupnorm" else "batchnorm2d"
        flat_norm = "groupnorm" if norm == "groupnorm" else "batchnorm1d"
        w1, w2 = width, 2 * width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    norm_layer(conv_norm, c_out, bn_momentum), nn.ReLU()]

        layers = block(1, w1) + block(w1, w2) + [nn.MaxPool2d(2)] + block(w2, w2)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if pooled_norm:
            layers += [nn.Linear(w2, w2, bias=False), norm_layer(flat_norm, w2, bn_momentum), nn.ReLU()]
        layers += [nn.Linear(w2, 10)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def ema_weight(window):
    """The EMA weight whose average has the mean age of a ``window``-long sliding window."""
    return 2.0 / (window + 1)


def build_model(model_name, method, window, width):
    """The model for one run: torch layers, then swapped for CmBN by ``convert_batchnorm`` as a user would.

    In EMA mode the layer's ``momentum`` is the weight of the current micro-batch; ``convert_batchnorm``
    keeps the BatchNorm's momentum, so it is set when the BatchNorm is built.
    """
    bn_momentum = ema_weight(window) if method.cmbn_mode == "ema" else 0.1
    model = DigitsNet(method.norm, pooled_norm=(model_name == "conv+bn1d"), width=width,
                      bn_momentum=bn_momentum)
    if method.cmbn_mode is not None:
        model = cmbn_ext.convert_batchnorm(model, mode=method.cmbn_mode, window=window, grad=method.grad)
    return model


def conv_weight_norm(model):
    """The mean Frobenius norm of the conv weights (``grad="exact"`` lets it grow; SPEC section 4)."""
    norms = [m.weight.norm().item() for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(norms) / len(norms)

# ------------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    method: Method
    micro_batch: int
    seed: int


def plan_runs(protocol, methods=METHODS):
    """Every (model, method, micro-batch, seed); full-batch methods once per model and seed.
    Longest first (small micro-batches, CmBN), so parallel workers finish together."""
    runs = []
    for model in protocol.models:
        for method in methods:
            micro_batches = (protocol.optimizer_batch,) if method.full_batch else protocol.micro_batches
            runs += [Run(model, method, micro, seed) for micro in micro_batches for seed in protocol.seeds]

    def cost(run):
        return (protocol.optimizer_batch / run.micro_batch) * (2 if run.method.cmbn_mode else 1)
    return sorted(runs, key=cost, reverse=True)


@torch.no_grad()
def evaluate(model, images, labels, batch=512):
    """Test accuracy and mean cross-entropy in eval mode (running statistics)."""
    model.eval()
    correct, loss = 0, 0.0
    for x, y in zip(images.split(batch), labels.split(batch)):
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return correct / len(labels), loss / len(labels)


def train_one(run, protocol, data, device):
    """Train one model with gradient accumulation and return its test numbers."""
    started = time.perf_counter()
    per_step = protocol.optimizer_batch // run.micro_batch
    torch.manual_seed(run.seed)  # the same initial weights for every method of this seed
    model = build_model(run.model, run.method, per_step, protocol.width).to(device)
    initial_norm = conv_weight_norm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=protocol.lr, momentum=protocol.sgd_momentum,
                                weight_decay=protocol.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=protocol.steps)
    train_x, train_y = (t.to(device) for t in data["train"])
    order = torch.Generator().manual_seed(run.seed)  # the same data order for every method

    model.train()
    for batch in optimizer_batches(len(train_x), protocol.optimizer_batch, protocol.steps, order):
        optimizer.zero_grad(set_to_none=True)
        for micro in batch.to(device).split(run.micro_batch):
            # Scaled so the accumulated gradient is the mean over the optimizer batch.
            loss = F.cross_entropy(model(train_x[micro]), train_y[micro]) / per_step
            loss.backward()
        optimizer.step()
        schedule.step()  # cumulative windows (window = per_step) close with the step, on their own

    accuracy, test_loss = evaluate(model, *(t.to(device) for t in data["test"]))
    return {"model": run.model, "method": run.method.name, "micro_batch": run.micro_batch,
            "seed": run.seed, "test_accuracy": accuracy, "test_loss": test_loss,
            "conv_weight_norm_growth": conv_weight_norm(model) / initial_norm,
            "seconds": time.perf_counter() - started}


_WORKER = {}


def _init_worker(protocol, device):
    torch.set_num_threads(1)  # tiny layers: one thread per process beats threads inside one process
    _WORKER.update(protocol=protocol, device=device, data=load_digits_split(protocol))


def _train_in_worker(run):
    return train_one(run, _WORKER["protocol"], _WORKER["data"], _WORKER["device"])


def run_all(protocol, device, workers, progress):
    """Train every planned run, ``workers`` processes at a time (1: in this process)."""
    runs = plan_runs(protocol)
    progress.start(len(runs))
    results = []
    if workers <= 1:
        _init_worker(protocol, device)
        for run in runs:
            results.append(_train_in_worker(run))
            progress.advance(f"{run.model} | {run.method.name} | micro-batch {run.micro_batch}")
        return results
    # spawn, not fork: a forked child inherits torch's thread pools and, on CUDA, a broken context.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(protocol, device)) as pool:
        futures = {pool.submit(_train_in_worker, run): run for run in runs}
        for future in as_completed(futures):
            run = futures[future]
            results.append(future.result())
            progress.advance(f"{run.model} | {run.method.name} | micro-batch {run.micro_batch}")
    return results

# ------------------------------------------------------------------------------------------ progress


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place (a line per tenth when stderr is a file)."""

    def __init__(self, stream=sys.stderr, width=30):
        self.stream, self.width = stream, width
        self.interactive = stream.isatty()

    def start(self, total):
        self.total, self.done, self.started, self.last_tenth = total, 0, time.perf_counter(), -1

    def advance(self, label=""):
        self.done += 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done)
        filled = round(self.width * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} runs, "
                f"{_clock(elapsed)} elapsed, ~{_clock(left)} left  {label}")
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
        elif self.done * 10 // self.total != self.last_tenth:
            self.last_tenth = self.done * 10 // self.total
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"

# -------------------------------------------------------------------------------------------- report


def summarize(results, protocol, methods=METHODS):
    """Mean and spread over seeds for every model x method x micro-batch size.

    Full-batch methods (one run per seed) fill every micro-batch column with the same numbers, marked
    ``"ran_at_micro_batch"``.
    """
    summary = []
    for model in protocol.models:
        for method in methods:
            ran_at = None
            for micro in protocol.micro_batches:
                ran_at = protocol.optimizer_batch if method.full_batch else micro
                rows = [r for r in results
                        if (r["model"], r["method"], r["micro_batch"]) == (model, method.name, ran_at)]
                entry = {"model": model, "method": method.name, "micro_batch": micro,
                         "ran_at_micro_batch": ran_at, "seeds": len(rows)}
                for key in ("test_accuracy", "test_loss", "conv_weight_norm_growth"):
                    values = [r[key] for r in rows]
                    entry[key] = statistics.fmean(values)
                    entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                summary.append(entry)
    return summary


def markdown_tables(summary, protocol, methods=METHODS):
    """Per model, two tables (test accuracy in %, test loss), mean ± std over seeds, one column per
    micro-batch size."""
    header = " | ".join(f"micro-batch {m}" for m in protocol.micro_batches)
    metrics = (("test accuracy (%)", "test_accuracy", 100, 1), ("test loss", "test_loss", 1, 3))
    lines = []
    for model in protocol.models:
        for title, key, scale, digits in metrics:
            lines += [f"**Model `{model}`, {title}**", "", f"| method | {header} |",
                      "|---|" + "---:|" * len(protocol.micro_batches)]
            for method in methods:
                entries = [e for e in summary if (e["model"], e["method"]) == (model, method.name)]
                cells = [f"{scale * e[key]:.{digits}f} ± {scale * e[key + '_std']:.{digits}f}"
                         for e in entries]
                name = method.name + (f" (runs at {protocol.optimizer_batch})" if method.full_batch else "")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_accuracy(summary, protocol, path, methods=METHODS):
    """Test accuracy against micro-batch size, one line per method, error bars = std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {None: "black", "cumulative": "tab:blue", "sliding": "tab:orange", "ema": "tab:green"}
    figure, axes = plt.subplots(1, len(protocol.models), figsize=(5 * len(protocol.models) + 2.5, 4.5),
                                squeeze=False)
    for axis, model in zip(axes[0], protocol.models):
        for index, method in enumerate(methods):
            entries = [e for e in summary if (e["model"], e["method"]) == (model, method.name)]
            color = "tab:purple" if method.norm == "groupnorm" else colors[method.cmbn_mode]
            style = ":" if method.full_batch else ("--" if method.grad == "exact" else "-")
            if method.name == "BatchNorm, micro-batch":
                color = "tab:red"
            # A small sideways shift per method keeps the error bars apart.
            xs = [e["micro_batch"] * 2 ** ((index - len(methods) / 2) * 0.015) for e in entries]
            axis.errorbar(xs, [100 * e["test_accuracy"] for e in entries],
                          yerr=[100 * e["test_accuracy_std"] for e in entries], color=color,
                          linestyle=style, marker="o", markersize=3, capsize=2, label=method.name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(protocol.micro_batches, [str(m) for m in protocol.micro_batches])
        axis.set_xlabel(f"micro-batch size (optimizer batch {protocol.optimizer_batch})")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"model {model}")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center right")
    figure.suptitle(f"CmBN on 8x8 digits, mean ± std over {len(protocol.seeds)} seed(s); "
                    f"dotted: same at every micro-batch size, dashed: grad='exact'")
    figure.tight_layout(rect=(0, 0, 0.84, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(out_dir, protocol, results, device, wall_seconds):
    """results.md, accuracy.png and results.json in ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results, protocol)
    tables = markdown_tables(summary, protocol)
    markdown = (f"# CmBN small-batch demo\n\n{protocol.describe()}\n\nDevice: {device}; torch "
                f"{torch.__version__}; wall time {wall_seconds:.0f} s.\n\n"
                f"{tables}")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot_accuracy(summary, protocol, os.path.join(out_dir, "accuracy.png"))
    record = {"protocol": dataclasses.asdict(protocol), "protocol_text": protocol.describe(),
              "methods": [dataclasses.asdict(m) for m in METHODS], "device": device,
              "torch": torch.__version__, "python": platform.python_version(),
              "wall_seconds": wall_seconds, "summary": summary,
              "runs": sorted(results, key=lambda r: (r["model"], r["method"], r["micro_batch"], r["seed"]))}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    return markdown

# ----------------------------------------------------------------------------------------------- CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cmbn_ext.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="seconds: a tiny subset, 1 seed, 3 steps, every method (a smoke test)")
    parser.add_argument("--out", default=os.path.join("results", "demo"),
                        help="folder for results.md, accuracy.png, results.json (default results/demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes (default: 1 with --quick or on CUDA, else up to 2)")
    args = parser.parse_args(argv)

    protocol = QUICK if args.quick else DEFAULT
    workers = args.workers
    if workers is None:
        workers = 1 if args.quick or args.device != "cpu" else min(2, os.cpu_count() or 1)
    print(f"Protocol: {protocol.describe()}\nDevice: {args.device}, {workers} worker(s).\n", flush=True)

    started = time.perf_counter()
    results = run_all(protocol, args.device, workers, ProgressBar())
    wall_seconds = time.perf_counter() - started
    markdown = write_results(args.out, protocol, results, args.device, wall_seconds)
    print(markdown)
    print(f"Wrote results.md, accuracy.png and results.json to {args.out} ({wall_seconds:.0f} s).")
    diverged = [r for r in results if not math.isfinite(r["test_loss"])]
    for r in diverged:
        print(f"Diverged: {r['model']} | {r['method']} | micro-batch {r['micro_batch']} | seed {r['seed']}",
              file=sys.stderr)
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
