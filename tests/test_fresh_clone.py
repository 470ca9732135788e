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
    assert setup_py.extension() == ([], {})
    assert "pip install --no-build-isolation -e ." in capsys.readouterr().out


def test_without_torch_a_forced_kernel_build_stops_and_says_what_to_run(setup_py, monkeypatch):
    monkeypatch.setenv("CMBN_BUILD_CUDA", "1")
    with pytest.raises(SystemExit) as stopped:
        setup_py.extension()
    assert "pip install --no-build-isolation -e ." in str(stopped.value)


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
