"""Round 28's review findings on the round's own changes: the fused specs made once per settings, a -0.0 threshold
beside 0.0, and a triton blocked in ``sys.modules`` read as absent."""

from __future__ import annotations

import sys

import numpy as np
import torch

from lightning_act._triton import triton_import_problem
from lightning_act.stats.fused import fused_statistics, moment_spec, zero_spec


def test_thresholds_given_as_tensors_each_count_at_their_own_value() -> None:
    # a 0-d tensor's repr rounds to four decimals: a cache keyed on it gave the first threshold's spec to the second
    x = torch.linspace(0.0, 1.0, 100_001, dtype=torch.float64)
    for threshold in (0.50001, 0.50004):
        spec = zero_spec(torch.tensor(threshold, dtype=torch.float64))
        stats = fused_statistics(x, spec, "torch")
        expected = int((np.abs(x.numpy()) <= threshold).sum())
        assert spec.thresholds == (threshold,)
        assert stats.at_most(threshold).item() == expected


def test_a_negative_zero_threshold_beside_zero_reads_the_same_count() -> None:
    # ActivationSparsity(threshold=-0.0) beside ActivationStats(zero_threshold=0.0): the union kept one zero and the
    # other's lookup raised KeyError 'at_most:-0.0' at the first due step
    x = torch.tensor([[0.0, -0.0, 1.0, -2.0, 0.0]])
    stats = fused_statistics(x, zero_spec(-0.0).union(moment_spec(0.0)), "torch")
    assert stats.at_most(-0.0).item() == stats.at_most(0.0).item() == 3


def test_a_triton_blocked_in_sys_modules_is_absent_not_broken(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    triton_import_problem.cache_clear()
    try:
        assert triton_import_problem() is None
    finally:
        triton_import_problem.cache_clear()


def test_only_timms_attention_has_its_dropout_flag_set_for_the_passes() -> None:
    # review R5: any module with a `fused_attn` attribute was put in training mode, whatever else its forward reads
    # the flag for (a functional batch norm ran its training branch in the EigenScore passes)
    import timm
    from torch import nn

    from lightning_act.callbacks.sensitive import _applies_child_dropout

    class OwnAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused_attn = True
            self.attn_drop = nn.Dropout(0.3)

    own = OwnAttention()
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                            attn_drop_rate=0.3, num_classes=2)
    attention = vit.blocks[0].attn
    active = {id(own.attn_drop), id(attention.attn_drop)}
    assert _applies_child_dropout(attention, active)
    assert not _applies_child_dropout(own, active)


def test_every_rank_takes_rank_zeros_decision_on_the_passes(monkeypatch) -> None:
    # review R5: a rank dropping its identical passes alone left the broadcasts of the passes unpaired (gloo aborted)
    import lightning_act.callbacks.sensitive as sensitive

    def rank_zero_said_yes(tensor: torch.Tensor, src: int) -> None:
        assert src == 0
        tensor.fill_(1.0)

    monkeypatch.setattr(sensitive, "distributed_world_size", lambda: 2)
    monkeypatch.setattr(sensitive.dist, "broadcast", rank_zero_said_yes)
    assert sensitive.SensitiveNeurons._rank_zeros(False, torch.device("cpu")) is True
