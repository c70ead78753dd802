"""Plots of label-transfer results: spatial maps, confusion matrices, metagenes and training history."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rmge._atomic import atomic_write
from rmge._constants import UNKNOWN_LABEL

_NA_LABEL = "NA"


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float], show: bool, nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure with its axes; managed by pyplot only when it is to be shown.

    Figures that are not shown are built outside pyplot, so that plotting in a loop does not
    accumulate open figures and notebooks display the returned figure once.
    """
    if show:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **kwargs)
    else:
        fig = Figure(figsize=figsize)
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _resolve_show(show: bool | None) -> bool:
    if show is None:
        return bool(mpl.is_interactive())
    return bool(show)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None, **kwargs: Any) -> Path:
    """Write a figure atomically: to a temporary file in the target folder, then renamed over ``path``.

    An existing file at ``path`` is left untouched when writing fails.

    Parameters
    ----------
    fig
        The figure.
    path
        Target file; its extension picks the format (``.png``, ``.pdf``, ``.svg``, ...).
    dpi
        Resolution; matplotlib's default when ``None``.
    **kwargs
        Passed to :meth:`matplotlib.figure.Figure.savefig`.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"Cannot save a figure to {str(path)!r}: the extension {path.suffix!r} is not a known image format. "
            f"Use one of: {', '.join('.' + k for k in sorted(supported))}."
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot save a figure to {str(path)!r}: the folder {str(folder)!r} does not exist.")
    resolution = dpi if dpi is not None else "figure"
    return atomic_write(
        path,
        lambda tmp: fig.savefig(tmp, format=fmt, dpi=resolution, bbox_inches="tight", **kwargs),
        suffix=f".tmp.{fmt}",
    )


def _finish(fig: Figure, ax: Axes | None, save: str | os.PathLike | None, show: bool, dpi: float | None):
    """Save and show; return the axes passed by the caller, else the figure."""
    if save is not None:
        save_figure(fig, save, dpi=dpi)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax if ax is not None else fig


def _available(keys) -> str:
    keys = [str(k) for k in keys]
    if not keys:
        return "none"
    shown = ", ".join(repr(k) for k in keys[:30])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 30 else "")


def _check_obs_key(adata: AnnData, key: str) -> pd.Series:
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
    if key not in adata.obs.columns:
        raise KeyError(
            f"Column {key!r} is not in adata.obs. Available columns: {_available(adata.obs.columns)}. "
            "Store the results first (e.g. `rmge.tl.add_results(model, adata)` writes 'rmge_prediction' and "
            "'rmge_confidence') or pass `key=`."
        )
    return adata.obs[key]


def _coordinates(adata: AnnData, basis: str) -> np.ndarray:
    name = basis
    if name not in adata.obsm and f"X_{basis}" in adata.obsm:
        name = f"X_{basis}"
    if name not in adata.obsm:
        raise KeyError(
            f"Coordinates {basis!r} are not in adata.obsm. Available entries: {_available(adata.obsm.keys())}. "
            "Pass `basis=` naming an obsm entry with 2-D coordinates."
        )
    xy = np.asarray(adata.obsm[name])
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm[{name!r}] must hold at least 2 columns of coordinates, got shape {xy.shape}.")
    return xy[:, :2].astype(np.float64)


def _point_size(n: int, size: float | None) -> float:
    if size is not None:
        return float(size)
    return float(np.clip(120_000 / max(n, 1), 0.5, 40.0))  # scanpy's default, bounded


def _style_spatial_axes(ax: Axes, basis: str, xy: np.ndarray, invert_yaxis: bool | None) -> None:
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    label = basis.removeprefix("X_")
    ax.set_xlabel(f"{label}1")
    ax.set_ylabel(f"{label}2")
    if invert_yaxis is None:
        invert_yaxis = basis == "spatial"  # image convention: y grows downwards
    if invert_yaxis and not ax.yaxis_inverted():
        ax.invert_yaxis()


def _default_palette(n: int) -> list[str]:
    """Distinct colours: tab10 / tab20 for up to 20 categories, tab20 + tab20b + tab20c for up to 60, then hsv."""
    cmaps = mpl.colormaps
    if n <= 10:
        colors = [cmaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colors = [cmaps["tab20"](i) for i in range(n)]
    elif n <= 60:
        colors = [cmaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)][:n]
    else:
        colors = [cmaps["hsv"](i / n) for i in range(n)]
    return [mpl.colors.to_hex(c) for c in colors]


def _category_colors(
    adata: AnnData, key: str, categories: list[str], all_categories: list[str], palette
) -> dict[str, str]:
    """Colour of each category: ``palette`` if given, else ``uns[f'{key}_colors']``, else a default palette.

    ``all_categories`` is the full ordered list colours are indexed by (the column's categories).
    """
    if palette is not None:
        if isinstance(palette, Mapping):
            missing = [c for c in categories if c not in palette]
            if missing:
                raise ValueError(f"palette has no colour for categories {missing}; add them to the dict.")
            return {c: mpl.colors.to_hex(palette[c]) for c in categories}
        if isinstance(palette, str):
            cmap = mpl.colormaps[palette]
            n = len(all_categories)
            listed = getattr(cmap, "colors", None)
            if listed is not None and len(listed) >= n:
                colors = [mpl.colors.to_hex(listed[i]) for i in range(n)]
            else:
                colors = [mpl.colors.to_hex(cmap(i / max(n - 1, 1))) for i in range(n)]
        else:
            colors = [mpl.colors.to_hex(c) for c in palette]
            if len(colors) < len(all_categories):
                raise ValueError(f"palette has {len(colors)} colours for {len(all_categories)} categories.")
        return dict(zip(all_categories, colors, strict=False))
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(all_categories):
        return {c: mpl.colors.to_hex(stored[i]) for i, c in enumerate(all_categories)}
    return dict(zip(all_categories, _default_palette(len(all_categories)), strict=True))


# --------------------------------------------------------------------------------------------
# Spatial maps
# --------------------------------------------------------------------------------------------
def spatial_labels(
    adata: AnnData,
    key: str = "rmge_prediction",
    basis: str = "spatial",
    *,
    groups: Sequence[str] | str | None = None,
    palette: Mapping[str, Any] | Sequence[Any] | str | None = None,
    size: float | None = None,
    na_color: str = "#d3d3d3",
    legend: bool = True,
    legend_fontsize: float = 8.0,
    title: str | None = None,
    invert_yaxis: bool | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (6.5, 5.0),
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    dpi: float | None = 150,
) -> Figure | Axes:
    """Scatter plot of cells in space coloured by a categorical column (e.g. transferred labels).

    Parameters
    ----------
    adata
        Cells with coordinates in ``obsm[basis]`` and labels in ``obs[key]``.
    key
        Categorical (or string) column of ``adata.obs``; by default the predictions
        :func:`rmge.tl.add_results` writes.
    basis
        Entry of ``adata.obsm`` holding the coordinates (``"umap"`` also finds ``"X_umap"``).
    groups
        Categories to highlight; the other cells are drawn in ``na_color``.
    palette
        Colours: a dict category → colour, a list (in category order) or a matplotlib colormap
        name. By default ``adata.uns[f"{key}_colors"]`` when present (scanpy's convention), else a
        tab10/tab20 palette. Missing values and ``"Unknown"`` are always drawn in ``na_color``.
    size
        Marker size; by default it shrinks with the number of cells.
    na_color
        Colour of missing values, ``"Unknown"`` and cells outside ``groups``.
    legend
        Draw a legend to the right of the plot.
    legend_fontsize
        Font size of the legend.
    title
        Title; defaults to ``key``.
    invert_yaxis
        Let y grow downwards (image convention). ``None``: only for ``basis="spatial"``.
    ax
        Axes to draw into; a new figure is made when ``None``.
    figsize
        Size of a new figure.
    save
        Write the figure to this path (atomically; the extension picks the format).
    show
        Show the figure with pyplot. ``None``: only in interactive mode.
    dpi
        Resolution of the saved file.

    Returns
    -------
    The figure, or ``ax`` when it was given.
    """
    values = _check_obs_key(adata, key)
    xy = _coordinates(adata, basis)
    show = _resolve_show(show)

    if isinstance(values.dtype, pd.CategoricalDtype):
        all_categories = [str(c) for c in values.cat.categories]
    else:
        all_categories = sorted({str(v) for v in values.dropna().unique()})
    missing = values.isna().to_numpy(copy=True)  # writable: pandas 3 returns read-only views
    labels = values.astype(object).where(~missing, _NA_LABEL).astype(str).to_numpy()
    if _NA_LABEL in all_categories:
        missing |= labels == _NA_LABEL
    unknown = labels == UNKNOWN_LABEL
    categories = [c for c in all_categories if c not in (UNKNOWN_LABEL, _NA_LABEL)]
    present = set(labels[~(missing | unknown)])
    shown = [c for c in categories if c in present]

    if groups is not None:
        groups = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        bad = [g for g in groups if g not in categories]
        if bad:
            raise ValueError(
                f"groups {bad} are not categories of adata.obs[{key!r}]. Available: {_available(categories)}."
            )
        highlighted = np.isin(labels, groups)
        shown = [c for c in shown if c in groups]
    else:
        highlighted = ~(missing | unknown)

    colors = _category_colors(adata, key, shown, [c for c in all_categories if c not in (_NA_LABEL,)], palette)
    # Colours through category codes: one RGBA row per category, then a gather (fast for millions of cells).
    table_names = list(colors)
    table = mpl.colors.to_rgba_array([colors[c] for c in table_names] + [na_color])
    codes = pd.Categorical(labels, categories=table_names).codes.copy()
    codes[(codes < 0) | ~highlighted] = len(table_names)
    point_colors = table[codes]

    if ax is None:
        fig, axes = _new_figure(figsize, show)
        target = axes[0, 0]
    else:
        fig, target = ax.figure, ax
    s = _point_size(len(labels), size)
    background = ~highlighted
    # Grey cells first so the highlighted ones are drawn on top.
    if background.any():
        target.scatter(xy[background, 0], xy[background, 1], c=na_color, s=s, linewidths=0, rasterized=len(xy) > 20_000)
    if highlighted.any():
        target.scatter(
            xy[highlighted, 0],
            xy[highlighted, 1],
            c=point_colors[highlighted],
            s=s,
            linewidths=0,
            rasterized=len(xy) > 20_000,
        )
    _style_spatial_axes(target, basis, xy, invert_yaxis)
    target.set_title(key if title is None else title)

    if legend:
        entries = [(c, colors[c]) for c in shown]
        if groups is not None:
            if (~highlighted).any():
                entries.append(("other", na_color))
        else:
            if unknown.any():
                entries.append((UNKNOWN_LABEL, na_color))
            if missing.any():
                entries.append((_NA_LABEL, na_color))
        handles = [
            Line2D([], [], marker="o", linestyle="", markerfacecolor=col, markeredgewidth=0, markersize=7)
            for _, col in entries
        ]
        if handles:
            target.legend(
                handles,
                [name for name, _ in entries],
                loc="center left",
                bbox_to_anchor=(1.01, 0.5),
                frameon=False,
                fontsize=legend_fontsize,
                ncol=1 if len(handles) <= 16 else math.ceil(len(handles) / 16),
            )
    return _finish(fig, ax, save, show, dpi)


def spatial_confidence(
    adata: AnnData,
    key: str = "rmge_confidence",
    basis: str = "spatial",
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    size: float | None = None,
    na_color: str = "#d3d3d3",
    colorbar_label: str | None = None,
    title: str | None = None,
    invert_yaxis: bool | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (6.0, 5.0),
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    dpi: float | None = 150,
) -> Figure | Axes:
    """Scatter plot of cells in space coloured by a numeric column (e.g. label confidence), with a colour bar.

    Parameters
    ----------
    adata
        Cells with coordinates in ``obsm[basis]`` and values in ``obs[key]``.
    key
        Numeric column of ``adata.obs``; by default the confidence :func:`rmge.tl.add_results` writes.
    basis
        Entry of ``adata.obsm`` holding the coordinates.
    cmap
        Matplotlib colormap.
    vmin, vmax
        Limits of the colour scale; the data range by default.
    size
        Marker size; by default it shrinks with the number of cells.
    na_color
        Colour of missing values.
    colorbar_label
        Label of the colour bar; defaults to ``key``.
    title
        Title; defaults to ``key``.
    invert_yaxis
        Let y grow downwards (image convention). ``None``: only for ``basis="spatial"``.
    ax
        Axes to draw into; a new figure is made when ``None``.
    figsize
        Size of a new figure.
    save
        Write the figure to this path (atomically; the extension picks the format).
    show
        Show the figure with pyplot. ``None``: only in interactive mode.
    dpi
        Resolution of the saved file.

    Returns
    -------
    The figure, or ``ax`` when it was given.
    """
    values = _check_obs_key(adata, key)
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise TypeError(
            f"adata.obs[{key!r}] must be numeric, got dtype {values.dtype}. "
            "Use `rmge.pl.spatial_labels` for categorical columns."
        )
    xy = _coordinates(adata, basis)
    show = _resolve_show(show)
    v = values.to_numpy(dtype=np.float64)
    ok = np.isfinite(v)

    if ax is None:
        fig, axes = _new_figure(figsize, show)
        target = axes[0, 0]
    else:
        fig, target = ax.figure, ax
    s = _point_size(len(v), size)
    if (~ok).any():
        target.scatter(xy[~ok, 0], xy[~ok, 1], c=na_color, s=s, linewidths=0)
    finite = v[ok]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-9
    mappable = target.scatter(
        xy[ok, 0], xy[ok, 1], c=finite, cmap=cmap, vmin=lo, vmax=hi, s=s, linewidths=0, rasterized=len(v) > 20_000
    )
    _style_spatial_axes(target, basis, xy, invert_yaxis)
    target.set_title(key if title is None else title)
    cbar = fig.colorbar(mappable, ax=target, fraction=0.046, pad=0.02)
    cbar.set_label(key if colorbar_label is None else colorbar_label)
    return _finish(fig, ax, save, show, dpi)


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------
def _labels_in_order(values) -> list[str]:
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        present = set(pd.Series(values).dropna().astype(str))
        return [str(c) for c in values.cat.categories if str(c) in present]
    return sorted(set(pd.Series(values).dropna().astype(str)))


def confusion_matrix(
    data: AnnData | tuple[Sequence, Sequence],
    truth_key: str = "cell_type",
    pred_key: str = "rmge_prediction",
    *,
    normalize: str | None = "true",
    labels: Sequence[str] | None = None,
    annotate: bool | None = None,
    cmap: str = "Blues",
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    dpi: float | None = 150,
) -> Figure | Axes:
    """Heatmap of true against predicted labels, with accuracy and macro-F1 in the title.

    Cells whose true label is missing are left out. Labels predicted but absent from the truth
    (e.g. ``"Unknown"``) get their own columns. Macro-F1 averages the F1 scores of the true classes
    (:func:`sklearn.metrics.f1_score` with ``labels`` = the true classes).

    Parameters
    ----------
    data
        An AnnData holding both columns, or a pair ``(y_true, y_pred)``.
    truth_key
        Column of ``adata.obs`` with the true labels (ignored for a pair).
    pred_key
        Column of ``adata.obs`` with the predicted labels (ignored for a pair); by default the
        predictions :func:`rmge.tl.add_results` writes.
    normalize
        ``"true"`` (rows sum to 1, the default), ``"pred"`` (columns sum to 1), ``"all"`` or
        ``None`` (counts); as in :func:`sklearn.metrics.confusion_matrix`.
    labels
        Order of the labels on both axes; by default the true labels (category order when the
        column is categorical) followed by the labels only predicted.
    annotate
        Write each value in its cell; by default when there are at most 25 labels.
    cmap
        Matplotlib colormap.
    title
        Title; defaults to the accuracy and macro-F1.
    ax
        Axes to draw into; a new figure is made when ``None``.
    figsize
        Size of a new figure; grows with the number of labels by default.
    save
        Write the figure to this path (atomically; the extension picks the format).
    show
        Show the figure with pyplot. ``None``: only in interactive mode.
    dpi
        Resolution of the saved file.

    Returns
    -------
    The figure, or ``ax`` when it was given.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    if normalize not in ("true", "pred", "all", None):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}.")
    if isinstance(data, AnnData):
        y_true = _check_obs_key(data, truth_key)
        y_pred = _check_obs_key(data, pred_key)
    elif isinstance(data, tuple | list) and len(data) == 2:
        y_true, y_pred = (pd.Series(np.asarray(d, dtype=object)) if not isinstance(d, pd.Series) else d for d in data)
        if len(y_true) != len(y_pred):
            raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} and {len(y_pred)}.")
    else:
        raise TypeError(f"data must be an AnnData or a pair (y_true, y_pred), got {type(data).__name__}.")
    y_true = y_true.reset_index(drop=True)
    y_pred = y_pred.reset_index(drop=True)

    keep = ~y_true.isna().to_numpy()
    if not keep.any():
        raise ValueError("No cell has a true label (all values are missing).")
    true_order = _labels_in_order(y_true[keep])
    t = y_true[keep].astype(str).to_numpy()
    p = y_pred[keep].astype(object).where(~y_pred[keep].isna(), _NA_LABEL).astype(str).to_numpy()
    if labels is None:
        pred_only = [c for c in _labels_in_order(y_pred[keep]) if c not in true_order]
        if (p == _NA_LABEL).any() and _NA_LABEL not in pred_only + true_order:
            pred_only.append(_NA_LABEL)
        labels = true_order + pred_only
    else:
        labels = [str(c) for c in labels]
        absent = sorted(set(t) - set(labels))
        if absent:
            raise ValueError(f"labels miss true labels {absent}; list every true class.")
    cm = sk_confusion_matrix(t, p, labels=labels, normalize=normalize)
    cm = np.nan_to_num(cm)
    # Rows only for labels that occur in the truth (labels only predicted would give empty rows).
    row_labels = [c for c in labels if c in set(t)]
    cm = cm[[labels.index(c) for c in row_labels]]
    accuracy = accuracy_score(t, p)
    macro_f1 = f1_score(t, p, labels=[c for c in labels if c in set(t)], average="macro", zero_division=0)

    show = _resolve_show(show)
    n, n_rows = len(labels), len(row_labels)
    if ax is None:
        width = float(np.clip(0.45 * n + 3.5, 5.0, 17.0))
        height = float(np.clip(0.45 * n_rows + 2.5, 4.0, 16.0))
        fig, axes = _new_figure(figsize or (width, height), show)
        target = axes[0, 0]
    else:
        fig, target = ax.figure, ax
    vmax = 1.0 if normalize is not None else max(float(cm.max()), 1.0)
    image = target.imshow(cm, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    target.set_xticks(range(n), labels, rotation=90)
    target.set_yticks(range(n_rows), row_labels)
    target.set_xlabel(f"predicted ({pred_key})" if isinstance(data, AnnData) else "predicted")
    target.set_ylabel(f"true ({truth_key})" if isinstance(data, AnnData) else "true")
    if annotate is None:
        annotate = n <= 25
    if annotate:
        fontsize = float(np.clip(11 - 0.25 * n, 5, 10))
        for i in range(n_rows):
            for j in range(n):
                value = cm[i, j]
                text = f"{value:.2f}" if normalize is not None else f"{int(round(value))}"
                color = "white" if value > 0.5 * vmax else "black"
                target.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    fig.colorbar(image, ax=target, fraction=0.046, pad=0.02)
    target.set_title(title if title is not None else f"accuracy {accuracy:.3f} · macro-F1 {macro_f1:.3f}")
    return _finish(fig, ax, save, show, dpi)


# --------------------------------------------------------------------------------------------
# Metagenes
# --------------------------------------------------------------------------------------------
def metagenes(
    metagenes_df: pd.DataFrame,
    n_top: int = 5,
    *,
    classes: Sequence[str] | None = None,
    standard_scale: str | None = None,
    cmap: str | None = None,
    title: str | None = "Top metagene weights",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    dpi: float | None = 150,
) -> Figure | Axes:
    """Heatmap of the genes with the largest weights in each cell type's metagene.

    For each class (column of ``metagenes_df``) the ``n_top`` genes with the largest weights are
    taken, in class order (a gene is shown once, under the first class that picks it). Rows are
    classes, columns the genes; each class's own genes are framed.

    Parameters
    ----------
    metagenes_df
        Genes × classes weights, as returned by ``model.get_metagenes()``.
    n_top
        Genes shown per class.
    classes
        Classes to show, in this order; all columns by default.
    standard_scale
        ``"class"`` divides each class's weights by their largest absolute value, so that classes with
        weights of different magnitude can be compared; ``None`` shows the weights as they are.
    cmap
        Colormap; a diverging map centred on 0 when weights take both signs, else ``"viridis"``.
    title
        Title.
    ax
        Axes to draw into; a new figure is made when ``None``.
    figsize
        Size of a new figure; grows with the number of genes by default.
    save
        Write the figure to this path (atomically; the extension picks the format).
    show
        Show the figure with pyplot. ``None``: only in interactive mode.
    dpi
        Resolution of the saved file.

    Returns
    -------
    The figure, or ``ax`` when it was given.
    """
    if not isinstance(metagenes_df, pd.DataFrame):
        raise TypeError(
            f"metagenes_df must be a pandas DataFrame (genes × classes), got {type(metagenes_df).__name__}; "
            "use `model.get_metagenes()`."
        )
    if metagenes_df.shape[0] == 0 or metagenes_df.shape[1] == 0:
        raise ValueError(f"metagenes_df is empty (shape {metagenes_df.shape}); it needs genes as rows and classes.")
    if int(n_top) != n_top or n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}.")
    if standard_scale not in (None, "class"):
        raise ValueError(f"standard_scale must be None or 'class', got {standard_scale!r}.")
    non_numeric = [c for c in metagenes_df.columns if not pd.api.types.is_numeric_dtype(metagenes_df[c])]
    if non_numeric:
        raise TypeError(f"metagenes_df columns {non_numeric} are not numeric.")
    columns = [str(c) for c in metagenes_df.columns]
    df = metagenes_df.copy()
    df.columns = columns
    if classes is None:
        classes = columns
    else:
        classes = [str(c) for c in classes]
        bad = [c for c in classes if c not in columns]
        if bad:
            raise KeyError(f"Classes {bad} are not columns of metagenes_df. Available: {_available(columns)}.")

    genes: list[str] = []
    owner: list[int] = []
    for k, c in enumerate(classes):
        for g in df[c].sort_values(ascending=False, kind="stable").index[: int(n_top)]:
            if str(g) not in genes:
                genes.append(str(g))
                owner.append(k)
    df.index = df.index.astype(str)
    values = df.loc[genes, classes].to_numpy(dtype=np.float64).T  # classes × genes
    if standard_scale == "class":
        scale = np.abs(df[classes].to_numpy(dtype=np.float64)).max(axis=0)
        values = values / np.where(scale > 0, scale, 1.0)[:, None]

    show = _resolve_show(show)
    if ax is None:
        width = float(np.clip(0.28 * len(genes) + 2.5, 5.0, 30.0))
        height = float(np.clip(0.35 * len(classes) + 1.8, 3.0, 16.0))
        fig, axes = _new_figure(figsize or (width, height), show)
        target = axes[0, 0]
    else:
        fig, target = ax.figure, ax
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < 0 < hi:
        bound = max(abs(lo), abs(hi))
        lo, hi = -bound, bound
        cmap = cmap or "RdBu_r"
    else:
        cmap = cmap or "viridis"
    if hi <= lo:
        hi = lo + 1e-9
    image = target.imshow(values, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    target.set_xticks(range(len(genes)), genes, rotation=90, fontsize=8)
    target.set_yticks(range(len(classes)), classes)
    target.set_xlabel("gene")
    target.set_ylabel("cell type")
    from matplotlib.patches import Rectangle

    owner_arr = np.asarray(owner)
    for k in range(len(classes)):
        cols = np.flatnonzero(owner_arr == k)
        if cols.size:
            target.add_patch(
                Rectangle((cols[0] - 0.5, k - 0.5), cols.size, 1.0, fill=False, edgecolor="black", linewidth=1.2)
            )
    cbar = fig.colorbar(image, ax=target, fraction=0.046, pad=0.02)
    cbar.set_label("weight (scaled per class)" if standard_scale == "class" else "weight")
    if title:
        target.set_title(title)
    return _finish(fig, ax, save, show, dpi)


# --------------------------------------------------------------------------------------------
# Training history
# --------------------------------------------------------------------------------------------
_SPLIT_TOKENS = {"train", "training", "validation", "val", "valid", "test", "epoch", "step"}


def _history_group(key: str) -> str:
    """Quantity a logged key measures, without split or aggregation words (``train_loss_epoch`` → ``loss``)."""
    tokens = [t for t in key.split("_") if t and t.lower() not in _SPLIT_TOKENS]
    return "_".join(tokens) if tokens else key


def _history_series(name: str, value) -> pd.Series:
    if isinstance(value, pd.Series):
        series = value
    elif isinstance(value, pd.DataFrame):
        if value.shape[1] == 0:
            return pd.Series(dtype=np.float64)
        series = value[name] if name in value.columns else value.iloc[:, 0]
    else:
        series = pd.Series(np.asarray(value, dtype=np.float64).ravel())
    return pd.to_numeric(series, errors="coerce").dropna()


def history(
    history_dict: Mapping[str, pd.DataFrame] | Any,
    keys: Sequence[str] | None = None,
    *,
    logy: bool = False,
    ncols: int = 3,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    dpi: float | None = 150,
) -> Figure:
    """Training curves: one line per logged quantity, train and validation of a quantity in one panel.

    Keys are grouped by the quantity they measure, ignoring the words ``train``, ``validation``,
    ``val``, ``epoch`` and ``step``: ``train_loss_epoch`` and ``validation_loss`` share the panel
    ``loss``; ``elbo_train`` and ``elbo_validation`` share ``elbo``.

    Parameters
    ----------
    history_dict
        ``model.history`` (a dict of DataFrames indexed by epoch, one column named like the key,
        as in scvi-tools), or a trained model with a ``history`` attribute.
    keys
        Keys to draw; by default every key with numeric values.
    logy
        Logarithmic y axis (only for panels whose values are all positive).
    ncols
        Panels per row.
    figsize
        Size of the figure; grows with the number of panels by default.
    save
        Write the figure to this path (atomically; the extension picks the format).
    show
        Show the figure with pyplot. ``None``: only in interactive mode.
    dpi
        Resolution of the saved file.

    Returns
    -------
    The figure.
    """
    if not isinstance(history_dict, Mapping) and hasattr(history_dict, "history"):
        history_dict = history_dict.history
    if not isinstance(history_dict, Mapping):
        raise TypeError(
            f"history_dict must be a dict of DataFrames (e.g. `model.history`), got {type(history_dict).__name__}."
        )
    if len(history_dict) == 0:
        raise ValueError("The history is empty: train the model first (`model.train()`).")
    if keys is None:
        series = {str(k): _history_series(str(k), v) for k, v in history_dict.items()}
        series = {k: s for k, s in series.items() if len(s)}
        if not series:
            raise ValueError(f"No key of the history holds numeric values. Keys: {_available(history_dict.keys())}.")
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in history_dict]
        if missing:
            raise KeyError(f"Keys {missing} are not in the history. Available keys: {_available(history_dict.keys())}.")
        series = {str(k): _history_series(str(k), history_dict[k]) for k in keys}
        empty = [k for k, s in series.items() if not len(s)]
        if empty:
            raise ValueError(f"History keys {empty} hold no numeric values.")

    groups: dict[str, list[str]] = {}
    for k in series:
        groups.setdefault(_history_group(k), []).append(k)

    show = _resolve_show(show)
    n_panels = len(groups)
    ncols = max(1, min(int(ncols), n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig, axes = _new_figure(figsize or (4.0 * ncols, 3.0 * nrows), show, nrows=nrows, ncols=ncols)
    flat = axes.ravel()
    for panel, (group, members) in zip(flat, groups.items(), strict=False):
        for k in members:
            s = series[k]
            x = s.index.to_numpy()
            panel.plot(x, s.to_numpy(), marker="." if len(s) <= 1 else None, label=k)
        if logy and all((series[k] > 0).all() for k in members):
            panel.set_yscale("log")
        panel.set_title(group)
        panel.set_xlabel("epoch")
        panel.legend(fontsize=7, frameon=False)
    for panel in flat[n_panels:]:
        panel.set_visible(False)
    fig.tight_layout()
    return _finish(fig, None, save, show, dpi)
