#!/usr/bin/env bash
# One-command check of the CUDA kernels on a GPU machine, offline, in this order (value over cost):
#   1. build cmbn_ext._C in place with the machine's python3 and nvcc, for the local GPU only;
#   2. the GPU tests (tests/test_cuda_kernels.py, tests/test_host_syncs.py);
#   3. CmBN over a one-rank NCCL group against the layer alone (bench/nccl_case.py);
#   4. compute-sanitizer memcheck and racecheck on a small case (bench/sanitizer_case.py);
#   5. the host cost per call against BatchNorm2d (bench/host_overhead.py) and the benchmark
#      (bench/benchmark.py: the kernels on the auto path and on each forced path, and their launch
#      plans with modeled traffic in its report), only when the kernels loaded.
# A failing step does not stop the next ones. Every step, the Python probes included, runs under
# `timeout`, and the whole check is held to a budget (default 420 s); the benchmark's share is kept
# for it, so slow sanitizers cannot starve it.
#
# OUT_DIR ends with at most 7 files, because a remote runner may bring back only a few:
#   summary.txt       the steps' status and times, the machine and tools (rewritten after each step)
#   tests.log         the GPU tests' output
#   logs.tar.gz       every step's log (rewritten after each step, so a stopped run keeps what ran)
#   <device>.json/.md, host-<device>.json/.md
#                     the benchmarks' results (bench/results/ holds the committed ones)
#
# Usage: bench/gpu_check.sh [OUT_DIR]      (default: /tmp/cmbn_gpu_check)
# Environment:
#   PYTHON                  the interpreter (default python3)
#   CMBN_CHECK_BUDGET_S     the whole check's budget in seconds (default 420; short mode 180)
#   CMBN_CHECK_BENCH_S      the benchmark's share of it, kept free of the earlier steps (100; short 45)
#   CMBN_CHECK_SHORT=1      a rerun in about 3 minutes: build, tests and one benchmark shape; no NCCL
#                           case and no sanitizers
#   CMBN_CHECK_SANITIZER=1  run compute-sanitizer even under gVisor, which refuses the device
# Exits non-zero if any step failed or was skipped for lack of time.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${TMPDIR:-/tmp}/cmbn_gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/cmbn_gpu_check_logs.XXXXXX")"
PY="${PYTHON:-python3}"
SHORT="${CMBN_CHECK_SHORT:-0}"
if [[ "$SHORT" == 1 ]]; then
    BUDGET_S="${CMBN_CHECK_BUDGET_S:-180}"
    BENCH_S="${CMBN_CHECK_BENCH_S:-45}"
else
    BUDGET_S="${CMBN_CHECK_BUDGET_S:-420}"
    BENCH_S="${CMBN_CHECK_BENCH_S:-100}"
fi
DEADLINE=$((SECONDS + BUDGET_S))
SUMMARY=()
FAILED=0
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# The interpreter's own bin folders first, so that the ninja and tools pip installed beside it are
# found (without ninja the build is serial).
PY_BINS="$(timeout 60 "$PY" -c 'import os, sys, sysconfig
print(os.path.dirname(sys.executable) + os.pathsep + sysconfig.get_path("scripts"))' 2>/dev/null)"
[[ -n "$PY_BINS" ]] && export PATH="$PY_BINS:$PATH"

# write_outputs: summary.txt and logs.tar.gz as they stand now.
write_outputs() {
    {
        echo "cmbn_ext gpu_check$([[ "$SHORT" == 1 ]] && echo " (short mode)"):" \
            "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}, ${SECONDS}s of a ${BUDGET_S}s budget"
        printf '%s\n' "${SUMMARY[@]}"
        if ((FAILED)); then echo "RESULT: some steps failed or were skipped"; else echo "RESULT: all steps passed"; fi
        echo
        cat "$LOGS/environment.log" 2>/dev/null
    } >"$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

record() {
    SUMMARY+=("$1")
    write_outputs
}

# run_step NAME WANTED_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND with its output in NAME.log,
# for at most WANTED_SECONDS or what is left of the budget after RESERVE_SECONDS kept for later
# steps, and records its status.
run_step() {
    local name="$1" wanted="$2" reserve="$3"
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
    local limit=$((wanted < left ? wanted : left))
    if ((limit < 10)); then
        FAILED=1
        record "$(printf '%-10s SKIPPED (out of time)' "$name")"
        return
    fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local status="ok"
    if ((rc == 124 || rc == 137)); then
        status="TIMED OUT"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    ((rc != 0)) && FAILED=1
    tail -n 3 "$LOGS/$name.log" | sed 's/^/   /'
    record "$(printf '%-10s %-18s %4ss of %4ss' "$name" "$status" $((SECONDS - start)) "$limit")"
}

skip_step() {
    record "$(printf '%-10s SKIPPED (%s)' "$1" "$2")"
}

# ---------------------------------------------------------------------------------- environment
# The toolkit root: the first candidate that really holds the CUDA headers. A wrapper nvcc outside
# the toolkit (/usr/local/bin/nvcc) would make torch guess /usr/local and fail to link -lcudart.
for candidate in "${CUDA_HOME:-}" /usr/local/cuda \
        "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
    if [[ -n "$candidate" && -f "$candidate/include/cuda_runtime.h" ]]; then
        export CUDA_HOME="$candidate"
        break
    fi
done
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
KERNEL_RELEASE="$(uname -r)"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $KERNEL_RELEASE (4.4.0 is gVisor, where compute-sanitizer refuses the device)"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
        | sed 's/^/gpu: /'
    timeout 60 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable,
"| torch", torch.__version__, "cuda", torch.version.cuda, "| gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1 | tail -n 3
    echo "CUDA_HOME: ${CUDA_HOME:-not found}"
    for tool in nvcc "$SANITIZER" ninja; do
        if command -v "$tool" >/dev/null; then
            echo "$(basename "$tool"): $(command -v "$tool") ($(timeout 30 "$tool" --version 2>&1 | tail -n 1))"
        else
            echo "$(basename "$tool"): not found"
        fi
    done
} >"$LOGS/environment.log" 2>&1
cat "$LOGS/environment.log"
ARCH="$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MAX_JOBS=16 CMBN_BUILD_CUDA=1

# ---------------------------------------------------------------------------------------- steps
# Time kept for the benchmark while the steps before it run (it runs last: it needs the GPU alone).
run_step build 240 "$BENCH_S" "$PY" setup.py build_ext --inplace --build-temp /tmp/cmbn_gpu_check_build

LOADED=$(timeout 60 "$PY" -c 'import cmbn_ext; print(cmbn_ext.has_cuda_kernels())' 2>>"$LOGS/build.log")
if [[ "$LOADED" != "True" ]]; then
    FAILED=1
    record "$(printf '%-10s %s' kernels "NOT LOADED: cmbn_ext.has_cuda_kernels() is ${LOADED:-an error}")"
fi

if timeout 60 "$PY" -m pytest --version >/dev/null 2>&1; then
    run_step tests 200 "$BENCH_S" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py tests/test_host_syncs.py
    cp "$LOGS/tests.log" "$OUT/tests.log" 2>/dev/null
else
    skip_step tests "pytest is not installed: GPU tests NOT run; only the sanitizer smoke case below"
    run_step smoke 60 "$BENCH_S" "$PY" bench/sanitizer_case.py
fi

if [[ "$SHORT" == 1 ]]; then
    skip_step nccl "short mode"
    skip_step memcheck "short mode"
    skip_step racecheck "short mode"
else
    run_step nccl 60 "$BENCH_S" env NCCL_DEBUG=WARN "$PY" bench/nccl_case.py
    if [[ ! -x "$SANITIZER" ]]; then
        skip_step memcheck "compute-sanitizer not found"
        skip_step racecheck "compute-sanitizer not found"
    elif [[ "$KERNEL_RELEASE" == 4.4.0* && "${CMBN_CHECK_SANITIZER:-0}" != 1 ]]; then
        skip_step memcheck "gVisor (kernel 4.4.0): compute-sanitizer refuses the device"
        skip_step racecheck "gVisor (kernel 4.4.0): compute-sanitizer refuses the device"
    else
        # A Python target takes seconds to import torch before it attaches: the default 10 s launch
        # timeout is too short. Without the caching allocator every tensor is its own allocation, so
        # out-of-bounds accesses show.
        run_step memcheck 90 "$BENCH_S" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
            --launch-timeout 60 --error-exitcode 1 "$PY" bench/sanitizer_case.py
        run_step racecheck 90 "$BENCH_S" "$SANITIZER" --tool racecheck --launch-timeout 60 \
            --error-exitcode 1 "$PY" bench/sanitizer_case.py
    fi
fi

if [[ "$LOADED" != "True" ]]; then
    skip_step host "the kernels did not load: it would time the pure-PyTorch path"
    skip_step benchmark "the kernels did not load: it would time the pure-PyTorch path"
else
    run_step host 60 "$BENCH_S" "$PY" bench/host_overhead.py --device cuda --out "$OUT"
    # The benchmark holds itself to its budget; its step gets a margin on top for start and report.
    LEFT=$((DEADLINE - SECONDS))
    BENCH_LIMIT=$((LEFT < BENCH_S ? LEFT : BENCH_S))
    BENCH_ARGS=(--device cuda --out "$OUT" --budget-s $((BENCH_LIMIT > 30 ? BENCH_LIMIT - 10 : 20)))
    [[ "$SHORT" == 1 ]] && BENCH_ARGS+=(--shapes 8x64x56x56 --no-compile)
    run_step benchmark "$BENCH_LIMIT" 0 "$PY" bench/benchmark.py "${BENCH_ARGS[@]}"
fi

# -------------------------------------------------------------------------------------- summary
write_outputs
cat "$OUT/summary.txt"
rm -rf "$LOGS"
exit "$FAILED"
