"""Rotated digits: rotation vs scipy and a hand-worked case, IDX round trip, clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from lightning_act.data.rotated_digits import (
    RotatedDigitsDataModule,
    load_mnist_arrays,
    read_idx,
    rotate_images,
    rotation_angles,
)
from lightning_act.errors import DataFormatError, DataNotFoundError


def test_rotation_45_matches_scipy() -> None:
    image = np.random.default_rng(0).random((11, 11))
    ours = rotate_images(torch.from_numpy(image)[None, None], 45.0)[0, 0].numpy()
    # scipy: positive angle = counter-clockwise as displayed; grid-constant = zeros beyond the edge.
    theirs = ndimage.rotate(image, 45.0, reshape=False, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_rotation_hand_worked() -> None:
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 1] = 1.0  # top middle
    quarter = rotate_images(image, 90.0)[0, 0]
    expected = torch.zeros(3, 3)
    expected[1, 0] = 1.0  # counter-clockwise: top middle -> left middle
    torch.testing.assert_close(quarter, expected, atol=1e-6, rtol=0)
    # 45°: the centre pixel stays. Output top-middle (row 0, col 1) samples the input at the
    # point turned 45° clockwise: row 1 - r, col 1 + r with r = 1/sqrt(2). Bilinear weights:
    # pixel (0, 2) gets r * r = 1/2, pixel (1, 1) gets (1 - r) * (1 - r), the others hold zero.
    corner = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    corner[0, 0, 0, 2] = 1.0
    corner[0, 0, 1, 1] = 0.5
    turned = rotate_images(corner, 45.0)[0, 0]
    r = 1.0 / np.sqrt(2.0)
    assert abs(float(turned[1, 1]) - 0.5) < 1e-12
    assert abs(float(turned[0, 1]) - (r * r * 1.0 + (1 - r) ** 2 * 0.5)) < 1e-12


def test_angles_modes() -> None:
    mix = rotation_angles(11, "mix", 45.0, seed=3)
    assert int((mix == 45.0).sum()) == 6 and int((mix == 0.0).sum()) == 5
    assert torch.equal(mix, rotation_angles(11, "mix", 45.0, seed=3))
    assert torch.all(rotation_angles(4, "rotated", 45.0, 0) == 45.0)
    with pytest.raises(DataFormatError, match="rotation mode"):
        rotation_angles(4, "sideways", 45.0, 0)  # type: ignore[arg-type]


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_idx_round_trip_and_mnist_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    x, y = load_mnist_arrays(tmp_path, "train", image_size=28)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=1e-6)
    assert y.tolist() == [3, 1, 4, 1, 5]


def test_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="not found"):
        read_idx(tmp_path / "missing-idx3-ubyte")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataFormatError, match="bad magic number 12340801"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x01\x02")
    with pytest.raises(DataFormatError, match="holds 2 data bytes"):
        read_idx(short)
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist_arrays(tmp_path, "t10k")
    with pytest.raises(DataNotFoundError, match="mnist_dir"):
        RotatedDigitsDataModule(mnist_dir=str(tmp_path / "nope"))


def test_datamodule_sklearn_digits_rotated_on_the_fly() -> None:
    dm = RotatedDigitsDataModule("mix", "rotated", image_size=8, batch_size=16, max_samples=40, seed=1, test_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 40
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 1, 8, 8) and y.dtype == torch.int64  # 25 % of 40 samples
    raw = dm.test_set.images
    np.testing.assert_allclose(x.numpy(), ((rotate_images(raw, 45.0) - 0.5) / 0.5).numpy(), atol=1e-6)
    single, _ = dm.test_set[0]
    np.testing.assert_allclose(single.numpy(), x[0].numpy(), atol=1e-6)
    train_angles = dm.train_set.angles
    assert set(train_angles.tolist()) == {0.0, 45.0}


def test_datamodule_reads_mnist_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, size=(n,)))
    dm = RotatedDigitsDataModule("upright", "rotated", image_size=16, mnist_dir=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 4)
    assert dm.test_set.images.shape == (4, 1, 16, 16)


def test_default_test_split_is_35_percent_of_the_digits() -> None:
    dm = RotatedDigitsDataModule("mix", "rotated", image_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1797 - 270 - 629, 270, 629)


def test_mnist_labels_outside_the_digits_are_one_line(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DataFormatError, match="labels .* run from 3 to 10; expected digits 0 to 9"):
        load_mnist_arrays(tmp_path, "train", image_size=28)  # before: an IndexError from the loss, mid-fit


def test_mnist_images_that_are_not_bytes_are_one_line(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(size=(2, 28, 28)).astype(">f4")  # already in [0, 1]
    header = bytes([0, 0, 0x0D, 3]) + b"".join(struct.pack(">i", d) for d in images.shape)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2]))
    with pytest.raises(DataFormatError, match="are float32, not unsigned bytes"):  # before: divided by 255 again
        load_mnist_arrays(tmp_path, "train", image_size=28)
