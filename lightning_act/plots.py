"""Pictures a person would rather look at than CSV columns, saved as PNG and sent to W&B, TensorBoard and MLflow.

matplotlib is imported lazily, so nothing here slows down ``lightning_act --help``. The figures are
``matplotlib.figure.Figure`` objects made without pyplot: saving one as PNG needs no backend, so the user's (a
notebook's inline one, an interactive window) is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from lightning_act._files import written_whole
from lightning_act.lightning_classes import lightning_classes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_act.callbacks.history import BoundedSeries


def run_dir(trainer: pl.Trainer) -> Path:
    """A run's local directory, where its figures and ``monitors/skipped.json`` go.

    The CSV logger's version folder first, whatever the loggers' order: ``lightning_act report`` reads that one.
    Else the TensorBoard logger's version folder; else, for MLflow, the run's own folder
    ``<save_dir or default_root_dir>/<experiment id>/<run id>`` (Lightning's place for that run's checkpoints; the
    store's root is shared by every run, and MLflow takes a folder there for a broken experiment); else a logger's
    save directory, else the Trainer's root. (``trainer.log_dir`` is avoided: it broadcasts, and this runs on rank
    zero only.) A ``~`` in these paths is the home folder, as where the loggers themselves write.
    """
    return _logged_run_dir(trainer).expanduser()


def _logged_run_dir(trainer: pl.Trainer) -> Path:
    """:func:`run_dir` as the loggers spell it (``~`` kept)."""
    for kind in ("loggers.CSVLogger", "loggers.TensorBoardLogger"):
        for logger in trainer.loggers:
            if isinstance(logger, lightning_classes(kind)):
                return Path(logger.log_dir)
    for logger in trainer.loggers:
        if isinstance(logger, lightning_classes("loggers.MLFlowLogger")):
            return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / str(logger.version)
    for logger in trainer.loggers:
        if logger.save_dir:
            return Path(logger.save_dir)
    return Path(trainer.default_root_dir)


def writes_run_files(trainer: pl.Trainer) -> bool:
    """Whether a fit may write into its run folder: not with ``Trainer(logger=False)`` (the user asked for no run
    folder) nor under ``fast_dev_run`` (a smoke test, for which Lightning writes no logs or checkpoints)."""
    return bool(trainer.loggers) and not trainer.fast_dev_run


def new_figure(width: float, height: float) -> Figure:
    """A figure made without pyplot, so that drawing it leaves the process's matplotlib backend as the user set it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def layer_step_heatmap(series: Mapping[str, BoundedSeries], title: str, steps: Sequence[int]) -> Figure:
    """Layers (rows, in module order) × ``steps`` (columns, each as wide as the gaps to its neighbours reach) of one
    statistic, on an x axis of global steps; a step without a value of a layer (unknown there) is a blank cell."""
    import numpy as np

    names = list(series)
    column = {s: j for j, s in enumerate(steps)}
    grid = np.full((len(names), len(steps)), np.nan)
    for i, name in enumerate(names):
        for s, v in zip(series[name].steps, series[name].values):
            grid[i, column[s]] = v
    from matplotlib.ticker import MaxNLocator

    x = np.asarray(steps, dtype=np.float64)
    if len(x) > 1:
        middles = (x[1:] + x[:-1]) / 2
        edges = np.concatenate([[2 * x[0] - middles[0]], middles, [2 * x[-1] - middles[-1]]])
    else:
        edges = np.concatenate([x - 0.5, x + 0.5])
    figure = new_figure(min(14.0, 4.0 + 0.08 * len(steps)), min(12.0, 1.5 + 0.3 * len(names)))
    axes = figure.add_subplot()
    image = axes.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, grid, cmap="viridis")
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.invert_yaxis()  # the first layer on top
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("global step")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    return figure


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs at (batches that stepped an optimizer): ``global_step`` counts each optimizer's steps
    under manual optimization, and W&B drops a later metric logged at a step below one it has seen."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def save_png_whole(figure: Figure, path: Path, **savefig_kwargs: Any) -> None:
    """``figure.savefig(path)`` as a PNG written under a temporary name in the same folder and renamed: a kill mid-write
    leaves no truncated picture under its name (and the previous one, of a resumed run, intact). A failed write (a
    full disk) that names no file is raised again naming ``path``, so that its one-line message can say where."""
    with written_whole(path) as partial:
        figure.savefig(partial, format="png", **savefig_kwargs)


def log_figure(trainer: pl.Trainer, figure: Figure, name: str) -> Path | None:
    """Save ``figure`` as ``<run dir>/plots/<name>.png`` and log it to every logger that keeps images: W&B
    (``plots/<name>``), TensorBoard (``add_figure``) and MLflow (the run's artifact ``plots/<name>.png``).

    Where the fit writes no run files (:func:`writes_run_files`) nothing is written and None is returned. The PNG is
    written whole (:func:`save_png_whole`).
    """
    if not writes_run_files(trainer):
        return None
    path = run_dir(trainer) / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_whole(figure, path)
    for logger in trainer.loggers:
        if isinstance(logger, lightning_classes("loggers.WandbLogger")):
            logger.log_image(key=f"plots/{name}", images=[str(path)], step=logging_step(trainer))
        elif isinstance(logger, lightning_classes("loggers.TensorBoardLogger")):
            logger.experiment.add_figure(f"plots/{name}", figure, global_step=logging_step(trainer), close=False)
        elif isinstance(logger, lightning_classes("loggers.MLFlowLogger")):
            logger.experiment.log_artifact(logger.run_id, str(path), "plots")
    return path


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table to any W&B logger (other loggers have no table type)."""
    for logger in trainer.loggers:
        if isinstance(logger, lightning_classes("loggers.WandbLogger")):
            logger.log_table(key=key, columns=columns, data=rows, step=logging_step(trainer))
