"""Continuous-monitoring evaluation for seizure forecasting (pure numpy functions).

Protocol after Li et al. 2025 (STAN, arXiv 2511.01275) and the seizure-prediction literature:
a model scores every window of a continuous recording; an *alarm* is raised when ``k`` of the
last ``n`` window predictions are positive, and then no further alarm may be raised for a
refractory period.  Conventions (all times in seconds from the recording start):

* Window ``i`` is *positive* when ``p_i >= threshold``; its prediction is available at its end
  time ``t_i``.  The k-of-n count at ``i`` uses windows ``max(0, i-n+1) .. i`` in index order
  (fewer than ``n`` at the start of a recording).
* An alarm fires at ``t_i`` when the count is ``>= k`` and ``t_i >= t_last + refractory`` (no
  previous alarm: always).  The count is not reset by an alarm, so a run of positives that
  outlasts the refractory period raises another alarm at its first window past the period.
* An alarm at ``a`` is **true** iff a seizure onset ``s`` follows within the horizon
  ``H`` (15 min): ``0 < s - a <= H`` (an alarm exactly at the onset is not a prediction).
  Otherwise it is **ignored** if it falls in an ictal or post-ictal period
  ``[s, end + postictal)`` (the patient is having or recovering from a seizure), else **false**.
  No seizure-prediction horizon (intervention gap) is used, and an alarm near the end of the
  recording with no onset after it counts as false, unless a *nearby* seizure follows.
* *Nearby* seizures are other recordings' seizures in this recording's seconds (a CHB-MIT file's
  neighbours, :attr:`lightning_act.data.eeg.EEGRecording.nearby_seizures`). Files are not concatenated,
  so an alarm in ``[s - H, end + postictal)`` of a nearby seizure is **ignored** (the windows there are
  excluded from training labels too) and that span is not interictal; the seizure itself is counted,
  and its prediction judged, in its own recording.
* A seizure is **predicted** iff at least one alarm falls in ``[s - H, s)``; its **lead time** is
  ``s`` minus the earliest such alarm.  Sensitivity = predicted seizures / seizures.
* **Interictal time** = the monitored span ``[start, start + duration)`` minus the union of
  ``[s - H, end + postictal)`` over seizures; **FD/h** = false alarms / interictal hours.
  False alarms can only occur in interictal time (or past the last post-ictal period), so the
  ratio is the false-alarm rate during the time a false alarm is possible.
* Several recordings combine by summing counts and hours (:func:`combine_reports`), i.e. the
  pooled sensitivity and FD/h over all seizures and all interictal hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lightning_act.errors import LightningActError


@dataclass
class AlarmReport:
    """Counts behind the continuous-monitoring metrics; the metrics are derived properties."""

    n_seizures: int
    n_predicted: int
    n_true_alarms: int
    n_false_alarms: int
    n_ignored_alarms: int
    interictal_hours: float
    lead_times_s: list[float] = field(default_factory=list)

    @property
    def sensitivity(self) -> float:
        """Predicted seizures / all seizures (NaN without seizures)."""
        return self.n_predicted / self.n_seizures if self.n_seizures else math.nan

    @property
    def false_detections_per_hour(self) -> float:
        """False alarms / interictal hours (NaN without interictal time)."""
        return self.n_false_alarms / self.interictal_hours if self.interictal_hours > 0 else math.nan

    @property
    def mean_lead_time_s(self) -> float:
        """Mean over predicted seizures of onset minus earliest alarm in the horizon (NaN if none)."""
        return float(np.mean(self.lead_times_s)) if self.lead_times_s else math.nan

    def summary(self) -> dict[str, float]:
        return {
            "sensitivity": self.sensitivity,
            "false_detections_per_hour": self.false_detections_per_hour,
            "mean_lead_time_min": self.mean_lead_time_s / 60.0,
            "seizures": self.n_seizures,
            "predicted": self.n_predicted,
            "false_alarms": self.n_false_alarms,
            "interictal_hours": self.interictal_hours,
        }


def raise_alarms(
    times_s: np.ndarray,
    probabilities: np.ndarray,
    threshold: float = 0.5,
    k: int = 3,
    n: int = 5,
    refractory_s: float = 900.0,
) -> np.ndarray:
    """Alarm times from per-window probabilities: k of the last n positive, then a refractory period."""
    times = np.asarray(times_s, dtype=np.float64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if times.shape != probs.shape or times.ndim != 1:
        raise LightningActError(
            f"times {times.shape} and probabilities {probs.shape} must be 1-D and the same length; pass one value per window"
        )
    if not 1 <= k <= n:
        raise LightningActError(f"alarm rule needs 1 <= k <= n, got k={k}, n={n}; choose k no larger than n")
    if not 0.0 <= threshold <= 1.0:  # above 1 (or NaN) no window is positive: no alarm, sensitivity 0 without a word
        raise LightningActError(f"alarm threshold={threshold} is not a probability in [0, 1]; pass e.g. 0.5")
    if np.any(np.diff(times) < 0):
        raise LightningActError("window times are not in increasing order; sort the windows of a recording by time")
    missing = np.isnan(probs)
    if missing.any():  # a NaN compares as "below threshold": an alarm rule would read it as a confident negative
        raise LightningActError(
            f"{int(missing.sum())} of {len(probs)} window probabilities are NaN (first at t = {times[missing][0]:g} s); "
            "the model's outputs are not finite there: check its weights and inputs before evaluating alarms"
        )
    positive = (probs >= threshold).astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(positive)])
    index = np.arange(len(positive))
    counts = cumulative[index + 1] - cumulative[np.maximum(0, index - n + 1)]
    alarms: list[float] = []
    for i in np.flatnonzero(counts >= k):
        if not alarms or times[i] >= alarms[-1] + refractory_s:
            alarms.append(float(times[i]))
    return np.asarray(alarms, dtype=np.float64)


def _union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi)``."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, current_start, current_end = 0.0, None, None
    for a, b in clipped:
        if current_end is None or a > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_end is not None:
        total += current_end - current_start
    return total


def evaluate_alarms(
    alarm_times_s: np.ndarray,
    onsets_s: list[float] | np.ndarray,
    duration_s: float,
    ends_s: list[float] | np.ndarray | None = None,
    horizon_s: float = 900.0,
    postictal_s: float = 600.0,
    start_s: float = 0.0,
    nearby_s: list[tuple[float, float]] | None = None,
) -> AlarmReport:
    """Score alarms of one recording against its seizure onsets (conventions, and ``nearby_s``, in the module doc)."""
    alarms = np.asarray(alarm_times_s, dtype=np.float64)
    onsets = np.asarray(onsets_s, dtype=np.float64)
    ends = onsets.copy() if ends_s is None else np.asarray(ends_s, dtype=np.float64)
    if ends.shape != onsets.shape:
        raise LightningActError(f"{len(onsets)} onsets but {len(ends)} ends; pass one end time per seizure")
    nearby = np.asarray(nearby_s or [], dtype=np.float64).reshape(-1, 2)
    if np.any(ends < onsets) or np.any(nearby[:, 1] < nearby[:, 0]):
        raise LightningActError("a seizure ends before it starts; pass end times >= onset times")
    lead = onsets[None, :] - alarms[:, None]
    in_horizon = (lead > 0) & (lead <= horizon_s)
    true_alarm = in_horizon.any(axis=1)
    in_seizure_or_after = ((alarms[:, None] >= onsets[None, :]) & (alarms[:, None] < ends[None, :] + postictal_s)).any(
        axis=1
    )
    near_other = ((alarms[:, None] >= nearby[None, :, 0] - horizon_s) & (alarms[:, None] < nearby[None, :, 1] + postictal_s)).any(
        axis=1
    )
    ignored = ~true_alarm & (in_seizure_or_after | near_other)
    predicted = in_horizon.any(axis=0)
    lead_times = [float(lead[in_horizon[:, j], j].max()) for j in np.flatnonzero(predicted)]
    blocked = [(s - horizon_s, e + postictal_s) for s, e in [*zip(onsets, ends), *nearby]]
    interictal_s = duration_s - _union_length(blocked, start_s, start_s + duration_s)
    return AlarmReport(
        n_seizures=len(onsets),
        n_predicted=int(predicted.sum()),
        n_true_alarms=int(true_alarm.sum()),
        n_false_alarms=int((~true_alarm & ~ignored).sum()),
        n_ignored_alarms=int(ignored.sum()),
        interictal_hours=interictal_s / 3600.0,
        lead_times_s=lead_times,
    )


def combine_reports(reports: list[AlarmReport]) -> AlarmReport:
    """Pool several recordings: counts, interictal hours and lead times are summed / concatenated."""
    return AlarmReport(
        n_seizures=sum(r.n_seizures for r in reports),
        n_predicted=sum(r.n_predicted for r in reports),
        n_true_alarms=sum(r.n_true_alarms for r in reports),
        n_false_alarms=sum(r.n_false_alarms for r in reports),
        n_ignored_alarms=sum(r.n_ignored_alarms for r in reports),
        interictal_hours=sum(r.interictal_hours for r in reports),
        lead_times_s=[t for r in reports for t in r.lead_times_s],
    )


def evaluate_recordings(
    recording_index: np.ndarray,
    times_s: np.ndarray,
    probabilities: np.ndarray,
    seizures: list[list[tuple[float, float]]],
    durations_s: list[float],
    threshold: float = 0.5,
    k: int = 3,
    n: int = 5,
    refractory_s: float = 900.0,
    horizon_s: float = 900.0,
    postictal_s: float = 600.0,
    nearby_seizures: list[list[tuple[float, float]]] | None = None,
) -> AlarmReport:
    """Alarms and pooled metrics for windows of several recordings (``recording_index`` per window, ``0 ..
    len(seizures) - 1``; ``seizures``, ``durations_s`` and ``nearby_seizures`` (see :func:`evaluate_alarms`) hold one
    entry per recording)."""
    recording_index = np.asarray(recording_index)
    times_s, probabilities = np.asarray(times_s), np.asarray(probabilities)
    nearby_seizures = [[] for _ in seizures] if nearby_seizures is None else nearby_seizures
    if not len(seizures) == len(durations_s) == len(nearby_seizures):
        raise LightningActError(
            f"{len(seizures)} seizure lists, {len(durations_s)} durations and {len(nearby_seizures)} nearby-seizure "
            "lists; pass one of each per recording"
        )
    if recording_index.shape != times_s.shape:
        raise LightningActError(
            f"recording_index {recording_index.shape} and times {times_s.shape} must have one entry per window"
        )
    unknown = sorted(set(np.unique(recording_index).tolist()) - set(range(len(seizures))))
    if unknown:  # their windows, alarms and hours would vanish from the pooled metrics
        raise LightningActError(
            f"windows of recordings {unknown[:5]} have no seizure list or duration ({len(seizures)} recordings given, "
            f"numbered 0 to {len(seizures) - 1}); pass an entry for every recording"
        )
    reports = []
    for r, (events, duration, nearby) in enumerate(zip(seizures, durations_s, nearby_seizures)):
        mask = recording_index == r
        order = np.argsort(times_s[mask], kind="stable")
        alarms = raise_alarms(times_s[mask][order], probabilities[mask][order], threshold, k, n, refractory_s)
        reports.append(
            evaluate_alarms(
                alarms, [s for s, _ in events], duration, [e for _, e in events], horizon_s, postictal_s,
                nearby_s=nearby,
            )
        )
    return combine_reports(reports)


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion such as sensitivity (NaNs without trials)."""
    from scipy.stats import beta

    if trials == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def rate_interval(events: int, exposure: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) Poisson interval for a rate such as false detections per interictal hour."""
    from scipy.stats import chi2

    if exposure <= 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low = 0.0 if events == 0 else float(chi2.ppf(alpha / 2, 2 * events)) / 2
    return low / exposure, float(chi2.ppf(1 - alpha / 2, 2 * events + 2)) / 2 / exposure
