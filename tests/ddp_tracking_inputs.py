"""DDP on 2 CPU processes: ``SensitiveNeurons(tracking_inputs=...)`` with a tensor each process built on its own
(rank 1's has other rows). Dumps the line the fit stops with.

Run by tests/test_ddp.py as scenario ``tracking_inputs`` of ddp_scenarios.py; ``python ddp_tracking_inputs.py
OUT.json`` runs it alone.
"""

import json
import sys

import torch

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.errors import LightningActError


class RankDependentInputs(SensitiveNeurons):
    def on_fit_start(self, trainer, pl_module):
        self.tracking_inputs = torch.randn(16 + 8 * trainer.global_rank, 1, 16, 16)  # unseeded, per process
        super().on_fit_start(trainer, pl_module)


def main(out_path: str) -> None:
    torch.manual_seed(0)
    monitor = RankDependentInputs(modules=["net.head:input"], every_n_steps=1, eigenscore_passes=0,
                                  tracking_inputs=torch.zeros(1))
    result = {"error": "no error"}
    try:
        quiet_trainer(max_steps=2, callbacks=[monitor], devices=2, strategy="ddp").fit(ToyTask(BlockNet()), ToyData())
    except LightningActError as error:
        result["error"] = str(error)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
