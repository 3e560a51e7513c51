"""Synthetic scene generator, ENVI/.mat loaders and the hyperspectral datamodule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from lightning_act.data.hyperspectral import (
    HyperspectralDataModule,
    load_scene,
    make_synthetic_scene,
    make_synthetic_scenes,
    read_envi,
    read_mask,
    read_mat,
    split_scenes,
)
from lightning_act.errors import ConfigError, DataFormatError, DataNotFoundError

SMALL = {"size": 24, "num_bands": 16, "targets_per_scene": (2, 3), "clutter_per_scene": (1, 2)}


def test_synthetic_scene_properties() -> None:
    scenes = make_synthetic_scenes(3, seed=5, **SMALL)
    for scene in scenes:
        assert scene.cube.shape == (24, 24, 16) and scene.cube.dtype == np.float32
        assert scene.mask.shape == (24, 24) and scene.mask.dtype == bool
        assert np.isfinite(scene.cube).all()
        # Sparse targets: a handful of pixels, each labelled pixel at least partly covered.
        assert 2 <= scene.mask.sum() <= 0.05 * scene.mask.size
        assert (scene.abundance[scene.mask] > 0).all()
        assert scene.abundance.min() == 0.0 and scene.abundance.max() <= 1.0
        # Sub-pixel targets: some covered pixels are only partly covered.
        assert ((scene.abundance > 0) & (scene.abundance < 1)).any()
    assert len({s.name for s in scenes}) == 3
    assert not np.allclose(scenes[0].cube, scenes[1].cube[:, :, :])


def test_synthetic_scenes_are_deterministic_by_seed() -> None:
    a = make_synthetic_scene(1, seed=3, **SMALL)
    b = make_synthetic_scene(1, seed=3, **SMALL)
    c = make_synthetic_scene(1, seed=4, **SMALL)
    np.testing.assert_array_equal(a.cube, b.cube)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.cube, c.cube)


def test_target_pixels_are_mixtures_towards_the_target_spectrum() -> None:
    scene = make_synthetic_scene(0, seed=0, noise_std=0.0, **SMALL)
    pixels = scene.cube.reshape(-1, scene.cube.shape[-1])
    unit_pixels = pixels / np.linalg.norm(pixels, axis=-1, keepdims=True)
    cosine = unit_pixels @ (scene.target_spectrum / np.linalg.norm(scene.target_spectrum))
    labelled = scene.mask.reshape(-1)
    assert np.median(cosine[labelled]) > np.median(cosine[~labelled])


def test_split_scenes_is_disjoint_and_covers_all() -> None:
    has_target = [True] * 10 + [False] * 6
    train, val, test = split_scenes(has_target, 0.2, 0.3, seed=0)
    assert set(train) | set(val) | set(test) == set(range(16))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sum(has_target[i] for i in test) == 3 and sum(has_target[i] for i in val) == 2
    assert split_scenes(has_target, 0.2, 0.3, seed=0) == (train, val, test)
    with pytest.raises(DataFormatError, match="cannot fill"):
        split_scenes([True, True], 0.2, 0.3, seed=0)


def test_datamodule_splits_by_scene_and_standardises_from_train() -> None:
    dm = HyperspectralDataModule(num_scenes=5, scene_size=16, num_bands=12, val_fraction=0.2, test_fraction=0.2, seed=1)
    dm.setup("fit")
    names = {split: {s.name for s in scenes} for split, scenes in dm.scenes.items()}
    assert [len(names[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert not (names["train"] & names["test"] or names["train"] & names["val"] or names["val"] & names["test"])
    assert dm.train_pixels.shape == (3 * 16 * 16, 12) and dm.test_pixels.shape == (16 * 16, 12)
    raw = np.concatenate([s.cube.reshape(-1, 12) for s in dm.scenes["train"]]).astype(np.float64)
    standardised, labels = dm.train_set.tensors
    np.testing.assert_allclose(standardised.numpy(), (raw - raw.mean(0)) / raw.std(0, ddof=1), rtol=1e-3, atol=1e-4)
    positives = sum(int(s.mask.sum()) for s in dm.scenes["train"])
    assert int(labels.sum()) == positives
    assert dm.pos_weight == pytest.approx((raw.shape[0] - positives) / positives)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (min(512, len(labels)), 12) and y.dtype == torch.float32


# --------------------------------------------------------------------------- loaders


def _write_envi(directory: Path, cube: np.ndarray, interleave: str, name: str = "cube") -> Path:
    """Write ``cube`` (H, W, B) as raw float32 little-endian with a hand-written ENVI header."""
    lines, samples, bands = cube.shape
    axes = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
    np.ascontiguousarray(cube.transpose(axes)).astype("<f4").tofile(directory / f"{name}.img")
    header = directory / f"{name}.hdr"
    header.write_text(
        "ENVI\n"
        f"samples = {samples}\nlines = {lines}\nbands = {bands}\nheader offset = 0\n"
        f"file type = ENVI Standard\ndata type = 4\ninterleave = {interleave}\nbyte order = 0\n"
        "wavelength = {" + ", ".join(str(400 + 10 * b) for b in range(bands)) + "}\n"
    )
    return header


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
def test_envi_round_trip_each_interleave(tmp_path: Path, interleave: str) -> None:
    cube = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    cube[2, 4, 1] = 123.0  # one marked entry: row 2, column 4, band 1
    read, wavelengths = read_envi(_write_envi(tmp_path, cube, interleave))
    assert read.shape == (5, 7, 3) and read[2, 4, 1] == 123.0
    np.testing.assert_array_equal(read, cube)
    np.testing.assert_array_equal(wavelengths, [400.0, 410.0, 420.0])


def test_envi_written_by_spectral_and_mask(tmp_path: Path) -> None:
    from spectral.io import envi

    cube = np.random.default_rng(1).uniform(size=(6, 4, 5)).astype(np.float32)
    envi.save_image(str(tmp_path / "scene.hdr"), cube, interleave="bil", dtype=np.float32)
    mask = np.zeros((6, 4), dtype=np.uint8)
    mask[1, 2] = 3
    mask[4, 0] = 1
    envi.save_image(str(tmp_path / "gt.hdr"), mask[..., None], dtype=np.uint8)
    scene = load_scene(tmp_path / "scene.hdr", tmp_path / "gt.hdr", target_values=[3])
    np.testing.assert_array_equal(scene.cube, cube)
    assert scene.mask.sum() == 1 and scene.mask[1, 2]


def test_envi_mask_keeps_integer_labels_above_float32_precision(tmp_path: Path) -> None:
    # 2**24 + 1 is not a float32: read as float32 it became 2**24, so target_values=[2**24 + 1] found
    # nothing and a pixel labelled 2**24 became a target.
    from spectral.io import envi

    cube = np.random.default_rng(2).uniform(size=(3, 2, 4)).astype(np.float32)
    envi.save_image(str(tmp_path / "scene.hdr"), cube, dtype=np.float32)
    labels = np.array([[2**24 + 1, 2**24], [0, 5], [2**24 + 1, 7]], dtype=np.int32)
    envi.save_image(str(tmp_path / "gt.hdr"), labels[..., None], dtype=np.int32)
    scene = load_scene(tmp_path / "scene.hdr", tmp_path / "gt.hdr", target_values=[2**24 + 1])
    np.testing.assert_array_equal(scene.mask, labels == 2**24 + 1)


def test_mat_round_trip(tmp_path: Path) -> None:
    cube = np.random.default_rng(2).integers(0, 9000, size=(8, 9, 4)).astype(np.uint16)
    gt = np.zeros((8, 9), dtype=np.uint8)
    gt[3, 3] = 2
    gt[5, 1] = 7
    scipy.io.savemat(tmp_path / "pines.mat", {"indian_pines": cube, "indian_pines_gt": gt})
    scene = load_scene(tmp_path / "pines.mat")
    np.testing.assert_array_equal(scene.cube, cube.astype(np.float32))
    np.testing.assert_array_equal(scene.mask, gt != 0)
    scipy.io.savemat(tmp_path / "gt.mat", {"gt": gt})
    separate = load_scene(tmp_path / "pines.mat", tmp_path / "gt.mat", target_values=[7])
    assert separate.mask.sum() == 1 and separate.mask[5, 1]
    np.testing.assert_array_equal(read_mat(tmp_path / "pines.mat", "indian_pines_gt"), gt)


def test_datamodule_on_a_mat_file_crops_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    cube = rng.normal(size=(20, 20, 6)).astype(np.float32)
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[[2, 2, 7, 12, 17, 17], [3, 13, 8, 2, 7, 16]] = 1
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube, "gt": gt})
    dm = HyperspectralDataModule(path=str(tmp_path / "scene.mat"), crop_size=5, val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert dm.num_bands == 6
    sizes = [len(dm.scenes[k]) for k in ("train", "val", "test")]
    assert sum(sizes) == 16 and min(sizes) >= 1
    assert len(dm.train_labels) + len(dm.val_labels) + len(dm.test_labels) == 400
    assert int(dm.train_labels.sum() + dm.val_labels.sum() + dm.test_labels.sum()) == 6


def test_missing_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="not found; pass"):
        read_envi(tmp_path / "nothing.hdr")
    with pytest.raises(DataNotFoundError, match="not found"):
        HyperspectralDataModule(path=str(tmp_path / "nothing.mat"))
    header = _write_envi(tmp_path, np.zeros((2, 2, 2), np.float32), "bsq")
    (tmp_path / "cube.img").unlink()
    with pytest.raises(DataNotFoundError, match="data file"):
        read_envi(header)


def test_mismatched_mask_shape_error(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": np.zeros((4, 5, 3)), "gt": np.zeros((5, 4), np.uint8)})
    with pytest.raises(DataFormatError, match=r"shape \(5, 4\) but cube .* is 4x5"):
        load_scene(tmp_path / "scene.mat")


def test_band_first_mat_cube_is_named_not_its_mask(tmp_path: Path) -> None:
    """A (bands, rows, columns) cube as numpy/PyTorch pipelines save it, with its right (rows, columns) mask. Before:
    "mask ... has shape (6, 5) but cube ... is 3x6 pixels; pass the ground-truth mask of this cube"."""
    cube = np.random.default_rng(0).normal(size=(3, 6, 5))  # 3 bands of 6 x 5 pixels
    mask = np.zeros((6, 5), np.uint8)
    mask[2, 3] = 1
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube, "gt": mask})
    with pytest.raises(DataFormatError) as error:
        load_scene(tmp_path / "scene.mat")
    message = str(error.value)
    assert "\n" not in message and "pass the ground-truth mask" not in message
    assert "(3, 6, 5)" in message and "looks band-first (bands, rows, columns)" in message
    assert "np.moveaxis(cube, 0, -1)" in message
    # the advice works: the moved cube loads, pixel (2, 3) holding the spectrum cube[:, 2, 3]
    scipy.io.savemat(tmp_path / "moved.mat", {"cube": np.moveaxis(cube, 0, -1), "gt": mask})
    scene = load_scene(tmp_path / "moved.mat")
    np.testing.assert_allclose(scene.cube[2, 3], cube[:, 2, 3], rtol=1e-6)
    assert scene.mask.sum() == 1 and scene.mask[2, 3]


def test_spectral_nn_recipe_states_its_split() -> None:
    """The header of recipes/spectral_nn.yaml: 24 scenes, round(0.25 * 24) = 6 test, round(0.15 * 24) = 4 val, 14 train
    (it said 15 / 3 / 6)."""
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "recipes" / "spectral_nn.yaml").read_text()
    claimed = tuple(int(v) for v in re.search(r"(\d+) train / (\d+) val / (\d+) test", text).groups())
    data = yaml.safe_load(text)["data"]["init_args"]
    n = data["num_scenes"]
    by_hand = (n - round(data["val_fraction"] * n) - round(data["test_fraction"] * n), round(data["val_fraction"] * n),
               round(data["test_fraction"] * n))
    assert by_hand == (14, 4, 6) and claimed == by_hand
    dm = HyperspectralDataModule(**data)
    dm.setup()
    assert tuple(len(dm.scenes[s]) for s in ("train", "val", "test")) == claimed


def test_unknown_interleave_error(tmp_path: Path) -> None:
    header = _write_envi(tmp_path, np.zeros((2, 3, 4), np.float32), "bsq")
    header.write_text(header.read_text().replace("interleave = bsq", "interleave = bxq"))
    with pytest.raises(DataFormatError, match="interleave 'bxq'; set 'interleave' to one of bsq, bil, bip"):
        read_envi(header)


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    for call in (
        lambda: read_envi(tmp_path / "x.hdr"),
        lambda: load_scene(tmp_path / "x.tif"),
    ):
        with pytest.raises((DataNotFoundError, DataFormatError)) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra_bytes", [4, 4 * 3 * 5])
def test_envi_data_file_longer_than_header_is_refused(tmp_path: Path, extra_bytes: int) -> None:
    # BIP: a file with extra bytes (e.g. an unrecorded 4-byte header) would shift every spectrum.
    cube = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    header = _write_envi(tmp_path, cube, "bip")
    data = tmp_path / "cube.img"
    data.write_bytes(b"\0" * extra_bytes + data.read_bytes())
    with pytest.raises(DataFormatError) as info:
        read_envi(header)
    message = str(info.value)
    assert "\n" not in message and "cube.img" in message
    assert f"has {5 * 7 * 3 * 4 + extra_bytes} bytes" in message and f"implies {5 * 7 * 3 * 4}" in message
    assert "header offset" in message


def test_nan_pixel_in_envi_cube_is_one_line_naming_file_and_fix(tmp_path: Path) -> None:
    cube = np.random.default_rng(2).normal(size=(4, 6, 3)).astype(np.float32)
    cube[3, 1, 2] = np.nan
    header = _write_envi(tmp_path, cube, "bil")
    mask = np.zeros((4, 6), dtype=np.int64)
    mask[0, 0] = 1
    np.save(tmp_path / "gt.npy", mask)
    with pytest.raises(DataFormatError) as info:
        load_scene(header, tmp_path / "gt.npy")
    message = str(info.value)
    assert "\n" not in message and "cube.img" in message
    assert "1 NaN/inf values (first at line 3, sample 1)" in message and "replace them" in message


def test_nan_in_mat_cube_is_refused(tmp_path: Path) -> None:
    cube = np.ones((3, 4, 2))
    cube[0, 2, 0] = np.inf
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube, "gt": np.eye(3, 4)})
    with pytest.raises(DataFormatError, match=r"scene.mat' has 1 NaN/inf values \(first at line 0, sample 2\)"):
        load_scene(tmp_path / "scene.mat")


def test_default_scenes_have_common_confusers_and_mixed_targets() -> None:
    # The benchmark's design: confusers cover a few percent of the background (so the detectors'
    # background statistics contain them), targets are mostly sub-pixel, and a scene holds enough
    # positives that 6 held-out scenes give >= 200.
    for scene in make_synthetic_scenes(2, seed=0):
        background = ~scene.mask
        assert (scene.clutter_abundance[background] >= 0.25).mean() >= 0.02
        assert (scene.clutter_abundance[scene.mask] == 0).all()
        assert scene.mask.sum() >= 40
        assert (scene.abundance[scene.mask] < 1.0).mean() >= 0.5


def test_a_nan_in_the_mask_a_damaged_npy_mask_and_splits_without_targets_are_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(32, 32, 6)).astype(np.float32)
    np.save(tmp_path / "cube_mask.npy", np.zeros((32, 32)))
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube})
    nan_mask = np.zeros((32, 32))
    nan_mask[5, 5] = np.nan  # NaN != 0: it became a target pixel
    np.save(tmp_path / "nan.npy", nan_mask)
    with pytest.raises(DataFormatError, match="has 1 non-finite values"):
        load_scene(tmp_path / "scene.mat", tmp_path / "nan.npy")
    (tmp_path / "cut.npy").write_bytes(np.lib.format.magic(1, 0) + b"garbage")
    with pytest.raises(DataFormatError, match="cannot be read as a .npy array"):
        load_scene(tmp_path / "scene.mat", tmp_path / "cut.npy")
    gt = np.zeros((32, 32))
    gt[2, 3] = gt[3, 3] = gt[20, 4] = 1  # targets in 2 of the 16 crops of 8 x 8: both go to training
    scipy.io.savemat(tmp_path / "few.mat", {"cube": cube, "gt": gt})
    with pytest.raises(DataFormatError, match="the validation scenes contain no target pixels"):
        HyperspectralDataModule(path=str(tmp_path / "few.mat"), crop_size=8).setup()  # before: AP = AUROC = 0 logged


def test_a_complex_or_two_dimensional_mat_cube_is_one_line(tmp_path: Path) -> None:
    cube = np.random.default_rng(0).normal(size=(4, 4, 3))
    scipy.io.savemat(tmp_path / "complex.mat", {"cube": cube + 1j * cube, "gt": np.eye(4)})
    with pytest.raises(DataFormatError, match="is complex"):  # before: the imaginary part dropped
        load_scene(tmp_path / "complex.mat", mask_key="gt")
    scipy.io.savemat(tmp_path / "flat.mat", {"cube": cube, "gt": np.eye(4)})
    with pytest.raises(DataFormatError, match="'gt' of .* is 2-D; a cube is"):  # before: an AssertionError in setup
        load_scene(tmp_path / "flat.mat", cube_key="gt", mask_key="gt")


def test_an_envi_header_with_a_wavelength_per_band_too_few_is_one_line(tmp_path: Path) -> None:
    header = _write_envi(tmp_path, np.zeros((2, 2, 3), dtype=np.float32), "bsq")
    header.write_text(header.read_text().replace("wavelength = {400, 410, 420}", "wavelength = {400, 410}"))
    with pytest.raises(DataFormatError, match="lists 2 wavelengths for 3 bands"):  # before: accepted
        read_envi(header)


@pytest.mark.parametrize("field", ["{400, 410, 420,}", "{}", "{400nm, 410nm, 420nm}"])
def test_an_envi_wavelength_field_that_is_not_numbers_is_one_line(tmp_path: Path, field: str) -> None:
    header = _write_envi(tmp_path, np.zeros((2, 2, 3), dtype=np.float32), "bsq")
    header.write_text(header.read_text().replace("{400, 410, 420}", field))
    with pytest.raises(DataFormatError, match="'wavelength' field that is not a list of numbers"):  # before: ValueError
        read_envi(header)


def test_a_complex_envi_cube_is_refused_not_cast_to_its_real_part(tmp_path: Path) -> None:
    cube = (np.arange(12) + 1j * np.arange(12)).reshape(2, 2, 3).astype(np.complex64)
    header = _write_envi(tmp_path, np.zeros((2, 2, 3), dtype=np.float32), "bsq")
    np.ascontiguousarray(cube.transpose(2, 0, 1)).astype("<c8").tofile(tmp_path / "cube.img")
    header.write_text(header.read_text().replace("data type = 4", "data type = 6"))
    with pytest.raises(DataFormatError, match="is complex; pass real-valued data"):  # before: the real part, silently
        read_envi(header)


@pytest.mark.parametrize("written, layout", [("Bip", "bip"), ("Bil", "bil"), ("bIL", "bil")])
def test_an_interleave_in_mixed_case_is_read_in_that_interleave(tmp_path: Path, written: str, layout: str) -> None:
    """spectral knows only bil/BIL/bip/BIP and read 'Bip' as BSQ: pixel (0, 0) was [0, 15, 30, 45], not [0, 1, 2, 3]."""
    cube = np.arange(3 * 5 * 4, dtype=np.float32).reshape(3, 5, 4)  # pixel (r, c) holds 20r + 4c + [0, 1, 2, 3]
    header = _write_envi(tmp_path, cube, layout)
    header.write_text(header.read_text().replace(f"interleave = {layout}", f"interleave = {written}"))
    read, _ = read_envi(header)
    np.testing.assert_array_equal(read[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(read, cube)


def test_an_envi_spectral_library_is_one_line_not_an_attribute_error(tmp_path: Path) -> None:
    np.arange(12, dtype="<f4").tofile(tmp_path / "lib.sli")
    (tmp_path / "lib.hdr").write_text(
        "ENVI\nsamples = 4\nlines = 3\nbands = 1\nheader offset = 0\nfile type = ENVI Spectral Library\n"
        "data type = 4\ninterleave = bsq\nbyte order = 0\nspectra names = {a, b, c}\nwavelength = {1, 2, 3, 4}\n"
    )
    for read in (lambda: read_envi(tmp_path / "lib.hdr"), lambda: read_mask(tmp_path / "lib.hdr")):
        with pytest.raises(DataFormatError) as error:  # before: AttributeError: 'SpectralLibrary' ... 'offset'
            read()
        assert "\n" not in str(error.value) and "is an ENVI spectral library" in str(error.value)


def test_pixels_of_the_data_ignore_value_are_refused_like_nan(tmp_path: Path) -> None:
    """Before: a -9999 no-data border was read as spectra and dominated the band mean and std."""
    cube = np.random.default_rng(0).normal(0.3, 0.02, size=(6, 7, 3)).astype(np.float32)
    cube[2:4, 5:] = -9999.0  # 2 lines x 2 samples x 3 bands = 12 values, the first at line 2, sample 5
    header = _write_envi(tmp_path, cube, "bil")
    header.write_text(header.read_text() + "data ignore value = -9999\n")
    with pytest.raises(DataFormatError) as error:
        read_envi(header)
    message = str(error.value)
    assert "\n" not in message and "cube.img' has 12 values equal to its header's data ignore value -9999" in message
    assert "(first at line 2, sample 5)" in message and "crop the no-data pixels out" in message
    # a class map's data ignore value marks unlabelled pixels: its mask is still read
    labels = np.zeros((6, 7, 1), dtype=np.float32)
    labels[1, 1] = 2.0
    mask_header = _write_envi(tmp_path, labels, "bsq", name="gt")
    mask_header.write_text(mask_header.read_text() + "data ignore value = 0\n")
    np.testing.assert_array_equal(read_mask(mask_header), labels[..., 0])


@pytest.mark.parametrize("option, value, says", [
    ("scene_size", 4, "scene_size=4 must be a whole number of pixels >= 8"),
    ("num_scenes", 0, "num_scenes=0 must be a whole number >= 3"),
    ("num_scenes", 2, "num_scenes=2 must be a whole number >= 3"),
])
def test_synthetic_scene_options_that_cannot_work_are_a_config_error(option: str, value: int, says: str) -> None:
    """Before: a ValueError (scene_size 4) or an IndexError (num_scenes 0) in setup, a traceback through the CLI."""
    with pytest.raises(ConfigError, match=says):
        HyperspectralDataModule(**{option: value})


def test_a_sparse_mat_mask_is_read(tmp_path: Path) -> None:
    """MATLAB's sparse(gt) comes back from loadmat as scipy.sparse: before, 'has no variable 'gt''."""
    import scipy.sparse

    cube = np.random.default_rng(0).random((6, 5, 4))
    gt = np.zeros((6, 5))
    gt[1, 2] = gt[4, 0] = 3.0
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube, "gt": scipy.sparse.csc_matrix(gt)})
    for key in (None, "gt"):
        scene = load_scene(tmp_path / "scene.mat", mask_key=key)
        assert scene.mask.sum() == 2 and scene.mask[1, 2] and scene.mask[4, 0]


def test_target_objects_cut_into_two_splits_by_tile_borders_are_counted_in_a_warning(tmp_path: Path) -> None:
    """Before: tiles were split at random without a word when a target object had pixels in training and test tiles."""
    cube = np.random.default_rng(0).normal(1.0, 0.05, size=(24, 24, 3)).astype(np.float32)
    gt = np.zeros((24, 24), dtype=np.uint8)
    gt[3::8, 3::8] = 1  # one single-pixel object inside each of the 9 tiles of 8 x 8
    gt[7:9, 7:9] = 1  # one 2 x 2 object on the corner shared by the tiles at (0, 0), (0, 8), (8, 0) and (8, 8)
    scipy.io.savemat(tmp_path / "scene.mat", {"cube": cube, "gt": gt})
    dm = HyperspectralDataModule(path=str(tmp_path / "scene.mat"), crop_size=8, val_fraction=0.2, test_fraction=0.2)
    with pytest.warns(UserWarning, match=r"1 of 10 target objects of .* have pixels in tiles of two splits"):
        dm.setup("fit")
    corner_tiles = {f"scene[{r}:{r + 8},{c}:{c + 8}]" for r in (0, 8) for c in (0, 8)}
    assert len({split for split, scenes in dm.scenes.items() for s in scenes if s.name in corner_tiles}) > 1
