"""The lightning_act command (r24): `fit --overwrite` removes the run's test versions too (the report showed a previous
model's test metrics on the new run's page); a fit refused at setup leaves no W&B debug-log links behind."""

import csv
from pathlib import Path

import yaml
from test_cli_files_r22 import last_error, write_config
from test_cli_r23 import _recipe_with_shared_root

from lightning_act.cli import main
from lightning_act.report.runlog import find_configs, load_run


def _test_metrics_written(version: Path) -> dict[str, float]:
    """The test/... values a test version's metrics.csv holds, read as plain CSV."""
    with open(version / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: float(value) for row in rows for key, value in row.items() if key.startswith("test/") and value}


def test_overwrite_removes_the_runs_test_versions_and_keeps_another_recipes(tmp_path, capsys, monkeypatch):
    """Before: the test version of A's previous run (no config in it) was left with a warning, and the report of A's
    new, never tested run showed that test's test/acc. B shares A's second logger root: its fit and test stay."""
    monkeypatch.chdir(tmp_path)
    a = _recipe_with_shared_root(tmp_path, "runs_a", "CSVLogger")
    b = _recipe_with_shared_root(tmp_path, "runs_b", "CSVLogger")
    test = ["--trainer.limit_test_batches", "1"]
    assert main(["fit", "--config", str(a)]) == 0
    assert main(["fit", "--config", str(b)]) == 0
    assert main(["test", "--config", str(a), "--ckpt_path", "runs_a/checkpoints/last.ckpt", *test]) == 0
    assert main(["test", "--config", str(b), "--ckpt_path", "runs_b/checkpoints/last.ckpt", *test]) == 0
    shared = tmp_path / "shared" / "experiments"  # A's fit, B's fit, A's test, B's test
    b_versions = {name: sorted(p.name for p in (shared / name).iterdir()) for name in ("version_1", "version_3")}
    b_tested = _test_metrics_written(tmp_path / "runs_b" / "csv" / "version_1")
    assert set(b_tested) >= {"test/acc", "test/loss"}
    capsys.readouterr()

    assert main(["fit", "--config", str(a), "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs_a" / "csv").iterdir()) == ["version_0"]
    assert load_run(tmp_path / "runs_a" / "csv").test_metrics() == {}  # the new model was never tested
    assert sorted(p.name for p in shared.iterdir()) == ["version_1", "version_3", "version_4"]
    assert {name: sorted(p.name for p in (shared / name).iterdir()) for name in b_versions} == b_versions
    # B's fit -> test flow reads as before: its test metrics, its fit's config
    assert load_run(tmp_path / "runs_b" / "csv").test_metrics() == b_tested
    configs, notes = find_configs([tmp_path / "runs_b" / "csv" / "version_1"], tmp_path / "runs_b" / "csv")
    fit_config = yaml.safe_load(configs["fit config"][1])
    saved = yaml.safe_load((tmp_path / "runs_b" / "csv" / "version_0" / "config.yaml").read_text())
    assert notes == [] and fit_config == saved


def test_a_fit_refused_at_setup_leaves_no_wandb_debug_log_links(tmp_path, capsys, monkeypatch):
    """Before: runs/wandb/debug.log and debug-internal.log were left, links into the removed offline run."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", loggers=("wandb", "csv"))
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "lightning_act.callbacks.ActivationSparsity",
                                             "init_args": {"cett_modules": ["model.block.*.mlp.fc2"]}})
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 2
    assert "cett_modules=['model.block.*.mlp.fc2'] matched no module" in last_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_fit_refused_after_another_fit_in_the_process_keeps_that_fits_wandb_run(tmp_path, capsys, monkeypatch):
    """Before: W&B handed the refused fit's WandbLogger the run still open from the earlier fit, and the clean-up of
    "the refused run" finished that run with exit code 1 and removed its offline run folder."""
    import wandb

    wandb.finish()  # a run an earlier test left open would be fit A's (WandbLogger goes on with an open run)
    monkeypatch.chdir(tmp_path)
    a = write_config(tmp_path, "runs_a", loggers=("wandb", "csv"))
    b = write_config(tmp_path, "runs_b", loggers=("wandb", "csv"))
    settings = yaml.safe_load(b.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "lightning_act.callbacks.ActivationSparsity",
                                             "init_args": {"cett_modules": ["no_such_module.*"]}})
    b.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(a)]) == 0
    runs_of_a = sorted(p.name for p in (tmp_path / "runs_a" / "wandb").glob("offline-run-*"))
    assert len(runs_of_a) == 1
    assert main(["fit", "--config", str(b)]) == 2
    assert sorted(p.name for p in (tmp_path / "runs_a" / "wandb").glob("offline-run-*")) == runs_of_a


def test_the_report_shows_a_resumed_fits_config_over_the_copy_a_test_before_it_kept(tmp_path):
    """Before: every place's fit_config.yaml was looked at before any config.yaml, so after fit (version_0), test
    (version_1, which keeps a copy of the fit's config) and a resumed fit with other settings (version_2), the page
    showed the first fit's config."""
    def version(number: int, name: str, max_steps: int) -> Path:
        folder = tmp_path / "csv" / f"version_{number}"
        folder.mkdir(parents=True)
        (folder / name).write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
        return folder

    versions = [version(0, "config.yaml", 2), version(1, "fit_config.yaml", 2), version(2, "config.yaml", 4)]
    configs, notes = find_configs(versions, tmp_path / "csv")
    assert configs["fit config"][0] == versions[2] / "config.yaml" and notes == []
    assert yaml.safe_load(configs["fit config"][1])["trainer"]["max_steps"] == 4
