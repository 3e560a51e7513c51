"""``lightning_act monitors``: the project's monitors, models, data modules and recipes, one line each.

Every class listed takes its short name on the command line (``--model ImageClassifier``,
``--trainer.callbacks+=ActivationSparsity``), because the CLI imports them before parsing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
from collections.abc import Iterator, Sequence
from pathlib import Path

#: recipes/ of the checkout the package runs from (the source tree, an editable install); a wheel has none beside it
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip() or "(no description)"


def _classes(package_name: str, base: type) -> Iterator[type]:
    """Public subclasses of ``base`` defined in ``package_name``'s modules, bases of others left out."""
    package = importlib.import_module(package_name)
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package_name}.{info.name}")
        except ImportError:
            continue
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, base) and cls.__module__ == module.__name__
                    and not name.startswith("_")):
                found[name] = cls
    bases = {b for cls in found.values() for b in cls.__mro__[1:]}
    yield from (cls for name, cls in sorted(found.items()) if cls not in bases)


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return "(no description)"


def catalog_lines() -> list[str]:
    """The listing printed by ``lightning_act monitors``."""
    from lightning.pytorch import LightningDataModule, LightningModule

    import lightning_act.callbacks as callbacks
    from lightning_act.checkpointing import LastCheckpoint
    from lightning_act.progress import EpochLineProgress

    def section(title: str, rows: list[tuple[str, str]]) -> list[str]:
        width = max((len(name) for name, _ in rows), default=0)
        return [title, *(f"  {name.ljust(width)}  {text}" for name, text in rows), ""]

    monitors = [getattr(callbacks, n) for n in callbacks.__all__ if n not in ("ActivationMonitor", "Partials")]
    lines = section("monitors (--trainer.callbacks+=NAME):", [(c.__name__, _summary(c)) for c in monitors])
    lines += section("other callbacks:", [(c.__name__, _summary(c)) for c in (LastCheckpoint, EpochLineProgress)])
    lines += section("models (--model NAME):",
                     [(c.__name__, _summary(c)) for c in _classes("lightning_act.tasks", LightningModule)])
    lines += section("data (--data NAME):",
                     [(c.__name__, _summary(c)) for c in _classes("lightning_act.data", LightningDataModule)])
    folder = recipe_folder()
    if folder is None:  # a wheel install run outside a checkout: the recipes are files of the source tree
        return lines + [
            "recipes: none here (this is an installed package; the recipes are the YAML files in recipes/ of the "
            "source tree: run lightning_act in a checkout (the folder holding recipes/), or pass --config with "
            "your copy)"
        ]
    cwd = Path.cwd()
    shown = folder.relative_to(cwd) if folder.is_relative_to(cwd) else folder  # what --config takes from here
    lines += section(f"recipes (lightning_act fit --config {shown}/NAME.yaml):",
                     [(p.stem, recipe_summary(p)) for p in sorted(folder.glob("*.yaml"))])
    return lines[:-1]


def recipe_folder() -> Path | None:
    """Where the recipes are: recipes/ of the checkout the package runs from, else ./recipes (a checkout or a copy
    of one, with the package installed from a wheel), the folder the README's ``--config recipes/...`` reads.
    A recipes/ beside an installed package is some other distribution's (site-packages/recipes), not ours."""
    beside = RECIPES if (RECIPES.parent / "pyproject.toml").is_file() else None
    for folder in (beside, Path.cwd() / "recipes"):
        if folder is not None and any(folder.glob("*.yaml")):
            return folder
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="lightning_act monitors", description="List the project's monitors, models, data modules and recipes."
    ).parse_args(argv)
    print("\n".join(catalog_lines()))
    return 0
