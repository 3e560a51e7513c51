"""Round 30 (lead): a DQN target network, a copy of the Q-network that no optimizer holds but that keeps
``requires_grad=True`` (Lightning's own DQN example, CleanRL), was taken for the trained network by ``@penultimate``:
DimensionalCollapse measured the target's head input and SensitiveNeurons logged nothing. Monitors whose
``@penultimate`` only the optimizers can tell now choose their taps at fit start, when the optimizers exist."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse, SensitiveNeurons
from lightning_act.capture.selection import copies_only_optimizers_tell


def q_network() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


class DQN(pl.LightningModule):
    """A Q-network trained against a target network moved by Polyak updates, in no optimizer."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.net = q_network()
        if target == "deepcopy":
            self.target = copy.deepcopy(self.net)
        else:  # Lightning's reinforce_learn_Qnet.py: a second instance loaded from the net
            self.target = q_network()
            self.target.load_state_dict(self.net.state_dict())
        self.states = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        s, s2 = torch.randn(8, 4, generator=self.states), torch.randn(8, 4, generator=self.states)
        with torch.no_grad():
            y = 1.0 + 0.9 * self.target(s2).max(1).values
        return ((self.net(s).max(1).values - y) ** 2).mean()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for p, tp in zip(self.net.parameters(), self.target.parameters()):
                tp.mul_(0.9).add_(p, alpha=0.1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


@pytest.mark.parametrize("target", ["deepcopy", "second instance"])
def test_penultimate_of_a_dqn_is_the_q_networks_head_not_the_targets(target: str) -> None:
    torch.manual_seed(0)
    task = DQN(target)
    head_inputs: list[np.ndarray] = []
    task.net[4].register_forward_pre_hook(
        lambda _m, args: head_inputs.append(args[0].detach().double().numpy()) if task.training else None)
    collapse = DimensionalCollapse(every_n_steps=1)
    sensitive = SensitiveNeurons(every_n_steps=1, tracking_inputs=torch.randn(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=3, callbacks=[collapse, sensitive]).fit(
            task, DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=1))
    assert [tap.name for tap in collapse.taps] == [tap.name for tap in sensitive.taps] == ["net.4-input"]
    assert list(collapse.param_names) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert "sensitive/net.4-input/count" in sensitive.history
    logged = collapse.history["collapse/net.4-input/erank"].values
    assert logged == pytest.approx([numpy_erank(rows) for rows in head_inputs], rel=1e-6)


def test_only_copies_outside_a_stack_that_all_require_grad_wait_for_the_optimizers() -> None:
    twins = nn.Module()
    twins.net, twins.target = q_network(), q_network()
    assert copies_only_optimizers_tell(twins)
    twins.target.requires_grad_(False)  # a frozen copy: requires_grad tells at setup
    assert not copies_only_optimizers_tell(twins)
    stack = nn.Module()
    stack.blocks = nn.ModuleList(q_network() for _ in range(3))  # blocks of one stack are no copies
    stack.head = nn.Linear(2, 2)
    assert not copies_only_optimizers_tell(stack)
