"""Training-step time with all four monitors vs none, measured side by side in one run.

Three configurations are interleaved round by round (so drift and noise hit all of them alike):
no monitors, the four monitors at their default interval (every 50 optimizer steps), and the four
monitors with every step due. Each round fits a fresh copy of the same model for ``--warmup`` +
``--steps`` steps and keeps the mean step time of the last ``--steps`` (default 50: a window that holds
exactly one due step of the default interval, so its cost is amortised as in a real run; a shorter
window still times the every-step configurations fairly, but over-weights the default interval's one
due step by 50 / steps). Each round's times are divided by
that round's time without monitors, and the printed ratio is the median of those paired ratios
(robust to drift between rounds).

    python scripts/bench_monitor_overhead.py                    # ViT-S/16, batch 128, bf16 (GPU)
    python scripts/bench_monitor_overhead.py --small            # a CPU-sized ViT, fp32
    python scripts/bench_monitor_overhead.py --per-monitor      # also each monitor alone, and all but
                                                                # SensitiveNeurons, every step due
    python scripts/bench_monitor_overhead.py --model kat_small_patch16_224   # the same with a KAT model
    python scripts/bench_monitor_overhead.py --model lightning-demo-transformer --alternate --cutoff
                                                                # Lightning's demo language model; SeND's
                                                                # tracking forward cut at its last tap, or whole
    python scripts/bench_monitor_overhead.py --diagnose --rounds 0 # where the every-step cost goes (GPU)

``--alternate`` is for a noisy host (a shared CPU whose speed drifts by 15% between fits): within each fit the
monitors are due every other step, and each due step's time is divided by the time of the bare step right after
it, so drift cancels pair by pair. It prints the median of those ratios with a 95% bootstrap interval, for all four
monitors, all but SensitiveNeurons, and (``--per-monitor``) each alone and the floor of SensitiveNeurons' cost (a
whole forward of its tracking set, without gradients, at each due step: what any SeND checkpoint must run when its
tap is the last module, as for a ViT's penultimate features), and on
CUDA SensitiveNeurons alone and all four with ``SensitiveNeurons(cuda_graph=True)`` (its tracking pass replayed from
a CUDA graph). A due step costs what every step costs when every step is due, so this measures the every-step
overhead. ``--only 'name;name'`` keeps the rows so named, for a short device call.

    python scripts/bench_monitor_overhead.py --small --alternate --pairs 12 --rounds 2

``--end-of-step`` (with ``--alternate``) adds all but SensitiveNeurons and ActivationSparsity alone with their
statistics staged at the end of the due step, as before round 11, next to the same monitors staged before the
backward (the default since): on a GPU, the A/B of what staging saves. ``--overlap-spectra`` adds
DimensionalCollapse alone with ``overlap_spectra=False`` (its spectra solved before the backward, as before round
12) next to its default (on a CUDA stream of their own, beside the backward).

``--model lightning-demo-transformer`` trains Lightning's own demo language model (``lightning.pytorch.demos``: a
2-layer ``nn.Transformer``, width 200, and its vocabulary head, 33,278 words as for WikiText-2) on random tokens
(batch 32, 35 tokens), with ``SensitiveNeurons``' tracking forward run as ``pl_module(inputs, targets)``. ``--cutoff``
(with ``--alternate``) adds ``SensitiveNeurons`` alone with ``stop_after_taps=False`` (whole tracking forwards) next
to its default, which ends each tracking forward at the head's input after the first checkpoint.

``--diagnose`` fits once more with all four monitors every step and prints (a) every host sync raised inside
``lightning_act`` during the timed steps (``torch.cuda.set_sync_debug_mode``), by source line, (b) a
profile of 1 step: wall vs GPU-busy time and the top operators by GPU and by host time, and (c) the ATen operations
each monitor hook and the shared fused pass dispatch in 1 more step (on a GPU, host time and mostly launches).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import importlib.util
import random
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import lightning_act.capture.registry as registry_module
from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations, SensitiveNeurons
from lightning_act.callbacks.probe import ForwardFn, default_forward, probing
from lightning_act.stats.fused import fused_statistics

from _profiling import device_kernel_times


class StepTimer(pl.Callback):
    """Wall time from one training batch's start to the next's, synchronised on CUDA: forward, backward, optimizer
    and every callback hook in between, including the monitors' end-of-step reduction and logging (a timer that
    stopped in its own ``on_train_batch_end`` would miss the hooks of the callbacks after it)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now


class TrackingForward(pl.Callback):
    """The floor of ``SensitiveNeurons``' cost: at each step due every ``every_n_steps``, a whole forward of the
    tracking set in eval mode, without gradients, in the trainer's precision, with nothing tapped or kept: what a SeND
    checkpoint has to run, whatever computes the statistics, up to the last tap (since round 13 its forwards end
    there; for a ViT's penultimate features only the head comes after). The tracking inputs are moved to the device
    once, at fit start, as ``SensitiveNeurons`` does: a copy from pageable host memory at every due step would wait
    for the device's queue, a host sync that ``SensitiveNeurons`` does not make (before round 12 the floor made it)."""

    def __init__(self, every_n_steps: int, tracking: DataLoader, forward_fn: ForwardFn = default_forward) -> None:
        self.every_n_steps, self.tracking, self.forward_fn = every_n_steps, tracking, forward_fn
        self._batches: list[Any] = []
        self._due = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = [[t.to(pl_module.device) for t in batch] for batch in self.tracking]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._due = trainer.global_step % self.every_n_steps == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._due:
            return
        with probing(trainer, pl_module, pl_module.device):
            for batch in self._batches:
                self.forward_fn(pl_module, batch)


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


@dataclass
class Workload:
    """What every fit trains: a fresh module each time, its data, and how a probe runs the module on a batch."""

    make_module: Callable[[], pl.LightningModule]
    train: DataLoader
    val: DataLoader
    forward_fn: ForwardFn = default_forward


DEMO_TRANSFORMER = "lightning-demo-transformer"


def inputs_and_targets(pl_module: torch.nn.Module, batch: Any) -> Any:
    """The demo Transformer's forward: ``pl_module(inputs, targets)`` (its decoder reads the targets)."""
    return pl_module(*batch)


def demo_transformer_workload(steps: int, batch: int, device: str) -> Workload:
    """Lightning's ``LightningTransformer`` at its WikiText-2 vocabulary, on random tokens (35 per sequence, as the
    demo's ``bptt``) instead of its download."""
    from lightning.pytorch.demos import LightningTransformer

    class OfflineTransformer(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText-2; this benchmark brings its own tokens
            pass

    vocabulary = 33278
    base = OfflineTransformer(vocab_size=vocabulary)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocabulary, (2, batch, 35), generator=generator).to(device)
    return Workload(
        make_module=lambda: copy.deepcopy(base).to(device),
        train=DataLoader([(tokens[0], tokens[1])] * steps, batch_size=None),
        val=DataLoader([(tokens[0][:32], tokens[1][:32])], batch_size=None),
        forward_fn=inputs_and_targets,
    )


MONITORS = (ActivationSparsity, MassiveActivations, DimensionalCollapse, SensitiveNeurons)
DEFAULT_INTERVAL = 50  # every monitor's default every_n_steps


def read_at_step_end(cls: type) -> type:
    """``cls`` with its statistics staged at the end of the due step, as before round 11 (the host read then waits
    for the step's backward and optimizer step): the A/B of ``--end-of-step``."""
    return type(f"{cls.__name__}AtStepEnd", (cls,), {"stages_before_backward": lambda self, trainer: False})


def monitors(
    every_n_steps: int | None, chosen: tuple[type, ...] | None = None, forward_fn: ForwardFn = default_forward,
    **sensitive: Any,
) -> list[pl.Callback]:
    """The monitors of ``chosen`` (default: all four) at ``every_n_steps``, or none; ``SensitiveNeurons`` runs its
    tracking forward with ``forward_fn`` and takes ``sensitive`` as further arguments."""
    if every_n_steps is None:
        return []
    custom = {} if forward_fn is default_forward else {"forward_fn": forward_fn}
    return [
        cls(every_n_steps=every_n_steps, **(custom | sensitive if cls is SensitiveNeurons else {}))
        for cls in MONITORS if chosen is None or cls in chosen
    ]


#: The configurations whose fit failed (the run goes on; it exits 1 at the end).
FAILED: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized ViT (img 32, patch 4, dim 192, depth 6)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per fit (50 holds one default-interval due step)")
    parser.add_argument("--model", default="vit_small_patch16_224",
                        help="timm model name (lightning_act.models registers the KAT ones, e.g. kat_small_patch16_224), "
                             f"or {DEMO_TRANSFORMER!r}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-monitor", action="store_true",
                        help="also time each monitor alone, and all but SensitiveNeurons, every step due")
    parser.add_argument("--alternate", action="store_true",
                        help="monitors due every other step; ratio of each due step to the bare step after it")
    parser.add_argument("--pairs", type=int, default=12, help="timed (due, bare) pairs per fit with --alternate")
    parser.add_argument("--overlap-spectra", action="store_true",
                        help="--alternate: also DimensionalCollapse alone with overlap_spectra=False, next to its default")
    parser.add_argument("--end-of-step", action="store_true",
                        help="--alternate: also all but SensitiveNeurons and ActivationSparsity alone with their "
                             "statistics staged at the end of the step (as before round 11), for the A/B")
    parser.add_argument("--cutoff", action="store_true",
                        help="--alternate: also SensitiveNeurons alone with stop_after_taps=False, next to its default")
    parser.add_argument("--only", default=None,
                        help="--alternate: keep only these configurations (their row names separated by ';', e.g. "
                             "'all four;SensitiveNeurons alone'), for a short device call")
    parser.add_argument("--diagnose", action="store_true", help="host syncs and a profile of the every-step config")
    parser.add_argument("--diagnose-only", default=None, choices=[cls.__name__ for cls in MONITORS],
                        help="diagnose this monitor alone (default: all four)")
    args = parser.parse_args()
    import timm

    import lightning_act.models  # noqa: F401 - registers the KAT models with timm

    cuda = torch.cuda.is_available()
    if args.small:
        model_kwargs: dict[str, Any] = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
        batch, image = args.batch_size or 32, 32
    elif args.model == DEMO_TRANSFORMER:
        model_kwargs, batch = {}, args.batch_size or 32
    else:
        model_kwargs, batch, image = {}, args.batch_size or 128, 224
    # the timer measures from one batch start to the next, so one batch more than the timed ones; with --alternate
    # the pairs start at the first due step (an even one) after the warm-up, so an odd warm-up takes one step more
    steps = args.warmup + (args.warmup % 2 + 2 * args.pairs if args.alternate else args.steps) + 1
    precision = "bf16-mixed" if cuda else "32-true"
    device = "cuda" if cuda else "cpu"
    if args.model == DEMO_TRANSFORMER:
        workload = demo_transformer_workload(steps, batch, device)
    else:
        base = Classifier(timm.create_model(args.model, pretrained=False, num_classes=100, **model_kwargs))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, image, image, generator=generator).to(device)
        y = torch.randint(0, 100, (batch,), generator=generator).to(device)
        # The same ready-made batch every step, already on the device (batch_size=None: no collation, no copy), so
        # the bare step is the model's step: with a collated and copied (128, 3, 224, 224) batch the H100's bare step
        # was ~66 ms against ~29 ms of model (round 6), which shrinks every ratio's excess by half.
        workload = Workload(
            make_module=lambda: copy.deepcopy(base).to(device),
            train=DataLoader([(x, y)] * steps, batch_size=None),
            val=DataLoader([(x[:32], y[:32])], batch_size=None),
        )

    configs: dict[str, tuple[int | None, tuple[type, ...] | None]] = {
        "none": (None, None), f"monitors @ default interval ({DEFAULT_INTERVAL})": (DEFAULT_INTERVAL, None),
        "monitors @ every step": (1, None),
    }
    if args.per_monitor:
        configs.update({f"{cls.__name__} alone @ every step": (1, (cls,)) for cls in MONITORS})
        # SensitiveNeurons' checkpoint is a forward pass of its tracking set, whatever the implementation
        configs["all but SensitiveNeurons @ every step"] = (1, tuple(c for c in MONITORS if c is not SensitiveNeurons))
    describe(args, cuda, precision, batch, model_kwargs)
    if args.diagnose:
        only = tuple(cls for cls in MONITORS if cls.__name__ == args.diagnose_only) or None
        diagnose(workload, precision, steps, args.warmup, only)
    if args.alternate:
        alternate(args, workload, precision, steps)
        return
    medians: dict[str, list[float]] = {name: [] for name in configs}  # mean step time per round
    for round_index in range(args.rounds):
        for name, (every, only) in configs.items():
            timer = StepTimer()
            trainer = pl.Trainer(
                accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_steps=steps,
                callbacks=[timer, *monitors(every, only, workload.forward_fn)], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            )
            trainer.fit(workload.make_module(), workload.train, workload.val)
            medians[name].append(statistics.fmean(timer.times[args.warmup :]))
            print(f"round {round_index}: {name:40s} {medians[name][-1] * 1e3:8.2f} ms/step", flush=True)
        report(medians, round_index + 1)


def alternate(args: argparse.Namespace, workload: Workload, precision: str, steps: int) -> None:
    """Fits whose monitors are due every other step: the ratio of each due step (even index) to the bare step after
    it, pooled over ``--rounds`` interleaved rounds; the median ratio and a 95% bootstrap interval of the median."""
    cuda = torch.cuda.is_available()
    but_sensitive = tuple(c for c in MONITORS if c is not SensitiveNeurons)
    forward_fn = workload.forward_fn
    configs: dict[str, Callable[[], list[pl.Callback]]] = {
        "all four": lambda: monitors(2, None, forward_fn), "all but SensitiveNeurons": lambda: monitors(2, but_sensitive),
    }
    if args.end_of_step:  # the A/B of staging before the backward (round 11), each next to its counterpart
        configs["all but SensitiveNeurons, at step end"] = lambda: [
            read_at_step_end(cls)(every_n_steps=2) for cls in but_sensitive
        ]
        configs["ActivationSparsity alone"] = functools.partial(monitors, 2, (ActivationSparsity,))
        configs["ActivationSparsity alone, at step end"] = lambda: [read_at_step_end(ActivationSparsity)(every_n_steps=2)]
    if args.overlap_spectra:  # DimensionalCollapse's spectra beside the backward, next to the default
        configs["DimensionalCollapse alone"] = functools.partial(monitors, 2, (DimensionalCollapse,))
        configs["DimensionalCollapse alone, not overlapped"] = lambda: [
            DimensionalCollapse(every_n_steps=2, overlap_spectra=False)
        ]
    if args.per_monitor:
        configs.update({f"{cls.__name__} alone": functools.partial(monitors, 2, (cls,), forward_fn) for cls in MONITORS})
    if args.per_monitor or args.cutoff:  # SensitiveNeurons' floor: a whole forward of its tracking set
        configs["tracking forward (floor)"] = lambda: [TrackingForward(2, workload.val, forward_fn)]
    if args.cutoff:  # SensitiveNeurons' tracking forwards ended at the last tap (its default), next to whole ones
        configs["SensitiveNeurons alone"] = functools.partial(monitors, 2, (SensitiveNeurons,), forward_fn)
        configs["SensitiveNeurons alone, whole forwards"] = functools.partial(
            monitors, 2, (SensitiveNeurons,), forward_fn, stop_after_taps=False
        )
    if args.per_monitor:
        if cuda:  # SensitiveNeurons' tracking pass replayed from a CUDA graph (cuda_graph=True), alone and with the rest
            configs["SensitiveNeurons alone, CUDA graph"] = functools.partial(
                monitors, 2, (SensitiveNeurons,), forward_fn, cuda_graph=True
            )
            configs["all four, CUDA graph"] = functools.partial(monitors, 2, None, forward_fn, cuda_graph=True)
        if cuda and importlib.util.find_spec("triton") is not None:  # "auto" is Triton here: eigvalsh side by side
            configs["DimensionalCollapse, eigvalsh (torch)"] = lambda: [
                DimensionalCollapse(every_n_steps=2, eigensolver="torch")
            ]
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(";")]
        unknown = [name for name in wanted if name not in configs]
        if unknown:
            raise SystemExit(f"--only: no configuration named {unknown}; these exist here: {list(configs)}")
        configs = {name: configs[name] for name in wanted}
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name, make_callbacks in configs.items():
            timer = StepTimer()
            trainer = pl.Trainer(
                accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_steps=steps,
                callbacks=[timer, *make_callbacks()], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            )
            try:
                trainer.fit(workload.make_module(), workload.train, workload.val)
            except Exception:  # one failing configuration (a candidate kernel) must not cost the others' rows
                # the innermost frames: where it raised (the outermost are this script's fit and Lightning's wrappers)
                print(f"round {round_index}: {name} FAILED:\n{traceback.format_exc(limit=-8)}", flush=True)
                FAILED.append(name)
                continue
            first = args.warmup + args.warmup % 2  # the first timed due step
            pairs = [timer.times[i] / timer.times[i + 1] for i in range(first, len(timer.times) - 1, 2)]
            ratios[name] += pairs
            print(f"round {round_index}: {name:40s} due/bare median {statistics.median(pairs):.3f} "
                  f"({len(pairs)} pairs, bare step {statistics.median(timer.times[first + 1 :: 2]) * 1e3:.1f} ms)", flush=True)
    print(f"every-step overhead from (due, bare) pairs, {args.rounds} round(s); implied at the default interval: one due "
          f"step in {DEFAULT_INTERVAL}, 1 + (median - 1) / {DEFAULT_INTERVAL} (the bare step of a pair has the monitors "
          f"attached, so a step that is not due is taken to cost what a step without monitors costs):")
    print(f"{'monitors':40s} {'median':>7s} {'95% interval':>16s} {'pairs':>6s} {'default interval, implied':>26s}")
    for name, values in ratios.items():
        if not values:
            print(f"{name:40s} failed (see above)", flush=True)
            continue
        low, high = bootstrap_median_interval(values)
        median = statistics.median(values)
        implied = [1 + (value - 1) / DEFAULT_INTERVAL for value in (median, low, high)]
        print(f"{name:40s} {median:7.3f}   [{low:.3f}, {high:.3f}] {len(values):6d} "
              f"{implied[0]:9.4f} [{implied[1]:.4f}, {implied[2]:.4f}]", flush=True)


def bootstrap_median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the median of ``values`` (seeded, so a rerun prints the same)."""
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active under one key: on a GPU each is at least a few
    microseconds of host time, and most are a kernel launch, so the count is what the host pays per step (the
    fused pass's own Triton launches are not ATen operations and are not counted; a hook that runs another
    counted one, such as a probe forward reaching the fused pass, counts its operations too)."""

    def __init__(self, counts: collections.Counter[str], key: str) -> None:
        super().__init__()
        self.counts, self.key = counts, key

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[self.key] += 1
        return func(*args, **(kwargs or {}))


class Diagnosis(pl.Callback):
    """From step ``start`` on: count host syncs raised under ``lightning_act`` frames for 3 steps, profile 1, then
    count the operations each monitor hook and the shared fused pass dispatch in 1 more."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.syncs: collections.Counter[str] = collections.Counter()
        self.profiler: torch.profiler.profile | None = None
        self._show = warnings.showwarning
        self.wall = 0.0
        self.host: collections.Counter[str] = collections.Counter()  # seconds per (monitor, hook) in the 3 steps
        self.counting = False
        self.ops: collections.Counter[str] = collections.Counter()  # operations per (monitor, hook) in 1 step
        self.counting_ops = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:
            if callback is self or not hasattr(callback, "receive"):
                continue
            for method in ("receive", "on_train_batch_start", "on_train_batch_end", "on_before_backward"):
                setattr(callback, method, self._timed(f"{type(callback).__name__}.{method}", getattr(callback, method)))
        registry_module.fused_statistics = self._timed("shared fused pass (capture)", fused_statistics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        registry_module.fused_statistics = fused_statistics

    def _timed(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.counting_ops:
                with OpCounter(self.ops, name):
                    return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.counting:
                    self.host[name] += time.perf_counter() - start
        return timed

    def _record(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "lightning_act/" in f.filename and "scripts/" not in f.filename]
        where = f"{frames[-1].filename.split('lightning_act/')[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames else None
        self.syncs[where or "outside lightning_act"] += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.start:
            self.counting = True
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
        if batch_idx == self.start + 3:
            self.counting = False
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            warnings.showwarning = self._show
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.wall = time.perf_counter()
        if batch_idx == self.start + 4 and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.wall
            self.profiler.__exit__(None, None, None)
        self.counting_ops = batch_idx == self.start + 4


def diagnose(
    workload: Workload, precision: str, steps: int, warmup: int, only: tuple[type, ...] | None = None
) -> None:
    """All four monitors (or ``only``) every step: host syncs inside lightning_act, then a 1-step profile."""
    cuda = torch.cuda.is_available()
    diagnosis = Diagnosis(start=min(warmup, steps - 6))
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_steps=steps, callbacks=[diagnosis, *monitors(1, only, workload.forward_fn)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(workload.make_module(), workload.train, workload.val)
    watched = "all four monitors" if only is None else ", ".join(cls.__name__ for cls in only)
    print(f"host syncs in 3 steps, {watched} every step (by the innermost lightning_act frame):")
    for where, count in diagnosis.syncs.most_common(20):
        print(f"  {count:5d}  {where}")
    print("host time per step in the monitors' hooks (mean of 3 steps; with sync debug on):")
    for name, seconds in diagnosis.host.most_common():
        print(f"  {seconds / 3 * 1e3:8.2f} ms  {name}")
    print("operations dispatched in 1 step, by monitor hook and in the shared fused pass:")
    for name, count in diagnosis.ops.most_common():
        print(f"  {count:6d}  {name}")
    if diagnosis.profiler is None:
        return
    events = diagnosis.profiler.key_averages()
    busy = sum(device_kernel_times(diagnosis.profiler.events())[0].values()) / 1e3
    print(f"profile of 1 step: wall {diagnosis.wall * 1e3:.1f} ms, GPU busy {busy:.1f} ms (sum of kernel times)")
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            print(events.table(sort_by=key, row_limit=25, max_name_column_width=70), flush=True)
        except (AttributeError, KeyError) as error:  # a profiler without that column
            print(f"(no {key} table: {error!r})")


def report(medians: dict[str, list[float]], rounds: int) -> None:
    """The table so far: median ms/step and median of the per-round ratios to no monitors."""
    print(f"after {rounds} round(s):")
    print(f"{'configuration':40s} {'ms/step':>9s} {'ratio':>7s}")
    for name, times in medians.items():
        ratios = [t / bare for t, bare in zip(times, medians["none"])]
        print(f"{name:40s} {statistics.median(times) * 1e3:9.2f} {statistics.median(ratios):7.3f}", flush=True)


def describe(args: argparse.Namespace, cuda: bool, precision: str, batch: int, model_kwargs: dict[str, Any]) -> None:
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"lightning {pl.__version__}, precision {precision}, batch {batch}, model {args.model} {model_kwargs or ('' if args.model == DEMO_TRANSFORMER else '(224, /16)')}, "
          f"{args.rounds} rounds of {args.warmup} + "
          f"{f'{args.pairs} (due, bare) step pairs' if args.alternate else f'{args.steps} steps'}", flush=True)


if __name__ == "__main__":
    main()
    if FAILED:  # the other rows were measured; the step still reads as failed
        print(f"FAILED configurations: {', '.join(dict.fromkeys(FAILED))}", flush=True)
        sys.exit(1)
