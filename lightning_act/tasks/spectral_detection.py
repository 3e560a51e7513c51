"""Per-pixel spectral target detection with Spectral-NN (Lekhak et al., arXiv 2602.10434).

Targets are a fraction of a percent of the pixels, so the loss is either BCE with ``pos_weight``
derived from the training class balance (the datamodule's background/target pixel ratio r) or the
focal loss (Lin et al. 2017). The default weight is √r: on the first version of the synthetic
data the full ratio r (≈ 176) over-weighted the 116 training target pixels and gave a lower
validation AP (0.82 vs 0.95 after 30 epochs). Average precision is the headline metric: with such sparse targets
ROC-AUC stays near 1 even for detectors whose top-ranked pixels are mostly false alarms.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryPrecisionRecallCurve,
)
from torchvision.ops import sigmoid_focal_loss

from lightning_act._files import written_whole
from lightning_act.errors import LightningActError
from lightning_act.eval.ranking import NaNLogitCount, probability_of_score, ranking_scores, warn_nan_rank_metrics
from lightning_act.models.spectral_nn import SpectralNN
from lightning_act.plots import writes_run_files
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.classification import mean_loss_metric, refuse_several_loaders
from lightning_act.tasks.image_classification import check_non_negative, check_optimizer_args
from lightning_act.tasks.sampler_padding import real_examples


def _positive_number(value: object) -> bool:
    """Whether ``value`` reads as a finite number > 0 (``inf`` would make every loss NaN)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def check_focal_args(alpha: object, gamma: object) -> None:
    """One line at construction for focal-loss settings torchvision refuses only at the first step (an ``alpha`` outside
    [0, 1] other than its -1, "no weighting") or never: a negative ``gamma`` makes the loss of a correct, confident
    prediction infinite (``0 ** gamma``), a NaN one every loss NaN."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0.0 <= alpha <= 1.0 or alpha == -1):
        raise LightningActError(
            f"focal_alpha={alpha!r} must be in [0, 1] (the positives' weight) or -1 (no weighting); "
            "pass e.g. --model.focal_alpha 0.25"
        )
    check_non_negative("focal_gamma", gamma, "--model.focal_gamma 2")


class NonBinaryLabelCount(NaNLogitCount):
    """Labels of an epoch that are neither 0 nor 1, summed over ranks (counted on the device: no host sync per step).
    AUROC, AP and the precision-recall curve rank 0/1 labels (torchmetrics refuses others); ``long()`` would cut a soft
    label such as a target's covered fraction 0.7 to background, so the tasks log them as NaN when this is > 0."""

    def update(self, labels: torch.Tensor) -> None:
        self.count += ((labels != 0) & (labels != 1)).sum()


class SpectralTargetDetection(pl.LightningModule):
    """Train :class:`SpectralNN` on (spectrum, 0/1 label) batches; log ROC-AUC and AP.

    Training also takes soft labels in [0, 1] (BCE and the focal loss are defined for them), and so do the validation
    and test losses; an epoch with labels other than 0/1 logs its AUROC and AP as NaN, with one warning per stage
    (torchmetrics refuses such labels: they have no ranking).

    Args:
        in_bands: spectral bands B (must match the datamodule's ``num_bands``).
        hidden_sizes, dropout, beta_init: Spectral-NN architecture (see :class:`SpectralNN`).
        loss: ``"bce"`` (BCE with ``pos_weight``) or ``"focal"``.
        pos_weight: ``"sqrt"`` (√r, default), ``"auto"`` (r), with r the background/target ratio of
            the training pixels read from the datamodule's ``pos_weight`` (at every fit, and at validate / test
            while no fit or checkpoint set it); a number; or ``None`` for plain BCE.
        focal_alpha, focal_gamma: focal-loss weighting of positives and focusing exponent.
        lr, weight_decay: AdamW settings (no decay on biases and PMish β).

    Logs ``train/loss``, ``val/loss``, ``val/ap``, ``val/auroc``, ``test/ap``, ``test/auroc``. After
    testing, ``test_pr_curve`` holds the precision-recall curve (precision, recall, thresholds),
    also written to ``test_pr_curve.csv`` in the trainer's log directory when there is one.
    """

    batch_form = BatchForm(
        (Part("spectra (B, ..., bands)", 2, "float", at_least=True), Part("labels (B, ...)", 1, "float", at_least=True)),
        "lightning_act.data.hyperspectral.HyperspectralDataModule",
        extra_text=" (labels of the spectra's shape without bands)",
        labels_of_leading_shape=True,
    )

    def __init__(
        self,
        in_bands: int = 64,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        beta_init: float = 1.0,
        loss: Literal["bce", "focal"] = "bce",
        pos_weight: float | Literal["auto", "sqrt"] | None = "sqrt",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        if loss not in ("bce", "focal"):
            raise LightningActError(f"unknown loss '{loss}'; use --model.loss bce or --model.loss focal")
        if not (pos_weight is None or pos_weight in ("auto", "sqrt") or _positive_number(pos_weight)):
            raise LightningActError(
                f"pos_weight must be 'sqrt', 'auto', null or a positive number, got {pos_weight!r}; "
                "set --model.pos_weight accordingly"
            )
        if loss == "focal":
            check_focal_args(focal_alpha, focal_gamma)
        check_optimizer_args(lr, weight_decay)
        self.save_hyperparameters()
        self.model = SpectralNN(in_bands, hidden_sizes, dropout, beta_init)
        if pos_weight in ("auto", "sqrt"):
            initial = math.nan  # unset until derived from the data (setup) or restored from a checkpoint
        else:
            initial = 1.0 if pos_weight is None else float(pos_weight)
        self.register_buffer("pos_weight", torch.tensor(initial))
        self.val_auroc, self.val_ap = BinaryAUROC(), BinaryAveragePrecision()
        self.test_auroc, self.test_ap = BinaryAUROC(), BinaryAveragePrecision()
        # the loss weighted by spectra, summed over ranks: an unweighted mean of the ranks' means is not the set's
        self.val_loss, self.test_loss = mean_loss_metric(), mean_loss_metric()
        self.test_pr = BinaryPrecisionRecallCurve()
        self.test_pr_curve: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.val_nan_logits, self.test_nan_logits = NaNLogitCount(), NaNLogitCount()  # rank metrics undefined if > 0
        # labels other than 0/1: rank metrics NaN if > 0
        self.val_non_binary, self.test_non_binary = NonBinaryLabelCount(), NonBinaryLabelCount()
        self._warned_nan_logits: set[str] = set()  # stages already warned to log NaN rank metrics
        self._warned_non_binary: set[str] = set()  # stages already warned of labels other than 0/1
        self._said_plain_bce: set[str] = set()  # loss names already warned to be plain BCE (unset pos_weight)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        bands = getattr(datamodule, "num_bands", None)
        if bands is not None and bands != self.hparams.in_bands:
            raise LightningActError(
                f"the data has {bands} bands but the model was built for {self.hparams.in_bands}; "
                f"set --model.in_bands {bands}"
            )
        # Every fit derives it from its training data, any other stage while it is unset (validate / test of a model not
        # fitted in this process logged plain BCE, not comparable with the fit's val/loss). A checkpoint, restored
        # after setup, still wins. The focal loss reads no pos_weight: nothing to derive or refuse.
        weighted_bce = self.hparams.loss == "bce" and self.hparams.pos_weight in ("auto", "sqrt")
        if weighted_bce and (stage == "fit" or self.pos_weight.isnan()):
            ratio = getattr(datamodule, "pos_weight", None)
            if ratio is not None:
                self.pos_weight.fill_(float(ratio) ** (0.5 if self.hparams.pos_weight == "sqrt" else 1.0))
            elif stage == "fit":
                raise LightningActError(
                    f"pos_weight='{self.hparams.pos_weight}' needs a datamodule with a pos_weight attribute "
                    "(HyperspectralDataModule); pass --model.pos_weight NUMBER instead"
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved while ``pos_weight`` was unset (a model only evaluated, never fitted) gives no weight:
        it keeps the one the data gave in ``setup`` (which runs before the restore) rather than unsetting it."""
        state = checkpoint.get("state_dict", {})
        saved = state.get("pos_weight")
        if saved is not None and saved.isnan():
            state["pos_weight"] = self.pos_weight.detach().clone()

    def on_validation_start(self) -> None:
        refuse_several_loaders(self.trainer, "val", "SpectralTargetDetection")
        self._say_plain_bce_while_unset("val/loss")

    def on_test_start(self) -> None:
        refuse_several_loaders(self.trainer, "test", "SpectralTargetDetection")
        self._say_plain_bce_while_unset("test/loss")

    def _say_plain_bce_while_unset(self, loss_name: str) -> None:
        """One warning per loss name that ``loss_name`` is plain BCE while neither data nor a checkpoint gave
        ``pos_weight`` (a model never fitted, evaluated on bare dataloaders or used outside a Trainer): √r / r of the
        training pixels is unknown there. The buffer stays unset, so a later datamodule or checkpoint still sets it.
        Nothing to say for the focal loss, which reads no ``pos_weight``."""
        if loss_name not in self._said_plain_bce and self.hparams.loss == "bce" and self.pos_weight.isnan():
            self._said_plain_bce.add(loss_name)
            rank_zero_warn(
                f"{loss_name} is plain BCE: pos_weight='{self.hparams.pos_weight}' needs the training pixels' "
                "background/target ratio, and neither the data (a datamodule with pos_weight, e.g. "
                "HyperspectralDataModule) nor a checkpoint gave it; pass --model.pos_weight NUMBER to weight it"
            )

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        return self.model(spectra)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE with ``pos_weight`` (1.0 while unset) or the mean focal loss."""
        if self.hparams.loss == "focal":
            return sigmoid_focal_loss(
                logits, labels, alpha=self.hparams.focal_alpha, gamma=self.hparams.focal_gamma, reduction="mean"
            )
        if self.hparams.pos_weight is None:
            return F.binary_cross_entropy_with_logits(logits, labels)
        if self._trainer is None:  # no setup or start hook ran to say it (a loop of one's own, Fabric)
            self._say_plain_bce_while_unset("the loss")
        # nan_to_num rather than a check: no host sync per step on an accelerator
        weight = torch.nan_to_num(self.pos_weight, nan=1.0)
        return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        spectra, labels = batch
        loss = self.compute_loss(self(spectra), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _real_spectra(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, stage: str, dataloader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` of the batch's spectra but the DDP sampler's padding (see ``real_examples``)."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, stage)
        spectra, labels = batch
        real = real_examples(self._trainer, stage, batch_idx, len(labels), labels.device, dataloader_idx=dataloader_idx)
        return self(spectra)[real], labels[real]

    def _update_loss(self, loss: MeanMetric, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if len(labels):  # a batch of padding alone has no loss
            loss.update(self.compute_loss(logits, labels), weight=len(labels))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, labels = self._real_spectra(batch, batch_idx, "val", dataloader_idx)
        self._update_loss(self.val_loss, logits, labels)
        self.log("val/loss", self.val_loss)
        # scores in [0, 1] in the logits' order: torchmetrics applies a sigmoid per batch to a batch with a value
        # outside [0, 1] (batches ranked on two scales), and a sigmoid ties confident pixels (see ranking_scores)
        scores = ranking_scores(logits)
        self.val_auroc.update(scores, labels.long())
        self.val_ap.update(scores, labels.long())
        self.val_nan_logits.update(logits)
        self.val_non_binary.update(labels)

    def on_validation_epoch_end(self) -> None:
        self._log_rank_metrics(
            "val", self.val_nan_logits.epoch_total(), self.val_non_binary.epoch_total(), self.val_auroc, self.val_ap
        )

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, labels = self._real_spectra(batch, batch_idx, "test", dataloader_idx)
        self._update_loss(self.test_loss, logits, labels)
        self.log("test/loss", self.test_loss)
        for metric in (self.test_auroc, self.test_ap, self.test_pr):
            metric.update(ranking_scores(logits), labels.long())  # see validation_step
        self.test_nan_logits.update(logits)
        self.test_non_binary.update(labels)

    def _log_rank_metrics(
        self, stage: str, nan_logits: int, non_binary: int, auroc: BinaryAUROC, ap: BinaryAveragePrecision
    ) -> None:
        """``<stage>/auroc`` and ``<stage>/ap``; NaN (one warning per stage) when the epoch had NaN logits: an order of
        NaN scores is the data's, not the model's, and a plausible AP there would hide a diverged run. NaN too (one
        warning per stage) when it had labels other than 0/1, which these metrics do not define (the loss does).

        Both branches log tensors with the same arguments: Lightning keeps a key's logging arguments across the runs of
        a loop and refuses another kind of value later (a metric object one epoch, a float NaN the next crashed a fit
        that diverged, before round 24). ``nan_logits`` is summed over the ranks, so every rank takes the same branch
        and runs the same syncs (``compute``); the value is the same on every rank, which ``max`` keeps exactly."""
        if nan_logits == 0 and non_binary == 0:
            values = auroc.compute(), ap.compute()
        else:
            values = torch.tensor(math.nan, device=self.device), torch.tensor(math.nan, device=self.device)
            curve = " (and the precision-recall curve)" if stage == "test" else ""
            names = f"{stage}/auroc and {stage}/ap{curve}"
            if nan_logits and stage not in self._warned_nan_logits:
                self._warned_nan_logits.add(stage)
                warn_nan_rank_metrics("SpectralTargetDetection", stage, nan_logits, names)
            if non_binary and stage not in self._warned_non_binary:
                self._warned_non_binary.add(stage)
                rank_zero_warn(
                    f"SpectralTargetDetection: {non_binary} {stage} labels are neither 0 nor 1 (soft labels), which "
                    f"{names} do not rank, so they are logged as NaN; binarise the {stage} labels (e.g. labels >= 0.5) "
                    "to measure them (training may keep soft labels)"
                )
        auroc.reset()
        ap.reset()
        self.log(f"{stage}/auroc", values[0], sync_dist=True, reduce_fx="max")
        self.log(f"{stage}/ap", values[1], prog_bar=stage == "val", sync_dist=True, reduce_fx="max")

    def _pr_curve_csv(self) -> Path | None:
        """Where this rank writes ``test_pr_curve.csv``: the trainer's log directory, on global zero where the run
        writes files (``None`` elsewhere). Call it on every rank: ``trainer.log_dir`` is a broadcast."""
        log_dir = self.trainer.log_dir
        if log_dir is None or not self.trainer.is_global_zero or not writes_run_files(self.trainer):
            return None
        return Path(log_dir).expanduser() / "test_pr_curve.csv"  # "~/runs": the loggers write under $HOME

    def on_test_epoch_end(self) -> None:
        nan_logits, non_binary = self.test_nan_logits.epoch_total(), self.test_non_binary.epoch_total()
        self._log_rank_metrics("test", nan_logits, non_binary, self.test_auroc, self.test_ap)
        csv_path = self._pr_curve_csv()
        if nan_logits or non_binary:  # no curve then: the one a previous test gave is not this model's either
            self.test_pr.reset()
            self.test_pr_curve = None
            if csv_path is not None:  # nor its file, beside this test's NaN metrics (the same Trainer's log_dir)
                csv_path.unlink(missing_ok=True)
            return
        precision, recall, scores = self.test_pr.compute()
        self.test_pr.reset()
        thresholds = probability_of_score(scores)  # the curve's thresholds as probabilities again
        self.test_pr_curve = (precision.cpu(), recall.cpu(), thresholds.cpu())
        if csv_path is not None:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            # whole or not at all: a kill mid-write leaves no curve cut short under its name
            with written_whole(csv_path) as partial, open(partial, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["threshold_probability", "precision", "recall"])
                # precision/recall have one more entry than thresholds: the (1, 0) end point.
                for p, r, t in zip(precision.tolist(), recall.tolist(), [*thresholds.tolist(), float("nan")]):
                    writer.writerow([t, p, r])

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "predict")
        return torch.sigmoid(self(batch[0]).float())  # in float32: bf16 rounds probabilities to 1/256

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
