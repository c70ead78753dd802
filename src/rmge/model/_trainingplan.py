"""Adversarial training plan of RMGE and a data module that puts both domains in every minibatch."""

from __future__ import annotations

import numpy as np
import torch
from lightning import LightningDataModule
from scvi import settings
from scvi.dataloaders import ConcatDataLoader
from scvi.train import TrainingPlan

from rmge._constants import REGISTRY_KEYS


def _concat_batches(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join the reference and spatial minibatches of a :class:`~scvi.dataloaders.ConcatDataLoader`."""
    if isinstance(batch, dict):
        return batch
    keys = batch[0].keys()
    return {k: torch.cat([b[k] for b in batch], dim=0) for k in keys}


class RMGEDataSplitter(LightningDataModule):
    """Split reference cells into training and validation; pair each with spatial cells.

    Every training step yields ``batch_size`` reference cells and ``batch_size`` spatial cells
    (the smaller domain is cycled). Validation uses held-out reference cells (stratified by label)
    together with a random sample of spatial cells of the same size.

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
        Use distributed samplers (DDP).
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
        **kwargs,
    ):
        super().__init__()
        self.adata_manager = adata_manager
        self.batch_size = batch_size
        self.distributed_sampler = distributed_sampler
        self.data_loader_kwargs = kwargs
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

    def _loader(self, indices_list, shuffle: bool):
        return ConcatDataLoader(
            self.adata_manager,
            indices_list=indices_list,
            shuffle=shuffle,
            batch_size=self.batch_size,
            drop_last=False,
            distributed_sampler=self.distributed_sampler,
            **self.data_loader_kwargs,
        )

    def train_dataloader(self):
        """Loader of (reference, spatial) minibatch pairs."""
        return self._loader([self.train_idx, self.query_idx], shuffle=True)

    def val_dataloader(self):
        """Loader of held-out reference cells paired with spatial cells."""
        if self.n_val == 0:
            return []
        return self._loader([self.val_idx, self.query_val_idx], shuffle=False)


class RMGETrainingPlan(TrainingPlan):
    """Training plan with a second optimiser for the domain discriminator (manual optimisation).

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
        up linearly over the same number of epochs.
    adversarial_warmup
        Fraction of ``max_epochs`` before the adversarial term enters the loss.
    """

    def __init__(
        self,
        module,
        lr: float = 1e-2,
        lr_discriminator: float = 1e-3,
        weight_decay: float = 0.0,
        pseudo_label_warmup: float = 0.2,
        adversarial_warmup: float = 0.0,
        **kwargs,
    ):
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        self.lr_discriminator = lr_discriminator
        self.pseudo_label_warmup = pseudo_label_warmup
        self.adversarial_warmup = adversarial_warmup
        self.automatic_optimization = False

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
    def _step(self, batch):
        tensors = _concat_batches(batch)
        inference_outputs, _, loss_output = self.forward(
            tensors,
            inference_kwargs={"thin": True},
            loss_kwargs={"pseudo_label_weight": self._pseudo_label_weight()},
        )
        return tensors, inference_outputs, loss_output

    def _log_terms(self, loss_output, mode: str, total: torch.Tensor):
        n = loss_output.n_obs_minibatch
        for key, value in loss_output.extra_metrics.items():
            self.log(f"{key}_{mode}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=self.use_sync_dist)
        name = "train_loss" if mode == "train" else "validation_loss"
        self.log(name, total, on_step=False, on_epoch=True, batch_size=n, prog_bar=True, sync_dist=self.use_sync_dist)

    def training_step(self, batch, batch_idx):
        """One step of the model, then one of the discriminator."""
        opt_model, opt_disc = self.optimizers()
        tensors, inference_outputs, loss_output = self._step(batch)
        adv_on = self._progress() >= self.adversarial_warmup
        loss = loss_output.loss
        if not adv_on:
            loss = loss - self.module.adversarial_weight * loss_output.extra_metrics["adversarial_loss"]
        opt_model.zero_grad()
        self.manual_backward(loss)
        opt_model.step()

        is_query = tensors[REGISTRY_KEYS.DOMAIN_KEY].view(-1).long() == 1
        if self.module.adversarial_weight > 0 and bool(is_query.any()) and bool((~is_query).any()):
            d_loss = self.module.discriminator_loss(inference_outputs["z"], is_query)
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            opt_disc.step()
            self.log(
                "discriminator_loss_train",
                d_loss.detach(),
                on_step=False,
                on_epoch=True,
                batch_size=loss_output.n_obs_minibatch,
                sync_dist=self.use_sync_dist,
            )
        self._log_terms(loss_output, "train", loss_output.loss.detach())
        return loss_output.loss.detach()

    def validation_step(self, batch, batch_idx):
        """Loss terms and accuracy on held-out reference cells (with spatial cells for the priors)."""
        _, _, loss_output = self._step(batch)
        self._log_terms(loss_output, "validation", loss_output.loss.detach())

    def on_train_epoch_end(self):
        """No scheduler: nothing to update."""

    def on_validation_epoch_end(self):
        """No scheduler: nothing to update."""

    def configure_optimizers(self):
        """Adam for the encoder/decoder/temperature, Adam for the discriminator."""
        disc_params = list(self.module.discriminator.parameters())
        disc_ids = {id(p) for p in disc_params}
        model_params = [p for p in self.module.parameters() if id(p) not in disc_ids and p.requires_grad]
        opt_model = torch.optim.Adam(model_params, lr=self.lr, weight_decay=self.weight_decay)
        opt_disc = torch.optim.Adam(disc_params, lr=self.lr_discriminator)
        return [opt_model, opt_disc]
