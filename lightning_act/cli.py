"""The ``lightning_act`` command.

``lightning_act fit|validate|test|predict --config recipes/X.yaml`` is a LightningCLI in
subclass mode (any LightningModule / LightningDataModule by ``class_path``); ``report`` and
``wandb-dashboard`` are the run-inspection commands. User errors (an unknown ``class_path``, a
missing data directory, a module pattern that matches nothing) are printed as one line that
names the problem and the fix, and the command exits with status 2.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_act.errors import DataNotFoundError, LightningActError, UnknownClassPathError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "report": ("lightning_act.report", "build a self-contained HTML report from a run directory"),
    "wandb-dashboard": ("lightning_act.report.wandb_dashboard", "create a W&B workspace with one section per monitor"),
}

USAGE = f"""usage: lightning_act [-h] {{{",".join(TRAINER_COMMANDS + tuple(TOOL_COMMANDS))}}} ...

Activation-research callbacks and models for PyTorch Lightning.

commands:
  fit                 train a model:   lightning_act fit --config recipes/kat.yaml
  validate            run one evaluation epoch on the validation set
  test                run one evaluation epoch on the test set (e.g. with --ckpt_path)
  predict             run inference on the prediction set
  report              {TOOL_COMMANDS["report"][1]}: lightning_act report RUN_DIR -o report.html
  wandb-dashboard     {TOOL_COMMANDS["wandb-dashboard"][1]}

`lightning_act COMMAND --help` lists every option of a command (Trainer, model, data, callbacks).
"""


def _config_paths(argv: Sequence[str]) -> Iterator[str]:
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            yield argv[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def _class_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield node["class_path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


def _import_problem(class_path: str) -> str | None:
    """Why ``class_path`` cannot be imported, or None if it can (or is a short name)."""
    if "." not in class_path:
        return None
    module_path, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_path)
    except ImportError as err:
        return f"cannot import module '{module_path}': {err}"
    if not hasattr(module, name):
        return f"module '{module_path}' has no attribute '{name}'"
    return None


def check_config_files(argv: Sequence[str]) -> None:
    """Fail fast, in one line, on a missing config file or a ``class_path`` that cannot be imported."""
    import yaml

    for path in _config_paths(argv):
        if not Path(path).is_file():
            raise DataNotFoundError(
                f"config file '{path}' does not exist; pass --config with an existing YAML file (see recipes/)"
            )
        with open(path) as handle:
            config = yaml.safe_load(handle)
        for class_path in _class_paths(config):
            problem = _import_problem(class_path)
            if problem is not None:
                raise UnknownClassPathError(
                    f"{path}: unknown class_path '{class_path}' ({problem}); check the spelling, "
                    "or install the package that provides it"
                )


@functools.cache
def _build_cli_class() -> type:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class LightningActCLI(LightningCLI):
        """LightningCLI in subclass mode that overwrites the saved config of a re-run."""

        def __init__(self, args: Sequence[str] | None = None) -> None:
            super().__init__(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=list(args) if args is not None else None,
            )

    return LightningActCLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning_act`` console script; returns the exit status."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    try:
        if argv[0] in TOOL_COMMANDS:
            tool = importlib.import_module(TOOL_COMMANDS[argv[0]][0])
            return int(tool.main(argv[1:]) or 0)
        if argv[0] not in TRAINER_COMMANDS:
            print(f"lightning_act: error: unknown command '{argv[0]}'; use one of "
                  f"{', '.join(TRAINER_COMMANDS + tuple(TOOL_COMMANDS))}", file=sys.stderr)
            return 2
        check_config_files(argv)
        _build_cli_class()(args=None if from_command_line else argv)
    except Exception as err:  # jsonargparse wraps errors raised while instantiating classes
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"lightning_act: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _user_error(err: BaseException) -> LightningActError | None:
    """The LightningActError behind ``err`` (itself, its cause or its context), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, LightningActError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def __getattr__(name: str) -> Any:
    """``LightningActCLI`` is built on first access, so ``--help`` does not import Lightning."""
    if name == "LightningActCLI":
        return _build_cli_class()
    raise AttributeError(name)
