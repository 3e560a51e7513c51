"""Real handwritten digits that ship inside scikit-learn (no download).

scikit-learn's ``load_digits`` holds 1,797 8×8 grey images of the digits 0–9 (UCI optical
recognition data set). They are resized here to any square size so that image models
(ViT, KAT) and the Dopamine rotation protocol can use real data on a machine with no network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_act.data.checks import check_split_fractions


def load_digits_arrays(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: float32 (N, 1, S, S) in [0, 1] and int64 (N,).

    The 8×8 originals (values 0..16) are scaled to [0, 1] and resized bilinearly to
    ``image_size`` × ``image_size``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.clamp_(0.0, 1.0), labels


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic shuffled train / val / test index split."""
    check_split_fractions(val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
