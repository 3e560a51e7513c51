"""Small models, data and trainers shared by the tests (importable from test scripts too)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_vit(num_classes: int = 4, drop: float = 0.0) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, in_chans=1, img_size=16,
        patch_size=8, embed_dim=16, depth=2, num_heads=2, drop_rate=drop, proj_drop_rate=drop, attn_drop_rate=drop,
    )


def tiny_lightning_transformer(dropout: float = 0.0) -> pl.LightningModule:
    """Lightning's own demo ``LightningTransformer`` (``forward(inputs, target)``; its head, the vocabulary projection,
    follows the penultimate features), tiny, without its WikiText-2 download (see :func:`token_data`)."""
    from lightning.pytorch.demos import LightningTransformer
    from lightning.pytorch.demos import transformer as demo

    class OfflineTransformer(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText-2; the tests bring their own tokens
            pass

    model = OfflineTransformer(vocab_size=20)
    model.model = demo.Transformer(vocab_size=20, ninp=8, nhead=2, nhid=16, nlayers=2, dropout=dropout)
    return model


def token_data(n: int = 8, t: int = 5) -> DataLoader:
    """``n`` (inputs, targets) sequences of ``t`` tokens for :func:`tiny_lightning_transformer`, batches of 4."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 20, (n, t), generator=g), torch.randint(0, 20, (n, t), generator=g)), batch_size=4)


def tiny_mlp(num_classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, num_classes))


class Block(nn.Module):
    """A residual MLP block (the unit of ``BlockNet``'s residual stream)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class BlockNet(nn.Module):
    """Tokens (B, 4, 16) through a stack of residual blocks, mean-pooled into a linear head."""

    def __init__(self, num_classes: int = 4, depth: int = 2, checkpointing: str | None = None) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.embed = nn.Linear(64, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(depth)])
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.embed(x.reshape(x.shape[0], 4, 64))
        for block in self.blocks:
            if self.checkpointing:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
            else:
                h = block(h)
        return self.head(h.mean(1))


class ToyTask(pl.LightningModule):
    """Classification of ``net``'s logits with SGD + momentum (deterministic on CPU)."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ManualToyTask(ToyTask):
    """``ToyTask`` with manual optimization: a monitor stays armed until the end of the step."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__(net, lr)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def toy_dataset(n: int = 64, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorDataset(x, y)


def toy_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(toy_dataset(n, seed=seed), batch_size=batch_size, shuffle=False)


class ToyData(pl.LightningDataModule):
    """``toy_dataset`` for training and a second draw for validation, never shuffled."""

    def __init__(self, batch_size: int = 8, n: int = 64) -> None:
        super().__init__()
        self.batch_size, self.n = batch_size, n

    def train_dataloader(self) -> DataLoader:
        return toy_loader(self.n, self.batch_size, seed=0)

    def val_dataloader(self) -> DataLoader:
        return toy_loader(32, self.batch_size, seed=1)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tempfile.mkdtemp(prefix="lightning_act_test_"),
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def forward_hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class SquaredOutputTask(pl.LightningModule):
    """Minimises the mean squared output of ``forward`` on ``batch[0]`` with SGD; a no-op validation step (the
    probing monitors read the validation batches themselves)."""

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MaskedMeanNet(SquaredOutputTask):
    """Token ids (B, L) padded with 0 → masked mean of their embeddings → ``pool`` → head (the usual NLP setup)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.pool = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x != 0).float()[..., None]
        return self.head(torch.tanh(self.pool((self.emb(x) * keep).sum(1) / keep.sum(1))))


def power_law_rows(n: int, d: int, exponent: float, shift: str, seed: int = 0) -> np.ndarray:
    """(n, d) float32-valued rows (as float64) with singular values ``i^-exponent`` (unit overall spread) plus a large
    mean: ``"common"`` adds 1e6 to every feature, ``"massive"`` 1e4 to two of them (an LLM's massive activations),
    ``"first_row"`` 1e4 to two features of the first row only (a sequence's first token, where an LLM's sit)."""
    rng = np.random.default_rng(seed)
    rank = min(n, d)
    left, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    rows = (left * np.arange(1, rank + 1) ** -exponent) @ right.T
    rows /= rows.std()
    if shift == "common":
        rows += 1e6
    elif shift == "massive":
        rows[:, [3, d // 2]] += 1e4
    else:
        rows[0, [3, d // 2]] += 1e4
    return rows.astype(np.float32).astype(np.float64)


#: A STAN small enough for a test step in milliseconds.
STAN_TINY = {
    "in_chans": 3, "window_samples": 32, "segment_samples": 8, "embed_dim": 8, "depth": 1, "num_heads": 2,
    "mlp_ratio": 2.0, "critic_hidden": 8,
}


def numpy_erank(rows: np.ndarray) -> float:
    """Effective rank (Roy & Vetterli): entropy of the normalised singular values of the centred rows."""
    s = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def numpy_eigenscore(z: np.ndarray, alpha: float) -> float:
    """EigenScore (INSIDE, Chen et al. 2024) in float64: the mean over examples of log det(Zᵀ J_d Z + αI) / K, for
    ``z`` (N, D, K), each example's K passes of a D-wide embedding, J_d centring the features."""
    scores = []
    for passes in z:
        centred = passes - passes.mean(0, keepdims=True)
        _, logdet = np.linalg.slogdet(centred.T @ centred + alpha * np.eye(passes.shape[1]))
        scores.append(logdet / passes.shape[1])
    return float(np.mean(scores))


class EvalRescaled(nn.Module):
    """Hugging Face RWKV's eval-mode rescaling in small (tests of the probes' parameter watcher): the first eval forward divides block i's weight by 2**i in
    place and notes it in a plain attribute; the first training forward after multiplies them back."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 2)
        self.layers_are_rescaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers_are_rescaled == self.training:
            with torch.no_grad():
                for i, block in enumerate(self.blocks):
                    if self.training:
                        block.weight.mul_(2**i)
                    else:
                        block.weight.div_(2**i)
            self.layers_are_rescaled = not self.training
        for i, block in enumerate(self.blocks):
            x = torch.tanh(block(x) * (2**i if self.layers_are_rescaled else 1))
        return self.head(x)


class RescalingTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = EvalRescaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StateAtBatchEnd(pl.Callback):
    """Every parameter and the rescaling flag at each training batch end, after the monitors (as a ModelCheckpoint or
    an EMA reads them)."""

    def __init__(self) -> None:
        self.states: list[tuple[dict[str, torch.Tensor], bool]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.states.append((params, pl_module.net.layers_are_rescaled))


class GAN(pl.LightningModule):
    """Two optimizers under manual optimization (``global_step`` counts 2 per batch, the monitors' step 1); the
    discriminator ``d`` runs three times per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        opt_g, opt_d = self.optimizers()
        fake = self.g(z)
        opt_g.zero_grad()
        self.manual_backward(F.softplus(-self.d(fake)).mean())
        opt_g.step()
        d_loss = F.softplus(-self.d(real)).mean() + F.softplus(self.d(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return torch.optim.SGD(self.g.parameters(), lr=0.05), torch.optim.SGD(self.d.parameters(), lr=0.05)


def gan_loader(n: int = 32) -> DataLoader:
    """``n`` (real, z) pairs for :class:`GAN`, 8 a batch."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g) + 2, torch.randn(n, 4, generator=g)), batch_size=8)


class ReluClassifier(pl.LightningModule):
    """``fc1 → act1 (ReLU) → head`` on 16 features, 4 classes, SGD: the checkpoint-compatibility tests' model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.head = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act1(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def relu_classifier_loader() -> DataLoader:
    """32 seeded examples of 16 features and 4 classes, 8 a batch, for :class:`ReluClassifier`."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
    return DataLoader(data, batch_size=8)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` of this checkout, imported as a module (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
