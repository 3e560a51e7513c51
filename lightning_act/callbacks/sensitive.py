"""Sensitive neurons (SeND, Hallucination Detox, arXiv 2410.15460) and EigenScore.

A fixed *tracking set* (the first ``num_samples`` inputs of the validation dataloader at fit
start, or ``tracking_inputs``) goes through the model (``pl_module(x)``, or ``forward_fn``) at each due step, a
*checkpoint*, after that step's optimizer update. Each tapped layer gives one embedding per
example (2-D (B, D) outputs as they are, (B, T, D) averaged over tokens, a padded dict batch's over the real tokens
its ``attention_mask`` tells, (B, C, H, W) averaged over space), and the last C + 1 checkpoints of them are kept. Per
neuron i,
``V_i = Var_t(e_i) · Σ_t |Δe_i^t|`` over the last C checkpoints (the variance across checkpoints,
as the paper's text defines it), computed per tracking example and averaged; the top K% are the
sensitive neurons, ``callback.sensitive[name]`` (LongTensor of feature indices).

``drop=True`` is the SeND training protocol: once selected, the sensitive features of each tapped layer are zeroed
(along the axis the capture read them along, :class:`FeatureDrop`) for the next T checkpoints, then re-selected. The
zeroing is a forward hook on the tapped module, active only while that module is in training mode (like dropout): for
an input tap (``@penultimate`` is the head's input) a pre-hook zeroes those features of the head's input, which is the
same as zeroing the columns of the head's weight that read them; for an output tap it zeroes those features of the
module's output.

EigenScore (INSIDE, Chen et al. 2024) and its kernel-polynomial estimate (EES) are computed per
tracking example over K stochastic passes (dropout modules and timm ``DropPath`` in training
mode, and timm's fused attention, ``nn.MultiheadAttention`` with ``dropout > 0`` and ``nn.LSTM``/``GRU``/``RNN`` with
``dropout > 0`` between ``num_layers > 1`` layers by their own flag, which applies their dropout, their
``torch.jit.script``-compiled modules too; a Hugging Face-style ``F.dropout(h, p, training=self.training)`` applied as
in training; everything else in eval mode), and averaged. With no active dropout in the model and a deterministic
pass that drew no random numbers the K passes would be identical, Σ of rank ≤ 1, and the score near
``(K − 1)/K · log α``, tracking only the embedding norm: they are not run, the scores not logged, said once; a
forward drawing its own noise (a VAE's sampling) has its K passes run; where the model's dropout modules did not run
in the passes, that is said, and the scores are not logged if none did.

No perturbation: the passes run under ``torch.no_grad`` and ``torch.random.fork_rng`` (the
dropout masks come from a seed that depends only on ``seed`` and the checkpoint index; each forward of the
deterministic pass is seeded with its batch's place, so a model that samples in eval mode, a VAE, draws the same noise
at every checkpoint), every
module's train/eval flag is restored, and every buffer is put back (eval mode leaves BatchNorm statistics alone, not
a quantization-aware model's observers), and so is every parameter a forward writes in place (Hugging Face RWKV's eval
rescaling, :func:`~lightning_act.callbacks.probe.parameters_kept`). With
``drop=False`` training is bit-for-bit the same as without the callback.

DDP: the tracking set is taken from the validation dataloader itself (not Lightning's
distributed copy of it), so every rank holds the same inputs; if the user's loader shards the
data itself, the ranks' inputs are gathered without its ``DistributedSampler``'s padding (told by dataset index) and
put in the sampler's order into one set (padded batches of different lengths: gathered whole, rank by rank). The weights are the
same on every rank, and rank 0's embeddings are broadcast anyway, so the windows, sets and drop
masks are identical on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_act.callbacks.base import (
    ActivationMonitor,
    FitScopedState,
    HeldTapReads,
    check_axes,
    check_feature_dim,
    check_int,
    current_tap_key,
    declared_layout,
    empty_cause,
    module_list,
    resubscribe_replaced,
    spelling_free_modules,
    subscribe_taps,
    taps_moved_since,
    training_step_index,
    warn_features_unknown,
    warn_unbatched,
)
from lightning_act.callbacks.graphed_pass import GraphedPass, strategy_allows_graphs
from lightning_act.callbacks.history import BoundedSeries
from lightning_act.callbacks.probe import (
    ForwardFn,
    batch_indices,
    batch_tensors,
    call_forward,
    drew_random,
    first_batch_tensor,
    forward_seeds,
    num_examples,
    own_passes,
    probing,
    resolve_forward_fn,
    same_on_every_rank,
    to_device,
    validation_batches,
    writes_parameters,
)
from lightning_act.capture import SAMPLE_FIRST, CaptureRegistry, Layout, ModuleSpec, Tap
from lightning_act.capture.layout import declared_batch_first, to_sample_first, with_canonical_features
from lightning_act.capture.registry import (
    ForwardCutoff,
    MonitorHook,
    activation_index,
    holds_compiled_code,
    input_parameter,
    leave_module,
    register_monitor_hook,
    tapped_input,
)
from lightning_act.data.sampler_padding_index import (
    distributed_sampler,
    padding_indices,
    padding_rows,
    real_in_shard,
)
from lightning_act.errors import DataFormatError, LightningActError
from lightning_act.stats.eigenscore import (
    DEFAULT_ALPHA,
    EXACT_LOGDET_UP_TO,
    efficient_eigenscore,
    eigenscore,
    jaccard,
    send_sensitivity,
    top_fraction_indices,
)
from lightning_act.stats.reduce import distributed_world_size

_STOCHASTIC_CLASS_NAMES = {"DropPath", "DropBlock2d"}
#: Elements of the tracking set fingerprinted at once: float64 copies and positions of 8 MB each, not of the set.
_FINGERPRINT_CHUNK = 1 << 20
#: the other source of the tracking set, for a fit without validation data (a GAN's, say)
_OR_TRACKING_INPUTS = ", or SensitiveNeurons(tracking_inputs=<a tensor of inputs>)"


def per_example_embedding(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) embedding of one activation: (B, T, D) → token mean, (B, C, *spatial) → spatial mean (Conv2d and
    Conv3d maps), taken in float32 at least: under bf16 autocast a bf16 mean would round each embedding to 8
    significant bits before the differences between checkpoints that the sensitivity is made of (v_mean 31% off at a
    small learning rate). With a ``(B, T)`` 0/1 ``token_mask`` (a padded batch's ``attention_mask``) matching a
    (B, T, D) activation, the mean is over each example's real tokens: its pads are not its sequence (before round
    27 they were averaged in, 72–104% off for padded examples); an example of no real token gives zeros."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.dim() == 2:
        return x
    if x.dim() == 3 and token_mask is not None and token_mask.shape == x.shape[:2]:
        weights = token_mask.to(x.dtype)
        return torch.einsum("btd,bt->bd", x, weights) / weights.sum(1, keepdim=True).clamp_min(1.0)
    if x.dim() == 3:
        return x.mean(1)
    if x.dim() >= 4:
        return x.mean(tuple(range(2, x.dim())))
    raise DataFormatError(
        f"SensitiveNeurons: cannot make per-example embeddings from an activation of shape {tuple(x.shape)}; "
        "tap a module whose output is (B, D), (B, T, D) or (B, C, H, W) via modules=[...]"
    )


def decided_by_sensitivity(v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Which of the top-k ``indices`` the sensitivities ``v`` (D,) put in the set (a float 0/1 mask on ``v``'s device,
    no host sync): those whose ``V_i`` is above the (k+1)-th largest (above 0 when ``k = D``). The others tie at the
    cut and are the tie rule's lowest feature indices, not a measurement: every ``V_i`` is 0 when no tracked feature
    moved over the window (a frozen layer, a backbone before ``BackboneFinetuning`` unfreezes it, a learning rate of
    0), the cut ties at 0 when fewer than k features moved (units dead over the tracking set), and at a positive
    value between duplicated units (copied rows, ``cat([h, h])``)."""
    k = indices.numel()
    cut = torch.topk(v, k + 1).values[k] if k < v.numel() else v.new_zeros(())
    return (v[indices] > cut).to(v.dtype)


def _module_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _other_dims(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    """The shape of ``x`` without its sample ``axis``."""
    return (*x.shape[:axis], *x.shape[axis + 1 :])


def _token_mask(batch: Any, inputs: torch.Tensor | None) -> torch.Tensor | None:
    """A dict batch's ``attention_mask`` where it is a 0/1 (or bool) mask of its inputs' first two axes, ``(B, T)``,
    or of their first and last, channels-first audio features' ``(B, n_mels, T)`` (Hugging Face's speech feature
    extractors; before round 30 their mask was dropped, silently): which tokens of each example are real, not padding
    (:func:`per_example_embedding`, on each tap's (B, T, D) view, whose T is the mask's); else ``None``. One host
    read, at fit start."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or inputs is None or inputs.dim() < 2:
        return None
    if mask.shape not in (inputs.shape[:2], (inputs.shape[0], inputs.shape[-1])):
        return None
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        return None
    return mask


def _sequence_first_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that declare ``batch_first=False`` (an ``nn.LSTM``)."""
    return [module for module in model.modules() if declared_batch_first(module) is False]


@contextlib.contextmanager
def _inputs_reaching_sequence_first(model: nn.Module, inputs: torch.Tensor | None) -> Iterator[list[nn.Module]]:
    """The sequence-first modules of ``model`` that receive a tensor of the model inputs' shape (the inputs
    themselves, an LSTM's ``(T, B, F)``) in the forwards run inside: evidence that the inputs are sequence-first.
    A module merely declaring ``batch_first=False`` is none: a transformer layer fed ``h.transpose(0, 1)`` of
    ``(B, T)`` token ids says nothing of the ids' layout. Only the sequence a module reads is compared (its first
    argument): a ``src_key_padding_mask`` is ``(B, T)`` whatever the layout."""
    receivers: list[nn.Module] = []

    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sequence = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(sequence, torch.Tensor) and inputs is not None and sequence.shape == inputs.shape:
            receivers.append(module)

    handles = [
        module.register_forward_pre_hook(check, with_kwargs=True)
        for module in (_sequence_first_modules(model) if inputs is not None and inputs.dim() > 0 else [])
    ]
    try:
        yield receivers
    finally:
        for handle in handles:
            handle.remove()


def _refuse_unless_same_on_every_rank(batches: list[Any], device: torch.device, problem: str, fix: str) -> None:
    """One line on every rank where the ranks' tracking batches differ: rank 0's embeddings are broadcast, so the
    others would track rank 0's rows as if they were their own (a collective: every rank calls it)."""
    if not same_on_every_rank(batches, device):
        raise LightningActError(f"{problem}, and the tracking set must be the same on every rank; {fix}")


def _dtype_problem(inputs: torch.Tensor, pl_module: nn.Module, cause: BaseException | None) -> LightningActError | None:
    """The line for tracking inputs the model could not run on because of their floating dtype (numpy's float64 on a
    float32 model: the precision plugin casts inputs under ``"64-true"`` and ``"bf16-true"`` only), if that is it:
    the failure (``cause``) is about dtypes."""
    dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
    if dtype is None or not inputs.is_floating_point() or inputs.dtype == dtype:
        return None
    said = str(cause).lower()  # "same dtype", "expected scalar type", conv's "Input type (double) and bias type"
    if not any(word in said for word in ("dtype", "scalar type", "type (", "double", "half", "bfloat16")):
        return None
    return LightningActError(
        f"SensitiveNeurons: the model could not run on tracking_inputs, which are {inputs.dtype} where its parameters "
        f"are {dtype}; pass tracking_inputs=<tensor>.to({dtype}) (torch.from_numpy gives numpy's float64)"
    )


def _restores_after_fit_start(trainer: pl.Trainer | None) -> bool:
    """Whether Lightning restores a checkpoint's weights and callback states after ``on_fit_start``
    (``restore_checkpoint_after_setup``: FSDP, DeepSpeed, ``ModelParallelStrategy``), not before it."""
    return trainer is not None and trainer.strategy.restore_checkpoint_after_setup


def _tracking_fingerprint(batches: list[Any]) -> list[float]:
    """The tracking set's element count, float64 sum, sum of squares and position-weighted sum ``Σ_j (j+1)·x_j`` over
    its elements in order: a resumed fit whose set differs (drawn anew at a relaunch, a shuffling validation loader)
    holds windows of another set's embeddings, which its own would stack with silently when the shapes agree. The
    weighted sum tells the same examples in another order, whose windows would compare example k before the resume
    with another example after it (before round 22 the fingerprint was blind to order). Positions run over each tensor
    of the batch structure (``(x, y)``: x's, then y's) concatenated over the batches, so the same examples in the same
    order batched otherwise agree (before, they ran over x₁, y₁, x₂, y₂, …: another validation batch size "differed").
    Summed in chunks, without a float64 copy of the set. One host read, at fit start."""
    sums = torch.zeros(4, dtype=torch.float64)
    offsets: dict[int, int] = {}  # elements so far of each tensor of the batch structure, by its place in it
    for batch in batches:
        for place, tensor in enumerate(batch_tensors(batch)):
            offset = offsets.get(place, 0)
            for chunk in tensor.detach().reshape(-1).split(_FINGERPRINT_CHUNK):
                x = chunk.to(torch.float64).nan_to_num()
                positions = torch.arange(offset + 1, offset + x.numel() + 1, dtype=torch.float64, device=x.device)
                offset += x.numel()
                count = x.new_tensor(float(x.numel()))
                sums = sums.to(x.device) + torch.stack([count, x.sum(), x.square().sum(), positions @ x])
            offsets[place] = offset
    return sums.tolist()


def _graph_tap(batch: Any, inputs: torch.Tensor | None, tap_rows: dict[int, int], output: Any) -> int | None:
    """The tap whose rows are a graph batch's examples (node rows in, one embedding per graph out), if the batch is
    one: a tap giving fewer rows than the inputs' first axis, a length none of the inputs' axes has, that the model
    output has along its first axis (any of its tensors, for a dict or tuple; another tensor of the batch, such as
    per-graph labels, where the forward returns none). A tap's rows alone do not tell: a mixture-of-experts expert
    tapped first gives its routed tokens, fewer too, on a batch whose examples are its inputs' rows (before, its rows
    were taken for the examples and the taps giving one row per example left out). ``None``: the examples are counted along the inputs' sample axis."""
    if inputs is None or inputs.dim() == 0:
        return None
    confirming = {t.shape[0] for t in batch_tensors(output) if t.dim() > 0}
    if not confirming:
        confirming = {t.shape[0] for t in batch_tensors(batch) if t is not inputs and t.dim() > 0}
    graphs = [
        index for index, rows in tap_rows.items()
        if rows < inputs.shape[0] and rows not in inputs.shape and rows in confirming
    ]
    return graphs[0] if graphs else None


def _same_fingerprint(held: list[float], now: list[float]) -> bool:
    """Equal up to the round-off of another summation order (the set moved to another device). A checkpoint of round
    21 holds the first three values alone (no weighted sum): compared on those."""
    return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(held, now[: len(held)], strict=True))


#: The classes of :func:`_is_stochastic` and :func:`_applies_own_dropout` by name, for their scripted modules.
_DROPOUT_CLASS_NAMES = frozenset(
    cls.__name__
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
) | _STOCHASTIC_CLASS_NAMES
_RNN_CLASS_NAMES = frozenset({"RNN", "LSTM", "GRU"})


def _scripted_class(module: nn.Module) -> str | None:
    """The name of the class a ``torch.jit.script``-compiled module was scripted from (``original_name``): its
    compiled forward reads the module's training flag when it runs, as the class's does, so the flag can be set like
    theirs (a scripted ``nn.MultiheadAttention(dropout=0.5)``: before round 30 its dropout never acted in the passes,
    silently). ``None`` for other modules and for ``torch.jit.trace``'d ones, whose graph holds the flag of the trace
    as a constant."""
    return module.original_name if isinstance(module, torch.jit.RecursiveScriptModule) else None


def _is_stochastic(module: nn.Module) -> bool:
    """A dropout module: torch's, timm's ``DropPath``/``DropBlock2d``, a scripted one, or a dropout of another
    library's with a drop probability ``p`` and no children (state-spaces' ``DropoutNd``, AWD-LSTM's
    ``LockedDropout``: before round 30 not put in training mode, and the model said to have no dropout)."""
    name = type(module).__name__
    return (
        isinstance(module, nn.modules.dropout._DropoutNd) or name in _STOCHASTIC_CLASS_NAMES
        or _scripted_class(module) in _DROPOUT_CLASS_NAMES
        or ("Dropout" in name and isinstance(getattr(module, "p", None), numbers.Real)
            and not any(True for _ in module.children()))
    )


def _applies_child_dropout(module: nn.Module, active: set[int]) -> bool:
    """Whether ``module`` applies its active ``attn_drop`` child's dropout itself, from its own training flag: timm's
    attention family (``Attention``, ``EvaAttention``, ``WindowAttention`` ..., 24 classes in timm 1.0), told by its
    ``fused_attn`` switch, calls ``F.scaled_dot_product_attention(..., dropout_p=self.attn_drop.p if self.training
    else 0.)`` when fused, and ``attn_drop`` never runs. Their forwards read ``self.training`` for that alone."""
    return (
        # timm's forward (a subclass keeping it too): another class's forward may read the flag for more
        getattr(type(module).forward, "__module__", "").split(".")[0] == "timm"
        and hasattr(module, "fused_attn")
        and id(getattr(module, "attn_drop", None)) in active
    )


def _applies_own_dropout(module: nn.Module) -> bool:
    """Whether ``module`` applies a dropout of its own from its training flag, with no dropout module to put in
    training mode: ``nn.MultiheadAttention`` (and its subclasses: ``nn.TransformerEncoderLayer``'s ``self_attn``, the
    decoder layer's ``multihead_attn``) drops attention weights by ``dropout_p=self.dropout, training=self.training``;
    its forward reads the flag for that alone (and for its fast path, off in the probes). ``nn.RNN``/``LSTM``/``GRU``
    (``nn.RNNBase``) drop each layer's output but the last's by ``_VF.lstm(..., self.dropout, self.training, ...)``,
    the flag's only use (on cuDNN it also keeps a reserve buffer for backward, dropped under ``no_grad``); with one
    layer torch ignores ``dropout``. Their scripted modules too (:func:`_scripted_class`); a subclass of another name
    is not recognised once scripted."""
    scripted = _scripted_class(module)
    if isinstance(module, nn.RNNBase) or scripted in _RNN_CLASS_NAMES:
        return float(module.dropout) > 0 and module.num_layers > 1
    return (isinstance(module, nn.MultiheadAttention) or scripted == "MultiheadAttention") and float(module.dropout) > 0


#: Functional dropouts whose ``training`` defaults to True: ``training=False`` in a call is a module's flag passed on.
_FUNCTIONAL_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d})


class _FunctionalDropout(TorchFunctionMode):
    """Reads, and with ``force`` applies, the dropout a forward calls as a function from a module's training flag,
    Hugging Face's ``F.dropout(hidden_states, p=self.dropout, training=self.training)`` (BART, Whisper, OPT, Marian):
    no dropout module holds it, so eval mode turns it off and training mode on a module would switch its other
    children too. ``seen``: a call with ``p > 0`` and ``training=False`` ran (in a pass with every dropout module in
    training mode, or in one of a model without any, only such a call passes False with ``p > 0``); ``force`` makes it
    drop, as in training, out of place (an in-place input dropout, ``F.dropout(x, p, self.training, inplace=True)``,
    zeroed the tracking batch the monitor keeps, pass after pass)."""

    def __init__(self, force: bool) -> None:
        super().__init__()
        self.force = force
        self.seen = False

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # handle_torch_function hands these functions their arguments by keyword, defaults filled in
        if func in _FUNCTIONAL_DROPOUTS and kwargs.get("training") is False and float(kwargs.get("p", 0.0)) > 0:
            self.seen = True
            if self.force:
                kwargs = {**kwargs, "training": True, "inplace": False}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _stochastic_mode(model: nn.Module, stochastic: list[nn.Module]) -> Iterator[tuple[set[int], set[int]]]:
    """The stochastic modules in training mode, those applying their own dropout (:func:`_applies_own_dropout`) and
    those applying an active child's dropout from their own flag (:func:`_applies_child_dropout`) by that flag alone:
    their other children (a BatchNorm among q/k norms, an attention's ``out_proj``) stay in eval mode. Gives the ids
    of the stochastic modules that ran (a fused ``attn_drop`` when its owner ran) and of those whose parent's forward
    completed, filled by forward hooks removed on exit (:func:`~lightning_act.callbacks.probe.probing` restores the
    flags). A TorchScript module's calls inside the script reach no hook: it counts as run, never as completed.
    In-place dropout modules drop out of place inside: in training mode, ``nn.Dropout(inplace=True)`` on the model's
    input zeroed the tracking batch the monitor keeps, a little more at every pass and checkpoint."""
    active = {id(m) for m in stochastic}
    in_place = [m for m in stochastic if isinstance(m, nn.modules.dropout._DropoutNd) and m.inplace]
    ran = {id(m) for m in stochastic if isinstance(m, torch.jit.ScriptModule)}
    completed: set[int] = set()
    handles = []
    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        if _applies_child_dropout(module, active):
            module.training = True
            handles.append(module.register_forward_hook(
                lambda _m, _in, _out, dropout=id(module.attn_drop): ran.add(dropout)
            ))
        held = {id(child) for child in module.children()} & active
        if held:
            handles.append(module.register_forward_hook(lambda _m, _in, _out, held=held: completed.update(held)))
    for module in stochastic:
        if _applies_own_dropout(module):
            module.training = True
        else:
            module.train()
        if not isinstance(module, torch.jit.ScriptModule):  # which take no hooks
            handles.append(module.register_forward_hook(lambda m, _in, _out: ran.add(id(m))))
    for module in in_place:
        module.inplace = False
    try:
        yield ran, completed
    finally:
        for module in in_place:
            module.inplace = True
        for handle in handles:
            handle.remove()


def _writes_its_input(module: nn.Module) -> bool:
    """Whether a stochastic module may drop its input in place in the passes, where :func:`_stochastic_mode` cannot
    turn that off: timm's ``DropBlock2d(inplace=True)``, a scripted dropout (its ``inplace`` is a constant of the
    script). On the model's input it zeroed the tracking batch the monitor keeps, a little more at every pass and
    checkpoint; each forward of such passes gets a copy of its batch."""
    return isinstance(module, torch.jit.ScriptModule) or bool(getattr(module, "inplace", False))


def _copied(batch: Any) -> Any:
    """A copy of a tracking batch whose tensors an in-place dropout may write (:func:`_writes_its_input`): a deep copy,
    which enters a batch class of the user's (a frozen dataclass, an object with ``.to()``), where
    ``apply_to_collection`` passed one by or refused it; a batch that cannot be deep-copied has its collections'
    tensors cloned."""
    try:
        return copy.deepcopy(batch)
    except (TypeError, RuntimeError):  # an item that cannot be copied (a generator, a handle): clone what can be
        return apply_to_collection(batch, torch.Tensor, torch.clone, allow_frozen=True)


def _complex_dtype(value: Any) -> torch.dtype | None:
    """The dtype of the activation the capture would read in a module's output or arguments ``value`` (found as
    :func:`~lightning_act.capture.registry.first_tensor` finds it) where it is complex, which the capture does not
    read; else ``None``."""
    for _ in range(3):
        index = activation_index(value)
        if index is None:
            break
        value = value[index]
    return value.dtype if isinstance(value, torch.Tensor) and value.is_complex() else None


@contextlib.contextmanager
def _complex_taps(taps: list[Tap]) -> Iterator[dict[str, torch.dtype]]:
    """The taps among ``taps`` whose activation is a complex tensor in the forwards run inside (an STFT's
    ``return_complex=True``), by name, with its dtype, so that the line saying they gave nothing names it (before
    round 30 it named every other cause): plain forward hooks, removed on exit."""
    found: dict[str, torch.dtype] = {}

    def note(tap: Tap, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        read = output if tap.point == "output" else tapped_input(args, kwargs, input_parameter(module))
        dtype = _complex_dtype(read)
        if dtype is not None:
            found[tap.name] = dtype

    handles = [
        tap.module.register_forward_hook(functools.partial(note, tap), with_kwargs=True)
        for tap in taps if not isinstance(tap.module, torch.jit.ScriptModule)  # which take no hooks
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _paused(drops: Iterable[FeatureDrop]) -> Iterator[None]:
    """``drops`` off inside (:attr:`FeatureDrop.paused`)."""
    drops = list(drops)
    for drop in drops:
        drop.paused = True
    try:
        yield
    finally:
        for drop in drops:
            drop.paused = False


def _flattened_tokens(inputs: torch.Tensor) -> int | None:
    """The rows of a head run on the inputs' flattened ``B·T`` rows: ``(B, T)`` token ids or series, a ``(B, T, D)``
    sequence, a video's ``(B, T, C, H, W)`` frames run one by one. ``None`` for images ``(B, C, H, W)``, whose axis 1
    holds channels: before round 29 a window attention with as many windows per image as channels (a 4-band image's
    4 windows) passed for a head on the tokens, and its windows were tracked as examples (in round 29 a float
    ``(B, T)`` series' and a video's per-step rows were left out)."""
    return inputs.shape[0] * inputs.shape[1] if inputs.dim() >= 2 and inputs.dim() != 4 else None


def _drops_anything(module: nn.Module) -> bool:
    """Whether a stochastic module in training mode changes its input: ``p`` / ``drop_prob`` above 0 (timm
    models hold ``Dropout(p=0)`` modules, which are the identity in either mode); unknown kinds count as active."""
    probability = getattr(module, "p", getattr(module, "drop_prob", None))
    return probability is None or float(probability) > 0


def _some(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _without_padding(
    local: list[torch.Tensor], axis: int, loader: Any
) -> tuple[list[torch.Tensor], list[int] | None, int | None]:
    """This rank's tracking inputs without its ``DistributedSampler``'s padding, each row's position in the sampler's
    global order (rank r's k-th entry at k·W + r), and the dataset's size; ``(local, None, None)`` without a
    ``DistributedSampler``. Where the batches' dataset indices cannot be known (:func:`~lightning_act.callbacks.probe.
    batch_indices`), or a batch's rows are not its examples, the inputs are kept as read, said once."""
    sampler = distributed_sampler(loader)
    if sampler is None:
        return local, None, None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    indices = batch_indices(local, loader)
    if indices is None or any(len(rows) != x.shape[axis] for rows, x in zip(indices, local, strict=True)):
        rank_zero_warn(
            "SensitiveNeurons: the sharded validation loader does not tell the dataset index of each tracking example "
            "(not a torch DataLoader, in_order=False, or batches whose rows are not examples), so the examples its "
            "DistributedSampler repeats are taken to be each rank's last and the ranks' examples interleaved in the "
            "order read (pass tracking_inputs=<tensor> for a set that does not depend on the loader)",
            category=UserWarning,
        )
        return local, None, size
    own = list(sampler)
    place = {index: k * sampler.num_replicas + sampler.rank for k, index in enumerate(own[: real_in_shard(sampler)])}
    kept: list[torch.Tensor] = []
    positions: list[int] = []
    for x, rows, repeats in zip(local, indices, padding_rows(indices, padding_indices(sampler)), strict=True):
        real = [j for j, repeat in enumerate(repeats) if not repeat]
        if real:
            kept.append(x if len(real) == len(rows) else x.index_select(axis, torch.tensor(real, device=x.device)))
            positions += [place[rows[j]] for j in real]
    return kept, positions, size


def _tensor_axis(layout: Layout, ndim: int, dim: int) -> int:
    """The axis of a tapped tensor of ``ndim`` axes that is axis ``dim`` of its sample-first view
    (:func:`~lightning_act.capture.layout.to_sample_first`: the samples, then the tokens, then the others in order)."""
    if layout.batch_dim is None:
        return dim
    moved = [layout.batch_dim % ndim] + ([] if layout.token_dim is None else [layout.token_dim % ndim])
    return [*moved, *(axis for axis in range(ndim) if axis not in moved)][dim]


def _with_item(container: Any, index: Any, item: Any) -> Any:
    """A copy of a module's output or inputs (tuple, list, namedtuple, Hugging Face ``ModelOutput``) with ``item`` at
    ``index`` (:func:`~lightning_act.capture.registry.activation_index`)."""
    if isinstance(index, str):
        return type(container)(**{**container, index: item})
    items = [*container[:index], item, *container[index + 1:]]
    return type(container)(*items) if hasattr(container, "_fields") else type(container)(items)


class FeatureDrop(MonitorHook):
    """Forward (pre-)hooks zeroing fixed feature indices in training mode; a copy of the model (an EMA or teacher
    deep-copied mid-fit, a saved snapshot) carries them detached, and they leave it at its first forward
    (:class:`~lightning_act.capture.registry.MonitorHook`): the copy computes what its weights compute.

    Features are where the embeddings took them: the last dim of a ``(B, D)`` tensor; else the axis the capture reads
    them along (:func:`~lightning_act.capture.layout.with_canonical_features`, with the axis it decided for the tap
    and remembers in ``decided_axes``, its registry's ``feature_axes``, under ``slot``: a ``(B, C, L)`` map at a step
    where ``L`` equals ``C`` is read as the earlier steps were). Where the capture does not know it, nothing is zeroed
    and ``axis_unknown(shape)`` is told: before round 25 the drop asked for the axis without that memory and, at
    ``L == C``, zeroed the time steps of a map whose channels the capture had read, with the channels' indices. The
    tensor zeroed is the one the capture reads (:func:`~lightning_act.capture.registry.tapped_input` for an input
    tap): the positional argument, or the keyword argument ``parameter`` of a module called by keyword, and the item
    of a tuple output, both chosen by :func:`~lightning_act.capture.registry.activation_index` (``(aux_loss,
    hidden)``'s hidden: before round 28 the drop zeroed the scalar ``aux_loss``).
    """

    _not_copied = ("replaced", "decided_axes", "axis_unknown")  # bound to a capture registry and a monitor: not copied

    def __init__(
        self, indices: torch.Tensor, parameter: str | None = None, layout: Layout = SAMPLE_FIRST,
        replaced: Callable[[Any, Any, Callable[[Any], Any]], None] | None = None,
        decided_axes: dict[Any, int] | None = None, slot: Any = None,
        axis_unknown: Callable[[tuple[int, ...]], None] | None = None,
    ) -> None:
        self.indices = indices.to(torch.int64)
        self.parameter = parameter
        self.layout = layout
        self.decided_axes = {} if decided_axes is None else decided_axes
        self.slot = slot
        self.axis_unknown = axis_unknown
        #: Told (original, zeroed, zeroing) of an input it replaced: the capture's dropout read-through follows.
        self.replaced = replaced
        #: Set while the EigenScore/EES stochastic passes run: they put a tapped attention in training mode for its
        #: dropout alone, and the tracking passes see all features.
        self.paused = False

    def _zero(self, x: Any) -> Any:
        index = activation_index(x)  # the item the capture reads: (aux_loss, hidden)'s hidden, (x, mask)'s x
        if index is not None:
            return _with_item(x, index, self._zero(x[index]))
        if not isinstance(x, torch.Tensor):
            return x
        if self.indices.device != x.device:
            self.indices = self.indices.to(x.device)
        dim = self._feature_dim(x)
        if dim is None:
            if self.axis_unknown is not None:
                self.axis_unknown(tuple(x.shape))
            return x
        return x.index_fill(dim, self.indices, 0.0)

    def _feature_dim(self, x: torch.Tensor) -> int | None:
        """The axis of ``x`` the capture reads the features along (see the class docstring), or ``None``: asked of
        the capture's own reading (:func:`~lightning_act.capture.layout.with_canonical_features`, with its memory), so
        the two cannot disagree; the view it gives has the features last, or on axis 1 of a map of 4 or more axes it
        left as it is."""
        if x.dim() < 3:
            return x.dim() - 1
        sample_first = to_sample_first(x, self.layout)
        view, known = with_canonical_features(sample_first, self.layout, self.decided_axes, self.slot)
        if not known:
            return None
        if view is sample_first:
            dim = 1 if x.dim() >= 4 else x.dim() - 1
        else:  # a (B, C, L) map moved to (B, L, C), or a channels-last map flattened to (B, tokens, C)
            dim = 1 if x.dim() == 3 else x.dim() - 1
        return _tensor_axis(self.layout, x.dim(), dim)

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        """Forward pre-hook (``with_kwargs=True``) of an input tap. Also called without ``kwargs``, as torch's
        quantization ``swap_module`` (``prepare_qat``, ``convert``) registers the hooks it copies to the new module:
        it then gives the new arguments alone (an ``(args, kwargs)`` pair would be read as the arguments; before round
        30 the call failed, and with it the fit)."""
        if not self.attached:
            if not torch.compiler.is_compiling():  # a copy's first call compiled traces it to nothing
                leave_module(module, self)
            return None
        if not module.training or self.paused:
            return None
        if args:
            index = activation_index(args)  # the argument the capture reads
            zeroed = self._zero(args[index])
            if self.replaced is not None:
                self.replaced(args[index], zeroed, self._zero)
            zeroed_args = _with_item(args, index, zeroed)
            return zeroed_args if kwargs is None else (zeroed_args, kwargs)
        if kwargs is None:
            return None
        if self.parameter in kwargs:
            zeroed = self._zero(kwargs[self.parameter])
            if self.replaced is not None:
                self.replaced(kwargs[self.parameter], zeroed, self._zero)
            return args, {**kwargs, self.parameter: zeroed}
        return None

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook of an output tap."""
        if not self.attached:
            if not torch.compiler.is_compiling():  # a copy's first call compiled traces it to nothing
                leave_module(module, self)
            return None
        if not module.training or self.paused:
            return None
        return self._zero(output)


class SensitiveNeurons(FitScopedState):
    """SeND sensitive neurons, optional SeND dropping, and (Efficient) EigenScore of a tracking set.

    Args:
        modules: layers whose per-example features are tracked; default the penultimate features.
        every_n_steps: a checkpoint every this many optimizer steps.
        num_samples: size N of the tracking set taken from the validation data (not used with ``tracking_inputs``).
        tracking_inputs: the tracking set itself (a tensor of model inputs, every row of it) instead.
        window: C, the number of checkpoints of the sensitivity (C + 1 are kept).
        top_fraction: K, the fraction of neurons called sensitive (0.2 in the paper).
        drop: run the SeND protocol (zero the sensitive features for ``drop_checkpoints`` checkpoints).
        drop_checkpoints: T, checkpoints a selected set stays dropped before re-selection.
        eigenscore_passes: K stochastic passes for EigenScore/EES (0 or 1: off).
        num_moments, num_probes: Chebyshev moments M and Hutchinson probes N_z of EES.
        alpha: the EigenScore regulariser α.
        batch_size: tracking examples per forward pass (validation batches whose inputs differ in shape, a padding
            collate's, run whole).
        input_key: key of the model input when validation batches are dicts; the model is run on it alone (a padded
            batch's ``attention_mask`` masks the token mean only, said once; ``forward_fn=lambda m, b: m(**b)``
            passes it).
        seed: seed of the dropout masks of the passes and of the EES probes.
        forward_fn: how to run the model on one tracking batch, ``forward_fn(pl_module, batch)``
            (a callable or its import path), for LightningModules whose ``forward`` is not
            ``forward(x)``; the tracking set is then the first whole validation batches holding at
            least ``num_samples`` examples (counted along the inputs' sample axis; a graph batch's are its
            embeddings, one per graph: :meth:`_whole_validation_batches`). Default:
            ``pl_module(x)`` on the inputs of the validation batches (``tracking_inputs``: on chunks
            of it). Checked at fit start: a failing call is one line.
        batch_dim, token_dim, feature_dim: the layout of the tapped activations (see ``ActivationMonitor``).
        cuda_graph: on a CUDA model, replay the tracking pass from a CUDA graph after its first run (see
            :mod:`lightning_act.callbacks.graphed_pass`): one launch instead of the forward's operations one at a
            time, whose host time was nearly all of this monitor's cost at every step on an H100. The same values;
            captured again when a parameter, buffer or input moves; a forward that cannot be captured (a host read
            inside it) warns once and runs eagerly, as does the pass of a model whose eval-mode forward writes its
            parameters (RWKV's rescaling: a replay would repeat the write unseen, said once). Stochastic EigenScore
            passes stay eager. The graph keeps the
            pass's peak memory reserved for the rest of the fit. Measured on an H100 (``docs/performance.md``,
            round 17): this monitor alone every step 1.46x -> 1.25x a ViT-S step, all four 2.48x -> 2.07x. Off by
            default: a replay also repeats whatever the forward decided from Python state at capture (a flag, the
            epoch), which no check of the tensors can see; turn it on for a forward that depends on its inputs and
            weights alone. No effect on a CPU.
        stop_after_taps: end each tracking forward once every tracked module has run (the first checkpoint's
            pass runs whole and records them; see :class:`~lightning_act.capture.registry.ForwardCutoff`): the head
            after the penultimate features, a language model's vocabulary projection, is not computed. The same
            values. A model whose forward writes its parameters in place (EMA weights swapped in and back) runs whole,
            said once. ``False`` for a model whose forward calls a tracked module a data-dependent number of times.

    A "step" is an optimizer step under automatic optimization and a training batch under manual
    optimization, as for every monitor.
    """

    prefix = "sensitive"
    meaning_settings = ("window", "top_fraction", "eigenscore_passes", "num_moments", "num_probes", "alpha")
    default_modules: tuple[str, ...] = ("@penultimate",)
    reads_features = True  # neurons are features
    #: The taps and the lookups that found their modules (see :meth:`_follow_replaced_modules`), until teardown.
    _tap_reads: HeldTapReads | None = None

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        num_samples: int = 64,
        tracking_inputs: torch.Tensor | None = None,
        window: int = 3,
        top_fraction: float = 0.2,
        drop: bool = False,
        drop_checkpoints: int = 3,
        eigenscore_passes: int = 8,
        num_moments: int = 20,
        num_probes: int = 20,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = 64,
        input_key: str | None = None,
        seed: int = 0,
        history_size: int = 512,
        forward_fn: ForwardFn | str | None = None,
        batch_dim: int | None = None,
        token_dim: int | None = None,
        feature_dim: int | None = None,
        cuda_graph: bool = False,
        stop_after_taps: bool = True,
    ) -> None:
        checks = {
            "every_n_steps": (every_n_steps, 1), "num_samples": (num_samples, 1), "window": (window, 2),
            "drop_checkpoints": (drop_checkpoints, 1), "eigenscore_passes": (eigenscore_passes, 0),
            "num_moments": (num_moments, 1), "num_probes": (num_probes, 1), "batch_size": (batch_size, 1),
            "history_size": (history_size, 3), "seed": (seed, 0),
        }
        for name, (value, low) in checks.items():
            check_int("SensitiveNeurons", name, value, low)
        # log det(Σ + αI) of a singular Σ is NaN at alpha=0: one bound, > 0, for every value refused
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0.0 < alpha < math.inf):
            raise LightningActError(f"SensitiveNeurons: alpha={alpha!r} must be a finite number > 0; pass e.g. alpha=1e-3")
        if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float)) or not 0.0 < top_fraction <= 1.0:
            raise LightningActError(f"SensitiveNeurons: top_fraction={top_fraction!r} must be in (0, 1]; pass e.g. 0.2")
        self.uses_default_modules = modules is None
        self.modules = module_list(modules, self.default_modules, "SensitiveNeurons")
        self.forward_fn = resolve_forward_fn("SensitiveNeurons", forward_fn)
        self.custom_forward = forward_fn is not None
        self.batch_dim, self.token_dim = check_axes("SensitiveNeurons", batch_dim, token_dim)
        self.feature_dim = check_feature_dim("SensitiveNeurons", feature_dim)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.tracking_inputs = tracking_inputs
        self.window = window
        self.top_fraction = top_fraction
        self.drop = drop
        self.drop_checkpoints = drop_checkpoints
        self.eigenscore_passes = eigenscore_passes
        self.num_moments = num_moments
        self.num_probes = num_probes
        self.alpha = alpha
        self.batch_size = batch_size
        self.input_key = input_key
        self.seed = seed
        self.history_size = history_size
        for name, flag in (("drop", drop), ("cuda_graph", cuda_graph), ("stop_after_taps", stop_after_taps)):
            if not isinstance(flag, bool):  # "no" would read as True: drop="no" zeroed neurons in training
                raise LightningActError(f"SensitiveNeurons: {name}={flag!r} must be True or False")
        if input_key is not None and not isinstance(input_key, str):  # a dict batch's keys are strings
            raise LightningActError(
                f"SensitiveNeurons: input_key={input_key!r} must be the str key of the model inputs in a dict batch "
                "(e.g. 'input_ids') or None"
            )
        self.cuda_graph = cuda_graph
        if tracking_inputs is not None and not isinstance(tracking_inputs, torch.Tensor):
            raise LightningActError(
                f"SensitiveNeurons: tracking_inputs is a {type(tracking_inputs).__name__}; pass one tensor of model "
                "inputs (e.g. torch.stack of them), or leave it unset to take the validation batches"
            )
        self.stop_after_taps = stop_after_taps

        self.taps: list[Tap] = []
        self.history: dict[str, BoundedSeries] = {}
        self.embeddings: dict[str, list[torch.Tensor]] = {}
        self.sensitive: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.countdown: dict[str, int] = {}
        #: :func:`_tracking_fingerprint` of the set the windows hold embeddings of, and of this fit's set.
        self._windows_fingerprint: list[float] | None = None
        self._fit_fingerprint: list[float] | None = None
        self.checkpoints = 0
        self.armed = False
        self._batches: list[Any] = []
        self._collected: dict[int, list[torch.Tensor]] = {}
        self._registry: CaptureRegistry | None = None
        self._layouts: list[Layout] = []
        self._pending_step: int | None = None
        self._drop_handles: dict[str, Any] = {}
        self._feature_drops: dict[str, FeatureDrop] = {}  # each tap's drop, whose handle _drop_handles holds
        self._features_warned: set[str] = set()
        self._drop_axis_warned: set[str] = set()  # taps whose drop found no feature axis (_warn_drop_axis_unknown)
        self._low_dim_warned: set[str] = set()
        self._unobserved_warned: set[str] = set()
        self._ran_empty: dict[str, tuple[int, ...]] = {}  # taps that gave an empty activation in the last passes
        #: Taps seen giving a complex tensor (:func:`_complex_taps`, watched until they give an activation or are said
        #: to give none), and its dtype.
        self._complex: dict[str, torch.dtype] = {}
        self._unknown_warned: set[str] = set()
        self._undecided_warned: set[str] = set()  # taps whose set ties at its cut (_warn_cut_short)
        self._widths_warned: set[str] = set()
        self._mask_unmatched_warned: set[str] = set()  # taps not of the mask's tokens (_warn_mask_not_applied)
        #: dropout modules said not to run in the stochastic passes; "": that none ran (_warn_no_dropout_ran)
        self._inert_dropout_warned: set[str] = set()
        #: Per tap, the rows of each of its calls in a tracking pass, and the taps whose rows are not the tracking
        #: examples (:meth:`_check_examples`, :meth:`_check_rows`), left out.
        self._call_rows: dict[str, tuple[int, ...]] = {}
        self._rows_not_examples: set[str] = set()
        #: The axis of the examples in the tracking batches' inputs (:meth:`_sample_axis`), and the examples of each
        #: tracking batch (:meth:`_whole_validation_batches` counts a graph batch's by its embeddings).
        self._input_axis = 0
        self._batch_examples: list[int] = []
        #: Per tracking batch, the 0/1 (B, T) mask of its real tokens where it holds padding (:func:`_token_mask`),
        #: and the mask of the batch whose forward runs now, for :meth:`receive`.
        self._token_masks: list[torch.Tensor | None] = []
        self._running_mask: torch.Tensor | None = None
        self._graphed = GraphedPass("SensitiveNeurons")
        self._graph_this_fit = False
        self._cutoff = ForwardCutoff(self.stop_after_taps)
        #: Whether the last eagerly run deterministic pass drew random numbers (:func:`drew_random`): a replayed graph
        #: draws as its capture did.
        self._clean_pass_draws = False
        #: Whether the model calls a functional dropout from a module's flag (:class:`_FunctionalDropout`), read at
        #: the fit's first eager passes; None: not read yet.
        self._functional_dropout: bool | None = None

    @property
    def _source(self) -> str:
        """Where the tracking batches come from, for the line of a failing forward (:func:`call_forward`)."""
        return "validation" if self.tracking_inputs is None else "tracking_inputs"

    @property
    def state_key(self) -> str:
        # Not keyed on every_n_steps: the state must survive a resume with another interval.
        return self._generate_state_key(modules=spelling_free_modules(self.modules))

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # The key of checkpoints written before round 17, keyed on the modules as spelled.
        return self._generate_state_key(modules=[str(m) for m in self.modules])

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._setup_waits:  # waits for the model's layers (see builds_layers_late)
            return
        layout = declared_layout(self.batch_dim, self.token_dim, self.feature_dim, self.reads_features)
        self.taps, self._layouts, self._registry = subscribe_taps(
            self, pl_module, self.modules, self.uses_default_modules, layout
        )
        self._graphed = GraphedPass("SensitiveNeurons")  # each fit tries a capture afresh
        self._clean_pass_draws = False
        self._functional_dropout = None
        self._complex = {}
        self._cutoff = ForwardCutoff(self.stop_after_taps)  # and records its forwards afresh
        self._graph_this_fit = self.cuda_graph
        if self.cuda_graph and trainer is not None and not strategy_allows_graphs(trainer.strategy):
            self._graph_this_fit = False
            rank_zero_warn(
                f"SensitiveNeurons: cuda_graph=True replays the tracking pass on one device or under DDP only; with "
                f"{type(trainer.strategy).__name__} it runs eagerly (the same values)",
                category=UserWarning,
            )
        if self.drop and holds_compiled_code(pl_module):
            raise LightningActError(
                "SensitiveNeurons(drop=True) cannot zero features of a torch.compile'd model (hooks added after "
                "compilation are ignored by the compiled code); train the SeND protocol without torch.compile"
            )

    def features_unknown(self, tap_index: int, shape: tuple[int, ...]) -> None:
        """Warn once per tap that the feature axis is read by convention (called by the capture registry)."""
        warn_features_unknown(self, self.taps[tap_index].name, shape, self._features_warned)

    def activations_unbatched(self, tap_index: int, shape: tuple[int, ...]) -> None:
        warn_unbatched(self, self.taps[tap_index].name, shape, self._low_dim_warned)

    def activations_empty(self, tap_index: int, shape: tuple[int, ...]) -> None:
        """Note that a call gave an activation of 0 entries (called by the capture registry instead of ``receive``),
        so that a tap that gave only such ones at a checkpoint is said to have (:meth:`_warn_unobserved`)."""
        self._ran_empty[self.taps[tap_index].name] = shape

    def receive(self, tap_index: int, x: torch.Tensor) -> None:
        """Keep one activation's per-example embedding (called by the capture registry); a copy: the model may still
        change a float64 (B, D) activation in place (``F.relu_``) before the pass ends. A (B,) or scalar activation
        holds no features: said once, and nothing is tracked for it (the fit goes on)."""
        if x.dim() < 2:
            name = self.taps[tap_index].name
            if name not in self._low_dim_warned:
                self._low_dim_warned.add(name)
                rank_zero_warn(
                    f"SensitiveNeurons: {name} outputs a {x.dim()}-d tensor, not (batch, features) or (batch, tokens, "
                    "features); nothing is tracked for it (tap e.g. '@penultimate')",
                    category=UserWarning,
                )
            return
        if self._running_mask is not None and x.dim() == 3 and x.shape[:2] != self._running_mask.shape:
            self._warn_mask_not_applied(self.taps[tap_index].name, tuple(x.shape))
        embedding = per_example_embedding(x, self._running_mask)
        self._collected.setdefault(tap_index, []).append(embedding.to(torch.float64, copy=True))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_fit_state(trainer, pl_module)
        # of this fit's tracking set (another fit may bring another)
        self._call_rows, self._rows_not_examples = {}, set()
        self._input_axis = 0
        if not self.taps:
            return
        device = _module_device(pl_module)
        examples: list[int] | None = None
        masks: list[torch.Tensor | None] | None = None
        if self.tracking_inputs is not None:
            self._batches = list(to_device(self.tracking_inputs, device, trainer).split(self.batch_size))
            _refuse_unless_same_on_every_rank(
                self._batches, device, "SensitiveNeurons(tracking_inputs=...): the tensor differs between the ranks "
                "(each process built its own, e.g. from its data shard or an unseeded torch.randn)",
                "build it from a fixed seed or the same file on every rank",
            )
            try:
                self._first_forward(trainer, pl_module, self._batches[0])
            except LightningActError as error:
                raise _dtype_problem(self._batches[0], pl_module, error.__cause__) or error from error.__cause__
        elif self.custom_forward:
            self._batches, examples = self._whole_validation_batches(trainer, pl_module, device)
            if self._input_axis == 0:
                masks = [_token_mask(batch, first_batch_tensor(batch)) for batch in self._batches]
            _refuse_unless_same_on_every_rank(
                self._batches, device, "SensitiveNeurons(forward_fn=...): the validation loader gives each rank other "
                "batches (it shards them)", "pass an unsharded validation loader or tracking_inputs=<tensor>",
            )
        else:
            self._batches, masks = self._from_validation(trainer, pl_module, device)
        # an all-ones mask is the plain token mean's: left out, so unpadded batches give the same bits as before
        self._token_masks = [
            None if mask is None or bool(mask.all()) else mask for mask in masks or [None] * len(self._batches)
        ]
        self._warn_mask_not_passed()
        self._batch_examples = examples or [num_examples(batch, self._input_axis) for batch in self._batches]
        tracked = sum(self._batch_examples)
        if self.tracking_inputs is None and tracked < self.num_samples:  # the validation data ran out
            rank_zero_warn(
                f"SensitiveNeurons: the validation data holds {tracked} example(s), fewer than num_samples="
                f"{self.num_samples}; the tracking set and its statistics are of those {tracked} (pass num_samples="
                f"{tracked} or tracking_inputs= to silence this)",
                category=UserWarning,
            )
        self._fit_fingerprint = _tracking_fingerprint(self._batches)
        if not _restores_after_fit_start(trainer):
            self._continue_run(device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.taps and _restores_after_fit_start(trainer):
            self._continue_run(_module_device(pl_module))

    def _continue_run(self, device: torch.device) -> None:
        """The windows of the run this fit continues (a resumed checkpoint's) on the model's device, and the features
        it was dropping dropped again: once its state is restored, which is after ``on_fit_start`` under strategies that
        restore after setup (FSDP, DeepSpeed, ``ModelParallelStrategy``); done there, a resumed SeND run trained its
        remaining countdown without the drop. Windows of another tracking set (see :func:`_tracking_fingerprint`;
        checkpoints of c77375e and earlier hold no fingerprint and are continued) start afresh."""
        held, self._windows_fingerprint = self._windows_fingerprint, self._fit_fingerprint
        if held is not None and not _same_fingerprint(held, self._fit_fingerprint):
            restarted = [name for name, window in self.embeddings.items() if window]
            if restarted:
                rank_zero_warn(
                    f"SensitiveNeurons: the tracking set differs from the checkpoint's (its inputs' sums or their "
                    f"order changed: drawn anew, or a shuffling validation loader); the windows and sensitive sets "
                    f"of {', '.join(restarted)} start afresh (pass the same tracking_inputs to continue them)",
                    category=UserWarning,
                )
            for name in restarted:
                self._forget_tap(name)
        self.embeddings = {name: [e.to(device) for e in window] for name, window in self.embeddings.items()}
        dropping = [tap for tap in self.taps if self.countdown.get(tap.name, 0) > 0 and tap.name in self.sensitive]
        if dropping and not self.drop:  # a resume with drop=False: training as without the callback
            rank_zero_warn(
                f"SensitiveNeurons: the checkpoint's run was dropping the sensitive features of "
                f"{', '.join(tap.name for tap in dropping)}; this fit has drop=False and drops none",
                category=UserWarning,
            )
            self.countdown = {name: 0 for name in self.countdown}
        for tap in dropping if self.drop else []:
            self._set_drop(tap, self.sensitive[tap.name])

    def _first_forward(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, batch: Any
    ) -> tuple[dict[int, int], Any]:
        """Run the model on a first tracking batch, at fit start so that a failing call is one line then; the rows
        each tap gave, by tap index in the order they ran (the first tells the inputs' sample axis), and what the
        forward returned."""
        self._arm(True)
        try:
            with own_passes(self._registry, self), probing(trainer, pl_module, _module_device(pl_module)):
                output = call_forward("SensitiveNeurons", self.forward_fn, pl_module, batch, self._source)
            return {index: embeddings[0].shape[0] for index, embeddings in self._collected.items()}, output
        finally:
            self._arm(False)
            self._collected.clear()

    def _from_validation(
        self, trainer: pl.Trainer, pl_module: nn.Module, device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The tracking batches: the inputs of the first validation batches holding ``num_samples`` examples, counted
        along the inputs' sample axis (:meth:`_sample_axis`: an ``nn.LSTM``'s ``(T, B, F)`` inputs hold B examples,
        not T), joined or kept whole by :meth:`_join`; from a loader that shards the data itself, the ranks' union.
        And their token masks where every batch is a dict holding one (:func:`_token_mask`), joined and cut as the
        inputs are (of their shape, they are joined the same way), else ``None``."""
        inputs: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        loaders: list[Any] = []
        axis = 0

        def enough(batches: list[Any]) -> bool:
            nonlocal axis
            x = to_device(self._batch_inputs(batches[-1]), device, trainer)
            if not inputs:
                with _inputs_reaching_sequence_first(pl_module, x) as receivers:
                    tap_rows, _ = self._first_forward(trainer, pl_module, x)
                axis = self._sample_axis(x, next(iter(tap_rows.values()), None), pl_module, bool(receivers))
            inputs.append(x)
            mask = _token_mask(batches[-1], x)
            masks.append(None if mask is None else mask.to(device))
            return sum(x.shape[axis] for x in inputs) >= self.num_samples

        validation_batches(trainer, "SensitiveNeurons", enough, loaders, instead=_OR_TRACKING_INPUTS)
        self._input_axis = axis
        masked = axis == 0 and all(mask is not None for mask in masks)
        if same_on_every_rank(inputs, device):
            join = functools.partial(self._join, axis=axis, limit=self.num_samples)
            return join([inputs]), join([masks]) if masked else None
        inputs, masks, self._input_axis = self._union_over_ranks(
            inputs, masks if masked else None, axis, loaders[0], device
        )
        return inputs, masks

    def _whole_validation_batches(
        self, trainer: pl.Trainer, pl_module: nn.Module, device: torch.device
    ) -> tuple[list[Any], list[int]]:
        """The tracking batches of a ``forward_fn``, and their examples: the first whole validation batches holding
        ``num_samples`` examples, counted along their inputs' sample axis as :meth:`_from_validation` counts them (a
        ``(T, B, F)`` batch holds B examples); in a graph batch (:func:`_graph_tap`) each batch's examples are the rows
        its forward gives the graph-level tap (before round 22 ``num_samples=8`` took 4 graphs of 24 nodes)."""
        batches: list[Any] = []
        examples: list[int] = []
        axis = 0
        graph_tap: int | None = None

        def enough(loaded: list[Any]) -> bool:
            nonlocal axis, graph_tap
            batches.append(to_device(loaded[-1], device, trainer))
            if len(batches) == 1:
                inputs = first_batch_tensor(batches[0])
                with _inputs_reaching_sequence_first(pl_module, inputs) as receivers:
                    tap_rows, output = self._first_forward(trainer, pl_module, batches[0])
                samples = next(iter(tap_rows.values()), None)
                axis = 0 if inputs is None else self._sample_axis(inputs, samples, pl_module, bool(receivers))
                graph_tap = _graph_tap(batches[0], inputs, tap_rows, output)
                examples.append(num_examples(batches[0], axis) if graph_tap is None else tap_rows[graph_tap])
            elif graph_tap is not None:
                examples.append(self._first_forward(trainer, pl_module, batches[-1])[0].get(graph_tap, 0))
            else:
                examples.append(num_examples(batches[-1], axis))
            return sum(examples) >= self.num_samples

        validation_batches(trainer, "SensitiveNeurons", enough, instead=_OR_TRACKING_INPUTS)
        self._input_axis = axis
        return batches, examples

    def _sample_axis(
        self, x: torch.Tensor, samples: int | None, pl_module: nn.Module, reaches_sequence_first: bool
    ) -> int:
        """The axis of the examples in the model inputs ``x``, from the first forward's sample count (the embeddings'
        rows): the one axis that long (an ``nn.LSTM``'s ``(T, B, F)`` inputs hold B examples), else axis 0. Another
        axis than 0 only where ``batch_dim=`` is declared or the inputs reach a sequence-first module as they are
        (``reaches_sequence_first``, :func:`_inputs_reaching_sequence_first`): before round 27 a forward repeating
        each example (two views, beams) at ``2B == T`` had its ``(B, T)`` token ids cut along the tokens, and in
        round 27 still where any module merely declared ``batch_first=False`` (a transformer layer the forward feeds
        ``(T, B, D)`` itself). Where two readings fit — two axes that long, one besides the ``B·T`` rows of a head run
        on flattened tokens (a single ``(1, T)`` sequence), or only another axis in a model with sequence-first
        modules the inputs do not reach as they are — axis 0 is taken and said once: only the user knows."""
        if samples is None or x.dim() == 0:
            return 0
        if not (self.batch_dim or reaches_sequence_first):
            others = [axis for axis in range(1, x.dim()) if x.shape[axis] == samples]
            if others and x.shape[0] != samples and _sequence_first_modules(pl_module):
                rank_zero_warn(
                    f"SensitiveNeurons: a first forward of the tracking inputs of shape {tuple(x.shape)} gives "
                    f"{samples} embeddings, the length of their axis {others[0]}, and the model holds sequence-first "
                    "(batch_first=False) modules, which the inputs do not reach as they are; the examples are taken "
                    "along axis 0 (a forward repeating each example, two views or beams, gives more rows than "
                    f"examples); if they lie along axis {others[0]} (inputs fed sequence-first), pass "
                    f"batch_dim={others[0]}",
                    category=UserWarning,
                )
            return 0
        matching = [axis for axis in range(x.dim()) if x.shape[axis] == samples]
        declared = [layout.batch_dim for layout in self._layouts if layout.batch_dim and layout.batch_dim in matching]
        flattened = x.dim() >= 2 and samples == x.shape[0] * x.shape[1] != x.shape[0]
        if not matching or (0 in matching and not declared):
            return 0
        if len(matching) == 1 and not flattened:
            return matching[0]
        rank_zero_warn(
            f"SensitiveNeurons: the tracking inputs of shape {tuple(x.shape)} give {samples} embeddings, which more "
            "than one axis can count; the examples are taken along axis 0 (pass tracking_inputs= with the examples "
            "first, or forward_fn=, if that is not their axis)",
            category=UserWarning,
        )
        return 0

    def _join(
        self, shards: list[list[torch.Tensor]], axis: int, limit: int, positions: list[list[int]] | None = None
    ) -> list[torch.Tensor]:
        """The tracking batches from the input batches of each rank (one list: one rank, or every rank the same):
        the ``limit`` examples first in the loader's order, ``positions`` giving each rank's rows' places in it (by
        default rank r's k-th at k·W + r, the order of an unshuffled ``DistributedSampler`` read in its own order).

        Inputs of one shape apart from the sample axis are joined along it in that order, and re-split into
        ``batch_size`` examples. Inputs that are not (a padding collate: each batch as long as its longest sequence)
        cannot be joined: the batches stay whole, each example with its batch's padding at every checkpoint, cut to
        the examples kept (then grouped by rank)."""
        tensors = [x for shard in shards for x in shard]
        if positions is None:
            positions = [
                [k * len(shards) + rank for k in range(sum(x.shape[axis] for x in shard))]
                for rank, shard in enumerate(shards)
            ]
        first = sorted((place, rank, k) for rank, places in enumerate(positions) for k, place in enumerate(places))
        first = first[:limit]
        shape = _other_dims(tensors[0], axis)
        if all(_other_dims(x, axis) == shape for x in tensors):
            per_rank = [torch.cat(shard, axis).movedim(axis, 0) if shard else None for shard in shards]
            order = [per_rank[rank][k] for _, rank, k in first]
            return list(torch.stack(order).movedim(0, axis).split(self.batch_size, axis))
        chosen = {(rank, k) for _, rank, k in first}
        kept: list[torch.Tensor] = []
        for rank, shard in enumerate(shards):
            offset = 0
            for x in shard:
                rows = [j for j in range(x.shape[axis]) if (rank, offset + j) in chosen]
                offset += x.shape[axis]
                if rows:
                    kept.append(x if len(rows) == x.shape[axis] else x.index_select(axis, torch.tensor(rows, device=x.device)))
        return kept

    def _union_over_ranks(
        self, local: list[torch.Tensor], local_masks: list[torch.Tensor] | None, axis: int, loader: Any,
        device: torch.device,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
        """The same tracking set on every rank from a loader that shards the data itself: the ranks' input batches
        gathered (as objects: padded batches differ in shape) and joined in the original order, the first
        ``num_samples`` kept; their token masks where every rank holding inputs has them (``local_masks``), joined the
        same way; and the inputs' sample axis. A rank whose shard is empty (a pre-sharded loader with no examples
        for it) takes the axis and masks of the ranks that read inputs (before round 29 such a rank stopped the fit).
        A ``DistributedSampler`` pads a dataset that does not divide among the ranks by repeating some of its examples:
        each rank leaves its repeats out, told by dataset index (:func:`_without_padding`), and
        places its rows in the sampler's global order, whatever order its batch sampler gave them in (before round
        23 the repeats were taken to be each rank's last examples: a longest-first bucketing sampler tracked a repeat
        and lost a real example). Where the indices cannot be known the union is cut at the dataset's size instead.
        Without a ``DistributedSampler`` each rank reads a dataset of its own (pre-sharded files), whose examples are
        all distinct."""
        local, positions, size = _without_padding(local, axis, loader)
        if local_masks is not None:
            local_masks = [m.cpu() for m in _without_padding(local_masks, axis, loader)[0]]
        shards: list[Any] = [None] * distributed_world_size()
        dist.all_gather_object(shards, ([x.cpu() for x in local], local_masks, positions, axis))
        read = [shard for shard in shards if shard[0]]
        axis = read[0][3]
        inputs = [shard[0] for shard in shards]
        total = sum(x.shape[axis] for shard in inputs for x in shard)
        places = None if any(shard[2] is None for shard in shards) else [shard[2] for shard in shards]
        join = functools.partial(self._join, axis=axis, limit=min(self.num_samples, size or total), positions=places)
        masks = [shard[1] or [] for shard in shards] if all(shard[1] is not None for shard in read) else None
        joined_masks = None if masks is None else [m.to(device) for m in join(masks)]
        return [x.to(device) for x in join(inputs)], joined_masks, axis

    def _batch_inputs(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0]
        if isinstance(batch, dict):
            if self.input_key is None or self.input_key not in batch:
                raise DataFormatError(
                    f"SensitiveNeurons: validation batches are dicts with keys {sorted(batch)}; "
                    "pass input_key=<the key of the model input>, or forward_fn=<a function (pl_module, batch) that "
                    "runs the model on one batch> for a model called with several of them"
                )
            return batch[self.input_key]
        raise DataFormatError(
            f"SensitiveNeurons: cannot find the model input in a validation batch of type {type(batch).__name__}; "
            "pass forward_fn=<a function (pl_module, batch) that runs your model on one validation batch> (a list of "
            "images of different sizes, a detection model's), or tracking_inputs=<tensor>"
        )

    # ------------------------------------------------------------------ scheduling
    def is_due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = training_step_index(trainer, pl_module)
        if self.taps and self._pending_step is None and self.is_due(step) and not self.trains_nothing(trainer):
            self._pending_step = step
            self._follow_replaced_modules(pl_module, step)

    def _follow_replaced_modules(self, pl_module: pl.LightningModule, step: int) -> None:
        """At a due step, move the taps whose module was replaced mid-fit to the module now at their name, with their
        drop hooks (as :meth:`ActivationMonitor._follow_replaced_modules` does): the hooks on the old object observed
        nothing, and the SeND drop silently stopped applying to the running layer. The tap's rows per call are
        recorded again; a window of another width starts afresh (:meth:`_restart_tap`)."""
        moved, self._tap_reads = taps_moved_since(pl_module, self.taps, self._tap_reads)
        replaced = {i: module for i, module in moved.items() if module is not None}
        if not replaced or self._registry is None:
            return
        declared = declared_layout(self.batch_dim, self.token_dim, self.feature_dim, self.reads_features)
        resubscribe_replaced(self, pl_module, self._registry, self.taps, self._layouts, replaced, declared, step)
        self._cutoff = ForwardCutoff(self.stop_after_taps)  # its deliveries per forward are of the old modules
        self._graphed.reset()  # a captured pass would replay the old modules
        for index in replaced:
            tap = self.taps[index]
            self._call_rows.pop(tap.name, None)
            if tap.name in self._drop_handles:
                self._set_drop(tap, self.sensitive[tap.name])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_step is None:
            return
        if pl_module.automatic_optimization and trainer.global_step <= self._pending_step:
            return
        step, self._pending_step = self._pending_step, None
        self.checkpoint(trainer, pl_module, step)

    def _warn_mask_not_passed(self) -> None:
        """Say at fit start that the default forward runs the model on ``batch[input_key]`` without the padded
        batches' ``attention_mask``: only the user knows whether the forward takes it, and a model attending to pads
        gives other states at the real tokens too."""
        if self.custom_forward or self.input_key is None or all(mask is None for mask in self._token_masks):
            return
        rank_zero_warn(
            f"SensitiveNeurons: the padded validation batches hold an attention_mask beside input_key="
            f"{self.input_key!r}, and the model is run on batch[{self.input_key!r}] alone, without it (taps with the "
            "mask's token positions average each example's real tokens only); pass forward_fn=lambda m, b: m(**b) to "
            "run it with the mask",
            category=UserWarning,
        )

    def _warn_mask_not_applied(self, tap_name: str, shape: tuple[int, ...]) -> None:
        """Say once per tap that a padded batch's ``attention_mask`` does not fit its (B, T, D) activations, so their
        token mean includes the pads: positions the model prepends or appends (a CLS token) or pools cannot be told
        from the mask's, and are not guessed."""
        if tap_name in self._mask_unmatched_warned or self._running_mask is None:
            return
        self._mask_unmatched_warned.add(tap_name)
        batch, tokens = self._running_mask.shape
        rank_zero_warn(
            f"SensitiveNeurons: {tap_name}'s activations of shape {shape} have {shape[1]} token positions "
            f"(for {shape[0]} rows) where the padded batch's attention_mask has {tokens} (for {batch} examples), so "
            "the mask cannot say which are pads: its embeddings average every position, pads included (a CLS or "
            "other token the model adds is not placed by guess); tap a module whose token axis is the inputs'",
            category=UserWarning,
        )

    def _warn_unknown(self, tap_name: str, stats: list[str], step: int) -> None:
        """Say once per statistic that it is unknown, and why: non-finite embeddings, or for the EigenScore and EES
        also finite ones spread so far over the passes that the KPM estimate (above 256 passes and 256 features)
        cannot resolve α."""
        stats = [stat for stat in stats if f"{tap_name}/{stat}" not in self._unknown_warned]
        if not stats:
            return
        self._unknown_warned.update(f"{tap_name}/{stat}" for stat in stats)
        cause = "the tracking set's embeddings are not finite: NaN or inf in the model"
        if any(stat in ("eigenscore", "ees") for stat in stats):
            cause += f", or their spread over the passes is too large for the score's log det(Σ + {self.alpha}·I)"
        rank_zero_warn(
            f"SensitiveNeurons: {tap_name} {'/'.join(stats)} {'is' if len(stats) == 1 else 'are'} unknown at step "
            f"{step} ({cause}); a statistic is not logged at a checkpoint where it is unknown",
            category=UserWarning,
        )

    def _warn_cut_short(self, tap_name: str, step: int, decided: int, places: int) -> None:
        if tap_name in self._undecided_warned:
            return
        self._undecided_warned.add(tap_name)
        outcome = (
            f"{tap_name} has no sensitive set at step {step}: none is selected or newly dropped, and count/selected are "
            "not logged at such checkpoints"
            if decided == 0
            else f"{tap_name}'s sensitive set at step {step} holds {decided} of its {places} places (count says how many)"
        )
        rank_zero_warn(
            f"SensitiveNeurons: {outcome}. The top_fraction={self.top_fraction} set's last places tie with the next "
            f"feature: V_i = 0 where features did not change over the last {self.window} checkpoints (a frozen layer, "
            "a backbone before it is unfrozen, dead units, a learning rate of 0), or equal V_i of duplicated units; "
            "the tie rule would fill them with the lowest feature indices",
            category=UserWarning,
        )

    def _warn_unobserved(self, tap_name: str, step: int, empty_shape: tuple[int, ...] | None = None) -> None:
        """Say once that ``tap_name`` gave nothing at a checkpoint; ``empty_shape``: it ran, giving only activations
        of 0 entries, one of that shape."""
        said = self._unobserved_warned | self._low_dim_warned | self._rows_not_examples
        if tap_name in said:
            return
        self._unobserved_warned.add(tap_name)
        if empty_shape is not None:
            rank_zero_warn(
                f"SensitiveNeurons: {tap_name} gave only empty activations in the tracking pass at step {step} "
                f"({empty_cause(empty_shape)}); nothing is logged for it at such checkpoints",
                category=UserWarning,
            )
            return
        if tap_name in self._complex:
            rank_zero_warn(
                f"SensitiveNeurons: {tap_name} gives a {str(self._complex[tap_name]).removeprefix('torch.')} tensor in "
                f"the tracking pass at step {step}, which is not read (the monitors read real floating-point "
                "activations); nothing is logged for it (tap its magnitude, a module after .abs(), or one after "
                "torch.view_as_real)",
                category=UserWarning,
            )
            return
        rank_zero_warn(
            f"SensitiveNeurons: {tap_name} gave no activation in the tracking pass at step {step} (its module did not "
            "run, or what it gives is not a floating-point tensor: a dict, a PackedSequence, integers); nothing is "
            "logged for it at such checkpoints (tap a module whose output is (B, D), (B, T, D) or (B, C, H, W); where "
            "the model's forward does not run it, as a GAN's discriminator or a BYOL predictor, pass modules= with one "
            "it runs, or forward_fn= to run it)",
            category=UserWarning,
        )

    # ------------------------------------------------------------------ passes
    def _run_passes(
        self, trainer: pl.Trainer | None, pl_module: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embeddings (N, D) of the deterministic pass and (N, D, K) of the stochastic passes, per tap.

        The stochastic passes put the dropout modules with ``p > 0`` (and timm's ``DropPath``/``DropBlock2d``) in
        training mode, and by its own flag only (its forward reads the flag for the dropout alone) a module that
        applies such a child's dropout from that flag, timm's attention with ``fused_attn`` and an ``attn_drop``
        (:func:`_applies_child_dropout`), or a dropout of its own, ``nn.MultiheadAttention`` with ``dropout > 0``
        (:func:`_applies_own_dropout`; a transformer layer's ``self_attn``), or ``nn.LSTM``/``GRU``/``RNN`` with
        ``num_layers > 1`` and ``dropout > 0`` (between its layers): before rounds 28 and 29 their dropout
        never acted, and the K passes were the deterministic one, silently. A functional dropout called with a
        module's flag, ``F.dropout(h, p, training=self.training)`` (:class:`_FunctionalDropout`, read at the fit's
        first passes), drops as in training (before round 30 it did not: a BART/Whisper-style model's K passes were
        the deterministic one). PyTorch's transformer fast path is off in
        the passes (:func:`~lightning_act.callbacks.probe.probing`), so an encoder layer runs its ``dropout1``/
        ``dropout2`` modules and its attention's dropout. A dropout module that did not run though its parent's forward
        completed (another module applying it from its own flag) is named once; where no stochastic module ran (a
        scripted one, which no hook sees, where the passes differ) and the passes equal the deterministic one, no
        passes are given, said once: EigenScore/EES are not logged there. With no stochastic module the passes would
        be the deterministic one: none are run or given, said once (before round 30 it was reused K times and its
        degenerate score logged, silently), unless that drew random numbers
        (:func:`~lightning_act.callbacks.probe.drew_random`: a VAE's ``torch.randn_like``); then they are run (before
        round 29 they were reused), on every rank where rank 0's did (each rank deciding alone left the collectives of
        the passes unpaired)."""
        collected = self._collected
        device = _module_device(pl_module)

        def one_pass(seed: int | None = None, copied: bool = False) -> dict[str, torch.Tensor]:
            """One pass over the tracking batches; ``copied``: each forward gets a copy of its batch (see
            :func:`_writes_its_input`)."""
            collected.clear()
            calls_after: list[dict[int, int]] = []  # per tracking batch, each tap's calls collected after its forward
            # Each forward seeded on its own (by probing, the clean pass's with its batch's place; a stochastic pass's
            # here): its draws do not depend on how far the forward before it ran (stop_after_taps ends one before a
            # dropout after the last tap draws), and the clean pass of a model sampling in eval mode (a VAE) draws
            # the same at every checkpoint.
            seeds = contextlib.nullcontext() if seed is None else forward_seeds(itertools.count(seed * len(self._batches)))
            # a graph's capture neither seeds nor lets the generators be read: the flag of its eager pass holds
            watch_draws = seed is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
            draws = False
            with seeds:
                for batch, self._running_mask in zip(self._batches, self._token_masks, strict=True):
                    if copied:
                        batch = _copied(batch)
                    forward = functools.partial(
                        call_forward, "SensitiveNeurons", self.forward_fn, pl_module, batch, self._source
                    )
                    self._cutoff.forward(forward)
                    draws = draws or (watch_draws and drew_random())
                    calls_after.append({i: len(calls) for i, calls in collected.items()})
            if watch_draws:
                self._clean_pass_draws = draws
            self._cutoff.pass_complete()
            for i, tap in enumerate(self.taps):
                if i in collected:
                    if tap.name not in self._call_rows:  # the fit's first pass
                        self._check_examples(tap.name, [
                            [call.shape[0] for call in collected[i][before.get(i, 0) : after.get(i, 0)]]
                            for before, after in zip([{}, *calls_after], calls_after)
                        ])
                    self._check_rows(tap.name, tuple(call.shape[0] for call in collected[i]))
            taps = enumerate(self.taps)
            return {
                tap.name: self._pass_embedding(tap, collected[i])
                for i, tap in taps if i in collected and tap.name not in self._rows_not_examples
            }

        if self._graph_this_fit and device.type == "cuda" and writes_parameters(pl_module):
            self._refuse_graph_of_a_writer()
        self._arm(True)
        try:
            with own_passes(self._registry, self, self._cutoff), probing(trainer, pl_module, device):
                stochastic_modules = [
                    m for m in pl_module.modules()
                    if (_is_stochastic(m) and _drops_anything(m)) or _applies_own_dropout(m)
                ]
                said = self._unobserved_warned | self._low_dim_warned | self._rows_not_examples
                unread = [tap for tap in self.taps if tap.name not in self._call_rows and tap.name not in said]
                # without dropout modules, a call passing training=False with p > 0 is a functional dropout's; read in
                # the first pass, which runs its Python on the graph path too (its capture)
                reading = self._functional_dropout is None and not stochastic_modules
                with _complex_taps(unread) as complex_taps, \
                        _FunctionalDropout(force=False) if reading else contextlib.nullcontext() as functional:
                    if self._graph_this_fit and device.type == "cuda":
                        clean = self._graphed(one_pass, pl_module, self._batches)
                    else:
                        clean = one_pass()
                if reading:
                    self._functional_dropout = functional.seen
                self._complex.update(complex_taps)
                passes: list[dict[str, torch.Tensor]] = []
                # rank 0's passes are the ones broadcast, and every rank must run them or none: its decision
                reuse = self.eigenscore_passes >= 2 and not stochastic_modules and not (
                    self._rank_zeros(self._clean_pass_draws or bool(self._functional_dropout), device)
                )
                if reuse:
                    # Every pass would equal the deterministic one, bit for bit: not rerun, and not scored, said once
                    self._warn_no_dropout(pl_module)
                elif self.eigenscore_passes >= 2:
                    first = (self.seed * 1_000_003 + self.checkpoints) * self.eigenscore_passes
                    # read in the fit's first passes (every dropout module then passes training=True), applied after
                    forcing = (
                        _FunctionalDropout(force=True) if self._functional_dropout is not False
                        else contextlib.nullcontext()
                    )
                    with _stochastic_mode(pl_module, stochastic_modules) as (ran, completed), \
                            _paused(self._feature_drops.values()), forcing:
                        copied = any(_writes_its_input(m) for m in stochastic_modules)
                        passes = [one_pass(first + index, copied) for index in range(self.eigenscore_passes)]
                    functional_ran = isinstance(forcing, _FunctionalDropout) and forcing.seen
                    if self._functional_dropout is None:
                        self._functional_dropout = functional_ran
                    self._warn_dropout_not_run(pl_module, completed - ran)
                    # passes differing by the forward's own draws (a VAE's sampling) are not those of an inert dropout;
                    # with no dropout to blame, passes equal to the deterministic one are its K copies, as above. A
                    # scripted module counts as run, unseen (no hook reaches it): told by the passes alone.
                    scripted = {id(m) for m in stochastic_modules if isinstance(m, torch.jit.ScriptModule)}
                    inert = bool(stochastic_modules or self._functional_dropout) and not ran - scripted \
                        and not functional_ran \
                        and all(
                            name in p and torch.equal(p[name], embedding)
                            for p in passes for name, embedding in clean.items()
                        )
                    if self._rank_zeros(inert, device):  # rank 0's passes are the ones broadcast: its decision
                        self._warn_no_dropout_ran(pl_module, stochastic_modules)
                        passes = []
        finally:
            self._arm(False)
            self._running_mask = None
            collected.clear()
        clean = {name: embedding for name, embedding in clean.items() if name not in self._rows_not_examples}
        stochastic = {name: torch.stack([p[name] for p in passes], dim=-1) for name in clean} if passes else {}
        return clean, stochastic

    def _warn_dropout_not_run(self, pl_module: nn.Module, silent: set[int]) -> None:
        names = [name for name, module in pl_module.named_modules() if id(module) in silent]
        names = [name for name in names if name not in self._inert_dropout_warned]
        if not names:
            return
        self._inert_dropout_warned.update(names)
        rank_zero_warn(
            f"SensitiveNeurons: the dropout module(s) {_some(names)} did not run in the EigenScore/EES stochastic "
            "passes though their parent's forward did: the parent likely applies their dropout from its own training "
            "flag (a fused attention: F.scaled_dot_product_attention(dropout_p=self.attn_drop.p if self.training "
            "else 0.)), which stays in eval mode, or computes them from their weights on a fast path of its own, so "
            "EigenScore/EES leave that dropout out (timm's attention with fused_attn and nn.MultiheadAttention are "
            "handled; for another, make it run its dropout module, as timm.layers.set_fused_attn(False) does for "
            "timm's)",
            category=UserWarning,
        )

    def _warn_no_dropout_ran(self, pl_module: nn.Module, stochastic: list[nn.Module]) -> None:
        if "" in self._inert_dropout_warned:
            return
        self._inert_dropout_warned.add("")
        ids = {id(module) for module in stochastic}
        names = [name for name, module in pl_module.named_modules() if id(module) in ids]
        if self._functional_dropout:
            names.append("F.dropout calls with training=self.training")
        rank_zero_warn(
            f"SensitiveNeurons: none of the model's dropout modules with p > 0, attentions or multi-layer RNNs with "
            f"dropout > 0 or functional dropouts ({_some(names)}) ran in the EigenScore/EES stochastic passes, which "
            "equal the deterministic pass: eigenscore and ees are not logged at such checkpoints (the dropout lies "
            "after the tapped modules, or a parent applies it from its own training flag, as a fused attention does; "
            "give the model a dropout module, or an attention or RNN of 2 or more layers with dropout > 0 (an RNN's "
            "acts between its layers), that runs before the taps)",
            category=UserWarning,
        )

    def _warn_no_dropout(self, pl_module: nn.Module) -> None:
        """Say once that the model has no active dropout and its forward draws no random numbers, so the K passes
        would be K copies of the deterministic pass: their Σ has rank ≤ 1 and the score, ``(log(K‖c‖² + α) + (K − 1)
        log α) / K``, tracks only the embedding norm, a placeholder that reads like a measurement (before round 30 it
        was logged, with no line: every Llama-style model's at the default ``eigenscore_passes=8``)."""
        if "" in self._inert_dropout_warned:
            return
        self._inert_dropout_warned.add("")
        traced = [
            name for name, module in pl_module.named_modules()
            if isinstance(module, torch.jit.ScriptModule) and _scripted_class(module) is None
        ]
        traced = [name for name in traced if not any(name.startswith(f"{outer}.") for outer in traced)]
        unseen = (
            f"; the torch.jit.trace'd {_some(traced)} are not looked into, their dropout fixed on or off when traced: "
            "script them instead, or trace after the fit" if traced else ""
        )
        rank_zero_warn(
            f"SensitiveNeurons: the model has no active dropout (no dropout module with p > 0, attention or "
            f"multi-layer RNN with dropout > 0, or functional dropout{unseen}) and its tracking pass draws no random "
            f"numbers, so the {self.eigenscore_passes} EigenScore/EES passes would all equal the deterministic pass "
            "(a rank-1 Σ whose score tracks only the embedding norm): eigenscore and ees are not logged; give the "
            "model dropout before the taps for a meaningful score (an nn.Dropout(p > 0) or an F.dropout(h, p, "
            "training=self.training); an attention that passes dropout_p=p if self.training else 0.0, as Hugging "
            "Face's Llama does, has p = 0 in the passes and cannot be applied there), or pass "
            "eigenscore_passes=0 to silence this",
            category=UserWarning,
        )

    def _refuse_graph_of_a_writer(self) -> None:
        """No graph for a model whose probe forward wrote its parameters in place (Hugging Face RWKV's eval-mode
        rescaling): a replay repeats the write with no torch function called and no version counter moved, so no
        probe could put the weights back (the eager probes do, :func:`~lightning_act.callbacks.probe.parameters_kept`),
        and training would go on from the rescaled weights."""
        self._graph_this_fit = False
        self._graphed.reset()
        rank_zero_warn(
            "SensitiveNeurons: cuda_graph=True is not used for this model: its forward writes its parameters in place "
            "in eval mode (a rescaling, an EMA swap), which a replayed graph would repeat where no probe can put them "
            "back; the tracking pass runs eagerly from now on (the same values)",
            category=UserWarning,
        )

    def _check_examples(self, name: str, rows_per_batch: list[list[int]]) -> None:
        """Each call of a tap gives one row per example of its tracking batch, or one per token of a head run on the
        flattened ``B·T`` tokens where the inputs have a token axis (:func:`_flattened_tokens`). A module inside window
        attention (timm Swin's ``*.attn``: one row per window of every image) gives several per example, and a
        mixture-of-experts expert (a Switch layer's) gets the tokens routed to it, a count that is neither: their rows
        are not examples, and such a tap is left out, said once (before round 22 an expert's rows were tracked as
        examples while its count held). (An expert given as many
        rows as the examples is not told apart here; its rows change from pass to pass: :meth:`_check_rows`.)"""
        for batch, examples, rows in zip(self._batches, self._batch_examples, rows_per_batch, strict=True):
            inputs = first_batch_tensor(batch)
            if inputs is None or inputs.dim() == 0 or examples == 0:
                continue  # nothing tells the examples
            tokens = _flattened_tokens(inputs)
            other = next((count for count in rows if count not in (examples, tokens)), None)
            if other is None:
                continue
            if other > 0 and other % examples == 0:
                cause = "several rows per example: attention inside windows, such as timm Swin's *.attn, gives one " \
                    "per window, and a forward that repeats each example (views, beams) one per repeat"
                fix = "tap a module whose first axis holds the examples, e.g. the block around the windows, or pass " \
                    "forward_fn= running each example once"
            else:
                per_token = "" if tokens is None else f" nor one per token of its {tokens}"
                cause = f"neither one per example{per_token}: a mixture-of-experts expert gets the tokens routed to it"
                fix = "tap a module every example passes through, e.g. the MoE block's output"
            self._leave_out(
                name, f"SensitiveNeurons: {name} gives {other} rows for a tracking batch of {examples} examples "
                f"({cause}); its rows are not examples, so it is not tracked ({fix})"
            )
            return

    def _leave_out(self, name: str, warning: str) -> None:
        """Track ``name`` no more in this fit, said once: its rows are not examples."""
        self._rows_not_examples.add(name)
        for state in (self.embeddings, self.sensitive, self.previous, self.countdown):
            state.pop(name, None)  # nor is a drop put back at a resume
        self._remove_drop(name)
        rank_zero_warn(warning, category=UserWarning)

    def _check_rows(self, name: str, rows: tuple[int, ...]) -> None:
        """The rows of each call of a tap in a tracking pass are the same at every pass over the same batches, unless
        the module runs on a data-dependent part of them: a mixture-of-experts expert (Mixtral's ``experts.act_fn``)
        gets the tokens routed to it, which change with the weights, so its row i is another token at the next
        checkpoint. Such a tap's rows are not examples: it is left out, said once. (An expert run once on every
        routed token, grouped by expert, gives as many rows at each pass: not seen here.)"""
        held = self._call_rows.setdefault(name, rows)
        if held == rows or name in self._rows_not_examples:
            return
        self._leave_out(
            name, f"SensitiveNeurons: {name} runs on other rows of the same tracking batches from pass to pass "
            f"(call rows {list(held)}, then {list(rows)}: a mixture-of-experts expert gets the tokens routed to it); "
            "its rows are not examples, so it is not tracked (tap a module every example passes through, e.g. the MoE "
            "block's output)"
        )

    def _pass_embedding(self, tap: Tap, calls: list[torch.Tensor]) -> torch.Tensor:
        """A tap's embeddings of one pass: the rows of its calls of the width of its first call. A module called at
        several widths in one forward (torchvision's ``Bottleneck`` calls its one ``relu`` at 64 and 256 channels)
        gives features of different layers, whose rows do not stack: the others are left out, said once."""
        width = calls[0].shape[1]
        kept = [embedding for embedding in calls if embedding.shape[1] == width]
        if len(kept) < len(calls) and tap.name not in self._widths_warned:
            self._widths_warned.add(tap.name)
            widths = sorted({embedding.shape[1] for embedding in calls})
            rank_zero_warn(
                f"SensitiveNeurons: {tap.name} is called at widths {widths} in one tracking forward (one module reused "
                f"by several layers); only its calls of width {width}, its first call's, are tracked (tap the layers "
                "themselves, e.g. the convolutions or norms before it, to track each)",
                category=UserWarning,
            )
        return torch.cat(kept)

    @staticmethod
    def _rank_zeros(flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (a rank deciding alone left the broadcasts of the passes unpaired)."""
        if distributed_world_size() <= 1:
            return flag
        held = torch.tensor([float(flag)], device=device)
        dist.broadcast(held, src=0)
        return bool(held.item())

    @staticmethod
    def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
        if distributed_world_size() > 1:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=0)
        return tensor

    # ------------------------------------------------------------------ one checkpoint
    def checkpoint(self, trainer: pl.Trainer | None, pl_module: nn.Module, step: int) -> dict[str, float]:
        """Run the tracking set, update windows and sets, log ``sensitive/<layer>/<stat>`` at ``step``.

        Every tap's statistics and selected indices are derived on the device and reach the host in one read: one
        host sync per checkpoint, where a read per value made seven (``docs/performance.md``, round 12)."""
        clean, stochastic = self._run_passes(trainer, pl_module)
        ran_empty, self._ran_empty = self._ran_empty, {}
        derived: list[tuple[Tap, dict[str, torch.Tensor]]] = []
        for tap in self.taps:
            if tap.name not in clean:
                self._warn_unobserved(tap.name, step, ran_empty.get(tap.name))
                continue
            embedding = self._broadcast(clean[tap.name])
            window = self.embeddings.setdefault(tap.name, [])
            if window and window[-1].device != embedding.device:  # restored mid-fit (a learning-rate finder's trial
                window[:] = [held.to(embedding.device) for held in window]  # checkpoint): loaded on the CPU
            if window and window[-1].shape != embedding.shape:
                self._restart_tap(tap.name, tuple(window[-1].shape), tuple(embedding.shape), step)
            window.append(embedding)
            del window[: max(0, len(window) - (self.window + 1))]
            z = self._broadcast(stochastic[tap.name]) if tap.name in stochastic else None
            derived.append((tap, self._derive(tap, window, z)))
        metrics: dict[str, float] = {}
        unknown_now: dict[str, float] = {}
        for (tap, _), read in zip(derived, self._read(derived), strict=True):
            cut_short = "decided" in read and read["finite"] == 1.0 and not bool(read["decided"].all())
            if cut_short:
                self._warn_cut_short(tap.name, step, int(read["decided"].sum()), len(read["decided"]))
            if "decided" in read:
                read["indices"] = read["indices"][read.pop("decided").bool()]
            stats = self._update_selection(tap, read)
            unknown = [stat for stat, value in stats.items() if math.isnan(value)]
            unexplained = unknown
            if cut_short and len(read["indices"]) == 0:
                unexplained = [stat for stat in unknown if stat not in ("count", "selected")]
            if unexplained:  # a NaN would read like a measurement in every logger
                self._warn_unknown(tap.name, unexplained, step)
            for stat, value in stats.items():
                key = f"{self.prefix}/{tap.name}/{stat}"
                if stat in unknown:
                    unknown_now[key] = value  # for callback_metrics only, as the activation monitors do
                    continue
                metrics[key] = value
                series = self.history.get(key)
                if series is None:
                    series = self.history[key] = BoundedSeries(self.history_size)
                series.append(step, value)
        self.checkpoints += 1
        if trainer is not None:
            ActivationMonitor.log_metrics(trainer, metrics, step)
            self.publish(trainer, {**metrics, **unknown_now})
        return metrics

    def _restart_tap(self, name: str, held: tuple[int, ...], now: tuple[int, ...], step: int) -> None:
        """Forget a tap's window and sets, whose embeddings no longer stack with this checkpoint's: a fit resumed
        with another tracking set (``num_samples``, the validation data) or another tapped width (it crashed)."""
        rank_zero_warn(
            f"SensitiveNeurons: {name} gives embeddings of shape {now} at step {step}, the window held {held} (the "
            "tracking set or the layer changed since the checkpoint); its window and sensitive set start afresh",
            category=UserWarning,
        )
        self._forget_tap(name)

    def _forget_tap(self, name: str) -> None:
        self.embeddings[name].clear()
        for state in (self.sensitive, self.previous, self.countdown):
            state.pop(name, None)

    def _derive(self, tap: Tap, window: list[torch.Tensor], z: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One tap's values on the device: ``v_mean``, ``v_max`` and the new sensitive set's ``indices`` once the
        window is full (the indices only when a selection is due, with ``finite``: whether every ``V_i`` is, read in
        the same transfer, for a NaN sorts first and would be "selected"; and ``decided``: which of them the values
        choose, see :func:`decided_by_sensitivity`), ``eigenscore`` and ``ees`` of the passes ``z``."""
        values: dict[str, torch.Tensor] = {}
        if len(window) == self.window + 1:
            v = send_sensitivity(torch.stack(window))
            values["v_mean"], values["v_max"] = v.mean(), v.max()
            if not self.drop or self._countdown_left(tap) == 0:
                values["indices"] = top_fraction_indices(v, self.top_fraction)
                values["finite"] = torch.isfinite(v).all()
                values["decided"] = decided_by_sensitivity(v, values["indices"])
        if z is not None:
            # Non-finite embeddings have no spectrum: NaN reaches both scores through the log-det, with no host
            # branch. The EigenScore is log det(Σ + αI) / K, its definition, by a QR of the stacked centred passes
            # [J_d Z; √α I] (no eigensolver, whose error check reads the host, and no formed Σ, which loses α at a
            # large spread); up to EXACT_LOGDET_UP_TO passes the EES is that same exact log-det.
            generator = torch.Generator(device=z.device).manual_seed(self.seed * 1_000_003 + self.checkpoints)
            ees = efficient_eigenscore(z, self.alpha, self.num_moments, self.num_probes, generator)
            exact = ees if z.shape[-1] <= EXACT_LOGDET_UP_TO else eigenscore(z, self.alpha)
            values["eigenscore"], values["ees"] = exact.mean(), ees.mean()
        return values

    def _countdown_left(self, tap: Tap) -> int:
        """Checkpoints the tap's dropped set still has after this one (0: a new set is selected now)."""
        return max(0, self.countdown.get(tap.name, 0) - 1)

    @staticmethod
    def _read(derived: list[tuple[Tap, dict[str, torch.Tensor]]]) -> list[dict[str, Any]]:
        """Every tap's derived values on the host in one transfer: floats, and ``indices`` and ``decided`` as CPU
        LongTensors."""
        parts = [value.reshape(-1).to(torch.float64) for _, values in derived for value in values.values()]
        flat: list[float] = torch.cat(parts).tolist() if parts else []
        reads: list[dict[str, Any]] = []
        offset = 0
        for _, values in derived:
            read: dict[str, Any] = {}
            for name, value in values.items():
                piece = flat[offset : offset + value.numel()]
                offset += value.numel()
                read[name] = torch.tensor(piece, dtype=torch.int64) if name in ("indices", "decided") else piece[0]
            reads.append(read)
        return reads

    def _update_selection(self, tap: Tap, read: dict[str, Any]) -> dict[str, float]:
        """Sets, countdowns and drop hooks from one tap's host values; its logged statistics. A selection due from a
        sensitivity that is not finite (a NaN tracking example makes every ``V_i`` NaN), or that decides no feature
        (:func:`decided_by_sensitivity`: none moved), is not made: the previous set stays, dropped while it was, and
        ``count`` and ``selected`` are unknown (before round 22, and round 24 for the second, a set of arbitrary
        features was selected, and dropped with ``drop=True``)."""
        stats: dict[str, float] = {}
        selected = False
        unselectable = read.get("finite") == 0.0 or ("indices" in read and len(read["indices"]) == 0)
        if "v_mean" in read:
            stats["v_mean"], stats["v_max"] = read["v_mean"], read["v_max"]
            countdown = self._countdown_left(tap)
            if "indices" in read and not unselectable:
                indices = read["indices"]
                if tap.name in self.sensitive:
                    self.previous[tap.name] = self.sensitive[tap.name]
                    stats["jaccard"] = jaccard(indices, self.previous[tap.name])
                self.sensitive[tap.name] = indices
                selected = True
                if self.drop:
                    countdown = self.drop_checkpoints
                    self._set_drop(tap, indices)
            self.countdown[tap.name] = countdown
        stats["count"] = float(self.sensitive[tap.name].numel()) if tap.name in self.sensitive else 0.0
        stats["selected"] = 1.0 if selected else 0.0
        if unselectable:
            stats["count"] = stats["selected"] = math.nan
        if self.drop:
            stats["dropping"] = 1.0 if tap.name in self._drop_handles else 0.0
        for score in ("eigenscore", "ees"):
            if score in read:
                stats[score] = read[score]
        return stats

    def _set_drop(self, tap: Tap, indices: torch.Tensor) -> None:
        """Zero ``indices`` at the tap in training forwards, by hooks put before the capture's: the other monitors on
        the tap measure what the network computes, with them zeroed (before round 19 they read them before the drop);
        an input tap's zeroing is passed on to the capture's dropout read-through."""
        self._remove_drop(tap.name)
        layout = self._layouts[self.taps.index(tap)]
        key = (id(tap.module), tap.point)
        axes = dict(
            decided_axes=self._registry.feature_axes if self._registry else None, slot=(key, layout),
            axis_unknown=functools.partial(self._warn_drop_axis_unknown, tap.name),
        )
        if tap.point == "input":
            replaced = functools.partial(self._registry.input_replaced, key) if self._registry else None
            drop = FeatureDrop(indices, input_parameter(tap.module), layout, replaced, **axes)
            self._drop_handles[tap.name] = register_monitor_hook(
                tap.module, drop.before, pre=True, with_kwargs=True, prepend=True
            )
        else:
            drop = FeatureDrop(indices, layout=layout, **axes)
            self._drop_handles[tap.name] = register_monitor_hook(tap.module, drop.after, prepend=True)
        self._feature_drops[tap.name] = drop

    def _warn_drop_axis_unknown(self, tap_name: str, shape: tuple[int, ...]) -> None:
        """Say once per tap that a training activation's feature axis is unknown, so its drop zeroed nothing."""
        if tap_name in self._drop_axis_warned:
            return
        self._drop_axis_warned.add(tap_name)
        rank_zero_warn(
            f"SensitiveNeurons(drop=True): nothing tells which axis of {tap_name}'s {shape} training activations holds "
            "the features the sensitive set indexes, so none is zeroed there; pass feature_dim=1 (channels first) or "
            "feature_dim=-1 (features last)",
            category=UserWarning,
        )

    def _remove_drop(self, name: str) -> None:
        self._feature_drops.pop(name, None)
        handle = self._drop_handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def _arm(self, armed: bool) -> None:
        self.armed = armed
        if self._registry is not None:
            self._registry.refresh()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in list(self._drop_handles):
            self._remove_drop(name)
        self._pending_step = None
        self.armed = False
        self._tap_reads = None  # holds the model's modules
        self._graphed.reset()
        if self._registry is not None:
            self._registry.unsubscribe(self)
            self._registry = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def first_logged_step(self, key: str) -> int | None:
        """``v_mean``/``v_max`` need a full window (``window + 1`` checkpoints), ``jaccard`` a second selection (after
        ``drop_checkpoints`` dropped ones with ``drop``); the rest are logged from the first due step."""
        later = {"v_mean": self.window, "v_max": self.window,
                 "jaccard": self.window + (self.drop_checkpoints if self.drop else 1)}
        checkpoints = later.get(key.rpartition("/")[2])
        return None if checkpoints is None else checkpoints * self.every_n_steps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "embeddings": {name: [e.detach().cpu() for e in window] for name, window in self.embeddings.items()},
            "sensitive": {name: s.cpu() for name, s in self.sensitive.items()},
            "previous": {name: s.cpu() for name, s in self.previous.items()},
            "countdown": dict(self.countdown),
            "tracking_fingerprint": self._windows_fingerprint,
            "checkpoints": self.checkpoints,
        }

    def restore_state(self, state_dict: dict[str, Any]) -> None:
        super().restore_state(state_dict)
        self.embeddings = {
            current_tap_key(name): list(window) for name, window in state_dict.get("embeddings", {}).items()
        }
        self.sensitive = {current_tap_key(name): s for name, s in state_dict.get("sensitive", {}).items()}
        self.previous = {current_tap_key(name): s for name, s in state_dict.get("previous", {}).items()}
        self.countdown = {current_tap_key(name): int(c) for name, c in state_dict.get("countdown", {}).items()}
        self._windows_fingerprint = state_dict.get("tracking_fingerprint")  # absent before round 21: not compared
        self.checkpoints = int(state_dict.get("checkpoints", 0))
