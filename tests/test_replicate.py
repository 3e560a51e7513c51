"""scripts/replicate.py end to end in --quick mode: six CI-sized fits, the table and the figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
    written = (tmp_path / "replications.md").read_text()
    assert written.startswith("| paper | claim | measured | reproduced |")
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == [
        "execution_manifold_r90.png", "lazy_neuron_nonzero.png", "massive_lm_ratio.png", "send_eigenscore.png"
    ]
