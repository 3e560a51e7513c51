"""Round 24: LastCheckpoint's save at the next batch's start keeps Lightning's batch counts (validation intervals
counted over the fit, ``check_val_every_n_epoch=None``), and a SIGTERM before training starts ends the fit as an
interruption."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from _toy import BlockNet, ToyData, ToyTask
from lightning_act.checkpointing import LastCheckpoint

MAX_STEPS = 20  # ToyData: 8 batches an epoch
# (check_val_every_n_epoch, val_check_interval) -> the validations' global steps, by hand: every 10 batches of the fit;
# after batches 4 and 8 of every epoch (steps 4, 8 | 12, 16 | 20)
VALIDATIONS = {(None, 10): [10, 20], (1, 4): [4, 8, 12, 16, 20]}


class SigtermAt(pl.Callback):
    """SIGTERM to this process once, at the end of training step ``step``'s batch (before LastCheckpoint's hook)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class ValidatedAt(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_start(self, trainer: pl.Trainer, *args) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def _fit(root: Path, schedule: tuple, callbacks: list = (), ckpt_path: str | None = None) -> tuple[ToyTask, list[int]]:
    pl.seed_everything(0, verbose=False)
    validated, task = ValidatedAt(), ToyTask(BlockNet())
    check_val_every_n_epoch, val_check_interval = schedule
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", max_steps=MAX_STEPS,
                         logger=CSVLogger(root, name="csv"), log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                         check_val_every_n_epoch=check_val_every_n_epoch, val_check_interval=val_check_interval,
                         callbacks=[*callbacks, validated, LastCheckpoint(dirpath=str(root / "ck"))])
    trainer.fit(task, ToyData(), ckpt_path=ckpt_path)
    return task, validated.steps


def _logged(root: Path) -> dict[str, dict[int, float]]:
    """``{key: {csv step: value}}`` over the CSV versions of ``root``, a later version's row replacing an earlier's."""
    out: dict[str, dict[int, float]] = {}
    for folder in sorted((root / "csv").glob("version_*")):
        with open(folder / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value != "":
                        out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[tuple, tuple]:
    """Per validation schedule: the uninterrupted fit's validation steps, logged rows and final weights."""
    out = {}
    for schedule in VALIDATIONS:
        root = tmp_path_factory.mktemp("uninterrupted")
        task, steps = _fit(root, schedule)
        out[schedule] = steps, _logged(root), {k: v.clone() for k, v in task.state_dict().items()}
    return out


@pytest.mark.parametrize("stop", [8, 10])  # an epoch's last step; a mid-epoch step with a validation after it
def test_a_stop_resumes_with_the_uninterrupted_fits_validation_steps(tmp_path, uninterrupted, stop):
    """Before: the stop's last.ckpt, written at the next batch's start after the validation or epoch end that followed
    the stopped step, counted the batch fetched for that start as ready: with ``check_val_every_n_epoch=None`` the
    resumed fit validated one batch early (steps 9, 19 after a stop at 8; 19 after a stop at 10). The default schedule
    (intervals counted within each epoch) is the control."""
    for schedule, expected in VALIDATIONS.items():
        steps, logged, weights = uninterrupted[schedule]
        assert steps == expected
        root = tmp_path / f"every_{schedule[0]}"
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit) as stopped:
                _fit(root, schedule, [SigtermAt(stop)])
        finally:
            signal.signal(signal.SIGINT, sigint)  # Lightning leaves SIGINT ignored after an interrupt
        assert stopped.value.code == 1
        saved = torch.load(root / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == stop
        resumed, after = _fit(root, schedule, ckpt_path=str(root / "ck" / "last.ckpt"))
        assert after == [s for s in expected if s > stop], schedule
        merged = _logged(root)
        assert sorted(merged["val/loss"]) == [s - 1 for s in expected], schedule  # CSV step = global step - 1
        assert sorted(merged["train/loss"]) == list(range(MAX_STEPS)), schedule
        if stop == 8:  # resumed at an epoch's start: the same batches as the uninterrupted fit (unshuffled data)
            for key in ("train/loss", "val/loss"):
                assert merged[key] == pytest.approx(logged[key], rel=1e-6), (schedule, key)
            for name, value in weights.items():
                assert torch.equal(resumed.state_dict()[name], value), (schedule, name)


class SigtermIn(pl.Callback):
    """SIGTERM to this process once, at the end of the sanity check's first batch or at the sanity check's end."""

    def __init__(self, where: str) -> None:
        self.where, self.sent = where, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.where == "sanity batch" and trainer.sanity_checking:
            self._send()

    def on_sanity_check_end(self, trainer: pl.Trainer, *args) -> None:
        if self.where == "sanity end":
            self._send()


@pytest.mark.parametrize("where", ["sanity batch", "sanity end"])
def test_a_sigterm_before_training_starts_ends_the_fit_as_an_interruption(tmp_path, where):
    """Before: a SIGTERM during the sanity check ended the fit with exit status 0, as a finished run (Lightning's
    SIGTERMException), so a shell loop or a scheduler did not requeue it, where a Ctrl-C exits with 1; one after the
    sanity check's last batch trained a step first. Now both end the fit with status 1 before any step, without a
    checkpoint."""
    lines: list[str] = []
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
                         limit_val_batches=2,
                         callbacks=[SigtermIn(where), LastCheckpoint(dirpath=str(tmp_path / "ck"))])
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with mock.patch("lightning_act.checkpointing.rank_zero_info", lambda message, *a, **k: lines.append(message)):
            with pytest.raises(SystemExit) as stopped:
                trainer.fit(ToyTask(BlockNet()), ToyData())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert stopped.value.code == 1
    assert trainer.global_step == 0
    assert not (tmp_path / "ck").exists()
    assert lines == ["stopped by SIGTERM before training started (step 0): nothing was trained, so no checkpoint was "
                     "written"]
