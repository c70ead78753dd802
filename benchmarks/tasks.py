"""Label-transfer tasks of the benchmark.

Each task returns a :class:`Task`: a reference AnnData (counts in ``X``, labels in
``obs[labels_key]``), a query AnnData with the same genes in the same order, the true label of
each query cell (``None`` where a cell is not scored) and a short note on what kind of transfer
it is. ``query.uns["value_kind"]`` says what the query's ``X`` holds (``"counts"`` or
``"log_normalized"``), so methods need not guess.

Task ids: ``moffitt``, ``granja``, ``sparsity@F`` (F = fraction of the query's counts kept),
``synthetic`` and ``synthetic@F`` (tiny, made up, for the smoke run). Variants of ``moffitt``:
``moffitt+shared`` (train on shared classes only), ``moffitt+rescaled`` (MERFISH values rescaled
to 10,000 per cell), ``moffitt+shared+rescaled``. Variant of ``granja``: ``granja+archr`` (gene activity by ArchR's gene
model, :data:`ARCHR_GENE_MODEL`, instead of ``rmge.pp.gene_activity``'s defaults: gene body + 2 kb).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

DATA_DIR = Path(os.environ.get("RMGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CACHE_DIR = Path(os.environ.get("RMGE_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
LABELS_KEY = "cell_type"
SPARSITY_FRACTIONS = (1.0, 0.2, 0.05, 0.02, 0.01)
SMOKE_FRACTIONS = (1.0, 0.1)

# Moffitt et al. 2018: fine scRNA-seq and MERFISH classes -> shared coarse classes.
# Reference classes left out of the map (Ambiguous, Unstable, Macrophage, Fibroblast) stay in
# training under their own names; the MERFISH section has no cells of them.
MOFFITT_REFERENCE_MAP = {
    "Astrocytes": "Astrocyte",
    "Endothelial": "Endothelial",
    "Excitatory": "Excitatory",
    "Inhibitory": "Inhibitory",
    "Microglia": "Microglia",
    "Mural": "Mural/Pericyte",
    "Ependymal": "Ependymal",
    "Immature oligodendrocyte": "OD immature",
    "Newly formed oligodendrocyte": "OD immature",
    "Mature oligodendrocyte": "OD mature",
}
MOFFITT_QUERY_MAP = {
    "Astrocyte": "Astrocyte",
    "Endothelial 1": "Endothelial",
    "Endothelial 2": "Endothelial",
    "Endothelial 3": "Endothelial",
    "Excitatory": "Excitatory",
    "Inhibitory": "Inhibitory",
    "Microglia": "Microglia",
    "Pericytes": "Mural/Pericyte",
    "Ependymal": "Ependymal",
    "OD Immature 1": "OD immature",
    "OD Immature 2": "OD immature",
    "OD Mature 1": "OD mature",
    "OD Mature 2": "OD mature",
    "OD Mature 3": "OD mature",
    "OD Mature 4": "OD mature",
}
# Classes that name no cell type: kept for training, never scored.
MOFFITT_UNSCORED = ("Ambiguous", "Unstable")

# Granja et al. 2019 bone-marrow/PBMC scATAC clusters -> coarse classes. Progenitors (HSC, CMP/LMPP,
# CLP, GMP) and pre-B cells stay in training as reference-only classes. This file holds no
# dendritic-cell cluster, so the query's dendritic cells cannot be scored.
GRANJA_REFERENCE_MAP = {
    "17_B": "B",
    "16_Pre.B": "Pre-B",
    "20_CD4.N1": "CD4 T",
    "21_CD4.N2": "CD4 T",
    "22_CD4.M": "CD4 T",
    "19_CD8.N": "CD8 T",
    "23_CD8.EM": "CD8 T",
    "24_CD8.CM": "CD8 T",
    "25_NK": "NK",
    "11_CD14.Mono.1": "Monocyte",
    "12_CD14.Mono.2": "Monocyte",
    "01_HSC": "Progenitor",
    "05_CMP.LMPP": "Progenitor",
    "06_CLP.1": "Progenitor",
    "15_CLP.2": "Progenitor",
    "07_GMP": "Progenitor",
}


# pbmc68k_reduced bulk labels -> coarse classes. CD34+ cells are left unscored (the coarse
# comparison is on mature types); Dendritic has no reference class here.
def _granja_query_map() -> dict[str, str]:
    # imported here, not at the top: importing rmge loads scvi and torch (~8 s, ~300 MiB), which
    # runs of the other tasks and of the light methods should not pay for
    from rmge.datasets import PBMC_CELL_TYPES

    return {k: v for k, v in PBMC_CELL_TYPES.items() if k != "CD34+"}


class TaskUnavailable(RuntimeError):
    """A task cannot be built here (missing data or a missing function); the message says why."""


@dataclass
class Task:
    """One label-transfer problem."""

    name: str
    reference: ad.AnnData
    query: ad.AnnData
    truth: np.ndarray
    kind: str
    labels_key: str = LABELS_KEY
    depth_fraction: float | None = None
    info: dict = field(default_factory=dict)


def _data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.exists():
        raise TaskUnavailable(f"data file {path} not found (set RMGE_DATA_DIR to the folder holding it)")
    return path


def _csr(X) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float32)


def _shared_genes(reference: ad.AnnData, query: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Keep the genes both datasets measure, matched case-insensitively, named as in the reference."""
    ref_upper = pd.Index(reference.var_names.str.upper())
    q_upper = pd.Index(query.var_names.str.upper())
    if ref_upper.has_duplicates or q_upper.has_duplicates:
        raise ValueError("gene names must be unique ignoring case within each dataset")
    shared = ref_upper.intersection(q_upper, sort=False)
    if len(shared) == 0:
        raise ValueError("the reference and the query share no gene name")
    reference = reference[:, ref_upper.get_indexer(shared)].copy()
    query = query[:, q_upper.get_indexer(shared)].copy()
    query.var_names = reference.var_names
    return reference, query


def _drop_empty_reference_cells(reference: ad.AnnData) -> ad.AnnData:
    # Cells without a single count over the shared genes carry no signal for any method, and some
    # tools (CellTypist) reject them; they are dropped from the reference only.
    depth = np.asarray(reference.X.sum(axis=1)).ravel()
    return reference[depth > 0].copy()


def _truth(labels: pd.Series, mapping: dict | None = None) -> np.ndarray:
    values = labels.astype(object)
    if mapping is not None:
        values = values.map(mapping)
    out = values.to_numpy(dtype=object)
    out[pd.isna(out)] = None
    return out


def thin_counts(X, fraction: float, seed: int = 0) -> sp.csr_matrix:
    """Binomially thin a count matrix: each count is kept with probability ``fraction``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    X = _csr(X).copy()
    if fraction < 1:
        rng = np.random.default_rng(seed)
        X.data = rng.binomial(np.round(X.data).astype(np.int64), fraction).astype(np.float32)
        X.eliminate_zeros()
    return X


def load_moffitt(shared_only: bool = False, rescaled: bool = False) -> Task:
    """Moffitt 2018 hypothalamus: scRNA-seq counts -> MERFISH (log-normalised).

    ``shared_only`` trains on the 9 shared classes only (reference-only classes dropped);
    ``rescaled`` rescales the MERFISH values to 10,000 per cell (``log1p(normalize_total(expm1(X)))``)
    instead of using the published normalisation.
    """
    reference = ad.read_h5ad(_data_file("moffitt2018_hypothalamus_scrna_reference.h5ad"))
    query = ad.read_h5ad(_data_file("moffitt2018_hypothalamus_merfish_query.h5ad"))
    reference = ad.AnnData(_csr(reference.X), obs=reference.obs[["cell_type"]].copy(), var=reference.var[[]])
    query = ad.AnnData(_csr(query.X), obs=query.obs[["Cell_class"]].copy(), var=query.var[[]])
    reference, query = _shared_genes(reference, query)
    reference = _drop_empty_reference_cells(reference)
    fine = reference.obs["cell_type"].astype(str)
    reference.obs[LABELS_KEY] = fine.map(MOFFITT_REFERENCE_MAP).fillna(fine).astype("category")
    if shared_only:
        reference = reference[fine.isin(list(MOFFITT_REFERENCE_MAP)).to_numpy()].copy()
        reference.obs[LABELS_KEY] = reference.obs[LABELS_KEY].cat.remove_unused_categories()
    truth = _truth(query.obs["Cell_class"], MOFFITT_QUERY_MAP)
    query.obs = query.obs[[]]
    if rescaled:
        import scanpy as sc

        query.X.data = np.expm1(query.X.data)
        sc.pp.normalize_total(query, target_sum=1e4)
        sc.pp.log1p(query)
    query.uns["value_kind"] = "log_normalized"
    reference.uns["value_kind"] = "counts"
    name = "moffitt" + ("+shared" if shared_only else "") + ("+rescaled" if rescaled else "")
    kind = "scRNA-seq counts -> MERFISH (log-normalised values), mouse hypothalamus, 9 shared coarse classes"
    if shared_only:
        kind += "; trained on the shared classes only"
    if rescaled:
        kind += "; MERFISH values rescaled to 10,000 per cell"
    return Task(name, reference, query, truth, kind=kind)


def _stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    first, second = train_test_split(idx, test_size=0.5, stratify=labels, random_state=seed)
    return np.sort(first), np.sort(second)


def load_sparsity(fraction: float) -> Task:
    """Moffitt scRNA-seq split in stratified halves; the query half thinned to ``fraction`` of its counts."""
    reference = ad.read_h5ad(_data_file("moffitt2018_hypothalamus_scrna_reference.h5ad"))
    reference = ad.AnnData(_csr(reference.X), obs=reference.obs[["cell_type"]].copy(), var=reference.var[[]])
    reference = _drop_empty_reference_cells(reference)
    fine = reference.obs["cell_type"].astype(str)
    reference.obs[LABELS_KEY] = fine.map(MOFFITT_REFERENCE_MAP).fillna(fine).astype("category")
    ref_idx, q_idx = _stratified_halves(fine.to_numpy())
    query = reference[q_idx].copy()
    reference = reference[ref_idx].copy()
    query.X = thin_counts(query.X, fraction, seed=1)
    truth = _truth(query.obs[LABELS_KEY])
    truth[np.isin(truth.astype(str), MOFFITT_UNSCORED)] = None
    query.obs = query.obs[[]]
    query.uns["value_kind"] = "counts"
    reference.uns["value_kind"] = "counts"
    return Task(
        f"sparsity@{fraction:g}",
        reference,
        query,
        truth,
        kind=f"Moffitt scRNA-seq, half -> other half thinned to {fraction:.0%} of its counts",
        depth_fraction=fraction,
    )


# ArchR's gene model: peaks within 100 kb of the gene body, weighted exp(-d / 5 kb) + exp(-1) by their
# distance d to the TSS. It reaches far more genes than gene body + 2 kb when the peaks are few.
ARCHR_GENE_MODEL = {"upstream": 100_000, "downstream": 100_000, "distance_weight": "exponential"}


def _gene_activity_source_hash() -> str:
    import rmge.pp._gene_activity as module

    return hashlib.sha1(Path(module.__file__).read_bytes()).hexdigest()[:12]


def _granja_gene_activity(archr: bool = False) -> ad.AnnData:
    """Gene activity of the Granja peaks, cached on disk (keyed on the gene-activity source and model)."""
    peaks_path = _data_file("granja2019_bonemarrow_atac_peaks.h5ad")
    gtf_path = _data_file("gencode_hg19_genes.gtf.gz")
    import rmge

    suffix = "_archr" if archr else ""
    cache = CACHE_DIR / f"granja_gene_activity_{_gene_activity_source_hash()}{suffix}.h5ad"
    if cache.exists():
        return ad.read_h5ad(cache)
    atac = ad.read_h5ad(peaks_path)
    try:
        activity = rmge.pp.gene_activity(atac, str(gtf_path), **(ARCHR_GENE_MODEL if archr else {}))
    except NotImplementedError as err:
        raise TaskUnavailable("rmge.pp.gene_activity is not implemented yet") from err
    if activity is None:  # a function that writes into its input
        raise TaskUnavailable("rmge.pp.gene_activity returned None; expected a cells x genes AnnData")
    activity = ad.AnnData(_csr(activity.X), obs=atac.obs[["BioClassification"]].copy(), var=activity.var[[]])
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.h5ad")
    activity.write_h5ad(tmp)
    os.replace(tmp, cache)
    return activity


def pbmc_counts() -> ad.AnnData:
    """``scanpy.datasets.pbmc68k_reduced()`` with counts rebuilt from its ``raw``.

    ``raw.X`` is ``log1p`` of counts scaled to 10,000 per cell; counts are
    ``round(expm1(raw.X) * n_counts / 1e4)``.
    """
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    X = _csr(pbmc.raw.X)
    X.data = np.expm1(X.data)
    X = sp.diags(pbmc.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4) @ X
    X = _csr(X)
    X.data = np.round(X.data)
    X.eliminate_zeros()
    return ad.AnnData(X, obs=pbmc.obs[["bulk_labels"]].copy(), var=pd.DataFrame(index=pbmc.raw.var_names))


def load_granja(archr: bool = False) -> Task:
    """Granja 2019 snATAC gene activity -> PBMC scRNA-seq (pbmc68k_reduced).

    ``archr=True``: gene activity by ArchR's gene model (:data:`ARCHR_GENE_MODEL`).
    """
    reference = _granja_gene_activity(archr)
    # gene names that differ only by case (a few GENCODE records) cannot be matched to the query's
    upper = pd.Index(reference.var_names.str.upper())
    reference = reference[:, ~upper.duplicated(keep=False)]
    query = pbmc_counts()
    reference, query = _shared_genes(reference, query)
    reference = _drop_empty_reference_cells(reference)
    reference.obs[LABELS_KEY] = reference.obs["BioClassification"].astype(str).map(GRANJA_REFERENCE_MAP)
    reference = reference[reference.obs[LABELS_KEY].notna()].copy()
    reference.obs[LABELS_KEY] = reference.obs[LABELS_KEY].astype("category")
    truth = _truth(query.obs["bulk_labels"], _granja_query_map())
    query.obs = query.obs[[]]
    query.uns["value_kind"] = "counts"
    reference.uns["value_kind"] = "counts"
    kind = "snATAC-seq gene activity (bone marrow) -> PBMC scRNA-seq counts, 5 shared coarse classes"
    if archr:
        kind += "; gene activity by ArchR's gene model (±100 kb, exponential distance weights)"
    else:
        kind += "; gene activity: gene body + 2 kb upstream (rmge.pp.gene_activity's defaults)"
    return Task("granja+archr" if archr else "granja", reference, query, truth, kind=kind)


def make_synthetic(fraction: float = 1.0, seed: int = 0) -> Task:
    """A tiny made-up task: 4 types, 60 genes; the query is shallower and has per-gene capture bias."""
    rng = np.random.default_rng(seed)
    n_types, n_genes, n_ref, n_query = 4, 60, 240, 240
    types = np.array([f"type{k}" for k in range(n_types)])
    base = rng.gamma(2.0, 1.0, size=n_genes)
    profiles = np.tile(base, (n_types, 1))
    for k in range(n_types):  # each type over-expresses its own block of 10 genes
        profiles[k, k * 10 : (k + 1) * 10] *= 6
    profiles /= profiles.sum(axis=1, keepdims=True)

    def sample(n, depth, capture):
        labels = types[rng.integers(0, n_types, size=n)]
        rate = profiles[np.searchsorted(types, labels)] * capture
        rate /= rate.sum(axis=1, keepdims=True)
        lib = rng.lognormal(np.log(depth), 0.3, size=(n, 1))
        return _csr(rng.poisson(rate * lib)), labels

    Xr, yr = sample(n_ref, 400, np.ones(n_genes))
    Xq, yq = sample(n_query, 120, rng.lognormal(0.0, 0.4, size=n_genes))
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    reference = ad.AnnData(
        Xr, obs=pd.DataFrame({LABELS_KEY: pd.Categorical(yr)}, index=[f"r{i}" for i in range(n_ref)])
    )
    reference.var = var.copy()
    query = ad.AnnData(
        thin_counts(Xq, fraction, seed=seed + 1), obs=pd.DataFrame(index=[f"q{i}" for i in range(n_query)])
    )
    query.var = var.copy()
    reference = _drop_empty_reference_cells(reference)
    query.uns["value_kind"] = "counts"
    reference.uns["value_kind"] = "counts"
    name = "synthetic" if fraction == 1 else f"synthetic@{fraction:g}"
    return Task(name, reference, query, yq.astype(object), kind="synthetic, 4 types, 60 genes", depth_fraction=fraction)


def expand(names: list[str], smoke: bool = False) -> list[str]:
    """Turn task names from the command line into task ids (``sparsity`` -> one id per fraction)."""
    out = []
    for name in names:
        if name == "sparsity":
            out += [f"sparsity@{f:g}" for f in SPARSITY_FRACTIONS]
        elif name == "synthetic" and smoke:
            out += ["synthetic"] + [f"synthetic@{f:g}" for f in SMOKE_FRACTIONS if f != 1]
        else:
            out.append(name)
    for task_id in out:
        _parse(task_id)
    return out


def _parse(task_id: str) -> tuple[str, float, set[str]]:
    """Split a task id into family, depth fraction and variant flags (``moffitt+shared+rescaled``)."""
    head, *flags = task_id.split("+")
    family, _, frac = head.partition("@")
    if family not in ("moffitt", "granja", "sparsity", "synthetic"):
        raise ValueError(f"unknown task {task_id!r}; choose from moffitt, granja, sparsity, synthetic")
    allowed = {"moffitt": {"shared", "rescaled"}, "granja": {"archr"}}.get(family, set())
    unknown = set(flags) - allowed
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(sorted(unknown))} of task {family!r}")
    try:
        fraction = float(frac) if frac else 1.0
    except ValueError:
        raise ValueError(f"bad depth fraction in task id {task_id!r}") from None
    return family, fraction, set(flags)


def load_task(task_id: str) -> Task:
    """Build the task with the given id (see the module docstring)."""
    family, fraction, flags = _parse(task_id)
    if family == "moffitt":
        return load_moffitt(shared_only="shared" in flags, rescaled="rescaled" in flags)
    if family == "granja":
        return load_granja(archr="archr" in flags)
    if family == "sparsity":
        return load_sparsity(fraction)
    if family == "synthetic":
        return make_synthetic(fraction)
    raise ValueError(f"unknown task {task_id!r}")
