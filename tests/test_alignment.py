"""Tests of rmge.tl.alignment_metrics: scib-metrics scores of domain mixing and cell-type separation."""

from __future__ import annotations

import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import rmge
from rmge import RMGEModel
from rmge.tl._alignment import _sample

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*smaller than the logging interval.*",
)

MIXING = ["ilisi", "kbet_per_label", "silhouette_batch", "graph_connectivity"]
BIO = ["silhouette_label", "clisi", "nmi_kmeans", "ari_kmeans"]


def latent_adata(
    shift: float = 0.0, n: int = 600, n_types: int = 4, spread: float = 8.0, seed: int = 0, random_types: bool = False
) -> ad.AnnData:
    """Gaussian clusters, one per type, shared by both domains; spatial cells moved by ``shift`` on every axis.

    ``random_types=True`` draws each cell's type independently of its position (no type structure).
    """
    rng = np.random.default_rng(seed)
    dim = 6
    centers = rng.normal(0.0, spread, (n_types, dim))
    position = np.arange(n) % n_types
    domain = np.where(np.arange(n) < n // 2, "reference", "spatial")
    X = centers[position] + rng.normal(0.0, 1.0, (n, dim))
    X[domain == "spatial"] += shift
    types = rng.integers(0, n_types, n) if random_types else position
    labels = np.array([f"type_{t}" for t in types], dtype=object)
    obs = pd.DataFrame(
        {"domain": domain, "cell_type": labels, "truth": labels, "rmge_prediction": labels},
        index=[f"cell_{i}" for i in range(n)],
    )
    obs["truth"] = obs["truth"].where(obs["domain"] == "spatial")
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obs=obs)
    adata.obsm["X_rmge"] = X.astype(np.float32)
    return adata


def scores(frame: pd.DataFrame, cells: str) -> dict[str, float]:
    sub = frame[frame["cells"] == cells]
    return dict(zip(sub["metric"], sub["value"], strict=True))


def test_missing_scib_metrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # makes `import scib_metrics` fail
    with pytest.raises(ImportError, match=r'pip install "rmge\[jax\]"'):
        rmge.tl.alignment_metrics(latent_adata(), labels_key="cell_type")


def test_mixed_and_separated_domains_score_in_the_right_direction():
    pytest.importorskip("scib_metrics")
    mixed = rmge.tl.alignment_metrics(latent_adata(shift=0.0), labels_key="cell_type", truth_key="truth")
    apart = rmge.tl.alignment_metrics(latent_adata(shift=60.0), labels_key="cell_type", truth_key="truth")

    assert list(mixed.columns) == ["metric", "group", "cells", "labels", "value", "n_cells"]
    assert list(mixed["metric"]) == MIXING + BIO + BIO
    assert list(mixed["cells"]) == ["all"] * 4 + ["reference"] * 4 + ["spatial"] * 4
    assert set(mixed.loc[mixed["cells"] == "all", "group"]) == {"batch_mixing"}
    assert list(mixed["n_cells"]) == [600] * 4 + [300] * 8
    assert mixed["value"].between(0, 1).all() and apart["value"].between(0, 1).all()

    m, a = scores(mixed, "all"), scores(apart, "all")
    assert m["ilisi"] > 0.8 and a["ilisi"] < 0.05
    assert m["kbet_per_label"] > 0.8 and a["kbet_per_label"] < 0.05
    assert m["silhouette_batch"] > 0.85 and a["silhouette_batch"] < 0.2
    # each type splits into one component per domain when the domains are apart
    assert m["graph_connectivity"] > 0.95 and a["graph_connectivity"] < 0.6
    # type structure within each domain is the same in both cases, and clear
    for frame in (mixed, apart):
        for cells in ("reference", "spatial"):
            bio = scores(frame, cells)
            assert bio["clisi"] > 0.95 and bio["nmi_kmeans"] > 0.9 and bio["silhouette_label"] > 0.75, (cells, bio)


def test_types_without_structure_score_low_bio_conservation():
    pytest.importorskip("scib_metrics")
    frame = rmge.tl.alignment_metrics(latent_adata(random_types=True), labels_key="cell_type", truth_key="truth")
    for cells in ("reference", "spatial"):
        bio = scores(frame, cells)
        assert bio["nmi_kmeans"] < 0.1 and bio["ari_kmeans"] < 0.1, bio
        assert bio["clisi"] < 0.5 and bio["silhouette_label"] < 0.55, bio


def test_sampling_is_balanced_seeded_and_bounded():
    is_ref = np.r_[np.ones(700, bool), np.zeros(300, bool)]
    rng = np.random.default_rng
    take = _sample(is_ref, 200, True, rng(0))
    assert is_ref[take].sum() == 100 and (~is_ref[take]).sum() == 100
    assert np.all(np.diff(take) > 0)
    np.testing.assert_array_equal(take, _sample(is_ref, 200, True, rng(0)))
    assert not np.array_equal(take, _sample(is_ref, 200, True, rng(1)))
    assert is_ref[_sample(is_ref, None, True, rng(0))].sum() == 300  # all of the smaller domain, as many of the other
    prop = _sample(is_ref, 200, False, rng(0))
    assert len(prop) == 200 and is_ref[prop].sum() == 140
    assert len(_sample(is_ref, None, False, rng(0))) == 1000


def test_jax_neighbours_agree_with_pynndescent():
    scib_metrics = pytest.importorskip("scib_metrics")
    adata = latent_adata(shift=2.0)
    default = rmge.tl.alignment_metrics(adata, labels_key="cell_type")
    exact = rmge.tl.alignment_metrics(
        adata, labels_key="cell_type", neighbor_computer=scib_metrics.nearest_neighbors.jax_approx_min_k
    )
    np.testing.assert_allclose(exact["value"], default["value"], atol=0.05)
    with pytest.raises(TypeError, match="NeighborsResults"):
        rmge.tl.alignment_metrics(adata, labels_key="cell_type", neighbor_computer=lambda X, k: np.zeros((len(X), k)))


def test_unknown_and_missing_predictions_are_left_out_and_sampling_is_seeded():
    pytest.importorskip("scib_metrics")
    adata = latent_adata()
    pred = adata.obs["rmge_prediction"].astype(object).copy()
    sp = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    pred.iloc[sp[:20]] = "Unknown"
    pred.iloc[sp[20:30]] = np.nan
    adata.obs["rmge_prediction"] = pred
    with pytest.warns(UserWarning, match="30 spatial cell"):
        a = rmge.tl.alignment_metrics(adata, labels_key="cell_type", n_cells=200, seed=3)
    with pytest.warns(UserWarning, match="30 spatial cell"):
        b = rmge.tl.alignment_metrics(adata, labels_key="cell_type", n_cells=200, seed=3)
    # same cells, same neighbours: equal scores, but for kBET, whose diffusion map starts ARPACK at random
    kbet = (a["metric"] == "kbet_per_label").to_numpy()
    pd.testing.assert_frame_equal(a[~kbet], b[~kbet])
    assert a.loc[kbet, "value"].iloc[0] == pytest.approx(b.loc[kbet, "value"].iloc[0], abs=0.05)
    assert list(a["n_cells"]) == [200] * 4 + [100] * 4
    assert "spatial" not in set(a["cells"])  # no truth column given


def test_input_errors():
    pytest.importorskip("scib_metrics")
    adata = latent_adata()
    with pytest.raises(KeyError, match="add_results"):
        rmge.tl.alignment_metrics(adata, labels_key="cell_type", use_rep="X_other")
    with pytest.raises(ValueError, match="labels_key"):
        rmge.tl.alignment_metrics(adata)
    with pytest.raises(KeyError, match="truth column 'nope'"):
        rmge.tl.alignment_metrics(adata, labels_key="cell_type", truth_key="nope")
    with pytest.raises(ValueError, match="n_cells"):
        rmge.tl.alignment_metrics(adata, labels_key="cell_type", n_cells=5)
    with pytest.raises(ValueError, match="reference_domain.*'reference', 'spatial'"):
        rmge.tl.alignment_metrics(adata, labels_key="cell_type", reference_domain="scRNA")
    no_pred = adata.copy()
    del no_pred.obs["rmge_prediction"]
    with pytest.raises(KeyError, match="rmge_prediction"):
        rmge.tl.alignment_metrics(no_pred, labels_key="cell_type")
    with pytest.raises(TypeError, match="RMGEModel or an AnnData"):
        rmge.tl.alignment_metrics(adata.obsm["X_rmge"])


def test_trained_model_and_its_written_results_agree():
    pytest.importorskip("scib_metrics")
    ref, spa = rmge.datasets.synthetic(n_reference=400, n_spatial=400, n_genes=100, n_classes=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata = rmge.pp.prepare(ref, spa, labels_key="cell_type", n_top_genes=None)
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key="cell_type")
    model = RMGEModel(adata)
    model.train(max_epochs=20, enable_progress_bar=False, accelerator="cpu")

    from_model = rmge.tl.alignment_metrics(model, truth_key="cell_type_spatial")
    rmge.tl.add_results(model, adata)
    from_adata = rmge.tl.alignment_metrics(adata, truth_key="cell_type_spatial")  # keys read from uns['rmge']
    kbet = (from_model["metric"] == "kbet_per_label").to_numpy()  # kBET varies a little between calls
    pd.testing.assert_frame_equal(from_model[~kbet], from_adata[~kbet])
    assert from_model["value"][kbet].iloc[0] == pytest.approx(from_adata["value"][kbet].iloc[0], abs=0.05)
    # the metagene space keeps the reference types and the spatial types apart
    for cells in ("reference", "spatial"):
        bio = scores(from_model, cells)
        assert bio["clisi"] > 0.9 and bio["nmi_kmeans"] > 0.7, (cells, bio)
