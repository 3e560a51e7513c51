"""Dopamine protocol (Ghasemlou 2026, arXiv 2602.11726) as two LightningModules.

Phase 1, :class:`DopamineFoundation`: pretrain a small MLP on a 50/50 mix of upright and
45°-rotated digits. Phase 2, :class:`DopamineSpecialisation`: load that checkpoint, freeze it and
specialise to the rotated mode with one of five methods in the same harness:

* ``"dopamine"`` — per-neuron threshold/gain gates at every hidden activation (``gate_form``
  ``"independent"``: threshold, gain above and gain below it, 3 per neuron; ``"coupled"``: 2 per
  neuron, see :mod:`lightning_act.nn.dopamine`), hardened at test time; the test also logs which
  neurons fire per class (tensor + heatmap);
* ``"frozen"`` — no training (the foundation as is);
* ``"full"`` — every weight trainable;
* ``"lora"`` — rank-``lora_rank`` LoRA on every Linear;
* ``"ia3"`` — (IA)³ ones-initialised rescaling of every hidden activation (1 per neuron).

Every method logs ``trainable_params`` and its test accuracy on the rotated test set.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_act._files import written_whole
from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.errors import ConfigError, DataFormatError, DataNotFoundError, LightningActError
from lightning_act.nn.dopamine import (
    GateForm,
    adapt_model,
    dopamine_gates,
    firing_fractions,
    harden,
    plot_firing_fractions,
    soften,
)
from lightning_act.peft.lora import apply_ia3, apply_lora, count_trainable
from lightning_act.plots import save_png_whole, writes_run_files
from lightning_act.tasks.batch_form import BatchForm, Part
from lightning_act.tasks.classification import ClassificationTask
from lightning_act.tasks.sampler_padding import real_examples, stage_loaders
from lightning_act.tasks.image_classification import WarmupCosineLR, check_optimizer_args, schedule_steps, start_schedules

Method = Literal["dopamine", "frozen", "full", "lora", "ia3"]
METHODS: tuple[str, ...] = ("dopamine", "frozen", "full", "lora", "ia3")
# Chosen on the validation split (seeds 0, 1; 1e-2 / 3e-2 / 1e-1 for the PEFT methods) for the earlier
# 256 → 128 → 128 → 10 foundation and the coupled gate; not re-tuned since, see docs/dopamine.md.
DEFAULT_LR: dict[str, float] = {"dopamine": 3e-2, "frozen": 0.0, "full": 1e-3, "lora": 3e-2, "ia3": 3e-2}
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
#: The RotatedDigitsDataModule settings that choose which digits each split holds (the image size and the rotations do
#: not); ``test_fraction`` only for the bundled digits (MNIST's test split is its t10k files).
_SPLIT_SETTINGS: tuple[str, ...] = ("seed", "val_fraction", "test_fraction", "max_samples")
#: Where a phase-2 checkpoint keeps its foundation's datamodule settings.
_FOUNDATION_DATA_KEY = "dopamine_foundation_data"


def build_mlp(in_features: int, hidden_sizes: list[int], num_classes: int, activation: str = "gelu") -> nn.Sequential:
    """``Flatten → (Linear → activation) × len(hidden_sizes) → Linear``."""
    if activation not in _ACTIVATIONS:
        raise LightningActError(f"activation {activation!r} is unknown; pass one of {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Classifier(ClassificationTask):
    """Shared harness of both phases: cross entropy, AdamW on the trainable parameters, cosine LR."""

    batch_form = BatchForm(
        (Part("images (B, ...)", 2, "float", at_least=True), Part("labels (B,)", 1, "int64")),
        "lightning_act.data.rotated_digits.RotatedDigitsDataModule",
    )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.batch_form.check(batch, batch_idx, type(self).__name__, "train")
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss if loss.requires_grad else None

    def _lr(self) -> float:
        """The peak learning rate: ``lr`` (what Lightning's LearningRateFinder callback sets)."""
        return self.hparams.lr

    def configure_optimizers(self) -> dict[str, Any] | None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        optimizer = torch.optim.AdamW(params, lr=self._lr(), weight_decay=self.hparams.weight_decay)
        schedule = WarmupCosineLR(optimizer, 0, schedule_steps(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        start_schedules(self, self._lr())

    def setup(self, stage: str) -> None:
        """Refuse rotated digits of another size than the network's input: else a bare "mat1 and mat2 shapes cannot
        be multiplied" at the first batch."""
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, RotatedDigitsDataModule):
            return
        data_size = datamodule.hparams.image_size
        inputs = next(m for m in self.model.modules() if isinstance(m, nn.Linear)).in_features
        if data_size * data_size != inputs:
            model_size = math.isqrt(inputs)
            raise ConfigError(
                f"{type(self).__name__}: the data gives {data_size} x {data_size} images (--data.image_size "
                f"{data_size}) but the network takes {model_size} x {model_size} ({inputs} inputs); "
                f"{self._image_size_fix(data_size, model_size)}"
            )

    def _image_size_fix(self, data_size: int, model_size: int) -> str:
        """How to make the data's image size and the network's agree (a phase may name its own setting too)."""
        return f"pass --data.image_size {model_size}"


class DopamineFoundation(_Classifier):
    """Phase 1: a small MLP pretrained on the 50/50 upright / rotated digit mix."""

    def __init__(
        self,
        image_size: int = 16,
        hidden_sizes: list[int] = [8],  # noqa: B006 - jsonargparse needs a plain default
        num_classes: int = 10,
        activation: str = "gelu",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        check_optimizer_args(lr, weight_decay)
        self.save_hyperparameters()
        self.model = build_mlp(image_size * image_size, list(hidden_sizes), num_classes, activation)
        self.init_metrics(num_classes)

    def _image_size_fix(self, data_size: int, model_size: int) -> str:
        return f"pass the same size to both, --model.image_size {data_size} (or --data.image_size {model_size})"


def load_foundation(foundation_ckpt: str | Path) -> DopamineFoundation:
    """The phase-1 module from its Lightning checkpoint, on CPU."""
    path = Path(foundation_ckpt)
    if not path.is_file():
        raise DataNotFoundError(
            f"foundation checkpoint '{path}' not found; run `lightning_act fit --config recipes/dopamine_foundation.yaml` "
            "first or pass --model.foundation_ckpt to an existing .ckpt"
        )
    try:  # tensors and plain values only: unpickling a file someone shared must not run its code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, or a zip reader error: a foreign or truncated file
        why = (
            "holds objects other than tensors and plain values (not unpickled: they could run code)"
            if "Weights only load failed" in str(error)
            else "is not a readable PyTorch file"
        )
        raise DataFormatError(
            f"'{path}' {why}; pass the phase-1 last.ckpt that `lightning_act fit` or Trainer.save_checkpoint wrote"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise DataFormatError(f"'{path}' is not a Lightning checkpoint with hyper-parameters; pass the phase-1 last.ckpt")
    # Rebuilt from the saved constructor arguments (LightningCLI adds private "_..." keys).
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    try:
        foundation = DopamineFoundation(**arguments)
        foundation.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as error:
        raise DataFormatError(
            f"'{path}' is not a DopamineFoundation checkpoint ({type(error).__name__}); pass the phase-1 last.ckpt"
        ) from error
    except LightningActError as error:  # a setting refused since it was saved (a negative weight_decay, round 26)
        raise DataFormatError(
            f"'{path}' holds a phase-1 setting this version refuses ({error}); fit phase 1 again with a valid one"
        ) from None
    data = checkpoint.get("datamodule_hyper_parameters")
    #: The foundation's datamodule arguments (None: fitted without a datamodule), for phase 2's split check.
    foundation.datamodule_settings = dict(data) if isinstance(data, dict) else None
    return foundation


def split_differences(foundation: dict[str, Any], phase2: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The split settings (:data:`_SPLIT_SETTINGS`) whose phase-2 value differs from the foundation's, as
    ``{name: (phase 2's, the foundation's)}``; none when the two draw from different images (bundled digits and
    MNIST), which share no digit."""
    if (foundation.get("mnist_dir") is None) != (phase2.get("mnist_dir") is None):
        return {}
    names = _SPLIT_SETTINGS if phase2.get("mnist_dir") is None else tuple(n for n in _SPLIT_SETTINGS if n != "test_fraction")
    return {name: (phase2.get(name), foundation.get(name)) for name in names if phase2.get(name) != foundation.get(name)}


class DopamineSpecialisation(_Classifier):
    """Phase 2: specialise the frozen foundation to the rotated mode with ``method``.

    ``lr`` defaults per method (:data:`DEFAULT_LR`). ``gate_form`` picks the Dopamine gate:
    ``"independent"`` (threshold, gain above and gain below it; the paper's gate with an independent
    gain, exact identity at init) or ``"coupled"`` (one number sets both scales). For
    ``"dopamine"`` the test and ``predict`` run with hard gates (``harden_at_test``); the test logs the per-class
    hard-gate firing fractions as a tensor (``dopamine_firing.pt``) and a heatmap
    (``dopamine_firing.png``, and a W&B image when a WandbLogger is attached) in the run
    directory; the end of ``fit`` writes the same for the validation set (``dopamine_firing_val``).
    """

    def __init__(
        self,
        foundation_ckpt: str,
        method: Method = "dopamine",
        lr: float | None = None,
        weight_decay: float = 0.0,
        slope: float = 5.0,
        tau_init: float = 0.0,
        gate_form: GateForm = "independent",
        lora_rank: int = 1,
        lora_alpha: float | None = None,
        harden_at_test: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise LightningActError(f"method {method!r} is unknown; pass one of {list(METHODS)}")
        check_optimizer_args(DEFAULT_LR[method] if lr is None else lr, weight_decay)
        self.save_hyperparameters()
        foundation = load_foundation(foundation_ckpt)
        #: The datamodule settings of the foundation whose weights this module runs: the file's, until a phase-2
        #: checkpoint restores its own foundation's (see on_load_checkpoint).
        self._foundation_data: dict[str, Any] | None = foundation.datamodule_settings
        self._split_unchecked_said = False
        self._split_check_left = False  # on_fit_start left the split check to the first hook past the restore
        # Read from the network, not foundation.hparams: under LightningCLI a module built inside
        # another module's __init__ records the outer module's hyper-parameters.
        self.model = foundation.model
        self.num_classes = int(self.model[-1].out_features)
        activation = next((type(m) for m in self.model if isinstance(m, tuple(_ACTIVATIONS.values()))), None)
        if activation is None and method in ("dopamine", "ia3"):
            raise LightningActError(
                f"the foundation has no hidden activation, so method {method!r} has nothing to adapt; train the "
                "foundation with at least one hidden layer (--model.hidden_sizes) or pick method full, lora or frozen"
            )
        if method == "dopamine":
            adapt_model(self.model, [activation], slope=slope, tau_init=tau_init, form=gate_form)
        elif method == "lora":
            apply_lora(self.model, [nn.Linear], rank=lora_rank, alpha=lora_alpha)
        elif method == "ia3":
            apply_ia3(self.model, [activation])
        elif method == "frozen":
            self.model.requires_grad_(False)
        self.trainable_params = count_trainable(self.model)
        self.init_metrics(self.num_classes)

    def _image_size_fix(self, data_size: int, model_size: int) -> str:
        return (
            f"pass --data.image_size {model_size}: phase 2 runs the foundation '{self.hparams.foundation_ckpt}', "
            f"built for {model_size} x {model_size} images"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the foundation's datamodule settings: the checkpoint holds that foundation's weights, while the file at
        ``foundation_ckpt`` may since have been replaced (a seed sweep over one path)."""
        checkpoint[_FOUNDATION_DATA_KEY] = self._foundation_data

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the split against the foundation the checkpoint's weights come from (a checkpoint from before
        round 27 does not record it: the file's, as before)."""
        if _FOUNDATION_DATA_KEY in checkpoint:
            self._restore_foundation_data(checkpoint[_FOUNDATION_DATA_KEY])
        self._check_split_left_by_fit_start()

    def _restore_foundation_data(self, trained_from: dict[str, Any] | None) -> None:
        """Take the checkpoint's foundation settings, saying in one line when the file's now differ."""
        if self._foundation_data is not None and trained_from is not None and self._foundation_data != trained_from:
            changed = ", ".join(
                f"{name}={self._foundation_data.get(name)!r} (was {trained_from.get(name)!r})"
                for name in sorted(self._foundation_data.keys() | trained_from.keys())
                if self._foundation_data.get(name) != trained_from.get(name)
            )
            rank_zero_warn(
                f"'{self.hparams.foundation_ckpt}' now holds a foundation fitted with other data settings ({changed}) "
                "than the one this checkpoint was specialised from; the checkpoint restores that one's weights, and "
                "the data split is checked against its settings",
                category=UserWarning,
            )
        self._foundation_data = trained_from

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Strategies that restore a --ckpt_path after setup (DeepSpeed, FSDP, ModelParallelStrategy) restore it after
        # this hook, and with it the checkpoint's foundation settings: check once the restore is past instead.
        self._split_check_left = self.trainer.strategy.restore_checkpoint_after_setup
        if not self._split_check_left:
            self._check_split()

    def _check_split_left_by_fit_start(self) -> None:
        """Check the split if on_fit_start left it to the first hook past the restore: on_load_checkpoint (with a
        --ckpt_path), else the sanity check's or the first validation, on_train_start or on_fit_end."""
        if self._split_check_left and self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            self._split_check_left = False
            self._check_split()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:
            self._check_split()
        self._check_split_left_by_fit_start()  # in a fit, on_fit_start checked unless it left the check

    def _check_split(self) -> None:
        """Refuse a rotated-digits split other than the foundation's: the digits of each split are drawn from the
        seed, the fractions and ``max_samples``, so another split validates (and, on the bundled digits, tests) the
        frozen foundation on digits it was trained on (before round 24, silently: 316 of 629 test digits for seed 1
        against seed 0). Run as a stage starts, not in ``setup``, which Lightning runs before it restores a
        ``--ckpt_path`` (and with it the foundation's settings); in a fit under a strategy that restores after
        on_fit_start, once past the restore (see _check_split_left_by_fit_start)."""
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, RotatedDigitsDataModule):
            return
        foundation = self._foundation_data
        if foundation is None or not all(name in foundation for name in _SPLIT_SETTINGS):
            if not self._split_unchecked_said:
                self._split_unchecked_said = True
                rank_zero_warn(
                    f"the foundation checkpoint '{self.hparams.foundation_ckpt}' records no RotatedDigitsDataModule "
                    "settings (fitted before they were saved, or without that datamodule), so whether this split's "
                    "validation and test digits are disjoint from its training digits cannot be checked; give both "
                    "phases the same --data.seed, val_fraction, test_fraction and max_samples",
                    category=UserWarning,
                )
            return
        differences = split_differences(foundation, dict(datamodule.hparams))
        if differences:
            here = ", ".join(f"{name}={mine!r}" for name, (mine, _) in differences.items())
            theirs = " ".join(f"--data.{name} {'null' if held is None else held}" for name, (_, held) in differences.items())
            # MNIST's test digits are its t10k files, never trained on: only the validation digits, cut from the
            # train files, can overlap there
            overlapping = "validation and test" if datamodule.hparams.mnist_dir is None else "validation"
            raise ConfigError(
                f"DopamineSpecialisation: the data split ({here}) is not the foundation's, so its {overlapping} digits "
                f"include digits '{self.hparams.foundation_ckpt}' was trained on; pass {theirs} (the foundation's), or "
                "train a foundation with these data settings"
            )

    def on_train_start(self) -> None:
        self._check_split_left_by_fit_start()
        self.log("trainable_params", float(self.trainable_params), sync_dist=True)  # a constant: silences Lightning's warning

    def on_test_start(self) -> None:
        self._check_split()
        if self.hparams.method == "dopamine" and self.hparams.harden_at_test:
            harden(self.model)

    def on_predict_start(self) -> None:
        """Predictions come from the model the test accuracy describes: hard gates, the paper's inference."""
        self.on_test_start()

    def on_predict_end(self) -> None:
        soften(self.model)

    def on_test_epoch_end(self) -> None:
        # a constant, the same on every rank: sync_dist averages equal values, and Lightning does not warn
        self.log("test/trainable_params", float(self.trainable_params), sync_dist=True)
        if self.hparams.method == "dopamine":
            fraction = self._log_attribution("test", "dopamine_firing", self.trainer.num_test_batches)
            self.log("test/gate_active_fraction", fraction, sync_dist=True)  # summed over ranks: the same on each

    def on_test_end(self) -> None:
        soften(self.model)

    def on_fit_end(self) -> None:
        self._check_split_left_by_fit_start()  # a fit that ran no step (max_steps reached) still writes the val firing
        if self.hparams.method == "dopamine" and self.trainer.val_dataloaders is not None:
            self._log_attribution("val", "dopamine_firing_val", self.trainer.num_val_batches)

    def _log_attribution(self, stage: Literal["val", "test"], name: str, limits: list[int | float] | None = None) -> float:
        """Hard-gate firing fractions per class over the ``stage`` loaders (each cut to its ``limits`` batches, as
        Lightning's ``limit_test_batches`` cuts the test metrics): ``<name>.pt`` + heatmap; returns their mean over
        the classes and neurons (each class weighs the same, whatever its number of inputs).

        Under DDP each rank holds a share of the inputs: the per-class firing counts and input counts are summed over
        the ranks before dividing, each input counted once (not the sampler's padding, see ``real_examples``), and
        rank 0 alone writes the files."""
        loaders = stage_loaders(self.trainer, stage)  # in dataloader_idx order, whatever collection was passed
        limits = list(limits or []) + [math.inf] * (len(loaders) - len(limits or []))
        class_counts = torch.zeros(self.num_classes, dtype=torch.float64)

        def real_batches() -> Any:
            for index, (loader, limit) in enumerate(zip(loaders, limits)):
                for batch_idx, (x, y) in enumerate(itertools.islice(loader, int(limit)) if math.isfinite(limit) else loader):
                    real = real_examples(self.trainer, stage, batch_idx, len(y), y.device, dataloader_idx=index)
                    if real.any():
                        class_counts.add_(torch.bincount(y[real].cpu(), minlength=self.num_classes).to(torch.float64))
                        yield x[real].to(self.device), y[real]

        hardened = [gate.hardened for gate in dopamine_gates(self.model).values()]
        harden(self.model)
        try:
            fractions = firing_fractions(self, real_batches(), self.num_classes)
        finally:
            for gate, was_hard in zip(dopamine_gates(self.model).values(), hardened):
                gate.hardened = was_hard
        if self.trainer.world_size > 1:
            fractions = self._summed_over_ranks(fractions, class_counts)
        if writes_run_files(self.trainer):  # not with logger=False, nor under fast_dev_run
            folder = run_dir(self.trainer)  # on every rank: trainer.log_dir broadcasts
            if self.trainer.is_global_zero:  # the ranks hold the same fractions: one writer per file
                figure = plot_firing_fractions(fractions, [str(c) for c in range(self.num_classes)],
                                               title=f"{name}: fraction of inputs with z > τ per class")
                log_figure(self.trainer, figure, folder / f"{name}.png")
                with written_whole(folder / f"{name}.pt") as partial:  # a kill leaves no file torch.load refuses
                    torch.save(fractions, partial)
        return float(torch.cat([f.nanmean(dim=0) for f in fractions.values()]).mean())

    def _summed_over_ranks(self, fractions: dict[str, torch.Tensor], class_counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fractions of the inputs of every rank, from this rank's ``fractions`` over its ``class_counts`` inputs
        per class: firing counts and input counts summed over the ranks (float64), then divided."""
        firing = [(fraction.nan_to_num(0.0) * class_counts[:, None]).flatten() for fraction in fractions.values()]
        totals = self.trainer.strategy.reduce(torch.cat([class_counts, *firing]).to(self.device), reduce_op="sum").cpu()
        counts, offset, combined = totals[: self.num_classes], self.num_classes, {}
        for gate, fraction in fractions.items():
            combined[gate] = totals[offset : offset + fraction.numel()].view_as(fraction) / counts[:, None]
            offset += fraction.numel()
        return combined  # a class no rank saw: 0 / 0, NaN as in firing_fractions

    def _lr(self) -> float:
        return self.hparams.lr if self.hparams.lr is not None else DEFAULT_LR[self.hparams.method]


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's directory (the first logger's folder, else ``default_root_dir``), created; ``~`` is the home folder, as
    where the loggers write."""
    path = Path(trainer.log_dir or trainer.default_root_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_figure(trainer: pl.Trainer, figure: Any, path: Path) -> None:
    """Save ``figure`` as ``path`` (a ``.png`` in the run dir), written whole, and send it to every logger that takes
    images, keyed by the file's name without its suffix."""
    save_png_whole(figure, path, dpi=100)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=path.stem, images=[str(path)])
