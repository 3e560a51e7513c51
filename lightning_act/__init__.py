"""lightning_act: activation-research callbacks and models for PyTorch Lightning.

Importing the package registers the KAT models with timm (so ``timm.create_model("kat_tiny_patch16_224")``
works after ``import lightning_act``); Lightning, W&B, scipy and matplotlib are imported only where used.
"""

from __future__ import annotations

import lightning_act.models.kat  # noqa: F401  (registers the KAT models with timm)

__version__ = "0.1.0"

__all__ = ["__version__"]
