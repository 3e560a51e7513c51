"""r26: every data module refuses an argument that would give non-finite or broken inputs, in one line at construction
(not NaN batches trained on silently, nor a raw torch/numpy error at the first batch), and accepts the boundary values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_act.data.digits import split_indices
from lightning_act.data.eeg import EEGSeizureDataModule
from lightning_act.data.hyperspectral import HyperspectralDataModule
from lightning_act.data.images import ImageDataModule
from lightning_act.data.modular_addition import ModularAdditionDataModule
from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.data.stdlib_text import StdlibTextDataModule
from lightning_act.errors import LightningActError

NAN, INF = math.nan, math.inf
SMALL_EEG = dict(n_channels=2, recording_minutes=10.0, n_train_recordings=2, n_val_recordings=1, n_test_recordings=1,
                 horizon_minutes=2.0, postictal_minutes=1.0, batch_size=4)

REFUSED = [
    # (make, the argument the one line names)
    (lambda: ImageDataModule(std=[0.0] * 3), "std="),
    (lambda: ImageDataModule(std=[0.5, NAN, 0.5]), "std="),
    (lambda: ImageDataModule(std=[-0.5] * 3), "std="),
    (lambda: ImageDataModule(mean=[0.5, INF, 0.5]), "mean="),
    (lambda: ImageDataModule(image_size=0), "image_size=0"),
    (lambda: ImageDataModule(image_size=2.5), "image_size=2.5"),
    (lambda: ImageDataModule(in_chans=0, mean=[], std=[]), "in_chans=0"),
    (lambda: ImageDataModule(crop_padding=-1), "crop_padding=-1"),
    (lambda: ImageDataModule(hflip="no"), "hflip='no'"),
    (lambda: ImageDataModule(batch_size=0), "batch_size=0"),
    (lambda: ImageDataModule(num_workers=-1), "num_workers=-1"),
    (lambda: ImageDataModule(seed=-1), "seed=-1"),
    (lambda: ImageDataModule(val_fraction=NAN), "val_fraction=nan"),
    (lambda: HyperspectralDataModule(val_fraction=0.6, test_fraction=0.5), "val_fraction=0.6"),
    (lambda: HyperspectralDataModule(noise_std=NAN), "noise_std=nan"),
    (lambda: HyperspectralDataModule(noise_std=INF), "noise_std=inf"),
    (lambda: HyperspectralDataModule(noise_std=-0.1), "noise_std=-0.1"),
    (lambda: HyperspectralDataModule(num_bands=0), "num_bands=0"),
    (lambda: HyperspectralDataModule(val_fraction=-0.1), "val_fraction=-0.1"),
    (lambda: HyperspectralDataModule(test_fraction=NAN), "test_fraction=nan"),
    (lambda: HyperspectralDataModule(batch_size=0), "batch_size=0"),
    (lambda: HyperspectralDataModule(seed=1.5), "seed=1.5"),
    (lambda: RotatedDigitsDataModule(degrees=NAN), "degrees=nan"),
    (lambda: RotatedDigitsDataModule(degrees=INF), "degrees=inf"),
    (lambda: RotatedDigitsDataModule(image_size=0), "image_size=0"),
    (lambda: RotatedDigitsDataModule(max_samples=0), "max_samples=0"),
    (lambda: RotatedDigitsDataModule(val_fraction=1.0), "val_fraction=1.0"),
    (lambda: RotatedDigitsDataModule(batch_size=0), "batch_size=0"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, sampling_rate=0.0), "sampling_rate=0.0"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, sampling_rate=NAN), "sampling_rate=nan"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "n_channels": 0}), "n_channels=0"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, window_seconds=NAN), "window_seconds=nan"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, stride_seconds=0.0), "stride_seconds=0.0"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "recording_minutes": 0.0}), "recording_minutes=0.0"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "n_train_recordings": 0}), "n_train_recordings=0"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "n_val_recordings": -1}), "n_val_recordings=-1"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, max_seizures_per_recording=0), "max_seizures_per_recording=0"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "horizon_minutes": 0.0}), "horizon_minutes=0.0"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "postictal_minutes": -1.0}), "postictal_minutes=-1.0"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, interictal_distance_minutes=NAN), "interictal_distance_minutes=nan"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, leading_gap_minutes=-1.0), "leading_gap_minutes=-1.0"),
    (lambda: EEGSeizureDataModule(**SMALL_EEG, val_fraction=0.9), "val_fraction=0.9"),
    (lambda: EEGSeizureDataModule(**{**SMALL_EEG, "batch_size": 0}), "batch_size=0"),
    (lambda: ModularAdditionDataModule(p=7.5), "p=7.5"),
    (lambda: ModularAdditionDataModule(train_fraction=NAN), "train_fraction=nan"),
    (lambda: ModularAdditionDataModule(batch_size=0), "batch_size=0"),
    (lambda: StdlibTextDataModule(seq_len=1.5), "seq_len=1.5"),
    (lambda: StdlibTextDataModule(max_train_bytes=0), "max_train_bytes=0"),
    (lambda: StdlibTextDataModule(root="/no/such/folder"), "/no/such/folder"),
    (lambda: StdlibTextDataModule(batch_size=0), "batch_size=0"),
]


@pytest.mark.parametrize("make, names", REFUSED, ids=[names for _, names in REFUSED])
def test_bad_argument_is_one_line_at_construction(make, names):
    with pytest.raises(LightningActError) as refused:
        make()  # construction only: the old code accepted these and failed (or trained on NaN) later
    message = str(refused.value)
    assert names in message and "\n" not in message
    assert "pass" in message  # the fix


def test_zero_noise_and_zero_fractions_are_accepted():
    """noise_std=0 (a noise-free scene), no validation share, no post-ictal period, the smallest modulus: all valid."""
    data = HyperspectralDataModule(num_scenes=4, scene_size=16, num_bands=8, noise_std=0.0, val_fraction=0.0,
                                   test_fraction=0.25, batch_size=4)
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    assert torch.isfinite(x).all()
    ImageDataModule(val_fraction=0.0, test_fraction=0.0)
    EEGSeizureDataModule(**{**SMALL_EEG, "postictal_minutes": 0.0, "n_val_recordings": 0, "n_test_recordings": 0},
                         leading_gap_minutes=0.0, interictal_distance_minutes=0.0)
    StdlibTextDataModule(max_train_bytes=1, seed=0, num_workers=0)
    ModularAdditionDataModule(p=2, train_fraction=0.5, batch_size=1)


def test_zero_degrees_serves_the_upright_digits():
    """degrees=0 in 'rotated' mode is no rotation: the test images are the bundled digits mapped to [-1, 1]."""
    from sklearn.datasets import load_digits

    data = RotatedDigitsDataModule("rotated", "rotated", degrees=0.0, image_size=8, max_samples=60, batch_size=8)
    data.setup("test")
    x, y = next(iter(data.test_dataloader()))
    bunch = load_digits()
    _, _, test = split_indices(60, 0.15, 0.35, 0)
    expected = bunch.images[:60][test[:8]].astype(np.float64) / 16.0 * 2.0 - 1.0
    np.testing.assert_allclose(x[:, 0].double().numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), bunch.target[:60][test[:8]])
    RotatedDigitsDataModule(degrees=-30.0, max_samples=1)  # negative angles turn clockwise


def test_unit_std_leaves_the_pixels_as_they_are():
    """mean=0 and std=1 are valid statistics: the evaluation images are the digits' raw [0, 1] values."""
    from sklearn.datasets import load_digits

    data = ImageDataModule(image_size=8, in_chans=1, mean=[0.0], std=[1.0], batch_size=8)
    data.setup("fit")
    x, _ = next(iter(data.val_dataloader()))
    _, val, _ = split_indices(1797, 0.1, 0.15, 0)
    expected = load_digits().images[val[:8]].astype(np.float64) / 16.0
    np.testing.assert_allclose(x[:, 0].double().numpy(), expected, atol=1e-6)
