"""Command line of rmge: ``rmge demo`` and ``rmge transfer``.

Run ``rmge --help`` or ``rmge <command> --help`` for the options. Exit codes: 0 on success, 1 when
the input data cannot be used (missing or unreadable file, missing column, too few shared genes,
invalid values), 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData

import rmge
from rmge._atomic import atomic_write
from rmge._constants import COUNTS, DOMAIN_KEY, LOG_NORMALIZED, NORMALIZED, SPATIAL_DOMAIN
from rmge.tl._results import _stored_label_colors

logger = logging.getLogger("rmge")

_PROG = "rmge"

#: Prefix of the keys written into the spatial AnnData: those of :func:`rmge.tl.add_results`.
KEY_ADDED = "rmge"
#: Keys written into the spatial AnnData (``obs`` columns, ``obsm`` entries, ``uns`` entries).
PREDICTION_KEY = f"{KEY_ADDED}_prediction"
CONFIDENCE_KEY = f"{KEY_ADDED}_confidence"
PROBABILITIES_KEY = f"{KEY_ADDED}_probabilities"
LATENT_KEY = f"X_{KEY_ADDED}"
COLORS_KEY = f"{PREDICTION_KEY}_colors"
SUMMARY_KEY = KEY_ADDED

_DEMO_TRUTH_KEY = "true_cell_type"
_DEMO_LABELS_KEY = "cell_type"
_DEMO_MAX_EPOCHS = 60
_STEREO_SUFFIXES = (".gem", ".gem.gz", ".gef", ".txt", ".txt.gz", ".tsv", ".tsv.gz")
# Lightning reports its set-up (accelerators, seeds, tips) through these loggers.
_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


class CLIError(Exception):
    """An expected error: reported as one line on stderr, without a traceback.

    Parameters
    ----------
    message
        What went wrong and how to fix it.
    exit_code
        1 for unusable input data, 2 for a wrong command line.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _usage_error(message: str) -> CLIError:
    return CLIError(message, exit_code=2)


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------
def _checked(convert, accept, expected: str):
    """An argparse ``type``: ``convert`` the text, then ``accept`` the value, else say what was ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_probability = _checked(float, lambda v: 0 <= v <= 1, "a probability between 0 and 1")
_positive_float = _checked(float, lambda v: np.isfinite(v) and v > 0, "a positive number")


_bin_width = _checked(int, lambda v: v >= 1, "a positive integer or 'cellbin'")


def _bin_size(text: str) -> int | str:
    return "cellbin" if text.strip().lower() == "cellbin" else _bin_width(text)


def _version() -> str:
    return rmge.__version__


def _add_run_options(parser: argparse.ArgumentParser, default_max_epochs: int | None) -> None:
    """Options shared by ``demo`` and ``transfer``: training length, seed, hardware, verbosity."""
    epochs_help = (
        "maximum number of training epochs (default: chosen from the data size, 20 to 200; "
        "training stops early when the validation loss stops improving)"
        if default_max_epochs is None
        else f"maximum number of training epochs (default: {default_max_epochs}; training stops early "
        "when the validation loss stops improving)"
    )
    parser.add_argument("--max-epochs", type=_positive_int, default=default_max_epochs, metavar="N", help=epochs_help)
    parser.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N", help="random seed (default: 0)")
    parser.add_argument(
        "--accelerator",
        default="auto",
        metavar="NAME",
        help="'auto' (default: a GPU when one is available), 'cpu' or 'gpu'",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="CPU threads of PyTorch (default: 1; the model is small, and several threads slow it down "
        "badly when other programs share the cores)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no progress messages")
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the messages and warnings of Lightning, and a traceback on errors",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``rmge`` command.

    Returns
    -------
    argparse.ArgumentParser
        Parser with the subcommands ``demo`` and ``transfer``.
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Robust MetaGene Extractor: transfer cell-type labels from a single-nucleus reference "
        "to sparse spatial transcriptomics.",
        epilog="Run 'rmge <command> --help' for the options of a command. Documentation: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    demo = sub.add_parser(
        "demo",
        help="label a simulated Stereo-seq section with known truth and report accuracy",
        description="Label a simulated Stereo-seq section (bins built from real PBMC counts, with known cell "
        "types) from a PBMC reference; print accuracy and macro-F1 against the truth and write the labelled "
        "section, two figures and the trained model into the output folder.",
    )
    demo.add_argument(
        "--output",
        "-o",
        default="rmge_demo_output",
        metavar="DIR",
        help="output folder (default: rmge_demo_output)",
    )
    _add_run_options(demo, _DEMO_MAX_EPOCHS)

    tr = sub.add_parser(
        "transfer",
        help="label spatial cells with the cell types of a reference",
        description="Transfer the cell types of REFERENCE (h5ad) to SPATIAL (h5ad, or a Stereo-seq GEM/GEF "
        f"file) and write SPATIAL with obs['{PREDICTION_KEY}'], obs['{CONFIDENCE_KEY}'], "
        f"obsm['{PROBABILITIES_KEY}'], obsm['{LATENT_KEY}'], uns['{COLORS_KEY}'] and a summary in "
        f"uns['{SUMMARY_KEY}'] to OUT.h5ad: the keys rmge.tl.add_results writes.",
    )
    tr.add_argument("reference", metavar="REFERENCE.h5ad", help="labelled reference (snRNA-seq, or gene activity)")
    tr.add_argument(
        "spatial",
        metavar="SPATIAL",
        help="spatial data: an .h5ad file, or a Stereo-seq GEM (.gem, .gem.gz, .txt, .txt.gz) or GEF (.gef) file",
    )
    tr.add_argument("--labels-key", required=True, metavar="KEY", help="column of the reference's obs with cell types")
    tr.add_argument("-o", "--output", required=True, metavar="OUT.h5ad", help="output file (written atomically)")
    tr.add_argument(
        "--reference-layer",
        default=None,
        metavar="LAYER",
        help="layer of the reference holding its values (default: X; 'raw' for .raw.X)",
    )
    tr.add_argument(
        "--spatial-layer",
        default=None,
        metavar="LAYER",
        help="layer of the spatial data holding its values (default: X; 'raw' for .raw.X)",
    )
    for side in ("reference", "spatial"):
        tr.add_argument(
            f"--{side}-kind",
            choices=("auto", COUNTS, NORMALIZED, LOG_NORMALIZED),
            default="auto",
            help=f"kind of values of the {side} data (default: auto, detected); log_normalized values are "
            "turned back with expm1",
        )
    tr.add_argument(
        "--batch-key",
        default=None,
        metavar="KEY",
        help="column of the spatial obs naming each cell's section; sections are standardised separately",
    )
    tr.add_argument(
        "--n-top-genes",
        type=_nonnegative_int,
        default=3000,
        metavar="N",
        help="keep the reference's N most variable shared genes (default: 3000; 0 keeps all shared genes)",
    )
    tr.add_argument(
        "--bin-size",
        type=_bin_size,
        default=50,
        metavar="N|cellbin",
        help="bin side in DNB spots for a GEM/GEF spatial file, or 'cellbin' (default: 50)",
    )
    tr.add_argument(
        "--original",
        action="store_true",
        help="use the settings of the original RMGE method (RMGEModel.ORIGINAL) instead of rmge's defaults",
    )
    tr.add_argument(
        "--count-evidence",
        action="store_true",
        help="add the count likelihood of each type's reference profile to the spatial cells' evidence "
        "(RMGEModel(count_evidence=True)); for single cells with counts (e.g. --bin-size cellbin), not bins "
        "that mix cells",
    )
    tr.add_argument(
        "--unknown-threshold",
        type=_probability,
        default=None,
        metavar="P",
        help="label 'Unknown' the cells whose largest probability is below P (default: every cell gets its "
        "most probable type)",
    )
    tr.add_argument(
        "--novelty-threshold",
        type=_positive_float,
        default=None,
        metavar="T",
        help="label 'Unknown' the cells that fit their predicted type more than T robust standard deviations "
        "worse than its typical member, e.g. 2 (types the reference lacks; default: off)",
    )
    tr.add_argument("--save-model", default=None, metavar="DIR", help="save the trained model into this folder")
    tr.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the spatial map of the predicted labels into this image file (needs obsm['spatial'])",
    )
    tr.add_argument(
        "--truth-key",
        default=None,
        metavar="KEY",
        help="column of the spatial obs with known labels: print accuracy and macro-F1 against it",
    )
    _add_run_options(tr, None)
    return parser


# --------------------------------------------------------------------------------------------
# Console output
# --------------------------------------------------------------------------------------------
def _one_line(message: object) -> str:
    if isinstance(message, KeyError) and len(message.args) == 1 and isinstance(message.args[0], str):
        text = message.args[0]  # str(KeyError) would add quotes
    else:
        text = str(message)
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{_PROG}: warning: {_one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def _console(verbose: bool, quiet: bool):
    """Route rmge's messages and warnings to stderr as short lines; silence Lightning unless verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    quiet_levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    if not quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if not verbose:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.showwarning = _show_warning
                # Lightning's warnings are about its own set-up (data loader workers, logging intervals),
                # not about the user's data.
                warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning(\.|$)")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if handler in logger.handlers:
            logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        for name, level in quiet_levels.items():
            logging.getLogger(name).setLevel(level)


def _info(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_h5ad_atomic(adata: AnnData, path: str | os.PathLike, compression: str | None = "gzip") -> Path:
    """Write an AnnData to ``.h5ad`` atomically: into a temporary file beside ``path``, then renamed.

    A failed write leaves an existing file at ``path`` untouched and no partial file behind.

    Parameters
    ----------
    adata
        The AnnData to write.
    path
        Target file. Its folder must exist.
    compression
        Compression of the datasets (``"gzip"``, ``"lzf"`` or ``None``).

    Returns
    -------
    The path written.
    """
    return atomic_write(Path(path), lambda tmp: adata.write_h5ad(tmp, compression=compression), suffix=".tmp.h5ad")


def _check_input_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"The {what} file '{path}' does not exist.")
    if p.is_dir():
        raise CLIError(f"The {what} path '{path}' is a folder; give a file.")
    return p


def _read_h5ad(path: Path, what: str) -> AnnData:
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise CLIError(f"Cannot read the {what} file '{path}' as h5ad: {_one_line(e)}") from e


def _read_spatial(path: Path, bin_size: int | str) -> AnnData:
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return _read_h5ad(path, "spatial")

    try:
        return rmge.io.read_stereo_seq(path, bin_size=bin_size)
    except (OSError, ValueError, KeyError) as e:
        hint = "" if name.endswith(_STEREO_SUFFIXES) else " Spatial data must be an .h5ad file or a GEM/GEF file."
        raise CLIError(f"Cannot read the spatial file '{path}': {_one_line(e)}{hint}") from e


def _prepare_output_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise _usage_error(f"The output '{path}' is a folder; give a file name such as 'labelled.h5ad'.")
    folder = p.parent if str(p.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"Cannot create the output folder '{folder}': {_one_line(e)}") from e
    if not os.access(folder, os.W_OK):
        raise CLIError(f"The output folder '{folder}' is not writable.")
    return p


def _check_model_dir(path: str) -> Path:
    """Refuse a folder that exists, is not empty and does not hold a saved model (it would be replaced)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise _usage_error(f"--save-model '{path}' is a file; give a folder.")
        if any(p.iterdir()) and not (p / "model.pt").exists():
            raise _usage_error(
                f"--save-model folder '{path}' exists and does not hold an rmge model; it would be replaced. "
                "Give a new or empty folder."
            )
    return p


def _check_image_path(path: str) -> Path:
    from matplotlib.figure import Figure

    p = Path(path)
    supported = Figure().canvas.get_supported_filetypes()
    fmt = p.suffix.lstrip(".").lower()
    if fmt not in supported:
        raise _usage_error(
            f"--plot '{path}' needs an image extension, one of: {', '.join('.' + k for k in sorted(supported))}."
        )
    folder = p.parent if str(p.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------
# Label transfer
# --------------------------------------------------------------------------------------------
@dataclass
class TransferResult:
    """Outcome of :func:`transfer_labels`.

    Attributes
    ----------
    model
        The trained :class:`rmge.RMGEModel`.
    adata
        The combined AnnData built by :func:`rmge.pp.prepare` that the model was trained on.
    n_labelled
        Spatial cells that received a label.
    n_unlabelled
        Spatial cells without a label (no counts over the genes used; dropped by ``prepare``).
    train_seconds
        Wall time of training.
    """

    model: object
    adata: AnnData
    n_labelled: int
    n_unlabelled: int
    train_seconds: float


def _copy_rows(values: np.ndarray, rows: np.ndarray, n: int, fill) -> np.ndarray:
    """An array of ``n`` rows holding ``values`` at ``rows`` and ``fill`` elsewhere."""
    out = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    out[rows] = values
    return out


def _copy_results(adata: AnnData, source: np.ndarray, spatial: AnnData, rows: np.ndarray) -> None:
    """Copy what :func:`rmge.tl.add_results` wrote into ``adata`` onto ``spatial``.

    Row ``source[i]`` of ``adata`` is row ``rows[i]`` of ``spatial``; the other rows of ``spatial``
    get missing values (no prediction, NaN confidence, probabilities and metagene activities).
    """
    n = spatial.n_obs
    predictions = adata.obs[PREDICTION_KEY]
    codes = predictions.cat.codes.to_numpy()[source].astype(np.int64)
    spatial.obs[PREDICTION_KEY] = pd.Categorical.from_codes(
        _copy_rows(codes, rows, n, -1), categories=predictions.cat.categories
    )
    spatial.obs[CONFIDENCE_KEY] = _copy_rows(adata.obs[CONFIDENCE_KEY].to_numpy()[source], rows, n, np.nan)
    probs = adata.obsm[PROBABILITIES_KEY]
    spatial.obsm[PROBABILITIES_KEY] = pd.DataFrame(
        _copy_rows(probs.to_numpy()[source], rows, n, np.nan), index=spatial.obs_names.copy(), columns=probs.columns
    )
    spatial.obsm[LATENT_KEY] = _copy_rows(np.asarray(adata.obsm[LATENT_KEY])[source], rows, n, np.nan)
    spatial.uns[COLORS_KEY] = list(adata.uns[COLORS_KEY])


def transfer_labels(
    reference: AnnData,
    spatial: AnnData,
    labels_key: str,
    *,
    reference_layer: str | None = None,
    spatial_layer: str | None = None,
    batch_key: str | None = None,
    n_top_genes: int | None = 3000,
    reference_kind: str = "auto",
    spatial_kind: str = "auto",
    max_epochs: int | None = None,
    original: bool = False,
    count_evidence: bool = False,
    unknown_threshold: float | None = None,
    novelty_threshold: float | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
) -> TransferResult:
    """Train an :class:`rmge.RMGEModel` on a reference and spatial data, and label the spatial cells in place.

    Runs :func:`rmge.pp.prepare`, :meth:`rmge.RMGEModel.setup_anndata`, training and
    :func:`rmge.tl.add_results`, and copies the keys ``add_results`` writes onto ``spatial`` (cells
    without counts over the genes used get missing values):

    - ``obs['rmge_prediction']``: predicted cell type (categorical; categories: the reference's types,
      in its order, then ``"Unknown"`` when ``unknown_threshold`` or ``novelty_threshold`` is given);
    - ``obs['rmge_confidence']``: probability of the most probable type (the largest probability);
    - ``obsm['rmge_probabilities']``: DataFrame cells × reference types, rows summing to 1;
    - ``obsm['X_rmge']``: metagene activities (cells × reference types);
    - ``uns['rmge_prediction_colors']``: one colour per category, the reference's
      ``uns['<labels_key>_colors']`` when it has them (scanpy's convention), ``"Unknown"`` in grey;
    - ``uns['rmge']``: the summary of :func:`rmge.pp.prepare` and the settings of
      :func:`rmge.tl.add_results`, with ``n_labelled``, ``n_unlabelled``, ``settings`` (``"default"``
      or ``"original"``) and ``n_epochs``.

    Parameters
    ----------
    reference
        Labelled reference, cells × genes.
    spatial
        Spatial data, cells × genes; annotated in place. Non-unique ``obs_names`` are made unique.
    labels_key
        Column of ``reference.obs`` with the cell types.
    reference_layer, spatial_layer
        Layers holding the values (``None``: ``X``; ``"raw"``: ``.raw.X``); see :func:`rmge.pp.prepare`.
    batch_key
        Column of ``spatial.obs`` naming each cell's section.
    n_top_genes
        Number of the reference's most variable shared genes to keep; ``None`` or 0 keeps all.
    reference_kind, spatial_kind
        Kind of values of each side (``"auto"``, ``"counts"``, ``"normalized"``, ``"log_normalized"``);
        see :func:`rmge.pp.prepare`.
    max_epochs
        Maximum number of training epochs; ``None`` lets :meth:`rmge.RMGEModel.train` choose.
    original
        Use :attr:`rmge.RMGEModel.ORIGINAL` (the original method's settings).
    count_evidence
        ``RMGEModel(count_evidence=True)``: add the count likelihood of each type's reference profile to
        the spatial cells' evidence. Needs counts on both sides; suits single cells, not bins mixing cells.
    unknown_threshold, novelty_threshold
        Label cells ``"Unknown"`` as :meth:`rmge.RMGEModel.predict` does; ``None`` turns each off.
    accelerator
        Passed to :meth:`rmge.RMGEModel.train`.
    progress_bar
        Show the training progress bar.

    Returns
    -------
    TransferResult
        The model, the combined AnnData (annotated by :func:`rmge.tl.add_results`) and cell numbers.
    """
    if not spatial.obs_names.is_unique:
        warnings.warn(
            "The spatial cell names (obs_names) are not unique; they are made unique by appending '-1', '-2', ...",
            UserWarning,
            stacklevel=2,
        )
        spatial.obs_names_make_unique()

    with warnings.catch_warnings():
        # A spatial column named like ``labels_key`` (e.g. known labels) is left as it is in ``spatial``;
        # prepare's warning about where it keeps that column in its own result does not apply here.
        warnings.filterwarnings("ignore", message="The spatial data already has a column", category=UserWarning)
        adata = rmge.pp.prepare(
            reference,
            spatial,
            labels_key=labels_key,
            batch_key=batch_key,
            reference_layer=reference_layer,
            spatial_layer=spatial_layer,
            n_top_genes=n_top_genes or None,
            reference_kind=reference_kind,
            spatial_kind=spatial_kind,
            copy_obs=False,
        )
    info = adata.uns["rmge"]
    logger.info(
        "Using %d genes (%d shared); %d reference and %d spatial cells; values: reference %s, spatial %s.",
        info["n_genes_used"],
        info["n_shared_genes"],
        info["n_reference_cells"],
        info["n_spatial_cells"],
        info["value_kind"]["reference"],
        info["value_kind"]["spatial"],
    )
    rmge.RMGEModel.setup_anndata(
        adata,
        labels_key=labels_key,
        domain_key=info["domain_key"],
        layer=info["counts_layer"],
        batch_key=info.get("batch_key"),
    )
    settings = dict(rmge.RMGEModel.ORIGINAL) if original else {}
    if count_evidence:
        settings["count_evidence"] = True
    model = rmge.RMGEModel(adata, **settings)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, accelerator=accelerator, enable_progress_bar=progress_bar)
    train_seconds = time.perf_counter() - start

    # The model's classes follow the reference's label categories (rmge.pp.prepare keeps their order),
    # so legends and colours match the reference.
    rmge.tl.add_results(
        model,
        adata,
        unknown_threshold=unknown_threshold,
        novelty_threshold=novelty_threshold,
        key_added=KEY_ADDED,
        palette=_stored_label_colors(reference, labels_key, model.classes_),
    )

    # Rows of ``spatial`` for each predicted cell: prepare keeps the input names in 'original_obs_name'
    # and may drop cells without counts over the genes used.
    spatial_idx = np.flatnonzero((adata.obs[DOMAIN_KEY] == SPATIAL_DOMAIN).to_numpy())
    names = adata.obs["original_obs_name"].iloc[spatial_idx].astype(str).to_numpy()
    rows = spatial.obs_names.get_indexer(names)
    if (rows < 0).any():  # pragma: no cover - prepare keeps every spatial name
        raise RuntimeError("Predicted cells could not be matched to the spatial cells by name.")
    _copy_results(adata, spatial_idx, spatial, rows)

    n = spatial.n_obs
    n_epochs = max((len(v) for v in model.history.values()), default=0) if model.history else 0
    spatial.uns[SUMMARY_KEY] = {
        **adata.uns[SUMMARY_KEY],
        "n_labelled": len(rows),
        "n_unlabelled": int(n - len(rows)),
        "settings": ("original" if original else "default") + (" + count evidence" if count_evidence else ""),
        "n_epochs": int(n_epochs),
    }
    if n > len(rows):
        logger.info("%d spatial cells have no counts over the genes used and get no label.", n - len(rows))
    return TransferResult(model, adata, len(rows), int(n - len(rows)), train_seconds)


def _summary_table(spatial: AnnData) -> str:
    labels = spatial.obs[PREDICTION_KEY]
    confidence = spatial.obs[CONFIDENCE_KEY]
    rows = []
    total = len(labels)
    for c in labels.cat.categories:
        m = (labels == c).to_numpy()
        rows.append(
            (str(c), int(m.sum()), 100.0 * m.sum() / max(total, 1), float(confidence[m].mean()) if m.any() else np.nan)
        )
    n_missing = int(labels.isna().sum())
    if n_missing:
        rows.append(("(no label)", n_missing, 100.0 * n_missing / max(total, 1), np.nan))
    width = max([len("cell type")] + [len(r[0]) for r in rows])
    lines = [f"  {'cell type':<{width}}  {'cells':>9}  {'%':>6}  {'mean confidence':>15}"]
    for name, count, pct, conf in rows:
        conf_text = "-" if np.isnan(conf) else f"{conf:.3f}"
        lines.append(f"  {name:<{width}}  {count:>9,}  {pct:>5.1f}%  {conf_text:>15}")
    return "\n".join(lines)


def _score(spatial: AnnData, truth_key: str) -> dict[str, float]:
    probs = spatial.obsm[PROBABILITIES_KEY]
    labelled = spatial.obs[PREDICTION_KEY].notna().to_numpy()
    # Unlabelled cells count as errors: their prediction is missing.
    truth = spatial.obs[truth_key].to_numpy()
    predicted = spatial.obs[PREDICTION_KEY].astype(object).to_numpy()
    metrics = rmge.tl.transfer_metrics(truth, predicted, classes=list(probs.columns))
    if labelled.any():
        scored = rmge.tl.transfer_metrics(truth[labelled], predicted[labelled], proba=probs.iloc[labelled])
        metrics["ece"] = scored["ece"]
    return metrics


def _format_metrics(metrics: dict[str, float], truth: str) -> str:
    text = (
        f"Accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
        f"balanced accuracy {metrics['balanced_accuracy']:.3f}"
    )
    if "ece" in metrics:
        text += f", calibration error (ECE) {metrics['ece']:.3f}"
    text += f" ({metrics['n_scored']:,} cells scored against {truth}"
    if metrics["n_excluded"]:
        text += f"; {metrics['n_excluded']:,} left out: true type absent from the reference"
    return text + ")."


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _set_up_run(args: argparse.Namespace) -> None:
    scvi.settings.num_threads = args.threads
    scvi.settings.seed = args.seed


def _cmd_transfer(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    ref_path = _check_input_file(args.reference, "reference")
    spatial_path = _check_input_file(args.spatial, "spatial")
    out_path = _prepare_output_file(args.output)
    model_dir = _check_model_dir(args.save_model) if args.save_model else None
    plot_path = _check_image_path(args.plot) if args.plot else None

    reference = _read_h5ad(ref_path, "reference")
    if args.labels_key not in reference.obs.columns:
        raise CLIError(
            f"Label column '{args.labels_key}' not found in the reference's obs (columns: "
            f"{', '.join(map(str, reference.obs.columns)) or 'none'}). Pass the column with the cell types "
            "as --labels-key."
        )
    spatial = _read_spatial(spatial_path, args.bin_size)
    if args.truth_key is not None and args.truth_key not in spatial.obs.columns:
        raise CLIError(
            f"--truth-key column '{args.truth_key}' not found in the spatial obs (columns: "
            f"{', '.join(map(str, spatial.obs.columns)) or 'none'})."
        )
    if plot_path is not None and "spatial" not in spatial.obsm:
        raise CLIError(
            "--plot needs spatial coordinates in the spatial data's obsm['spatial'], which is missing; "
            "drop --plot or add the coordinates."
        )
    _info(f"Reference: {reference.n_obs:,} cells x {reference.n_vars:,} genes ({ref_path})", args.quiet)
    _info(f"Spatial:   {spatial.n_obs:,} cells x {spatial.n_vars:,} genes ({spatial_path})", args.quiet)

    result = transfer_labels(
        reference,
        spatial,
        args.labels_key,
        reference_layer=args.reference_layer,
        spatial_layer=args.spatial_layer,
        batch_key=args.batch_key,
        n_top_genes=args.n_top_genes,
        reference_kind=args.reference_kind,
        spatial_kind=args.spatial_kind,
        max_epochs=args.max_epochs,
        original=args.original,
        count_evidence=args.count_evidence,
        unknown_threshold=args.unknown_threshold,
        novelty_threshold=args.novelty_threshold,
        accelerator=args.accelerator,
        progress_bar=not args.quiet,
    )
    spatial.uns[SUMMARY_KEY]["reference_file"] = str(ref_path)
    spatial.uns[SUMMARY_KEY]["seed"] = int(args.seed)
    del reference

    write_h5ad_atomic(spatial, out_path)
    if model_dir is not None:
        result.model.save(str(model_dir), overwrite=True)
    if plot_path is not None:
        rmge.pl.spatial_labels(spatial, key=PREDICTION_KEY, title="rmge prediction", save=plot_path, show=False)

    print(f"Predicted cell types of {spatial.n_obs:,} spatial cells:")
    print(_summary_table(spatial))
    if args.truth_key is not None:
        print(_format_metrics(_score(spatial, args.truth_key), f"obs['{args.truth_key}']"))
    print(
        f"Wrote {out_path}" + (f", {plot_path}" if plot_path else "") + (f" and model {model_dir}" if model_dir else "")
    )
    print(f"Finished in {time.perf_counter() - start:.1f} s (training {result.train_seconds:.1f} s).")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--output '{args.output}' is a file; give a folder.")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = _check_model_dir(str(out / "model"))

    reference, spatial = rmge.datasets.simulated_stereo_seq(seed=args.seed)
    # Both sides name their labels 'cell_type'; the section's are the simulation's truth, kept apart so
    # that they cannot be mistaken for training labels.
    spatial.obs = spatial.obs.rename(columns={_DEMO_LABELS_KEY: _DEMO_TRUTH_KEY})
    if f"{_DEMO_LABELS_KEY}_colors" in spatial.uns:
        spatial.uns[f"{_DEMO_TRUTH_KEY}_colors"] = list(spatial.uns.pop(f"{_DEMO_LABELS_KEY}_colors"))
    _info(
        f"Reference: {reference.n_obs:,} PBMCs x {reference.n_vars:,} genes (real counts, scanpy's pbmc68k_reduced); "
        f"spatial: {spatial.n_obs:,} simulated Stereo-seq bins of 1-3 cells, median "
        f"{np.median(spatial.obs['total_counts']):.0f} counts.",
        args.quiet,
    )
    result = transfer_labels(
        reference,
        spatial,
        _DEMO_LABELS_KEY,
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        progress_bar=not args.quiet,
    )
    spatial.uns[SUMMARY_KEY]["seed"] = int(args.seed)
    metrics = _score(spatial, _DEMO_TRUTH_KEY)
    spatial.uns[SUMMARY_KEY]["metrics"] = {k: float(v) for k, v in metrics.items()}

    h5ad_path = write_h5ad_atomic(spatial, out / "spatial_labelled.h5ad")
    _demo_map(spatial, out / "spatial_labels.png")
    rmge.pl.confusion_matrix(
        spatial, truth_key=_DEMO_TRUTH_KEY, pred_key=PREDICTION_KEY, save=out / "confusion_matrix.png", show=False
    )
    result.model.save(str(model_dir), overwrite=True)

    print(f"Predicted cell types of {spatial.n_obs:,} bins:")
    print(_summary_table(spatial))
    print(_format_metrics(metrics, "the simulated truth"))
    print(f"Wrote {h5ad_path}, {out / 'spatial_labels.png'}, {out / 'confusion_matrix.png'} and {model_dir}/")
    print(f"Finished in {time.perf_counter() - start:.1f} s (training {result.train_seconds:.1f} s).")
    return 0


def _demo_map(spatial: AnnData, path: Path) -> None:
    """Two panels side by side: the simulated truth and rmge's labels, in the same colours."""
    from matplotlib.figure import Figure

    classes = list(spatial.obs[PREDICTION_KEY].cat.categories)
    truth_colors = dict(
        zip(spatial.obs[_DEMO_TRUTH_KEY].cat.categories, spatial.uns.get(f"{_DEMO_TRUTH_KEY}_colors", []), strict=False)
    )
    palette = truth_colors if all(c in truth_colors for c in classes) else None
    fig = Figure(figsize=(15.0, 5.5), layout="constrained")
    ax_truth, ax_pred = fig.subplots(1, 2)
    rmge.pl.spatial_labels(spatial, key=_DEMO_TRUTH_KEY, title="simulated truth", palette=palette, ax=ax_truth)
    rmge.pl.spatial_labels(spatial, key=PREDICTION_KEY, title="rmge prediction", palette=palette, ax=ax_pred)
    rmge.pl.save_figure(fig, path, dpi=150)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rmge`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit code: 0 on success, 1 when the input data cannot be used, 2 for a wrong command line.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits for --help, --version and usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = {"demo": _cmd_demo, "transfer": _cmd_transfer}[args.command]
    threads = None
    with _console(verbose=args.verbose, quiet=args.quiet):
        try:
            threads = torch.get_num_threads()
            _set_up_run(args)
            return command(args)
        except CLIError as e:
            if args.verbose:
                raise
            print(f"{_PROG}: error: {_one_line(e)}", file=sys.stderr)
            return e.exit_code
        except (OSError, KeyError, ValueError) as e:
            # Errors rmge raises on input it cannot use name the problem and its fix; OSError covers
            # files that cannot be read or written (missing, no permission, disk full).
            if args.verbose:
                raise
            print(f"{_PROG}: error: {_one_line(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{_PROG}: interrupted", file=sys.stderr)
            return 130
        finally:
            if threads is not None:
                torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
