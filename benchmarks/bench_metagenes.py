"""Metagene marker list on the Moffitt task: top genes of each type's metagene against known markers.

Trains :class:`rmge.RMGEModel` with its defaults on the Moffitt et al. (2018) hypothalamus scRNA-seq
reference and MERFISH query (``tasks.load_moffitt``: coarse classes, shared genes), ranks each
type's genes by their metagene weight (``model.get_metagenes()``, largest first; also by the
contrast, weight minus the mean weight over types) and checks the top genes against marker genes
from the literature that the panel measures. Writes a Markdown page (default ``docs/metagenes.md``).

Usage::

    python benchmarks/bench_metagenes.py [--seed 0] [--out docs/metagenes.md] [--top 10]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402

import rmge  # noqa: E402
from rmge._atomic import atomic_write  # noqa: E402

# Marker genes of the coarse classes from the literature, restricted to genes on the MERFISH panel
# (the script checks that each is one of the shared genes). Sources:
# [M] Moffitt et al. 2018, Science 362:eaau5324 (marker genes of the major cell classes);
# [Ma] Marques et al. 2016, Science 352:1326 (oligodendrocyte lineage);
# [V] Vanlandewijck et al. 2018, Nature 554:475 (brain vascular and perivascular cells);
# [Z] Zhang et al. 2014, J. Neurosci. 34:11929 and Cahoy et al. 2008, J. Neurosci. 28:264 (astrocytes).
KNOWN_MARKERS: dict[str, list[str]] = {
    "Excitatory": ["Slc17a6", "Slc17a7", "Slc17a8"],  # vesicular glutamate transporters [M]
    "Inhibitory": ["Gad1"],  # GAD67 [M]; Slc32a1 (VGAT) is not on the panel
    "Astrocyte": ["Aqp4", "Aldh1l1", "Mlc1"],  # [M], [Z]; Gja1 is not on the panel
    "OD mature": ["Ermn", "Opalin", "Gjc3"],  # [M], [Ma]; Mbp, Plp1, Mobp are not on the panel
    "OD immature": ["Pdgfra", "Cspg5", "Sox6"],  # oligodendrocyte precursors [M], [Ma]
    "Endothelial": ["Fn1", "Slco1a4"],  # [M], [V]; Cldn5 is not on the panel
    "Microglia": ["Selplg"],  # [M]; C1qa is not on the panel
    "Ependymal": ["Cd24a"],  # [M]; Ttr is not on the panel
    "Mural/Pericyte": ["Myh11", "Lmod1", "Rgs5"],  # smooth muscle (Myh11, Lmod1) and pericytes (Rgs5) [M], [V]
}
SOURCES = (
    "Moffitt et al. 2018, *Science* 362:eaau5324 (marker genes of the major hypothalamic cell classes); "
    "Marques et al. 2016, *Science* 352:1326 (oligodendrocyte lineage); Vanlandewijck et al. 2018, "
    "*Nature* 554:475 (vascular and perivascular cells); Zhang et al. 2014, *J. Neurosci.* 34:11929 and "
    "Cahoy et al. 2008, *J. Neurosci.* 28:264 (astrocytes)."
)


def train_moffitt(seed: int = 0):
    """Train RMGEModel with its defaults on the Moffitt task; return the model, its AnnData and the task."""
    import scvi

    task = tasks.load_moffitt()
    scvi.settings.seed = seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata = rmge.pp.prepare(task.reference, task.query, labels_key=task.labels_key)
    rmge.RMGEModel.setup_anndata(adata, labels_key=task.labels_key, domain_key="domain")
    model = rmge.RMGEModel(adata)
    model.train(enable_progress_bar=False)
    return model, adata, task


def spatial_accuracy(model, adata, task) -> dict[str, float]:
    """Scores of the spatial predictions on the query's known coarse classes."""
    q_idx = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    names = adata.obs["original_obs_name"].iloc[q_idx].astype(str).to_numpy()
    truth = pd.Series(task.truth, index=task.query.obs_names.astype(str)).reindex(names).to_numpy()
    proba = model.predict(indices=q_idx, soft=True)
    pred = proba.columns.to_numpy()[proba.to_numpy().argmax(1)]
    return rmge.tl.transfer_metrics(truth, pred, proba)


def marker_table(metagenes: pd.DataFrame, top: int) -> tuple[pd.DataFrame, float, int]:
    """Per class: top genes, known markers among them; fraction of classes with a marker in the top 5."""
    genes = set(metagenes.index)
    missing = {c: [g for g in m if g not in genes] for c, m in KNOWN_MARKERS.items()}
    missing = {c: m for c, m in missing.items() if m}
    if missing:
        raise ValueError(f"marker genes not among the shared genes: {missing}")
    rows = []
    for cls in metagenes.columns:
        ranked = metagenes[cls].sort_values(ascending=False)
        top_genes = list(ranked.index[:top])
        markers = KNOWN_MARKERS.get(cls)
        rank_of = {g: int(np.flatnonzero(ranked.index == g)[0]) + 1 for g in (markers or [])}
        rows.append(
            {
                "class": cls,
                "top_genes": top_genes,
                "weights": [float(ranked[g]) for g in top_genes],
                "markers": markers,
                "hits": [g for g in top_genes if markers and g in markers],
                "marker_ranks": rank_of,
                "hit_top5": bool(markers) and any(g in markers for g in top_genes[:5]),
            }
        )
    table = pd.DataFrame(rows)
    scored = table[table["markers"].notna()]
    return table, float(scored["hit_top5"].mean()), len(scored)


def _fmt_genes(genes, hits) -> str:
    return ", ".join(f"**{g}**" if g in hits else g for g in genes)


def contrast(metagenes: pd.DataFrame) -> pd.DataFrame:
    """Each type's weights minus the mean weight over types: what sets a type apart from the average type."""
    return metagenes.sub(metagenes.mean(axis=1), axis=0)


def write_page(path: Path, table, fraction, n_scored, table_c, fraction_c, scores, info) -> None:
    top = len(table["top_genes"].iloc[0])
    n_hit = int(table["hit_top5"].sum())
    n_hit_c = int(table_c["hit_top5"].sum())
    shared = pd.Series([g for genes in table["top_genes"] for g in genes]).value_counts()
    shared = shared[shared >= len(table) // 2]
    shared_text = ", ".join(f"{g} ({n})" for g, n in shared.items())
    lines = [
        "# Metagenes on real data: Moffitt hypothalamus",
        "",
        "Each reference type's **metagene** is a row of the encoder's weights: entry *g* is how much one",
        "standard deviation of gene *g*'s log expression (within its domain) raises the type's activity",
        "(`model.get_metagenes()`, genes × types; unit norm per type with the default cosine classifier).",
        "Sorting a type's column, largest first, gives its top genes. Below, the top genes of an",
        "`RMGEModel` trained with its defaults on the Moffitt et al. (2018) scRNA-seq reference",
        f"({info['n_reference']:,} cells) and MERFISH section ({info['n_spatial']:,} cells), "
        f"{info['n_genes']} shared genes, are",
        "compared with known marker genes of each class that the MERFISH panel measures.",
        "",
        f"**{n_hit} of {n_scored} classes ({fraction:.0%}) with known markers on the panel have at least one",
        "of them among their top 5 genes.** Known markers are in bold; the last column gives each",
        "marker's rank among the class's genes (1 = largest weight).",
        "",
        f"| class | top {top} genes (largest weight first) | known markers on the panel (rank) | marker in top 5 |",
        "|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        if row["markers"]:
            ranks = ", ".join(f"{g} ({row['marker_ranks'][g]})" for g in row["markers"])
            hit = "yes" if row["hit_top5"] else "no"
        else:
            ranks, hit = "— (reference-only class, not scored)", "—"
        lines.append(f"| {row['class']} | {_fmt_genes(row['top_genes'], row['hits'])} | {ranks} | {hit} |")
    lines += [
        "",
        "## Genes every type weighs up",
        "",
        f"Some genes sit in the top {top} of half the classes or more (number of classes in brackets): "
        f"{shared_text or 'none'}.",
        "A weight that all metagenes share raises every type's activity by the same amount, which leaves",
        "the predicted probabilities (a softmax of the activities) unchanged with the default cosine",
        "classifier, yet it pushes those genes up every type's list. Subtracting each gene's mean weight",
        "over the types (the *contrast*,",
        "`W.sub(W.mean(axis=1), axis=0)` with `W = model.get_metagenes()`) removes that shared part; its",
        f"top genes put a known marker in the top 5 for **{n_hit_c} of {n_scored} classes ({fraction_c:.0%})**:",
        "",
        "| class | top 5 genes by contrast | known markers on the panel (rank by contrast) |",
        "|---|---|---|",
    ]
    for _, row in table_c.iterrows():
        if row["markers"]:
            ranks = ", ".join(f"{g} ({row['marker_ranks'][g]})" for g in row["markers"])
            lines.append(f"| {row['class']} | {_fmt_genes(row['top_genes'][:5], row['hits'])} | {ranks} |")
    lines += [
        "",
        "Reference-only classes (Ambiguous, Unstable, Macrophage, Fibroblast) have no cells in the",
        "MERFISH section and are not scored; Ambiguous and Unstable name no cell type.",
        "",
        f"Markers and sources: {SOURCES} Classic markers absent from the panel (e.g. Slc32a1, Gja1, Mbp,",
        "Plp1, Mobp, Cldn5, C1qa, Ttr, Acta2) cannot appear.",
        "",
        "## How this page was made",
        "",
        "```bash",
        f"python benchmarks/bench_metagenes.py --seed {info['seed']} --top {top}",
        "```",
        "",
        "The script loads the task as the benchmark does (`benchmarks/tasks.py`, `load_moffitt`: coarse",
        "classes, shared genes, log-normalised MERFISH values turned back by `rmge.pp.prepare`), trains",
        f"`rmge.RMGEModel(adata)` with `model.train()` (seed {info['seed']}, one CPU thread; "
        f"{info['n_epochs']} epochs, {info['train_seconds']:.0f} s), and writes this page.",
        f"The same model labels the MERFISH cells with accuracy {scores['accuracy']:.3f} and macro-F1 "
        f"{scores['macro_f1']:.3f} on the shared classes. Versions: rmge {info['rmge']}, "
        f"scvi-tools {info['scvi']}, torch {info['torch']}.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "metagenes.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import scvi

    start = time.perf_counter()
    model, adata, task = train_moffitt(args.seed)
    train_seconds = time.perf_counter() - start
    metagenes = model.get_metagenes()
    table, fraction, n_scored = marker_table(metagenes, args.top)
    table_c, fraction_c, _ = marker_table(contrast(metagenes), args.top)
    scores = spatial_accuracy(model, adata, task)
    is_ref = (adata.obs["domain"] == "reference").to_numpy()
    info = {
        "seed": args.seed,
        "n_reference": int(is_ref.sum()),
        "n_spatial": int((~is_ref).sum()),
        "n_genes": int(adata.n_vars),
        "n_epochs": int(model.trainer.current_epoch),
        "train_seconds": train_seconds,
        "rmge": rmge.__version__,
        "scvi": scvi.__version__,
        "torch": torch.__version__,
    }
    write_page(args.out, table, fraction, n_scored, table_c, fraction_c, scores, info)
    for _, row in table.iterrows():
        print(f"{row['class']:>16}: {', '.join(row['top_genes'][:5])}  hits={row['hits']}")
    print(f"classes with a known marker in the top 5: {fraction:.3f} ({int(table['hit_top5'].sum())}/{n_scored})")
    print(f"same, ranking by contrast: {fraction_c:.3f} ({int(table_c['hit_top5'].sum())}/{n_scored})")
    print(f"accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}; trained in {train_seconds:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
