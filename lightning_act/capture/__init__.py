"""Where to tap activations (module selection) and when (hooks armed only on due steps)."""

from lightning_act.capture.hooks import ActivationHooks, first_tensor
from lightning_act.capture.selection import PRESETS, ModuleSpec, Tap, is_activation, register_activation_class, select_taps

__all__ = [
    "PRESETS",
    "ActivationHooks",
    "ModuleSpec",
    "Tap",
    "first_tensor",
    "is_activation",
    "register_activation_class",
    "select_taps",
]
