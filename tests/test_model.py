"""Tests of rmge.RMGEModel: accuracy on data with a known answer, outputs, history, persistence, input errors."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from scipy.special import softmax
from scvi.model.base import BaseModelClass

import rmge
from rmge import RMGEModel

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*smaller than the logging interval.*",
)

LABELS = "cell_type"
TRUTH = f"{LABELS}_spatial"  # rmge.pp.prepare keeps the spatial side's own labels here
N_REF, N_SPATIAL, N_GENES, N_CLASSES = 600, 600, 200, 5
MAX_EPOCHS = 30
TRAIN_KWARGS = {"enable_progress_bar": False, "accelerator": "cpu"}
LOSS_TERMS = (
    "classification_loss",
    "reconstruction_loss",
    "adversarial_loss",
    "entropy",
    "kl_prior",
    "pseudo_label_loss",
    "accuracy",
)


# ------------------------------------------------------------------ helpers


def make_adata(
    n_reference: int = N_REF,
    n_spatial: int = N_SPATIAL,
    n_genes: int = N_GENES,
    n_classes: int = N_CLASSES,
    spatial_depth_ratio: float = 0.1,
    seed: int = 0,
    platform_shift: float = 0.5,
) -> ad.AnnData:
    """Synthetic reference (median 2,000 counts) + spatial cells 10× sparser with a per-gene platform shift."""
    ref, spa = rmge.datasets.synthetic(
        n_reference=n_reference,
        n_spatial=n_spatial,
        n_genes=n_genes,
        n_classes=n_classes,
        spatial_depth_ratio=spatial_depth_ratio,
        platform_shift=platform_shift,
        seed=seed,
    )
    spa = spa[np.asarray(spa.X.sum(1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the spatial truth column is moved to `cell_type_spatial`
        return rmge.pp.prepare(ref, spa, labels_key=LABELS, n_top_genes=None)


def spatial_indices(adata: ad.AnnData) -> np.ndarray:
    return np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())


def reference_indices(adata: ad.AnnData) -> np.ndarray:
    return np.flatnonzero((adata.obs["domain"] == "reference").to_numpy())


def spatial_accuracy(model: RMGEModel, adata: ad.AnnData) -> float:
    idx = spatial_indices(adata)
    truth = adata.obs[TRUTH].to_numpy()[idx].astype(str)
    return float((model.predict(indices=idx) == truth).mean())


def normalised_spatial(adata: ad.AnnData) -> ad.AnnData:
    """A copy of ``adata`` whose spatial cells hold values normalised to 10,000 per cell (not counts)."""
    adata = adata.copy()
    sp_idx = spatial_indices(adata)
    X = sp.csr_matrix(adata.X, dtype=np.float32, copy=True).tolil()
    spatial = sp.csr_matrix(X[sp_idx])
    X[sp_idx] = sp.diags(1e4 / np.asarray(spatial.sum(1)).ravel()) @ spatial
    adata.X = sp.csr_matrix(X)
    return adata


def train_model(adata: ad.AnnData, seed: int = 0, max_epochs: int = MAX_EPOCHS, **model_kwargs) -> RMGEModel:
    scvi.settings.seed = seed
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata, **model_kwargs)
    model.train(max_epochs=max_epochs, **TRAIN_KWARGS)
    return model


def predictions(model: RMGEModel, adata: ad.AnnData | None = None) -> tuple[np.ndarray, np.ndarray]:
    return model.predict(adata), model.predict(adata, soft=True).to_numpy()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def synthetic_adata() -> ad.AnnData:
    """Untouched prepared data; tests copy it before registering it."""
    return make_adata()


@pytest.fixture(scope="module")
def trained(synthetic_adata):
    """One model with default settings trained once (seed 0) and shared by the read-only tests."""
    adata = synthetic_adata.copy()
    model = train_model(adata)
    return model, adata


@pytest.fixture(scope="module")
def trained_counts(synthetic_adata):
    """A model with count evidence (``count_evidence=True``), trained once (seed 0)."""
    adata = synthetic_adata.copy()
    model = train_model(adata, count_evidence=True)
    return model, adata


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory):
    model, _ = trained
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(str(path), save_anndata=True)
    return path


@pytest.fixture
def small_adata() -> ad.AnnData:
    """Small valid data for the input checks (no training)."""
    return make_adata(n_reference=60, n_spatial=60, n_genes=40, n_classes=3, seed=3)


# ------------------------------------------------------------------ accuracy and outputs


def test_accuracy_on_sparse_shifted_spatial_data(trained):
    model, adata = trained
    ref = reference_indices(adata)
    sp_idx = spatial_indices(adata)
    depth = np.asarray(adata.X.sum(1)).ravel()
    # the data are what the test claims: spatial ~10x sparser than the reference
    assert np.median(depth[sp_idx]) < 0.15 * np.median(depth[ref])
    acc = spatial_accuracy(model, adata)
    assert acc >= 0.9, f"spatial accuracy {acc:.3f}"


def test_predict_soft(trained):
    model, adata = trained
    probs = model.predict(soft=True)
    assert isinstance(probs, pd.DataFrame)
    assert probs.shape == (adata.n_obs, N_CLASSES)
    assert list(probs.columns) == model.classes_
    assert set(probs.columns) == {f"type_{k}" for k in range(N_CLASSES)}
    assert probs.index.equals(adata.obs_names)
    values = probs.to_numpy()
    assert np.all(np.isfinite(values)) and values.min() >= 0
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.columns.to_numpy()[values.argmax(1)], model.predict())


def test_predict_indices_match_full_prediction(trained):
    model, adata = trained
    labels, probs = predictions(model)
    idx = np.random.default_rng(0).choice(adata.n_obs, size=137, replace=False)  # unsorted, both domains
    np.testing.assert_array_equal(model.predict(indices=idx), labels[idx])
    sub = model.predict(indices=idx, soft=True)
    assert sub.index.equals(adata.obs_names[idx])
    np.testing.assert_allclose(sub.to_numpy(), probs[idx], rtol=1e-6, atol=1e-7)


def test_latent_representation_is_the_logits(trained):
    model, adata = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, N_CLASSES)
    labels, probs = predictions(model)
    classes = np.asarray(model.classes_)
    ref = reference_indices(adata)
    sp_idx = spatial_indices(adata)
    np.testing.assert_array_equal(classes[z[ref].argmax(1)], labels[ref])
    # probabilities are the softmax of the logits over the calibration temperature, for both domains
    # (the reference temperature for reference cells, the spatial one for spatial cells)
    calibration = float(model.module.calibration_temperature.cpu())
    reference_calibration = float(model.module.reference_calibration_temperature.cpu())
    assert calibration > 0 and reference_calibration > 0
    np.testing.assert_allclose(softmax(z[ref] / reference_calibration, axis=1), probs[ref], atol=1e-5)
    np.testing.assert_allclose(softmax(z[sp_idx] / calibration, axis=1), probs[sp_idx], atol=1e-5)
    np.testing.assert_array_equal(classes[z.argmax(1)], labels)


def test_count_evidence_enters_the_spatial_probabilities(trained_counts):
    model, adata = trained_counts
    z = model.get_latent_representation()
    labels, probs = predictions(model)
    classes = np.asarray(model.classes_)
    ref, sp_idx = reference_indices(adata), spatial_indices(adata)
    calibration = float(model.module.calibration_temperature.cpu())
    reference_calibration = float(model.module.reference_calibration_temperature.cpu())
    # reference cells: the activities alone
    np.testing.assert_allclose(softmax(z[ref] / reference_calibration, axis=1), probs[ref], atol=1e-5)
    # spatial cells add the count log-likelihood of each type's profile, each cell's weight capped at the
    # profiles' depth, then divide by the evidence's temperature
    module = model.module
    assert module.has_count_evidence
    counts = sp.csr_matrix(adata.X[sp_idx])
    depth = np.asarray(counts.sum(1)).ravel()
    log_p = module.count_log_profiles.cpu().numpy().astype(np.float64)
    evidence = (counts @ log_p.T) * np.minimum(1.0, float(module.count_depth) / depth)[:, None]
    combined = (z[sp_idx] / calibration + evidence) / float(module.count_temperature)
    # (float32 sums of the compiled pass: logits agree to about 1e-3)
    np.testing.assert_allclose(softmax(combined, axis=1), probs[sp_idx], atol=1e-3)
    np.testing.assert_array_equal(classes[z[ref].argmax(1)], labels[ref])
    np.testing.assert_array_equal(classes[combined.argmax(1)], labels[sp_idx])


def test_count_profiles_come_from_the_training_cells(trained_counts):
    model, adata = trained_counts
    module = model.module
    # each type's summed counts of the reference cells outside the calibration set, at the spatial capture
    ref = np.setdiff1d(reference_indices(adata), model.validation_indices)
    X = sp.csr_matrix(adata.X[ref])
    types = adata.obs[LABELS].to_numpy()[ref].astype(str)
    factor = module.gene_factor.cpu().numpy().astype(np.float64)
    for k, name in enumerate(model.classes_):
        sums = np.asarray(X[types == name].sum(0)).ravel() * factor
        expected = sums + 0.01 * sums.sum() / len(sums)
        expected /= expected.sum()
        np.testing.assert_allclose(np.exp(module.count_log_profiles[k].cpu().numpy()), expected, rtol=1e-4)
    assert float(module.count_depth) == pytest.approx(np.median(np.asarray(X.sum(1)).ravel()))
    assert 0.5 <= float(module.count_temperature) <= 20


def test_count_evidence_helps_sparse_cells():
    # very sparse spatial cells (about 1 % of the reference depth): the counts' likelihood under each type's
    # profile is evidence the standardised profile loses
    adata = make_adata(n_reference=400, n_spatial=400, n_genes=150, spatial_depth_ratio=0.01, seed=5)
    with_counts = train_model(adata.copy(), seed=0, count_evidence=True)
    without = train_model(adata.copy(), seed=0)
    assert with_counts.module.has_count_evidence and not without.module.has_count_evidence
    acc_with, acc_without = spatial_accuracy(with_counts, adata), spatial_accuracy(without, adata)
    assert acc_with >= acc_without + 0.02, f"with count evidence {acc_with:.3f}, without {acc_without:.3f}"


def test_count_evidence_needs_counts(synthetic_adata):
    adata = normalised_spatial(synthetic_adata)
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    assert not RMGEModel(adata, count_evidence="auto").module.count_evidence  # off without counts on both sides
    with pytest.raises(ValueError, match="count_evidence=True needs integer counts in both domains"):
        RMGEModel(adata, count_evidence=True)
    with pytest.raises(ValueError, match="`count_evidence` must be True, False or 'auto'"):
        RMGEModel(adata, count_evidence="yes")
    counts = synthetic_adata.copy()
    RMGEModel.setup_anndata(counts, labels_key=LABELS)
    assert not RMGEModel(counts).module.count_evidence  # off by default
    assert RMGEModel(counts, count_evidence="auto").module.count_evidence
    assert not RMGEModel(counts, **RMGEModel.ORIGINAL).module.count_evidence


def test_auto_dropout_follows_sparsity_matching(synthetic_adata):
    counts = synthetic_adata.copy()
    RMGEModel.setup_anndata(counts, labels_key=LABELS)
    # counts on both sides: the reference is thinned to the spatial depth, so less dropout on top,
    # the less the shallower the spatial cells: 0.5 * L / (L + 10) for a median spatial depth L
    sp_idx = spatial_indices(counts)
    depth = float(np.median(np.asarray(counts.X[sp_idx].sum(1)).ravel()))
    expected = 0.5 * depth / (depth + 10.0)
    auto = RMGEModel(counts)
    assert auto.module.dropout.p == pytest.approx(expected, abs=2e-3)
    assert f"dropout {auto.module.dropout.p}," in auto._model_summary_string
    assert RMGEModel(counts, sparsity_matching=False).module.dropout.p == pytest.approx(0.8)
    assert RMGEModel(counts, dropout_rate=0.3).module.dropout.p == pytest.approx(0.3)
    assert RMGEModel(counts, **RMGEModel.ORIGINAL).module.dropout.p == pytest.approx(0.8)
    shallow = make_adata(n_reference=200, n_spatial=200, n_genes=100, spatial_depth_ratio=0.002, seed=1)
    RMGEModel.setup_anndata(shallow, labels_key=LABELS)
    assert RMGEModel(shallow).module.dropout.p < 0.5 * expected
    normalised = normalised_spatial(synthetic_adata)
    RMGEModel.setup_anndata(normalised, labels_key=LABELS)
    assert RMGEModel(normalised).module.dropout.p == pytest.approx(0.8)  # no thinning: the original's dropout


def test_thinned_statistics_average_several_draws(monkeypatch):
    # with sparsity matching, the standardisation statistics and the class centroids the metagenes start
    # from are taken over thinned reference cells. One draw of a small reference at ~6 counts a cell
    # leaves each centroid a few hundred counts; the default averages up to 64 draws, so that two seeds
    # agree far more closely (the draws' error falls as 1 / sqrt(draws))
    from rmge.model import _model

    adata = make_adata(n_reference=300, n_spatial=300, n_genes=100, spatial_depth_ratio=0.003, seed=4)
    n_ref = len(reference_indices(adata))
    assert _model._stat_draws(n_ref) == 64 and _model._stat_draws(10**6) == 1 and _model._stat_draws(1_000) == 50

    def statistics(seed, **kwargs):
        scvi.settings.seed = seed
        RMGEModel.setup_anndata(adata, labels_key=LABELS)
        module = RMGEModel(adata, **kwargs).module
        return module.init_weight.numpy().astype(np.float64), module.group_std.numpy().astype(np.float64)

    (c0, s0), (c1, s1) = statistics(0), statistics(1)
    monkeypatch.setattr(_model, "_MAX_STAT_DRAWS", 1)
    (d0, t0), (d1, t1) = statistics(0), statistics(1)
    assert np.abs(c0 - c1).mean() < 0.3 * np.abs(d0 - d1).mean()
    assert np.abs(s0 - s1).mean() < 0.3 * np.abs(t0 - t1).mean()
    # without sparsity matching nothing is drawn: one pass, the same statistics for every seed
    (u0, v0), (u1, v1) = statistics(0, sparsity_matching=False), statistics(1, sparsity_matching=False)
    np.testing.assert_array_equal(u0, u1)
    np.testing.assert_array_equal(v0, v1)


def test_auto_dropout_keeps_accuracy_on_shallow_spatial_cells():
    # spatial cells with ~6 counts: the thinned reference already has their depth, and dropout 0.8 on top
    # leaves about one count per training cell (auto: about 0.2). On these synthetic cells the two end level
    # (the metagenes start at centroids averaged over many thinning draws); the gain of the automatic rate
    # shows on real gene activity (benchmarks: Granja -> PBMC). Auto must not cost accuracy, and the
    # trained model must stay far above chance (1 / 5 types)
    adata = make_adata(n_reference=400, n_spatial=400, n_genes=150, spatial_depth_ratio=0.003, seed=5)
    gains = []
    for seed in (0, 1):
        auto = train_model(adata.copy(), seed=seed)
        heavy = train_model(adata.copy(), seed=seed, dropout_rate=0.8)
        assert auto.module.dropout.p < 0.5
        assert spatial_accuracy(auto, adata) > 0.45
        gains.append(spatial_accuracy(auto, adata) - spatial_accuracy(heavy, adata))
    assert np.mean(gains) >= -0.01, f"accuracy gains of auto dropout over 0.8: {gains}"


def _spatial_depths(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.X[spatial_indices(adata)].sum(1)).ravel()


def test_auto_target_sum_follows_the_capture_agreement(synthetic_adata):
    # a per-gene platform shift (log-normal, sd 0.5): magnitudes differ between the sides, keep 10,000
    shifted = synthetic_adata.copy()
    RMGEModel.setup_anndata(shifted, labels_key=LABELS)
    model = RMGEModel(shifted)
    spread = float(np.log(model.module.gene_factor.numpy().astype(np.float64)).std())
    assert spread > 0.3
    assert float(model.module.target_sum) == 1e4
    assert "target sum 10000," in model._model_summary_string
    # one platform (no shift): the median spatial depth, as scanpy's normalize_total
    same = make_adata(n_reference=300, n_spatial=300, n_genes=100, platform_shift=0.0, seed=2)
    RMGEModel.setup_anndata(same, labels_key=LABELS)
    model = RMGEModel(same)
    assert float(np.log(model.module.gene_factor.numpy().astype(np.float64)).std()) < 0.3
    median = float(np.median(_spatial_depths(same)))
    assert float(model.module.target_sum) == pytest.approx(median)
    # explicit settings, the original preset, and data without counts on both sides
    assert float(RMGEModel(same, target_sum=500).module.target_sum) == 500
    assert float(RMGEModel(shifted, target_sum="median").module.target_sum) == pytest.approx(
        float(np.median(_spatial_depths(shifted)))
    )
    assert float(RMGEModel(same, **RMGEModel.ORIGINAL).module.target_sum) == 1e4
    assert float(RMGEModel(same, sparsity_matching=False).module.target_sum) == 1e4
    for bad in ("big", 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="`target_sum` must be 'auto', 'median' or a positive number"):
            RMGEModel(same, target_sum=bad)
    normalised = normalised_spatial(same)
    RMGEModel.setup_anndata(normalised, labels_key=LABELS)
    assert float(RMGEModel(normalised).module.target_sum) == 1e4


def test_median_target_sum_helps_cells_of_one_platform():
    # one platform, spatial cells with about 40 counts: near the cells' own depth log1p is almost linear and
    # a count of 2 weighs about twice a count of 1; with 10,000 both are about log(250 * count)
    adata = make_adata(
        n_reference=400, n_spatial=400, n_genes=150, spatial_depth_ratio=0.02, platform_shift=0.0, seed=5
    )
    gains = []
    for seed in (0, 1):
        auto = train_model(adata.copy(), seed=seed)
        assert float(auto.module.target_sum) == pytest.approx(float(np.median(_spatial_depths(adata))))
        fixed = train_model(adata.copy(), seed=seed, target_sum=1e4)
        gains.append(spatial_accuracy(auto, adata) - spatial_accuracy(fixed, adata))
    assert np.mean(gains) >= 0.03, f"accuracy gains of the median target sum over 10,000: {gains}"


def test_target_sum_reaches_statistics_and_sparse_inference():
    # the standardisation statistics, the module's forward pass and the compiled sparse pass all scale each
    # cell to the model's target sum
    from rmge.model._kernels import sparse_logits

    adata = make_adata(n_reference=200, n_spatial=200, n_genes=80, platform_shift=0.0, seed=3)
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata, target_sum=50.0, standardize=True)
    module = model.module
    sp_idx = spatial_indices(adata)
    X = sp.csr_matrix(adata.X[sp_idx], dtype=np.float64)
    values = sp.diags(50.0 / np.asarray(X.sum(1)).ravel()) @ X
    values.data = np.log1p(values.data)
    group = int(np.asarray(model.adata_manager.get_from_registry("batch")).ravel()[sp_idx[0]])
    np.testing.assert_allclose(
        module.group_mean[group].numpy(), np.asarray(values.mean(0)).ravel(), rtol=1e-4, atol=1e-5
    )
    module.eval()
    groups = np.asarray(model.adata_manager.get_from_registry("batch")).ravel()[sp_idx].astype(np.int64)
    dense = torch.from_numpy(X.toarray().astype(np.float32))
    with torch.no_grad():
        z_dense = module.inference(dense, torch.from_numpy(groups).view(-1, 1))["z"].numpy()
        x_norm = module.normalize(dense.clone(), torch.from_numpy(groups))
    expected = (np.log1p(X.toarray() * (50.0 / np.asarray(X.sum(1)))) - module.group_mean[group].numpy()) / (
        module.group_std[group].numpy()
    )
    # counts on both sides: max_value="auto" clips at 3
    assert float(module.max_value) == 3.0
    np.testing.assert_allclose(x_norm.numpy(), np.clip(expected, -3, 3), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        # the compiled pass of inference (training and prediction on CPU) against the tensor operations
        np.testing.assert_allclose(z_dense, module.encode(x_norm, dropout=False).numpy(), rtol=1e-4, atol=1e-4)
    z_sparse = sparse_logits(module, sp.csr_matrix(adata.X[sp_idx]), groups)
    np.testing.assert_allclose(z_sparse, z_dense, rtol=1e-4, atol=1e-4)
    # ... and 50 is not 10,000: the same cells give other values under the default
    default = RMGEModel(adata, target_sum=1e4)
    assert not np.allclose(default.module.group_mean[group].numpy(), module.group_mean[group].numpy(), atol=0.1)


def _load_as_saved_before(path, adata, buffers, settings=()) -> RMGEModel:
    """Load the model saved in ``path`` as one saved before ``buffers`` and the init ``settings`` existed."""
    state = torch.load(path / "model.pt", weights_only=False)
    for key in buffers:
        del state["model_state_dict"][key]
    for key in settings:
        state["attr_dict"]["init_params_"]["non_kwargs"].pop(key, None)
    torch.save(state, path / "model.pt")
    return RMGEModel.load(str(path), adata=adata, accelerator="cpu")


def test_target_sum_is_saved_with_the_model(tmp_path):
    adata = make_adata(n_reference=200, n_spatial=200, n_genes=80, platform_shift=0.0, seed=3)
    model = train_model(adata, max_epochs=3, target_sum="median")
    median = float(np.median(_spatial_depths(adata)))
    assert float(model.module.target_sum) == pytest.approx(median)
    path = tmp_path / "median"
    model.save(str(path), overwrite=True)
    loaded = RMGEModel.load(str(path), adata=adata, accelerator="cpu")
    assert float(loaded.module.target_sum) == pytest.approx(median)
    np.testing.assert_allclose(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), rtol=1e-5, atol=1e-6
    )
    # a model saved before the setting existed: its statistics were computed with 10,000
    old = _load_as_saved_before(path, adata, ["target_sum"], ["target_sum"])
    assert float(old.module.target_sum) == 1e4


def test_max_value_clips_every_path_and_is_saved_with_the_model(tmp_path):
    from rmge.model._kernels import sparse_logits

    adata = make_adata(n_reference=200, n_spatial=200, n_genes=80, seed=3)
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    # "auto": 3 with counts on both sides (sparsity matching), 10 without
    assert float(RMGEModel(adata).module.max_value) == 3.0
    assert float(RMGEModel(adata, sparsity_matching=False).module.max_value) == 10.0
    assert "clip ±3," in RMGEModel(adata)._model_summary_string
    for bad in (0, -1.0, float("nan"), True, "none"):
        with pytest.raises(ValueError, match="max_value"):
            RMGEModel(adata, max_value=bad)

    model = train_model(adata, max_epochs=3, max_value=5.0)
    module = model.module
    module.eval()
    sp_idx = spatial_indices(adata)
    groups = np.asarray(model.adata_manager.get_from_registry("batch")).ravel()[sp_idx].astype(np.int64)
    X = sp.csr_matrix(adata.X[sp_idx], dtype=np.float64)
    dense = torch.from_numpy(X.toarray().astype(np.float32))
    with torch.no_grad():
        x_norm = module.normalize(dense.clone(), torch.from_numpy(groups)).numpy()
        z_dense = module.inference(dense, torch.from_numpy(groups).view(-1, 1))["z"].numpy()
        z_tensor = module.encode(torch.from_numpy(x_norm), dropout=False).numpy()
    t = float(module.target_sum)
    raw = (np.log1p(X.toarray() * (t / np.asarray(X.sum(1)))) - module.group_mean[groups[0]].numpy()) / (
        module.group_std[groups[0]].numpy()
    )
    assert np.abs(raw).max() > 5.0  # the clip matters for these cells
    np.testing.assert_allclose(x_norm, np.clip(raw, -5, 5), rtol=1e-4, atol=1e-4)
    # the compiled passes (training inputs, prediction) clip at the same value as the tensor operations
    np.testing.assert_allclose(z_dense, z_tensor, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sparse_logits(module, sp.csr_matrix(adata.X[sp_idx]), groups), z_dense, atol=1e-4)

    path = tmp_path / "clip5"
    model.save(str(path), overwrite=True)
    loaded = RMGEModel.load(str(path), adata=adata, accelerator="cpu")
    assert float(loaded.module.max_value) == 5.0
    np.testing.assert_allclose(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), rtol=1e-5, atol=1e-6
    )
    # a model saved before the setting existed clipped at 10, whatever "auto" gives today
    old = _load_as_saved_before(path, adata, ["max_value"], ["max_value"])
    assert float(old.module.max_value) == 10.0
    with torch.no_grad():
        old.module.eval()
        assert float(old.module.normalize(dense.clone(), torch.from_numpy(groups)).abs().max()) > 5.0


def test_calibration_is_reproducible_and_checks_its_cells(trained):
    model, adata = trained
    fitted = float(model.module.calibration_temperature.cpu())
    assert 0.5 - 1e-6 <= fitted <= 20.0 + 1e-6
    # refitting on the same held-out cells gives the same temperature (thinning uses a fixed seed)
    assert model.calibrate() == pytest.approx(fitted, rel=1e-6)
    with pytest.raises(ValueError, match="spatial cells"):
        model.calibrate(indices=spatial_indices(adata)[:5])
    assert float(model.module.calibration_temperature.cpu()) == pytest.approx(fitted, rel=1e-6)


def test_calibration_lowers_the_nll_of_held_out_cells_without_thinning(tmp_path):
    ref, sp_ = rmge.datasets.synthetic(n_reference=400, n_spatial=300, n_genes=100, n_classes=4, seed=3)
    adata = rmge.pp.prepare(ref, sp_, labels_key="cell_type", n_top_genes=None)
    rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type", domain_key="domain")
    model = rmge.RMGEModel(adata, sparsity_matching=False)
    model.train(max_epochs=8, **TRAIN_KWARGS)
    val = np.asarray(model.validation_indices)
    codes = [model.classes_.index(c) for c in adata.obs["cell_type"].to_numpy()[val]]

    def nll():
        p = model.predict(indices=val, soft=True).to_numpy()
        return -np.mean(np.log(p[np.arange(len(val)), codes]))

    fitted = nll()
    for t in (0.7, 1.0, 2.0, 5.0):
        model.module.reference_calibration_temperature.fill_(t)
        assert fitted <= nll() + 1e-6


def test_reference_cells_get_their_own_calibration(trained):
    model, adata = trained
    val = np.asarray(model.validation_indices)
    codes = np.asarray([model.classes_.index(c) for c in adata.obs[LABELS].to_numpy()[val]])
    z = torch.as_tensor(model.get_latent_representation(indices=val), dtype=torch.float64)

    def nll(t):
        return float(torch.nn.functional.cross_entropy(z / t, torch.as_tensor(codes)))

    t_ref = float(model.module.reference_calibration_temperature.cpu())
    t_spatial = float(model.module.calibration_temperature.cpu())
    # the reference temperature is the likelihood optimum of the unthinned held-out cells, on the fitted
    # grid (0.05 to 20: held-out cells that are all classified with certainty reach its lower end)
    assert nll(t_ref) <= nll(t_spatial) + 1e-9
    neighbours = [t for t in (t_ref * 1.2, t_ref / 1.2) if 0.05 <= t <= 20.0]
    assert neighbours and nll(t_ref) <= min(nll(t) for t in neighbours) + 1e-9


def test_models_saved_with_one_temperature_still_load(trained, tmp_path):
    model, adata = trained
    path = tmp_path / "one_temperature"
    model.save(str(path), overwrite=True)
    loaded = _load_as_saved_before(path, adata, ["reference_calibration_temperature"])
    assert float(loaded.module.reference_calibration_temperature) == pytest.approx(
        float(model.module.calibration_temperature)
    )


def test_models_saved_before_count_evidence_still_load(trained_counts, tmp_path):
    # a model saved before the count evidence and the class library sizes: it predicts from the
    # activities alone, and cells without counts get the spatial composition
    model, adata = trained_counts
    path = tmp_path / "before_counts"
    model.save(str(path), overwrite=True)
    buffers = ["count_log_profiles", "count_depth", "count_temperature", "class_lib_quantiles"]
    loaded = _load_as_saved_before(path, adata, buffers, ["count_evidence"])
    assert not loaded.module.has_count_evidence
    sp_idx = spatial_indices(adata)
    z = loaded.get_latent_representation()[sp_idx]
    calibration = float(loaded.module.calibration_temperature)
    np.testing.assert_allclose(
        loaded.predict(indices=sp_idx, soft=True).to_numpy(), softmax(z / calibration, axis=1), atol=1e-5
    )
    pd.testing.assert_series_equal(loaded.empty_cell_probabilities(), loaded.spatial_composition(), check_names=False)


def test_classes_follow_reference_category_order(trained):
    model, adata = trained
    expected = list(adata.obs[LABELS].cat.categories)  # rmge.pp.prepare keeps the reference's order
    assert model.classes_ == expected
    assert list(model.predict(soft=True).columns) == expected
    assert list(model.get_metagenes().columns) == expected


def test_metagenes_recover_markers(trained):
    model, adata = trained
    metagenes = model.get_metagenes()
    assert isinstance(metagenes, pd.DataFrame)
    assert metagenes.shape == (adata.n_vars, N_CLASSES)
    assert metagenes.index.equals(adata.var_names)
    assert list(metagenes.columns) == model.classes_
    marker_of = adata.var["marker_of"]
    fractions = {}
    for cls in model.classes_:
        top = metagenes[cls].sort_values(ascending=False).index[:10]
        fractions[cls] = float((marker_of[top] == cls).mean())
    assert all(f >= 0.5 for f in fractions.values()), fractions


def test_history(trained):
    model, _ = trained
    history = model.history
    n_epochs = model.trainer.current_epoch
    assert 0 < n_epochs <= MAX_EPOCHS
    keys = [f"{t}_{m}" for t in LOSS_TERMS for m in ("train", "validation")] + ["train_loss", "validation_loss"]
    missing = [k for k in keys if k not in history]
    assert not missing, f"history lacks {missing}; has {sorted(history)}"
    for key in keys:
        frame = history[key]
        assert isinstance(frame, pd.DataFrame)
        assert len(frame) == n_epochs, key
        np.testing.assert_array_equal(np.asarray(frame.index), np.arange(n_epochs))
        assert np.all(np.isfinite(frame.to_numpy(dtype=float))), key
    acc = history["accuracy_validation"].to_numpy(dtype=float).ravel()
    assert np.all((acc >= 0) & (acc <= 1))
    assert acc[-1] >= 0.9


def test_history_logger_keeps_the_layout_of_scvi_tools_history():
    from rmge.model._trainingplan import HistoryLogger

    log = HistoryLogger()
    log.log_metrics({"a": 1.0, "b": torch.tensor(2.0), "epoch": 0}, step=3)
    log.log_metrics({"a": 1.5, "epoch": 1}, step=6)
    log.log_metrics({"a": 1.7, "epoch": 1}, step=6)  # the same epoch again replaces its value
    log.log_metrics({"loss": 0.5}, step=9)
    history = log.history
    expected = pd.DataFrame({"a": [1.0, 1.7]}, index=pd.Index([0, 1], name="epoch"))
    pd.testing.assert_frame_equal(history["a"], expected)
    assert history["b"].iloc[0, 0] == 2.0
    assert history["loss"].index.name == "step" and list(history["loss"].index) == [9]
    # reading the history leaves later values to be logged
    log.log_metrics({"a": 2.0, "epoch": 2})
    assert list(log.history["a"]["a"]) == [1.0, 1.7, 2.0]


def test_training_again_appends_to_the_history():
    adata = make_adata(n_reference=200, n_spatial=200, n_genes=80, seed=4)
    model = train_model(adata, max_epochs=3)
    first = model.history["validation_loss"].copy()
    model.train(max_epochs=2, **TRAIN_KWARGS)
    after = model.history["validation_loss"]
    assert len(after) == len(first) + 2
    np.testing.assert_array_equal(after.index, np.arange(len(after)))
    pd.testing.assert_frame_equal(after.iloc[: len(first)], first)


# ------------------------------------------------------------------ save / load


def test_save_load_same_adata(trained, saved_dir):
    model, adata = trained
    labels, probs = predictions(model)
    loaded = RMGEModel.load(str(saved_dir), adata=adata, accelerator="cpu")
    new_labels, new_probs = predictions(loaded)
    np.testing.assert_array_equal(new_labels, labels)
    np.testing.assert_allclose(new_probs, probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded.get_metagenes().to_numpy(), model.get_metagenes().to_numpy())
    # the original model still works on its AnnData after another model was loaded onto it
    np.testing.assert_array_equal(model.predict(), labels)


def test_load_saved_anndata(trained, saved_dir):
    model, adata = trained
    loaded = RMGEModel.load(str(saved_dir), accelerator="cpu")
    assert loaded.adata is not adata
    assert loaded.adata.obs_names.equals(adata.obs_names)
    np.testing.assert_array_equal(loaded.predict(), model.predict())
    np.testing.assert_allclose(loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), atol=1e-7)


def test_save_refuses_existing_folder(trained, saved_dir):
    model, _ = trained
    before = sorted(os.listdir(saved_dir))
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        model.save(str(saved_dir))
    assert sorted(os.listdir(saved_dir)) == before


def _fail(*args, **kwargs):
    raise OSError("simulated disk failure")


@pytest.mark.parametrize("target", ["model_save", "torch_save"])
def test_failed_save_keeps_old_model(trained, tmp_path, monkeypatch, target):
    model, adata = trained
    labels, probs = predictions(model)
    path = tmp_path / "model"
    model.save(str(path))
    before = sorted(os.listdir(path))
    if target == "model_save":
        monkeypatch.setattr(BaseModelClass, "save", _fail)
    else:
        monkeypatch.setattr(torch, "save", _fail)
    with pytest.raises(OSError, match="simulated disk failure"):
        model.save(str(path), overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before
    assert sorted(os.listdir(tmp_path)) == ["model"], "temporary folders were left behind"
    old = RMGEModel.load(str(path), adata=adata, accelerator="cpu")
    new_labels, new_probs = predictions(old)
    np.testing.assert_array_equal(new_labels, labels)
    np.testing.assert_allclose(new_probs, probs, rtol=1e-6, atol=1e-7)


def test_save_overwrite_replaces_model(trained, tmp_path):
    model, adata = trained
    path = tmp_path / "model"
    model.save(str(path))
    model.save(str(path), overwrite=True, save_anndata=True)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    loaded = RMGEModel.load(str(path), accelerator="cpu")  # the AnnData written by the second save
    np.testing.assert_array_equal(loaded.predict(), model.predict())


def _other_genes(adata: ad.AnnData, how: str) -> ad.AnnData:
    if how == "dropped":
        return adata[:, 1:].copy()
    other = adata.copy()
    names = other.var_names.to_numpy().copy()
    if how == "renamed":
        names[3] = "not_a_gene"
        other.var_names = names
        return other
    return other[:, names[::-1]].copy()  # reordered


@pytest.mark.parametrize("how", ["dropped", "renamed", "reordered"])
def test_load_with_other_genes(trained, saved_dir, how):
    _, adata = trained
    other = _other_genes(adata, how)
    with pytest.raises(ValueError, match="genes do not match"):
        RMGEModel.load(str(saved_dir), adata=other, accelerator="cpu")


@pytest.mark.parametrize("how", ["dropped", "renamed", "reordered"])
def test_predict_with_other_genes(trained, how):
    model, adata = trained
    other = _other_genes(adata, how)
    with pytest.raises(ValueError, match="genes do not match"):
        model.predict(other)


def test_predict_new_anndata(trained):
    model, adata = trained
    idx = spatial_indices(adata)
    new = ad.AnnData(
        X=sp.csr_matrix(adata.X[idx]),
        obs=pd.DataFrame(index=adata.obs_names[idx].copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    with pytest.warns(UserWarning, match="no domain column"):
        labels = model.predict(new)
    with pytest.warns(UserWarning, match="no domain column"):
        probs = model.predict(new, soft=True)
    np.testing.assert_array_equal(labels, model.predict(indices=idx))
    assert probs.index.equals(new.obs_names)
    np.testing.assert_allclose(probs.to_numpy(), model.predict(indices=idx, soft=True).to_numpy(), atol=1e-6)
    with pytest.warns(UserWarning, match="no domain column"):
        z = model.get_latent_representation(new)
    np.testing.assert_allclose(z, model.get_latent_representation(indices=idx), atol=1e-5)


def test_spatial_composition_estimates_the_true_shares(trained):
    model, adata = trained
    comp = model.spatial_composition()
    assert list(comp.index) == model.classes_ and comp.sum() == pytest.approx(1.0)
    truth = adata.obs[TRUTH].to_numpy()[spatial_indices(adata)].astype(str)
    shares = pd.Series(truth).value_counts(normalize=True).reindex(model.classes_).fillna(0.0)
    np.testing.assert_allclose(comp.to_numpy(), shares.to_numpy(), atol=0.05)


def test_cells_without_counts_get_the_empty_cell_probabilities(trained):
    model, adata = trained
    idx = spatial_indices(adata)[:40]
    X = sp.csr_matrix(adata.X[idx]).tolil()
    X[:8] = 0
    new = ad.AnnData(
        X=X.tocsr(), obs=pd.DataFrame({"domain": "spatial"}, index=adata.obs_names[idx].copy()), var=adata.var[[]]
    )
    with pytest.warns(UserWarning, match="8 cell\\(s\\) have no counts over the model's genes"):
        probs = model.predict(new, soft=True).to_numpy()
    comp = model.empty_cell_probabilities().to_numpy()
    np.testing.assert_allclose(probs[:8], np.tile(comp, (8, 1)), atol=1e-7)
    # the other cells are predicted as before
    np.testing.assert_allclose(probs[8:], model.predict(indices=idx[8:], soft=True).to_numpy(), atol=1e-6)
    with pytest.warns(UserWarning, match="no counts"):
        labels = model.predict(new, novelty_threshold=2.0)
        unsure = model.predict(new, unknown_threshold=comp.max() + 0.01)
    assert (labels[:8] == model.classes_[int(comp.argmax())]).all()
    assert (unsure[:8] == "Unknown").all()
    scores = model.novelty_score(new)
    assert scores.iloc[:8].isna().all() and scores.iloc[8:].notna().all()


def test_empty_cells_favour_types_with_little_rna():
    # types differ in depth: a cell without counts more likely belongs to a shallow type. The posterior
    # is the composition times each type's chance of leaving a cell empty, computed here by hand
    adata = make_adata(n_reference=400, n_spatial=400, n_genes=100, n_classes=3, spatial_depth_ratio=0.02, seed=7)
    types = adata.obs[LABELS].astype(str).to_numpy()
    ref = reference_indices(adata)
    X = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    shallow = np.flatnonzero(types == "type_0")
    X = sp.csr_matrix(sp.diags(np.where(np.isin(np.arange(adata.n_obs), shallow), 0.2, 1.0)) @ X)
    X.data = np.floor(X.data)
    X.eliminate_zeros()
    adata.X = X
    adata = adata[np.asarray(X.sum(1)).ravel() > 0].copy()
    model = train_model(adata, seed=0, max_epochs=5)
    comp = model.spatial_composition().to_numpy()
    post = model.empty_cell_probabilities().to_numpy()
    assert post.sum() == pytest.approx(1.0)
    assert post[0] / comp[0] > 1.5 * post[1] / comp[1], (post, comp)
    # by hand: s solves the zero-truncated Poisson mean, the likelihood is the mean exp(-s L) per type
    ref = reference_indices(adata)
    lib = np.asarray(adata.X[ref].sum(1)).ravel()
    codes = adata.obs[LABELS].astype(str).to_numpy()[ref]
    depth = float(model.module.spatial_lib_quantiles.double().mean())
    libs = [lib[codes == name] for name in model.classes_]

    def truncated_mean(s):
        # the composition of the cells with counts weighs each type's zero-truncated mean
        return sum(w * (s * v).mean() / (1 - np.exp(-s * v)).mean() for w, v in zip(comp, libs, strict=True))

    from scipy.optimize import brentq

    s = brentq(lambda s: truncated_mean(s) - depth, 1e-9, 1e3)
    empty = np.array([np.exp(-s * v).mean() for v in libs])
    # composition of all cells = composition of the cells with counts / chance of counts
    expected = comp / (1 - empty) * empty
    np.testing.assert_allclose(post, expected / expected.sum(), rtol=0.05, atol=0.01)


def test_empty_cell_probabilities_match_the_types_of_the_empty_cells():
    # the known answer: spatial cells of ~3 counts, one type 5x shallower on both sides; the cells that
    # come out empty are dropped before set-up (as prepare does), and the posterior must match their types.
    # The composition the model estimates is that of the cells with counts, where the shallow type is
    # under-represented: weighing it by the chance of an empty cell alone under-counts that type
    ref, spa = rmge.datasets.synthetic(
        n_reference=600, n_spatial=1500, n_genes=100, n_classes=3, spatial_depth_ratio=0.0015, seed=3
    )
    rng = np.random.default_rng(0)
    for data in (ref, spa):
        X = sp.csr_matrix(data.X, dtype=np.float32, copy=True)
        shallow = np.repeat(data.obs[LABELS].astype(str).to_numpy() == "type_0", np.diff(X.indptr))
        X.data = np.where(shallow, rng.binomial(X.data.astype(np.int64), 0.2), X.data).astype(np.float32)
        X.eliminate_zeros()
        data.X = X
    has_counts = np.asarray(spa.X.sum(1)).ravel() > 0
    empty_truth = pd.Series(spa.obs[LABELS].astype(str).to_numpy()[~has_counts])
    assert 200 < len(empty_truth) < 1200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata = rmge.pp.prepare(ref, spa[has_counts].copy(), labels_key=LABELS, n_top_genes=None)
    model = train_model(adata, seed=0, max_epochs=5)
    # the composition of the cells with counts, as a well-trained model would estimate it: the check is
    # on the posterior given it (five epochs on ~3 counts a cell do not estimate it well)
    with_counts = pd.Series(spa.obs[LABELS].astype(str).to_numpy()[has_counts])
    comp = with_counts.value_counts(normalize=True).reindex(model.classes_).fillna(0.0)
    model._composition = comp.rename("composition")
    comp = comp.to_numpy()
    post = model.empty_cell_probabilities().to_numpy()
    shares = empty_truth.value_counts(normalize=True).reindex(model.classes_).fillna(0.0).to_numpy()
    naive_e = model._empty_likelihood(comp)
    naive = comp * naive_e / (comp * naive_e).sum()
    assert np.abs(post - shares).max() < 0.08, (post, shares)
    assert np.abs(post - shares).sum() < 0.5 * np.abs(naive - shares).sum(), (post, naive, shares)


@pytest.mark.parametrize(
    ("change", "message"),
    [("negative", "negative values"), ("nan", "non-finite"), ("log", "look log-normalised")],
)
def test_new_anndata_values_are_checked(trained, change, message):
    model, adata = trained
    idx = spatial_indices(adata)[:300]
    X = sp.csr_matrix(adata.X[idx], dtype=np.float32)
    if change == "negative":
        X.data[0] = -1.0
    elif change == "nan":
        X.data[0] = np.nan
    else:
        X.data = np.log1p(X.data * 3.7)
    new = ad.AnnData(X=X, obs=pd.DataFrame({"domain": "spatial"}, index=adata.obs_names[idx].copy()), var=adata.var[[]])
    with pytest.raises(ValueError, match=message):
        model.predict(new)


# ------------------------------------------------------------------ reproducibility and input formats


def test_seed_reproducibility(synthetic_adata):
    runs = [train_model(synthetic_adata.copy(), seed=s, max_epochs=3) for s in (0, 0, 1)]
    (l0, p0), (l1, p1), (_, p2) = (predictions(m) for m in runs)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(p0, p1)
    assert not np.allclose(p0, p2), "a different seed gave the same probabilities"


def test_training_after_prediction_trains_as_a_fresh_model(synthetic_adata):
    # a prediction leaves the module in evaluation mode; training must still use its input dropout
    # (Lightning keeps a submodule's mode), so the result equals that of a model never asked before
    fresh = train_model(synthetic_adata.copy(), seed=0, max_epochs=3)
    scvi.settings.seed = 0
    adata = synthetic_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    asked = RMGEModel(adata)
    asked.module.eval()  # as predict() leaves it
    asked.train(max_epochs=3, **TRAIN_KWARGS)
    torch.testing.assert_close(asked.module.encoder.weight, fresh.module.encoder.weight)
    np.testing.assert_allclose(predictions(asked)[1], predictions(fresh)[1], rtol=1e-5, atol=1e-6)


def test_pseudo_labels_count_from_the_first_step(synthetic_adata):
    # the metagenes start at the reference centroids, the pseudo-labels' best teacher: no warm-up by default
    default = train_model(synthetic_adata.copy(), seed=0, max_epochs=3)
    warm = synthetic_adata.copy()
    RMGEModel.setup_anndata(warm, labels_key=LABELS)
    warmed = RMGEModel(warm)
    warmed.train(max_epochs=3, plan_kwargs={"pseudo_label_warmup": 0.5}, **TRAIN_KWARGS)
    key = next(k for k in default.history if k.startswith("pseudo_label_loss") and "train" in k)
    assert float(default.history[key].iloc[0, 0]) > 0
    assert float(warmed.history[key].iloc[0, 0]) == 0.0


def test_adversarial_warmup_leaves_the_adversary_out(synthetic_adata):
    # a warm-up that lasts all training gives the model trained without the adversarial term (the
    # discriminator still trains, on detached probabilities, and draws no random numbers)
    scvi.settings.seed = 0
    adata = synthetic_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    warm = RMGEModel(adata)
    warm.train(max_epochs=3, plan_kwargs={"adversarial_warmup": 1.0}, **TRAIN_KWARGS)
    off = train_model(synthetic_adata.copy(), seed=0, max_epochs=3, adversarial_weight=0.0)
    on = train_model(synthetic_adata.copy(), seed=0, max_epochs=3)
    w = [m.module.encoder.weight.detach() for m in (warm, off, on)]
    torch.testing.assert_close(w[0], w[1])
    assert not torch.allclose(w[0], w[2])


def test_pseudo_labels_without_input_dropout(synthetic_adata):
    # without dropout the clean profiles are the ones the encoder sees; pseudo-labels still work
    model = train_model(synthetic_adata.copy(), seed=0, max_epochs=6, dropout_rate=0.0)
    assert spatial_accuracy(model, synthetic_adata) >= 0.8


def test_sparse_and_dense_input(trained, synthetic_adata):
    model, adata = trained
    assert sp.issparse(adata.X)
    dense = synthetic_adata.copy()
    dense.X = dense.X.toarray()
    dense_model = train_model(dense)
    acc_sparse = spatial_accuracy(model, adata)
    acc_dense = spatial_accuracy(dense_model, dense)
    assert acc_dense >= 0.9
    assert abs(acc_sparse - acc_dense) <= 0.03
    agree = (model.predict() == dense_model.predict()).mean()
    assert agree >= 0.95


def test_max_steps_inside_the_first_epoch(small_adata):
    # training that ends before the first validation has nothing to stop early on: it must not fail
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata)
    model.train(max_steps=1, batch_size=8, **TRAIN_KWARGS)
    # Lightning counts the model's and the discriminator's optimiser steps
    assert model.is_trained_ and model.trainer.global_step == 2
    assert np.isfinite(model.module.calibration_temperature.item())


def test_original_preset_with_cells_thinned_to_zero():
    adata = make_adata(spatial_depth_ratio=0.0015, seed=1)
    depth = np.asarray(adata.X.sum(1)).ravel()
    assert np.median(depth[spatial_indices(adata)]) <= 4
    model = train_model(adata, max_epochs=8, **RMGEModel.ORIGINAL)
    # the test holds only if sparsity matching really empties reference cells
    assert model.module.sparsity_matching
    ref_counts = torch.as_tensor(adata.X[reference_indices(adata)].toarray())
    torch.manual_seed(0)
    assert (model.module.thin(ref_counts).sum(1) == 0).any()
    for key, frame in model.history.items():
        assert np.all(np.isfinite(frame.to_numpy(dtype=float))), key
    assert np.all(np.isfinite(model.get_latent_representation()))
    probs = model.predict(soft=True).to_numpy()
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ bad input


def test_missing_label_column(small_adata):
    with pytest.raises(ValueError, match="Label column 'nope' not found"):
        RMGEModel.setup_anndata(small_adata, labels_key="nope")


def test_unknown_domain_column(small_adata):
    with pytest.raises(ValueError, match="Domain column 'nope' not found"):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS, domain_key="nope")


def test_no_reference_cells(small_adata):
    with pytest.raises(ValueError, match="No reference cells.*reference_domain='ref'"):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS, reference_domain="ref")


def test_no_query_cells(small_adata):
    ref_only = small_adata[reference_indices(small_adata)].copy()
    with pytest.raises(ValueError, match="No query cells"):
        RMGEModel.setup_anndata(ref_only, labels_key=LABELS)


def test_single_class(small_adata):
    labels = small_adata.obs[LABELS].astype(object)
    labels[labels.notna()] = "type_0"
    small_adata.obs[LABELS] = pd.Categorical(labels)
    with pytest.raises(ValueError, match="single cell type.*at least two"):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "negative values"), (np.nan, "non-finite"), (np.inf, "non-finite")],
    ids=["negative", "nan", "inf"],
)
def test_bad_values(small_adata, value, match, dense):
    X = small_adata.X.copy()
    X.data[5] = value
    small_adata.X = X.toarray() if dense else X
    with pytest.raises(ValueError, match=match):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS)


def test_log_normalized_data(small_adata):
    X = small_adata.X.copy().astype(np.float64)
    lib = np.asarray(X.sum(1)).ravel()
    X = sp.csr_matrix(sp.diags(1e4 / lib) @ X)
    X.data = np.log1p(X.data)
    small_adata.X = X.astype(np.float32)
    with pytest.raises(ValueError, match="look log-normalised.*counts"):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS)


def test_empty_cells(small_adata):
    X = small_adata.X.tolil()
    X[[0, len(reference_indices(small_adata))], :] = 0  # one reference and one spatial cell
    small_adata.X = X.tocsr()
    with pytest.raises(ValueError, match=r"2 cell\(s\) have no counts \(1 reference, 1 spatial\)"):
        RMGEModel.setup_anndata(small_adata, labels_key=LABELS)


def test_unknown_prior_class(small_adata):
    RMGEModel.setup_anndata(small_adata, labels_key=LABELS)
    with pytest.raises(ValueError, match=r"`prior` names classes not in the reference: \['nope'\]"):
        RMGEModel(small_adata, prior={"type_0": 0.5, "nope": 0.5})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"entropy_on": "x"}, "`entropy_on` must be one of"),
        ({"reconstruct": "x"}, "`reconstruct` must be one of"),
        ({"adversarial_target": "x"}, "`adversarial_target` must be one of"),
        ({"class_weight": "x"}, "`class_weight` must be one of"),
        ({"dropout_rate": 1.0}, r"`dropout_rate` must be 'auto' or a number in \[0, 1\)"),
        ({"dropout_rate": "high"}, r"`dropout_rate` must be 'auto' or a number in \[0, 1\)"),
        ({"prior": "x"}, "`prior` must be 'reference', 'uniform'"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_invalid_options(small_adata, kwargs, match):
    RMGEModel.setup_anndata(small_adata, labels_key=LABELS)
    with pytest.raises(ValueError, match=match):
        RMGEModel(small_adata, **kwargs)


def test_predict_before_train(small_adata):
    RMGEModel.setup_anndata(small_adata, labels_key=LABELS)
    model = RMGEModel(small_adata)
    with pytest.raises(RuntimeError, match="untrained model.*train the model first"):
        model.predict()
    with pytest.raises(RuntimeError, match="train the model first"):
        model.get_latent_representation()


def test_map_cells_finds_the_nearest_reference_cell_of_the_predicted_type(trained):
    model, adata = trained
    pairing = model.map_cells(k=2, method="exact")
    z = pd.DataFrame(model.get_latent_representation(), index=adata.obs_names)
    predicted = pd.Series(model.predict(), index=adata.obs_names)
    ref = adata.obs_names[reference_indices(adata)]
    ref_labels = adata.obs.loc[ref, LABELS].astype(str)
    table = pairing.table
    assert set(table["spatial_cell"]) == set(adata.obs_names[spatial_indices(adata)])
    # partners have the spatial cell's predicted type, and rank 1 is the brute-force nearest one
    assert (ref_labels.loc[table["reference_cell"]].to_numpy() == predicted.loc[table["spatial_cell"]].to_numpy()).all()
    first = table[table["rank"] == 1].set_index("spatial_cell")
    for cell in first.index[:50]:
        same = ref[ref_labels.to_numpy() == predicted[cell]]
        d = np.linalg.norm(z.loc[same].to_numpy() - z.loc[cell].to_numpy(), axis=1)
        assert first.loc[cell, "reference_cell"] == same[d.argmin()]
        assert first.loc[cell, "distance"] == pytest.approx(d.min(), rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(np.asarray(pairing.weights.sum(1)).ravel(), 1.0, atol=1e-6)


def test_unknown_threshold_labels_low_confidence_cells_unknown(trained):
    model, _ = trained
    probs = model.predict(soft=True)
    labels = model.predict()
    threshold = float(np.median(probs.max(1)))
    with_unknown = model.predict(unknown_threshold=threshold)
    low = probs.max(1).to_numpy() < threshold
    assert low.any() and (~low).any()
    assert (with_unknown[low] == "Unknown").all()
    np.testing.assert_array_equal(with_unknown[~low], labels[~low])
    np.testing.assert_array_equal(model.predict(unknown_threshold=0.0), labels)
    with pytest.raises(ValueError, match="unknown_threshold"):
        model.predict(unknown_threshold=1.5)


def test_capture_factor_is_shrunk_towards_one_for_rarely_seen_genes():
    # same technology, spatial = the reference's profiles at 2% depth: every true factor is 1, except one
    # abundant gene the spatial platform captures 3x better
    rng = np.random.default_rng(0)
    n_genes, n_cells = 200, 600
    base = rng.gamma(0.5, size=n_genes)
    base[0] = 20.0  # abundant gene
    p = base / base.sum()
    ref = rng.poisson(3000 * p, size=(n_cells, n_genes))
    p_sp = p.copy()
    p_sp[0] *= 3.0
    p_sp /= p_sp.sum()
    spa = rng.poisson(60 * p_sp, size=(n_cells, n_genes))
    spa[spa.sum(1) == 0, 0] = 1
    labels = pd.Categorical(np.where(np.arange(n_cells) % 2 == 0, "a", "b"))
    X = sp.csr_matrix(np.vstack([ref, spa]).astype(np.float32))
    obs = pd.DataFrame(
        {
            "domain": pd.Categorical(["reference"] * n_cells + ["spatial"] * n_cells),
            "cell_type": pd.Categorical(list(labels) + [None] * n_cells, categories=["a", "b"]),
        },
        index=[f"c{i}" for i in range(2 * n_cells)],
    )
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    RMGEModel.setup_anndata(adata, labels_key="cell_type", domain_key="domain")
    model = RMGEModel(adata)
    assert model.module.sparsity_matching
    factor = model.module.gene_factor.cpu().numpy()
    expected_counts = p * 60 * n_cells
    rare = (expected_counts < 5) & (np.arange(n_genes) > 0)
    assert rare.sum() > 20
    # genes seen a handful of times keep a factor near 1 (the raw ratio would range from 0.01 to over 10)
    assert np.all((factor[rare] > 0.5) & (factor[rare] < 2.0))
    # the abundant gene's capture difference is recovered (relative to the typical gene)
    assert 2.4 < factor[0] / np.median(factor[1:]) < 3.6
