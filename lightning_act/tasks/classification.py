"""What every classification task here shares: top-1 per stage, the eval steps, softmax prediction."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn


class ClassificationTask(pl.LightningModule):
    """``self.model`` maps inputs to logits; subclasses add the training step and the optimiser."""

    model: nn.Module

    def init_metrics(self, num_classes: int) -> None:
        """Top-1 accuracy (micro average) for train, val and test."""
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: torchmetrics.Metric) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).softmax(-1)
