"""Round 24: a model whose eval forward swaps EMA weights in and back by rebinding ``.data``
(``p.data, ema = ema, p.data``, which moves no version counter) keeps its probe forwards whole, so the monitors leave
training as it is: the final weights equal, bit for bit, those of the same fit without the monitor."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import quiet_trainer
from lightning_act.callbacks import MassiveActivations, SensitiveNeurons


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


class EMASwapNet(nn.Module):
    """Two blocks, a norm and a head; in eval mode (once ``swapping``) the blocks run on EMA weights, swapped in and
    back by rebinding ``.data`` around the forward, as many EMA helpers do."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        self.ema = [p.detach().clone() + 0.1 for p in self.blocks.parameters()]
        self.swapping = True

    def swap(self) -> None:
        for k, p in enumerate(self.blocks.parameters()):
            p.data, self.ema[k] = self.ema[k], p.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.swapping:
            return self.head(self.norm(self.blocks(x)))
        self.swap()
        out = self.head(self.norm(self.blocks(x)))
        self.swap()
        return out


class Task(pl.LightningModule):
    """SGD on cross-entropy; swapping in eval forwards from step ``swap_from`` on."""

    def __init__(self, swap_from: int = 0, update_ema: bool = False) -> None:
        super().__init__()
        self.net = EMASwapNet()
        self.net.swapping = swap_from == 0
        self.swap_from, self.update_ema = swap_from, update_ema

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.net.swapping = self.global_step >= self.swap_from
        if self.update_ema:  # in place, as MoCo/DINO-style EMAs update
            with torch.no_grad():
                for average, weight in zip(self.net.ema, self.net.blocks.parameters()):
                    average.mul_(0.9).add_(weight, alpha=0.1)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(callback: pl.Callback | None, swap_from: int = 0, update_ema: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The blocks' final weights after 5 steps, and the warnings said."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 16, generator=generator), torch.randint(0, 3, (48,), generator=generator))
    torch.manual_seed(0)
    task = Task(swap_from, update_ema)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=5, limit_val_batches=1, callbacks=[callback] if callback else []).fit(
            task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )
    weights = torch.cat([p.detach().flatten() for p in task.net.blocks.parameters()])
    return weights, [str(w.message) for w in said if "rebinds their .data" in str(w.message)]


@pytest.fixture(scope="module")
def unmonitored() -> torch.Tensor:
    return _fit(None)[0]


@pytest.mark.parametrize(
    "make_monitor",
    [
        lambda: MassiveActivations(modules=["@blocks"], every_n_steps=1, probe="val"),
        lambda: SensitiveNeurons(modules=["net.blocks.0"], every_n_steps=1, num_samples=16),
    ],
    ids=["massive_probe_val", "sensitive"],
)
def test_an_ema_swap_by_data_rebinding_keeps_probe_forwards_whole_and_training_unchanged(make_monitor, unmonitored):
    """Before: the first (whole) probe forward looked clean (no version moved, the same tensors at its end), later
    forwards ended after the last tapped block, the swap back never ran, and training went on from the EMA weights
    (max |dw| 0.149 with MassiveActivations(probe="val"), 0.119 with SensitiveNeurons after 5 steps), unsaid."""
    weights, said = _fit(make_monitor())
    assert torch.equal(weights, unmonitored)
    assert len(said) == 1 and "probe forwards run whole" in said[0]


def test_a_swap_that_begins_after_the_first_probe_pass_gets_the_parameters_back(unmonitored):
    """The first probe pass (step 0) runs a model that does not swap yet; from step 2 its eval forward swaps, and the
    ended forward leaves the EMA tensors bound: they are put back (the same storage as before the forward), the cutoff
    turns off, said once. The model's own EMA copy is lost (it now holds the training weights), which the line says;
    training is that of the fit without the monitor."""
    weights, said = _fit(MassiveActivations(modules=["@blocks"], every_n_steps=1, probe="val"), swap_from=2)
    assert torch.equal(weights, unmonitored)
    assert len(said) == 1 and "parameters were put back" in said[0] and "stop_after_taps=False" in said[0]


def test_parameters_put_back_do_not_share_storage_with_the_ema_the_forward_swapped_them_into():
    """R6: the tensor put back was the one the forward had swapped into the model's EMA list, so every in-place EMA
    update from then on wrote the training weights (7.7e-3 off after 5 steps)."""
    weights, said = _fit(MassiveActivations(modules=["@blocks"], every_n_steps=1, probe="val"), swap_from=2,
                         update_ema=True)
    assert torch.equal(weights, _fit(None, update_ema=True)[0])
    assert len(said) == 1 and "parameters were put back" in said[0]


class LazyTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(16), nn.GELU(), nn.LazyLinear(16), nn.GELU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_probe_before_lazy_parameters_are_made_runs_and_keeps_its_cutoff():
    """R6: the first probe pass (at step 0, before any forward made the lazy parameters) asked an uninitialised
    parameter for its storage, and the fit died with a ValueError traceback."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    monitor = MassiveActivations(modules=["net.1"], every_n_steps=1, probe="val")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, limit_val_batches=2, callbacks=[monitor]).fit(
            LazyTask(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    # step 0 is not measured: its probe ran on stand-ins for the unmade weights (round 27)
    assert list(monitor.history["massive/net.1/top1"].steps) == [1, 2]
    assert not [w for w in said if "rebinds their .data" in str(w.message)]
