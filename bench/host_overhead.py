"""Host cost per layer call: CrossMiniBatchNorm2d against torch.nn.BatchNorm2d on tiny micro-batches,
where what the CPU spends per call (Python, dispatch, autograd, launches), not the arithmetic, decides
a training step's time.

    python3 bench/host_overhead.py --device cuda   # the kernels: host time per call, GPU left to run
    python3 bench/host_overhead.py --device cpu    # the CPU proxy (below)

Each call (a training forward, or forward and backward) is timed on its own; the median of many calls
is reported, the variants interleaved in rounds so that drift on a busy host hits both alike. The CPU
proxy times the thread's CPU time (``time.thread_time``: what the call costs the host, whatever else
the machine runs); on CUDA, ``time.perf_counter``.

- cuda: nothing synchronizes inside a round, so a call's time is what the host spends to queue its
  work (the GPU is not the bottleneck at these sizes; a synchronize between rounds keeps the queue
  short).
- cpu, the proxy: ``bench/host_stubs.cpp``, compiled on first use, replaces the CPU bodies of the ops
  both layers run (CmBN's ``cmbn_train_forward`` and ``cmbn_backward``, BatchNorm's
  ``native_batch_norm`` and its backward) with ones that only allocate their outputs. What remains is
  the path a CUDA call takes on the host, minus the launch itself. The stubs are registered last, so
  they take over from the CPU kernels of ``cmbn_ext._C`` too; each counts its calls, and the run stops
  with an error if a layer's call did not reach them. It works with or without ``cmbn_ext._C``
  (``CMBN_DISABLE_KERNELS=1`` gives the pure-PyTorch path's host cost).

Results go to ``DIR/host-<device>.json`` and ``.md`` (default DIR: bench/results); the last line
printed is the worst ratio.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _path in (HERE, REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import cmbn_ext  # noqa: E402
import report  # noqa: E402
from cmbn_ext import ops  # noqa: E402

SHAPES = [(2, 16, 8, 8), (2, 256, 14, 14)]
PASSES = ("fwd", "fwd+bwd")
WINDOW = 4  # cumulative mode, a typical accumulation: every call but each window's first pools history
TARGETS = {"cpu": 1.3, "cuda": 1.2}  # CmBN / BatchNorm2d, fwd+bwd


def load_cpu_stubs(verbose=False):
    """Compiles (once) and loads bench/host_stubs.cpp into this process."""
    from torch.utils import cpp_extension

    build_dir = os.path.join(REPO, "build", "host_stubs")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="cmbn_host_stubs", sources=[os.path.join(HERE, "host_stubs.cpp")],
                       build_directory=build_dir, is_python_module=False, verbose=verbose)


# The stubs a training call of each layer must reach: one of the forward ops, and the backward op.
EXPECTED_STUBS = {
    "cmbn": (("cmbn_train_forward", "cmbn_forward"), ("cmbn_backward",)),
    "batchnorm": (("native_batch_norm",), ("native_batch_norm_backward",)),
}
STUBS = ("cmbn_train_forward", "cmbn_forward", "cmbn_update_state", "cmbn_backward", "native_batch_norm",
         "native_batch_norm_backward")


def stub_calls():
    """{stub: calls so far} from the counters of bench/host_stubs.cpp."""
    return {name: torch.ops.cmbn_host_stubs.calls(name) for name in STUBS}


def check_stubs_take_over(device):
    """Run one forward and backward of each layer and check that it reached the stubs, not real
    kernels; returns {variant: [the stubs it ran]}. Raises RuntimeError where a layer missed them."""
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    ran = {}
    for variant, groups in EXPECTED_STUBS.items():
        before = stub_calls()
        make_call(make_layer(variant, 4, device), "fwd+bwd", x, torch.ones_like(x))()
        after = stub_calls()
        ran[variant] = [name for name in STUBS if after[name] > before[name]]
        missed = [" or ".join(group) for group in groups if not any(name in ran[variant] for name in group)]
        if missed:
            raise RuntimeError(f"bench/host_overhead.py: the {variant} layer's call did not reach the stub "
                               f"of {', '.join(missed)} (it ran {ran[variant] or 'no stub'}): real kernels "
                               "took over, so the host cost cannot be measured")
    return ran


def kernels_text():
    """What serves CmBN's ops on CPU tensors in this process, before the stubs replace them."""
    if "cmbn_ext._C" not in sys.modules:
        return "cmbn_ext._C not loaded: the pure-PyTorch ops"
    return "cmbn_ext._C loaded, " + ("with its CPU kernels" if cmbn_ext.has_cpu_kernels() else
                                     "without CPU kernels")


def make_layer(variant, channels, device):
    if variant == "batchnorm":
        layer = torch.nn.BatchNorm2d(channels, device=device)
    else:
        layer = cmbn_ext.CrossMiniBatchNorm2d(channels, window=WINDOW, device=device)
    return layer.train()


def make_call(layer, pass_, x, dy):
    if pass_ == "fwd":
        return lambda: layer(x)

    def forward_backward():
        layer(x).backward(dy)
    return forward_backward


def measure(shape, device, rounds, calls_per_round):
    """Median host microseconds per call of each (variant, pass)."""
    x = torch.randn(shape, device=device)
    x_leaf = x.clone().requires_grad_()
    dy = torch.randn(shape, device=device)
    calls = {}
    for variant in ("cmbn", "batchnorm"):
        layer = make_layer(variant, shape[1], device)
        for pass_ in PASSES:
            calls[variant, pass_] = make_call(layer, pass_, x if pass_ == "fwd" else x_leaf, dy)
    times = {key: [] for key in calls}
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    for _ in range(3):  # warm-up: allocator, autograd and dispatch caches
        for call in calls.values():
            call()
    for _ in range(rounds):
        for key, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples = times[key]
            for _ in range(calls_per_round):
                start = clock()
                call()
                samples.append(clock() - start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {key: statistics.median(samples) * 1e6 for key, samples in times.items()}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def markdown(results):
    meta = results["meta"]
    lines = [f"# Host cost per call: CrossMiniBatchNorm2d vs BatchNorm2d ({meta['device_name']})", "",
             f"{meta['date']}, torch {meta['torch_version']}. {meta['method']}", ""]
    if meta.get("stubs_ran"):
        ran = "; ".join(f"{variant}: {', '.join(names)}" for variant, names in meta["stubs_ran"].items())
        lines += [f"CmBN's CPU ops before the stubs: {meta['cpu_kernels']}. Stubs reached: {ran}.", ""]
    lines += ["| shape | pass | CmBN us | BatchNorm2d us | CmBN / BatchNorm2d |",
              "| --- | --- | ---: | ---: | ---: |"]
    for row in results["rows"]:
        lines.append(f"| {tuple(row['shape'])} | {row['pass']} | {row['cmbn_us']:.1f} | "
                     f"{row['batchnorm_us']:.1f} | {row['ratio']:.2f} |")
    lines += ["", f"Target: fwd+bwd ratio <= {meta['target']} on every shape."]
    return "\n".join(lines) + "\n"


def method_text(device, args):
    clock = "time.perf_counter" if device.type == "cuda" else "time.thread_time (the thread's CPU time)"
    timing = (f"Median of {args.rounds} x {args.calls} calls per variant, each timed with "
              f"{clock}, variants interleaved by rounds. CmBN: cumulative mode, window "
              f"{WINDOW}; fwd+bwd = layer(x).backward(dy) with x requiring grad.")
    path = ("CmBN's training forward is one op, cmbn_train_forward, with "
            + ("its autograd in C++ (cmbn_ext._C)." if ops.HAS_CPP_AUTOGRAD else
               "the Python autograd fallback (cmbn_ext._C not built)."))
    if device.type == "cuda":
        return (f"CUDA, CmBN on its kernels ({'loaded' if cmbn_ext.has_cuda_kernels() else 'NOT loaded'}); "
                f"no synchronize inside a round, so each time is the host's. {timing} {path}")
    return ("CPU proxy: bench/host_stubs.cpp replaces the bodies of cmbn_train_forward, cmbn_backward, "
            "native_batch_norm and native_batch_norm_backward with ones that only allocate outputs, so "
            f"only the host path is timed (1 torch thread); before the timing, one call of each layer "
            f"was checked to reach the stubs. {timing} {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per variant per round")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    stubs_ran = None
    if device.type == "cpu":
        torch.set_num_threads(1)
        kernels = kernels_text()  # before the stubs take over
        load_cpu_stubs()
        stubs_ran = check_stubs_take_over(device)
    elif not torch.cuda.is_available():
        print("bench/host_overhead.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    rows = []
    for shape in SHAPES:
        medians = measure(shape, device, args.rounds, args.calls)
        for pass_ in PASSES:
            cmbn, batchnorm = medians["cmbn", pass_], medians["batchnorm", pass_]
            rows.append({"shape": list(shape), "pass": pass_, "cmbn_us": cmbn, "batchnorm_us": batchnorm,
                         "ratio": cmbn / batchnorm})
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_type": device.type, "device_name": device_name(device),
            "torch_version": torch.__version__, "target": TARGETS[device.type],
            "method": method_text(device, args)}
    if stubs_ran is not None:
        meta["cpu_kernels"] = kernels
        meta["stubs_ran"] = stubs_ran
    results = {"meta": meta, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = "host-" + report.results_stem(meta["device_name"], device.type)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
    worst = max((r for r in rows if r["pass"] == "fwd+bwd"), key=lambda r: r["ratio"])
    print(f"host fwd+bwd CrossMiniBatchNorm2d / BatchNorm2d ({device.type}): worst {worst['ratio']:.2f} "
          f"at {tuple(worst['shape'])} (target <= {meta['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
