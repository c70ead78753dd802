import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rmge
from rmge.tl import CellPairing, map_cells, transfer_features, transfer_obs

TYPES = ["A", "B", "C", "D"]
# reference cells per type; type C has fewer reference cells than k=5
N_REF = {"A": 40, "B": 120, "C": 3, "D": 300}
N_SPATIAL = 400


def _copies(seed=0, noise=1e-6, d=6):
    """Reference points in 4 types; each spatial cell a near-exact copy of a known reference cell."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 6, size=(len(TYPES), d))
    ref_labels = np.repeat(TYPES, [N_REF[t] for t in TYPES])
    ref = centers[np.searchsorted(TYPES, ref_labels)] + rng.normal(0, 1, size=(len(ref_labels), d))
    source = rng.choice(len(ref), size=N_SPATIAL)
    spatial = ref[source] + rng.normal(0, noise, size=(N_SPATIAL, d))
    # interleave reference and spatial rows, as in one AnnData holding both
    latent = np.vstack([ref, spatial])
    is_ref = np.r_[np.ones(len(ref), bool), np.zeros(N_SPATIAL, bool)]
    perm = rng.permutation(len(latent))
    latent, is_ref = latent[perm], is_ref[perm]
    labels = np.r_[ref_labels, np.full(N_SPATIAL, None, dtype=object)][perm]
    inv = np.argsort(perm)  # old row j is now row inv[j]
    spatial_old = perm[np.flatnonzero(~is_ref)] - len(ref)  # spatial cells, in their new order
    source_of_spatial = inv[source[spatial_old]]  # row of each spatial cell's source reference cell
    predicted = np.full(len(latent), None, dtype=object)
    predicted[~is_ref] = labels[source_of_spatial]
    return latent, labels, is_ref, predicted, source_of_spatial


@pytest.fixture(scope="module")
def copies():
    return _copies()


def _top1_rows(pairing):
    top = pairing.table[pairing.table["rank"] == 1]
    return pairing.reference_index[pairing.reference_names.get_indexer(top["reference_cell"].astype(str))]


def _check_structure(pairing, labels, k):
    t = pairing.table
    # partners always of the predicted type
    ref_type = labels[pairing.reference_index][pairing.reference_names.get_indexer(t["reference_cell"].astype(str))]
    assert (ref_type == t["cell_type"].astype(str).to_numpy()).all()
    # distances sorted within each spatial cell, ranks 1..n
    for _, g in t.groupby("spatial_cell", observed=True):
        assert np.all(np.diff(g["distance"].to_numpy()) >= -1e-12)
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
    # every spatial cell paired; rows of the weight matrix sum to 1 and agree with the table
    W = pairing.weights
    assert sp.issparse(W) and W.format == "csr"
    assert W.shape == (pairing.n_spatial, pairing.n_reference)
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0)
    rows = pairing.spatial_names.get_indexer(t["spatial_cell"].astype(str))
    cols = pairing.reference_names.get_indexer(t["reference_cell"].astype(str))
    np.testing.assert_allclose(np.asarray(W[rows, cols]).ravel(), t["weight"].to_numpy())
    # k partners, or all reference cells of a type with fewer than k
    n_pairs = t.groupby("spatial_cell", observed=True).size()
    expected = t.groupby("spatial_cell", observed=True)["cell_type"].first().astype(str).map(lambda c: min(k, N_REF[c]))
    assert (n_pairs == expected).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_recovers_the_copied_reference_cell(copies, metric):
    latent, labels, is_ref, predicted, source = copies
    pairing = map_cells(latent, labels, is_ref, predicted=predicted, k=5, method="exact", metric=metric)
    assert isinstance(pairing, CellPairing)
    assert pairing.n_spatial == N_SPATIAL and pairing.n_reference == sum(N_REF.values())
    np.testing.assert_array_equal(pairing.spatial_index, np.flatnonzero(~is_ref))
    assert np.mean(_top1_rows(pairing) == source) >= 0.99
    _check_structure(pairing, labels, k=5)
    # the copy is (nearly) at distance 0
    assert pairing.table.loc[pairing.table["rank"] == 1, "distance"].max() < 1e-4


def test_k_larger_than_a_types_reference_cells(copies):
    latent, labels, is_ref, predicted, _ = copies
    pairing = map_cells(latent, labels, is_ref, predicted=predicted, k=8, method="exact")
    t = pairing.table
    n_c = t[t["cell_type"] == "C"].groupby("spatial_cell", observed=True).size()
    assert len(n_c) > 0 and (n_c == 3).all()
    n_d = t[t["cell_type"] == "D"].groupby("spatial_cell", observed=True).size()
    assert (n_d == 8).all()
    _check_structure(pairing, labels, k=8)


def test_default_method_searches_small_types_exactly(copies):
    latent, labels, is_ref, predicted, source = copies
    pairing = map_cells(latent, labels, is_ref, predicted=predicted, k=3)
    assert set(pairing.info["search"].values()) == {"exact"}
    assert np.mean(_top1_rows(pairing) == source) >= 0.99


@pytest.mark.slow  # pynndescent compiles its numba code on first use (about a minute on a busy 2-core machine)
def test_nndescent_recovers_the_copied_reference_cell(copies):
    latent, labels, is_ref, predicted, source = copies
    pairing = map_cells(latent, labels, is_ref, predicted=predicted, k=5, method="nndescent", exact_below=0)
    # every type with more than k + 1 reference cells went through pynndescent
    assert pairing.info["search"] == {"A": "nndescent", "B": "nndescent", "C": "exact", "D": "nndescent"}
    assert np.mean(_top1_rows(pairing) == source) >= 0.99
    _check_structure(pairing, labels, k=5)


def test_unrestricted_search_without_predicted_labels(copies):
    latent, labels, is_ref, _, source = copies
    pairing = map_cells(latent, labels, is_ref, k=4, method="exact")
    assert np.mean(_top1_rows(pairing) == source) >= 0.99
    assert pairing.table["cell_type"].isna().all()
    assert (pairing.table.groupby("spatial_cell", observed=True).size() == 4).all()


def test_optimal_transport_recovers_a_permutation():
    pytest.importorskip("ot")
    rng = np.random.default_rng(3)
    ref = np.vstack([rng.normal(0, 1, (60, 5)), rng.normal(8, 1, (40, 5))])
    ref_labels = np.repeat(["x", "y"], [60, 40])
    perm = rng.permutation(100)
    spatial = ref[perm] + rng.normal(0, 1e-3, (100, 5))
    latent = np.vstack([ref, spatial])
    is_ref = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    pairing = map_cells(latent, ref_labels, is_ref, predicted=ref_labels[perm], k=3, method="ot")
    top = pairing.table[pairing.table["rank"] == 1]
    assert np.mean(pairing.reference_names.get_indexer(top["reference_cell"].astype(str)) == perm) >= 0.99
    np.testing.assert_allclose(np.asarray(pairing.weights.sum(axis=1)).ravel(), 1.0)
    # ranks follow the plan's mass: weights decrease within each cell
    for _, g in pairing.table.groupby("spatial_cell", observed=True):
        assert np.all(np.diff(g["weight"].to_numpy()) <= 1e-12)
    with pytest.raises(ValueError, match=r"dense 60 × 60 cost matrix for type 'x'.*method='nndescent'"):
        map_cells(latent, ref_labels, is_ref, predicted=ref_labels[perm], method="ot", ot_max_pairs=1000)


def _line():
    """One spatial cell at the origin; reference cells of one type at distances 0, 1, 2, 4 along a line."""
    ref = np.array([[0.0], [1.0], [2.0], [4.0]])
    latent = np.vstack([ref, [[0.0]]])
    is_ref = np.array([True, True, True, True, False])
    labels = np.array(["t", "t", "t", "t", None], dtype=object)
    return latent, labels, is_ref


def test_weightings_have_the_documented_values():
    latent, labels, is_ref = _line()
    # softmax: gaps 0, 1, 2 (mean 1) -> weights ∝ 1, e^-1, e^-2
    p = map_cells(latent, labels, is_ref, predicted=["t"], k=3, method="exact")
    expected = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(p.table["weight"], expected / expected.sum())
    np.testing.assert_allclose(p.table["distance"], [0.0, 1.0, 2.0], atol=1e-12)
    # fixed bandwidth 2 -> ∝ 1, e^-0.5, e^-1
    p = map_cells(latent, labels, is_ref, predicted=["t"], k=3, method="exact", bandwidth=2.0)
    expected = np.exp([0.0, -0.5, -1.0])
    np.testing.assert_allclose(p.table["weight"], expected / expected.sum())
    p = map_cells(latent, labels, is_ref, predicted=["t"], k=4, method="exact", weighting="uniform")
    np.testing.assert_allclose(p.table["weight"], 0.25)
    # inverse distance: the exact match takes all the weight
    p = map_cells(latent, labels, is_ref, predicted=["t"], k=3, method="exact", weighting="inverse_distance")
    np.testing.assert_allclose(p.table["weight"], [1.0, 0.0, 0.0], atol=1e-9)
    # inverse distance away from the points: query at 0.5 -> distances 0.5, 0.5, 1.5 -> ∝ 2, 2, 2/3
    latent2 = latent.copy()
    latent2[-1] = 0.5
    p = map_cells(latent2, labels, is_ref, predicted=["t"], k=3, method="exact", weighting="inverse_distance")
    np.testing.assert_allclose(p.table["weight"], np.array([2, 2, 2 / 3]) / (14 / 3))


def test_missing_or_unknown_predictions_are_left_unpaired(copies):
    latent, labels, is_ref, predicted, _ = copies
    pred = predicted.copy()
    sp_rows = np.flatnonzero(~is_ref)
    pred[sp_rows[0]] = None
    pred[sp_rows[1]] = rmge._constants.UNKNOWN_LABEL
    pairing = map_cells(latent, labels, is_ref, predicted=pred, k=2, method="exact")
    assert pairing.paired.sum() == N_SPATIAL - 2
    assert not pairing.paired[0] and not pairing.paired[1]
    assert pairing.predicted[0] is None and pairing.predicted[1] is None
    ref_values = np.arange(pairing.n_reference, dtype=float)
    out = transfer_features(pairing, ref_values)
    assert np.isnan(out[:2]).all() and np.isfinite(out[2:]).all()


def test_names_come_from_a_dataframe_index():
    latent, labels, is_ref = _line()
    names = ["r0", "r1", "r2", "r3", "s0"]
    p = map_cells(pd.DataFrame(latent, index=names), labels, is_ref, predicted=["t"], k=2, method="exact")
    assert p.table["spatial_cell"].astype(str).tolist() == ["s0", "s0"]
    assert p.table["reference_cell"].astype(str).tolist() == ["r0", "r1"]
    assert list(p.reference_names) == names[:4]
    assert "2 paired" not in repr(p) and "1 spatial cells" in repr(p)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"`k` must be a positive integer"),
        ({"k": 2.5}, ValueError, r"`k` must be a positive integer"),
        ({"method": "annoy"}, ValueError, r"`method` must be one of \['nndescent', 'exact', 'ot'\]"),
        ({"metric": "manhattan"}, ValueError, r"`metric` must be one of"),
        ({"weighting": "gauss"}, ValueError, r"`weighting` must be one of"),
        ({"bandwidth": 0}, ValueError, r"`bandwidth` must be positive"),
    ],
)
def test_bad_settings(copies, kwargs, error, match):
    latent, labels, is_ref, predicted, _ = copies
    with pytest.raises(error, match=match):
        map_cells(latent, labels, is_ref, predicted=predicted, **kwargs)


def test_bad_inputs_have_clear_messages(copies):
    latent, labels, is_ref, predicted, _ = copies
    n = len(latent)
    with pytest.raises(
        ValueError, match=r"`labels` has 10 entries; expected one per cell \(\d+\) or one per reference"
    ):
        map_cells(latent, labels[:10], is_ref, predicted=predicted)
    with pytest.raises(
        ValueError, match=r"`predicted` has 7 entries; expected one per cell .* or one per spatial cell"
    ):
        map_cells(latent, labels, is_ref, predicted=predicted[:7])
    with pytest.raises(ValueError, match=r"`reference_mask` must be a 1-D boolean array with one entry per row"):
        map_cells(latent, labels, is_ref[:-1], predicted=predicted)
    with pytest.raises(TypeError, match=r"`reference_mask` must be boolean"):
        map_cells(latent, labels, np.where(is_ref, "reference", "spatial"), predicted=predicted)
    bad = predicted.copy()
    bad[np.flatnonzero(~is_ref)[0]] = "Neuron"
    with pytest.raises(ValueError, match=r"`predicted` holds type\(s\) with no reference cell: \['Neuron'\]"):
        map_cells(latent, labels, is_ref, predicted=bad)
    with pytest.raises(ValueError, match=r"No spatial cells: `reference_mask` is True for every cell"):
        map_cells(latent, np.where(is_ref, labels, "A"), np.ones(n, bool))
    with pytest.raises(ValueError, match=r"No reference cells"):
        map_cells(latent, labels, np.zeros(n, bool))
    nan_latent = latent.copy()
    nan_latent[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"`latent` holds 1 non-finite value"):
        map_cells(nan_latent, labels, is_ref, predicted=predicted)
    with pytest.raises(ValueError, match=r"`latent` must be a 2-D matrix"):
        map_cells(latent[:, 0], labels, is_ref)
    missing = labels.copy()
    missing[np.flatnonzero(is_ref)[:2]] = None
    with pytest.raises(ValueError, match=r"2 reference cell\(s\) have no label"):
        map_cells(latent, missing, is_ref, predicted=predicted)
    with pytest.raises(ValueError, match=r"`cell_names` has 3 names"):
        map_cells(latent, labels, is_ref, cell_names=["a", "b", "c"])


# ---------------------------------------------------------------------------- transfer
def _subtypes(seed=1):
    """Types with two far-apart sub-clusters each; spatial cells are near one sub-cluster's centre."""
    rng = np.random.default_rng(seed)
    d, per_sub = 4, 12
    rows, lab, sub = [], [], []
    centres = {}
    for i, t in enumerate(["T1", "T2", "T3"]):
        for j, s in enumerate(["a", "b"]):
            c = np.zeros(d)
            c[0] = 100 * i
            c[1] = 30 * j
            centres[(t, s)] = c
            rows.append(c + rng.normal(0, 1, (per_sub, d)))
            lab += [t] * per_sub
            sub += [f"{t}{s}"] * per_sub
    ref = np.vstack(rows)
    keys = list(centres)
    pick = rng.integers(0, len(keys), size=90)
    spatial = np.vstack([centres[keys[p]] for p in pick]) + rng.normal(0, 0.5, (90, d))
    truth_type = np.array([keys[p][0] for p in pick], dtype=object)
    truth_sub = np.array([keys[p][0] + keys[p][1] for p in pick], dtype=object)
    X = np.vstack([ref, spatial])
    obs = pd.DataFrame(
        {
            "domain": ["reference"] * len(ref) + ["spatial"] * 90,
            "cell_type": pd.Categorical(lab + [None] * 90),
            "subtype": pd.Categorical(sub + [None] * 90),
        },
        index=[f"cell{i}" for i in range(len(X))],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_rmge"] = X
    return adata, truth_type, truth_sub


def _pair_subtypes(k=5):
    adata, truth_type, truth_sub = _subtypes()
    is_ref = (adata.obs["domain"] == "reference").to_numpy()
    pred = np.full(adata.n_obs, None, dtype=object)
    pred[~is_ref] = truth_type
    pairing = map_cells(
        adata.obsm["X_rmge"], adata.obs["cell_type"], is_ref, predicted=pred, k=k, cell_names=adata.obs_names
    )
    return adata, pairing, truth_type, truth_sub


def test_transfer_of_a_function_of_the_type():
    adata, pairing, truth_type, _ = _pair_subtypes()
    code = {"T1": 1.0, "T2": 2.0, "T3": 3.0}
    ref_types = adata.obs["cell_type"].to_numpy()[pairing.reference_index].astype(str)
    values = np.column_stack([[code[t] for t in ref_types], [10 * code[t] ** 2 for t in ref_types]])
    out = transfer_features(pairing, values)
    expected = np.array([code[t] for t in truth_type])
    np.testing.assert_allclose(out[:, 0], expected)
    np.testing.assert_allclose(out[:, 1], 10 * expected**2)
    # one row per cell of the AnnData works too (reference rows are taken)
    full = np.zeros(adata.n_obs)
    full[pairing.reference_index] = values[:, 0]
    np.testing.assert_allclose(transfer_features(pairing, full), expected)
    # sparse in -> sparse out, same values
    out_sparse = transfer_features(pairing, sp.csr_matrix(values))
    assert sp.issparse(out_sparse) and out_sparse.format == "csr"
    np.testing.assert_allclose(out_sparse.toarray(), out)
    # the weights matrix alone works as pairing
    np.testing.assert_allclose(transfer_features(pairing.weights, values), out)


def test_transfer_numeric_series_is_aligned_by_name_and_skips_nan():
    adata, pairing, truth_type, _ = _pair_subtypes()
    score = adata.obs["cell_type"].map({"T1": 1.0, "T2": 2.0, "T3": 3.0}).astype(float)
    score[adata.obs["subtype"] == "T1a"] = np.nan  # half of T1's reference cells lack a value
    shuffled = score.sample(frac=1.0, random_state=0)
    out = transfer_features(pairing, shuffled)
    assert isinstance(out, pd.Series) and list(out.index) == list(pairing.spatial_names)
    expected = pd.Series(truth_type).map({"T1": 1.0, "T2": 2.0, "T3": 3.0}).to_numpy()
    # T1 cells near the T1a sub-cluster have only NaN partners -> NaN; all others the type's value
    near_nan = np.isnan(out.to_numpy())
    assert near_nan.any()
    np.testing.assert_allclose(out.to_numpy()[~near_nan], expected[~near_nan])


def test_categorical_vote_recovers_planted_subtypes():
    adata, pairing, _, truth_sub = _pair_subtypes()
    out = transfer_features(pairing, adata.obs["subtype"])
    assert list(out.columns) == ["subtype", "subtype_probability"]
    np.testing.assert_array_equal(out["subtype"].astype(str).to_numpy(), truth_sub.astype(str))
    np.testing.assert_allclose(out["subtype_probability"], 1.0)
    # a plain array of strings votes too
    ref_sub = adata.obs["subtype"].to_numpy()[pairing.reference_index].astype(str)
    out2 = transfer_features(pairing, ref_sub)
    np.testing.assert_array_equal(out2["label"].astype(str).to_numpy(), truth_sub.astype(str))


def test_vote_probability_is_the_winning_weight_share():
    latent, labels, is_ref = _line()
    p = map_cells(latent, labels, is_ref, predicted=["t"], k=3, method="exact", weighting="uniform")
    out = transfer_features(p, pd.Series(["x", "y", "y", "x"], name="s"))
    assert out["s"].iloc[0] == "y"
    assert out["s_probability"].iloc[0] == pytest.approx(2 / 3)


def test_transfer_obs_writes_columns_for_spatial_cells():
    adata, pairing, truth_type, truth_sub = _pair_subtypes()
    adata.obs["depth"] = adata.obs["cell_type"].map({"T1": 5.0, "T2": 6.0, "T3": 7.0}).astype(float)
    transfer_obs(adata, pairing, ["subtype", "depth"])
    is_sp = (adata.obs["domain"] == "spatial").to_numpy()
    np.testing.assert_array_equal(adata.obs["subtype_transferred"][is_sp].astype(str), truth_sub.astype(str))
    assert adata.obs["subtype_transferred"][~is_sp].isna().all()
    np.testing.assert_allclose(adata.obs["subtype_transferred_probability"][is_sp], 1.0)
    np.testing.assert_allclose(
        adata.obs["depth_transferred"][is_sp], pd.Series(truth_type).map({"T1": 5.0, "T2": 6.0, "T3": 7.0})
    )
    assert adata.obs["depth_transferred"][~is_sp].isna().all()
    with pytest.raises(KeyError, match=r"Column\(s\) \['nope'\] not found in obs"):
        transfer_obs(adata, pairing, "nope")
    with pytest.raises(ValueError, match=r"spatial cell\(s\) of the pairing are not in `adata`"):
        transfer_obs(adata[:100].copy(), pairing, "subtype", reference=adata)


def test_transfer_bad_inputs():
    adata, pairing, _, _ = _pair_subtypes()
    with pytest.raises(ValueError, match=r"`reference_values` has 5 rows; expected 72 \(one per reference cell\)"):
        transfer_features(pairing, np.zeros((5, 2)))
    with pytest.raises(TypeError, match=r"`pairing` must be the CellPairing returned by rmge.tl.map_cells"):
        transfer_features("pairs", np.zeros(72))
    with pytest.raises(ValueError, match=r"index does not hold the 72 reference cell names"):
        transfer_features(pairing, pd.Series(np.zeros(10)))


def test_ot_without_pot_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` fail
    latent, labels, is_ref = _line()
    with pytest.raises(ImportError, match=r"method='ot' needs the POT package .*pip install pot"):
        map_cells(latent, labels, is_ref, predicted=["t"], k=2, method="ot")
