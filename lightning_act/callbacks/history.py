"""Bounded per-key histories of logged values, for end-of-fit plots, fits and resumes."""

from __future__ import annotations

import math
from typing import Any


class BoundedSeries:
    """``(step, value)`` points whose memory stays bounded however long the run.

    Which points are kept depends on the step numbers alone, never on how many points were appended, so every key
    of a monitor keeps the same steps whatever values it missed (an unknown value is not appended; counting appends
    put two layers on disjoint steps once one missed a single point). A step is read as its index ``step // grid``
    on the logging grid (``grid``: the greatest common divisor of the differences between the steps seen since
    ``first_seen``, i.e. ``every_n_steps``), and the series keeps one point per index, at the indices that are
    multiples of ``stride``: the smallest power of two for which the indices from 0 to the latest one hold fewer than
    ``capacity`` multiples of it. The series spans the whole run at a resolution that halves as it grows; a history
    that starts late in a run keeps fewer points, since its share of the grid from step 0 is all it may fill.

    A step off the grid (a resume with another ``every_n_steps``) starts a new segment: the grid is measured again
    from it, so it becomes the new interval. The gcd of both intervals (1 for every 1000 then every 999) made the index
    range grow by their ratio, and the series kept one point of the whole run.
    """

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 3:  # full at 2, thinned to [first]: one point for ever
            raise ValueError(f"history capacity must be >= 3, got {capacity}")
        self.capacity = capacity
        self.stride = 1
        self.grid = 0  # 0 until two distinct steps were seen
        self.first_seen: int | None = None
        self.latest = 0
        self.steps: list[int] = []
        self.values: list[float] = []

    def append(self, step: int, value: float) -> None:
        step = int(step)
        self.advance(step)
        if self._kept(step, self.steps[-1] if self.steps else None):
            self.steps.append(step)
            self.values.append(float(value))

    def advance(self, step: int) -> None:
        """Thin as of ``step``, a due step this key had no value at (unknown, or its layer did not run): until then it
        holds points the keys that got a value there dropped, and a heatmap of both has blank columns for them."""
        step = int(step)
        if self.first_seen is None:
            self.first_seen = step
        if self.grid and step > self.latest and (step - self.latest) % self.grid:  # another interval: a new segment
            self.first_seen, self.grid = step, 0
        grid = math.gcd(self.grid, abs(step - self.first_seen))
        grid_changed = grid != self.grid
        self.grid, self.latest = grid, max(self.latest, step)
        self._thin_to_capacity(grid_changed)

    def _kept(self, step: int, previous: int | None) -> bool:
        """Whether ``step`` is kept after the held step ``previous`` (None: the first): one point per index, where a
        coarser grid after a resume reads several steps of the earlier, finer one as one index."""
        if self.grid == 0:
            return True
        index = step // self.grid
        return index % self.stride == 0 and (previous is None or previous // self.grid != index)

    def _thin_to_capacity(self, grid_changed: bool = True) -> None:
        """Set ``stride`` from the latest step and drop the held points it no longer keeps (a look at each held point
        only when the stride or the grid changed: otherwise they are all kept still)."""
        if self.grid == 0:
            return
        latest_index, stride = self.latest // self.grid, 1
        while latest_index // stride + 1 >= self.capacity:
            stride *= 2
        if stride == self.stride and not grid_changed:
            return
        self.stride = stride
        kept: list[int] = []
        for i, step in enumerate(self.steps):
            if self._kept(step, self.steps[kept[-1]] if kept else None):
                kept.append(i)
        if len(kept) < len(self.steps):
            self.steps = [self.steps[i] for i in kept]
            self.values = [self.values[i] for i in kept]

    def with_capacity(self, capacity: int) -> BoundedSeries:
        """This series held to ``capacity`` points from now on (a resume with another ``history_size``): thinned as
        if it had grown with that capacity, so the points kept are the ones the scheme keeps."""
        if capacity < 3:
            raise ValueError(f"history capacity must be >= 3, got {capacity}")
        self.capacity = capacity
        self._thin_to_capacity()
        return self

    def __len__(self) -> int:
        return len(self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity, "grid": self.grid, "first_seen": self.first_seen, "latest": self.latest,
            "steps": list(self.steps), "values": list(self.values),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BoundedSeries:
        series = cls(int(state["capacity"]))
        series.steps, series.values = [int(s) for s in state["steps"]], [float(v) for v in state["values"]]
        if "grid" in state:
            series.grid, series.latest = int(state["grid"]), int(state["latest"])
            series.first_seen = None if state["first_seen"] is None else int(state["first_seen"])
        elif series.steps:  # saved before round 21 (kept every stride-th append): the grid its held points span
            series.first_seen, series.latest = series.steps[0], max(series.steps)
            series.grid = math.gcd(*(step - series.steps[0] for step in series.steps))
        series._thin_to_capacity()
        return series
