"""Checkpoints that survive faults: atomic writes, a ``last.ckpt`` kept current, a checked resume.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target folder,
  flushes and fsyncs it, then renames it over the final name, so a kill or a full disk never
  leaves a truncated file under a final name; a full disk is one line naming the folder and the
  space left.
- :class:`LastCheckpoint` refreshes ``last.ckpt`` at the end of every training epoch (and every
  ``every_n_train_steps`` if set), whatever a monitored metric does, and on Ctrl-C stops at the
  next optimizer step (or after the validation in progress) with ``last.ckpt`` written there; a one-process fit's
  checkpoints hold the random-number states, so that a resume draws what the uninterrupted fit would have.
- :func:`check_resume_checkpoint` refuses, in one line, a file that is not a Lightning checkpoint,
  a checkpoint of another LightningModule than the one configured, and a weights-only one to resume a fit.

``lightning_act fit`` installs the first two in every run (see ``lightning_act.cli``); in Python,
pass ``Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastCheckpoint()])``.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_act._files import fsync_folder
from lightning_act.errors import CheckpointMismatchError, ConfigError, DiskFullError, NotACheckpointError
from lightning_act.lightning_classes import lightning_classes

LAST_NAME = "last.ckpt"
_RERUNS_VALIDATION = "lightning_act_reruns_validation"  # written by a SIGTERM inside validation
_RNG_STATES = "lightning_act_rng_states"  # a one-process fit's random-number states (a list of one)

_WEIGHTS_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("weights_from_checkpoint", default=False)


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Models built in this block get every weight from a Lightning checkpoint next (``load_from_checkpoint``, or a
    ``--ckpt_path`` the CLI hands to the Trainer): a constructor may skip reading initial weights from another file
    (see :func:`restoring_from_checkpoint`)."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def restoring_from_checkpoint() -> bool:
    """Whether the model being built now gets its weights from a Lightning checkpoint (:func:`weights_from_checkpoint`)."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are all-or-nothing (temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec's transaction
            return
        target = Path(path)
        temporary = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() gives, as Lightning's writer
            os.replace(temporary, target)
        except BaseException as err:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            if _is_disk_full(err):
                free = shutil.disk_usage(_nearest_existing(target.parent)).free  # the folder may not exist yet
                raise DiskFullError(
                    f"no space left in '{target.parent}' ({_mib(free)} free) while writing checkpoint "
                    f"'{target.name}'; free some space or point the checkpoint dirpath elsewhere "
                    f"(any previous '{target.name}' is intact)"
                ) from None
            raise
        fsync_folder(target.parent)


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent: the file system whose free space a failed ``mkdir`` lacked."""
    return next(f for f in [folder, *folder.parents] if f.exists())


def _temporary_prefix(target: Path) -> str:
    """``.<stem>.ckpt.``, the stem cut to 200 bytes: a final name of up to 255 bytes is legal, and the temporary one
    (+ 8 random characters and ``.tmp``) must fit too; ``LastCheckpoint`` clears stale ones by ``.*.ckpt.*.tmp``."""
    stem = target.stem.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{stem}.ckpt."


def _umask() -> int:
    """The process's umask (only readable by setting it; set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_disk_full(err: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when torch's zip writer re-raises it as a RuntimeError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, RuntimeError) and "No space left on device" in str(err)


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current so a killed or interrupted fit can resume.

    Written at the end of every training epoch, every ``every_n_train_steps`` optimizer steps when
    that is > 0, and at Ctrl-C: the first SIGINT asks the fit to stop after the optimizer step in
    progress (so the weights are never half-updated, and under gradient accumulation no micro-batch's
    gradients are lost), writes ``last.ckpt`` there and ends the fit as an interrupt at the next batch's start (or
    the fit's end), once Lightning has logged that step and run the validation due after it: ``last.ckpt`` is written
    again at that validation's end and as the fit ends, so that it holds the validation's effects too
    (``ModelCheckpoint``'s best and top-k, ``EarlyStopping``'s count) and the resume starts after both; one during
    validation (single process) lets the validation finish, writes ``last.ckpt`` at its end (the step it follows)
    and ends the fit as above (under several processes wherever it lands); one after the last training
    step ends the fit as an interrupt too; a second SIGINT stops at once without a checkpoint. List a
    ``ModelCheckpoint`` before this callback (as the recipes do, and the CLI puts this one last): Lightning runs the
    ``Checkpoint`` callbacks last, in their listed order, so a ``ModelCheckpoint`` listed after it would record that
    validation only after ``last.ckpt`` was written. SIGTERM (``kill``, ``docker stop``, a scheduler) does what the
    first SIGINT does (it used to end the fit after the batch as a success, without a checkpoint); one before training
    starts (during the sanity check) ends the fit there as an interruption, without a checkpoint (nothing was trained
    yet); one that arrives while the fit validates writes ``last.ckpt`` at the step the validation follows, an EMA's
    average where any other save puts it, and stops there, its resume running that validation again from the first
    batch (with this callback in the resuming Trainer, as the CLI has it: without it Lightning reruns it too, but the
    checkpoints written before the next validation read as stopped inside one); one in the validation after the fit's
    last step, which no resume would run, lets it finish as a Ctrl-C does (single process; Lightning would end the fit
    after the validation batch, before any training hook); one inside a gradient-accumulation window ends the fit
    there as an interruption (exit status 1) without a checkpoint of it. Every write follows a batch that took an
    optimizer step. One in the end-of-fit work after the last step (the monitors' ``on_fit_end``: heatmaps, emergence
    fits, ``monitors/skipped.json``; Lightning runs it after putting SIGTERM's default handler back, which killed the
    process without a word) cuts that work as an interruption, a Ctrl-C there too (with ``on_interrupt``), and says
    so in one line: a resume from ``last.ckpt`` finds the fit done and runs only that work.

    A fit that does not resume warns, once, when ``last.ckpt`` of an earlier run is already there (also one this
    callback wrote for another Trainer; a further fit of the same Trainer continues its run): the first save
    replaces it. In Python, Lightning's ``fit(ckpt_path="last")`` looks among ``ModelCheckpoint`` files only and
    starts from scratch; pass the file itself, ``fit(ckpt_path=<dirpath>/last.ckpt)``. ``best_model_path`` is the
    Trainer's first ``ModelCheckpoint``'s (``""`` without one), so ``validate/test(ckpt_path="best")`` works
    whatever the order of the callbacks (Lightning asks the first ``Checkpoint`` callback). A
    ``ModelCheckpoint(save_last="link")`` in the folder of ``last.ckpt`` is refused in one line: its link would
    replace ``last.ckpt`` by its top-k file, often an older step (``save_last=True`` copies its newest save).

    Every checkpoint of a one-process fit with this callback holds the random-number states (torch's, the GPU's,
    numpy's and Python's), set again as the resumed training starts: from a checkpoint at an epoch's end, the resumed
    fit draws the uninterrupted one's dropout masks, shuffles and augmentations (on CPU its weights are the
    uninterrupted fit's bit for bit, where the loader draws nothing in the main process at its first batch: a
    ``shuffle=True`` order or an augmentation with ``num_workers=0`` is drawn there, before the states are set
    back). Under several processes none are saved (said once): every rank's would need a collective at each save. A
    checkpoint written without them resumes from the current seed.

    Args:
        dirpath: local folder of ``last.ckpt`` (``~`` is the home folder); by default the ``dirpath`` of the Trainer's
            first ``ModelCheckpoint`` if local, else ``<default_root_dir>/checkpoints`` (said once for a remote one).
        every_n_train_steps: also write every this many optimizer steps (0: epoch ends only).
        on_interrupt: handle Ctrl-C as above (only in the main thread; with several processes the
            ranks agree on the stop with one boolean all-reduce per step and per validation, so all save the
            same step).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0, on_interrupt: bool = True) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(f"LastCheckpoint(every_n_train_steps={every_n_train_steps}): expected an integer >= 0")
        if dirpath is not None and not _is_local_file_protocol(dirpath):
            raise ConfigError(f"LastCheckpoint(dirpath='{dirpath}'): expected a local folder (its writes and "
                              "stale-file cleanup use local paths); give a local dirpath, or leave it out")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.on_interrupt = on_interrupt
        self._stop_requested = False
        self._stop_agreed = False
        self._stop_saved = False  # last.ckpt written at the stop's step: the fit ends once it is logged and validated
        self._changed_after_stop = False  # a validation or epoch end ran since: last.ckpt is written again at the end
        self._change_unsaved = False  # one that no save since holds (the epoch end's)
        self._previous_handler: Any = None
        self._end_work_handlers: dict[int, Any] = {}  # the handlers the end-of-fit work's cut replaced
        self._end_work_table: dict[int, Any] = {}  # Lightning's table of the handlers its teardown puts back
        self._end_work_cut_by: int | None = None  # the signal that cut the end-of-fit work
        self._last_saved_step = -1
        self._step_at_batch_start = -1
        self._best_source: Any = None  # the Trainer's first ModelCheckpoint, for best_model_path
        self._best_path = ""  # best_model_path where there is no such source (the main process of ddp_spawn)
        # the last.ckpt this callback wrote, and for which Trainer (not an earlier run's)
        self._wrote: tuple[Path, weakref.ref[pl.Trainer]] | None = None
        self._told_remote = False  # the fallback from a remote ModelCheckpoint dirpath is said once
        self._saving_mid_validation = False  # the SIGTERM save inside validation: its resume reruns the validation
        self._reruns_validation = False  # resumed from such a save: the val loop's totals are mended at its start
        # this process's random-number states where the stop's validation or epoch end left them: the final save at the
        # next batch's start records them, as that batch's fetch (a new epoch's loader iterator) has drawn from them
        self._rng_after_stop_change: dict[str, Any] = {}
        self._resumed_random_states: dict[str, Any] | None = None  # this rank's, from the checkpoint a fit resumes
        # the states after the resumed fit's first train loader iterator drew from them, and that iterator
        self._after_first_iterator: tuple[dict[str, Any], Any] | None = None
        # the training batches of its epoch the resumed checkpoint's fit had done, and whether that was the epoch's last
        self._resumed_batches_in_epoch: tuple[int, bool] = (0, False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_wrote"] = None  # a weak reference does not pickle; a copy continues no fit of its own
        return state

    @property
    def best_model_path(self) -> str:
        """The best checkpoint of the Trainer's first ``ModelCheckpoint`` (``""`` without one): Lightning reads it from
        ``trainer.checkpoint_callback``, the first ``Checkpoint`` callback, which may be this one."""
        return self._best_source.best_model_path if self._best_source is not None else self._best_path

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        # Lightning's spawn launcher sets it in the main process, where no setup ran: kept here then
        if self._best_source is not None:
            self._best_source.best_model_path = value
        else:
            self._best_path = value

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model_checkpoint = lightning_classes("callbacks.ModelCheckpoint")
        self._best_source = next((c for c in trainer.callbacks if isinstance(c, model_checkpoint)), None)
        self._resumed_random_states = self._after_first_iterator = None  # not those of a resume that ended early
        self._resumed_batches_in_epoch = (0, False)
        if stage == "fit":
            self._refuse_a_linking_model_checkpoint(trainer)

    def _refuse_a_linking_model_checkpoint(self, trainer: pl.Trainer) -> None:
        """One line where a ``ModelCheckpoint(save_last="link")`` shares ``last.ckpt``'s folder: at each of its checks it
        replaces ``last.ckpt`` by a link to its newest top-k file, often an older step than this callback's save, and a
        kill then resumed from there (round 25; ``save_last=True`` copies its newest save, which is no older)."""
        target = self.path(trainer)
        for callback in trainer.callbacks:
            if (isinstance(callback, lightning_classes("callbacks.ModelCheckpoint")) and callback.save_last == "link"
                    and callback.dirpath is not None and _is_local_file_protocol(callback.dirpath)
                    and Path(callback.dirpath).expanduser().resolve() == target.parent.resolve()):
                raise ConfigError(
                    f"ModelCheckpoint(save_last='link') shares {target.parent} with LastCheckpoint: its link would "
                    f"replace {target.name} with its top-k file, often an older step; pass save_last=True (a copy) or "
                    "give LastCheckpoint another dirpath"
                )

    def path(self, trainer: pl.Trainer) -> Path:
        """Where ``last.ckpt`` goes for this trainer."""
        if self.dirpath is not None:
            return Path(self.dirpath).expanduser() / LAST_NAME  # as Lightning's ModelCheckpoint reads its dirpath
        fallback = Path(trainer.default_root_dir) / "checkpoints" / LAST_NAME
        for callback in trainer.callbacks:
            if isinstance(callback, lightning_classes("callbacks.ModelCheckpoint")) and callback.dirpath is not None:
                if _is_local_file_protocol(callback.dirpath):
                    return Path(callback.dirpath) / LAST_NAME
                # a pathlib.Path of 's3://b/ck' is the local folder 's3:/b/ck': the file would land on the wrong storage
                self._refuse_remote_root(trainer)
                if not self._told_remote:
                    self._told_remote = True
                    rank_zero_info(f"LastCheckpoint: the ModelCheckpoint dirpath '{callback.dirpath}' is not local, so "
                                   f"last.ckpt goes to {fallback}; give LastCheckpoint(dirpath=...) to choose")
                return fallback
        self._refuse_remote_root(trainer)
        return fallback

    @staticmethod
    def _refuse_remote_root(trainer: pl.Trainer) -> None:
        """The fallback ``<default_root_dir>/checkpoints`` is a local folder: a remote root cannot hold it."""
        if not _is_local_file_protocol(trainer.default_root_dir):
            raise ConfigError(f"LastCheckpoint: default_root_dir '{trainer.default_root_dir}' is not local, and "
                              "last.ckpt is written to a local folder; give LastCheckpoint(dirpath=<a local folder>)")

    def save(self, trainer: pl.Trainer) -> Path | None:
        """Write ``last.ckpt`` now (every rank must call this); not under ``fast_dev_run``, which writes nothing."""
        if trainer.fast_dev_run:
            return None
        target = self.path(trainer)
        trainer.save_checkpoint(target, weights_only=False)
        self._last_saved_step = trainer.global_step
        self._wrote = (target, weakref.ref(trainer))
        return target

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            rank_zero_info("LastCheckpoint: under several processes the checkpoints hold no random-number states, so a "
                           "resume draws other dropout masks and shuffles than this fit would")
        self._stop_requested = self._stop_agreed = False
        self._stop_saved = self._changed_after_stop = self._change_unsaved = False
        self._warn_epoch_restarts(trainer)
        if self._resumed_random_states is not None:
            # The train loader's iterator Lightning made before this hook drew its seeds (a shuffle's, the workers')
            # from the restored states, as the uninterrupted fit's epoch did; by the checkpoint's loop state Lightning
            # either trains from it or makes another at the epoch's start, which must draw from them too: set again,
            # and the first batch's start sets those after the first iterator where it is still in use.
            fetcher = trainer.fit_loop._data_fetcher
            self._after_first_iterator = (_random_states(trainer.strategy.root_device),
                                          getattr(fetcher, "iterator", None))
            _set_random_states(self._resumed_random_states, trainer.strategy.root_device)
            self._resumed_random_states = None
        if self._stop_now(trainer):  # a SIGTERM after the sanity check's batches, or with none (on any rank: all end)
            self._end_fit_before_training(trainer)
        self._last_saved_step = trainer.global_step  # a resumed fit's checkpoint holds this step already
        target = self.path(trainer)
        # a further fit of the same Trainer continues the run whose last.ckpt this is; a new Trainer starts another
        continues_own_run = self._wrote is not None and self._wrote[0] == target and self._wrote[1]() is trainer
        if trainer.ckpt_path is None and not trainer.fast_dev_run and not continues_own_run and target.is_file():
            rank_zero_warn(
                f"LastCheckpoint: {target} holds an earlier run and this fit does not resume from it, so the first save "
                f"replaces it; to resume, pass fit(ckpt_path='{target}') (Lightning's ckpt_path='last' finds "
                "ModelCheckpoint files only), or give LastCheckpoint(dirpath=...) another folder"
            )
        if trainer.is_global_zero:  # what a kill in the middle of an earlier write left behind, of any checkpoint
            folders = {self.path(trainer).parent}
            folders |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks
                        if getattr(c, "dirpath", None) and _is_local_file_protocol(c.dirpath)}
            for stale in (file for folder in folders for file in folder.glob(".*.ckpt.*.tmp")):
                stale.unlink(missing_ok=True)
        if self.on_interrupt and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _warn_epoch_restarts(self, trainer: pl.Trainer) -> None:
        """Say how a fit resumed from a checkpoint written inside an epoch trains on that epoch's data where
        Lightning does not say it. Lightning restarts the epoch (``epoch_loop.restarting``, from the checkpoint's loop
        state: its epoch unfinished, or a ``max_steps`` fit) on the train loader's first batches where the loader does
        not record its position (not ``_Stateful``); its own warning counts optimizer steps, so a manual optimization
        with two optimizer steps per batch (a GAN's critic and model) or a checkpoint before an accumulation window's
        step passed silently, and a loader without a length (an ``IterableDataset``) always. An epoch the checkpoint's
        fit ended inside (``max_steps``, ``should_stop``) counts as finished: the resume starts the next one, without
        the batches left in it. Nothing is said of a checkpoint written at its epoch's last batch, whatever the new
        fit's loader length (the old count against a new length read as a cut epoch)."""
        (done, at_epoch_end), self._resumed_batches_in_epoch = self._resumed_batches_in_epoch, (0, False)
        batches = trainer.num_training_batches
        loader = trainer.fit_loop._combined_loader
        if done == 0 or at_epoch_end or done >= batches or loader is None:
            return
        of_batches = f"{done} of its epoch's {batches}" if not math.isinf(batches) else f"{done} of its epoch's"
        if not trainer.fit_loop.epoch_loop.restarting:
            rank_zero_warn(
                f"LastCheckpoint: the checkpoint's fit ended after {of_batches} training batches (max_steps, or "
                "should_stop as EarlyStopping's) and Lightning counts that epoch finished, so the resumed fit starts "
                "the next epoch and never trains on the batches left in that one; a fit that ends at an epoch's end "
                "continues exactly"
            )
            return
        if all(isinstance(flat, _Stateful) for flat in loader.flattened):
            return
        if math.isinf(batches):
            replayed = "trains on the loader's batches from its first again, to its end (its length is unknown)"
        elif trainer.global_step % math.ceil(batches / trainer.accumulate_grad_batches) != 0:
            return  # Lightning warns that the loader is not resumable
        else:
            replayed = "trains on its first batches again for the batches left in it"
        rank_zero_warn(
            f"LastCheckpoint: the checkpoint was written after {of_batches} training batches and the train loader "
            f"does not record its position (no state_dict/load_state_dict), so the resumed epoch {replayed}; resume "
            "from an end-of-epoch checkpoint to continue exactly"
        )

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop at once
            self._restore_handler()
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: stopping after this optimizer step (and the validation due after it) or this validation, "
              "and writing last.ckpt (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _end_fit(self) -> None:
        """End the fit as an interruption: Lightning's handler exits with status 1 (the CLI and a Python sweep stop)."""
        self._restore_handler()
        raise KeyboardInterrupt

    def _end_fit_before_training(self, trainer: pl.Trainer) -> None:
        """End the fit as an interruption for a SIGTERM that came before the first training batch (during the sanity
        check): Lightning ended it with exit status 0, as a finished run, so a shell loop or a scheduler did not requeue
        it, where a Ctrl-C there exits with 1. Nothing was trained since the fit or its resume began: no checkpoint."""
        resume = f"; resume with --ckpt_path {shlex.quote(str(trainer.ckpt_path))}" if trainer.ckpt_path else ""
        rank_zero_info(f"stopped by SIGTERM before training started (step {trainer.global_step}): nothing was trained, "
                       f"so no checkpoint was written{resume}")
        self._end_fit()

    def _save_at_batch_start(self, trainer: pl.Trainer) -> None:
        """After a validation that followed the stop's save, write ``last.ckpt`` once more, at the same step, as the
        fit ends at the next batch's start: with that validation's effects and what the epoch's end did after it (the
        callbacks' state: ``ModelCheckpoint``'s best and top-k file, ``EarlyStopping``'s count), so that the resume
        neither runs it again nor lacks them. Saved with the batch counts Lightning's loops have at the stopped batch's
        end, which its resume continues from: the batch fetched for this start not ready, the stopped one not completed
        (else the resume validated one batch early under ``check_val_every_n_epoch=None``, whose intervals count the
        fit's batches), and the logger step count one less where the stopped batch stepped, as the resume then adds
        one (else it logged every step one late)."""
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress
        for counts in (progress.total, progress.current):
            counts.ready -= 1
            counts.completed -= 1  # at an epoch's start -1: the resume's completion of the stopped batch makes it 0
        counted = int(not epoch_loop._should_accumulate())  # as the resume decides it, from the same counts
        epoch_loop._batches_that_stepped -= counted
        try:
            with _random_states_as(self._rng_after_stop_change, trainer.strategy.root_device):
                self.save(trainer)
        finally:
            epoch_loop._batches_that_stepped += counted
            for counts in (progress.total, progress.current):
                counts.ready += 1
                counts.completed += 1

    def _save_at_stop(self, trainer: pl.Trainer, always: bool = False) -> str | None:
        """Write ``last.ckpt`` at this step unless it holds it already (``always``: also then); what to tell the user
        (``None``: nothing written, under ``fast_dev_run``)."""
        if always or trainer.global_step != self._last_saved_step:
            target = self.save(trainer)
            if target is None:
                return None
            said = f"wrote {target}"
        else:
            target = self.path(trainer)
            said = f"{target} holds it"
        return f"{said}; resume with --ckpt_path {shlex.quote(str(target))}"

    def _stop_now(self, trainer: pl.Trainer) -> bool:
        # SIGTERM (kill, docker stop, a scheduler's preemption) as the first Ctrl-C: Lightning stops after the batch,
        # and the work since the last checkpoint would be lost
        requested = self._stop_requested or trainer.received_sigterm
        if trainer.world_size > 1:  # every rank stops at the same step, or the save would deadlock
            return bool(trainer.strategy.reduce_boolean_decision(requested, all=False))
        return requested

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._after_first_iterator is not None:  # the resumed fit's first batch (see on_train_start)
            states, first_iterator = self._after_first_iterator
            self._after_first_iterator = None
            fetcher = trainer.fit_loop._data_fetcher
            if first_iterator is not None and getattr(fetcher, "iterator", None) is first_iterator:
                _set_random_states(states, trainer.strategy.root_device)
        if self._stop_saved:  # the stopped step is saved, logged and validated: no further batch
            if self._changed_after_stop:
                self._save_at_batch_start(trainer)
            self._end_fit()
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every rank runs the same batches, so all agree on the stop at the same batch and then skip the collective
        self._stop_agreed = self._stop_agreed or self._stop_now(trainer)
        if trainer.global_step == self._step_at_batch_start:  # a micro-batch of an accumulation window
            if trainer.received_sigterm and trainer.world_size == 1:
                # Lightning raises SIGTERMException after this micro-batch, before the window's optimizer step, and
                # ends the fit with exit status 0: a checkpoint now would lose the window's gradients, so none is
                # written, but the fit ends as an interruption (status 1) so that a scheduler requeues it
                target = self.path(trainer)
                held = f"{target} holds the last save" if target.is_file() else "no last.ckpt was written yet"
                rank_zero_info(f"stopped by SIGTERM inside a gradient-accumulation window at step "
                               f"{trainer.global_step}: no checkpoint of it (its micro-batches' gradients would be lost); "
                               f"{held}")
                self._end_fit()
            return  # its gradients are in no checkpoint
        if self._stop_agreed:
            # Saved now, with the weights of this step; the fit ends at the next batch's start (or the fit's end), after
            # Lightning has logged this step's metrics and run the validation due after it: a stop raised here lost
            # both for good, as the resume starts after them.
            how = "stopped by SIGTERM" if trainer.received_sigterm else "interrupted"
            said = self._save_at_stop(trainer)
            if said is not None:
                rank_zero_info(f"{how} at step {trainer.global_step}: {said}")
            self._stop_saved = True
            # taken over: Lightning would end the fit at its own check after the validation, with an exception that
            # is no interruption (a traceback under the CLI) and before the epoch's end
            trainer._signal_connector.received_sigterm = False
            return
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            if trainer.global_step != self._last_saved_step:
                self.save(trainer)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # A SIGTERM while the fit validates stops after this batch (Lightning raises SIGTERMException after it or after
        # the validation, before any training hook of this callback runs again: a grace period may not last the
        # validation); a Ctrl-C lets the validation finish (on_validation_end). The weights are those of the step the
        # validation follows, unless that batch was a micro-batch of an accumulation window (its gradients would be
        # lost: left to Lightning). Single process only: with several, the ranks would have to agree at each batch.
        # A stop saved at the step this validation follows lets it finish: it is logged, then the fit ends.
        # One in the sanity check ends the fit at once, on any number of processes (nothing to save): Lightning would
        # raise SIGTERMException after this batch, a successful exit.
        if trainer.sanity_checking and trainer.received_sigterm:
            self._end_fit_before_training(trainer)
        if (not trainer.received_sigterm or self._stop_saved or not self._validates_in_fit(trainer)
                or trainer.world_size > 1 or trainer.global_step == self._step_at_batch_start):
            return
        if _validates_after_the_last_step(trainer):
            # The validation after the fit's last step: a resume would find the fit done and never run it again, so it
            # finishes (taken over from Lightning, which would end the fit after this batch), and last.ckpt is written
            # at its end with its effects and as the fit ends; written now as well, in case the grace period ends
            # first (marked for a rerun, for a resume that trains on with a higher limit).
            trainer._signal_connector.received_sigterm = False
            self._saving_mid_validation = True
            try:
                with _trained_weights_swapped_in(trainer, pl_module):
                    said = self._save_at_stop(trainer, always=True)
            finally:
                self._saving_mid_validation = False
            if said is not None:
                rank_zero_info(f"stopped by SIGTERM at step {trainer.global_step} during the validation after the "
                               f"last step, which finishes first: {said}")
            self._stop_saved = True
            return
        _swap_trained_weights_in(trainer, pl_module)
        self._saving_mid_validation = True
        try:  # written even where last.ckpt holds this step (every_n_train_steps): only this one marks the rerun
            said = self._save_at_stop(trainer, always=True)
        finally:
            self._saving_mid_validation = False
        if said is not None:
            rank_zero_info(f"stopped by SIGTERM at step {trainer.global_step} during validation: {said}")
        self._end_fit()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The random-number states, so that a resume draws the dropout masks, shuffles and augmentations the
        # uninterrupted fit would have drawn; one process's only: every rank's would need a collective at each save,
        # and a save on one rank (OnExceptionCheckpoint after an error there) then hung before writing anything
        if trainer.world_size == 1:
            checkpoint[_RNG_STATES] = [_random_states(trainer.strategy.root_device)]
        # A save inside validation records the validation as begun and not one batch done, the state Lightning's own
        # resume reruns a validation from (its "restarted mid-evaluation"), from the first batch: as saved, the resume
        # skipped the rest of it, and an epoch-end EarlyStopping check then found no metric (a crash); from the batch
        # reached it would have logged the mean of the remaining batches alone.
        if not self._saving_mid_validation:
            return
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
        done_before = progress["total"]["completed"] - progress["current"]["completed"]
        progress["total"] = {"ready": done_before + 1, "started": done_before + 1,
                             "processed": done_before, "completed": done_before}
        progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        progress["is_last_batch"] = False
        checkpoint[_RERUNS_VALIDATION] = True

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._reruns_validation = bool(checkpoint.get(_RERUNS_VALIDATION, False))
        if trainer.state.fn == TrainerFn.FITTING:
            self._resumed_batches_in_epoch = _batches_done_in_epoch(checkpoint)
        # Set now, before the fit makes its train loader's iterator, and again as the training starts (on_train_start).
        # A checkpoint written before these states were saved holds none: the streams go on from the current seed.
        states = checkpoint.get(_RNG_STATES)
        if states is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if len(states) == trainer.world_size:
            self._resumed_random_states = states[trainer.global_rank]
            _set_random_states(self._resumed_random_states, trainer.strategy.root_device)
        else:
            rank_zero_info(f"LastCheckpoint: the checkpoint holds the random-number states of {len(states)} processes "
                           f"and this fit runs {trainer.world_size}, so they are not restored: the random streams "
                           "(dropout, shuffling) restart differently from the saved fit's")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The rerun has begun (Lightning decided it from the saved counts): its loop's totals as before an
        # uninterrupted validation. Lightning's restart leaves the begun batch counted as ready and started, which the
        # checkpoints written until the next validation (ModelCheckpoint's at this one's end, the epoch end's) would
        # carry as "stopped mid-validation": their resume would run this validation a second time.
        if self._reruns_validation and self._validates_in_fit(trainer):
            self._reruns_validation = False
            total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
            total.ready = total.started = total.completed

    def _stop_agreed_in_validation(self, trainer: pl.Trainer) -> bool:
        """A Ctrl-C during this validation, on any rank: under several processes one boolean all-reduce per
        validation, so that all stop at the step the validation follows (else at the next optimizer step, inside the
        next epoch at an epoch's end, whose first batches the resume would then replay)."""
        if trainer.world_size == 1 or not self.on_interrupt:
            return self._stop_requested
        return bool(trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False))

    @staticmethod
    def _validates_in_fit(trainer: pl.Trainer) -> bool:
        """A fit's validation, not its sanity check (which follows no training step)."""
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a stop saved at the step this validation follows, and after a Ctrl-C during it (under several
        # processes on any rank: the ranks agree here), last.ckpt is written now, with the validation's
        # effects (the callbacks listed before this one have seen it), in case the fit is killed before it ends; the
        # fit then ends at the next training batch's start or at its end, where it is written once more (a resume
        # from this one finds no metric for an epoch-end EarlyStopping check). WeightAveraging swapped the trained
        # weights back in at the validation epoch's end.
        if not self._validates_in_fit(trainer):
            return
        if self._stop_saved:
            self._changed_after_stop = True
            self._rng_after_stop_change = _random_states(trainer.strategy.root_device)
            self.save(trainer)
            self._change_unsaved = False
        elif (trainer.global_step != self._step_at_batch_start  # else: stopped at the window's optimizer step
              and self._stop_agreed_in_validation(trainer)):
            target = self.save(trainer)
            if target is not None:
                rank_zero_info(f"interrupted at step {trainer.global_step} during validation: wrote {target}; resume "
                               f"with --ckpt_path {shlex.quote(str(target))}")
            self._stop_saved = self._changed_after_stop = True
            self._rng_after_stop_change = _random_states(trainer.strategy.root_device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            # A rank-0-only progress bar (TQDM's) computes the epoch's metrics, a collective for a torchmetrics value,
            # on rank 0 alone; computing them here on every rank pairs it before the save's barrier (else: deadlock).
            _ = trainer.progress_bar_metrics
        if trainer.global_step != self._last_saved_step:
            self.save(trainer)
        elif self._stop_saved:  # the epoch's end after the stop (ModelCheckpoint's save, EarlyStopping's check)
            self._changed_after_stop = self._change_unsaved = True
            self._rng_after_stop_change = _random_states(trainer.strategy.root_device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a stop that found no next batch (the fit's last step) or came after the last training step (a Ctrl-C during
        # the fit's last validation under several processes, or during the end-of-fit work) still ends the fit as an
        # interruption: a Python sweep or a shell loop stops, as without this callback
        if self._stop_requested and not self._stop_saved:
            said = self._save_at_stop(trainer)
            if said is not None:
                rank_zero_info(f"interrupted at step {trainer.global_step}: {said}")
        # with the epoch end's effects (as _save_at_batch_start) where the validation's end has not saved since; not
        # after a WeightAveraging, whose on_train_end (run before this callback's) put its average in the module's
        # weights: saved, a resume would train on from the average
        if self._change_unsaved and not _averages_weights(trainer):
            self.save(trainer)
        if self._stop_saved and trainer.should_stop and not _at_a_limit(trainer):  # EarlyStopping ended it after the stop
            rank_zero_info(f"the fit ended at step {trainer.global_step} (should_stop, e.g. EarlyStopping) after the "
                           f"stop: {self.path(trainer)} holds its end; a resume from it would train past that end")
        if self._stop_saved or self._stop_requested:
            self._end_fit()
        self._restore_handler()
        self._handle_signals_in_end_of_fit_work(trainer)

    def _handle_signals_in_end_of_fit_work(self, trainer: pl.Trainer) -> None:
        """SIGTERM (and Ctrl-C, with ``on_interrupt``) in the end-of-fit work — the monitors' ``on_fit_end`` (heatmaps,
        the emergence fit, ``monitors/skipped.json``) and the teardown hooks — cut it as an interruption and say so
        (:meth:`on_exception`). Lightning runs that work after its teardown has put back the handlers of the fit's
        start (SIGTERM's default: the process died without a word, the work lost); the handler is put among those it
        puts back, and the ones it replaced again at this callback's ``teardown``. Its writers are all-or-nothing."""
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning's private table of the handlers its teardown puts back (none in a version without it: then only
        # until that teardown)
        put_back = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", {})
        self._end_work_cut_by = None
        self._end_work_table = put_back
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum in (signal.SIGTERM, signal.SIGINT) if self.on_interrupt else (signal.SIGTERM,):
            previous = put_back.get(signum)
            previous = previous if previous is not None else signal.getsignal(signum)
            if previous is not defaults[signum]:  # the user's own handler runs there, as before
                continue
            self._end_work_handlers[signum] = previous
            signal.signal(signum, self._cut_end_of_fit_work)
            if signum in put_back:
                put_back[signum] = self._cut_end_of_fit_work

    def _cut_end_of_fit_work(self, signum: int, frame: FrameType | None) -> None:
        self._end_work_cut_by = signum
        self._restore_end_of_fit_handlers()  # a second signal does what it did before
        raise KeyboardInterrupt  # Lightning's interrupt: on_exception, then exit status 1

    def _restore_end_of_fit_handlers(self) -> None:
        """The handlers the cut replaced, in the process and in Lightning's table of those its teardown puts back (an
        exception before that teardown left the cut in the table: installed for good, it broke later fits' SIGTERM)."""
        for signum, handler in self._end_work_handlers.items():
            signal.signal(signum, handler)
            if self._end_work_table.get(signum) == self._cut_end_of_fit_work:
                self._end_work_table[signum] = handler
        self._end_work_handlers = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_end_of_fit_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        self._restore_end_of_fit_handlers()
        if self._end_work_cut_by is not None:
            how = "stopped by SIGTERM" if self._end_work_cut_by == signal.SIGTERM else "interrupted"
            self._end_work_cut_by = None
            target = self.path(trainer)
            if not (target.is_file() and self._last_saved_step == trainer.global_step):
                rerun = "no checkpoint holds this step to run it again from"
            elif _at_a_limit(trainer):
                rerun = (f"resume with --ckpt_path {shlex.quote(str(target))} to write them (the fit is done: only "
                         "that work runs, into a new log version)")
            else:  # EarlyStopping or max_time ended it: the checkpoint does not hold that stop, a resume trains on
                rerun = (f"a resume from {shlex.quote(str(target))} would train on (the fit stopped before its "
                         "max_steps/max_epochs), so only a fit to that limit writes them")
            rank_zero_info(f"{how} during the end-of-fit work after the fit's last step ({trainer.global_step}): what "
                           f"the callbacks' on_fit_end had not written (the monitors' plots, emergence fits and "
                           f"monitors/skipped.json) is missing; {rerun}")


def _batches_done_in_epoch(checkpoint: dict[str, Any]) -> tuple[int, bool]:
    """The training batches of its epoch a checkpoint's fit had run (Lightning's batch progress, whose ``completed``
    lags one behind for a save at a batch's end), and whether the last of them was the epoch's last."""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        return int(progress["current"]["processed"]), bool(progress.get("is_last_batch", False))
    except (KeyError, TypeError, AttributeError):
        return 0, False


def _random_states(device: torch.device) -> dict[str, Any]:
    """This process's random-number states: torch's (and ``device``'s where it is a GPU), numpy's and Python's, in
    types a ``weights_only`` load accepts (numpy's key as a tensor)."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gaussian)}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set the states :func:`_random_states` took (a GPU's where this process runs on one and they hold it)."""
    torch.set_rng_state(states["torch"])
    version, internal, gaussian = states["python"]
    random.setstate((version, tuple(internal), gaussian))
    kind, key, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@contextmanager
def _random_states_as(states: dict[str, Any], device: torch.device) -> Iterator[None]:
    """The random-number states set to ``states`` in this block, and back after."""
    current = _random_states(device)
    _set_random_states(states, device)
    try:
        yield
    finally:
        _set_random_states(current, device)


def _validates_after_the_last_step(trainer: pl.Trainer) -> bool:
    """Whether the fit's validation follows its last training step (``max_steps`` reached, or the last batch of the
    ``max_epochs``-th epoch)."""
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    return 0 <= trainer.max_steps <= trainer.global_step or (
        last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _averages_weights(trainer: pl.Trainer) -> bool:
    """Whether a ``WeightAveraging`` callback (EMA, SWA) is in the fit: it copies its average into the model as the
    fit ends."""
    return any(isinstance(c, lightning_classes("callbacks.WeightAveraging")) for c in trainer.callbacks)


def _at_a_limit(trainer: pl.Trainer) -> bool:
    """Whether the fit has reached ``max_steps`` or ``max_epochs``: a resume from its end trains no further."""
    max_epochs = trainer.max_epochs
    return 0 <= trainer.max_steps <= trainer.global_step or (
        max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs)


@contextmanager
def _trained_weights_swapped_in(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """The trained weights in the module for a save inside a validation that goes on: swapped in
    (:func:`_swap_trained_weights_in`), and the average back after (``WeightAveraging`` swaps alike)."""
    _swap_trained_weights_in(trainer, pl_module)
    try:
        yield
    finally:
        _swap_trained_weights_in(trainer, pl_module)


def _swap_trained_weights_in(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The trained weights back in the module, as at the validation's end, before a SIGTERM ends the fit from inside
    validation: Lightning's ``WeightAveraging`` (EMA) swaps its average in for validation, and its
    ``on_save_checkpoint`` takes the module's tensors as the weights to train on and its averaged copy as the average.
    Left swapped, the ``last.ckpt`` save, and any save after the interrupt (``OnExceptionCheckpoint``, a
    ``trainer.save_checkpoint``), stored them the wrong way round (a resume trained on from the average). The fit
    does not validate on, so nothing swaps them in again: the module is left as after a SIGTERM during training."""
    for callback in trainer.callbacks:
        if isinstance(callback, lightning_classes("callbacks.WeightAveraging")):
            callback.on_validation_epoch_end(trainer, pl_module)


def _not_a_checkpoint(path: str | os.PathLike[str]) -> NotACheckpointError:
    with open(path, "rb") as handle:
        is_zip = handle.read(2) == b"PK"  # torch.save writes a zip archive
    what = "a damaged or truncated checkpoint" if is_zip else "not a PyTorch checkpoint"
    return NotACheckpointError(
        f"--ckpt_path '{path}' is {what} ({Path(path).stat().st_size} bytes, unreadable); "
        "pass a .ckpt written by Lightning (last.ckpt is rewritten whole at each save)"
    )


def check_resume_checkpoint(path: str | os.PathLike[str], expected_class_path: str | None, fit: bool = False) -> None:
    """Refuse, in one line, a file that is not a Lightning checkpoint or one of another model, and for a ``fit`` one
    that holds the weights only (Lightning fails on it with a traceback, after the run's logs were started).

    ``expected_class_path`` is the configured LightningModule's ``class_path``; the checkpoint's is
    the ``_class_path`` that LightningCLI records in its ``hyper_parameters``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            return  # a valid file holding more than tensors; Lightning's own loader decides
        raise _not_a_checkpoint(path) from None
    except Exception:  # a zip reader or mmap error: a truncated or foreign file
        raise _not_a_checkpoint(path) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise NotACheckpointError(
            f"--ckpt_path '{path}' is a PyTorch file but not a Lightning checkpoint (no 'state_dict'); pass a .ckpt "
            "written by Lightning"
        )
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if expected_class_path and saved and saved != expected_class_path:
        raise CheckpointMismatchError(
            f"--ckpt_path '{path}' holds a {saved}, but the config builds a {expected_class_path}; "
            "pass a checkpoint of this model, or the config the checkpoint was trained with"
        )
    if fit and "optimizer_states" not in checkpoint:  # what ModelCheckpoint(save_weights_only=True) leaves out
        raise ConfigError(
            f"--ckpt_path '{path}' holds the weights only (save_weights_only=True), so a fit cannot resume from it; "
            "pass the run's last.ckpt to resume, or use this file with validate, test or predict"
        )
