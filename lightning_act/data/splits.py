"""The loader plumbing shared by every DataModule here: train / val / test datasets made by ``setup``."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """Each epoch's order of ``range(size)``, a permutation drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` at every training epoch's start, a resumed fit's first one included, so a fit
    resumed from a checkpoint taken at an epoch's end draws the orders an uninterrupted fit draws (a stream running
    through the fit would start over at the resume: no checkpoint holds its state). The order depends on nothing
    else: not on ``num_workers``, the global RNG or how often the loader is rebuilt. Under DDP Lightning wraps the
    sampler in a ``DistributedSamplerWrapper``, which reshuffles this order from the global seed and the epoch that
    Lightning sets on it, so a resume is exact there too.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # Spread the seeds apart (as DistributedSampler's seed + epoch does not): seed s's epoch 1 is not seed s+1's
        # epoch 0, so runs of a seed sweep do not share orders.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class SplitDataModule(pl.LightningDataModule):
    """Serves ``train_set``, ``val_set`` and ``test_set`` (predict reads the test split).

    Subclasses set ``batch_size`` and ``num_workers`` in ``__init__`` and the three datasets in
    ``setup``; a loader asked for before ``setup`` runs it. Training batches are shuffled by an
    :class:`EpochShuffleSampler` of :meth:`shuffle_seed`, read at the fit's first training loader: each epoch's order
    is the same whatever ``num_workers``, the global RNG that augmentation consumes, a reload of the loader, or a
    resume from a checkpoint taken at an epoch's end.
    """

    batch_size: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    _fit_shuffle_seed: int | None = None

    def shuffle_seed(self) -> int:
        """The seed of the training orders: the global seed (``seed_everything``'s)."""
        return torch.initial_seed()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if getattr(self, f"{split}_set") is None:
            self.setup("fit" if split in ("train", "val") else "test")
        dataset = getattr(self, f"{split}_set")
        sampler = None
        if shuffle:
            if self._fit_shuffle_seed is None:
                self._fit_shuffle_seed = self.shuffle_seed()
            sampler = EpochShuffleSampler(len(dataset), self._fit_shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def teardown(self, stage: str) -> None:
        """A fit ended: the next one reads the seed again (``seed_everything`` before each of two fits of one
        DataModule gives both the same orders, as a fresh DataModule would)."""
        if stage == "fit":
            self._fit_shuffle_seed = None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
