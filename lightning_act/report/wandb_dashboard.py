"""A saved W&B workspace that lays out the monitors: ``lightning_act wandb-dashboard --project P``.

Why the keys look the way they do: every monitor logs ``<prefix>/<module>/<stat>`` (e.g.
``massive/model.blocks.3/ratio``). W&B's default (automatic) workspace puts each key into the
*panel section* named by the text before its first ``/``, so without any setup a project shows
one section per monitor (``act``, ``sparsity``, ``massive``, ``collapse``, ``sensitive``) next
to ``train`` and ``val`` — but with one panel per key, i.e. one per layer and statistic.

This command saves a *view* that is easier to read: per monitor one section, in it one line
plot per statistic whose y axis is the regex ``^<prefix>/[^/]+/<stat>$`` (every layer of that
statistic on one panel, or the one summary key ``<prefix>/<reduction>/<stat>`` that
:class:`lightning_act.loggers.CompactWandbLogger` logs instead) over ``trainer/global_step``,
and a media panel with the monitor's images (``plots/<prefix>_*``, logged by
:func:`lightning_act.plots.log_figure`). The project defaults to the one the local run
(``--run-dir``) logged to; ``--dry-run`` prints the layout offline.

The layout is a plain data structure built by :func:`dashboard_spec` (pure, tested offline);
only :func:`keys_from_project` and the save talk to W&B (a missing login or network is one
line, not a traceback), through the maintained ``wandb-workspaces`` package
(``pip install wandb-workspaces``), imported when the command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.loggers import WandbLogger

from lightning_act.errors import LightningActError
from lightning_act.loggers import TOPK_STAT, reduction_of
from lightning_act.report.content import INDEX_STAT
from lightning_act.report.runlog import (
    LOGGER_PREFIX_PATTERN,
    MONITOR_PREFIXES,
    is_index_column,
    metric_name,
    split_logged_monitor_key,
    without_logger_prefix,
)

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

#: Section titles of the monitors (key prefix → title).
SECTION_TITLES: dict[str, str] = {
    "act": "act: activation statistics",
    "sparsity": "sparsity: activation sparsity",
    "massive": "massive: massive activations",
    "collapse": "collapse: dimensional collapse",
    "sensitive": "sensitive: sensitive neurons",
}

IMAGE_PREFIX = "plots/"

#: An image key as :func:`lightning_act.plots.log_figure` logs it, behind a logger prefix too: Lightning's
#: ``log_image`` goes through ``log_metrics``, so ``WandbLogger(prefix="fold1")`` logs ``fold1-plots/<name>``.
_IMAGE_KEY = re.compile(rf"^(?:{LOGGER_PREFIX_PATTERN})?{re.escape(IMAGE_PREFIX)}(.+)$")

#: The x axis of every line plot: Lightning's WandbLogger logs the global step under this key
#: and declares it the step metric of all other keys (W&B's own ``Step`` counts ``log`` calls).
STEP_KEY = "trainer/global_step"


@dataclass(frozen=True)
class PanelSpec:
    """One panel: a line plot of every key matching ``metric_regex`` over ``x``, or a media browser of ``media_keys``."""

    kind: Literal["line", "media"]
    title: str
    metric_regex: str | None = None
    media_keys: tuple[str, ...] = ()
    x: str | None = None


@dataclass(frozen=True)
class SectionSpec:
    name: str
    panels: tuple[PanelSpec, ...] = field(default_factory=tuple)


def _stat_order(stats: Iterable[str]) -> list[str]:
    """Statistics first, then the emergence-fit parameters (``fit_*``)."""
    return sorted(stats, key=lambda s: (s.startswith("fit_"), s))


def dashboard_spec(keys: Iterable[str], compact: bool = False) -> list[SectionSpec]:
    """The workspace layout for a project that logged ``keys`` (metric and image keys).

    Sections: ``training`` (one line plot per metric name, e.g. ``train/loss`` and ``val/loss``
    together, and each loader's ``val/loss/dataloader_idx_N`` with several validation loaders), then one per
    monitor present, in :data:`MONITOR_PREFIXES` order. Token/feature
    positions get no line plot (an index is not a curve; see ``lightning_act report``); with ``compact``
    (a :class:`~lightning_act.loggers.CompactWandbLogger` run) neither do the top-k values, which it keeps in its
    ``<prefix>/per_layer`` table only: their panels would stay empty. Keys behind a logger prefix
    (``WandbLogger(prefix="fold1")`` logs ``fold1-massive/...``) share the monitor panels with unprefixed ones; images
    behind one (``fold1-plots/massive_ratio_heatmap``) go to their monitor's media panel under that real key.
    """
    keys = list(dict.fromkeys(keys))
    keys = [k for k in keys if not is_index_column(k, keys) and k != STEP_KEY and not k.startswith("_")]
    monitor_stats: dict[str, set[str]] = {}
    training: dict[str, list[str]] = {}
    images: dict[str, str] = {}  # logged key -> image name (without logger prefix and "plots/")
    for key in keys:
        image = _IMAGE_KEY.match(key)
        if image:
            images[key] = image.group(1)
            continue
        parts = split_logged_monitor_key(key)
        if parts is not None:
            if not INDEX_STAT.match(parts[2]) and not (compact and TOPK_STAT.match(parts[2])):
                monitor_stats.setdefault(parts[0], set()).add(parts[2])
        else:
            training.setdefault(metric_name(key), []).append(key)

    sections: list[SectionSpec] = []
    if training:
        sections.append(SectionSpec(
            name="training",
            panels=tuple(
                PanelSpec(
                    kind="line", title=name, x=STEP_KEY,
                    metric_regex="^(" + "|".join(re.escape(k) for k in sorted(group)) + ")$",
                )
                for name, group in sorted(training.items())
            ),
        ))
    for prefix in MONITOR_PREFIXES:
        if prefix not in monitor_stats:
            continue
        panels = [
            PanelSpec(
                kind="line",
                title=f"{prefix}/*/{stat}",
                x=STEP_KEY,
                metric_regex=f"^(?:{LOGGER_PREFIX_PATTERN})?{re.escape(prefix)}/[^/]+/{re.escape(stat)}$",
            )
            for stat in _stat_order(monitor_stats[prefix])
        ]
        own_images = tuple(sorted(k for k, name in images.items() if name.startswith(prefix + "_")))
        if own_images:
            panels.append(PanelSpec(kind="media", title=f"{prefix} plots", media_keys=own_images))
        sections.append(SectionSpec(name=SECTION_TITLES[prefix], panels=tuple(panels)))
    claimed = {k for s in sections for p in s.panels for k in p.media_keys}
    other_images = tuple(sorted(k for k in images if k not in claimed))
    if other_images:
        sections.append(SectionSpec(name="plots", panels=(PanelSpec(kind="media", title="plots", media_keys=other_images),)))
    return sections


def keys_from_run_dir(run_dir: str | Path) -> list[str]:
    """Metric keys from a local run's ``metrics.csv`` header and image keys from its ``plots/``, as W&B holds them.

    The images are named behind each W&B logger's ``prefix`` (``fold1-plots/<name>``), which the run's fit config
    gives; a run whose config names no W&B logger (a fit from Python has no config) is taken to have logged to W&B
    behind the logger prefix its CSV monitor keys carry, as its metric keys are taken as the CSV names them.
    """
    from lightning_act.report.runlog import load_run

    run = load_run(run_dir)
    configured = [(logger.get("init_args") or {}).get("prefix") or "" for logger in _wandb_logger_configs(run_dir)]
    if configured:  # every W&B logger logs the images, each behind its own prefix
        logger_prefixes = {f"{prefix}{WandbLogger.LOGGER_JOIN_CHAR}" if prefix else "" for prefix in configured}
    else:
        logger_prefixes = {
            key[: len(key) - len(without_logger_prefix(key))] for key in run.series if split_logged_monitor_key(key)
        } or {""}
    images = [prefix + IMAGE_PREFIX + p.stem for prefix in sorted(logger_prefixes) for p in run.plot_files]
    return [*run.series, *images]


def keys_from_project(entity: str | None, project: str, max_runs: int = 50) -> tuple[list[str], bool]:
    """Keys in the summaries of up to ``max_runs`` runs of a W&B project, and whether every one of those runs that
    logged monitor keys did so through a :class:`~lightning_act.loggers.CompactWandbLogger` (:func:`compact_from_keys`;
    one that did not keeps the top-k panels). Network; failures are one line."""
    import wandb

    keys: dict[str, None] = {}
    compact = True
    try:
        api = wandb.Api()
        path = f"{entity or api.default_entity}/{project}"
        for index, run in enumerate(api.runs(path)):
            if index >= max_runs:
                break
            run_keys = list(run.summary.keys())
            if any(split_logged_monitor_key(key) for key in run_keys):  # a run without monitors (a baseline) tells nothing
                compact = compact and compact_from_keys(run_keys)
            keys.update(dict.fromkeys(run_keys))
    except (wandb.errors.Error, OSError) as error:
        raise LightningActError(_wandb_problem(error)) from None
    return list(keys), compact and bool(keys)


def build_workspace(sections: Sequence[SectionSpec], entity: str, project: str, name: str) -> Workspace:
    """Turn the spec into ``wandb_workspaces`` objects (no network until ``.save()``)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as error:
        raise LightningActError(
            "the W&B workspace API is not installed; run `pip install wandb-workspaces` and try again"
        ) from error

    def panel(spec: PanelSpec) -> object:
        if spec.kind == "media":
            return wr.MediaBrowser(title=spec.title, media_keys=list(spec.media_keys))
        return wr.LinePlot(title=spec.title, x=spec.x, metric_regex=spec.metric_regex)

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[ws.Section(name=s.name, panels=[panel(p) for p in s.panels], is_open=True) for s in sections],
    )


def _wandb_logger_configs(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The W&B loggers (``class_path`` and ``init_args``) in the fit configs of a local run."""
    import yaml

    from lightning_act.report.runlog import load_run

    run = load_run(run_dir)
    for name, (_, text) in run.configs.items():
        if not name.endswith("config"):
            continue
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        loggers = ((config or {}).get("trainer") or {}).get("logger") or []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
                yield logger


def project_from_run(run_dir: str | Path) -> str | None:
    """The W&B project a local run logged to: ``project`` of the W&B logger in the run's fit config."""
    for logger in _wandb_logger_configs(run_dir):
        project = (logger.get("init_args") or {}).get("project")
        if project:
            return str(project)
    return None


def compact_from_run(run_dir: str | Path) -> bool:
    """Whether a local run logged to W&B through :class:`~lightning_act.loggers.CompactWandbLogger` without
    ``per_layer`` (its local CSV holds every per-layer key all the same)."""
    return any(
        str(logger.get("class_path", "")).endswith("CompactWandbLogger")
        and not (logger.get("init_args") or {}).get("per_layer")
        for logger in _wandb_logger_configs(run_dir)
    )


def compact_from_keys(keys: Iterable[str]) -> bool:
    """Whether a project's keys are a :class:`~lightning_act.loggers.CompactWandbLogger`'s: a summary key
    ``<prefix>/<reduction>/<stat>`` or a ``<prefix>/per_layer`` table."""
    for key in keys:
        parts = split_logged_monitor_key(key)
        if parts is not None and parts[1] == reduction_of(parts[0], parts[2]):
            return True
        key = without_logger_prefix(key)
        if key.count("/") == 1 and key.endswith("/per_layer") and key.split("/")[0] in MONITOR_PREFIXES:
            return True
    return False


def _wandb_problem(error: Exception) -> str:
    """One line for a failure to talk to W&B (not logged in, no network, refused)."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "api key" in first_line.lower() or "wandb login" in first_line.lower():
        return "not logged in to W&B; run `wandb login` (or set WANDB_API_KEY) and try again, or add --dry-run to print the layout offline"
    return (
        f"could not reach W&B ({first_line}); check the network and your login, or add --dry-run to print the "
        "layout offline"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning_act wandb-dashboard [--run-dir DIR] [--project P] [--entity E] [--name N] [--dry-run]``."""
    parser = argparse.ArgumentParser(
        prog="lightning_act wandb-dashboard",
        description="Save a W&B workspace view with one section per activation monitor "
        "(needs `pip install wandb-workspaces` and `wandb login`; --dry-run needs neither).",
    )
    parser.add_argument("--run-dir", default=None,
                        help="a local run (e.g. runs/kat): its metric keys lay out the view, and its W&B project is the default")
    parser.add_argument("--project", default=None, help="W&B project (default: the one the run in --run-dir logged to)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    parser.add_argument("--name", default="lightning_act monitors", help="name of the saved view")
    parser.add_argument("--dry-run", action="store_true", help="print the layout and save nothing (offline)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        project = args.project or (project_from_run(args.run_dir) if args.run_dir else None)
        if args.run_dir is None and project is None:
            raise LightningActError("pass --run-dir RUN (a local run, e.g. runs/kat) or --project P (a W&B project)")
        if args.run_dir is None and args.dry_run:
            raise LightningActError("--dry-run lays out a local run's keys offline; pass --run-dir RUN (e.g. runs/kat)")
        if project is None and not args.dry_run:
            raise LightningActError(
                f"no W&B logger with a project in the config of {args.run_dir}; pass --project P"
            )
        if args.run_dir:
            keys, compact = keys_from_run_dir(args.run_dir), compact_from_run(args.run_dir)
        else:
            keys, compact = keys_from_project(args.entity, str(project))
        sections = dashboard_spec(keys, compact)
        if not any(s.name in SECTION_TITLES.values() for s in sections):
            raise LightningActError(
                f"no monitor keys (act/, sparsity/, massive/, collapse/, sensitive/) found in "
                f"{args.run_dir or 'project ' + str(project)}; log a run with the monitors attached first"
            )
        if args.dry_run:
            print(f"project: {project or '(none: pass --project to save)'}")
            for section in sections:
                print(section.name)
                for p in section.panels:
                    print(f"  {p.kind:5s} {p.title}: {p.metric_regex or ', '.join(p.media_keys)}")
            return 0
        url = _save(sections, args.entity, str(project), args.name)
    except LightningActError as error:
        print(f"lightning_act wandb-dashboard: error: {error}", file=sys.stderr)
        return 2
    print(f"saved workspace view: {url}")
    return 0


def _save(sections: Sequence[SectionSpec], entity: str | None, project: str, name: str) -> str:
    """Save the view (network); W&B failures become one :class:`LightningActError` line."""
    import wandb

    try:
        if entity is None:
            entity = wandb.Api().default_entity
        return build_workspace(sections, str(entity), project, name).save().url
    except (wandb.errors.Error, OSError) as error:
        raise LightningActError(_wandb_problem(error)) from None
