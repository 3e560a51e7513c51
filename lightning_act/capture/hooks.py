"""Forward hooks that hand activations to a sink, only while armed.

Hooks are attached only around the steps that are due and removed afterwards (and on teardown or
an exception), so between observations the model carries no hook at all and stays picklable and
deep-copyable. While attached, a hook forwards an activation only when the owner has *armed* it:
monitors arm at the start of a due training batch and disarm before the backward pass, so the
recomputed forward of activation checkpointing (which runs inside backward) is not counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lightning_act.capture.selection import Tap

Sink = Callable[[int, torch.Tensor], None]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The activation tensor in a module's output or inputs (first tensor of a tuple/list)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class ActivationHooks:
    """Forward hooks on a fixed list of taps, forwarding ``(tap_index, activation)`` to ``sink``.

    The sink runs under ``torch.no_grad`` on a detached tensor, so it can neither change the
    output nor join the autograd graph.
    """

    def __init__(self, taps: Sequence[Tap], sink: Sink) -> None:
        self.taps = list(taps)
        self.sink = sink
        self.armed = False
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        for index, tap in enumerate(self.taps):
            if tap.point == "input":
                handle = tap.module.register_forward_pre_hook(self._make_pre_hook(index))
            else:
                handle = tap.module.register_forward_hook(self._make_hook(index))
            self._handles.append(handle)

    def detach(self) -> None:
        self.armed = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward(self, index: int, value: Any) -> None:
        if not self.armed:
            return
        tensor = first_tensor(value)
        if tensor is None:
            return
        with torch.no_grad():
            self.sink(index, tensor.detach())

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._forward(index, output)

        return hook

    def _make_pre_hook(self, index: int) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            self._forward(index, args)

        return pre_hook
