import numpy as np
import pytest
import torch

from lightning_act.stats import moment_partials, summarize_moments


def numpy_moments(a: np.ndarray, zero_threshold: float = 0.0) -> dict:
    a = a.astype(np.float64).ravel()
    finite = a[np.isfinite(a)]
    return {
        "count": float(a.size), "mean": finite.mean(), "std": finite.std(), "rms": np.sqrt((finite**2).mean()),
        "abs_mean": np.abs(finite).mean(), "abs_max": np.abs(finite).max(),
        "zero_frac": (np.abs(finite) <= zero_threshold).sum() / a.size, "nonfinite": float((~np.isfinite(a)).sum()),
    }


def summarize(x, zero_threshold=0.0):
    sums, maxima = moment_partials(x, zero_threshold)
    return {k: v.item() for k, v in summarize_moments(sums, maxima).items()}


def test_moments_match_numpy_with_nonfinite_entries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 11, 13)).astype(np.float32)
    a[a < -0.8] = 0.0
    a[0, 0, :3] = [np.nan, np.inf, -np.inf]
    got = summarize(torch.from_numpy(a))
    want = numpy_moments(a)
    assert got["nonfinite"] == 3.0
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-9, err_msg=key)


def test_zero_threshold_and_partials_add_up_across_chunks():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 32)).astype(np.float32)
    whole = moment_partials(torch.from_numpy(a), 0.25)
    parts = [moment_partials(torch.from_numpy(c), 0.25) for c in np.split(a, 4)]
    sums = sum(p[0] for p in parts)
    maxima = torch.stack([p[1] for p in parts]).amax(0)
    torch.testing.assert_close(sums, whole[0])
    torch.testing.assert_close(maxima, whole[1])
    got = {k: v.item() for k, v in summarize_moments(sums, maxima).items()}
    np.testing.assert_allclose(got["zero_frac"], numpy_moments(a, 0.25)["zero_frac"])


def test_bfloat16_input_is_upcast():
    x = torch.randn(40, 50).to(torch.bfloat16)
    got = summarize(x)
    want = numpy_moments(x.float().numpy())
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-9, err_msg=key)


def test_std_is_right_where_float32_sums_resolve_it_and_nan_where_they_cannot():
    spread = 0.01 * np.random.default_rng(2).normal(size=(64, 256))
    for offset, resolved in ((3.0, True), (1e4, False)):  # |mean| / std = 300 (within reach) and 1e6
        a = (offset + spread).astype(np.float32)
        got = summarize(torch.from_numpy(a))
        want = np.float64(a).std()
        if resolved:
            np.testing.assert_allclose(got["std"], want, rtol=0.01)
        else:  # before: 0.0374 at offset 1e3 for a true 0.0100 (+273%), a number off by far more than it said
            assert np.isnan(got["std"])
        np.testing.assert_allclose(got["mean"], np.float64(a).mean(), rtol=1e-6)


def test_a_constant_layer_has_std_zero_and_a_nearly_constant_one_stays_unknown():
    for value in (0.5, -3.0, 1e20, 7e-30):  # before: NaN (unknown) for every non-zero constant
        assert summarize(torch.full((8, 16, 32), value))["std"] == np.float32(value).std() == 0.0
    a = np.full((64, 256), 1e4, dtype=np.float32)
    a[0, 0] = np.nextafter(np.float32(1e4), np.float32(np.inf))  # std 6e-7 of a mean 1e4: past the sums' resolution
    got = summarize(torch.from_numpy(a))
    assert np.isnan(got["std"]) and np.float64(a).std() > 0
    assert summarize(torch.tensor([2.0, -2.0, 2.0, -2.0]))["std"] == pytest.approx(2.0, rel=1e-15)


def test_no_finite_entry_gives_unknown_moments_and_float64_inputs_stay_float64():
    got = summarize(torch.full((4, 3), float("nan")))
    assert got["nonfinite"] == 12 and got["count"] == 12 and got["zero_frac"] == 0.0
    assert all(np.isnan(got[k]) for k in ("mean", "std", "rms", "abs_mean", "abs_max"))  # before: all 0.0
    a = np.array([1e300, 1e-200, 2.0, 3.0])  # not representable in float32: was inf / 0 there
    got = summarize(torch.from_numpy(a))
    want = numpy_moments(a)
    assert got["nonfinite"] == 0 and got["abs_max"] == 1e300 and got["zero_frac"] == 0.0
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-15)
    got = summarize(torch.full((8,), 1e20))  # its float32 squares overflowed (rms NaN before round 17): float64 now
    value = float(np.float32(1e20))
    assert got["mean"] == pytest.approx(value, rel=1e-15) and got["rms"] == pytest.approx(value, rel=1e-15)
    assert got["std"] == 0.0  # every entry the same: exactly 0 (NaN, unknown, before round 20)


def test_zero_threshold_compares_as_real_numbers():
    # float32(0.1) is above the real 0.1: an entry equal to it is not within the threshold 0.1
    a = torch.tensor([0.1, 0.05, 0.2, -0.1], dtype=torch.float32)
    assert summarize(a, 0.1)["zero_frac"] == 0.25
    from lightning_act.stats.sparsity import zero_partials

    assert zero_partials(a, 0.1)[2].item() == 1.0
