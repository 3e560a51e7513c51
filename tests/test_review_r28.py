"""Round 28's review findings on the round's own changes: the fused specs made once per settings, a -0.0 threshold
beside 0.0, and a triton blocked in ``sys.modules`` read as absent."""

from __future__ import annotations

import sys

import numpy as np
import torch

from lightning_act._triton import triton_import_problem
from lightning_act.stats.fused import fused_statistics, moment_spec, zero_spec


def test_thresholds_given_as_tensors_each_count_at_their_own_value() -> None:
    # a 0-d tensor's repr rounds to four decimals: a cache keyed on it gave the first threshold's spec to the second
    x = torch.linspace(0.0, 1.0, 100_001, dtype=torch.float64)
    for threshold in (0.50001, 0.50004):
        spec = zero_spec(torch.tensor(threshold, dtype=torch.float64))
        stats = fused_statistics(x, spec, "torch")
        expected = int((np.abs(x.numpy()) <= threshold).sum())
        assert spec.thresholds == (threshold,)
        assert stats.at_most(threshold).item() == expected


def test_a_negative_zero_threshold_beside_zero_reads_the_same_count() -> None:
    # ActivationSparsity(threshold=-0.0) beside ActivationStats(zero_threshold=0.0): the union kept one zero and the
    # other's lookup raised KeyError 'at_most:-0.0' at the first due step
    x = torch.tensor([[0.0, -0.0, 1.0, -2.0, 0.0]])
    stats = fused_statistics(x, zero_spec(-0.0).union(moment_spec(0.0)), "torch")
    assert stats.at_most(-0.0).item() == stats.at_most(0.0).item() == 3


def test_a_triton_blocked_in_sys_modules_is_absent_not_broken(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    triton_import_problem.cache_clear()
    try:
        assert triton_import_problem() is None
    finally:
        triton_import_problem.cache_clear()
