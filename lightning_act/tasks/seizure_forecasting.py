"""Domain-adversarial seizure forecasting with STAN (Li et al. 2025, arXiv 2511.01275).

The paper trains STAN with a classifier loss plus an adversarial term from a discriminator on
the learned preictal and interictal representations, stabilised with a gradient penalty, but
does not publish the objective.  A min-max in which the critic tells *preictal from interictal*
can only be cooperative (the encoder helps the critic: a second classifier) or destructive (the
encoder hides the classes from the critic and so from its own head).  The form used here is the
one in which the two players oppose each other and the classifier is not undermined: a
class-conditional, domain-adversarial WGAN-GP (WDGRL, Shen et al. 2018; gradient penalty,
Gulrajani et al. 2017) — the critic inspects the preictal and the interictal representation
distributions separately and tries to tell each *subject's* distribution from the others';
the encoder learns representations in which it cannot, i.e. patient-invariant preictal and
interictal features.  Justification and caveats: docs/stan.md.

* ``z = STAN.embed(x)`` (fixed scale: LayerNorm without affine parameters); each training window
  carries its class ``y`` and its subject (domain) index ``d``.
* For every class ``c`` and every subject ``k`` present in the batch with class ``c`` alongside
  another subject: ``W_kc = E[D_k(z) | d = k, y = c] - E[D_k(z) | d != k, y = c]``, with one
  critic output ``D_k`` per subject (``n_domains`` outputs), bounded by ``tanh`` to (-1, 1).
  ``W`` = mean of the ``W_kc`` (a one-vs-rest Wasserstein-1 estimate when ``D_k`` is 1-Lipschitz).
* Critic maximises ``W - λ GP`` on detached embeddings, with the penalty at ``ẑ = ε z_k + (1-ε) z_rest``
  over ``gp_pairs`` random pairs per ``(k, c)`` group.
* Encoder + head minimise ``BCE(logit, y) + β W`` with the freshly updated, frozen critic.  Since
  ``|D| < 1``, ``|β W| < 2β``: the adversarial term cannot swamp the classification loss.
* ``n_critic`` critic updates, then one encoder/head update per batch (manual optimisation, two
  optimisers).  ``adversarial_weight = 0`` trains the plain classifier (no critic work: the
  ablation).  Batches whose windows all come from one subject, or that carry no subject index
  (``(x, y)`` batches; warned once), skip the adversarial parts.
"""

from __future__ import annotations

import math
import numbers

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_act.errors import LightningActError
from lightning_act.eval.ranking import NaNLogitCount, ranking_scores, warn_nan_rank_metrics
from lightning_act.eval.seizure_alarms import (
    AlarmReport,
    combine_reports,
    evaluate_alarms,
    evaluate_recordings,
    raise_alarms,
)
from lightning_act.models.stan import STAN
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.classification import mean_loss_metric, refuse_several_loaders
from lightning_act.tasks.image_classification import check_non_negative, check_optimizer_args, check_probability
from lightning_act.tasks.sampler_padding import real_examples


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    epsilon: torch.Tensor | None = None,
    output_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||∇_x̂ D(x̂)||_2 - 1)^2]`` at ``x̂ = ε real + (1-ε) fake`` (Gulrajani et al. 2017).

    ``real`` and ``fake`` are paired row by row; ``epsilon`` (one per row) defaults to U(0, 1).
    With a multi-output critic, ``output_index`` names the output whose gradient row ``i`` is
    penalised.  The graph is kept (``create_graph=True``) so the penalty reaches ``critic``.
    """
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    mixed = (epsilon * real + (1.0 - epsilon) * fake).requires_grad_(True)
    scores = critic(mixed)
    scores = scores.flatten() if output_index is None else scores.gather(1, output_index[:, None])
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


class DomainCritic(nn.Module):
    """MLP critic with one ``tanh``-bounded output per subject.

    No normalisation layers (they would couple samples and break the per-sample penalty); the
    bound keeps the adversarial term on the scale of the classification loss.
    """

    def __init__(self, embed_dim: int, hidden: int, n_domains: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, n_domains),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, n_domains)`` scores in (-1, 1)."""
        return torch.tanh(self.net(z))


def domain_groups(y: torch.Tensor, domain: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(k, in_k, rest)`` masks for each class and each subject ``k`` that has a rival in that class."""
    groups = []
    for label in (0.0, 1.0):
        in_class = y == label
        for k in torch.unique(domain[in_class]).tolist():
            in_k, rest = in_class & (domain == k), in_class & (domain != k)
            if rest.any():
                groups.append((int(k), in_k, rest))
    return groups


def domain_gap(scores: torch.Tensor, groups: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over groups of ``E[D_k | in_k] - E[D_k | rest]`` (the one-vs-rest Wasserstein estimate)."""
    return torch.stack([scores[in_k, k].mean() - scores[rest, k].mean() for k, in_k, rest in groups]).mean()


def _whole_stream(outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(recording, window end, probability)`` of every test window, gathered from every rank: a rank's
    ``DistributedSampler`` share is every other window, on which the k-of-n alarm rule would run thinned out. The
    sampler's padding is left out by ``test_step``; windows several ranks scored (a test loader every rank reads
    whole, without a distributed sampler) are kept once."""
    parts = [tuple(np.concatenate(column) for column in zip(*outputs))] if outputs else []
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered: list[list] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, parts)
        parts = [part for rank_parts in gathered for part in rank_parts]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.float32)
    rec_idx, times, probs = (np.concatenate(column) for column in zip(*parts))
    _, first = np.unique(np.stack([rec_idx.astype(np.float64), times]), axis=1, return_index=True)
    return rec_idx[first], times[first], probs[first]


def _scored_span_report(
    rec_idx: np.ndarray,
    times: np.ndarray,
    probs: np.ndarray,
    recordings: list,
    index: np.ndarray,
    window_samples: int,
    alarm_rule: dict,
    horizon_s: float,
    postictal_s: float,
) -> AlarmReport | None:
    """Alarm metrics of a partial test stream (``limit_test_batches``, ``fast_dev_run``), over what was scored.

    Each recording with scored windows is evaluated on its scored span only: from the start of its first scored window
    (0 if that is its first window) to the end of its last (its duration if that is its last window); its seizures with
    an onset in the span are counted, the others act as nearby seizures (alarms before or after them are ignored,
    their horizon and recovery are not interictal). Recordings without a scored window are left out. Warns once with
    the counts; returns ``None`` (and warns) when a recording's scored windows are not one run of its windows, on
    which the k-of-n rule would run over a gap."""
    reports, partial = [], 0
    for r, rec in enumerate(recordings):
        mine = rec_idx == r
        if not mine.any():
            continue
        order = np.argsort(times[mine], kind="stable")
        ends, p = times[mine][order], probs[mine][order]
        expected = np.sort((index[index[:, 0] == r, 1] + window_samples) / rec.sampling_rate)
        first = int(np.searchsorted(expected, ends[0] - 1e-6))
        run = expected[first : first + len(ends)]
        if len(run) != len(ends) or not np.allclose(run, ends, rtol=0.0, atol=1e-6):
            rank_zero_warn(
                f"SeizureForecaster: the test stream of recording {r} ('{rec.name}') was scored with gaps "
                f"({len(ends)} of its {len(expected)} windows, not one run): test/sensitivity, "
                "test/false_detections_per_hour and test/mean_lead_time_min need consecutive windows and are not logged"
            )
            return None
        start = 0.0 if first == 0 else float(ends[0]) - window_samples / rec.sampling_rate
        stop = rec.duration_s if first + len(ends) == len(expected) else float(ends[-1])
        partial += int(first > 0 or first + len(ends) < len(expected))
        own = [(s, e) for s, e in rec.seizures if start <= s <= stop]
        others = [(s, e) for s, e in rec.seizures if not start <= s <= stop] + list(rec.nearby_seizures)
        alarms = raise_alarms(ends, p, **alarm_rule)
        reports.append(
            evaluate_alarms(
                alarms, [s for s, _ in own], stop - start, [e for _, e in own], horizon_s, postictal_s, start_s=start,
                nearby_s=others,
            )
        )
    report = combine_reports(reports)
    rank_zero_warn(
        f"SeizureForecaster: the test stream is incomplete ({len(rec_idx)} of {len(index)} windows scored, e.g. "
        f"limit_test_batches or fast_dev_run): test/sensitivity, test/false_detections_per_hour and "
        f"test/mean_lead_time_min cover the scored span of {len(reports)} of {len(recordings)} recordings only "
        f"({partial} of them in part; {report.n_seizures} seizure(s), {report.interictal_hours:.3g} interictal hours), "
        "not the whole test split"
    )
    return report


def check_alarm_rule(threshold: float, k: int, n: int, refractory_minutes: float) -> None:
    """One line at construction for an alarm rule that cannot work: a threshold outside [0, 1] (or NaN) makes no window
    positive (sensitivity 0 without a word), and ``k > n`` was refused only by :func:`raise_alarms` after the fit."""
    check_probability("alarm_threshold", threshold)
    for name, value in (("alarm_k", k), ("alarm_n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise LightningActError(f"{name}={value!r} must be a whole number >= 1; pass e.g. --model.init_args.{name} 3")
    if k > n:
        raise LightningActError(
            f"alarm_k={k} exceeds alarm_n={n}: the alarm needs k positive windows of the last n; pass alarm_k <= alarm_n"
        )
    check_non_negative("refractory_minutes", refractory_minutes, "--model.init_args.refractory_minutes 15")


class _ClassCounts(torchmetrics.Metric):
    """Labelled windows per class ``(interictal, preictal)``, summed over ranks: whether an AUROC is defined."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        self.counts += torch.bincount(target.long().flatten(), minlength=2)[:2]

    def compute(self) -> torch.Tensor:
        return self.counts


class SeizureForecaster(pl.LightningModule):
    """STAN classifier with a class-conditional domain critic on its embeddings (module doc)."""

    batch_form = BatchForm(
        (Part("windows (B, C, T)", 3, "float"), Part("labels (B,)", 1, "float")),
        "lightning_act.data.eeg.EEGSeizureDataModule",
        extra=2,
        extra_text=" optionally followed by subjects (B,) or by recordings (B,) and times (B,)",
    )

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
        n_domains: int = 32,
        adversarial_weight: float = 0.1,
        gp_lambda: float = 10.0,
        gp_pairs: int = 16,
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
        if adversarial_weight < 0:
            raise LightningActError(
                f"adversarial_weight={adversarial_weight} is negative, which would make the encoder help the critic; "
                "pass 0 (no adversarial term) or a positive weight"
            )
        if adversarial_weight > 0 and gp_pairs < 1:  # a penalty over no pairs is NaN: a critic loss of NaN every step
            raise LightningActError(f"gp_pairs={gp_pairs} must be at least 1 with the adversarial term on; pass e.g. 16")
        if pos_weight is not None and not (math.isfinite(pos_weight) and pos_weight > 0):
            raise LightningActError(
                f"pos_weight={pos_weight!r} must be a positive number (or null); pass e.g. --model.init_args.pos_weight 5"
            )
        check_optimizer_args(lr, weight_decay)
        check_optimizer_args(critic_lr, 0.0, lr_name="critic_lr")
        check_alarm_rule(alarm_threshold, alarm_k, alarm_n, refractory_minutes)
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
        self.critic = DomainCritic(embed_dim, critic_hidden, n_domains)
        self.val_auroc = torchmetrics.classification.BinaryAUROC()
        self.test_auroc = torchmetrics.classification.BinaryAUROC()
        self.val_classes, self.test_classes = _ClassCounts(), _ClassCounts()  # AUROC only where both classes were seen
        self.val_nan_logits, self.test_nan_logits = NaNLogitCount(), NaNLogitCount()  # AUROC undefined if > 0
        self._warned_auroc: set[str] = set()
        self._warned_nan_logits: set[str] = set()  # stages already warned to log a NaN AUROC for NaN logits
        self._said_no_labelled_test = False  # that test/loss and test/auroc are not logged without labelled windows
        # weighted by labelled windows, summed over ranks
        self.val_loss, self.test_loss = mean_loss_metric(), mean_loss_metric()
        self._test_outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._warned_no_domain = False
        self._adversarial_batches = 0  # this epoch's batches whose critic groups formed
        self._warned_no_groups = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preictal logit per window."""
        return self.model(x)

    def setup(self, stage: str) -> None:
        """Under DDP, let it find the parameters a backward does not reach: each training step runs the critic's
        backward (encoder untouched) and the encoder's (critic frozen), which plain DDP refuses at the first step
        ("parameters that were not used in producing the loss"); the same as ``ddp_find_unused_parameters_true``."""
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if stage == "fit" and isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters"):
            ddp_kwargs["find_unused_parameters"] = True

    def _classifier_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.hparams.pos_weight is None else logits.new_tensor(self.hparams.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    def critic_loss(
        self, z: torch.Tensor, groups: list[tuple[int, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(-W + λ GP, W, GP)`` on detached embeddings ``z``; ``gp_pairs`` random pairs per group."""
        wasserstein = domain_gap(self.critic(z), groups)
        m = self.hparams.gp_pairs
        real, fake, index = [], [], []
        for k, in_k, rest in groups:
            z_k, z_rest = z[in_k], z[rest]
            real.append(z_k[torch.randint(len(z_k), (m,), device=z.device)])
            fake.append(z_rest[torch.randint(len(z_rest), (m,), device=z.device)])
            index.append(torch.full((m,), k, device=z.device, dtype=torch.long))
        penalty = gradient_penalty(self.critic, torch.cat(real), torch.cat(fake), output_index=torch.cat(index))
        return -wasserstein + self.hparams.gp_lambda * penalty, wasserstein, penalty

    def _groups(self, batch: tuple[torch.Tensor, ...], y: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Critic groups of this batch; empty when the adversarial term is off or cannot be formed."""
        if self.hparams.adversarial_weight == 0:
            return []
        if len(batch) < 3:
            if not self._warned_no_domain:
                rank_zero_warn(
                    "SeizureForecaster: training batches carry no subject index (x, y), so the adversarial term is off; "
                    "yield (x, y, domain) as EEGSeizureDataModule does, or set adversarial_weight 0 to silence this"
                )
                self._warned_no_domain = True
            return []
        domain = batch[2].long()
        if domain.numel() and int(domain.max()) >= self.hparams.n_domains:
            raise LightningActError(
                f"subject index {int(domain.max())} but the critic has n_domains={self.hparams.n_domains} outputs; "
                f"pass --model.init_args.n_domains {int(domain.max()) + 1} or more"
            )
        return domain_groups(y, domain)

    def on_train_epoch_start(self) -> None:
        self._adversarial_batches = 0

    def on_train_epoch_end(self) -> None:
        # batches of one subject (or of one class per subject) form no critic group: with a single training subject
        # the adversarial term never ran, which nothing else says
        if (self.hparams.adversarial_weight > 0 and not self._warned_no_domain and not self._warned_no_groups
                and self._adversarial_batches == 0):
            self._warned_no_groups = True
            rank_zero_warn(
                "SeizureForecaster: no training batch of this epoch held windows of one class from two subjects, so "
                "the adversarial term never ran (one subject in the training data, or batches too small); train on "
                "several subjects, or set adversarial_weight 0 for the classifier alone"
            )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        model_opt, critic_opt = self.optimizers()
        x, y = batch[0], batch[1]
        z = self.model.embed(x)
        groups = self._groups(batch, y)

        if groups:
            self._adversarial_batches += 1
            z_detached = z.detach()
            for _ in range(self.hparams.n_critic):
                loss_d, wasserstein, penalty = self.critic_loss(z_detached, groups)
                critic_opt.zero_grad()
                self.manual_backward(loss_d)
                critic_opt.step()
            self.log("train/critic_loss", loss_d.detach())
            self.log("train/gradient_penalty", penalty.detach())
            self.log("train/wasserstein", wasserstein.detach())

        self.toggle_optimizer(model_opt)  # critic weights frozen while the encoder uses the critic
        cls_loss = self._classifier_loss(self.model.forward_head(z), y)
        adv_loss = domain_gap(self.critic(z), groups) if groups else z.new_zeros(())
        loss = cls_loss + self.hparams.adversarial_weight * adv_loss
        model_opt.zero_grad()
        self.manual_backward(loss)
        model_opt.step()
        self.untoggle_optimizer(model_opt)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/cls_loss", cls_loss.detach())
        self.log("train/adv_loss", adv_loss.detach())
        return loss.detach()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and AUROC over the batch's windows but the DDP sampler's padding (see ``real_examples``)."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, "val")
        real = real_examples(self._trainer, "val", batch_idx, len(batch[1]), batch[1].device, dataloader_idx=dataloader_idx)
        logits, y = self(batch[0])[real], batch[1][real]
        if len(y):  # a batch of padding alone has no loss
            self.val_loss.update(self._classifier_loss(logits, y), weight=len(y))
        self.log("val/loss", self.val_loss, prog_bar=True)
        if self._trainer is not None and self.trainer.sanity_checking:
            return  # Lightning's few sanity batches (often one class only) would make torchmetrics warn; discarded anyway
        # update, not forward: a per-batch AUROC would be computed (and warned about) for batches of one class
        self.val_auroc.update(ranking_scores(logits), y.long())  # a sigmoid ties confident windows (see ranking_scores)
        self.val_classes.update(y)
        self.val_nan_logits.update(logits)

    def on_validation_start(self) -> None:
        refuse_several_loaders(self.trainer, "val", "SeizureForecaster")

    def on_validation_epoch_start(self) -> None:
        self.val_auroc.reset()
        self.val_classes.reset()
        self.val_nan_logits.reset()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_auroc("val", self.val_auroc, self.val_classes, self.val_nan_logits, prog_bar=True)

    def _log_auroc(
        self, stage: str, auroc: torchmetrics.Metric, classes: _ClassCounts, nan_logits: NaNLogitCount,
        prog_bar: bool = False,
    ) -> list[int]:
        """``<stage>/auroc`` when the epoch's labelled windows (all ranks) hold both classes; else NaN and one warning
        (torchmetrics would return 0.0 and warn "No positive samples in targets"). NaN too, with one warning, when a
        labelled window's logit is NaN: an order of NaN scores is the data's, not the model's. Nothing without a
        labelled window. Returns the labelled windows per class ``(interictal, preictal)`` over all ranks.

        Every branch logs a tensor with the same arguments: Lightning keeps a key's logging arguments across the runs
        of a loop and refuses another kind of value later (a metric object one epoch, a float NaN the next crashed a
        fit that diverged, before round 24). The counts are summed over the ranks, so every rank takes the same branch
        and runs the same syncs (``compute``); the value is the same on every rank, which ``max`` keeps exactly."""
        if classes.update_count == 0:  # no batch on this rank: an empty update, so compute() does not warn
            classes.update(torch.zeros(0, device=classes.counts.device))
        counts = classes.compute().tolist()
        nan_count = nan_logits.epoch_total()
        value = torch.tensor(math.nan, device=self.device)
        if nan_count > 0:
            if stage not in self._warned_nan_logits:
                self._warned_nan_logits.add(stage)
                warn_nan_rank_metrics("SeizureForecaster", stage, nan_count, f"{stage}/auroc")
        elif min(counts) > 0:
            value = auroc.compute()
        elif stage not in self._warned_auroc and sum(counts) > 0:
            missing = "preictal" if counts[1] == 0 else "interictal"
            rank_zero_warn(
                f"SeizureForecaster: the {stage} windows hold {counts[1]} preictal and {counts[0]} interictal labelled "
                f"windows (no {missing} one): {stage}/auroc is undefined and logged as NaN"
            )
            self._warned_auroc.add(stage)
        auroc.reset()
        if sum(counts) > 0:
            self.log(f"{stage}/auroc", value, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")
        return counts

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Labelled windows give test loss/AUROC; with (recording, time) the stream is kept for alarms. The DDP
        sampler's padding is left out of both (see ``real_examples``)."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, "test")
        real = real_examples(self._trainer, "test", batch_idx, len(batch[1]), batch[1].device, dataloader_idx=dataloader_idx)
        logits = self(batch[0])[real]
        batch = tuple(part[real] for part in batch)
        y = batch[1]
        probs = logits.float().sigmoid()  # the alarms' probabilities, in float32 (bf16 rounds them to 1/256)
        labelled = y >= 0
        if labelled.any():
            # the objective val/loss reports (pos_weight included), averaged over labelled windows, not whole batches;
            # a float weight: torchmetrics < 1.6.2 could not take an int64 one with a NaN loss
            labelled_count = labelled.sum(dtype=torch.float32)
            self.test_loss.update(self._classifier_loss(logits[labelled], y[labelled]), weight=labelled_count)
        # updated on every batch, labelled windows or none (empty tensors): under DDP a rank whose share holds no
        # labelled window must still run the epoch-end syncs of the other ranks (test/loss: on_test_epoch_end)
        self.test_auroc.update(ranking_scores(logits[labelled]), y[labelled].long())
        self.test_classes.update(y[labelled])
        self.test_nan_logits.update(logits[labelled])
        if len(batch) == 4:
            self._test_outputs.append((batch[2].cpu().numpy(), batch[3].cpu().numpy(), probs.float().cpu().numpy()))

    def on_test_start(self) -> None:
        refuse_several_loaders(self.trainer, "test", "SeizureForecaster")

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []
        self.test_auroc.reset()
        self.test_classes.reset()
        self.test_nan_logits.reset()

    def on_test_epoch_end(self) -> None:
        """Window AUROC when both classes were seen; continuous-monitoring metrics when the datamodule exposes its
        held-out recordings."""
        counts = self._log_auroc("test", self.test_auroc, self.test_classes, self.test_nan_logits)
        self._log_test_loss(labelled=sum(counts))
        datamodule = getattr(self.trainer, "datamodule", None)
        recordings = getattr(datamodule, "recordings", {}).get("test") if datamodule is not None else None
        if not recordings:
            return
        rec_idx, times, probs = _whole_stream(self._test_outputs)
        if not len(rec_idx):
            return
        alarm_rule = {
            "threshold": self.hparams.alarm_threshold,
            "k": self.hparams.alarm_k,
            "n": self.hparams.alarm_n,
            "refractory_s": self.hparams.refractory_minutes * 60.0,
        }
        dataset = getattr(datamodule, "test_set", None)
        index, window = getattr(dataset, "index", None), getattr(dataset, "window_samples", None)
        complete = index is None or window is None or len(rec_idx) >= len(index)  # (or no index to tell)
        if complete or int(rec_idx.max()) >= len(recordings):  # the whole stream; or unknown recordings: one-line error
            report = evaluate_recordings(
                rec_idx,
                times,
                probs,
                [r.seizures for r in recordings],
                [r.duration_s for r in recordings],
                **alarm_rule,
                horizon_s=datamodule.horizon_s,
                postictal_s=datamodule.postictal_s,
                nearby_seizures=[r.nearby_seizures for r in recordings],
            )
        else:
            report = _scored_span_report(
                rec_idx, times, probs, recordings, np.asarray(index), window, alarm_rule, datamodule.horizon_s,
                datamodule.postictal_s,
            )
            if report is None:
                return
        # the same on every rank (the gathered stream): sync_dist averages equal values, and Lightning does not warn
        self.log("test/sensitivity", report.sensitivity, sync_dist=True)
        self.log("test/false_detections_per_hour", report.false_detections_per_hour, sync_dist=True)
        self.log("test/mean_lead_time_min", report.mean_lead_time_s / 60.0, sync_dist=True)

    def _log_test_loss(self, labelled: int) -> None:
        """``test/loss`` over the ``labelled`` windows of all ranks; with none, neither it nor ``test/auroc`` is logged
        (a NaN would read like a diverged model), said once. Logged here, not per batch: the branch is the same on
        every rank, so every rank runs the loss's sync, also one whose share held no labelled window (it gets an empty
        update, so torchmetrics does not warn of a compute before any update)."""
        if labelled == 0:
            if not self._said_no_labelled_test:
                self._said_no_labelled_test = True
                rank_zero_warn(
                    "SeizureForecaster: no test window is labelled (all are ictal, post-ictal or straddle a boundary, "
                    "y = -1), so test/loss and test/auroc are not logged; test on windows with labels 0/1 for them"
                )
            return
        if self.test_loss.update_count == 0:
            self.test_loss.update(torch.zeros(0, device=self.device), weight=torch.zeros(0, device=self.device))
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log("test/loss", loss, sync_dist=True, reduce_fx="max")  # the same on every rank: max keeps it exactly

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Per-window preictal probability."""
        self.batch_form.check(batch, batch_idx, type(self).__name__, "predict")
        return self(batch[0]).float().sigmoid()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        model_opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, betas=(0.0, 0.9))
        return [model_opt, critic_opt]
