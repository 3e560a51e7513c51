"""Domain-adversarial seizure forecaster: penalty values, one-vs-rest gaps, min-max signs, manual optimisation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.errors import LightningActError
from lightning_act.tasks.seizure_forecasting import DomainCritic, SeizureForecaster, domain_gap, domain_groups, gradient_penalty

TINY = {
    "in_chans": 3, "window_samples": 32, "segment_samples": 8, "embed_dim": 8, "depth": 1, "num_heads": 2,
    "mlp_ratio": 2.0, "critic_hidden": 8,
}


def test_gradient_penalty_of_linear_critic_is_known_analytically() -> None:
    # D(z) = w.z + b has gradient w everywhere: penalty = (||w|| - 1)^2 = (5 - 1)^2 = 16 for w = (3, 4),
    # and d penalty / dw = 2 (||w|| - 1) w / ||w|| = 2 * 4 * (3, 4) / 5 = (4.8, 6.4) (needs create_graph).
    critic = nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        critic.bias.fill_(0.7)
    real, fake = torch.randn(6, 2), torch.randn(6, 2)
    penalty = gradient_penalty(critic, real, fake)
    assert penalty.item() == pytest.approx(16.0, rel=1e-6)
    penalty.backward()
    np.testing.assert_allclose(critic.weight.grad.numpy(), [[4.8, 6.4]], rtol=1e-6)
    assert critic.bias.grad is None  # the penalty does not depend on b


def test_gradient_penalty_interpolates_between_real_and_fake() -> None:
    # D(z) = 0.5 ||z||^2 has gradient z: penalty = mean((||eps r + (1 - eps) f|| - 1)^2), computed in numpy.
    class HalfSquaredNorm(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return 0.5 * (z**2).sum(-1, keepdim=True)

    rng = np.random.default_rng(0)
    real, fake, eps = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.uniform(size=(5, 1))
    expected = np.mean((np.linalg.norm(eps * real + (1 - eps) * fake, axis=1) - 1.0) ** 2)
    got = gradient_penalty(HalfSquaredNorm(), torch.tensor(real), torch.tensor(fake), torch.tensor(eps))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_gradient_penalty_picks_the_named_output_of_a_multi_output_critic() -> None:
    # D(z) = W z with rows w_0 = (3, 4), w_1 = (0, 0.5): rows penalised on output 0 give (5 - 1)^2 = 16,
    # on output 1 (0.5 - 1)^2 = 0.25; mean over the 4 rows (2 of each) = 8.125.
    critic = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.5]]))
    real, fake = torch.randn(4, 2), torch.randn(4, 2)
    penalty = gradient_penalty(critic, real, fake, output_index=torch.tensor([0, 1, 0, 1]))
    assert penalty.item() == pytest.approx(8.125, rel=1e-6)


def test_domain_groups_and_gap_by_hand() -> None:
    # classes y and subjects d of 7 windows; subject 2 has only interictal windows, subject 1's
    # preictal windows have no rival subject in class 1 except subject 0.
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    d = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    groups = domain_groups(y, d)
    assert [(k, m.nonzero().flatten().tolist(), r.nonzero().flatten().tolist()) for k, m, r in groups] == [
        (0, [0], [1, 2, 5]), (1, [1], [0, 2, 5]), (2, [2, 5], [0, 1]),  # interictal
        (0, [3], [4, 6]), (1, [4, 6], [3]),  # preictal
    ]
    scores = np.random.default_rng(0).uniform(-1, 1, size=(7, 3))
    expected = np.mean([
        scores[0, 0] - scores[[1, 2, 5], 0].mean(), scores[1, 1] - scores[[0, 2, 5], 1].mean(),
        scores[[2, 5], 2].mean() - scores[[0, 1], 2].mean(),
        scores[3, 0] - scores[[4, 6], 0].mean(), scores[[4, 6], 1].mean() - scores[3, 1],
    ])
    assert domain_gap(torch.tensor(scores), groups).item() == pytest.approx(expected, rel=1e-12)
    assert domain_groups(y, torch.zeros(7, dtype=torch.long)) == []  # one subject: nothing to tell apart


def test_critic_is_bounded() -> None:
    critic = DomainCritic(4, 8, 3)
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(100.0)
    scores = critic(torch.randn(64, 4) * 10)
    assert scores.shape == (64, 3) and scores.abs().max() <= 1.0


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(batches: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1, limit_train_batches=batches, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks or [],
    )


def _batches(n: int, labels: list[float], domains: list[int] | None = None) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * len(labels), 3, 32, generator=gen)
    y = torch.tensor(labels * n)
    if domains is None:
        return DataLoader(TensorDataset(x, y), batch_size=len(labels), shuffle=False)
    return DataLoader(TensorDataset(x, y, torch.tensor(domains * n)), batch_size=len(labels), shuffle=False)


def test_manual_optimisation_updates_model_and_critic() -> None:
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    assert task.automatic_optimization is False
    model_before = [p.detach().clone() for p in task.model.parameters()]
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    trainer = _trainer(3)
    trainer.fit(task, _batches(3, [0.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 1, 1, 2, 1]))
    assert trainer.global_step == 6  # Lightning counts one step per optimiser.step(): 2 per batch x 3 batches
    assert all(not torch.equal(a, b) for a, b in zip(model_before, task.model.parameters()) if a.numel() > 1)
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/cls_loss", "train/adv_loss", "train/critic_loss", "train/gradient_penalty"):
        assert torch.isfinite(logged[key])


def test_encoder_step_adds_no_gradient_to_the_critic() -> None:
    # After one batch the critic's .grad must be that of the critic loss alone, so it cannot depend
    # on the adversarial weight of the encoder loss (same seed -> same weights, pairs and epsilons).
    grads = []
    for weight in (1e-6, 100.0):
        torch.manual_seed(0)
        task = SeizureForecaster(**TINY, adversarial_weight=weight)
        _trainer(1).fit(task, _batches(1, [0.0, 1.0, 1.0, 0.0], [0, 0, 1, 1]))
        grads.append([p.grad.clone() for p in task.critic.parameters()])
        assert all(p.requires_grad for p in task.critic.parameters())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(LightningActError, match="n_critic"):
        SeizureForecaster(**TINY, n_critic=0)
    with pytest.raises(LightningActError, match="negative"):
        SeizureForecaster(**TINY, adversarial_weight=-0.1)


@pytest.mark.parametrize("domains", [[0, 0, 0, 0], [0, 1, 0, 1]])
def test_batches_without_rival_subjects_skip_the_critic_and_an_epoch_of_them_is_said(domains: list[int]) -> None:
    # one subject in the batch, or (second case) one class per subject: no class has two subjects. Before, an epoch
    # of such batches (a single training subject) ran no adversarial term without a word.
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    with pytest.warns(UserWarning, match="the adversarial term never ran") as record:
        _trainer(2).fit(task, _batches(2, [0.0, 1.0, 0.0, 1.0], domains))
    assert sum("adversarial term never ran" in str(w.message) for w in record) == 1
    assert all(torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))


def test_batches_without_subject_index_warn_once_and_train_the_classifier() -> None:
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    with pytest.warns(UserWarning, match="no subject index") as record:
        _trainer(3).fit(task, _batches(3, [0.0, 1.0, 0.0, 1.0]))
    assert sum("no subject index" in str(w.message) for w in record) == 1
    assert all(torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))


def test_subject_index_beyond_the_critic_is_one_clear_error() -> None:
    task = SeizureForecaster(**TINY, n_domains=2)
    with pytest.raises(LightningActError, match="n_domains 4"):
        _trainer(1).fit(task, _batches(1, [0.0, 1.0, 0.0, 1.0], [0, 3, 1, 2]))


def _numpy_gap(scores: np.ndarray, y: np.ndarray, d: np.ndarray) -> float:
    """One-vs-rest gap written directly from the definition (float64)."""
    gaps = []
    for c in (0.0, 1.0):
        for k in np.unique(d[y == c]):
            mine, rest = (y == c) & (d == k), (y == c) & (d != k)
            if rest.any():
                gaps.append(scores[mine, k].mean() - scores[rest, k].mean())
    return float(np.mean(gaps))


def test_training_loss_is_bce_plus_weighted_domain_gap() -> None:
    # With both learning rates 0 nothing moves, so the step's loss can be recomputed outside:
    # L = BCE(logit, y) + beta * W, W the one-vs-rest gap of the critic's (bounded) scores.
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY, dropout=0.0, lr=0.0, critic_lr=0.0, weight_decay=0.0, adversarial_weight=0.5)
    recorder = _Recorder()
    loader = _batches(1, [1.0, 0.0, 0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1, 2, 2])
    _trainer(1, [recorder]).fit(task, loader)
    x, y, d = next(iter(loader))
    with torch.no_grad():
        z = task.model.embed(x)
        scores = torch.tanh(task.critic.net(z)).double().numpy()
        logit = task.model.head(z).squeeze(-1).double()
    yd = y.double()
    bce = -(yd * torch.log(torch.sigmoid(logit)) + (1 - yd) * torch.log(1 - torch.sigmoid(logit))).mean()
    expected = bce.item() + 0.5 * _numpy_gap(scores, y.numpy(), d.numpy())
    assert recorder.losses[0] == pytest.approx(expected, rel=1e-5)


def test_players_oppose_each_other() -> None:
    # Critic step (penalty off) raises the gap W; an encoder step on the adversarial term alone lowers it.
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY, dropout=0.0, gp_lambda=0.0)
    x, y, d = next(iter(_batches(1, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1, 0, 0, 1, 1])))
    x = x + d[:, None, None] * 2.0  # make the subjects easy to tell apart
    groups = domain_groups(y, d)
    z = task.model.embed(x).detach()
    critic_opt = torch.optim.SGD(task.critic.parameters(), lr=0.1)
    before = domain_gap(task.critic(z), groups).item()
    for _ in range(5):
        loss, _, _ = task.critic_loss(z, groups)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
    trained = domain_gap(task.critic(z), groups).item()
    assert trained > before + 0.05 and trained < 1.5  # not saturated: the encoder still gets a gradient
    encoder_opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    task.critic.requires_grad_(False)
    for _ in range(10):
        gap = domain_gap(task.critic(task.model.embed(x)), groups)
        encoder_opt.zero_grad()
        gap.backward()  # the encoder's adversarial term is +beta * W: it descends W
        encoder_opt.step()
    assert domain_gap(task.critic(task.model.embed(x)), groups).item() < trained - 0.05


def test_predict_returns_probabilities_per_window() -> None:
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    loader = _batches(2, [0.0, 1.0, 0.0])
    batches = _trainer(1).predict(task, loader)
    probs = torch.cat(batches)
    assert probs.shape == (6,) and torch.all((probs > 0) & (probs < 1))
    task.eval()
    with torch.no_grad():
        expected = torch.sigmoid(task(torch.cat([b[0] for b in loader])))
    torch.testing.assert_close(probs, expected)
    assert F.binary_cross_entropy(probs, torch.tensor([0.0, 1.0, 0.0] * 2)).item() > 0


class _FixedLogits(SeizureForecaster):
    """The first sample of channel 0 is the window's logit: losses checkable by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0]


def test_test_loss_is_the_weighted_objective_over_labelled_windows() -> None:
    """Excluded windows (y = -1) neither count in a batch's weight nor in its loss; pos_weight applies as in
    training and val/loss (before: plain BCE, weighted by whole batches: 2.13 against 1.48 here)."""
    task = _FixedLogits(**TINY, pos_weight=5.0)
    logits = np.array([2.0, -1.0, 0.5, -3.0, 4.0, 0.0, 0.0, 0.0])
    y = np.array([1.0, 0.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0])  # the second batch: 1 labelled, 3 excluded
    x = torch.zeros(8, 3, 32)
    x[:, 0, 0] = torch.from_numpy(logits).float()
    loader = DataLoader(TensorDataset(x, torch.from_numpy(y).float()), batch_size=4)
    result = _trainer(1).test(task, loader, verbose=False)[0]
    keep = y >= 0
    z, t = logits[keep], y[keep]
    log_p, log_not_p = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    expected = np.mean(-(5.0 * t * log_p + (1 - t) * log_not_p))
    assert result["test/loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.ddp_scenario("stan_alarms")
def test_ddp_trains_the_adversarial_step_and_takes_alarm_metrics_from_the_whole_test_stream(ddp_scenario) -> None:
    """Before: each rank ran the k-of-n alarm rule on its sampler's share, every other window, and rank 0's numbers
    were logged (false detections 3.32/h against 4.06/h for the whole stream)."""
    from ddp_stan_alarms import DATA, MODEL, LogPower
    from lightning_act.data.eeg import EEGSeizureDataModule
    from lightning_act.eval.seizure_alarms import evaluate_recordings

    data = EEGSeizureDataModule(**DATA)
    data.setup("test")
    task = LogPower(**MODEL)
    windows = [data.test_set[i] for i in range(len(data.test_set))]
    x, y, recording, end = (torch.stack(column) for column in zip(*windows))
    probs = task(x).sigmoid().numpy()
    recordings = data.recordings["test"]
    expected = evaluate_recordings(
        recording.numpy(), end.numpy(), probs, [r.seizures for r in recordings], [r.duration_s for r in recordings],
        threshold=task.hparams.alarm_threshold, k=task.hparams.alarm_k, n=task.hparams.alarm_n,
        refractory_s=task.hparams.refractory_minutes * 60.0, horizon_s=data.horizon_s, postictal_s=data.postictal_s,
    )
    assert expected.false_detections_per_hour > 0 and 0 < expected.sensitivity
    logged = ddp_scenario.json()
    assert logged["fit_steps"] == 2  # before: plain DDP refused the critic's and the encoder's backwards at step 0
    assert logged["test/sensitivity"] == pytest.approx(expected.sensitivity, abs=1e-12)
    assert logged["test/false_detections_per_hour"] == pytest.approx(expected.false_detections_per_hour, rel=1e-6)  # logged as float32
    assert logged["test/mean_lead_time_min"] == pytest.approx(expected.mean_lead_time_s / 60.0, rel=1e-6)
    keep = (y >= 0).numpy()
    z, t = np.log(x.pow(2).mean(dim=(1, 2)).double().numpy()[keep]), y.double().numpy()[keep]
    bce = np.mean(t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z))
    assert logged["test/loss"] == pytest.approx(bce, rel=1e-5)  # both ranks' windows (before: rank 0's mean)


@pytest.mark.parametrize(("option", "says"), [({"gp_pairs": 0}, "gp_pairs=0 must be at least 1"),
                                              ({"pos_weight": -1.0}, "pos_weight=-1.0 must be a positive number"),
                                              ({"pos_weight": math.inf}, "pos_weight=inf must be a positive number")])
def test_a_penalty_over_no_pairs_and_a_non_positive_class_weight_are_one_line(option: dict, says: str) -> None:
    """Before: gp_pairs=0 gave a NaN critic loss at every step; pos_weight -1 a negative loss for preictal windows."""
    with pytest.raises(LightningActError, match=says):
        SeizureForecaster(**TINY, **option)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auroc_keeps_the_order_of_confident_windows(dtype: torch.dtype) -> None:
    # Every positive window above every negative one: AUROC 1 by hand. A float32 sigmoid is exactly 1 for the four
    # top logits, a bf16 one from ~6, so positives tied with negatives: logged as 0.75 before round 17.
    logits = torch.tensor([30.0, 25.0, 20.0, 17.0, -3.0, -5.0], dtype=dtype)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])

    class FixedLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits

    task = SeizureForecaster(**TINY)
    task.model = FixedLogits()
    task.log = lambda *args, **kwargs: None
    task.on_test_epoch_start()
    task.validation_step((torch.zeros(6, 3, 32), labels), 0)
    task.test_step((torch.zeros(6, 3, 32), labels), 0)
    assert float(task.val_auroc.compute()) == 1.0 and float(task.test_auroc.compute()) == 1.0


# --------------------------------------------------------------------------------------------
# Test-stream metrics: partial streams, undefined AUROC, the sanity check (round 19)
# --------------------------------------------------------------------------------------------


def _stream_recording(name: str, seconds: int, seizures: list[tuple[float, float]], positive_ends: list[int]):
    """A 1 Hz, 3-channel recording cut into 10 s windows; _FixedLogits reads channel 0's first sample of each window:
    +5 (probability 0.99) for windows ending at ``positive_ends``, else -5."""
    from lightning_act.data.eeg import EEGRecording

    data = np.full((3, seconds), -5.0, dtype=np.float32)
    for end in positive_ends:
        data[0, end - 10] = 5.0
    return EEGRecording(name=name, data=data, sampling_rate=1.0, seizures=seizures)


class _StreamData(pl.LightningDataModule):
    """Two test recordings, horizon 100 s, post-ictal 50 s, 10 windows a batch (``sampler``: the order, if given).

    A (600 s, seizure 330-350 s, positive windows ending at 50, 250, 360, 550 s), by hand: 50 false (330 - 50 > 100),
    250 true (lead 80 s), 360 ignored (post-ictal [330, 400)), 550 false; interictal 600 - [230, 400) = 430 s.
    B (400 s, seizure 200-210 s, positives at 50 and 150 s): 50 false, 150 true (lead 50 s); interictal
    400 - [100, 260) = 240 s."""

    horizon_s, postictal_s = 100.0, 50.0

    def __init__(self, sampler: list[int] | None = None, seizure_free: bool = False) -> None:
        super().__init__()
        from lightning_act.data.eeg import EEGWindows

        a = _stream_recording("A", 600, [] if seizure_free else [(330.0, 350.0)], [50, 250, 360, 550])
        b = _stream_recording("B", 400, [] if seizure_free else [(200.0, 210.0)], [50, 150])
        self.recordings = {"test": [a, b]}
        self.test_set = EEGWindows([a, b], 10, 10, self.horizon_s, self.postictal_s, np.zeros(3), np.ones(3), continuous=True)
        self.sampler = sampler

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=10, sampler=self.sampler)


def _stream_test(data: _StreamData, limit: int | float = 1.0) -> tuple[dict, list[str]]:
    import warnings

    task = _FixedLogits(**TINY, alarm_threshold=0.5, alarm_k=1, alarm_n=1, refractory_minutes=0.0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_test_batches=limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.test(task, data, verbose=False)[0]
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("batches", "seizures", "false_alarms", "interictal_s", "lead_s"),
    [
        # the whole stream: A and B as in _StreamData's doc
        (1.0, (2, 2), 3, 430 + 240, [80, 50]),
        # 4 batches = A's windows ending 10..400 s: span [0, 400], its seizure counted; alarms 50 false, 250 true,
        # 360 ignored; interictal 400 - [230, 400) = 230 s. Before: pooled with B's seizure and hours (0.5, 5.37/h).
        (4, (1, 1), 1, 230, [80]),
        # 3 batches = A up to 300 s: the onset at 330 s lies beyond the span, a nearby seizure: alarm 250 ignored (not
        # false), [230, 300) not interictal; no seizure scored (sensitivity NaN); interictal 230 s
        (3, (0, 0), 1, 230, []),
        # 8 batches = all of A (span [0, 600]) + B up to 200 s (onset 200 in its span: alarm 150 predicts it, 50 false);
        # interictal 430 + 200 - [100, 200) = 530 s
        (8, (2, 2), 3, 430 + 100, [80, 50]),
    ],
)
def test_alarm_metrics_of_a_partial_test_stream_cover_the_scored_span(batches, seizures, false_alarms, interictal_s, lead_s) -> None:
    result, said = _stream_test(_StreamData(), batches)
    n_seizures, predicted = seizures
    expected_sensitivity = predicted / n_seizures if n_seizures else math.nan
    np.testing.assert_allclose(result["test/sensitivity"], expected_sensitivity, rtol=1e-6)
    assert result["test/false_detections_per_hour"] == pytest.approx(false_alarms / (interictal_s / 3600.0), rel=1e-6)
    expected_lead = np.mean(lead_s) / 60.0 if lead_s else math.nan
    np.testing.assert_allclose(result["test/mean_lead_time_min"], expected_lead, rtol=1e-6)
    partial = [m for m in said if "test stream is incomplete" in m]
    if batches == 1.0:
        assert partial == []
    else:
        scored = min(batches * 10, 100)
        assert len(partial) == 1 and f"({scored} of 100 windows scored" in partial[0]


def test_a_test_stream_scored_with_gaps_logs_no_alarm_metrics() -> None:
    # A's windows 0-9 and 20-29: the k-of-n rule would run across the 100 s gap
    result, said = _stream_test(_StreamData(sampler=list(range(10)) + list(range(20, 30))))
    assert "test/sensitivity" not in result and "test/false_detections_per_hour" not in result
    assert len([m for m in said if "scored with gaps" in m]) == 1


def _auroc_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, over all pairs."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_test_auroc_is_nan_with_one_warning_when_the_test_windows_hold_one_class() -> None:
    """Before: test/auroc 0.0 and torchmetrics' "No positive samples" warning at every batch (10 here)."""
    result, said = _stream_test(_StreamData(seizure_free=True))
    assert math.isnan(result["test/auroc"])
    assert not [m for m in said if "No positive samples" in m]
    assert len([m for m in said if "test/auroc is undefined" in m]) == 1
    assert math.isnan(result["test/sensitivity"])
    assert result["test/false_detections_per_hour"] == pytest.approx(6 / (1000 / 3600.0), rel=1e-6)  # every alarm false
    # with both classes the logged AUROC is the pairwise one over every labelled window
    data = _StreamData()
    result, said = _stream_test(data)
    labels = data.test_set.labels
    logits = np.array([data.test_set[i][0][0, 0].item() for i in range(len(data.test_set))])
    keep = labels >= 0
    assert result["test/auroc"] == pytest.approx(_auroc_by_pairs(logits[keep], labels[keep]), abs=1e-6)
    assert not [m for m in said if "undefined" in m or "No positive samples" in m]


def test_sanity_check_batches_of_one_class_neither_warn_nor_count_in_val_auroc() -> None:
    """Lightning's 2 sanity batches hold interictal windows only (as the recipe's first val batches do). Before:
    torchmetrics' "No positive samples" warning on every fit."""
    import warnings

    torch.manual_seed(0)
    task = _FixedLogits(**TINY, adversarial_weight=0.0)
    rng = np.random.default_rng(0)
    labels = np.array([0.0] * 8 + [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # batches of 4: the first two one class
    x = torch.zeros(16, 3, 32)
    x[:, 0, 0] = torch.from_numpy(rng.normal(size=16) + labels).float()
    val = DataLoader(TensorDataset(x, torch.from_numpy(labels).float()), batch_size=4)
    train = _batches(1, [0.0, 1.0])
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, train, val)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "No positive samples" in m or "undefined" in m]
    expected = _auroc_by_pairs(x[:, 0, 0].double().numpy(), labels)
    assert float(trainer.callback_metrics["val/auroc"]) == pytest.approx(expected, abs=1e-6)
    # a validation epoch of one class: NaN and one warning, not 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(task, DataLoader(TensorDataset(x[:8], torch.zeros(8)), batch_size=4), verbose=False)
        trainer.validate(task, DataLoader(TensorDataset(x[:8], torch.zeros(8)), batch_size=4), verbose=False)
    assert math.isnan(float(trainer.callback_metrics["val/auroc"]))
    assert len([m for m in map(str, (w.message for w in caught)) if "val/auroc is undefined" in m]) == 1
    assert not [w for w in caught if "No positive samples" in str(w.message)]
