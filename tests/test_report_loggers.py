"""Where the monitors' run files go with other loggers than a lone CSVLogger, and what reaches those loggers.

TensorBoard and MLflow are not dependencies: stand-ins check the logic everywhere, the real loggers run where installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from lightning_act.callbacks import ActivationStats, MassiveActivations
from lightning_act.plots import log_figure, new_figure, run_dir
from lightning_act.report import build_report, load_run


class StandInMLFlowLogger(MLFlowLogger):
    """MLFlowLogger's surface without mlflow: run ``run_id`` of experiment ``experiment_id`` in the file store
    ``save_dir``; records the artifacts logged to it."""

    def __init__(self, save_dir: Path, experiment_id: str = "7", run_id: str = "run1") -> None:
        Logger.__init__(self)
        self._store, self._experiment_id, self._run_id = str(save_dir), experiment_id, run_id
        self.artifacts: list[tuple[str, bytes, str | None]] = []

    @property
    def experiment(self) -> StandInMLFlowLogger:
        return self

    @property
    def save_dir(self) -> str:
        return self._store

    @property
    def name(self) -> str:
        return self._experiment_id

    @property
    def version(self) -> str:
        return self._run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.artifacts.append((run_id, Path(local_path).read_bytes(), artifact_path))


class RecordingTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger of version 0 in ``<save_dir>/<name>`` whose writer records ``add_figure``: no tensorboard
    needed (TensorBoardLogger's own ``__init__`` refuses to run without it, and CI does not install it)."""

    def __init__(self, save_dir: Path, name: str) -> None:
        Logger.__init__(self)
        self._store, self._run_name = Path(save_dir), name
        self.figures: list[tuple[str, Any, int]] = []

    @property
    def experiment(self) -> RecordingTensorBoardLogger:
        return self

    @property
    def save_dir(self) -> str:
        return str(self._store)

    @property
    def root_dir(self) -> str:
        return str(self._store / self._run_name)

    @property
    def name(self) -> str:
        return self._run_name

    @property
    def version(self) -> int:
        return 0

    @property
    def log_dir(self) -> str:
        return str(self._store / self._run_name / "version_0")

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool = True) -> None:
        self.figures.append((tag, figure, global_step))


def bare_trainer(tmp_path: Path, loggers: list[Logger]) -> pl.Trainer:
    return pl.Trainer(logger=loggers, default_root_dir=tmp_path / "root", enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


def test_run_files_go_to_the_csv_version_folder_whatever_the_loggers_order(tmp_path: Path) -> None:
    # before: a TensorBoardLogger listed first got plots/ and monitors/skipped.json, which the report never reads
    csv = CSVLogger(tmp_path, name="csv")
    assert run_dir(bare_trainer(tmp_path, [RecordingTensorBoardLogger(tmp_path, name="tb"), csv])) == Path(csv.log_dir)


def test_figures_reach_tensorboard_and_the_mlflow_run_and_never_the_stores_root(tmp_path: Path) -> None:
    # before: with MLflow alone the figure went to <store>/plots/ (shared by every run; MLflow reads it as a broken
    # experiment), and neither MLflow nor TensorBoard got it
    store = tmp_path / "mlruns"
    figure = new_figure(2, 2)
    figure.add_subplot().plot([0, 1], [1, 0])
    mlflow = StandInMLFlowLogger(store)
    path = log_figure(bare_trainer(tmp_path, [mlflow]), figure, "act_rms_heatmap")
    assert path == store / "7" / "run1" / "plots" / "act_rms_heatmap.png"
    assert mlflow.artifacts == [("run1", path.read_bytes(), "plots")]
    assert sorted(p.name for p in store.iterdir()) == ["7"]

    tensorboard, csv, mlflow = RecordingTensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv"), StandInMLFlowLogger(store)
    path = log_figure(bare_trainer(tmp_path, [tensorboard, mlflow, csv]), figure, "act_rms_heatmap")
    assert path == Path(csv.log_dir) / "plots" / "act_rms_heatmap.png"
    assert tensorboard.figures == [("plots/act_rms_heatmap", figure, 0)]
    assert mlflow.artifacts == [("run1", path.read_bytes(), "plots")]


def fit(root: Path, loggers: list[Logger], *callbacks: pl.Callback, steps: int = 4) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=steps, logger=loggers, callbacks=list(callbacks), default_root_dir=root, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=1,
    )
    trainer.fit(BoringModel())


def test_a_skipped_fit_is_in_the_report_with_tensorboard_listed_first(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    massive = MassiveActivations(modules=["layer"], every_n_steps=1)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [tensorboard, CSVLogger(tmp_path, name="csv")], massive, ActivationStats(modules=["layer"], every_n_steps=1))
    assert massive.fit_skipped == {"layer": "4 ratio points, the fit needs at least 6"}
    run = load_run(tmp_path)
    assert [(s.monitor, s.what, s.layer, s.reason) for s in run.skipped] == [
        ("massive", "emergence fit", "layer", "4 ratio points, the fit needs at least 6")
    ]
    assert "4 ratio points, the fit needs at least 6" in build_report(tmp_path, tmp_path / "r.html").read_text()
    assert "plots/act_rms_heatmap" in EventAccumulator(tensorboard.log_dir).Reload().Tags()["images"]


def test_each_mlflow_run_keeps_its_own_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    runs = []
    for steps in (3, 5):
        logger = MLFlowLogger(experiment_name="e", tracking_uri=uri)
        fit(tmp_path, [logger], ActivationStats(modules=["layer"], every_n_steps=1), steps=steps)
        runs.append(logger.run_id)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    digests = set()
    for run_id in runs:
        assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/act_rms_heatmap.png"]
        local = Path(client.download_artifacts(run_id, "plots/act_rms_heatmap.png", str(tmp_path / run_id)))
        digests.add(hashlib.md5(local.read_bytes()).hexdigest())
    assert len(digests) == 2  # 3 and 5 steps: two heatmaps, neither overwritten by the other
    assert not (tmp_path / "mlruns" / "plots").exists() and not (tmp_path / "mlruns" / "monitors").exists()


def test_the_heatmap_png_has_a_column_for_every_logged_step_blank_where_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverging fit: MassiveActivations' ratio is known at the first due steps only, the layers go on being logged."""
    import csv
    import math

    import numpy as np
    import torch
    from _toy import BlockNet, ToyData, ToyTask

    import lightning_act.plots as plots

    drawn = {}
    monkeypatch.setattr(plots, "log_figure", lambda trainer, figure, name: drawn.setdefault(name, figure))
    torch.manual_seed(0)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="csv"), max_steps=12, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[MassiveActivations(modules=["net.blocks.0", "net.blocks.1"], every_n_steps=2)],
    )
    trainer.fit(ToyTask(BlockNet(depth=2), lr=200.0), ToyData())
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    layers = ["net.blocks.0", "net.blocks.1"]
    logged = sorted({int(row["step"]) for row in rows for key, cell in row.items()
                     if cell and key.startswith(tuple(f"massive/{layer}/" for layer in layers)) and "/fit_" not in key})
    ratio = np.full((len(layers), len(logged)), np.nan)
    for row in rows:
        for i, layer in enumerate(layers):
            if row.get(f"massive/{layer}/ratio"):
                ratio[i, logged.index(int(row["step"]))] = float(row[f"massive/{layer}/ratio"])
    assert np.isfinite(ratio).any() and np.isnan(ratio).any()  # the case: known at some logged steps, not at others
    mesh = drawn["massive_ratio_heatmap"].axes[0].collections[0]
    cells = mesh.get_array()
    # before: one column per step with a known ratio, by index (here only step 0)
    edges = mesh.get_coordinates()[0, :, 0]  # halfway between the steps (evenly spaced here)
    assert list((edges[:-1] + edges[1:]) / 2) == logged
    assert np.array_equal(np.ma.getmaskarray(cells), ~np.isfinite(ratio))
    assert np.array_equal(cells.filled(math.nan)[np.isfinite(ratio)], ratio[np.isfinite(ratio)])
