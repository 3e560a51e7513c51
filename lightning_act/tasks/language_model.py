"""Next-token language modelling with the small pre-norm transformer (the massive-activations recipe)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_act.errors import LightningActError
from lightning_act.models.small_transformer import SmallTransformer
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.image_classification import (
    WarmupCosineLR,
    check_optimizer_args,
    check_schedule,
    schedule_steps,
    start_schedules,
)
from lightning_act.tasks.classification import mean_loss_metric
from lightning_act.tasks.sampler_padding import real_examples


#: ``F.cross_entropy``'s default ``ignore_index``: a padded target position.
IGNORE_INDEX = -100


def adamw_warmup_cosine(
    module: pl.LightningModule, lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float = 0.0
) -> dict[str, Any]:
    """AdamW (no decay on 1-D parameters: biases, norms) with linear warm-up then cosine decay, per step."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    schedule = WarmupCosineLR(optimizer, warmup_steps, schedule_steps(module.trainer), min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CausalLanguageModel(pl.LightningModule):
    """A decoder-only transformer trained on next-token prediction.

    Batches are ``(input_ids, targets)`` (both (B, T) int64); ``forward(input_ids)`` returns logits
    (B, T, V), so monitors that replay validation batches can call the module on ``batch[0]``.
    Logged: ``train/loss``, ``val/loss`` (nats per token) and ``val/bits_per_token``, both means over every token of
    the validation set, each sequence once under DDP (not the sampler's padding, see ``real_examples``).
    """

    batch_form = BatchForm(
        (Part("input_ids (B, T)", 2, "int"), Part("targets (B, T)", 2, "int64")),
        "lightning_act.data.stdlib_text.StdlibTextDataModule",
    )

    def __init__(
        self,
        vocab_size: int = 256,
        max_len: int = 128,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        check_schedule(warmup_steps, min_lr_ratio)
        check_optimizer_args(lr, weight_decay)
        self.save_hyperparameters()
        self.model = SmallTransformer(vocab_size, max_len, dim, depth, num_heads, True, mlp_ratio, act, causal=True)
        self.val_loss, self.val_bits_per_token = mean_loss_metric(), mean_loss_metric()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab, seq_len = getattr(datamodule, "vocab_size", None), getattr(datamodule, "seq_len", None)
        if vocab is not None and vocab > self.hparams.vocab_size:  # else an embedding's IndexError, mid-fit
            raise LightningActError(
                f"the data has {vocab} token ids but the model's vocabulary holds {self.hparams.vocab_size}; pass "
                f"--model.vocab_size {vocab}"
            )
        if seq_len is not None and seq_len > self.hparams.max_len:
            raise LightningActError(
                f"the data's sequences have {seq_len} tokens but the model takes at most {self.hparams.max_len}; pass "
                f"--model.max_len {seq_len} or a smaller --data.seq_len"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _token_losses(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of every target token; targets of ``-100`` (``cross_entropy``'s ``ignore_index``: padding) are
        no tokens and are left out, as the mean ``cross_entropy`` leaves them out."""
        logits = self(input_ids)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return losses[targets.reshape(-1) != IGNORE_INDEX]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        loss = self._token_losses(*batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Token losses of the batch's real sequences, averaged over the whole set by the metrics (summed over ranks)."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, "val")
        input_ids, targets = batch
        real = real_examples(self._trainer, "val", batch_idx, len(targets), targets.device)
        losses = self._token_losses(input_ids[real], targets[real])
        self.val_loss.update(losses)
        self.val_bits_per_token.update(losses / math.log(2.0))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/bits_per_token", self.val_bits_per_token)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)

    def on_fit_start(self) -> None:
        start_schedules(self, self.hparams.lr)
