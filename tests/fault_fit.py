"""A small fit with all four monitors every step, for the fault-injection tests.

    python tests/fault_fit.py ROOT MAX_STEPS [--ckpt_path PATH] [--delay SECONDS] [--every_n_train_steps N]
                              [--accumulate N]

writes ``ROOT/checkpoints/last.ckpt`` through AtomicCheckpointIO / LastCheckpoint and touches
``ROOT/step_<global_step>`` and ``ROOT/batch_<batches>`` after each batch so a test can tell how far it got.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _toy import BlockNet, ToyData, ToyTask  # noqa: E402

from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations, SensitiveNeurons  # noqa: E402
from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint  # noqa: E402


class StepMarker(pl.Callback):
    """Touch ``ROOT/step_N`` after optimizer step N and ``ROOT/batch_K`` after the K-th batch of this process, then
    sleep ``delay`` (time for a signal to land)."""

    def __init__(self, root: Path, delay: float) -> None:
        self.root, self.delay, self.batches = root, delay, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches += 1
        (self.root / f"step_{trainer.global_step}").touch()
        (self.root / f"batch_{self.batches}").touch()
        time.sleep(self.delay)


def monitors() -> list[pl.Callback]:
    return [ActivationSparsity(every_n_steps=1), MassiveActivations(every_n_steps=1),
            DimensionalCollapse(every_n_steps=1), SensitiveNeurons(every_n_steps=1)]


def fit(root: Path, max_steps: int, ckpt_path: str | None = None, delay: float = 0.0,
        every_n_train_steps: int = 1, accumulate: int = 1) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    root.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[*monitors(), StepMarker(root, delay),
                   LastCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=every_n_train_steps)],
        plugins=[AtomicCheckpointIO()], accumulate_grad_batches=accumulate,
    )
    trainer.fit(ToyTask(BlockNet()), ToyData(batch_size=8, n=64), ckpt_path=ckpt_path)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--ckpt_path")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--every_n_train_steps", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    fit(args.root, args.max_steps, args.ckpt_path, args.delay, args.every_n_train_steps, args.accumulate)
