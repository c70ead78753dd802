"""Label-transfer benchmark: run (task, method) pairs, each in its own process, and tabulate them.

Examples
--------
python benchmarks/run.py                                   # all tasks, all methods
python benchmarks/run.py --tasks moffitt --methods centroid,logreg
python benchmarks/run.py --report-only                     # rebuild the table from saved records
python benchmarks/run.py --smoke --out /tmp/bench          # tiny synthetic run (< 1 min)

Each run's record is saved as ``RESULTS/<task>__<method>.json``; the table
(``OUT/benchmark_results.md``) and the depth plot (``OUT/benchmark_sparsity.png``) are built from
every record in the results folder, so runs made at different times add up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import tasks as task_defs  # noqa: E402

ALL_METHODS = ("rmge", "rmge_counts", "rmge_original", "centroid", "logreg", "celltypist_like", "scanvi", "tangram")
SMOKE_METHODS = ("centroid", "logreg")


def _file_id(task_id: str, method: str) -> str:
    return f"{task_id.replace('@', '-')}__{method}"


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run_child(
    cmd: list[str], log_path: Path, timeout: float, env: dict | None = None
) -> tuple[int, float, float, bool]:
    """Run ``cmd`` in a new process; return (exit status, wall seconds, ru_maxrss MiB, timed out).

    ``ru_maxrss`` comes from ``os.wait4`` on that child alone (``RUSAGE_CHILDREN`` would give the
    largest of all children so far). On Linux it includes the parent's memory at fork time, so it
    is an upper bound; the worker reports its own peak (``VmHWM``), which the record prefers.
    """
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting again
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024.0, timed_out


def score(task_id: str, method: str, prefix: Path, worker: dict) -> dict | None:
    """Metrics of a finished run from its saved predictions (``None`` when there are none)."""
    import numpy as np
    import pandas as pd

    from rmge.tl import transfer_metrics

    npz = prefix.with_name(prefix.name + ".npz")
    if worker.get("status") != "ok" or not npz.exists():
        return None
    with np.load(npz, allow_pickle=False) as z:
        truth = np.where(z["has_truth"], z["truth"].astype(object), None)
        proba = pd.DataFrame(z["proba"], columns=z["classes"]) if "proba" in z else None
        labels = np.where(z["labels"] == "", None, z["labels"].astype(object))  # "": the method gave no label
    return transfer_metrics(truth, labels, proba=proba, classes=worker.get("reference_classes"))


def run_one(
    task_id: str,
    method: str,
    results: Path,
    timeout: float,
    max_epochs: int | None,
    seed: int,
    keep_predictions: bool = False,
    threads: int = 1,
) -> dict:
    """Run one pair in a child process, score it and save its record."""
    fid = _file_id(task_id, method)
    prefix = results / fid
    for suffix in (".npz", ".worker.json"):
        prefix.with_name(fid + suffix).unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "worker.py"), task_id, method, str(prefix), "--seed", str(seed)]
    if max_epochs is not None:
        cmd += ["--max-epochs", str(max_epochs)]
    cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    code, wall, peak, timed_out = run_child(cmd, results / f"{fid}.log", timeout, env)
    worker_json = prefix.with_name(fid + ".worker.json")
    record = json.loads(worker_json.read_text()) if worker_json.exists() else {"task": task_id, "method": method}
    record.update(process_seconds=round(wall, 2), ru_maxrss_mib=round(peak, 1), exit_code=code)
    record.setdefault("peak_rss_mib", record["ru_maxrss_mib"])
    if timed_out:
        record.update(status="failed", message=f"timed out after {timeout:.0f} s")
    elif record.get("status") == "failed" and not record.get("message"):
        tail = (results / f"{fid}.log").read_text(errors="replace").strip().splitlines()[-1:]
        record["message"] = f"worker stopped without an error message; log ends with: {' '.join(tail)}"
    elif code != 0 or "status" not in record:
        tail = (results / f"{fid}.log").read_text(errors="replace").strip().splitlines()[-1:]
        record.update(status="failed", message=f"worker exited with {code}: {' '.join(tail)}")
    try:
        record["metrics"] = score(task_id, method, prefix, record)
    except Exception as err:  # a malformed prediction is a failed run, not a crash of the harness
        record.update(status="failed", message=f"scoring failed: {type(err).__name__}: {err}", metrics=None)
    record["seed"] = seed
    record["max_epochs"] = max_epochs
    record["threads"] = threads
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _atomic_json(results / f"{fid}.json", record)
    worker_json.unlink(missing_ok=True)
    if not keep_predictions:
        prefix.with_name(fid + ".npz").unlink(missing_ok=True)
    return record


def _summary(rec: dict) -> str:
    m = rec.get("metrics") or {}
    if rec.get("status") != "ok":
        return f"{rec.get('status')}: {(rec.get('message') or '').splitlines()[0][:200] if rec.get('message') else ''}"
    parts = [f"acc {m.get('accuracy', float('nan')):.3f}", f"macro-F1 {m.get('macro_f1', float('nan')):.3f}"]
    if "ece" in m:
        parts.append(f"ECE {m['ece']:.3f}")
    parts.append(f"{rec.get('fit_predict_seconds', 0):.1f} s, {rec.get('peak_rss_mib', 0):.0f} MiB")
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks",
        default="moffitt,granja,granja+archr,sparsity",
        help="comma-separated: moffitt, granja, granja+archr, sparsity (also moffitt+shared, moffitt+rescaled)",
    )
    parser.add_argument(
        "--methods", default=",".join(ALL_METHODS), help=f"comma-separated from {', '.join(ALL_METHODS)}"
    )
    parser.add_argument("--out", default=str(HERE.parent / "docs"), help="folder of the table and plot")
    parser.add_argument("--results", default=None, help="folder of per-run records (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic task, fast methods, few epochs")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on training epochs of neural methods")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each run (torch, BLAS, OpenMP); 1 is fastest for these small models on a busy machine",
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    parser.add_argument(
        "--keep-predictions", action="store_true", help="keep each run's labels and probabilities (RESULTS/*.npz)"
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.smoke:
        task_names = ["synthetic"]
        methods = list(SMOKE_METHODS) if args.methods == ",".join(ALL_METHODS) else args.methods.split(",")
        max_epochs = args.max_epochs or 3
        results = Path(args.results) if args.results else out / "benchmark_runs"
    else:
        task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        max_epochs = args.max_epochs
        results = Path(args.results) if args.results else HERE / "results"
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    try:
        task_ids = task_defs.expand(task_names, smoke=args.smoke)
    except ValueError as err:
        parser.error(str(err))
    results.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        for task_id in task_ids:
            for method in methods:
                print(f"[{task_id} / {method}] running ...", flush=True)
                rec = run_one(
                    task_id, method, results, args.timeout, max_epochs, args.seed, args.keep_predictions, args.threads
                )
                print(f"[{task_id} / {method}] {_summary(rec)}", flush=True)

    records = report.load_records(results)
    table = report.write_table(records, out / "benchmark_results.md")
    print(f"table: {table}")
    plot = report.write_depth_plot(records, out / "benchmark_sparsity.png")
    if plot is not None:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
