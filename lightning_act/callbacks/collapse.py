"""Dimensional collapse: effective rank and participation ratio of activations, and the
dimension of the parameter trajectory.

Per tapped module, on each due step, every rank samples up to ``max_rows`` rows of the activation
(all leading dims flattened into rows; features are the last dim, or the channel dim 1 of a 4-D
conv map) with a private ``torch.Generator``, and sums ``N``, ``Σy`` and ``Σyyᵀ`` in float64, of the rows
``y = x − r`` shifted by a reference row (their mean, :meth:`DimensionalCollapse._reference`), so that a large
mean does not swell the sums' round-off over the spectrum's tail.
The sampled rows of a tap's first activation in a step (a copy, at most ``max_rows x d``) are kept until
the logging step, where the sums of all taps whose samples have one shape come from one batched product
(issue 17: a few operations per step instead of five per tap; later micro-batches of the step are summed
at once); taps of one row count share the step's random row choice, so one permutation is drawn per row
count and step, not per tap.
The sums are added across micro-batches and ranks, and the spectrum of the centred scatter matrix
is taken once, on the device, in float64 at flush time (:mod:`lightning_act.stats.spectrum`).

Wide taps (``d > wide_dim``, default 2048): the ``d x d`` sums would cost ``8 d^2`` bytes per tap (512 MiB
at d = 8192, ~3 GiB with the reduction and eigensolver copies) and an ``O(d^3)`` eigendecomposition, so
such taps sum a seeded Nyström sketch instead (:mod:`lightning_act.stats.covariance_sketch`) of
``k`` = the rows sampled per due step (``max_rows`` x micro-batches per optimizer step x ranks, the
most the centred scatter's rank can be); its erank and PR equal the exact ones up to float64
round-off because that rank is <= k, except on steep spectra, where erank is within +0.6% (measured; the energy
under the sketch's whitening floor is kept as a flat tail, round 29). Its partials take ``8 ((d + 1)(k + 1) + k^2)`` bytes (72 MiB at
d = 8192, k = 1024) and its peak about ``32 d k`` bytes, under 1 GiB while ``d k <= 2^25``; a tap whose
sketch would be larger than its exact covariance (k >= d) keeps the exact path.

Logged (``collapse/<module>/<stat>``): ``erank`` (Roy & Vetterli 2007), ``pr`` (Gao et al. 2017),
``erank_frac`` and ``pr_frac`` (both divided by the feature dimension d; note that with N sampled
rows neither can exceed ``min(N − 1, d)``), and, when ``warn_below`` is set, ``collapsed``
(1.0 when ``erank_frac < warn_below``; a warning is issued on rank zero when a module enters
that state). ``collapse/params/r90`` is the number of principal components holding 90% of the
variance of the trajectory of the chosen weights (Xu 2026, arXiv 2602.10496).
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_act.callbacks.base import (
    MEASURED, ActivationMonitor, Partials, check_int, check_number, current_tap_key, largest_accumulation,
    MetricReader, metric_readers, optimized_parameters, training_step_index, unmonitored_strategy,
)
from lightning_act.capture import ModuleSpec, clean_name, select_taps, unmatched_specs
from lightning_act.capture.selection import (
    averaged_copy_modules, frozen_copies, has_lazy_parameters, module_at, module_class, named_modules,
)
from lightning_act.capture.weights import forward_tensor
from lightning_act.errors import LightningActError, ModuleSelectionError
from lightning_act.lightning_classes import lightning_classes
from lightning_act.stats.covariance_sketch import (
    gaussian_test_matrix, shift_sketch_partials, sketch_partials, sketch_resolved, sketch_size, sketch_spectrum,
)
from lightning_act.stats.fused import FusedStats
from lightning_act.stats.reduce import all_reduce_packed, distributed_world_size
from lightning_act.stats.spectrum import (
    EIGENSOLVERS,
    count_sketch_draws,
    covariance_dim,
    covariance_partials,
    covariance_spectrum,
    eigensolver_problem,
    feature_rows,
    rank_statistics,
    shift_covariance_partials,
    sketch_vector,
    sketch_with_draws,
    trajectory_r90,
)

#: The unlogged statistic (see :data:`~lightning_act.callbacks.base.MEASURED`) holding a step's rows over all ranks.
STEP_ROWS = "_rows"

#: Weight trajectories up to this many positions keep their count-sketch hash (4 bytes per position: an int32
#: signed bucket); longer ones draw it again at each snapshot, which needs no memory.
CACHED_HASH_POSITIONS = 1 << 26


def _named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters under the user's names (without ``_orig_mod.`` and other wrapper parts)."""
    return {clean_name(name): p for name, p in module.named_parameters()}


def _forward_names(module: torch.nn.Module) -> dict[str, str]:
    """The name of the tensor the forward uses for each parameter that only stands for it: ``torch.nn.utils.prune``'s
    ``fc.weight_orig`` for ``fc.weight`` (masked), a parametrization's ``fc.parametrizations.weight.original`` (or
    ``original0``, ``original1``, ...) for ``fc.weight`` (computed), the hook-based ``weight_norm``'s ``fc.weight_g``
    and ``fc.weight_v`` and ``spectral_norm``'s ``fc.weight_orig`` for ``fc.weight`` (computed); user's names
    (wrapper parts left out)."""
    names: dict[str, str] = {}
    for module_name, owner in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for hook in owner._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                names[clean_name(f"{prefix}{hook._tensor_name}_orig")] = clean_name(f"{prefix}{hook._tensor_name}")
            elif isinstance(hook, (WeightNorm, SpectralNorm)):
                stands_for = ("_g", "_v") if isinstance(hook, WeightNorm) else ("_orig",)
                for suffix in stands_for:
                    names[clean_name(f"{prefix}{hook.name}{suffix}")] = clean_name(f"{prefix}{hook.name}")
        if parametrize.is_parametrized(owner):
            for tensor_name, parametrizations in owner.parametrizations.items():
                for original, _ in parametrizations.named_parameters(recurse=False):
                    names[clean_name(f"{prefix}parametrizations.{tensor_name}.{original}")] = clean_name(
                        f"{prefix}{tensor_name}")
    return names


def _trained_later(pl_module: torch.nn.Module) -> set[int]:
    """Ids of the modules that a ``BackboneFinetuning`` callback of the fit freezes at its start and trains from a
    later epoch: ``pl_module.backbone``."""
    trainer = getattr(pl_module, "_trainer", None)
    backbone = getattr(pl_module, "backbone", None)
    if trainer is None or not isinstance(backbone, torch.nn.Module) or not any(
        isinstance(c, lightning_classes("callbacks.BackboneFinetuning")) for c in trainer.callbacks
    ):
        return set()
    return {id(m) for m in backbone.modules()}


def _named_by(patterns: Sequence[str], name: str, forward: dict[str, str]) -> bool:
    """Whether a glob of ``patterns`` matches a parameter's ``name`` or the name the forward reads it by
    (:func:`_forward_names`: a pruned ``fc.weight_orig`` is ``fc.weight`` too)."""
    return any(fnmatch.fnmatchcase(m, g) for m in (forward.get(name, name), name) for g in patterns)


def _trains(p: torch.nn.Parameter, optimized: set[int] | None) -> bool:
    """Whether ``p`` trains: it requires grad and, where the optimizers are known
    (:func:`~lightning_act.callbacks.base.optimized_parameters`), one holds it. A DQN target network (a copy of the
    Q-network in no optimizer, moved by Polyak updates) keeps ``requires_grad=True`` in Lightning's example and CleanRL,
    and was taken for a trained part of the model."""
    return p.requires_grad and (optimized is None or id(p) in optimized)


def _moving_copies(model: torch.nn.Module, optimized: set[int] | None) -> list[torch.nn.Module]:
    """The untrained copies of a trained part of the model (:func:`~lightning_act.capture.selection.frozen_copies`
    with ``optimized``, :func:`~lightning_act.callbacks.base.optimized_parameters`: a hand-made EMA, a mean or
    self-distillation teacher, ``deepcopy(student).requires_grad_(False)`` updated in place, a DQN target network in
    no optimizer), outermost ones only. An untrained layer of a stack beside trained layers alike (the first blocks of
    a partly frozen network) is a layer, not a copy, and stays, and so does a ``BackboneFinetuning`` backbone
    (:func:`_trained_later`), frozen only until its epoch comes."""
    modules = named_modules(model)
    frozen = frozen_copies(modules, optimized) - _trained_later(model)
    by_name = dict(modules)
    copies = []
    for name, module in modules:
        if id(module) not in frozen or not name:
            continue
        parent = by_name.get(name.rpartition(".")[0])
        if parent is not None and id(parent) in frozen:
            continue  # inside an outer copy
        shapes = [(n, p.shape) for n, p in module.named_parameters()]
        stack_layer = isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)) and any(
            module_class(sibling) is module_class(module) and not has_lazy_parameters(sibling)
            and [(n, p.shape) for n, p in sibling.named_parameters()] == shapes
            and any(_trains(p, optimized) for p in sibling.parameters())
            for sibling in parent.children()
        )
        if not stack_layer:
            copies.append(module)
    return copies


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` whole: a sharded one (FSDP2's or tensor parallelism's ``DTensor``) gathered, the same on every
    rank (all of them snapshot at the same due step, :meth:`DimensionalCollapse._snapshot`); its snapshots were
    ``DTensor``s, which put a ``DeviceMesh`` into the checkpoint that no single-device load could read."""
    full_tensor = getattr(weight, "full_tensor", None)
    return weight if full_tensor is None else full_tensor()


def _weight_sources(module: torch.nn.Module, attribute: str) -> dict[str, torch.nn.Parameter]:
    """The parameters behind ``module``'s weight ``attribute``, by their names in it: the weight itself, a pruned
    one's ``<attribute>_orig`` (the same object), a parametrization's ``original*``, the hook-based ``weight_norm``'s
    ``<attribute>_g``/``_v`` or ``spectral_norm``'s ``<attribute>_orig``. Their objects tell a weight carried over to
    a new module (a QAT or ``SyncBatchNorm`` swap) from a re-created one (:meth:`DimensionalCollapse._replaced`)."""
    if parametrize.is_parametrized(module, attribute):
        return {f"parametrizations.{attribute}.{name}": p
                for name, p in module.parametrizations[attribute].named_parameters(recurse=False)}
    names = [attribute]
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == attribute:
            names = [f"{attribute}_orig"]
        elif isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == attribute:
            names = [f"{attribute}_g", f"{attribute}_v"] if isinstance(hook, WeightNorm) else [f"{attribute}_orig"]
    held = {name: module._parameters[name] for name in names if module._parameters.get(name) is not None}
    if not held:  # a wrapper's weight property (a LoRA layer's ``weight``, its ``base_layer``'s): the object it gives
        value = getattr(module, attribute, None)
        if isinstance(value, torch.nn.Parameter):
            held = {attribute: value}
    return held


def _held_weakly(
    sources: list[tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]]
) -> list[tuple[weakref.ref, dict[str, weakref.ref]]]:
    """``sources`` (:meth:`DimensionalCollapse._followed`) by weak references: the callback keeps no replaced layer
    alive, and a copy of it copies none of the model's modules (no pickle holds one: dropped at fit end)."""
    return [(weakref.ref(module), {name: weakref.ref(p) for name, p in params.items()}) for module, params in sources]


def _missing_key_read(reader: MetricReader) -> str:
    """What a strict ``reader`` (:func:`metric_readers`) does on reading a key not logged, in Lightning's words, and
    a fix that also holds for a key never logged (weights frozen for the whole fit: no saving schedule helps)."""
    if reader.name.startswith("ModelCheckpoint("):
        return ("its first save once a validation loop has run ends the fit with MisconfigurationException "
                "\"... could not find the monitored key\"; monitor another key")
    if reader.name.startswith("EarlyStopping("):
        return ("its first check ends the fit with RuntimeError \"Early stopping conditioned on metric ... which is "
                f"not available\"; {reader.late_fix} or monitor another key")
    return ("its first scheduler step ends the fit with MisconfigurationException \"ReduceLROnPlateau conditioned on "
            f"metric ... which is not available\"; {reader.late_fix} or monitor another key")


def _shapes(weights: list[torch.Tensor] | None) -> list[torch.Size]:
    """The shapes of the followed weights ``weights`` (:meth:`DimensionalCollapse._chosen_weights`; empty when one
    is gone)."""
    return [] if weights is None else [w.shape for w in weights]


def _mean_row(rows: torch.Tensor) -> torch.Tensor:
    """A reference row near all of ``rows`` (``(..., N, d)`` → ``(..., d)``, float64; see
    :meth:`DimensionalCollapse._reference`): their mean. In one process the plain mean, one pass (a non-finite row
    makes the step's sums non-finite anyway, and the next step takes a new reference); under DDP, where the reference
    is kept, the mean of each feature's finite entries (0 where it has none)."""
    if distributed_world_size() == 1:
        return rows.mean(-2, dtype=torch.float64)
    rows = rows.to(torch.float64)
    finite = torch.isfinite(rows)
    return torch.where(finite, rows, 0.0).sum(-2) / finite.sum(-2).clamp_min(1)


def _resuming(trainer: pl.Trainer) -> bool:
    """Whether this fit resumes from a checkpoint: in ``on_fit_start`` its loops are not restored yet (restored after
    that hook), so the step the fit starts at is known at its first training batch only."""
    return bool(getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None))  # Lightning's own


class DimensionalCollapse(ActivationMonitor):
    """Effective rank / participation ratio per module and the parameter-trajectory ``r90``.

    Args:
        modules: module specs (see :mod:`lightning_act.capture.selection`); default the residual
            stream after each block and the penultimate features.
        every_n_steps: log every this many optimizer steps (also the snapshot interval of the weights).
        max_rows: rows sampled per tap per forward (micro-batch) on each rank; bounds the cost.
        warn_below: log ``collapsed`` and warn when ``erank / d`` falls below this fraction; None: off.
        param_patterns: name globs of the parameters whose trajectory is analysed (e.g.
            ``"blocks.*.attn.qkv.weight"``); default every weight of 2 or more dims (linear and
            conv kernels, flattened) inside the ``@blocks`` modules, or of the whole model when it
            has no repeated blocks, frozen ones included while some weight matrix trains (a frozen
            weight that does not move adds nothing to the trajectory's variance, and a backbone frozen at fit
            start may train later), but not the copies of the model that move untrained (an averaged copy, a
            hand-made frozen EMA teacher, a DQN target network that no optimizer holds: :func:`_moving_copies`; a
            ``BackboneFinetuning`` backbone is none, and one taken for a copy that starts to train makes the
            trajectory choose again); while none of the chosen
            weights has moved, r90 is undefined and not logged. Weights are read as the forward uses them (a pruned
            one masked, a parametrized one or one under the hook-based ``weight_norm``/``spectral_norm`` computed)
            and named so (``fc.weight``, not ``fc.weight_orig``); a glob matches every name of a shared (tied)
            parameter, which is followed once. A followed weight that leaves the model, changes shape (a head grown
            for new classes) or is re-created (its module replaced by a new one that holds none of its parameters,
            or ``fc.weight = nn.Parameter(...)``; not a QAT or ``SyncBatchNorm`` swap that keeps the weight, nor
            pruning, a parametrization or ``weight_norm``) mid-fit starts a new trajectory from that step, with a
            warning; a resumed fit's new model continues its checkpoint's. ``[]`` switches it off. Under
            Lightning's FSDP (FSDP1) and tensor parallelism the whole monitor stays idle; under FSDP2 each sharded
            weight is gathered whole at a snapshot (see ``docs/multi_gpu.md``).
        max_snapshots: snapshots kept; when full every other one is dropped and later ones are
            taken half as often, so the kept ones span the whole run.
        projection_dim: when the chosen weights hold more numbers than this, each snapshot is
            count-sketched into this many (seeded, the same map every time); None: never.
        variance_fraction: the explained-variance level of ``r90``.
        seed: seed of the row sampler, of the projection and of the wide taps' sketch.
        wide_dim: taps wider than this use the covariance sketch (see the module docstring); None: never.
        eigensolver: how the taps' spectra are solved: ``"auto"`` (``"triton"`` on a CUDA model with triton
            installed where a cost model from H100 timings expects it to be faster: from 5 taps of width 384
            (a ViT-S's 13), from 19 of width 768, from 36 of width 1536; else ``"torch"``; see
            :func:`lightning_act.stats.spectrum.auto_eigensolver`), ``"torch"`` (``torch.linalg.eigvalsh``;
            cuSOLVER on a GPU, with a host sync) or ``"triton"`` (:mod:`lightning_act.stats.triton_eigen`:
            Householder tridiagonalization and Sturm bisection, two launches for all taps of a width and no host
            sync; CUDA only, checked at fit start). Both give float64 eigenvalues exact to round-off; on an H100
            the Triton one solved 13 384-wide spectra 2.7x faster (``docs/performance.md``).
        overlap_spectra: on a CUDA model, solve the spectra of a due step staged before its backward on a CUDA
            stream of their own, so that they run alongside the backward instead of before it (the Triton solver
            takes one multiprocessor per tap: 13 of an H100's 132 for a ViT-S); the same values, logged at the
            same step. Pays off with the Triton solver only (``eigvalsh`` waits on the host for its result). On by
            default: on an H100 it took ``DimensionalCollapse`` alone at every step from 1.57x to 1.35x a ViT-S
            step (``docs/performance.md``, round 12); no effect on a CPU.
    """

    prefix = "collapse"
    meaning_settings = ("max_rows", "variance_fraction", "warn_below")
    default_modules = ("@blocks", "@penultimate")
    heatmap_stat = "erank"

    def unknown_cause(self, stats: list[str]) -> str:
        return "the covariance is not finite: NaN or inf activations"

    def logs_key(self, key: str) -> bool:
        return super().logs_key(key) or (key == f"{self.prefix}/params/r90" and self.param_patterns != [])

    def follows_weights(self, pl_module: pl.LightningModule) -> bool:
        """Whether the weight trajectory has weights of ``pl_module`` to follow as it is now (the default's, or a
        ``param_patterns`` glob's; one matching nothing is refused at fit start, :meth:`_select_params`, and a later
        callback may still add what it names): the line for default modules that match nothing says it logs
        ``collapse/params/r90`` only where it has (it said so, then the fit stopped on the patterns)."""
        if self.param_patterns is None:
            return True
        forward = _forward_names(pl_module)
        return any(_named_by(self.param_patterns, clean_name(n), forward)
                   for n, _ in pl_module.named_parameters(remove_duplicate=False))

    def logs_without_taps(self) -> bool:
        """The weight trajectory's ``r90`` needs no activation tap: ``modules=[]`` logs it alone."""
        return self.param_patterns != []
    reads_features = True  # the covariance is over the features

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        max_rows: int = 1024,
        warn_below: float | None = None,
        param_patterns: str | Sequence[str] | None = None,
        max_snapshots: int = 32,
        projection_dim: int | None = 8192,
        variance_fraction: float = 0.90,
        seed: int = 0,
        wide_dim: int | None = 2048,
        eigensolver: str = "auto",
        overlap_spectra: bool = True,
        history_size: int = 512,
        batch_dim: int | None = None,
        token_dim: int | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__(
            modules=modules, every_n_steps=every_n_steps, history_size=history_size, batch_dim=batch_dim,
            token_dim=token_dim, feature_dim=feature_dim,
        )
        check_int("DimensionalCollapse", "max_rows", max_rows, 2)
        # 2 is thinned to the first snapshot at every second one: r90 never logged
        check_int("DimensionalCollapse", "max_snapshots", max_snapshots, 3)
        check_int("DimensionalCollapse", "seed", seed, 0)
        if projection_dim is not None:
            check_int("DimensionalCollapse", "projection_dim", projection_dim, 2)
        if warn_below is not None and not 0.0 < check_number("DimensionalCollapse", "warn_below", warn_below) <= 1.0:
            raise LightningActError(
                f"DimensionalCollapse: warn_below={warn_below} must be in (0, 1]; pass e.g. warn_below=0.05"
            )
        if not 0.0 < check_number("DimensionalCollapse", "variance_fraction", variance_fraction) <= 1.0:
            raise LightningActError(
                f"DimensionalCollapse: variance_fraction={variance_fraction} must be in (0, 1]; pass e.g. 0.9"
            )
        if wide_dim is not None:
            check_int("DimensionalCollapse", "wide_dim", wide_dim, 2)
        if eigensolver not in EIGENSOLVERS:
            raise LightningActError(f"DimensionalCollapse: eigensolver={eigensolver!r}; pass one of {EIGENSOLVERS}")
        if not isinstance(overlap_spectra, bool):  # "no" would read as True
            raise LightningActError(f"DimensionalCollapse: overlap_spectra={overlap_spectra!r} must be True or False")
        self.eigensolver = eigensolver
        self.overlap_spectra = overlap_spectra
        self._spectra_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.wide_dim = wide_dim
        self.max_rows = max_rows
        self._rows_per_due_step = max_rows
        self._sketch_dims: dict[int, tuple[int, int]] = {}
        self._sketched: dict[int, bool] = {}  # the taps that sum the sketch, as the ranks agree (see tap_flags)
        # the width of each tap's first activation of the fit (under DDP, rank 0's: see _agree_references)
        self._widths: dict[int, int] = {}
        self._widths_warned: set[str] = set()
        self._rows: dict[int, int] = {}  # rows this rank sampled of each tap in the current step (known on the host)
        self._step_rows: dict[int, int] = {}  # the same, of the step being summarised
        self._test_matrices: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        # the float64 row each tap's rows are shifted by before they are summed (see _reference), and, under DDP, the
        # taps whose reference every rank shares
        self._references: dict[int, torch.Tensor] = {}
        self._agreed_references: set[int] = set()
        # under DDP, the taps whose first width differed between ranks at this step (_agree_references): their step is
        # unknown, since a rank whose first width was not rank 0's kept none of its rows of rank 0's width
        self._width_disputed: set[int] = set()
        self._device = torch.device("cpu")  # the model's, where the references are agreed on
        self.warn_below = warn_below
        # one glob given as a string is one pattern, not one per character ("*" would match every parameter)
        patterns = [param_patterns] if isinstance(param_patterns, str) else param_patterns
        if patterns is not None and (
            not isinstance(patterns, Sequence) or not all(isinstance(pattern, str) for pattern in patterns)
        ):  # 5 failed here as "'int' object is not iterable", [5] at fit start inside fnmatch
            raise LightningActError(
                f"DimensionalCollapse: param_patterns={param_patterns!r} must be a name glob or a list of them, e.g. "
                "'blocks.*.weight', or [] for none"
            )
        self.param_patterns = None if patterns is None else list(patterns)
        self.max_snapshots = max_snapshots
        self.projection_dim = projection_dim
        self.variance_fraction = variance_fraction
        self.seed = seed
        self.param_names: list[str] = []
        self.collapsed: set[str] = set()
        self._generators: dict[torch.device, tuple[int, torch.Generator]] = {}  # the step each one was seeded for
        self._snapshots: list[torch.Tensor] = []
        self._snapshot_steps: list[int] = []
        self._snapshot_seen = 0
        self._snapshot_stride = 1
        self._restored_follows: list[Any] | None = None  # what a restored trajectory's snapshots are of
        self._follows_unrecorded = False  # restored from a checkpoint that does not say (62acaae and earlier)
        self._feature_dims: dict[str, int] = {}
        self._row_choices: dict[tuple[int, torch.device], torch.Tensor] = {}  # this step's sampled row indices
        self._sketch_draws: torch.Tensor | None = None
        self._weight_shapes: list[torch.Size] = []  # the shapes of the followed weights in the held snapshots
        # the module of each followed weight and the parameters behind it at the last snapshot (or fit start), held
        # weakly (_held_weakly): see _replaced
        self._weight_sources: list[tuple[weakref.ref, dict[str, weakref.ref]]] = []
        self._frozen_copy_weights: list[torch.Tensor] = []  # the weights left out as frozen copies' (_select_params)
        # the model had uninitialized (lazy) weights at fit start: the weights are chosen once its forward made them
        self._choose_when_initialized = False
        # a resumed fit's start, known at its first batch (_resuming): the first snapshot to take, the restart to say
        self._start_waits = False
        self._restart_unsaid = False
        self._uninitialized_left_out: list[str] = []  # the candidates _select_params left out as still lazy
        # the readers of params/r90 that end the fit on a missing key, with what they do and the fix (unknown_extra)
        self._strict_r90_readers: list[tuple[str, str]] = []
        self._ranks: dict[int, torch.Tensor] = {}  # rank_statistics of each full-covariance tap, per logging step
        # r90 of the kept snapshots, computed when they change (a device tensor until read, then a float)
        self._r90: torch.Tensor | float | None = None

    # ------------------------------------------------------------------ activations
    def _generator(self, device: torch.device) -> torch.Generator:
        """This due step's row sampler on ``device``, seeded from (``seed``, step): a resumed fit draws what the
        uninterrupted one drew, on every rank (one generator carried across steps advanced by each rank's own row
        counts, so the ranks drifted apart and a resume restored rank 0's state on all of them)."""
        step = self._pending_step or 0
        held = self._generators.get(device)
        if held is not None and held[0] == step:
            return held[1]
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + step)
        self._generators[device] = (step, generator)
        return generator

    def _sampled_rows(self, x: torch.Tensor) -> torch.Tensor:
        """At most ``max_rows`` rows of ``x``, chosen at random without replacement; the taps of one row count share
        the step's choice (each tap's sample is still uniform, and one permutation per step replaces one per tap)."""
        rows = feature_rows(x)
        if rows.shape[0] <= self.max_rows:
            return rows
        key = (rows.shape[0], rows.device)
        chosen = self._row_choices.get(key)
        if chosen is None:
            permutation = torch.randperm(rows.shape[0], generator=self._generator(rows.device), device=rows.device)
            chosen = self._row_choices[key] = permutation[: self.max_rows]
        return rows.index_select(0, chosen)

    def _reference(self, tap_index: int, rows: torch.Tensor) -> torch.Tensor:
        """The row tap ``tap_index``'s rows are shifted by before they are summed, so that a large mean (massive
        features) does not swell the sums' round-off over the spectrum's tail (round 20): the mean of the rows it is
        first taken from (:func:`_mean_row`), near every row whatever the mean is. One row would not do: a
        sequence's first token carries a language model's massive activations, and rows 1e4 away from it swelled
        the sums' round-off again (erank -0.23%); a NaN row made it NaN. In one process, the mean of each due step's
        first rows: a resumed fit sums what the uninterrupted one summed. Under DDP the ranks' rows differ and the sums
        must share one reference to add up: :meth:`_agree_references` makes the first ones of the fit one, and each
        flush moves it to the mean of the rows it reduced (:meth:`_follow_the_mean`), the same on every rank."""
        reference = self._references.get(tap_index)
        if reference is None and rows.shape[0] == 0:  # no rows: their sums are 0 whatever the reference
            return rows.new_zeros(rows.shape[1], dtype=torch.float64)
        if reference is None:
            reference = self._references[tap_index] = _mean_row(rows)
        return reference

    def _agree_references(self) -> None:
        """Make every rank shift each tap's rows by the same reference, the mean of the ranks' own ones, and move
        the sums already taken to it (:func:`shift_covariance_partials`, :func:`shift_sketch_partials`: exact).

        Done at the first logging step of a fit, in two small collectives (the references' widths, a rank that did
        not see a tap does not know it, then the references), and at later ones only while some tap has run on no
        rank yet (like the buffers' layout); which taps are pending is the same on every rank, so all of them take
        part or none."""
        pending = [i for i in range(len(self.taps)) if i not in self._agreed_references]
        if not pending:
            return
        n = len(pending)
        local = [self._references[i].numel() if i in self._references else -1 for i in pending]
        on_rank_zero = local if torch.distributed.get_rank() == 0 else [-1] * n
        # the negated widths: their maximum is the smallest width a rank saw the tap at (unseen: below any)
        negated = [-w if w >= 0 else -float(2**52) for w in local]
        packed = torch.tensor(local + on_rank_zero + negated, dtype=torch.float64, device=self._device)
        reduced = [int(w) for w in all_reduce_packed([packed], "max")[0].tolist()]  # once per fit: the host needs them
        largest, smallest = reduced[:n], [-w for w in reduced[2 * n :]]
        # rank 0's width where it saw the tap, else any rank's (a tap only one rank has seen)
        widths = [zero if zero >= 0 else w for w, zero in zip(largest, reduced[n : 2 * n])]
        self._width_disputed = {i for i, w, low in zip(pending, largest, smallest) if w >= 0 and low != w}
        seen = [(i, w) for i, w in zip(pending, widths) if w >= 0]
        if not seen:
            return
        for i, width in seen:
            if self._widths.setdefault(i, width) != width:
                self._adopt_width(i, width)
        parts = []
        for i, width in seen:
            held = self._references.get(i)
            parts.append(torch.cat([
                torch.ones(1, dtype=torch.float64, device=self._device), held.to(self._device)
            ]) if held is not None else torch.zeros(1 + width, dtype=torch.float64, device=self._device))
        for (i, _), summed in zip(seen, all_reduce_packed(parts, "sum")):
            held = self._references.get(i)
            common = summed[1:] / summed[0]
            if held is not None:
                common = common.to(held.device)
                if i in self._observed:  # sums taken before the agreement: moved to the common reference
                    sums, shift = self._sums[i], held - common
                    sketch = self._sketch_dims.get(i)
                    if sketch is not None and sums.numel() == sketch_size(*sketch):
                        test_matrix = self._test_matrices[(*sketch, sums.device)]
                        self._sums[i] = shift_sketch_partials(sums, shift.to(sums.device), test_matrix)
                    else:
                        self._sums[i] = shift_covariance_partials(sums, shift.to(sums.device))
            self._references[i] = common
            self._agreed_references.add(i)

    def _adopt_width(self, tap_index: int, width: int) -> None:
        """Read tap ``tap_index``'s calls of ``width`` only, the width of rank 0's first call, where this rank's first
        call had another (a module run at two widths, a branch taken first on some ranks): this step's rows of the
        other width are dropped, and the rows of ``width`` it did not keep make the step unknown on every rank
        (``_width_disputed``). Before round 21 each rank kept its own first width, and the reduction of their sums
        of different sizes aborted gloo."""
        self._widths[tap_index] = width
        self._references.pop(tap_index, None)
        self._sketch_dims.pop(tap_index, None)
        self._sketched.pop(tap_index, None)
        self._step_rows.pop(tap_index, None)
        self._sums[tap_index] = None  # the layout sync gives it a buffer of the others' size
        self._observed.discard(tap_index)

    def tap_replaced(self, tap_index: int) -> None:
        """Forget the old module's width, reference, sketch and buffers: a layer grown mid-fit (16 to 32 features) kept
        the fit's first width, and every call of the new module was dropped as "another width" (nothing logged)."""
        self._widths.pop(tap_index, None)
        self._widths_warned.discard(self.taps[tap_index].name)
        self._references.pop(tap_index, None)
        self._agreed_references.discard(tap_index)
        self._sketch_dims.pop(tap_index, None)
        self._sketched.pop(tap_index, None)
        self._sums[tap_index] = None
        self._layout_synced = False  # under DDP, every rank replaced it: the buffers' sizes are agreed again

    def _is_wide(self, d: int) -> bool:
        """Whether a tap of ``d`` features sums the sketch (see the module docstring) instead of ``Σxxᵀ``."""
        return self.wide_dim is not None and d > self.wide_dim and self._rows_per_due_step < d

    def _reset_buffers(self, n: int) -> None:
        super()._reset_buffers(n)
        self._row_choices = {}

    def receive(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> None:
        """Keep a copy of the sampled rows of a tap's first activation in the step until the logging step
        (:meth:`complete_partials`), so at most ``max_rows x d`` numbers per tap; later activations of the step
        (micro-batches) and wide taps, whose sketch is the smaller buffer, are summed now."""
        if x.dim() < 2:
            self._warn_low_dim(tap_index, x.dim())
            return
        d = x.shape[1] if x.dim() >= 4 else x.shape[-1]
        width = self._widths.setdefault(tap_index, d)
        if d != width:  # one covariance per tap: a module run at two widths (a shared ReLU) crashed the sums
            self._warn_once(
                self._widths_warned, self.taps[tap_index].name,
                f"runs at widths {width} and {d} (a module called several times per forward, e.g. torchvision's "
                f"Bottleneck.relu); DimensionalCollapse reads its calls of width {width} only",
            )
            return
        self._rows[tap_index] = self._rows.get(tap_index, 0) + min(x.numel() // d, self.max_rows)
        if self._is_wide(d) or tap_index in self._kept:
            self.accumulate(tap_index, self.partials(tap_index, x))
            return
        rows = self._sampled_rows(x)
        if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            rows = rows.clone()  # a view of x: the model may change x in place before the logging step
        self.keep(tap_index, rows)

    def complete_partials(self) -> None:
        """The sums of the rows kept since the last logging step, one batched product per shape of the sampled rows
        (added to the sums of a tap's later activations in the step)."""
        kept: dict[int, torch.Tensor] = self.take_kept()
        self._row_choices = {}
        self._step_rows, self._rows = self._rows, {}
        by_shape: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[tuple[int, torch.Tensor]]] = {}
        for tap_index, rows in kept.items():
            by_shape.setdefault((tuple(rows.shape), rows.dtype, rows.device), []).append((tap_index, rows))
        stacks = []
        for members in by_shape.values():
            stacked = torch.stack([rows for _, rows in members])
            # the taps without a reference yet (a later micro-batch of the step may have set one) take their rows'
            # mean, one operation for all of them
            pending = [j for j, (tap_index, _) in enumerate(members) if tap_index not in self._references]
            if pending and stacked.shape[1] > 0:
                chosen = stacked if len(pending) == len(members) else stacked[pending]
                for j, mean in zip(pending, _mean_row(chosen).unbind()):
                    self._references[members[j][0]] = mean
            stacks.append((members, stacked))
        if distributed_world_size() > 1:
            self._agree_references()
        for members, stacked in stacks:
            kept = [j for j, (tap_index, _) in enumerate(members) if self._widths[tap_index] == stacked.shape[-1]]
            if not kept:  # a width the ranks did not agree on (_adopt_width)
                continue
            if len(kept) < len(members):
                members, stacked = [members[j] for j in kept], stacked[kept]
            references = torch.stack([self._reference(i, rows).to(stacked.device) for i, rows in members])
            for (tap_index, _), sums in zip(members, covariance_partials(stacked, references).unbind()):
                self.accumulate(tap_index, Partials(sums=sums))
        if distributed_world_size() == 1:  # see _reference
            self._references = {}

    def partials(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> Partials:
        rows = self._sampled_rows(x)
        reference = self._reference(tap_index, rows)
        d, k = rows.shape[1], self._rows_per_due_step
        if not self._is_wide(d):
            return Partials(sums=covariance_partials(rows, reference))
        self._sketch_dims[tap_index] = (d, k)
        self._sketched[tap_index] = True
        key = (d, k, rows.device)
        if key not in self._test_matrices:
            self._test_matrices[key] = gaussian_test_matrix(d, k, self.seed, rows.device)
        return Partials(sums=sketch_partials(rows, self._test_matrices[key], reference))

    def tap_flags(self) -> dict[int, bool]:
        """Whether each tap sums the sketch, for a rank that never ran a wide tap: it gets a buffer of the sketch's
        size from the layout sync, which it read as a full covariance before round 21 (a crash)."""
        return self._sketched

    def _sync_layout(self, device: torch.device) -> None:
        """The base's layout sync, then the sketch's ``(d, k)`` of each wide tap this rank has not run, from its
        buffer's size (``k`` is the same on every rank)."""
        super()._sync_layout(device)
        k = self._rows_per_due_step
        for i, sketched in self._sketched.items():
            buffer = self._sums[i]
            if sketched and i not in self._sketch_dims and buffer is not None:
                self._sketch_dims[i] = ((buffer.numel() - sketch_size(0, k)) // (k + 1), k)

    def summary_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if not self.overlap_spectra or device.type != "cuda":
            return None
        if device not in self._spectra_streams:
            self._spectra_streams[device] = torch.cuda.Stream(device)
        return self._spectra_streams[device]

    def _follow_the_mean(self, sums: dict[int, torch.Tensor]) -> None:
        """Under DDP, move each shared reference to the mean of the rows just reduced (``reference + Σy / N``, the
        same on every rank; where that is not finite, it stays): a reference kept from the fit's first step while the
        activations' mean drifts (massive features emerging) brought back the round-off the shift removes (erank
        -17.6% once the mean moved from 0 to 1e6)."""
        for i, partials in sums.items():
            reference = self._references.get(i)
            if i not in self._agreed_references or reference is None:
                continue
            sketch = self._sketch_dims.get(i)
            start = 2 if sketch is not None and partials.numel() == sketch_size(*sketch) else 1
            total = partials[start : start + reference.numel()].to(reference.device)
            moved = reference + total / partials[0].to(reference.device).clamp_min(1.0)
            self._references[i] = torch.where(torch.isfinite(moved), moved, reference)

    def prepare_summaries(self, sums: dict[int, torch.Tensor]) -> None:
        """The ranks of every full-covariance tap from one batched eigensolver call per (size, device): the taps of
        a model mostly share a width, a call per tap is a host sync (the solver's error check) per tap, and the
        ranks of a stack of spectra are a few operations for all taps instead of a few dozen per tap."""
        if distributed_world_size() > 1:
            self._follow_the_mean(sums)
        groups: dict[tuple[int, torch.device], list[int]] = {}
        for i, partials in sums.items():
            sketch = self._sketch_dims.get(i)
            if sketch is None or partials.numel() != sketch_size(*sketch):
                groups.setdefault((partials.numel(), partials.device), []).append(i)
        self._ranks = {}
        for members in groups.values():
            spectra = covariance_spectrum(torch.stack([sums[i] for i in members]), self.eigensolver)
            self._ranks.update(zip(members, rank_statistics(spectra, spectra.shape[-1]).unbind()))

    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        sketch = self._sketch_dims.get(tap_index)
        rows = self._step_rows.get(tap_index, 0)  # this rank's: no operation and no sync where they settle it
        measured: torch.Tensor | None = None
        if rows < 2:  # one row has a zero centred scatter (erank 0 would read as a collapse); other ranks may add rows
            measured = sums[0] >= 2
        if tap_index in self._width_disputed:
            measured = sums[0] < 0  # False, on the device: no host sync
        if sketch is not None and sums.numel() == sketch_size(*sketch):
            d = sketch[0]
            ranks = rank_statistics(sketch_spectrum(sums, *sketch), d)
            # exact while the rows of all ranks (the reduced count, the same on every rank: a rank's own count times
            # the world size decided differently on each rank when their counts differed) are at most k + 1 (more
            # micro-batches than planned, or a module called more often); and while the float32 projection resolves
            # the centred rows (a mean far above the spread)
            exact = (sums[0] <= sketch[1] + 1) & sketch_resolved(sums, *sketch)
            measured = exact if measured is None else measured & exact
        else:
            d = covariance_dim(sums.numel())
            ranks = self._ranks.pop(tap_index, None)
            if ranks is None:  # not prepared with the other taps
                ranks = rank_statistics(covariance_spectrum(sums, self.eigensolver), d)
        self._feature_dims[self.taps[tap_index].name] = d
        erank, pr, erank_frac, pr_frac = ranks.unbind()
        stats = {"erank": erank, "pr": pr, "erank_frac": erank_frac, "pr_frac": pr_frac}
        if measured is not None:
            stats[MEASURED] = measured
            stats[STEP_ROWS] = sums[0]  # the rows of all ranks, for the warning (_unmeasured_problem): not logged
        if self.warn_below is not None:
            # unknown where erank_frac is (a NaN compares False: it logged "not collapsed" for a NaN spectrum)
            below = (erank_frac < self.warn_below).to(torch.float64)
            stats["collapsed"] = torch.where(erank_frac.isnan(), erank_frac, below)
        return stats

    def _warn_unmeasured(self, step: int, taps: set[int], unlogged: dict[tuple[int, str], float]) -> None:
        """A tap whose first width differed between ranks is said as such, not as one that gave too little."""
        disputed, self._width_disputed = self._width_disputed, set()
        for i in sorted(disputed):
            rank_zero_warn(  # once per tap: the widths are agreed at the tap's first step
                f"DimensionalCollapse: {self.taps[i].name} ran first at different widths on different ranks at step "
                f"{step}; nothing is logged for it at that step, and it reads its calls of width {self._widths[i]} "
                "(rank 0's first) from then on (a module run at several widths per forward, e.g. torchvision's "
                "Bottleneck.relu)",
                category=UserWarning,
            )
        for i in sorted(taps - disputed):  # STEP_ROWS comes with every MEASURED (summarize)
            self._warn_once(self._unmeasured_warned, self.taps[i].name,
                            self._unmeasured_problem(i, step, round(unlogged[(i, STEP_ROWS)])))

    def _unmeasured_problem(self, tap_index: int, step: int, rows: int) -> str:
        """Why tap ``tap_index`` was not measured at ``step`` (:meth:`summarize`), with its numbers and the fix that
        works, from ``rows``, the step's rows over all ranks, the count that decided it: one warning listed all three
        causes and told a tap that ran several times in a step to lower ``max_rows``, which lowers the sketch's k with
        the rows it gets; under DDP, one gave this rank's own count (0 rows of a mixture-of-experts expert that got 1
        on another rank) and the fix for batch size 1, which does not reach routing."""
        world = distributed_world_size()
        over = f" over {world} ranks" if world > 1 else ""
        sketch = self._sketch_dims.get(tap_index)
        if sketch is not None and rows > sketch[1] + 1:
            d, k = sketch
            return (
                f"got {rows} rows at step {step}{over}, more than the k + 1 = {k + 1} that its covariance "
                f"sketch (it is wider than wide_dim={self.wide_dim}: {d} features) holds exactly, with k = max_rows x "
                "accumulate_grad_batches x world size at fit start: its module ran more often in the step (several "
                "forwards per step under manual optimization, a module called more than once per forward, more "
                "micro-batches than accumulate_grad_batches), so the sketch is not exact and nothing is logged for it "
                f"at such steps; pass max_rows >= {d} (its width: the exact covariance) or wide_dim=None"
            )
        if sketch is None or rows < 2:
            return (
                f"gave {rows} row{'' if rows == 1 else 's'} at step {step}{over}: too few rows reached it to measure "
                "(a centred covariance needs 2 rows or more; a (batch, features) tap at batch size 1 gets one, an "
                "expert of a mixture of experts the tokens routed to it); nothing is logged for it at such steps "
                "(train with batches of 2 or more; an expert is measured at the steps its router sends it 2 tokens "
                "or more)"
            )
        # under DDP only: in one process each step's rows are shifted by their own mean (_reference)
        d = sketch[0]
        return (
            f"is wider than wide_dim={self.wide_dim} ({d} features) and was not measured at step {step}: its mean was "
            "over ~16,000 times its spread from the last step's mean, which its sketch's float32 projection cannot "
            "resolve; nothing is logged for it at such steps (tap a normalised layer or pass wide_dim=None)"
        )

    def on_statistics(self, trainer: pl.Trainer, step: int, stats: dict[str, dict[str, float]]) -> None:
        if self.warn_below is None:
            return
        for name, values in stats.items():
            if "collapsed" not in values:  # unknown at this step: neither entered nor left
                continue
            if values["collapsed"] < 0.5:
                self.collapsed.discard(name)
            elif name not in self.collapsed:
                self.collapsed.add(name)
                rank_zero_warn(
                    f"DimensionalCollapse: {name} collapsed at step {step}: effective rank {values['erank']:.2f} "
                    f"of {self._feature_dims.get(name, '?')} features (fraction {values['erank_frac']:.3f}) is below "
                    f"warn_below={self.warn_below}",
                    category=UserWarning,
                )

    # ------------------------------------------------------------------ parameter trajectory
    def _select_params(self, pl_module: pl.LightningModule) -> list[str]:
        """The names of the weights the trajectory follows, as the forward reads them (see :func:`_forward_names`):
        a pruned ``fc.weight_orig`` or a parametrization's ``original*`` is followed as ``fc.weight``; a parameter
        shared by several modules (a tied LM head) is followed once, under the first name a glob matched. Keeps the
        weights it leaves out as frozen copies', whose training (:meth:`_trajectory_change`) makes it choose again."""
        self._frozen_copy_weights = []
        # a lazy module's weight before its first forward has no shape yet: left out, and named in
        # _uninitialized_left_out when it would have been a candidate (see _follow_initialized)
        lazy = {n: p for n, p in _named_parameters(pl_module).items() if is_lazy(p)}
        named = {n: p for n, p in _named_parameters(pl_module).items() if not is_lazy(p)}
        forward = _forward_names(pl_module)
        # every name of every parameter: named_parameters() lists a shared one once, under its first name
        every = [(clean_name(n), p) for n, p in pl_module.named_parameters(remove_duplicate=False) if not is_lazy(p)]
        if self.param_patterns is not None:
            self._uninitialized_left_out = [
                n for n in lazy if any(fnmatch.fnmatchcase(n, g) for g in self.param_patterns)]
            names: list[str] = []
            seen: set[int] = set()
            for n, p in every:
                name = forward.get(n, n)
                if id(p) in seen or not _named_by(self.param_patterns, n, forward):
                    continue
                seen.add(id(p))
                if name not in names:
                    names.append(name)
            if self.param_patterns and not names and not self._uninitialized_left_out:
                shown = list(dict.fromkeys(forward.get(n, n) for n, _ in every))[:4]
                raise ModuleSelectionError(
                    f"DimensionalCollapse: param_patterns={self.param_patterns!r} matched no parameter of "
                    f"{type(pl_module).__name__}; use globs of names from named_parameters() (e.g. "
                    f"{', '.join(repr(n) for n in shown)}) or [] to switch the trajectory off"
                )
            return names
        blocks = [] if unmatched_specs(pl_module, ["@blocks"]) else select_taps(pl_module, "@blocks", owner=type(self).__name__)
        block_params = {id(p) for tap in blocks for p in tap.module.parameters()}
        # An EMA/SWA copy of the model moves with it but is not trained: its weights are not the trajectory's. Nor are
        # those of a hand-made frozen copy (an EMA teacher updated in place, which moves too), see _moving_copies.
        averaged = averaged_copy_modules(pl_module)
        optimized = optimized_parameters(pl_module)
        self._frozen_copy_weights = [p for copy in _moving_copies(pl_module, optimized) for p in copy.parameters()]
        copies = {id(p) for m in pl_module.modules() if id(m) in averaged for p in m.parameters(recurse=False)}
        copies |= {id(p) for p in self._frozen_copy_weights}
        self._uninitialized_left_out = [
            n for n, p in lazy.items() if (not block_params or id(p) in block_params) and id(p) not in copies]
        matrices = list(dict.fromkeys(
            forward.get(n, n) for n, p in named.items()
            if p.dim() >= 2 and (not block_params or id(p) in block_params) and id(p) not in copies
        ))
        # Frozen ones too, while some weight matrix of the model trains: a BackboneFinetuning backbone is frozen at
        # fit start (or left frozen by Tuner.lr_find) and trained later, and a frozen weight adds nothing to the
        # trajectory's variance; none trains (a PEFT model whose adapters are vectors): no trajectory.
        trains = any(_trains(p, optimized) and p.dim() >= 2 for p in named.values())
        return matrices if trains else []

    @torch.no_grad()  # records no graph, so the weights need no detach each (an operation per weight)
    def _snapshot(self, chosen: list[torch.Tensor]) -> torch.Tensor:
        """The chosen weights (:meth:`_chosen_weights`) as one vector (count-sketched to ``projection_dim``); a complex
        weight (an S4D layer's ``C``) as its real and imaginary parts, ℂⁿ as ℝ²ⁿ, which keeps every distance (its
        imaginary part was dropped by the cast to float64, silently, before round 30)."""
        chosen = [torch.view_as_real(w) if w.is_complex() else w for w in map(_whole, chosen)]
        total = sum(p.numel() for p in chosen)
        if self.projection_dim is None or total <= self.projection_dim:
            return torch.cat([p.reshape(-1).to(torch.float64) for p in chosen])
        if total <= CACHED_HASH_POSITIONS and len({p.device for p in chosen}) == 1:
            # The hash of every position, made once (4 bytes per weight) and reused by every snapshot, instead of
            # one random draw per weight and a dozen small operations per parameter at each snapshot (issue 17).
            if self._sketch_draws is None or self._sketch_draws.numel() != total:
                self._sketch_draws = count_sketch_draws(total, self.projection_dim, self.seed, device=chosen[0].device)
            # On a CPU the weights are sketched where they are (a concatenated copy costs more than the calls); on
            # a GPU one copy costs less host time than three launches per weight.
            parts = chosen if chosen[0].device.type == "cpu" else [torch.cat([p.reshape(-1) for p in chosen])]
            sketch = sketch_with_draws(parts, self._sketch_draws, self.projection_dim)
        else:
            sketch, offset = None, 0
            for p in chosen:
                part = sketch_vector(p, self.projection_dim, self.seed, offset)
                sketch = part if sketch is None else sketch.add_(part.to(sketch.device))
                offset += p.numel()
        assert sketch is not None
        if distributed_world_size() > 1:
            # index_add_ on GPU sums in a nondeterministic order; keep every rank's trajectory identical.
            torch.distributed.broadcast(sketch, src=0)
        return sketch

    def _add_snapshot(self, step: int, snapshot: torch.Tensor) -> None:
        keep = self._snapshot_seen % self._snapshot_stride == 0
        self._snapshot_seen += 1
        if not keep:
            return
        self._snapshots.append(snapshot)
        self._snapshot_steps.append(step)
        if len(self._snapshots) >= self.max_snapshots:
            self._snapshots, self._snapshot_steps = self._snapshots[::2], self._snapshot_steps[::2]
            self._snapshot_stride *= 2

    def params_r90(self) -> float | None:
        """``r90`` of the kept weight snapshots (the first one is the weights at fit start)."""
        r90 = self._trajectory_r90()
        return None if r90 is None else float(r90)

    def _trajectory_r90(self) -> torch.Tensor | None:
        """:meth:`params_r90` as a 0-d tensor on the snapshots' device: statistics flushed at the end of the step take
        it to the host in their one transfer; staged before the backward, :meth:`host_extras` reads it once."""
        if len(self._snapshots) < 2:
            return None
        device = self._snapshots[-1].device
        stacked = torch.stack([s.to(device) for s in self._snapshots])
        return trajectory_r90(stacked, self.variance_fraction, self.eigensolver, pad_to=self.max_snapshots)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # The rows one due step sums on all ranks: the rank bound of its centred scatter, hence the sketch size; with
        # the most micro-batches a GradientAccumulationScheduler will give a step.
        accumulation = max([trainer.accumulate_grad_batches] + [
            int(n) for callback in trainer.callbacks
            if isinstance(callback, lightning_classes("callbacks.GradientAccumulationScheduler"))
            for n in callback.scheduling.values()
        ])
        self._rows_per_due_step = self.max_rows * accumulation * max(1, trainer.world_size)
        self._sketch_dims, self._sketched = {}, {}
        self._widths = {}
        self._references, self._agreed_references = {}, set()
        follow_weights = [
            c for c in trainer.callbacks
            if isinstance(c, DimensionalCollapse) and c.prefix == self.prefix and c.param_patterns != []
        ]
        if self.param_patterns != [] and len(follow_weights) > 1:
            raise LightningActError(
                f"{len(follow_weights)} DimensionalCollapse monitors follow a weight trajectory, and all would log "
                f"'{self.prefix}/params/r90'; pass param_patterns=[] to all but one of them"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose this fit's weights (after ``configure_model`` and a checkpoint's restore), and continue the held
        trajectory only if it follows the same weights, projected alike: a further fit on a new head, the callback
        reused on another model or a resume with other settings start a new one (they crashed, or mixed models)."""
        super().on_fit_start(trainer, pl_module)
        self._device = pl_module.device
        problem = eigensolver_problem(self.eigensolver, pl_module.device)
        if problem is not None:
            raise LightningActError(f"DimensionalCollapse: {problem}")
        # idle under FSDP1 and tensor parallelism, like its activation taps (see subscribe_taps' warning)
        idle = unmonitored_strategy(trainer) is not None
        self._choose_when_initialized = not idle and self.param_patterns != [] and has_lazy_parameters(pl_module)
        chosen = [] if idle or self._choose_when_initialized else self._select_params(pl_module)
        resuming = _resuming(trainer)
        start = training_step_index(trainer, pl_module)  # this fit's first step, unless it resumes
        if not resuming:
            self._restart_an_earlier_runs_trajectory(start)
        restarted = bool(self._snapshots) and not self._trajectory_continues(pl_module, chosen)
        if restarted:
            self._restart_trajectory()
        self.param_names = chosen
        self._follows_unrecorded = False  # param_names now says what the snapshots follow
        # the modules now: a resumed fit's model is new objects, which continue its checkpoint's trajectory by name
        followed = self._followed(pl_module, self.param_names)
        self._weight_shapes = _shapes(None if followed is None else followed[0])
        self._weight_sources = [] if followed is None else _held_weakly(followed[1])
        self._start_waits, self._restart_unsaid = resuming, restarted
        if not resuming:
            self._start_trajectory(pl_module, start)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """A resumed fit's start, at its first batch: its step there is Lightning's own count, restored after
        ``on_fit_start`` (before round 27 it was reconstructed from the checkpoint, one step early for a checkpoint
        written at a batch's end under manual optimization), and the weights are still the checkpoint's."""
        if self._start_waits:
            self._start_waits = False
            start = training_step_index(trainer, pl_module)
            self._restart_an_earlier_runs_trajectory(start)
            self._start_trajectory(pl_module, start)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _restart_an_earlier_runs_trajectory(self, start: int) -> None:
        """Drop a trajectory reaching this fit's first step ``start`` that no checkpoint of this fit restored: an earlier
        run's that logged nothing (a fit that crashed at its first step, weights frozen), which begin_fit_state,
        deciding from the histories, kept: its snapshots are of that run's model."""
        if self._snapshots and not self._resumed_this_fit and self._trajectory_reaches() >= start:
            self._restart_trajectory()

    def _start_trajectory(self, pl_module: pl.LightningModule, start: int) -> None:
        """Say a restart of the trajectory (:meth:`on_fit_start`), and take its first snapshot, labelled the step
        before ``start``, the fit's first step, if it holds none."""
        self._say_restart(start)
        weights = self._chosen_weights(pl_module, self.param_names)
        if self.param_names and weights is not None and not self._snapshots:
            self._add_snapshot(start - 1, self._snapshot(weights))

    def _say_restart(self, start: int) -> None:
        """Say, once, that :meth:`on_fit_start` dropped the trajectory held, which a new one from step ``start``
        replaces."""
        if self._restart_unsaid:
            self._restart_unsaid = False
            rank_zero_warn(
                "DimensionalCollapse: the weight trajectory it holds (from a checkpoint or an earlier fit) follows "
                "other weights than this fit's (another model or head, or param_patterns, projection_dim or seed "
                f"changed); params/r90 follows a new trajectory from step {start}",
                category=UserWarning,
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say a resumed fit's restart that no first batch said: a resume at ``max_steps`` runs none, and a
        checkpoint saved after it holds the new trajectory, so no later resume would say it."""
        super().on_fit_end(trainer, pl_module)
        self._say_restart(training_step_index(trainer, pl_module))
        self._weight_sources = []  # see on_exception

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Drop the weak references to the model's weights (:func:`_held_weakly`), as at fit end: no pickle can hold
        them (a later ``ddp_spawn`` fit pickles its callbacks), and the next fit reads its own at its start."""
        super().on_exception(trainer, pl_module, exception)
        self._weight_sources = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Choose the weights of a model with lazy modules once its first forward has made them, before the first
        optimizer step moves them: the trajectory starts at the weights it trains from, as for any other model."""
        if self._choose_when_initialized:
            chosen = self._select_params(pl_module)
            if not self._uninitialized_left_out:
                self._follow_initialized(pl_module, chosen, training_step_index(trainer, pl_module) - 1)
        super().on_before_backward(trainer, pl_module, loss)

    def _follow_initialized(self, pl_module: pl.LightningModule, chosen: list[str], before_step: int | None) -> None:
        """Follow the weights ``chosen`` of a model that had lazy modules at fit start, from a snapshot as of
        ``before_step`` (the step before the one whose update is to come); None: at a due step's end, after its
        update, with the weights still uninitialized (a lazy module that has not run) left out, said once."""
        self._choose_when_initialized = False
        self.param_names = chosen
        left_out = self._uninitialized_left_out
        if left_out:
            rank_zero_warn(
                f"DimensionalCollapse: {left_out[:3]}{' ...' if len(left_out) > 3 else ''} are still uninitialized "
                "(lazy modules that have not run in a training step); params/r90 follows the other weights (run a "
                "batch through the model in configure_model to include them)",
                category=UserWarning,
            )
        weights, sources = self._followed(pl_module, self.param_names) or (None, [])
        self._weight_shapes, self._weight_sources = _shapes(weights), _held_weakly(sources)
        if self.param_names and weights is not None and before_step is not None:
            self._add_snapshot(before_step, self._snapshot(weights))

    def _restart_trajectory(self) -> None:
        self._snapshots, self._snapshot_steps, self._snapshot_seen, self._snapshot_stride = [], [], 0, 1
        self._restored_follows, self._follows_unrecorded, self._r90 = None, False, None

    def _trajectory_reaches(self) -> int:
        """The step the held trajectory reaches, as :meth:`begin_fit_state` reads the histories' last step: its last
        snapshot's, or the step after a lone one's, which was taken at the start of a fit (labelled the step before
        it), so that a fit on a new ``Trainer`` after one that crashed at its first step does not continue it."""
        return self._snapshot_steps[-1] + (len(self._snapshot_steps) == 1)

    def _trajectory_continues(self, pl_module: pl.LightningModule, chosen: list[str]) -> bool:
        """Whether the snapshots held stack with this fit's: of the same weights (``chosen``), projected alike. A
        checkpoint that does not record what its snapshots follow is taken to follow ``chosen`` (the snapshot format
        is the same since 62acaae); only their length is checked then."""
        if self._restored_follows is not None:
            follows = self._restored_follows
        elif self._follows_unrecorded:
            follows = [chosen, self.projection_dim, self.seed]
        else:
            follows = self._trajectory_follows()
        if list(follows) != [chosen, self.projection_dim, self.seed]:
            return False
        weights = self._chosen_weights(pl_module, chosen)
        if weights is None:
            return False
        total = sum(w.numel() for w in weights)
        length = total if self.projection_dim is None or total <= self.projection_dim else self.projection_dim
        return all(s.numel() == length for s in self._snapshots)

    @classmethod
    def _chosen_weights(cls, pl_module: torch.nn.Module, names: list[str]) -> list[torch.Tensor] | None:
        """The weights ``names`` as the forward uses them (:meth:`_followed`); None when one is gone from the model."""
        followed = cls._followed(pl_module, names)
        return None if followed is None else followed[0]

    @staticmethod
    def _followed(
        pl_module: torch.nn.Module, names: list[str]
    ) -> tuple[list[torch.Tensor], list[tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]]] | None:
        """The weights ``names`` as the forward uses them, read from their modules
        (:func:`~lightning_act.capture.weights.forward_tensor`): ``torch.nn.utils.prune`` turns ``fc.weight`` into
        ``fc.weight_orig`` and a masked ``fc.weight``, a parametrization into a property (a name looked up in
        ``named_parameters`` crashed the fit); and each one's module and the parameters behind it
        (:func:`_weight_sources`), which say whether the weights are still the followed ones (:meth:`_replaced`).
        None when one is gone from the model. Each module is looked up by its name (:func:`module_at`, a few
        dictionary reads), not in a map of the whole model, built twice per snapshot before round 26 (~0.7 ms each
        on a 12-block ViT)."""
        weights, sources = [], []
        for name in names:
            path, _, attribute = name.rpartition(".")
            module = module_at(pl_module, path)
            weight = None if module is None else forward_tensor(module, attribute)
            if weight is None:
                return None
            weights.append(weight)
            sources.append((module, _weight_sources(module, attribute)))
        return weights, sources

    @staticmethod
    def _replaced(
        name: str, now: tuple[torch.nn.Module, dict[str, torch.nn.Parameter]],
        was: tuple[weakref.ref, dict[str, weakref.ref]],
    ) -> str | None:
        """How the followed weight ``name``, behind ``now`` (:meth:`_followed`) and ``was`` at the last snapshot
        (:func:`_held_weakly`), was re-created, else None: its module replaced by one that holds none of its
        parameters (a layer re-created; a QAT, ``SyncBatchNorm`` or other wrapper swap keeps the weight's object),
        or its parameter replaced by a new one under the same name (``fc.weight = nn.Parameter(...)``). Pruning keeps
        the object; a parametrization or ``weight_norm`` applied or removed re-registers the weight under other
        names (their values are the weight's), which continues."""
        module, params = now
        was_module, was_params = was
        if any(ref() is p for ref in was_params.values() for p in params.values()):
            return None
        if was_module() is not module:
            return (f"the module of a weight of the trajectory was replaced by a new one of the same shape that holds "
                    f"none of its parameters ({name}: a layer re-created mid-fit)")
        if params.keys() == was_params.keys():
            return (f"a weight of the trajectory was replaced by a new parameter of the same shape ({name}: "
                    "re-initialised mid-fit)")
        return None

    def _trajectory_change(
        self, pl_module: torch.nn.Module, shapes: list[torch.Size],
        sources: list[tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]],
    ) -> str | None:
        """Why the held snapshots no longer stack with ``pl_module`` now, whose followed weights have ``shapes``
        (:func:`_shapes`) and ``sources`` (:meth:`_followed`), else None: a followed weight left the model or
        changed shape (a head grown for new classes, a widened layer: the snapshots' lengths differ, or,
        count-sketched, their positions mean other weights), or was re-created with the same shape since the last
        snapshot (:meth:`_replaced`: the jump to its new values is no training), or a weight left out as a frozen
        copy's trains now (a backbone that a ``BaseFinetuning`` callback unfreezes was no copy)."""
        if not shapes:
            return "a weight of the trajectory left the model (a module replaced mid-fit)"
        if self._snapshots and len(shapes) == len(self._weight_shapes) and shapes != self._weight_shapes:
            name, old, new = next(
                (n, tuple(a), tuple(b)) for n, a, b in zip(self.param_names, self._weight_shapes, shapes) if a != b)
            return (f"a weight of the trajectory changed shape ({name}: {old} to {new}, a layer grown or widened "
                    "mid-fit)")
        if self._snapshots and len(sources) == len(self._weight_sources):
            replaced = next((how for n, now, was in zip(self.param_names, sources, self._weight_sources)
                             if (how := self._replaced(n, now, was)) is not None), None)
            if replaced is not None:
                return replaced
        optimized = optimized_parameters(pl_module) if self._frozen_copy_weights else None
        if any(_trains(p, optimized) for p in self._frozen_copy_weights):
            return ("a weight left out of the trajectory as a frozen copy's trains now (a backbone unfrozen by a "
                    "BaseFinetuning callback)")
        return None

    def extra_statistics(self, trainer: pl.Trainer, step: int) -> dict[str, torch.Tensor | float]:
        """Snapshot the chosen weights at this due step and report the trajectory's r90."""
        if self._choose_when_initialized:  # no backward has run yet, or lazy modules that have not run remain
            self._follow_initialized(trainer.lightning_module, self._select_params(trainer.lightning_module), None)
        if not self.param_names:
            return {}
        if self._snapshot_seen % self._snapshot_stride == 0:
            pl_module = trainer.lightning_module
            # read once for the check and the snapshot
            weights, sources = self._followed(pl_module, self.param_names) or (None, [])
            change = self._trajectory_change(pl_module, _shapes(weights), sources)
            if change is not None:
                rank_zero_warn(
                    f"DimensionalCollapse: {change} at step {step}; params/r90 follows the weights chosen again "
                    "from this step",
                    category=UserWarning,
                )
                self._restart_trajectory()
                self.param_names = self._select_params(pl_module)
                weights, sources = self._followed(pl_module, self.param_names) or (None, [])
            self._weight_sources = _held_weakly(sources)
            if not self.param_names or weights is None:
                return {}
            if not self._snapshots:
                self._weight_shapes = _shapes(weights)
            self._add_snapshot(step, self._snapshot(weights))
            self._r90 = self._trajectory_r90()
        else:
            # A snapshot the thinning would drop is not taken, and the kept ones (hence r90) have not changed:
            # at every step, once the trajectory is full, most due steps cost nothing here.
            self._snapshot_seen += 1
            if self._r90 is None and len(self._snapshots) >= 2:
                self._r90 = self._trajectory_r90()
        return {} if self._r90 is None else {f"{self.prefix}/params/r90": self._r90}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        key = f"{self.prefix}/params/r90"
        readers = metric_readers(trainer, largest_accumulation(trainer))
        self._strict_r90_readers = [
            (reader.name, _missing_key_read(reader)) for reader in readers if reader.strict and reader.key == key]

    def unknown_extra(self, key: str, step: int) -> str:
        """Why r90 is not logged, naming the strict readers of a key never logged yet (a ``BackboneFinetuning``
        backbone frozen at fit start), whose first read ends the fit (:func:`_missing_key_read`)."""
        readers = "" if key in self.history else "".join(
            f"; {name} reads it: {read}" for name, read in self._strict_r90_readers)
        return (
            f"is not logged from step {step}: the weights it follows ({len(self.param_names)} tensors) have not moved "
            "since fit start (frozen), or are not finite, so no share of their trajectory's variance is defined"
            f"{readers}"
        )

    def host_extras(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """r90 on the host: read once after each snapshot (a host sync at those due steps only, fewer and fewer as
        the trajectory thins), then kept as a float until the next one."""
        extras = super().host_extras(trainer, step)
        if self._r90 is not None:
            self._r90 = extras[f"{self.prefix}/params/r90"]
        return extras

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["collapsed"] = sorted(self.collapsed)
        state["trajectory"] = {
            "snapshots": [s.detach().cpu() for s in self._snapshots],
            "steps": list(self._snapshot_steps),
            "seen": self._snapshot_seen,
            "stride": self._snapshot_stride,
            "follows": self._trajectory_follows(),
        }
        return state

    def _trajectory_follows(self) -> list[Any]:
        """What the snapshots are of: the weights' names, and the projection's size and seed."""
        return [list(self.param_names), self.projection_dim, self.seed]

    def restore_state(self, state_dict: dict[str, Any]) -> None:
        super().restore_state(state_dict)
        self.collapsed = {current_tap_key(name) for name in state_dict.get("collapsed", [])}
        trajectory = state_dict.get("trajectory", {})
        self._snapshots = [torch.as_tensor(s, dtype=torch.float64) for s in trajectory.get("snapshots", [])]
        self._r90 = None
        self._snapshot_steps = [int(s) for s in trajectory.get("steps", [])]
        self._snapshot_seen = int(trajectory.get("seen", 0))
        self._snapshot_stride = int(trajectory.get("stride", 1))
        self._restored_follows = trajectory.get("follows")  # absent in 62acaae's and earlier checkpoints
        self._follows_unrecorded = self._restored_follows is None and bool(self._snapshots)
        if self._restored_follows is not None:
            self.param_names = list(self._restored_follows[0])  # what the snapshots follow
