"""Which axis of a tapped activation is the sample and which the token.

The statistics read activations sample-first: ``(B, D)``, ``(B, T, D)``, ``(B, C, H, W)``. PyTorch's
own sequence modules default to sequence-first ``(T, B, D)`` (``batch_first=False``), so a tap
inside (or on) an ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``,
``nn.MultiheadAttention``, ``nn.TransformerEncoder``/``Decoder`` or ``nn.Transformer`` inherits the
``batch_first`` of its nearest such owner. The user can say it per monitor (``batch_dim=``,
``token_dim=``), which overrides the inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

@dataclass(frozen=True)
class Layout:
    """Axis of the samples and (optionally) of the tokens; ``None``: sample-first as it comes."""

    batch_dim: int | None = None
    token_dim: int | None = None

    @property
    def declared(self) -> bool:
        return self.batch_dim is not None


SAMPLE_FIRST = Layout()


def declared_batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of a PyTorch sequence module (a Transformer stack asks its first layer), else None."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return declared_batch_first(module.layers[0]) if len(module.layers) else None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)  # the layers keep the flag on their attention
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer)):
        return bool(module.batch_first)
    return None


def module_layout(chain: list[nn.Module]) -> Layout:
    """Layout of a tap from its module and its owners (innermost first): the nearest declaration wins."""
    for module in chain:
        batch_first = declared_batch_first(module)
        if batch_first is not None:
            return Layout(0, 1) if batch_first else Layout(1, 0)
    return SAMPLE_FIRST


def to_sample_first(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A view of ``x`` with the samples on axis 0 (and the tokens on axis 1 when the layout names them)."""
    if layout.batch_dim is None or x.dim() < 2:
        return x
    batch = layout.batch_dim % x.dim()
    if layout.token_dim is None:
        return x if batch == 0 else x.movedim(batch, 0)
    token = layout.token_dim % x.dim()
    if batch == 0 and token == 1:
        return x
    return x.movedim((batch, token), (0, 1))
