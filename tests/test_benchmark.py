"""Smoke tests of the benchmark (bench/): the CPU section on tiny shapes with very few runs writes its
JSON and markdown with finite numbers and the expected rows (the kernels, the pure-PyTorch subprocess,
BatchNorm2d beside each, the end-to-end step); the report builds its tables, summary and targets from
made-up CPU and GPU numbers; interleaved timing runs its calls in rounds; the GPU stages and the
pure-PyTorch subprocess run on the CPU; the host-cost proxy's stubs take over the CPU ops; profiler
kernels are attributed to their windows; the traffic model against its closed forms and the plan
table from stand-in plans. Timing never decides pass or fail here.
"""
import ast
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)  # bench/ holds scripts, not a package

import benchmark  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402
import timing  # noqa: E402
import traffic_model  # noqa: E402

TINY_SHAPES = [[2, 8, 6, 6], [2, 4, 5, 5]]


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture
def keep_threads():
    """The CPU benchmark sets one torch thread in its process: give the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_budget(monkeypatch):
    """The benchmark's time budget counts from its import; in a test session, count from the test."""
    monkeypatch.setattr(benchmark, "STARTED", time.time())


def test_cpu_section_writes_json_and_markdown(tmp_path, keep_threads, fresh_budget):
    # (1, 64, 16, 16) is a CPU target shape: the summary and the targets count it.
    shapes = TINY_SHAPES + [[1, 64, 16, 16]]
    argv = ["--device", "cpu", "--out", str(tmp_path), "--quick",
            "--shapes", ",".join("x".join(map(str, s)) for s in shapes)]
    assert benchmark.main(argv) == 0
    assert torch.get_num_threads() == 1
    [json_name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    assert json_name.startswith("cpu-") and (tmp_path / json_name.replace(".json", ".md")).exists()
    document = json.loads((tmp_path / json_name).read_text())

    meta = document["meta"]
    assert meta["torch_version"] == torch.__version__ and meta["date"].endswith("UTC")
    assert meta["device_name"] == benchmark.device_name(torch.device("cpu"))
    assert "torch CPU threads: 1" in meta["host"]
    assert meta["kernels_loaded"].startswith("yes" if benchmark.cpu_kernels_loaded() else "NO")
    assert _finite(meta["copy_bandwidth_bytes_per_s"])
    measured = {(tuple(r["shape"]), r["pass"], r["variant"]) for r in document["records"]}
    expected = {(tuple(s), p, v) for s in shapes for p in ("fwd", "fwd+bwd")
                for v in ("cmbn", "batchnorm", "pure", "pure_batchnorm")}
    expected |= {(tuple(s), "fwd", "sample") for s in shapes}  # the article's sample is forward only
    assert measured == expected
    for record in document["records"]:
        assert record.get("error") is None, record
        assert all(_finite(record[k]) and record[k] > 0 for k in ("median_ms", "p25_ms", "p75_ms"))
    assert [(r["shape"], r["pass"]) for r in document["rows"]] == [
        (s, p) for s in shapes for p in ("fwd", "fwd+bwd")]
    for row in document["rows"]:
        assert _finite(row["ratios"]["CmBN/BN"]) and _finite(row["ratios"]["pure/BN"])
        assert _finite(row["floor_ms"])
    # The end-to-end step of each process's pair.
    assert sorted(r["variant"] for r in document["e2e"]) == ["batchnorm", "cmbn", "pure", "pure_batchnorm"]
    assert all(r.get("error") is None and _finite(r["median_ms"]) for r in document["e2e"])
    steps = {r["variant"]: r["median_ms"] for r in document["e2e"]}
    kernels, pure = document["summary"]
    assert kernels["shapes"] == pure["shapes"] == 1 and kernels["worst_shape"] == [1, 64, 16, 16]
    target_row = next(r for r in document["rows"] if r["shape"] == [1, 64, 16, 16] and r["pass"] == "fwd+bwd")
    assert kernels["median"] == kernels["worst"] == pytest.approx(target_row["ratios"]["CmBN/BN"])
    assert pure["median"] == pytest.approx(target_row["ratios"]["pure/BN"])
    assert kernels["e2e"] == pytest.approx(steps["cmbn"] / steps["batchnorm"])
    assert pure["e2e"] == pytest.approx(steps["pure"] / steps["pure_batchnorm"])
    targets = {t["target"]: t for t in document["targets"]}
    assert targets["CmBN fwd+bwd / BatchNorm2d, median over the 7 CPU target shapes"]["measured"] == \
        pytest.approx(kernels["median"])
    assert len(targets) == 3 and all(t["met"] is not None for t in targets.values())

    text = (tmp_path / json_name.replace(".json", ".md")).read_text()
    assert "## Targets" in text and "**Method.**" in text and "CmBN/BN" in text and "pure/BN" in text
    assert "## Summary" in text and "## End-to-end training step" in text
    for shape in shapes:
        for pass_ in ("fwd", "fwd+bwd"):
            assert f"| {report.shape_text(shape)} | fp32 | {pass_} |" in text


def _record(shape, pass_, variant, ms):
    x_bytes = shape[0] * shape[1] * shape[2] * shape[3] * 4
    return {"shape": list(shape), "dtype": "fp32", "pass": pass_, "variant": variant, "x_bytes": x_bytes,
            "median_ms": ms, "p25_ms": ms, "p75_ms": ms, "runs": 5, "launches": None}


def test_fused_activation_table(tmp_path, keep_threads):
    """--fused-activation writes its table: a row per shape, dtype, activation and pass, every variant
    timed (lean for the invertible LeakyReLU only), with the load average named."""
    argv = ["--device", "cpu", "--fused-activation", "--out", str(tmp_path), "--quick",
            "--shapes", "2x8x6x6", "--dtypes", "fp32,fp16-cl"]
    assert benchmark.main(argv) == 0
    assert torch.get_num_threads() == 1
    text = (tmp_path / "cpu-fused-activation.md").read_text()
    assert "Load average" in text and benchmark.device_name(torch.device("cpu")) in text
    rows = [line for line in text.splitlines() if line.startswith("| 2x8x6x6 |")]
    assert len(rows) == 2 * len(benchmark.FUSED_ACTIVATIONS) * 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        lean = cells[2].startswith("LeakyReLU")
        times = cells[4:8]
        assert all(float(t) > 0 for t in (times if lean else times[:3])), row
        assert lean or times[3] == "-", row


def test_cpu_summary_and_targets_from_fake_numbers(tmp_path):
    """The CPU targets: median and worst of CmBN/BN over the target shapes only, the end-to-end step
    against the BatchNorm2d step of its own process."""
    # CmBN/BN of 1.0, 1.1, ..., 1.6 on the seven target shapes; pure/pBN twice that; an extra shape
    # with a worse ratio does not count.
    records = []
    for i, shape in enumerate(shapes.CPU_TARGET_SHAPES + [(8, 32, 512, 512)]):
        ratio = 1.0 + 0.1 * i if i < len(shapes.CPU_TARGET_SHAPES) else 9.0
        for pass_ in ("fwd", "fwd+bwd"):
            records += [_record(shape, pass_, "cmbn", ratio), _record(shape, pass_, "batchnorm", 1.0),
                        _record(shape, pass_, "pure", 4 * ratio),
                        _record(shape, pass_, "pure_batchnorm", 2.0)]
    records.append(dict(_record((2, 32, 32, 32), "fwd", "sample", 1.0)))
    e2e = [{"variant": v, "median_ms": ms, "p25_ms": ms, "p75_ms": ms, "runs": 5}
           for v, ms in (("cmbn", 12.0), ("batchnorm", 10.0), ("pure", 30.0), ("pure_batchnorm", 12.0))]
    meta = {"device_type": "cpu", "device_name": "Made-up CPU", "date": "today", "method": "made up",
            "copy_bandwidth_bytes_per_s": 2e10, "notes": []}
    results = {"meta": meta, "variants": benchmark.CPU_VARIANTS, "records": records, "e2e": e2e,
               "e2e_description": "made up"}
    json_path, _, text = report.write(results, str(tmp_path))
    document = json.loads(open(json_path).read())
    kernels, pure = document["summary"]
    assert kernels["shapes"] == 7 and kernels["median"] == pytest.approx(1.3)
    assert kernels["worst"] == pytest.approx(1.6) and kernels["worst_shape"] == [1, 64, 16, 16]
    assert pure["median"] == pytest.approx(2.6) and pure["worst"] == pytest.approx(3.2)
    assert kernels["e2e"] == pytest.approx(1.2) and pure["e2e"] == pytest.approx(2.5)
    median, worst, step = document["targets"]
    assert median["met"] is False and median["measured"] == pytest.approx(1.3)
    assert worst["met"] is False and "(1, 64, 16, 16)" in worst["detail"]
    assert step["met"] is True and step["measured"] == pytest.approx(1.2)
    assert "| pure PyTorch / BatchNorm2d | 2.60 | 3.20 (1, 64, 16, 16) | 7 | 2.50 |" in text
    assert "| CmBN pure PyTorch (own process) | 30.0 | 30.0-30.0 | 2.50 |" in text

    # Only some target shapes measured: the targets say how many.
    results["records"] = [r for r in records if r["shape"] == [8, 64, 56, 56]]  # CmBN/BN 1.0
    results["e2e"] = []
    targets = report.write(results, str(tmp_path))[0]
    median, worst, step = json.loads(open(targets).read())["targets"]
    assert median["detail"] == "1 of 7 shapes measured" and median["met"] is True
    assert step["met"] is None and step["miss"] == "not measured"


def test_time_interleaved_runs_rounds():
    """Each round calls every live call once, in turn, each cycling through the input sets on its own;
    a call that fails is reported as its exception and the others go on."""
    seen = []

    def call(name, fail_at=None):
        def run(inputs):
            seen.append((name, inputs))
            if fail_at is not None and len([s for s in seen if s[0] == name]) == fail_at:
                raise ValueError("made up")
        return run

    calls = {"a": call("a"), "b": call("b", fail_at=3), "c": call("c")}
    outcomes = timing.time_interleaved(calls, [0, 1], torch.device("cpu"), warmup=1, min_runs=4,
                                       max_runs=4, seconds=0.0)
    assert list(outcomes) == ["a", "b", "c"]
    assert isinstance(outcomes["b"], ValueError)
    assert outcomes["a"].runs == outcomes["c"].runs == 4
    # warm-up round, probe round, then b fails in the first timed round.
    assert [name for name, _ in seen] == ["a", "b", "c"] * 3 + ["a", "c"] * 3
    assert [inputs for name, inputs in seen if name == "a"] == [0, 1, 0, 1, 0, 1]


def test_memory_shortfall(monkeypatch):
    monkeypatch.setattr(benchmark, "available_host_bytes", lambda: 8 * 2**30)
    cpu = torch.device("cpu")
    assert benchmark.memory_shortfall(100 * 2**20, cpu) is None
    assert benchmark.memory_shortfall(1 * 2**30, cpu).startswith("needs about 16.0 GiB of memory, 8.0 GiB")
    assert benchmark.memory_shortfall(1 * 2**30, torch.device("cuda")) is None
    records = benchmark.measure_side_by_side((1024, 1024, 16, 16), "fp32", ["cmbn", "batchnorm"], cpu,
                                             benchmark.SETTINGS["quick"], 10.0)
    assert len(records) == 4 and all(r["error"].startswith("skipped: needs about") for r in records)
    monkeypatch.setattr(benchmark, "available_host_bytes", lambda: None)
    assert benchmark.memory_shortfall(1 * 2**40, cpu) is None


def test_side_by_side_skips_a_shape_expected_past_its_share(monkeypatch):
    """A shape whose rounds, scaled from the largest shape measured so far, would take longer than its
    share of the stage is recorded as skipped; smaller shapes after it are still measured."""
    measured = []

    def fake_measure(shape, dtype_key, variants, device, settings, cap_s):
        measured.append(shape)
        return [dict(benchmark.base_record(shape, dtype_key, p, v), median_ms=100.0)
                for v in variants for p in benchmark.PASSES]

    monkeypatch.setattr(benchmark, "measure_side_by_side", fake_measure)
    records = []
    # (1, 8, 8, 8) takes 0.4 s a round; (1, 8, 512, 512) is 4096x its size: expected 4 rounds x 0.4 s
    # x 4096, far past its 30 s share of the minute.
    configs = [((1, 8, 8, 8), "fp32"), ((1, 8, 512, 512), "fp32"), ((1, 8, 4, 4), "fp32")]
    benchmark.run_configs(configs, ["pure", "pure_batchnorm"], torch.device("cpu"),
                          benchmark.SETTINGS["quick"], time.time() + 60, None, records.extend,
                          side_by_side=True)
    assert measured == [(1, 8, 8, 8), (1, 8, 4, 4)]
    skipped = [r for r in records if r.get("error")]
    assert len(skipped) == 4 and all(tuple(r["shape"]) == (1, 8, 512, 512) for r in skipped)
    assert skipped[0]["error"] == "skipped: out of time budget (expected to take longer than its share)"


def test_host_overhead_stubs_take_over(tmp_path):
    """The CPU host-cost proxy in its own process (its stubs replace kernels process-wide): one call of
    each layer reached the stubs, and the table has every row."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(BENCH))
    result = subprocess.run([sys.executable, os.path.join(BENCH, "host_overhead.py"), "--device", "cpu",
                             "--rounds", "1", "--calls", "2", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [json_name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    document = json.loads((tmp_path / json_name).read_text())
    ran = document["meta"]["stubs_ran"]
    assert {"cmbn_train_forward", "cmbn_forward"} & set(ran["cmbn"]) and "cmbn_backward" in ran["cmbn"]
    assert ran["batchnorm"] == ["native_batch_norm", "native_batch_norm_backward"]
    assert [(r["shape"], r["pass"]) for r in document["rows"]] == [
        (list(s), p) for s in ((2, 16, 8, 8), (2, 256, 14, 14)) for p in ("fwd", "fwd+bwd")]
    assert all(_finite(r["ratio"]) and r["ratio"] > 0 for r in document["rows"])
    assert "worst" in result.stdout.strip().splitlines()[-1]


def _fake_gpu_results():
    records = []
    for dtype, scale in (("fp16-cl", 0.5), ("fp32", 1.0)):
        for shape, ms in (([8, 32, 512, 512], 1.0), ([8, 2048, 7, 7], 0.02)):
            x_bytes = shape[0] * shape[1] * shape[2] * shape[3] * (2 if dtype == "fp16-cl" else 4)
            for pass_, factor in (("fwd", 1.0), ("fwd+bwd", 2.5)):
                base = ms * scale * factor
                times = {"cmbn": base, "batchnorm": base * 1.1, "pure": base * 6}
                for variant, t in times.items():
                    records.append({"shape": shape, "dtype": dtype, "pass": pass_, "variant": variant,
                                    "x_bytes": x_bytes, "median_ms": t, "p25_ms": t, "p75_ms": t,
                                    "runs": 10, "launches": 2.0})
                records.append({"shape": shape, "dtype": dtype, "pass": pass_, "variant": "compiled",
                                "x_bytes": x_bytes, "launches": None,
                                "error": "BackendCompilerFailed: made up"})
    meta = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "today",
            "torch_version": torch.__version__, "copy_bandwidth_bytes_per_s": 3.0e12,
            "method": "made-up numbers", "notes": []}
    return {"meta": meta, "variants": benchmark.GPU_VARIANTS, "records": records,
            "e2e": [{"variant": "cmbn", "median_ms": 11.0, "p25_ms": 10.5, "p75_ms": 11.5, "runs": 10},
                    {"variant": "batchnorm", "median_ms": 10.0, "p25_ms": 9.5, "p75_ms": 10.5, "runs": 10}],
            "e2e_description": "made up"}


def test_report_from_fake_gpu_numbers(tmp_path):
    json_path, md_path, text = report.write(_fake_gpu_results(), str(tmp_path))
    assert os.path.basename(md_path) == "nvidia-h100-80gb-hbm3.md"
    document = json.loads(open(json_path).read())
    targets = {t["target"]: t for t in document["targets"]}
    versus_bn = targets["CmBN fwd+bwd / BatchNorm2d, median over shapes, fp32"]
    assert versus_bn["measured"] == pytest.approx(1 / 1.1, abs=1e-3)
    assert versus_bn["met"] is False and "missed by" in versus_bn["miss"]
    versus_pure = targets["CmBN fwd+bwd speed-up over the pure-PyTorch path, median over shapes, fp16-cl"]
    assert versus_pure["met"] is True and versus_pure["measured"] == pytest.approx(6.0)
    floor = next(t for t in document["targets"] if t["target"].startswith("CmBN share of the memory"))
    # Only the (8, 32, 512, 512) rows count; the worst is the fp32 forward: 2 * 268 MB / 3 TB/s / 1 ms.
    assert floor["measured"] == pytest.approx(2 * 8 * 32 * 512 * 512 * 4 / 3.0e12 / 1e-3, abs=1e-3)
    assert floor["met"] is False and "rows below" in floor["miss"]
    assert "| (8, 2048, 7, 7) | fp32 | fwd+bwd |" in text and "| error |" in text
    assert "compiled pure: BackendCompilerFailed: made up (8 rows" in text
    assert "## End-to-end training step" in text and "| 1.10 |" in text


def test_pure_subprocess_plumbing_on_cpu():
    now = time.time()
    records, e2e, notes = benchmark.run_pure_subprocess(
        torch.device("cpu"), [((2, 4, 5, 5), "fp32")], benchmark.SETTINGS["quick"],
        deadline=now + 120, eager_end=now + 60, compile_end=now + 90, compile_=False, e2e=False,
        profile_launches=True)  # on the CPU the profiler counts nothing: only the plumbing runs
    assert notes == [] and e2e == []
    assert sorted(r["pass"] for r in records) == ["fwd", "fwd+bwd"]
    assert all(r["variant"] == "pure" and _finite(r["median_ms"]) and r["launches"] is None
               for r in records)


def test_gpu_stages_run_on_the_cpu(tmp_path, fresh_budget):
    """The GPU part's orchestration (stages, the subprocess, merging, the report) with the CPU standing
    in for the GPU: no CUDA event or profiler runs, every variant's row is filled."""
    args = benchmark.parse_args(["--device", "cuda", "--out", str(tmp_path), "--quick", "--no-compile",
                                 "--no-e2e", "--shapes", "2x4x5x5"])
    results = {"meta": {"device_type": "cuda", "device_name": "stand-in", "method": "-", "notes": []},
               "variants": benchmark.GPU_VARIANTS, "records": [], "e2e": [], "e2e_description": "-"}
    configs = [(shape, dtype) for dtype in args.dtypes for shape in args.shapes]
    benchmark.run_gpu(args, results, benchmark.SETTINGS["quick"], configs,
                      lambda: report.write(results, str(tmp_path)), torch.device("cpu"))
    measured = {(r["dtype"], r["pass"], r["variant"]) for r in results["records"] if not r.get("error")}
    assert measured == {(d, p, v) for d in ("fp16-cl", "fp32") for p in ("fwd", "fwd+bwd")
                        for v in ("cmbn", "cmbn_two_pass", "cmbn_single_read", "batchnorm", "pure")}
    # One plan row per configuration; on plain CPU tensors the planner answers with an error.
    assert [(r["shape"], r["dtype"]) for r in results["plans"]] == [([2, 4, 5, 5], "fp16-cl"),
                                                                     ([2, 4, 5, 5], "fp32")]
    text = report.write(results, str(tmp_path))[2]
    assert "| (2, 4, 5, 5) | fp16-cl | fwd+bwd |" in text and "pure/CmBN" in text and "SR/2P" in text
    assert "## Kernel plans and modeled DRAM traffic (model)" in text


def test_parse_args():
    args = benchmark.parse_args(["--device", "cpu"])
    assert args.out.endswith(os.path.join("bench", "results"))
    assert args.shapes == shapes.CPU_SHAPES and args.dtypes == ["fp32"]
    assert args.threads == 1 and args.budget_s == 900
    # The CPU target shapes first, then each GPU shape not among them, once.
    assert args.shapes[:7] == shapes.CPU_TARGET_SHAPES
    assert sorted(args.shapes) == sorted(set(shapes.CPU_TARGET_SHAPES) | set(shapes.GPU_SHAPES))
    assert benchmark.parse_args(["--device", "cpu", "--threads", "2"]).threads == 2
    args = benchmark.parse_args(["--device", "cuda", "--out", "x", "--shapes", "2x3x4x5"])
    assert args.shapes == [(2, 3, 4, 5)] and args.dtypes == ["fp16-cl", "fp32"] and args.budget_s == 140
    assert args.threads is None
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--device", "cpu", "--shapes", "2x3x4"])


# The methods of torch's raw kineto events that timing.kernels_per_window reads, per torch version:
# torch 2.11's events have no activity_type(); torch 2.14's have both.
KINETO_METHODS = {
    "2.11": ("name", "device_type", "start_ns", "end_ns", "correlation_id", "linked_correlation_id",
             "is_user_annotation"),
    "2.14": ("name", "device_type", "start_ns", "end_ns", "correlation_id", "linked_correlation_id",
             "is_user_annotation", "activity_type"),
}


class _KinetoEvent:
    """Stands for a raw kineto event of one torch version: only that version's methods exist."""

    def __init__(self, version, name, device, start, end, correlation=0, linked=0, activity="cpu_op"):
        values = dict(name=name, device_type=device, start_ns=start, end_ns=end,
                      correlation_id=correlation, linked_correlation_id=linked,
                      is_user_annotation=activity == "gpu_user_annotation", activity_type=activity)
        self._values = {method: values[method] for method in KINETO_METHODS[version]}

    def __getattr__(self, name):
        if name.startswith("_") or name not in self._values:
            raise AttributeError(name)
        return lambda: self._values[name]


def test_torch_events_have_the_methods_the_counter_reads():
    """The installed torch's events have one of the method sets the fakes below stand for."""
    events = torch._C._autograd._KinetoEvent
    assert any(all(hasattr(events, m) for m in methods) for methods in KINETO_METHODS.values())


@pytest.mark.parametrize("version", sorted(KINETO_METHODS))
def test_kernels_are_counted_per_window(version):
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    prefix = timing.WINDOW_PREFIX

    def event(*args, **kwargs):
        return _KinetoEvent(version, *args, **kwargs)

    events = [
        event("aten::randn", cpu, 0, 5, correlation=1),           # setup, outside the windows
        event("normal_kernel", cuda, 6, 7, linked=1, activity="kernel"),
        event(prefix + "0", cpu, 10, 100, correlation=2),
        event("cmbn_ext::cmbn_forward", cpu, 11, 20, correlation=3),
        event("cmbn_forward_kernel", cuda, 21, 30, linked=3, activity="kernel"),
        event("cmbn_forward_kernel", cuda, 31, 40, linked=3, activity="kernel"),
        event("Memset (Device)", cuda, 41, 42, linked=3, activity="gpu_memset"),
        event("Memcpy DtoD (Device -> Device)", cuda, 43, 44, linked=3, activity="gpu_memcpy"),
        event(prefix + "0", cuda, 10, 100, linked=2, activity="gpu_user_annotation"),
        event(prefix + "1", cpu, 200, 300, correlation=4),
        event("triton_red_fused", cuda, 210, 220, linked=4, activity="kernel"),  # no op: the window
        event("Stream Sync", cuda, 290, 295, linked=4, activity="cuda_sync"),
    ]
    assert timing.kernels_per_window(events) == {0: 2, 1: 1}
    assert timing.count_kernels([lambda: (None, None)], torch.device("cpu")) == [None]


def test_article_sample_is_forward_only():
    layer = benchmark.ArticleSampleCrossBatchNorm(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    with pytest.raises(RuntimeError):  # its running statistics keep the first call's graph
        layer(x).sum().backward()


def test_results_stem():
    assert report.results_stem("Intel(R) Xeon(R) Platinum 8480C CPU @ 2.0GHz", "cpu") == \
        "cpu-intel-xeon-platinum-8480c"
    assert report.results_stem("NVIDIA H200", "cuda") == "nvidia-h200"


# ------------------------------------------------------------------------------------ traffic model
def _plan(path, splits, groups=16):
    """A stand-in for cmbn_ext.kernel_plan's dict (the model reads its path and grid)."""
    return {"path": path, "grid": (groups, splits), "block_threads": 256,
            "launches": 1 if path == "single_read" or splits == 1 else 2, "bytes_held": 0, "pack": 8,
            "layout": "rows", "co_resident_blocks": 264, "cooperative": splits > 1}


def test_traffic_model_closed_forms():
    shape = (8, 32, 512, 512)  # 2^26 values: the per-channel vectors are negligible beside x
    fwd_two = traffic_model.traffic(_plan("two_pass", 1), shape, 2, backward=False)
    bwd_two = traffic_model.traffic(_plan("two_pass", 1), shape, 2, backward=True)
    fwd_one = traffic_model.traffic(_plan("single_read", 1), shape, 2, backward=False)
    bwd_one = traffic_model.traffic(_plan("single_read", 1), shape, 2, backward=True)
    x = 2 ** 26 * 2
    assert fwd_two["x_bytes"] == x and fwd_two["workspace_bytes"] == 0
    assert fwd_two["over_floor"] == pytest.approx(1.5, rel=1e-5)        # 3|x| / 2|x|
    assert bwd_two["over_floor"] == pytest.approx(5 / 3, rel=1e-5)      # 5|x| / 3|x|
    assert fwd_one["over_floor"] == 1.0 and bwd_one["over_floor"] == 1.0
    # The vectors, by hand, fp32 statistics: forward reads weight and bias (4 + 4), one history slot
    # (8 + 4 + 4) and writes five statistics (20): 44 bytes a channel; backward reads weight (4) and
    # five statistics (20) and writes two gradients (8): 32.
    assert fwd_two["floor_bytes"] == 2 * x + 32 * 44 and bwd_two["floor_bytes"] == 3 * x + 32 * 32
    assert fwd_two["modeled_bytes"] == 3 * x + 32 * 44 and bwd_two["modeled_bytes"] == 5 * x + 32 * 32


def test_traffic_model_workspace():
    shape = (8, 32, 56, 56)
    # 8 splits: one (count int64, mean, M2) per channel and split forward, (sum dy, sum dy*xc)
    # backward, written once and read back once.
    fwd = traffic_model.traffic(_plan("single_read", 8), shape, 4, backward=False)
    bwd = traffic_model.traffic(_plan("two_pass", 8), shape, 4, backward=True)
    assert fwd["workspace_bytes"] == 2 * 32 * 8 * (8 + 4 + 4)
    assert fwd["modeled_bytes"] - fwd["floor_bytes"] == 2 * 32 * 8 * 16
    assert bwd["workspace_bytes"] == 2 * 32 * 8 * (4 + 4)
    double = traffic_model.traffic(_plan("two_pass", 8), shape, 8, backward=False, acc_bytes=8)
    assert double["workspace_bytes"] == 2 * 32 * 8 * (8 + 8 + 8)


def test_activation_traffic_closed_forms():
    """Fused CmBN + activation against the layer then a separate activation kernel (+2|x| forward,
    +3|x| backward): 1/2 on the single-read path, 8/13 on the two-pass path, the same for both memory
    policies; the fused backward reads the bias on top of the layer's vectors."""
    shape = (8, 32, 512, 512)
    x = 2 ** 26 * 2
    single, double = _plan("single_read", 1), _plan("two_pass", 1)
    for memory in ("standard", "lean"):
        one = traffic_model.activation_traffic(single, single, shape, 2, memory)
        two = traffic_model.activation_traffic(double, double, shape, 2, memory)
        assert one["step"]["ratio"] == pytest.approx(0.5, rel=1e-4)
        assert two["fwd"]["ratio"] == pytest.approx(3 / 5, rel=1e-4)
        assert two["bwd"]["ratio"] == pytest.approx(5 / 8, rel=1e-4)
        assert two["step"]["ratio"] == pytest.approx(8 / 13, rel=1e-4)
        layer_fwd = traffic_model.traffic(single, shape, 2, backward=False)["modeled_bytes"]
        layer_bwd = traffic_model.traffic(single, shape, 2, backward=True)["modeled_bytes"]
        assert one["fwd"] == {"fused": layer_fwd, "unfused": layer_fwd + 2 * x,
                              "ratio": layer_fwd / (layer_fwd + 2 * x)}
        assert one["bwd"]["fused"] == layer_bwd + 32 * 4 and one["bwd"]["unfused"] == layer_bwd + 3 * x
    with pytest.raises(ValueError, match="memory"):
        traffic_model.activation_traffic(single, single, shape, 2, "tiny")


def test_activation_table_from_stand_in_plans():
    rows = [{"shape": [4, 16, 64, 64], "dtype": "fp32", "plans": {}}]
    for setting in traffic_model.PATH_SETTINGS:
        path = "two_pass" if setting == "two_pass" else "single_read"
        for direction, backward in (("fwd", False), ("bwd", True)):
            plan = _plan(path, 1)
            plan["traffic"] = traffic_model.traffic(plan, rows[0]["shape"], 4, backward)
            rows[0]["plans"][f"{setting}/{direction}"] = plan
    text = traffic_model.activation_document(rows)
    assert "**model**" in text and "| single_read (2/4 fwd, 3/6 bwd) | 0.500 | 0.500 |" in text
    assert "| (4, 16, 64, 64) | fp32 | SR/SR | 0.500 / 0.500 | 2P/2P | 0.615 / 0.615 | SR/SR |" in text
    assert text.splitlines()[-1].endswith("| yes |")


def test_plan_table_from_stand_in_plans():
    """collect_plans sets CMBN_KERNEL_PATH around each plan and restores it; the table shows each
    setting's path, launches and modeled bytes over the floor."""
    seen = []

    def kernel_plan(x, backward=False):
        setting = os.environ.get("CMBN_KERNEL_PATH")
        seen.append((setting, backward))
        fits = x.shape[0] <= 4  # a stand-in rule: the small batch fits on chip
        single = setting in ("auto", "single_read") and fits
        plan = _plan("single_read" if single else "two_pass", 1 if x.shape[0] <= 4 else 4)
        return dict(plan, layout="planes" if x.is_contiguous() else "rows")

    os.environ.pop("CMBN_KERNEL_PATH", None)
    rows = traffic_model.collect_plans([(4, 16, 64, 64), (8, 16, 64, 64)], {"fp32": shapes.DTYPES["fp32"]},
                                       "cpu", kernel_plan)
    assert "CMBN_KERNEL_PATH" not in os.environ
    assert seen[:6] == [("auto", False), ("auto", True), ("two_pass", False), ("two_pass", True),
                        ("single_read", False), ("single_read", True)]
    text = "\n".join(traffic_model.plan_markdown(rows))
    # (4, 16, 64, 64) fp32: |x| = 1 MiB beside 16 channels of vectors: 1.50 and 1.67 to two decimals.
    assert ("| (4, 16, 64, 64) | fp32 | planes, 8 | 16 x 1 | 264 | 0.0/0.0 | SR 1 1.00 | SR 1 1.00 | "
            "2P 1 1.50 | 2P 1 1.67 | SR 1 1.00 | SR 1 1.00 |") in text
    # (8, 16, 64, 64): nothing fits, and 4 splits take two launches with a workspace.
    assert "| (8, 16, 64, 64) | fp32 | planes, 8 | 16 x 4 | 264 | 0.0/0.0 | 2P 2 1.50 | 2P 2 1.67 |" in text
    assert "**model**" in text


def test_a_forced_path_that_falls_back_is_not_timed():
    plans = {"single_read/fwd": {"path": "two_pass"}, "single_read/bwd": {"path": "single_read"}}
    assert benchmark.forced_path_not_taken(plans, "cmbn_single_read", "fwd").startswith("skipped")
    assert benchmark.forced_path_not_taken(plans, "cmbn_single_read", "fwd+bwd") is None
    assert benchmark.forced_path_not_taken(plans, "cmbn_two_pass", "fwd") is None
    assert benchmark.forced_path_not_taken(None, "cmbn_single_read", "fwd") is None
    records = benchmark.measure_config((2, 4, 5, 5), "fp32", ["cmbn_single_read"], torch.device("cpu"),
                                       benchmark.SETTINGS["quick"], 5.0, None, plans)
    by_pass = {r["pass"]: r for r in records}
    assert by_pass["fwd"]["error"].startswith("skipped") and "median_ms" not in by_pass["fwd"]
    assert by_pass["fwd+bwd"].get("error") is None and _finite(by_pass["fwd+bwd"]["median_ms"])


def _bench_imports():
    """``{module: bench modules it imports}`` for every bench/*.py, from its source: imports inside
    functions count too."""
    modules = {name[:-3] for name in os.listdir(BENCH) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(BENCH, module + ".py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[module] = imported & modules
    return graph


def test_the_bench_modules_import_each_other_without_a_circle():
    graph = _bench_imports()
    # the parser sees the imports: the shared shapes are imported, and import none of the others
    assert {"report", "shapes", "timing", "traffic_model"} <= graph["benchmark"]
    assert "shapes" in graph["report"] and "shapes" in graph["traffic_model"] and not graph["shapes"]
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import circle: {' -> '.join(path + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize("module", ["shapes", "traffic_model", "report", "timing", "benchmark"])
def test_each_bench_module_imports_first_in_a_fresh_interpreter(module):
    """No bench module needs another to be imported before it (a circle shows as a half-initialized
    module, whose names are missing, depending on which module comes first)."""
    code = (f"import sys; sys.path.insert(0, {BENCH!r}); import {module}; "
            f"import benchmark, report, shapes, timing, traffic_model")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(BENCH))
