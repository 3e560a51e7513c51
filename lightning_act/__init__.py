"""lightning_act: activation-research callbacks and models for PyTorch Lightning.

After ``import lightning_act``, ``timm.create_model("kat_tiny_patch16_224")`` works: the KAT models
are registered as soon as timm is imported (see ``_timm_registration``). Heavy libraries (timm,
Lightning, W&B, scipy, matplotlib) are imported only where used, so ``lightning_act --help`` is quick.
"""

from __future__ import annotations

from lightning_act._timm_registration import register_kat_with_timm

register_kat_with_timm()

__version__ = "0.1.0"

__all__ = ["__version__"]
