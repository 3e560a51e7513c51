"""Round 27: checkpoints of the first versions (state keys holding ``every_n_steps``), a mid-epoch resume under manual
optimization with two optimizer steps per batch, and padded dict batches. Each test fails on the code before."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning.pytorch as pl
from _toy import quiet_trainer
from lightning_act.callbacks import ActivationSparsity, MassiveActivations, SensitiveNeurons
from lightning_act.checkpointing import LastCheckpoint


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.head = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act1(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
    return DataLoader(data, batch_size=8)


def fit(callbacks: list[pl.Callback], ckpt: Path | None = None, save_to: Path | None = None, **trainer: Any) -> list[str]:
    """8 steps (4 per epoch) of ``Net``; ``save_to``: the checkpoint at step 4 as ``save_to/sstep=4.ckpt``."""
    extra = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=4, save_top_k=-1, filename="s{step}")] if save_to else []
    pl.seed_everything(0, verbose=False)
    options = dict(max_steps=8, callbacks=[*callbacks, *extra], enable_checkpointing=bool(save_to))
    options.update(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(**options).fit(Net(), loader(), ckpt_path=ckpt)
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------ 1. state keys of the first versions
def monitors() -> list[pl.Callback]:
    tracking = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    return [ActivationSparsity(modules=["act1"], every_n_steps=1),
            SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=tracking, window=2)]


def as_first_versions(ckpt: Path, out: Path) -> Path:
    """The checkpoint with each monitor's state under the key the first versions wrote (before 2563b49):
    ``Kind{'modules': [...as spelled], 'every_n_steps': N}``."""
    checkpoint = torch.load(ckpt, weights_only=False)
    renamed = {}
    for key, state in checkpoint["callbacks"].items():
        kind = key.partition("{")[0]
        if kind in ("ActivationSparsity", "SensitiveNeurons"):
            key = f"{kind}{{'modules': ['act1'], 'every_n_steps': 1}}"
        renamed[key] = state
    checkpoint["callbacks"] = renamed
    torch.save(checkpoint, out)
    return out


def test_state_keyed_on_every_n_steps_continues_every_monitor(tmp_path: Path) -> None:
    """Histories (and SeND's window) continue as the uninterrupted run's; they were dropped with a warning that
    blamed "other modules" although the modules were the same."""
    uninterrupted = monitors()
    fit(uninterrupted)
    fit(monitors(), save_to=tmp_path / "part")
    old = as_first_versions(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt")
    resumed = monitors()
    said = fit(resumed, ckpt=old)
    assert not [m for m in said if "other modules" in m]
    for full, res in zip(uninterrupted, resumed, strict=True):
        assert sorted(res.history) == sorted(full.history)
        for key, series in full.history.items():
            assert res.history[key].steps == series.steps, key
            np.testing.assert_allclose(res.history[key].values, series.values, rtol=1e-6, atol=1e-9, err_msg=key)
    assert resumed[1].checkpoints == uninterrupted[1].checkpoints


def test_state_of_other_modules_keyed_on_every_n_steps_still_says_other_modules(tmp_path: Path) -> None:
    fit([ActivationSparsity(modules=["act1"], every_n_steps=1)], save_to=tmp_path / "part")
    old = as_first_versions(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt")
    resumed = ActivationSparsity(modules=["fc1"], every_n_steps=1)
    said = fit([resumed], ckpt=old)
    assert len([m for m in said if "other modules" in m]) == 1
    assert all(series.steps[0] == 4 for series in resumed.history.values())


# ------------------------------------------------------------------ 2. mid-epoch resume, two optimizer steps a batch
class BatchIndexed(Dataset):
    """16 rows, 4 a batch; the second column holds the batch's index in the epoch."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)), torch.tensor(i // 4)


class TwoOptimizerSteps(pl.LightningModule):
    """A critic's and a model's optimizer step per batch (STAN's SeizureForecaster)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.critic = nn.Linear(4, 1), nn.Linear(4, 1)
        self.batches: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.batches.append(int(batch[1][0]))
        model_opt, critic_opt = self.optimizers()
        for opt, net in ((critic_opt, self.critic), (model_opt, self.model)):
            opt.zero_grad()
            self.manual_backward(net(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return (torch.optim.SGD(self.model.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01))


class OneOptimizerStep(TwoOptimizerSteps):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batches.append(int(batch[1][0]))
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.01)


def fit_to(model: pl.LightningModule, max_steps: int, folder: Path, ckpt: Path | None = None) -> list[str]:
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[LastCheckpoint(dirpath=folder)], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(BatchIndexed(), batch_size=4), ckpt_path=ckpt)
    return [str(w.message) for w in caught if "first batches again" in str(w.message) or "not resumable" in str(w.message)]


def test_mid_epoch_resume_with_two_optimizer_steps_a_batch_says_the_epoch_restarts(tmp_path: Path) -> None:
    """2 of 4 batches done = global_step 4, a multiple of Lightning's 4 optimizer steps an epoch: Lightning says
    nothing, and the resumed fit trains on batches 0 and 1 again (the documented behaviour); one line says so."""
    fit_to(TwoOptimizerSteps(), 4, tmp_path)
    resumed = TwoOptimizerSteps()
    said = fit_to(resumed, 8, tmp_path, ckpt=tmp_path / "last.ckpt")
    assert resumed.batches == [0, 1]
    assert len(said) == 1 and "after 2 of its epoch's 4 training batches" in said[0]


def test_mid_epoch_resume_lightning_warns_of_is_said_once(tmp_path: Path) -> None:
    fit_to(OneOptimizerStep(), 2, tmp_path)
    said = fit_to(OneOptimizerStep(), 4, tmp_path, ckpt=tmp_path / "last.ckpt")
    assert len(said) == 1 and "not resumable" in said[0]  # Lightning's own


def test_end_of_epoch_resume_with_two_optimizer_steps_a_batch_says_nothing(tmp_path: Path) -> None:
    fit_to(TwoOptimizerSteps(), 8, tmp_path)
    assert fit_to(TwoOptimizerSteps(), 12, tmp_path, ckpt=tmp_path / "last.ckpt") == []


# ------------------------------------------------------------------ 3. padded dict batches
class TokenNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.act, self.head = nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head(self.act(self.embed(batch["input_ids"]))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def padded_batches(pad_in_batch: int | None) -> list[dict[str, torch.Tensor]]:
    """4 batches of (2, 5) token ids; batch ``pad_in_batch`` has a sequence of 3 tokens and 2 pads."""
    batches = []
    for i in range(4):
        mask = torch.ones(2, 5, dtype=torch.long)
        if i == pad_in_batch:
            mask[1, 3:] = 0
        batches.append({"input_ids": torch.arange(10).reshape(2, 5) * mask, "attention_mask": mask})
    return batches


def padding_warnings(pad_in_batch: int | None, every_n_steps: int = 1) -> list[str]:
    monitors = [ActivationSparsity(modules=["act"], every_n_steps=every_n_steps),
                MassiveActivations(modules=["act"], every_n_steps=every_n_steps)]
    trainer = quiet_trainer(max_steps=4, callbacks=monitors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TokenNet(), DataLoader(padded_batches(pad_in_batch), batch_size=None))
    return [str(w.message) for w in caught if "attention_mask" in str(w.message)]


def test_padded_dict_batch_of_a_due_step_is_said_once_per_monitor() -> None:
    said = padding_warnings(pad_in_batch=2)
    assert len(said) == 2
    assert said[0].startswith("ActivationSparsity: the training batch at step 2 holds an attention_mask with zeros")
    assert said[1].startswith("MassiveActivations: the training batch at step 2")


def test_batches_without_padding_or_padding_off_due_steps_say_nothing() -> None:
    assert padding_warnings(pad_in_batch=None) == []
    assert padding_warnings(pad_in_batch=1, every_n_steps=2) == []  # steps 0 and 2 are due
