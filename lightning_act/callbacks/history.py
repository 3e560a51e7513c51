"""Bounded per-key histories of logged values, for end-of-fit plots, fits and resumes."""

from __future__ import annotations

from typing import Any


class BoundedSeries:
    """``(step, value)`` points whose memory stays bounded however long the run.

    When ``capacity`` points are held, every other point is dropped and only every
    ``stride``-th later point is kept, so the series always spans the whole run at a
    resolution that halves as it grows (the same scheme for every key, so layers line up).
    """

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 3:  # full at 2, thinned to [first]: one point for ever
            raise ValueError(f"history capacity must be >= 3, got {capacity}")
        self.capacity = capacity
        self.stride = 1
        self.steps: list[int] = []
        self.values: list[float] = []
        self._seen = 0

    def append(self, step: int, value: float) -> None:
        keep = self._seen % self.stride == 0
        self._seen += 1
        if not keep:
            return
        self.steps.append(int(step))
        self.values.append(float(value))
        self._thin_to_capacity()

    def _thin_to_capacity(self) -> None:
        while len(self.steps) >= self.capacity:
            self.steps, self.values = self.steps[::2], self.values[::2]
            self.stride *= 2

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
            "capacity": self.capacity, "stride": self.stride, "seen": self._seen,
            "steps": list(self.steps), "values": list(self.values),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BoundedSeries:
        series = cls(int(state["capacity"]))
        series.stride, series._seen = int(state["stride"]), int(state["seen"])
        series.steps, series.values = [int(s) for s in state["steps"]], [float(v) for v in state["values"]]
        return series
