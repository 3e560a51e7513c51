"""Modular addition with an attention-only (or MLP) transformer: the execution-manifold task.

Xu 2026 (arXiv 2602.10496): the parameter trajectory of attention-only transformers trained on
modular addition lies in 3–4 principal directions early in training; adding MLPs breaks that
collapse. The answer is read from the logits at the ``=`` position, restricted to the ``p``
residues.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F

from lightning_act.errors import LightningActError
from lightning_act.models.small_transformer import SmallTransformer
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.classification import ClassificationTask
from lightning_act.tasks.image_classification import check_optimizer_args, check_schedule, start_schedules
from lightning_act.tasks.language_model import adamw_warmup_cosine


class ModularAddition(ClassificationTask):
    """Predict ``(a + b) mod p`` from ``[a, b, =]``; ``mlp=False`` is the attention-only model.

    Args:
        p: the modulus (vocabulary ``p + 1``, ``=`` is token ``p``).
        dim, depth, num_heads: transformer width (128 in the paper), blocks, heads.
        mlp: give the blocks MLPs (the control that breaks the collapse).
        mlp_ratio: MLP width / dim.
        lr, weight_decay, warmup_steps: AdamW, warm-up then cosine decay (grokking setups use
            strong weight decay, ~1).
    """

    batch_form = BatchForm(
        (Part("tokens (B, 3)", 2, "int"), Part("answers (B,)", 1, "int64")),
        "lightning_act.data.modular_addition.ModularAdditionDataModule",
    )

    def __init__(
        self,
        p: int = 97,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp: bool = False,
        mlp_ratio: float = 4.0,
        lr: float = 1e-3,
        weight_decay: float = 1.0,
        warmup_steps: int = 10,
    ) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 2:  # else a torchmetrics or embedding error
            raise LightningActError(f"p={p!r} must be a whole number >= 2 (the modulus); pass e.g. --model.init_args.p 97")
        check_schedule(warmup_steps, 0.0)
        check_optimizer_args(lr, weight_decay)
        self.save_hyperparameters()
        self.model = SmallTransformer(p + 1, 3, dim, depth, num_heads, mlp, mlp_ratio, "relu", causal=True)
        self.init_metrics(p)

    def setup(self, stage: str) -> None:
        """The data's modulus must be the model's: a larger one crashed the embedding mid-step, a smaller one trained
        silently on another task (its ``=`` token an ordinary number to the model)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        p = getattr(datamodule, "p", None)
        if p is not None and p != self.hparams.p:
            raise LightningActError(
                f"the data is addition mod {p} but the model's is mod {self.hparams.p}; pass --model.init_args.p {p} "
                f"(or --data.init_args.p {self.hparams.p})"
            )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[:, -1, : self.hparams.p]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        tokens, answers = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits, answers)
        self.train_acc(logits, answers)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_steps)

    def on_fit_start(self) -> None:
        start_schedules(self, self.hparams.lr)
