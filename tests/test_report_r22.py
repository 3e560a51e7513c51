"""Round 22 report fixes: logger prefixes on every column, the report's own temporary file, ``~`` in run folders,
PNGs written whole, and a logger folder holding several runs (a sweep's trials)."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _toy import BlockNet, ToyTask, quiet_trainer, toy_loader
from lightning.pytorch.loggers import CSVLogger
from test_report import figure_for, write_csv

from lightning_act import plots
from lightning_act.errors import ConfigError
from lightning_act.report import build_report, load_run
from lightning_act.report.html import main


# ---------------------------------------------------------------- logger prefix on every column


def write_prefixed_fit_then_test(root: Path) -> None:
    """A fit logged by ``CSVLogger(prefix="fold1")`` (steps 0..40) and a later ``test`` at the checkpoint's step 40,
    with Lightning's ``fold1-epoch`` column (every column but ``step`` carries the prefix)."""
    header = ["fold1-epoch", "fold1-act/blocks.0/mean", "fold1-train/loss", "fold1-val/loss", "step"]
    rows: list[dict[str, Any]] = [
        {"fold1-epoch": 0, "fold1-act/blocks.0/mean": 0.5 * s, "fold1-train/loss": 1.0 / (s + 1), "step": s}
        for s in range(0, 41, 10)
    ]
    rows.append({"fold1-epoch": 0, "fold1-val/loss": 0.5, "step": 40})
    fit = root / "csv" / "version_0" / "metrics.csv"
    write_csv(fit, header, rows)
    os.utime(fit, (1_000_000_000, 1_000_000_000))
    write_csv(root / "csv" / "version_1" / "metrics.csv", ["fold1-epoch", "fold1-test/acc", "step"],
              [{"fold1-epoch": 0, "fold1-test/acc": 0.875, "step": 40}])


def test_a_prefixed_test_version_adds_its_metrics_and_keeps_the_fits_curves(tmp_path: Path) -> None:
    # before: the test version was taken for a fit resumed at step 40 (its columns were no test/evaluation keys):
    # step 40 of every fit curve was cut, fold1-val/loss was gone, fold1-test/acc was drawn as a training curve
    write_prefixed_fit_then_test(tmp_path)
    run = load_run(tmp_path)
    assert [part.logs_training for part in run.parts] == [True, False]
    monitor = run.monitors()["act"]["mean"]["blocks.0"]
    assert monitor.steps == [0, 10, 20, 30, 40] and monitor.values == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert run.series["fold1-train/loss"].values == [1.0, 1 / 11, 1 / 21, 1 / 31, 1 / 41]
    assert run.series["fold1-val/loss"].last_per_step() == {40: 0.5}
    assert run.test_metrics() == {"fold1-test/acc": 0.875}
    assert sorted(run.training_keys()) == ["fold1-train/loss", "fold1-val/loss"]  # the epoch column is no curve
    assert "fold1-epoch" not in run.series and not any("resumes" in note for note in run.notes)
    text = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert "<tr><td>fold1-test/acc</td><td>0.875</td></tr>" in text
    traces, _ = figure_for(text, "training-loss")
    assert [(t["name"], t["line"]["dash"]) for t in traces] == [("fold1-train/loss", "solid"), ("fold1-val/loss", "dash")]


class _TestedToyTask(ToyTask):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(dim=1) == y).float().mean())
        self.log("test/loss", F.cross_entropy(self(x), y))


def test_a_real_prefixed_fit_then_test_in_a_new_trainer(tmp_path: Path) -> None:
    # the files Lightning writes: the fit's fold1-epoch/fold1-train/loss at steps 0..2, then a test in a new Trainer
    # logging fold1-epoch,fold1-test/... at step 0; before, the test "resumed at step 0" and replaced the whole fit
    torch.manual_seed(0)
    task = _TestedToyTask(BlockNet())
    trainer = quiet_trainer(max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="csv", prefix="fold1"))
    trainer.fit(task, toy_loader(24, 8))
    with torch.no_grad():
        logged_losses = [float(F.cross_entropy(task(x), y)) for x, y in toy_loader(24, 8)]
    tester = quiet_trainer(logger=CSVLogger(tmp_path, name="csv", prefix="fold1"))
    tester.test(task, toy_loader(24, 8), verbose=False)
    run = load_run(tmp_path)
    assert [part.logs_training for part in run.parts] == [True, False]
    assert run.series["fold1-train/loss"].steps == [0, 1, 2]
    assert sorted(run.test_metrics()) == ["fold1-test/acc", "fold1-test/loss"]
    assert math.isclose(run.test_metrics()["fold1-test/loss"], sum(logged_losses) / 3, rel_tol=1e-5)
    assert run.training_keys() == ["fold1-train/loss"] and run.notes == []


# ---------------------------------------------------------------- the report's temporary file


def write_small_run(root: Path) -> None:
    write_csv(root / "csv" / "version_0" / "metrics.csv", ["epoch", "step", "train/loss"],
              [{"epoch": 0, "step": 0, "train/loss": 1.0}, {"epoch": 0, "step": 1, "train/loss": 0.5}])


def test_two_reports_of_one_run_at_once_both_write_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # before: both wrote .report.html.tmp; the other report's rename took it, and this one failed with "cannot write
    # the report ... (No such file or directory); pass -o with a writable path"
    write_small_run(tmp_path)
    real_replace = os.replace
    other_exit: list[int] = []

    def other_report_runs_in_between(source: Any, target: Any) -> None:
        if not other_exit:
            other_exit.append(-1)
            other_exit[0] = main([str(tmp_path)])
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", other_report_runs_in_between)
    assert main([str(tmp_path)]) == 0 and other_exit == [0]
    assert capsys.readouterr().err == ""
    page = tmp_path / "report.html"
    assert page.read_text().endswith("</html>\n")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["report.html"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(page.stat().st_mode) == 0o666 & ~umask  # as a plain open() makes it, not mkstemp's 0600


def test_a_ctrl_c_while_writing_the_report_leaves_the_previous_page_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # before: only an OSError removed .report.html.tmp; a Ctrl-C left it
    write_small_run(tmp_path)
    page = tmp_path / "report.html"
    page.write_text("<html>the previous page</html>\n")

    def interrupted(source: Any, target: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html"]
    assert page.read_text() == "<html>the previous page</html>\n"


# ---------------------------------------------------------------- plots: ~ and whole PNGs


def test_the_run_folder_of_a_logger_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: plots went to <cwd>/~/runs/toy/csv/version_0/plots, beside the CSVLogger's $HOME/runs/toy/csv/version_0
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    trainer = quiet_trainer(logger=CSVLogger("~/runs/toy", name="csv"))
    assert plots.run_dir(trainer) == home / "runs" / "toy" / "csv" / "version_0"
    figure = plots.new_figure(2.0, 2.0)
    figure.add_subplot().plot([0, 1], [1, 0])
    assert plots.log_figure(trainer, figure, "picture") == home / "runs" / "toy" / "csv" / "version_0" / "plots" / "picture.png"
    assert (home / "runs" / "toy" / "csv" / "version_0" / "plots" / "picture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(cwd.iterdir()) == []


def test_a_kill_while_saving_a_plot_leaves_the_previous_png_whole(tmp_path: Path) -> None:
    # before: savefig wrote straight to <name>.png, so a kill mid-write left a truncated picture under its name
    trainer = quiet_trainer(logger=CSVLogger(tmp_path, name="csv"))
    figure = plots.new_figure(2.0, 2.0)
    figure.add_subplot().plot([0, 1], [1, 0])
    path = plots.log_figure(trainer, figure, "picture")
    assert path is not None
    previous = path.read_bytes()

    def half_written_then_killed(target: Any, **kwargs: Any) -> None:
        with open(target, "wb") as handle:
            handle.write(previous[: len(previous) // 2])
        raise KeyboardInterrupt

    figure.savefig = half_written_then_killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        plots.log_figure(trainer, figure, "picture")
    assert path.read_bytes() == previous
    assert [p.name for p in path.parent.iterdir()] == ["picture.png"]


# ---------------------------------------------------------------- several runs in one logger folder


def write_sweep(root: Path, trials: int) -> list[Path]:
    """``CSVLogger(root, name="sweep")`` shared by the trials of a Python sweep: each a new version from step 0."""
    folders = []
    for trial in range(trials):
        path = root / "sweep" / f"version_{trial}" / "metrics.csv"
        write_csv(path, ["epoch", "step", "train/loss"],
                  [{"epoch": 0, "step": s, "train/loss": 10.0 * (trial + 1) + s} for s in range(4)])
        folders.append(path.parent)
    return folders


def test_a_folder_holding_a_sweeps_trials_is_refused_naming_each_runs_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # before: merged as one run "resumed at step 0" that "replaces 4 later value(s)": only the last trial was shown
    version_0, version_1, version_2 = write_sweep(tmp_path, 3)
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lightning_act report: error: '{tmp_path}' holds 3 runs: {version_1} starts over at step 0 after "
        f"{version_0} trained past it (a sweep's trials in one logger folder?); pass each version folder to compare "
        f"them: lightning_act report {version_0} {version_1} {version_2}\n"
    )
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(ConfigError):
        build_report(tmp_path / "sweep", tmp_path / "r.html")
    text = build_report([version_0, version_1, version_2], tmp_path / "r.html").read_text()
    traces, _ = figure_for(text, "training-loss")
    assert [(t["legendgroup"], t["y"]) for t in traces] == [
        (f"version_{trial}", [10.0 * (trial + 1) + s for s in range(4)]) for trial in range(3)
    ]
    # not several runs: a fit to step 3, resumed from its step-2 checkpoint, then a test in a new Trainer at step 0
    run_folder = tmp_path / "kat"
    header = ["epoch", "step", "train/loss"]
    write_csv(run_folder / "csv" / "version_0" / "metrics.csv", header, [{"step": s, "train/loss": 1.0 + s} for s in range(4)])
    write_csv(run_folder / "csv" / "version_1" / "metrics.csv", header, [{"step": s, "train/loss": 2.0 + s} for s in range(2, 6)])
    write_csv(run_folder / "csv" / "version_2" / "metrics.csv", ["epoch", "step", "test/acc"], [{"step": 0, "test/acc": 0.75}])
    assert main([str(run_folder)]) == 0
    run = load_run(run_folder)
    assert run.series["train/loss"].last_per_step() == {0: 1.0, 1: 2.0, 2: 4.0, 3: 5.0, 4: 6.0, 5: 7.0}
    assert run.test_metrics() == {"test/acc": 0.75}



def test_the_dopamine_firing_files_go_under_home_for_a_tilde_run_folder(tmp_path, monkeypatch):
    # Before: DopamineSpecialisation wrote dopamine_firing.pt/.png into a literal "./~" folder.
    from types import SimpleNamespace

    from lightning_act.tasks.dopamine import run_dir as dopamine_run_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert dopamine_run_dir(SimpleNamespace(log_dir="~/runs/d", default_root_dir=".")) == tmp_path / "runs" / "d"
    assert (tmp_path / "runs" / "d").is_dir() and not (tmp_path / "~").exists()


def test_the_spectral_pr_curve_goes_under_home_for_a_tilde_log_dir(tmp_path, monkeypatch):
    # Before: SpectralTargetDetection wrote test_pr_curve.csv into a literal "./~" folder.
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.tasks.spectral_detection import SpectralTargetDetection

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 0.0] * 4)
    trainer = pl.Trainer(accelerator="cpu", logger=CSVLogger("~/runs", name="s"), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(SpectralTargetDetection(in_bands=4, hidden_sizes=[4]), DataLoader(TensorDataset(x, y), batch_size=4),
                 verbose=False)
    assert (tmp_path / "runs" / "s" / "version_0" / "test_pr_curve.csv").is_file() and not (tmp_path / "~").exists()
