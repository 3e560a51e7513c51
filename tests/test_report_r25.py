"""The report and the lightning_act command (r25): a test goes to the run whose fit config it kept in a logger folder
several runs share; a test written before the run's first fit is left out (and `fit` says so); `predict` keeps the
fit's config like `test`, so `fit --overwrite` removes its version; the hint for a monitored key a ModelCheckpoint
could not find names that callback's fix."""

import csv
import html
import re
from pathlib import Path

import pytest
import yaml
from test_cli_files_r22 import last_error, write_config

from lightning_act.cli import main
from lightning_act.errors import ConfigError
from lightning_act.report.html import build_report, load_runs
from lightning_act.report.runlog import load_run

CONFIG_A = {"seed_everything": 0, "ckpt_path": None, "model": {"init_args": {"model_name": "kat_micro_patch4_32"}}}
CONFIG_B = {"seed_everything": 0, "ckpt_path": None, "model": {"init_args": {"model_name": "vit_tiny_patch16_224"}}}


def _version(folder: Path, header: list[str], rows: list[list[object]], **configs: dict) -> Path:
    """A CSV logger version folder: ``metrics.csv`` and the named config files (``config``, ``fit_config``)."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    for name, config in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder


def _raw_values(version: Path, key: str) -> list[float]:
    """The values of ``key`` in a version's metrics.csv, read as plain CSV."""
    with open(version / "metrics.csv", newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def _test_row(page: Path, key: str) -> list[str]:
    """The cells after the metric's name in the row of ``key`` of the page's test-metrics table, one per run."""
    section = re.search(r"<h2 id='test'>.*?</section>", page.read_text()).group(0)
    row = re.search(rf"<tr><td>{re.escape(key)}</td>(.*?)</tr>", section)
    return [] if row is None else [html.unescape(cell) for cell in re.findall(r"<td>([^<]*)</td>", row.group(1))]


def test_a_test_in_a_shared_logger_folder_goes_to_the_run_whose_fit_config_it_kept(tmp_path):
    """Before: fit A (version_0), fit B (version_1), test of A (version_2, holding A's config): B's page showed A's test
    and A's config as its fit config, A's page no test, and the folder's refusal said "version_1 with version_2"."""
    shared = tmp_path / "runs" / "shared" / "csv"
    fit = (["epoch", "step", "train/loss", "val/loss"], [[0, 0, 2.3, ""], [0, 2, 2.2, ""], [0, 2, "", 2.1]])
    a = _version(shared / "version_0", *fit, fit_config=CONFIG_A)
    b = _version(shared / "version_1", *fit, config=CONFIG_B)
    a_test = _version(shared / "version_2", ["epoch", "step", "test/acc", "test/loss"], [[0, 0, 0.1640625, 2.28]],
                      fit_config={**CONFIG_A, "ckpt_path": "runs/shared/checkpoints/last.ckpt"})

    page = build_report([a, b], tmp_path / "cmp.html")
    expected = _raw_values(a_test, "test/acc")[0]
    cells = _test_row(page, "test/acc")
    assert len(cells) == 2 and not re.search(r"\d", cells[1])  # A's, none for B
    assert abs(float(cells[0]) - expected) <= 5e-5  # shown with 4 decimals
    run_a, run_b = load_run(a), load_run(b)
    assert [p.path.parent.name for p in run_a.parts] == ["version_0", "version_2"]
    assert [p.path.parent.name for p in run_b.parts] == ["version_1"]
    assert run_b.configs["fit config"][0] == b / "config.yaml"
    assert any("also read with version_2" in note and "(version_1)" in note for note in run_a.notes)
    assert any(note.startswith("version_2 is left out") and "version_0" in note for note in run_b.notes)
    with pytest.raises(ConfigError) as refusal:
        load_runs([shared])
    assert "up to the next run and the tests that kept its fit config (version_0 with version_2)" in str(refusal.value)
    assert "version_1 with" not in str(refusal.value)


def test_a_test_written_before_the_runs_first_fit_is_left_out(tmp_path):
    """Before: a `test` of another checkpoint run with the recipe before its first fit (version_0, no config) gave that
    checkpoint's test/acc to the run's page."""
    run = tmp_path / "runs" / "kat"
    _version(run / "csv" / "version_0", ["epoch", "step", "test/acc", "test/loss"], [[0, 0, 0.09375, 2.3]])
    fit = _version(run / "csv" / "version_1", ["epoch", "step", "train/loss"], [[0, 0, 2.5], [0, 1, 2.25]],
                   config=CONFIG_A)

    log = load_run(run)
    assert log.test_metrics() == {}
    assert log.series["train/loss"].values == _raw_values(fit, "train/loss")
    assert any(note.startswith("version_0 is left out") for note in log.notes)
    page = build_report(run)
    assert _test_row(page, "test/acc") == [] and "No test metrics were logged" in page.read_text()


def test_fit_warns_of_test_versions_written_before_any_fit_in_its_logger_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    _version(tmp_path / "runs" / "csv" / "version_0", ["epoch", "step", "test/acc"], [[0, 0, 0.5]])
    assert main(["fit", "--config", str(config)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "runs/csv/version_0" in warnings[0] and "written before any fit" in warnings[0]


def test_overwrite_removes_the_runs_predict_version(tmp_path, capsys, monkeypatch):
    """Before: predict kept no fit_config.yaml, so `fit --overwrite` left its version folder, with a warning."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", limit_predict_batches=1)
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["predict", "--config", str(config), "--ckpt_path", "runs/checkpoints/last.ckpt"]) == 0
    csv_root = tmp_path / "runs" / "csv"
    assert sorted(p.name for p in csv_root.iterdir()) == ["version_0", "version_1"]
    kept = yaml.safe_load((csv_root / "version_1" / "fit_config.yaml").read_text())
    assert kept == yaml.safe_load((csv_root / "version_0" / "config.yaml").read_text())
    capsys.readouterr()

    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in csv_root.iterdir()) == ["version_0"]  # the new fit alone
    assert (csv_root / "version_0" / "config.yaml").is_file()


def test_a_model_checkpoints_missing_monitored_key_gets_its_own_fix(tmp_path, capsys, monkeypatch):
    """Before: the one line told to set strict: false on EarlyStopping, an option ModelCheckpoint does not have."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", limit_val_batches=1, val_check_interval=1, max_steps=3)
    recipe = yaml.safe_load(config.read_text())
    recipe["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": "runs/best", "monitor": "sensitive/x/v_mean"}})
    config.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(config)]) != 0
    line = last_error(capsys)
    assert "ModelCheckpoint(monitor='sensitive/x/v_mean')" in line
    assert "EarlyStopping" not in line
    assert "run the first validation after it is first logged" in line and "monitor another key" in line
