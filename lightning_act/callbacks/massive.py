"""MassiveActivations: huge residual-stream entries per block, and the fit of their emergence."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_act.callbacks.base import (
    ActivationMonitor,
    Partials,
    StagedStatistics,
    check_int,
    check_number,
    training_step_index,
)
from lightning_act.callbacks.probe import (
    ForwardFn,
    call_forward,
    default_forward,
    own_passes,
    probing,
    resolve_forward_fn,
    same_on_every_rank,
    to_device,
    validation_batches,
    without_sampler_padding,
)
from lightning_act.capture import ModuleSpec
from lightning_act.capture.registry import ForwardCutoff
from lightning_act.errors import LightningActError
from lightning_act.plots import run_dir, writes_run_files
from lightning_act.report.skipped import record_skipped
from lightning_act.stats import distributed_world_size
from lightning_act.stats.fused import (
    FusedSpec,
    FusedStats,
    fused_statistics,
    massive_partials_from,
    massive_spec,
    stacked_massive_partials,
    stacked_topk_positions,
    topk_positions_from,
)
from lightning_act.stats.histogram_median import LogMagnitudeBins
from lightning_act.stats.massive import (
    EmergenceFit,
    emergence_curve,
    fit_emergence,
    has_token_axis,
    merge_topk,
    summarize_massive,
    summarize_massive_stacked,
    topk_stats,
    topk_stats_stacked,
)

log = logging.getLogger(__name__)

#: Per-position maxima of up to this many positions per sample are kept until the logging step (4 MiB a tap in
#: float32; a ViT-S block has 75,648); a wider tap takes its top-k in the forward hook.
DEFERRED_POSITIONS = 1 << 20

#: The largest ``top_k``: each tap logs three series per position and keeps buffers of ``3 * top_k`` numbers per
#: pass whatever its positions, so ``top_k=10**9`` asked the allocator for 48 GB at the first due step (before round
#: 26). A ``top_k`` above a tap's positions, up to this, logs the positions it has (said once).
MAX_TOP_K = 4096

FIT_SCALARS = {"fit_A": "a", "fit_lambda": "lam", "fit_gamma": "gamma", "fit_t0": "t0", "fit_K": "k", "fit_r2": "r2"}


def token_grid(x: torch.Tensor, flattened_from: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The token positions of a sample-first activation: ``(T,)`` for ``(B, T, D)``, the spatial shape of
    ``(B, C, *spatial)`` or, given as ``flattened_from`` by the capture registry, of the channels-last map it flattened
    to ``(B, tokens, C)`` (read as a sequence, a 3x5 map beside a 4x6 one aligned), ``()`` for ``(B, D)``."""
    if x.dim() == 2:
        return ()
    if x.dim() == 3:
        return flattened_from or tuple(x.shape[1:2])
    return tuple(x.shape[2:])


#: How the token grids of a tap's forwards in one step relate (:func:`grids_verdict`), from the fingerprint each rank
#: adds to the tap's maxima (:func:`grid_fingerprint`): positions align; they align as indices along each forward's
#: own first token axis of different lengths (said once); or they do not align for one of three reasons.
ALIGNED, LENGTHS_DIFFER, ONE_TOKEN, NO_TOKEN_AXIS, SHAPES_DIFFER = 0.0, 1.0, 2.0, 3.0, 4.0

#: Private statistic carrying each tap's verdict to the host with the values (read and dropped in ``deliver``).
TOKEN_AXES = "token_axes"


def grid_fingerprint(grids: set[tuple[int, ...]]) -> list[float]:
    """What :func:`grids_verdict` needs of one rank's token grids of a tap in a step, in fields that a max across ranks
    merges, so that every rank decides on every rank's grids: whether a ``()`` grid (a ``(B, D)`` call) and whether
    any other grid was seen, then the largest and the negated smallest number of axes, first size and code of the
    sizes after the first (-inf: no such grid). That code is 53 bits of their hash (two different shapes sharing
    one: a 2**-53 chance)."""
    shaped = [grid for grid in grids if grid]
    if not shaped:
        return [float(() in grids), 0.0] + [-math.inf] * 6
    dims = [len(grid) for grid in shaped]
    first = [grid[0] for grid in shaped]
    rest = [hash(grid[1:]) % (1 << 53) for grid in shaped]
    return [float(() in grids), 1.0, max(dims), -min(dims), max(first), -min(first), max(rest), -min(rest)]


def grids_verdict(fingerprints: torch.Tensor) -> torch.Tensor:
    """The verdict per row of ``fingerprints`` ``(taps, 8)`` (:func:`grid_fingerprint`, reduced over ranks), on
    their device.

    A ``(B, D)`` call has no position; grids of different numbers of axes, or of different sizes after the first
    (``row * W + column`` with different ``W``), number positions differently. Grids that differ in their first size
    alone (sequences of different lengths, maps of different heights, clips of different frame counts) name the
    same positions when every forward starts at position 0 (dynamic padding, several probe batches), which their
    shapes cannot tell from a continuation (a KV-cache decode or a chunked prefill); a first size of 1 beside larger
    ones is taken as a decode step, others as starting at 0 (:data:`LENGTHS_DIFFER`, said once)."""
    vector, shaped, max_dims, neg_min_dims, max_first, neg_min_first, max_rest, neg_min_rest = fingerprints.unbind(1)
    shaped = shaped > 0
    lengths_differ = shaped & (max_first != -neg_min_first)
    verdict = torch.where(lengths_differ, LENGTHS_DIFFER, ALIGNED)
    verdict = torch.where(lengths_differ & (-neg_min_first == 1), ONE_TOKEN, verdict)
    other_shapes = (max_dims != -neg_min_dims) | (max_rest != -neg_min_rest)
    verdict = torch.where(shaped & other_shapes, SHAPES_DIFFER, verdict)
    return torch.where(shaped & (vector > 0), NO_TOKEN_AXIS, verdict).to(torch.float64)


def positions_align(grids: set[tuple[int, ...]]) -> bool:
    """Whether top-k positions from calls with these token grids (:func:`token_grid`) name the same tokens (in one
    process; :func:`grids_verdict`)."""
    verdict = grids_verdict(torch.tensor([grid_fingerprint(grids)], dtype=torch.float64))
    return float(verdict[0]) in (ALIGNED, LENGTHS_DIFFER)


class MassiveActivations(ActivationMonitor):
    """Massive activations (Sun et al. 2024, arXiv 2402.17762) and their emergence (arXiv 2508.03616).

    Per block output (default ``"@blocks"``, the residual stream), logged as
    ``massive/<module>/<stat>``: ``top1`` (max ``|h|`` over all observed entries), ``median`` and
    ``ratio`` (per-sample ``median |h|`` and ``max |h| / median |h|``, averaged over samples, as the
    papers average over sequences), ``count`` (entries with ``|a| > abs_threshold`` and
    ``|a| / median >= ratio_threshold`` in the step's samples; ``count_per_sample`` divides by the
    sample count) and, for ``j < top_k``, ``top{j}_value``, ``top{j}_token``, ``top{j}_feature``: the
    largest ``|a|`` at distinct (token position, feature index) positions. A token position is an index along each
    forward's own token axis: at a step whose forwards of a tap, on any rank, do not align (a one-token KV-cache
    decode step or a ``(B, D)`` one beside whole sequences, maps of different widths, :func:`grids_verdict`),
    ``top{j}_token`` is not logged (one warning); forwards of different lengths are taken to start at token 0 (said
    once for training forwards: a chunked decode or a KV-cache continuation of several tokens is not told apart).

    At the end of fit, and whenever :meth:`fit_emergence` is called, the Hidden Dynamics
    emergence model ``f(t) = A exp(-lambda x) log(x) + K``, ``x = gamma t + t0``, is fitted to each
    layer's ``ratio`` history (at least ``min_fit_points`` points); the fits are kept in
    :attr:`fits` (saved with the callback state), logged as ``massive/<module>/fit_A``,
    ``fit_lambda``, ``fit_gamma``, ``fit_t0``, ``fit_K`` (the asymptote), ``fit_r2`` and
    ``fit_peak_step``, drawn over the measured points and sent to W&B as a table.

    With ``probe="val"`` the statistics come from a forward of the first ``probe_batches`` validation batches at each
    due step (run by ``forward_fn(pl_module, batch)``, default ``pl_module(batch[0])``) instead of the training
    batch; ``stop_after_taps`` ends that forward after the last tapped block (see
    :class:`~lightning_act.capture.registry.ForwardCutoff`; ``False`` for a model whose forward calls a tapped
    block a data-dependent number of times).
    """

    prefix = "massive"
    meaning_settings = ("abs_threshold", "ratio_threshold", "top_k", "probe", "probe_batches")
    default_modules = ("@blocks",)
    heatmap_stat = "ratio"
    reads_features = True  # the top-k positions name a token and a feature

    def unknown_cause(self, stats: list[str]) -> str:
        positions = [stat for stat in stats if stat.startswith("top") and "_" in stat]
        causes = []
        if "median" in stats or "count" in stats:
            causes.append(
                "a sample's median |a| is unknown: NaN or inf activations (counted as infinitely large), or a median "
                "outside the range of the median's histogram (see bins); or, for the ratio, a sample's median is 0"
            )
        elif "ratio" in stats:
            causes.append(
                "more than half of a sample's entries are exactly zero (a ReLU's or a closed gate's output, or a "
                "sample all zero), so its median |a| is 0 and max / median is undefined; median, top1 and count are "
                "logged; tap the residual stream (the blocks' outputs) for a ratio"
            )
        if any(stat.endswith("_value") for stat in positions):
            causes.append(f"the output has fewer (token, feature) positions than top_k={self.top_k}")
        if any(stat.rsplit("_", 1)[0] + "_value" not in stats for stat in positions):
            causes.append(
                "a top-k slot of value 0 has no position: every position of value 0 ties with every other (an "
                "all-zero output such as a closed gate's, or fewer than top_k nonzero positions), so the one found is "
                "arbitrary; its top{j}_value (0) is logged"
            )
        return "; ".join(causes)

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        abs_threshold: float = 100.0,
        ratio_threshold: float = 1000.0,
        top_k: int = 3,
        min_fit_points: int = 6,
        history_size: int = 512,
        probe: str | None = None,
        probe_batches: int = 1,
        forward_fn: ForwardFn | str | None = None,
        batch_dim: int | None = None,
        token_dim: int | None = None,
        feature_dim: int | None = None,
        stop_after_taps: bool = True,
    ) -> None:
        top_k = check_int("MassiveActivations", "top_k", top_k, 1)
        if top_k > MAX_TOP_K:
            raise LightningActError(
                f"MassiveActivations: top_k={top_k} is above {MAX_TOP_K}; each tap logs 3 series per position and "
                f"keeps 3 * top_k numbers per pass; pass a top_k of at most {MAX_TOP_K} (default 3)"
            )
        if probe not in (None, "val"):
            raise LightningActError(f"MassiveActivations: probe={probe!r} is not supported; pass probe='val' or leave it unset")
        check_int("MassiveActivations", "probe_batches", probe_batches, 1)
        check_number("MassiveActivations", "abs_threshold", abs_threshold)
        check_number("MassiveActivations", "ratio_threshold", ratio_threshold)
        check_int("MassiveActivations", "min_fit_points", min_fit_points, 6)  # the 5-parameter emergence fit's least
        if check_int("MassiveActivations", "history_size", history_size, 3) < 2 * min_fit_points:  # thinned: half full
            raise LightningActError(
                f"MassiveActivations: history_size={history_size} must be at least 2 * min_fit_points = "
                f"{2 * min_fit_points}; pass a larger history_size (default 512)"
            )
        super().__init__(
            modules=modules, every_n_steps=every_n_steps, history_size=history_size, batch_dim=batch_dim,
            token_dim=token_dim, feature_dim=feature_dim,
        )
        self.probe = probe
        self.probe_batches = int(probe_batches)
        self.forward_fn = resolve_forward_fn("MassiveActivations", forward_fn)
        #: The probe batches this rank runs, each with whether it measures it (:meth:`_plan_probe`).
        self._probe_plan: list[tuple[Any, bool]] = []
        self._measuring = True  # off during a probe forward this rank runs without measuring it
        self._probed_step: int | None = None
        if not isinstance(stop_after_taps, bool):  # "no" would read as True
            raise LightningActError(f"MassiveActivations: stop_after_taps={stop_after_taps!r} must be True or False")
        self.stop_after_taps = stop_after_taps
        self._cutoff = ForwardCutoff(self.stop_after_taps)
        self.abs_threshold = abs_threshold
        self.ratio_threshold = ratio_threshold
        self.top_k = top_k
        self.min_fit_points = min_fit_points
        self.fits: dict[str, EmergenceFit] = {}
        self.fit_skipped: dict[str, str] = {}
        self._has_token: dict[int, bool] = {}
        #: The token grids of each tap's calls in the current step on this rank (:func:`token_grid`); their
        #: fingerprint joins the tap's maxima at the logging step (:meth:`complete_partials`).
        self._step_grids: dict[int, set[tuple[int, ...]]] = {}
        self._unaligned_warned: set[str] = set()
        self._lengths_warned: set[str] = set()
        self._lazy_warned: set[str] = set()
        #: The spatial shape the registry flattened the activation it delivers next from (:meth:`flattened_from`).
        self._delivered_spatial: tuple[int, ...] | None = None
        #: The last due step whose probe ran lazy modules on stand-in weights, which measured nothing.
        self._stand_in_step: int | None = None
        #: Bins of the per-sample log-magnitude histogram the median is estimated from (relative error
        #: <= 2**-sub_bits, 1.56%; see lightning_act.stats.histogram_median).
        self.bins = LogMagnitudeBins()

    # ------------------------------------------------------------------ statistics
    def fused_spec(self, tap_index: int) -> FusedSpec:
        return massive_spec(self.bins, self.abs_threshold, self.ratio_threshold)

    def receive(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> None:
        """Keep the fused statistics of a tap's first activation in the step until the logging step
        (:meth:`complete_partials` turns those of all taps into partials at once: no operation per tap in the
        forward); later activations of the step (micro-batches) are turned into partials now, so one per tap is
        kept. A tap of more than ``DEFERRED_POSITIONS`` positions per sample takes its top-k now, so that its
        per-position maxima are not kept (an LLM's residual stream has millions)."""
        spatial, self._delivered_spatial = self._delivered_spatial, None
        if not self._measuring or not self._measurable(tap_index, x):
            return
        self._note_layout(tap_index, x, spatial)
        if fused is None:
            fused = fused_statistics(x, self.fused_spec(tap_index))
        assert fused.column_max is not None
        top = topk_positions_from(fused, self.top_k) if fused.column_max.numel() > DEFERRED_POSITIONS else None
        if not self.keep(tap_index, (fused, top)):  # a later forward of the step (a micro-batch): at once
            self.accumulate(tap_index, self._partials_of(fused, top))

    def complete_partials(self) -> None:
        """Partials of the activation kept per tap since the last logging step, those of all taps with outputs of one
        shape in one stacked computation (added to the partials of a tap's later forwards in the step)."""
        deferred: dict[int, tuple[FusedStats, torch.Tensor | None]] = self.take_kept()
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for tap_index, (fused, _) in deferred.items():
            by_shape.setdefault(fused.shape, []).append(tap_index)
        for taps in by_shape.values():
            passes = [deferred[i] for i in taps]
            sums, maxima = stacked_massive_partials([fused for fused, _ in passes])
            if passes[0][1] is None:  # one shape: all kept their per-position maxima, or none did
                samples = stacked_topk_positions([fused for fused, _ in passes], self.top_k)
            else:
                samples = torch.stack([top for _, top in passes])
            for tap_index, *part in zip(taps, sums.unbind(), maxima.unbind(), samples.unbind()):
                self.accumulate(tap_index, Partials(*part))
        self._add_grid_fingerprints()

    def _add_grid_fingerprints(self) -> None:
        """Append each observed tap's :func:`grid_fingerprint` to its maxima, which the flush reduces with max across
        ranks: whether positions align is decided on every rank's grids, the same on every rank, in the collective
        the flush runs anyway (before, each rank decided on its own: the ranks logged different keys, and rank 0
        logged a position of rank 1's decode step as token 0). One host-to-device copy for all taps."""
        grids, self._step_grids = self._step_grids, {}
        taps = sorted(i for i in grids if self._maxima[i] is not None)
        if not taps:
            return
        first = self._maxima[taps[0]]
        assert first is not None
        fingerprints = torch.tensor([grid_fingerprint(grids[i]) for i in taps], dtype=torch.float64)
        fingerprints = fingerprints.to(first.device, non_blocking=True)
        heads = [self._maxima[i] for i in taps]
        # one stack and one cat for all taps (a slice and a cat per tap cost ~0.5 ms of a GPU's host per due step)
        if all(head.shape == (1,) for head in heads):  # type: ignore[union-attr]
            tops = torch.stack(heads)  # type: ignore[arg-type]
        else:  # a maximum that holds an earlier step's fingerprint keeps its first entry only
            tops = torch.stack([head[:1] for head in heads])  # type: ignore[index]
        for i, row in zip(taps, torch.cat([tops, fingerprints], 1).unbind()):
            self._maxima[i] = row

    def summarize_taps(
        self, taps: list[int], sums: dict[int, torch.Tensor], maxima: dict[int, torch.Tensor],
        samples: dict[int, torch.Tensor],
    ) -> list[tuple[list[int], list[str], torch.Tensor]]:
        """:meth:`summarize` of every tap at once: a block of the five per-sample statistics, and one of the top-k
        positions per kind of tap (with a token axis or without)."""
        stacked = torch.stack([sums[i] for i in taps])
        tops_and_grids = torch.stack([maxima[i] for i in taps])  # per tap: the top-1 maximum, then the grid fingerprint
        names, values = summarize_massive_stacked(stacked, tops_and_grids[:, 0])
        verdicts = grids_verdict(tops_and_grids[:, 1:])
        blocks = [(taps, names, values), (taps, [TOKEN_AXES], verdicts[:, None])]
        gathered = torch.stack([samples[i] for i in taps])  # (taps, world, 3k)
        if gathered.shape[1] == 1:  # one rank's buffer is already merged
            merged = gathered[:, 0]
        else:
            merged = torch.stack([merge_topk(candidates, self.top_k) for candidates in gathered.unbind()])
        for with_token in (True, False):
            members = [j for j, i in enumerate(taps) if self._has_token.get(i, True) == with_token]
            if members:
                rows = merged if len(members) == len(taps) else merged[members]
                names, values = topk_stats_stacked(rows, self.top_k, with_token)
                blocks.append(([taps[j] for j in members], names, values))
        return blocks

    def tap_flags(self) -> dict[int, bool]:
        """Whether each tap has a token axis, which decides how its top-k positions read (a rank that never ran the
        tap, e.g. beside a probe measured on rank 0 alone, decoded a (B, D) tap's top-k as if it had tokens)."""
        return self._has_token

    def partials(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> Partials | None:
        spatial, self._delivered_spatial = self._delivered_spatial, None
        if not self._measurable(tap_index, x):
            return None
        self._note_layout(tap_index, x, spatial)
        if fused is None:
            fused = fused_statistics(x, self.fused_spec(tap_index))
        return self._partials_of(fused)

    def _partials_of(self, fused: FusedStats, top: torch.Tensor | None = None) -> Partials:
        """One activation's partials from its fused statistics (``top``: its top-k, when already taken)."""
        sums, maxima = massive_partials_from(fused)
        return Partials(sums=sums, maxima=maxima, samples=topk_positions_from(fused, self.top_k) if top is None else top)

    def _measurable(self, tap_index: int, x: torch.Tensor) -> bool:
        """Whether ``x`` has a sample axis and more (warns once per tap when not)."""
        if x.dim() < 2:
            self._warn_low_dim(tap_index, x.dim())
            return False
        return True

    def merge_samples(self, tap_index: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return merge_topk(torch.stack([old, new]), self.top_k)

    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert maxima is not None and samples is not None
        stats = summarize_massive(sums, maxima[:1])
        stats.update(topk_stats(merge_topk(samples, self.top_k), self.top_k, self._has_token.get(tap_index, True)))
        return stats

    def flattened_from(self, tap_index: int, spatial: tuple[int, ...] | None) -> None:
        """Called by the capture registry before it delivers an activation: the spatial shape of the channels-last map
        it flattened that activation from (None: none), its token grid (:func:`token_grid`)."""
        self._delivered_spatial = spatial

    def _note_layout(self, tap_index: int, x: torch.Tensor, spatial: tuple[int, ...] | None) -> None:
        """Record whether ``x`` has a token axis (how the tap's top-k positions read) and its token grid in this step
        (whether the positions of the step's calls name the same tokens, :meth:`_add_grid_fingerprints`)."""
        self._has_token[tap_index] = has_token_axis(x)
        self._step_grids.setdefault(tap_index, set()).add(token_grid(x, spatial))

    def deliver(
        self, trainer: pl.Trainer, staged: StagedStatistics, extras: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Read each tap's verdict on its token grids (:func:`grids_verdict`, the same on every rank) off the values,
        drop ``top{j}_token`` of the taps whose positions do not align, say either once per tap, and log the rest."""
        values = staged.host_values()
        verdicts = {i: value for (i, stat), value in zip(staged.names, values) if stat == TOKEN_AXES}
        kept = [
            j for j, (i, stat) in enumerate(staged.names)
            if stat != TOKEN_AXES and not (stat.endswith("_token") and verdicts.get(i, ALIGNED) > LENGTHS_DIFFER)
        ]
        observed = staged.observed
        if observed is None:  # counted across ranks: a tap no rank observed has no verdict to say
            observed = {i for i, count in zip(staged.present, values[len(staged.names):]) if count > 0}
        for i, verdict in sorted(verdicts.items()):
            if i in observed and verdict != ALIGNED:
                self._say_verdict(i, verdict)
        staged.values = [values[j] for j in kept] + values[len(staged.names):]
        staged.names = [staged.names[j] for j in kept]
        return super().deliver(trainer, staged, extras)

    def _say_verdict(self, tap_index: int, verdict: float) -> None:
        """Say once per tap why its ``top{j}_token`` is not logged, or how it reads for forwards of different lengths
        (unsaid for a probe run by the default forward: its forwards are whole batches of the validation loader, each
        starting at token 0; a ``forward_fn`` may run chunks, as a chunked prefill does)."""
        name = self.taps[tap_index].name
        if verdict == LENGTHS_DIFFER:
            if self.probe is not None and self.forward_fn is default_forward:
                return
            if self.probe is not None:
                self._warn_once(
                    self._lengths_warned, name,
                    "ran forwards of different lengths in one step of the probe's forward_fn: top{j}_token is an "
                    "index along each forward's own token axis, which names the same token only when every forward "
                    "starts at token 0 (whole batches padded to their own lengths do); a forward_fn that runs a batch "
                    "in chunks (a chunked prefill with a KV cache) gives each chunk's own indices: run each batch "
                    "whole in one forward for absolute positions",
                )
                return
            self._warn_once(
                self._lengths_warned, name,
                "ran forwards of different lengths in one step (on one rank, or on different ranks): top{j}_token is "
                "an index along each forward's own token axis, which names the same token only when every forward "
                "starts at token 0 (dynamic padding, gradient accumulation); the positions of a KV-cache "
                "continuation or a chunked decode of several tokens, which shapes do not tell apart, do not align and "
                "are logged as such indices; for positions of such steps, pass probe='val' with a forward_fn that runs "
                "whole sequences in one forward",
            )
            return
        reason = {
            ONE_TOKEN: "a one-token forward, a KV-cache decode step, beside longer ones",
            NO_TOKEN_AXIS: "a (B, D) forward, which has no token position, beside ones with a token axis",
            SHAPES_DIFFER: "maps or token grids of different shapes, which number their positions differently",
        }[verdict]
        self._warn_once(
            self._unaligned_warned, name,
            f"ran forwards whose token axes do not align in one step ({reason}; on one rank, or on different "
            "ranks): a position is an index "
            "along each forward's own token axis (before round 27 a KV-cache decode step's token read as token 0), so "
            "top{j}_token is not logged at such steps (top{j}_value and top{j}_feature are); every forward's rows also "
            "count as samples of median, ratio and count_per_sample (a decoded token is one). For positions and "
            "per-sequence statistics, pass probe='val' with a forward_fn that runs whole sequences in one forward",
        )

    # ------------------------------------------------------------------ probe
    def observes_training(self) -> bool:
        return self.probe is None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._probed_step = None  # a step probed in an earlier fit is a step of this one to probe again
        self._stand_in_step = None  # nor is a step an earlier fit's probe ran on stand-ins one of this fit's
        self._step_grids = {}  # what an interrupted step of an earlier fit saw
        if self.probe is None or not self.taps:
            return
        loaders: list[Any] = []
        batches = validation_batches(trainer, "MassiveActivations", lambda b: len(b) >= self.probe_batches, loaders)
        if len(batches) < self.probe_batches:  # the loader ran out: the probe's statistics are of fewer batches
            rank_zero_warn(
                f"MassiveActivations: the validation data holds {len(batches)} batch(es), fewer than probe_batches="
                f"{self.probe_batches}; the probe and its statistics are of those {len(batches)} (pass probe_batches="
                f"{len(batches)} to silence this)",
                category=UserWarning,
            )
        self._cutoff = ForwardCutoff(self.stop_after_taps)  # each fit records its probe forwards afresh
        probe_data = [to_device(batch, pl_module.device, trainer) for batch in batches]
        self._probe_plan = self._plan_probe(pl_module, probe_data, loaders[0])
        self.warn_padded_probe(batch for batch, measured in self._probe_plan if measured)

    def _plan_probe(self, pl_module: nn.Module, batches: list[Any], loader: Any) -> list[tuple[Any, bool]]:
        """The probe batches this rank runs, each with whether it measures it.

        Identical batches on every rank are measured by rank 0 alone (the one-process numbers). Batches that differ
        between the ranks are each rank's own: every rank measures its own, without the examples a
        ``DistributedSampler`` repeats to pad the dataset (the probe's union is then the one-process probe's examples,
        each once). Every rank runs every batch it read, measuring nothing of those it leaves out: what a forward writes
        to the model and keeps (a parameter write that begins after its first quiet probes, :func:`parameters_kept`)
        is written on every rank, so the DDP replicas stay equal (before round 26 rank 0 ran identical batches alone
        and kept such a write alone), and under FSDP2, whose forward is a collective, rank 0's lone forward waited for
        the others forever. The other ranks' forwards run while rank 0 runs its own: the step takes no longer."""
        if distributed_world_size() == 1:
            return [(batch, True) for batch in batches]
        if same_on_every_rank(batches, pl_module.device):
            measured = batches if torch.distributed.get_rank() == 0 else []
        else:
            # whole first batches, then one cut, in order
            measured = without_sampler_padding(batches, loader, "MassiveActivations")
        left_out = batches[len(measured):]
        return [(batch, True) for batch in measured] + [(batch, False) for batch in left_out]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.probe is None or self._pending_step is None or self._probed_step == self._pending_step:
            return
        self._probed_step = self._pending_step
        if not self._probe_plan:
            return
        buffers = (list(self._sums), list(self._maxima), list(self._samples))  # this step's: reset values, or None
        self.arm(True)
        try:
            with own_passes(self._registry, self, self._cutoff), \
                    probing(trainer, pl_module, pl_module.device, say_stand_ins=False) as stand_ins_run:
                for probe_batch, measured in self._probe_plan:
                    self._measuring = measured
                    self._cutoff.forward(
                        functools.partial(call_forward, "MassiveActivations", self.forward_fn, pl_module, probe_batch)
                    )
                self._cutoff.pass_complete()
        finally:
            self._measuring = True
            self.arm(False)
        if stand_ins_run:
            self._drop_stand_in_probe(self._pending_step, buffers, stand_ins_run)

    def _drop_stand_in_probe(
        self, step: int, buffers: tuple[list[torch.Tensor | None], ...], stand_ins_run: list[str]
    ) -> None:
        """Forget what the probe of due step ``step`` measured: it ran the lazy modules ``stand_ins_run`` before the
        fit's first training forward made their weights, on stand-ins
        (:func:`~lightning_act.callbacks.probe.lazy_modules_kept` keeps training bitwise), whose statistics read like
        the step's measurement of the trained model. This rank's buffers go back to what they held before the probe
        (it observed nothing), so the step's flush runs the same collectives on every rank and logs only what ranks
        without stand-ins measured: nothing in one process. Said once."""
        self._sums, self._maxima, self._samples = (list(held) for held in buffers)
        self._observed, self._step_grids = set(), {}
        self.take_kept()
        self._stand_in_step = step
        self._warn_once(
            self._lazy_warned, "probe='val'",
            f"measures nothing at step {step}, nor at a later due step whose probe runs a lazy module (nn.LazyLinear "
            f"...) still unmade ({', '.join(stand_ins_run)}): its weights are made by the first training forward that "
            "runs it, so the probe ran it on stand-in weights; run one batch through the model before the fit to "
            "measure step 0",
        )

    def _warn_unobserved(self, step: int, observed: set[int]) -> None:
        if step != self._stand_in_step:  # a probe on stand-ins observed nothing: said by _drop_stand_in_probe
            super()._warn_unobserved(step, observed)

    # ------------------------------------------------------------------ emergence fits
    def fit_emergence(self, trainer: pl.Trainer | None = None) -> dict[str, EmergenceFit]:
        """Fit the emergence model to every layer's ``ratio`` history; returns ``{module: fit}``.

        Layers with fewer than ``min_fit_points`` points (none at all: a post-ReLU tap, whose ratio is unknown at
        every step), or whose fit fails, are left out and their reason is logged and kept in :attr:`fit_skipped`.
        With a ``trainer``, the fits are also logged (scalars, figure, W&B table) from global rank zero.
        """
        fits: dict[str, EmergenceFit] = {}
        histories = self.series("ratio")
        # a post-ReLU tap's ratio is unknown at every due step (a median of 0): said here too, not left out unsaid
        skipped = {
            tap.name: "no ratio point: the ratio was unknown (see its warning) or the tap unobserved at every due step"
            for tap in self.taps if tap.name not in histories
        }
        for layer, series in histories.items():
            if len(series) < self.min_fit_points:
                skipped[layer] = f"{len(series)} ratio points, the fit needs at least {self.min_fit_points}"
                continue
            try:
                fits[layer] = fit_emergence(np.array(series.steps), np.array(series.values), self.min_fit_points)
            except ValueError as error:
                skipped[layer] = str(error)
        for layer, reason in skipped.items():
            log.info("MassiveActivations: no emergence fit for %s: %s", layer, reason)
        self.fits, self.fit_skipped = fits, skipped
        if trainer is not None and trainer.is_global_zero and writes_run_files(trainer):
            # The report lists the skipped layers; logger=False writes nothing to the working directory. Only this
            # monitor's layers are replaced: another MassiveActivations on other modules records into the same entry.
            measured = {tap.name for tap in self.taps} | set(self.series("ratio"))
            record_skipped(run_dir(trainer), self.prefix, "emergence fit", skipped, layers=measured)
        if trainer is not None and trainer.is_global_zero:
            self._log_fits(trainer)
        return fits

    def _log_fits(self, trainer: pl.Trainer) -> None:
        if not self.fits:
            return
        metrics: dict[str, float] = {}
        for layer, fit in self.fits.items():
            for name, attribute in FIT_SCALARS.items():
                metrics[f"{self.prefix}/{layer}/{name}"] = float(getattr(fit, attribute))
            if not math.isnan(fit.peak_step):
                metrics[f"{self.prefix}/{layer}/fit_peak_step"] = fit.peak_step
        self.log_metrics(trainer, metrics, training_step_index(trainer, trainer.lightning_module))

        from lightning_act.plots import log_figure, log_table

        log_figure(trainer, self._fit_figure(), self.output_name(trainer, f"{self.prefix}_ratio_emergence_fits"))
        columns = ["module", "A", "lambda", "gamma", "t0", "K", "r2", "peak_step", "points"]
        rows = [
            [layer, fit.a, fit.lam, fit.gamma, fit.t0, fit.k, fit.r2, fit.peak_step, fit.points]
            for layer, fit in self.fits.items()
        ]
        log_table(trainer, self.output_name(trainer, f"{self.prefix}/emergence_fits"), columns, rows)

    def _fit_figure(self) -> Any:
        from lightning_act.plots import new_figure

        series = self.series("ratio")
        layers = list(self.fits)
        columns = min(4, len(layers))
        rows = -(-len(layers) // columns)
        figure = new_figure(3.2 * columns, 2.4 * rows)
        for index, layer in enumerate(layers):
            axes = figure.add_subplot(rows, columns, index + 1)
            steps = np.array(series[layer].steps, dtype=np.float64)
            fit = self.fits[layer]
            dense = np.linspace(steps.min(), steps.max(), 400)
            axes.plot(steps, series[layer].values, "o", markersize=3, label="measured")
            with np.errstate(invalid="ignore", divide="ignore"):
                axes.plot(dense, emergence_curve(dense, fit.a, fit.lam, fit.gamma, fit.t0, fit.k), "-", label="fit")
            if not math.isnan(fit.peak_step) and fit.peak_step <= steps.max():
                axes.axvline(fit.peak_step, color="grey", linestyle=":", linewidth=1)
            axes.set_title(f"{layer}  R²={fit.r2:.3f}", fontsize=8)
            axes.set_xlabel("global step", fontsize=7)
            axes.set_ylabel("top1 / median", fontsize=7)
            axes.tick_params(labelsize=6)
        figure.suptitle("massive activations: ratio and emergence fit")
        return figure

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.fit_emergence(trainer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fits"] = {layer: fit.as_dict() for layer, fit in self.fits.items()}
        state["fit_skipped"] = dict(self.fit_skipped)
        return state

    def restore_state(self, state_dict: dict[str, Any]) -> None:
        super().restore_state(state_dict)
        self.fits = {layer: EmergenceFit(**values) for layer, values in state_dict.get("fits", {}).items()}
        self.fit_skipped = dict(state_dict.get("fit_skipped", {}))
