"""Alarm rule and continuous-monitoring metrics on hand-built timelines (answers worked by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_act.errors import LightningActError
from lightning_act.eval.seizure_alarms import (
    AlarmReport,
    combine_reports,
    evaluate_alarms,
    evaluate_recordings,
    proportion_interval,
    raise_alarms,
    rate_interval,
)

TIMES = np.arange(1, 11) * 10.0  # window end times 10, 20, ..., 100 s
PROBS = np.array([0.9, 0.1, 0.9, 0.9, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9])
# positives:          1    0    1    1    0    0    1    1    1    1
# positives among the last n=4 windows (index max(0,i-3)..i):
#   i=0:1  i=1:1  i=2:2  i=3:3  i=4:2  i=5:2  i=6:2  i=7:2  i=8:3  i=9:4
# so k=3 holds at i=3 (t=40), i=8 (t=90), i=9 (t=100).


def test_k_of_n_with_refractory_period() -> None:
    # refractory 25 s: 40 fires; 90 >= 40+25 fires; 100 < 90+25 suppressed.
    np.testing.assert_array_equal(raise_alarms(TIMES, PROBS, 0.5, k=3, n=4, refractory_s=25.0), [40.0, 90.0])


def test_refractory_boundary_is_inclusive() -> None:
    # refractory 60 s: 40 fires; 90 < 100 suppressed; 100 >= 40+60 fires exactly at the boundary.
    np.testing.assert_array_equal(raise_alarms(TIMES, PROBS, 0.5, k=3, n=4, refractory_s=60.0), [40.0, 100.0])


def test_refractory_longer_than_recording_gives_one_alarm() -> None:
    np.testing.assert_array_equal(raise_alarms(TIMES, PROBS, 0.5, k=3, n=4, refractory_s=1000.0), [40.0])


def test_one_of_one_without_refractory_alarms_at_every_positive_window() -> None:
    np.testing.assert_array_equal(
        raise_alarms(TIMES, PROBS, 0.5, k=1, n=1, refractory_s=0.0), [10.0, 30.0, 40.0, 70.0, 80.0, 90.0, 100.0]
    )


def test_short_history_at_recording_start_and_threshold_equality() -> None:
    # k=2 of n=3: at i=1 only two windows exist, both positive (0.5 >= 0.5 counts) -> alarm at t=20;
    # at i=2 the count is still 2 but 30 < 20 + 20 (refractory) -> suppressed.
    np.testing.assert_array_equal(raise_alarms([10.0, 20.0, 30.0], [0.5, 0.7, 0.0], 0.5, k=2, n=3, refractory_s=20.0), [20.0])
    # with a 10 s refractory period the same stream alarms again at 30 >= 20 + 10.
    np.testing.assert_array_equal(
        raise_alarms([10.0, 20.0, 30.0], [0.5, 0.7, 0.0], 0.5, k=2, n=3, refractory_s=10.0), [20.0, 30.0]
    )
    np.testing.assert_array_equal(raise_alarms([10.0, 20.0], [0.49, 0.49], 0.5, k=1, n=1), np.zeros(0))


def test_alarm_rule_rejects_bad_arguments() -> None:
    with pytest.raises(LightningActError, match="k <= n"):
        raise_alarms(TIMES, PROBS, k=5, n=3)
    with pytest.raises(LightningActError, match="increasing order"):
        raise_alarms([20.0, 10.0], [0.9, 0.9])
    with pytest.raises(LightningActError, match="same length"):
        raise_alarms([10.0, 20.0], [0.9])


def _two_seizure_report() -> AlarmReport:
    # 2 h recording, H = 900 s, post-ictal 600 s; seizures [3000, 3060) and [6000, 6030).
    # alarm 1000: next onset 3000 is 2000 s away (> H), not in a seizure       -> false
    # alarm 2200: 3000 - 2200 = 800 in (0, 900]                                -> true
    # alarm 2500: 3000 - 2500 = 500                                            -> true
    # alarm 3000: exactly at onset (lead 0, not a prediction); in [3000, 3660) -> ignored
    # alarm 3100: in [3000, 3660), next onset 2900 s away                      -> ignored
    # alarm 4000: past 3660, 6000 - 4000 = 2000                                -> false
    # alarm 5100: 6000 - 5100 = 900 = H (inclusive)                            -> true
    # alarm 7000: past 6630, no onset after it                                 -> false
    alarms = [1000.0, 2200.0, 2500.0, 3000.0, 3100.0, 4000.0, 5100.0, 7000.0]
    return evaluate_alarms(alarms, [3000.0, 6000.0], 7200.0, ends_s=[3060.0, 6030.0], horizon_s=900.0, postictal_s=600.0)


def test_sensitivity_false_alarms_and_lead_time_by_hand() -> None:
    report = _two_seizure_report()
    assert (report.n_true_alarms, report.n_false_alarms, report.n_ignored_alarms) == (3, 3, 2)
    # seizure 1: earliest alarm in [2100, 3000) is 2200 -> lead 800 s; seizure 2: 5100 -> lead 900 s.
    assert report.n_predicted == 2 and report.sensitivity == 1.0
    assert report.lead_times_s == [800.0, 900.0]
    assert report.mean_lead_time_s == 850.0
    # blocked [2100, 3660) = 1560 s and [5100, 6630) = 1530 s -> interictal 7200 - 3090 = 4110 s.
    assert report.interictal_hours == pytest.approx(4110.0 / 3600.0)
    assert report.false_detections_per_hour == pytest.approx(3 * 3600.0 / 4110.0)


def test_alarm_just_beyond_horizon_is_false_and_seizure_missed() -> None:
    # onset 3000, alarm at 2099 (lead 901 > 900): false, seizure not predicted; 1 h recording.
    report = evaluate_alarms([2099.0], [3000.0], 3600.0, ends_s=[3050.0], horizon_s=900.0, postictal_s=600.0)
    assert (report.n_false_alarms, report.n_predicted, report.sensitivity) == (1, 0, 0.0)
    assert math.isnan(report.mean_lead_time_s)
    # blocked [2100, 3650) clipped to the recording end 3600 -> 1500 s; interictal 2100 s.
    assert report.interictal_hours == pytest.approx(2100.0 / 3600.0)


def test_seizure_near_start_clips_the_blocked_interval() -> None:
    # onset 300 with H = 900: blocked [-600, 960) clipped to [0, 960) -> interictal 3600 - 960 = 2640 s.
    report = evaluate_alarms([], [300.0], 3600.0, ends_s=[360.0], horizon_s=900.0, postictal_s=600.0)
    assert report.interictal_hours == pytest.approx(2640.0 / 3600.0)
    assert report.sensitivity == 0.0 and report.false_detections_per_hour == 0.0


def test_close_seizures_share_alarms_and_overlapping_blocks_merge() -> None:
    # seizures [1000, 1010) and [1500, 1520), H = 900, post-ictal 600, 1 h.
    # alarm 900: leads 100 (to 1000) and 600 (to 1500) -> one true alarm predicting both.
    # alarm 1200: in post-ictal of seizure 1 but 1500 - 1200 = 300 -> true (clustered seizure).
    # blocked [100, 1610) U [600, 2120) = [100, 2120) = 2020 s -> interictal 1580 s.
    report = evaluate_alarms([900.0, 1200.0], [1000.0, 1500.0], 3600.0, ends_s=[1010.0, 1520.0])
    assert (report.n_true_alarms, report.n_false_alarms, report.n_predicted) == (2, 0, 2)
    assert report.lead_times_s == [100.0, 600.0]  # seizure 2: earliest alarm in [600, 1500) is 900
    assert report.interictal_hours == pytest.approx(1580.0 / 3600.0)


def test_seizure_free_recording_and_pooling() -> None:
    free = evaluate_alarms([600.0], [], 3600.0)
    assert math.isnan(free.sensitivity)
    assert (free.n_false_alarms, free.interictal_hours) == (1, 1.0)
    pooled = combine_reports([_two_seizure_report(), free])
    # (3 + 1) false alarms over (4110 + 3600) s; 2 of 2 seizures; leads 800 and 900.
    assert pooled.false_detections_per_hour == pytest.approx(4 * 3600.0 / 7710.0)
    assert pooled.sensitivity == 1.0 and pooled.mean_lead_time_s == 850.0


def test_onsets_without_ends_block_only_the_horizon() -> None:
    # onset 1800, no end given: blocked [900, 1800 + 600) = 1500 s -> interictal 2100 s.
    report = evaluate_alarms([1900.0], [1800.0], 3600.0, horizon_s=900.0, postictal_s=600.0)
    assert report.n_ignored_alarms == 1
    assert report.interictal_hours == pytest.approx(2100.0 / 3600.0)


def test_evaluate_recordings_groups_and_sorts_windows_per_recording() -> None:
    # recording 0: windows every 60 s; positive from t=2400 to 2580 -> k=2 of n=2 first holds at 2460
    #   -> alarm 2460, onset 3000 follows after 540 s: predicted.
    # recording 1 (seizure-free, 1 h): positives at 600 and 660 -> alarm at 660: false.
    t0 = np.arange(60.0, 3601.0, 60.0)
    p0 = ((t0 >= 2400) & (t0 <= 2580)).astype(float)
    t1 = np.arange(60.0, 3601.0, 60.0)
    p1 = ((t1 == 600) | (t1 == 660)).astype(float)
    rec = np.concatenate([np.zeros(len(t0)), np.ones(len(t1))])
    times = np.concatenate([t0, t1])
    probs = np.concatenate([p0, p1])
    shuffle = np.random.default_rng(0).permutation(len(rec))
    report = evaluate_recordings(
        rec[shuffle], times[shuffle], probs[shuffle], [[(3000.0, 3060.0)], []], [3600.0, 3600.0], k=2, n=2
    )
    assert (report.n_predicted, report.n_true_alarms, report.n_false_alarms) == (1, 1, 1)
    assert report.lead_times_s == [540.0]
    # interictal: rec 0 blocks [2100, 3600) -> 2100 s; rec 1 3600 s.
    assert report.interictal_hours == pytest.approx(5700.0 / 3600.0)


def test_seizures_of_neighbouring_files_make_their_alarms_ignored_and_their_time_not_interictal() -> None:
    # One 1-h CHB-MIT file; the next file's seizure sits at 3700-3760 s of this file's clock and the previous
    # file's at -100 to -50 s. H = 900, post-ictal 600.
    # alarm 200: in the previous seizure's post-ictal period (< -50 + 600) -> ignored.
    # alarm 1000: nothing near -> false.  alarm 3300: 400 s before the next file's onset -> ignored, not false
    #   (it was false before: the per-file evaluation did not know that seizure).
    # blocked: [-1000, 550) and [2800, 4360), clipped to [0, 3600): 550 + 800 s -> interictal 2250 s.
    nearby = [(3700.0, 3760.0), (-100.0, -50.0)]
    report = evaluate_alarms([200.0, 1000.0, 3300.0], [], 3600.0, nearby_s=nearby)
    assert (report.n_seizures, report.n_true_alarms, report.n_false_alarms, report.n_ignored_alarms) == (0, 0, 1, 2)
    assert report.interictal_hours == pytest.approx(2250.0 / 3600.0)
    # evaluate_recordings forwards them per recording: positives at 3240 and 3300 -> (k=2 of n=2) alarm 3300.
    times = np.arange(60.0, 3601.0, 60.0)
    probs = ((times == 3240) | (times == 3300)).astype(float)
    pooled = evaluate_recordings(np.zeros(len(times)), times, probs, [[]], [3600.0], k=2, n=2, nearby_seizures=[nearby])
    assert (pooled.n_false_alarms, pooled.n_ignored_alarms) == (0, 1)
    assert pooled.interictal_hours == pytest.approx(2250.0 / 3600.0)
    with pytest.raises(LightningActError, match="one of each per recording"):
        evaluate_recordings(np.zeros(len(times)), times, probs, [[]], [3600.0], nearby_seizures=[])


def test_exact_intervals_by_hand() -> None:
    # Clopper-Pearson at 0/n and n/n has closed forms: upper = 1 - (alpha/2)^(1/n), lower = (alpha/2)^(1/n).
    assert proportion_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)), rel=1e-9)
    assert proportion_interval(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0), rel=1e-9)
    # Poisson: 0 events in 100 h -> upper = -ln(0.025) / 100; 1 event -> lower solves 1 - e^-m = 0.025,
    # upper solves e^-m (1 + m) = 0.025 (found here by bisection).
    assert rate_interval(0, 100.0) == pytest.approx((0.0, -math.log(0.025) / 100.0), rel=1e-9)
    lo, hi = 0.0, 20.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.exp(-mid) * (1 + mid) > 0.025 else (lo, mid)
    assert rate_interval(1, 2.0) == pytest.approx((-math.log(0.975) / 2.0, lo / 2.0), rel=1e-9)
    assert all(math.isnan(v) for v in proportion_interval(0, 0) + rate_interval(0, 0.0))


def test_nan_probabilities_and_recordings_without_an_entry_are_one_line() -> None:
    times = np.arange(60.0, 601.0, 60.0)
    probs = np.ones_like(times)
    probs[3] = math.nan
    with pytest.raises(LightningActError, match="1 of 10 window probabilities are NaN .first at t = 240 s"):
        raise_alarms(times, probs)  # before: NaN < threshold, read as a confident negative
    rec = np.array([0] * 10 + [1] * 10)
    both = np.concatenate([times, times])
    with pytest.raises(LightningActError, match=r"windows of recordings \[1\] have no seizure list or duration"):
        evaluate_recordings(rec, both, np.zeros(20), [[]], [600.0])  # before: recording 1's windows vanished
    with pytest.raises(LightningActError, match="1 seizure lists, 2 durations and 1 nearby-seizure lists"):
        evaluate_recordings(rec, both, np.zeros(20), [[]], [600.0, 600.0])
    with pytest.raises(LightningActError, match="one entry per window"):
        evaluate_recordings(rec[:5], both, np.zeros(20), [[], []], [600.0, 600.0])
