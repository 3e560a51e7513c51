"""Dopamine vs baselines on rotated digits: paired differences to the frozen foundation over seeds, with intervals.

For each seed: pretrain a capacity-limited foundation MLP on the 50/50 upright/45° mix and measure
its upright and rotated test accuracy on the same test images (the 45° mode must be clearly worse,
or there is nothing to specialise); save its checkpoint; specialise it to 45° with every method in
the same harness and test on the rotated test split. The seed sets the data split and every
initialisation, so each method is compared with the frozen foundation of the same seed (paired).

    python scripts/dopamine_table.py                          # 5 seeds, bundled digits (~3 min on 2 cores)
    python scripts/dopamine_table.py --mnist-dir /data/mnist  # MNIST IDX files, if you have them
    python scripts/dopamine_table.py --quick                  # tiny smoke test
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.eval.intervals import format_interval, mean_interval
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation

# Row label -> (method, extra DopamineSpecialisation arguments).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dopamine": ("dopamine", {"gate_form": "independent"}),
    "dopamine-coupled": ("dopamine", {"gate_form": "coupled"}),
    # Diagnostic: the same training, tested with the smooth training gate instead of the hard one.
    "dopamine-smooth-test": ("dopamine", {"gate_form": "independent", "harden_at_test": False}),
    "frozen": ("frozen", {}),
    "full": ("full", {}),
    "lora": ("lora", {}),
    "ia3": ("ia3", {}),
}


def _trainer(epochs: int, root: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


def run_methods(
    seeds: Sequence[int],
    variants: Sequence[str] = tuple(VARIANTS),
    foundation_epochs: int = 30,
    epochs: int = 15,
    hidden_sizes: Sequence[int] = (8,),
    data_kwargs: dict[str, Any] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Per seed: the foundation's upright and rotated accuracy, and every variant's rotated accuracy.

    Returns ``{"foundation": {"upright": [...], "rotated": [...]}, "methods": {variant: {"acc": [...],
    "params": [...], "active": [...]}}, "test_images": n}`` (accuracies in [0, 1], one per seed).
    """
    data_kwargs = dict(data_kwargs or {})
    image_size = int(data_kwargs.get("image_size", 16))
    results: dict[str, Any] = {
        "foundation": {"upright": [], "rotated": []},
        "methods": {v: {"acc": [], "params": [], "active": []} for v in variants},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for seed in seeds:
            pl.seed_everything(seed, workers=True, verbose=False)
            mix = RotatedDigitsDataModule("mix", "rotated", seed=seed, **data_kwargs)
            foundation = DopamineFoundation(image_size=image_size, hidden_sizes=list(hidden_sizes))
            trainer = _trainer(foundation_epochs, root)
            trainer.fit(foundation, datamodule=mix)
            results["foundation"]["rotated"].append(trainer.test(foundation, datamodule=mix, verbose=False)[0]["test/acc"])
            upright = RotatedDigitsDataModule("mix", "upright", seed=seed, **data_kwargs)
            results["foundation"]["upright"].append(trainer.test(foundation, datamodule=upright, verbose=False)[0]["test/acc"])
            results["test_images"] = len(mix.test_set)
            ckpt = root / f"foundation_seed{seed}.ckpt"
            trainer.save_checkpoint(ckpt)
            for variant in variants:
                method, extra = VARIANTS[variant]
                pl.seed_everything(seed, workers=True, verbose=False)
                rotated = RotatedDigitsDataModule("rotated", "rotated", seed=seed, **data_kwargs)
                module = DopamineSpecialisation(str(ckpt), method=method, **extra)  # type: ignore[arg-type]
                trainer = _trainer(epochs if method != "frozen" else 0, root)
                if method != "frozen":
                    trainer.fit(module, datamodule=rotated)
                metrics = trainer.test(module, datamodule=rotated, verbose=False)[0]
                row = results["methods"][variant]
                row["acc"].append(metrics["test/acc"])
                row["params"].append(module.trainable_params)
                if "test/gate_active_fraction" in metrics:
                    row["active"].append(metrics["test/gate_active_fraction"])
    return results


def foundation_line(results: dict[str, Any]) -> str:
    """The capacity check: upright vs rotated accuracy of the foundation on the same test images."""
    upright, rotated = results["foundation"]["upright"], results["foundation"]["rotated"]
    gap = mean_interval([u - r for u, r in zip(upright, rotated)])
    if math.isnan(gap[1]):
        no_interval = "one seed gives" if len(upright) < 2 else "a seed without a finite accuracy leaves"
        verdict = f"{no_interval} no interval, so whether rotated is below upright is undecided"
    else:
        verdict = f"rotated is {'clearly below' if gap[1] > 0 else 'NOT clearly below (interval includes 0)'} upright"
    return (
        f"Foundation (50/50 mix): upright {format_interval(mean_interval(upright), 1, scale=100)} %, "
        f"rotated {format_interval(mean_interval(rotated), 1, scale=100)} %, upright − rotated "
        f"{format_interval(gap, 1, signed=True, scale=100)} points: {verdict}."
    )


def markdown_table(results: dict[str, Any]) -> str:
    """method | rotated accuracy | paired Δ vs frozen | trainable parameters | hard gates firing; mean [95 % CI] over seeds."""
    lines = [
        "| method | rotated-45° test accuracy (%) | Δ vs frozen, paired (points) | trainable parameters | hard gates firing (%) |",
        "|---|---|---|---|---|",
    ]
    methods = results["methods"]
    frozen = methods.get("frozen", {}).get("acc")
    for variant, row in methods.items():
        delta = mean_interval([a - b for a, b in zip(row["acc"], frozen)]) if frozen else None
        cells = [
            format_interval(mean_interval(row["acc"]), 1, scale=100),
            format_interval(delta, 1, signed=True, scale=100) if delta else "—",
            f"{int(row['params'][0]):,}",
            format_interval(mean_interval(row["active"]), 1, scale=100) if row["active"] else "—",
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[str]:
    """The paper's claims (better than frozen; below LoRA with fewer parameters), decided by paired 95 % intervals."""
    methods = results["methods"]
    if "frozen" not in methods or "dopamine" not in methods:
        return []

    def pairs(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(methods[a]["acc"], methods[b]["acc"])]

    def paired(a: str, b: str) -> tuple[float, float, float]:
        return mean_interval(pairs(a, b))

    def decide(interval: tuple[float, float, float], a: str, b: str) -> str:
        if math.isnan(interval[1]):  # the reason from the pairs decided (a method run with fewer seeds than another)
            no_interval = "one seed" if len(pairs(a, b)) < 2 else "a seed without a finite accuracy"
            return f"undecided ({no_interval}: no interval)"
        if interval[1] > 0:
            return "yes"
        return "no, it is lower" if interval[2] < 0 else "not separable (interval includes 0)"

    delta = paired("dopamine", "frozen")
    answer = decide(delta, "dopamine", "frozen")
    # Without an interval the claim is neither confirmed nor refuted.
    label = "REPRODUCED" if answer == "yes" else "UNDECIDED" if answer.startswith("undecided") else "NOT REPRODUCED"
    lines = [
        f"Paper claim 'Dopamine beats the frozen foundation on the rotated mode': {label} "
        f"({format_interval(delta, 1, signed=True, scale=100)} points, {answer})."
    ]
    if "lora" in methods:
        gap = paired("lora", "dopamine")
        lines.append(
            f"Paper claim 'somewhat below LoRA': LoRA − Dopamine {format_interval(gap, 1, signed=True, scale=100)} points "
            f"(LoRA better: {decide(gap, 'lora', 'dopamine')}); parameters {int(methods['dopamine']['params'][0]):,} vs "
            f"{int(methods['lora']['params'][0]):,}."
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--foundation-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[8], help="foundation widths (small = capacity-limited)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--test-fraction", type=float, default=0.35, help="held-out share (bundled digits only)")
    parser.add_argument("--mnist-dir", default=None, help="folder with MNIST IDX files (train-*/t10k-*, optionally .gz)")
    parser.add_argument("--max-samples", type=int, default=None, help="cap each source split (e.g. for MNIST on a CPU)")
    parser.add_argument("--quick", action="store_true", help="8x8 images, 150 samples, seeds 0 1, 1 epoch each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*configure_optimizers.*")
    seeds, foundation_epochs, epochs = args.seeds, args.foundation_epochs, args.epochs
    data_kwargs: dict[str, Any] = {
        "image_size": args.image_size,
        "test_fraction": args.test_fraction,
        "mnist_dir": args.mnist_dir,
        "max_samples": args.max_samples,
    }
    if args.quick:
        seeds, foundation_epochs, epochs = seeds[:2], 1, 1
        data_kwargs.update(image_size=8, max_samples=150)
    start = time.perf_counter()
    results = run_methods(seeds, args.methods, foundation_epochs, epochs, args.hidden_sizes, data_kwargs)
    report = "\n".join(
        [
            foundation_line(results),
            "",
            markdown_table(results),
            "",
            f"Seeds {seeds}; {results['test_images']} rotated test images per seed (one image = "
            f"{100 / results['test_images']:.2f} points); intervals: 95 % Student-t over seeds (paired for Δ).",
            *verdicts(results),
            f"Wall time {time.perf_counter() - start:.0f} s.",
        ]
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
