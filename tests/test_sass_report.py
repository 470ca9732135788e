"""bench/sass_report.py: its parsers on excerpts of real tool output (nvcc 13.0 / cuobjdump and
nvdisasm 13.1, sm_90, the kernels of csrc/ at commit b1659cd), the occupancy model against hand-worked
figures, and, with CMBN_SASS_REPORT_TEST=1 where nvcc and cuobjdump exist, the whole report (slow:
it compiles every kernel).
"""
import collections
import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))  # bench/ holds scripts, not a package

import sass_report  # noqa: E402

HALF_ROWS_8 = ("_ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEf"
               "LNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE")
BF16_PLANES_8 = ("_ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c108BFloat"
                 "16EfLNS_6LayoutE0ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE")

# cuobjdump -res-usage (the header and two of its functions).
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c108BFloat16EfLNS_6LayoutE0ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE:
  REG:64 STACK:8 SHARED:5132 LOCAL:0 CONSTANT[2]:84 CONSTANT[0]:812 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEfLNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE:
  REG:96 STACK:0 SHARED:36864 LOCAL:0 CONSTANT[2]:84 CONSTANT[0]:812 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# nvcc -Xptxas -v (the same two kernels and their neighbours; the hash of the unit differs from the
# cubin above: another compile of the same source).
PTXAS = """
ptxas info    : Function properties for _ZN4cmbn48_GLOBAL__N__d3ff032c_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c108BFloat16EfLNS_6LayoutE0ELi1EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 4108 bytes smem
ptxas info    : Compile time = 506.157 ms
ptxas info    : Compiling entry function '_ZN4cmbn48_GLOBAL__N__d3ff032c_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c108BFloat16EfLNS_6LayoutE0ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE' for 'sm_90'
ptxas info    : Function properties for _ZN4cmbn48_GLOBAL__N__d3ff032c_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c108BFloat16EfLNS_6LayoutE0ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 4108 bytes smem
ptxas info    : Compile time = 530.404 ms
ptxas info    : Compiling entry function '_ZN4cmbn48_GLOBAL__N__d3ff032c_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEfLNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE' for 'sm_90'
ptxas info    : Function properties for _ZN4cmbn48_GLOBAL__N__d3ff032c_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEfLNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 35840 bytes smem
ptxas info    : Compile time = 562.802 ms
"""

# cuobjdump -sass of cmbn_forward_kernel<c10::Half, float, kRows, 8>: its header, a predicated
# 128-bit load of x, and the normalize loop storing one 16-byte pack of y as four 32-bit stores.
SASS = """
		Function : _ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEfLNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*90f0*/              @!P0 LDG.E.128 R48, desc[UR8][R70.64] ;                                 /* 0x0000000846308981 */
                                                                                                      /* 0x020962000c1e1d00 */
                                                                                                      /* 0x000fe400000000ff */
        /*93a0*/                   F2FP.F16.F32.PACK_AB R67, R67, R60 ;                               /* 0x0000003c4343723e */
                                                                                                      /* 0x000fe400000000ff */
        /*93b0*/                   F2FP.F16.F32.PACK_AB R62, R69, R62 ;                               /* 0x0000003e453e723e */
                                                                                                      /* 0x000fe200000000ff */
        /*93c0*/                   STG.E desc[UR8][R26.64], R58 ;                                     /* 0x0000003a1a007986 */
                                                                                                      /* 0x0001e2000c101908 */
        /*93d0*/                   F2FP.F16.F32.PACK_AB R64, R71, R64 ;                               /* 0x000000404740723e */
                                                                                                      /* 0x000fc600000000ff */
        /*93e0*/                   STG.E desc[UR8][R26.64+0x4], R67 ;                                 /* 0x000004431a007986 */
                                                                                                      /* 0x0001e8000c101908 */
        /*93f0*/                   STG.E desc[UR8][R26.64+0x8], R62 ;                                 /* 0x0000083e1a007986 */
                                                                                                      /* 0x0001e8000c101908 */
        /*9400*/                   STG.E desc[UR8][R26.64+0xc], R64 ;                                 /* 0x00000c401a007986 */
                                                                                                      /* 0x0001e4000c101908 */
        /*9410*/                   BSYNC B0 ;                                                         /* 0x0000000000007941 */
"""

# nvdisasm -c -gi of the same kernel: three per-channel partial stores (cmbn_forward.cu lines 242-244),
# then the pack store, inlined from store_pack (device_utils.cuh line 84) at cmbn_forward.cu line 288.
LINE_INFO = """
.text._ZN4cmbn48_GLOBAL__N__032a579e_15_cmbn_forward_cu_029bc2e319cmbn_forward_kernelIN3c104HalfEfLNS_6LayoutE1ELi8EEEvNS0_11ForwardArgsIT_T0_EENS_5PhaseE:
	//## File "/work/main/csrc/cmbn_forward.cu", line 244
        /*8010*/                   IADD3.X R11, R18, UR15, RZ, P3, !PT ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 242
        /*8020*/                   STG.E desc[UR8][R2.64], R14 ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 245
        /*8030*/                   ISETP.NE.U32.AND P0, PT, RZ, UR10, PT ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 243
        /*8040*/                   STG.E desc[UR8][R8.64], R7 ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 245
        /*8050*/                   ISETP.NE.AND.EX P0, PT, RZ, UR11, PT, P0 ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 244
        /*8060*/                   STG.E desc[UR8][R10.64], R15 ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 245
        /*8070*/              @!P0 BRA `(.L_x_1085) ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 286
        /*93b0*/                   F2FP.F16.F32.PACK_AB R62, R69, R62 ;
	//## File "/work/main/csrc/device_utils.cuh", line 84 inlined at "/work/main/csrc/cmbn_forward.cu", line 288
	//## File "/work/main/csrc/cmbn_forward.cu", line 288
        /*93c0*/                   STG.E desc[UR8][R26.64], R58 ;
	//## File "/work/main/csrc/cmbn_forward.cu", line 286
        /*93d0*/                   F2FP.F16.F32.PACK_AB R64, R71, R64 ;
	//## File "/work/main/csrc/device_utils.cuh", line 84 inlined at "/work/main/csrc/cmbn_forward.cu", line 288
	//## File "/work/main/csrc/cmbn_forward.cu", line 288
        /*93e0*/                   STG.E desc[UR8][R26.64+0x4], R67 ;
        /*93f0*/                   STG.E desc[UR8][R26.64+0x8], R62 ;
        /*9400*/                   STG.E desc[UR8][R26.64+0xc], R64 ;
.L_x_1093:
        /*9410*/                   BSYNC B0 ;
"""

# device_utils.cuh lines 77-85 at the same commit: the pack load and store.
PACK_SOURCE = "\n" * 76 + """template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* address) {
  return *reinterpret_cast<const Pack<T, VEC>*>(address);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* address, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(address) = pack;
}
"""

DEMANGLED = ("void cmbn::(anonymous namespace)::cmbn_forward_kernel<c10::Half, float, (cmbn::Layout)1, 8>"
             "(cmbn::(anonymous namespace)::ForwardArgs<c10::Half, float>, cmbn::Phase)")
ENUMS = """
// The two layouts the kernels read without a copy.
enum class Layout : int { kPlanes, kRows };
enum class Phase : int { kFused, kPartial, kApply, kGiven };
"""


def test_res_usage():
    usage = sass_report.parse_res_usage(RES_USAGE)
    assert set(usage) == {HALF_ROWS_8, BF16_PLANES_8}
    assert usage[BF16_PLANES_8] == {"registers": 64, "stack": 8, "shared": 5132, "local": 0, "constant0": 812}
    assert usage[HALF_ROWS_8] == {"registers": 96, "stack": 0, "shared": 36864, "local": 0, "constant0": 812}


def test_ptxas_report():
    info = sass_report.parse_ptxas_info(PTXAS)
    assert len(info) == 3
    bf16 = BF16_PLANES_8.replace("032a579e", "d3ff032c")
    half = HALF_ROWS_8.replace("032a579e", "d3ff032c")
    assert info[bf16] == {"stack_frame": 8, "spill_stores": 4, "spill_loads": 4, "registers": 64, "smem": 4108}
    assert info[half] == {"stack_frame": 0, "spill_stores": 0, "spill_loads": 0, "registers": 96, "smem": 35840}
    # cuobjdump's SHARED of the same kernels is ptxas' static size plus the 1 KiB reserved per block.
    usage = sass_report.parse_res_usage(RES_USAGE)
    assert usage[BF16_PLANES_8]["shared"] - info[bf16]["smem"] == 1024
    assert usage[HALF_ROWS_8]["shared"] - info[half]["smem"] == 1024


def test_sass_memory_instructions():
    counts = sass_report.parse_sass(SASS)
    assert counts == {HALF_ROWS_8: collections.Counter({"STG.E": 4, "LDG.E.128": 1})}
    assert [sass_report.width_bits(m) for m in ("LDG.E.128", "STG.E.64", "STG.E", "LDG.E.U16", "STG.E.S8")] \
        == [128, 64, 32, 16, 8]


def test_pack_stores_are_found_by_line_information():
    lines = sass_report.parse_line_info(LINE_INFO)
    assert list(lines) == [HALF_ROWS_8]
    stores = lines[HALF_ROWS_8]
    assert [m for m, _ in stores] == ["STG.E"] * 7
    assert sass_report.function_lines(PACK_SOURCE, "store_pack") == {83, 84, 85}
    assert sass_report.function_lines(PACK_SOURCE, "load_pack") == {78, 79, 80}
    pack = sass_report.pack_lines({"device_utils.cuh": PACK_SOURCE}, "store_pack")
    attributed = [where for _, where in stores if where & pack]
    assert len(attributed) == 4  # the three partial stores before them are not the pack's
    assert all(("cmbn_forward.cu", 288) in where for where in attributed)


def test_kernel_names_and_template_arguments():
    enums = sass_report.parse_enums({"kernel_types.h": ENUMS})
    assert enums == {"Layout": ["kPlanes", "kRows"], "Phase": ["kFused", "kPartial", "kApply", "kGiven"]}
    short, args = sass_report.shorten_kernel_name(DEMANGLED, enums)
    assert short == "cmbn_forward_kernel<c10::Half, float, kRows, 8>"
    assert sass_report.layout_and_vec(args, enums["Layout"]) == ("kRows", 8)
    assert sass_report.layout_and_vec(["float", "float", "float"], enums["Layout"]) == (None, None)
    bounds = sass_report.launch_bounds({
        "a.cu": "constexpr int kStateThreads = 512;\n__global__ void __launch_bounds__(kStateThreads) "
                "update_state_kernel(const StateArgs<stats_t> args) {",
        "b.cu": "__global__ void __launch_bounds__(kBlockThreads)\n    cmbn_forward_kernel(const Args a) {",
        "c.h": "constexpr int kBlockThreads = 256;  // every kernel runs 256 threads per block"})
    assert bounds == {"update_state_kernel": 512, "cmbn_forward_kernel": 256}


@pytest.mark.parametrize("registers, shared, expected", [
    # 96 registers: 96 * 32 = 3072 per warp; 16384 per sub-partition hold 5 warps, 4 x 5 = 20 warps =
    # 2 blocks of 8 warps. Shared: (35840 + 1024) = 36864 bytes, 233472 / 36864 = 6.3 blocks.
    (96, 35840, {"by_registers": 2, "by_shared": 6, "by_threads": 8, "blocks": 2}),
    # 65 registers round up to 2304 per warp (9 x 256): 7 warps per sub-partition, 28 warps, 3 blocks.
    (65, 0, {"by_registers": 3, "by_shared": 228, "by_threads": 8, "blocks": 3}),
    # 32 registers: 1024 per warp, 16 per sub-partition, 64 warps = 8 blocks; the 2048 threads cap too.
    # Shared: 4108 + 1024 = 5132 bytes round up to 5248 (41 x 128): 233472 / 5248 = 44.5 blocks.
    (32, 4108, {"by_registers": 8, "by_shared": 44, "by_threads": 8, "blocks": 8}),
])
def test_occupancy_model(registers, shared, expected):
    assert sass_report.blocks_per_sm(registers, shared, "sm_90") == expected


def test_pack_store_check():
    record = {"layout": "kRows", "vec": 8, "global_stores": {"STG.E": 25, "STG.E.64": 1},
              "pack_stores": {"STG.E": 16}}
    assert sass_report.pack_store_check(record) == (True, "pack stores as 16x STG.E")
    assert sass_report.pack_store_check(dict(record, pack_stores={"STG.E.128": 4}))[0] is False
    assert sass_report.pack_store_check(dict(record, pack_stores=None))[0] is True  # widths alone
    assert sass_report.pack_store_check(dict(record, vec=1))[0] is None
    assert sass_report.pack_store_check(dict(record, layout="kPlanes"))[0] is None


def _global_kernels(csrc):
    """Names of the __global__ functions of the sources: the independent list the report must cover."""
    names = set()
    for name in os.listdir(csrc):
        if name.endswith(".cu"):
            text = open(os.path.join(csrc, name)).read()
            names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


@pytest.mark.skipif(os.environ.get("CMBN_SASS_REPORT_TEST") != "1",
                    reason="slow (compiles every kernel): set CMBN_SASS_REPORT_TEST=1")
def test_whole_report(tmp_path):
    home = sass_report.cuda_home()
    if not home or not sass_report.find_tool("cuobjdump", home):
        pytest.skip("needs nvcc and cuobjdump")
    assert sass_report.main(["--out", str(tmp_path), "--jobs", "2"]) == 0
    document = json.loads((tmp_path / "sass-sm90.json").read_text())
    kernels = document["kernels"]
    assert {k["kernel"].split("<")[0] for k in kernels} == _global_kernels(os.path.join(REPO, "csrc", "cuda"))
    for k in kernels:
        assert 0 < k["registers"] <= 255 and k["occupancy_model"]["blocks"] >= 1, k
        assert k["spill_store_bytes"] is not None and sum(k["global_stores"].values()) > 0, k
    vectorized_rows = [k for k in kernels if k["layout"] == "kRows" and k["vec"] > 1]
    assert vectorized_rows and all(k["pack_store_flag"] is not None for k in vectorized_rows)
    text = (tmp_path / "sass-sm90.md").read_text()
    assert "release 13" in text and "-gencode=arch=compute_90,code=sm_90" in text
    assert all(f"`{k['kernel']}`" in text for k in kernels)
