"""Round 25: narrow samples get their exact median on the PyTorch fallback (the histogram cost 2,048 bins each)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from _toy import quiet_trainer
from lightning_act.callbacks import MassiveActivations
from lightning_act.stats.fused import fused_statistics, massive_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_massive(x: np.ndarray, abs_threshold: float, ratio_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(x.reshape(x.shape[0], -1).astype(np.float64))
    median = np.median(magnitude, axis=1)
    count = ((magnitude > abs_threshold) & (magnitude >= ratio_threshold * median[:, None])).sum(1)
    return median, count


@pytest.mark.parametrize("shape", [(512, 64), (64, 7, 9), (300, 1023)])
def test_narrow_samples_get_numpys_median_and_the_count_at_it(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator) * torch.logspace(-9, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    x.view(shape[0], -1)[:, 0] *= 5000.0  # one massive entry per sample
    x[1] = 0.0  # an all-zero sample: median 0
    stats = fused_statistics(x, massive_spec(abs_threshold=1e-6, ratio_threshold=100.0), implementation="torch")
    median, count = numpy_massive(x.numpy(), 1e-6, 100.0)
    # the samples of scale 1e-9 have medians below the histogram's window (it read them as NaN, unknown)
    np.testing.assert_array_equal(stats.sample_median.numpy(), median)
    np.testing.assert_array_equal(stats.sample_massive_count.numpy(), count)


def test_massive_activations_logs_the_exact_mean_median_of_an_mlps_narrow_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 2))
    seen: list[np.ndarray] = []
    model[1].register_forward_hook(lambda module, args, output: seen.append(output.detach().numpy().copy()))

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(batch).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = MassiveActivations(modules=["model.1"], every_n_steps=1)
    data = torch.utils.data.DataLoader(torch.randn(96, 8), batch_size=32)
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(Task(), data)
    expected = [np.median(np.abs(a.astype(np.float64)), axis=1).mean() for a in seen]
    logged = monitor.history["massive/model.1/median"].values
    np.testing.assert_allclose(logged, expected, rtol=1e-6)

