"""The CUDA kernels' own tests (test_cuda_kernels.py) on the CPU, against csrc/ compiled for it by
tests/emulation, so every test run checks the kernels' indexing, reductions and math against the
reference, with or without a GPU.

Each group runs in a process of its own: there the emulated kernels replace the reference for CPU
tensors, which no other test may see. Needs a C++ compiler, as torch's C++ extensions do; the first
run compiles (about a minute on 2 cores) into build/emulated_kernels.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TESTS = os.path.join(HERE, "test_cuda_kernels.py")
GROUPS = {  # name -> pytest -k expression over test_cuda_kernels.py
    "fused_ops": "not phase_ops and not update_state",
    "phase_ops": "phase_ops",
    "update_state": "update_state",
}


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("group", list(GROUPS))
def test_kernel_tests_pass_on_the_emulated_kernels(group):
    env = dict(os.environ, CMBN_EMULATED_KERNELS="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-k", GROUPS[group],
         KERNEL_TESTS],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    summary = output[-6000:]
    assert result.returncode == 0, f"emulated kernel tests failed ({group}):\n{summary}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, f"no emulated kernel test ran ({group}):\n{summary}"
