"""The Triton eigensolver (``lightning_act.stats.triton_eigen``) against numpy's float64 ``eigvalsh``.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before Triton is first
imported); a CUDA test runs where a GPU is present; an ahead-of-time compile for sm_90 (no GPU needed) catches
what the interpreter forgives.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from _interpreter import run_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def symmetric_cases() -> list[torch.Tensor]:
    """Batches of symmetric float64 matrices that stress the reduction and the bisection differently."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for d in (1, 2, 3, 7, 16):  # Gram matrices of random rows, two per batch
        rows = torch.randn(2, 2 * d + 1, d, generator=generator, dtype=torch.float64)
        cases.append(rows.transpose(1, 2) @ rows)
    low_rank = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    cases.append((low_rank @ low_rank.T)[None])  # rank 3 of 12: nine zero eigenvalues
    cases.append(2.5 * torch.eye(6, dtype=torch.float64)[None])  # one eigenvalue six times; every column zero
    cases.append(torch.zeros(1, 5, 5, dtype=torch.float64))
    cases.append(torch.diag(torch.logspace(-12, 3, 8, dtype=torch.float64))[None])  # 15 decades, already diagonal
    blocks = torch.zeros(10, 10, dtype=torch.float64)  # two decoupled blocks: a zero column mid-reduction
    blocks[:4, :4] = cases[3][0, :4, :4]
    blocks[4:, 4:] = cases[4][0, :6, :6]
    cases.append(blocks[None])
    indefinite = torch.randn(9, 9, generator=generator, dtype=torch.float64)
    cases.append((indefinite + indefinite.T)[None])  # negative eigenvalues too
    power_law = torch.randn(64, 20, generator=generator, dtype=torch.float64) * torch.arange(1, 21) ** -1.5 + 3.0
    centred = power_law - power_law.mean(0)
    cases.append((centred.T @ centred)[None])  # a collapsed activation spectrum
    snapshots = torch.randn(7, 300, generator=generator, dtype=torch.float64).cumsum(0)
    snapshots = snapshots - snapshots.mean(0)
    bordered = torch.zeros(32, 32, dtype=torch.float64)  # a trajectory's Gram matrix, padded as DimensionalCollapse does
    bordered[:7, :7] = snapshots @ snapshots.T
    cases.append(bordered[None])
    return cases


def assert_matches_numpy(matrices: torch.Tensor, eigenvalues: torch.Tensor) -> None:
    expected = np.linalg.eigvalsh(matrices.numpy())
    d = matrices.shape[-1]
    assert eigenvalues.shape == expected.shape
    # backward stable: off by a few eps * |A| (and by the pivot guard, ~1e-307, for a zero matrix)
    tolerance = 32 * d * np.finfo(np.float64).eps * float(np.abs(expected).max()) + 1e-300
    np.testing.assert_allclose(eigenvalues.numpy(), expected, rtol=0, atol=tolerance)


INTERPRETED = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_triton_eigen import symmetric_cases
from lightning_act.stats.spectrum import covariance_partials, covariance_spectrum, rank_statistics
from lightning_act.stats.triton_eigen import tridiagonal_bisection_eigenvalues
cases = [(m, tridiagonal_bisection_eigenvalues(m)) for m in symmetric_cases()]
generator = torch.Generator().manual_seed(3)
rows = torch.randn(3, 40, 12, generator=generator, dtype=torch.float64) * torch.arange(1, 13) ** -1.0 + 5.0
partials = torch.stack([covariance_partials(r) for r in rows])
torch.save({"cases": cases, "rows": rows, "ranks": rank_statistics(covariance_spectrum(partials, "triton"), 12)},
           sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The kernels' results on CPU tensors, from one interpreter subprocess (one import of Triton and Lightning)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    output = tmp_path_factory.mktemp("eigen") / "eigen.pt"
    run_interpreted(INTERPRETED, output)
    return torch.load(output)


def test_eigenvalues_match_numpy_float64_under_interpreter(interpreted: dict) -> None:
    assert len(interpreted["cases"]) == len(symmetric_cases())
    for matrices, eigenvalues in interpreted["cases"]:
        assert_matches_numpy(matrices, eigenvalues)


def test_covariance_spectrum_through_triton_gives_numpy_ranks(interpreted: dict) -> None:
    """erank and PR of three taps from the Triton route equal numpy's, computed from the centred rows."""
    for tap_rows, (erank, pr, erank_frac, pr_frac) in zip(
        interpreted["rows"].numpy(), interpreted["ranks"].numpy(), strict=True
    ):
        centred = tap_rows - tap_rows.mean(0)
        lam = np.clip(np.linalg.eigvalsh(centred.T @ centred), 0, None)
        sigma = np.sqrt(lam)
        p = sigma[sigma > 0] / sigma.sum()
        assert erank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
        assert pr == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
        assert (erank_frac, pr_frac) == pytest.approx((erank / 12, pr / 12), rel=1e-12)


def test_eigensolver_choice_is_checked_with_one_line() -> None:
    from lightning_act.callbacks import DimensionalCollapse
    from lightning_act.errors import LightningActError
    from lightning_act.stats.spectrum import eigensolver_problem, symmetric_eigenvalues

    with pytest.raises(LightningActError, match="eigensolver='lapack'; pass one of"):
        DimensionalCollapse(eigensolver="lapack")
    if os.environ.get("TRITON_INTERPRET") != "1":
        problem = eigensolver_problem("triton", torch.device("cpu"))
        assert problem is not None and problem.endswith("pass eigensolver='auto' or 'torch'")
        with pytest.raises(ValueError, match="pass eigensolver='auto' or 'torch'"):
            symmetric_eigenvalues(torch.eye(3, dtype=torch.float64), "triton")
    assert eigensolver_problem("torch", torch.device("cpu")) is None
    assert eigensolver_problem("auto", torch.device("cpu")) is None


@needs_triton
def test_auto_eigensolver_follows_the_measured_cost_model() -> None:
    """``"auto"`` (the monitor's default) is Triton on CUDA where it should be faster than cuSOLVER, worked by
    hand from the H100 timings of round 11: cuSOLVER 3.31 / 7.49 / 17.9 ms per matrix of width 384 / 768 / 1536,
    one after another; Triton 15.8 / 142.3 / 633.4 ms per wave of up to one matrix per multiprocessor."""
    from lightning_act.callbacks import DimensionalCollapse
    from lightning_act.stats.spectrum import auto_eigensolver

    assert DimensionalCollapse().eigensolver == "auto"
    assert auto_eigensolver("cuda", 13, 384, 132) == "triton"  # 15.8 against 13 x 3.31 = 43.0 ms (measured 15.8 / 43.1)
    assert auto_eigensolver("cuda", 4, 384, 132) == "torch"  # 15.8 against 13.2 ms
    assert auto_eigensolver("cuda", 5, 384, 132) == "triton"  # 15.8 against 16.6 ms
    assert auto_eigensolver("cuda", 1, 384, 132) == "torch"  # 15.8 against 3.31 ms (measured 15.6 / 3.5)
    assert auto_eigensolver("cuda", 13, 768, 132) == "torch"  # 142.3 against 97.4 ms (measured 142.3 / 97.4)
    assert auto_eigensolver("cuda", 18, 768, 132) == "torch"  # 142.3 against 134.8 ms
    assert auto_eigensolver("cuda", 20, 768, 132) == "triton"  # 142.3 against 149.8 ms
    assert auto_eigensolver("cuda", 13, 1536, 132) == "torch"  # 633.4 against 232.7 ms (measured 633 / 233)
    assert auto_eigensolver("cuda", 264, 384, 132) == "triton"  # two waves: 31.6 against 874 ms
    assert auto_eigensolver("cuda", 4, 1024, 132) == "torch"  # between measured widths: 264 against 43 ms
    assert auto_eigensolver("cpu", 13, 384, 0) == "torch"
    assert auto_eigensolver("meta", 13, 384, 132) == "torch"


def test_auto_eigensolver_is_torch_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_act.stats.spectrum import auto_eigensolver

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "triton" else object())
    assert auto_eigensolver("cuda", 13, 384, 132) == "torch"


def test_auto_eigensolver_falls_back_to_eigvalsh_once_when_triton_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU the Triton kernels cannot run on must not stop a fit that never asked for them: ``"auto"`` warns once,
    solves that spectrum and every later one with ``eigvalsh``, while an explicit ``"triton"`` still raises."""
    from lightning_act.stats import spectrum, triton_eigen

    real_choice = spectrum.auto_eigensolver
    monkeypatch.setattr(spectrum, "_AUTO_TRITON_FAILURE", [])
    # as if the matrices were on an H100 with triton installed
    monkeypatch.setattr(
        spectrum, "auto_eigensolver", lambda device_type, count, width, sms: real_choice("cuda", count, width, 132)
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    launches: list[int] = []

    def failing_kernel(matrices: torch.Tensor) -> torch.Tensor:
        launches.append(matrices.shape[-1])
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(triton_eigen, "tridiagonal_bisection_eigenvalues", failing_kernel)
    rows = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    matrices = rows.transpose(1, 2) @ rows
    with pytest.warns(UserWarning, match=r"eigensolver='auto': the Triton eigensolver failed .*no kernel image"):
        assert_matches_numpy(matrices, spectrum.symmetric_eigenvalues(matrices, "auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches_numpy(matrices, spectrum.symmetric_eigenvalues(matrices, "auto"))
    assert launches == [5]  # tried once, then never again
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # passes the CPU device check of an explicit "triton"
    with pytest.raises(RuntimeError, match="no kernel image"):
        spectrum.symmetric_eigenvalues(matrices, "triton")


def test_dimensional_collapse_solves_with_its_eigensolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor hands its ``eigensolver`` to every spectrum it solves, and refuses ``"triton"`` at fit start on
    a CPU model (outside the interpreter) in one line, before any step runs."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_act.callbacks import DimensionalCollapse
    from lightning_act.errors import LightningActError
    from lightning_act.stats import spectrum

    used: list[str] = []

    def recording(matrices: torch.Tensor, eigensolver: str = "torch") -> torch.Tensor:
        used.append(eigensolver)
        return torch.linalg.eigvalsh(matrices)

    monkeypatch.setattr(spectrum, "symmetric_eigenvalues", recording)
    monitor = DimensionalCollapse(eigensolver="triton")
    rows = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monitor.prepare_summaries({0: spectrum.covariance_partials(rows[0]), 1: spectrum.covariance_partials(rows[1])})
    assert used == ["triton"] and sorted(monitor._ranks) == [0, 1]
    if os.environ.get("TRITON_INTERPRET") != "1":
        one_line = r"^DimensionalCollapse: eigensolver='triton' needs .*pass eigensolver='auto' or 'torch'$"
        with pytest.raises(LightningActError, match=one_line):
            monitor.on_fit_start(None, BoringModel())  # type: ignore[arg-type]


@needs_triton
def test_triton_eigensolver_hands_wider_matrices_to_eigvalsh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the kernels' widest matrix the spectrum still comes (from ``eigvalsh``), so a wide tap never stops a
    fit; here the cap is lowered to 4 and a 5 x 5 matrix is solved on a CPU, where launching a kernel would fail."""
    from lightning_act.stats import spectrum, triton_eigen

    monkeypatch.setattr(triton_eigen, "MAX_WIDTH", 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # passes the device check; no kernel may run
    rows = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    matrix = rows.T @ rows
    assert_matches_numpy(matrix, spectrum.symmetric_eigenvalues(matrix, "triton"))


@needs_triton
def test_triton_eigensolver_refuses_other_inputs() -> None:
    from lightning_act.stats.triton_eigen import tridiagonal_bisection_eigenvalues

    with pytest.raises(ValueError, match="float64"):
        tridiagonal_bisection_eigenvalues(torch.eye(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., d, d\)"):
        tridiagonal_bisection_eigenvalues(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="d <= 2048, got 2049; use torch.linalg.eigvalsh"):
        tridiagonal_bisection_eigenvalues(torch.zeros(2049, 2049, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
def test_eigenvalues_match_numpy_float64_on_cuda() -> None:
    from lightning_act.stats.triton_eigen import tridiagonal_bisection_eigenvalues

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(13, 768, 384, generator=generator, dtype=torch.float64) * torch.arange(1, 385) ** -1.0
    cases = symmetric_cases()  # a few widths only: each width is one more compilation of both kernels
    for matrices in [cases[4], cases[-1], rows.transpose(1, 2) @ rows]:
        assert_matches_numpy(matrices, tridiagonal_bisection_eigenvalues(matrices.cuda()).cpu())
    # Widths 7 and 16 put several copies of a tile in different warps: a race between them showed in ~1 of 6 runs
    # of one solve each (round 17), so each is solved many times here.
    for matrices in (cases[3], cases[4]):
        solved = torch.stack([tridiagonal_bisection_eigenvalues(matrices.cuda()) for _ in range(200)]).cpu()
        for eigenvalues in solved:
            assert_matches_numpy(matrices, eigenvalues)


@needs_triton
def test_eigen_kernels_compile_for_hopper_without_spills() -> None:
    """Ahead-of-time compile to sm_90 (no GPU needed), at the widths a ViT-S and DimensionalCollapse's widest
    exact tap use: no local memory, no register spills where Triton ships ``ptxas`` (its own report), and the
    reduction's phases separated by barriers."""
    from _hopper import hopper_ptx, ptxas_report

    from lightning_act.stats import triton_eigen

    for d in (2, 384, 2048):
        geometry = triton_eigen.launch_geometry(d)
        kernels = [
            (triton_eigen._tridiagonalize_kernel, ("a_ptr", "diag_ptr", "off_ptr", "work_ptr"),
             {"D": d, "BLOCK": geometry["BLOCK"], "ROWS": geometry["ROWS"]}, triton_eigen.TRIDIAGONAL_WARPS),
            (triton_eigen._sturm_bisection_kernel, ("diag_ptr", "off_ptr", "out_ptr"),
             {"D": d, "BLOCK": geometry["BLOCK"], "LANES": geometry["LANES"],
              "STEPS": triton_eigen.BISECTION_STEPS}, 2),
        ]
        for kernel, pointers, constants, warps in kernels:
            ptx = hopper_ptx(kernel, {name: "*fp64" for name in pointers}, constants, warps)
            assert ".local" not in ptx, (kernel.fn.__name__, d)
            if kernel is triton_eigen._tridiagonalize_kernel and d > 2:
                assert ptx.count("bar.sync") >= 4, d
            report = ptxas_report(ptx)
            assert report is None or "0 bytes spill stores" in report, (kernel.fn.__name__, d, report)


@needs_triton
def test_each_tile_is_read_by_every_warp_holding_it_before_any_writes_it() -> None:
    """Triton holds a narrow tile in several warps at once (d = 8: the (8, 8) tile in 8 copies over 16 warps), and
    orders no memory accesses between warps: a copy read after another warp stored the update would be updated
    twice. On an H100 that made 1 in ~6 runs of the CUDA tests wrong (an erank of 5.05 for 4.51; round 17). In the
    compiled sweep a barrier must separate the tile's read from its write."""
    from _hopper import hopper_asm

    from lightning_act.stats import triton_eigen

    for d in (8, 16, 384):
        geometry = triton_eigen.launch_geometry(d)
        constants = {"D": d, "BLOCK": geometry["BLOCK"], "ROWS": geometry["ROWS"]}
        pointers = dict.fromkeys(("a_ptr", "diag_ptr", "off_ptr", "work_ptr"), "*fp64")
        ttgir = hopper_asm(triton_eigen._tridiagonalize_kernel, pointers, constants, triton_eigen.TRIDIAGONAL_WARPS,
                           "ttgir").splitlines()
        tile = f"tensor<{geometry['ROWS']}x{geometry['BLOCK']}x!tt.ptr<f64>"
        stores = [i for i, line in enumerate(ttgir) if "tt.store" in line and tile in line]
        assert len(stores) == 1, (d, stores)  # the sweep's update of the trailing block
        load = max(i for i, line in enumerate(ttgir[: stores[0]]) if "tt.load" in line and tile in line)
        assert any("barrier" in line for line in ttgir[load : stores[0]]), d
