"""The seizure benchmark's baseline feature and a smoke run of scripts/stan_benchmark.py --quick."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_act.data.eeg import band_power_ratio


def test_band_power_ratio_by_hand() -> None:
    # 5 s at 64 Hz: 5 Hz and 20 Hz sines complete whole cycles, so each lands in one FFT bin.
    t = np.arange(320) / 64.0
    theta, beta = np.sin(2 * np.pi * 5 * t), np.sin(2 * np.pi * 20 * t)
    windows = np.stack([
        np.stack([beta, beta]),  # all power in 13-30 Hz -> 1
        np.stack([theta, theta]),  # none -> 0
        np.stack([theta + beta, 2 * beta]),  # channel 1: 1/2; channel 2: 1 -> mean 0.75
    ])
    np.testing.assert_allclose(band_power_ratio(windows, 64.0), [1.0, 0.0, 0.75], atol=1e-9)


def test_quick_benchmark_runs_and_reports_every_method(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("stan_benchmark", Path(__file__).parents[1] / "scripts" / "stan_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stan_benchmark"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    summary = module.main(["--quick", "--json", str(tmp_path / "summary.json")])
    assert list(summary) == list(module.METHODS)
    for metrics in summary.values():
        assert metrics["seizures"] == 1 and metrics["interictal_hours"] == pytest.approx(1.5 - (900 + 60 + 600) / 3600, abs=0.02)
        assert 0.0 <= metrics["auroc"] <= 1.0 and not math.isnan(metrics["auroc"])
        assert metrics["fd_per_h_ci"][1] > 0  # an exact Poisson upper bound exists even with no false alarm
    assert (tmp_path / "summary.json").is_file()
