"""The RMGE module: linear metagene encoder/decoder, sparsity matching and adversarial alignment."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from rmge._constants import REGISTRY_KEYS

from ._kernels import cosine_inputs, thin_counts

#: Size of the quantile tables used to match reference depth to spatial depth by rank.
N_QUANTILES = 1001
#: Number of quantiles kept of each class's reference library sizes.
N_CLASS_QUANTILES = 101
#: Default scale of ``normalize_total`` before ``log1p`` (see ``RMGEModel(target_sum=...)``).
TARGET_SUM = 1e4
#: Default magnitude standardised values are clipped to (as ``sc.pp.scale(max_value=...)``); see
#: ``RMGEModel(max_value=...)`` for the automatic choice.
MAX_Z = 10.0
#: Minibatch entry holding the output of :meth:`RMGEModule.compiled_inputs`, computed ahead by the loader.
PREPARED_KEY = "rmge_prepared"


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    """``F.softmax(z, dim=-1)`` of a matrix of cells x types.

    On CPU it is taken over the first dimension of the transposed view: PyTorch's CPU softmax over a short
    last dimension loops over the rows one by one, and took 5 times as long for 512 cells x 13 types
    (2.3 times with its gradient). Same values (the same max-shifted exponentials).
    """
    if z.device.type == "cpu" and z.dim() == 2:
        return torch.softmax(z.t(), dim=0).t()
    return F.softmax(z, dim=-1)


def cross_entropy_rows(z: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.cross_entropy(z, target, **kwargs)`` of logits of cells x types (see :func:`softmax_rows`).

    On CPU the logits are passed as one sample of types x cells (PyTorch's form for losses over extra
    dimensions), whose log-softmax runs across cells: 4 times faster for 512 cells x 13 types. The same loss
    for every ``reduction``, ``weight`` and ``label_smoothing``.
    """
    if z.device.type == "cpu" and z.dim() == 2:
        loss = F.cross_entropy(z.t().unsqueeze(0), target.unsqueeze(0), **kwargs)
        return loss.squeeze(0) if kwargs.get("reduction") == "none" else loss
    return F.cross_entropy(z, target, **kwargs)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` divided by their Euclidean norm (norms below ``1e-8`` count as ``1e-8``)."""
    return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (cells × genes times rows × genes), with the rows of ``w`` padded to a multiple of 8.

    Matrix products whose narrow side is a multiple of 8 run on whole SIMD registers: with 30 types and
    2,000 genes the padded product and its weight gradient take about 30 % less time on a CPU (AVX2). The
    padding rows are zeros and their columns are dropped, so values and gradients are unchanged.
    """
    pad = -w.shape[0] % 8
    if pad:
        w = nn.functional.pad(w, (0, 0, 0, pad))
    out = x @ w.T
    return out[:, : out.shape[1] - pad] if pad else out


def _domain_rows(is_query: torch.Tensor) -> tuple[slice | torch.Tensor, slice | torch.Tensor, int, int]:
    """Rows of the reference and of the spatial cells of a minibatch, and their numbers.

    Slices when the reference cells come first (as in every training minibatch): indexing with them
    makes views, and neither direction of the pass then searches a mask. Boolean masks otherwise.
    """
    n = is_query.shape[0]
    n_query = int(is_query.sum())
    n_ref = n - n_query
    if n_ref == 0 or n_query == 0 or not bool(is_query[:n_ref].any()):
        return slice(0, n_ref), slice(n_ref, n), n_ref, n_query
    return ~is_query, is_query, n_ref, n_query


class Discriminator(nn.Module):
    """Small MLP that tells reference from spatial cells by their class-probability vectors."""

    def __init__(self, n_input: int, n_hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_input, n_hidden), nn.LeakyReLU(0.2), nn.Linear(n_hidden, 1))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """Logit of "this cell comes from the reference"."""
        return self.net(p).squeeze(-1)


class RMGEModule(BaseModuleClass):
    """Linear metagene autoencoder with sparsity matching and an adversarial domain discriminator.

    The encoder maps standardised log expression (genes) to one activity per cell type: row ``k`` of
    its weight matrix is the metagene of type ``k``, and the activities are the class logits. A
    linear decoder reconstructs the standardised expression from the activities.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of reference cell types.
    n_groups
        Number of standardisation groups (domain, or domain × section).
    group_is_reference
        Boolean per group: whether it holds reference cells.
    group_mean, group_std
        Per-group gene means and standard deviations of ``log1p(normalize_total(x, target_sum))``
        (``n_groups × n_input``), used for per-domain standardisation.
    gene_factor
        Per-gene capture factor of the spatial platform relative to the reference (mean 1).
    ref_lib_quantiles, spatial_lib_quantiles
        Quantiles of the reference and spatial library sizes (``N_QUANTILES`` values each).
    class_lib_quantiles
        Quantiles of each class's reference library sizes (``n_labels × N_CLASS_QUANTILES``; NaN for a
        class without cells), the depth evidence of spatial cells without counts; ``None``: unknown.
    class_weights
        Weight of each class in the cross-entropy (``n_labels``).
    prior
        Prior composition of the spatial cells (``n_labels``, sums to 1).
    dropout_rate
        Input dropout of the encoder.
    standardize
        Standardise each gene within each group; if ``False``, ``log1p(normalize_total)`` values are used.
    sparsity_matching
        Thin reference counts to the spatial depth and capture during training.
    rank_jitter
        Half-width of the uniform jitter added to a reference cell's depth rank at each draw.
    classification_weight, reconstruction_weight, l2_weight, kl_weight
        Weights of the loss terms.
    adversarial_weight, entropy_weight, pseudo_label_weight
        Weights of the loss terms.
    entropy_on
        ``"spatial"`` (sharpen spatial predictions) or ``"reference"`` (as the original method).
    reconstruct
        Which cells the decoder reconstructs: ``"reference"`` or ``"both"``.
    adversarial_target
        ``"half"`` (encoder pushes the discriminator to 0.5 on both domains, as the original) or
        ``"flip"`` (encoder makes spatial cells look like reference cells).
    pseudo_label_fraction
        Fraction of each predicted class's spatial cells (the most confident, by margin between the two
        best classes) used as pseudo-labels in each minibatch. Selecting per class keeps rare types from
        being swamped by abundant ones.
    pseudo_label_agreement
        Keep a pseudo-label only where the initial metagenes (e.g. reference centroids, kept frozen)
        predict the same type. Guards against adaptation drifting a whole class into another.
    classifier
        ``"cosine"``: activities are the scaled cosine similarity between the cell's centred,
        standardised profile and each metagene (a correlation classifier, robust to depth and platform
        shifts); ``"linear"``: a plain linear layer with bias (the original method).
    init_metagenes
        Initial metagenes (``n_labels × n_input``), e.g. the standardised reference class centroids;
        ``None`` keeps PyTorch's random initialisation.
    centroids
        Standardised reference class centroids (``n_labels × n_input``), kept for the novelty score
        (:meth:`rmge.RMGEModel.novelty_score`); ``None`` uses the initial metagenes.
    label_smoothing
        Label smoothing of the reference cross-entropy.
    count_evidence
        Add the count likelihood of each type's reference profile to the activities of spatial cells at
        prediction (see :meth:`rmge.RMGEModel.calibrate`, which fits the profiles). Meant for counts on
        both sides.
    target_sum
        Total each cell's counts are scaled to before ``log1p`` (``normalize_total``); kept with the model
        (a buffer), since the standardisation statistics are computed with it.
    max_value
        Magnitude the standardised values are clipped to (``sc.pp.scale(max_value=...)``); kept with the
        model (a buffer).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_groups: int,
        group_is_reference: torch.Tensor,
        group_mean: torch.Tensor,
        group_std: torch.Tensor,
        gene_factor: torch.Tensor,
        ref_lib_quantiles: torch.Tensor,
        spatial_lib_quantiles: torch.Tensor,
        class_weights: torch.Tensor,
        prior: torch.Tensor | None,
        dropout_rate: float = 0.5,
        standardize: bool = True,
        class_lib_quantiles: torch.Tensor | None = None,
        sparsity_matching: bool = True,
        rank_jitter: float = 0.05,
        classification_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 0.0,
        adversarial_weight: float = 0.1,
        entropy_weight: float = 0.1,
        pseudo_label_weight: float = 1.0,
        entropy_on: str = "spatial",
        reconstruct: str = "both",
        adversarial_target: str = "half",
        pseudo_label_fraction: float = 0.7,
        label_smoothing: float = 0.0,
        classifier: str = "cosine",
        init_metagenes: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
        init_scale: float = 10.0,
        pseudo_label_agreement: bool = True,
        n_hidden_discriminator: int = 32,
        count_evidence: bool = False,
        target_sum: float = TARGET_SUM,
        max_value: float = MAX_Z,
    ):
        super().__init__()
        if not (np.isfinite(target_sum) and target_sum > 0):
            raise ValueError(f"`target_sum` must be a positive number, got {target_sum!r}.")
        if not (np.isfinite(max_value) and max_value > 0):
            raise ValueError(f"`max_value` must be a positive number, got {max_value!r}.")
        self.register_buffer("target_sum", torch.tensor([float(target_sum)]))
        self.register_buffer("max_value", torch.tensor([float(max_value)]))
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_groups = n_groups
        self.standardize = standardize
        self.sparsity_matching = sparsity_matching
        self.rank_jitter = rank_jitter
        self.classification_weight = classification_weight
        self.reconstruction_weight = reconstruction_weight
        self.l2_weight = l2_weight
        self.kl_weight = kl_weight
        self.adversarial_weight = adversarial_weight
        self.entropy_weight = entropy_weight
        self.pseudo_label_weight = pseudo_label_weight
        self.entropy_on = entropy_on
        self.reconstruct = reconstruct
        self.adversarial_target = adversarial_target
        self.pseudo_label_fraction = pseudo_label_fraction
        self.classifier = classifier
        self.label_smoothing = label_smoothing

        self.register_buffer("group_is_reference", torch.as_tensor(group_is_reference, dtype=torch.bool))
        self.register_buffer("group_mean", torch.as_tensor(group_mean, dtype=torch.float32))
        self.register_buffer("group_std", torch.as_tensor(group_std, dtype=torch.float32))
        self.register_buffer("gene_factor", torch.as_tensor(gene_factor, dtype=torch.float32))
        self.register_buffer("ref_lib_quantiles", torch.as_tensor(ref_lib_quantiles, dtype=torch.float32))
        self.register_buffer("spatial_lib_quantiles", torch.as_tensor(spatial_lib_quantiles, dtype=torch.float32))
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32))
        if class_lib_quantiles is None:
            class_lib_quantiles = torch.full((n_labels, N_CLASS_QUANTILES), float("nan"))
        self.register_buffer("class_lib_quantiles", torch.as_tensor(class_lib_quantiles, dtype=torch.float32))
        has_prior = prior is not None
        self.register_buffer(
            "prior",
            torch.as_tensor(prior if has_prior else torch.full((n_labels,), 1.0 / n_labels), dtype=torch.float32),
        )
        if not has_prior:
            self.kl_weight = 0.0

        self.dropout = nn.Dropout(p=dropout_rate)
        self.encoder = nn.Linear(n_input, n_labels, bias=classifier == "linear")
        self.pseudo_label_agreement = pseudo_label_agreement and init_metagenes is not None
        if init_metagenes is not None:
            with torch.no_grad():
                w = torch.as_tensor(init_metagenes, dtype=torch.float32)
                self.encoder.weight.copy_(unit_rows(w))
        # post-hoc temperatures fitted on held-out reference cells (1 until calibrated): one for
        # spatial cells (fitted on reference cells thinned to the spatial depth), one for reference cells
        self.register_buffer("calibration_temperature", torch.ones(1))
        # count evidence (fitted by RMGEModel.calibrate when count_evidence is on): log of each type's
        # reference expression profile at the spatial capture, the depth that caps a cell's evidence
        # (0: no evidence yet) and the temperature of the combined spatial logits
        self.count_evidence = count_evidence
        self.register_buffer("count_log_profiles", torch.zeros(n_labels, n_input))
        self.register_buffer("count_depth", torch.zeros(1))
        self.register_buffer("count_temperature", torch.ones(1))
        self.register_buffer("reference_calibration_temperature", torch.ones(1))
        # frozen copy of the initial metagenes (used by pseudo_label_agreement)
        self.register_buffer("init_weight", self.encoder.weight.detach().clone())
        # standardised reference class centroids, unit norm (used by the novelty score)
        c = self.init_weight if centroids is None else torch.as_tensor(centroids, dtype=torch.float32)
        self.register_buffer("centroids", unit_rows(c))
        # log of the scale of cosine activities
        self.log_scale = nn.Parameter(torch.tensor([math.log(init_scale)]), requires_grad=classifier == "cosine")
        self.decoder = nn.Linear(n_labels, n_input)
        # log of the temperature dividing spatial logits before the discriminator and in probabilities
        self.log_temperature = nn.Parameter(torch.zeros(1))
        self.discriminator = Discriminator(n_labels, n_hidden_discriminator)

    # ------------------------------------------------------------------ preprocessing
    def thin(self, x: torch.Tensor) -> torch.Tensor:
        """Binomially thin reference counts to the spatial depth and per-gene capture.

        Each cell's target depth is the spatial library size at the same rank (quantile) as the
        cell's own library size among reference cells, with a small random jitter of the rank;
        each gene's retention is scaled by its capture factor. Retention probabilities are capped
        at 1 (the reference is never made deeper). Drawn afresh at every call.

        On CPU the binomial draws run in a compiled kernel that skips zero counts (sums of Bernoulli
        trials for counts up to 16, the first eight against 16-bit uniforms, inversion of the cumulative
        distribution above; seeded from torch's generator; see :func:`rmge.model._kernels.thin_counts`);
        elsewhere :func:`torch.binomial` draws them.
        """
        return thin_counts(x, self._thin_scale(x), self.gene_factor)

    def _thin_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell retention scale of :meth:`thin` (target depth over the factor-weighted library size)."""
        lib = x.sum(-1)
        rq = self.ref_lib_quantiles
        sq = self.spatial_lib_quantiles
        nq = rq.shape[0]
        rank = torch.searchsorted(rq.contiguous(), lib.contiguous(), right=True).float() / nq
        rank = rank + (torch.rand_like(rank) * 2 - 1) * self.rank_jitter
        pos = rank.clamp(0, 1) * (nq - 1)
        lo = pos.floor().long().clamp(0, nq - 1)
        hi = (lo + 1).clamp(max=nq - 1)
        frac = pos - lo.float()
        target = sq[lo] * (1 - frac) + sq[hi] * frac
        weighted_lib = x @ self.gene_factor
        return target / weighted_lib.clamp(min=1e-8)

    def normalize(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """``log1p(normalize_total(x, target_sum))``, then standardisation within the cell's group."""
        lib = x.sum(-1, keepdim=True)
        # cells thinned to zero give zeros, never NaN; x * scale is a new tensor, so in-place ops below are safe
        out = torch.log1p_(x * (self.target_sum / lib.clamp(min=1.0)))
        if self.standardize:
            g = group.view(-1).long()
            inv_std = 1.0 / self.group_std
            if out.device.type == "cpu" and not out.requires_grad:
                # rows of one group usually come in a few runs (reference, then spatial): broadcasting each
                # group's statistics over its run avoids materialising two cells x genes gathers
                values, counts = torch.unique_consecutive(g, return_counts=True)
                if len(values) <= 8:
                    start = 0
                    for gi, c in zip(values.tolist(), counts.tolist(), strict=True):
                        out[start : start + c].sub_(self.group_mean[gi]).mul_(inv_std[gi])
                        start += c
                    return out.clamp_(-self.max_value, self.max_value)
            out = (out - self.group_mean[g]).mul_(inv_std[g])
            out = out.clamp_(-self.max_value, self.max_value)
        return out

    # ------------------------------------------------------------------ scvi-tools contract
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "group": tensors[REGISTRY_KEYS.BATCH_KEY],
        }
        if PREPARED_KEY in tensors:
            out["prepared"] = tensors[PREPARED_KEY]
        return out

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, torch.Tensor]:
        return {"z": inference_outputs["z"]}

    def encode(self, x_norm: torch.Tensor, dropout: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Metagene activities of normalised profiles (input dropout applies in training mode).

        ``weight`` replaces the encoder's metagenes (e.g. the frozen initial ones).
        """
        x = self.dropout(x_norm) if dropout else x_norm
        if self.classifier == "linear":
            return nn.functional.linear(x, self.encoder.weight if weight is None else weight, self.encoder.bias)
        x = x - x.mean(-1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        w = self.encoder.weight if weight is None else weight
        return self.log_scale.exp() * (x @ unit_rows(w).T)

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        thin: bool = False,
        clean: bool | None = None,
        prepared: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Metagene activities (class logits) of a minibatch.

        Parameters
        ----------
        x
            Counts (cells × genes).
        group
            Standardisation group of each cell.
        thin
            Apply sparsity matching to the reference cells of the minibatch (training only).
        clean
            Also compute the activities without dropout that choose the pseudo-labels (``z_clean``, and
            ``label_init`` with ``pseudo_label_agreement``). ``None``: when thinning in training mode with a
            positive ``pseudo_label_weight``; the training plan passes ``False`` while the pseudo-labels'
            weight is still zero.
        prepared
            The output of :meth:`compiled_inputs` for this minibatch, computed ahead (the training loader
            computes it in a background thread); used where it was made with the same settings.
        """
        x = x.float()
        g = group.view(-1).long()
        want_clean = thin and self.training and self.pseudo_label_weight > 0
        if clean is not None:
            want_clean = want_clean and clean
        if self.classifier == "cosine" and x.device.type == "cpu" and x.dim() == 2 and not x.requires_grad:
            p = float(self.dropout.p) if self.training else 0.0
            usable = (
                prepared is not None
                and prepared["dropout"] == p
                and prepared["thin"] == thin
                and (prepared["clean"] or not want_clean)
                and prepared["x_norm"].shape == x.shape
            )
            if not usable:
                prepared = self.compiled_inputs(x, g, thin=thin, training=self.training, clean=want_clean)
            return self._cosine_activities(prepared, want_clean)
        is_ref = self.group_is_reference[g] if thin and self.sparsity_matching else None
        if is_ref is not None and bool(is_ref.any()):
            # a new tensor: the reference rows thinned, the others copied
            x = thin_counts(x, self._thin_scale(x), self.gene_factor, rows=is_ref)
        x_norm = self.normalize(x, g)
        out = {"z": self.encode(x_norm), "x_norm": x_norm}
        if want_clean:
            # predictions without dropout choose the pseudo-labels
            with torch.no_grad():
                out["z_clean"] = self.encode(x_norm, dropout=False)
                if self.pseudo_label_agreement:
                    out["label_init"] = self.encode(x_norm, dropout=False, weight=self.init_weight).argmax(-1)
        return out

    def compiled_inputs(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        thin: bool,
        training: bool,
        clean: bool,
        seed: int | None = None,
        defer: bool = False,
    ):
        """The input side of the cosine classifier for a CPU minibatch, in one compiled pass.

        Thinning of the reference rows (``thin``; the depth-matched scale of :meth:`thin`, computed in the
        pass), normalisation, standardisation, input dropout (``training``) and the centred unit-norm
        profiles (see :func:`rmge.model._kernels.cosine_inputs`); with ``clean``, the profiles without
        dropout of the spatial rows too. Reads only the module's fixed statistics and, given a ``seed``,
        not torch's generator. With ``defer``, returns a function of no arguments that runs the compiled
        pass and returns the result: the training loader allocates in its own thread and runs that function
        one minibatch ahead in a background thread.
        """
        g = group.view(-1)
        g_np = g.numpy().astype(np.int64, copy=False)
        is_ref = self.group_is_reference.numpy()[g_np]
        thin_scale = None
        if thin and self.sparsity_matching and is_ref.any():
            # a negative scale: the pass computes the depth-matched scale of the row
            thin_scale = torch.from_numpy(np.where(is_ref, -1.0, 0.0))
        p = float(self.dropout.p) if training else 0.0
        # pseudo-labels are chosen among spatial cells only: the profiles without dropout are needed there alone
        rows = torch.from_numpy(~is_ref) if clean else None
        run = cosine_inputs(
            x,
            g,
            self.group_mean,
            1.0 / self.group_std,
            standardize=self.standardize,
            dropout=p,
            clean=False if rows is None else rows,
            thin_scale=thin_scale,
            factor=self.gene_factor,
            depth=(self.ref_lib_quantiles, self.spatial_lib_quantiles, self.rank_jitter),
            seed=seed,
            target_sum=float(self.target_sum),
            max_value=float(self.max_value),
            defer=True,
        )

        def finish() -> dict:
            x_norm, x_drop, x_clean, x_sq = run()
            return {
                "x_norm": x_norm,
                "x_drop": x_drop,
                "x_clean": x_clean,
                "x_sq": x_sq,
                "clean_rows": rows,
                "dropout": p,
                "thin": thin,
                "clean": rows is not None,
            }

        return finish if defer else finish()

    def _cosine_activities(self, prepared: dict, want_clean: bool) -> dict[str, torch.Tensor]:
        """Activities of the cosine classifier from the output of :meth:`compiled_inputs`.

        Same result as the tensor operations of :meth:`normalize` and :meth:`encode` (up to float
        rounding and the dropout mask's draws); the encoder with dropout and, for the pseudo-labels, the
        current and the frozen initial metagenes without it take one matrix product each.
        """
        x_norm, x_drop, x_clean = prepared["x_norm"], prepared["x_drop"], prepared["x_clean"]
        w = unit_rows(self.encoder.weight)
        scale = self.log_scale.exp()
        z = scale * project(x_clean if x_drop is None else x_drop, w)
        out = {"z": z, "x_norm": x_norm, "x_sq": prepared["x_sq"]}
        rows = prepared["clean_rows"]
        if want_clean and rows is not None:
            with torch.no_grad():
                # reference rows keep their activities with dropout (never read as pseudo-labels)
                z_clean = z.detach().clone()
                k = self.n_labels
                # without dropout the pass gives every row's clean profile; else the spatial rows' alone
                x_rows = x_clean if x_drop is not None else x_clean[rows]
                if self.pseudo_label_agreement:
                    # the current and the frozen initial metagenes in one product
                    both = x_rows @ self._clean_weights(w.detach()).T
                    z_clean[rows] = scale.detach() * both[:, :k]
                    label_init = torch.full((x_norm.shape[0],), -1, dtype=torch.long)
                    start = both.shape[1] // 2  # the initial metagenes' block (see _clean_weights)
                    label_init[rows] = both[:, start : start + k].argmax(-1)
                    out["label_init"] = label_init
                else:
                    z_clean[rows] = scale.detach() * project(x_rows, w.detach())
                out["z_clean"] = z_clean
        return out

    def _clean_weights(self, w: torch.Tensor) -> torch.Tensor:
        """The metagenes ``w`` and the frozen initial ones (unit rows), each padded to a multiple of 8 rows.

        One buffer kept across training steps: the initial metagenes' rows are written when
        ``init_weight`` changes, the current metagenes' rows at every call (building the matrix afresh
        at every step took longer than the product with it).
        """
        k = self.n_labels
        k8 = k + (-k % 8)
        key = (self.init_weight.data_ptr(), self.init_weight._version, w.device, w.dtype)
        buf = getattr(self, "_clean_buffer", None)
        if buf is None or self._clean_key != key or buf.shape != (2 * k8, w.shape[1]):
            buf = w.new_zeros(2 * k8, w.shape[1])
            buf[k8 : k8 + k] = unit_rows(self.init_weight).to(buf)
            self._clean_buffer, self._clean_key = buf, key
        buf[:k] = w
        return buf

    @auto_move_data
    def generative(self, z: torch.Tensor, materialize: bool = True) -> dict[str, torch.Tensor]:
        """Linear reconstruction of the normalised expression from the metagene activities.

        With ``materialize=False`` (training) the reconstruction ``x_hat`` (cells × genes) is not formed:
        :meth:`loss` then computes the reconstruction error from ``z`` and the decoder's weights
        (:meth:`reconstruction_error`).
        """
        if not materialize:
            return {"z": z}
        return {"x_hat": self.decoder(z)}

    def reconstruction_error(
        self, z: torch.Tensor, x_norm: torch.Tensor, x_sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error per cell of the decoder's reconstruction, without forming it.

        With ``u = [z, 1]`` and ``V = [W, b]`` (the decoder's weights and bias), expands
        ``||V u - x||^2 = u'(V'V)u - 2 u'(V'x) + x'x``: the only product with the cells × genes profiles is
        ``x V`` (its gradient one more product), where the reconstruction itself would take three products
        and several element-wise passes over cells × genes, forward and backward. ``x_sq`` is ``x'x`` per
        cell when already known (the compiled pass gives it). Equal to
        ``((decoder(z) - x_norm) ** 2).mean(-1)`` up to float rounding.
        """
        v = torch.cat([self.decoder.weight.T, self.decoder.bias.unsqueeze(0)])  # (types + 1) x genes
        u = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
        quad = ((u @ (v @ v.T)) * u).sum(-1)
        cross = (u * project(x_norm, v)).sum(-1)
        xx = torch.linalg.vector_norm(x_norm, dim=-1).square() if x_sq is None else x_sq
        # the expansion cancels large terms: rounding may leave a tiny negative error, which is zero
        return (quad - 2 * cross + xx).clamp(min=0.0) / x_norm.shape[-1]

    @property
    def temperature(self) -> torch.Tensor:
        """Learned temperature of spatial logits."""
        return self.log_temperature.exp()

    @property
    def has_count_evidence(self) -> bool:
        """Whether predictions of spatial cells add the count evidence (on, and fitted)."""
        return bool(self.count_evidence) and float(self.count_depth) > 0

    def count_log_likelihood(self, x) -> torch.Tensor:
        """Count evidence of each type for cells of counts ``x`` (a tensor, or a SciPy sparse matrix).

        The multinomial log-likelihood of the cell's counts under each type's profile,
        ``sum_g x_g log p_type,g``, scaled by ``min(1, count_depth / depth)``: a cell deeper than
        ``count_depth`` counts as that deep, since a type's cells differ from its mean profile and
        the evidence of independent counts would grow without bound with depth.
        Each row is shifted by its largest value (softmax does not see it), so that deep cells keep the
        precision of single floats.
        """
        log_p = self.count_log_profiles
        if isinstance(x, torch.Tensor):
            x = x.double().to(log_p.device)
            ll, depth = x @ log_p.double().T, x.sum(-1)
        else:
            ll = torch.from_numpy(np.asarray(x @ log_p.double().cpu().numpy().T, dtype=np.float64))
            depth = torch.from_numpy(np.asarray(x.sum(axis=1), dtype=np.float64).reshape(-1))
            ll, depth = ll.to(log_p.device), depth.to(log_p.device)
        if ll.shape[0]:
            ll = ll - ll.max(-1, keepdim=True).values
        scale = (self.count_depth.double() / depth.clamp(min=1e-8)).clamp(max=1.0)
        return (ll * scale.view(-1, 1)).float()

    def spatial_logits(self, z: torch.Tensor, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated logits of spatial cells.

        The activities over the spatial calibration temperature, plus the count evidence (when fitted),
        over the evidence's own temperature.
        """
        logits = z / self.calibration_temperature
        if evidence is not None and self.has_count_evidence:
            logits = (logits + evidence) / self.count_temperature
        return logits

    def probabilities(
        self,
        z: torch.Tensor,
        is_query: torch.Tensor | None = None,
        calibrated: bool = False,
        evidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class probabilities; spatial (query) logits are divided by the learned temperature.

        With ``calibrated=True`` the learned temperature is not applied; logits are instead divided by
        the calibration temperature fitted after training (:meth:`rmge.RMGEModel.calibrate`): the
        reference one for reference cells, the spatial one for spatial cells (and for every cell
        when ``is_query`` is ``None``). Spatial cells' ``evidence`` (:meth:`count_log_likelihood`),
        when given and fitted, is added to their logits (:meth:`spatial_logits`).
        """
        if calibrated:
            spatial = self.spatial_logits(z, evidence)
            if is_query is None:
                return softmax_rows(spatial)
            reference = z / self.reference_calibration_temperature
            return softmax_rows(torch.where(is_query.view(-1, 1), spatial, reference))
        if is_query is not None:
            scale = torch.where(is_query.view(-1, 1), 1.0 / self.temperature, torch.ones_like(self.temperature))
            z = z * scale
        return softmax_rows(z)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before these buffers existed: one temperature for both domains; centroids
        # from the initial metagenes
        key = prefix + "reference_calibration_temperature"
        if key not in state_dict and prefix + "calibration_temperature" in state_dict:
            state_dict[key] = state_dict[prefix + "calibration_temperature"].clone()
        for name in ("count_log_profiles", "count_depth", "count_temperature"):
            # models saved before count evidence: none (depth 0)
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
        if prefix + "target_sum" not in state_dict:
            # models saved before the target sum was a setting: their statistics assume 10,000
            state_dict[prefix + "target_sum"] = torch.full_like(self.target_sum, TARGET_SUM)
        if prefix + "max_value" not in state_dict:
            # models saved before the clip was a setting: their profiles were clipped at 10
            state_dict[prefix + "max_value"] = torch.full_like(self.max_value, MAX_Z)
        if prefix + "class_lib_quantiles" not in state_dict:
            # unknown: cells without counts get the spatial composition
            state_dict[prefix + "class_lib_quantiles"] = torch.full_like(self.class_lib_quantiles, float("nan"))
        if prefix + "centroids" not in state_dict and prefix + "init_weight" in state_dict:
            w = state_dict[prefix + "init_weight"]
            state_dict[prefix + "centroids"] = unit_rows(w)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        pseudo_label_weight: float | None = None,
        adversarial_weight: float | None = None,
    ) -> LossOutput:
        """All loss terms of the encoder/decoder (the discriminator's own loss is separate).

        Parameters
        ----------
        tensors
            Minibatch holding reference and spatial cells.
        inference_outputs, generative_outputs
            Outputs of :meth:`inference` and :meth:`generative`.
        pseudo_label_weight
            Weight of the pseudo-label term for this step (ramped up by the training plan).
        adversarial_weight
            Weight of the adversarial term for this step (``None``: the module's; the training plan passes 0
            during the adversarial warm-up). The term's value is computed and logged either way.
        """
        z = inference_outputs["z"]
        x_norm = inference_outputs["x_norm"]
        x_hat = generative_outputs.get("x_hat")
        is_query = tensors[REGISTRY_KEYS.DOMAIN_KEY].view(-1).long() == 1
        ref, query, n_ref, n_query = _domain_rows(is_query)
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        zero = z.new_zeros(())
        probs = self.probabilities(z, is_query)

        # reference classification
        if n_ref > 0:
            z_ref, labels_ref = z[ref], labels[ref]
            ce = cross_entropy_rows(z_ref, labels_ref, weight=self.class_weights, label_smoothing=self.label_smoothing)
            accuracy = (z_ref.detach().argmax(-1) == labels_ref).float().mean()
        else:
            ce, accuracy = zero, zero

        # reconstruction
        if x_hat is None:
            rec_per_cell = self.reconstruction_error(z, x_norm, inference_outputs.get("x_sq"))
        else:
            rec_per_cell = ((x_hat - x_norm) ** 2).mean(-1)
        if self.reconstruct == "reference":
            rec = rec_per_cell[ref].mean() if n_ref > 0 else zero
        else:
            rec = rec_per_cell.mean()

        # weight penalty (sum of squared weights, as the original)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.l2_weight > 0):
            l2 = self.encoder.weight.pow(2).sum() + self.decoder.weight.pow(2).sum()

        # composition prior on spatial cells
        if n_query > 0 and self.kl_weight > 0:
            pbar = probs[query].mean(0).clamp(min=1e-8)
            kl = (pbar * (pbar.log() - self.prior.clamp(min=1e-8).log())).sum()
        else:
            kl = zero

        # entropy (of untempered logits: the temperature is shaped by the adversary alone)
        ent_rows, n_ent = (query, n_query) if self.entropy_on == "spatial" else (ref, n_ref)
        if n_ent > 0:
            p = softmax_rows(z[ent_rows])
            entropy = -(p * p.clamp(min=1e-8).log()).sum(-1).mean()
        else:
            entropy = zero

        # adversarial: the encoder tries to make both domains indistinguishable
        w_adv = self.adversarial_weight if adversarial_weight is None else adversarial_weight
        if n_query > 0 and n_ref > 0 and self.adversarial_weight > 0:
            d = self.discriminator(probs)
            if self.adversarial_target == "half":
                adv = F.binary_cross_entropy_with_logits(d, torch.full_like(d, 0.5))
            else:
                d_query = d[query]
                adv = F.binary_cross_entropy_with_logits(d_query, torch.ones_like(d_query))
        else:
            adv = zero

        # pseudo-labels: the most confident spatial cells of each predicted class
        w_pl = self.pseudo_label_weight if pseudo_label_weight is None else pseudo_label_weight
        if n_query > 0 and w_pl > 0:
            z_sel = inference_outputs.get("z_clean", z).detach()[query]
            keep, pl = self.select_pseudo_labels(self.probabilities(z_sel, is_query[query]))
            if "label_init" in inference_outputs:
                keep = keep & (inference_outputs["label_init"][query] == pl)
            if bool(keep.any()):
                pseudo = (
                    cross_entropy_rows(z[query][keep], pl[keep], weight=self.class_weights, reduction="sum") / n_query
                )
            else:
                pseudo = zero
        else:
            pseudo = zero

        loss = (
            self.classification_weight * ce
            + self.reconstruction_weight * rec
            + self.l2_weight * l2
            + self.kl_weight * kl
            + w_adv * adv
            + self.entropy_weight * entropy
            + w_pl * pseudo
        )
        extra = {
            "classification_loss": ce.detach(),
            "reconstruction_loss": rec.detach(),
            "l2_penalty": l2.detach(),
            "kl_prior": kl.detach(),
            "adversarial_loss": adv.detach(),
            "entropy": entropy.detach(),
            "pseudo_label_loss": pseudo.detach(),
            "accuracy": accuracy.detach(),
            "temperature": self.temperature.detach().squeeze(),
        }
        return LossOutput(
            loss=loss,
            reconstruction_loss=rec_per_cell.detach(),
            n_obs_minibatch=z.shape[0],
            extra_metrics=extra,
        )

    def select_pseudo_labels(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick, within each predicted class, the ``pseudo_label_fraction`` most confident cells.

        Confidence is the margin between the two largest probabilities. Returns a boolean mask and
        the predicted labels.
        """
        top2 = probs.topk(min(2, probs.shape[1]), dim=-1).values
        margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
        labels = probs.argmax(-1)
        n = labels.shape[0]
        # rank of each cell's margin within its predicted class, without a Python loop over classes
        order = torch.argsort(labels.double() * 4.0 - margin.double())
        sorted_labels = labels[order]
        counts = torch.bincount(labels, minlength=probs.shape[1])
        starts = torch.cumsum(counts, 0) - counts
        rank_sorted = torch.arange(n, device=probs.device) - starts[sorted_labels]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        n_keep = torch.ceil(counts.double() * self.pseudo_label_fraction).long()
        keep = rank < n_keep[labels]
        return keep, labels

    def discriminator_loss(self, z: torch.Tensor, is_query: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the discriminator on detached class probabilities."""
        probs = self.probabilities(z.detach(), is_query).detach()
        d = self.discriminator(probs)
        target = (~is_query).float()
        return F.binary_cross_entropy_with_logits(d, target)

    @torch.inference_mode()
    def sample(self, *args, **kwargs):  # pragma: no cover - not a generative model of counts
        """Not available: RMGE does not model counts."""
        raise NotImplementedError("RMGE is a discriminative model; it cannot sample counts.")
