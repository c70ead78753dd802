"""Tests of rmge.tl.add_results (keys scanpy reads) and of scvi-tools' own utilities on an RMGEModel."""

from __future__ import annotations

import warnings

import anndata as ad
import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scvi

import rmge
from rmge import RMGEModel

matplotlib.use("Agg")

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*smaller than the logging interval.*",
)

LABELS = "cell_type"
TRUTH = f"{LABELS}_spatial"
N_CLASSES = 4
TRAIN_KWARGS = {"enable_progress_bar": False, "accelerator": "cpu"}


def make_adata(seed: int = 0) -> ad.AnnData:
    ref, spa = rmge.datasets.synthetic(
        n_reference=300, n_spatial=300, n_genes=80, n_classes=N_CLASSES, spatial_depth_ratio=0.2, seed=seed
    )
    spa = spa[np.asarray(spa.X.sum(1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rmge.pp.prepare(ref, spa, labels_key=LABELS, n_top_genes=None)


@pytest.fixture(scope="module")
def trained():
    adata = make_adata()
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata)
    model.train(max_epochs=20, **TRAIN_KWARGS)
    return model, adata


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory):
    model, _ = trained
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(str(path), save_anndata=True)
    return path


def spatial_mask(adata: ad.AnnData) -> np.ndarray:
    return (adata.obs["domain"] == "spatial").to_numpy()


# ------------------------------------------------------------------ keys and values


def test_keys_hold_the_models_outputs(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), unknown_threshold=0.6, copy=True)
    sp_mask = spatial_mask(out)
    sp_idx = np.flatnonzero(sp_mask)
    classes = model.classes_

    pred = out.obs["rmge_prediction"]
    assert isinstance(pred.dtype, pd.CategoricalDtype)
    assert list(pred.cat.categories) == [*classes, "Unknown"]
    expected = model.predict(indices=sp_idx, unknown_threshold=0.6)
    np.testing.assert_array_equal(pred[sp_mask].astype(str).to_numpy(), expected)
    assert pred[~sp_mask].isna().all()  # reference cells are not predicted by default

    probs = out.obsm["rmge_probabilities"]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == classes and probs.index.equals(out.obs_names)
    soft = model.predict(indices=sp_idx, soft=True).to_numpy()
    np.testing.assert_allclose(probs.to_numpy()[sp_mask], soft, rtol=1e-6)
    np.testing.assert_allclose(probs.to_numpy()[sp_mask].sum(1), 1.0, atol=1e-5)
    assert np.isnan(probs.to_numpy()[~sp_mask]).all()

    conf = out.obs["rmge_confidence"].to_numpy()
    np.testing.assert_allclose(conf[sp_mask], soft.max(1), rtol=1e-6)
    assert np.isnan(conf[~sp_mask]).all()
    # "Unknown" is exactly the cells below the threshold
    np.testing.assert_array_equal((pred[sp_mask] == "Unknown").to_numpy(), soft.max(1) < 0.6)

    # the latent space is written for every cell, reference cells included
    np.testing.assert_allclose(out.obsm["X_rmge"], model.get_latent_representation(), rtol=1e-6)

    colors = out.uns["rmge_prediction_colors"]
    assert len(colors) == len(classes) + 1 and len(set(colors)) == len(colors)
    assert colors[-1] == rmge.tl._results.UNKNOWN_COLOR

    info = out.uns["rmge"]
    assert list(info["classes"]) == classes
    assert info["unknown_threshold"] == 0.6 and info["cells"] == "spatial"
    assert info["labels_key"] == LABELS and info["domain_key"] == "domain"
    assert info["calibration_temperature"] == pytest.approx(float(model.module.calibration_temperature))
    assert info["reference_calibration_temperature"] == pytest.approx(
        float(model.module.reference_calibration_temperature)
    )
    assert info["rmge_version"] == rmge.__version__
    assert info["n_genes_used"] == out.n_vars  # what rmge.pp.prepare stored there is kept
    # the input was left alone with copy=True
    assert "rmge_prediction" not in adata.obs and "X_rmge" not in adata.obsm


def test_include_reference_and_no_threshold(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), include_reference=True, copy=True)
    pred = out.obs["rmge_prediction"]
    assert list(pred.cat.categories) == model.classes_  # no "Unknown" without a threshold
    assert pred.notna().all()
    np.testing.assert_array_equal(pred.astype(str).to_numpy(), model.predict())
    assert out.uns["rmge"]["cells"] == "all" and "unknown_threshold" not in out.uns["rmge"]
    assert len(out.uns["rmge_prediction_colors"]) == len(model.classes_)


def test_unknown_category_is_kept_when_no_cell_falls_below(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), unknown_threshold=0.0, copy=True)
    pred = out.obs["rmge_prediction"]
    assert "Unknown" in pred.cat.categories and not (pred == "Unknown").any()


def test_novelty_threshold_labels_like_predict(trained):
    model, adata = trained
    sp_idx = np.flatnonzero(spatial_mask(adata))
    out = rmge.tl.add_results(model, adata.copy(), novelty_threshold=1.0, copy=True)
    pred = out.obs["rmge_prediction"]
    assert list(pred.cat.categories) == [*model.classes_, "Unknown"]
    expected = model.predict(indices=sp_idx, novelty_threshold=1.0)
    assert (expected == "Unknown").any()  # a low threshold flags some cells
    np.testing.assert_array_equal(pred.iloc[sp_idx].astype(str).to_numpy(), expected)
    assert out.uns["rmge"]["novelty_threshold"] == 1.0 and "unknown_threshold" not in out.uns["rmge"]


def test_rerun_replaces_a_stale_threshold(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), unknown_threshold=0.9, novelty_threshold=2.0, copy=True)
    rmge.tl.add_results(model, out)
    assert "unknown_threshold" not in out.uns["rmge"] and "novelty_threshold" not in out.uns["rmge"]
    assert "Unknown" not in out.obs["rmge_prediction"].cat.categories


def test_colors_follow_the_reference_palette(trained):
    model, adata = trained
    data = adata.copy()
    ref_colors = ["#000000", "#111111", "#222222", "#333333"]
    data.uns[f"{LABELS}_colors"] = ref_colors
    order = list(data.obs[LABELS].cat.categories)
    out = rmge.tl.add_results(model, data, unknown_threshold=0.5, copy=True)
    expected = [ref_colors[order.index(c)] for c in model.classes_]
    assert out.uns["rmge_prediction_colors"] == [*expected, rmge.tl._results.UNKNOWN_COLOR]
    mapping = {c: f"C{i}" for i, c in enumerate(model.classes_)}
    out = rmge.tl.add_results(model, data, palette=mapping, copy=True)
    assert out.uns["rmge_prediction_colors"] == [mcolors.to_hex(f"C{i}") for i in range(N_CLASSES)]
    with pytest.raises(ValueError, match="no colour for the classes"):
        rmge.tl.add_results(model, data, palette={model.classes_[0]: "red"}, copy=True)


def test_key_added_prefix(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), key_added="rmge2", copy=True)
    assert {"rmge2_prediction", "rmge2_confidence"} <= set(out.obs)
    assert {"rmge2_probabilities", "X_rmge2"} <= set(out.obsm)
    assert {"rmge2", "rmge2_prediction_colors"} <= set(out.uns)
    assert "rmge_prediction" not in out.obs


def test_new_spatial_anndata_without_domain_column(trained):
    model, adata = trained
    sp_idx = np.flatnonzero(spatial_mask(adata))
    new = ad.AnnData(adata.layers["counts"][sp_idx].copy(), var=adata.var[[]].copy())
    new.obs_names = adata.obs_names[sp_idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no domain column: all cells are spatial
        rmge.tl.add_results(model, new)
    np.testing.assert_array_equal(
        new.obs["rmge_prediction"].astype(str).to_numpy(), model.predict(indices=sp_idx).astype(str)
    )
    np.testing.assert_allclose(new.obsm["X_rmge"], model.get_latent_representation(indices=sp_idx), rtol=1e-5)


def test_h5ad_round_trip(trained, tmp_path):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), unknown_threshold=0.5, copy=True)
    path = tmp_path / "results.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_series_equal(back.obs["rmge_prediction"], out.obs["rmge_prediction"])
    pd.testing.assert_frame_equal(back.obsm["rmge_probabilities"], out.obsm["rmge_probabilities"])
    assert list(back.uns["rmge_prediction_colors"]) == out.uns["rmge_prediction_colors"]
    assert list(back.uns["rmge"]["classes"]) == model.classes_


def test_input_errors(trained):
    model, adata = trained
    with pytest.raises(ValueError, match="unknown_threshold"):
        rmge.tl.add_results(model, adata, unknown_threshold=1.5)
    with pytest.raises(ValueError, match="is a view"):
        rmge.tl.add_results(model, adata[:10])
    with pytest.raises(TypeError, match="rmge.RMGEModel"):
        rmge.tl.add_results(adata, adata)
    fresh = make_adata(seed=1)
    RMGEModel.setup_anndata(fresh, labels_key=LABELS)
    with pytest.raises(RuntimeError, match="train"):
        rmge.tl.add_results(RMGEModel(fresh), fresh)


# ------------------------------------------------------------------ scanpy


def test_scanpy_plots_with_the_stored_colors_and_builds_neighbors(trained):
    model, adata = trained
    out = rmge.tl.add_results(model, adata.copy(), unknown_threshold=0.5, copy=True)
    colors = list(out.uns["rmge_prediction_colors"])
    ax = sc.pl.embedding(out, basis="spatial", color="rmge_prediction", show=False)
    assert out.uns["rmge_prediction_colors"] == colors  # scanpy kept the palette
    # every spatial cell is drawn in its category's colour
    categories = list(out.obs["rmge_prediction"].cat.categories)
    lookup = {mcolors.to_hex(c): cat for cat, c in zip(categories, colors, strict=True)}
    drawn = [mcolors.to_hex(c) for c in ax.collections[0].get_facecolors()]
    sp_mask = spatial_mask(out)
    pred = out.obs["rmge_prediction"].astype(str).to_numpy()
    assert len(drawn) == out.n_obs
    assert [lookup.get(c) for c in np.asarray(drawn)[sp_mask]] == list(pred[sp_mask])
    legend = {t.get_text() for t in ax.get_legend().get_texts()} if ax.get_legend() else set()
    assert set(pred[sp_mask]) <= legend | {t.get_text() for t in ax.texts}

    sc.pp.neighbors(out, use_rep="X_rmge", n_neighbors=10)
    conn = out.obsp["connectivities"]
    assert conn.shape == (out.n_obs, out.n_obs) and out.uns["neighbors"]["params"]["use_rep"] == "X_rmge"
    # neighbours in metagene space share the model's prediction
    labels = model.predict()
    rows, cols = conn.nonzero()
    assert (labels[rows] == labels[cols]).mean() > 0.8


# ------------------------------------------------------------------ scvi-tools utilities


def test_view_anndata_setup_and_setup_args(trained, saved_dir, capsys):
    model, adata = trained
    model.view_anndata_setup()
    printed = capsys.readouterr().out
    assert "RMGEModel.setup_anndata" in printed and "'labels_key': 'cell_type'" in printed
    assert "_rmge_domain" in printed
    RMGEModel.view_setup_args(str(saved_dir))
    printed = capsys.readouterr().out
    assert "'domain_key': 'domain'" in printed and "'reference_domain': 'reference'" in printed


def test_get_anndata_manager(trained):
    model, adata = trained
    manager = model.get_anndata_manager(adata)
    assert manager is model.adata_manager
    assert manager.registry["setup_args"]["labels_key"] == LABELS
    assert manager.registry["model_name"] == "RMGEModel"
    # a copy carries the set-up's id: scvi-tools transfers the set-up to it
    copied = adata[spatial_mask(adata)].copy()
    assert model.get_anndata_manager(copied, required=False).registry["setup_args"]["labels_key"] == LABELS
    # an AnnData built anew has no manager until the model meets it
    new = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs[["domain", LABELS]].copy(), var=adata.var[[]])
    assert model.get_anndata_manager(new, required=False) is None
    np.testing.assert_array_equal(model.predict(new), model.predict())
    assert model.get_anndata_manager(new) is not model.adata_manager


def test_posterior_predictive_check_does_not_apply(trained):
    """RMGE is discriminative: no count likelihood, hence no posterior predictive samples to check."""
    from scvi.criticism import PosteriorPredictiveCheck

    model, adata = trained
    assert not hasattr(model, "posterior_predictive_sample")
    with pytest.raises(AttributeError, match="posterior_predictive_sample"):
        PosteriorPredictiveCheck(adata, {"rmge": model}, count_layer_key="counts", n_samples=2)


def test_scvi_hub_wraps_a_saved_model(trained, tmp_path):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import ModelCard
    from scvi.hub import HubMetadata, HubModel

    model, adata = trained
    local = tmp_path / "hub_model"
    model.save(str(local), save_anndata=True)
    metadata = HubMetadata.from_dir(str(local), anndata_version=ad.__version__, model_parent_module="rmge")
    assert metadata.model_cls_name == "RMGEModel"
    card = ModelCard("---\nlicense: mit\nlibrary_name: scvi-tools\ntags:\n- rmge\n---\n# RMGE model\n")
    HubModel(str(local), metadata=metadata, model_card=card).save()

    hub = HubModel(str(local))  # metadata and card read back from the folder
    assert hub.metadata.model_parent_module == "rmge"
    loaded = hub.model  # loads with the AnnData saved beside the model
    assert isinstance(loaded, RMGEModel)
    np.testing.assert_allclose(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), rtol=1e-5, atol=1e-7
    )
    other = HubModel(str(local))
    other.load_model(adata=adata, accelerator="cpu")
    np.testing.assert_array_equal(other.model.predict(), model.predict())
