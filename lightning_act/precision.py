"""Autocast switched off, for computations whose precision must not follow the training step's."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off for ``device_type``; nothing where autocast does not exist (``torch.autocast("meta")``
    raises, and a meta-device forward, e.g. Lightning's ``measure_flops``, must run)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
