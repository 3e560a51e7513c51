import pytest
import torch
from torch import nn

from _toy import tiny_mlp, tiny_vit
from lightning_act.capture import select_taps
from lightning_act.errors import ModuleSelectionError


def names(taps):
    return [t.name for t in taps]


def test_presets_on_a_timm_vit():
    model = tiny_vit()
    assert names(select_taps(model, "@activations")) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert names(select_taps(model, "@blocks")) == ["blocks.0", "blocks.1"]
    (penultimate,) = select_taps(model, "@penultimate")
    assert penultimate.module is model.head and penultimate.point == "input"


def test_globs_classes_and_input_taps():
    model = tiny_vit()
    assert names(select_taps(model, "blocks.*.attn.qkv")) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert names(select_taps(model, [nn.LayerNorm])) == names(select_taps(model, "torch.nn.LayerNorm"))
    assert names(select_taps(model, "LayerNorm")) == names(select_taps(model, "torch.nn.LayerNorm"))
    assert len(names(select_taps(model, "LayerNorm"))) == 5  # 2 per block + final norm
    (tap,) = select_taps(model, "blocks.0.mlp.fc2:input")
    assert tap.name == "blocks.0.mlp.fc2-input" and tap.point == "input" and tap.module is model.blocks[0].mlp.fc2
    assert select_taps(model, tap.name) == [tap]  # the logged name selects its tap again


def test_duplicates_are_dropped_and_order_is_kept():
    model = tiny_mlp()
    assert names(select_taps(model, ["2", "@activations", "4"])) == ["2", "4"]


def test_penultimate_falls_back_to_last_linear():
    model = tiny_mlp()
    (tap,) = select_taps(model, "@penultimate")
    assert tap.module is model[5] and tap.point == "input"


def test_pattern_that_matches_nothing_is_one_clear_line():
    with pytest.raises(ModuleSelectionError) as err:
        select_taps(tiny_vit(), ["blocks.*.mlp.gelu"], owner="ActivationSparsity")
    message = str(err.value)
    assert "\n" not in message
    assert "ActivationSparsity" in message and "matched no module" in message and "'blocks.0.mlp.act'" in message


def test_unknown_preset_is_rejected():
    with pytest.raises(ModuleSelectionError, match="unknown module preset '@attention'"):
        select_taps(tiny_vit(), "@attention")


def test_taps_run_on_real_forward():
    model = tiny_vit()
    seen = {}
    from lightning_act.capture import SAMPLE_FIRST, capture_registry

    class Sink:
        armed = False

        def receive(self, index, x):
            seen.setdefault(index, x.shape)

    sink = Sink()
    taps = select_taps(model, ["@blocks", "@penultimate"])
    registry = capture_registry(model)
    registry.subscribe(sink, taps, [SAMPLE_FIRST] * len(taps))
    model(torch.randn(3, 1, 16, 16))
    assert seen == {}  # attached but not armed
    sink.armed = True
    registry.refresh()
    model(torch.randn(3, 1, 16, 16))
    registry.unsubscribe(sink)
    assert seen == {0: torch.Size([3, 5, 16]), 1: torch.Size([3, 5, 16]), 2: torch.Size([3, 16])}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("wrap", ["checkpoint_wrapper", "torch.compile"])
def test_blocks_wrapped_one_by_one_are_the_users_blocks(wrap):
    """Activation checkpointing (what FSDP's ``apply_activation_checkpointing`` installs) and torchtitan's per-block
    ``torch.compile`` wrap each block of the stack; before, ``@blocks`` then matched nothing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_vit()
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        model.blocks[i] = checkpoint_wrapper(block) if wrap == "checkpoint_wrapper" else torch.compile(block)
    taps = select_taps(model, "@blocks")
    assert names(taps) == ["blocks.0", "blocks.1"] and [t.module for t in taps] == blocks


def test_torchscript_modules_are_left_out_of_presets_and_refused_by_name():
    """Script modules refuse forward hooks: before, every monitor with its default modules crashed the fit in setup."""
    model = tiny_vit()
    model.blocks[1] = torch.jit.script(model.blocks[1])
    with pytest.warns(UserWarning, match=r"\['blocks.1'\] are TorchScript modules"):
        assert names(select_taps(model, "@activations")) == ["blocks.0.mlp.act"]
    with pytest.raises(ModuleSelectionError, match=r"\['blocks.1.mlp.fc1'\] are TorchScript modules"):
        select_taps(model, "blocks.*.mlp.fc1")


def test_default_monitors_on_scripted_blocks_warn_and_finish_the_fit():
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_act.callbacks import MassiveActivations

    class ScriptedBlocks(BoringModel):
        def __init__(self):
            super().__init__()
            block = nn.Sequential(nn.Linear(32, 32), nn.GELU())
            self.layer = nn.Sequential(torch.jit.script(block), torch.jit.script(nn.Sequential(nn.Linear(32, 2))))

    monitor = MassiveActivations(every_n_steps=1)
    trainer = pl.Trainer(max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.warns(UserWarning, match="TorchScript modules"):
        trainer.fit(ScriptedBlocks())
    assert monitor.taps == [] and trainer.global_step == 1
