"""Round 28's review findings on the round's own changes: the fused specs made once per settings, a -0.0 threshold
beside 0.0, and a triton blocked in ``sys.modules`` read as absent."""

from __future__ import annotations

import sys

import numpy as np
import torch

from lightning_act._triton import triton_import_problem
from lightning_act.stats.fused import fused_statistics, moment_spec, zero_spec


def test_thresholds_given_as_tensors_each_count_at_their_own_value() -> None:
    # a 0-d tensor's repr rounds to four decimals: a cache keyed on it gave the first threshold's spec to the second
    x = torch.linspace(0.0, 1.0, 100_001, dtype=torch.float64)
    for threshold in (0.50001, 0.50004):
        spec = zero_spec(torch.tensor(threshold, dtype=torch.float64))
        stats = fused_statistics(x, spec, "torch")
        expected = int((np.abs(x.numpy()) <= threshold).sum())
        assert spec.thresholds == (threshold,)
        assert stats.at_most(threshold).item() == expected


def test_a_negative_zero_threshold_beside_zero_reads_the_same_count() -> None:
    # ActivationSparsity(threshold=-0.0) beside ActivationStats(zero_threshold=0.0): the union kept one zero and the
    # other's lookup raised KeyError 'at_most:-0.0' at the first due step
    x = torch.tensor([[0.0, -0.0, 1.0, -2.0, 0.0]])
    stats = fused_statistics(x, zero_spec(-0.0).union(moment_spec(0.0)), "torch")
    assert stats.at_most(-0.0).item() == stats.at_most(0.0).item() == 3


def test_a_triton_blocked_in_sys_modules_is_absent_not_broken(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    triton_import_problem.cache_clear()
    try:
        assert triton_import_problem() is None
    finally:
        triton_import_problem.cache_clear()


def test_only_timms_attention_has_its_dropout_flag_set_for_the_passes() -> None:
    # review R5: any module with a `fused_attn` attribute was put in training mode, whatever else its forward reads
    # the flag for (a functional batch norm ran its training branch in the EigenScore passes)
    import timm
    from torch import nn

    from lightning_act.callbacks.sensitive import _applies_child_dropout

    class OwnAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused_attn = True
            self.attn_drop = nn.Dropout(0.3)

    class KeepsTimmsForward(type(timm.create_model("vit_tiny_patch16_224", depth=1).blocks[0].attn)):
        pass  # a user's subclass keeping timm's forward (R6): its flag is set too

    own = OwnAttention()
    subclass = KeepsTimmsForward(24, num_heads=2, attn_drop=0.3)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                            attn_drop_rate=0.3, num_classes=2)
    attention = vit.blocks[0].attn
    active = {id(own.attn_drop), id(attention.attn_drop), id(subclass.attn_drop)}
    assert _applies_child_dropout(attention, active)
    assert _applies_child_dropout(subclass, active)
    assert not _applies_child_dropout(own, active)


def test_every_rank_takes_rank_zeros_decision_on_the_passes(monkeypatch) -> None:
    # review R5: a rank dropping its identical passes alone left the broadcasts of the passes unpaired (gloo aborted)
    import lightning_act.callbacks.sensitive as sensitive

    def rank_zero_said_yes(tensor: torch.Tensor, src: int) -> None:
        assert src == 0
        tensor.fill_(1.0)

    monkeypatch.setattr(sensitive, "distributed_world_size", lambda: 2)
    monkeypatch.setattr(sensitive.dist, "broadcast", rank_zero_said_yes)
    assert sensitive.SensitiveNeurons._rank_zeros(False, torch.device("cpu")) is True


def _fit_with_last_checkpoint(tmp_path, task, *callbacks) -> None:
    from _toy import ToyData, quiet_trainer

    from lightning_act.checkpointing import LastCheckpoint

    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=True,
                            callbacks=[LastCheckpoint(dirpath=str(tmp_path / "ck")), *callbacks])
    trainer.fit(task, ToyData(batch_size=8, n=32))


def test_a_fit_failing_after_training_leaves_sigterms_handler_as_it_was(tmp_path) -> None:
    # review R4: an exception between LastCheckpoint's on_train_end and Lightning's teardown left the end-of-fit cut in
    # the table Lightning's teardown puts back: installed for good, a later SIGTERM raised KeyboardInterrupt
    import signal

    import pytest
    from _toy import BlockNet, ToyTask

    class FailingAtTheEnd(ToyTask):
        def on_train_end(self) -> None:
            raise ValueError("user code failed at the end of training")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="failed at the end"):
        _fit_with_last_checkpoint(tmp_path, FailingAtTheEnd(BlockNet()))
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_users_own_sigterm_handler_runs_in_the_end_of_fit_work(tmp_path) -> None:
    # review R4: the cut replaced whatever handler Lightning put back, the user's own too
    import signal

    import lightning.pytorch as pl
    from _toy import BlockNet, ToyTask

    def users_handler(signum, frame) -> None:  # noqa: ANN001 - a signal handler
        pass

    seen = []

    class SeeHandler(pl.Callback):
        def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen.append(signal.getsignal(signal.SIGTERM))

    previous = signal.signal(signal.SIGTERM, users_handler)
    try:
        _fit_with_last_checkpoint(tmp_path, ToyTask(BlockNet()), SeeHandler())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [users_handler]


def test_the_atomic_csv_logger_reads_a_save_dir_under_home_and_as_a_file_url(tmp_path, monkeypatch) -> None:
    # review R4: the rewrite opened the path as given, while Lightning's writes go through fsspec: '~/runs' and
    # 'file://...' failed at the first new column
    import csv

    from lightning_act.loggers import AtomicCSVLogger

    monkeypatch.setenv("HOME", str(tmp_path))
    for save_dir in ("~/runs", f"file://{tmp_path}/url"):
        logger = AtomicCSVLogger(save_dir=save_dir, name="csv")
        logger.log_metrics({"a": 1.0}, step=0)
        logger.save()
        logger.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # a new column: the header rewrite
        logger.save()
        folder = (tmp_path / "runs") if save_dir.startswith("~") else (tmp_path / "url")
        with open(folder / "csv" / "version_0" / "metrics.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert [(row["a"], row["b"]) for row in rows] == [("1.0", ""), ("2.0", "3.0")]


def test_a_write_refused_in_its_folder_names_the_file_not_its_temporary(tmp_path) -> None:
    # review R4: the line named written_whole's hidden temporary, removed by then
    import errno

    import pytest

    from lightning_act._files import written_whole

    target = tmp_path / "config.yaml"
    with pytest.raises(OSError) as raised, written_whole(target) as partial:
        raise PermissionError(errno.EACCES, "Permission denied", str(partial))
    assert raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_style_wrapper_keeping_the_weight_continues_the_trajectory() -> None:
    # review R7: a wrapper exposing its base layer's weight as a property held "none of its parameters" (only
    # _parameters was read): the trajectory restarted with a false message
    from test_collapse_r28 import AtEpoch1, fit, logged, numpy_r90
    from torch import nn

    class Wrapped(nn.Module):  # like peft's LoraLayer: the base layer kept, its weight exposed
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base_layer = base

        @property
        def weight(self) -> torch.Tensor:
            return self.base_layer.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base_layer(x)

    def wrap(module: nn.Module) -> None:
        module.net.blocks[1].fc = Wrapped(module.net.blocks[1].fc)

    monitor, snapshots, said = fit([AtEpoch1(wrap)])
    assert not said
    assert logged(monitor) == {step: numpy_r90([snapshots.rows[k] for k in range(-1, step + 1)]) for step in range(12)}


def test_the_atomic_csv_logger_reads_a_file_colon_save_dir(tmp_path) -> None:
    # review R7: fsspec also strips 'file:' without '//'
    from lightning_act.loggers import AtomicCSVLogger

    logger = AtomicCSVLogger(save_dir=f"file:{tmp_path}", name="csv")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    logger.save()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines() == ["a,b,step", "1.0,,0",
                                                                                        "2.0,3.0,1"]


def test_an_os_error_naming_no_path_passes_through_a_whole_write(tmp_path) -> None:
    # review R7: an OSError whose filename is a descriptor became a TypeError
    import errno

    import pytest

    from lightning_act._files import written_whole

    with pytest.raises(OSError) as raised, written_whole(tmp_path / "file.txt"):
        raise OSError(errno.EBADF, "Bad file descriptor", 987654)
    assert raised.value.errno == errno.EBADF
