"""The report and the W&B dashboard with several validation/test loaders (r26): Lightning's `val/loss/dataloader_idx_N`
keys are drawn in the figure (panel) of their metric, beside `train/loss`, not in one titled `dataloader_idx_N` with
an accuracy; a later test replaces an earlier test's metrics as a whole, so the table never mixes two tests."""

import csv
import html
import json
import re
from pathlib import Path

import pytest

from lightning_act.report.html import build_report
from lightning_act.report.runlog import load_run
from lightning_act.report.wandb_dashboard import main as dashboard_main

LOADER_KEYS = ["val/loss/dataloader_idx_0", "val/acc/dataloader_idx_0", "val/loss/dataloader_idx_1",
               "val/acc/dataloader_idx_1"]


def _version(folder: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A CSV logger version folder holding ``metrics.csv``."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return folder


def _raw_series(version: Path, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` in a version's metrics.csv, read as plain CSV."""
    with open(version / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(key)]
    return [float(row["step"]) for row in rows], [float(row[key]) for row in rows]


def _training_figures(page: Path) -> dict[str, list[dict]]:
    """``{figure title: traces}`` of the page's training figures, read from their ``Plotly.newPlot`` calls."""
    decoder = json.JSONDecoder()
    figures = {}
    text = page.read_text()
    for call in re.finditer(r'Plotly\.newPlot\("fig-training[^"]*",', text):
        data, end = decoder.raw_decode(text, call.end())
        layout, _ = decoder.raw_decode(text, end + 1)
        figures[layout["title"]["text"]] = data
    return figures


def _two_loader_fit(tmp_path: Path) -> Path:
    """A fit with two validation loaders and one monitor statistic (the dashboard needs one)."""
    rows = []
    for step in range(4):
        rows.append([0, step, 2.0 - 0.1 * step, "", "", "", "", 0.1 * step])
        rows.append([0, step, "", 1.5 - 0.1 * step, 0.5 + 0.1 * step, 1.6 - 0.1 * step, 0.4 + 0.05 * step, ""])
    header = ["epoch", "step", "train/loss", *LOADER_KEYS, "act/net.0/mean"]
    return _version(tmp_path / "run" / "csv" / "version_0", header, rows)


def test_report_draws_each_loaders_curve_in_the_figure_of_its_metric(tmp_path):
    """Before: figures `loss` (train/loss alone), `dataloader_idx_0` and `dataloader_idx_1` (each a loss and an
    accuracy on one y axis)."""
    version = _two_loader_fit(tmp_path)
    figures = _training_figures(build_report([str(tmp_path / "run")], tmp_path / "r.html"))
    assert sorted(figures) == ["acc", "loss"]
    expected = {"loss": ["train/loss", "val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1"],
                "acc": ["val/acc/dataloader_idx_0", "val/acc/dataloader_idx_1"]}
    for title, keys in expected.items():
        traces = {trace["name"]: trace for trace in figures[title]}
        assert sorted(traces) == keys
        for key in keys:
            steps, values = _raw_series(version, key)
            assert traces[key]["x"] == steps
            assert traces[key]["y"] == pytest.approx(values, abs=0, rel=1e-12)
    loss_dashes = {trace["name"]: trace["line"]["dash"] for trace in figures["loss"]}
    assert loss_dashes["train/loss"] == "solid"
    assert "solid" not in (loss_dashes["val/loss/dataloader_idx_0"], loss_dashes["val/loss/dataloader_idx_1"])
    assert loss_dashes["val/loss/dataloader_idx_0"] != loss_dashes["val/loss/dataloader_idx_1"]


def test_metric_name_drops_only_lightnings_loader_suffix():
    from lightning_act.report.runlog import metric_name  # new in r26: the other tests also run on the old code

    assert metric_name("val/loss/dataloader_idx_12") == "loss"
    assert metric_name("fold1-val/acc/dataloader_idx_0") == "acc"
    assert metric_name("train/loss") == "loss"
    assert metric_name("val/dataloader_idx_count") == "dataloader_idx_count"


def test_dashboard_puts_each_loaders_key_in_the_panel_of_its_metric(tmp_path, capsys):
    """Before: panels `dataloader_idx_0: ^(val/acc/dataloader_idx_0|val/loss/dataloader_idx_0)$` and
    `loss: ^(train/loss)$`."""
    _two_loader_fit(tmp_path)
    assert dashboard_main(["--project", "p", "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    training = capsys.readouterr().out.split("training\n", 1)[1].split("\nact:", 1)[0]
    panels = dict(re.findall(r"^  line  ([^:]+): (.*)$", training, flags=re.M))
    assert sorted(panels) == ["acc", "loss"]
    keys = ["train/loss", *LOADER_KEYS]
    drawn = {title: sorted(k for k in keys if re.fullmatch(regex, k)) for title, regex in panels.items()}
    assert drawn == {"loss": ["train/loss", "val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1"],
                     "acc": ["val/acc/dataloader_idx_0", "val/acc/dataloader_idx_1"]}


def _test_table(page: Path) -> dict[str, str]:
    """``{metric: cell}`` of the page's test-metrics table (one run)."""
    section = re.search(r"<h2 id='test'>.*?</section>", page.read_text(), flags=re.S).group(0)
    return {html.unescape(key): html.unescape(cell)
            for key, cell in re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", section)}


def test_a_later_test_replaces_the_earlier_tests_metrics_as_a_whole(tmp_path):
    """Before: the table showed loader 0's new 0.5 beside loader 1's 0.75 from the earlier test, with no note."""
    csv_dir = tmp_path / "run" / "csv"
    _version(csv_dir / "version_0", ["epoch", "step", "train/loss", "test/loss/dataloader_idx_0",
                                     "test/loss/dataloader_idx_1", "test/acc"],
             [[0, 0, 1.0, "", "", ""], [0, 1, 0.9, "", "", ""], [0, 2, 0.8, "", "", ""], [1, 3, "", 0.70, 0.75, 0.6]])
    later = _version(csv_dir / "version_1", ["epoch", "step", "test/loss/dataloader_idx_0", "test/acc"],
                     [[1, 3, 0.50, 0.8]])
    expected = {key: _raw_series(later, key)[1][-1] for key in ("test/loss/dataloader_idx_0", "test/acc")}
    run = load_run(tmp_path / "run")
    assert run.test_metrics() == expected
    assert any("version_1" in note and "test/loss/dataloader_idx_1" in note and "left out" in note
               for note in run.notes)
    table = _test_table(build_report([str(tmp_path / "run")], tmp_path / "r.html"))
    assert {key: float(cell) for key, cell in table.items()} == pytest.approx(expected, abs=1e-4)
    assert run.series["train/loss"].values == _raw_series(csv_dir / "version_0", "train/loss")[1]


def test_a_later_test_of_the_same_metrics_replaces_without_a_note(tmp_path):
    csv_dir = tmp_path / "run" / "csv"
    _version(csv_dir / "version_0", ["epoch", "step", "train/loss", "test/acc"], [[0, 0, 1.0, ""], [0, 0, "", 0.6]])
    later = _version(csv_dir / "version_1", ["epoch", "step", "test/acc"], [[0, 0, 0.7]])
    run = load_run(tmp_path / "run")
    assert run.test_metrics() == {"test/acc": _raw_series(later, "test/acc")[1][-1]}
    assert run.series["test/acc"].values == [0.7]
    assert not [note for note in run.notes if "test" in note]
