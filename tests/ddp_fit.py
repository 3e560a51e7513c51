"""Fit BlockNet with monitors in one process or with DDP on 2 CPU processes; dump the histories.

Run by tests/test_ddp.py as ``python ddp_fit.py single OUT.json MONITOR [MONITOR ...]`` and, for DDP, as scenario
``fit`` of ddp_scenarios.py (``ddp``, with ``MONITORS``; ``python ddp_fit.py ddp ...`` runs it alone).
The single run uses batches of 16, the DDP run 8 per rank over the same data with an unshuffled
DistributedSampler (rank r gets indices r, r+2, ...), so both see the same global batches.
(Lightning's own injected training sampler shuffles, hence ``use_distributed_sampler=False``.)
It also counts the collectives each monitor issues while reducing a due step's buffers (``stage``).
"""

import json
import sys

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer, toy_dataset
import lightning_act.callbacks as callbacks
from lightning_act.callbacks.base import ActivationMonitor


#: The monitors tests/test_ddp.py compares between one process and DDP.
MONITORS = ["ActivationStats", "ActivationSparsity", "MassiveActivations", "DimensionalCollapse", "SensitiveNeurons"]


class ShardedToyData(ToyData):
    def _sharded(self, n: int, seed: int) -> DataLoader:
        dataset = toy_dataset(n, seed=seed)
        sampler = DistributedSampler(dataset, shuffle=False) if dist.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._sharded(self.n, seed=0)

    def val_dataloader(self) -> DataLoader:
        return self._sharded(32, seed=1)


def main(mode: str, out_path: str, names: list[str]) -> None:
    """Fit, counting the collectives issued inside each due step's reduction (``stage``); ``dist`` and
    ``ActivationMonitor`` are restored afterwards, for the fits that follow in the same process."""
    collectives = {"calls": 0, "flushes": 0}
    in_flush = [False]

    def counting(fn):
        def wrapper(*args, **kwargs):
            if in_flush[0]:
                collectives["calls"] += 1
            return fn(*args, **kwargs)

        return wrapper

    original_stage = ActivationMonitor.stage

    def counted_stage(self, trainer, step, with_extras):
        """Each due step's reduction (before its backward, or at the end of the step)."""
        in_flush[0] = True
        collectives["flushes"] += 1
        try:
            return original_stage(self, trainer, step, with_extras)
        finally:
            in_flush[0] = False

    originals = dist.all_reduce, dist.all_gather
    dist.all_reduce, dist.all_gather = counting(dist.all_reduce), counting(dist.all_gather)
    ActivationMonitor.stage = counted_stage
    try:
        pl.seed_everything(0)
        task = ToyTask(BlockNet())
        # Non-default options switch on the statistics that are off by default (CETT, temporal sparsity).
        # "Class:probe" runs the class on a fixed probe of validation batches.
        options = {
            "ActivationSparsity": {"cett_modules": "net.blocks.*.fc", "temporal_dim": 1},
            "MassiveActivations:probe": {"probe": "val", "probe_batches": 2},
        }
        monitors = [getattr(callbacks, name.partition(":")[0])(every_n_steps=2, **options.get(name, {}))
                    for name in names]
        ddp = mode == "ddp"
        trainer = quiet_trainer(
            max_steps=4, callbacks=monitors, devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
            limit_val_batches=1.0, use_distributed_sampler=False,
        )
        trainer.fit(task, ShardedToyData(batch_size=8 if ddp else 16))
    finally:
        dist.all_reduce, dist.all_gather = originals
        ActivationMonitor.stage = original_stage
    if trainer.is_global_zero:
        result = {"collectives": collectives, "history": {}}
        for monitor in monitors:
            for key, series in monitor.history.items():
                result["history"][key] = {"steps": series.steps, "values": series.values}
        with open(out_path, "w") as handle:
            json.dump(result, handle)


def ddp(out_path: str) -> None:
    """Scenario ``fit`` of ddp_scenarios.py."""
    main("ddp", out_path, MONITORS)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
