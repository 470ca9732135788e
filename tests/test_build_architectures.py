"""Which GPU architectures the build compiles the kernels for (setup.py's ``cuda_arch_list``, which
CMakeLists.txt asks too), and a kernel unit compiled for the oldest of them, so that a kernel needing
a newer GPU fails here rather than on a user's."""
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC_12 = [(5, 0), (5, 2), (5, 3), (6, 0), (6, 1), (6, 2), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7),
           (8, 9), (9, 0)]
NVCC_13 = [(7, 5), (8, 0), (8, 6), (8, 7), (8, 8), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0),
           (12, 1)]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py, loaded without running setup()."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("cmbn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("visible, supported, expected", [
    ([(7, 5)], NVCC_13, "7.5+PTX"),                       # a T4
    ([(8, 6), (9, 0)], NVCC_13, "8.6;9.0+PTX"),           # two GPU models
    ([(12, 0)], NVCC_12, "9.0+PTX"),                      # newer than nvcc knows: its newest, as PTX
    ([(7, 0), (8, 0)], NVCC_13, "8.0+PTX"),               # nvcc 13 cannot compile for the V100
    ([], NVCC_13, "7.5;8.0;8.6;8.7;8.8;8.9;9.0+PTX"),     # none visible: 7.0 to 9.0 as nvcc allows
    ([], NVCC_12, "7.0;7.2;7.5;8.0;8.6;8.7;8.9;9.0+PTX"),
    ([(7, 0)], NVCC_13, "7.5;8.0;8.6;8.7;8.8;8.9;9.0+PTX"),  # only a GPU nvcc cannot compile for
    ([], [], "7.5;8.0;8.6;9.0+PTX"),                      # nvcc did not say
])
def test_architectures_when_unset(setup_py, visible, supported, expected):
    archs, why = setup_py.cuda_arch_list(visible, supported)
    assert archs == expected, why
    if any(arch < min(supported, default=(0, 0)) for arch in visible):
        assert "7.0" in why and "pure-PyTorch" in why, why


def test_nvcc_architectures_reads_the_real_targets(setup_py, monkeypatch):
    listing = "compute_75\ncompute_90\ncompute_90a\ncompute_100\ncompute_100f\ncompute_121\n"

    def fake_run(command, **kwargs):
        assert command == [os.path.join("/cuda", "bin", "nvcc"), "--list-gpu-arch"]
        return types.SimpleNamespace(stdout=listing)

    monkeypatch.setattr(setup_py.subprocess, "run", fake_run)
    assert setup_py.nvcc_architectures("/cuda") == [(7, 5), (9, 0), (10, 0), (12, 1)]
    monkeypatch.setattr(setup_py.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert setup_py.nvcc_architectures("/cuda") == []


@pytest.mark.parametrize("visible, expected", [([(7, 5)], "7.5+PTX"), ([], "7.5;8.0;9.0+PTX")])
def test_the_build_compiles_for_its_choice_and_says_it(setup_py, monkeypatch, capsys, visible, expected):
    """TORCH_CUDA_ARCH_LIST unset: the build sets it to the visible GPUs' architectures (or nvcc's
    from 7.0 to 9.0), which torch's extension builder then compiles for, and prints the choice."""
    pytest.importorskip("torch")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("needs a CUDA toolkit (CUDA_HOME)")
    monkeypatch.setenv("CMBN_BUILD_CUDA", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(setup_py, "visible_gpu_architectures", lambda torch: visible)
    monkeypatch.setattr(setup_py, "nvcc_architectures", lambda home: [(7, 5), (8, 0), (9, 0), (10, 0)])
    extensions, _ = setup_py.extension()
    assert len(extensions) == 1 and os.environ["TORCH_CUDA_ARCH_LIST"] == expected
    out = capsys.readouterr().out
    assert f"TORCH_CUDA_ARCH_LIST={expected} (TORCH_CUDA_ARCH_LIST unset: " in out
    assert ("visible GPUs" in out) == bool(visible)


def test_a_given_list_is_kept(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    monkeypatch.setattr(setup_py, "visible_gpu_architectures", lambda torch: [(7, 5)])
    assert setup_py.chosen_arch_list(None, "/cuda") == ("8.9", "TORCH_CUDA_ARCH_LIST as set")


def _cuda_home():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sass_report
    finally:
        sys.path.pop(0)
    return sass_report, sass_report.cuda_home()


def test_a_kernel_unit_compiles_for_the_oldest_architecture(setup_py, tmp_path):
    """cuda/forward.cu (the single-read and two-pass forward kernels, and the device helpers the
    backward shares) compiled to SASS for the oldest architecture of the default list, with the
    package's flags; without optimization it takes about half a minute."""
    pytest.importorskip("torch")
    sass_report, home = _cuda_home()
    if home is None:
        pytest.skip("needs nvcc")
    supported = setup_py.nvcc_architectures(home)
    oldest = min(arch for arch in supported if arch >= setup_py.OLDEST_ARCH)
    assert oldest <= (7, 5), f"nvcc {home} cannot compile for a T4: {supported}"
    arch = f"sm_{oldest[0]}{oldest[1]}"
    flags = [flag for flag in sass_report.nvcc_flags(arch) if flag not in ("-Xptxas", "-v", "-lineinfo")]
    flags += ["-Xcicc", "-O0", "-Xptxas", "-O0"]  # every kernel still compiled, in half the time
    command = [os.path.join(home, "bin", "nvcc"), "--cubin", *flags,
               *(f"-I{d}" for d in sass_report.include_dirs(str(ROOT / "csrc"), home)),
               str(ROOT / "csrc" / "cuda" / "forward.cu"), "-o", str(tmp_path / "forward.cubin")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{arch}: {result.stderr[-4000:]}"
    assert (tmp_path / "forward.cubin").stat().st_size > 0
