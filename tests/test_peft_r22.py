"""Adapters next to other libraries' (round 22): CETT on LoRA layers (Hugging Face peft's, and a pruned LoRA factor),
``freeze`` keeping parametrized and peft adapter parameters trainable, parametrizations never adapted, and
``firing_fractions`` of gates that did not run. peft itself is not needed: a stand-in has its layer's structure."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils.data import DataLoader, TensorDataset

import lightning_act.callbacks.sparsity as sparsity
from lightning_act.callbacks.sparsity import ActivationSparsity, down_projection_weight
from lightning_act.errors import LightningActError
from lightning_act.nn.dopamine import adapt_model, firing_fractions
from lightning_act.peft.lora import apply_ia3, apply_lora


class PeftStyleLoRA(nn.Module):
    """The structure of peft's ``peft.tuners.lora.layer.Linear``: ``base_layer``, ``lora_A``/``lora_B``
    ModuleDicts and a ``scaling`` dict by adapter name, ``active_adapters``, ``disable_adapters``,
    ``merged_adapters``; its forward is peft's (base, plus each active adapter unless merged or disabled)."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear, ranks: dict[str, int], scaling: dict[str, float]) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({a: nn.Linear(base.in_features, r, bias=False) for a, r in ranks.items()})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, base.out_features, bias=False) for a, r in ranks.items()})
        self.scaling = dict(scaling)
        self.active_adapters = ["default"]
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        base.requires_grad_(False)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            result = result + self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return result


def numpy_weight(module: nn.Linear) -> np.ndarray:
    return module.weight.detach().double().numpy()


def stand_in_layer() -> PeftStyleLoRA:
    torch.manual_seed(0)
    layer = PeftStyleLoRA(nn.Linear(16, 4), {"default": 2, "other": 3}, {"default": 4.0, "other": 0.5})
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.normal_()
    return layer


def update(layer: PeftStyleLoRA, name: str) -> np.ndarray:
    return layer.scaling[name] * numpy_weight(layer.lora_B[name]) @ numpy_weight(layer.lora_A[name])


def test_cett_weight_of_a_peft_lora_layer_follows_its_adapters_state() -> None:
    """Before: a peft LoRA layer was no down-projection ("a Linear; ... pass a glob like '*.mlp.fc2'")."""
    layer = stand_in_layer()
    w = numpy_weight(layer.base_layer)
    # the active adapter only: "other" is not active, so its update is not in the forward
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(), w + update(layer, "default"), atol=1e-6)
    layer.active_adapters = ["default", "other"]
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(),
                               w + update(layer, "default") + update(layer, "other"), atol=1e-6)
    layer.disable_adapters = True
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(), w, atol=1e-6)
    # merged into the base: the base weight is the layer's; disabled, the forward first takes the merge out again
    with torch.no_grad():
        layer.base_layer.weight.add_(torch.from_numpy(update(layer, "default")).float())
    layer.merged_adapters, layer.disable_adapters = ["default"], False
    merged = numpy_weight(layer.base_layer)
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(), merged, atol=1e-6)
    layer.disable_adapters = True
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(), w, atol=1e-5)


def brute_force_cett_ratio(a: np.ndarray, w: np.ndarray, target: float) -> float:
    """The activation ratio where the token-averaged CETT first reaches ``target``, every cut of the ``||n_i||``."""
    m = np.abs(a) * np.linalg.norm(w, axis=0)
    full = np.linalg.norm(a @ w.T, axis=1)
    for v in np.unique(m):
        cett = np.mean(np.linalg.norm(np.where(m <= v, a, 0.0) @ w.T, axis=1) / full)
        if cett >= target:
            return float(np.mean(m > v))
    raise AssertionError("target not reached")


class MLP(pl.LightningModule):
    def __init__(self, fc2: nn.Module, lr: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.lr = nn.Linear(6, 16), fc2, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]).mean(dim=1), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 5, 6, generator=generator),
                                    torch.randint(0, 4, (32,), generator=generator)), batch_size=16)


def fit(model: MLP, monitor: ActivationSparsity, steps: int, *callbacks: Callback) -> None:
    trainer = pl.Trainer(max_steps=steps, logger=False, callbacks=[monitor, *callbacks], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, loader())


def test_cett_of_a_peft_lora_down_projection_measures_its_effective_weight() -> None:
    """Before: ``"fc2"`` (peft's layer) was refused, and ``"fc2.base_layer"`` was measured with ``W`` alone."""
    model = MLP(stand_in_layer())
    inputs: list[np.ndarray] = []
    model.fc2.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().double().numpy().reshape(-1, 16)))
    monitor = ActivationSparsity(modules=["fc1"], every_n_steps=1, cett_modules="fc2", cett_grid_size=4000,
                                 cett_grid_range=(1e-4, 1e2))
    fit(model, monitor, 1)
    effective = numpy_weight(model.fc2.base_layer) + update(model.fc2, "default")
    expected = brute_force_cett_ratio(inputs[0], effective, 0.2)
    frozen_alone = brute_force_cett_ratio(inputs[0], numpy_weight(model.fc2.base_layer), 0.2)
    assert abs(expected - frozen_alone) > 0.02  # the two weights give different answers
    assert monitor.history["sparsity/fc2-input/cett_ratio"].values[0] == pytest.approx(expected, abs=0.01)

    with pytest.raises(LightningActError, match=r"^cett_modules matched 'fc2.base_layer-input', inside the peft LoRA "
                                                r"layer 'fc2': .* e.g. 'fc2'$"):
        fit(MLP(stand_in_layer()), ActivationSparsity(modules=["fc1"], cett_modules="fc2.base_layer"), 1)


def test_cett_of_a_lora_linear_reads_its_pruned_factor_as_the_forward_does(monkeypatch) -> None:
    """Before: after ``prune`` of ``lora_b`` mid-fit, CETT used the previous step's ``lora_b`` (the pruning pre-hook
    refreshes the attribute after the monitor's input hook ran)."""
    used: list[np.ndarray] = []
    cett_partials = sparsity.cett_partials
    monkeypatch.setattr(sparsity, "cett_partials",
                        lambda rows, weight, grid: used.append(weight.double().numpy().copy()) or cett_partials(rows, weight, grid))
    torch.manual_seed(0)
    fc2 = nn.Linear(16, 4)
    model = MLP(fc2, lr=0.5)
    lora = apply_lora(model, ["fc2"], rank=2)["fc2"]
    with torch.no_grad():
        lora.lora_b.normal_()
    forward_used: dict[int, np.ndarray] = {}

    class PruneAfterFirstStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step == 1:
                prune.l1_unstructured(lora, "lora_b", amount=0.5)
                lora.register_forward_hook(lambda m, a, o: forward_used.__setitem__(
                    trainer.global_step,  # after the pruning pre-hook: the factors this forward computed with
                    numpy_weight(m.base) + m.scaling * m.lora_b.detach().double().numpy() @ m.lora_a.detach().double().numpy()))

    fit(model, ActivationSparsity(modules=[], every_n_steps=1, cett_modules="fc2"), 4, PruneAfterFirstStep())
    assert sorted(forward_used) == [1, 2, 3] and len(used) == 4
    assert not np.allclose(forward_used[2], forward_used[3])
    for step in (1, 2, 3):
        np.testing.assert_allclose(used[step], forward_used[step], atol=1e-6, err_msg=f"step {step}")


class Positive(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x)

    def right_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.expm1(y))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_later_adapter_keeps_a_parametrized_gain_trainable() -> None:
    """Before: ``apply_lora`` after a gate whose gain is kept positive froze ``parametrizations.gain.original``."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    gate = adapt_model(model, [nn.GELU])["1"]
    parametrize.register_parametrization(gate, "gain", Positive())
    apply_lora(model, ["2"], rank=1)
    assert gate.parametrizations.gain.original.requires_grad
    assert trainable(model) == 3 * 16 + (16 + 4)  # tau, gain, leak per neuron + LoRA's A (1 x 16) and B (4 x 1)


class PeftModelLike(nn.Module):
    """A ``PeftModel``'s structure: ``peft_config`` and a ``prompt_encoder`` ModuleDict beside the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.peft_config = model, {"default": None}
        self.prompt_encoder = nn.ModuleDict({"default": nn.Embedding(3, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_adapt_model_keeps_peft_adapters_trainable() -> None:
    """Before: ``adapt_model`` on a peft model froze every ``lora_A``/``lora_B`` (and a prompt encoder)."""
    torch.manual_seed(0)
    lora = PeftStyleLoRA(nn.Linear(16, 4), {"default": 2}, {"default": 1.0})
    model = PeftModelLike(nn.Sequential(nn.Linear(8, 16), nn.GELU(), lora))
    adapt_model(model, [nn.GELU], example_input=torch.randn(2, 8))
    assert not model.model[0].weight.requires_grad and not lora.base_layer.weight.requires_grad
    # gate 3 x 16, LoRA A (2 x 16) and B (4 x 2), prompt table 3 x 8
    assert trainable(model) == 48 + 32 + 8 + 24


@pytest.mark.parametrize("adapt", [adapt_model, apply_ia3])
def test_a_parametrizations_softplus_is_not_adapted(adapt) -> None:
    """Before: the Softplus keeping a weight positive was gated (or rescaled) like the model's activation."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Softplus(), nn.Linear(16, 4))
    parametrize.register_parametrization(model[2], "weight", nn.Softplus())
    assert sorted(adapt(model, [nn.Softplus], example_input=torch.randn(5, 8))) == ["1"]
    assert type(model[2].parametrizations.weight[0]) is nn.Softplus


class TwoPaths(nn.Module):
    """``z`` is the input itself (identity Linears): a gate fires where the input is positive. ``late`` runs only
    when the first feature of the batch sums above 0; ``copy`` is never called (an EMA copy kept on the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.early, self.late = nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        for linear in (self.early[0], self.late[0]):
            with torch.no_grad():
                linear.weight.copy_(torch.eye(2))
                linear.bias.zero_()
        adapt_model(self, ["early.1", "late.1"])
        self.copy = copy.deepcopy(self.early)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.early(x)
        return self.late(x) if bool(x[:, 0].sum() > 0) else h


def test_firing_fractions_are_nan_where_a_gate_did_not_run() -> None:
    """Before: ``late`` was credited with the first batch's firing for the second batch's group, ``copy`` reported
    0 ("never fires")."""
    deep = torch.tensor([[1.0, -1.0], [2.0, 3.0]])  # group 0: late runs
    exit_early = torch.tensor([[-1.0, 1.0], [-2.0, -3.0]])  # group 1: late skipped
    fractions = firing_fractions(TwoPaths(), [(deep, [0, 0]), (exit_early, [1, 1])], 2)
    nan = float("nan")
    torch.testing.assert_close(fractions["early.1"], torch.tensor([[1.0, 0.5], [0.0, 0.5]]))
    torch.testing.assert_close(fractions["late.1"], torch.tensor([[1.0, 0.5], [nan, nan]]), equal_nan=True)
    assert torch.isnan(fractions["copy.1"]).all()


def test_real_peft_lora_layer_is_measured_with_its_merged_weight() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["2"]))
    layer = model.base_model.model[2]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    merged = copy.deepcopy(model).merge_and_unload()[2].weight.detach().double().numpy()
    np.testing.assert_allclose(down_projection_weight(layer).double().numpy(), merged, atol=1e-6)
    adapt_model(model, [nn.GELU], example_input=torch.randn(2, 8))
    assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
