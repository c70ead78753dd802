"""How well reference and spatial cells mix in the metagene space, and how well cell types stay apart (scib-metrics)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from rmge._constants import DOMAIN_KEY, REFERENCE_DOMAIN, UNKNOWN_LABEL

if TYPE_CHECKING:  # pragma: no cover
    from rmge.model import RMGEModel

#: Neighbourhood sizes of scib-metrics' ``Benchmarker``: 15 (graph connectivity), 50 (kBET), 90 (LISI).
_NEIGHBORS = (15, 50, 90)
_MIN_CELLS = 10

_COLUMNS = ["metric", "group", "cells", "labels", "value", "n_cells"]


def _import_scib_metrics():
    try:
        import jax  # noqa: F401
        import scib_metrics
    except ImportError as err:
        raise ImportError(
            "rmge.tl.alignment_metrics needs the optional packages scib-metrics and jax "
            f'({err.name or err} is missing). Install them with: pip install "rmge[jax]"'
        ) from err
    return scib_metrics


def _neighbors(scib_metrics, X: np.ndarray, computer: Callable | None, seed: int, n_jobs: int) -> dict[int, Any]:
    """Neighbours (by default pynndescent, as scib-metrics' ``Benchmarker``), subset to 15, 50 and 90."""
    k_max = min(max(_NEIGHBORS), X.shape[0] - 1)
    if computer is None:
        full = scib_metrics.nearest_neighbors.pynndescent(X, n_neighbors=k_max, random_state=seed, n_jobs=n_jobs)
    else:
        full = computer(X, k_max)
        if not isinstance(full, scib_metrics.nearest_neighbors.NeighborsResults) or full.n_neighbors < k_max:
            raise TypeError(
                f"`neighbor_computer` must return a scib_metrics.nearest_neighbors.NeighborsResults with {k_max} "
                "neighbours per cell."
            )
    return {k: full.subset_neighbors(min(k, k_max)) for k in _NEIGHBORS}


def _safe(fn, *args, **kwargs) -> float:
    """A metric's value, NaN where it is undefined for these cells (e.g. a single label)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(fn(*args, **kwargs))
    except ValueError:
        return float("nan")


def _bio_rows(scib_metrics, X: np.ndarray, labels: np.ndarray, cells: str, label_name: str, nn_args: tuple):
    """Bio-conservation metrics of one set of cells against their labels."""
    n = len(labels)
    if n < _MIN_CELLS or len(np.unique(labels)) < 2:
        values = dict.fromkeys(("silhouette_label", "clisi", "nmi_kmeans", "ari_kmeans"), float("nan"))
    else:
        nn = _neighbors(scib_metrics, X, *nn_args)
        cluster = scib_metrics.nmi_ari_cluster_labels_kmeans(X, labels)
        values = {
            "silhouette_label": _safe(scib_metrics.silhouette_label, X, labels),
            "clisi": _safe(scib_metrics.clisi_knn, nn[90], labels),
            "nmi_kmeans": float(cluster["nmi"]),
            "ari_kmeans": float(cluster["ari"]),
        }
    return [
        {"metric": k, "group": "bio_conservation", "cells": cells, "labels": label_name, "value": v, "n_cells": n}
        for k, v in values.items()
    ]


def _sample(is_ref: np.ndarray, n_cells: int | None, balance_domains: bool, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of the sampled cells: equal numbers per domain, or proportional to the domains' sizes."""
    ref, spa = np.flatnonzero(is_ref), np.flatnonzero(~is_ref)
    if balance_domains:
        per = min(len(ref), len(spa)) if n_cells is None else min(n_cells // 2, len(ref), len(spa))
        n_ref = n_spa = per
    elif n_cells is None or n_cells >= len(is_ref):
        n_ref, n_spa = len(ref), len(spa)
    else:
        n_ref = round(n_cells * len(ref) / len(is_ref))
        n_ref = min(max(n_ref, min(_MIN_CELLS, len(ref))), len(ref))
        n_spa = min(n_cells - n_ref, len(spa))
    take = np.concatenate([rng.choice(ref, n_ref, replace=False), rng.choice(spa, n_spa, replace=False)])
    return np.sort(take)


def _from_model(model: RMGEModel, labels_key, domain_key, reference_domain):
    args = model.adata_manager.registry["setup_args"]
    adata = model.adata
    labels_key = labels_key or args["labels_key"]
    domain_key = domain_key or args["domain_key"]
    reference_domain = reference_domain if reference_domain is not None else args["reference_domain"]
    return adata, labels_key, domain_key, reference_domain


def alignment_metrics(
    adata_or_model: AnnData | RMGEModel,
    *,
    use_rep: str = "X_rmge",
    labels_key: str | None = None,
    domain_key: str | None = None,
    reference_domain: str | None = None,
    truth_key: str | None = None,
    prediction_key: str = "rmge_prediction",
    n_cells: int | None = 20_000,
    balance_domains: bool = True,
    seed: int = 0,
    neighbor_computer: Callable[[np.ndarray, int], Any] | None = None,
    n_jobs: int = 1,
) -> pd.DataFrame:
    """Score the mixing of reference and spatial cells and the separation of cell types in a latent space.

    Computes scib-metrics (Luecken et al., 2022) on RMGE's metagene space
    (:meth:`RMGEModel.get_latent_representation <rmge.RMGEModel.get_latent_representation>`),
    treating the domain (reference / spatial) as the batch. Neighbours are found with pynndescent
    (:func:`scib_metrics.nearest_neighbors.pynndescent`, 90 neighbours, subset to 15 and 50) as
    scib-metrics' ``Benchmarker`` does. All values lie in [0, 1] and higher is better.

    Batch mixing (``group="batch_mixing"``, ``cells="all"``), on the sampled cells of both domains:

    - ``ilisi``: scaled median integration LISI (:func:`scib_metrics.ilisi_knn`, 90 neighbours):
      0 when each cell's neighbours come from its own domain, 1 when the two domains are evenly mixed
      (with ``balance_domains=True``; unequal domain sizes lower the best reachable value);
    - ``kbet_per_label``: kBET acceptance rate within each cell type, averaged over types
      (:func:`scib_metrics.kbet_per_label`, 50 neighbours): the share of cells whose neighbourhood's
      domain composition is compatible with the type's overall composition;
    - ``silhouette_batch``: 1 − ``|silhouette|`` of the domains within each cell type, averaged over types
      (:func:`scib_metrics.silhouette_batch`): 1 when the domains overlap within every type;
    - ``graph_connectivity``: for each cell type, the share of its cells in the largest connected
      component of its 15-neighbour graph, averaged over types (:func:`scib_metrics.graph_connectivity`).

    These four use each cell's type: the reference label for reference cells and the model's
    prediction for spatial cells (types present in one domain only are left out of kBET and the
    batch silhouette).

    Bio conservation (``group="bio_conservation"``), on the reference cells with their labels
    (``cells="reference"``) and, when ``truth_key`` is given, on the spatial cells with their known
    labels (``cells="spatial"``); each set has its own neighbour graph:

    - ``silhouette_label``: rescaled silhouette of the cell types, (ASW + 1) / 2
      (:func:`scib_metrics.silhouette_label`);
    - ``clisi``: scaled median cell-type LISI (:func:`scib_metrics.clisi_knn`): 1 when each cell's
      neighbours share its type;
    - ``nmi_kmeans``, ``ari_kmeans``: normalised mutual information and adjusted Rand index of
      k-means clusters (k = number of types) against the labels
      (:func:`scib_metrics.nmi_ari_cluster_labels_kmeans`).

    A metric that is undefined for the cells at hand (e.g. a single type) is ``NaN``. Equal inputs
    and seeds give equal values, except for ``kbet_per_label``, which varies by a few hundredths
    between calls: scib-metrics' diffusion map behind it starts ARPACK from a random vector.

    Parameters
    ----------
    adata_or_model
        A trained :class:`rmge.RMGEModel` (its set-up AnnData and latent space are used), or an
        AnnData holding the latent space in ``obsm[use_rep]`` (e.g. written by :func:`rmge.tl.add_results`).
    use_rep
        With an AnnData: key of ``obsm`` holding the latent space.
    labels_key
        Column of reference cell types. ``None``: the model's ``labels_key``, or for an AnnData
        ``uns['rmge']['labels_key']`` (written by :func:`rmge.pp.prepare` and :func:`rmge.tl.add_results`).
    domain_key, reference_domain
        Column telling the domains and its value for reference cells; ``None`` takes them like
        ``labels_key`` (defaults ``"domain"`` and ``"reference"``).
    truth_key
        Column of known labels of the spatial cells (e.g. ``"cell_type_spatial"`` from
        :func:`rmge.pp.prepare`); adds the bio-conservation metrics of the spatial cells. Cells with a
        missing value are left out of them.
    prediction_key
        With an AnnData: column of predicted types of the spatial cells (:func:`rmge.tl.add_results`
        writes ``"rmge_prediction"``). Spatial cells without a prediction or predicted ``"Unknown"``
        are not sampled. With a model, :meth:`RMGEModel.predict <rmge.RMGEModel.predict>` is used.
    n_cells
        Number of cells to sample (seeded), so that the metrics stay fast on large data; ``None``
        takes all cells. The metrics' cost grows with the square of the sample size (silhouettes).
    balance_domains
        Sample as many spatial as reference cells (``n_cells // 2`` each, or all of the smaller
        domain), so that the iLISI of two perfectly mixed domains is 1; ``False`` samples each domain
        in proportion to its size.
    seed
        Seed of the sampling and of pynndescent (scib-metrics' k-means has its own fixed seed).
    neighbor_computer
        Function ``(X, n_neighbors) -> scib_metrics.nearest_neighbors.NeighborsResults`` finding
        each cell's neighbours (itself included), as in scib-metrics' ``Benchmarker.prepare``; ``None``
        uses :func:`scib_metrics.nearest_neighbors.pynndescent`. For instance
        :func:`scib_metrics.nearest_neighbors.jax_approx_min_k` (exact on CPU and GPU) avoids
        pynndescent's one-off compilation, which takes about a minute per Python process.
    n_jobs
        Threads of the pynndescent neighbour search.

    Returns
    -------
    Tidy :class:`~pandas.DataFrame`, one row per metric and set of cells, with columns ``metric``,
    ``group`` (``"batch_mixing"`` or ``"bio_conservation"``), ``cells`` (``"all"``, ``"reference"``,
    ``"spatial"``), ``labels`` (the labels used: ``"reference+predicted"``, ``"reference"``,
    ``"truth"``), ``value`` and ``n_cells`` (cells it was computed on).

    Examples
    --------
    >>> scores = rmge.tl.alignment_metrics(model, truth_key="cell_type_spatial")
    >>> scores.pivot_table(index="metric", columns="cells", values="value")
    """
    from rmge.model import RMGEModel

    scib_metrics = _import_scib_metrics()
    if n_cells is not None and n_cells < 2 * _MIN_CELLS:
        raise ValueError(f"`n_cells` must be at least {2 * _MIN_CELLS} (or None for all cells), got {n_cells}.")

    model = adata_or_model if isinstance(adata_or_model, RMGEModel) else None
    if model is not None:
        model._check_if_trained(warn=False)
        adata, labels_key, domain_key, reference_domain = _from_model(model, labels_key, domain_key, reference_domain)
    elif isinstance(adata_or_model, AnnData):
        adata = adata_or_model
        info = adata.uns.get("rmge", {})
        info = info if isinstance(info, Mapping) else {}
        labels_key = labels_key or info.get("labels_key")
        domain_key = domain_key or info.get("domain_key", DOMAIN_KEY)
        if reference_domain is None:
            reference_domain = info.get("reference_domain", REFERENCE_DOMAIN)
        if use_rep not in adata.obsm:
            raise KeyError(
                f"adata.obsm has no latent space {use_rep!r} (keys: {list(adata.obsm.keys())}). Write RMGE's with "
                "rmge.tl.add_results(model, adata), pass the model itself, or name another embedding with `use_rep`."
            )
        if labels_key is None:
            raise ValueError(
                "The column of reference cell types is unknown: pass `labels_key` (adata.uns['rmge'] does not name it)."
            )
    else:
        kind = type(adata_or_model).__name__
        raise TypeError(f"`adata_or_model` must be an rmge.RMGEModel or an AnnData, got {kind}.")

    obs = adata.obs
    for what, key in (("domain", domain_key), ("label", labels_key), ("truth", truth_key)):
        if key is not None and key not in obs:
            raise KeyError(f"The {what} column {key!r} is not in adata.obs (columns: {list(obs.columns)}).")
    is_ref = (obs[domain_key].astype(str) == str(reference_domain)).to_numpy()

    eligible = np.ones(adata.n_obs, dtype=bool)
    if model is None:
        if prediction_key not in obs:
            raise KeyError(
                f"adata.obs has no predictions {prediction_key!r}, which give the spatial cells' types. "
                "Write them with rmge.tl.add_results(model, adata), or pass the model itself."
            )
        pred_all = obs[prediction_key].astype(object)
        eligible = is_ref | (pred_all.notna() & (pred_all.astype(str) != UNKNOWN_LABEL)).to_numpy()
        n_left_out = int((~eligible).sum())
        if n_left_out:
            warnings.warn(
                f"{n_left_out} spatial cell(s) have no prediction or are predicted {UNKNOWN_LABEL!r} in "
                f"adata.obs[{prediction_key!r}]; they are not sampled.",
                UserWarning,
                stacklevel=2,
            )
    ref_labels = obs[labels_key]
    if ref_labels[is_ref].isna().any():
        raise ValueError(f"Some reference cells have no label in adata.obs[{labels_key!r}].")
    n_ref, n_spa = int(is_ref.sum()), int((~is_ref & eligible).sum())
    if n_ref < _MIN_CELLS or n_spa < _MIN_CELLS:
        raise ValueError(
            f"Scoring the alignment needs at least {_MIN_CELLS} reference and {_MIN_CELLS} spatial cells; "
            f"adata has {n_ref} reference cells (adata.obs[{domain_key!r}] == {reference_domain!r}) and {n_spa} "
            "usable spatial cells. Check `domain_key` and `reference_domain` (values of the domain column: "
            f"{list(pd.unique(obs[domain_key].astype(str)))[:10]})."
        )

    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(eligible)
    sample = pool[_sample(is_ref[pool], n_cells, balance_domains, rng)]
    s_ref = is_ref[sample]

    if model is not None:
        X = model.get_latent_representation(indices=sample)
        predicted = np.asarray(model.predict(indices=sample[~s_ref]), dtype=object)
    else:
        rep = adata.obsm[use_rep]
        rep = rep.to_numpy() if isinstance(rep, pd.DataFrame) else rep
        X = np.asarray(rep[sample].toarray() if hasattr(rep, "toarray") else rep[sample])
        predicted = pred_all.to_numpy()[sample[~s_ref]]
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or not np.all(np.isfinite(X)):
        raise ValueError(f"The latent space of the sampled cells must be a finite 2-D matrix (got shape {X.shape}).")

    domain = np.where(s_ref, "reference", "spatial").astype(object)
    types = np.empty(len(sample), dtype=object)
    types[s_ref] = ref_labels.astype(str).to_numpy()[sample[s_ref]]
    types[~s_ref] = np.asarray(predicted).astype(str)
    types = types.astype(str)

    nn_args = (neighbor_computer, seed, n_jobs)
    nn = _neighbors(scib_metrics, X, *nn_args)
    mixing = {
        "ilisi": _safe(scib_metrics.ilisi_knn, nn[90], domain),
        "kbet_per_label": _safe(scib_metrics.kbet_per_label, nn[50], domain, types),
        "silhouette_batch": _safe(scib_metrics.silhouette_batch, X, types, domain),
        "graph_connectivity": _safe(scib_metrics.graph_connectivity, nn[15], types),
    }
    rows = [
        {
            "metric": k,
            "group": "batch_mixing",
            "cells": "all",
            "labels": "reference+predicted",
            "value": v,
            "n_cells": len(sample),
        }
        for k, v in mixing.items()
    ]
    rows += _bio_rows(scib_metrics, X[s_ref], types[s_ref], "reference", "reference", nn_args)
    if truth_key is not None:
        truth = obs[truth_key].to_numpy()[sample]
        known = ~s_ref & ~pd.isna(truth)
        rows += _bio_rows(scib_metrics, X[known], truth[known].astype(str), "spatial", "truth", nn_args)
    return pd.DataFrame(rows, columns=_COLUMNS)
