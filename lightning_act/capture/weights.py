"""A module's weights as its next forward uses them, read without changing the model (monitors read them: the
CETT of a down-projection, the parameter trajectory)."""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

#: The seed of a parametrization's read that draws random numbers even in eval mode: the same draw at every read.
READ_SEED = 0

#: The modules said once to have a parametrization that draws random numbers even in eval mode.
_drawing_said: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@torch.no_grad()
def forward_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the module's next forward uses it, read without changing the model.

    Pruned (``torch.nn.utils.prune``): the pruning hook's ``weight_orig * weight_mask``, current after an optimizer
    step (the ``weight`` attribute is refreshed only by the next forward's pre-hook: it held the weights one update
    old). Parametrized (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm`` / ``spectral_norm``): the
    computed value, with the parametrizations' buffers restored after it (their tensors re-bound too, where the
    parametrization replaced one, ``self.n = self.n + 1``): ``spectral_norm``'s power iteration, which runs in
    training mode at each read, would otherwise take a step the fit does not take (and change training). The read
    runs under a fork of torch's generators (CPU and the devices of the parametrization's tensors), of those the
    parametrization's modules hold (``torch.randn(..., generator=self.g)``) and of Python's ``random``, so it never
    takes the training's random draws. A parametrization that draws (weight noise, a DropConnect mask) has no weight
    the next forward uses: it is read in eval mode (the noiseless weight); one that draws in eval mode too is read
    seeded alike at every read (one fixed draw, said once), so successive reads differ only by training's updates.
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
        return _parametrized_value(module, name)
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _parametrized_value(module: nn.Module, name: str) -> torch.Tensor:
    """The parametrized ``module.<name>`` (see :func:`forward_tensor`), read under a fork of the generators."""
    parts = list(module.parametrizations[name].modules())
    held = _held_generators(parts)
    accelerators: dict[str, set[int]] = {}
    for tensor in [*module.parametrizations[name].parameters(), *module.parametrizations[name].buffers()]:
        if tensor.device.type not in ("cpu", "meta"):
            accelerators.setdefault(tensor.device.type, set()).add(tensor.device.index or 0)
    with contextlib.ExitStack() as forks:
        for device_type, indices in accelerators.items() or [("cpu", set())]:
            forks.enter_context(torch.random.fork_rng(devices=sorted(indices), device_type=device_type))
        before = _generator_states(accelerators, held)
        forks.callback(_put_back, held, before)  # the held generators and `random`; torch's are forked above
        with _buffers_kept(parts):
            value = getattr(module, name)
        if _same(before, _generator_states(accelerators, held)):
            return value
        training = [part for part in parts if part.training]
        try:
            for part in training:
                part.training = False
            _seed(accelerators, held)
            seeded = _generator_states(accelerators, held)
            with _buffers_kept(parts):
                value = getattr(module, name)
            if not _same(seeded, _generator_states(accelerators, held)) and module not in _drawing_said:
                _drawing_said.add(module)
                rank_zero_warn(
                    f"the parametrization of a {type(module).__name__}'s {name!r} draws random numbers in eval mode "
                    f"too: the monitors reading it (CETT, the parameter trajectory) read one fixed draw (seed "
                    f"{READ_SEED}, the same at every read), not the weight a forward uses; draw only in training mode "
                    "(`if self.training:`) to have them read the noiseless weight",
                    category=UserWarning,
                )
        finally:
            for part in training:
                part.training = True
        return value


def _held_generators(modules: list[nn.Module]) -> list[torch.Generator]:
    """The generators ``modules`` hold as attributes (``self.g = torch.Generator()``), each once. ``type() is``, not
    ``isinstance``: the latter runs Python code in ``torch.Generator``'s metaclass for every attribute."""
    held: dict[int, torch.Generator] = {}
    for module in modules:
        for value in vars(module).values():
            if type(value) is torch.Generator:
                held[id(value)] = value
    return list(held.values())


def _put_back(held: list[torch.Generator], states: _RandomStates) -> None:
    """The ``held`` generators and Python's ``random`` back to ``states``."""
    for generator, state in zip(held, states.held, strict=True):
        generator.set_state(state)
    random.setstate(states.python)


@contextlib.contextmanager
def _buffers_kept(modules: list[nn.Module]) -> Iterator[None]:
    """The buffers of ``modules`` as they were before, bound and valued, after what runs inside."""
    held = [(module, key, buffer, None if buffer is None else buffer.clone())
            for module in modules for key, buffer in module._buffers.items()]
    try:
        yield
    finally:
        for module, key, buffer, saved in held:
            module._buffers[key] = buffer
            if buffer is not None:
                buffer.copy_(saved)


class _RandomStates(NamedTuple):
    """The states of the random sources a parametrization may draw from (host tensors: reading them does not wait
    for the device)."""

    default: list[torch.Tensor]  # the CPU generator's and the default generators' of the parametrization's devices
    held: list[torch.Tensor]  # the generators the parametrization's modules hold
    python: tuple[object, ...]  # Python's ``random``


def _generator_states(accelerators: dict[str, set[int]], held: list[torch.Generator]) -> _RandomStates:
    default = [torch.get_rng_state()]
    for device_type, indices in accelerators.items():
        default += [torch.get_device_module(device_type).get_rng_state(index) for index in sorted(indices)]
    return _RandomStates(default, [generator.get_state() for generator in held], random.getstate())


def _same(states: _RandomStates, others: _RandomStates) -> bool:
    tensors = zip([*states.default, *states.held], [*others.default, *others.held])
    return all(torch.equal(state, other) for state, other in tensors) and states.python == others.python


def _seed(accelerators: dict[str, set[int]], held: list[torch.Generator]) -> None:
    """Seed the CPU generator, those of ``accelerators``' devices, the ``held`` ones and Python's ``random`` with
    :data:`READ_SEED` (inside the fork)."""
    torch.default_generator.manual_seed(READ_SEED)
    for device_type, indices in accelerators.items():
        device_module = torch.get_device_module(device_type)
        generators = getattr(device_module, "default_generators", None)
        for index in indices:
            if generators is None:  # one device per process (mps)
                device_module.manual_seed(READ_SEED)
            else:
                generators[index].manual_seed(READ_SEED)
    for generator in held:
        generator.manual_seed(READ_SEED)
    random.seed(READ_SEED)
