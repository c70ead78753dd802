"""The tutorial notebooks run from top to bottom, and are stored with their outputs for the docs.

Each notebook is executed in a fresh kernel with ``RMGE_TUTORIAL_FAST=1`` (less data, a few epochs),
in a temporary folder; any cell that raises fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial tests need nbclient and ipykernel (test extra)")
nbclient = pytest.importorskip("nbclient", reason="the tutorial tests need nbclient and ipykernel (test extra)")
pytest.importorskip("ipykernel", reason="the tutorial tests need nbclient and ipykernel (test extra)")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

# Text each notebook must print when it has run through: a result, not just the absence of errors.
EXPECTED = {
    "01_snrna_to_stereo_seq.ipynb": ["same labels: True, same probabilities: True"],
    "02_snatac_to_spatial.ipynb": ["CellPairing:", "n_fragments_transferred"],
}


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
                parts.append(str(out["data"].get("text/html", "")))
    return "\n".join(parts)


def test_tutorials_exist():
    assert {p.name for p in NOTEBOOKS} >= set(EXPECTED), f"tutorials/ holds {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_is_executed(path):
    """The docs render stored outputs (no execution at build time): every code cell must hold its run."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    not_run = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is None]
    assert not not_run, f"{path.name}: cells {not_run} were not executed; run the notebook and save it with outputs"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name} was not run top to bottom in one kernel: {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} is stored with an error output: {errors[0].get('ename')}"
    n_figures = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert n_figures >= 2, f"{path.name} is stored with {n_figures} figure(s); its plots were not displayed"
    assert "torch.set_num_threads(1)" in code[0].source
    assert "RMGE_TUTORIAL_FAST" in code[0].source
    for expected in EXPECTED.get(path.name, []):
        assert expected in _text_outputs(nb), f"{path.name}: stored outputs lack {expected!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RMGE_TUTORIAL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    text = _text_outputs(nb)
    assert "fast=True" in text
    for expected in EXPECTED.get(path.name, []):
        assert expected in text, f"{path.name} ran, but its outputs lack {expected!r}"
