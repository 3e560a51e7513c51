"""Round 25: LastCheckpoint refuses a ModelCheckpoint(save_last="link") of its folder; the random-number states in its
checkpoints, so that a resume with dropout (and numpy/Python draws) equals the uninterrupted fit bit for bit."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from _toy import ToyData, ToyTask
from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint
from lightning_act.errors import ConfigError

EPOCH = 8  # ToyData: 64 samples in batches of 8
MAX_STEPS = 2 * EPOCH


class FallingScoreTask(ToyTask):
    """Logs a score that falls every step, so that a ``mode="max"`` top-1 keeps its first file for good."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("score", -float(self.global_step))
        return super().training_step(batch, batch_idx)


def _info_lines(lines: list[str]) -> Any:
    return mock.patch("lightning_act.checkpointing.rank_zero_info",
                      lambda message, *args, **kwargs: lines.append(message))


def test_a_save_last_link_model_checkpoint_in_last_ckpts_folder_is_refused_in_one_line(tmp_path):
    """Before: a ModelCheckpoint(save_last="link") of LastCheckpoint's folder replaced last.ckpt by a link to its older
    top-k file at each of its checks, so last.ckpt (and ``fit(ckpt_path="last")``) went back to that step."""
    folder = tmp_path / "ck"
    saver = ModelCheckpoint(dirpath=folder, monitor="score", mode="max", save_top_k=1, every_n_train_steps=2,
                            save_last="link")
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=10, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[saver, LastCheckpoint(every_n_train_steps=3)])
    with pytest.raises(ConfigError) as refusal:
        trainer.fit(FallingScoreTask(nn.Sequential(nn.Flatten(), nn.Linear(256, 4))), ToyData())
    assert str(refusal.value) == (
        f"ModelCheckpoint(save_last='link') shares {folder.resolve()} with LastCheckpoint: its link would replace "
        "last.ckpt with its top-k file, often an older step; pass save_last=True (a copy) or give LastCheckpoint "
        "another dirpath")
    assert not folder.exists() or not any(folder.iterdir())  # refused before any save


class DrawingTask(ToyTask):
    """Dropout (torch's generator) and a loss scale drawn from numpy's and Python's: every stream steers the weights."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        scale = 1.0 + 0.5 * float(np.random.rand()) + 0.5 * random.random()
        return scale * super().training_step(batch, batch_idx)


class SigintAt(pl.Callback):
    """Ctrl-C once at the end of the training batch of optimizer step ``step`` (a plain callback: runs before
    LastCheckpoint)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def _drawing_fit(root: Path, max_steps: int = MAX_STEPS, callbacks: list = (), ckpt_path: str | None = None,
                 seed: int = 0) -> DrawingTask:
    pl.seed_everything(seed, verbose=False)  # a resume's own seed: the checkpoint's states must replace it
    task = DrawingTask()
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=2, callbacks=[*callbacks, LastCheckpoint(dirpath=str(root / "ck"))],
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(task, ToyData(), ckpt_path=ckpt_path)
    return task


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _drawing_fit(tmp_path_factory.mktemp("uninterrupted")).state_dict().items()}


def _stopped_at_the_epochs_end(root: Path) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            _drawing_fit(root, callbacks=[SigintAt(EPOCH)])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning leaves SIGINT ignored after an interrupt


@pytest.mark.parametrize("how", ["ctrl_c", "epoch_end"])
def test_a_resume_with_random_layers_equals_the_uninterrupted_fit_bitwise(tmp_path, uninterrupted, how):
    """Before: last.ckpt held no random-number states, so the resumed fit drew other dropout masks (and numpy/Python
    numbers) than the uninterrupted one from the stop on: other weights. Stopped at the epoch's end (Ctrl-C at step 8,
    or a fit that ended there) and resumed with another seed, the weights are the uninterrupted fit's bit for bit."""
    if how == "ctrl_c":
        _stopped_at_the_epochs_end(tmp_path)
    else:
        _drawing_fit(tmp_path, max_steps=EPOCH)
    resumed = _drawing_fit(tmp_path, ckpt_path=str(tmp_path / "ck" / "last.ckpt"), seed=123)
    assert uninterrupted.keys() == resumed.state_dict().keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_checkpoint_of_another_world_size_or_without_random_states_resumes(tmp_path, uninterrupted):
    """A checkpoint of two processes resumed by one says, once, that the random streams restart differently (before:
    nothing was saved, nothing said); one written before the states were saved still resumes (the fit trains to the
    end)."""
    _stopped_at_the_epochs_end(tmp_path)
    last = tmp_path / "ck" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    states = checkpoint["lightning_act_rng_states"]
    assert len(states) == 1
    checkpoint["lightning_act_rng_states"] = states * 2
    torch.save(checkpoint, tmp_path / "two.ckpt")
    lines: list[str] = []
    with _info_lines(lines):
        resumed = _drawing_fit(tmp_path / "two", ckpt_path=str(tmp_path / "two.ckpt"), seed=123)
    assert [line for line in lines if "random-number states" in line] == [
        "LastCheckpoint: the checkpoint holds the random-number states of 2 processes and this fit runs 1, so they "
        "are not restored: the random streams (dropout, shuffling) restart differently from the saved fit's"]
    assert resumed.trainer.global_step == MAX_STEPS
    del checkpoint["lightning_act_rng_states"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = _drawing_fit(tmp_path / "old", ckpt_path=str(tmp_path / "old.ckpt"), seed=123)
    assert resumed.trainer.global_step == MAX_STEPS
