"""A module's weights as its next forward uses them, read without changing the model (monitors read them: the
CETT of a down-projection, the parameter trajectory)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize, prune


@torch.no_grad()
def forward_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the module's next forward uses it, read without changing the model.

    Pruned (``torch.nn.utils.prune``): the pruning hook's ``weight_orig * weight_mask``, current after an optimizer
    step (the ``weight`` attribute is refreshed only by the next forward's pre-hook: it held the weights one update
    old). Parametrized (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm`` / ``spectral_norm``): the
    computed value, with the parametrizations' buffers restored after it: ``spectral_norm``'s power iteration, which
    runs in training mode at each read, would otherwise take a step the fit does not take (and change training).
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return hook.apply_mask(module)
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
