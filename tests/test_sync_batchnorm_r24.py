"""Round 24 (F1): ``Trainer(sync_batchnorm=True)`` rebuilds each BatchNorm as a SyncBatchNorm on the same tensors after
the monitors chose their modules (in the strategy's setup), and back at the end of fit; every monitor on a BatchNorm
warned that the user had replaced it. Here Lightning's own ``TorchSyncBatchNorm`` plugin converts the model between
the monitors' setup and the first step (in one process: no DDP needed for the swap); the logged values are checked
against numpy float64 on the outputs read by our own hooks."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import ActivationStats

REPLACED = "were replaced by new modules"


class Net(pl.LightningModule):
    def __init__(self, sync: bool = False) -> None:
        super().__init__()
        norm = nn.SyncBatchNorm if sync else nn.BatchNorm1d
        self.model = nn.Sequential(nn.Linear(6, 8), norm(8), nn.ReLU(), nn.Linear(8, 8), norm(8), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


class ConvertsAtFitStart(Callback):
    """Rebuilds the model's BatchNorms as Lightning's ``sync_batchnorm`` does, after the monitors' setup; then optionally
    swaps ``model.4`` for a fresh layer (new parameters); then records the outputs of ``model.1`` and ``model.4`` per
    step with its own hooks, in float64."""

    def __init__(self, convert: str, fresh: type[nn.Module] | None = None) -> None:
        self.convert, self.fresh = convert, fresh
        self.outputs: dict[str, dict[int, np.ndarray]] = {"model.1": {}, "model.4": {}}

    def on_fit_start(self, trainer, pl_module) -> None:
        old = pl_module.model[1]
        getattr(TorchSyncBatchNorm(), self.convert)(pl_module)
        new = pl_module.model[1]
        assert new is not old and new.weight is old.weight and new.running_mean is old.running_mean
        if self.fresh is not None:
            pl_module.model[4] = self.fresh(8)
        for name in self.outputs:
            pl_module.model[int(name[-1])].register_forward_hook(self._recorder(trainer, name))

    def _recorder(self, trainer, name: str):
        def record(module, args, output) -> None:
            self.outputs[name][trainer.global_step] = output.detach().double().numpy()
        return record


def fit(net: Net, converter: ConvertsAtFitStart, monitor: ActivationStats) -> list[str]:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, converter],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(net)
    return [str(w.message) for w in caught if REPLACED in str(w.message)]


def check_values(monitor: ActivationStats, converter: ConvertsAtFitStart, name: str) -> None:
    outputs = converter.outputs[name]
    assert sorted(outputs) == [0, 1, 2]
    for stat, numpy_stat in (("mean", np.mean), ("abs_max", lambda a: np.abs(a).max()), ("std", np.std)):
        series = monitor.history[f"act/{name}/{stat}"]
        assert series.steps == [0, 1, 2]
        np.testing.assert_allclose(series.values, [numpy_stat(outputs[s]) for s in range(3)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convert", ["apply", "revert"])
def test_batch_norms_rebuilt_by_sync_batchnorm_are_followed_without_a_warning(convert: str) -> None:
    """``apply``: BatchNorm1d -> SyncBatchNorm (the strategy's setup); ``revert``: SyncBatchNorm -> _BatchNormXd (end of
    fit, met by a later fit of the same model). Before: "['model.1', 'model.4'] were replaced by new modules"."""
    torch.manual_seed(0)
    monitor = ActivationStats(modules=["model.1", "model.4"], every_n_steps=1)
    converter = ConvertsAtFitStart(convert)
    assert fit(Net(sync=convert == "revert"), converter, monitor) == []
    for name in ("model.1", "model.4"):
        check_values(monitor, converter, name)


@pytest.mark.parametrize("fresh", [nn.BatchNorm1d, nn.SyncBatchNorm])
def test_a_batch_norm_replaced_by_a_new_one_is_still_said(fresh: type[nn.Module]) -> None:
    """``model.4`` swapped for a new layer with its own parameters (even a SyncBatchNorm) after the conversion: the
    warning names it, and only it (before: also the rebuilt ``model.1``); the new one is observed from step 0."""
    torch.manual_seed(0)
    monitor = ActivationStats(modules=["model.1", "model.4"], every_n_steps=1)
    converter = ConvertsAtFitStart("apply", fresh)
    said = fit(Net(), converter, monitor)
    assert len(said) == 1 and said[0].startswith("ActivationStats: ['model.4'] were replaced") and "step 0" in said[0]
    for name in ("model.1", "model.4"):
        check_values(monitor, converter, name)
