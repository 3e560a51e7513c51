"""Image classification for any timm model, created by name (no pretrained weights).

The training recipe follows DeiT / KAT (Touvron et al. 2021; Yang & Wang 2024): AdamW, linear
warm-up then cosine decay, label smoothing, and optionally mixup (Zhang et al. 2018) and cutmix
(Yun et al. 2019) with a soft-target cross entropy.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import math
import numbers
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_act.checkpointing import restoring_from_checkpoint, weights_from_checkpoint
from lightning_act.errors import ConfigError, DataFormatError, DataNotFoundError, LightningActError
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.classification import ClassificationTask


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(warmup_steps: int, min_lr_ratio: float) -> None:
    """One line for a schedule :func:`warmup_cosine` cannot follow: a negative warm-up starts it down the cosine, and a
    ratio outside [0, 1] ends it at a negative (loss-ascending) or above-peak learning rate."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise LightningActError(f"warmup_steps={warmup_steps!r} must be a whole number >= 0; pass e.g. --model.warmup_steps 20")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise LightningActError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1]; pass e.g. --model.min_lr_ratio 0.1")


def check_non_negative(name: str, value: Any, fix: str, meaning: str = "") -> None:
    """One line for ``value`` that is no finite number >= 0 (a bool is none): ``fix`` is the flag to pass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise LightningActError(f"{name}={value!r} must be a finite number >= 0{meaning}; pass e.g. {fix}")


def check_optimizer_args(lr: Any, weight_decay: Any, lr_name: str = "lr") -> None:
    """One line for an AdamW setting torch refuses only at fit start (a NaN or negative ``lr``) or never: the tasks put
    ``weight_decay`` in a parameter group, which torch does not check, and a negative one grows the weights every
    step."""
    check_non_negative(lr_name, lr, f"--model.{lr_name} 1e-3")
    check_non_negative("weight_decay", weight_decay, "--model.weight_decay 0.01", " (0 switches it off)")


def check_probability(name: str, value: Any) -> None:
    """One line for ``value`` outside [0, 1] (or NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise LightningActError(f"{name}={value!r} must be a probability in [0, 1]; pass e.g. --model.{name} 0.5")


def schedule_steps(trainer: Any) -> int:
    """The optimizer steps the fit takes, over which :func:`warmup_cosine` decays. Lightning estimates them as -1 for
    training data without a length (an ``IterableDataset``: streaming, webdataset) and as infinite for a fit without
    an end (``max_epochs=-1``, or ``max_time`` alone): the cosine was then over after the warm-up (the LR at its floor
    for the rest of the fit) or the fit died in an ``OverflowError``."""
    steps = trainer.estimated_stepping_batches
    if math.isinf(steps):
        raise ConfigError(
            "the warm-up + cosine learning-rate schedule needs the fit's length, but max_epochs=-1 (also what max_time "
            "alone gives) sets none; pass --trainer.max_steps N (or --trainer.max_epochs N)"
        )
    if steps < 0:
        raise ConfigError(
            "the warm-up + cosine learning-rate schedule needs the fit's length, but the training data has no length "
            "(an IterableDataset, e.g. a streaming dataset); pass --trainer.max_steps N"
        )
    return max(1, int(steps))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """:func:`warmup_cosine` times each group's base LR, per optimizer step.

    A resumed fit (Lightning restores the optimizer's and this scheduler's state after ``configure_optimizers``) goes
    on with this run's schedule (length, warm-up, ``min_ratio``) at the checkpoint's step, from its first step: the
    restored groups held the LR the checkpoint's schedule had left, e.g. its end (0) for a fit made longer. The base LR
    and weight decay stay the checkpoint's, as Lightning restores the optimizer's state (the CLI builds the model from
    the checkpoint's hyper-parameters too); a model built with other values is told so in one warning line.

    The tasks call :meth:`start_fit` at the fit's start, after Lightning's ``LearningRateFinder`` and
    ``BatchSizeFinder`` callbacks have changed the lr and the batch size that ``configure_optimizers`` built it with.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
    ) -> None:
        self.configured_weight_decays = [group.get("weight_decay", 0.0) for group in optimizer.param_groups]
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: warmup_cosine(step, warmup_steps, self.total_steps, min_ratio))

    def start_fit(self, lr: float, total_steps: int) -> None:
        """Every group's base LR set to ``lr`` and the cosine to ``total_steps``, the groups' LR recomputed. At the
        fit's start (a resume restores the checkpoint's base LRs after it): Lightning's ``LearningRateFinder``
        callback sets the model's lr and the groups' LR to its suggestion only, so the schedule multiplied the built
        lr again from the second step; its ``BatchSizeFinder`` changes the fit's length, which the cosine spanned as
        built."""
        self.total_steps = total_steps
        self.base_lrs = [lr for _ in self.base_lrs]
        for group, lr_lambda in zip(self.optimizer.param_groups, self.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * lr_lambda(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured_lrs, configured_weight_decays = list(self.base_lrs), self.configured_weight_decays
        total_steps = self.total_steps
        super().load_state_dict(state_dict)  # also sets the checkpoint's configured_weight_decays: this run's are kept
        self.configured_weight_decays, self.total_steps = configured_weight_decays, total_steps
        groups = self.optimizer.param_groups
        restored_weight_decays = [group.get("weight_decay", 0.0) for group in groups]
        kept = [f"{what} {_values(restored)} (this model's: {_values(configured)})"
                for what, restored, configured in (("lr", self.base_lrs, configured_lrs),
                                                   ("weight decay", restored_weight_decays, configured_weight_decays))
                if restored != configured]
        if kept:
            rank_zero_warn(
                f"resuming from a checkpoint: the optimizer keeps the checkpoint's {' and '.join(kept)}, as Lightning "
                "restores the optimizer's state; this run's schedule length, warm-up and min_lr_ratio apply"
            )
        for group, base_lr, lr_lambda in zip(groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base_lr * lr_lambda(self.last_epoch)
        self._last_lr = [group["lr"] for group in groups]


def start_schedules(module: Any, lr: float) -> None:
    """:meth:`WarmupCosineLR.start_fit` for the module's schedules, from its ``on_fit_start`` (Lightning runs it after
    the callbacks' ``on_fit_start``, where the ``LearningRateFinder`` and ``BatchSizeFinder`` callbacks tune)."""
    for config in module.trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, WarmupCosineLR):
            config.scheduler.start_fit(lr, schedule_steps(module.trainer))


def _values(values: list[float]) -> str:
    """One number where every parameter group has the same, else the list."""
    return f"{values[0]:g}" if len(set(values)) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _unsafe_globals(checkpoint_path: str) -> list[str]:
    """The classes and functions a torch file's pickle names beyond the weights-only allow-list; none for a file
    that is not a torch checkpoint."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint_path)
    except Exception:  # not a torch zip file
        return []
    return [name for name in names if name != "argparse.Namespace"]


def load_timm_checkpoint(model: torch.nn.Module, model_name: str, checkpoint_path: str) -> None:
    """Load a local checkpoint into a timm model, remapped by its family's ``checkpoint_filter_fn``.

    A timm/PyTorch state dict, a timm training checkpoint (its ``args`` namespace allowed, as timm allows it) or a
    Lightning checkpoint of an :class:`ImageClassifier` is read, unwrapped by
    :func:`~lightning_act.models.kat.unwrap_state_dict`: the first of ``"state_dict_ema"``, ``"model_ema"``,
    ``"state_dict"``, ``"model"`` that the file holds (timm's own ``load_state_dict(use_ema=True)`` order, so a timm
    training checkpoint gives the same (EMA) weights here as through ``timm.create_model(..., checkpoint_path=...)``),
    and DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes stripped as timm strips them. The filter of the
    file that registered ``model_name`` (timm's own, or ``lightning_act.models.kat.checkpoint_filter_fn`` for
    official KAT weights) is applied, as timm does for pretrained weights. A classifier whose shape differs (e.g.
    1000 ImageNet classes into a 10-class model; each of several, such as DeiT distilled's ``head`` and
    ``head_dist``) is left at its fresh init so the weights can be fine-tuned. A first convolution (the
    ``pretrained_cfg``'s ``first_conv``) of another input-channel count is adapted as timm's pretrained loader adapts
    it (:func:`adapt_input_convs`: RGB weights into a grayscale model). Every other tensor must match (strict).
    """
    import timm

    from lightning_act.models.kat import classifier_names, unwrap_state_dict  # imports timm: not at module import

    if not Path(checkpoint_path).is_file():
        raise DataNotFoundError(f"checkpoint '{checkpoint_path}' not found; pass --model.checkpoint_path to an existing file")
    try:
        # timm training checkpoints hold their arguments as an argparse.Namespace (timm allow-lists it the same way)
        with torch.serialization.safe_globals([argparse.Namespace]):
            state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        objects = _unsafe_globals(checkpoint_path)
        if objects:  # a torch file, but pickled objects are not loaded from it (they could run code)
            raise DataFormatError(
                f"checkpoint '{checkpoint_path}' holds Python objects that a weights-only load refuses "
                f"({', '.join(objects[:3])}); save the model's state dict alone (torch.save(model.state_dict(), path))"
            ) from err
        raise DataFormatError(f"cannot read checkpoint '{checkpoint_path}' ({type(err).__name__}); pass a torch .pth/.pt file") from err
    if not isinstance(state_dict, dict):
        raise DataFormatError(f"checkpoint '{checkpoint_path}' holds a {type(state_dict).__name__}, not a state dict")
    family = importlib.import_module(timm.models.model_entrypoint(model_name).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    state_dict = unwrap_state_dict(state_dict, model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    adapt_input_convs(state_dict, model)
    own = model.state_dict()
    classifier_prefixes = tuple(f"{name}." for name in classifier_names(model))
    skipped = [
        k for k, v in state_dict.items() if k.startswith(classifier_prefixes) and k in own and own[k].shape != v.shape
    ]
    for key in skipped:
        state_dict[key] = own[key]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        raise DataFormatError(
            f"checkpoint '{checkpoint_path}' does not fit '{model_name}': {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(mismatched)} of other shape {mismatched[:3]}; "
            "pass the --model.model_name, --model.in_chans (and model_kwargs) the checkpoint was trained with"
        )
    model.load_state_dict(state_dict, strict=True)


def adapt_input_convs(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Adapt, in ``state_dict``, the weight of ``model``'s first convolutions (its ``pretrained_cfg``'s ``first_conv``)
    to the model's input channels when the checkpoint's differ, with ``timm.models.adapt_input_conv`` as timm's
    ``pretrained=True`` loader does: the filters summed for one channel (grayscale fine-tuning from RGB weights), else
    repeated and scaled by ``checkpoint channels / in_chans``. Only plain stems (a ``Conv2d`` whose input channels
    are the model's ``in_chans``, ungrouped), where the weight's input dimension is the checkpoint's channel count;
    any other mismatch is left to the caller's shape check."""
    from timm.models import adapt_input_conv

    names = getattr(model, "pretrained_cfg", {}).get("first_conv")
    modules = dict(model.named_modules())
    for name in (names,) if isinstance(names, str) else names or ():
        key = f"{name}.weight"
        conv, weight = modules.get(name), state_dict.get(key)
        plain_stem = (isinstance(conv, torch.nn.Conv2d) and conv.groups == 1
                      and conv.in_channels == getattr(model, "in_chans", None))
        if plain_stem and weight is not None and weight.ndim == 4 and weight.shape[1] != conv.in_channels:
            state_dict[key] = adapt_input_conv(conv.in_channels, weight, base_chans=weight.shape[1])


_PRETRAINED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay")
_TASK_KWARGS = ("num_classes", "in_chans")


def without_pretrained_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` but the pretrained settings, dropped in one warning, for a model rebuilt from a Lightning checkpoint
    (which holds every weight): earlier versions accepted them (timm ignored them), so their checkpoints hold them."""
    pretrained = [key for key in _PRETRAINED_KWARGS if key in model_kwargs]
    if pretrained:
        rank_zero_warn(
            f"ImageClassifier: model_kwargs {', '.join(pretrained)} dropped: the weights come from the Lightning "
            "checkpoint being loaded (the task builds the timm model without pretrained weights)"
        )
    return {key: value for key, value in model_kwargs.items() if key not in pretrained}


def check_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    """One line for ``model_kwargs`` the task sets itself: it builds the timm model with ``pretrained=False`` (timm then
    ignores a ``pretrained_cfg_overlay`` file: training started from random weights without a word, and
    ``pretrained: true`` was a bare ``TypeError``), and with its own ``num_classes`` / ``in_chans``."""
    pretrained = [key for key in _PRETRAINED_KWARGS if key in model_kwargs]
    if pretrained:
        raise ConfigError(
            f"model_kwargs {', '.join(pretrained)}: the task builds the timm model without pretrained weights (timm "
            "would ignore a pretrained config); load a local weights file with --model.checkpoint_path instead"
        )
    clashing = [key for key in _TASK_KWARGS if key in model_kwargs]
    if clashing:
        raise ConfigError(
            f"model_kwargs {', '.join(clashing)}: the task's own argument; pass "
            + " and ".join(f"--model.{key}" for key in clashing) + " instead"
        )


class ImageClassifier(ClassificationTask):
    """Train any ``timm`` model by name with AdamW, warm-up + cosine, label smoothing and mixup/cutmix.

    ``mixup_alpha`` / ``cutmix_alpha`` > 0 switch on timm's batch-wise ``Mixup`` (with probability
    ``mixup_prob``; when both are on, cutmix is chosen with ``mixup_switch_prob``); the targets then
    become soft (label smoothing folded in) and the loss a soft-target cross entropy. Mixing pairs
    sample ``i`` with sample ``B-1-i``, so an odd training batch drops its last sample. Training
    accuracy is then measured against the dominant label of each mixed target.
    ``checkpoint_path`` loads weights into the timm model (official KAT checkpoints are remapped by
    the model's ``checkpoint_filter_fn``); nothing is downloaded. A Lightning checkpoint of a model fine-tuned that
    way loads (``load_from_checkpoint``, ``lightning_act test --ckpt_path``) without that file: it holds every weight.
    """

    batch_form = BatchForm(
        (Part("images (B, C, H, W)", 4, "float"), Part("labels (B,)", 1, "int64")),
        "lightning_act.data.images.ImageDataModule",
    )

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        min_lr_ratio: float = 0.0,
        checkpoint_path: str | None = None,
    ) -> None:
        super().__init__()
        check_schedule(warmup_steps, min_lr_ratio)
        check_optimizer_args(lr, weight_decay)
        if not 0.0 <= label_smoothing < 1.0:
            raise LightningActError(f"label_smoothing={label_smoothing} must be in [0, 1); pass e.g. --model.label_smoothing 0.1")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise LightningActError(
                f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0 (0 switches it off)"
            )
        check_probability("mixup_prob", mixup_prob)
        check_probability("mixup_switch_prob", mixup_switch_prob)
        if model_kwargs and restoring_from_checkpoint():
            model_kwargs = without_pretrained_kwargs(model_kwargs)  # before save_hyperparameters: a re-save is clean
        check_model_kwargs(model_kwargs or {})
        self.save_hyperparameters()
        import timm

        try:
            self.model = timm.create_model(
                model_name,
                pretrained=False,
                num_classes=num_classes,
                in_chans=in_chans,
                **(model_kwargs or {}),
            )
        except RuntimeError as err:
            if "Unknown model" not in str(err):
                raise
            raise LightningActError(
                f"timm has no model '{model_name}'; pick one from timm.list_models() (KAT models need `import lightning_act`)"
            ) from err
        if checkpoint_path:
            if restoring_from_checkpoint() and not Path(checkpoint_path).is_file():
                # a Lightning checkpoint of this model follows and holds every weight: the initial weights of the
                # fine-tuning need not be on this machine any more
                rank_zero_info(f"ImageClassifier: checkpoint_path '{checkpoint_path}' is not here; the weights come "
                               "from the Lightning checkpoint being loaded")
            else:
                load_timm_checkpoint(self.model, model_name, checkpoint_path)
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.init_metrics(num_classes)

    @_restricted_classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Any:
        """``LightningModule.load_from_checkpoint``; the ``checkpoint_path`` file the model was fine-tuned from need not
        be there any more (the checkpoint holds every weight)."""
        with weights_from_checkpoint():
            return super().load_from_checkpoint(*args, **kwargs)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise LightningActError(
                f"the data has {data_classes} classes but the model was built for {self.hparams.num_classes}; "
                f"pass --model.num_classes {data_classes}"
            )
        data_chans = getattr(datamodule, "in_chans", None)
        if data_chans is not None and data_chans != self.hparams.in_chans:  # else a convolution's error, mid-fit
            raise LightningActError(
                f"the data gives {data_chans}-channel images but the model was built for in_chans={self.hparams.in_chans}; "
                f"pass --model.in_chans {data_chans}"
            )
        data_size = getattr(datamodule, "image_size", None)
        patch_embed = getattr(self.model, "patch_embed", None)
        model_size = getattr(patch_embed, "img_size", None)
        fixed = getattr(patch_embed, "strict_img_size", False) and not getattr(self.model, "dynamic_img_size", False)
        if data_size is not None and model_size is not None and fixed and tuple(model_size) != (data_size, data_size):
            raise LightningActError(
                f"the data gives {data_size} x {data_size} images but the model was built for "
                f"{model_size[0]} x {model_size[1]}; pass --model.model_kwargs.img_size {data_size} (or "
                f"--data.image_size {model_size[0]})"
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        x, y = batch
        if self.mixup is not None and len(y) > 1:  # a last batch of one has no partner: it trains unmixed below
            if len(y) % 2:
                x, y = x[:-1], y[:-1]
            x, soft_targets = self.mixup(x.clone(), y)
            logits = self(x)
            loss = torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
            y = soft_targets.argmax(dim=-1)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # timm convention: no decay on biases, norms (1-D) and the model's no_weight_decay() names.
        # The names are fnmatch patterns, as timm's param_groups_weight_decay reads them (XCiT's 'pos_embed.*').
        skip = set(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                name = name.removeprefix("model.")
                exempt = p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pattern) for pattern in skip)
                (no_decay if exempt else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        hp = self.hparams
        schedule = WarmupCosineLR(optimizer, hp.warmup_steps, schedule_steps(self.trainer), hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        start_schedules(self, self.hparams.lr)
