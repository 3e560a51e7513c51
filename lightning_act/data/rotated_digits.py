"""Handwritten digits rotated on the fly, for the Dopamine foundation → specialisation protocol.

Ghasemlou (2026, arXiv 2602.11726) pretrains on a 50/50 mix of upright and 45°-rotated MNIST and
then specialises to the rotated mode. With no download available, the default source is the real
handwritten digits bundled with scikit-learn (:func:`lightning_act.data.digits.load_digits_arrays`);
MNIST itself is read from local IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_act.data.checks import check_loader_args, check_real, check_split_fractions, check_whole
from lightning_act.data.digits import load_digits_arrays, split_indices
from lightning_act.data.splits import SplitDataModule
from lightning_act.errors import DataFormatError, DataNotFoundError

RotationMode = Literal["upright", "rotated", "mix"]

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def rotate_images(images: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate (N, C, H, W) images counter-clockwise (as displayed, row 0 on top) about their centre.

    Bilinear interpolation, zeros outside the image, output the same size as the input.
    ``degrees`` is one angle or one per image.
    """
    n = images.shape[0]
    radians = torch.as_tensor(degrees, dtype=torch.float64).expand(n) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    height, width = images.shape[-2:]
    aspect = height / width
    # Output pixel (x, y) samples the input at R(-θ)(x, y) in pixel units about the centre; with y
    # pointing down, a counter-clockwise display rotation by θ maps to these normalised-grid rows.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * aspect
    theta[:, 1, 0] = sin / aspect
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format; ``.gz`` is decompressed) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8 …), the number of dimensions, then one
    big-endian int32 per dimension, then the data in row-major order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file '{path}' not found; pass --data.mnist_dir to a folder holding MNIST's IDX files")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataFormatError(f"cannot read IDX file '{path}' ({error}); pass an uncorrupted IDX or IDX.gz file") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataFormatError(
            f"'{path}' is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); pass MNIST's "
            "*-idx1-ubyte / *-idx3-ubyte files"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"IDX file '{path}' ends inside its header; pass a complete IDX file")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"IDX file '{path}' holds {len(raw) - header} data bytes but its header {shape} needs {expected}; "
            "pass an uncorrupted IDX file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataNotFoundError(
        f"MNIST file '{stem}' (or '{stem}.gz') not found in '{directory}'; pass --data.mnist_dir to the folder holding it"
    )


def load_mnist_arrays(
    directory: str | Path, split: Literal["train", "t10k"] = "train", image_size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (N, 1, S, S) float32 in [0, 1] and int64 labels from local IDX files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataNotFoundError(f"MNIST folder '{directory}' does not exist; pass --data.mnist_dir to an existing folder")
    images = read_idx(_idx_path(directory, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(directory, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(
            f"MNIST {split} files in '{directory}' have shapes {images.shape} and {labels.shape}; expected (N, H, W) "
            "images and (N,) labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):  # a class the 10-way head does not have
        raise DataFormatError(
            f"MNIST {split} labels in '{directory}' run from {labels.min()} to {labels.max()}; expected digits 0 to 9"
        )
    if images.dtype != np.uint8:  # MNIST's images are bytes; /255 would squash [0, 1] floats and overflow int16s
        raise DataFormatError(
            f"MNIST {split} images in '{directory}' are {images.dtype}, not unsigned bytes (IDX type 0x08); use the "
            "original MNIST files or save the images as uint8 0-255"
        )
    tensor = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if tensor.shape[-1] != image_size or tensor.shape[-2] != image_size:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return tensor, torch.from_numpy(labels.astype(np.int64))


def rotation_angles(n: int, mode: RotationMode, degrees: float, seed: int) -> torch.Tensor:
    """Per-sample angles: all 0, all ``degrees``, or an exact 50/50 seeded mix."""
    if mode == "upright":
        return torch.zeros(n)
    if mode == "rotated":
        return torch.full((n,), float(degrees))
    if mode == "mix":
        rotated = np.random.default_rng(seed).permutation(n) < n // 2 + n % 2
        return torch.from_numpy(rotated.astype(np.float32) * float(degrees))
    raise DataFormatError(f"rotation mode {mode!r} is unknown; pass one of 'upright', 'rotated', 'mix'")


class RotatedDigits(Dataset):
    """Images rotated on the fly by a fixed per-sample angle, then mapped from [0, 1] to [-1, 1].

    ``__getitems__`` rotates a whole batch with one ``grid_sample`` call (the DataLoader uses it
    when present), which keeps the per-epoch cost small on a CPU.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, angles: torch.Tensor) -> None:
        self.images, self.labels, self.angles = images, labels, angles

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, angles = self.images[index], self.angles[index]
        turn = angles != 0
        if bool(turn.any()):
            images = images.clone()
            images[turn] = rotate_images(images[turn], angles[turn])
        images = (images - 0.5) / 0.5
        return list(zip(images.unbind(0), self.labels[index].unbind(0)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


class RotatedDigitsDataModule(SplitDataModule):
    """Digits at 0°, at ``degrees``, or a 50/50 per-sample mix; no download needed.

    ``train_rotation`` sets the training/validation mode and ``test_rotation`` the test mode.
    ``mnist_dir`` switches from the bundled scikit-learn digits to MNIST IDX files in that folder
    (train files → train/val split, ``t10k`` files → test); ``max_samples`` caps each source split.
    """

    def __init__(
        self,
        train_rotation: RotationMode = "mix",
        test_rotation: RotationMode = "rotated",
        degrees: float = 45.0,
        image_size: int = 16,
        mnist_dir: str | None = None,
        max_samples: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.35,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_real("degrees", degrees, None, 45, what=" (the rotation angle)")
        for mode in (train_rotation, test_rotation):
            rotation_angles(0, mode, degrees, seed)
        check_whole("image_size", image_size, 1, 16, "a whole number of pixels")
        if max_samples is not None:
            check_whole("max_samples", max_samples, 1, 1000, "a whole number of examples")
        check_loader_args(batch_size, num_workers, seed)
        check_split_fractions(val_fraction, test_fraction, together=mnist_dir is None)  # an mnist_dir splits no test set
        if mnist_dir is not None and not Path(mnist_dir).is_dir():
            raise DataNotFoundError(
                f"MNIST folder '{mnist_dir}' does not exist; pass --data.mnist_dir to an existing folder or leave it "
                "unset for the bundled digits"
            )
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_classes = 10
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _cap(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.hparams.max_samples
        return (images[:cap], labels[:cap]) if cap is not None else (images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.mnist_dir is None:
            images, labels = self._cap(*load_digits_arrays(hp.image_size))
            train, val, test = split_indices(len(labels), hp.val_fraction, hp.test_fraction, hp.seed)
            test_images, test_labels = images[torch.as_tensor(test)], labels[torch.as_tensor(test)]
        else:
            images, labels = self._cap(*load_mnist_arrays(hp.mnist_dir, "train", hp.image_size))
            train, val, _ = split_indices(len(labels), hp.val_fraction, 0.0, hp.seed)
            test_images, test_labels = self._cap(*load_mnist_arrays(hp.mnist_dir, "t10k", hp.image_size))

        def build(x: torch.Tensor, y: torch.Tensor, mode: RotationMode, offset: int) -> RotatedDigits:
            return RotatedDigits(x, y, rotation_angles(len(y), mode, hp.degrees, hp.seed + offset))

        train_idx, val_idx = torch.as_tensor(train), torch.as_tensor(val)
        self.train_set = build(images[train_idx], labels[train_idx], hp.train_rotation, 1)
        self.val_set = build(images[val_idx], labels[val_idx], hp.train_rotation, 2)
        self.test_set = build(test_images, test_labels, hp.test_rotation, 3)
