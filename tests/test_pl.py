import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from sklearn.metrics import f1_score

import rmge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    """The file exists, is a PNG of reasonable size and is not one flat colour."""
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 200
    assert image[..., :3].var() > 1e-3


@pytest.fixture(scope="module")
def spatial():
    _, adata = rmge.datasets.synthetic(n_reference=10, n_spatial=600, n_genes=20, n_classes=4, seed=0)
    rng = np.random.default_rng(0)
    labels = adata.obs["cell_type"].astype(object).to_numpy().copy()
    labels[rng.random(adata.n_obs) < 0.1] = "Unknown"
    labels[:5] = np.nan
    adata.obs["rmge_prediction"] = labels
    adata.obs["rmge_confidence"] = rng.random(adata.n_obs)
    return adata


@pytest.fixture(scope="module")
def history_dict():
    epochs = pd.Index(np.arange(15), name="epoch")
    rng = np.random.default_rng(1)
    keys = ["train_loss_epoch", "validation_loss", "elbo_train", "elbo_validation", "accuracy_validation"]
    return {k: pd.DataFrame({k: np.exp(-epochs / 4) + 0.05 * rng.random(15)}, index=epochs) for k in keys}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# spatial_labels
# ---------------------------------------------------------------------------------------------
def test_spatial_labels_renders_png(spatial, tmp_path):
    fig = rmge.pl.spatial_labels(spatial, save=tmp_path / "labels.png")
    assert isinstance(fig, Figure)
    check_png(tmp_path / "labels.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["type_0", "type_1", "type_2", "type_3", "Unknown", "NA"]


def test_spatial_labels_uses_stored_colours_and_grey_for_unknown(spatial):
    adata = spatial.copy()
    adata.obs["rmge_prediction"] = pd.Categorical(adata.obs["rmge_prediction"])
    categories = list(adata.obs["rmge_prediction"].cat.categories)
    assert categories == ["Unknown", "type_0", "type_1", "type_2", "type_3"]
    stored = ["#123456", "#ff0000", "#00ff00", "#0000ff", "#000000"]  # in category order
    adata.uns["rmge_prediction_colors"] = stored
    fig = rmge.pl.spatial_labels(adata, na_color="#aaaaaa")
    ax = fig.axes[0]
    grey, coloured = ax.collections
    np.testing.assert_allclose(grey.get_facecolors()[0], to_rgba("#aaaaaa"))
    n_grey = (adata.obs["rmge_prediction"].isna() | (adata.obs["rmge_prediction"] == "Unknown")).sum()
    assert len(grey.get_offsets()) == n_grey
    labels = adata.obs["rmge_prediction"].astype(str).to_numpy()
    shown = labels[~(adata.obs["rmge_prediction"].isna().to_numpy() | (labels == "Unknown"))]
    expected = np.array([to_rgba(stored[categories.index(lab)]) for lab in shown])
    np.testing.assert_allclose(coloured.get_facecolors(), expected)


def test_spatial_labels_groups_and_palette(spatial, tmp_path):
    palette = {"type_0": "red", "type_1": "blue", "type_2": "green", "type_3": "black"}
    fig = rmge.pl.spatial_labels(spatial, groups=["type_1"], palette=palette, save=tmp_path / "g.png")
    check_png(tmp_path / "g.png")
    coloured = fig.axes[0].collections[-1]
    assert len(coloured.get_offsets()) == (spatial.obs["rmge_prediction"] == "type_1").sum()
    np.testing.assert_allclose(np.unique(coloured.get_facecolors(), axis=0), [to_rgba("blue")])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["type_1", "other"]
    with pytest.raises(ValueError, match=r"groups \['nope'\] are not categories .*'type_0'"):
        rmge.pl.spatial_labels(spatial, groups=["nope"])


def test_spatial_labels_into_given_axes(spatial):
    fig, ax = plt.subplots()
    out = rmge.pl.spatial_labels(spatial, key="cell_type", ax=ax, legend=False)
    assert out is ax and isinstance(out, Axes)
    assert ax.yaxis_inverted()  # image convention for obsm['spatial']


def test_spatial_labels_missing_keys(spatial):
    with pytest.raises(KeyError, match=r"'not_here' is not in adata.obs. Available columns: 'cell_type'"):
        rmge.pl.spatial_labels(spatial, key="not_here")
    with pytest.raises(KeyError, match=r"'X_umap' are not in adata.obsm. Available entries: 'spatial'"):
        rmge.pl.spatial_labels(spatial, key="cell_type", basis="X_umap")


def test_default_keys_are_those_of_add_results(spatial):
    """Without results the defaults name the missing column and how to write it."""
    bare = spatial.copy()
    del bare.obs["rmge_prediction"], bare.obs["rmge_confidence"]
    hint = r"Store the results first \(e.g. `rmge.tl.add_results\(model, adata\)` writes 'rmge_prediction'"
    with pytest.raises(KeyError, match=r"Column 'rmge_prediction' is not in adata.obs.*" + hint):
        rmge.pl.spatial_labels(bare)
    with pytest.raises(KeyError, match=r"Column 'rmge_confidence' is not in adata.obs.*" + hint):
        rmge.pl.spatial_confidence(bare)
    with pytest.raises(KeyError, match=r"Column 'rmge_prediction' is not in adata.obs"):
        rmge.pl.confusion_matrix(bare, truth_key="cell_type")


def test_spatial_labels_does_not_open_pyplot_figures(spatial):
    before = plt.get_fignums()
    rmge.pl.spatial_labels(spatial)
    assert plt.get_fignums() == before


# ---------------------------------------------------------------------------------------------
# spatial_confidence
# ---------------------------------------------------------------------------------------------
def test_spatial_confidence_renders_with_colorbar(spatial, tmp_path):
    fig = rmge.pl.spatial_confidence(spatial, save=tmp_path / "conf.png")
    check_png(tmp_path / "conf.png")
    assert len(fig.axes) == 2  # plot and colour bar
    values = fig.axes[0].collections[-1].get_array()
    np.testing.assert_allclose(np.sort(values), np.sort(spatial.obs["rmge_confidence"]))


def test_spatial_confidence_errors(spatial):
    with pytest.raises(KeyError, match=r"'confidence' is not in adata.obs. Available columns: .*'rmge_confidence'"):
        rmge.pl.spatial_confidence(spatial, key="confidence")
    with pytest.raises(TypeError, match=r"adata.obs\['cell_type'\] must be numeric.*spatial_labels"):
        rmge.pl.spatial_confidence(spatial, key="cell_type")


# ---------------------------------------------------------------------------------------------
# confusion_matrix
# ---------------------------------------------------------------------------------------------
def test_confusion_matrix_known_answer(tmp_path):
    y_true = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    y_pred = ["a", "a", "a", "b"] + ["b", "b", "b", "b"] + ["c", "c", "Unknown", "a"]
    fig = rmge.pl.confusion_matrix((y_true, y_pred), save=tmp_path / "cm.png")
    check_png(tmp_path / "cm.png")
    ax = fig.axes[0]
    macro = f1_score(y_true, y_pred, labels=["a", "b", "c"], average="macro")
    assert ax.get_title() == f"accuracy 0.750 · macro-F1 {macro:.3f}"
    matrix = ax.images[0].get_array()
    # Rows are the true classes, columns add the label only predicted; rows sum to 1.
    assert matrix.shape == (3, 4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    np.testing.assert_allclose(matrix[2], [0.25, 0.0, 0.5, 0.25])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "Unknown"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert "0.75" in [t.get_text() for t in ax.texts]


def test_confusion_matrix_from_anndata_counts(spatial, tmp_path):
    # the predictions are read from obs['rmge_prediction'] (rmge.tl.add_results's key) by default
    fig = rmge.pl.confusion_matrix(spatial, "cell_type", normalize=None, save=tmp_path / "cm.png")
    check_png(tmp_path / "cm.png")
    assert fig.axes[0].get_xlabel() == "predicted (rmge_prediction)"
    matrix = fig.axes[0].images[0].get_array()
    assert matrix.sum() == spatial.n_obs
    accuracy = (spatial.obs["cell_type"].astype(str) == spatial.obs["rmge_prediction"].astype(str)).mean()
    assert fig.axes[0].get_title().startswith(f"accuracy {accuracy:.3f}")


def test_confusion_matrix_errors(spatial):
    with pytest.raises(KeyError, match=r"'truth' is not in adata.obs. Available columns: 'cell_type'"):
        rmge.pl.confusion_matrix(spatial, "truth", "rmge_prediction")
    with pytest.raises(ValueError, match="normalize must be"):
        rmge.pl.confusion_matrix(spatial, "cell_type", "rmge_prediction", normalize="rows")
    with pytest.raises(ValueError, match="differ in length: 2 and 1"):
        rmge.pl.confusion_matrix((["a", "b"], ["a"]))


# ---------------------------------------------------------------------------------------------
# metagenes
# ---------------------------------------------------------------------------------------------
def test_metagenes_shows_top_genes_per_class(tmp_path):
    genes = [f"g{i}" for i in range(12)]
    weights = pd.DataFrame(0.0, index=genes, columns=["A", "B", "C"])
    weights.loc[["g3", "g1"], "A"] = [2.0, 1.0]
    weights.loc[["g7", "g3"], "B"] = [3.0, 1.5]  # g3 already shown under A
    weights.loc[["g9", "g0"], "C"] = [1.0, 0.5]
    weights.loc["g1", "C"] = -1.0
    fig = rmge.pl.metagenes(weights, n_top=2, save=tmp_path / "mg.png")
    check_png(tmp_path / "mg.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g3", "g1", "g7", "g9", "g0"]
    matrix = ax.images[0].get_array()
    np.testing.assert_allclose(matrix[:, 0], [2.0, 1.5, 0.0])
    np.testing.assert_allclose(matrix[:, 1], [1.0, 0.0, -1.0])
    # Weights of both signs: the colour scale is symmetric around 0.
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == -3.0


def test_metagenes_errors():
    weights = pd.DataFrame(np.ones((3, 2)), index=["a", "b", "c"], columns=["X", "Y"])
    with pytest.raises(KeyError, match=r"Classes \['Z'\] are not columns of metagenes_df. Available: 'X', 'Y'"):
        rmge.pl.metagenes(weights, classes=["Z"])
    with pytest.raises(ValueError, match="n_top must be a positive integer"):
        rmge.pl.metagenes(weights, n_top=0)
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        rmge.pl.metagenes(np.ones((3, 2)))


# ---------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------
def test_history_groups_train_and_validation(history_dict, tmp_path):
    fig = rmge.pl.history(history_dict, save=tmp_path / "h.png")
    check_png(tmp_path / "h.png")
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_visible()}
    assert panels == {
        "loss": ["train_loss_epoch", "validation_loss"],
        "elbo": ["elbo_train", "elbo_validation"],
        "accuracy": ["accuracy_validation"],
    }
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), history_dict["train_loss_epoch"]["train_loss_epoch"])


def test_history_accepts_a_model_and_selected_keys(history_dict):
    class Trained:
        history = history_dict

    fig = rmge.pl.history(Trained(), keys=["elbo_train"])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["elbo"]


def test_history_errors(history_dict):
    with pytest.raises(KeyError, match=r"Keys \['nope'\] are not in the history. Available keys: 'train_loss_epoch'"):
        rmge.pl.history(history_dict, keys=["nope"])
    with pytest.raises(ValueError, match="history is empty: train the model first"):
        rmge.pl.history({})


# ---------------------------------------------------------------------------------------------
# atomic saving
# ---------------------------------------------------------------------------------------------
def test_save_with_bad_extension_leaves_existing_file(spatial, tmp_path):
    target = tmp_path / "plot.xyz"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"extension '.xyz' is not a known image format. Use one of: .*\.png"):
        rmge.pl.spatial_labels(spatial, save=target)
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.xyz"]


def test_failed_write_leaves_existing_file_and_no_temporary(spatial, tmp_path, monkeypatch):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old figure")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        rmge.pl.spatial_confidence(spatial, save=target)
    assert target.read_bytes() == b"old figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_save_replaces_existing_file_and_missing_folder(spatial, tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old figure")
    target.chmod(0o640)
    rmge.pl.spatial_labels(spatial, save=target)
    check_png(target)
    assert target.stat().st_mode & 0o777 == 0o640
    new = tmp_path / "fresh.pdf"
    rmge.pl.spatial_labels(spatial, save=new)
    assert new.read_bytes()[:4] == b"%PDF"
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rmge.pl.spatial_labels(spatial, save=tmp_path / "missing" / "plot.png")
