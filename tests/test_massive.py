"""MassiveActivations: planted massive activations, numpy medians, the emergence fit, resume, Trainer."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks.massive import MassiveActivations
from lightning_act.stats.massive import (
    emergence_peak,
    fit_emergence,
    massive_partials,
    merge_topk,
    summarize_massive,
    topk_positions,
    topk_stats,
)


def planted_hidden_states() -> torch.Tensor:
    """(B=3, T=5, D=8) small values with massive entries planted at known places."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    h[1, 3, 6] = -2500.0  # massive: > 100 and ~3000x the median of sample 1
    h[0, 3, 6] = 300.0  # same position, smaller: the position keeps its largest value
    h[0, 0, 2] = 500.0  # > 100, but only ~700x the median: not counted
    h[2, 4, 1] = 90.0  # below the absolute threshold of 100: not counted
    return h


def test_planted_massive_activation_value_position_and_count() -> None:
    h = planted_hidden_states()
    sums, maxima = massive_partials(h)
    stats = summarize_massive(sums, maxima)
    top = topk_stats(topk_positions(h, 3), 3)

    magnitude = np.abs(h.numpy()).reshape(3, -1)
    medians = np.median(magnitude, axis=1)
    assert 500.0 / medians[0] < 1000 < 2500.0 / medians[1]
    assert stats["top1"].item() == 2500.0
    assert stats["count"].item() == 1
    assert stats["median"].item() == pytest.approx(medians.mean(), rel=1e-6)
    assert stats["ratio"].item() == pytest.approx(np.mean(magnitude.max(axis=1) / medians), rel=1e-6)
    assert (top["top0_value"].item(), top["top0_token"].item(), top["top0_feature"].item()) == (2500.0, 3, 6)
    assert (top["top1_value"].item(), top["top1_token"].item(), top["top1_feature"].item()) == (500.0, 0, 2)
    assert (top["top2_value"].item(), top["top2_token"].item(), top["top2_feature"].item()) == (90.0, 4, 1)


@pytest.mark.parametrize("shape", [(4, 7, 5), (4, 6, 5), (6, 9), (2, 3, 4, 5)])
def test_median_and_ratio_match_numpy_for_odd_even_and_other_layouts(shape: tuple[int, ...]) -> None:
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sums, maxima = massive_partials(h, abs_threshold=1.0, ratio_threshold=2.0)
    stats = summarize_massive(sums, maxima)
    magnitude = np.abs(h.numpy()).reshape(shape[0], -1)
    medians = np.median(magnitude, axis=1)
    assert stats["median"].item() == pytest.approx(medians.mean(), rel=1e-12)
    assert stats["ratio"].item() == pytest.approx(np.mean(magnitude.max(axis=1) / medians), rel=1e-12)
    expected_count = sum(int(np.sum((m > 1.0) & (m >= 2.0 * med))) for m, med in zip(magnitude, medians))
    assert stats["count"].item() == expected_count


def test_the_median_of_finite_values_near_the_bfloat16_limit_is_finite() -> None:
    # The two middle magnitudes of [3e38, -2.5e38, 2.8e38, 1] sum to 5.3e38, beyond float32 (round 17: median inf,
    # ratio 0); numpy's median of the same magnitudes, in float64, is 2.65e38.
    h = torch.tensor([[3e38, -2.5e38, 2.8e38, 1.0]], dtype=torch.bfloat16)
    magnitude = np.abs(h.float().numpy().astype(np.float64))
    median = float(np.median(magnitude))
    stats = summarize_massive(*massive_partials(h, abs_threshold=1.0, ratio_threshold=2.0))
    assert stats["median"].item() == pytest.approx(median, rel=1e-6)
    assert stats["ratio"].item() == pytest.approx(magnitude.max() / median, rel=1e-6)


def test_conv_layout_positions_are_spatial_tokens_and_channel_features() -> None:
    h = torch.zeros(2, 4, 3, 5)  # (B, C, H, W)
    h[1, 2, 1, 3] = 7.0
    top = topk_stats(topk_positions(h, 1), 1)
    assert (top["top0_token"].item(), top["top0_feature"].item()) == (1 * 5 + 3, 2)


def test_split_batches_merge_to_the_whole_batch_statistics() -> None:
    h = planted_hidden_states()
    k = 4
    whole_sums, whole_max = massive_partials(h)
    parts = [massive_partials(h[:1]), massive_partials(h[1:])]
    torch.testing.assert_close(whole_sums, parts[0][0] + parts[1][0])
    assert torch.equal(whole_max, torch.maximum(parts[0][1], parts[1][1]))
    merged = merge_topk(torch.stack([topk_positions(h[:1], k), topk_positions(h[1:], k)]), k)
    assert torch.equal(merged, topk_positions(h, k))


def test_merge_topk_of_one_buffer_is_that_buffer() -> None:
    # one rank's buffer is already merged (distinct positions, largest first, NaN slots last): merging it with an
    # empty buffer, the general path, gives it back, and so does the one-buffer shortcut
    buffer = torch.tensor([[9.0, 5.0, float("nan")], [0.0, 2.0, float("nan")], [3.0, 1.0, float("nan")]]).reshape(-1)
    empty = torch.full_like(buffer, float("nan"))
    torch.testing.assert_close(merge_topk(torch.stack([buffer, empty]), 3), buffer.double(), equal_nan=True)
    torch.testing.assert_close(merge_topk(buffer.double().reshape(1, -1), 3), buffer.double(), equal_nan=True)


def test_merge_topk_treats_nan_slots_as_absent() -> None:
    absent = torch.full((9,), float("nan"), dtype=torch.float64)
    present = torch.tensor([5.0, 2.0, float("nan"), 1.0, 0.0, float("nan"), 3.0, 4.0, float("nan")], dtype=torch.float64)
    merged = merge_topk(torch.stack([absent, present]), 3).reshape(3, 3)
    assert merged[:, :2].tolist() == [[5.0, 2.0], [1.0, 0.0], [3.0, 4.0]]
    assert torch.isnan(merged[:, 2]).all()


# ------------------------------------------------------------------------------ emergence model
def generated_curve(t: np.ndarray, a: float, lam: float, gamma: float, t0: float, k: float) -> np.ndarray:
    """The Hidden Dynamics model written out independently of the code under test."""
    x = gamma * t + t0
    return a * np.exp(-lam * x) * np.log(x) + k


@pytest.mark.parametrize(
    "params", [(50.0, 0.5, 0.01, 1.0, 20.0), (200.0, 0.3, 0.005, 1.5, 40.0), (30.0, 1.0, 0.02, 0.5, 5.0)]
)
def test_emergence_fit_recovers_known_parameters_and_peak(params: tuple[float, ...]) -> None:
    a, lam, gamma, t0, k = params
    steps = np.arange(0.0, 2001.0, 20.0)
    clean = generated_curve(steps, *params)
    noisy = clean + np.random.default_rng(0).normal(0.0, 0.002 * np.ptp(clean), steps.shape)
    fit = fit_emergence(steps, noisy)

    assert fit.r2 > 0.99
    assert fit.a == pytest.approx(a, rel=0.15)
    assert fit.lam == pytest.approx(lam, rel=0.1)
    assert fit.gamma == pytest.approx(gamma, rel=0.1)
    assert fit.t0 == pytest.approx(t0, rel=0.1)
    assert fit.k == pytest.approx(k, abs=0.01 * np.ptp(clean))
    dense = np.linspace(0.0, 2000.0, 400001)
    assert fit.peak_step == pytest.approx(dense[np.argmax(generated_curve(dense, *params))], rel=0.03)


def test_emergence_fit_r2_is_the_same_at_any_scale_of_the_history() -> None:
    # R² is scale-free: a history 1e160 times larger (its squared residuals overflow float64) gets the R² of the
    # original, computed here in numpy from the fitted curve.
    steps = np.arange(0.0, 2001.0, 20.0)
    clean = generated_curve(steps, 50.0, 0.5, 0.01, 1.0, 20.0)
    noisy = clean + np.random.default_rng(1).normal(0.0, 0.05 * np.ptp(clean), steps.shape)
    fit = fit_emergence(steps, noisy)
    fitted = generated_curve(steps, fit.a, fit.lam, fit.gamma, fit.t0, fit.k)
    want = 1.0 - np.sum((fitted - noisy) ** 2) / np.sum((noisy - noisy.mean()) ** 2)
    assert 0.5 < fit.r2 < 0.99 and fit.r2 == pytest.approx(want, rel=1e-6)
    with np.errstate(over="raise"):
        huge = fit_emergence(steps, noisy * 1e160)
    assert huge.r2 == pytest.approx(want, rel=1e-6)


def test_emergence_fit_of_a_pure_log_climb_has_no_peak() -> None:
    steps = np.arange(0.0, 1001.0, 50.0)
    values = 3.0 * np.log(0.01 * steps + 1.0) + 2.0
    fit = fit_emergence(steps, values)
    assert fit.r2 > 0.999
    assert fit.lam == pytest.approx(0.0, abs=1e-3)
    assert math.isnan(fit.peak_step) or fit.peak_step > 10 * steps[-1]


def test_emergence_peak_is_the_maximum_of_the_curve() -> None:
    dense = np.linspace(0.0, 1000.0, 1000001)
    for lam, gamma, t0 in [(1.0, 0.01, 1.0), (0.2, 0.05, 0.3), (3.0, 0.002, 0.9)]:
        expected = dense[np.argmax(generated_curve(dense, 1.0, lam, gamma, t0, 0.0))]
        assert emergence_peak(1.0, lam, gamma, t0) == pytest.approx(expected, abs=2e-3)
    assert math.isnan(emergence_peak(1.0, 0.0, 0.01, 1.0))  # pure log climb: no peak
    assert math.isnan(emergence_peak(1.0, 1.0, 0.01, 5.0))  # peak before step 0: not observable


def test_a_trough_is_not_a_peak() -> None:
    steps = np.arange(0.0, 2001.0, 20.0)
    fit = fit_emergence(steps, generated_curve(steps, -50.0, 0.5, 0.01, 1.0, 20.0))
    assert fit.a == pytest.approx(-50.0, rel=0.05) and math.isnan(fit.peak_step)


def test_emergence_fit_refuses_too_few_points_and_constant_histories() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        fit_emergence(np.arange(5.0), np.arange(5.0))
    with pytest.raises(ValueError, match="constant"):
        fit_emergence(np.arange(8.0), np.full(8, 3.0))


# ------------------------------------------------------------------------------ the callback
class Block(nn.Module):
    def __init__(self, width: int, planted: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        spike = torch.zeros(width)
        spike[2] = planted
        self.register_buffer("spike", spike)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mlp(h)
        return torch.cat([h[:, :1] + self.spike, h[:, 1:]], dim=1)


class TinyTransformerish(pl.LightningModule):
    """Blocks over (B, T, D) whose second block plants 5000 at (token 0, feature 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8, 0.0), Block(8, 5000.0)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 1:].mean(dim=1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def read_csv_columns(path: str) -> dict[str, list[float]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows if row[key] != ""] for key in rows[0]}


def test_massive_monitor_in_trainer_fit_logs_positions_fits_and_resumes(tmp_path) -> None:
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, 8, generator=generator), torch.randint(0, 2, (32,), generator=generator))
    monitor = MassiveActivations(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=8, logger=CSVLogger(tmp_path, name="csv"), callbacks=[monitor], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    trainer.fit(TinyTransformerish(), DataLoader(data, batch_size=8))
    columns = read_csv_columns(trainer.loggers[0].experiment.metrics_file_path)

    assert [tap.name for tap in monitor.taps] == ["blocks.0", "blocks.1"]
    assert len(columns["massive/blocks.1/top1"]) == 8
    assert all(v > 4000 for v in columns["massive/blocks.1/top1"])
    assert set(columns["massive/blocks.1/top0_token"]) == {0.0}
    assert set(columns["massive/blocks.1/top0_feature"]) == {2.0}
    assert all(v == 8 for v in columns["massive/blocks.1/count"])  # one per sample, 8 samples per step
    assert all(v == 0 for v in columns["massive/blocks.0/count"])
    assert all(v > 1000 for v in columns["massive/blocks.1/ratio"])

    # at the end of fit every layer's 8-point ratio history was fitted or skipped with a reason
    assert set(monitor.fits) | set(monitor.fit_skipped) == {"blocks.0", "blocks.1"}
    for layer in monitor.fits:
        assert len(columns[f"massive/{layer}/fit_r2"]) == 1 and f"massive/{layer}/fit_K" in columns
    plots = tmp_path / "csv" / "version_0" / "plots"
    assert (plots / "massive_ratio_heatmap.png").exists()
    assert (plots / "massive_ratio_emergence_fits.png").exists() == bool(monitor.fits)

    restored = MassiveActivations()
    restored.load_state_dict(monitor.state_dict())
    assert restored.series("ratio")["blocks.1"].values == monitor.series("ratio")["blocks.1"].values
    assert restored.fits == monitor.fits and restored.fit_skipped == monitor.fit_skipped


def test_fit_emergence_on_demand_skips_short_histories_and_survives_resume() -> None:
    monitor = MassiveActivations()
    steps = np.arange(0, 2001, 40)
    values = generated_curve(steps.astype(float), 50.0, 0.5, 0.01, 1.0, 20.0)
    for step, value in zip(steps, values):
        monitor.record("massive/blocks.0/ratio", int(step), float(value))
    for step in range(3):
        monitor.record("massive/blocks.1/ratio", step, 1.0 + step)
    fits = monitor.fit_emergence()
    assert list(fits) == ["blocks.0"] and fits["blocks.0"].r2 > 0.999
    assert "at least 6" in monitor.fit_skipped["blocks.1"]

    resumed = MassiveActivations()
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.fits["blocks.0"].as_dict() == fits["blocks.0"].as_dict()
    assert resumed.fit_skipped == monitor.fit_skipped
    for step in range(3, 8):
        resumed.record("massive/blocks.1/ratio", step, float(np.log(step + 2.0)))
    resumed.fit_emergence()
    assert len(resumed.series("ratio")["blocks.1"]) == 8
    assert "at least 6" not in resumed.fit_skipped.get("blocks.1", "")


def test_emergence_fit_converges_on_a_log_climb_with_five_percent_noise() -> None:
    """The Hidden Dynamics paper's per-model CV is 4–7%; 101 checkpoints (the paper has >= 27).
    With 200 evaluations scipy stopped early on seeds 0 and 2 and the fit failed as "no start converged"."""
    steps = np.arange(0.0, 10001.0, 100.0)
    clean = 5.0 + 30.0 * np.log(1.0 + steps / 500.0)
    for seed in range(4):
        noisy = clean * (1.0 + 0.05 * np.random.default_rng(seed).normal(size=steps.shape))
        fit = fit_emergence(steps, noisy)
        assert fit.r2 >= 0.95
        # The fit is close to the clean curve, not just to the noise.
        assert np.max(np.abs(fit(steps) - clean)) < 0.05 * np.ptp(clean)


def test_emergence_fit_reports_scipys_reason_when_no_start_converges() -> None:
    steps = np.arange(0.0, 2001.0, 50.0)
    noisy = (20.0 + 30.0 * np.log(1.0 + steps / 50.0)) * (1.0 + 0.05 * np.random.default_rng(0).normal(size=steps.shape))
    with pytest.raises(ValueError, match="maximum number of function evaluations"):
        fit_emergence(steps, noisy, max_evaluations=1)


class MixedShapes(pl.LightningModule):
    """Taps of three shapes in one model: two (B, 6, 8) blocks, a (B, 6, 12) widening and a (B, 12) pooled output;
    the second block and the widening plant massive entries."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8, 0.0), Block(8, 5000.0)])
        self.widen = nn.Linear(8, 12)
        self.pool = nn.Sequential(nn.Flatten(1), nn.Linear(72, 12))
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        wide = self.widen(x)
        wide = torch.cat([wide[:, :3], wide[:, 3:4] + 3000.0 * (torch.arange(12) == 7), wide[:, 4:]], dim=1)
        return self.head(self.pool(wide))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-6)  # the planted entries must not blow the weights up


class OutputRecorder(pl.Callback):
    """The training outputs of named modules per optimizer step, by a plain hook of the test's own."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.outputs, self.step = names, {}, None

    def on_fit_start(self, trainer, pl_module) -> None:
        modules = dict(pl_module.named_modules())
        for name in self.names:
            modules[name].register_forward_hook(
                lambda m, a, out, name=name: self.step is not None
                and self.outputs.setdefault((self.step, name), []).append(out.detach().double().numpy().copy())
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.step = None


@pytest.mark.parametrize("case", ["one forward per step", "two micro-batches per step", "top-k taken in the hook"])
def test_every_tap_of_a_mixed_model_matches_numpy(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The monitor turns all taps' statistics into partials and summaries at once at the logging step (one stacked
    # computation per output shape); each tap's logged values must still be numpy's on that tap's own outputs.
    import lightning_act.callbacks.massive as massive_module

    if case == "top-k taken in the hook":
        monkeypatch.setattr(massive_module, "DEFERRED_POSITIONS", 16)  # every tap here has more positions than that
    names = ["blocks.0", "blocks.1", "widen", "pool"]
    monitor = MassiveActivations(modules=names, every_n_steps=1, top_k=2)
    recorder = OutputRecorder(names)
    generator = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(32, 6, 8, generator=generator), torch.randint(0, 2, (32,), generator=generator))
    accumulate = 2 if case == "two micro-batches per step" else 1
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=3, callbacks=[monitor, recorder], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", accumulate_grad_batches=accumulate,
    )
    trainer.fit(MixedShapes(), DataLoader(data, batch_size=8 // accumulate))
    tolerance = monitor.bins.relative_width
    for step in range(3):
        for name in names:
            outputs = recorder.outputs[(step, name)]
            assert len(outputs) == accumulate
            h = np.abs(np.concatenate(outputs))
            rows = h.reshape(h.shape[0], -1)
            medians = np.median(rows, axis=1)
            logged = {stat: monitor.history[f"massive/{name}/{stat}"].values[step]
                      for stat in ("top1", "median", "ratio", "count", "count_per_sample")}
            assert logged["top1"] == pytest.approx(h.max(), rel=1e-6)
            assert abs(logged["median"] / medians.mean() - 1) <= tolerance
            assert abs(logged["ratio"] / np.mean(rows.max(1) / medians) - 1) <= tolerance
            count = ((rows > 100.0) & (rows >= 1000.0 * medians[:, None])).sum()
            assert logged["count"] == count and logged["count_per_sample"] == pytest.approx(count / rows.shape[0])
            # the two largest positions by their maximum over samples: (token, feature), or feature alone
            by_position = h.max(0).reshape(-1)
            order = np.argsort(-by_position, kind="stable")[:2]
            for j, flat in enumerate(order):
                assert monitor.history[f"massive/{name}/top{j}_value"].values[step] == pytest.approx(by_position[flat])
                if name == "pool":
                    assert f"massive/{name}/top{j}_token" not in monitor.history
                    assert monitor.history[f"massive/{name}/top{j}_feature"].values[step] == flat
                else:
                    token, feature = divmod(int(flat), h.shape[2])
                    assert monitor.history[f"massive/{name}/top{j}_token"].values[step] == token
                    assert monitor.history[f"massive/{name}/top{j}_feature"].values[step] == feature
    assert monitor.history["massive/blocks.1/count"].values == [8.0] * 3  # the planted entry, once per sample


def test_top_k_values_of_a_float64_activation_are_exact() -> None:
    """Before: the per-position maxima were rounded to float32 (4.4732227325 for 4.4732229500)."""
    from lightning_act.stats.fused import fused_statistics, topk_positions_from

    h = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h[1, 3, 4] = 4.473222950036799
    monitor = MassiveActivations()
    top = topk_positions_from(fused_statistics(h, monitor.fused_spec(0)), 2)
    expected = np.sort(np.abs(h.numpy()).max(axis=0).ravel())[::-1][:2]
    assert top[:2].tolist() == expected.tolist() and top[0].item() == 4.473222950036799


def test_a_ratio_left_undefined_by_an_all_zero_sample_is_not_logged(tmp_path) -> None:
    # A zero-padded sample has median 0 and max 0: its ratio is 0/0, so the layer's mean ratio is unknown at that step.
    # Before: logged as NaN (a metrics.csv value, a point in every plot); now left out with one warning, while
    # what is still defined (median, top1, count) is logged as usual.
    pl.seed_everything(0)
    x = torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(0))
    x[9] = 0.0  # second batch, second sample

    class KeepsZeroSamples(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.block(h) * (h.abs().sum((1, 2)) > 0).to(h.dtype)[:, None, None]

    class ZeroesItsInput(TinyTransformerish):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([KeepsZeroSamples(block) for block in self.blocks])

    monitor = MassiveActivations(modules=["blocks.0"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=2, logger=CSVLogger(tmp_path, name="csv"), callbacks=[monitor],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"MassiveActivations: blocks.0 ratio is unknown at step 1 \(.*all zero"):
        trainer.fit(ZeroesItsInput(), DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8))
    columns = read_csv_columns(trainer.loggers[0].experiment.metrics_file_path)
    assert len(columns["massive/blocks.0/ratio"]) == 1 and all(math.isfinite(v) for v in columns["massive/blocks.0/ratio"])
    assert monitor.history["massive/blocks.0/ratio"].steps == [0]
    assert monitor.history["massive/blocks.0/median"].steps == [0, 1]
    assert "massive/blocks.0/ratio" in trainer.callback_metrics  # step 0's value: the latest known
