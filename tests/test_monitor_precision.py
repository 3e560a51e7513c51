"""Monitors under a training step's autocast: their statistics keep the activations' own precision.

Lightning's mixed precision runs the forward, and so the forward hooks, under ``torch.autocast``; before round 19
the monitors' own matmuls (CETT's ``a @ W.T`` and norms, the wide-tap sketch projection) ran in float16 there."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse
from lightning_act.stats.sparsity import cett_grid


class LinearHead(pl.LightningModule):
    """``Identity → Linear``: the identity's output (the linear's input) is what the monitors read."""

    def __init__(self, width: int, out: int, scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Identity(), nn.Linear(width, out, bias=False))
        with torch.no_grad():
            self.net[1].weight.copy_(scale * torch.randn(out, width) / math.sqrt(width))
        self.seen: list[np.ndarray] = []
        self.net[0].register_forward_hook(lambda m, a, o: self.seen.append(o.detach().double().numpy().copy()))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]).float(), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_fp16_autocast(model: pl.LightningModule, callback: pl.Callback, x: torch.Tensor) -> None:
    """One step under Lightning's float16 autocast on the CPU (``precision="16-mixed"`` on a GPU)."""
    y = torch.zeros(len(x), dtype=torch.long)
    pl.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", plugins=[MixedPrecision("16-mixed", device="cpu")],
               ).fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))


def cett_ratio_numpy(a: np.ndarray, w: np.ndarray, grid: np.ndarray, target: float) -> float:
    """CETT (Zhang et al. 2024): per token ||(a ⊙ [|a|·||W_:,i|| < eps]) W^T|| / ||a W^T||, averaged; the fraction of
    entries at or above the eps where it reaches the target, linear between the grid's neighbours."""
    contribution = np.abs(a) * np.linalg.norm(w, axis=0)
    norm = np.linalg.norm(a @ w.T, axis=1)
    cett = np.array([(np.linalg.norm((a * (contribution < eps)) @ w.T, axis=1) / norm).mean() for eps in grid])
    ratio = np.array([(contribution >= eps).mean() for eps in grid])
    upper = int(np.argmax(cett >= target))
    t = (target - cett[upper - 1]) / (cett[upper] - cett[upper - 1])
    return float(ratio[upper - 1] + t * (ratio[upper] - ratio[upper - 1]))


def test_cett_under_float16_autocast_counts_tokens_whose_output_norm_float16_cannot_hold() -> None:
    # Before: 16-mixed logged 0.258 for numpy's 0.162: the tokens whose output norm passed 65504 were dropped.
    torch.manual_seed(0)
    tokens, width = 64, 512
    a = nn.functional.gelu(torch.randn(tokens, width) * 2)
    a[tokens // 2:] = (torch.relu(torch.randn(tokens // 2, width) - 1.0) * 30000.0).clamp_max(60000.0)
    a = a.half().float()  # every entry a float16 model can hold
    model = LinearHead(width, 256, 0.6)
    monitor = ActivationSparsity(modules=[], cett_modules="net.1", every_n_steps=1)
    fit_fp16_autocast(model, monitor, a)
    w = model.net[1].weight.detach().double().numpy()
    assert np.linalg.norm(model.seen[0] @ w.T, axis=1).max() > 65504  # norms float16 cannot hold
    expected = cett_ratio_numpy(model.seen[0], w, cett_grid(model.net[1].weight, 64).double().numpy(), monitor.target_cett)
    logged = monitor.history["sparsity/net.1-input/cett_ratio"].values
    assert logged == [np.float64(logged[0])] and abs(logged[0] - expected) < 1e-3, (logged, expected)


def test_wide_tap_sketch_under_float16_autocast_measures_a_massive_feature() -> None:
    # Before: the sketch projection of a 2304-wide tap (past wide_dim) ran as a float16 matmul, overflowed on a
    # feature of 3e4, and erank was not logged ("gave too little to measure").
    torch.manual_seed(0)
    rows, width = 32, 2304
    x = torch.randn(rows, width)
    x[:, 7] += 3e4 * (1 + 0.1 * torch.randn(rows))
    x = x.half().float()
    model = LinearHead(width, 4, 1e-3)
    monitor = DimensionalCollapse(modules=["net.0"], every_n_steps=1, param_patterns=[])
    fit_fp16_autocast(model, monitor, x)
    a = model.seen[0]
    centred = a - a.mean(0)
    eigenvalues = np.linalg.eigvalsh(centred @ centred.T)
    singular = np.sqrt(np.where(eigenvalues > 4 * np.finfo(float).eps * (a * a).sum(), eigenvalues, 0.0))
    p = singular[singular > 0] / singular.sum()
    expected = math.exp(-(p * np.log(p)).sum())  # effective rank (Roy & Vetterli 2007) of the centred rows
    logged = monitor.history["collapse/net.0/erank"].values
    assert len(logged) == 1 and abs(logged[0] - expected) < 1e-3 * expected, (logged, expected)
