"""Which panels earn their place: what to draw for each monitor statistic across the compared runs.

A panel that shows nothing (a statistic equal to one value everywhere), a second copy of
another panel (``massive/*/top1`` is the same number as ``top0_value``) or integer positions
drawn as a continuous line all cost the reader time. :func:`plan_statistics` decides per
statistic, from the logged values of every run, whether it becomes curves + heatmap, one line
of text, a mention under the statistic it duplicates, or a table/scatter of positions.
Pure functions of the series; the page is drawn in :mod:`lightning_act.report.html`.

A monitor leaves a statistic that is unknown at a step (a median outside its histogram, the moments of a tap with
no finite entry) out of the log, where it logged NaN before round 18: :func:`with_unknown` puts NaN back at the
steps where a layer logged other statistics of the monitor, so a gap and an old NaN read alike — as *unknown*,
never as a line across the gap nor as "0 everywhere".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lightning_act.report.runlog import Series, natural_key

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

#: Statistics a monitor logs at only some of a layer's steps by design (SensitiveNeurons' ``jaccard``, at
#: re-selections): a step without them is no step where they were unknown.
NOT_EVERY_STEP: dict[str, frozenset[str]] = {"sensitive": frozenset({"jaccard"})}

#: Statistics a monitor logs at every step from a first one on (SensitiveNeurons' ``v_mean``/``v_max``, once its
#: window is full): unknown at a later step without them, not before the first.
FROM_FIRST_STEP: dict[str, frozenset[str]] = {"sensitive": frozenset({"v_mean", "v_max"})}

#: Statistics a monitor logs for every layer it measures (ActivationStats' moments, ``count``, ``nonfinite`` and
#: ``zero_frac`` being counted even over NaN entries; MassiveActivations' median-based statistics, beside ``top1``,
#: which a blown-up block still has). A layer that logged others but never one of these had it unknown at every
#: step: without NaN in the log it would vanish from the report.
EVERY_LAYER: dict[str, frozenset[str]] = {
    "act": frozenset({"mean", "std", "rms", "abs_mean", "abs_max"}),
    "massive": frozenset({"median", "ratio", "count", "count_per_sample"}),
}


def format_count(value: float | None) -> str:
    """A step or a token/feature index in full: ``.4g`` would show 10000 and 10001 both as ``1e+04``."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def with_unknown(prefix: str, stats: dict[str, dict[str, Series]]) -> dict[str, dict[str, Series]]:
    """``{stat: {layer: series}}`` of one monitor in one run, each series at every step its layer logged any
    statistic of the monitor (``fit_*`` excepted), NaN (unknown) where this one was not logged.

    The monitor logs all of a layer's statistics at each due step, so a missing one was unknown there, within the
    CSV versions that logged it (``Series.spans``: one a resumed fit added was not configured before). Steps in
    order, the last value of a step kept. ``fit_*`` (logged once, at the fit) and :data:`NOT_EVERY_STEP` are kept
    as logged; :data:`EVERY_LAYER` statistics are added to the layers that lack them.
    """
    logged: dict[str, set[float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for stat, per_layer in stats.items():
        if not stat.startswith("fit_"):
            for layer, series in per_layer.items():
                logged.setdefault(layer, set()).update(series.steps)
                spans.setdefault(layer, []).extend(series.spans)
    logged = _with_silent_due_steps(logged, spans)
    filled: dict[str, dict[str, Series]] = {}
    every_layer = EVERY_LAYER.get(prefix, frozenset())
    names = [*stats, *sorted(every_layer - set(stats))] if logged else list(stats)  # a moment no layer logged
    for stat in names:
        per_layer = stats.get(stat, {})
        if stat.startswith("fit_") or stat in NOT_EVERY_STEP.get(prefix, ()):
            filled[stat] = per_layer
            continue
        layers = logged if stat in every_layer else per_layer
        filled[stat] = {}
        for layer in sorted(layers, key=natural_key):
            values = per_layer[layer].last_per_step() if layer in per_layer else {}
            steps = sorted(logged[layer])
            spans = per_layer[layer].spans if layer in per_layer else []
            if spans:  # the CSV versions that logged it: a resume may have added it
                steps = [step for step in steps if any(first <= step < end for first, end in spans)]
            if stat in FROM_FIRST_STEP.get(prefix, ()):
                steps = [step for step in steps if values and step >= min(values)]
            filled[stat][layer] = Series(steps, [values.get(step, math.nan) for step in steps])
    return filled


def _with_silent_due_steps(
    logged: dict[str, set[float]], spans: dict[str, list[tuple[float, float]]]
) -> dict[str, set[float]]:
    """Each layer's logged steps and the due steps at which it logged nothing (every statistic unknown: a
    ``DimensionalCollapse`` tap of NaN entries, a CETT-only tap): per CSV version that logged the layer (``spans``;
    none known, no step added), the steps another layer of the monitor logged there after the layer's first one, on
    its own interval there (the greatest common divisor of the distances between its steps: a second monitor of one
    class logging other modules more often, or a resume with another interval, adds none of its steps)."""
    due = sorted(set().union(*logged.values())) if logged else []
    extended: dict[str, set[float]] = {}
    for layer, steps in logged.items():
        extended[layer] = set(steps)
        for first, end in dict.fromkeys(spans.get(layer, [])):
            own = sorted(step for step in steps if first <= step < end)
            if len(own) < 2 or not all(float(step).is_integer() for step in own):
                continue
            interval = math.gcd(*(int(b - a) for a, b in zip(own, own[1:])))
            extended[layer] |= {
                step for step in due
                if own[0] < step < end and float(step).is_integer() and (int(step) - int(own[0])) % interval == 0
            }
    return extended


def unknown_words(series: Series) -> str:
    """How a series without any finite value is said: "unknown", or "unknown or infinite" when some value is inf."""
    return "unknown" if all(math.isnan(v) for v in series.values) else "unknown or infinite"


def unknown_notes(label: str, stat: str, series: Series) -> list[str]:
    """``label: stat unknown at n of m logged steps, first at step s`` (NaN or a gap), and the same for infinite
    values: where the line breaks and why."""
    notes = []
    for words, test in (("unknown", math.isnan), ("infinite", math.isinf)):
        steps = [s for s, v in zip(series.steps, series.values, strict=True) if test(v)]
        if steps:
            notes.append(f"{label}: {stat} {words} at {len(steps)} of {len(series)} logged steps, first at step "
                         f"{format_count(steps[0])}")
    return notes


@dataclass
class StatisticPlan:
    """What the page shows for one statistic of one monitor."""

    stat: str
    kind: Literal["curves", "constant", "duplicate", "index", "no_finite"]
    text: str = ""
    duplicates: list[str] = field(default_factory=list)
    unknown_layers: dict[str, str] = field(default_factory=dict)


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

    ``stats`` as :func:`with_unknown` gives them (unknown = NaN). Order of the rules: positions → index; nothing
    finite → no_finite; one finite value at every point → constant; the same points as an earlier kept statistic →
    duplicate (listed under it); otherwise curves. A statistic unknown at some step is never "one value everywhere"
    (that would be a claim about the unknown steps too): it is drawn, its gaps noted. Layers without any finite
    value are named on the plan, with how they are said (:func:`unknown_words`).
    """
    plans: list[StatisticPlan] = []
    kept: list[StatisticPlan] = []
    for stat, per_run in stats.items():
        if stat.startswith("fit_"):
            continue
        unknown_layers = dict(sorted(  # by run and layer: "<run> · <layer>" when several runs are compared
            (layer if len(per_run) == 1 else f"{run} · {layer}", unknown_words(series))
            for run, layers in per_run.items() for layer, series in layers.items()
            if len(series) and not any(math.isfinite(v) for v in series.values)
        ))
        values = _finite_values(per_run)
        every_point_finite = len(values) == sum(len(s) for layers in per_run.values() for s in layers.values())
        if INDEX_STAT.match(stat):
            plan = StatisticPlan(stat, "index")
        elif not values:
            text = f"{stat}: no finite value in any layer (unknown or infinite at every logged step)"
            plan = StatisticPlan(stat, "no_finite", text=text)
        elif min(values) == max(values) and every_point_finite:
            plan = StatisticPlan(stat, "constant", text=constant_text(prefix, stat, values[0]))
        else:
            original = next((p for p in kept if _same_points(stats[p.stat], per_run)), None)
            if original is not None:
                original.duplicates.append(stat)
                plan = StatisticPlan(stat, "duplicate", text=f"{stat} is identical to {original.stat} (shown once)")
            else:
                plan = StatisticPlan(stat, "curves")
                kept.append(plan)
        plan.unknown_layers = unknown_layers
        plans.append(plan)
    return plans
