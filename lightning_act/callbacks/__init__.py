"""Lightning callbacks that watch activations: ``Trainer(callbacks=[ActivationSparsity()])``.

The monitor classes are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActivationMonitor": "lightning_act.callbacks.base",
    "Partials": "lightning_act.callbacks.base",
    "ActivationStats": "lightning_act.callbacks.activation_stats",
    "ActivationSparsity": "lightning_act.callbacks.sparsity",
    "MassiveActivations": "lightning_act.callbacks.massive",
    "DimensionalCollapse": "lightning_act.callbacks.collapse",
    "SensitiveNeurons": "lightning_act.callbacks.sensitive",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_act.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
