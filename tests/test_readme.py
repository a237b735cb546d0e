"""README.md works as written: every ```python block runs on its own, and what the README points to exists.

Each block runs in a fresh interpreter, with warnings as errors, in an empty directory, as a new user pasting it
into a file would run it: a block that leans on an earlier block's names, on an undefined ``model`` or on a
literal ``...`` fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, body) of every ```lang block."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)
    ]


PYTHON_BLOCKS = _fenced_blocks(README.read_text(encoding="utf-8"), "python")


def test_fence_extraction_finds_every_block():
    text = "intro\n```python\na = 1\n```\n\n```bash\nmake x\n```\n```python\nb = 2\n\nc = 3\n```\n"
    assert _fenced_blocks(text, "python") == [(2, "a = 1\n"), (9, "b = 2\n\nc = 3\n")]
    assert _fenced_blocks(text, "bash") == [(6, "make x\n")]


def test_readme_has_its_python_examples():
    # the functional API and the model example at least: an extraction that finds nothing tests nothing
    assert len(PYTHON_BLOCKS) >= 2, f"found {len(PYTHON_BLOCKS)} ```python blocks in README.md"


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs_as_written(line, code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (
        f"the ```python block at README.md:{line} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def test_make_targets_named_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([A-Za-z][\w-]*)\b(?!=)", README.read_text(encoding="utf-8")))  # not `make VAR=`
    for _, body in _fenced_blocks(README.read_text(encoding="utf-8"), "bash"):
        named |= set(re.findall(r"^make ([A-Za-z][\w-]*)\b(?!=)", body, re.M))
    assert {"demo", "test"} <= named, f"README names make targets {sorted(named)}"
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_relative_links_in_the_readme_point_to_files():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    local = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]
    assert local, "no relative links found"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
