"""Write docs/errors.md: every bad input we tried on ``lightning_act`` and the one line it prints.

    python scripts/errors_table.py            # regenerate docs/errors.md
    python scripts/errors_table.py --check    # exit 1 if docs/errors.md differs from what the CLI prints

Each case runs the real command (``lightning_act.cli.main``) in a scratch folder holding a copy of
``recipes/kat.yaml`` (as ``kat.yaml``) and the files the case needs; tests/test_cli.py runs the check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
OTHER_MODEL = "lightning_act.tasks.spectral_detection.SpectralTargetDetection"


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        config = yaml.safe_load((ROOT / "recipes" / "kat.yaml").read_text())
        change(config)
        (folder / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return write


def _text(name: str, content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(content)


def _checkpoint(name: str, class_path: str, truncate: bool = False) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        import torch

        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {"_class_path": class_path},
                    "pytorch-lightning_version": "2.6.0"}, path)
        if truncate:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return write


def _file_at(name: str) -> Callable[[Path], None]:
    """A file where the run needs a folder."""
    def write(folder: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("a file\n")
    return write


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return change


def _rename_section(config: dict) -> None:
    config["trainr"] = config.pop("trainer")


@dataclass
class Case:
    mistake: str
    argv: list[str]
    setup: list[Callable[[Path], None]] = field(default_factory=list)
    cpu_only: bool = False


KAT_CLASS = "lightning_act.tasks.image_classification.ImageClassifier"
CASES = [
    Case("config file missing", ["fit", "--config", "kat.yml"]),
    Case("malformed YAML (unclosed brace)", ["fit", "--config", "bad.yaml"], [_text("bad.yaml", "trainer: {max_epochs: 1\n")]),
    Case("a tab in YAML", ["fit", "--config", "bad.yaml"], [_text("bad.yaml", "trainer:\n\tmax_epochs: 1\n")]),
    Case("an unquoted @preset in YAML", ["fit", "--config", "bad.yaml"],
         [_text("bad.yaml", "trainer:\n  callbacks:\n    - class_path: lightning_act.callbacks.ActivationSparsity\n"
                            "      init_args:\n        modules: @activations\n")]),
    Case("duplicate YAML key", ["fit", "--config", "bad.yaml"],
         [_text("bad.yaml", "trainer:\n  max_epochs: 1\n  max_epochs: 2\n")]),
    Case("misspelled class_path", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.0.class_path", "lightning_act.callbacks.ActivationSparsty"))]),
    Case("misspelled class_path on the command line",
         ["fit", "--config", "kat.yaml", "--trainer.callbacks+=lightning_act.callbacks.ActivationSparsty"]),
    Case("misspelled section", ["fit", "--config", "bad.yaml"], [_edit(_rename_section)]),
    Case("misspelled Trainer key in YAML", ["fit", "--config", "bad.yaml"], [_edit(_set("trainer.max_epoch", 3))]),
    Case("misspelled model argument", ["fit", "--config", "bad.yaml"], [_edit(_set("model.init_args.lrr", 0.1))]),
    Case("misspelled callback argument", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.0.init_args.evry_n_steps", 10))]),
    Case("wrong type in YAML (model)", ["fit", "--config", "bad.yaml"], [_edit(_set("model.init_args.lr", "fast"))]),
    Case("wrong type in YAML (callback)", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.1.init_args.every_n_steps", "ten"))]),
    Case("wrong type on the command line (callback)",
         ["fit", "--config", "kat.yaml", "--trainer.callbacks+=MassiveActivations", "--trainer.callbacks.every_n_steps", "ten"]),
    Case("wrong type of a monitor's `modules`", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.1.init_args.modules", 5))]),
    Case("wrong type of `forward_fn`", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.1.init_args.forward_fn", 5))]),
    Case("`every_n_steps: 0` on a monitor", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.1.init_args.every_n_steps", 0))]),
    Case("a typo in `cett_modules`", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.0.init_args.cett_modules", ["model.block.*.mlp.fc2"]))]),
    Case("a tensor argument (`tracking_inputs`) in YAML", ["fit", "--config", "bad.yaml"],
         [_edit(_set("trainer.callbacks.3.init_args.tracking_inputs", "abc"))]),
    Case("wrong type on the command line", ["fit", "--config", "kat.yaml", "--trainer.max_epochs", "two"]),
    Case("wrong type on the command line (model)", ["fit", "--config", "kat.yaml", "--model.init_args.lr", "abc"]),
    Case("wrong type of an optional model argument", ["fit", "--config", "kat.yaml", "--model.model_kwargs", "notadict"]),
    Case("`--trainer.devices` not a number", ["fit", "--config", "kat.yaml", "--trainer.devices", "abc"]),
    Case("`--trainer.precision` not a precision", ["fit", "--config", "kat.yaml", "--trainer.precision", "17"]),
    Case("unknown flag", ["fit", "--config", "kat.yaml", "--bogus", "1"]),
    Case("abbreviated option", ["fit", "--config", "kat.yaml", "--trainer.max_epoch", "1"]),
    Case("unknown class short name", ["fit", "--config", "kat.yaml", "--model", "KATClassifier"]),
    Case("a logger without its required argument", ["fit", "--config", "kat.yaml", "--trainer.logger+=TensorBoardLogger"]),
    Case("unknown command", ["tset"]),
    Case("`batch_size: 0`", ["fit", "--config", "kat.yaml", "--data.init_args.batch_size", "0"]),
    Case("`num_threads: 0`", ["fit", "--config", "kat.yaml", "--num_threads", "0"]),
    Case("another task's data module (`--data`)",
         ["fit", "--config", "kat.yaml", "--data", "lightning_act.data.eeg.EEGSeizureDataModule"]),
    Case("a GPU on a CPU-only machine", ["fit", "--config", "kat.yaml", "--trainer.accelerator", "gpu"], cpu_only=True),
    Case("re-running a fit over a previous run", ["fit", "--config", "kat.yaml"],
         [_checkpoint("runs/kat/checkpoints/last.ckpt", KAT_CLASS)]),
    Case("a file where the run's checkpoint folder goes", ["fit", "--config", "kat.yaml"],
         [_file_at("runs/kat/checkpoints")]),
    Case("`--overwrite` with test", ["test", "--config", "kat.yaml", "--overwrite"]),
    Case("`--overwrite` with `--ckpt_path`", ["fit", "--config", "kat.yaml", "--overwrite", "--ckpt_path", "last"],
         [_checkpoint("runs/kat/checkpoints/last.ckpt", KAT_CLASS)]),
    Case("`--ckpt_path` missing", ["fit", "--config", "kat.yaml", "--ckpt_path", "runs/kat/last.ckpt"]),
    Case("`--ckpt_path` of another model", ["fit", "--config", "kat.yaml", "--ckpt_path", "spectral.ckpt"],
         [_checkpoint("spectral.ckpt", OTHER_MODEL)]),
    Case("`--ckpt_path` truncated", ["fit", "--config", "kat.yaml", "--ckpt_path", "cut.ckpt"],
         [_checkpoint("cut.ckpt", KAT_CLASS, truncate=True)]),
    Case("`fit --ckpt_path` of a weights-only checkpoint", ["fit", "--config", "kat.yaml", "--ckpt_path", "weights.ckpt"],
         [_checkpoint("weights.ckpt", KAT_CLASS)]),
    Case("`--ckpt_path` not a checkpoint", ["test", "--config", "kat.yaml", "--ckpt_path", "notes.txt"],
         [_text("notes.txt", "not a checkpoint\n")]),
    Case("`report -o` whose parent is a file", ["report", "runs/kat", "-o", "notes.txt/report.html"],
         [_text("notes.txt", "a file\n")]),
    Case("`report -o` a folder", ["report", "runs/kat", "-o", "runs"], [lambda folder: (folder / "runs").mkdir()]),
    Case("`report -o` onto a run's log", ["report", "runs/kat", "-o", "metrics.csv"], [_text("metrics.csv", "epoch,step\n")]),
    Case("`--ckpt_path last` before any fit", ["fit", "--config", "kat.yaml", "--ckpt_path", "last"]),
    Case("`--ckpt_path best` in a new command", ["test", "--config", "kat.yaml", "--ckpt_path", "best"]),
    Case("LightningCLI's `--optimizer`", ["fit", "--config", "kat.yaml", "--optimizer", "Adam"]),
    Case("an `lr_scheduler:` section", ["fit", "--config", "bad.yaml"],
         [_edit(_set("lr_scheduler", {"class_path": "torch.optim.lr_scheduler.StepLR"}))]),
    Case("a fit without an end (`max_epochs: -1`)", ["fit", "--config", "kat.yaml", "--trainer.max_epochs", "-1"]),
]


def run_case(case: Case) -> str:
    """The last stderr line the command prints, run in a fresh scratch folder."""
    from lightning_act.cli import main

    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="lightning_act_errors_") as scratch:
        folder = Path(scratch)
        (folder / "kat.yaml").write_text((ROOT / "recipes" / "kat.yaml").read_text())
        for setup in case.setup:
            setup(folder)
        stderr = io.StringIO()
        os.chdir(folder)
        try:
            with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = main(list(case.argv))
        finally:
            os.chdir(previous)
    lines = stderr.getvalue().strip().splitlines()
    return f"[exit {status}] {lines[-1] if lines else ''}"


def render(rows: list[tuple[Case, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [
        "# Bad input and the message it gets",
        "",
        "Every mistake below was run through the real `lightning_act` command; the message column is",
        "the one line it prints for the mistake (the last line on stderr: a few checks that run once the Trainer",
        "is made follow Lightning's own info lines, such as \"Seed set to 0\"), exit status 2. Generated by",
        "`python scripts/errors_table.py`;",
        "`tests/test_cli.py` fails when this table and the CLI disagree. Each run starts in a folder holding",
        "`kat.yaml` (a copy of `recipes/kat.yaml`); `bad.yaml` is `kat.yaml` with the mistake.",
        "",
        "| mistake | command | message |",
        "| --- | --- | --- |",
    ]
    for case, message in rows:
        out.append(f"| {cell(case.mistake)} | `lightning_act {cell(' '.join(case.argv))}` | {cell(message)} |")
    out += [
        "",
        "Faults (covered by `tests/test_faults.py` and `tests/test_cli*.py`, not by this table):",
        "",
        "- **Full disk while writing a checkpoint**: `lightning_act: error: no space left in 'runs/kat/checkpoints'",
        "  (12.0 MiB free) while writing checkpoint 'last.ckpt'; free some space or point the checkpoint dirpath",
        "  elsewhere (any previous 'last.ckpt' is intact)`. Checkpoints are written to a temporary file in the same",
        "  folder, fsynced and renamed, so no truncated file is ever left under a final name.",
        "- **Full disk while writing the run's other files** (the CSV log, `hparams.yaml`, the config, the monitors'",
        "  plots): `lightning_act: error: no space left in 'runs/kat/csv/version_0/plots' (0.0 MiB free) while writing",
        "  'sparsity_zero_frac_heatmap.png'; free some space or point the run's output elsewhere",
        "  (trainer.default_root_dir, the loggers' save_dir, the checkpoint dirpath)`. A write that names no file (Lightning's",
        "  flush of the CSV log) gets `no space left on the device while writing the run's files (No space left on",
        "  device); of the run's output folders, 'runs/kat/csv/version_0' has the least space left (0.0 MiB free): free",
        "  some space there or point the run's output elsewhere (...)`. A run folder name longer than the file system",
        "  takes is one line too, and so is a checkpoint name over 255 bytes (it names the `ModelCheckpoint` filename",
        "  template to shorten).",
        "- **W&B online (`offline: false`) without a login**: ``lightning_act: error: W&B: not logged in (No API key",
        "  configured. Use `wandb login` to log in.); run `wandb login` (or set WANDB_API_KEY), or log offline",
        "  (offline: true on the WandbLogger, or WANDB_MODE=offline) and upload the run later with `wandb sync` ``;",
        "  the refused run leaves no files behind (as for any fit refused before its first step). A W&B server that",
        "  cannot be reached gets the same advice, and leaves the online run folder W&B made under `<save_dir>/wandb/`",
        "  (nothing tells it from another run's there); settings W&B refuses (an invalid project name, offline or not) get",
        "  `W&B refused the run's settings (<W&B's reason>); fix the WandbLogger's init_args`.",
        "- **Ctrl-C during `fit`**: the first Ctrl-C stops after the optimizer step in progress (under gradient",
        "  accumulation, after the last micro-batch of its window), writes",
        "  `last.ckpt` and prints `interrupted at step N: wrote .../last.ckpt; resume with --ckpt_path ...`;",
        "  a second Ctrl-C stops at once. SIGTERM (`kill`, `docker stop`, a scheduler's preemption) does what the",
        "  first Ctrl-C does and prints `stopped by SIGTERM at step N: ...`; the exit status is not 0. Under DDP, one",
        "  that lands while the fit validates ends it as Lightning does: no `last.ckpt` since the last save, exit status 0.",
        "  A Ctrl-C before the first optimizer step leaves no run behind (its config, CSV version folder, W&B offline run",
        "  and empty checkpoint folder are removed), so the same fit starts again without `--overwrite`. A SIGTERM or",
        "  Ctrl-C in the end-of-fit work after the last step (the monitors' heatmaps, emergence fits,",
        "  `monitors/skipped.json`) cuts that work and prints `stopped by SIGTERM during the end-of-fit work after the",
        "  fit's last step (N): ... resume with --ckpt_path .../last.ckpt to write them` (a fit ended by EarlyStopping",
        "  or `max_time` says that a resume would train on instead); exit status 1 (before round 28 the process died",
        "  silently there). A SIGTERM handler of your own installed before the fit runs there as before.",
        "- **SIGKILL / power loss**: `last.ckpt` is the previous complete one (refreshed at every epoch end);",
        "  `--ckpt_path` resumes with the monitor histories continuous. `metrics.csv` keeps every logged row with",
        "  `lightning_act.loggers.AtomicCSVLogger`, the recipes' CSV logger (Lightning's `CSVLogger` rewrites the file in",
        "  place when a column appears, and a kill then empties it). `config.yaml`, `fit_config.yaml`,",
        "  `dopamine_firing*.pt` and `test_pr_curve.csv` are written whole (a temporary file renamed over them; before",
        "  round 28 a kill left them cut short); a kill while the fit saves its config leaves only that temporary, and",
        "  the next `fit`, with or without `--overwrite`, removes that version folder (the run never trained).",
        "- **Re-running a fit into a folder that holds a run**: refused (above) unless `--ckpt_path` resumes it or",
        "  `--overwrite` starts over (removing that run's checkpoints, `config.yaml` and CSV and TensorBoard logs). Its",
        "  checkpoints are the files the fit's checkpoint callbacks write (`last.ckpt`, a `ModelCheckpoint`'s filename",
        "  template), not other files of their folders; its `config.yaml` is looked for in each version folder of a",
        "  CSV or TensorBoard first logger; a `config.yaml` in a folder the first logger shares with other recipes",
        "  (one W&B `save_dir` for all runs) is this run's only when it names this run's folders. Its CSV and",
        "  TensorBoard logs are the version folders that hold its config (each CSV and TensorBoard logger keeps a copy,",
        "  `fit_config.yaml`) or nothing: other recipes' version folders in a shared root (one TensorBoard logdir for",
        "  all runs) are kept, and one that holds files but no config (a run of an older version) is left, with a",
        "  warning naming it.",
        "",
    ]
    return "\n".join(out)


def collect() -> list[tuple[Case, str]]:
    import torch

    rows = []
    for case in CASES:
        if case.cpu_only and torch.cuda.is_available():
            continue
        rows.append((case, run_case(case)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/errors.md instead of writing it")
    args = parser.parse_args()
    text = render(collect())
    if args.check:
        import difflib

        expected = DOC.read_text() if DOC.is_file() else ""
        lines = [line for line in text.splitlines() if "CPU-only machine" not in line]
        wanted = [line for line in expected.splitlines() if "CPU-only machine" not in line]
        if lines != wanted:
            print("\n".join(difflib.unified_diff(wanted, lines, "docs/errors.md", "CLI", lineterm="")))
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
