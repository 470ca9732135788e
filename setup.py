"""Builds the ``cmbn_ext`` package, with its CUDA kernels (``cmbn_ext._C``) when they can be built.

``CMBN_BUILD_CUDA=1`` compiles the kernels even without a GPU (they need nvcc and a CUDA build of
torch); ``CMBN_BUILD_CUDA=0`` never compiles them; unset, they are built when a GPU is visible.
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default: 8.0, 8.6, 9.0 and PTX).

The kernels compile against the torch already installed, which pip's build isolation hides (it builds
in a fresh environment with only the build requirements): ``pip install --no-build-isolation -e .``
lets the build see it. Without torch, the pure-PyTorch package is built, or with ``CMBN_BUILD_CUDA=1``
the build stops and says what to run.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
NO_TORCH = ("torch is not importable in this build environment. pip builds in an isolated environment "
            "without your torch unless told otherwise: install torch first (pip install torch), then "
            "run pip install --no-build-isolation -e .")


def _say(message):
    print(f"cmbn_ext setup: {message}", flush=True)


def _pip_cuda_includes():
    """CUDA headers that torch includes but that ship only in the pip CUDA packages (cusparse.h, ...)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [path for root in roots for path in glob.glob(os.path.join(root, "cu*", "include"))]


def cuda_extension():
    """The ``cmbn_ext._C`` extension and its build command, or nothing when it is not to be built."""
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    choice = os.environ.get("CMBN_BUILD_CUDA", "auto")
    if not sources or choice == "0":
        _say("building the pure-PyTorch package (no CUDA kernels)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if choice == "1":
            sys.exit(f"cmbn_ext setup: CMBN_BUILD_CUDA=1, but {NO_TORCH}")
        _say(f"building the pure-PyTorch package (no CUDA kernels): {NO_TORCH} to compile them")
        return [], {}

    if choice != "1" and not torch.cuda.is_available():
        _say("no GPU visible: building the pure-PyTorch package; set CMBN_BUILD_CUDA=1 to compile the "
             "CUDA kernels anyway")
        return [], {}
    if CUDA_HOME is None:
        if choice == "1":
            raise RuntimeError("CMBN_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        _say("no CUDA toolkit found (set CUDA_HOME): building the pure-PyTorch package")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    _say(f"compiling the CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']}: {', '.join(sources)}")
    extension = CUDAExtension(
        "cmbn_ext._C",
        sources,
        include_dirs=[os.path.abspath("csrc")] + _pip_cuda_includes(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    ext_modules, cmdclass = cuda_extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
