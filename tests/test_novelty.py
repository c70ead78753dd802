"""Unknown cells: a spatial type that the reference lacks is labelled "Unknown" by the novelty rule."""

from __future__ import annotations

import numpy as np
import pytest
import scvi

import rmge
from rmge._constants import UNKNOWN_LABEL

TRAIN_KWARGS = {"enable_progress_bar": False, "accelerator": "cpu"}
HELD_OUT = "type_4"


@pytest.fixture(scope="module")
def held_out_model():
    """A model trained on a reference without one type that the spatial data does contain."""
    scvi.settings.seed = 0
    ref, spatial = rmge.datasets.synthetic(
        n_reference=1_500, n_spatial=1_500, n_genes=200, n_classes=5, spatial_depth_ratio=0.2, seed=11
    )
    ref = ref[ref.obs["cell_type"].astype(str) != HELD_OUT].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.remove_unused_categories()
    spatial.obs = spatial.obs.rename(columns={"cell_type": "truth"})
    adata = rmge.pp.prepare(ref, spatial, labels_key="cell_type", n_top_genes=None)
    rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type")
    model = rmge.RMGEModel(adata)
    model.train(max_epochs=30, **TRAIN_KWARGS)
    spatial_idx = np.flatnonzero((adata.obs["domain"] != "reference").to_numpy())
    truth = adata.obs["truth"].astype(str).to_numpy()[spatial_idx]
    return model, adata, spatial_idx, truth


def test_held_out_type_is_absent_from_the_model(held_out_model):
    model, _, _, _ = held_out_model
    assert HELD_OUT not in model.classes_


def test_novelty_rule_finds_the_type_the_reference_lacks(held_out_model):
    model, _, idx, truth = held_out_model
    is_new = truth == HELD_OUT
    assert is_new.sum() > 100
    plain = model.predict(indices=idx)
    assert (plain == UNKNOWN_LABEL).sum() == 0
    labels = model.predict(indices=idx, novelty_threshold=2.0)
    unknown = labels == UNKNOWN_LABEL
    # most cells of the missing type become Unknown, few of the known types do
    assert unknown[is_new].mean() >= 0.6
    assert unknown[~is_new].mean() <= 0.1
    # the other cells keep their label
    np.testing.assert_array_equal(labels[~unknown], plain[~unknown])
    assert np.mean(labels[~is_new & ~unknown] == truth[~is_new & ~unknown]) >= 0.9


def test_novelty_score_ranks_the_missing_type_lowest(held_out_model):
    model, adata, idx, truth = held_out_model
    scores = model.novelty_score(indices=idx)
    assert scores.index.equals(adata.obs_names[idx])
    is_new = truth == HELD_OUT
    assert np.median(scores[is_new]) < -2 < np.median(scores[~is_new]) + 2
    # without neighbourhood averaging the single-cell scores separate the missing type less well
    raw = model.novelty_score(indices=idx, n_neighbors=1)
    gap = np.median(scores[~is_new]) - np.median(scores[is_new])
    gap_raw = np.median(raw[~is_new]) - np.median(raw[is_new])
    assert gap > gap_raw
    # deterministic
    np.testing.assert_allclose(model.novelty_score(indices=idx).to_numpy(), scores.to_numpy())


def test_novelty_and_confidence_rules_combine(held_out_model):
    model, _, idx, _ = held_out_model
    by_novelty = model.predict(indices=idx, novelty_threshold=2.0) == UNKNOWN_LABEL
    by_confidence = model.predict(indices=idx, unknown_threshold=0.9) == UNKNOWN_LABEL
    both = model.predict(indices=idx, novelty_threshold=2.0, unknown_threshold=0.9) == UNKNOWN_LABEL
    np.testing.assert_array_equal(both, by_novelty | by_confidence)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_bad_novelty_threshold_is_named(held_out_model, value):
    model, _, idx, _ = held_out_model
    with pytest.raises(ValueError, match="novelty_threshold"):
        model.predict(indices=idx, novelty_threshold=value)


def test_bad_neighbour_count_is_named(held_out_model):
    model, _, idx, _ = held_out_model
    with pytest.raises(ValueError, match="n_neighbors"):
        model.novelty_score(indices=idx, n_neighbors=0)
