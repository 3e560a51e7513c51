"""STAN architecture: size, shapes, and which axis each attention layer mixes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from lightning_act.errors import ConfigError, DataFormatError
from lightning_act.models.stan import STAN, SpatialAttention, TemporalAttention


def _expected_parameters(channels: int, window: int, segment: int, d: int, depth: int, mlp_ratio: float) -> int:
    """Parameter count written out from the architecture description, layer by layer."""
    hidden = int(d * mlp_ratio)
    layer = (
        2 * 2 * d  # two LayerNorms (weight + bias)
        + 3 * d * d + 3 * d  # attention in-projection (q, k, v)
        + d * d + d  # attention out-projection
        + d * hidden + hidden + hidden * d + d  # MLP
    )
    embed = segment * d + d + channels * d + (window // segment) * d
    return embed + depth * 2 * layer + 2 * d + d + 1  # final LayerNorm, head (1 logit)


def test_default_size_matches_paper_scale() -> None:
    model = STAN()
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameters(23, 1280, 128, 176, 3, 4.0)
    assert abs(count - 2.3e6) / 2.3e6 < 0.03  # paper: 2.3M parameters


def test_shapes_and_embedding_normalisation() -> None:
    torch.manual_seed(0)
    model = STAN(in_chans=4, window_samples=64, segment_samples=16, embed_dim=16, depth=1, num_heads=2).eval()
    x = torch.randn(5, 4, 64)
    assert model.forward_features(x).shape == (5, 4, 4, 16)
    z = model.embed(x)
    assert z.shape == (5, 16)
    # LayerNorm without affine: every embedding has zero mean and unit (biased) variance.
    torch.testing.assert_close(z.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert model(x).shape == (5,)
    torch.testing.assert_close(model(x), model.head(z).squeeze(-1))
    multi = STAN(in_chans=4, window_samples=64, segment_samples=16, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    assert multi(x).shape == (5, 3)


def test_spatial_layer_mixes_channels_within_a_segment_only() -> None:
    torch.manual_seed(0)
    layer = SpatialAttention(embed_dim=8, num_heads=2, mlp_ratio=2.0, dropout=0.0).eval()
    grid = torch.randn(1, 3, 4, 8)  # (B, channels, segments, D)
    changed = grid.clone()
    changed[0, 0, 1] += torch.randn(8)  # channel 0, segment 1 (not a constant: LayerNorm removes those)
    delta = (layer(changed) - layer(grid)).abs().sum(-1)[0]  # (channels, segments)
    assert (delta[:, 1] > 1e-6).all()  # every channel of segment 1 sees it
    assert torch.all(delta[:, [0, 2, 3]] == 0)  # other segments untouched


def test_temporal_layer_mixes_segments_within_a_channel_only() -> None:
    torch.manual_seed(0)
    layer = TemporalAttention(embed_dim=8, num_heads=2, mlp_ratio=2.0, dropout=0.0).eval()
    grid = torch.randn(1, 3, 4, 8)
    changed = grid.clone()
    changed[0, 2, 0] += torch.randn(8)  # channel 2, segment 0
    delta = (layer(changed) - layer(grid)).abs().sum(-1)[0]
    assert (delta[2, :] > 1e-6).all()  # every segment of channel 2 sees it
    assert torch.all(delta[[0, 1], :] == 0)  # other channels untouched


def test_timm_factories_and_gradients() -> None:
    model = timm.create_model("stan_tiny", dropout=0.0)
    assert (model.in_chans, model.window_samples, model.embed_dim) == (8, 320, 32)
    model(torch.randn(2, 8, 320)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert timm.create_model("stan_base").num_segments == 10
    assert model.get_classifier() is model.head  # monitors' "@penultimate" taps the head input


def test_num_classes_0_gives_the_embedding() -> None:
    # timm's convention for a headless backbone; before: an empty (B, 0) tensor
    model = timm.create_model("stan_tiny", num_classes=0, dropout=0.0).eval()
    x = torch.randn(2, 8, 320)
    assert torch.equal(model(x), model.embed(x)) and model(x).shape == (2, 32)


def test_bad_shapes_raise_one_line_errors() -> None:
    model = STAN(in_chans=4, window_samples=64, segment_samples=16, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(DataFormatError, match=r"\(B, 4, 64\)") as info:
        model(torch.randn(2, 5, 64))
    assert "\n" not in str(info.value)
    with pytest.raises(DataFormatError, match="multiple of segment_samples"):
        STAN(window_samples=100, segment_samples=16)


def test_timms_split_forward_pools_the_grid_like_forward() -> None:
    """timm's contract: ``forward(x) == forward_head(forward_features(x))``, ``pre_logits=True`` gives the pooled
    embedding; checked against a float64 numpy pooling, LayerNorm and head. Before: forward_head applied the head to
    every token of the grid ((2, 8) logits per window, silently) and pre_logits was a TypeError."""
    torch.manual_seed(0)
    model = timm.create_model("stan_tiny", num_classes=3).eval()
    x = torch.randn(2, 8, 320)
    with torch.no_grad():
        grid = model.forward_features(x)
        pooled = model.forward_head(grid, pre_logits=True)
        logits = model.forward_head(grid)
        assert torch.equal(logits, model(x))
    mean = grid.double().numpy().mean(axis=(1, 2))
    embedding = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(pooled.numpy(), embedding, atol=1e-5)
    head_w, head_b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    np.testing.assert_allclose(logits.numpy(), embedding @ head_w.T + head_b, atol=1e-5)
    with pytest.raises(DataFormatError, match=r"\(B, C, S, D\)"):
        model.forward_head(grid[0])  # one window without its batch axis


def test_reset_classifier_gives_a_fresh_head_of_the_new_size() -> None:
    torch.manual_seed(0)
    model = timm.create_model("stan_tiny").eval()
    x = torch.randn(2, 8, 320)
    with torch.no_grad():
        embedding = model.embed(x).double().numpy()
        model.reset_classifier(4)
        head_w, head_b = model.head.weight.double().numpy(), model.head.bias.double().numpy()
        np.testing.assert_allclose(model(x).numpy(), embedding @ head_w.T + head_b, atol=1e-5)
        model.reset_classifier(0)  # timm's headless backbone: the embedding comes out
        np.testing.assert_allclose(model(x).numpy(), embedding, atol=1e-6)
    with pytest.raises(ConfigError, match="global_pool='token'"):
        model.reset_classifier(2, global_pool="token")
