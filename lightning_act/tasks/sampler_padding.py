"""Which examples of an evaluation batch are real, not the ``DistributedSampler``'s padding.

Under DDP the sampler pads the dataset to a multiple of the world size by repeating its first indices at the end of
the global order, then gives rank ``r`` the global positions ``r, r + world, r + 2 world, ...``. Lightning warns about
this for ``validate``/``test`` only, never during ``fit``, and a repeated example would count twice in the
validation metrics that ``ModelCheckpoint`` selects on. Masking the positions ``>= len(dataset)`` out of the metric
updates makes them those of the whole set, each example once.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import DistributedSampler


def real_examples(
    trainer: Any, stage: Literal["val", "test"], batch_idx: int, batch_size: int, device: torch.device | str = "cpu",
    dataloader_idx: int = 0,
) -> torch.Tensor:
    """Boolean mask over the ``batch_size`` examples of batch ``batch_idx`` of the current ``stage`` loader: ``False``
    for the sampler's padding. All ``True`` without a trainer or a ``DistributedSampler`` (one process, or a loader
    that shards itself otherwise). The padding is at the end of the global order whether or not the sampler shuffles,
    so this rank's real examples are the first ``len(range(rank, len(dataset), world))`` of its shard; batch
    ``batch_idx`` starts at ``batch_idx * loader.batch_size`` of it (every batch before the last is full)."""
    everything = torch.ones(batch_size, dtype=torch.bool, device=device)
    loaders = None if trainer is None else (trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders)
    if loaders is None:
        return everything
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or getattr(loader, "batch_size", None) is None:
        return everything
    real_in_shard = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
    positions = batch_idx * loader.batch_size + torch.arange(batch_size, device=device)
    return positions < real_in_shard
