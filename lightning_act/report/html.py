"""One self-contained HTML page per run: ``lightning_act report RUN_DIR [-o report.html]``.

The page is built from the run's local logs only (see :mod:`lightning_act.report.runlog`), so it
works without W&B, offline and after a crash. Every figure is a PNG drawn with matplotlib (Agg,
imported lazily) and embedded as a ``data:`` URI; the page loads nothing else (its
Content-Security-Policy forbids it), needs no server and no JavaScript.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_act.errors import LightningActError
from lightning_act.report.runlog import (
    FIT_PARAMETERS,
    EmergenceFit,
    RunLog,
    Series,
    emergence_fits,
    load_run,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

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

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:0 20px 40px;color:#222}
h1{margin-top:24px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px} h3{margin-bottom:4px}
nav ul{columns:2;padding-left:18px} .meta td{padding:2px 12px 2px 0;vertical-align:top}
.notes{background:#fff6e0;border-left:4px solid #e0a000;padding:8px 14px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:8px 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:90%;color:#555}
table.fits{border-collapse:collapse;font-size:90%}
table.fits td,table.fits th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.fits td:first-child{text-align:left}
pre{background:#f6f6f6;padding:10px;overflow:auto;max-height:480px;font-size:85%}
.muted{color:#777}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _png_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, caption: str | None = None) -> str:
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}">{caption_html}</figure>'


def _finite(series: Series) -> tuple[list[float], list[float]]:
    points = [(s, v) for s, v in zip(series.steps, series.values, strict=True) if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def _format(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.4g}"


def training_figure(run: RunLog) -> Figure | None:
    """Losses, accuracies and other non-monitor metrics; ``train/x`` and ``val/x`` share an axis."""
    from lightning_act.plots import new_figure

    groups: dict[str, list[str]] = {}
    for key in run.training_keys():
        if any(math.isfinite(v) for v in run.series[key].values):
            groups.setdefault(key.split("/")[-1], []).append(key)
    if not groups:
        return None
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure = new_figure(4.2 * columns, 3.0 * rows)
    for index, (name, keys) in enumerate(groups.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for key in keys:
            steps, values = _finite(run.series[key])
            axes.plot(steps, values, marker="." if len(steps) < 60 else None, label=key)
        axes.set_title(name)
        axes.set_xlabel("global step")
        axes.legend(fontsize=7)
    return figure


def layer_curves_figure(prefix: str, stat: str, per_layer: dict[str, Series]) -> Figure:
    """One line per layer over steps, coloured from the first (dark) to the last layer (light)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from lightning_act.plots import new_figure

    figure = new_figure(6.0, 3.6)
    axes = figure.add_subplot()
    colormap = colormaps["viridis"]
    count = len(per_layer)
    for index, (layer, series) in enumerate(per_layer.items()):
        steps, values = _finite(series)
        color = colormap(index / max(1, count - 1))
        axes.plot(steps, values, color=color, marker="." if len(steps) < 40 else None, label=layer, linewidth=1.2)
    axes.set_title(f"{prefix}/*/{stat}")
    axes.set_xlabel("global step")
    axes.set_ylabel(stat)
    if count <= 8:
        axes.legend(fontsize=6)
    else:
        mappable = ScalarMappable(norm=Normalize(0, count - 1), cmap=colormap)
        figure.colorbar(mappable, ax=axes, label="layer (module order)")
    return figure


def heatmap_figure(prefix: str, stat: str, per_layer: dict[str, Series]) -> Figure | None:
    """Layers × steps of one statistic, via the monitors' own heatmap (non-finite values left blank)."""
    from lightning_act.plots import layer_step_heatmap

    cleaned = {
        layer: Series(list(series.steps), [v if math.isfinite(v) else math.nan for v in series.values])
        for layer, series in per_layer.items()
    }
    if not any(math.isfinite(v) for series in cleaned.values() for v in series.values):
        return None
    return layer_step_heatmap(cleaned, title=f"{prefix}/{stat}: layers × steps")


def emergence_figure(fits: list[EmergenceFit], points: dict[str, Series], stat: str) -> Figure:
    """Each layer's fitted statistic over steps with its fitted emergence curve and peak."""
    import numpy as np

    from lightning_act.plots import new_figure

    columns = min(3, len(fits))
    rows = math.ceil(len(fits) / columns)
    figure = new_figure(4.2 * columns, 3.0 * rows)
    for index, fit in enumerate(fits):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = _finite(points.get(fit.layer, Series()))
        if steps:
            axes.plot(steps, values, "o", markersize=3, color="#1f77b4", label=f"{stat} (logged)")
        low = min([*steps, fit.step, 0.0])
        high = max([*steps, fit.step])
        grid = np.linspace(low, high if high > low else low + 1.0, 400)
        axes.plot(grid, fit.curve(grid), color="#d62728", label="fit")
        if math.isfinite(fit.peak_step) and low <= fit.peak_step <= high:
            axes.axvline(fit.peak_step, color="#777", linestyle="--", linewidth=1, label="peak")
        axes.set_title(f"{fit.layer}  (R² {_format(fit.r2)})", fontsize=9)
        axes.set_xlabel("global step")
        axes.legend(fontsize=6)
    return figure


def _emergence_section(stats: dict[str, dict[str, Series]]) -> str:
    fits = emergence_fits(stats)
    if not fits:
        return ""
    stat = FITTED_STAT if FITTED_STAT in stats else None
    points = stats.get(FITTED_STAT, {})
    drawn = [fit for fit in fits.values() if fit is not None]
    parts = [
        "<p>Emergence model of Gallego-Feliciano et al., Hidden Dynamics of Massive Activations "
        "(arXiv 2508.03616, Eq. 9): "
        "<code>f(t) = A·exp(−λx)·log(x) + K</code>, <code>x = γt + t0</code>; the last complete fit "
        "logged for each layer, drawn over the "
        + (f"logged <code>{html.escape(stat)}</code> points" if stat else "steps (the fitted statistic was not logged)")
        + ".</p>"
    ]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("layer", *FIT_PARAMETERS, "R²", "peak step", "fitted at step"))
    rows = []
    for layer, fit in fits.items():
        if fit is None:
            cells = f"<td>{html.escape(layer)}</td><td colspan='8' class='muted'>no complete fit logged</td>"
        else:
            values = [fit.parameters[name] for name in FIT_PARAMETERS] + [fit.r2, fit.peak_step, fit.step]
            cells = f"<td>{html.escape(layer)}</td>" + "".join(f"<td>{_format(v)}</td>" for v in values)
        rows.append(f"<tr>{cells}</tr>")
    parts.append(f"<table class='fits'><tr>{header}</tr>{''.join(rows)}</table>")
    per_figure = 9
    for start in range(0, len(drawn), per_figure):
        chunk = drawn[start : start + per_figure]
        parts.append(_img(_png_data_uri(emergence_figure(chunk, points, FITTED_STAT)), alt=f"emergence fits {start}"))
    return "".join(parts)


def _monitor_section(prefix: str, stats: dict[str, dict[str, Series]], plot_files: list[Path]) -> str:
    title, description = MONITOR_DESCRIPTIONS[prefix]
    layers = sorted({layer for per_layer in stats.values() for layer in per_layer})
    parts = [
        f"<p>{html.escape(description)}</p>",
        f"<p class='muted'>{len(layers)} layer(s), statistics: {html.escape(', '.join(stats))}; "
        f"logged as <code>{prefix}/&lt;module&gt;/&lt;stat&gt;</code>.</p>",
    ]
    for stat, per_layer in stats.items():
        if stat.startswith("fit_"):
            continue
        images = [_img(_png_data_uri(layer_curves_figure(prefix, stat, per_layer)), alt=f"{prefix} {stat} per layer")]
        heatmap = heatmap_figure(prefix, stat, per_layer) if len(per_layer) > 1 else None
        if heatmap is not None:
            images.append(_img(_png_data_uri(heatmap), alt=f"{prefix} {stat} heatmap"))
        parts.append(f"<h3 id='{prefix}-{html.escape(stat)}'>{html.escape(stat)}</h3><div class='row'>{''.join(images)}</div>")
    saved = [p for p in plot_files if p.name.startswith(prefix + "_")]
    if saved:
        parts.append("<h3>Plots saved by the monitor</h3>" + _saved_plots(saved))
    return "".join(parts)


def _saved_plots(paths: list[Path]) -> str:
    images = []
    for path in paths:
        data = path.read_bytes()
        if data.startswith(PNG_MAGIC):
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            images.append(_img(uri, alt=path.stem, caption=f"plots/{path.name}"))
        else:
            images.append(f"<p class='muted'>plots/{html.escape(path.name)} is not a PNG file; skipped</p>")
    return f"<div class='row'>{''.join(images)}</div>"


def render_html(run: RunLog) -> str:
    """The whole page as a string."""
    sections: list[tuple[str, str, str]] = []
    training = training_figure(run)
    sections.append((
        "training", "Training curves",
        _img(_png_data_uri(training), alt="training curves") if training is not None
        else "<p class='muted'>No training metrics were logged.</p>",
    ))
    monitors = run.monitors()
    for prefix, stats in monitors.items():
        sections.append((prefix, MONITOR_DESCRIPTIONS[prefix][0], _monitor_section(prefix, stats, run.plot_files)))
        if prefix == "massive":
            fits = _emergence_section(stats)
            if fits:
                sections.append(("massive-fits", "Massive-activation emergence fits", fits))
    absent = [MONITOR_DESCRIPTIONS[p][0] for p in MONITOR_DESCRIPTIONS if p not in monitors]
    claimed = {p for p in run.plot_files if any(p.name.startswith(prefix + "_") for prefix in monitors)}
    other_plots = [p for p in run.plot_files if p not in claimed]
    if other_plots:
        sections.append(("plots", "Other saved plots", _saved_plots(other_plots)))
    config_html = "".join(
        f"<h3>{html.escape(name)}</h3><p class='muted'>{html.escape(str(path))}</p><pre>{html.escape(text)}</pre>"
        for name, (path, text) in run.configs.items()
    ) or "<p class='muted'>No config.yaml or hparams.yaml found next to the run.</p>"
    sections.append(("config", "Configuration", config_html))

    picked = (
        f" (the newest training log of {run.candidates} metrics.csv files under {html.escape(str(run.given_path))})"
        if run.candidates > 1 else ""
    )
    all_steps = [s for series in run.series.values() for s in series.steps]
    step_range = f"{int(min(all_steps))} – {int(max(all_steps))}" if all_steps else "none"
    meta = (
        "<table class='meta'>"
        f"<tr><td>run</td><td>{html.escape(str(run.given_path))}</td></tr>"
        f"<tr><td>metrics</td><td>{html.escape(str(run.metrics_csv))}{picked}</td></tr>"
        f"<tr><td>rows read</td><td>{run.rows}</td></tr>"
        f"<tr><td>steps logged</td><td>{step_range}</td></tr>"
        f"<tr><td>monitors</td><td>{html.escape(', '.join(MONITOR_DESCRIPTIONS[p][0] for p in monitors) or 'none')}"
        + (f" <span class='muted'>(not in this run: {html.escape(', '.join(absent))})</span>" if absent else "")
        + "</td></tr>"
        f"<tr><td>generated</td><td>{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</td></tr>"
        "</table>"
    )
    notes = (
        "<div class='notes'><b>Reading problems</b><ul>"
        + "".join(f"<li>{html.escape(n)}</li>" for n in run.notes)
        + "</ul></div>"
    ) if run.notes else ""
    toc = "<nav><ul>" + "".join(f"<li><a href='#{sid}'>{html.escape(t)}</a></li>" for sid, t, _ in sections) + "</ul></nav>"
    body = "".join(f"<section><h2 id='{sid}'>{html.escape(t)}</h2>{content}</section>" for sid, t, content in sections)
    title = f"lightning_act report: {run.given_path}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{meta}{notes}{toc}{body}</body></html>\n"
    )


def default_output(run_dir: str | Path) -> Path:
    """``<run dir>/report.html`` (next to ``metrics.csv`` when a file was given)."""
    path = Path(run_dir)
    return (path.parent if path.is_file() else path) / "report.html"


def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of the run under ``run_dir`` to ``output`` and return its path.

    ``run_dir`` is the CSV version folder, any parent of it (the newest ``metrics.csv`` below is
    used) or the ``metrics.csv`` file itself.
    """
    return write_report(load_run(run_dir), Path(output) if output is not None else default_output(run_dir))


def write_report(run: RunLog, output: Path) -> Path:
    """Render ``run`` and write the page to ``output`` (parent folders created)."""
    page = render_html(run)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning_act report RUN_DIR [-o report.html]``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="lightning_act report",
        description="Write a self-contained HTML report (training curves, monitor curves and heatmaps, "
        "emergence fits, config) from a run's local logs.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's folder (e.g. runs/kat), a csv/version_N folder or a metrics.csv"
    )
    parser.add_argument("-o", "--output", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        run = load_run(args.run_dir)
        if run.candidates > 1:
            print(
                f"using {run.metrics_csv} (the newest training log of {run.candidates} metrics.csv files under {args.run_dir})",
                file=sys.stderr,
            )
        for note in run.notes:
            print(f"warning: {note}", file=sys.stderr)
        output = write_report(run, Path(args.output) if args.output else default_output(args.run_dir))
    except LightningActError as error:
        print(f"lightning_act report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0
