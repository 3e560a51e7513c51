"""DDP on 2 CPU processes: a Ctrl-C that reaches rank 1 alone during epoch 0's validation. Rank 0 writes how its fit
ended and the step of the last.ckpt written to ``OUT`` (JSON); it ends rank 1 as it ends an interrupted fit.

Run by tests/test_ddp.py as scenario ``ctrl_c_in_validation`` of ddp_scenarios.py (an ender: the last of its launch);
``python ddp_ctrl_c_in_validation.py OUT`` runs it alone.
"""

import json
import os
import signal
import sys
from typing import Any

import torch

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.checkpointing import LastCheckpoint

STEPS_PER_EPOCH = 4  # 64 examples, 2 ranks, batches of 8


class CtrlCOnRank1InValidation(ToyTask):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_rank == 1 and self.current_epoch == 0 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return super().validation_step(batch, batch_idx)


def main(out_path: str) -> None:
    loader = torch.utils.data.DataLoader(toy_dataset(64), batch_size=8)
    trainer = quiet_trainer(max_epochs=2, devices=2, strategy="ddp", limit_val_batches=2, enable_checkpointing=True,
                            callbacks=[LastCheckpoint(dirpath="ck")])
    try:
        trainer.fit(CtrlCOnRank1InValidation(BlockNet()), loader, loader)
        ended = "finished"
    except SystemExit as stop:  # Lightning's handler of an interrupted fit
        ended = f"exit {stop.code}"
    if trainer.is_global_zero:
        saved = torch.load("ck/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        with open(out_path, "w") as handle:
            json.dump({"saved_step": saved, "ended": ended}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
