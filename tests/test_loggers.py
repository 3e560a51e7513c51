"""CompactWandbLogger: one summary key per monitor statistic, per-layer detail to the summary and a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_act.loggers import CompactWandbLogger, compact_metrics


class FakeRun:
    """Stands in for ``wandb.Run``: records what the logger sends."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.summary: dict[str, float] = {}
        self.config = self

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(dict(data))

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:  # config.update
        pass

    def keys(self) -> set[str]:
        return {k for row in self.logged for k in row}


ZERO_FRAC = [0.1, 0.2, 0.6]
RATIO = [3.0, 7.0, math.nan]
ERANK_FRAC = [0.5, 0.2]


def monitor_metrics() -> dict[str, float]:
    metrics = {f"sparsity/blocks.{i}/zero_frac": v for i, v in enumerate(ZERO_FRAC)}
    metrics |= {f"sparsity/blocks.{i}/nonfinite": v for i, v in enumerate([0.0, 2.0, 0.0])}
    metrics |= {f"massive/blocks.{i}/ratio": v for i, v in enumerate(RATIO)}
    metrics |= {f"massive/blocks.{i}/top0_token": float(i) for i in range(3)}
    metrics |= {f"massive/blocks.{i}/top1_value": 5.0 + i for i in range(3)}
    metrics |= {f"massive/blocks.{i}/median": math.nan for i in range(3)}
    metrics |= {f"collapse/blocks.{i}/erank_frac": v for i, v in enumerate(ERANK_FRAC)}
    metrics |= {"collapse/params/r90": 4.0, "train/loss": 1.25}
    return metrics


def test_compact_metrics_reduce_over_layers() -> None:
    kept, detail = compact_metrics(monitor_metrics())
    assert kept == {
        "sparsity/mean/zero_frac": pytest.approx(float(np.mean(ZERO_FRAC))),
        "sparsity/max/nonfinite": 2.0,
        "massive/max/ratio": float(np.nanmax(RATIO)),
        "collapse/min/erank_frac": 0.2,
        "collapse/params/r90": 4.0,       # one module: its own key
        "train/loss": 1.25,
    }
    # nothing finite (median) → no key at all, never a placeholder; positions and top-k values are detail only
    assert len(detail) == len(monitor_metrics()) - 1
    assert ("massive", "blocks.2", "top0_token", 2.0) in detail


def test_logger_sends_summaries_per_step_and_the_layers_to_a_table() -> None:
    run = FakeRun()
    logger = CompactWandbLogger(experiment=run)
    logger.log_metrics(monitor_metrics(), step=10)
    logger.log_metrics({"train/loss": 1.0}, step=11)  # the step changes: step 10's monitor keys are logged
    reduced = next(row for row in run.logged if "massive/max/ratio" in row)
    assert reduced["trainer/global_step"] == 10 and reduced["massive/max/ratio"] == 7.0
    assert "massive/blocks.0/ratio" not in run.keys()
    assert run.summary["massive/blocks.1/ratio"] == 7.0 and "massive/blocks.2/ratio" not in run.summary  # NaN
    logger.finalize("success")
    tables = {k: v for row in run.logged for k, v in row.items() if k.endswith("/per_layer")}
    assert sorted(tables) == ["collapse/per_layer", "massive/per_layer", "sparsity/per_layer"]
    massive = tables["massive/per_layer"]
    assert massive.columns == ["step", "layer", "stat", "value"]
    assert [10, "blocks.1", "top0_token", 1.0] in massive.data and len(massive.data) == 12
    # a key logged as it is (one module) is in neither the table nor the summary a second time
    assert not any(row[1] == "params" for row in tables["collapse/per_layer"].data)
    assert "collapse/params/r90" not in run.summary


def test_the_summary_follows_a_statistic_that_turns_non_finite_and_a_skipped_layer_keeps_the_reduced_key() -> None:
    run = FakeRun()
    logger = CompactWandbLogger(experiment=run)
    logger.log_metrics({f"massive/blocks.{i}/{stat}": value for i in range(2)
                        for stat, value in (("top1", 2.0 + i), ("ratio", 0.99), ("count", 0.0))}, step=0)
    # step 1: block 0 blew up (top1 inf, ratio not measurable); block 1 was skipped (LayerDrop)
    logger.log_metrics({"massive/blocks.0/top1": math.inf, "massive/blocks.0/ratio": math.nan,
                        "massive/blocks.0/count": 8.0}, step=1)
    logger.finalize("success")  # logs the last step's monitor keys
    # before: the summary kept top1 2.0 and ratio 0.99 from step 0 beside step 1's count 8
    assert run.summary["massive/blocks.0/top1"] == math.inf and "massive/blocks.0/ratio" not in run.summary
    assert run.summary["massive/blocks.0/count"] == 8.0
    # before: step 1 logged "massive/blocks.0/count" as its own one-point key instead of the reduced one; before
    # round 26 the reduced top1 was left out too (an infinite value is a measurement: only NaN is left out)
    assert [sorted(k for k in row if k != "trainer/global_step") for row in run.logged[:2]] == [
        ["massive/max/count", "massive/max/ratio", "massive/max/top1"], ["massive/max/count", "massive/max/top1"],
    ]
    assert run.logged[1]["massive/max/top1"] == math.inf


def test_per_layer_logs_everything() -> None:
    run = FakeRun()
    CompactWandbLogger(experiment=run, per_layer=True).log_metrics(monitor_metrics(), step=3)
    assert run.keys() == set(monitor_metrics()) | {"trainer/global_step"}


def test_fewer_keys_in_a_real_fit(tmp_path: Path) -> None:
    """A Lightning demo model with two monitors: the keys W&B receives, per-layer vs compact."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_act.callbacks import ActivationSparsity, ActivationStats

    class TwoLayers(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.layer = __import__("torch").nn.Sequential(*[__import__("torch").nn.Linear(32, 32) for _ in range(3)])

    keys = {}
    for per_layer in (True, False):
        run = FakeRun()
        pl.seed_everything(0)
        trainer = pl.Trainer(
            max_steps=3, logger=CompactWandbLogger(experiment=run, per_layer=per_layer, save_dir=str(tmp_path)),
            default_root_dir=tmp_path, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=1,
            callbacks=[ActivationStats(modules="layer.*", every_n_steps=1), ActivationSparsity(modules="layer.*", every_n_steps=1)],
        )
        trainer.fit(TwoLayers())
        keys[per_layer] = {k for k in run.keys() if k.startswith(("act/", "sparsity/")) and not k.endswith("/per_layer")}
        assert {"act/per_layer", "sparsity/per_layer"} <= run.keys() or per_layer
    per_layer_stats = {k.split("/")[0] + "/" + k.split("/")[-1] for k in keys[True]}
    assert len(keys[True]) == 3 * len(per_layer_stats)     # three Linear layers, every statistic
    assert len(keys[False]) == len(per_layer_stats)        # one summary key per statistic
    assert {"act/max/abs_max", "act/mean/rms", "sparsity/mean/zero_frac"} <= keys[False]


FITS = {  # two layers' emergence fits as MassiveActivations logs them at the end of a fit; only blocks.0 has a peak
    "blocks.0": {"fit_A": 2.3e42, "fit_lambda": 96.3, "fit_gamma": 0.0142, "fit_t0": 0.984, "fit_K": 2.69, "fit_r2": 0.359,
                 "fit_peak_step": 41.0},
    "blocks.1": {"fit_A": -1.76e80, "fit_lambda": 179.5, "fit_gamma": 0.00674, "fit_t0": 0.997, "fit_K": 1.98, "fit_r2": 0.818},
}


def fit_metrics(fits: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"massive/{layer}/{name}": value for layer, fit in fits.items() for name, value in fit.items()}


def test_the_emergence_fit_is_one_layers_whole_fit_never_a_mix_of_layers() -> None:
    # before: massive/max/fit_A came from blocks.0 next to massive/max/fit_r2 (0.818) of blocks.1, a fit no layer has
    kept, detail = compact_metrics(fit_metrics(FITS))
    assert kept == {f"massive/blocks.1/{name}": value for name, value in FITS["blocks.1"].items()}  # the best R²
    assert len(detail) == len(fit_metrics(FITS))
    no_r2 = {layer: {**fit, "fit_r2": math.nan} for layer, fit in FITS.items()}
    assert compact_metrics(fit_metrics(no_r2))[0] == {}  # no fit to prefer: the summary and the table only

    run = FakeRun()
    logger = CompactWandbLogger(experiment=run)
    logger.log_metrics(fit_metrics(FITS), step=8)
    logger.finalize("success")
    assert run.logged[0] == {"trainer/global_step": 8, **kept}
    assert run.summary == {f"massive/blocks.0/{name}": value for name, value in FITS["blocks.0"].items()}
    table = next(row["massive/per_layer"] for row in run.logged if "massive/per_layer" in row)
    assert sorted(table.data) == sorted([8, "blocks.0", name, value] for name, value in FITS["blocks.0"].items())


def test_two_monitors_of_one_class_give_one_reduction_per_step_over_all_their_layers(tmp_path: Path) -> None:
    """ActivationStats on two layers every step and another on the third every 2 steps (one logger call each)."""
    import csv

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    from lightning_act.callbacks import ActivationStats

    class ThreeLayers(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])

    run = FakeRun()
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=4, logger=[CompactWandbLogger(experiment=run, save_dir=str(tmp_path)), CSVLogger(tmp_path, name="csv")],
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, log_every_n_steps=1,
        callbacks=[ActivationStats(modules=["layer.0", "layer.1"], every_n_steps=1),
                   ActivationStats(modules=["layer.2"], every_n_steps=2)],
    )
    trainer.fit(ThreeLayers())
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected: dict[str, dict[int, float]] = {"act/max/abs_max": {}, "act/mean/rms": {}}
    for step in sorted({int(row["step"]) for row in rows}):
        for reduced, stat, reduce in (("act/max/abs_max", "abs_max", np.max), ("act/mean/rms", "rms", np.mean)):
            values = [float(row[f"act/layer.{i}/{stat}"]) for row in rows if int(row["step"]) == step
                      for i in range(3) if row.get(f"act/layer.{i}/{stat}")]
            if values:
                expected[reduced][step] = float(reduce(np.array(values, dtype=np.float64)))
    assert sorted(expected["act/max/abs_max"]) == [0, 1, 2, 3]
    for key, per_step in expected.items():
        logged = [(row["trainer/global_step"], row[key]) for row in run.logged if key in row]
        # before: steps 0 and 2 had two points each, the first monitor's layers and then the third layer alone
        assert [step for step, _ in logged] == sorted(per_step)
        for step, value in logged:
            assert value == pytest.approx(per_step[step], rel=1e-6)


def test_the_per_layer_table_is_logged_in_parts_that_hold_every_row() -> None:
    run = FakeRun()
    logger = CompactWandbLogger(experiment=run)
    logger.table_part_rows = 5
    held = []
    for step in range(4):
        logger.log_metrics({f"sparsity/blocks.{i}/{stat}": 10.0 * step + i + (0.5 if stat == "count" else 0.0)
                            for i in range(3) for stat in ("zero_frac", "count")}, step=step)
        held.append(sum(len(rows) for rows in logger._layer_rows.values()))
    logger.finalize("success")
    parts = [(row.get("trainer/global_step"), row["sparsity/per_layer"]) for row in run.logged if "sparsity/per_layer" in row]
    # before: one table of all 24 rows at the end (W&B cuts a table past wandb.Table.MAX_ROWS, the newest steps first)
    assert [len(table.data) for _, table in parts] == [5, 5, 5, 5, 4]
    assert max(held) < 5  # memory is bounded by a part
    assert [step for step, _ in parts] == [table.data[-1][0] for _, table in parts]
    every_row = [row for _, table in parts for row in table.data]
    assert sorted(map(tuple, every_row)) == sorted(
        (step, f"blocks.{i}", stat, 10.0 * step + i + (0.5 if stat == "count" else 0.0))
        for step in range(4) for i in range(3) for stat in ("zero_frac", "count")
    )
