"""A triton that is installed but does not import (a build for another torch, a broken install) counts as absent.

``find_spec`` finds such a triton; deciding on it, ``lightning_act.nn.group_rational`` imported its kernels at import
and raised inside ``import timm`` (the timm hook registers KAT) and every CLI command (they import the KAT task),
even on a CPU, and the statistics and eigensolver choosers picked Triton for CUDA tensors, to raise inside a monitor
mid-fit. The checks run in a subprocess whose ``triton`` is a stub package that raises on import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lightning_act
from lightning_act import _triton

CHECKS = r"""
import json, types, warnings

import numpy as np

with warnings.catch_warnings(record=True) as cpu_warnings:
    warnings.simplefilter("always")
    import lightning_act
    import timm
    import torch

    from lightning_act.errors import LightningActError
    from lightning_act.nn.group_rational import GroupRational
    from lightning_act.stats import fused, spectrum

    torch.manual_seed(0)
    model = timm.create_model("kat_micro_patch4_32").eval()
    reference = timm.create_model("kat_micro_patch4_32", rational_impl="reference").eval()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kat_difference = float((model(images) - reference(images)).abs().max())

    module = GroupRational(8, 2, "swish")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    rational = module(x).detach().double().numpy()
    cpu_stats = fused.fused_statistics(x, fused.moment_spec())

# a stand-in CUDA tensor: the choosers read only where it lives and its dtype
cuda_input = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
with warnings.catch_warnings(record=True) as cuda_warnings:
    warnings.simplefilter("always")
    choices = [module.resolved_implementation(cuda_input), fused._resolve(cuda_input, "auto"),
               spectrum.auto_eigensolver("cuda", 13, 384, 132), module.resolved_implementation(cuda_input)]

refusals = []
try:
    GroupRational(8, 2, "swish", implementation="triton").resolved_implementation(cuda_input)
except LightningActError as error:
    refusals.append(str(error))
try:
    fused.fused_statistics(x, fused.moment_spec(), "triton")
except ValueError as error:
    refusals.append(str(error))
refusals.append(spectrum.eigensolver_problem("triton", torch.device("cuda")))

print(json.dumps({
    "kat_difference": kat_difference,
    "x": x.double().tolist(),
    "numerator": module.weight_numerator.detach().double().tolist(),
    "denominator": module.weight_denominator.detach().double().tolist(),
    "rational": rational.tolist(),
    "count": float(cpu_stats.value("count")), "sum": float(cpu_stats.value("sum")),
    "abs_max": float(cpu_stats.value("abs_max")),
    "cpu_warnings": [str(w.message) for w in cpu_warnings if "triton" in str(w.message).lower()],
    "cuda_warnings": [str(w.message) for w in cuda_warnings],
    "choices": choices,
    "refusals": refusals,
}))
"""


@pytest.fixture(scope="module")
def broken_triton_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The checks' results, from a process whose installed triton raises on import."""
    stubs = tmp_path_factory.mktemp("stub_triton")
    (stubs / "triton").mkdir()
    # an ImportError: torch's own probe (torch.utils._triton) tolerates no other exception
    (stubs / "triton" / "__init__.py").write_text("raise ImportError('simulated: this triton build does not match torch')\n")
    package_root = str(Path(lightning_act.__file__).resolve().parents[1])  # this checkout, wherever it runs
    path = os.pathsep.join([str(stubs), package_root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    completed = subprocess.run(
        [sys.executable, "-c", CHECKS], env=env, cwd=stubs, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_timm_and_kat_work_on_a_cpu_without_a_word_about_triton(broken_triton_run: dict) -> None:
    assert broken_triton_run["kat_difference"] == 0.0  # "auto" on a CPU is the reference path
    assert broken_triton_run["cpu_warnings"] == []  # no Triton path would have run: nothing to say
    # GroupRational against the documented formula in float64: P(x) / (1 + sum_k |b_k| |x|^(k+1)), per group
    x = np.array(broken_triton_run["x"])
    a, b = np.array(broken_triton_run["numerator"]), np.array(broken_triton_run["denominator"])
    group = np.arange(x.shape[1]) // (x.shape[1] // a.shape[0])
    p = sum(a[group, j] * x**j for j in range(6))
    q = 1.0 + sum(np.abs(b[group, k]) * np.abs(x) ** (k + 1) for k in range(4))
    np.testing.assert_allclose(broken_triton_run["rational"], p / q, rtol=1e-5, atol=1e-6)
    # the fused statistics of a CPU tensor, against numpy
    assert broken_triton_run["count"] == x.size
    assert broken_triton_run["sum"] == pytest.approx(x.astype(np.float32).sum(), rel=1e-6)
    assert broken_triton_run["abs_max"] == pytest.approx(np.abs(x).max(), rel=1e-6)


def test_cuda_tensors_take_the_pytorch_paths_and_say_why_once(broken_triton_run: dict) -> None:
    # GroupRational, the fused statistics and the eigensolver choice fall back instead of launching Triton
    assert broken_triton_run["choices"] == ["reference", "torch", "torch", "reference"]
    (warning,) = broken_triton_run["cuda_warnings"]
    assert "triton is installed but does not import" in warning
    assert "ImportError: simulated: this triton build does not match torch" in warning
    assert "pip uninstall triton" in warning


def test_explicit_triton_requests_name_the_import_error(broken_triton_run: dict) -> None:
    refusals = broken_triton_run["refusals"]
    assert len(refusals) == 3, refusals
    for refusal in refusals:
        assert "the installed one does not (ImportError: simulated: this triton build" in refusal, refusal
        assert "pip uninstall triton" in refusal, refusal


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (RuntimeError("CUDA driver too old"), "RuntimeError: CUDA driver too old"),  # any exception, not only ImportError
        (ModuleNotFoundError("No module named 'triton._C'", name="triton._C"), "ModuleNotFoundError: No module named"),
        (ModuleNotFoundError("No module named 'triton'", name="triton"), None),  # not installed: no problem to report
    ],
)
def test_the_import_problem_is_any_failure_of_an_installed_triton(
    monkeypatch: pytest.MonkeyPatch, error: Exception, problem: str | None
) -> None:
    def failing_import(name: str) -> None:
        raise error

    monkeypatch.setattr(_triton.importlib, "import_module", failing_import)
    _triton.triton_import_problem.cache_clear()
    try:
        found = _triton.triton_import_problem()
    finally:
        monkeypatch.undo()
        _triton.triton_import_problem.cache_clear()  # the real triton's answer again for later tests
    assert found == problem if problem is None else found.startswith(problem), found
