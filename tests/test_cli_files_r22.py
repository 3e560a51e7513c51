"""The lightning_act command and the run's files (r22): which files are a previous run's, paths the run cannot use,
a full disk, Ctrl-C before the first step, "~" in paths, quoted paths in the commands it suggests."""

import errno
import os
import shlex
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_act.cli import _unwritable_output, main, run_folder_line

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, runs: str, loggers=("csv",), wandb_dir: str | None = None, **trainer) -> Path:
    """A two-step fit of a tiny ViT: CSV logs in ``<runs>/csv``, last.ckpt in ``<runs>/checkpoints``; with
    ``loggers=("wandb", "csv")`` W&B (offline, in ``wandb_dir`` or ``runs``) comes first and gets the config."""
    config = yaml.safe_load((ROOT / "recipes" / "vit_demo.yaml").read_text())
    named = {
        "csv": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs, "name": "csv"}},
        "wandb": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                  "init_args": {"project": "test", "save_dir": wandb_dir or runs, "offline": True}},
    }
    config["trainer"].update(max_steps=2, max_epochs=1, limit_val_batches=0, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=runs, logger=[named[n] for n in loggers],
                             callbacks=[{"class_path": "lightning_act.checkpointing.LastCheckpoint",
                                         "init_args": {"dirpath": f"{runs}/checkpoints"}}])
    config["trainer"].update(trainer)
    config["model"]["init_args"]["model_kwargs"] = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1,
                                                    "num_heads": 2}
    config["model"]["init_args"]["warmup_steps"] = 0
    config["data"]["init_args"].update(image_size=16, batch_size=32)
    path = folder / f"fit_{len(list(folder.glob('fit_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- bug 3: only the files this run's checkpoint callbacks write are "a previous run" -----------------------------

def test_the_files_a_model_checkpoint_writes_are_told_from_other_files_under_its_dirpath():
    from lightning_act.cli import _checkpoint_name_pattern

    templated = ModelCheckpoint(dirpath="ckpts", filename="best-{step}-{act/model.blocks.0/rms:.4f}")
    pattern = _checkpoint_name_pattern(templated)
    for name in ("best-step=1-act/model.blocks.0/rms=0.4148.ckpt", "best-step=12-act/model.blocks.0/rms=-1.0000-v2.ckpt",
                 "last.ckpt", "last-v1.ckpt"):
        assert pattern.fullmatch(name), name
    for name in ("other_run/epoch=3.ckpt", "other_run/last.ckpt", "best-step=1.ckpt", "notes.ckpt"):
        assert not pattern.fullmatch(name), name
    # the names Lightning itself gives, a version suffix and the last checkpoint's included
    metrics = {"step": torch.tensor(7), "act/model.blocks.0/rms": torch.tensor(0.25)}
    for written in (templated.format_checkpoint_name(dict(metrics)), templated.format_checkpoint_name(dict(metrics), ver=3),
                    templated.format_checkpoint_name(dict(metrics), templated.CHECKPOINT_NAME_LAST)):
        assert pattern.fullmatch(Path(written).relative_to(templated.dirpath).as_posix()), written
    default = _checkpoint_name_pattern(ModelCheckpoint(dirpath="ckpts"))  # Lightning's "{epoch}-{step}"
    assert default.fullmatch("epoch=0-step=5.ckpt") and not default.fullmatch("run2/epoch=0-step=5.ckpt")
    plain = _checkpoint_name_pattern(ModelCheckpoint(dirpath="ckpts", filename="e{epoch:02d}-x", auto_insert_metric_name=False))
    assert plain.fullmatch("e03-x.ckpt") and not plain.fullmatch("e03.ckpt") and not plain.fullmatch("old/e03-x.ckpt")


def test_another_runs_checkpoints_in_a_sub_folder_of_the_checkpoint_dirpath_are_neither_in_the_way_nor_removed(
        tmp_path, capsys, monkeypatch):
    """Before: every *.ckpt under the dirpath, sub-folders included, was "a previous run", and --overwrite removed it."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                             "init_args": {"dirpath": "best", "filename": "vit-{epoch}"}})
    config.write_text(yaml.safe_dump(settings))
    other = tmp_path / "best" / "other_run" / "epoch=3.ckpt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's checkpoint")
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config)]) == 2  # this run's own files are in the way
    err = last_error(capsys)
    assert "a previous run is in the way (runs/checkpoints/last.ckpt, " in err and "vit-epoch=0.ckpt" in err
    assert "epoch=3.ckpt" not in err
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert other.read_bytes() == b"another run's checkpoint"
    assert sorted(p.relative_to(tmp_path / "best").as_posix() for p in (tmp_path / "best").rglob("*.ckpt")) == [
        "other_run/epoch=3.ckpt", "vit-epoch=0.ckpt"]


# --- bug 5: a path the run cannot use is one line before any training ----------------------------------------------

@pytest.mark.parametrize("case", ["file as checkpoint folder", "file as csv version folder", "name too long"])
def test_a_path_the_run_cannot_use_is_one_line_before_any_training(tmp_path, capsys, monkeypatch, case):
    """Before: a file in place of the checkpoint folder trained to the first save, then a FileExistsError traceback; a
    file in place of the CSV version folder and a 260-byte folder name were tracebacks too."""
    monkeypatch.chdir(tmp_path)
    runs = "runs/" + "r" * 260 if case == "name too long" else "runs"
    config = write_config(tmp_path, runs)
    blocker = {"file as checkpoint folder": tmp_path / "runs" / "checkpoints",
               "file as csv version folder": tmp_path / "runs" / "csv" / "version_0"}.get(case)
    if blocker is not None:
        blocker.parent.mkdir(parents=True)
        blocker.write_text("the user's file")
    trained = []
    monkeypatch.setattr("lightning_act.tasks.image_classification.ImageClassifier.training_step",
                        lambda self, *args: trained.append(1))
    assert main(["fit", "--config", str(config)]) == 2
    err = last_error(capsys)
    fix = "point the run's output elsewhere (trainer.default_root_dir, the loggers' save_dir, the checkpoint dirpath)"
    if blocker is not None:  # as given in the config, or made absolute by fsspec (the CSV logger's folders)
        shown = blocker.relative_to(tmp_path) if case == "file as checkpoint folder" else blocker
        assert err == f"lightning_act: error: '{shown}' is a file where the run needs a folder; move or remove that file, or {fix}"
        assert blocker.read_text() == "the user's file"
    else:
        assert err.startswith("lightning_act: error: 'runs/rrrr") and err.endswith(
            "': File name too long (a name in it has 260 bytes); most file systems take names of up to 255 bytes: "
            f"shorten the run folder's name, or {fix}")
    assert not trained


# --- bug 6: a full disk is one line wherever the run writes --------------------------------------------------------

def test_a_full_disk_while_writing_the_csv_log_is_one_line(tmp_path, capsys, monkeypatch):
    """Before: two chained tracebacks (only a full disk during a checkpoint write was one line)."""
    import builtins

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.csv") and ("w" in mode or "a" in mode):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    assert main(["fit", "--config", str(config)]) == 2
    err = last_error(capsys)
    folder = tmp_path / "runs" / "csv" / "version_0"
    head, rest = err.split(" MiB free) while writing 'metrics.csv'; ")
    assert head.startswith(f"lightning_act: error: no space left in '{folder}' (") and float(head.rsplit("(", 1)[1]) >= 0
    assert rest == ("free some space or point the run's output elsewhere (trainer.default_root_dir, the loggers' "
                    "save_dir, the checkpoint dirpath)")
    # a write() that fails names no file
    nameless = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(_unwritable_output(nameless)) == (
        "no space left on the device while writing the run's files (Disk quota exceeded); free some space or point "
        "the run's output elsewhere (trainer.default_root_dir, the loggers' save_dir, the checkpoint dirpath)")
    # errors of no such kind keep their traceback
    assert _unwritable_output(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None  # a folder
    assert _unwritable_output(OSError(errno.EIO, "Input/output error", str(tmp_path))) is None


# --- bug 9 and the refusal itself: what a run that never took a step leaves ---------------------------------------

def test_ctrl_c_before_the_first_step_leaves_no_run_in_the_way_of_the_next_fit(tmp_path, monkeypatch):
    """Before: its config.yaml (in W&B's folder), an empty CSV version and a W&B offline run were left, and the next fit
    was refused as "a previous run is in the way"."""
    from lightning_act.tasks.image_classification import ImageClassifier

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", loggers=("wandb", "csv"))

    def ctrl_c(self, *args):
        raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patched:
        patched.setattr(ImageClassifier, "training_step", ctrl_c)
        try:
            with pytest.raises(SystemExit):  # Lightning ends an interrupted fit with exit status 1
                main(["fit", "--config", str(config)])
        finally:
            signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert not (tmp_path / "runs" / "config.yaml").exists()
    assert not list((tmp_path / "runs").glob("wandb/offline-run-*")) and not (tmp_path / "runs" / "csv").exists()
    assert not (tmp_path / "runs" / "checkpoints").exists()  # made at the fit's start, removed as empty
    assert main(["fit", "--config", str(config)]) == 0


def test_a_refused_fit_keeps_the_previous_runs_config(tmp_path, capsys, monkeypatch):
    """Before: the refusal ("a previous run is in the way") removed the previous run's config.yaml as if the refused
    fit had written it, so the next fit was no longer refused over it."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs", loggers=("wandb", "csv"), callbacks=[], enable_checkpointing=False)
    assert main(["fit", "--config", str(config)]) == 0
    saved = (tmp_path / "runs" / "config.yaml").read_text()
    for _ in range(2):
        assert main(["fit", "--config", str(config)]) == 2
        assert last_error(capsys).startswith("lightning_act: error: a previous run is in the way (runs/config.yaml);")
        assert (tmp_path / "runs" / "config.yaml").read_text() == saved


# --- bug 14: a W&B folder shared by several recipes -----------------------------------------------------------------

def test_a_wandb_folder_shared_by_two_recipes_does_not_block_the_second_and_still_guards_each(tmp_path, capsys, monkeypatch):
    """Before: recipe b's first fit was refused over recipe a's config.yaml in the shared W&B folder (which
    --overwrite would have removed)."""
    monkeypatch.chdir(tmp_path)
    only_logs = {"loggers": ("wandb", "csv"), "wandb_dir": "wandb_all", "callbacks": [], "enable_checkpointing": False}
    recipe_a = write_config(tmp_path, "runs/a", **only_logs)
    recipe_b = write_config(tmp_path, "runs/b", **only_logs)
    assert main(["fit", "--config", str(recipe_a)]) == 0
    assert main(["fit", "--config", str(recipe_b)]) == 0
    assert yaml.safe_load((tmp_path / "wandb_all" / "config.yaml").read_text())["trainer"]["default_root_dir"] == "runs/b"
    assert main(["fit", "--config", str(recipe_b)]) == 2  # b's own config is b's previous run
    assert "a previous run is in the way (wandb_all/config.yaml)" in last_error(capsys)
    assert main(["fit", "--config", str(recipe_a)]) == 0


# --- bug 11: --overwrite with a symlinked CSV folder ----------------------------------------------------------------

def test_overwrite_keeps_a_symlinked_csv_folder(tmp_path, monkeypatch):
    """Before: the emptied symlink was rmdir'ed: "Not a directory; check that path's permissions", exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big").mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "big", tmp_path / "runs" / "csv")
    config = write_config(tmp_path, "runs")
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config), "--overwrite"]) == 0
    assert (tmp_path / "runs" / "csv").is_symlink() and sorted(p.name for p in (tmp_path / "big").iterdir()) == ["version_0"]


# --- bug 4 (the command's part): "~" in the run's paths -------------------------------------------------------------

def test_a_run_folder_given_with_a_tilde_is_the_one_under_home(tmp_path, capsys, monkeypatch):
    """Before: the fit's config copy for the report (fit_config.yaml) was skipped, its source looked up in a folder
    named "~", and the fit's last line named "~/runs", which the report then read literally."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = write_config(cwd, "~/runs", callbacks=[{"class_path": "lightning_act.checkpointing.LastCheckpoint",
                                                     "init_args": {"dirpath": str(home / "runs" / "checkpoints")}}])
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"].insert(0, {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                             "init_args": {"save_dir": "~/elsewhere", "name": "first"}})
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (  # the first CSV logger's folder
        f"run folder: {home}/elsewhere  (see it: lightning_act report {home}/elsewhere)")
    saved = home / "elsewhere" / "first" / "version_0" / "config.yaml"
    assert (home / "runs" / "csv" / "version_0" / "fit_config.yaml").read_text() == saved.read_text()
    assert not (cwd / "~").exists()


# --- bug 12 (the command's part): paths in the commands it suggests are quoted -------------------------------------

def test_the_commands_the_cli_suggests_quote_their_paths(tmp_path, capsys, monkeypatch):
    """Before: `lightning_act report runs/k ü` and `--ckpt_path my runs/checkpoints/last.ckpt`, which a shell splits."""
    folder = Path("runs/k ü")
    line = run_folder_line(SimpleNamespace(loggers=[CSVLogger(tmp_path)]), folder)
    assert line == "run folder: runs/k ü  (see it: lightning_act report 'runs/k ü')"
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "my runs")
    last = tmp_path / "my runs" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"previous run")
    assert main(["fit", "--config", str(config)]) == 2
    err = last_error(capsys)
    assert "; resume it with --ckpt_path 'my runs/checkpoints/last.ckpt', start over with --overwrite" in err
    assert shlex.split(err.split("resume it with ", 1)[1].split(",", 1)[0]) == ["--ckpt_path", "my runs/checkpoints/last.ckpt"]
