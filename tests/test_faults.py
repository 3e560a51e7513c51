"""Fault injection: SIGKILL and Ctrl-C mid-fit, a full disk, a kill mid-write, truncated checkpoints.

The default run holds the quick cases (one SIGKILL at a random step, one Ctrl-C, the rest
in-process); ``-m slow`` adds repeated random kills.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_fit import fit
from lightning_act.callbacks.base import ActivationMonitor
from lightning_act.checkpointing import AtomicCheckpointIO, check_resume_checkpoint
from lightning_act.errors import CheckpointMismatchError, DiskFullError, NotACheckpointError

HERE = Path(__file__).resolve().parent
MAX_STEPS = 16


def histories(trainer) -> dict[str, dict[str, list]]:
    """``{monitor: {key: steps}}`` and the values, from the monitors' saved state."""
    out = {}
    for callback in trainer.callbacks:
        if isinstance(callback, ActivationMonitor):
            out[type(callback).__name__] = {k: (s.steps, s.values) for k, s in callback.history.items()}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return histories(fit(tmp_path_factory.mktemp("reference"), MAX_STEPS))


def start(root: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, str(HERE / "fault_fit.py"), str(root), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(root: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (root / f"step_{step}").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the fit never reached the step"
        time.sleep(0.05)


def assert_continues(resumed: dict, reference: dict, resumed_from: int) -> None:
    assert resumed.keys() == reference.keys() and resumed
    for monitor, keys in reference.items():
        assert resumed[monitor].keys() == keys.keys(), monitor
        for key, (steps, values) in keys.items():
            got_steps, got_values = resumed[monitor][key]
            assert got_steps == steps, f"{monitor} {key}: a gap or a duplicate after resuming"
            before = [i for i, s in enumerate(steps) if s < resumed_from]
            assert [got_values[i] for i in before] == pytest.approx([values[i] for i in before], nan_ok=True)


def test_sigkill_at_a_random_step_then_resume_keeps_histories_continuous(tmp_path, reference):
    kill_at = random.Random().randint(2, MAX_STEPS - 4)
    proc = start(tmp_path, str(MAX_STEPS), "--delay", "0.2")
    wait_for_step(tmp_path, kill_at, proc)
    time.sleep(random.Random().uniform(0.0, 0.3))  # anywhere in the step, a checkpoint write included
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_step >= kill_at - 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith(".tmp")] == ["last.ckpt"]
    resumed = fit(tmp_path, MAX_STEPS, ckpt_path=str(last))
    assert resumed.global_step == MAX_STEPS
    assert_continues(histories(resumed), reference, saved_step)


# SIGTERM (kill, docker stop, a scheduler's preemption) ended the fit after the batch with status 0 and no checkpoint.
@pytest.mark.parametrize(("signum", "said"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_writes_last_ckpt_at_the_stop_and_resumes(tmp_path, reference, signum, said):
    proc = start(tmp_path, str(MAX_STEPS), "--delay", "0.3", "--every_n_train_steps", "0")
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    reached = max(int(p.name.split("_")[1]) for p in tmp_path.glob("step_*"))
    assert 3 <= saved_step == reached < MAX_STEPS  # written at the stop, not at an epoch end
    assert f"{said} at step {saved_step}: wrote {last}" in stderr
    resumed = fit(tmp_path, MAX_STEPS, ckpt_path=str(last))
    assert_continues(histories(resumed), reference, saved_step)


def test_ctrl_c_under_gradient_accumulation_writes_last_ckpt_after_a_whole_optimizer_step(tmp_path):
    # The Ctrl-C lands in the delay after batch 5, the first micro-batch of step 2's window (accumulation 2). Before,
    # last.ckpt was written right there: batch 5's gradients were in no checkpoint, and the resumed run took step 2
    # on batch 6 alone. Now the fit goes on to the end of batch 6, which takes step 2.
    proc = start(tmp_path, str(MAX_STEPS), "--delay", "0.3", "--every_n_train_steps", "0", "--accumulate", "2")
    while not (tmp_path / "batch_5").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    processed = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert (checkpoint["global_step"], processed) == (3, 6)


def _enospc_after_some_bytes(obj, stream, *args, **kwargs):
    stream.write(b"PK" + b"\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", _enospc_after_some_bytes)
    with pytest.raises(DiskFullError) as raised:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    message = str(raised.value)
    assert "\n" not in message and f"no space left in '{tmp_path}'" in message and "MiB free" in message
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_full_disk_during_fit_reaches_the_cli_as_disk_full(tmp_path, monkeypatch):
    from lightning_act.cli import _user_error

    monkeypatch.setattr(torch, "save", _enospc_after_some_bytes)
    with pytest.raises(Exception) as raised:
        fit(tmp_path, 2)
    assert isinstance(_user_error(raised.value), DiskFullError)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert not list((tmp_path / "checkpoints").glob("*"))


def test_kill_during_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_random_and_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "good.ckpt"
    own = "lightning_act.tasks.image_classification.ImageClassifier"
    torch.save({"state_dict": {"w": torch.randn(2000)}, "hyper_parameters": {"_class_path": own}}, path)
    check_resume_checkpoint(path, own)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 20):
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        with pytest.raises(NotACheckpointError, match="damaged or truncated"):
            check_resume_checkpoint(tmp_path / "cut.ckpt", own)
    (tmp_path / "noise.ckpt").write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(NotACheckpointError, match="not a PyTorch checkpoint"):
        check_resume_checkpoint(tmp_path / "noise.ckpt", own)
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(NotACheckpointError, match="not a Lightning checkpoint"):
        check_resume_checkpoint(tmp_path / "plain.pt", own)
    other = "lightning_act.tasks.spectral_detection.SpectralTargetDetection"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": other}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match=f"holds a {other}, but the config builds a {own}"):
        check_resume_checkpoint(tmp_path / "other.ckpt", own)


@pytest.mark.slow
def test_repeated_sigkills_then_resume_keep_histories_continuous(tmp_path, reference):
    rng = random.Random()
    last = tmp_path / "checkpoints" / "last.ckpt"
    first_resume = None  # a mid-epoch resume restarts the (non-resumable) loader: values match up to here
    for _ in range(3):
        extra = ["--ckpt_path", str(last)] if last.exists() else []
        reached = torch.load(last, weights_only=False)["global_step"] if last.exists() else 0
        if reached >= MAX_STEPS - 2:
            break
        proc = start(tmp_path, str(MAX_STEPS), "--delay", "0.1", *extra)
        wait_for_step(tmp_path, rng.randint(reached + 1, MAX_STEPS - 2), proc)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if first_resume is None:
            first_resume = torch.load(last, weights_only=False)["global_step"]
    resumed = fit(tmp_path, MAX_STEPS, ckpt_path=str(last))
    assert_continues(histories(resumed), reference, first_resume)


# --- LastCheckpoint beside Lightning's entry points (r19) ---------------------------------------------------------

def _toy_trainer(root: Path, callbacks: list, **overrides) -> "pl.Trainer":
    import lightning.pytorch as pl

    settings = dict(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])
    return pl.Trainer(**{**settings, **overrides}, callbacks=callbacks)


def test_best_ckpt_path_finds_the_model_checkpoints_best_whatever_the_callback_order(tmp_path):
    """Before: Lightning asks ``trainer.checkpoint_callback`` (the first ``Checkpoint`` callback) for the best file,
    and with LastCheckpoint listed first (or alone) that was an AttributeError: no ``best_model_path``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from _toy import BlockNet, ToyData, ToyTask
    from lightning_act.checkpointing import LastCheckpoint

    pl.seed_everything(0, verbose=False)
    best = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/loss", filename="{step}")
    trainer = _toy_trainer(tmp_path, [LastCheckpoint(dirpath=str(tmp_path / "ck")), best], max_steps=8,
                           limit_val_batches=2)
    trainer.fit(ToyTask(BlockNet()), ToyData())  # 64 samples in batches of 8: one epoch, validated at step 8
    trainer.validate(datamodule=ToyData(), ckpt_path="best", verbose=False)
    assert Path(trainer.ckpt_path) == tmp_path / "ck" / "step=8.ckpt"
    trainer.validate(datamodule=ToyData(), verbose=False)  # no model after a fit: Lightning takes "best" too
    assert Path(trainer.ckpt_path) == tmp_path / "ck" / "step=8.ckpt"

    alone = _toy_trainer(tmp_path / "alone", [LastCheckpoint(dirpath=str(tmp_path / "alone"))], max_steps=2,
                         limit_val_batches=1)
    alone.fit(ToyTask(BlockNet()), ToyData())
    with pytest.raises(ValueError, match="not configured to save the best model"):  # Lightning's own line
        alone.validate(datamodule=ToyData(), ckpt_path="best", verbose=False)
    # ddp_spawn's main process, where no setup ran: the launcher sets the workers' best path on it (was dropped)
    unset = LastCheckpoint()
    unset.best_model_path = str(tmp_path / "ck" / "step=8.ckpt")
    assert unset.best_model_path == str(tmp_path / "ck" / "step=8.ckpt")


def test_sigterm_inside_an_accumulation_window_ends_the_fit_as_an_interruption(tmp_path, capsys):
    """Before: Lightning raised SIGTERMException after the micro-batch, before the window's optimizer step, and the
    fit ended with exit status 0 and no word: a scheduler took the preempted run for a finished one."""
    import lightning.pytorch as pl

    from _toy import BlockNet, ToyData, ToyTask
    from lightning_act.checkpointing import LastCheckpoint

    class Task(ToyTask):
        def training_step(self, batch, batch_idx):
            if batch_idx == 4:  # the first micro-batch of step 2's window (accumulate_grad_batches=2)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch, batch_idx)

    sigint = signal.getsignal(signal.SIGINT)
    try:
        pl.seed_everything(0, verbose=False)
        trainer = _toy_trainer(tmp_path, [LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1)], max_epochs=1,
                               accumulate_grad_batches=2, limit_val_batches=0)
        with pytest.raises(SystemExit) as stopped:
            trainer.fit(Task(BlockNet()), ToyData())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert stopped.value.code == 1
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    assert trainer.global_step == 2


def _signalled_during_validation(signum):
    """A ToyTask that sends itself ``signum`` in its first validation batch, once."""
    from _toy import BlockNet, ToyTask

    class Task(ToyTask):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 0 and self.signum is not None:
                os.kill(os.getpid(), self.signum)  # a scheduler's preemption lands while the fit validates
                self.signum = None
            return super().validation_step(batch, batch_idx)

    task = Task(BlockNet())
    task.signum = signum
    return task


def test_sigterm_during_validation_writes_last_ckpt_at_the_step_and_resumes_to_the_same_weights(tmp_path):
    """Before: Lightning ended the fit with SIGTERMException after the validation batch, before LastCheckpoint's
    training hooks ran again: no last.ckpt, the epoch's 8 optimizer steps lost."""
    import lightning.pytorch as pl

    from _toy import BlockNet, ToyData, ToyTask
    from lightning_act.checkpointing import LastCheckpoint

    sigint = signal.getsignal(signal.SIGINT)
    try:
        pl.seed_everything(0, verbose=False)
        stopped = _toy_trainer(tmp_path / "a", [LastCheckpoint(dirpath=str(tmp_path / "a"))], max_epochs=2,
                               limit_val_batches=2)
        with pytest.raises(SystemExit):  # Lightning ends an interrupted fit so
            stopped.fit(_signalled_during_validation(signal.SIGTERM), ToyData())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning leaves SIGINT ignored after an interrupt
    last = tmp_path / "a" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8  # the epoch's 64 samples in batches of 8, validated after step 8

    resumed = _toy_trainer(tmp_path / "a", [LastCheckpoint(dirpath=str(tmp_path / "a"))], max_epochs=2,
                           limit_val_batches=2)
    resumed_task = ToyTask(BlockNet())
    resumed.fit(resumed_task, ToyData(), ckpt_path=str(last))
    pl.seed_everything(0, verbose=False)
    straight_task = ToyTask(BlockNet())
    straight = _toy_trainer(tmp_path / "b", [], max_epochs=2, limit_val_batches=2, enable_checkpointing=False)
    straight.fit(straight_task, ToyData())
    assert resumed.global_step == straight.global_step == 16
    for name, value in straight_task.state_dict().items():
        assert torch.equal(resumed_task.state_dict()[name], value), name


def test_a_fit_that_does_not_resume_warns_before_replacing_an_earlier_runs_last_ckpt(tmp_path):
    """Before: in Python, ``fit(ckpt_path="last")`` with LastCheckpoint alone (Lightning's "last" looks among
    ModelCheckpoint files only) started from step 0 with Lightning's "no last checkpoint" warning and replaced the
    earlier run's last.ckpt without a word about it."""
    import warnings

    from _toy import BlockNet, ToyData, ToyTask
    from lightning_act.checkpointing import LastCheckpoint

    def trainer(steps):
        return _toy_trainer(tmp_path, [LastCheckpoint(dirpath=str(tmp_path / "ck"))], max_steps=steps,
                            limit_val_batches=0)

    first = trainer(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a first run, and the same run fit further: nothing to say
        first.fit(ToyTask(BlockNet()), ToyData())
        first.fit_loop.epoch_loop.max_steps = 6
        first.fit(first.lightning_module, ToyData())
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LastCheckpoint")  # raised: the fit stops where it warns
        with pytest.raises(UserWarning, match=rf"LastCheckpoint: {last} holds an earlier run .* pass "
                                              rf"fit\(ckpt_path='{last}'\)"):
            trainer(8).fit(ToyTask(BlockNet()), ToyData(), ckpt_path="last")
    assert torch.load(last, weights_only=True)["global_step"] == 6  # warned before the first save replaced it
    # what it says to do resumes: the step continues from the file's, 4 more batches to max_steps 10
    import lightning.pytorch as pl

    class CountBatches(pl.Callback):
        batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

    counted = CountBatches()
    third = _toy_trainer(tmp_path, [LastCheckpoint(dirpath=str(tmp_path / "ck")), counted], max_steps=10,
                         limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LastCheckpoint")  # resuming: nothing to say
        third.fit(ToyTask(BlockNet()), ToyData(), ckpt_path=str(last))
    assert (counted.batches, third.global_step) == (4, 10)
