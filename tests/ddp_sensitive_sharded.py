"""DDP on 2 CPU processes: ``SensitiveNeurons`` with a validation loader that shards itself (an unshuffled
``DistributedSampler``) over 13 examples, which the sampler pads to 14 with example 0 again. Dumps the tracking set
the default path took, then what ``forward_fn=`` made of the same loader.

Run by tests/test_ddp.py as scenario ``sensitive_sharded`` of ddp_scenarios.py;
``python ddp_sensitive_sharded.py OUT.json`` runs it alone.
"""

import json
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.errors import LightningActError


class ShardedData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        data = toy_dataset(32)
        return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        data = toy_dataset(13, seed=1)
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))


def fit(**options) -> SensitiveNeurons:
    torch.manual_seed(0)
    monitor = SensitiveNeurons(modules=["net.head:input"], every_n_steps=1, eigenscore_passes=0, **options)
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor], devices=2, strategy="ddp", use_distributed_sampler=False)
    trainer.fit(ToyTask(BlockNet()), ShardedData())
    return monitor


def main(out_path: str) -> None:
    result = {"tracking": torch.cat(fit()._batches).flatten(1).tolist()}
    try:
        fit(forward_fn=lambda module, batch: module(batch[0]))
        result["forward_fn"] = "no error"
    except LightningActError as error:  # Lightning then ends the other rank's process: this is the last fit
        result["forward_fn"] = str(error)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
