"""Builds the ``cmbn_ext`` package with its compiled kernels (``cmbn_ext._C``) where they can be built.

``_C`` holds the CPU kernels (csrc/cpu/), the op's autograd in C++ (csrc/autograd.cpp) and, where
they build, the CUDA kernels (csrc/*.cu and their launchers). The CPU kernels are compiled whenever
torch and a C++ compiler are present; ``CMBN_BUILD_CPU=0`` leaves them out (CPU tensors then take the
pure-PyTorch reference). ``CMBN_BUILD_CUDA=1`` compiles the CUDA kernels even without a GPU (they need
nvcc and a CUDA build of torch); ``CMBN_BUILD_CUDA=0`` never compiles them; unset, they are built when a
GPU is visible. ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default: 8.0, 8.6, 9.0 and PTX).
With both switches at 0 nothing is compiled: the pure-PyTorch package.

The kernels compile against the torch already installed, which pip's build isolation hides (it builds
in a fresh environment with only the build requirements): ``pip install --no-build-isolation -e .``
lets the build see it. Without torch, the pure-PyTorch package is built, or with ``CMBN_BUILD_CUDA=1``
(or ``CMBN_BUILD_CPU=1``) the build stops and says what to run.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
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


def cpu_sources():
    """The CPU kernels and their registration."""
    return sorted(glob.glob("csrc/cpu/*.cpp"))


def cuda_sources():
    """The CUDA kernels, their launchers and their registration: every source in csrc/ itself but the
    common ones."""
    sources = glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")
    return sorted(source for source in sources if source not in COMMON_SOURCES)


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        from torch.utils.cpp_extension import CUDA_HOME

        _say(f"compiling the {'CPU and ' if with_cpu else ''}CUDA kernels with {CUDA_HOME} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: {', '.join(sources)}")
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
