"""Tests of rmge.pp.prepare: gene matching, value kinds, sections, labels and input errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rmge
from rmge._constants import COUNTS_LAYER, REFERENCE_DOMAIN, SPATIAL_DOMAIN

DATA = Path(os.environ.get("RMGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
REF_FILE = DATA / "moffitt2018_hypothalamus_scrna_reference.h5ad"
MERFISH_FILE = DATA / "moffitt2018_hypothalamus_merfish_query.h5ad"


# ------------------------------------------------------------------ synthetic data


def _counts(n_cells: int, n_genes: int, seed: int, rate: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.5, rate, size=(1, n_genes)) * rng.uniform(0.5, 1.5, size=(n_cells, 1))
    X = rng.poisson(lam).astype(np.float32)
    X[:, 0] += 1  # no empty cells unless a test makes some
    return X


def make_reference(n_cells=60, genes=None, seed=0, sparse=True, labels=("A", "B", "C")) -> ad.AnnData:
    genes = [f"Gene{i}" for i in range(40)] if genes is None else genes
    X = _counts(n_cells, len(genes), seed)
    a = ad.AnnData(X=sp.csr_matrix(X) if sparse else X)
    a.var_names = genes
    a.obs_names = [f"cell{i}" for i in range(n_cells)]
    a.obs["cell_type"] = pd.Categorical(np.resize(np.asarray(labels), n_cells))
    return a


def make_spatial(n_cells=50, genes=None, seed=1, sparse=True, prefix="cell") -> ad.AnnData:
    genes = [f"Gene{i}" for i in range(40)] if genes is None else genes
    X = _counts(n_cells, len(genes), seed, rate=1.0)
    a = ad.AnnData(X=sp.csr_matrix(X) if sparse else X)
    a.var_names = genes
    a.obs_names = [f"{prefix}{i}" for i in range(n_cells)]
    a.obsm["spatial"] = np.random.default_rng(seed).uniform(0, 100, size=(n_cells, 2))
    return a


def log_normalize(X: np.ndarray) -> np.ndarray:
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)


def dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def prepare_quiet(*args, **kwargs) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rmge.pp.prepare(*args, **kwargs)


# ------------------------------------------------------------------ layout, genes, values


def test_shared_genes_order_and_exact_values():
    ref_genes = [f"Gene{i}" for i in range(30)] + ["RefOnly1", "RefOnly2"]
    sp_genes = ["SpOnly"] + [f"Gene{i}" for i in reversed(range(5, 35))]  # Gene30..34 not in reference
    ref = make_reference(genes=ref_genes)
    spa = make_spatial(genes=sp_genes)
    out = rmge.pp.prepare(ref, spa, "cell_type", n_top_genes=None)

    shared = [f"Gene{i}" for i in range(5, 30)]
    assert list(out.var_names) == shared  # reference order
    assert out.n_obs == ref.n_obs + spa.n_obs
    assert list(out.obs["domain"][: ref.n_obs]) == [REFERENCE_DOMAIN] * ref.n_obs
    assert list(out.obs["domain"][ref.n_obs :]) == [SPATIAL_DOMAIN] * spa.n_obs
    assert list(out.obs["domain"].cat.categories) == [REFERENCE_DOMAIN, SPATIAL_DOMAIN]

    # counts kept exactly, in the right columns, sparse float32
    counts = out.layers[COUNTS_LAYER]
    assert sp.issparse(counts) and counts.format == "csr" and counts.dtype == np.float32
    assert sp.issparse(out.X) and (out.X != counts).nnz == 0
    np.testing.assert_array_equal(dense(counts[: ref.n_obs]), dense(ref[:, shared].X))
    np.testing.assert_array_equal(dense(counts[ref.n_obs :]), dense(spa[:, shared].X))

    info = out.uns["rmge"]
    assert info["n_shared_genes"] == 25 and info["n_genes_used"] == 25
    assert info["n_reference_cells"] == ref.n_obs and info["n_spatial_cells"] == spa.n_obs
    assert info["value_kind"] == {"reference": "counts", "spatial": "counts"}
    assert info["labels_key"] == "cell_type" and info["domain_key"] == "domain"


def test_setup_anndata_accepts_result():
    model_cls = rmge.RMGEModel
    if not hasattr(model_cls, "setup_anndata"):
        pytest.skip("RMGEModel.setup_anndata not available")
    out = prepare_quiet(make_reference(), make_spatial(), "cell_type")
    model_cls.setup_anndata(out, labels_key="cell_type", domain_key="domain")


def test_labels_nan_on_spatial_and_categories():
    ref = make_reference(labels=("T", "B", "NK"))
    out = prepare_quiet(ref, make_spatial(), "cell_type")
    lab = out.obs["cell_type"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert set(lab.cat.categories) == {"T", "B", "NK"}
    assert lab[: ref.n_obs].notna().all()
    assert lab[ref.n_obs :].isna().all()
    np.testing.assert_array_equal(lab[: ref.n_obs].astype(str), ref.obs["cell_type"].astype(str))


def test_case_insensitive_matching():
    genes = [f"Gene{i}" for i in range(40)]
    spa = make_spatial(genes=[g.upper() for g in genes])
    out = prepare_quiet(make_reference(genes=genes), spa, "cell_type", n_top_genes=None)
    assert out.n_vars == 40
    assert list(out.var_names) == genes  # reference spelling
    assert list(out.var["spatial_gene_name"]) == [g.upper() for g in genes]
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][60:]), dense(spa.X))
    with pytest.raises(ValueError, match=r"Only 0 gene\(s\) are shared.*case_insensitive=True"):
        rmge.pp.prepare(make_reference(genes=genes), spa, "cell_type", case_insensitive=False)


def test_duplicate_gene_names_summed_with_warning():
    genes = [f"Gene{i}" for i in range(40)]
    genes[7] = "Gene3"  # Gene3 twice in the reference, Gene7 missing there
    ref = make_reference(genes=genes)
    spa = make_spatial()
    with pytest.warns(UserWarning, match=r"reference X has 1 gene name\(s\) occurring more than once.*summed"):
        out = rmge.pp.prepare(ref, spa, "cell_type", n_top_genes=None)
    assert out.n_vars == 39 and "Gene7" not in out.var_names
    j = list(out.var_names).index("Gene3")
    expected = dense(ref.X)[:, 3] + dense(ref.X)[:, 7]
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][: ref.n_obs, j]).ravel(), expected)
    # spatial side unaffected
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][ref.n_obs :, j]).ravel(), dense(spa.X)[:, 3])

    with pytest.warns(UserWarning, match="kept the first column"):
        first = rmge.pp.prepare(ref, spa, "cell_type", n_top_genes=None, duplicates="first")
    np.testing.assert_array_equal(dense(first.layers[COUNTS_LAYER][: ref.n_obs, j]).ravel(), dense(ref.X)[:, 3])


def test_duplicates_created_by_case_folding_are_summed():
    genes = [f"Gene{i}" for i in range(40)]
    sp_genes = list(genes)
    sp_genes[39] = "GENE0"  # same gene as Gene0 once case is ignored
    spa = make_spatial(genes=sp_genes)
    with pytest.warns(UserWarning, match="spatial X has 1 gene name"):
        out = rmge.pp.prepare(make_reference(genes=genes), spa, "cell_type", n_top_genes=None)
    assert out.n_vars == 39
    np.testing.assert_array_equal(
        dense(out.layers[COUNTS_LAYER][60:, 0]).ravel(), dense(spa.X)[:, 0] + dense(spa.X)[:, 39]
    )


def test_hvg_selection_matches_scanpy_and_keep_all():
    import scanpy as sc

    ref = make_reference(n_cells=120, genes=[f"Gene{i}" for i in range(60)])
    spa = make_spatial(genes=[f"Gene{i}" for i in range(5, 70)])  # 55 shared genes
    out = prepare_quiet(ref, spa, "cell_type", n_top_genes=15)
    assert out.n_vars == 15 and out.uns["rmge"]["n_shared_genes"] == 55
    assert out.uns["rmge"]["n_genes_used"] == 15

    expected = ref[:, [f"Gene{i}" for i in range(5, 60)]].copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, n_top_genes=15, flavor="seurat")
    assert set(out.var_names) == set(expected.var_names[expected.var["highly_variable"]])
    # selected genes stay in reference order, values untouched
    assert list(out.var_names) == [g for g in ref.var_names if g in set(out.var_names)]
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][:120]), dense(ref[:, list(out.var_names)].X))

    for n_top in (None, 0, 55, 3000):
        assert prepare_quiet(ref, spa, "cell_type", n_top_genes=n_top).n_vars == 55


# ------------------------------------------------------------------ value kinds


def test_log_normalized_spatial_undone_by_expm1():
    spa = make_spatial()
    raw = dense(spa.X)
    spa.X = sp.csr_matrix(log_normalize(raw))
    with pytest.warns(UserWarning, match="spatial data look log-normalised.*expm1"):
        out = rmge.pp.prepare(make_reference(), spa, "cell_type", n_top_genes=None)
    got = dense(out.layers[COUNTS_LAYER][60:])
    np.testing.assert_allclose(got, np.expm1(dense(spa.X).astype(np.float64)), rtol=1e-5)
    # expm1 gives back the normalised values (1e4 per cell)
    np.testing.assert_allclose(got.sum(1), 1e4, rtol=1e-3)
    assert out.uns["rmge"]["value_kind"] == {"reference": "counts", "spatial": "log_normalized"}
    assert out.uns["rmge"]["value_kind_detected"]["spatial"] == "log_normalized"

    # override: take the values as they are
    kept = prepare_quiet(make_reference(), spa, "cell_type", n_top_genes=None, spatial_kind="normalized")
    np.testing.assert_allclose(dense(kept.layers[COUNTS_LAYER][60:]), dense(spa.X), rtol=1e-6)
    assert kept.uns["rmge"]["value_kind"]["spatial"] == "normalized"
    assert kept.uns["rmge"]["value_kind_detected"]["spatial"] == "log_normalized"


def test_normalized_reference_kept_with_warning():
    ref = make_reference(sparse=False)
    raw = np.asarray(ref.X)
    ref.X = (raw / raw.sum(1, keepdims=True) * 1e4).astype(np.float32)
    with pytest.warns(UserWarning, match="reference data hold normalised"):
        out = rmge.pp.prepare(ref, make_spatial(), "cell_type", n_top_genes=None)
    np.testing.assert_allclose(dense(out.layers[COUNTS_LAYER][:60]), ref.X, rtol=1e-6)
    assert out.uns["rmge"]["value_kind"]["reference"] == "normalized"


def test_dense_input_gives_sparse_output():
    ref = make_reference(sparse=False)
    spa = make_spatial(sparse=False)
    out = prepare_quiet(ref, spa, "cell_type", n_top_genes=None)
    assert sp.issparse(out.X) and sp.issparse(out.layers[COUNTS_LAYER])
    np.testing.assert_array_equal(dense(out.X), np.vstack([ref.X, spa.X]))


def test_layers_raw_and_gene_key():
    ref = make_reference()
    counts = ref.X.copy()
    ref.layers["counts"] = counts
    ref.X = sp.csr_matrix(log_normalize(dense(counts)))
    spa = make_spatial()
    spa.var["symbol"] = spa.var_names
    spa.var_names = [f"ENSMUSG{i:05d}" for i in range(spa.n_vars)]
    out = prepare_quiet(ref, spa, "cell_type", reference_layer="counts", spatial_gene_key="symbol", n_top_genes=None)
    assert out.n_vars == 40 and out.uns["rmge"]["value_kind"]["reference"] == "counts"
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][:60]), dense(counts))

    ref.raw = ad.AnnData(X=counts, var=pd.DataFrame(index=ref.var_names))
    out_raw = prepare_quiet(ref, spa, "cell_type", reference_layer="raw", spatial_gene_key="symbol", n_top_genes=None)
    np.testing.assert_array_equal(dense(out_raw.layers[COUNTS_LAYER][:60]), dense(counts))

    with pytest.raises(KeyError, match="Layer 'missing' not found in the reference.*Available layers"):
        rmge.pp.prepare(ref, spa, "cell_type", reference_layer="missing")
    with pytest.raises(KeyError, match="Gene key 'nope' not found"):
        rmge.pp.prepare(ref, spa, "cell_type", spatial_gene_key="nope")


# ------------------------------------------------------------------ sections, obs, coordinates


def test_list_of_sections_with_clashing_names():
    ref = make_reference()
    s0, s1 = make_spatial(30, seed=2), make_spatial(20, seed=3)  # obs_names cell0.. clash with reference
    s1.X = sp.csr_matrix(log_normalize(dense(s1.X)))
    out = prepare_quiet(ref, [s0, s1], "cell_type", n_top_genes=None)

    assert out.n_obs == 110 and out.obs_names.is_unique
    assert out.obs_names[0] == "cell0-reference" and out.obs_names[60] == "cell0-0" and out.obs_names[90] == "cell0-1"
    assert list(out.obs["original_obs_name"][:3]) == ["cell0", "cell1", "cell2"]
    sec = out.obs["section"].astype(str).to_numpy()
    assert (sec[:60] == "reference").all() and (sec[60:90] == "0").all() and (sec[90:] == "1").all()
    info = out.uns["rmge"]
    assert info["batch_key"] == "section"
    assert info["value_kind"]["spatial"] == "mixed"
    assert info["value_kind_sections"]["0"]["used"] == "counts"
    assert info["value_kind_sections"]["1"]["used"] == "log_normalized"
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][60:90]), dense(s0.X))
    np.testing.assert_allclose(dense(out.layers[COUNTS_LAYER][90:]), np.expm1(dense(s1.X).astype(float)), rtol=1e-5)

    coords = out.obsm["spatial"]
    assert coords.shape == (110, 2)
    assert np.isnan(coords[:60]).all()
    np.testing.assert_array_equal(coords[60:90], s0.obsm["spatial"])
    np.testing.assert_array_equal(coords[90:], s1.obsm["spatial"])


def test_dict_of_sections_and_batch_key_on_one_anndata():
    ref = make_reference()
    ref.obs["slide"] = "ref_batch"
    out = prepare_quiet(
        ref, {"A": make_spatial(30, prefix="a"), "B": make_spatial(20, prefix="b")}, "cell_type", batch_key="slide"
    )
    assert out.obs_names.is_unique and out.obs_names[0] == "cell0"  # no clash, names kept
    assert list(out.obs["slide"].astype(str).unique()) == ["ref_batch", "A", "B"]

    # one AnnData holding two sections, one log-normalised: kinds detected and converted per section
    spa = make_spatial(40)
    X = dense(spa.X)
    X[20:] = log_normalize(X[20:])
    spa.X = sp.csr_matrix(X)
    spa.obs["slide"] = ["s1"] * 20 + ["s2"] * 20
    with pytest.warns(UserWarning, match=r"section\(s\) \['s2'\]\) look log-normalised"):
        out = rmge.pp.prepare(make_reference(), spa, "cell_type", batch_key="slide", n_top_genes=None)
    sk = out.uns["rmge"]["value_kind_sections"]
    assert sk["s1"]["used"] == "counts" and sk["s2"]["used"] == "log_normalized"
    np.testing.assert_array_equal(dense(out.layers[COUNTS_LAYER][60:80]), X[:20])
    np.testing.assert_allclose(dense(out.layers[COUNTS_LAYER][80:]), np.expm1(X[20:].astype(float)), rtol=1e-5)
    assert list(out.obs["slide"][:60].unique()) == ["reference"]

    with pytest.raises(KeyError, match="`batch_key` 'nope' not found in `spatial.obs`"):
        rmge.pp.prepare(make_reference(), spa, "cell_type", batch_key="nope")


def test_ground_truth_column_preserved():
    spa = make_spatial()
    truth = np.resize(["A", "B", "X"], spa.n_obs)
    spa.obs["cell_type"] = truth
    spa.obs["extra"] = 1.0
    for copy_obs in (True, False):
        with pytest.warns(UserWarning, match="kept in `obs\\['cell_type_spatial'\\]`"):
            out = rmge.pp.prepare(make_reference(), spa, "cell_type", copy_obs=copy_obs)
        assert out.obs["cell_type"][60:].isna().all()
        np.testing.assert_array_equal(out.obs["cell_type_spatial"][60:].astype(str), truth)
        assert out.obs["cell_type_spatial"][:60].isna().all()
        assert ("extra" in out.obs.columns) == copy_obs


def test_empty_cells_dropped_per_domain():
    ref = make_reference()
    spa = make_spatial()
    Xr, Xs = dense(ref.X), dense(spa.X)
    Xr[3] = 0
    Xs[[1, 2]] = 0
    ref.X, spa.X = sp.csr_matrix(Xr), sp.csr_matrix(Xs)
    with pytest.warns(UserWarning, match="only zeros.*1 reference and 2 spatial cells"):
        out = rmge.pp.prepare(ref, spa, "cell_type", n_top_genes=None)
    assert out.n_obs == 107 and "cell3" not in out.obs_names[:59]
    assert out.uns["rmge"]["n_empty_cells_dropped"] == {"reference": 1, "spatial": 2}
    assert out.uns["rmge"]["n_reference_cells"] == 59 and out.uns["rmge"]["n_spatial_cells"] == 48
    assert out.obsm["spatial"].shape == (107, 2)
    np.testing.assert_array_equal(out.obsm["spatial"][59:], np.delete(spa.obsm["spatial"], [1, 2], axis=0))


def test_h5ad_round_trip(tmp_path):
    ref, s0 = make_reference(), make_spatial()
    ref.obs["donor"] = "d1"  # columns found on one side only, mixing values and NaN after concatenation
    s0.obs["in_tissue"] = True
    out = prepare_quiet(ref, [s0, make_spatial(seed=5)], "cell_type")
    path = tmp_path / "prepared.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["rmge"]["value_kind"] == out.uns["rmge"]["value_kind"]
    assert (back.layers[COUNTS_LAYER] != out.layers[COUNTS_LAYER]).nnz == 0
    assert back.obs["in_tissue"][60:110].all() and back.obs["in_tissue"][:60].isna().all()
    assert (back.obs["donor"][:60] == "d1").all()


# ------------------------------------------------------------------ errors


def test_missing_label_column():
    with pytest.raises(KeyError, match=r"Label column 'celltype' not found.*Available columns: \['cell_type'\]"):
        rmge.pp.prepare(make_reference(), make_spatial(), "celltype")


def test_unlabelled_reference_cells():
    ref = make_reference()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(object)
    ref.obs.iloc[[0, 5], 0] = np.nan
    with pytest.raises(ValueError, match=r"2 of 60 reference cells have no label.*drop_unlabeled=True"):
        rmge.pp.prepare(ref, make_spatial(), "cell_type")
    with pytest.warns(UserWarning, match="Dropping 2 of 60 reference cells without a label"):
        out = rmge.pp.prepare(ref, make_spatial(), "cell_type", drop_unlabeled=True, n_top_genes=None)
    assert out.uns["rmge"]["n_reference_cells"] == 58
    assert out.obs["cell_type"][:58].notna().all()
    np.testing.assert_array_equal(dense(out.X[:58]), np.delete(dense(ref.X), [0, 5], axis=0))


def test_no_shared_genes():
    spa = make_spatial(genes=[f"ENSMUSG{i:05d}" for i in range(40)])
    with pytest.raises(ValueError, match=r"Only 0 gene\(s\) are shared.*e\.g\. \['Gene0'.*\['ENSMUSG00000'.*species"):
        rmge.pp.prepare(make_reference(), spa, "cell_type")


def test_too_few_shared_genes():
    spa = make_spatial(genes=[f"Gene{i}" for i in range(10)] + [f"Other{i}" for i in range(30)])
    with pytest.raises(ValueError, match=r"Only 10 gene\(s\) are shared.*\(40 genes.*\(40 genes.*`min_genes=20`"):
        rmge.pp.prepare(make_reference(), spa, "cell_type")
    assert prepare_quiet(make_reference(), spa, "cell_type", min_genes=10).n_vars == 10


@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "spatial X .*negative values"), (np.nan, "non-finite"), (np.inf, "non-finite")],
)
def test_bad_values(value, match):
    spa = make_spatial()
    X = dense(spa.X)
    X[4, 2] = value
    spa.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=match):
        rmge.pp.prepare(make_reference(), spa, "cell_type")


def test_empty_domain():
    spa = make_spatial(genes=[f"Gene{i}" for i in range(40)])
    spa.X = sp.csr_matrix(spa.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="All 50 spatial cells have only zeros"):
        rmge.pp.prepare(make_reference(), spa, "cell_type")
    with pytest.raises(ValueError, match="has no cells"):
        rmge.pp.prepare(make_reference(), make_spatial()[:0].copy(), "cell_type")


def test_bad_arguments():
    ref, spa = make_reference(), make_spatial()
    with pytest.raises(ValueError, match="`spatial_kind` must be 'auto' or one of"):
        rmge.pp.prepare(ref, spa, "cell_type", spatial_kind="raw")
    with pytest.raises(TypeError, match="`spatial` must be an AnnData"):
        rmge.pp.prepare(ref, spa.X, "cell_type")
    with pytest.raises(ValueError, match="`duplicates` must be one of"):
        rmge.pp.prepare(ref, spa, "cell_type", duplicates="mean")


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
@pytest.mark.skipif(not (REF_FILE.exists() and MERFISH_FILE.exists()), reason="shared data absent")
def test_moffitt_scrna_to_merfish():
    ref = ad.read_h5ad(REF_FILE)
    merfish = ad.read_h5ad(MERFISH_FILE)
    with pytest.warns(UserWarning) as record:
        out = rmge.pp.prepare(ref, merfish, "cell_type", batch_key="samples")
    messages = " | ".join(str(w.message) for w in record)
    assert "look log-normalised" in messages
    info = out.uns["rmge"]
    if info["n_empty_cells_dropped"]["reference"]:
        assert "only zeros" in messages
    assert info["value_kind"] == {"reference": "counts", "spatial": "log_normalized"}
    assert 130 <= info["n_shared_genes"] <= 134
    assert info["n_genes_used"] == info["n_shared_genes"]  # fewer shared genes than n_top_genes
    assert info["n_spatial_cells"] == merfish.n_obs
    assert info["n_reference_cells"] + info["n_empty_cells_dropped"]["reference"] == ref.n_obs
    assert set(info["value_kind_sections"]) == set(merfish.obs["samples"].astype(str))
    # reference counts kept exactly
    n_ref = info["n_reference_cells"]
    names = out.obs["original_obs_name"][:n_ref]
    np.testing.assert_array_equal(dense(out.X[:n_ref]), dense(ref[names, list(out.var_names)].X))
    # MERFISH: expm1 of the stored values
    np.testing.assert_allclose(
        dense(out.X[n_ref : n_ref + 500]),
        np.expm1(dense(merfish[:500, list(out.var_names)].X).astype(float)),
        rtol=1e-5,
    )
    assert np.isnan(out.obsm["spatial"][:n_ref]).all()
    np.testing.assert_array_equal(out.obsm["spatial"][n_ref:], merfish.obsm["spatial"])
