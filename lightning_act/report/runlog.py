"""Read a run's local logs (the CSVLogger's ``metrics.csv``, configs, monitor plots) for a report.

A run directory is whatever ``save_dir`` the recipe's loggers used (``runs/<recipe>/``); the
CSVLogger writes ``<run>/csv/version_N/metrics.csv`` and LightningCLI writes ``config.yaml``
into the first logger's directory, so the reader accepts the version folder or any parent and
looks upwards for the config. It tolerates what a run that crashed half-way leaves behind: a
truncated last line, rows with missing fields, columns that appear late or never.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_act.errors import DataNotFoundError

#: Key prefixes of the activation monitors, in the order the report shows them.
MONITOR_PREFIXES: tuple[str, ...] = ("act", "sparsity", "massive", "collapse", "sensitive")

#: Columns of ``metrics.csv`` that index rows rather than hold metrics.
INDEX_COLUMNS: tuple[str, ...] = ("step", "epoch")

#: Parameters of the massive-activation emergence fit, as logged under ``massive/<layer>/fit_<name>``.
FIT_PARAMETERS: tuple[str, ...] = ("A", "lambda", "gamma", "t0", "K")

if TYPE_CHECKING:
    import numpy as np

_CONFIG_NAMES = ("config.yaml", "hparams.yaml")
_CONFIG_MAX_CHARS = 200_000


@dataclass
class Series:
    """The logged ``(step, value)`` points of one metric, in file order."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    def last_per_step(self) -> dict[float, float]:
        """The last value logged at each step (a step can appear on several rows)."""
        return dict(zip(self.steps, self.values, strict=True))


@dataclass
class RunLog:
    """Everything the report shows, read from disk once."""

    given_path: Path
    metrics_csv: Path
    candidates: int
    columns: list[str]
    rows: int
    series: dict[str, Series]
    notes: list[str]
    configs: dict[str, tuple[Path, str]]
    plot_files: list[Path]

    @property
    def version_dir(self) -> Path:
        return self.metrics_csv.parent

    def training_keys(self) -> list[str]:
        """Metrics that are not monitor statistics (losses, accuracies, learning rates)."""
        return [k for k in self.series if k not in INDEX_COLUMNS and split_monitor_key(k) is None]

    def monitors(self) -> dict[str, dict[str, dict[str, Series]]]:
        """``{prefix: {stat: {layer: series}}}`` for the monitor keys present, layers in module order."""
        grouped: dict[str, dict[str, dict[str, Series]]] = {}
        for key, series in self.series.items():
            parts = split_monitor_key(key)
            if parts is None or not len(series):
                continue
            prefix, layer, stat = parts
            grouped.setdefault(prefix, {}).setdefault(stat, {})[layer] = series
        ordered: dict[str, dict[str, dict[str, Series]]] = {}
        for prefix in MONITOR_PREFIXES:
            if prefix in grouped:
                ordered[prefix] = {
                    stat: {layer: grouped[prefix][stat][layer] for layer in sorted(grouped[prefix][stat], key=natural_key)}
                    for stat in sorted(grouped[prefix])
                }
        return ordered


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``blocks.2`` before ``blocks.10`` (module order, not CSV column order)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def split_monitor_key(key: str) -> tuple[str, str, str] | None:
    """``"massive/model.blocks.3/ratio"`` → ``("massive", "model.blocks.3", "ratio")``; None for other keys."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] not in MONITOR_PREFIXES:
        return None
    return parts[0], "/".join(parts[1:-1]), parts[-1]


def _logs_training(path: Path) -> bool:
    """Whether a ``metrics.csv`` header has training or monitor columns (not only ``test/...``)."""
    with open(path, newline="", errors="replace") as handle:
        columns = handle.readline().strip().split(",")
    return any(c.startswith("train/") or c.split("/", 1)[0] in MONITOR_PREFIXES for c in columns)


def find_metrics_csv(path: str | Path) -> tuple[Path, int]:
    """The run's ``metrics.csv`` and how many there were to pick from.

    Under a parent folder the newest one that logged training wins, so that a ``lightning_act
    test`` run after ``fit`` (a newer CSV with only ``test/...`` columns) does not hide the fit.
    """
    given = Path(path)
    hint = "pass the run's folder, e.g. runs/kat"
    if not given.exists():
        raise DataNotFoundError(f"run directory '{given}' does not exist; {hint}")
    if given.is_file():
        if given.name == "metrics.csv":
            return given, 1
        raise DataNotFoundError(f"'{given}' is not a lightning_act run directory (no metrics.csv found under it); {hint}")
    if (given / "metrics.csv").is_file():
        return given / "metrics.csv", 1
    found = [p for p in given.rglob("metrics.csv") if p.is_file()]
    if not found:
        raise DataNotFoundError(f"'{given}' is not a lightning_act run directory (no metrics.csv found under it); {hint}")
    training = [p for p in found if _logs_training(p)] or found
    newest = max(training, key=lambda p: (p.stat().st_mtime, natural_key(str(p))))
    return newest, len(found)


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_metrics(path: Path) -> tuple[list[str], int, dict[str, Series], list[str]]:
    """Parse ``metrics.csv`` into per-column series, skipping what a crash can leave malformed.

    Returns ``(columns, complete rows, {column: series}, notes about skipped content)``.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    notes: list[str] = []
    if not text.strip():
        return [], 0, {}, ["metrics.csv is empty: the run stopped before anything was logged"]
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith(("\n", "\r")):
        if len(lines) == 1:
            return [], 0, {}, ["metrics.csv holds only a truncated header: the run stopped while writing it"]
        lines = lines[:-1]
        notes.append("dropped the truncated last line of metrics.csv (the run stopped while writing it)")
    records = list(csv.reader(io.StringIO("".join(lines))))
    columns = records[0]
    series: dict[str, Series] = {name: Series() for name in columns}
    step_index = columns.index("step") if "step" in columns else None
    if step_index is None:
        notes.append("metrics.csv has no 'step' column; the row number is used as the step")
    malformed = 0
    complete = 0
    for row_number, record in enumerate(records[1:]):
        if len(record) != len(columns):
            malformed += 1
            continue
        step = _to_float(record[step_index]) if step_index is not None else float(row_number)
        if math.isnan(step):
            malformed += 1
            continue
        step = int(step) if step.is_integer() else step
        complete += 1
        for name, cell in zip(columns, record, strict=True):
            if cell != "" and name not in INDEX_COLUMNS:
                series[name].steps.append(step)
                series[name].values.append(_to_float(cell))
    if malformed:
        notes.append(f"skipped {malformed} malformed row(s) of metrics.csv (wrong number of fields or no step)")
    if complete == 0:
        notes.append("metrics.csv has a header but no complete rows yet")
    return columns, complete, {k: v for k, v in series.items() if k not in INDEX_COLUMNS}, notes


def find_configs(version_dir: Path, given: Path) -> dict[str, tuple[Path, str]]:
    """``config.yaml`` (written by LightningCLI next to the first logger) and ``hparams.yaml``.

    Looked up from the CSV version folder upwards (version_N → csv → run folder) and in the
    folder the user passed.
    """
    places = [version_dir, *list(version_dir.parents)[:2]]
    if given.is_dir():
        places.append(given)
    configs: dict[str, tuple[Path, str]] = {}
    for name in _CONFIG_NAMES:
        for place in places:
            candidate = place / name
            if candidate.is_file():
                text = candidate.read_text(encoding="utf-8", errors="replace")
                if len(text) > _CONFIG_MAX_CHARS:
                    text = text[:_CONFIG_MAX_CHARS] + f"\n... (cut at {_CONFIG_MAX_CHARS} characters)\n"
                configs[name] = (candidate, text)
                break
    return configs


def load_run(path: str | Path) -> RunLog:
    """Locate and read a run: metrics, configs and the monitors' saved plots."""
    metrics_csv, candidates = find_metrics_csv(path)
    columns, rows, series, notes = read_metrics(metrics_csv)
    plots_dir = metrics_csv.parent / "plots"
    plot_files = sorted(plots_dir.glob("*.png"), key=lambda p: natural_key(p.name)) if plots_dir.is_dir() else []
    return RunLog(
        given_path=Path(path),
        metrics_csv=metrics_csv,
        candidates=candidates,
        columns=columns,
        rows=rows,
        series=series,
        notes=notes,
        configs=find_configs(metrics_csv.parent, Path(path)),
        plot_files=plot_files,
    )


@dataclass
class EmergenceFit:
    """The last complete emergence fit logged for one layer (Hidden Dynamics of Massive Activations,
    Gallego-Feliciano et al., arXiv 2508.03616, Eq. 9)."""

    layer: str
    step: float
    parameters: dict[str, float]
    r2: float
    peak_step: float

    def curve(self, t: np.ndarray) -> np.ndarray:
        """``f(t) = A·exp(−λx)·log(x) + K`` with ``x = γt + t0`` (NaN where ``x <= 0``)."""
        import numpy as np

        p = self.parameters
        x = p["gamma"] * np.asarray(t, dtype=np.float64) + p["t0"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, p["A"] * np.exp(-p["lambda"] * x) * np.log(np.where(x > 0, x, 1.0)) + p["K"], np.nan)


def emergence_fits(stats: dict[str, dict[str, Series]]) -> dict[str, EmergenceFit | None]:
    """Per layer with ``fit_*`` columns: its last fit whose five parameters are all finite, else None."""
    layers: set[str] = set()
    for stat, per_layer in stats.items():
        if stat.startswith("fit_"):
            layers.update(per_layer)
    fits: dict[str, EmergenceFit | None] = {}
    for layer in sorted(layers, key=natural_key):
        by_step: dict[float, dict[str, float]] = {}
        for stat, per_layer in stats.items():
            if stat.startswith("fit_") and layer in per_layer:
                for step, value in per_layer[layer].last_per_step().items():
                    by_step.setdefault(step, {})[stat[len("fit_"):]] = value
        complete = [
            (step, values) for step, values in sorted(by_step.items())
            if all(math.isfinite(values.get(name, math.nan)) for name in FIT_PARAMETERS)
        ]
        if not complete:
            fits[layer] = None
            continue
        step, values = complete[-1]
        fits[layer] = EmergenceFit(
            layer=layer,
            step=step,
            parameters={name: values[name] for name in FIT_PARAMETERS},
            r2=values.get("r2", math.nan),
            peak_step=values.get("peak_step", math.nan),
        )
    return fits
