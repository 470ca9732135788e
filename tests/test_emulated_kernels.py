"""The CUDA kernels on the CPU: csrc/cuda/ compiled against an emulated CUDA runtime
(tests/emulation), with AddressSanitizer where the compiler has it, runs the kernels' own tests
(test_cuda_kernels.py) and the layer tests with the kernels serving CPU tensors. So every test run
checks the kernels' indexing, reductions, math and memory accesses, and their use by the layers,
with or without a GPU. tests/emulation/README.md says how, and what the emulation cannot see.

Each group runs in a process of its own: there the emulated kernels replace the reference for CPU
tensors, which no other test may see. The groups run quickest first, so `-x` stops early, and
`-k quick` runs the quick ones alone (every kernel instantiation in each regime, on small shapes):

    python -m pytest -x tests/test_emulated_kernels.py -k quick

Each run draws a new order of blocks and threads (CMBN_EMULATION_SEED, printed on failure; set it to
repeat a run). After all groups, the last test checks that together they launched every kernel
instantiation in every phase (`-rP` prints the counts). Needs a C++ compiler, as torch's C++
extensions do; the first run compiles (a minute or two on 2 cores) into build/emulated_kernels.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import emulation

# The runs' working directory: the test paths below are relative to it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = "tests/test_cuda_kernels.py"
LAYER_TESTS = [f"tests/{name}" for name in (
    "test_batchnorm_parity.py", "test_modes.py", "test_layouts_dtypes.py", "test_checkpoint.py",
    "test_activation_checkpointing.py", "test_errors.py", "test_distributed.py",
    "test_train_forward.py", "test_deferred_mode.py", "test_cuda_state_modes.py", "test_host_syncs.py")]
# Test functions of test_cuda_kernels.py by group; "kernels_other" runs the rest of the module.
KERNEL_GROUPS = {
    "quick_regimes": ["test_regime"],
    "quick_parity": ["test_matches_reference", "test_phase_ops_match_reference",
                     "test_update_state_matches_reference", "test_update_state_with_mixed_dtypes"],
    "shapes": ["test_shapes", "test_phase_ops_shapes"],
    "large": ["test_more_than_2_pow_24_values_per_channel", "test_bitwise_deterministic",
              "test_layer_state_matches_reference"],
    "single_read": ["test_paths_give_the_same_bits", "test_single_read_path_up_to_what_fits_on_chip",
                    "test_a_refused_cooperative_launch_falls_back_to_two_pass",
                    "test_a_cooperative_launch_refused_during_capture_is_an_error",
                    "test_kernel_path_switch_and_plan_errors"],
}


def kernel_tests(group):
    return [f"{KERNEL_TESTS}::{test}" for test in KERNEL_GROUPS[group]]


GROUPS = {  # name -> pytest arguments, quickest first
    "quick_regimes": kernel_tests("quick_regimes"),
    "quick_parity": kernel_tests("quick_parity"),
    "kernels_other": [KERNEL_TESTS, *(f"--deselect={test}" for group in KERNEL_GROUPS
                                      for test in kernel_tests(group))],
    "shapes": kernel_tests("shapes"),
    "large": kernel_tests("large"),
    "single_read": kernel_tests("single_read"),
    "layers": LAYER_TESTS,
}
# A GPU of 8 SMs: the single-read tests fill its cooperative grid (16 resident blocks) with inputs
# that stay small; on 132 SMs a full grid is 264 blocks of 256 fibers each.
GROUP_ENVIRONMENT = {"single_read": {"CMBN_EMULATED_SMS": "8"}}
ASAN = emulation.asan_environment()
VARIANT = dict(ASAN, CMBN_EMULATED_KERNELS="asan") if ASAN else {"CMBN_EMULATED_KERNELS": "1"}
if ASAN and os.environ.get("LD_PRELOAD"):  # the sanitizer's runtime first, then what was there
    VARIANT["LD_PRELOAD"] = f"{ASAN['LD_PRELOAD']} {os.environ['LD_PRELOAD']}"
SEED = os.environ.get("CMBN_EMULATION_SEED") or str(random.randrange(2 ** 32))
LAUNCHES = {}  # group -> {(kernel, phase): launches}, from the groups run in this session

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="needs a C++ compiler")


def run_on_the_emulated_kernels(arguments, environment, counts_file):
    """Runs pytest with ``arguments`` on the emulated kernels; returns (exit code, output, summary)."""
    arguments = ["-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "-rfE", *arguments]
    # -s: a sanitizer report ends the process, so it must not wait in pytest's capture.
    result = subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, **VARIANT, **environment, CMBN_EMULATION_SEED=SEED,
                 CMBN_EMULATION_LAUNCH_COUNTS=str(counts_file)),
        timeout=2400)
    output = result.stdout + result.stderr
    settings = " ".join(f"{name}={value}" for name, value in environment.items())
    summary = (f"exit {result.returncode}; to repeat:\n  CMBN_EMULATION_SEED={SEED} {settings} "
               f"CMBN_EMULATED_KERNELS={VARIANT['CMBN_EMULATED_KERNELS']} python {' '.join(arguments)}\n"
               f"(CMBN_EMULATED_KERNELS=asan needs the environment of emulation.asan_environment())\n"
               f"{output[-8000:]}")
    return result.returncode, output, summary


@needs_compiler
@pytest.mark.parametrize("group", list(GROUPS))
def test_passes_on_the_emulated_kernels(group, tmp_path):
    counts_file = tmp_path / "launch_counts.json"
    returncode, output, summary = run_on_the_emulated_kernels(
        GROUPS[group], GROUP_ENVIRONMENT.get(group, {}), counts_file)
    assert returncode == 0, f"{group} failed on the emulated kernels, {summary}"
    # The emulated kernels take the CPU from the reference without overriding a registration (the
    # package's compiled kernels stay unloaded there): the dispatcher would warn.
    assert "Overriding a previously registered kernel" not in output, summary
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, f"no {group} test ran on the emulated kernels, {summary}"
    with open(counts_file) as file:
        LAUNCHES[group] = {(kernel, phase): n for kernel, phase, n in json.load(file)}


@needs_compiler
def test_a_missing_grid_barrier_is_caught(tmp_path):
    """With the grid barrier skipped (the emulation's fault switch), each block of a cooperative
    launch runs to its end alone and merges partials its siblings have not written yet: the
    single-read kernels' tests must fail on every case with a grid barrier, and only there."""
    returncode, output, summary = run_on_the_emulated_kernels(
        [f"{KERNEL_TESTS}::test_paths_give_the_same_bits"],
        dict(GROUP_ENVIRONMENT["single_read"], CMBN_EMULATION_SKIP_GRID_SYNC="1"),
        tmp_path / "launch_counts.json")
    assert returncode != 0, f"the kernels passed without their grid barrier, {summary}"
    failed = set(re.findall(r"FAILED \S+::test_paths_give_the_same_bits\[(\w+)-([\w.]+)\]", output))
    cases, activations = {case for case, _ in failed}, {activation for _, activation in failed}
    assert cases == {"grid_planes", "grid_rows", "grid_rows_odd", "grid_fp64"}, summary
    assert activations == {"none", "silu", "leaky_0.2_from_output"}, summary
    assert len(failed) == len(cases) * len(activations), summary  # each case with every activation
    assert "AssertionError" in output, summary


@needs_compiler
def test_without_a_kernel_image_the_reference_serves(tmp_path):
    """An emulated device the library holds no kernel image for (as a GPU of an architecture it was
    not built for): the ops fall back to the reference, with one warning."""
    test = f"{KERNEL_TESTS}::test_without_a_kernel_image_the_reference_serves_with_one_warning"
    returncode, output, summary = run_on_the_emulated_kernels(
        [test], {"CMBN_EMULATED_NO_KERNEL_IMAGE": "1"}, tmp_path / "launch_counts.json")
    assert returncode == 0 and re.search(r"\b1 passed", output), summary


def launch_table(counts):
    """One line per kernel instantiation: its launches in each phase."""
    order = {"kFused": 0, "kPartial": 1, "kApply": 2, "kGiven": 3, "kBlock": 4, "kGrid": 5}
    phases = sorted({phase for _, phase in counts}, key=lambda phase: (order.get(phase, 6), phase))
    kernels = sorted({kernel for kernel, _ in counts})
    width = max(map(len, kernels))
    lines = [f"{'kernel instantiation':<{width}}" + "".join(f"{p or 'launches':>10}" for p in phases)]
    for kernel in kernels:
        lines.append(f"{kernel:<{width}}" + "".join(
            f"{counts[kernel, p]:>10}" if (kernel, p) in counts else f"{'':>10}" for p in phases))
    return "\n".join(lines)


@needs_compiler
def test_every_kernel_instantiation_is_launched():
    """Together the groups launch every kernel instantiation the library holds in every phase it
    takes, so a regime no test reaches shows here."""
    if set(LAUNCHES) != set(GROUPS):
        pytest.skip("needs every group's run in this session (the whole module, all passing)")
    total = {}
    for counts in LAUNCHES.values():
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    table = launch_table(total)
    print(table)
    never = [f"{kernel} {phase}".strip() for (kernel, phase), n in sorted(total.items()) if n == 0]
    assert not never, f"never launched: {', '.join(never)}\n{table}"
