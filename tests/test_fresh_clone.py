"""What a new user meets in a fresh clone: ``pip install -e .`` (whose build isolation hides torch from
setup.py), and a demo run that must not overwrite the committed results."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py, loaded without running setup(), in a build environment without torch."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" raises ImportError
    spec = importlib.util.spec_from_file_location("cmbn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_torch_the_build_is_pure_pytorch_and_says_how_to_compile(setup_py, monkeypatch, capsys):
    monkeypatch.delenv("CMBN_BUILD_CUDA", raising=False)
    monkeypatch.delenv("CMBN_BUILD_CPU", raising=False)
    assert setup_py.extension() == ([], {})
    assert "pip install --no-build-isolation -e ." in capsys.readouterr().out


def test_without_torch_a_forced_kernel_build_stops_and_says_what_to_run(setup_py, monkeypatch):
    monkeypatch.setenv("CMBN_BUILD_CUDA", "1")
    with pytest.raises(SystemExit) as stopped:
        setup_py.extension()
    assert "pip install --no-build-isolation -e ." in str(stopped.value)


@pytest.fixture
def setup_with_torch(monkeypatch):
    """setup.py, loaded without running setup(), where torch is importable (a build without
    isolation); the switches start unset."""
    monkeypatch.chdir(ROOT)
    for switch in ("CMBN_BUILD_CPU", "CMBN_BUILD_CUDA"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    spec = importlib.util.spec_from_file_location("cmbn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(extension):
    return {Path(source).as_posix() for source in extension.sources}


def test_with_torch_the_cpu_kernels_are_built_without_cuda(setup_with_torch, monkeypatch):
    """CMBN_BUILD_CUDA=0 still compiles _C with the CPU kernels and the C++ autograd, and nothing of
    the CUDA build (its registration above all)."""
    monkeypatch.setenv("CMBN_BUILD_CUDA", "0")
    (extension,), cmdclass = setup_with_torch.extension()
    assert extension.name == "cmbn_ext._C" and "build_ext" in cmdclass
    cpu = {f"csrc/cpu/{path.name}" for path in (ROOT / "csrc" / "cpu").glob("*.cpp")}
    assert _sources(extension) == cpu | {"csrc/autograd.cpp", "csrc/python_module.cpp"}
    assert "csrc/cpu/register_cpu.cpp" in cpu


def test_with_both_switches_off_nothing_is_compiled(setup_with_torch, monkeypatch):
    monkeypatch.setenv("CMBN_BUILD_CUDA", "0")
    monkeypatch.setenv("CMBN_BUILD_CPU", "0")
    assert setup_with_torch.extension() == ([], {})


@pytest.mark.parametrize("cpu", ["1", "0"])
def test_a_cuda_build_adds_the_cuda_kernels(setup_with_torch, monkeypatch, cpu):
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        pytest.skip("needs a CUDA toolkit (CUDA_HOME)")
    monkeypatch.setenv("CMBN_BUILD_CUDA", "1")
    monkeypatch.setenv("CMBN_BUILD_CPU", cpu)
    (extension,), _ = setup_with_torch.extension()
    sources = _sources(extension)
    cuda = {f"csrc/cuda/{path.name}" for pattern in ("*.cpp", "*.cu")
            for path in (ROOT / "csrc" / "cuda").glob(pattern)}
    assert {"csrc/cuda/register_cuda.cpp", "csrc/cuda/forward.cu"} <= cuda
    cpu_sources = {f"csrc/cpu/{path.name}" for path in (ROOT / "csrc" / "cpu").glob("*.cpp")}
    common = {"csrc/autograd.cpp", "csrc/python_module.cpp"}
    assert sources == cuda | common | (cpu_sources if cpu == "1" else set())


def test_the_demo_writes_where_git_does_not_track():
    """The default output folder is ignored by git, and is not the committed results/demo."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from cmbn_ext import demo

    assert Path(demo.DEFAULT_OUT).resolve() != (ROOT / "results" / "demo").resolve()
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{demo.DEFAULT_OUT}/results.md"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"git would track the demo's default output {demo.DEFAULT_OUT}/"


def test_the_package_list_holds_every_package_of_the_source_tree():
    """pyproject.toml names the packages an install copies: a subpackage left out (the demo, the
    integrations) would be missing from a non-editable install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "cmbn_ext").rglob("__init__.py")}
    assert listed == found


def test_import_cmbn_ext_does_not_import_the_demo():
    code = ("import sys, cmbn_ext; "
            "print(sorted(name for name in sys.modules if name.startswith('cmbn_ext.demo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
