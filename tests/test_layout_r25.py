"""Round 25: a tap's remembered feature axis serves only later shapes that cannot tell (both axes have the width),
not shapes that neither has: one batch whose tokens happened to have the width made every later one be read along
its tokens."""

from __future__ import annotations

import numpy as np
import torch

from lightning_act.capture.layout import Layout, with_canonical_features


def features_last(a: np.ndarray, axis: int) -> np.ndarray:
    """numpy's rows: every position of ``a`` with its features along ``axis``."""
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def test_remembered_axis_serves_only_a_shape_with_the_width_on_both_axes():
    layout = Layout(reads_features=True, features=(6, "first", None))  # a Conv1d writing 6 channels
    decided: dict = {}
    torch.manual_seed(0)
    maps = [torch.randn(2, 6, 4), torch.randn(2, 6, 6), torch.randn(2, 5, 7)]
    views = [with_canonical_features(x, layout, decided, "conv") for x in maps]
    for x, (view, known) in zip(maps[:2], views[:2]):  # (B, 6, L): the channels, also at L == 6
        assert known
        np.testing.assert_array_equal(features_last(view.double().numpy(), 2), features_last(x.double().numpy(), 1))
    assert views[2][0] is maps[2]  # no axis has 6: the width is not this activation's, whatever was remembered
