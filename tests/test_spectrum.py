"""Known-answer tests of lightning_act.stats.spectrum against numpy float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _toy import power_law_rows

from lightning_act.stats.spectrum import (
    covariance_dim,
    covariance_partials,
    covariance_spectrum,
    effective_rank,
    explained_variance_rank,
    feature_rows,
    participation_ratio,
    count_sketch_draws,
    shift_covariance_partials,
    sketch_vector,
    sketch_with_draws,
    trajectory_r90,
    trajectory_spectrum,
)


def numpy_erank(data: np.ndarray) -> float:
    centred = data - data.mean(0)
    sigma = np.linalg.svd(centred, compute_uv=False)
    sigma = sigma[sigma > sigma.max() * 1e-10]
    p = sigma / sigma.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def numpy_pr(data: np.ndarray) -> float:
    lam = np.linalg.eigvalsh(np.cov(data, rowvar=False, bias=True))
    return float(lam.sum() ** 2 / (lam**2).sum())


def summed_partials(chunks: list[np.ndarray]) -> torch.Tensor:
    """Partials of each micro-batch / rank, added up as the SUM all-reduce does."""
    return torch.stack([covariance_partials(torch.from_numpy(c)) for c in chunks]).sum(0)


def test_rank3_activations_erank_at_most_3_and_pr_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 3)) * np.array([5.0, 2.0, 0.5]) @ rng.normal(size=(3, 24)) + 7.0
    lam = covariance_spectrum(summed_partials(np.array_split(data, 4)))
    erank = effective_rank(lam).item()
    assert erank <= 3.0 + 1e-9
    assert erank == pytest.approx(numpy_erank(data), rel=1e-9)
    assert participation_ratio(lam).item() == pytest.approx(numpy_pr(data), rel=1e-9)
    assert int((lam > 0).sum()) == 3


def test_erank_matches_numpy_svd_of_centred_data() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(200, 12)) * np.geomspace(10.0, 0.1, 12) + rng.normal(size=12)
    lam = covariance_spectrum(covariance_partials(torch.from_numpy(data)))
    assert effective_rank(lam).item() == pytest.approx(numpy_erank(data), rel=1e-10)
    assert participation_ratio(lam).item() == pytest.approx(numpy_pr(data), rel=1e-10)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_a_mean_far_above_the_spread_keeps_the_spectrum(offset: float) -> None:
    # Centring the summed Σxxᵀ cancels ~N offset² per entry; its error is ~eps Σ‖x‖² (Frobenius), so only
    # eigenvalues below that are round-off. The cut-off was d times larger: at 1e6, 30 of 64 eigenvalues zeroed,
    # erank -45% (round 17).
    rng = np.random.default_rng(3)
    data = (offset + rng.normal(size=(256, 64))).astype(np.float32).astype(np.float64)
    lam = covariance_spectrum(summed_partials(np.array_split(data, 2)), "torch")
    assert int((lam > 0).sum()) == 64
    assert effective_rank(lam).item() == pytest.approx(numpy_erank(data), rel=1e-3)
    assert participation_ratio(lam).item() == pytest.approx(numpy_pr(data), rel=2e-3)




@pytest.mark.parametrize(("d", "exponent", "shift"), [(128, 1.0, "common"), (256, 2.0, "massive")])
def test_rows_shifted_by_a_reference_keep_the_tail_of_a_power_law_under_a_large_mean(
    d: int, exponent: float, shift: str
) -> None:
    # Unshifted, the sums' round-off (eps Σ‖x‖²) is above the tail: erank -68% (offset 1e6) and -0.9% (two features
    # of 1e4 over a steep spectrum) before round 20. Shifted by one of the rows, the sums are of the spread's size.
    data = power_law_rows(512, d, exponent, shift)
    reference = torch.from_numpy(data[0])
    partials = sum(covariance_partials(torch.from_numpy(part), reference) for part in np.array_split(data, 2))
    lam = covariance_spectrum(partials, "torch")
    assert effective_rank(lam).item() == pytest.approx(numpy_erank(data), rel=1e-8)
    assert participation_ratio(lam).item() == pytest.approx(numpy_pr(data), rel=1e-8)


def test_partials_moved_to_another_reference_add_up_with_those_taken_there() -> None:
    # Under DDP each rank sums its rows shifted by its own first row, then moves the sums to the common reference.
    data = power_law_rows(512, 128, 1.0, "common")
    common = torch.from_numpy(data.mean(0))
    parts = []
    for part in np.array_split(data, 3):
        own = torch.from_numpy(part[0])
        parts.append(shift_covariance_partials(covariance_partials(torch.from_numpy(part), own), own - common))
    lam = covariance_spectrum(torch.stack(parts).sum(0), "torch")
    assert effective_rank(lam).item() == pytest.approx(numpy_erank(data), rel=1e-8)
    assert participation_ratio(lam).item() == pytest.approx(numpy_pr(data), rel=1e-8)
    hand = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # shifted by (1, 1) from (0, 0): rows (0, 1), (2, 4)
    moved = shift_covariance_partials(covariance_partials(hand, torch.ones(2)), torch.ones(2))
    assert moved.tolist() == [2.0, 4.0, 7.0, 1.0 + 9.0, 2.0 + 15.0, 2.0 + 15.0, 4.0 + 25.0]


def test_covariance_from_sums_equals_numpy_on_concatenated_data() -> None:
    rng = np.random.default_rng(2)
    ranks = [rng.normal(loc=3.0, size=(n, 5)) for n in (7, 13, 30)]
    partials = summed_partials(ranks)
    assert covariance_dim(partials.numel()) == 5
    everything = np.concatenate(ranks)
    count, total, raw = partials[0].item(), partials[1:6].numpy(), partials[6:].reshape(5, 5).numpy()
    scatter = raw - np.outer(total, total) / count
    assert count == 50
    np.testing.assert_allclose(scatter / count, np.cov(everything, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        covariance_spectrum(partials).numpy(),
        np.linalg.eigvalsh(np.cov(everything, rowvar=False, bias=True) * 50),
        rtol=1e-9,
    )


def test_constant_activations_have_zero_rank() -> None:
    lam = covariance_spectrum(covariance_partials(torch.full((10, 4), 2.5)))
    assert effective_rank(lam).item() == 0.0
    assert participation_ratio(lam).item() == 0.0


def test_feature_rows_uses_channels_of_conv_maps_and_last_dim_otherwise() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    expected = x.numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    np.testing.assert_array_equal(feature_rows(x).numpy(), expected)
    tokens = torch.randn(2, 7, 6)
    assert feature_rows(tokens).shape == (14, 6)


def test_covariance_dim_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="covariance_partials"):
        covariance_dim(10)


def numpy_r90(snapshots: np.ndarray) -> int:
    centred = snapshots - snapshots.mean(0)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variance) / variance.sum(), 0.9) + 1)


def test_explained_variance_rank_hand_worked() -> None:
    # cumulative fractions 0.5, 0.8, 0.9, 1.0: 90% is reached at k = 3
    assert explained_variance_rank(torch.tensor([5.0, 3.0, 1.0, 1.0])).item() == 3
    assert math.isnan(explained_variance_rank(torch.zeros(4)).item())  # 0/0 of an unmoved trajectory (was 0)
    assert explained_variance_rank(torch.tensor([9.5, 0.5])).item() == 1


def trajectory_in_plane(steps: int, size: int, second_scale: float) -> np.ndarray:
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(size, 2)))
    t = np.arange(steps, dtype=np.float64)
    coordinates = np.stack([t, second_scale * np.sin(t)], axis=1)
    return rng.normal(size=size) + coordinates @ basis.T


def test_ranks_of_a_stack_of_spectra_are_those_of_each() -> None:
    # three taps of one width at once (the monitor's batched path) against numpy, one tap at a time
    rng = np.random.default_rng(8)
    data = [rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) * scale for scale in (1.0, 0.1, 3.0)]
    data[1][:, 3:] = 0.0  # a lower-rank tap
    spectra = covariance_spectrum(torch.stack([covariance_partials(torch.from_numpy(x)) for x in data]))
    np.testing.assert_allclose(effective_rank(spectra).numpy(), [numpy_erank(x) for x in data], rtol=1e-9)
    np.testing.assert_allclose(participation_ratio(spectra).numpy(), [numpy_pr(x) for x in data], rtol=1e-9)


def test_r90_of_a_trajectory_in_a_known_plane() -> None:
    planar = trajectory_in_plane(20, 400, second_scale=4.0)
    assert numpy_r90(planar) == 2
    assert trajectory_r90(torch.from_numpy(planar)).item() == 2
    straight = trajectory_in_plane(20, 400, second_scale=0.0)
    assert trajectory_r90(torch.from_numpy(straight)).item() == 1


@pytest.mark.parametrize("second_scale, rank", [(4.0, 2), (0.0, 1)])
def test_r90_of_a_gram_matrix_bordered_with_zeros_is_unchanged(second_scale: float, rank: int) -> None:
    # DimensionalCollapse pads the trajectory's Gram matrix to its snapshot capacity (one Triton compile per run):
    # the zeros it adds to the spectrum must change neither the variances nor the rank
    snapshots = trajectory_in_plane(7, 300, second_scale=second_scale)
    assert numpy_r90(snapshots) == rank
    padded = trajectory_spectrum(torch.from_numpy(snapshots), pad_to=32)
    assert padded.shape == (32,) and torch.all(padded[7:] == 0)
    centred = snapshots - snapshots.mean(0)
    variances = np.linalg.svd(centred, compute_uv=False) ** 2
    np.testing.assert_allclose(padded[:7].numpy(), variances, rtol=1e-9, atol=1e-9 * variances[0])
    assert trajectory_r90(torch.from_numpy(snapshots), pad_to=32).item() == rank


def test_sketched_trajectory_keeps_r90_and_sketch_is_a_fixed_linear_map() -> None:
    planar = torch.from_numpy(trajectory_in_plane(20, 50_000, second_scale=4.0))
    sketched = torch.stack([sketch_vector(w, 512, seed=7, chunk=1 << 14) for w in planar])
    assert trajectory_r90(sketched).item() == 2
    x, y = planar[0], planar[1]
    head = sketch_vector(x[:30_000], 512, 7, chunk=1 << 14)
    split = head + sketch_vector(x[30_000:], 512, 7, offset=30_000, chunk=1 << 14)
    torch.testing.assert_close(split, sketch_vector(x, 512, 7, chunk=1 << 14), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        sketch_vector(x + y, 512, 7, chunk=1 << 14),
        sketch_vector(x, 512, 7, chunk=1 << 14) + sketch_vector(y, 512, 7, chunk=1 << 14),
        rtol=1e-12, atol=1e-9,
    )
    noise = torch.from_numpy(np.random.default_rng(4).normal(size=50_000))
    ratio = sketch_vector(noise, 4096, 1).square().sum() / noise.square().sum()
    assert abs(ratio.item() - 1.0) < 0.15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sketch_is_the_signed_bucket_sum_in_float64(dtype: torch.dtype) -> None:
    # numpy float64: out[draw mod dim] += sign * x[j], sign +1 for draws >= dim; x rounded to ``dtype`` first, as a
    # weight of that dtype is; the parts split the vector unevenly
    x = torch.from_numpy(np.random.default_rng(5).normal(size=20_000)).to(dtype)
    draws = count_sketch_draws(x.numel(), 256, seed=3)
    assert draws.dtype == torch.int32 and int(draws.min()) >= 0 and int(draws.max()) < 512
    expected = np.zeros(256)
    signs = np.where(draws.numpy() >= 256, 1.0, -1.0)
    np.add.at(expected, draws.numpy() % 256, signs * x.double().numpy())
    sketch = sketch_with_draws([x[:7], x[7:12_345], x[12_345:].reshape(-1, 5)], draws, 256)
    assert sketch.dtype == torch.float64
    np.testing.assert_allclose(sketch.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sketch_vector(x, 256, seed=3).numpy(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="parts hold"):
        sketch_with_draws([x[:100]], draws, 256)


def test_sketch_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    sketch_vector(torch.ones(1000), 64, seed=0)
    assert torch.equal(before, torch.get_rng_state())


def test_non_finite_activations_give_nan_not_an_error() -> None:
    rows = torch.randn(6, 3, dtype=torch.float64)
    rows[2, 1] = float("nan")
    lam = covariance_spectrum(covariance_partials(rows))
    assert torch.isnan(lam).all()
    assert torch.isnan(effective_rank(lam))
    assert torch.isnan(participation_ratio(lam))
