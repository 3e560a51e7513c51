"""ActivationSparsity: zero fraction, CETT activation ratio and temporal sparsity per module."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_act.callbacks.base import (
    MEASURED,
    ActivationMonitor,
    Partials,
    check_dim,
    check_int,
    check_number,
    module_list,
)
from lightning_act.capture import ModuleSpec, clean_name, select_taps, unmatched_specs
from lightning_act.capture.layout import is_hugging_face_conv1d
from lightning_act.capture.selection import is_peft_adapter_holder
from lightning_act.capture.weights import forward_tensor
from lightning_act.errors import LightningActError, ModuleSelectionError
from lightning_act.peft.lora import LoRALinear
from lightning_act.stats.fused import FusedSpec, FusedStats, zero_partials_from, zero_partials_stacked, zero_spec
from lightning_act.stats.sparsity import (
    TEMPORAL_SUMS,
    ZERO_SUMS,
    cett_grid,
    cett_partials,
    cett_threshold,
    has_time_axis,
    spread_row_index,
    temporal_fraction,
    temporal_partials,
    zero_fraction,
    zero_fraction_stacked,
    zero_partials,
)


def is_peft_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``peft`` LoRA layer (``peft.tuners.lora.layer.Linear``), told by its
    structure so that ``peft`` need not be installed: a ``base_layer``, ``lora_A``/``lora_B`` ``ModuleDict`` s and a
    ``scaling`` dict keyed by adapter name, and ``active_adapters``."""
    return (
        isinstance(getattr(module, "base_layer", None), nn.Module)
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "scaling", None), dict)
        and is_peft_adapter_holder(module)
    )


def _peft_lora_update(module: nn.Module) -> torch.Tensor | None:
    """``Σ scaling[a] · B_a A_a`` over the adapters peft's forward adds to ``base_layer.weight`` as it stands: the
    active ones, none once merged into it, minus the merged ones when adapters are disabled (the forward unmerges
    them first); None when none. A LoRA variant (DoRA, ...) does not compute ``W + s · B A``: refused in one line."""
    if getattr(module, "disable_adapters", False):
        names, sign = list(getattr(module, "merged_adapters", [])), -1.0
    elif getattr(module, "merged", False):
        names, sign = [], 1.0
    else:
        names, sign = [a for a in module.active_adapters if a in module.lora_A], 1.0
    variants = [a for a in names if a in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(a)]
    if variants:
        raise LightningActError(
            f"CETT cannot read the weight of a peft LoRA layer whose adapters {variants} use a LoRA variant (DoRA, ...): "
            "it is not W + scaling * B A; merge them first (merge_and_unload) or measure a plain LoRA layer"
        )
    update = None
    for name in names:
        a = forward_tensor(module.lora_A[name], "weight")
        b = forward_tensor(module.lora_B[name], "weight")
        term = sign * module.scaling[name] * (b @ a)
        update = term if update is None else update + term
    return update


def down_projection_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(d_model, d_ff)`` weight of a down-projection: an ``nn.Linear``'s, or the transpose of Hugging Face's
    ``Conv1D`` (GPT-2's ``c_proj``), which stores ``(d_ff, d_model)`` and computes ``x @ W + b``; for a LoRA layer
    around either (:class:`~lightning_act.peft.lora.LoRALinear`, or a Hugging Face ``peft`` LoRA layer: see
    :func:`_peft_lora_update`), the effective ``W + scaling · B A`` the layer computes with (its frozen ``W`` alone
    would describe another model), without autograd; else None. Every tensor is read from its input hook as its
    forward uses it (:func:`~lightning_act.capture.weights.forward_tensor`): a weight (or LoRA factor) Lightning's
    ``ModelPruning`` pruned mid-fit is masked (its attribute still held the previous step's), a ``spectral_norm``'s
    computed without a power-iteration step the fit does not take."""
    if isinstance(module, LoRALinear):
        base = down_projection_weight(module.base)
        if base is None:
            return None
        with torch.no_grad():
            return base + module.scaling * (forward_tensor(module, "lora_b") @ forward_tensor(module, "lora_a"))
    if is_peft_lora_layer(module):
        base = down_projection_weight(module.base_layer)
        if base is None:
            return None
        with torch.no_grad():
            update = _peft_lora_update(module)
            return base if update is None else base + update.to(base.dtype)
    if not isinstance(module, nn.Linear) and not is_hugging_face_conv1d(module):
        return None
    weight = forward_tensor(module, "weight")
    if weight is None:
        return None
    return weight.t() if is_hugging_face_conv1d(module) else weight


def lora_parts(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``{id(module): (name of its LoRA layer, what the module is)}`` for every module inside a LoRA layer of
    ``model`` (a ``LoRALinear``'s ``base``; a ``peft`` LoRA layer's ``base_layer``, ``lora_A``, ``lora_B``): CETT on
    one of them would read a weight that is not the layer the model runs."""
    parts: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            parts[id(module.base)] = (name, "the frozen base of a LoRALinear")
        elif is_peft_lora_layer(module):
            parts.update({id(inner): (name, f"inside the peft LoRA layer {name!r}")
                          for inner in module.modules() if inner is not module})
    return parts


class ActivationSparsity(ActivationMonitor):
    """Activation sparsity (Lazy Neuron Phenomenon, arXiv 2210.06313; Sparsing Law, arXiv 2411.02335).

    Logged as ``sparsity/<module>/<stat>``:

    - ``zero_frac``: fraction of entries with ``|a| <= threshold`` (default 0: exact zeros) and
      ``nonfinite`` (count of NaN/inf entries), for every module in ``modules`` (default: the
      outputs of activation functions);
    - ``cett_ratio`` and ``cett_eps`` for each down-projection (``nn.Linear``, Hugging Face's ``Conv1D``, or a LoRA
      layer around one: :func:`down_projection_weight`) matched by ``cett_modules`` (e.g. ``"*.mlp.fc2"``), read at
      its input (the key's module name ends in
      ``-input``): the activation ratio (1 - sparsity) at the per-layer threshold ``eps`` where the
      token-averaged CETT reaches ``target_cett``; see :mod:`lightning_act.stats.sparsity`;
    - ``temporal_frac`` when ``temporal_dim`` is set: the fraction of ``|a_t - a_{t-1}| <= temporal_eps``
      along that axis, for modules whose output has it.

    ``target_cett`` defaults to 0.2, a moderate tail error; the Sparsing Law's PPL-1% CETT is
    found per model by a perplexity search that a monitor cannot run, so set it to that value
    when you know it. CETT is computed on at most ``cett_max_tokens`` tokens (a fixed pseudo-random choice) per
    micro-batch, on a grid of ``cett_grid_size`` thresholds spanning ``cett_grid_range`` in units of
    activation magnitude (times the layer's median down-projection column norm).
    """

    prefix = "sparsity"
    meaning_settings = ("threshold", "target_cett", "cett_grid_size", "cett_grid_range", "temporal_dim", "temporal_eps")
    default_modules = ("@activations",)
    heatmap_stat = "zero_frac"
    unmeasured_reason = (
        "CETT needs a token whose down-projection output is non-zero and finite: every weight column or every "
        "activation entering it was zero, or not finite"
    )

    def unknown_cause(self, stats: list[str]) -> str:
        if stats == ["temporal_frac"]:
            return (
                f"no two consecutive steps along temporal_dim={self.temporal_dim}: its output has no such axis here, or "
                "it is the sample axis (a negative temporal_dim counts from the last axis)"
            )
        if any(stat.startswith("cett") for stat in stats):
            return (f"the token-averaged CETT does not reach target_cett={self.target_cett} inside cett_grid_range="
                    f"{self.cett_grid_range}: widen the range; or no finite activation")
        return super().unknown_cause(stats)

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        every_n_steps: int = 50,
        threshold: float = 0.0,
        cett_modules: str | Sequence[str] | None = None,
        target_cett: float = 0.2,
        cett_max_tokens: int = 256,
        cett_grid_size: int = 64,
        cett_grid_range: tuple[float, float] = (1e-6, 1e3),
        temporal_dim: int | None = None,
        temporal_eps: float = 0.0,
        history_size: int = 512,
        batch_dim: int | None = None,
        token_dim: int | None = None,
    ) -> None:
        check_number("ActivationSparsity", "threshold", threshold)
        check_number("ActivationSparsity", "temporal_eps", temporal_eps)
        check_number("ActivationSparsity", "target_cett", target_cett)
        if not 0.0 < target_cett < 1.0:
            raise LightningActError(
                f"ActivationSparsity: target_cett={target_cett} is outside (0, 1); pass a CETT such as 0.2"
            )
        check_int("ActivationSparsity", "cett_max_tokens", cett_max_tokens, 1)
        check_int("ActivationSparsity", "cett_grid_size", cett_grid_size, 2)
        if check_dim("ActivationSparsity", "temporal_dim", temporal_dim) == 0:
            raise LightningActError(
                "ActivationSparsity: temporal_dim=0 is the sample axis (temporal_dim counts axes of the sample-first "
                "view); pass the time axis, e.g. 1 for (batch, time, features)"
            )
        if isinstance(cett_grid_range, str) or not isinstance(cett_grid_range, Sequence) or len(cett_grid_range) != 2:
            raise LightningActError(
                f"ActivationSparsity: cett_grid_range={cett_grid_range!r} must be a pair (low, high); pass e.g. (1e-6, 1e3)"
            )
        low, high = (check_number("ActivationSparsity", "cett_grid_range", bound) for bound in cett_grid_range)
        if not 0.0 < low < high:  # finite too: an infinite end made a grid of NaN thresholds and a wrong cett_ratio
            raise LightningActError(
                f"ActivationSparsity: cett_grid_range={cett_grid_range} is invalid; pass finite 0 < low < high"
            )
        zero_modules = module_list(modules, self.default_modules, "ActivationSparsity")
        globs = [] if cett_modules is None else ([cett_modules] if isinstance(cett_modules, str) else cett_modules)
        if not isinstance(globs, Sequence) or not all(isinstance(glob, str) for glob in globs):
            raise LightningActError(
                f"ActivationSparsity: cett_modules={cett_modules!r} must be a name glob or a list of them, e.g. '*.fc2'"
            )
        globs = list(globs)
        self.zero_modules = zero_modules
        self.zero_modules_are_default = modules is None
        self.cett_globs_as_written = globs
        self.cett_modules = [next((g[: -len(end)] for end in (":input", "-input") if g.endswith(end)), g) for g in globs]
        super().__init__(
            modules=zero_modules + [f"{g}:input" for g in self.cett_modules],
            every_n_steps=every_n_steps, history_size=history_size, batch_dim=batch_dim, token_dim=token_dim,
        )
        self.uses_default_modules = modules is None and not self.cett_modules
        self.threshold = threshold
        self.target_cett = target_cett
        self.cett_max_tokens = cett_max_tokens
        self.cett_grid_size = cett_grid_size
        self.cett_grid_range = (float(cett_grid_range[0]), float(cett_grid_range[1]))
        self.temporal_dim = temporal_dim
        self.temporal_eps = temporal_eps
        self._zero_taps: set[int] = set()
        self._cett_linear: dict[int, nn.Module] = {}
        self._cett_grid: dict[int, torch.Tensor] = {}
        self._cett_row_index: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        owner = type(self).__name__
        with warnings.catch_warnings():
            # the taps' one list merges modules and cett_modules: check_spec_lists names the argument of a spec instead
            warnings.filterwarnings("ignore", message=rf"{owner}: modules \[.*\] match nothing in ", category=UserWarning)
            try:
                super().setup(trainer, pl_module, stage)
            except ModuleSelectionError:  # every spec matched nothing: say which argument the user wrote
                self.check_spec_lists(pl_module)
                raise
        if stage != "fit":
            return
        if self.taps and not self.uses_default_modules:  # the default list alone: subscribe_taps said it
            self.check_spec_lists(pl_module)
        index = {(id(tap.module), tap.point): i for i, tap in enumerate(self.taps)}
        self._zero_taps = set()
        self._cett_linear = {}
        if not self.taps:
            return
        cett_specs = [f"{g}:input" for g in self.cett_modules]
        if self.zero_modules and len(unmatched_specs(pl_module, self.zero_modules)) < len(self.zero_modules):
            zero_taps = select_taps(pl_module, self.zero_modules, owner=owner, warn_aliases=False)  # said in setup
            self._zero_taps = {index[(id(tap.module), tap.point)] for tap in zero_taps}
        if self.cett_modules and len(unmatched_specs(pl_module, cett_specs)) < len(cett_specs):
            inside_lora = lora_parts(pl_module)
            for tap in select_taps(pl_module, cett_specs, owner=owner, warn_aliases=False):
                if id(tap.module) in inside_lora:
                    layer, what = inside_lora[id(tap.module)]
                    raise LightningActError(
                        f"cett_modules matched {tap.name!r}, {what}: its weight alone is not the layer the model runs; "
                        f"pass the LoRA layer's own name, e.g. {layer!r}"
                    )
                if down_projection_weight(tap.module) is None:
                    kind = type(tap.module)
                    raise LightningActError(
                        f"cett_modules matched {tap.name!r}, a {kind.__module__}.{kind.__qualname__}; CETT needs the "
                        "MLP's down-projection (an nn.Linear, Hugging Face's Conv1D, or a LoRA layer around one: "
                        "LoRALinear or peft's LoRA Linear); pass the name (glob) of the layer the activations enter"
                    )
                self._cett_linear[index[(id(tap.module), tap.point)]] = tap.module
        self._cett_grid = {}

    def check_spec_lists(self, pl_module: nn.Module) -> None:
        """``modules`` and ``cett_modules`` apart: the monitor taps them as one list, which one matching spec keeps
        from failing, so a list the user wrote that matches nothing would leave its statistic out of the run without
        a word. Such a list raises; a list matching in part, or a default one matching nothing, warns."""
        owner, model = type(self).__name__, type(pl_module).__name__
        cett_specs = [f"{g}:input" for g in self.cett_modules]
        lists = [  # (argument, as the user wrote it, as tapped, whether it is the default)
            ("modules", self.zero_modules, self.zero_modules, self.zero_modules_are_default),
            ("cett_modules", self.cett_globs_as_written, cett_specs, False),
        ]
        unmatched = []
        for _, written, specs, _ in lists:
            specs_unmatched = unmatched_specs(pl_module, specs)
            unmatched.append([w for w, spec in zip(written, specs) if spec in specs_unmatched])
        for (argument, written, specs, default), missing in zip(lists, unmatched):
            if not specs or len(missing) < len(specs) or default:
                continue
            if argument == "modules":
                select_taps(pl_module, specs, owner=owner)  # matches nothing: raises its one line, closest names and all
            weights = {clean_name(n): w for n, m in pl_module.named_modules()
                       if (w := down_projection_weight(m)) is not None}
            close = [c for glob in written for c in difflib.get_close_matches(glob.replace("*", "0"), list(weights),
                                                                              n=3, cutoff=0.4)]
            # else layers that narrow, as a down-projection does (d_ff -> d_model): not a ViT's qkv or fc1
            narrowing = [n for n, w in weights.items() if w.dim() == 2 and w.shape[1] > w.shape[0]]
            shown = list(dict.fromkeys(close))[:3] or narrowing[:3] or list(weights)[:3]
            raise ModuleSelectionError(
                f"{owner}: cett_modules={written!r} matched no module of {model}; pass name globs of the MLP "
                f"down-projections (the layers the activations enter), e.g. {', '.join(map(repr, shown))}"
            )
        for (argument, written, specs, default), missing in zip(lists, unmatched):
            if missing:
                which = f"its default {argument}" if default else argument
                rank_zero_warn(
                    f"{owner}: {which} {missing} match nothing in {model}; only the other specs are tapped"
                    + (f" (pass {argument}=[...] to choose)" if default else ""),
                    category=UserWarning,
                )

    def fused_spec(self, tap_index: int) -> FusedSpec | None:
        return zero_spec(self.threshold) if tap_index in self._zero_taps else None

    def receive(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> None:
        """A tap that only counts zeros keeps the fused statistics of its first activation in the step until the
        logging step, where :meth:`complete_partials` turns those of every tap into partials with one stacked copy
        (a copy per tap in the forward otherwise: the fused sums are shared with the other monitors of the tap)."""
        zero_only = tap_index in self._zero_taps and self.temporal_dim is None and tap_index not in self._cett_linear
        if fused is not None and zero_only and self.keep(tap_index, fused):
            return
        super().receive(tap_index, x, fused)

    def complete_partials(self) -> None:
        kept: dict[int, FusedStats] = self.take_kept()
        if kept:
            stacked = zero_partials_stacked(list(kept.values()), self.threshold)
            for tap_index, sums in zip(kept, stacked.unbind()):
                self.accumulate(tap_index, Partials(sums=sums))

    def _has_time_axis(self, x: torch.Tensor) -> bool:
        """Whether the sample-first ``x`` has two steps or more along ``temporal_dim`` and that axis is not its sample
        axis, which a negative ``temporal_dim`` can name (-3 of a 3-axis output: change across examples, reading like
        a time statistic). Without one, ``temporal_frac`` is unknown at the step, said once with the cause: refused in
        the forward hook, a tap first run after hours of training would have ended the fit."""
        assert self.temporal_dim is not None
        return has_time_axis(x, self.temporal_dim) and self.temporal_dim % x.dim() != 0

    def partials(self, tap_index: int, x: torch.Tensor, fused: FusedStats | None = None) -> Partials:
        parts = []
        if tap_index in self._zero_taps:
            parts.append(zero_partials(x, self.threshold) if fused is None else zero_partials_from(fused, self.threshold))
            if self.temporal_dim is not None:
                # the same layout on every rank and step (the reduction adds them): no pair where there is no time axis
                if self._has_time_axis(x):
                    parts.append(temporal_partials(x, self.temporal_dim, self.temporal_eps))
                else:
                    parts.append(x.new_zeros(len(TEMPORAL_SUMS), dtype=torch.float64))
        linear = self._cett_linear.get(tap_index)
        if linear is not None:
            weight = down_projection_weight(linear)
            grid = cett_grid(weight, self.cett_grid_size, *self.cett_grid_range)
            self._cett_grid[tap_index] = grid
            parts.append(cett_partials(self._cett_rows(x.reshape(-1, x.shape[-1])), weight, grid))
        return Partials(sums=parts[0] if len(parts) == 1 else torch.cat(parts))

    def _cett_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """At most ``cett_max_tokens`` of the ``(N, d)`` tokens, the same ones for every step of that N."""
        key = (tokens.shape[0], tokens.device)
        if key not in self._cett_row_index:
            index = spread_row_index(tokens.shape[0], self.cett_max_tokens)
            self._cett_row_index[key] = None if index is None else index.to(tokens.device)
        index = self._cett_row_index[key]
        return tokens if index is None else tokens.index_select(0, index)

    def summarize_taps(
        self, taps: list[int], sums: dict[int, torch.Tensor], maxima: dict[int, torch.Tensor],
        samples: dict[int, torch.Tensor],
    ) -> list[tuple[list[int], list[str], torch.Tensor]] | None:
        """The zero fractions of every tap at once, when the taps hold nothing else (no temporal sparsity, no
        CETT); else None (:meth:`summarize` per tap)."""
        if self.temporal_dim is not None or any(i not in self._zero_taps or i in self._cett_linear for i in taps):
            return None
        names, values = zero_fraction_stacked(torch.stack([sums[i] for i in taps]))
        return [(taps, names, values)]

    def summarize(
        self, tap_index: int, sums: torch.Tensor, maxima: torch.Tensor | None, samples: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        stats: dict[str, torch.Tensor] = {}
        offset = 0
        if tap_index in self._zero_taps:
            offset = len(ZERO_SUMS)
            stats.update(zero_fraction(sums[:offset]))
            if self.temporal_dim is not None:  # unknown (NaN, not logged) for a step without consecutive pairs
                stats["temporal_frac"] = temporal_fraction(sums[offset : offset + len(TEMPORAL_SUMS)])
                offset += len(TEMPORAL_SUMS)
        if tap_index in self._cett_linear:
            grid = self._cett_grid.get(tap_index)
            if grid is None:
                weight = down_projection_weight(self._cett_linear[tap_index])
                grid = cett_grid(weight, self.cett_grid_size, *self.cett_grid_range)
            stats.update(cett_threshold(sums[offset:], grid, self.target_cett))
            stats[MEASURED] = (sums[offset] > 0).to(torch.float64)  # no token: no CETT, rather than a NaN logged
        return stats
