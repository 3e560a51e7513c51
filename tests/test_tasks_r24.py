"""Round 24 fixes of the model tasks: STAN's test step on batches without labelled windows, Spectral-NN's focal loss
without a datamodule, several evaluation loaders, and rank metrics of non-finite logits."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC

from _toy import STAN_TINY
from lightning_act.errors import ConfigError
from lightning_act.eval.ranking import ranking_scores
from lightning_act.tasks.classification import ClassificationTask
from lightning_act.tasks.seizure_forecasting import SeizureForecaster
from lightning_act.tasks.spectral_detection import SpectralTargetDetection

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )


class _StanFixedLogits(SeizureForecaster):
    """The first sample of channel 0 is the window's logit: values checkable by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0]


def _windows(logits: list[float], labels: list[float], batch_size: int) -> DataLoader:
    x = torch.zeros(len(logits), 3, 32)
    x[:, 0, 0] = torch.tensor(logits)
    return DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=batch_size)


def _log_pairs(z: np.ndarray, t: np.ndarray) -> float:
    """Mean BCE of logits ``z`` against 0/1 labels ``t`` (float64)."""
    return float(np.mean(-(t * -np.logaddexp(0.0, -z) + (1 - t) * -np.logaddexp(0.0, z))))


class _UpdateCounts(pl.Callback):
    """After each test batch: how often test/loss was logged and test_auroc updated so far."""

    def __init__(self) -> None:
        self.auroc_updates: list[int] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.auroc_updates.append(pl_module.test_auroc.update_count)


def test_stan_test_step_logs_and_updates_on_a_batch_without_labelled_windows() -> None:
    """Before: a batch of excluded windows (y = -1) updated neither test_auroc nor the loss, so under DDP a
    rank whose share held no labelled window ran other collectives at epoch end than the others (gloo "collective
    mismatch"). The epoch values stay those of the labelled windows."""
    task = _StanFixedLogits(**STAN_TINY)
    logged: list[str] = []
    log = task.log
    task.log = lambda name, value, *args, **kwargs: (logged.append(name), log(name, value, *args, **kwargs))[1]
    counts = _UpdateCounts()
    z, t = [2.0, -1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, -1.0, -1.0]  # the second batch: excluded windows only
    trainer = _trainer()
    trainer.callbacks.append(counts)
    result = trainer.test(task, _windows(z, t, batch_size=3), verbose=False)[0]
    assert logged.count("test/loss") == 1  # once, at the epoch end, on every rank
    assert counts.auroc_updates == [1, 2]  # before: [1, 1]
    assert result["test/loss"] == pytest.approx(_log_pairs(np.array(z[:3]), np.array(t[:3])), rel=1e-6)
    assert result["test/auroc"] == pytest.approx(1.0)  # positive 2.0 above both negatives (-1.0, 0.5)


def _focal_by_hand(z: np.ndarray, t: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1.0 / (1.0 + np.exp(-z))
    p_true = np.where(t == 1, p, 1 - p)
    weight = np.where(t == 1, alpha, 1 - alpha)
    return float(np.mean(-weight * (1 - p_true) ** gamma * np.log(p_true)))


def test_spectral_focal_fits_on_plain_loaders_and_says_nothing_of_plain_bce() -> None:
    """Before: fit refused ("pos_weight='sqrt' needs a datamodule"), though the focal loss never reads pos_weight,
    and validate warned "val/loss is plain BCE" of a focal loss."""
    torch.manual_seed(0)
    spectra, labels = torch.randn(32, 8), (torch.arange(32) % 4 == 0).float()
    loader = DataLoader(TensorDataset(spectra, labels), batch_size=32)
    task = SpectralTargetDetection(in_bands=8, hidden_sizes=(4,), loss="focal")
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0).fit(task, loader)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = _trainer().validate(task, loader, verbose=False)[0]
    assert not [w for w in said if "plain BCE" in str(w.message)]
    task.eval()
    with torch.no_grad():
        z = task(spectra).double().numpy()
    assert result["val/loss"] == pytest.approx(_focal_by_hand(z, labels.numpy()), rel=1e-5)


class _Linear(ClassificationTask):
    """Fixed 2-class linear logits: accuracies and losses checkable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.model.weight.copy_(torch.eye(2))
        self.init_metrics(2)


def test_classification_keeps_metrics_per_evaluation_loader() -> None:
    """Before: Lightning's "no dataloader_idx argument" error; shared metrics would also pool the loaders."""
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])  # argmax 0, 1, 0, 1
    second = torch.tensor([[0.0, 3.0], [2.0, 0.0], [0.0, 1.0]])  # argmax 1, 0, 1
    labels_first, labels_second = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 0])
    loaders = [DataLoader(TensorDataset(first, labels_first), batch_size=3),
               DataLoader(TensorDataset(second, labels_second), batch_size=2)]
    task = _Linear()
    for run, stage in ((_trainer().test, "test"), (_trainer().validate, "val")):
        results = run(task, loaders, verbose=False)
        for index, (x, y, accuracy) in enumerate(((first, labels_first, 3 / 4), (second, labels_second, 1 / 3))):
            z = x.double().numpy()
            expected_loss = np.mean(np.logaddexp(z[:, 0], z[:, 1]) - z[np.arange(len(y)), y.numpy()])
            assert results[index][f"{stage}/acc/dataloader_idx_{index}"] == pytest.approx(accuracy)
            assert results[index][f"{stage}/loss/dataloader_idx_{index}"] == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_stan_and_spectral_refuse_several_evaluation_loaders_in_one_line(stage: str) -> None:
    """Before: Lightning's "no dataloader_idx argument" traceback."""
    stan_loader = _windows([1.0, -1.0], [1.0, 0.0], batch_size=2)
    spectral_loader = DataLoader(TensorDataset(torch.randn(4, 8), torch.tensor([1.0, 0.0, 0.0, 1.0])), batch_size=4)
    tasks = ((_StanFixedLogits(**STAN_TINY), stan_loader), (SpectralTargetDetection(in_bands=8, pos_weight=2.0), spectral_loader))
    for task, loader in tasks:
        with pytest.raises(ConfigError, match=f"one {'test' if stage == 'test' else 'val'} loader per call, got 2"):
            getattr(_trainer(), stage)(task, [loader, loader], verbose=False)


def test_ranking_scores_put_infinite_logits_at_the_extremes() -> None:
    """Before: inf / inf = NaN scores, AUROC 0.5. By hand (positives inf, 1; negatives -inf, 2): 3 of 4 pairs in order."""
    scores = ranking_scores(torch.tensor([math.inf, -math.inf, 1.0, 2.0]))
    assert scores.tolist() == pytest.approx([1.0, 0.0, 0.75, 5 / 6])
    assert BinaryAUROC()(scores, torch.tensor([1, 0, 1, 0])).item() == pytest.approx(0.75)


class _SpectralNaN(SpectralTargetDetection):
    """A diverged model: every logit NaN."""

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        return torch.full(spectra.shape[:-1], math.nan)


def test_rank_metrics_of_nan_logits_are_nan_with_one_warning() -> None:
    """Before: val/loss NaN but val/auroc, val/ap finite numbers that depend only on the data order."""
    spectral_loader = DataLoader(
        TensorDataset(torch.randn(8, 8), torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])), batch_size=4
    )
    task = _SpectralNaN(in_bands=8, pos_weight=2.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        val = _trainer().validate(task, spectral_loader, verbose=False)[0]
        test = _trainer().test(task, spectral_loader, verbose=False)[0]
    assert all(math.isnan(value) for value in (*val.values(), *test.values()))
    assert set(val) == {"val/loss", "val/auroc", "val/ap"} and set(test) == {"test/loss", "test/auroc", "test/ap"}
    assert len([w for w in said if "8 val logits are NaN" in str(w.message)]) == 1
    assert len([w for w in said if "8 test logits are NaN" in str(w.message)]) == 1
    assert task.test_pr_curve is None
    # STAN: a NaN logit among the labelled windows
    stan = _StanFixedLogits(**STAN_TINY)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = _trainer().test(stan, _windows([2.0, math.nan, -1.0, 0.5], [1.0, 0.0, 0.0, 1.0], 2), verbose=False)[0]
    assert math.isnan(result["test/auroc"]) and math.isnan(result["test/loss"])
    assert len([w for w in said if "1 test logits are NaN" in str(w.message)]) == 1
