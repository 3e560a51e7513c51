"""Where to tap activations (module selection), in which layout, and the shared hooks that hand
them to the monitors."""

from lightning_act.capture.layout import SAMPLE_FIRST, Layout, module_layout, to_sample_first
from lightning_act.capture.registry import CaptureRegistry, Subscriber, capture_registry, first_tensor
from lightning_act.capture.selection import (
    PRESETS,
    ModuleSpec,
    Tap,
    clean_name,
    is_activation,
    module_chain,
    register_activation_class,
    select_taps,
    unmatched_specs,
)

__all__ = [
    "PRESETS",
    "SAMPLE_FIRST",
    "CaptureRegistry",
    "Layout",
    "ModuleSpec",
    "Subscriber",
    "Tap",
    "capture_registry",
    "clean_name",
    "first_tensor",
    "is_activation",
    "module_chain",
    "module_layout",
    "register_activation_class",
    "select_taps",
    "to_sample_first",
    "unmatched_specs",
]
