"""Bytes the CmBN kernels move between DRAM and the chip for a launch plan, against the floor (a model),
and the table of plans for the benchmark's shapes under each CMBN_KERNEL_PATH.

The model counts each input read and each output written once per pass over it, and nothing that
caches would save: the two-pass path reads x (and grad_y) twice, the single-read path once. On top:
the workspace of a split reduction (one partial summary per channel and split, written once and read
back once; the apply blocks' further reads of the same entries are counted as L2 hits) and the
per-channel vectors. The floor is what any normalization must move: the forward reads x and writes y
(2|x|), the backward reads x and grad_y and writes grad_x (3|x|), plus the same per-channel vectors.
Every figure here is a model, not a measurement.

A fused activation (issue 22) adds no pass: the op reads and writes the same tensors, the backward
reads the output in place of x from the output (memory="lean") and the bias in both policies. The
unfused pair it replaces is the layer without activation, then an activation kernel that reads its
input and writes its output (2|x|) forward, and backward reads the output's gradient and the tensor it
saved and writes the input's gradient (3|x|). ``activation_traffic`` models both for one plan pair.

    python bench/traffic_model.py --emulated [--out bench/results/plan-h100-model.md]
        [--activation-out bench/results/activation-traffic-h100-model.md]

plans the benchmark's shapes with the emulated kernels (tests/emulation: the launchers' own planning
on CPU tensors) on a modeled H100/H200: 132 SMs, and for each kernel pair the blocks per SM
bench/results/sass-sm90.json models. On a GPU, ``--device cuda`` plans them for that GPU (the
benchmark does the same and adds the table to its report).
"""
import argparse
import contextlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PATH_SETTINGS = ("auto", "two_pass", "single_read")  # CMBN_KERNEL_PATH values
SHORT_PATH = {"two_pass": "2P", "single_read": "SR"}
INPUTS = {False: 1, True: 2}  # tensors of x's size a direction reads: x; x and grad_y
HISTORY_SLOTS = 1  # the benchmark's cumulative window keeps one slot of history per channel


# ------------------------------------------------------------------------------------------- model
def partial_entry_bytes(backward, acc_bytes):
    """One channel's partial summary of one split in the workspace: (count int64, mean, M2) forward,
    (sum dy, sum dy * xc) backward."""
    return 2 * acc_bytes if backward else 8 + 2 * acc_bytes


def vector_bytes(channels, backward, acc_bytes, param_bytes=4, history_slots=HISTORY_SLOTS):
    """Per-channel vectors read and written. Forward: weight and bias, the history slots (int64 count,
    mean, var), and mean, var, batch_mean, batch_var and b written. Backward: weight, the five saved
    statistics read, grad_weight and grad_bias written."""
    if backward:
        per_channel = param_bytes + 5 * acc_bytes + 2 * acc_bytes
    else:
        per_channel = 2 * param_bytes + history_slots * (8 + 2 * acc_bytes) + 5 * acc_bytes
    return channels * per_channel


def traffic(plan, shape, element_bytes, backward, acc_bytes=4):
    """Modeled DRAM bytes of one fused op under ``plan`` (a ``cmbn_ext.kernel_plan`` dict) for an input
    of ``shape``, and the floor. Returns {x_bytes, input_reads, workspace_bytes, vector_bytes,
    modeled_bytes, floor_bytes, over_floor}."""
    numel = 1
    for size in shape:
        numel *= size
    x_bytes = numel * element_bytes
    inputs = INPUTS[bool(backward)]
    reads_per_input = 1 if plan["path"] == "single_read" else 2
    splits = plan["grid"][1]
    channels = shape[1]
    workspace = 2 * channels * splits * partial_entry_bytes(backward, acc_bytes) if splits > 1 else 0
    vectors = vector_bytes(channels, backward, acc_bytes)
    floor = (inputs + 1) * x_bytes + vectors
    modeled = (inputs * reads_per_input + 1) * x_bytes + workspace + vectors
    return {"x_bytes": x_bytes, "input_reads": reads_per_input, "workspace_bytes": workspace,
            "vector_bytes": vectors, "modeled_bytes": modeled, "floor_bytes": floor,
            "over_floor": modeled / floor}


# --------------------------------------------------------------------------- fused activation
ACTIVATION_PASSES = {"fwd": 2, "bwd": 3}  # tensors of x's size a separate activation kernel moves
MEMORY_POLICIES = ("standard", "lean")
ACTIVATION_TARGET = 0.55  # issue 22: a fused layer + activation moves at most this share of the pair


def activation_traffic(forward_plan, backward_plan, shape, element_bytes, memory="standard", acc_bytes=4,
                       param_bytes=4):
    """Modeled DRAM bytes of a training step (forward + backward) of CmBN with the activation fused,
    against the unfused pair: the layer under the same plans, then a separate activation kernel.

    Fused, the forward moves what the plain layer moves (act is applied before the store) and the
    backward too, plus the bias (act'(z) needs z): ``standard`` reads x, ``lean`` the output in its
    place, the same bytes (lean saves memory kept for the backward, not traffic). The pair adds the
    activation kernel's passes (ACTIVATION_PASSES). Returns {fused, unfused, ratio} per direction
    ("fwd", "bwd") and for the step ("step"), bytes."""
    if memory not in MEMORY_POLICIES:
        raise ValueError(f"memory must be one of {MEMORY_POLICIES}, got {memory!r}")
    layer = {"fwd": traffic(forward_plan, shape, element_bytes, False, acc_bytes),
             "bwd": traffic(backward_plan, shape, element_bytes, True, acc_bytes)}
    x_bytes = layer["fwd"]["x_bytes"]
    bias_bytes = shape[1] * param_bytes
    result = {}
    for direction in ("fwd", "bwd"):
        fused = layer[direction]["modeled_bytes"] + (bias_bytes if direction == "bwd" else 0)
        unfused = layer[direction]["modeled_bytes"] + ACTIVATION_PASSES[direction] * x_bytes
        result[direction] = {"fused": fused, "unfused": unfused, "ratio": fused / unfused}
    fused = result["fwd"]["fused"] + result["bwd"]["fused"]
    unfused = result["fwd"]["unfused"] + result["bwd"]["unfused"]
    result["step"] = {"fused": fused, "unfused": unfused, "ratio": fused / unfused}
    return result


def closed_form_plan(path, channels):
    """A plan of one launch per channel group, no split (the model then needs no planner)."""
    return {"path": path, "grid": [channels, 1]}


def activation_closed_form_markdown(shape=(8, 64, 56, 56), element_bytes=2):
    """The ratios of each path, for a shape whose per-channel vectors are negligible beside x."""
    lines = [f"Shape {tuple(shape)}, {element_bytes}-byte values; in parentheses the tensors of x's size each "
             "moves, fused / unfused.", "",
             "| path | fwd fused/unfused | bwd fused/unfused | step fused/unfused (bytes) | step ratio |",
             "| --- | --- | --- | --- | --- |"]
    # (tensors of x's size moved fused / unfused, forward and backward; "|" would split the cell)
    for path, formula in (("single_read", "2/4 fwd, 3/6 bwd"), ("two_pass", "3/5 fwd, 5/8 bwd")):
        plan = closed_form_plan(path, shape[1])
        t = activation_traffic(plan, plan, shape, element_bytes)
        lines.append(f"| {path} ({formula}) | {t['fwd']['ratio']:.3f} | {t['bwd']['ratio']:.3f} | "
                     f"{t['step']['fused'] / 1e6:.2f} MB / {t['step']['unfused'] / 1e6:.2f} MB | "
                     f"{t['step']['ratio']:.3f} |")
    return lines


def activation_markdown(rows):
    """The fused-activation table over the plans of ``rows`` (collect_plans; auto and forced paths),
    as markdown lines."""
    settings = list(PATH_SETTINGS)
    lines = ["| shape | dtype | " + " | ".join(f"{s} paths | {s} step ratio standard / lean"
                                                for s in settings) + " | target met (auto) |",
             "|" + " --- |" * (3 + 2 * len(settings))]
    for row in rows:
        shape = "(" + ", ".join(str(s) for s in row["shape"]) + ")"
        if row.get("error"):
            continue
        cells = []
        met = "-"
        for setting in settings:
            fwd, bwd = row["plans"].get(f"{setting}/fwd"), row["plans"].get(f"{setting}/bwd")
            if not fwd or not bwd or "error" in fwd or "error" in bwd:
                cells += ["error", "-"]
                continue
            element_bytes = fwd["traffic"]["x_bytes"] // _numel(row["shape"])
            acc_bytes = 8 if row["dtype"].startswith("fp64") else 4
            ratios = [activation_traffic(fwd, bwd, row["shape"], element_bytes, memory, acc_bytes)["step"]["ratio"]
                      for memory in MEMORY_POLICIES]
            cells += [f"{SHORT_PATH[fwd['path']]}/{SHORT_PATH[bwd['path']]}",
                      " / ".join(f"{r:.3f}" for r in ratios)]
            if setting == "auto":
                met = "yes" if max(ratios) <= ACTIVATION_TARGET else "no"
        lines.append(f"| {shape} | {row['dtype']} | " + " | ".join(cells) + f" | {met} |")
    return lines


def activation_document(rows, preamble=()):
    """The whole fused-activation report (model) as text."""
    lines = ["# Fused activation: modeled DRAM traffic of CmBN + activation against the unfused pair "
             "(model)", "", *preamble,
             "A **model**, not a measurement. A training step of one layer: forward and backward. "
             "Fused: the op applies the activation before its store and differentiates it inside the "
             "backward kernel, so it moves what the plain layer moves (the two-pass path reads x, and "
             "grad_y, twice; the single-read path once), plus the bias in the backward. The unfused "
             "pair: the same layer, then a separate activation kernel, which reads its input and writes "
             "its output forward (+2|x|) and reads the output's gradient and its saved tensor and "
             "writes the input's gradient backward (+3|x|). memory=\"lean\" reads the output in place "
             "of x: the same bytes (it saves memory kept for the backward, not traffic). Issue 22's "
             f"target: fused <= {ACTIVATION_TARGET} of the pair.", "",
             "## Closed forms (|x| >> per-channel vectors)", ""]
    lines += activation_closed_form_markdown()
    lines += ["", "The single-read path meets the target (1/2); the two-pass path cannot (8/13 = 0.615): "
              "its own second reads of x and grad_y are not the activation's to save.", "",
              "## Per shape, with the planned paths (fwd/bwd: SR single_read, 2P two_pass)", ""]
    lines += activation_markdown(rows)
    return "\n".join(lines) + "\n"


def _numel(shape):
    numel = 1
    for size in shape:
        numel *= size
    return numel


# ------------------------------------------------------------------------------------------- plans
@contextlib.contextmanager
def kernel_path(setting):
    """CMBN_KERNEL_PATH set to ``setting`` inside the block (the launchers read it at every call),
    restored after; None leaves it as it is."""
    if setting is None:
        yield
        return
    previous = os.environ.get("CMBN_KERNEL_PATH")
    os.environ["CMBN_KERNEL_PATH"] = setting
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CMBN_KERNEL_PATH", None)
        else:
            os.environ["CMBN_KERNEL_PATH"] = previous


def collect_plans(shapes, dtypes, device, kernel_plan, before_plan=None):
    """One row per (shape, dtype key): for each CMBN_KERNEL_PATH setting and direction the plan and its
    modeled traffic, or the error that stopped planning. ``dtypes`` maps a key to (dtype, memory
    format); ``before_plan(x, backward)`` runs before each plan (the emulated run sets the occupancy
    the planner is to see)."""
    import torch
    rows = []
    for dtype_key, (dtype, memory_format) in dtypes.items():
        for shape in shapes:
            row = {"shape": list(shape), "dtype": dtype_key, "plans": {}}
            try:
                x = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
            except Exception as error:  # too large for this device: the row says so
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                rows.append(row)
                continue
            acc_bytes = 8 if dtype == torch.float64 else 4
            for setting in PATH_SETTINGS:
                for direction, backward in (("fwd", False), ("bwd", True)):
                    if before_plan is not None:
                        before_plan(x, backward)
                    try:
                        with kernel_path(setting):
                            plan = kernel_plan(x, backward=backward)
                    except Exception as error:
                        row["plans"][f"{setting}/{direction}"] = {
                            "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"}
                        continue
                    plan = dict(plan, grid=list(plan["grid"]))
                    plan["traffic"] = traffic(plan, shape, x.element_size(), backward, acc_bytes)
                    row["plans"][f"{setting}/{direction}"] = plan
            del x
            rows.append(row)
    return rows


def plan_cell(plan):
    """'SR 1 1.00': path, launches, modeled bytes over the floor."""
    if plan is None:
        return "-"
    if "error" in plan:
        return "error"
    return f"{SHORT_PATH[plan['path']]} {plan['launches']} {plan['traffic']['over_floor']:.2f}"


def plan_markdown(rows, heading="## Kernel plans and modeled DRAM traffic (model)", level_note=""):
    """The plan table as markdown lines."""
    columns = [(s, d) for s in PATH_SETTINGS for d in ("fwd", "bwd")]
    titles = {"auto": "auto", "two_pass": "forced two_pass", "single_read": "forced single_read"}
    lines = [heading, "",
             "Each cell: the path the launcher plans (2P = two_pass, SR = single_read), its launches, and "
             "its modeled DRAM bytes over the floor (a **model**: the two-pass path reads x, and grad_y "
             "in the backward, twice: 3|x| / 2|x| = 1.5 forward, 5|x| / 3|x| = 1.67 backward; the "
             "single-read path moves the floor, 1.00; plus the split reduction's workspace, written and "
             "read once, and the per-channel vectors in both). A forced single_read that does not fit "
             "falls back to 2P. Grid and held bytes are auto's."
             + (f" {level_note}" if level_note else ""), "",
             "| shape | dtype | layout, pack | grid fwd (auto) | co-resident blocks | held MB fwd/bwd (auto) | "
             + " | ".join(f"{titles[s]} {d}" for s, d in columns) + " |",
             "|" + " --- |" * (6 + len(columns))]
    for row in rows:
        shape = "(" + ", ".join(str(s) for s in row["shape"]) + ")"
        if row.get("error"):
            lines.append(f"| {shape} | {row['dtype']} | {row['error']} |" + " |" * (4 + len(columns)))
            continue
        auto_fwd = row["plans"].get("auto/fwd", {})
        auto_bwd = row["plans"].get("auto/bwd", {})
        ok = "error" not in auto_fwd and auto_fwd
        layout = f"{auto_fwd['layout']}, {auto_fwd['pack']}" if ok else "-"
        grid = f"{auto_fwd['grid'][0]} x {auto_fwd['grid'][1]}" if ok else "-"
        resident = str(auto_fwd["co_resident_blocks"]) if ok else "-"
        held = ("/".join(f"{p['bytes_held'] / 1e6:.1f}" if p and "error" not in p else "-"
                         for p in (auto_fwd, auto_bwd)))
        cells = [plan_cell(row["plans"].get(f"{s}/{d}")) for s, d in columns]
        lines.append(f"| {shape} | {row['dtype']} | {layout} | {grid} | {resident} | {held} | "
                     + " | ".join(cells) + " |")
    errors = sorted({p["error"] for row in rows for p in row["plans"].values() if "error" in p})
    if errors:
        lines += [""] + [f"- planning error: {e}" for e in errors]
    return lines


# ------------------------------------------------------------------------------- emulated H100 run
def layout_enumerator(name):
    """A plan's layout ("planes_masked") as the kernels' Layout enumerator ("kPlanesMasked")."""
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def sass_occupancy(sass_path):
    """{(kernel base name, scalar type, layout, VEC): modeled blocks per SM} from the SASS report."""
    with open(sass_path) as f:
        document = json.load(f)
    table = {}
    for k in document["kernels"]:
        name, _, args = k["kernel"].partition("<")
        args = [a.strip() for a in args.rstrip(">").split(",")]
        if k["layout"] and k["vec"] and k["occupancy_model"]:
            table[(name, args[0], k["layout"], k["vec"])] = k["occupancy_model"]["blocks"]
    return table


SCALAR_NAMES = {"torch.float16": "c10::Half", "torch.bfloat16": "c10::BFloat16", "torch.float32": "float",
                "torch.float64": "double"}


def instantiation_key(x, backward):
    return (tuple(x.shape), str(x.dtype), str(x.is_contiguous()), bool(backward))


def occupancy_setter(table, fallback, instantiations):
    """A ``before_plan`` that sets CMBN_EMULATED_BLOCKS_PER_SM to the lower modeled occupancy of the
    two kernels of the plan's direction and instantiation (the two-pass and the single-read kernel),
    as the launchers take the lower of the two. The launchers ask once per kernel pair and keep the
    answer, so the instantiation must be known before the first plan: ``instantiations`` maps
    ``instantiation_key`` to (layout enumerator, VEC), found beforehand in another process."""
    used = {}

    def before_plan(x, backward):
        layout, vec = instantiations[instantiation_key(x, backward)]
        scalar = SCALAR_NAMES[str(x.dtype)]
        direction = "backward" if backward else "forward"
        values = [table.get((f"cmbn_{direction}{suffix}_kernel", scalar, layout, vec))
                  for suffix in ("", "_held")]
        known = [v for v in values if v is not None]
        blocks = min(known) if known else fallback
        os.environ["CMBN_EMULATED_BLOCKS_PER_SM"] = str(blocks)
        used[(direction, scalar, layout, vec)] = blocks

    before_plan.used = used
    return before_plan


def load_emulated_kernels(sms):
    os.environ["CMBN_EMULATED_KERNELS"] = "1"
    os.environ["CMBN_DISABLE_KERNELS"] = "1"  # the emulated kernels are this process's CPU kernels
    os.environ["CMBN_EMULATED_SMS"] = str(sms)
    sys.path[:0] = [os.path.join(REPO, "tests"), REPO, HERE]
    import cmbn_ext  # noqa: F401  (defines the ops the emulated kernels then serve)
    import emulation  # tests/emulation: the kernels compiled for the CPU
    emulation.load()


def discover_instantiations(args):
    """(layout, VEC) of each shape, dtype and direction, written to ``args.discover`` as JSON: run in a
    process of its own, whose planner caches its occupancy answers and is then discarded."""
    load_emulated_kernels(args.sms)
    import cmbn_ext
    import shapes
    import torch
    found = []
    for dtype, memory_format in shapes.DTYPES.values():
        for shape in shapes.GPU_SHAPES:
            x = torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)
            for backward in (False, True):
                plan = cmbn_ext.kernel_plan(x, backward=backward)
                found.append([list(instantiation_key(x, backward)), layout_enumerator(plan["layout"]),
                              plan["pack"]])
    with open(args.discover, "w") as f:
        json.dump(found, f)
    return 0


def run_emulated(args):
    import subprocess
    import tempfile

    import sass_report
    digest = sass_report.sources_digest(os.path.join(REPO, "csrc"))
    with tempfile.TemporaryDirectory(prefix="cmbn_plans_") as tmp:
        path = os.path.join(tmp, "instantiations.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--emulated", "--sms", str(args.sms),
                        "--discover", path], check=True)
        with open(path) as f:
            instantiations = {(tuple(k[0]), k[1], k[2], k[3]): (layout, vec) for k, layout, vec in json.load(f)}
    load_emulated_kernels(args.sms)
    import cmbn_ext
    import shapes
    setter = occupancy_setter(sass_occupancy(args.sass), args.blocks_per_sm, instantiations)
    rows = collect_plans(shapes.GPU_SHAPES, shapes.DTYPES, "cpu", cmbn_ext.kernel_plan, setter)
    used = ", ".join(f"{d} {s} {layout} VEC {v}: {b}" for (d, s, layout, v), b in sorted(setter.used.items()))
    with open(args.sass) as f:
        sass_source = json.load(f).get("source", "?")
    lines = ["# CmBN kernel plans on a modeled H100/H200 (model)", "",
             f"A **model**, not a GPU's plan: the launchers' own planning run by the emulated kernels "
             f"(tests/emulation) on CPU tensors, with CMBN_EMULATED_SMS={args.sms} (an H100/H200's SMs) and "
             f"CMBN_EMULATED_BLOCKS_PER_SM set per kernel pair to the lower of the two kernels' modeled "
             f"blocks per SM in {os.path.relpath(args.sass, REPO)} (registers and shared memory, "
             f"cuda_occupancy.h's rules; that report read {sass_source}). Planned with csrc/ sources "
             f"sha256 {digest}. A GPU's own plan is in the benchmark report "
             f"(bench/benchmark.py --device cuda).", "",
             f"Blocks per SM used: {used}.", ""]
    lines += plan_markdown(rows, heading="## Plans")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    activation_text = activation_document(rows, preamble=[
        f"Plans: those of {os.path.relpath(args.out, REPO)} (the launchers' planning on a modeled "
        f"H100/H200, csrc/ sources sha256 {digest}).", ""])
    with open(args.activation_out, "w") as f:
        f.write(activation_text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sms": args.sms, "blocks_per_sm": {" ".join(map(str, k)): v
                                                          for k, v in setter.used.items()},
                       "rows": rows}, f, indent=1)
            f.write("\n")
    print(text)
    return 0


def run_device(args):
    sys.path[:0] = [REPO, HERE]
    import cmbn_ext
    import shapes
    rows = collect_plans(shapes.GPU_SHAPES, shapes.DTYPES, args.device, cmbn_ext.kernel_plan)
    text = "\n".join(plan_markdown(rows)) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    activation_text = activation_document(rows)
    print(activation_text)
    if args.activation_out:
        with open(args.activation_out, "w") as f:
            f.write(activation_text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true",
                        help="plan with the emulated kernels on a modeled H100/H200 (CPU only)")
    parser.add_argument("--device", default="cuda", help="without --emulated: the device to plan for")
    parser.add_argument("--out", default=None,
                        help="markdown file (default with --emulated: bench/results/plan-h100-model.md)")
    parser.add_argument("--activation-out", default=None,
                        help="markdown file of the fused-activation traffic (default with --emulated: "
                             "bench/results/activation-traffic-h100-model.md)")
    parser.add_argument("--sms", type=int, default=132, help="--emulated: SMs (132: H100/H200)")
    parser.add_argument("--sass", default=os.path.join(HERE, "results", "sass-sm90.json"),
                        help="--emulated: the SASS report whose modeled occupancy the planner sees")
    parser.add_argument("--json", default=None, help="--emulated: also write the plans as JSON here")
    parser.add_argument("--blocks-per-sm", type=int, default=2,
                        help="--emulated: occupancy for a kernel the SASS report lacks")
    parser.add_argument("--discover", help=argparse.SUPPRESS)  # the instantiation-finding subprocess
    args = parser.parse_args(argv)
    if args.emulated and args.discover:
        return discover_instantiations(args)
    if args.emulated:
        args.out = args.out or os.path.join(HERE, "results", "plan-h100-model.md")
        args.activation_out = args.activation_out or os.path.join(HERE, "results",
                                                                  "activation-traffic-h100-model.md")
        return run_emulated(args)
    return run_device(args)


if __name__ == "__main__":
    sys.exit(main())
