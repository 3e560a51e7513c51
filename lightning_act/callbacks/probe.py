"""Extra forward passes of the model on fixed inputs (a *probe*), without perturbing training.

Used by ``SensitiveNeurons`` (its tracking set) and ``MassiveActivations(probe="val")`` (a fixed
set of evaluation sequences, as the massive-activation papers average over fixed sequences).

How the model is run is a ``forward_fn(pl_module, batch)``; the default calls
``pl_module(batch[0])`` for a tuple/list batch and ``pl_module(batch)`` otherwise. A probe runs in
eval mode (every module's flag restored afterwards), under ``torch.no_grad``, inside the
precision plugin's forward context and under ``torch.random.fork_rng``, so BatchNorm statistics,
the global RNG and the weights are untouched. Buffers a probe forward may change are put back bit for bit
(:func:`buffers_kept`): eval mode leaves BatchNorm's alone, but not a quantization-aware model's observers and
fake-quant scales (``torch.ao.quantization.prepare_qat``), which update at every forward, nor counters a model keeps;
a large buffer is not copied, and one a probe wrote in place is said once by name.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import DistributedSampler

from lightning_act.capture.registry import CaptureRegistry, ForwardCutoff, Subscriber
from lightning_act.errors import LightningActError
from lightning_act.lightning_classes import lightning_classes
from lightning_act.stats.reduce import all_gather_packed, distributed_world_size

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(pl_module: nn.Module, batch: Any) -> Any:
    """``pl_module(batch[0])`` for a tuple/list batch (inputs first), else ``pl_module(batch)``."""
    if isinstance(batch, (tuple, list)):
        return pl_module(batch[0])
    return pl_module(batch)


def resolve_forward_fn(owner: str, forward_fn: ForwardFn | str | None) -> ForwardFn:
    """A callable ``forward_fn`` (an import path ``"package.module.function"`` is imported), else one line."""
    if forward_fn is None:
        return default_forward
    if isinstance(forward_fn, str):
        module_path, _, name = forward_fn.rpartition(".")
        try:
            forward_fn = getattr(importlib.import_module(module_path), name)
        except (ImportError, AttributeError, ValueError):
            raise LightningActError(
                f"{owner}: forward_fn={forward_fn!r} cannot be imported; pass a callable (pl_module, batch) -> output "
                "or its import path 'package.module.function'"
            ) from None
    if not callable(forward_fn):
        raise LightningActError(f"{owner}: forward_fn={forward_fn!r} is not callable; pass a function (pl_module, batch)")
    return forward_fn


def call_forward(owner: str, forward_fn: ForwardFn, pl_module: nn.Module, batch: Any) -> Any:
    """``forward_fn(pl_module, batch)``; a failure becomes one line naming the fix."""
    try:
        return forward_fn(pl_module, batch)
    except LightningActError:
        raise
    except Exception as error:  # the user's model or function: report it in one line
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise LightningActError(
            f"{owner}: running the model on a probe batch failed ({type(error).__name__}: {first_line}); "
            "pass forward_fn=<a function (pl_module, batch) that runs your model on one validation batch>"
        ) from error


#: What a monitor can do without validation data, said where the validation loader is empty.
PROBE_ALTERNATIVES: dict[str, str] = {
    "SensitiveNeurons": ", or pass tracking_inputs=<a tensor of model inputs>",
    "MassiveActivations": ", or measure the training batches (probe=None)",
}


def validation_batches(
    trainer: pl.Trainer, owner: str, enough: Callable[[list[Any]], bool], loaders: list[Any] | None = None
) -> list[Any]:
    """The first validation batches of this fit, until ``enough(batches)``; raises one line if there are none.

    The batches come from the user's own ``val_dataloader`` (not Lightning's sharded copy), read under
    ``fork_rng`` because creating a DataLoader iterator draws a seed from the global RNG. The loader they came
    from is appended to ``loaders`` when given.
    """
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if source.instance is None or not source.is_defined():
        raise LightningActError(
            f"{owner} needs validation batches to probe but this fit has no validation data; "
            "pass val_dataloaders or a datamodule with val_dataloader()"
        )
    batches: list[Any] = []
    with torch.random.fork_rng(devices=_rng_devices(trainer.strategy.root_device)):
        loader = first_loader(source.dataloader())
        if loaders is not None:
            loaders.append(loader)
        for batch in loader:
            batches.append(batch)
            if enough(batches):
                break
    if not batches:
        raise LightningActError(
            f"{owner}: the validation dataloader is empty (a validation split of 0 examples?), so there is nothing to "
            f"probe; give the fit validation data{PROBE_ALTERNATIVES.get(owner, '')}"
        )
    return batches


def distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` a loader shards one dataset with (as its sampler or its batch sampler's), if any. A
    loader without one that still gives each rank other batches reads a dataset of its own per rank (pre-sharded
    files): its examples are all distinct, none is padding."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def sampled_dataset_size(loader: Any) -> int | None:
    """Examples in the dataset a loader's ``DistributedSampler`` shards, where it has one (``None`` otherwise): the
    size of the ranks' union without the sampler's padding."""
    sampler = distributed_sampler(loader)
    return None if sampler is None else len(sampler.dataset)  # type: ignore[arg-type]


def first_batch_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (the inputs): the batch itself, or the first of its first dict value or item."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return next((first_batch_tensor(v) for v in batch.values()), None)
    if isinstance(batch, (list, tuple)) and batch:
        return first_batch_tensor(batch[0])
    return None


def num_examples(batch: Any, axis: int = 0) -> int:
    """Examples in a batch: the length of its first tensor (the inputs) along ``axis``."""
    tensor = first_batch_tensor(batch)
    if tensor is None:
        return 0
    return tensor.shape[axis] if tensor.dim() > axis else 1


def without_sampler_padding(batches: list[Any], loader: Any, owner: str) -> list[Any]:
    """This rank's first ``batches`` from a loader that shards the data itself, without the examples its
    ``DistributedSampler`` repeats to pad a dataset that does not divide among the ranks: this rank's k-th example is
    the sampler's position k·W + r, a repeat from the dataset's size on. A batch holds the examples its batch sampler
    put in it, counted by going through the batch sampler once more (the ``DistributedSampler``'s order is fixed for
    the epoch), not as its tensors' rows: a graph collate makes one batch of 4 graphs ~20 node rows, and a bucketing
    batch sampler fills batches of 2, 3, 2 under a ``batch_size`` of 4; without a batch sampler over that sampler,
    its inputs' rows. A batch holding repeats is cut along the first axis of each of
    its tensors as long as its inputs, where its inputs' first axis has the batch's examples; otherwise (graphs,
    packed sequences) it is kept whole, said once, its repeats counted twice (before round 22 its node rows were cut,
    and the probe forward failed on edges naming the nodes cut off). Batches left empty are dropped. A loader without
    a ``DistributedSampler`` (a dataset per rank) repeats nothing: its batches are kept whole (before round 21 they
    were cut to the positions a sampler over the rank's own dataset would have kept, about 1/W of each rank's
    examples)."""
    sampler = distributed_sampler(loader)
    if sampler is None or sampler.num_replicas == 1:
        return batches
    size = min(len(sampler.dataset), sampler.total_size)  # type: ignore[arg-type]  # drop_last: no padding
    left = len(range(sampler.rank, size, sampler.num_replicas))
    batch_sampler = getattr(loader, "batch_sampler", None)
    counts = [len(indices) for indices in batch_sampler] if getattr(batch_sampler, "sampler", None) is sampler else None
    kept: list[Any] = []
    for index, batch in enumerate(batches):
        if left <= 0:
            break
        rows = num_examples(batch)
        count = rows if counts is None or index >= len(counts) else counts[index]
        if count <= left:
            kept.append(batch)
        elif rows == count:
            kept.append(_first_examples(batch, count, left))
        else:
            kept.append(batch)
            _warn_repeats_kept(owner, sampler.rank, count, left, rows)
        left -= count
    return kept


def _warn_repeats_kept(owner: str, rank: int, count: int, real: int, rows: int) -> None:
    """Say (once, from the rank concerned: the repeats are on the last ranks) that a batch holding the sampler's
    repeats is measured whole."""
    warnings.warn(
        f"{owner}: rank {rank}'s probe batch of {count} examples holds {count - real} the DistributedSampler repeats "
        f"to pad the validation set, but its inputs have {rows} rows, not one per example (graphs, packed sequences), "
        "so they cannot be cut out: the batch is measured whole, its repeats counted twice (pass "
        "DistributedSampler(..., drop_last=True) or a validation set that divides among the ranks)",
        UserWarning,
        stacklevel=2,
    )


def _first_examples(batch: Any, count: int, keep: int) -> Any:
    """The first ``keep`` of a batch's ``count`` examples: its tensors as long as the inputs, cut."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t[:keep] if t.dim() and t.shape[0] == count else t)


def batch_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """The tensors of a batch (nested in dicts, lists and tuples), in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from batch_tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from batch_tensors(value)


def same_on_every_rank(batches: list[Any], device: torch.device) -> bool:
    """Whether every rank holds the same ``batches`` (an unsharded loader), by a fingerprint of their sizes and sums:
    one small all-gather (collective: every rank must call it)."""
    if distributed_world_size() == 1:
        return True
    tensors = [t for batch in batches for t in batch_tensors(batch)]
    fingerprint = torch.stack(
        [torch.tensor(float(sum(t.numel() for t in tensors)), dtype=torch.float64, device=device)]
        + [t.detach().to(device, torch.float64).nan_to_num().sum() for t in tensors]
    ).sum().reshape(1)
    everyone = all_gather_packed([fingerprint])[0].reshape(-1)
    return bool((everyone == everyone[0]).all())


def first_loader(loaders: Any) -> Any:
    """The loader Lightning numbers ``dataloader_idx=0`` among ``loaders`` (a loader, a list/tuple/dict of them, or a
    ``CombinedLoader``, flattened as Lightning flattens them), so that a probe reads batches, not the dict's keys or
    a ``CombinedLoader``'s ``(batch, batch_idx, dataloader_idx)`` triples; ``[]`` for an empty collection."""
    combined = loaders
    if not isinstance(loaders, lightning_classes("utilities.CombinedLoader")):
        combined = CombinedLoader(loaders)
    flattened = combined.flattened
    return flattened[0] if flattened else []


def to_device(batch: Any, device: torch.device, trainer: pl.Trainer | None = None) -> Any:
    """``batch`` on ``device`` and, with a ``trainer``, in its precision's input type, as Lightning's loops convert
    every batch (``precision="64-true"`` makes floating inputs float64, ``"bf16-true"`` bfloat16)."""
    batch = move_data_to_device(batch, device)
    return batch if trainer is None else trainer.precision_plugin.convert_input(batch)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def own_passes(
    registry: CaptureRegistry | None, subscriber: Subscriber, cutoff: ForwardCutoff | None = None
) -> contextlib.AbstractContextManager[None]:
    """A probe's forwards handed to its own monitor alone (:meth:`CaptureRegistry.exclusive`): another monitor armed
    for the training step (a due step's monitors stay armed until its backward, or to its end under manual
    optimization) must not count them. Run each forward through ``cutoff.forward`` to end it after the last tap."""
    return contextlib.nullcontext() if registry is None else registry.exclusive(subscriber, cutoff)


#: A buffer up to this size is copied before a probe's passes whatever its module: a counter or a small table a
#: forward may write costs next to nothing to keep. A larger one is watched by its version counter instead (copying a
#: 256 MB KV cache the forward only reads cost 164 ms and its size again in memory at every probe).
COPIED_BUFFER_BYTES = 1 << 16

#: The buffers said to keep what a probe wrote (once each per process).
_unrestored_warned: set[str] = set()


def _writes_without_version_bump(module: nn.Module) -> bool:
    """Whether ``module`` updates its buffers in eval mode where their version counters may not tell: the observers
    and fake-quant modules of ``torch.ao.quantization`` (a QAT model's fused observer writes without moving them)."""
    return isinstance(module, (torch.ao.quantization.ObserverBase, torch.ao.quantization.FakeQuantizeBase))


@contextlib.contextmanager
def buffers_kept(pl_module: nn.Module) -> Iterator[None]:
    """The buffers of ``pl_module`` as they were before, bit for bit, after what runs inside, without copying those a
    forward only reads: a buffer replaced (``module.x = new``) gets its old tensor back; those of the quantization
    observers (:func:`_writes_without_version_bump`), small ones (:data:`COPIED_BUFFER_BYTES`) and those whose version
    counter cannot be read (made under inference mode) are copied and put back, by re-assigning the copy where the
    buffer's elements share memory (an expanded grid, which ``copy_`` refuses). Any other buffer written inside (its
    version counter moved) keeps the new value, said once by name."""
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    watched: dict[int, tuple[torch.Tensor, int, str]] = {}
    places = []
    for module_name, module in pl_module.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            places.append((module, name, buffer))
            if id(buffer) in held or id(buffer) in watched:  # a buffer shared by several modules is kept once
                continue
            small = buffer.numel() * buffer.element_size() <= COPIED_BUFFER_BYTES
            if small or buffer.is_inference() or _writes_without_version_bump(module):
                held[id(buffer)] = (buffer, buffer.detach().clone())
            else:
                watched[id(buffer)] = (buffer, buffer._version, f"{module_name}.{name}".lstrip("."))
    try:
        yield
    finally:
        reassigned = {}
        for module, name, buffer in places:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
        with torch.inference_mode():
            for key, (buffer, before) in held.items():
                if buffer.layout == torch.strided and torch._debug_has_internal_overlap(buffer) == 1:  # expanded
                    if not torch.equal(buffer, before):
                        reassigned[key] = before
                    continue
                if buffer.shape != before.shape:
                    buffer.resize_(before.shape)
                buffer.copy_(before)
        for module, name, buffer in places:
            if id(buffer) in reassigned:
                module._buffers[name] = reassigned[id(buffer)]
        for buffer, version, name in watched.values():
            if buffer._version != version and name not in _unrestored_warned:
                _unrestored_warned.add(name)
                rank_zero_warn(
                    f"a probe pass of the monitors (eval mode, no_grad) wrote the buffer {name!r} in place; it is "
                    f"larger than the {COPIED_BUFFER_BYTES // 1024} KiB the probes copy, so it keeps what the probe "
                    "wrote: write it in training mode only (`if self.training:`) to keep the probes off it",
                    category=UserWarning,
                )


def forward_is_collective(pl_module: nn.Module) -> bool:
    """Whether a forward of the model communicates between the ranks, so that every rank must run each probe forward
    (one rank alone waits for the others forever): FSDP2 (``fully_shard``) all-gathers each module's parameters. A
    DDP forward is local. (Under tensor parallelism, whose forward is a collective too, the monitors stay idle.)"""
    return bool(_fsdp2_modules(pl_module))


def _fsdp2_modules(pl_module: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in pl_module.modules() if isinstance(module, FSDPModule)]


def _reshard(pl_module: nn.Module) -> None:
    """FSDP2 modules back to their sharded parameters after a probe: the root module keeps its parameters gathered
    after a forward, for the backward that follows it in training, which a probe never has. Left gathered at fit start,
    they were plain tensors where Lightning's restore of a full checkpoint (after ``on_fit_start`` under strategies that
    restore after setup) loads into DTensors: the resume failed."""
    for module in _fsdp2_modules(pl_module):
        module.reshard()  # type: ignore[operator]


@contextlib.contextmanager
def probing(trainer: pl.Trainer | None, pl_module: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no_grad, the precision context and a forked RNG; every train/eval flag and buffer restored.

    PyTorch's fast path for ``nn.TransformerEncoder``/``MultiheadAttention`` is off meanwhile: in eval mode without
    gradients it would turn padded sequences (``src_key_padding_mask``) into nested tensors, which no statistic can
    read; off, the probe's forward computes what the training forward computes. FSDP2 modules are resharded after
    (:func:`_reshard`)."""
    flags = {module: module.training for module in pl_module.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with buffers_kept(pl_module), torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(device)), context:
            pl_module.eval()
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for module, flag in flags.items():
            module.train(flag)
        _reshard(pl_module)
