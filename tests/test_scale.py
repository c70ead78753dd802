"""Tests of the large-data paths: compiled kernels, the minibatch loader, the default stopping point,
backed (on-disk) AnnData, sparse inference and data-parallel training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from scipy import stats

import rmge
from rmge import RMGEModel
from rmge.model import _model as model_mod
from rmge.model._kernels import cosine_inputs, sparse_logits, thin_counts
from rmge.model._trainingplan import MinibatchSource, PairedMinibatches

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*smaller than the logging interval.*",
)

LABELS = "cell_type"
TRUTH = f"{LABELS}_spatial"
TRAIN_KWARGS = {"enable_progress_bar": False, "accelerator": "cpu"}


def make_adata(n_reference=600, n_spatial=600, n_genes=100, n_classes=4, seed=0) -> ad.AnnData:
    ref, spa = rmge.datasets.synthetic(
        n_reference=n_reference,
        n_spatial=n_spatial,
        n_genes=n_genes,
        n_classes=n_classes,
        spatial_depth_ratio=0.1,
        platform_shift=0.5,
        seed=seed,
    )
    spa = spa[np.asarray(spa.X.sum(1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rmge.pp.prepare(ref, spa, labels_key=LABELS, n_top_genes=None)


@pytest.fixture(scope="module")
def small_adata() -> ad.AnnData:
    return make_adata()


# ------------------------------------------------------------------ kernels


def test_thinning_draws_binomial_counts():
    # counts of up to 4, up to 8, up to 16 and above take different paths of the kernel
    ns = np.array([0, 1, 2, 3, 7, 40, 300, 5, 9, 4, 8, 12, 16, 17])
    ps = np.array([0.3, 0.08, 0.5, 0.9, 0.3, 0.12, 0.999, 1.0, 0.0, 0.6, 0.1, 0.35, 0.02, 0.7])
    reps = 40_000
    x = torch.tensor(np.tile(ns, (reps, 1)), dtype=torch.float32)
    torch.manual_seed(0)
    k = thin_counts(x, torch.ones(reps), torch.tensor(ps, dtype=torch.float32)).numpy()
    assert k.dtype == np.float32 and k.shape == x.shape
    for j, (n, p) in enumerate(zip(ns, ps, strict=True)):
        col = k[:, j]
        assert col.min() >= 0 and col.max() <= n
        if p in (0.0, 1.0) or n == 0:
            np.testing.assert_array_equal(col, n * p)  # nothing drawn: all kept or all dropped
            continue
        observed = np.bincount(col.astype(int), minlength=n + 1)
        expected = stats.binom.pmf(np.arange(n + 1), n, p) * reps
        keep = expected > 5
        chi2 = (((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum()
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, (n, p)
    # torch's seed makes the draws reproducible
    torch.manual_seed(1)
    a = thin_counts(x[:50], torch.ones(50), torch.tensor(ps, dtype=torch.float32))
    torch.manual_seed(1)
    b = thin_counts(x[:50], torch.ones(50), torch.tensor(ps, dtype=torch.float32))
    assert torch.equal(a, b)


def _centred_unit(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


@pytest.mark.parametrize("standardize", [True, False])
def test_compiled_inputs_equal_the_tensor_operations(small_adata, standardize):
    # the CPU path of inference (one compiled pass) gives what normalize() and encode() give with tensor ops
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata, standardize=standardize)
    module = model.module.eval()
    x = torch.as_tensor(adata.X[:300].toarray(), dtype=torch.float32)
    x[0, :5] += torch.tensor([0.5, 300.0, 1000.0, 2.25, 7.0])  # non-integer and large values take the slow path
    g = torch.as_tensor(np.array(model.adata_manager.get_from_registry("batch")).ravel()[:300]).view(-1, 1)
    with torch.inference_mode():
        out = module.inference(x, g)
        x_norm = module.normalize(x.clone(), g.view(-1))
        z = module.encode(x_norm, dropout=False)
    torch.testing.assert_close(out["x_norm"], x_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_sq"], x_norm.square().sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["z"], z, rtol=1e-4, atol=1e-4)


def test_compiled_dropout_and_thinning():
    gen = torch.Generator().manual_seed(0)
    n, m = 400, 300
    x = 1.0 + torch.poisson(torch.full((n, m), 2.0), generator=gen)  # no zeros: every log value is positive
    groups = torch.zeros(n, dtype=torch.long)
    mean, inv_std = torch.zeros(1, m), torch.ones(1, m)
    clean_rows = torch.arange(n) % 3 == 0
    torch.manual_seed(0)
    x_norm, x_drop, x_clean, x_sq = cosine_inputs(
        x, groups, mean, inv_std, standardize=False, dropout=0.3, clean=clean_rows
    )
    expected = torch.log1p(x * (1e4 / x.sum(1, keepdim=True)))
    torch.testing.assert_close(x_norm, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_sq, expected.square().sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x_clean, _centred_unit(expected)[clean_rows], rtol=1e-4, atol=1e-5)
    # a dropped entry is the row's centred zero, its smallest value: recover the mask and compare
    kept = x_drop > x_drop.min(1, keepdim=True).values + 1e-6
    frac = float(kept.float().mean())
    assert abs(frac - 0.7) < 4 * np.sqrt(0.21 / kept.numel())
    torch.testing.assert_close(x_drop, _centred_unit(expected * kept), rtol=1e-4, atol=1e-5)
    # a fresh mask at each call; torch's seed makes it reproducible
    torch.manual_seed(0)
    again = cosine_inputs(x, groups, mean, inv_std, standardize=False, dropout=0.3, clean=False)
    torch.manual_seed(1)
    other = cosine_inputs(x, groups, mean, inv_std, standardize=False, dropout=0.3, clean=False)
    assert again[2] is None and torch.equal(again[1], x_drop) and not torch.equal(other[1], x_drop)

    # thinning of the rows with a positive scale: counts of 1 are kept with probability scale * factor
    ones = torch.ones(n, m)
    scale = torch.where(torch.arange(n) < n // 2, 0.25, 0.0)
    factor = torch.linspace(0.5, 1.5, m)
    x_norm, _, _, _ = cosine_inputs(
        ones, groups, mean, inv_std, standardize=False, dropout=0.0, clean=True, thin_scale=scale, factor=factor
    )
    kept = (x_norm[: n // 2] > 0).float()
    expected = (0.25 * factor).reshape(10, -1).mean(1)
    sd = np.sqrt(0.25 * 0.75 / (n // 2 * m // 10))  # binomial sampling error of each group of genes
    np.testing.assert_allclose(kept.mean(0).reshape(10, -1).mean(1), expected, atol=4 * sd)
    torch.testing.assert_close(x_norm[n // 2 :], torch.full((n // 2, m), float(np.log1p(1e4 / m))))


def test_compiled_depth_matching_uses_the_module_scale(small_adata):
    # rows with a negative scale are thinned at the depth-matched scale of RMGEModule._thin_scale, computed
    # in the pass: with the rank jitter off, every row of ones keeps ~scale * factor of its entries
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    module = RMGEModel(adata).module
    module.rank_jitter = 0.0
    n, m = 400, module.n_input
    x = torch.ones(n, m)
    scale = float(module._thin_scale(x[:1])[0])
    p = (scale * module.gene_factor).clamp(max=1.0)
    assert 0.01 < float(p.mean()) < 0.9, "the test needs a scale that thins"
    groups = torch.zeros(n, dtype=torch.long)
    depth = (module.ref_lib_quantiles, module.spatial_lib_quantiles, 0.0)
    x_norm, _, _, _ = cosine_inputs(
        x, groups, torch.zeros(1, m), torch.ones(1, m), standardize=False, dropout=0.0, clean=True,
        thin_scale=torch.full((n,), -1.0), factor=module.gene_factor, depth=depth, seed=1,
    )  # fmt: skip
    kept = (x_norm > 0).double().mean()
    expected = float(p.double().mean())
    assert abs(float(kept) - expected) < 4 * np.sqrt(expected * (1 - expected) / (n * m))
    with pytest.raises(ValueError, match="depth"):
        cosine_inputs(x, groups, torch.zeros(1, m), torch.ones(1, m), standardize=False, dropout=0.0,
                      clean=True, thin_scale=torch.full((n,), -1.0), factor=module.gene_factor)  # fmt: skip


def test_inference_uses_inputs_prepared_ahead(small_adata):
    # the loader prepares the compiled pass of the next minibatch in a background thread: inference uses it
    # when it was made with the module's settings (the same seed gives the same activities), and makes its
    # own otherwise
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    module = RMGEModel(adata).module.train()
    x = torch.as_tensor(adata.X[:200].toarray(), dtype=torch.float32)
    g = torch.as_tensor(np.array(RMGEModel._get_most_recent_anndata_manager(adata).get_from_registry("batch")))
    g = g.view(-1)[:200]

    def prepare(seed, training=True):
        return module.compiled_inputs(x, g, thin=True, training=training, clean=training, seed=seed)

    prepared = prepare(7)
    a = module.inference(x, g, thin=True, prepared=prepared)
    b = module.inference(x, g, thin=True, prepared=prepare(7))
    c = module.inference(x, g, thin=True, prepared=prepare(8))
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["z_clean"], b["z_clean"])
    assert not torch.equal(a["z"], c["z"])
    assert a["x_norm"] is prepared["x_norm"]
    # made for evaluation (no dropout): not used in training mode
    d = module.inference(x, g, thin=True, prepared=prepare(7, training=False))
    assert d["x_norm"] is not prepared["x_norm"] and "z_clean" in d


def _loader_inputs(small_adata):
    """A set-up copy of ``small_adata``, its minibatch source and its reference and spatial rows."""
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    source = MinibatchSource(RMGEModel._get_most_recent_anndata_manager(adata))
    ref = np.flatnonzero((adata.obs["domain"] == "reference").to_numpy())
    spa = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    return adata, source, ref, spa


def test_loader_prepares_the_next_minibatch_ahead(small_adata):
    _, source, ref, spa = _loader_inputs(small_adata)
    seen = []

    def prepare(batch, seed):
        seen.append(seed)
        return lambda: {"total": batch["X"].sum(), "seed": seed}

    def run():
        loader = PairedMinibatches(source, [ref, spa], 32, shuffle=True, steps_per_epoch=5, seed=3, prepare=prepare)
        return [b for b in loader]

    first, second = run(), run()
    assert len(first) == 5 and all(float(b["rmge_prepared"]["total"]) == float(b["X"].sum()) for b in first)
    # the same seeds and minibatches on every run with the same loader seed
    assert [b["rmge_prepared"]["seed"] for b in first] == [b["rmge_prepared"]["seed"] for b in second]
    assert all(torch.equal(a["X"], b["X"]) for a, b in zip(first, second, strict=True))
    assert len(set(seen[:5])) == 5  # a fresh seed for every minibatch
    # the same minibatches as without preparation
    plain = list(PairedMinibatches(source, [ref, spa], 32, shuffle=True, steps_per_epoch=5, seed=3))
    assert all(torch.equal(a["X"], b["X"]) for a, b in zip(first, plain, strict=True))


def test_validation_loader_draws_the_same_seeds_every_pass(small_adata):
    # validation thins the held-out cells with the same draws every time (successive losses compare the
    # model, not a new draw); training draws afresh on every pass
    _, source, ref, spa = _loader_inputs(small_adata)

    def prepare(batch, seed):
        return lambda: seed

    def seeds(loader):
        return [b["rmge_prepared"] for b in loader]

    validation = PairedMinibatches(source, [ref, spa], 32, shuffle=False, seed=3, prepare=prepare)
    first = seeds(validation)
    assert len(first) > 1 and len(set(first)) == len(first)
    assert seeds(validation) == first
    training = PairedMinibatches(source, [ref, spa], 32, shuffle=True, steps_per_epoch=4, seed=3, prepare=prepare)
    assert set(seeds(training)).isdisjoint(seeds(training))


@pytest.mark.parametrize(
    "kwargs", [{}, {"reduction": "sum"}, {"weight": "w", "label_smoothing": 0.1}, {"reduction": "none"}]
)
def test_row_softmax_and_cross_entropy_equal_torch(kwargs):
    from rmge.model._module import cross_entropy_rows, softmax_rows

    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(300, 13, generator=gen, dtype=torch.float64) * 4
    target = torch.randint(0, 13, (300,), generator=gen)
    if kwargs.get("weight") == "w":
        kwargs = {**kwargs, "weight": torch.rand(13, generator=gen, dtype=torch.float64) + 0.1}
    # values and gradients: ours, then torch's
    z = z0.clone().requires_grad_(True)
    p, loss = softmax_rows(z), cross_entropy_rows(z, target, **kwargs)
    assert p.shape == z.shape and loss.shape == (() if kwargs.get("reduction") != "none" else (300,))
    (p[:, 0].sum() + loss.sum()).backward()
    z_ref = z0.clone().requires_grad_(True)
    p_ref = torch.nn.functional.softmax(z_ref, dim=-1)
    loss_ref = torch.nn.functional.cross_entropy(z_ref, target, **kwargs)
    (p_ref[:, 0].sum() + loss_ref.sum()).backward()
    torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.sum(-1), torch.ones(300, dtype=torch.float64))


def test_reconstruction_error_equals_the_reconstruction(small_adata):
    # training computes the reconstruction error without forming x_hat: same values and same gradients
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    module = RMGEModel(adata).module
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.decoder.weight.normal_(generator=gen)
        module.decoder.bias.normal_(generator=gen)
    x_norm = torch.randn(64, module.n_input, generator=gen).clamp(-10, 10)
    z = torch.randn(64, module.n_labels, generator=gen, requires_grad=True)
    direct = ((module.generative(z)["x_hat"] - x_norm) ** 2).mean(-1)
    expanded = module.reconstruction_error(z, x_norm)
    torch.testing.assert_close(expanded, direct, rtol=1e-4, atol=1e-4)
    given = module.reconstruction_error(z, x_norm, x_norm.square().sum(-1))
    torch.testing.assert_close(given, direct, rtol=1e-4, atol=1e-4)
    params = [z, module.decoder.weight, module.decoder.bias]
    g_direct = torch.autograd.grad(direct.sum(), params)
    g_expanded = torch.autograd.grad(expanded.sum(), params)
    for a, b in zip(g_expanded, g_direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    # the loss takes either form
    assert "x_hat" not in module.generative(z, materialize=False)


@pytest.mark.parametrize(
    "settings",
    [{}, {"classifier": "linear"}, {"standardize": False}, {"classifier": "linear", "standardize": False}],
)
def test_sparse_inference_equals_the_module(small_adata, settings):
    adata = small_adata.copy()
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key=LABELS, batch_key=None)
    model = RMGEModel(adata, init_metagenes="random", **settings)
    model.module.eval()
    X = adata.X
    groups = np.array(model.adata_manager.get_from_registry("batch")).ravel()
    z = sparse_logits(model.module, X, groups)
    with torch.inference_mode():
        dense = model.module.inference(torch.as_tensor(X.toarray()), torch.as_tensor(groups).view(-1, 1))["z"]
    np.testing.assert_allclose(z, dense.numpy(), rtol=1e-4, atol=1e-4)


def test_sparse_inference_computes_the_count_evidence(small_adata):
    # the compiled pass fills the count evidence alongside the activities, equal to the module's own
    adata = small_adata.copy()
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key=LABELS, batch_key=None)
    model = RMGEModel(adata)
    module = model.module
    module.eval()
    rng = np.random.default_rng(0)
    profiles = rng.dirichlet(np.ones(module.n_input), size=module.n_labels)
    module.count_log_profiles.copy_(torch.as_tensor(np.log(profiles), dtype=torch.float32))
    X = sp.csr_matrix(adata.X)
    lib = np.asarray(X.sum(1)).ravel()
    module.count_depth.fill_(float(np.median(lib)))  # deeper cells are scaled down, shallower ones not
    groups = np.array(model.adata_manager.get_from_registry("batch")).ravel()
    evidence = np.empty((X.shape[0], module.n_labels), dtype=np.float32)
    z = sparse_logits(module, X, groups, evidence=evidence)
    np.testing.assert_allclose(z, sparse_logits(module, X, groups), rtol=1e-6, atol=1e-6)
    # by hand: the multinomial log-likelihood, shifted by its row maximum, scaled by min(1, depth / library)
    ll = X @ np.log(profiles.astype(np.float32)).astype(np.float64).T
    expected = (ll - ll.max(1, keepdims=True)) * np.minimum(1.0, float(module.count_depth) / lib)[:, None]
    np.testing.assert_allclose(evidence, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(module.count_log_likelihood(X).numpy(), expected, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ loader and stopping point


def test_loader_visits_every_cell_once_per_pass(small_adata):
    adata, source, ref, spa = _loader_inputs(small_adata)
    spa = spa[:250]
    loader = PairedMinibatches(source, [ref, spa], batch_size=32, shuffle=True, steps_per_epoch=7, seed=3)
    per_pass = int(np.ceil(len(ref) / 32))
    assert len(loader) == 7 and loader.steps_per_pass == per_pass
    seen_ref, seen_sp = [], []
    for _ in range(int(np.ceil(per_pass / 7))):  # epochs continue the pass where the last one stopped
        for batch in loader:
            dom = batch["domain"].view(-1).numpy()
            x = batch["X"].numpy()
            seen_ref.append(x[dom == 0])
            seen_sp.append(x[dom == 1])
            assert (dom == 0).sum() <= 32 and (dom == 1).sum() <= 32
    rows = np.concatenate(seen_ref)[: len(ref)]
    # the first pass holds each reference cell exactly once (compared by their count profiles)
    expected = adata.X[ref].toarray()
    order = np.lexsort(rows.T[::-1])
    np.testing.assert_array_equal(rows[order], expected[np.lexsort(expected.T[::-1])])
    # the smaller domain is cycled through its own passes
    assert len(np.concatenate(seen_sp)) > len(spa)
    # two replicas split a pass between them
    halves = [
        PairedMinibatches(source, [ref], batch_size=32, shuffle=True, seed=3, num_replicas=2, rank=r) for r in (0, 1)
    ]
    cells = [np.concatenate([b["X"].numpy() for b in h]) for h in halves]
    assert len(halves[0]) == len(halves[1]) == int(np.ceil(len(ref) / 2 / 32))
    assert len(cells[0]) + len(cells[1]) == len(ref)


def test_early_stopping_patience_counts_epochs_whatever_the_validation_interval(small_adata):
    from lightning.pytorch.callbacks import EarlyStopping

    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    max_epochs, patience, min_delta = 200, 6, 0.01
    for every in (1, 4):
        scvi.settings.seed = 0
        model = RMGEModel(adata)
        model.train(
            max_epochs=max_epochs,
            check_val_every_n_epoch=every,
            early_stopping_patience=patience,
            early_stopping_min_delta=min_delta,
            calibrate=False,
            **TRAIN_KWARGS,
        )
        stopper = next(c for c in model.trainer.callbacks if isinstance(c, EarlyStopping))
        checks = int(np.ceil(patience / every))  # patience in validations: 6 epochs -> 6 or 2 validations
        assert stopper.patience == checks
        assert stopper.warmup_epochs == int(np.ceil(0.4 * max_epochs / every))  # the warm-up, too
        val = model.history["validation_loss"]["validation_loss"]
        assert np.all(val.index % every == every - 1)
        assert model.trainer.current_epoch < max_epochs  # it stopped early
        # it stopped `patience` epochs (rounded up to whole validations) after the last improvement (by more
        # than `min_delta`) after the warm-up
        best, best_epoch = np.inf, None
        for epoch, value in val.iloc[stopper.warmup_epochs :].items():
            if value < best - min_delta:
                best, best_epoch = value, epoch
        assert val.index[-1] - best_epoch == checks * every


def test_sparse_validation_in_the_warmup_keeps_the_early_stopping_decisions(small_adata, monkeypatch):
    # scaled-down default stopping point: passes of 3 steps, clip(round(165 / 3), 20, 200) = 55 epochs, early
    # stopping watching from epoch ceil(0.4 * 55) = 22; before it a validation every ceil(10 / 3) = 4 epochs
    monkeypatch.setattr(model_mod, "_DEFAULT_STEPS", 165)
    adata = small_adata.copy()
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    runs = {}
    for name, kwargs in (("default", {}), ("every epoch", {"check_val_every_n_epoch": 1})):
        scvi.settings.seed = 0
        model = RMGEModel(adata)
        model.train(early_stopping_patience=3, early_stopping_min_delta=0.05, **kwargs, **TRAIN_KWARGS)
        runs[name] = (model.trainer.current_epoch, model.history["validation_loss"]["validation_loss"], model)
    (stop, val, model), (stop_every, val_every, model_every) = runs["default"], runs["every epoch"]
    assert stop == stop_every < 55  # stopped early, at the same epoch
    np.testing.assert_array_equal(val.index[:5], [3, 7, 11, 15, 19])
    np.testing.assert_array_equal(val.index[5:], np.arange(22, stop))
    # the watched validations are the same ones, with the same losses; the model is the same
    pd.testing.assert_series_equal(val.loc[22:], val_every.loc[22:])
    probs, probs_every = (m.predict(soft=True) for m in (model, model_every))
    pd.testing.assert_frame_equal(probs, probs_every)


def test_default_stopping_point_caps_long_epochs(small_adata, monkeypatch):
    # scaled-down constants: a budget of 12 steps, epochs of at most 4 steps, validations 4 steps apart
    monkeypatch.setattr(model_mod, "_DEFAULT_STEPS", 12)
    monkeypatch.setattr(model_mod, "_MAX_DEFAULT_EPOCH_STEPS", 4)
    monkeypatch.setattr(model_mod, "_MAX_DEFAULT_VALIDATION_BATCHES", 1)
    monkeypatch.setattr(model_mod, "_MIN_DEFAULT_VALIDATION_STEPS", 4)
    adata = small_adata.copy()
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    n = max((adata.obs["domain"] == d).sum() for d in ("reference", "spatial"))

    # a pass of ceil(n / 256) = 3 steps <= 4: epochs are whole passes, clip(round(12 / 3), 20, 200) of them
    model = RMGEModel(adata)
    model.train(calibrate=False, **TRAIN_KWARGS)
    assert int(np.ceil(n / 256)) == 3
    assert model.trainer.max_epochs == 20
    assert model.trainer.num_training_batches == 3
    n_val = len(model.validation_indices)
    assert model.trainer.num_val_batches == [int(np.ceil(n_val / 256))]  # every held-out cell
    # passes of 3 steps validate every ceil(4 / 3) = 2 epochs during the warm-up of early stopping (the first
    # ceil(0.4 * 20) = 8 epochs: after epochs 1, 3, 5, 7), then after every epoch
    assert len(model.history["train_loss"]) == 20
    expected = np.concatenate([[1, 3, 5, 7], np.arange(8, 20)])
    np.testing.assert_array_equal(model.history["validation_loss"].index, expected)

    # a pass of ceil(n / 64) = 10 steps > 4: epochs of 4 steps continue the passes, still 20 epochs
    model = RMGEModel(adata)
    model.train(batch_size=64, calibrate=False, **TRAIN_KWARGS)
    assert model.trainer.max_epochs == 20
    assert model.trainer.num_training_batches == 4
    assert model.trainer.num_val_batches == [1]  # a fixed subset of the held-out cells
    assert len(model.history["train_loss"]) == 20
    assert len(model.history["validation_loss"]) == 20

    # an explicit max_epochs keeps whole passes
    model = RMGEModel(adata)
    model.train(max_epochs=2, batch_size=64, calibrate=False, **TRAIN_KWARGS)
    assert model.trainer.num_training_batches == 10
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.train(steps_per_epoch=0, **TRAIN_KWARGS)


def test_epoch_metrics_are_logged_once_per_epoch(small_adata):
    adata = small_adata.copy()
    scvi.settings.seed = 0
    RMGEModel.setup_anndata(adata, labels_key=LABELS)
    model = RMGEModel(adata)
    model.train(max_epochs=3, calibrate=False, **TRAIN_KWARGS)
    history = model.history
    for key in ("train_loss", "validation_loss", "discriminator_loss_train", "accuracy_validation"):
        assert len(history[key]) == 3, key
        assert np.isfinite(history[key].to_numpy(dtype=float)).all()
    # reference accuracy is a mean over cells: within [0, 1]
    assert ((history["accuracy_train"] >= 0) & (history["accuracy_train"] <= 1)).all().all()


# ------------------------------------------------------------------ backed AnnData


def test_backed_anndata_trains_and_predicts_like_in_memory(small_adata, tmp_path):
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    memory = ad.read_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    assert not sp.issparse(backed.X) and backed.isbacked

    models = {}
    for name, data in (("memory", memory), ("backed", backed)):
        scvi.settings.seed = 0
        RMGEModel.setup_anndata(data, labels_key=LABELS)
        models[name] = RMGEModel(data)
        models[name].train(max_epochs=4, **TRAIN_KWARGS)
    # same seed, same data: the same model, whether the counts sit in memory or on disk
    for key, value in models["memory"].module.state_dict().items():
        torch.testing.assert_close(models["backed"].module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(models["backed"].predict(), models["memory"].predict())
    np.testing.assert_array_equal(
        models["backed"].predict(soft=True).to_numpy(), models["memory"].predict(soft=True).to_numpy()
    )
    np.testing.assert_array_equal(
        models["backed"].get_latent_representation(), models["memory"].get_latent_representation()
    )
    # one trained model predicts a backed file as it predicts the same cells in memory
    other = ad.read_h5ad(path, backed="r")
    idx = np.arange(0, other.n_obs, 7)[::-1]  # unsorted, strided rows
    np.testing.assert_array_equal(
        models["memory"].predict(other, indices=idx), models["memory"].predict(memory, indices=idx)
    )
    assert backed.isbacked and not sp.issparse(backed.X)  # X was never loaded into memory
    truth = memory.obs[TRUTH].to_numpy()
    spatial = (memory.obs["domain"] == "spatial").to_numpy()
    assert (models["backed"].predict()[spatial] == truth[spatial]).mean() >= 0.9


# ------------------------------------------------------------------ data-parallel training

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np, torch, scvi, rmge
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sys.path.insert(0, {tests!r})
    from test_scale import make_adata
    adata = make_adata(n_reference=1500, n_spatial=1500)
    scvi.settings.seed = 0
    rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type")
    model = rmge.RMGEModel(adata)
    model.train(max_epochs=15, accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sp_idx = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    truth = adata.obs["cell_type_spatial"].to_numpy()[sp_idx]
    out = {{
        "accuracy": float((model.predict(indices=sp_idx) == truth).mean()),
        "batches": int(model.trainer.fit_loop.total_batch_idx) + 1,
        "n_train": int(len(model.train_indices)),
        "weights": float(model.module.encoder.weight.double().sum()),
        "discriminator": float(model.module.discriminator.net[0].weight.double().sum()),
        "history": sorted(model.history) if model.history else [],
    }}
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump(out, f)
    """
)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["accuracy"] >= 0.9, r
    # gradients are averaged across processes: both hold the same model, discriminator included
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)
    assert ranks[0]["discriminator"] == pytest.approx(ranks[1]["discriminator"], abs=1e-6)
    # each process takes half of every pass: half the steps of one process alone
    per_epoch = int(np.ceil(np.ceil(ranks[0]["n_train"] / 2) / 256))
    n_spatial_steps = int(np.ceil(np.ceil(1500 / 2) / 256))
    assert ranks[0]["batches"] == 15 * max(per_epoch, n_spatial_steps)
    assert "validation_loss" in ranks[0]["history"]
