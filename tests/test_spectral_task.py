"""Spectral-NN, its LightningModule and the detectors-table script on tiny synthetic data."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import average_precision_score, roc_auc_score

from lightning_act.data.hyperspectral import HyperspectralDataModule
from lightning_act.errors import LightningActError
from lightning_act.eval.ranking import probability_of_score, ranking_scores
from lightning_act.models.spectral_nn import SpectralNN
from lightning_act.nn.pmish import PMish
from lightning_act.tasks.spectral_detection import SpectralTargetDetection

TINY_DATA = {"num_scenes": 5, "scene_size": 16, "num_bands": 8, "val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_spectral_nn_structure() -> None:
    model = SpectralNN(in_bands=10, hidden_sizes=(6, 4), dropout=0.0)
    assert [b.linear.in_features for b in model.blocks] == [10, 6]
    assert sum(isinstance(m, PMish) for m in model.modules()) == 2
    assert model(torch.randn(3, 7, 10)).shape == (3, 7)
    created = timm.create_model("spectral_nn", in_bands=10)
    assert [b.linear.out_features for b in created.blocks] == [128, 64]


def test_losses_match_hand_computation() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0])
    task = SpectralTargetDetection(in_bands=4, pos_weight=3.0)
    p = 1 / (1 + np.exp(-logits.numpy()))
    expected_bce = -(3.0 * np.log(p[0]) + np.log(1 - p[1]) + np.log(1 - p[2])) / 3
    assert task.compute_loss(logits, labels).item() == pytest.approx(expected_bce, rel=1e-6)
    focal = SpectralTargetDetection(in_bands=4, loss="focal", focal_alpha=0.25, focal_gamma=2.0)
    p_true = np.array([p[0], 1 - p[1], 1 - p[2]])
    alpha = np.array([0.25, 0.75, 0.75])
    expected_focal = np.mean(-alpha * (1 - p_true) ** 2 * np.log(p_true))
    assert focal.compute_loss(logits, labels).item() == pytest.approx(expected_focal, rel=1e-6)


def test_tiny_fit_logs_metrics_and_pr_curve(tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = HyperspectralDataModule(**TINY_DATA)
    task = SpectralTargetDetection(in_bands=8, hidden_sizes=(16, 8), pos_weight="auto")
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        log_every_n_steps=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    assert task.pos_weight.item() == pytest.approx(data.pos_weight)
    for key in ("train/loss", "val/ap", "val/auroc"):
        assert key in trainer.logged_metrics and math.isfinite(float(trainer.logged_metrics[key]))
    results = trainer.test(task, datamodule=data, verbose=False)[0]

    task.eval()
    with torch.no_grad():
        scores = task(data.test_set.tensors[0]).numpy()
    labels = data.test_labels.numpy()
    assert results["test/auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    assert results["test/ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    precision, recall, _ = task.test_pr_curve
    assert precision[-1] == 1.0 and recall[-1] == 0.0 and recall[0] == 1.0
    csv_file = Path(trainer.log_dir) / "test_pr_curve.csv"
    assert csv_file.read_text().splitlines()[0] == "threshold_probability,precision,recall"
    metrics_csv = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert all(key in metrics_csv for key in ("val/ap", "val/auroc", "test/ap", "test/auroc"))


def test_band_mismatch_and_bad_arguments_are_clear() -> None:
    data = HyperspectralDataModule(**TINY_DATA)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(LightningActError, match="set --model.in_bands 8"):
        trainer.fit(SpectralTargetDetection(in_bands=5), datamodule=data)
    with pytest.raises(LightningActError, match="unknown loss"):
        SpectralTargetDetection(loss="hinge")  # type: ignore[arg-type]
    for pos_weight in (math.inf, "Sqrt"):  # before: inf made every loss NaN; "Sqrt" a bare float() ValueError
        with pytest.raises(LightningActError, match="pos_weight must be 'sqrt', 'auto', null or a positive number"):
            SpectralTargetDetection(pos_weight=pos_weight)  # type: ignore[arg-type]


def _detectors_table_script():
    spec = importlib.util.spec_from_file_location("detectors_table", Path(__file__).parents[1] / "scripts" / "detectors_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detectors_table_quick_mode_end_to_end() -> None:
    report = _detectors_table_script().main(["--quick"]).splitlines()
    methods = ["SAM", "MF", "ACE", "CEM", "LogReg", "Spectral-NN"]
    table = [line for line in report if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in table] == methods
    for line in table:
        ap = float(line.split("|")[2].split()[0])
        assert 0.0 < ap <= 1.0
    assert table[-1].endswith("| — |")
    assert any(line.startswith("Seeds [0, 1]; per seed ") for line in report)
    assert sum(line.startswith("Paper claim") for line in report) == 2


def test_detectors_table_pairs_seeds_and_decides_claims() -> None:
    module = _detectors_table_script()
    methods = ["SAM", "MF", "ACE", "CEM", "LogReg", "Spectral-NN"]
    # Spectral-NN AP 0.9, 0.8, 0.7; ACE 0.6, 0.7, 0.5 -> paired differences 0.3, 0.1, 0.2:
    # mean 0.2, sd 0.1, half-width t(0.975, 2) · 0.1 / √3 = 0.248414.
    ap = {"Spectral-NN": [0.9, 0.8, 0.7], "ACE": [0.6, 0.7, 0.5]}
    results = [
        {"scores": {m: {"ap": ap.get(m, [0.1, 0.2, 0.1])[k], "roc_auc": 0.99 if m == "ACE" else 0.9} for m in methods}}
        for k in range(3)
    ]
    rows = {row["method"]: row for row in module.summarise(results)}
    mean, low, high = rows["ACE"]["delta_ap"]
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - 0.248414, abs=1e-6)
    assert high == pytest.approx(0.2 + 0.248414, abs=1e-6)
    claims = module.verdicts(list(rows.values()))
    assert "NOT REPRODUCED: not separable from ACE" in claims[0]
    assert claims[1].startswith("Paper claim 'ACE has the best ROC-AUC': REPRODUCED")


def test_ranking_metrics_read_probabilities_whatever_the_batch_and_no_curve_without_a_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FirstBand(torch.nn.Module):  # the logit is the first band: a ranking that separates the classes perfectly
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0]

    # Batch 1's logits all lie in [0, 1], batch 2's do not. torchmetrics applied a sigmoid to batch 2 only, so its
    # target (sigmoid 1.5 = 0.82) ranked below batch 1's background (0.9): AUROC 0.75, AP 0.83 were logged.
    x, y = torch.tensor([[0.9], [0.95], [-3.0], [1.5]]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    task = SpectralTargetDetection(in_bands=1, pos_weight=None)
    task.model = FirstBand()
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    out = trainer.test(task, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2), verbose=False)[0]
    assert out["test/auroc"] == pytest.approx(roc_auc_score(y, x[:, 0])) == 1.0
    assert out["test/ap"] == pytest.approx(average_precision_score(y, x[:, 0])) == 1.0
    assert not list(tmp_path.iterdir())  # logger=False: no test_pr_curve.csv in the working directory


class FixedLogits(torch.nn.Module):
    """A stand-in model whose output is given logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_metrics_keep_the_order_of_confident_logits(dtype: torch.dtype) -> None:
    # Ranked: 30 (+), 20 (-), 18 (+), 17.5 (-), -3 (-), -5 (-). By hand: AP = (1/1 + 2/3) / 2 = 5/6; AUROC = 7/8 (the
    # positive at 18 is below one negative). A float32 sigmoid is exactly 1 for all four top logits (AP 0.5 for a
    # perfect ranking before round 17); bf16's from ~6.
    logits = torch.tensor([30.0, 20.0, 18.0, 17.5, -3.0, -5.0], dtype=dtype)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    task = SpectralTargetDetection(in_bands=4, pos_weight=None)
    task.model = FixedLogits(logits)
    task.log = lambda *args, **kwargs: None
    task.validation_step((torch.zeros(6, 4), labels), 0)
    task.test_step((torch.zeros(6, 4), labels), 0)
    for auroc, ap in ((task.val_auroc, task.val_ap), (task.test_auroc, task.test_ap)):
        assert float(ap.compute()) == pytest.approx(5 / 6, rel=1e-6)
        assert float(auroc.compute()) == pytest.approx(7 / 8, rel=1e-6)
    _, _, thresholds = task.test_pr.compute()
    probabilities = probability_of_score(thresholds)  # the curve's thresholds read as probabilities again
    np.testing.assert_allclose(probabilities.numpy(), 1 / (1 + np.exp(-logits.double().numpy()[::-1])), rtol=1e-12)


def test_ranking_scores_are_strictly_increasing_in_the_logit() -> None:
    logits = torch.tensor([-1e12, -40.0, -17.0, 0.0, 16.6, 17.0, 36.0, 40.0, 1e6, 1e12], dtype=torch.float64)
    scores = ranking_scores(logits)
    assert bool((scores.diff() > 0).all()) and bool((scores > 0).all()) and bool((scores < 1).all())
    np.testing.assert_allclose(probability_of_score(scores[1:-2]).numpy(), torch.sigmoid(logits[1:-2]).numpy(), rtol=1e-9)
