"""Builds the ``cmbn_ext`` package with its compiled kernels (``cmbn_ext._C``) where they can be built.

``_C`` holds the CPU kernels (csrc/cpu/), the op's autograd in C++ (csrc/autograd.cpp) and, where they
build, the CUDA kernels and their launchers (csrc/cuda/); both families share the headers in csrc/
itself. The CPU kernels are compiled whenever torch and a C++ compiler are present;
``CMBN_BUILD_CPU=0`` leaves them out (CPU tensors then take the pure-PyTorch reference).
``CMBN_BUILD_CUDA=1`` compiles the CUDA kernels even without a GPU (they need nvcc and a CUDA build of
torch); ``CMBN_BUILD_CUDA=0`` never compiles them; unset, they are built when a GPU is visible.
``TORCH_CUDA_ARCH_LIST`` picks the architectures; unset, the build compiles for the architectures of
the visible GPUs (as torch's extension builder does), or, with none visible, for every architecture the
installed nvcc compiles for from 7.0 to 9.0, plus PTX for 9.0 that newer GPUs compile when they load it
(``cuda_arch_list``). The choice is printed. With both switches at 0 nothing is compiled: the
pure-PyTorch package.

The kernels compile against the torch already installed, which pip's build isolation hides (it builds
in a fresh environment with only the build requirements): ``pip install --no-build-isolation -e .``
lets the build see it. Without torch, the pure-PyTorch package is built, or with ``CMBN_BUILD_CUDA=1``
(or ``CMBN_BUILD_CPU=1``) the build stops and says what to run.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Without a visible GPU: every architecture nvcc compiles for in this range (7.0 needs nvcc 12 or older;
# nvcc 13 starts at 7.5), and PTX for the newest, which GPUs after it compile when they load it.
OLDEST_ARCH = (7, 0)
NEWEST_ARCH = (9, 0)
# When nvcc cannot say what it supports: the architectures every nvcc from 11.8 to 13 compiles for.
FALLBACK_ARCHS = [(7, 5), (8, 0), (8, 6), (9, 0)]
NO_TORCH = ("torch is not importable in this build environment. pip builds in an isolated environment "
            "without your torch unless told otherwise: install torch first (pip install torch), then "
            "run pip install --no-build-isolation -e .")
# Compiled into every _C: the Python module shell and the op's autograd, for CPU and CUDA tensors alike.
COMMON_SOURCES = ["csrc/autograd.cpp", "csrc/python_module.cpp"]


def _say(message):
    print(f"cmbn_ext setup: {message}", flush=True)


def _pip_cuda_includes():
    """CUDA headers that torch includes but that ship only in the pip CUDA packages (cusparse.h, ...)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [path for root in roots for path in glob.glob(os.path.join(root, "cu*", "include"))]


def nvcc_architectures(cuda_home):
    """(major, minor) of each real architecture the toolkit's nvcc compiles for (``--list-gpu-arch``),
    or [] when nvcc cannot say."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = re.findall(r"compute_(\d+)\b", listing)  # compute_90a and the like are not real targets
    return sorted({(int(digits[:-1]), int(digits[-1])) for digits in found})


def visible_gpu_architectures(torch):
    """(major, minor) of each GPU this build environment sees."""
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def _versions(archs):
    return ";".join(f"{major}.{minor}" for major, minor in archs)


def _arch_text(archs):
    return _versions(archs) + "+PTX"


def cuda_arch_list(visible, supported):
    """TORCH_CUDA_ARCH_LIST for a build that does not set it, and a line that says why.

    ``visible``: the architectures of the visible GPUs; ``supported``: those nvcc compiles for. With
    GPUs visible, theirs (a GPU newer than nvcc knows gets nvcc's newest, whose PTX it compiles), as
    torch's extension builder chooses; else every architecture nvcc supports from OLDEST_ARCH to
    NEWEST_ARCH. PTX for the newest of the list.
    """
    newest = max(supported) if supported else None
    usable = sorted({min(arch, newest) if newest else arch for arch in visible
                     if not supported or arch >= min(supported)})
    too_old = [arch for arch in visible if supported and arch < min(supported)]
    note = (f"; this nvcc cannot compile for {_versions(too_old)} (nvcc 12 still does): those GPUs "
            "use the pure-PyTorch implementation" if too_old else "")
    if usable:
        return _arch_text(usable), f"the visible GPUs' architectures{note}"
    in_range = [arch for arch in supported if OLDEST_ARCH <= arch <= NEWEST_ARCH]
    if in_range:
        why = "no GPU visible" if not visible else "no visible GPU that this nvcc compiles for"
        return (_arch_text(in_range), f"{why}: every architecture this nvcc compiles for from "
                f"{OLDEST_ARCH[0]}.{OLDEST_ARCH[1]} to {NEWEST_ARCH[0]}.{NEWEST_ARCH[1]}, PTX for the "
                f"newest{note}")
    return _arch_text(FALLBACK_ARCHS), f"nvcc did not list its architectures: a common set{note}"


def chosen_arch_list(torch, cuda_home):
    """TORCH_CUDA_ARCH_LIST as set, else ``cuda_arch_list`` for this machine; and a line that says why."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given, "TORCH_CUDA_ARCH_LIST as set"
    archs, why = cuda_arch_list(visible_gpu_architectures(torch), nvcc_architectures(cuda_home))
    return archs, f"TORCH_CUDA_ARCH_LIST unset: {why}"


def cpu_sources():
    """The CPU kernels and their registration."""
    return sorted(glob.glob("csrc/cpu/*.cpp"))


def cuda_sources():
    """The CUDA kernels, their launchers and their registration."""
    return sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))


def _torch_importable():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _want_cpu(torch_found):
    """Whether to compile the CPU kernels: ``CMBN_BUILD_CPU`` (1/0), else when torch and a C++
    compiler are here."""
    choice = os.environ.get("CMBN_BUILD_CPU", "auto")
    if choice == "0":
        return False
    if not torch_found:
        if choice == "1":
            sys.exit(f"cmbn_ext setup: CMBN_BUILD_CPU=1, but {NO_TORCH}")
        return False
    if choice != "1" and shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found (set CXX): the CPU kernels are not built")
        return False
    return True


def _want_cuda(torch_found):
    """Whether to compile the CUDA kernels (``CMBN_BUILD_CUDA``, see the module's docstring)."""
    choice = os.environ.get("CMBN_BUILD_CUDA", "auto")
    if choice == "0":
        return False
    if not torch_found:
        if choice == "1":
            sys.exit(f"cmbn_ext setup: CMBN_BUILD_CUDA=1, but {NO_TORCH}")
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if choice != "1" and not torch.cuda.is_available():
        _say("no GPU visible: the CUDA kernels are not built; set CMBN_BUILD_CUDA=1 to compile them "
             "anyway")
        return False
    if CUDA_HOME is None:
        if choice == "1":
            raise RuntimeError("CMBN_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        _say("no CUDA toolkit found (set CUDA_HOME): the CUDA kernels are not built")
        return False
    return True


def _openmp_flags():
    """``-fopenmp`` where torch runs its threads with OpenMP: without it at::parallel_for in the
    extension runs on one thread."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def extension():
    """The ``cmbn_ext._C`` extension and its build command, or nothing when it is not to be built."""
    torch_found = _torch_importable()
    with_cpu = _want_cpu(torch_found) and bool(cpu_sources())
    with_cuda = _want_cuda(torch_found) and bool(cuda_sources())
    if not (with_cpu or with_cuda):
        reason = "" if torch_found else f": {NO_TORCH} to compile the kernels"
        _say(f"building the pure-PyTorch package (no compiled kernels){reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = (cpu_sources() if with_cpu else []) + (cuda_sources() if with_cuda else []) + COMMON_SOURCES
    openmp = _openmp_flags()
    options = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=openmp)
    if with_cuda:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        archs, why = chosen_arch_list(torch, CUDA_HOME)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's extension builder compiles for
        _say(f"compiling the {'CPU and ' if with_cpu else ''}CUDA kernels with {CUDA_HOME} for "
             f"TORCH_CUDA_ARCH_LIST={archs} ({why}): {', '.join(sources)}")
        options["include_dirs"] += _pip_cuda_includes()
        built = CUDAExtension("cmbn_ext._C", sources, **options,
                              extra_compile_args={"cxx": ["-O3", *openmp], "nvcc": ["-O3", "-lineinfo"]})
    else:
        _say(f"compiling the CPU kernels: {', '.join(sources)}")
        built = CppExtension("cmbn_ext._C", sources, **options,
                             extra_compile_args={"cxx": ["-O3", *openmp]})
    return [built], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    ext_modules, cmdclass = extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
