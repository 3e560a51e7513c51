"""The ``lightning_act`` command.

``lightning_act fit|validate|test|predict --config recipes/X.yaml`` is a LightningCLI in
subclass mode (any LightningModule / LightningDataModule by ``class_path``, or by the short
class name for the project's own classes: ``--model ImageClassifier``,
``--trainer.callbacks+=ActivationSparsity``); ``report``, ``wandb-dashboard`` and ``monitors``
are the run-inspection commands.

What the CLI adds to LightningCLI, so that every recipe (also a new one) gets it:

- every ``fit`` writes checkpoints atomically (:class:`~lightning_act.checkpointing.AtomicCheckpointIO`)
  and keeps ``last.ckpt`` current at each epoch end and at Ctrl-C
  (:class:`~lightning_act.checkpointing.LastCheckpoint`), unless the config sets its own;
- a ``fit`` without ``--ckpt_path`` refuses to overwrite a previous run's checkpoints or config
  (``--overwrite`` starts over: the previous run's checkpoints, config and CSV and TensorBoard version folders are
  removed, and what checkpoint writes cut short by a kill left, nothing else of the run folder; its checkpoints are the files
  the checkpoint callbacks' filename templates name, not other runs' files in their folders, and its config one that
  names this run's folders, not another recipe's in a W&B folder they share; it is refused beside ``--ckpt_path``,
  which resumes); a fit refused or stopped by Ctrl-C before its first step leaves no run in the way of the next;
- ``--trainer.enable_checkpointing false`` leaves the config's ``LastCheckpoint`` out;
- the fit's config is also kept in the CSV logger's version folder (``fit_config.yaml``) when LightningCLI saved
  ``config.yaml`` in another logger's folder, so ``lightning_act report`` shows it, and in the version folders of a
  later ``test``/``validate``/``predict``, so ``--overwrite`` removes them with the run;
- ``--ckpt_path`` must be a Lightning checkpoint of the configured model (for ``fit``, not a weights-only one);
  ``--ckpt_path last`` is the run's ``last.ckpt``, the model built from its hyper-parameters as for its path; one
  written from Python (no class recorded) gives the configured class its hyper-parameters; a remote one (an fsspec
  URL: s3://, gs://, ...) must exist, and the model is built from the config;
- ``limit_*_batches`` and ``overfit_batches`` given as an integer are a number of batches (``1`` is one batch;
  LightningCLI alone made it ``1.0``, every batch);
- LightningCLI's ``--optimizer`` and ``--lr_scheduler`` are refused in one line: every task builds its own
  optimizer groups and schedule (LightningCLI replaced them, silently, or with a traceback for STAN);
- ``num_threads: N`` (or ``--num_threads N``) pins ``torch.set_num_threads`` so CPU results do
  not depend on ``OMP_NUM_THREADS``, for that command only (:func:`main` puts the previous count back);
- with stdout not a terminal, progress is one plain line per epoch instead of a ``\\r`` bar;
- user errors (bad YAML, unknown or misspelled keys and options, wrong types, a missing file, an
  unusable accelerator, an output path the run cannot use, a full disk, a wrong checkpoint) are printed as one
  line that names the problem and the fix, with exit status 2. docs/errors.md lists them.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import importlib
import io
import os
import pkgutil
import re
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Union

from lightning_act._files import is_temporary_of, written_whole
from lightning_act.errors import ConfigError, DataNotFoundError, LightningActError, RunExistsError, UnknownClassPathError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "report": ("lightning_act.report", "one self-contained interactive HTML page comparing runs"),
    "wandb-dashboard": ("lightning_act.report.wandb_dashboard", "create a W&B workspace with one section per monitor"),
    "monitors": ("lightning_act.catalog", "list the project's monitors, models, data modules and recipes"),
}
OVERWRITE_FLAG = "--overwrite"
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself
# Trainer options that are a number of batches (an int) or a fraction of them (a float): LightningCLI's type for them
# tries float first (Lightning issue #21259: typing caches Optional[Union[int, float]] as Union[float, int, None]), so
# `limit_val_batches: 1` (one batch) became 1.0 (every batch)
BATCHES_OR_FRACTION = tuple(f"trainer.{name}" for name in (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches"))

USAGE = f"""usage: lightning_act [-h] {{{",".join(TRAINER_COMMANDS + tuple(TOOL_COMMANDS))}}} ...

Activation-research callbacks and models for PyTorch Lightning.

commands:
  fit                 train a model:   lightning_act fit --config recipes/kat.yaml
                      ({OVERWRITE_FLAG}: start over in a folder that holds a previous run)
  validate            run one evaluation epoch on the validation set
  test                run one evaluation epoch on the test set (e.g. with --ckpt_path)
  predict             run inference on the prediction set
  report              {TOOL_COMMANDS["report"][1]}: lightning_act report RUN [RUN ...] [-o OUT]
  wandb-dashboard     {TOOL_COMMANDS["wandb-dashboard"][1]}
  monitors            {TOOL_COMMANDS["monitors"][1]}

`lightning_act COMMAND --help` lists every option of a command (Trainer, model, data, callbacks).
"""

FIT_DESCRIPTION = (
    "Train a model. The project's classes take short names: --model ImageClassifier, "
    "--data ImageDataModule, --trainer.callbacks+=ActivationSparsity; `lightning_act monitors` lists "
    "them with one line each. --overwrite starts over in a folder that holds a previous run."
)

# Packages whose classes get short names on the command line (jsonargparse resolves a short name
# among the subclasses already imported).
SHORT_NAME_PACKAGES = ("lightning_act.tasks", "lightning_act.data")
SHORT_NAME_MODULES = ("lightning_act.checkpointing", "lightning_act.progress")


# ---------------------------------------------------------------------------------------------
# Config files: checked before LightningCLI sees them, for one-line YAML errors.


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
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f"; did you mean '{module_path}.{close[0]}'?" if close else ""
        return f"module '{module_path}' has no attribute '{name}'{hint}"
    return None


_RESERVED_START = re.compile(r"found character '([@`])' that cannot start any token")


def _load_yaml_strictly(path: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys; YAML errors become one ConfigError line."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{path}:{line}: duplicate key '{key}' (first at line {seen[key]}); YAML would keep only the last, "
                    "so delete one of them"
                )
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    text = Path(path).read_text()
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = err.problem or err.context or "malformed YAML"
        if "'\\t'" in problem:
            problem = "a tab character; YAML indents with spaces only, replace the tab with spaces"
        elif _RESERVED_START.search(problem):
            problem = (
                f"a value starts with '{_RESERVED_START.search(problem).group(1)}', which YAML reserves; quote the "
                'value, e.g. modules: "@activations"'
            )
        else:
            problem = f"malformed YAML: {problem}"
            if err.context and err.problem:
                problem += f" ({err.context})"
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None


TASK_OWNED_SECTIONS = ("optimizer", "lr_scheduler")


def _task_owned_refusal(option: str) -> ConfigError:
    return ConfigError(
        f"{option}: the models build their own optimizers (parameter groups without weight decay on norms and biases, "
        "STAN's two) and learning-rate schedules, so LightningCLI's --optimizer and --lr_scheduler are not taken; set "
        "the model's own arguments instead (--model.init_args.lr and weight_decay, and where the model has them "
        "warmup_steps, min_lr_ratio, critic_lr; `lightning_act fit --model.help CLASS` lists them)"
    )


def check_optimizer_options(argv: Sequence[str]) -> None:
    """Refuse LightningCLI's ``--optimizer`` / ``--lr_scheduler`` in one line: the CLI does not offer them (every task
    builds its optimizer groups and schedule itself), and LightningCLI replaced the task's ``configure_optimizers``
    with them, dropping the no-decay groups and the warm-up (STAN's two optimizers: a traceback)."""
    for arg in argv:
        option = arg.split("=", 1)[0]
        if option.startswith("--") and option[2:].split(".", 1)[0] in TASK_OWNED_SECTIONS:
            raise _task_owned_refusal(option)


def check_config_files(argv: Sequence[str]) -> None:
    """Fail fast, in one line, on a missing or malformed config file, an unimportable ``class_path`` or an
    ``optimizer:`` / ``lr_scheduler:`` section (see :func:`check_optimizer_options`) other than the ``null`` that
    every config saved by an earlier version (with LightningCLI's ``auto_configure_optimizers``) ends with, which the
    parser takes (``add_arguments_to_parser``)."""
    for path in _config_paths(argv):
        if not Path(path).is_file():
            raise DataNotFoundError(
                f"config file '{path}' does not exist; pass --config with an existing YAML file (see recipes/)"
            )
        config = _load_yaml_strictly(path)
        if config is not None and not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (trainer:, model:, data:), got a {type(config).__name__}")
        for section in TASK_OWNED_SECTIONS:
            if config is not None and config.get(section) is not None:
                raise _task_owned_refusal(f"{path}: the {section} section")
        for class_path in _class_paths(config):
            problem = _import_problem(class_path)
            if problem is not None:
                raise UnknownClassPathError(
                    f"{path}: unknown class_path '{class_path}' ({problem}); check the spelling, "
                    "or install the package that provides it"
                )


# ---------------------------------------------------------------------------------------------
# jsonargparse's multi-line parse errors as one line.

_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([\w.]+)' is not (?:accepted|expected)")
_EXPECTED = re.compile(r'Parser key "([\w.]+)":\s*\n\s*Expected a (.+?)\. Got value: (.*)')
# a string is first tried as a file path ("Expected a path but abc either not accessible"), then against the union
_UNION = re.compile(r'Parser key "([\w.]+)":\s*\n(?:\s*- Expected a path but [^\n]*\n)?\s*(?:- )?Does not validate '
                    r'against any of the Union subtypes\s*\n\s*Subtypes: \[(.*)\]')
# Argument types whose values are built in Python only: jsonargparse takes a string for them as an import path, a
# mapping as the class's init_args, neither of which makes one.
_PYTHON_ONLY_TYPES = {"<class 'torch.Tensor'>": "a tensor"}
_GIVEN = re.compile(r"Given value: (.*)")
_REQUIRED = re.compile(r"the following arguments are required: (.+)")
_SUBCOMMAND_OPTION = re.compile(r"Subcommand '(\w+)' does not accept option '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (.*)")
_DOT_PATH = re.compile(r'Parser key "([\w.]+)":.*?(?:Expected a dot import path string|Import path .*?): ?(\S+)', re.S)
_CLASS_BLOCK = re.compile(r"^( *)- Problem with given class_path '([\w.]+)':[^\n]*\n((?:\1 [^\n]*(?:\n|$)|[ \t]*(?:\n|$))*)", re.M)
# the implicit base class jsonargparse also tries for a command-line value: its "not accepted" is not the user's error
_BASE_CLASSES = {
    "lightning.Callback", "lightning.pytorch.Callback", "lightning.pytorch.callbacks.Callback",
    "lightning.pytorch.callbacks.callback.Callback", "lightning.LightningModule", "lightning.pytorch.LightningModule",
    "lightning.LightningDataModule", "lightning.pytorch.LightningDataModule",
}


def _split_types(text: str) -> list[str]:
    """``a, b[c, d], 'e'`` as ``['a', 'b[c, d]', "'e'"]``: split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and not text[max(i - 6, 0):i].endswith("<class"):
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


def _type_name(text: str) -> str:
    """One jsonargparse type as a user reads it: ``<class 'int'>`` as ``int``, ``collections.abc.Sequence[typing.Union[
    str, type]]`` as ``Sequence[str or type]``, ``Callable[[torch.nn.Module, Any], Any]`` as ``a callable (Module, Any)``."""
    if match := re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text):
        return "None" if match.group(1) == "NoneType" else match.group(1)
    name, bracket, args = text.partition("[")
    name = name.rsplit(".", 1)[-1]
    if not bracket:
        return "None" if name == "NoneType" else name
    args = _split_types(args.removesuffix("]"))
    if name == "Callable":
        params = _split_types(args[0][1:-1]) if args and args[0].startswith("[") else []
        return f"a callable ({', '.join(_type_name(p) for p in params)})" if args and args[0] != "..." else "a callable"
    if name in ("Union", "Optional"):
        return " or ".join(dict.fromkeys(_type_name(arg) for arg in args + (["NoneType"] if name == "Optional" else [])))
    if name == "Literal":
        return "one of " + ", ".join(args)
    return f"{name}[{', '.join(_type_name(arg) for arg in args)}]"


def _type_names(text: str) -> str:
    """``int or None`` from jsonargparse's type list; the values of ``Literal[...]`` types as ``one of 64, '32-true'``."""
    types = _split_types(text)
    is_literal = [bool(re.match(r"(?:typing\.)?Literal\[", t)) for t in types]
    literals = [value for t, lit in zip(types, is_literal) if lit for value in _split_types(t[t.index("[") + 1:-1])]
    words = [_type_name(t) for t, lit in zip(types, is_literal) if not lit]
    if literals:
        words.insert(0, "one of " + ", ".join(dict.fromkeys(literals)))
    if "str" in words and any(word.startswith("a callable") for word in words):  # the callable's import path
        words = [f"{word} or its import path 'package.module.function'" if word.startswith("a callable") else word
                 for word in words if word != "str"]
    return " or ".join(dict.fromkeys(words)) or text


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _init_parameters(class_path: str) -> list[str]:
    import inspect

    try:
        module_path, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_path), name)
        names: list[str] = []
        for klass in cls.__mro__:  # **kwargs forwarded to a base: its parameters count too
            params = inspect.signature(klass.__init__).parameters.values() if "__init__" in vars(klass) else []
            names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return list(dict.fromkeys(names))
    except Exception:  # a class jsonargparse already failed on: no suggestions
        return []


def _takes_var_keyword(class_path: str) -> bool:
    """Whether the class's ``__init__`` takes ``**kwargs`` (then any name may be one of its arguments; a wrong one
    fails when the model is built, in one line)."""
    import inspect

    try:
        module_path, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_path), name)
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    except Exception:
        return False


def _enclosing_class(scope: str, position: int) -> tuple[list[str], str | None]:
    """The class arguments nesting the error line at ``position`` inside a class's error block: their keys, outermost
    first, and the innermost one's class_path (``(['head'], 'mymods.Head')`` for a model's ``head`` class missing an
    argument; ``([], None)`` for the block's own class). jsonargparse indents each nested ``Parser key`` and
    ``Problem with given class_path`` line under its parent."""
    line_start = scope.rfind("\n", 0, position) + 1
    indent = len(scope[line_start:position]) - len(scope[line_start:position].lstrip(" -"))
    nesting: list[str] = []  # the lines the error line is nested in, outermost first
    for line in reversed(scope[:line_start].splitlines()):
        depth = len(line) - len(line.lstrip(" -"))
        if line.strip(" -") and depth < indent:
            nesting.insert(0, line.strip(" -"))
            indent = depth
    keys: list[str] = []
    inner_class = None
    for line in nesting:
        if key := re.match(r'Parser key "([\w.]+)":', line):
            keys.append(key.group(1))
        elif given := re.match(r"Problem with given class_path '([\w.]+)':", line):
            inner_class, inner_keys = given.group(1), list(keys)
    return (inner_keys, inner_class) if inner_class else ([], None)


def _python_only_note(subtypes: str) -> str:
    """What to do instead when a union's ``subtypes`` hold a type a config cannot give (see _PYTHON_ONLY_TYPES)."""
    types = _split_types(subtypes)
    what = next((_PYTHON_ONLY_TYPES[t] for t in types if t in _PYTHON_ONLY_TYPES), None)
    if what is None:
        return ""
    return f" ({what} is given in Python; leave it null in YAML)" if "<class 'NoneType'>" in types else (
        f" ({what} is given in Python, not in YAML)")


def _union_line(scope: str, match: re.Match, key: str, owner: str, class_path: str | None) -> str:
    """The line for the union ``match`` of the error ``scope``: the argument, the value given, the types expected."""
    line = scope[scope.rfind("\n", 0, match.end()) + 1:match.end()]
    indent = line[:len(line) - len(line.lstrip())]  # its own Given value, not that of a list item's union inside
    given = (re.compile(rf"^{indent}{_GIVEN.pattern}", re.M).search(scope, match.end())
             or _GIVEN.search(scope, match.end()))
    value = given.group(1).strip() if given else "?"
    inner, subtypes = match.groups()
    expected = f"expected {_type_names(subtypes)}{_python_only_note(subtypes)}"
    if class_path and inner != key:
        return f"{key}{owner}: {inner} = {value!r}: {expected}"
    return f"{inner} = {value!r}: {expected}"


def condense_parse_error(message: str, option_names: Sequence[str] = ()) -> str:
    """One line from a jsonargparse error: the key, the bad value, what is expected, a close name."""
    text = message.strip()
    if match := _SUBCOMMAND_OPTION.search(text):
        key = match.group(2)
        section = key.split(".", 1)[0]
        sections = {name.lstrip("-").split(".", 1)[0] for name in option_names}
        if section not in sections:
            return f"unknown section '{section}' (in '{key}'){_did_you_mean(section, sorted(sections))}"
        keys = [name.lstrip("-") for name in option_names]
        return f"unknown key '{key}'{_did_you_mean(key, keys)}"
    if match := _UNRECOGNIZED.search(text):
        given = [a for a in match.group(1).split() if a.startswith("-")] or match.group(1).split()
        given = [a for a in given if a not in TRAINER_COMMANDS] or given
        option = given[0].split("=", 1)[0] if given else match.group(1)
        close = _did_you_mean(option, option_names)
        return (f"unknown option '{option}'{close} (abbreviations are not accepted)" if close
                else f"unknown option '{option}'; `lightning_act fit --help` lists the options")
    key_match = re.search(r'Parser key "([\w.]+)"', text)
    key = key_match.group(1) if key_match else "?"
    # The error block of the class the user named: a command-line value is also tried on the implicit base class
    # (lightning.Callback), whose "not accepted" would hide the real error.
    blocks = [block for block in _CLASS_BLOCK.finditer(text) if block.group(2) not in _BASE_CLASSES]
    class_path = blocks[0].group(2) if blocks else None
    scope = blocks[0].group(3) if blocks else text
    owner = f" ({class_path.rsplit('.', 1)[-1]})" if class_path else ""
    if class_path and (problem := _import_problem(class_path)):  # same line as check_config_files gives for YAML
        return (f"{key}: unknown class_path '{class_path}' ({problem}); check the spelling, "
                "or install the package that provides it")
    unions = list(_UNION.finditer(scope))
    if python_only := [match for match in unions if _python_only_note(match.group(2))]:
        return _union_line(scope, python_only[-1], key, owner, class_path)
    if match := _NOT_ACCEPTED.search(scope):
        name = match.group(1)
        accepted = [a for a in _init_parameters(class_path) if a != name] if class_path else []
        hint = _did_you_mean(name, accepted) or (f"; accepted: {', '.join(accepted)}" if accepted else "")
        return f"{key}{owner}: unknown argument '{name}'{hint}"
    if class_path and (match := _REQUIRED.search(scope)):
        names = [name.strip() for name in match.group(1).split(",")]
        plural = "s" if len(names) > 1 else ""
        inner_keys, inner_class = _enclosing_class(scope, match.start())
        key, class_path = ".".join([key, *inner_keys]), inner_class or class_path
        owner = f" ({class_path.rsplit('.', 1)[-1]})"
        missing = f"{key}{owner}: missing required argument{plural} {', '.join(names)}"
        if not set(names) <= set(_init_parameters(class_path)):  # an option named after them would be refused
            return missing
        return (f"{missing}; add {' '.join(f'--{key}.{name} VALUE' for name in names)} after the class on the command "
                f"line, or init_args: {{{', '.join(f'{name}: ...' for name in names)}}} to it in the config")
    if match := _EXPECTED.search(scope):
        inner, expected, value = match.groups()
        if class_path and inner != key:
            return f"{key}{owner}: {inner} = {value!r}: expected {_type_names(expected)}"
        return f"{inner} = {value!r}: expected {_type_names(expected)}"
    if not class_path and (match := _DOT_PATH.search(text)):  # the class itself; not an argument's type alternative
        return (f"{match.group(1)} '{match.group(2)}': not a class name or import path of a known class "
                "(`lightning_act monitors` lists the project's classes)")
    if unions:  # the innermost: a class argument's own union, not the section's (model: a class or None)
        return _union_line(scope, unions[-1], key, owner, class_path)
    # the class's own block when there is one: the whole text starts with the other alternatives of a Union
    lines = [line.strip(" -") for line in scope.splitlines() if line.strip(" -")]
    useful = [line for line in lines if not line.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value"))]
    if class_path and useful:
        return f"{key}{owner}: " + "; ".join(useful[:3])
    return "; ".join(useful[:3]) if useful else text


def _union_errors(message: str) -> list[list[str]]:
    """jsonargparse's ``Errors:`` items, one per type it tried, each as its lines (the ``- `` line, then the indented
    lines under it, where the reason of a ``Problem with given class_path '...':`` line is)."""
    items: list[list[str]] = []
    indent = None
    for line in message.partition("Errors:")[2].splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:  # "Given value: ..." after the items
            break
        if depth == indent and line.lstrip().startswith("- "):
            items.append([line.strip()[2:]])
        elif items:
            items[-1].append(line.strip())
    return items


def condense_instantiation_error(message: str) -> str:
    """One line for a class whose constructor rejected its arguments (jsonargparse lists each type of a Union it
    tried: the line is the try that named a class, with its reason, e.g. a logger's missing package and its pip
    command, not the other types' "Not a valid subclass" / "Expected a <class 'bool'>")."""
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    kinds = subtypes.group(1) if subtypes else ""
    section = ("trainer.callbacks" if "Callback" in kinds else "data" if "DataModule" in kinds
               else "model" if "LightningModule" in kinds else "trainer.logger" if "Logger" in kinds else "config")
    items = _union_errors(message)
    for header, *reason in items:
        if (given := re.match(r"Problem with given class_path '([\w.]+)':", header)) and reason:
            cause = "; ".join(reason)
            missing = re.search(r"No module named '([\w.]+)'", cause)
            if missing and "pip install" not in cause:
                cause += f"; install the package that provides module '{missing.group(1)}'"
            return f"{section} ({given.group(1).rsplit('.', 1)[-1]}): {cause}"
    tried_other_types = ("Not a valid subclass", "Expected a <class")
    problems = [header for header, *_ in items if not header.startswith(tried_other_types)] or [
        header for header, *_ in items]
    problem = problems[0] if problems else message.strip().splitlines()[0]
    return f"{section}: {problem}"


# ---------------------------------------------------------------------------------------------
# The LightningCLI.


def _init_args(model: Any) -> dict[str, Any]:
    """A subclass-mode model's arguments as plain values, to compare the config's with a checkpoint's."""
    init_args = getattr(model, "init_args", None)
    return init_args.as_dict() if init_args is not None else {}


def _unique_files(paths: list[Path]) -> list[Path]:
    """Each file once, as first named: a LastCheckpoint and a ModelCheckpoint may share a folder, one relative and
    one absolute (Lightning makes a ModelCheckpoint's dirpath absolute)."""
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _checkpoint_name_pattern(callback: Any) -> re.Pattern[str]:
    """The paths, relative to its ``dirpath``, that a ``ModelCheckpoint``'s filename template and last-checkpoint name
    can produce (each ``{metric:fmt}`` as ``metric=<value>``, a "-vN" version, ".ckpt"): a template naming a metric
    with "/" puts its files in sub-folders, and other files under ``dirpath`` (another run's, in a sub-folder of its
    own) are none of this run's."""
    def template(filename: str) -> str:
        parts, position = [], 0
        for field in re.finditer(r"\{([^{}:]*)(?::[^{}]*)?\}", filename):
            parts.append(re.escape(filename[position:field.start()]))
            if callback.auto_insert_metric_name:
                parts.append(re.escape(field.group(1) + callback.CHECKPOINT_EQUALS_CHAR))
            parts.append("[^/]*")  # the formatted value
            position = field.end()
        return "".join(parts) + re.escape(filename[position:])

    default = "{epoch}" + callback.CHECKPOINT_JOIN_CHAR + "{step}"  # Lightning's name without a filename
    names = "|".join(template(name) for name in (callback.filename or default, callback.CHECKPOINT_NAME_LAST))
    version = re.escape(callback.CHECKPOINT_JOIN_CHAR) + r"v\d+"
    return re.compile(rf"(?:{names})(?:{version})?{re.escape(callback.FILE_EXTENSION)}")


def _run_places(config: Any) -> tuple:
    """Where a saved fit config (``config.yaml`` as YAML) writes its run: ``default_root_dir``, each logger's class
    and folder arguments, each callback's ``dirpath``."""
    trainer = config.get("trainer") if isinstance(config, dict) else None
    trainer = trainer if isinstance(trainer, dict) else {}

    def places(items: Any, keys: tuple[str, ...]) -> list[tuple]:
        items = items if isinstance(items, list) else [items]
        found = []
        for item in items:
            if isinstance(item, dict):
                args = item.get("init_args") or {}
                found.append((item.get("class_path"), *(args.get(key) for key in keys)))
        return found

    callbacks = [place for place in places(trainer.get("callbacks"), ("dirpath",)) if place[1] is not None]
    loggers = places(trainer.get("logger"), ("save_dir", "name", "version", "dir"))
    return trainer.get("default_root_dir"), loggers, callbacks


def _same_run(this: tuple, saved: tuple | None) -> bool:
    """Whether a saved config's :func:`_run_places` are this run's: the same run folder (``default_root_dir``) or a
    checkpoint folder in common, whatever its loggers (an edited recipe that gained or changed a logger writes the
    same run). Recipes sharing a logger's folder write runs of their own elsewhere."""
    if saved is None:
        return False
    if saved == this:
        return True
    return (this[0] is not None and saved[0] == this[0]) or bool(set(this[2]) & set(saved[2]))


def _saved_run_places(config: Path) -> tuple | None:
    """:func:`_run_places` of a saved fit config file; None where there is none, or it cannot be read as one."""
    import yaml

    try:
        saved = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return _run_places(saved) if isinstance(saved, dict) else None


def _killed_while_saving_its_config(folder: Path, names: Sequence[str]) -> bool:
    """Whether ``folder`` holds files, and nothing but what a fit killed while it saved its config leaves: configs
    (``names``) that cannot be read, the temporaries of their writes. That fit never trained (it saves its config before
    its first step): no checkpoint, no log, nothing of a run to keep or to tell whose it was."""
    found = False
    for path in folder.rglob("*"):  # up to the first other file: a run folder may hold many
        if path.is_file():
            if not any(is_temporary_of(path, name) or (path.name == name and _saved_run_places(path) is None)
                       for name in names):
                return False
            found = True
    return found


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """The file's inode and modification time (None where there is no file): tells whether it was rewritten."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


def _trainer_problem(err: Exception, accelerator: Any) -> str:
    """One line for a Trainer that cannot be built (most often an accelerator this machine lacks)."""
    message = " ".join(str(err).split())
    if accelerator not in (None, "auto", "cpu") and ("backend" in message or "not available" in message
                                                     or "can not run" in message):
        return (f"trainer.accelerator = '{accelerator}': no such device on this machine ({message}); "
                "use --trainer.accelerator cpu (or auto, which picks what is there)")
    return f"trainer: {message}"


def import_project_classes() -> None:
    """Import the project's LightningModules, data modules and callbacks so short names resolve."""
    import lightning_act.callbacks as callbacks

    for name in callbacks.__all__:
        getattr(callbacks, name)
    for module in SHORT_NAME_MODULES:
        importlib.import_module(module)
    for package_name in SHORT_NAME_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                try:
                    importlib.import_module(f"{package_name}.{info.name}")
                except ImportError:  # an optional dependency missing: that class keeps its full path only
                    pass


def run_folder(trainer: Any) -> Path:
    """The folder ``lightning_act report`` reads: the CSV logger's save_dir, else the log dir (every rank must call
    this: ``trainer.log_dir`` is a broadcast)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.save_dir).expanduser()  # "~/runs/x": Lightning's loggers write under $HOME
    return Path(trainer.log_dir or trainer.default_root_dir).expanduser()


def run_folder_line(trainer: Any, folder: Path) -> str:
    """The line a fit ends with: where its files are, and how to see them when a CSV log makes a report possible."""
    from lightning.pytorch.loggers import CSVLogger

    if any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
        return f"run folder: {folder}  (see it: lightning_act report {shlex.quote(str(folder))})"
    return f"run folder: {folder}  (no CSVLogger, so no report: add one to the trainer's loggers to see the run)"


@functools.cache
def _build_cli_class() -> type:
    import torch
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from lightning_act.checkpointing import (
        LAST_NAME,
        AtomicCheckpointIO,
        LastCheckpoint,
        check_resume_checkpoint,
        weights_from_checkpoint,
    )
    from lightning_act.errors import CheckpointMismatchError
    from lightning_act.progress import EpochLineProgress
    from lightning_act.report.runlog import FIT_CONFIG_NAME

    strict_parser = {"exit_on_error": True, "allow_abbrev": False}

    class SaveFitConfig(SaveConfigCallback):
        """Saves ``config.yaml`` where :func:`_log_dir` says, and also keeps it in each CSV and TensorBoard version
        folder it was not saved to, as ``fit_config.yaml``: LightningCLI saves ``config.yaml`` into the first logger's
        folder only, the report reads the CSV logger's, and ``--overwrite`` tells this run's version folders from other
        runs' in a shared root by it (``save_config`` is called on rank zero only, after ``config.yaml`` is
        written)."""

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            """LightningCLI's, but written whole (:func:`written_whole`: a kill mid-write leaves no half config, which
            the next fit would take for a previous run's) and into :func:`_log_dir` when the first logger keeps no
            local folder (MLflow with a server or database tracking URI): LightningCLI's asserts that
            ``trainer.log_dir`` is not None. An existing config is replaced: ``before_fit`` has refused a previous
            run's, or removed it under ``--overwrite``."""
            if self.already_saved:
                return
            log_dir = trainer.log_dir  # a broadcast: every rank asks
            if log_dir is not None and not _is_local_file_protocol(log_dir):
                super().setup(trainer, pl_module, stage)  # s3://, gs://, ...: jsonargparse writes it through fsspec
                return
            if trainer.is_global_zero:
                config = _log_dir(trainer) / self.config_filename
                config.parent.mkdir(parents=True, exist_ok=True)
                with written_whole(config) as partial:
                    self.parser.save(self.config, str(partial), skip_none=False, overwrite=True,
                                     multifile=self.multifile)
                self.save_config(trainer, pl_module, stage)
                self.already_saved = True
            self.already_saved = trainer.strategy.broadcast(self.already_saved)

        def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            keep_fit_config(trainer, _log_dir(trainer) / self.config_filename)

    def keep_fit_config(trainer: Trainer, saved: Path) -> None:
        """Copies the fit's config ``saved`` into each CSV and TensorBoard version folder of ``trainer`` but its own, as
        ``fit_config.yaml`` (on rank zero)."""
        for logger in trainer.loggers:
            has_versions = isinstance(logger, (CSVLogger, TensorBoardLogger))
            folder = Path(logger.log_dir).expanduser() if has_versions else None
            if folder is not None and folder != saved.parent and saved.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                with written_whole(folder / FIT_CONFIG_NAME) as partial:
                    shutil.copyfile(saved, partial)

    class KeepFitConfig(Callback):
        """For ``test``, ``validate`` and ``predict``, which save no config (the fit's ``config.yaml`` stays): the fit's
        config, kept in their CSV and TensorBoard version folders as ``fit_config.yaml``, ties those versions to the
        run, so that ``fit --overwrite`` removes them with it (the report would show a previous model's test metrics on
        the new run's page) and tells them from other recipes' in a shared root (the report gives a test to the run
        with a fit of that config)."""

        def __init__(self, fit_config: Path) -> None:
            self.fit_config = fit_config

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            if trainer.is_global_zero:  # after Lightning made the loggers' version folders
                keep_fit_config(trainer, self.fit_config)

    def remove_log_versions(logger: CSVLogger | TensorBoardLogger, folders: list[Path]) -> None:
        """A CSV or TensorBoard logger's version ``folders`` of this run, for ``--overwrite`` (TensorBoard would show
        the previous run's event files beside the new run's), and its root once empty. Never the root whole: with
        ``name: ''`` (or null) that is the ``save_dir``, the run folder of every logger and of the user's own files."""
        for folder in folders:
            shutil.rmtree(folder)
        root = Path(logger.root_dir).expanduser()
        # a symlink (to a folder on another disk) is the user's: kept
        if (root.is_dir() and root != Path(logger.save_dir).expanduser() and not root.is_symlink()
                and not any(root.iterdir())):
            root.rmdir()

    def remove_wandb_run(run_folder: Path) -> None:
        """A W&B run folder, the links into it in its ``wandb`` folder (``latest-run``, ``debug.log``,
        ``debug-internal.log``: they would dangle) and that folder once empty."""
        wandb_folder, inside = run_folder.parent, run_folder.resolve()
        for entry in wandb_folder.iterdir():
            target = entry.resolve() if entry.is_symlink() else None
            if target is not None and (target == inside or inside in target.parents):
                entry.unlink()
        shutil.rmtree(run_folder, ignore_errors=True)
        if not any(wandb_folder.iterdir()):
            wandb_folder.rmdir()

    class LightningActCLI(LightningCLI):
        """LightningCLI in subclass mode with fault-proof checkpoints and one-line errors."""

        def __init__(self, args: Sequence[str] | None = None, overwrite: bool = False) -> None:
            self.overwrite = overwrite
            self._config_at_fit_start: tuple[int, int] | None = None  # _file_stamp of the config when the fit began
            self._wandb_run_at_fit_start: Any = None  # a W&B run open in this process before the fit (an earlier one's)
            self._made_folders: list[Path] = []  # checkpoint folders this fit made, parents first
            super().__init__(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=SaveFitConfig,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,  # the tasks build their optimizers: see check_optimizer_options
                parser_kwargs={**strict_parser, **{c: dict(strict_parser) for c in TRAINER_COMMANDS},
                               "fit": {**strict_parser, "description": FIT_DESCRIPTION}},
                args=list(args) if args is not None else None,
            )

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--num_threads", type=int | None, default=None,
                help="torch.set_num_threads for this run: CPU results then do not depend on OMP_NUM_THREADS",
            )
            for section in TASK_OWNED_SECTIONS:  # check_config_files refuses any value but null
                parser.add_argument(
                    f"--{section}", type=Any, default=None,
                    help="not taken (the models build their own); null, which configs saved by earlier versions end "
                    "with, is accepted so that they can be re-used",
                )
            batches_or_fraction = Union[int, float, None]  # int first: 1 is one batch, 1.0 every batch
            for action in parser._actions:
                if action.dest in BATCHES_OR_FRACTION and hasattr(action, "_typehint"):
                    action._typehint = batches_or_fraction

        def parse_arguments(self, parser: Any, args: Any) -> None:
            captured = io.StringIO()
            try:
                with redirect_stderr(captured):
                    super().parse_arguments(parser, args)
            except SystemExit as exit_:
                text = captured.getvalue()
                if exit_.code in (0, None) or "error:" not in text:
                    sys.stderr.write(text)
                    raise
                message = text.rsplit("\nerror: ", 1)[-1].removeprefix("error: ")
                raise ConfigError(condense_parse_error(message, self._option_names(parser, args))) from None
            sys.stderr.write(captured.getvalue())

        @staticmethod
        def _option_names(parser: Any, args: Any) -> list[str]:
            argv = list(args) if args is not None else sys.argv[1:]
            sub = next((a for a in argv if a in TRAINER_COMMANDS), None)
            action = getattr(parser, "_subcommands_action", None)
            target = action._name_parser_map.get(sub, parser) if action is not None and sub else parser
            return [s for a in target._actions for s in a.option_strings if s.startswith("--")]

        def _parse_ckpt_path(self) -> None:
            """Check ``--ckpt_path`` in one line, ``last`` resolved to the run's file first: Lightning builds the model
            from a checkpoint file's hyper-parameters (not for an alias), so ``last`` and the file's path must both
            reach it as the file. Lightning replaces the config's model arguments silently: one warning line names
            those that differed."""
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and self.overwrite:  # one would undo the other (--overwrite was ignored)
                raise ConfigError(f"{OVERWRITE_FLAG} starts the run over and --ckpt_path resumes it; pass one of them")
            if ckpt_path in ("last", "best"):
                ckpt_path = self.config[subcommand]["ckpt_path"] = str(self._checkpoint_of_alias(subcommand, ckpt_path))
            if not ckpt_path or ckpt_path in LIGHTNING_CKPT_ALIASES or ckpt_path.startswith("registry:"):
                super()._parse_ckpt_path()
                return
            if not _is_local_file_protocol(ckpt_path):  # s3://, gs://, ...: Lightning reads it through fsspec
                try:
                    exists = get_filesystem(ckpt_path).exists(ckpt_path)
                except Exception as error:  # no filesystem package for the protocol (s3fs, gcsfs), no credentials
                    first_line = (str(error).splitlines() or [type(error).__name__])[0]
                    raise ConfigError(
                        f"--ckpt_path '{ckpt_path}' cannot be read ({type(error).__name__}: {first_line}); install the "
                        "fsspec package of its protocol (e.g. pip install s3fs) and check its credentials"
                    ) from None
                if not exists:
                    raise DataNotFoundError(f"--ckpt_path '{ckpt_path}' does not exist; pass an existing .ckpt file")
                return  # as LightningCLI: the model is built from the config, not from the remote file's hyper-parameters
            if not Path(ckpt_path).is_file():
                raise DataNotFoundError(f"--ckpt_path '{ckpt_path}' does not exist; pass an existing .ckpt file")
            model = self.config[subcommand].get("model")
            check_resume_checkpoint(ckpt_path, getattr(model, "class_path", None), fit=subcommand == "fit")
            given = _init_args(model)
            self._model_from_checkpoint(subcommand, ckpt_path, getattr(model, "class_path", None))
            used = _init_args(self.config[subcommand].get("model"))
            replaced = [f"{key}={value!r}, not {given[key]!r} as configured"
                        for key, value in used.items() if key in given and given[key] != value]
            if replaced and _is_rank_zero():
                print(f"lightning_act: warning: --ckpt_path {ckpt_path}: the model is built with the checkpoint's "
                      f"hyper-parameters ({'; '.join(replaced)}); other model arguments need a new fit",
                      file=sys.stderr, flush=True)

        def _model_from_checkpoint(self, subcommand: str, ckpt_path: str, configured: str | None) -> None:
            """LightningCLI's ``_parse_ckpt_path``: the model's arguments from the checkpoint's hyper-parameters. A
            checkpoint written from Python (``trainer.save_checkpoint``) names no class (LightningCLI records
            ``_class_path``): its hyper-parameters are then the configured class's arguments, when that class takes
            them all, else one line (LightningCLI parsed them against LightningModule, in a 13-line error)."""
            try:
                checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # more than tensors: LightningCLI's own load says why
                super()._parse_ckpt_path()
                return
            hparams = dict(checkpoint.get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            class_path = hparams.pop("_class_path", None)
            if class_path is None and configured is None:
                super()._parse_ckpt_path()
                return
            if class_path is None:
                accepted = _init_parameters(configured)
                takes_any = _takes_var_keyword(configured)
                unknown = [name for name in hparams if name not in accepted]
                if unknown and not takes_any:
                    raise CheckpointMismatchError(
                        f"--ckpt_path '{ckpt_path}' names no model class (written from Python, not by lightning_act) "
                        f"and its hyper-parameters name arguments the configured {configured.rsplit('.', 1)[-1]} does "
                        f"not take ({', '.join(unknown[:3])}); pass a checkpoint of this model, or the config of the "
                        "model the checkpoint holds"
                    )
                class_path = configured
            captured = io.StringIO()
            try:
                with redirect_stderr(captured):
                    self.config = self.parser.parse_object(
                        {subcommand: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}, self.config)
            except SystemExit:
                message = captured.getvalue().rsplit("\nerror: ", 1)[-1].removeprefix("error: ")
                raise ConfigError(f"--ckpt_path '{ckpt_path}': its hyper-parameters do not fit the model: "
                                  f"{condense_parse_error(message)}") from None
            sys.stderr.write(captured.getvalue())

        def _checkpoint_of_alias(self, subcommand: str, alias: str) -> Path:
            """``--ckpt_path last`` as the run's ``last.ckpt``, or one line. Lightning resolves "last" only among
            ``ModelCheckpoint`` callbacks and, without one, warns and starts from scratch (a fit then overwrites the
            previous run's ``last.ckpt``); "best" names the best checkpoint of a fit in the same process only."""
            if alias == "best":
                raise ConfigError(
                    "--ckpt_path best names the best checkpoint of a fit run in the same process; pass the .ckpt file "
                    "itself (see the run's checkpoints/ folder), or --ckpt_path last"
                )
            path = self._configured_last_path(subcommand)
            if not path.is_file():
                raise DataNotFoundError(
                    f"--ckpt_path last: there is no {path}; pass an existing .ckpt file, or run without --ckpt_path"
                )
            return path

        def _configured_last_path(self, subcommand: str) -> Path:
            """Where this config's fit writes ``last.ckpt``, as ``LastCheckpoint.path`` finds it on the Trainer (its
            dirpath, else the first ModelCheckpoint's, else ``<default_root_dir>/checkpoints``), before any class is
            built: Lightning reads the model's hyper-parameters from the file before it builds the model."""
            trainer = self.config[subcommand]["trainer"]
            callbacks = trainer.get("callbacks") or []
            savers = []
            for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
                module, _, name = callback.class_path.rpartition(".")
                dirpath = (callback.get("init_args") or {}).get("dirpath")
                savers.append((getattr(importlib.import_module(module), name), dirpath))
            last = next((dirpath for cls, dirpath in savers if issubclass(cls, LastCheckpoint)), None)
            beside = next((dirpath for cls, dirpath in savers if issubclass(cls, ModelCheckpoint) and dirpath), None)
            folder = last or beside or Path(trainer.get("default_root_dir") or os.getcwd()) / "checkpoints"
            return Path(folder).expanduser() / LAST_NAME

        def before_instantiate_classes(self) -> None:
            global _threads_before_run
            threads = self.config[self.subcommand].get("num_threads") if self.subcommand else None
            if threads is not None:
                if threads < 1:
                    raise ConfigError(f"num_threads = {threads}: expected a positive integer (or null to keep the default)")
                _threads_before_run = torch.get_num_threads()
                torch.set_num_threads(threads)

        def instantiate_classes(self) -> None:
            ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
            # with --ckpt_path every weight comes from the checkpoint: a model's initial-weights file (ImageClassifier's
            # checkpoint_path, recorded in the checkpoint's hyper-parameters) need not be there any more
            restoring = weights_from_checkpoint() if ckpt_path else contextlib.nullcontext()
            try:
                with restoring:
                    super().instantiate_classes()
            except ValueError as err:  # a constructor's own check, wrapped by jsonargparse
                if _user_error(err) is not None or "Errors:" not in str(err):
                    raise
                raise ConfigError(condense_instantiation_error(str(err))) from err

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            if self.subcommand != "fit":  # keep the fit's config.yaml: test/validate must not replace it
                self.save_config_callback = None
            else:
                plugins = kwargs.get("plugins") or []
                plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
                if not any(isinstance(p, CheckpointIO) for p in plugins):
                    kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
            self._drop_last_checkpoint_without_checkpointing()
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError, RuntimeError, TypeError) as err:
                if isinstance(err, LightningActError):
                    raise
                accelerator = self.config_init[self.subcommand]["trainer"].get("accelerator")
                raise ConfigError(_trainer_problem(err, accelerator)) from None
            _check_launcher(trainer)
            if getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver"):
                raise ConfigError(
                    f"--trainer.strategy {self.config_init[self.subcommand]['trainer'].get('strategy')} starts its "
                    "processes by pickling the Trainer, which holds this command line's config callback; pass "
                    "--trainer.strategy ddp (the same training, its processes started by running the command again)"
                )
            callbacks = trainer.callbacks
            if self.subcommand == "fit" and trainer.checkpoint_callback is not None:
                if not any(isinstance(c, LastCheckpoint) for c in callbacks):
                    callbacks.insert(len(callbacks), LastCheckpoint())
                for saver in callbacks:
                    if isinstance(saver, LastCheckpoint) and saver.dirpath is None:
                        # now, before Lightning puts a ModelCheckpoint without dirpath in the logger's new version
                        # folder: --ckpt_path last and --overwrite look for last.ckpt where the fit writes it
                        saver.dirpath = str(saver.path(trainer).parent)
                    if isinstance(saver, ModelCheckpoint) and trainer.fast_dev_run:
                        saver.save_last = False  # Lightning writes it at the end even under fast_dev_run
            if (trainer.progress_bar_callback is not None and not sys.stdout.isatty()
                    and type(trainer.progress_bar_callback).__module__.startswith("lightning.")):
                callbacks[callbacks.index(trainer.progress_bar_callback)] = EpochLineProgress()
            return trainer

        def _drop_last_checkpoint_without_checkpointing(self) -> None:
            """``--trainer.enable_checkpointing false`` leaves out the config's ``LastCheckpoint`` (every recipe lists
            one): Lightning refuses any checkpoint callback then, in a line that names a ModelCheckpoint."""
            trainer = self.config_init[self.subcommand]["trainer"]
            callbacks = trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kept = [c for c in callbacks if not isinstance(c, LastCheckpoint)]
            if trainer.get("enable_checkpointing") is False and len(kept) < len(callbacks):
                trainer["callbacks"] = kept
                rank_zero_info("enable_checkpointing is false: LastCheckpoint left out, so no last.ckpt is written")

        def _check_batch_size(self) -> None:
            batch_size = getattr(self.datamodule, "batch_size", None)
            if isinstance(batch_size, int) and batch_size < 1:
                raise ConfigError(f"data.batch_size = {batch_size}: expected a positive integer")

        def _previous_run_files(self) -> list[Path]:
            """The files of a run in the way: its checkpoints and config (not the temporaries of writes a kill cut
            short, which alone are no run: the fit removes them in its checkpoint folders, ``--overwrite`` in all; nor
            the half config of a fit killed while it saved it, alone in its folder: that fit never trained)."""
            found: list[Path] = []
            for callback in self.trainer.callbacks:
                if isinstance(callback, LastCheckpoint):
                    found += [p for p in [callback.path(self.trainer)] if p.is_file()]
                elif isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
                    dirpath, names = Path(callback.dirpath), _checkpoint_name_pattern(callback)
                    found += [path for path in sorted(dirpath.rglob("*.ckpt"))
                              if names.fullmatch(path.relative_to(dirpath).as_posix())]
            found += [config for config in self._saved_configs() if config.is_file() and self._records_this_run(config)
                      and not _killed_while_saving_its_config(config.parent, self._config_names())]
            return _unique_files(found)

        def _config_names(self) -> tuple[str, str]:
            """The names of the configs a fit saves: ``config.yaml`` where :func:`_log_dir` says, ``fit_config.yaml``
            in its other CSV and TensorBoard version folders."""
            return self.save_config_kwargs.get("config_filename", "config.yaml"), FIT_CONFIG_NAME

        def _config_file(self) -> Path | None:
            """Where this fit saves its config: :func:`_log_dir` (None when it saves none, as under fast_dev_run)."""
            if not any(isinstance(c, SaveConfigCallback) for c in self.trainer.callbacks):
                return None
            return _log_dir(self.trainer) / self.save_config_kwargs.get("config_filename", "config.yaml")

        def _saved_configs(self) -> list[Path]:
            """Where a previous fit of this config saved its config: where this fit saves it and, for a CSV or
            TensorBoard logger, the same place in each of its existing version folders (this fit's is a new
            ``version_N``, without the previous run's config)."""
            config = self._config_file()
            return self._configs_of_fits(config) if config is not None else []

        def _configs_of_fits(self, config: Path) -> list[Path]:
            """Where fits of this config saved their configs, oldest first: ``config`` (where :func:`_log_dir` says)
            and, for a CSV or TensorBoard first logger, the same place in each of its numbered version folders."""
            logger = _config_logger(self.trainer)
            if not isinstance(logger, (CSVLogger, TensorBoardLogger)):
                return [config]
            root = Path(logger.root_dir).expanduser()
            try:
                inside = config.relative_to(root).parts[1:]  # [sub_dir/]config.yaml under the version folder
            except ValueError:
                return [config]
            numbered = [folder for folder in root.glob("version_*") if re.fullmatch(r"version_\d+", folder.name)]
            versions = sorted(numbered, key=lambda folder: int(folder.name.removeprefix("version_")))
            return _unique_files([*(folder.joinpath(*inside) for folder in versions), config])

        def _records_this_run(self, config: Path) -> bool:
            """Whether ``config`` is this recipe's previous config, not another recipe's whose first logger shares the
            folder (one W&B save_dir for every run): it names the run folders this config names (loggers, checkpoint
            dirpaths, default_root_dir). One that cannot be read counts as this run's: refused rather than replaced."""
            saved = _saved_run_places(config)
            return saved is None or saved == self._this_run_places()

        def _this_run_places(self) -> tuple:
            import yaml

            parser = self._parser(self.subcommand)
            return _run_places(yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False)))

        def _fit_config_of_this_run(self) -> Path | None:
            """The config the latest fit of this run saved (:func:`_same_run` as this command's); None without one."""
            config = _log_dir(self.trainer) / self.save_config_kwargs.get("config_filename", "config.yaml")
            this = self._this_run_places()
            return next((saved for saved in reversed(self._configs_of_fits(config))
                         if saved.is_file() and _same_run(this, _saved_run_places(saved))), None)

        def _log_versions_of_this_run(self, logger: CSVLogger | TensorBoardLogger) -> tuple[list[Path], list[Path]]:
            """A CSV or TensorBoard logger's version folders (numbered ``version_N`` and its named version) that
            ``--overwrite`` removes: those holding a config of this run (its ``config.yaml``, or the ``fit_config.yaml``
            :class:`SaveFitConfig` and :class:`KeepFitConfig` keep; :func:`_same_run`) or no file at all; and those
            whose run cannot be told (files but no readable config): a root shared with other recipes (one TensorBoard
            logdir for every run) holds their version folders too."""
            root = Path(logger.root_dir).expanduser()
            if not root.is_dir():
                return [], []
            try:  # [sub_dir] of a TensorBoard logger, under the version folder
                inside = Path(logger.log_dir).expanduser().relative_to(root).parts[1:]
            except ValueError:
                inside = ()
            names = self._config_names()
            this = self._this_run_places()
            removable: list[Path] = []
            untold: list[Path] = []
            for folder in sorted(root.iterdir()):
                is_version = re.fullmatch(r"version_\d+", folder.name) or folder.name == logger.version
                if not folder.is_dir() or not is_version:
                    continue
                places = [_saved_run_places(folder.joinpath(*inside, name)) for name in names]
                # removing it loses nothing: no file, or what a fit killed while it saved its config left
                empty = not any(path.is_file() for path in folder.rglob("*"))
                if (any(_same_run(this, saved) for saved in places) or empty
                        or _killed_while_saving_its_config(folder, names)):
                    removable.append(folder)
                elif not any(places):
                    untold.append(folder)
            return removable, untold

        def _half_written_checkpoints(self) -> list[Path]:
            """What :class:`AtomicCheckpointIO` left of writes a kill cut short (``.<name>.ckpt.<random>.tmp``), in the
            checkpoint folders and a templated filename's sub-folders."""
            found: list[Path] = []
            for callback in self.trainer.callbacks:
                if isinstance(callback, LastCheckpoint):
                    found += callback.path(self.trainer).parent.glob(".*.ckpt.*.tmp")
                elif isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    dirpath, names = Path(callback.dirpath), _checkpoint_name_pattern(callback)
                    for temporary in dirpath.rglob(".*.ckpt.*.tmp"):
                        target = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", temporary.name)  # .<name>.<random>.tmp
                        written = temporary.parent / target.group(1) if target else None
                        if written is not None and names.fullmatch(written.relative_to(dirpath).as_posix()):
                            found.append(temporary)
            return _unique_files(found)

        def _remove_empty_folders(self, folder: Path) -> None:
            """The sub-folders a templated checkpoint filename made, once empty, up to its ``ModelCheckpoint.dirpath``."""
            roots = {Path(c.dirpath) for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
            while folder not in roots and any(root in folder.parents for root in roots) and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

        def before_fit(self) -> None:
            self._config_at_fit_start = self._config_stamp()
            wandb = sys.modules.get("wandb")  # WandbLogger goes on with a run still open in the process (an earlier fit's)
            self._wandb_run_at_fit_start = getattr(wandb, "run", None)
            self._check_batch_size()
            if not self.config["fit"].get("ckpt_path") and os.environ.get("LOCAL_RANK", "0") == "0":
                self._refuse_or_remove_previous_run()  # not when resuming, nor in a DDP child (rank 0 has checked)
            self._make_checkpoint_folders()

        def _config_stamp(self) -> tuple[int, int] | None:
            try:
                config = self._config_file()
            except OSError:  # a folder name the file system refuses: the fit's own config save says so
                return None
            return _file_stamp(config) if config is not None else None

        def _refuse_or_remove_previous_run(self) -> None:
            previous = self._previous_run_files()
            if previous and not self.overwrite:
                shown = ", ".join(str(p) for p in previous[:3]) + (" ..." if len(previous) > 3 else "")
                last = next((p for p in previous if p.name == "last.ckpt"), None)
                resume = f"resume it with --ckpt_path {shlex.quote(str(last))}, " if last else ""
                raise RunExistsError(
                    f"a previous run is in the way ({shown}); {resume}start over with {OVERWRITE_FLAG} "
                    "(removes its checkpoints, config and CSV and TensorBoard logs), or keep it and write this run "
                    "elsewhere (a copy of the recipe with its runs/ folder changed)"
                )
            versioned = [logger for logger in self.trainer.loggers
                         if isinstance(logger, (CSVLogger, TensorBoardLogger))]
            # before the configs that tell this run's version folders are removed
            log_versions = [(logger, *self._log_versions_of_this_run(logger)) for logger in versioned if previous]
            if not previous:  # the version folders of fits killed while they saved their config (they never trained)
                killed = [(logger, [folder for folder in self._log_versions_of_this_run(logger)[0]
                                    if _killed_while_saving_its_config(folder, self._config_names())])
                          for logger in versioned]
                log_versions = [(logger, folders, []) for logger, folders in killed if folders]
            if self.overwrite:
                for path in [*previous, *self._half_written_checkpoints()]:
                    path.unlink()
                    self._remove_empty_folders(path.parent)
            for logger, removable, _ in log_versions:
                remove_log_versions(logger, removable)
                logger._version = None  # chosen while looking for config.yaml; pick again
            untold = [str(folder) for _, _, folders in log_versions for folder in folders]
            if untold:
                print(f"lightning_act: warning: {OVERWRITE_FLAG} left {', '.join(untold[:3])}"
                      f"{' ...' if len(untold) > 3 else ''}: no config in it tells whether it is this run's or another "
                      "recipe's sharing the logger's folder; remove it yourself if it is this run's",
                      file=sys.stderr, flush=True)
            if not previous:
                self._warn_of_evaluations_before_the_fit()
            self._config_at_fit_start = self._config_stamp()  # --overwrite may have removed it

        def _warn_of_evaluations_before_the_fit(self) -> None:
            """Says once that a CSV logger folder without a fit holds ``test``/``validate`` versions (of a checkpoint
            evaluated with the recipe before any fit: no fit config to keep, so nothing ties them to a run): the
            report leaves them out of this run's page, and ``--overwrite`` cannot tell them from another recipe's."""
            from lightning_act.report.runlog import metrics_csv_logs_training, written_by_fit

            found: list[Path] = []
            for logger in self.trainer.loggers:
                root = Path(logger.root_dir).expanduser() if isinstance(logger, CSVLogger) else None
                logs = sorted(root.glob("*/metrics.csv")) if root is not None and root.is_dir() else []
                if logs and not any(metrics_csv_logs_training(log) or written_by_fit(log.parent) for log in logs):
                    found += [log.parent for log in logs]
            if found:
                print(f"lightning_act: warning: {', '.join(map(str, found[:3]))}{' ...' if len(found) > 3 else ''}"
                      ": test/validate version(s) written before any fit in their logger folder (of another "
                      "checkpoint); `lightning_act report` leaves them out of this run; remove or move them if they "
                      "are in the way",
                      file=sys.stderr, flush=True)

        def _make_checkpoint_folders(self) -> None:
            """The local checkpoint folders, now: a path the run cannot use there (a file in the way, a name too long,
            no permission) is one line before any training, not a traceback at the first save."""
            if self.trainer.fast_dev_run:  # which writes no checkpoint
                return
            for callback in self.trainer.callbacks:
                if isinstance(callback, LastCheckpoint):
                    folder = callback.path(self.trainer).parent
                elif isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    if not _is_local_file_protocol(callback.dirpath):
                        continue
                    folder = Path(callback.dirpath)
                else:
                    continue
                missing = [f for f in [folder, *folder.parents] if not f.exists() and not f.is_symlink()]
                folder.mkdir(parents=True, exist_ok=True)
                self._made_folders += [f for f in reversed(missing) if f not in self._made_folders]

        def _run_subcommand(self, subcommand: str) -> None:
            global _subcommand_started
            _subcommand_started = True
            try:
                super()._run_subcommand(subcommand)
            except BaseException as err:
                at_start = self.trainer.global_step == 0
                wandb_refusal = _wandb_refusal(err, _wandb_online(self.trainer)) if at_start else None
                refusal = _lightning_refusal(err) or wandb_refusal or self._full_disk_refusal(err)
                # a Ctrl-C (Lightning ends the fit with SystemExit) as much as a refusal or an unusable output path
                stopped = isinstance(err, (KeyboardInterrupt, SystemExit)) and self.trainer.interrupted
                ended_early = refusal or _user_error(err) or _unwritable_output(err) or stopped
                if subcommand == "fit" and ended_early and self.trainer.global_step == 0:
                    try:
                        self._remove_files_of_a_run_that_never_started()
                    except Exception as cleanup_error:  # never in the way of the user's own error line
                        print(f"lightning_act: could not remove the files of the refused run: {cleanup_error}",
                              file=sys.stderr)
                if refusal is not None:
                    raise refusal from err
                raise

        def _full_disk_refusal(self, err: BaseException) -> LightningActError | None:
            """One line naming the run's output folder with the least space left, for a full disk met by a write that
            names no file (a ``write()`` or ``close()``, as in Lightning's CSV log flush): the error says nothing of
            where, and the run may write to several disks."""
            problem = _first_output_problem(err)
            if problem is None or problem.errno not in (errno.ENOSPC, errno.EDQUOT) or _named_path(problem):
                return None
            spaces = []
            for folder in self._output_folders():
                existing = next((f for f in [folder, *folder.parents] if f.is_dir()), None)
                with contextlib.suppress(OSError, TypeError):
                    spaces.append((shutil.disk_usage(existing).free, folder))
            if not spaces:
                return None
            free, folder = min(spaces, key=lambda space: space[0])
            return ConfigError(
                f"no space left on the device while writing the run's files ({problem.strerror}); of the run's output "
                f"folders, '{folder}' has the least space left ({free / 2**20:.1f} MiB free): free some space there or "
                f"{OUTPUT_ELSEWHERE}"
            )

        def _output_folders(self) -> list[Path]:
            """The local folders the run writes to: the loggers', the checkpoint callbacks', ``default_root_dir``."""
            folders = [_logger_folder(logger) for logger in self.trainer.loggers]
            for callback in self.trainer.callbacks:
                if isinstance(callback, LastCheckpoint):
                    folders.append(str(callback.path(self.trainer).parent))
                elif isinstance(callback, ModelCheckpoint):
                    folders.append(callback.dirpath)
            folders.append(self.trainer.default_root_dir)
            local = [Path(folder).expanduser() for folder in folders
                     if folder is not None and _is_local_file_protocol(str(folder))]
            return list(dict.fromkeys(local))

        def _remove_files_of_a_run_that_never_started(self) -> None:
            """A fit refused, or stopped by Ctrl-C, before its first step (a data file that cannot be read, a module
            pattern that matches nothing, a wrong setting seen at once) leaves no run behind: its W&B offline run would
            be synced as a run, an empty CSV version folder would shift the next run's version, and its config would
            make the next fit refused as "a previous run". The config goes only if this fit wrote it (not a previous
            run's, in the way of this one). Every rank that meets the error removes it: under DDP a data error is often
            one rank's alone (a file of its shard), and Lightning's launcher then kills rank 0 before it could clean
            up. The rest is rank 0's (it owns the W&B run; two ranks must not remove one folder at once), so it may
            stay then."""
            # a resumed run's config is its run's own
            config = self._config_file() if not self.config["fit"].get("ckpt_path") else None
            if config is not None and _file_stamp(config) not in (None, self._config_at_fit_start):
                config.unlink()
            if not self.trainer.is_global_zero:
                return
            for logger in self.trainer.loggers:
                if (isinstance(logger, WandbLogger) and logger._experiment is not None
                        and logger._experiment is not self._wandb_run_at_fit_start):  # not an earlier fit's run
                    run_folder = Path(logger.experiment.dir).parent  # <save_dir>/wandb/offline-run-*/files
                    logger.experiment.finish(exit_code=1)
                    remove_wandb_run(run_folder)
                elif isinstance(logger, CSVLogger):
                    folder = Path(logger.log_dir).expanduser()
                    if folder.is_dir():  # with the files written at setup, before any step
                        (folder / "hparams.yaml").unlink(missing_ok=True)
                        (folder / FIT_CONFIG_NAME).unlink(missing_ok=True)
                        if not any(folder.iterdir()):
                            folder.rmdir()
                    root = Path(logger.root_dir).expanduser()  # <save_dir>/<name>, made for this version
                    if logger.name and root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
                        root.rmdir()
            for folder in reversed(self._made_folders):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

        def _tie_versions_to_the_fit(self) -> None:
            self._check_batch_size()
            fit_config = self._fit_config_of_this_run()
            if fit_config is not None:
                self.trainer.callbacks.append(KeepFitConfig(fit_config))

        before_validate = before_test = before_predict = _tie_versions_to_the_fit

        def after_fit(self) -> None:
            if self.trainer.interrupted or self.trainer.fast_dev_run:
                return
            folder = run_folder(self.trainer)  # on every rank: it may broadcast
            if self.trainer.is_global_zero:
                print(run_folder_line(self.trainer, folder), flush=True)

    return LightningActCLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning_act`` console script; returns the exit status."""
    global _subcommand_started, _threads_before_run
    _subcommand_started = False  # (main may run several commands in one process)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    # an outer main's saved count is its own to put back; one left by a LightningActCLI run outside main is stale
    outer_threads, _threads_before_run = _threads_before_run, None
    try:
        if argv[0] in TOOL_COMMANDS:
            tool = importlib.import_module(TOOL_COMMANDS[argv[0]][0])
            return int(tool.main(argv[1:]) or 0)
        if argv[0] not in TRAINER_COMMANDS:
            close = _did_you_mean(argv[0], TRAINER_COMMANDS + tuple(TOOL_COMMANDS))
            close = f" ({close.removeprefix('; ')})" if close else ""
            print(f"lightning_act: error: unknown command '{argv[0]}'{close}; use one of "
                  f"{', '.join(TRAINER_COMMANDS + tuple(TOOL_COMMANDS))}", file=sys.stderr)
            return 2
        overwrite = OVERWRITE_FLAG in argv
        if overwrite and argv[0] != "fit":
            raise ConfigError(f"{OVERWRITE_FLAG} applies to fit only")
        argv = [a for a in argv if a != OVERWRITE_FLAG]
        check_optimizer_options(argv)
        check_config_files(argv)
        import_project_classes()
        if from_command_line:
            sys.argv[1:] = argv
        _build_cli_class()(args=None if from_command_line else argv, overwrite=overwrite)
    except Exception as err:  # jsonargparse wraps errors raised while instantiating classes
        user_error = _user_error(err) or _unwritable_output(err) or _unknown_monitor(err)
        if user_error is None:
            raise
        rank = _this_rank()
        if rank == 0:
            print(f"lightning_act: error: {_worker_message(user_error)}", file=sys.stderr)
        elif _subcommand_started:  # possibly met by this rank alone (a file of its data shard): never silent
            print(f"lightning_act: error (rank {rank}): {_worker_message(user_error)}", file=sys.stderr)
        return 2
    finally:
        _restore_num_threads()
        _threads_before_run = outer_threads
    return 0


def _restore_num_threads() -> None:
    """Put back the thread count a ``--num_threads`` run replaced: it is for that run only, and main may run several
    commands in one process (the user's own code after it, too)."""
    global _threads_before_run
    if _threads_before_run is not None:
        import torch

        torch.set_num_threads(_threads_before_run)
        _threads_before_run = None


def _worker_message(err: LightningActError) -> str:
    """The error's own line. Raised in a DataLoader worker, torch re-raises it as the same class with a message of
    "Caught <Error> in DataLoader worker process N." and the worker's whole traceback: its last line is the one."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.strip().splitlines()[-1]
    name = type(err).__name__
    for prefix in (f"{type(err).__module__}.{name}: ", f"{name}: "):
        if prefix in last:
            return last.split(prefix, 1)[1]
    return last


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


def _first_output_problem(err: BaseException) -> OSError | None:
    """The first error behind ``err`` (itself, its cause or its context) that :func:`_output_problem` has a line for."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and _output_problem(current) is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def _unwritable_output(err: BaseException) -> LightningActError | None:
    """One line for a path the run may not use: an output folder it cannot write (read-only, not permitted, a file
    where a folder goes, a name longer than the file system takes), a full disk, or a file it may not read."""
    problem = _first_output_problem(err)
    return ConfigError(_output_problem(problem)) if problem is not None else None


OUTPUT_ELSEWHERE = ("point the run's output elsewhere (trainer.default_root_dir, the loggers' save_dir, the checkpoint "
                    "dirpath)")


def _free_space(folder: Path) -> str:
    """`` (12.0 MiB free)``, or nothing where the folder cannot be asked."""
    try:
        return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free)"
    except OSError:
        return ""


def _named_path(err: OSError) -> str | None:
    """The path an OSError names: a rename's ``filename2`` (the final file; ``filename`` is the hidden temporary it
    was written to), else its ``filename``; None for a ``write()`` or ``close()``, which name none."""
    named_file = err.filename2 if err.filename2 is not None else err.filename
    return os.fsdecode(named_file) if isinstance(named_file, (str, bytes, os.PathLike)) else None


def _output_problem(err: OSError) -> str | None:
    """The line for what is wrong with the path ``err`` names (:func:`_named_path`), with its fix; None for an error
    that is no such problem."""
    path = _named_path(err)
    named = f"'{path}': " if path is not None else ""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return (f"{named}{err.strerror}; check that path's permissions, or run from a folder you can write to or "
                f"{OUTPUT_ELSEWHERE}")
    if err.errno == errno.EEXIST and path is not None and os.path.lexists(path) and not os.path.isdir(path):
        return f"'{path}' is a file where the run needs a folder; move or remove that file, or {OUTPUT_ELSEWHERE}"
    if err.errno == errno.ENAMETOOLONG:
        sizes = [len(os.fsencode(part)) for part in Path(path).parts] if path is not None else []
        longest = max(sizes, default=0)
        if sizes and sizes[-1] == longest and path.endswith(".ckpt"):  # a checkpoint callback's filename template
            return (f"{named}{err.strerror} (the checkpoint's name has {longest} bytes); most file systems take names "
                    "of up to 255 bytes: shorten the filename template of the ModelCheckpoint that writes it")
        size = f" (a name in it has {longest} bytes)" if longest else ""
        return (f"{named}{err.strerror}{size}; most file systems take names of up to 255 bytes: shorten the run "
                f"folder's name, or {OUTPUT_ELSEWHERE}")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        if path is None:
            return (f"no space left on the device while writing the run's files ({err.strerror}); free some space or "
                    f"{OUTPUT_ELSEWHERE}")
        folder = Path(path).parent
        return (f"no space left in '{folder}'{_free_space(folder)} while writing '{Path(path).name}'; free some space "
                f"or {OUTPUT_ELSEWHERE}")
    return None


def _logger_folder(logger: Any) -> str | None:
    """The folder ``trainer.log_dir`` takes from a logger: a CSV or TensorBoard logger's version folder, another's
    ``save_dir`` (None for MLflow with a server or database tracking URI: it keeps no local folder)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir


def _config_logger(trainer: Any) -> Any:
    """The logger in whose folder the fit's config is saved: the first one with a folder (None: none has one)."""
    return next((logger for logger in trainer.loggers if _logger_folder(logger) is not None), None)


def _log_dir(trainer: Any) -> Path:
    """Where the fit's config is saved: ``trainer.log_dir`` (the first logger's folder) without its broadcast, which one
    rank alone would wait on for ever; when the first logger keeps no local folder (MLflow with a server or database
    tracking URI), the next logger's that does, else ``default_root_dir``."""
    logger = _config_logger(trainer)
    # "~/runs/x": Lightning's loggers and config saving (through fsspec) write under $HOME, not in a folder named "~"
    return Path(_logger_folder(logger) if logger is not None else trainer.default_root_dir).expanduser()


#: Whether this process got as far as running its subcommand (fit, test, ...). An error met before (the command line,
#: the config, building the Trainer) is the same on every rank and printed by rank 0 alone; one met while running may
#: be a single rank's, which then prints it tagged with its rank.
_subcommand_started = False

#: ``torch.get_num_threads()`` before a ``--num_threads`` run set its own, put back when :func:`main` returns.
_threads_before_run: int | None = None


def _this_rank() -> int:
    """This process's global rank as Lightning knows it (0 without Lightning loaded, or in one process)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return 0 if rank_zero is None else int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)


def _is_rank_zero() -> bool:
    """Whether this process prints what every rank meets alike (a warning about the config)."""
    return _this_rank() == 0


def _check_launcher(trainer: Any) -> None:
    """Refuse, before any process waits, a world that cannot form: ``num_nodes`` > 1 with nothing that starts the
    other nodes' ranks (the local ranks would wait 30 min for them at MASTER_ADDR 127.0.0.1), and torchrun processes
    that do not match ``devices × num_nodes`` (Lightning's ValueError, a traceback per process, at launch)."""
    from lightning.fabric.plugins.environments import LightningEnvironment, TorchElasticEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    devices, nodes = trainer.num_devices, trainer.num_nodes
    if isinstance(environment, TorchElasticEnvironment) and environment.world_size() != devices * nodes:
        world = environment.world_size()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world // max(nodes, 1)))
        raise ConfigError(
            f"torchrun started {world} processes ({per_node} per node) but the trainer runs devices={devices} × "
            f"num_nodes={nodes} = {devices * nodes}; pass --trainer.devices {per_node} (it must equal torchrun's "
            f"--nproc_per_node) and --trainer.num_nodes {max(world // per_node, 1)} (its --nnodes)"
        )
    # Lightning's own environment, used when it detected no launcher (torchrun, SLURM, LSF, Kubeflow, MPI): several
    # nodes then need each node's rank (NODE_RANK, or GROUP_RANK) given by hand, and MASTER_ADDR on all but node 0
    manual = type(environment) is LightningEnvironment
    node_rank = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK"))
    if nodes > 1 and manual and (node_rank is None or (node_rank != "0" and not os.environ.get("MASTER_ADDR"))):
        raise ConfigError(
            f"--trainer.num_nodes {nodes}, but nothing starts the other nodes' processes (no torchrun, srun or other "
            "cluster launcher found, nor NODE_RANK set on each node and MASTER_ADDR on all but node 0): the ranks here "
            "would wait for them for ever; start the command on every node with torchrun or srun (docs/multi_gpu.md), "
            "or pass --trainer.num_nodes 1"
        )


def _lightning_refusal(err: BaseException) -> LightningActError | None:
    """One line for what Lightning refuses about the config once the run starts: a ``MisconfigurationException`` (a
    recipe without a test set or ``predict_step``, ...) or a ``val_check_interval`` beyond the training batches."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, MisconfigurationException) or (isinstance(err, ValueError) and "`val_check_interval`" in str(err)):
        return _unknown_monitor(err) or ConfigError(" ".join(str(err).split()))
    return None


def _wandb_online(trainer: Any) -> bool:
    """Whether a W&B logger of the run talks to W&B's server (not offline: true, nor WANDB_MODE offline/disabled,
    which an earlier offline logger of the same process sets): only such a run can fail on the login or network."""
    from lightning.pytorch.loggers import WandbLogger

    offline_modes = ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_MODE") in offline_modes:
        return False
    return any(isinstance(logger, WandbLogger) and not logger._offline
               and logger._wandb_init.get("mode") not in offline_modes for logger in trainer.loggers)


def _wandb_refusal(err: BaseException, online: bool) -> LightningActError | None:
    """One line for W&B refusing to start the run, met in Lightning's setup (a long traceback otherwise): on an
    ``online`` run, no login on this machine or its server unreachable (a problem of the machine); else the run's
    settings (an invalid project name, a run id in use), in W&B's own words."""
    wandb_errors = getattr(sys.modules.get("wandb"), "errors", None)  # not imported: no W&B logger
    seen: set[int] = set()
    current: BaseException | None = err
    while wandb_errors is not None and current is not None and id(current) not in seen:
        if isinstance(current, wandb_errors.Error):
            first_line = (str(current).strip().splitlines() or [type(current).__name__])[0]
            offline = ("or log offline (offline: true on the WandbLogger, or WANDB_MODE=offline) and upload the run "
                       "later with `wandb sync`")
            no_login = "api key" in first_line.lower() or "wandb login" in first_line.lower()
            if online and (no_login or isinstance(current, wandb_errors.AuthenticationError)):
                return ConfigError(f"W&B: not logged in ({first_line}); run `wandb login` (or set WANDB_API_KEY), "
                                   f"{offline}")
            if online and isinstance(current, wandb_errors.CommError):
                return ConfigError(f"W&B: could not start the run ({first_line}); check the network and your login, "
                                   f"{offline}")
            return ConfigError(f"W&B refused the run's settings ({first_line}); fix the WandbLogger's init_args")
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _unknown_monitor(err: BaseException) -> LightningActError | None:
    """One line for a ``ModelCheckpoint``/``EarlyStopping`` whose ``monitor`` names a metric nobody logs (Lightning
    finds out at the first check, after an epoch, and raises a multi-line message with the metrics that were logged)."""
    message = str(err)
    # a monitor statistic may exist later only (SensitiveNeurons' v_mean after window + 1 checkpoints): the way to wait
    # for it is the failing callback's own (ModelCheckpoint has no strict option, and raises once a validation has run)
    if "could not find the monitored key" in message:
        late = ("; for a monitor statistic that appears after a few due steps, run the first validation after it is "
                "first logged (check_val_every_n_epoch, val_check_interval) or monitor another key: ModelCheckpoint "
                "has no strict option")
    elif "Early stopping conditioned on metric" in message:
        late = "; a monitor statistic that appears after a few due steps needs strict: false on EarlyStopping"
    else:
        return None
    return ConfigError(" ".join(message.split()) + f" (fix the callback's monitor: in the config{late})")


def __getattr__(name: str) -> Any:
    """``LightningActCLI`` is built on first access, so ``--help`` does not import Lightning."""
    if name == "LightningActCLI":
        return _build_cli_class()
    raise AttributeError(name)
