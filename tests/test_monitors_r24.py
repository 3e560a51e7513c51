"""Round 24: SeND selections the sensitivities do not decide, SWA's batch-norm update pass, Dopamine phase 2's split."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import Block, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import (
    ActivationSparsity,
    ActivationStats,
    DimensionalCollapse,
    MassiveActivations,
    SensitiveNeurons,
)
from lightning_act.data.digits import load_digits_arrays, split_indices
from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.errors import ConfigError
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------- SeND ties
class PartlyFrozenMlp(pl.LightningModule):
    """6 → 8 (GELU) → 3 with plain SGD; only the hidden features in ``moving`` get gradients, so every other feature
    of the head's input is exactly the same at every step (a frozen layer, or a backbone before unfreezing)."""

    def __init__(self, moving: list[int]) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.head = nn.Linear(8, 3)
        mask = torch.zeros(8)
        mask[moving] = 1.0
        self.hidden[0].weight.register_hook(lambda grad: grad * mask[:, None])
        self.hidden[0].bias.register_hook(lambda grad: grad * mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _send_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)), batch_size=16)


def _fit(model: pl.LightningModule, callbacks: list[Callback], steps: int) -> dict[str, torch.Tensor]:
    quiet_trainer(max_steps=steps, callbacks=callbacks).fit(model, _send_data())
    return {name: value.clone() for name, value in model.state_dict().items()}


def _send_v(embeddings: list[np.ndarray]) -> np.ndarray:
    """SeND's V_i (docs/monitors_collapse_sensitive.md) in float64 from C + 1 checkpoints of (N, D) embeddings."""
    e = np.stack(embeddings).astype(np.float64)
    window = e[1:]
    return (window.var(axis=0) * np.abs(np.diff(e, axis=0)).sum(axis=0)).mean(axis=0)


def test_a_frozen_tap_selects_and_drops_nothing_and_logs_no_count() -> None:
    tracking = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    plain = PartlyFrozenMlp(moving=[])
    torch.manual_seed(0)
    watched = PartlyFrozenMlp(moving=[])
    monitor = SensitiveNeurons(every_n_steps=1, tracking_inputs=tracking, window=2, top_fraction=0.25, drop=True,
                               drop_checkpoints=2, eigenscore_passes=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = _fit(watched, [monitor], steps=6)
    bare = _fit(plain, [], steps=6)
    for name, value in bare.items():  # nothing dropped: bitwise the training of a fit without the monitor
        assert torch.equal(trained[name], value), name
    head_input = plain.hidden(tracking).detach().numpy()
    expected_v = _send_v([head_input] * 3)  # the same embedding at every checkpoint: V = 0 for every feature
    assert expected_v.max() == 0.0
    assert monitor.history["sensitive/head-input/v_max"].values == [0.0] * 4  # steps 2..5, a true measurement
    assert monitor.sensitive == {}
    assert monitor.history["sensitive/head-input/count"].steps == [0, 1]  # before the window was full: no set, 0
    assert monitor.history["sensitive/head-input/selected"].steps == [0, 1]
    assert "sensitive/head-input/jaccard" not in monitor.history
    assert monitor.history["sensitive/head-input/dropping"].values == [0.0] * 6
    said = [str(w.message) for w in caught if "no sensitive set" in str(w.message)]
    assert len(said) == 1 and "head-input has no sensitive set at step 2" in said[0]  # said once


def test_a_cut_that_ties_at_zero_keeps_only_the_moving_feature() -> None:
    tracking = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    sets = {}
    for top_fraction in (0.125, 0.25):  # k = 1 and k = 2 of 8 features, of which only feature 5 moves
        torch.manual_seed(0)
        monitor = SensitiveNeurons(every_n_steps=1, tracking_inputs=tracking, window=2, top_fraction=top_fraction,
                                   eigenscore_passes=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(PartlyFrozenMlp(moving=[5]), [monitor], steps=3)
        sets[top_fraction] = (monitor.sensitive.get("head-input"), [str(w.message) for w in caught])
    chosen, said = sets[0.125]
    assert chosen.tolist() == [5] and not any("no sensitive set" in line for line in said)
    chosen, said = sets[0.25]  # the second place ties at V = 0 between seven unmoved features: left empty
    assert chosen.tolist() == [5] and sum("set at step 2 holds 1 of its 2 places" in line for line in said) == 1


# ------------------------------------------------------------------------------------------------ SWA's BN update pass
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(2)])
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 4, 64))
        for block in self.blocks:
            h = block(h)
        return self.head(self.bn(h.mean(1)))


class TrainedSteps(Callback):
    """Independent of the monitors: the steps whose backward ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps.append(trainer.global_step)


def _swa_fit(monitors: list[Callback]) -> tuple[dict[str, torch.Tensor], list[int]]:
    pl.seed_everything(0, verbose=False)
    task = ToyTask(BNNet())
    trained = TrainedSteps()
    callbacks = [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1), trained, *monitors]
    quiet_trainer(max_epochs=2, callbacks=callbacks).fit(task, toy_loader(32, 8))
    return {name: value.clone() for name, value in task.state_dict().items()}, trained.steps


def test_swa_batch_norm_update_pass_is_not_monitored_and_changes_nothing() -> None:
    monitors = [
        ActivationStats(every_n_steps=1),
        ActivationSparsity(every_n_steps=1),
        MassiveActivations(every_n_steps=1),
        DimensionalCollapse(every_n_steps=1),
        SensitiveNeurons(every_n_steps=1, tracking_inputs=torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
                         window=2, eigenscore_passes=2),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, trained = _swa_fit(monitors)
    bare, _ = _swa_fit([])
    assert trained == list(range(8))  # 2 epochs of 4 batches; the update pass (step 8) has no backward
    for name, value in bare.items():
        assert torch.equal(watched[name], value), name
    for monitor in monitors:
        for key, series in monitor.history.items():
            if "/fit_" not in key:  # the emergence fit's results are logged once, at the fit's end
                assert set(series.steps) <= set(trained) and series.steps[-1] == trained[-1], key
    # one batch of 8 examples of (4 tokens × 16 features) per step, not the pass's 4 batches in one row
    assert monitors[0].history["act/net.blocks.0.act/count"].values == [8 * 4 * 16] * 8
    assert all(step in [-1, *trained] for step in monitors[3]._snapshot_steps)
    for monitor in monitors:
        said = [w for w in caught if str(w.message).startswith(f"{type(monitor).__name__}: the training batches at "
                                                               "step 8 run without backward (StochasticWeightAveraging")]
        assert len(said) == 1, type(monitor).__name__


# ------------------------------------------------------------------------------------------- Dopamine phase 2's split
def _digits(seed: int = 0, max_samples: int = 200, **kwargs: object) -> RotatedDigitsDataModule:
    return RotatedDigitsDataModule("rotated", "rotated", image_size=8, max_samples=max_samples, batch_size=64, seed=seed,
                                   **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def foundation_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=1)
    data = RotatedDigitsDataModule("mix", "rotated", image_size=8, max_samples=200, batch_size=64, seed=0)
    trainer.fit(DopamineFoundation(image_size=8, hidden_sizes=[6]), datamodule=data)
    path = tmp_path_factory.mktemp("foundation") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def _train_digits(seed: int) -> set[bytes]:
    """The foundation's training digits, independently of the datamodule: the capped images at split_indices' train
    positions."""
    images, _ = load_digits_arrays(8)
    train, _, _ = split_indices(200, 0.15, 0.35, seed)
    return {images[i].numpy().tobytes() for i in train}


@pytest.mark.parametrize(
    ("settings", "named", "fix"),
    [({"seed": 1}, "seed=1", "--data.seed 0"), ({"max_samples": 150}, "max_samples=150", "--data.max_samples 200"),
     ({"test_fraction": 0.25, "seed": 2}, "seed=2, test_fraction=0.25", "--data.seed 0 --data.test_fraction 0.35")],
)
def test_phase_two_on_another_split_than_the_foundation_is_refused(
    foundation_ckpt: Path, settings: dict, named: str, fix: str
) -> None:
    data = _digits(**settings)
    data.setup("test")
    seen = _train_digits(0)
    assert any(image.numpy().tobytes() in seen for image in data.test_set.images)  # what the refusal prevents
    module = DopamineSpecialisation(str(foundation_ckpt), method="frozen")
    with pytest.raises(ConfigError, match=rf"\({named}\) is not the foundation's.*pass {fix} \(the foundation's\)"):
        quiet_trainer(limit_test_batches=1).test(module, datamodule=data, verbose=False)


def test_phase_two_on_the_foundations_split_runs_and_an_unrecorded_one_is_said_once(
    foundation_ckpt: Path, tmp_path: Path
) -> None:
    data = _digits()
    data.setup("test")
    seen = _train_digits(0)
    assert not any(image.numpy().tobytes() in seen for image in data.test_set.images)
    module = DopamineSpecialisation(str(foundation_ckpt), method="frozen")
    quiet_trainer(limit_test_batches=1).test(module, datamodule=_digits(), verbose=False)
    checkpoint = torch.load(foundation_ckpt, weights_only=False)
    del checkpoint["datamodule_hyper_parameters"]  # a checkpoint from before the datamodule's settings were saved
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    module = DopamineSpecialisation(str(older), method="full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_steps=1, limit_test_batches=1)
        trainer.fit(module, datamodule=_digits(seed=1))
        trainer.test(module, datamodule=_digits(seed=1), verbose=False)
    assert sum("records no RotatedDigitsDataModule" in str(w.message) for w in caught) == 1
