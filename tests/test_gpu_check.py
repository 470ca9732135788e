"""bench/gpu_check.sh's plumbing, run on this machine with stand-ins for the GPU machine's tools.

A stand-in python3, nvidia-smi, compute-sanitizer and uname on PATH record how they were called; the
script's real bash logic runs: step order, time limits, what ends up in the output folder (a remote
runner may bring back only 8 files), the short mode, and skipping what cannot run.
"""
import os
import shutil
import subprocess
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
MAX_FILES_BACK = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# The stand-in interpreter: answers the script's probes, sleeps where told, writes the benchmark's
# results where --out says, and logs each call (with NCCL_DEBUG) to $FAKE_LOG.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "python $* NCCL_DEBUG=${NCCL_DEBUG:-}" >>"$FAKE_LOG"
case "$1" in
  -c)
    case "$2" in
      *sysconfig*) echo "$(dirname "$0")" ;;
      *get_device_capability*) echo 9.0 ;;
      *has_cuda_kernels*) echo "${FAKE_LOADED:-True}" ;;
      *) echo "python 3.12 | torch 2.11.0+cu130 cuda 13.0 | gpu NVIDIA H200" ;;
    esac ;;
  -m) [[ "$3" == --version ]] && echo "pytest 9" || { sleep "${FAKE_TEST_S:-0}"; echo "5 passed"; } ;;
  setup.py) sleep "${FAKE_BUILD_S:-0}"; echo "built" ;;
  bench/benchmark.py)
    while [[ $# -gt 0 && "$1" != --out ]]; do shift; done
    echo '{}' >"$2/nvidia-h200.json"; echo '| table |' >"$2/nvidia-h200.md"; echo "targets met: 1 of 1" ;;
  bench/host_overhead.py)
    while [[ $# -gt 0 && "$1" != --out ]]; do shift; done
    echo '{}' >"$2/host-nvidia-h200.json"; echo '| table |' >"$2/host-nvidia-h200.md" ;;
  *) echo "ran $1" ;;
esac
"""
FAKE_SANITIZER = r"""#!/usr/bin/env bash
echo "compute-sanitizer $*" >>"$FAKE_LOG"
while [[ $# -gt 0 && "$1" != */python3 ]]; do shift; done
exec "$@"
"""
FAKE_NVIDIA_SMI = "#!/usr/bin/env bash\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n"
FAKE_UNAME = "#!/usr/bin/env bash\necho \"${FAKE_KERNEL:-6.18.44-fc}\"\n"


@pytest.fixture
def fake_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER),
                       ("nvidia-smi", FAKE_NVIDIA_SMI), ("uname", FAKE_UNAME)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return tmp_path


def run_check(machine, **env):
    out = machine / "out"
    log = machine / "calls.log"
    log.write_text("")
    environment = dict(os.environ, PATH=f"{machine / 'bin'}:{os.environ['PATH']}",
                       PYTHON=str(machine / "bin" / "python3"), FAKE_LOG=str(log),
                       TMPDIR=str(machine), **env)
    environment.pop("CUDA_HOME", None)
    started = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=environment, capture_output=True, text=True,
                          timeout=120)
    files = sorted(os.listdir(out))
    summary = (out / "summary.txt").read_text()
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = sorted(os.path.basename(n) for n in archive.getnames() if n.endswith(".log"))
    return proc, files, summary, logs, log.read_text(), time.monotonic() - started


def step_lines(summary):
    return {line.split()[0]: line for line in summary.splitlines()
            if line.split() and line.split()[0] in ("build", "kernels", "tests", "nccl", "memcheck",
                                                     "racecheck", "host", "benchmark")}


def test_full_check_leaves_few_files_and_runs_every_step(fake_machine):
    proc, files, summary, logs, calls, _ = run_check(fake_machine)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files == ["host-nvidia-h200.json", "host-nvidia-h200.md", "logs.tar.gz", "nvidia-h200.json",
                     "nvidia-h200.md", "summary.txt", "tests.log"]
    assert len(files) <= MAX_FILES_BACK
    steps = step_lines(summary)
    assert list(steps) == ["build", "tests", "nccl", "memcheck", "racecheck", "host", "benchmark"]
    assert all(" ok " in line for line in steps.values()), summary
    assert "RESULT: all steps passed" in summary and "kernel: 6.18.44-fc" in summary
    assert "nvcc:" in summary and "compute-sanitizer:" in summary and "ninja:" in summary
    assert logs == ["benchmark.log", "build.log", "environment.log", "host.log", "memcheck.log",
                    "nccl.log", "racecheck.log", "tests.log"]
    assert "python bench/nccl_case.py NCCL_DEBUG=WARN" in calls
    sanitizer_calls = [line for line in calls.splitlines() if line.startswith("compute-sanitizer --tool")]
    assert len(sanitizer_calls) == 2 and all("--launch-timeout 60" in c for c in sanitizer_calls)
    # The NCCL case runs before the sanitizers, and the benchmark last, within its share of the budget.
    order = [line.split()[1] for line in calls.splitlines() if line.startswith("python bench/")]
    assert order == ["bench/nccl_case.py", "bench/sanitizer_case.py", "bench/sanitizer_case.py",
                     "bench/host_overhead.py", "bench/benchmark.py"]
    assert "--budget-s 90" in calls and "--shapes" not in calls


def test_short_mode_runs_build_tests_and_one_benchmark_shape(fake_machine):
    proc, files, summary, _, calls, _ = run_check(fake_machine, CMBN_CHECK_SHORT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(files) <= MAX_FILES_BACK and "summary.txt" in files
    steps = step_lines(summary)
    assert all("SKIPPED (short mode)" in steps[name] for name in ("nccl", "memcheck", "racecheck"))
    assert all(" ok " in steps[name] for name in ("build", "tests", "host", "benchmark"))
    assert "180s budget" in summary.splitlines()[0] and "short mode" in summary.splitlines()[0]
    assert "--shapes 8x64x56x56 --no-compile" in calls and "--budget-s 35" in calls
    assert "compute-sanitizer --tool" not in calls and "nccl_case" not in calls


def test_no_benchmark_when_the_kernels_did_not_load(fake_machine):
    proc, files, summary, _, calls, _ = run_check(fake_machine, FAKE_LOADED="False")
    assert proc.returncode != 0
    assert "NOT LOADED" in step_lines(summary)["kernels"]
    assert "SKIPPED (the kernels did not load" in step_lines(summary)["benchmark"]
    assert "SKIPPED (the kernels did not load" in step_lines(summary)["host"]
    assert "bench/benchmark.py" not in calls and "host_overhead" not in calls and "summary.txt" in files


def test_sanitizers_skipped_under_gvisor(fake_machine):
    proc, _, summary, _, calls, _ = run_check(fake_machine, FAKE_KERNEL="4.4.0")
    assert "SKIPPED (gVisor" in step_lines(summary)["memcheck"]
    assert "compute-sanitizer --tool" not in calls
    assert " ok " in step_lines(summary)["nccl"] and " ok " in step_lines(summary)["benchmark"]
    proc, _, summary, _, calls, _ = run_check(fake_machine, FAKE_KERNEL="4.4.0", CMBN_CHECK_SANITIZER="1")
    assert " ok " in step_lines(summary)["memcheck"] and "compute-sanitizer --tool memcheck" in calls


def test_a_hanging_step_is_stopped_at_the_budget(fake_machine):
    """A build that never ends is stopped when the budget runs out, and the summary says what ran."""
    proc, files, summary, logs, calls, elapsed = run_check(
        fake_machine, FAKE_BUILD_S="1000", CMBN_CHECK_BUDGET_S="14", CMBN_CHECK_BENCH_S="0")
    assert proc.returncode != 0 and elapsed < 40
    steps = step_lines(summary)
    assert "TIMED OUT" in steps["build"]
    assert all("SKIPPED (out of time)" in steps[name] for name in ("tests", "nccl", "memcheck",
                                                                    "racecheck", "host", "benchmark"))
    assert "build.log" in logs and files == ["logs.tar.gz", "summary.txt"]
