"""Round 25: the sketch's flush builds ``Y = Xᵀ J Z`` in place and factors it where it lies (issue: 1.5 GiB at
d = 8192, k = 4096, several ``d x k`` copies). The spectrum is checked against float64 numpy on small cases with
offsets, non-finite sums and ``d < k``; the flush's peak memory is checked in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_act
from lightning_act.stats.covariance_sketch import gaussian_test_matrix, sketch_partials, sketch_size, sketch_spectrum

#: the tree of the package under test, for the peak-memory subprocess
PACKAGE_ROOT = Path(lightning_act.__file__).resolve().parents[1]


def numpy_spectrum(rows: np.ndarray, length: int) -> np.ndarray:
    """The ``length`` largest eigenvalues of the centred scatter of ``rows``, ascending, from float64 numpy."""
    centred = rows - rows.mean(0)
    return np.clip(np.linalg.eigvalsh(centred.T @ centred), 0.0, None)[-length:]


def low_rank_rows(n: int, d: int, offset: float, seed: int) -> np.ndarray:
    """``n`` float32-valued rows of a decaying spectrum around a common ``offset``."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.75 + offset
    return rows.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize(("d", "k", "offset"), [(96, 40, 0.0), (96, 40, 500.0), (24, 40, 3.0)])
def test_sketch_spectrum_equals_numpy_and_leaves_the_sums_alone(d: int, k: int, offset: float) -> None:
    rows = low_rank_rows(k - 1, d, offset, seed=d + k)  # rank(centred) <= k - 1: the sketch is exact
    omega = gaussian_test_matrix(d, k, seed=3)
    halves = np.array_split(rows, 2)
    reference = torch.from_numpy(rows[0])
    partials = sum(sketch_partials(torch.from_numpy(part).float(), omega, reference) for part in halves)
    held = partials.clone()
    spectrum = sketch_spectrum(partials, d, k).numpy()
    expected = numpy_spectrum(rows, min(d, k))
    assert spectrum.shape == expected.shape
    # the nonzero eigenvalues; round-off ones (below 1e-10 of the largest) are zero in the sketch's result
    nonzero = np.where(expected > 1e-10 * expected[-1], expected, 0.0)
    assert spectrum == pytest.approx(nonzero, rel=1e-8, abs=1e-9 * expected[-1])
    assert torch.equal(partials, held)


@pytest.mark.parametrize("part", ["row", "cross", "core"])
def test_non_finite_sums_give_nan_whichever_part_holds_them(part: str) -> None:
    d, k = 64, 24
    rows = low_rank_rows(k - 1, d, 2.0, seed=1)
    omega = gaussian_test_matrix(d, k, seed=0)
    if part == "row":
        rows[5] = np.nan
    partials = sketch_partials(torch.from_numpy(rows).float(), omega)
    if part == "cross":  # Xᵀ Z alone: the core is finite and its eigensolver runs
        partials[2 + d + k + 7 * k + 3] = float("inf")
    if part == "core":
        partials[sketch_size(d, k) - 2] = float("nan")
    assert torch.isnan(sketch_spectrum(partials, d, k)).all()


PEAK = r"""
import json, sys, torch
from lightning_act.stats.covariance_sketch import sketch_spectrum, sketch_size
d, k = int(sys.argv[1]), int(sys.argv[2])
def resident(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
partials = torch.randn(sketch_size(d, k), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
partials[0] = k - 1.0
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak from here on
base = resident("VmRSS")
sketch_spectrum(partials, d, k)
print(json.dumps((resident("VmHWM") - base) / (d * k)))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
def test_flush_peak_is_one_cross_matrix_not_three() -> None:
    # d k 8 bytes = 34 MiB, above glibc's largest mmap threshold: freed at once, so the peak is the code's own
    d, k = 8192, 520
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PACKAGE_ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(d), str(k)], capture_output=True, text=True, env=env, check=True
    )
    bytes_per_entry = json.loads(out.stdout.strip().splitlines()[-1])
    # Y itself is 8 bytes per d*k, the k x k matrices and the allocator's leftovers ~5 more (measured 12.5-13.3);
    # round 24's copies of Y made it 22.4
    assert bytes_per_entry < 17.0
