"""What every classification task here shares: top-1 per stage, the eval steps, softmax prediction."""

from __future__ import annotations

import lightning.pytorch as pl
import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_act.errors import ConfigError
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.sampler_padding import real_examples


def mean_loss_metric() -> torchmetrics.MeanMetric:
    """A mean of evaluation losses (weighted where ``update`` gets weights) that keeps a NaN: a NaN loss is the
    measurement (a diverged model), not a value to leave out as the default ``nan_strategy="warn"`` does. NaN is
    imputed with NaN, since ``nan_strategy="disable"`` also drops the weights (torchmetrics 1.9)."""
    return torchmetrics.MeanMetric(nan_strategy=math.nan)


def refuse_several_loaders(trainer: pl.Trainer, stage: str, task: str) -> None:
    """One line instead of metrics pooled over loaders, for a task whose evaluation metrics are one set per stage."""
    batches = trainer.num_test_batches if stage == "test" else trainer.num_val_batches
    if len(batches) > 1:
        raise ConfigError(
            f"{task} evaluates one {stage} loader per call, got {len(batches)}: its {stage} metrics would pool them; "
            f"run one trainer.{'test' if stage == 'test' else 'validate'} per loader"
        )


class ClassificationTask(pl.LightningModule):
    """``self.model`` maps inputs to logits; subclasses add the training step and the optimiser, and narrow the form of
    their ``(inputs, labels)`` batches."""

    model: nn.Module
    batch_form = BatchForm(
        (Part("inputs (B, ...)", 1, None, at_least=True), Part("labels (B, ...)", 1, None, at_least=True))
    )

    def init_metrics(self, num_classes: int) -> None:
        """Top-1 accuracy (micro average) for train, val and test; the val and test loss as means weighted by examples,
        summed over ranks (an unweighted mean of the ranks' means would not be the whole set's)."""
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro"))
        self.val_loss, self.test_loss = mean_loss_metric(), mean_loss_metric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _eval_metrics(self, stage: str, dataloader_idx: int) -> dict[str, tuple[torchmetrics.Metric, str]]:
        """``{"loss": (metric, attribute name), "acc": ...}`` of the ``stage`` loader ``dataloader_idx``: each loader of
        several (Lightning logs them as ``<stage>/acc/dataloader_idx_N``) has metrics of its own, made fresh at its
        first batch; shared ones would give a later loader's epoch value the earlier loaders' examples too. The name
        is passed to ``self.log``: Lightning lists the module's metrics once, before these exist."""
        if dataloader_idx == 0:
            return {name: (getattr(self, f"{stage}_{name}"), f"{stage}_{name}") for name in ("loss", "acc")}
        if not hasattr(self, "_other_loader_metrics"):
            self._other_loader_metrics = nn.ModuleDict()
        key = f"{stage}_{dataloader_idx}"
        if key not in self._other_loader_metrics:
            metrics = nn.ModuleList(getattr(self, f"{stage}_{name}").clone() for name in ("loss", "acc"))
            for metric in metrics:
                metric.reset()  # the clone holds loader 0's examples of this epoch
            self._other_loader_metrics[key] = metrics.to(self.device)
        return {
            name: (self._other_loader_metrics[key][i], f"_other_loader_metrics.{key}.{i}")
            for i, name in enumerate(("loss", "acc"))
        }

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, stage: str, dataloader_idx: int) -> None:
        """Loss and accuracy over the batch's real examples (not the DDP sampler's padding, see ``real_examples``)."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, stage)
        x, y = batch
        real = real_examples(self._trainer, stage, batch_idx, len(y), y.device, dataloader_idx=dataloader_idx)
        logits, y = self(x)[real], y[real]
        metrics = self._eval_metrics(stage, dataloader_idx)
        (loss, loss_name), (accuracy, accuracy_name) = metrics["loss"], metrics["acc"]
        loss.update(F.cross_entropy(logits, y, reduction="none"))  # each example weighs the same, on every rank
        if len(y):  # a batch of padding alone: MulticlassAccuracy refuses an empty update
            accuracy.update(logits, y)
        self.log(f"{stage}/loss", loss, metric_attribute=loss_name)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, metric_attribute=accuracy_name)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "predict")
        return self(batch[0]).softmax(-1)
