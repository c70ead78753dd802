"""Adversarial training plan of RMGE and a data module that puts both domains in every minibatch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning import LightningDataModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from scvi import settings
from scvi.train import TrainingPlan

from rmge._constants import REGISTRY_KEYS

from ._module import PREPARED_KEY

#: Minibatch entries that hold one integer code per cell.
_CODE_KEYS = (REGISTRY_KEYS.LABELS_KEY, REGISTRY_KEYS.DOMAIN_KEY, REGISTRY_KEYS.BATCH_KEY)


def _concat_batches(batch) -> dict[str, torch.Tensor]:
    """Join a list of minibatches (one per domain) into one; a single minibatch passes through."""
    if isinstance(batch, dict):
        return batch
    keys = batch[0].keys()
    return {k: torch.cat([b[k] for b in batch], dim=0) for k in keys}


def _to_csr_rows(X, rows: np.ndarray):
    """Rows of ``X`` (in-memory or backed, sparse or dense) as a CSR matrix or a dense array."""
    if sp.issparse(X) and X.format == "csr":
        return X[rows]
    if sp.issparse(X):
        return sp.csr_matrix(X[rows])
    if isinstance(X, np.ndarray):
        return X[rows]
    # on-disk datasets (anndata's sparse datasets, h5py) read increasing, unique indices: read those, then
    # put the rows back in the asked order
    uniq, inverse = np.unique(rows, return_inverse=True)
    sub = X[uniq]
    return sub[inverse] if sp.issparse(sub) else np.asarray(sub)[inverse]


class MinibatchSource:
    """Fetch minibatches of the registered data as tensors, without scvi-tools' per-key collation.

    Holds the registered count matrix (in memory or backed on disk, sparse or dense) and the
    per-cell codes (labels, domain, standardisation group). :meth:`fetch` reads the rows of a
    minibatch in one indexing call and turns them into a dense ``float32`` tensor.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    """

    def __init__(self, adata_manager):
        self.X = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self.codes = {
            key: torch.as_tensor(np.asarray(adata_manager.get_from_registry(key)).reshape(-1).astype(np.int64))
            for key in _CODE_KEYS
        }
        self.n_obs = self.X.shape[0]

    def dense(self, rows: np.ndarray) -> torch.Tensor:
        """Dense ``float32`` counts of ``rows`` (cells × genes)."""
        sub = _to_csr_rows(self.X, np.asarray(rows))
        arr = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def fetch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Minibatch of ``rows``: counts under ``X`` and codes of shape ``(n, 1)``, as scvi-tools loaders give."""
        rows = np.asarray(rows, dtype=np.int64)
        index = torch.from_numpy(rows)
        out = {REGISTRY_KEYS.X_KEY: self.dense(rows)}
        for key, codes in self.codes.items():
            out[key] = codes[index].unsqueeze(-1)
        return out


class _IndexStream:
    """Endless stream of minibatches of one index set: consecutive chunks of successive permutations.

    Every cell appears once per pass (the last chunk of a pass may be smaller). With ``num_replicas > 1``
    each replica takes every ``num_replicas``-th cell of a pass (the pass padded by repetition to a
    multiple of the replica count, as :class:`torch.utils.data.DistributedSampler`), so replicas see
    disjoint cells and take equally many steps.
    """

    def __init__(self, indices, batch_size, shuffle, rng, num_replicas=1, rank=0, group=None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = rng
        self.num_replicas = num_replicas
        self.rank = rank
        # order of rows inside a minibatch: by standardisation group, then row (contiguous groups and reads)
        self.group = group
        self._pass = np.zeros(0, dtype=np.int64)
        self._pos = 0

    @property
    def pass_length(self) -> int:
        """Cells of this replica per pass."""
        return int(np.ceil(len(self.indices) / self.num_replicas))

    @property
    def steps_per_pass(self) -> int:
        """Minibatches per pass."""
        return int(np.ceil(self.pass_length / self.batch_size))

    def _new_pass(self) -> None:
        idx = self.rng.permutation(self.indices) if self.shuffle else self.indices
        if self.num_replicas > 1:
            total = self.pass_length * self.num_replicas
            if total > len(idx):
                idx = np.concatenate([idx, idx[: total - len(idx)]])
            idx = idx[self.rank : total : self.num_replicas]
        self._pass = idx
        self._pos = 0

    def reset(self) -> None:
        """Start a new pass at the next minibatch."""
        self._pass = np.zeros(0, dtype=np.int64)
        self._pos = 0

    def next(self) -> np.ndarray:
        """Indices of the next minibatch."""
        if self._pos >= len(self._pass):
            self._new_pass()
        rows = self._pass[self._pos : self._pos + self.batch_size]
        self._pos += len(rows)
        if self.group is not None:
            return rows[np.lexsort((rows, self.group[rows]))]
        return np.sort(rows)


class PairedMinibatches:
    """Iterable of minibatches holding ``batch_size`` cells of each index set (reference, spatial).

    An epoch is a pass over the largest index set (the others are cycled through their own passes),
    or ``steps_per_epoch`` minibatches when given: a pass longer than that is then spread over
    consecutive epochs, which continue it where the previous epoch stopped.

    Parameters
    ----------
    source
        :class:`MinibatchSource` of the registered data.
    indices_list
        Index sets; every minibatch holds cells of each, in this order.
    batch_size
        Cells of each index set per minibatch.
    shuffle
        Draw a new random order for every pass (training) or keep the given order (validation).
    steps_per_epoch
        Minibatches per epoch; ``None``: one pass over the largest index set.
    seed
        Seed of the random orders.
    num_replicas, rank
        Data-parallel training: number of processes and this process's rank.
    prepare
        ``prepare(minibatch, seed)``: work to do on each minibatch before it is used (the module's compiled
        pass, :meth:`rmge.RMGEModule.compiled_inputs`), returned as a function of no arguments whose
        result is stored under ``PREPARED_KEY``. The next minibatch is then read, and ``prepare`` called
        (allocating its outputs), in this thread, and the function run in a background thread while the
        current minibatch is used (the compiled pass runs without the GIL, so a second core does it). Its
        seeds come from this loader's generator, so a run stays reproducible.
    """

    def __init__(
        self,
        source: MinibatchSource,
        indices_list: Sequence[np.ndarray],
        batch_size: int,
        shuffle: bool,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        prepare: Callable[[dict, int], Callable[[], dict]] | None = None,
    ):
        self.source = source
        self.prepare = prepare
        self._seed = seed
        self._seeds = np.random.default_rng([seed, 1])
        rng = np.random.default_rng(seed)
        group = source.codes[REGISTRY_KEYS.BATCH_KEY].numpy()
        self.streams = [
            _IndexStream(idx, batch_size, shuffle, rng, num_replicas, rank, group) for idx in indices_list if len(idx)
        ]
        full = max((s.steps_per_pass for s in self.streams), default=0)
        self.steps_per_pass = full
        self.steps_per_epoch = full if steps_per_epoch is None else max(1, min(int(steps_per_epoch), full))
        self.shuffle = shuffle

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for s in self.streams:
            # without shuffling (validation) every epoch sees the same minibatches; with it, an epoch that is
            # exactly one pass over the largest set starts that pass afresh
            if not self.shuffle or (self.steps_per_epoch == self.steps_per_pass == s.steps_per_pass):
                s.reset()
        if not self.shuffle:
            # validation: the same thinning and depth draws every time, so that successive validation losses
            # differ by the model's change, not by a new draw of the held-out cells' counts
            self._seeds = np.random.default_rng([self._seed, 1])
        if self.prepare is None:
            for _ in range(self.steps_per_epoch):
                yield self.source.fetch(self._next_rows())
            return
        # one minibatch ahead: the next is read here and prepared in the background while the current one is used
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmge-minibatches") as pool:
            pending = None
            for _ in range(self.steps_per_epoch):
                batch = self.source.fetch(self._next_rows())
                ahead = (batch, pool.submit(self.prepare(batch, int(self._seeds.integers(2**31 - 1)))))
                if pending is not None:
                    yield _finished(*pending)
                pending = ahead
            if pending is not None:
                yield _finished(*pending)

    def _next_rows(self) -> np.ndarray:
        return np.concatenate([s.next() for s in self.streams])


def _finished(batch: dict, job) -> dict:
    """The minibatch with the result of its preparation (waited for) under ``PREPARED_KEY``."""
    batch[PREPARED_KEY] = job.result()
    return batch


class RMGEDataSplitter(LightningDataModule):
    """Split reference cells into training and validation; pair each with spatial cells.

    Every training step yields ``batch_size`` reference cells and ``batch_size`` spatial cells
    (the smaller domain is cycled). Validation uses held-out reference cells (stratified by label)
    together with a random sample of spatial cells of the same size. Minibatches are read straight
    from the registered matrix (in memory or backed on disk) by :class:`MinibatchSource`.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    reference_indices, query_indices
        Row indices of the reference and spatial cells.
    labels
        Label code of every cell (used to stratify the split).
    validation_size
        Fraction of reference cells held out for validation (at least one per class with 2+ cells).
    batch_size
        Cells of each domain per step.
    shuffle_set_split
        Shuffle the reference cells before splitting.
    distributed_sampler
        Data-parallel training (DDP): each process takes its own share of every pass.
    steps_per_epoch
        Training steps per epoch; ``None``: one pass over the larger domain.
    max_validation_batches
        Validate on at most this many minibatches (the same random subset of the held-out cells at every
        validation); ``None``: all held-out cells. Calibration uses all of them either way.
    """

    def __init__(
        self,
        adata_manager,
        reference_indices: np.ndarray,
        query_indices: np.ndarray,
        labels: np.ndarray,
        validation_size: float = 0.1,
        batch_size: int = 256,
        shuffle_set_split: bool = True,
        distributed_sampler: bool = False,
        steps_per_epoch: int | None = None,
        max_validation_batches: int | None = None,
    ):
        super().__init__()
        self.adata_manager = adata_manager
        self.batch_size = batch_size
        self.distributed_sampler = distributed_sampler
        self.steps_per_epoch = steps_per_epoch
        self.max_validation_batches = max_validation_batches
        rng = np.random.default_rng(settings.seed)
        ref = np.asarray(reference_indices)
        val: list[int] = []
        if validation_size and validation_size > 0:
            for c in np.unique(labels[ref]):
                members = ref[labels[ref] == c]
                if shuffle_set_split:
                    members = rng.permutation(members)
                n_val = int(round(validation_size * len(members)))
                if len(members) >= 2:
                    n_val = min(max(n_val, 1), len(members) - 1)
                else:
                    n_val = 0
                val.extend(members[:n_val].tolist())
        val_idx = np.sort(np.asarray(val, dtype=int))
        train_idx = np.setdiff1d(ref, val_idx)
        self.train_idx = train_idx
        self.val_idx = val_idx
        self.test_idx = np.asarray([], dtype=int)
        self.query_idx = np.asarray(query_indices)
        n_q_val = min(len(self.query_idx), max(len(val_idx), 1))
        self.query_val_idx = np.sort(rng.choice(self.query_idx, size=n_q_val, replace=False))
        self.n_train = len(train_idx)
        self.n_val = len(val_idx)
        # seed of the minibatch orders, drawn from torch's global generator (set by scvi.settings.seed), so that
        # every process of a data-parallel run, which starts from the same seed, draws the same orders
        self._seed = int(torch.randint(0, 2**62, (1,)).item())
        self._source: MinibatchSource | None = None

    @property
    def source(self) -> MinibatchSource:
        """Minibatch source of the registered data (created on first use)."""
        if self._source is None:
            self._source = MinibatchSource(self.adata_manager)
        return self._source

    def _replicas(self) -> tuple[int, int]:
        if not self.distributed_sampler:
            return 1, 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _prepare(self, training: bool) -> Callable[[dict, int], Callable[[], dict]] | None:
        """The module's compiled pass for the loader to run ahead, where the module runs it (cosine, CPU)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(getattr(trainer, "lightning_module", None), "module", None)
        if module is None or not hasattr(module, "compiled_inputs") or module.classifier != "cosine":
            return None
        if trainer.strategy.root_device.type != "cpu":
            return None
        clean = training and module.pseudo_label_weight > 0

        def prepare(batch: dict, seed: int) -> Callable[[], dict]:
            x, group = batch[REGISTRY_KEYS.X_KEY], batch[REGISTRY_KEYS.BATCH_KEY]
            return module.compiled_inputs(x, group, thin=True, training=training, clean=clean, seed=seed, defer=True)

        return prepare

    def train_dataloader(self):
        """Loader of (reference, spatial) minibatch pairs."""
        replicas, rank = self._replicas()
        return PairedMinibatches(
            self.source,
            [self.train_idx, self.query_idx],
            self.batch_size,
            shuffle=True,
            steps_per_epoch=self.steps_per_epoch,
            seed=self._seed,
            num_replicas=replicas,
            rank=rank,
            prepare=self._prepare(training=True),
        )

    def val_dataloader(self):
        """Loader of held-out reference cells paired with spatial cells."""
        if self.n_val == 0:
            return []
        replicas, rank = self._replicas()
        val_idx, query_val_idx = self.val_idx, self.query_val_idx
        if self.max_validation_batches is not None:
            # a fixed random subset, so that successive validations compare like with like
            n = self.max_validation_batches * self.batch_size * replicas
            if len(val_idx) > n or len(query_val_idx) > n:
                rng = np.random.default_rng(self._seed)
                val_idx = np.sort(rng.permutation(val_idx)[:n])
                query_val_idx = np.sort(rng.permutation(query_val_idx)[:n])
        return PairedMinibatches(
            self.source,
            [val_idx, query_val_idx],
            self.batch_size,
            shuffle=False,
            num_replicas=replicas,
            rank=rank,
            prepare=self._prepare(training=False),
        )


#: Terms logged through ``LightningModule.log``: early stopping and the progress bar read them.
_MONITORED = ("train_loss", "validation_loss")


class WarmupValidationSchedule(Callback):
    """Validate every ``every`` epochs before epoch ``until``, then at every epoch.

    Early stopping ignores the validations of its warm-up (their losses are only logged), so they can be
    sparser: set as the warm-up's length in validations, ``until // every``, early stopping then sees
    exactly the validations, and takes exactly the decisions, of validating at every epoch. Lightning reads
    ``trainer.check_val_every_n_epoch`` at the end of each epoch.
    """

    def __init__(self, every: int, until: int):
        self.every = int(every)
        self.until = int(until)

    @property
    def warmup_validations(self) -> int:
        """Validations before epoch ``until``."""
        return self.until // self.every

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.check_val_every_n_epoch = self.every if trainer.current_epoch < self.until else 1


class HistoryLogger(Logger):
    """In-memory logger of the training metrics, read as ``model.history``.

    Keeps scvi-tools' layout of the history: one DataFrame per metric, indexed by ``epoch`` (or ``step``),
    with one column named after the metric; a time point logged again replaces the earlier value.
    scvi-tools' default logger writes each value with ``DataFrame.loc``, which enlarges a copy of the frame:
    on small data, about 20 terms an epoch over a hundred epochs of three steps, that took about a tenth of
    the training time. This logger appends to lists and builds the frames when the history is read.
    """

    def __init__(self):
        super().__init__()
        self._rows: dict[str, tuple[str, list, list]] = {}
        self._frames: dict[str, pd.DataFrame] = {}

    @property
    def name(self) -> str:
        return "rmge"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Hyperparameters are not recorded."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Append the values of one time point (``metrics["epoch"]``, ``metrics["step"]`` or ``step``)."""
        metrics = dict(metrics)
        if "step" in metrics:
            kind, point = "step", metrics.pop("step")
        elif "epoch" in metrics:
            kind, point = "epoch", metrics.pop("epoch")
        else:
            kind, point = "step", step
        point = point.item() if isinstance(point, torch.Tensor) else point
        for metric, value in metrics.items():
            row = self._rows.setdefault(metric, (kind, [], []))
            row[1].append(point)
            row[2].append(value.item() if isinstance(value, torch.Tensor) else value)
            self._frames.pop(metric, None)

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """One DataFrame per metric (index: time point; column: the metric)."""
        for metric, (kind, points, values) in self._rows.items():
            if metric not in self._frames:
                frame = pd.DataFrame({metric: values}, index=pd.Index(points, name=kind))
                self._frames[metric] = frame[~frame.index.duplicated(keep="last")]
        return dict(self._frames)


class RMGETrainingPlan(TrainingPlan):
    """Training plan with a second optimiser for the domain discriminator (manual optimisation).

    Loss terms are summed on the device at every step and logged once per epoch (their means over
    the epoch's cells), which keeps per-step overhead and host-device synchronisation low.

    Parameters
    ----------
    module
        An :class:`~rmge.RMGEModule`.
    lr
        Learning rate of the encoder, decoder and temperature (Adam).
    lr_discriminator
        Learning rate of the discriminator (Adam).
    weight_decay
        Weight decay of the model optimiser.
    pseudo_label_warmup
        Fraction of ``max_epochs`` before pseudo-labels enter the loss; their weight then ramps
        up linearly over the same number of epochs. Default 0: full weight from the first step, while
        the metagenes are still the reference centroids, the pseudo-labels' best teacher (a type the
        centroids find in the spatial data is kept, instead of being merged into another by the first
        epochs of training on the reference).
    adversarial_warmup
        Fraction of ``max_epochs`` before the adversarial term enters the loss.
    """

    def __init__(
        self,
        module,
        lr: float = 1e-2,
        lr_discriminator: float = 1e-3,
        weight_decay: float = 0.0,
        pseudo_label_warmup: float = 0.0,
        adversarial_warmup: float = 0.0,
        **kwargs,
    ):
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        self.lr_discriminator = lr_discriminator
        self.pseudo_label_warmup = pseudo_label_warmup
        self.adversarial_warmup = adversarial_warmup
        self.automatic_optimization = False
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "validation": {}}
        self._counts: dict[str, dict[str, int]] = {"train": {}, "validation": {}}

    # ------------------------------------------------------------------ schedules
    def _progress(self) -> float:
        max_epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 1
        return self.current_epoch / max(max_epochs, 1)

    def _pseudo_label_weight(self) -> float:
        w = self.module.pseudo_label_weight
        if w <= 0:
            return 0.0
        start = self.pseudo_label_warmup
        if start <= 0:
            return w
        ramp = (self._progress() - start) / start
        return float(w * min(max(ramp, 0.0), 1.0))

    # ------------------------------------------------------------------ steps
    def _step(self, batch, adversarial: bool = True):
        tensors = _concat_batches(batch)
        w_pl = self._pseudo_label_weight()
        loss_kwargs = {"pseudo_label_weight": w_pl}
        if not adversarial:
            loss_kwargs["adversarial_weight"] = 0.0
        inference_outputs, _, loss_output = self.forward(
            tensors,
            # the activities without dropout serve the pseudo-labels alone: not computed while their weight is 0
            inference_kwargs={"thin": True, "clean": w_pl > 0},
            generative_kwargs={"materialize": False},
            loss_kwargs=loss_kwargs,
        )
        return tensors, inference_outputs, loss_output

    def _accumulate(self, mode: str, name: str, value: torch.Tensor, n: int) -> None:
        """Add ``value`` (a scalar tensor) weighted by ``n`` cells to the epoch's sum of ``name``."""
        value = value.detach().reshape(()).float() * n
        sums = self._sums[mode]
        sums[name] = sums[name] + value if name in sums else value
        self._counts[mode][name] = self._counts[mode].get(name, 0) + n

    def _accumulate_terms(self, loss_output, mode: str) -> None:
        n = int(loss_output.n_obs_minibatch)
        for key, value in loss_output.extra_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self._accumulate(mode, f"{key}_{mode}", value, n)
        self._accumulate(mode, "train_loss" if mode == "train" else "validation_loss", loss_output.loss, n)

    def _log_epoch(self, mode: str) -> None:
        """Log the epoch means of the accumulated terms (summed over processes in data-parallel runs)."""
        sums, counts = self._sums[mode], self._counts[mode]
        if not sums:
            return
        names = list(sums)
        totals = torch.stack([sums[k] for k in names])
        weights = torch.tensor([float(counts[k]) for k in names], device=totals.device)
        if self.trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            weights = self.trainer.strategy.reduce(weights, reduce_op="sum")
        means = (totals / weights.clamp(min=1.0)).cpu()
        direct = {}
        for name, value in zip(names, means, strict=True):
            if name in _MONITORED:
                self.log(name, value, on_step=False, on_epoch=True, prog_bar=True)
            else:
                direct[name] = float(value)
        # The other terms go to the loggers in one call. Through `self.log`, each value costs Lightning about
        # 1.5 ms (it moves its whole result record to the value's device): 20 terms a validated epoch made
        # that a third of the training time on small data, which take 3 steps an epoch.
        if direct and self.trainer is not None:
            for logger in self.loggers:
                logger.log_metrics({**direct, "epoch": self.current_epoch}, step=self.global_step)
        sums.clear()
        counts.clear()

    def training_step(self, batch, batch_idx):
        """One step of the model, then one of the discriminator."""
        opt_model, opt_disc = self.optimizers()
        # before the adversarial warm-up ends the adversarial term is left out of the loss (it is still logged)
        adv_on = self._progress() >= self.adversarial_warmup
        tensors, inference_outputs, loss_output = self._step(batch, adversarial=adv_on)
        opt_model.zero_grad()
        self.manual_backward(loss_output.loss)
        opt_model.step()

        is_query = tensors[REGISTRY_KEYS.DOMAIN_KEY].view(-1) == 1
        if self.module.adversarial_weight > 0 and bool(is_query.any()) and not bool(is_query.all()):
            d_loss = self.module.discriminator_loss(inference_outputs["z"], is_query)
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            opt_disc.step()
            self._accumulate("train", "discriminator_loss_train", d_loss, int(loss_output.n_obs_minibatch))
        self._accumulate_terms(loss_output, "train")
        return loss_output.loss.detach()

    def validation_step(self, batch, batch_idx):
        """Loss terms and accuracy on held-out reference cells (with spatial cells for the priors).

        The held-out reference cells are thinned to the spatial depth with the same draws at every
        validation, so that successive losses differ by the model's change alone: the loader gives each
        minibatch's compiled pass the same seeds (CPU), and elsewhere the draws come from torch's generator
        seeded afresh for the minibatch, in a fork that leaves the training's random numbers as they were.
        """
        device = self.module.group_mean.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            seed = (torch.initial_seed() + batch_idx) % 2**63
            # the generators the draws use, not `torch.manual_seed`: on a machine without an initialised GPU that
            # queues a seeding of every accelerator and records the call stack with it, a few milliseconds each
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            _, _, loss_output = self._step(batch)
        self._accumulate_terms(loss_output, "validation")

    def on_train_epoch_start(self):
        """Put the module in training mode and start the epoch's sums of the training terms afresh.

        Lightning keeps the mode a submodule had when fitting began: a module left in evaluation mode
        (by a prediction, or by the calibration at the end of an earlier training) would otherwise train
        without its input dropout.
        """
        self.module.train()
        self._sums["train"].clear()
        self._counts["train"].clear()

    def on_validation_epoch_start(self):
        """Start the sums of the validation terms afresh."""
        self._sums["validation"].clear()
        self._counts["validation"].clear()

    def on_train_epoch_end(self):
        """Log the epoch means of the training terms."""
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        """Log the means of the validation terms (watched by early stopping)."""
        if self.trainer is not None and self.trainer.sanity_checking:
            self._sums["validation"].clear()
            self._counts["validation"].clear()
            return
        self._log_epoch("validation")

    def configure_optimizers(self):
        """Adam for the encoder/decoder/temperature, Adam for the discriminator."""
        disc_params = list(self.module.discriminator.parameters())
        disc_ids = {id(p) for p in disc_params}
        model_params = [p for p in self.module.parameters() if id(p) not in disc_ids and p.requires_grad]
        # the fused implementation updates all parameters in one kernel (several times faster for these small
        # tensors); it is available on CPU and CUDA
        fused = all(p.device.type in ("cpu", "cuda") for p in [*model_params, *disc_params]) or None
        opt_model = torch.optim.Adam(model_params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        opt_disc = torch.optim.Adam(disc_params, lr=self.lr_discriminator, fused=fused)
        return [opt_model, opt_disc]
