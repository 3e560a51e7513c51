"""Round 30: input taps survive torch's quantization module swap (``prepare_qat`` mid-fit, ``convert`` of a copy), which
copies their pre-hooks without ``with_kwargs``; a list of per-image or per-level tensors is no activation (said once,
nothing logged), not its first item; a Demucs block ending ``Conv1d(h, 2h, 1), GLU(dim=1)`` and a 1-D conv block that
joins its channels are read along their channels; conv taps of a model holding a sequence-first LSTM get no
"pass batch_dim=1" advice; a forward with a target network's weights bound by ``torch.func.functional_call`` is left
out, fast weights that take gradients are not."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations


def fit(
    task: pl.LightningModule, callbacks: list[Any], data: DataLoader, val: DataLoader | None = None, **options: Any
) -> list[str]:
    """Fit ``task``; the warnings said."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=callbacks, **options).fit(task, data, val)
    return [str(w.message) for w in caught]


def classes(n: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8)


class QatTask(pl.LightningModule):
    """QuantStub → Linear → ReLU → Linear → DeQuantStub; keeps what ``net.3`` receives at each training step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(tq.QuantStub(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), tq.DeQuantStub())
        self.head_inputs: list[np.ndarray] = []
        self.int8_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hidden = self.net[2](self.net[1](self.net[0](batch[0])))
        self.head_inputs.append(hidden.detach().double().numpy())
        return F.cross_entropy(self.net[4](self.net[3](hidden)), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # the usual int8 accuracy check: convert a copy (its pre-hooks are copied without their kwargs flag)
        int8 = tq.convert(copy.deepcopy(self.net).eval())
        self.int8_losses.append(float(F.cross_entropy(int8(batch[0]), batch[1])))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StartQat(pl.Callback):
    """Float warm-up for one epoch, then quantization-aware training on the same module (``prepare_qat`` in place)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.net.qconfig = tq.get_default_qat_qconfig("fbgemm")
            tq.prepare_qat(pl_module.net, inplace=True)


def test_an_input_tap_is_read_after_prepare_qat_swaps_its_module_mid_fit() -> None:
    torch.manual_seed(0)
    task = QatTask()
    sparsity = ActivationSparsity(modules=["net.3:input"], every_n_steps=1)
    fit(task, [StartQat(), sparsity], classes(), max_epochs=2)
    logged = sparsity.history["sparsity/net.3-input/zero_frac"].values
    expected = [float((h == 0).mean()) for h in task.head_inputs]
    assert len(task.head_inputs) == 4 and list(logged) == pytest.approx(expected, abs=1e-12)


def test_converting_a_copy_in_validation_keeps_the_fit_and_its_int8_loss() -> None:
    losses = {}
    for monitored in (False, True):
        torch.manual_seed(0)
        task = QatTask()
        monitors = [ActivationSparsity(modules=["net.3:input"], every_n_steps=1)] if monitored else []
        fit(task, [StartQat(), *monitors], classes(), val=classes(8, seed=1), max_epochs=2, limit_val_batches=1)
        losses[monitored] = task.int8_losses
    assert len(losses[True]) == 2 and losses[True] == losses[False]


class PerImageRows(nn.Module):
    """A detector's RoI stage: one block of rows per image, as a list (or, as torchvision's RPN head, a tuple of two
    such lists)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> Any:
        rows = list(self.fc(x).split([3, 5]))
        return (rows, [r * 2 for r in rows]) if self.as_tuple else rows


class RowsTask(pl.LightningModule):
    def __init__(self, rows: nn.Module) -> None:
        super().__init__()
        self.rows = rows

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.rows(batch[0])
        items = out[0] if isinstance(out, tuple) else out
        return sum(item.square().mean() for item in items)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_list_of_per_image_tensors_is_said_once_and_not_logged(as_tuple: bool) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    massive = MassiveActivations(modules=["rows"], every_n_steps=1)
    said = fit(RowsTask(PerImageRows(as_tuple)), [massive], DataLoader(TensorDataset(x), batch_size=8), max_steps=2)
    assert not [key for key in massive.history if key.startswith("massive/rows/")]
    lists = [line for line in said if "rows gives a list of tensors" in line]
    assert len(lists) == 1 and "tap a module that gives one of them" in lists[0]


class MaskedBlock(nn.Module):
    """Returns ``(x, mask)``: a tuple with a side item, read by its activation as before."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x[:, 0] > 0


def test_a_tuple_with_a_mask_is_still_read_by_its_activation() -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    task = RowsTask(MaskedBlock())
    massive = MassiveActivations(modules=["rows"], every_n_steps=1)
    said = fit(task, [massive], DataLoader(TensorDataset(x), batch_size=8), max_steps=1)
    with torch.no_grad():
        expected = float(task.rows.fc(x).double().abs().max())
    assert massive.history["massive/rows/top1"].values[0] == pytest.approx(expected, rel=1e-6)
    assert not [line for line in said if "list of tensors" in line]


class GluEncoder(nn.Module):
    """Demucs' encoder: ``Conv1d → ReLU → Conv1d(h, 2h, 1) → GLU(dim=1)`` blocks, then a sequence-first BiLSTM."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv1d(1, hidden, 4, 2), nn.ReLU(), nn.Conv1d(hidden, 2 * hidden, 1), nn.GLU(dim=1))
        self.lstm = nn.LSTM(hidden, hidden, batch_first=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        h = self.enc(wave)  # (B, h, L)
        return self.out(self.lstm(h.permute(2, 0, 1))[0]).mean()


class DenseBlock1d(nn.Module):
    """A DenseNet-style 1-D block: its input and a convolution's output joined along the channels, (B, 2C, L)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class DenseNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.enc = DenseBlock1d(4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.enc(self.stem(wave)).mean()


class WaveTask(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[np.ndarray] = []
        net.enc.register_forward_hook(lambda _m, _a, out: self.seen.append(out.detach().double().numpy()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("net, length", [(GluEncoder, 38), (GluEncoder, 34), (DenseNet1d, 19)])
def test_a_conv_block_whose_channels_are_no_layer_width_is_read_along_its_channels(net: Any, length: int) -> None:
    """Encoder at L = 18 time steps and at L == 2h = 16 (the last convolution's width on the time axis); the dense
    block's 8 channels are none of its layers' 4."""
    torch.manual_seed(0)
    task = WaveTask(net())
    collapse = DimensionalCollapse(modules=["net.enc"], every_n_steps=1, param_patterns=[])
    wave = torch.randn(4, 1, length, generator=torch.Generator().manual_seed(1))
    fit(task, [collapse], DataLoader(TensorDataset(wave), batch_size=4), max_steps=1)
    seen = task.seen[0]
    assert seen.shape[2] not in (seen.shape[1] // 2, seen.shape[1])  # the time axis is no width the block writes
    rows = seen.transpose(0, 2, 1).reshape(-1, seen.shape[1])  # (B·L, channels)
    assert collapse.history["collapse/net.enc/erank"].values[0] == pytest.approx(numpy_erank(rows), rel=1e-5)


def test_conv_taps_get_no_sequence_first_advice_where_the_model_holds_a_sequence_first_lstm() -> None:
    torch.manual_seed(0)
    task = WaveTask(GluEncoder())
    wave = torch.randn(4, 1, 38, generator=torch.Generator().manual_seed(1))
    monitors = [MassiveActivations(modules=["net.enc", "net.enc.0", "net.out"], every_n_steps=1)]
    said = fit(task, monitors, DataLoader(TensorDataset(wave), batch_size=4), max_steps=1)
    advice = [line for line in said if "batch_dim=1 and token_dim=0" in line]
    # net.out's (T, B, 1) output, after the sequence-first LSTM, is the one whose layout nothing declares
    assert len(advice) == 1 and "net.out's" in advice[0]


class QNet(pl.LightningModule):
    """A DQN step whose second forward runs the same module through ``functional_call`` (torchrl's pattern) with a
    target's weights, with MAML-style fast weights that take gradients, or with its own weights detached. Keeps
    ``net.3``'s outputs of the module's own forward and of the functional one."""

    def __init__(self, bound: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        self.bound = bound
        self.own: list[np.ndarray] = []
        self.functional: list[np.ndarray] = []
        self.kept = self.own
        self.net[3].register_forward_hook(lambda _m, _a, out: self.kept.append(out.detach().double().numpy()))

    def weights(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        own = dict(self.net.named_parameters())
        if self.bound == "target":  # a lagged copy (here perturbed, to tell the two apart)
            return {k: v.detach() + 0.5 * torch.randn(v.shape, generator=g) for k, v in own.items()}
        if self.bound == "fast":  # an inner step: weights that take gradients, a training forward
            return {k: p - 0.1 * p.detach().sign() for k, p in own.items()}
        return {k: p.detach() for k, p in own.items()}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        s, s2 = batch[0][:, :4], batch[0][:, 4:]
        self.kept = self.functional
        with torch.set_grad_enabled(self.bound == "fast"):
            other = functional_call(self.net, self.weights(), (s2,)).max(1).values.mean()
        self.kept = self.own
        return (self.net(s).max(1).values - other).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


@pytest.mark.parametrize("bound", ["target", "fast", "detached"])
def test_a_forward_with_a_targets_weights_bound_in_is_left_out_the_models_own_are_not(bound: str) -> None:
    torch.manual_seed(0)
    task = QNet(bound)
    sparsity = ActivationSparsity(modules=["net.3"], every_n_steps=1)
    states = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    said = fit(task, [sparsity], DataLoader(TensorDataset(states), batch_size=8), max_steps=2)
    logged = list(sparsity.history["sparsity/net.3/zero_frac"].values)
    counted = [o if bound == "target" else np.concatenate([f, o]) for o, f in zip(task.own, task.functional,
                                                                                strict=True)]
    assert len(counted) == 2 and logged == pytest.approx([float((rows == 0).mean()) for rows in counted], abs=1e-12)
    assert len([line for line in said if "net.3 ran with tensors bound in place" in line]) == (bound == "target")
