"""Review of round 29 (R1): under DDP every rank takes rank 0's decision on rerunning the EigenScore passes, and the
ranks agree on the validation loader a probe reads; per-frame and per-step rows of video and float-series inputs are
tracked again; a forward drawing from a generator of its own or Python's ``random`` has its passes run; a sparse
parameter no longer crashes the probes. The DDP test reads its fit, scenario ``rank_zero_draws`` of
ddp_scenarios.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import BlockNet, SquaredOutputTask, ToyTask, quiet_trainer, toy_dataset
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.callbacks.probe import call_forward, probing
from lightning_act.callbacks.sensitive import _flattened_tokens

PASSES = 4


# ------------------------------------------------------------------------------------ DDP: 2 CPU processes, gloo
class DrawsOnRankZero(BlockNet):
    """Draws a random number in its eval forwards on rank 0 only (a rank-zero-only visualisation picking an example),
    and counts its eval forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.evals = [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.evals[0] += 1
            if torch.distributed.get_rank() == 0:
                torch.randint(0, 2, (1,))
        return super().forward(x)


class RankShardedFirstLoader(pl.LightningDataModule):
    """Validation dataloader 0 reads each rank's pre-sharded examples (all ones; rank 1's shard is empty), dataloader
    1 another set (all -7, an OOD set)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(toy_dataset(16), batch_size=8)

    def val_dataloader(self) -> list[DataLoader]:
        x = torch.ones(4 if self.trainer.global_rank == 0 else 0, 1, 16, 16)
        ood = torch.full((4, 1, 16, 16), -7.0)
        return [DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=4),
                DataLoader(TensorDataset(ood, torch.zeros(4, dtype=torch.long)), batch_size=4)]


@pytest.mark.ddp_scenario("rank_zero_draws")
def test_ddp_ranks_agree_on_the_passes_and_on_the_validation_loader(ddp_scenario) -> None:
    # Before: rank 0, whose clean pass drew, ran the K passes and their broadcast alone (gloo aborted); and rank 1,
    # whose loader 0 is empty, took loader 1's OOD examples into the union (-7 beside 1, silently).
    rank0, rank1 = (ddp_scenario.json(f"rank_zero_draws.{rank}.json") for rank in range(2))
    for result in (rank0, rank1):
        assert result["values"] == [1.0]  # loader 0's examples only, rank 0's 4
        assert result["examples"] == 4
        # fit start (rank 0 only: rank 1 read no batch) + 2 checkpoints of a clean pass and K passes, on every rank
        assert result["evals"] == (1 if result["rank"] == 0 else 0) + 2 * (1 + PASSES)
    assert rank0["eigenscore"] == rank1["eigenscore"] and len(rank0["eigenscore"]) == 2


def rank_zero_draws(out: Path) -> None:
    torch.manual_seed(0)
    net = DrawsOnRankZero()
    monitor = SensitiveNeurons(modules=["net.blocks.0"], every_n_steps=1, eigenscore_passes=PASSES, num_samples=8)
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor], devices=2, strategy="ddp", use_distributed_sampler=False)
    trainer.fit(ToyTask(net), RankShardedFirstLoader())
    result = {
        "rank": trainer.global_rank,
        "values": sorted({float(v) for batch in monitor._batches for v in batch.flatten().tolist()}),
        "examples": sum(monitor._batch_examples),
        "evals": net.evals[0],
        "eigenscore": monitor.history["sensitive/net.blocks.0/eigenscore"].values,
    }
    (out / f"rank_zero_draws.{trainer.global_rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------ rows of B·T
def test_flattened_rows_of_video_and_float_series_inputs_count_as_tokens_images_do_not() -> None:
    # Before: only 3-D inputs and integer (B, T) ids had B·T rows, so a video's per-frame backbone and a float
    # series' per-step head were left out
    assert _flattened_tokens(torch.zeros(2, 3, 1, 8, 8)) == 6  # video (B, T, C, H, W)
    assert _flattened_tokens(torch.zeros(2, 5)) == 10  # float series (B, T)
    assert _flattened_tokens(torch.zeros(2, 5, dtype=torch.long)) == 10  # token ids
    assert _flattened_tokens(torch.zeros(2, 5, 7)) == 10  # a sequence
    assert _flattened_tokens(torch.zeros(2, 4, 8, 8)) is None  # an image's axis 1 holds channels
    assert _flattened_tokens(torch.zeros(2)) is None


class Series(SquaredOutputTask):
    """A float series (B, T) through a per-step MLP on each step's value: B·T rows at ``step.2``."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        return self.head(self.step(x.reshape(b * t, 1)).view(b, t, -1).mean(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_per_step_head_of_a_float_series_is_tracked() -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    monitor = SensitiveNeurons(modules=["step.2"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
        Series(), DataLoader(TensorDataset(x), batch_size=4), DataLoader(TensorDataset(x), batch_size=4)
    )
    assert "step.2" not in monitor._rows_not_examples
    assert monitor.embeddings["step.2"][-1].shape == (48, 8)  # 8 series of 6 steps, one row per step


# ------------------------------------------------------------------------------------ draws the probes seed
class OwnNoiseVae(pl.LightningModule):
    """Samples its latent from ``source``: a generator of its own or Python's ``random`` (no dropout module)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.gen = torch.Generator().manual_seed(1)
        self.enc = nn.Linear(16, 4)
        self.dec = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.enc(x)
        if self.source == "generator":
            noise = torch.randn(mu.shape, generator=self.gen)
        elif self.source == "python":
            noise = torch.tensor([[random.gauss(0.0, 1.0) for _ in range(mu.shape[1])] for _ in range(mu.shape[0])])
        else:
            noise = torch.zeros_like(mu)
        return self.dec(mu + noise)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self(batch[0]) - batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _probe_forwards(source: str) -> int:
    torch.manual_seed(0)
    model = OwnNoiseVae(source)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a: None if torch.is_grad_enabled() else forwards.append(1))
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    monitor = SensitiveNeurons(modules=["dec.1"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    quiet_trainer(max_steps=1, callbacks=[monitor]).fit(
        model, DataLoader(TensorDataset(data), batch_size=4), DataLoader(TensorDataset(data), batch_size=8)
    )
    return len(forwards)


def test_a_forward_drawing_from_its_own_generator_or_pythons_random_has_its_passes_run() -> None:
    # Before: only torch's default generators were read, so these had their clean pass reused K times (2 forwards)
    assert _probe_forwards("generator") == 1 + 1 + PASSES  # fit start, clean pass, K passes
    assert _probe_forwards("python") == 1 + 1 + PASSES
    assert _probe_forwards("none") == 1 + 1  # draws nothing: the clean pass reused


def test_drew_random_reads_every_source_the_probes_seed() -> None:
    from lightning_act.callbacks.probe import drew_random  # new in this review

    model = OwnNoiseVae("none")
    x = torch.zeros(2, 16)
    for source, drew in [("none", False), ("generator", True), ("python", True)]:
        model.source = source
        with probing(None, model, torch.device("cpu")):
            call_forward("test", lambda module, batch: module(batch), model, x)
            assert drew_random() is drew, source
    assert drew_random() is False  # outside a probe


# ------------------------------------------------------------------------------------ sparse parameters
class SparseNet(SquaredOutputTask):
    """A sparse adjacency parameter (``torch.sparse.mm``), frozen, between dense layers."""

    def __init__(self) -> None:
        super().__init__()
        indices = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
        self.adj = nn.Parameter(torch.sparse_coo_tensor(indices, torch.ones(4), (4, 4)), requires_grad=False)
        self.fc = nn.Linear(256, 4)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sparse.mm(self.adj, self.fc(x.flatten(1)).t()).t()
        return self.head(torch.relu(self.body(h)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_a_model_with_a_sparse_parameter_is_probed_and_trains_as_without_the_monitor() -> None:
    # Before: p.data_ptr() of the sparse parameter raised in every probe (RuntimeError), stopping the fit
    def fit(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = SparseNet()
        data = DataLoader(toy_dataset(16), batch_size=8)
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(model, data, DataLoader(toy_dataset(8, seed=1),
                                                                                     batch_size=8))
        return {name: p.detach().to_dense().clone() for name, p in model.named_parameters()}

    monitor = SensitiveNeurons(modules=["body"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    monitored, plain = fit([monitor]), fit([])
    for name, weight in plain.items():
        assert torch.equal(monitored[name], weight), name
    assert monitor.embeddings["body"][-1].shape == (8, 8)

