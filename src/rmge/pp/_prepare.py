"""Combine a labelled reference and a spatial dataset into one AnnData ready for :class:`rmge.RMGEModel`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from rmge._constants import (
    COUNTS,
    COUNTS_LAYER,
    DOMAIN_KEY,
    LOG_NORMALIZED,
    NORMALIZED,
    REFERENCE_DOMAIN,
    SPATIAL_DOMAIN,
    UNKNOWN_LABEL,
)
from rmge._validation import check_nonnegative_finite, detect_value_kind

logger = logging.getLogger(__name__)

_KINDS = (COUNTS, NORMALIZED, LOG_NORMALIZED)
_DUPLICATE_MODES = ("sum", "first")
_SECTION_KEY = "section"
_N_EXAMPLES = 8


@dataclass
class _Part:
    """One input matrix (the reference, or one spatial section) on its way into the result."""

    domain: str
    section: str | None
    X: object  # dense array or sparse matrix as given by the user
    genes: np.ndarray  # gene names, one per column of ``X``
    obs: pd.DataFrame
    what: str  # name used in messages
    var: pd.DataFrame | None = None
    coords: np.ndarray | None = None
    rows: np.ndarray | None = None  # rows of ``X`` to keep (None: all)
    row_groups: dict[str, np.ndarray] = field(default_factory=dict)  # section -> row indices (kind detection)


def prepare(
    reference: AnnData,
    spatial: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    labels_key: str,
    *,
    domain_key: str = DOMAIN_KEY,
    batch_key: str | None = None,
    reference_layer: str | None = None,
    spatial_layer: str | None = None,
    n_top_genes: int | None = 3000,
    hvg_flavor: str = "seurat",
    min_genes: int = 20,
    case_insensitive: bool = True,
    duplicates: str = "sum",
    reference_gene_key: str | None = None,
    spatial_gene_key: str | None = None,
    reference_kind: str = "auto",
    spatial_kind: str = "auto",
    drop_unlabeled: bool = False,
    copy_obs: bool = True,
) -> AnnData:
    """Combine a labelled reference and spatial data into one AnnData for :class:`rmge.RMGEModel`.

    Reference cells come first, then spatial cells. Genes are restricted to those measured on both
    sides (optionally further to the reference's highly variable genes), values are brought to a
    non-negative scale (counts kept as they are, ``log1p`` values undone with ``expm1``) and stored
    sparse in ``layers['counts']`` and ``X``. The result can be passed directly to
    ``RMGEModel.setup_anndata(adata, labels_key=labels_key, domain_key=domain_key)``.

    Parameters
    ----------
    reference
        Labelled reference (e.g. snRNA-seq, or snATAC-seq gene activity), cells × genes.
    spatial
        Spatial data: one AnnData, or several sections as a list (sections named ``"0"``, ``"1"``,
        ...) or a dict ``{section_name: AnnData}``. Sections are concatenated and their name stored in
        ``obs[batch_key]`` (``obs['section']`` when ``batch_key`` is not given).
    labels_key
        Column of ``reference.obs`` holding the cell-type labels.
    domain_key
        Name of the column written to ``obs`` telling ``"reference"`` from ``"spatial"`` cells.
    batch_key
        Column of ``spatial.obs`` naming the section (slide, sample) of each spatial cell. Value kinds
        are then detected per section. Reference cells get the reference's own ``batch_key`` column
        when it has one, ``"reference"`` otherwise.
    reference_layer, spatial_layer
        Layer holding the values to use (``None``: ``X``; ``"raw"``: ``adata.raw.X`` with
        ``adata.raw.var_names``). For a list/dict of sections, the same layer is used for each.
    n_top_genes
        Number of the reference's highly variable genes (among shared genes) to keep. ``None`` or
        ``0`` keeps all shared genes, as does a value not smaller than the number of shared genes.
    hvg_flavor
        ``flavor`` of :func:`scanpy.pp.highly_variable_genes`. ``"seurat"`` and ``"cell_ranger"`` are
        computed on ``normalize_total(1e4)`` + ``log1p`` of the reference (as the original RMGE did);
        ``"seurat_v3"``/``"seurat_v3_paper"`` on its counts (they need ``scikit-misc``).
    min_genes
        Smallest number of shared genes accepted; fewer raise a ``ValueError``.
    case_insensitive
        Match gene names ignoring case (e.g. ``GAD1`` = ``Gad1``; gene panels often differ in case).
        The result uses the reference's spelling; the spatial spelling is kept in
        ``var['spatial_gene_name']`` when it differs.
    duplicates
        What to do with gene names occurring several times within one dataset (after case folding):
        ``"sum"`` adds their values (after undoing ``log1p``), ``"first"`` keeps the first column.
        Either way a warning tells how many names were affected.
    reference_gene_key, spatial_gene_key
        Column of ``var`` holding the gene names to match on, instead of ``var_names`` (e.g. gene
        symbols when ``var_names`` are Ensembl IDs).
    reference_kind, spatial_kind
        Kind of values of each side: ``"auto"`` (detected with :func:`rmge.pp.detect_value_kind`),
        ``"counts"``, ``"normalized"`` or ``"log_normalized"``.
    drop_unlabeled
        Reference cells without a label (NaN in ``obs[labels_key]``) raise an error by default; with
        ``True`` they are dropped with a warning.
    copy_obs
        Copy the other ``obs`` columns of the inputs into the result (columns missing on one side are
        filled with NaN). With ``False`` only the columns written by this function are present.

    Returns
    -------
    AnnData
        Reference cells then spatial cells, with

        - ``X`` and ``layers['counts']``: non-negative values, CSR ``float32``;
        - ``obs[domain_key]``: categorical ``"reference"``/``"spatial"``;
        - ``obs[labels_key]``: reference labels (categorical), NaN for spatial cells;
        - ``obs[f"{labels_key}_spatial"]``: the spatial side's own ``labels_key`` column, if it had one;
        - ``obs[batch_key]``: section of each cell, when sections are given;
        - ``obs['original_obs_name']``: the input ``obs_names`` (``obs_names`` are suffixed by domain
          or section when names clash);
        - ``obsm['spatial']``: spatial coordinates, NaN for reference cells (when the spatial side has
          them);
        - ``var['highly_variable_rank']`` when genes were selected, ``var['spatial_gene_name']`` when
          spellings differ;
        - ``uns['rmge']``: a summary (keys, gene and cell numbers, detected and used value kinds).

    Raises
    ------
    KeyError
        If ``labels_key``, ``batch_key``, a layer or a gene key is missing.
    ValueError
        If fewer than ``min_genes`` genes are shared, values are negative or not finite, reference
        labels are missing, or a domain has no cell with non-zero values over the used genes.

    Examples
    --------
    >>> adata = rmge.pp.prepare(reference, spatial, labels_key="cell_type")  # doctest: +SKIP
    >>> rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type", domain_key="domain")  # doctest: +SKIP
    """
    # ---- argument checks (fail before any heavy work) ----
    if not isinstance(reference, AnnData):
        raise TypeError(f"`reference` must be an AnnData, got {type(reference).__name__}.")
    for name, kind in (("reference_kind", reference_kind), ("spatial_kind", spatial_kind)):
        if kind != "auto" and kind not in _KINDS:
            raise ValueError(f"`{name}` must be 'auto' or one of {list(_KINDS)}, got {kind!r}.")
    if duplicates not in _DUPLICATE_MODES:
        raise ValueError(f"`duplicates` must be one of {list(_DUPLICATE_MODES)}, got {duplicates!r}.")
    if n_top_genes is not None and (int(n_top_genes) != n_top_genes or n_top_genes < 0):
        raise ValueError(f"`n_top_genes` must be a non-negative integer or None, got {n_top_genes!r}.")
    if min_genes < 1:
        raise ValueError(f"`min_genes` must be at least 1, got {min_genes!r}.")
    if labels_key not in reference.obs.columns:
        raise KeyError(
            f"Label column {labels_key!r} not found in `reference.obs`. Available columns: "
            f"{list(reference.obs.columns)}. Pass the column holding the cell types as `labels_key`."
        )
    if labels_key == domain_key:
        raise ValueError(f"`labels_key` and `domain_key` must differ (both are {labels_key!r}).")
    if batch_key is not None and batch_key in (labels_key, domain_key):
        raise ValueError(f"`batch_key` ({batch_key!r}) must differ from `labels_key` and `domain_key`.")

    sections = _split_spatial(spatial, batch_key)
    if len(sections) > 1 or not isinstance(spatial, AnnData):
        section_key = batch_key if batch_key is not None else _SECTION_KEY
    else:
        section_key = batch_key

    # ---- reference labels ----
    labels = reference.obs[labels_key]
    missing = labels.isna().to_numpy()
    keep_ref = None
    if missing.any():
        n_missing = int(missing.sum())
        if not drop_unlabeled:
            raise ValueError(
                f"{n_missing} of {reference.n_obs} reference cells have no label (NaN in "
                f"`reference.obs[{labels_key!r}]`). Drop them first, e.g. "
                f"`reference = reference[reference.obs[{labels_key!r}].notna()].copy()`, "
                "or pass `drop_unlabeled=True`."
            )
        warnings.warn(
            f"Dropping {n_missing} of {reference.n_obs} reference cells without a label "
            f"(NaN in `reference.obs[{labels_key!r}]`).",
            UserWarning,
            stacklevel=2,
        )
        keep_ref = np.flatnonzero(~missing)
    if (labels.astype(str) == UNKNOWN_LABEL).any():
        warnings.warn(
            f"Reference label {UNKNOWN_LABEL!r} is also the label rmge gives to spatial cells that fit no "
            "reference type; consider renaming it so predictions can be told apart.",
            UserWarning,
            stacklevel=2,
        )

    # ---- gather parts: matrices, gene names, obs ----
    ref_part = _make_part(
        reference, REFERENCE_DOMAIN, None, reference_layer, reference_gene_key, copy_obs, keep_cols=[section_key]
    )
    if keep_ref is not None:
        ref_part.rows = keep_ref
        ref_part.obs = ref_part.obs.iloc[keep_ref]
    if len(ref_part.obs) == 0:
        raise ValueError("`reference` has no cells.")
    spatial_parts = [
        _make_part(
            sdata,
            SPATIAL_DOMAIN,
            name,
            spatial_layer,
            spatial_gene_key,
            copy_obs,
            keep_cols=[labels_key, section_key],
            group_key=batch_key if name is None else None,
        )
        for name, sdata in sections
    ]
    for part in spatial_parts:
        if part.X.shape[0] == 0:
            raise ValueError(f"{part.what} has no cells.")

    # ---- shared genes ----
    ref_keys, ref_first, ref_dups = _gene_keys(ref_part.genes, case_insensitive)
    spatial_info = [_gene_keys(p.genes, case_insensitive) for p in spatial_parts]
    shared_set = set(ref_first)
    for _, first, _ in spatial_info:
        shared_set &= set(first)
    shared = [k for k in ref_first if k in shared_set]  # reference order
    n_spatial_genes = len(set().union(*(first.keys() for _, first, _ in spatial_info)))
    if len(shared) < min_genes:
        raise ValueError(_too_few_genes_message(len(shared), min_genes, ref_part, spatial_parts, case_insensitive))
    logger.info(
        "%d genes shared between the reference (%d genes) and the spatial data (%d genes).",
        len(shared),
        len(ref_first),
        n_spatial_genes,
    )
    _warn_duplicates(ref_part.what, ref_dups, shared_set, duplicates)
    for part, (_, _, dups) in zip(spatial_parts, spatial_info, strict=True):
        _warn_duplicates(part.what, dups, shared_set, duplicates)

    # ---- value checks, kind detection, conversion, selection of shared genes ----
    kinds_detected: dict[str, object] = {}
    kinds_used: dict[str, object] = {}
    ref_X, ref_kinds = _select_and_convert(ref_part, ref_keys, shared, duplicates, reference_kind)
    kinds_detected[REFERENCE_DOMAIN], kinds_used[REFERENCE_DOMAIN] = ref_kinds[None]
    spatial_X = []
    section_kinds: dict[str, dict[str, str]] = {}
    for part, (keys, _, _) in zip(spatial_parts, spatial_info, strict=True):
        Xp, pk = _select_and_convert(part, keys, shared, duplicates, spatial_kind)
        spatial_X.append(Xp)
        for name, (det, used) in pk.items():
            name = part.section if name is None else name
            section_kinds[str(name)] = {"detected": det, "used": used}
    if spatial_parts[0].section is None and not spatial_parts[0].row_groups:  # one AnnData, no sections
        kinds_detected[SPATIAL_DOMAIN], kinds_used[SPATIAL_DOMAIN] = pk[None]
        section_kinds = {}
    else:
        det = {v["detected"] for v in section_kinds.values()}
        used = {v["used"] for v in section_kinds.values()}
        kinds_detected[SPATIAL_DOMAIN] = det.pop() if len(det) == 1 else "mixed"
        kinds_used[SPATIAL_DOMAIN] = used.pop() if len(used) == 1 else "mixed"
    _warn_kinds(REFERENCE_DOMAIN, {None: kinds_used[REFERENCE_DOMAIN]})
    _warn_kinds(
        SPATIAL_DOMAIN,
        {k: v["used"] for k, v in section_kinds.items()} if section_kinds else {None: kinds_used[SPATIAL_DOMAIN]},
    )

    # ---- feature selection on the reference ----
    n_shared = len(shared)
    hvg_rank = None
    gene_idx = np.arange(n_shared)
    if n_top_genes and n_top_genes < n_shared:
        gene_idx, hvg_rank = _reference_hvgs(ref_X, int(n_top_genes), hvg_flavor, kinds_used[REFERENCE_DOMAIN])
        ref_X = ref_X[:, gene_idx]
        spatial_X = [Xs[:, gene_idx] for Xs in spatial_X]
        logger.info("Kept the reference's %d most variable of %d shared genes.", len(gene_idx), n_shared)
    elif n_top_genes:
        logger.info("Keeping all %d shared genes (n_top_genes=%d is not smaller).", n_shared, n_top_genes)

    # ---- assemble ----
    X = sp.vstack([ref_X, *spatial_X], format="csr", dtype=np.float32)
    X.sort_indices()
    n_ref = ref_X.shape[0]
    sizes = [n_ref] + [Xs.shape[0] for Xs in spatial_X]
    ref_labels = reference.obs[labels_key] if keep_ref is None else reference.obs[labels_key].iloc[keep_ref]
    obs = _assemble_obs(ref_part, spatial_parts, labels_key, domain_key, section_key, ref_labels)
    var = _assemble_var(ref_part, spatial_parts, ref_keys, spatial_info, shared, gene_idx, hvg_rank)
    coords = _assemble_coords(ref_part, spatial_parts, sizes)

    # ---- drop cells without any signal over the used genes ----
    empty = np.diff(X.indptr) == 0
    n_dropped = {REFERENCE_DOMAIN: int(empty[:n_ref].sum()), SPATIAL_DOMAIN: int(empty[n_ref:].sum())}
    if empty.any():
        for dom, n_dom in ((REFERENCE_DOMAIN, n_ref), (SPATIAL_DOMAIN, X.shape[0] - n_ref)):
            if n_dropped[dom] == n_dom:
                raise ValueError(
                    f"All {n_dom} {dom} cells have only zeros over the {X.shape[1]} genes used, so nothing can be "
                    "learnt from them. Check that the right layer is used and that the gene names match "
                    "(or keep more genes with a larger `n_top_genes`, or `n_top_genes=None`)."
                )
        warnings.warn(
            f"Dropping cells with only zeros over the {X.shape[1]} genes used (they carry no information): "
            f"{n_dropped[REFERENCE_DOMAIN]} reference and {n_dropped[SPATIAL_DOMAIN]} spatial cells.",
            UserWarning,
            stacklevel=2,
        )
        keep = np.flatnonzero(~empty)
        X = X[keep]
        obs = obs.iloc[keep]
        if coords is not None:
            coords = coords[keep]
        n_ref -= n_dropped[REFERENCE_DOMAIN]
    if obs[labels_key].iloc[:n_ref].nunique() < 2:
        warnings.warn(
            f"The reference has only {obs[labels_key].iloc[:n_ref].nunique()} label(s) in "
            f"`obs[{labels_key!r}]`; label transfer needs at least two cell types.",
            UserWarning,
            stacklevel=2,
        )
    obs[labels_key] = obs[labels_key].cat.remove_unused_categories()

    adata = AnnData(X=X, obs=obs, var=var)
    adata.layers[COUNTS_LAYER] = X.copy()
    if coords is not None:
        adata.obsm["spatial"] = coords

    info: dict[str, object] = {
        "labels_key": labels_key,
        "domain_key": domain_key,
        "counts_layer": COUNTS_LAYER,
        "n_reference_genes": len(ref_first),
        "n_spatial_genes": n_spatial_genes,
        "n_shared_genes": n_shared,
        "n_genes_used": int(adata.n_vars),
        "n_reference_cells": int(n_ref),
        "n_spatial_cells": int(adata.n_obs - n_ref),
        "n_empty_cells_dropped": n_dropped,
        "value_kind": kinds_used,
        "value_kind_detected": kinds_detected,
        "case_insensitive": bool(case_insensitive),
        "hvg_flavor": hvg_flavor if hvg_rank is not None else "none",
    }
    if section_key is not None:
        info["batch_key"] = section_key
    if section_kinds:
        info["value_kind_sections"] = section_kinds
    adata.uns["rmge"] = info
    return adata


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _split_spatial(spatial, batch_key: str | None) -> list[tuple[str | None, AnnData]]:
    """Return ``[(section_name, AnnData), ...]``; the name is ``None`` for a single AnnData."""
    if isinstance(spatial, AnnData):
        if batch_key is not None and batch_key not in spatial.obs.columns:
            raise KeyError(
                f"`batch_key` {batch_key!r} not found in `spatial.obs`. Available columns: {list(spatial.obs.columns)}."
            )
        return [(None, spatial)]
    if isinstance(spatial, Mapping):
        items = [(str(k), v) for k, v in spatial.items()]
        if len({k for k, _ in items}) != len(items):
            raise ValueError("Section names of `spatial` must be unique after conversion to strings.")
    elif isinstance(spatial, Sequence) and not isinstance(spatial, str):
        items = [(str(i), v) for i, v in enumerate(spatial)]
    else:
        raise TypeError(
            "`spatial` must be an AnnData, a list of AnnData or a dict {section name: AnnData}, "
            f"got {type(spatial).__name__}."
        )
    if not items:
        raise ValueError("`spatial` is empty: give at least one AnnData.")
    for name, sdata in items:
        if not isinstance(sdata, AnnData):
            raise TypeError(f"Spatial section {name!r} must be an AnnData, got {type(sdata).__name__}.")
    return items


def _make_part(
    adata: AnnData,
    domain: str,
    section: str | None,
    layer: str | None,
    gene_key: str | None,
    copy_obs: bool,
    keep_cols: Sequence[str | None] = (),
    group_key: str | None = None,
) -> _Part:
    """Collect the matrix, gene names, obs and coordinates of one input AnnData (no data copied)."""
    what = "reference" if domain == REFERENCE_DOMAIN else "spatial"
    if section is not None:
        what = f"spatial section {section!r}"
    var_names = adata.var_names
    var = adata.var
    if layer is None:
        X = adata.X
        where = f"{what} X"
    elif layer == "raw":
        if adata.raw is None:
            raise KeyError(f"`layer='raw'` was asked for the {what}, but it has no `.raw`.")
        X = adata.raw.X
        var_names = adata.raw.var_names
        var = adata.raw.var
        where = f"{what} raw.X"
    else:
        if layer not in adata.layers:
            raise KeyError(
                f"Layer {layer!r} not found in the {what}. Available layers: {list(adata.layers.keys())} "
                "(use None for `X`, 'raw' for `.raw.X`)."
            )
        X = adata.layers[layer]
        where = f"{what} layers[{layer!r}]"
    if X is None:
        raise ValueError(f"The {what} has no data matrix (`X` is None); give a layer holding counts.")
    if gene_key is None:
        genes = np.asarray(var_names, dtype=str)
    else:
        if gene_key not in var.columns:
            raise KeyError(
                f"Gene key {gene_key!r} not found in the {what}'s var. Available columns: {list(var.columns)}."
            )
        genes = var[gene_key].astype(str).to_numpy()
    if copy_obs:
        obs = adata.obs.copy()
    else:  # only the columns this function needs (ground truth labels, sections)
        obs = adata.obs[[c for c in keep_cols if c is not None and c in adata.obs.columns]].copy()
    coords = None
    if domain == SPATIAL_DOMAIN and "spatial" in adata.obsm:
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if X.shape != (adata.n_obs, len(genes)):
        raise ValueError(f"The {where} has shape {X.shape}, expected {(adata.n_obs, len(genes))}.")
    part = _Part(domain=domain, section=section, X=X, genes=genes, obs=obs, what=where, var=var, coords=coords)
    if group_key is not None:
        codes, uniques = pd.factorize(adata.obs[group_key].astype(str))
        if (codes < 0).any():
            raise ValueError(f"`spatial.obs[{group_key!r}]` has missing values; give every cell a section.")
        part.row_groups = {str(u): np.flatnonzero(codes == i) for i, u in enumerate(uniques)}
    return part


def _gene_keys(genes: np.ndarray, case_insensitive: bool):
    """Matching keys of gene names, first column of each key, and duplicated keys with their counts."""
    keys = pd.Index(genes).str.strip()
    if case_insensitive:
        keys = keys.str.casefold()
    keys = np.asarray(keys, dtype=object)
    first: dict[str, int] = {}
    for j, k in enumerate(keys):
        first.setdefault(k, j)
    counts = pd.Series(keys).value_counts()
    dups = counts[counts > 1]
    return keys, first, dups


def _warn_duplicates(what: str, dups: pd.Series, shared: set, duplicates: str) -> None:
    if len(dups) == 0:
        return
    n_shared_dups = int(sum(1 for k in dups.index if k in shared))
    examples = [str(k) for k in dups.index[:_N_EXAMPLES]]
    action = "summed their values" if duplicates == "sum" else "kept the first column of each"
    warnings.warn(
        f"The {what} has {len(dups)} gene name(s) occurring more than once ({int(dups.sum())} columns; "
        f"{n_shared_dups} of these names are shared), e.g. {examples}; {action} "
        "(set `duplicates=` to change this).",
        UserWarning,
        stacklevel=3,
    )


def _warn_kinds(domain: str, used: dict[str | None, str]) -> None:
    """One warning per domain and kind that is not counts, naming the sections concerned."""
    arg = "reference_kind" if domain == REFERENCE_DOMAIN else "spatial_kind"
    for kind in (LOG_NORMALIZED, NORMALIZED):
        names = [k for k, v in used.items() if v == kind]
        if not names:
            continue
        where = f"The {domain} data"
        if names != [None]:
            where += f" (section(s) {names})"
        if kind == LOG_NORMALIZED:
            msg = (
                f"{where} look log-normalised (non-integer values, maximum below 20): assuming `log1p` of "
                "normalised values and undoing it with `expm1`. The result holds normalised, non-integer values, "
                "not counts, so library sizes no longer reflect sequencing depth. If raw counts exist (a 'counts' "
                f"layer or `.raw`), pass them instead; set `{arg}=` to override the detection."
            )
        else:
            msg = (
                f"{where} hold normalised (non-integer) values rather than counts; they are kept as they are. "
                f"Raw counts work better if available; set `{arg}=` to override the detection."
            )
        warnings.warn(msg, UserWarning, stacklevel=3)


def _too_few_genes_message(n_shared: int, min_genes: int, ref_part: _Part, spatial_parts, case_insensitive) -> str:
    spatial_genes = np.concatenate([p.genes for p in spatial_parts])
    ref_ex = [str(g) for g in ref_part.genes[:_N_EXAMPLES]]
    sp_ex = [str(g) for g in pd.unique(spatial_genes)[:_N_EXAMPLES]]
    hint = (
        "Check that both datasets come from the same species, use the same kind of gene identifiers "
        "(Ensembl IDs vs symbols: pass `reference_gene_key`/`spatial_gene_key` to match on a `var` column)"
    )
    hint += "." if case_insensitive else ", and whether names differ only in case (`case_insensitive=True`)."
    return (
        f"Only {n_shared} gene(s) are shared between the reference ({len(ref_part.genes)} genes, e.g. {ref_ex}) "
        f"and the spatial data ({len(pd.unique(spatial_genes))} genes, e.g. {sp_ex}); at least "
        f"`min_genes={min_genes}` are needed. {hint}"
    )


def _to_csr_float32(X) -> sp.csr_matrix:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


def _detect(X, rows: np.ndarray | None, n_sample: int = 2_000, seed: int = 0) -> str:
    """Detect the value kind on (a sample of) some rows without copying the whole block."""
    if rows is None:
        return detect_value_kind(X, n_sample=n_sample, seed=seed)
    if len(rows) > n_sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n_sample, replace=False))
    return detect_value_kind(X[rows], n_sample=n_sample, seed=seed)


def _select_and_convert(part: _Part, keys, shared: list[str], duplicates: str, kind_arg: str):
    """Restrict a part to the shared genes (reference order), check its values and undo ``log1p``.

    Returns the CSR float32 matrix and ``{section: (detected kind, used kind)}`` (key ``None`` for
    the part as a whole).
    """
    pos = {k: i for i, k in enumerate(shared)}
    cols = np.flatnonzero([k in pos for k in keys])
    target = np.fromiter((pos[keys[j]] for j in cols), dtype=np.int64, count=len(cols))
    if duplicates == "first":
        # first occurrence of each shared key, in shared order
        _, first_idx = np.unique(target, return_index=True)
        cols, target = cols[first_idx], target[first_idx]
    order = np.argsort(target, kind="stable")
    cols, target = cols[order], target[order]

    # column selection by index array keeps sparse input sparse; dense input is converted block-free
    Xs = part.X[:, cols] if sp.issparse(part.X) else np.asarray(part.X)[:, cols]
    if part.rows is not None:
        Xs = Xs[part.rows]
    Xs = _to_csr_float32(Xs)
    check_nonnegative_finite(Xs, what=f"The {part.what} (shared genes)")

    groups: dict[str | None, np.ndarray | None] = dict(part.row_groups) if part.row_groups else {None: None}
    kinds = {}
    row_of_value = None
    for name, rows in groups.items():
        detected = _detect(Xs, rows)
        used = detected if kind_arg == "auto" else kind_arg
        if kind_arg != "auto" and kind_arg != detected:
            logger.info("%s: values look like %r but %r was given; using %r.", part.what, detected, used, used)
        if used == LOG_NORMALIZED:  # values are log1p(normalised): undo the log, zeros stay zeros
            if row_of_value is None:
                row_of_value = np.repeat(np.arange(Xs.shape[0]), np.diff(Xs.indptr))
            mask = slice(None) if rows is None else np.isin(row_of_value, rows)
            Xs.data[mask] = np.expm1(Xs.data[mask].astype(np.float64)).astype(np.float32)
        kinds[name] = (detected, used)

    if len(cols) > len(shared):
        # sum duplicated columns with a sparse 0/1 aggregation matrix (columns -> shared genes)
        agg = sp.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (np.arange(len(cols)), target)),
            shape=(len(cols), len(shared)),
        )
        Xs = (Xs @ agg).tocsr()
        Xs.sort_indices()
    return Xs, kinds


def _reference_hvgs(ref_X: sp.csr_matrix, n_top_genes: int, flavor: str, ref_kind: str):
    """Indices (in shared order) and ranks of the reference's most variable shared genes."""
    import scanpy as sc

    keep_rows = np.diff(ref_X.indptr) > 0  # cells empty over shared genes would give NaNs when normalised
    tmp = AnnData(X=ref_X[keep_rows].copy())
    tmp.var_names = [f"g{i}" for i in range(ref_X.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flavor in ("seurat_v3", "seurat_v3_paper"):
            if ref_kind != COUNTS:
                logger.info("HVG flavour %r expects counts; the reference holds %r values.", flavor, ref_kind)
            sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=flavor)
        else:
            sc.pp.normalize_total(tmp, target_sum=1e4)
            sc.pp.log1p(tmp)
            sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=flavor)
    hv = tmp.var["highly_variable"].to_numpy()
    idx = np.flatnonzero(hv)
    if "highly_variable_rank" in tmp.var.columns:
        rank = tmp.var["highly_variable_rank"].to_numpy()[idx]
    else:
        score = tmp.var["dispersions_norm"].to_numpy()[idx]
        rank = pd.Series(-score).rank(method="first").to_numpy() - 1
    return idx, np.asarray(rank, dtype=np.float64)


def _assemble_obs(
    ref_part: _Part,
    spatial_parts: list[_Part],
    labels_key: str,
    domain_key: str,
    section_key: str | None,
    labels: pd.Series,
) -> pd.DataFrame:
    """Build the result's obs: domain, labels, sections, ground truth, unique names, other input columns."""
    gt_key = f"{labels_key}_spatial"
    ref_obs = ref_part.obs.drop(columns=[c for c in (labels_key, domain_key) if c in ref_part.obs.columns])

    spatial_obs = []
    has_gt = False
    for part in spatial_parts:
        o = part.obs.drop(columns=[domain_key]) if domain_key in part.obs.columns else part.obs.copy()
        if labels_key in o.columns:
            has_gt = True
            o[gt_key] = o.pop(labels_key)
        if part.section is not None and section_key is not None:
            if section_key in o.columns and (o[section_key].astype(str) != part.section).any():
                warnings.warn(
                    f"Overwriting column {section_key!r} of spatial section {part.section!r} with the section name.",
                    UserWarning,
                    stacklevel=3,
                )
            o[section_key] = part.section
        spatial_obs.append(o)
    if has_gt:
        warnings.warn(
            f"The spatial data already has a column {labels_key!r}; its values are kept in `obs[{gt_key!r}]` "
            f"(e.g. for evaluation) and `obs[{labels_key!r}]` is NaN for spatial cells.",
            UserWarning,
            stacklevel=3,
        )
    if section_key is not None and section_key not in ref_obs.columns:
        ref_obs[section_key] = REFERENCE_DOMAIN

    obs = pd.concat([ref_obs, *spatial_obs], axis=0, join="outer", sort=False)
    original = obs.index.astype(str).to_numpy()
    n_ref = len(ref_obs)

    # Concatenation turns columns present on one side only into object columns mixing values and NaN,
    # which h5ad cannot write: strings become categoricals, other values pandas' nullable dtypes.
    for col in obs.columns:
        if obs[col].dtype == object:
            non_null = obs[col].dropna()
            if len(non_null) and all(isinstance(v, str) for v in non_null):
                obs[col] = pd.Categorical(obs[col])
                continue
            converted = obs[col].convert_dtypes()
            if converted.dtype == object:
                converted = pd.Categorical(obs[col].where(obs[col].isna(), obs[col].astype(str)))
            obs[col] = converted

    new = pd.DataFrame(index=obs.index)
    new[domain_key] = pd.Categorical(
        np.repeat([REFERENCE_DOMAIN, SPATIAL_DOMAIN], [n_ref, len(obs) - n_ref]),
        categories=[REFERENCE_DOMAIN, SPATIAL_DOMAIN],
    )
    ref_labels = labels.to_numpy()
    if isinstance(labels.dtype, pd.CategoricalDtype):
        present = set(ref_labels)
        cats = [c for c in labels.cat.categories if c in present]
    else:
        cats = sorted(pd.unique(ref_labels), key=str)
    all_labels = np.full(len(obs), np.nan, dtype=object)
    all_labels[:n_ref] = ref_labels
    new[labels_key] = pd.Categorical(all_labels, categories=cats)
    front = [domain_key, labels_key]
    if section_key is not None:
        new[section_key] = pd.Categorical(obs[section_key].astype(str).to_numpy())
        front.append(section_key)
    if gt_key in obs.columns:
        new[gt_key] = obs[gt_key].to_numpy()
        front.append(gt_key)
    rest = obs.drop(columns=[c for c in front if c in obs.columns])
    obs = pd.concat([new, rest], axis=1)
    obs["original_obs_name"] = original

    # unique obs names: suffix every name by its domain (or section) when names clash
    if not pd.Index(original).is_unique:
        suffix = np.repeat(
            [REFERENCE_DOMAIN] + [p.section if p.section is not None else SPATIAL_DOMAIN for p in spatial_parts],
            [n_ref] + [len(o) for o in spatial_obs],
        )
        names = pd.Index([f"{n}-{s}" for n, s in zip(original, suffix, strict=True)])
        if not names.is_unique:
            from anndata.utils import make_index_unique

            warnings.warn(
                "Some obs_names are repeated within one dataset; made them unique by appending '-1', '-2', ...",
                UserWarning,
                stacklevel=3,
            )
            names = make_index_unique(names)
        obs.index = names
    else:
        obs.index = pd.Index(original)
    obs.index.name = None
    return obs


def _assemble_var(ref_part, spatial_parts, ref_keys, spatial_info, shared, gene_idx, hvg_rank) -> pd.DataFrame:
    ref_first = {}
    for j, k in enumerate(ref_keys):
        ref_first.setdefault(k, j)
    shared_used = [shared[i] for i in gene_idx]
    ref_cols = np.array([ref_first[k] for k in shared_used], dtype=np.int64)
    names = ref_part.genes[ref_cols]
    var = ref_part.var.iloc[ref_cols].copy()
    var.index = pd.Index(names, dtype=str)
    spatial_names = None
    for part, (_, first, _) in zip(spatial_parts, spatial_info, strict=True):
        sp_names = part.genes[[first[k] for k in shared_used]]
        if spatial_names is None:
            spatial_names = sp_names
    if spatial_names is not None and np.any(spatial_names != names):
        var["spatial_gene_name"] = spatial_names
    if hvg_rank is not None:
        var["highly_variable_rank"] = hvg_rank
    return var


def _assemble_coords(ref_part, spatial_parts, sizes) -> np.ndarray | None:
    if all(p.coords is None for p in spatial_parts):
        return None
    n_dim = max(p.coords.shape[1] for p in spatial_parts if p.coords is not None)
    blocks = [np.full((sizes[0], n_dim), np.nan)]
    missing = []
    for part, n in zip(spatial_parts, sizes[1:], strict=True):
        block = np.full((n, n_dim), np.nan)
        if part.coords is None:
            missing.append(part.section)
        else:
            block[:, : part.coords.shape[1]] = part.coords
        blocks.append(block)
    if missing:
        warnings.warn(
            f"Spatial sections {missing} have no `obsm['spatial']`; their coordinates are NaN.",
            UserWarning,
            stacklevel=3,
        )
    return np.vstack(blocks)
