"""Round 23: the dropout read-through with one dropout serving two views, recurrent layers' feature axis, and the
warning about undeclared layouts in sequence-first models. Values are checked against numpy on activations the
tests record with their own plain hooks."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import ActivationStats, DimensionalCollapse, MassiveActivations, SensitiveNeurons


class TrainingOutputs(Callback):
    """The outputs of one module in the training forwards, per step, recorded by a plain hook (float64 copies)."""

    def __init__(self, module_name, first_item=False):
        self.module_name, self.first_item = module_name, first_item
        self.seen: dict[int, list[np.ndarray]] = {}
        self.step = None

    def on_fit_start(self, trainer, pl_module):
        def keep(module, args, output):
            if self.step is not None and pl_module.training:
                output = output[0] if self.first_item else output
                self.seen.setdefault(self.step, []).append(output.detach().double().numpy().copy())

        dict(pl_module.named_modules())[self.module_name].register_forward_hook(keep)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, *args):
        self.step = None


def values(monitor, key):
    return monitor.history[key].values


# ------------------------------------------------------------------------------ one dropout, two views
class TwoViews(pl.LightningModule):
    """A Siamese step: both views go through one dropout before the head reads either (SimCLR, R-Drop)."""

    def __init__(self, inplace):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.GELU())  # GELU keeps its input: an in-place dropout may follow
        self.drop = nn.Dropout(0.5, inplace=inplace)
        self.head = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h1, h2 = self.drop(self.enc(x)), self.drop(self.enc(x + 1))
        a, b = self.head(h1), self.head(h2)
        return (a - b).pow(2).mean() + a.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("inplace", [False, True])
def test_one_dropout_serving_two_views_is_read_through_for_each_view(inplace):
    # Before: one remembered dropout call per tap, so the second view's call replaced the first's and the head's
    # first call read view 1 after the dropout (half its entries zero: zero_frac 0.25 instead of 0).
    pl.seed_everything(0)
    stats = ActivationStats(modules=["head:input"], every_n_steps=1)
    before = TrainingOutputs("enc")  # what enters the dropout, both views
    data = DataLoader(TensorDataset(torch.randn(16, 8, generator=torch.Generator().manual_seed(1))), batch_size=8)
    quiet_trainer(max_steps=2, callbacks=[stats, before]).fit(TwoViews(inplace), data)
    for index, step in enumerate(stats.history["act/head-input/mean"].steps):
        views = before.seen[step]
        assert len(views) == 2
        rows = np.concatenate(views)
        assert values(stats, "act/head-input/zero_frac")[index] == pytest.approx((rows == 0).mean(), abs=1e-12)
        assert values(stats, "act/head-input/mean")[index] == pytest.approx(rows.mean(), rel=1e-6)


# ------------------------------------------------------------------------------ recurrent layers
STEPS = 8  # sequence length equal to the width of the Linear registered before the recurrent layer


class RecurrentNet(pl.LightningModule):
    """embed Linear(4, 8) -> recurrent layer -> head, on sequences of 8 steps (lr 0: the weights stay)."""

    def __init__(self, kind, batch_first, **options):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(4, 8)
        self.rnn = getattr(nn, kind)(8, 16, batch_first=batch_first, **options)
        self.head = nn.Linear(self.width, 2)

    @property
    def width(self):
        rnn = self.rnn
        return (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)

    def forward(self, x):  # x: (B, T, 4)
        e = self.embed(x)
        out = self.rnn(e if self.batch_first else e.transpose(0, 1))[0]
        return self.head(out.mean(1 if self.batch_first else 0))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_dropout_calls_whose_outputs_the_tap_never_reads_are_not_held_through_the_step():
    """Before (this round's first per-call fix): every call of the dropouts beside ``linear2`` (an encoder layer's
    residual ``dropout1``/``dropout2``, whose outputs ``linear2`` never reads) was held with its input until the
    monitors disarmed: 4 entries per call of a weight-tied layer, 48 for 12 calls (the old code held one per tap)."""
    from lightning_act.capture.registry import capture_registry

    held = []

    class Looped(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
            self.head = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            x = batch[0]
            for _ in range(6):  # weight-tied: the same layer, 6 calls a forward
                x = self.layer(x)
            held.append(sum(len(calls) for calls in capture_registry(self).before_dropout.values()))
            return F.cross_entropy(self.head(x.mean(1)), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 5, 8), torch.randint(0, 2, (8,)))
    trainer = quiet_trainer(max_steps=2, callbacks=[ActivationStats(modules="@activations", every_n_steps=1)])
    trainer.fit(Looped(), DataLoader(data, batch_size=4))
    assert held == [0, 0]


def sequences(n=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, STEPS, 4, generator=g) * 3, torch.randint(0, 2, (n,), generator=g)),
                      batch_size=n)


@pytest.mark.parametrize(
    "kind, batch_first, options",
    [("LSTM", True, {}), ("LSTM", False, {}), ("GRU", True, {}), ("GRU", False, {}), ("RNN", True, {}),
     ("LSTM", True, {"proj_size": 6, "bidirectional": True})],
)
def test_recurrent_outputs_are_read_with_their_features_last(kind, batch_first, options):
    # Before: nn.RNNBase had no width, so the tap took the embed Linear's (8), found it on the time axis of the
    # (B, T=8, H) output and read the time steps as features: an 8x8 time covariance, massive (token, feature)
    # swapped, SensitiveNeurons' neurons the time steps.
    pl.seed_everything(0)
    model = RecurrentNet(kind, batch_first, **options)
    collapse = DimensionalCollapse(modules=["rnn"], every_n_steps=1, param_patterns=[])
    massive = MassiveActivations(modules=["rnn"], every_n_steps=1)
    sensitive = SensitiveNeurons(modules=["rnn"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    recorder = TrainingOutputs("rnn", first_item=True)
    quiet_trainer(max_steps=1, callbacks=[collapse, massive, sensitive, recorder]).fit(model, sequences(), sequences())
    (h,) = recorder.seen[0]
    h = h if batch_first else h.transpose(1, 0, 2)  # the test knows its layout: (B, T, H)
    assert h.shape == (8, STEPS, model.width)
    assert values(collapse, "collapse/rnn/erank")[0] == pytest.approx(numpy_erank(h.reshape(-1, h.shape[-1])), rel=1e-6)
    token, feature = np.unravel_index(np.abs(h).max(0).argmax(), h.shape[1:])
    assert (values(massive, "massive/rnn/top0_token")[0], values(massive, "massive/rnn/top0_feature")[0]) == (
        token, feature)
    assert sensitive.embeddings["rnn"][-1].shape == (8, model.width)


class UnrolledCell(pl.LightningModule):
    """A GRUCell unrolled over 8 steps, its stacked states (B, T, 16) through a Tanh registered after the cell."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cell = nn.GRUCell(8, 16)
        self.act = nn.Tanh()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        e, h, states = self.embed(x), torch.zeros(x.shape[0], 16), []
        for t in range(x.shape[1]):
            h = self.cell(e[:, t], h)
            states.append(h)
        return self.head(self.act(torch.stack(states, 1)).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_an_activation_after_a_recurrent_cell_takes_the_cells_width():
    # Before: the cell had no width, so the Tanh took the embed Linear's (8) and read the time axis as features.
    pl.seed_everything(0)
    collapse = DimensionalCollapse(modules=["act"], every_n_steps=1, param_patterns=[])
    recorder = TrainingOutputs("act")
    quiet_trainer(max_steps=1, callbacks=[collapse, recorder]).fit(UnrolledCell(), sequences())
    (h,) = recorder.seen[0]
    assert h.shape == (8, STEPS, 16)
    assert values(collapse, "collapse/act/erank")[0] == pytest.approx(numpy_erank(h.reshape(-1, 16)), rel=1e-6)


# ------------------------------------------------------------------------------ undeclared layouts
class SequenceFirstGRU(RecurrentNet):
    """A sequence-first GRU whose head reads h_n[-1]: the head's input and the Tanh before it are 2-D (B, H); the
    embed Linear and the Tanh on it run on (B, T, D) outside any module that declares a layout."""

    def __init__(self):
        super().__init__("GRU", batch_first=False)
        self.squash = nn.Tanh()
        self.act = nn.Tanh()

    def forward(self, x):
        e = self.squash(self.embed(x))
        return self.head(self.act(self.rnn(e.transpose(0, 1))[1][-1]))


def sequence_first_warnings(monitor):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(SequenceFirstGRU(), sequences())
    return [str(w.message) for w in caught if "sequence-first" in str(w.message)]


def test_undeclared_2d_taps_of_a_sequence_first_model_do_not_warn():
    # Before: the warning was given at setup for every undeclared tap, the 2-D (B, D) ones too, which are read the
    # same in either order: a sequence-first LSTM's '@penultimate' always warned.
    assert sequence_first_warnings(DimensionalCollapse(modules=["head:input", "act"], every_n_steps=1,
                                                       param_patterns=[])) == []


def test_an_undeclared_tap_of_3_axes_warns_once_naming_it_and_its_shape():
    messages = sequence_first_warnings(
        MassiveActivations(modules=["head:input", "embed", "squash"], every_n_steps=1))
    assert len(messages) == 1  # once for the monitor, not once per tap or per step
    assert "the layout of embed's (8, 8, 8) activations is not declared" in messages[0]
    assert "head-input" not in messages[0] and "batch_dim=1 and token_dim=0" in messages[0]
