"""Run one (task, method) pair; started by ``run.py`` in a process of its own.

Writes ``PREFIX.npz`` (truth, predicted labels, probabilities) and ``PREFIX.worker.json``
(status, timings, sizes). Exits 0 whenever it could record an outcome, failures included.

Usage: ``python benchmarks/worker.py TASK METHOD PREFIX [--max-epochs N] [--seed S]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started, in MiB.

    Read from ``VmHWM`` in ``/proc/self/status`` (Linux): unlike ``ru_maxrss``, which a child
    inherits from its parent at fork/exec, it counts only this program's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task")
    parser.add_argument("method")
    parser.add_argument("prefix")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    prefix = Path(args.prefix)
    record: dict = {"task": args.task, "method": args.method, "status": "failed"}
    t0 = time.perf_counter()
    try:
        import methods
        import numpy as np
        import tasks

        if args.method not in methods.METHODS:
            raise ValueError(f"unknown method {args.method!r}; choose from {', '.join(methods.METHODS)}")
        try:
            task = tasks.load_task(args.task)
        except tasks.TaskUnavailable as err:
            record.update(status="skipped", message=f"task unavailable: {err}")
            return 0
        record.update(
            kind=task.kind,
            depth_fraction=task.depth_fraction,
            n_reference=int(task.reference.n_obs),
            n_query=int(task.query.n_obs),
            n_genes=int(task.reference.n_vars),
            reference_classes=sorted(map(str, task.reference.obs[task.labels_key].unique())),
            load_seconds=round(time.perf_counter() - t0, 3),
        )
        fit = methods.METHODS[args.method]
        methods.preload(args.method)  # imports are not part of the timed fit
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(args.threads)
        t1 = time.perf_counter()
        try:
            labels, proba = fit(task.reference, task.query, task.labels_key, seed=args.seed, max_epochs=args.max_epochs)
        except (methods.MethodUnavailable, ImportError) as err:
            record.update(status="unavailable", message=str(err))
            return 0
        record["fit_predict_seconds"] = round(time.perf_counter() - t1, 3)
        labels = np.asarray(labels, dtype=object)
        if labels.shape != (task.query.n_obs,):
            raise ValueError(f"{args.method} returned {labels.shape} labels for {task.query.n_obs} query cells")
        arrays = {
            "truth": np.array(["" if t is None else str(t) for t in task.truth], dtype=str),
            "has_truth": np.array([t is not None for t in task.truth]),
            "labels": np.array(["" if p is None else str(p) for p in labels], dtype=str),  # "": no label
        }
        if proba is not None:
            arrays["proba"] = proba.to_numpy(dtype=np.float32)
            arrays["classes"] = np.asarray(proba.columns, dtype=str)
        tmp = prefix.with_name(prefix.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, prefix.with_name(prefix.name + ".npz"))
        record.update(status="ok", impl=methods.RUN_INFO.get("impl", ""))
        return 0
    except Exception as err:  # recorded, so that one failing run does not stop the others
        record.update(status="failed", message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        traceback.print_exc()
        return 0
    except BaseException as err:  # interrupted (signal, SystemExit): record why, then stop
        record.update(status="failed", message=f"interrupted: {type(err).__name__} {err}")
        raise
    finally:
        record["worker_seconds"] = round(time.perf_counter() - t0, 3)
        record["peak_rss_mib"] = round(peak_rss_mib(), 1)
        _atomic_json(prefix.with_name(prefix.name + ".worker.json"), record)


if __name__ == "__main__":
    sys.exit(main())
