"""Seizure-forecasting benchmark that can tell methods apart: STAN (with / without its adversarial
term) beside a one-feature band-power baseline, on synthetic patients, several seeds.

Per seed (everything is drawn from the seed, subjects included):

* patients from :func:`lightning_act.data.eeg.draw_subject` — montage gains, background spectrum,
  drowsy/awake alternation, amplitude drift, preictal change time and beta band, artifact rates
  all differ between patients; recordings from :func:`generate_subject_recording` (muscle
  bursts, electrode pops, synchronous beta bursts without theta, theta bursts without synchrony);
* training patients: per patient a seizure-free recording and a recording with one seizure (half
  of them followed by a second, clustered seizure); labels with the common interictal convention
  (>= 4 h from any seizure, so interictal windows come from the seizure-free recordings);
* calibration patients (held out from training): STAN's window threshold = 99th percentile of
  their interictal window probabilities; the baseline's = 99th percentile of the *training*
  interictal windows' mean beta-power ratio (it has nothing to fit, so those are unseen to it);
* evaluation patients (held out from both): one long recording each, several seizures with some
  clustered, >= 100 interictal hours per seed in the full run; every 5 s window is scored, and
  alarms follow the package protocol (k = 3 of the last n = 5 windows above threshold, 15 min
  refractory, 15 min horizon, 10 min post-ictal; lightning_act/eval/seizure_alarms.py).

Reported per method, pooled over seeds: sensitivity (exact binomial 95 % interval), false
detections per interictal hour (exact Poisson 95 % interval), mean lead time (bootstrap 95 %
interval over predicted seizures), window AUROC (mean over seeds with a t interval), and the
per-seed values.

    OMP_NUM_THREADS=1 python scripts/stan_benchmark.py --jobs 3        # full: 3 seeds (see docs/stan.md for timings)
    OMP_NUM_THREADS=1 python scripts/stan_benchmark.py --quick         # smoke run (< 60 s)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, RandomSampler

from lightning_act.data.eeg import (
    INTERICTAL,
    EEGRecording,
    EEGWindows,
    SubjectProfile,
    band_power_ratio,
    channel_statistics,
    draw_subject,
    generate_subject_recording,
    label_windows,
)
from lightning_act.eval.ranking import ranking_scores
from lightning_act.eval.seizure_alarms import AlarmReport, evaluate_recordings, proportion_interval, rate_interval
from lightning_act.tasks.seizure_forecasting import SeizureForecaster

HORIZON_S, POSTICTAL_S, FOUR_HOURS_S = 900.0, 600.0, 4 * 3600.0
ALARM = {"k": 3, "n": 5, "refractory_s": 900.0, "horizon_s": HORIZON_S, "postictal_s": POSTICTAL_S}
METHODS = ("band-power baseline", "STAN, adversarial", "STAN, no adversarial term")


@dataclass
class Config:
    """Sizes of one benchmark run (``full`` or ``quick``)."""

    n_channels: int = 8
    sampling_rate: float = 64.0
    window_s: float = 5.0
    n_train: int = 6
    n_calibration: int = 2
    n_test: int = 8
    free_minutes: float = 120.0
    seizure_recording_minutes: float = 90.0
    test_hours: float = 14.5
    test_seizures: int = 3
    train_batches: int = 180
    batch_size: int = 64
    adversarial_weight: float = 0.1


QUICK = Config(n_train=2, n_calibration=1, n_test=1, free_minutes=30.0, seizure_recording_minutes=45.0, test_hours=1.5,
               test_seizures=1, train_batches=6)


def _seizures_after(rng: np.random.Generator, first_onset: float, clustered: bool) -> list[tuple[float, float]]:
    """One seizure at ``first_onset`` and, if ``clustered``, a second 5-20 min after its end."""
    end = first_onset + rng.uniform(30.0, 90.0)
    seizures = [(first_onset, end)]
    if clustered:
        onset = end + rng.uniform(300.0, 1200.0)
        seizures.append((onset, onset + rng.uniform(30.0, 90.0)))
    return seizures


def training_recordings(cfg: Config, subjects: list[SubjectProfile], seed: int, role: int) -> list[EEGRecording]:
    """Per subject a seizure-free recording and one with a (sometimes clustered) seizure."""
    recordings = []
    for i, subject in enumerate(subjects):
        rng = np.random.default_rng([seed, role, i, 0])
        onset = rng.uniform(0.4, 0.55) * cfg.seizure_recording_minutes * 60.0
        seizures = _seizures_after(rng, onset, clustered=i % 2 == 1)
        recordings.append(generate_subject_recording(
            subject, [seed, role, i, 1], f"{subject.name}_free", cfg.free_minutes, [], cfg.sampling_rate))
        recordings.append(generate_subject_recording(
            subject, [seed, role, i, 2], f"{subject.name}_seizure", cfg.seizure_recording_minutes, seizures, cfg.sampling_rate))
    return recordings


def evaluation_seizures(cfg: Config, seed: int, index: int) -> list[tuple[float, float]]:
    """``test_seizures`` episodes spread over the recording, every other one a cluster of two."""
    rng = np.random.default_rng([seed, 9, index])
    duration = cfg.test_hours * 3600.0
    slot = (duration - 1800.0) / cfg.test_seizures
    seizures = []
    for j in range(cfg.test_seizures):
        onset = 1200.0 + j * slot + rng.uniform(0.0, max(0.0, slot - 3600.0))
        seizures += _seizures_after(rng, onset, clustered=j % 2 == 1)
    return seizures


def cut_windows(rec: EEGRecording, window: int) -> np.ndarray:
    """Consecutive non-overlapping windows ``(N, C, window)`` of a recording."""
    n = rec.data.shape[1] // window
    return rec.data[:, : n * window].reshape(rec.data.shape[0], n, window).transpose(1, 0, 2)


def train_stan(cfg: Config, train: list[EEGRecording], adversarial_weight: float, seed: int,
               mean: np.ndarray, std: np.ndarray) -> SeizureForecaster:
    """STAN (stan_tiny widths, 1 s segments) trained for ``train_batches`` random batches."""
    window = round(cfg.window_s * cfg.sampling_rate)
    windows = EEGWindows(train, window, window, HORIZON_S, POSTICTAL_S, mean, std, interictal_distance_s=FOUR_HOURS_S)
    pl.seed_everything(seed, verbose=False)
    task = SeizureForecaster(
        in_chans=cfg.n_channels, window_samples=window, segment_samples=round(cfg.sampling_rate), embed_dim=32, depth=2,
        num_heads=4, mlp_ratio=2.0, critic_hidden=64, n_domains=cfg.n_train, adversarial_weight=adversarial_weight,
        lr=2e-3,
    )
    sampler = RandomSampler(windows, num_samples=cfg.train_batches * cfg.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(windows, batch_size=cfg.batch_size, sampler=sampler))
    return task.eval()


def stan_logits(task: SeizureForecaster, windows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """STAN's float32 logits of ``windows``: their sigmoid is the alarms' probability, their :func:`ranking_scores`
    the AUROC's score (a float32 sigmoid ties every logit above about 16.6 at 1)."""
    x = (windows - mean.astype(np.float32)[None, :, None]) / std.astype(np.float32)[None, :, None]
    with torch.inference_mode():
        return torch.cat([task(torch.from_numpy(np.ascontiguousarray(x[i : i + 2048]))) for i in range(0, len(x), 2048)])


def interictal_windows(recordings: list[EEGRecording], window: int) -> list[np.ndarray]:
    """Windows of ``recordings`` labelled interictal under the >= 4 h convention."""
    parts = []
    for rec in recordings:
        _, labels = label_windows(rec.data.shape[1], rec.sampling_rate, window, window, rec.seizures, HORIZON_S,
                                  POSTICTAL_S, interictal_distance_s=FOUR_HOURS_S)
        parts.append(cut_windows(rec, window)[labels[: rec.data.shape[1] // window] == INTERICTAL])
    return parts


def run_seed(cfg: Config, seed: int) -> dict[str, dict]:
    """Train, calibrate and evaluate every method on one seed's patients."""
    window = round(cfg.window_s * cfg.sampling_rate)
    subjects = [draw_subject([seed, 0, i], f"s{seed}p{i:02d}", cfg.n_channels) for i in range(cfg.n_train + cfg.n_calibration + cfg.n_test)]
    train = training_recordings(cfg, subjects[: cfg.n_train], seed, 0)
    calibration = training_recordings(cfg, subjects[cfg.n_train : cfg.n_train + cfg.n_calibration], seed, 1)
    mean, std = channel_statistics(train)
    models = {
        METHODS[1]: train_stan(cfg, train, cfg.adversarial_weight, seed, mean, std),
        METHODS[2]: train_stan(cfg, train, 0.0, seed, mean, std),
    }
    thresholds = {METHODS[0]: float(np.percentile(
        np.concatenate([band_power_ratio(w, cfg.sampling_rate) for w in interictal_windows(train, window)]), 99))}
    calibration_windows = np.concatenate(interictal_windows(calibration, window))
    for name, task in models.items():
        thresholds[name] = float(np.percentile(stan_logits(task, calibration_windows, mean, std).sigmoid().numpy(), 99))
    del train, calibration, calibration_windows

    scores: dict[str, list[np.ndarray]] = {name: [] for name in METHODS}  # the alarms' scores
    rank_scores: dict[str, list[np.ndarray]] = {name: [] for name in METHODS}  # the AUROC's, in the same order
    rec_index, end_times, labels, seizures, durations = [], [], [], [], []
    for i, subject in enumerate(subjects[cfg.n_train + cfg.n_calibration :]):
        rec = generate_subject_recording(subject, [seed, 2, i], f"{subject.name}_test", cfg.test_hours * 60.0,
                                         evaluation_seizures(cfg, seed, i), cfg.sampling_rate)
        windows = cut_windows(rec, window)
        _, window_labels = label_windows(rec.data.shape[1], rec.sampling_rate, window, window, rec.seizures, HORIZON_S, POSTICTAL_S)
        labels.append(window_labels[: len(windows)])
        rec_index.append(np.full(len(windows), i))
        end_times.append((np.arange(len(windows)) + 1) * cfg.window_s)
        seizures.append(rec.seizures)
        durations.append(rec.duration_s)
        scores[METHODS[0]].append(band_power_ratio(windows, cfg.sampling_rate))
        rank_scores[METHODS[0]].append(scores[METHODS[0]][-1])
        for name, task in models.items():
            logits = stan_logits(task, windows, mean, std)
            scores[name].append(logits.sigmoid().numpy())
            rank_scores[name].append(ranking_scores(logits).numpy())
    rec_index, end_times, labels = np.concatenate(rec_index), np.concatenate(end_times), np.concatenate(labels)
    labelled = labels >= 0
    results = {}
    for name in METHODS:
        score, rank_score = np.concatenate(scores[name]), np.concatenate(rank_scores[name])
        report = evaluate_recordings(rec_index, end_times, score, seizures, durations, threshold=thresholds[name], **ALARM)
        auroc = roc_auc_score(labels[labelled], rank_score[labelled]) if len(np.unique(labels[labelled])) == 2 else math.nan
        results[name] = {"report": report, "auroc": float(auroc), "threshold": thresholds[name]}
    return results


def _bootstrap_mean(values: list[float], rng: np.random.Generator, rounds: int = 2000) -> tuple[float, float]:
    if len(values) < 2:
        return math.nan, math.nan
    means = rng.choice(values, size=(rounds, len(values))).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Pooled metrics with 95 % intervals per method."""
    rng = np.random.default_rng(0)
    summary = {}
    for name in METHODS:
        reports: list[AlarmReport] = [per_seed[s][name]["report"] for s in per_seed]
        aurocs = [per_seed[s][name]["auroc"] for s in per_seed]
        predicted, seizures = sum(r.n_predicted for r in reports), sum(r.n_seizures for r in reports)
        false, hours = sum(r.n_false_alarms for r in reports), sum(r.interictal_hours for r in reports)
        leads = [t / 60.0 for r in reports for t in r.lead_times_s]
        half = float(student_t.ppf(0.975, len(aurocs) - 1) * np.std(aurocs, ddof=1) / math.sqrt(len(aurocs))) if len(aurocs) > 1 else math.nan
        summary[name] = {
            "sensitivity": predicted / seizures if seizures else math.nan,
            "sensitivity_ci": proportion_interval(predicted, seizures),
            "predicted": predicted, "seizures": seizures,
            "fd_per_h": false / hours if hours else math.nan, "fd_per_h_ci": rate_interval(false, hours),
            "false_alarms": false, "interictal_hours": hours,
            "lead_min": float(np.mean(leads)) if leads else math.nan, "lead_min_ci": _bootstrap_mean(leads, rng),
            "auroc": float(np.mean(aurocs)), "auroc_ci": (float(np.mean(aurocs)) - half, float(np.mean(aurocs)) + half),
            "per_seed": {int(s): {"sensitivity": per_seed[s][name]["report"].sensitivity,
                                  "fd_per_h": per_seed[s][name]["report"].false_detections_per_hour,
                                  "auroc": per_seed[s][name]["auroc"], "threshold": per_seed[s][name]["threshold"]}
                         for s in per_seed},
        }
    return summary


def markdown_table(summary: dict[str, dict]) -> str:
    def interval(value: float, ci: tuple[float, float], digits: int) -> str:
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"

    rows = ["| method | sensitivity [95 % CI] | FD/h [95 % CI] | mean lead time, min [95 % CI] | window AUROC, mean over seeds [95 % CI] |",
            "|---|---|---|---|---|"]
    for name, m in summary.items():
        rows.append(
            f"| {name} | {interval(m['sensitivity'], m['sensitivity_ci'], 2)} ({m['predicted']}/{m['seizures']}) | "
            f"{interval(m['fd_per_h'], m['fd_per_h_ci'], 3)} ({m['false_alarms']} in {m['interictal_hours']:.0f} h) | "
            f"{interval(m['lead_min'], m['lead_min_ci'], 1)} | {interval(m['auroc'], m['auroc_ci'], 3)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: one seed, a few patients and batches")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once (1 thread each)")
    parser.add_argument("--json", default=None, help="write the summary (and per-seed values) to this JSON file")
    args = parser.parse_args(argv)
    cfg, seeds = (QUICK, args.seeds[:1]) if args.quick else (Config(), args.seeds)
    torch.set_num_threads(1)
    started = time.time()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(seeds)), initializer=torch.set_num_threads,
                                                       initargs=(1,)) as pool:
            per_seed = dict(zip(seeds, pool.starmap(run_seed, [(cfg, seed) for seed in seeds])))
    else:
        per_seed = {seed: run_seed(cfg, seed) for seed in seeds}
    for seed in seeds:
        print(f"seed {seed}: " + "; ".join(
            f"{name}: sens {r['report'].sensitivity:.2f}, FD/h {r['report'].false_detections_per_hour:.3f}, AUROC {r['auroc']:.3f}"
            for name, r in per_seed[seed].items()), flush=True)
    summary = summarise(per_seed)
    print(f"\nseeds {seeds}; {cfg.n_train} training / {cfg.n_calibration} calibration / {cfg.n_test} evaluation patients per seed; "
          f"alarm: {ALARM['k']} of last {ALARM['n']} windows, 15 min refractory and horizon")
    print(markdown_table(summary))
    print(f"\nwall time {time.time() - started:.0f} s; torch {torch.__version__}, Python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "quick": args.quick, "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
