"""Round 24 review fixes: rank metrics of a run whose logits turn NaN after finite ones, evaluation loaders given as a
dict (DDP padding, Dopamine's firing fractions), STAN tested on unlabelled windows only, the Dopamine split refusal on
MNIST, and the emergence fit of a history whose every start needs a little more than its share."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from _toy import STAN_TINY, quiet_trainer
from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.errors import ConfigError
from lightning_act.stats.massive import fit_emergence
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation
from lightning_act.tasks.sampler_padding import real_examples
from lightning_act.tasks.seizure_forecasting import SeizureForecaster
from lightning_act.tasks.spectral_detection import SpectralTargetDetection



pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(**kwargs: object) -> pl.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(**options)  # type: ignore[arg-type]


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outranks a negative (ties half), float64."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives]))


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean precision at each positive's rank (no tied scores here)."""
    hits = labels[np.argsort(-scores, kind="stable")] == 1
    return float((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean())


# ------------------------------------------------------------------ rank metrics: finite logits, then NaN ones
class _NaNFromPass:
    """A task whose logit is one input value (``logit_of``); from evaluation pass ``nan_from`` on (validation and test
    epochs counted) the batch's first logit is NaN."""

    nan_from: int
    passes: int

    def logit_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logit_of(x) + 0.0 * self.model(x)
        if self.passes >= self.nan_from:
            logits = torch.cat([logits.new_tensor([math.nan]), logits[1:]])
        return logits

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.passes += 1

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.passes += 1


class _Logits(_NaNFromPass, SpectralTargetDetection):
    """Band 0 is the logit."""

    def __init__(self, nan_from: int) -> None:
        super().__init__(in_bands=4, hidden_sizes=(4,), pos_weight=2.0)
        self.nan_from, self.passes = nan_from, 0

    def logit_of(self, spectra: torch.Tensor) -> torch.Tensor:
        return spectra[:, 0]


class _StanLogits(_NaNFromPass, SeizureForecaster):
    """The first sample of channel 0 is the window's logit."""

    def __init__(self, nan_from: int) -> None:
        super().__init__(**STAN_TINY)
        self.nan_from, self.passes = nan_from, 0

    def logit_of(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0]


class _EpochValues(pl.Callback):
    """The logged value of ``keys`` after each validation."""

    def __init__(self, *keys: str) -> None:
        self.keys, self.values = keys, []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values.append({key: float(trainer.callback_metrics[key]) for key in self.keys})


SCORES = np.array([0.3, 2.0, -1.0, 0.7, -0.2, 1.4, -2.5, 0.1, 0.9, -0.6, 1.1, -1.7])
LABELS = np.array([0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0], dtype=float)


def test_rank_metrics_turn_nan_after_finite_epochs_and_evaluations_without_a_crash() -> None:
    """Before: the NaN epoch raised Lightning's "You called self.log(val/auroc, ...) twice ... with different
    arguments" (a metric object one epoch, a float NaN the next), in a fit and in a second trainer.test of one
    Trainer. The finite epochs keep the values of a float64 recomputation."""
    spectra = torch.zeros(len(SCORES), 4)
    spectra[:, 0] = torch.tensor(SCORES)
    loader = DataLoader(TensorDataset(spectra, torch.tensor(LABELS, dtype=torch.float32)), batch_size=4)
    auroc, ap = _auroc(SCORES, LABELS), _average_precision(SCORES, LABELS)
    seen = _EpochValues("val/auroc", "val/ap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(max_epochs=2, limit_train_batches=1, callbacks=[seen]).fit(_Logits(nan_from=1), loader, loader)
    assert seen.values[0] == pytest.approx({"val/auroc": auroc, "val/ap": ap}, abs=1e-6)
    assert all(math.isnan(value) for value in seen.values[1].values())
    trainer, task = _trainer(), _Logits(nan_from=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = trainer.test(task, loader, verbose=False)[0]
        second = trainer.test(task, loader, verbose=False)[0]
    assert (first["test/auroc"], first["test/ap"]) == pytest.approx((auroc, ap), abs=1e-6)
    assert math.isnan(second["test/auroc"]) and math.isnan(second["test/ap"])

    windows = torch.zeros(len(SCORES), 3, 32)
    windows[:, 0, 0] = torch.tensor(SCORES)
    stan_loader = DataLoader(TensorDataset(windows, torch.tensor(LABELS, dtype=torch.float32)), batch_size=4)
    seen = _EpochValues("val/auroc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(max_epochs=2, limit_train_batches=1, callbacks=[seen]).fit(_StanLogits(nan_from=1), stan_loader,
                                                                            stan_loader)
    assert seen.values[0]["val/auroc"] == pytest.approx(auroc, abs=1e-6)
    assert math.isnan(seen.values[1]["val/auroc"])
    trainer, stan = _trainer(), _StanLogits(nan_from=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = trainer.test(stan, stan_loader, verbose=False)[0]
        second = trainer.test(stan, stan_loader, verbose=False)[0]
    assert first["test/auroc"] == pytest.approx(auroc, abs=1e-6) and math.isnan(second["test/auroc"])


# ------------------------------------------------------------------ evaluation loaders given as a dict
def test_the_padding_of_a_dict_of_loaders_is_found_by_dataloader_idx() -> None:
    """Rank 1 of 2 on 13 examples holds positions 1, 3, ..., 11 and then example 0 again (the sampler's padding); in
    batches of 4 its batch 1 is examples 9, 11 and the padding. Before: a dict of loaders was taken for one loader, no
    DistributedSampler was found and the padding counted."""
    def loader(n: int) -> DataLoader:
        dataset = TensorDataset(torch.arange(n))
        return DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=1,
                                                                            shuffle=False))

    loaders = {"even": loader(12), "odd": loader(13)}  # dataloader_idx 0, 1: the dict's order
    trainer = SimpleNamespace(val_dataloaders=loaders, test_dataloaders={"nested": [loader(12), loader(13)]})
    assert real_examples(trainer, "val", 1, 3, dataloader_idx=1).tolist() == [True, True, False]
    assert real_examples(trainer, "val", 1, 2, dataloader_idx=0).tolist() == [True, True]
    assert real_examples(trainer, "test", 1, 3, dataloader_idx=1).tolist() == [True, True, False]


def _foundation(path: Path, mnist_dir: str | None = None) -> Path:
    pl.seed_everything(0, verbose=False)
    data = RotatedDigitsDataModule("mix", "rotated", image_size=8, max_samples=200, batch_size=64, seed=0,
                                   mnist_dir=mnist_dir)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(DopamineFoundation(image_size=8, hidden_sizes=[6]), datamodule=data)
    trainer.save_checkpoint(path)
    return path


def test_dopamine_firing_over_a_dict_of_test_loaders(tmp_path: Path) -> None:
    """Before: ValueError "too many values to unpack" (the dict was taken for one loader and its keys iterated). At
    init (tau 0) the hard gate fires where the first Linear's output is > 0: the fraction per class and neuron,
    averaged over neurons and classes, by hand over both loaders' digits."""
    module = DopamineSpecialisation(str(_foundation(tmp_path / "foundation.ckpt")), method="dopamine")
    data = RotatedDigitsDataModule("rotated", "rotated", image_size=8, max_samples=200, batch_size=64, seed=0)
    data.setup("test")
    n = len(data.test_set)
    loaders = {"first": DataLoader(Subset(data.test_set, range(0, 30)), batch_size=16),
               "rest": DataLoader(Subset(data.test_set, range(30, n)), batch_size=16)}
    x = torch.stack([data.test_set[i][0] for i in range(n)]).flatten(1).double().numpy()
    y = np.array([int(data.test_set[i][1]) for i in range(n)])
    linear = module.model[1]
    fires = x @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy() > 0
    expected = np.mean([fires[y == c].mean(axis=0) for c in np.unique(y)], axis=0).mean()
    assert len(np.unique(y)) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quiet_trainer().test(module, dataloaders=loaders, verbose=False)
    assert result[0]["test/gate_active_fraction"] == pytest.approx(expected, rel=1e-6)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()  # 0x08: unsigned bytes
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_the_split_refusal_on_mnist_names_the_validation_digits_only(tmp_path: Path) -> None:
    """MNIST's test digits are its t10k files, which no foundation trains on: only the validation digits (cut from
    the train files by the seed) can overlap. Before: the refusal said the test digits did too."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 120), ("t10k", 40)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 8, 8)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(count) % 10)
    foundation = _foundation(tmp_path / "foundation.ckpt", mnist_dir=str(tmp_path))
    module = DopamineSpecialisation(str(foundation), method="frozen")
    data = RotatedDigitsDataModule("rotated", "rotated", image_size=8, max_samples=200, batch_size=64, seed=1,
                                   mnist_dir=str(tmp_path))
    trained = RotatedDigitsDataModule("mix", "rotated", image_size=8, max_samples=200, seed=0, mnist_dir=str(tmp_path))
    trained.setup("fit")
    data.setup("test")
    seen = {image.numpy().tobytes() for image in trained.train_set.images}
    assert any(image.numpy().tobytes() in seen for image in data.val_set.images)  # what the refusal names
    assert not any(image.numpy().tobytes() in seen for image in data.test_set.images)  # t10k: never trained on
    with pytest.raises(ConfigError, match=r"\(seed=1\) is not the foundation's, so its validation digits include "
                                          r"digits '.*' was trained on; pass --data.seed 0"):
        quiet_trainer(limit_test_batches=1).test(module, datamodule=data, verbose=False)


# ------------------------------------------------------------------ STAN tested on unlabelled windows only
class _StanFixed(SeizureForecaster):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0]


def test_stan_tested_on_unlabelled_windows_only_logs_no_loss_and_says_so_once() -> None:
    """Before: test/loss NaN (a placeholder that reads like a diverged model) with torchmetrics' multi-line "compute
    called before update" warning. With labelled windows test/loss is still their mean BCE, by hand."""
    task = _StanFixed(**STAN_TINY)
    unlabelled = DataLoader(TensorDataset(torch.randn(10, 3, 32), -torch.ones(10)), batch_size=4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(2):
            result = _trainer().test(task, unlabelled, verbose=False)[0]
    assert result == {}
    assert not [w for w in said if "compute" in str(w.message) and "update" in str(w.message)]
    assert len([w for w in said if str(w.message).startswith("SeizureForecaster: no test window is labelled")]) == 1
    z, t = np.array([1.5, -0.5, 0.25, 3.0, -2.0]), np.array([1.0, -1.0, 0.0, -1.0, 0.0])
    x = torch.zeros(len(z), 3, 32)
    x[:, 0, 0] = torch.tensor(z, dtype=torch.float32)
    result = _trainer().test(task, DataLoader(TensorDataset(x, torch.tensor(t, dtype=torch.float32)), batch_size=2),
                             verbose=False)[0]
    labelled = t >= 0
    bce = np.mean(np.logaddexp(0.0, z[labelled]) - t[labelled] * z[labelled])
    assert result["test/loss"] == pytest.approx(bce, rel=1e-6)


# ------------------------------------------------------------------ emergence fit: starts cut short by their share
EARLY_PEAK = np.array([
    -1.1359439131445457, -1.136066191856249, -1.1360688976305715, -1.1360653682662685, -1.136067560433622,
    -1.1360676476910276, -1.1360655199854524, -1.1360673222211572, -1.1360652473516804, -1.1360648980590045,
    -1.1360684529013456, -1.1360664341498183, -1.1360681896700635, -1.1360663435767904, -1.1360651541082347,
    -1.1360679332600194, -1.1360640674160236, -1.136066648482924, -1.136067714374257, -1.1360664221924155,
    -1.136065303593739, -1.1360679529262434, -1.136066269497808, -1.1360679491155756, -1.1360648020192754,
    -1.1360660837279228, -1.1360667926207753, -1.1360650096714933, -1.1360678475223023, -1.136066754770443,
    -1.1360640205778783, -1.1360664267701848, -1.136064618843026, -1.1360660374950529, -1.1360671307798365,
    -1.1360665771491834, -1.1360661825586995, -1.13606677714862, -1.1360672835054306, -1.1360672318425369,
    -1.1360680891161574, -1.1360661432783072, -1.136065797747167, -1.1360653640052147, -1.1360684836613355,
    -1.1360652949328043, -1.136066299828947, -1.13606802335993, -1.1360661594794554, -1.1360652842765493,
    -1.1360656410371266, -1.1360653932771527, -1.1360651246362974, -1.1360651849285428, -1.136066322227948,
    -1.1360688214592762, -1.1360672060048873,
])  # the reviewer's history (work/trial8.npz)


def test_a_history_whose_every_start_needs_a_little_more_than_its_share_is_fitted() -> None:
    """Eq. 9 with A 26.2, lambda 7.42, gamma 0.0221, t0 1.54, K -1.14 over 57 checkpoints, 1 % noise (an early peak):
    each of the 4 starts converges after 1,371-1,512 evaluations, over its 1,250, and the history was skipped ("did not
    converge from any of the 4 starts"); round 23, whose first start had 2,000, fitted it (R² 0.99472). R² by hand
    from the returned parameters."""
    t = np.linspace(0.0, 9842.903668960931, 57)
    fit = fit_emergence(t, EARLY_PEAK)
    x = fit.gamma * t + fit.t0
    fitted = fit.a * np.exp(-fit.lam * x) * np.log(x) + fit.k
    r2 = 1.0 - np.sum((fitted - EARLY_PEAK) ** 2) / np.sum((EARLY_PEAK - EARLY_PEAK.mean()) ** 2)
    assert fit.r2 == pytest.approx(r2, abs=1e-6) and fit.r2 == pytest.approx(0.99472, abs=1e-5)
