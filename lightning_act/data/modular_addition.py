"""Modular addition ``(a + b) mod p`` as token sequences ``[a, b, =]``, the execution-manifold task.

Xu 2026 (arXiv 2602.10496) trains attention-only transformers on it; the grokking literature
(Power et al. 2022) established it as the standard small algorithmic task. All ``p²`` pairs are
enumerated, shuffled with a fixed seed, and the first ``train_fraction`` of them are the training
set, the rest validation. Token ``p`` is ``=``; the target is the answer in ``0 … p−1``.
"""

from __future__ import annotations

import numbers

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.data.checks import check_whole
from lightning_act.data.splits import EpochShuffleSampler
from lightning_act.errors import ConfigError


def modular_addition_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``[a, b, p]`` (p² × 3, int64) and its answer ``(a + b) mod p``, in row-major order of (a, b)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


class ModularAdditionDataModule(pl.LightningDataModule):
    """Train/validation split of all ``p²`` modular-addition problems.

    Args:
        p: the modulus (a prime such as 97 or 113); the vocabulary is ``p + 1``.
        train_fraction: share of the problems used for training (0.3–0.5 in the grokking setups).
        batch_size: problems per training batch (validation uses batches of the same size).
        seed: the seed of the split and of the shuffling.
    """

    def __init__(self, p: int = 97, train_fraction: float = 0.4, batch_size: int = 512, seed: int = 0) -> None:
        super().__init__()
        check_whole("p", p, 2, 97)
        if isinstance(train_fraction, bool) or not isinstance(train_fraction, numbers.Real) or not 0.0 < train_fraction < 1.0:
            raise ConfigError(
                f"train_fraction={train_fraction!r} must be in (0, 1); pass e.g. --data.train_fraction 0.4 (the "
                "grokking setups use 0.3-0.5)"
            )
        if not 1 <= round(train_fraction * p * p) < p * p:  # the split below: an empty training or validation set
            raise ConfigError(
                f"train_fraction={train_fraction} of the {p * p} problems of p={p} leaves the training or validation "
                "set empty; pass a larger p or a train_fraction nearer 0.5"
            )
        check_whole("batch_size", batch_size, 1, 512)
        check_whole("seed", seed, None, 0)  # torch generators take any whole number
        self.p = p
        self.train_fraction = train_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def vocab_size(self) -> int:
        return self.p + 1

    def setup(self, stage: str | None = None) -> None:
        tokens, answers = modular_addition_pairs(self.p)
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(self.seed))
        cut = int(round(self.train_fraction * tokens.shape[0]))
        train, val = order[:cut], order[cut:]
        self.train_set = TensorDataset(tokens[train], answers[train])
        self.val_set = TensorDataset(tokens[val], answers[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)  # epoch e's order from (seed, e): resumable
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False)
