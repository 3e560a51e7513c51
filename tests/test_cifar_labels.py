"""CIFAR-10 batches whose labels fall outside 0-9 are refused at load time with one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from lightning_act.data.images import load_cifar10_batches
from lightning_act.errors import DataFormatError


def _write_batch(path: Path, labels: list[int]) -> None:
    data = np.zeros((len(labels), 3 * 32 * 32), dtype=np.uint8)
    with open(path, "wb") as handle:
        pickle.dump({b"data": data, b"labels": labels}, handle)


@pytest.mark.parametrize("bad", [10, -1, 255])
def test_out_of_range_label_is_one_line_at_load_time(tmp_path: Path, bad: int) -> None:
    _write_batch(tmp_path / "data_batch_1", [3, 9, bad, 0])
    with pytest.raises(DataFormatError) as info:
        load_cifar10_batches(tmp_path, ["data_batch_1"])
    message = str(info.value)
    assert "\n" not in message
    assert "data_batch_1" in message and f"e.g. {bad} at index 2" in message and "0-9" in message


def test_labels_0_to_9_load(tmp_path: Path) -> None:
    _write_batch(tmp_path / "test_batch", list(range(10)))
    images, labels = load_cifar10_batches(tmp_path, ["test_batch"])
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
