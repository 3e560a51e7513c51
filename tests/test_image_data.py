"""ImageDataModule: bundled digits, CIFAR-10 python pickles and ImageFolder trees written here, augmentation, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_act.data.eeg import EEGSeizureDataModule
from lightning_act.data.hyperspectral import HyperspectralDataModule
from lightning_act.data.images import ImageAugment, ImageDataModule, load_cifar10_batches
from lightning_act.data.stdlib_text import StdlibTextDataModule
from lightning_act.errors import DataFormatError, DataNotFoundError, LightningActError


def _cifar_image(index: int) -> np.ndarray:
    """A distinct (3, 32, 32) uint8 image per index."""
    c, r, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((index * 31 + c * 80 + r * 3 + w * 5) % 256).astype(np.uint8)


def _write_cifar(folder: Path, per_batch: int = 4, test_count: int = 3) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Write CIFAR-10 python-pickle batches the way the official tarball stores them; return what was written."""
    folder.mkdir(parents=True)
    written: dict[str, list[tuple[np.ndarray, int]]] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    index = 0
    for name in names:
        count = test_count if name == "test_batch" else per_batch
        rows, labels, items = [], [], []
        for _ in range(count):
            image, label = _cifar_image(index), index % 10
            # one row = 1024 red values, then 1024 green, then 1024 blue, each plane row-major
            rows.append(np.concatenate([image[0].ravel(), image[1].ravel(), image[2].ravel()]))
            labels.append(label)
            items.append((image, label))
            index += 1
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": np.stack(rows), b"labels": labels}, handle)
        written[name] = items
    return written


def test_digits_default_shapes_split_and_normalisation() -> None:
    data = ImageDataModule(image_size=16, in_chans=3, batch_size=32, val_fraction=0.1, test_fraction=0.15)
    data.setup("fit")
    assert data.num_classes == 10
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == round(1797 * 0.1) and sizes[2] == round(1797 * 0.15)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (32, 3, 16, 16) and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images[:, 0], images[:, 2])  # grey repeated over channels


def test_cifar10_pickles_are_read_in_order_with_values_and_labels(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    data = ImageDataModule(data_dir=str(tmp_path), image_size=32, in_chans=3, val_fraction=0.25, batch_size=2)
    assert data.data_format == "cifar10" and data.num_classes == 10
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 20 and len(data.val_set) == 5 and len(data.test_set) == 3
    for i, (image, label) in enumerate(written["test_batch"]):
        x, y = data.test_set[i]
        expected = (image.astype(np.float64) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
        assert int(y) == label
    training_images = [(img, lab) for name in written if name != "test_batch" for img, lab in written[name]]
    seen = set()
    for dataset in (data.train_set, data.val_set):
        for i in range(len(dataset)):
            x, y = dataset[i]
            matches = [j for j, (img, _) in enumerate(training_images)
                       if np.allclose(x.numpy(), (img / 255.0 - 0.5) / 0.5, atol=1e-6)]
            assert len(matches) == 1 and int(y) == training_images[matches[0]][1]
            seen.add(matches[0])
    assert len(seen) == 20  # train and val together hold every training image once


def test_cifar10_greyscale_uses_luma_weights(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "batches")
    data = ImageDataModule(data_dir=str(tmp_path / "batches"), image_size=32, in_chans=1, mean=[0.0], std=[1.0])
    data.setup("test")
    image = written["test_batch"][0][0].astype(np.float64) / 255.0
    grey = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    np.testing.assert_allclose(data.test_set[0][0][0].numpy(), grey, atol=1e-5)


def _write_png(path: Path, colour: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


COLOURS = {"cat": (200, 40, 10), "dog": (10, 120, 250)}


def test_imagefolder_with_train_and_val_splits(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            for i in range(count):
                _write_png(tmp_path / split / name / f"{i}.png", colour, size=12)
    data = ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=4)
    assert data.data_format == "imagefolder"
    data.setup("fit")
    assert data.num_classes == 2 and data.classes == ["cat", "dog"]
    assert len(data.train_set) == 6 and len(data.val_set) == 4 and len(data.test_set) == 4
    for dataset in (data.train_set, data.val_set):
        for i in range(len(dataset)):
            x, y = dataset[i]
            colour = np.array(COLOURS[data.classes[int(y)]], dtype=np.float64) / 255.0
            assert x.shape == (3, 8, 8)
            np.testing.assert_allclose(x.numpy(), np.broadcast_to(((colour - 0.5) / 0.5)[:, None, None], (3, 8, 8)), atol=1e-6)


def test_imagefolder_single_tree_is_split_by_fractions(tmp_path: Path) -> None:
    for name, colour in COLOURS.items():
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", colour)
    data = ImageDataModule(data_dir=str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.2)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (12, 4, 4)


def test_wrong_path_and_unknown_format_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="--data.data_dir") as missing:
        ImageDataModule(data_dir=str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(DataFormatError, match="neither CIFAR-10") as unknown:
        ImageDataModule(data_dir=str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DataNotFoundError, match="data_batch_1' not found") as incomplete:
        ImageDataModule(data_dir=str(broken)).setup("fit")
    for i in range(1, 6):
        (broken / f"data_batch_{i}").write_bytes(b"this is not a pickle either")
    with pytest.raises(DataFormatError, match="not a CIFAR-10") as corrupt:
        ImageDataModule(data_dir=str(broken)).setup("fit")
    for error in (missing, unknown, incomplete, corrupt):
        assert "\n" not in str(error.value)


def test_train_augmentation_translates_flips_and_erases_eval_is_plain() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 8, 8)
    plain = ImageAugment(8, 1, [0.0], [1.0], train=False, crop_padding=2, hflip=True, random_erasing=1.0)
    assert torch.equal(plain(image), image)
    shift = ImageAugment(8, 1, [0.0], [1.0], train=True, crop_padding=2)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    offsets = set()
    for _ in range(30):
        out = shift(image)
        match = [(t, l) for t in range(5) for l in range(5) if torch.equal(out, padded[:, t : t + 8, l : l + 8])]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 3
    flip = ImageAugment(8, 1, [0.0], [1.0], train=True, hflip=True)
    outs = [flip(image) for _ in range(30)]
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in outs)
    assert any(torch.equal(o, image.flip(-1)) for o in outs) and any(torch.equal(o, image) for o in outs)
    erase = ImageAugment(8, 1, [0.0], [1.0], train=True, random_erasing=1.0)
    erased = erase(image + 1.0)  # all pixels > 0, so erased ones are exactly the zeros
    zeros = (erased == 0).nonzero()
    assert len(zeros) > 0
    rows, cols = zeros[:, 1], zeros[:, 2]
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert len(zeros) == box  # one rectangle


def test_timm_transforms_follow_the_kat_recipe(tmp_path: Path) -> None:
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((40, 60, 3), 100 * (label == "a"), dtype=np.uint8)).save(tmp_path / label / "0.png")
        Image.fromarray(np.full((50, 30, 3), 200, dtype=np.uint8)).save(tmp_path / label / "1.jpg")
    data = ImageDataModule(
        str(tmp_path), image_size=32, in_chans=3, timm_transforms=True, auto_augment="rand-m9-mstd0.5-inc1",
        hflip=True, random_erasing=0.25, crop_pct=0.875, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
        val_fraction=0.25, test_fraction=0.25,
    )
    data.setup()
    train_transform = data.train_set.dataset.pil_transform
    steps = list(train_transform.transforms)
    rand_augment = next(t for t in steps if isinstance(t, RandAugment))
    assert all(op.magnitude == 9 for op in rand_augment.ops)
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    image, label = data.train_set[0]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64
    # evaluation: resize the short side to 32 / 0.875 = 36, centre crop 32, normalise (x / 255 - 0.5) / 0.25
    eval_image, _ = data.test_set[0]
    assert eval_image.shape == (3, 32, 32)
    pixel = float(eval_image[:, 16, 16].mean())
    assert pixel in (pytest.approx((0 / 255 - 0.5) / 0.25, abs=0.02), pytest.approx((100 / 255 - 0.5) / 0.25, abs=0.02),
                     pytest.approx((200 / 255 - 0.5) / 0.25, abs=0.05))


def test_the_imagenet_recipes_randaugment_survives_posterize_to_zero_bits(tmp_path: Path) -> None:
    """``rand-m9-mstd0.5-inc1`` clips magnitudes at 10, where ``PosterizeIncreasing`` keeps 0 bits. Before: Pillow 13
    raised "bits must be between or equal to 1 and 8" for ~1 image in 700 (10 of these 3,000 seeded draws)."""
    import random

    import yaml
    from timm.data.auto_augment import AugmentOp

    for label in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 60, dtype=np.uint8)).save(tmp_path / split / label / "0.png")
    recipe = Path(__file__).parents[1] / "recipes" / "kat_imagenet.yaml"
    args = yaml.safe_load(recipe.read_text())["data"]["init_args"]
    assert args["auto_augment"] == "rand-m9-mstd0.5-inc1"
    data = ImageDataModule(**{**args, "data_dir": str(tmp_path), "image_size": 8, "num_workers": 0})
    transform = data._timm_transform(train=True)
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # RandAugment draws from random and numpy
    for _ in range(3000):
        assert transform(image).shape == (3, 8, 8)

    rand_augment = next(t for t in transform.transforms if hasattr(t, "ops"))
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    for magnitude, expected in ((10, np.zeros_like(pixels)), (9, pixels & 0b1000_0000), (5, pixels & 0b1100_0000)):
        op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=magnitude)
        op.aug_fn = posterize.aug_fn  # the recipe's op: 0 bits give the black image older Pillow gave
        np.testing.assert_array_equal(np.asarray(op(image)), expected)


def test_timm_transforms_refuse_non_rgb_or_non_folder_data() -> None:
    with pytest.raises(LightningActError, match="ImageFolder"):
        ImageDataModule(None, timm_transforms=True)


def test_imagefolder_skips_hidden_folders_and_refuses_empty_or_unmatched_classes(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for name, colour in COLOURS.items():
            _write_png(tmp_path / split / name / "0.png", colour)
    _write_png(tmp_path / "train" / ".ipynb_checkpoints" / "0-checkpoint.png", (0, 0, 0))  # was a third class
    data = ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=4)
    data.setup("fit")
    assert data.classes == ["cat", "dog"] and len(data.train_set) == 2
    _write_png(tmp_path / "val" / "fox" / "0.png", (9, 9, 9))  # a class the training folder lacks: was left out
    with pytest.raises(DataFormatError, match=r"has class folders \['fox'\] that the training classes lack"):
        ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=4).setup("fit")
    (tmp_path / "val" / "fox" / "0.png").unlink()
    (tmp_path / "train" / "fox").mkdir()  # an empty class folder: a class no example has
    with pytest.raises(DataFormatError, match=r"class folders \['fox'\] under .* hold no images"):
        ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=4).setup("fit")


def _one_py_file(tmp_path: Path) -> str:
    (tmp_path / "only.py").write_text("x = 1\n" * 50)
    return str(tmp_path)


@pytest.mark.parametrize("make, says", [
    (lambda tmp: ImageDataModule(val_fraction=0.6, test_fraction=0.5).setup(), "sum to < 1"),
    (lambda tmp: HyperspectralDataModule(crop_size=0), "crop_size=0 must be a whole number"),
    (lambda tmp: EEGSeizureDataModule(
        stride_seconds=0.001, recording_minutes=20, n_train_recordings=1, n_val_recordings=1, n_test_recordings=1).setup(),
     "strides of 0 samples"),
    (lambda tmp: StdlibTextDataModule(root=_one_py_file(tmp), seq_len=8).setup(), "1 Python file(s)"),
])
def test_data_module_values_that_cannot_work_are_one_line(tmp_path: Path, make, says: str) -> None:
    # before: a plain ValueError, a ZeroDivisionError or torch's error from deep inside setup (a traceback in the CLI)
    with pytest.raises(LightningActError) as error:
        make(tmp_path)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_cifar_pixels_that_are_not_bytes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.full((1, 3072), 300, dtype=np.int64), b"labels": [1]}))
    with pytest.raises(DataFormatError, match="pixel values 300 to 300, not bytes"):
        load_cifar10_batches(tmp_path, ["data_batch_1"])  # before: 300 wrapped to 44 without a word


def test_cifar_pixels_given_as_fractions_are_one_line(tmp_path: Path) -> None:
    fractions = np.random.default_rng(0).uniform(size=(1, 3072)).astype(np.float32)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": fractions, b"labels": [1]}))
    with pytest.raises(DataFormatError, match="pixel values are fractions"):
        load_cifar10_batches(tmp_path, ["data_batch_1"])  # before: truncated to all-zero images


def test_sixteen_bit_greyscale_pngs_are_scaled_not_clipped_and_32_bit_ones_refused(tmp_path: Path) -> None:
    from lightning_act.data.images import ImageFolderDataset

    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(values).save(tmp_path / "a" / "0.png")
    assert Image.open(tmp_path / "a" / "0.png").mode == "I;16"
    dataset = ImageFolderDataset(tmp_path, ["a"], 8, transform=lambda x: x)
    x, _ = dataset[0]
    # before: PIL's conversion clipped every value above 255 to white (255)
    np.testing.assert_allclose(x[0].numpy(), values / 65535.0 * 255.0, atol=0.5)
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "a" / "0.tiff")
    with pytest.raises(DataFormatError, match="32-bit samples .PIL mode 'F'. whose range is unknown"):
        ImageFolderDataset(tmp_path, ["a"], 8, transform=lambda x: x)[1]


@pytest.mark.parametrize("split, instead", [("val", "split train/ by --data.val_fraction"),
                                            ("test", "test on the validation images")])
def test_a_flat_val_or_test_folder_is_refused_not_replaced_by_train_images(tmp_path: Path, split: str, instead: str) -> None:
    """ILSVRC2012_img_val.tar unpacks flat: before, its images were silently replaced by a split of train/."""
    for name, colour in COLOURS.items():
        for i in range(3):
            _write_png(tmp_path / "train" / name / f"{i}.png", colour)
    for i in range(5):
        _write_png(tmp_path / split / f"ILSVRC2012_val_{i:08d}.png", (0, 0, 0))
    data = ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3)
    if split == "test":  # unlabelled test images (Kaggle's layout) do not stop a fit, which never reads them
        data.setup("fit")
        assert len(data.train_set) + len(data.val_set) == 3 * len(COLOURS)  # train/ split by val_fraction
    with pytest.raises(DataFormatError) as error:
        data.setup("fit") if split == "val" else data.test_dataloader()
    message = str(error.value)
    assert "\n" not in message and f"'{tmp_path / split}' holds 5 images but no class folders" in message
    assert f"sort them into {split}/<class>/" in message and instead in message


def test_images_in_sub_folders_of_a_class_are_collected_as_torchvision_does(tmp_path: Path) -> None:
    """Before: only the top level of each class folder was listed, so cat/session2/*.png was left out."""
    from torchvision.datasets import ImageFolder

    for name, colour in COLOURS.items():
        for i in range(2):
            _write_png(tmp_path / name / f"{i}.png", colour)
            _write_png(tmp_path / name / "session2" / f"{i}.png", colour)
    _write_png(tmp_path / "cat" / "z.png", COLOURS["cat"])  # sorts after the sub-folder name 'session2'
    _write_png(tmp_path / "dog" / "a" / "b" / "deep.png", COLOURS["dog"])
    data = ImageDataModule(data_dir=str(tmp_path), image_size=8, in_chans=3, val_fraction=0.2, test_fraction=0.2)
    data.setup("fit")
    samples = data.train_set.dataset.samples
    reference = ImageFolder(str(tmp_path))
    assert len(samples) == 10 and data.classes == reference.classes
    assert [(str(path), label) for path, label in samples] == reference.samples


def test_val_fraction_zero_leaves_validation_empty_not_the_test_set(tmp_path: Path) -> None:
    """Before: val_set was the test set, so checkpoint selection on val metrics selected on the test data."""
    digits = ImageDataModule(val_fraction=0.0, test_fraction=0.2)
    digits.setup("fit")
    assert len(digits.val_set) == 0 and len(digits.test_set) == round(0.2 * 1797)
    for name, colour in COLOURS.items():
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", colour)
    folder = ImageDataModule(data_dir=str(tmp_path), image_size=8, val_fraction=0.0, test_fraction=0.2)
    folder.setup("fit")
    assert (len(folder.train_set), len(folder.val_set), len(folder.test_set)) == (16, 0, 4)


def _epoch_orders(num_workers: int, global_draws_per_epoch: int) -> list[list[int]]:
    """The label order of three training epochs of the digits, drawing from the global RNG between epochs as
    augmentation or dropout would."""
    torch.manual_seed(7)
    data = ImageDataModule(image_size=8, batch_size=600, num_workers=num_workers)
    loader = data.train_dataloader()
    orders = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does at each epoch's start
        orders.append(torch.cat([labels for _, labels in loader]).tolist())
        torch.rand(global_draws_per_epoch)
    return orders


def test_the_training_order_does_not_depend_on_num_workers_or_global_random_draws() -> None:
    """Before: the shuffle drew from the global RNG (and the loader drew a base seed per epoch without workers, once
    with persistent ones), so the same seed gave another order with --data.num_workers 2 or another augmentation."""
    plain = _epoch_orders(num_workers=0, global_draws_per_epoch=0)
    assert _epoch_orders(num_workers=0, global_draws_per_epoch=5) == plain
    assert _epoch_orders(num_workers=2, global_draws_per_epoch=0) == plain
    assert plain[0] != plain[1] != plain[2]  # still reshuffled every epoch


def test_each_fit_of_one_datamodule_shuffles_from_the_seed_set_before_it() -> None:
    """Round 20's own shuffle stream lived for the DataModule's life: a second fit after seed_everything continued
    the first fit's stream, another order than a fresh DataModule's. Lightning calls teardown("fit") after a fit."""
    def first_order(data: ImageDataModule) -> list[int]:
        return torch.cat([labels for _, labels in data.train_dataloader()]).tolist()

    data = ImageDataModule(image_size=8, batch_size=600)
    torch.manual_seed(7)
    first = first_order(data)
    torch.manual_seed(8)
    assert first_order(data) == first  # a reload within one fit keeps the seed read at the fit's first loader
    data.teardown("fit")
    assert first_order(data) != first  # the next fit reads the seed again: 8
    data.teardown("fit")
    torch.manual_seed(7)
    assert first_order(data) == first
