"""Tests of the command line: ``rmge transfer`` and ``rmge demo`` outputs, exit codes and error messages."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rmge
from rmge import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_CLASSES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: What rmge.tl.add_results writes (with its default prefix) and the command line writes as well.
RESULT_KEYS = {
    "obs": {"rmge_prediction", "rmge_confidence"},
    "obsm": {"rmge_probabilities", "X_rmge"},
    "uns": {"rmge_prediction_colors", "rmge"},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small reference and spatial dataset written to h5ad; the spatial truth is kept as 'truth'."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    reference, spatial = rmge.datasets.synthetic(
        n_reference=300, n_spatial=200, n_genes=60, n_classes=N_CLASSES, seed=0, spatial_depth_ratio=0.2
    )
    spatial.obs = spatial.obs.rename(columns={"cell_type": "truth"})
    ref_path, spatial_path = folder / "reference.h5ad", folder / "spatial.h5ad"
    reference.write_h5ad(ref_path)
    spatial.write_h5ad(spatial_path)
    return {"reference": ref_path, "spatial": spatial_path, "folder": folder}


def transfer_args(reference, spatial, out_path, *extra):
    return ["transfer", reference, spatial, "--labels-key", "cell_type", "-o", out_path, *extra]


def run(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def added_keys(after: ad.AnnData, before: ad.AnnData) -> dict[str, set[str]]:
    """The obs, obsm and uns keys ``after`` holds and ``before`` lacks."""
    return {
        "obs": set(after.obs.columns) - set(before.obs.columns),
        "obsm": set(after.obsm) - set(before.obsm),
        "uns": set(after.uns) - set(before.uns),
    }


# ------------------------------------------------------------------ transfer


def test_transfer_writes_documented_keys(inputs, tmp_path, capsys):
    out_path = tmp_path / "out" / "labelled.h5ad"  # the folder is created
    model_dir, plot_path = tmp_path / "model", tmp_path / "labels.png"
    extra = ["--max-epochs", 3, "--n-top-genes", 0, "--save-model", model_dir, "--plot", plot_path]
    args = transfer_args(inputs["reference"], inputs["spatial"], out_path, *extra, "--truth-key", "truth", "-q")
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "Traceback" not in err

    spatial_in = ad.read_h5ad(inputs["spatial"])
    result = ad.read_h5ad(out_path)
    classes = [f"type_{k}" for k in range(N_CLASSES)]
    # the input is returned unchanged, in the same order, with the predictions added
    assert list(result.obs_names) == list(spatial_in.obs_names)
    assert (result.X != spatial_in.X).nnz == 0
    assert result.obs["truth"].equals(spatial_in.obs["truth"])

    # the keys of rmge.tl.add_results, no other
    assert added_keys(result, spatial_in) == RESULT_KEYS
    assert (cli.PREDICTION_KEY, cli.CONFIDENCE_KEY) == ("rmge_prediction", "rmge_confidence")
    assert (cli.PROBABILITIES_KEY, cli.LATENT_KEY, cli.COLORS_KEY, cli.SUMMARY_KEY) == (
        "rmge_probabilities",
        "X_rmge",
        "rmge_prediction_colors",
        "rmge",
    )

    labels = result.obs[cli.PREDICTION_KEY]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == classes
    assert labels.notna().all()

    probs = result.obsm[cli.PROBABILITIES_KEY]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == classes
    assert list(probs.index) == list(result.obs_names)
    p = probs.to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (np.asarray(classes)[p.argmax(axis=1)] == labels.astype(str).to_numpy()).all()

    confidence = result.obs[cli.CONFIDENCE_KEY]
    assert confidence.dtype == np.float32  # as rmge.tl.add_results writes it
    np.testing.assert_allclose(confidence.to_numpy(), p.max(axis=1))
    assert (confidence >= 1.0 / N_CLASSES - 1e-6).all() and (confidence <= 1.0 + 1e-6).all()

    latent = result.obsm[cli.LATENT_KEY]
    assert latent.shape == (result.n_obs, N_CLASSES) and np.isfinite(latent).all()
    # the most active metagene gives the label
    assert (np.asarray(classes)[np.asarray(latent).argmax(axis=1)] == labels.astype(str).to_numpy()).mean() > 0.9

    # the reference's colours of its types, in the categories' order
    assert list(result.uns[cli.COLORS_KEY]) == list(ad.read_h5ad(inputs["reference"]).uns["cell_type_colors"])

    summary = result.uns[cli.SUMMARY_KEY]
    assert summary["labels_key"] == "cell_type"
    assert list(summary["classes"]) == classes
    assert summary["n_labelled"] == result.n_obs and summary["n_unlabelled"] == 0
    assert summary["n_genes_used"] == 60 and summary["settings"] == "default"
    assert 1 <= summary["n_epochs"] <= 3
    assert summary["cells"] == "spatial" and "unknown_threshold" not in summary
    assert summary["reference_file"] == str(inputs["reference"]) and summary["seed"] == 0
    assert dict(summary["value_kind"]) == {"reference": "counts", "spatial": "counts"}

    # easy synthetic data: far above the 1/3 of chance, even after 3 epochs
    accuracy = (labels.astype(str) == result.obs["truth"].astype(str)).mean()
    assert accuracy > 0.8
    assert f"Accuracy {accuracy:.3f}" in out
    for c in classes:
        assert c in out
    assert str(out_path) in out

    assert plot_path.read_bytes()[:8] == PNG_SIGNATURE
    assert not [f for f in out_path.parent.iterdir() if f.name.startswith(".")]  # no temporary file left

    # the saved model loads on the same prepared data and gives the same probabilities
    reference = ad.read_h5ad(inputs["reference"])
    adata = rmge.pp.prepare(reference, spatial_in, labels_key="cell_type", n_top_genes=None, copy_obs=False)
    model = rmge.RMGEModel.load(str(model_dir), adata=adata)
    idx = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    reloaded = model.predict(indices=idx, soft=True)[classes]
    np.testing.assert_allclose(reloaded.to_numpy(), p, atol=1e-5)

    # rmge.tl.add_results on the prepared data writes the same keys, with the same values for the spatial cells
    del adata.uns["rmge"]  # prepare's summary, which add_results adds to
    expected = rmge.tl.add_results(model, adata, copy=True)
    assert added_keys(expected, adata) == RESULT_KEYS
    rows = result.obs_names.get_indexer(expected.obs["original_obs_name"].iloc[idx])
    assert (rows >= 0).all()
    assert list(expected.obs[cli.PREDICTION_KEY].cat.categories) == classes
    assert (expected.obs[cli.PREDICTION_KEY].iloc[idx].to_numpy() == labels.to_numpy()[rows]).all()
    assert expected.obs[cli.CONFIDENCE_KEY].dtype == confidence.dtype
    np.testing.assert_allclose(expected.obs[cli.CONFIDENCE_KEY].to_numpy()[idx], confidence.to_numpy()[rows], atol=1e-5)
    np.testing.assert_allclose(expected.obsm[cli.PROBABILITIES_KEY].to_numpy()[idx], p[rows], atol=1e-5)
    np.testing.assert_allclose(expected.obsm[cli.LATENT_KEY][idx], np.asarray(latent)[rows], atol=1e-4)
    settings = expected.uns[cli.SUMMARY_KEY]
    assert set(settings) <= set(summary)
    for key in ("classes", "cells", "labels_key", "domain_key", "reference_domain", "rmge_version"):
        assert np.array_equal(np.asarray(summary[key]), np.asarray(settings[key])), key
    assert summary["calibration_temperature"] == pytest.approx(settings["calibration_temperature"])


def test_cells_without_counts_get_no_label_and_names_are_made_unique(inputs):
    reference = ad.read_h5ad(inputs["reference"])
    spatial = ad.read_h5ad(inputs["spatial"])
    X = sp.csr_matrix(spatial.X).tolil()
    X[0, :] = 0  # no counts over the genes used: prepare drops it
    spatial.X = X.tocsr()
    spatial.obs_names = ["cell_a", "cell_a", *spatial.obs_names[2:]]
    with pytest.warns(UserWarning, match="not unique"):
        result = cli.transfer_labels(reference, spatial, "cell_type", max_epochs=1, progress_bar=False)

    assert list(spatial.obs_names[:2]) == ["cell_a", "cell_a-1"]
    assert result.n_unlabelled == 1 and result.n_labelled == spatial.n_obs - 1
    assert pd.isna(spatial.obs[cli.PREDICTION_KEY].iloc[0]) and np.isnan(spatial.obs[cli.CONFIDENCE_KEY].iloc[0])
    probs = spatial.obsm[cli.PROBABILITIES_KEY].to_numpy()
    assert np.isnan(probs[0]).all() and np.isnan(spatial.obsm[cli.LATENT_KEY][0]).all()
    assert spatial.obs[cli.PREDICTION_KEY].iloc[1:].notna().all()
    classes = np.asarray(spatial.obsm[cli.PROBABILITIES_KEY].columns)
    assert (spatial.obs[cli.PREDICTION_KEY].iloc[1:].astype(str).to_numpy() == classes[probs[1:].argmax(1)]).all()
    np.testing.assert_allclose(probs[1:].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(spatial.obs[cli.CONFIDENCE_KEY].to_numpy()[1:], probs[1:].max(axis=1))
    # the predictions of the other cells are those of the model on the same cells
    idx = np.flatnonzero((result.adata.obs["domain"] == "spatial").to_numpy())
    expected = result.model.predict(indices=idx, soft=True)[list(spatial.obsm[cli.PROBABILITIES_KEY].columns)]
    np.testing.assert_allclose(probs[1:], expected.to_numpy(), atol=1e-6)
    assert spatial.uns[cli.SUMMARY_KEY]["n_unlabelled"] == 1
    # the combined AnnData holds the same results under the same keys
    assert added_keys(spatial, ad.read_h5ad(inputs["spatial"])) == RESULT_KEYS
    assert (result.adata.obs[cli.PREDICTION_KEY].iloc[idx].to_numpy() == spatial.obs[cli.PREDICTION_KEY].iloc[1:]).all()


def test_thresholds_and_reference_order(inputs):
    reference = ad.read_h5ad(inputs["reference"])
    spatial = ad.read_h5ad(inputs["spatial"])
    # types in another order than sorted, each keeping its colour
    colors = dict(zip(reference.obs["cell_type"].cat.categories, reference.uns["cell_type_colors"], strict=True))
    order = ["type_2", "type_0", "type_1"]
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.reorder_categories(order)
    reference.uns["cell_type_colors"] = [colors[c] for c in order]
    # spatial cells thinned to about 8 counts, so that some predictions are uncertain
    X = sp.csr_matrix(spatial.X, dtype=np.float32, copy=True)
    X.data = np.random.default_rng(0).binomial(X.data.astype(np.int64), 0.02).astype(np.float32)
    X.eliminate_zeros()
    spatial.X = X
    spatial = spatial[np.asarray(X.sum(axis=1)).ravel() > 0].copy()
    result = cli.transfer_labels(
        reference, spatial, "cell_type", max_epochs=2, unknown_threshold=0.6, novelty_threshold=3, progress_bar=False
    )

    labels = spatial.obs[cli.PREDICTION_KEY]
    assert list(labels.cat.categories) == [*order, "Unknown"]
    assert list(spatial.uns[cli.COLORS_KEY]) == [*(colors[c] for c in order), "#7f7f7f"]
    probs = spatial.obsm[cli.PROBABILITIES_KEY]
    assert list(probs.columns) == order
    p = probs.to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    confidence = spatial.obs[cli.CONFIDENCE_KEY].to_numpy()
    np.testing.assert_allclose(confidence, p.max(axis=1))
    unsure = confidence < 0.6
    assert 0 < unsure.sum() < spatial.n_obs  # two epochs: some cells fall below the threshold, not all
    assert (labels[unsure] == "Unknown").all()
    known = (labels != "Unknown").to_numpy()
    assert (labels[known].astype(str).to_numpy() == np.asarray(order)[p[known].argmax(axis=1)]).all()
    # the labels of RMGEModel.predict with both thresholds
    idx = np.flatnonzero((result.adata.obs["domain"] == "spatial").to_numpy())
    expected = result.model.predict(indices=idx, unknown_threshold=0.6, novelty_threshold=3)
    assert (labels.astype(str).to_numpy() == expected).all()
    assert spatial.uns[cli.SUMMARY_KEY]["unknown_threshold"] == pytest.approx(0.6)
    assert spatial.uns[cli.SUMMARY_KEY]["novelty_threshold"] == pytest.approx(3.0)
    assert list(spatial.uns[cli.SUMMARY_KEY]["classes"]) == order


def write_gem(path, X: sp.csr_matrix, genes, spacing: int):
    """One spot per cell at (spacing * i, 0): read back with bin_size=spacing, each bin is one cell."""
    coo = X.tocoo()
    lines = ["#FileFormat=GEMv0.1", "geneID\tx\ty\tMIDCount"]
    lines += [f"{genes[j]}\t{spacing * i}\t0\t{int(v)}" for i, j, v in zip(coo.row, coo.col, coo.data, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_transfer_reads_stereo_seq_gem_with_original_settings_and_kinds(inputs, tmp_path, capsys):
    spatial_in = ad.read_h5ad(inputs["spatial"])
    gem = write_gem(tmp_path / "section.gem", sp.csr_matrix(spatial_in.X), list(spatial_in.var_names), spacing=10)
    out_path = tmp_path / "gem_labelled.h5ad"
    extra = ["--bin-size", 10, "--max-epochs", 2, "--original", "--reference-kind", "normalized", "-q"]
    extra += ["--unknown-threshold", 0.5]
    args = transfer_args(inputs["reference"], gem, out_path, *extra)
    code, out, err = run(args, capsys)
    assert code == 0, err
    result = ad.read_h5ad(out_path)
    # every cell with counts became one bin, named by its bin index and placed at the bin centre
    n_cells = int((np.diff(sp.csr_matrix(spatial_in.X).indptr) > 0).sum())
    assert result.n_obs == n_cells
    assert result.obs_names[0] == "0_0"
    np.testing.assert_allclose(result.obsm["spatial"][:, 0] % 10, 4.5)
    labels = result.obs[cli.PREDICTION_KEY]
    assert labels.notna().all()
    assert list(labels.cat.categories) == [f"type_{k}" for k in range(N_CLASSES)] + ["Unknown"]
    assert ((labels == "Unknown").to_numpy() == (result.obs[cli.CONFIDENCE_KEY] < 0.5).to_numpy()).all()
    summary = result.uns[cli.SUMMARY_KEY]
    assert summary["settings"] == "original" and summary["unknown_threshold"] == pytest.approx(0.5)
    assert summary["value_kind"]["reference"] == "normalized"  # as told, not as detected
    assert summary["value_kind"]["spatial"] == "counts"
    assert "Predicted cell types" in out


def test_count_evidence_option(inputs):
    # single cells with counts on both sides: the count evidence is on, and the summary says so
    reference = ad.read_h5ad(inputs["reference"])
    spatial = ad.read_h5ad(inputs["spatial"])
    truth = spatial.obs["truth"].astype(str).to_numpy()
    result = cli.transfer_labels(reference, spatial, "cell_type", max_epochs=5, count_evidence=True, progress_bar=False)
    assert result.model.module.has_count_evidence
    assert spatial.uns[cli.SUMMARY_KEY]["settings"] == "default + count evidence"
    accuracy = (spatial.obs[cli.PREDICTION_KEY].astype(str).to_numpy() == truth).mean()
    assert accuracy >= 0.9, accuracy
    # normalised spatial values are not counts: a clear error instead of a silent switch-off
    spatial.X = sp.csr_matrix(sp.diags(1e4 / np.asarray(spatial.X.sum(1)).ravel()) @ spatial.X)
    with pytest.raises(ValueError, match="count_evidence=True needs integer counts"):
        cli.transfer_labels(reference, spatial, "cell_type", max_epochs=2, count_evidence=True, progress_bar=False)


# ------------------------------------------------------------------ errors


def test_missing_file_is_a_data_error(inputs, tmp_path, capsys):
    out_path = tmp_path / "never.h5ad"
    code, _, err = run(transfer_args(tmp_path / "absent.h5ad", inputs["spatial"], out_path), capsys)
    assert code == 1
    assert err.startswith("rmge: error: The reference file") and "absent.h5ad" in err and "does not exist" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out_path.exists()


def test_missing_label_column_names_the_available_columns(inputs, tmp_path, capsys):
    out_path = tmp_path / "never.h5ad"
    args = ["transfer", inputs["reference"], inputs["spatial"], "--labels-key", "celltype", "-o", out_path]
    code, _, err = run(args, capsys)
    assert code == 1
    assert "Label column 'celltype' not found" in err and "cell_type" in err and "--labels-key" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out_path.exists()


def test_no_shared_genes_is_a_data_error(inputs, tmp_path, capsys):
    spatial = ad.read_h5ad(inputs["spatial"])
    spatial.var_names = [f"other_{i}" for i in range(spatial.n_vars)]
    path = tmp_path / "other_genes.h5ad"
    spatial.write_h5ad(path)
    code, _, err = run(transfer_args(inputs["reference"], path, tmp_path / "x.h5ad"), capsys)
    assert code == 1
    assert "shared" in err and "Traceback" not in err and err.count("\n") == 1


def test_unreadable_file_is_a_data_error(inputs, tmp_path, capsys):
    bad = tmp_path / "broken.h5ad"
    bad.write_text("not an h5ad file")
    code, _, err = run(transfer_args(bad, inputs["spatial"], tmp_path / "x.h5ad"), capsys)
    assert code == 1
    assert "Cannot read the reference file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-epochs", "0"], "expected a positive integer"),
        (["--bin-size", "square"], "'cellbin'"),
        (["--plot", "map.txt"], "needs an image extension"),
        (["--unknown-threshold", "1.5"], "expected a probability between 0 and 1"),
        (["--novelty-threshold", "0"], "expected a positive number"),
    ],
)
def test_usage_errors_exit_2(inputs, tmp_path, capsys, extra, message):
    code, _, err = run(transfer_args(inputs["reference"], inputs["spatial"], tmp_path / "x.h5ad", *extra), capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_save_model_refuses_a_foreign_folder(inputs, tmp_path, capsys):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = transfer_args(inputs["reference"], inputs["spatial"], tmp_path / "x.h5ad", "--save-model", folder)
    code, _, err = run(args, capsys)
    assert code == 2 and "does not hold an rmge model" in err
    assert (folder / "notes.txt").read_text() == "keep me"


def test_usage_without_command_and_version(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "usage: rmge" in err
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"rmge {rmge.__version__}"
    code, _, err = run(["transfer", "a.h5ad"], capsys)
    assert code == 2 and "required" in err


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "result.h5ad"
    old = ad.AnnData(np.ones((2, 2), dtype=np.float32))
    cli.write_h5ad_atomic(old, path)
    before = path.read_bytes()

    def fail(self, filename, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fail)
    with pytest.raises(OSError, match="disk full"):
        cli.write_h5ad_atomic(ad.AnnData(np.zeros((3, 3), dtype=np.float32)), path)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["result.h5ad"]


# ------------------------------------------------------------------ demo


def test_demo_writes_its_outputs(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run(["demo", "--output", out_dir, "--max-epochs", 2, "-q"], capsys)
    assert code == 0, err
    for name in ("spatial_labels.png", "confusion_matrix.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_SIGNATURE
    assert (out_dir / "model" / "model.pt").exists()
    result = ad.read_h5ad(out_dir / "spatial_labelled.h5ad")
    assert "true_cell_type" in result.obs and "cell_type" not in result.obs
    assert result.obs[cli.PREDICTION_KEY].notna().all()
    assert set(result.obs[cli.PREDICTION_KEY].astype(str)) <= set(rmge.datasets.PBMC_CELL_TYPES.values())
    np.testing.assert_allclose(result.obsm[cli.PROBABILITIES_KEY].to_numpy().sum(axis=1), 1.0, atol=1e-5)
    # the printed accuracy is the one of the written labels
    accuracy = (result.obs[cli.PREDICTION_KEY].astype(str) == result.obs["true_cell_type"].astype(str)).mean()
    assert f"Accuracy {accuracy:.3f}" in out
    assert result.uns[cli.SUMMARY_KEY]["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert "Finished in" in out
