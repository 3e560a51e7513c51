"""DDP on 2 CPU processes: epochs that end with a torchmetrics value to compute (a collective) and a checkpoint
write or another barrier, under a rank-0-only progress bar. Each (progress bar, epoch-end barrier) fit that ends is
appended to the file ``OUT``; a deadlock leaves the rest out.

Run by tests/test_ddp.py as scenario ``epoch_end`` of ddp_scenarios.py; ``python ddp_epoch_end.py OUT`` runs it alone.
"""

import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import TQDMProgressBar

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.checkpointing import LastCheckpoint
from lightning_act.progress import EpochLineProgress


class AccuracyTask(ToyTask):
    def __init__(self) -> None:
        super().__init__(BlockNet())
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.accuracy(self(batch[0]), batch[1])
        self.log("train/acc", self.accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss


class EpochEndBarrier(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("epoch end")


BARS = {"EpochLineProgress": EpochLineProgress, "TQDMProgressBar": TQDMProgressBar}
BARRIERS = {"LastCheckpoint": LastCheckpoint, "barrier": EpochEndBarrier}


def main(out_path: str) -> None:
    for bar, barrier in [("EpochLineProgress", "barrier"), ("TQDMProgressBar", "LastCheckpoint")]:
        trainer = quiet_trainer(max_epochs=1, devices=2, strategy="ddp", callbacks=[BARS[bar](), BARRIERS[barrier]()],
                                enable_progress_bar=True, enable_checkpointing=True, default_root_dir=".")
        trainer.fit(AccuracyTask(), torch.utils.data.DataLoader(toy_dataset(32), batch_size=8))
        if trainer.is_global_zero:
            with open(out_path, "a") as handle:
                handle.write(f"{bar} {barrier} {trainer.global_step}\n")


if __name__ == "__main__":
    main(sys.argv[1])
