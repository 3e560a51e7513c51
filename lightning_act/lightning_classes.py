"""Lightning's classes from either of its packages: ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

The two packages hold the same classes twice, and ``isinstance`` tells them apart: a ``pytorch_lightning.Trainer``
hands the monitors its own LightningModule, loggers and callbacks, which a check against ``lightning.pytorch``'s
classes alone missed (layers built in ``configure_model`` went unmonitored; figures went to the logger's root
folder and never reached TensorBoard, W&B or MLflow).
"""

from __future__ import annotations

import importlib
import sys

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_classes(path: str) -> tuple[type, ...]:
    """The class ``path`` (e.g. ``"loggers.CSVLogger"``, ``"LightningModule"``) of ``lightning.pytorch`` and, when
    the process imported it, of ``pytorch_lightning``."""
    module_path, _, name = path.rpartition(".")
    classes = []
    for package in PACKAGES:
        if package == "pytorch_lightning" and package not in sys.modules:
            continue
        module = importlib.import_module(f"{package}.{module_path}" if module_path else package)
        classes.append(getattr(module, name))
    return tuple(classes)
