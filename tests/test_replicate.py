"""scripts/replicate.py: its helpers, and end to end in --quick mode (eight CI-sized fits, the table, the figures)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "replicate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_retarget_points_recipe_paths_at_the_new_folder() -> None:
    replicate = load_script()
    config = {"a": "runs/send", "b": ["runs/send/checkpoints", "runs/sender", 3], "c": {"d": "x"}}
    assert replicate._retarget(config, "runs/send", "/tmp/r") == {
        "a": "/tmp/r", "b": ["/tmp/r/checkpoints", "runs/sender", 3], "c": {"d": "x"}
    }


def test_paired_interval_is_the_student_t_interval() -> None:
    replicate = load_script()
    # differences 1, 2, 3: mean 2, standard error 1/sqrt(3), t(0.975, 2 d.o.f.) = 4.302653
    mean, low, high = replicate.paired_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302653 / math.sqrt(3.0)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-6)
    assert math.isnan(replicate.paired_interval(np.array([0.5]))[1])


def test_initial_state_is_the_weights_lightning_cli_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-matrix trajectory starts at w_0 rebuilt from the seed: it must be LightningCLI's model."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    replicate = load_script()
    path = replicate.derive_config("execution_manifold", tmp_path, quick=True)
    config = yaml.safe_load(path.read_text())
    config["seed_everything"] = 3
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["lightning_act"])  # LightningCLI would also read pytest's arguments
    cli = LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        run=False, args=["--config", str(path)], save_config_callback=None,
    )
    built = cli.model.state_dict()
    rebuilt = replicate.initial_state(config)
    assert built.keys() == rebuilt.keys()
    assert all(torch.equal(built[k], rebuilt[k]) for k in built)


def test_quick_replication_prints_one_row_per_paper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replicate = load_script()
    assert replicate.main(["--quick", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| paper")]
    assert len(rows) == 4
    for paper in ("Massive Activations", "Lazy Neuron", "Execution Manifolds", "SeND"):
        assert sum(paper in row for row in rows) == 1
    assert all(row.rstrip().endswith(("| yes |", "| no |")) for row in rows)
    assert "nan" not in rows[2]  # r90 was measured in both manifold runs
    assert "per matrix (4)" in rows[2] and "per matrix (8)" in rows[2]  # 2 blocks: qkv + proj, plus 2 MLP layers
    assert "over 2 seeds" in rows[3] and "nan" not in rows[3]
    written = (tmp_path / "replications.md").read_text()
    assert written.startswith("| paper | claim | measured | reproduced |")
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == [
        "execution_manifold_r90.png", "lazy_neuron_nonzero.png", "massive_lm_ratio.png", "send_eigenscore.png"
    ]
