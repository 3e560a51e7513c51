"""One forward hook per tapped (module, point), shared by every monitor, kept for the whole fit.

Why hooks stay attached: ``torch.compile`` traces the hooks that exist when a module is first
compiled and silently ignores hooks added or removed later (dynamo installs no guard on the hook
dicts), so attaching hooks only around due steps observes step 0 and nothing after it. Hooks are
therefore registered once, at ``setup`` (before the first forward), and dynamo's compiled code is forgotten
whenever the hooks of a root holding a compiled module change (:meth:`CaptureRegistry._forget_compiled_code`): code compiled earlier
in the process — a fit of another instance of the same classes without monitors — would be reused without the
hooks. The work is *gated*: the traced hook body reads one Python flag, :attr:`CaptureRegistry.observing`.
Dynamo turns that read into a guard, so a compiled model has at most two variants — not observing
(the hook is a no-op, the graph is the user's) and observing — and switching between them is a
cache hit, never a recompilation per due step. The first of them dynamo traces must be the one not observing (see
:meth:`CaptureRegistry._observe_first_forward_eagerly`). The statistics themselves run in
:func:`_deliver`, which is ``torch._dynamo.disable``'d: in the observing variant each tap is a
graph break where the real activation is handed to the monitors eagerly (no host sync, no
data-dependent Python branching inside a traced region).

Sharing: a module tapped by several monitors gets one hook; each forward hands its activation once
to every subscribed monitor that is armed, in the sample-first layout that monitor asked for
(:mod:`lightning_act.capture.layout`). A subscriber implements ``receive(tap_index, x)`` and has an
``armed`` flag, and may have ``features_unknown(tap_index, shape)``, called when nothing tells which axis of a
4-D activation holds the features, and ``activations_unbatched(tap_index, shape)``, called instead of ``receive`` for
an activation without a sample axis (:func:`~lightning_act.capture.layout.looks_unbatched`), and
``flattened_from(tap_index, spatial)``, called before each ``receive`` with the spatial shape of the channels-last map
``(B, *spatial, C)`` its ``(B, tokens, C)`` activation was flattened from (None: none was), and
``activations_empty(tap_index, shape)``, called instead of ``receive`` for an activation of 0 entries (a 0-d one goes
to ``activations_unbatched``). One read for all of
them (issue 17): a subscriber that also has ``fused_spec(tap_index)`` returning a
:class:`~lightning_act.stats.fused.FusedSpec` gets ``receive(tap_index, x, fused)``, where ``fused`` comes from a single
:func:`~lightning_act.stats.fused.fused_statistics` pass over the union of the specs of every armed
subscriber of that tap (per layout; in practice all share one), so a tensor tapped by three monitors
is read once for all their fused statistics. Statistics that are not fused (CETT, temporal sparsity,
covariances, neuron tracking) still read ``x`` themselves. The pass runs inside :func:`_deliver`,
which is never traced, so the eager implementations (Triton on CUDA, the torch fallback elsewhere)
serve compiled models too.

A monitor's own probe passes (``SensitiveNeurons``' tracking set, ``MassiveActivations(probe="val")``) are not
training forwards: inside :meth:`CaptureRegistry.exclusive` they are handed to that monitor alone, so another monitor
armed for the step being trained (until its backward, or until the end of the step under manual optimization)
does not count them. Such a pass may also end each forward early (:class:`ForwardCutoff`): once the monitor holds
every activation it taps, the rest of the model computes nothing it reads.

Forwards of a tapped module with another network's weights bound in place of its parameters (a target network run as
``torch.func.functional_call(net, target_params, x)``, torchrl's ``params.to_module(net)``) are left out, said once per
tap (:func:`_rebound_to_other_weights`); a list of per-image or per-level tensors is no activation, said once per tap
(:func:`is_tensor_list`).

Input taps read a module's first positional argument or, when the module is called by keyword (Hugging Face
attention modules are called as ``self_attn(hidden_states=h, ...)``), the keyword argument of its ``forward``'s
first parameter.

An input tap reads *through a dropout* that feeds it: when in a training forward a dropout among the tapped module's
siblings (the children of its parent) gave the very tensor the module receives, unchanged since (its version
counter), the tap reads the dropout's input. Every call of such a dropout in the step's training forwards is kept
until the tap reads its output (or the monitors disarm), matched by the output's identity: one dropout may serve two
views before the module reads either (``h1, h2 = drop(enc(a)), drop(enc(b)); head(h1); head(h2)``). Not in a
monitor's own passes: the stochastic EigenScore passes of ``SensitiveNeurons`` are made of that noise. Dropout is
training noise, not the
representation: ``@penultimate`` on a timm model with ``drop_rate > 0`` read the head dropout's output (a rank-1
feature set logged an effective rank of 80 of 96), and ``@activations`` on ``nn.TransformerEncoderLayer`` (whose
activation is a function, so ``linear2``'s input is tapped) counted the dropout's zeros as sparsity. A functional
dropout (``F.dropout`` in a forward) cannot be seen; an in-place one (``inplace=True``) is read from a copy of its
input taken just before it runs.

Copies and TorchScript: a hook holds its registry strongly (dynamo traces plain attribute reads), but drops it
when the model is pickled or deep-copied, so a copy carries a detached hook and no monitor state; a detached hook
leaves its module at its first eager call (:class:`MonitorHook`). TorchScript compiles every hook of a module it
scripts and needs functions it can compile, which no monitor hook is: each module holding one gets a
``__prepare_scriptable__`` (TorchScript's own protocol, called before it reads the hooks) that takes the monitor hooks
off, for good on a copy, until the next forward of any module or the next arming of a monitor (``to_torchscript()``
in a callback of the fit).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.hooks import RemovableHandle

from lightning_act.capture.layout import (
    Layout,
    flattened_spatial_shape,
    looks_unbatched,
    sample_first_by_its_layers,
    to_sample_first,
    with_canonical_features,
)
from lightning_act.capture.selection import Tap, module_chain
from lightning_act.precision import autocast_off
from lightning_act.stats.fused import FusedSpec, FusedStats, fused_statistics


class Subscriber(Protocol):
    """What a monitor offers the registry: an ``armed`` flag and a sink for activations (and, optionally,
    ``fused_spec(tap_index) -> FusedSpec | None``; then ``receive`` also gets the fused statistics)."""

    armed: bool

    def receive(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> None: ...


def model_output_field(output: Any) -> Any:
    """The key of the activation in a Hugging Face ``ModelOutput`` (a dict with ``to_tuple``): its first field that
    is a tensor with a sample axis (``last_hidden_state``; ``logits`` after the scalar ``loss`` of a model given
    labels); None for anything else."""
    if not isinstance(output, dict) or not callable(getattr(output, "to_tuple", None)):
        return None
    return next((key for key, value in output.items() if isinstance(value, torch.Tensor) and value.dim() >= 1), None)


def activation_index(value: Any) -> Any:
    """Where a module's output or inputs hold the activation: the index of the first item of a tuple/list that is a
    tensor with a sample axis or a nested tuple/list (an MoE or auxiliary-loss layer's ``(aux_loss, hidden)``, a Hugging
    Face model's ``(loss, logits)`` with ``return_dict=False``: not the scalar), else its first item; a ``ModelOutput``'s
    field (:func:`model_output_field`); None for anything else (a tensor, a ``PackedSequence``, a plain dict, a list of
    several tensors: :func:`is_tensor_list`). The capture (:func:`first_tensor`) and SeND's drop (``FeatureDrop``) both
    ask it, so they read and zero one item."""
    if isinstance(value, dict):
        return model_output_field(value)
    if not isinstance(value, (tuple, list)) or isinstance(value, PackedSequence) or not value or is_tensor_list(value):
        return None
    for index, item in enumerate(value):
        if (isinstance(item, torch.Tensor) and item.dim() >= 1) or isinstance(item, (tuple, list)):
            return index
    return 0


def is_tensor_list(value: Any) -> bool:
    """Whether ``value`` is a Python list of two or more floating-point tensors of one rank: one per image or per
    level (torchvision's RPN proposals and anchors, its RPN head's per-level maps, a timm ``features_only`` backbone's
    stages, a detector called with a list of images), not one activation with side items, which models return as
    tuples (``(x, mask)``, ``(output, (h, c))``, a U-Net block's ``(skip, pooled)``) or with items of other kinds.
    Its first item alone, read as the whole batch, gave image 0's rows or the first level only. A tuple of pyramid
    levels (MMDetection's ``tuple(outs)``) is read by its first level, as a tuple is (a shape rule took U-Net blocks
    for pyramids)."""
    if type(value) is not list or len(value) < 2:
        return False
    ranks = {item.dim() if isinstance(item, torch.Tensor) and item.is_floating_point() else -1 for item in value}
    return len(ranks) == 1 and -1 not in ranks


def holds_tensor_list(value: Any) -> bool:
    """Whether the activation :func:`first_tensor` looks for in ``value`` is a list of tensors (:func:`is_tensor_list`),
    itself or as the item it reads of a tuple (``([logits per level], [deltas per level])``)."""
    for _ in range(3):
        if is_tensor_list(value):
            return True
        index = activation_index(value)
        if index is None:
            return False
        value = value[index]
    return False


def first_tensor(value: Any) -> torch.Tensor | None:
    """The activation tensor in a module's output or inputs (:func:`activation_index`, also nested: a module called
    with ``(x, mask)`` as one argument), if it can be read as one: a floating-point strided tensor with data (float8
    too, which :func:`_deliver` hands over as float32).
    Not a ``PackedSequence`` (a tuple whose first field holds the tokens of all sequences, without a sample axis), a
    plain dict, a nested or sparse tensor, a tensor on the meta device (no data), packed float4 (two values per
    element) or integers; the monitors then warn that the tap gave them nothing."""
    for _ in range(3):  # a module called with a tuple ((x, mask),): its first item's activation
        index = activation_index(value)
        if index is None:
            break
        value = value[index]
    readable = isinstance(value, torch.Tensor) and value.layout == torch.strided and value.dtype in _READABLE_DTYPES
    if readable and not value.is_nested and not value.is_meta:
        return value
    return None


#: One byte per value: no statistic computes in them (torch promotes none of them), so each activation is handed to the
#: monitors as float32, which holds every float8 value exactly.
_FLOAT8_DTYPES = frozenset(
    dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype) and str(dtype).startswith("torch.float8")
)
_READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}) | _FLOAT8_DTYPES


@dataclass
class _Subscription:
    subscriber: Subscriber
    tap_index: int
    layout: Layout
    #: Called with the shape of the tap's first activation of 3 or more axes, where its layout is undeclared and the
    #: subscriber asked to be told (:meth:`CaptureRegistry.subscribe`); ``None`` once told, or not asked.
    undeclared_layout: Callable[[tuple[int, ...]], None] | None = None


def input_parameter(module: nn.Module) -> str | None:
    """The name under which a keyword call passes ``module``'s input: its ``forward``'s first parameter."""
    try:
        parameters = iter(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature Python can read
        return None
    first = next(parameters, None)
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return first.name if first is not None and first.kind in keyword_kinds else None


def tapped_input(args: tuple[Any, ...], kwargs: dict[str, Any], parameter: str | None) -> Any:
    """What an input tap reads: the positional arguments, or the keyword argument ``parameter`` when there are none."""
    if args or parameter is None:
        return args
    return kwargs.get(parameter)


#: What dynamo says where a model compiled with ``fullgraph=True`` reaches a monitor's tap (a graph break there is an
#: error, and its default hint, "remove the torch.compiler.disable call", points into this library).
_FULLGRAPH_REASON = (
    "lightning_act's monitors read activations eagerly, a graph break at each tapped module on due steps, so a model "
    "compiled with fullgraph=True cannot be observed: compile without fullgraph=True or remove the monitors"
)


class MonitorHook:
    """What a monitor puts on a module as a forward (pre-)hook, itself or by a bound method.

    ``attached`` is True while the monitor keeps it on its module. A copy of the model (pickled, deep-copied: an EMA,
    a teacher, a saved snapshot) carries it detached, without the attributes named in ``_not_copied`` (the registry,
    bound to the monitored model): at its first eager call, or when TorchScript scripts the copy, it leaves the module,
    so the copy computes what the same weights compute without monitors, and costs nothing after. A call dynamo
    traces (``torch.compile``, ``fullgraph=True`` or a strict ``torch.export`` of an EMA copy) leaves it in place,
    traced to nothing: taking it off there was a graph break, and the copy's compiled graph held almost nothing."""

    attached = True
    _not_copied: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self._not_copied), "attached": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """An unpickled hook is never its monitor's own: pickles of c77375e and earlier hold no ``attached`` (the
        class default True kept their hooks acting, e.g. a SeND drop in a saved snapshot)."""
        self.__dict__.update(state)
        self.attached = False


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_PREPARE_SCRIPTABLE = "__prepare_scriptable__"


def _monitor_hook_of(hook: Any) -> MonitorHook | None:
    """The :class:`MonitorHook` a registered hook is or is a bound method of; None for other hooks."""
    owner = hook if isinstance(hook, MonitorHook) else getattr(hook, "__self__", None)
    return owner if isinstance(owner, MonitorHook) else None


def _take_hooks_off(
    module: nn.Module, which: Callable[[MonitorHook], bool]
) -> list[tuple[str, list[int], dict[int, Any]]]:
    """Take ``module``'s monitor hooks for which ``which`` holds out of its hook dicts: per dict, its name, the order
    of its ids before and the hooks taken."""
    taken = []
    for name in _HOOK_DICTS:
        hooks = getattr(module, name)
        order = list(hooks)
        off = {i: hook for i, hook in hooks.items() if (owner := _monitor_hook_of(hook)) is not None and which(owner)}
        for i in off:
            del hooks[i]
        if off:
            taken.append((name, order, off))
    return taken


def _forget_flags(module: nn.Module, ids: list[int]) -> None:
    """Drop the kwargs/always-called flags of the hooks ``ids``, taken off for good."""
    for flags in _HOOK_FLAGS:
        for i in ids:
            getattr(module, flags).pop(i, None)


def _holds_monitor_hooks(module: nn.Module) -> bool:
    return any(_monitor_hook_of(hook) is not None for name in _HOOK_DICTS for hook in getattr(module, name).values())


@torch._dynamo.disable(reason=_FULLGRAPH_REASON)
def leave_module(module: nn.Module, hook: MonitorHook) -> None:
    """Take a detached hook (a copy's) off ``module`` for good, at its first call."""
    _forget_flags(module, [i for _, _, off in _take_hooks_off(module, lambda owner: owner is hook) for i in off])
    if not _holds_monitor_hooks(module):
        module.__dict__.pop(_PREPARE_SCRIPTABLE, None)


class MonitorHookHandle:
    """The handle of a hook put on by :func:`register_monitor_hook`; ``remove()`` detaches it."""

    def __init__(self, module: nn.Module, hook: MonitorHook, handle: RemovableHandle) -> None:
        self.module, self.hook, self.handle = module, hook, handle

    def remove(self) -> None:
        self.hook.attached = False
        self.handle.remove()
        if not _holds_monitor_hooks(self.module):
            self.module.__dict__.pop(_PREPARE_SCRIPTABLE, None)


def register_monitor_hook(
    module: nn.Module, hook: Callable[..., Any], pre: bool = False, **options: Any
) -> MonitorHookHandle:
    """Put ``hook`` (a :class:`MonitorHook` or its bound method) on ``module`` as a forward hook (``pre``: a
    pre-hook; ``options`` as torch's ``register_forward_(pre_)hook`` takes them), and the module's
    ``__prepare_scriptable__`` that takes it off for TorchScript (see the module docstring)."""
    owner = _monitor_hook_of(hook)
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook, **options)
    module.__dict__[_PREPARE_SCRIPTABLE] = functools.partial(_prepare_scriptable, module)
    return MonitorHookHandle(module, owner, handle)


#: Monitor hooks taken off live modules for TorchScript: (module, hook dict name, its order then, the hooks).
_OFF_FOR_SCRIPTING: list[tuple[weakref.ref[nn.Module], str, list[int], dict[int, Any]]] = []
_put_back_handle: RemovableHandle | None = None


def _prepare_scriptable(module: nn.Module) -> nn.Module:
    """``module.__prepare_scriptable__``, which ``torch.jit.script`` calls on every module before it compiles their
    hooks: the monitor hooks go off. A copy's (detached) go for good; a monitored model's come back when a monitor
    arms or at the next forward of any module (:func:`restore_hooks_taken_for_scripting`), so a callback that exports
    the model with ``to_torchscript()`` mid-fit gets a scripted model without them and the fit goes on observed. The
    module's class's own ``__prepare_scriptable__``, if any, runs after."""
    global _put_back_handle
    kept = []
    for name, order, off in _take_hooks_off(module, lambda owner: True):
        live = {i: hook for i, hook in off.items() if _monitor_hook_of(hook).attached}
        _forget_flags(module, [i for i in off if i not in live])
        if live:
            kept.append((name, order, live))
    if kept:
        _OFF_FOR_SCRIPTING.extend((weakref.ref(module), *entry) for entry in kept)
        if _put_back_handle is None:
            _put_back_handle = nn.modules.module.register_module_forward_pre_hook(_put_back_after_scripting)
    else:
        module.__dict__.pop(_PREPARE_SCRIPTABLE, None)
    own = getattr(type(module), _PREPARE_SCRIPTABLE, None)
    return module if own is None else own(module)


@torch._dynamo.disable(reason=_FULLGRAPH_REASON)
def _put_back_after_scripting(*_: Any) -> None:
    """:func:`restore_hooks_taken_for_scripting` at the first forward of any module after a scripting (a global
    pre-hook, which TorchScript does not read). Too late for the called module's own pre-hooks (input taps, SeND's
    drop), which torch lists before it runs any: a monitor arming for a step puts them back before
    (:meth:`CaptureRegistry.refresh`)."""
    restore_hooks_taken_for_scripting()


def restore_hooks_taken_for_scripting() -> None:
    """The monitor hooks taken off for TorchScript back in their places, those still attached, with the module's
    ``__prepare_scriptable__`` (it goes when a module holds no monitor hook: a second scripting before a forward, or
    a hook removed meanwhile, found none). At the first forward of any module after the scripting, or earlier where a
    monitor arms for a step."""
    global _put_back_handle
    if _put_back_handle is not None:
        _put_back_handle.remove()
        _put_back_handle = None
    entries = list(_OFF_FOR_SCRIPTING)
    _OFF_FOR_SCRIPTING.clear()
    for module_ref, name, order, off in entries:
        module = module_ref()
        back = {i: hook for i, hook in off.items() if _monitor_hook_of(hook).attached}
        if module is None or not back:
            continue
        hooks = getattr(module, name)
        now = dict(hooks)
        hooks.clear()
        for i in order:
            if i in back:
                hooks[i] = back[i]
            elif i in now:
                hooks[i] = now.pop(i)
        hooks.update(now)
        module.__dict__[_PREPARE_SCRIPTABLE] = functools.partial(_prepare_scriptable, module)


def _making_a_program() -> bool:
    """Whether the forward running makes a program of the model rather than trains it: ``torch.export`` (strict or
    not, hence ``LightningModule.to_onnx``) or ``torch.jit.trace`` of a module, its ``check_trace`` re-runs included
    (run by a callback while the monitors are armed for a due step). Observed, the trace's example input was counted
    as training data, and an export handed the monitors symbolic tensors (the fit then failed in their statistics) or
    put their statistics into the exported graph. Dynamo reads it as a constant: no graph break, nothing traced."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()
            or getattr(_JIT_TRACE, "_trace_module_map", None) is not None)  # private: absent in another torch, not set


#: ``torch.jit._trace``, whose ``_trace_module_map`` is set while ``torch.jit.trace`` traces a module.
_JIT_TRACE = getattr(torch.jit, "_trace", None)


class _CaptureHook(MonitorHook):
    """The forward hook of one (module, output): a flag check, then :func:`_deliver`. A hook taken off (its tap moved
    to a new module) that still runs leaves at once: torch's quantization ``swap_module`` copies a module's hooks onto
    the module replacing it, beside the one the monitor then puts there."""

    _not_copied = ("registry",)

    def __init__(self, registry: CaptureRegistry, key: tuple[int, str]) -> None:
        self.registry: CaptureRegistry | None = registry
        self.key = key

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        registry = self.registry
        if self.attached and registry is not None and registry.observing and not _making_a_program():
            _deliver(registry, self.key, output)
        elif not self.attached and not torch.compiler.is_compiling():
            leave_module(module, self)


class _InputCaptureHook(_CaptureHook):
    """The forward pre-hook (with keyword arguments) of one (module, input). It is also called without them: torch's
    quantization ``swap_module`` (``prepare_qat``, ``convert``) copies a module's pre-hooks onto the new one without
    their ``with_kwargs`` flag, and a fit that switched to QAT mid-way, or converted a copy, died on the missing
    argument."""

    def __init__(self, registry: CaptureRegistry, key: tuple[int, str], parameter: str | None) -> None:
        super().__init__(registry, key)
        self.parameter = parameter

    def __call__(  # type: ignore[override]
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> None:
        registry = self.registry
        if self.attached and registry is not None and registry.observing and not _making_a_program():
            _deliver(registry, self.key, tapped_input(args, kwargs or {}, self.parameter))
        elif not self.attached and not torch.compiler.is_compiling():
            leave_module(module, self)


class _DropoutInputHook(MonitorHook):
    """The forward hook of a dropout that feeds an input tap: keeps (output, input) of each of its calls in a training
    forward for the tap's pre-hook, which reads the input when the output is what it receives (see the module
    docstring). An in-place dropout overwrites its input, so its pre-hook (:meth:`before`) keeps a copy first."""

    _not_copied = ("registry",)

    def __init__(self, registry: CaptureRegistry, key: tuple[int, str]) -> None:
        self.registry: CaptureRegistry | None = registry
        self.key = key

    def _training_forward(self, module: nn.Module, args: tuple[Any, ...]) -> bool:
        # training forwards only: a monitor's own stochastic passes (SensitiveNeurons' EigenScore) are that noise
        registry = self.registry
        return (registry is not None and registry.observing and module.training and bool(args)
                and registry.exclusive_subscriber is None and not _making_a_program())

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._training_forward(module, args) and isinstance(args[0], torch.Tensor):
            _copy_dropout_input(self.registry, self.key, args[0])
        elif not self.attached and not torch.compiler.is_compiling():
            leave_module(module, self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._training_forward(module, args):
            if not self.attached and not torch.compiler.is_compiling():
                leave_module(module, self)
            return
        _remember_dropout_input(self.registry, self.key, output, None if getattr(module, "inplace", False) else args[0])


@torch._dynamo.disable(reason=_FULLGRAPH_REASON)
def _copy_dropout_input(registry: CaptureRegistry, key: tuple[int, str], value: torch.Tensor) -> None:
    """An in-place dropout is about to overwrite ``value``: a copy for its forward hook."""
    with _outside_dispatch_modes():  # a monitor's copy: not one of the ops a recompute in backward must repeat
        registry.dropout_input_copies[key] = value.detach().clone()


@torch._dynamo.disable(reason=_FULLGRAPH_REASON)
def _remember_dropout_input(registry: CaptureRegistry, key: tuple[int, str], output: Any, value: Any) -> None:
    """Keep ``value`` (``None``: the copy an in-place dropout's pre-hook took) as the input behind ``output``, by the
    output's identity: one dropout may feed the tap several times in a forward (two views dropped before the head
    reads either), and each call of the tap finds its own. With the output's version: changed in place before the
    tap (a residual added with +=), it is no dropout output."""
    if value is None:
        value = registry.dropout_input_copies.pop(key, None)
    if isinstance(output, torch.Tensor) and value is not None:
        _keep_passage(registry.before_dropout.setdefault(key, {}), output, value)


def _keep_passage(passages: dict[int, tuple[weakref.ref[torch.Tensor], Any, int]], output: torch.Tensor,
                  value: Any) -> None:
    """``passages[id(output)]`` = (output, the input behind it, the output's version), the output held weakly: the
    entry goes with it, so the calls of dropouts beside the tap whose outputs it never reads (an encoder layer's
    residual dropouts, run once per layer call) are not held through the step."""
    identity = id(output)

    def forget(ref: weakref.ref[torch.Tensor]) -> None:
        if passages.get(identity, (None,))[0] is ref:
            del passages[identity]

    passages[identity] = (weakref.ref(output, forget), value, output._version)


def dropouts_beside(root: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The dropouts among ``module``'s siblings (the children of its parent): timm's ``head_drop`` beside ``head``,
    ``nn.TransformerEncoderLayer``'s ``dropout`` beside ``linear2``, timm ``Mlp``'s ``drop1`` beside ``fc2``, Hugging
    Face T5's ``dropout`` (registered after its ``wo``). Whether one feeds ``module`` is checked in each forward, on
    the tensors."""
    for parent in root.modules():
        children = list(parent.children())
        if any(child is module for child in children):
            return [child for child in children if isinstance(child, nn.modules.dropout._DropoutNd)]
    return []


def _fused_spec(subscription: _Subscription) -> FusedSpec | None:
    asks = getattr(subscription.subscriber, "fused_spec", None)
    return None if asks is None else asks(subscription.tap_index)


class _ForwardComplete(BaseException):
    """Raised inside a cut-off forward after its last delivery; a ``BaseException``, so that a model's own
    ``except Exception`` (a fallback around an attention kernel, say) does not swallow it."""


class ForwardCutoff:
    """Ends a monitor's probe forwards once every activation it taps has been handed to it.

    Why: a probe reads a few modules, and what runs after the last of them computes nothing it reads: a classifier,
    or a language model's vocabulary head, which can be most of a small model's forward (with Lightning's demo
    Transformer, ``SensitiveNeurons`` at every step cost 5.07 bare steps with whole forwards and 1.43 with ended ones:
    ``docs/performance.md``, round 13).

    The first pass runs whole and records how many deliveries each tapped (module, point) makes per forward. When
    every forward of that pass made the same ones, later forwards end, by an exception raised after the last
    delivery and caught around the forward, as soon as every count is reached; the activations handed over are the
    ones a whole forward hands over. Forwards that differ within the first pass (control flow that depends on the
    data) keep the cutoff off, and so does a tap of the monitor that delivered nothing in the first pass (a
    mixture-of-experts expert given no token then, called on 0 rows or skipped): a later forward that routes tokens to
    it would have been ended before it ran, and it would never be measured. A forward that would call a tapped module
    more often than the first pass recorded, after all the recorded calls, is not observed: pass
    ``stop_after_taps=False`` to the monitor for such a model.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        #: The (module, point) keys the probing monitor taps (set by :meth:`CaptureRegistry.exclusive`).
        self.tapped: frozenset[tuple[int, str]] = frozenset()
        #: Deliveries per (module, point) in one forward, once known; ``None`` until the first pass is complete.
        self.expected: collections.Counter[tuple[int, str]] | None = None
        self._recorded: list[collections.Counter[tuple[int, str]]] = []
        self._seen: collections.Counter[tuple[int, str]] = collections.Counter()

    def forward(self, run: Callable[[], Any]) -> None:
        """Run one probe forward, ended early when the counts are known."""
        self._seen = collections.Counter()
        try:
            run()
        except _ForwardComplete:
            return
        if self.enabled and self.expected is None:
            self._recorded.append(self._seen)

    def pass_complete(self) -> None:
        """After a pass over every probe batch: the first one fixes the counts (or turns the cutoff off)."""
        if not self.enabled or self.expected is not None:
            return
        recorded, self._recorded = self._recorded, []
        complete = recorded and recorded[0] and self.tapped <= recorded[0].keys()
        if complete and all(counts == recorded[0] for counts in recorded):
            self.expected = recorded[0]
        else:
            self.enabled = False

    def delivered(self, key: tuple[int, str]) -> None:
        """Called by the registry after each delivery to the probing monitor."""
        self._seen[key] += 1
        expected = self.expected
        if expected is not None and all(self._seen[k] >= n for k, n in expected.items()):
            raise _ForwardComplete


_autocast_available = functools.cache(torch.amp.is_autocast_available)


def _own_precision(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The monitors' arithmetic in the tensor's own precision: under the training step's autocast the CETT and
    sketch matmuls ran in float16 (norms beyond 65504 became inf) or bfloat16. Not in inference mode either (a
    forward under ``torch.inference_mode()`` in the step): buffers made there refuse the in-place updates that
    follow. Nothing to enter in the usual case (~1 µs to ask, ~9 µs to enter both on a CPU)."""
    autocast = _autocast_available(device_type) and torch.is_autocast_enabled(device_type)  # not on meta
    inference = torch.is_inference_mode_enabled()
    if not autocast and not inference:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if inference:
        stack.enter_context(torch.inference_mode(False))
    if autocast:
        stack.enter_context(autocast_off(device_type))
    return stack


def _outside_dispatch_modes() -> contextlib.AbstractContextManager[Any]:
    """The monitors' own tensor operations outside the dispatch modes the user's forward runs under: selective
    activation checkpointing's caching mode numbers the ops of its region and keeps those its policy saves, so a
    monitor's matmul (CETT's) counted as the model's was handed to the model's recompute in backward (a crash, or
    wrong gradients where the shapes agree). Nothing to leave in the usual case (~0.1 µs to ask, ~12 to leave)."""
    if _dispatch_stack_length() == 0 and _pre_dispatch_stack_length() == 0:
        return contextlib.nullcontext()
    return _disable_current_modes()


_dispatch_stack_length = torch._C._len_torch_dispatch_stack
_pre_dispatch_stack_length = torch._ops._len_torch_dispatch_stack_pre_dispatch
_functorch_active = torch._C._are_functorch_transforms_active
_graph_task_id = torch._C._current_graph_task_id  # -1 outside the autograd engine


@torch._dynamo.disable(reason=_FULLGRAPH_REASON)
def _deliver(registry: CaptureRegistry, key: tuple[int, str], value: Any) -> None:
    if _graph_task_id() != -1:
        # a forward the autograd engine recomputes (activation checkpointing, in backward or in an
        # autograd.grad of the step): the training forward was read already
        return
    if registry.exclusive_subscriber is None:
        registry.training_forward_observed = True
    if _functorch_active():
        if not registry.transform_warned:
            registry.transform_warned = True
            warnings.warn(
                "lightning_act: a monitored module ran inside a torch.func transform (vmap, grad, jvp: e.g. "
                "per-sample gradients); its activations there are not observed, only those of forwards outside it",
                UserWarning, stacklevel=2,
            )
        return
    passages = registry.before_dropout.get(key) if registry.exclusive_subscriber is None else None
    if passages:
        received = first_tensor(value)
        passage = None if received is None else passages.pop(id(received), None)  # read once: no step-long hold
        if passage is not None and passage[0]() is received and received._version == passage[2]:
            value = passage[1]  # the tapped module's input came out of a dropout, unchanged since: read what went in
    witness = registry.witnesses.get(key)
    if witness is not None and _rebound_to_other_weights(*witness):
        registry.other_weights_given(key)
        return
    tensor = first_tensor(value)
    if tensor is None and holds_tensor_list(value):
        registry.tensor_list_given(key)
        return
    if tensor is None or tensor.is_meta or is_fake(tensor):
        return  # a shape-only forward (FakeTensorMode, make_fx's fake tracing, meta tensors) has no values to read
    if tensor.numel() == 0 or tensor.dim() == 0:
        _report_no_entries(registry, key, tuple(tensor.shape))
        return
    with torch.no_grad(), _own_precision(tensor.device.type), _outside_dispatch_modes():
        tensor = tensor.detach()
        if tensor.dtype in _FLOAT8_DTYPES:
            tensor = tensor.float()
        # each layout's view, whether its features are known and the spatial shape it flattened; None: no sample axis
        views: dict[Layout, tuple[torch.Tensor, bool, tuple[int, ...] | None] | None] = {}
        # Subscribers whose layouts give the same view share one fused pass (the usual case: all of them).
        by_view: dict[tuple[Any, ...], tuple[torch.Tensor, list[tuple[_Subscription, FusedSpec | None, Any]]]] = {}
        only = registry.exclusive_subscriber
        for sub in registry.subscriptions.get(key, ()):
            if not sub.subscriber.armed or (only is not None and sub.subscriber is not only):
                continue
            if sub.undeclared_layout is not None and tensor.dim() >= 3:
                registry.layout_undeclared(sub, tuple(tensor.shape))
            if sub.layout not in views:
                sample_first = to_sample_first(tensor, sub.layout)
                unbatched = looks_unbatched(sample_first.shape, sub.layout)
                if unbatched:
                    views[sub.layout] = None
                else:
                    canonical, known = with_canonical_features(
                        sample_first, sub.layout, registry.feature_axes, (key, sub.layout)
                    )
                    views[sub.layout] = canonical, known, flattened_spatial_shape(sample_first, canonical)
            view = views[sub.layout]
            if view is None:
                report_unbatched = getattr(sub.subscriber, "activations_unbatched", None)
                if report_unbatched is not None:
                    report_unbatched(sub.tap_index, tuple(tensor.shape))
                continue
            x, features_known, spatial = view
            report = None if features_known else getattr(sub.subscriber, "features_unknown", None)
            if report is not None:
                report(sub.tap_index, tuple(x.shape))
            members = by_view.setdefault((tuple(x.shape), x.stride()), (x, []))[1]
            members.append((sub, _fused_spec(sub), spatial))
        for x, members in by_view.values():
            specs = [spec for _, spec, _ in members if spec is not None]
            fused: FusedStats | None = None
            if specs:
                fused = fused_statistics(x, specs[0].union(*specs[1:]), registry.fused_implementation)
            for sub, spec, spatial in members:
                note_flattened = getattr(sub.subscriber, "flattened_from", None)
                if note_flattened is not None:
                    note_flattened(sub.tap_index, spatial)
                if spec is None:
                    sub.subscriber.receive(sub.tap_index, x)
                else:
                    sub.subscriber.receive(sub.tap_index, x, fused)
    if only is not None and registry.cutoff is not None and by_view:
        registry.cutoff.delivered(key)


def _rebound_to_other_weights(holder: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    """Whether a plain tensor that takes no gradient stands in ``holder`` for its trained ``parameter`` (the
    witness of a tap, :meth:`CaptureRegistry.subscribe`): the forward runs the module with other weights,
    ``torch.func.functional_call(net, target_params, x)`` or torchrl's ``target_params.to_module(net)`` (a target
    network), and its activations are not the trained network's. Not a new ``nn.Parameter`` (a layer re-made or
    loaded with ``assign=True``), fast weights that take gradients (MAML, a hypernetwork's generated weights), whose
    forwards are the training forwards, nor the parameter's own values detached (same memory). A dict lookup and an
    identity test where nothing is bound (~0.15 µs a call, on due steps only)."""
    bound = holder._parameters.get(name)
    return (bound is not parameter and isinstance(bound, torch.Tensor) and not isinstance(bound, nn.Parameter)
            and not bound.requires_grad and not is_fake(bound) and bound.data_ptr() != parameter.data_ptr())


def _witness(chain: list[nn.Module]) -> tuple[nn.Module, str, nn.Parameter] | None:
    """``(module, name, parameter)`` of the first trained parameter of the innermost module of ``chain`` (a tapped
    module and its owners) that holds one: a functional call of the tapped module or of an owner binds other tensors
    there (:func:`_rebound_to_other_weights`)."""
    for owner in chain:
        for holder in owner.modules():
            for name, parameter in holder._parameters.items():
                if isinstance(parameter, nn.Parameter) and parameter.requires_grad:
                    return holder, name, parameter
    return None


def _report_no_entries(registry: CaptureRegistry, key: tuple[int, str], shape: tuple[int, ...]) -> None:
    """Tell the armed subscribers of tap ``key`` that it ran but gave nothing to read: a scalar, which has no sample
    axis (``activations_unbatched``), or an empty activation, 0 entries (``activations_empty``: no row routed to an
    expert, a sequence of length 0), so that the line they say names what happened, not "did not run"."""
    only = registry.exclusive_subscriber
    for sub in registry.subscriptions.get(key, ()):
        if not sub.subscriber.armed or (only is not None and sub.subscriber is not only):
            continue
        report = getattr(sub.subscriber, "activations_empty" if shape else "activations_unbatched", None)
        if report is not None:
            report(sub.tap_index, shape)


class CaptureRegistry:
    """The shared hooks of one root module (a LightningModule); see the module docstring."""

    def __init__(self, fused_implementation: str = "auto") -> None:
        #: How :func:`fused_statistics` runs ("auto": Triton on CUDA, the eager torch fallback elsewhere).
        self.fused_implementation = fused_implementation
        self.subscriptions: dict[tuple[int, str], list[_Subscription]] = {}
        self.observing = False
        #: While set (:meth:`exclusive`), the only subscriber handed activations.
        self.exclusive_subscriber: Subscriber | None = None
        #: While set (:meth:`exclusive`), counts the deliveries of a probe forward and may end it.
        self.cutoff: ForwardCutoff | None = None
        self._handles: dict[tuple[int, str], MonitorHookHandle] = {}
        self._dropout_handles: dict[tuple[int, str], list[MonitorHookHandle]] = {}
        #: The feature axis decided per (tap, layout) and number of axes, for activations whose shape does not tell.
        self.feature_axes: dict[Any, int] = {}
        #: Per input tap, the (output (weakly), input, output's version) of each call of the dropouts beside it in the
        #: current training forwards, by ``id(output)``; kept until the tap reads the output, the output is freed or
        #: the monitors disarm.
        self.before_dropout: dict[tuple[int, str], dict[int, tuple[weakref.ref[torch.Tensor], Any, int]]] = {}
        #: Per input tap, the copy of an in-place dropout's input taken by its pre-hook, until its forward hook.
        self.dropout_input_copies: dict[tuple[int, str], torch.Tensor] = {}
        #: Whether the forwards inside a torch.func transform, which are not observed, were said to be (to the
        #: subscribers since the registry last had none).
        self.transform_warned = False
        #: The name of each tapped (module, point), for the registry's own lines.
        self.tap_names: dict[tuple[int, str], str] = {}
        #: The taps said to give a list of tensors (:meth:`tensor_list_given`), since the registry last had no subscriber.
        self.tensor_lists_said: set[tuple[int, str]] = set()
        #: Per tap, the trained parameter whose stand-in tells a forward with other weights (:func:`_witness`).
        self.witnesses: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]] = {}
        #: The taps said to run with other weights (:meth:`other_weights_given`), since the registry last had none.
        self.other_weights_said: set[tuple[int, str]] = set()
        #: Whether observing forwards run eagerly until one training forward has been observed: set when dynamo's
        #: code of a root holding compiled code is forgotten (:meth:`_observe_first_forward_eagerly`).
        self._eager_until_observed = False
        #: Whether a training forward (not a monitor's own probe pass) reached a tap since the eager stance was taken.
        self.training_forward_observed = False
        #: The ``force_eager`` stance while it is held; leaving it restores the stance before.
        self._eager_stance: contextlib.AbstractContextManager[None] | None = None
        self._subscribers: list[Subscriber] = []
        self._root: weakref.ref[nn.Module] | None = None  # weak: the registries are kept by a weak map of their roots

    def subscribe(
        self, subscriber: Subscriber, taps: Sequence[Tap], layouts: Sequence[Layout],
        undeclared_layout: Callable[[str, tuple[int, ...]], None] | None = None,
    ) -> None:
        """Hand ``subscriber`` the activations of ``taps`` (index = position in ``taps``) while it is armed.

        ``undeclared_layout(tap name, shape)`` is called once for the subscriber, at the first activation of 3 or
        more axes of a tap whose layout is undeclared and not sample-first by its own layers
        (:func:`~lightning_act.capture.layout.sample_first_by_its_layers`): a 2-D ``(B, D)`` tap is read alike in
        either order, so only the shape tells whether the layout matters."""
        hooked = set(self._handles)
        self._remove(subscriber)
        self._subscribers.append(subscriber)
        for index, (tap, layout) in enumerate(zip(taps, layouts, strict=True)):
            key = (id(tap.module), tap.point)
            self.tap_names[key] = tap.name
            if key not in self._handles:
                root = self._root() if self._root is not None else None
                witness = _witness((module_chain(root, tap.module) if root is not None else []) or [tap.module])
                if witness is not None:
                    self.witnesses[key] = witness
            sample_first = layout.declared or sample_first_by_its_layers(tap.module, tap.point)
            notice = None if undeclared_layout is None or sample_first else functools.partial(
                undeclared_layout, tap.name)
            self.subscriptions.setdefault(key, []).append(_Subscription(subscriber, index, layout, notice))
            if key not in self._handles:
                if tap.point == "input":
                    hook = _InputCaptureHook(self, key, input_parameter(tap.module))
                    self._handles[key] = register_monitor_hook(tap.module, hook, pre=True, with_kwargs=True)
                    root = self._root() if self._root is not None else None
                    through = _DropoutInputHook(self, key)
                    for dropout in [] if root is None else dropouts_beside(root, tap.module):
                        self._dropout_handles.setdefault(key, []).append(register_monitor_hook(dropout, through))
                        if getattr(dropout, "inplace", False):
                            self._dropout_handles[key].append(register_monitor_hook(dropout, through.before, pre=True))
                else:
                    self._handles[key] = register_monitor_hook(tap.module, _CaptureHook(self, key))
        if set(self._handles) != hooked:
            self._forget_compiled_code()
        self.refresh()

    def layout_undeclared(self, subscription: _Subscription, shape: tuple[int, ...]) -> None:
        """Tell ``subscription``'s notice the shape, and silence the notices of its subscriber (once per monitor)."""
        notice = subscription.undeclared_layout
        for subs in self.subscriptions.values():
            for sub in subs:
                if sub.subscriber is subscription.subscriber:
                    sub.undeclared_layout = None
        if notice is not None:
            notice(shape)

    def tensor_list_given(self, key: tuple[int, str]) -> None:
        """Say once that tap ``key`` gives a list of tensors (:func:`is_tensor_list`), which no monitor reads."""
        if key in self.tensor_lists_said:
            return
        self.tensor_lists_said.add(key)
        warnings.warn(
            f"lightning_act: {self.tap_names.get(key, 'a tapped module')} gives a list of tensors (one per image or "
            "per level: a detector's proposals or anchors, a feature pyramid's maps), not one activation, so nothing "
            "is logged for it; tap a module that gives one of them (a per-level head layer) or one run after they "
            "are joined",
            UserWarning, stacklevel=2,
        )

    def other_weights_given(self, key: tuple[int, str]) -> None:
        """Say once that tap ``key`` ran with other weights bound in (:func:`_rebound_to_other_weights`), left out."""
        if key in self.other_weights_said:
            return
        self.other_weights_said.add(key)
        warnings.warn(
            f"lightning_act: {self.tap_names.get(key, 'a tapped module')} ran with tensors bound in place of the "
            "model's parameters (torch.func.functional_call, or a torchrl target's params.to_module: another "
            "network's weights, such as a target network's); those forwards are left out of its statistics, which "
            "read the trained network's own forwards",
            UserWarning, stacklevel=2,
        )

    def input_replaced(
        self, key: tuple[int, str], original: Any, replacement: Any, transform: Callable[[Any], Any]
    ) -> None:
        """A pre-hook ahead of the capture's (SeND's drop) replaced the input of tap ``key`` by ``replacement`` =
        ``transform(original)``: where ``original`` came out of a dropout, the read-through reads the dropout's input
        transformed alike (the zeroed features), as it would read ``original``'s."""
        passages = self.before_dropout.get(key, {})
        passage = passages.get(id(original))
        stale = passage is None or passage[0]() is not original or original._version != passage[2]
        if stale or not isinstance(replacement, torch.Tensor):
            return
        # no graph, no op a dispatch mode sees: inside activation checkpointing the recompute, which skips this, must
        # match
        with torch.no_grad(), _outside_dispatch_modes():
            read = transform(passage[1])
        _keep_passage(passages, replacement, read)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop handing activations to ``subscriber``; hooks nobody listens to are removed."""
        if self._remove(subscriber):
            self._forget_compiled_code()
        if not self._subscribers:  # the registry outlives the fit with its model: the next monitors say it again
            self.transform_warned = False
            self.tensor_lists_said.clear()
            self.other_weights_said.clear()
        self.refresh()

    def _remove(self, subscriber: Subscriber) -> bool:
        """Drop ``subscriber``'s subscriptions and the hooks nobody else listens to; whether any hook went."""
        self._subscribers = [s for s in self._subscribers if s is not subscriber]
        hooked = len(self._handles)
        for key in list(self.subscriptions):
            remaining = [s for s in self.subscriptions[key] if s.subscriber is not subscriber]
            if remaining:
                self.subscriptions[key] = remaining
            else:
                del self.subscriptions[key]
                self.tap_names.pop(key, None)
                self.witnesses.pop(key, None)
                self._handles.pop(key).remove()
                for dropout_handle in self._dropout_handles.pop(key, []):
                    dropout_handle.remove()
                self.before_dropout.pop(key, None)
                self.dropout_input_copies.pop(key, None)
        return len(self._handles) != hooked

    def _forget_compiled_code(self) -> None:
        """After hooks were added or removed: dynamo keeps the code it traced with the hooks of a module's first
        compiled call and installs no guard on hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a
        compiled module of the root would go on running code compiled earlier in the process — by a fit of another
        instance of the same classes without monitors (nothing observed), or with hooks since removed. Forgotten,
        it is traced again at its next call, hooks as they are now."""
        root = self._root() if self._root is not None else None
        if root is not None and holds_compiled_code(root):
            torch._dynamo.reset()
            self._eager_until_observed = True

    @contextlib.contextmanager
    def exclusive(self, subscriber: Subscriber, cutoff: ForwardCutoff | None = None) -> Iterator[None]:
        """Hand activations to ``subscriber`` alone while inside: for its own probe passes, which another monitor
        armed for the training step must not count; ``cutoff`` counts their deliveries (its ``forward`` runs each
        probe forward)."""
        previous = self.exclusive_subscriber, self.cutoff
        self.exclusive_subscriber, self.cutoff = subscriber, cutoff
        if cutoff is not None:
            cutoff.tapped = frozenset(
                key for key, subs in self.subscriptions.items() if any(s.subscriber is subscriber for s in subs)
            )
        try:
            yield
        finally:
            self.exclusive_subscriber, self.cutoff = previous

    def refresh(self) -> None:
        """Recompute :attr:`observing` after a subscriber's ``armed`` flag changed; the hooks taken off for TorchScript
        come back now, before the step's first module lists its own pre-hooks (:func:`_put_back_after_scripting`)."""
        if _OFF_FOR_SCRIPTING:
            restore_hooks_taken_for_scripting()
        self.observing = any(s.armed for s in self._subscribers)
        self._observe_first_forward_eagerly()
        if not self.observing:  # a dropout's tensors kept for a tap that did not run: not until the next due step
            self.before_dropout.clear()
            self.dropout_input_copies.clear()

    def _observe_first_forward_eagerly(self) -> None:
        """Run observing forwards with ``torch.compiler.set_stance("force_eager")`` until a training forward has been
        observed, after dynamo's code of a root holding compiled code was forgotten (the start of a fit).

        Why: step 0 is always due, so dynamo's first trace of the model would be the observing variant, whose taps
        are graph breaks. A graph break inside a loop (``for block in self.blocks``, ``nn.Sequential``, activation
        checkpointing) cannot be resumed: dynamo skips that frame for good, and the user's graph of the steps in
        between was never built (a BlockNet compiled 3 of its 10 ops; 0 with checkpointing in the loop). Run
        eagerly, the first observed forward gives the same values; the next, not observing, compiles the user's
        whole graph, and a later due step adds the observing variant beside it. A monitor's own probe passes (before
        the training forward of the step) do not end the wait; what else is compiled runs eagerly meanwhile too."""
        if self.observing and self._eager_until_observed and self._eager_stance is None:
            self.training_forward_observed = False
            self._eager_stance = torch.compiler.set_stance("force_eager")
        elif not self.observing and self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)
            self._eager_stance = None
            if self.training_forward_observed:
                self._eager_until_observed = False

    @property
    def hook_count(self) -> int:
        return len(self._handles)


_REGISTRIES: weakref.WeakKeyDictionary[nn.Module, CaptureRegistry] = weakref.WeakKeyDictionary()


def capture_registry(root: nn.Module) -> CaptureRegistry:
    """The registry shared by every monitor of ``root`` (created on first use)."""
    registry = _REGISTRIES.get(root)
    if registry is None:
        registry = _REGISTRIES[root] = CaptureRegistry()
        registry._root = weakref.ref(root)
    return registry


def holds_compiled_code(root: nn.Module) -> bool:
    """Whether ``root`` runs compiled code: a ``torch.compile``d submodule (an ``OptimizedModule``), a module compiled
    in place by ``nn.Module.compile()`` (which leaves no wrapper, only its ``_compiled_call_impl``), or Lightning
    compiling the whole module."""
    from torch._dynamo.eval_frame import OptimizedModule

    return getattr(root, "_compiler_ctx", None) is not None or any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in root.modules()
    )
