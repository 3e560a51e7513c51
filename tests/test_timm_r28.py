"""Round 28: monitors with timm's utilities. A subclass of timm's ModelEmaV3 is an averaged copy (left out of the presets
and of DimensionalCollapse's default trajectory), and SensitiveNeurons' EigenScore/EES passes apply the attention
dropout of timm's fused attention (before, its ``attn_drop`` never ran and the K passes were the deterministic one)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_eigenscore, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse, SensitiveNeurons
from lightning_act.capture.selection import averaged_copy_modules, select_taps
from lightning_act.stats.eigenscore import DEFAULT_ALPHA

timm = pytest.importorskip("timm")
from timm.utils import ModelEmaV3  # noqa: E402


class ModelEma(ModelEmaV3):
    """A thin subclass, as public training code writes it: a legacy ``.ema`` alias."""

    @property
    def ema(self) -> nn.Module:
        return self.module


def tiny_timm_vit(**drops: float) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8, embed_dim=24, depth=2,
        num_heads=2, **drops,
    )


def images(n: int, seed: int, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class VitTask(pl.LightningModule):
    def __init__(self, lr: float = 3e-2, ema: type[nn.Module] | None = None, **drops: float) -> None:
        super().__init__()
        self.model = tiny_timm_vit(**drops)
        self.ema = ema(self.model, decay=0.5) if ema is not None else None
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def on_train_batch_end(self, *args: Any) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------- averaged copies along the MRO


def test_a_subclass_of_timm_and_ema_pytorch_emas_is_an_averaged_copy_left_out_of_the_presets() -> None:
    torch.manual_seed(0)
    task = VitTask(ema=ModelEma)
    ema_modules = {id(m) for m in task.ema.modules()}
    assert averaged_copy_modules(task) == ema_modules  # before round 28: empty, the exact class name was not matched
    for preset in ("@blocks", "@penultimate"):
        names = [tap.name for tap in select_taps(task, [preset])]
        assert names and not any(name.startswith("ema.") for name in names), (preset, names)

    base = type("EMA", (nn.Module,), {"__module__": "ema_pytorch.ema_pytorch"})  # ema-pytorch's, by name and package
    subclass = type("TeacherEMA", (base,), {})  # defined outside ema_pytorch
    holder = nn.Module()
    holder.net, holder.teacher = nn.Linear(2, 2), subclass()
    holder.teacher.copy = nn.Linear(2, 2)
    assert averaged_copy_modules(holder) == {id(holder.teacher), id(holder.teacher.copy)}


class BlockWeights(pl.Callback):
    """The live model's block weights (>= 2 dims) at fit start and after each step."""

    def __init__(self) -> None:
        self.snapshots: list[np.ndarray] = []

    def take(self, pl_module: nn.Module) -> None:
        self.snapshots.append(np.concatenate([
            p.detach().double().numpy().ravel() for n, p in pl_module.named_parameters()
            if n.startswith("model.blocks.") and p.ndim >= 2
        ]))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.take(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.take(pl_module)


def numpy_r90(snapshots: list[np.ndarray], fraction: float) -> int:
    w = np.stack(snapshots) - snapshots[0]
    w = w - w.mean(0)
    eigenvalues = np.clip(np.linalg.eigvalsh(w @ w.T)[::-1], 0, None)
    return int(np.argmax(np.cumsum(eigenvalues) / eigenvalues.sum() >= fraction)) + 1


def test_the_default_trajectory_leaves_out_a_subclassed_timm_ema_and_r90_is_that_of_the_live_weights() -> None:
    torch.manual_seed(0)
    weights = BlockWeights()
    monitor = DimensionalCollapse(every_n_steps=1, projection_dim=None, variance_fraction=0.99, modules=[])
    trainer = quiet_trainer(max_steps=8, log_every_n_steps=1, callbacks=[weights, monitor])
    trainer.fit(VitTask(ema=ModelEma), images(64, seed=0))
    assert monitor.param_names and not any(name.startswith("ema.") for name in monitor.param_names)
    logged = monitor.history["collapse/params/r90"].values
    assert logged == [numpy_r90(weights.snapshots[: k + 2], 0.99) for k in range(len(logged))]


# ---------------------------------------------------------------- EigenScore passes through timm's fused attention


class PassInputs(pl.Callback):
    """The RNG state and input of each forward of the ViT with its attention in training mode and the rest in eval
    mode: SensitiveNeurons' stochastic passes, after this round."""

    def __init__(self) -> None:
        self.forwards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vit = pl_module.model

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not vit.training and vit.blocks[0].attn.training:
                self.forwards.append((torch.get_rng_state(), args[0].clone()))

        vit.register_forward_pre_hook(record)


def test_eigenscore_passes_apply_timm_fused_attention_dropout_as_the_unfused_path_does() -> None:
    torch.manual_seed(0)
    passes = PassInputs()
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=8, batch_size=8, eigenscore_passes=6)
    task = VitTask(lr=0.0, attn_drop_rate=0.3)
    assert all(block.attn.fused_attn for block in task.model.blocks)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, callbacks=[passes, monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, images(16, seed=0), images(16, seed=1))
    assert not [w for w in caught if "did not run" in str(w.message) or "none of the model's dropout" in str(w.message)]
    logged = monitor.history["sensitive/model.head-input/eigenscore"].values
    assert logged and len(passes.forwards) == 6 * len(logged)  # before round 28: no forward with attention training

    vit = task.model.eval()  # lr = 0: the weights the passes ran on
    for block in vit.blocks:
        block.attn.fused_attn = False  # the unfused path runs attn_drop as a module
        block.attn.attn_drop.train()
    embeddings = []
    with torch.no_grad():
        for state, x in passes.forwards:
            torch.set_rng_state(state)
            embeddings.append(vit.forward_head(vit.forward_features(x), pre_logits=True).double().numpy())
    for index, value in enumerate(logged):
        z = np.stack(embeddings[6 * index : 6 * index + 6], axis=-1)  # (N, D, K)
        assert np.ptp(z, axis=-1).max() > 1e-2  # the passes differ
        assert value == pytest.approx(numpy_eigenscore(z, DEFAULT_ALPHA), rel=1e-4, abs=1e-4)


class FunctionalDropout(nn.Module):
    """A layer whose ``attn_drop`` child's dropout is applied inside a fused attention from the layer's own training
    flag, ``dropout_p=self.attn_drop.p if self.training else 0.0`` (not timm's family: no ``fused_attn``); no
    dropout call the passes could switch on (round 30 applies ``F.dropout(..., training=self.training)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 16)
        self.attn_drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.linear(x.flatten(1))).unsqueeze(1)  # one token: the attention weight 1, or dropped
        return F.scaled_dot_product_attention(h, h, h, dropout_p=self.attn_drop.p if self.training else 0.0).squeeze(1)


class FusedDropoutNet(nn.Module):
    """That layer, then an optional dropout module that runs and the head."""

    def __init__(self, other_dropout: float) -> None:
        super().__init__()
        self.inner = FunctionalDropout()
        self.drop = nn.Dropout(other_dropout)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.inner(x)))


class FusedDropoutTask(VitTask):
    def __init__(self, other_dropout: float) -> None:
        pl.LightningModule.__init__(self)
        self.model, self.ema, self.lr = FusedDropoutNet(other_dropout), None, 0.0


@pytest.mark.parametrize("other_dropout", [0.0, 0.5])
def test_a_dropout_that_never_runs_in_the_passes_is_said_and_no_eigenscore_without_any(other_dropout: float) -> None:
    torch.manual_seed(0)
    monitor = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FusedDropoutTask(other_dropout), images(16, seed=0), images(16, seed=1))
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    not_run = [m for m in said if "did not run in the EigenScore/EES stochastic passes" in m]
    none_ran = [m for m in said if "none of the model's dropout modules" in m]
    scores = monitor.history.get("sensitive/model.head-input/eigenscore")
    assert len(not_run) == 1 and "model.inner.attn_drop" in not_run[0] and "model.drop" not in not_run[0]
    if other_dropout:  # model.drop ran: the passes differ, EigenScore is logged without attn_drop's part
        assert not none_ran and scores is not None and len(scores.values) >= 2
    else:  # no stochastic module ran: no value that reads like a measurement, said once
        assert len(none_ran) == 1 and scores is None
        assert "sensitive/model.head-input/ees" not in monitor.history
        assert "sensitive/model.head-input/count" in monitor.history  # the rest goes on
