"""KAT — Kolmogorov-Arnold Transformer (Yang & Wang 2024, arXiv 2409.10594) as timm models.

A KAT is a ViT whose MLP is a GR-KAN: in every pre-norm residual block the MLP becomes

    GroupRational(identity init, D) → fc1 (D → 4D) → GroupRational(swish or GELU init, 4D) → dropout → fc2

Everything else (patch embedding, attention, class token, heads, feature extraction, position
embedding resampling) is timm's ``VisionTransformer``; only the MLP layer is swapped in through its
``mlp_layer`` argument. ``timm.create_model("kat_tiny_patch16_224")`` works once this module is
imported (``import lightning_act`` does it).

Variance-preserving init (the paper's initialisation of GR-KAN): the rationals start as a fit of
identity / Swish / GELU, and a linear layer that reads a rational's output draws
``w ~ N(0, 1 / (d_in · E[F(x)²]))`` with ``E[F(x)²]`` for ``x ~ N(0, 1)`` from ``rational_gain``, so that an N(0, 1) input keeps unit variance
through the layer. (In torch's ``calculate_gain`` convention — which the public code uses — that is
``gain² / d_in`` with ``gain² = 1 / E[F(x)²]``.) The MLP re-applies this in its own ``init_weights``,
which timm's ``named_apply`` visits *after* the linear layers' default ``trunc_normal_(std=0.02)``,
so the ViT init cannot overwrite it (the bug of the public code).

Official checkpoints (Adamdad/kat, trained with ``KAT_Group`` from rational_kat_cu: one shared numerator)
load through timm's own loaders: ``timm.create_model("kat_tiny_patch16_224", checkpoint_path=path)`` and
``pretrained=True, pretrained_cfg_overlay=dict(file=path)`` (via :func:`checkpoint_filter_fn`); see
``docs/kat.md``. :func:`official_state_dict` writes that layout.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import (
    checkpoint_filter_fn as vit_checkpoint_filter_fn,
)
from torch import nn

from lightning_act.errors import LightningActError
from lightning_act.nn.group_rational import GroupRational, rational_gain

# timm's FX feature extraction (create_feature_extractor, features_only=True with feature_cls="fx") keeps each
# rational one graph node that runs its eager forward, with the Triton kernels where they apply
register_notrace_module(GroupRational)

__all__ = [
    "GRKANMlp",
    "KATVisionTransformer",
    "checkpoint_filter_fn",
    "classifier_names",
    "official_state_dict",
    "unwrap_state_dict",
]

ACT_INITS = ("swish", "gelu")
WEIGHT_INITS = ("", "jax", "jax_nlhb", "moco", "reset", "skip")  # timm VisionTransformer's weight_init values


class GRKANMlp(nn.Module):
    """GR-KAN layer of a KAT block: ``act1 → fc1 → act2 → drop1 → (norm) → fc2 → drop2``.

    Takes timm's ``Mlp`` constructor arguments so that ``VisionTransformer(mlp_layer=...)`` can build
    it; ``act_layer`` is accepted and ignored (the activations are the group rationals). Submodule
    names follow the official code (``act1``, ``fc1``, ``act2``, ``fc2``) so checkpoints map 1:1.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = None,
        norm_layer: Any = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        act_init: str = "swish",
        rational_groups: int = 8,
        rational_impl: str = "auto",
        rational_sharing: str = "per_group",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if act_init not in ACT_INITS:
            raise LightningActError(f"act_init='{act_init}' is not supported; use one of {ACT_INITS}")
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if rational_groups < 1 or in_features % rational_groups or hidden_features % rational_groups:
            # GroupRational's own message names its groups=, which timm.create_model("kat_*") does not take
            shared = math.gcd(in_features, hidden_features)
            fitting = max(d for d in range(1, max(rational_groups, 1) + 1) if shared % d == 0)
            raise LightningActError(
                f"KAT: the GR-KAN widths {in_features} (embed_dim) and {hidden_features} (MLP hidden) cannot be split "
                f"into rational_groups={rational_groups} equal groups; pass a rational_groups= that divides both, e.g. "
                f"rational_groups={fitting} (CLI: --model.model_kwargs '{{rational_groups: {fitting}}}')"
            )
        bias1, bias2 = bias if isinstance(bias, tuple) else (bias, bias)
        drop1, drop2 = drop if isinstance(drop, tuple) else (drop, drop)
        dd = {"device": device, "dtype": dtype}
        self.act_init = act_init
        rational = partial(GroupRational, groups=rational_groups, implementation=rational_impl, sharing=rational_sharing)
        # coefficients stay float32 (GroupRational computes in float32); only the device follows
        self.act1 = rational(in_features, init="identity").to(device=device)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **dd)
        self.act2 = rational(hidden_features, init=act_init).to(device=device)
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **dd)
        self.drop2 = nn.Dropout(drop2)
        self.init_weights()

    def init_weights(self) -> None:
        """The rationals' init coefficients, and a variance-preserving init of fc1 / fc2 from the second moment
        ``E[z²]`` of what each reads (Yang & Wang 2024): ``E[F(x)²]`` of its rational, or 1 for fc2 behind timm's
        ``scale_mlp_norm`` norm, whose output already has unit second moment."""
        self.act1.reset_parameters()
        self.act2.reset_parameters()
        fc2_input_moment = rational_gain(self.act_init) if isinstance(self.norm, nn.Identity) else 1.0
        for linear, input_moment in ((self.fc1, rational_gain("identity")), (self.fc2, fc2_input_moment)):
            std = math.sqrt(1.0 / (linear.in_features * input_moment))
            nn.init.normal_(linear.weight, mean=0.0, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.act1(x))
        x = self.norm(self.drop1(self.act2(x)))
        return self.drop2(self.fc2(x))


class KATVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with GR-KAN MLPs; only the weight-decay exclusions differ.

    ``rational_weight_decay=False`` (default) keeps AdamW's decay off the rational coefficients:
    decaying them shrinks the activation functions towards zero rather than regularising a
    weight. The official training decayed them (timm decays every >1-D tensor); pass ``True`` to
    reproduce that.
    """

    def __init__(self, *args: Any, rational_weight_decay: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rational_weight_decay = rational_weight_decay

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = set(super().no_weight_decay())
        if not self.rational_weight_decay:
            for module_name, module in self.named_modules():
                if isinstance(module, GroupRational):
                    names.update(f"{module_name}.{param_name}" for param_name, _ in module.named_parameters())
        return names


_RATIONAL_KEY = re.compile(r"^(blocks\.\d+\.mlp\.act[12])\.weight_(numerator|denominator)$")
# timm's load_state_dict(use_ema=True) order: a timm training checkpoint gives its EMA weights
CHECKPOINT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")


def unwrap_state_dict(checkpoint: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``model``'s tensors from a checkpoint as timm, Lightning, DDP or ``torch.compile`` write them.

    Takes the first of :data:`CHECKPOINT_WRAPPERS` the checkpoint holds, so the file and the in-memory forms of one
    checkpoint give the same (EMA) weights. Keeps a Lightning checkpoint's ``model.`` entries without that prefix
    (its ``ImageClassifier`` holds the timm model as ``model``; timm's file loader drops the
    ``pytorch-lightning_version`` marker, so ``model.`` entries count as Lightning's too when no key is ``model``'s
    own), and strips DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes as timm's ``clean_state_dict`` does.
    """
    from timm.models import clean_state_dict

    wrapper = next((key for key in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(key), dict)), None)
    state_dict = checkpoint[wrapper] if wrapper else checkpoint
    own = model.state_dict().keys()
    lightning = "pytorch-lightning_version" in checkpoint or own.isdisjoint(state_dict)
    if lightning and any(key.startswith("model.") for key in state_dict):
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    return clean_state_dict(state_dict)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of ``model``'s classifiers from its timm ``pretrained_cfg``, which names one (``"head"``) or
    several (a tuple: DeiT distilled ``("head", "head_dist")``, LeViT), as timm's ``load_pretrained`` reads it."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    return (names,) if isinstance(names, str) else tuple(names)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: KATVisionTransformer, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Map an official KAT checkpoint (or one of ours) onto ``model``'s state dict, as timm filters do.

    timm calls it for ``pretrained=True, pretrained_cfg_overlay=dict(file=...)`` (or ``state_dict=...``). Unwraps
    timm, Lightning, DDP and ``torch.compile`` checkpoints (:func:`unwrap_state_dict`), converts each block's
    ``mlp.act{1,2}.weight_numerator`` / ``weight_denominator`` to the model's sharing layout with
    ``GroupRational.coefficient_state`` (official ``KAT_Group``: one numerator (1, 6) for all groups, denominators
    (groups, 4), evaluated in the same absolute-value form over contiguous channel groups, so the function is
    carried over exactly), and hands the rest to timm's ViT filter (identical key names; it resamples patch and
    position embeddings for another image / patch size). ``checkpoint_path=`` loads skip filters; there
    ``GroupRational`` converts the layout itself when the state dict is loaded. A checkpoint holding none of the model's tensors outside the classifier
    is refused: timm loads non-strictly when the classifier differs, and would leave the model at its random init.
    """
    state_dict = unwrap_state_dict(state_dict, model)
    modules = dict(model.named_modules())
    rationals: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _RATIONAL_KEY.match(key)
        if match:
            rationals.setdefault(match.group(1), {})[match.group(2)] = value
        else:
            plain[key] = value
    out = vit_checkpoint_filter_fn(plain, model, **kwargs)
    for prefix, coeffs in rationals.items():
        if set(coeffs) != {"numerator", "denominator"} or prefix not in modules:
            raise LightningActError(
                f"official KAT checkpoint has an incomplete or unknown rational '{prefix}'; "
                "load it into the kat_* model of the same size"
            )
        for name, tensor in modules[prefix].coefficient_state(coeffs["numerator"], coeffs["denominator"]).items():
            out[f"{prefix}.{name}"] = tensor
    classifier_prefixes = tuple(f"{name}." for name in classifier_names(model))
    body = [key for key in model.state_dict() if not key.startswith(classifier_prefixes)]
    if body and not any(key in out for key in body):
        raise LightningActError(
            f"the checkpoint holds none of the model's tensors (e.g. '{body[0]}'; its keys look like "
            f"{sorted(state_dict)[:2]}); pass a KAT state dict, or a timm, Lightning or official KAT checkpoint"
        )
    return out


def official_state_dict(model: KATVisionTransformer) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the official KAT layout (Adamdad/kat ``KAT_Group``: one (1, 6) numerator per
    rational), e.g. to publish weights that the official code loads. Every rational's numerator must be equal
    across its groups (``rational_sharing="shared_numerator"`` guarantees it); denominators stay per group."""
    state = {}
    for key, value in model.state_dict().items():
        if _RATIONAL_KEY.match(key) and key.endswith("weight_numerator"):
            if not torch.equal(value, value[:1].expand_as(value)):
                raise LightningActError(
                    f"{key} differs between groups, which the official layout (one shared numerator) cannot hold; "
                    "train with rational_sharing='shared_numerator' to export official checkpoints"
                )
            value = value[:1]
        if _RATIONAL_KEY.match(key) and key.endswith("weight_denominator") and value.shape[0] == 1:
            groups = model.get_submodule(key.rsplit(".", 1)[0]).groups
            value = value.expand(groups, -1)
        state[key] = value.detach().clone()
    return state


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Model metadata for timm (no URL: nothing is ever downloaded)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2409.10594",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "kat_tiny_patch16_224": _cfg(),
        "kat_small_patch16_224": _cfg(),
        "kat_base_patch16_224": _cfg(),
        "kat_tiny_patch4_32": _cfg(input_size=(3, 32, 32), crop_pct=1.0, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3),
        "kat_micro_patch4_32": _cfg(input_size=(3, 32, 32), crop_pct=1.0, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3),
    }
)


def _local_pretrained_weights(kwargs: dict[str, Any]) -> bool:
    """Whether timm's ``pretrained_cfg`` / ``pretrained_cfg_overlay`` name local weights: an in-memory
    ``state_dict`` or a ``file``, the sources timm loads without a download (unless ``source="hf-hub"``)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")

    def field(name: str) -> Any:
        return overlay.get(name) or (cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None))

    return field("source") != "hf-hub" and bool(field("state_dict") or field("file"))


def _create_kat(variant: str, pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """Build a KAT through timm's builder.

    Extra keyword arguments configure the MLPs: ``act_init`` ("swish", the official default, or
    "gelu"), ``rational_groups`` (8), ``rational_impl`` ("auto") and ``rational_sharing``
    ("per_group"; "shared_numerator" is the released code's layout, "shared_denominator" the
    paper's description). ``rational_weight_decay`` is passed to :class:`KATVisionTransformer`.
    """
    weight_init = kwargs.get("weight_init", "")
    if weight_init not in WEIGHT_INITS:  # else timm's bare AssertionError (the official factories pass "kan_mimetic")
        raise LightningActError(
            f"{variant}: weight_init={weight_init!r} is not implemented (the official mimetic init is not reproduced, "
            f"see docs/kat.md); pass one of timm's {WEIGHT_INITS} or leave it unset"
        )
    if pretrained and not _local_pretrained_weights(kwargs):
        raise LightningActError(
            f"{variant}: no weights are downloaded; pass pretrained_cfg_overlay=dict(file='kat.pth') (or "
            "state_dict=...) with pretrained=True, or checkpoint_path='kat.pth' (see docs/kat.md)"
        )
    mlp_layer = partial(
        GRKANMlp,
        act_init=kwargs.pop("act_init", "swish"),
        rational_groups=kwargs.pop("rational_groups", 8),
        rational_impl=kwargs.pop("rational_impl", "auto"),
        rational_sharing=kwargs.pop("rational_sharing", "per_group"),
    )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        KATVisionTransformer,
        variant,
        pretrained=pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        mlp_layer=mlp_layer,
        **kwargs,
    )


@register_model
def kat_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """KAT-T/16 (5.7M parameters, 74.6% ImageNet top-1 in the paper)."""
    args = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    return _create_kat("kat_tiny_patch16_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def kat_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """KAT-S/16 (22.1M parameters, 81.2% ImageNet top-1 in the paper)."""
    args = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
    return _create_kat("kat_small_patch16_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def kat_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """KAT-B/16 (86.6M parameters, 82.3% ImageNet top-1 in the paper)."""
    args = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    return _create_kat("kat_base_patch16_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def kat_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """KAT-T width on 32 × 32 images (CIFAR): patch 4 → 8 × 8 tokens, 192 dim, 12 blocks."""
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3, "num_classes": 10}
    return _create_kat("kat_tiny_patch4_32", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def kat_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> KATVisionTransformer:
    """A KAT small enough to train on a laptop CPU in minutes: 32 × 32 input, patch 4, 96 dim, 4 blocks."""
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "num_classes": 10}
    return _create_kat("kat_micro_patch4_32", pretrained=pretrained, **dict(args, **kwargs))
