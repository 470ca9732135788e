"""The CUDA kernels of csrc/cuda/ compiled for the CPU, so their parity tests run without a GPU.

``load()`` translates csrc/cuda/ and the shared files of csrc/ (translate.py), compiles them with g++
against cuda_runtime.h, a CPU emulation of the part of the CUDA runtime the kernels use, and loads
the library into this process. Its kernels then serve ``torch.ops.cmbn_ext.*`` for CPU tensors, in
place of the reference: load it only in a process that runs the kernel tests
(tests/test_emulated_kernels.py starts one).

The emulation runs each thread block's threads one after another between barriers, in a shuffled
order (CMBN_EMULATION_SEED), so it checks indexing, barriers, reductions, the split regimes and the
math, but not timing or memory ordering; compute-sanitizer on a GPU (bench/gpu_check.sh) checks those.
Built with AddressSanitizer, it also reports every read or write outside a tensor. ``launch_counts()``
tells which kernel instantiations and phases ran. README.md here has the details and the limits.
"""
import atexit
import ctypes
import json
import os
import subprocess

import torch
from torch.utils import cpp_extension

from . import translate

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
# The CUDA kernels and their launchers (csrc/cuda/), and the shared headers and C++ autograd (csrc/
# itself); never csrc/cpu/, the CPU kernels, whose place on the CPU the emulated kernels take.
SOURCE_DIRS = (CSRC, os.path.join(CSRC, "cuda"))
DEFAULT_BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "emulated_kernels")
_library = None  # the path of the library loaded in this process


def requested():
    """Whether this process is to run on the emulated kernels: CMBN_EMULATED_KERNELS=1, or asan for
    the AddressSanitizer build."""
    return os.environ.get("CMBN_EMULATED_KERNELS") in ("1", "asan")


def load_if_requested():
    """Loads the emulated kernels when ``requested()``, after the package has defined the ops.

    The package's own compiled kernels (cmbn_ext._C, with CPU kernels and the C++ autograd) stay
    unloaded in such a process (``CMBN_DISABLE_KERNELS=1``, inherited by the processes it starts):
    the emulated kernels are its one set of CPU kernels.
    """
    if requested():
        os.environ["CMBN_DISABLE_KERNELS"] = "1"
        import cmbn_ext  # noqa: F401
        load(address_sanitizer=os.environ["CMBN_EMULATED_KERNELS"] == "asan")
        report = os.environ.get("CMBN_EMULATION_LAUNCH_COUNTS")
        if report:  # tests/test_emulated_kernels.py collects them from each of its runs
            atexit.register(_write_launch_counts, report)


def load(address_sanitizer=False, verbose=False):
    """Compiles (when a source changed) and loads the emulated kernels; returns the library path.

    ``address_sanitizer=True`` builds them with AddressSanitizer, which reports any read or write
    outside a tensor; the process must have its runtime preloaded (``asan_environment()``).
    """
    build_dir = os.environ.get("CMBN_EMULATION_BUILD_DIR", DEFAULT_BUILD_DIR)
    name = "cmbn_ext_emulated_kernels"
    flags = ["-O2"]
    ldflags = []
    if address_sanitizer:
        build_dir, name = os.path.join(build_dir, "asan"), name + "_asan"
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address"]
        ldflags = ["-fsanitize=address"]
    source_dir = os.path.join(build_dir, "src")
    units = translate.translate_tree(SOURCE_DIRS, source_dir)
    units.append(os.path.join(HERE, "runtime.cpp"))
    # Uninitialized locals start as a pattern (NaN-like), not as what the previous block left.
    flags += ["-ffp-contract=off", "-ftrivial-auto-var-init=pattern", "-Wno-unused-variable",
              "-include", os.path.join(HERE, "cuda_runtime.h"),
              "-include", os.path.join(HERE, "poisoned_tensors.h")]
    from cmbn_ext import ops

    # The reference's CPU registrations and Python autograd make way: the library registers its own,
    # overriding none (refused where cmbn_ext._C is loaded).
    ops.make_way_for_cpu_kernels()
    preload = os.environ.pop("LD_PRELOAD", None)  # the compiler and linker run without the sanitizer
    try:
        library = cpp_extension.load(
            name=name,
            sources=units,
            extra_include_paths=[os.path.join(HERE, "include"), source_dir],
            extra_cflags=flags,
            extra_ldflags=ldflags,
            build_directory=build_dir,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    _check_serves_cpu(source_dir)
    global _library
    _library = library
    return library


def launch_counts():
    """``{(kernel, phase): launches}`` in this process so far, with every kernel instantiation the
    library holds and every phase it takes, launched or not (0). Needs ``load()`` first."""
    if _library is None:
        raise RuntimeError("the emulated kernels are not loaded in this process")
    function = ctypes.CDLL(_library).cmbn_emulation_launch_counts
    function.restype = ctypes.c_char_p
    counts = {}
    for line in function().decode().splitlines():
        kernel, phase, launches = line.split("\t")
        counts[kernel, phase] = int(launches)
    return counts


def _write_launch_counts(path):
    with open(path, "w") as file:
        json.dump([[kernel, phase, n] for (kernel, phase), n in launch_counts().items()], file)


def _check_serves_cpu(source_dir):
    """Every op's CPU kernel must now be the emulated one: a test run on the reference would pass
    without checking any kernel."""
    from cmbn_ext.ops import REFERENCE  # every op, by name

    for op in REFERENCE:
        table = torch._C._dispatch_dump_table(f"cmbn_ext::{op}")
        cpu = next((line for line in table.splitlines() if line.startswith("CPU:")), "")
        if source_dir not in cpu:
            raise RuntimeError(f"the emulated kernels do not serve cmbn_ext::{op} on the CPU ({cpu!r})")


def asan_environment():
    """The environment a process needs to load the AddressSanitizer build, or None when the compiler
    has no AddressSanitizer runtime. The C++ runtime is preloaded too, or the sanitizer cannot find
    the real __cxa_throw for the first exception thrown after start-up (pybind11's, torch's). Leak
    reports are off: the interpreter itself keeps memory."""
    runtimes = [_compiler_file("libasan.so"), _compiler_file("libstdc++.so.6")]
    if None in runtimes:
        return None
    return {"LD_PRELOAD": " ".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0"}


def _compiler_file(name):
    """The path of the compiler's library ``name``, or None."""
    try:
        path = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return os.path.realpath(path) if os.path.isabs(path) else None  # else it echoes the bare name
