"""Turns the CUDA sources (csrc/cuda/ and the shared files of csrc/) into C++ that g++ compiles against
cuda_runtime.h.

Only the CUDA syntax is rewritten; the kernels and launchers are compiled as written:
  - ``kernel<<<grid, block, bytes, stream>>>(args);`` -> ``cmbn_emu::launch<&kernel>(grid, block, args);``
  - ``cudaLaunchCooperativeKernel(&kernel, grid, block, args, bytes, stream)`` ->
    ``cmbn_emu::launch_cooperative<&kernel>(grid, block, args)``: the kernel must be named there (a
    constant expression), so that its launches are counted per instantiation as the others are
  - ``__shared__ T name[N];`` -> ``auto& name = cmbn_emu::shared_array<T, N>();`` (see cuda_runtime.h)
  - ``at::empty(...)`` / ``at::empty_like(...)`` -> ``cmbn_emu::poisoned(...)``
  - ``.is_cuda()`` -> ``.is_cpu()`` and ``c10::DeviceType::CUDA`` -> ``c10::DeviceType::CPU`` wherever
    they appear (the device guards' devices too, which the emulated guard ignores): CPU tensors stand
    for the emulated device's; the other spellings of the device type (``kCUDA``) are refused
  - ``reinterpret_cast<`` -> ``cmbn_emu::aligned_reinterpret_cast<``, which stops at a misaligned pointer
  - ``TORCH_LIBRARY_IMPL(cmbn_ext, CUDA, m)`` -> ``(cmbn_ext, CPU, m)``: the emulated kernels serve CPU
    tensors, in place of the reference the package registers for them.
"""
import os
import re

# The launch configuration holds no other <<< or >>>: a "<<<>>>" in a comment starts no launch.
LAUNCH = re.compile(r"([\w:]+(?:<[^<>;()]*>)?)\s*<<<((?:(?!<<<|>>>).)*)>>>\s*\(", re.S)
SHARED = re.compile(r"__shared__\s+([^;\[]+?)\s+(\w+)\s*\[([^\]]+)\]\s*;")
COOPERATIVE_LAUNCH = re.compile(r"\bcudaLaunchCooperativeKernel\s*\(")
KERNEL_ADDRESS = re.compile(r"\s*&\s*(?:::)?[A-Za-z_][\w:]*\s*")
ALLOCATION = re.compile(r"\bat::(empty|empty_like)\(")
REGISTRATION = "TORCH_LIBRARY_IMPL(cmbn_ext, CUDA, m)"
SKIPPED = {"python_module.cpp"}  # the Python module shell of cmbn_ext._C: not needed to load the ops


def closing_paren(text, open_index):
    """Index of the parenthesis that closes the one at ``open_index``."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses after: {text[open_index:open_index + 80]!r}")


def split_top_level(text):
    """``text`` split at the commas outside any parentheses, brackets or braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def rewrite_calls(text, pattern, rewrite):
    """``text`` with every call that ``pattern`` finds (a match ends at the call's opening parenthesis)
    replaced by ``rewrite(match, arguments)``."""
    out, position = [], 0
    for match in pattern.finditer(text):
        if match.start() < position:
            continue
        open_index = match.end() - 1
        close = closing_paren(text, open_index)
        out.append(text[position:match.start()])
        out.append(rewrite(match, text[open_index + 1:close]))
        position = close + 1
    out.append(text[position:])
    return "".join(out)


def launch(match, arguments):
    grid, block = split_top_level(match.group(2))[:2]
    arguments = f", {arguments}" if arguments.strip() else ""
    return f"::cmbn_emu::launch<&{match.group(1)}>({grid}, {block}{arguments})"


def template_id_end(text, start):
    """Index just past the template argument list that opens at ``text[start]`` (a ``<``); a ``>``
    inside parentheses, as in ``(N > 2)``, does not close it."""
    angles = brackets = 0
    for i in range(start, len(text)):
        if text[i] in "([":
            brackets += 1
        elif text[i] in ")]":
            brackets -= 1
        elif text[i] == "<" and brackets == 0:
            angles += 1
        elif text[i] == ">" and brackets == 0:
            angles -= 1
            if angles == 0:
                return i + 1
    raise ValueError(f"unbalanced template arguments: {text[start:start + 80]!r}")


def cooperative_launch(match, arguments):
    """``cudaLaunchCooperativeKernel(&kernel<...>, grid, block, args, bytes, stream)``: the first
    argument is split off by hand, since its template arguments hold commas. In a ``//`` comment the
    call is left as it is."""
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    if "//" in match.string[line_start:match.start()]:
        return f"{match.group(0)}{arguments})"
    name = KERNEL_ADDRESS.match(arguments)
    end = name.end() if name else 0
    if name and arguments[end:end + 1] == "<":
        end = template_id_end(arguments, end)
    rest = arguments[end:].lstrip()
    parts = split_top_level(rest[1:]) if name and rest.startswith(",") else []
    if len(parts) not in (3, 4, 5):  # CUDA's defaults: no dynamic shared memory, the default stream
        raise ValueError("translate.py expects cudaLaunchCooperativeKernel(&kernel, grid, block, args"
                         f"[, bytes[, stream]]), not: cudaLaunchCooperativeKernel({arguments})")
    kernel = arguments[:end].strip()
    grid, block, kernel_arguments = parts[:3]
    return f"::cmbn_emu::launch_cooperative<{kernel}>({grid}, {block}, {kernel_arguments})"


def poisoned_allocation(match, arguments):
    return f"::cmbn_emu::poisoned(at::{match.group(1)}({arguments}))"


def translate(text):
    text = rewrite_calls(text, LAUNCH, launch)
    text = rewrite_calls(text, COOPERATIVE_LAUNCH, cooperative_launch)
    text = SHARED.sub(r"auto& \2 = ::cmbn_emu::shared_array<\1, \3>();", text)
    text = rewrite_calls(text, ALLOCATION, poisoned_allocation)
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")
    text = text.replace("reinterpret_cast<", "::cmbn_emu::aligned_reinterpret_cast<")
    text = text.replace(REGISTRATION, "TORCH_LIBRARY_IMPL(cmbn_ext, CPU, m)")
    for line in text.splitlines():  # a construct the patterns above do not know fails here, not in g++
        code = line.split("//")[0]
        if "<<<" in code or "__shared__" in code or "kCUDA" in code:
            raise ValueError(f"translate.py cannot rewrite this CUDA construct: {line.strip()!r}")
    return text


def translate_tree(source_dirs, target_dir):
    """Translates every source of the ``source_dirs`` (not their subfolders) into the one folder
    ``target_dir`` (.cu files become .cpp), where their quoted includes find each other, and returns the
    paths of the translation units. Files whose text would not change are not rewritten, so an
    unchanged tree is not recompiled."""
    os.makedirs(target_dir, exist_ok=True)
    units, registrations, seen = [], 0, {}
    for source_dir in source_dirs:
        for name in sorted(os.listdir(source_dir)):
            if name in SKIPPED or not name.endswith((".cu", ".cuh", ".h", ".cpp")):
                continue
            target_name = name[:-3] + ".cpp" if name.endswith(".cu") else name
            if target_name in seen:  # one folder: a second file of that name would replace the first
                raise ValueError(f"{name} in {source_dir} and {seen[target_name]} translate to one "
                                 f"file, {target_name}")
            seen[target_name] = source_dir
            with open(os.path.join(source_dir, name)) as source:
                text = source.read()
            registrations += text.count(REGISTRATION)
            text = translate(text)
            target = os.path.join(target_dir, target_name)
            if not os.path.exists(target) or _read(target) != text:
                with open(target, "w") as out:
                    out.write(text)
            if target_name.endswith(".cpp"):
                units.append(target)
    if registrations != 1:  # else the kernels would not serve CPU tensors, and the reference would
        raise ValueError(f"expected one {REGISTRATION!r} in {source_dirs}, found {registrations}")
    return units


def _read(path):
    with open(path) as file:
        return file.read()
