"""Round 26's reviews of its own fixes: a reused monitor says its warnings again on a resume and about
StochasticWeightAveraging's update pass; the evaluation padding warning is said once per batch sampler, not per
process; the report tells the loaders of an underscore-named key apart; a probe ended inside an EMA swap puts back an
embedding with ``max_norm`` too, and a probe undoes what a model's ``train()`` override changed in eval mode without
calling it again."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations
from lightning_act.errors import LightningActError
from lightning_act.report.html import _training_dash
from lightning_act.tasks.sampler_padding import real_examples


class Net(pl.LightningModule):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16) if norm else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.body(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batch_size: int, examples: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(examples, 8, generator=g), torch.randint(0, 4, (examples,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def said(fit: Any, start: str) -> list[str]:
    """The warnings ``fit()`` gives that start with ``start``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [str(w.message) for w in caught if str(w.message).startswith(start)]


def trainer(root: Path, max_steps: int, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=max_steps,
                      callbacks=callbacks, **kwargs)


def test_a_reused_monitor_resuming_another_run_says_what_a_fresh_one_says(tmp_path: Path) -> None:
    # Before: a resume returned before the warned sets were forgotten, and they are in no checkpoint: the reused
    # monitor stayed silent about a batch-size-1 tap (one row: no covariance) that a fresh instance names
    def collapse() -> DimensionalCollapse:
        return DimensionalCollapse(modules=["body.2"], every_n_steps=1, param_patterns=[])

    start = "DimensionalCollapse: body.2"
    reused = collapse()
    assert said(lambda: trainer(tmp_path / "a", 2, [reused]).fit(Net(), loader(1)), start)
    saving = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", 2, [collapse(), saving], enable_checkpointing=True).fit(Net(), loader(1))
    last = str(tmp_path / "b" / "last.ckpt")
    fresh = said(lambda: trainer(tmp_path / "c", 4, [collapse()]).fit(Net(), loader(1), ckpt_path=last), start)
    again = said(lambda: trainer(tmp_path / "d", 4, [reused]).fit(Net(), loader(1), ckpt_path=last), start)
    assert len(fresh) == 1 and again == fresh


def test_a_reused_monitor_says_the_averaging_update_pass_again_in_a_new_run(tmp_path: Path) -> None:
    # Before: the flag of StochasticWeightAveraging's batch-norm update pass was a bool the new run did not reset
    def run(monitor: ActivationSparsity, root: Path) -> list[str]:
        averaging = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=1)
        fit = trainer(root, -1, [monitor, averaging], max_epochs=2, enable_checkpointing=False)
        return said(lambda: fit.fit(Net(norm=True), loader(8, 16)), "ActivationSparsity: the training batches")

    reused = ActivationSparsity(modules=["body.2"], every_n_steps=1)
    first = run(reused, tmp_path / "a")
    assert len(first) == 1 and "run without backward" in first[0]
    assert run(reused, tmp_path / "b") == run(ActivationSparsity(modules=["body.2"], every_n_steps=1), tmp_path / "c")


class IndexSizePairs(Sampler):
    """A multi-scale batch sampler: ``(index, size)`` items, not dataset indices."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        indices = list(self.sampler)
        for start in range(0, len(indices), 4):
            yield [(i, 2) for i in indices[start : start + 4]]

    def __len__(self) -> int:
        return 2


class Sized(Dataset):
    def __len__(self) -> int:
        return 13  # rank 1 of 2 gets one repeat

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(item[1])


def test_the_padding_counted_twice_is_said_for_each_new_evaluation_loader() -> None:
    # Before: said once per batch sampler class per process: a second fit's metrics counted the repeats unsaid
    counts = []
    for _ in range(2):
        sampler = IndexSizePairs(DistributedSampler(Sized(), num_replicas=2, rank=1, shuffle=False))
        fit = SimpleNamespace(val_dataloaders=DataLoader(Sized(), batch_sampler=sampler), test_dataloaders=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert bool(real_examples(fit, "val", 0, 4).all())  # kept whole: the repeat counts
            assert bool(real_examples(fit, "val", 1, 4).all())  # the same pass: not said again
        counts.append(sum("cannot be told apart" in str(w.message) for w in caught))
    assert counts == [1, 1]


def test_each_loader_of_an_underscore_named_key_gets_its_own_dash() -> None:
    # Before: val_loss/dataloader_idx_N read as kind "val_loss": every loader dotted, alike in one figure
    dashes = [_training_dash(f"val_loss/dataloader_idx_{i}") for i in range(4)]
    assert len(set(dashes)) == 4
    assert _training_dash("fold1-val/loss/dataloader_idx_1") == dashes[1]
    assert (_training_dash("train_loss"), _training_dash("train/loss"), _training_dash("val_acc")) == ("solid", "solid", "dash")
    assert _training_dash("lr-AdamW") == "dot"


class EmaSwapWithRenormedEmbedding(pl.LightningModule):
    """From step 3 on, an eval forward swaps EMA weights in by ``p.data`` and back at its end (which a probe ended
    after its last tap skips), with an embedding whose lookups renormalise its rows (``max_norm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8, max_norm=1.0)
        self.block0, self.block1, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.ema = [p.detach().clone() for p in self.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swap = not self.training and self._trainer is not None and self.trainer.global_step >= 3
        kept = [p.data for p in self.parameters()]
        if swap:
            for p, average in zip(self.parameters(), self.ema, strict=True):
                p.data = average
        out = self.head(torch.tanh(self.block1(torch.tanh(self.block0(self.emb(x))))).mean(1))
        if swap:
            for p, data in zip(self.parameters(), kept, strict=True):
                p.data = data
        return out

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():
            for average, p in zip(self.ema, self.parameters(), strict=True):
                average.mul_(0.9).add_(p, alpha=0.1)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_a_probe_ended_inside_an_ema_swap_puts_back_a_max_norm_embeddings_weight_too() -> None:
    # Before (this round's first version): the embedding's weight was left out of the rebinding check, stayed bound
    # to its EMA copy, and the EMA update then wrote the training weight
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 16, (64, 5), generator=g), torch.randint(0, 2, (64,), generator=g))

    def fit(callbacks: list[pl.Callback]) -> EmaSwapWithRenormedEmbedding:
        torch.manual_seed(0)
        task = EmaSwapWithRenormedEmbedding()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cutoff's "runs whole" line
            quiet_trainer(max_steps=8, callbacks=callbacks).fit(task, DataLoader(data, batch_size=8),
                                                                DataLoader(data, batch_size=8))
        return task

    plain, task = fit([]), fit([MassiveActivations(modules=["block0"], every_n_steps=1, probe="val")])
    assert not [n for (n, p), average in zip(task.named_parameters(), task.ema, strict=True)
                if p.data_ptr() == average.data_ptr()]
    for (name, expected), (_, p) in zip(plain.named_parameters(), task.named_parameters(), strict=True):
        assert torch.equal(p, expected), name


class BackboneFrozenOutOfTraining(ToyTask):
    """A ``train()`` override that does more than set flags: the backbone has gradients in training mode only."""

    def train(self, mode: bool = True) -> BackboneFrozenOutOfTraining:
        super().train(mode)
        self.net.blocks.requires_grad_(mode)
        return self

    def on_validation_model_train(self) -> None:  # Lightning's hook after validation: the override runs again
        self.train()


def test_a_probe_undoes_what_a_train_override_changed_and_training_is_unchanged() -> None:
    # Before (this round's first version): the probe's eval() froze the backbone, and only the flags were restored
    def fit(callbacks: list[pl.Callback]) -> BackboneFrozenOutOfTraining:
        torch.manual_seed(0)
        task = BackboneFrozenOutOfTraining(BlockNet())
        quiet_trainer(max_steps=4, callbacks=callbacks, limit_val_batches=1, val_check_interval=2,
                      num_sanity_val_steps=1).fit(task, DataLoader(toy_dataset(64), batch_size=8),
                                                  DataLoader(toy_dataset(8, seed=1), batch_size=8))
        return task

    plain, monitored = fit([]), fit([MassiveActivations(modules=["net.blocks.0"], every_n_steps=1, probe="val")])
    for (name, expected), (_, p) in zip(plain.named_parameters(), monitored.named_parameters(), strict=True):
        assert p.requires_grad and torch.equal(p, expected), name


def test_modules_seeding_torch_alone_take_a_negative_seed() -> None:
    # Before (this round's first version): refused as if numpy seeded them; torch generators take any whole number
    from lightning_act.data.modular_addition import ModularAdditionDataModule
    from lightning_act.data.stdlib_text import StdlibTextDataModule

    assert ModularAdditionDataModule(p=7, seed=-1).seed == -1
    assert StdlibTextDataModule(seed=-1).seed == -1
    with pytest.raises(LightningActError, match=r"seed=1.5 must be a whole number; pass"):
        ModularAdditionDataModule(p=7, seed=1.5)


def test_an_unused_test_fraction_is_not_refused_with_the_validation_share(tmp_path: Path) -> None:
    # Before (this round's first version): val 0.5 + test 0.6 refused at construction, although an image folder with
    # train/ alone, CIFAR files or an mnist_dir split off no test set; a split that uses both still refuses the sum
    from lightning_act.data.images import ImageDataModule
    from lightning_act.data.rotated_digits import RotatedDigitsDataModule

    ImageDataModule(val_fraction=0.5, test_fraction=0.6)
    RotatedDigitsDataModule(mnist_dir=str(tmp_path), val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(LightningActError, match="sum to < 1"):
        ImageDataModule(val_fraction=0.5, test_fraction=0.6).setup("fit")  # the bundled digits: both are used
    with pytest.raises(LightningActError, match="sum to < 1"):
        RotatedDigitsDataModule(val_fraction=0.5, test_fraction=0.6)  # the bundled digits, at construction


def test_the_std_example_has_one_value_per_channel() -> None:
    # Before (this round's first version): three values suggested for a one-channel recipe, which then refused them
    from lightning_act.data.images import ImageDataModule

    with pytest.raises(LightningActError, match=r"pass e.g. --data.std \[0.5\]$"):
        ImageDataModule(in_chans=1, mean=[0.5], std=[0.0])


def test_a_transformer_without_blocks_is_a_baseline_that_trains() -> None:
    # Before (this round's first version): depth=0 refused; it is embeddings, norm and head
    from lightning_act.models.small_transformer import SmallTransformer

    model = SmallTransformer(vocab_size=11, max_len=6, dim=8, depth=0, num_heads=2)
    logits = model(torch.randint(0, 11, (3, 6)))
    assert logits.shape == (3, 6, 11) and len(model.blocks) == 0
    logits.sum().backward()
    assert model.token_embed.weight.grad is not None


def test_the_compact_mean_of_layer_values_near_the_float_limit_is_their_mean() -> None:
    # Before: math.fsum of finite values past ~1.8e308 raised OverflowError inside the logging call, ending the fit
    from lightning_act.loggers import compact_metrics

    kept, _ = compact_metrics({"act/blocks.0/rms": 1e308, "act/blocks.1/rms": 1e308, "act/blocks.2/rms": 4e307})
    assert kept["act/mean/rms"] == pytest.approx(8e307)  # (1e308 + 1e308 + 4e307) / 3, its sum past the float range


class FrozenByFinetuning(pl.LightningModule):
    """The same override, with Lightning's ``BaseFinetuning`` freezing the backbone (no validation in the fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def train(self, mode: bool = True) -> FrozenByFinetuning:
        super().train(mode)
        self.blocks.requires_grad_(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class FreezeBlocks(BaseFinetuning):
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.blocks)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        pass  # frozen for the whole fit


def test_a_probe_leaves_a_backbone_frozen_by_finetuning_frozen() -> None:
    # Before (this round's second version): the probe called the train() override again with True, which unfroze the
    # backbone BaseFinetuning had frozen: it trained from the first probe on
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))

    def fit(callbacks: list[pl.Callback]) -> FrozenByFinetuning:
        torch.manual_seed(0)
        task = FrozenByFinetuning()
        quiet_trainer(max_steps=6, callbacks=[FreezeBlocks(), *callbacks]).fit(
            task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        return task

    plain, monitored = fit([]), fit([MassiveActivations(modules=["blocks.0"], every_n_steps=1, probe="val")])
    assert not monitored.blocks[0].weight.requires_grad
    for (name, expected), (_, p) in zip(plain.state_dict().items(), monitored.state_dict().items(), strict=True):
        assert torch.equal(p, expected), name


@dataclasses.dataclass(eq=True)
class PairsDataclass(Sampler):
    """The same batch sampler as a dataclass, which does not hash (``eq`` without ``frozen``): keyed by the sampler,
    this round's second version raised TypeError in the evaluation step."""

    sampler: Sampler

    def __iter__(self) -> Any:
        return IndexSizePairs(self.sampler).__iter__()

    def __len__(self) -> int:
        return 2


def test_the_padding_warning_takes_a_batch_sampler_that_does_not_hash() -> None:
    sampler = PairsDataclass(DistributedSampler(Sized(), num_replicas=2, rank=1, shuffle=False))
    fit = SimpleNamespace(val_dataloaders=DataLoader(Sized(), batch_sampler=sampler), test_dataloaders=None)
    with pytest.warns(UserWarning, match="cannot be told apart"):
        assert bool(real_examples(fit, "val", 0, 4).all())


def test_a_foundation_checkpoint_holding_a_setting_now_refused_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # Before: a phase-1 checkpoint saved with weight_decay < 0 (accepted before round 26) raised the construction
    # check's line unwrapped, naming a --model flag that sets phase 2's own argument, not the checkpoint's
    from lightning_act.errors import DataFormatError
    from lightning_act.tasks.dopamine import DopamineFoundation, load_foundation

    foundation = DopamineFoundation(image_size=4, hidden_sizes=[4])
    hyper_parameters = {**dict(foundation.hparams), "weight_decay": -1.0}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": foundation.state_dict(), "hyper_parameters": hyper_parameters}, path)
    with pytest.raises(DataFormatError, match=r"last.ckpt' holds a phase-1 setting this version refuses \(weight_decay"):
        load_foundation(path)
    torch.save({"state_dict": foundation.state_dict(), "hyper_parameters": dict(foundation.hparams)}, path)
    assert isinstance(load_foundation(path), DopamineFoundation)
