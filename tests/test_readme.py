"""The README and docs/ as a new user reads them: every Python snippet runs as written, and the README
stays a front door (at most 300 lines).

Each ```python block is a whole program: it runs alone, in a fresh interpreter, from an empty folder,
with this checkout's cmbn_ext importable and the environment torchrun gives one process (for the snippets that start a process group). A
snippet whose imports are not installed (an optional training stack) is skipped, naming them; one whose
imports are installed always runs.
"""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300


def _python_snippets(page):
    """``(line, code)`` of every ```python block of ``page``."""
    text = page.read_text()
    return [(text.count("\n", 0, block.start()) + 2, block.group(1))
            for block in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def _missing_imports(code):
    """The top-level packages the snippet imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


# What torchrun gives one process; port 0: the store of a single rank binds any free port.
TORCHRUN = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


SNIPPETS = [(page.relative_to(ROOT).as_posix(), line, code)
            for page in PAGES for line, code in _python_snippets(page)]


def test_the_pages_have_their_snippets():
    assert _python_snippets(README), "the README's usage loop (a ```python block) was not found"
    assert len(SNIPPETS) >= 12, "the ```python blocks of README.md and docs/ were not found"


def test_the_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move the details to docs/"


@pytest.mark.parametrize("page,line,code", SNIPPETS, ids=[f"{page}-line-{line}" for page, line, _ in SNIPPETS])
def test_snippet_runs_as_written(page, line, code, tmp_path):
    missing = _missing_imports(code)
    if missing:
        pytest.skip(f"the snippet at {page} line {line} needs {', '.join(missing)}, not installed")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    # this checkout's cmbn_ext, installed or not
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, **TORCHRUN, PYTHONPATH=path), timeout=600)
    assert result.returncode == 0, (f"the snippet at {page} line {line} failed:\n{code}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    # The loops the pages show keep their windows within an optimizer step: no OpenWindowWarning.
    assert "OpenWindowWarning" not in result.stderr, result.stderr[-5000:]


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[-1].strip()
    assert command.startswith("pip install") and command.endswith("python -m pytest -q"), command
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    assert any(command in block.splitlines() for block in blocks), \
        f"the README's test command is not the one .ci/run runs: {command}"
