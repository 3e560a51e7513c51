"""Round 25 (base.py): an extra statistic that becomes unknown is NaN in ``callback_metrics``; the fit-start warnings
about readers of a monitor's statistics cover plateau schedulers, statistics that appear late and accumulation set by
``GradientAccumulationScheduler``."""

import math
import tempfile
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, GradientAccumulationScheduler, ModelCheckpoint

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationStats, DimensionalCollapse

RMS = "act/net.blocks.0/rms"


def fit_and_warnings(trainer, task, *loaders):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, *loaders)
    return [str(w.message) for w in caught]


class PoisonAtStep4(Callback):
    """The run diverges at step 4: a weight the r90 trajectory follows is NaN from then on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:
            with torch.no_grad():
                pl_module.net.blocks[0].fc.weight.fill_(float("nan"))


def test_an_unknown_params_r90_is_nan_in_callback_metrics_so_early_stopping_stops():
    # Before: callback_metrics kept step 3's r90 (1.0) while the weights were NaN, and EarlyStopping(check_finite)
    # ran to max_steps=16; the per-tap statistics were NaN there, as docs/capture.md "Unknown statistics" promises.
    torch.manual_seed(0)
    key = "collapse/params/r90"
    monitor = DimensionalCollapse(modules=["net.blocks.0"], every_n_steps=1)
    stop = EarlyStopping(monitor=key, mode="max", patience=100, check_finite=True, check_on_train_epoch_end=True)
    trainer = quiet_trainer(max_steps=16, callbacks=[PoisonAtStep4(), monitor, stop])
    said = fit_and_warnings(trainer, ToyTask(BlockNet()), toy_loader())  # 8 steps an epoch
    assert math.isnan(trainer.callback_metrics[key].item())
    assert trainer.global_step == 8  # the first epoch end after step 4 (hand-worked: 64 examples, batches of 8)
    assert monitor.history[key].steps == [0, 1, 2, 3]  # no NaN point in the history
    assert len([m for m in said if key in m and "is not logged from step 4" in m]) == 1


def plateau_task(frequency, interval="step", patience=2):
    class PlateauTask(ToyTask):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=patience)
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": plateau, "monitor": RMS, "interval": interval, "frequency": frequency}}

    return PlateauTask(BlockNet())


@pytest.mark.parametrize(("frequency", "warns"), [(1, True), (4, False)])
def test_a_plateau_scheduler_that_steps_more_often_than_the_statistic_is_measured_is_warned(frequency, warns):
    # Before: nothing said that a ReduceLROnPlateau stepped every batch counts 3 repeats of each measurement (every 4
    # steps) as no improvement, cutting the learning rate on one measurement.
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=4)
    said = fit_and_warnings(quiet_trainer(max_steps=4, callbacks=[monitor]), plateau_task(frequency), toy_loader())
    expected = (f"ActivationStats: ReduceLROnPlateau(lr_scheduler monitor='{RMS}', interval='step', frequency=1) "
                "checks every ~1 optimizer steps, but the statistic is measured every 4: it counts the repeated values "
                "as no improvement and may cut the learning rate after patience=2 checks of one measurement; pass "
                "'frequency': 4 (batches) in its lr_scheduler config or a larger patience")
    assert [m for m in said if "ReduceLROnPlateau" in m] == ([expected] if warns else [])


def test_an_epoch_plateau_scheduler_is_warned_when_an_epoch_is_shorter_than_the_measuring_interval():
    # 8 optimizer steps an epoch, measured every 16: every other epoch's step reads the same value.
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=16)
    said = fit_and_warnings(quiet_trainer(max_steps=1, callbacks=[monitor]), plateau_task(1, "epoch"), toy_loader())
    plateau = [m for m in said if "ReduceLROnPlateau" in m]
    assert len(plateau) == 1
    assert "checks every ~8 optimizer steps" in plateau[0] and "'frequency': 2 (epochs)" in plateau[0]


class LateRms(ActivationStats):
    """A monitor whose ``rms`` first appears at step 12, as a statistic that needs several due steps does."""

    def first_logged_step(self, key):
        return 12 if key.endswith("/rms") else None


def test_a_model_checkpoint_that_reads_a_late_statistic_before_it_appears_is_warned_at_fit_start():
    # Before: nothing was said at fit start; Lightning's ModelCheckpoint raised at the first validation (step 8, the
    # end of the first 8-batch epoch) for SensitiveNeurons' v_mean, logged from step 12 (window 3, every 4 steps).
    monitor = LateRms(modules=["net.blocks.0"], every_n_steps=4)
    checkpoint = ModelCheckpoint(dirpath=tempfile.mkdtemp(), monitor=RMS, mode="max")
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, checkpoint], limit_val_batches=1,
                            enable_checkpointing=True)
    said = fit_and_warnings(trainer, ToyTask(BlockNet()), ToyData())
    expected = (f"LateRms: ModelCheckpoint(monitor='{RMS}') reads a statistic this monitor first logs at step 12 "
                "(after several due steps): a read before then ends the fit with Lightning's \"not available\" error; "
                "save first after that step (every_n_epochs, every_n_train_steps, the validation interval) or monitor "
                "another key")
    assert [m for m in said if "first logs at step" in m] == [expected]


@pytest.mark.parametrize(("strict", "warns"), [(True, True), (False, False)])
def test_early_stopping_on_a_late_statistic_is_warned_only_when_strict(strict, warns):
    monitor = LateRms(modules=["net.blocks.0"], every_n_steps=4)
    stop = EarlyStopping(monitor=RMS, mode="max", strict=strict, check_on_train_epoch_end=False)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, stop], limit_val_batches=1)
    said = [m for m in fit_and_warnings(trainer, ToyTask(BlockNet()), ToyData()) if "first logs at step" in m]
    assert len(said) == (1 if warns else 0)
    assert all("first logs at step 12" in m and "pass EarlyStopping(strict=False)" in m for m in said)


@pytest.mark.parametrize("scheduling", [{0: 4}, {0: 1, 1: 4}])
def test_the_early_stopping_warning_sees_the_accumulation_of_a_gradient_accumulation_scheduler(scheduling):
    # 8 batches an epoch at accumulation 4: 2 optimizer steps an epoch, a check per epoch, measured every 4 steps.
    # Before: the scheduler sets the accumulation at epoch start, after the check at train start, which read 1.
    stop = EarlyStopping(monitor=RMS, mode="max", patience=2, check_on_train_epoch_end=True)
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=4)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, stop, GradientAccumulationScheduler(scheduling)])
    said = [m for m in fit_and_warnings(trainer, ToyTask(BlockNet()), toy_loader()) if "EarlyStopping(monitor=" in m]
    expected = (f"ActivationStats: EarlyStopping(monitor='{RMS}') checks every ~2 optimizer steps, but the statistic "
                "is measured every 4: it counts the repeated values as no improvement and may stop after patience=2 "
                "checks of one measurement; pass every_n_steps <= 2 or a larger patience")
    assert said == [expected]


@pytest.mark.parametrize(("drop", "stat"), [(False, "v_mean"), (False, "jaccard"), (True, "jaccard")])
def test_sensitive_neurons_announces_the_step_its_late_statistics_first_appear(drop, stat):
    # The step a fit-start warning names is the one its history first holds the statistic at (every 2 steps, window 3:
    # v_mean at the 4th checkpoint, step 6; jaccard at the second selection, step 8, or 10 after 2 dropped checkpoints).
    from lightning_act.callbacks import SensitiveNeurons

    key = f"sensitive/net.blocks.0/{stat}"
    monitor = SensitiveNeurons(modules=["net.blocks.0"], every_n_steps=2, window=3, drop=drop, drop_checkpoints=2,
                               eigenscore_passes=0)
    stop = EarlyStopping(monitor=key, mode="max", strict=False, patience=100, check_on_train_epoch_end=False)
    trainer = quiet_trainer(max_steps=12, callbacks=[monitor, stop], limit_val_batches=1)
    trainer.fit(ToyTask(BlockNet()), ToyData())
    first = monitor.history[key].steps[0]
    assert first == {("v_mean", False): 6, ("jaccard", False): 8, ("jaccard", True): 10}[stat, drop]
    assert monitor.first_logged_step(key) == first


@pytest.mark.parametrize(("every", "warns"), [(6, False), (7, True)])
def test_validations_across_epochs_are_spaced_in_whole_optimizer_steps(every, warns):
    # 8 batches an epoch at accumulation 3: 3 optimizer steps an epoch (its last batch steps); a validation every 16
    # batches is every 6 steps, not 16 / 3 (which warned at every_n_steps=6)
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=every)
    stop = EarlyStopping(monitor=RMS, mode="max", strict=False, check_on_train_epoch_end=False)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, stop], limit_val_batches=1, accumulate_grad_batches=3,
                            check_val_every_n_epoch=None, val_check_interval=16)
    said = [m for m in fit_and_warnings(trainer, ToyTask(BlockNet()), ToyData()) if "checks every" in m]
    assert len(said) == (1 if warns else 0)


def test_a_model_checkpoint_of_a_fit_without_validation_is_not_warned_about_a_late_statistic():
    # Lightning's ModelCheckpoint raises for a missing key only once a validation loop has run
    monitor = LateRms(modules=["net.blocks.0"], every_n_steps=4)
    checkpoint = ModelCheckpoint(dirpath=tempfile.mkdtemp(), monitor=RMS, mode="max")
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, checkpoint], enable_checkpointing=True)
    said = fit_and_warnings(trainer, ToyTask(BlockNet()), toy_loader())
    assert not [m for m in said if "first logs at step" in m]
