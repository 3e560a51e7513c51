"""The small pre-norm transformer: shapes, the causal mask by hand and against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_act.models.small_transformer import CausalSelfAttention, SmallTransformer


def test_causal_attention_weights_by_hand() -> None:
    # Equal scores everywhere: row i spreads its weight uniformly over positions 0..i, none later.
    attention = CausalSelfAttention(4, 1)
    q = torch.zeros(1, 1, 3, 4)
    weights = attention.attention_weights(q, q)[0, 0]
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(weights, expected)
    unmasked = CausalSelfAttention(4, 1, causal=False).attention_weights(q, q)[0, 0]
    torch.testing.assert_close(unmasked, torch.full((3, 3), 1 / 3))


def test_attention_matches_torch_scaled_dot_product_attention() -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(attention(x), attention.proj(reference), atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_later_tokens() -> None:
    torch.manual_seed(0)
    model = SmallTransformer(vocab_size=11, max_len=6, dim=16, depth=2, num_heads=2).eval()
    ids = torch.randint(0, 11, (3, 6))
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11
    logits, changed_logits = model(ids), model(changed)
    assert logits.shape == (3, 6, 11)
    torch.testing.assert_close(logits[:, :4], changed_logits[:, :4])
    assert not torch.allclose(logits[:, 4:], changed_logits[:, 4:])


def test_attention_only_blocks_have_no_mlp() -> None:
    model = SmallTransformer(vocab_size=8, max_len=3, dim=16, depth=2, num_heads=2, mlp=False)
    names = [name for name, _ in model.named_modules()]
    assert not any(".mlp" in name or "norm2" in name for name in names)
    with_mlp = SmallTransformer(vocab_size=8, max_len=3, dim=16, depth=2, num_heads=2, mlp=True, act="relu")
    assert isinstance(with_mlp.blocks[0].mlp.act, torch.nn.ReLU)
    assert with_mlp.blocks[0].mlp.fc1.out_features == 64


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SmallTransformer(vocab_size=8, max_len=3, dim=10, num_heads=4)
    with pytest.raises(ValueError, match="act="):
        SmallTransformer(vocab_size=8, max_len=3, dim=16, num_heads=2, act="tanh")
    with pytest.raises(ValueError, match="max_len"):
        SmallTransformer(vocab_size=8, max_len=3, dim=16, num_heads=2)(torch.zeros(1, 4, dtype=torch.long))
