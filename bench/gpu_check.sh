#!/usr/bin/env bash
# One-command check of the CUDA kernels on a GPU machine, offline:
#   1. build cmbn_ext._C in place with the machine's python3 and nvcc, for the local GPU only;
#   2. run the GPU tests (tests/test_cuda_kernels.py);
#   3. compute-sanitizer memcheck and racecheck on a small case (bench/sanitizer_case.py);
#   4. CmBN over a one-rank NCCL group against the layer alone (bench/nccl_case.py);
#   5. the benchmark, when bench/benchmark.py exists.
# Every step's log goes to OUT_DIR; a failing step does not stop the next ones; the whole run is held
# to 8 minutes (each step gets what is left). Prints a summary (also OUT_DIR/summary.txt) and exits
# non-zero if any step failed.
#
# Usage: bench/gpu_check.sh [OUT_DIR]      (default: /tmp/cmbn_gpu_check)
# Environment: PYTHON (default python3), CMBN_CHECK_BUDGET_S (default 470 seconds).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${TMPDIR:-/tmp}/cmbn_gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${CMBN_CHECK_BUDGET_S:-470}"
DEADLINE=$((SECONDS + BUDGET_S))
SUMMARY=()
FAILED=0
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# run_step NAME WANTED_SECONDS COMMAND...: runs COMMAND with its output in OUT/NAME.log, for at most
# WANTED_SECONDS or what is left of the budget, and records its status.
run_step() {
    local name="$1" wanted="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    local limit=$((wanted < left ? wanted : left))
    if ((limit < 10)); then
        SUMMARY+=("$(printf '%-12s SKIPPED (out of time)' "$name")")
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s, log $OUT/$name.log)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local status="ok"
    if ((rc == 124 || rc == 137)); then
        status="TIMED OUT"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    ((rc != 0)) && FAILED=1
    SUMMARY+=("$(printf '%-12s %-18s %4ss  %s' "$name" "$status" $((SECONDS - start)) "$name.log")")
    tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
}

skip_step() {
    SUMMARY+=("$(printf '%-12s SKIPPED (%s)' "$1" "$2")")
}

# ---------------------------------------------------------------------------------- environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
} >"$OUT/environment.log" 2>&1
cat "$OUT/environment.log"

# The toolkit root: the first candidate that really holds the CUDA headers. A wrapper nvcc outside
# the toolkit (/usr/local/bin/nvcc) would make torch guess /usr/local and fail to link -lcudart.
for candidate in "${CUDA_HOME:-}" /usr/local/cuda \
        "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
    if [[ -n "$candidate" && -f "$candidate/include/cuda_runtime.h" ]]; then
        export CUDA_HOME="$candidate"
        break
    fi
done
echo "CUDA_HOME=${CUDA_HOME:-not found}" | tee -a "$OUT/environment.log"
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MAX_JOBS=16 CMBN_BUILD_CUDA=1

# ---------------------------------------------------------------------------------------- steps
run_step build 300 "$PY" setup.py build_ext --inplace --build-temp /tmp/cmbn_gpu_check_build

BUILT=$("$PY" -c 'import cmbn_ext; print(cmbn_ext.has_cuda_kernels())' 2>>"$OUT/build.log")
if [[ "$BUILT" != "True" ]]; then
    SUMMARY+=("$(printf '%-12s %s' kernels "NOT LOADED: cmbn_ext.has_cuda_kernels() is ${BUILT:-an error}")")
    FAILED=1
fi

if "$PY" -m pytest --version >/dev/null 2>&1; then
    run_step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py
else
    skip_step tests "pytest is not installed: GPU tests NOT run; only the sanitizer smoke case below"
    run_step smoke 60 "$PY" bench/sanitizer_case.py
fi

SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [[ -x "$SANITIZER" ]]; then
    # Without the caching allocator every tensor is its own allocation, so out-of-bounds accesses show.
    run_step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 "$PY" bench/sanitizer_case.py
    run_step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" bench/sanitizer_case.py
else
    skip_step memcheck "compute-sanitizer not found"
    skip_step racecheck "compute-sanitizer not found"
fi

run_step nccl 60 "$PY" bench/nccl_case.py

if [[ -f bench/benchmark.py ]]; then
    # The benchmark holds itself to a budget: give it what its step will really get, less a margin.
    BENCH_S=$(( 170 < DEADLINE - SECONDS ? 170 : DEADLINE - SECONDS ))
    run_step benchmark "$BENCH_S" "$PY" bench/benchmark.py --device cuda --out "$OUT" \
        --budget-s $((BENCH_S > 30 ? BENCH_S - 15 : 15))
else
    skip_step benchmark "bench/benchmark.py does not exist"
fi

# -------------------------------------------------------------------------------------- summary
{
    echo "cmbn_ext gpu_check: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, ${SECONDS}s, logs in $OUT"
    printf '%s\n' "${SUMMARY[@]}"
    ((FAILED)) && echo "RESULT: some steps failed or were skipped" || echo "RESULT: all steps passed"
} | tee "$OUT/summary.txt"
exit "$FAILED"
