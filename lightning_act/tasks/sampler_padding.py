"""Which examples of an evaluation batch are real, not the ``DistributedSampler``'s padding.

Under DDP the sampler pads the dataset to a multiple of the world size by repeating its first indices at the end of
the global order, then gives rank ``r`` the global positions ``r, r + world, r + 2 world, ...``. Lightning warns about
this for ``validate``/``test`` only, never during ``fit``, and a repeated example would count twice in the
validation metrics that ``ModelCheckpoint`` selects on. Masking the padding out of the metric updates makes them those
of the whole set, each example once.
"""

from __future__ import annotations

import random
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler

from lightning_act.data.sampler_padding_index import (
    dataset_indices,
    distributed_sampler,
    padding_indices,
    padding_rows,
    real_in_shard,
)

#: A custom batch sampler's index lists of the current evaluation pass, by loader (made at its batch 0).
_pass_indices: weakref.WeakKeyDictionary[Any, list[list[int]] | None] = weakref.WeakKeyDictionary()

#: The evaluation loaders said once to leave their padding in the metrics (a later fit's loader is told again; before
#: round 26 a batch sampler class was said once per process). Keyed by the loader, as :data:`_pass_indices` is: a batch
#: sampler may not hash (a dataclass) or take a weak reference (``__slots__``).
_unknown_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def real_examples(
    trainer: Any, stage: Literal["val", "test"], batch_idx: int, batch_size: int, device: torch.device | str = "cpu",
    dataloader_idx: int = 0,
) -> torch.Tensor:
    """Boolean mask over the ``batch_size`` examples of batch ``batch_idx`` of the current ``stage`` loader: ``False``
    for the sampler's padding. All ``True`` without a trainer or a ``DistributedSampler`` (one process, or a loader
    that shards itself otherwise). The ``DistributedSampler`` is the loader's sampler or its batch sampler's (Lightning
    injects it into a ``BatchSampler`` subclass; a bucketing loader shards itself so; before round 23 only the first
    was seen, and the padding counted twice). The padding is the end of the rank's share of the sampler's order:
    a ``BatchSampler`` keeping that order (torch's, or a subclass with its ``__iter__``) puts batch ``batch_idx`` at
    positions ``batch_idx * batch_size`` on; any other batch sampler's batches are told by their dataset indices
    (:func:`_custom_pass`)."""
    everything = torch.ones(batch_size, dtype=torch.bool, device=device)
    if trainer is None:
        return everything
    loaders = stage_loaders(trainer, stage)
    if not loaders:
        return everything
    loader = loaders[dataloader_idx]
    sampler = distributed_sampler(loader)
    if sampler is None or real_in_shard(sampler) >= sampler.num_samples:
        return everything
    real = real_in_shard(sampler)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:  # the sampler's indices one by one, each a whole batch (batch_size=None)
        return torch.full((batch_size,), batch_idx < real, dtype=torch.bool, device=device)
    if isinstance(batch_sampler, BatchSampler) and type(batch_sampler).__iter__ is BatchSampler.__iter__:
        positions = batch_idx * batch_sampler.batch_size + torch.arange(batch_size, device=device)
        return positions < real
    if batch_idx == 0 or loader not in _pass_indices:
        _pass_indices[loader] = _custom_pass(batch_sampler)
    indices = _pass_indices[loader]
    if indices is None or batch_idx >= len(indices) or len(indices[batch_idx]) != batch_size:
        _warn_padding_counted(loader, batch_sampler)
        return everything
    repeats = padding_rows([indices[batch_idx]], padding_indices(sampler))[0]
    return ~torch.tensor(repeats, dtype=torch.bool, device=device)


def stage_loaders(trainer: Any, stage: Literal["val", "test"]) -> list[Any]:
    """The ``stage`` loaders as a list indexed by Lightning's ``dataloader_idx``: ``trainer.val_dataloaders`` is the
    collection the user passed (one loader, a list, a dict, nested ones), which Lightning's ``CombinedLoader``
    numbers in its flattened order (a dict's values in insertion order). Taken as one loader, a dict hid its loaders'
    ``DistributedSampler``, and their padding counted (before round 24)."""
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    return [] if loaders is None else _flattened(loaders)


def _flattened(loaders: Any) -> list[Any]:
    """The loaders of a collection in ``CombinedLoader``'s order (a pytree flattening: mappings by their values, lists
    and tuples by their items, depth first)."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        return [loaders]
    return [loader for item in loaders for loader in _flattened(item)]


def _custom_pass(batch_sampler: Any) -> list[list[int]] | None:
    """The index lists a custom batch sampler gives this pass, where a pass does not depend on the global random state:
    two passes drawn from other seeds of torch's, Python's and NumPy's global generators agree (all three put back
    after). ``None`` for one that shuffles from them, or from a generator of its own that each pass moves on (these
    two passes move it too): its order this pass cannot be known; and for one whose items are not dataset indices (a
    multi-scale sampler's ``(index, size)`` pairs)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    passes = []
    try:
        with torch.random.fork_rng(devices=[]):
            for seed in (0, 1):
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                passes.append([dataset_indices(indices) for indices in batch_sampler])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if None in passes[0] or passes[0] != passes[1]:
        return None
    return passes[0]


def _warn_padding_counted(loader: Any, batch_sampler: Any) -> None:
    """Say once per loader that its batch sampler's padding stays in the metrics."""
    name = type(batch_sampler).__name__
    if loader in _unknown_warned:
        return
    _unknown_warned.add(loader)
    warnings.warn(
        f"the evaluation loader's batch sampler {name} gives batches in an order that cannot be replayed (drawn "
        "from a random state at each pass) or items that are not dataset indices, so the examples its "
        "DistributedSampler repeats to pad the set cannot be told apart: they count twice in this stage's metrics "
        "(pass DistributedSampler(..., drop_last=True), a set that divides among the ranks, or a batch sampler of "
        "dataset indices whose order is fixed for the pass, e.g. seeded from the epoch as DistributedSampler is)",
        UserWarning,
        stacklevel=3,
    )
