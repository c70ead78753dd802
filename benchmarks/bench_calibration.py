"""Calibration and unknown cells on the real Moffitt scRNA-seq -> MERFISH task.

Part 1 (calibration): trains ``rmge.RMGEModel`` with its defaults, splits the held-out reference
cells of training in two halves, refits the calibration on half A only and reports the expected
calibration error (10 bins) of half B (reference cells, never used for any fit) and of the MERFISH
cells with truth, before calibration (temperature 1) and after.

Part 2 (unknown cells): for each class in ``--hold-out``, removes it from the reference, trains again
and reports, for several ``unknown_threshold`` values and for the novelty rule of
``predict(novelty_threshold=...)``, how many MERFISH cells of the held-out class become ``"Unknown"``
and how many cells of the known classes are lost.

Writes a markdown report (``--out``, default ``docs/calibration.md``).

    python benchmarks/bench_calibration.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

THRESHOLDS = (0.3, 0.5, 0.7)
NOVELTY_THRESHOLDS = (1.5, 2.0, 3.0)


def _train(reference, query, seed: int = 0):
    import scvi

    import rmge

    scvi.settings.seed = seed
    adata = rmge.pp.prepare(reference, query, labels_key="cell_type")
    rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type")
    model = rmge.RMGEModel(adata)
    t0 = time.perf_counter()
    model.train(enable_progress_bar=False, accelerator="cpu")
    return model, adata, time.perf_counter() - t0


def calibration_part(task) -> list[str]:
    import torch

    from rmge.tl import expected_calibration_error as ece

    query = task.query.copy()
    query.obs["truth"] = task.truth
    model, adata, seconds = _train(task.reference, query)
    is_query = (adata.obs["domain"] != "reference").to_numpy()
    q_idx = np.flatnonzero(is_query)
    truth = adata.obs["truth"].to_numpy()[q_idx]
    scored = pd.notna(truth)
    val = np.random.default_rng(0).permutation(np.asarray(model.validation_indices))
    halves = [np.sort(val[: len(val) // 2]), np.sort(val[len(val) // 2 :])]
    val_truth = adata.obs["cell_type"].to_numpy()
    module = model.module
    fitted = (float(module.calibration_temperature), float(module.reference_calibration_temperature))

    def spatial_probs():
        return model.predict(indices=q_idx, soft=True)[scored]

    # before: temperature 1
    with torch.no_grad():
        module.calibration_temperature.fill_(1.0)
        module.reference_calibration_temperature.fill_(1.0)
    ref_before = model.predict(indices=np.sort(val), soft=True)
    sp_before = spatial_probs()
    # after: two-fold cross-fitting, each half scored with the temperatures fitted on the other
    parts, temps = [], []
    for fit_on, score_on in ((0, 1), (1, 0)):
        model.calibrate(indices=halves[fit_on])
        temps.append((float(module.calibration_temperature), float(module.reference_calibration_temperature)))
        parts.append(model.predict(indices=halves[score_on], soft=True))
    ref_after = pd.concat(parts).loc[ref_before.index]
    model.calibrate()
    sp_after = spatial_probs()
    ref_truth = val_truth[np.sort(val)]
    before = (
        ece(ref_truth, ref_before),
        ece(truth[scored], sp_before),
        ref_before.max(1).mean(),
        sp_before.max(1).mean(),
    )
    after = (ece(ref_truth, ref_after), ece(truth[scored], sp_after), ref_after.max(1).mean(), sp_after.max(1).mean())
    # sampling spread of the reference ECE (few held-out cells): bootstrap over cells
    rng = np.random.default_rng(1)
    boot = [
        ece(ref_truth[b], ref_after.iloc[b])
        for b in (rng.integers(0, len(ref_truth), len(ref_truth)) for _ in range(200))
    ]
    t_sp = ", ".join(f"{a:.2f}" for a, _ in temps)
    t_ref = ", ".join(f"{b:.2f}" for _, b in temps)
    lines = [
        "## Calibration",
        "",
        f"Default model trained in {seconds:.0f} s. Reference ECE: the {len(val)} held-out reference cells "
        f"of training are split in two halves and each half is scored with the temperatures fitted on the "
        f"other (two-fold cross-fitting; spatial temperatures {t_sp}, reference temperatures {t_ref}); "
        f"MERFISH ECE: the {int(scored.sum())} MERFISH cells with truth, with the temperatures fitted on all "
        f"held-out cells (spatial {fitted[0]:.2f}, reference {fitted[1]:.2f}). ECE with 10 bins.",
        "",
        "| | ECE reference (cross-fitted) | ECE MERFISH | mean confidence reference | mean confidence MERFISH |",
        "|---|---|---|---|---|",
        "| before (temperature 1) | {:.3f} | {:.3f} | {:.3f} | {:.3f} |".format(*before),
        "| after `calibrate()` | {:.3f} | {:.3f} | {:.3f} | {:.3f} |".format(*after),
        "",
        f"Bootstrap over the {len(ref_truth)} held-out reference cells: the calibrated reference ECE has a "
        f"standard deviation of {np.std(boot):.3f} (5-95 % range {np.quantile(boot, 0.05):.3f}-"
        f"{np.quantile(boot, 0.95):.3f}).",
        "",
    ]
    return lines


def unknown_part(task, hold_out: list[str]) -> list[str]:
    from rmge._constants import UNKNOWN_LABEL

    lines = [
        "## Unknown cells: one class held out of the reference",
        "",
        "Each row trains on the reference without one class and counts, among MERFISH cells with truth, "
        "the share of the held-out class labelled `Unknown` (wanted: high) and the share of cells of "
        "the known classes labelled `Unknown` (lost: low).",
        "",
        "| held out | cells | rule | held-out cells Unknown | known-class cells Unknown | accuracy of the rest |",
        "|---|---|---|---|---|---|",
    ]
    for held in hold_out:
        reference = task.reference
        keep = (reference.obs["cell_type"].astype(str) != held).to_numpy()
        if keep.all():
            raise SystemExit(f"--hold-out {held!r} is not a reference class of the task.")
        reference = reference[keep].copy()
        reference.obs["cell_type"] = reference.obs["cell_type"].cat.remove_unused_categories()
        query = task.query.copy()
        query.obs["truth"] = task.truth
        model, adata, _ = _train(reference, query)
        q_idx = np.flatnonzero((adata.obs["domain"] != "reference").to_numpy())
        truth = adata.obs["truth"].to_numpy()[q_idx]
        scored = pd.notna(truth)
        is_held = scored & (truth.astype(str) == held)
        known = scored & ~is_held
        rules = [(f"`unknown_threshold={t}`", {"unknown_threshold": t}) for t in THRESHOLDS]
        rules += [(f"`novelty_threshold={t}`", {"novelty_threshold": t}) for t in NOVELTY_THRESHOLDS]
        rules.append(
            ("`novelty_threshold=2`, `unknown_threshold=0.5`", {"novelty_threshold": 2.0, "unknown_threshold": 0.5})
        )
        for name, kwargs in rules:
            labels = model.predict(indices=q_idx, **kwargs)
            unk = labels == UNKNOWN_LABEL
            rest = known & ~unk
            acc = float(np.mean(labels[rest] == truth[rest])) if rest.any() else float("nan")
            lines.append(
                f"| {held} | {int(is_held.sum())} | {name} | {unk[is_held].mean():.2f} | {unk[known].mean():.2f} "
                f"| {acc:.3f} |"
            )
    lines.append("")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on small shared CPUs)")
    parser.add_argument("--hold-out", nargs="*", default=["Ependymal", "OD immature"], help="classes to hold out")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "calibration.md"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import tasks

    from rmge._atomic import atomic_write

    task = tasks.load_moffitt()
    lines = [
        "# Calibration and unknown cells (Moffitt scRNA-seq → MERFISH)",
        "",
        "Produced by `python benchmarks/bench_calibration.py` (rmge defaults, seed 0, "
        f"{args.threads} torch thread(s)). {task.kind}.",
        "",
    ]
    if not args.skip_calibration:
        lines += calibration_part(task)
    if args.hold_out:
        lines += unknown_part(task, args.hold_out)
    text = "\n".join(lines)
    print(text)
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"), suffix=".md.tmp")


if __name__ == "__main__":
    main()
