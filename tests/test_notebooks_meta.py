"""The committed notebooks are runnable as shipped and carry their outputs (so plots show on a repository page).

Executing them is nbmake's job (``pytest --nbmake notebooks``); these checks only read the files, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_three_notebooks_are_there():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}*.ipynb in {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_uses_the_python3_kernel(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3", f"{path.name}: kernelspec={nb.metadata['kernelspec']}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_in_order_without_errors(path):
    cells = _code_cells(nbformat.read(path, as_version=4))
    counts = [c.execution_count for c in cells]
    assert None not in counts, f"{path.name}: unexecuted code cells (execution_count={counts})"
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not one top-to-bottom run: {counts}"
    for i, c in enumerate(cells):
        kinds = [o.output_type for o in c.outputs]
        assert "error" not in kinds, f"{path.name}: code cell {i} has an error output"
        stderr = [o.text for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, f"{path.name}: code cell {i} wrote to stderr (a warning?): {stderr[0][:200]!r}"


def _uses_hub_stack(path):
    text = "\n".join(c.source for c in _code_cells(nbformat.read(path, as_version=4)))
    return any(m in text for m in ("rotfunc.demo", "import peft", "from peft", "transformers", "load_minilm"))


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _uses_hub_stack(p)], ids=lambda p: p.name)
def test_notebook_runs_offline(path):
    first = _code_cells(nbformat.read(path, as_version=4))[0].source
    assert 'os.environ.setdefault("HF_HUB_OFFLINE", "1")' in first, f"{path.name}: first cell must set HF_HUB_OFFLINE"


@pytest.mark.parametrize(
    "name, images", [("02_property_testing.ipynb", 1), ("03_quantized_finetuning.ipynb", 3)]
)
def test_notebook_carries_its_plots(name, images):
    path = next((p for p in NOTEBOOKS if p.name == name), None)
    if path is None:
        pytest.fail(f"notebooks/{name} is missing")
    pngs = sum("image/png" in o.get("data", {}) for c in _code_cells(nbformat.read(path, as_version=4)) for o in c.outputs)
    assert pngs >= images, f"{name}: {pngs} embedded plots, expected at least {images}"
