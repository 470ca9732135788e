"""The emulated CUDA runtime itself (tests/emulation): its cooperative launches, grid barrier,
occupancy query and launch counts, on a small CUDA program (tests/emulation/runtime_check.cu) that
goes through translate.py and the host compiler as csrc/cuda/ does. A grid barrier the emulation did not
honour, or shared memory one block took from another, would pass the kernel tests unnoticed where
the kernels happen not to depend on it; here each is checked against a closed-form sum.

Builds the program once per module (a few seconds; with AddressSanitizer too where the compiler has
it, as the emulated kernel tests run under it). Needs a C++ compiler.
"""
import os
import re
import shutil
import subprocess

import pytest

import emulation
from emulation import translate

HERE = os.path.dirname(os.path.abspath(emulation.__file__))
COMPILER = os.environ.get("CXX", "c++")
VARIANTS = ["plain"] + (["asan"] if emulation.asan_environment() else [])
ERROR = "emulated CUDA: "

pytestmark = pytest.mark.skipif(shutil.which(COMPILER) is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module", params=VARIANTS)
def program(request, tmp_path_factory):
    """The path of runtime_check.cu compiled against the emulated runtime (the flags of
    emulation.load(), without torch)."""
    directory = tmp_path_factory.mktemp(f"runtime_check_{request.param}")
    with open(os.path.join(HERE, "runtime_check.cu")) as source:
        text = translate.translate(source.read())
    (directory / "runtime_check.cpp").write_text(text)
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address"] \
        if request.param == "asan" else ["-O2"]
    binary = directory / "runtime_check"
    subprocess.run(
        [COMPILER, "-std=c++17", *flags, "-ffp-contract=off", "-ftrivial-auto-var-init=pattern",
         "-include", os.path.join(HERE, "cuda_runtime.h"), "-I", os.path.join(HERE, "include"),
         str(directory / "runtime_check.cpp"), os.path.join(HERE, "runtime.cpp"), "-o", str(binary)],
        check=True, capture_output=True, text=True, timeout=300)
    return binary


def run(program, *arguments, **environment):
    """The program's output, run with `arguments` and the emulation's variables in `environment`
    (the others removed, so the defaults apply)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMBN_") and k != "LD_PRELOAD"}
    env.update(ASAN_OPTIONS="detect_leaks=0", **{k: str(v) for k, v in environment.items()})
    result = subprocess.run([str(program), *map(str, arguments)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def results(output, name):
    """The counts that `report` printed under `name`: threads, right, nan, kept."""
    match = re.search(rf"^{name}: threads (\d+) right (\d+) nan (\d+) kept (\d+)$", output, re.M)
    assert match, output
    return dict(zip(("threads", "right", "nan", "kept"), map(int, match.groups())))


def launch_counts(output):
    """{(kernel, phase): launches} from the program's output."""
    lines = (line.split("\t") for line in output.splitlines() if line.count("\t") == 2)
    return {(kernel, phase): int(n) for kernel, phase, n in lines}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("blocks, threads", [(2, (32,)), (9, (64,)), (5, (16, 8))])
def test_cooperative_grid_sum_is_exact(program, seed, blocks, threads):
    """Every thread of every block reads every block's partial after the grid barrier, and each
    block still holds its own shared memory there, in any order of blocks and threads."""
    output = run(program, "sum", blocks, *threads, CMBN_EMULATION_SEED=seed)
    assert output.count("status: no error") == 2
    for name in ("first", "second"):
        counts = results(output, name)
        assert counts["threads"] == blocks * (threads[0] * (threads[1] if len(threads) > 1 else 1))
        assert counts["right"] == counts["kept"] == counts["threads"], output


def test_whole_device_grid_runs(program):
    """The largest grid the default device takes at once (2 blocks x 132 SMs of 256 threads)."""
    output = run(program, "sum", 264, 256)
    counts = results(output, "second")
    assert counts["right"] == counts["kept"] == 264 * 256


def test_skipped_grid_barrier_reads_poison(program):
    """CMBN_EMULATION_SKIP_GRID_SYNC=1: each block runs to its end alone, so every thread of every
    block but the last to run reads a partial not yet written (NaN); so may some of the last."""
    blocks, threads = 8, 64
    for seed in (1, 2):
        output = run(program, "sum", blocks, threads, CMBN_EMULATION_SEED=seed,
                     CMBN_EMULATION_SKIP_GRID_SYNC=1)
        counts = results(output, "first")
        assert counts["nan"] >= (blocks - 1) * threads, output
        assert counts["nan"] + counts["right"] == blocks * threads, output
        assert counts["kept"] == blocks * threads, output


def test_occupancy_query(program):
    output = run(program, "occupancy")
    assert "status: no error" in output and "blocks per SM: 2" in output
    output = run(program, "occupancy", CMBN_EMULATED_BLOCKS_PER_SM=5)
    assert "blocks per SM: 5" in output


def test_grid_larger_than_the_device_is_refused(program):
    """More blocks than blocks-per-SM x SMs: cudaErrorCooperativeLaunchTooLarge, left for
    cudaGetLastError() once, and nothing runs or is counted; one block fewer runs."""
    device = {"CMBN_EMULATED_BLOCKS_PER_SM": 2, "CMBN_EMULATED_SMS": 3}
    output = run(program, "launch", 7, 32, **device)
    assert "status: too many blocks in cooperative launch" in output
    assert "last error: too many blocks in cooperative launch" in output
    assert "last error again: no error" in output
    assert results(output, "launch")["nan"] == 7 * 32
    assert results(output, "launch")["kept"] == 0
    assert launch_counts(output)["grid_sum_kernel<0>", "kNone"] == 0

    output = run(program, "launch", 6, 32, **device)
    assert "status: no error" in output and "last error: no error" in output
    assert results(output, "launch")["right"] == 6 * 32
    assert launch_counts(output)["grid_sum_kernel<0>", "kNone"] == 1


def test_misused_barriers_fail_the_launch(program):
    """Each misuse fails its launch with a message that names it (a hang or worse on a GPU), and
    the next launch runs cleanly."""
    output = run(program, "misuse", 4, 32)
    errors = re.findall(r"^error: (.*)$", output, re.M)
    assert errors == [
        ERROR + "divergent barriers in block (1, 0, 0): 31 of 32 threads wait at "
                "this_grid().sync() while the others wait at __syncthreads()",
        ERROR + "divergent this_grid().sync() in block (1, 0, 0): 1 of 32 threads returned while "
                "the others wait at the grid barrier",
        ERROR + "divergent this_grid().sync(): 1 of 4 blocks returned while the others wait at "
                "the grid barrier",
        errors[3],  # the block that reaches the barrier first depends on the order
    ], output
    assert re.fullmatch(re.escape(ERROR + "cooperative_groups::this_grid().sync() in a kernel "
                                  "launched with <<<>>>, not with cudaLaunchCooperativeKernel (")
                        + r"block \(\d, 0, 0\)\)", errors[3]), errors[3]
    counts = results(output, "after")
    assert counts["right"] == counts["kept"] == 4 * 32


def test_launches_are_counted_per_instantiation_and_phase(program):
    """Cooperative launches count as <<<>>> ones do: per instantiation and enum-named phase, with
    every instantiation a launch site names listed from load time on."""
    counts = launch_counts(run(program, "sum", 3, 32))
    phases = ["kNone", "kMixedBarriers", "kThreadReturns", "kBlockReturns"]
    assert counts == {
        **{("grid_sum_kernel<0>", phase): 2 if phase == "kNone" else 0 for phase in phases},
        **{("grid_sum_kernel<1>", phase): 0 for phase in phases},
    }


def test_translate_rewrites_cooperative_launches():
    source = ("  const cudaError_t status = cudaLaunchCooperativeKernel(\n"
              "      &kernel<scalar_t, acc_t, (N > 2)>, grid, block, kernel_args, 0, stream);\n"
              "  // cudaLaunchCooperativeKernel(...) in a comment stays\n")
    assert translate.translate(source) == (
        "  const cudaError_t status = ::cmbn_emu::launch_cooperative<&kernel<scalar_t, acc_t, "
        "(N > 2)>>(grid, block, kernel_args);\n"
        "  // cudaLaunchCooperativeKernel(...) in a comment stays\n")
    with pytest.raises(ValueError, match="expects cudaLaunchCooperativeKernel"):
        translate.translate("cudaLaunchCooperativeKernel(kernel, grid, block, args, 0, stream);")


def test_translate_moves_the_device_type_to_the_cpu():
    """The CUDA sources name their tensors' device as .is_cuda() or c10::DeviceType::CUDA (the shared
    checks take a device type); in the emulation CPU tensors stand for the device, and any other
    spelling of it is refused rather than left to check against a device that is never there."""
    source = 'check_input(op, x, "x", c10::DeviceType::CUDA);\nif (m.is_cuda()) {}\n'
    expected = 'check_input(op, x, "x", c10::DeviceType::CPU);\nif (m.is_cpu()) {}\n'
    assert translate.translate(source) == expected
    for spelling in ("x.device().type() == at::kCUDA", "c10::Device(c10::kCUDA, 0)"):
        with pytest.raises(ValueError, match="cannot rewrite"):
            translate.translate(spelling)


def test_the_cpu_kernels_stay_out_of_the_emulated_build(tmp_path):
    """The emulated build translates csrc/cuda/ (the CUDA kernels, their launchers) and the shared
    files of csrc/ (the C++ autograd, the headers), never csrc/cpu/: in its processes the emulated
    kernels are the CPU's kernels."""
    units = translate.translate_tree(emulation.SOURCE_DIRS, str(tmp_path))
    names = {os.path.basename(unit) for unit in units}
    assert {"register_cuda.cpp", "autograd.cpp", "forward.cpp", "backward.cpp"} <= names
    assert "register_cpu.cpp" not in names and "cpu_loops_avx2.cpp" not in names
    for unit in units:  # forward.cpp and backward.cpp are the translated .cu files, not the CPU's
        with open(unit) as text:
            assert "namespace cpu" not in text.read(), unit
    assert os.path.join(emulation.CSRC, "cpu") not in emulation.SOURCE_DIRS
