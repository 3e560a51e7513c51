"""Choose which modules of a model a monitor taps.

A *module spec* is one of:

- ``"@activations"``: every activation-function module (``nn.ReLU``, ``nn.GELU``, timm's activation
  layers, and the project's ``GroupRational``/``PMish``...); classes can be added with
  :func:`register_activation_class`;
- ``"@blocks"``: the repeated blocks of the model's main stack (e.g. a timm ViT's ``blocks.0`` …
  ``blocks.11``), i.e. the residual stream after each block;
- ``"@penultimate"``: the input of the classifier head (``model.get_classifier()`` for timm
  models, else the last ``nn.Linear``), i.e. the penultimate features;
- an ``nn.Module`` subclass, or its import path as a string (``"torch.nn.GELU"``), or a bare class
  name (``"GELU"``): every module of that class;
- any other string: a glob (``fnmatch``) on the qualified module name, e.g. ``"blocks.*.mlp.act"``.

A string spec may end in ``":input"`` to tap the module's first input instead of its output (the
activations entering a down-projection, for example).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from lightning_act.errors import ModuleSelectionError

ModuleSpec = Union[str, type]

_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.GLU, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.RReLU, nn.Threshold,
)
# Class names of activation layers in timm and in this project, matched by name so that
# selecting them never imports the libraries that define them.
_ACTIVATION_CLASS_NAMES: set[str] = {
    "GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU", "Mish", "HardSwish", "HardSigmoid", "HardMish",
    "Sigmoid", "Tanh", "PReLU", "ReLU", "ReLU6", "GroupRational", "PMish", "DopamineGate",
}
_extra_activation_classes: list[type[nn.Module]] = []

PRESETS = ("@activations", "@blocks", "@penultimate")


def register_activation_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``"@activations"`` include ``cls`` (usable as a class decorator)."""
    _extra_activation_classes.append(cls)
    return cls


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation-function layer."""
    return (
        isinstance(module, _TORCH_ACTIVATIONS + tuple(_extra_activation_classes))
        or type(module).__name__ in _ACTIVATION_CLASS_NAMES
    )


@dataclass(frozen=True)
class Tap:
    """One place activations are read: a module's output (or first input)."""

    name: str
    module: nn.Module
    point: Literal["output", "input"] = "output"


def _resolve_class(spec: str) -> type | None:
    if "." not in spec or any(c in spec for c in "*?[]"):
        return None
    module_path, _, attr = spec.rpartition(".")
    if not attr[:1].isupper():
        return None
    try:
        cls = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of the largest ModuleList/Sequential whose children all share one class."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) >= 2 and len({type(c) for _, c in children}) == 1 and len(children) > len(best):
            prefix = f"{name}." if name else ""
            best = [(prefix + child_name, child) for child_name, child in children]
    return best


def _penultimate(model: nn.Module) -> list[Tap]:
    head_owner = next((m for m in model.modules() if hasattr(m, "get_classifier")), None)
    if head_owner is not None:
        head = head_owner.get_classifier()
        for name, module in model.named_modules():
            if module is head and isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
                return [Tap("penultimate", module, "input")]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [Tap("penultimate", linears[-1][1], "input")] if linears else []


def _match_one(model: nn.Module, spec: ModuleSpec) -> list[Tap]:
    if isinstance(spec, type):
        return [Tap(n, m) for n, m in model.named_modules() if isinstance(m, spec)]
    if not isinstance(spec, str):
        raise ModuleSelectionError(
            f"module spec {spec!r} is neither a string nor a module class; use a name glob like "
            "'blocks.*.mlp.act', a class like 'torch.nn.GELU', or one of " + ", ".join(PRESETS)
        )
    point: Literal["output", "input"] = "output"
    if spec.endswith(":input"):
        spec, point = spec[: -len(":input")], "input"
    if spec == "@activations":
        taps = [Tap(n, m) for n, m in model.named_modules() if n and is_activation(m)]
    elif spec == "@blocks":
        taps = [Tap(n, m) for n, m in _repeated_blocks(model)]
    elif spec == "@penultimate":
        return _penultimate(model)
    elif spec.startswith("@"):
        raise ModuleSelectionError(f"unknown module preset {spec!r}; use one of {', '.join(PRESETS)}")
    elif (cls := _resolve_class(spec)) is not None:
        taps = [Tap(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
    elif spec.isidentifier() and spec[:1].isupper():
        taps = [Tap(n, m) for n, m in model.named_modules() if type(m).__name__ == spec]
    else:
        taps = [Tap(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, spec)]
    if point == "input":
        taps = [Tap(f"{t.name}:input", t.module, "input") for t in taps]
    return taps


def select_taps(model: nn.Module, specs: ModuleSpec | Sequence[ModuleSpec], owner: str = "monitor") -> list[Tap]:
    """Resolve ``specs`` on ``model`` into taps, in module order, without duplicates.

    Raises :class:`ModuleSelectionError` (one line, with the fix) when nothing matches.
    """
    if isinstance(specs, (str, type)):
        specs = [specs]
    taps: list[Tap] = []
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        for tap in _match_one(model, spec):
            if (tap.name, tap.point) not in seen:
                seen.add((tap.name, tap.point))
                taps.append(tap)
    if not taps:
        names = [n for n, _ in model.named_modules() if n]
        raise ModuleSelectionError(
            f"{owner}: modules={list(specs)!r} matched no module of {type(model).__name__}; "
            f"use name globs or classes that exist (e.g. {_examples(names, specs)}) or a preset "
            f"({', '.join(PRESETS)})"
        )
    return taps


def _examples(names: Sequence[str], specs: Sequence[ModuleSpec], limit: int = 5) -> str:
    """Module names closest to the string specs given, else the first few names."""
    if not names:
        return "the model has no submodules"
    queries = [s.replace("*", "0") for s in specs if isinstance(s, str)]
    close = [m for q in queries for m in difflib.get_close_matches(q, names, n=limit, cutoff=0.4)]
    shown = list(dict.fromkeys(close))[:limit] or list(names[:limit])
    return ", ".join(repr(n) for n in shown)
