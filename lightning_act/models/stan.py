"""STAN: spatio-temporal attention network for EEG seizure forecasting.

After Li et al. 2025, "Adversarial Spatio-Temporal Attention Network for epileptic seizure
forecasting" (arXiv 2511.01275): cascaded blocks (three reported) that alternate *spatial*
attention (tokens = EEG channels, attending across electrodes at each time segment) and
*temporal* attention (tokens = time segments, attending across time within each channel),
followed by a classifier head; about 2.3M parameters.

Layout of one window: ``(B, C, T)`` is cut into ``S = T // segment_samples`` segments per
channel; each (channel, segment) slice of raw samples is linearly embedded to ``embed_dim``
and gets a learned channel embedding plus a learned segment embedding, giving a token grid
``(B, C, S, D)``.  A spatial layer runs a pre-norm transformer layer over the ``C`` axis for
every segment, a temporal layer over the ``S`` axis for every channel.  The pooled token grid
(mean over channels and segments, then a LayerNorm without affine parameters so its scale is
fixed) is the *embedding* that the adversarial discriminator sees; a linear head maps it to
the logit(s).  The paper does not publish layer widths; the defaults here (23 channels, 5 s
at 256 Hz, 0.5 s segments, width 176, 8 heads, MLP ratio 4, 3 blocks) give 2.29M parameters.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from lightning_act.errors import ConfigError, DataFormatError


class AxisAttentionLayer(nn.Module):
    """Pre-norm transformer layer (multi-head self-attention + MLP) over one token axis."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, embed_dim), nn.Dropout(dropout)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: ``(N, L, D)``; attention mixes the ``L`` axis."""
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


class SpatialAttention(AxisAttentionLayer):
    """Attention across EEG channels, independently for each time segment."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, s, d = grid.shape
        tokens = grid.transpose(1, 2).reshape(b * s, c, d)
        return super().forward(tokens).reshape(b, s, c, d).transpose(1, 2)


class TemporalAttention(AxisAttentionLayer):
    """Attention across time segments, independently for each EEG channel."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, s, d = grid.shape
        return super().forward(grid.reshape(b * c, s, d)).reshape(b, c, s, d)


class STANBlock(nn.Module):
    """One cascaded block: spatial attention, then temporal attention."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.spatial = SpatialAttention(embed_dim, num_heads, mlp_ratio, dropout)
        self.temporal = TemporalAttention(embed_dim, num_heads, mlp_ratio, dropout)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.spatial(grid))


class STAN(nn.Module):
    """Spatio-temporal attention classifier for multichannel EEG windows ``(B, C, T)``.

    ``num_classes=1`` (default) gives one preictal-vs-interictal logit per window.
    """

    def __init__(
        self,
        in_chans: int = 23,
        window_samples: int = 1280,
        segment_samples: int = 128,
        embed_dim: int = 176,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        if window_samples % segment_samples != 0:
            raise DataFormatError(
                f"window_samples={window_samples} is not a multiple of segment_samples={segment_samples}; "
                "choose a segment length that divides the window"
            )
        if num_heads < 1 or embed_dim % num_heads:  # else nn.MultiheadAttention's bare AssertionError
            raise ConfigError(
                f"embed_dim={embed_dim} cannot be split into num_heads={num_heads} heads; pick num_heads that divides "
                "embed_dim"
            )
        self.in_chans = in_chans
        self.window_samples = window_samples
        self.segment_samples = segment_samples
        self.num_segments = window_samples // segment_samples
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.segment_embed = nn.Linear(segment_samples, embed_dim)
        self.channel_pos = nn.Parameter(torch.zeros(1, in_chans, 1, embed_dim))
        self.segment_pos = nn.Parameter(torch.zeros(1, 1, self.num_segments, embed_dim))
        nn.init.trunc_normal_(self.channel_pos, std=0.02)
        nn.init.trunc_normal_(self.segment_pos, std=0.02)
        self.blocks = nn.ModuleList(STANBlock(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.embedding_norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        # num_classes=0: the (B, D) embedding, timm's convention for a headless backbone
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.in_chans or x.shape[2] != self.window_samples:
            raise DataFormatError(
                f"STAN expects windows of shape (B, {self.in_chans}, {self.window_samples}) but got "
                f"{tuple(x.shape)}; set the model's in_chans/window_samples to match the data"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token grid ``(B, C, S, D)`` after the cascaded blocks and the final LayerNorm."""
        self._check_input(x)
        b, c, _ = x.shape
        segments = x.reshape(b, c, self.num_segments, self.segment_samples)
        grid = self.segment_embed(segments) + self.channel_pos + self.segment_pos
        for block in self.blocks:
            grid = block(grid)
        return self.norm(grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Window embedding ``(B, D)`` fed to the head and to the adversarial discriminator."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def get_classifier(self) -> nn.Module:
        """The head (timm convention); monitors use its input as the penultimate features."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, the embedding comes out), as timm models do."""
        if global_pool not in (None, "avg"):
            raise ConfigError(
                f"STAN pools its token grid by a mean over channels and segments, not global_pool={global_pool!r}; "
                "pass global_pool=None or 'avg'"
            )
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits, ``(B,)`` for ``num_classes=1`` else ``(B, num_classes)``, or the embedding for ``pre_logits``.

        ``x`` is :meth:`forward_features`' grid ``(B, C, S, D)``, pooled here (timm's split forward), or an
        embedding ``(B, D)`` already pooled by :meth:`embed` (the adversarial task classifies the embedding that its
        discriminator sees).
        """
        if x.ndim == 4:
            x = self.embedding_norm(x.mean(dim=(1, 2)))
        elif x.ndim != 2:
            raise DataFormatError(
                f"STAN.forward_head takes forward_features' grid (B, C, S, D) or embed's (B, D), got {tuple(x.shape)}"
            )
        if pre_logits:
            return x
        logits = self.head(x)
        return logits.squeeze(-1) if self.num_classes == 1 else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _drop_timm_kwargs(kwargs: dict) -> dict:
    """timm.create_model passes pretrained-config keys that a scratch model has no use for."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


@register_model
def stan_base(pretrained: bool = False, **kwargs) -> STAN:
    """Paper-sized STAN (≈2.3M parameters): 23 channels, 5 s at 256 Hz, 3 blocks of width 176."""
    if pretrained:
        raise DataFormatError("no pretrained STAN weights exist; call stan_base(pretrained=False)")
    return STAN(**_drop_timm_kwargs(kwargs))


@register_model
def stan_tiny(pretrained: bool = False, **kwargs) -> STAN:
    """CPU-sized STAN for the synthetic recipe: 8 channels, 5 s at 64 Hz, 2 blocks of width 32."""
    if pretrained:
        raise DataFormatError("no pretrained STAN weights exist; call stan_tiny(pretrained=False)")
    config = {
        "in_chans": 8, "window_samples": 320, "segment_samples": 32, "embed_dim": 32, "depth": 2, "num_heads": 4,
        "mlp_ratio": 2.0,
    }
    config.update(_drop_timm_kwargs(kwargs))
    return STAN(**config)
