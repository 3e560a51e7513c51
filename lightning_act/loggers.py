"""A W&B logger that keeps the monitors' per-layer detail out of the metric keys.

Every monitor logs ``<prefix>/<module>/<stat>``: with 4 blocks that is about a hundred metric
keys, each its own panel in W&B's default workspace (about four hundred for 12 blocks), and the
token/feature positions of the largest entries (``top{j}_token``/``top{j}_feature``) are drawn
as meaningless lines. :class:`CompactWandbLogger` logs instead, per logging step,

* one summary key per monitor statistic, reduced over the layers logged at that step (by any monitor) —
  ``<prefix>/<reduction>/<stat>``, e.g. ``massive/max/ratio`` (the largest ratio of any block),
  ``sparsity/mean/zero_frac``, ``collapse/min/erank_frac`` (the most collapsed layer); a
  statistic logged for one module only keeps its own key (``collapse/params/r90``);
* the emergence fit (``massive/<module>/fit_*``) of one layer, whole and under that layer's own keys: the fit with
  the best R² (a per-parameter reduction would pair the A of one layer with the R² of another);
* the last per-layer value of every key it did not log in the run summary (searchable in the
  runs table);
* per monitor a table ``<prefix>/per_layer`` with every ``(step, layer, stat, value)`` it did not log, the top-k
  entries (``top{j}_value``, ``top{j}_token``, ``top{j}_feature``) included, in parts of at most
  :attr:`CompactWandbLogger.table_part_rows` rows (W&B cuts a longer table) logged under that key as they fill, each
  at its last row's step, the last one at the end of the fit — per-layer curves and positions are plotted from them
  (or from the local report: ``lightning_act report``, which reads the CSV log and keeps every layer).

``per_layer=True`` logs every key as :class:`~lightning.pytorch.loggers.WandbLogger` does.
Everything that is not a monitor statistic (losses, images, tables) passes through unchanged.

:class:`AtomicCSVLogger` is Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a kill: Lightning rewrites the
whole file (opened with ``"w"``, which empties it first) whenever a new column appears — at the first validation, a
monitor's first logging step and every fit's end (the emergence fit) — so a kill, an OOM kill or a full disk in that
rewrite left an empty log beside a ``last.ckpt`` far ahead. The recipes use it.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_act._files import is_temporary_of, written_whole
from lightning_act.report.runlog import split_monitor_key

#: The top-k entries of MassiveActivations (value and position of the j-th largest): table only.
TOPK_STAT = re.compile(r"^top\d+_(value|token|feature)$")

#: The parameters of MassiveActivations' emergence fit: one layer's set is logged whole, never reduced.
FIT_STAT = re.compile(r"^fit_\w+$")

#: How a monitor's statistic is reduced over layers (default: mean), chosen so the summary names
#: the layer a researcher would look at first: the most massive, the most collapsed.
MONITOR_REDUCTIONS: dict[str, str] = {"massive": "max", "collapse": "min"}

#: Statistics reduced by max whatever the monitor (counts, flags and maxima: any layer with one shows).
STAT_REDUCTIONS: dict[str, str] = {"nonfinite": "max", "count": "max", "collapsed": "max", "abs_max": "max"}


def _mean(values: list[float]) -> float:
    """The mean, NaN (unknown) for values holding both +inf and -inf (``fsum`` refuses ``inf - inf``); each value
    divided first, as a sum of finite values past ~1.8e308 raised ``OverflowError`` in the logging call."""
    if math.inf in values and -math.inf in values:
        return math.nan
    return math.fsum(value / len(values) for value in values)


_REDUCE = {"mean": _mean, "max": max, "min": min}


def reduction_of(prefix: str, stat: str) -> str:
    return STAT_REDUCTIONS.get(stat, MONITOR_REDUCTIONS.get(prefix, "mean"))


def compact_metrics(
    metrics: Mapping[str, Any], multi_layer: set[tuple[str, str]] | None = None
) -> tuple[dict[str, Any], list[tuple[str, str, str, float]]]:
    """Split one logging call into (keys to log, per-layer detail ``(prefix, layer, stat, value)``).

    Monitor statistics logged for several layers become one ``<prefix>/<reduction>/<stat>`` key
    (over the known values: NaN, a monitor's "unknown", is left out and ±inf, a measured value, kept, so a blown-up
    block shows as ``massive/max/top1 = inf``; when none is known, or a mean meets +inf and -inf, the key is not
    logged at that step); the top-k entries (``top{j}_value``, ``top{j}_token``, ``top{j}_feature``) are detail only; of the emergence fits (``fit_*``) only
    the one with the best finite ``fit_r2`` keeps its layer's keys, every parameter from that layer (the others, or
    all when no R² is finite, are detail); all other keys are kept as they are. ``multi_layer`` holds the
    ``(prefix, stat)`` pairs a run has logged for several layers (updated here): they stay reduced at a step where
    only one layer delivered (a skipped tap), instead of turning into that layer's own key for one point.
    """
    multi_layer = set() if multi_layer is None else multi_layer
    kept: dict[str, Any] = {}
    groups: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
    fits: dict[str, dict[str, dict[str, float]]] = {}
    detail: list[tuple[str, str, str, float]] = []
    for key, value in metrics.items():
        parts = split_monitor_key(key)
        if parts is None or not isinstance(value, (int, float)):
            kept[key] = value
            continue
        prefix, layer, stat = parts
        detail.append((prefix, layer, stat, float(value)))
        if FIT_STAT.match(stat):
            fits.setdefault(prefix, {}).setdefault(layer, {})[key] = float(value)
        elif not TOPK_STAT.match(stat):
            groups.setdefault((prefix, stat), []).append((key, layer, float(value)))
    for prefix, per_layer in fits.items():
        r2 = {layer: values.get(f"{prefix}/{layer}/fit_r2", math.nan) for layer, values in per_layer.items()}
        fitted = [layer for layer in per_layer if math.isfinite(r2[layer])]
        if fitted:
            kept.update(per_layer[max(fitted, key=r2.__getitem__)])
    for (prefix, stat), members in groups.items():
        if len(members) > 1:
            multi_layer.add((prefix, stat))
        elif (prefix, stat) not in multi_layer:
            kept[members[0][0]] = members[0][2]
            continue
        known = [value for _, _, value in members if not math.isnan(value)]
        if known:
            reduction = reduction_of(prefix, stat)
            reduced = _REDUCE[reduction](known)
            if not math.isnan(reduced):
                kept[f"{prefix}/{reduction}/{stat}"] = reduced
    return kept, detail


class CompactWandbLogger(WandbLogger):
    """:class:`~lightning.pytorch.loggers.WandbLogger` with a per-monitor summary instead of per-layer keys.

    Every monitor logs its own call, so a step's monitor keys are held until the step changes (or the fit ends) and
    reduced then, over every layer any monitor logged at that step: reduced per call, two monitors of one class on
    other modules logged two values at one step, the last one winning. Other keys are logged as they come.

    Args:
        per_layer: log every ``<prefix>/<module>/<stat>`` key as well (the plain WandbLogger
            behaviour); off by default.
        *args, **kwargs: passed to :class:`~lightning.pytorch.loggers.WandbLogger`.
    """

    #: Rows of one ``<prefix>/per_layer`` table part: ``wandb.Table.MAX_ROWS``, what W&B keeps of a table logged to a
    #: run (the rest is cut with a warning); a part is logged whenever a monitor's rows reach it, so memory stays
    #: bounded.
    table_part_rows = 10_000

    def __init__(self, *args: Any, per_layer: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_layer = per_layer
        self._layer_rows: dict[str, list[list[Any]]] = {}
        self._multi_layer: set[tuple[str, str]] = set()
        self._step_metrics: dict[str, Any] = {}
        self._step: int | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.per_layer:
            super().log_metrics(metrics, step)
            return
        if step != self._step:
            self._log_held_step()
            self._step = step
        held = {key: value for key, value in metrics.items() if split_monitor_key(key) is not None}
        self._step_metrics.update(held)
        others = {key: value for key, value in metrics.items() if key not in held}
        if others:
            super().log_metrics(others, step)

    def _log_held_step(self) -> None:
        """Log the monitor keys held for ``self._step``: the reductions to the history, the per-layer detail to the
        summary and the table rows."""
        metrics, self._step_metrics = self._step_metrics, {}
        if not metrics:
            return
        step = self._step
        kept, detail = compact_metrics(metrics, self._multi_layer)
        detail = [item for item in detail if "/".join(item[:3]) not in kept]  # a kept key is in the history already
        if detail:
            for prefix, layer, stat, value in detail:
                rows = self._layer_rows.setdefault(prefix, [])
                rows.append([step, layer, stat, value])
                if len(rows) >= self.table_part_rows:
                    self._log_table_part(prefix)
            # an infinite top1 is the news: a stale finite value must not hide it; NaN (not measured) removes the key.
            # Named as the history names them (behind the logger's prefix, as WandbLogger.log_metrics adds it), so
            # prefixed loggers sharing one run (folds, stages) keep their own per-layer summaries
            summary = self.experiment.summary
            values = _add_prefix(
                {"/".join((p, layer, stat)): v for p, layer, stat, v in detail}, self._prefix, self.LOGGER_JOIN_CHAR
            )
            summary.update({key: v for key, v in values.items() if not math.isnan(v)})  # one summary record
            unknown = {key for key, v in values.items() if math.isnan(v)}
            for key in unknown & set(summary.keys()):  # wandb's Summary has keys() but no `in`
                del summary[key]
        if kept:
            super().log_metrics(kept, step)

    def _log_table_part(self, prefix: str) -> None:
        """Log the rows held for ``prefix`` as the next part of its ``<prefix>/per_layer`` table, at its last row's
        step."""
        import wandb

        rows = self._layer_rows.pop(prefix)
        table = wandb.Table(columns=["step", "layer", "stat", "value"], data=rows)
        super().log_metrics({f"{prefix}/per_layer": table}, rows[-1][0])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._log_held_step()
        for prefix in list(self._layer_rows):
            self._log_table_part(prefix)
        super().finalize(status)


def _local_path(path: str) -> Path:
    """A local path as fsspec, which Lightning's writer goes through, reads it: without ``file://`` or ``file:``, ``~``
    expanded (opened as given, ``save_dir="~/runs"`` failed at the first new column)."""
    return Path(LocalFileSystem._strip_protocol(path))


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer whose header rewrite (a new column) replaces ``metrics.csv`` whole: the rows and the new
    header go to a temporary file in the same folder, flushed and fsynced, renamed over ``metrics.csv``. A kill or a
    full disk in the rewrite leaves the previous file, every row in it; appends are Lightning's (a kill there cuts the
    last line, which ``lightning_act report`` drops). A remote folder (fsspec) keeps Lightning's rewrite."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if _is_local_file_protocol(self.metrics_file_path):  # what a kill in an earlier rewrite left here
            for stale in _local_path(self.log_dir).glob(f".{self.NAME_METRICS_FILE}.*.tmp"):
                if is_temporary_of(stale, self.NAME_METRICS_FILE):
                    stale.unlink(missing_ok=True)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not _is_local_file_protocol(self.metrics_file_path):
            super()._rewrite_with_new_header(fieldnames)
            return
        target = _local_path(self.metrics_file_path)
        with open(target, newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        try:
            with written_whole(target) as partial, open(partial, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
        except BaseException:
            # the file keeps its header, and so does the writer: the next save rewrites again (Lightning had recorded
            # the new columns already, and its next append put rows of more columns under the old header)
            self.metrics_keys = header
            raise


class AtomicCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` (same arguments, folders, ``hparams.yaml`` and ``metrics.csv``)
    whose rewrite of ``metrics.csv`` for a new column is all-or-nothing (:class:`AtomicExperimentWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment
