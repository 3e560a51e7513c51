"""Round 25: a tap's remembered feature axis serves later shapes that cannot tell, but not one remembered against the
axis the tapped layers act on for shapes that neither axis has the width of: one batch whose tokens happened to have
the width made every later one be read along its tokens."""

from __future__ import annotations

import numpy as np
import torch

from lightning_act.capture.layout import Layout, with_canonical_features


def features_last(a: np.ndarray, axis: int) -> np.ndarray:
    """numpy's rows: every position of ``a`` with its features along ``axis``."""
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def test_a_remembered_axis_against_the_layers_does_not_serve_shapes_with_neither_width():
    # A Linear writing 6 (acting on the last axis) whose first call had 6 tokens only on axis 1: that reading (the
    # tokens) was remembered and served every later call whose axes had neither width (round 24).
    layout = Layout(reads_features=True, features=(6, "last", None))
    decided: dict = {}
    torch.manual_seed(0)
    maps = [torch.randn(2, 6, 4), torch.randn(2, 5, 7)]
    views = [with_canonical_features(x, layout, decided, "fc") for x in maps]
    np.testing.assert_array_equal(features_last(views[0][0].double().numpy(), 2), features_last(maps[0].double().numpy(), 1))
    assert views[1][0] is maps[1] and views[1][1]  # read as it comes, (B, T, D)


def test_a_remembered_axis_of_the_layers_serves_shapes_with_both_or_neither_width():
    # A Conv1d writing 6 channels: (B, 6, L) at L == 6, and an activation shared with a layer of 9 channels (neither
    # axis has 6), are read along the channels found at the first call.
    layout = Layout(reads_features=True, features=(6, "first", None))
    decided: dict = {}
    torch.manual_seed(0)
    maps = [torch.randn(2, 6, 4), torch.randn(2, 6, 6), torch.randn(2, 9, 7)]
    views = [with_canonical_features(x, layout, decided, "conv") for x in maps]
    for x, (view, known) in zip(maps, views):
        assert known
        np.testing.assert_array_equal(features_last(view.double().numpy(), 2), features_last(x.double().numpy(), 1))
