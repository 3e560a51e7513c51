"""Round 28: a kill in the CSV log's header rewrite, and a SIGTERM in the monitors' end-of-fit work.

The kills are made deterministic by patching one write in a child process to stop partway, as a SIGKILL there would.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"


def recipe_csv_logger(recipe: str = "kat") -> str:
    """The class path of the CSV logger a recipe names (what every ``lightning_act fit`` of it logs with)."""
    loggers = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())["trainer"]["logger"]
    return next(logger["class_path"] for logger in loggers if logger["class_path"].endswith("CSVLogger"))


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


KILLED_IN_THE_REWRITE = r'''
import csv, importlib, os, sys
module, _, name = sys.argv[2].rpartition(".")
logger = getattr(importlib.import_module(module), name)(sys.argv[1], name="csv")
for step in range(50):
    logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
logger.save()
write_rows = csv.DictWriter.writerows
def killed_halfway(self, rows):
    rows = list(rows)
    write_rows(self, rows[: len(rows) // 2])
    os._exit(9)  # what a SIGKILL in the middle of the rewrite does
csv.DictWriter.writerows = killed_halfway
logger.log_metrics({"massive/blocks.0/fit_r2": 0.5}, 50)  # a new column, as the emergence fit logs at the fit's end
logger.save()
'''


def test_a_kill_in_the_header_rewrite_keeps_every_row_logged_before(tmp_path):
    """Before: Lightning's CSVLogger opened metrics.csv with "w" (emptying it) and wrote every row again, so a kill in
    that rewrite left a file of the rows it had got to (here 0 or half of 50, with a file of 500 rows none at all)."""
    proc = run_child(KILLED_IN_THE_REWRITE, str(tmp_path), recipe_csv_logger())
    assert proc.returncode == 9, proc.stderr[-3000:]
    folder = tmp_path / "csv" / "version_0"
    with open(folder / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [(s, 1.0 / (s + 1)) for s in range(50)]
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".tmp")] == ["metrics.csv"]


def test_a_full_disk_in_the_header_rewrite_keeps_the_file_and_the_next_save_adds_the_column(tmp_path, monkeypatch):
    """Before: the full disk emptied metrics.csv; and Lightning had recorded the new column, so the next save appended
    rows of three columns under the two-column header."""
    import importlib

    module, _, name = recipe_csv_logger().rpartition(".")
    logger = getattr(importlib.import_module(module), name)(tmp_path, name="csv")
    for step in range(4):
        logger.log_metrics({"train/loss": float(step)}, step)
    logger.save()
    write_rows = csv.DictWriter.writerows
    full = {"disk": True}

    def no_space(self, rows):
        if full["disk"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_rows(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", no_space)
    logger.log_metrics({"val/loss": 9.0}, 4)
    with pytest.raises(OSError):
        logger.save()
    path = Path(logger.log_dir) / "metrics.csv"
    with open(path, newline="") as file:
        assert [(r["step"], r["train/loss"]) for r in csv.DictReader(file)] == [(str(s), f"{s:.1f}") for s in range(4)]
    full["disk"] = False  # space freed: the next save writes the new column, over every row
    logger.save()
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["step", "train/loss", "val/loss"]
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        *((str(s), f"{s:.1f}", "") for s in range(4)), ("4", "", "9.0")]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temporary file left


SIGTERM_IN_THE_END_OF_FIT_WORK = r'''
import importlib, os, signal, sys
from pathlib import Path
import lightning.pytorch as pl
from _toy import BlockNet, ToyData, ToyTask
from lightning_act.callbacks import MassiveActivations
from lightning_act.callbacks.massive import MassiveActivations as Massive
from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint

root = Path(sys.argv[1])
module, _, name = sys.argv[2].rpartition(".")
CSVLogger = getattr(importlib.import_module(module), name)
fit_emergence = Massive.fit_emergence
def preempted(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM lands in the end-of-fit work
    return fit_emergence(self, *args, **kwargs)

def fit(ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=1,
        logger=CSVLogger(root, name="csv"), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
        callbacks=[MassiveActivations(every_n_steps=1), LastCheckpoint(dirpath=str(root / "checkpoints"))])
    trainer.fit(ToyTask(BlockNet()), ToyData(batch_size=8, n=64), ckpt_path=ckpt_path)

Massive.fit_emergence = preempted
try:
    fit()
except SystemExit as stopped:  # Lightning's exit after an interruption: the process's status, after the resume
    status = stopped.code
Massive.fit_emergence = fit_emergence
fit(str(root / "checkpoints" / "last.ckpt"))  # as `fit --ckpt_path last.ckpt` would, in a process of its own
sys.exit(status)
'''


def test_sigterm_in_the_end_of_fit_work_says_it_and_a_resume_writes_what_it_cut(tmp_path):
    """Before: Lightning had put SIGTERM's default handler back before the monitors' on_fit_end, and the process died
    (status -15) without a word and without the emergence fit's monitors/skipped.json."""
    proc = run_child(SIGTERM_IN_THE_END_OF_FIT_WORK, str(tmp_path), recipe_csv_logger())
    assert proc.returncode == 1, proc.stderr[-3000:]  # an interruption, as a SIGTERM during training ends
    last = tmp_path / "checkpoints" / "last.ckpt"
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "end-of-fit work" in line]
    assert said == [
        "stopped by SIGTERM during the end-of-fit work after the fit's last step (6): what the callbacks' on_fit_end "
        "had not written (the monitors' plots, emergence fits and monitors/skipped.json) is missing; resume with "
        "--ckpt_path "
        f"{last} to write them (the fit is done: only that work runs, into a new log version)"
    ]
    first = tmp_path / "csv" / "version_0"
    assert not (first / "monitors" / "skipped.json").exists()  # cut before it was written
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written left
    with open(first / "metrics.csv", newline="") as file:
        assert sorted({int(r["step"]) for r in csv.DictReader(file) if r["train/loss"]}) == list(range(6))
    # the resume finds the fit done and runs the end-of-fit work: the emergence fit's record of both blocks
    recorded = json.loads((tmp_path / "csv" / "version_1" / "monitors" / "skipped.json").read_text())
    assert set(recorded["massive"]["emergence fit"]) == {"net.blocks.0", "net.blocks.1"}
