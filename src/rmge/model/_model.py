"""RMGEModel: the scvi-tools model class of the Robust MetaGene Extractor."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scipy.optimize import brentq
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model._utils import use_distributed_sampler
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from rmge._constants import COUNTS, LOG_NORMALIZED, REGISTRY_KEYS, UNKNOWN_LABEL
from rmge._validation import check_nonnegative_finite, csr_row_view, detect_value_kind

from ._kernels import library_proportions, log_norm_sums, sparse_logits
from ._module import MAX_Z, N_CLASS_QUANTILES, N_QUANTILES, TARGET_SUM, RMGEModule, cross_entropy_rows, unit_rows
from ._trainingplan import (
    HistoryLogger,
    MinibatchSource,
    RMGEDataSplitter,
    RMGETrainingPlan,
    WarmupValidationSchedule,
)

logger = logging.getLogger(__name__)

_UNLABELED = "__rmge_unlabeled__"
_DOMAIN_COL = "_rmge_domain"
_LABELS_COL = "_rmge_labels"
_GROUP_COL = "_rmge_group"
_QUERY = "query"
_REFERENCE = "reference"
_BLOCK = 20_000
#: Input dropout chosen by ``dropout_rate="auto"``: with sparsity matching (the reference cells are thinned
#: to the spatial depth, so dropout is regularisation alone) and without it (dropout also stands in for
#: the spatial data's missing counts, as in the original method).
DROPOUT_THINNED = 0.5
DROPOUT_UNTHINNED = 0.8
#: Median spatial depth (counts per cell) at which ``dropout_rate="auto"`` with sparsity matching is half
#: of ``DROPOUT_THINNED``.
DROPOUT_HALF_DEPTH = 10.0

#: Largest standard deviation of the log per-gene capture factors at which ``target_sum="auto"`` takes the
#: two sides for one platform and normalises to the median spatial depth (two halves of one scRNA-seq data
#: set: 0.09-0.21; the simulated Stereo-seq sections, capture sd 0.3: 0.43; gene activity -> RNA: 1.7).
SAME_CAPTURE_SD = 0.3
#: Clip of the standardised values under ``max_value="auto"`` where both sides hold counts (sparsity matching
#: on); without it, ``MAX_Z`` (10, as ``sc.pp.scale(max_value=10)``).
MAX_VALUE_COUNTS = 3.0

#: Pseudo-count (spatial counts of a gene) shrinking the per-gene capture factor towards 1.
_FACTOR_PSEUDOCOUNT = 10.0
_MIN_STD = 1e-2
#: With sparsity matching, the thinned reference statistics (means, standard deviations, the class centroids
#: the metagenes start from) average several thinning draws of every reference cell, as many as it takes to
#: make this many thinned cells (at most ``_MAX_STAT_DRAWS``): at a few counts per cell, one draw of a small
#: reference leaves a class centroid a few dozen counts.
_STAT_THINNED_CELLS = 50_000
_MAX_STAT_DRAWS = 64
#: Training steps of the default stopping point (``train(max_epochs=None)``).
_DEFAULT_STEPS = 6_000
#: Longest epoch (in steps) of the default stopping point; longer passes run on across epochs.
_MAX_DEFAULT_EPOCH_STEPS = 300
#: Minibatches of each validation in that regime (10,240 held-out reference cells at the default batch size).
_MAX_DEFAULT_VALIDATION_BATCHES = 40
#: Fewest training steps between two validations of the default stopping point during the warm-up of early
#: stopping: data of shorter passes validate every few epochs until early stopping watches. On small data a
#: validation (a Lightning evaluation loop and its logging) costs about as much as a training step; validating
#: a pass of 3 steps at every epoch spent a fifth of the training time on it.
_MIN_DEFAULT_VALIDATION_STEPS = 10
#: Fraction of ``max_epochs`` before early stopping watches the validation loss (with pseudo-labels).
_EARLY_STOPPING_WARMUP = 0.4


def _auto_dropout(sparsity_matching: bool, spatial_lib_quantiles: np.ndarray) -> float:
    """Input dropout of ``dropout_rate="auto"``.

    Without sparsity matching, the original's 0.8: dropout also stands in for the spatial data's missing
    counts. With it, the reference cells are already thinned to the spatial depth and dropout is
    regularisation alone, which a shallow cell cannot afford: ``0.5 * L / (L + 10)`` for a median spatial
    depth of ``L`` counts (0.48 at 300 counts, 0.37 at 30, 0.1 at 2.5).
    """
    if not sparsity_matching:
        return DROPOUT_UNTHINNED
    depth = float(np.median(spatial_lib_quantiles))  # zeros without spatial cells
    return round(DROPOUT_THINNED * depth / (depth + DROPOUT_HALF_DEPTH), 3)


def _auto_target_sum(sparsity_matching: bool, gene_factor: np.ndarray, spatial_lib: np.ndarray) -> float:
    """Total of ``normalize_total`` under ``target_sum="auto"``.

    ``log1p(x * T / L)`` of a cell of depth ``L`` is close to ``log`` where ``T`` is far above ``L`` (a count
    of 2 weighs little more than one) and close to linear where ``T`` is about ``L``. Where both sides hold
    counts of what looks like one platform (sparsity matching on, and the log per-gene capture factors
    spread by less than ``SAME_CAPTURE_SD``), count magnitudes carry over from the reference and ``T`` is
    the median spatial depth (scanpy's ``normalize_total`` default); elsewhere the strong compression of
    ``T = 10,000`` guards against magnitudes that differ between platforms or modalities.
    """
    if sparsity_matching and float(np.std(np.log(gene_factor))) < SAME_CAPTURE_SD:
        return _median_depth(spatial_lib)
    return TARGET_SUM


def _auto_max_value(sparsity_matching: bool) -> float:
    """Clip of the standardised values under ``max_value="auto"``.

    Where both sides hold counts (sparsity matching on) and cells are shallow, a gene detected (once) in a
    fraction ``q`` of the cells standardises to about ``sqrt((1 - q) / q)`` where it is seen: 10 or more
    below ``q = 1 %``, 3 at ``q = 10 %``. A cell of a few dozen counts then has most of its profile's norm,
    and of its correlation with each metagene, on its rarest genes, whether they mark its type or are
    noise. Clipped at ``MAX_VALUE_COUNTS`` (3), a count of a rare gene weighs at most about as much as one
    of a gene seen in a tenth of the cells. Without counts on both sides (log-normalised or
    continuous values) the usual 10.
    """
    return MAX_VALUE_COUNTS if sparsity_matching else MAX_Z


def _median_depth(spatial_lib: np.ndarray) -> float:
    """Total of ``target_sum="median"``: the median spatial depth (at least 1); 10,000 without spatial cells."""
    return max(float(np.median(spatial_lib)), 1.0) if len(spatial_lib) else TARGET_SUM


def _read_rows(X, r: np.ndarray):
    """Rows ``r`` of ``X`` (in memory or backed on disk), read as a slice where they are consecutive."""
    if len(r) and r[-1] - r[0] + 1 == len(r) and (len(r) == 1 or bool(np.all(np.diff(r) == 1))):
        a, b = int(r[0]), int(r[-1]) + 1
        if sp.issparse(X) and X.format == "csr":
            return csr_row_view(X, a, b)  # a view on the in-memory arrays, without copying the block
        return X[a:b]
    if isinstance(X, np.ndarray) or sp.issparse(X):
        return X[r]
    # on-disk matrices (anndata's sparse datasets, h5py) read increasing, unique indices
    uniq, inverse = np.unique(r, return_inverse=True)
    sub = X[uniq]
    return sub[inverse] if len(uniq) != len(r) or not np.array_equal(uniq, r) else sub


def _row_blocks(X, rows: np.ndarray, block: int = _BLOCK, dtype=np.float64):
    """Yield (row positions, CSR block) over ``rows`` of ``X`` without densifying ``X``.

    Works for in-memory (sparse or dense) and backed (``anndata.read_h5ad(..., backed="r")``) matrices;
    runs of consecutive rows are read as slices, which backed matrices read fastest. With a ``dtype``
    each block owns its arrays; with ``dtype=None`` a block of an in-memory CSR matrix is a read-only
    view on it (no copy).
    """
    rows = np.asarray(rows)
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        sub = _read_rows(X, r)
        if not sp.issparse(sub):
            sub = sp.csr_matrix(np.asarray(sub))
        if dtype is None and sub.format == "csr":
            yield r, sub  # may be a view on X: read it, never modify it
        else:
            # owned arrays (never shared with X), so that callers may modify the block in place
            sub = sp.csr_matrix(sub)
            data = sub.data.astype(dtype or sub.dtype)
            yield r, sp.csr_matrix((data, sub.indices.copy(), sub.indptr.copy()), shape=sub.shape)


def _stat_draws(n_reference: int) -> int:
    """Thinning draws of each reference cell for the thinned statistics (see ``_STAT_THINNED_CELLS``)."""
    return int(np.clip(np.ceil(_STAT_THINNED_CELLS / max(n_reference, 1)), 1, _MAX_STAT_DRAWS))


def _stat_block_rows(X, target_nnz: int = 4_000_000) -> int:
    """Rows per block for passes over ``X`` that keep about ``target_nnz`` non-zero entries per block."""
    n = max(X.shape[0], 1)
    nnz = getattr(X, "nnz", None)
    if nnz is None and hasattr(X, "group") and "indptr" in getattr(X, "group", {}):
        nnz = int(X.group["indptr"][-1])
    if nnz is None:
        nnz = n * X.shape[1]
    return int(np.clip(target_nnz * n / max(nnz, 1), 1_000, _BLOCK))


class RMGEModel(UnsupervisedTrainingMixin, BaseModelClass):
    """Robust MetaGene Extractor: label transfer from a reference to sparse spatial data.

    A linear encoder maps each cell's standardised log expression to one activity per reference
    cell type (row ``k`` of its weights is the *metagene* of type ``k``); a linear decoder
    reconstructs expression from the activities. Reference counts are thinned at every minibatch
    to the spatial depth and gene capture (*sparsity matching*); a discriminator on class
    probabilities drives the two domains together (*adversarial alignment*); priors on the
    spatial side (composition, entropy, confident pseudo-labels) adapt the classifier to the
    spatial data.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, holding reference and spatial cells.
    dropout_rate
        Input dropout of the metagene encoder. ``"auto"``: 0.8 (the original's value) without sparsity
        matching; with it, ``0.5 * L / (L + 10)`` for a median spatial depth of ``L`` counts per cell (the
        thinned reference cells already have the spatial depth, and 0.8 on top of it leaves a shallow cell
        almost no counts): 0.48 at 300 counts, 0.37 at 30, 0.1 at 2.5.
    standardize
        Standardise each gene within each domain (and section) before the encoder. Removes most of
        the platform shift between reference and spatial data.
    sparsity_matching
        ``"auto"`` (on when both domains hold integer counts), ``True`` or ``False``.
    prior
        Prior composition of the spatial cells for the KL term: ``"reference"`` (reference
        proportions), ``"uniform"``, a mapping class → proportion, or ``None`` (no KL term).
    classification_weight, reconstruction_weight, l2_weight, kl_weight
        Weights of the loss terms (see :class:`~rmge.RMGEModule`).
    adversarial_weight, entropy_weight, pseudo_label_weight
        Weights of the loss terms (see :class:`~rmge.RMGEModule`).
    entropy_on
        ``"spatial"`` or ``"reference"``: whose predictions the entropy term sharpens.
    reconstruct
        ``"both"`` or ``"reference"``: which cells the decoder reconstructs.
    adversarial_target
        ``"half"`` (both domains pushed to 0.5, as the original) or ``"flip"``.
    pseudo_label_fraction
        Fraction of each predicted class's spatial cells (most confident first) used as pseudo-labels.
    classifier
        ``"cosine"`` (correlation of the cell's standardised profile with each metagene, scaled) or
        ``"linear"`` (a linear layer with bias, as the original).
    init_metagenes
        ``"centroids"``: start each metagene at its type's mean standardised reference profile;
        ``"random"``: PyTorch's default initialisation (the original).
    class_weight
        ``"inverse"`` (1/count, as the original) or ``None`` (all classes equal).
    label_smoothing
        Label smoothing of the reference cross-entropy.
    lr, lr_discriminator, weight_decay
        Optimiser settings, used as defaults of :meth:`train`.
    count_evidence
        Add to the spatial cells' activities, at prediction, the likelihood of their counts under each
        type's reference expression profile (at the spatial gene capture), with the weight of at most
        a typical reference cell's depth, then recalibrate (:meth:`calibrate`). Sparse cells carry
        few counts, and how they fall on the genes is the evidence they have. It helps spatial data of
        single cells (segmented cells, or the sparsity benchmark) and hurts bins that mix several cells,
        whose counts no single type's profile explains (see the benchmarks page), hence off by default.
        ``"auto"``: on when both domains hold integer counts (sparsity matching on); ``True`` needs
        counts on both sides.
    target_sum
        Total each cell's counts are scaled to before ``log1p`` (``normalize_total``), for the standardised
        profiles the metagenes read: a number, ``"median"`` (the median spatial depth, scanpy's
        default) or ``"auto"``: the median spatial depth where sparsity matching is on and the per-gene
        capture factors of the two sides agree (standard deviation of their logs below
        ``SAME_CAPTURE_SD`` = 0.3, as for two samples of one platform), else 10,000. Near the cells'
        own depth ``log1p`` is almost linear and a count of 2 weighs about twice a count of 1, which
        helps where magnitudes carry over (sparsity series at full depth, macro-F1 0.819 / 0.815 →
        0.840 / 0.835 for seeds 0 / 1); across modalities they do not, and 10,000 compresses them
        (gene activity → PBMC with the median: 0.751 / 0.778 / 0.776 → 0.657 / 0.772 / 0.650).
    max_value
        Magnitude the standardised values are clipped to (``sc.pp.scale(max_value=...)``): a positive
        number, or ``"auto"``: ``MAX_VALUE_COUNTS`` (3) where sparsity matching is on (counts on both
        sides), else 10. With counts, a single count of a gene few cells detect standardises to 10 or
        more, and a sparse cell's rarest genes then dominate its correlation with the metagenes; clipped
        at 3, macro-F1 on the sparsity series at 20 % depth rose from 0.684 to 0.699 (mean of three
        seeds) and on gene activity → PBMC from 0.761 / 0.769 to 0.808 / 0.801 (seeds 0 / 1). Without
        counts on both sides (log-normalised MERFISH, ArchR gene activity) 3 cost accuracy (0.805 → 0.795
        and 0.757 → 0.653), hence 10 there.
    **module_kwargs
        Further keyword arguments of :class:`~rmge.RMGEModule`.

    Examples
    --------
    >>> adata = rmge.pp.prepare(reference, spatial, labels_key="cell_type")
    >>> rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type", domain_key="domain")
    >>> model = rmge.RMGEModel(adata)
    >>> model.train()
    >>> rmge.tl.add_results(model, adata)  # obs["rmge_prediction"], obs["rmge_confidence"], ...
    >>> original = rmge.RMGEModel(adata, **rmge.RMGEModel.ORIGINAL)
    """

    _module_cls = RMGEModule
    _data_splitter_cls = RMGEDataSplitter
    _training_plan_cls = RMGETrainingPlan
    _train_runner_cls = TrainRunner

    #: Settings of the original RMGE method (its loss weights, optimiser and preprocessing choices).
    #: Deviations: thinning is drawn afresh for every minibatch and training is minibatched.
    ORIGINAL: dict = {
        "dropout_rate": 0.8,
        "standardize": False,
        "class_weight": "inverse",
        "classification_weight": 1.0,
        "l2_weight": 0.01,
        "kl_weight": 1.0,
        "prior": "reference",
        "adversarial_weight": 0.1,
        "adversarial_target": "half",
        "reconstruction_weight": 1.0,
        "reconstruct": "reference",
        "entropy_weight": 1.0,
        "entropy_on": "reference",
        "pseudo_label_weight": 0.0,
        "label_smoothing": 0.0,
        "classifier": "linear",
        "init_metagenes": "random",
        "lr": 0.01,
        "lr_discriminator": 0.001,
        "count_evidence": False,
        "target_sum": TARGET_SUM,
        "max_value": MAX_Z,
    }

    def __init__(
        self,
        adata: AnnData,
        dropout_rate: float | Literal["auto"] = "auto",
        standardize: bool = True,
        sparsity_matching: bool | Literal["auto"] = "auto",
        prior: str | dict | None = None,
        classification_weight: float = 1.0,
        reconstruction_weight: float = 0.1,
        l2_weight: float = 0.0,
        kl_weight: float = 0.0,
        adversarial_weight: float = 0.1,
        entropy_weight: float = 0.1,
        pseudo_label_weight: float = 2.0,
        entropy_on: Literal["spatial", "reference"] = "spatial",
        reconstruct: Literal["both", "reference"] = "both",
        adversarial_target: Literal["half", "flip"] = "half",
        pseudo_label_fraction: float = 0.7,
        classifier: Literal["cosine", "linear"] = "cosine",
        init_metagenes: Literal["centroids", "random"] = "centroids",
        class_weight: Literal["inverse"] | None = "inverse",
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        lr_discriminator: float = 1e-3,
        weight_decay: float = 0.0,
        count_evidence: bool | Literal["auto"] = False,
        target_sum: float | Literal["auto", "median"] = "auto",
        max_value: float | Literal["auto"] = "auto",
        **module_kwargs,
    ):
        super().__init__(adata)
        #: Reference cell types, in the order of the model's outputs.
        self.classes_ = self._registered_classes()
        for name, value, allowed in (
            ("entropy_on", entropy_on, ("spatial", "reference")),
            ("reconstruct", reconstruct, ("both", "reference")),
            ("adversarial_target", adversarial_target, ("half", "flip")),
            ("class_weight", class_weight, ("inverse", None)),
            ("classifier", classifier, ("cosine", "linear")),
            ("init_metagenes", init_metagenes, ("centroids", "random")),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if not (dropout_rate == "auto" or (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate < 1)):
            raise ValueError(f"`dropout_rate` must be 'auto' or a number in [0, 1), got {dropout_rate!r}.")

        number = isinstance(target_sum, (int, float)) and not isinstance(target_sum, bool)
        if not (target_sum in ("auto", "median") or (number and np.isfinite(target_sum) and target_sum > 0)):
            raise ValueError(f"`target_sum` must be 'auto', 'median' or a positive number, got {target_sum!r}.")
        if count_evidence not in (True, False, "auto"):
            raise ValueError(f"`count_evidence` must be True, False or 'auto', got {count_evidence!r}.")
        number = isinstance(max_value, (int, float)) and not isinstance(max_value, bool)
        if not (max_value == "auto" or (number and np.isfinite(max_value) and max_value > 0)):
            raise ValueError(f"`max_value` must be 'auto' or a positive number, got {max_value!r}.")
        classes = self.classes_
        n_labels = len(classes)
        stats = self._compute_statistics(sparsity_matching, target_sum)
        if dropout_rate == "auto":
            dropout_rate = _auto_dropout(stats["sparsity_matching"], stats["spatial_lib_quantiles"])
        if max_value == "auto":
            max_value = _auto_max_value(stats["sparsity_matching"])
        both_counts = all(kind == COUNTS for kind in stats["value_kinds"].values())
        if count_evidence is True and not both_counts:
            raise ValueError(
                f"count_evidence=True needs integer counts in both domains (reference: "
                f"{stats['value_kinds']['reference']}, spatial: {stats['value_kinds']['spatial']}). "
                "Pass counts or use count_evidence='auto'/False."
            )
        use_counts = both_counts and stats["sparsity_matching"] if count_evidence == "auto" else bool(count_evidence)
        counts = stats["label_counts"].astype(np.float64)
        if class_weight == "inverse":
            w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
            w = w * counts.sum() / max((w * counts).sum(), 1e-12)
        else:
            w = np.ones(n_labels)
        prior_vec = self._prior_vector(prior, counts)

        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            n_groups=len(stats["group_is_reference"]),
            group_is_reference=torch.as_tensor(stats["group_is_reference"]),
            group_mean=torch.as_tensor(stats["group_mean"]),
            group_std=torch.as_tensor(stats["group_std"]),
            gene_factor=torch.as_tensor(stats["gene_factor"]),
            ref_lib_quantiles=torch.as_tensor(stats["ref_lib_quantiles"]),
            spatial_lib_quantiles=torch.as_tensor(stats["spatial_lib_quantiles"]),
            class_lib_quantiles=torch.as_tensor(stats["class_lib_quantiles"]),
            class_weights=torch.as_tensor(w),
            prior=None if prior_vec is None else torch.as_tensor(prior_vec),
            dropout_rate=dropout_rate,
            standardize=standardize,
            sparsity_matching=stats["sparsity_matching"],
            classification_weight=classification_weight,
            reconstruction_weight=reconstruction_weight,
            l2_weight=l2_weight,
            kl_weight=kl_weight,
            adversarial_weight=adversarial_weight,
            entropy_weight=entropy_weight,
            pseudo_label_weight=pseudo_label_weight,
            entropy_on=entropy_on,
            reconstruct=reconstruct,
            adversarial_target=adversarial_target,
            pseudo_label_fraction=pseudo_label_fraction,
            classifier=classifier,
            init_metagenes=torch.as_tensor(stats["centroids"]) if init_metagenes == "centroids" else None,
            centroids=torch.as_tensor(stats["centroids"]),
            label_smoothing=label_smoothing,
            count_evidence=use_counts,
            target_sum=stats["target_sum"],
            max_value=float(max_value),
            **module_kwargs,
        )
        self._plan_defaults = {"lr": lr, "lr_discriminator": lr_discriminator, "weight_decay": weight_decay}
        self._model_summary_string = (
            f"RMGE model: {self.summary_stats.n_vars} genes, {n_labels} cell types, "
            f"dropout {dropout_rate}, standardize={standardize}, target sum {stats['target_sum']:g}, "
            f"clip ±{float(max_value):g}, "
            f"sparsity matching={'on' if stats['sparsity_matching'] else 'off'}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ set-up
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        domain_key: str = "domain",
        reference_domain: str = "reference",
        layer: str | None = None,
        batch_key: str | None = None,
        **kwargs,
    ):
        """Register an AnnData holding reference and spatial cells.

        Parameters
        ----------
        adata
            One AnnData with reference and spatial (query) cells; counts (sparse or dense) in
            ``layer`` (or ``X``). :func:`rmge.pp.prepare` builds it from two AnnData objects.
        labels_key
            Column of ``adata.obs`` with the reference cell types (values of spatial cells are ignored).
        domain_key
            Column of ``adata.obs`` telling each cell's domain.
        reference_domain
            Value of ``domain_key`` marking reference cells; every other cell is a query cell.
        layer
            Layer holding counts; ``None`` uses ``adata.X``.
        batch_key
            Optional column with sections/batches; each (domain, section) pair is standardised on its own.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        transferring = kwargs.get("source_registry") is not None
        cls._add_internal_columns(adata, labels_key, domain_key, reference_domain, batch_key, strict=not transferring)
        X = adata.layers[layer] if layer is not None else adata.X
        if not transferring:
            cls._validate_values(adata, X, layer)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, _LABELS_COL, _UNLABELED),
            CategoricalObsField(REGISTRY_KEYS.DOMAIN_KEY, _DOMAIN_COL),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, _GROUP_COL),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @staticmethod
    def _add_internal_columns(adata, labels_key, domain_key, reference_domain, batch_key, strict: bool = True):
        """Write the internal label, domain and group columns, checking the user's columns."""
        obs = adata.obs
        if domain_key not in obs:
            if strict:
                raise ValueError(
                    f"Domain column {domain_key!r} not found in adata.obs (columns: {list(obs.columns)}). "
                    "Add a column telling reference from spatial cells, or build the AnnData with rmge.pp.prepare."
                )
            warnings.warn(
                f"adata.obs has no domain column {domain_key!r}: all its cells are treated as spatial (query) cells.",
                UserWarning,
                stacklevel=3,
            )
            is_ref = np.zeros(adata.n_obs, dtype=bool)
        else:
            is_ref = (obs[domain_key].astype(str) == str(reference_domain)).to_numpy()
        if labels_key not in obs:
            if strict:
                raise ValueError(
                    f"Label column {labels_key!r} not found in adata.obs (columns: {list(obs.columns)}). "
                    "Pass the column holding the reference cell types as `labels_key`."
                )
            labels = pd.Series(np.nan, index=obs.index, dtype=object)
        else:
            labels = obs[labels_key]
        if strict:
            if not is_ref.any():
                values = list(pd.unique(obs[domain_key].astype(str)))[:10]
                raise ValueError(
                    f"No reference cells: no value of adata.obs[{domain_key!r}] equals reference_domain="
                    f"{reference_domain!r} (values: {values}). "
                    "Set `reference_domain` to the value marking reference cells."
                )
            if is_ref.all():
                raise ValueError(
                    f"No query cells: every cell has adata.obs[{domain_key!r}] == {reference_domain!r}. "
                    "Add the spatial cells to the AnnData (rmge.pp.prepare combines reference and spatial data)."
                )
            ref_labels = labels[is_ref]
            n_missing = int(ref_labels.isna().sum())
            if n_missing:
                raise ValueError(
                    f"{n_missing} reference cell(s) have no label in adata.obs[{labels_key!r}]. "
                    "Remove them or give them a label before setup_anndata."
                )
            n_classes = ref_labels.astype(str).nunique()
            if n_classes < 2:
                raise ValueError(
                    f"The reference has a single cell type in adata.obs[{labels_key!r}] "
                    f"({ref_labels.astype(str).iloc[0]!r}); label transfer needs at least two types."
                )
        lab = labels.astype(object).where(is_ref, _UNLABELED)
        lab = lab.where(~(pd.isna(lab)), _UNLABELED).astype(str)
        present = set(lab[is_ref])
        if isinstance(labels.dtype, pd.CategoricalDtype):
            ref_categories = [str(c) for c in labels.cat.categories if str(c) in present]
        else:
            ref_categories = sorted(present)
        obs[_LABELS_COL] = pd.Categorical(lab, categories=[*ref_categories, _UNLABELED])
        obs[_DOMAIN_COL] = pd.Categorical(np.where(is_ref, _REFERENCE, _QUERY), categories=[_REFERENCE, _QUERY])
        group = np.where(is_ref, _REFERENCE, _QUERY).astype(object)
        if batch_key is not None:
            if batch_key not in obs:
                raise ValueError(f"Batch column {batch_key!r} not found in adata.obs (columns: {list(obs.columns)}).")
            group = group + "|" + obs[batch_key].astype(str).to_numpy()
        obs[_GROUP_COL] = pd.Categorical(group)

    @staticmethod
    def _validate_values(adata: AnnData, X, layer: str | None, allow_empty: bool = False) -> None:
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        if X.shape[1] == 0:
            raise ValueError(f"{where} has no genes.")
        check_nonnegative_finite(X, where)
        is_ref = (adata.obs[_DOMAIN_COL] == _REFERENCE).to_numpy()
        for name, mask in (("reference", is_ref), ("spatial", ~is_ref)):
            rows = np.flatnonzero(mask)
            if not len(rows):
                continue
            kind = detect_value_kind(X[rows[: min(len(rows), 5_000)]])
            if kind == LOG_NORMALIZED:
                raise ValueError(
                    f"The {name} cells in {where} look log-normalised (non-integer values below 20); RMGE needs "
                    "counts. Pass raw counts (e.g. `layer='counts'`), or build the AnnData with rmge.pp.prepare, "
                    "which converts log-normalised input back with expm1."
                )
        if allow_empty:
            return
        if sp.issparse(X) or isinstance(X, np.ndarray):
            lib = np.asarray(X.sum(axis=1)).ravel()
        else:
            # backed (on-disk) matrices are summed block by block
            lib = np.zeros(X.shape[0])
            for r, block in _row_blocks(X, np.arange(X.shape[0]), dtype=None):
                lib[r] = np.asarray(block.sum(axis=1)).ravel()
        empty = lib <= 0
        if empty.any():
            n_ref = int((empty & is_ref).sum())
            n_q = int((empty & ~is_ref).sum())
            raise ValueError(
                f"{int(empty.sum())} cell(s) have no counts ({n_ref} reference, {n_q} spatial). Remove empty cells "
                "first, e.g. `sc.pp.filter_cells(adata, min_counts=1)`."
            )

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        """Validate an AnnData, writing the internal columns of a new one from its user columns."""
        if adata is not None and adata is not self.adata:
            args = self.adata_manager.registry["setup_args"]
            if copy_if_view and adata.is_view:
                adata = adata.copy()
            self._add_internal_columns(
                adata, args["labels_key"], args["domain_key"], args["reference_domain"], args["batch_key"], strict=False
            )
            missing = np.setdiff1d(self.adata.var_names, adata.var_names)
            if (
                len(missing)
                or adata.n_vars != self.adata.n_vars
                or not np.array_equal(adata.var_names, self.adata.var_names)
            ):
                raise ValueError(
                    self._gene_mismatch_message(np.asarray(self.adata.var_names), np.asarray(adata.var_names))
                )
            # the values of a new AnnData pass the checks of setup_anndata, except that cells without counts are
            # allowed (predict() gives them the spatial composition)
            layer = args.get("layer")
            self._validate_values(adata, adata.layers[layer] if layer is not None else adata.X, layer, allow_empty=True)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    @staticmethod
    def _gene_mismatch_message(model_genes: np.ndarray, data_genes: np.ndarray) -> str:
        missing = np.setdiff1d(model_genes, data_genes)
        extra = np.setdiff1d(data_genes, model_genes)
        msg = (
            f"The AnnData's genes do not match the model's: the model has {len(model_genes)} genes, the AnnData "
            f"{len(data_genes)}; {len(missing)} model gene(s) missing (e.g. {list(missing[:5])}), {len(extra)} "
            f"extra (e.g. {list(extra[:5])})."
        )
        if not len(missing):
            msg += " Select and order the genes as the model's: `adata = adata[:, model.adata.var_names].copy()`."
        else:
            msg += " Use an AnnData with the genes the model was trained on (same names, same order)."
        return msg

    # ------------------------------------------------------------------ statistics
    def _registered_classes(self) -> list[str]:
        """Reference cell types, in the order of the model's outputs."""
        mapping = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        return [str(c) for c in mapping if c != _UNLABELED]

    def _prior_vector(self, prior, counts: np.ndarray) -> np.ndarray | None:
        if prior is None:
            return None
        if isinstance(prior, str):
            if prior == "reference":
                return counts / counts.sum()
            if prior == "uniform":
                return np.full(len(counts), 1.0 / len(counts))
            raise ValueError(f"`prior` must be 'reference', 'uniform', a mapping or None, got {prior!r}.")
        prior = dict(prior)
        unknown = set(prior) - set(self.classes_)
        if unknown:
            raise ValueError(f"`prior` names classes not in the reference: {sorted(unknown)}.")
        vec = np.array([float(prior.get(c, 0.0)) for c in self.classes_])
        if vec.sum() <= 0 or (vec < 0).any():
            raise ValueError("`prior` must hold non-negative proportions with a positive sum.")
        return vec / vec.sum()

    def _compute_statistics(self, sparsity_matching, target_sum: float | str = TARGET_SUM) -> dict:
        """Library-size quantiles, gene capture factors and per-group standardisation statistics.

        Two passes over the data in row blocks, each block handled through its non-zero entries (the
        data are never densified, and backed matrices are read block by block); with sparsity matching,
        the second pass runs over the reference cells once more for each further thinning draw (see
        ``_STAT_THINNED_CELLS``: up to 64 draws for a reference of under 800 cells, one from 50,000 cells).
        """
        manager = self.adata_manager
        X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        domain = self._domain_codes()
        group = np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel().astype(np.int64)
        labels = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel().astype(np.int64)
        domain_map = list(manager.get_state_registry(REGISTRY_KEYS.DOMAIN_KEY).categorical_mapping)
        group_map = list(manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping)
        ref_code = domain_map.index(_REFERENCE)
        is_ref = domain == ref_code
        n_obs, n_genes = X.shape
        n_labels = len(self.classes_)
        label_counts = np.bincount(labels[is_ref], minlength=n_labels + 1)[:n_labels]
        all_rows = np.arange(n_obs)
        block_rows = _stat_block_rows(X)

        # pass 1: library sizes and mean gene proportions per domain (row 0: spatial, row 1: reference)
        lib = np.zeros(n_obs)
        prop_sum = np.zeros((2, n_genes))
        for r, block in _row_blocks(X, all_rows, block_rows, dtype=None):
            lib[r] = library_proportions(block, is_ref[r], prop_sum)
        n_ref, n_q = int(is_ref.sum()), int((~is_ref).sum())
        qs = np.linspace(0, 1, N_QUANTILES)
        ref_q = np.quantile(lib[is_ref], qs) if n_ref else np.zeros(N_QUANTILES)
        sp_q = np.quantile(lib[~is_ref], qs) if n_q else np.zeros(N_QUANTILES)
        # each class's reference library sizes (quantiles), for the depth evidence of cells without counts
        class_q = np.full((n_labels, N_CLASS_QUANTILES), np.nan)
        for k in range(n_labels):
            lib_k = lib[is_ref & (labels == k)]
            if len(lib_k):
                class_q[k] = np.quantile(lib_k, np.linspace(0, 1, N_CLASS_QUANTILES))
        ref_prop = prop_sum[1] / max(n_ref, 1)
        sp_prop = prop_sum[0] / max(n_q, 1)
        # per-gene capture factor: spatial over reference mean proportion, shrunk towards 1 by a pseudo-count
        # on the spatial side (observed counts of the gene vs the counts expected from its reference
        # proportion). Sparse spatial data hold few counts of most genes: the raw ratio of a gene seen a handful
        # of times is mostly noise (0.01 to 25 for data of identical capture), and it would thin that gene
        # far too much or not at all.
        total_sp = float(lib[~is_ref].sum())
        factor = (sp_prop * total_sp + _FACTOR_PSEUDOCOUNT) / (ref_prop * total_sp + _FACTOR_PSEUDOCOUNT)
        factor = np.clip(factor / factor.mean(), 1e-2, 1e2)
        factor = factor / factor.mean()

        # decide on sparsity matching
        if n_ref and n_q:
            kinds = {
                "reference": detect_value_kind(X[np.flatnonzero(is_ref)[:5_000]]),
                "spatial": detect_value_kind(X[np.flatnonzero(~is_ref)[:5_000]]),
            }
        else:
            kinds = {"reference": COUNTS, "spatial": COUNTS}
        both_counts = all(k == COUNTS for k in kinds.values())
        if sparsity_matching == "auto":
            use_thin = both_counts
            if not both_counts and n_ref and n_q:
                logger.info(
                    "Sparsity matching is off: it needs counts on both sides (reference: %s, spatial: %s).",
                    kinds["reference"],
                    kinds["spatial"],
                )
        elif sparsity_matching:
            if not both_counts:
                raise ValueError(
                    f"sparsity_matching=True needs integer counts in both domains (reference: {kinds['reference']}, "
                    f"spatial: {kinds['spatial']}). Pass counts or use sparsity_matching='auto'/False."
                )
            use_thin = True
        else:
            use_thin = False

        if target_sum == "auto":
            target_sum = _auto_target_sum(use_thin, factor, lib[~is_ref])
        elif target_sum == "median":
            target_sum = _median_depth(lib[~is_ref])
        target_sum = float(target_sum)

        # pass 2: per-group mean and std of log1p(normalize_total) (reference thinned as in training)
        rng = np.random.default_rng(settings.seed)
        n_groups = len(group_map)
        n_g = np.bincount(group, minlength=n_groups).astype(np.float64)
        gis_ref = np.zeros(n_groups, dtype=bool)
        present, first = np.unique(group, return_index=True)
        gis_ref[present] = is_ref[first]
        ref_groups = np.flatnonzero(gis_ref)
        slot_of_group = np.full(n_groups, -1, dtype=np.int64)
        slot_of_group[ref_groups] = np.arange(len(ref_groups))
        sums = {
            "s1": np.zeros((n_groups, n_genes)),
            "s2": np.zeros((n_groups, n_genes)),
            "class_sums": np.zeros((len(ref_groups), n_labels, n_genes)),
            "class_n": np.zeros((len(ref_groups), n_labels)),
        }
        if use_thin:
            # each reference cell is thinned to the spatial depth at its own depth's rank
            rank = np.searchsorted(ref_q, lib, side="right") / N_QUANTILES
            depth = np.interp(np.clip(rank, 0, 1) * (N_QUANTILES - 1), np.arange(N_QUANTILES), sp_q)
            target = np.where(is_ref, depth, -1.0)
        else:
            target = np.full(n_obs, -1.0)
        slots = np.where(is_ref, slot_of_group[group], -1)
        n_draws = _stat_draws(n_ref) if use_thin else 1
        ref_rows = np.flatnonzero(is_ref)
        for draw in range(n_draws):
            # the first pass reads every cell; each further one draws the reference cells' thinning afresh
            # (the spatial cells are not thinned)
            rows = all_rows if draw == 0 else ref_rows
            for r, block in _row_blocks(X, rows, block_rows, dtype=None):
                log_norm_sums(block, group[r], slots[r], labels[r], target[r], factor, rng, sums, target_sum)
        n_g = n_g * np.where(gis_ref, n_draws, 1)
        s1, s2 = sums["s1"], sums["s2"]
        class_sums = np.zeros((n_groups, n_labels, n_genes))
        class_n = np.zeros((n_groups, n_labels))
        class_sums[ref_groups] = sums["class_sums"]
        class_n[ref_groups] = sums["class_n"]
        mean = s1 / np.maximum(n_g, 1)[:, None]
        var = np.maximum(s2 / np.maximum(n_g, 1)[:, None] - mean**2, 0.0)
        std = np.maximum(np.sqrt(var), _MIN_STD)
        # standardised class centroids (metagene initialisation), pooled over reference groups
        cz = np.zeros((n_labels, n_genes))
        for gi in np.flatnonzero(gis_ref):
            cz += (class_sums[gi] - class_n[gi][:, None] * mean[gi]) / std[gi]
        cz /= np.maximum(class_n.sum(0), 1)[:, None]
        return {
            "centroids": cz.astype(np.float32),
            "label_counts": label_counts,
            "group_is_reference": gis_ref,
            "group_mean": mean.astype(np.float32),
            "group_std": std.astype(np.float32),
            "gene_factor": factor.astype(np.float32),
            "ref_lib_quantiles": ref_q.astype(np.float32),
            "spatial_lib_quantiles": sp_q.astype(np.float32),
            "class_lib_quantiles": class_q.astype(np.float32),
            "sparsity_matching": use_thin,
            "value_kinds": kinds,
            "target_sum": target_sum,
        }

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        validation_size: float = 0.1,
        batch_size: int = 256,
        early_stopping: bool = True,
        early_stopping_patience: int = 15,
        shuffle_set_split: bool = True,
        calibrate: bool = True,
        steps_per_epoch: int | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model.

        Each step sees ``batch_size`` reference and ``batch_size`` spatial cells; an epoch is a pass
        over the larger domain. Pseudo-labels enter after ``pseudo_label_warmup`` (a fraction of
        ``max_epochs``, a training-plan argument; default 0, from the start) and ramp up over as long
        again; once they have and 40 % of ``max_epochs`` have passed, training stops early when the
        validation loss (held-out reference cells with a sample of spatial cells) stops improving.

        By default (``max_epochs=None``) training takes about 6,000 steps. Where a pass over the larger
        domain takes more than 300 steps (more than 76,800 cells with the default ``batch_size``), an
        epoch is capped at 300 steps: passes then run on across epochs, and validation, early stopping
        and the warm-ups count these epochs, each validation taking at most 40 minibatches (a fixed
        random subset of the held-out cells). Training thus stays at 20 epochs of 300 steps whatever the
        data size, while data with passes of up to 300 steps train exactly as before. Where a pass takes
        fewer than 10 steps (at most 2,304 cells with the default ``batch_size``), validation runs every
        ``ceil(10 / steps)`` epochs until early stopping starts watching, then at every epoch: on such
        data a validation costs about as much as a training step, and early stopping ignores the
        validations of its warm-up, so it stops at the same epoch as with a validation at every epoch.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs. ``None``: about 6,000 steps, between 20 and 200 epochs (epochs of at
            most 300 steps, see above).
        accelerator
            ``"auto"``, ``"cpu"``, ``"gpu"``..., passed to Lightning.
        devices
            Devices to use, passed to Lightning.
        validation_size
            Fraction of reference cells held out (stratified by type) for validation and early stopping.
        batch_size
            Cells of each domain per step.
        early_stopping
            Stop when ``validation_loss`` has not improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Epochs without improvement before stopping. With ``check_val_every_n_epoch=`` given, rounded up
            to whole validations, as is the warm-up of early stopping.
        shuffle_set_split
            Shuffle reference cells before the validation split.
        calibrate
            Fit the calibration temperature on the validation cells after training (:meth:`calibrate`).
        steps_per_epoch
            Steps per epoch; ``None``: a pass over the larger domain, capped at 300 steps when
            ``max_epochs`` is ``None``. Shorter epochs validate (and may stop) more often.
        plan_kwargs
            Keyword arguments of :class:`~rmge.model.RMGETrainingPlan` (e.g. ``lr``).
        datasplitter_kwargs
            Keyword arguments of :class:`~rmge.model.RMGEDataSplitter`.
        **trainer_kwargs
            Keyword arguments of :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``, ``strategy``).
            ``max_steps`` counts optimiser steps, as Lightning does: two per training step while the
            discriminator is trained (``adversarial_weight > 0``).
            Data-parallel training on several devices: ``accelerator="gpu", devices=4, strategy="ddp"``
            (``"ddp"`` and its variants are run with ``find_unused_parameters=True``, which the discriminator's
            second update of each step needs); each process then takes its own share of every pass, and
            early stopping is off (scvi-tools' rule for DDP).
        """
        domain = self._domain_codes()
        labels = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        ref_idx = np.flatnonzero(domain == 0)
        query_idx = np.flatnonzero(domain == 1)
        if not len(ref_idx) or not len(query_idx):
            raise ValueError("Training needs reference and spatial cells in the registered AnnData.")
        if validation_size is None or validation_size <= 0:
            early_stopping = False
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be a positive integer or None, got {steps_per_epoch}.")
        strategy = trainer_kwargs.get("strategy")
        if isinstance(strategy, str) and strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
            # the discriminator's update is a second backward pass in the same step, which DDP accepts only when
            # it looks for parameters a pass leaves unused
            trainer_kwargs["strategy"] = f"{strategy}_find_unused_parameters_true"
        max_validation_batches = None
        validate_every = 1
        if max_epochs is None:
            steps = int(np.ceil(max(len(ref_idx), len(query_idx)) / batch_size))
            if steps_per_epoch is None and steps > _MAX_DEFAULT_EPOCH_STEPS:
                steps_per_epoch = _MAX_DEFAULT_EPOCH_STEPS
                # large data: each validation takes a fixed subset of the held-out cells (a large reference
                # would otherwise spend as long validating as training)
                max_validation_batches = _MAX_DEFAULT_VALIDATION_BATCHES
            if steps_per_epoch is not None:
                steps = min(steps, steps_per_epoch)
            max_epochs = int(np.clip(round(_DEFAULT_STEPS / max(steps, 1)), 20, 200))
            # small data: during the warm-up of early stopping, a validation every few epochs, at least
            # _MIN_DEFAULT_VALIDATION_STEPS steps apart
            validate_every = int(np.ceil(_MIN_DEFAULT_VALIDATION_STEPS / max(steps, 1)))
        splitter = self._data_splitter_cls(
            self.adata_manager,
            reference_indices=ref_idx,
            query_indices=query_idx,
            labels=labels,
            validation_size=validation_size,
            batch_size=batch_size,
            shuffle_set_split=shuffle_set_split,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy", None)),
            steps_per_epoch=steps_per_epoch,
            **{"max_validation_batches": max_validation_batches, **(datasplitter_kwargs or {})},
        )
        if splitter.n_val == 0:
            early_stopping = False
        max_steps = trainer_kwargs.get("max_steps")
        if early_stopping and max_steps is not None and max_steps > 0:
            epoch_steps = int(np.ceil(max(splitter.n_train, len(query_idx)) / batch_size))
            if steps_per_epoch is not None:
                epoch_steps = min(epoch_steps, steps_per_epoch)
            # Lightning counts optimiser steps: two per training step while the discriminator is trained
            if max_steps < epoch_steps * (2 if self.module.adversarial_weight > 0 else 1):
                # training ends inside the first epoch, before any validation: nothing to stop early on
                logger.info("`max_steps` ends training before the first validation; early stopping is off.")
                early_stopping = False
        plan_kwargs = {**getattr(self, "_plan_defaults", {}), **(plan_kwargs or {})}
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        # with pseudo-labels, early stopping watches the total validation loss once their weight has fully
        # ramped up and the adaptation has had _EARLY_STOPPING_WARMUP of max_epochs to settle
        if self.module.pseudo_label_weight > 0:
            warmup = max(2 * training_plan.pseudo_label_warmup, _EARLY_STOPPING_WARMUP)
        else:
            warmup = 0.0
        warmup_epochs = int(np.ceil(warmup * max_epochs))
        # patience and warm-up are given in epochs; early stopping counts validations
        every = trainer_kwargs.get("check_val_every_n_epoch") or 1
        warmup_validations = int(np.ceil(warmup_epochs / every))
        if early_stopping and "check_val_every_n_epoch" not in trainer_kwargs:
            trainer_kwargs["check_val_every_n_epoch"] = 1
            if validate_every > 1 and warmup_epochs >= validate_every:
                # validations of the warm-up only logged: sparser, with the same early-stopping decisions.
                # Given to Lightning as the starting interval, so that early stopping checks after each
                # validation (not at the end of every training epoch)
                trainer_kwargs["check_val_every_n_epoch"] = validate_every
                schedule = WarmupValidationSchedule(validate_every, warmup_epochs)
                trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), schedule]
                warmup_validations = schedule.warmup_validations
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        trainer_kwargs.setdefault("early_stopping_patience", int(np.ceil(early_stopping_patience / every)))
        trainer_kwargs.setdefault("early_stopping_mode", "min")
        trainer_kwargs.setdefault("early_stopping_warmup_epochs", warmup_validations)
        trainer_kwargs["early_stopping"] = early_stopping
        # scvi-tools' default logger, in the same layout, but without a copy of the frame per logged value
        trainer_kwargs.setdefault("logger", HistoryLogger())
        runner = self._train_runner_cls(
            self,
            training_plan=training_plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            **trainer_kwargs,
        )
        self._composition = None
        out = runner()
        if calibrate and splitter.n_val > 0:
            self.calibrate()
        return out

    @torch.inference_mode()
    def calibrate(self, indices: Sequence[int] | None = None, batch_size: int | None = None) -> float:
        """Fit the calibration temperatures on held-out reference cells (temperature scaling).

        Two temperatures are fitted, each minimising the negative log-likelihood of the true labels on
        a fine logarithmic grid (a deterministic one-dimensional fit):

        - the **spatial** temperature, used for spatial cells and for cells of a new AnnData, is fitted
          on the cells thinned to the spatial depth when sparsity matching is on, so that confidence is
          fitted in the regime of the spatial data; its grid runs from 0.5 to 20. The lower bound keeps
          a perfectly separated validation set (whose likelihood always rises with sharper
          predictions) from making spatial predictions, which are harder, overconfident;
        - the **reference** temperature, used for reference cells, is fitted on the cells as they
          are, on a grid from 0.05 to 20.

        Called at the end of :meth:`train`.

        Parameters
        ----------
        indices
            Labelled reference cells to fit on; ``None`` uses the validation cells of the last training.
        batch_size
            Minibatch size of inference.

        Returns
        -------
        The spatial temperature. Both are stored in the module (``calibration_temperature`` and
        ``reference_calibration_temperature``) and saved with the model.
        """
        self._check_if_trained(warn=False)
        self._composition = None
        if indices is None:
            indices = getattr(self, "validation_indices", None)
        if indices is None or len(indices) == 0:
            raise ValueError("No held-out reference cells to calibrate on: pass `indices` of labelled reference cells.")
        indices = np.asarray(indices)
        domain = self._domain_codes()[indices]
        if (domain != 0).any():
            raise ValueError("Calibration needs labelled reference cells; some `indices` are spatial cells.")
        labels = torch.as_tensor(np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel())
        # minibatches read straight from the registered matrix (in memory or backed), in the order of `indices`
        source, step = MinibatchSource(self.adata_manager), batch_size or 2048
        dl = (source.fetch(indices[start : start + step]) for start in range(0, len(indices), step))
        self.module.eval()
        counting = bool(self.module.count_evidence)
        if counting:
            reference_rows = np.flatnonzero(self._domain_codes() == 0)
            self._fit_count_profiles(np.setdiff1d(reference_rows, indices))
        zs, zs_ref, evidence = [], [], []
        # thinning draws from a fixed seed, so the fit is reproducible and leaves the global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed if settings.seed is not None else 0)
            for tensors in dl:
                inputs = self.module._get_inference_input(tensors)
                if counting:
                    # thinned here, so that the count evidence sees the same thinned counts as the encoder
                    dev = self.module.encoder.weight.device
                    x = self.module.thin(inputs["x"].float().to(dev))
                    zs.append(self.module.inference(x, inputs["group"].to(dev))["z"].cpu())
                    evidence.append(self.module.count_log_likelihood(x).cpu())
                else:
                    zs.append(self.module.inference(**inputs, thin=True)["z"].cpu())
                zs_ref.append(self.module.inference(**inputs)["z"].cpu())
        y = labels[indices].long()

        def fit(z: torch.Tensor, low: float) -> float:
            grid = torch.logspace(np.log10(low), np.log10(20.0), 400, dtype=torch.float64)
            z = z.double()
            nll = torch.stack([cross_entropy_rows(z / t, y) for t in grid])
            return float(grid[int(nll.argmin())])

        z_thin = torch.cat(zs)
        best = fit(z_thin, 0.5)
        # reference cells are predicted at their own depth and in their own domain: their temperature
        # is fitted on the unthinned cells, without the lower bound that protects spatial predictions
        self.module.calibration_temperature.fill_(best)
        self.module.reference_calibration_temperature.fill_(fit(torch.cat(zs_ref), 0.05))
        if counting:
            # the combined logits (activities over their temperature plus the count evidence) get their own
            combined = z_thin / best + torch.cat(evidence).to(z_thin.dtype)
            self.module.count_temperature.fill_(fit(combined, 0.5))
        return best

    def _domain_codes(self) -> np.ndarray:
        """Domain code of each cell of the set-up AnnData (0: reference, 1: spatial)."""
        return np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.DOMAIN_KEY)).ravel()

    def _fit_count_profiles(self, rows: np.ndarray) -> None:
        """Each type's expression profile for the count evidence, from the labelled reference ``rows``.

        A type's profile is the sum of its cells' counts, each gene scaled by its spatial capture factor
        (``gene_factor``), plus a pseudo-count of 1 % of the type's mean count per gene (a gene never
        seen in a type keeps a small probability), normalised to proportions. The depth that caps a
        cell's evidence is the median library size of these cells. The held-out cells of the
        calibration are left out, so that the evidence's temperature is fitted on cells it has not seen.
        """
        manager = self.adata_manager
        X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        labels = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel().astype(np.int64)
        n_labels, n_genes = len(self.classes_), X.shape[1]
        rows = rows[labels[rows] < n_labels]
        sums = np.zeros((n_labels, n_genes))
        libs = []
        for r, block in _row_blocks(X, rows, _stat_block_rows(X), dtype=None):
            block = sp.csr_matrix(block)
            codes = labels[r]
            onehot = sp.csr_matrix((np.ones(len(r)), (codes, np.arange(len(r)))), shape=(n_labels, len(r)))
            sums += np.asarray((onehot @ block).todense())
            libs.append(np.asarray(block.sum(axis=1)).ravel())
        lib = np.concatenate(libs) if libs else np.zeros(0)
        if not len(lib) or np.median(lib) <= 0:
            self.module.count_depth.zero_()
            return
        factor = self.module.gene_factor.detach().cpu().double().numpy()
        sums *= factor
        totals = sums.sum(1, keepdims=True)
        profiles = sums + 0.01 * np.maximum(totals, 1.0) / n_genes
        profiles /= profiles.sum(1, keepdims=True)
        module = self.module
        module.count_log_profiles.copy_(torch.as_tensor(np.log(profiles), dtype=torch.float32))
        module.count_depth.fill_(float(np.median(lib)))

    # ------------------------------------------------------------------ outputs
    def _dense_logits(self, block: sp.csr_matrix, groups: np.ndarray, batch_size: int) -> torch.Tensor:
        """Metagene activities of a CSR block through :meth:`RMGEModule.inference`, ``batch_size`` rows at a time."""
        dev = self.module.encoder.weight.device
        zs = []
        for start in range(0, block.shape[0], batch_size):
            x = torch.from_numpy(block[start : start + batch_size].toarray().astype(np.float32, copy=False))
            g = torch.from_numpy(groups[start : start + batch_size]).view(-1, 1)
            zs.append(self.module.inference(x.to(dev), g.to(dev))["z"].float().cpu())
        return torch.cat(zs) if zs else torch.zeros((0, len(self.classes_)))

    @torch.inference_mode()
    def _forward_all(self, adata=None, indices=None, batch_size: int | None = None):
        """Metagene activities, query flags, empty-cell flags and count evidence of the cells (``None`` without
        count evidence), block by block without densifying.

        On CPU the activities come from the non-zero counts alone (:func:`rmge.model._kernels.sparse_logits`),
        checked against :meth:`RMGEModule.inference` on the first cells; elsewhere (or should the check fail)
        each block is densified ``batch_size`` rows at a time and passed through the module.
        """
        # only a new AnnData may hold cells without counts: setup_anndata refuses them in the set-up one
        new = adata is not None and adata is not self.adata
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        groups = np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1).astype(np.int64)
        domain = np.asarray(manager.get_from_registry(REGISTRY_KEYS.DOMAIN_KEY)).reshape(-1)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        batch_size = batch_size or 2048
        self.module.eval()
        use_sparse = self.module.encoder.weight.device.type == "cpu"
        with_evidence = self.module.has_count_evidence
        k = len(self.classes_)
        zs, empty, evidence = [], [], []
        for r, block in _row_blocks(X, rows, dtype=None):
            g = groups[r]
            empty.append(np.asarray(block.sum(axis=1)).ravel() <= 0 if new else np.zeros(len(r), dtype=bool))
            # count evidence serves spatial cells only: blocks of reference cells alone skip it
            block_evidence = with_evidence and bool((domain[r] == 1).any())
            ev = np.empty((block.shape[0], k), dtype=np.float32) if block_evidence and use_sparse else None
            z = sparse_logits(self.module, block, g, evidence=ev) if use_sparse else None
            if z is not None and not zs:
                # guard: the sparse path must reproduce the module's own forward pass
                n_check = min(block.shape[0], 64)
                ref = self._dense_logits(block[:n_check], g[:n_check], batch_size).numpy()
                agree = np.allclose(z[:n_check], ref, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref).max())))
                if ev is not None:
                    ref_ev = self.module.count_log_likelihood(block[:n_check]).cpu().numpy()
                    agree &= np.allclose(ev[:n_check], ref_ev, rtol=1e-4, atol=1e-3)
                if not agree:
                    logger.warning("Sparse inference disagrees with the module; using dense minibatches instead.")
                    use_sparse, z, ev = False, None, None
            zs.append(torch.from_numpy(z) if z is not None else self._dense_logits(block, g, batch_size))
            if with_evidence:
                if ev is not None:
                    ev = torch.from_numpy(ev)
                elif block_evidence:
                    ev = self.module.count_log_likelihood(block).cpu()
                else:
                    ev = torch.zeros((block.shape[0], k))
                evidence.append(ev)
        if not zs:
            none = torch.zeros((0, k)) if with_evidence else None
            return adata, torch.zeros((0, k)), torch.zeros(0, dtype=torch.bool), np.zeros(0, bool), none
        ev = torch.cat(evidence) if with_evidence else None
        return adata, torch.cat(zs), torch.from_numpy(domain[rows] == 1), np.concatenate(empty), ev

    def _calibrated_probabilities(self, z, is_query, evidence) -> torch.Tensor:
        """Predicted probabilities (on the CPU) from the output of :meth:`_forward_all`.

        The learned spatial temperature serves the discriminator during training; predicted probabilities
        use the calibration temperatures (measured to be better calibrated) and the count evidence, if any.
        """
        dev = self.module.temperature.device
        evidence = None if evidence is None else evidence.to(dev)
        return self.module.probabilities(z.to(dev), is_query.to(dev), calibrated=True, evidence=evidence).cpu()

    def _obs_names(self, adata, indices):
        names = adata.obs_names
        return names if indices is None else names[np.asarray(indices)]

    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        unknown_threshold: float | None = None,
        novelty_threshold: float | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict the cell type of each cell.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the AnnData the model was set up with. Cells of a
            new AnnData without a domain column are treated as spatial cells.
        indices
            Indices of the cells to predict; ``None`` predicts all.
        soft
            Return probabilities instead of labels.
        batch_size
            Minibatch size of inference.
        unknown_threshold
            With labels (``soft=False``), cells whose largest calibrated probability is below this value
            are labelled ``"Unknown"``; ``None`` labels every cell.
        novelty_threshold
            With labels, cells whose :meth:`novelty_score` is below ``-novelty_threshold`` (they fit
            their assigned type that many robust standard deviations worse than its typical member,
            e.g. a type the reference lacks) are labelled ``"Unknown"``; 2 is a good start. The score
            is computed among the predicted cells of each domain, so predict a whole section at once.

        Returns
        -------
        Labels (``np.ndarray`` of str), or with ``soft=True`` a DataFrame cells × reference types whose rows sum to 1.
        Probabilities are the softmax of the metagene activities divided by the calibration temperature
        fitted after training (:meth:`calibrate`): the spatial one for spatial cells, the reference one
        for reference cells. Cells of a new AnnData without a single count over the model's genes carry
        no expression profile, only their depth: they get :meth:`empty_cell_probabilities` (the spatial
        composition weighted by each type's chance of leaving a cell empty) as probabilities, hence one
        type as label (``"Unknown"`` with an ``unknown_threshold`` above its probability; never by the
        novelty score, which they do not have), with a warning.
        """
        self._check_if_trained(warn=False)
        if unknown_threshold is not None and not 0 <= unknown_threshold <= 1:
            raise ValueError(f"`unknown_threshold` must be a probability in [0, 1], got {unknown_threshold}.")
        if novelty_threshold is not None and not (np.isfinite(novelty_threshold) and novelty_threshold > 0):
            raise ValueError(
                f"`novelty_threshold` must be a positive number of robust standard deviations (e.g. 2), "
                f"got {novelty_threshold}."
            )
        adata, z, is_query, empty, evidence = self._forward_all(adata, indices, batch_size)
        probs = self._calibrated_probabilities(z, is_query, evidence).numpy()
        if empty.any():
            # a cell without counts carries no expression profile, only its depth: the spatial composition
            # weighted by each type's chance of leaving a cell empty
            warnings.warn(
                f"{int(empty.sum())} cell(s) have no counts over the model's genes; they get "
                "`model.empty_cell_probabilities()` (the spatial composition, weighted by each type's chance "
                "of an empty cell) as probabilities. With spatial coordinates, "
                "`rmge.tl.smooth_probabilities(..., fill=<mask of these cells>)` gives them their neighbours' instead.",
                UserWarning,
                stacklevel=2,
            )
            probs = probs.copy()
            probs[empty] = self.empty_cell_probabilities().to_numpy()
        classes = np.asarray(self.classes_, dtype=object)
        if soft:
            return pd.DataFrame(probs, index=self._obs_names(adata, indices), columns=classes)
        if not len(probs):
            return np.asarray([], dtype=object)
        labels = classes[probs.argmax(1)]
        if unknown_threshold is not None:
            labels = labels.copy()
            labels[probs.max(1) < unknown_threshold] = UNKNOWN_LABEL
        if novelty_threshold is not None:
            scores = self._novelty(adata, indices, probs.argmax(1), is_query.numpy(), empty, batch_size=batch_size)
            labels = labels.copy()
            labels[scores < -novelty_threshold] = UNKNOWN_LABEL
        return labels

    def _novelty(self, adata, indices, codes, is_query, empty, batch_size=None, **kwargs) -> np.ndarray:
        """Novelty scores of the cells ``indices`` of a validated ``adata``, each domain on its own.

        Cells without counts (``empty``) have no profile to compare: they score NaN and take no part in the others'.
        """
        from ._novelty import novelty_scores

        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        scores = np.full(len(rows), np.nan)
        for domain in (True, False):
            sel = np.flatnonzero((is_query == domain) & ~empty)
            if len(sel):
                scores[sel] = novelty_scores(
                    self, adata, rows[sel], codes[sel], batch_size=batch_size or 2048, **kwargs
                )
        return scores

    @torch.inference_mode()
    def novelty_score(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_neighbors: int = 15,
        n_pcs: int = 30,
        batch_size: int | None = None,
    ) -> pd.Series:
        """How well each cell fits its predicted type, relative to the other cells predicted as that type.

        A cell's similarity to its type is the correlation (cosine of centred, standardised profiles) with
        the type's reference centroid, averaged over the cell and its ``n_neighbors - 1`` nearest
        neighbours in expression space (principal components of the standardised profiles; sparse
        single-cell similarities are noisy, and cells of a type the reference lacks neighbour each
        other). The score is its robust z-score among the cells predicted as the same type in the same
        domain: ``(s - median) / (1.4826 · MAD)``, the rule SingleR uses to prune labels. Negative
        values fit the type worse than its typical member; types predicted for fewer than 20 cells
        score 0. Used by ``predict(novelty_threshold=...)``.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the set-up AnnData.
        indices
            Indices of the cells, scored together; ``None`` takes all.
        n_neighbors
            Neighbours (including the cell itself) the similarity is averaged over; 1 turns averaging off.
        n_pcs
            Principal components the neighbours are searched in.
        batch_size
            Minibatch size of inference.

        Returns
        -------
        Scores indexed by cell name.
        """
        self._check_if_trained(warn=False)
        if int(n_neighbors) < 1:
            raise ValueError(f"`n_neighbors` must be at least 1, got {n_neighbors}.")
        adata, z, is_query, empty, evidence = self._forward_all(adata, indices, batch_size)
        scores = self._novelty(
            adata,
            indices,
            self._calibrated_probabilities(z, is_query, evidence).argmax(1).numpy(),  # the type predict() gives
            is_query.numpy(),
            empty,
            batch_size,
            n_neighbors=int(n_neighbors),
            n_pcs=n_pcs,
        )
        return pd.Series(scores, index=self._obs_names(adata, indices), name="rmge_novelty")

    @torch.inference_mode()
    def spatial_composition(self, batch_size: int | None = None) -> pd.Series:
        """Estimated share of each reference type among the spatial cells the model was set up with.

        The mean of the calibrated probabilities (:meth:`predict` with ``soft=True``) of those cells, an
        unbiased estimate of the composition when the probabilities are calibrated; the prior of cells
        without counts (:meth:`empty_cell_probabilities`). Computed once per trained state (the cache is
        cleared by :meth:`train` and :meth:`calibrate`).

        Parameters
        ----------
        batch_size
            Minibatch size of inference.

        Returns
        -------
        Proportions indexed by type, summing to 1.
        """
        self._check_if_trained(warn=False)
        cached = getattr(self, "_composition", None)
        if cached is None:
            # the set-up AnnData holds no cell without counts (setup_anndata refuses them): predict() never
            # comes back here
            domain = self._domain_codes()
            probs = self.predict(indices=np.flatnonzero(domain == 1), soft=True, batch_size=batch_size)
            mean = probs.to_numpy(dtype=np.float64).mean(0)
            cached = self._composition = pd.Series(mean / mean.sum(), index=list(self.classes_), name="composition")
        return cached.copy()

    def empty_cell_probabilities(self) -> pd.Series:
        """Probabilities of the types for a spatial cell without a single count over the model's genes.

        Such a cell has no expression profile, but its depth is evidence: a type whose cells hold
        few counts leaves more cells empty. With counts on both sides (sparsity matching on), the
        posterior is ``P(type | no counts) ∝ π(type) · P(no counts | type)``. Under Poisson sampling of
        a reference cell's library size ``L`` scaled by the spatial depth ratio ``s``,
        ``P(no counts | type) = e(type)``, the mean of ``exp(-s·L)`` over the type's reference cells.
        ``π`` is the composition of *all* spatial cells, empty or not: the composition the model
        estimates (:meth:`spatial_composition`) is that of the cells with counts, ``π_+``, in which a
        type that often leaves cells empty is under-represented, so ``π ∝ π_+ / (1 - e)`` and the
        posterior is ``∝ π_+ · e / (1 - e)``. ``s`` is the ratio at which the mean depth of the cells
        with counts (the zero-truncated Poisson means of the types, weighted by ``π_+``) equals the
        spatial cells' mean depth. Without counts on both sides (or for a model saved before the class
        library sizes were kept) the composition itself is returned.

        Returns
        -------
        Probabilities indexed by type, summing to 1.
        """
        comp = self.spatial_composition()
        likelihood = self._empty_likelihood(comp.to_numpy(dtype=np.float64))
        if likelihood is None:
            return comp
        # the composition of the cells with counts, turned into that of all cells: pi ∝ pi_+ / (1 - e)
        post = comp.to_numpy(dtype=np.float64) * likelihood / np.maximum(1.0 - likelihood, 1e-300)
        if not np.isfinite(post).all() or post.sum() <= 0:
            return comp
        return pd.Series(post / post.sum(), index=comp.index, name="probability")

    def _empty_likelihood(self, pi: np.ndarray) -> np.ndarray | None:
        """``P(no counts | type)`` for each type (see :meth:`empty_cell_probabilities`), or ``None``."""
        module = self.module
        class_q = module.class_lib_quantiles.detach().cpu().numpy().astype(np.float64)
        if not module.sparsity_matching or not np.isfinite(class_q[pi > 0]).all():
            return None
        class_q = np.nan_to_num(class_q, nan=0.0)
        # mean depth of the (non-empty) spatial cells the model was set up with
        depth = float(module.spatial_lib_quantiles.detach().cpu().double().mean())
        weights = pi / pi.sum()

        def truncated_mean(log_s: float) -> float:
            # pi_+ weighs the cells with counts: the mean of the types' zero-truncated means
            s = np.exp(log_s)
            mean = (s * class_q).mean(1)
            nonzero = (-np.expm1(-s * class_q)).mean(1)
            return float((weights * mean / np.maximum(nonzero, 1e-300)).sum())

        # the zero-truncated mean rises from 1 (s -> 0) without bound: one root in log s
        lo, hi = -30.0, 10.0
        if depth <= 1.0 or truncated_mean(hi) < depth:
            return None
        s = np.exp(brentq(lambda log_s: truncated_mean(log_s) - depth, lo, hi, xtol=1e-12))
        return np.exp(-s * class_q).mean(1)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Metagene activities (cells × reference types): the encoder's output for each cell.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the set-up AnnData.
        indices
            Indices of the cells; ``None`` takes all.
        batch_size
            Minibatch size of inference.
        """
        self._check_if_trained(warn=False)
        _, z, _, _, _ = self._forward_all(adata, indices, batch_size)
        return z.numpy()

    def get_metagenes(self) -> pd.DataFrame:
        """Metagenes: encoder weights as a DataFrame genes × reference types.

        Entry (g, k) is how much one standard deviation of gene g's log expression (within its
        domain) raises the activity of type k; with the cosine classifier each metagene has unit norm.
        Sort a column to get a type's top genes.
        """
        w = self.module.encoder.weight.detach().cpu()
        if self.module.classifier == "cosine":
            w = unit_rows(w)
        w = w.numpy().T
        return pd.DataFrame(w, index=self.adata.var_names.copy(), columns=self.classes_)

    def map_cells(
        self,
        adata: AnnData | None = None,
        k: int = 5,
        method: Literal["nndescent", "exact", "ot"] = "nndescent",
        metric: Literal["euclidean", "cosine"] = "euclidean",
        **kwargs,
    ):
        """Pair each spatial cell with the ``k`` closest reference cells of its predicted type.

        Distances are measured in metagene space (:meth:`get_latent_representation`). See
        :func:`rmge.tl.map_cells` for the methods, weights and further options; carry reference
        features into space with :func:`rmge.tl.transfer_features` or :func:`rmge.tl.transfer_obs`.

        Parameters
        ----------
        adata
            AnnData with reference and spatial cells; ``None`` uses the set-up AnnData.
        k
            Reference partners per spatial cell.
        method
            ``"nndescent"`` (approximate for large types, exact for small ones), ``"exact"`` or ``"ot"``.
        metric
            Distance in metagene space.
        **kwargs
            Passed to :func:`rmge.tl.map_cells`.

        Returns
        -------
        :class:`rmge.tl.CellPairing` with ``.table`` (one row per pair) and ``.weights`` (spatial × reference).
        """
        from rmge.tl import map_cells

        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        is_ref = (adata.obs[_DOMAIN_COL] == _REFERENCE).to_numpy()
        return map_cells(
            self.get_latent_representation(adata),
            adata.obs[_LABELS_COL].astype(str).to_numpy(),
            is_ref,
            predicted=self.predict(adata),
            cell_names=adata.obs_names,
            k=k,
            method=method,
            metric=metric,
            **kwargs,
        )

    # ------------------------------------------------------------------ persistence
    def save(
        self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False, **kwargs
    ):
        """Save the model (scvi-tools format) atomically.

        The model is written into a temporary folder beside ``dir_path`` and moved into place only
        when complete, so a failed save leaves an earlier model at ``dir_path`` intact.

        Parameters
        ----------
        dir_path
            Folder to write.
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing folder.
        save_anndata
            Also write the AnnData.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save`.
        """
        dir_path = os.path.abspath(dir_path)
        if os.path.exists(dir_path) and not overwrite:
            raise ValueError(f"{dir_path} already exists. Pass overwrite=True to replace it, or choose another folder.")
        parent = os.path.dirname(dir_path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".rmge-save-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes an owner-only folder; give it the usual permissions
        try:
            super().save(tmp, prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(dir_path):
            backup = tempfile.mkdtemp(prefix=".rmge-old-", dir=parent)
            os.rmdir(backup)
            os.replace(dir_path, backup)
            os.replace(tmp, dir_path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, dir_path)

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, prefix: str | None = None, **kwargs):
        """Load a saved model; the AnnData must have the model's genes in the same order.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData to attach; ``None`` loads the AnnData saved with the model.
        prefix
            Prefix of the file names.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (e.g. ``accelerator``, ``device``).
        """
        if adata is not None:
            path = os.path.join(dir_path, f"{prefix or ''}model.pt")
            if not os.path.exists(path):
                raise FileNotFoundError(f"No saved model at {path}. Save one with model.save({dir_path!r}).")
            saved = torch.load(path, map_location="cpu", weights_only=False)
            var_names = np.asarray(saved["var_names"]).astype(str)
            data_genes = np.asarray(adata.var_names).astype(str)
            if not np.array_equal(var_names, data_genes):
                raise ValueError(cls._gene_mismatch_message(var_names, data_genes))
        return super().load(dir_path, adata=adata, prefix=prefix, **kwargs)
