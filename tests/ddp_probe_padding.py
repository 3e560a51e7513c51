"""DDP on 2 CPU processes: ``MassiveActivations(probe="val")`` with a validation loader that shards itself (an
unshuffled ``DistributedSampler``, batches of 8) over 13 examples, which the sampler pads to 14 with example 0 again.
Dumps the probe's statistics at step 0 (the initial weights); :func:`probe_statistics` with ``devices=1`` is the
same probe in one process over the 13 examples in one batch.

Run by tests/test_ddp.py as scenario ``probe_padding`` of ddp_scenarios.py;
``python ddp_probe_padding.py OUT.json`` runs it alone.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.callbacks import MassiveActivations

EXAMPLES = 13


class ProbeData(pl.LightningDataModule):
    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded

    def train_dataloader(self) -> DataLoader:
        return DataLoader(toy_dataset(16), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        data = toy_dataset(EXAMPLES, seed=1)
        if self.sharded:
            return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
        return DataLoader(data, batch_size=16)


def probe_statistics(devices: int) -> dict[str, float]:
    """The probe's statistics of ``net.blocks.0`` at step 0, thresholds 0 (``count``: every non-zero entry)."""
    pl.seed_everything(0)
    task = ToyTask(BlockNet())
    monitor = MassiveActivations(modules=["net.blocks.0"], every_n_steps=1, probe="val", probe_batches=1,
                                 abs_threshold=0.0, ratio_threshold=0.0)
    options = dict(devices=2, strategy="ddp", use_distributed_sampler=False) if devices > 1 else {}
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor], **options)
    trainer.fit(task, ProbeData(sharded=devices > 1))
    return {key: series.values[0] for key, series in monitor.history.items()}


def main(out_path: str) -> None:
    statistics = probe_statistics(2)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(statistics, handle)


if __name__ == "__main__":
    main(sys.argv[1])
