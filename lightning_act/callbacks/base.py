"""The monitor base class: scheduling, per-rank buffers, one packed reduction, logging, state.

A monitor taps modules (see :mod:`lightning_act.capture`): at ``setup`` it subscribes its taps to
the model's shared :class:`~lightning_act.capture.CaptureRegistry` (one hook per tapped module,
kept for the whole fit, so ``torch.compile`` sees it), and on each *due* step
(``step % every_n_steps == 0``) it

1. arms itself for the forward passes of that step: all micro-batches under gradient
   accumulation (disarmed before backward, so the recompute of activation checkpointing is not
   counted twice); under manual optimization every forward of the training batch, whatever the
   number of optimizers and backward calls;
2. turns each activation into fixed-size *partials* on the activation's device (no host sync):
   ``sums`` (added up), ``maxima`` (max-reduced) and optional ``samples`` (merged by the
   subclass, e.g. a top-k, then gathered across ranks);
3. reduces the packed buffers across data-parallel ranks with one collective per kind, lets the
   subclass derive its statistics and moves them to the host in one transfer; then, at the end of
   the step, logs them to every logger of the Trainer as ``<prefix>/<module>/<stat>`` at that
   step, puts them into ``trainer.callback_metrics`` (so ``EarlyStopping`` and
   ``ModelCheckpoint(monitor=...)`` can use them) and appends them to bounded histories.

   When the step's forward is complete before its backward (automatic optimization without
   gradient accumulation, the training forward observed), step 3's reduction and transfer start
   in ``on_before_backward``: on a GPU the transfer is asynchronous (pinned memory and an event),
   so at the end of the step the host waits only for the statistics, which the device computed
   before the backward, and not for the backward and optimizer step. A host read at the end of
   the step would wait for the whole step, leaving the device idle while the host runs the rest
   of the step's hooks and starts the next step. Otherwise (gradient accumulation, manual
   optimization, a probing monitor) it all runs at the end of the step, as one transfer there.

*A step* is an optimizer step (``trainer.global_step``) under automatic optimization, and one
training batch under manual optimization (Lightning's ``global_step`` there counts every
``optimizer.step()``, so a GAN with two optimizers would advance it by two per batch); the logging
step is the same number Lightning's own ``self.log`` uses in each case.

Subclasses implement :meth:`partials` and :meth:`summarize` (pure math lives in
:mod:`lightning_act.stats`).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import logging
import math
import numbers
import pickle
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_act.callbacks.history import BoundedSeries
from lightning_act.capture import (
    CaptureRegistry,
    Layout,
    ModuleSpec,
    Tap,
    capture_registry,
    module_chain,
    module_layout,
    select_taps,
    unmatched_specs,
)
from lightning_act.capture.layout import declared_batch_first
from lightning_act.capture.selection import (
    INPUT_TAP_SUFFIX,
    ModuleRead,
    copies_only_optimizers_tell,
    module_at,
    module_reads,
    reads_unchanged,
    resolve_class,
    saved_copy_original,
)
from lightning_act.errors import LightningActError, ModuleSelectionError
from lightning_act.lightning_classes import lightning_classes
from lightning_act.stats.fused import FusedSpec, FusedStats, release_cpu_scratch
from lightning_act.stats import all_gather_packed, all_reduce_packed, distributed_world_size

log = logging.getLogger(__name__)


def check_int(owner: str, name: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low``, else a one-line :class:`LightningActError` naming the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise LightningActError(f"{owner}: {name}={value!r} must be a whole number >= {low}")
    return int(value)


def check_number(owner: str, name: str, value: Any, low: float = 0.0) -> float:
    """``value`` as a finite float >= ``low``, else a one-line :class:`LightningActError` (an infinite threshold
    would reach the statistics kernels, which compare in float32, only at the first due step)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value >= low and math.isfinite(value)):
        raise LightningActError(f"{owner}: {name}={value!r} must be a finite number >= {low:g}")
    return float(value)


def check_dim(owner: str, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LightningActError(f"{owner}: {name}={value!r} must be an integer axis (e.g. 1) or None")
    return int(value)


def check_axes(owner: str, batch_dim: Any, token_dim: Any) -> tuple[int | None, int | None]:
    """``batch_dim`` and ``token_dim`` as axes that differ (``token_dim`` alone means ``batch_dim=0``)."""
    batch, token = check_dim(owner, "batch_dim", batch_dim), check_dim(owner, "token_dim", token_dim)
    if token is not None and token == (0 if batch is None else batch):
        raise LightningActError(
            f"{owner}: batch_dim={batch} and token_dim={token} name the same axis; pass two different axes "
            "(token_dim alone means batch_dim=0)"
        )
    return batch, token


def module_list(
    modules: ModuleSpec | Sequence[ModuleSpec] | None, default: Sequence[str], owner: str = "lightning_act"
) -> list[ModuleSpec]:
    """``modules`` as a list of specs (``default`` for None); anything else is one line at construction, not
    "'int' object is not iterable" there or a refusal at fit start."""
    if modules is None:
        return list(default)
    if isinstance(modules, (str, type)):
        return [modules]
    specs = list(modules) if isinstance(modules, Iterable) else None
    if specs is None or not all(isinstance(spec, (str, type)) for spec in specs):
        raise LightningActError(
            f"{owner}: modules={modules!r} must be a module spec or a list of them: a name glob like "
            "'blocks.*.mlp.act', a class like torch.nn.GELU or 'torch.nn.GELU', or a preset like '@activations'"
        )
    return specs


def _warn_once_per_tap(tap_name: str, warned: set[str], message: str) -> None:
    if tap_name not in warned:
        warned.add(tap_name)
        rank_zero_warn(message, category=UserWarning)


#: An additive float ``attention_mask`` (0 where attended, added to the attention scores) masks a position with a value
#: at or below this (its softmax weight is 0): Hugging Face's older models added ``-10000.0`` (-9984 in bfloat16), newer
#: ones the dtype's minimum, others ``-1e9`` or ``-inf``.
ADDITIVE_MASK_MASKED = -1e3


def padding_in_mask(mask: torch.Tensor) -> torch.Tensor:
    """Whether a batch's ``(batch, tokens)`` ``attention_mask`` (Hugging Face's convention: 1 or True where a token is,
    0 or False at a pad) masks a position, as a bool tensor on the mask's device (no host sync). A float mask holding
    only 0 and 1 (at least one 1) is such a mask; any other float mask is additive (0.0 where attended, very negative
    at pads), whose padding is at values <= :data:`ADDITIVE_MASK_MASKED`: read as 1/0, an additive mask without
    padding (all 0.0) was said to be padded everywhere. PyTorch's ``key_padding_mask`` (True at pads) is another key
    and not read. A mask of more axes (``(B, 1, T, T)``) may hold a causal pattern, which is no padding: not read."""
    if mask.ndim != 2:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    if mask.dtype == torch.bool:
        return (~mask).any()
    if not mask.is_floating_point():
        return (mask == 0).any()
    keep_mask = ((mask == 0) | (mask == 1)).all() & (mask == 1).any()
    return torch.where(keep_mask, (mask == 0).any(), (mask <= ADDITIVE_MASK_MASKED).any())


def holds_padding(batch: Any) -> bool:
    """Whether ``batch`` is a dict (or Hugging Face's ``BatchEncoding``) whose ``attention_mask`` masks a position
    (:func:`padding_in_mask`): the rule of the training batches' check, for batches a monitor reads itself (probes)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return isinstance(mask, torch.Tensor) and bool(padding_in_mask(mask))


def warn_padding_once(owner: Any, warned: set[str], which: str) -> None:
    """Say once per run that ``which`` batches (``"the training batch at step 3"``) hold padding. Each rank checks
    its own batches, so the rank that sees the padding says it, naming itself: padding on rank 1 alone (length-bucketed
    or unevenly sharded data) was said by no rank."""
    if "attention_mask" in warned:
        return
    warned.add("attention_mask")
    rank = f" of rank {torch.distributed.get_rank()}" if distributed_world_size() > 1 else ""
    warnings.warn(
        f"{type(owner).__name__}: {which}{rank} holds padding (its attention_mask masks positions): the activations "
        "at the padding positions enter the statistics like real tokens' (no monitor excludes them); pack the "
        "sequences without padding, or train on batches of equal-length sequences, for statistics of real tokens only",
        UserWarning,
        stacklevel=2,
    )


def warn_features_unknown(owner: Any, tap_name: str, shape: tuple[int, ...], warned: set[str]) -> None:
    """The one warning of :meth:`ActivationMonitor.features_unknown` (SensitiveNeurons' too)."""
    _warn_once_per_tap(
        tap_name, warned,
        f"{type(owner).__name__}: nothing in the model tells which axis of {tap_name}'s {shape} activations holds "
        "the features, so they are read as (batch, channels, *spatial); pass feature_dim=-1 if they are channels-last "
        "(batch, *spatial, channels), or feature_dim=1 to confirm",
    )


def warn_unbatched(owner: Any, tap_name: str, shape: tuple[int, ...], warned: set[str]) -> None:
    """The one warning of :meth:`ActivationMonitor.activations_unbatched` (SensitiveNeurons' too): a 0-d activation
    (a scalar, such as a loss the tapped module returns alone) or an unbatched call."""
    if not shape:
        problem = (
            "a 0-d activation (a scalar, e.g. a loss: no sample axis); nothing is logged for it (tap a module whose "
            "output has a batch axis, e.g. '@blocks')"
        )
    else:
        problem = (
            f"a {shape} activation whose axis 0 alone has the width of its layers: a call on one example without a "
            "batch axis (a convolution's unbatched (channels, ...) input); nothing is logged for such calls (call the "
            "model on a batch, e.g. x.unsqueeze(0))"
        )
    _warn_once_per_tap(tap_name, warned, f"{type(owner).__name__}: {tap_name} gave {problem}")


def empty_cause(shape: tuple[int, ...]) -> str:
    """What an activation of ``shape`` with 0 entries means, for the line of a tap that gave only such ones."""
    return f"e.g. {shape}: 0 entries, as an expert no row was routed to or a sequence of length 0"


def training_step_index(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """The monitors' step: ``global_step`` (optimizer steps), or training batches under manual optimization."""
    if pl_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def check_feature_dim(owner: str, value: Any) -> int | None:
    value = check_dim(owner, "feature_dim", value)
    if value not in (None, 1, -1):
        raise LightningActError(
            f"{owner}: feature_dim={value} must be 1 (channels first, (B, C, H, W)), -1 (channels last, (B, H, W, C)) "
            "or None to infer it from the tapped layers"
        )
    return value


def declared_layout(
    batch_dim: int | None, token_dim: int | None, feature_dim: int | None = None, reads_features: bool = False
) -> Layout:
    """What a monitor's ``batch_dim``/``token_dim``/``feature_dim`` arguments declare (``None`` parts are inferred
    per tap, :func:`tap_layout`), and whether its statistics depend on the feature axis."""
    batch = None if batch_dim is None and token_dim is None else (0 if batch_dim is None else batch_dim)
    return Layout(batch, token_dim, reads_features, feature_dim)


def tap_layout(declared: Layout, inferred: Layout) -> Layout:
    """A tap's layout: the declared sample and token axes when given, else the inferred ones; for a monitor that
    reads features, the declared ``feature_dim`` next to the inferred features."""
    if declared.batch_dim is not None:
        inferred = replace(inferred, batch_dim=declared.batch_dim, token_dim=declared.token_dim)
    if not declared.reads_features:
        return replace(inferred, features=None)
    return replace(inferred, reads_features=True, feature_dim=declared.feature_dim)


def unmonitored_strategy(trainer: Any) -> str | None:
    """Why no monitor may measure under ``trainer``'s strategy (the warning's words), or None.

    - Lightning's ``FSDPStrategy`` (FSDP1): on an H100 (2026-11-26) tests/test_capture_fsdp.py logged values that
      differ from the single-device run of the same seed; until the cause is found, nothing rather than numbers
      nobody has verified. (FSDP2, ``ModelParallelStrategy`` with ``fully_shard`` and no tensor parallelism, is
      data parallel with whole activations per rank: the monitors run there, checked equal to DDP on CPU.)
    - Tensor parallelism (``ModelParallelStrategy`` with a ``tensor_parallel`` mesh dimension of more than one
      rank): the ranks of a tensor-parallel group hold the same batch, so a reduction over them counts each example
      once per rank, and a layer's activations may be split across them by features (``ColwiseParallel``'s local
      output), which nothing in the tensors tells; reducing over the data-parallel group alone would log one rank's
      slice of the features as the layer's.
    """
    if trainer is None:
        return None
    strategy = trainer.strategy
    if isinstance(strategy, lightning_classes("strategies.FSDPStrategy")):
        return ("activation monitors are not verified under FSDP (their values differed from a single-device run); "
                "use strategy='ddp', or FSDP2 (ModelParallelStrategy with fully_shard), to monitor activations")
    if isinstance(strategy, lightning_classes("strategies.ModelParallelStrategy")):
        mesh = strategy.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            return ("activation monitors do not support tensor parallelism (its ranks hold the same batch, and a "
                    "layer's features may be split across them); use tensor_parallel_size=1 (FSDP2 or DDP) to "
                    "monitor activations")
    return None


def subscribe_taps(
    subscriber: Any,
    pl_module: nn.Module,
    specs: Sequence[ModuleSpec],
    defaults: bool,
    layout: Layout,
) -> tuple[list[Tap], list[Layout], CaptureRegistry]:
    """Select ``specs`` on ``pl_module`` and subscribe ``subscriber`` to them in the shared registry.

    A default spec list that matches nothing warns once (naming the fix) and yields no taps; a user's empty list
    (``modules=[]``) yields none for a monitor that ``logs_without_taps`` (``DimensionalCollapse``'s weight trajectory)
    and raises (one line) for the others; a user's spec list that matches nothing raises (one line); a part of a
    user's list, or of the default list (a timm ResNet whose stages hold one block each has no ``@blocks``), that
    matches nothing warns. The layout of each tap is what ``layout`` declares, the rest inferred from its owners'
    ``batch_first`` and its layers (:func:`~lightning_act.capture.layout.module_layout`); a tap of undeclared layout
    in a model with sequence-first modules warns at its first activation of 3 or more axes
    (:func:`undeclared_layout_warning`).
    """
    owner = type(subscriber).__name__
    registry = capture_registry(pl_module)
    trainer = getattr(pl_module, "_trainer", None)
    unmonitored = unmonitored_strategy(trainer)
    if unmonitored is not None:
        rank_zero_warn(f"{owner}: {unmonitored}, so this monitor stays idle", category=UserWarning)
        return [], [], registry
    if not specs and not defaults:  # modules=[]: no activation taps, for a monitor that logs something without them
        if not getattr(subscriber, "logs_without_taps", lambda: False)():
            raise ModuleSelectionError(
                f"{owner}: modules=[] taps no module, and {owner} logs nothing without taps; pass the modules to "
                "measure (name globs, classes or presets such as '@blocks')"
            )
        return [], [], registry
    try:
        taps = select_taps(pl_module, specs, owner=owner, optimized=optimized_parameters(pl_module))
    except ModuleSelectionError as error:
        if not defaults:
            raise
        # A monitor that logs without taps (DimensionalCollapse's weight trajectory) is not idle: say what it logs.
        if getattr(subscriber, "logs_without_taps", lambda: False)():
            consequence = "so it taps no activation" + (
                f" and logs only its weight trajectory's {subscriber.prefix}/params/r90"
                if subscriber.follows_weights(pl_module) else "")
        else:
            consequence = "so it stays idle"
        rank_zero_warn(
            f"{owner}: its default modules {list(specs)} match nothing in {type(pl_module).__name__}, {consequence}; "
            "pass modules=[...] (functional activations such as F.gelu inside forward are reached through "
            "the next layer's input, e.g. modules=['*.fc2:input']; an activation module of your own joins "
            f"'@activations' by lightning_act.capture.register_activation_class(cls)). ({error})",
            category=UserWarning,
        )
        return [], [], registry
    missing = unmatched_specs(pl_module, specs)
    if missing:
        which = "its default modules" if defaults else "modules"
        rank_zero_warn(
            f"{owner}: {which} {missing} match nothing in {type(pl_module).__name__}; only the other specs are tapped"
            + (" (pass modules=[...] to choose)" if defaults else ""),
            category=UserWarning,
        )
    layouts = [tap_layout(layout, module_layout(module_chain(pl_module, tap.module), tap.point)) for tap in taps]
    refuse_shared_keys(subscriber, trainer, taps)
    registry.subscribe(subscriber, taps, layouts, undeclared_layout_warning(owner, pl_module, layout))
    return taps, layouts, registry


def undeclared_layout_warning(
    owner: str, pl_module: nn.Module, declared: Layout
) -> Callable[[str, tuple[int, ...]], None] | None:
    """The warning for a tap whose layout no owner declares, in a model with sequence-first modules, where the
    monitor declares none either (``batch_dim``); the registry gives it at the tap's first activation of 3 or more
    axes. At setup, before any shape was known, it named the 2-D ``(B, D)`` taps too (a sequence-first LSTM's
    ``@penultimate`` on ``h_n[-1]``), which are read the same in either order."""
    if declared.batch_dim is not None or not any(declared_batch_first(m) is False for m in pl_module.modules()):
        return None

    def warn(tap_name: str, shape: tuple[int, ...]) -> None:
        rank_zero_warn(
            f"{owner}: the model has sequence-first (batch_first=False) modules, but the layout of {tap_name}'s "
            f"{shape} activations is not declared by any owner; they are read as (batch, tokens, features), as are "
            "the monitor's other such taps of 3 or more axes. Pass batch_dim=1 and token_dim=0 if they are (tokens, "
            "batch, features) (2-D (batch, features) taps are read as they are)",
            category=UserWarning,
        )

    return warn


def refuse_shared_keys(subscriber: Any, trainer: Any, taps: list[Tap]) -> None:
    """One line when another callback of the Trainer with ``subscriber``'s key prefix taps one of ``taps``: both would
    log their own values under the same ``<prefix>/<module>/<stat>`` keys, one after the other at the same step."""
    if trainer is None:
        return
    names = {tap.name for tap in taps}
    for other in trainer.callbacks:
        shared = sorted(names & {tap.name for tap in getattr(other, "taps", [])})
        if other is not subscriber and getattr(other, "prefix", None) == subscriber.prefix and shared:
            raise LightningActError(
                f"two {type(subscriber).__name__} monitors tap {shared[:3]}, and both would log under the same "
                f"'{subscriber.prefix}/<module>/...' keys; keep one {type(subscriber).__name__} and give it all the "
                "modules (modules=[...]), or give the other a subclass with its own class attribute prefix"
            )


#: The name of the statistic by which :meth:`ActivationMonitor.summarize` says whether a tap's step was measurable.
#: Statistics whose names start with ``_`` are not logged: they reach :meth:`ActivationMonitor._warn_unmeasured`.
MEASURED = "_measured"


def _as_scalar(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d float64 tensor; the statistics mostly are one already, and then no op is dispatched."""
    if value.dim() == 0 and value.dtype == torch.float64:
        return value
    return value.reshape(()).to(torch.float64)


@dataclass
class StagedStatistics:
    """A due step's statistics between their reduction and their logging: what each value of the one host
    transfer is (``names``: ``(tap index or None, statistic)``, followed by the observation counts of the taps in
    ``present`` when several ranks counted them, else ``observed`` holds the taps this rank observed), and the
    transfer itself, either done (``values``) or under way into pinned host memory (``pinned``, complete once
    ``ready`` has been reached on the device)."""

    step: int
    names: list[tuple[int | None, str]]
    present: list[int]
    observed: set[int] | None
    values: list[float] | None = None
    pinned: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None

    def host_values(self) -> list[float]:
        if self.values is None and self.pinned is not None:
            assert self.ready is not None
            self.ready.synchronize()  # waits for the statistics' own kernels only, not for the work after them
            self.values = self.pinned.tolist()
        return self.values or []


def start_host_transfer(packed: torch.Tensor | None) -> dict[str, Any]:
    """The fields of :class:`StagedStatistics` that carry ``packed`` to the host: on a CUDA device an asynchronous
    copy into pinned memory and an event after it (no host sync), elsewhere the values themselves."""
    if packed is None:
        return {"values": []}
    if packed.device.type != "cuda":
        return {"values": packed.tolist()}
    pinned = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    pinned.copy_(packed, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(packed.device))
    return {"pinned": pinned, "ready": ready}


@dataclass
class Partials:
    """Fixed-size per-tap statistics of one activation tensor (float64, on its device)."""

    sums: torch.Tensor
    maxima: torch.Tensor | None = None
    samples: torch.Tensor | None = None


#: Name prefixes of the checkpoints Lightning's tuner writes and restores around its trials.
TUNER_CHECKPOINTS = (".lr_find_", ".scale_batch_size_")


def spelling_free_modules(modules: Sequence[ModuleSpec]) -> list[str]:
    """A monitor's module specs as its checkpoint state key holds them, whatever their spelling: sorted, once each,
    an input tap's ``-input`` as ``:input``, a class (``nn.ReLU``, ``"torch.nn.ReLU"``) by its name. The same taps
    written another way in a resumed fit's YAML lost the monitor's state silently (Lightning warns of no state it
    cannot match)."""
    canonical = set()
    for spec in modules:
        if isinstance(spec, type):
            canonical.add(spec.__name__)
            continue
        text, suffix = str(spec), ""
        for end in (":input", INPUT_TAP_SUFFIX):
            if text.endswith(end):
                text, suffix = text[: -len(end)], ":input"
        cls = resolve_class(text)
        canonical.add((cls.__name__ if cls is not None else text) + suffix)
    return sorted(canonical)


def _class_spec_name(spec: ModuleSpec) -> str | None:
    """The class name a module spec selects by (``nn.ReLU``, ``"torch.nn.ReLU"``, ``"ReLU"``), else None (a module
    name, a glob, a preset)."""
    if isinstance(spec, type):
        return spec.__name__
    text = str(spec).removesuffix(":input").removesuffix(INPUT_TAP_SUFFIX)
    cls = resolve_class(text)
    if cls is not None:
        return cls.__name__
    return text if text[:1].isupper() and text.isidentifier() else None


def held_spelling_free_modules(held: Sequence[Any], classes: set[str]) -> list[str]:
    """A checkpoint key's module specs as :func:`spelling_free_modules` writes them, without importing what they name
    (a checkpoint's keys must not import code, and a spec like ``".Foo"`` made the import raise and the resume crash):
    a class path (``"torch.nn.ReLU"``, ``"<class 'torch.nn.ReLU'>"``) counts as its class name where that name is one
    of ``classes``, the classes this monitor's own specs name (a module name's last part, ``blocks.0.act`` beside a
    monitor of the module ``act``, is no class: taken for one, another module's state was restored)."""
    canonical = set()
    for spec in held:
        text, suffix = str(spec), ""
        for end in (":input", INPUT_TAP_SUFFIX):
            if text.endswith(end):
                text, suffix = text[: -len(end)], ":input"
        class_repr = re.fullmatch(r"<class '(.+)'>", text)
        text = class_repr.group(1) if class_repr else text
        class_name = text.rpartition(".")[2] + suffix
        canonical.add(class_name if "." in text and class_name in classes else text + suffix)
    return sorted(canonical)


def optimized_parameters(pl_module: torch.nn.Module) -> set[int] | None:
    """Ids of the model's parameters that the fit's optimizers hold; None where they hold none of them (no optimizer
    yet, at setup, one the model makes later, or ``configure_optimizers`` returned None: Lightning's mock one)."""
    trainer = getattr(pl_module, "_trainer", None)
    held = {id(p) for optimizer in ([] if trainer is None else trainer.optimizers)
            for group in optimizer.param_groups for p in group.get("params", [])}
    return held & {id(p) for p in pl_module.parameters()} or None


def chooses_at_fit_start(pl_module: torch.nn.Module, specs: Sequence[ModuleSpec]) -> bool:
    """Whether a monitor of ``specs`` chooses its taps at fit start rather than in its ``setup``: the model builds
    layers late (:func:`builds_layers_late`), or ``"@penultimate"``'s head is the trained copy's of two that require
    grad (a DQN target network beside its Q-network), which only the optimizers tell, made after the callbacks'
    ``setup`` (:func:`~lightning_act.capture.selection.copies_only_optimizers_tell`; before round 30 the target's head
    was taken)."""
    return builds_layers_late(pl_module) or (
        "@penultimate" in [spec for spec in specs if isinstance(spec, str)] and copies_only_optimizers_tell(pl_module)
    )


def builds_layers_late(pl_module: torch.nn.Module) -> bool:
    """Whether the LightningModule may build layers after the callbacks' ``setup``: Lightning calls
    ``Callback.setup``, then ``LightningModule.setup``, then ``configure_model`` (its hook for layers built in the
    strategy's and precision's context), so a monitor choosing modules in its own ``setup`` found none of those
    layers (idle, or "matched no module" for explicit ones). Such a monitor chooses them at fit start instead."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    base = next((c for c in lightning_classes("LightningModule") if isinstance(pl_module, c)), None)
    return base is not None and any(is_overridden(hook, pl_module, base) for hook in ("setup", "configure_model"))


def _plain(value: Any) -> Any:
    """A setting as a checkpoint keeps it and compares it: Python numbers (a numpy or torch scalar would make the
    checkpoint refuse a ``weights_only`` load, which Lightning's resume uses), tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # a numpy or torch scalar
        return value.item()
    return value


def monitor_fingerprint(monitor: Any) -> dict[str, Any]:
    """What must be the same on every rank for ``monitor``'s collectives to pair up and its sums to mean one thing:
    its class, modules (and taps, once chosen), schedule and the settings that change a statistic's meaning."""
    fingerprint: dict[str, Any] = {"monitor": type(monitor).__name__}
    if hasattr(monitor, "modules"):
        fingerprint["modules"] = spelling_free_modules(monitor.modules)
    if not monitor._setup_waits:  # chosen at setup; a monitor that waits chooses its taps later in fit start
        fingerprint["taps"] = [tap.name for tap in getattr(monitor, "taps", [])]
    if hasattr(monitor, "every_n_steps"):
        fingerprint["every_n_steps"] = monitor.every_n_steps
    return {**fingerprint, **monitor._settings()}


#: Seconds a rank waits for the other ranks' monitor fingerprints at fit start (:func:`refuse_rank_dependent_monitors`).
FINGERPRINT_TIMEOUT_S = 300.0  # ranks start their fits within seconds; a slow rank must not fail a sound fit
_fingerprint_exchanges = 0  # this process's exchanges so far: the same on every rank, so it names one fit's keys


def _exchange_fingerprints(mine: list[dict[str, Any]]) -> list[Any]:
    """Every rank's fingerprints, through the default process group's store, waited for ``FINGERPRINT_TIMEOUT_S``:
    a rank without monitors never reaches this (no monitor of its own runs), and a collective here waited for it until
    the process group's timeout (30 min) while it trained on."""
    global _fingerprint_exchanges
    _fingerprint_exchanges += 1
    store = torch.distributed.distributed_c10d._get_default_store()
    keys = [f"lightning_act/fingerprints/{_fingerprint_exchanges}/{rank}" for rank in range(distributed_world_size())]
    store.set(keys[torch.distributed.get_rank()], pickle.dumps(mine))
    try:
        store.wait(keys, datetime.timedelta(seconds=FINGERPRINT_TIMEOUT_S))
    except torch.distributed.DistStoreError:
        silent = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise LightningActError(
            f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
            f"{'have' if len(silent) > 1 else 'has'} no lightning_act monitors or did not start the fit within "
            f"{FINGERPRINT_TIMEOUT_S:g} s; build the callbacks the same way on every rank"
        ) from None
    return [pickle.loads(store.get(key)) for key in keys]


def refuse_rank_dependent_monitors(trainer: pl.Trainer) -> None:
    """One :class:`LightningActError` on every rank when the ranks' monitors differ (built from a rank-dependent
    condition, config or environment by mistake): their collectives would not pair up (a gloo abort or an NCCL hang
    at the first due step, or a monitor's sums added into DDP's gradients), or would add up sums of other taps or
    thresholds (silently mixed values). One exchange of every monitor's :func:`monitor_fingerprint`, once per fit;
    a rank with no monitor at all is named by the ranks that have some, after ``FINGERPRINT_TIMEOUT_S``."""
    if distributed_world_size() == 1:
        return
    mine = [monitor_fingerprint(c) for c in trainer.callbacks if isinstance(c, FitScopedState)]
    gathered = _exchange_fingerprints(mine)
    first = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        if len(theirs) != len(first) or any(a["monitor"] != b["monitor"] for a, b in zip(theirs, first)):
            raise LightningActError(
                f"rank {rank} has the monitors {[f['monitor'] for f in theirs]}, rank 0 has "
                f"{[f['monitor'] for f in first]}; build the callbacks the same way on every rank"
            )
        for one, zero in zip(theirs, first):
            for key in zero:
                if one.get(key) != zero[key]:
                    raise LightningActError(
                        f"{zero['monitor']}: rank {rank} has {key}={one.get(key)!r}, rank 0 has {key}={zero[key]!r}; "
                        "build the callbacks the same way on every rank (not from a rank-dependent condition, config "
                        "or environment)"
                    )


def _runs_inside(module: nn.Module, wrapper: nn.Module) -> bool:
    """Whether ``module`` is inside ``wrapper`` where the wrapper runs it: not as the ``original_module`` a peft
    ``ModulesToSaveWrapper`` keeps beside the trained copy it runs instead."""
    originals = [original for w in wrapper.modules() if (original := saved_copy_original(w)) is not None]
    unrun = {id(m) for original in originals for m in original.modules()}
    return any(inner is module for inner in wrapper.modules()) and id(module) not in unrun


def modules_now_at_taps(pl_module: nn.Module, taps: Sequence[Tap]) -> dict[int, nn.Module | None]:
    """The module now at the name of each tap whose module no longer runs there (None: the name and the module both
    left the model), by tap index: a module replaced mid-fit (``model.fc = nn.Linear(...)``) no longer runs, and hooks
    on it would observe nothing, even where the model still holds it under another name (the continual-learning
    ``old_heads.append(head); head = nn.Linear(...)``, a backup copy). A tap's module is kept where it still runs with
    its hooks: inside the module now at its name (wrapped: ``blocks[1] = nn.Sequential(blocks[1], norm)``) or, its name
    gone from the model, elsewhere in it (moved: peft's ``merge_and_unload()``). The model's modules are walked only
    when a name has left the model."""
    changed: dict[int, nn.Module | None] = {}
    in_model: set[int] | None = None
    for index, tap in enumerate(taps):
        current = module_at(pl_module, tap.name.removesuffix(INPUT_TAP_SUFFIX))
        if current is tap.module:
            continue
        if current is not None:
            if not _runs_inside(tap.module, current):
                changed[index] = current
            continue
        if in_model is None:
            in_model = {id(module) for module in pl_module.modules()}
        if id(tap.module) not in in_model:
            changed[index] = None
    return changed


def reads_finding_taps(pl_module: nn.Module, taps: Sequence[Tap]) -> list[ModuleRead] | None:
    """The child lookups that find every tap's module at its name (:func:`module_reads`, each once), or None when one
    is not there now: while :func:`reads_unchanged` holds for them, :func:`modules_now_at_taps` is ``{}``."""
    reads: dict[tuple[int, str], ModuleRead] = {}  # taps share their parents' lookups (by id: a module may not hash)
    for tap in taps:
        module, found = module_reads(pl_module, tap.name.removesuffix(INPUT_TAP_SUFFIX))
        if module is not tap.module:
            return None
        reads.update(((id(read[0]), read[1]), read) for read in found)
    return list(reads.values())


#: The taps and the lookups that found their modules (:func:`reads_finding_taps`), as a monitor holds them.
HeldTapReads = tuple[list[Tap], list[ModuleRead]]


def taps_moved_since(
    pl_module: nn.Module, taps: list[Tap], held: HeldTapReads | None,
) -> tuple[dict[int, nn.Module | None], HeldTapReads | None]:
    """:func:`modules_now_at_taps`, answered from ``held`` (the lookups that found every tap's module at the last
    check) while they still find the same modules: an identity test per lookup (under 1 µs per tap, where a walk of
    its name costs ~3), so a check at every due step stays cheap. Returns the moved taps and what to hold next."""
    if held is not None and held[0] is taps and reads_unchanged(held[1]):
        return {}, held
    reads = reads_finding_taps(pl_module, taps)
    if reads is not None:
        return {}, (taps, reads)
    return modules_now_at_taps(pl_module, taps), None


def resubscribe_replaced(
    monitor: Any, pl_module: nn.Module, registry: CaptureRegistry, taps: list[Tap], layouts: list[Layout],
    replaced: dict[int, nn.Module], declared: Layout, step: int,
) -> None:
    """Move ``monitor``'s taps in ``replaced`` (index: new module) to their new modules, in place in ``taps`` and
    ``layouts``, subscribe it again, and say so once, except for a layer only rebuilt (:func:`rebuilds_batch_norm`)."""
    said = [taps[i].name for i, module in replaced.items() if not rebuilds_batch_norm(taps[i].module, module)]
    for index, module in replaced.items():
        tap = taps[index]
        taps[index] = Tap(tap.name, module, tap.point)
        layouts[index] = tap_layout(declared, module_layout(module_chain(pl_module, module), tap.point))
    registry.subscribe(monitor, taps, layouts, undeclared_layout_warning(type(monitor).__name__, pl_module, declared))
    if said:
        rank_zero_warn(
            f"{type(monitor).__name__}: {said} were replaced by new modules after the monitor chose its modules (at "
            f"setup); it observes the new ones from step {step}",
            category=UserWarning,
        )


def rebuilds_batch_norm(old: nn.Module, new: nn.Module) -> bool:
    """Whether ``new`` is the BatchNorm ``old`` rebuilt as another class on the very same tensors and settings, as
    ``Trainer(sync_batchnorm=True)`` does after the monitors chose their modules (a SyncBatchNorm in the strategy's
    setup, a ``_BatchNormXd`` back at the end of fit): the new module computes what the old one did, so following it
    needs no warning. Sharing the parameter and running-statistics objects is the test, not Lightning's private
    ``strategy._layer_sync``: no genuine replacement holds them (a new layer has new ones), and one that does is this
    layer; a stateless one (``affine=False``, no running statistics) with equal settings is the same function."""
    if not (isinstance(old, nn.modules.batchnorm._BatchNorm) and isinstance(new, nn.modules.batchnorm._BatchNorm)):
        return False
    settings = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    tensors = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return (all(getattr(old, name) == getattr(new, name) for name in settings)
            and all(getattr(old, name) is getattr(new, name) for name in tensors))


def current_tap_key(key: str) -> str:
    """A checkpoint's tap name, or ``<prefix>/<tap>/<stat>`` key, with an input tap named as this version names it:
    62acaae named the input tap of ``head`` ``head:input``, ce8ccde on ``head-input`` (:data:`INPUT_TAP_SUFFIX`); a
    resume kept the old name's histories and SeND windows apart from the new values, two half runs."""
    return re.sub(r":input(?=/|$)", INPUT_TAP_SUFFIX, key)


def largest_accumulation(trainer: pl.Trainer) -> int:
    """The largest gradient accumulation of the fit: a ``GradientAccumulationScheduler`` sets
    ``trainer.accumulate_grad_batches`` at each epoch start, after the monitors' ``on_train_start``, which read 1."""
    factors = [trainer.accumulate_grad_batches]
    for callback in trainer.callbacks:
        if isinstance(callback, lightning_classes("callbacks.GradientAccumulationScheduler")):
            factors.extend(callback.scheduling.values())
    return max(1, *factors)


@dataclass
class MetricReader:
    """A callback or plateau scheduler that reads ``trainer.callback_metrics[key]``: at least ``between`` optimizer
    steps between two of its reads where that is known (None: unknown, a loader of unknown length, or it never
    repeats a read); ``strict``: a missing key ends the fit."""

    name: str
    key: str
    between: float | None
    strict: bool
    acts_after: str  # what it does after ``patience`` checks without improvement
    repeats_fix: Callable[[int], str]  # what to pass, given the monitor's every_n_steps, to read each value once
    late_fix: str  # what to do for a key that appears only after a few due steps
    #: Seconds of wall-clock time between two reads (a time-based ``val_check_interval``): the steps between them are
    #: unknown, so ``between`` is None and a repeat can only be said to be possible.
    every_seconds: float | None = None


def metric_readers(trainer: pl.Trainer, accumulate: int) -> list[MetricReader]:
    """The ``EarlyStopping``, ``ModelCheckpoint`` callbacks and ``ReduceLROnPlateau`` schedulers of ``trainer``
    that read a metric, with the least number of optimizer steps between two of their reads at ``accumulate``
    micro-batches a step (an epoch's last batch steps whatever the accumulation)."""
    batches = trainer.num_training_batches
    steps_per_epoch = math.ceil(batches / accumulate) if math.isfinite(batches) else None
    readers = []
    for callback in trainer.callbacks:
        key = str(getattr(callback, "monitor", None))
        if isinstance(callback, lightning_classes("callbacks.EarlyStopping")):
            validation = trainer.val_check_batch
            # Lightning >= 2.6 validates every so many seconds for a timedelta, dict or "DD:HH:MM:SS" interval, and
            # then sets val_check_batch to None, which otherwise means validation once an epoch
            seconds = None if callback._check_on_train_epoch_end else getattr(trainer, "_val_check_time_interval", None)
            if seconds is not None:
                between = None
            elif callback._check_on_train_epoch_end or validation is None:
                between = steps_per_epoch
            elif trainer.check_val_every_n_epoch is None:  # every val_check_batch batches, across epochs
                between = (validation / accumulate if steps_per_epoch is None else
                           validation // batches * steps_per_epoch + validation % batches // accumulate)
            elif 2 * validation <= batches:  # several validations in an epoch
                between = validation / accumulate
            else:  # one validation in each check_val_every_n_epoch-th epoch
                between = None if steps_per_epoch is None else steps_per_epoch * trainer.check_val_every_n_epoch
            readers.append(MetricReader(
                f"EarlyStopping(monitor='{key}')", key, between, callback.strict,
                f"stop after patience={callback.patience}",
                (lambda every, between=between: f"every_n_steps <= {max(1, int(between))}") if seconds is None else
                (lambda every: f"val_check_interval in batches (at least every_n_steps x accumulation = "
                               f"{every * accumulate}), EarlyStopping(check_on_train_epoch_end=True)"),
                "pass EarlyStopping(strict=False) to wait for it", seconds,
            ))
        elif isinstance(callback, lightning_classes("callbacks.ModelCheckpoint")) and callback.save_top_k != 0:
            readers.append(MetricReader(  # it raises for a missing key only once a validation loop has run
                f"ModelCheckpoint(monitor='{key}')", key, None, trainer.enable_validation, "", lambda every: "",
                "save first after that step (every_n_epochs, every_n_train_steps, the validation interval) or monitor "
                "another key",
            ))
    for config in trainer.lr_scheduler_configs:
        if not config.reduce_on_plateau:
            continue
        stepwise = config.interval == "step"
        # stepwise: at the batches (of each epoch) that both step the optimizer and are a multiple of frequency, once
        # an epoch where two of them do not fit in one
        if stepwise and (steps_per_epoch is None or 2 * config.frequency <= batches):
            between = math.lcm(accumulate, config.frequency) / accumulate
        elif stepwise:
            between = steps_per_epoch if config.frequency <= batches else None  # never stepped: no repeat
        else:
            between = None if steps_per_epoch is None else config.frequency * steps_per_epoch

        def repeats_fix(every: int, stepwise: bool = stepwise) -> str:
            frequency = every * accumulate if stepwise else math.ceil(every / (steps_per_epoch or 1))
            return f"'frequency': {frequency} ({'batches' if stepwise else 'epochs'}) in its lr_scheduler config"

        readers.append(MetricReader(
            f"{type(config.scheduler).__name__}(lr_scheduler monitor='{config.monitor}', interval='{config.interval}', "
            f"frequency={config.frequency})", str(config.monitor), between, bool(config.strict),
            f"cut the learning rate after patience={getattr(config.scheduler, 'patience', '?')}", repeats_fix,
            "pass 'strict': False in its lr_scheduler config to wait for it",
        ))
    return readers


class FitScopedState(Callback):
    """The part of a monitor's state that belongs to one run: its histories (``history``) and whatever else its
    ``state_dict`` holds. Lightning hands a checkpoint's callback states to every callback, for a fit's ``ckpt_path``
    and for ``validate``/``test``/``predict``'s too; and one callback object can serve several fits.

    - A checkpoint loaded to resume a fit restores the state (:meth:`restore_state`).
    - A checkpoint loaded for ``validate``/``test``/``predict`` (``trainer.test(ckpt_path="best")`` after a fit)
      does not replace the state of a fit this callback ran: the histories would silently shrink to the
      checkpoint's step. A callback that holds no history yet takes it (a process that only tests can read it).
    - A fit that does not resume and starts at or before the last step the state holds (the same callback in a new
      ``Trainer`` from step 0) clears it first, with one warning: two runs' steps in one history, or SeND windows
      across two models, would read as one run. A further ``fit`` on the same ``Trainer`` continues it.

    Subclasses implement :meth:`restore_state`, called from ``load_state_dict`` (``{}`` clears the state), and call
    :meth:`begin_fit_state` first thing in ``on_fit_start``.
    """

    history: dict[str, BoundedSeries]
    history_size: int
    _keeps_own_state = False
    _resumed_this_fit = False
    _loading_to_fit = False
    #: This fit's setup waits for fit start (:func:`builds_layers_late`); set while that late setup runs.
    _setup_waits = False
    _setting_up_late = False
    _said_trains_nothing = False  # StochasticWeightAveraging's update pass said (:meth:`trains_nothing`)

    #: The arguments that change what a logged statistic means (a threshold, the top-k): a resume with other values
    #: goes on logging the same series, which is said once (see :meth:`load_state_dict`).
    meaning_settings: ClassVar[tuple[str, ...]] = ()

    def _settings(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.meaning_settings}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {key: series.state_dict() for key, series in self.history.items()},
            "published": dict(self.__dict__.get("_published", {})),
            "settings": self._settings(),
        }

    def restore_state(self, state_dict: dict[str, Any]) -> None:
        """Replace the run's state by ``state_dict`` (``{}``: the empty state of a new run)."""
        self.history = {
            current_tap_key(key): BoundedSeries.from_state_dict(s).with_capacity(self.history_size)
            for key, s in state_dict.get("history", {}).items()
        }
        self._published = {current_tap_key(key): value for key, value in state_dict.get("published", {}).items()}

    def publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Put ``metrics`` into ``trainer.callback_metrics`` (same values on every rank), and keep the latest of
        each for :meth:`on_train_start` of a resumed fit."""
        self.__dict__.setdefault("_published", {}).update(metrics)
        # one tensor, unbound into 0-d views: a tensor per metric costs the host a few microseconds each; float64 as
        # the loggers get them (the default float32 made a top1 of 1e39 inf for EarlyStopping and ModelCheckpoint)
        values = torch.tensor(list(metrics.values()), dtype=torch.float64)
        trainer.callback_metrics.update(zip(metrics, values.unbind()))

    def trains_nothing(self, trainer: pl.Trainer) -> bool:
        """Whether Lightning runs this training batch without backward: ``StochasticWeightAveraging``'s batch-norm
        update epoch after ``max_epochs`` forwards the averaged weights through every batch into one optimizer step
        without gradients. It is no training step, so no due step is measured in it, said once (before round 24 it
        was logged as one: all its batches in one row, the average in the weight trajectory and the SeND window).
        ``fit_loop._skip_backward`` is private to Lightning, hence read with a default."""
        if not getattr(getattr(trainer, "fit_loop", None), "_skip_backward", False):
            return False
        if not self._said_trains_nothing:
            self._said_trains_nothing = True
            rank_zero_warn(
                f"{type(self).__name__}: the training batches at step {trainer.global_step} run without backward "
                "(StochasticWeightAveraging's batch-norm update pass over the averaged weights); they train nothing "
                "and are not monitored",
                category=UserWarning,
            )
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that continues a run (resumed from a checkpoint, or a further ``fit`` of the same ``Trainer``) puts
        the statistics of its last due step back into ``callback_metrics``, which Lightning empties when a fit
        starts: ``EarlyStopping`` or ``ModelCheckpoint`` on a monitor statistic failed with "metric not available"
        when the continued fit's first check came before its first due step, where the uninterrupted run had the
        value. (The state of a run this fit does not continue was cleared by :meth:`begin_fit_state`.)"""
        published = self.__dict__.get("_published")
        if published:
            self.publish(trainer, published)
        self._warn_metric_readers(trainer)

    def first_logged_step(self, key: str) -> int | None:
        """The step at which this fit first logs ``key``, for a statistic that appears only after several due steps
        (``SensitiveNeurons``' ``v_mean`` once its window is full); None: from the first due step on. A
        ``ModelCheckpoint``, ``EarlyStopping(strict=True)`` or strict plateau scheduler that reads it before then
        ends the fit with Lightning's "not available" error, which :meth:`_warn_metric_readers` says at fit start."""
        return None

    def _warn_metric_readers(self, trainer: pl.Trainer) -> None:
        """One warning per reader of one of this monitor's statistics (:func:`metric_readers`) that

        - checks it more often than it is measured (``EarlyStopping``, ``ReduceLROnPlateau``): it reads the same value
          at several checks and counts the repeats as no improvement, so it stops, or cuts the learning rate, after
          ``patience`` checks of one measurement;
        - reads it strictly while this fit has not logged it yet (:meth:`first_logged_step`): a read before that step
          ends the fit with Lightning's "not available" error. When the reader first reads is not foretold (it
          depends on Lightning's loop schedule): the warning says what happens if it reads before that step.
        """
        every = getattr(self, "every_n_steps", 1)
        accumulate = largest_accumulation(trainer)
        for reader in metric_readers(trainer, accumulate):
            if not self.logs_key(reader.key):
                continue
            if reader.between is not None and every > max(1, reader.between):
                rank_zero_warn(
                    f"{type(self).__name__}: {reader.name} checks every ~{max(1, round(reader.between))} optimizer "
                    f"steps, but the statistic is measured every {every}: it counts the repeated values as no "
                    f"improvement and may {reader.acts_after} checks of one measurement; pass "
                    f"{reader.repeats_fix(every)} or a larger patience",
                    category=UserWarning,
                )
            elif reader.every_seconds is not None and every > 1:
                rank_zero_warn(
                    f"{type(self).__name__}: {reader.name} checks at each validation, run every "
                    f"{reader.every_seconds:g} s by a time-based val_check_interval, so the optimizer steps between two "
                    f"checks are unknown, and the statistic is measured every {every}: if fewer steps lie between "
                    f"two checks, it counts the repeated values as no improvement and may {reader.acts_after} checks "
                    f"of one measurement; pass {reader.repeats_fix(every)} or a larger patience",
                    category=UserWarning,
                )
            first = self.first_logged_step(reader.key)
            if (reader.strict and first is not None and trainer.global_step < first
                    and reader.key not in trainer.callback_metrics):  # a resumed fit holds its value
                rank_zero_warn(
                    f"{type(self).__name__}: {reader.name} reads a statistic this monitor first logs at step {first} "
                    f"(after several due steps): a read before then ends the fit with Lightning's \"not available\" "
                    f"error; {reader.late_fix}",
                    category=UserWarning,
                )

    def logs_key(self, key: str) -> bool:
        """Whether ``key`` is one of this monitor's statistics, ``<prefix>/<one of its taps>/<stat>`` (two monitors of
        one class log under one prefix)."""
        tap, _, stat = key.removeprefix(f"{self.prefix}/").rpartition("/")
        return key.startswith(f"{self.prefix}/") and bool(stat) and tap in {t.name for t in getattr(self, "taps", [])}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The loggers write what they hold before a checkpoint that holds it is written: Lightning's CSVLogger keeps
        rows until its next save, so after a kill a resumed fit (which starts after the checkpoint's steps and never
        logs them again) left a gap in ``metrics.csv`` that the checkpoint's histories did not have."""
        for logger in trainer.loggers:
            logger.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keep, self._keeps_own_state = self._keeps_own_state, False
        if not keep:
            self.restore_state(state_dict)
        if not keep and self._loading_to_fit:  # a fit resumes (validate/test measure nothing on from it)
            held, now = state_dict.get("settings"), self._settings()
            changed = [f"{name}={held[name]!r} then {now[name]!r}" for name in now if held and name in held
                       and held[name] != now[name]]
            if changed:
                rank_zero_warn(
                    f"{type(self).__name__}: this fit resumes a run measured with other settings "
                    f"({'; '.join(changed)}); "
                    "its series go on from the checkpoint's step with the new meaning (start a new run to keep one "
                    "meaning per series)",
                    category=UserWarning,
                )

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._loading_to_fit = fitting  # read by load_state_dict, which Lightning calls next
        # LearningRateFinder / BatchSizeFinder save and restore a checkpoint around their trials inside the fit:
        # that restore undoes the trials, and is no resume (it made a reused callback keep an earlier run's history)
        if not Path(str(trainer.ckpt_path or "")).name.startswith(TUNER_CHECKPOINTS):
            self._resumed_this_fit = fitting
        self._keeps_own_state = not fitting and bool(self.history)
        states = checkpoint.get("callbacks") or {}
        kind = type(self).__name__
        if not {self.state_key, self._legacy_state_key} & set(states):
            same_modules = self._saved_key_of_same_modules(states)
            if same_modules is not None:  # Lightning hands the states out by exact key, after this hook
                states[self.state_key] = states[same_modules]
                listed = same_modules not in {callback.state_key for callback in trainer.callbacks}
                if listed and not self._keeps_own_state:  # Lightning's check of the keys ran before this hook
                    rank_zero_warn(
                        f"{kind}: the state Lightning listed above under {same_modules} (\"Please add the following "
                        "callbacks\") is this monitor's, under the key of its first versions, and is restored for it",
                        category=UserWarning,
                    )
        if fitting and not {self.state_key, self._legacy_state_key} & set(states):
            # Lightning calls no load_state_dict then: a callback reused from an earlier fit would carry its state
            # into the resumed run (run A's steps, then run B's), which had none for it
            self.restore_state({})
            others = [key for key in states if key.startswith(kind + "{")]
            if others:  # Lightning skips a callback whose key it does not find, without a word
                rank_zero_warn(
                    f"{kind}: the checkpoint holds state for {', '.join(others)} but none for this monitor "
                    f"({self.state_key}: other modules); its histories start empty at this resume (pass the modules "
                    "the checkpoint's run had to continue them)",
                    category=UserWarning,
                )

    def _saved_key_of_same_modules(self, states: dict[str, Any]) -> str | None:
        """The key of a saved state of this monitor's kind and modules whatever else the key holds: the first
        versions keyed the state on ``every_n_steps`` too (``Kind{'modules': [...], 'every_n_steps': 1}``), and a
        resume of their checkpoints lost every history, with a warning that blamed other modules. Among several, the
        one whose other entries equal this monitor's settings of those names."""
        kind = self.__class__.__qualname__
        modules = getattr(self, "modules", None)
        if modules is None:
            return None
        mine, as_spelled = spelling_free_modules(modules), [str(m) for m in modules]
        classes = {name + suffix for name in map(_class_spec_name, modules) if name for suffix in ("", ":input")}
        matches: list[tuple[bool, str]] = []
        for key in states:
            if not (isinstance(key, str) and key.startswith(kind + "{")):
                continue
            try:
                entries = ast.literal_eval(key[len(kind):])
            except (ValueError, SyntaxError):
                continue
            held = entries.get("modules") if isinstance(entries, dict) else None
            if not isinstance(held, list) or (held != as_spelled and held_spelling_free_modules(held, classes) != mine):
                continue
            same_rest = all(getattr(self, name, None) == value for name, value in entries.items() if name != "modules")
            matches.append((not same_rest, key))
        return min(matches)[1] if matches else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Subclasses choose their modules here, unless :attr:`_setup_waits`: then :meth:`begin_fit_state` calls
        this again at fit start, once the model has its layers."""
        if stage == "fit":
            self._resumed_this_fit = False  # set again by on_load_checkpoint when this fit resumes
            self._setup_waits = trainer is not None and not self._setting_up_late and chooses_at_fit_start(
                pl_module, getattr(self, "modules", ()))

    def _forget_warnings(self) -> None:
        """Let a new run or a resume say the once-per-tap warnings again: a reused callback stayed silent about a
        new model's problem that an earlier model had on a tap of the same name. Every set attribute named
        ``*_warned`` holds what was said, and one flag: StochasticWeightAveraging's update pass."""
        for name, said in vars(self).items():
            if name.endswith("_warned") and isinstance(said, set):
                said.clear()
        self._said_trains_nothing = False

    def begin_fit_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish a setup that waited for the model's layers, then clear the state of an earlier run that this fit
        does not continue (see the class docstring)."""
        if self._setup_waits:
            self._setup_waits, resumed, self._setting_up_late = False, self._resumed_this_fit, True
            try:
                self.setup(trainer, pl_module, "fit")
            finally:
                self._setting_up_late = False
            self._resumed_this_fit = resumed  # restored from a checkpoint between the two setups
        if trainer is not None and next((c for c in trainer.callbacks if isinstance(c, FitScopedState)), None) is self:
            refuse_rank_dependent_monitors(trainer)
        if trainer is None:  # driven by hand, outside a Trainer
            return
        if self._resumed_this_fit:  # what was said is in no checkpoint: a resume says it again, as a new process would
            self._forget_warnings()
            return
        last = max((series.steps[-1] for series in self.history.values() if series.steps), default=None)
        start = training_step_index(trainer, pl_module)
        if (start == 0) if last is None else (last >= start):  # a new run (also after a fit that logged nothing)
            self._forget_warnings()
        if last is not None and last >= start:
            rank_zero_warn(
                f"{type(self).__name__}: this fit starts at step {start}, but the state this callback holds from an "
                f"earlier fit reaches step {last}; it is cleared so that the two runs do not mix (pass ckpt_path= to "
                "resume a run, or a new callback for each run)",
                category=UserWarning,
            )
            self.restore_state({})


class ActivationMonitor(FitScopedState, ABC):
    """Base class of the activation monitors; see the module docstring for the protocol.

    Args:
        modules: module specs (see :mod:`lightning_act.capture.selection`); None: the monitor's
            defaults, which warn and stay idle when the model has no such modules; ``[]``: no tap, for a monitor that
            logs something without one (:meth:`logs_without_taps`), else one line.
        every_n_steps: observe and log every this many steps (see the module docstring).
        history_size: points kept per key in the bounded histories (>= 3: a full history is thinned to every other
            point, so 2 would hold its first point only).
        batch_dim, token_dim: the sample and token axes of every tapped activation, overriding
            the layout inferred from ``batch_first`` (e.g. ``batch_dim=1, token_dim=0`` for
            ``(T, B, D)`` outputs of a custom sequence-first model).
        feature_dim: for the monitors whose statistics depend on the feature axis (``reads_features``), where
            the features of every tapped activation of 3 or more axes sit, 1 (channels first) or -1 (channels
            last, e.g. ``(B, H, W, C)``), overriding what the tapped layers tell (:mod:`lightning_act.capture.layout`).
    """

    prefix: ClassVar[str] = "act"
    #: Whether the statistics depend on which axis holds the features (top-k positions, covariances).
    reads_features: ClassVar[bool] = False
    default_modules: ClassVar[tuple[str, ...]] = ("@activations",)
    heatmap_stat: ClassVar[str | None] = None
    #: Why a tap's step can be unmeasurable (a statistic :data:`MEASURED` below 0.5 says so; see :meth:`summarize`).
    unmeasured_reason: ClassVar[str] = ""
    #: The taps and the lookups that found their modules (see :meth:`_follow_replaced_modules`), until teardown.
    _tap_reads: HeldTapReads | None = None

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        history_size: int = 512,
        batch_dim: int | None = None,
        token_dim: int | None = None,
        feature_dim: int | None = None,
    ) -> None:
        owner = type(self).__name__
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps, 1)
        self.history_size = check_int(owner, "history_size", history_size, 3)
        self.batch_dim, self.token_dim = check_axes(owner, batch_dim, token_dim)
        self.feature_dim = check_feature_dim(owner, feature_dim)
        self.uses_default_modules = modules is None
        self.modules = module_list(modules, self.default_modules, owner)
        self.history: dict[str, BoundedSeries] = {}
        self.taps: list[Tap] = []
        self._tap_layouts: list[Layout] = []  # each tap's layout, as subscribed
        self.armed = False
        self._registry: CaptureRegistry | None = None
        self._pending_step: int | None = None
        self._staged: StagedStatistics | None = None  # the due step's statistics, staged before its backward
        self._summary_side_stream: torch.cuda.Stream | None = None  # where the last statistics were derived
        self._sums: list[torch.Tensor | None] = []
        self._maxima: list[torch.Tensor | None] = []
        self._samples: list[torch.Tensor | None] = []
        self._observed: set[int] = set()  # taps that gave this rank a measurable activation in the current step
        self._ran_empty: dict[int, tuple[int, ...]] = {}  # taps that gave an empty activation since the last report
        self._kept: dict[int, Any] = {}  # what a subclass kept of each tap's first activation this step (see keep)
        self._layout_synced = False
        self._unobserved_warned: set[str] = set()
        self._unknown_extras_warned: set[str] = set()
        self._unknown_warned: set[str] = set()
        self._unmeasured_warned: set[str] = set()
        self._low_dim_warned: set[str] = set()
        self._features_warned: set[str] = set()
        self._padding_warned: set[str] = set()  # said once per run: a due step's batch holds padding
        #: A due step's padding check on its way to the host: (step, whether its attention_mask masks a position, the
        #: CUDA event after which that flag is on the host, or None where it is there at once).
        self._padding_check: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    # ------------------------------------------------------------------ for subclasses
    def fused_spec(self, tap_index: int) -> FusedSpec | None:
        """What this monitor needs from tap ``tap_index``'s shared fused pass (None: nothing, it reads ``x``)."""
        return None

    @abstractmethod
    def partials(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> Partials | None:
        """Fixed-size partial statistics of one sample-first activation ``x`` from tap ``tap_index``
        (None: this tensor cannot be measured; the subclass warns once). ``fused`` holds at least what
        :meth:`fused_spec` asked for, computed once for every monitor tapping that module."""

    def merge_samples(self, tap_index: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Combine two same-size sample buffers of one rank (default: keep the newest)."""
        return new

    @abstractmethod
    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Statistics (0-d tensors) of one tap from its reduced buffers; ``samples`` is (world, n). A statistic
        named :data:`MEASURED` (not logged) below 0.5 says the step gave too little to measure
        (:attr:`unmeasured_reason`): then nothing of the tap is logged at that step, decided on the host with the
        values, so without a sync of its own; other statistics named ``_...`` are not logged either, and tell
        :meth:`_warn_unmeasured` why."""

    def complete_partials(self) -> None:
        """Called at a logging step before the reduction: a subclass whose ``receive`` deferred its work on each
        tap's first activation (:meth:`keep`) turns what it kept (:meth:`take_kept`) into buffers here, for all taps
        at once (see :meth:`accumulate`)."""

    def keep(self, tap_index: int, item: Any) -> bool:
        """Keep ``item``, a subclass's deferred work on tap ``tap_index``'s first activation of the step, until
        :meth:`complete_partials`; False when the tap already has one this step (a later micro-batch), which the
        caller then turns into partials at once, so that one item per tap is kept however many forwards a step has."""
        if tap_index in self._kept:
            return False
        self._kept[tap_index] = item
        return True

    def take_kept(self) -> dict[int, Any]:
        """What :meth:`keep` kept this step, per tap, emptied for the next step."""
        kept, self._kept = self._kept, {}
        return kept

    def summarize_taps(
        self, taps: list[int], sums: dict[int, torch.Tensor], maxima: dict[int, torch.Tensor],
        samples: dict[int, torch.Tensor],
    ) -> list[tuple[list[int], list[str], torch.Tensor]] | None:
        """Statistics of several taps at once, as blocks ``(tap indices, stat names, values (taps, stats))``; None
        (the default): :meth:`summarize` per tap. A few operations per block instead of a few per tap and
        statistic, which on a GPU are as many launches."""
        return None

    def prepare_summaries(self, sums: dict[int, torch.Tensor]) -> None:
        """Called once per logging step with every tap's reduced ``sums`` before :meth:`summarize` runs per tap:
        a place to batch work across taps (e.g. one eigensolver call for all of them)."""

    def extra_statistics(self, trainer: pl.Trainer, step: int) -> dict[str, torch.Tensor | float]:
        """Statistics not tied to a tap (full keys, e.g. ``collapse/params/r90``), logged with the rest."""
        return {}

    def on_statistics(self, trainer: pl.Trainer, step: int, stats: dict[str, dict[str, float]]) -> None:
        """Called on every rank after a logging step with ``{tap name: {stat: value}}``."""

    # ------------------------------------------------------------------ scheduling
    @property
    def state_key(self) -> str:
        # Not keyed on every_n_steps: histories must survive a resume with another interval.
        return self._generate_state_key(modules=spelling_free_modules(self.modules))

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # The key of checkpoints written before round 17, keyed on the modules as spelled.
        return self._generate_state_key(modules=[str(m) for m in self.modules])

    def is_due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self._setup_waits:  # chosen at fit start, once the model has its layers (see builds_layers_late)
            self.taps = []
            return
        layout = declared_layout(self.batch_dim, self.token_dim, self.feature_dim, self.reads_features)
        self.taps, self._tap_layouts, self._registry = subscribe_taps(
            self, pl_module, self.modules, self.uses_default_modules, layout)
        self._reset_buffers(len(self.taps))

    def features_unknown(self, tap_index: int, shape: tuple[int, ...]) -> None:
        """Warn once per tap that the feature axis of its activations is read by convention (called by the
        capture registry, see :mod:`lightning_act.capture.layout`)."""
        warn_features_unknown(self, self.taps[tap_index].name, shape, self._features_warned)

    def activations_unbatched(self, tap_index: int, shape: tuple[int, ...]) -> None:
        """Warn once per tap that a call gave activations without a sample axis, which the capture registry hands to no
        monitor (see :func:`~lightning_act.capture.layout.looks_unbatched`)."""
        warn_unbatched(self, self.taps[tap_index].name, shape, self._low_dim_warned)

    def activations_empty(self, tap_index: int, shape: tuple[int, ...]) -> None:
        """Note that a call gave an activation of 0 entries, which the capture registry hands to no monitor, so that a
        tap that gave only such ones in a step is said to have (:meth:`_warn_unobserved`), not to have not run."""
        self._ran_empty[tap_index] = shape

    def arm(self, armed: bool) -> None:
        """Start or stop receiving activations (the registry's hooks stay attached either way)."""
        side = self._summary_side_stream
        if armed and side is not None:  # the buffers were zeroed there: accumulate into them after that
            torch.cuda.current_stream(side.device).wait_stream(side)
            self._summary_side_stream = None
        self.armed = armed
        if self._registry is not None:
            self._registry.refresh()

    def observes_training(self) -> bool:
        """Whether training forwards are observed (a probing monitor observes its own passes instead)."""
        return True

    def logs_without_taps(self) -> bool:
        """Whether this monitor logs something with no activation tap (``modules=[]``), e.g. a weight trajectory."""
        return False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if (not self.taps and not self.logs_without_taps()) or self.trains_nothing(trainer):
            return
        step = training_step_index(trainer, pl_module)
        if self._pending_step is None and self.is_due(step):
            self._pending_step = step
            self._follow_replaced_modules(pl_module, step)
        if self._pending_step is not None and self.observes_training():
            self.arm(True)
            self._check_padding(batch, self._pending_step)
            self._read_padding_check()

    def _check_padding(self, batch: Any, step: int) -> None:
        """Start the check of a due step's training batch for padding (a dict batch, or Hugging Face's
        ``BatchEncoding``, whose ``attention_mask`` masks a position: :func:`padding_in_mask`): every monitor counts
        the pad positions' activations like real tokens', which :meth:`_read_padding_check` says once per run. On a
        GPU the flag reaches the host
        asynchronously (pinned memory and an event): a host read of it at once would wait for the steps the device
        still runs, at every due step until it is said."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if self._padding_warned or self._padding_check is not None or not isinstance(mask, torch.Tensor):
            return
        padded = padding_in_mask(mask)
        arrived = None
        if padded.is_cuda:
            padded = padded.to("cpu", non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
        self._padding_check = (step, padded, arrived)

    def _read_padding_check(self, wait: bool = False) -> None:
        """Say the padding a check of :meth:`_check_padding` found, once it reached the host (or at once ``wait``)."""
        if self._padding_check is None:
            return
        step, padded, arrived = self._padding_check
        if arrived is not None and not wait and not arrived.query():
            return
        if arrived is not None:
            arrived.synchronize()
        self._padding_check = None
        if bool(padded):
            warn_padding_once(self, self._padding_warned, f"the training batch at step {step}")

    def warn_padded_probe(self, batches: Iterable[Any]) -> None:
        """Say once per run that probe batches this monitor measures (instead of the training batch) hold padding
        (:func:`holds_padding`), as the training batches' check says it."""
        if not self._padding_warned and any(holds_padding(batch) for batch in batches):
            warn_padding_once(self, self._padding_warned, "a probe batch")

    def _follow_replaced_modules(self, pl_module: pl.LightningModule, step: int) -> None:
        """Before a due step's forward, move the subscription of each tap whose module was replaced since the monitor
        chose it (``model.blocks[1] = Block(...)`` mid-fit: a layer grown, re-initialised, swapped for a QAT or
        adapter one) to the module now at its name: the hooks are on module objects, so the old one, which no longer
        runs, would be observed instead. A tap whose module is still in the model under another name (wrapped, moved)
        keeps it; one whose module and name both left the model is said once (:func:`taps_moved_since`)."""
        moved, self._tap_reads = taps_moved_since(pl_module, self.taps, self._tap_reads)
        replaced: dict[int, nn.Module] = {}
        for index, current in moved.items():
            if current is None:
                self._warn_once(
                    self._unobserved_warned, self.taps[index].name,
                    f"is no longer a module of the model at step {step} (removed after the monitor chose its modules "
                    "at setup); nothing is logged for it from then on",
                )
            else:
                replaced[index] = current
        if not replaced or self._registry is None:
            return
        declared = declared_layout(self.batch_dim, self.token_dim, self.feature_dim, self.reads_features)
        resubscribe_replaced(self, pl_module, self._registry, self.taps, self._tap_layouts, replaced, declared, step)
        for index in replaced:
            self.tap_replaced(index)

    def tap_replaced(self, tap_index: int) -> None:
        """Called after tap ``tap_index`` moved to a new module (:meth:`_follow_replaced_modules`), before its first
        forward: a subclass forgets what it held of the old module's activations (their width, a reference row)."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not (pl_module.automatic_optimization and self.armed):
            return
        self.arm(False)
        if self._pending_step is not None and self._staged is None and self.stages_before_backward(trainer):
            # the due step's one forward is complete: its statistics go to the host while the device runs backward
            self._staged = self.stage(trainer, self._pending_step, with_extras=False)

    def stages_before_backward(self, trainer: pl.Trainer) -> bool:
        """Whether a due step's statistics are staged in ``on_before_backward`` (module docstring, step 3): when its
        forward is complete there, that is without gradient accumulation."""
        return trainer.accumulate_grad_batches == 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.armed:
            self.arm(False)
        if self._pending_step is None:
            return
        staged, self._staged = self._staged, None
        if staged is not None:
            self._pending_step = None
            self.deliver(trainer, staged, self.host_extras(trainer, staged.step))
            return
        if pl_module.automatic_optimization and trainer.global_step <= self._pending_step:
            return  # accumulating: the optimizer step of the due step is still to come
        step, self._pending_step = self._pending_step, None
        self.flush(trainer, step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_fit_state(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch ended inside a batch (``on_train_batch_start`` returned -1) skips that batch's later hooks: forwards
        # after it (the model's own epoch-end passes) are not the due step's. The step stays pending for the next batch.
        if self.armed:
            self.arm(False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_padding_check(wait=True)
        self._unsubscribe()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._padding_check = None
        self._unsubscribe()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unsubscribe()
        release_cpu_scratch()  # the fused CPU pass's buffers, up to 16 bytes per entry of the largest tap

    def _unsubscribe(self) -> None:
        self.armed = False
        self._tap_reads = None  # holds the model's modules
        if self._registry is not None:
            self._registry.unsubscribe(self)
            self._registry = None
        self._pending_step = None
        self._staged = None

    # ------------------------------------------------------------------ buffers
    def _reset_buffers(self, n: int) -> None:
        self._sums, self._maxima, self._samples = [None] * n, [None] * n, [None] * n
        self._observed = set()
        self._ran_empty = {}
        self._kept = {}
        self._layout_synced = False

    def receive(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> None:
        """Add one activation's partials to the buffers (called by the capture registry)."""
        # A monitor that asks for no fused statistics keeps the two-argument ``partials`` of before.
        part = self.partials(tap_index, x) if fused is None else self.partials(tap_index, x, fused)
        if part is not None:
            self.accumulate(tap_index, part)

    def accumulate(self, tap_index: int, part: Partials) -> None:
        """Add one activation's partials to tap ``tap_index``'s buffers; the first of a step replaces them (they hold
        only reset values then), which saves an addition per buffer."""
        if tap_index not in self._observed:
            self.store_step_partials(tap_index, part)
            return
        self._sums[tap_index].add_(part.sums)  # type: ignore[union-attr]
        if part.maxima is not None:
            self._maxima[tap_index] = torch.maximum(self._maxima[tap_index], part.maxima)  # type: ignore[arg-type]
        if part.samples is not None:
            self._samples[tap_index] = self.merge_samples(tap_index, self._samples[tap_index], part.samples)  # type: ignore[arg-type]

    def store_step_partials(self, tap_index: int, part: Partials) -> None:
        """Make ``part`` (float64) tap ``tap_index``'s buffers for this step: the first activation of the step, or a
        subclass's :meth:`complete_partials` holding every activation of the step."""
        self._observed.add(tap_index)
        self._sums[tap_index] = part.sums.to(torch.float64)  # no operation when it is float64 already
        self._maxima[tap_index] = None if part.maxima is None else part.maxima.to(torch.float64)
        self._samples[tap_index] = None if part.samples is None else part.samples.to(torch.float64)

    def _sync_layout(self, device: torch.device) -> None:
        """Make every rank hold buffers of the same sizes (a tap may have run on some ranks only).

        Done at every flush until each tap has run on some rank: a tap that first runs later, on some ranks only (a
        conditional branch, an expert that got no tokens before), gave packed collectives of different lengths
        (an abort under gloo, a hang under NCCL), or, for two same-sized taps first run on different ranks, added
        one tap's sums into the other's."""
        n = len(self.taps)
        flags = self.tap_flags()
        rows = [[-1 if b is None else b.numel() for b in buffers] for buffers in (self._sums, self._maxima, self._samples)]
        rows.append([int(flags[i]) if i in flags else -1 for i in range(n)])
        sizes = torch.tensor(rows, dtype=torch.float64, device=device).reshape(-1)
        sizes = all_reduce_packed([sizes], "max")[0].reshape(4, n).long().tolist()
        fills = (0.0, float("-inf"), float("nan"))
        for buffers, row, fill in zip((self._sums, self._maxima, self._samples), sizes, fills):
            for i, size in enumerate(row):
                if buffers[i] is None and size >= 0:
                    buffers[i] = torch.full((size,), fill, dtype=torch.float64, device=device)
        flags.update({i: bool(flag) for i, flag in enumerate(sizes[3]) if i not in flags and flag >= 0})
        self._layout_synced = min(sizes[0], default=0) >= 0  # the same on every rank: they all sync again, or none

    def tap_flags(self) -> dict[int, bool]:
        """A flag per tap that a subclass reads off the activations (its layout), which a rank that never saw the tap
        takes from the others at :meth:`_sync_layout`; the dict itself is updated."""
        return {}

    # ------------------------------------------------------------------ reduce, summarise, log
    def flush(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Reduce the buffers across ranks, log the statistics at ``step`` and reset the buffers (at the end of the
        due step: :meth:`stage`, then :meth:`deliver`)."""
        return self.deliver(trainer, self.stage(trainer, step, with_extras=True))

    def stage(self, trainer: pl.Trainer, step: int, with_extras: bool) -> StagedStatistics:
        """Reduce the buffers across ranks, derive the statistics, start their one transfer to the host and reset the
        buffers; :meth:`extra_statistics` join the transfer ``with_extras``.

        A tap no rank observed in this step (its module did not run, e.g. a conditional branch) logs nothing at
        this step: its buffers hold only the reset values, and statistics of them would read like measurements.
        Which taps were observed travels with the sums (one more entry in the same collective) and reaches the
        host with the values (the same transfer), so this costs no host sync.
        """
        self.complete_partials()
        if not self._layout_synced and distributed_world_size() > 1:
            self._sync_layout(trainer.strategy.root_device)
        present = [i for i, s in enumerate(self._sums) if s is not None]
        observed, self._observed = self._observed, set()
        sum_buffers = [self._sums[i] for i in present]
        if present and distributed_world_size() > 1:  # which ranks observed each tap: summed with the sums
            flags = torch.tensor([float(i in observed) for i in present], dtype=torch.float64)
            sum_buffers.append(flags.to(sum_buffers[0].device, non_blocking=True))
        reduced = all_reduce_packed(sum_buffers, "sum")
        sums = dict(zip(present, reduced))
        with_max = [i for i in present if self._maxima[i] is not None]
        maxima = dict(zip(with_max, all_reduce_packed([self._maxima[i] for i in with_max], "max")))
        with_samples = [i for i in present if self._samples[i] is not None]
        samples = dict(zip(with_samples, all_gather_packed([self._samples[i] for i in with_samples])))

        names: list[tuple[int | None, str]] = []
        values: list[torch.Tensor] = []
        side = None if with_extras or not present else self.summary_stream(sum_buffers[0].device)
        if side is not None:
            # the side stream starts after the collectives; what it reads and this stream could free is recorded
            side.wait_stream(torch.cuda.current_stream(side.device))
            for tensor in (*reduced, *maxima.values(), *samples.values()):
                tensor.record_stream(side)
        # statistics are never differentiated: no graph is recorded and none is detached
        with torch.no_grad(), torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            # no tap delivered yet in this fit (a branch that has not run, a skipped batch): nothing to summarise
            blocks = self.summarize_taps(present, sums, maxima, samples) if present else None
            if blocks is None:
                self.prepare_summaries(sums)
                for i in present:
                    for stat, value in self.summarize(i, sums[i], maxima.get(i), samples.get(i)).items():
                        names.append((i, stat))
                        values.append(_as_scalar(value))
            for key, value in (self.extra_statistics(trainer, step) if with_extras else {}).items():
                names.append((None, key))
                values.append(_as_scalar(torch.as_tensor(value)))
            # one vector for the host: the scalars, each block's values (tap-major), the observation counts
            vectors = [torch.stack(values)] if values else []
            for taps, stats_of_block, block in blocks or ():
                names += [(i, stat) for i in taps for stat in stats_of_block]
                vectors.append(block.reshape(-1).to(torch.float64))
            counted = len(reduced) > len(present)
            if counted:
                vectors.append(reduced[-1])
            if len({v.device for v in vectors}) > 1:
                vectors = [v.to(vectors[0].device) for v in vectors]
            packed = (vectors[0] if len(vectors) == 1 else torch.cat(vectors)) if vectors else None
            # with counts, which taps some rank observed is known once they reach the host
            staged = StagedStatistics(step, names, present, None if counted else observed, **start_host_transfer(packed))
            self._zero_buffers()  # on the stream that read them, after the transfer was queued (on a CPU, was read)
        self._summary_side_stream = side
        return staged

    def summary_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """A CUDA stream of its own on which the statistics staged before the backward are derived, so that they
        overlap the backward on the device; None (the default): the current stream. See
        :class:`~lightning_act.callbacks.DimensionalCollapse`'s ``overlap_spectra``."""
        return None

    def host_extras(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """:meth:`extra_statistics` on the host, for statistics staged without them (a host read of each extra that
        is a device tensor; :class:`~lightning_act.callbacks.DimensionalCollapse` gives a float between changes)."""
        return {key: float(value) for key, value in self.extra_statistics(trainer, step).items()}

    def deliver(
        self, trainer: pl.Trainer, staged: StagedStatistics, extras: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Log the staged statistics (and ``extras``, already on the host) at their step, put them into
        ``trainer.callback_metrics`` and the histories, and hand them to :meth:`on_statistics`."""
        host_values = staged.host_values()
        names, step = staged.names, staged.step
        observed = staged.observed
        if observed is None:
            counts = host_values[len(names):]
            observed = {i for i, count in zip(staged.present, counts) if count > 0}
        self._warn_unobserved(step, observed)
        unlogged = {(i, stat): value for (i, stat), value in zip(names, host_values) if stat.startswith("_")}
        unmeasured = {i for (i, stat), value in unlogged.items() if stat == MEASURED and value < 0.5}
        self._warn_unmeasured(step, unmeasured & observed, unlogged)

        stats: dict[str, dict[str, float]] = {}
        metrics: dict[str, float] = {}
        unknown: dict[str, list[str]] = {}
        unknown_extras: dict[str, float] = {}
        pairs = [*zip(names, host_values), *(((None, key), value) for key, value in (extras or {}).items())]
        for (tap_index, stat), value in pairs:
            if tap_index is None and math.isnan(value):
                self._warn_once(self._unknown_extras_warned, stat, self.unknown_extra(stat, step))
                if stat in self.history:  # was known: "unknown now" replaces that value; never known stays absent
                    unknown_extras[stat] = math.nan
                continue
            if tap_index is None:
                key = stat
            elif tap_index not in observed or tap_index in unmeasured or stat.startswith("_"):
                continue
            else:
                tap_name = self.taps[tap_index].name
                if math.isnan(value):  # unknown at this step: a NaN would read like a measurement in every logger
                    unknown.setdefault(tap_name, []).append(stat)
                    continue
                stats.setdefault(tap_name, {})[stat] = value
                key = f"{self.prefix}/{tap_name}/{stat}"
            metrics[key] = value
            self.record(key, step, value)
        for series in self.history.values():  # a key without a value at this step is thinned as of it too
            series.advance(step)
        for tap_name, names_unknown in unknown.items():
            first_time = [stat for stat in names_unknown if f"{tap_name}/{stat}" not in self._unknown_warned]
            if first_time:
                self._unknown_warned.update(f"{tap_name}/{stat}" for stat in first_time)
                rank_zero_warn(f"{type(self).__name__}: {tap_name} {self.unknown_statistics(first_time, step)}",
                               category=UserWarning)
        self.log_metrics(trainer, metrics, step)
        # callback_metrics say "unknown now" (NaN) rather than keep the last known value: EarlyStopping(check_finite)
        # and ModelCheckpoint act on it as on a NaN loss; the loggers and histories get no such point. So do the extra
        # statistics once known (a params/r90 of weights gone NaN kept its last finite value there, and EarlyStopping
        # ran on); one not known yet (weights frozen since fit start) stays absent, for strict=False to wait for it
        unknown_now = {f"{self.prefix}/{tap}/{stat}": math.nan for tap, names in unknown.items() for stat in names}
        unknown_now.update(unknown_extras)
        self.publish(trainer, {**metrics, **unknown_now})
        self.on_statistics(trainer, step, stats)
        return metrics

    def unknown_statistics(self, stats: list[str], step: int) -> str:
        """Why a tap's statistics ``stats`` are unknown (NaN) at ``step``, said once per tap as they go unlogged;
        subclasses name their statistics' causes (:meth:`unknown_cause`)."""
        return (
            f"{'/'.join(stats)} {'is' if len(stats) == 1 else 'are'} unknown at step {step} "
            f"({self.unknown_cause(stats)}); a statistic is not logged at a step where it is unknown"
        )

    def unknown_cause(self, stats: list[str]) -> str:
        """What makes the statistics ``stats`` unknown (NaN), in a few words."""
        return "NaN: undefined for this step's activations, e.g. no finite entry"

    def unknown_extra(self, key: str, step: int) -> str:
        """Why the extra statistic ``key`` is unknown (NaN) at ``step``, said once as it goes unlogged."""
        return f"is unknown at step {step}; it is not logged at such steps"

    def _warn_once(self, warned: set[str], tap_name: str, problem: str) -> None:
        """One warning per tap and kind of problem: ``<monitor>: <tap> <problem>``."""
        if tap_name not in warned:
            warned.add(tap_name)
            rank_zero_warn(f"{type(self).__name__}: {tap_name} {problem}", category=UserWarning)

    def _warn_unobserved(self, step: int, observed: set[int]) -> None:
        ran_empty, self._ran_empty = self._ran_empty, {}
        for i, tap in enumerate(self.taps):
            if i in observed or tap.name in self._low_dim_warned:  # a low-dimensional tap was said already
                continue
            if i in ran_empty:
                problem = f"gave only empty activations at step {step} ({empty_cause(ran_empty[i])})"
            else:
                problem = (
                    f"produced no activation at step {step} (its module did not run in the observed forwards, or what "
                    "it gives is not a floating-point tensor: a complex one, such as torch.stft's with "
                    "return_complex=True (tap a module after .abs() or torch.view_as_real), a dict, a PackedSequence, "
                    "integers, a sparse tensor, or a nested tensor, which nn.TransformerEncoder's fast path makes in "
                    "eval with a padding mask: pass enable_nested_tensor=False there)"
                )
            self._warn_once(self._unobserved_warned, tap.name, f"{problem}; nothing is logged for it at such steps")

    def _warn_low_dim(self, tap_index: int, ndim: int) -> None:
        """Warn once per tap that a call's activation has under 2 axes ((B,), a scalar, or one unbatched example),
        which is left out: its calls with a batch axis in the same step are still measured (an RL policy acting on
        one observation beside its batched loss forward was told that nothing is logged, and was logged)."""
        self._warn_once(
            self._low_dim_warned, self.taps[tap_index].name,
            f"outputs a {ndim}-d tensor in a call, not (batch, tokens, features) or (batch, features): an unbatched "
            "call (one example, e.g. a policy acting on one observation), a (batch,) output without features or a "
            "scalar; such calls are left out of its statistics, its calls with a batch axis are measured, and a step "
            "with none logs nothing for it (call it on a batch, e.g. x.unsqueeze(0), or tap a module with features, "
            "e.g. '@blocks')",
        )

    def _warn_unmeasured(self, step: int, taps: set[int], unlogged: dict[tuple[int, str], float]) -> None:
        """Say once per tap of ``taps`` that it was not measured at ``step``; ``unlogged``: the step's statistics
        named ``_...`` by (tap, name), which a subclass reads the reason from."""
        for i in sorted(taps):
            self._warn_once(
                self._unmeasured_warned, self.taps[i].name,
                f"gave too little at step {step} to measure ({self.unmeasured_reason}); nothing is logged for it at "
                "such steps",
            )

    def _zero_buffers(self) -> None:
        """Reset every buffer in place (a fixed number of operations, whatever the number of taps)."""
        sums = [buffer for buffer in self._sums if buffer is not None]
        if sums:
            torch._foreach_zero_(sums)
        maxima = [buffer for buffer in self._maxima if buffer is not None]
        if maxima:
            torch._foreach_zero_(maxima)
            torch._foreach_add_(maxima, float("-inf"))
        samples = [buffer for buffer in self._samples if buffer is not None]
        if samples:
            torch._foreach_mul_(samples, float("nan"))  # NaN slots are absent (the next activation replaces them)

    def record(self, key: str, step: int, value: float) -> None:
        series = self.history.get(key)
        if series is None:
            series = self.history[key] = BoundedSeries(self.history_size)
        series.append(step, value)

    @staticmethod
    def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ state and plots
    def series(self, stat: str) -> dict[str, BoundedSeries]:
        """``{tap name: history}`` of one statistic."""
        suffix = f"/{stat}"
        return {
            key[len(self.prefix) + 1 : -len(suffix)]: s
            for key, s in self.history.items()
            if key.startswith(self.prefix + "/") and key.endswith(suffix)
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap_stat is None or not trainer.is_global_zero:
            return
        series = self.series(self.heatmap_stat)
        if not series:
            return
        from lightning_act.plots import layer_step_heatmap, log_figure

        figure = layer_step_heatmap(series, f"{self.prefix}/{self.heatmap_stat}", self.heatmap_steps(series))
        log_figure(trainer, figure, self.output_name(trainer, f"{self.prefix}_{self.heatmap_stat}_heatmap"))

    def heatmap_steps(self, series: dict[str, BoundedSeries]) -> list[int]:
        """The heatmap's columns: every step at which this monitor logged one of the layers, with the steps where the
        statistic was unknown (not logged, so absent from its history; blank cells there, not a closed-up gap).

        Those steps come from the layers' other statistics while no history of the statistic is thinned
        (``history_size``) and only from unthinned histories: a step a thinned history dropped is no unknown value.
        """
        steps = {step for one in series.values() for step in one.steps}
        if any(one.stride > 1 for one in series.values()):
            return sorted(steps)
        layer_keys = tuple(f"{self.prefix}/{layer}/" for layer in series)
        for key, one in self.history.items():
            if key.startswith(layer_keys) and one.stride == 1:
                steps.update(one.steps)
        return sorted(steps)

    def output_name(self, trainer: pl.Trainer, name: str) -> str:
        """``name`` of a figure or table, numbered when the Trainer has several monitors of this class (on other
        modules): ``name``, ``name_2``, ... in callback order (they overwrote one another's file and logger key)."""
        alike = [c for c in trainer.callbacks if type(c) is type(self) and getattr(c, "prefix", None) == self.prefix]
        position = next(i for i, c in enumerate(alike) if c is self)
        return name if position == 0 else f"{name}_{position + 1}"


