"""Round 26 fixes of DimensionalCollapse: a reused monitor after a fit that logged nothing, the wide-tap warning's
cause and fix, the restarted trajectory's step under manual optimization, one read of the model per snapshot, and
its flag and bound checks."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import DimensionalCollapse
from lightning_act.errors import LightningActError

from _toy import GAN, gan_loader, numpy_erank, quiet_trainer


def numpy_r90(rows: list[np.ndarray], fraction: float = 0.9) -> float:
    """Principal components holding ``fraction`` of the variance of the trajectory ``rows`` (float64 SVD)."""
    x = np.stack(rows)
    variances = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(np.searchsorted(np.cumsum(variances) / variances.sum(), fraction - 1e-12) + 1)


class HeadNet(pl.LightningModule):
    def __init__(self, crash: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.crash = crash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.crash:
            raise RuntimeError("a bug in training_step")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class RecordHead(pl.Callback):
    """The head's weights at fit start and after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[np.ndarray] = []

    def _record(self, pl_module: pl.LightningModule) -> None:
        self.weights.append(pl_module.head.weight.detach().double().flatten().numpy().copy())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._record(pl_module)


def head_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(96, 8, generator=g), torch.randint(0, 4, (96,), generator=g)),
                      batch_size=8)


@pytest.mark.filterwarnings("ignore")
def test_a_fit_after_one_that_crashed_at_its_first_step_follows_its_own_model() -> None:
    # Before: the crashed fit's fit-start snapshot (the OLD model's weights) stayed the trajectory's first point, as
    # nothing had been logged for begin_fit_state to clear: r90 [1,1,1,2,2,...] where numpy gives [1,1,1,1,1,2,...].
    monitor = DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=["head.weight"])
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="a bug in training_step"):
        quiet_trainer(max_steps=12, callbacks=[monitor]).fit(HeadNet(crash=True), head_loader())
    torch.manual_seed(2)
    record = RecordHead()
    quiet_trainer(max_steps=12, callbacks=[monitor, record]).fit(HeadNet(), head_loader())
    expected = [numpy_r90(record.weights[: s + 2]) for s in range(len(record.weights) - 1)]
    assert monitor.history["collapse/params/r90"].values == expected
    assert monitor._snapshot_steps[0] == -1
    np.testing.assert_array_equal(monitor._snapshots[0].numpy(), record.weights[0])


@pytest.mark.filterwarnings("ignore")
def test_a_further_fit_of_the_same_trainer_still_continues_the_trajectory() -> None:
    # The restart above must not catch a continuation whose last snapshot is labelled the step before it starts.
    torch.manual_seed(0)
    monitor = DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=["head.weight"])
    record = RecordHead()
    model = HeadNet()
    trainer = quiet_trainer(max_steps=4, callbacks=[monitor, record])
    trainer.fit(model, head_loader())
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model, head_loader())
    assert monitor._snapshot_steps == [-1, *range(8)]
    trajectory = record.weights[:5] + record.weights[6:]  # the further fit's start: the weights after step 3 again
    np.testing.assert_array_equal(np.stack([s.numpy() for s in monitor._snapshots]), np.stack(trajectory))
    assert monitor.history["collapse/params/r90"].values[-1] == numpy_r90(trajectory)


def test_a_wide_tap_run_several_times_per_step_says_its_numbers_and_a_fix_that_works() -> None:
    # Before: one line listing three causes, and "lower max_rows", which lowers the sketch's k with the rows it gets
    # (3 forwards x max_rows > max_rows + 1 whatever max_rows): nothing was logged after following it either.
    def fit(max_rows: int) -> tuple[DimensionalCollapse, list[str], list[np.ndarray]]:
        torch.manual_seed(0)
        model = GAN()
        outputs: list[np.ndarray] = []
        model.d[1].register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().numpy().copy()))
        monitor = DimensionalCollapse(modules=["d.1"], every_n_steps=1, max_rows=max_rows, wide_dim=8,
                                      param_patterns=[])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=4, callbacks=[monitor]).fit(model, gan_loader())
        said = [str(w.message) for w in caught if str(w.message).startswith("DimensionalCollapse: d.1 ")]
        return monitor, said, outputs

    monitor, said, _ = fit(4)
    assert "collapse/d.1/erank" not in monitor.history
    assert len(said) == 1
    # 3 forwards x 4 rows against a sketch of k = 4 rows (max_rows x 1 micro-batch x 1 rank): exact up to k + 1 = 5
    assert "got 12 rows at step 0" in said[0] and "k + 1 = 5" in said[0]
    assert "pass max_rows >= 16" in said[0] and "lower max_rows" not in said[0]
    assert "batch size 1" not in said[0] and "float32 projection" not in said[0]  # only the cause that happened
    # the advice followed: every step measured, the erank of all three forwards' rows (8 each, all kept)
    monitor, said, outputs = fit(16)
    assert not said
    series = monitor.history["collapse/d.1/erank"]
    assert series.steps == [0, 1]
    expected = [numpy_erank(np.concatenate(outputs[3 * s: 3 * s + 3])) for s in series.steps]
    np.testing.assert_allclose(series.values, expected, rtol=1e-6)


def test_a_tap_with_one_row_says_so_with_its_count() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    task = HeadNet()
    task.body, task.head = net[:2], net[2]
    monitor = DimensionalCollapse(modules=["body.1"], every_n_steps=1, param_patterns=[])
    loader = DataLoader(TensorDataset(torch.randn(2, 8), torch.randint(0, 4, (2,))), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(task, loader)
    said = [str(w.message) for w in caught if str(w.message).startswith("DimensionalCollapse: body.1 ")]
    assert said == [
        "DimensionalCollapse: body.1 gave 1 row at step 0: too few rows reached it to measure (a centred covariance "
        "needs 2 rows or more; a (batch, features) tap at batch size 1 gets one, an expert of a mixture of experts "
        "the tokens routed to it); nothing is logged for it at such steps (train with batches of 2 or more; an "
        "expert is measured at the steps its router sends it 2 tokens or more)"
    ]
    assert "collapse/body.1/erank" not in monitor.history


def test_a_restarted_trajectory_under_manual_optimization_counts_batches(tmp_path: Path) -> None:
    # Two optimizers: global_step counts 2 per batch, the monitors' step 1. Before: the resumed fit's new trajectory
    # was said to start "from step 12" and its first snapshot labelled 11, then 6, 7, 8, ...
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, patterns: list[str], ckpt: str | None = None) -> tuple[DimensionalCollapse, list[str]]:
        torch.manual_seed(0)
        monitor = DimensionalCollapse(modules=["d.1"], every_n_steps=1, param_patterns=patterns)
        trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=True, default_root_dir=str(tmp_path),
                                callbacks=[monitor, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(GAN(), gan_loader(48), ckpt_path=ckpt)
        return monitor, [str(w.message) for w in caught if "new trajectory" in str(w.message)]

    fit(1, ["d.*.weight"])  # 6 batches
    monitor, said = fit(2, ["g.*.weight"], str(tmp_path / "last.ckpt"))
    assert len(said) == 1 and re.search(r"from step (\d+)", said[0]).group(1) == "6"
    assert monitor._snapshot_steps == [5, *range(6, 12)]
    assert monitor.history["collapse/d.1/erank"].steps == list(range(12))


class Counting(nn.Module):
    """Counts the walks over the whole model (``named_modules``) made on it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(4)])
        self.walks = 0

    def named_modules(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self.walks += 1
        return super().named_modules(*args, **kwargs)


def test_a_snapshot_reads_the_weights_without_walking_the_model_twice() -> None:
    # Before: each due snapshot built a name -> module map of the whole model twice (for the shape check, then the
    # snapshot). The values are the weights as they are (float64, unprojected here), bitwise.
    import types

    torch.manual_seed(0)
    model = Counting()
    monitor = DimensionalCollapse(projection_dim=None)
    monitor.param_names = [f"blocks.{i}.0.weight" for i in range(4)]
    trainer = types.SimpleNamespace(lightning_module=model)
    for step in range(3):
        with torch.no_grad():
            for block in model.blocks:
                block[0].weight.add_(torch.randn(6, 6))
        model.walks = 0
        monitor.extra_statistics(trainer, step)
        assert model.walks <= 1
        expected = torch.cat([block[0].weight.detach().reshape(-1).double() for block in model.blocks])
        assert torch.equal(monitor._snapshots[-1], expected)
    assert monitor._snapshot_steps == [0, 1, 2]


def test_overlap_spectra_takes_a_bool_only_and_max_snapshots_names_its_bound() -> None:
    with pytest.raises(LightningActError, match=r"^DimensionalCollapse: overlap_spectra='no' must be True or False$"):
        DimensionalCollapse(overlap_spectra="no")
    with pytest.raises(LightningActError, match=r"^DimensionalCollapse: overlap_spectra=1 must be True or False$"):
        DimensionalCollapse(overlap_spectra=1)
    assert DimensionalCollapse(overlap_spectra=False).overlap_spectra is False
    for value in (3.0, 2):  # 3.0 said ">= 2", and 2 is refused too
        with pytest.raises(LightningActError, match=rf"^DimensionalCollapse: max_snapshots={value!r} .*>= 3$"):
            DimensionalCollapse(max_snapshots=value)
    assert DimensionalCollapse(max_snapshots=3).max_snapshots == 3


def test_under_ddp_the_wide_tap_warning_says_the_cause_the_global_row_count_tells(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reduced count of all ranks decides: 6 rows over k + 1 = 5 is an overflow; 4 rows within it leaves the mean
    # offset alone (before: all three causes and "lower max_rows"; until round 30, both causes a rank could not tell
    # apart from its own count).
    from lightning_act.callbacks import collapse

    monkeypatch.setattr(collapse, "distributed_world_size", lambda: 2)
    monitor = DimensionalCollapse(wide_dim=8, max_rows=2)
    monitor._sketch_dims = {0: (16, 4)}
    overflow = monitor._unmeasured_problem(0, 7, 6)
    assert overflow.startswith("got 6 rows at step 7 over 2 ranks, more than the k + 1 = 5")
    assert "float32" not in overflow and "max_rows >= 16" in overflow
    offset = monitor._unmeasured_problem(0, 7, 4)
    assert "float32 projection" in offset and "another rank" not in offset and "lower max_rows" not in offset
