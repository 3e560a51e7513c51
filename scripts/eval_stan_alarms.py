"""Continuous-monitoring evaluation of a trained STAN checkpoint on held-out recordings.

Scores every window of the test recordings of the recipe's datamodule in time order, turns
the probabilities into alarms (k of the last n positive, then a refractory period) and prints
sensitivity, false detections per hour and mean lead time (conventions:
lightning_act/eval/seizure_alarms.py and docs/stan.md).

    python scripts/eval_stan_alarms.py --ckpt runs/stan/checkpoints/last.ckpt --config recipes/stan.yaml
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

from lightning_act.data.eeg import EEGSeizureDataModule
from lightning_act.errors import DataNotFoundError
from lightning_act.eval.ranking import ranking_scores
from lightning_act.eval.seizure_alarms import evaluate_recordings
from lightning_act.tasks.seizure_forecasting import SeizureForecaster


def predict_stream(task: SeizureForecaster, datamodule: EEGSeizureDataModule) -> tuple[np.ndarray, ...]:
    """``(recording_index, window_end_s, label, probability, ranking_score)`` for every test window: the float32
    probability for the alarms, as the task's test step raises them, and the :func:`ranking_scores` of the logits
    for the AUROC, as the task's ``test/auroc`` (a float32 sigmoid ties every logit above about 16.6 at 1)."""
    parts: list[tuple[np.ndarray, ...]] = []
    task.eval()
    with torch.no_grad():
        for x, y, rec, end in datamodule.test_dataloader():
            logits = task(x).float()
            parts.append((rec.numpy(), end.numpy(), y.numpy(), logits.sigmoid().numpy(), ranking_scores(logits).numpy()))
    return tuple(np.concatenate(column) for column in zip(*parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `lightning_act fit --config recipes/stan.yaml`")
    parser.add_argument("--config", default="recipes/stan.yaml", help="recipe whose data: init_args build the datamodule")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None, help="window thresholds (default: the model's)")
    parser.add_argument("--k", type=int, default=None, help="alarm when k of the last n windows are positive")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--refractory-minutes", type=float, default=None)
    args = parser.parse_args()

    for path in (args.ckpt, args.config):
        if not Path(path).is_file():
            raise DataNotFoundError(f"'{path}' not found; train first with `lightning_act fit --config {args.config}`")
    data_args = yaml.safe_load(Path(args.config).read_text()).get("data", {}).get("init_args", {})
    datamodule = EEGSeizureDataModule(**data_args)
    datamodule.setup()
    task = SeizureForecaster.load_from_checkpoint(args.ckpt, map_location="cpu")
    hp = task.hparams
    k = args.k if args.k is not None else hp.alarm_k
    n = args.n if args.n is not None else hp.alarm_n
    refractory = args.refractory_minutes if args.refractory_minutes is not None else hp.refractory_minutes
    thresholds = args.thresholds if args.thresholds is not None else [hp.alarm_threshold]

    rec, end, label, prob, score = predict_stream(task, datamodule)
    recordings = datamodule.recordings["test"]
    labelled = label >= 0
    print(
        f"held-out recordings: {len(recordings)} ({sum(r.duration_s for r in recordings) / 3600:.1f} h, "
        f"{sum(len(r.seizures) for r in recordings)} seizures); window AUROC {roc_auc_score(label[labelled], score[labelled]):.3f}"
    )
    print(f"alarm rule: {k} of last {n} windows >= threshold, refractory {refractory:g} min, horizon {datamodule.horizon_s / 60:g} min")
    print(f"{'threshold':>9} {'sensitivity':>11} {'FD/h':>7} {'lead (min)':>10} {'predicted':>9} {'false':>6} {'interictal h':>12}")
    for threshold in thresholds:
        report = evaluate_recordings(
            rec, end, prob, [r.seizures for r in recordings], [r.duration_s for r in recordings],
            threshold=threshold, k=k, n=n, refractory_s=refractory * 60.0,
            horizon_s=datamodule.horizon_s, postictal_s=datamodule.postictal_s,
            nearby_seizures=[r.nearby_seizures for r in recordings],
        )
        lead = report.mean_lead_time_s / 60.0
        print(
            f"{threshold:>9.2f} {report.sensitivity:>11.3f} {report.false_detections_per_hour:>7.3f} "
            f"{'-' if math.isnan(lead) else f'{lead:.1f}':>10} {report.n_predicted:>4}/{report.n_seizures:<4} "
            f"{report.n_false_alarms:>6} {report.interictal_hours:>12.2f}"
        )


if __name__ == "__main__":
    main()
