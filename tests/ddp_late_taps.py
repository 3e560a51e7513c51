"""DDP on 2 CPU processes: two same-shaped taps that no rank runs at the first due step; from step 2 on, rank 0 runs
only ``a`` and rank 1 only ``b`` (experts of a mixture, say), and only rank 0 a (B, D) ``pooled`` tap. Dumps what each
rank's taps produced, the history and each rank's MassiveActivations keys.

Run by tests/test_ddp.py as scenario ``late_taps`` of ddp_scenarios.py;
``python ddp_late_taps.py OUT.json`` runs it alone.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import ActivationSparsity, MassiveActivations


class Experts(BlockNet):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.pooled = nn.ReLU(), nn.ReLU(), nn.Identity()
        self.rank, self.step, self.zeros = 0, 0, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 4, 64))
        for block in self.blocks:
            h = block(h)
        if self.step >= 2:
            name, out = ("a", self.a(h)) if self.rank == 0 else ("b", self.b(h - 1.0))
            if self.training:  # entries <= 0 and all entries, per expert and step, counted independently
                counts = self.zeros.setdefault(f"{name}/{self.step}", [0, 0])
                counts[0] += int((out.detach() <= 0).sum())
                counts[1] += out.numel()
            h = h + 0 * out
            if self.rank == 0:
                h = h + 0 * self.pooled(h.mean(1))[:, None]
        return self.head(h.mean(1))


class Task(ToyTask):
    def training_step(self, batch, batch_idx):
        self.net.rank, self.net.step = self.global_rank, self.global_step
        return super().training_step(batch, batch_idx)


def main(out_path: str) -> None:
    torch.manual_seed(0)
    net = Experts()
    monitor = ActivationSparsity(modules=["net.blocks.0.act", "net.a", "net.b"], every_n_steps=2)
    massive = MassiveActivations(modules=["net.pooled"], every_n_steps=2)
    trainer = quiet_trainer(max_steps=5, callbacks=[monitor, massive], devices=2, strategy="ddp")
    trainer.fit(Task(net), ToyData(batch_size=8))
    gathered, massive_keys = [None, None], [None, None]
    dist.all_gather_object(gathered, net.zeros)
    dist.all_gather_object(massive_keys, sorted(massive.history))
    if trainer.is_global_zero:
        history = {key: {"steps": list(s.steps), "values": list(s.values)} for key, s in monitor.history.items()}
        with open(out_path, "w") as handle:
            json.dump({"zeros": {**gathered[0], **gathered[1]}, "history": history, "massive_keys": massive_keys},
                      handle)


if __name__ == "__main__":
    main(sys.argv[1])
