"""Read a run's local logs (the CSVLogger's ``metrics.csv`` files, configs, skipped layers) for a report.

A run directory is whatever ``save_dir`` the recipe's loggers used (``runs/<recipe>/``); the
CSVLogger writes ``<run>/csv/version_N/metrics.csv`` — a new version per command, so a resumed
fit or a ``lightning_act test`` adds one — and LightningCLI writes ``config.yaml`` into the first
logger's directory. The reader merges every version of the run (:func:`merge_parts`), picks the
fit's config (:func:`find_configs`) and tolerates what a run that crashed half-way leaves
behind: a truncated last line, rows with missing fields, columns that appear late or never.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_act.errors import DataNotFoundError
from lightning_act.report.skipped import SkippedLayer, read_skipped

#: Key prefixes of the activation monitors, in the order the report shows them.
MONITOR_PREFIXES: tuple[str, ...] = ("act", "sparsity", "massive", "collapse", "sensitive")

#: Columns of ``metrics.csv`` that index rows rather than hold metrics.
INDEX_COLUMNS: tuple[str, ...] = ("step", "epoch")

#: Parameters of the massive-activation emergence fit, as logged under ``massive/<layer>/fit_<name>``.
FIT_PARAMETERS: tuple[str, ...] = ("A", "lambda", "gamma", "t0", "K")

if TYPE_CHECKING:
    import numpy as np


#: Where the CLI keeps the ``fit`` command's config, so a later ``test`` (which overwrites
#: ``config.yaml``) does not lose it.
FIT_CONFIG_NAME = "fit_config.yaml"
_CONFIG_MAX_CHARS = 200_000


@dataclass
class Series:
    """The logged ``(step, value)`` points of one metric, in file order, and ``spans``: the step ranges
    ``[first, stop)`` of the CSV versions that logged it (none known: a series built by hand). A statistic a resumed
    fit added (``warn_below`` set on resume) was not configured before its version, which the spans tell."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    def last_per_step(self) -> dict[float, float]:
        """The last value logged at each step (a step can appear on several rows)."""
        return dict(zip(self.steps, self.values, strict=True))


@dataclass(frozen=True)
class CsvPart:
    """One ``metrics.csv`` merged into a run, and the steps it contributed."""

    path: Path
    rows: int
    first_step: float | None
    last_step: float | None
    logs_training: bool
    #: The fit config the version holds (:func:`fit_config_key`): a fit's own, or the copy a ``test``/``validate``
    #: keeps, which tells whose test it is in a logger folder several runs share.
    config_key: str | None = None


@dataclass
class RunLog:
    """Everything the report shows, read from disk once.

    ``series`` is every ``metrics.csv`` of the run merged in version order (see
    :func:`merge_parts`), so a resumed run's curves are continuous and a later ``test`` run's
    metrics are included.
    """

    given_path: Path
    parts: list[CsvPart]
    columns: list[str]
    rows: int
    series: dict[str, Series]
    notes: list[str]
    configs: dict[str, tuple[Path, str]]
    plot_files: list[Path]
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def metrics_csv(self) -> Path:
        """The newest ``metrics.csv`` that logged training (the last one if none did)."""
        training = [part for part in self.parts if part.logs_training] or self.parts
        return training[-1].path

    def run_starts(self) -> list[CsvPart]:
        """:func:`run_starts` of the run's versions."""
        return run_starts(self.parts)

    def training_keys(self) -> list[str]:
        """Metrics that are neither monitor statistics nor test metrics (losses, accuracies, learning rates)."""
        return [
            k for k in self.series
            if not is_index_column(k, self.series) and split_logged_monitor_key(k) is None and not is_test_key(k)
        ]

    def test_metrics(self) -> dict[str, float]:
        """The last logged value of every test metric (``test/...``, ``test_...``)."""
        return {k: s.values[-1] for k, s in self.series.items() if is_test_key(k) and len(s)}

    def monitors(self) -> dict[str, dict[str, dict[str, Series]]]:
        """``{prefix: {stat: {layer: series}}}`` for the monitor keys present, layers in module order."""
        grouped: dict[str, dict[str, dict[str, Series]]] = {}
        for key, series in self.series.items():
            parts = split_logged_monitor_key(key)
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


def run_starts(parts: list[CsvPart]) -> list[CsvPart]:
    """The versions that start a fit of their own: the first that logged training, and each later one that starts
    over at step 0 after an earlier one trained past it. A resume starts at its checkpoint's step, so a version
    back at step 0 is another run in the same logger folder (a sweep's trials with ``CSVLogger(root,
    name="sweep")`` each get a ``version_N``): merged, it would hide every run but the last."""
    starts: list[CsvPart] = []
    trained_past_zero = False
    for part in parts:
        if part.logs_training and (not starts or (part.first_step == 0 and trained_past_zero)):
            starts.append(part)
        trained_past_zero = trained_past_zero or (part.logs_training and (part.last_step or 0) > 0)
    return starts


def run_groups(parts: list[CsvPart]) -> list[list[CsvPart]]:
    """The versions of each of :func:`run_starts`' runs, in written order: a resume and a config-less ``test`` /
    ``validate`` go with the run before them; a ``test``/``validate`` holding a fit config with the latest run before
    it that has a fit of that config (two recipes or seeds sharing one logger folder: fit A, fit B, test A), else with
    the run before it. Versions before the first run are in none (:func:`load_run` leaves them out)."""
    starts = run_starts(parts)
    groups: list[list[CsvPart]] = [[] for _ in starts]
    current = -1
    for part in parts:
        if part in starts:
            current = starts.index(part)
        if current < 0:
            continue
        owners = [] if part.logs_training or part.config_key is None else [
            index for index in range(current + 1)
            if any(member.logs_training and member.config_key == part.config_key for member in groups[index])
        ]
        groups[owners[-1] if owners else current].append(part)
    return groups


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``blocks.2`` before ``blocks.10`` (module order, not CSV column order)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def split_monitor_key(key: str) -> tuple[str, str, str] | None:
    """``"massive/model.blocks.3/ratio"`` → ``("massive", "model.blocks.3", "ratio")``; None for other keys."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] not in MONITOR_PREFIXES:
        return None
    return parts[0], "/".join(parts[1:-1]), parts[-1]


#: First word (before ``/`` or ``_``) of the metrics a ``validate``/``test`` command logs: ``val/loss``, ``val_acc``,
#: ``test_loss``. A version that logs any other metric (``train/loss``, Lightning's usual ``train_loss``, ``lr-Adam``,
#: a monitor statistic) ran a fit.
EVALUATION_WORDS: tuple[str, ...] = ("val", "valid", "validation", "test")

#: Lightning's logger prefix in front of a key: ``CSVLogger(prefix="fold1")`` (or ``WandbLogger(prefix=...)``) logs
#: ``fold1-act/<layer>/<stat>`` (``LOGGER_JOIN_CHAR`` is "-"); the prefix itself may hold a "-".
LOGGER_PREFIX_PATTERN = r"[^/]*-"
_LOGGER_PREFIX = re.compile(
    rf"^{LOGGER_PREFIX_PATTERN}(?=(?:{'|'.join(MONITOR_PREFIXES)})/"
    rf"|(?:train|{'|'.join(EVALUATION_WORDS)})(?:[/_]|$))"
)


def without_logger_prefix(key: str) -> str:
    """A logged key without the logger prefix in front of a key the report classifies: ``"fold1-massive/model.blocks.3/
    ratio"`` → ``"massive/model.blocks.3/ratio"``, ``"fold1-test/acc"`` → ``"test/acc"``; other keys (``lr-Adam``,
    ``fold1-epoch``: see :func:`is_index_column`) unchanged."""
    return _LOGGER_PREFIX.sub("", key, count=1)


#: Lightning's ``add_dataloader_idx`` suffix: with several validation/test loaders ``self.log("val/loss", ...)`` is
#: logged as ``val/loss/dataloader_idx_0``, ``val/loss/dataloader_idx_1``, ...
_LOADER_SUFFIX = re.compile(r"/dataloader_idx_(\d+)$")


def metric_name(key: str) -> str:
    """The metric a training key measures, which its figure (report) or panel (W&B dashboard) is named by:
    ``"train/loss"``, ``"val/loss"`` and ``"val/loss/dataloader_idx_1"`` → ``"loss"``, so every loader's loss sits
    beside the training loss and never on one axis with an accuracy."""
    return _LOADER_SUFFIX.sub("", key).split("/")[-1]


def loader_index(key: str) -> int | None:
    """The loader a key was logged for (``"val/loss/dataloader_idx_1"`` → 1); None without Lightning's suffix."""
    match = _LOADER_SUFFIX.search(key)
    return int(match.group(1)) if match else None


def is_index_column(column: str, columns: Collection[str]) -> bool:
    """Whether ``column``, one of the logged ``columns``, indexes rows (``step``, ``epoch``), not a metric. Lightning
    logs ``epoch`` with every metric, behind the logger's prefix like them (``fold1-epoch`` beside ``fold1-loss``),
    never ``step``; a metric whose name merely ends in "-epoch" (``seconds-per-epoch``) sits beside a plain ``epoch``,
    or shares its prefix with no other column."""
    if column in INDEX_COLUMNS:
        return True
    prefix, _, word = column.rpartition("-")
    return bool(prefix) and word == "epoch" and "epoch" not in columns and any(
        other != column and other.startswith(f"{prefix}-") for other in columns
    )


def split_logged_monitor_key(key: str) -> tuple[str, str, str] | None:
    """:func:`split_monitor_key` of a logged key, behind a logger prefix too (``fold1-act/...``): a run logged with
    ``CSVLogger(prefix=...)`` or ``WandbLogger(prefix=...)`` keeps its monitor sections."""
    return split_monitor_key(without_logger_prefix(key))


def is_test_key(key: str) -> bool:
    """Whether a metric is a test command's (``test/acc``, Lightning's usual ``test_loss``): shown as a table, not as
    a curve, and merged as a test's (see :func:`merge_parts`)."""
    return key_kind(key) == "test"


def key_kind(key: str) -> str:
    """The word a key's kind is told by, behind a logger prefix: ``"fold1-val/loss"`` → ``"val"``."""
    return re.split(r"[/_]", without_logger_prefix(key), maxsplit=1)[0]


def _logs_training(columns: list[str]) -> bool:
    """Whether a ``metrics.csv`` header has a column a fit logs and ``validate``/``test`` do not.

    Judged by every column, not by a ``train/`` prefix: a resumed fit that logs ``train_loss`` and no monitor
    statistic (none fell due) is still the fit that replaces the rolled-back steps.
    """
    return bool(_training_columns(columns))


def metrics_csv_logs_training(metrics_csv: Path) -> bool:
    """Whether a ``metrics.csv``'s header has a column a fit logs (:func:`_logs_training`)."""
    return _logs_training(_header(metrics_csv))


def written_by_fit(version_dir: Path) -> bool:
    """Whether a version folder is a fit's: LightningCLI saved a fit's ``config.yaml`` there (a fit shorter than
    ``log_every_n_steps`` logs validation rows only)."""
    config = version_dir / "config.yaml"
    return config.is_file() and _command_of(config.read_text(encoding="utf-8", errors="replace")) == "fit"


def _training_columns(columns: list[str]) -> list[str]:
    """The columns of a ``metrics.csv`` header that a fit logs and ``validate``/``test`` do not."""
    return [c for c in columns if c and not is_index_column(c, columns) and key_kind(c) not in EVALUATION_WORDS]


def _header(path: Path) -> list[str]:
    with open(path, newline="", errors="replace") as handle:
        return handle.readline().strip().split(",")


_NUMBERED_VERSION = re.compile(r"version_(\d+)")


def _in_written_order(members: list[Path]) -> list[Path]:
    """A logger's ``metrics.csv`` files in the order the commands wrote them (not by name: ``resume`` < ``run``).

    Ordered by modification time; Lightning's numbered ``version_N`` folders keep their number order among
    themselves (Lightning numbers them as it creates them, and the number survives a copy that resets the times),
    named versions (``CSVLogger(version="resume")``) go where their time puts them.
    """
    by_time = sorted(members, key=lambda p: (p.stat().st_mtime, natural_key(p.parent.name)))
    numbered = [p for p in by_time if _NUMBERED_VERSION.fullmatch(p.parent.name)]
    by_number = iter(sorted(numbered, key=lambda p: int(p.parent.name.removeprefix("version_"))))
    return [next(by_number) if _NUMBERED_VERSION.fullmatch(p.parent.name) else p for p in by_time]


#: Files other loggers leave in a run folder, named when the folder holds no ``metrics.csv``.
_OTHER_LOGGER_FILES: tuple[tuple[str, str], ...] = (
    ("events.out.tfevents.*", "TensorBoard event files"),
    ("wandb", "a W&B run"),
    ("mlruns", "an MLflow store"),
)


def _no_csv_log(given: Path) -> DataNotFoundError:
    """The one line for a folder without ``metrics.csv``: the report needs a CSVLogger, whatever else logged the run."""
    found = [what for pattern, what in _OTHER_LOGGER_FILES if next(given.rglob(pattern), None) is not None]
    holds = f" ({', '.join(found)} only)" if found else ""
    return DataNotFoundError(
        f"'{given}' holds no metrics.csv{holds}: the report reads the CSVLogger's metrics.csv; add "
        "lightning.pytorch.loggers.CSVLogger to the trainer's loggers and run the fit again, or pass the folder of a "
        "run that has one, e.g. runs/kat"
    )


def find_metrics_csvs(path: str | Path) -> tuple[list[Path], list[str]]:
    """The ``metrics.csv`` files of one run, oldest version first, and notes about the choice.

    A ``metrics.csv`` or a folder holding one is used alone. Under a parent folder, every
    ``<logger>/<version>/metrics.csv`` of one logger folder belongs to the run (a resume or a
    ``lightning_act test`` starts a new version), in the order they were written (:func:`_in_written_order`);
    if several logger folders are found, the one whose newest file logged training wins and the command says so.
    """
    given = Path(path)
    hint = "pass the run's folder, e.g. runs/kat"
    if not given.exists():
        raise DataNotFoundError(f"run directory '{given}' does not exist; {hint}")
    if given.is_file():
        if given.name == "metrics.csv":
            return [given], []
        raise DataNotFoundError(f"'{given}' is not a lightning_act run directory (no metrics.csv found under it); {hint}")
    if (given / "metrics.csv").is_file():
        return [given / "metrics.csv"], []
    found = [p for p in given.rglob("metrics.csv") if p.is_file()]
    if not found:
        raise _no_csv_log(given)
    groups: dict[Path, list[Path]] = {}
    for csv_path in found:
        groups.setdefault(csv_path.parent.parent, []).append(csv_path)
    groups = {parent: _in_written_order(members) for parent, members in groups.items()}
    if len(groups) == 1:
        return next(iter(groups.values())), []

    def newest_training(members: list[Path]) -> tuple[bool, float]:
        training = [p for p in members if metrics_csv_logs_training(p)]
        return bool(training), max(p.stat().st_mtime for p in (training or members))

    chosen = max(groups, key=lambda parent: newest_training(groups[parent]))
    others = ", ".join(str(parent) for parent in sorted(groups, key=str) if parent != chosen)
    return groups[chosen], [f"{given} holds several runs; using {chosen} (newest training log), not {others}"]


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_metrics(path: Path) -> tuple[list[str], int, dict[str, Series], list[str]]:
    """Parse ``metrics.csv`` into per-column series, skipping what a crash can leave malformed, with the test keys'
    values of its last test only (:func:`_last_test_only`).

    Returns ``(columns, complete rows, {column: series}, notes about skipped content)``.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    notes: list[str] = []
    if not text.strip():
        return [], 0, {}, [f"{path} is empty: the run stopped before anything was logged"]
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith(("\n", "\r")):
        if len(lines) == 1:
            return [], 0, {}, [f"{path} holds only a truncated header: the run stopped while writing it"]
        lines = lines[:-1]
        notes.append(f"dropped the truncated last line of {path} (the run stopped while writing it)")
    records = list(csv.reader(io.StringIO("".join(lines))))
    columns = records[0]
    series: dict[str, Series] = {name: Series() for name in columns}
    step_index = columns.index("step") if "step" in columns else None
    if step_index is None:
        notes.append(f"{path} has no 'step' column; the row number is used as the step")
    epoch_indexes = [i for i, name in enumerate(columns) if name != "step" and is_index_column(name, columns)]
    test_of: dict[str, list[int]] = {  # of each test key's value, which of the file's tests logged it
        name: [] for name in columns if is_test_key(name) and not is_index_column(name, columns)}
    tests_ended = 0
    mixed = False  # a row holding test keys beside others: the tests cannot be told apart
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
        filled = [(name, cell) for name, cell in zip(columns, record, strict=True)
                  if cell != "" and not is_index_column(name, columns)]
        for name, cell in filled:
            series[name].steps.append(step)
            series[name].values.append(_to_float(cell))
            if name in test_of:
                test_of[name].append(tests_ended)
        holds_test = any(name in test_of for name, _ in filled)
        mixed = mixed or (holds_test and not all(name in test_of for name, _ in filled))
        # Lightning logs a test's end (every loader's epoch metrics) in one row with the epoch, its per-batch rows
        # before it without: a later row of test keys is another test's (trainer.test twice on one Trainer)
        if holds_test and any(record[i] != "" for i in epoch_indexes):
            tests_ended += 1
    if not epoch_indexes:
        why = "has no 'epoch' column to tell its tests apart"
    elif mixed:  # a training row has the epoch too (test_acc_proxy beside train_loss), as has a test's acc
        why = "logs test-named keys beside other keys (in training, or a test_step logging keys not named test)"
    else:
        why = ""
    notes += _last_test_only(path, series, test_of, tests_ended, why)
    if malformed:
        notes.append(f"skipped {malformed} malformed row(s) of {path} (wrong number of fields or no step)")
    if complete == 0:
        notes.append(f"{path} has a header but no complete rows yet")
    return columns, complete, {k: v for k, v in series.items() if not is_index_column(k, columns)}, notes


def _last_test_only(
    path: Path, series: dict[str, Series], test_of: dict[str, list[int]], tests_ended: int, unsplittable: str
) -> list[str]:
    """Keep only the last test's values of the test keys of one ``metrics.csv`` (``test_of``: the test of each value),
    as :func:`merge_parts` does across versions: a later test replaces an earlier one's metrics as a whole, so that
    the test table never mixes two tests. Values after the last of the ``tests_ended`` end rows are of a test that
    did not finish (a crash; or one logging per step only, which writes no end row): with a finished test before,
    that one is kept. Where the file's rows cannot tell its tests apart (``unsplittable`` says why), every value is
    kept and, with test keys in several rows, said. Returns the notes."""
    if unsplittable:
        repeated = tests_ended > 1 or any(len(of) > 1 for of in test_of.values())
        return [f"{path} {unsplittable}: the test table shows each test metric's last value, which may be of several "
                "tests"] if repeated else []
    last = max((of[-1] for of in test_of.values() if of), default=0)
    notes = []
    if last == tests_ended and tests_ended > 0:
        last -= 1
        notes.append(f"{path} has a test after its last finished one that wrote no end row (it stopped, or logged "
                     "per step only): the table shows the finished test's metrics")
    left_out = []
    for name, of in test_of.items():
        kept = [(s, v) for s, v, test in zip(series[name].steps, series[name].values, of, strict=True) if test == last]
        if not kept and any(test < last for test in of):
            left_out.append(name)
        series[name].steps, series[name].values = [s for s, _ in kept], [v for _, v in kept]
    if left_out:
        notes.append(f"{path} tests again: its last test replaces the earlier test's metrics, so "
                     f"{', '.join(sorted(left_out))} (not logged by the last test) are left out")
    return notes


def merge_parts(parts: list[tuple[Path, dict[str, Series], bool]]) -> tuple[dict[str, Series], list[str]]:
    """Merge the series of a run's CSV versions (oldest first) into one continuous history.

    A later version that logged training (a resumed or restarted fit) starts training at some step ``s``;
    what earlier versions logged at steps ``>= s`` was rolled back by the resume, so it is
    replaced for every non-test key (a key the version logs earlier, the validation a stop interrupted and the
    resume runs again at the stopped step, from its first step). A version without training (``lightning_act test`` or ``validate``) adds its
    own keys. A version that logs test keys (:func:`is_test_key`) replaces every earlier test key as a whole, also
    those it does not log (with a note): one test's metrics, such as two loaders', never stand beside another's as
    one result (within one version, :func:`read_metrics` kept its last test only). A version without training does
    not replace the fit's curves of other keys: a ``validate`` logs ``val/*`` at step 0, which would cut the whole
    validation curve. Those values are left out, with a note.
    """
    merged: dict[str, Series] = {}
    notes: list[str] = []
    for path, series, logs_training in parts:
        firsts = {key: s.steps[0] for key, s in series.items() if len(s)}
        if not firsts:
            continue
        start = min(firsts.values())
        stop = max(s.steps[-1] for s in series.values() if len(s)) + 1
        training_firsts = [first for key, first in firsts.items() if key_kind(key) not in EVALUATION_WORDS]
        rollback = min(training_firsts, default=start)
        replaced = 0
        kept_curves = [] if logs_training else sorted(
            key for key in firsts if not is_test_key(key) and len(merged.get(key, ()))
        )
        if kept_curves:
            notes.append(
                f"{path} logs {', '.join(kept_curves)} without training; the fit's curves are kept and its values "
                "are left out"
            )
            series = {key: s for key, s in series.items() if key not in kept_curves}
        tests_again = any(is_test_key(key) for key in firsts)
        earlier_tests_only = sorted(
            key for key, old in merged.items() if tests_again and is_test_key(key) and len(old) and key not in firsts
        )
        if earlier_tests_only:
            notes.append(
                f"{path} tests again: it replaces the earlier test's metrics, so {', '.join(earlier_tests_only)} "
                "(not logged by this test) are left out"
            )
        for key, old in merged.items():
            if logs_training and not is_test_key(key):
                cut = min(rollback, firsts.get(key, rollback))
            elif tests_again and is_test_key(key):
                cut = -math.inf
            elif key in firsts and key not in kept_curves:
                cut = firsts[key]
            else:
                continue
            kept = [(s, v) for s, v in zip(old.steps, old.values, strict=True) if s < cut]
            replaced += 0 if is_test_key(key) else len(old) - len(kept)
            old.steps, old.values = [s for s, _ in kept], [v for _, v in kept]
            old.spans = [(first, min(end, cut)) for first, end in old.spans if first < cut]
        if replaced and logs_training:
            notes.append(
                f"{path} resumes at step {rollback}: it replaces {replaced} later value(s) of the earlier version(s)")
        for key, new in series.items():
            target = merged.setdefault(key, Series())
            target.steps += new.steps
            target.values += new.values
            if len(new):
                target.spans.append((start, stop))
    return {k: v for k, v in merged.items() if len(v)}, notes


def _command_of(config_text: str) -> str:
    """``fit``, or the command a LightningCLI ``config.yaml`` came from if it was not a fit.

    LightningCLI saves the subcommand's own arguments at the top level: ``validate``/``test``
    have ``verbose``, ``predict`` has ``return_predictions``; ``fit`` has neither.
    """
    top = {line.split(":", 1)[0] for line in config_text.splitlines() if line and not line[0].isspace() and ":" in line}
    if "return_predictions" in top:
        return "predict"
    if "verbose" in top:
        return "test or validate"
    return "fit"


def find_configs(version_dirs: list[Path], given: Path) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """The fit's config (:data:`FIT_CONFIG_NAME`, else a ``config.yaml`` saved by ``fit``) and ``hparams.yaml``.

    Looked up in the CSV version folders (newest first), their two parents (``csv`` → the run
    folder, where LightningCLI writes) and the folder the user passed. A ``config.yaml`` saved
    by a later ``test``/``validate``/``predict`` is shown with a note, never as the fit's config.
    """
    places: list[Path] = []
    for version_dir in reversed(version_dirs):
        places += [version_dir, *list(version_dir.parents)[:2]]
    if given.is_dir():
        places.append(given)
    places = list(dict.fromkeys(places))
    configs: dict[str, tuple[Path, str]] = {}
    notes: list[str] = []

    def read(candidate: Path) -> str:
        text = candidate.read_text(encoding="utf-8", errors="replace")
        if len(text) > _CONFIG_MAX_CHARS:
            text = text[:_CONFIG_MAX_CHARS] + f"\n... (cut at {_CONFIG_MAX_CHARS} characters)\n"
        return text

    # Newest place first, and in each the kept copy before a config.yaml: a resumed fit's config.yaml is newer than
    # the copy a test before it keeps of the first fit's (every copy first showed that older config: round 24)
    for candidate in (place / name for place in places for name in (FIT_CONFIG_NAME, "config.yaml")):
        if not candidate.is_file():
            continue
        text = read(candidate)
        command = _command_of(text)
        if command == "fit":
            configs["fit config"] = (candidate, text)
            break
        if f"{command} config" in configs:
            continue
        notes.append(
            f"{candidate} was saved by a later `{command}` command, not by the fit, so the fit's own config is "
            f"not shown; it is listed as '{command} config' (the fit's config is kept when the CLI saves "
            f"it as {FIT_CONFIG_NAME})"
        )
        configs[f"{command} config"] = (candidate, text)
    hparams = next((place / "hparams.yaml" for place in places if (place / "hparams.yaml").is_file()), None)
    if hparams is not None:
        configs["hparams.yaml"] = (hparams, read(hparams))
    return configs, notes


def fit_config_key(version_dir: Path) -> str | None:
    """The fit config a version folder holds (the kept ``fit_config.yaml``, else a ``config.yaml`` that a fit saved),
    as a string to compare, without the top-level ``ckpt_path``: a resume's config and the copy a test keeps of it
    differ from the first fit's there only. None without one, or one that is not a YAML mapping."""
    import yaml

    for candidate in (version_dir / FIT_CONFIG_NAME, version_dir / "config.yaml"):
        if not candidate.is_file():
            continue
        text = candidate.read_text(encoding="utf-8", errors="replace")
        if _command_of(text) != "fit":
            continue
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
        if not isinstance(config, dict):
            return None
        config.pop("ckpt_path", None)
        return json.dumps(config, sort_keys=True, default=str)
    return None


def _fit_with_config(key: str, candidates: list[Path]) -> Path | None:
    """The newest of the ``metrics.csv`` ``candidates`` of a fit (training rows, or a fit's ``config.yaml``) that holds
    the fit config ``key``."""
    return next((csv_path for csv_path in reversed(candidates)
                 if (metrics_csv_logs_training(csv_path) or written_by_fit(csv_path.parent))
                 and fit_config_key(csv_path.parent) == key), None)


def _continues_run(follower: CsvPart, first_step: float | None, run_last_step: float | None) -> bool:
    """Whether a version written after the one passed belongs to its run: one that logs no training (a ``validate`` /
    ``test`` of the run's checkpoint), or a resume, whose first training row (``first_step``) is after the run's last
    one so far (a resume from a stop during validation logs that validation again at the stopped run's last step).
    Any other training version is the next run, also one that first logs after step 0 (``log_every_n_steps``: a
    sweep's next trial first logs at step 49, within the steps this run logged)."""
    if not follower.logs_training:
        return True
    return first_step is not None and run_last_step is not None and first_step > run_last_step


def _logger_versions(metrics_csv: Path) -> list[Path]:
    """The ``metrics.csv`` files of ``metrics_csv``'s logger folder, in written order (:func:`_in_written_order`)."""
    return _in_written_order([p for p in metrics_csv.parent.parent.glob("*/metrics.csv") if p.is_file()])


def load_run(path: str | Path) -> RunLog:
    """Locate and read a run: every CSV version merged, configs, skipped layers, the monitors' saved plots.

    A version folder (``csv/version_N``) is read with the versions written after it up to the next run
    (:func:`_continues_run`): a sweep's trial passed as its fit's version keeps its ``validate``/``test`` versions (and
    resumes), which follow it in the logger folder. A ``test``/``validate`` version holding a fit config
    (``fit_config.yaml``) goes with the run that has a fit of that config (:func:`run_groups`), also past the next run
    (two recipes sharing one logger folder: fit A, fit B, test A); a run's folder leaves out the ``test``/``validate``
    versions written before its first training version (they tested another model: a given checkpoint) and those whose
    fit config is no fit's in the folder. A ``metrics.csv`` file is read alone.
    """
    given = Path(path)
    paths, notes = find_metrics_csvs(given)
    siblings = _logger_versions(paths[0]) if given.is_dir() and paths == [given / "metrics.csv"] else []
    followers = siblings[siblings.index(paths[0]) + 1:] if paths[0] in siblings else []
    earlier = siblings[:siblings.index(paths[0])] if paths[0] in siblings else []
    some_version_trains = any(metrics_csv_logs_training(p) or written_by_fit(p.parent) for p in paths)
    parts: list[CsvPart] = []
    to_merge: list[tuple[Path, dict[str, Series], bool]] = []
    columns: list[str] = []
    rows = 0
    run_last_training: float | None = None  # the last step of a training row so far
    next_run: CsvPart | None = None  # the first version of the next run, once a follower starts one
    later_runs_fits: set[str | None] = set()  # the fit configs of the versions from the next run on
    attached_past_next_run: list[str] = []
    for csv_path in [*paths, *followers]:
        file_columns, file_rows, file_series, file_notes = read_metrics(csv_path)
        steps = [s for series in file_series.values() for s in series.steps]
        training_steps = [s for c in _training_columns(file_columns) if c in file_series for s in file_series[c].steps]
        earlier_last = max((part.last_step for part in parts if part.last_step is not None), default=None)
        # a resumed fit whose part fell short of log_every_n_steps logs only validation rows; it is still a fit when
        # it logs past every earlier version's last step (a validate/test logs at its checkpoint's step, within the
        # run): its values were left out as a validate's. Judged by steps, not config.yaml: runs from Python have none.
        # Never a version with test metrics: a fit logs none, and a test of another run sharing the logger folder logs
        # at its own checkpoint's step, which may be past this run's last
        logs_training = _logs_training(file_columns) or (
            earlier_last is not None and bool(steps) and min(steps) > earlier_last
            and not any(is_test_key(c) for c in file_columns)
        )
        part = CsvPart(csv_path, file_rows, min(steps, default=None), max(steps, default=None), logs_training,
                       fit_config_key(csv_path.parent))
        name = part.path.parent.name
        run_fits = {p.config_key for p in parts if p.logs_training} - {None}
        tested_fit = part.config_key if not logs_training else None  # the fit config a test/validate keeps
        if (csv_path in paths and len(paths) > 1 and not logs_training and not parts and some_version_trains
                and not written_by_fit(csv_path.parent)):
            notes.append(
                f"{name} is left out: its test/validate was written before the run's first training version, so it "
                "evaluated another model (a given checkpoint), not this run's")
            continue
        if next_run is not None:  # past the next run: only this run's tests, by their fit config
            if tested_fit is not None and tested_fit in run_fits and tested_fit not in later_runs_fits:
                attached_past_next_run.append(name)
            else:
                later_runs_fits.add(part.config_key if logs_training else None)
                continue
        elif parts and tested_fit is not None and tested_fit not in run_fits:
            owner = _fit_with_config(tested_fit, earlier)
            if owner is not None or run_fits:
                whose = (f"the fit config of {owner.parent.name}, which it goes with" if owner is not None
                         else "the config of no fit written before it in this run")
                notes.append(f"{name} is left out: the fit config its test/validate kept ({FIT_CONFIG_NAME}) is "
                             f"{whose}")
                continue
        elif csv_path in followers:
            first_training = min(training_steps, default=part.first_step)
            last_training = earlier_last if run_last_training is None else run_last_training
            if not _continues_run(part, first_training, last_training):
                if part.logs_training and first_training and last_training is not None:
                    notes.append(
                        f"{given} is read without {name} and the versions after it: that version logs "
                        f"training from step {first_training:g}, not after this run's last step {last_training:g}, "
                        f"so it is read as the next run (a sweep's next trial); if it resumes this run from an earlier "
                        f"checkpoint, pass {given.parent} to merge them"
                    )
                next_run = part
                later_runs_fits.add(part.config_key)
                continue
        notes += file_notes
        parts.append(part)
        run_last_training = max([*training_steps, *([] if run_last_training is None else [run_last_training])],
                                default=None)
        to_merge.append((csv_path, file_series, logs_training))
        columns += [c for c in file_columns if c not in columns]
        rows += file_rows
    before_next_run = [part.path.parent.name for part in parts[1:]
                       if part.path.parent.name not in attached_past_next_run]
    if before_next_run and followers:
        notes.append(
            f"{given} is read with the version(s) written after it up to the next run in {given.parent}: "
            + ", ".join(before_next_run)
        )
    if attached_past_next_run:
        notes.append(
            f"{given} is also read with {', '.join(attached_past_next_run)}, written after the next run "
            f"({next_run.path.parent.name}): the fit config its test/validate kept ({FIT_CONFIG_NAME}) is this run's"
        )
    series, merge_notes = merge_parts(to_merge)
    version_dirs = [part.path.parent for part in parts]
    configs, config_notes = find_configs(version_dirs, given)
    plot_files = [
        png for version_dir in version_dirs if (version_dir / "plots").is_dir()
        for png in sorted((version_dir / "plots").glob("*.png"), key=lambda p: natural_key(p.name))
    ]
    skipped, skipped_notes = read_skipped([*version_dirs, given] if given.is_dir() else version_dirs)
    return RunLog(
        given_path=given,
        parts=parts,
        columns=columns,
        rows=rows,
        series=series,
        notes=notes + merge_notes + config_notes + skipped_notes,
        configs=configs,
        plot_files=plot_files,
        skipped=skipped,
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
