"""Round 22: LastCheckpoint's stops (the stopped step's logged row and validation, a Ctrl-C during validation or after
the last training step), a reused LastCheckpoint's warning, ``~`` and quoted paths; AtomicCheckpointIO's temporary
file (a full disk while creating it, a long final name)."""

from __future__ import annotations

import csv
import errno
import fnmatch
import os
import pickle
import re
import shlex
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from _toy import BlockNet, ToyData, ToyTask
from lightning_act import checkpointing
from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint
from lightning_act.errors import ConfigError, DiskFullError

MAX_STEPS = 16  # ToyData: 64 samples in batches of 8, so 8 steps an epoch; validated after steps 8 and 16


class SignalAt(pl.Callback):
    """Send ``signum`` to this process once, at the end of the training batch (``where="train"``) or of the first
    validation batch (``"validation"``) at optimizer step ``step``, or at the fit's end (``"train_end"``): a plain
    callback, so it runs before LastCheckpoint (Lightning puts Checkpoint callbacks last)."""

    def __init__(self, signum: int, step: int, where: str) -> None:
        self.signum, self.step, self.where, self.sent = signum, step, where, False

    def _send(self, trainer: pl.Trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._send(trainer, "train")

    def on_validation_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, "validation")

    def on_train_end(self, trainer: pl.Trainer, *args) -> None:
        self._send(trainer, "train_end")


def _trainer(root: Path, callbacks: list, accumulate_grad_batches: int = 1) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=MAX_STEPS,
                      logger=CSVLogger(root, name="csv"), log_every_n_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                      accumulate_grad_batches=accumulate_grad_batches,
                      callbacks=[*callbacks, LastCheckpoint(dirpath=str(root / "ck"))], plugins=[AtomicCheckpointIO()])


def _fit(root: Path, callbacks: list = (), ckpt_path: str | None = None) -> ToyTask:
    return _fit_trainer(root, callbacks, ckpt_path)[0]


def _fit_trainer(root: Path, callbacks: list = (), ckpt_path: str | None = None,
                 accumulate_grad_batches: int = 1) -> tuple[ToyTask, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    task = ToyTask(BlockNet())
    trainer = _trainer(root, list(callbacks), accumulate_grad_batches)
    trainer.fit(task, ToyData(), ckpt_path=ckpt_path)
    return task, trainer


def _stopped_fit(root: Path, signal_at: SignalAt, callbacks: list = (), accumulate_grad_batches: int = 1) -> None:
    """A fit that the signal ends as an interruption: Lightning's handler exits with status 1."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            _fit_trainer(root, [signal_at, *callbacks], accumulate_grad_batches=accumulate_grad_batches)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning leaves SIGINT ignored after an interrupt
    assert stopped.value.code == 1


def _logged(root: Path, version: str | None = None) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` from the CSV versions of ``root`` in order (a later version's row replaces an earlier
    one's), or from ``version`` alone."""
    versions = [root / "csv" / version] if version else sorted((root / "csv").glob("version_*"))
    out: dict[str, dict[int, float]] = {}
    for folder in versions:
        with open(folder / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key != "step" and key != "epoch" and value != "":
                        out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def _saved_step(root: Path) -> int:
    return torch.load(root / "ck" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


@contextmanager
def _info_lines() -> Iterator[list[str]]:
    """The info lines ``LastCheckpoint`` gives in this block (read at the call: Lightning's logger may be quieted,
    or its rank-zero filter set, by earlier tests of the session)."""
    lines: list[str] = []
    with mock.patch("lightning_act.checkpointing.rank_zero_info", lambda message, *args, **kwargs: lines.append(message)):
        yield lines


def _resume_path_in(line: str) -> list[str]:
    """What a shell makes of the path after ``--ckpt_path`` in a hint line."""
    return shlex.split(line.split("resume with --ckpt_path ", 1)[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, dict[int, float]], dict[str, torch.Tensor]]:
    """The uninterrupted fit's logged values and final weights."""
    root = tmp_path_factory.mktemp("reference")
    task = _fit(root)
    return _logged(root), {k: v.clone() for k, v in task.state_dict().items()}


@pytest.mark.parametrize(("signum", "step"), [(signal.SIGINT, 5), (signal.SIGINT, 8), (signal.SIGTERM, 8),
                                              (signal.SIGINT, MAX_STEPS)])
def test_a_stop_at_a_training_step_logs_that_step_and_its_validation(tmp_path, reference, signum, step):
    """Before: LastCheckpoint raised inside ``on_train_batch_end``, before Lightning logged the step and ran the
    validation due after it; the resume starts after both, so the saved step's ``train/loss`` row was never logged and,
    at an epoch's last step, that epoch's ``val/loss`` neither (a ModelCheckpoint or EarlyStopping on it missed it)."""
    logged, _ = reference
    root = tmp_path / "run dir"  # a space: the hint line quotes the path
    with _info_lines() as lines:
        _stopped_fit(root, SignalAt(signum, step, "train"))
    assert _saved_step(root) == step
    last = root / "ck" / "last.ckpt"
    # the stopped run logged every step up to the saved one (CSV step = optimizer step - 1) and the validations due
    stopped = _logged(root, "version_0")
    assert stopped["train/loss"] == {s: logged["train/loss"][s] for s in range(step)}
    assert stopped.get("val/loss", {}) == {s: logged["val/loss"][s] for s in logged["val/loss"] if s < step}
    if step < MAX_STEPS:
        _fit(root, ckpt_path=str(last))
    merged = _logged(root)
    assert sorted(merged["train/loss"]) == list(range(MAX_STEPS))
    assert sorted(merged["val/loss"]) == [7, 15]
    if step % 8 == 0:  # resumed at an epoch's start: the same batches as the uninterrupted fit (unshuffled data)
        assert merged["train/loss"] == pytest.approx(logged["train/loss"], rel=1e-6)
        assert merged["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    said = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    line = next(line for line in lines if line.startswith(f"{said} at step {step}: wrote "))
    assert _resume_path_in(line) == [str(last)]


def _assert_resumed_as_uninterrupted(root: Path, reference, resumed: ToyTask) -> None:
    """The stopped run (version_0) logged steps 0-7 and the step-8 validation (CSV step 7), the resumed one (version_1)
    steps 8-15 and the step-16 validation only (the step-8 one not run again, no step shifted); the weights are the
    uninterrupted fit's, bit for bit (stopped and resumed at an epoch's end: the same batches)."""
    logged, weights = reference
    stopped, after = _logged(root, "version_0"), _logged(root, "version_1")
    assert stopped["train/loss"] == {s: logged["train/loss"][s] for s in range(8)}
    assert stopped["val/loss"] == {7: logged["val/loss"][7]}
    assert after["train/loss"] == pytest.approx({s: logged["train/loss"][s] for s in range(8, 16)}, rel=1e-6)
    assert after["val/loss"] == pytest.approx({15: logged["val/loss"][15]}, rel=1e-6)
    for name, value in weights.items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_ctrl_c_during_validation_finishes_it_and_stops_at_the_step_it_follows(tmp_path, reference):
    """Before: a Ctrl-C during validation stopped right after that validation batch, so the validation was never logged
    (nor seen by a ModelCheckpoint or EarlyStopping), and the resume did not run it again: lost for good. (Before that,
    the fit validated on and trained one more step before it stopped.)"""
    root = tmp_path / "run dir"
    with _info_lines() as lines:
        _stopped_fit(root, SignalAt(signal.SIGINT, 8, "validation"))
    assert _saved_step(root) == 8
    line = next(line for line in lines if line.startswith("interrupted at step 8 during validation: wrote "))
    assert _resume_path_in(line) == [str(root / "ck" / "last.ckpt")]
    resumed = _fit(root, ckpt_path=str(root / "ck" / "last.ckpt"))
    _assert_resumed_as_uninterrupted(root, reference, resumed)


def _monitors(root: Path) -> list:
    """A ModelCheckpoint keeping the best val/loss and an EarlyStopping on it, listed before LastCheckpoint, as in the
    recipes."""
    return [ModelCheckpoint(dirpath=str(root / "best"), monitor="val/loss", mode="min", save_top_k=1),
            EarlyStopping(monitor="val/loss", mode="min", patience=5)]


def _monitor_state(root: Path, trainer: pl.Trainer) -> tuple:
    model_checkpoint, early_stopping = trainer.checkpoint_callback, trainer.early_stopping_callback
    return (Path(model_checkpoint.best_model_path).name, float(model_checkpoint.best_model_score),
            early_stopping.wait_count, float(early_stopping.best_score),
            sorted(p.name for p in (root / "best").iterdir()))


@pytest.mark.parametrize("where", ["train", "validation"])
def test_a_stop_at_an_epochs_end_keeps_the_validation_after_it_in_last_ckpt(tmp_path, reference, where):
    """Before: last.ckpt was written at the stopped step, before the validation due after it ran: that validation's
    ModelCheckpoint best and top-k file and EarlyStopping count were in no checkpoint, so the resumed fit took step 16
    for the best (step 8's file left behind, untracked) and counted no patience for step 8."""
    logged, _ = reference
    # by hand: val/loss rose from step 8 to step 16, so the best is step 8's and EarlyStopping waited once
    assert logged["val/loss"][15] > logged["val/loss"][7]
    expected = ("epoch=0-step=8.ckpt", pytest.approx(logged["val/loss"][7], rel=1e-6), 1,
                pytest.approx(logged["val/loss"][7], rel=1e-6), ["epoch=0-step=8.ckpt"])
    root = tmp_path / "run"
    _stopped_fit(root, SignalAt(signal.SIGINT, 8, where), _monitors(root))
    assert _saved_step(root) == 8
    resumed, trainer = _fit_trainer(root, _monitors(root), ckpt_path=str(root / "ck" / "last.ckpt"))
    assert _monitor_state(root, trainer) == expected
    _assert_resumed_as_uninterrupted(root, reference, resumed)


@pytest.mark.parametrize("where", ["validation", "train_end"])
def test_a_ctrl_c_after_the_last_training_step_ends_the_fit_as_an_interruption(tmp_path, where):
    """Before: a Ctrl-C during the fit's last validation (or its end-of-fit work) found no training batch to stop after:
    LastCheckpoint said "stopping after this optimizer step", the fit ended as a success (status 0), and a Python
    sweep or a shell loop went on to the next run."""
    root = tmp_path / "run"
    with _info_lines() as lines:
        _stopped_fit(root, SignalAt(signal.SIGINT, MAX_STEPS, where))
    assert _saved_step(root) == MAX_STEPS
    last = root / "ck" / "last.ckpt"
    said = f"wrote {last}" if where == "validation" else f"{last} holds it"  # the epoch's end saved it before
    assert any(line.startswith(f"interrupted at step {MAX_STEPS}") and said in line for line in lines), lines


def test_a_reused_last_checkpoint_warns_before_replacing_an_earlier_runs_file(tmp_path):
    """Before: a LastCheckpoint used again in a new Trainer (a notebook cell run again, a sweep that builds its
    callbacks once) replaced the earlier run's last.ckpt silently: it took the file for its own fit's."""
    callback = LastCheckpoint(dirpath=str(tmp_path / "ck"))

    def trainer(max_steps: int) -> pl.Trainer:
        return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          callbacks=[callback])

    first = trainer(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a first run, and the same Trainer fit further: nothing to say
        first.fit(ToyTask(BlockNet()), ToyData())
        first.fit_loop.epoch_loop.max_steps = 3
        first.fit(first.lightning_module, ToyData())
    with pytest.warns(UserWarning, match="holds an earlier run and this fit does not resume from it"):
        trainer(2).fit(ToyTask(BlockNet()), ToyData())
    assert pickle.loads(pickle.dumps(callback)).dirpath == callback.dirpath  # still pickles after a fit


def test_a_tilde_in_dirpath_is_the_home_folder(tmp_path, monkeypatch):
    """Before: ``LastCheckpoint(dirpath="~/runs/ck")`` wrote through AtomicCheckpointIO (the CLI's) to a folder named
    ``~`` in the current directory, where Lightning's ModelCheckpoint and loggers expand it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[LastCheckpoint(dirpath="~/runs/ck")], plugins=[AtomicCheckpointIO()])
    trainer.fit(ToyTask(BlockNet()), ToyData())
    assert (tmp_path / "home" / "runs" / "ck" / "last.ckpt").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("failing", ["mkstemp", "mkdir"])
def test_a_full_disk_while_creating_the_temporary_file_is_disk_full(tmp_path, monkeypatch, failing):
    """Before: ENOSPC from making the folder or the temporary file (no free inode; a directory that cannot grow) came
    out as a bare OSError (a traceback under the CLI), not the one-line DiskFullError."""
    target = tmp_path / "ck" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "mkstemp":
        monkeypatch.setattr(checkpointing.tempfile, "mkstemp", full)
    else:
        monkeypatch.setattr(checkpointing.Path, "mkdir", full)
    folder = re.escape(str(tmp_path / "ck"))
    with pytest.raises(DiskFullError, match=rf"no space left in '{folder}' .*any previous 'last\.ckpt' is intact"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("name", ["epoch=12-" + "val_acc=0.9312-" * 15 + "x" * 10 + ".ckpt",  # 254 bytes
                                  "検" * 81 + ".ckpt"])  # 248 bytes
def test_a_final_name_of_up_to_255_bytes_is_saved(tmp_path, monkeypatch, name):
    """Before: the temporary name ``.<name>.<8 random>.tmp`` was 14 bytes longer than the final one, so a legal name of
    242-255 bytes failed with "File name too long", where Lightning's own writer saves it."""
    assert 242 <= len(name.encode()) <= 255
    temporaries = []
    replace = os.replace

    def recording_replace(source, destination):
        temporaries.append(Path(source).name)
        replace(source, destination)

    monkeypatch.setattr(checkpointing.os, "replace", recording_replace)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / name)
    assert torch.load(tmp_path / name, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    [temporary] = temporaries
    assert len(temporary.encode()) <= 255
    assert fnmatch.fnmatch(temporary, ".*.ckpt.*.tmp")  # what LastCheckpoint clears as a stale write


def test_a_full_disk_while_creating_a_new_folder_is_disk_full(tmp_path, monkeypatch):
    """Before: ENOSPC from making a folder that did not exist yet (the first save of a new LastCheckpoint folder on a
    full disk) came out as a FileNotFoundError traceback: the free space was measured on the missing folder."""
    target = tmp_path / "new" / "ck" / "last.ckpt"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.Path, "mkdir", full)
    folder = re.escape(str(tmp_path / "new" / "ck"))
    with pytest.raises(DiskFullError, match=rf"no space left in '{folder}' \([0-9.]+ MiB free\)"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    assert list(tmp_path.iterdir()) == []


def test_a_remote_model_checkpoint_dirpath_puts_last_ckpt_in_the_default_root_dir(tmp_path, monkeypatch):
    """Before: LastCheckpoint made ``Path("memory://ck")``, the local folder ``memory:/ck``, and wrote last.ckpt there,
    in the working directory, while the ModelCheckpoint files went to the remote store."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    callback = LastCheckpoint()
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", max_steps=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[ModelCheckpoint(dirpath="memory://ck_r22"), callback])
    with _info_lines() as lines:
        trainer.fit(ToyTask(BlockNet()), ToyData())
    assert callback.path(trainer) == root / "checkpoints" / "last.ckpt"
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # no local 'memory:' folder
    assert [line for line in lines if "memory://ck_r22" in line and "is not local" in line]


@pytest.mark.parametrize("dirpath", ["s3://bucket/ck", "memory://ck"])
def test_a_remote_last_checkpoint_dirpath_is_refused(dirpath):
    """Before: accepted, and written to a local folder named ``s3:`` (or ``memory:``)."""
    with pytest.raises(ConfigError, match=re.escape(f"LastCheckpoint(dirpath='{dirpath}'): expected a local folder")):
        LastCheckpoint(dirpath=dirpath)


def test_a_stop_at_an_epochs_end_under_gradient_accumulation_resumes_as_the_uninterrupted_fit(tmp_path):
    """Before: as above (the step-4 validation's best file and EarlyStopping count were in no checkpoint). With two
    micro-batches a step, an epoch is 4 steps (validated after steps 4, 8, 12, 16): the stop at step 4 resumes with the
    uninterrupted fit's monitor state, logged values at the same steps, and weights."""
    uninterrupted, reference = tmp_path / "uninterrupted", tmp_path / "run"
    task, trainer = _fit_trainer(uninterrupted, _monitors(uninterrupted), accumulate_grad_batches=2)
    expected = _monitor_state(uninterrupted, trainer)
    _stopped_fit(reference, SignalAt(signal.SIGINT, 4, "train"), _monitors(reference), accumulate_grad_batches=2)
    assert _saved_step(reference) == 4
    resumed, trainer = _fit_trainer(reference, _monitors(reference), str(reference / "ck" / "last.ckpt"),
                                    accumulate_grad_batches=2)
    assert _monitor_state(reference, trainer) == expected
    logged, after = _logged(uninterrupted), _logged(reference, "version_1")
    assert after["train/loss"] == pytest.approx({s: logged["train/loss"][s] for s in range(4, 16)}, rel=1e-6)
    assert after["val/loss"] == pytest.approx({s: logged["val/loss"][s] for s in (7, 11, 15)}, rel=1e-6)
    for name, value in task.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_remote_root_with_a_local_model_checkpoint_dirpath_is_no_refusal(tmp_path):
    # Round 22's first remote check refused a remote default_root_dir before looking at a local ModelCheckpoint's.
    callback = LastCheckpoint()
    trainer = pl.Trainer(default_root_dir="memory://root_r22", accelerator="cpu", logger=False,
                         enable_progress_bar=False, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ck")), callback])
    assert callback.path(trainer) == tmp_path / "ck" / "last.ckpt"


def test_a_stop_at_an_epochs_end_without_validation_keeps_the_epoch_ends_work_in_last_ckpt(tmp_path):
    """Before: with no validation after the stop, last.ckpt lacked what the epoch's end did after it (ModelCheckpoint's
    save at the train epoch's end, EarlyStopping's check): the resumed fit left a second top-k file and another
    EarlyStopping count than the uninterrupted fit's."""

    def fit(root: Path, callbacks: list = (), ckpt_path: str | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        monitors = [ModelCheckpoint(dirpath=str(root / "best"), monitor="train/loss", save_top_k=1, filename="{step}"),
                    EarlyStopping(monitor="train/loss", mode="max", patience=10)]
        trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=3, logger=False, limit_val_batches=0,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*callbacks, *monitors, LastCheckpoint(dirpath=str(root / "ck"))])
        trainer.fit(ToyTask(BlockNet()), ToyData(), ckpt_path=ckpt_path)
        return trainer

    def state(root: Path, trainer: pl.Trainer) -> tuple:
        early_stopping = trainer.early_stopping_callback
        return sorted(p.name for p in (root / "best").iterdir()), float(early_stopping.best_score), early_stopping.wait_count

    uninterrupted = fit(tmp_path / "a")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit(tmp_path / "b", [SignalAt(signal.SIGINT, 8, "train")])  # epoch 0's last step
    finally:
        signal.signal(signal.SIGINT, sigint)
    resumed = fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "ck" / "last.ckpt"))
    assert state(tmp_path / "b", resumed) == state(tmp_path / "a", uninterrupted)


def test_a_sigterm_during_validation_resumes_by_running_that_validation_again(tmp_path, reference):
    """Before: the SIGTERM save inside validation recorded the validation as one batch done, so the resume skipped the
    rest of it: an epoch-end EarlyStopping check then found no ``val/loss`` (a RuntimeError traceback), and without one
    the step-8 validation was lost for good. Now the resume runs it from its first batch: every row and callback state
    as the uninterrupted fit's, and the val loop's totals as after an uninterrupted validation (else the checkpoints
    written until the next validation would read as "stopped mid-validation")."""
    logged, weights = reference
    root = tmp_path / "run"
    _stopped_fit(root, SignalAt(signal.SIGTERM, 8, "validation"), _monitors(root))
    assert _saved_step(root) == 8
    assert "val/loss" not in _logged(root, "version_0")  # the stop came before the validation's end
    resumed, trainer = _fit_trainer(root, _monitors(root), ckpt_path=str(root / "ck" / "last.ckpt"))
    assert trainer.global_step == MAX_STEPS
    assert _logged(root)["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert _logged(root, "version_1")["train/loss"] == pytest.approx(
        {s: logged["train/loss"][s] for s in range(8, 16)}, rel=1e-6)
    for name, value in weights.items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # by hand: val/loss rose from step 8 to step 16, so EarlyStopping waited once and the best is step 8's
    assert trainer.early_stopping_callback.wait_count == 1
    assert Path(trainer.checkpoint_callback.best_model_path).name == "epoch=0-step=8.ckpt"
    best = torch.load(root / "best" / "epoch=0-step=8.ckpt", map_location="cpu", weights_only=True)
    totals = best["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]  # saved at the rerun's end
    assert totals == {"ready": 2, "started": 2, "processed": 2, "completed": 2}  # the validation's 2 batches


def test_a_sigterm_in_the_validation_after_the_last_step_lets_it_finish(tmp_path, reference):
    """Before: the SIGTERM save after the fit's last step marked the validation for a rerun that no resume makes (the
    fit is done at max_steps): the final val/loss and ModelCheckpoint's step-16 file were lost. Now that validation
    finishes, as after a Ctrl-C, and the fit ends as an interruption."""
    logged, _ = reference
    root = tmp_path / "run"
    with _info_lines() as lines:
        _stopped_fit(root, SignalAt(signal.SIGTERM, MAX_STEPS, "validation"), _monitors(root))
    assert _saved_step(root) == MAX_STEPS
    assert _logged(root, "version_0")["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert sorted(p.name for p in (root / "best").iterdir()) == ["epoch=0-step=8.ckpt"]  # val/loss rose at step 16
    assert any(line.startswith(f"stopped by SIGTERM at step {MAX_STEPS} during the validation after the last step, "
                               "which finishes first: wrote ") for line in lines)  # written at once, and again after


def test_a_sigterm_in_the_validation_after_a_periodic_save_is_run_again_by_the_resume(tmp_path, reference):
    """Before: last.ckpt already held the step (``every_n_train_steps``), so the SIGTERM inside the validation wrote
    nothing and no rerun was marked: the step-8 val/loss was lost and the best file became step 16's."""
    logged, _ = reference

    def fit(callbacks: list, ckpt_path: str | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        trainer = _trainer(root, callbacks)
        next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint)).every_n_train_steps = 8
        trainer.fit(ToyTask(BlockNet()), ToyData(), ckpt_path=ckpt_path)
        return trainer

    root = tmp_path / "run"
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit([SignalAt(signal.SIGTERM, 8, "validation"), *_monitors(root)])
    finally:
        signal.signal(signal.SIGINT, sigint)
    resumed = fit(_monitors(root), ckpt_path=str(root / "ck" / "last.ckpt"))
    assert _logged(root)["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert Path(resumed.checkpoint_callback.best_model_path).name == "epoch=0-step=8.ckpt"


def test_a_sigterm_in_the_last_validation_with_ema_keeps_the_trained_weights_in_last_ckpt(tmp_path, reference):
    """Before: last.ckpt was written once more as the fit ended, after EMAWeightAveraging's on_train_end had copied
    its average over the weights (Lightning runs Checkpoint callbacks last): a resume trained on from the average."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    _, weights = reference  # EMA leaves the trained weights alone: the uninterrupted fit's
    root = tmp_path / "run"
    _stopped_fit(root, SignalAt(signal.SIGTERM, MAX_STEPS, "validation"), [EMAWeightAveraging(decay=0.5)])
    saved = torch.load(root / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == MAX_STEPS
    for name, value in weights.items():
        assert torch.equal(saved["current_model_state"][name], value), name


def test_a_sigterm_in_the_validation_after_the_last_epoch_lets_it_finish(tmp_path, reference):
    """Before: a fit limited by max_epochs (not max_steps) saved inside that validation for a rerun, which the resume
    logged alone at the stopped step (a report then took it for a validate run and left it out)."""
    logged, _ = reference
    root = tmp_path / "run"
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            pl.seed_everything(0, verbose=False)
            trainer = _trainer(root, [SignalAt(signal.SIGTERM, MAX_STEPS, "validation")])
            trainer.fit_loop.epoch_loop.max_steps, trainer.fit_loop.max_epochs = -1, 2
            trainer.fit(ToyTask(BlockNet()), ToyData())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert _logged(root, "version_0")["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
