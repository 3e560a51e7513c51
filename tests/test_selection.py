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


class ScaledBlock(nn.Module):
    """A residual block with a parameter of its own (a layer scale), which a parametrization may keep positive."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from lightning_act.nn import PMish

        self.fc = nn.Linear(width, width)
        self.act = PMish()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.act(self.fc(x))


def test_parametrized_modules_keep_their_class_for_class_names_presets_and_stacks():
    """``torch.nn.utils.parametrize`` swaps a module's class for ``Parametrized<Class>``: before, ``"Linear"`` left a
    weight-normalised Linear out, ``@activations`` a PMish with a parametrized ``beta`` and ``@blocks`` the stack
    whose middle block had a parametrized scale, each silently; the ``nn.Softplus`` keeping ``beta`` positive is a
    function of a parameter, no activation layer."""
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Sequential()
    model.stem = nn.Linear(4, 8)
    model.blocks = nn.ModuleList([ScaledBlock(8) for _ in range(3)])
    model.head = nn.Linear(8, 2)
    parametrizations.weight_norm(model.blocks[0].fc)
    parametrize.register_parametrization(model.blocks[1].act, "beta", nn.Softplus())
    parametrize.register_parametrization(model.blocks[1], "scale", nn.Softplus())
    linears = ["stem", "blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]
    assert names(select_taps(model, "Linear")) == names(select_taps(model, "torch.nn.Linear")) == linears
    assert names(select_taps(model, "PMish")) == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    assert names(select_taps(model, "@activations")) == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    assert names(select_taps(model, "@blocks")) == ["blocks.0", "blocks.1", "blocks.2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 3)


def test_presets_leave_out_an_averaged_copy_and_penultimate_a_frozen_copy():
    """The EMA / mean-teacher pattern: a model holding an averaged or frozen copy of its network, registered after
    it. Before, ``@penultimate`` was the copy's head (the last nn.Linear), which never runs in a training step, so
    SensitiveNeurons logged nothing; ``@blocks`` and ``@activations`` tapped the averaged copy's layers too."""
    import copy

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    live = ["net.blocks.0", "net.blocks.1"]
    for kind in ["AveragedModel", "frozen deepcopy"]:
        model = nn.Module()
        model.net = Net()
        if kind == "AveragedModel":  # its copy keeps requires_grad=True
            model.ema = AveragedModel(model.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
            assert names(select_taps(model, "@blocks")) == live
            assert names(select_taps(model, "@activations")) == ["net.blocks.0.1", "net.blocks.1.1"]
        else:
            model.ema = copy.deepcopy(model.net).requires_grad_(False)
        (tap,) = select_taps(model, "@penultimate")
        assert tap.name == "net.head-input" and tap.module is model.net.head, kind
    model.net.requires_grad_(False)  # both frozen (a frozen feature extractor): no copy of a trained one
    assert names(select_taps(model, "@penultimate")) == ["ema.head-input"]


def test_one_module_object_at_several_places_is_said_and_reachable_by_each_name():
    # Before: one ReLU instance passed to three blocks was tapped as blocks.0.act alone with the three blocks' calls
    # merged, silently; modules=["blocks.2.act"] matched no module.
    class Block(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), act

        def forward(self, x):
            return self.act(self.fc(x))

    shared = nn.ReLU()
    model = nn.Module()
    model.blocks = nn.Sequential(Block(shared), Block(shared), Block(shared))
    with pytest.warns(UserWarning, match="blocks.0.act is one module object registered also as blocks.1.act, "
                      r"blocks.2.act; its calls from every place are measured together under blocks.0.act"):
        assert [t.name for t in select_taps(model, "@activations")] == ["blocks.0.act"]
    with pytest.warns(UserWarning, match="blocks.2.act is one module object registered also as blocks.0.act, "
                      "blocks.1.act"):
        taps = select_taps(model, ["blocks.2.act"])
    assert [(t.name, t.module) for t in taps] == [("blocks.2.act", shared)]
    model.blocks[1].act = nn.ReLU()  # its own instance: no longer an alias
    with pytest.warns(UserWarning, match="blocks.0.act is one module object registered also as blocks.2.act;"):
        select_taps(model, "@activations")


def test_bloom_and_gpt_neox_mlps_have_their_activations_found():
    # Before: '@activations' found nothing in BLOOM (its BloomGelu is a plain module) nor in an MLP whose
    # activation is functional between dense_h_to_4h and dense_4h_to_h (GPT-NeoX, Falcon).
    class BloomGelu(nn.Module):
        def forward(self, x):
            return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    class BloomMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_h_to_4h, self.gelu_impl, self.dense_4h_to_h = nn.Linear(4, 16), BloomGelu(), nn.Linear(16, 4)

    class FunctionalMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(4, 16), nn.Linear(16, 4)

    model = nn.Module()
    model.bloom, model.neox = BloomMlp(), FunctionalMlp()
    assert [t.name for t in select_taps(model, "@activations")] == ["bloom.gelu_impl", "neox.dense_4h_to_h-input"]
