"""ATen operations and Triton launches each monitor dispatches in one due step, on this machine's CPU.

Why count: in issue 17's H100 rounds the statistics kernels were never among the busiest GPU kernels, and the
every-step cost of the monitors followed the number of small tensor operations they dispatched, each a few
microseconds of host time and mostly a kernel launch. Counts are deterministic, so a change to the capture core
can be checked on a laptop before a GPU is available, and two commits compare exactly. "With a kernel" leaves out
the operations that only make views or allocations.

``--gpu-path`` runs the code a CUDA run takes: the fused statistics go through the Triton path
(``lightning_act.stats.triton_fused``) with every Triton launch replaced by a no-op (``TRITON_INTERPRET=1`` lets
the launcher take CPU tensors; the outputs are then garbage and the values are not checked), and launches are
counted separately. Branches on ``tensor.is_cuda`` elsewhere still take their CPU side (``DimensionalCollapse``
sketches each weight where it is: 3 operations per weight here against 3 in all on a GPU; its eigensolver is
``eigvalsh`` here, the Triton eigensolver on an H100).

The model is a 12-block timm ViT (dim 192, image 32, patch 4) at batch 2: compute is negligible, so the host time
per hook printed next to the counts is mostly dispatch (a CPU's, slower or faster than a GPU host's; compare two
runs on one machine only). At batch 2 a tap has 130 rows (65 tokens each), fewer than ``DimensionalCollapse``'s
``max_rows`` (1024), so no rows are sampled; ``--batch-size 16`` (1040 rows) counts the sampling a ViT-S at batch
128 does (one ``randperm`` there is a sort: several launches on a GPU, counted here as one operation).

    OMP_NUM_THREADS=1 python scripts/count_monitor_ops.py                 # the CPU path
    OMP_NUM_THREADS=1 python scripts/count_monitor_ops.py --gpu-path      # the CUDA path, launches stubbed
    OMP_NUM_THREADS=1 python scripts/count_monitor_ops.py --gpu-path --by-source   # where each op comes from
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

STEPS = 12
COUNTED_STEP = 3
TIMED_FROM = 4
H100_SMS = 132  # what "auto" sees on an H100: its choice of eigensolver follows


# Operations that only make a tensor's metadata or an allocation: no kernel on a GPU (host time only).
NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "view", "_unsafe_view", "reshape", "detach", "alias", "slice", "select",
    "unbind", "unsqueeze", "squeeze", "transpose", "t", "permute", "expand", "as_strided", "split", "split_with_sizes",
    "chunk", "narrow", "diagonal", "lift_fresh",
}


def launches_kernel(op_name: str) -> bool:
    """Whether an ATen operation (``name.overload``) runs a kernel on a CUDA tensor."""
    return op_name.split(".")[0] not in NO_KERNEL


class _Counter(TorchDispatchMode):
    """Counts operations under ``key`` (with ``by_source``: under key, operation and innermost lightning_act line)."""

    def __init__(self, counts: collections.Counter[str], kernels: collections.Counter[str], key: str, by_source: bool) -> None:
        super().__init__()
        self.counts, self.kernels, self.key, self.by_source = counts, kernels, key, by_source

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        key = self.key
        if launches_kernel(func.__name__):
            self.kernels[key] += 1
        if self.by_source:
            frames = [f for f in traceback.extract_stack()[:-1] if "lightning_act/" in f.filename]
            where = f"{frames[-1].filename.split('lightning_act/')[-1]}:{frames[-1].lineno}" if frames else "?"
            key = f"{key} | {func.__name__} @ {where}"
        self.counts[key] += 1
        return func(*args, **(kwargs or {}))


class _Census(pl.Callback):
    """Wraps every monitor hook: counts the operations of step ``COUNTED_STEP``, times steps ``TIMED_FROM`` on."""

    def __init__(self, by_source: bool, launches: collections.Counter[str]) -> None:
        self.by_source = by_source
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()  # the operations that run a kernel on a GPU
        self.seconds: collections.Counter[str] = collections.Counter()
        self.launches = launches
        self.counting = self.timing = False
        self.current = ""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import lightning_act.capture.registry as registry_module

        for callback in trainer.callbacks:
            if callback is self or not hasattr(callback, "receive"):
                continue
            for method in ("receive", "on_train_batch_start", "on_before_backward", "on_train_batch_end"):
                name = f"{type(callback).__name__}.{method}"
                setattr(callback, method, self._wrap(name, getattr(callback, method)))
        registry_module.fused_statistics = self._wrap("shared fused pass", registry_module.fused_statistics)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            outer, self.current = self.current, name
            try:
                if self.counting:
                    with _Counter(self.ops, self.kernels, name, self.by_source):
                        return fn(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    if self.timing:
                        self.seconds[name] += time.perf_counter() - start
            finally:
                self.current = outer
        return wrapped

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.counting = batch_idx == COUNTED_STEP
        self.timing = batch_idx >= TIMED_FROM


def stub_triton_launches(launches: collections.Counter[str], census: list[_Census]) -> None:
    """Every Triton kernel of the fused statistics and the eigensolver launches nothing; launches are counted
    under the hook that made them (during the counted step)."""
    import triton.runtime.jit

    import lightning_act.stats.triton_eigen as eigen
    import lightning_act.stats.triton_fused as fused_kernels

    def counted(*args: Any, **kwargs: Any) -> None:
        if census and census[0].counting:
            launches[census[0].current] += 1

    for module in (fused_kernels, eigen):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.jit.KernelInterface):
                value.run = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-path", action="store_true", help="the CUDA code path, Triton launches stubbed")
    parser.add_argument("--by-source", action="store_true", help="also count by operation and lightning_act line")
    parser.add_argument("--monitors", default="ActivationSparsity,MassiveActivations,DimensionalCollapse,SensitiveNeurons")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (16: collapse samples its rows)")
    args = parser.parse_args()
    if args.gpu_path:
        if "lightning_act.stats.triton_fused" in sys.modules:
            raise SystemExit("count_monitor_ops: --gpu-path must set TRITON_INTERPRET before the kernels are defined")
        os.environ["TRITON_INTERPRET"] = "1"
    import timm
    from bench_monitor_overhead import Classifier  # scripts/ is on the path when this runs as a script

    import lightning_act.callbacks as callbacks
    import lightning_act.stats.fused as fused

    launches: collections.Counter[str] = collections.Counter()
    census: list[_Census] = []
    if args.gpu_path:
        import lightning_act.stats.spectrum as spectrum

        stub_triton_launches(launches, census)
        resolve = fused._resolve
        fused._resolve = lambda x, how: "triton" if x.dtype in fused._TRITON_DTYPES else resolve(x, how)
        spectrum_choice = spectrum.auto_eigensolver
        spectrum.auto_eigensolver = lambda device_type, count, width, _: spectrum_choice("cuda", count, width, H100_SMS)
    census.append(_Census(args.by_source, launches))
    names = [name.strip() for name in args.monitors.split(",") if name.strip()]
    monitors = [getattr(callbacks, name)(every_n_steps=1) for name in names]
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                              embed_dim=192, depth=12, num_heads=3)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, callbacks=[census[0], *monitors], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Classifier(model), DataLoader([(x, y)] * STEPS, batch_size=None), DataLoader([(x, y)], batch_size=None))
    path = "GPU path, Triton launches stubbed" if args.gpu_path else "CPU path"
    print(f"# count_monitor_ops ({path}): torch {torch.__version__}, {', '.join(names)} due every step, "
          f"12-block ViT at batch {args.batch_size}")
    totals: collections.Counter[str] = collections.Counter()
    for key, count in census[0].ops.items():
        totals[key.split(" | ")[0]] += count
    # On the GPU path the interpreter's launch wrapper runs around every stubbed launch: its time is not a GPU
    # host's, so only the counts are printed there.
    def host_ms(seconds: float) -> str:
        return "-" if args.gpu_path else f"{seconds / (STEPS - TIMED_FROM) * 1e3:.2f}"

    kernels = census[0].kernels
    print(f"{'hook':44s} {'ops':>6s} {'with a kernel':>14s} {'Triton launches':>16s} {'host ms/step':>13s}")
    for name in sorted(set(totals) | set(launches), key=lambda n: -totals[n]):
        print(f"{name:44s} {totals[name]:6d} {kernels[name]:14d} {launches[name]:16d} "
              f"{host_ms(census[0].seconds[name]):>13s}")
    print(f"{'total':44s} {sum(totals.values()):6d} {sum(kernels.values()):14d} {sum(launches.values()):16d} "
          f"{host_ms(sum(census[0].seconds.values())):>13s}")
    if args.by_source:
        for key, count in census[0].ops.most_common():
            if " | " in key:
                print(f"  {count:5d}  {key}")


if __name__ == "__main__":
    main()
