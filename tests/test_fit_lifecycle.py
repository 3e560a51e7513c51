"""The monitors across Lightning's entry points and loop hooks: steps that observe nothing, early epoch ends, several
validation loaders, ``trainer.test(ckpt_path=...)`` after a fit, and one callback object serving several fits.
Values are checked against numpy on activations the tests record with their own hooks."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer, toy_loader
from torch import nn
from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations, SensitiveNeurons


def all_four(every=1):
    return [
        ActivationSparsity(every_n_steps=every), MassiveActivations(every_n_steps=every),
        DimensionalCollapse(every_n_steps=every), SensitiveNeurons(every_n_steps=every, num_samples=8, eigenscore_passes=0),
    ]


def history_steps(monitor):
    return {key: list(series.steps) for key, series in monitor.history.items()}


class SkipsFirstBatch(ToyTask):
    """Lightning's documented skip: ``training_step`` returns None, here before any forward, on the first (due) step."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 0 else super().training_step(batch, batch_idx)


def test_a_first_due_step_that_observes_nothing_logs_nothing_and_the_fit_goes_on():
    # Before: ActivationSparsity and MassiveActivations died with "stack expects a non-empty TensorList".
    monitors = [ActivationSparsity(every_n_steps=2), MassiveActivations(every_n_steps=2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, callbacks=monitors).fit(SkipsFirstBatch(BlockNet()), toy_loader())
    # Lightning still counts the skipped batch as step 0, in which no forward ran: nothing logged then, one warning
    for monitor in monitors:
        assert monitor.history and all(steps == [2] for steps in history_steps(monitor).values())
        said = [w for w in caught if f"{type(monitor).__name__}: net.blocks.0" in str(w.message)]
        assert len(said) == 1 and "produced no activation at step 0" in str(said[0].message)


class EndsEpochEarly(ToyTask):
    """``on_train_batch_start`` returns -1 (end the epoch now) at batch 2, then its epoch end runs one more forward."""

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.current_epoch == 0 and batch_idx == 2 else None

    def on_train_epoch_end(self):
        with torch.no_grad():
            self(torch.full((4, 1, 16, 16), 50.0))  # huge: would dominate top1 if it were counted


class TrainingForwards(Callback):
    """|block output| maxima of every training-step forward, per global step (its own hook)."""

    def __init__(self):
        self.top1, self.step = {}, None

    def setup(self, trainer, pl_module, stage):
        def keep(module, args, out):
            if self.step is not None:
                self.top1[self.step] = max(self.top1.get(self.step, 0.0), float(out.detach().abs().max()))
        pl_module.net.blocks[0].register_forward_hook(keep)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.step = None


def test_an_epoch_ended_by_on_train_batch_start_does_not_count_the_epoch_end_forwards():
    torch.manual_seed(0)
    recorder, massive = TrainingForwards(), MassiveActivations(modules=["net.blocks.0"], every_n_steps=1)
    quiet_trainer(max_epochs=2, limit_train_batches=4, callbacks=[recorder, massive]).fit(EndsEpochEarly(BlockNet()), toy_loader())
    logged = dict(zip(massive.history["massive/net.blocks.0/top1"].steps, massive.history["massive/net.blocks.0/top1"].values))
    # step 2 was abandoned in epoch 0 and trained as the first batch of epoch 1
    assert sorted(logged) == sorted(recorder.top1) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose([logged[s] for s in sorted(logged)], [recorder.top1[s] for s in sorted(logged)], rtol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "combined"])
def test_probes_read_the_first_of_several_validation_loaders(kind):
    first, second = toy_loader(16, 8, seed=1), toy_loader(16, 8, seed=2)
    loaders = {"a": first, "b": second} if kind == "dict" else CombinedLoader([first, second], mode="sequential")

    class TwoLoaders(ToyTask):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log("val/loss", F.cross_entropy(self(x), y))

    logged = {}
    for val in (loaders, first):  # several loaders, and the first alone
        torch.manual_seed(0)
        massive = MassiveActivations(modules=["net.blocks.0"], every_n_steps=1, probe="val")
        sensitive = SensitiveNeurons(modules=["net.head:input"], every_n_steps=1, num_samples=16, eigenscore_passes=0)
        quiet_trainer(max_steps=2, callbacks=[massive, sensitive]).fit(TwoLoaders(BlockNet()), toy_loader(), val)
        logged[val is first] = (massive.history["massive/net.blocks.0/top1"].values, sensitive.embeddings["net.head-input"][-1])
    assert logged[False][0] == logged[True][0]
    torch.testing.assert_close(logged[False][1], logged[True][1], rtol=0, atol=0)


class Testable(ToyTask):
    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)


def test_a_checkpoint_loaded_to_test_keeps_the_fits_histories_and_a_fresh_callback_takes_them(tmp_path):
    torch.manual_seed(0)
    monitors = all_four()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(max_steps=6, callbacks=[*monitors, saver], enable_checkpointing=True)
    trainer.fit(ToyTask(BlockNet()), ToyData())
    after_fit = [history_steps(m) for m in monitors]
    assert all(steps and max(max(s) for s in steps.values()) == 5 for steps in after_fit)
    trainer.test(Testable(BlockNet()), toy_loader(16), ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"), verbose=False)
    assert [history_steps(m) for m in monitors] == after_fit  # before: rolled back to the checkpoint's steps 0, 1
    assert monitors[3].checkpoints == 6

    fresh = all_four()
    quiet_trainer(callbacks=fresh).test(Testable(BlockNet()), toy_loader(16), ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"), verbose=False)
    assert all(steps and all(s == [0, 1] for s in steps.values()) for steps in map(history_steps, fresh))


def test_a_resumed_fit_puts_the_last_statistics_back_for_early_stopping(tmp_path):
    # 2 steps per epoch, due every 4 steps: the resumed second epoch (steps 2, 3) has no due step. Lightning empties
    # callback_metrics when a fit starts, so EarlyStopping's epoch-end check failed with "metric not available",
    # where the uninterrupted run used step 0's value.
    def fit(max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        monitors = [ActivationSparsity(every_n_steps=4), SensitiveNeurons(every_n_steps=4, num_samples=8, eigenscore_passes=0)]
        stops = [
            EarlyStopping(monitor="sparsity/net.blocks.0.act/zero_frac", mode="max", patience=100, check_on_train_epoch_end=True),
            EarlyStopping(monitor="sensitive/net.head-input/count", mode="max", patience=100, check_on_train_epoch_end=True),
        ]
        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[*monitors, *stops, saver], enable_checkpointing=True)
        trainer.fit(ToyTask(BlockNet()), toy_loader(16), toy_loader(16, seed=1), ckpt_path=ckpt_path)
        return trainer

    whole = fit(2)
    resumed = fit(2, str(tmp_path / "epoch=0.ckpt"))
    for key in ("sparsity/net.blocks.0.act/zero_frac", "sensitive/net.head-input/count"):
        assert resumed.callback_metrics[key].item() == whole.callback_metrics[key].item()


@pytest.mark.parametrize(("every", "check_on_train_epoch_end", "warns"), [(4, True, True), (4, False, True),
                                                                       (2, True, False), (2, False, False)])
def test_early_stopping_that_checks_more_often_than_the_statistic_is_measured_is_warned(every, check_on_train_epoch_end,
                                                                                       warns):
    # 2 optimizer steps per epoch, a check per epoch. Before: nothing said that a statistic measured every 4 steps is
    # read at two checks, the second one counted as no improvement (patience=2 stopped on one measurement).
    stop = EarlyStopping(monitor="sparsity/net.blocks.0.act/zero_frac", mode="max", patience=2,
                         check_on_train_epoch_end=check_on_train_epoch_end)
    trainer = quiet_trainer(max_epochs=1, callbacks=[ActivationSparsity(every_n_steps=every), stop])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyTask(BlockNet()), toy_loader(16), toy_loader(16, seed=1))
    said = [str(w.message) for w in caught if "EarlyStopping(monitor=" in str(w.message)]
    expected = ("ActivationSparsity: EarlyStopping(monitor='sparsity/net.blocks.0.act/zero_frac') checks every ~2 "
                "optimizer steps, but the statistic is measured every 4: it counts the repeated values as no "
                "improvement and may stop after patience=2 checks of one measurement; pass every_n_steps <= 2 or a "
                "larger patience")
    assert said == ([expected] if warns else [])


def test_the_early_stopping_warning_is_about_the_monitor_that_measures_the_statistic():
    # Before: a second ActivationSparsity, every 100 steps on other modules, warned about the first one's statistic.
    stop = EarlyStopping(monitor="sparsity/net.blocks.0.act/zero_frac", mode="max", patience=2)
    often = ActivationSparsity(modules=["net.blocks.0.act"], every_n_steps=1)
    rarely = ActivationSparsity(modules=["net.blocks.1.act"], every_n_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=1, callbacks=[often, rarely, stop]).fit(ToyTask(BlockNet()), toy_loader(16),
                                                                         toy_loader(16, seed=1))
    assert not [w for w in caught if "EarlyStopping(monitor=" in str(w.message)]


def test_a_further_fit_of_the_same_trainer_has_its_statistics_for_early_stopping():
    # The same as a resume: Lightning empties callback_metrics at each fit; the second fit's first epoch (steps 2, 3)
    # has no due step (every 4), so EarlyStopping failed there with "metric not available".
    torch.manual_seed(0)
    monitor = ActivationSparsity(every_n_steps=4)
    stop = EarlyStopping(monitor="sparsity/net.blocks.0.act/zero_frac", mode="max", patience=100, check_on_train_epoch_end=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor, stop])
    task = ToyTask(BlockNet())
    trainer.fit(task, toy_loader(16))
    trainer.fit_loop.max_epochs = 2
    trainer.fit(task, toy_loader(16))
    assert trainer.global_step == 4 and "sparsity/net.blocks.0.act/zero_frac" in trainer.callback_metrics


class BatchSizeTask(ToyTask):
    def train_dataloader(self):
        return toy_loader(64, 8)


def test_a_learning_rate_finder_before_a_reused_callback_does_not_make_it_keep_the_earlier_run():
    # The finder saves and restores a checkpoint around its trials inside the fit; the callback took that restore
    # for a resume, kept the earlier run's history and appended the new run's steps: [0, 2, 4, 0, 2].
    monitor = ActivationSparsity(every_n_steps=2)
    torch.manual_seed(0)
    quiet_trainer(max_steps=6, callbacks=[monitor]).fit(BatchSizeTask(BlockNet()))
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finder = LearningRateFinder(num_training_steps=4, update_attr=False)
        quiet_trainer(max_steps=4, callbacks=[finder, monitor]).fit(BatchSizeTask(BlockNet()))
    assert all(steps == [0, 2] for steps in history_steps(monitor).values())
    assert any("it is cleared so that the two runs do not mix" in str(w.message) for w in caught)


def test_one_callback_object_in_a_new_fit_from_step_0_starts_afresh_and_a_further_fit_continues():
    def fit(monitors, trainer=None, steps=4):
        torch.manual_seed(0)
        trainer = trainer or quiet_trainer(callbacks=monitors)
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit(ToyTask(BlockNet()), ToyData())
        return trainer

    reused, fresh = all_four(), all_four()
    torch.manual_seed(1)
    quiet_trainer(max_steps=6, callbacks=reused).fit(ToyTask(BlockNet()), ToyData())  # another run first
    with pytest.warns(UserWarning, match="earlier fit reaches step 5; it is cleared"):
        fit(reused)
    fit(fresh)
    for old, new in zip(reused, fresh):
        assert history_steps(old) == history_steps(new)
        for key, series in new.history.items():
            assert old.history[key].values == series.values, key
    assert reused[2]._snapshot_steps == fresh[2]._snapshot_steps
    torch.testing.assert_close(reused[3].embeddings, fresh[3].embeddings, rtol=0, atol=0)

    trainer = fit(fresh[:1])  # the same Trainer, fit again to a later step: one history, steps in order
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cleared" warning
        fit(fresh[:1], trainer, steps=7)
    assert all(steps == list(range(7)) for steps in history_steps(fresh[0]).values())


def test_a_callback_reused_to_resume_a_run_that_had_none_starts_empty(tmp_path):
    # Before: resumed from a checkpoint without its state, a callback used in an earlier run kept that run's
    # history: steps [0, 2, 4, 4, 6] for the resumed run's [4, 6].
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    torch.manual_seed(0)
    quiet_trainer(max_steps=4, callbacks=[saver], enable_checkpointing=True).fit(
        ToyTask(BlockNet()), ToyData())  # run B, no monitor
    reused = ActivationSparsity(modules=["@blocks"], every_n_steps=2)
    torch.manual_seed(1)
    quiet_trainer(max_steps=6, callbacks=[reused]).fit(ToyTask(BlockNet()), ToyData())  # run A
    assert history_steps(reused)["sparsity/net.blocks.0/zero_frac"] == [0, 2, 4]
    torch.manual_seed(0)
    quiet_trainer(max_steps=8, callbacks=[reused]).fit(ToyTask(BlockNet()), ToyData(),
                                                       ckpt_path=str(tmp_path / "last.ckpt"))
    assert all(steps == [4, 6] for steps in history_steps(reused).values())


def test_a_resume_with_settings_that_change_a_statistics_meaning_says_so_once(tmp_path):
    # Before: resumed with another threshold, zero_frac went on in the same series with another meaning, silently.
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    torch.manual_seed(0)
    first = ActivationSparsity(modules=["@blocks"], every_n_steps=1, threshold=np.float64(0.0))  # a numpy scalar
    quiet_trainer(max_steps=2, callbacks=[first, saver], enable_checkpointing=True).fit(ToyTask(BlockNet()), ToyData())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain values: a resume loads it so
    assert any(state.get("settings", {}).get("threshold") == 0.0 for state in checkpoint["callbacks"].values())

    def resume(**settings):
        monitor = ActivationSparsity(modules=["@blocks"], every_n_steps=1, **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=4, callbacks=[monitor]).fit(ToyTask(BlockNet()), ToyData(),
                                                               ckpt_path=str(tmp_path / "last.ckpt"))
        return [str(w.message) for w in caught if "other settings" in str(w.message)]

    assert resume() == []
    said = resume(threshold=0.1)
    assert len(said) == 1 and "(threshold=0.0 then 0.1)" in said[0]
    said = resume(threshold=0.1, temporal_dim=1)
    assert len(said) == 1 and "(threshold=0.0 then 0.1; temporal_dim=None then 1)" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # validate measures nothing: nothing to say
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[ActivationSparsity(modules=["@blocks"], threshold=0.1)]).validate(
            ToyTask(BlockNet()), ToyData(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert not [w for w in caught if "other settings" in str(w.message)]


def test_a_probe_reused_in_a_second_fit_probes_its_step_0():
    massive = MassiveActivations(modules=["net.blocks.0"], every_n_steps=50, probe="val")
    quiet_trainer(max_steps=2, callbacks=[massive]).fit(ToyTask(BlockNet()), ToyData())
    assert massive.history["massive/net.blocks.0/top1"].steps == [0]
    with pytest.warns(UserWarning, match="it is cleared"):
        quiet_trainer(max_steps=2, callbacks=[massive]).fit(ToyTask(BlockNet()), ToyData())
    assert massive.history["massive/net.blocks.0/top1"].steps == [0]  # before: not probed, then a crash


def test_an_input_taps_statistic_names_a_model_checkpoint_file(tmp_path):
    # Keys of input taps were <prefix>/<module>:input/<stat>: ModelCheckpoint's template reads a metric's name up to
    # the first ':', so "{act/net.head:input/mean:.3f}" stopped the fit with "Invalid format specifier" (round 17).
    from lightning_act.callbacks import ActivationStats

    key = "act/net.head-input/mean"
    stats = ActivationStats(modules=["net.head:input"], every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=key, filename="{step}-{" + key + ":.4f}",
                                 auto_insert_metric_name=False, every_n_train_steps=1, save_top_k=-1)
    quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[stats, checkpoint]).fit(ToyTask(BlockNet()), toy_loader())
    means = stats.history[key].values
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{step + 1}-{mean:.4f}.ckpt" for step, mean in enumerate(means)]


def test_a_checkpoint_is_written_after_the_csv_holds_every_row_of_its_histories(tmp_path):
    # Lightning's CSVLogger keeps rows until its next save; a kill after a checkpoint and before that save lost rows
    # the resumed fit never logs again (the CSV had steps 6-11 after a resume from a checkpoint holding 0-5).
    import csv
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger

    key = "massive/net.blocks.0/ratio"
    monitor = MassiveActivations(every_n_steps=1)
    seen = []

    class ReadsTheCsv(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            path, rows = Path(trainer.logger.log_dir) / "metrics.csv", []
            if path.exists():
                with open(path) as handle:
                    rows = list(csv.DictReader(handle))
            seen.append(([int(row["step"]) for row in rows if row.get(key)], list(monitor.history[key].steps)))

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    quiet_trainer(max_steps=7, enable_checkpointing=True, log_every_n_steps=1000,
                  logger=CSVLogger(tmp_path, flush_logs_every_n_steps=1000),
                  callbacks=[monitor, ReadsTheCsv(), checkpoint]).fit(ToyTask(BlockNet()), toy_loader())
    assert [held for _, held in seen] == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert all(written == held for written, held in seen), seen


@pytest.mark.filterwarnings("ignore:.*(does not have many workers|checkpoint).*")
def test_a_fit_resumed_with_other_settings_restarts_what_no_longer_stacks_with_one_warning(tmp_path):
    # The restored weight trajectory (another projection_dim) and SeND windows (another tracking set) crashed the
    # resumed fit at its first due step with a torch.stack RuntimeError.
    checkpoint_dir = tmp_path / "checkpoints"

    def run(projection_dim, num_samples, max_steps, ckpt_path=None):
        torch.manual_seed(0)
        collapse = DimensionalCollapse(every_n_steps=1, projection_dim=projection_dim)
        sensitive = SensitiveNeurons(every_n_steps=1, num_samples=num_samples, window=2, eigenscore_passes=0)
        checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=max_steps, enable_checkpointing=True, callbacks=[collapse, sensitive, checkpoint],
                          limit_val_batches=2).fit(ToyTask(BlockNet()), ToyData(batch_size=8), ckpt_path=ckpt_path)
        said = [str(w.message) for w in caught if "follows a new trajectory" in str(w.message) or "start afresh" in str(w.message)]
        return collapse, sensitive, said

    run(64, 8, 4)
    collapse, sensitive, said = run(32, 16, 8, ckpt_path=str(checkpoint_dir / "step=4.ckpt"))
    assert len(said) == 2 and any("DimensionalCollapse" in m for m in said) and any("SensitiveNeurons" in m for m in said)
    r90 = collapse.history["collapse/params/r90"]
    assert r90.steps == [0, 1, 2, 3, 4, 5, 6, 7]  # continued: from step 4 on, of the new trajectory
    assert all(window[0].shape[0] == 16 for window in sensitive.embeddings.values())


@pytest.mark.filterwarnings("ignore:.*(does not have many workers|checkpoint).*")
def test_a_resume_with_another_history_size_or_seed_uses_them(tmp_path):
    # Before: the restored histories kept the checkpoint's capacity, and the restored row sampler its seed.
    def fit(history_size, seed, max_steps, ckpt_path=None, folder=tmp_path):
        torch.manual_seed(0)
        sparsity = ActivationSparsity(every_n_steps=1, history_size=history_size)
        collapse = DimensionalCollapse(every_n_steps=1, max_rows=4, seed=seed)
        saver = ModelCheckpoint(dirpath=folder, filename="{step}", save_top_k=-1)  # at each epoch end: every 6 steps
        quiet_trainer(max_steps=max_steps, enable_checkpointing=True, callbacks=[sparsity, collapse, saver]
                      ).fit(ToyTask(BlockNet()), toy_loader(48, 8), ckpt_path=ckpt_path)
        return sparsity, collapse

    fit(history_size=64, seed=0, max_steps=6)
    sparsity, collapse = fit(history_size=4, seed=5, max_steps=8, ckpt_path=str(tmp_path / "step=6.ckpt"))
    assert all(len(series) < 4 for series in sparsity.history.values())
    series = sparsity.history["sparsity/net.blocks.0.act/zero_frac"]
    assert series.steps == [0, 4] and series.capacity == 4  # steps 0-7 thinned twice: every 4th step
    _, seeded_5 = fit(history_size=64, seed=5, max_steps=8, folder=tmp_path / "straight")  # the same weights
    for key in ("collapse/net.blocks.0/erank", "collapse/net.blocks.1/pr"):
        resumed = dict(zip(collapse.history[key].steps, collapse.history[key].values))
        straight = dict(zip(seeded_5.history[key].steps, seeded_5.history[key].values))
        # the first step after the resume: the rows sampled with seed 5 (from step 7 on, Lightning's epoch-end resume
        # gives other batches than the uninterrupted fit, with or without monitors)
        assert resumed[6] == straight[6], key


def test_half_written_checkpoints_of_a_killed_fit_are_removed_when_the_next_fit_starts(tmp_path):
    from lightning_act.checkpointing import LastCheckpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [folder / ".step=4.ckpt.k3j2x9.tmp", folder / ".last.ckpt.q1w2e3.tmp"]
    kept = [folder / "notes.tmp", folder / ".hidden"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=100)
    quiet_trainer(max_steps=1, enable_checkpointing=True, callbacks=[LastCheckpoint(dirpath=str(tmp_path / "last")), checkpoint]
                  ).fit(ToyTask(BlockNet()), toy_loader())
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


@pytest.mark.parametrize("hook", ["configure_model", "setup"])
def test_layers_built_in_configure_model_or_setup_are_monitored(hook):
    # Lightning calls Callback.setup before LightningModule.setup and configure_model: the monitors chose their
    # modules there and found none of these layers (idle with the defaults; "matched no module" for explicit ones).
    from lightning_act.callbacks import ActivationStats

    class Lazy(ToyTask):
        def __init__(self):
            super().__init__(nn.Identity())

        def build(self):
            if isinstance(self.net, nn.Identity):
                self.net = BlockNet()

    if hook == "configure_model":
        Lazy.configure_model = lambda self: self.build()
    else:
        Lazy.setup = lambda self, stage: self.build()

    seen = []

    class RecordsActs(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.handle = pl_module.net.blocks[1].act.register_forward_hook(lambda m, i, o: seen.append(o.detach()))

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.handle.remove()

    explicit = ActivationStats(modules=["net.blocks.*.act"], every_n_steps=1)
    defaults = MassiveActivations(every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[explicit, defaults, RecordsActs()]).fit(Lazy(), toy_loader())
    assert [t.name for t in explicit.taps] == ["net.blocks.0.act", "net.blocks.1.act"]
    assert [t.name for t in defaults.taps] == ["net.blocks.0", "net.blocks.1"]
    for step, activation in enumerate(seen):
        assert explicit.history["act/net.blocks.1.act/mean"].values[step] == pytest.approx(float(activation.double().mean()), rel=1e-6)


def test_a_resume_keeps_the_state_of_the_same_modules_spelled_otherwise_and_says_when_none_matches(tmp_path):
    # The state key held the specs as written: the same taps in another order, "ReLU" for nn.ReLU or "-input" for
    # ":input" found no state at a resume, and the histories restarted silently.
    first = [nn.GELU, "net.blocks.0", "net.head:input"]
    for i, spelled in enumerate([["net.head-input", "GELU", "net.blocks.0"], ["torch.nn.GELU", "net.head:input", "net.blocks.0"]]):
        folder = tmp_path / str(i)
        checkpoint = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        torch.manual_seed(0)
        quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[MassiveActivations(modules=first, every_n_steps=1),
                                                                         checkpoint]).fit(ToyTask(BlockNet()), toy_loader())
        resumed = MassiveActivations(modules=spelled, every_n_steps=1)
        quiet_trainer(max_steps=4, enable_checkpointing=False, callbacks=[resumed]).fit(
            ToyTask(BlockNet()), toy_loader(), ckpt_path=str(folder / "step=2.ckpt"))
        assert resumed.history["massive/net.blocks.0/top1"].steps == [0, 1, 2, 3], spelled
    other = MassiveActivations(modules=["net.blocks.1"], every_n_steps=1)
    with pytest.warns(UserWarning, match=r"MassiveActivations: the checkpoint holds state for .* but none for this monitor"):
        quiet_trainer(max_steps=4, enable_checkpointing=False, callbacks=[other]).fit(
            ToyTask(BlockNet()), toy_loader(), ckpt_path=str(tmp_path / "0" / "step=2.ckpt"))
    assert other.history["massive/net.blocks.1/top1"].steps == [2, 3]
