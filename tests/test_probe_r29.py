"""Round 29: a probe puts back a parameter whose ``.data`` a forward rebinds (official MoCo's momentum update,
``param_k.data = param_k.data * m + param_q.data * (1 - m)`` inside ``forward``), compared bitwise with the same fit
without the monitor; and a probe reads the first validation loader that holds batches, not only
``dataloader_idx=0``."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _toy import ToyTask, quiet_trainer, tiny_mlp, toy_dataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import MassiveActivations, SensitiveNeurons
from lightning_act.callbacks.probe import probing
from lightning_act.errors import LightningActError


class MoCo(pl.LightningModule):
    """A query encoder and a momentum key encoder updated inside ``forward``, by ``.data`` rebinding (facebookresearch/moco
    ``builder.py``) or, for the control, in place."""

    def __init__(self, rebind: bool, m: float = 0.9) -> None:
        super().__init__()
        self.encoder_q = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.rebind, self.m = rebind, m

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            if self.rebind:
                k.data = k.data * self.m + q.data * (1.0 - self.m)
            else:
                k.mul_(self.m).add_(q.detach(), alpha=1.0 - self.m)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        return q @ k.T / 0.2

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        logits = self(x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x))
        return F.cross_entropy(logits, torch.arange(len(x)))

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _inputs(seed: int, n: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))), batch_size=8)


def _moco_fit(rebind: bool, callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = MoCo(rebind)
    trainer = quiet_trainer(max_steps=5, callbacks=callbacks, limit_val_batches=1)
    trainer.fit(model, _inputs(0), _inputs(1))
    return model.state_dict()


def _two_inputs(pl_module: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return pl_module(batch[0], batch[0])


MONITORS = {
    "sensitive": lambda: SensitiveNeurons(modules=["encoder_q.2"], every_n_steps=1, num_samples=8,
                                          eigenscore_passes=0, forward_fn=_two_inputs),
    "massive": lambda: MassiveActivations(modules=["encoder_k.2"], every_n_steps=1, probe="val", probe_batches=1,
                                          forward_fn=_two_inputs),
}


@pytest.mark.parametrize("rebind", [True, False], ids=["data-rebind", "in-place-control"])
@pytest.mark.parametrize("monitor", list(MONITORS))
def test_momentum_update_in_forward_leaves_training_unchanged(monitor: str, rebind: bool) -> None:
    """5 steps, a probe at each (past the 3 quiet probes after which a model's probes only compare versions): the
    weights equal the same fit's without the monitor, bit for bit (before round 29 the `.data` rebind stayed: the key
    encoder took an extra momentum step per probe and every tensor differed)."""
    bare = _moco_fit(rebind, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitored = _moco_fit(rebind, [MONITORS[monitor]()])
    differ = [name for name in bare if not torch.equal(bare[name], monitored[name])]
    assert not differ


class RebindsThenWrites(nn.Module):
    """An eval forward that rebinds its weight's ``.data`` and then writes the new tensor in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc.weight.data = self.fc.weight.data * 0.5
        self.fc.weight.add_(1.0)
        self.fc.bias.data = self.fc.bias.data.double().float()  # a new tensor of equal values
        return self.fc(x)


def test_rebind_put_back_in_watched_and_trusted_probes() -> None:
    """Six probes of a model whose forward rebinds (the first 3 watched, the rest trusted quiet): the parameters are the
    same tensors with the same values after each, and nothing says a write was kept."""
    model = RebindsThenWrites()
    weight, bias = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    storages = (model.fc.weight.data_ptr(), model.fc.bias.data_ptr())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            with probing(None, model, torch.device("cpu")):
                model(torch.ones(2, 4))
            assert torch.equal(model.fc.weight, weight) and torch.equal(model.fc.bias, bias)
            assert (model.fc.weight.data_ptr(), model.fc.bias.data_ptr()) == storages


def _examples(n: int, seed: int) -> DataLoader:
    return DataLoader(toy_dataset(n, seed=seed), batch_size=4)


def _validation_fit(callback: pl.Callback, val: dict[str, DataLoader]) -> None:
    torch.manual_seed(0)
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(ToyTask(tiny_mlp()), _examples(32, 0), val)


@pytest.mark.parametrize("empty_first", [1, 2])
def test_empty_first_validation_loader_probes_the_next(empty_first: int) -> None:
    """Validation loaders ``{a: 0 examples, ..., b: 16}`` (Lightning validates them): SensitiveNeurons tracks the first
    ``num_samples`` inputs of b and MassiveActivations(probe="val") probes b's first batch, each said once (before
    round 29 both stopped the fit: "the validation dataloader is empty")."""
    loaders = {f"empty{i}": _examples(0, i) for i in range(empty_first)}
    expected = toy_dataset(16, seed=7).tensors[0]
    sensitive = SensitiveNeurons(modules=["net.2"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _validation_fit(sensitive, {**loaders, "b": _examples(16, 7)})
    assert torch.equal(torch.cat(sensitive._batches), expected[:8])
    said = [str(w.message) for w in caught if "takes its batches from validation dataloader" in str(w.message)]
    assert len(said) == 1 and f"dataloader_idx={empty_first})" in said[0]
    massive = MassiveActivations(modules=["net.1"], every_n_steps=1, probe="val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _validation_fit(massive, {**loaders, "b": _examples(16, 7)})
    (batch, measured), = massive._probe_plan
    assert measured and torch.equal(batch[0], expected[:4])


def test_every_validation_loader_empty_says_so() -> None:
    """All the loaders empty: one line that says every one of them is."""
    with pytest.raises(LightningActError, match="every one of the 2 validation dataloaders is empty"):
        _validation_fit(SensitiveNeurons(modules=["net.2"], every_n_steps=1, num_samples=8, eigenscore_passes=0),
                        {"a": _examples(0, 1), "b": _examples(0, 2)})
