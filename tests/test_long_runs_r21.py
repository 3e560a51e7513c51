"""Long runs (round 21): thinned histories of layers that missed a value line up, the emergence fit's cost per layer
is bounded, and the fused CPU pass's scratch does not outlive the monitors."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_act.stats.fused as fused
import lightning_act.stats.massive as massive
from lightning_act.callbacks import ActivationStats, MassiveActivations
from lightning_act.callbacks.history import BoundedSeries


# ------------------------------------------------------------------------------ thinned histories line up
def test_a_history_that_missed_a_value_keeps_the_same_steps_as_one_that_did_not() -> None:
    # Hand-worked: capacity 8, steps 0..39 (grid 1). Steps 0..39 hold 40 grid indices; the smallest power of two s with
    # 39 // s + 1 < 8 is 8 (4 gives 10), so the kept steps are 0, 8, 16, 24, 32. Before: `b`, which missed step 0,
    # kept every 8th of its own appends, 1, 9, 17, 25, 33: no step in common with `a`.
    a, b = BoundedSeries(capacity=8), BoundedSeries(capacity=8)
    for step in range(40):
        a.append(step, 1.0)
        if step != 0:
            b.append(step, 1.0)
    assert a.steps == [0, 8, 16, 24, 32]
    assert b.steps == [8, 16, 24, 32]


@pytest.mark.parametrize("every_n_steps", [1, 50])
def test_histories_line_up_after_every_due_step_whatever_they_missed(every_n_steps: int) -> None:
    # Layer `b` misses a random tenth of the due steps (an unknown value is not appended; the monitor only tells the
    # series the step passed). After every due step its kept steps must be `a`'s less the ones it missed, and both
    # stay under the capacity.
    capacity = 16
    rng = np.random.default_rng(0)
    missed = set((rng.choice(2000, size=200, replace=False) * every_n_steps).tolist())
    a, b = BoundedSeries(capacity), BoundedSeries(capacity)
    for due in range(2000):
        step = due * every_n_steps
        a.append(step, float(due))
        if step in missed:
            b.advance(step)
        else:
            b.append(step, float(due))
        assert set(b.steps) == set(a.steps) - missed, f"after step {step}"
        assert len(a) < capacity and len(b) < capacity
    assert a.values == [step / every_n_steps for step in a.steps]  # each value stays with its step
    # spans the run: the kept steps are every stride-th due step from 0, the last within a stride of the end
    assert a.steps == list(range(0, 2000 * every_n_steps, a.stride * every_n_steps))


def test_a_restored_history_that_missed_a_value_keeps_what_an_uninterrupted_complete_one_keeps() -> None:
    # Steps 0, 10, ..., 990 (grid 10, indices 0..99); capacity 8: 99 // 16 + 1 = 7 < 8 (99 // 8 + 1 = 13), so every
    # 16th index is kept: steps 0, 160, ..., 960. The restored history missed step 0 before its checkpoint.
    straight, first_half = BoundedSeries(8), BoundedSeries(8)
    for step in range(0, 1000, 10):
        straight.append(step, float(step))
        if 0 < step < 500:
            first_half.append(step, float(step))
    resumed = BoundedSeries.from_state_dict(first_half.state_dict())
    for step in range(500, 1000, 10):
        resumed.append(step, float(step))
    assert straight.steps == list(range(0, 1000, 160))
    assert resumed.steps == list(range(160, 1000, 160))


def test_a_history_saved_before_round_21_resumes_on_the_step_grid() -> None:
    # A checkpoint written by the old scheme (every stride-th append; keys "stride" and "seen"): layer `b` missed step
    # 0 and held 1, 3, 5, 7, 9 after steps 1..9. Resumed to step 39 at capacity 8 it keeps the steps the grid scheme
    # keeps (0, 8, 16, 24, 32) that it still has: its old odd steps are dropped (step 8 was gone at the checkpoint), and
    # 16, 24, 32 come after the resume. Before, it went on keeping every 8th append: 1, 9, 17, 25, 33.
    saved = {"capacity": 8, "stride": 2, "seen": 9, "steps": [1, 3, 5, 7, 9], "values": [1.0, 3.0, 5.0, 7.0, 9.0]}
    resumed = BoundedSeries.from_state_dict(saved)
    for step in range(10, 40):
        resumed.append(step, float(step))
    assert resumed.steps == [16, 24, 32] and resumed.values == [16.0, 24.0, 32.0]


@pytest.mark.parametrize("first, second", [(1000, 999), (10, 25)])
def test_a_history_resumed_with_another_interval_keeps_its_capacity_worth_of_points(first: int, second: int) -> None:
    # Every `first` steps to 200 000, resumed every `second` steps to 2 000 000, capacity 512. Before: the grid fell to
    # gcd(first, second) (1 for 1000 and 999), the index range grew by the interval ratio, and the series held 1 point
    # (1000 -> 999) or 88 (10 -> 25). Now the grid is the resumed interval: the largest index is
    # 2 000 000 // second, the stride the smallest power of two with index // stride + 1 < 512, and one step per kept
    # index (the first: the old finer steps share an index of the new grid).
    before, after = list(range(0, 200_001, first)), list(range((200_000 // second + 1) * second, 2_000_001, second))
    first_fit = BoundedSeries(512)
    for step in before:
        first_fit.append(step, float(step))
    resumed = BoundedSeries.from_state_dict(first_fit.state_dict())
    for step in after:
        resumed.append(step, float(step))
    steps = np.array(before + after, dtype=np.int64)
    stride = 1
    while 2_000_000 // second // stride + 1 >= 512:
        stride *= 2
    index = steps // second
    on_stride = steps[index % stride == 0]
    _, first_of_index = np.unique(on_stride // second, return_index=True)
    expected = on_stride[first_of_index]
    assert resumed.steps == expected.tolist() and resumed.values == expected.astype(np.float64).tolist()
    assert 256 <= len(resumed.steps) < 512 and sum(s > 200_000 for s in resumed.steps) >= 256


class _NanAtOneCall(nn.Module):
    def __init__(self, nan_call: int) -> None:
        super().__init__()
        self.calls, self.nan_call = 0, nan_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float("nan") if self.calls == self.nan_call else x


class _TwoTaps(pl.LightningModule):
    """`a` is finite throughout; `b` (watched on a detached copy) is all-NaN at one step (its ``nan_call``-th)."""

    def __init__(self, nan_call: int) -> None:
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(8, 8), nn.Identity(), _NanAtOneCall(nan_call)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        self.b(hidden.detach())
        return self.a(hidden)[:, :4]

    def training_step(self, batch, batch_index):  # noqa: ANN001, ANN201
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _quiet_trainer(max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def _fit_two_taps(max_steps: int, nan_call: int) -> ActivationStats:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=8)
    monitor = ActivationStats(modules=["a", "b"], every_n_steps=1, history_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quiet_trainer(max_steps, [monitor]).fit(_TwoTaps(nan_call), data)
    return monitor


def test_a_layer_unknown_at_the_first_due_step_keeps_the_other_layers_steps_in_a_fit() -> None:
    # 40 due steps, history_size 8: as in the hand-worked case above, the kept steps are 0, 8, 16, 24, 32 (`b`'s rms is
    # unknown at step 0). Before: `b` kept 1, 9, 17, 25, 33 and the heatmap had ten columns, each half blank.
    monitor = _fit_two_taps(max_steps=40, nan_call=1)
    series = monitor.series("rms")
    assert series["a"].steps == [0, 8, 16, 24, 32]
    assert series["b"].steps == [8, 16, 24, 32]
    assert monitor.heatmap_steps(series) == [0, 8, 16, 24, 32]


def test_a_layer_unknown_at_the_last_due_step_is_thinned_with_the_others() -> None:
    # 29 due steps, history_size 8: at step 28 the stride becomes 8 (28 // 4 + 1 = 8 is not under 8; 28 // 8 + 1 = 4),
    # so the kept steps are 0, 8, 16, 24. `b` is unknown at step 28: unless the step reaches its history anyway, it
    # stays at stride 4 (0, 4, ..., 24) and the heatmap gets columns 4, 12, 20 with `a` blank.
    monitor = _fit_two_taps(max_steps=29, nan_call=29)
    series = monitor.series("rms")
    assert series["a"].steps == series["b"].steps == [0, 8, 16, 24]


# ------------------------------------------------------------------------------ emergence fit's cost per layer
@pytest.fixture
def counted_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the fit evaluates its model (scipy's evaluations, and one per start for its residual)."""
    calls = [0]
    model = massive._reparametrised_model

    def counting(*args: float) -> np.ndarray:
        calls[0] += 1
        return model(*args)

    monkeypatch.setattr(massive, "_reparametrised_model", counting)
    return calls


def _noisy_climb(seed: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(0.0, 2001.0, 20.0)
    clean = 50.0 * np.exp(-0.5 * (0.01 * steps + 1.0)) * np.log(0.01 * steps + 1.0) + 20.0
    return steps, clean + np.random.default_rng(seed).normal(0.0, 0.05 * np.ptp(clean), steps.shape)


def test_the_starts_share_one_evaluation_budget(counted_evaluations: list[int]) -> None:
    # This history's four starts take 15, 20, 129 and 1735 evaluations. Before, each start had the whole budget: 300
    # each gave 15 + 20 + 129 + 300 (the last start exhausted) = 464 evaluations.
    steps, noisy = _noisy_climb(1)
    fit = massive.fit_emergence(steps, noisy, max_evaluations=300)
    assert counted_evaluations[0] <= 300 + 4  # + one residual per start
    x = fit.gamma * steps + fit.t0
    fitted = fit.a * np.exp(-fit.lam * x) * np.log(x) + fit.k
    r2 = 1.0 - np.sum((fitted - noisy) ** 2) / np.sum((noisy - noisy.mean()) ** 2)
    assert fit.r2 == pytest.approx(r2, rel=1e-6) and fit.r2 > 0.5


@pytest.mark.parametrize("points", [8, 12, 25, 200])
def test_a_flat_noisy_history_is_skipped_before_any_iterative_fit(points: int, counted_evaluations: list[int]) -> None:
    # Noise around a constant: before, 8 or 25 points ran all four starts to 5,000 evaluations each (3-10 s per layer)
    # and 200 points returned a "fit" with R² 0.01.
    for seed in range(3):
        values = 10.0 + 0.1 * np.random.default_rng(seed).normal(size=points)
        with pytest.raises(ValueError, match="flat or noise"):
            massive.fit_emergence(np.arange(points) * 50.0, values)
    assert counted_evaluations[0] == 0


def test_the_monitor_skips_a_flat_layer_with_the_reason_and_fits_a_short_clean_climb() -> None:
    monitor = MassiveActivations()
    flat = 10.0 + 0.1 * np.random.default_rng(0).normal(size=200)
    for due, value in enumerate(flat):
        monitor.record("massive/blocks.0/ratio", 50 * due, float(value))
    # 8 checkpoints of a log climb with 1% noise: not flat, fitted closely (checked against the clean curve)
    steps = np.arange(0.0, 400.0, 50.0)
    clean = 5.0 + 3.0 * np.log(1.0 + steps / 20.0)
    noisy = clean + 0.01 * np.ptp(clean) * np.random.default_rng(0).normal(size=steps.shape)
    for step, value in zip(steps, noisy):
        monitor.record("massive/blocks.1/ratio", int(step), float(value))
    fits = monitor.fit_emergence()
    assert list(fits) == ["blocks.1"] and "flat or noise" in monitor.fit_skipped["blocks.0"]
    assert fits["blocks.1"].r2 > 0.99 and np.max(np.abs(fits["blocks.1"](steps) - clean)) < 0.05 * np.ptp(clean)


# ------------------------------------------------------------------------------ the CPU pass's scratch
def test_released_scratch_holds_nothing_and_the_next_pass_is_still_exact() -> None:
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    fused.fused_statistics(x, fused.moment_spec(), implementation="torch")
    assert fused._cpu_scratch  # the finite CPU pass reuses its buffers
    fused.release_cpu_scratch()
    assert fused._cpu_scratch == {}
    stats = fused.fused_statistics(x, fused.moment_spec(), implementation="torch")
    exact = x.numpy().astype(np.float64)
    assert float(stats.value("sum")) == pytest.approx(exact.sum(), rel=1e-12, abs=1e-9)
    assert float(stats.value("sq_sum")) == pytest.approx(np.sum(exact**2), rel=1e-12)
    fused.release_cpu_scratch()


class _OneTap(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.tap = nn.Linear(64, 64), nn.Identity()

    def training_step(self, batch, batch_index):  # noqa: ANN001, ANN201
        return F.cross_entropy(self.tap(self.fc(batch[0]))[:, :4], batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_no_scratch_is_retained_after_the_monitors_teardown() -> None:
    # Before: the fused CPU pass kept its buffers (16 bytes per entry of the largest tap) for the rest of the process.
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 64, generator=g), torch.zeros(16, dtype=torch.long)), batch_size=8)
    monitors = [ActivationStats(modules="tap", every_n_steps=1), MassiveActivations(modules="tap", every_n_steps=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quiet_trainer(2, monitors).fit(_OneTap(), data)
    assert fused._cpu_scratch == {}
