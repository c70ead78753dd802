"""Metrics of a label transfer: accuracy, macro-F1, balanced accuracy and calibration error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, recall_score


def _as_label_array(labels, what: str) -> np.ndarray:
    """Labels as a 1-D object array; missing values stay ``None``."""
    if isinstance(labels, pd.DataFrame):
        raise TypeError(f"`{what}` must be one-dimensional (a list, array or Series of labels), not a DataFrame.")
    arr = np.asarray(pd.Series(labels, dtype=object).to_numpy(), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"`{what}` must be one-dimensional; got an array of shape {arr.shape}.")
    missing = pd.isna(arr)
    arr = arr.copy()
    arr[missing] = None
    return arr


def _as_proba(proba, classes: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``proba`` into a float matrix and the class of each column, checking both."""
    if isinstance(proba, pd.DataFrame):
        if classes is not None and list(classes) != list(proba.columns):
            raise ValueError(
                "`classes` disagrees with the columns of the `proba` DataFrame; pass one or the other, not both."
            )
        values = proba.to_numpy(dtype=float)
        cls = np.asarray(proba.columns.to_numpy(), dtype=object)
    else:
        values = np.asarray(proba, dtype=float)
        if classes is None:
            raise ValueError(
                "`proba` is an array, so the class of each column is unknown: pass `classes=` "
                "(one label per column) or give `proba` as a DataFrame whose columns are the classes."
            )
        cls = np.asarray(list(classes), dtype=object)
    if values.ndim != 2:
        raise ValueError(f"`proba` must be a 2-D matrix (cells x classes); got shape {values.shape}.")
    if values.shape[1] != len(cls):
        raise ValueError(f"`proba` has {values.shape[1]} columns but {len(cls)} classes were given.")
    if len(set(cls.tolist())) != len(cls):
        raise ValueError("The classes of `proba` must be unique.")
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
        raise ValueError("`proba` must hold finite, non-negative probabilities.")
    sums = values.sum(axis=1)
    if values.size and not np.allclose(sums, 1.0, atol=1e-3):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"Rows of `proba` must sum to 1 (row {bad} sums to {sums[bad]:.4g}). Pass probabilities, "
            "not scores or logits: apply a softmax, or divide each row by its sum."
        )
    return values, cls


def expected_calibration_error(y_true, proba, classes: Sequence | None = None, n_bins: int = 10) -> float:
    r"""Top-label expected calibration error (ECE) with equal-width confidence bins.

    Each cell's confidence is its largest probability and its prediction the class of that
    probability. Cells are put in ``n_bins`` equal-width bins ``((m-1)/M, m/M]`` of confidence, and

    .. math:: \mathrm{ECE} = \sum_m \frac{|B_m|}{n} \, |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|

    (Guo et al., 2017). 0 is perfect calibration; a model that is always 90% sure and right
    half the time has ECE 0.4. A cell whose true label is not among ``classes`` counts as wrongly
    predicted; cells with a missing true label (``None``/``NaN``) are ignored.

    Parameters
    ----------
    y_true
        True label of each cell (length ``n_cells``).
    proba
        Predicted class probabilities, cells x classes, each row summing to 1: a
        :class:`~pandas.DataFrame` whose columns are the classes (as returned by
        ``RMGEModel.predict(soft=True)``), or an array together with ``classes``.
    classes
        Class of each column of ``proba`` when ``proba`` is an array.
    n_bins
        Number of equal-width confidence bins.

    Returns
    -------
    The expected calibration error, in ``[0, 1]``; ``nan`` when no cell has a true label.

    Examples
    --------
    >>> import numpy as np
    >>> from rmge.tl import expected_calibration_error
    >>> proba = np.array([[0.9, 0.1], [0.9, 0.1]])
    >>> expected_calibration_error(["a", "b"], proba, classes=["a", "b"])
    0.4
    """
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer; got {n_bins!r}.")
    values, cls = _as_proba(proba, classes)
    truth = _as_label_array(y_true, "y_true")
    if len(truth) != values.shape[0]:
        raise ValueError(f"`y_true` has {len(truth)} labels but `proba` has {values.shape[0]} rows.")
    keep = np.array([t is not None for t in truth], dtype=bool)
    if not keep.any() or values.shape[1] == 0:
        return float("nan")
    values, truth = values[keep], truth[keep]
    top = values.argmax(axis=1)
    confidence = values[np.arange(len(top)), top]
    correct = (cls[top] == truth).astype(float)
    # Hand-written (a few lines of numpy) rather than torchmetrics' version: it works on label
    # arrays of any type without a torch round trip, and uses the right-closed bins of Guo et al.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(float)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def transfer_metrics(
    y_true,
    y_pred,
    proba: pd.DataFrame | np.ndarray | None = None,
    classes: Sequence | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """Score transferred labels against the truth.

    Only cells whose true label is one of the *reference classes* are scored, because a method
    cannot predict a type it never saw: the reference classes are ``classes`` when given, else the
    columns of ``proba``, else (a fallback) the set of predicted labels. Cells with a missing true
    label are skipped as well. Predictions of reference-only classes (types the query lacks)
    count as errors but add no class of their own to the averages.

    Parameters
    ----------
    y_true
        True label of each query cell.
    y_pred
        Predicted label of each query cell.
    proba
        Optional predicted probabilities, cells x classes (rows summing to 1), as a DataFrame whose
        columns are the classes or an array whose columns follow ``classes``. Adds ``"ece"``.
    classes
        The reference classes (labels the method could predict).
    n_bins
        Number of bins of the calibration error.

    Returns
    -------
    A dict with

    - ``"accuracy"``: fraction of scored cells predicted correctly;
    - ``"macro_f1"``: unweighted mean of the per-class F1 scores over the true classes present;
    - ``"balanced_accuracy"``: unweighted mean of the per-class recalls over the same classes;
    - ``"ece"`` (only when ``proba`` is given): :func:`expected_calibration_error` on scored cells;
    - ``"n_scored"``: number of scored cells; ``"n_excluded"``: cells left out.

    Examples
    --------
    >>> from rmge.tl import transfer_metrics
    >>> m = transfer_metrics(["a", "a", "b", "x"], ["a", "b", "b", "a"], classes=["a", "b"])
    >>> round(m["accuracy"], 3), m["n_scored"], m["n_excluded"]
    (0.667, 3, 1)
    """
    truth = _as_label_array(y_true, "y_true")
    pred = _as_label_array(y_pred, "y_pred")
    if len(truth) != len(pred):
        raise ValueError(f"`y_true` has {len(truth)} labels but `y_pred` has {len(pred)}.")
    values = cls = None
    if proba is not None:
        values, cls = _as_proba(proba, classes if not isinstance(proba, pd.DataFrame) else None)
        if values.shape[0] != len(truth):
            raise ValueError(f"`proba` has {values.shape[0]} rows but `y_true` has {len(truth)} labels.")
    if classes is not None:
        reference = set(classes)
    elif cls is not None:
        reference = set(cls.tolist())
    else:
        reference = {p for p in pred if p is not None}
    keep = np.array([t is not None and t in reference for t in truth], dtype=bool)
    n_scored = int(keep.sum())
    out: dict[str, float] = {"n_scored": n_scored, "n_excluded": int(len(truth) - n_scored)}
    if n_scored == 0:
        out.update(accuracy=float("nan"), macro_f1=float("nan"), balanced_accuracy=float("nan"))
        if values is not None:
            out["ece"] = float("nan")
        return out
    # A missing prediction is never right; a sentinel keeps sklearn's label handling simple.
    t = np.array([str(x) for x in truth[keep]], dtype=object)
    p = np.array(["\0missing" if x is None else str(x) for x in pred[keep]], dtype=object)
    labels = sorted(set(t.tolist()))
    out["accuracy"] = float(accuracy_score(t, p))
    out["macro_f1"] = float(f1_score(t, p, labels=labels, average="macro", zero_division=0))
    out["balanced_accuracy"] = float(recall_score(t, p, labels=labels, average="macro", zero_division=0))
    if values is not None:
        out["ece"] = expected_calibration_error(truth[keep], values[keep], classes=cls.tolist(), n_bins=n_bins)
    return out
