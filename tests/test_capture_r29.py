"""Round 29: SensitiveNeurons' EigenScore/EES passes apply the dropout nn.LSTM/GRU/RNN applies between its layers from
its own training flag (before, an LSTM forecaster whose only dropout is the LSTM's got K copies of the deterministic
pass, silently); the "registered also as" warning no longer tells a module that runs at one place (locuslab's TCN
block, which also holds its layers in ``self.net``) to split into instances; ActivationSparsity says it once per tap."""

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
from lightning_act.callbacks import ActivationSparsity, SensitiveNeurons
from lightning_act.stats.eigenscore import DEFAULT_ALPHA

PASSES = 5
SCORE = "sensitive/model.head-input/eigenscore"


class Forecaster(nn.Module):
    """Series (B, T, 3) → a 2-layer LSTM/GRU → last step → head: the RNN's dropout is its only stochastic part."""

    def __init__(self, kind: str, batch_first: bool, dropout: float, num_layers: int = 2) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(3, 8, num_layers=num_layers, batch_first=batch_first)
        self.rnn.dropout = dropout  # set after construction: torch warns at a 1-layer RNN built with dropout
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


class ForecastTask(pl.LightningModule):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.model = Forecaster(**options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the passes ran on the weights the test reads


def series(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 6, 3, generator=g), torch.randn(n, 3, generator=g)), batch_size=8)


def head_input(net: Forecaster, x: torch.Tensor) -> np.ndarray:
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0].double().numpy()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dropout, num_layers", [(0.4, 2), (0.0, 2), (0.4, 1)])
def test_eigenscore_passes_apply_the_rnns_own_dropout(
    kind: str, batch_first: bool, dropout: float, num_layers: int
) -> None:
    torch.manual_seed(0)
    task = ForecastTask(kind=kind, batch_first=batch_first, dropout=dropout, num_layers=num_layers)
    net = task.model
    forwards: list[tuple[torch.Tensor, torch.Tensor]] = []  # (RNG state, input) of each pass with the RNN training
    flags: list[set[str]] = []

    def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if not net.training and net.rnn.training:
            forwards.append((torch.get_rng_state(), args[0].clone()))
            flags.append({name for name, m in net.named_modules() if m.training})

    recording = net.register_forward_pre_hook(record)
    monitor = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, series(16, seed=0), series(8, seed=1))
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    recording.remove()  # (the rebuild below runs the RNN in training mode too)
    if not dropout or num_layers == 1:  # torch applies no dropout: the passes would be the deterministic one, not
        assert not forwards  # run (round 30: their degenerate score not logged, said once)
        assert SCORE not in monitor.history
        assert len(said) == 1 and "no active dropout" in said[0]
        return
    assert not said
    logged = monitor.history[SCORE].values
    assert len(logged) == 2
    x = next(iter(series(8, seed=1)))[0]
    deterministic = numpy_eigenscore(np.repeat(head_input(net.eval(), x)[:, :, None], PASSES, -1), DEFAULT_ALPHA)
    # before round 29: no pass with the RNN in training mode, and the deterministic value logged
    assert len(forwards) == PASSES * len(logged)
    assert all(training == {"rnn"} for training in flags)  # the RNN alone, by its own flag
    net.rnn.train()  # rebuilt by hand: the RNN's dropout is the net's only stochastic part
    embeddings = []
    for state, inputs in forwards:
        torch.set_rng_state(state)
        embeddings.append(head_input(net, inputs))
    for index, value in enumerate(logged):
        z = np.stack(embeddings[PASSES * index : PASSES * (index + 1)], axis=-1)  # (N, D, K)
        assert np.ptp(z, axis=-1).max() > 1e-2  # the passes differ
        assert value == pytest.approx(numpy_eigenscore(z, DEFAULT_ALPHA), rel=1e-4, abs=1e-4)
        assert abs(value - deterministic) > 0.5


class Chomp1d(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.size].contiguous()


class TemporalBlock(nn.Module):
    """locuslab/TCN's block: each layer registered as an attribute and again inside ``self.net``, run once."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=2)
        self.chomp1 = Chomp1d(2)
        self.relu1 = nn.ReLU()
        self.net = nn.Sequential(self.conv1, self.chomp1, self.relu1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class SeriesTask(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network, self.head = network, nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.network(x).mean(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SharedBlock(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv1d(4, 4, 1), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def alias_warnings(task: pl.LightningModule, monitor: pl.Callback) -> list[str]:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4, 10, generator=g), torch.randn(8, 1, generator=g)), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(task, data)
    return [str(w.message) for w in caught if "registered also as" in str(w.message)]


def test_the_alias_warning_of_a_module_run_at_one_place_does_not_ask_to_split_it() -> None:
    # locuslab's TCN: relu1 runs once per forward, through self.net; before, the warning said only "give each place
    # its own instance", which would leave the tapped instance unused
    torch.manual_seed(0)
    task = SeriesTask(nn.Sequential(TemporalBlock(4), TemporalBlock(4)))
    calls: list[str] = []
    for name in ("network.0.relu1", "network.1.relu1"):
        task.get_submodule(name).register_forward_hook(lambda _m, _in, _out, name=name: calls.append(name))
    said = alias_warnings(task, ActivationSparsity(every_n_steps=1))
    assert len(calls) == 2 * 2  # once per forward (two steps): one call place each
    assert len(said) == 2, said  # one per relu1 tap and fit
    for message in said:
        assert "if it runs at more than one place in the forward" in message
        assert "if it runs at one place" in message and "nothing is mixed" in message


@pytest.mark.parametrize("monitor_kind", ["modules", "cett"])
def test_activation_sparsity_says_the_alias_warning_once_per_tap_and_fit(monitor_kind: str) -> None:
    # before: ActivationSparsity selected its zero-count (and CETT) taps again in setup, warning a second time
    torch.manual_seed(0)
    act = nn.ReLU()
    task = SeriesTask(nn.Sequential(SharedBlock(act), SharedBlock(act)))
    if monitor_kind == "modules":
        monitor = ActivationSparsity(every_n_steps=1, modules=["network.*.act"])
        expected = {"network.0.act"}  # a glob matching both names: one tap, one module
    else:
        shared = nn.Linear(4, 4)
        task.mix = nn.ModuleList([shared, shared])  # a Linear registered twice, tapped by CETT at its input
        monitor = ActivationSparsity(every_n_steps=1, modules=["network.0.act"], cett_modules=["mix.0"])
        expected = {"network.0.act", "mix.0-input"}
        forward = task.forward
        task.forward = lambda x: forward(x) + 0 * task.mix[0](x.transpose(1, 2)).sum()
    said = alias_warnings(task, monitor)
    tapped = sorted(message.split(": ", 1)[1].split(" is one module")[0] for message in said)
    assert tapped == sorted(expected), said
