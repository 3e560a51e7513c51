"""Round 29: DimensionalCollapse's count sketch of a large weight in bounded memory (the same sums, to the bit, as
numpy float64 and as the sketch before round 29), and its line when its default activation taps match nothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _toy import quiet_trainer
from lightning.pytorch import LightningModule
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import MassiveActivations, collapse
from lightning_act.callbacks.collapse import DimensionalCollapse
from lightning_act.stats.spectrum import SKETCH_BLOCK, count_sketch_draws, sketch_vector, sketch_with_draws


def numpy_sketch(x: np.ndarray, draws: np.ndarray, dim: int) -> np.ndarray:
    """The count sketch in numpy float64: each entry added, in order, to bucket ``draw`` of ``2 dim``."""
    total = np.zeros(2 * dim)
    np.add.at(total, draws.astype(np.int64), x.astype(np.float64))
    return total[dim:] - total[:dim]


def test_sketch_in_blocks_equals_numpy_float64_to_the_bit():
    x = torch.randn(2 * SKETCH_BLOCK + 12_348, generator=torch.Generator().manual_seed(0))
    draws = count_sketch_draws(x.numel(), 256, seed=3)
    expected = numpy_sketch(x.numpy(), draws.numpy(), 256)
    # Parts shorter than a block, of one block exactly and of more, one of them not flat.
    parts = [x[:7], x[7 : SKETCH_BLOCK + 7], x[SKETCH_BLOCK + 7 : -5].reshape(-1, 5), x[-5:]]
    np.testing.assert_array_equal(sketch_with_draws(parts, draws, 256).numpy(), expected)
    np.testing.assert_array_equal(sketch_with_draws([x.double()], draws, 256).numpy(), expected)
    np.testing.assert_array_equal(sketch_vector(x, 256, seed=3).numpy(), expected)
    empty = torch.zeros(0)
    np.testing.assert_array_equal(sketch_with_draws([empty], count_sketch_draws(0, 256, seed=3), 256).numpy(), 0.0)
    small_chunks = count_sketch_draws(x.numel() - 1000, 256, seed=3, offset=1000, chunk=1 << 16).numpy()
    np.testing.assert_array_equal(
        sketch_vector(x[1000:], 256, seed=3, offset=1000, chunk=1 << 16).numpy(),
        numpy_sketch(x[1000:].numpy(), small_chunks, 256),
    )


def largest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) of any operation that ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_sketch_with_the_cached_hash_makes_no_whole_float64_copy():
    x = torch.randn(8 * SKETCH_BLOCK, generator=torch.Generator().manual_seed(1))  # 8 MiB of float32
    draws = count_sketch_draws(x.numel(), 256, seed=3)
    # A whole float64 copy would take 8 bytes per weight (16 MiB); the block buffer takes 2 MiB.
    assert largest_allocation(lambda: sketch_with_draws([x[:5], x[5:]], draws, 256)) <= 8 * SKETCH_BLOCK


def test_sketch_drawing_its_hash_holds_one_chunk_of_it_at_a_time():
    chunk = 1 << 16
    y = torch.randn(8 * chunk, generator=torch.Generator().manual_seed(1))
    # The whole hash would take 4 bytes per weight (2 MiB) and the float64 copy 4 MiB; one chunk's draws 512 KiB.
    assert largest_allocation(lambda: sketch_vector(y, 256, seed=3, chunk=chunk)) <= 8 * chunk


def old_weights() -> list[torch.Tensor]:
    a = ((torch.arange(300_007) % 1013 - 506) / 7).to(torch.float32).reshape(-1, 1)
    b = ((torch.arange(3 * 41 * 997) % 89 - 44) / 3).to(torch.float32).reshape(3, 41, 997)
    return [a, b]


#: ``DimensionalCollapse(projection_dim=64, seed=5)._snapshot(old_weights())`` by the code before round 29 (its
#: first entries, and the sum of squares), on both paths: the cached hash and the hash drawn at each snapshot.
OLD_SNAPSHOT_HEAD = ["0x1.7fadb6b770000p+10", "-0x1.c736dbcb00000p+9", "-0x1.feb0c3c060000p+10",
                     "-0x1.02f3cc5b80000p+10", "-0x1.61cf3c86b8000p+11", "-0x1.2a01864118000p+11"]
OLD_SNAPSHOT_SQUARES = 497827974.39853495


@pytest.mark.parametrize("cached_hash", [True, False])
def test_snapshots_continue_the_trajectory_of_the_code_before(monkeypatch, cached_hash):
    if not cached_hash:
        monkeypatch.setattr(collapse, "CACHED_HASH_POSITIONS", 10)  # every snapshot draws the hash again
    snapshot = DimensionalCollapse(projection_dim=64, seed=5)._snapshot(old_weights())
    assert [float.hex(v) for v in snapshot[:6].tolist()] == OLD_SNAPSHOT_HEAD
    assert snapshot.square().sum().item() == OLD_SNAPSHOT_SQUARES
    flat = torch.cat([w.reshape(-1) for w in old_weights()])
    draws = count_sketch_draws(flat.numel(), 64, seed=5).numpy()
    np.testing.assert_array_equal(snapshot.numpy(), numpy_sketch(flat.numpy(), draws, 64))


class MatrixFactorisation(LightningModule):
    """Two embedding tables and a dot product: nothing that ``@blocks`` or ``@penultimate`` selects."""

    def __init__(self) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(50, 4), nn.Embedding(30, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss((self.user(x[:, 0]) * self.item(x[:, 1])).sum(1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_default_taps_matching_nothing_say_that_r90_is_still_logged():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 50, (32,), generator=g), torch.randint(0, 30, (32,), generator=g)], 1)
    loader = DataLoader(TensorDataset(x, torch.randn(32, generator=g)), batch_size=8)
    monitor, massive = DimensionalCollapse(every_n_steps=2), MassiveActivations(every_n_steps=2)
    trainer = quiet_trainer(max_steps=4, callbacks=[monitor, massive])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MatrixFactorisation(), loader)
    said = [str(w.message) for w in caught if "match nothing in MatrixFactorisation" in str(w.message)]
    collapse_line = next(m for m in said if m.startswith("DimensionalCollapse:"))
    assert "stays idle" not in collapse_line and "params/r90" in collapse_line
    assert "collapse/params/r90" in trainer.callback_metrics  # the line's claim
    assert any(m.startswith("MassiveActivations:") and "stays idle" in m for m in said)  # idle indeed
    assert not massive.history
