"""Which panels earn their place: what to draw for each monitor statistic across the compared runs.

A panel that shows nothing (a statistic equal to one value everywhere), a second copy of
another panel (``massive/*/top1`` is the same number as ``top0_value``) or integer positions
drawn as a continuous line all cost the reader time. :func:`plan_statistics` decides per
statistic, from the logged values of every run, whether it becomes curves + heatmap, one line
of text, a mention under the statistic it duplicates, or a table/scatter of positions.
Pure functions of the series; the page is drawn in :mod:`lightning_act.report.html`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lightning_act.report.runlog import Series

#: Statistics that hold integer positions (token or feature index of the largest entries).
INDEX_STAT = re.compile(r"^top(\d+)_(token|feature)$")

#: How a statistic that is one value everywhere is said in one line, per (monitor, stat, value).
CONSTANT_PHRASES: dict[tuple[str, str, float], str] = {
    ("act", "nonfinite", 0.0): "no non-finite values (NaN/inf) in any layer at any logged step",
    ("sparsity", "nonfinite", 0.0): "no non-finite values (NaN/inf) in any layer at any logged step",
    ("massive", "count", 0.0): "no massive activations: the count of massive entries is 0 in every layer at every logged step",
    ("massive", "count_per_sample", 0.0): "count_per_sample is 0 everywhere (no massive activations)",
    ("collapse", "collapsed", 0.0): "no layer fell below the collapse threshold (warn_below) at any logged step",
}

#: ``{run label: {layer: series}}`` for one statistic.
PerRun = dict[str, dict[str, Series]]


@dataclass
class StatisticPlan:
    """What the page shows for one statistic of one monitor."""

    stat: str
    kind: Literal["curves", "constant", "duplicate", "index", "no_finite"]
    text: str = ""
    duplicates: list[str] = field(default_factory=list)
    non_finite_layers: list[str] = field(default_factory=list)


def _finite_values(per_run: PerRun) -> list[float]:
    return [v for layers in per_run.values() for series in layers.values() for v in series.values if math.isfinite(v)]


def _same_points(a: PerRun, b: PerRun) -> bool:
    """Whether two statistics logged the same values at the same steps, for every run and layer."""
    if a.keys() != b.keys():
        return False
    for run, layers in a.items():
        if layers.keys() != b[run].keys():
            return False
        for layer, series in layers.items():
            other = b[run][layer]
            if series.steps != other.steps:
                return False
            for x, y in zip(series.values, other.values, strict=True):
                if not (x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9 * max(abs(x), abs(y))):
                    return False
    return True


def constant_text(prefix: str, stat: str, value: float) -> str:
    """One line for a statistic that is ``value`` in every layer, step and run."""
    return CONSTANT_PHRASES.get((prefix, stat, value), f"{stat} is {value:.6g} in every layer at every logged step")


def plan_statistics(prefix: str, stats: dict[str, PerRun]) -> list[StatisticPlan]:
    """A plan per statistic (``fit_*`` emergence-fit parameters excluded: they get their own section).

    Order of the rules: positions → index; nothing finite → no_finite; one finite value at every point →
    constant; the same points as an earlier kept statistic → duplicate (listed under it);
    otherwise curves. Layers whose series is entirely non-finite are named on the plan.
    """
    plans: list[StatisticPlan] = []
    kept: list[StatisticPlan] = []
    for stat, per_run in stats.items():
        if stat.startswith("fit_"):
            continue
        non_finite = sorted({
            layer for layers in per_run.values() for layer, series in layers.items()
            if len(series) and not any(math.isfinite(v) for v in series.values)
        })
        values = _finite_values(per_run)
        every_point_finite = len(values) == sum(len(s) for layers in per_run.values() for s in layers.values())
        if INDEX_STAT.match(stat):
            plan = StatisticPlan(stat, "index")
        elif not values:
            plan = StatisticPlan(stat, "no_finite", text=f"{stat}: no finite value was logged (only NaN/inf)")
        elif min(values) == max(values) and every_point_finite:  # else "one value everywhere" would hide the NaNs
            plan = StatisticPlan(stat, "constant", text=constant_text(prefix, stat, values[0]))
        else:
            original = next((p for p in kept if _same_points(stats[p.stat], per_run)), None)
            if original is not None:
                original.duplicates.append(stat)
                plan = StatisticPlan(stat, "duplicate", text=f"{stat} is identical to {original.stat} (shown once)")
            else:
                plan = StatisticPlan(stat, "curves")
                kept.append(plan)
        plan.non_finite_layers = non_finite
        plans.append(plan)
    return plans
