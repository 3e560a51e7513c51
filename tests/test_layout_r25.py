"""Round 25: feature axes the layout rule read along the tokens, time steps or image columns without a warning.

Each test runs a small model, reads the tapped activation as the monitors do (``module_layout`` ->
``with_canonical_features``) and compares the view with numpy's float64 reading along the feature axis the model
is known to have, or checks that the axis is reported unknown (the monitors then warn once and log nothing)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_act.capture.layout import Layout, module_layout, with_canonical_features
from lightning_act.capture.selection import module_chain


def read(model: nn.Module, name: str, inputs: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per forward: (the tapped activation, the monitors' ``(B, tokens, features)`` rows or None where unknown)."""
    module = model.get_submodule(name)
    layout = replace(module_layout(module_chain(model, module)), reads_features=True)
    decided: dict = {}
    out = []
    for x in inputs:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        with torch.no_grad():
            model(x)
        handle.remove()
        view, known = with_canonical_features(seen[0], layout, decided, name)
        rows = features_last(view.double().numpy(), 1 if view.dim() >= 4 else view.dim() - 1)  # (B, C, *spatial)
        out.append((seen[0].double().numpy(), rows if known else None))
    return out


def features_last(a: np.ndarray, axis: int) -> np.ndarray:
    """numpy's rows: every position of ``a`` with its features along ``axis``."""
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def erank(rows: np.ndarray) -> float:
    s = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class Conv1dNet(nn.Module):
    """A hand-written 1-D CNN whose one ``relu`` is registered after the Linear head, or before every layer."""

    def __init__(self, relu_first: bool, channels: int = 8, classes: int = 3):
        super().__init__()
        if relu_first:
            self.relu = nn.ReLU()
        self.conv1 = nn.Conv1d(2, channels, 3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, classes)
        if not relu_first:
            self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc(self.relu(self.conv2(self.relu(self.conv1(x)))).mean(2))


def test_1d_cnn_relu_beside_the_head_read_along_its_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5) * torch.linspace(0.2, 3.0, 5)  # 5 time steps of very different scales
    for relu_first in (False, True):
        (a, rows), = read(Conv1dNet(relu_first), "relu", [x])
        assert rows is not None
        want = features_last(a, 1)  # (B, C, L): the 8 channels
        np.testing.assert_allclose(rows, want, rtol=0, atol=0)
        assert abs(erank(rows) - erank(want)) < 1e-9


class ConvNeXt1dBlock(nn.Module):
    """A ConvNeXt block on (B, C, L) (Vocos, audio ConvNeXt): its layers act on different axes."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dwconv = nn.Conv1d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 3 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(3 * c, c)

    def forward(self, x):
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).transpose(1, 2))))).transpose(1, 2)


def test_convnext_1d_block_with_as_many_frames_as_channels_is_unknown_not_read_along_frames():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 1), ConvNeXt1dBlock(8))
    (_, rows), = read(model, "1", [torch.randn(4, 2, 8)])
    assert rows is None  # 8 frames, 8 channels: nothing tells which is which


class ActFirstBlock(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ActFirstNet(nn.Module):
    def __init__(self, c: int = 6, classes: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(ActFirstBlock(1, c), ActFirstBlock(c, c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def test_conv_block_registering_its_activation_first_keeps_its_channels_under_a_linear_head():
    torch.manual_seed(0)
    (a, rows), = read(ActFirstNet(), "blocks.0.act", [torch.randn(4, 1, 6, 6) * torch.linspace(0.2, 3.0, 6)])
    assert rows is not None
    np.testing.assert_allclose(rows, features_last(a, 1), rtol=0, atol=0)  # (B, C, H, W) with W == C: channels


class FusedMLP(nn.Module):
    """An MLP of Parameter weights applied with F.linear (nanoGPT-style, fused/packed MLPs)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(d, hidden) / hidden ** 0.5)
        self.act = nn.GELU()

    def forward(self, x):
        return F.linear(self.act(F.linear(x, self.w_in)), self.w_out)


class PreNormBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = FusedMLP(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def test_parameter_mlp_activation_is_not_read_by_its_blocks_width_and_a_tokens_reading_does_not_stick():
    torch.manual_seed(0)
    steps = [torch.randn(4, 8, 8), torch.randn(4, 5, 8)]  # T == d at the first step only
    (_, first), (a, later) = read(PreNormBlock(8), "mlp.act", steps)
    assert first is None  # (4, 8, 32): the block's width 8 is the tokens' count, not the hidden width
    assert later is not None
    want = features_last(a, 2)  # (B, T, hidden): the 32 hidden units
    np.testing.assert_allclose(later, want, rtol=0, atol=0)
    assert abs(erank(later) - erank(want)) < 1e-9


class SpatialGatingUnit(nn.Module):
    """timm's gMLP gating unit: its Linear ``proj`` mixes the tokens of a transposed view."""

    def __init__(self, dim: int, seq_len: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(seq_len, seq_len)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        return u * self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)


def test_gmlp_gating_unit_read_along_its_channels_not_its_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), SpatialGatingUnit(24, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (a, rows), = read(model, "1", [torch.randn(3, 4, 6)])
    assert rows is not None
    np.testing.assert_allclose(rows, features_last(a, 2), rtol=0, atol=0)  # (B, 4 tokens, 12 channels)


def test_remembered_axis_serves_only_a_shape_with_the_width_on_both_axes():
    layout = Layout(reads_features=True, features=(6, "first", None))  # a Conv1d writing 6 channels
    decided: dict = {}
    torch.manual_seed(0)
    maps = [torch.randn(2, 6, 4), torch.randn(2, 6, 6), torch.randn(2, 5, 7)]
    views = [with_canonical_features(x, layout, decided, "conv") for x in maps]
    for x, (view, known) in zip(maps[:2], views[:2]):  # (B, 6, L): the channels, also at L == 6
        assert known
        np.testing.assert_array_equal(features_last(view.double().numpy(), 2), features_last(x.double().numpy(), 1))
    assert views[2][1] is False  # no axis has 6: the width is not this activation's, whatever was remembered
