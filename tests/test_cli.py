"""The lightning_act command: quick top-level help, one-line errors, and a real fit from YAML."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_act.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, "-m", "lightning_act", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def write_config(tmp_path, **overrides):
    config = yaml.safe_load((ROOT / "recipes" / "vit_demo.yaml").read_text())
    config["trainer"].update(max_steps=3, max_epochs=1, limit_val_batches=1, enable_progress_bar=False)
    config["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "csv"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "test", "save_dir": str(tmp_path / "runs"), "offline": True}},
    ]
    config["trainer"]["callbacks"][0]["init_args"] = {"every_n_steps": 1}
    config["model"]["init_args"]["model_kwargs"].update(embed_dim=16, depth=2, num_heads=2)
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_top_level_help_does_not_import_lightning(tmp_path):
    code = "import sys; from lightning_act.cli import main; main(['--help']); print('lightning' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "fit" in proc.stdout and "report" in proc.stdout
    assert proc.stdout.strip().endswith("False")


def test_fit_from_yaml_logs_monitors_to_csv_and_wandb(tmp_path):
    proc = run_cli("fit", "--config", str(write_config(tmp_path)), "--trainer.enable_progress_bar", "true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "runs" / "csv" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    keys = set(rows[0])
    assert "act/model.blocks.0.mlp.act/mean" in keys and "act/model.blocks.0/rms" in keys
    assert [int(r["step"]) for r in rows if r["act/model.blocks.0/rms"]] == [0, 1, 2]
    assert (tmp_path / "runs" / "csv" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "csv" / "version_0" / "plots" / "act_rms_heatmap.png").is_file()
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    # stdout is a pipe here: plain lines, no carriage-return progress bar, and where the run is
    assert "\r" not in proc.stdout and "epoch 1/1  step 3" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        f"run folder: {tmp_path / 'runs'}  (see it: lightning_act report {tmp_path / 'runs'})"
    )
    last = tmp_path / "runs" / "vit_demo" / "checkpoints" / "last.ckpt"
    assert last.is_file()  # LastCheckpoint from the recipe, written through AtomicCheckpointIO


def test_fit_refuses_to_overwrite_a_previous_run_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    last = tmp_path / "runs" / "vit_demo" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"previous run")
    (tmp_path / "runs" / "csv" / "version_0").mkdir(parents=True)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a previous run is in the way (runs/vit_demo/checkpoints/last.ckpt)" in err and "--overwrite" in err
    assert last.read_bytes() == b"previous run"
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert last.read_bytes() != b"previous run"
    assert sorted(p.name for p in (tmp_path / "runs" / "csv").iterdir()) == ["version_0"]  # started over


def write_config_with_templated_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """The test config plus a ModelCheckpoint whose filename template names a monitor statistic: its files go into
    sub-folders of its dirpath. Returns the config and that dirpath."""
    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    checkpoints = tmp_path / "runs" / "vit_demo" / "checkpoints"
    settings["trainer"]["callbacks"].append({
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(checkpoints), "monitor": "act/model.blocks.0/rms", "mode": "max", "save_top_k": 1,
                      "filename": "best-{step}-{act/model.blocks.0/rms:.4f}"},
    })
    config.write_text(yaml.safe_dump(settings))
    return config, checkpoints


def test_overwrite_removes_checkpoints_in_the_folders_a_templated_filename_made(tmp_path, monkeypatch):
    # "{act/model.blocks.0/rms:.4f}" in a ModelCheckpoint filename writes into sub-folders of its dirpath; --overwrite
    # left those behind (only dirpath/*.ckpt was looked at), and the new run's files came out as "-v1" beside them.
    monkeypatch.chdir(tmp_path)
    config, checkpoints = write_config_with_templated_checkpoint(tmp_path)
    stale = checkpoints / "best-step=1-act" / "model.blocks.0" / "rms=0.4148.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"previous run")
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert not stale.exists()
    written = [p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*.ckpt")]
    assert "last.ckpt" in written and len(written) == 2 and not any("-v1" in p for p in written), written


def test_overwrite_with_an_unnamed_csv_logger_keeps_the_run_folders_other_files(tmp_path, monkeypatch):
    # CSVLogger(name: '') writes save_dir/version_N, so its root_dir is the run folder: --overwrite removed all of it
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, **{"trainer.logger.0.init_args.name": ""})
    runs = tmp_path / "runs"
    assert main(["fit", "--config", str(config)]) == 0
    (runs / "notes.txt").write_text("keep me")
    events = runs / "tb" / "version_0" / "events.out.tfevents.1.host"  # another logger's files
    events.parent.mkdir(parents=True)
    events.write_bytes(b"events")
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert (runs / "notes.txt").read_text() == "keep me" and events.read_bytes() == b"events"
    assert sorted(p.name for p in runs.glob("version_*")) == ["version_0"]  # the CSV log started over
    with open(runs / "version_0" / "metrics.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle) if r["act/model.blocks.0/rms"]] == [0, 1, 2]


@pytest.mark.parametrize("first", [
    "csv elsewhere",
    pytest.param("tensorboard", marks=pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                                         reason="tensorboard is not installed")),
])
def test_the_fits_config_reaches_the_report_when_another_logger_comes_first(tmp_path, monkeypatch, first):
    # LightningCLI saves config.yaml in the first logger's folder; the report, reading the CSV logger's, showed none
    from lightning_act.report import load_run

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    other = (
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tb"}}
        if first == "tensorboard" else
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "elsewhere"), "name": "csv"}}
    )
    settings["trainer"]["logger"].insert(0, other)
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    saved = Path(other["init_args"]["save_dir"]) / other["init_args"]["name"] / "version_0" / "config.yaml"
    path, text = load_run(tmp_path / "runs").configs["fit config"]
    assert path == tmp_path / "runs" / "csv" / "version_0" / "fit_config.yaml" and text == saved.read_text()


def test_short_class_names_resolve(tmp_path, capsys):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(config), "--trainer.callbacks+=ActivationSparsity", "--print_config"])
    assert exited.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"][-1]["class_path"] == "lightning_act.callbacks.ActivationSparsity"


def test_monitors_command_lists_monitors_models_and_recipes(capsys):
    assert main(["monitors"]) == 0
    out = capsys.readouterr().out
    for name in ("ActivationSparsity", "MassiveActivations", "DimensionalCollapse", "SensitiveNeurons",
                 "ImageClassifier", "LastCheckpoint", *(p.stem for p in (ROOT / "recipes").glob("*.yaml"))):
        assert f"  {name} " in out, name


def test_monitors_command_of_an_installed_package_says_where_the_recipes_are(capsys, monkeypatch, tmp_path):
    # A wheel holds no recipes/: the listing ended with the recipes heading and nothing under it.
    import lightning_act.catalog as catalog

    monkeypatch.setattr(catalog, "RECIPES", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)  # run outside a checkout: no ./recipes either
    assert main(["monitors"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(
        "recipes: none here (this is an installed package; the recipes are the YAML files in recipes/ of the source")


def test_error_table_in_docs_matches_what_the_cli_prints(capsys, monkeypatch):
    """``scripts/errors_table.py --check``, in this process (the script runs each case through ``main`` itself)."""
    spec = importlib.util.spec_from_file_location("errors_table", ROOT / "scripts" / "errors_table.py")
    errors_table = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "errors_table", errors_table)  # its dataclass looks its module up there
    spec.loader.exec_module(errors_table)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["errors_table.py", "--check"])
    status = errors_table.main()
    assert status == 0, "docs/errors.md is stale (python scripts/errors_table.py):\n" + capsys.readouterr().out[-3000:]


def last_error_line(returncode, stderr):
    """Exit 2 with one error line last; returns that line."""
    assert returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lightning_act: error: "), stderr[-3000:]
    return last


def one_line_error(tmp_path, capsys, monkeypatch, *argv):
    """The command's error, run in this process: an exception escaping ``main`` fails the test by itself. (Stderr is not
    searched for a traceback here: Lightning's log handler may still hold an earlier test's closed capture stream.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    returncode = main(list(argv))
    return last_error_line(returncode, capsys.readouterr().err)


def test_unknown_class_path_is_one_line_from_the_command_line(tmp_path):
    """As a user runs it: exit status 2 and one error line, no traceback."""
    config = write_config(tmp_path, **{"trainer.callbacks.0.class_path": "lightning_act.callbacks.ActivationSparsty"})
    proc = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = last_error_line(proc.returncode, proc.stderr)
    assert "unknown class_path 'lightning_act.callbacks.ActivationSparsty'" in err and "spelling" in err


@pytest.mark.parametrize(("monitor", "argument", "value", "expected"), [
    ("MassiveActivations", "every_n_steps", "ten", "int"),
    ("DimensionalCollapse", "warn_below", "high", "float or None"),
])
def test_a_wrongly_typed_monitor_argument_is_the_same_line_from_yaml_and_the_command_line(
    tmp_path, capsys, monkeypatch, monitor, argument, value, expected
):
    # Before: on the command line jsonargparse also tries the base class lightning.Callback, whose "not accepted"
    # won: "unknown argument 'every_n_steps'; did you mean 'every_n_steps'?"
    line = f"lightning_act: error: trainer.callbacks ({monitor}): {argument} = '{value}': expected {expected}"
    config = write_config(tmp_path, **{"trainer.callbacks.0.class_path": f"lightning_act.callbacks.{monitor}",
                                       "trainer.callbacks.0.init_args": {argument: value}})
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config)) == line
    config = write_config(tmp_path)
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config), f"--trainer.callbacks+={monitor}",
                          f"--trainer.callbacks.{argument}", value) == line


@pytest.mark.parametrize(("modules", "shown"), [(5, "'5'"), ([5], "'[5]'"), ({"a": 1}, "\"{'a': 1}\"")])
def test_a_monitors_modules_of_a_wrong_type_is_named_as_modules(tmp_path, capsys, monkeypatch, modules, shown):
    # Before: "trainer.callbacks '5': not a class name or import path of a known class" (an import-path alternative
    # of the modules type was taken for the callback's own class_path)
    config = write_config(tmp_path, **{"trainer.callbacks.0.init_args": {"every_n_steps": 1, "modules": modules}})
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config)) == (
        f"lightning_act: error: trainer.callbacks (ActivationStats): modules = {shown}: "
        "expected str or type or Sequence[str or type] or None"
    )


def test_a_misspelled_import_path_on_the_command_line_gets_the_same_line_as_in_yaml(tmp_path, capsys, monkeypatch):
    # Before: 'Parser key "trainer.callbacks":; Expected a path but ... Problem with given class_path ...:', no suggestion
    misspelled = "lightning_act.callbacks.ActivationSparsty"
    problem = (f"unknown class_path '{misspelled}' (module 'lightning_act.callbacks' has no attribute 'ActivationSparsty'; "
               "did you mean 'lightning_act.callbacks.ActivationSparsity'?); check the spelling, "
               "or install the package that provides it")
    config = write_config(tmp_path)
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config),
                          f"--trainer.callbacks+={misspelled}") == f"lightning_act: error: trainer.callbacks: {problem}"
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config),
                         "--model", "lightning_act.tasks.image_classification.ImageClassifer")
    assert err == ("lightning_act: error: model: unknown class_path 'lightning_act.tasks.image_classification.ImageClassifer' "
                   "(module 'lightning_act.tasks.image_classification' has no attribute 'ImageClassifer'; did you mean "
                   "'lightning_act.tasks.image_classification.ImageClassifier'?); check the spelling, "
                   "or install the package that provides it")
    bad = write_config(tmp_path, **{"trainer.callbacks.0.class_path": misspelled})  # the YAML check's line
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(bad)) == f"lightning_act: error: {bad}: {problem}"


def test_forward_fn_of_a_wrong_type_names_a_readable_type(tmp_path, capsys, monkeypatch):
    # Before: "expected Callable[[torch or Any] or str or None" (the type list split inside Callable's brackets)
    config = write_config(tmp_path, **{"trainer.callbacks.0.class_path": "lightning_act.callbacks.MassiveActivations",
                                       "trainer.callbacks.0.init_args": {"every_n_steps": 1, "forward_fn": 5}})
    assert one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config)) == (
        "lightning_act: error: trainer.callbacks (MassiveActivations): forward_fn = '5': "
        "expected a callable (Module, Any) or its import path 'package.module.function' or None"
    )


def test_missing_data_directory_is_one_line(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, **{"data.init_args.data_dir": str(tmp_path / "nowhere")})
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config))
    assert f"data directory '{tmp_path / 'nowhere'}' does not exist" in err and "--data.data_dir" in err


def test_module_pattern_matching_nothing_is_one_line(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, **{"trainer.callbacks.0.init_args": {"modules": ["blocks.*.mlp.gelu"]}})
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config))
    assert "matched no module" in err and "'model.blocks.0.mlp.act'" in err


def test_missing_config_file_and_unknown_command(tmp_path, capsys):
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lightning_act: error: unknown command 'train'; use one of fit, validate, test, predict, report, wandb-dashboard, monitors"
    )


def test_an_unquoted_preset_in_yaml_says_to_quote_it(tmp_path, capsys):
    # Before: "malformed YAML: found character '@' that cannot start any token", with no word of the fix
    config = tmp_path / "unquoted.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning_act.callbacks.ActivationSparsity\n"
                      "      init_args:\n        modules: @activations\n")
    assert main(["fit", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lightning_act: error: {config}:5:18: a value starts with '@', which YAML reserves; quote the value, "
        'e.g. modules: "@activations"'
    )


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_parses_and_names_importable_classes(recipe):
    from lightning_act.cli import check_config_files

    check_config_files(["fit", "--config", str(ROOT / "recipes" / recipe)])


def test_ckpt_path_last_resumes_from_the_runs_last_ckpt_and_best_or_a_missing_last_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    last = tmp_path / "runs" / "vit_demo" / "checkpoints" / "last.ckpt"
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 2  # nothing to resume yet
    assert "--ckpt_path last: there is no runs/vit_demo/checkpoints/last.ckpt" in capsys.readouterr().err
    assert main(["fit", "--config", str(config)]) == 0
    assert torch.load(last, weights_only=False)["global_step"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~umask)  # as a plain open() gives it (was 0600)
    # Before: Lightning found no "last" (it looks among ModelCheckpoints only), started at step 0 and overwrote it.
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "5", "--trainer.max_epochs", "3"]) == 0
    assert torch.load(last, weights_only=False)["global_step"] == 5
    for command in ("fit", "test"):
        assert main([command, "--config", str(config), "--ckpt_path", "best"]) == 2
        assert "--ckpt_path best names the best checkpoint of a fit run in the same process" in capsys.readouterr().err


def test_fast_dev_run_writes_no_run_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(write_config(tmp_path)), "--trainer.fast_dev_run", "true"]) == 0
    # Lightning writes no logs or checkpoints under fast_dev_run; neither do LastCheckpoint and the monitors' plots
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert main(["fit", "--config", str(write_config(tmp_path))]) == 0  # no "previous run in the way"


def test_a_fit_refused_before_its_first_step_leaves_no_run_and_an_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, **{"trainer.callbacks.0.init_args": {"modules": ["model.nothing.*"]}})
    assert main(["fit", "--config", str(config)]) == 2
    assert "model.nothing.*" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("wandb/offline-run-*"))  # a W&B run that `wandb sync` would upload
    assert not (tmp_path / "runs" / "csv").exists()  # nor its empty name folder (before: left behind)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run's folder would go")
    config = write_config(tmp_path, **{"trainer.callbacks.1.init_args": {"dirpath": str(blocked / "checkpoints")}})
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lightning_act: error: '{blocked}") and "Not a directory; check that path's" in err[-1]


def test_a_checkpoint_monitor_that_names_no_logged_metric_is_one_line(tmp_path, capsys, monkeypatch):
    config = yaml.safe_load(write_config(tmp_path).read_text())
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"monitor": "val/acc_typo", "dirpath": str(tmp_path / "best")}})
    config["trainer"]["limit_train_batches"] = 2  # the epoch ends, validation runs, the checkpoint looks for its key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(tmp_path / "config.yaml"))
    assert "ModelCheckpoint(monitor='val/acc_typo')" in err and "'val/acc'" in err and "fix the callback's monitor" in err


def _without_last_checkpoint(config, **checkpoint):
    """The test config with the recipe's LastCheckpoint replaced by a ``ModelCheckpoint(**checkpoint)``."""
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"][1] = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": checkpoint}
    config.write_text(yaml.safe_dump(settings))
    return config


def test_last_ckpt_beside_a_model_checkpoint_without_dirpath_is_found_by_resume_and_overwrite(tmp_path, monkeypatch):
    """Before: Lightning put such a ModelCheckpoint in the CSV logger's new version folder after the command line had
    looked for last.ckpt elsewhere: --ckpt_path last found nothing, and --overwrite removed nothing."""
    import torch

    monkeypatch.chdir(tmp_path)
    config = _without_last_checkpoint(write_config(tmp_path), save_last=True)
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "runs" / "vit_demo" / "checkpoints" / "last.ckpt"  # <default_root_dir>/checkpoints
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "5",
                 "--trainer.max_epochs", "3"]) == 0
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "csv").iterdir()) == ["version_0"]  # started over


def test_fast_dev_run_writes_no_last_ckpt_of_a_model_checkpoint_either(tmp_path, monkeypatch):
    """Before: Lightning wrote ModelCheckpoint(save_last=True)'s last.ckpt even under fast_dev_run."""
    monkeypatch.chdir(tmp_path)
    config = _without_last_checkpoint(write_config(tmp_path), save_last=True)
    assert main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"]) == 0
    assert not list(tmp_path.rglob("*.ckpt"))


def test_what_lightning_refuses_once_the_run_starts_is_one_line_and_leaves_no_run(tmp_path, capsys, monkeypatch):
    """Before: tracebacks (a val_check_interval beyond the training batches; a test of a model without test_step),
    and the refused fit's config.yaml and hparams.yaml kept its CSV version folder."""
    config = write_config(tmp_path)
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config), "--trainer.val_check_interval", "50")
    assert "`val_check_interval` (50) must be less than or equal to the number of the training batches" in err
    assert not (tmp_path / "runs" / "csv" / "version_0").exists()
    assert not list((tmp_path / "runs").glob("wandb/offline-run-*"))
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = []
    settings["model"] = {"class_path": "lightning_act.tasks.modular_addition.ModularAddition",
                         "init_args": {"p": 7, "dim": 8, "depth": 1, "num_heads": 2}}
    settings["data"] = {"class_path": "lightning_act.data.modular_addition.ModularAdditionDataModule",
                        "init_args": {"p": 7}}
    config.write_text(yaml.safe_dump(settings))
    err = one_line_error(tmp_path, capsys, monkeypatch, "predict", "--config", str(config))
    assert "`predict_dataloader` must be implemented" in err


def test_spawned_processes_are_one_line_and_a_run_without_csv_log_gets_no_report_hint(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config), "--trainer.strategy", "ddp_spawn",
                         "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert "--trainer.strategy ddp_spawn starts its processes by pickling the Trainer" in err  # before: a traceback
    assert main(["fit", "--config", str(config), "--trainer.logger", "false"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("run folder: ") and "no CSVLogger, so no report" in line  # before: a report that failed


def test_a_refused_fit_leaves_no_config_in_the_first_loggers_folder_and_ranks_above_zero_print_no_line(
        tmp_path, capsys, monkeypatch):
    """Before: with W&B first, LightningCLI's config.yaml stayed in W&B's save_dir and refused the next fit as "a
    previous run"; and under DDP every rank printed the error line."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"].reverse()  # W&B first: the config goes to its save_dir
    config.write_text(yaml.safe_dump(settings))
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config), "--trainer.val_check_interval", "50")
    assert "`val_check_interval` (50)" in err and not list((tmp_path / "runs").rglob("config.yaml"))
    assert main(["fit", "--config", str(config)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "lightning_act: error" not in capsys.readouterr().err


def _newest_csv_hparams(runs):
    versions = sorted((runs / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return yaml.safe_load((versions[-1] / "hparams.yaml").read_text())


def test_ckpt_path_last_and_the_files_path_build_the_model_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """Before: Lightning re-read the model's hyper-parameters from the file for an explicit path only, so a model
    argument changed on the resume command line was used with ``last`` and silently dropped with the path."""
    import shutil

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    assert main(["fit", "--config", str(config)]) == 0
    trained = _newest_csv_hparams(tmp_path / "runs")["label_smoothing"]
    last = tmp_path / "runs" / "vit_demo" / "checkpoints" / "last.ckpt"
    shutil.copy(last, tmp_path / "saved.ckpt")
    capsys.readouterr()
    for ckpt_path in ("last", "runs/vit_demo/checkpoints/last.ckpt"):
        shutil.copy(tmp_path / "saved.ckpt", last)
        assert main(["fit", "--config", str(config), "--ckpt_path", ckpt_path, "--trainer.max_steps", "4",
                     "--trainer.max_epochs", "3", "--model.init_args.label_smoothing", "0.5"]) == 0
        assert _newest_csv_hparams(tmp_path / "runs")["label_smoothing"] == trained != 0.5, ckpt_path
        assert (
            "lightning_act: warning: --ckpt_path runs/vit_demo/checkpoints/last.ckpt: the model is built with the "
            f"checkpoint's hyper-parameters (label_smoothing={trained!r}, not 0.5 as configured); other model "
            "arguments need a new fit"
        ) in capsys.readouterr().err.splitlines(), ckpt_path


def test_a_fit_from_a_weights_only_checkpoint_is_one_line_and_validate_accepts_it(tmp_path, capsys, monkeypatch):
    """Before: a KeyError traceback from Lightning's optimizer restore, and the refused fit's CSV version stayed."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({  # as recipes/execution_manifold.yaml writes them
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "weights", "filename": "{step}", "save_weights_only": True},
    })
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    files = sorted(tmp_path.rglob("*"))
    err = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", str(config), "--ckpt_path",
                         "weights/step=3.ckpt", "--trainer.max_steps", "5", "--trainer.max_epochs", "3")
    assert err == (
        "lightning_act: error: --ckpt_path 'weights/step=3.ckpt' holds the weights only (save_weights_only=True), so "
        "a fit cannot resume from it; pass the run's last.ckpt to resume, or use this file with validate, test or "
        "predict"
    )
    assert sorted(tmp_path.rglob("*")) == files  # no CSV version, W&B run or config of the refused fit
    assert main(["validate", "--config", str(config), "--ckpt_path", "weights/step=3.ckpt"]) == 0


def _documented_commands(recipe):
    """The shell commands in a recipe's leading comment (``#   lightning_act ...``, ``\\``-continued)."""
    lines = [line[1:].strip() for line in recipe.read_text().splitlines() if line.startswith("#")]
    commands, pending = [], ""
    for line in lines:
        if pending or line.startswith(("lightning_act ", "sed ")):
            pending += line.removesuffix("\\")
            if not line.endswith("\\"):
                commands.append(pending)
                pending = ""
    return commands


def _run_documented(command, tmp_path, *extra):
    import shlex

    argv = shlex.split(command)
    if argv[0] != "lightning_act":
        return subprocess.run(command, shell=True, cwd=tmp_path, check=True).returncode
    return main([*argv[1:], *extra])


def test_the_recipes_documented_variant_runs_work_and_a_second_fit_into_a_run_is_told_to_write_elsewhere(
        tmp_path, capsys, monkeypatch):
    """Before: the execution-manifold control run and the dopamine baselines, as documented, went into the first
    run's folder and were refused as "a previous run is in the way"."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    quick = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    first, control = _documented_commands(tmp_path / "recipes" / "execution_manifold.yaml")
    assert _run_documented(first, tmp_path, *quick) == 0
    assert main(["fit", "--config", "recipes/execution_manifold.yaml", "--model.mlp", "true", *quick]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lightning_act: error: a previous run is in the way (runs/execution_manifold/checkpoints/last.ckpt, "
        "runs/execution_manifold/csv/version_0/config.yaml); resume it "
        "with --ckpt_path runs/execution_manifold/checkpoints/last.ckpt, start over with --overwrite (removes its "
        "checkpoints, config and CSV and TensorBoard logs), or keep it and write this run elsewhere (a copy of the recipe "
        "with its "
        "runs/ folder changed)"
    )
    assert _run_documented(control, tmp_path, *quick) == 0
    for run, mlp in (("execution_manifold", False), ("execution_manifold_mlp", True)):
        assert _newest_csv_hparams(tmp_path / "runs" / run)["mlp"] is mlp
        assert (tmp_path / "runs" / run / "checkpoints" / "last.ckpt").is_file()

    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", "--config", "recipes/dopamine_foundation.yaml", *quick]) == 0
    first, _test, *baseline = _documented_commands(tmp_path / "recipes" / "dopamine.yaml")
    assert _run_documented(first, tmp_path, *quick) == 0
    assert [_run_documented(command, tmp_path, *quick) for command in baseline] == [0, 0]
    assert (tmp_path / "runs" / "dopamine" / "last.ckpt").is_file()
    assert _newest_csv_hparams(tmp_path / "runs" / "dopamine_lora")["method"] == "lora"
    assert (tmp_path / "runs" / "dopamine_lora" / "last.ckpt").is_file()


def test_enable_checkpointing_false_leaves_out_the_recipes_last_checkpoint(tmp_path):
    """Before: refused with "found ModelCheckpoint in callbacks list", a callback the recipe does not have."""
    proc = run_cli("fit", "--config", str(write_config(tmp_path)), "--trainer.enable_checkpointing", "false",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = "enable_checkpointing is false: LastCheckpoint left out, so no last.ckpt is written"
    assert line in proc.stderr.splitlines()
    assert not list(tmp_path.rglob("*.ckpt"))


def test_overwrite_removes_what_a_write_cut_short_left_in_a_templated_filenames_folders(tmp_path, monkeypatch):
    """Before: AtomicCheckpointIO's hidden temporaries (as large as the model) survived --overwrite; and a last.ckpt in
    a ModelCheckpoint's folder was removed twice, a FileNotFoundError (one path relative, one made absolute)."""
    monkeypatch.chdir(tmp_path)
    config, checkpoints = write_config_with_templated_checkpoint(tmp_path)
    stale = checkpoints / "best-step=1-act" / "model.blocks.0" / ".rms=0.4148.ckpt.k2j3h4ab.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half-written")
    (checkpoints / "last.ckpt").write_bytes(b"previous run")
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert not list(tmp_path.rglob("*.tmp")) and (checkpoints / "last.ckpt").read_bytes() != b"previous run"
    assert not [p for p in checkpoints.rglob("*") if p.is_dir() and not any(p.iterdir())]  # no empty folders left


# --- checkpoints from elsewhere, and Trainer options of batches (r19) ---------------------------------------------

IMAGE_CLASSIFIER = "lightning_act.tasks.image_classification.ImageClassifier"
SMALL_VIT = {"model_name": "vit_tiny_patch16_224", "num_classes": 10, "in_chans": 1, "warmup_steps": 0,
             "model_kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}}


def _small_vit_config(tmp_path, **init_args):
    path = tmp_path / "small_vit.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "limit_test_batches": 1,
                    "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": IMAGE_CLASSIFIER, "init_args": {**SMALL_VIT, **init_args}},
        "data": {"class_path": "lightning_act.data.images.ImageDataModule",
                 "init_args": {"image_size": 16, "in_chans": 1, "batch_size": 16}},
    }))
    return path


def _python_checkpoint(tmp_path, **init_args):
    """A small ImageClassifier trained one step in Python and written with ``trainer.save_checkpoint``: its
    hyper-parameters are its arguments, with no ``_class_path`` (which LightningCLI adds)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.tasks.image_classification import ImageClassifier

    model = ImageClassifier(**{**SMALL_VIT, **init_args})
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))), batch_size=4))
    path = tmp_path / "python.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_checkpoint_written_from_python_is_used_with_the_configured_class_or_refused_in_one_line(
        tmp_path, capsys, monkeypatch):
    """Before: its hyper-parameters were parsed against LightningModule itself (they name no class): a 13-line
    jsonargparse error ending "Parsing of ckpt_path hyperparameters failed!", exit 2."""
    import torch

    monkeypatch.chdir(tmp_path)
    ckpt = _python_checkpoint(tmp_path, lr=0.01)
    config = _small_vit_config(tmp_path, lr=0.002)
    capsys.readouterr()
    for command in ("test", "validate"):
        assert main([command, "--config", str(config), "--ckpt_path", str(ckpt)]) == 0, capsys.readouterr().err[-3000:]
        err = capsys.readouterr().err  # the model is built with the checkpoint's arguments, as for a CLI checkpoint
        assert "the model is built with the checkpoint's hyper-parameters (lr=0.01, not 0.002 as configured)" in err
    torch.save({"state_dict": {}, "hyper_parameters": {"width": 3, "lr": 0.1}}, tmp_path / "other.ckpt")
    err = one_line_error(tmp_path, capsys, monkeypatch, "test", "--config", str(config), "--ckpt_path", "other.ckpt")
    assert err == (
        "lightning_act: error: --ckpt_path 'other.ckpt' names no model class (written from Python, not by lightning_act) "
        "and its hyper-parameters name arguments the configured ImageClassifier does not take (width); pass a "
        "checkpoint of this model, or the config of the model the checkpoint holds"
    )


def test_a_remote_ckpt_path_is_read_through_fsspec_and_a_missing_one_is_one_line(tmp_path, capsys, monkeypatch):
    """Before: any URL (s3://, gs://, memory://) was refused as "does not exist", though Lightning reads it."""
    import fsspec
    import torch

    monkeypatch.chdir(tmp_path)
    ckpt = _python_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = IMAGE_CLASSIFIER  # as lightning_act fit writes it
    remote = f"memory://r19-{os.getpid()}/run/last.ckpt"
    with fsspec.open(remote, "wb") as handle:
        torch.save(checkpoint, handle)
    try:
        config = _small_vit_config(tmp_path)
        assert main(["test", "--config", str(config), "--ckpt_path", remote]) == 0, capsys.readouterr().err[-3000:]
        missing = remote.replace("last.ckpt", "gone.ckpt")
        err = one_line_error(tmp_path, capsys, monkeypatch, "test", "--config", str(config), "--ckpt_path", missing)
        assert err == f"lightning_act: error: --ckpt_path '{missing}' does not exist; pass an existing .ckpt file"
        # a protocol whose fsspec package is not installed: one line naming it (was a 42-line ImportError traceback)
        unreadable = "nosuchprotocol-r19://bucket/last.ckpt"
        err = one_line_error(tmp_path, capsys, monkeypatch, "test", "--config", str(config), "--ckpt_path", unreadable)
        assert err.startswith(f"lightning_act: error: --ckpt_path '{unreadable}' cannot be read (")
        assert err.endswith("install the fsspec package of its protocol (e.g. pip install s3fs) and check its credentials")
    finally:
        fsspec.filesystem("memory").rm(f"r19-{os.getpid()}", recursive=True)


@pytest.mark.parametrize(("where", "value", "batches"), [
    ("command line", "1", 1), ("yaml", 1, 1), ("command line", "2", 2), ("yaml", 1.0, 64), ("command line", "0.5", 32),
])
def test_limit_val_batches_1_is_one_batch_and_1_0_every_batch(tmp_path, where, value, batches):
    """Before: LightningCLI tried float before int for the Trainer's ``int | float`` batch options, so 1 (one batch)
    arrived as 1.0, which Lightning reads as 100%: the whole validation set ran. (BoringDataModule: 64 validation
    batches of one sample.)"""
    from lightning_act.cli import _build_cli_class, import_project_classes

    import_project_classes()
    seen = []

    class Counting(_build_cli_class()):
        def after_validate(self):
            seen.append((self.trainer.num_val_batches, type(self.trainer.limit_val_batches)))

    config = tmp_path / "boring.yaml"
    trainer = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": str(tmp_path)}
    if where == "yaml":
        trainer["limit_val_batches"] = value
    config.write_text(yaml.safe_dump({
        "trainer": trainer, "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"}}))
    extra = ["--trainer.limit_val_batches", value] if where == "command line" else []
    Counting(args=["validate", "--config", str(config), *extra])
    assert seen == [([batches], type(value) if where == "yaml" else int if value.isdigit() else float)]


def test_a_data_error_raised_in_a_dataloader_worker_is_its_own_line():
    # Before: with num_workers > 0 the CLI printed "Caught DataFormatError in DataLoader worker process 0." and the
    # worker's 25-line traceback: torch re-raises the worker's error as the same class with that text.
    from torch.utils.data import DataLoader, Dataset

    from lightning_act.cli import _worker_message
    from lightning_act.errors import DataFormatError

    class Unreadable(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise DataFormatError("cannot read image 'cat/2.png'; remove or replace the file")

    with pytest.raises(DataFormatError) as caught:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert _worker_message(caught.value) == "cannot read image 'cat/2.png'; remove or replace the file"
    plain = DataFormatError("a line of its own")
    assert _worker_message(plain) == "a line of its own"


SPECTRAL_DDP_CONFIG = {
    "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 1, "logger": False,
                "enable_checkpointing": False},
    "model": {"class_path": "lightning_act.tasks.spectral_detection.SpectralTargetDetection",
              "init_args": {"in_bands": 8, "hidden_sizes": [8], "pos_weight": 1.0}},
    "data": {"class_path": "lightning_act.data.hyperspectral.HyperspectralDataModule",
             "init_args": {"num_scenes": 8, "scene_size": 8, "num_bands": 8, "batch_size": 64}},
}
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                      "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME")


def test_num_nodes_without_a_launcher_is_one_line_before_any_rank_waits(tmp_path):
    # Before: the two local ranks of a world of 4 waited (torch's 30 min timeout) for ranks 2 and 3 nobody started.
    import signal

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**SPECTRAL_DDP_CONFIG, "trainer": {
        **SPECTRAL_DDP_CONFIG["trainer"], "num_nodes": 2}}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_act", "fit", "--config", "cfg.yaml"], cwd=tmp_path,
                            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        _, stderr = proc.communicate()
    line = last_error_line(proc.returncode, stderr)
    assert "--trainer.num_nodes 2" in line and "torchrun or srun" in line and "NODE_RANK set on each node" in line


@pytest.mark.parametrize(
    ("variables", "refused"),
    [({}, True), ({"NODE_RANK": "0"}, False), ({"GROUP_RANK": "0"}, False), ({"NODE_RANK": "1"}, True),
     ({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, False)],
)
def test_manual_multi_node_setups_lightning_documents_are_accepted(variables, refused, monkeypatch):
    # Lightning's guide: NODE_RANK on every node, MASTER_ADDR on all but node 0 (round 20 first refused node 0 without
    # MASTER_ADDR, and GROUP_RANK, which Lightning's environment reads too).
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_act.cli import _check_launcher
    from lightning_act.errors import ConfigError

    for name in (*LAUNCHER_VARIABLES, "NODE_RANK", "GROUP_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    trainer = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=LightningEnvironment()), num_devices=2,
                              num_nodes=2)
    if refused:
        with pytest.raises(ConfigError, match="nothing starts the other nodes' processes"):
            _check_launcher(trainer)
    else:
        _check_launcher(trainer)


def test_torchrun_processes_other_than_devices_times_num_nodes_are_one_line(tmp_path, capsys, monkeypatch):
    # Before: Lightning's ValueError ("the product (1 * 1) does not match the world size (2)") as a traceback per process.
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # what torchrun --nnodes 2 --nproc_per_node 3 gives its first process
    torchrun = dict(RANK="0", GROUP_RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3", WORLD_SIZE="6",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT="29400", TORCHELASTIC_RUN_ID="test")
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**SPECTRAL_DDP_CONFIG, "trainer": {
        **SPECTRAL_DDP_CONFIG["trainer"], "devices": 2, "num_nodes": 2}}))
    line = one_line_error(tmp_path, capsys, monkeypatch, "fit", "--config", "cfg.yaml")
    assert "torchrun started 6 processes (3 per node)" in line and "devices=2 × num_nodes=2 = 4" in line
    assert "--trainer.devices 3" in line and "--trainer.num_nodes 2" in line
