"""What every classification task here shares: top-1 per stage, the eval steps, softmax prediction."""

from __future__ import annotations

import lightning.pytorch as pl
import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_act.tasks.sampler_padding import real_examples


def mean_loss_metric() -> torchmetrics.MeanMetric:
    """A mean of evaluation losses (weighted where ``update`` gets weights) that keeps a NaN: a NaN loss is the
    measurement (a diverged model), not a value to leave out as the default ``nan_strategy="warn"`` does. NaN is
    imputed with NaN, since ``nan_strategy="disable"`` also drops the weights (torchmetrics 1.9)."""
    return torchmetrics.MeanMetric(nan_strategy=math.nan)


class ClassificationTask(pl.LightningModule):
    """``self.model`` maps inputs to logits; subclasses add the training step and the optimiser."""

    model: nn.Module

    def init_metrics(self, num_classes: int) -> None:
        """Top-1 accuracy (micro average) for train, val and test; the val and test loss as means weighted by examples,
        summed over ranks (an unweighted mean of the ranks' means would not be the whole set's)."""
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro"))
        self.val_loss, self.test_loss = mean_loss_metric(), mean_loss_metric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, stage: str) -> None:
        """Loss and accuracy over the batch's real examples (not the DDP sampler's padding, see ``real_examples``)."""
        x, y = batch
        real = real_examples(self._trainer, stage, batch_idx, len(y), y.device)
        logits, y = self(x)[real], y[real]
        loss, accuracy = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss.update(F.cross_entropy(logits, y, reduction="none"))  # each example weighs the same, on every rank
        if len(y):  # a batch of padding alone: MulticlassAccuracy refuses an empty update
            accuracy.update(logits, y)
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).softmax(-1)
