"""Round 30: the presets beside TorchScript blocks and quantization-aware training's fused modules, ``@penultimate``
of a model whose head is a parameter (a tied or CLIP-style projection), and a DQN target network in no optimizer."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

from _toy import ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import DimensionalCollapse
from lightning_act.capture import select_taps
from lightning_act.capture.selection import frozen_copies, module_at, module_reads, named_modules, reads_unchanged
from lightning_act.errors import ModuleSelectionError


def names(taps):
    return [t.name for t in taps]


class Block(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def with_scripted_middle(how: str) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        blocks[1] = torch.jit.script(blocks[1]) if how == "script" else torch.jit.trace(blocks[1], torch.randn(2, 16))
    return blocks


class ScriptedStack(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("how", ["script", "trace"])
def test_module_at_walks_into_a_scripted_block_and_dimensional_collapse_fits(how):
    """A ScriptModule's ``_modules`` has no ``.get``: DimensionalCollapse crashed at fit start on a model holding a
    scripted or traced block. Now the walk finds the scripted block's Linear (the very object), and the fit runs and
    logs r90."""
    stack = ScriptedStack(with_scripted_middle(how))
    found, reads = module_reads(stack, "blocks.1.fc")
    assert found is stack.blocks[1].fc and module_at(stack, "blocks.1.fc") is stack.blocks[1].fc
    assert reads_unchanged(reads)
    assert module_at(stack, "blocks.1.nothing") is None

    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), ScriptedStack(with_scripted_middle(how)), nn.Linear(16, 4))
    task, monitor = ToyTask(net), DimensionalCollapse(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(max_steps=2, callbacks=[monitor])
        trainer.fit(task, toy_loader(16, batch_size=8))
    assert "collapse/params/r90" in trainer.callback_metrics


def test_one_scripted_block_leaves_the_others_of_its_stack_in_blocks():
    """The warning says the presets leave the scripted block out; ``@blocks`` was empty instead (its class differed
    from the others'). It is the other two blocks, as for the same stack with the scripted one left out by name."""
    stack = ScriptedStack(with_scripted_middle("script"))
    with pytest.warns(UserWarning, match=r"\['blocks.1'\] are TorchScript modules"):
        taps = select_taps(stack, "@blocks", owner="MassiveActivations")
    assert names(taps) == ["blocks.0", "blocks.2"]
    assert [t.module for t in taps] == [stack.blocks[0], stack.blocks[2]]


class QatNet(nn.Module):
    """A Linear+ReLU fused for QAT, a Conv+ReLU fused, and (``with_blocks``) a real stack of three blocks."""

    def __init__(self, with_blocks: bool):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.conv_relu = nn.Conv2d(1, 4, 3), nn.ReLU()
        self.l1, self.r1 = nn.Linear(4 * 6 * 6, 16), nn.ReLU()
        self.blocks = nn.ModuleList([Block() for _ in range(3)]) if with_blocks else nn.ModuleList()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv_relu(self.conv(self.quant(x))).flatten(1)
        x = self.r1(self.l1(x))
        for block in self.blocks:
            x = block(x)
        return self.dequant(self.head(x))


def prepared_qat(with_blocks: bool) -> QatNet:
    torch.manual_seed(0)
    net = QatNet(with_blocks).train()
    net.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.fuse_modules_qat(net, [["conv", "conv_relu"], ["l1", "r1"]], inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce_range's deprecation
        tq.prepare_qat(net, inplace=True)
    net(torch.randn(2, 1, 8, 8))
    return net


def test_blocks_of_a_qat_model_are_those_of_the_float_model_and_never_a_fake_quant():
    """A QAT ``LinearReLU`` (an nn.Sequential subclass) held two fake-quants that ``@blocks`` took for a stack: the
    weight fake-quant's output, the fake-quantized weight, was measured as an activation. The blocks are now those of
    the float model, and no preset taps an observer or a fake-quant."""
    float_blocks = names(select_taps(QatNet(with_blocks=True), "@blocks"))
    net = prepared_qat(with_blocks=True)
    assert float_blocks == ["blocks.0", "blocks.1", "blocks.2"]
    assert names(select_taps(net, "@blocks")) == float_blocks
    with pytest.raises(ModuleSelectionError, match="matched no module"):
        select_taps(prepared_qat(with_blocks=False), "@blocks")
    observers = (tq.FakeQuantizeBase, tq.ObserverBase)
    for spec in ("@activations", "@penultimate"):
        assert not [t.name for t in select_taps(net, spec) if isinstance(t.module, observers)]
    assert names(select_taps(net, "@penultimate")) == ["head-input"]


class TiedLM(nn.Module):
    """A decoder whose logits are ``h @ embed.weight.T`` (a tied head, no nn.Linear), with a final norm."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([MlpBlock(d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return F.linear(self.norm(h), self.embed.weight)


class MlpBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class ClipText(nn.Module):
    """open_clip's text tower: ``transformer.resblocks``, then ``ln_final`` and ``x @ text_projection``."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([MlpBlock(d) for _ in range(2)])
        self.token_embedding = nn.Embedding(32, d)
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.randn(d, 8))


@pytest.mark.parametrize("model, block, norm", [
    (TiedLM(), "layers.1", "norm"), (ClipText(), "transformer.resblocks.1", "ln_final"),
])
def test_penultimate_refuses_a_linear_inside_a_block_and_names_the_norm_after_the_blocks(model, block, norm):
    """With the head a parameter (tied, or a CLIP projection) the last nn.Linear was the last block's MLP
    down-projection, tapped as the penultimate features with no word. It taps nothing now: alone, one error line
    naming the block and the fix; beside other specs, one warning, and the others are tapped."""
    with pytest.raises(ModuleSelectionError, match=rf"finds no head.*{block}.*modules=\['{norm}'\]"):
        select_taps(model, "@penultimate", owner="DimensionalCollapse")
    with pytest.warns(UserWarning, match=rf"{block}.mlp.2, is the last projection of the repeated block {block},") as said:
        taps = select_taps(model, ["@blocks", "@penultimate"], owner="DimensionalCollapse")
    assert names(taps) == [block.replace(".1", ".0"), block]
    assert len([w for w in said if "finds no head" in str(w.message)]) == 1


def test_penultimate_keeps_a_linear_head_after_the_blocks():
    """The same decoder with an nn.Linear head outside its blocks keeps that head (the documented rule)."""
    model = TiedLM()
    model.lm_head = nn.Linear(16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(select_taps(model, "@penultimate")) == ["lm_head-input"]


def test_default_collapse_on_a_tied_lm_logs_no_block_mlp_as_the_penultimate_features():
    """DimensionalCollapse's defaults on the tied decoder: the blocks' erank (numpy float64 on the captured outputs)
    and no key of a Linear inside a block; the one line says why."""

    class Task(ToyTask):
        def training_step(self, batch, batch_idx):
            ids = batch[0]
            return F.cross_entropy(self(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    torch.manual_seed(0)
    task, monitor = Task(TiedLM()), DimensionalCollapse(every_n_steps=1, param_patterns=[], projection_dim=None)
    seen = []
    task.net.layers[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy()))
    ids = torch.randint(0, 32, (8, 6), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_steps=1, callbacks=[monitor])
        trainer.fit(task, loader)
    assert len([w for w in said if "finds no head" in str(w.message)]) == 1
    keys = {k.rsplit("/", 1)[0] for k in trainer.callback_metrics if k.startswith("collapse/")}
    assert keys == {"collapse/net.layers.0", "collapse/net.layers.1"}
    rows = seen[0].reshape(-1, 16)
    s = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    assert float(trainer.callback_metrics["collapse/net.layers.1/erank"]) == pytest.approx(
        float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)


class DQN(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        if how == "deepcopy":
            self.target = copy.deepcopy(self.net)
        else:  # Lightning's reinforce_learn_Qnet.py: a second instance loaded from the net
            self.target = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
            self.target.load_state_dict(self.net.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "second instance"])
def test_a_dqn_target_in_no_optimizer_is_a_copy_where_the_optimizers_are_known(how):
    """The target keeps ``requires_grad=True`` and is in no optimizer: with the optimizers' parameters given (as at
    fit start), it is a frozen copy and ``@penultimate`` is the Q-network's head; without them (at setup) nothing
    tells the two apart. Where the optimizers hold none of the model's parameters (FSDP's flat ones), the choice is
    that of ``requires_grad``."""
    model = DQN(how)
    optimized = {id(p) for p in model.net.parameters()}
    modules = named_modules(model)
    assert frozen_copies(modules, optimized) == {id(m) for m in model.target.modules()}
    assert names(select_taps(model, "@penultimate", optimized=optimized)) == ["net.4-input"]
    assert frozen_copies(modules, {id(torch.zeros(1))}) == frozen_copies(modules) == set()
    model.target.requires_grad_(False)
    assert frozen_copies(modules, {id(torch.zeros(1))}) == {id(m) for m in model.target.modules()}
