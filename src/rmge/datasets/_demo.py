"""Demo data: PBMC counts bundled with scanpy, a simulated Stereo-seq section and a synthetic generator."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree
from sklearn.model_selection import train_test_split

#: Coarse cell types of scanpy's ``pbmc68k_reduced`` ``obs['bulk_labels']``. T-cell subsets are
#: merged by lineage (CD4 regulatory, memory and naive cells -> "CD4 T"; CD8 cytotoxic and naive
#: cytotoxic cells -> "CD8 T"); the other labels keep their lineage under a short name. The merged
#: classes hold between 13 (CD34+ progenitor) and 240 (Dendritic) of the 700 cells.
PBMC_CELL_TYPES: dict[str, str] = {
    "CD19+ B": "B",
    "CD4+/CD25 T Reg": "CD4 T",
    "CD4+/CD45RO+ Memory": "CD4 T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
    "CD8+ Cytotoxic T": "CD8 T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
    "CD56+ NK": "NK",
    "CD14+ Monocyte": "Monocyte",
    "Dendritic": "Dendritic",
    "CD34+": "CD34+ progenitor",
}

#: Order of the coarse PBMC cell types (categories of ``obs['cell_type']``).
PBMC_CELL_TYPE_ORDER: list[str] = ["B", "CD4 T", "CD8 T", "NK", "Monocyte", "Dendritic", "CD34+ progenitor"]

_PBMC_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


# --------------------------------------------------------------------------------------------
# PBMC counts
# --------------------------------------------------------------------------------------------
def pbmc_counts() -> AnnData:
    """Raw counts of the 700 PBMCs bundled with scanpy (``pbmc68k_reduced``), with coarse cell types.

    ``scanpy.datasets.pbmc68k_reduced()`` keeps, in ``.raw``, log-normalised values of 765 genes:
    ``log1p(counts / n_counts * 1e4)`` where ``n_counts`` is each cell's total over all genes of the
    original matrix. Counts are recovered exactly as ``round(expm1(raw.X) * n_counts / 1e4)`` (the
    unrounded values lie within 0.1 of an integer).

    Returns
    -------
    AnnData of 700 cells × 765 genes:

    - ``X``: counts, CSR ``float32``;
    - ``obs['cell_type']``: coarse type from ``obs['bulk_labels']`` through :data:`PBMC_CELL_TYPES`
      (categories in the order of :data:`PBMC_CELL_TYPE_ORDER`), with colours in
      ``uns['cell_type_colors']``;
    - ``obs['bulk_labels']``: the original labels; ``obs['n_counts']``: the original totals over all
      genes; ``obs['total_counts']``: totals over the 765 genes kept;
    - ``obsm['X_umap']``: scanpy's UMAP of the cells.

    Examples
    --------
    >>> import rmge
    >>> adata = rmge.datasets.pbmc_counts()
    >>> int(adata.obs["cell_type"].value_counts()["CD4 T"])
    95
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    logn = sp.csr_matrix(src.raw.X, dtype=np.float64)
    scale = src.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4
    counts = logn.copy()
    counts.data = np.rint(np.expm1(counts.data) * np.repeat(scale, np.diff(counts.indptr)))
    counts.eliminate_zeros()
    counts = counts.astype(np.float32)

    bulk = src.obs["bulk_labels"].astype(str)
    unmapped = sorted(set(bulk) - set(PBMC_CELL_TYPES))
    if unmapped:  # pragma: no cover - guards against a change of the bundled file
        raise RuntimeError(f"pbmc68k_reduced holds labels without a coarse type: {unmapped}")
    cell_type = pd.Categorical(bulk.map(PBMC_CELL_TYPES), categories=PBMC_CELL_TYPE_ORDER)

    obs = pd.DataFrame(
        {
            "cell_type": cell_type,
            "bulk_labels": src.obs["bulk_labels"].to_numpy(),
            "n_counts": src.obs["n_counts"].to_numpy(dtype=np.float64),
            "total_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.float64),
        },
        index=pd.Index(np.asarray(src.obs_names, dtype=str)),
    )
    var = pd.DataFrame(index=pd.Index(np.asarray(src.raw.var_names, dtype=str)))
    adata = AnnData(X=counts, obs=obs, var=var)
    adata.obsm["X_umap"] = np.asarray(src.obsm["X_umap"], dtype=np.float64)
    adata.uns["cell_type_colors"] = list(_PBMC_COLORS)
    return adata


# --------------------------------------------------------------------------------------------
# Simulated Stereo-seq section built from real PBMC cells
# --------------------------------------------------------------------------------------------
def _thinning_scale(bin_counts: sp.csr_matrix, capture: np.ndarray, target: float) -> float:
    """Scale ``s`` such that the median expected bin total under p_g = min(1, s·capture_g) equals ``target``.

    The median of expected totals is monotone in ``s``, so a bisection in log space finds it.
    """
    lo, hi = 1e-8, 1.0 / capture.min()

    def median_total(s: float) -> float:
        p = np.minimum(1.0, s * capture)
        return float(np.median(np.asarray(bin_counts @ p).ravel()))

    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if median_total(mid) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _tissue_mask(xy: np.ndarray, extent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Irregular ellipse covering most of the grid: a rough tissue-section outline."""
    centre = extent / 2.0
    rel = (xy - centre) / (0.49 * extent)
    theta = np.arctan2(rel[:, 1], rel[:, 0])
    phases = rng.uniform(0, 2 * np.pi, size=3)
    radius = 1.0 - 0.05 * (1 + np.sin(2 * theta + phases[0])) - 0.03 * (1 + np.sin(3 * theta + phases[1]))
    radius -= 0.02 * (1 + np.sin(5 * theta + phases[2]))
    return np.hypot(rel[:, 0], rel[:, 1]) <= radius


def _colors_for(categories: Sequence[str]) -> list[str]:
    import matplotlib as mpl

    if list(categories) == PBMC_CELL_TYPE_ORDER:
        return list(_PBMC_COLORS)
    cmap = mpl.colormaps["tab20" if len(categories) > 10 else "tab10"]
    return [mpl.colors.to_hex(cmap(i % cmap.N)) for i in range(len(categories))]


def simulated_stereo_seq(
    seed: int = 0,
    n_reference: int | None = None,
    *,
    grid_shape: tuple[int, int] = (60, 60),
    n_regions: int = 14,
    purity: float = 0.8,
    cells_per_bin: tuple[int, int] = (1, 3),
    target_median_counts: float = 300.0,
    gene_capture_sd: float = 0.3,
    bin_size: float = 50.0,
) -> tuple[AnnData, AnnData]:
    """A reference and a Stereo-seq-like section made from the real PBMC cells of :func:`pbmc_counts`.

    The 700 PBMCs are split per cell type into two halves (stratified). The first half is the
    reference. The second half is the pool of cells the section is built from:

    1. a ``grid_shape`` grid of square bins of side ``bin_size`` is cut to an irregular
       tissue-like outline;
    2. the tissue is divided into ``n_regions`` contiguous regions (Voronoi partition around random
       seed bins); each region gets a dominant cell type (every type gets at least one region when
       ``n_regions`` allows it);
    3. each bin holds between ``cells_per_bin[0]`` and ``cells_per_bin[1]`` cells (uniformly); each
       cell is, with probability ``purity``, of its region's type, else drawn from the whole pool;
       cells are drawn with replacement from the pool cells of the chosen type;
    4. bin counts are the sums of their cells' counts, then binomially thinned with a per-gene
       probability ``min(1, s · capture_g)``, where ``capture_g`` is a log-normal per-gene capture
       factor (sd ``gene_capture_sd``, mean 1; a platform effect) and ``s`` is chosen so that the
       median bin total equals ``target_median_counts``.

    Reference cells hold a median of about 650 counts over the 765 genes; with the default target
    of 300 the bins are about 2× sparser than single reference cells and about 4× sparser than
    the sums of their own cells.

    Parameters
    ----------
    seed
        Seed of every random choice; equal seeds give equal data.
    n_reference
        Number of reference cells, taken per type (stratified) from the reference half; ``None``
        keeps the whole half (350 cells).
    grid_shape
        Rows and columns of the bin grid, before the tissue outline is applied (about 60% of the
        bins fall inside it: about 2,200 bins for the default 60 × 60 grid).
    n_regions
        Number of tissue regions.
    purity
        Probability that a cell of a bin has its region's type.
    cells_per_bin
        Smallest and largest number of cells per bin.
    target_median_counts
        Median total counts of the bins after thinning. Must be below the median of the unthinned
        bin totals.
    gene_capture_sd
        Standard deviation of the log per-gene capture factors of the section (0: none).
    bin_size
        Side of a bin, in the units of ``obsm['spatial']`` (Stereo-seq bin50 spans 50 DNB spots).

    Returns
    -------
    ``(reference, spatial)``, two AnnData objects with counts in ``X`` (CSR ``float32``) and the same
    765 genes.

    - ``reference.obs``: ``cell_type`` (coarse type), ``bulk_labels``, ``total_counts``.
    - ``spatial.obs``: ``cell_type`` (truth: the majority type of the bin's cells, ties broken in
      favour of the region's type, then of the bin's first cell), ``purity`` (fraction of the bin's
      cells of that type), ``n_cells``, ``region``, ``region_type``, ``total_counts``;
      ``spatial.obsm['spatial']``: bin centres; ``spatial.var['capture']``: per-gene capture
      factors; ``spatial.uns['simulation']``: the parameters and the thinning scale ``s``.

    Both share ``uns['cell_type_colors']``.

    Examples
    --------
    >>> import rmge
    >>> reference, spatial = rmge.datasets.simulated_stereo_seq(seed=0)
    >>> reference.n_obs, spatial.obsm["spatial"].shape[1]
    (350, 2)
    """
    rng = np.random.default_rng(seed)
    if not 0.0 <= purity <= 1.0:
        raise ValueError(f"purity must lie in [0, 1], got {purity}.")
    lo_cells, hi_cells = (int(v) for v in cells_per_bin)
    if lo_cells < 1 or hi_cells < lo_cells:
        raise ValueError(f"cells_per_bin must be (min, max) with 1 <= min <= max, got {cells_per_bin}.")
    n_rows, n_cols = (int(v) for v in grid_shape)
    if n_rows < 2 or n_cols < 2:
        raise ValueError(f"grid_shape must have at least 2 rows and 2 columns, got {grid_shape}.")
    if n_regions < 1:
        raise ValueError(f"n_regions must be at least 1, got {n_regions}.")
    if target_median_counts <= 0:
        raise ValueError(f"target_median_counts must be positive, got {target_median_counts}.")
    if gene_capture_sd < 0:
        raise ValueError(f"gene_capture_sd must be >= 0, got {gene_capture_sd}.")

    pbmc = pbmc_counts()
    types = list(pbmc.obs["cell_type"].cat.categories)
    n_types = len(types)
    labels = pbmc.obs["cell_type"].to_numpy()

    # Stratified halves: reference and pool of the section.
    all_idx = np.arange(pbmc.n_obs)
    ref_idx, pool_idx = train_test_split(
        all_idx, test_size=0.5, stratify=labels, random_state=int(rng.integers(2**31 - 1))
    )
    if n_reference is not None:
        n_reference = int(n_reference)
        if not n_types <= n_reference <= len(ref_idx):
            raise ValueError(
                f"n_reference must lie between {n_types} (one cell per type) and {len(ref_idx)} "
                f"(the reference half of the PBMCs), got {n_reference}."
            )
        if n_reference < len(ref_idx):
            ref_idx, _ = train_test_split(
                ref_idx, train_size=n_reference, stratify=labels[ref_idx], random_state=int(rng.integers(2**31 - 1))
            )
    ref_idx = np.sort(ref_idx)
    pool_idx = np.sort(pool_idx)

    reference = pbmc[ref_idx].copy()
    reference.obs = reference.obs[["cell_type", "bulk_labels", "total_counts"]].copy()
    del reference.obsm["X_umap"]

    pool_counts = sp.csr_matrix(pbmc.X[pool_idx], dtype=np.float64)
    pool_type = pbmc.obs["cell_type"].cat.codes.to_numpy()[pool_idx]
    pool_by_type = [np.flatnonzero(pool_type == t) for t in range(n_types)]

    # Grid of bins cut to a tissue outline.
    extent = np.array([n_cols, n_rows], dtype=np.float64) * bin_size
    col, row = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    grid_xy = np.column_stack([(col.ravel() + 0.5) * bin_size, (row.ravel() + 0.5) * bin_size])
    inside = _tissue_mask(grid_xy, extent, rng)
    xy = grid_xy[inside]
    grid_rc = np.column_stack([row.ravel(), col.ravel()])[inside]
    n_bins = xy.shape[0]
    if n_bins < n_regions:
        raise ValueError(f"The grid holds {n_bins} tissue bins, fewer than n_regions={n_regions}; enlarge grid_shape.")

    # Voronoi regions around random seed bins; nearest seed = the Voronoi cell of each bin.
    seeds = xy[rng.choice(n_bins, size=n_regions, replace=False)]
    _, region = cKDTree(seeds).query(xy)
    region = np.asarray(region, dtype=np.int64)
    if n_regions >= n_types:
        region_type = np.concatenate([rng.permutation(n_types), rng.integers(0, n_types, n_regions - n_types)])
        region_type = region_type[rng.permutation(n_regions)]
    else:
        region_type = rng.choice(n_types, size=n_regions, replace=False)
    bin_region_type = region_type[region]

    # Cells of each bin.
    n_cells = rng.integers(lo_cells, hi_cells + 1, size=n_bins)
    slot_bin = np.repeat(np.arange(n_bins), n_cells)
    n_slots = slot_bin.size
    own = rng.random(n_slots) < purity
    slot_cell = np.empty(n_slots, dtype=np.int64)
    # Mixed-in cells come from the whole pool; region cells from the pool cells of the region's type.
    mixed = np.flatnonzero(~own)
    slot_cell[mixed] = rng.integers(0, len(pool_idx), size=mixed.size)
    slot_region_type = bin_region_type[slot_bin]
    for t in range(n_types):
        sel = np.flatnonzero(own & (slot_region_type == t))
        slot_cell[sel] = pool_by_type[t][rng.integers(0, len(pool_by_type[t]), size=sel.size)]
    slot_type = pool_type[slot_cell]

    membership = sp.csr_matrix(
        (np.ones(n_slots), (slot_bin, slot_cell)), shape=(n_bins, len(pool_idx))
    )  # duplicates are summed: a cell drawn twice counts twice
    bin_counts = sp.csr_matrix(membership @ pool_counts)

    # Truth: majority type; ties go to the region's type, then to the first cell's type.
    type_counts = np.zeros((n_bins, n_types))
    np.add.at(type_counts, (slot_bin, slot_type), 1.0)
    first_slot = np.concatenate([[0], np.cumsum(n_cells)[:-1]])
    score = 4.0 * type_counts
    score[np.arange(n_bins), bin_region_type] += 2.0
    score[np.arange(n_bins), slot_type[first_slot]] += 1.0
    truth = score.argmax(axis=1)
    bin_purity = type_counts[np.arange(n_bins), truth] / n_cells

    # Thinning to Stereo-seq-like depth with per-gene capture factors.
    n_genes = pbmc.n_vars
    if gene_capture_sd > 0:
        capture = rng.lognormal(0.0, gene_capture_sd, size=n_genes)
        capture /= capture.mean()
    else:
        capture = np.ones(n_genes)
    unthinned_median = float(np.median(np.asarray(bin_counts.sum(axis=1)).ravel()))
    if target_median_counts >= unthinned_median:
        raise ValueError(
            f"target_median_counts={target_median_counts} is not below the median total of the unthinned bins "
            f"({unthinned_median:.0f}); choose a smaller target or more cells per bin."
        )
    scale = _thinning_scale(bin_counts, capture, float(target_median_counts))
    p_gene = np.minimum(1.0, scale * capture)
    thinned = bin_counts.copy()
    thinned.data = rng.binomial(np.rint(thinned.data).astype(np.int64), p_gene[thinned.indices]).astype(np.float64)
    thinned.eliminate_zeros()
    X = thinned.astype(np.float32)

    n_digits = len(str(n_regions - 1))
    region_names = [f"R{i:0{n_digits}d}" for i in range(n_regions)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(truth, categories=types),
            "purity": bin_purity,
            "n_cells": n_cells.astype(np.int64),
            "region": pd.Categorical.from_codes(region, categories=region_names),
            "region_type": pd.Categorical.from_codes(bin_region_type, categories=types),
            "total_counts": np.asarray(X.sum(axis=1), dtype=np.float64).ravel(),
        },
        index=pd.Index([f"bin_{r}_{c}" for r, c in grid_rc], name=None),
    )
    var = pd.DataFrame({"capture": capture}, index=pbmc.var_names.copy())
    spatial = AnnData(X=X, obs=obs, var=var)
    spatial.obsm["spatial"] = xy
    colors = _colors_for(types)
    spatial.uns["cell_type_colors"] = list(colors)
    spatial.uns["region_type_colors"] = list(colors)
    reference.uns["cell_type_colors"] = list(colors)
    spatial.uns["simulation"] = {
        "seed": seed,
        "n_reference": reference.n_obs,
        "n_pool_cells": len(pool_idx),
        "grid_shape": [n_rows, n_cols],
        "n_regions": n_regions,
        "purity": purity,
        "cells_per_bin": [lo_cells, hi_cells],
        "target_median_counts": float(target_median_counts),
        "gene_capture_sd": float(gene_capture_sd),
        "bin_size": float(bin_size),
        "thinning_scale": float(scale),
        "unthinned_median_counts": unthinned_median,
    }
    return reference, spatial


# --------------------------------------------------------------------------------------------
# Purely synthetic data
# --------------------------------------------------------------------------------------------
def _class_sizes(n: int, weights: np.ndarray) -> np.ndarray:
    """Cells per class: proportional to ``weights`` (largest remainders), at least one each when possible."""
    k = len(weights)
    if n >= k:
        sizes = np.ones(k, dtype=np.int64)
        rest = n - k
    else:
        sizes = np.zeros(k, dtype=np.int64)
        rest = n
    raw = weights * rest
    extra = np.floor(raw).astype(np.int64)
    remainder = rest - extra.sum()
    if remainder > 0:
        extra[np.argsort(-(raw - extra), kind="stable")[:remainder]] += 1
    return sizes + extra


def _nb_counts(
    profiles: np.ndarray,
    codes: np.ndarray,
    library: np.ndarray,
    dispersion: float | None,
    rng: np.random.Generator,
    max_block_entries: int = 2_000_000,
) -> sp.csr_matrix:
    """Negative-binomial counts (gamma-Poisson), generated in dense row blocks and stored as CSR."""
    n, n_genes = len(codes), profiles.shape[1]
    rows_per_block = max(1, max_block_entries // max(1, n_genes))
    blocks = []
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        mu = library[start:stop, None] * profiles[codes[start:stop]]
        if dispersion is not None:
            mu *= rng.gamma(dispersion, 1.0 / dispersion, size=mu.shape)
        counts = rng.poisson(mu).ravel()
        # CSR straight from the flat non-zero positions (row-major), faster than scipy's dense conversion.
        flat = np.flatnonzero(counts)
        indptr = np.searchsorted(flat, np.arange(stop - start + 1) * n_genes)
        blocks.append(
            sp.csr_matrix(
                (counts[flat].astype(np.float32), (flat % n_genes).astype(np.int32), indptr.astype(np.int64)),
                shape=(stop - start, n_genes),
            )
        )
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def synthetic(
    n_reference: int = 2_000,
    n_spatial: int = 2_000,
    n_genes: int = 500,
    n_classes: int = 6,
    spatial_depth_ratio: float = 0.1,
    seed: int = 0,
    *,
    reference_median_counts: float = 2_000.0,
    n_markers: int | None = None,
    marker_fold: float = 5.0,
    platform_shift: float = 0.5,
    dispersion: float | None = 5.0,
    class_imbalance: float = 0.5,
    spatial_extent: float = 1_000.0,
) -> tuple[AnnData, AnnData]:
    """Synthetic reference and spatial datasets with known cell types and marker genes.

    Counts follow a negative-binomial (gamma-Poisson) model. Each gene has a base rate (log-normal);
    each class up-regulates its own ``n_markers`` marker genes by about ``marker_fold`` (a class-specific
    gene program). Each platform multiplies genes by its own capture factors (log-normal with sd
    ``platform_shift``, mean 1) - a per-gene shift between reference and spatial data. Per-cell
    library sizes are log-normal with median ``reference_median_counts`` (reference) and
    ``reference_median_counts * spatial_depth_ratio`` (spatial). Class proportions differ between
    the two datasets. Spatial cells of a class sit in two Gaussian patches (centred in distinct cells
    of a grid over the section), so classes cluster in space.

    Data are generated in row blocks and stored as CSR, so millions of cells can be made without a
    large dense array.

    Parameters
    ----------
    n_reference, n_spatial
        Numbers of reference and spatial cells.
    n_genes
        Number of genes.
    n_classes
        Number of cell types (``"type_0"``, ``"type_1"``, ...).
    spatial_depth_ratio
        Ratio of the spatial to the reference median library size (e.g. 0.1: spatial cells hold ten
        times fewer counts).
    seed
        Seed of every random draw; equal seeds give equal data.
    reference_median_counts
        Median library size of reference cells.
    n_markers
        Marker genes per class; ``None`` gives ``max(1, n_genes // (4 * n_classes))``. Markers of
        different classes are distinct when ``n_markers * n_classes <= n_genes``.
    marker_fold
        Typical fold change of a marker gene in its class.
    platform_shift
        Standard deviation of the log per-gene capture factors of each platform (0: none).
    dispersion
        Inverse overdispersion ``theta`` of the negative binomial (variance ``mu + mu^2/theta``);
        ``None`` gives Poisson counts.
    class_imbalance
        0 gives equal class proportions; up to 1, proportions are drawn increasingly from a flat
        Dirichlet distribution, independently for the two datasets.
    spatial_extent
        Side of the square holding the spatial coordinates.

    Returns
    -------
    ``(reference, spatial)``: AnnData objects with counts in ``X`` (CSR ``float32``) and the same
    genes. Both have ``obs['cell_type']`` (truth, same categories) and ``obs['total_counts']``;
    ``var['marker_of']`` names the class a gene marks (empty string for other genes) and
    ``var['capture']`` holds the platform's capture factors; ``spatial.obsm['spatial']`` holds the
    coordinates; ``uns['synthetic']`` the parameters.

    Examples
    --------
    >>> import rmge
    >>> reference, spatial = rmge.datasets.synthetic(n_reference=500, n_spatial=300, n_genes=100, seed=1)
    >>> reference.shape, spatial.shape
    ((500, 100), (300, 100))
    """
    for name, value, low in (
        ("n_reference", n_reference, 0),
        ("n_spatial", n_spatial, 0),
        ("n_genes", n_genes, 1),
        ("n_classes", n_classes, 2),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    n_reference, n_spatial, n_genes, n_classes = int(n_reference), int(n_spatial), int(n_genes), int(n_classes)
    if n_genes < n_classes:
        raise ValueError(f"n_genes ({n_genes}) must be at least n_classes ({n_classes}): each class needs a marker.")
    if spatial_depth_ratio <= 0:
        raise ValueError(f"spatial_depth_ratio must be positive, got {spatial_depth_ratio}.")
    if reference_median_counts <= 0:
        raise ValueError(f"reference_median_counts must be positive, got {reference_median_counts}.")
    if marker_fold < 1:
        raise ValueError(f"marker_fold must be >= 1, got {marker_fold}.")
    if platform_shift < 0:
        raise ValueError(f"platform_shift must be >= 0, got {platform_shift}.")
    if dispersion is not None and dispersion <= 0:
        raise ValueError(f"dispersion must be positive or None (Poisson), got {dispersion}.")
    if not 0.0 <= class_imbalance <= 1.0:
        raise ValueError(f"class_imbalance must lie in [0, 1], got {class_imbalance}.")
    if n_markers is None:
        n_markers = max(1, n_genes // (4 * n_classes))
    if n_markers < 1:
        raise ValueError(f"n_markers must be at least 1, got {n_markers}.")

    rng = np.random.default_rng(seed)
    classes = [f"type_{k}" for k in range(n_classes)]
    genes = [f"gene_{g:0{len(str(n_genes - 1))}d}" for g in range(n_genes)]

    # Class-specific gene programs.
    base = rng.lognormal(0.0, 1.0, size=n_genes)
    fold = np.ones((n_classes, n_genes))
    marker_of = np.full(n_genes, "", dtype=object)
    distinct = n_markers * n_classes <= n_genes
    if distinct:
        chosen = rng.permutation(n_genes)[: n_markers * n_classes].reshape(n_classes, n_markers)
    else:
        chosen = np.stack([rng.choice(n_genes, size=min(n_markers, n_genes), replace=False) for _ in range(n_classes)])
    for k in range(n_classes):
        fold[k, chosen[k]] = marker_fold * rng.lognormal(0.0, 0.25, size=chosen.shape[1])
        marker_of[chosen[k]] = classes[k]  # with overlapping markers, the last class wins the label
    program = base * fold  # classes × genes

    def capture_factors() -> np.ndarray:
        if platform_shift == 0:
            return np.ones(n_genes)
        c = rng.lognormal(0.0, platform_shift, size=n_genes)
        return c / c.mean()

    def proportions() -> np.ndarray:
        w = (1 - class_imbalance) / n_classes + class_imbalance * rng.dirichlet(np.ones(n_classes))
        return w / w.sum()

    def make(n: int, capture: np.ndarray, median: float, domain: str) -> AnnData:
        profiles = program * capture
        profiles /= profiles.sum(axis=1, keepdims=True)
        sizes = _class_sizes(n, proportions())
        codes = rng.permutation(np.repeat(np.arange(n_classes), sizes))
        library = median * rng.lognormal(0.0, 0.4, size=n)
        X = _nb_counts(profiles, codes, library, dispersion, rng)
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(codes, categories=classes),
                "total_counts": np.asarray(X.sum(axis=1), dtype=np.float64).ravel(),
            },
            index=pd.Index([f"{domain}_{i}" for i in range(n)]),
        )
        var = pd.DataFrame({"marker_of": marker_of.astype(str), "capture": capture}, index=pd.Index(genes))
        adata = AnnData(X=X, obs=obs, var=var)
        adata.uns["cell_type_colors"] = _colors_for(classes)
        return adata

    reference = make(n_reference, capture_factors(), reference_median_counts, "ref")
    spatial = make(n_spatial, capture_factors(), reference_median_counts * spatial_depth_ratio, "spatial")

    # Spatial layout: each class occupies two Gaussian patches centred in distinct cells of a
    # jittered grid, so patches of different classes barely overlap.
    side = math.ceil(math.sqrt(2 * n_classes))
    width = spatial_extent / side
    slots = rng.permutation(side * side)[: 2 * n_classes]
    centres = np.column_stack([slots % side, slots // side]) * width + width / 2
    centres += rng.uniform(-0.15 * width, 0.15 * width, size=centres.shape)
    centres = centres.reshape(n_classes, 2, 2)
    codes = spatial.obs["cell_type"].cat.codes.to_numpy()
    patch = rng.integers(0, 2, size=n_spatial)
    xy = centres[codes, patch] + rng.normal(0.0, width / 4.0, size=(n_spatial, 2))
    spatial.obsm["spatial"] = np.clip(xy, 0.0, spatial_extent)

    params = {
        "seed": seed,
        "n_reference": n_reference,
        "n_spatial": n_spatial,
        "n_genes": n_genes,
        "n_classes": n_classes,
        "spatial_depth_ratio": float(spatial_depth_ratio),
        "reference_median_counts": float(reference_median_counts),
        "n_markers": int(n_markers),
        "marker_fold": float(marker_fold),
        "platform_shift": float(platform_shift),
        "dispersion": "poisson" if dispersion is None else float(dispersion),
        "class_imbalance": float(class_imbalance),
    }
    reference.uns["synthetic"] = dict(params)
    spatial.uns["synthetic"] = dict(params)
    return reference, spatial
