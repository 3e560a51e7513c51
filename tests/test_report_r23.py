"""Round 23: W&B keys behind a logger prefix (dashboard images, CompactWandbLogger's summary) and a sweep trial's
test versions kept when the refusal's advice is followed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_loggers import FakeRun
from test_report import write_csv

from lightning_act.loggers import CompactWandbLogger
from lightning_act.report import build_report, load_run
from lightning_act.report.html import main
from lightning_act.report.wandb_dashboard import dashboard_spec, keys_from_run_dir


def media_panels(keys: list[str]) -> dict[str, tuple[str, ...]]:
    return {s.name: p.media_keys for s in dashboard_spec(keys) for p in s.panels if p.kind == "media"}


# ---------------------------------------------------------------- wandb-dashboard: images behind a logger prefix


def test_prefixed_images_go_to_their_monitors_media_panel_under_their_real_key() -> None:
    # Before: "fold1-plots/massive_ratio_heatmap" failed startswith("plots/") and became a *line* panel of "training";
    # the massive section had no media panel.
    keys = ["fold1-train/loss", "fold1-massive/model.blocks.0/ratio", "fold1-plots/massive_ratio_heatmap",
            "fold-a-plots/custom", "plots/sparsity_zero_frac_heatmap", "sparsity/model.blocks.0/zero_frac"]
    assert media_panels(keys) == {
        "sparsity: activation sparsity": ("plots/sparsity_zero_frac_heatmap",),
        "massive: massive activations": ("fold1-plots/massive_ratio_heatmap",),
        "plots": ("fold-a-plots/custom",),
    }
    training = next(s for s in dashboard_spec(keys) if s.name == "training")
    assert [p.metric_regex for p in training.panels] == [r"^(fold1\-train/loss)$"]


def write_run(root: Path, metric_key: str, wandb_prefix: str | None) -> Path:
    version = root / "csv" / "version_0"
    (version / "plots").mkdir(parents=True)
    (version / "metrics.csv").write_text(f"{metric_key},epoch,step\n3.5,0,0\n")
    (version / "plots" / "massive_ratio_heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    if wandb_prefix is not None:
        (root / "config.yaml").write_text(
            "trainer:\n  logger:\n"
            "    - class_path: lightning.pytorch.loggers.WandbLogger\n"
            f"      init_args: {{project: p, save_dir: runs/kat, prefix: '{wandb_prefix}'}}\n"
            "    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {save_dir: runs/kat, name: csv}\n"
        )
    return root


def test_run_dir_images_are_named_behind_the_wandb_loggers_prefix(tmp_path: Path) -> None:
    # Before: always "plots/<png stem>", a key a prefixed W&B run does not have (an empty media panel).
    key = "massive/model.blocks.0/ratio"
    configured = write_run(tmp_path / "configured", key, wandb_prefix="fold1")
    assert keys_from_run_dir(configured) == [key, "fold1-plots/massive_ratio_heatmap"]
    unprefixed = write_run(tmp_path / "unprefixed", key, wandb_prefix="")
    assert keys_from_run_dir(unprefixed) == [key, "plots/massive_ratio_heatmap"]
    # a fit from Python (no config): the prefix its CSV monitor keys carry
    from_python = write_run(tmp_path / "python", "fold-2-massive/model.blocks.0/ratio", wandb_prefix=None)
    assert keys_from_run_dir(from_python) == [
        "fold-2-massive/model.blocks.0/ratio", "fold-2-plots/massive_ratio_heatmap",
    ]


# ---------------------------------------------------------------- CompactWandbLogger: per-layer summary behind the prefix


def test_compact_logger_writes_its_per_layer_summary_behind_the_logger_prefix() -> None:
    # Before: the summary held "massive/blocks.0/ratio" while the history held "fold1-massive/max/ratio": two prefixed
    # loggers sharing a run overwrote each other's per-layer summary.
    run = FakeRun()
    logger = CompactWandbLogger(experiment=run, prefix="fold1")
    logger.log_metrics({"massive/blocks.0/ratio": 3.0, "massive/blocks.1/ratio": 7.0}, step=0)
    logger.log_metrics({"massive/blocks.0/ratio": 4.0, "massive/blocks.1/ratio": math.nan}, step=1)
    logger.finalize("success")
    # step 1: blocks.0 -> 4.0; blocks.1 not measurable, so its stale 7.0 is removed (under the prefixed key too)
    assert run.summary == {"fold1-massive/blocks.0/ratio": 4.0}
    assert [row["fold1-massive/max/ratio"] for row in run.logged if "fold1-massive/max/ratio" in row] == [7.0, 4.0]


# ---------------------------------------------------------------- a sweep's trials each with a test version


def write_sweep_with_tests(root: Path) -> list[Path]:
    """Two trials sharing ``CSVLogger(root, name="sweep")``, each ``fit`` (steps 0-3) then ``test`` in a new
    Trainer: version_0 fit, version_1 test, version_2 fit, version_3 test."""
    folders = []
    for trial, accuracy in enumerate((0.25, 0.5)):
        fit = root / "sweep" / f"version_{2 * trial}" / "metrics.csv"
        write_csv(fit, ["epoch", "step", "train/loss"], [{"epoch": 0, "step": s, "train/loss": 10.0 * (trial + 1) + s}
                                                          for s in range(4)])
        write_csv(root / "sweep" / f"version_{2 * trial + 1}" / "metrics.csv", ["epoch", "step", "test/acc"],
                  [{"epoch": 0, "step": 0, "test/acc": accuracy}])
        folders.append(fit.parent)
    return folders


def test_following_the_sweep_refusal_keeps_every_trials_test_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: the advice named version_0 and version_2, each read alone: no trial's test/acc on the page.
    trial_0, trial_1 = write_sweep_with_tests(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lightning_act report: error: '{tmp_path}' holds 2 runs: {trial_1} starts over at step 0 after {trial_0} "
        "trained past it (a sweep's trials in one logger folder?); pass each run's first version folder, read with "
        "the versions after it up to the next run (version_0 with version_1; version_2 with version_3), to compare "
        f"them: lightning_act report {trial_0} {trial_1}\n"
    )
    first, second = load_run(trial_0), load_run(trial_1)
    assert first.test_metrics() == {"test/acc": 0.25} and second.test_metrics() == {"test/acc": 0.5}
    assert first.series["train/loss"].values == [10.0, 11.0, 12.0, 13.0]
    assert second.series["train/loss"].values == [20.0, 21.0, 22.0, 23.0]
    assert [p.path.parent.name for p in first.parts] == ["version_0", "version_1"]
    page = build_report([trial_0, trial_1], tmp_path / "r.html").read_text()
    table = page[page.index("id='test'"):page.index("</table>", page.index("id='test'"))]
    assert "0.25" in table and "0.5" in table
    # a metrics.csv file is read alone, and a test version given alone does not take the next trial's fit
    assert load_run(trial_0 / "metrics.csv").test_metrics() == {}
    assert [p.path.parent.name for p in load_run(tmp_path / "sweep" / "version_1").parts] == ["version_1"]


def write_training(folder: Path, steps: list[int], offset: float) -> None:
    write_csv(folder / "metrics.csv", ["epoch", "step", "train/loss"],
              [{"epoch": 0, "step": step, "train/loss": offset + step / 1000} for step in steps])


def test_a_version_folder_is_read_up_to_a_next_trial_that_first_logs_after_step_0(tmp_path: Path) -> None:
    # Before: a version was seen as the next run only when it started over at step 0, so with log_every_n_steps=50
    # (first row at step 49) version_0 was read with version_3 (the next trial): trial 2's losses under trial 1's name.
    # A resume (its first step after the run's last) and a test version still come along.
    sweep = tmp_path / "sweep"
    write_training(sweep / "version_0", [49, 99, 149], 1.0)
    write_training(sweep / "version_1", [199, 249], 1.0)  # resumed from the step-150 save
    write_csv(sweep / "version_2" / "metrics.csv", ["epoch", "step", "test/acc"],
              [{"epoch": 0, "step": 249, "test/acc": 0.25}])
    write_training(sweep / "version_3", [49, 99, 149], 5.0)
    write_csv(sweep / "version_4" / "metrics.csv", ["epoch", "step", "test/acc"],
              [{"epoch": 0, "step": 149, "test/acc": 0.5}])
    first, second = load_run(sweep / "version_0"), load_run(sweep / "version_3")
    assert [p.path.parent.name for p in first.parts] == ["version_0", "version_1", "version_2"]
    assert first.series["train/loss"].steps == [49, 99, 149, 199, 249]
    assert first.series["train/loss"].values == [1.049, 1.099, 1.149, 1.199, 1.249]
    assert first.test_metrics() == {"test/acc": 0.25}
    assert any("read without version_3 and the versions after it: that version logs training from step 49, not after "
               "this run's last step 249" in note for note in first.notes)
    assert [p.path.parent.name for p in second.parts] == ["version_3", "version_4"]
    assert second.series["train/loss"].values == [5.049, 5.099, 5.149] and second.test_metrics() == {"test/acc": 0.5}


def test_a_version_folder_takes_in_the_resume_of_a_stop_during_validation(tmp_path: Path) -> None:
    # Before: a SIGTERM during the step-8 validation stopped the run before its val/loss row; the resume runs that
    # validation again (its first row, val/loss at step 7, the stopped run's last training step) and then trains
    # from step 8: read as the next trial, the resume and its val/loss were left out of version_0's run.
    run = tmp_path / "csv"
    write_training(run / "version_0", list(range(8)), 1.0)
    columns = ["epoch", "step", "train/loss", "val/loss"]
    write_csv(run / "version_1" / "metrics.csv", columns,
              [{"epoch": 0, "step": 7, "val/loss": 0.5},
               *({"epoch": 1, "step": s, "train/loss": 2.0 + s / 1000} for s in range(8, 16)),
               {"epoch": 1, "step": 15, "val/loss": 0.4}])
    log = load_run(run / "version_0")
    assert [p.path.parent.name for p in log.parts] == ["version_0", "version_1"]
    assert log.series["val/loss"].steps == [7, 15] and log.series["train/loss"].steps == list(range(16))
