"""ROC-AUC and AP of SAM, MF, ACE, CEM and Spectral-NN on the same held-out test scenes.

    python scripts/detectors_table.py                       # synthetic scenes, markdown table
    python scripts/detectors_table.py --path cube.hdr --mask-path gt.hdr --crop-size 32

The classical detectors get background statistics (μ, Σ, R) from the training scenes' background
pixels and the target spectrum t as the mean of the training target pixels, on the raw spectra;
Spectral-NN is trained briefly on the same training scenes (standardised per band). Every method
scores the test scenes' pixels and is evaluated with torchmetrics' binary ROC-AUC and AP.
Importable: :func:`detectors_table` returns the rows, :func:`markdown_table` formats them.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)

from lightning_act.data.hyperspectral import HyperspectralDataModule
from lightning_act.models.hsi_detectors import DETECTOR_NAMES, ClassicalDetectors
from lightning_act.tasks.spectral_detection import SpectralTargetDetection


def detectors_table(
    data_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    ridge: float = 1e-3,
    max_epochs: int = 30,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fit/train every method on the training scenes and score the test scenes.

    Returns one row per method, ``{"method", "roc_auc", "ap", "prevalence"}``, where
    ``prevalence`` is the test fraction of target pixels (the AP of a random ranking).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = HyperspectralDataModule(**(data_kwargs or {}))
    datamodule.setup("fit")
    labels = datamodule.test_labels.long()
    prevalence = float(labels.float().mean())

    background = datamodule.train_pixels[datamodule.train_labels == 0]
    target = datamodule.train_pixels[datamodule.train_labels == 1].mean(0)
    detectors = ClassicalDetectors(ridge=ridge).fit(background, target)
    scores = {name: score.float() for name, score in detectors(datamodule.test_pixels).items()}

    model = SpectralTargetDetection(in_bands=datamodule.num_bands, **(model_kwargs or {}))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    trainer.fit(model, datamodule=datamodule)
    model.eval()
    with torch.no_grad():
        scores["Spectral-NN"] = model(datamodule.standardise(datamodule.test_pixels))

    rows = []
    for name in (*DETECTOR_NAMES, "Spectral-NN"):
        rows.append(
            {
                "method": name,
                "roc_auc": float(binary_auroc(scores[name], labels)),
                "ap": float(binary_average_precision(scores[name], labels)),
                "prevalence": prevalence,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (ROC-AUC and AP to three decimals)."""
    lines = ["| method | ROC-AUC | AP |", "|---|---:|---:|"]
    lines += [f"| {row['method']} | {row['roc_auc']:.3f} | {row['ap']:.3f} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="ENVI .hdr or .mat cube (default: synthetic scenes)")
    parser.add_argument("--mask-path", default=None, help="ground-truth mask (.hdr, .mat or .npy)")
    parser.add_argument("--cube-key", default=None, help="variable name of the cube in a .mat file")
    parser.add_argument("--mask-key", default=None, help="variable name of the mask in a .mat file")
    parser.add_argument("--target-values", type=int, nargs="*", default=None, help="mask values that are targets")
    parser.add_argument("--crop-size", type=int, default=64, help="tile size when splitting a loaded cube")
    parser.add_argument("--num-scenes", type=int, default=8, help="synthetic scenes")
    parser.add_argument("--epochs", type=int, default=30, help="Spectral-NN training epochs")
    parser.add_argument("--ridge", type=float, default=1e-3, help="relative ridge on Σ and R")
    parser.add_argument("--loss", choices=["bce", "focal"], default="bce")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the MLP is too small to gain from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_kwargs = {
        "path": args.path,
        "mask_path": args.mask_path,
        "cube_key": args.cube_key,
        "mask_key": args.mask_key,
        "target_values": args.target_values,
        "crop_size": args.crop_size,
        "num_scenes": args.num_scenes,
        "seed": args.seed,
    }
    rows = detectors_table(data_kwargs, {"loss": args.loss}, ridge=args.ridge, max_epochs=args.epochs, seed=args.seed)
    print(markdown_table(rows))
    print(f"\ntest pixels: prevalence {rows[0]['prevalence']:.4f} (the AP of a random ranking)")


if __name__ == "__main__":
    main()
