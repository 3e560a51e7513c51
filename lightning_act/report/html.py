"""One self-contained, interactive HTML page comparing runs: ``lightning_act report RUN [RUN ...] [-o OUT]``.

The page is built from each run's local logs only (see :mod:`lightning_act.report.runlog`), so it
works without W&B, offline and after a crash. Figures are drawn by plotly.js (zoom, hover values,
legend clicks that hide a layer, a menu that shows one run, a linear/log switch); its JavaScript, from
the ``plotly`` package, is embedded once in the page, which loads nothing else (its
Content-Security-Policy forbids it). The figures are written as plain JSON data: plotly's Python
figure objects validate every property and cost about a second per figure on a busy CPU.
What is drawn for each statistic is decided by :mod:`lightning_act.report.content`.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_act._files import written_whole
from lightning_act.errors import ConfigError, LightningActError
from lightning_act.report.content import (
    INDEX_STAT, PerRun, format_count, plan_statistics, unknown_notes, unknown_words, with_unknown,
)
from lightning_act.report.runlog import (
    FIT_PARAMETERS, EmergenceFit, RunLog, Series, emergence_fits, key_kind, load_run, loader_index, metric_name,
    run_groups,
)

#: A plotly figure as plain data (``{"data": [traces], "layout": {...}}``), drawn by plotly.js in the page.
Figure = dict[str, Any]

#: What each monitor measures, shown at the top of its section.
MONITOR_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "act": (
        "Activation statistics",
        "Moments of each tapped module's output (ActivationStats): mean, std, rms, mean |a|, max |a|, "
        "fraction of exact zeros and count of non-finite values.",
    ),
    "sparsity": (
        "Activation sparsity",
        "Fraction of (near-)zero activations per layer (Lazy Neuron Phenomenon, arXiv 2210.06313), the "
        "CETT activation ratio of the down-projections (Sparsing Law, arXiv 2411.02335) and temporal "
        "sparsity where configured (ActivationSparsity).",
    ),
    "massive": (
        "Massive activations",
        "A few residual-stream entries far larger than the rest (Sun et al. 2024, arXiv 2402.17762): "
        "the top-1 magnitude, its ratio to the median, the count of massive entries and the positions "
        "of the largest ones per block (MassiveActivations). Emergence fits are drawn in their own section.",
    ),
    "collapse": (
        "Dimensional collapse",
        "How many directions the representations use: effective rank (Roy & Vetterli 2007) and "
        "participation ratio (Gao et al. 2017), also as fractions of the width; params/r90 counts the "
        "principal components of the weight trajectory (DimensionalCollapse).",
    ),
    "sensitive": (
        "Sensitive neurons",
        "Features of a fixed tracking set whose value swings most between checkpoints (SeND, "
        "arXiv 2410.15460): the set's size (count), its overlap with the previous set (jaccard), the "
        "sensitivity V (v_mean, v_max) and EigenScore/EES where enabled (SensitiveNeurons).",
    ),
}

#: The statistic MassiveActivations fits the emergence model to.
FITTED_STAT = "ratio"

#: Emergence fits with a lower R² are greyed and hidden until their legend entry is clicked.
DEFAULT_MIN_R2 = 0.5

#: Line styles that tell runs apart when colour tells layers apart.
RUN_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
#: Dashes of the curves of a key logged per loader (``val/loss/dataloader_idx_N``), one per loader (repeating from
#: the fifth): all dashed, as val/x is.
VAL_LOADER_DASHES = ("dash", "longdash", "dashdot", "longdashdot")
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": False}

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1250px;
padding:0 20px 40px;color:#222}
h1{margin-top:24px;font-size:1.6em} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin-bottom:4px}
nav ul{columns:2;padding-left:18px}
.notes{background:#fff6e0;border-left:4px solid #e0a000;padding:8px 14px}
table.t{border-collapse:collapse;font-size:90%;margin:6px 0}
table.t td,table.t th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.t td:first-child,table.t th:first-child,table.t td.l{text-align:left}
pre{background:#f6f6f6;padding:10px;overflow:auto;max-height:480px;font-size:85%}
.muted{color:#777} .fig{margin:6px 0 14px} ul.one{margin:4px 0}
"""

_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:"


def _format(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _format_logged(value: float | None) -> str:
    """A logged value as :func:`_format` shows it, but a logged NaN/inf as such ("–" is a value not logged)."""
    return str(value) if value is not None and not math.isfinite(value) else _format(value)


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short unique names for the runs: the folder name, with parents added until they differ.

    A run given twice (``runs/kat`` and ``runs/kat/``) is one line: the page would overlay it with itself.
    """
    first_given: dict[Path, str | Path] = {}
    for given in paths:
        resolved = Path(given).resolve()
        if resolved in first_given:
            raise ConfigError(f"run '{given}' is given twice (also as '{first_given[resolved]}'): pass each run once")
        first_given[resolved] = given
    names = [resolved.parts[1:] for resolved in first_given]  # below the root: joining '/' with '/' doubles it
    for depth in range(1, max((len(name) for name in names), default=0) + 1):
        labels = ["/".join(name[-depth:]) for name in names]
        if len(set(labels)) == len(labels):
            return labels
    return [str(resolved) for resolved in first_given]  # paths that differ in their root only (Windows drives)


def _layer_colours(count: int) -> list[str]:
    """Viridis from the first layer (dark) to the last (light; its yellow end is left out, too pale on white)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    viridis = colormaps["viridis"]
    return [to_hex(viridis(0.9 * i / max(1, count - 1))) for i in range(count)]


def _json(value: object) -> str:
    """JSON for a ``<script>`` block (no ``</script>`` can end it early)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def _line_points(series: Series) -> tuple[list[float], list[float | None]]:
    """Every point, a non-finite value as None (null): plotly breaks the line there instead of bridging the gap.

    A monitor statistic's unknown steps are NaN points here (:func:`~lightning_act.report.content.with_unknown`)."""
    return list(series.steps), [v if math.isfinite(v) else None for v in series.values]


def non_finite_note(key: str, series: Series) -> str | None:
    """``key: not finite (NaN/inf) at n of m logged steps, from step s`` where some of its values are not finite."""
    steps = [s for s, v in zip(series.steps, series.values, strict=True) if not math.isfinite(v)]
    if not steps:
        return None
    return (f"{key}: not finite (NaN/inf) at {len(steps)} of {len(series.steps)} logged steps, first at step "
            f"{format_count(steps[0])}")


def _finite_points(series: Series) -> tuple[list[float], list[float]]:
    points = [(s, v) for s, v in zip(series.steps, series.values, strict=True) if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def _figure_html(figure: Figure, div_id: str) -> str:
    """A div and the ``Plotly.newPlot`` call that draws ``figure`` into it."""
    height = figure["layout"].get("height", 380)
    return (
        f"<div class='fig'><div id='{div_id}' style='height:{height}px;width:100%'></div><script>"
        f"Plotly.newPlot({_json(div_id)},{_json(figure['data'])},{_json(figure['layout'])},{_json(PLOTLY_CONFIG)});"
        "</script></div>"
    )


def _axis(title: str | None = None, **extra: Any) -> dict[str, Any]:
    axis: dict[str, Any] = {"gridcolor": "#e5e5e5", "zeroline": False, "linecolor": "#999", "automargin": True}
    if title:
        axis["title"] = {"text": title}
    return axis | extra


def _layout(title: str, y_title: str | None, height: int = 380, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.5, "y": 0.97}, "height": height, "hovermode": "closest",
        "margin": {"l": 60, "r": 20, "t": 80, "b": 45}, "plot_bgcolor": "white", "paper_bgcolor": "white",
        "legend": {"groupclick": "toggleitem", "font": {"size": 10}},
        "xaxis": _axis("global step"), "yaxis": _axis(y_title),
    } | extra


def _grid(rows: int, columns: int, titles: Sequence[str], gap: float = 0.06) -> dict[str, Any]:
    """Axes and title annotations of a ``rows × columns`` grid of subplots (``xaxis``, ``xaxis2`` …)."""
    layout: dict[str, Any] = {"annotations": []}
    width = (1.0 - gap * (columns - 1)) / columns
    height = (1.0 - 2 * gap * (rows - 1)) / rows
    for index in range(rows * columns):
        row, column = divmod(index, columns)
        suffix = "" if index == 0 else str(index + 1)
        x0 = column * (width + gap)
        y1 = 1.0 - row * (height + 2 * gap)
        layout[f"xaxis{suffix}"] = _axis(domain=[x0, x0 + width], anchor=f"y{suffix}")
        layout[f"yaxis{suffix}"] = _axis(domain=[y1 - height, y1], anchor=f"x{suffix}")
        if index < len(titles):
            layout["annotations"].append({
                "text": titles[index], "showarrow": False, "xref": "paper", "yref": "paper",
                "x": x0 + width / 2, "y": y1, "xanchor": "center", "yanchor": "bottom", "font": {"size": 12},
            })
    return layout


def _controls(figure: Figure, runs: Sequence[str], log_switch: bool = True) -> None:
    """A linear/log switch and, with several runs, a menu that shows one run or all."""
    menus: list[dict[str, Any]] = []
    if log_switch:
        menus.append({
            "type": "buttons", "direction": "right", "x": 0.0, "xanchor": "left", "y": 1.13, "yanchor": "bottom",
            "showactive": True, "buttons": [
                {"label": "linear", "method": "relayout", "args": [{"yaxis.type": "linear"}]},
                {"label": "log", "method": "relayout", "args": [{"yaxis.type": "log"}]},
            ],
        })
    if len(runs) > 1:
        groups = [trace.get("legendgroup") for trace in figure["data"]]
        menus.append({
            "type": "dropdown", "x": 0.16 if log_switch else 0.0, "xanchor": "left", "y": 1.13, "yanchor": "bottom",
            "buttons": [{"label": "all runs", "method": "restyle", "args": [{"visible": [True] * len(groups)}]}] + [
                {"label": f"only {run}", "method": "restyle", "args": [{"visible": [g == run for g in groups]}]}
                for run in runs
            ],
        })
    figure["layout"]["updatemenus"] = menus


def _hover(*lines: str) -> str:
    return "<br>".join(lines) + "<extra></extra>"


def _line_trace(run: str, name: str, series: Series, several_runs: bool, hover: str, line: dict[str, Any]) -> dict[str, Any]:
    steps, values = _line_points(series)
    trace: dict[str, Any] = {
        "type": "scatter", "x": steps, "y": values, "name": name, "legendgroup": run,
        "mode": "lines+markers" if len(steps) < 40 else "lines", "line": line, "marker": {"size": 4},
        "hovertemplate": hover,
    }
    if several_runs:
        trace["legendgrouptitle"] = {"text": run}
    return trace


def curves_figure(title: str, stat: str, per_run: PerRun) -> Figure:
    """One line per run × layer: colour by layer (first dark, last light), dash by run; legend grouped by run."""
    layers = list(dict.fromkeys(layer for per_layer in per_run.values() for layer in per_layer))
    colours = dict(zip(layers, _layer_colours(len(layers)), strict=True))
    data = [
        _line_trace(
            run, layer, series, len(per_run) > 1,
            _hover(f"{html.escape(run)} · {html.escape(layer)}", "step %{x}", f"{html.escape(stat)} %{{y:.5g}}"),
            {"color": colours[layer], "dash": RUN_DASHES[index % len(RUN_DASHES)], "width": 1.6},
        )
        for index, (run, per_layer) in enumerate(per_run.items())
        for layer, series in per_layer.items()
    ]
    figure: Figure = {"data": data, "layout": _layout(title, stat)}
    _controls(figure, list(per_run))
    return figure


def heatmap_figure(title: str, stat: str, per_run: PerRun) -> Figure | None:
    """Layers × steps per run, side by side on one colour scale (missing or non-finite cells blank)."""
    runs = [run for run, per_layer in per_run.items() if len(per_layer) > 1]
    if not runs:
        return None
    layout = _grid(1, len(runs), runs if len(runs) > 1 else [], gap=0.03)
    data = []
    for index, run in enumerate(runs):
        per_layer = per_run[run]
        steps = sorted({s for series in per_layer.values() for s in series.steps})
        position = {s: j for j, s in enumerate(steps)}
        grid: list[list[float | None]] = []
        for series in per_layer.values():
            row: list[float | None] = [None] * len(steps)
            for s, v in zip(series.steps, series.values, strict=True):
                row[position[s]] = v if math.isfinite(v) else None
            grid.append(row)
        suffix = "" if index == 0 else str(index + 1)
        data.append({
            "type": "heatmap", "z": grid, "x": steps, "y": list(per_layer), "coloraxis": "coloraxis", "name": run,
            "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
            "hovertemplate": _hover(html.escape(run), "%{y}", "step %{x}", f"{html.escape(stat)} %{{z:.5g}}"),
        })
        layout[f"xaxis{suffix}"]["title"] = {"text": "global step"}
        layout[f"yaxis{suffix}"] |= {"autorange": "reversed", "showticklabels": index == 0}
        if index:
            layout[f"yaxis{suffix}"]["matches"] = "y"
    layers = max(len(per_run[run]) for run in runs)
    layout |= {
        "title": {"text": title, "x": 0.5}, "height": min(900, 170 + 22 * layers), "plot_bgcolor": "white",
        "margin": {"l": 60, "r": 20, "t": 70, "b": 45}, "coloraxis": {"colorscale": "Viridis", "colorbar": {"title": {"text": stat}}},
    }
    return {"data": data, "layout": layout}


def positions_figure(prefix: str, kind: str, per_stat: dict[str, PerRun]) -> Figure:
    """Token or feature index of the top-k entries as points (an index has no 'between')."""
    runs = list(dict.fromkeys(run for per_run in per_stat.values() for run in per_run))
    data = []
    for run_index, run in enumerate(runs):
        layers = list(dict.fromkeys(layer for per_run in per_stat.values() for layer in per_run.get(run, {})))
        colours = dict(zip(layers, _layer_colours(len(layers)), strict=True))
        for layer in layers:
            xs: list[float] = []
            ys: list[float] = []
            labels: list[str] = []
            for stat, per_run in per_stat.items():
                series = per_run.get(run, {}).get(layer)
                match = INDEX_STAT.match(stat)
                if series is None or match is None:
                    continue
                steps, values = _finite_points(series)
                xs += steps
                ys += values
                labels += [f"top {match.group(1)}"] * len(steps)
            trace: dict[str, Any] = {
                "type": "scatter", "x": xs, "y": ys, "text": labels, "name": layer, "mode": "markers", "legendgroup": run,
                "marker": {"color": colours[layer], "size": 6, "symbol": ("circle", "x", "diamond", "square")[run_index % 4]},
                "hovertemplate": _hover(f"{html.escape(run)} · {html.escape(layer)}", "step %{x}", f"%{{text}}: {kind} %{{y:d}}"),
            }
            if len(runs) > 1:
                trace["legendgrouptitle"] = {"text": run}
            data.append(trace)
    figure: Figure = {"data": data, "layout": _layout(f"{prefix}/*/top*_{kind}: {kind} index of the largest entries", f"{kind} index")}
    figure["layout"]["yaxis"]["tickformat"] = "d"
    _controls(figure, runs, log_switch=False)
    return figure


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table class='t'><tr>{head}</tr>{body}</table>"


def positions_table(per_stat: dict[str, PerRun]) -> str:
    """Per run and layer: the top-k positions at the last logged step, and how often top 0 sat there."""
    by_rank: dict[str, dict[str, str]] = {}
    for stat in per_stat:
        match = INDEX_STAT.match(stat)
        assert match is not None
        by_rank.setdefault(match.group(1), {})[match.group(2)] = stat
    rows: list[list[str]] = []
    runs = list(dict.fromkeys(run for per_run in per_stat.values() for run in per_run))
    for run in runs:
        layers = list(dict.fromkeys(layer for per_run in per_stat.values() for layer in per_run.get(run, {})))
        for layer in layers:

            def positions(rank: str) -> dict[float, tuple[float, ...]]:
                columns = [per_stat[by_rank[rank][k]].get(run, {}).get(layer, Series()) for k in ("token", "feature") if k in by_rank[rank]]
                steps = set.intersection(*(set(c.steps) for c in columns)) if columns else set()
                per_step = [c.last_per_step() for c in columns]
                known = {s: tuple(p[s] for p in per_step) for s in steps}  # an unknown position sat nowhere
                return {s: p for s, p in known.items() if all(math.isfinite(v) for v in p)}

            top = positions("0") if "0" in by_rank else {}
            if not top:
                continue
            last = max(top)
            at_last = [
                "(" + ", ".join(format_count(p) for p in positions(rank).get(last, (None,))) + ")"
                for rank in sorted(by_rank, key=int)
            ]
            held = sum(1 for p in top.values() if p == top[last])
            rows.append([html.escape(run), html.escape(layer), format_count(last), " ".join(at_last), f"{held} / {len(top)}"])
    kinds = "(token, feature)" if any("token" in r for r in by_rank.values()) else "(feature)"
    return _table(["run", "layer", "last step", f"top-k positions {kinds} at the last step", "steps top 0 was there"], rows)


def emergence_figure(fits: dict[str, dict[str, EmergenceFit | None]], points: PerRun, min_r2: float) -> Figure:
    """Per layer (one subplot each): every run's logged ratio and its fitted curve labelled with R².

    The y range is the logged points' range, so a failed fit (huge |A|) cannot flatten them;
    a fit with R² below ``min_r2`` is grey, dotted and hidden until its legend entry is clicked.
    """
    import numpy as np

    runs = list(fits)
    layers = list(dict.fromkeys(layer for per_layer in fits.values() for layer in per_layer))
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    layout = _grid(rows, columns, layers, gap=0.07)
    data: list[dict[str, Any]] = []
    for index, layer in enumerate(layers):
        suffix = "" if index == 0 else str(index + 1)
        axes = {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}
        panel_steps: list[float] = []
        panel_values: list[float] = []
        for run_index, run in enumerate(runs):
            colour = RUN_COLOURS[run_index % len(RUN_COLOURS)]
            steps, values = _finite_points(points.get(run, {}).get(layer, Series()))
            panel_steps += steps
            panel_values += values
            data.append({
                "type": "scatter", "x": steps, "y": values, "mode": "markers", "name": f"{run}: {FITTED_STAT}",
                "legendgroup": run, "showlegend": index == 0, "marker": {"color": colour, "size": 5},
                "hovertemplate": _hover(f"{html.escape(run)} · {html.escape(layer)}", "step %{x}", f"{FITTED_STAT} %{{y:.5g}}"),
            } | axes)
            fit = fits[run].get(layer)
            if fit is None:
                continue
            low, high = min([*panel_steps, fit.step, 0.0]), max([*panel_steps, fit.step])
            grid = np.linspace(low, high if high > low else low + 1.0, 200)
            good = math.isfinite(fit.r2) and fit.r2 >= min_r2
            data.append({
                "type": "scatter", "x": grid.tolist(), "y": [float(v) if math.isfinite(v) else None for v in fit.curve(grid)],
                "mode": "lines", "legendgroup": run, "visible": True if good else "legendonly",
                "name": f"{run} · {layer}: fit R² {_format(fit.r2)}" + ("" if good else f" (< {min_r2:g})"),
                "line": {"color": colour if good else "#aaaaaa", "dash": "solid" if good else "dot", "width": 1.8},
                "hovertemplate": _hover(f"{html.escape(run)} · fit R² {_format(fit.r2)}", "step %{x:.0f}", "f %{y:.5g}"),
            } | axes)
        if panel_values:
            low, high = min(panel_values), max(panel_values)
            pad = 0.1 * (high - low) if high > low else max(abs(high) * 0.1, 1e-6)
            layout[f"yaxis{suffix}"]["range"] = [low - pad, high + pad]
    layout |= {
        "title": {"text": f"massive/*/{FITTED_STAT} and its emergence fit", "x": 0.5}, "height": 90 + 260 * rows,
        "margin": {"l": 50, "r": 20, "t": 70, "b": 40}, "plot_bgcolor": "white", "hovermode": "closest",
        "legend": {"groupclick": "toggleitem", "font": {"size": 10}},
    }
    return {"data": data, "layout": layout}


class _Ids:
    """Unique element ids for the figures of one page."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, hint: str) -> str:
        self.count += 1
        return "fig-" + "".join(c if c.isalnum() else "-" for c in hint) + f"-{self.count}"


def training_section(runs: dict[str, RunLog], ids: _Ids) -> str:
    """Losses, accuracies and other non-monitor metrics: one figure per metric name, runs overlaid."""
    groups: dict[str, list[tuple[str, str]]] = {}
    notes: list[str] = []
    for run, log in runs.items():
        for key in log.training_keys():
            series = log.series[key]
            note = non_finite_note(key if len(runs) == 1 else f"{run} · {key}", series)
            notes += [note] if note else []
            if any(math.isfinite(v) for v in series.values):
                groups.setdefault(metric_name(key), []).append((run, key))
    said = "".join(f"<p class='muted'>{html.escape(note)}</p>" for note in notes)  # a diverged loss is the news
    if not groups:
        return said or "<p class='muted'>No training metrics were logged.</p>"
    parts = []
    labels = list(runs)
    for name, members in groups.items():
        data = [
            _line_trace(
                run, key, runs[run].series[key], len(runs) > 1,
                _hover(f"{html.escape(run)} · {html.escape(key)}", "step %{x}", "%{y:.5g}"),
                {"color": RUN_COLOURS[labels.index(run) % len(RUN_COLOURS)], "dash": _training_dash(key)},
            )
            for run, key in members
        ]
        figure: Figure = {"data": data, "layout": _layout(name, name, height=340)}
        _controls(figure, labels)
        parts.append(_figure_html(figure, ids(f"training-{name}")))
    return said + "".join(parts)


def _training_dash(key: str) -> str:
    """train/x (``train_x``) solid, val/x dashed, others dotted; each loader of a key logged per loader
    (``.../dataloader_idx_N``) its own dash, so that their curves in one figure stay apart."""
    loader = loader_index(key)
    if loader is not None:
        return VAL_LOADER_DASHES[loader % len(VAL_LOADER_DASHES)]
    return {"train": "solid", "val": "dash"}.get(key_kind(key), "dot")


def test_section(runs: dict[str, RunLog]) -> str:
    metrics = {run: log.test_metrics() for run, log in runs.items()}
    keys = sorted({k for values in metrics.values() for k in values})
    if not keys:
        return "<p class='muted'>No test metrics were logged (run <code>lightning_act test --config ... --ckpt_path ...</code>; its CSV is merged into the run).</p>"
    rows = [[html.escape(k), *(_format_logged(metrics[run].get(k)) for run in runs)] for k in keys]
    return _table(["metric", *runs], rows)


def _per_run(runs: dict[str, RunLog], prefix: str) -> dict[str, PerRun]:
    """``{stat: {run: {layer: series}}}`` for one monitor, unknown steps as NaN (:func:`with_unknown`)."""
    stats: dict[str, PerRun] = {}
    for run, log in runs.items():
        for stat, per_layer in with_unknown(prefix, log.monitors().get(prefix, {})).items():
            stats.setdefault(stat, {})[run] = per_layer
    return dict(sorted(stats.items()))


def monitor_section(prefix: str, stats: dict[str, PerRun], ids: _Ids) -> str:
    title, description = MONITOR_DESCRIPTIONS[prefix]
    plans = plan_statistics(prefix, stats)
    layers = sorted({layer for per_run in stats.values() for per_layer in per_run.values() for layer in per_layer})
    parts = [
        f"<p>{html.escape(description)}</p>",
        f"<p class='muted'>{len(layers)} layer(s), logged as <code>{prefix}/&lt;module&gt;/&lt;stat&gt;</code>. "
        "Legend: click a layer to hide it, double-click to show only that one; the <i>all runs / only …</i> menu "
        "picks a run.</p>",
    ]
    lines = [p.text for p in plans if p.kind in ("constant", "no_finite", "duplicate")]
    if lines:
        parts.append("<ul class='one'>" + "".join(f"<li>{html.escape(t)}</li>" for t in lines) + "</ul>")
    for plan in plans:
        if plan.kind != "curves":
            continue
        per_run = stats[plan.stat]
        also = f" (also {', '.join(plan.duplicates)}: identical)" if plan.duplicates else ""
        parts.append(f"<h3 id='{prefix}-{html.escape(plan.stat)}'>{html.escape(plan.stat)}{html.escape(also)}</h3>")
        for words in dict.fromkeys(plan.unknown_layers.values()):
            named = [layer for layer, said in plan.unknown_layers.items() if said == words]
            parts.append(f"<p class='muted'>only {words} values in: {html.escape(', '.join(named))}</p>")
        labels = {(run, layer): layer if len(per_run) == 1 else f"{run} · {layer}"
                  for run, per_layer in per_run.items() for layer in per_layer}
        partly = [
            note for run, per_layer in per_run.items() for layer, series in per_layer.items()
            if labels[run, layer] not in plan.unknown_layers
            for note in unknown_notes(labels[run, layer], plan.stat, series)
        ]
        if partly:  # the curves break there; say where
            parts.append("<p class='muted'>" + html.escape("; ".join(partly)) + "</p>")
        parts.append(_figure_html(curves_figure(f"{prefix}/*/{plan.stat}", plan.stat, per_run), ids(f"{prefix}-{plan.stat}")))
        heatmap = heatmap_figure(f"{prefix}/{plan.stat}: layers × steps", plan.stat, per_run)
        if heatmap is not None:
            parts.append(_figure_html(heatmap, ids(f"{prefix}-{plan.stat}-heatmap")))
    index_stats = {p.stat: stats[p.stat] for p in plans if p.kind == "index"}
    if index_stats:
        parts.append(f"<h3 id='{prefix}-positions'>positions of the largest entries</h3>")
        parts.append(positions_table(index_stats))
        for kind in ("token", "feature"):
            of_kind = {s: v for s, v in index_stats.items() if s.endswith("_" + kind)}
            if of_kind:
                parts.append(_figure_html(positions_figure(prefix, kind, of_kind), ids(f"{prefix}-{kind}")))
    return "".join(parts)


def emergence_section(runs: dict[str, RunLog], min_r2: float, ids: _Ids) -> str:
    fits = {run: emergence_fits(log.monitors().get("massive", {})) for run, log in runs.items()}
    if not any(fits.values()):
        return ""
    points = {run: log.monitors().get("massive", {}).get(FITTED_STAT, {}) for run, log in runs.items()}
    parts = [
        "<p>Emergence model of Gallego-Feliciano et al., Hidden Dynamics of Massive Activations "
        "(arXiv 2508.03616, Eq. 9): <code>f(t) = A·exp(−λx)·log(x) + K</code>, <code>x = γt + t0</code>; the last "
        f"complete fit logged for each layer, over the logged <code>{FITTED_STAT}</code> points. Fits with "
        f"R² below {min_r2:g} do not describe their layer: they are grey and hidden (click the legend to show them), "
        "and no fit changes the y range of the data.</p>"
    ]
    rows = []
    for run, per_layer in fits.items():
        for layer, fit in per_layer.items():
            if fit is None:
                rows.append([html.escape(run), html.escape(layer), *(["–"] * 8), "<span class='muted'>no complete fit logged</span>"])
                continue
            good = math.isfinite(fit.r2) and fit.r2 >= min_r2
            values = [_format(v) for v in [*(fit.parameters[name] for name in FIT_PARAMETERS), fit.r2]]
            peak = format_count(fit.peak_step)
            if math.isfinite(fit.peak_step) and math.isfinite(fit.step) and fit.peak_step > fit.step:
                peak += " <span class='muted'>(after the run: extrapolated)</span>"
            rows.append([html.escape(run), html.escape(layer), *values, peak, format_count(fit.step),
                         "drawn" if good else f"<span class='muted'>R² &lt; {min_r2:g}: hidden</span>"])
    parts.append(_table(["run", "layer", *FIT_PARAMETERS, "R²", "peak step", "fitted at step", "curve"], rows))
    drawn = {run: {layer: fit for layer, fit in per_layer.items()} for run, per_layer in fits.items()}
    parts.append(_figure_html(emergence_figure(drawn, points, min_r2), ids("massive-fits")))
    return "".join(parts)


def skipped_section(runs: dict[str, RunLog]) -> str:
    """Every layer some monitor did not measure, with its reason (recorded, or inferred from the logs)."""
    rows: list[list[str]] = []
    for run, log in runs.items():
        recorded = {(s.monitor, s.what, s.layer) for s in log.skipped}
        for item in log.skipped:
            rows.append([html.escape(run), item.monitor, html.escape(item.what), html.escape(item.layer), html.escape(item.reason)])
        for layer, fit in emergence_fits(log.monitors().get("massive", {})).items():
            if fit is None and ("massive", "emergence fit", layer) not in recorded:
                rows.append([html.escape(run), "massive", "emergence fit", html.escape(layer),
                             "no complete fit in metrics.csv (the fit failed; reason not recorded)"])
        for prefix, stats in log.monitors().items():
            for stat, per_layer in with_unknown(prefix, stats).items():
                for layer, series in per_layer.items():
                    if not any(math.isfinite(v) for v in series.values):
                        rows.append([html.escape(run), prefix, html.escape(stat), html.escape(layer),
                                     f"{unknown_words(series)} at every logged step ({len(series)} step(s))"])
    if not rows:
        return "<p>No layer was skipped: every tapped layer has known values and every fitted layer a fit.</p>"
    return _table(["run", "monitor", "what", "layer", "reason"], rows)


def config_section(runs: dict[str, RunLog]) -> str:
    parts = []
    for run, log in runs.items():
        if not log.configs:
            parts.append(f"<h3>{html.escape(run)}</h3><p class='muted'>No config.yaml or hparams.yaml found next to the run.</p>")
            continue
        for name, (path, text) in log.configs.items():
            parts.append(
                f"<details{' open' if name == 'fit config' and len(runs) == 1 else ''}><summary><b>{html.escape(run)}: "
                f"{html.escape(name)}</b> <span class='muted'>{html.escape(str(path))}</span></summary>"
                f"<pre>{html.escape(text)}</pre></details>"
            )
    return "".join(parts)


def runs_table(runs: dict[str, RunLog]) -> str:
    rows = []
    for run, log in runs.items():
        files = "<br>".join(
            f"{html.escape(str(part.path))} <span class='muted'>(steps {format_count(part.first_step)}"
            f" – {format_count(part.last_step)}{'' if part.logs_training else ', test/eval only'})</span>"
            for part in log.parts
        )
        monitors = ", ".join(MONITOR_DESCRIPTIONS[p][0] for p in log.monitors()) or "none"
        steps = [s for series in log.series.values() for s in series.steps]
        span = f"{format_count(min(steps))} – {format_count(max(steps))}" if steps else "none"
        rows.append([html.escape(run), html.escape(str(log.given_path)), files, str(log.rows), span, html.escape(monitors)])
    return _table(["run", "folder", "metrics.csv merged (oldest first)", "rows", "steps", "monitors"], rows)


def render_html(runs: dict[str, RunLog], min_r2: float = DEFAULT_MIN_R2) -> str:
    """The whole page as a string; ``runs`` maps a short label to each loaded run."""
    import plotly.offline

    ids = _Ids()
    sections: list[tuple[str, str, str]] = [
        ("training", "Training curves", training_section(runs, ids)),
        ("test", "Test metrics", test_section(runs)),
    ]
    present = [p for p in MONITOR_DESCRIPTIONS if any(p in log.monitors() for log in runs.values())]
    for prefix in present:
        sections.append((prefix, MONITOR_DESCRIPTIONS[prefix][0], monitor_section(prefix, _per_run(runs, prefix), ids)))
        if prefix == "massive":
            fits = emergence_section(runs, min_r2, ids)
            if fits:
                sections.append(("massive-fits", "Massive-activation emergence fits", fits))
    if present:
        sections.append(("skipped", "Skipped layers", skipped_section(runs)))
    sections.append(("config", "Configuration", config_section(runs)))
    absent = [MONITOR_DESCRIPTIONS[p][0] for p in MONITOR_DESCRIPTIONS if p not in present]
    notes = [(run, note) for run, log in runs.items() for note in log.notes]
    notes_html = (
        "<div class='notes'><b>Reading problems and choices</b><ul>"
        + "".join(f"<li>{html.escape(run)}: {html.escape(note)}</li>" for run, note in notes)
        + "</ul></div>"
    ) if notes else ""
    toc = "<nav><ul>" + "".join(f"<li><a href='#{sid}'>{html.escape(t)}</a></li>" for sid, t, _ in sections) + "</ul></nav>"
    body = "".join(f"<section><h2 id='{sid}'>{html.escape(t)}</h2>{content}</section>" for sid, t, content in sections)
    title = "lightning_act report: " + ", ".join(runs)
    meta = (
        runs_table(runs)
        + (f"<p class='muted'>Not in these runs: {html.escape(', '.join(absent))}.</p>" if absent else "")
        + f"<p class='muted'>Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</p>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>{meta}{notes_html}{toc}{body}</body></html>\n"
    )


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """One run: ``<run>/report.html`` (next to ``metrics.csv`` when a file was given); several: ``./report.html``."""
    if len(run_dirs) != 1:
        return Path("report.html")
    path = Path(run_dirs[0])
    return (path.parent if path.is_file() else path) / "report.html"


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, RunLog]:
    """Each run read once, keyed by a short unique label. A folder holding several runs (a version that starts over at
    step 0, :meth:`RunLog.run_starts`) is refused: merged as one run, the page would show the last one only. The
    refusal names each run's first version folder, which is read with the versions after it up to the next run."""
    labels = run_labels(run_dirs)
    runs = {label: load_run(path) for label, path in zip(labels, run_dirs, strict=True)}
    for path, log in zip(run_dirs, runs.values(), strict=True):
        starts = log.run_starts()
        if len(starts) > 1:
            folders = [str(part.path.parent) for part in starts]
            # a version folder is read with the versions after it up to the next run, and the tests that kept its
            # fit config (load_run): say which, so the trials' validate/test versions are seen to come along
            groups = run_groups(log.parts)
            with_followers = "; ".join(
                f"{group[0].path.parent.name} with {', '.join(part.path.parent.name for part in group[1:])}"
                for group in groups if len(group) > 1
            )
            position = {part.path: index for index, part in enumerate(log.parts)}
            past_next_run = any(position[part.path] > position[later.path]
                                for group, later in zip(groups, starts[1:]) for part in group)
            tests = " and the tests that kept its fit config" if past_next_run else ""
            advice = (
                f"pass each run's first version folder, read with the versions after it up to the next run{tests} "
                f"({with_followers}), to compare them: "
                if with_followers else "pass each version folder to compare them: "
            )
            raise ConfigError(
                f"'{path}' holds {len(starts)} runs: {folders[1]} starts over at step 0 after {folders[0]} trained "
                f"past it (a sweep's trials in one logger folder?); {advice}"
                + shlex.join(["lightning_act", "report", *folders])
            )
    return runs


def build_report(
    run_dirs: str | Path | Sequence[str | Path], output: str | Path | None = None, min_r2: float = DEFAULT_MIN_R2,
) -> Path:
    """Write the HTML page comparing ``run_dirs`` (one run or several) to ``output`` and return its path.

    A run is given by its folder (every ``csv/version_N`` under it is merged), one
    ``csv/version_N`` folder (with the versions after it up to the next run) or one ``metrics.csv`` (alone).
    """
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    return write_report(load_runs(paths), Path(output) if output is not None else default_output(paths), min_r2)


def write_report(runs: dict[str, RunLog], output: Path, min_r2: float = DEFAULT_MIN_R2) -> Path:
    """Render ``runs`` and write the page to ``output`` (parent folders created), all or nothing: a temporary file in
    the same folder renamed over ``output``, so a full disk or a kill never leaves a truncated page under its name nor
    destroys the previous one; a folder that cannot be written is one line. The temporary file is this writer's own
    (two reports of one run at once each publish a whole page) and is removed whatever stops the write (Ctrl-C too)."""
    page = render_html(runs, min_r2)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(output) as partial, open(partial, "x", encoding="utf-8") as stream:
            stream.write(page)
    except OSError as error:
        raise ConfigError(
            f"cannot write the report to '{output}' ({error.strerror or error}); pass -o with a writable path"
        ) from None
    return output


def check_output(output: Path) -> None:
    """``report -o PATH`` must name a file whose folder exists or can be made, and never replace a file that is not
    an HTML page (a run's ``metrics.csv``). Checked on the parsed path, so ``--out``/``-oFILE`` spellings are too."""
    if output.is_dir():
        raise ConfigError(f"report -o '{output}' is a folder; give a file name, e.g. -o {output / 'report.html'}")
    if output.exists() and output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(
            f"report -o '{output}' exists and is not an HTML page (a run's log?); it would be replaced by the "
            f"report: give another name, e.g. -o {output.with_suffix('.html')}"
        )
    for parent in output.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"report -o '{output}': '{parent}' is a file, not a folder; choose another path")


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning_act report RUN [RUN ...] [-o report.html]``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="lightning_act report", allow_abbrev=False,
        description="Write one self-contained, interactive HTML page comparing runs (training curves, test "
        "metrics, monitor curves and heatmaps, emergence fits, skipped layers, configs) from their local logs.",
    )
    parser.add_argument(
        "runs", metavar="RUN", nargs="+",
        help="a run's folder (e.g. runs/kat; all its csv/version_N are merged), a csv/version_N folder (with the "
        "versions after it up to the next run: its test/validate versions) or a metrics.csv (alone)",
    )
    parser.add_argument("-o", "--output", default=None,
                        help="HTML file to write (default: RUN/report.html for one run, ./report.html for several)")
    parser.add_argument("--min-r2", type=float, default=DEFAULT_MIN_R2,
                        help=f"emergence fits below this R² are greyed and hidden (default {DEFAULT_MIN_R2})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.output:
            check_output(Path(args.output))
        runs = load_runs(args.runs)
        for run, log in runs.items():
            if len(log.parts) > 1:
                print(f"{run}: merged {len(log.parts)} metrics.csv files: {', '.join(str(p.path) for p in log.parts)}", file=sys.stderr)
            for note in log.notes:
                print(f"warning: {run}: {note}", file=sys.stderr)
        output = write_report(runs, Path(args.output) if args.output else default_output(args.runs), args.min_r2)
    except LightningActError as error:
        print(f"lightning_act report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0
