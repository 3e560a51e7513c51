"""Adversarial seizure forecaster: gradient penalty values, manual optimisation, predict path."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.errors import LightningActError
from lightning_act.tasks.seizure_forecasting import SeizureForecaster, gradient_penalty

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


def _batches(n: int, labels: list[float]) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * len(labels), 3, 32, generator=gen)
    y = torch.tensor(labels * n)
    return DataLoader(TensorDataset(x, y), batch_size=len(labels), shuffle=False)


def test_manual_optimisation_updates_model_and_critic() -> None:
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    assert task.automatic_optimization is False
    model_before = [p.detach().clone() for p in task.model.parameters()]
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    trainer = _trainer(3)
    trainer.fit(task, _batches(3, [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    assert trainer.global_step == 6  # Lightning counts one step per optimiser.step(): 2 per batch x 3 batches
    assert all(not torch.equal(a, b) for a, b in zip(model_before, task.model.parameters()) if a.numel() > 1)
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/cls_loss", "train/adv_loss", "train/critic_loss", "train/gradient_penalty"):
        assert torch.isfinite(logged[key])


def test_encoder_step_adds_no_gradient_to_the_critic() -> None:
    # After one batch the critic's .grad must be that of L_D alone, so it cannot depend on the
    # adversarial weight of the encoder loss (same seed -> same weights, pairs and epsilons).
    grads = []
    for weight in (0.0, 100.0):
        torch.manual_seed(0)
        task = SeizureForecaster(**TINY, adversarial_weight=weight)
        _trainer(1).fit(task, _batches(1, [0.0, 1.0, 1.0, 0.0]))
        grads.append([p.grad.clone() for p in task.critic.parameters()])
        assert all(p.requires_grad for p in task.critic.parameters())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(LightningActError, match="n_critic"):
        SeizureForecaster(**TINY, n_critic=0)


def test_single_class_batch_skips_the_critic() -> None:
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY)
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    _trainer(2).fit(task, _batches(2, [0.0, 0.0, 0.0, 0.0]))
    assert all(torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))


def test_training_loss_is_bce_plus_weighted_critic_gap() -> None:
    # With both learning rates 0 nothing moves, so the step's loss can be recomputed outside:
    # L = BCE(logit, y) + beta * (mean D(z_interictal) - mean D(z_preictal)).
    torch.manual_seed(0)
    task = SeizureForecaster(**TINY, dropout=0.0, lr=0.0, critic_lr=0.0, weight_decay=0.0, adversarial_weight=0.5)
    recorder = _Recorder()
    loader = _batches(1, [1.0, 0.0, 0.0, 1.0, 0.0])
    _trainer(1, [recorder]).fit(task, loader)
    x, y = next(iter(loader))
    with torch.no_grad():
        z = task.model.embed(x)
        d = task.critic(z).squeeze(-1).double()
        logit = task.model.head(z).squeeze(-1).double()
    yd = y.double()
    bce = -(yd * torch.log(torch.sigmoid(logit)) + (1 - yd) * torch.log(1 - torch.sigmoid(logit))).mean()
    expected = bce + 0.5 * (d[y == 0].mean() - d[y == 1].mean())
    assert recorder.losses[0] == pytest.approx(expected.item(), rel=1e-5)


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
