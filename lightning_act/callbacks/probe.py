"""Extra forward passes of the model on fixed inputs (a *probe*), without perturbing training.

Used by ``SensitiveNeurons`` (its tracking set) and ``MassiveActivations(probe="val")`` (a fixed
set of evaluation sequences, as the massive-activation papers average over fixed sequences).

How the model is run is a ``forward_fn(pl_module, batch)``; the default calls
``pl_module(batch[0])`` for a tuple/list batch and ``pl_module(batch)`` otherwise. A probe runs in
eval mode (every module's flag restored afterwards), under ``torch.no_grad``, inside the
precision plugin's forward context and under ``torch.random.fork_rng``, so BatchNorm statistics,
the global RNG and the weights are untouched (those an ``nn.Embedding(max_norm=...)`` lookup renormalises in place
are put back, and those a forward writes in place, :func:`parameters_kept`). Buffers a probe forward may change are
put back bit for bit (:func:`buffers_kept`): eval mode leaves BatchNorm's alone, but not a quantization-aware model's
observers and fake-quant scales (``torch.ao.quantization.prepare_qat``), which update at every forward, nor counters a
model keeps; a large buffer is not copied, and one a probe wrote in place is said once per model by name. So are
the modules' attributes holding tensors, containers of them (nested, within bounds) or ``None`` (carried state,
``self.h = out.detach()``; a KV cache of ``(k, v)`` pairs in a list), and those a probe forward adds are removed
(:func:`attributes_kept`; numbers, strings and flags a probe rebinds get their objects back, those it adds are
left), and the generators the modules hold
and Python's ``random`` are forked and seeded with torch's (:func:`random_sources_forked`); numpy's global state is
not (its save costs ~0.2 ms). Lazy modules whose weights are still unmade (before the fit's first training forward)
run on stand-in weights and stay unmade (:func:`lazy_modules_kept`).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import importlib
import itertools
import operator
import random
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.utils.data import DataLoader, IterableDataset

from lightning_act.capture.registry import CaptureRegistry, ForwardCutoff, Subscriber
from lightning_act.data.sampler_padding_index import (
    distributed_sampler,
    padding_indices,
    padding_rows,
    recording_indices,
)
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
        raise LightningActError(
            f"{owner}: forward_fn={forward_fn!r} is not callable; pass a function (pl_module, batch)"
        )
    return forward_fn


#: Inside :func:`probing`: the seeds of its next forwards, one each, the CUDA devices its RNG fork holds, the
#: generators the model's modules hold (:func:`random_sources_forked`) and the seed of the last forward (for
#: :func:`drew_random`; ``None`` before the first).
_forward_seeds: contextvars.ContextVar[
    tuple[Iterator[int], list[int], list[torch.Generator], list[int | None]] | None
] = contextvars.ContextVar("probe_forward_seeds", default=None)


@contextlib.contextmanager
def forward_seeds(seeds: Iterator[int]) -> Iterator[None]:
    """Inside (and inside :func:`probing`), the probe forwards take their seeds from ``seeds`` instead: a pass of
    its own random draws, such as SensitiveNeurons' stochastic EigenScore passes."""
    held = _forward_seeds.get()
    token = _forward_seeds.set((seeds, *(([], [], [None]) if held is None else held[1:])))
    try:
        yield
    finally:
        _forward_seeds.reset(token)


def _seed_forward() -> None:
    """Seed the global RNG (CPU, and the forked CUDA device), the generators the model's modules hold and Python's
    ``random`` for the next probe forward, inside :func:`probing`'s forks of them: forward k
    of a probe pass draws the same noise at every probe (a VAE's sampling in eval mode, a diffusion model's timestep,
    stochastic depth written with ``torch.rand``), not whatever the training left the RNG at, and a forward ended
    early by the cutoff does not move the next one's. Not while a CUDA graph is being captured, whose replays draw
    from the graph's own offsets."""
    held = _forward_seeds.get()
    if held is None:
        return
    seeds, devices, generators, last_seed = held
    if devices and torch.cuda.is_current_stream_capturing():
        return
    seed = next(seeds)
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)
    for generator in generators:
        generator.manual_seed(seed)
    random.seed(seed)
    last_seed[0] = seed


def drew_random() -> bool:
    """Whether the probe forward just run drew random numbers after :func:`_seed_forward` seeded them: torch's CPU
    generator, a forked CUDA device's (its offset moved from the 0 seeding sets), a generator the model's modules hold
    (``torch.randn(..., generator=self.gen)``) or Python's ``random`` is no longer in its seed's state (a VAE's
    ``torch.randn_like``, ``random.gauss``; before round 29 only torch's default generators were read). Host-side
    reads, no sync; ``False`` outside a probe or before its first forward. numpy's global RNG is neither forked nor
    seeded by the probes, so not read."""
    held = _forward_seeds.get()
    if held is None or held[3][0] is None:
        return False
    _, devices, generators, (seed,) = held
    if any(torch.cuda.default_generators[index].get_offset() != 0 for index in devices):
        return True
    for generator in (torch.default_generator, *generators):
        if generator.device.type == "cuda":
            if generator.get_offset() != 0:
                return True
        elif not torch.equal(
            generator.get_state(), torch.Generator(generator.device).manual_seed(generator.initial_seed()).get_state()
        ):
            return True
    return random.getstate() != random.Random(seed).getstate()


#: Inside :func:`own_passes`: the cutoff its probe forwards run under.
_probe_cutoff: contextvars.ContextVar[ForwardCutoff | None] = contextvars.ContextVar("probe_cutoff", default=None)

#: The models said once to have their probe forwards run whole, as they write their parameters in a forward (per model:
#: a new model of a hyper-parameter loop or a re-run cell is told again; before round 26 it was once per monitor class
#: name per process).
_cutoff_off_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def call_forward(
    owner: str, forward_fn: ForwardFn, pl_module: nn.Module, batch: Any, source: str = "validation"
) -> Any:
    """``forward_fn(pl_module, batch)``, seeded where a probe runs it (:func:`_seed_forward`); a failure becomes one
    line naming the likely fixes (:func:`_forward`; ``source``: ``"validation"`` or ``"tracking_inputs"``, where the
    batch came from).

    A model that swaps its EMA weights in for an eval forward and back after it must not have
    its probe forwards ended after the last tap: the swap back would be skipped, and training would go on from the
    swapped weights. So a whole forward of a probe's first pass whose parameters, at the last tapped delivery, are
    other tensors (``p.data`` rebound) or written in place since the forward began, or written in place by its end,
    turns the probe's cutoff off, said once (:func:`_whole_forward_watched`); and a forward ended early that left a
    parameter's ``.data`` rebound (a swap that began after the first pass) gets it back and turns the cutoff off
    (:func:`_ended_forward_guarded`). The rows an ``nn.Embedding(max_norm=...)`` renormalises do not count:
    :func:`probing` puts them back (:func:`renormed_weights`)."""
    _seed_forward()
    cutoff = _probe_cutoff.get()
    if cutoff is None or not cutoff.enabled:
        return _forward(owner, forward_fn, pl_module, batch, source)
    if cutoff.expected is None:
        return _whole_forward_watched(owner, forward_fn, pl_module, batch, cutoff, source)
    return _ended_forward_guarded(owner, forward_fn, pl_module, batch, cutoff, source)


def _forward(owner: str, forward_fn: ForwardFn, pl_module: nn.Module, batch: Any, source: str) -> Any:
    """``forward_fn(pl_module, batch)``; a failure is one line. The default forward fails most often because the
    batches are not what the model takes (another recipe's data module: EEG windows given to an image classifier),
    so that comes first; ``forward_fn=`` only where the model is called otherwise (before round 25 it was the one fix
    named, and the monitor was blamed for the data)."""
    try:
        return forward_fn(pl_module, batch)
    except LightningActError:
        raise
    except Exception as error:  # the user's model or function: report it in one line
        form = getattr(pl_module, "batch_form", None)  # the project's tasks say which batches they take
        if forward_fn is default_forward and source == "validation" and form is not None:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)  # what default_forward reads first
            form.check(inputs, 0, type(pl_module).__name__, "val", inputs_only=True)
        first_line = str(error).splitlines()[0] if str(error) else ""
        where, check = (
            ("a batch of tracking_inputs", "tracking_inputs") if source == "tracking_inputs"
            else ("a batch of the validation loader", "the data module")
        )
        how = "the model" if forward_fn is default_forward else "forward_fn"
        otherwise = (
            "the model is called otherwise than pl_module(inputs) and needs forward_fn=<a function (pl_module, batch) "
            "that runs it on one batch>" if forward_fn is default_forward
            else "forward_fn does not run it on one batch (it is called as forward_fn(pl_module, batch))"
        )
        raise LightningActError(
            f"{owner}: running {how} on {where} failed ({type(error).__name__}: {first_line}); the batches may not "
            f"fit the model (check {check}), or {otherwise}"
        ) from error


def _parameter_states(parameters: list[nn.Parameter]) -> list[tuple[int | None, int]]:
    """Each parameter's storage and version: another tensor bound to ``p.data`` moves the first, a write in place
    the second."""
    return [(_address(p), p._version) for p in parameters]


def _address(tensor: torch.Tensor) -> int | None:
    """``tensor.data_ptr()``, which another tensor bound to a parameter's ``.data`` moves; ``None`` for a tensor
    without strided storage (a sparse parameter, whose ``data_ptr()`` raised in every probe before round 29)."""
    return tensor.data_ptr() if tensor.layout is torch.strided else None


def _whole_forward_watched(
    owner: str, forward_fn: ForwardFn, pl_module: nn.Module, batch: Any, cutoff: ForwardCutoff, source: str
) -> Any:
    """A whole forward of a probe's first pass, the parameters' states noted at each delivery to the probe: those at
    the last one are what a later forward, ended there, would leave (a ``p.data, ema = ema, p.data`` swap moves no
    version counter and is undone by the forward's end, so only the state there tells it)."""
    renormed = {id(weight) for weight in renormed_weights(pl_module)}
    watched = [p for p in pl_module.parameters() if id(p) not in renormed and not nn.parameter.is_lazy(p)]
    at_start = _parameter_states(watched)
    moved_at_last_delivery = False

    def delivered(key: tuple[int, str]) -> None:
        nonlocal moved_at_last_delivery
        moved_at_last_delivery = _parameter_states(watched) != at_start
        type(cutoff).delivered(cutoff, key)

    cutoff.delivered = delivered  # type: ignore[method-assign]  # this forward's deliveries only
    try:
        output = _forward(owner, forward_fn, pl_module, batch, source)
    finally:
        del cutoff.delivered
    versions_at_start = [version for _, version in at_start]
    if moved_at_last_delivery or versions_at_start != [p._version for p in watched]:
        _cutoff_off(owner, pl_module, cutoff, "its probe forwards run whole")
    return output


def _ended_forward_guarded(
    owner: str, forward_fn: ForwardFn, pl_module: nn.Module, batch: Any, cutoff: ForwardCutoff, source: str
) -> Any:
    """A forward that the cutoff may end, each parameter's ``.data`` put back if the forward ended with another
    tensor bound to it (a swap the first pass did not see: one that begins at a later step), the weights of an
    embedding with ``max_norm`` too. Their rows, which a lookup renormalises, do not count as written
    (:func:`probing` puts them back; before round 26 they turned the cutoff off with a false "training goes on from
    what it wrote")."""
    parts = _probed_parts.get() or _ModelParts.of(pl_module)
    kept = [(p, p.data, p._version) for p in parts.parameters if not nn.parameter.is_lazy(p)]
    try:
        return _forward(owner, forward_fn, pl_module, batch, source)
    except BaseException:  # ended after the last tap (or failed): the code after it did not run
        rebound = [(p, data) for p, data, _ in kept if _address(p) != _address(data)]
        for p, data in rebound:
            p.data = data.clone()  # storage of its own: the tensor swapped out (an EMA's) keeps what it holds
        renormed = {id(weight) for weight in parts.renormed}
        written = [p for p, data, version in kept
                   if id(p) not in renormed and _address(p) == _address(data) and p._version != version]
        if rebound:
            _cutoff_off(
                owner, pl_module, cutoff, "its parameters were put back after a probe forward ended with other tensors "
                "bound to them (the copy the forward swapped out, an EMA's, now holds the training weights: pass "
                "stop_after_taps=False for such a model) and its later probe forwards run whole"
            )
        elif written:  # a copy in that the ended forward did not copy back: no copy of the weights to undo it from
            _cutoff_off(
                owner, pl_module, cutoff, "a probe forward ended after it wrote them, before it wrote them back, and "
                "training goes on from what it wrote (pass stop_after_taps=False for such a model); its later probe "
                "forwards run whole"
            )
        raise


def _cutoff_off(owner: str, pl_module: nn.Module, cutoff: ForwardCutoff, consequence: str) -> None:
    """The cutoff off for a model whose forward writes or swaps its parameters, said once per model; its counts
    dropped, so that no later delivery ends a forward."""
    cutoff.enabled = False
    cutoff.expected = None
    if pl_module not in _cutoff_off_warned:
        _cutoff_off_warned.add(pl_module)
        rank_zero_warn(
            f"{owner}: the model's forward writes its parameters in place or rebinds their .data in eval mode (an "
            f"EMA swap, say), so {consequence}, not ended after the last tapped module (stop_after_taps has no effect "
            "for it): an ended forward would skip the code that puts them back",
            category=UserWarning,
        )


#: What a monitor can do without validation data, said where the validation loader is empty.
PROBE_ALTERNATIVES: dict[str, str] = {
    "SensitiveNeurons": ", or pass tracking_inputs=<a tensor of model inputs>",
    "MassiveActivations": ", or measure the training batches (probe=None)",
}


#: The dataset indices of each batch a probe last read from a sharded loader (:func:`validation_batches`; ``None`` for
#: a batch whose items are not indices).
_indices_read: weakref.WeakKeyDictionary[Any, list[list[int] | None]] = weakref.WeakKeyDictionary()

#: The sharded probe loaders said once not to tell their padding by index (per loader, not per owner's name: a new
#: fit's loader is told again; before round 26 it was once per process).
_unknown_indices_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def validation_batches(
    trainer: pl.Trainer, owner: str, enough: Callable[[list[Any]], bool], loaders: list[Any] | None = None,
    instead: str = "",
) -> list[Any]:
    """The first validation batches of this fit, until ``enough(batches)``, from the first validation loader that
    holds any (said once where that is not ``dataloader_idx=0``: before round 29 an empty first loader stopped the fit
    though the others held data); raises one line if there are none. Under DDP the first that holds any on any rank
    (:func:`_on_any_rank`: in round 29 each rank took its own, and a loader empty on one rank only mixed two validation
    sets into one tracking set, silently); a rank whose copy of it is empty gives no batches, and ``enough`` sees no
    other loader's (collective: every rank must call it).

    ``instead``: the rest of that line's fix, another way the owner takes its inputs. The batches come from the
    user's own ``val_dataloader`` (not Lightning's sharded copy), read under
    ``fork_rng`` because creating a DataLoader iterator draws a seed from the global RNG, through an iterator of the
    probe's own (:func:`own_iterator`). The loader they came from is appended to ``loaders`` when given. Where it
    shards the data with a ``DistributedSampler``, each batch's dataset indices are noted as it is read
    (:func:`batch_indices`), for telling the sampler's padding by index. An ``IterableDataset`` cannot be rewound:
    reading it is said once (an RL evaluation stream whose environment carries on gave every later validation other
    episodes, silently).
    """
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if source.instance is None or not source.is_defined():
        raise LightningActError(
            f"{owner} needs validation batches to probe but this fit has no validation data; "
            f"pass val_dataloaders or a datamodule with val_dataloader(){instead}"
        )
    batches: list[Any] = []
    with torch.random.fork_rng(devices=_rng_devices(trainer.strategy.root_device)):
        flattened = flattened_loaders(source.dataloader())
        held = False
        for index, loader in enumerate(flattened):
            with own_iterator(loader), recording_indices(loader) as record:
                for batch in loader:
                    batches.append(batch)
                    if enough(batches):
                        break
            held = _on_any_rank(bool(batches), trainer.strategy.root_device)
            if held:
                break
    if not held:
        which = f"every one of the {len(flattened)} validation dataloaders is" if len(flattened) > 1 else (
            "the validation dataloader is"
        )
        raise LightningActError(
            f"{owner}: {which} empty (a validation split of 0 examples?), so there is nothing to "
            f"probe; give the fit validation data{PROBE_ALTERNATIVES.get(owner, '')}"
        )
    if index:
        empty = "validation dataloader 0 is" if index == 1 else f"validation dataloaders 0 to {index - 1} are"
        rank_zero_warn(
            f"{owner}: {empty} empty, so it takes its batches from validation dataloader {index} "
            f"(dataloader_idx={index}), the first that holds any",
            category=UserWarning,
        )
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        rank_zero_warn(
            f"{owner} read {len(batches)} batch(es) of validation dataloader {index} at fit start, whose dataset is "
            "an IterableDataset: a stream that cannot be rewound, so where its iteration moves state of its own (RL "
            "evaluation episodes played in an environment that carries on, a generator it keeps), every validation "
            "of the fit sees other items than without the monitor; give the fit a map-style validation Dataset"
            f"{PROBE_ALTERNATIVES.get(owner, '')}",
            category=UserWarning,
        )
    if loaders is not None:
        loaders.append(loader)
    if record is not None:
        _indices_read[loader] = record[: len(batches)]
    return batches


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank, by one all-reduce (collective: every rank must call it); ``flag`` in one
    process."""
    if distributed_world_size() == 1:
        return flag
    anywhere = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
    return bool(anywhere.item())


@contextlib.contextmanager
def own_iterator(loader: Any) -> Iterator[None]:
    """Inside, a persistent-worker DataLoader (``persistent_workers=True``) makes a new iterator instead of resetting
    the one it keeps, and after, that iterator's workers are shut down and the kept one (``None`` before the loader's
    first pass) put back: the loader's next pass is what it is without the probe. Reset, a kept iterator goes through
    the index sampler it was made with, not the recording one (:func:`recording_indices`), so no index was noted;
    and one the probe made under ``fork_rng`` and left behind was reused by the first validation, which then did not
    draw its base seed from the global RNG, and the training's random stream moved."""
    if not isinstance(loader, DataLoader) or not loader.persistent_workers:
        yield
        return
    kept = loader._iterator
    loader._iterator = None
    try:
        yield
    finally:
        made, loader._iterator = loader._iterator, kept
        if made is not None:
            made._shutdown_workers()


def first_batch_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (the inputs): the batch itself, or the first of its first dict value or item."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return next((first_batch_tensor(v) for v in batch.values()), None)
    if isinstance(batch, (list, tuple)) and batch:
        return first_batch_tensor(batch[0])
    return None


def _per_example_lists(batch: Any) -> bool:
    """Whether a batch is lists of one item per example, the first of tensors (the inputs):
    ``tuple(zip(*examples))``. Not where every item of every list is a tensor and all share one first axis: that is a
    collated batch of several inputs and targets (``default_collate`` of ``((x_a, x_b), (y_a, y_b))`` items gives
    ``[[X_a, X_b], [Y_a, Y_b]]``, each ``(B, ...)``), whose lists hold fields, not examples."""
    if not (
        isinstance(batch, (list, tuple)) and bool(batch)
        and all(isinstance(item, (list, tuple)) and not hasattr(item, "_fields") for item in batch)  # not fields
        and len({len(item) for item in batch}) == 1 and all(isinstance(x, torch.Tensor) for x in batch[0])
    ):
        return False
    items = [x for item in batch for x in item]
    collated = all(isinstance(x, torch.Tensor) and x.dim() for x in items) and len({x.shape[0] for x in items}) == 1
    return not collated


def num_examples(batch: Any, axis: int = 0) -> int:
    """Examples in a batch: the length of its first tensor (the inputs) along ``axis``; in a batch of per-example lists
    (``collate_fn=lambda b: tuple(zip(*b))``, as torchvision's detection models take a list of images of any size)
    the lists' length (before round 23 the first image's channels were counted)."""
    if _per_example_lists(batch):
        return len(batch[0])
    tensor = first_batch_tensor(batch)
    if tensor is None:
        return 0
    return tensor.shape[axis] if tensor.dim() > axis else 1


def batch_indices(batches: list[Any], loader: Any) -> list[list[int]] | None:
    """The dataset indices of each of ``batches``, the first batches read from ``loader``: as noted while
    :func:`validation_batches` read them, else (batches read by the caller, under ``fork_rng`` from the global RNG state
    of now) by reading the loader again under ``fork_rng`` from this state, which gives the same batches even from a
    batch sampler that shuffles per pass (before round 23 a second pass of the batch sampler, outside ``fork_rng``,
    gave another order and moved the training's RNG). ``None`` where they cannot be known
    (:func:`~lightning_act.data.sampler_padding_index.recording_indices`; a batch sampler whose items are not dataset
    indices, such as a multi-scale sampler's ``(index, size)`` pairs)."""
    record = _indices_read.get(loader) if isinstance(loader, DataLoader) else None
    if record is not None and len(record) == len(batches):
        return None if None in record else record
    with torch.random.fork_rng(devices=[]), own_iterator(loader), recording_indices(loader) as record:
        if record is None:
            return None
        collections.deque(itertools.islice(loader, len(batches)), maxlen=0)  # read: the recorder notes each batch
    if len(record) < len(batches) or None in record[: len(batches)]:
        return None
    return record[: len(batches)]


def without_sampler_padding(batches: list[Any], loader: Any, owner: str) -> list[Any]:
    """This rank's first ``batches`` from a loader that shards the data itself, without the examples its
    ``DistributedSampler`` repeats to pad a dataset that does not divide among the ranks, told by their dataset indices
    (:func:`batch_indices`; :mod:`lightning_act.data.sampler_padding_index`): a batch sampler that reorders its
    sampler's indices puts a repeat in any batch (before round 23 the repeats were taken to be the rank's last
    examples, and a longest-first bucketing sampler measured the repeat and cut a real example). A batch's examples are
    its indices, not its tensors' rows (a graph collate makes one batch of 4 graphs ~20 node rows). A batch holding
    repeats is cut along the first axis of each of its tensors as long as its inputs, where its inputs' first axis has
    the batch's examples; otherwise (graphs, packed sequences) it is kept whole, said once, its repeats counted twice.
    Batches of repeats alone are dropped. Where the indices cannot be known the batches are kept whole, said once. A
    loader without a ``DistributedSampler`` (a dataset per rank) repeats nothing: its batches are kept whole."""
    sampler = distributed_sampler(loader)
    if sampler is None or sampler.num_replicas == 1:
        return batches
    padding = padding_indices(sampler)
    if not padding:
        return batches
    indices = batch_indices(batches, loader)
    if indices is None:
        if loader not in _unknown_indices_warned:
            _unknown_indices_warned.add(loader)
            warnings.warn(
                f"{owner}: rank {sampler.rank}'s probe loader ({type(loader).__name__}) does not tell the dataset "
                f"indices of its batches, so the {len(padding)} examples its DistributedSampler repeats to pad the "
                "validation set cannot be told apart: every probe batch is measured whole, the repeats counted twice "
                "(pass a torch DataLoader with in_order=True whose batch sampler gives dataset indices, "
                "DistributedSampler(..., drop_last=True), or a validation set that divides among the ranks)",
                UserWarning,
                stacklevel=2,
            )
        return batches
    kept: list[Any] = []
    for batch, repeats in zip(batches, padding_rows(indices, padding), strict=True):
        count, rows = len(repeats), num_examples(batch)
        if not any(repeats):
            kept.append(batch)
        elif all(repeats):
            continue
        elif rows == count:
            kept.append(_without_rows(batch, torch.tensor(repeats)))
        else:
            kept.append(batch)
            _warn_repeats_kept(owner, sampler.rank, count, count - sum(repeats), rows)
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


def _without_rows(batch: Any, repeats: torch.Tensor) -> Any:
    """A batch without the examples flagged in ``repeats``: its tensors as long as the inputs, cut; a batch of
    per-example lists (:func:`num_examples`), each list cut."""
    keep = ~repeats
    if _per_example_lists(batch):
        return type(batch)(type(item)(x for x, kept in zip(item, keep.tolist(), strict=True) if kept) for item in batch)
    return apply_to_collection(
        batch, torch.Tensor, lambda t: t[keep.to(t.device)] if t.dim() and t.shape[0] == len(keep) else t
    )


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


def flattened_loaders(loaders: Any) -> list[Any]:
    """The loaders among ``loaders`` (a loader, a list/tuple/dict of them, or a ``CombinedLoader``) in the order
    Lightning numbers them ``dataloader_idx``, so that a probe reads batches, not the dict's keys or a
    ``CombinedLoader``'s ``(batch, batch_idx, dataloader_idx)`` triples; ``[]`` for an empty collection."""
    combined = loaders
    if not isinstance(loaders, lightning_classes("utilities.CombinedLoader")):
        combined = CombinedLoader(loaders)
    return list(combined.flattened)


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
    if registry is None:
        return contextlib.nullcontext()
    return _with_cutoff(registry.exclusive(subscriber, cutoff), cutoff)


@contextlib.contextmanager
def _with_cutoff(exclusive: contextlib.AbstractContextManager[None], cutoff: ForwardCutoff | None) -> Iterator[None]:
    """``exclusive``, with ``cutoff`` known to :func:`call_forward` meanwhile."""
    token = _probe_cutoff.set(cutoff)
    try:
        with exclusive:
            yield
    finally:
        _probe_cutoff.reset(token)


#: A buffer up to this size is copied before a probe's passes whatever its module: a counter or a small table a
#: forward may write costs next to nothing to keep. A larger one is watched by its version counter instead (copying a
#: 256 MB KV cache the forward only reads cost 164 ms and its size again in memory at every probe).
COPIED_BUFFER_BYTES = 1 << 16

#: Per model, the names of its buffers said to keep what a probe wrote (a new model is told again; before round 26 a
#: buffer's name was said once per process).
_unrestored_warned: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _writes_without_version_bump(module: nn.Module) -> bool:
    """Whether ``module`` updates its buffers in eval mode where their version counters may not tell: the observers
    and fake-quant modules of ``torch.ao.quantization`` (a QAT model's fused observer writes without moving them)."""
    return isinstance(module, (torch.ao.quantization.ObserverBase, torch.ao.quantization.FakeQuantizeBase))


@contextlib.contextmanager
def buffers_kept(modules: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """The buffers of ``pl_module`` as they were before, bit for bit, after what runs inside, without copying those a
    forward only reads: a buffer replaced (``module.x = new``) gets its old tensor back, one registered as ``None`` is
    ``None`` again (before round 28 the carried state a probe forward put there stayed); those of the quantization
    observers (:func:`_writes_without_version_bump`), small ones (:data:`COPIED_BUFFER_BYTES`) and those whose version
    counter cannot be read (made under inference mode) are copied and put back, by re-assigning the copy where the
    buffer's elements share memory (an expanded grid, which ``copy_`` refuses). Any other buffer written inside (its
    version counter moved) keeps the new value, said once per model by name. ``modules``: the model's
    ``named_modules()``, the model first."""
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    watched: dict[int, tuple[torch.Tensor, int, str]] = {}
    places = []
    for module_name, module in modules:
        for name, buffer in module._buffers.items():
            if buffer is None:  # a slot a forward may fill (``register_buffer("h", None)``): None again after
                places.append((module, name, buffer))
                continue
            if nn.parameter.is_lazy(buffer):  # a lazy module's, unmade: lazy_modules_kept's
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
            said = _unrestored_warned.setdefault(modules[0][1], set())  # per model: modules[0] is the model
            if buffer._version != version and name not in said:
                said.add(name)
                rank_zero_warn(
                    f"a probe pass of the monitors (eval mode, no_grad) wrote the buffer {name!r} in place; it is "
                    f"larger than the {COPIED_BUFFER_BYTES // 1024} KiB the probes copy, so it keeps what the probe "
                    "wrote: write it in training mode only (`if self.training:`) to keep the probes off it",
                    category=UserWarning,
                )


def renormed_weights(pl_module: nn.Module) -> list[nn.Parameter]:
    """The weights of the ``nn.Embedding``/``nn.EmbeddingBag`` modules with ``max_norm`` set: a lookup renormalises
    the rows it reads in place, in eval mode and under ``no_grad`` too (``torch.embedding_renorm_``)."""
    return _renormed_among(pl_module.modules())


def _renormed_among(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [
        module.weight for module in modules
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None
    ]


@contextlib.contextmanager
def renormed_weights_kept(weights: list[nn.Parameter]) -> Iterator[None]:
    """The ``weights`` an embedding lookup renormalises (:func:`renormed_weights`) as they were before, bit for bit,
    after what runs inside: renormalised at a probe instead of at the next training lookup, rows that the optimizer
    (momentum, weight decay) moves in between would take other values, and training would change."""
    kept = [(weight, weight.detach().clone()) for weight in weights]
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, before in kept:
                weight.copy_(before)


_MISSING = object()

#: How deep and how many items a probe looks into a module attribute's containers (:func:`_held_in`): a list of
#: ``(k, v)`` pairs (Hugging Face's legacy ``past_key_values``) is two levels, a dict of such lists three. A container
#: further down, or the items of one after the first ``_NESTED_ITEMS``, are not looked into: tensors there written in
#: place keep what the probe wrote, said once per model by name (the containers reached still get their items back).
_NESTED_DEPTH = 4
_NESTED_ITEMS = 1024

#: The most items of a container whose small tensors a probe copies (:func:`attributes_kept`): Lightning's documented
#: ``training_step_outputs`` list of 1000 tensors cost ~7.6 ms a probe to copy; a tensor of a larger container
#: written in place keeps what the probe wrote, said once per model by name. A container larger than this holding
#: no tensor (a vocabulary, a loss history) is not copied either, only its length kept.
_COPIED_ITEMS = 64

#: Attribute values that are plain (numbers, strings, flags, dtypes, devices): the object each is bound to put back
#: (a counter or a state started at ``0.0`` that a probe's forward rebinds), told by
#: ``type()`` alone (an ``isinstance`` against ``torch.Generator`` runs Python code in torch 2.14, ~0.75 us a miss).
_PLAIN_TYPES = frozenset({int, float, bool, complex, str, bytes, torch.dtype, torch.device, torch.layout})

#: The containers a probe looks into and, where mutable, puts the items of back.
_CONTAINER_TYPES = (list, tuple, dict, collections.deque)


def _held_in(
    value: list[Any] | tuple[Any, ...] | dict[Any, Any] | collections.deque[Any], where: tuple[Any, ...],
    held: list[tuple[Any, tuple[Any, ...], bool]], generators: dict[int, torch.Generator],
) -> tuple[bool, bool]:
    """The mutable containers and the tensors in ``value`` (itself included), at most ``_NESTED_DEPTH`` levels and
    ``_NESTED_ITEMS`` items down, appended to ``held`` with their place (``where`` and their keys) and, for a tensor,
    whether its container is small enough to copy it (:data:`_COPIED_ITEMS`), and the generators among them added
    to ``generators``. It gives whether it found anything but plain values (a tensor, a generator, a container) and
    whether the budget ran out before the end."""
    stack = [(value, where, 0)]
    budget = _NESTED_ITEMS
    found = cut = False
    reached = {id(value)}
    while stack:
        container, place, depth = stack.pop()
        if not isinstance(container, tuple):
            held.append((container, place, False))
        copied = len(container) <= _COPIED_ITEMS
        for key, item in container.items() if isinstance(container, dict) else enumerate(container):
            budget -= 1
            if budget < 0:
                return found, True
            kind = type(item)
            if kind in _PLAIN_TYPES or item is None:
                continue
            if kind is torch.Generator:
                generators[id(item)] = item
                found = True
            elif isinstance(item, torch.Tensor):
                held.append((item, (*place, key), copied))
                found = True
            elif isinstance(item, _CONTAINER_TYPES):
                found = True
                if id(item) in reached:  # a cycle (a list holding itself) or one already walked
                    continue
                reached.add(id(item))
                if depth < _NESTED_DEPTH:
                    stack.append((item, (*place, key), depth + 1))
                else:
                    cut = True
    return found, cut


@contextlib.contextmanager
def attributes_kept(pl_module: nn.Module, parts: _ModelParts) -> Iterator[None]:
    """The modules' attributes holding a tensor, a list, tuple, dict or deque, a generator or ``None``
    (:class:`_ModelParts`) as they were before what runs inside: state a forward carries across batches outside the
    buffers (TBPTT's ``self.h = out.detach()``, a KV cache of ``(k, v)`` pairs in a list) that a probe forward left
    behind started the next training step from the probe's inputs (before round 28). An attribute rebound gets its
    object back, one the forward added (``getattr(self, "h", None)``) is removed, a list, dict or deque holding
    tensors (nested ones too, :data:`_NESTED_DEPTH`) changed in place its items, and a tensor among them written in
    place its values where it is small (:data:`COPIED_BUFFER_BYTES`); a larger one keeps what the probe wrote, said
    once per model by name, as :func:`buffers_kept` does for buffers, unless it shares a parameter's or buffer's
    storage (a tied head's ``embed.weight.detach()``), which those keepers put back; so does one in a container of
    more than :data:`_COPIED_ITEMS` items. An attribute holding a number, string or flag that the forward rebinds
    gets its object back; one a forward adds holding them, and containers of them, are left as they are (a count of
    the forwards); a large one of them (:data:`_COPIED_ITEMS`) only loses the tensors a probe appends to it."""
    containers: dict[int, tuple[Any, list[Any] | dict[Any, Any]]] = {}
    tensors: dict[int, tuple[torch.Tensor, int, torch.Tensor | None, tuple[Any, ...]]] = {}
    for value, where, copied in parts.held:
        if not isinstance(value, torch.Tensor):
            if id(value) not in containers:
                containers[id(value)] = (value, dict(value) if isinstance(value, dict) else list(value))
        elif id(value) not in tensors and not value.is_inference() and not nn.parameter.is_lazy(value):
            # inference ones: not writable here
            small = copied and value.numel() * value.element_size() <= COPIED_BUFFER_BYTES
            tensors[id(value)] = (value, value._version, value.detach().clone() if small else None, where)
    try:
        yield
    finally:
        for module, count, names in parts.names:
            state = vars(module)
            if len(state) != count:
                for name in set(state).difference(_MODULE_INTERNALS, names):
                    if type(state[name]) not in _PLAIN_TYPES:
                        del state[name]
        for _, module, name, value in parts.attributes:
            state = vars(module)
            if state.get(name, _MISSING) is not value:
                state[name] = value
        for state, name, value in parts.plain_values:
            if state.get(name, _MISSING) is not value:
                state[name] = value
        for container, items in containers.values():
            if not _same_items(container, items) and _holds_tensors(container, items):
                if isinstance(container, dict):
                    container.clear()
                    container.update(items)
                elif isinstance(container, collections.deque):
                    container.clear()
                    container.extend(items)
                else:
                    container[:] = items
        for container, length in parts.sized:
            if len(container) > length:
                added = list(itertools.islice(container, length, None))
                if _holds_tensors(added if not isinstance(container, dict) else [container[key] for key in added]):
                    if isinstance(container, dict):
                        for key in added:
                            del container[key]
                    else:
                        for _ in added:
                            container.pop()
        _tensor_attributes_put_back(pl_module, parts, tensors.values())


def _tensor_attributes_put_back(
    pl_module: nn.Module, parts: _ModelParts,
    tensors: Iterable[tuple[torch.Tensor, int, torch.Tensor | None, tuple[Any, ...]]],
) -> None:
    """The small tensor attributes written in place back to their values; a large one said once per model by name,
    but one sharing a parameter's or buffer's storage (their keepers' business)."""
    kept_elsewhere: set[int | None] | None = None
    with torch.no_grad():
        for tensor, version, before, where in tensors:
            if tensor._version == version:
                continue
            if before is not None:
                if tensor.shape != before.shape:
                    tensor.resize_(before.shape)
                tensor.copy_(before)
                continue
            if kept_elsewhere is None:  # read only here: a probe writing a large attribute is rare
                kept_elsewhere = {
                    _storage(t) for _, module in parts.modules
                    for t in (*module._parameters.values(), *module._buffers.values())
                    if t is not None and not nn.parameter.is_lazy(t)
                }
                kept_elsewhere.discard(None)
            if _storage(tensor) in kept_elsewhere:
                continue
            module_name, name, *keys = where
            described = f"{module_name}.{name}".lstrip(".")
            if tensor.numel() * tensor.element_size() > COPIED_BUFFER_BYTES:
                described += "".join(f"[{key!r}]" for key in keys)
                why = f"it is larger than the {COPIED_BUFFER_BYTES // 1024} KiB the probes copy"
            else:  # said once for the attribute, not for each of its many tensors
                why = f"its tensors are in a container of more than the {_COPIED_ITEMS} items the probes copy"
            said = _unrestored_warned.setdefault(pl_module, set())
            if described not in said:
                said.add(described)
                rank_zero_warn(
                    f"a probe pass of the monitors (eval mode, no_grad) wrote the tensor attribute {described!r} "
                    f"in place; {why}, so it keeps what the probe wrote: write it in training mode only "
                    "(`if self.training:`) to keep the probes off it",
                    category=UserWarning,
                )


def _holds_tensors(*containers: Any) -> bool:
    """Whether any of ``containers`` (a container and its copy from before) holds a tensor, nested ones looked into
    as :func:`_held_in` does: a cache of them, put back; a list of numbers (a counter the user keeps of the forwards)
    is left as it is. One too large to look through is taken to hold some."""
    stack = [(container, 0) for container in containers]
    budget = _NESTED_ITEMS
    while stack:
        container, depth = stack.pop()
        for item in container.values() if isinstance(container, dict) else container:
            budget -= 1
            if budget < 0:
                return True  # not known: put back, as the walk copied what it reached
            if isinstance(item, torch.Tensor):
                return True
            if depth < _NESTED_DEPTH and isinstance(item, _CONTAINER_TYPES):
                stack.append((item, depth + 1))
    return False


def _same_items(container: Any, items: list[Any] | dict[Any, Any]) -> bool:
    """Whether ``container`` holds the very objects of ``items``, its copy from before."""
    if isinstance(container, dict):
        return container.keys() == items.keys() and all(container[key] is item for key, item in items.items())
    return len(container) == len(items) and all(map(operator.is_, container, items))


@contextlib.contextmanager
def random_sources_forked(generators: list[torch.Generator]) -> Iterator[None]:
    """The ``generators`` the model's modules hold (``torch.randn(..., generator=self.g)``) and Python's ``random``
    (an older Hugging Face LayerDrop draws ``random.uniform`` in every mode) as they were before what runs inside, as
    ``torch.random.fork_rng`` keeps torch's: a probe forward drawing from them moved the draws of the next training
    forward (before round 28). Not numpy's global state: saving and restoring it costs ~0.2 ms per probe, more than
    a tenth of a probe's entry and exit on a ViT, for a draw a forward rarely makes."""
    states = [generator.get_state() for generator in generators]
    python_state = random.getstate()
    try:
        yield
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
        random.setstate(python_state)


def _fsdp2_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in modules if isinstance(module, FSDPModule)]


def _reshard(fsdp2_modules: list[nn.Module]) -> None:
    """FSDP2 modules back to their sharded parameters after a probe: the root module keeps its parameters gathered
    after a forward, for the backward that follows it in training, which a probe never has. Left gathered at fit start,
    they were plain tensors where Lightning's restore of a full checkpoint (after ``on_fit_start`` under strategies that
    restore after setup) loads into DTensors: the resume failed."""
    for module in fsdp2_modules:
        module.reshard()  # type: ignore[operator]


#: The models a probe forward wrote the parameters of in place (Hugging Face RWKV rescales its blocks' weights in eval
#: mode): their probes stay watched (:func:`parameters_kept`).
_writes_parameters: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

def writes_parameters(pl_module: nn.Module) -> bool:
    """Whether a probe forward of ``pl_module`` has written its parameters in place (:func:`parameters_kept`)."""
    return _writes_parameters.get(pl_module, False)


#: Per model, its watched probes that wrote no parameter: one right after a validation finds an eval-mode rescaling
#: done already (RWKV after Lightning's sanity check), so a model is taken for one that writes nothing only after
#: ``_QUIET_PROBES_TRUSTED`` of them.
_quiet_probes: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_QUIET_PROBES_TRUSTED = 3

#: The models said once to keep the parameters one probe wrote (a write that began after their first probe).
_kept_writes_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()

#: In-place operator methods that are not named ``..._``.
_IN_PLACE_OPERATORS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
)


def _storage(tensor: torch.Tensor) -> int | None:
    """The address of ``tensor``'s storage (a view, ``p.data``, shares its parameter's), if it has one."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or storage-less tensor subclasses
        return None


class _CopiedBeforeWrite(torch.overrides.TorchFunctionMode):
    """Inside, a copy of each of ``parameters`` taken just before the first in-place write to it (``p.div_(...)``,
    ``p.data.mul_(...)``, ``p[i] = v``, ``out=p``): the probes put back what a forward writes without copying every
    parameter at each probe."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        super().__init__()
        self.by_storage: dict[int, list[nn.Parameter]] = {}
        for p in parameters:
            address = _storage(p)
            if address is not None:
                self.by_storage.setdefault(address, []).append(p)
        self.copies: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS
        written = ([*args[0]] if isinstance(args[0], (tuple, list)) else [args[0]]) if in_place and args else []
        out = kwargs.get("out")
        written += list(out) if isinstance(out, (tuple, list)) else [out]
        for tensor in written:
            if isinstance(tensor, torch.Tensor):
                for p in self.by_storage.get(_storage(tensor), ()):
                    if id(p) not in self.copies:
                        self.copies[id(p)] = (p, p.detach().clone())
        return func(*args, **kwargs)


def _plain_attributes(modules: Iterable[nn.Module]) -> dict[tuple[nn.Module, str], Any]:
    """Each of ``modules``' attributes holding a number, string, bool or None (RWKV's ``layers_are_rescaled``, a LoRA
    layer's ``merged``), but its train flag, which :func:`probing` restores."""
    return {
        (module, name): value for module in modules for name, value in vars(module).items()
        if name != "training" and (value is None or isinstance(value, (bool, int, float, str)))
    }


def _attributes_put_back(attributes: dict[tuple[nn.Module, str], Any], holders: set[int] | None = None) -> None:
    """The plain ``attributes`` (:func:`_plain_attributes`) that changed set back, of the modules in ``holders`` (ids)
    only where given."""
    for (module, name), value in attributes.items():
        now = vars(module).get(name, value)
        if (holders is None or id(module) in holders) and now is not value and now != value:
            setattr(module, name, value)


@contextlib.contextmanager
def parameters_kept(pl_module: nn.Module, parts: _ModelParts) -> Iterator[None]:
    """The parameters a forward inside writes in place (Hugging Face RWKV divides its blocks' output weights by powers
    of 2 in eval mode) as they were before, bit for bit, after it, with the plain attributes (:func:`_plain_attributes`)
    that changed in the modules holding them and in those modules' owners: RWKV keeps whether its weights are rescaled
    in a flag of its model, which would rescale the weights put back at the next training forward. Left rescaled (before
    round 25), a checkpoint or an EMA read at the end of that batch held weights 4x off.

    A model's first probes find out whether it writes them (:class:`_CopiedBeforeWrite`, copying those it writes before
    their first write); later probes of a model that does watch the same way, and those of a model whose first
    ``_QUIET_PROBES_TRUSTED`` probes wrote nothing just compare the version counters, keeping (said once) what a write
    that begins later puts there. Every probe binds a parameter that the forward bound to another tensor (``p.data =
    ...``) back to its own first (:func:`_rebinds_put_back`). The weights an
    embedding with ``max_norm`` renormalises are left to :func:`renormed_weights_kept`. ``parts``: ``pl_module``'s
    (:class:`_ModelParts`)."""
    parameters = [p for p in parts.guarded  # an empty tensor's storage is at 0, shared with every other one
                  if not nn.parameter.is_lazy(p) and p.numel() > 0]
    bound = [p.data for p in parameters]  # references, no copies
    if not _writes_parameters.get(pl_module, False) and _quiet_probes.get(pl_module, 0) >= _QUIET_PROBES_TRUSTED:
        versions = [p._version for p in parameters]
        try:
            yield
        finally:
            rebound = _rebinds_put_back(parameters, bound)
        written = [p for p, version in zip(parameters, versions, strict=True)
                   if p._version != version and id(p) not in rebound]
        if written:
            _writes_parameters[pl_module] = True
            _warn_kept_writes(pl_module, written)
        return
    attributes = _plain_attributes(pl_module.modules())
    watch = _CopiedBeforeWrite(parameters)
    versions = [p._version for p in parameters]
    try:
        with watch:
            yield
    finally:
        rebound = _rebinds_put_back(parameters, bound)
        # once a writer, always watched: a probe right after a validation finds the weights already rescaled and
        # writes nothing, which made the next probe's write stay (before the fix)
        if watch.copies:
            _writes_parameters[pl_module] = True
            _put_back(pl_module, watch.copies, attributes)
        else:
            _quiet_probes[pl_module] = _quiet_probes.get(pl_module, 0) + 1
        unseen = [p for p, version in zip(parameters, versions, strict=True)
                  if p._version != version and id(p) not in watch.copies and id(p) not in rebound]
        if unseen:  # written where no torch function is called (torch.ops.aten, numpy): kept, said once
            _writes_parameters[pl_module] = True
            _warn_kept_writes(pl_module, unseen)


def _rebinds_put_back(parameters: list[nn.Parameter], bound: list[torch.Tensor]) -> set[int]:
    """The ids of ``parameters`` bound to another tensor's memory than their ``bound`` one's (``p.data = p.data * m +
    q.data * (1 - m)``, official MoCo's momentum update in ``forward``: it neither moves a version counter nor calls a
    torch function on ``p``), each bound back to its own, which writes in place are then put back into. Before round
    29 each probe forward took a momentum step that stayed. Addresses only (~0.5 us a parameter)."""
    rebound = set()
    for p, data in zip(parameters, bound, strict=True):
        if _address(p) != _address(data):
            p.data = data
            rebound.add(id(p))
    return rebound


def _put_back(
    pl_module: nn.Module, copies: dict[int, tuple[nn.Parameter, torch.Tensor]],
    attributes: dict[tuple[nn.Module, str], Any],
) -> None:
    """The written parameters' values from ``copies``, and the changed ``attributes`` of the modules holding them."""
    with torch.no_grad():
        for p, before in copies.values():
            p.copy_(before)
    holders = {
        id(module) for name, p in pl_module.named_parameters(remove_duplicate=False) if id(p) in copies
        for module in _modules_on_path(pl_module, name)
    }
    _attributes_put_back(attributes, holders)


def _modules_on_path(pl_module: nn.Module, parameter_name: str) -> list[nn.Module]:
    """The modules from ``pl_module`` down to the one holding the parameter ``parameter_name``."""
    modules = [pl_module]
    for part in parameter_name.split(".")[:-1]:
        modules.append(getattr(modules[-1], part))
    return modules


def _warn_kept_writes(pl_module: nn.Module, written: list[nn.Parameter]) -> None:
    if pl_module in _kept_writes_warned:
        return
    _kept_writes_warned.add(pl_module)
    names = [name for name, p in pl_module.named_parameters() if any(p is w for w in written)]
    rank_zero_warn(
        f"a probe pass of the monitors (eval mode, no_grad) wrote the parameters {', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''} in place where no copy of them was taken first (a write that began after "
        "the model's first probe, or one outside torch functions: torch.ops, numpy): they keep what it wrote (write "
        "them in training mode only, `if self.training:`, to keep the probes off them)",
        category=UserWarning,
    )


@contextlib.contextmanager
def probing(
    trainer: pl.Trainer | None, pl_module: nn.Module, device: torch.device, say_stand_ins: bool = True
) -> Iterator[list[str]]:
    """Eval mode, no_grad, the precision context and a forked RNG (torch's, Python's ``random`` and the generators
    the modules hold, :func:`random_sources_forked`), each forward inside seeded with its place in the
    pass (:func:`_seed_forward`); every train/eval flag, ``requires_grad`` and buffer restored, the modules' attributes
    holding tensors, containers or ``None``, those a forward adds removed (:func:`attributes_kept`), and the plain
    attributes of the modules whose ``train()`` is overridden (what eval mode may have changed), the weights of
    embeddings with ``max_norm`` (:func:`renormed_weights_kept`) and the parameters a forward writes in place
    (:func:`parameters_kept`); lazy modules not made yet are left unmade (:func:`lazy_modules_kept`). It gives the
    list of the lazy modules the forwards inside ran on stand-in weights, filled as it exits (a caller that drops what
    they measured says so itself, ``say_stand_ins=False``).

    PyTorch's fast path for ``nn.TransformerEncoder``/``MultiheadAttention`` is off meanwhile: in eval mode without
    gradients it would turn padded sequences (``src_key_padding_mask``) into nested tensors, which no statistic can
    read; off, the probe's forward computes what the training forward computes. FSDP2 modules are resharded after
    (:func:`_reshard`)."""
    parts = _ModelParts.of(pl_module)
    flags = {module: module.training for _, module in parts.modules}
    # what the eval() below may change beside the flags, through a train() override: requires_grad (a backbone frozen
    # out of training mode), a module's plain attributes (a LoRA layer's "merged"); Lightning calls no train() in a
    # fit, so calling the overrides again to undo it (this round's first restore) changed training
    needs_grad = [(p, p.requires_grad) for p in parts.parameters]
    overriding = _plain_attributes(module for _, module in parts.modules if type(module).train is not nn.Module.train)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
    devices = _rng_devices(device)
    token = _forward_seeds.set((itertools.count(), devices, parts.generators, [None]))
    parts_token = _probed_parts.set(parts)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with lazy_modules_kept(pl_module, parts.modules, say_stand_ins) as stand_ins_run, \
                buffers_kept(parts.modules), attributes_kept(pl_module, parts), \
                renormed_weights_kept(parts.renormed), parameters_kept(pl_module, parts), torch.no_grad(), \
                torch.random.fork_rng(devices=devices), random_sources_forked(parts.generators), context:
            pl_module.eval()
            yield stand_ins_run
    finally:
        _probed_parts.reset(parts_token)
        _forward_seeds.reset(token)
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for module, flag in flags.items():  # each module's own flag, as Lightning's _ModuleMode.restore does:
            module.training = flag  # train(flag) on each would set every module's subtree again (3.4 ms on a ViT-S)
        for p, flag in needs_grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        _attributes_put_back(overriding)
        _reshard(parts.fsdp2)


#: The models said once to have had a probe run their lazy modules before their first training forward.
_stand_ins_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextlib.contextmanager
def lazy_modules_kept(
    pl_module: nn.Module, modules: list[tuple[str, nn.Module]], say_stand_ins: bool = True
) -> Iterator[list[str]]:
    """The lazy modules of ``modules`` (``pl_module``'s) whose weights are still unmade (``nn.LazyLinear`` before the
    fit's first training forward) run inside on stand-in weights, made there and dropped after it, and stay unmade: the
    fit's first training forward makes their weights from the random stream it draws them from without the monitors.
    Made by a probe at fit start (``SensitiveNeurons``' first tracking forward, ``MassiveActivations(probe="val")``'s
    first probe), under its forked and seeded random state, they started from other values (before round 27).
    What the probe measured of them, or after them, is of the stand-ins: said once per model (``say_stand_ins``). It
    gives the names of the lazy modules run on stand-ins, filled as it exits."""
    held = []
    stand_ins: dict[int, torch.Tensor] = {}  # by the id of the unmade tensor they stand in for
    for name, module in modules:
        if not (isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()):
            continue
        handles = {module._initialize_hook.id, module._load_hook.id}  # the hooks its first forward removes
        hooks = {key: dict(value) for key, value in vars(module).items()
                 if isinstance(value, dict) and handles & set(value)}
        held.append((name, module, type(module), dict(vars(module)), handles, hooks))
        for p in module._parameters.values():
            if nn.parameter.is_lazy(p) and id(p) not in stand_ins:
                stand_ins[id(p)] = UninitializedParameter(p.requires_grad, p.device, p.dtype)
        for b in module._buffers.values():
            if nn.parameter.is_lazy(b) and id(b) not in stand_ins:
                stand_ins[id(b)] = UninitializedBuffer(b.requires_grad, b.device, b.dtype)
    # every module holding an unmade tensor gets its stand-in, the same one: a weight tied to another module
    # (``b.weight = lazy.weight``) is made in both by the lazy module's forward, as the original is without the probe
    originals = []
    for _, module in modules:
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None and id(t) in stand_ins:
                    originals.append((tensors, key, t))
                    tensors[key] = stand_ins[id(t)]
    made: list[str] = []
    try:
        yield made
    finally:
        for name, module, cls, attributes, handles, hooks in held:
            if not any(nn.parameter.is_lazy(t) for t in (*module._parameters.values(), *module._buffers.values())):
                made.append(name or type(module).__name__)
            module.__class__ = cls
            # the hooks' handles it deleted, and the sizes it set (``in_features``)
            vars(module).update({key: value for key, value in attributes.items()
                                 if key not in vars(module) or isinstance(value, (bool, int, float, str))})
            for key, before in hooks.items():  # its hooks back in their place, before those added since
                after = vars(module)[key]
                now = dict(after)
                after.clear()
                after.update({k: v for k, v in before.items() if k in now or k in handles})
                after.update(now)
        for tensors, key, original in originals:
            tensors[key] = original
        if say_stand_ins and made and pl_module not in _stand_ins_warned:
            _stand_ins_warned.add(pl_module)
            rank_zero_warn(
                f"a probe pass of the monitors ran the lazy modules {', '.join(made[:3])}"
                f"{' ...' if len(made) > 3 else ''} before the fit's first training forward made their weights: it ran "
                "them on stand-in weights, dropped after it, so that training makes theirs as without the monitors; "
                "what it measured of them or after them is of those weights (run one batch through the model before "
                "the fit, e.g. in configure_model, to probe the trained ones from the start)",
                category=UserWarning,
            )


@dataclasses.dataclass(frozen=True)
class _ModelParts:
    """What a probe's keepers read of the model, from one walk over its modules: each walk of a ViT-S's 276 modules
    costs ~0.14 ms of host time (2-core VM), and a probe took eight of them before round 26."""

    modules: list[tuple[str, nn.Module]]  # named_modules()
    parameters: list[nn.Parameter]  # parameters(), in its order
    renormed: list[nn.Parameter]  # renormed_weights(): renormed_weights_kept puts them back
    guarded: list[nn.Parameter]  # parameters but the renormed weights: those a forward must not write
    fsdp2: list[nn.Module]
    attributes: list[tuple[str, nn.Module, str, Any]]  # (module name, module, name, value): attributes_kept's
    plain_values: list[tuple[dict[str, Any], str, Any]]  # (vars(module), name, value) of plain ones: attributes_kept's
    held: list[tuple[Any, tuple[Any, ...], bool]]  # the tensors and mutable containers in them, places (_held_in)
    sized: list[tuple[Any, int]]  # the large containers holding no tensor, with their lengths (attributes_kept)
    names: list[tuple[nn.Module, int, tuple[str, ...]]]  # each module's attribute count and own names (_own_names_seen)
    generators: list[torch.Generator]  # those the modules hold as attributes: random_sources_forked's

    @classmethod
    def of(cls, pl_module: nn.Module) -> _ModelParts:
        modules = list(pl_module.named_modules())
        seen: set[int] = set()
        parameters = []
        attributes = []
        held: list[tuple[Any, tuple[Any, ...], bool]] = []
        sized: list[tuple[Any, int]] = []
        plain_values: list[tuple[dict[str, Any], str, Any]] = []
        names = []
        generators: dict[int, torch.Generator] = {}
        cut: dict[str, None] = {}
        for module_name, module in modules:
            for p in module._parameters.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    parameters.append(p)
            state = vars(module)
            count, last = len(state), next(reversed(state), "")
            known = _own_names_seen.get(id(module))
            if known is None or known[1] != count or known[2] != last or known[0]() is not module:
                known = _own_names_rescanned(module, state)
            names.append((module, count, known[3]))
            for name in known[3]:  # every probe reads each value: a name holding a number may hold a tensor by now
                value = state.get(name, _MISSING)
                if value is _MISSING:  # deleted, others added (the same count and last name): read the names anew
                    _own_names_rescanned(module, state)
                    return cls.of(pl_module)
                kind = type(value)
                if kind in _PLAIN_TYPES:
                    plain_values.append((state, name, value))
                elif value is None or kind is torch.Generator:
                    attributes.append((module_name, module, name, value))
                    if value is not None:
                        generators[id(value)] = value
                elif isinstance(value, torch.Tensor):
                    attributes.append((module_name, module, name, value))
                    held.append((value, (module_name, name), True))
                elif isinstance(value, _CONTAINER_TYPES):
                    attributes.append((module_name, module, name, value))
                    if kind is tuple and _PLAIN_TYPES.issuperset(map(type, value)):  # a conv's kernel_size
                        continue
                    first = len(held)
                    found, walk_cut = _held_in(value, (module_name, name), held, generators)
                    if walk_cut and found:
                        cut[f"{module_name}.{name}".lstrip(".")] = None
                    elif not found and len(value) > _COPIED_ITEMS:  # a vocabulary: its length is enough
                        del held[first:]
                        if kind is not tuple:
                            sized.append((value, len(value)))
        if cut:
            _say_walk_cut(pl_module, list(cut))
        plain = [module for _, module in modules]
        renormed = _renormed_among(plain)
        guarded = [p for p in parameters if not any(p is weight for weight in renormed)]
        return cls(
            modules, parameters, renormed, guarded, _fsdp2_modules(plain), attributes, plain_values, held, sized,
            names,
            list(generators.values()),
        )


def _say_walk_cut(pl_module: nn.Module, described: list[str]) -> None:
    """Said once per model and attribute: containers in it past the walk's reach (:data:`_NESTED_DEPTH`,
    :data:`_NESTED_ITEMS`) are not copied, so a tensor there that a probe writes in place keeps what it wrote."""
    said = _unrestored_warned.setdefault(pl_module, set())
    for name in described:
        if f"walk {name}" not in said:
            said.add(f"walk {name}")
            rank_zero_warn(
                f"the module attribute {name!r} holds containers past the {_NESTED_ITEMS} items or "
                f"{_NESTED_DEPTH} levels a probe pass of the monitors looks into: a tensor there that a probe writes "
                "in place keeps what the probe wrote (a container the walk reached gets its items back); write it "
                "in training mode only (`if self.training:`) to keep the probes off it",
                category=UserWarning,
            )


#: The attributes every ``nn.Module`` and ``LightningModule`` has (their hooks, tables and flags): the module's own
#: business, not state a forward carries.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | frozenset(vars(pl.LightningModule()))

#: By module id: a weak reference to the module, its attribute count, last attribute name and own attribute names
#: (not :data:`_MODULE_INTERNALS`) as of its last probe (:func:`_own_names_rescanned`; a plain dict: a
#: ``WeakKeyDictionary`` lookup makes a weak reference each time, ~0.1 ms a probe on a ViT-S).
_own_names_seen: dict[int, tuple[weakref.ref[nn.Module], int, str, tuple[str, ...]]] = {}


def _own_names_rescanned(
    module: nn.Module, state: dict[str, Any]
) -> tuple[weakref.ref[nn.Module], int, str, tuple[str, ...]]:
    """``module``'s entry of :data:`_own_names_seen` made anew from ``state``, its ``vars()``: read at each probe while
    its attribute count and last name are the same (a name added changes the count, a name deleted and another added
    the last name: an added one goes last) and each of its names is there (names deleted and as many added, the last
    one re-added last, keep both: a name gone makes :meth:`_ModelParts.of` read them anew); sorting every module's names out of the internals at every probe cost
    ~0.4 ms on a ViT-S."""
    key = id(module)

    def gone(_: weakref.ref[nn.Module]) -> None:  # the module collected: its id may be another's next
        _own_names_seen.pop(key, None)

    seen = _own_names_seen[key] = (
        weakref.ref(module, gone), len(state), next(reversed(state), ""),
        tuple(set(state).difference(_MODULE_INTERNALS)),
    )
    return seen


#: Inside :func:`probing`: the probed model's parts, read once for its forwards (:func:`_ended_forward_guarded`).
_probed_parts: contextvars.ContextVar[_ModelParts | None] = contextvars.ContextVar("probed_parts", default=None)
