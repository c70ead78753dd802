"""Label-transfer methods compared by the benchmark.

Every method is a function ``fit_predict(reference, query, labels_key, **options)`` returning
``(labels, proba)``: one predicted label per query cell, and a cells x classes DataFrame of
probabilities (rows summing to 1) or ``None`` for methods without probabilities. ``reference.X``
holds counts; ``query.X`` holds what ``query.uns["value_kind"]`` says (counts or log-normalised
values). ``options`` may carry ``max_epochs`` (neural methods; ``None`` = the tool's default) and
``seed``. Heavy imports happen inside each method so that a run only loads what it uses.
"""

from __future__ import annotations

import importlib.metadata

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

TARGET_SUM = 1e4
BLOCK = 10_000
#: What the last method call ran (package and version, or which code path); read by the worker.
RUN_INFO: dict[str, str] = {}


class MethodUnavailable(RuntimeError):
    """The method cannot run here (a package is missing, or an API is not there yet)."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------- preprocessing
def value_kind(adata: ad.AnnData) -> str:
    """What ``adata.X`` holds: from ``uns["value_kind"]`` when the task says, else detected."""
    kind = adata.uns.get("value_kind")
    if kind is None:
        from rmge._validation import detect_value_kind

        kind = detect_value_kind(adata.X)
    return kind


def as_counts(adata: ad.AnnData) -> ad.AnnData:
    """A copy holding counts. Log-normalised values become ``round(expm1(X))``; normalised ``round(X)``.

    Rounding ``expm1`` of log-normalised values is the usual way to hand such data to count
    models (scVI, SCANVI); values below 0.5 become zeros.
    """
    out = ad.AnnData(sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    kind = value_kind(adata)
    if kind != "counts":
        if kind == "log_normalized":
            out.X.data = np.expm1(out.X.data)
        out.X.data = np.round(out.X.data)
        out.X.eliminate_zeros()
    out.uns["value_kind"] = "counts"
    return out


def log_normalized(adata: ad.AnnData) -> ad.AnnData:
    """A copy holding log-normalised values: ``log1p`` of counts scaled to 10,000 per cell.

    Data that are already log-normalised (the MERFISH query) are used as given: they were
    normalised by their authors, and a user would pass them as they are. (The ``+rescaled``
    task variants rescale them to 10,000 per cell instead; see ``tasks.py``.)
    """
    import scanpy as sc

    out = ad.AnnData(sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    if value_kind(adata) != "log_normalized":
        sc.pp.normalize_total(out, target_sum=TARGET_SUM)
        sc.pp.log1p(out)
    out.uns["value_kind"] = "log_normalized"
    return out


def _gene_stats(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and inverse standard deviation (0 for constant genes) of a sparse matrix."""
    X = sp.csr_matrix(X)
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel()
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    inv = np.divide(1.0, std, out=np.zeros_like(std), where=std > 1e-12)
    return mean, inv


def _blocks(X, size: int = BLOCK):
    for start in range(0, X.shape[0], size):
        block = X[start : start + size]
        yield start, (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float64)


def _labels_and_classes(reference: ad.AnnData, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    labels = reference.obs[labels_key].astype(str).to_numpy()
    return labels, np.unique(labels)


def _proba_frame(values: np.ndarray, classes, index) -> pd.DataFrame:
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    sums = values.sum(axis=1, keepdims=True)
    # a row of zeros (a method gave a cell no mass at all) becomes uniform
    values = np.where(sums > 0, values / np.where(sums > 0, sums, 1.0), 1.0 / values.shape[1])
    return pd.DataFrame(values, index=index, columns=[str(c) for c in classes])


def _argmax_labels(proba: pd.DataFrame) -> np.ndarray:
    return proba.columns.to_numpy()[proba.to_numpy().argmax(axis=1)].astype(object)


# ----------------------------------------------------------------------------- baselines
def centroid(reference, query, labels_key, **options):
    """Nearest centroid by Pearson correlation, after per-dataset gene standardisation.

    Both datasets are log-normalised; each gene is then z-scored *within its own dataset*, which
    removes per-gene capture differences between technologies. Class centroids are the class
    means of the standardised reference; each query cell gets the class of the centroid it
    correlates with best. No probabilities.
    """
    ref = log_normalized(reference).X
    qry = log_normalized(query).X
    labels, classes = _labels_and_classes(reference, labels_key)
    mu_r, inv_r = _gene_stats(ref)
    mu_q, inv_q = _gene_stats(qry)
    # class means of the raw log values via a sparse indicator matrix, then standardised
    codes = np.searchsorted(classes, labels)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(classes), len(codes)))
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    means = np.asarray((indicator @ ref).todense()) / counts[:, None]
    centroids = (means - mu_r) * inv_r
    centroids -= centroids.mean(axis=1, keepdims=True)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    pred = np.empty(qry.shape[0], dtype=object)
    for start, block in _blocks(qry):
        z = (block - mu_q) * inv_q
        z -= z.mean(axis=1, keepdims=True)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        pred[start : start + len(z)] = classes[(z @ centroids.T).argmax(axis=1)]
    return pred, None


def logreg(reference, query, labels_key, seed=0, **options):
    """Multinomial logistic regression (scikit-learn) on log-normalised reference, applied to the query."""
    from sklearn.linear_model import LogisticRegression

    ref = log_normalized(reference)
    qry = log_normalized(query)
    labels, _ = _labels_and_classes(reference, labels_key)
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(ref.X, labels)
    proba = _proba_frame(clf.predict_proba(qry.X), clf.classes_, query.obs_names)
    return _argmax_labels(proba), proba


def _celltypist_reimplementation(ref, qry, labels, seed, top_genes=300):
    """CellTypist's recipe without the package: z-score with reference statistics, clip at 10,
    SGD logistic regression (L2), and, with more than ``top_genes`` genes, refit on the union of
    each class's ``top_genes`` largest-|weight| genes."""
    from sklearn.linear_model import SGDClassifier

    mu, inv = _gene_stats(ref.X)

    def scale(X, genes):
        out = (X[:, genes] - mu[genes]) * inv[genes]
        return np.minimum(out, 10)

    all_genes = np.arange(ref.n_vars)
    # CellTypist also densifies the reference (StandardScaler with with_mean=True)
    Xr = ref.X.toarray().astype(np.float64)
    clf = SGDClassifier(loss="log_loss", alpha=1e-4, max_iter=1000, random_state=seed)
    clf.fit(scale(Xr, all_genes), labels)
    genes = all_genes
    if ref.n_vars > top_genes:
        genes = np.unique(np.argpartition(np.abs(clf.coef_), -top_genes, axis=1)[:, -top_genes:])
        clf = SGDClassifier(loss="log_loss", alpha=1e-4, max_iter=1000, random_state=seed)
        clf.fit(scale(Xr, genes), labels)
    out = np.empty((qry.n_obs, len(clf.classes_)))
    for start, block in _blocks(qry.X):
        out[start : start + len(block)] = clf.predict_proba(scale(block, genes))
    return out, clf.classes_


def celltypist_like(reference, query, labels_key, seed=0, **options):
    """CellTypist: SGD logistic regression (L2) on reference-standardised log-normalised data.

    Uses the ``celltypist`` package when installed (``celltypist.train(use_SGD=True,
    feature_selection=...)`` then ``celltypist.annotate``), else a re-implementation of the same
    recipe. Feature selection (top 300 genes per class) is used when there are more than 300
    genes, as CellTypist requires. CellTypist's one-vs-rest probabilities are normalised to sum
    to 1 per cell (what scikit-learn's ``predict_proba`` does for this model).
    """
    ref = log_normalized(reference)
    qry = log_normalized(query)
    labels, _ = _labels_and_classes(reference, labels_key)
    np.random.seed(seed)  # CellTypist draws from numpy's global generator
    try:
        import celltypist
    except ImportError:
        values, classes = _celltypist_reimplementation(ref, qry, labels, seed)
        RUN_INFO["impl"] = "re-implementation (celltypist not installed)"
    else:
        model = celltypist.train(
            ref, labels=labels, use_SGD=True, feature_selection=ref.n_vars > 300, top_genes=300, random_state=seed
        )
        result = celltypist.annotate(qry, model=model, majority_voting=False)
        values, classes = result.probability_matrix.to_numpy(), result.probability_matrix.columns
        RUN_INFO["impl"] = f"celltypist {_version('celltypist')}"
    proba = _proba_frame(values, classes, query.obs_names)
    return _argmax_labels(proba), proba


# ----------------------------------------------------------------------------- neural / mapping
UNLABELED = "__unlabeled__"


def _combined_counts(reference, query, labels_key):
    """Reference and query counts in one AnnData with ``obs['domain']``; query labels unknown."""
    ref = as_counts(reference)
    qry = as_counts(query)
    ref.obs = pd.DataFrame(
        {labels_key: ref.obs[labels_key].astype(str).to_numpy(), "domain": "reference"}, index=ref.obs_names
    )
    qry.obs = pd.DataFrame({labels_key: UNLABELED, "domain": "spatial"}, index=qry.obs_names)
    adata = ad.concat([ref, qry], index_unique="-", keys=["reference", "spatial"], label=None)
    adata.obs["domain"] = adata.obs["domain"].astype("category")
    return adata, np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())


def scanvi(reference, query, labels_key, seed=0, max_epochs=None, **options):
    """scvi-tools recipe: scVI on reference + query counts (batch = domain), then SCANVI.from_scvi_model.

    The query is unlabelled. Epochs are the scvi-tools defaults unless ``max_epochs`` is given. A
    log-normalised query is turned into counts with ``round(expm1(X))``.
    """
    try:
        import scvi
    except ImportError as err:
        raise MethodUnavailable("scvi-tools not installed") from err
    scvi.settings.seed = seed
    adata, q_idx = _combined_counts(reference, query, labels_key)
    scvi.model.SCVI.setup_anndata(adata, batch_key="domain", labels_key=labels_key)
    vae = scvi.model.SCVI(adata)
    vae.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED, labels_key=labels_key)
    model.train(
        max_epochs=None if max_epochs is None else max(2, max_epochs // 3), accelerator="cpu", enable_progress_bar=False
    )
    soft = model.predict(indices=q_idx, soft=True)
    soft = soft.drop(columns=[c for c in soft.columns if c == UNLABELED])
    proba = _proba_frame(soft.to_numpy(), soft.columns, query.obs_names)
    RUN_INFO["impl"] = f"scvi-tools {_version('scvi-tools')}"
    return _argmax_labels(proba), proba


def tangram(reference, query, labels_key, seed=0, max_epochs=None, **options):
    """Tangram (mode "cells"): map reference cells onto query cells, then project the labels.

    Both datasets are log-normalised; all shared genes are training genes. The projected class
    scores of each query cell are normalised to sum to 1.
    """
    try:
        import tangram as tg
    except ImportError as err:
        raise MethodUnavailable("tangram-sc not installed") from err
    ad_sc = log_normalized(reference)
    ad_sp = log_normalized(query)
    ad_sc.obs[labels_key] = reference.obs[labels_key].astype(str).to_numpy()
    tg.pp_adatas(ad_sc, ad_sp, genes=None)
    ad_map = tg.map_cells_to_space(
        ad_sc, ad_sp, mode="cells", device="cpu", num_epochs=max_epochs or 1000, random_state=seed, verbose=False
    )
    tg.project_cell_annotations(ad_map, ad_sp, annotation=labels_key)
    scores = ad_sp.obsm["tangram_ct_pred"]
    proba = _proba_frame(np.clip(scores.to_numpy(), 0, None), scores.columns, query.obs_names)
    RUN_INFO["impl"] = f"tangram-sc {_version('tangram-sc')}"
    return _argmax_labels(proba), proba


def _rmge(reference, query, labels_key, original, seed=0, max_epochs=None, counts=False, **options):
    """The documented user journey: ``prepare`` -> ``setup_anndata`` -> ``RMGEModel`` -> ``train`` -> ``predict``.

    The query is passed as it is (``prepare`` undoes ``log1p`` of log-normalised values itself).
    """
    import scvi

    import rmge
    from rmge._constants import DOMAIN_KEY, SPATIAL_DOMAIN

    if not hasattr(rmge.RMGEModel, "setup_anndata") or (original and not hasattr(rmge.RMGEModel, "ORIGINAL")):
        raise MethodUnavailable("rmge.RMGEModel is not implemented")
    scvi.settings.seed = seed
    adata = rmge.pp.prepare(reference, query, labels_key=labels_key)
    q_idx = np.flatnonzero((adata.obs[DOMAIN_KEY].astype(str) == SPATIAL_DOMAIN).to_numpy())
    rmge.RMGEModel.setup_anndata(adata, labels_key=labels_key, domain_key=DOMAIN_KEY)
    settings = dict(rmge.RMGEModel.ORIGINAL) if original else {"count_evidence": "auto"} if counts else {}
    model = rmge.RMGEModel(adata, **settings)
    model.train(**({} if max_epochs is None else {"max_epochs": max_epochs}))
    soft = model.predict(indices=q_idx, soft=True)
    # prepare() drops query cells without a single count over the used genes; as predict() does for such
    # cells of a new AnnData, they get model.empty_cell_probabilities() (the spatial composition weighted by
    # each type's chance of an empty cell) as probabilities, so that every method is scored on the same cells.
    obs = adata.obs.iloc[q_idx]
    names = obs["original_obs_name"] if "original_obs_name" in obs else obs.index
    soft = pd.DataFrame(np.asarray(soft), index=pd.Index(names.astype(str)), columns=soft.columns)
    soft = soft.reindex(query.obs_names.astype(str))
    missing = soft.isna().any(axis=1).to_numpy()
    if missing.any():
        empty = model.empty_cell_probabilities().reindex(soft.columns).to_numpy()
        soft.loc[missing] = np.tile(empty, (missing.sum(), 1))
    proba = _proba_frame(soft.to_numpy(), soft.columns, query.obs_names)
    labels = _argmax_labels(proba)
    RUN_INFO["impl"] = f"rmge {_version('rmge')}" + (" (ORIGINAL preset)" if original else "")
    if counts:
        state = "on" if model.module.has_count_evidence else "off (no counts on both sides)"
        RUN_INFO["impl"] += f"; count evidence {state}"
    if missing.any():
        RUN_INFO["impl"] += f"; {int(missing.sum())} query cells without counts: empty-cell probabilities"
    return labels, proba


def rmge(reference, query, labels_key, **options):
    """RMGE with the package defaults (``rmge.RMGEModel(adata)``)."""
    return _rmge(reference, query, labels_key, original=False, **options)


def rmge_counts(reference, query, labels_key, **options):
    """RMGE with count evidence where both sides hold counts (``RMGEModel(adata, count_evidence="auto")``)."""
    return _rmge(reference, query, labels_key, original=False, counts=True, **options)


def rmge_original(reference, query, labels_key, **options):
    """RMGE with the original method's settings (``rmge.RMGEModel(adata, **RMGEModel.ORIGINAL)``)."""
    return _rmge(reference, query, labels_key, original=True, **options)


#: Modules each method imports, loaded before its timer starts (missing ones are skipped here;
#: the method itself reports them).
IMPORTS = {
    "rmge": ("scanpy", "rmge", "scvi"),
    "rmge_counts": ("scanpy", "rmge", "scvi"),
    "rmge_original": ("scanpy", "rmge", "scvi"),
    "centroid": ("scanpy",),
    "logreg": ("scanpy", "sklearn.linear_model"),
    "celltypist_like": ("scanpy", "sklearn.linear_model", "celltypist"),
    "scanvi": ("scanpy", "scvi"),
    "tangram": ("scanpy", "tangram"),
}


def preload(method: str) -> None:
    """Import the modules ``method`` uses, so that timing the method leaves import time out."""
    import importlib

    for name in IMPORTS.get(method, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


METHODS = {
    "rmge": rmge,
    "rmge_counts": rmge_counts,
    "rmge_original": rmge_original,
    "centroid": centroid,
    "logreg": logreg,
    "celltypist_like": celltypist_like,
    "scanvi": scanvi,
    "tangram": tangram,
}
FAST_METHODS = ("centroid", "logreg", "celltypist_like")
