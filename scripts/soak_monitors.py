"""Soak test: all four monitors every step for many steps; report memory growth (not a unit test).

    OMP_NUM_THREADS=1 python scripts/soak_monitors.py --steps 10000

Trains the tests' BlockNet on CPU with ActivationSparsity, MassiveActivations, DimensionalCollapse
and SensitiveNeurons at ``every_n_steps=1`` and samples the process's resident memory (RSS) every
``--sample_every`` steps. Prints the samples and the growth per 1000 steps from a least-squares line
over the second half (after warm-up), so a leak shows up as a clearly positive slope. Results go to
stdout and, if ``$OUT`` is set, to ``$OUT/soak_monitors.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _toy import BlockNet, ToyData, ToyTask  # noqa: E402

from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations, SensitiveNeurons  # noqa: E402


MONITORS = {cls.__name__: cls for cls in (ActivationSparsity, MassiveActivations, DimensionalCollapse, SensitiveNeurons)}


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemorySampler(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self.samples.append((trainer.global_step, rss_mib()))
            print(f"  step {trainer.global_step:>6}  RSS {self.samples[-1][1]:8.1f} MiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--sample_every", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.005,
                        help="SGD learning rate; the tests' 0.05 diverges to NaN after ~600 steps on this toy task")
    parser.add_argument("--monitors", nargs="+", default=list(MONITORS), choices=list(MONITORS),
                        help="which monitors to run (default: all four)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    sampler = MemorySampler(args.sample_every)
    monitors = [MONITORS[name](every_n_steps=1) for name in args.monitors]
    trainer = pl.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="soak_monitors_"),  # the monitors' end-of-fit plots go there
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[*monitors, sampler],
    )
    started = time.perf_counter()
    trainer.fit(ToyTask(BlockNet(), lr=args.lr), ToyData(batch_size=8, n=256))
    seconds = time.perf_counter() - started
    steps = np.array([s for s, _ in sampler.samples], dtype=float)
    rss = np.array([m for _, m in sampler.samples])
    half = len(steps) // 2
    if len(steps) - half >= 2:
        slope = np.polyfit(steps[half:], rss[half:], 1)[0] * 1000
        growth = f"RSS growth over the second half: {slope:.3f} MiB per 1000 steps"
    else:
        growth = f"RSS growth: not measured ({len(steps)} samples; run more --steps for a slope)"
    lines = [
        f"soak: {args.steps} steps, {' '.join(args.monitors)} every step, {seconds:.0f} s, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}",
        growth + (f" (first sample {rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB)" if len(rss) else ""),
    ]
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "soak_monitors.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
