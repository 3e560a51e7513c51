"""Each classical detector against a direct numpy float64 evaluation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_act.models.hsi_detectors import (
    ClassicalDetectors,
    ace_score,
    cem_score,
    mf_score,
    regularise,
    sam_score,
)

BANDS = 9
RIDGE = 0.05


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    mixing = rng.normal(size=(BANDS, BANDS))
    background = rng.normal(size=(400, BANDS)) @ mixing + rng.uniform(1.0, 3.0, size=BANDS)
    target = rng.uniform(0.5, 4.0, size=BANDS)
    pixels = np.vstack([rng.normal(size=(30, BANDS)) @ mixing + 2.0, target[None] * rng.uniform(0.3, 1.5, (5, 1))])
    return {"background": background, "target": target, "pixels": pixels}


def _numpy_stats(background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, b = background.shape
    mu = background.sum(0) / n
    sigma = np.einsum("ni,nj->ij", background - mu, background - mu) / n
    r = np.einsum("ni,nj->ij", background, background) / n
    sigma = sigma + RIDGE * np.trace(sigma) / b * np.eye(b)
    r = r + RIDGE * np.trace(r) / b * np.eye(b)
    return mu, sigma, r


def _fitted(data: dict[str, np.ndarray]) -> ClassicalDetectors:
    return ClassicalDetectors(ridge=RIDGE).fit(torch.from_numpy(data["background"]), torch.from_numpy(data["target"]))


def test_regularised_statistics(data: dict[str, np.ndarray]) -> None:
    mu, sigma, r = _numpy_stats(data["background"])
    det = _fitted(data)
    np.testing.assert_allclose(det.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(det.covariance.numpy(), sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(det.autocorrelation.numpy(), r, rtol=1e-10, atol=1e-12)
    m = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    # tr/B = 3, so ridge 0.5 adds 1.5 to the diagonal.
    torch.testing.assert_close(regularise(m, 0.5), torch.tensor([[3.5, 1.0], [1.0, 5.5]], dtype=torch.float64))


def test_sam(data: dict[str, np.ndarray]) -> None:
    x, t = data["pixels"], data["target"]
    cosines = [np.dot(p, t) / (np.sqrt(np.dot(p, p)) * np.sqrt(np.dot(t, t))) for p in x]
    expected = -np.arccos(np.clip(cosines, -1.0, 1.0))  # rounding can put cos(0) a hair above 1
    got = sam_score(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    # arccos of a rounded cosine is only good to ~1e-8 rad near angle 0, hence the atol.
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-7)
    np.testing.assert_allclose(got[-5:], 0.0, atol=1e-14)  # positive multiples of t: angle exactly 0
    right_angle = sam_score(torch.tensor([[0.0, 2.0], [-3.0, 0.0]]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(right_angle, torch.tensor([-np.pi / 2, -np.pi]))


def test_mf(data: dict[str, np.ndarray]) -> None:
    mu, sigma, _ = _numpy_stats(data["background"])
    x, t = data["pixels"], data["target"]
    sigma_inv = np.linalg.inv(sigma)
    w = sigma_inv @ (t - mu) / ((t - mu) @ sigma_inv @ (t - mu))
    expected = (x - mu) @ w
    np.testing.assert_allclose(_fitted(data)(torch.from_numpy(x))["MF"].numpy(), expected, rtol=1e-9)
    got = mf_score(torch.from_numpy(np.vstack([t, mu])), torch.from_numpy(t), torch.from_numpy(mu), torch.from_numpy(sigma))
    np.testing.assert_allclose(got.numpy(), [1.0, 0.0], atol=1e-12)


def test_an_integer_cube_gets_real_valued_scores(data: dict[str, np.ndarray]) -> None:
    # raw ENVI counts (int16): before, every score was cast back to int16, and MF/ACE/CEM/SAM below 1 became 0
    x = np.round(data["pixels"] * 100).astype(np.int16)
    mu, sigma, _ = _numpy_stats(data["background"] * 100)
    t = data["target"] * 100
    sigma_inv = np.linalg.inv(sigma)
    expected = (x - mu) @ (sigma_inv @ (t - mu) / ((t - mu) @ sigma_inv @ (t - mu)))
    scores = ClassicalDetectors(ridge=RIDGE).fit(torch.from_numpy(data["background"] * 100), torch.from_numpy(t))(
        torch.from_numpy(x)
    )
    assert all(score.dtype == torch.float32 for score in scores.values())
    np.testing.assert_allclose(scores["MF"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ace(data: dict[str, np.ndarray]) -> None:
    mu, sigma, _ = _numpy_stats(data["background"])
    x, t = data["pixels"], data["target"]
    sigma_inv = np.linalg.inv(sigma)
    d = t - mu
    expected = np.array([(d @ sigma_inv @ (p - mu)) ** 2 / ((d @ sigma_inv @ d) * ((p - mu) @ sigma_inv @ (p - mu))) for p in x])
    got = _fitted(data)(torch.from_numpy(x))["ACE"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert ((got >= 0) & (got <= 1 + 1e-12)).all()
    batched = ace_score(torch.from_numpy(x.reshape(5, 7, BANDS)), torch.from_numpy(t), torch.from_numpy(mu), torch.from_numpy(sigma))
    np.testing.assert_allclose(batched.numpy().reshape(-1), expected, rtol=1e-9)


def test_cem(data: dict[str, np.ndarray]) -> None:
    _, _, r = _numpy_stats(data["background"])
    x, t = data["pixels"], data["target"]
    r_inv = np.linalg.inv(r)
    w = r_inv @ t / (t @ r_inv @ t)
    np.testing.assert_allclose(_fitted(data)(torch.from_numpy(x))["CEM"].numpy(), x @ w, rtol=1e-9)
    got = cem_score(torch.from_numpy(t[None]), torch.from_numpy(t), torch.from_numpy(r))
    assert got.item() == pytest.approx(1.0, rel=1e-12)


def test_ridge_makes_rank_deficient_background_usable() -> None:
    rng = np.random.default_rng(1)
    background = rng.normal(size=(4, 12))  # fewer pixels than bands: Σ and R are singular
    det = ClassicalDetectors(ridge=1e-2).fit(torch.from_numpy(background), torch.from_numpy(rng.normal(size=12)))
    scores = det(torch.from_numpy(rng.normal(size=(6, 12))))
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_float32_input_and_state_dict_round_trip(data: dict[str, np.ndarray]) -> None:
    det = _fitted(data)
    x32 = torch.from_numpy(data["pixels"]).float()
    restored = ClassicalDetectors(ridge=RIDGE)
    restored.load_state_dict(det.state_dict())
    for name, score in restored(x32).items():
        assert score.dtype == torch.float32
        torch.testing.assert_close(score, det(x32)[name])
    with pytest.raises(RuntimeError, match="fit"):
        ClassicalDetectors()(x32)


def test_against_the_spectral_package(data: dict[str, np.ndarray]) -> None:
    """SAM, MF and ACE against spectral.algorithms (code we did not write), with our regularised Σ."""
    from spectral.algorithms import GaussianStats, ace, matched_filter, spectral_angles

    detectors = ClassicalDetectors(ridge=RIDGE).fit(torch.from_numpy(data["background"]), torch.from_numpy(data["target"]))
    pixels = data["pixels"]
    ours = {name: score.numpy() for name, score in detectors(torch.from_numpy(pixels)).items()}
    stats = GaussianStats(mean=detectors.mean.numpy(), cov=detectors.covariance.numpy())
    image = pixels.reshape(5, 7, BANDS)  # spectral wants (rows, columns, bands) for SAM
    np.testing.assert_allclose(ours["SAM"], -spectral_angles(image, data["target"][None]).reshape(-1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours["MF"], matched_filter(pixels, data["target"], background=stats).reshape(-1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours["ACE"], ace(pixels, data["target"], background=stats).reshape(-1), rtol=1e-9, atol=1e-12)


def test_non_finite_background_is_refused() -> None:
    background = torch.ones(10, 3)
    background[4, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values in the background pixels"):
        ClassicalDetectors().fit(background, torch.ones(3))


def test_fewer_than_two_background_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="1 background pixel"):  # before: NaN statistics, NaN scores
        ClassicalDetectors().fit(torch.ones(1, 4), torch.ones(4))


@pytest.mark.parametrize(("background", "ridge"), [
    (torch.ones(10, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]), 1e-3),  # identical pixels: tr Σ = 0, so no ridge helps
    (torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), 0.0),  # fewer pixels than bands, no ridge
])
def test_a_singular_background_is_refused_at_fit(background: torch.Tensor, ridge: float) -> None:
    # before: fit accepted it and scoring stopped with torch's LinAlgError traceback (CEM lost with MF and ACE)
    fix = "pass ridge > 0" if ridge == 0 else "pass background pixels that vary .*no ridge helps"  # round 27
    with pytest.raises(ValueError, match=rf"^the background covariance Σ is singular .*{fix}"):
        ClassicalDetectors(ridge=ridge).fit(background, torch.ones(background.shape[1]))


@pytest.mark.parametrize(("target", "undefined"), [("mean", "MF and ACE"), ("zeros", "SAM and CEM")])
def test_a_target_that_leaves_a_detector_undefined_is_refused_at_fit(target: str, undefined: str) -> None:
    # before: fit accepted it and MF (or CEM) scored NaN at every pixel, ACE 0 at every pixel
    background = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3.0
    spectrum = background.mean(0) if target == "mean" else torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^the target spectrum equals .*, so {undefined} are undefined"):
        ClassicalDetectors().fit(background, spectrum)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_a_cast_module_keeps_its_statistics_in_float64(data: dict[str, np.ndarray], cast: str) -> None:
    # Raw sensor counts: Σ ~ 1e7 overflows float16 (before: every MF/ACE/CEM score NaN after .half()).
    background, target = data["background"] * 1e4, data["target"] * 1e4
    det = ClassicalDetectors(ridge=RIDGE).fit(torch.from_numpy(background), torch.from_numpy(target))
    x = torch.from_numpy(data["pixels"] * 1e4)
    expected = {name: score.numpy() for name, score in det(x).items()}
    getattr(det, cast)()
    assert det.covariance.dtype == torch.float64
    for name, score in det(x).items():  # x stays float64: the scores may differ only by the statistics
        np.testing.assert_allclose(score.numpy(), expected[name], rtol=1e-12, atol=1e-12)
