"""The CUDA kernels on the CPU: csrc/ compiled against an emulated CUDA runtime (tests/emulation), with
AddressSanitizer where the compiler has it, runs the kernels' own tests (test_cuda_kernels.py) and the
layer tests with the kernels serving CPU tensors. So every test run checks the kernels' indexing,
reductions, math and memory accesses, and their use by the layers, with or without a GPU.

Each group runs in a process of its own: there the emulated kernels replace the reference for CPU
tensors, which no other test may see. Needs a C++ compiler, as torch's C++ extensions do; the first
run compiles (a minute or two on 2 cores) into build/emulated_kernels.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

import emulation

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TESTS = os.path.join(HERE, "test_cuda_kernels.py")
LAYER_TESTS = [os.path.join(HERE, name) for name in (
    "test_batchnorm_parity.py", "test_modes.py", "test_layouts_dtypes.py", "test_checkpoint.py",
    "test_activation_checkpointing.py", "test_errors.py", "test_distributed.py")]
GROUPS = {  # name -> pytest arguments
    "fused_ops": ["-k", "not phase_ops and not update_state", KERNEL_TESTS],
    "phase_ops": ["-k", "phase_ops", KERNEL_TESTS],
    "update_state": ["-k", "update_state", KERNEL_TESTS],
    "layers": LAYER_TESTS,
}
ASAN = emulation.asan_environment()
VARIANT = dict(ASAN, CMBN_EMULATED_KERNELS="asan") if ASAN else {"CMBN_EMULATED_KERNELS": "1"}
if ASAN and os.environ.get("LD_PRELOAD"):  # the sanitizer's runtime first, then what was there
    VARIANT["LD_PRELOAD"] = f"{ASAN['LD_PRELOAD']} {os.environ['LD_PRELOAD']}"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("group", list(GROUPS))
def test_passes_on_the_emulated_kernels(group):
    # -s: a sanitizer report ends the process, so it must not wait in pytest's capture.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "-rfE", *GROUPS[group]],
        cwd=os.path.dirname(HERE), env=dict(os.environ, **VARIANT), capture_output=True, text=True,
        timeout=2400)
    output = result.stdout + result.stderr
    summary = f"CMBN_EMULATED_KERNELS={VARIANT['CMBN_EMULATED_KERNELS']}, exit {result.returncode}:\n" \
              f"{output[-8000:]}"
    assert result.returncode == 0, f"{group} failed on the emulated kernels, {summary}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, f"no {group} test ran on the emulated kernels, {summary}"
