"""ImageClassifier: schedule, mixup/cutmix loss, top-1, weight-decay groups, checkpoints, a tiny KAT fit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import lightning_act.models.kat  # noqa: F401  (registers the KAT models with timm)
from lightning_act.data.images import ImageDataModule
from lightning_act.errors import DataFormatError, DataNotFoundError, LightningActError
from lightning_act.tasks.image_classification import ImageClassifier, warmup_cosine

TINY_KAT = {"model_name": "kat_micro_patch4_32", "num_classes": 10, "in_chans": 1,
                "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 48, "depth": 1}}


def test_warmup_cosine_hand_values() -> None:
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, min_ratio=0.2) == pytest.approx(0.6)  # halfway: (1 + 0.2) / 2
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(500, 10, 110, min_ratio=0.2) == pytest.approx(0.2)


def test_constructor_of_the_vit_demo_recipe_still_works() -> None:
    model = ImageClassifier(
        model_name="vit_tiny_patch16_224", num_classes=10, in_chans=1,
        model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2},
        lr=0.002, weight_decay=0.05, warmup_steps=20, label_smoothing=0.1,
    )
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.mixup is None


def _numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-(targets * log_probs).sum(-1).mean())


def test_mixup_loss_is_soft_target_cross_entropy_and_odd_batches_are_trimmed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    model = ImageClassifier(**TINY_KAT, mixup_alpha=1.0, label_smoothing=0.0)
    seen = {}
    original = model.mixup

    def recording_mixup(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen["x_in"], seen["y"] = x.clone(), y.clone()
        mixed, targets = original(x, y)
        seen["x"], seen["targets"] = mixed.clone(), targets.clone()
        return mixed, targets

    model.mixup = recording_mixup
    x, y = torch.randn(7, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6])
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    loss = model.training_step((x, y), 0)
    assert len(seen["y"]) == 6 and torch.equal(seen["x_in"], x[:6])
    # mixup: x' = lam x + (1 - lam) x.flip(0), t = lam onehot(y) + (1 - lam) onehot(y.flip(0))
    lam = float(seen["targets"][0, 0])
    expected_targets = lam * np.eye(10)[y[:6].numpy()] + (1 - lam) * np.eye(10)[y[:6].flip(0).numpy()]
    np.testing.assert_allclose(seen["targets"].numpy(), expected_targets, atol=1e-6)
    np.testing.assert_allclose(seen["x"].numpy(), lam * x[:6].numpy() + (1 - lam) * x[:6].flip(0).numpy(), atol=1e-5)
    model.eval()  # same forward as training (no dropout in TINY_KAT)
    with torch.no_grad():
        logits = model(seen["x"]).double().numpy()
    assert loss.item() == pytest.approx(_numpy_cross_entropy(logits, expected_targets), rel=1e-5)


def test_label_smoothing_without_mixup_matches_hand_formula() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(**TINY_KAT, label_smoothing=0.1)
    model.log = lambda *args, **kwargs: None
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 3, 5, 7])
    loss = model.training_step((x, y), 0)
    with torch.no_grad():
        logits = model(x).double().numpy()
    targets = 0.9 * np.eye(10)[y.numpy()] + 0.1 / 10
    assert loss.item() == pytest.approx(_numpy_cross_entropy(logits, targets), rel=1e-5)


def test_top1_accuracy_is_the_fraction_correct() -> None:
    model = ImageClassifier(**TINY_KAT)
    logits = torch.zeros(5, 10)
    logits[torch.arange(5), torch.tensor([0, 0, 0, 0, 1])] = 1.0
    model.test_acc(logits, torch.tensor([0, 0, 0, 1, 1]))  # 4 of 5 right; macro averaging would give 0.875
    assert model.test_acc.compute().item() == pytest.approx(0.8)


def test_weight_decay_skips_biases_norms_embeddings_and_rationals() -> None:
    model = ImageClassifier(**TINY_KAT)
    model.trainer = pl.Trainer(max_epochs=-1, max_steps=10, logger=False, enable_checkpointing=False)
    optim = model.configure_optimizers()["optimizer"]
    decay_ids = {id(p) for p in optim.param_groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["model.blocks.0.mlp.fc1.weight"]) in decay_ids
    assert id(named["model.blocks.0.attn.qkv.weight"]) in decay_ids
    for name in ("model.pos_embed", "model.cls_token", "model.blocks.0.mlp.act1.weight_numerator",
                 "model.blocks.0.mlp.act2.weight_denominator", "model.blocks.0.norm1.weight", "model.head.bias"):
        assert id(named[name]) not in decay_ids, name
    assert optim.param_groups[1]["weight_decay"] == 0.0


def test_tiny_kat_fit_with_cutmix_then_test_reports_top1(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ImageClassifier(**TINY_KAT, cutmix_alpha=1.0, mixup_alpha=0.2, label_smoothing=0.1, warmup_steps=2)
    data = ImageDataModule(image_size=8, in_chans=1, batch_size=128, crop_padding=1)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=1, limit_test_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, data)
    result = trainer.test(model, data, verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0 and math.isfinite(result["test/loss"])


def test_class_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    model = ImageClassifier(**{**TINY_KAT, "num_classes": 5})
    data = ImageDataModule(image_size=8, in_chans=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    with pytest.raises(LightningActError, match="--model.num_classes 10"):
        trainer.fit(model, data)


def test_official_kat_checkpoint_loads_and_head_is_reinitialised(tmp_path: Path) -> None:
    dim, groups = 48, 8
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 5, dim), "patch_embed.proj.weight": (dim, 1, 4, 4),
        "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
        "head.weight": (1000, dim), "head.bias": (1000,),
        "blocks.0.norm1.weight": (dim,), "blocks.0.norm1.bias": (dim,),
        "blocks.0.attn.qkv.weight": (3 * dim, dim), "blocks.0.attn.qkv.bias": (3 * dim,),
        "blocks.0.attn.proj.weight": (dim, dim), "blocks.0.attn.proj.bias": (dim,),
        "blocks.0.norm2.weight": (dim,), "blocks.0.norm2.bias": (dim,),
        "blocks.0.mlp.act1.weight_numerator": (1, 6), "blocks.0.mlp.act1.weight_denominator": (groups, 4),
        "blocks.0.mlp.fc1.weight": (4 * dim, dim), "blocks.0.mlp.fc1.bias": (4 * dim,),
        "blocks.0.mlp.act2.weight_numerator": (1, 6), "blocks.0.mlp.act2.weight_denominator": (groups, 4),
        "blocks.0.mlp.fc2.weight": (dim, 4 * dim), "blocks.0.mlp.fc2.bias": (dim,),
    }
    official = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    path = tmp_path / "kat_official.pth"
    torch.save({"model": official, "epoch": 299}, path)
    model = ImageClassifier(**TINY_KAT, checkpoint_path=str(path))
    state = model.model.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.weight"], official["blocks.0.attn.qkv.weight"])
    assert torch.equal(state["blocks.0.mlp.act2.weight_numerator"], official["blocks.0.mlp.act2.weight_numerator"].expand(groups, 6))
    assert state["head.weight"].shape == (10, dim)
    with pytest.raises(DataNotFoundError, match="checkpoint_path"):
        ImageClassifier(**TINY_KAT, checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(DataFormatError, match="does not fit"):
        ImageClassifier(**{**TINY_KAT, "model_kwargs": {**TINY_KAT["model_kwargs"], "depth": 2}}, checkpoint_path=str(path))


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(LightningActError, match="timm has no model"):
        ImageClassifier(model_name="kat_gigantic_patch1_9000")


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kat_imagenet.yaml"


def _write_tiny_imagefolder(root: Path) -> None:
    """Two classes, 224 px JPEG and PNG images, train/ and val/ (the ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1)):
        for label, name in enumerate(("n01440764", "n01443537")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(folder / f"{index}.{'JPEG' if index % 2 else 'png'}")


def test_imagenet_recipe_has_the_paper_settings() -> None:
    import yaml

    config = yaml.safe_load(RECIPE.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert (model["lr"], model["weight_decay"], model["label_smoothing"]) == (0.001, 0.05, 0.1)
    assert (model["mixup_alpha"], model["cutmix_alpha"], model["model_kwargs"]["drop_path_rate"]) == (0.8, 1.0, 0.1)
    assert model["warmup_steps"] == round(5 * 1_281_167 / 1024)  # five epochs at batch 1024
    assert data["image_size"] == 224 and data["timm_transforms"] and data["random_erasing"] == 0.25
    assert data["auto_augment"].startswith("rand-m9")
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.EMAWeightAveraging" in callbacks
    assert config["trainer"]["max_epochs"] == 300


def test_imagenet_recipe_fast_dev_run_on_a_tiny_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_act.cli import main

    _write_tiny_imagefolder(tmp_path / "imagenet")
    monkeypatch.chdir(tmp_path)
    status = main([
        "fit", "--config", str(RECIPE), "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false",
        "--data.data_dir", str(tmp_path / "imagenet"), "--data.batch_size", "2", "--data.num_workers", "0",
        "--model.num_classes", "2", "--model.model_kwargs", "{drop_path_rate: 0.1, depth: 2}",
    ])
    assert status == 0


@pytest.mark.parametrize("data, fix", [
    ({"image_size": 8, "in_chans": 3}, "--model.in_chans 3"),  # before: a convolution's RuntimeError, mid-fit
    ({"image_size": 16, "in_chans": 1}, "--model.model_kwargs.img_size 16"),
])
def test_channel_and_image_size_mismatches_are_one_line(tmp_path: Path, data: dict, fix: str) -> None:
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    with pytest.raises(LightningActError, match=fix):
        trainer.fit(ImageClassifier(**TINY_KAT), ImageDataModule(**data))


def test_mixup_trains_a_last_batch_of_one_unmixed() -> None:
    """A loader's last batch of one has no mixing partner: it trains with the smoothed one-hot target (before:
    trimmed to nothing, and the accuracy metric crashed on the empty batch at the end of the epoch)."""
    torch.manual_seed(0)
    model = ImageClassifier(**TINY_KAT, mixup_alpha=1.0, label_smoothing=0.1)
    model.log = lambda *args, **kwargs: None
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    loss = model.training_step((x, y), 0)
    with torch.no_grad():
        logits = model(x).double().numpy()
    assert loss.item() == pytest.approx(_numpy_cross_entropy(logits, 0.9 * np.eye(10)[[3]] + 0.1 / 10), rel=1e-5)
    assert model.train_acc.compute().item() == float(logits.argmax() == 3)


def checkpoint_after_one_step(tmp_path: Path) -> ImageClassifier:
    """A tiny KAT classifier trained one step, its Lightning checkpoint written to ``tmp_path/last.ckpt``."""
    source = ImageClassifier(**TINY_KAT)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    trainer.fit(source, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return source


def test_a_lightning_checkpoint_of_an_image_classifier_fine_tunes_with_a_new_head(tmp_path: Path) -> None:
    """Before: the "model." prefix of the LightningModule's keys was kept, and the load was refused as "does not
    fit" the model it was written from."""
    torch.manual_seed(0)
    source = checkpoint_after_one_step(tmp_path)
    tuned = ImageClassifier(**{**TINY_KAT, "num_classes": 3}, checkpoint_path=str(tmp_path / "last.ckpt"))
    weights, loaded = source.model.state_dict(), tuned.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if not k.startswith("head."))
    assert loaded["head.weight"].shape == (3, 48)


@pytest.mark.parametrize(("option", "says"), [({"min_lr_ratio": -0.5}, "min_lr_ratio=-0.5 must be in [0, 1]"),
                                              ({"warmup_steps": -10}, "warmup_steps=-10 must be a whole number >= 0")])
def test_a_schedule_that_cannot_be_followed_is_one_line(option: dict, says: str) -> None:
    """Before: min_lr_ratio -0.5 ended at a negative learning rate (the loss ascended), -10 warm-up steps started the
    schedule down the cosine."""
    from lightning_act.tasks.language_model import CausalLanguageModel

    for build in (lambda: ImageClassifier(**TINY_KAT, **option), lambda: CausalLanguageModel(**option)):
        with pytest.raises(LightningActError, match=re.escape(says)):
            build()


@pytest.mark.parametrize("layout", ["state_dict", "model"])
def test_load_timm_checkpoint_takes_the_ema_weights_like_timm(layout: str, tmp_path: Path) -> None:
    """A timm training checkpoint holds raw and EMA weights; timm's ``checkpoint_path=`` loads the EMA ones
    (``state_dict_ema``, else ``model_ema``). Before: load_timm_checkpoint took the raw ones from the same file."""
    import timm

    from lightning_act.tasks.image_classification import load_timm_checkpoint

    kwargs = {"img_size": 16, "depth": 1}
    raw = timm.create_model("kat_micro_patch4_32", **kwargs).state_dict()
    ema = {key: value + 1.0 if key == "head.bias" else value for key, value in raw.items()}
    path = tmp_path / "train.pth.tar"
    torch.save({"epoch": 3, layout: raw, f"{layout}_ema": ema}, path)
    ours = timm.create_model("kat_micro_patch4_32", **kwargs)
    load_timm_checkpoint(ours, "kat_micro_patch4_32", str(path))
    assert torch.equal(ours.head.bias, ema["head.bias"])
    timms = timm.create_model("kat_micro_patch4_32", checkpoint_path=str(path), **kwargs)
    assert torch.equal(timms.head.bias, ours.head.bias)


def test_a_lightning_checkpoint_loads_through_timms_pretrained_file_with_a_new_head(tmp_path: Path) -> None:
    """``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=<.ckpt>), num_classes=3)``. Before:
    the ``model.`` prefix was kept, no key matched, and timm's non-strict load (the head differs) left a random model."""
    import timm

    torch.manual_seed(1)
    source = checkpoint_after_one_step(tmp_path)
    written = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model = timm.create_model(
        TINY_KAT["model_name"], num_classes=3, in_chans=1, **TINY_KAT["model_kwargs"], pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "last.ckpt"), "input_size": (1, 8, 8)},
    )
    loaded = model.state_dict()
    body = [key for key in loaded if not key.startswith("head.")]
    assert len(body) > 10 and all(torch.equal(loaded[key], written[f"model.{key}"]) for key in body)
    assert loaded["head.weight"].shape == (3, 48)


def test_load_timm_checkpoint_takes_timm_training_and_compiled_checkpoints(tmp_path: Path) -> None:
    """A timm ``train.py`` checkpoint (``args`` an ``argparse.Namespace``) gives its EMA weights, as timm's
    ``checkpoint_path=`` does; a ``torch.compile``d model's ``_orig_mod.`` keys load. Before: the first was refused as
    "(UnpicklingError); pass a torch .pth/.pt file", the second as "24 missing keys"."""
    import argparse

    import timm

    from lightning_act.tasks.image_classification import load_timm_checkpoint

    kwargs = {"img_size": 16, "depth": 1}
    raw = timm.create_model("kat_micro_patch4_32", **kwargs).state_dict()
    generator = torch.Generator().manual_seed(3)
    ema = {key: value + torch.randn(value.shape, generator=generator) for key, value in raw.items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "kat_micro_patch4_32", "state_dict": raw, "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=1e-3, model_ema=True)}, path)
    ours = timm.create_model("kat_micro_patch4_32", **kwargs)
    load_timm_checkpoint(ours, "kat_micro_patch4_32", str(path))
    assert all(torch.equal(ours.state_dict()[key], value) for key, value in ema.items())
    timms = timm.create_model("kat_micro_patch4_32", checkpoint_path=str(path), **kwargs)
    assert all(torch.equal(timms.state_dict()[key], value) for key, value in ema.items())

    compiled = torch.compile(timm.create_model("kat_micro_patch4_32", **kwargs))  # wraps; compiles only when called
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pth")
    ours = timm.create_model("kat_micro_patch4_32", **kwargs)
    load_timm_checkpoint(ours, "kat_micro_patch4_32", str(tmp_path / "compiled.pth"))
    expected = compiled.state_dict()
    assert all(torch.equal(value, expected[f"_orig_mod.{key}"]) for key, value in ours.state_dict().items())


def test_load_timm_checkpoint_fine_tunes_a_model_with_several_classifiers(tmp_path: Path) -> None:
    """DeiT distilled's ``pretrained_cfg`` names two classifiers, ``("head", "head_dist")``: a 20-class checkpoint
    loads into a 10-class model with both heads fresh, as timm's pretrained path does. Before: the tuple was
    formatted into one prefix and the checkpoint refused ("does not fit ...; pass the --model.model_name")."""
    import timm

    from lightning_act.tasks.image_classification import load_timm_checkpoint

    name = "deit_tiny_distilled_patch16_224"
    kwargs = {"depth": 1, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    source = {key: value.clone() for key, value in timm.create_model(name, num_classes=20, **kwargs).state_dict().items()}
    torch.save(source, tmp_path / "deit_20.pth")
    model = timm.create_model(name, num_classes=10, **kwargs)
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    load_timm_checkpoint(model, name, str(tmp_path / "deit_20.pth"))
    loaded = model.state_dict()
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert all(torch.equal(loaded[key], fresh[key]) for key in heads)
    assert loaded["head.weight"].shape == loaded["head_dist.weight"].shape == (10, 32)
    body = set(loaded) - heads
    assert len(body) > 10 and all(torch.equal(loaded[key], source[key]) for key in body)


def test_load_timm_checkpoint_names_the_objects_a_weights_only_load_refuses(tmp_path: Path) -> None:
    """A torch file pickling other objects is a torch file: the error names them instead of "pass a torch .pth/.pt
    file" (which stays for a file that is not one)."""
    import timm

    from lightning_act.tasks.image_classification import load_timm_checkpoint

    model = timm.create_model("kat_micro_patch4_32", img_size=16, depth=1)
    torch.save({"state_dict": model.state_dict(), "where": Path("/data")}, tmp_path / "objects.pth")
    with pytest.raises(DataFormatError, match=r"holds Python objects that a weights-only load refuses \(pathlib\.") as info:
        load_timm_checkpoint(model, "kat_micro_patch4_32", str(tmp_path / "objects.pth"))
    assert "pass a torch" not in str(info.value)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(DataFormatError, match="pass a torch .pth/.pt file"):
        load_timm_checkpoint(model, "kat_micro_patch4_32", str(tmp_path / "notes.pth"))


def test_a_checkpoint_fine_tuned_from_a_pretrained_file_loads_without_that_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``load_from_checkpoint`` and ``lightning_act test --ckpt_path`` rebuilt the model with the recorded
    ``checkpoint_path`` and its ``__init__`` read that file again: once it was gone (another machine, a cleaned folder),
    DataNotFoundError, though the checkpoint holds every weight."""
    import yaml

    from lightning_act.cli import main

    torch.manual_seed(0)
    (tmp_path / "pre").mkdir()
    checkpoint_after_one_step(tmp_path / "pre")
    pretrained = tmp_path / "pre" / "last.ckpt"
    tuned = ImageClassifier(**TINY_KAT, warmup_steps=0, checkpoint_path=str(pretrained))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    trainer.fit(tuned, torch.utils.data.DataLoader(data, batch_size=4))
    finetuned = tmp_path / "finetuned.ckpt"
    trainer.save_checkpoint(finetuned)
    pretrained.unlink()

    written = torch.load(finetuned, map_location="cpu", weights_only=True)["state_dict"]
    loaded = ImageClassifier.load_from_checkpoint(finetuned, map_location="cpu").state_dict()
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], v) for k, v in written.items())
    with pytest.raises(DataNotFoundError, match="checkpoint_path"):  # a model built for a fit still needs it
        ImageClassifier(**TINY_KAT, checkpoint_path=str(pretrained))

    checkpoint = torch.load(finetuned, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lightning_act.tasks.image_classification.ImageClassifier"
    torch.save(checkpoint, finetuned)  # as lightning_act fit writes it
    config = tmp_path / "test.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "limit_test_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "lightning_act.tasks.image_classification.ImageClassifier",
                  "init_args": {**TINY_KAT, "warmup_steps": 0}},
        "data": {"class_path": "lightning_act.data.images.ImageDataModule",
                 "init_args": {"image_size": 8, "in_chans": 1, "batch_size": 16}},
    }))
    monkeypatch.chdir(tmp_path)
    assert main(["test", "--config", str(config), "--ckpt_path", str(finetuned)]) == 0
    assert "lightning_act: error" not in capsys.readouterr().err
