"""The demo's report: scores summed up over seeds, the markdown tables, the plot and the JSON record."""
import dataclasses
import json
import os
import statistics

from .demo_training import METHODS, best_lr


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
             "measured after the training runs, on the same machine and load. "
             + ("The GPU columns are not measured: no GPU on this machine."
                if machine["gpu"] is None else
                f"GPU: {machine['gpu']}, CUDA kernels "
                f"{'loaded' if machine['cuda_kernels'] else 'not loaded'}."),
             ""]
    for task in tasks:
        lines += [f"## {task.name.capitalize()}", "", task.describe(), ""]
        for model in task.models:
            lines += [f"**Model `{model}`**: test {task.metric} (%) at each method's best learning rate, "
                      f"and time per optimizer step (ms)", "",
                      headline_table(summary, task, model, machine["gpu"] is not None, methods), "",
                      f"Learning-rate sweep (validation {task.metric} %, first seed) and the rate chosen:",
                      "", sweep_table(summary, task, model, methods), ""]
    return "\n".join(lines)


def plot(summary, tasks, path, methods=METHODS):
    """Test score against micro-batch size, a panel per task and model, error bars = std over seeds;
    full-batch methods as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, model) for task in tasks for model in task.models]
    colors = {"BatchNorm, full batch": "black", "BatchNorm, micro-batch": "tab:red",
              "CmBN cumulative": "tab:blue", "CmBN sliding": "tab:orange", "CmBN EMA": "tab:green",
              "GroupNorm": "tab:purple", "CmBN cumulative, grad=exact": "tab:blue"}
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.6, 4.4), squeeze=False)
    for axis, (task, model) in zip(axes[0], panels):
        for index, method in enumerate(methods):
            entries = [e for e in summary
                       if (e["task"], e["model"], e["method"]) == (task.name, model, method.name)]
            xs = [e["micro_batch"] for e in entries]
            ys = [100 * e["test"] for e in entries]
            color = colors.get(method.name, "gray")
            if method.full_batch:  # one legend for every panel: no optimizer batch size in the label
                axis.axhline(ys[0], color=color, linestyle=":",
                             label=f"{method.name} (at the optimizer batch)")
                axis.axhspan(ys[0] - 100 * entries[0]["test_std"], ys[0] + 100 * entries[0]["test_std"],
                             color=color, alpha=0.08)
                continue
            # A small sideways shift per method keeps the error bars apart.
            shifted = [x * 2 ** ((index - len(methods) / 2) * 0.02) for x in xs]
            axis.errorbar(shifted, ys, yerr=[100 * e["test_std"] for e in entries], color=color,
                          linestyle="--" if method.ablation else "-", marker="o", markersize=3,
                          capsize=2, label=method_label(method, task).replace("*", ""))
        axis.set_xscale("log", base=2)
        axis.set_xticks(task.micro_batches, [str(m) for m in task.micro_batches])
        axis.set_xlabel(f"micro-batch size (optimizer batch {task.optimizer_batch})")
        axis.set_ylabel(f"test {task.metric} (%)")
        axis.set_title(f"{task.name}, model {model}")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center right")
    seeds = len(tasks[0].seeds)
    figure.suptitle(f"CmBN vs BatchNorm and GroupNorm, each at its best learning rate; mean ± std over "
                    f"{seeds} seed(s)")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out_dir, tasks, results, timings, record, methods=METHODS):
    """results.md, results.png and results.json in ``out_dir``; returns the markdown and the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results, tasks, timings, methods)
    text = markdown(summary, tasks, record, methods)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    plot(summary, tasks, os.path.join(out_dir, "results.png"), methods)
    full = dict(record, tasks={task.name: dict(dataclasses.asdict(task), protocol=task.describe())
                               for task in tasks},
                methods=[dataclasses.asdict(m) for m in methods], summary=summary,
                runs=sorted(results, key=lambda r: (r["task"], r["model"], r["method"], r["micro_batch"],
                                                    r["lr"], r["seed"])))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(full, f, indent=1)
    return text, summary
