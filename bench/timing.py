"""Timers for the CmBN benchmark: per-call times over rotated input buffers, the device's copy bandwidth
(the memory floor's rate) and kernel launches per call from the profiler (counted after all timing: a
profiled process may keep profiler hooks that slow its later launches).

On CUDA every call sits between its own pair of CUDA events, all queued back to back and read after one
synchronize, so the numbers are device time (including any gap the host leaves between launches, which
is what a training loop sees). On the CPU each call is timed with ``time.perf_counter``, the variants
compared side by side in interleaved rounds (``time_interleaved``). Either way the calls cycle through
several input sets whose total size exceeds the last-level cache, so a repeated run does not just read
the cache, and the median over many runs after a warm-up is reported.
"""
import bisect
import collections
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

# Rotated input sets add up to this multiple of the GPU's L2 (50 MB on an H100/H200).
L2_MULTIPLE = 2
# torch does not expose the CPU's caches; 64 MiB is past any core's L2 and most hosts' L3 share.
CPU_ROTATION_BYTES = 64 * 2**20
MAX_INPUT_SETS = 64


@dataclass
class Stats:
    """Per-call time of one measured variant, in milliseconds."""
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int

    def as_dict(self):
        return asdict(self)


def summarize(seconds):
    """Median and quartiles of per-call times given in seconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) < 2:
        return Stats(ms[0], ms[0], ms[0], len(ms))
    quartiles = statistics.quantiles(ms, n=4, method="inclusive")
    return Stats(statistics.median(ms), quartiles[0], quartiles[2], len(ms))


def input_sets_needed(bytes_per_set, device):
    """How many input sets to rotate so that together they exceed the cache that would serve them."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
        target = L2_MULTIPLE * l2
        limit = MAX_INPUT_SETS
    else:
        target = CPU_ROTATION_BYTES
        limit = 8  # host memory bandwidth is low: more sets only cost setup time
    return max(2, min(limit, math.ceil(target / max(1, bytes_per_set))))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, input_sets, device, *, warmup, min_runs, max_runs, seconds):
    """Per-call times of ``call(inputs)`` cycling through ``input_sets``; returns ``Stats``.

    The run count is chosen from the warm-up's speed so that the timed runs take about ``seconds``,
    within ``[min_runs, max_runs]``.
    """
    sets = len(input_sets)
    index = 0

    def next_inputs():
        nonlocal index
        index += 1
        return input_sets[(index - 1) % sets]

    for _ in range(max(1, warmup)):  # the first calls pay for allocation, handles and module loads
        call(next_inputs())
    synchronize(device)
    probe = 3
    start = time.perf_counter()
    for _ in range(probe):
        call(next_inputs())
    synchronize(device)
    per_call = (time.perf_counter() - start) / probe
    runs = int(max(min_runs, min(max_runs, seconds / max(per_call, 1e-6))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        for begin, end in events:
            begin.record()
            call(next_inputs())
            end.record()
        torch.cuda.synchronize(device)
        return summarize([begin.elapsed_time(end) / 1e3 for begin, end in events])
    times = []
    for _ in range(runs):
        inputs = next_inputs()
        begin = time.perf_counter()
        call(inputs)
        times.append(time.perf_counter() - begin)
    return summarize(times)


def time_interleaved(calls, input_sets, device, *, warmup, min_runs, max_runs, seconds):
    """Per-call times of several calls timed side by side, in rounds: each round runs every call once,
    in turn, so that drift on a busy host hits them alike. Returns {key: ``Stats``, or the exception
    that stopped that call}; a failing call does not stop the others.

    ``calls`` is {key: call(inputs)}; each call cycles through ``input_sets`` on its own. The round
    count is chosen from a probe round so that the timed rounds take about ``seconds`` together,
    within ``[min_runs, max_runs]``.
    """
    live = dict(calls)
    outcomes = {}
    counters = dict.fromkeys(calls, 0)

    def one_round(times=None):
        for key, call in list(live.items()):
            inputs = input_sets[counters[key] % len(input_sets)]
            counters[key] += 1
            try:
                begin = time.perf_counter()
                call(inputs)
                synchronize(device)
                elapsed = time.perf_counter() - begin
            except Exception as error:  # recorded for this call; the others go on
                outcomes[key] = error
                del live[key]
                continue
            if times is not None:
                times[key].append(elapsed)

    for _ in range(max(1, warmup)):  # the first calls pay for allocation, handles and module loads
        one_round()
    probe = {key: [] for key in live}
    one_round(probe)
    round_s = sum(t[0] for t in probe.values() if t)
    runs = int(max(min_runs, min(max_runs, seconds / max(round_s, 1e-6))))
    times = {key: [] for key in live}
    for _ in range(runs):
        one_round(times)
    for key in live:
        outcomes[key] = summarize(times[key])
    return {key: outcomes[key] for key in calls}


def copy_bandwidth(device, *, nbytes=None, runs=20):
    """Device-to-device copy rate in bytes per second, counting bytes read plus bytes written.

    This is the memory floor's rate: a kernel that must read R and write W bytes cannot beat
    ``(R + W) / copy_bandwidth``. The buffer is far larger than any cache.
    """
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 256 << 20
    numel = nbytes // 4
    sources = [torch.rand(numel, device=device), torch.rand(numel, device=device)]
    destination = torch.empty(numel, device=device)
    stats = time_calls(lambda source: destination.copy_(source), sources, device, warmup=3,
                       min_runs=runs, max_runs=runs, seconds=0.0)
    del sources, destination
    return 2 * numel * 4 / (stats.median_ms / 1e3)


WINDOW_PREFIX = "cmbn_bench_count_"


def count_kernels(builders, device, calls=2):
    """CUDA kernels launched per call for each of ``builders`` (callables returning ``(call,
    input_sets)``), in one profiler session; a list of numbers, None where it could not be counted
    (on the CPU, without CUPTI, or when the call failed).

    Each call runs once before its counted calls, which sit in a ``record_function`` window with a
    synchronize inside, so setup and warm-up kernels fall outside the window.
    """
    if device.type != "cuda":
        return [None] * len(builders)
    from torch.profiler import ProfilerActivity, profile, record_function

    counted = [False] * len(builders)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, build in enumerate(builders):
            try:
                call, input_sets = build()
                call(input_sets[0])  # the first call may allocate or start CmBN's window
                synchronize(device)
                with record_function(f"{WINDOW_PREFIX}{i}"):
                    for j in range(calls):
                        call(input_sets[j % len(input_sets)])
                    synchronize(device)
                counted[i] = True
            except Exception:  # a count is a detail: this variant's timing already passed
                synchronize(device)
            call = input_sets = None
    per_window = kernels_per_window(prof.profiler.kineto_results.events())
    return [per_window.get(i, 0) / calls if counted[i] and per_window.get(i) else None
            for i in range(len(builders))]


def kernels_per_window(events):
    """Kernels per ``record_function`` window, from raw kineto events: {window index: kernels}.

    A kernel belongs to the window that holds the CPU event it is linked to (its launching op, or the
    window itself for launches outside any op, as triton's), as torch inductor's own benchmarker does.
    If no kernel links anywhere, the kernels' own times are used (a synchronize closes each window).
    """
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    windows = sorted((ev.start_ns(), ev.end_ns(), int(ev.name()[len(WINDOW_PREFIX):]), ev.correlation_id())
                     for ev in events
                     if ev.device_type() == cpu and ev.name().startswith(WINDOW_PREFIX))
    if not windows:
        return {}
    starts = [w[0] for w in windows]

    def window_of(start_ns, end_ns):
        i = bisect.bisect_right(starts, start_ns) - 1
        if i >= 0 and end_ns <= windows[i][1]:
            return windows[i][2]
        return None

    owner = {w[3]: w[2] for w in windows}
    for ev in events:
        if ev.device_type() == cpu and ev.correlation_id() not in owner:
            index = window_of(ev.start_ns(), ev.end_ns())
            if index is not None:
                owner[ev.correlation_id()] = index
    kernels = [ev for ev in events if ev.device_type() == cuda and is_kernel_event(ev)]
    counts = collections.Counter()
    for ev in kernels:
        index = owner.get(ev.linked_correlation_id()) if ev.linked_correlation_id() else None
        if index is not None:
            counts[index] += 1
    if not counts:  # no links at all: fall back on the kernels' own times
        for ev in kernels:
            index = window_of(ev.start_ns(), ev.end_ns())
            if index is not None:
                counts[index] += 1
    return dict(counts)


# Device activities that are not kernels, by name, for torch versions whose events do not say their
# activity type (2.11): copies, memsets, synchronizations.
NOT_KERNEL_NAMES = ("Memcpy", "Memset", "Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event")


def is_kernel_event(event):
    """True for a device event that is a kernel (not a copy, memset, sync or the GPU side of a
    ``record_function`` range).

    Recent torch names the kineto activity (``activity_type()``: "kernel", "gpu_memcpy", "gpu_memset",
    "gpu_user_annotation", ...; torch 2.14 has it); torch 2.11 lacks that method, and then the event's
    user-annotation flag and its name decide.
    """
    activity = _call_if_present(event, "activity_type")
    if isinstance(activity, str) and activity:
        return activity == "kernel"
    if _call_if_present(event, "is_user_annotation"):
        return False
    return not event.name().startswith((*NOT_KERNEL_NAMES, WINDOW_PREFIX))


def _call_if_present(event, method):
    """``event.method()``, or None where this torch's events do not have that method."""
    bound = getattr(event, method, None)
    if bound is None:
        return None
    try:
        return bound()
    except (RuntimeError, TypeError):  # bound but not supported for this event
        return None
