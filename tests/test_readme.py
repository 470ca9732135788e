"""The README as a new user reads it: every Python snippet runs as written, and its demo figures are the
committed run's.

Each ```python block is a whole program: it runs alone, in a fresh interpreter, from an empty folder,
with the environment torchrun gives one process (for the snippets that start a process group). A
snippet whose imports are not installed (an optional training stack) is skipped, naming them; one whose
imports are installed always runs.
"""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_snippets():
    """``(line, code)`` of every ```python block."""
    return [(README.count("\n", 0, block.start()) + 2, block.group(1))
            for block in re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M)]


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


SNIPPETS = _python_snippets()


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 6, "the README's ```python blocks were not found"


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"README-line-{line}" for line, _ in SNIPPETS])
def test_snippet_runs_as_written(line, code, tmp_path):
    missing = _missing_imports(code)
    if missing:
        pytest.skip(f"the snippet at README line {line} needs {', '.join(missing)}, not installed")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, **TORCHRUN), timeout=600)
    assert result.returncode == 0, (f"the snippet at README line {line} failed:\n{code}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    # The loops the README shows keep their windows within an optimizer step: no OpenWindowWarning.
    assert "OpenWindowWarning" not in result.stderr, result.stderr[-5000:]
