"""Results of the CmBN benchmark as JSON and as a markdown table, with the project's targets checked.

The benchmark hands over a flat list of measurement records (one per shape, dtype, pass and variant,
each with its time or the error that stopped it); this module pivots them into one row per shape,
dtype and pass, adds the ratios and the share of the memory floor, checks the targets and writes
``<out>/<device>.json`` and ``<out>/<device>.md``.
"""
import json
import math
import os
import re
import statistics

import traffic_model
from shapes import CPU_TARGET_SHAPES

# Bytes that must move per element of x: forward reads x and writes y; backward reads x and dy and
# writes dx. A forward+backward row moves both.
FLOOR_BYTES_PER_X_BYTE = {"fwd": 2, "fwd+bwd": 5}
LARGE_SHAPE_BYTES = 16 * 2**20  # the memory-floor target applies from this size of x up

GPU_TARGETS = {"vs_batchnorm": 0.8, "floor_share": 0.8, "vs_pure": 5.0}
# CPU, one thread, fwd+bwd: CmBN on its kernels / BatchNorm2d, median and worst over CPU_TARGET_SHAPES;
# the end-to-end step (CmBN step / BatchNorm2d step).
CPU_TARGETS = {"median": 1.10, "worst": 1.25, "e2e": 1.25}
# The CPU ratios summarized: (title, ratio column, the end-to-end step's (numerator, denominator)).
CPU_SUMMARY = [("CmBN kernels / BatchNorm2d", "CmBN/BN", ("cmbn", "batchnorm")),
               ("pure PyTorch / BatchNorm2d", "pure/BN", ("pure", "pure_batchnorm"))]

SHORT = {"cmbn": "CmBN", "cmbn_two_pass": "2P", "cmbn_single_read": "SR", "batchnorm": "BN",
         "pure": "pure", "compiled": "compiled", "pure_batchnorm": "pBN",
         "sample": "sample"}  # column titles; the legend under "Per shape" gives each variant's label
RATIO_COLUMNS = {  # column title -> (numerator variant, denominator variant)
    "CmBN/BN": ("cmbn", "batchnorm"),
    "2P/BN": ("cmbn_two_pass", "batchnorm"),
    "SR/BN": ("cmbn_single_read", "batchnorm"),
    "SR/2P": ("cmbn_single_read", "cmbn_two_pass"),
    "pure/BN": ("pure", "pure_batchnorm"),  # both timed in the pure-PyTorch process
    "pure/CmBN": ("pure", "cmbn"),
    "compiled/CmBN": ("compiled", "cmbn"),
    "sample/BN": ("sample", "batchnorm"),
}


def results_stem(device_name, device_type):
    """File name (no extension) for a device: ``cpu-<model>`` or the GPU's name, lower-case, dashed."""
    name = re.sub(r"\((?:R|TM|r|tm)\)|\bCPU\b|\bProcessor\b|@.*$", " ", device_name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"cpu-{slug}" if device_type == "cpu" else slug


def shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def build_rows(results):
    """One row per (shape, dtype, pass) in the order measured, with times, ratios and floor shares."""
    bandwidth = results["meta"].get("copy_bandwidth_bytes_per_s")
    rows, index = [], {}
    for record in results["records"]:
        key = (tuple(record["shape"]), record["dtype"], record["pass"])
        if key not in index:
            x_bytes = record["x_bytes"]
            floor_bytes = FLOOR_BYTES_PER_X_BYTE[record["pass"]] * x_bytes
            index[key] = len(rows)
            rows.append({
                "shape": list(record["shape"]), "dtype": record["dtype"], "pass": record["pass"],
                "x_bytes": x_bytes, "floor_bytes": floor_bytes,
                "floor_ms": floor_bytes / bandwidth * 1e3 if _finite(bandwidth) else None,
                "variants": {},
            })
        rows[index[key]]["variants"][record["variant"]] = record
    for row in rows:
        times = {name: r.get("median_ms") for name, r in row["variants"].items()
                 if not r.get("error") and _finite(r.get("median_ms"))}
        row["ratios"] = {title: times[a] / times[b] for title, (a, b) in RATIO_COLUMNS.items()
                         if a in times and b in times}
        row["floor_share"] = ({name: row["floor_ms"] / t for name, t in times.items()}
                              if row["floor_ms"] else {})
    return rows


def _miss(measured, goal, higher_is_better):
    """How far a measured value is from its goal, in words ('' when met)."""
    if higher_is_better and measured >= goal or not higher_is_better and measured <= goal:
        return ""
    if higher_is_better:
        return f"missed by {goal - measured:.2f} (needs {goal / measured:.2f}x more)"
    return f"missed by {measured - goal:.2f} (CmBN must take {100 * (1 - goal / measured):.0f}% less time)"


def _target(name, goal, measured, met, miss, detail="", unit="ratio"):
    """One checked target; ``unit`` says how ``measured`` reads: "ratio", "speed-up" or "share"."""
    return {"target": name, "goal": goal, "measured": measured, "unit": unit, "met": met, "miss": miss,
            "detail": detail}


def shown(target):
    value = target["measured"]
    if value is None:
        return "-"
    return {"share": f"{100 * value:.0f}%", "speed-up": f"{value:.2f}x"}.get(target["unit"], f"{value:.2f}")


def evaluate_targets(rows, device_type, dtypes, e2e=()):
    """The project's targets against the rows (and, on the CPU, the end-to-end records ``e2e``): a list
    of {target, goal, measured, met, miss, detail}.

    ``met`` is None when the rows hold no measurement for it (a failed or skipped variant).
    """
    if device_type == "cpu":
        return _cpu_targets(rows, e2e)
    targets = []
    goal = GPU_TARGETS["vs_batchnorm"]
    for dtype in dtypes:
        ratios = [r["ratios"]["CmBN/BN"] for r in rows
                  if r["dtype"] == dtype and r["pass"] == "fwd+bwd" and "CmBN/BN" in r["ratios"]]
        name = f"CmBN fwd+bwd / BatchNorm2d, median over shapes, {dtype}"
        if not ratios:
            targets.append(_target(name, f"<= {goal}", None, None, "not measured"))
            continue
        median = statistics.median(ratios)
        targets.append(_target(name, f"<= {goal}", median, median <= goal,
                               _miss(median, goal, False), f"{len(ratios)} shapes, worst {max(ratios):.2f}"))
    goal = GPU_TARGETS["floor_share"]
    large = [r for r in rows if r["x_bytes"] >= LARGE_SHAPE_BYTES and "cmbn" in r["floor_share"]]
    name = f"CmBN share of the memory floor, shapes with x >= {LARGE_SHAPE_BYTES >> 20} MiB"
    if not large:
        targets.append(_target(name, f">= {goal:.0%}", None, None, "not measured"))
    else:
        worst = min(large, key=lambda r: r["floor_share"]["cmbn"])
        share = worst["floor_share"]["cmbn"]
        below = sum(1 for r in large if r["floor_share"]["cmbn"] < goal)
        miss = "" if share >= goal else (f"missed by {100 * (goal - share):.0f} points on the worst row; "
                                         f"{below} of {len(large)} rows below")
        targets.append(_target(name, f">= {goal:.0%}", share, share >= goal, miss,
                               f"worst {shape_text(worst['shape'])} {worst['dtype']} {worst['pass']}",
                               unit="share"))
    goal = GPU_TARGETS["vs_pure"]
    for dtype in dtypes:
        speedups = [r["ratios"]["pure/CmBN"] for r in rows
                    if r["dtype"] == dtype and r["pass"] == "fwd+bwd" and "pure/CmBN" in r["ratios"]]
        name = f"CmBN fwd+bwd speed-up over the pure-PyTorch path, median over shapes, {dtype}"
        if not speedups:
            targets.append(_target(name, f">= {goal}x", None, None, "not measured"))
            continue
        median = statistics.median(speedups)
        targets.append(_target(name, f">= {goal}x", median, median >= goal,
                               _miss(median, goal, True), f"worst {min(speedups):.2f}x", unit="speed-up"))
    return targets


def cpu_summary(rows, e2e):
    """Per CPU_SUMMARY ratio: the fwd+bwd median and worst over the CPU_TARGET_SHAPES measured, and the
    end-to-end step's ratio; None where not measured."""
    targets = [list(shape) for shape in CPU_TARGET_SHAPES]
    steps = {r["variant"]: r.get("median_ms") for r in e2e if not r.get("error")}
    summary = []
    for title, column, (numerator, denominator) in CPU_SUMMARY:
        ratios = {tuple(r["shape"]): r["ratios"][column] for r in rows
                  if r["pass"] == "fwd+bwd" and r["shape"] in targets and column in r["ratios"]}
        worst = max(ratios, key=ratios.get) if ratios else None
        step = (steps[numerator] / steps[denominator]
                if _finite(steps.get(numerator)) and _finite(steps.get(denominator)) else None)
        summary.append({"ratio": title, "column": column, "shapes": len(ratios),
                        "median": statistics.median(ratios.values()) if ratios else None,
                        "worst": ratios[worst] if ratios else None,
                        "worst_shape": list(worst) if worst else None, "e2e": step})
    return summary


def _cpu_targets(rows, e2e):
    kernels = cpu_summary(rows, e2e)[0]
    shapes = f"the {len(CPU_TARGET_SHAPES)} CPU target shapes"
    partial = (f"{kernels['shapes']} of {len(CPU_TARGET_SHAPES)} shapes measured"
               if kernels["shapes"] < len(CPU_TARGET_SHAPES) else "")
    checks = [
        (f"CmBN fwd+bwd / BatchNorm2d, median over {shapes}", "median", kernels["median"], partial),
        (f"CmBN fwd+bwd / BatchNorm2d, worst of {shapes}", "worst", kernels["worst"],
         ", ".join(x for x in (kernels["worst_shape"] and shape_text(kernels["worst_shape"]), partial) if x)),
        ("CmBN optimizer step / BatchNorm2d step, 6-layer net, 16 micro-batches of 1, sliding window 16",
         "e2e", kernels["e2e"], ""),
    ]
    targets = []
    for name, key, measured, detail in checks:
        goal = CPU_TARGETS[key]
        if measured is None:
            targets.append(_target(name, f"<= {goal}", None, None, "not measured"))
        else:
            targets.append(_target(name, f"<= {goal}", measured, measured <= goal,
                                   _miss(measured, goal, False), detail))
    return targets


def summary_markdown(summary):
    """The CPU summary as a table."""
    lines = ["## Summary", "", f"fwd+bwd ratios over the CPU target shapes "
             f"({', '.join(shape_text(s) for s in CPU_TARGET_SHAPES)}), each ratio measured within one "
             "process; the end-to-end step's ratio.", "",
             "| ratio | median | worst | shapes | end-to-end step |", "| --- | --- | --- | --- | --- |"]

    def value(number):
        return "-" if number is None else f"{number:.2f}"
    for item in summary:
        worst = value(item["worst"]) + (f" {shape_text(item['worst_shape'])}" if item["worst_shape"] else "")
        lines.append(f"| {item['ratio']} | {value(item['median'])} | {worst} | {item['shapes']} | "
                     f"{value(item['e2e'])} |")
    return lines


# ------------------------------------------------------------------------------------------ markdown
def _ms(value):
    if not _finite(value):
        return "-"
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.01, 3)):
        if value >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.4f}"


def _cell(record):
    if record is None:
        return "-"
    if record.get("error"):
        return "skipped" if record["error"].startswith("skipped") else "error"
    return _ms(record.get("median_ms"))


def _launches(row, variants):
    counts = []
    for name in variants:
        value = row["variants"].get(name, {}).get("launches")
        counts.append("-" if value is None else f"{value:g}")
    return " / ".join(counts)


def markdown(results, rows, targets, summary=None):
    meta = results["meta"]
    variants = results["variants"]  # [(key, label)] in column order
    keys = [key for key, _ in variants]
    lines = [f"# CmBN benchmark: {meta['device_name']}", ""]
    for label, key in (("date", "date"), ("device", "device_name"), ("torch", "torch_version"),
                       ("CUDA", "cuda_version"), ("CmBN kernels loaded", "kernels_loaded"),
                       ("host", "host"), ("wall time (s)", "elapsed_s")):
        if meta.get(key) is not None:
            lines.append(f"- {label}: {meta[key]}")
    bandwidth = meta.get("copy_bandwidth_bytes_per_s")
    if _finite(bandwidth):
        lines.append(f"- copy bandwidth (measured here, bytes read + written): {bandwidth / 1e9:.0f} GB/s")
    lines += ["", "**Method.** " + meta["method"], ""]
    lines += ["## Targets", "", "| target | goal | measured | status |", "| --- | --- | --- | --- |"]
    for t in targets:
        measured = shown(t)
        if t["met"] is None:
            status = t["miss"] or "not measured"
        else:
            status = "met" if t["met"] else f"**MISSED**: {t['miss']}"
        detail = f" ({t['detail']})" if t["detail"] else ""
        lines.append(f"| {t['target']} | {t['goal']} | {measured}{detail} | {status} |")
    if summary:
        lines += [""] + summary_markdown(summary)
    lines += ["", "## Per shape", "", "Times are medians in ms per call; ratios are of those medians; "
              "floor share = memory-floor time / measured time."]
    ratio_titles = [t for t, (a, b) in RATIO_COLUMNS.items() if a in keys and b in keys]
    floor_keys = [k for k in ("cmbn", "cmbn_two_pass", "cmbn_single_read", "batchnorm") if k in keys]
    header = (["shape", "dtype", "pass", "x MB"] + [f"{SHORT[k]} ms" for k in keys]
              + ratio_titles + ["floor ms"] + [f"{SHORT[k]} % floor" for k in floor_keys])
    with_launches = any(r.get("launches") is not None for r in results["records"])
    if with_launches:
        header.append("kernels/call (" + " / ".join(SHORT[k] for k in keys) + ")")
    lines.append("Columns: " + "; ".join(f"{SHORT[k]} = {label}" for k, label in variants) + ".")
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [shape_text(row["shape"]), row["dtype"], row["pass"], f"{row['x_bytes'] / 1e6:.1f}"]
        cells += [_cell(row["variants"].get(key)) for key in keys]
        cells += [f"{row['ratios'][t]:.2f}" if t in row["ratios"] else "-" for t in ratio_titles]
        cells.append(_ms(row["floor_ms"]))
        cells += [f"{100 * row['floor_share'][k]:.0f}%" if k in row["floor_share"] else "-"
                  for k in floor_keys]
        if with_launches:
            cells.append(_launches(row, keys))
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("e2e"):
        lines += ["", "## End-to-end training step", "", results["e2e_description"], "",
                  "| variant | step ms | p25-p75 ms | / BatchNorm2d |", "| --- | --- | --- | --- |"]
        e2e = {r["variant"]: r for r in results["e2e"]}
        for key, label in variants:
            r = e2e.get(key)
            if r is None:
                continue
            if r.get("error"):
                lines.append(f"| {label} | {_cell(r)} | - | - |")
                continue
            # Each step against the BatchNorm2d step of its own process where that was timed.
            own = key in ("pure", "pure_batchnorm") and "pure_batchnorm" in e2e
            baseline = "pure_batchnorm" if own else "batchnorm"
            base = e2e.get(baseline, {}).get("median_ms")
            ratio = f"{r['median_ms'] / base:.2f}" if _finite(base) else "-"
            lines.append(f"| {label} | {_ms(r['median_ms'])} | {_ms(r['p25_ms'])}-{_ms(r['p75_ms'])} "
                         f"| {ratio} |")
    if results.get("plans"):
        lines += [""] + traffic_model.plan_markdown(results["plans"])
    errors = _error_notes(results)
    notes = list(meta.get("notes", []))
    if errors or notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _error_notes(results):
    """One line per distinct error message, with the rows it hit."""
    labels = dict(results["variants"])
    grouped = {}
    for r in list(results["records"]) + list(results.get("e2e", [])):
        if r.get("error"):
            where = (f"{shape_text(r['shape'])} {r['dtype']} {r['pass']}" if "shape" in r
                     else "end-to-end step")
            grouped.setdefault((labels.get(r["variant"], r["variant"]), r["error"]), []).append(where)
    notes = []
    for (label, error), where in grouped.items():
        place = where[0] if len(where) == 1 else f"{len(where)} rows, e.g. {where[0]}"
        notes.append(f"{label}: {error} ({place})")
    return notes


def write(results, out_dir):
    """Write ``<out_dir>/<stem>.json`` and ``.md``; returns (json path, md path, markdown text)."""
    rows = build_rows(results)
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    cpu = results["meta"]["device_type"] == "cpu"
    targets = evaluate_targets(rows, results["meta"]["device_type"], dtypes, results.get("e2e", ()))
    summary = cpu_summary(rows, results.get("e2e", ())) if cpu else None
    text = markdown(results, rows, targets, summary)
    os.makedirs(out_dir, exist_ok=True)
    stem = results_stem(results["meta"]["device_name"], results["meta"]["device_type"])
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    document = dict(results, targets=targets, summary=summary, rows=[
        {k: v for k, v in row.items() if k != "variants"} for row in rows])
    with open(json_path, "w") as f:
        json.dump(_finite_only(document), f, indent=1, allow_nan=False)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(text)
    return json_path, md_path, text


def _finite_only(value):
    """The document with NaN and infinities as null: strict JSON, and never a number that is not one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value
