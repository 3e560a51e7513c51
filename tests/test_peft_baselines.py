"""LoRA and (IA)³ baselines: zero-init identity, trainable counts, forward vs numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_act.errors import ModuleSelectionError
from lightning_act.peft.lora import IA3Scale, LoRALinear, apply_ia3, apply_lora, count_trainable


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 6), nn.GELU(), nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 3))


def test_lora_identity_at_init_and_count() -> None:
    model = _mlp()
    x = torch.randn(7, 10)
    reference = model(x).detach().clone()
    apply_lora(model, ["torch.nn.Linear"], rank=2)
    assert torch.equal(model(x), reference)
    assert count_trainable(model) == 2 * ((10 + 6) + (6 + 4) + (4 + 3))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "ab"
    }


def test_lora_forward_matches_numpy() -> None:
    base = nn.Linear(5, 3).double()
    layer = LoRALinear(base, rank=2, alpha=6.0).double()
    with torch.no_grad():
        layer.lora_b.copy_(torch.arange(6, dtype=torch.float64).view(3, 2) / 10)
    x = np.random.default_rng(0).normal(size=(4, 5))
    w, b = base.weight.detach().numpy(), base.bias.detach().numpy()
    a, bb = layer.lora_a.detach().numpy(), layer.lora_b.detach().numpy()
    expected = x @ w.T + b + (6.0 / 2) * x @ a.T @ bb.T
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-12)


def test_ia3_identity_count_and_forward() -> None:
    model = _mlp()
    x = torch.randn(7, 10)
    reference = model(x).detach().clone()
    wrapped = apply_ia3(model, [nn.GELU])
    assert torch.equal(model(x), reference)
    assert count_trainable(model) == 6 + 4
    with torch.no_grad():
        wrapped["1"].scale.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0]))
    z = np.random.default_rng(1).normal(size=(3, 6))
    from scipy.special import erf

    gelu = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    out = wrapped["1"](torch.from_numpy(z)).detach().numpy()
    np.testing.assert_allclose(out, gelu * np.array([0.0, 1.0, 2.0, -1.0, 0.5, 3.0]), rtol=1e-6, atol=1e-7)


def test_ia3_on_linear_and_feature_dim() -> None:
    model = _mlp()
    apply_ia3(model, ["4"])
    assert count_trainable(model) == 3
    scale = IA3Scale(nn.Identity(), num_features=2, feature_dim=1)
    with torch.no_grad():
        scale.scale.copy_(torch.tensor([2.0, -1.0]))
    out = scale(torch.ones(1, 2, 3, 3))
    assert torch.all(out[:, 0] == 2.0) and torch.all(out[:, 1] == -1.0)


def test_gradients_only_reach_adapters() -> None:
    model = _mlp()
    apply_lora(model, [nn.Linear], rank=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.fill_(0.1)
    model(torch.randn(5, 10)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == ("lora_" in name), name


def test_errors() -> None:
    with pytest.raises(ModuleSelectionError, match="nn.Linear and Hugging Face Conv1D only"):
        apply_lora(_mlp(), [nn.GELU])
    with pytest.raises(ModuleSelectionError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(2, 2), rank=0)


@pytest.mark.parametrize(
    "adapt", [lambda m: apply_lora(m, ["torch.nn.Linear"]), lambda m: apply_ia3(m, ["torch.nn.GELU"])], ids=["lora", "ia3"]
)
def test_adapting_twice_is_refused_instead_of_nesting_and_freezing_the_first_adapters(adapt) -> None:
    model = _mlp()
    adapt(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ModuleSelectionError, match="already adapted"):
        adapt(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # before: frozen by the 2nd call


def test_lora_follows_the_base_dtype_and_device_and_refuses_multihead_attention_out_proj() -> None:
    model = _mlp().to(torch.bfloat16)
    x = torch.randn(7, 10, dtype=torch.bfloat16)
    reference = model(x)
    apply_lora(model, ["torch.nn.Linear"], rank=2)  # before: "expected m1 and m2 to have the same dtype"
    assert torch.equal(model(x), reference) and model[0].lora_a.dtype == torch.bfloat16
    with torch.device("meta"):
        on_meta = _mlp()
    ia3 = apply_ia3(on_meta, ["torch.nn.GELU"])
    lora = apply_lora(on_meta, ["torch.nn.Linear"])
    assert {p.device.type for m in [*ia3.values(), *lora.values()] for p in m.parameters()} == {"meta"}
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(ModuleSelectionError, match=r"cannot wrap \['self_attn.out_proj'\]: nn.MultiheadAttention"):
        apply_lora(layer, ["torch.nn.Linear"])
    apply_lora(layer, ["linear*"])  # the feed-forward Linears are fine
    layer(torch.randn(2, 3, 8)).sum().backward()


def _eval_without_fast_paths(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same eval-mode forward through the modules' own ``forward`` (PyTorch's fused inference kernels off)."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize(
    "adapt",
    [lambda m, x: apply_lora(m, ["linear1", "linear2"], rank=2), lambda m, x: apply_ia3(m, ["activation"], example_input=x)],
    ids=["lora", "ia3"],
)
def test_adapters_run_in_eval_inside_a_transformer_encoder_layer(adapt) -> None:
    # Before: the layer's fused eval kernel read linear1.weight (LoRA: AttributeError) and never called the adapters
    # ((IA)³: the un-adapted output).
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation=nn.GELU(), batch_first=True)
    x = torch.randn(3, 5, 8)
    layer.eval()
    with torch.no_grad():
        base = layer(x)
        for adapter in adapt(layer, x).values():
            for name, parameter in adapter.named_parameters():
                if name in ("lora_b", "scale"):
                    parameter.fill_(0.3)
        adapted = layer(x)
    torch.testing.assert_close(adapted, _eval_without_fast_paths(layer, x))
    assert (adapted - base).abs().max() > 0.1


def test_dopamine_gates_added_after_lora_leave_the_lora_matrices_trainable() -> None:
    # Before: adapt_model froze every parameter, the LoRA matrices of the first call included.
    from lightning_act.nn.dopamine import adapt_model

    model = _mlp()
    apply_lora(model, ["0"], rank=2)
    adapt_model(model, [nn.GELU], example_input=torch.randn(2, 10))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_a", "0.lora_b", *(f"{i}.{p}" for i in (1, 3) for p in ("tau", "gain", "leak"))
    }
    assert count_trainable(model) == 2 * (10 + 6) + 3 * (6 + 4)


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2's layers): ``x @ W + b`` with ``W`` stored ``(in, out)``; like older
    transformers versions, it keeps ``nf`` and no ``nx``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_lora_wraps_a_hugging_face_conv1d_as_gpt2_stores_it() -> None:
    # Before: refused ("LoRA wraps nn.Linear only"): GPT-2's attention and MLP could not be adapted at all.
    model = nn.Sequential(Conv1D(nf=6, nx=4), nn.GELU(), Conv1D(nf=3, nx=6)).double()
    wrapped = apply_lora(model, ["0", "2"], rank=2, alpha=4.0)
    assert [(w.lora_a.shape, w.lora_b.shape) for w in wrapped.values()] == [((2, 4), (6, 2)), ((2, 6), (3, 2))]
    for layer in wrapped.values():
        with torch.no_grad():
            layer.lora_b.normal_()
    x = np.random.default_rng(0).normal(size=(5, 4))
    h = x
    for layer in (wrapped["0"], wrapped["2"]):
        w, b = layer.base.weight.detach().numpy(), layer.base.bias.detach().numpy()
        a, bb = layer.lora_a.detach().numpy(), layer.lora_b.detach().numpy()
        h = h @ w + b + (4.0 / 2) * h @ a.T @ bb.T
        if layer is wrapped["0"]:
            h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), h, rtol=1e-10)
    assert count_trainable(model) == 2 * (4 + 6) + 2 * (6 + 3)


def test_ia3_scales_a_hugging_face_conv1d_by_its_output_width() -> None:
    # Before: a Conv1D was taken for an activation and given its input width (8 for a 24-wide output): it crashed.
    model = nn.Sequential(Conv1D(nf=24, nx=8), nn.GELU())
    wrapped = apply_ia3(model, ["0"])
    assert wrapped["0"].num_features == 24
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), nn.functional.gelu(x @ wrapped["0"].module.weight + wrapped["0"].module.bias))


def test_ia3_scales_the_output_width_of_a_conv_or_an_embedding() -> None:
    # Before: the width was read at the module's input: Conv2d(3 -> 16) got 3 (a broadcasting error at the first
    # forward), a grayscale Conv2d(1 -> 16) got 1 (one scale for all 16 channels, silently), Embedding(50, 12) on
    # (2, 7) ids got the sequence length 7.
    torch.manual_seed(0)
    for in_channels in (3, 1):
        conv = nn.Sequential(nn.Conv2d(in_channels, 16, 3), nn.ReLU()).double()
        x = torch.randn(2, in_channels, 6, 6, dtype=torch.float64)
        base = conv[0](x).detach().numpy()
        wrapped = apply_ia3(conv, ["0"], example_input=x)  # a convolution: its channels (dim 1) by default
        assert count_trainable(conv) == 16  # one scale per output channel
        scale = np.linspace(-1.0, 2.0, 16)
        with torch.no_grad():
            wrapped["0"].scale.copy_(torch.from_numpy(scale))
        np.testing.assert_allclose(conv(x).detach().numpy(), np.maximum(base * scale[None, :, None, None], 0.0))

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 12)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    model = Embedder().double()
    ids = torch.randint(0, 50, (2, 7))
    wrapped = apply_ia3(model, ["emb"], example_input=ids)
    assert count_trainable(model) == 12
    scale = np.arange(12.0)
    with torch.no_grad():
        wrapped["emb"].scale.copy_(torch.from_numpy(scale))
    table = wrapped["emb"].module.weight.detach().numpy()
    np.testing.assert_allclose(model(ids).detach().numpy(), table[ids.numpy()] * scale)


def test_ia3_scale_refuses_an_output_of_another_width_in_one_line() -> None:
    # Before: a bare broadcasting error, or (a width of 1) one scale silently shared by every feature.
    with pytest.raises(ModuleSelectionError, match=r"IA3Scale expects 4 features on dim -1 .* got shape \(2, 6\);"):
        IA3Scale(nn.Linear(3, 6), num_features=4)(torch.randn(2, 3))
    with pytest.raises(ModuleSelectionError, match=r"expects 1 features on dim 1 .* got shape \(2, 16, 3, 3\)"):
        IA3Scale(nn.Identity(), num_features=1, feature_dim=1)(torch.randn(2, 16, 3, 3))


def test_ia3_refuses_multihead_attention_out_proj_like_lora() -> None:
    # Before: accepted, then every forward failed inside F.multi_head_attention_forward ('IA3Scale' has no 'weight').
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    refusal = r"^\(IA\)³ cannot wrap \['self_attn.out_proj'\]: nn.MultiheadAttention reads its out_proj weight"
    with pytest.raises(ModuleSelectionError, match=refusal):
        apply_ia3(layer, ["self_attn.out_proj"])
    assert all(p.requires_grad for p in layer.parameters())  # refused before freezing anything


def test_the_baselines_are_exported_by_the_peft_package() -> None:
    # Before: `from lightning_act.peft import apply_lora` (as docs/dopamine.md presents them) was an ImportError.
    import lightning_act.peft
    import lightning_act.peft.lora

    for name in ("IA3Scale", "LoRALinear", "apply_ia3", "apply_lora", "count_trainable"):
        assert getattr(lightning_act.peft, name) is getattr(lightning_act.peft.lora, name)
