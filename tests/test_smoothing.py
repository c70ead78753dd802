import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from rmge.tl import smooth_probabilities, spatial_neighbors

DATA = Path(os.environ.get("RMGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MERFISH = DATA / "moffitt2018_hypothalamus_merfish_query.h5ad"
CLASSES = ["c0", "c1", "c2", "c3"]


def _regions(side=40, seed=0, signal=0.8):
    """A grid split in 4 contiguous quadrants (one class each) and noisy probabilities of the true class."""
    rng = np.random.default_rng(seed)
    # a jittered grid: no ties between neighbour distances
    xy = np.array([(x, y) for x in range(side) for y in range(side)], dtype=float) + rng.uniform(
        -0.2, 0.2, (side**2, 2)
    )
    truth = (xy[:, 0] >= side / 2).astype(int) * 2 + (xy[:, 1] >= side / 2).astype(int)
    logits = signal * np.eye(4)[truth] + rng.normal(0, 1, (len(xy), 4))
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    names = [f"s{i}" for i in range(len(xy))]
    adata = ad.AnnData(obs=pd.DataFrame(index=names))
    adata.obsm["spatial"] = xy
    return adata, pd.DataFrame(p, index=names, columns=CLASSES), truth


def test_smoothing_raises_accuracy_and_keeps_probabilities():
    adata, probs, truth = _regions()
    before = (probs.to_numpy().argmax(1) == truth).mean()
    smoothed = smooth_probabilities(adata, probs, n_neighbors=8, alpha=0.5)
    after = (smoothed.to_numpy().argmax(1) == truth).mean()
    assert before < 0.6
    assert after > before + 0.15
    assert isinstance(smoothed, pd.DataFrame)
    assert smoothed.index.equals(probs.index) and smoothed.columns.equals(probs.columns)
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0)
    assert (smoothed.to_numpy() >= 0).all()
    # more passes reach further and help more on large regions
    again = smooth_probabilities(adata, probs, n_neighbors=8, alpha=0.5, n_iterations=3)
    assert (again.to_numpy().argmax(1) == truth).mean() > after
    # alpha = 0 changes nothing
    np.testing.assert_allclose(smooth_probabilities(adata, probs, alpha=0.0), probs)


def test_smoothing_formula_on_a_line():
    # cells at x = 0, 1, 10: with one neighbour, 0 <-> 1 and 10 -> 1
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b", "c"]))
    adata.obsm["xy"] = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    p = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = smooth_probabilities(adata, p, spatial_key="xy", n_neighbors=1, alpha=0.25)
    expected = 0.75 * p + 0.25 * p[[1, 0, 1]]
    np.testing.assert_allclose(out, expected)
    assert isinstance(out, np.ndarray)
    # a cell to fill takes its neighbours' probabilities alone; the others are smoothed as before
    filled = smooth_probabilities(adata, p, spatial_key="xy", n_neighbors=1, alpha=0.25, fill=np.array([0, 0, 1], bool))
    np.testing.assert_allclose(filled, np.vstack([expected[:2], p[1]]))
    with pytest.raises(ValueError, match="`fill` must be a boolean mask with one entry per row"):
        smooth_probabilities(adata, p, spatial_key="xy", fill=np.array([1, 0]))


def test_sections_are_smoothed_apart():
    # two sections with the same coordinates and opposite (spatially constant) probabilities
    side = 10
    xy = np.array([(x, y) for x in range(side) for y in range(side)], dtype=float)
    n = len(xy)
    adata = ad.AnnData(obs=pd.DataFrame({"section": ["A"] * n + ["B"] * n}, index=[f"c{i}" for i in range(2 * n)]))
    adata.obsm["spatial"] = np.vstack([xy, xy])
    p = np.vstack([np.tile([0.9, 0.1], (n, 1)), np.tile([0.1, 0.9], (n, 1))])
    within = smooth_probabilities(adata, p, batch_key="section")
    np.testing.assert_allclose(within, p)  # every neighbour agrees with the cell
    mixed = smooth_probabilities(adata, p)
    assert np.abs(mixed - p).max() > 0.1  # without the section column, coincident cells mix


def test_cells_without_coordinates_and_subsets():
    adata, probs, truth = _regions(side=20)
    # add reference-like cells without coordinates, as rmge.pp.prepare writes them
    ref = ad.AnnData(obs=pd.DataFrame(index=[f"r{i}" for i in range(5)]))
    ref.obsm["spatial"] = np.full((5, 2), np.nan)
    both = ad.concat([ref, adata])
    ref_probs = pd.DataFrame(np.full((5, 4), 0.25), index=ref.obs_names, columns=CLASSES)
    full = pd.concat([ref_probs, probs])
    out = smooth_probabilities(both, full)
    np.testing.assert_allclose(out.loc[ref.obs_names], ref_probs)
    np.testing.assert_allclose(out.loc[adata.obs_names], smooth_probabilities(adata, probs))
    # a shuffled subset of the spatial cells: same answer as smoothing that subset alone
    sub = probs.sample(frac=1.0, random_state=1)
    np.testing.assert_allclose(smooth_probabilities(both, sub).loc[probs.index], smooth_probabilities(adata, probs))


def test_spatial_neighbors_graph():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2))
    sections = np.repeat(["a", "b", "c"], [150, 148, 2])
    A = spatial_neighbors(xy, n_neighbors=6, sections=sections)
    assert sp.issparse(A) and A.format == "csr" and A.shape == (300, 300)
    assert A.diagonal().sum() == 0
    deg = np.diff(A.indptr)
    assert (deg[:298] == 6).all() and (deg[298:] == 1).all()  # a 2-cell section: each cell has the other
    np.testing.assert_allclose(np.asarray(A.sum(axis=1)).ravel(), 1.0)
    r, c = A.nonzero()
    assert (sections[r] == sections[c]).all()
    # the neighbours are the nearest cells of the section
    d = np.linalg.norm(xy[:150, None] - xy[None, :150], axis=2)
    np.fill_diagonal(d, np.inf)
    nearest = np.sort(np.argsort(d, axis=1)[:, :6], axis=1)
    np.testing.assert_array_equal(np.sort(A[:150, :150].tolil().rows.tolist(), axis=1), nearest)


def test_smoothing_bad_inputs():
    adata, probs, _ = _regions(side=6)
    with pytest.raises(KeyError, match=r"adata.obsm has no key 'coords'"):
        smooth_probabilities(adata, probs, spatial_key="coords")
    with pytest.raises(KeyError, match=r"Section column 'sample' not found"):
        smooth_probabilities(adata, probs, batch_key="sample")
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        smooth_probabilities(adata, probs, alpha=1.5)
    with pytest.raises(ValueError, match=r"`n_neighbors` must be a positive integer"):
        smooth_probabilities(adata, probs, n_neighbors=0)
    with pytest.raises(ValueError, match=r"one row per cell of adata \(36\), got shape \(5, 4\)"):
        smooth_probabilities(adata, probs.to_numpy()[:5])
    with pytest.raises(ValueError, match=r"Rows of `probabilities` must sum to 1"):
        smooth_probabilities(adata, probs * 2)
    renamed = probs.rename(index={"s0": "ghost"})
    with pytest.raises(ValueError, match=r"1 row\(s\) of `probabilities` name cells not in adata.obs_names"):
        smooth_probabilities(adata, renamed)
    adata.obsm["spatial"] = np.full((adata.n_obs, 2), np.nan)
    with pytest.raises(ValueError, match=r"None of the cells has finite coordinates"):
        smooth_probabilities(adata, probs)


@pytest.mark.realdata
@pytest.mark.skipif(not MERFISH.exists(), reason="real data folder ../shared/data not present")
def test_smoothing_on_merfish_layout():
    """On the real MERFISH sections, smoothing noisy one-hot author labels recovers more of them."""
    q = ad.read_h5ad(MERFISH)
    truth = pd.Categorical(q.obs["Cell_class"].astype(str))
    rng = np.random.default_rng(0)
    n_cls = len(truth.categories)
    logits = 1.0 * np.eye(n_cls)[truth.codes] + rng.normal(0, 1, (q.n_obs, n_cls))
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    before = (p.argmax(1) == truth.codes).mean()
    out = smooth_probabilities(q, p, batch_key="samples")
    after = (out.argmax(1) == truth.codes).mean()
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert after > before
