"""General-purpose activation moments: the capture core's own monitor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_act.callbacks.base import ActivationMonitor, Partials, check_number
from lightning_act.capture import ModuleSpec
from lightning_act.stats import moment_partials, summarize_moments
from lightning_act.stats.fused import FusedSpec, FusedStats, moment_partials_from, moment_spec


class ActivationStats(ActivationMonitor):
    """Entry count, mean, std, rms, mean |a|, max |a|, zero fraction and non-finite count per tapped module.

    Logged as ``act/<module>/<stat>``. Default modules: activation functions and the
    residual stream after each block.
    """

    prefix = "act"
    meaning_settings = ("zero_threshold",)
    default_modules = ("@activations", "@blocks")
    heatmap_stat = "rms"

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        zero_threshold: float = 0.0,
        history_size: int = 512,
        batch_dim: int | None = None,
        token_dim: int | None = None,
    ) -> None:
        super().__init__(
            modules=modules, every_n_steps=every_n_steps, history_size=history_size, batch_dim=batch_dim, token_dim=token_dim
        )
        self.zero_threshold = check_number("ActivationStats", "zero_threshold", zero_threshold)

    def unknown_cause(self, stats: list[str]) -> str:
        if stats == ["std"]:
            return "below the resolution of the sums it comes from: |mean| over ~1e5 std"
        return "no finite activation to compute them from"

    def fused_spec(self, tap_index: int) -> FusedSpec:
        return moment_spec(self.zero_threshold)

    def partials(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> Partials:
        if fused is None:
            sums, maxima = moment_partials(x, self.zero_threshold)
        else:
            sums, maxima = moment_partials_from(fused, self.zero_threshold)
        return Partials(sums=sums, maxima=maxima)

    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert maxima is not None
        return summarize_moments(sums, maxima)
