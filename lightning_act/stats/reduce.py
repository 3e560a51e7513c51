"""One packed collective per kind of reduction, instead of one per statistic.

Every monitor keeps per-rank buffers of fixed size; at a logging step all of its SUM-reduced
buffers are concatenated and all-reduced once, likewise the MAX-reduced ones, and fixed-size
sample buffers (e.g. top-k candidates) are all-gathered once. Outside an initialised process
group these are no-ops, so the same code runs in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def _unpack(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [p.numel() for p in like]
    return [chunk.reshape(p.shape) for chunk, p in zip(flat.split(sizes), like)]


def all_reduce_packed(parts: Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
    """All-reduce ``parts`` (``op`` = ``"sum"`` or ``"max"``) in one collective; returns new tensors, or in one
    process ``parts`` themselves (nothing to reduce, and a copy per part would be one more launch each)."""
    if not parts:
        return []
    if distributed_world_size() == 1:
        return list(parts)
    flat = _pack(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return _unpack(flat, parts)


def all_gather_packed(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather ``parts`` in one collective; each result has a leading world-size dimension (in one process a
    view of the part itself)."""
    if not parts:
        return []
    world = distributed_world_size()
    if world == 1:
        return [p.unsqueeze(0) for p in parts]
    flat = _pack(parts)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    per_rank = [_unpack(g, parts) for g in gathered]
    return [torch.stack([rank_parts[i] for rank_parts in per_rank]) for i in range(len(parts))]
