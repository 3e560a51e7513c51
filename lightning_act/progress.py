"""Progress for logs: one plain line per epoch instead of a carriage-return progress bar.

A TQDM bar redraws itself with ``\\r`` many times a second, which fills a redirected log
(``fit ... > run.log``) with thousands of overwritten lines. ``lightning_act fit`` uses this
instead whenever stdout is not a terminal.
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar


class EpochLineProgress(ProgressBar):
    """One plain line per epoch (``epoch 3/20  step 540  12.3 s  train/loss 0.412``) for logs.

    Also one line after each test, validate or predict run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_started = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, head: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on every rank: computing an epoch's torchmetrics value is a collective, which rank 0 alone would pair with
        # whatever collective the other ranks run next (LastCheckpoint's barrier: a deadlock under DDP)
        metrics = self.get_metrics(trainer, pl_module)
        if not self._enabled or not trainer.is_global_zero:
            return
        values = []
        for key, value in sorted(metrics.items()):
            if key != "v_num":
                values.append(f"{key} {value:.4g}" if isinstance(value, int | float) else f"{key} {value}")
        print("  ".join([head, *values]), file=sys.stdout, flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        seconds = time.monotonic() - self._epoch_started
        self._line(f"epoch {trainer.current_epoch + 1}{total}  step {trainer.global_step}  {seconds:.1f} s",
                   trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line("test done", trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._line("validation done", trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line("predict done", trainer, pl_module)
