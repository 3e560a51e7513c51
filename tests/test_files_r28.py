"""Run files written whole (r28): a kill or a failed write leaves no truncated file under its final name (the fit's
config.yaml, DopamineSpecialisation's firing fractions, SpectralTargetDetection's PR curve), and a version folder
holding only the half config of a fit killed while it saved it is a run that never trained, not one in the way."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_act._files import written_whole
from lightning_act.cli import main

RECIPE = """seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: runs
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: runs, name: csv}
  callbacks:
    - class_path: lightning_act.checkpointing.LastCheckpoint
      init_args: {dirpath: runs/checkpoints}
model:
  class_path: _toy.ToyTask
  init_args:
    net: {class_path: _toy.BlockNet}
data:
  class_path: _toy.ToyData
"""

def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


# --- the helper -------------------------------------------------------------------------------------------------------

def test_written_whole_replaces_the_file_only_once_the_write_is_done(tmp_path: Path) -> None:
    target = tmp_path / "curve.csv"
    target.write_text("previous, whole\n")
    with pytest.raises(OSError, match="No space left"):
        with written_whole(target) as partial:
            partial.write_text("half of the new")
            raise OSError(28, "No space left on device")  # write() names no file: raised again naming the target
    assert target.read_text() == "previous, whole\n" and files_under(tmp_path) == ["curve.csv"]
    with written_whole(target) as partial:
        partial.write_text("new, whole\n")
    assert target.read_text() == "new, whole\n" and files_under(tmp_path) == ["curve.csv"]


# --- bug 3: config.yaml -----------------------------------------------------------------------------------------------

def test_a_config_write_stopped_midway_leaves_no_half_config_under_its_name(recipe, monkeypatch):
    """Before: config.yaml was written straight under its name (jsonargparse's open(path, "w")): a write stopped
    midway (a kill, here an error after half the text) left half a config there, which made the next fit refused."""
    import builtins

    real_open = builtins.open

    class Stopping:
        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, text: str) -> None:
            self.handle.write(text[: len(text) // 2])
            raise RuntimeError("stopped midway")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def stopping_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Stopping(handle) if "w" in mode and ".yaml" in str(file) and "hparams" not in str(file) else handle

    builtins.open = stopping_open
    try:
        with pytest.raises(RuntimeError, match="stopped midway"):
            main(["fit", "--config", str(recipe)])
    finally:
        builtins.open = real_open
    assert files_under(recipe.parent / "runs" / "csv") == []
    assert main(["fit", "--config", str(recipe)]) == 0


@pytest.mark.parametrize("left", ["temporary", "config.yaml"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_version_folder_holding_only_a_half_config_is_no_run_in_the_way(recipe, capsys, left, overwrite):
    """What a fit killed while it saved its config leaves, alone in its version folder: the temporary of the write (a
    kill now), or a config.yaml cut short (before it was written whole). Before: with the config.yaml a plain fit was
    refused ("a previous run is in the way"), and `--overwrite` left the folder behind with a warning ("no config in it
    tells whether it is this run's ... remove it yourself"), as with the temporary, and the new run went to version_1."""
    version = recipe.parent / "runs" / "csv" / "version_0"
    version.mkdir(parents=True)
    half = RECIPE[: RECIPE.index("{save_dir: runs") + 12]  # cut in the logger's init_args: no YAML
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(half)
    (version / (".config.yaml.0123456789abcdef.tmp" if left == "temporary" else "config.yaml")).write_text(half)
    assert main(["fit", "--config", str(recipe), *(["--overwrite"] if overwrite else [])]) == 0
    assert "--overwrite left" not in capsys.readouterr().err
    assert sorted(p.name for p in version.parent.iterdir()) == ["version_0"]  # the new run, in the killed one's place
    files = files_under(version)
    assert {"config.yaml", "metrics.csv"} <= set(files) and not [name for name in files if name.endswith(".tmp")]
    assert yaml.safe_load((version / "config.yaml").read_text())["model"]["class_path"] == "_toy.ToyTask"


def test_a_half_config_beside_a_log_is_still_a_run_in_the_way(recipe, capsys):
    """The rules for runs that trained are kept: a version folder with a log and an unreadable config is refused by a
    plain fit and left (with a warning) by `--overwrite`, which cannot tell whose run it was."""
    version = recipe.parent / "runs" / "csv" / "version_0"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text("trainer: {logger: [")
    (version / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    assert main(["fit", "--config", str(recipe)]) == 2
    assert "a previous run is in the way" in capsys.readouterr().err
    assert main(["fit", "--config", str(recipe), "--overwrite"]) == 0
    assert "--overwrite left runs/csv/version_0: no config in it tells" in capsys.readouterr().err
    assert (version / "metrics.csv").is_file()


# --- bug 4: the task files --------------------------------------------------------------------------------------------

class FirstBand(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def test_a_failed_write_of_the_pr_curve_keeps_the_previous_whole_curve(tmp_path, monkeypatch, one_thread):
    """Before: the curve was written row by row under its final name; a write that stopped after 200 of ~1000 rows left
    a curve cut short there (the previous test's whole one destroyed)."""
    from lightning_act.tasks.spectral_detection import SpectralTargetDetection

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 1, generator=generator), (torch.rand(400, generator=generator) < 0.5).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    task = SpectralTargetDetection(in_bands=1, pos_weight=None)
    task.model = FirstBand()
    trainer = pl.Trainer(logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu")
    trainer.test(task, loader, verbose=False)
    curve = Path(trainer.log_dir) / "test_pr_curve.csv"
    whole = curve.read_text()
    assert len(whole.splitlines()) > 200 and whole.splitlines()[-1].split(",")[1:] == ["1.0", "0.0"]
    real_writer = csv.writer

    class Failing:
        def __init__(self, handle, *args, **kwargs) -> None:
            self.writer, self.rows = real_writer(handle, *args, **kwargs), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 200:
                raise OSError(28, "No space left on device")
            return self.writer.writerow(row)

    monkeypatch.setattr(csv, "writer", Failing)
    with pytest.raises(OSError, match="No space left"):
        trainer.test(task, loader, verbose=False)
    assert curve.read_text() == whole
    assert [p.name for p in curve.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_write_of_the_firing_fractions_keeps_the_previous_whole_file(tmp_path, monkeypatch, one_thread):
    """Before: torch.save wrote dopamine_firing.pt under its final name; a write cut in half left a file torch.load
    refuses ("failed finding central directory") beside a whole PNG."""
    from lightning_act.data.rotated_digits import RotatedDigitsDataModule
    from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation

    def data() -> RotatedDigitsDataModule:
        return RotatedDigitsDataModule("rotated", "rotated", image_size=8, max_samples=100, batch_size=50)

    options = dict(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=tmp_path)
    pl.seed_everything(0, verbose=False)
    foundation = pl.Trainer(max_steps=1, logger=False, **options)
    foundation.fit(DopamineFoundation(image_size=8, hidden_sizes=[16, 12]), datamodule=data())
    foundation.save_checkpoint(tmp_path / "foundation.ckpt")
    module = DopamineSpecialisation(str(tmp_path / "foundation.ckpt"), method="dopamine")
    trainer = pl.Trainer(logger=CSVLogger(tmp_path, name="csv"), **options)
    trainer.test(module, datamodule=data(), verbose=False)
    fractions = Path(trainer.log_dir) / "dopamine_firing.pt"
    whole = fractions.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[: len(Path(f).read_bytes()) // 2])  # cut in half, then the error
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        trainer.test(module, datamodule=data(), verbose=False)
    assert fractions.read_bytes() == whole
    assert set(torch.load(fractions)) == {"model.2", "model.4"}
    assert [p.name for p in fractions.parent.iterdir() if p.name.endswith(".tmp")] == []
