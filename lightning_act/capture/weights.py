"""A module's weights as its next forward uses them, read without changing the model (monitors read them: the
CETT of a down-projection, the parameter trajectory)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


@torch.no_grad()
def forward_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the module's next forward uses it, read without changing the model.

    Pruned (``torch.nn.utils.prune``): the pruning hook's ``weight_orig * weight_mask``, current after an optimizer
    step (the ``weight`` attribute is refreshed only by the next forward's pre-hook: it held the weights one update
    old). Parametrized (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm`` / ``spectral_norm``): the
    computed value, with the parametrizations' buffers restored after it: ``spectral_norm``'s power iteration, which
    runs in training mode at each read, would otherwise take a step the fit does not take (and change training).
    The hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm``: the computed ``g v / ||v||`` and
    ``weight_orig / σ`` (the ``weight`` attribute, set by the last forward's pre-hook, is one update old), σ from the
    current ``weight_u``/``weight_v`` with no power iteration, so no buffer changes (a training forward takes one
    iteration step first, which moves σ slightly).
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return hook.apply_mask(module)
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return hook.compute_weight(module, do_power_iteration=False)
    if parametrize.is_parametrized(module, name):
        buffers = [(b, b.clone()) for b in module.parametrizations[name].buffers()]
        try:
            value = getattr(module, name)
        finally:
            for buffer, saved in buffers:
                buffer.copy_(saved)
        return value
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None
