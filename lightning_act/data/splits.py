"""The loader plumbing shared by every DataModule here: train / val / test datasets made by ``setup``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class SplitDataModule(pl.LightningDataModule):
    """Serves ``train_set``, ``val_set`` and ``test_set`` (predict reads the test split).

    Subclasses set ``batch_size`` and ``num_workers`` in ``__init__`` and the three datasets in
    ``setup``; a loader asked for before ``setup`` runs it. Training batches are shuffled by a
    sampler that owns one :meth:`shuffle_generator` for each fit: the loader's
    per-epoch draws (a base seed per new iterator: every epoch without workers, once with persistent
    workers) and the global RNG that augmentation consumes do not touch it, so the order of every
    epoch is the same whatever ``num_workers``, and a reloaded loader goes on with the next order.
    """

    batch_size: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    _shuffle_stream: torch.Generator | None = None

    def shuffle_generator(self) -> torch.Generator:
        """The shuffle's random stream, seeded with the global seed (``seed_everything``'s)."""
        return torch.Generator().manual_seed(torch.initial_seed())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if getattr(self, f"{split}_set") is None:
            self.setup("fit" if split in ("train", "val") else "test")
        dataset = getattr(self, f"{split}_set")
        sampler = None
        if shuffle:
            if self._shuffle_stream is None:
                self._shuffle_stream = self.shuffle_generator()
            sampler = RandomSampler(dataset, generator=self._shuffle_stream)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def teardown(self, stage: str) -> None:
        """A fit ended: the next one shuffles from a new stream, seeded then (``seed_everything`` before each of two
        fits of one DataModule gives both the same order, as a fresh DataModule would)."""
        if stage == "fit":
            self._shuffle_stream = None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
