"""DDP on 2 CPU processes: ``SensitiveNeurons`` with a validation loader that shards itself (an unshuffled
``DistributedSampler``, batches of 4) and pads each batch to its longest sequence, over 7 sequences, which the sampler
pads to 8 with sequence 0 again. Dumps every rank's tracking batches' shapes and last embeddings, and the final
weights that made them.

Run by tests/test_ddp.py as scenario ``sensitive_padded`` of ddp_scenarios.py;
``python ddp_sensitive_padded.py OUT.json`` runs it alone.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, DistributedSampler

from _toy import MaskedMeanNet, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons


def sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 20, (n,), generator=generator) for n in [3, 9, 5, 2, 7, 4, 8]]


def collate(items: list[torch.Tensor]) -> tuple[torch.Tensor]:
    return (pad_sequence(items, batch_first=True),)


class PaddedData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        data = sequences()
        return DataLoader(data, batch_size=2, collate_fn=collate, sampler=DistributedSampler(data, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        data = sequences()
        return DataLoader(data, batch_size=4, collate_fn=collate, sampler=DistributedSampler(data, shuffle=False))


def main(out_path: str) -> None:
    pl.seed_everything(0)
    model = MaskedMeanNet()
    monitor = SensitiveNeurons(modules=["pool"], every_n_steps=1, num_samples=8, eigenscore_passes=0, window=2)
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor], devices=2, strategy="ddp", use_distributed_sampler=False)
    trainer.fit(model, PaddedData())
    mine = {
        "shapes": [list(b.shape) for b in monitor._batches],
        "embedding": monitor.embeddings["pool"][-1].tolist(),
        "v_mean": monitor.history["sensitive/pool/v_mean"].values,
    }
    everyone: list = [None, None]
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        weights = {name: p.detach().double().tolist() for name, p in model.named_parameters()}
        with open(out_path, "w") as handle:
            json.dump({"ranks": everyone, "weights": weights}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
