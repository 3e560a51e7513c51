"""DDP on 2 CPU processes with 2 micro-batches per step: DimensionalCollapse on an exact tap (48 features, a power-law
spectrum under a common offset of 1e6) and a wide, sketched tap (96 features, a steeper spectrum with two "massive"
features at 1e4), and the exact tap's rows once more with one NaN row at step 0. Each rank's first micro-batch is summed before the ranks agree on a shared reference row at the
first flush, so those sums are moved to it. Dumps the history and each step's rows (all ranks, all micro-batches).

Run by tests/test_ddp.py as scenario ``collapse_offset`` of ddp_scenarios.py;
``python ddp_collapse_offset.py OUT.json`` runs it alone.
"""

import json
import sys

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from _toy import power_law_rows, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse



EXACT = power_law_rows(64, 48, 1.0, "common", seed=0).astype(np.float32)
WIDE = power_law_rows(64, 96, 2.0, "massive", seed=1).astype(np.float32)
SPOILED = EXACT.copy()
# rank 0's first row of its second micro-batch at step 0 (the first rows it sums: the first micro-batch's are kept
# for the logging step): that step is unknown, and must not spoil the next ones
SPOILED[16] = np.nan


class Taps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.exact, self.wide, self.spoiled = nn.Identity(), nn.Identity(), nn.Identity()
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        exact, wide, spoiled = batch
        self.spoiled(spoiled)
        return self.exact(exact).sum() * 0 + self.wide(wide).sum() * 0 + self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        data = TensorDataset(torch.from_numpy(EXACT), torch.from_numpy(WIDE), torch.from_numpy(SPOILED))
        return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))


def main(out_path: str) -> None:
    monitor = DimensionalCollapse(modules=["exact", "wide", "spoiled"], every_n_steps=1, max_rows=8, wide_dim=64, param_patterns=[])
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor], devices=2, strategy="ddp", accumulate_grad_batches=2,
                            use_distributed_sampler=False)
    trainer.fit(Taps())
    if trainer.is_global_zero:
        history = {key: {"steps": list(s.steps), "values": list(s.values)} for key, s in monitor.history.items()}
        sketched = sorted(monitor._sketch_dims)
        with open(out_path, "w") as handle:
            json.dump({"history": history, "sketched": sketched}, handle)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
