"""What the compiler made of the CUDA kernels: registers, spills, shared memory and global memory
instructions of every kernel in csrc/cuda/, read from the SASS for one architecture, with the blocks per SM
those resources allow (a model) and a check that the channels_last kernels store whole 16-byte packs.

    python bench/sass_report.py [--out bench/results] [--arch sm_90] [--jobs N] [--csrc DIR | --rev REV]

Each csrc/cuda/*.cu is compiled to a cubin with nvcc and the flags the package build uses (setup.py's
-O3 -lineinfo plus torch's extension flags), then read with cuobjdump (-res-usage, -sass), nvdisasm
(line information: which source line each store comes from) and ptxas' own report (spill bytes).
Results go to ``<out>/sass-<arch>.json`` and ``.md`` (sass-sm90.*). Needs nvcc, a CUDA build of torch
and cuobjdump; no GPU. ``--rev HEAD`` reads csrc/ as committed (git archive), ``--csrc`` any copy.
"""
import argparse
import collections
import concurrent.futures
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Per-SM limits of the occupancy model, as cuda_occupancy.h states them for each compute capability:
# registers are allocated per warp in units of 256 out of 4 sub-partitions of regs_per_sm / 4; shared
# memory per block is its static size plus 1 KiB the driver reserves, in 128-byte units, out of the
# largest carveout (the driver picks the carveout when a launch needs it).
ARCH_LIMITS = {
    "sm_80": {"regs_per_sm": 65536, "sub_partitions": 4, "reg_unit": 256, "smem_per_sm": 167936,
              "smem_reserved_per_block": 1024, "smem_unit": 128, "threads_per_sm": 2048, "blocks_per_sm": 32},
    "sm_86": {"regs_per_sm": 65536, "sub_partitions": 4, "reg_unit": 256, "smem_per_sm": 102400,
              "smem_reserved_per_block": 1024, "smem_unit": 128, "threads_per_sm": 1536, "blocks_per_sm": 16},
    "sm_90": {"regs_per_sm": 65536, "sub_partitions": 4, "reg_unit": 256, "smem_per_sm": 233472,
              "smem_reserved_per_block": 1024, "smem_unit": 128, "threads_per_sm": 2048, "blocks_per_sm": 32},
}
BLOCK_THREADS = 256  # kBlockThreads: every reducing kernel runs 256 threads per block
WARP = 32

# Global memory instructions: LDG/STG, and the generic LD/ST the compiler emits when it cannot prove a
# pointer global (they then reach global memory too). Width suffixes: 128, 64, none (32 bits), U16/S16,
# U8/S8.
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
GLOBAL_MEMORY = re.compile(r"^(LDG|STG|LD|ST|ATOMG|REDG|RED)(\.|$)")
LOCAL_MEMORY = re.compile(r"^(LDL|STL)(\.|$)")
WIDTH_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


# ------------------------------------------------------------------------------------------ parsing
def parse_res_usage(text):
    """``cuobjdump -res-usage`` output: {mangled name: {registers, stack, shared, local, constant0}}.
    On sm_90 its SHARED counts the 1 KiB the driver reserves per block on top of the kernel's own
    static shared memory whenever the kernel has any (ptxas -v reports the kernel's own)."""
    kernels = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if match:
            name = match.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            kernels[name] = {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
                             "shared": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0)),
                             "constant0": int(fields.get("CONSTANT[0]", 0))}
            name = None
    return kernels


def parse_ptxas_info(text):
    """``ptxas -v`` output: {mangled name: {stack_frame, spill_stores, spill_loads, registers, smem}}
    (bytes; smem is the static shared memory the kernel declares, 0 when ptxas names none)."""
    kernels = {}
    name = None
    for line in text.splitlines():
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            name = match.group(1)
            continue
        if name is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            kernels[name] = {"stack_frame": int(match.group(1)), "spill_stores": int(match.group(2)),
                             "spill_loads": int(match.group(3))}
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and name in kernels:
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[name].update(registers=int(match.group(1)), smem=int(smem.group(1)) if smem else 0)
            name = None
    return kernels


def parse_sass(text):
    """``cuobjdump -sass`` output: {mangled name: Counter of global and local memory mnemonics}."""
    kernels = {}
    counts = None
    for line in text.splitlines():
        match = re.match(r"^\s*Function\s*:\s*(\S+)\s*$", line)
        if match:
            counts = kernels.setdefault(match.group(1), collections.Counter())
            continue
        match = INSTRUCTION.match(line)
        if match and counts is not None:
            mnemonic = match.group(1)
            if GLOBAL_MEMORY.match(mnemonic) or LOCAL_MEMORY.match(mnemonic):
                counts[mnemonic] += 1
    return kernels


def parse_line_info(text):
    """``nvdisasm -gi`` output: {mangled name: [(mnemonic, frozenset of (file name, line))]} for each
    global memory instruction, with every source location of its inlining chain."""
    kernels = {}
    instructions = None
    locations, in_annotation = set(), False
    for line in text.splitlines():
        match = re.match(r"^\.text\.(\S+):\s*$", line)
        if match:
            instructions = kernels.setdefault(match.group(1), [])
            locations, in_annotation = set(), False
            continue
        if line.lstrip().startswith("//##"):
            if not in_annotation:  # a new run of annotations replaces the previous one
                locations, in_annotation = set(), True
            for path, number in re.findall(r'"([^"]+)",\s*line\s+(\d+)', line):
                locations.add((os.path.basename(path), int(number)))
            continue
        match = INSTRUCTION.match(line)
        if match and instructions is not None:
            in_annotation = False
            if GLOBAL_MEMORY.match(match.group(1)):
                instructions.append((match.group(1), frozenset(locations)))
    return kernels


def width_bits(mnemonic):
    """Bits one lane moves with a load or store mnemonic: LDG.E.128 -> 128, STG.E -> 32."""
    for part in mnemonic.split(".")[1:]:
        if part in WIDTH_BITS:
            return WIDTH_BITS[part]
    return 32


def function_lines(source_text, name):
    """Line numbers (1-based) of the bodies of the functions called ``name`` defined in a source."""
    lines = source_text.splitlines()
    found = set()
    for i, line in enumerate(lines):
        if not re.search(r"\b%s\s*\(" % re.escape(name), line) or line.rstrip().endswith(";"):
            continue
        if not re.search(r"__device__|__forceinline__|\bvoid\b|\bauto\b", line + (lines[i - 1] if i else "")):
            continue  # a call, not a definition
        depth, opened = 0, False
        for j in range(i, len(lines)):
            code = re.sub(r"//.*", "", lines[j])
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            found.add(j + 1)
            if opened and depth <= 0:
                break
    return found


def pack_lines(sources, name):
    """{(file name, line)} of the bodies of function ``name`` over {file name: text}."""
    return {(file, line) for file, text in sources.items() for line in function_lines(text, name)}


def parse_enums(sources):
    """{enum name: [enumerators in order]} of the ``enum class`` declarations in the sources."""
    enums = {}
    for text in sources.values():
        for name, body in re.findall(r"enum\s+class\s+(\w+)\s*(?::\s*\w+\s*)?\{([^}]*)\}", text):
            body = re.sub(r"//[^\n]*", "", body)
            items = [item.split("=")[0].strip() for item in body.split(",") if item.strip()]
            enums[name] = items
    return enums


def launch_bounds(sources):
    """{kernel name: threads per block} from the ``__launch_bounds__(N)`` of each kernel, N a literal
    or a ``constexpr int`` of the sources."""
    constants = {}
    for text in sources.values():
        constants.update((name, int(value)) for name, value in
                         re.findall(r"constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*(\d+)\s*;", text))
    bounds = {}
    for text in sources.values():
        for bound, kernel in re.findall(r"__launch_bounds__\(\s*(\w+)[^)]*\)\s*(\w+)\s*\(", text):
            value = int(bound) if bound.isdigit() else constants.get(bound)
            if value:
                bounds[kernel] = value
    return bounds


def split_template_args(text):
    """Top-level arguments of a template argument list (without the outer < >)."""
    args, depth, current = [], 0, ""
    for char in text:
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        if char == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        args.append(current.strip())
    return args


def shorten_kernel_name(demangled, enums):
    """``void cmbn::(anonymous namespace)::k<c10::Half, float, (cmbn::Layout)1, 8>(...)`` ->
    (``k<c10::Half, float, kRows, 8>``, [its template arguments with enum values named])."""
    text = re.sub(r"^void\s+", "", demangled.strip())
    depth, end = 0, len(text)
    for i, char in enumerate(text):
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0 and not text[i:].startswith("(anonymous"):
            end = i
            break
    head = text[:end]
    base, _, rest = head.partition("<")
    base = base.split("::")[-1]

    def named(arg):
        match = re.fullmatch(r"\((?:\w+::)*(\w+)\)(-?\d+)", arg)
        if match and match.group(1) in enums and int(match.group(2)) < len(enums[match.group(1)]):
            return enums[match.group(1)][int(match.group(2))]
        return arg

    args = [named(a) for a in split_template_args(rest[:-1])] if rest else []
    return (f"{base}<{', '.join(args)}>" if rest else base), args


def layout_and_vec(template_args, layouts):
    """(layout name, VEC) of a kernel whose template arguments hold a Layout followed by its pack
    width, else (None, None)."""
    for i, arg in enumerate(template_args):
        if arg in layouts:
            vec = template_args[i + 1] if i + 1 < len(template_args) else None
            return arg, int(vec) if vec is not None and re.fullmatch(r"\d+", vec) else None
    return None, None


def blocks_per_sm(registers, shared_bytes, arch, block_threads=BLOCK_THREADS):
    """Blocks of ``block_threads`` one SM can hold by registers, by shared memory and by threads: a
    model following cuda_occupancy.h (not a measurement). None for an architecture without limits here."""
    limits = ARCH_LIMITS.get(arch)
    if limits is None:
        return None
    warps = -(-block_threads // WARP)
    regs_per_warp = -(-max(registers, 1) * WARP // limits["reg_unit"]) * limits["reg_unit"]
    warps_per_partition = limits["regs_per_sm"] // limits["sub_partitions"] // regs_per_warp
    by_registers = warps_per_partition * limits["sub_partitions"] // warps
    smem = shared_bytes + limits["smem_reserved_per_block"]
    smem = -(-smem // limits["smem_unit"]) * limits["smem_unit"]
    by_shared = limits["smem_per_sm"] // smem
    by_threads = min(limits["threads_per_sm"] // (warps * WARP), limits["blocks_per_sm"])
    return {"by_registers": by_registers, "by_shared": by_shared, "by_threads": by_threads,
            "blocks": min(by_registers, by_shared, by_threads)}


def pack_store_check(record):
    """For a kRows kernel with VEC > 1: whether every store of its vectorized path (the stores
    store_pack emits, by line information) is 128 bits. Returns (flagged, why) or (None, reason)."""
    if record["layout"] != "kRows" or not record["vec"] or record["vec"] <= 1:
        return None, "not a vectorized channels_last kernel"
    stores = record.get("pack_stores")
    if stores is None:  # no line information: the widths alone
        if record["global_stores"].get("STG.E.128", 0) == 0:
            return True, "no STG.E.128 at all (no line information: judged by widths alone)"
        return None, "has STG.E.128 (no line information to attribute the others)"
    if not stores:
        return None, "no store attributed to store_pack"
    narrow = {m: n for m, n in stores.items() if width_bits(m) != 128}
    if narrow:
        return True, "pack stores as " + ", ".join(f"{n}x {m}" for m, n in sorted(narrow.items()))
    return False, f"{sum(stores.values())}x STG.E.128"


# ------------------------------------------------------------------------------------------- tools
def find_tool(name, cuda_home):
    """A CUDA binary tool. cuobjdump and nvdisasm: the copy the triton wheel ships first (a toolkit
    installed from a minimal set of packages may lack them), then the toolkit's, then PATH; any other
    tool: the toolkit's, then PATH."""
    candidates = [os.path.join(cuda_home, "bin", name), shutil.which(name)]
    if name in ("cuobjdump", "nvdisasm"):
        try:
            import triton
            candidates.insert(0, os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                              "bin", name))
        except ImportError:
            pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def tool_version(path):
    if not path:
        return None
    try:
        output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    release = re.search(r"release [^\n]*", output)
    return release.group(0).strip() if release else output.strip().splitlines()[-1]


def cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def include_dirs(csrc, home):
    """csrc, torch's headers, the CUDA headers only the pip packages ship (setup.py adds them too),
    the toolkit's and Python's."""
    from torch.utils import cpp_extension
    try:
        torch_dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        torch_dirs = cpp_extension.include_paths(cuda=True)
    dirs = [csrc] + [d for d in torch_dirs if os.path.isdir(d)]
    spec = importlib.util.find_spec("nvidia")
    for root in (list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []):
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    dirs += [os.path.join(home, "include"), sysconfig.get_paths()["include"]]
    return list(dict.fromkeys(dirs))


def nvcc_flags(arch):
    """The flags a .cu file of the package is compiled with (torch's BuildExtension for setup.py's
    extension: its common nvcc flags, the module name define, C++20, -O3 -lineinfo), for one arch."""
    from torch.utils import cpp_extension
    number = arch.split("_")[1]
    return (list(cpp_extension.COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC", "-O3", "-lineinfo",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20",
            f"-gencode=arch=compute_{number},code={arch}", "-Xptxas", "-v"])


def compile_unit(nvcc, source, out_dir, flags, includes):
    """One .cu to a cubin; returns (cubin path, ptxas report, command, error or None)."""
    cubin = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".cubin")
    command = [nvcc, "--cubin"] + flags + [f"-I{d}" for d in includes] + [source, "-o", cubin]
    proc = subprocess.run(command, capture_output=True, text=True)
    error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["nvcc failed"])[-8:]
    return cubin, proc.stdout + proc.stderr, command, error


def demangle(names, home):
    """{mangled: demangled} with cu++filt (beside nvcc) or c++filt; names stay as they are without."""
    tool = find_tool("cu++filt", home) or shutil.which("c++filt")
    names = list(names)
    if not tool or not names:
        return {n: n for n in names}
    output = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True).stdout
    lines = output.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


# --------------------------------------------------------------------------------------------- run
def export_revision(rev, destination):
    """csrc/ as committed at ``rev``, unpacked into ``destination`` (read-only for the repository)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "csrc"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", destination], input=archive.stdout, check=True)
    return os.path.join(destination, "csrc")


def kernel_sources(csrc):
    """The sources of the CUDA build but the CPU kernels: csrc/cuda/ and the shared files of csrc/
    itself (never csrc/cpu/), sorted."""
    folders = (csrc, os.path.join(csrc, "cuda"))
    return sorted(path for folder in folders for path in glob.glob(os.path.join(folder, "*"))
                  if path.endswith((".cu", ".cuh", ".h", ".cpp")))


def sources_digest(csrc):
    """The first 12 hex digits of a SHA-256 over the kernel sources (paths under csrc/ and contents,
    sorted): tells which state of a changing csrc/ a report read."""
    import hashlib
    digest = hashlib.sha256()
    for path in kernel_sources(csrc):
        digest.update(os.path.relpath(path, csrc).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def source_label(csrc, rev):
    if rev:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", rev], capture_output=True,
                                text=True).stdout.strip()
        return f"csrc/ as committed at {rev} ({commit})"
    if os.path.realpath(csrc) != os.path.realpath(os.path.join(REPO, "csrc")):
        return csrc
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "csrc"], capture_output=True,
                           text=True).stdout.strip()
    return f"csrc/ at {commit}" + (" with uncommitted changes" if dirty else "")


def _output(*command):
    return subprocess.run(list(command), capture_output=True, text=True, check=True).stdout


def analyse(csrc, arch, jobs, work_dir):
    """Compile every csrc/cuda/*.cu and read each kernel's resources; returns the report document."""
    import torch
    home = cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    cuobjdump = find_tool("cuobjdump", home or "/usr/local/cuda")
    nvdisasm = find_tool("nvdisasm", home or "/usr/local/cuda")
    if not nvcc or not cuobjdump:
        raise SystemExit(f"sass_report: needs nvcc (found {nvcc}) and cuobjdump (found {cuobjdump})")
    sources = [path for path in kernel_sources(csrc) if path.endswith(".cu")]
    if not sources:
        raise SystemExit(f"sass_report: no .cu files in {os.path.join(csrc, 'cuda')}")
    texts = {os.path.basename(p): open(p).read()
             for p in kernel_sources(csrc) if p.endswith((".cu", ".cuh", ".h"))}
    enums = parse_enums(texts)
    layouts = enums.get("Layout", ["kPlanes", "kRows"])
    store_lines, load_lines = pack_lines(texts, "store_pack"), pack_lines(texts, "load_pack")
    bounds = launch_bounds(texts)
    flags, includes = nvcc_flags(arch), include_dirs(csrc, home)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        compiled = list(pool.map(lambda s: compile_unit(nvcc, s, work_dir, flags, includes), sources))

    kernels, failures, commands = [], {}, []
    for source, (cubin, ptxas, command, error) in zip(sources, compiled):
        unit = os.path.basename(source)
        commands.append(command)
        if error:
            failures[unit] = error
            continue
        usage = parse_res_usage(_output(cuobjdump, "-res-usage", cubin))
        sass = parse_sass(_output(cuobjdump, "-sass", cubin))
        lines = parse_line_info(_output(nvdisasm, "-c", "-gi", cubin)) if nvdisasm else {}
        spills = parse_ptxas_info(ptxas)
        names = demangle(usage, home)
        for mangled, resources in usage.items():
            short, template_args = shorten_kernel_name(names[mangled], enums)
            layout, vec = layout_and_vec(template_args, layouts)
            memory = sass.get(mangled, collections.Counter())
            threads = bounds.get(short.split("<")[0], BLOCK_THREADS)
            ptxas_info = spills.get(mangled, {})
            shared = ptxas_info.get("smem", resources["shared"])
            record = {
                "kernel": short, "unit": unit, "mangled": mangled, "layout": layout, "vec": vec,
                "block_threads": threads,
                "registers": resources["registers"], "stack_bytes": resources["stack"],
                "local_bytes": resources["local"], "static_shared_bytes": shared,
                "cubin_shared_bytes": resources["shared"],
                "spill_store_bytes": ptxas_info.get("spill_stores"),
                "spill_load_bytes": ptxas_info.get("spill_loads"),
                "stl": sum(n for m, n in memory.items() if m.startswith("STL")),
                "ldl": sum(n for m, n in memory.items() if m.startswith("LDL")),
                "global_loads": dict(sorted((m, n) for m, n in memory.items() if m.startswith(("LDG", "LD.")))),
                "global_stores": dict(sorted((m, n) for m, n in memory.items()
                                             if m.startswith(("STG", "ST.", "ATOMG", "RED")))),
                "pack_loads": None, "pack_stores": None,
                "occupancy_model": blocks_per_sm(resources["registers"], shared, arch, threads),
            }
            if mangled in lines:
                record["pack_stores"] = dict(collections.Counter(
                    m for m, where in lines[mangled] if m.startswith("ST") and where & store_lines))
                record["pack_loads"] = dict(collections.Counter(
                    m for m, where in lines[mangled] if m.startswith("LD") and where & load_lines))
            record["pack_store_flag"], record["pack_store_check"] = pack_store_check(record)
            kernels.append(record)
    kernels.sort(key=lambda r: (r["unit"], r["kernel"]))
    return {
        "arch": arch, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nvcc": tool_version(nvcc), "cuobjdump": f"{cuobjdump} ({tool_version(cuobjdump)})",
        "nvdisasm": f"{nvdisasm} ({tool_version(nvdisasm)})" if nvdisasm else None,
        "torch": torch.__version__, "units": [os.path.basename(s) for s in sources],
        "command_example": commands[0] if commands else None, "failures": failures,
        "kernels": kernels, "occupancy_limits": ARCH_LIMITS.get(arch), "block_threads": BLOCK_THREADS,
    }


# ------------------------------------------------------------------------------------------ report
def _widths(counts, prefix):
    """'128:8 64:17 32:20 16:16' for the mnemonics with ``prefix`` (LDG or STG), by bits."""
    bits = collections.Counter()
    for mnemonic, n in counts.items():
        if mnemonic.startswith(prefix):
            bits[width_bits(mnemonic)] += n
    return " ".join(f"{b}:{bits[b]}" for b in sorted(bits, reverse=True)) or "-"


def display_command(command, csrc, work_dir):
    """The nvcc command with this machine's long paths shortened to placeholders."""
    import torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    text = shlex.join(command)
    for path, placeholder in ((work_dir, "<tmp>"), (csrc, "csrc"), (site, "<site-packages>")):
        text = text.replace(path, placeholder)
    return text


def markdown(document):
    arch = document["arch"]
    kernels = document["kernels"]
    lines = [f"# SASS of the CmBN kernels, {arch}", "",
             f"- date: {document['date']}", f"- source: {document['source']}",
             f"- nvcc: {document['nvcc']}; torch {document['torch']}", f"- cuobjdump: {document['cuobjdump']}",
             f"- nvdisasm (line information): {document['nvdisasm'] or 'not found: pack stores judged by width'}",
             f"- report: `{document['invocation']}`", f"- nvcc, per unit: `{document['command_display']}`", ""]
    if document["failures"]:
        lines += ["**Units that did not compile** (their kernels are missing below):", ""]
        lines += [f"- {unit}: {' / '.join(error)[-400:]}" for unit, error in document["failures"].items()]
        lines.append("")
    flagged = [k for k in kernels if k["pack_store_flag"]]
    checked = [k for k in kernels if k["pack_store_flag"] is not None]
    lines += ["## channels_last stores", "",
              "The vectorized channels_last kernels (kRows, VEC > 1) must store each 16-byte pack with "
              "one STG.E.128; the stores of their vectorized path are those nvdisasm's line information "
              "attributes to `store_pack`.", ""]
    if flagged:
        lines += [f"**{len(flagged)} of {len(checked)} store their packs with narrower stores:**", ""]
        lines += [f"- `{k['kernel']}` ({k['unit']}): {k['pack_store_check']}" for k in flagged]
    elif checked:
        lines.append(f"All {len(checked)} store their packs with STG.E.128 only.")
    else:
        lines.append("No vectorized channels_last kernel was found.")
    spilling = [k for k in kernels if (k["spill_store_bytes"] or 0) + (k["spill_load_bytes"] or 0) > 0 or k["stl"]]
    lines += ["", "## Spills", ""]
    lines += ([f"- `{k['kernel']}`: {k['spill_store_bytes']} B spill stores, {k['spill_load_bytes']} B spill "
               f"loads (ptxas), {k['stl']} STL / {k['ldl']} LDL, stack {k['stack_bytes']} B" for k in spilling]
              or ["No kernel spills (ptxas: 0 bytes spill stores and loads; no STL/LDL)."])
    limits = document["occupancy_limits"]
    lines += ["", "## Per kernel", "",
              "Blocks/SM is a **model**, not a measurement: blocks of the kernel's `__launch_bounds__` "
              f"(threads; {document['block_threads']} for the reductions), cuda_occupancy.h's rules"
              + (f" with {limits['regs_per_sm']} registers per SM in {limits['sub_partitions']} sub-partitions "
                 f"allocated per warp in units of {limits['reg_unit']}, {limits['smem_per_sm'] // 1024} KiB "
                 f"shared memory per SM with {limits['smem_reserved_per_block']} B reserved per block in "
                 f"{limits['smem_unit']}-byte units, {limits['threads_per_sm']} threads per SM"
                 if limits else " (no limits known for this architecture)")
              + "; shown as min(by registers, by shared memory, by threads). Static smem: the kernel's own "
              "(ptxas -v; the model adds the reserved bytes). Spills: ptxas -v bytes; STL/LDL: local "
              "stores and loads in the SASS. LDG/STG: global loads and stores by bits per lane (128 = "
              "LDG.E.128, 64 = .64, 32 = plain .E, 16 = .U16). Pack stores: the stores `store_pack` "
              "emits (nvdisasm line information), vectorized kernels only.", "",
              "| kernel | regs | spill st/ld B | STL/LDL | stack B | static smem B | threads | "
              "blocks/SM (regs, smem) | LDG bits:count | STG bits:count | pack stores |",
              "|" + " --- |" * 11]
    for k in kernels:
        occupancy = k["occupancy_model"]
        blocks = (f"{occupancy['blocks']} ({occupancy['by_registers']}, {occupancy['by_shared']})"
                  if occupancy else "-")
        spill = f"{k['spill_store_bytes']}/{k['spill_load_bytes']}"
        pack = ("-" if k["pack_stores"] is None or k["layout"] is None or not k["vec"] or k["vec"] <= 1
                else " ".join(f"{n}x {m}" for m, n in sorted(k["pack_stores"].items())) or "none")
        if k["pack_store_flag"]:
            pack = f"**{pack}**"
        lines.append(f"| `{k['kernel']}` | {k['registers']} | {spill} | {k['stl']}/{k['ldl']} | "
                     f"{k['stack_bytes']} | {k['static_shared_bytes']} | {k['block_threads']} | {blocks} | "
                     f"{_widths(k['global_loads'], 'LD')} | {_widths(k['global_stores'], 'ST')} | {pack} |")
    return "\n".join(lines) + "\n"


def write(document, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "sass-" + document["arch"].replace("_", ""))
    with open(stem + ".json", "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(document))
    return stem + ".json", stem + ".md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder (default bench/results)")
    parser.add_argument("--arch", default="sm_90", help="sm_XY (default sm_90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel nvcc runs")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--csrc", default=os.path.join(REPO, "csrc"), help="kernel sources (default csrc/)")
    source.add_argument("--rev", help="read csrc/ as committed at this git revision (e.g. HEAD)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error("--arch takes sm_XY, e.g. sm_90")
    return args


def main(argv=None):
    args = parse_args(argv)
    home = cuda_home()
    if home:  # torch's extension helpers read it when first imported
        os.environ.setdefault("CUDA_HOME", home)
    invocation = "python bench/sass_report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="cmbn_sass_") as work_dir:
        csrc = export_revision(args.rev, work_dir) if args.rev else os.path.abspath(args.csrc)
        document = analyse(csrc, args.arch, args.jobs, work_dir)
        document["source"] = f"{source_label(csrc, args.rev)} (sources sha256 {sources_digest(csrc)})"
        document["invocation"] = invocation.strip()
        document["command_display"] = (display_command(document.pop("command_example"), csrc, work_dir)
                                       if document.get("command_example") else None)
    json_path, md_path = write(document, args.out)
    flagged = [k["kernel"] for k in document["kernels"] if k["pack_store_flag"]]
    print(f"{len(document['kernels'])} kernels from {len(document['units'])} units"
          + (f" ({len(document['failures'])} failed to compile)" if document["failures"] else "")
          + f"; channels_last kernels storing packs narrower than 128 bits: {len(flagged)}")
    print(f"wrote {json_path} and {md_path}")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
