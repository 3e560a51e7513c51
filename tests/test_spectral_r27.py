"""Round 27: hyperspectral loaders, classical detectors, PMish and Spectral-NN's rank metrics on bad or unusual input."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.io
import torch
from sklearn.metrics import average_precision_score
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.data.hyperspectral import HyperspectralDataModule, load_scene, read_envi
from lightning_act.errors import DataFormatError
from lightning_act.models.hsi_detectors import ClassicalDetectors
from lightning_act.nn.pmish import PMish
from lightning_act.tasks.spectral_detection import SpectralTargetDetection

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_raw(directory: Path, name: str, array: np.ndarray, data_type: int, extra: str = "") -> Path:
    """``array`` (lines, samples, bands) as a little-endian BIP file with a hand-written ENVI header."""
    lines, samples, bands = array.shape
    (directory / f"{name}.img").write_bytes(np.ascontiguousarray(array).tobytes())
    header = directory / f"{name}.hdr"
    header.write_text(
        f"ENVI\nsamples = {samples}\nlines = {lines}\nbands = {bands}\ndata type = {data_type}\ninterleave = bip\n"
        f"byte order = 0\n{extra}"
    )
    return header


@pytest.mark.parametrize(
    ("dtype", "data_type", "ignore", "target_values"), [("<u1", 1, 255, None), ("<i2", 2, -1, [2]), ("<i2", 2, -1, None)]
)
def test_envi_mask_data_ignore_value_pixels_are_background(
    tmp_path: Path, dtype: str, data_type: int, ignore: int, target_values: list[int] | None
) -> None:
    # docs/spectral_nn.md: in a mask's header the data ignore value marks unlabelled pixels, read as background;
    # they used to become targets under the default rule (any non-zero value)
    cube = np.random.default_rng(0).uniform(0.1, 0.5, (4, 5, 3)).astype("<f4")
    header = _write_raw(tmp_path, "cube", cube, 4)
    labels = np.zeros((4, 5), dtype=dtype)
    labels[1, 2], labels[0, 4] = 1, 2
    labels[3, :] = ignore
    mask_header = _write_raw(tmp_path, "gt", labels[..., None], data_type, f"data ignore value = {ignore}\n")
    scene = load_scene(header, mask_header, target_values=target_values)
    labelled = labels.astype(np.int64) != ignore
    expected = labelled & (np.isin(labels, target_values) if target_values else labels != 0)
    np.testing.assert_array_equal(scene.mask, expected)


@pytest.mark.parametrize("seed", [1, 10])
def test_ridge_zero_with_as_many_pixels_as_bands_is_refused_in_one_line(seed: int) -> None:
    # N = B pixels: numpy's rank of Σ is B - 1 by construction; fit used to accept it (Cholesky passes on round-off,
    # ACE ≈ 1 everywhere) or die with a raw torch LinAlgError
    rng = np.random.default_rng(seed)
    background, target = rng.uniform(0.1, 0.5, (6, 6)), rng.uniform(0.1, 0.5, 6)
    centred = background - background.mean(0)
    assert np.linalg.matrix_rank(centred.T @ centred / 6) < 6
    with pytest.raises(ValueError, match=r"^the background covariance Σ is singular .*pass ridge > 0[^\n]*$"):
        ClassicalDetectors(ridge=0.0).fit(torch.tensor(background), torch.tensor(target))


def test_ridge_zero_refuses_a_numerically_dependent_band_and_keeps_full_rank_data() -> None:
    rng = np.random.default_rng(3)
    background, target = rng.uniform(0.1, 0.5, (200, 5)), rng.uniform(0.1, 0.5, 5)
    ClassicalDetectors(ridge=0.0).fit(torch.tensor(background), torch.tensor(target))  # full rank: accepted
    background[:, 4] = background[:, 0] + 0.3 * background[:, 1] - background[:, 2]
    assert np.linalg.matrix_rank(np.cov(background.T, bias=True)) == 4
    with pytest.raises(ValueError, match="singular"):
        ClassicalDetectors(ridge=0.0).fit(torch.tensor(background), torch.tensor(target))
    # a ridge makes the same pixels usable, and the matched filter is 1 at the target (its definition)
    detectors = ClassicalDetectors(ridge=1e-3).fit(torch.tensor(background), torch.tensor(target))
    assert float(detectors(torch.tensor(target)[None])["MF"][0]) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("ridge", [math.nan, math.inf, True, "1e-3"])
def test_non_finite_or_non_number_ridge_is_refused_at_construction(ridge: object) -> None:
    with pytest.raises(ValueError, match=r"^ridge must be a finite number >= 0, got .*; pass a small value"):
        ClassicalDetectors(ridge)  # type: ignore[arg-type]


def test_a_band_constant_in_training_is_centred_not_blown_up(tmp_path: Path) -> None:
    # a dead band (0 in training, 0.02 in held-out crops) was divided by 1e-6 x the global std: ~1e5 test inputs.
    # scikit-learn's StandardScaler uses scale 1 for a constant feature; the other bands keep their std (ddof=1)
    rng = np.random.default_rng(0)
    cube = rng.uniform(0.1, 0.5, (16, 16, 4)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[2::4, 2::4] = 1
    cube[..., 2] = 0.02
    scipy.io.savemat(tmp_path / "s.mat", {"cube": cube, "gt": mask})
    probe = HyperspectralDataModule(path=str(tmp_path / "s.mat"), crop_size=4, seed=0)
    with pytest.warns(UserWarning, match="constant"):  # band 2 is 0.02 everywhere so far
        probe.setup("fit")
    for scene in probe.scenes["train"]:  # the split depends on the seed and the mask only: make band 2 dead there
        rows, cols = scene.name[scene.name.index("[") + 1 : -1].split(",")
        (r0, r1), (c0, c1) = map(int, rows.split(":")), map(int, cols.split(":"))
        cube[r0:r1, c0:c1, 2] = 0.0
    scipy.io.savemat(tmp_path / "s.mat", {"cube": cube, "gt": mask})
    data = HyperspectralDataModule(path=str(tmp_path / "s.mat"), crop_size=4, seed=0)
    with pytest.warns(UserWarning, match=r"band\(s\) \[2\] \(0-based\) are constant in the training pixels"):
        data.setup("fit")
    train, test = data.train_pixels.numpy().astype(np.float64), data.test_pixels.numpy().astype(np.float64)
    scale = train.std(0, ddof=1)
    scale[2] = 1.0
    expected = (test - train.mean(0)) / scale
    np.testing.assert_allclose(data.test_set.tensors[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected[:, 2]).max() == pytest.approx(0.02, rel=1e-6)


def _fitted_free_model() -> SpectralTargetDetection:
    torch.manual_seed(0)
    return SpectralTargetDetection(in_bands=4, hidden_sizes=[8], pos_weight=None)


def _trainer() -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_soft_evaluation_labels_log_nan_rank_metrics_with_one_warning() -> None:
    # labels.long() cut 0.7 to 0: val/ap was the AP of the partly covered targets as background, without a word
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    soft = torch.zeros(64)
    soft[:8], soft[8:10] = 0.7, 1.0
    model = _fitted_free_model()
    loader = DataLoader(TensorDataset(x, soft), batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        val = _trainer().validate(model, loader, verbose=False)[0]
        test = _trainer().test(model, loader, verbose=False)[0]
    said = [str(w.message) for w in caught if "neither 0 nor 1" in str(w.message)]
    assert len(said) == 2 and "8 val labels" in said[0] and "8 test labels" in said[1]
    assert math.isnan(val["val/ap"]) and math.isnan(val["val/auroc"]) and math.isnan(test["test/ap"])
    assert model.test_pr_curve is None
    # the loss still takes the soft labels (as training does): plain BCE by hand
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    p = torch.sigmoid(logits)
    bce = float(-(soft * torch.log(p) + (1 - soft) * torch.log(1 - p)).mean())
    assert val["val/loss"] == pytest.approx(bce, rel=1e-5)
    # binarised labels are measured: sklearn's AP of the same logits
    hard = (soft >= 0.5).float()
    measured = _trainer().validate(model, DataLoader(TensorDataset(x, hard), batch_size=32), verbose=False)[0]
    assert measured["val/ap"] == pytest.approx(average_precision_score(hard.numpy(), logits.numpy()), abs=1e-6)


@pytest.mark.parametrize("byte_order", ["2", "-1"])
def test_envi_byte_order_other_than_0_or_1_is_refused(tmp_path: Path, byte_order: str) -> None:
    cube = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    header = _write_raw(tmp_path, "x", cube, 4)
    header.write_text(header.read_text().replace("byte order = 0", f"byte order = {byte_order}"))
    with pytest.raises(DataFormatError, match=rf"byte order '{byte_order}'; set 'byte order' to 0 .* or 1 [^\n]*$"):
        read_envi(header)
    header.write_text(header.read_text().replace(f"byte order = {byte_order}", "byte order = 0"))
    np.testing.assert_array_equal(read_envi(header)[0], cube)


def test_pmish_beta_init_below_beta_min_is_refused() -> None:
    # the forward used beta_min while repr printed beta_init, and the clamped β never received a gradient
    with pytest.raises(ValueError, match=r"^PMish beta_init=1 is below beta_min=2, .*pass beta_init >= beta_min$"):
        PMish(beta_init=1.0, beta_min=2.0)
    layer = PMish(beta_init=2.0, beta_min=2.0)
    x = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    expected = [v * math.tanh(math.log1p(math.exp(2.0 * v)) / 2.0) for v in x.tolist()]
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12)
