"""The monitor base class: scheduling, per-rank buffers, one packed reduction, logging, state.

A monitor taps modules (see :mod:`lightning_act.capture`), and on each *due* optimizer step
(``global_step % every_n_steps == 0``) it

1. attaches forward hooks and arms them for the forward passes of that step's micro-batches
   (all micro-batches under gradient accumulation; disarmed before backward, so the recompute of
   activation checkpointing is not counted twice);
2. turns each activation into fixed-size *partials* on the activation's device (no host sync):
   ``sums`` (added up), ``maxima`` (max-reduced) and optional ``samples`` (merged by the
   subclass, e.g. a top-k, then gathered across ranks);
3. after the optimizer step, reduces the packed buffers across data-parallel ranks with one
   collective per kind, lets the subclass derive its statistics, moves them to the host in one
   transfer, logs them to every logger of the Trainer as ``<prefix>/<module>/<stat>`` at that
   global step, appends them to bounded histories, and detaches the hooks.

Subclasses implement :meth:`partials` and :meth:`summarize` (pure math lives in
:mod:`lightning_act.stats`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_act.callbacks.history import BoundedSeries
from lightning_act.capture import ActivationHooks, ModuleSpec, Tap, select_taps
from lightning_act.stats import all_gather_packed, all_reduce_packed, distributed_world_size

log = logging.getLogger(__name__)


@dataclass
class Partials:
    """Fixed-size per-tap statistics of one activation tensor (float64, on its device)."""

    sums: torch.Tensor
    maxima: torch.Tensor | None = None
    samples: torch.Tensor | None = None


class ActivationMonitor(Callback, ABC):
    """Base class of the activation monitors; see the module docstring for the protocol."""

    prefix: ClassVar[str] = "act"
    default_modules: ClassVar[tuple[str, ...]] = ("@activations",)
    heatmap_stat: ClassVar[str | None] = None

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        history_size: int = 512,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.modules = list(self.default_modules) if modules is None else (
            [modules] if isinstance(modules, (str, type)) else list(modules)
        )
        self.every_n_steps = every_n_steps
        self.history_size = history_size
        self.history: dict[str, BoundedSeries] = {}
        self.taps: list[Tap] = []
        self._hooks: ActivationHooks | None = None
        self._pending_step: int | None = None
        self._sums: list[torch.Tensor | None] = []
        self._maxima: list[torch.Tensor | None] = []
        self._samples: list[torch.Tensor | None] = []
        self._layout_synced = False

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def partials(self, tap_index: int, x: torch.Tensor) -> Partials:
        """Fixed-size partial statistics of one activation tensor ``x`` from tap ``tap_index``."""

    def merge_samples(self, tap_index: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Combine two same-size sample buffers of one rank (default: keep the newest)."""
        return new

    @abstractmethod
    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Statistics (0-d tensors) of one tap from its reduced buffers; ``samples`` is (world, n)."""

    def extra_statistics(self, trainer: pl.Trainer, step: int) -> dict[str, torch.Tensor]:
        """Statistics not tied to a tap (full keys, e.g. ``collapse/params/r90``), logged with the rest."""
        return {}

    def on_statistics(self, trainer: pl.Trainer, step: int, stats: dict[str, dict[str, float]]) -> None:
        """Called on every rank after a logging step with ``{tap name: {stat: value}}``."""

    # ------------------------------------------------------------------ scheduling
    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=[str(m) for m in self.modules], every_n_steps=self.every_n_steps)

    def is_due(self, global_step: int) -> bool:
        return global_step % self.every_n_steps == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.taps = select_taps(pl_module, self.modules, owner=type(self).__name__)
        self._hooks = ActivationHooks(self.taps, self._observe)
        self._reset_buffers(len(self.taps))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._hooks is None or not self.is_due(trainer.global_step):
            return
        self._hooks.attach()
        self._hooks.armed = True
        self._pending_step = trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._hooks is not None:
            self._hooks.armed = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks is not None:
            self._hooks.armed = False
        if self._pending_step is not None and trainer.global_step > self._pending_step:
            step, self._pending_step = self._pending_step, None
            if self._hooks is not None:
                self._hooks.detach()
            self.flush(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()
        self._pending_step = None

    # ------------------------------------------------------------------ buffers
    def _reset_buffers(self, n: int) -> None:
        self._sums, self._maxima, self._samples = [None] * n, [None] * n, [None] * n
        self._layout_synced = False

    def _observe(self, tap_index: int, x: torch.Tensor) -> None:
        part = self.partials(tap_index, x)
        sums = self._sums[tap_index]
        self._sums[tap_index] = part.sums.to(torch.float64) if sums is None else sums.add_(part.sums)
        if part.maxima is not None:
            maxima = self._maxima[tap_index]
            self._maxima[tap_index] = part.maxima.to(torch.float64) if maxima is None else torch.maximum(maxima, part.maxima)
        if part.samples is not None:
            samples = self._samples[tap_index]
            self._samples[tap_index] = part.samples if samples is None else self.merge_samples(tap_index, samples, part.samples)

    def _sync_layout(self, device: torch.device) -> None:
        """Make every rank hold buffers of the same sizes (a tap may have run on some ranks only)."""
        n = len(self.taps)
        sizes = torch.tensor(
            [[-1 if b is None else b.numel() for b in buffers] for buffers in (self._sums, self._maxima, self._samples)],
            dtype=torch.float64, device=device,
        ).reshape(-1)
        sizes = all_reduce_packed([sizes], "max")[0].reshape(3, n).long().tolist()
        fills = (0.0, float("-inf"), float("nan"))
        for buffers, row, fill in zip((self._sums, self._maxima, self._samples), sizes, fills):
            for i, size in enumerate(row):
                if buffers[i] is None and size >= 0:
                    buffers[i] = torch.full((size,), fill, dtype=torch.float64, device=device)
        self._layout_synced = True

    # ------------------------------------------------------------------ reduce, summarise, log
    def flush(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Reduce the buffers across ranks, log the statistics at ``step`` and reset the buffers."""
        if not self._layout_synced and distributed_world_size() > 1:
            self._sync_layout(trainer.strategy.root_device)
        present = [i for i, s in enumerate(self._sums) if s is not None]
        sums = dict(zip(present, all_reduce_packed([self._sums[i] for i in present], "sum")))
        with_max = [i for i in present if self._maxima[i] is not None]
        maxima = dict(zip(with_max, all_reduce_packed([self._maxima[i] for i in with_max], "max")))
        with_samples = [i for i in present if self._samples[i] is not None]
        samples = dict(zip(with_samples, all_gather_packed([self._samples[i] for i in with_samples])))

        names: list[tuple[str | None, str]] = []
        values: list[torch.Tensor] = []
        for i in present:
            for stat, value in self.summarize(i, sums[i], maxima.get(i), samples.get(i)).items():
                names.append((self.taps[i].name, stat))
                values.append(value.detach().reshape(()).to(torch.float64))
        for key, value in self.extra_statistics(trainer, step).items():
            names.append((None, key))
            values.append(torch.as_tensor(value).detach().reshape(()).to(torch.float64))
        host_values = torch.stack([v.to(values[0].device) for v in values]).cpu().tolist() if values else []

        stats: dict[str, dict[str, float]] = {}
        metrics: dict[str, float] = {}
        for (tap_name, stat), value in zip(names, host_values):
            if tap_name is None:
                key = stat
            else:
                stats.setdefault(tap_name, {})[stat] = value
                key = f"{self.prefix}/{tap_name}/{stat}"
            metrics[key] = value
            self.record(key, step, value)
        self.log_metrics(trainer, metrics, step)
        self.on_statistics(trainer, step, stats)
        self._zero_buffers()
        return metrics

    def _zero_buffers(self) -> None:
        for buffer in self._sums:
            if buffer is not None:
                buffer.zero_()
        for buffer in self._maxima:
            if buffer is not None:
                buffer.fill_(float("-inf"))
        self._samples = [None if s is None else torch.full_like(s, float("nan")) for s in self._samples]

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
    def state_dict(self) -> dict[str, Any]:
        return {"history": {key: series.state_dict() for key, series in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {key: BoundedSeries.from_state_dict(s) for key, s in state_dict.get("history", {}).items()}

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

        figure = layer_step_heatmap(series, title=f"{self.prefix}/{self.heatmap_stat}")
        log_figure(trainer, figure, f"{self.prefix}_{self.heatmap_stat}_heatmap")


