"""Round 23: models as timm / PyTorch / Lightning users call them (GroupRational's kernel path under autograd's
batched grads, ImageClassifier's model_kwargs and first-conv adaptation, SpectralNN's num_classes, the Spectral-NN
task's pos_weight outside a fit).

Values are checked against independent computations: numpy float64 derivatives and losses, hand-summed filters.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch

from lightning_act.data.hyperspectral import HyperspectralDataModule
from lightning_act.errors import ConfigError
from lightning_act.tasks.image_classification import ImageClassifier
from lightning_act.tasks.spectral_detection import SpectralTargetDetection

BATCHED_GRADS_CHECKER = """
import sys
import torch
from lightning_act.nn.group_rational import GroupRational
torch.manual_seed(0)
module = GroupRational(8, groups=2, implementation="triton")
with torch.no_grad():
    module.weight_numerator.normal_()
    module.weight_denominator.normal_()
x = torch.randn(3, 8)
jacobian = torch.autograd.functional.jacobian(module, x, vectorize=True)
leaf = x.clone().requires_grad_()
y = module(leaf)
basis = torch.eye(y.numel()).view(y.numel(), *y.shape)
(rows,) = torch.autograd.grad(y, leaf, basis, is_grads_batched=True)
torch.save({"x": x, "numerator": module.weight_numerator.detach(), "denominator": module.weight_denominator.detach(),
            "jacobian": jacobian, "batched_grad": rows.view(*y.shape, *x.shape)}, sys.argv[2])
"""


def numpy_rational_derivative(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """d/dx of P(x) / (1 + sum |b_k| |x|^(k+1)) per element of ``x`` (rows, C), contiguous groups, float64."""
    groups = numerator.shape[0]
    width = x.shape[1] // groups
    out = np.empty_like(x, dtype=np.float64)
    for group in range(groups):
        v = x[:, group * width:(group + 1) * width].astype(np.float64)
        a, b = numerator[group].astype(np.float64), np.abs(denominator[group].astype(np.float64))
        p = sum(a[j] * v**j for j in range(6))
        dp = sum(j * a[j] * v ** (j - 1) for j in range(1, 6))
        q = 1.0 + sum(b[k] * np.abs(v) ** (k + 1) for k in range(4))
        dq = np.sign(v) * sum((k + 1) * b[k] * np.abs(v) ** k for k in range(4))
        out[:, group * width:(group + 1) * width] = (dp * q - p * dq) / q**2
    return out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_path_jacobian_vectorized_and_batched_grads(tmp_path: Path) -> None:
    # Before: the kernel path's backward handed autograd's legacy-vmap BatchedTensor grad to the Triton kernel:
    # NotImplementedError "Cannot access storage of BatchedTensorImpl" (every KAT on a GPU).
    from _interpreter import run_interpreted

    output = tmp_path / "batched_grads.pt"
    run_interpreted(BATCHED_GRADS_CHECKER, output)
    result = torch.load(output)
    x = result["x"].numpy()
    derivative = numpy_rational_derivative(x, result["numerator"].numpy(), result["denominator"].numpy())
    rows, channels = x.shape
    expected = np.zeros((rows, channels, rows, channels))
    for row in range(rows):
        for channel in range(channels):
            expected[row, channel, row, channel] = derivative[row, channel]
    for key in ("jacobian", "batched_grad"):
        np.testing.assert_allclose(result[key].double().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)


TINY_KAT = {"model_name": "kat_micro_patch4_32", "num_classes": 10,
            "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 48, "depth": 1}}


@pytest.mark.parametrize(("extra", "hint"), [
    ({"pretrained_cfg_overlay": {"file": "weights.pth"}}, "--model.checkpoint_path"),  # before: silently random
    ({"pretrained": True, "pretrained_cfg_overlay": {"file": "weights.pth"}}, "--model.checkpoint_path"),  # TypeError
    ({"pretrained_cfg": {"file": "weights.pth"}}, "--model.checkpoint_path"),
    ({"num_classes": 5}, "--model.num_classes"),  # before: bare TypeError (multiple values)
    ({"in_chans": 1}, "--model.in_chans"),
])
def test_model_kwargs_the_task_sets_itself_are_refused_in_one_line(extra: dict, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        ImageClassifier(**{**TINY_KAT, "model_kwargs": {**TINY_KAT["model_kwargs"], **extra}})


def test_a_checkpoint_whose_model_kwargs_hold_a_pretrained_config_loads_with_that_config_dropped(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the refusal above ran also when load_from_checkpoint / `test --ckpt_path` rebuilt the task, so a
    # checkpoint of an earlier version (which accepted pretrained_cfg_overlay) could not be loaded at all.
    import yaml

    from lightning_act.cli import main

    torch.manual_seed(0)
    written = ImageClassifier(**TINY_KAT, in_chans=1, warmup_steps=0).state_dict()
    hparams = {**TINY_KAT, "in_chans": 1, "warmup_steps": 0,
               "_class_path": "lightning_act.tasks.image_classification.ImageClassifier",
               "model_kwargs": {**TINY_KAT["model_kwargs"], "pretrained_cfg_overlay": {"file": "/gone/weights.pth"}}}
    checkpoint = tmp_path / "old.ckpt"  # as an earlier lightning_act fit wrote it
    torch.save({"state_dict": written, "hyper_parameters": hparams, "pytorch-lightning_version": pl.__version__},
               checkpoint)
    with pytest.warns(UserWarning, match="model_kwargs pretrained_cfg_overlay dropped: the weights come from the "
                                         "Lightning checkpoint"):
        loaded = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    assert loaded.hparams.model_kwargs == TINY_KAT["model_kwargs"]  # a re-saved checkpoint no longer holds it
    assert loaded.state_dict().keys() == written.keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in written.items())

    config = tmp_path / "test.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "limit_test_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": hparams["_class_path"],  # the earlier fit's config
                  "init_args": {key: value for key, value in hparams.items() if key != "_class_path"}},
        "data": {"class_path": "lightning_act.data.images.ImageDataModule",
                 "init_args": {"image_size": 8, "in_chans": 1, "batch_size": 16}},
    }))
    monkeypatch.chdir(tmp_path)
    assert main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    assert "lightning_act: error" not in capsys.readouterr().err


def test_checkpoint_path_adapts_an_rgb_first_conv_to_other_channel_counts(tmp_path: Path) -> None:
    # Before: refused with "pass the --model.model_name (and model_kwargs) the checkpoint was trained with".
    torch.manual_seed(0)
    rgb = timm.create_model(TINY_KAT["model_name"], num_classes=10, in_chans=3, **TINY_KAT["model_kwargs"]).eval()
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    source = rgb.state_dict()["patch_embed.proj.weight"].double().numpy()
    gray = ImageClassifier(**TINY_KAT, in_chans=1, checkpoint_path=str(path)).eval()
    summed = source[:, 0:1] + source[:, 1:2] + source[:, 2:3]
    np.testing.assert_allclose(gray.model.patch_embed.proj.weight.detach().double().numpy(), summed,
                               rtol=1e-6, atol=1e-7)
    # a grayscale image through the adapted model = the RGB model on that image in all three channels
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    two = ImageClassifier(**TINY_KAT, in_chans=2, checkpoint_path=str(path))
    np.testing.assert_allclose(two.model.patch_embed.proj.weight.detach().double().numpy(), source[:, :2] * 1.5,
                               rtol=1e-6, atol=1e-7)
    body = set(rgb.state_dict()) - {"patch_embed.proj.weight"}
    assert all(torch.equal(gray.model.state_dict()[key], rgb.state_dict()[key]) for key in body)


@pytest.mark.parametrize("num_classes", [0, 1, 3])
def test_spectral_nn_takes_timms_num_classes(num_classes: int) -> None:
    # Before: TypeError "unexpected keyword argument 'num_classes'".
    model = timm.create_model("spectral_nn", in_bands=8, hidden_sizes=[6, 4], num_classes=num_classes).eval()
    spectra = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_features(spectra).double().numpy()
        output = model(spectra).double().numpy()
    if num_classes == 0:
        np.testing.assert_array_equal(output, features)
        return
    weight, bias = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    expected = features @ weight.T + bias
    np.testing.assert_allclose(output, expected[:, 0] if num_classes == 1 else expected, rtol=1e-6, atol=1e-6)
    assert expected.shape == (5, num_classes)


def test_spectral_nn_refuses_a_negative_num_classes() -> None:
    with pytest.raises(ConfigError, match="num_classes=-1 must be >= 0"):
        timm.create_model("spectral_nn", in_bands=8, num_classes=-1)


TINY_DATA = {"num_scenes": 5, "scene_size": 16, "num_bands": 8, "val_fraction": 0.2, "test_fraction": 0.2,
             "batch_size": 256}


def numpy_weighted_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> float:
    z, y = logits.double().numpy(), labels.double().numpy()
    log_p, log_not_p = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    return float(np.mean(-(pos_weight * y * log_p + (1.0 - y) * log_not_p)))


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)


@pytest.mark.parametrize("pos_weight", ["sqrt", "auto"])
def test_spectral_validate_and_test_before_any_fit_weight_the_loss_from_the_data(
    pos_weight: str, tmp_path: Path
) -> None:
    # Before: the buffer was filled in setup("fit") only, so val/loss and test/loss were plain BCE.
    torch.manual_seed(0)
    data = HyperspectralDataModule(**TINY_DATA)
    task = SpectralTargetDetection(in_bands=8, hidden_sizes=[8], pos_weight=pos_weight)
    trainer = _trainer()
    val_loss = trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    test_loss = trainer.test(task, datamodule=data, verbose=False)[0]["test/loss"]
    weight = math.sqrt(data.pos_weight) if pos_weight == "sqrt" else data.pos_weight
    assert weight > 2.0
    task.eval()
    with torch.no_grad():
        for loss, split in ((val_loss, data.val_set), (test_loss, data.test_set)):
            spectra, labels = split.tensors
            assert loss == pytest.approx(numpy_weighted_bce(task(spectra), labels, weight), rel=1e-5)
    # a checkpoint's value (here one no data gives) still wins, restored by the trainer or by load_from_checkpoint
    task.pos_weight.fill_(1.5)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    spectra, labels = data.val_set.tensors
    restored = SpectralTargetDetection.load_from_checkpoint(tmp_path / "task.ckpt")
    fresh = SpectralTargetDetection(in_bands=8, hidden_sizes=[8], pos_weight=pos_weight)
    for model, ckpt_path in ((fresh, tmp_path / "task.ckpt"), (restored, None)):
        loss = _trainer().validate(model, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]["val/loss"]
        model.eval()
        with torch.no_grad():
            assert loss == pytest.approx(numpy_weighted_bce(model(spectra), labels, 1.5), rel=1e-5)


def test_spectral_test_without_data_ratio_warns_that_the_loss_is_plain_bce() -> None:
    torch.manual_seed(0)
    spectra = torch.randn(16, 4)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    task = SpectralTargetDetection(in_bands=4, hidden_sizes=[4])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(spectra, labels), batch_size=16)
    with pytest.warns(UserWarning, match="test/loss is plain BCE.*--model.pos_weight NUMBER"):
        loss = _trainer().test(task, loader, verbose=False)[0]["test/loss"]
    task.eval()
    with torch.no_grad():
        assert loss == pytest.approx(numpy_weighted_bce(task(spectra), labels, 1.0), rel=1e-5)


def test_spectral_loss_is_plain_bce_while_pos_weight_is_unset_and_data_still_sets_it_later() -> None:
    # Before: compute_loss outside a Trainer (a loop of one's own, Fabric) was NaN, with NaN gradients, and the
    # plain-BCE fallback of a validation on bare dataloaders wrote 1.0 into the buffer: a later validation with a
    # datamodule was plain BCE again, without a warning.
    import warnings

    torch.manual_seed(0)
    task = SpectralTargetDetection(in_bands=8, hidden_sizes=[8])
    spectra = torch.randn(16, 8)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    logits = task(spectra)
    with pytest.warns(UserWarning, match="the loss is plain BCE.*--model.pos_weight NUMBER"):
        loss = task.compute_loss(logits, labels)
    assert loss.item() == pytest.approx(numpy_weighted_bce(logits.detach(), labels, 1.0), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in task.parameters() if p.requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.compute_loss(logits.detach(), labels)  # said once
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(spectra, labels), batch_size=16)
    with pytest.warns(UserWarning, match="val/loss is plain BCE"):
        bare = _trainer().validate(task, loader, verbose=False)[0]["val/loss"]
    data = HyperspectralDataModule(**TINY_DATA)
    with_data = _trainer().validate(task, datamodule=data, verbose=False)[0]["val/loss"]
    task.eval()
    with torch.no_grad():
        assert bare == pytest.approx(numpy_weighted_bce(task(spectra), labels, 1.0), rel=1e-5)
        val_spectra, val_labels = data.val_set.tensors
        assert math.sqrt(data.pos_weight) > 2.0
        assert with_data == pytest.approx(
            numpy_weighted_bce(task(val_spectra), val_labels, math.sqrt(data.pos_weight)), rel=1e-5)


def test_spectral_checkpoint_saved_with_pos_weight_unset_keeps_the_datas_weight(tmp_path: Path) -> None:
    # Before: a validation on bare dataloaders wrote 1.0 into the buffer, and the checkpoint saved after it replaced
    # the data's √r when restored: val/loss was plain BCE with the datamodule at hand, without a warning.
    torch.manual_seed(0)
    task = SpectralTargetDetection(in_bands=8, hidden_sizes=[8])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 8), torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)), batch_size=16)
    trainer = _trainer()
    with pytest.warns(UserWarning, match="val/loss is plain BCE"):
        trainer.validate(task, loader, verbose=False)
    trainer.save_checkpoint(tmp_path / "evaluated.ckpt")
    data = HyperspectralDataModule(**TINY_DATA)
    fresh = SpectralTargetDetection(in_bands=8, hidden_sizes=[8])
    loss = _trainer().validate(fresh, datamodule=data, ckpt_path=tmp_path / "evaluated.ckpt",
                               verbose=False)[0]["val/loss"]
    fresh.eval()
    with torch.no_grad():
        spectra, labels = data.val_set.tensors
        assert math.sqrt(data.pos_weight) > 2.0
        assert loss == pytest.approx(numpy_weighted_bce(fresh(spectra), labels, math.sqrt(data.pos_weight)), rel=1e-5)
