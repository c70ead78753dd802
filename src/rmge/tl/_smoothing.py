"""Smoothing of predicted class probabilities over spatial neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def spatial_neighbors(
    coordinates: np.ndarray, n_neighbors: int = 8, sections: np.ndarray | None = None
) -> sp.csr_matrix:
    """Row-normalised k-nearest-neighbour graph of spatial coordinates, built within each section.

    Parameters
    ----------
    coordinates
        Cells × 2 (or 3) finite coordinates.
    n_neighbors
        Neighbours per cell (a cell is not its own neighbour). Sections with fewer cells use all their
        other cells.
    sections
        Section of each cell; cells of different sections are never neighbours. ``None``: one section.

    Returns
    -------
    Sparse CSR matrix cells × cells whose row ``i`` holds weight ``1/k_i`` on each of the ``k_i``
    neighbours of cell ``i`` (rows of cells alone in their section are empty).
    """
    from sklearn.neighbors import NearestNeighbors

    coordinates = np.asarray(coordinates, dtype=np.float64)
    n = len(coordinates)
    if sections is None:
        groups = [np.arange(n)]
    else:
        codes = pd.factorize(np.asarray(sections), use_na_sentinel=False)[0]
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(codes.max() + 2)) if n else [0]
        groups = [order[bounds[g] : bounds[g + 1]] for g in range(len(bounds) - 1)]
    rows, cols = [], []
    for idx in groups:
        k = min(n_neighbors, len(idx) - 1)
        if k < 1:
            continue
        # the nearest point returned for each cell is normally itself; ask for one more and drop self
        nn = NearestNeighbors(n_neighbors=k + 1).fit(coordinates[idx])
        nbr = nn.kneighbors(coordinates[idx], return_distance=False)
        own = np.arange(len(idx))[:, None]
        is_self = nbr == own
        # keep the first k non-self neighbours of each row (duplicate coordinates may hide self)
        keep = ~is_self
        keep &= np.cumsum(keep, axis=1) <= k
        r = np.broadcast_to(own, nbr.shape)[keep]
        rows.append(idx[r])
        cols.append(idx[nbr[keep]])
    if rows:
        rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    else:
        rows_a = cols_a = np.zeros(0, dtype=np.int64)
    A = sp.csr_matrix((np.ones(len(rows_a)), (rows_a, cols_a)), shape=(n, n))
    deg = np.asarray(A.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(np.divide(1.0, deg, out=np.zeros(n), where=deg > 0)) @ A)


def smooth_probabilities(
    adata,
    probabilities,
    *,
    spatial_key: str = "spatial",
    n_neighbors: int = 8,
    alpha: float = 0.25,
    batch_key: str | None = None,
    n_iterations: int = 1,
    fill=None,
):
    """Smooth predicted class probabilities over each cell's spatial neighbours.

    Each cell's probabilities become ``(1 - alpha) * p + alpha * mean(p of its n_neighbors nearest
    cells)``, so rows still sum to 1; the cells in ``fill`` take their neighbours' mean alone.
    Neighbours are found on ``adata.obsm[spatial_key]`` with scikit-learn's nearest-neighbour search,
    within each section of ``adata.obs[batch_key]``; the graph is sparse (``n_neighbors`` entries per
    cell).

    Parameters
    ----------
    adata
        AnnData with the spatial coordinates of the cells.
    probabilities
        Class probabilities (cells × classes, rows summing to 1), e.g. ``model.predict(soft=True)``:
        a DataFrame whose index holds cell names of ``adata`` (any subset, any order), or an array with
        one row per cell of ``adata``. Cells whose coordinates are missing (NaN, e.g. reference cells of
        an AnnData built by :func:`rmge.pp.prepare`) are returned unchanged and are nobody's neighbour.
    spatial_key
        Key of ``adata.obsm`` holding the coordinates.
    n_neighbors
        Number of spatial neighbours of each cell.
    alpha
        Weight of the neighbours, in [0, 1]; 0 returns the probabilities unchanged.
    batch_key
        Column of ``adata.obs`` naming each cell's section; cells of different sections are never
        neighbours. Needed when sections share a coordinate frame.
    n_iterations
        Number of times the smoothing is applied (each pass reaches one ring of neighbours further).
    fill
        Boolean mask, one entry per row of ``probabilities``, of cells whose own probabilities carry no
        evidence, e.g. bins without counts (``np.asarray(adata.X.sum(axis=1)).ravel() == 0``), to which
        :meth:`RMGEModel.predict <rmge.RMGEModel.predict>` gives the spatial composition: they take the
        mean of their neighbours' probabilities (weight 1 instead of ``alpha``). ``None``: no such cells.

    Returns
    -------
    Smoothed probabilities, of the same type, shape, index and columns as ``probabilities``.

    Examples
    --------
    >>> probs = model.predict(soft=True)  # doctest: +SKIP
    >>> smoothed = rmge.tl.smooth_probabilities(adata, probs, batch_key="section")  # doctest: +SKIP
    >>> adata.obs["rmge_prediction_smoothed"] = smoothed.idxmax(axis=1)  # doctest: +SKIP
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer) or n_neighbors < 1:
        raise ValueError(f"`n_neighbors` must be a positive integer, got {n_neighbors!r}.")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int | np.integer) or n_iterations < 1:
        raise ValueError(f"`n_iterations` must be a positive integer, got {n_iterations!r}.")
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"No spatial coordinates: adata.obsm has no key {spatial_key!r} (keys: {list(adata.obsm.keys())}). "
            "Store the coordinates (cells × 2) there or pass their key as `spatial_key`."
        )
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise KeyError(f"Section column {batch_key!r} not found in adata.obs (columns: {list(adata.obs.columns)}).")

    coords_all = np.asarray(adata.obsm[spatial_key])
    if coords_all.ndim != 2 or not np.issubdtype(coords_all.dtype, np.number):
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be a numeric cells × dimensions matrix.")
    is_frame = isinstance(probabilities, pd.DataFrame)
    if is_frame:
        names = pd.Index(probabilities.index.astype(str))
        rows = pd.Index(adata.obs_names.astype(str)).get_indexer(names)
        if (rows < 0).any():
            raise ValueError(
                f"{int((rows < 0).sum())} row(s) of `probabilities` name cells not in adata.obs_names "
                f"(e.g. {list(names[rows < 0][:3])}). Pass probabilities predicted on this AnnData."
            )
        P = probabilities.to_numpy(dtype=np.float64)
    else:
        P = np.asarray(probabilities, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != adata.n_obs:
            raise ValueError(
                f"`probabilities` must be a cells × classes matrix with one row per cell of adata ({adata.n_obs}), "
                f"got shape {P.shape}. Pass a DataFrame indexed by cell names to smooth a subset of cells."
            )
        rows = np.arange(adata.n_obs)
    if P.ndim != 2 or P.shape[1] == 0:
        raise ValueError(f"`probabilities` must be a cells × classes matrix, got shape {P.shape}.")
    if P.size and (not np.all(np.isfinite(P)) or P.min() < 0):
        raise ValueError("`probabilities` must hold finite, non-negative values.")
    sums = P.sum(axis=1)
    if P.size and not np.allclose(sums, 1.0, atol=1e-3):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"Rows of `probabilities` must sum to 1 (row {bad} sums to {sums[bad]:.4g}); pass probabilities, "
            "e.g. model.predict(soft=True), not scores or logits."
        )

    if fill is None:
        fill = np.zeros(len(P), dtype=bool)
    else:
        fill = np.asarray(fill)
        if fill.dtype != bool or fill.shape != (len(P),):
            raise ValueError(
                f"`fill` must be a boolean mask with one entry per row of `probabilities` ({len(P)}), got "
                f"{fill.dtype} of shape {fill.shape}."
            )
    coords = coords_all[rows].astype(np.float64)
    located = np.all(np.isfinite(coords), axis=1)
    if len(rows) and not located.any():
        raise ValueError(
            f"None of the cells has finite coordinates in adata.obsm[{spatial_key!r}]; smoothing needs the "
            "spatial cells' positions."
        )
    out = P.copy()
    if (alpha > 0 or fill.any()) and located.any():
        sel = np.flatnonzero(located)
        sections = adata.obs[batch_key].to_numpy()[rows[sel]] if batch_key is not None else None
        A = spatial_neighbors(coords[sel], n_neighbors=n_neighbors, sections=sections)
        has_nbr = np.diff(A.indptr) > 0
        weight = np.where(fill[sel], 1.0, alpha)[:, None]
        Q = P[sel]
        for _ in range(n_iterations):
            Q = np.where(has_nbr[:, None], (1 - weight) * Q + weight * (A @ Q), Q)
        out[sel] = Q / Q.sum(axis=1, keepdims=True)
    if is_frame:
        return pd.DataFrame(out, index=probabilities.index, columns=probabilities.columns)
    return out
