"""Adversarial seizure forecasting with STAN (Li et al. 2025, arXiv 2511.01275).

The paper trains STAN with a classifier loss plus an adversarial term from a discriminator
on the learned representations, stabilised with a gradient penalty, but does not publish the
exact objective.  Formulation chosen here (WGAN-GP critic, Gulrajani et al. 2017):

* ``z = STAN.embed(x)`` is the window embedding (LayerNorm without affine parameters, so its
  scale is fixed and cannot be inflated to game a Lipschitz critic).  ``P`` = embeddings of
  preictal windows ("real"), ``I`` = embeddings of interictal windows ("fake").
* Critic ``D`` (MLP) minimises
  ``L_D = E[D(z_I)] - E[D(z_P)] + λ E[(||∇_ẑ D(ẑ)||_2 - 1)^2]``, ``ẑ = ε z_P + (1-ε) z_I``,
  ``ε ~ U(0, 1)`` per pair, pairs drawn by sampling each class with replacement up to the larger
  class size; embeddings are detached for this step.  The penalty is built with
  ``create_graph=True`` so its gradient reaches the critic's weights.  Thus
  ``-L_D`` (without penalty) estimates the Wasserstein-1 distance between the class-conditional
  embedding distributions.
* Encoder + head minimise ``L = BCE(logit, y) + β (E[D(z_I)] - E[D(z_P)])`` with the freshly
  updated critic: the encoder is pushed to *increase* the critic's Wasserstein estimate, i.e.
  to separate preictal from interictal embeddings in every 1-Lipschitz direction the critic
  finds, not just along the linear head.  (A GAN generator would minimise that gap; doing so
  here would make the classes indistinguishable and fight the classifier.)  ``β`` is
  ``adversarial_weight``, ``λ`` is ``gp_lambda``.
* Per training batch: ``n_critic`` critic updates, then one encoder/head update (manual
  optimisation, two optimisers).  Batches with only one class skip both adversarial parts.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_act.errors import LightningActError
from lightning_act.eval.seizure_alarms import evaluate_recordings
from lightning_act.models.stan import STAN


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor | None = None
) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||∇_x̂ D(x̂)||_2 - 1)^2]`` at ``x̂ = ε real + (1-ε) fake`` (Gulrajani et al. 2017).

    ``real`` and ``fake`` are paired row by row; ``epsilon`` (one per row) defaults to U(0, 1).
    The graph is kept (``create_graph=True``) so the penalty can be back-propagated to ``critic``.
    """
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    mixed = (epsilon * real + (1.0 - epsilon) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def make_critic(embed_dim: int, hidden: int) -> nn.Sequential:
    """Two-hidden-layer MLP critic.

    No normalisation layers (they would couple samples and break the per-sample penalty) and no
    output bias (a constant shift cancels in every WGAN-GP term, so it would never be trained).
    """
    return nn.Sequential(
        nn.Linear(embed_dim, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, 1, bias=False),
    )


class SeizureForecaster(pl.LightningModule):
    """STAN classifier with a WGAN-GP critic on its embeddings (formulation in the module doc)."""

    def __init__(
        self,
        in_chans: int = 23,
        window_samples: int = 1280,
        segment_samples: int = 128,
        embed_dim: int = 176,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        critic_hidden: int = 128,
        adversarial_weight: float = 0.1,
        gp_lambda: float = 10.0,
        n_critic: int = 1,
        lr: float = 1e-3,
        critic_lr: float = 1e-3,
        weight_decay: float = 0.01,
        pos_weight: float | None = None,
        alarm_threshold: float = 0.5,
        alarm_k: int = 3,
        alarm_n: int = 5,
        refractory_minutes: float = 15.0,
    ) -> None:
        super().__init__()
        if n_critic < 1:
            raise LightningActError(f"n_critic={n_critic} must be at least 1; pass --model.init_args.n_critic 1 or more")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = STAN(
            in_chans=in_chans,
            window_samples=window_samples,
            segment_samples=segment_samples,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            num_classes=1,
        )
        self.critic = make_critic(embed_dim, critic_hidden)
        self.val_auroc = torchmetrics.classification.BinaryAUROC()
        self.test_auroc = torchmetrics.classification.BinaryAUROC()
        self._test_outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preictal logit per window."""
        return self.model(x)

    def _classifier_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.hparams.pos_weight is None else logits.new_tensor(self.hparams.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    @staticmethod
    def _paired(pre: torch.Tensor, inter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample both classes with replacement to the larger class size, for row-wise pairs."""
        size = max(len(pre), len(inter))
        return (
            pre[torch.randint(len(pre), (size,), device=pre.device)],
            inter[torch.randint(len(inter), (size,), device=inter.device)],
        )

    def critic_loss(self, z_pre: torch.Tensor, z_inter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L_D, Wasserstein estimate, gradient penalty)`` on detached embeddings."""
        wasserstein = self.critic(z_pre).mean() - self.critic(z_inter).mean()
        penalty = gradient_penalty(self.critic, *self._paired(z_pre, z_inter))
        return -wasserstein + self.hparams.gp_lambda * penalty, wasserstein, penalty

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        model_opt, critic_opt = self.optimizers()
        x, y = batch
        z = self.model.embed(x)
        pre_mask, inter_mask = y > 0.5, y < 0.5
        adversarial = bool(pre_mask.any() and inter_mask.any())

        if adversarial:
            z_pre, z_inter = z[pre_mask].detach(), z[inter_mask].detach()
            for _ in range(self.hparams.n_critic):
                loss_d, wasserstein, penalty = self.critic_loss(z_pre, z_inter)
                critic_opt.zero_grad()
                self.manual_backward(loss_d)
                critic_opt.step()
            self.log("train/critic_loss", loss_d.detach())
            self.log("train/gradient_penalty", penalty.detach())
            self.log("train/wasserstein", wasserstein.detach())

        self.toggle_optimizer(model_opt)  # critic weights frozen while the encoder uses the critic
        logits = self.model.forward_head(z)
        cls_loss = self._classifier_loss(logits, y)
        if adversarial:
            adv_loss = self.critic(z[inter_mask]).mean() - self.critic(z[pre_mask]).mean()
        else:
            adv_loss = z.new_zeros(())
        loss = cls_loss + self.hparams.adversarial_weight * adv_loss
        model_opt.zero_grad()
        self.manual_backward(loss)
        model_opt.step()
        self.untoggle_optimizer(model_opt)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/cls_loss", cls_loss.detach())
        self.log("train/adv_loss", adv_loss.detach())
        return loss.detach()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self._classifier_loss(logits, y), prog_bar=True)
        self.val_auroc(logits.sigmoid(), y.long())
        self.log("val/auroc", self.val_auroc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Labelled windows give test loss/AUROC; with (recording, time) the stream is kept for alarms."""
        x, y = batch[0], batch[1]
        probs = self(x).sigmoid()
        labelled = y >= 0
        if labelled.any():
            self.log("test/loss", F.binary_cross_entropy(probs[labelled], y[labelled]))
            self.test_auroc(probs[labelled], y[labelled].long())
            self.log("test/auroc", self.test_auroc)
        if len(batch) == 4:
            self._test_outputs.append((batch[2].cpu().numpy(), batch[3].cpu().numpy(), probs.float().cpu().numpy()))

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def on_test_epoch_end(self) -> None:
        """Continuous-monitoring metrics when the datamodule exposes its held-out recordings."""
        datamodule = getattr(self.trainer, "datamodule", None)
        recordings = getattr(datamodule, "recordings", {}).get("test") if datamodule is not None else None
        if not self._test_outputs or not recordings:
            return
        rec_idx, times, probs = (np.concatenate(parts) for parts in zip(*self._test_outputs))
        report = evaluate_recordings(
            rec_idx,
            times,
            probs,
            [r.seizures for r in recordings],
            [r.duration_s for r in recordings],
            threshold=self.hparams.alarm_threshold,
            k=self.hparams.alarm_k,
            n=self.hparams.alarm_n,
            refractory_s=self.hparams.refractory_minutes * 60.0,
            horizon_s=datamodule.horizon_s,
            postictal_s=datamodule.postictal_s,
        )
        self.log("test/sensitivity", report.sensitivity)
        self.log("test/false_detections_per_hour", report.false_detections_per_hour)
        self.log("test/mean_lead_time_min", report.mean_lead_time_s / 60.0)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Per-window preictal probability."""
        return self(batch[0]).sigmoid()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        model_opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, betas=(0.0, 0.9))
        return [model_opt, critic_opt]
