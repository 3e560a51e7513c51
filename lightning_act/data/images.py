"""Image classification data: bundled digits by default, CIFAR-10 pickles or ImageFolder trees from disk.

Nothing here downloads. ``data_dir=None`` serves scikit-learn's real handwritten digits (they ship
inside the scikit-learn wheel); a ``data_dir`` is read as

* CIFAR-10 in its python-pickle format: a folder holding ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch`` (or its parent holding ``cifar-10-batches-py/``), as unpacked from the official
  ``cifar-10-python.tar.gz``;
* an ImageFolder tree: ``train/<class>/*.png`` with optional ``val/`` and ``test/`` siblings
  (the ImageNet layout), or a single ``<class>/*.png`` tree that is split by the fractions.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_act.data.checks import check_flag, check_loader_args, check_split_fractions, check_whole
from lightning_act.data.digits import load_digits_arrays, split_indices
from lightning_act.data.splits import SplitDataModule
from lightning_act.errors import DataFormatError, DataNotFoundError, LightningActError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def posterize_any_bits(img: PILImage, bits_to_keep: int, **kwargs: object) -> PILImage:
    """timm's auto-augment posterize, with 0 bits giving the black image older Pillow returned.

    ``rand-m9-mstd0.5-inc1`` (DeiT's and KAT's RandAugment) clips magnitudes drawn from N(9, 0.5) at 10, where
    ``PosterizeIncreasing`` keeps 0 bits; Pillow 13 refuses that (``ValueError: bits must be between or equal to 1
    and 8``), which killed about one image in 700 and with it the fit. Older Pillow masked every bit away, so a black
    image is what the published runs trained on: the recipe is kept exactly (docs/kat.md).
    """
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform: object) -> list[object]:
    """The ``AugmentOp`` s of timm's AutoAugment / RandAugment / AugMix inside a (nested) ``Compose``."""
    if hasattr(transform, "aug_fn"):
        return [transform]
    children = [*getattr(transform, "transforms", ()), *getattr(transform, "ops", ())]
    children += [op for sub_policy in getattr(transform, "policy", ()) for op in sub_policy]
    return [op for child in children for op in _augment_ops(child)]


def load_cifar10_batches(folder: str | Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 python-pickle batches into ``(uint8 (N, 3, 32, 32), int64 (N,))``.

    Each batch is a pickled dict with ``b"data"`` (N × 3072 uint8, the 1024 red, then green, then
    blue values of a 32 × 32 image in row-major order) and ``b"labels"`` (N ints), as documented at
    https://www.cs.toronto.edu/~kriz/cifar.html.
    """
    images, labels = [], []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise DataNotFoundError(
                f"CIFAR-10 batch '{path}' not found; pass --data.data_dir to the unpacked cifar-10-batches-py folder"
            )
        try:
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            raw = np.asarray(batch[b"data"])
            if raw.dtype != np.uint8 and raw.size and (raw.min() < 0 or raw.max() > 255):  # a uint8 cast would wrap
                raise ValueError(f"pixel values {raw.min()} to {raw.max()}, not bytes")
            if raw.dtype.kind == "f" and raw.size and not np.array_equal(raw, np.round(raw)):  # [0, 1] floats: all 0
                raise ValueError(f"pixel values are fractions ({raw.dtype}, {raw.min():g} to {raw.max():g}), not bytes")
            data = raw.astype(np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise DataFormatError(
                f"'{path}' is not a CIFAR-10 python-pickle batch ({type(err).__name__}: {err}); "
                "use the files from cifar-10-python.tar.gz"
            ) from err
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != data.shape[0]:
            raise DataFormatError(
                f"'{path}' holds data of shape {data.shape} with {len(batch_labels)} labels, expected (N, 3072) "
                "and N labels; use the files from cifar-10-python.tar.gz"
            )
        out_of_range = (batch_labels < 0) | (batch_labels >= 10)
        if out_of_range.any():
            raise DataFormatError(
                f"'{path}' has {int(out_of_range.sum())} labels outside 0-9 (e.g. {int(batch_labels[out_of_range][0])} "
                f"at index {int(np.flatnonzero(out_of_range)[0])}); CIFAR-10 labels are 0-9, use the files from cifar-10-python.tar.gz"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(batch_labels))
    return torch.cat(images), torch.cat(labels)


def find_cifar10_folder(data_dir: Path) -> Path | None:
    """The folder holding the CIFAR-10 batches: ``data_dir`` itself or its ``cifar-10-batches-py`` child."""
    for folder in (data_dir, data_dir / "cifar-10-batches-py"):
        if (folder / CIFAR10_TEST_BATCH).is_file() or (folder / CIFAR10_TRAIN_BATCHES[0]).is_file():
            return folder
    return None


def _has_class_folders(folder: Path) -> bool:
    """True when ``folder`` has sub-folders that contain image files (the ImageFolder layout)."""
    if not folder.is_dir():
        return False
    return any(
        child.is_dir() and not child.name.startswith(".") and next(class_images(child), None) is not None
        for child in folder.iterdir()
    )


def class_images(folder: Path) -> Iterator[Path]:
    """The images of a class folder at any depth, in torchvision's ImageFolder order (``sorted(os.walk(...))``, files
    sorted), so images kept in sub-folders (e.g. one per session) are not left out; hidden folders are skipped."""
    for root, _, files in sorted(os.walk(folder, followlinks=True)):
        if any(part.startswith(".") for part in Path(root).relative_to(folder).parts):
            continue
        yield from (Path(root) / name for name in sorted(files) if Path(name).suffix.lower() in IMAGE_SUFFIXES)


def _flat_images(folder: Path) -> int:
    """How many images lie directly in ``folder`` (not in class sub-folders)."""
    return sum(1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


class ImageAugment:
    """Per-sample transform of a (C, H, W) image: resize, train-time augmentation, normalisation.

    The augmentations suit small images (digits, CIFAR): random translation by zero-padding and
    cropping back, horizontal flip (off for digits, where it changes the class meaning) and random
    erasing (Zhong et al. 2020, a rectangle of random size and aspect set to zero after
    normalisation). Random draws use torch's RNG, which Lightning seeds per data-loader worker.
    """

    def __init__(
        self,
        image_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        crop_padding: int = 0,
        hflip: bool = False,
        random_erasing: float = 0.0,
    ) -> None:
        self.image_size = image_size
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.train = train
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.random_erasing = random_erasing

    def _match_channels(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[0]
        if channels == self.in_chans:
            return image
        if channels == 1:
            return image.expand(self.in_chans, -1, -1)
        if channels == 3 and self.in_chans == 1:
            return (image * torch.tensor(LUMA_WEIGHTS).view(3, 1, 1)).sum(0, keepdim=True)
        raise DataFormatError(
            f"cannot turn {channels}-channel images into in_chans={self.in_chans}; set --data.in_chans to 1 or 3"
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        image = self._match_channels(image)
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(
                image[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                antialias=True,
            )[0].clamp(0.0, 1.0)
        if self.train and self.crop_padding > 0:
            pad = self.crop_padding
            padded = F.pad(image, (pad, pad, pad, pad))
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = padded[:, top : top + self.image_size, left : left + self.image_size]
        if self.train and self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = (image - self.mean) / self.std
        if self.train and self.random_erasing > 0 and torch.rand(()) < self.random_erasing:
            image = self._erase(image)
        return image.contiguous()

    def _erase(self, image: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        for _ in range(10):
            area = size * size * float(torch.empty(()).uniform_(0.02, 1.0 / 3.0))
            log_ratio = float(torch.empty(()).uniform_(np.log(0.3), np.log(1.0 / 0.3)))
            height = round(np.sqrt(area * np.exp(log_ratio)))
            width = round(np.sqrt(area / np.exp(log_ratio)))
            if 0 < height < size and 0 < width < size:
                top = int(torch.randint(0, size - height + 1, ()))
                left = int(torch.randint(0, size - width + 1, ()))
                image = image.clone()
                image[:, top : top + height, left : left + width] = 0.0
                return image
        return image


class TensorImageDataset(Dataset):
    """Images held in memory (uint8 or float in [0, 1]) with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def class_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted as torchvision sorts them; hidden folders (``.ipynb_checkpoints``)
    are not classes, and a class folder without images is one line (it would be a class no example ever has)."""
    names = sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    empty = [n for n in names if next(class_images(root / n), None) is None]
    if empty:
        raise DataFormatError(
            f"class folders {empty[:5]} under '{root}' hold no images ({', '.join(IMAGE_SUFFIXES)}); add images or "
            "remove the folders"
        )
    return names


class ImageFolderDataset(Dataset):
    """An ImageFolder tree (``<class>/<image>``) read with PIL, classes sorted by name as torchvision does.

    Images are brought to ``image_size`` with PIL first: a random resized crop (Szegedy et al. 2015,
    the ImageNet training crop) when ``random_resized_crop``, else shorter side resized to
    ``image_size / crop_pct`` and centre-cropped (timm's evaluation crop; 0.875 for ImageNet
    checkpoints); ``transform`` then augments and normalises the tensor. A ``pil_transform`` (e.g. one
    from ``timm.data.create_transform``) replaces both: it maps the RGB PIL image to the final tensor.
    """

    def __init__(
        self,
        root: Path,
        classes: Sequence[str],
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        random_resized_crop: bool = False,
        crop_pct: float = 1.0,
        pil_transform: Callable[[object], torch.Tensor] | None = None,
    ) -> None:
        from torchvision.transforms import v2

        self.pil_transform = pil_transform
        self.root = root
        self.classes = list(classes)
        self.transform = transform
        if random_resized_crop:
            self.resize = v2.RandomResizedCrop(image_size, antialias=True)
        else:
            resize_to = math.floor(image_size / crop_pct)
            self.resize = v2.Compose([v2.Resize(resize_to, antialias=True), v2.CenterCrop(image_size)])
        unknown = sorted(set(class_folders(root)) - set(self.classes)) if root.is_dir() else []
        if unknown:  # their images would be left out without a word
            raise DataFormatError(
                f"'{root}' has class folders {unknown[:5]} that the training classes lack; give every split the same "
                "class folders"
            )
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = root / name
            if folder.is_dir():
                self.samples.extend((path, label) for path in class_images(folder))
        if not self.samples:
            raise DataFormatError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under '{root}/<class>/'; put images in one sub-folder per class"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        target = torch.tensor(label, dtype=torch.int64)
        try:
            with Image.open(path) as img:
                rgb = _as_rgb(img, path)
                if self.pil_transform is not None:
                    return self.pil_transform(rgb), target
                array = np.asarray(self.resize(rgb), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise DataFormatError(f"cannot read image '{path}' ({err}); remove or replace the file") from err
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return self.transform(image), target


def _as_rgb(img: PILImage, path: Path) -> PILImage:
    """8-bit RGB of an image: 16-bit greyscale is scaled to 8 bits (PIL's own conversion clips it: 300 becomes white),
    and 32-bit samples, whose range a file does not state, are refused in one line."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        bytes_ = np.round(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(bytes_).convert("RGB")
    if img.mode in ("I", "F"):
        raise DataFormatError(
            f"image '{path}' has 32-bit samples (PIL mode '{img.mode}') whose range is unknown; save it as 8- or 16-bit"
        )
    return img.convert("RGB")


class ImageDataModule(SplitDataModule):
    """Image classification data that needs no download.

    ``data_dir=None`` (the default) serves scikit-learn's real handwritten digits, resized to
    ``image_size``; otherwise ``data_dir`` is read as CIFAR-10 python pickles or an ImageFolder tree
    (see the module docstring). Splits: digits and single-tree folders are split by
    ``val_fraction`` / ``test_fraction``; CIFAR-10 takes validation from the training batches and
    tests on ``test_batch``; an ImageFolder with ``train/`` uses ``val/`` (or a ``val_fraction`` of
    ``train/``) and ``test/`` (or ``val/``); a ``val/`` of images without class folders is refused, such a
    ``test/`` (unlabelled) when tested or predicted. ``val_fraction=0`` leaves the validation set empty (never the test set).

    Train-time augmentation (off by default; validation and test data are never augmented):
    ``crop_padding`` (random translation by up to that many pixels: 4 for CIFAR at 32 px, 1–2 for
    digits), ``hflip`` (random horizontal flip: CIFAR / ImageNet, not digits), ``random_erasing``
    (probability of erasing one random rectangle), ``random_resized_crop`` (ImageFolder only, the
    ImageNet crop). ``crop_pct`` is the evaluation centre-crop fraction of ImageFolder images;
    ``mean`` / ``std`` (default 0.5 per channel) normalise, e.g. ImageNet statistics for
    official checkpoints.

    ``timm_transforms=True`` (ImageFolder, 3 channels) builds both pipelines with timm's own
    ``timm.data.create_transform`` instead, as timm's training script does for the DeiT / KAT recipe
    (Touvron et al. 2021; Yang & Wang 2024): random resized crop with ``interpolation``, horizontal flip
    (``hflip``), ``auto_augment`` (e.g. ``"rand-m9-mstd0.5-inc1"``: RandAugment magnitude 9, Cubuk et al.
    2020), random erasing with per-pixel noise (``random_erasing`` = its probability), normalisation; for
    evaluation, resize to ``image_size / crop_pct`` and centre crop.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: int = 32,
        in_chans: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.15,
        seed: int = 0,
        crop_padding: int = 0,
        hflip: bool = False,
        random_erasing: float = 0.0,
        random_resized_crop: bool = False,
        crop_pct: float = 1.0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        timm_transforms: bool = False,
        auto_augment: str | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataNotFoundError(
                f"data directory '{data_dir}' does not exist; pass --data.data_dir with an existing "
                "folder, or leave it unset to use the bundled digits"
            )
        if not 0.0 < crop_pct <= 1.0:
            raise LightningActError(f"crop_pct={crop_pct} is the centre-crop fraction; pass a value in (0, 1], e.g. 0.875")
        if not 0.0 <= random_erasing <= 1.0:
            raise LightningActError(f"random_erasing={random_erasing} is a probability; pass a value in [0, 1]")
        check_whole("image_size", image_size, 1, 32, "a whole number of pixels")
        check_whole("in_chans", in_chans, 1, 3)
        check_whole("crop_padding", crop_padding, 0, 4, "a whole number of pixels")
        for flag, value in (("hflip", hflip), ("random_resized_crop", random_resized_crop), ("timm_transforms", timm_transforms)):
            check_flag(flag, value)
        check_loader_args(batch_size, num_workers, seed)
        check_split_fractions(val_fraction, test_fraction, together=False)  # a folder with val/ uses neither
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.image_size = image_size
        self.in_chans = in_chans
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.augment_kwargs = {"crop_padding": crop_padding, "hflip": hflip, "random_erasing": random_erasing}
        self.random_resized_crop = random_resized_crop
        self.crop_pct = crop_pct
        self.mean = list(mean) if mean is not None else [0.5] * in_chans
        self.std = list(std) if std is not None else [0.5] * in_chans
        if len(self.mean) != in_chans or len(self.std) != in_chans:
            raise LightningActError(
                f"mean and std need in_chans={in_chans} values each, got {self.mean} and {self.std}; "
                "pass --data.mean / --data.std with one value per channel"
            )
        example = "[" + ",".join(["0.5"] * in_chans) + "]"  # one value per channel
        if not all(isinstance(value, numbers.Real) and math.isfinite(value) for value in self.mean):
            raise LightningActError(f"mean={self.mean} must hold finite numbers; pass e.g. --data.mean {example}")
        if not all(isinstance(value, numbers.Real) and math.isfinite(value) and value > 0 for value in self.std):
            raise LightningActError(
                f"std={self.std} must hold finite numbers > 0 (the images are divided by it); pass e.g. --data.std "
                f"{example}"
            )
        self.data_format = self._detect_format()
        if (timm_transforms or auto_augment) and (self.data_format != "imagefolder" or in_chans != 3):
            raise LightningActError(
                "timm_transforms / auto_augment work on RGB ImageFolder data; point --data.data_dir at an "
                "ImageFolder tree with --data.in_chans 3, or leave them unset"
            )
        if auto_augment and not timm_transforms:
            raise LightningActError("auto_augment needs timm's pipeline; pass --data.timm_transforms true as well")
        self.timm_transforms = timm_transforms
        self.auto_augment = auto_augment
        self.interpolation = interpolation
        self.classes: list[str] = [str(i) for i in range(10)] if self.data_format != "imagefolder" else []
        self.train_set: Dataset | None = None
        self._unlabelled_test_refusal: DataFormatError | None = None  # a flat test/ folder's, said when tested
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes; for ImageFolder trees known after ``setup()``."""
        if not self.classes:
            self.classes = self._folder_classes()
        return len(self.classes)

    def _detect_format(self) -> str:
        if self.data_dir is None:
            return "digits"
        root = Path(self.data_dir)
        if find_cifar10_folder(root) is not None:
            return "cifar10"
        if _has_class_folders(root / "train") or _has_class_folders(root):
            return "imagefolder"
        raise DataFormatError(
            f"'{root}' is neither CIFAR-10 (data_batch_1..5, test_batch) nor an ImageFolder tree "
            "(train/<class>/*.png or <class>/*.png); point --data.data_dir at one of these"
        )

    def _folder_root(self) -> Path:
        root = Path(self.data_dir)  # type: ignore[arg-type]
        return root / "train" if _has_class_folders(root / "train") else root

    def _folder_classes(self) -> list[str]:
        return class_folders(self._folder_root())

    def _transform(self, train: bool) -> ImageAugment:
        kwargs = self.augment_kwargs if train else {}
        return ImageAugment(self.image_size, self.in_chans, self.mean, self.std, train=train, **kwargs)

    def _timm_transform(self, train: bool) -> Callable[[object], torch.Tensor]:
        from timm.data import create_transform

        common = {"interpolation": self.interpolation, "mean": tuple(self.mean), "std": tuple(self.std)}
        if not train:
            return create_transform(self.image_size, is_training=False, crop_pct=self.crop_pct, **common)
        transform = create_transform(
            self.image_size, is_training=True, hflip=0.5 if self.augment_kwargs["hflip"] else 0.0,
            auto_augment=self.auto_augment, re_prob=self.augment_kwargs["random_erasing"], re_mode="pixel",
            re_count=1, **common,
        )
        for op in _augment_ops(transform):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
        return transform

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.data_format == "digits":
            images, labels = load_digits_arrays(self.image_size)
            self._split_in_memory(images, labels)
        elif self.data_format == "cifar10":
            folder = find_cifar10_folder(Path(self.data_dir))  # type: ignore[arg-type]
            images, labels = load_cifar10_batches(folder, CIFAR10_TRAIN_BATCHES)  # type: ignore[arg-type]
            test_images, test_labels = load_cifar10_batches(folder, (CIFAR10_TEST_BATCH,))  # type: ignore[arg-type]
            self._split_in_memory(images, labels, test=(test_images, test_labels))
        else:
            self._setup_folders()

    def _split_in_memory(
        self, images: torch.Tensor, labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        test_fraction = 0.0 if test is not None else self.test_fraction
        train_idx, val_idx, test_idx = split_indices(len(labels), self.val_fraction, test_fraction, self.seed)
        train_tf, eval_tf = self._transform(train=True), self._transform(train=False)

        def subset(idx: np.ndarray, transform: ImageAugment) -> TensorImageDataset:
            index = torch.as_tensor(idx, dtype=torch.int64)
            return TensorImageDataset(images[index], labels[index], transform)

        self.train_set = subset(train_idx, train_tf)
        self.val_set = subset(val_idx, eval_tf)  # empty with val_fraction 0: never the test set, which selection would fit
        self.test_set = TensorImageDataset(test[0], test[1], eval_tf) if test is not None else subset(test_idx, eval_tf)

    def test_dataloader(self) -> DataLoader:
        self._refuse_unlabelled_test()
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        self._refuse_unlabelled_test()
        return super().predict_dataloader()

    def _refuse_unlabelled_test(self) -> None:
        """A flat ``test/`` (unlabelled images, as Kaggle ships them) does not stop a fit, which never reads it; a test
        or predict would read the validation images in its place."""
        if self.train_set is None:
            self.setup("test")
        if self._unlabelled_test_refusal is not None:
            raise self._unlabelled_test_refusal

    def _setup_folders(self) -> None:
        root = Path(self.data_dir)  # type: ignore[arg-type]
        classes = self.classes or self._folder_classes()
        self.classes = classes
        train_tf, eval_tf = self._transform(train=True), self._transform(train=False)

        def make(folder: Path, transform: ImageAugment, random_resized_crop: bool = False) -> ImageFolderDataset:
            pil_transform = self._timm_transform(transform.train) if self.timm_transforms else None
            return ImageFolderDataset(
                folder, classes, self.image_size, transform, random_resized_crop, self.crop_pct, pil_transform
            )

        if not _has_class_folders(root / "train"):
            train_full, eval_full = make(root, train_tf, self.random_resized_crop), make(root, eval_tf)
            train_idx, val_idx, test_idx = split_indices(len(train_full), self.val_fraction, self.test_fraction, self.seed)
            self.train_set = Subset(train_full, train_idx.tolist())
            self.test_set = Subset(eval_full, test_idx.tolist())
            self.val_set = Subset(eval_full, val_idx.tolist())  # empty with val_fraction 0, as for in-memory data
            return
        train_full = make(root / "train", train_tf, self.random_resized_crop)
        has_val, has_test = _has_class_folders(root / "val"), _has_class_folders(root / "test")
        for name, has_classes, instead in (
            ("val", has_val, "split train/ by --data.val_fraction"),
            ("test", has_test, "test on the validation images"),
        ):
            flat = 0 if has_classes else _flat_images(root / name)
            if flat:  # ILSVRC2012_img_val.tar unpacks flat: its images would be replaced by others without a word
                refusal = DataFormatError(
                    f"'{root / name}' holds {flat} images but no class folders; sort them into {name}/<class>/ (e.g. "
                    f"with ImageNet's valprep.sh), or remove {name}/ to {instead}"
                )
                if name == "val":  # a fit validates: refused now; unlabelled test images (Kaggle's) only when tested
                    raise refusal
                self._unlabelled_test_refusal = refusal
        if has_val:
            self.train_set = train_full
            self.val_set = make(root / "val", eval_tf)
        else:
            train_idx, val_idx, _ = split_indices(len(train_full), self.val_fraction, 0.0, self.seed)
            self.train_set = Subset(train_full, train_idx.tolist())
            self.val_set = Subset(make(root / "train", eval_tf), val_idx.tolist())
        self.test_set = make(root / "test", eval_tf) if has_test else self.val_set
