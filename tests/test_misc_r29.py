"""Round 29: the end-of-fit figures leave the user's matplotlib backend alone; ``--num_threads`` run in-process is put
back after the command; EarlyStopping under a time-based ``val_check_interval`` is warned in the reader warning's
terms; the report's test table keeps only the last test of a version folder that holds two."""

import datetime
import warnings

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from test_cli_files_r22 import write_config
from torch.utils.data import DataLoader

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationStats, MassiveActivations
from lightning_act.cli import main
from lightning_act.plots import new_figure, save_png_whole
from lightning_act.report.runlog import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- bug 1: a monitored fit switched the process's matplotlib backend to Agg -----------------------------------------

@pytest.fixture
def users_backend(request):
    """The backend the user chose (a notebook's inline one, an interactive window; here a file backend), put back."""
    previous = matplotlib.get_backend()
    plt.switch_backend(request.param)
    yield request.param
    plt.switch_backend(previous)


@pytest.mark.parametrize("users_backend", ["pdf", "svg"], indirect=True)
def test_a_monitored_fit_leaves_the_users_backend_and_writes_valid_pngs(users_backend, tmp_path, one_thread):
    # Before: plots.new_figure called matplotlib.use("Agg"): after the fit the backend was Agg, and plt.show() in a
    # notebook showed nothing.
    before = (matplotlib.get_backend(), matplotlib.rcParams["backend_fallback"])
    monitors = [ActivationStats(modules=["net.blocks.0"], every_n_steps=1),
                MassiveActivations(modules=["net.blocks.0"], every_n_steps=1)]
    trainer = quiet_trainer(max_steps=3, logger=CSVLogger(tmp_path, name="csv"), callbacks=monitors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ToyTask(BlockNet()), toy_loader())
    assert (matplotlib.get_backend(), matplotlib.rcParams["backend_fallback"]) == before == (users_backend, True)
    pictures = sorted((tmp_path / "csv" / "version_0" / "plots").glob("*.png"))
    assert [p.name for p in pictures] == ["act_rms_heatmap.png", "massive_ratio_heatmap.png"]
    for picture in pictures:
        assert picture.read_bytes()[:8] == PNG_SIGNATURE
        assert plt.imread(picture).shape[2] == 4  # RGBA pixels, read back


@pytest.mark.parametrize("users_backend", ["svg"], indirect=True)
def test_a_line_figure_is_saved_as_png_under_another_backend(users_backend, tmp_path):
    # MassiveActivations' emergence-fit figure: lines on a figure made by new_figure, saved by save_png_whole
    figure = new_figure(3.2, 2.4)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0.0, 1.0, 2.0], [1.0, 3.0, 2.0], "o")
    axes.axvline(1.0, color="grey", linestyle=":")
    save_png_whole(figure, tmp_path / "fit.png")
    assert (tmp_path / "fit.png").read_bytes()[:8] == PNG_SIGNATURE
    assert plt.imread(tmp_path / "fit.png").shape == (240, 320, 4)  # 3.2 x 2.4 inches at 100 dpi
    assert matplotlib.get_backend() == "svg"


# --- bug 2: --num_threads stayed set after an in-process command ----------------------------------------------------

@pytest.fixture
def one_thread_before(tmp_path, monkeypatch):
    """A thread count of 1 before the command, the test's own count put back after it."""
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield write_config(tmp_path, "runs", max_steps=1)
    torch.set_num_threads(previous)


def test_num_threads_is_put_back_after_an_in_process_command(one_thread_before):
    assert main(["fit", "--config", str(one_thread_before), "--num_threads", "2"]) == 0
    assert torch.get_num_threads() == 1  # before: 2, the run's count, for the rest of the process


def test_num_threads_is_put_back_after_a_user_error(one_thread_before):
    # met after the count was set (building the data module): exit status 2, the count put back too
    assert main(["fit", "--config", str(one_thread_before), "--num_threads", "2",
                 "--data.init_args.batch_size", "0"]) == 2
    assert torch.get_num_threads() == 1


# --- bug 3: a time-based val_check_interval read as "validation once an epoch" --------------------------------------

RMS = "act/net.blocks.0/rms"


def _early_stopping_warnings(val_check_interval, every_n_steps, check_on_train_epoch_end=False):
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=every_n_steps)
    stop = EarlyStopping(monitor=RMS, mode="max", patience=2, check_on_train_epoch_end=check_on_train_epoch_end)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor, stop], limit_val_batches=1,
                            val_check_interval=val_check_interval)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyTask(BlockNet()), ToyData())
    return [str(w.message) for w in caught if "EarlyStopping(monitor=" in str(w.message)]


def _time_warning(seconds: str, every: int) -> str:
    return (f"ActivationStats: EarlyStopping(monitor='{RMS}') checks at each validation, run every {seconds} s by a "
            "time-based val_check_interval, so the optimizer steps between two checks are unknown, and the statistic "
            f"is measured every {every}: if fewer steps lie between two checks, it counts the repeated values as no "
            "improvement and may stop after patience=2 checks of one measurement; pass val_check_interval in batches "
            f"(at least every_n_steps x accumulation = {every}), EarlyStopping(check_on_train_epoch_end=True) or a "
            "larger patience")


def test_a_time_interval_that_validates_after_every_batch_is_warned(one_thread):
    # Before: nothing was said (val_check_batch=None read as "once an epoch", 8 steps apart, measured every 4), and
    # EarlyStopping stopped the fit after patience=2 checks of one measurement.
    said = _early_stopping_warnings(datetime.timedelta(microseconds=1), every_n_steps=4)
    assert said == [_time_warning("1e-06", 4)]


def test_a_slow_time_interval_gets_no_made_up_step_count(one_thread):
    # Before: "checks every ~8 optimizer steps ... pass every_n_steps <= 8": a number the hour-long interval never has
    said = _early_stopping_warnings({"hours": 1}, every_n_steps=16)
    assert said == [_time_warning("3600", 16)]


def test_a_time_interval_checked_at_epoch_end_keeps_the_counted_warning(one_thread):
    # EarlyStopping(check_on_train_epoch_end=True) checks once an epoch (8 optimizer steps), whatever the interval
    said = _early_stopping_warnings("00:01:00:00", every_n_steps=16, check_on_train_epoch_end=True)
    assert said == [f"ActivationStats: EarlyStopping(monitor='{RMS}') checks every ~8 optimizer steps, but the "
                    "statistic is measured every 16: it counts the repeated values as no improvement and may stop "
                    "after patience=2 checks of one measurement; pass every_n_steps <= 8 or a larger patience"]


def test_every_step_measured_under_a_time_interval_is_not_warned(one_thread):
    assert _early_stopping_warnings(datetime.timedelta(microseconds=1), every_n_steps=1) == []


# --- bug 4: two tests in one CSV version folder were mixed in the test table ----------------------------------------

class TaskWithTest(ToyTask):
    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("test/loss", torch.nn.functional.cross_entropy(self(x), y))


def _loader(seed: int) -> DataLoader:
    return toy_loader(16, seed=seed)


@pytest.mark.parametrize(("tests", "left_out"), [
    ([[1, 2], [3]], "test/loss/dataloader_idx_0, test/loss/dataloader_idx_1"),
    ([[3], [1, 2]], "test/loss"),
])
def test_a_later_test_on_one_trainer_replaces_the_earlier_tests_metrics(tests, left_out, tmp_path, one_thread):
    # Before: with two loaders then one, the table showed the second test's test/loss beside the first test's
    # test/loss/dataloader_idx_0 and _1, as one result, with no note.
    trainer = quiet_trainer(max_steps=1, logger=CSVLogger(tmp_path, name="csv"))
    task = TaskWithTest(BlockNet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, toy_loader())
        for seeds in tests:
            returned = trainer.test(task, [_loader(s) for s in seeds], verbose=False)
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["version_0"]
    expected = {key: value for per_loader in returned for key, value in per_loader.items()}  # the last test alone
    run = load_run(tmp_path / "csv")
    assert run.test_metrics() == pytest.approx(expected, rel=1e-6)
    assert [n for n in run.notes if "tests again" in n] == [
        f"{tmp_path / 'csv' / 'version_0' / 'metrics.csv'} tests again: its last test replaces the earlier test's "
        f"metrics, so {left_out} (not logged by the last test) are left out"]


def test_a_tests_per_batch_rows_go_with_the_test_they_come_before(tmp_path):
    # Lightning's rows: a test's per-batch rows (no epoch) before its end row (with the epoch); two tests at step 8
    csv_text = (
        "epoch,step,test/acc_step,test/acc_epoch,test/acc_step/dataloader_idx_1,test/acc_epoch/dataloader_idx_1,"
        "train/loss\n"
        "0,7,,,,,0.5\n"
        ",0,0.25,,,,\n"          # test 1, loader 0 (the only one): per-batch rows
        ",1,0.75,,,,\n"
        "0,8,,0.5,,,\n"          # test 1 ends
        ",0,,,0.125,,\n"         # test 2 logs only its loader 1's keys
        "0,8,,,,0.375,\n"        # test 2 ends
    )
    (tmp_path / "metrics.csv").write_text(csv_text)
    run = load_run(tmp_path / "metrics.csv")
    assert run.test_metrics() == {"test/acc_step/dataloader_idx_1": 0.125, "test/acc_epoch/dataloader_idx_1": 0.375}
    assert run.series["train/loss"].values == [0.5]
    assert any("test/acc_epoch, test/acc_step (not logged by the last test) are left out" in n for n in run.notes)


def test_test_rows_of_a_csv_without_an_epoch_column_are_noted_as_maybe_several_tests(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,test/acc,test/loss\n8,0.5,\n8,,0.25\n8,0.75,\n")
    run = load_run(tmp_path / "metrics.csv")
    assert run.test_metrics() == {"test/acc": 0.75, "test/loss": 0.25}
    assert f"{tmp_path / 'metrics.csv'} has no 'epoch' column to tell its tests apart: the test table shows each test " \
           "metric's last value, which may be of several tests" in run.notes


def test_one_test_of_several_loaders_is_kept_whole(tmp_path, one_thread):
    trainer = quiet_trainer(max_steps=1, logger=CSVLogger(tmp_path, name="csv"))
    task = TaskWithTest(BlockNet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, toy_loader())
        returned = trainer.test(task, [_loader(1), _loader(2)], verbose=False)
    run = load_run(tmp_path / "csv")
    expected = {key: value for per_loader in returned for key, value in per_loader.items()}
    assert run.test_metrics() == pytest.approx(expected, rel=1e-6) and len(expected) == 2
    assert not [n for n in run.notes if "test" in n]


def test_a_training_row_logging_a_test_named_key_ends_no_test(tmp_path):
    # Review R2: every training row holds the epoch, so one logging test_acc_proxy counted as a test's end; the real
    # test before the fit was dropped from the table as "an earlier test" (hand-written Lightning-shaped rows). Test
    # keys beside others cannot tell the tests apart (review R4: so does a test_step's acc): kept, and said.
    csv_text = (
        "epoch,step,test_loss,test_acc_proxy,train_loss\n"
        "0,0,0.75,,\n"            # trainer.test before the fit: its end row
        "0,0,,2.5,1.5\n"          # the fit's rows log the proxy beside the training loss
        "0,1,,2.25,1.25\n"
    )
    (tmp_path / "metrics.csv").write_text(csv_text)
    run = load_run(tmp_path / "metrics.csv")
    assert run.test_metrics()["test_loss"] == 0.75
    assert [n for n in run.notes if "test" in n] == [
        f"{tmp_path / 'metrics.csv'} logs test-named keys beside other keys (in training, or a test_step logging keys "
        "not named test): the test table shows each test metric's last value, which may be of several tests"]


def test_a_later_test_that_did_not_finish_leaves_the_finished_ones_metrics(tmp_path):
    # Review R2: a second trainer.test crashed after one per-batch row; the table showed that batch's loss as the
    # test's result and dropped the finished test's
    csv_text = (
        "epoch,step,test_loss_step,test_loss_epoch,train_loss\n"
        "0,3,,,0.5\n"
        ",0,0.25,,\n"             # test 1
        ",1,0.75,,\n"
        "0,4,,0.5,\n"             # test 1 ends
        ",0,0.125,,\n"            # test 2's first batch, then the crash
    )
    (tmp_path / "metrics.csv").write_text(csv_text)
    run = load_run(tmp_path / "metrics.csv")
    assert run.test_metrics() == {"test_loss_step": 0.75, "test_loss_epoch": 0.5}
    assert any("a test after its last finished one that wrote no end row" in n for n in run.notes)


def test_a_thread_count_saved_outside_main_is_not_put_back_by_a_later_main(one_thread_before):
    # Review R2: LightningActCLI run directly with --num_threads left its saved count, which a later main() that set
    # none "put back" over the user's own count
    from lightning_act.cli import LightningActCLI

    LightningActCLI(args=["fit", "--config", str(one_thread_before), "--num_threads", "2"])
    torch.set_num_threads(3)
    assert main(["report", "no_such_run"]) == 2
    assert torch.get_num_threads() == 3


def test_a_test_step_logging_a_key_not_named_test_is_noted_not_silently_mixed(tmp_path):
    # Review R4: the first review fix took a test's end row holding `acc` for a training row: two tests (two loaders,
    # then one) were shown as one result without a note
    csv_text = (
        "acc/dataloader_idx_0,acc/dataloader_idx_1,acc,epoch,step,test_loss/dataloader_idx_0,"
        "test_loss/dataloader_idx_1,test_loss\n"
        "0.5,0.25,,0,4,1.5,1.25,\n"      # test 1, two loaders
        ",,0.75,0,4,,,1.75\n"             # test 2, one loader
    )
    (tmp_path / "metrics.csv").write_text(csv_text)
    run = load_run(tmp_path / "metrics.csv")
    assert run.test_metrics() == {"test_loss/dataloader_idx_0": 1.5, "test_loss/dataloader_idx_1": 1.25,
                                  "test_loss": 1.75}
    assert any("logs test-named keys beside other keys" in n and "may be of several tests" in n for n in run.notes)
