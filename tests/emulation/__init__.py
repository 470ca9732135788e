"""The CUDA kernels of csrc/ compiled for the CPU, so their parity tests run without a GPU.

``load()`` translates csrc/ (translate.py), compiles it with g++ against cuda_runtime.h, a CPU
emulation of the part of the CUDA runtime the kernels use, and loads the library into this process.
Its kernels then serve ``torch.ops.cmbn_ext.*`` for CPU tensors, in place of the reference: load it
only in a process that runs the kernel tests (tests/test_emulated_kernels.py starts one).

The emulation runs each thread block's threads one after another between barriers, so it checks
indexing, reductions, the split regimes and the math bit for bit reproducibly, but not timing or
memory ordering; compute-sanitizer on a GPU (bench/gpu_check.sh) checks those.
"""
import os

import torch
from torch.utils import cpp_extension

from . import translate

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
DEFAULT_BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "emulated_kernels")


def load(build_dir=None, verbose=False):
    """Compiles (when a source changed) and loads the emulated kernels; returns the library path."""
    build_dir = build_dir or os.environ.get("CMBN_EMULATION_BUILD_DIR", DEFAULT_BUILD_DIR)
    source_dir = os.path.join(build_dir, "src")
    units = translate.translate_tree(CSRC, source_dir)
    flags = ["-O2", "-ffp-contract=off", "-Wno-unused-variable",
             "-include", os.path.join(HERE, "cuda_runtime.h"),
             "-include", os.path.join(HERE, "poisoned_tensors.h")]
    return cpp_extension.load(
        name="cmbn_ext_emulated_kernels",
        sources=units,
        extra_include_paths=[os.path.join(HERE, "include"), source_dir],
        extra_cflags=flags,
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )
