"""Pure tensor statistics (no Lightning) and the packed cross-rank reductions."""

from lightning_act.stats.moments import MOMENT_MAXIMA, MOMENT_SUMS, moment_partials, summarize_moments
from lightning_act.stats.reduce import all_gather_packed, all_reduce_packed, distributed_world_size

__all__ = [
    "MOMENT_MAXIMA",
    "MOMENT_SUMS",
    "all_gather_packed",
    "all_reduce_packed",
    "distributed_world_size",
    "moment_partials",
    "summarize_moments",
]
