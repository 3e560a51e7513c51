"""A small pre-norm transformer over token ids, with or without MLPs, for the phenomenon recipes.

One architecture serves two papers' settings:

- a decoder-only causal language model (GPT-2-style pre-norm blocks ``h + attn(ln(h))``,
  ``h + mlp(ln(h))``) whose block outputs are the residual stream where massive activations appear
  (Sun et al. 2024, arXiv 2402.17762; Gallego-Feliciano et al., arXiv 2508.03616);
- an attention-only transformer (``mlp=False``: blocks are ``h + attn(ln(h))`` only), the model
  of the execution-manifold study on modular addition (Xu 2026, arXiv 2602.10496), where adding
  MLPs back is the control.

Attention is written out (scores, an explicit causal mask, softmax) rather than calling a fused
kernel, so the mask is visible and testable by hand. ``forward(ids)`` returns logits ``(B, T, V)``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from lightning_act.errors import ConfigError


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; position ``i`` attends to positions ``<= i`` when ``causal``."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}; pick a divisor of dim")
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Softmax of ``q kᵀ / sqrt(d_head)`` with future positions masked out: (B, heads, T, T)."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.causal:
            length = q.shape[-2]
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.attention_weights(q, k) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``ratio · dim``."""

    def __init__(self, dim: int, ratio: float, act: str) -> None:
        super().__init__()
        activations = {"gelu": nn.GELU, "relu": nn.ReLU}
        if act not in activations:
            raise ConfigError(f"act={act!r} is unknown; use one of {sorted(activations)}")
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activations[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``h + attn(ln1(h))`` then, with an MLP, ``h + mlp(ln2(h))``."""

    def __init__(self, dim: int, num_heads: int, mlp: bool, mlp_ratio: float, act: str, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, causal)
        self.norm2 = nn.LayerNorm(dim) if mlp else None
        self.mlp = Mlp(dim, mlp_ratio, act) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class SmallTransformer(nn.Module):
    """Token + learned position embeddings, ``depth`` pre-norm blocks, final LayerNorm, linear head.

    Args:
        vocab_size: number of token ids (256 for bytes).
        max_len: longest sequence (size of the position table).
        dim, depth, num_heads: width, number of blocks, attention heads.
        mlp: give every block an MLP; False is the attention-only transformer.
        mlp_ratio, act: MLP hidden width / dim and its activation ("gelu" or "relu").
        causal: mask future positions (a decoder); False attends everywhere.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp: bool = True,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        causal: bool = True,
    ) -> None:
        super().__init__()
        # else an empty vocabulary or position table (an IndexError at the first batch) or a ZeroDivisionError for no
        # heads; depth 0 is a model without blocks (embeddings, norm and head: a no-attention baseline)
        sizes = {"vocab_size": (vocab_size, 256, 1), "max_len": (max_len, 128, 1), "dim": (dim, 128, 1),
                 "depth": (depth, 4, 0), "num_heads": (num_heads, 4, 1)}
        for name, (value, example, low) in sizes.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ConfigError(f"{name}={value!r} must be a whole number >= {low}; pass e.g. --model.{name} {example}")
        if mlp and (isinstance(mlp_ratio, bool) or not (math.isfinite(mlp_ratio) and int(dim * mlp_ratio) >= 1)):
            raise ConfigError(
                f"mlp_ratio={mlp_ratio!r} must be a finite number with dim * mlp_ratio >= 1 (the MLP's hidden width); "
                "pass e.g. --model.mlp_ratio 4"
            )
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp, mlp_ratio, act, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def get_classifier(self) -> nn.Module:
        """The output head (so ``@penultimate`` taps the final normalised residual stream)."""
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than max_len={self.max_len}")
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
