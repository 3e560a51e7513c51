"""Spectral-NN: a per-pixel MLP on the B-band spectrum with Parametric Mish (Lekhak et al., arXiv 2602.10434).

The paper does not publish layer sizes; the default ``B → 128 → 64 → 1`` with PMish and dropout
follows the reference notes, and every size is a constructor argument. The output is one logit
per pixel (target vs background).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from timm.models import register_model
from torch import nn

from lightning_act.errors import ConfigError
from lightning_act.nn.pmish import PMish


class SpectralBlock(nn.Module):
    """``Linear → PMish → Dropout``: one hidden layer of Spectral-NN."""

    def __init__(self, in_features: int, out_features: int, dropout: float, beta_init: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = PMish(beta_init=beta_init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.linear(x)))


class SpectralNN(nn.Module):
    """Per-pixel spectral classifier: spectra (..., B) → target logits (...).

    Args:
        in_bands: number of spectral bands B.
        hidden_sizes: widths of the hidden layers (default 128, 64).
        dropout: dropout after every PMish.
        beta_init: initial β of every PMish (1 = Mish).
        num_classes: head size, timm's argument: 1 (default) gives one logit per pixel, ``N`` logits ``(..., N)``,
            0 no head (the last hidden layer's features), as :meth:`reset_classifier` builds it.
    """

    def __init__(
        self, in_bands: int, hidden_sizes: Sequence[int] = (128, 64), dropout: float = 0.2, beta_init: float = 1.0,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        if in_bands < 1 or not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(
                f"SpectralNN needs in_bands >= 1 and at least one positive hidden size, got in_bands={in_bands}, "
                f"hidden_sizes={list(hidden_sizes)}; pass e.g. in_bands=64, hidden_sizes=[128, 64]"
            )
        if num_classes < 0:
            raise ConfigError(
                f"SpectralNN num_classes={num_classes} must be >= 0 (0: no head); pass e.g. num_classes=1"
            )
        widths = [in_bands, *hidden_sizes]
        self.in_bands = in_bands
        self.blocks = nn.ModuleList(
            SpectralBlock(w_in, w_out, dropout, beta_init) for w_in, w_out in itertools.pairwise(widths)
        )
        self.num_features = widths[-1]
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from the last hidden layer's features (``(...)`` for one class, else ``(..., num_classes)``), or
        those features for ``pre_logits`` (timm's split forward; a pixel's spectrum needs no pooling)."""
        if pre_logits:
            return x
        logits = self.head(x)
        return logits.squeeze(-1) if self.num_classes == 1 else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, the last hidden layer's features come out), as timm models do."""
        if global_pool not in (None, ""):
            raise ConfigError(
                f"Spectral-NN classifies each pixel's spectrum and pools nothing, not global_pool={global_pool!r}; "
                "pass global_pool=None"
            )
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@register_model
def spectral_nn(pretrained: bool = False, **kwargs) -> SpectralNN:
    """Spectral-NN with the default sizes (``timm.create_model("spectral_nn", in_bands=B)``); no pretrained weights exist."""
    if pretrained:
        raise ValueError("spectral_nn has no pretrained weights; pass pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return SpectralNN(**kwargs)
