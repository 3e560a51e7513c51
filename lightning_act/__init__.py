"""lightning_act: activation-research callbacks and models for PyTorch Lightning.

Importing the package registers the KAT models with timm; everything heavy is imported
lazily so that ``lightning_act --help`` stays quick.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
