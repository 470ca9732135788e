"""The demo's report: scores summed up over seeds, the markdown tables, the plot and the JSON record, and
the tables and plot rendered again from a run's JSON."""
import dataclasses
import json
import os
import statistics

from .digits import DigitsClassification
from .shapes import ShapesSegmentation
from .training import METHODS, Method, best_lr


def summarize(results, tasks, timings, methods=METHODS):
    """One entry per task x model x method x micro-batch size: the learning rate chosen on the
    validation split (first seed), and the test score at that rate, mean and spread over the seeds.

    Full-batch methods (run at micro-batch = optimizer batch) fill every micro-batch column with the
    same numbers, marked ``"ran_at_micro_batch"``. ``timings`` maps ``(task, model, method,
    micro-batch, device)`` to milliseconds per optimizer step.
    """
    summary = []
    for task in tasks:
        for model in task.models:
            for method in methods:
                for micro in task.micro_batches:
                    if method.ablation and micro not in task.ablation_micro_batches:
                        continue
                    ran_at = task.optimizer_batch if method.full_batch else micro
                    runs = [r for r in results if (r["task"], r["model"], r["method"], r["micro_batch"])
                            == (task.name, model, method.name, ran_at)]
                    sweep = sorted((r for r in runs if r["seed"] == task.seeds[0]), key=lambda r: r["lr"])
                    chosen = best_lr(sweep)
                    reported = sorted((r for r in runs if r["lr"] == chosen), key=lambda r: r["seed"])
                    entry = {"task": task.name, "model": model, "method": method.name,
                             "ablation": method.ablation, "micro_batch": micro, "ran_at_micro_batch": ran_at,
                             "lr": chosen, "sweep_val": {f"{r['lr']:g}": r["val"] for r in sweep},
                             "seeds": [r["seed"] for r in reported],
                             "diverged_runs": sum(r["diverged"] for r in reported)}
                    for key in ("test", "val", "conv_weight_norm_growth"):
                        values = [r[key] for r in reported]
                        entry[key] = statistics.fmean(values)
                        entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                    for device in ("cpu", "cuda"):
                        entry[f"{device}_ms_per_step"] = timings.get(
                            (task.name, model, method.name, ran_at, device))
                    summary.append(entry)
    return summary


def _cell(value, spread, scale=100, digits=1):
    return f"{scale * value:.{digits}f} ± {scale * spread:.{digits}f}"


def _ms(value):
    return "n/a" if value is None else (f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def _rows(summary, task, model, methods):
    """``(method, [entries, one per micro-batch])`` in the methods' order, ablations last."""
    ordered = [m for m in methods if not m.ablation] + [m for m in methods if m.ablation]
    for method in ordered:
        entries = [e for e in summary
                   if (e["task"], e["model"], e["method"]) == (task.name, model, method.name)]
        yield method, entries


def method_label(method, task):
    label = method.name + (f" (runs at {task.optimizer_batch})" if method.full_batch else "")
    return f"*ablation:* {label}" if method.ablation else label


def headline_table(summary, task, model, gpu_measured, methods=METHODS):
    """Test score (mean ± std over seeds, at each method's best learning rate) and time per optimizer
    step on the CPU and on the GPU, one column per micro-batch size; without a GPU, one GPU column that
    says so."""
    micro = task.micro_batches
    headers = ([f"{task.metric} mb {m}" for m in micro] + [f"CPU ms/step mb {m}" for m in micro]
               + ([f"GPU ms/step mb {m}" for m in micro] if gpu_measured else ["GPU ms/step"]))
    lines = [f"| method | {' | '.join(headers)} |", "|---|" + "---:|" * len(headers)]
    for method, entries in _rows(summary, task, model, methods):
        by_micro = [next((e for e in entries if e["micro_batch"] == m), None) for m in micro]
        cells = [_cell(e["test"], e["test_std"]) if e else "—" for e in by_micro]
        cells += [_ms(e["cpu_ms_per_step"]) if e else "—" for e in by_micro]
        if gpu_measured:
            cells += [_ms(e["cuda_ms_per_step"]) if e else "—" for e in by_micro]
        else:
            cells.append("not measured")
        lines.append(f"| {method_label(method, task)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(summary, task, model, methods=METHODS):
    """The learning-rate sweep (validation score, first seed), the rate chosen, and the conv weight
    norm growth (final / initial) at that rate."""
    lrs = [f"{lr:g}" for lr in task.learning_rates]
    sweep = ["| method | micro-batch | " + " | ".join(f"val {task.metric} at lr {lr}" for lr in lrs)
             + " | chosen lr | val at chosen lr (all seeds) | conv weight norm growth |",
             "|---|---:|" + "---:|" * (len(lrs) + 3)]
    for method, entries in _rows(summary, task, model, methods):
        for e in entries[:1] if method.full_batch else entries:
            ran_at = e["ran_at_micro_batch"]
            cells = [f"{100 * e['sweep_val'][lr]:.1f}" for lr in lrs]
            cells += [f"{e['lr']:g}", _cell(e["val"], e["val_std"]),
                      _cell(e["conv_weight_norm_growth"], e["conv_weight_norm_growth_std"], 1, 2)]
            sweep.append(f"| {method.name} | {ran_at} | " + " | ".join(cells) + " |")
    return "\n".join(sweep)


def gain_over_batchnorm(summary, task, model, micro, methods=METHODS):
    """``(points, method)``: the best CmBN method's test score at micro-batch ``micro`` minus that of
    BatchNorm on each micro-batch, in points; ``None`` when either is missing."""
    scores = {e["method"]: e["test"] for e in summary
              if (e["task"], e["model"], e["micro_batch"]) == (task.name, model, micro)}
    batchnorm = next((m.name for m in methods if m.norm == "batchnorm" and m.cmbn_mode is None
                      and not m.full_batch), None)
    cmbn = [m.name for m in methods if m.cmbn_mode is not None and not m.ablation and m.name in scores]
    if batchnorm not in scores or not cmbn:
        return None
    best = max(cmbn, key=lambda name: scores[name])
    return 100 * (scores[best] - scores[batchnorm]), best


def summary_table(summary, tasks, methods=METHODS):
    """The headline: the first task's (segmentation's) test score per method and micro-batch size, and
    the gain of the best CmBN mode over BatchNorm on each micro-batch; ablations are in the full tables."""
    task = tasks[0]
    model = task.models[0]
    seeds = len(task.seeds)
    micro = task.micro_batches
    lines = [f"{task.name.capitalize()} (model `{model}`): test {task.metric} (%), mean ± std over {seeds} "
             f"seed(s), each method at its best learning rate.", "",
             "| method | " + " | ".join(f"mb {m}" for m in micro) + " |", "|---|" + "---:|" * len(micro)]
    for method, entries in _rows(summary, task, model, methods):
        if method.ablation or not entries:
            continue
        by_micro = {e["micro_batch"]: e for e in entries}
        cells = [_cell(by_micro[m]["test"], by_micro[m]["test_std"]) if m in by_micro else "—"
                 for m in micro]
        lines.append(f"| {method_label(method, task)} | " + " | ".join(cells) + " |")
    gains = [gain_over_batchnorm(summary, task, model, m, methods) for m in micro]
    cells = ["—" if g is None else f"{g[0]:+.1f} ({g[1].removeprefix('CmBN ')})" for g in gains]
    lines.append("| **best CmBN − BatchNorm, micro-batch** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary, tasks, record, methods=METHODS):
    """The whole report: protocol, machine, and per task and model the headline and sweep tables."""
    machine = record["machine"]
    lines = ["# CmBN small-batch demo", "",
             f"Command: `{record['command']}`. Machine: {machine['cpu']}, {machine['cores']} cores, "
             f"{machine['gpu'] or 'no GPU'}; CmBN on the CPU through "
             f"{'the compiled C++ autograd op' if machine['cpp_autograd'] else 'pure PyTorch'}; "
             f"load average {machine['load_before']} before the run and "
             f"{machine['load_after']} after it; {record['date']}; torch {record['torch']}, "
             f"Python {record['python']}. Wall time {record['wall_seconds']:.0f} s, "
             f"{record['cpu_seconds']:.0f} CPU seconds.", "",
             "Protocol, every task: an optimizer batch split into micro-batches with gradient "
             "accumulation (loss / micro-batches per step, one optimizer step per batch). Each method "
             "trains at every learning rate of the task's sweep with the first seed; the rate with the "
             "best validation score then trains with the other seeds, and the tables give the test "
             "score at that rate, mean ± standard deviation over the seeds. A seed sets the initial "
             "weights and the data order, the same for every method. CmBN layers come from "
             "`convert_batchnorm` with window = micro-batches per optimizer step, and "
             "`end_windows_on_step` closes the windows; EMA mode weighs the current micro-batch "
             "2 / (window + 1). Scores are in eval mode (running statistics). Every run is "
             "single-threaded and deterministic: the scores regenerate bit for bit from the command on "
             "the same machine and torch version; the times per step are measurements and do not.", "",
             f"Time per optimizer step: median of {record['timing_steps']} steps after a warm-up step, "
             "one thread, the whole step (every micro-batch's forward and backward, and the optimizer); "
             "on the CPU the thread's CPU time (what the step costs, whatever else the machine runs), "
             "on a GPU the wall time; "
             "measured after the training runs, side by side: each round times one step of every "
             "method and micro-batch of the task in turn, so the machine's load weighs on all alike. "
             + ("The GPU columns are not measured: no GPU on this machine."
                if machine["gpu"] is None else
                f"GPU: {machine['gpu']}, CUDA kernels "
                f"{'loaded' if machine['cuda_kernels'] else 'not loaded'}."),
             "", "## Summary", "", summary_table(summary, tasks, methods), ""]
    for task in tasks:
        lines += [f"## {task.name.capitalize()}", "", task.describe(), ""]
        for model in task.models:
            lines += [f"**Model `{model}`**: test {task.metric} (%) at each method's best learning rate, "
                      f"and time per optimizer step (ms)", "",
                      headline_table(summary, task, model, machine["gpu"] is not None, methods), "",
                      f"Learning-rate sweep (validation {task.metric} %, first seed) and the rate chosen:",
                      "", sweep_table(summary, task, model, methods), ""]
    return "\n".join(lines)


# One colour and one marker per method, so that lines which overlap stay apart; unknown methods get grey.
STYLES = {"BatchNorm, full batch": ("black", None), "BatchNorm, micro-batch": ("tab:red", "o"),
          "CmBN cumulative": ("tab:blue", "s"), "CmBN sliding": ("tab:orange", "^"),
          "CmBN EMA": ("tab:green", "D"), "CmBN deferred": ("tab:brown", "v"),
          "GroupNorm": ("tab:purple", None), "CmBN cumulative, grad=exact": ("tab:cyan", "X")}

PLOT_NOTE = ("Markers with error bars: mean ± std over the seeds at each micro-batch size. Dotted lines "
             "with shaded bands: methods that train at the whole optimizer batch (BatchNorm, full batch; "
             "GroupNorm), the same at every micro-batch size; the band is their mean ± std over the seeds.")


def plot(summary, tasks, path, methods=METHODS):
    """Test score against micro-batch size, a panel per task and model, error bars = std over seeds;
    full-batch methods as horizontal lines with a band of ± std; the legend and a note on the bands below
    the panels."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, model) for task in tasks for model in task.models]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5.8), squeeze=False)
    legend = {}
    for axis, (task, model) in zip(axes[0], panels):
        for index, method in enumerate(methods):
            entries = [e for e in summary
                       if (e["task"], e["model"], e["method"]) == (task.name, model, method.name)]
            if not entries:
                continue
            xs = [e["micro_batch"] for e in entries]
            ys = [100 * e["test"] for e in entries]
            color, marker = STYLES.get(method.name, ("gray", "o"))
            if method.full_batch:  # one legend for every panel: no optimizer batch size in the label
                line = axis.axhline(ys[0], color=color, linestyle=":", linewidth=1.5)
                axis.axhspan(ys[0] - 100 * entries[0]["test_std"], ys[0] + 100 * entries[0]["test_std"],
                             color=color, alpha=0.08)
                legend.setdefault(f"{method.name} (at the optimizer batch; band ± std)", line)
                continue
            # A small sideways shift per method keeps the error bars apart.
            shifted = [x * 2 ** ((index - len(methods) / 2) * 0.03) for x in xs]
            line = axis.errorbar(shifted, ys, yerr=[100 * e["test_std"] for e in entries], color=color,
                                 linestyle="--" if method.ablation else "-", marker=marker or "o",
                                 markersize=6 if method.ablation else 5, capsize=2, linewidth=1.2)
            legend.setdefault(method_label(method, task).replace("*", ""), line)
            if method.ablation and len(xs) == 1:  # a lone point: name it where it stands
                axis.annotate(method.name.split(", ")[-1], (shifted[0], ys[0]), xytext=(6, -3),
                              textcoords="offset points", fontsize=8, color=color)
        axis.set_xscale("log", base=2)
        axis.set_xticks(task.micro_batches, [str(m) for m in task.micro_batches])
        axis.set_xlabel(f"micro-batch size (optimizer batch {task.optimizer_batch})")
        axis.set_ylabel(f"test {task.metric} (%)")
        axis.set_title(f"{task.name}, model {model}")
        axis.grid(alpha=0.3)
    figure.legend(list(legend.values()), list(legend.keys()), fontsize=8, loc="lower center", ncol=3,
                  bbox_to_anchor=(0.5, 0.075), frameon=False)
    figure.text(0.5, 0.015, "\n".join(textwrap.wrap(PLOT_NOTE, 150)), ha="center", va="bottom", fontsize=7.5)
    seeds = len(tasks[0].seeds)
    figure.suptitle(f"CmBN vs BatchNorm and GroupNorm, each at its best learning rate; mean ± std over "
                    f"{seeds} seed(s)")
    figure.tight_layout(rect=(0, 0.22, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out_dir, tasks, results, timings, record, methods=METHODS):
    """results.md, results.png and results.json in ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results, tasks, timings, methods)
    full = dict(record, tasks={task.name: dict(dataclasses.asdict(task), protocol=task.describe())
                               for task in tasks},
                methods=[dataclasses.asdict(m) for m in methods], summary=summary,
                runs=sorted(results, key=lambda r: (r["task"], r["model"], r["method"], r["micro_batch"],
                                                    r["lr"], r["seed"])))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(full, f, indent=1)
    _render(out_dir, summary, tasks, record, methods)
    return summary


def render(out_dir):
    """Rewrite results.md and results.png in ``out_dir`` from its results.json, without training: the
    tables and the plot of a run in the current format, with that run's numbers. Returns the summary,
    the tasks and the methods of that run."""
    with open(os.path.join(out_dir, "results.json")) as f:
        record = json.load(f)
    tasks = [_task_from_json(fields) for fields in record["tasks"].values()]
    methods = [Method(**fields) for fields in record["methods"]]
    _render(out_dir, record["summary"], tasks, record, methods)
    return record["summary"], tasks, methods


def _render(out_dir, summary, tasks, record, methods):
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(summary, tasks, record, methods))
    plot(summary, tasks, os.path.join(out_dir, "results.png"), methods)


def _task_from_json(fields):
    """The task object a results.json entry describes (JSON made its tuples lists)."""
    kind = next(kind for kind in (ShapesSegmentation, DigitsClassification) if kind.name == fields["name"])
    return kind(**{field.name: _tuples(fields[field.name]) for field in dataclasses.fields(kind)
                   if field.name in fields})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
