"""Round 26: a reused monitor says its once-per-tap warnings again in a new run; the torch.func warning again for new
monitors of the same model; the replaced-module check's identity fast path; one clear line for a modules= that is no
spec; the public ``register_activation_class``."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.func import functional_call, grad, vmap

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import (
    ActivationSparsity,
    ActivationStats,
    DimensionalCollapse,
    MassiveActivations,
    SensitiveNeurons,
)
from lightning_act.callbacks import base as base_module
from lightning_act.capture import register_activation_class, select_taps
from lightning_act.capture import selection
from lightning_act.capture.selection import module_at, module_reads, reads_unchanged
from lightning_act.errors import LightningActError


class SkipsItsLastBlock(BlockNet):
    """``BlockNet`` whose ``blocks[1]`` never runs: every monitor tapping it says once that it gave no activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks[0](self.embed(x.reshape(x.shape[0], 4, 64))).mean(1))


def _four_monitors() -> list[Any]:
    return [
        ActivationSparsity(modules=["net.blocks.*.act"], every_n_steps=1),
        MassiveActivations(modules=["net.blocks.*"], every_n_steps=1),
        DimensionalCollapse(modules=["net.blocks.*"], every_n_steps=1, param_patterns=[]),
        SensitiveNeurons(modules=["net.blocks.*"], every_n_steps=1, num_samples=8, window=2, eigenscore_passes=0),
    ]


def _said_no_activation(trainer: Any, model: nn.Module) -> list[str]:
    """``"<monitor>: <tap>"`` of each tap in ``net.blocks.1`` that ``trainer.fit(model)`` says gave no activation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ToyData())
    return sorted(str(w.message).partition(" produced")[0].partition(" gave")[0] for w in caught
                  if "net.blocks.1" in str(w.message) and "no activation" in str(w.message))


def test_a_reused_monitor_says_its_once_per_tap_warnings_again_in_a_new_run_but_not_in_a_continuation() -> None:
    """As documented (FitScopedState): a new Trainer from step 0 is a new run, a further fit of the same Trainer
    continues it. A new model with the first one's problem is told, as fresh monitors tell it (fit 1)."""
    monitors = _four_monitors()
    trainer = quiet_trainer(max_steps=2, callbacks=monitors)
    first = _said_no_activation(trainer, ToyTask(SkipsItsLastBlock()))
    assert {said.split(":")[0] for said in first} == {type(m).__name__ for m in monitors}
    trainer.fit_loop.epoch_loop.max_steps = 3
    assert _said_no_activation(trainer, trainer.lightning_module) == []  # the same run goes on: said already
    assert _said_no_activation(quiet_trainer(max_steps=2, callbacks=monitors), ToyTask(SkipsItsLastBlock())) == first


class PerSampleGradients(ToyTask):
    """A training step that also computes per-sample gradients through ``vmap(grad(functional_call(self, ...)))``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        params = {name: p.detach() for name, p in self.named_parameters()}

        def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(self, p, (xi[None],)), yi[None])

        vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return super().training_step(batch, batch_idx)


def test_the_torch_func_warning_is_said_again_to_new_monitors_of_the_same_model() -> None:
    """Fit 1 (a new monitor) says once that forwards inside a torch.func transform are not observed; fit 2 of the same
    model with a new monitor and a new Trainer (a re-run cell) observes no more of them and says it as fit 1 did."""
    model = PerSampleGradients(BlockNet())

    def said() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=2, callbacks=[ActivationStats(every_n_steps=1)]).fit(model, ToyData())
        return sum("torch.func transform" in str(w.message) for w in caught)

    assert said() == 1
    assert said() == 1


def test_module_reads_find_what_module_at_finds_and_tell_each_change() -> None:
    """A name whose module changed (a replaced module or parent, a wrapper put around its parent (``_orig_mod``), a
    name that left) fails ``reads_unchanged``: while it holds, ``module_at`` gives what it gave."""
    model = ToyTask(BlockNet())
    names = ["net.blocks.1.fc", "net.blocks.1", "net.head", "net.gone"]
    changes = [
        lambda: setattr(model.net.blocks[1], "fc", nn.Linear(16, 16)),
        lambda: model.net.blocks.__setitem__(1, nn.Sequential()),
        lambda: delattr(model.net, "head"),
        lambda: model.net.add_module("_orig_mod", BlockNet()),  # a wrapper key: module_at now looks inside it
    ]
    for change in changes:
        recorded = {name: module_reads(model, name) for name in names}
        assert all(found is module_at(model, name) for name, (found, _) in recorded.items())
        assert all(reads_unchanged(reads) for _, reads in recorded.values())
        change()
        moved = [name for name, (found, _) in recorded.items() if module_at(model, name) is not found]
        assert moved  # every change moves one of the names
        assert not [name for name in moved if reads_unchanged(recorded[name][1])]


class ReplacesTheHead(Callback):
    """``net.head`` replaced by a new layer before step 2's forward."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 2:
            pl_module.net.head = nn.Linear(16, 4)


def test_a_due_step_with_every_tap_in_place_does_not_work_out_the_replaced_modules(monkeypatch) -> None:
    """The per-step check is identity tests of the lookups that found the taps: ``modules_now_at_taps`` (a walk of
    every tap's name) runs only at the step where one finds another module, and the monitor follows the new one."""
    calls: list[int] = []
    walk = base_module.modules_now_at_taps

    def counted(pl_module: nn.Module, taps: Any) -> Any:
        calls.append(len(taps))
        return walk(pl_module, taps)

    monkeypatch.setattr(base_module, "modules_now_at_taps", counted)
    model = ToyTask(BlockNet())
    monitor = ActivationStats(modules=["net.head", "net.blocks.0"], every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=5, callbacks=[ReplacesTheHead(), monitor]).fit(model, ToyData())
    assert calls == [2]  # step 2 only
    assert monitor.taps[0].module is model.net.head
    assert sum("replaced by new modules" in str(w.message) and "from step 2" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("build", [
    lambda: ActivationStats(modules=5),
    lambda: MassiveActivations(modules=3.5),
    lambda: ActivationSparsity(modules=[5]),
    lambda: SensitiveNeurons(modules=[nn.GELU()]),
    lambda: DimensionalCollapse(modules=["net.blocks.*", None]),
])
def test_a_modules_argument_that_is_no_spec_is_one_line_at_construction(build) -> None:
    """Not "'int' object is not iterable", nor a refusal at fit start."""
    with pytest.raises(LightningActError, match=r"modules=.* must be a module spec or a list of them") as raised:
        build()
    assert "\n" not in str(raised.value)


def test_modules_given_as_a_tuple_or_a_class_are_still_taken() -> None:
    assert ActivationStats(modules=("net.head", nn.GELU)).modules == ["net.head", nn.GELU]
    assert ActivationStats(modules=nn.GELU).modules == [nn.GELU]


def test_a_registered_activation_class_is_tapped_by_the_activations_preset(monkeypatch) -> None:
    """The public ``register_activation_class``, as a call and as a class decorator: a class no name heuristic knows
    is selected by "@activations" once registered, and not before."""
    monkeypatch.setattr(selection, "_extra_activation_classes", [])

    class SquaredGate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.sigmoid()

    model = nn.Sequential(nn.Linear(4, 4), SquaredGate(), nn.Linear(4, 4), nn.Identity())
    assert [tap.name for tap in select_taps(model, ["@activations", "0"])] == ["0"]  # the gate is unknown as yet
    assert register_activation_class(SquaredGate) is SquaredGate
    assert [tap.name for tap in select_taps(model, "@activations")] == ["1"]

    @register_activation_class
    class OtherGate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(min=0)

    model.append(OtherGate())
    assert [tap.name for tap in select_taps(model, "@activations")] == ["1", "4"]


@pytest.mark.parametrize(
    ("make", "owner"),
    [(lambda bad: SensitiveNeurons(modules=bad), "SensitiveNeurons"),
     (lambda bad: ActivationSparsity(modules=bad), "ActivationSparsity")],
)
def test_a_modules_argument_that_is_no_spec_names_the_monitor(make: Any, owner: str) -> None:
    with pytest.raises(LightningActError, match=rf"^{owner}: modules=5 must be a module spec"):
        make(5)


@pytest.mark.parametrize("bad", [5, [5], ["blocks.*.weight", None]])
def test_param_patterns_that_are_no_globs_are_one_line_at_construction(bad: Any) -> None:
    # Before: 5 failed with "'int' object is not iterable", [5] at fit start with a 34-line fnmatch TypeError
    with pytest.raises(LightningActError, match=r"^DimensionalCollapse: param_patterns=.* must be a name glob"):
        DimensionalCollapse(param_patterns=bad)
    assert DimensionalCollapse(param_patterns="blocks.*.weight").param_patterns == ["blocks.*.weight"]
    assert DimensionalCollapse(param_patterns=("a", "b")).param_patterns == ["a", "b"]
