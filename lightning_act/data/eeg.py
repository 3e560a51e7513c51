"""EEG seizure-forecasting data: a synthetic recording generator and a CHB-MIT-style loader.

Both give :class:`EEGRecording` objects (continuous multichannel signal + seizure intervals),
which are cut into fixed windows labelled for forecasting (Li et al. 2025, STAN, arXiv
2511.01275; labels as in the seizure-prediction literature):

* preictal (1): the window lies entirely inside the ``horizon`` (15 min) before an onset and
  touches no seizure or post-ictal period (clustered seizures);
* interictal (0): the window touches no preictal, ictal or post-ictal period (optionally: lies
  at least ``interictal_distance`` from any seizure, e.g. the common 4 h);
* excluded (-1): ictal, post-ictal, or straddling a boundary. Training and validation drop
  these; the continuous test stream keeps every window, because a monitor runs all the time.

Two generators: :func:`generate_recording` (homogeneous, the recipe's CPU-sized default) and
:func:`generate_subject_recording` for patients drawn by :func:`draw_subject` (heterogeneous
subjects, non-stationary background, artifacts; the benchmark in ``scripts/stan_benchmark.py``).

Splits are by recording, never by window, so neighbouring windows of one recording never sit
on both sides of a split.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_act.data.checks import check_loader_args, check_real, check_split_fractions, check_whole
from lightning_act.data.splits import SplitDataModule
from lightning_act.errors import ConfigError, DataFormatError, DataNotFoundError

PREICTAL, INTERICTAL, EXCLUDED = 1, 0, -1


@dataclass
class EEGRecording:
    """One continuous recording: ``data`` is ``(channels, samples)`` float32 at ``sampling_rate`` Hz."""

    name: str
    data: np.ndarray
    sampling_rate: float
    seizures: list[tuple[float, float]] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)
    subject: str = ""
    #: Seizures of the subject's other files, in this recording's seconds (mostly outside ``[0, duration]``): near
    #: them windows are neither interictal nor this recording's preictal (:func:`label_windows`' ``nearby_seizures``).
    nearby_seizures: list[tuple[float, float]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.data.shape[1] / self.sampling_rate

    @property
    def onsets_s(self) -> list[float]:
        return [start for start, _ in self.seizures]


# --------------------------------------------------------------------------------------------
# Synthetic recordings
# --------------------------------------------------------------------------------------------


def _shaped_noise(
    rng: np.random.Generator, n_signals: int, n_samples: int, gain: np.ndarray, dtype: type = np.float64
) -> np.ndarray:
    """White Gaussian noise filtered in the frequency domain by ``gain`` (length n_samples//2+1)."""
    spectrum = scipy.fft.rfft(rng.standard_normal((n_signals, n_samples), dtype=dtype), axis=1) * gain.astype(dtype)
    signal = scipy.fft.irfft(spectrum, n=n_samples, axis=1)
    return signal / np.maximum(signal.std(axis=1, keepdims=True), 1e-12)


def pink_noise(rng: np.random.Generator, n_signals: int, n_samples: int, exponent: float = 1.0) -> np.ndarray:
    """Unit-variance noise with power spectral density ∝ 1/f^exponent (no DC component)."""
    freqs = np.fft.rfftfreq(n_samples)
    gain = np.zeros_like(freqs)
    gain[1:] = freqs[1:] ** (-exponent / 2.0)
    return _shaped_noise(rng, n_signals, n_samples, gain)


def band_noise(
    rng: np.random.Generator, n_signals: int, n_samples: int, sampling_rate: float, low_hz: float, high_hz: float
) -> np.ndarray:
    """Unit-variance noise whose power lies in ``[low_hz, high_hz]`` (a narrow-band rhythm)."""
    freqs = np.fft.rfftfreq(n_samples, d=1.0 / sampling_rate)
    gain = ((freqs >= low_hz) & (freqs <= high_hz)).astype(float)
    return _shaped_noise(rng, n_signals, n_samples, gain)


def _place_seizures(
    rng: np.random.Generator,
    duration_s: float,
    n_seizures: int,
    horizon_s: float,
    postictal_s: float,
    seizure_s: tuple[float, float],
) -> list[tuple[float, float]]:
    """Onsets at least a full horizon (+5 min) after the start or the previous post-ictal period."""
    seizures: list[tuple[float, float]] = []
    earliest = horizon_s + 300.0
    for _ in range(n_seizures):
        length = rng.uniform(*seizure_s)
        latest = duration_s - length - 60.0
        if latest <= earliest:
            break
        slack = (latest - earliest) / max(1, n_seizures - len(seizures))
        onset = earliest + rng.uniform(0.0, slack)
        seizures.append((float(onset), float(onset + length)))
        earliest = onset + length + postictal_s + horizon_s + 300.0
    return seizures


def _ictal_discharge(t: np.ndarray, onset: float, end: float, sampling_rate: float) -> np.ndarray:
    """Rhythmic discharge slowing from 6 to 3 Hz with two harmonics (unit amplitude)."""
    phase = 2 * np.pi * np.cumsum(6.0 - 3.0 * (t - onset) / (end - onset)) / sampling_rate
    return np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)


def generate_recording(
    seed: int | list[int],
    name: str = "synthetic",
    n_channels: int = 8,
    sampling_rate: float = 64.0,
    duration_minutes: float = 60.0,
    n_seizures: int = 1,
    horizon_minutes: float = 15.0,
    postictal_minutes: float = 10.0,
    preictal_change_minutes: tuple[float, float] = (10.0, 15.0),
    preictal_power: float = 0.8,
    preictal_synchrony: float = 0.8,
    distractor_bursts_per_hour: float = 6.0,
    noise_exponent: float = 1.0,
) -> EEGRecording:
    """One synthetic multichannel recording, deterministic given ``seed``.

    Background per channel: 1/f^``noise_exponent`` noise + an alpha rhythm (8-12 Hz) + a weak
    shared slow component (baseline cross-channel coupling), with a per-channel gain.
    Preictal: from a change point drawn in ``preictal_change_minutes`` before each onset, a
    linear ramp r ∈ [0, 1] scales (a) independent theta (4-8 Hz) rhythms on every channel
    (band power, amplitude ``preictal_power``) and (b) one beta (14-20 Hz) driver shared by all
    channels with per-channel gains (cross-channel synchrony, amplitude ``preictal_synchrony``).
    Seizure: 30-90 s high-amplitude rhythmic discharge slowing from 6 to 3 Hz on all channels;
    post-ictal: background suppressed to 40 % and recovering linearly.  Distractors:
    30-60 s theta bursts on a few channels at random interictal times (power without
    synchrony), so that band power alone does not separate the classes.
    """
    rng = np.random.default_rng(seed)
    n = round(duration_minutes * 60.0 * sampling_rate)
    t = np.arange(n) / sampling_rate
    horizon_s, postictal_s = horizon_minutes * 60.0, postictal_minutes * 60.0
    seizures = _place_seizures(rng, n / sampling_rate, n_seizures, horizon_s, postictal_s, (30.0, 90.0))

    channel_gain = rng.uniform(0.8, 1.2, size=(n_channels, 1))
    shared_slow = band_noise(rng, 1, n, sampling_rate, 0.5, 4.0)
    data = (
        pink_noise(rng, n_channels, n, noise_exponent)
        + 0.6 * band_noise(rng, n_channels, n, sampling_rate, 8.0, 12.0)
        + 0.3 * shared_slow
    )

    envelope = np.ones(n)
    for onset, end in seizures:
        post = (t >= end) & (t < end + postictal_s)
        envelope[post] = 0.4 + 0.6 * (t[post] - end) / postictal_s
    data *= envelope

    theta = band_noise(rng, n_channels, n, sampling_rate, 4.0, 8.0)
    beta_driver = band_noise(rng, 1, n, sampling_rate, 14.0, 20.0)
    beta_gain = rng.uniform(0.7, 1.3, size=(n_channels, 1))
    ramp = np.zeros(n)
    for onset, end in seizures:
        change = rng.uniform(*preictal_change_minutes) * 60.0
        pre = (t >= onset - change) & (t < onset)
        ramp[pre] = (t[pre] - (onset - change)) / change
        ictal = (t >= onset) & (t < end)
        discharge = _ictal_discharge(t[ictal], onset, end, sampling_rate)
        data[:, ictal] = 0.3 * data[:, ictal] + 4.0 * rng.uniform(0.7, 1.3, size=(n_channels, 1)) * discharge
    data += ramp * (preictal_power * theta + preictal_synchrony * beta_gain * beta_driver)

    n_bursts = rng.poisson(distractor_bursts_per_hour * duration_minutes / 60.0)
    blocked = [(onset - horizon_s, end + postictal_s) for onset, end in seizures]
    for _ in range(n_bursts):
        start, length = rng.uniform(0.0, n / sampling_rate - 60.0), rng.uniform(30.0, 60.0)
        if any(start < b and start + length > a for a, b in blocked):
            continue
        span = (t >= start) & (t < start + length)
        channels = rng.choice(n_channels, size=max(1, n_channels // 3), replace=False)
        data[np.ix_(channels, np.flatnonzero(span))] += preictal_power * theta[np.ix_(channels, np.flatnonzero(span))]

    data *= channel_gain
    return EEGRecording(
        name=name,
        data=data.astype(np.float32),
        sampling_rate=sampling_rate,
        seizures=seizures,
        channel_names=[f"CH{i + 1}" for i in range(n_channels)],
    )


def generate_split(
    seed: int,
    split: str,
    n_recordings: int,
    max_seizures_per_recording: int = 2,
    **recording_kwargs: float,
) -> list[EEGRecording]:
    """``n_recordings`` synthetic recordings for ``split``; seeds differ per split and recording.

    The requested number of seizures cycles 1, 2, ..., max, 0 so every split of three or more
    recordings has seizure-free and seizure-bearing recordings; a seizure that does not fit
    (each needs a full horizon and post-ictal period of room) is left out.
    """
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    recordings = []
    for index in range(n_recordings):
        n_seizures = (index + 1) % (max_seizures_per_recording + 1)
        recordings.append(
            generate_recording(
                [seed, split_id, index], name=f"{split}_{index:02d}", n_seizures=n_seizures, **recording_kwargs
            )
        )
    return recordings


# --------------------------------------------------------------------------------------------
# Heterogeneous subjects (the benchmark generator)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectProfile:
    """What differs between synthetic patients (drawn by :func:`draw_subject`).

    ``beta_band`` is the band of the preictal cross-channel driver, ``preictal_theta`` and
    ``preictal_synchrony`` the amplitudes of its two preictal components, ``change_minutes`` the
    range of the preictal change point before onset; the artifact rates are per hour.
    """

    name: str
    channel_gain: np.ndarray
    noise_exponent: float
    alpha_hz: float
    beta_band: tuple[float, float]
    preictal_theta: float
    preictal_synchrony: float
    change_minutes: tuple[float, float]
    drowsy_fraction: float
    muscle_per_hour: float
    pops_per_hour: float
    beta_bursts_per_hour: float
    theta_bursts_per_hour: float


def draw_subject(seed: int | list[int], name: str, n_channels: int = 8) -> SubjectProfile:
    """One synthetic patient: montage gains, background spectrum, preictal signature and artifact rates."""
    rng = np.random.default_rng(seed)
    beta_low = rng.uniform(13.0, 18.0)
    change_low = rng.uniform(4.0, 12.0)
    return SubjectProfile(
        name=name,
        channel_gain=rng.uniform(0.5, 1.5, size=n_channels),
        noise_exponent=rng.uniform(0.8, 1.6),
        alpha_hz=rng.uniform(8.5, 11.5),
        beta_band=(beta_low, beta_low + rng.uniform(3.0, 6.0)),
        preictal_theta=rng.uniform(0.3, 0.9),
        preictal_synchrony=rng.uniform(0.4, 0.9),
        change_minutes=(change_low, min(15.0, change_low + rng.uniform(2.0, 6.0))),
        drowsy_fraction=rng.uniform(0.1, 0.5),
        muscle_per_hour=rng.uniform(2.0, 10.0),
        pops_per_hour=rng.uniform(2.0, 10.0),
        beta_bursts_per_hour=rng.uniform(0.5, 2.0),
        theta_bursts_per_hour=rng.uniform(1.0, 4.0),
    )


def _spectrum_gain(freqs: np.ndarray, parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Amplitude gain whose power is the sum of the unit-power shapes ``parts`` (amplitude, gain)."""
    power = np.zeros_like(freqs)
    for amplitude, gain in parts:
        power += amplitude**2 * gain**2 / np.mean(gain**2)
    return np.sqrt(power)


def _state_weight(rng: np.random.Generator, n: int, sampling_rate: float, drowsy_fraction: float) -> np.ndarray:
    """0 (awake) / 1 (drowsy) alternation with exponential dwell times and 60 s transitions."""
    weight = np.zeros(n)
    position, drowsy = 0, bool(rng.uniform() < drowsy_fraction)
    while position < n:
        mean_minutes = 40.0 * (drowsy_fraction if drowsy else 1.0 - drowsy_fraction)
        length = max(1, round(rng.exponential(mean_minutes) * 60.0 * sampling_rate))
        weight[position : position + length] = float(drowsy)
        position, drowsy = position + length, not drowsy
    ramp = max(1, round(60.0 * sampling_rate))
    padded = np.concatenate([[0.0], np.cumsum(np.pad(weight, (ramp // 2, ramp - 1 - ramp // 2), mode="edge"))])
    return (padded[ramp:] - padded[:-ramp]) / ramp


def generate_subject_recording(
    subject: SubjectProfile,
    seed: int | list[int],
    name: str,
    duration_minutes: float,
    seizures: list[tuple[float, float]],
    sampling_rate: float = 64.0,
    postictal_minutes: float = 10.0,
) -> EEGRecording:
    """A recording of ``subject`` with seizures at the given ``(onset, end)`` seconds.

    Background: per-channel 1/f^exponent noise plus an alpha rhythm at the subject's frequency
    (awake) cross-faded with a drowsy spectrum (theta/delta and 12-14 Hz spindles, weak alpha),
    switching state every few tens of minutes, times a slow amplitude drift (period 1-3 h) —
    a non-stationary background whose band ratios move on their own.  Preictal: from a change
    point in ``change_minutes`` before each onset a linear ramp adds independent theta rhythms
    and a shared driver in the subject's ``beta_band`` (synchrony).  Seizure and post-ictal as in
    :func:`generate_recording`.  Artifacts at random times: muscle bursts (2-40 s, broadband
    20-31 Hz, shared by half the channels), electrode pops (one channel, exponential decay),
    synchronous beta bursts without theta (20-90 s) and theta bursts without synchrony (30-60 s);
    each imitates one half of the preictal signature or the beta-power rise.
    """
    rng = np.random.default_rng(seed)
    n_channels = len(subject.channel_gain)
    n = round(duration_minutes * 60.0 * sampling_rate)
    t = np.arange(n) / sampling_rate
    freqs = np.fft.rfftfreq(n, d=1.0 / sampling_rate)
    pink = np.zeros_like(freqs)
    pink[1:] = freqs[1:] ** (-subject.noise_exponent / 2.0)

    def band(low: float, high: float) -> np.ndarray:
        return ((freqs >= low) & (freqs <= high)).astype(float)

    awake = _spectrum_gain(freqs, [(1.0, pink), (0.7, band(subject.alpha_hz - 1.5, subject.alpha_hz + 1.5))])
    drowsy = _spectrum_gain(freqs, [(1.0, pink), (0.2, band(subject.alpha_hz - 1.5, subject.alpha_hz + 1.5)),
                                    (0.7, band(2.0, 7.0)), (0.35, band(12.0, 14.0))])
    weight = _state_weight(rng, n, sampling_rate, subject.drowsy_fraction)
    weight = weight.astype(np.float32)
    data = (1.0 - weight) * _shaped_noise(rng, n_channels, n, awake, np.float32)
    data += weight * _shaped_noise(rng, n_channels, n, drowsy, np.float32)
    data += 0.3 * _shaped_noise(rng, 1, n, band(0.5, 4.0), np.float32)
    period = rng.uniform(3600.0, 3 * 3600.0)
    data *= (1.0 + 0.3 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))).astype(np.float32)

    postictal_s = postictal_minutes * 60.0
    for onset, end in seizures:
        post = (t >= end) & (t < end + postictal_s)
        data[:, post] *= 0.4 + 0.6 * (t[post] - end) / postictal_s

    def local(low: float, high: float, start: float, length: float, count: int) -> tuple[slice, np.ndarray]:
        i0, i1 = max(0, round(start * sampling_rate)), min(n, round((start + length) * sampling_rate))
        return slice(i0, i1), band_noise(rng, count, max(i1 - i0, 2), sampling_rate, low, high)[:, : i1 - i0]

    for onset, end in seizures:
        change = rng.uniform(*subject.change_minutes) * 60.0
        span, theta = local(4.0, 8.0, onset - change, change, n_channels)
        _, beta = local(*subject.beta_band, onset - change, change, 1)
        ramp = (t[span] - (onset - change)) / change
        beta_gain = rng.uniform(0.7, 1.3, size=(n_channels, 1))
        data[:, span] += ramp * (subject.preictal_theta * theta + subject.preictal_synchrony * beta_gain * beta)
        ictal = (t >= onset) & (t < end)
        discharge = _ictal_discharge(t[ictal], onset, end, sampling_rate)
        data[:, ictal] = 0.3 * data[:, ictal] + 4.0 * rng.uniform(0.7, 1.3, size=(n_channels, 1)) * discharge

    hours = duration_minutes / 60.0
    duration_s = n / sampling_rate
    for _ in range(rng.poisson(subject.muscle_per_hour * hours)):
        length = rng.uniform(2.0, 40.0)
        span, shared = local(20.0, 0.49 * sampling_rate, rng.uniform(0, duration_s - length), length, 1)
        channels = rng.choice(n_channels, size=max(1, n_channels // 2), replace=False)
        data[channels, span] += rng.uniform(0.5, 2.0) * shared
    for _ in range(rng.poisson(subject.pops_per_hour * hours)):
        i0 = rng.integers(0, n)
        decay = np.exp(-np.arange(min(n - i0, round(3 * sampling_rate))) / (0.5 * sampling_rate))
        data[rng.integers(n_channels), i0 : i0 + len(decay)] += rng.uniform(5.0, 20.0) * rng.choice([-1, 1]) * decay
    for _ in range(rng.poisson(subject.beta_bursts_per_hour * hours)):
        length = rng.uniform(20.0, 90.0)
        span, beta = local(*subject.beta_band, rng.uniform(0, duration_s - length), length, 1)
        data[:, span] += rng.uniform(0.5, 1.0) * subject.preictal_synchrony * rng.uniform(0.7, 1.3, (n_channels, 1)) * beta
    for _ in range(rng.poisson(subject.theta_bursts_per_hour * hours)):
        length = rng.uniform(30.0, 60.0)
        channels = rng.choice(n_channels, size=max(1, n_channels // 3), replace=False)
        span, theta = local(4.0, 8.0, rng.uniform(0, duration_s - length), length, len(channels))
        data[channels, span] += subject.preictal_theta * theta

    data *= subject.channel_gain[:, None]
    return EEGRecording(
        name=name,
        data=data.astype(np.float32),
        sampling_rate=sampling_rate,
        seizures=list(seizures),
        channel_names=[f"CH{i + 1}" for i in range(n_channels)],
        subject=subject.name,
    )


# --------------------------------------------------------------------------------------------
# Window labels
# --------------------------------------------------------------------------------------------


def label_windows(
    n_samples: int,
    sampling_rate: float,
    window_samples: int,
    stride_samples: int,
    seizures: list[tuple[float, float]],
    horizon_s: float = 900.0,
    postictal_s: float = 600.0,
    interictal_distance_s: float | None = None,
    leading_gap_s: float = 0.0,
    nearby_seizures: list[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Window start samples and labels (1 preictal, 0 interictal, -1 excluded) for one recording.

    With ``s``/``e`` the onset/end of each seizure and window ``[a, b)`` in seconds:

    * preictal iff ``[a, b) ⊆ [s - horizon, s)`` for a *leading* seizure and ``[a, b)`` overlaps
      no ictal or post-ictal period ``[s', e' + postictal)`` of any seizure — with clustered
      seizures the horizon before the second onset can reach into the first seizure and its
      recovery, and those windows are excluded, never preictal;
    * interictal iff ``[a, b)`` overlaps no ``[s - d_before, e + d_after)``, where
      ``d_before = horizon``, ``d_after = postictal`` by default, and with ``interictal_distance_s = D``
      ``d_before = max(horizon, D)``, ``d_after = max(postictal, D)`` (a window never counts as interictal inside
      a horizon or a recovery; the common convention is D = 4 h = 14400 s from any seizure);
    * excluded otherwise.

    A seizure is *leading* when at least ``leading_gap_s`` seconds separate its onset from the
    end of the previous seizure (the first seizure always leads).  The default 0 keeps every
    seizure; a gap of e.g. 1 h keeps only the first seizure of each cluster as a preictal target,
    the usual selection when clustered seizures would otherwise label recovery as preictal.

    ``nearby_seizures`` (seizures of the files before and after, in this recording's seconds) count as seizures for
    everything above except that their preictal windows are not this recording's: the end of a file whose next file
    starts with a seizure is excluded, not interictal (a recording is evaluated on its own seizures).
    """
    starts = np.arange(0, n_samples - window_samples + 1, stride_samples)
    a = starts / sampling_rate
    b = (starts + window_samples) / sampling_rate
    # (onset, end, whether it is this recording's own seizure), in time order
    ordered = sorted([(s, e, True) for s, e in seizures] + [(s, e, False) for s, e in nearby_seizures or []])
    before = horizon_s if interictal_distance_s is None else max(horizon_s, interictal_distance_s)
    after = postictal_s if interictal_distance_s is None else max(postictal_s, interictal_distance_s)
    labels = np.full(len(starts), INTERICTAL, dtype=np.int64)
    for onset, end, _ in ordered:
        labels[(a < end + after) & (b > onset - before)] = EXCLUDED
    for i, (onset, _, own) in enumerate(ordered):
        if own and (i == 0 or onset - ordered[i - 1][1] >= leading_gap_s):
            labels[(a >= onset - horizon_s) & (b <= onset)] = PREICTAL
    for onset, end, _ in ordered:
        labels[(a < end + postictal_s) & (b > onset)] = EXCLUDED
    return starts, labels


class EEGWindows(Dataset):
    """Windows cut from recordings on the fly, normalised per channel.

    With ``continuous=False`` only labelled windows are kept and items are ``(x, y, domain)``,
    ``domain`` being the index of the recording's subject (``EEGRecording.subject``, or its name
    when unset) in ``subjects`` (default: the sorted subjects of ``recordings``) — what the domain-adversarial critic of
    :class:`~lightning_act.tasks.seizure_forecasting.SeizureForecaster` tells apart.  With
    ``continuous=True`` every window is kept in time order and items are
    ``(x, y, recording_index, window_end_s)`` for alarm evaluation.  ``interictal_distance_s`` and
    ``leading_gap_s`` are passed to :func:`label_windows`.
    """

    def __init__(
        self,
        recordings: list[EEGRecording],
        window_samples: int,
        stride_samples: int,
        horizon_s: float,
        postictal_s: float,
        mean: np.ndarray,
        std: np.ndarray,
        continuous: bool = False,
        interictal_distance_s: float | None = None,
        leading_gap_s: float = 0.0,
        subjects: list[str] | None = None,
    ) -> None:
        self.recordings = recordings
        self.window_samples = window_samples
        self.continuous = continuous
        self.mean = mean.astype(np.float32)[:, None]
        self.std = std.astype(np.float32)[:, None]
        subjects = sorted({rec.subject or rec.name for rec in recordings}) if subjects is None else subjects
        self.domains = np.array([subjects.index(rec.subject or rec.name) for rec in recordings], dtype=np.int64)
        index = []
        for r, rec in enumerate(recordings):
            starts, labels = label_windows(
                rec.data.shape[1], rec.sampling_rate, window_samples, stride_samples, rec.seizures, horizon_s, postictal_s,
                interictal_distance_s, leading_gap_s, rec.nearby_seizures,
            )
            keep = np.ones_like(labels, dtype=bool) if continuous else labels != EXCLUDED
            index.append(np.stack([np.full(keep.sum(), r), starts[keep], labels[keep]], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self.index[:, 2]

    def __getitem__(self, i: int) -> tuple:
        r, start, label = (int(v) for v in self.index[i])
        rec = self.recordings[r]
        x = torch.from_numpy((rec.data[:, start : start + self.window_samples] - self.mean) / self.std)
        if not self.continuous:
            return x, torch.tensor(float(label)), torch.tensor(self.domains[r])
        end_s = (start + self.window_samples) / rec.sampling_rate
        return x, torch.tensor(float(label)), torch.tensor(r), torch.tensor(end_s, dtype=torch.float64)


def band_power_ratio(
    windows: np.ndarray, sampling_rate: float, band_hz: tuple[float, float] = (13.0, 30.0), total_hz: tuple[float, float] = (0.5, 30.0)
) -> np.ndarray:
    """Per window ``(N, C, T)``: mean over channels of periodogram power in ``band_hz`` / power in ``total_hz``.

    With the default beta band this is the one-feature baseline of the seizure benchmark: a
    rise of beta power relative to the rest of the spectrum, what a clinician's band-power
    trend shows, with no training beyond a threshold.
    """
    spectrum = np.abs(scipy.fft.rfft(windows - windows.mean(axis=-1, keepdims=True), axis=-1)) ** 2
    freqs = np.fft.rfftfreq(windows.shape[-1], d=1.0 / sampling_rate)
    band = spectrum[..., (freqs >= band_hz[0]) & (freqs <= band_hz[1])].sum(axis=-1)
    total = spectrum[..., (freqs >= total_hz[0]) & (freqs <= total_hz[1])].sum(axis=-1)
    return (band / np.maximum(total, 1e-12)).mean(axis=-1)


# --------------------------------------------------------------------------------------------
# CHB-MIT-style files
# --------------------------------------------------------------------------------------------

_SEIZURE_TIME = re.compile(r"^Seizure(?:\s+(\d+))?\s+(Start|End)\s+Time\s*:\s*(\S+?)\s*(?:seconds|secs|s)?\s*$", re.IGNORECASE)


def parse_chbmit_summary(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Seizure intervals (seconds from file start) per EDF file name from a ``chbXX-summary.txt``.

    Accepts both ``Seizure Start Time: 2996 seconds`` and ``Seizure 1 Start Time: 2996 seconds``
    and checks that the listed times match ``Number of Seizures in File``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"summary file '{path}' not found; pass a folder that holds a chbXX-summary.txt")
    files: dict[str, list[tuple[float, float]]] = {}
    expected: dict[str, int] = {}
    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    current: str | None = None

    def fail(line_no: int, problem: str) -> DataFormatError:
        return DataFormatError(f"{path.name} line {line_no}: {problem}; fix the summary to the CHB-MIT layout")

    # utf-8-sig drops a byte-order mark (editors on Windows add one), which would otherwise hide
    # the first 'File Name:' and surface as a misleading error further down the file.
    for line_no, raw in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
        line = raw.strip()
        if line.lower().startswith("file name:"):
            current = line.split(":", 1)[1].strip()
            if not current:
                raise fail(line_no, "empty 'File Name:'")
            if current in files:  # its first entry's seizures would be dropped
                raise fail(line_no, f"'{current}' is listed twice")
            files[current], starts[current], ends[current] = [], [], []
        elif line.lower().startswith("number of seizures in file:"):
            if current is None:
                raise fail(line_no, "'Number of Seizures in File' before any 'File Name:'")
            value = line.split(":", 1)[1].strip()
            if not value.isdigit():
                raise fail(line_no, f"seizure count '{value}' is not a whole number")
            expected[current] = int(value)
        elif line.lower().startswith("seizure"):
            match = _SEIZURE_TIME.match(line)
            if match is None:
                raise fail(line_no, f"cannot read seizure time from '{line}'")
            if current is None:
                raise fail(line_no, "seizure time before any 'File Name:'")
            try:
                seconds = float(match.group(3))
            except ValueError:
                raise fail(line_no, f"seizure time '{match.group(3)}' is not a number") from None
            if not (math.isfinite(seconds) and seconds >= 0):  # a NaN onset would label nothing, yet count as a seizure
                raise fail(line_no, f"seizure time {match.group(3)} is not a finite number of seconds >= 0")
            (starts if match.group(2).lower() == "start" else ends)[current].append(seconds)
    for name in files:
        n_start, n_end = len(starts[name]), len(ends[name])
        if n_start != n_end:
            raise DataFormatError(
                f"{path.name}: '{name}' lists {n_start} seizure start(s) but {n_end} end(s); "
                "fix the summary so every start has an end"
            )
        if name in expected and expected[name] != n_start:
            raise DataFormatError(
                f"{path.name}: '{name}' says {expected[name]} seizure(s) but lists {n_start}; "
                "fix 'Number of Seizures in File' or the seizure times"
            )
        for start, end in zip(starts[name], ends[name]):
            if end <= start:
                raise DataFormatError(
                    f"{path.name}: '{name}' has a seizure ending at {end} s before it starts at {start} s; "
                    "fix the seizure times"
                )
        files[name] = list(zip(starts[name], ends[name]))
    if not files:
        raise DataFormatError(f"{path.name}: no 'File Name:' entries; pass a CHB-MIT chbXX-summary.txt")
    return files


#: Microvolts per unit of the voltage dimensions EDF files write (pyedflib returns each file's own unit).
MICROVOLTS_PER = {"uv": 1.0, "\u00b5v": 1.0, "\u03bcv": 1.0, "mv": 1e3, "v": 1e6}


def read_edf(path: str | Path, n_channels: int | None = None) -> tuple[np.ndarray, float, list[str], list[str]]:
    """``(data (C, T) float32, sampling_rate, channel_names, units)`` from an EDF file via pyedflib.

    Signals in V, mV or uV are returned in uV (unit ``"uV"``), so a file written in mV is not read 1000x smaller
    than its neighbours; another physical dimension is kept as it is and named in ``units``.
    """
    import pyedflib

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"EDF file '{path}' not found; check the file names listed in the summary")
    with path.open("rb") as file:
        reserved = file.read(256)[192:197].decode("ascii", "replace")
    if reserved in ("EDF+D", "BDF+D"):  # pyedflib refuses these too, with a reason that reads like a damaged file
        raise DataFormatError(
            f"'{path}' is {reserved} (discontinuous: its records have gaps), which is not read because its samples "
            "cannot be placed on the summary's seconds; export it as continuous EDF (EDF+C) or split it at the gaps"
        )
    try:
        reader = pyedflib.EdfReader(str(path))
    except OSError as error:
        problem = str(error).splitlines()[0].split(": ", 1)[-1] if str(error) else type(error).__name__
        raise DataFormatError(
            f"'{path}' is not a readable EDF file ({problem}): it is corrupt or truncated; "
            "download it again or remove its entry from the summary"
        ) from None
    with reader:
        count = reader.signals_in_file
        if n_channels is not None and count != n_channels:
            raise DataFormatError(
                f"'{path.name}' has {count} channels but {n_channels} were expected; "
                f"pass --data.n_channels {count} or drop recordings with a different montage"
            )
        rates = {float(reader.getSampleFrequency(i)) for i in range(count)}
        if len(rates) != 1:
            raise DataFormatError(
                f"'{path.name}' mixes sampling rates {sorted(rates)}; resample it to one rate before loading"
            )
        dimensions = [reader.getPhysicalDimension(i).strip() for i in range(count)]
        scales = [MICROVOLTS_PER.get(dimension.lower(), 1.0) for dimension in dimensions]
        data = np.stack([reader.readSignal(i) * scale for i, scale in enumerate(scales)]).astype(np.float32)
        units = ["uV" if dimension.lower() in MICROVOLTS_PER else dimension for dimension in dimensions]
        names = list(reader.getSignalLabels())
    return data, rates.pop(), names, units


def align_channels(
    data: np.ndarray, names: list[str], units: list[str], reference: tuple[str, list[str], list[str]], file: str
) -> np.ndarray:
    """``data``'s rows in the order of the ``reference`` file's ``(file name, channel names, units)``.

    Files of one folder are stacked by row, so each row must be one electrode pair in every file: a file with the
    same labels in another order is reordered by name (a label that occurs twice, as CHB-MIT's T8-P8, is matched
    occurrence by occurrence); other labels or units are refused in one line.
    """
    reference_file, reference_names, reference_units = reference
    if sorted(names) != sorted(reference_names):
        extra = sorted((Counter(names) - Counter(reference_names)).elements())
        missing = sorted((Counter(reference_names) - Counter(names)).elements())
        raise DataFormatError(
            f"'{file}' has channels {extra} where '{reference_file}' has {missing} (another montage); load files of "
            "one montage (drop the files after a summary's 'Channels changed:' line, or put them in another folder)"
        )
    rows_by_name: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        rows_by_name.setdefault(name, []).append(row)
    order = [rows_by_name[name].pop(0) for name in reference_names]
    differing = [
        (name, units[row], unit) for name, row, unit in zip(reference_names, order, reference_units) if units[row] != unit
    ]
    if differing:
        name, unit, reference_unit = differing[0]
        raise DataFormatError(
            f"'{file}' has {len(differing)} channel(s) in other units than '{reference_file}' (first {name}: {unit!r} "
            f"where it has {reference_unit!r}); write the files in one unit (V, mV and uV are converted to uV)"
        )
    return data[order]


_FILE_START = re.compile(r"^File Start Time\s*:\s*(\d+):(\d\d):(\d\d)\s*$", re.IGNORECASE)


def chbmit_file_starts(path: str | Path) -> dict[str, float]:
    """Clock start times (seconds) of the files a CHB-MIT summary lists with a ``File Start Time``, in file order and
    increasing: a time earlier than the file before it is on the next day (CHB-MIT writes both ``24:01:00`` and
    ``00:01:00`` after midnight)."""
    starts: dict[str, float] = {}
    current, latest = None, None
    for raw in Path(path).read_text(encoding="utf-8-sig", errors="replace").splitlines():
        line = raw.strip()
        if line.lower().startswith("file name:"):
            current = line.split(":", 1)[1].strip()
            continue
        match = _FILE_START.match(line)
        if match is None or current is None:
            continue
        seconds = int(match.group(1)) * 3600 + int(match.group(2)) * 60 + int(match.group(3))
        while latest is not None and seconds < latest:
            seconds += 86400
        starts[current] = latest = float(seconds)
    return starts


def place_nearby_seizures(recordings: list[EEGRecording], offsets: list[float]) -> None:
    """Set each recording's ``nearby_seizures``: the other recordings' seizures in its own seconds, from each
    recording's start ``offsets`` (seconds on one clock)."""
    for i, rec in enumerate(recordings):
        rec.nearby_seizures = [
            (start + offsets[j] - offsets[i], end + offsets[j] - offsets[i])
            for j, other in enumerate(recordings) if j != i for start, end in other.seizures
        ]


def file_offsets(starts: list[float | None], durations: list[float]) -> list[float]:
    """Clock seconds at which each of a subject's consecutive files starts: its ``File Start Time``, or, without one,
    the closest it can be to its neighbours: right after the previous file, and for files before the first timed one
    right before the next file (all from 0 when no file has a time)."""
    offsets: list[float] = [0.0] * len(starts)
    first = next((i for i, start in enumerate(starts) if start is not None), None)
    if first is not None:
        offsets[first] = float(starts[first])
        for i in range(first - 1, -1, -1):
            offsets[i] = offsets[i + 1] - durations[i]
    for i in range((first or 0) + 1, len(starts)):
        start = starts[i]
        offsets[i] = float(start) if start is not None else offsets[i - 1] + durations[i - 1]
    return offsets


def load_chbmit_folder(folder: str | Path, n_channels: int = 23) -> list[EEGRecording]:
    """Every EDF file listed in the ``*-summary.txt`` files under ``folder`` (one recording each).

    Every file's channels are put in the first file's order by name and its voltages in uV
    (:func:`align_channels`, :func:`read_edf`); another montage is refused in one line.
    Each EDF file is its own recording: a preictal period that begins in the previous file is
    truncated at the file start (files are not concatenated). The seizures of a subject's other files are placed in
    each file's seconds from the summary's ``File Start Time`` clock times (a file without one is taken to follow the
    previous file without a gap, or to precede the next one, the closest it can be: :func:`file_offsets`), as its
    ``nearby_seizures``: the end of a file whose next file starts with a seizure is then excluded, not labelled
    interictal.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"data directory '{folder}' does not exist; pass --data.data_dir with a CHB-MIT folder")
    summaries = sorted(folder.rglob("*-summary.txt"))
    if not summaries:
        raise DataNotFoundError(
            f"no '*-summary.txt' under '{folder}'; pass a CHB-MIT subject folder (e.g. chb01/ with chb01-summary.txt)"
        )
    recordings = []
    reference: tuple[str, list[str], list[str]] | None = None  # the first file's (name, channel names, units)
    for summary in summaries:
        subject: list[EEGRecording] = []
        clock_starts, starts = chbmit_file_starts(summary), []
        for file_name, seizures in parse_chbmit_summary(summary).items():
            data, rate, names, units = read_edf(summary.parent / file_name, n_channels)
            if reference is None:
                reference = (file_name, names, units)
            data = align_channels(data, names, units, reference, file_name)
            recording = EEGRecording(
                Path(file_name).stem, data, rate, seizures, reference[1], subject=summary.parent.name
            )
            for start, end in seizures:
                if end > recording.duration_s:
                    raise DataFormatError(
                        f"{summary.name}: '{file_name}' lists a seizure at {start:g}-{end:g} s but the recording "
                        f"ends at {recording.duration_s:g} s; fix the seizure times or replace the truncated EDF file"
                    )
            starts.append(clock_starts.get(file_name))
            subject.append(recording)
        place_nearby_seizures(subject, file_offsets(starts, [rec.duration_s for rec in subject]))
        recordings += subject
    rates = {rec.sampling_rate for rec in recordings}
    if len(rates) != 1:
        raise DataFormatError(f"recordings under '{folder}' have sampling rates {sorted(rates)}; resample them to one rate")
    return recordings


def split_recordings(
    recordings: list[EEGRecording], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[EEGRecording], list[EEGRecording], list[EEGRecording]]:
    """Split by recording, stratified so seizure-bearing and seizure-free files spread over splits."""
    rng = np.random.default_rng(seed)
    splits: tuple[list[EEGRecording], list[EEGRecording], list[EEGRecording]] = ([], [], [])
    for group in ([r for r in recordings if r.seizures], [r for r in recordings if not r.seizures]):
        order = rng.permutation(len(group))
        n_test = round(test_fraction * len(group))
        n_val = round(val_fraction * len(group))
        for rank, i in enumerate(order):
            target = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
            splits[target].append(group[i])
    return splits


def channel_statistics(recordings: list[EEGRecording]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over all samples of ``recordings`` (float64 sums)."""
    count = sum(rec.data.shape[1] for rec in recordings)
    total = sum(rec.data.sum(axis=1, dtype=np.float64) for rec in recordings)
    mean = total / count
    squares = sum(((rec.data - mean[:, None].astype(np.float32)) ** 2).sum(axis=1, dtype=np.float64) for rec in recordings)
    return mean, np.maximum(np.sqrt(squares / count), 1e-6)


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class EEGSeizureDataModule(SplitDataModule):
    """Preictal-vs-interictal windows, split by recording.

    With ``data_dir=None`` (default) it generates small synthetic recordings (CPU-sized); with
    ``data_dir`` it reads a CHB-MIT-style folder (EDF files + ``chbXX-summary.txt``), expecting
    ``n_channels`` channels per file.  Train/val loaders yield ``(x, y, domain)`` of labelled
    windows (``domain`` = subject index: the ``chbXX`` folder, or the recording for synthetic
    data); test/predict loaders yield every window of the held-out recordings in time order as
    ``(x, y, recording_index, window_end_s)`` (``y = -1`` for ictal/post-ictal/boundary windows).
    ``interictal_distance_minutes`` (e.g. 240 for the common >= 4 h convention) and
    ``leading_gap_minutes`` select interictal windows and leading seizures (:func:`label_windows`).
    ``horizon_minutes`` sets the labels only: the synthetic recordings' preictal change starts 10-15 min before
    each onset whatever the horizon (see :func:`generate_recording`), so a shorter horizon labels the ramp's start
    interictal, as a fixed horizon does with real recordings, whose preictal state has no known length.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        n_channels: int = 8,
        sampling_rate: float = 64.0,
        window_seconds: float = 5.0,
        stride_seconds: float | None = None,
        recording_minutes: float = 60.0,
        n_train_recordings: int = 6,
        n_val_recordings: int = 3,
        n_test_recordings: int = 12,
        max_seizures_per_recording: int = 2,
        horizon_minutes: float = 15.0,
        postictal_minutes: float = 10.0,
        interictal_distance_minutes: float | None = None,
        leading_gap_minutes: float = 0.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataNotFoundError(
                f"data directory '{data_dir}' does not exist; pass --data.data_dir with a CHB-MIT-style folder, "
                "or leave it unset to use synthetic recordings"
            )
        check_whole("n_channels", n_channels, 1, 8)
        check_real("sampling_rate", sampling_rate, 0.0, 64, above=True, what=" (samples per second)")
        check_real("window_seconds", window_seconds, 0.0, 5, above=True)
        if stride_seconds is not None:
            check_real("stride_seconds", stride_seconds, 0.0, 5, above=True)
        check_real("recording_minutes", recording_minutes, 0.0, 60, above=True)
        check_whole("n_train_recordings", n_train_recordings, 1, 6)
        check_whole("n_val_recordings", n_val_recordings, 0, 3)
        check_whole("n_test_recordings", n_test_recordings, 0, 12)
        check_whole("max_seizures_per_recording", max_seizures_per_recording, 1, 2)
        check_real("horizon_minutes", horizon_minutes, 0.0, 15, above=True)
        check_real("postictal_minutes", postictal_minutes, 0.0, 10)
        if interictal_distance_minutes is not None:
            check_real("interictal_distance_minutes", interictal_distance_minutes, 0.0, 240)
        check_real("leading_gap_minutes", leading_gap_minutes, 0.0, 60)
        check_split_fractions(val_fraction, test_fraction)
        check_loader_args(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.n_channels = n_channels
        self.sampling_rate = sampling_rate
        self.window_seconds = window_seconds
        self.stride_seconds = stride_seconds if stride_seconds is not None else window_seconds
        self.recording_minutes = recording_minutes
        self.n_recordings = {"train": n_train_recordings, "val": n_val_recordings, "test": n_test_recordings}
        self.max_seizures_per_recording = max_seizures_per_recording
        self.horizon_s = horizon_minutes * 60.0
        self.postictal_s = postictal_minutes * 60.0
        self.interictal_distance_s = None if interictal_distance_minutes is None else interictal_distance_minutes * 60.0
        self.leading_gap_s = leading_gap_minutes * 60.0
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.recordings: dict[str, list[EEGRecording]] = {}
        self.datasets: dict[str, EEGWindows] = {}

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sampling_rate)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.data_dir is None:
            for split, count in self.n_recordings.items():
                self.recordings[split] = generate_split(
                    self.seed,
                    split,
                    count,
                    self.max_seizures_per_recording,
                    n_channels=self.n_channels,
                    sampling_rate=self.sampling_rate,
                    duration_minutes=self.recording_minutes,
                    horizon_minutes=self.horizon_s / 60.0,
                    postictal_minutes=self.postictal_s / 60.0,
                )
        else:
            everything = load_chbmit_folder(self.data_dir, self.n_channels)
            self.sampling_rate = everything[0].sampling_rate
            train, val, test = split_recordings(everything, self.val_fraction, self.test_fraction, self.seed)
            self.recordings = {"train": train, "val": val, "test": test}
            for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
                if fraction > 0 and not self.recordings[split]:  # a fit without validation, a test that returns []
                    raise DataFormatError(
                        f"no {split} recordings after the split of {len(everything)} recordings ({split}_fraction "
                        f"{fraction:g} rounds to none); add recordings or raise --data.{split}_fraction"
                    )
        if not self.recordings["train"]:
            raise DataFormatError("no training recordings after the split; lower --data.val_fraction/test_fraction")
        mean, std = channel_statistics(self.recordings["train"])
        stride = round(self.stride_seconds * self.sampling_rate)
        if stride < 1 or self.window_samples < 1:
            raise ConfigError(
                f"window_seconds={self.window_seconds:g} and stride_seconds={self.stride_seconds:g} at "
                f"{self.sampling_rate:g} Hz give windows of {self.window_samples} and strides of {stride} samples; pass "
                "--data.window_seconds and --data.stride_seconds of one sample or more"
            )
        # one subject, one index in every split: the training subjects first (the critic's outputs), then the others
        train_subjects = sorted({rec.subject or rec.name for rec in self.recordings["train"]})
        everyone = {rec.subject or rec.name for recs in self.recordings.values() for rec in recs}
        subjects = train_subjects + sorted(everyone - set(train_subjects))
        for split, recs in self.recordings.items():
            self.datasets[split] = EEGWindows(
                recs, self.window_samples, stride, self.horizon_s, self.postictal_s, mean, std, continuous=split == "test",
                interictal_distance_s=self.interictal_distance_s, leading_gap_s=self.leading_gap_s, subjects=subjects,
            )
        self._check_preictal_windows()
        self.train_set, self.val_set, self.test_set = self.datasets["train"], self.datasets["val"], self.datasets["test"]

    def test_dataloader(self) -> DataLoader:
        """The continuous test stream; warns when it holds no preictal window (see :meth:`_warn_seizure_free_test`)."""
        loader = super().test_dataloader()
        self._warn_seizure_free_test()
        return loader

    def _warn_seizure_free_test(self) -> None:
        """A test split without a preictal window is legitimate (it measures false detections per hour) but has no
        window AUROC, and without seizures no sensitivity: say so once per test run instead of letting them read as
        measurements. Seizures with no window before them (e.g. too close to their file's start) count in the
        sensitivity as missed whatever the model (no alarm can come before them): said so beside the undefined AUROC."""
        dataset = self.datasets.get("test")
        if dataset is None or len(dataset) == 0 or (dataset.labels == 1).any():
            return
        recordings = self.recordings.get("test", [])
        seizures = sum(len(rec.seizures) for rec in recordings)
        start = f"EEGSeizureDataModule: the test windows ({len(recordings)} recording(s)) hold no preictal window"
        fix = "add seizure files or change --data.test_fraction / --data.seed"
        if seizures == 0:
            rank_zero_warn(
                f"{start} (no seizure file fell in it): test/auroc and test/sensitivity are undefined (NaN), only "
                f"test/false_detections_per_hour is measured; for them, {fix}"
            )
        else:
            rank_zero_warn(
                f"{start} (its {seizures} seizure(s) leave no labelled window before them): test/auroc is undefined "
                f"(NaN), and no alarm can come before those seizures, so test/sensitivity counts them as missed "
                f"whatever the model (0 over them); only test/false_detections_per_hour measures it; {fix}"
            )

    def _check_preictal_windows(self) -> None:
        """A training or validation set without a preictal window trains one class, or gives an AUROC of nothing;
        one without any window cannot be served at all. (A test split without a preictal window is allowed: it still
        measures false detections; ``test_dataloader`` warns.)"""
        for split in ("train", "val"):
            dataset = self.datasets[split]
            if len(dataset) == 0 and self.recordings[split]:  # torch's sampler or the fit would fail later, far from here
                longest = max(rec.duration_s for rec in self.recordings[split])
                fix = (
                    "lower --data.window_seconds" if longest < self.window_seconds
                    else "every window is ictal, post-ictal or excluded; check the seizure times and the horizon"
                )
                raise DataFormatError(
                    f"the {split} recordings (longest {longest:g} s) hold no labelled window of {self.window_seconds:g} "
                    f"s; {fix}"
                )
            if len(dataset) == 0 or (dataset.labels == 1).any():
                continue
            seizures = sum(len(rec.seizures) for rec in self.recordings[split])
            if self.data_dir is None and seizures == 0:
                fix = (
                    f"synthetic recordings of {self.recording_minutes:g} min hold no seizure (one needs the "
                    f"{self.horizon_s / 60:g}-min horizon + 5 min before it and a minute after it); raise "
                    "--data.recording_minutes"
                )
            elif seizures == 0:
                fix = "no seizure file fell in it; lower --data.val_fraction/--data.test_fraction or add seizure files"
            else:
                fix = f"its {seizures} seizure(s) leave no labelled window before them; check the horizon and leading gap"
            raise DataFormatError(f"the {split} windows hold no preictal window: {fix}")
