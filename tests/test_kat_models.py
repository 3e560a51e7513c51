"""KAT timm models: registration, sizes, block layout, variance-preserving init, official checkpoint keys."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from lightning_act.errors import LightningActError
from lightning_act.models.kat import GRKANMlp, checkpoint_filter_fn, official_state_dict
from lightning_act.nn.group_rational import GroupRational

# Parameter counts of the paper (Yang & Wang 2024, Table 3), ImageNet-1k heads.
PAPER_PARAMS = {"kat_tiny_patch16_224": 5.7e6, "kat_small_patch16_224": 22.1e6, "kat_base_patch16_224": 86.6e6}
PAPER_WIDTHS = {"kat_tiny_patch16_224": (192, 3), "kat_small_patch16_224": (384, 6), "kat_base_patch16_224": (768, 12)}


def test_import_lightning_act_registers_its_models_with_timm_in_either_import_order() -> None:
    # the documented STAN and Spectral-NN names too (before round 15 only the KAT module was imported)
    names = [*PAPER_PARAMS, "kat_tiny_patch4_32", "kat_micro_patch4_32", "stan_tiny", "stan_base", "spectral_nn"]
    orders = ["timm, lightning_act", "lightning_act, timm"]
    processes = {  # one fresh interpreter per order, run side by side (each spends seconds importing torch)
        order: subprocess.Popen([sys.executable, "-c", f"import {order}; print([timm.is_model(n) for n in {names!r}])"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for order in orders
    }
    for order, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert stdout.strip() == str([True] * len(names)), (order, stderr[-500:])


def test_models_register_after_availability_checks_that_find_timm_without_importing_it() -> None:
    """``importlib.util.find_spec("timm")`` before ``import timm`` (``import transformers`` does it, as do
    lightning_utilities' availability checks). Before: the one-shot hook was spent on that spec, nothing registered,
    and ``timm.create_model("kat_micro_patch4_32")`` said "Unknown model"."""
    code = (
        "import sys, importlib.util, lightning_act; importlib.util.find_spec('timm'); importlib.util.find_spec('timm'); "
        "import timm; hooks = [f for f in sys.meta_path if type(f).__name__ == '_RegisterAfterTimm']; "
        "print([timm.is_model(n) for n in ('kat_micro_patch4_32', 'stan_tiny', 'spectral_nn')], len(hooks))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[True, True, True] 0", result.stderr[-500:]


def test_import_lightning_act_alone_does_not_import_timm() -> None:
    code = "import sys, lightning_act; print('timm' in sys.modules, 'torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False False", result.stderr[-500:]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_and_layout_match_the_paper(name: str) -> None:
    with torch.device("meta"):  # sizes only: no memory, no init cost
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, count
    dim, heads = PAPER_WIDTHS[name]
    assert len(model.blocks) == 12 and model.patch_embed.proj.kernel_size == (16, 16)
    for block in model.blocks:
        assert block.attn.num_heads == heads
        mlp = block.mlp
        assert isinstance(mlp, GRKANMlp)
        assert isinstance(mlp.act1, GroupRational) and mlp.act1.init == "identity" and mlp.act1.num_channels == dim
        assert (mlp.fc1.in_features, mlp.fc1.out_features) == (dim, 4 * dim)
        assert isinstance(mlp.act2, GroupRational) and mlp.act2.init == "swish" and mlp.act2.num_channels == 4 * dim
        assert (mlp.fc2.in_features, mlp.fc2.out_features) == (4 * dim, dim)
        assert mlp.act1.groups == mlp.act2.groups == 8


def test_pretrained_true_refuses_to_download() -> None:
    with pytest.raises(LightningActError, match="checkpoint_path"):
        timm.create_model("kat_tiny_patch16_224", pretrained=True)


def _gaussian_second_moment(rational: GroupRational) -> float:
    """E[F(x)^2], x ~ N(0, 1), by 80-point Gauss-Hermite quadrature of the module's own output (float64)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # weight exp(-x^2 / 2)
    x = torch.tensor(nodes, dtype=torch.float64)[:, None].expand(-1, rational.num_channels)
    probe = GroupRational(rational.num_channels, rational.groups, rational.init, implementation="reference")
    probe.load_state_dict(rational.state_dict())
    with torch.no_grad():
        values = probe.double()(x.contiguous())[:, 0].numpy()
    return float(np.sum(weights * values**2) / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("act_init", ["swish", "gelu"])
def test_variance_preserving_init_survives_timm_init(act_init: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny_patch4_32", depth=2, act_init=act_init)
    model.init_weights()  # timm's re-init (trunc_normal 0.02 on every Linear) must not undo it
    dim = model.embed_dim
    for block in model.blocks:
        mlp = block.mlp
        second_moment = _gaussian_second_moment(mlp.act2)
        assert 0.3 < second_moment < 0.5  # Swish: 0.356, GELU: 0.425 for x ~ N(0, 1)
        assert mlp.fc1.weight.std().item() == pytest.approx(math.sqrt(1.0 / dim), rel=0.03)
        assert mlp.fc2.weight.std().item() == pytest.approx(math.sqrt(1.0 / (4 * dim * second_moment)), rel=0.03)
        assert mlp.fc1.weight.mean().abs() < 0.01 and torch.all(mlp.fc1.bias == 0) and torch.all(mlp.fc2.bias == 0)
        # the rest of the ViT keeps timm's init
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        # unit-variance input keeps (close to) unit variance through the whole GR-KAN layer
        x = torch.randn(4096, dim)
        with torch.no_grad():
            y = mlp(x)
        assert y.var().item() == pytest.approx(1.0, rel=0.15)


def test_variance_preserving_init_with_timms_mlp_norm_before_fc2() -> None:
    """timm's ``scale_mlp_norm=True`` puts a LayerNorm (unit second moment) before fc2, so fc2 draws N(0, 1/(4D)).
    Before: fc2 still divided by the rational's E[F²] = 0.356 and the layer's output variance was ~2.8."""
    torch.manual_seed(0)
    model = timm.create_model("kat_micro_patch4_32", depth=1, embed_dim=256, num_heads=4, scale_mlp_norm=True)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.norm, torch.nn.LayerNorm)
    hidden = mlp.fc2.in_features
    assert mlp.fc2.weight.std().item() == pytest.approx(math.sqrt(1.0 / hidden), rel=0.03)
    x = torch.randn(4096, 256)
    with torch.no_grad():
        normed = mlp.norm(mlp.act2(mlp.fc1(mlp.act1(x)))).double()
        y = mlp(x).double()
    # Var(Σ w_i z_i) = d_in · Var(w) · E[z²], with E[z²] of the norm's output measured here in float64
    expected = hidden * mlp.fc2.weight.double().var().item() * normed.pow(2).mean().item()
    assert expected == pytest.approx(1.0, rel=0.05)
    assert y.var().item() == pytest.approx(1.0, rel=0.15)


def test_timms_fx_feature_extraction_of_a_kat_equals_hooks_on_the_same_blocks() -> None:
    """timm's ``create_feature_extractor`` and ``features_only=True, feature_cls="fx"`` trace with torch.fx, with
    each GroupRational kept one node (timm's notrace registration). Before: the rational's shape checks failed the
    trace ("TraceError: symbolically traced variables cannot be used as inputs to control flow")."""
    from timm.models import create_feature_extractor

    torch.manual_seed(0)
    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2, "rational_groups": 4}
    model = timm.create_model("kat_micro_patch4_32", **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    hooked: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: hooked.update({name: out}))
        for name in ("blocks.0.mlp.act2", "blocks.1")
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    extractor = create_feature_extractor(model, return_nodes={"blocks.0.mlp.act2": "act2", "blocks.1": "block1"})
    with torch.no_grad():
        got = extractor(x)
    assert torch.equal(got["act2"], hooked["blocks.0.mlp.act2"]) and torch.equal(got["block1"], hooked["blocks.1"])
    features = timm.create_model(
        "kat_micro_patch4_32", features_only=True, feature_cls="fx", out_indices=(1,), **kwargs
    )
    assert features.graph_module.load_state_dict(model.state_dict(), strict=False).missing_keys == []
    with torch.no_grad():
        assert torch.equal(features.eval()(x)[0], hooked["blocks.1"])


def test_small_image_variant_trains_on_32x32() -> None:
    torch.manual_seed(0)
    model = timm.create_model("kat_micro_patch4_32", in_chans=1, num_classes=10)
    assert model.patch_embed.grid_size == (8, 8)
    logits = model(torch.randn(3, 1, 32, 32))
    assert logits.shape == (3, 10)
    logits.logsumexp(-1).mean().backward()
    rational = model.blocks[0].mlp.act2
    assert rational.weight_numerator.grad is not None and rational.weight_numerator.grad.abs().sum() > 0
    assert rational.weight_denominator.grad is not None


def _official_state_dict(depth: int, dim: int, groups: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict with the key names and shapes of Adamdad/kat (KAT_Group + timm ViT), 32px, patch 16."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 5, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (1000, dim),
        "head.bias": (1000,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.act1.weight_numerator": (1, 6), b + "mlp.act1.weight_denominator": (groups, 4),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.act2.weight_numerator": (1, 6), b + "mlp.act2.weight_denominator": (groups, 4),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
        })
    return {key: 0.3 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def _official_rational_numpy(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """KAT_Group as the public CUDA kernel defines it: shared P, per-group |b|·|x|^k denominator, contiguous groups."""
    channels, groups = x.shape[-1], denominator.shape[0]
    group_of_channel = np.arange(channels) // (channels // groups)
    p = sum(numerator[0, k] * x**k for k in range(6))
    b = np.abs(denominator[group_of_channel])  # (channels, 4)
    q = 1.0 + sum(b[:, k] * np.abs(x) ** (k + 1) for k in range(4))
    return p / q


@pytest.mark.parametrize("wrap", ["plain", "model", "ddp_state_dict"])
def test_official_checkpoint_keys_load_strictly_into_the_right_tensors(wrap: str) -> None:
    generator = torch.Generator().manual_seed(1)
    official = _official_state_dict(depth=2, dim=192, groups=8, generator=generator)
    if wrap == "model":
        checkpoint = {"model": official}
    elif wrap == "ddp_state_dict":
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in official.items()}}
    else:
        checkpoint = dict(official)
    model = timm.create_model("kat_tiny_patch16_224", img_size=32, depth=2, num_classes=1000)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    ours = model.state_dict()
    for key, value in official.items():
        if "weight_numerator" in key:
            assert ours[key].shape == (8, 6) and torch.equal(ours[key], value.expand(8, 6))
        else:
            assert torch.equal(ours[key], value), key
    # the loaded rational computes the official function
    x = 3.0 * torch.randn(5, 768, generator=generator, dtype=torch.float64)
    act2 = model.blocks[1].mlp.act2
    with torch.no_grad():
        y = act2(x.float()).double().numpy()
    expected = _official_rational_numpy(
        x.numpy(), official["blocks.1.mlp.act2.weight_numerator"].double().numpy(),
        official["blocks.1.mlp.act2.weight_denominator"].double().numpy(),
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_official_layout_loads_into_shared_numerator_model_and_rejects_wrong_groups() -> None:
    generator = torch.Generator().manual_seed(2)
    official = _official_state_dict(depth=1, dim=192, groups=8, generator=generator)
    model = timm.create_model(
        "kat_tiny_patch16_224", img_size=32, depth=1, num_classes=1000, rational_sharing="shared_numerator"
    )
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    assert torch.equal(model.blocks[0].mlp.act1.weight_numerator, official["blocks.0.mlp.act1.weight_numerator"])
    four_groups = timm.create_model("kat_tiny_patch16_224", img_size=32, depth=1, num_classes=1000, rational_groups=4)
    with pytest.raises(LightningActError, match="rational_groups"):
        checkpoint_filter_fn(official, four_groups)


def test_rational_coefficients_are_excluded_from_weight_decay() -> None:
    model = timm.create_model("kat_micro_patch4_32", depth=1)
    names = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.mlp.act1.weight_numerator", "blocks.0.mlp.act2.weight_denominator"} <= names
    decaying = timm.create_model("kat_micro_patch4_32", depth=1, rational_weight_decay=True).no_weight_decay()
    assert "blocks.0.mlp.act1.weight_numerator" not in decaying


@pytest.mark.parametrize("loader", ["checkpoint_path", "pretrained_file"])
def test_official_checkpoint_loads_through_timm_loaders_with_identical_logits(loader: str, tmp_path) -> None:
    torch.manual_seed(3)
    kwargs = {"img_size": 32, "depth": 2, "num_classes": 7}
    official_model = timm.create_model("kat_tiny_patch16_224", rational_sharing="shared_numerator", **kwargs).eval()
    with torch.no_grad():  # coefficients away from the init, different per group where the layout allows it
        for module in official_model.modules():
            if isinstance(module, GroupRational):
                module.weight_numerator.normal_(0.0, 0.3)
                module.weight_denominator.normal_(0.0, 1.0)
    state = official_state_dict(official_model)
    assert state["blocks.1.mlp.act2.weight_numerator"].shape == (1, 6)
    assert state["blocks.1.mlp.act2.weight_denominator"].shape == (8, 4)
    path = tmp_path / "kat_official.pth"
    torch.save(state if loader == "checkpoint_path" else {"model": state}, path)
    if loader == "checkpoint_path":
        loaded = timm.create_model("kat_tiny_patch16_224", checkpoint_path=str(path), **kwargs)
    else:
        loaded = timm.create_model(
            "kat_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(path), "num_classes": 7}, **kwargs
        )
    assert loaded.blocks[0].mlp.act1.weight_numerator.shape == (8, 6)  # the default per-group layout
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), official_model(images))


def test_official_state_dict_refuses_per_group_numerators() -> None:
    model = timm.create_model("kat_micro_patch4_32", depth=1)
    with torch.no_grad():
        model.blocks[0].mlp.act2.weight_numerator[1, 0] += 1.0
    with pytest.raises(LightningActError, match="shared_numerator"):
        official_state_dict(model)


def test_a_kat_built_on_the_meta_device_gets_its_rationals_from_init_weights() -> None:
    """FSDP / Fabric empty init: ``device="meta"``, ``to_empty()``, then ``init_weights()``. Before: the rational
    coefficients kept whatever memory to_empty() gave them."""
    model = timm.create_model("kat_micro_patch4_32", img_size=16, depth=1, device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    model.init_weights()
    built = timm.create_model("kat_micro_patch4_32", img_size=16, depth=1).blocks[0].mlp
    for name in ("act1", "act2"):
        for sets in ("weight_numerator", "weight_denominator"):
            assert torch.equal(getattr(getattr(model.blocks[0].mlp, name), sets), getattr(getattr(built, name), sets))
    x = torch.linspace(-3, 3, 7)
    np.testing.assert_allclose(model.blocks[0].mlp.act1(x[:, None].expand(7, 96)).detach()[:, 0], x, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("rational_impl", ["reference", "triton"])
def test_a_kat_runs_a_forward_on_the_meta_device(rational_impl: str) -> None:
    """Lightning's ``measure_flops`` forwards a model built under ``torch.device("meta")``. Before: the rationals'
    ``torch.autocast("meta", enabled=False)`` raised "unsupported scalarType"."""
    with torch.device("meta"):
        model = timm.create_model("kat_micro_patch4_32", depth=1, num_classes=7, rational_impl=rational_impl)
        x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.device.type == "meta" and out.shape == (2, 7)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 65, 96)  # 8 x 8 patches + the class token, through both rationals


def test_pretrained_true_loads_an_in_memory_state_dict_and_still_never_downloads() -> None:
    """timm's ``pretrained_cfg`` ``state_dict`` is local (timm's ViT takes it); before, only ``file`` was accepted."""
    torch.manual_seed(4)
    kwargs = {"img_size": 16, "depth": 1}
    source = timm.create_model("kat_micro_patch4_32", **kwargs).eval()
    with torch.no_grad():
        source.head.bias.add_(1.0)  # differs from any fresh init
    loaded = timm.create_model(
        "kat_micro_patch4_32", pretrained=True, pretrained_cfg_overlay={"state_dict": source.state_dict()}, **kwargs
    ).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
    with pytest.raises(LightningActError, match="no weights are downloaded"):  # timm would fetch from the hub
        timm.create_model(
            "kat_micro_patch4_32", pretrained=True,
            pretrained_cfg_overlay={"state_dict": source.state_dict(), "source": "hf-hub", "hf_hub_id": "x/y"}, **kwargs,
        )


def test_in_memory_and_file_checkpoints_give_the_same_ema_weights(tmp_path) -> None:
    """One timm training dict (raw and EMA weights) as ``pretrained_cfg_overlay`` ``file`` and ``state_dict``.
    Before: the file gave the EMA weights (timm unwraps it), the in-memory dict the raw ones."""
    kwargs = {"img_size": 16, "depth": 1}
    raw = timm.create_model("kat_micro_patch4_32", **kwargs).state_dict()
    generator = torch.Generator().manual_seed(9)
    ema = {key: value + torch.randn(value.shape, generator=generator) for key, value in raw.items()}
    checkpoint = {"epoch": 2, "state_dict": raw, "state_dict_ema": ema}
    path = tmp_path / "train.pth.tar"
    torch.save(checkpoint, path)
    for form, source in (("file", str(path)), ("state_dict", checkpoint)):
        loaded = timm.create_model("kat_micro_patch4_32", pretrained=True, pretrained_cfg_overlay={form: source}, **kwargs)
        state = loaded.state_dict()
        assert all(torch.equal(state[key], value) for key, value in ema.items()), form


def test_a_checkpoint_holding_none_of_the_models_tensors_is_refused_not_silently_random() -> None:
    """With another ``num_classes`` timm loads non-strictly, so a checkpoint whose keys all missed left the model at
    its random init with only a log line."""
    foreign = {"encoder.layer.0.weight": torch.zeros(3, 3), "head.weight": torch.zeros(10, 96)}
    with pytest.raises(LightningActError, match="holds none of the model's tensors"):
        timm.create_model("kat_micro_patch4_32", num_classes=5, pretrained=True,
                          pretrained_cfg_overlay={"state_dict": foreign})


def test_a_width_the_rational_groups_do_not_divide_names_rational_groups() -> None:
    """``mlp_ratio=3.3`` gives 316 hidden channels, which 8 groups do not divide. Before: the message said "pass a
    groups=", which timm.create_model("kat_*") refuses as an unexpected keyword."""
    with pytest.raises(LightningActError, match=r"rational_groups=8 .*rational_groups=4") as info:
        timm.create_model("kat_micro_patch4_32", depth=1, mlp_ratio=3.3)
    assert "\n" not in str(info.value) and " groups=" not in str(info.value)
    model = timm.create_model("kat_micro_patch4_32", depth=1, mlp_ratio=3.3, rational_groups=4)  # the advice works
    assert model.blocks[0].mlp.act2.weight_denominator.shape == (4, 4) and model.blocks[0].mlp.fc1.out_features == 316


def test_the_official_kan_mimetic_weight_init_is_refused_in_one_line() -> None:
    """Every official KAT factory passes ``weight_init="kan_mimetic"``. Before: timm's bare ``AssertionError: ''``."""
    with pytest.raises(LightningActError, match=r"weight_init='kan_mimetic' is not implemented.*docs/kat\.md") as info:
        timm.create_model("kat_micro_patch4_32", depth=1, weight_init="kan_mimetic")
    assert "\n" not in str(info.value) and "'jax'" in str(info.value)
    for supported in ("", "jax", "moco", "skip"):
        timm.create_model("kat_micro_patch4_32", depth=1, weight_init=supported)
