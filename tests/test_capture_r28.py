"""Round 28: which item of a tuple output the capture reads (and SeND's drop zeroes), scalar and empty activations.

A module returning ``(aux_loss, hidden)`` (an MoE or auxiliary-loss layer; a Hugging Face model with
``return_dict=False``) had its 0-d loss read as the activation: ``count = 1``, ``mean = aux_loss``, silently. A tap that
ran and gave only empty activations (an expert no row was routed to) was said not to have run."""

import warnings
from collections import namedtuple

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import (
    ActivationSparsity,
    ActivationStats,
    DimensionalCollapse,
    MassiveActivations,
    SensitiveNeurons,
)
from lightning_act.callbacks.sensitive import FeatureDrop
from lightning_act.capture import first_tensor


class AuxLossLayer(nn.Module):
    """An MoE-style layer: ``(aux_loss, hidden)``, the scalar first."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return h.pow(2).mean() * 0.01, h


class AuxLossModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.moe = AuxLossLayer()
        self.head = nn.Linear(6, 2)
        self.seen = []  # (aux, hidden) of the training forwards, float64

    def forward(self, x):
        aux, h = self.moe(x)
        return self.head(h).pow(2).mean() + aux

    def training_step(self, batch, batch_idx):
        aux, h = self.moe(batch[0])
        self.seen.append((aux.item(), h.detach().double().numpy().copy()))
        return self.head(h).pow(2).mean() + aux

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the step-0 forward is the one recorded


def batches(n=8, tokens=5, seed=0):
    return DataLoader(TensorDataset(torch.randn(n, tokens, 4, generator=torch.Generator().manual_seed(seed))),
                      batch_size=4)


def values(monitor, key):
    return monitor.history[key].values


def said_about(caught, monitor, tap):
    return [str(w.message) for w in caught if str(w.message).startswith(f"{type(monitor).__name__}: {tap} ")]


def test_a_tuple_whose_first_item_is_an_aux_loss_is_read_by_its_hidden_state():
    # Before: count 1 and mean = the aux loss (ActivationStats, ActivationSparsity), silently; massive and collapse
    # said "outputs a 0-d tensor".
    pl.seed_everything(0)
    model = AuxLossModel()
    stats = ActivationStats(modules=["moe"], every_n_steps=1)
    sparsity = ActivationSparsity(modules=["moe"], every_n_steps=1)
    massive = MassiveActivations(modules=["moe"], every_n_steps=1)
    collapse = DimensionalCollapse(modules=["moe"], every_n_steps=1, param_patterns=[])
    monitors = [stats, sparsity, massive, collapse]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=monitors).fit(model, batches())
    aux, h = model.seen[0]
    assert h.shape == (4, 5, 6) and aux != pytest.approx(h.mean())
    assert values(stats, "act/moe/count")[0] == h.size
    assert values(stats, "act/moe/mean")[0] == pytest.approx(h.mean(), rel=1e-6)
    assert values(stats, "act/moe/std")[0] == pytest.approx(h.std(), rel=1e-6)
    assert values(stats, "act/moe/zero_frac")[0] == pytest.approx((h == 0).mean(), abs=1e-12)
    assert values(sparsity, "sparsity/moe/zero_frac")[0] == pytest.approx((h == 0).mean(), abs=1e-12)
    assert values(massive, "massive/moe/top1")[0] == pytest.approx(np.abs(h).max(), rel=1e-6)
    assert values(collapse, "collapse/moe/erank")[0] == pytest.approx(numpy_erank(h.reshape(-1, 6)), rel=1e-6)
    # the hidden state is a ReLU's output: its samples' median is 0, so only MassiveActivations' ratio is unknown
    # (round 30; logged as inf before)
    said = [m for monitor in monitors for m in said_about(caught, monitor, "moe")]
    assert len(said) == 1 and said[0].startswith("MassiveActivations: moe ratio is unknown")


def test_sends_drop_zeroes_the_hidden_state_of_an_aux_loss_tuple_not_the_loss():
    module = nn.Identity().train()
    aux, hidden = torch.tensor(0.5), torch.ones(2, 3, 4)
    output = (aux, hidden)
    zeroed = FeatureDrop(torch.tensor([1, 3])).after(module, (), output)
    assert type(zeroed) is tuple and zeroed[0] is aux  # before: the drop zeroed (indexed) the scalar loss
    assert zeroed[1][..., [1, 3]].eq(0).all() and zeroed[1][..., [0, 2]].eq(1).all()
    assert first_tensor(output) is hidden  # the item the capture reads is the one zeroed
    # an input tap of a module called with (temperature, x): the argument the capture reads
    x = torch.ones(2, 4)
    args, _ = FeatureDrop(torch.tensor([0])).before(module, (torch.tensor(2.0), x), {})
    assert first_tensor((torch.tensor(2.0), x)) is x
    assert args[0].item() == 2.0 and args[1][:, 0].eq(0).all() and args[1][:, 1:].eq(1).all()


class ScalarTap(pl.LightningModule):
    """A tapped module that gives a bare 0-d tensor (a penalty) in the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.penalty = Penalty()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return self.head(h).pow(2).mean() + self.penalty(h)

    def training_step(self, batch, batch_idx):
        return self(batch[0])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Penalty(nn.Module):
    def forward(self, h):
        return h.pow(2).mean() * 0.01


def test_a_bare_scalar_activation_is_refused_by_every_monitor_with_one_line():
    # Before: ActivationStats and ActivationSparsity logged count 1 and the scalar as a mean, silently.
    pl.seed_everything(0)
    monitors = [ActivationStats(modules=["penalty"], every_n_steps=1),
                ActivationSparsity(modules=["penalty"], every_n_steps=1),
                MassiveActivations(modules=["penalty"], every_n_steps=1),
                DimensionalCollapse(modules=["penalty"], every_n_steps=1, param_patterns=[]),
                SensitiveNeurons(modules=["penalty"], every_n_steps=1, num_samples=8, eigenscore_passes=0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, limit_val_batches=2, callbacks=monitors).fit(
            ScalarTap(), batches(tokens=1), batches(tokens=1, seed=1))
    for monitor in monitors:
        assert not any("penalty" in key for key in monitor.history), type(monitor).__name__
        said = said_about(caught, monitor, "penalty")
        assert len(said) == 1 and "0-d activation" in said[0] and "no sample axis" in said[0], said


class Routed(pl.LightningModule):
    """Two experts: ``none`` gets no row at any call (a (0, 6) activation), ``some`` gets every row in the first
    call and none in the second."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.none = nn.ReLU()
        self.some = nn.ReLU()
        self.head = nn.Linear(6, 2)
        self.seen = []

    def forward(self, x):
        h = self.lin(x)
        routed_nowhere = h[h[..., 0] > 1e9]
        out = self.none(routed_nowhere).sum() + self.some(h).sum() + self.some(routed_nowhere).sum()
        return self.head(h).pow(2).mean() + 0 * out

    def training_step(self, batch, batch_idx):
        self.seen.append(torch.relu(self.lin(batch[0])).detach().double().numpy())
        return self(batch[0])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_tap_giving_only_empty_activations_is_said_to_and_empty_calls_beside_rows_are_not():
    # Before: "its module did not run in the observed forwards, or what it gives is not a floating-point tensor".
    pl.seed_everything(0)
    stats = ActivationStats(modules=["none", "some"], every_n_steps=1)
    sensitive = SensitiveNeurons(modules=["none", "some"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    model = Routed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, limit_val_batches=2, callbacks=[stats, sensitive]).fit(
            model, batches(), batches(seed=1))
    for monitor in (stats, sensitive):
        said = said_about(caught, monitor, "none")
        assert len(said) == 1 and "gave only empty activations" in said[0] and "(0, 6)" in said[0], said
        assert "did not run" not in said[0] and "not a floating-point tensor" not in said[0]
        assert not said_about(caught, monitor, "some")
    h = model.seen[0]
    assert values(stats, "act/some/count")[0] == h.size
    assert values(stats, "act/some/mean")[0] == pytest.approx(h.mean(), rel=1e-6)
    assert not any("act/none/" in key for key in stats.history)


# ------------------------------------------------------------------------------------------------ guards
def test_the_items_read_of_other_outputs_are_as_before():
    class FakeModelOutput(dict):
        def to_tuple(self):
            return tuple(self.values())

    h, other = torch.ones(2, 3), torch.zeros(2, 3)
    loss = torch.tensor(1.5)
    assert first_tensor(FakeModelOutput(loss=loss, logits=h, hidden=other)) is h
    assert first_tensor((h, other)) is h and first_tensor([h, loss]) is h and first_tensor(h) is h
    Pair = namedtuple("Pair", ["hidden", "gate"])
    assert first_tensor(Pair(h, loss)) is h
    assert first_tensor(((h, other),)) is h  # a module called with (x, mask) as one argument
    packed = nn.utils.rnn.pack_padded_sequence(torch.ones(2, 3, 4), [3, 3], batch_first=True)
    assert first_tensor((packed, torch.ones(1, 2, 4))) is None  # a PackedSequence output is not read (nor h_n)
    assert first_tensor((loss,)) is loss  # a scalar alone: read, and refused by the capture as a 0-d activation
    assert first_tensor({"hidden": h}) is None and first_tensor((h.long(), h)) is None
