"""Round 27: the two bugs known from round 26.

1. DimensionalCollapse, manual optimization, resume from a checkpoint written at a batch's end
   (``ModelCheckpoint(every_n_train_steps=...)``) with other ``param_patterns``: the restarted trajectory's first
   snapshot is labelled the step before the resumed fit's first step (Lightning's own count there), as a fresh fit's
   is labelled -1, and the warning names that first step.
2. A lazy module (``nn.LazyLinear``) first run by a probe at fit start keeps its weights unmade: the fit's first
   training forward makes them, and the trained weights are bitwise those of the fit without the monitor.

Found in this round's review:

3. An unmade lazy weight tied to another module (``b.weight = lazy.weight``): every module holding it runs the probe
   on the same stand-in (only the lazy module's was replaced, and the probe ended the fit with LightningActError).
4. A resume with other ``param_patterns`` at ``max_steps`` runs no batch: DimensionalCollapse says the restart of its
   trajectory at the fit's end (it waited for the first batch, and a later resume had nothing left to say).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _toy import GAN, gan_loader, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations, SensitiveNeurons
from lightning_act.callbacks.base import training_step_index


class FirstStep(pl.Callback):
    """The monitors' step at the fit's first training batch, read there from Lightning (the independent value)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self.step is None:
            self.step = training_step_index(trainer, pl_module)


class AutoNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real, z = batch
        return (self.d(self.g(z)) - self.d(real)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_with_checkpoints(tmp_path: Path, make, max_steps: int, patterns: list[str], every: int, ckpt: str | None):
    torch.manual_seed(0)
    collapse = DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=patterns)
    first = FirstStep()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=every, save_top_k=-1)
    sparsity = ActivationSparsity(modules=["d.1"], every_n_steps=1)
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=max_steps, limit_val_batches=0,
                            enable_checkpointing=True, callbacks=[collapse, sparsity, first, checkpoints])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make(), gan_loader(64), ckpt_path=ckpt)
    said = [str(w.message) for w in caught if "new trajectory" in str(w.message)]
    return collapse, first.step, said


@pytest.mark.parametrize("make, every, first_expected", [(GAN, 6, 3), (AutoNet, 3, 3)], ids=["manual", "automatic"])
def test_a_trajectory_restarted_at_a_mid_epoch_resume_starts_at_the_resumed_fits_first_step(
    tmp_path: Path, make, every: int, first_expected: int
) -> None:
    # a never-interrupted fit: the first snapshot is labelled the step before the first one (-1 before step 0)
    uninterrupted, first, _ = _fit_with_checkpoints(
        tmp_path / "whole", make, 4 * every // 3, ["d.*.weight"], every, None)
    assert first == 0 and uninterrupted._snapshot_steps[0] == first - 1
    # 3 batches, the checkpoint written at the third one's end; the resume follows other weights (a restart)
    _fit_with_checkpoints(tmp_path, make, every, ["d.*.weight"], every, None)
    collapse, first, said = _fit_with_checkpoints(
        tmp_path, make, 8 * every // 3, ["g.*.weight"], every + 100, str(tmp_path / "mid.ckpt"))
    assert first == first_expected  # Lightning's own count at the resumed fit's first batch
    assert collapse._snapshot_steps == list(range(first - 1, first + 5))
    assert len(said) == 1 and re.search(r"from step (\d+)", said[0]).group(1) == str(first)


class LazyTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.LazyLinear(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lazy_fit(callbacks: list[pl.Callback], make=LazyTask) -> tuple[pl.LightningModule, list[str]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g))
    torch.manual_seed(0)
    task = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, callbacks=callbacks).fit(
            task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return task, [str(w.message) for w in caught if "stand-in" in str(w.message)]


def _tracking_inputs() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["massive_val_probe", "sensitive_tracking"])
def test_a_probe_before_the_first_training_forward_leaves_lazy_weights_to_the_fit(kind: str) -> None:
    plain, _ = _lazy_fit([])
    monitor = (
        MassiveActivations(modules=["block"], every_n_steps=1, probe="val")
        if kind == "massive_val_probe"
        else SensitiveNeurons(modules=["block"], every_n_steps=1, tracking_inputs=_tracking_inputs(),
                              eigenscore_passes=0, window=2)
    )
    monitored, said = _lazy_fit([monitor])
    for (name, a), (_, b) in zip(plain.named_parameters(), monitored.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert isinstance(monitored.block, nn.Linear) and monitored.block.in_features == 6
    steps = sorted({s for series in monitor.history.values() for s in series.steps})
    assert steps and steps[-1] == 2  # still measured once the training forward made the weights
    assert len(said) == 1 and "block" in said[0]  # the probe that ran on stand-ins is said once


def test_a_probe_on_stand_ins_leaves_the_lazy_module_as_it_was() -> None:
    from lightning_act.callbacks.probe import call_forward, default_forward, probing

    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d())
    weight = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with probing(None, model, torch.device("cpu")):
            call_forward("test", default_forward, model, torch.randn(4, 5, generator=torch.Generator().manual_seed(2)))
    assert type(model[0]) is nn.LazyLinear and model[0].weight is weight and nn.parameter.is_lazy(weight)
    assert nn.parameter.is_lazy(model[1].running_mean)
    # the first forward outside the probe makes the weights as a model never probed does
    reference = nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d())
    x = torch.randn(4, 5)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    assert torch.equal(out, reference(x))
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, reference[0].weight)


class TiedLazyTask(LazyTask):
    """``block``'s unmade weight is also ``mirror``'s: the first training forward makes it for both."""

    def __init__(self) -> None:
        super().__init__()
        self.mirror = nn.Linear(6, 8)
        self.mirror.weight = self.block.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(x)) + torch.tanh(self.mirror(x.flip(-1))))


@pytest.mark.parametrize("kind", ["massive_val_probe", "sensitive_tracking"])
def test_a_probe_runs_a_lazy_weight_tied_to_another_module_on_one_stand_in(kind: str) -> None:
    plain, _ = _lazy_fit([], TiedLazyTask)
    monitor = (
        MassiveActivations(modules=["block"], every_n_steps=1, probe="val")
        if kind == "massive_val_probe"
        else SensitiveNeurons(modules=["block"], every_n_steps=1, tracking_inputs=_tracking_inputs(),
                              eigenscore_passes=0, window=2)
    )
    monitored, said = _lazy_fit([monitor], TiedLazyTask)  # ended with LightningActError
    for (name, a), (_, b) in zip(plain.named_parameters(), monitored.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert monitored.mirror.weight is monitored.block.weight  # still tied
    assert len(said) == 1 and "block" in said[0]


def test_a_probe_puts_the_tied_lazy_weight_back_in_every_module() -> None:
    from lightning_act.callbacks.probe import call_forward, probing

    model = nn.ModuleDict({"lazy": nn.LazyLinear(3), "tied": nn.Linear(5, 3)})
    weight = model["tied"].weight = model["lazy"].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with probing(None, model, torch.device("cpu")):
            call_forward("test", lambda m, x: m["lazy"](x) + m["tied"](x), model, torch.randn(4, 5))
    assert model["lazy"].weight is weight and model["tied"].weight is weight and nn.parameter.is_lazy(weight)


def test_a_restart_at_a_resume_that_runs_no_batch_is_said_at_the_fits_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="end", every_n_train_steps=3)
    quiet_trainer(default_root_dir=tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[
        DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=["d.*.weight"]), checkpoints,
    ]).fit(AutoNet(), gan_loader(64))
    first = FirstStep()
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[
        DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=["g.*.weight"]), first])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(AutoNet(), gan_loader(64), ckpt_path=str(tmp_path / "end.ckpt"))  # max_steps reached already
    said = [str(w.message) for w in caught if "new trajectory" in str(w.message)]
    assert first.step is None  # no batch ran
    assert len(said) == 1 and re.search(r"from step (\d+)", said[0]).group(1) == "3"  # the step it would have run
