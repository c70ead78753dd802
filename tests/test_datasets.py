import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import rmge
from rmge.datasets import PBMC_CELL_TYPE_ORDER, PBMC_CELL_TYPES

PBMC_TYPE_COUNTS = {
    "B": 95,
    "CD4 T": 95,
    "CD8 T": 97,
    "NK": 31,
    "Monocyte": 129,
    "Dendritic": 240,
    "CD34+ progenitor": 13,
}


def _is_integral(X) -> bool:
    v = X.data if sp.issparse(X) else np.asarray(X)
    return bool(np.all(v == np.round(v)) and np.all(v >= 0))


@pytest.fixture(scope="module")
def pbmc():
    return rmge.datasets.pbmc_counts()


@pytest.fixture(scope="module")
def stereo():
    return rmge.datasets.simulated_stereo_seq(seed=0)


@pytest.fixture(scope="module")
def synth():
    return rmge.datasets.synthetic(seed=0)


# ---------------------------------------------------------------------------------------------
# pbmc_counts
# ---------------------------------------------------------------------------------------------
def test_pbmc_counts_shape_types_and_labels(pbmc):
    assert pbmc.shape == (700, 765)
    assert sp.isspmatrix_csr(pbmc.X) or isinstance(pbmc.X, sp.csr_array)
    assert pbmc.X.dtype == np.float32
    assert _is_integral(pbmc.X)
    assert list(pbmc.obs["cell_type"].cat.categories) == PBMC_CELL_TYPE_ORDER
    assert pbmc.obs["cell_type"].value_counts().to_dict() == PBMC_TYPE_COUNTS
    assert not pbmc.obs["cell_type"].isna().any()
    # Every fine label maps to the coarse type given by the documented map.
    mapped = pbmc.obs["bulk_labels"].astype(str).map(PBMC_CELL_TYPES)
    assert (mapped.to_numpy() == pbmc.obs["cell_type"].astype(str).to_numpy()).all()
    np.testing.assert_allclose(pbmc.obs["total_counts"], np.asarray(pbmc.X.sum(axis=1)).ravel())
    assert len(pbmc.uns["cell_type_colors"]) == len(PBMC_CELL_TYPE_ORDER)


def test_pbmc_counts_recovery_is_integral_and_round_trips(pbmc):
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(src.raw.X, dtype=np.float64)
    scale = np.repeat(src.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4, np.diff(raw.indptr))
    unrounded = np.expm1(raw.data) * scale
    # The recovered values are counts: every one lies close to an integer >= 1.
    assert np.abs(unrounded - np.rint(unrounded)).max() < 0.1
    assert np.rint(unrounded).min() >= 1
    # Round trip: normalising the counts again gives back scanpy's stored values.
    counts = sp.csr_matrix(pbmc.X, dtype=np.float64)
    assert list(pbmc.var_names) == list(src.raw.var_names)
    renorm = counts.multiply(1e4 / src.obs["n_counts"].to_numpy()[:, None]).tocsr()
    renorm.data = np.log1p(renorm.data)
    assert abs(renorm - raw).max() < 1e-3


# ---------------------------------------------------------------------------------------------
# simulated_stereo_seq
# ---------------------------------------------------------------------------------------------
def test_stereo_shapes_and_counts(stereo, pbmc):
    reference, spatial = stereo
    assert reference.shape == (350, 765)
    assert 2_000 <= spatial.n_obs <= 4_000
    assert list(reference.var_names) == list(spatial.var_names) == list(pbmc.var_names)
    for adata in (reference, spatial):
        assert sp.issparse(adata.X) and adata.X.format == "csr"
        assert adata.X.dtype == np.float32
        assert _is_integral(adata.X)
    assert spatial.obsm["spatial"].shape == (spatial.n_obs, 2)
    # Reference cells are real PBMCs with their own counts.
    assert set(reference.obs_names) <= set(pbmc.obs_names)
    rows = pbmc.obs_names.get_indexer(reference.obs_names)
    assert abs(reference.X - pbmc.X[rows]).max() == 0
    np.testing.assert_array_equal(reference.obs["cell_type"].to_numpy(), pbmc.obs["cell_type"].to_numpy()[rows])


def test_stereo_split_is_stratified_half(stereo):
    reference, _ = stereo
    counts = reference.obs["cell_type"].value_counts().to_dict()
    for t, n in PBMC_TYPE_COUNTS.items():
        assert abs(counts[t] - n / 2) <= 1, t


def test_stereo_truth_columns(stereo):
    _, spatial = stereo
    obs = spatial.obs
    assert list(obs["cell_type"].cat.categories) == PBMC_CELL_TYPE_ORDER
    assert not obs["cell_type"].isna().any()
    assert set(obs["n_cells"].unique()) == {1, 2, 3}
    # Truth is the majority type: it covers at least a third of a bin's cells, all of a 1-cell bin's.
    assert (obs["purity"] >= 1 / 3 - 1e-12).all() and (obs["purity"] <= 1).all()
    assert (obs.loc[obs["n_cells"] == 1, "purity"] == 1).all()
    assert (obs.loc[obs["n_cells"] == 2, "purity"].isin([0.5, 1.0])).all()
    # With purity 0.8 most bins carry their region's type; every type occurs.
    agree = (obs["cell_type"].astype(str) == obs["region_type"].astype(str)).mean()
    assert 0.8 < agree < 1.0
    assert set(obs["cell_type"].unique()) == set(PBMC_CELL_TYPE_ORDER)
    assert obs["region"].nunique() == 14


def test_stereo_pure_bins_known_answer():
    _, spatial = rmge.datasets.simulated_stereo_seq(seed=3, purity=1.0, cells_per_bin=(1, 1), target_median_counts=200)
    obs = spatial.obs
    # One cell per bin, always of the region's type: truth equals region type everywhere.
    assert (obs["n_cells"] == 1).all()
    assert (obs["purity"] == 1).all()
    assert (obs["cell_type"].astype(str) == obs["region_type"].astype(str)).all()
    assert abs(np.median(obs["total_counts"]) - 200) <= 20


@pytest.mark.parametrize("target", [300, 120])
def test_stereo_thinning_hits_target_median(target, stereo):
    if target == 300:
        reference, spatial = stereo
    else:
        reference, spatial = rmge.datasets.simulated_stereo_seq(seed=1, target_median_counts=target)
    median = np.median(np.asarray(spatial.X.sum(axis=1)).ravel())
    assert abs(median - target) <= 0.1 * target
    # The section is sparser than the reference cells.
    assert median < np.median(np.asarray(reference.X.sum(axis=1)).ravel())
    sim = spatial.uns["simulation"]
    assert sim["unthinned_median_counts"] > target
    assert np.isclose(spatial.var["capture"].mean(), 1.0)


def test_stereo_regions_are_contiguous(stereo):
    _, spatial = stereo
    xy = spatial.obsm["spatial"]
    _, nn = cKDTree(xy).query(xy, k=5)
    region = spatial.obs["region"].cat.codes.to_numpy()
    same = (region[nn[:, 1:]] == region[:, None]).mean()
    assert same > 0.85
    # Bins sit on a grid of step bin_size.
    step = spatial.uns["simulation"]["bin_size"]
    np.testing.assert_allclose((xy / step - 0.5) % 1, 0, atol=1e-9)


def test_stereo_is_deterministic(stereo):
    reference, spatial = stereo
    reference2, spatial2 = rmge.datasets.simulated_stereo_seq(seed=0)
    assert list(reference.obs_names) == list(reference2.obs_names)
    assert abs(spatial.X - spatial2.X).max() == 0
    assert spatial.obs.equals(spatial2.obs)
    np.testing.assert_array_equal(spatial.obsm["spatial"], spatial2.obsm["spatial"])
    reference3, spatial3 = rmge.datasets.simulated_stereo_seq(seed=5)
    assert list(reference.obs_names) != list(reference3.obs_names)
    assert spatial.shape != spatial3.shape or abs(spatial.X - spatial3.X).max() > 0


def test_stereo_n_reference_subsamples_per_type():
    reference, _ = rmge.datasets.simulated_stereo_seq(seed=0, n_reference=70)
    assert reference.n_obs == 70
    assert set(reference.obs["cell_type"].unique()) == set(PBMC_CELL_TYPE_ORDER)


def test_stereo_bad_arguments():
    with pytest.raises(ValueError, match="n_reference must lie between 7 .* and 350"):
        rmge.datasets.simulated_stereo_seq(n_reference=1_000)
    with pytest.raises(ValueError, match="target_median_counts=5000 is not below the median total"):
        rmge.datasets.simulated_stereo_seq(target_median_counts=5000)
    with pytest.raises(ValueError, match="purity must lie in"):
        rmge.datasets.simulated_stereo_seq(purity=1.5)
    with pytest.raises(ValueError, match="cells_per_bin"):
        rmge.datasets.simulated_stereo_seq(cells_per_bin=(3, 1))


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_shapes_sparsity_and_truth(synth):
    reference, spatial = synth
    assert reference.shape == (2_000, 500) and spatial.shape == (2_000, 500)
    assert list(reference.var_names) == list(spatial.var_names)
    for adata in (reference, spatial):
        assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
        assert _is_integral(adata.X)
        assert list(adata.obs["cell_type"].cat.categories) == [f"type_{k}" for k in range(6)]
        assert adata.obs["cell_type"].nunique() == 6
    assert spatial.obsm["spatial"].shape == (2_000, 2)
    ref_median = np.median(np.asarray(reference.X.sum(axis=1)).ravel())
    sp_median = np.median(np.asarray(spatial.X.sum(axis=1)).ravel())
    assert abs(ref_median - 2_000) < 0.15 * 2_000
    assert 0.08 < sp_median / ref_median < 0.12
    # Platform shift: each side has its own capture factors (mean 1).
    assert np.isclose(reference.var["capture"].mean(), 1) and np.isclose(spatial.var["capture"].mean(), 1)
    assert np.corrcoef(np.log(reference.var["capture"]), np.log(spatial.var["capture"]))[0, 1] < 0.5


def test_synthetic_markers_mark_their_class(synth):
    reference, spatial = synth
    for adata in (reference, spatial):
        X = adata.X.tocsc()
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        for cls in adata.obs["cell_type"].cat.categories:
            markers = np.flatnonzero(adata.var["marker_of"].to_numpy() == cls)
            assert len(markers) == 500 // 24
            expr = np.asarray(X[:, markers].sum(axis=1)).ravel() / np.asarray(adata.X.sum(axis=1)).ravel().clip(1)
            assert expr[labels == cls].mean() > 2 * expr[labels != cls].mean()


def test_synthetic_is_learnable_by_a_centroid_classifier(synth):
    """Known answer for model tests: class centroids of the reference label the spatial cells well."""
    reference, spatial = synth

    def standardised_log(adata):
        X = sp.csr_matrix(adata.X, dtype=np.float64)
        lib = np.asarray(X.sum(axis=1)).ravel().clip(1)
        Y = (X.multiply(1e4 / lib[:, None])).tocsr()
        Y.data = np.log1p(Y.data)
        Y = Y.toarray()  # 2,000 × 500: small test data
        return (Y - Y.mean(0)) / (Y.std(0) + 1e-6)

    Xr, Xs = standardised_log(reference), standardised_log(spatial)
    classes = reference.obs["cell_type"].cat.categories
    centroids = np.stack([Xr[reference.obs["cell_type"].to_numpy() == c].mean(0) for c in classes])
    centroids -= centroids.mean(1, keepdims=True)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    Xs -= Xs.mean(1, keepdims=True)
    Xs /= np.linalg.norm(Xs, axis=1, keepdims=True) + 1e-9
    pred = np.asarray(classes)[(Xs @ centroids.T).argmax(1)]
    assert (pred == spatial.obs["cell_type"].astype(str).to_numpy()).mean() >= 0.9


def test_synthetic_classes_cluster_in_space(synth):
    _, spatial = synth
    xy = spatial.obsm["spatial"]
    _, nn = cKDTree(xy).query(xy, k=2)
    codes = spatial.obs["cell_type"].cat.codes.to_numpy()
    assert (codes[nn[:, 1]] == codes).mean() > 0.8  # chance level is about 1/6


def test_synthetic_is_deterministic_and_blockwise():
    a = rmge.datasets.synthetic(n_reference=300, n_spatial=3_000, n_genes=1_000, n_classes=4, seed=7)
    b = rmge.datasets.synthetic(n_reference=300, n_spatial=3_000, n_genes=1_000, n_classes=4, seed=7)
    c = rmge.datasets.synthetic(n_reference=300, n_spatial=3_000, n_genes=1_000, n_classes=4, seed=8)
    for x, y in zip(a, b, strict=True):
        assert abs(x.X - y.X).max() == 0
        assert x.obs.equals(y.obs)
    assert abs(a[1].X - c[1].X).max() > 0
    # 3,000 × 1,000 spans several generation blocks; every row holds counts.
    assert a[1].shape == (3_000, 1_000)
    assert (np.asarray(a[1].X.sum(axis=1)).ravel() > 0).all()


def test_synthetic_poisson_and_small_sizes():
    reference, spatial = rmge.datasets.synthetic(n_reference=3, n_spatial=0, n_genes=5, n_classes=3, dispersion=None)
    assert reference.shape == (3, 5) and spatial.shape == (0, 5)
    assert sorted(reference.obs["cell_type"].astype(str)) == ["type_0", "type_1", "type_2"]


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        rmge.datasets.synthetic(n_classes=1)
    with pytest.raises(ValueError, match=r"n_genes \(3\) must be at least n_classes \(6\)"):
        rmge.datasets.synthetic(n_genes=3)
    with pytest.raises(ValueError, match="spatial_depth_ratio must be positive"):
        rmge.datasets.synthetic(spatial_depth_ratio=0)
    with pytest.raises(ValueError, match="dispersion must be positive or None"):
        rmge.datasets.synthetic(dispersion=0)
