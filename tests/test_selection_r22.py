"""Round 22: the presets on models that Hugging Face peft wraps (LoRA layers, prefix tuning's prompt encoder,
``modules_to_save``) and on quantization-aware training's fused layers.

peft is no dependency: the stand-ins below have the structure of peft's modules (the registered children the
selection reads); one test runs the real peft where it is installed."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.ao.quantization as quantization
from torch import nn

from lightning_act.capture import select_taps
from lightning_act.errors import ModuleSelectionError


def names(taps):
    return [t.name for t in taps]


def gelu64(u):
    """nn.GELU's exact form in numpy float64."""
    return 0.5 * u * (1 + np.vectorize(math.erf)(u / np.sqrt(2)))


def tapped_values(model, taps, *inputs):
    """The tensors each tap reads in one forward of ``model``, by tap name (own hooks, not the capture registry)."""
    seen, hooks = {}, []
    for tap in taps:
        if tap.point == "input":
            hook = tap.module.register_forward_pre_hook(lambda m, args, name=tap.name: seen.setdefault(name, args[0]))
        else:
            hook = tap.module.register_forward_hook(lambda m, args, out, name=tap.name: seen.setdefault(name, out))
        hooks.append(hook)
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return seen


class LoraLinear(nn.Module):
    """peft's ``tuners.lora.layer.Linear``: the frozen layer as ``base_layer``, the adapter's Linears in ModuleDicts,
    and what every peft tuner layer (``BaseTunerLayer``) has: ``adapter_layer_names`` and ``active_adapters``."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling = {"default": 1.0}
        self.lora_dropout = nn.ModuleDict({"default": nn.Identity()})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base_layer.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base_layer.out_features, bias=False)})
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()

    @property
    def active_adapters(self):
        return ["default"]

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](self.lora_dropout["default"](x)))


class ModulesToSaveWrapper(nn.Module):
    """peft's ``utils.other.ModulesToSaveWrapper``: runs a trained copy of ``original_module``, never the original."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})
        module.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.modules_to_save["default"](*args, **kwargs)


class PrefixEncoder(nn.Module):
    """peft's prefix-tuning encoder with ``prefix_projection=True``: an MLP run on the virtual-token ids."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(tokens, width)
        self.transform = nn.Sequential(nn.Linear(width, 24), nn.Tanh(), nn.Linear(24, width))

    def forward(self, prefix):
        return self.transform(self.embedding(prefix))


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class BlockNet(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


class PrefixTuned(nn.Module):
    """``PeftModel`` with prefix tuning: the base model, then its ``prompt_encoder`` registered after it, and the
    ``peft_config`` by adapter name."""

    def __init__(self) -> None:
        super().__init__()
        self.peft_config = {"default": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}}
        self.base_model = BlockNet(2)
        self.prompt_encoder = nn.ModuleDict({"default": PrefixEncoder(4, 8)})

    def forward(self, x):
        table = torch.arange(4).unsqueeze(0).expand(x.shape[0], -1)  # the same ids for every example
        prefix = self.prompt_encoder["default"](table)  # (B, 4, 8): peft feeds it to attention as past keys/values
        return self.base_model(torch.cat([prefix, x], dim=1))


def test_penultimate_of_a_peft_lora_head_is_the_heads_input_not_lora_bs_bottleneck():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), LoraLinear(nn.Linear(64, 32)), nn.GELU(), LoraLinear(nn.Linear(32, 4)))
    (tap,) = select_taps(net, "@penultimate")
    assert (tap.name, tap.point) == ("3-input", "input")  # was 3.lora_B.default-input, the rank-2 bottleneck
    x = torch.randn(6, 1, 8, 8)
    seen = tapped_values(net, [tap], x)
    first = net[1]  # the GELU of the first layer's output, W x + b + B A x, in float64
    p = {k: v.double().numpy() for k, v in first.state_dict().items()}
    w = p["base_layer.weight"] + p["lora_B.default.weight"] @ p["lora_A.default.weight"]
    pre = x.flatten(1).double().numpy() @ w.T + p["base_layer.bias"]
    np.testing.assert_allclose(seen["3-input"].double().numpy(), gelu64(pre), rtol=1e-5, atol=1e-6)


def test_presets_leave_out_a_prefix_encoder_run_on_the_virtual_token_table():
    torch.manual_seed(0)
    model = PrefixTuned()
    assert names(select_taps(model, "@activations")) == ["base_model.blocks.0.mlp.1", "base_model.blocks.1.mlp.1"]
    (tap,) = select_taps(model, "@penultimate")  # was prompt_encoder.default.transform.2-input
    assert tap.name == "base_model.lm_head-input"
    x = torch.randn(3, 5, 8)
    seen = tapped_values(model, [tap], x)
    rows = seen[tap.name]
    assert rows.shape == (3, 9, 8)  # the hidden states of the 4 prefix and 5 input tokens
    assert not torch.equal(rows[0, 4:], rows[1, 4:])  # they differ by example (the encoder's rows did not)


@pytest.mark.parametrize("depth", [2, 4])
def test_a_block_peft_trains_whole_stays_a_block_and_its_unrun_original_is_left_out(depth):
    torch.manual_seed(0)
    net = BlockNet(depth)
    net.blocks[depth - 1] = ModulesToSaveWrapper(net.blocks[depth - 1])  # modules_to_save=[f"blocks.{depth - 1}"]
    wrapper = net.blocks[depth - 1]
    with torch.no_grad():
        wrapper.modules_to_save["default"].mlp[2].bias.add_(1.0)  # the trained copy has moved from the original
    taps = select_taps(net, "@blocks")  # depth 2 was "matched no module", depth 4 dropped blocks.3
    assert names(taps) == [f"blocks.{i}" for i in range(depth)]
    acts = names(select_taps(net, "@activations"))
    trained_copy_act = f"blocks.{depth - 1}.modules_to_save.default.mlp.1"  # not the never-run original_module's
    assert acts == [f"blocks.{i}.mlp.1" for i in range(depth - 1)] + [trained_copy_act]
    x = torch.randn(4, 3, 8)
    seen = tapped_values(net, taps[-1:], x)
    h = x.double().numpy()  # the residual stream by hand, in float64, through the blocks the forward runs
    for block in [*net.blocks[: depth - 1], wrapper.modules_to_save["default"]]:
        p = {k: v.double().numpy() for k, v in block.state_dict().items()}
        z = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        z = z * p["norm.weight"] + p["norm.bias"]
        u = z @ p["mlp.0.weight"].T + p["mlp.0.bias"]
        h = h + gelu64(u) @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    np.testing.assert_allclose(seen[f"blocks.{depth - 1}"].double().numpy(), h, rtol=1e-5, atol=1e-5)


def test_lora_wrapped_linears_are_no_block_stack():
    net = nn.Sequential(LoraLinear(nn.Linear(8, 8)), LoraLinear(nn.Linear(8, 8)))
    with pytest.raises(ModuleSelectionError, match="matched no module"):  # were taken for two blocks
        select_taps(net, "@blocks")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu(self.bn(self.conv(x))))))
        return self.fc2(self.act(self.fc1(x.mean((2, 3)))))


def test_activations_of_qat_fused_layers_are_their_outputs():
    torch.manual_seed(0)
    fused = quantization.fuse_modules_qat(ConvNet().train(), [["conv", "bn", "relu"], ["conv2", "bn2", "relu2"]])
    fused.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    fused.act.qconfig = None
    prepared = quantization.prepare_qat(fused)
    taps = select_taps(prepared, "@activations")
    assert names(taps) == ["conv", "conv2", "act"]  # were ["act"]
    x = torch.randn(4, 1, 10, 10)
    received = {}
    hook = prepared.conv2.register_forward_pre_hook(lambda m, args: received.setdefault("x", args[0]))
    seen = tapped_values(prepared, taps, x)
    hook.remove()
    out = seen["conv"].double().numpy()
    # a ReLU's output: no negative entry and many zeros, and the tensor the next layer gets
    assert out.min() == 0.0 and 0.2 < (out == 0).mean() < 0.8
    np.testing.assert_array_equal(out, received["x"].double().numpy())
    # the float fused modules of eval-mode fusion keep their ReLU as a child, tapped once
    plain = quantization.fuse_modules(ConvNet().eval(), [["conv", "bn", "relu"]])
    assert names(select_taps(plain, "@activations")) == ["conv.1", "relu2", "act"]


def test_real_peft_lora_and_modules_to_save():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = BlockNet(2)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["lm_head"], modules_to_save=["blocks.1"]))
    assert names(select_taps(model, "@blocks")) == ["base_model.model.blocks.0", "base_model.model.blocks.1"]
    assert names(select_taps(model, "@penultimate")) == ["base_model.model.lm_head-input"]
    assert names(select_taps(model, "@activations")) == [
        "base_model.model.blocks.0.mlp.1", "base_model.model.blocks.1.modules_to_save.default.mlp.1"]


class BaseLayerNet(nn.Module):
    """A user's model (no peft) whose trunk is an attribute named ``base_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.base_layer(x))


class HeadBesideBaseLayer(nn.Module):
    """The head inside a module that also has a ``base_layer`` child."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.top = nn.Module()
        self.top.base_layer = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.top.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.top.fc(self.top.base_layer(self.stem(x)))


def relu_mlp64(x, layers):
    """ReLU(W x + b) through ``layers`` (nn.Linear), in numpy float64."""
    h = x.double().numpy()
    for layer in layers:
        h = np.maximum(h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy(), 0.0)
    return h


def test_a_users_child_named_base_layer_is_no_peft_wrapper_for_penultimate():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    net = BaseLayerNet()
    (tap,) = select_taps(net, "@penultimate")  # was "matched no module"
    assert tap.name == "head-input"
    seen = tapped_values(net, [tap], x)
    expected = relu_mlp64(x, [net.base_layer[0], net.base_layer[2]])
    np.testing.assert_allclose(seen["head-input"].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    nested = HeadBesideBaseLayer()
    (tap,) = select_taps(nested, "@penultimate")  # was stem.0-input, the first layer's input
    assert tap.name == "top.fc-input"
    seen = tapped_values(nested, [tap], x)
    expected = relu_mlp64(x, [nested.stem[0], nested.top.base_layer[0]])
    np.testing.assert_allclose(seen["top.fc-input"].double().numpy(), expected, rtol=1e-5, atol=1e-6)


class ResidualWithBase(nn.Module):
    """A user's residual block whose main branch is an attribute named ``base_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x):
        return x + self.act(self.base_layer(x))


def test_a_users_blocks_with_a_base_layer_child_are_a_block_stack():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(ResidualWithBase(), ResidualWithBase(), ResidualWithBase()))
    taps = select_taps(net, "@blocks")  # was "matched no module": the blocks were read as their base_layer Linears
    assert names(taps) == ["1.0", "1.1", "1.2"]
    x = torch.randn(2, 3)
    seen = tapped_values(net, taps, x)
    h = x.double().numpy() @ net[0].weight.detach().double().numpy().T + net[0].bias.detach().double().numpy()
    for i, block in enumerate(net[1]):
        w, b = block.base_layer.weight.detach().double().numpy(), block.base_layer.bias.detach().double().numpy()
        h = h + np.tanh(h @ w.T + b)
        np.testing.assert_allclose(seen[f"1.{i}"].double().numpy(), h, rtol=1e-5, atol=1e-6)


class MaskPromptEncoder(nn.Module):
    """Segment Anything's prompt encoder, in short: an embedding of each example's input mask."""

    def __init__(self) -> None:
        super().__init__()
        self.mask_embed = nn.Sequential(nn.Linear(4, 8), nn.GELU())

    def forward(self, mask):
        return self.mask_embed(mask)


class Segmenter(nn.Module):
    """Hugging Face ``SamModel``'s layout: an image encoder, a ``prompt_encoder`` run on the batch's prompts, a
    decoder; no peft (no ``peft_config``)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.prompt_encoder = MaskPromptEncoder()
        self.decoder = nn.Linear(8, 2)

    def forward(self, image, mask):
        return self.decoder(self.image_encoder(image) + self.prompt_encoder(mask))


def test_a_prompt_encoder_outside_peft_runs_on_the_batch_and_stays_in_the_presets():
    torch.manual_seed(0)
    model = Segmenter()
    taps = select_taps(model, "@activations")  # the prompt encoder's GELU was left out
    assert names(taps) == ["image_encoder.1", "prompt_encoder.mask_embed.1"]
    image, mask = torch.randn(3, 6), torch.randn(3, 4)
    seen = tapped_values(model, taps, image, mask)
    linear = model.prompt_encoder.mask_embed[0]
    u = mask.double().numpy() @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    out = seen["prompt_encoder.mask_embed.1"].double().numpy()
    np.testing.assert_allclose(out, gelu64(u), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0], out[1])  # it runs on each example's mask, not on a fixed table


def test_real_peft_is_told_by_structure_a_users_base_layer_by_none_and_prefix_tuning_by_its_config():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lora = peft.get_peft_model(BaseLayerNet(), peft.LoraConfig(r=2, target_modules=["head"]))
    (tap,) = select_taps(lora, "@penultimate")  # was "matched no module": the user's base_layer taken for peft's
    assert tap.name == "base_model.model.head-input"
    x = torch.randn(4, 8)
    trunk = lora.base_model.model.base_layer
    seen = tapped_values(lora, [tap], x)
    expected = relu_mlp64(x, [trunk[0], trunk[2]])
    np.testing.assert_allclose(seen[tap.name].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                     encoder_hidden_size=8)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), prefix)
    assert any(name.startswith("prompt_encoder.") for name, _ in model.named_modules())
    acts = names(select_taps(model, "@activations"))  # a PeftModel's prompt encoder runs on the virtual-token ids
    assert acts and not any(name.startswith("prompt_encoder") for name in acts)
    assert names(select_taps(model, "@penultimate")) == ["base_model.lm_head-input"]
