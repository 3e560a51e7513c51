"""The monitors on the shared fused pass (issue 17): one pass per tapped tensor for every monitor, the
histogram median of MassiveActivations against numpy, and DimensionalCollapse's sketch of wide taps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lightning_act.capture.registry as registry_module
from _interpreter import run_interpreted
from _toy import ToyTask, quiet_trainer, tiny_mlp, toy_loader
from lightning_act.callbacks import ActivationSparsity, ActivationStats, MassiveActivations
from lightning_act.callbacks.collapse import DimensionalCollapse


def test_one_fused_pass_per_forward_serves_every_monitor_of_a_tap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], object]] = []
    real = registry_module.fused_statistics

    def counting(x, spec, implementation="auto"):
        calls.append((tuple(x.shape), spec))
        return real(x, spec, implementation)

    monkeypatch.setattr(registry_module, "fused_statistics", counting)
    monitors = [
        ActivationSparsity(modules=["net.2"], every_n_steps=1, threshold=0.01),
        ActivationStats(modules=["net.2"], every_n_steps=1),
        MassiveActivations(modules=["net.2"], every_n_steps=1, min_fit_points=6),
    ]
    trainer = quiet_trainer(max_steps=2, callbacks=monitors)
    trainer.fit(ToyTask(tiny_mlp()), toy_loader(batch_size=8))
    assert len(calls) == 2  # one ReLU output per step, read once for all three monitors
    spec = calls[0][1]
    assert spec.thresholds == (0.0, 0.01) and spec.moments and spec.median is not None and spec.massive is not None and spec.column_max
    zero_frac = trainer.callback_metrics["sparsity/net.2/zero_frac"].item()
    assert 0.0 < zero_frac < 1.0  # ReLU of random inputs: some zeros, not all
    exact_zeros = trainer.callback_metrics["act/net.2/zero_frac"].item()  # ActivationStats counts |x| <= 0
    assert 0.0 < exact_zeros <= zero_frac


@pytest.mark.parametrize("shape", [(4, 33, 16), (3, 50), (2, 6, 5, 7)])
def test_massive_median_is_the_histogram_estimate_within_one_bin(shape: tuple[int, ...]) -> None:
    # The monitor's per-sample median is now estimated from a log-magnitude histogram (no sort); its
    # relative error is at most one bin's relative width (1.56%) whatever the distribution.
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(shape, generator=generator) * torch.logspace(-2, 2, shape[-1])
    monitor = MassiveActivations(modules=["x"])
    monitor.taps = [SimpleNamespace(name="x")]
    monitor._reset_buffers(1)
    monitor.receive(0, h)
    monitor.complete_partials()  # the logging step's batched conversion of what receive kept
    stats = monitor.summarize(0, monitor._sums[0], monitor._maxima[0], monitor._samples[0].reshape(1, -1))
    magnitude = np.abs(h.double().numpy()).reshape(shape[0], -1)
    medians = np.median(magnitude, axis=1)
    tolerance = monitor.bins.relative_width
    assert abs(stats["median"].item() / medians.mean() - 1) <= tolerance
    assert abs(stats["ratio"].item() / np.mean(magnitude.max(axis=1) / medians) - 1) <= tolerance
    assert stats["top1"].item() == pytest.approx(magnitude.max(), rel=1e-6)


def test_wide_collapse_tap_uses_the_exact_sketch() -> None:
    # d = 40 > wide_dim = 16 and 12 rows per due step (k = 12 < d): the sketch path, exact for rank <= k.
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(12, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 40, generator=generator, dtype=torch.float64)
    rows = rows + 0.01 * torch.randn(12, 40, generator=generator, dtype=torch.float64)
    monitor = DimensionalCollapse(modules=["x"], max_rows=12, wide_dim=16, param_patterns=[])
    monitor.taps = [SimpleNamespace(name="x")]
    monitor._reset_buffers(1)
    monitor.receive(0, rows[:6].float())  # two micro-batches of one due step
    monitor.receive(0, rows[6:].float())
    assert monitor._sums[0].numel() < 40 * 40  # the d x d sums were not formed
    stats = monitor.summarize(0, monitor._sums[0], None, None)
    x = rows.float().double().numpy()
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True) * x.shape[0]), 0, None)
    eigenvalues[eigenvalues < 1e-12 * eigenvalues.max()] = 0.0  # round-off of the rank-11 scatter
    sigma = np.sqrt(eigenvalues)  # Roy & Vetterli: the entropy of the normalised singular values
    p = sigma / sigma.sum()
    erank = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
    pr = eigenvalues.sum() ** 2 / np.sum(eigenvalues**2)
    assert stats["erank"].item() == pytest.approx(erank, rel=1e-6)
    assert stats["pr"].item() == pytest.approx(pr, rel=1e-6)
    assert stats["erank_frac"].item() == pytest.approx(erank / 40, rel=1e-6)


def test_collapse_ranks_with_and_without_the_batched_preparation_match_numpy() -> None:
    # two taps of one width: flush prepares both ranks in one batch; summarize alone (no preparation) computes them
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(30, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 8, generator=generator,
                                                                                       dtype=torch.float64)
            for _ in range(2)]
    expected = []
    for rows in data:
        x = rows.numpy()
        eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True) * x.shape[0]), 0, None)
        eigenvalues[eigenvalues < 1e-12 * eigenvalues.max()] = 0.0  # the rank-4 scatter's round-off
        sigma = np.sqrt(eigenvalues)
        p = sigma[sigma > 0] / sigma.sum()
        expected.append((np.exp(-np.sum(p * np.log(p))), eigenvalues.sum() ** 2 / np.sum(eigenvalues**2)))
    monitor = DimensionalCollapse(modules=["a", "b"], max_rows=64, param_patterns=[])
    monitor.taps = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    monitor._reset_buffers(2)
    for i, rows in enumerate(data):
        monitor.receive(i, rows)
    monitor.complete_partials()  # the logging step's batched product of what receive kept
    sums = {i: monitor._sums[i].clone() for i in range(2)}
    monitor.prepare_summaries(sums)
    prepared = [monitor.summarize(i, sums[i], None, None) for i in range(2)]
    alone = [monitor.summarize(i, sums[i], None, None) for i in range(2)]  # the prepared ranks were used up
    for stats in (prepared, alone):
        for (erank, pr), tap in zip(expected, stats):
            assert tap["erank"].item() == pytest.approx(erank, rel=1e-9)
            assert tap["pr"].item() == pytest.approx(pr, rel=1e-9)
            assert tap["pr_frac"].item() == pytest.approx(pr / 8, rel=1e-9)


def test_skipped_emergence_fits_are_recorded_for_the_report_only_with_a_logger(tmp_path, monkeypatch) -> None:
    import json

    from lightning.pytorch.loggers import CSVLogger

    logged = MassiveActivations(modules=["net.2"], every_n_steps=1)
    trainer = quiet_trainer(max_steps=2, callbacks=[logged], logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(ToyTask(tiny_mlp()), toy_loader(batch_size=8))
    recorded = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "monitors" / "skipped.json").read_text())
    assert "net.2" in recorded["massive"]["emergence fit"]  # 2 ratio points, the fit needs 6

    (tmp_path / "bare").mkdir()
    monkeypatch.chdir(tmp_path / "bare")
    silent = MassiveActivations(modules=["net.2"], every_n_steps=1)
    trainer = quiet_trainer(max_steps=2, callbacks=[silent], default_root_dir=str(tmp_path / "bare"))
    trainer.fit(ToyTask(tiny_mlp()), toy_loader(batch_size=8))
    assert silent.fit_skipped and list((tmp_path / "bare").iterdir()) == []  # logger=False writes nothing


TRITON_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import lightning.pytorch as pl
from _toy import BlockNet, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationSparsity, ActivationStats, MassiveActivations
from lightning_act.capture import capture_registry
from lightning_act.stats import fused

fused.exact_median_is_cheaper = lambda entries, bins: False  # the Triton path reads every median from the histogram
histories = {}
for accumulate in (1, 2):
    for how in ("triton", "torch"):
        pl.seed_everything(0)
        task = ToyTask(BlockNet())
        capture_registry(task).fused_implementation = how  # the code path a CUDA run takes, or the eager fallback
        monitors = [ActivationSparsity(every_n_steps=1, threshold=0.05), ActivationStats(every_n_steps=1),
                    MassiveActivations(every_n_steps=1, abs_threshold=1.0, ratio_threshold=3.0, top_k=2)]
        trainer = quiet_trainer(max_steps=3 - accumulate, callbacks=monitors, accumulate_grad_batches=accumulate)
        trainer.fit(task, toy_loader(batch_size=8))
        histories[f"{how} {accumulate}"] = {key: s.values for m in monitors for key, s in m.history.items()}
with open(sys.argv[2], "w") as handle:
    json.dump(histories, handle)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_monitors_on_the_triton_path_log_what_the_eager_fallback_logs(tmp_path: Path) -> None:
    # Whole fits through the Triton kernels (CPU interpreter) against the eager fallback on the same seed: the
    # finishing kernel, the atomic massive counts and the monitors' stacked logging step end to end; with two
    # micro-batches per step, MassiveActivations' per-activation route too.
    output = tmp_path / "histories.json"
    run_interpreted(TRITON_FIT, output)
    histories = json.loads(output.read_text())
    for accumulate in (1, 2):
        triton, eager = histories[f"triton {accumulate}"], histories[f"torch {accumulate}"]
        assert set(triton) == set(eager) and any(key.startswith("massive/") for key in triton)
        assert any(max(values) > 0 for key, values in eager.items() if key.startswith("massive/") and key.endswith("/count"))
        for key, values in eager.items():
            # counts, maxima, medians and positions agree exactly; sums to float32-block rounding (~1e-6)
            np.testing.assert_allclose(triton[key], values, rtol=2e-6, atol=1e-9, err_msg=f"{key}, accumulate {accumulate}")
