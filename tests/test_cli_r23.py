"""The lightning_act command (r23): a first logger without a local folder, a previous run in a CSV or TensorBoard
logger's version folders, a logger missing a required argument, W&B online without a login, a checkpoint name too
long, a full disk met by a write that names no file."""

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_cli_files_r22 import last_error, write_config

from lightning_act.checkpointing import AtomicCheckpointIO
from lightning_act.cli import _unwritable_output, main
from lightning_act.plots import new_figure, save_png_whole

ROOT = Path(__file__).resolve().parents[1]
ELSEWHERE = "point the run's output elsewhere (trainer.default_root_dir, the loggers' save_dir, the checkpoint dirpath)"


def _with_loggers(config: Path, *loggers: dict) -> Path:
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"] = list(loggers)
    config.write_text(yaml.safe_dump(settings))
    return config


def _logger(kind: str, **init_args) -> dict:
    return {"class_path": f"lightning.pytorch.loggers.{kind}", "init_args": init_args}


# --- bug 1: MLflow with a server or database tracking URI listed first -----------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_a_first_logger_without_a_local_folder_leaves_the_config_to_the_next_loggers_folder(tmp_path, capsys,
                                                                                          monkeypatch):
    """Before: TypeError traceback from Path(None) (MLFlowLogger.save_dir is None for any tracking URI but file:), and
    Lightning's config saving asserted trainer.log_dir is not None. The URI's store is a file store here (sqlite needs
    sqlalchemy), its save_dir made None as for a server or database URI."""
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    monkeypatch.setattr(MLFlowLogger, "save_dir", property(lambda self: None))
    config = _with_loggers(write_config(tmp_path, "runs", callbacks=[], enable_checkpointing=False),
                           _logger("MLFlowLogger", experiment_name="x", tracking_uri=f"file:{tmp_path}/store"),
                           _logger("CSVLogger", save_dir="runs", name="csv"))
    assert main(["fit", "--config", str(config)]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "csv" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"][0]["init_args"]["tracking_uri"] == f"file:{tmp_path}/store"
    # that config is the run's: the same fit again is refused over it
    assert main(["fit", "--config", str(config)]) == 2
    assert last_error(capsys).startswith(
        "lightning_act: error: a previous run is in the way (runs/csv/version_0/config.yaml);")


# --- bug 2: a previous run in a CSV or TensorBoard first logger's version folders ------------------------------------

def test_a_second_fit_into_a_csv_first_run_without_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    """Before: the config was looked for in the CSV logger's next version folder (version_1), so the second fit ran
    from step 0 into version_1 and the report then refused the folder as holding two runs."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", callbacks=[], enable_checkpointing=False)
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config)]) == 2
    assert last_error(capsys).startswith(
        "lightning_act: error: a previous run is in the way (runs/csv/version_0/config.yaml); start over "
        "with --overwrite")
    assert sorted(p.name for p in (tmp_path / "runs" / "csv").iterdir()) == ["version_0"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_overwrite_with_tensorboard_first_removes_the_previous_runs_config_and_event_files(tmp_path, capsys,
                                                                                         monkeypatch):
    """Before: the second fit was not refused, and --overwrite left tb/version_0 (config.yaml and the event file), so
    TensorBoard showed the old run beside the new one in version_1."""
    monkeypatch.chdir(tmp_path)
    config = _with_loggers(write_config(tmp_path, "runs", callbacks=[], enable_checkpointing=False),
                           _logger("TensorBoardLogger", save_dir="runs", name="tb"),
                           _logger("CSVLogger", save_dir="runs", name="csv"))
    assert main(["fit", "--config", str(config)]) == 0
    old_events = sorted(p.name for p in (tmp_path / "runs" / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert len(old_events) == 1
    assert main(["fit", "--config", str(config)]) == 2
    assert "(runs/tb/version_0/config.yaml)" in last_error(capsys)
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "tb").iterdir()) == ["version_0"]
    new = tmp_path / "runs" / "tb" / "version_0"
    events = sorted(p.name for p in new.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events != old_events and (new / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "csv").iterdir()) == ["version_0"]


# --- bug 3: a logger class without its required argument ------------------------------------------------------------

@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_logger_without_its_required_argument_names_it(tmp_path, capsys, monkeypatch, where):
    """Before: 'Parser key "trainer.logger":; Not a valid subclass of Logger; Subclass types expect one of:' (false: it
    is a Logger; cut off; the missing argument not named)."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", loggers=("csv", "wandb"))
    if where == "yaml":
        extra = tmp_path / "tb.yaml"
        extra.write_text("trainer:\n  logger:\n    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n")
        argv = ["fit", "--config", str(config), "--config", str(extra)]
    else:
        argv = ["fit", "--config", str(config), "--trainer.logger+=TensorBoardLogger"]
    assert main(argv) == 2
    assert last_error(capsys) == (
        "lightning_act: error: trainer.logger (TensorBoardLogger): missing required argument save_dir; add "
        "--trainer.logger.save_dir VALUE after the class on the command line, or init_args: {save_dir: ...} to it in "
        "the config")
    assert not (tmp_path / "runs").exists()


# --- bug 4: W&B online without a login ---------------------------------------------------------------------------------

def test_wandb_online_without_a_login_is_one_line_and_leaves_no_run(tmp_path):
    """Before: a 52-line traceback ending in wandb.errors.UsageError: No API key configured, and an empty checkpoint
    folder left. Run in its own process: W&B keeps the first run's settings (offline) for the whole process. W&B fails
    before it connects (its server address is a closed port anyway)."""
    config = write_config(tmp_path, "runs", loggers=("csv", "wandb"))
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"][1]["init_args"]["offline"] = False
    config.write_text(yaml.safe_dump(settings))
    env = {name: value for name, value in os.environ.items() if name not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_BASE_URL="http://127.0.0.1:9", NETRC=str(tmp_path / "no_netrc"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "lightning_act", "fit", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lightning_act: error: W&B: not logged in (No API key configured. Use `wandb login` to log in.); run `wandb "
        "login` (or set WANDB_API_KEY), or log offline (offline: true on the WandbLogger, or WANDB_MODE=offline) and "
        "upload the run later with `wandb sync`")
    assert not (tmp_path / "runs").exists()  # no config, CSV version or checkpoint folder in the way of the next fit


# --- bug 5: a checkpoint name over 255 bytes ------------------------------------------------------------------------

def test_a_checkpoint_name_too_long_names_the_checkpoint_and_its_filename_template(tmp_path):
    """Before: the line named AtomicCheckpointIO's hidden temporary, "a name in it has 219 bytes" (under the 255 it
    quoted) and told to shorten the run folder's name."""
    name = "x" * 251 + "epoch=0.ckpt"  # 263 bytes
    target = tmp_path / name
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"a": 1}, target)
    assert str(_unwritable_output(raised.value)) == (
        f"'{target}': File name too long (the checkpoint's name has 263 bytes); most file systems take names of up to "
        "255 bytes: shorten the filename template of the ModelCheckpoint that writes it")
    assert list(tmp_path.iterdir()) == []


# --- bug 6: a full disk met by a write that names no file -----------------------------------------------------------

def test_a_full_disk_while_saving_a_plot_names_the_plot(tmp_path, monkeypatch):
    """Before: the failed write (no file name) gave "no space left on the device while writing the run's files"."""
    figure = new_figure(2, 2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write() or close() raises

    monkeypatch.setattr(figure, "savefig", full_disk)
    monkeypatch.setattr("lightning_act.cli.shutil.disk_usage", lambda folder: SimpleNamespace(free=3 * 2**19))
    path = tmp_path / "plots" / "massive_ratio_heatmap.png"
    path.parent.mkdir()
    with pytest.raises(OSError) as raised:
        save_png_whole(figure, path)
    assert str(_unwritable_output(raised.value)) == (
        f"no space left in '{path.parent}' (1.5 MiB free) while writing 'massive_ratio_heatmap.png'; free some space "
        f"or {ELSEWHERE}")
    assert list(path.parent.iterdir()) == []


def test_a_full_disk_met_by_a_nameless_write_names_the_run_folder_with_the_least_space(tmp_path, capsys, monkeypatch):
    """Before: "no space left on the device while writing the run's files (No space left on device)", no folder. The
    CSV log's flush fails (as Lightning's write does on a full disk) with the checkpoint folder's disk the full one."""
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", callbacks=[{"class_path": "lightning_act.checkpointing.LastCheckpoint",
                                                        "init_args": {"dirpath": "ckpts"}}])
    free = {(tmp_path / "ckpts").resolve(): 2**19}  # 0.5 MiB there, 5 GiB everywhere else

    def disk_usage(folder):
        return SimpleNamespace(free=free.get(Path(folder).resolve(), 5 * 2**30))

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_act.cli.shutil.disk_usage", disk_usage)
    monkeypatch.setattr(_ExperimentWriter, "save", full_disk)
    assert main(["fit", "--config", str(config)]) == 2
    assert last_error(capsys) == (
        "lightning_act: error: no space left on the device while writing the run's files (No space left on device); of "
        f"the run's output folders, 'ckpts' has the least space left (0.5 MiB free): free some space there or {ELSEWHERE}")
    # a write that names its file keeps its own line
    named = OSError(errno.ENOSPC, "No space left on device", os.fspath(tmp_path / "metrics.csv"))
    assert str(_unwritable_output(named)).startswith(f"no space left in '{tmp_path}' (")


# --- r23 review: --overwrite in a logger root shared with other recipes ------------------------------------------------

def _recipe_with_shared_root(folder: Path, runs: str, kind: str) -> Path:
    """A recipe with its own run folder (CSV log, last.ckpt) and a second logger of ``kind`` in the root every recipe
    shares (``shared/experiments``)."""
    config = write_config(folder, runs)
    return _with_loggers(config, _logger("CSVLogger", save_dir=runs, name="csv"),
                         _logger(kind, save_dir="shared", name="experiments"))


@pytest.mark.parametrize("kind", [
    "CSVLogger",
    pytest.param("TensorBoardLogger", marks=pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                                               reason="tensorboard is not installed")),
])
def test_overwrite_keeps_other_recipes_version_folders_in_a_shared_logger_root(tmp_path, capsys, monkeypatch, kind):
    """Before: --overwrite of A removed every version_N of the shared root, B's version_1 (its run) included."""
    monkeypatch.chdir(tmp_path)
    a, b = _recipe_with_shared_root(tmp_path, "runs_a", kind), _recipe_with_shared_root(tmp_path, "runs_b", kind)
    assert main(["fit", "--config", str(a)]) == 0
    assert main(["fit", "--config", str(b)]) == 0
    shared = tmp_path / "shared" / "experiments"
    b_files = sorted(p.name for p in (shared / "version_1").iterdir())
    (shared / "version_0" / "a_marker").write_text("A's first run")
    assert main(["fit", "--config", str(a), "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in shared.iterdir()) == ["version_1", "version_2"]  # B's kept, A's new one beside it
    assert sorted(p.name for p in (shared / "version_1").iterdir()) == b_files
    assert yaml.safe_load((shared / "version_2" / "fit_config.yaml").read_text())["trainer"]["default_root_dir"] == "runs_a"


def test_overwrite_leaves_a_version_folder_that_holds_no_config_and_says_so(tmp_path, capsys, monkeypatch):
    """A version folder without any config (a run of an older lightning_act) cannot be told to be this run's: left, in
    one warning line (before: removed with the others)."""
    monkeypatch.chdir(tmp_path)
    config = _recipe_with_shared_root(tmp_path, "runs", "CSVLogger")
    assert main(["fit", "--config", str(config)]) == 0
    untold = tmp_path / "shared" / "experiments" / "version_1"
    untold.mkdir()
    (untold / "metrics.csv").write_text("step,loss\n0,1.0\n")
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: --overwrite" in line]
    assert warnings == [
        "lightning_act: warning: --overwrite left shared/experiments/version_1: no config in it tells whether it is "
        "this run's or another recipe's sharing the logger's folder; remove it yourself if it is this run's"]
    assert (untold / "metrics.csv").read_text() == "step,loss\n0,1.0\n"
    assert sorted(p.name for p in untold.parent.iterdir()) == ["version_1", "version_2"]


# --- r23 review: a missing argument of a class nested in a class's init_args -----------------------------------------

NESTED_MODULE = '''
import lightning.pytorch as pl
from torch import nn


class Head(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()


class Net(pl.LightningModule):
    def __init__(self, head: nn.Module, lr: float = 0.1):
        super().__init__()
'''


@pytest.mark.parametrize("where", ["yaml", "command line"])
def test_a_missing_argument_of_a_nested_class_names_that_class(tmp_path, capsys, monkeypatch, where):
    """Before: 'model (Net): missing required argument classes; add --model.classes VALUE ...', an option Net refuses."""
    (tmp_path / "nested_r23.py").write_text(NESTED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    settings = yaml.safe_load(config.read_text())
    head = {"class_path": "nested_r23.Head", "init_args": {"width": 3}}
    settings["model"] = {"class_path": "nested_r23.Net", "init_args": {"head": head} if where == "yaml" else {}}
    config.write_text(yaml.safe_dump(settings))
    extra = ["--model.head", "nested_r23.Head", "--model.head.width", "3"] if where == "command line" else []
    assert main(["fit", "--config", str(config), *extra]) == 2
    assert last_error(capsys) == (
        "lightning_act: error: model.head (Head): missing required argument classes; add --model.head.classes VALUE "
        "after the class on the command line, or init_args: {classes: ...} to it in the config")


def test_a_missing_argument_that_is_not_the_classs_parameter_gets_no_option_advice():
    """jsonargparse may require a name the class's own signature lacks (resolved through **kwargs into another call):
    an option named after it would be refused, so the line names the argument alone."""
    from lightning_act.cli import condense_parse_error

    message = (
        'Parser key "trainer.callbacks":\n'
        "  Does not validate against any of the Union subtypes\n"
        "  Errors:\n"
        "    - Problem with given class_path 'lightning.pytorch.callbacks.EarlyStopping':\n"
        "        Parser key \"inner\":\n"
        "          Problem with given class_path 'lightning.pytorch.callbacks.ModelCheckpoint':\n"
        "            the following arguments are required: depth\n"
    )
    assert condense_parse_error(message) == "trainer.callbacks.inner (ModelCheckpoint): missing required argument depth"


# --- r23 review: W&B refusing an offline run's settings ----------------------------------------------------------------

def test_wandb_refusing_an_offline_runs_project_name_names_the_setting_not_the_network(tmp_path):
    """Before: '...; check the network and your login, or log offline (offline: true ...)' to a run offline already.
    Run in its own process: W&B keeps a process's first run, whose settings it then does not check again."""
    config = write_config(tmp_path, "runs", loggers=("wandb", "csv"))
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"][0]["init_args"]["project"] = "my/project"
    config.write_text(yaml.safe_dump(settings))
    env = {name: value for name, value in os.environ.items() if name != "WANDB_MODE"}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "lightning_act", "fit", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lightning_act: error: W&B refused the run's settings (Invalid project name 'my/project': cannot contain "
        "characters '/,\\\\,#,?,%,:', found '/'); fix the WandbLogger's init_args")


def test_overwrite_after_a_recipe_gained_a_logger_removes_the_previous_runs_versions(tmp_path, capsys, monkeypatch):
    """Before: the previous run's config named other loggers, so its CSV version_0 was taken for another recipe's and
    kept without a word; the report then merged it with the new run as a resume."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    assert main(["fit", "--config", str(config)]) == 0
    _with_loggers(config, _logger("CSVLogger", save_dir="runs", name="csv"),
                  _logger("CSVLogger", save_dir="runs", name="extra"))
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert "warning: --overwrite" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs" / "csv").iterdir()) == ["version_0"]
    saved = yaml.safe_load((tmp_path / "runs" / "csv" / "version_0" / "config.yaml").read_text())
    assert len(saved["trainer"]["logger"]) == 2  # the new run's, in the folder the old one left
