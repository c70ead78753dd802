import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
COLUMNS = ["method", "accuracy", "macro-F1", "balanced accuracy", "ECE", "wall s", "peak MiB", "note"]


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Parse the '## task' sections of the results file into rows keyed by column name."""
    tables, task, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            task, header = line[3:].strip(), None
            tables[task] = []
        elif line.startswith("|") and task is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                assert header == COLUMNS
            elif not set(cells[0]) <= {"-", ":"}:
                tables[task].append(dict(zip(header, cells, strict=True)))
    return tables


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ not present")
def test_smoke_run_writes_table_records_and_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    tables = _tables((tmp_path / "benchmark_results.md").read_text())
    assert set(tables) == {"synthetic", "synthetic@0.1"}
    for task, rows in tables.items():
        assert [r["method"] for r in rows] == ["centroid", "logreg"], task
        for row in rows:
            acc, f1, bacc = (float(row[k]) for k in ("accuracy", "macro-F1", "balanced accuracy"))
            # four well-separated synthetic types: far above chance (0.25) even at 10% depth
            assert 0.6 < acc <= 1 and 0.6 < f1 <= 1 and 0.6 < bacc <= 1, row
            assert 0 <= float(row["wall s"]) < 60
            assert 50 < float(row["peak MiB"]) < 4000
        by_method = {r["method"]: r for r in rows}
        assert by_method["centroid"]["ECE"] == "—"  # no probabilities
        assert 0 <= float(by_method["logreg"]["ECE"]) <= 1
    # full depth is easier than 10% depth
    assert float(tables["synthetic"][0]["accuracy"]) >= float(tables["synthetic@0.1"][0]["accuracy"])

    records = sorted((tmp_path / "benchmark_runs").glob("*.json"))
    assert len(records) == 4
    rec = json.loads((tmp_path / "benchmark_runs" / "synthetic__logreg.json").read_text())
    assert rec["status"] == "ok" and rec["exit_code"] == 0
    assert rec["metrics"]["n_scored"] == rec["n_query"] == 240
    assert rec["fit_predict_seconds"] <= rec["process_seconds"]

    png = tmp_path / "benchmark_sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RUN), "--methods", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "unknown method(s) nope" in proc.stderr
