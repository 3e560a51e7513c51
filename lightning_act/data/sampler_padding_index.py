"""The dataset indices a ``DistributedSampler`` repeats to pad a dataset that does not divide among the ranks.

Shared by the monitors' probes (:mod:`lightning_act.callbacks.probe`) and the tasks' evaluation masking
(:mod:`lightning_act.tasks.sampler_padding`). The padding is told by index, not by position in the rank's batches: a
batch sampler that reorders its sampler's indices (length buckets, longest first or shuffled) puts the repeat in any
batch. Rank ``r`` of ``W`` over ``N`` examples gets the global positions ``r, r + W, ...`` of an order padded to a
multiple of ``W`` with its first indices; its entries from position ``N`` on are the padding, and (with ``N >= W``)
their indices are other ranks' real ones, never this rank's, so an index names the repeat unambiguously.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


def distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` a loader shards one dataset with (as its sampler or its batch sampler's), if any. A
    loader without one that still gives each rank other batches reads a dataset of its own per rank (pre-sharded
    files): its examples are all distinct, none is padding."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def real_in_shard(sampler: DistributedSampler) -> int:
    """How many of the rank's entries are real examples (its first ones, in the sampler's own order)."""
    size = min(len(sampler.dataset), sampler.total_size)  # type: ignore[arg-type]  # drop_last: no padding
    return len(range(sampler.rank, size, sampler.num_replicas))


def padding_indices(sampler: DistributedSampler) -> list[int]:
    """The dataset indices of the rank's padding entries (empty without padding). Iterating a ``DistributedSampler``
    draws from its own generator (``seed + epoch``), not the global one."""
    real = real_in_shard(sampler)
    if real >= sampler.num_samples:
        return []
    return list(sampler)[real:]


def padding_rows(batch_indices: list[list[int]], padding: list[int]) -> list[list[bool]]:
    """For each batch (its dataset indices), which of its rows are the padding: each padding index once."""
    left = Counter(padding)
    rows: list[list[bool]] = []
    for indices in batch_indices:
        flags = []
        for index in indices:
            flags.append(left[index] > 0)
            left[index] -= flags[-1]
        rows.append(flags)
    return rows


def dataset_indices(items: Any) -> list[int] | None:
    """A batch sampler's batch as dataset indices; ``None`` where an item is not an integer (``operator.index``)."""
    try:
        return [operator.index(item) for item in items]
    except TypeError:
        return None


class _RecordingSampler:
    """A loader's index sampler that notes the indices of each batch it gives (while ``record`` is a list): ``None``
    for a batch whose items are not integers (a multi-scale or mosaic sampler's ``(index, size)`` pairs, which the
    dataset takes whole), whose padding cannot be told by index."""

    def __init__(self, sampler: Any, record: list[list[int] | None] | None, batched: bool) -> None:
        self.sampler, self.record, self.batched = sampler, record, batched

    def __iter__(self) -> Iterator[Any]:
        for indices in self.sampler:
            if self.record is not None:
                self.record.append(dataset_indices(indices if self.batched else [indices]))
            yield indices

    def __len__(self) -> int:
        return len(self.sampler)


@contextlib.contextmanager
def recording_indices(loader: Any) -> Iterator[list[list[int] | None] | None]:
    """Inside, the dataset indices of each batch read from ``loader``, in the order the batches come out (``None`` for
    a batch whose items are not indices); ``None`` where they are not needed (no ``DistributedSampler``: nothing is
    padding) or cannot be known (not a torch ``DataLoader``, or one that yields batches as its workers finish them,
    ``in_order=False``). The loader's batch sampler (or sampler) is swapped for a recording one and put back after; only
    an iterator made inside reads it (a persistent-worker loader resets the iterator it keeps, which goes on with the
    sampler it was made with: read it through a new one, :func:`~lightning_act.callbacks.probe.own_iterator`)."""
    unknowable = not isinstance(loader, DataLoader) or not getattr(loader, "in_order", True)
    if distributed_sampler(loader) is None or unknowable:
        yield None
        return
    batched = loader.batch_sampler is not None
    attribute = "batch_sampler" if batched else "sampler"
    original = getattr(loader, attribute)
    record: list[list[int] | None] = []
    recorder = _RecordingSampler(original, record, batched)
    object.__setattr__(loader, attribute, recorder)  # DataLoader refuses to set it once built
    try:
        yield record
    finally:
        object.__setattr__(loader, attribute, original)
        recorder.record = None
