"""Write an RMGE model's predictions and latent space into an AnnData under the keys scanpy and squidpy read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from anndata import AnnData

from rmge._constants import UNKNOWN_LABEL

if TYPE_CHECKING:  # pragma: no cover
    from rmge.model import RMGEModel

#: Colour of the ``"Unknown"`` category (a mid grey; scanpy draws missing values in light grey).
UNKNOWN_COLOR = "#7f7f7f"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover - source tree without installation
        return "unknown"


def _is_grey(color: str) -> bool:
    r, g, b = mcolors.to_rgb(color)
    return max(r, g, b) - min(r, g, b) < 0.02


def _default_class_colors(n: int) -> list[str]:
    """Scanpy's default categorical palettes (20, 28 or 102 colours), greys left out so "Unknown" stands apart."""
    from scanpy.plotting import palettes

    colors: list[str] = []
    for palette in (palettes.default_20, palettes.default_28, palettes.default_102):
        colors = [mcolors.to_hex(c) for c in palette if not _is_grey(c)]
        if len(colors) >= n:
            return colors[:n]
    return [colors[i % len(colors)] for i in range(n)]


def _stored_label_colors(adata: AnnData, labels_key: str | None, classes: Sequence[str]) -> list[str] | None:
    """The colours ``adata.uns[f'{labels_key}_colors']`` gives the reference types, in the order of ``classes``."""
    if labels_key is None or labels_key not in adata.obs:
        return None
    colors = adata.uns.get(f"{labels_key}_colors")
    labels = adata.obs[labels_key]
    if colors is None or not isinstance(labels.dtype, pd.CategoricalDtype):
        return None
    categories = [str(c) for c in labels.cat.categories]
    if len(colors) < len(categories):
        return None
    lookup = dict(zip(categories, colors, strict=False))
    if not all(c in lookup for c in classes):
        return None
    return [mcolors.to_hex(lookup[c]) for c in classes]


def _class_colors(
    adata: AnnData, labels_key: str | None, classes: Sequence[str], palette: Mapping | Sequence | None
) -> list[str]:
    if palette is not None:
        if isinstance(palette, Mapping):
            missing = [c for c in classes if c not in palette]
            if missing:
                raise ValueError(f"`palette` has no colour for the classes {missing}; add them to the mapping.")
            return [mcolors.to_hex(palette[c]) for c in classes]
        if isinstance(palette, str):
            raise TypeError("`palette` must be a mapping class -> colour or a list of colours, not a string.")
        colors = [mcolors.to_hex(c) for c in palette]
        if len(colors) < len(classes):
            raise ValueError(f"`palette` has {len(colors)} colours for {len(classes)} classes.")
        return colors[: len(classes)]
    stored = _stored_label_colors(adata, labels_key, classes)
    return stored if stored is not None else _default_class_colors(len(classes))


def add_results(
    model: RMGEModel,
    adata: AnnData | None = None,
    *,
    unknown_threshold: float | None = None,
    novelty_threshold: float | None = None,
    include_reference: bool = False,
    key_added: str = "rmge",
    palette: Mapping[str, str] | Sequence[str] | None = None,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write a trained model's predictions, probabilities and latent space into ``adata``.

    The keys follow scanpy's conventions, so the results plot and cluster directly, e.g.
    ``sc.pl.embedding(adata, basis="spatial", color="rmge_prediction")``,
    ``sq.pl.spatial_scatter(adata, color="rmge_prediction", shape=None)`` or
    ``sc.pp.neighbors(adata, use_rep="X_rmge")``. With the default ``key_added="rmge"`` it writes:

    - ``obs['rmge_prediction']``: predicted type (:meth:`RMGEModel.predict <rmge.RMGEModel.predict>`),
      categorical; categories: the model's classes in its order, followed by ``"Unknown"`` when
      ``unknown_threshold`` or ``novelty_threshold`` is given (even if no cell is labelled so);
    - ``obs['rmge_confidence']``: the largest calibrated probability of each cell;
    - ``obsm['rmge_probabilities']``: DataFrame cells × classes of calibrated probabilities, rows
      summing to 1 (columns in the model's class order, also stored in ``uns['rmge']['classes']``);
    - ``obsm['X_rmge']``: the metagene activities (:meth:`RMGEModel.get_latent_representation`) of
      **every** cell, reference cells included, so that neighbours and UMAPs show both domains;
    - ``uns['rmge_prediction_colors']``: one colour per category (scanpy's convention), taken from
      ``palette``, else from ``uns[f'{labels_key}_colors']`` when ``adata`` has the reference's
      colours, else scanpy's default palette without greys; ``"Unknown"`` is mid grey (``#7f7f7f``);
    - ``uns['rmge']``: the settings, added to what :func:`rmge.pp.prepare` keeps there: ``classes``,
      ``unknown_threshold`` and ``novelty_threshold`` (each absent when ``None``), ``cells``
      (``"spatial"`` or ``"all"``), ``calibration_temperature`` (spatial cells) and
      ``reference_calibration_temperature``, ``labels_key``, ``domain_key``, ``reference_domain``,
      ``rmge_version`` and ``scvi_tools_version``.

    Predictions, confidence and probabilities are written for the spatial cells (those whose
    ``obs[domain_key]`` is not the reference domain; all cells of an AnnData without that column);
    other cells get missing values unless ``include_reference=True``.

    Parameters
    ----------
    model
        A trained :class:`rmge.RMGEModel`.
    adata
        AnnData with the model's genes (same names and order); ``None`` uses the AnnData the model
        was set up with.
    unknown_threshold
        Cells whose largest calibrated probability is below this value are labelled ``"Unknown"``
        (as :meth:`RMGEModel.predict`); ``None`` labels every cell with its most probable type.
    novelty_threshold
        Cells whose novelty score is below ``-novelty_threshold`` (they fit their type that many robust
        standard deviations worse than its typical member) are labelled ``"Unknown"`` (as
        :meth:`RMGEModel.predict`); ``None`` skips the novelty score.
    include_reference
        Also write predictions, confidence and probabilities for the reference cells.
    key_added
        Prefix of the keys written (``obs[f'{key_added}_prediction']``, ``obsm[f'X_{key_added}']``...).
    palette
        Colours of the classes: a mapping class → colour or a list in the model's class order.
    batch_size
        Minibatch size of inference.
    copy
        Write into a copy of ``adata`` and return it.

    Returns
    -------
    The annotated copy when ``copy=True``, else ``None`` (``adata`` is annotated in place).

    Examples
    --------
    >>> rmge.tl.add_results(model, adata, unknown_threshold=0.5)
    >>> sc.pl.embedding(adata, basis="spatial", color="rmge_prediction")
    >>> sc.pp.neighbors(adata, use_rep="X_rmge")
    """
    from rmge.model import RMGEModel

    if not isinstance(model, RMGEModel):
        raise TypeError(f"`model` must be a trained rmge.RMGEModel, got {type(model).__name__}.")
    model._check_if_trained(warn=False)
    if unknown_threshold is not None and not 0 <= unknown_threshold <= 1:
        raise ValueError(f"`unknown_threshold` must be a probability in [0, 1], got {unknown_threshold}.")
    thresholds = {"unknown_threshold": unknown_threshold}
    if novelty_threshold is not None:
        thresholds["novelty_threshold"] = novelty_threshold
    with_unknown = unknown_threshold is not None or novelty_threshold is not None
    if not isinstance(key_added, str) or not key_added:
        raise ValueError("`key_added` must be a non-empty string.")
    own_adata = adata is None
    if own_adata:
        adata = model.adata
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if copy:
        adata = adata.copy()
        if own_adata:
            # the copy is a new AnnData for the model; it registers it like any other
            own_adata = False
    elif adata.is_view:
        raise ValueError(
            "`adata` is a view (a subset of another AnnData); results cannot be written into it. "
            "Pass `adata.copy()`, or `copy=True` to get an annotated copy back."
        )

    args = model.adata_manager.registry["setup_args"]
    labels_key, domain_key, reference_domain = args["labels_key"], args["domain_key"], args["reference_domain"]
    if domain_key in adata.obs:
        is_ref = (adata.obs[domain_key].astype(str) == str(reference_domain)).to_numpy()
    else:
        is_ref = np.zeros(adata.n_obs, dtype=bool)
    rows = np.arange(adata.n_obs) if include_reference else np.flatnonzero(~is_ref)

    target = None if own_adata else adata
    latent = np.asarray(model.get_latent_representation(target, batch_size=batch_size), dtype=np.float32)
    classes = [str(c) for c in model.classes_]
    n, k = adata.n_obs, len(classes)
    probs = np.full((n, k), np.nan, dtype=np.float32)
    codes = np.full(n, -1, dtype=np.int64)
    confidence = np.full(n, np.nan, dtype=np.float32)
    categories = classes + ([UNKNOWN_LABEL] if with_unknown else [])
    if len(rows):
        soft = model.predict(target, indices=rows, soft=True, batch_size=batch_size)
        values = soft.to_numpy(dtype=np.float32)
        probs[rows] = values
        confidence[rows] = values.max(axis=1)
        if with_unknown:
            labels = model.predict(target, indices=rows, batch_size=batch_size, **thresholds)
            codes[rows] = pd.Categorical(np.asarray(labels, dtype=object), categories=categories).codes
        else:
            codes[rows] = values.argmax(axis=1)

    colors = _class_colors(adata, labels_key, classes, palette)
    if with_unknown:
        colors = [*colors, UNKNOWN_COLOR]

    pred_key = f"{key_added}_prediction"
    adata.obs[pred_key] = pd.Categorical.from_codes(codes, categories=categories)
    adata.obs[f"{key_added}_confidence"] = confidence
    adata.obsm[f"{key_added}_probabilities"] = pd.DataFrame(probs, index=adata.obs_names.copy(), columns=classes)
    adata.obsm[f"X_{key_added}"] = latent
    adata.uns[f"{pred_key}_colors"] = colors

    info = dict(adata.uns.get(key_added, {})) if isinstance(adata.uns.get(key_added), Mapping) else {}
    info.pop("unknown_threshold", None)
    info.pop("novelty_threshold", None)
    temperatures = {
        name: float(getattr(model.module, name).detach().cpu())
        for name in ("calibration_temperature", "reference_calibration_temperature")
        if hasattr(model.module, name)
    }
    info.update(
        {
            "classes": classes,
            "cells": "all" if include_reference else "spatial",
            **temperatures,
            "labels_key": str(labels_key),
            "domain_key": str(domain_key),
            "reference_domain": str(reference_domain),
            "rmge_version": _package_version("rmge"),
            "scvi_tools_version": _package_version("scvi-tools"),
        }
    )
    for name, value in thresholds.items():
        if value is not None:
            info[name] = float(value)
    adata.uns[key_added] = info
    return adata if copy else None
