"""A fit resumed from a checkpoint trains on the batches an uninterrupted fit trains on, epoch by epoch.

Before round 22 every DataModule shuffled from a stream seeded once per fit and kept in no checkpoint, so the
resumed fit's first epoch replayed epoch 0's order (and each later epoch the one before it): other batches, other
weights, other monitor values than the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint
from lightning_act.data.images import ImageDataModule
from lightning_act.data.modular_addition import ModularAdditionDataModule
from lightning_act.data.stdlib_text import StdlibTextDataModule

BATCHES_PER_EPOCH = 3


class BatchRecorder(pl.LightningModule):
    """One weight fitted to the batches' mean target from their mean input: its value after the fit depends on which
    batches came in which order. Records each training batch as (epoch, its examples as a float64 array)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5]))
        self.seen: list[tuple[int, np.ndarray]] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((self.current_epoch, x.double().numpy().copy()))
        inputs, targets = x.float().reshape(len(x), -1).mean(1), y.float().reshape(len(y), -1).mean(1)
        return ((self.weight * inputs - targets) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return [batch for seen_epoch, batch in self.seen if seen_epoch == epoch]


def _stdlib_tree(root: Path) -> Path:
    for i in range(6):  # every 2nd file a validation file: 3 training files of 40 bytes
        (root / f"m{i}.py").write_bytes(bytes(range(32 + i, 72 + i)))
    return root


DATA = {
    "images": lambda tmp_path: ImageDataModule(image_size=8, in_chans=1, batch_size=16),
    "modular_addition": lambda tmp_path: ModularAdditionDataModule(p=11, batch_size=8),
    "stdlib_text": lambda tmp_path: StdlibTextDataModule(
        seq_len=4, batch_size=4, val_every=2, root=str(_stdlib_tree(tmp_path))
    ),
}


def _fit(tmp_path: Path, data_name: str, run: str, resume: bool = False, **trainer_args) -> BatchRecorder:
    pl.seed_everything(0, verbose=False)
    model = BatchRecorder()
    defaults = dict(max_epochs=3, limit_train_batches=BATCHES_PER_EPOCH, limit_val_batches=0)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        callbacks=[LastCheckpoint(dirpath=str(tmp_path / run), every_n_train_steps=trainer_args.pop("save_every", 0))],
        **{**defaults, **trainer_args},
    )
    last = tmp_path / run / "last.ckpt"
    trainer.fit(model, DATA[data_name](tmp_path), ckpt_path=str(last) if resume else None)
    return model


def _assert_same_batches(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want) == BATCHES_PER_EPOCH
    for got_batch, want_batch in zip(got, want):
        np.testing.assert_array_equal(got_batch, want_batch)


@pytest.mark.parametrize(("data_name", "reload_every"), [(name, 0) for name in sorted(DATA)] + [("images", 1)])
def test_a_fit_resumed_at_an_epoch_boundary_trains_on_the_uninterrupted_batches(tmp_path, data_name, reload_every):
    uninterrupted = _fit(tmp_path, data_name, "whole", reload_dataloaders_every_n_epochs=reload_every)
    # the cut fit's last.ckpt is written at epoch 0's end
    _fit(tmp_path, data_name, "cut", max_epochs=1, reload_dataloaders_every_n_epochs=reload_every)
    resumed = _fit(tmp_path, data_name, "cut", resume=True, reload_dataloaders_every_n_epochs=reload_every)
    assert {epoch for epoch, _ in resumed.seen} == {1, 2}
    first, second = (np.concatenate(uninterrupted.epoch_batches(epoch)) for epoch in (0, 1))
    assert not np.array_equal(first, second)  # shuffled anew each epoch: a replay of epoch 0 would show
    for epoch in (1, 2):
        _assert_same_batches(resumed.epoch_batches(epoch), uninterrupted.epoch_batches(epoch))
    assert torch.equal(resumed.weight, uninterrupted.weight)  # bitwise: same batches, same steps


def test_the_epochs_after_a_mid_epoch_resume_train_on_the_uninterrupted_batches(tmp_path):
    """A checkpoint taken inside an epoch (Ctrl-C, SIGTERM, ``every_n_train_steps``) cannot say which batches of that
    epoch were taken (Lightning warns that the loader is not resumable): the resumed epoch takes its order's first
    batches again, for the steps left in it. The next epochs are exact, as their order depends on the epoch only."""
    uninterrupted = _fit(tmp_path, "images", "whole")
    steps = BATCHES_PER_EPOCH + 1  # the cut fit's last.ckpt is written after epoch 1's first step
    _fit(tmp_path, "images", "cut", max_steps=steps, save_every=steps)
    with pytest.warns(UserWarning, match="not resumable"):
        resumed = _fit(tmp_path, "images", "cut", resume=True)
    replayed = resumed.epoch_batches(1)
    want = uninterrupted.epoch_batches(1)[: len(replayed)]
    assert len(replayed) == BATCHES_PER_EPOCH - 1
    for got_batch, want_batch in zip(replayed, want):
        np.testing.assert_array_equal(got_batch, want_batch)
    _assert_same_batches(resumed.epoch_batches(2), uninterrupted.epoch_batches(2))
