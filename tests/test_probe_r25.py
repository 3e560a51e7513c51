"""Round 25: SeND's drop along the axis the capture read, probes that put back the parameters a forward writes in eval
mode (Hugging Face RWKV's rescaling), and the line of a default probe forward that fails on the data."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import EvalRescaled, RescalingTask, StateAtBatchEnd, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.callbacks.probe import probing
from lightning_act.errors import LightningActError


class Block1d(nn.Module):
    """A ConvNeXt-1D block on (B, C, L): a depthwise Conv1d on the channels, then LayerNorm/Linear on them transposed
    (its layers act on different axes, so a (B, C, L) map with L == C does not tell where its channels are)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 3 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(3 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).transpose(1, 2)
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(h)))).transpose(1, 2)


class ConvNext1d(pl.LightningModule):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, c, 1)
        self.blocks = nn.Sequential(Block1d(c), Block1d(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _send_fit(tracking_length: int) -> tuple[list[tuple[bool, torch.Tensor]], list[str]]:
    """A SeND fit on the block model with training sequences of 8 frames == 8 channels: blocks.0's output in every
    forward (eval: the tracking passes; training: after the drop), in order, and the warnings."""
    torch.manual_seed(0)
    model = ConvNext1d()
    seen: list[tuple[bool, torch.Tensor]] = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append((m.training, a[0].detach().clone())))
    monitor = SensitiveNeurons(
        modules=["blocks.0"], every_n_steps=1, window=2, drop=True, drop_checkpoints=5, eigenscore_passes=0,
        tracking_inputs=torch.randn(16, 2, tracking_length), top_fraction=0.25, stop_after_taps=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, callbacks=[monitor]).fit(
            model, DataLoader(TensorDataset(torch.randn(48, 2, 8)), batch_size=8)
        )
    return seen, [str(w.message) for w in caught]


def _numpy_top_channels(tracking_outputs: list[torch.Tensor], fraction: float) -> set[int]:
    """SeND's top channels (arXiv 2410.15460) of C + 1 checkpoints of (B, C, L) outputs, in float64 numpy: the
    embedding of an example is its channels' means over L; V_i = Var_t(e_i) · Σ_t |Δe_i^t| over the last C
    checkpoints (population variance), per example, averaged over the examples."""
    e = np.stack([t.double().numpy().mean(axis=2) for t in tracking_outputs])  # (C + 1, B, channels)
    v = (e[1:].var(axis=0) * np.abs(np.diff(e, axis=0)).sum(axis=0)).mean(axis=0)
    k = max(1, round(fraction * v.size))
    return set(np.argsort(-v, kind="stable")[:k].tolist())


def test_send_drop_zeroes_the_channels_the_capture_read_when_a_training_batch_has_as_many_frames() -> None:
    # Before: the tracking set (L=5) was read along its channels (the capture remembered axis 1 for the tap), but the
    # drop asked for the axis without that memory: at L == C it zeroed two whole frames and no channel.
    seen, _ = _send_fit(tracking_length=5)
    first_drop = next(i for i, (training, x) in enumerate(seen) if training and bool((x == 0).any()))
    window = [x for training, x in seen[:first_drop] if not training][-3:]  # the C + 1 = 3 checkpoints selecting
    expected = _numpy_top_channels(window, 0.25)
    assert len(expected) == 2
    for training, x in seen[first_drop:]:
        if not training:
            continue
        zero_channels = {c for c in range(8) if bool((x[:, c, :] == 0).all())}
        zero_frames = {t for t in range(8) if bool((x[:, :, t] == 0).all())}
        assert zero_channels == expected and not zero_frames
        assert int((x == 0).sum()) == x.shape[0] * len(expected) * x.shape[2]  # nothing else zeroed


class Block2d(nn.Module):
    """A ConvNeXt block on (B, C, H, W): its layers act on different axes, so a map with W == C never tells."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv(self.norm(self.dwconv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class ConvNext2d(ConvNext1d):
    def __init__(self, c: int = 4) -> None:
        super().__init__(c)
        self.stem = nn.Conv2d(2, c, 1)
        self.blocks = nn.Sequential(Block2d(c), Block2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_send_drop_zeroes_nothing_and_says_so_once_where_no_axis_was_ever_told() -> None:
    # Every map, tracking and training, is (B, 4, 4, 4) with 4 channels: no shape tells the axis the sensitive set
    # indexes, so the drop zeroes nothing (the capture warns that the map's features are unknown).
    torch.manual_seed(0)
    model = ConvNext2d()
    seen: list[torch.Tensor] = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    monitor = SensitiveNeurons(
        modules=["blocks.0"], every_n_steps=1, window=2, drop=True, drop_checkpoints=5, eigenscore_passes=0,
        tracking_inputs=torch.randn(16, 2, 4, 4), top_fraction=0.25, stop_after_taps=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, callbacks=[monitor]).fit(
            model, DataLoader(TensorDataset(torch.randn(48, 2, 4, 4)), batch_size=8)
        )
    assert len(seen) == 6 and all(not bool((x == 0).any()) for x in seen)
    lines = [str(w.message) for w in caught if "SensitiveNeurons(drop=True): nothing tells which axis" in str(w.message)]
    assert len(lines) == 1 and "blocks.0" in lines[0] and "feature_dim=" in lines[0]


def test_a_probe_puts_back_parameters_and_the_flag_an_eval_forward_rescaled_in_place() -> None:
    # Before: the probe left block 2's weight divided by 4 and the flag set, both at the first probe and the next.
    torch.manual_seed(0)
    model = EvalRescaled()
    x = torch.randn(5, 6)
    for probe in range(3):  # the first probe finds the writes out; the later ones know them
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        with probing(None, model, torch.device("cpu")):
            model(x)
            assert model.layers_are_rescaled  # the forward did rescale inside
        assert model.training and model.layers_are_rescaled is False, probe
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), (probe, name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)  # a training update between probes


def _rescaling_fit(monitored: bool) -> list[tuple[dict[str, torch.Tensor], bool]]:
    torch.manual_seed(0)
    model = RescalingTask()
    data, tracking = DataLoader(TensorDataset(torch.randn(32, 6)), batch_size=8), torch.randn(8, 6)
    recorder = StateAtBatchEnd()
    callbacks: list[pl.Callback] = [recorder]
    if monitored:
        callbacks.insert(0, SensitiveNeurons(modules=["net.blocks.1"], every_n_steps=1, eigenscore_passes=0,
                                             tracking_inputs=tracking, window=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=4, callbacks=callbacks).fit(model, data)
    return recorder.states


def test_weights_read_at_a_batch_end_are_those_of_the_fit_without_the_monitor_bit_for_bit() -> None:
    # Before: at every batch end after a probe block 2's weight was 1/4 of the unmonitored fit's (what a checkpoint
    # or an EMA would take), and the flag said rescaled.
    plain, monitored = _rescaling_fit(False), _rescaling_fit(True)
    assert len(plain) == len(monitored) == 4
    for step, ((plain_params, plain_flag), (params, flag)) in enumerate(zip(plain, monitored, strict=True)):
        assert flag is plain_flag is False, step
        for name, p in plain_params.items():
            assert torch.equal(params[name], p), (step, name)


class TakesFourFeatures(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_default_probe_forward_failing_on_the_data_names_the_data_first_in_one_line() -> None:
    # Before: "running the model on a probe batch failed (...); pass forward_fn=<...>": the monitor blamed, for
    # validation batches the model cannot take (another data module's).
    train = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    val = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    monitor = SensitiveNeurons(modules=["net.1"], every_n_steps=1, num_samples=4, eigenscore_passes=0)
    with pytest.raises(LightningActError) as caught:
        quiet_trainer(max_steps=1, callbacks=[monitor], limit_val_batches=1).fit(TakesFourFeatures(), train, val)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(
        "SensitiveNeurons: running the model on a batch of the validation loader failed (RuntimeError:"
    )
    assert "the batches may not fit the model (check the data module)" in line
    assert "pass forward_fn=" not in line and "needs forward_fn=<" in line
