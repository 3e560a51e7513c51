"""Seed-level mean and Student-t interval, against a hand-worked case."""

from __future__ import annotations

import math

import pytest

from lightning_act.eval.intervals import format_interval, mean_interval


def test_hand_worked_t_interval() -> None:
    # 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302652729911275 -> half-width 4.3026527 / sqrt(3) = 2.4841377.
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2.0 - 2.484138, abs=1e-6) and high == pytest.approx(2.0 + 2.484138, abs=1e-6)
    assert format_interval((mean, low, high), 2) == "2.00 [-0.48, 4.48]"


def test_one_value_has_no_interval_and_signed_scaled_format() -> None:
    mean, low, high = mean_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)
    assert format_interval((mean, low, high), 1, signed=True, scale=100) == "+25.0"
    assert format_interval((-0.0, -0.0, 0.0), 1, signed=True) == "+0.0 [+0.0, +0.0]"
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_a_nan_value_makes_the_whole_interval_nan() -> None:
    assert all(math.isnan(v) for v in mean_interval([0.5, math.nan, 0.7]))  # before: an AttributeError from stdev


def test_an_infinite_value_and_a_percent_confidence() -> None:
    """Before: inf crashed inside ``statistics`` (AttributeError), and confidence=95 gave NaN bounds that printed as
    a one-seed mean."""
    assert all(math.isnan(v) for v in mean_interval([1.0, math.inf, 2.0]))
    with pytest.raises(ValueError, match=r"confidence=95 must be in \(0, 1\)"):
        mean_interval([0.81, 0.84, 0.86], confidence=95)
