"""The monitors in a Trainer of the standalone ``pytorch_lightning`` package (``import pytorch_lightning as pl``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import ActivationSparsity

pl = pytest.importorskip("pytorch_lightning")


class LateLayers(pl.LightningModule):
    """Builds its layers in ``configure_model``, as Lightning recommends for large models."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_pytorch_lightning_module_with_late_layers_is_monitored_and_its_figure_goes_to_the_version_folder(tmp_path):
    # Before: the checks were against lightning.pytorch's classes only: the layers built in configure_model were never
    # tapped ("the model has no submodules"), and the figure went to the CSV logger's root, not its version folder.
    torch.manual_seed(0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    model = LateLayers()
    seen = []

    class Records(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy()))

    monitor = ActivationSparsity(every_n_steps=1)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_steps=2, logger=logger, callbacks=[monitor, Records()], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
    series = monitor.history["sparsity/net.1/zero_frac"]
    assert series.values == [pytest.approx(np.mean(a == 0), abs=1e-12) for a in seen]
    assert (tmp_path / "csv" / "version_0" / "plots" / "sparsity_zero_frac_heatmap.png").is_file()
    assert not (tmp_path / "csv" / "plots").exists()
