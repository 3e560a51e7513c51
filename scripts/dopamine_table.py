"""Dopamine vs baselines: rotated-digit accuracy (mean ± std over seeds) and trainable parameters.

For each seed: pretrain the foundation MLP on the 50/50 upright/45° mix, save its checkpoint, then
specialise it to 45° with every method in the same harness and test on the rotated test set.

    python scripts/dopamine_table.py --seeds 0 1 2 --foundation-epochs 30 --epochs 15
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.tasks.dopamine import METHODS, DopamineFoundation, DopamineSpecialisation


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
    seeds: list[int],
    methods: Sequence[str] = METHODS,
    foundation_epochs: int = 30,
    epochs: int = 15,
    hidden_sizes: list[int] = [128, 128],  # noqa: B006
    image_size: int = 16,
    max_samples: int | None = None,
    workdir: str | Path | None = None,
) -> dict[str, dict[str, list[float]]]:
    """``{method: {"acc": [per-seed rotated test accuracy], "params": [trainable counts]}}``."""
    results: dict[str, dict[str, list[float]]] = {m: {"acc": [], "params": [], "active": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for seed in seeds:
            pl.seed_everything(seed, workers=True, verbose=False)
            mix = RotatedDigitsDataModule("mix", "rotated", image_size=image_size, max_samples=max_samples, seed=seed)
            foundation = DopamineFoundation(image_size=image_size, hidden_sizes=hidden_sizes)
            trainer = _trainer(foundation_epochs, root)
            trainer.fit(foundation, datamodule=mix)
            ckpt = root / f"foundation_seed{seed}.ckpt"
            trainer.save_checkpoint(ckpt)
            for method in methods:
                pl.seed_everything(seed, workers=True, verbose=False)
                rotated = RotatedDigitsDataModule("rotated", "rotated", image_size=image_size, max_samples=max_samples, seed=seed)
                module = DopamineSpecialisation(str(ckpt), method=method)
                trainer = _trainer(epochs if method != "frozen" else 0, root)
                if method != "frozen":
                    trainer.fit(module, datamodule=rotated)
                metrics = trainer.test(module, datamodule=rotated, verbose=False)[0]
                results[method]["acc"].append(metrics["test/acc"])
                results[method]["params"].append(module.trainable_params)
                if "test/gate_active_fraction" in metrics:
                    results[method]["active"].append(metrics["test/gate_active_fraction"])
    return results


def _mean_std(values: list[float], signed: bool = False) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = round(statistics.fmean(values), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{mean:{'+' if signed else ''}.1f} ± {std:.1f}"


def markdown_table(results: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: method | rotated accuracy (mean ± std, %) | paired change vs frozen | parameters | gates firing.

    The seed also picks the data split, so the paired per-seed difference to the frozen
    foundation is the sharper comparison.
    """
    lines = [
        (
            "| method | rotated-45° test accuracy (%) | Δ vs frozen, same seed (points) | trainable parameters "
            "| hard gates firing (%) |"
        ),
        "|---|---|---|---|---|",
    ]
    frozen = results.get("frozen", {}).get("acc")
    for method, row in results.items():
        cells = [_mean_std([100.0 * a for a in row["acc"]])]
        cells.append(_mean_std([100.0 * (a - b) for a, b in zip(row["acc"], frozen)], signed=True) if frozen else "—")
        cells.append(f"{int(row['params'][0]):,}")
        cells.append(_mean_std([100.0 * a for a in row["active"]]) if row.get("active") else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--foundation-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*configure_optimizers.*")
    results = run_methods(
        args.seeds, args.methods, args.foundation_epochs, args.epochs, args.hidden_sizes, args.image_size, args.max_samples
    )
    table = markdown_table(results)
    print(table)
    return table


if __name__ == "__main__":
    main()
