"""Small LoRA and (IA)³ baselines for frozen ``nn.Module`` s.

LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen ``nn.Linear`` ``W`` gains a low-rank update,
``y = W x + b + (α / r) · B A x`` with ``A ∈ R^{r×in}`` (Kaiming-uniform) and ``B ∈ R^{out×r}``
initialised to zero, so the adapted model starts equal to the frozen one; ``r (in + out)``
trainable numbers per layer.

(IA)³ (Liu et al. 2022, arXiv 2205.05638): learned vectors, initialised to ones, rescale keys,
values and the FFN intermediate activation. :func:`apply_ia3` rescales the output of any chosen
module along its feature axis (FFN activations by default; a fused ``qkv`` Linear can be chosen
too); one trainable number per feature.

Written here instead of using HF ``peft`` because ``peft`` installs ``transformers``,
``tokenizers`` and ``accelerate`` for two ~20-line modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_act.capture.layout import conv1d_widths, is_hugging_face_conv1d
from lightning_act.errors import ModuleSelectionError
from lightning_act.nn.dopamine import (
    FrozenModuleAdapter,
    ModulePattern,
    device_of,
    freeze,
    infer_widths,
    replace_module,
    select_modules,
)


def linear_widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of an ``nn.Linear`` or of Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``/``c_fc``/``c_proj``: a
    Linear whose weight is stored ``(in, out)``); None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hugging_face_conv1d(module):
        return conv1d_widths(module)
    return None


class LoRALinear(FrozenModuleAdapter):
    """A frozen ``nn.Linear`` (or Hugging Face ``Conv1D``) plus a trainable rank-``rank`` update scaled by
    ``alpha / rank`` (in the base weight's dtype and on its device).

    A negative ``alpha`` is accepted: ``B`` starts at zero, so ``-alpha`` trains ``-B`` along the same path as
    ``alpha`` trains ``B`` (AdamW, whose steps flip sign with the gradient, included): the same adapted model."""

    def __init__(self, base: nn.Module, rank: int = 1, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ModuleSelectionError(f"LoRA rank must be >= 1, got {rank}; pass lora_rank >= 1")
        # a NaN scaling made every output NaN; a zero one trained nothing (dL/dB and dL/dA are both ∝ α), silently
        if alpha is not None and (not math.isfinite(alpha) or alpha == 0):
            raise ModuleSelectionError(
                f"LoRA alpha must be a finite number other than 0, got {alpha}; pass e.g. lora_alpha 16, or leave it "
                "unset for alpha = rank"
            )
        self.base = base
        self.rank = rank
        self.scaling = (float(alpha) if alpha is not None else float(rank)) / rank
        widths = linear_widths(base)
        if widths is None:
            raise ModuleSelectionError(f"LoRA wraps nn.Linear or Hugging Face Conv1D, not {type(base).__name__}")
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, widths[0], **like))
        self.lora_b = nn.Parameter(torch.zeros(widths[1], rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


class IA3Scale(FrozenModuleAdapter):
    """Multiply a module's output by a learned per-feature vector initialised to ones."""

    def __init__(self, module: nn.Module, num_features: int, feature_dim: int = -1) -> None:
        super().__init__()
        self.module = module
        self.num_features = num_features
        self.feature_dim = feature_dim
        self.scale = nn.Parameter(torch.ones(num_features))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.module(*args, **kwargs)
        if out.shape[self.feature_dim] != self.num_features:  # else a bare broadcasting error, or width 1 fits silently
            raise ModuleSelectionError(
                f"IA3Scale expects {self.num_features} features on dim {self.feature_dim} of its module's output but "
                f"got shape {tuple(out.shape)}; apply_ia3 with example_input= (and the output's feature_dim=) so the "
                "width is read from a forward pass"
            )
        shape = [1] * out.ndim
        shape[self.feature_dim] = self.num_features
        return out * self.scale.to(out.dtype).view(shape)


def refuse_attention_out_proj(model: nn.Module, chosen: Sequence[tuple[str, nn.Module]], adapter: str) -> None:
    """Refuse ``nn.MultiheadAttention``'s ``out_proj``: the attention reads its weight itself instead of calling it,
    so a wrapper there would crash at every forward."""
    attention = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    read_directly = [name for name, _ in chosen if name.rpartition(".")[::2] in {(a, "out_proj") for a in attention}]
    if read_directly:
        raise ModuleSelectionError(
            f"{adapter} cannot wrap {read_directly[:3]}: nn.MultiheadAttention reads its out_proj weight directly; "
            "select the other layers by name globs"
        )


def apply_lora(
    model: nn.Module,
    modules: Sequence[ModulePattern] = ("torch.nn.Linear",),
    rank: int = 1,
    alpha: float | None = None,
) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every selected ``nn.Linear`` (or Hugging Face ``Conv1D``: GPT-2's layers) with
    :class:`LoRALinear` (in place)."""
    chosen = select_modules(model, modules)
    not_linear = [n for n, m in chosen if linear_widths(m) is None]
    if not_linear:
        raise ModuleSelectionError(
            f"LoRA wraps nn.Linear and Hugging Face Conv1D only but {not_linear} are not; select Linear layers"
        )
    refuse_attention_out_proj(model, chosen, "LoRA")
    freeze(model)
    wrapped: dict[str, LoRALinear] = {}
    for name, linear in chosen:
        wrapped[name] = LoRALinear(linear, rank=rank, alpha=alpha)
        replace_module(model, name, wrapped[name])
    return wrapped


def apply_ia3(
    model: nn.Module,
    modules: Sequence[ModulePattern] = ("torch.nn.GELU",),
    example_input: Any = None,
    feature_dim: int | None = None,
) -> dict[str, IA3Scale]:
    """Freeze ``model`` and rescale each selected module's output by a ones-initialised vector.

    The width is the output width of a selected ``nn.Linear`` (or Hugging Face ``Conv1D``); for any other module it
    is read at its output from ``example_input`` (a Conv2d or Embedding changes the width), or for an activation from
    the preceding Linear (as in :func:`lightning_act.nn.dopamine.adapt_model`). ``feature_dim``: the output's dim
    that is scaled; by default the channels (dim 1) of a convolution's output and the last dim of any other (a
    ``Conv2d``'s last dim is the image width: scaled there, a grayscale conv learned one number per column).
    """
    chosen = select_modules(model, modules)
    refuse_attention_out_proj(model, chosen, "(IA)³")
    dims = {name: _scaled_dim(module, feature_dim) for name, module in chosen}
    widths: dict[str, int] = {}
    for dim in set(dims.values()):
        other = [n for n, m in chosen if linear_widths(m) is None and dims[n] == dim]
        widths |= infer_widths(model, other, example_input, dim, at="output") if other else {}
    freeze(model)
    device = device_of(model)
    wrapped: dict[str, IA3Scale] = {}
    for name, module in chosen:
        linear = linear_widths(module)  # a Linear's (or Hugging Face Conv1D's) output width
        width = linear[1] if linear is not None else widths[name]
        wrapped[name] = IA3Scale(module, width, feature_dim=dims[name]).to(device)
        replace_module(model, name, wrapped[name])
    return wrapped


def _scaled_dim(module: nn.Module, feature_dim: int | None) -> int:
    """The dim of ``module``'s output that (IA)³ scales: ``feature_dim`` if given, else a convolution's channels."""
    if feature_dim is not None:
        return feature_dim
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def count_trainable(model: nn.Module) -> int:
    """Number of scalar parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
