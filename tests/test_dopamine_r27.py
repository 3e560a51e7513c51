"""Round 27: "@activations" on (IA)³ and Dopamine models, the phase-2 checkpoint's foundation split (also under
strategies that restore a checkpoint after setup), the image size of both Dopamine phases, LoRA's alpha."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from _toy import quiet_trainer
from lightning_act.capture.selection import select_taps
from lightning_act.data.digits import split_indices
from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.errors import ConfigError, ModuleSelectionError
from lightning_act.nn.dopamine import adapt_model
from lightning_act.peft.lora import LoRALinear, apply_ia3
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation


# ------------------------------------------------------------------------------------------------ "@activations"
def _gelu64(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _tapped_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    taps = select_taps(model, "@activations")
    outputs: dict[str, torch.Tensor] = {}
    handles = [t.module.register_forward_hook(lambda _m, _i, out, n=t.name: outputs.__setitem__(n, out)) for t in taps]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


def test_activations_preset_taps_the_ia3_scaled_activation_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    apply_ia3(model, [nn.GELU])["1"].scale.data.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0]))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    outputs = _tapped_outputs(model, x)
    assert list(outputs) == ["1"]  # not "1.module": GELU(z) before the learned scale
    weight, bias = (p.detach().double().numpy() for p in (model[0].weight, model[0].bias))
    expected = _gelu64(x.double().numpy() @ weight.T + bias) * np.array([3.0, -1.0, 0.5, 2.0, 1.0])
    np.testing.assert_allclose(outputs["1"].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_activations_preset_taps_a_dopamine_gate_and_not_its_inner_activation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2))
    adapt_model(model, [nn.GELU])
    assert [t.name for t in select_taps(model, "@activations")] == ["1", "3"]  # once per adapted layer


class _MLPBlock(nn.Module):
    """An activation held by a module that is no activation: the GELU stays the tap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def test_activations_preset_keeps_activations_inside_other_modules_and_ia3_on_a_linear_is_none() -> None:
    model = nn.Sequential(_MLPBlock(), nn.Linear(4, 6), nn.Linear(6, 2))
    apply_ia3(model, ["1"])  # (IA)³ on a Linear (a qkv): its output is no activation
    assert [t.name for t in select_taps(model, "@activations")] == ["0.act"]


# ------------------------------------------------------------------------------------------- Dopamine, data settings
_KW = dict(image_size=8, max_samples=200, batch_size=64)


def _fit_foundation(path: Path, seed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    trainer = quiet_trainer(max_steps=1)
    data = RotatedDigitsDataModule("mix", "rotated", seed=seed, **_KW)
    trainer.fit(DopamineFoundation(image_size=8, hidden_sizes=[6]), datamodule=data)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def replaced_foundation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """(foundation path, phase-2 checkpoint, its frozen first weight): phase 1 at seed 0, phase 2 at seed 0, then
    phase 1 again at seed 1 into the same path (a seed sweep over one path)."""
    folder = tmp_path_factory.mktemp("r27")
    foundation, phase2 = folder / "foundation.ckpt", folder / "phase2.ckpt"
    _fit_foundation(foundation, seed=0)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(DopamineSpecialisation(str(foundation), method="dopamine"),
                datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=0, **_KW))
    trainer.save_checkpoint(phase2)
    frozen = torch.load(phase2, weights_only=False)["state_dict"]["model.1.weight"]
    _fit_foundation(foundation, seed=1)
    return foundation, phase2, frozen


def test_phase_two_checkpoint_checks_the_split_of_the_foundation_it_restores(
    replaced_foundation: tuple[Path, Path, torch.Tensor],
) -> None:
    _, phase2, frozen = replaced_foundation
    train0 = set(split_indices(200, 0.15, 0.35, 0)[0].tolist())
    assert any(i in train0 for i in split_indices(200, 0.15, 0.35, 1)[2].tolist())  # what the refusal prevents
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = DopamineSpecialisation.load_from_checkpoint(phase2)
    assert torch.equal(module.model[1].weight, frozen)  # the seed-0 foundation's weights run
    said = [str(w.message) for w in caught if "now holds a foundation fitted with other data settings" in str(w.message)]
    assert len(said) == 1 and "seed=1 (was 0)" in said[0]
    with pytest.raises(ConfigError, match=r"\(seed=1\) is not the foundation's.*pass --data.seed 0"):
        quiet_trainer(limit_test_batches=1).test(
            module, datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=1, **_KW), verbose=False)
    quiet_trainer(limit_test_batches=1).test(  # the split of the restored foundation runs (it was refused)
        module, datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=0, **_KW), verbose=False)


def test_phase_two_test_ckpt_path_checks_the_split_of_the_foundation_it_restores(
    replaced_foundation: tuple[Path, Path, torch.Tensor],
) -> None:
    """`lightning_act test --ckpt_path`: the module is built from the (replaced) file, then the checkpoint restored."""
    foundation, phase2, _ = replaced_foundation
    for seed, refused in ((1, True), (0, False)):
        module = DopamineSpecialisation(str(foundation), method="dopamine")
        data = RotatedDigitsDataModule("rotated", "rotated", seed=seed, **_KW)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if refused:
                with pytest.raises(ConfigError, match=r"\(seed=1\) is not the foundation's"):
                    quiet_trainer(limit_test_batches=1).test(module, datamodule=data, ckpt_path=phase2, verbose=False)
            else:
                quiet_trainer(limit_test_batches=1).test(module, datamodule=data, ckpt_path=phase2, verbose=False)
    module = DopamineSpecialisation(str(foundation), method="dopamine")  # `lightning_act validate --ckpt_path`
    with warnings.catch_warnings(), pytest.raises(ConfigError, match=r"\(seed=1\) is not the foundation's"):
        warnings.simplefilter("ignore")
        quiet_trainer(limit_val_batches=1).validate(
            module, datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=1, **_KW), ckpt_path=phase2,
            verbose=False)


class _RestoresAfterSetup(SingleDeviceStrategy):
    """What DeepSpeed, FSDP and ModelParallelStrategy set: Lightning restores a --ckpt_path after on_fit_start."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def _checked_foundation_seeds(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The foundation seed each split check compares against, in call order."""
    seeds: list[object] = []
    check = DopamineSpecialisation._check_split

    def recording(module: DopamineSpecialisation) -> None:
        seeds.append((module._foundation_data or {}).get("seed"))
        check(module)

    monkeypatch.setattr(DopamineSpecialisation, "_check_split", recording)
    return seeds


@pytest.mark.parametrize("strategy", [None, _RestoresAfterSetup], ids=["default", "restore_after_setup"])
def test_phase_two_fit_ckpt_path_checks_the_split_of_the_restored_foundation_once(
    replaced_foundation: tuple[Path, Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch, strategy: type | None,
) -> None:
    """`lightning_act fit --ckpt_path`: the checkpoint's foundation (seed 0) decides, not the replaced file (seed 1),
    whether the strategy restores before on_fit_start (the default) or after it (DeepSpeed, FSDP)."""
    foundation, phase2, _ = replaced_foundation
    seeds = _checked_foundation_seeds(monkeypatch)
    def options() -> dict[str, object]:  # a strategy instance serves one trainer
        return {} if strategy is None else {"strategy": strategy(device="cpu")}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"\(seed=1\) is not the foundation's.*pass --data.seed 0"):
            quiet_trainer(max_steps=2, **options()).fit(
                DopamineSpecialisation(str(foundation), method="dopamine"),
                datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=1, **_KW), ckpt_path=phase2)
        assert seeds == [0]
        trainer = quiet_trainer(max_steps=2, **options())
        trainer.fit(DopamineSpecialisation(str(foundation), method="dopamine"),
                    datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=0, **_KW), ckpt_path=phase2)
    assert trainer.global_step == 2 and seeds == [0, 0]  # it resumed and trained; one check per fit


def test_restore_after_setup_fit_without_ckpt_path_is_refused_before_a_step(
    replaced_foundation: tuple[Path, Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no checkpoint to restore, the check on_fit_start leaves runs before the first training step."""
    foundation, _, _ = replaced_foundation  # now the seed-1 foundation
    seeds = _checked_foundation_seeds(monkeypatch)
    module = DopamineSpecialisation(str(foundation), method="dopamine")
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = quiet_trainer(max_steps=2, strategy=_RestoresAfterSetup(device="cpu"))
    with warnings.catch_warnings(), pytest.raises(ConfigError, match=r"\(seed=0\) is not the foundation's"):
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=RotatedDigitsDataModule("rotated", "rotated", seed=0, **_KW))
    assert trainer.global_step == 0 and seeds == [1]
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_image_size_other_than_the_networks_stops_with_one_line_in_both_phases(
    replaced_foundation: tuple[Path, Path, torch.Tensor],
) -> None:
    foundation, _, _ = replaced_foundation  # built for 8 x 8 images: 64 inputs
    with pytest.raises(ConfigError, match=r"8 x 8 images .*takes 16 x 16 \(256 inputs\).*--model.image_size 8"):
        quiet_trainer(max_steps=1).fit(
            DopamineFoundation(image_size=16), datamodule=RotatedDigitsDataModule("mix", "rotated", image_size=8))
    for method in ("dopamine", "lora"):  # the first Linear wrapped by LoRA is read too
        with pytest.raises(ConfigError, match=r"16 x 16 images .*takes 8 x 8 \(64 inputs\); pass --data.image_size 8"):
            quiet_trainer(max_steps=1).fit(DopamineSpecialisation(str(foundation), method=method),
                                           datamodule=RotatedDigitsDataModule("rotated", "rotated", image_size=16))


# ----------------------------------------------------------------------------------------------------- LoRA alpha
def test_lora_alpha_zero_is_refused_in_one_line(replaced_foundation: tuple[Path, Path, torch.Tensor]) -> None:
    with pytest.raises(ModuleSelectionError, match=r"^LoRA alpha must be a finite number other than 0, got 0.0; ") as e:
        LoRALinear(nn.Linear(3, 2), rank=2, alpha=0.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ModuleSelectionError, match="other than 0"):
        DopamineSpecialisation(str(replaced_foundation[0]), method="lora", lora_alpha=0)


def test_lora_negative_alpha_trains_the_same_model_as_its_absolute_value() -> None:
    """The documented reason a negative alpha is accepted: ``-alpha`` trains ``-B`` along ``alpha``'s path."""
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    trained = {}
    for alpha in (4.0, -4.0):
        torch.manual_seed(2)
        layer = LoRALinear(nn.Linear(5, 3).requires_grad_(False), rank=2, alpha=alpha)
        optimizer = torch.optim.AdamW([layer.lora_a, layer.lora_b], lr=0.05, weight_decay=0.01)
        for _ in range(5):
            optimizer.zero_grad()
            ((layer(x) - target) ** 2).mean().backward()
            optimizer.step()
        trained[alpha] = layer
    plus, minus = trained[4.0], trained[-4.0]
    assert plus.lora_b.abs().max() > 0  # it trained
    torch.testing.assert_close(minus.lora_b, -plus.lora_b)
    torch.testing.assert_close(minus.lora_a, plus.lora_a)
    with torch.no_grad():
        torch.testing.assert_close(minus(x), plus(x))
