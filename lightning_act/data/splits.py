"""The loader plumbing shared by every DataModule here: train / val / test datasets made by ``setup``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(pl.LightningDataModule):
    """Serves ``train_set``, ``val_set`` and ``test_set`` (predict reads the test split).

    Subclasses set ``batch_size`` and ``num_workers`` in ``__init__`` and the three datasets in
    ``setup``; a loader asked for before ``setup`` runs it. Training batches are shuffled with
    :meth:`shuffle_generator` (default: the global RNG, which ``seed_everything`` fixes).
    """

    batch_size: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def shuffle_generator(self) -> torch.Generator | None:
        return None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if getattr(self, f"{split}_set") is None:
            self.setup("fit" if split in ("train", "val") else "test")
        return DataLoader(
            getattr(self, f"{split}_set"),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self.shuffle_generator() if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
