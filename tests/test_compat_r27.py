"""Round 27: checkpoints of the first versions (state keys holding ``every_n_steps``), a mid-epoch resume under manual
optimization with two optimizer steps per batch, and padded dict batches. Each test fails on the code before."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl
from _toy import ReluClassifier, quiet_trainer, relu_classifier_loader
from lightning_act.callbacks import ActivationSparsity, MassiveActivations, SensitiveNeurons
from lightning_act.checkpointing import LastCheckpoint


def fit(callbacks: list[pl.Callback], ckpt: Path | None = None, save_to: Path | None = None, **trainer: Any) -> list[str]:
    """8 steps (4 per epoch) of ``ReluClassifier``; ``save_to``: the checkpoint at step 4 as ``save_to/sstep=4.ckpt``."""
    extra = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=4, save_top_k=-1, filename="s{step}")] if save_to else []
    pl.seed_everything(0, verbose=False)
    options = dict(max_steps=8, callbacks=[*callbacks, *extra], enable_checkpointing=bool(save_to))
    options.update(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(**options).fit(ReluClassifier(), relu_classifier_loader(), ckpt_path=ckpt)
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------ 1. state keys of the first versions
def monitors() -> list[pl.Callback]:
    tracking = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    return [ActivationSparsity(modules=["act1"], every_n_steps=1),
            SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=tracking, window=2)]


def as_first_versions(ckpt: Path, out: Path) -> Path:
    """The checkpoint with each monitor's state under the key the first versions wrote (before 2563b49):
    ``Kind{'modules': [...as spelled], 'every_n_steps': N}``."""
    checkpoint = torch.load(ckpt, weights_only=False)
    renamed = {}
    for key, state in checkpoint["callbacks"].items():
        kind = key.partition("{")[0]
        if kind in ("ActivationSparsity", "SensitiveNeurons"):
            key = f"{kind}{{'modules': ['act1'], 'every_n_steps': 1}}"
        renamed[key] = state
    checkpoint["callbacks"] = renamed
    torch.save(checkpoint, out)
    return out


def test_state_keyed_on_every_n_steps_continues_every_monitor(tmp_path: Path) -> None:
    """Histories (and SeND's window) continue as the uninterrupted run's; they were dropped with a warning that
    blamed "other modules" although the modules were the same."""
    uninterrupted = monitors()
    fit(uninterrupted)
    fit(monitors(), save_to=tmp_path / "part")
    old = as_first_versions(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt")
    resumed = monitors()
    said = fit(resumed, ckpt=old)
    assert not [m for m in said if "other modules" in m]
    for full, res in zip(uninterrupted, resumed, strict=True):
        assert sorted(res.history) == sorted(full.history)
        for key, series in full.history.items():
            assert res.history[key].steps == series.steps, key
            np.testing.assert_allclose(res.history[key].values, series.values, rtol=1e-6, atol=1e-9, err_msg=key)
    assert resumed[1].checkpoints == uninterrupted[1].checkpoints


def test_state_of_other_modules_keyed_on_every_n_steps_still_says_other_modules(tmp_path: Path) -> None:
    fit([ActivationSparsity(modules=["act1"], every_n_steps=1)], save_to=tmp_path / "part")
    old = as_first_versions(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt")
    resumed = ActivationSparsity(modules=["fc1"], every_n_steps=1)
    said = fit([resumed], ckpt=old)
    assert len([m for m in said if "other modules" in m]) == 1
    assert all(series.steps[0] == 4 for series in resumed.history.values())


# ------------------------------------------------------------------ 2. mid-epoch resume, two optimizer steps a batch
class BatchIndexed(Dataset):
    """16 rows, 4 a batch; the second column holds the batch's index in the epoch."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)), torch.tensor(i // 4)


class TwoOptimizerSteps(pl.LightningModule):
    """A critic's and a model's optimizer step per batch (STAN's SeizureForecaster)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.critic = nn.Linear(4, 1), nn.Linear(4, 1)
        self.batches: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.batches.append(int(batch[1][0]))
        model_opt, critic_opt = self.optimizers()
        for opt, net in ((critic_opt, self.critic), (model_opt, self.model)):
            opt.zero_grad()
            self.manual_backward(net(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return (torch.optim.SGD(self.model.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01))


class OneOptimizerStep(TwoOptimizerSteps):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batches.append(int(batch[1][0]))
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.01)


def fit_to(model: pl.LightningModule, max_steps: int, folder: Path, ckpt: Path | None = None) -> list[str]:
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[LastCheckpoint(dirpath=folder)], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(BatchIndexed(), batch_size=4), ckpt_path=ckpt)
    return [str(w.message) for w in caught if "first batches again" in str(w.message) or "not resumable" in str(w.message)]


def test_mid_epoch_resume_with_two_optimizer_steps_a_batch_says_the_epoch_restarts(tmp_path: Path) -> None:
    """2 of 4 batches done = global_step 4, a multiple of Lightning's 4 optimizer steps an epoch: Lightning says
    nothing, and the resumed fit trains on batches 0 and 1 again (the documented behaviour); one line says so."""
    fit_to(TwoOptimizerSteps(), 4, tmp_path)
    resumed = TwoOptimizerSteps()
    said = fit_to(resumed, 8, tmp_path, ckpt=tmp_path / "last.ckpt")
    assert resumed.batches == [0, 1]
    assert len(said) == 1 and "after 2 of its epoch's 4 training batches" in said[0]


def test_mid_epoch_resume_lightning_warns_of_is_said_once(tmp_path: Path) -> None:
    fit_to(OneOptimizerStep(), 2, tmp_path)
    said = fit_to(OneOptimizerStep(), 4, tmp_path, ckpt=tmp_path / "last.ckpt")
    assert len(said) == 1 and "not resumable" in said[0]  # Lightning's own


def test_end_of_epoch_resume_with_two_optimizer_steps_a_batch_says_nothing(tmp_path: Path) -> None:
    fit_to(TwoOptimizerSteps(), 8, tmp_path)
    assert fit_to(TwoOptimizerSteps(), 12, tmp_path, ckpt=tmp_path / "last.ckpt") == []


# ------------------------------------------------------------------ 3. padded dict batches
class TokenNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.act, self.head = nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head(self.act(self.embed(batch["input_ids"]))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def padded_batches(pad_in_batch: int | None) -> list[dict[str, torch.Tensor]]:
    """4 batches of (2, 5) token ids; batch ``pad_in_batch`` has a sequence of 3 tokens and 2 pads."""
    batches = []
    for i in range(4):
        mask = torch.ones(2, 5, dtype=torch.long)
        if i == pad_in_batch:
            mask[1, 3:] = 0
        batches.append({"input_ids": torch.arange(10).reshape(2, 5) * mask, "attention_mask": mask})
    return batches


def padding_warnings(pad_in_batch: int | None, every_n_steps: int = 1, accelerator: str = "cpu") -> list[str]:
    monitors = [ActivationSparsity(modules=["act"], every_n_steps=every_n_steps),
                MassiveActivations(modules=["act"], every_n_steps=every_n_steps)]
    trainer = quiet_trainer(max_steps=4, callbacks=monitors, accelerator=accelerator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TokenNet(), DataLoader(padded_batches(pad_in_batch), batch_size=None))
    return [str(w.message) for w in caught if "attention_mask" in str(w.message)]


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_padded_dict_batch_of_a_due_step_is_said_once_per_monitor(accelerator: str) -> None:
    # on CUDA the flag reaches the host without a sync (pinned copy and an event), read at a later due step or at
    # the fit's end: said all the same, naming the step it was seen at
    said = padding_warnings(pad_in_batch=2, accelerator=accelerator)
    assert len(said) == 2
    assert said[0].startswith("ActivationSparsity: the training batch at step 2 holds padding (its attention_mask")
    assert said[1].startswith("MassiveActivations: the training batch at step 2")


def test_batches_without_padding_or_padding_off_due_steps_say_nothing() -> None:
    assert padding_warnings(pad_in_batch=None) == []
    assert padding_warnings(pad_in_batch=1, every_n_steps=2) == []  # steps 0 and 2 are due


# ------------------------------------------------------------------ review fixes (R2)
def test_resume_of_an_epoch_lightning_closed_says_it_skips_not_replays(tmp_path: Path) -> None:
    """A fit ended inside an epoch by max_steps: Lightning counts the epoch finished, and the resume (max_epochs)
    starts the next one on all its batches; the line said the resumed epoch trained on its first batches again."""
    first = quiet_trainer(max_steps=4, enable_checkpointing=False)
    first.fit(TwoOptimizerSteps(), DataLoader(BatchIndexed(), batch_size=4))  # 2 of epoch 0's 4 batches
    first.save_checkpoint(tmp_path / "final.ckpt")
    resumed = TwoOptimizerSteps()
    trainer = quiet_trainer(max_epochs=2, callbacks=[LastCheckpoint(dirpath=tmp_path / "lc")], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(resumed, DataLoader(BatchIndexed(), batch_size=4), ckpt_path=tmp_path / "final.ckpt")
    said = [str(w.message) for w in caught if str(w.message).startswith("LastCheckpoint")]
    assert resumed.batches == [0, 1, 2, 3] and trainer.current_epoch == 2  # epoch 1 whole; epoch 0's 2, 3 never
    assert len(said) == 1 and "starts the next epoch and never trains on the batches left" in said[0]


class Unsized(torch.utils.data.IterableDataset):
    """4 batches of 4 rows, no __len__; the second column holds the batch's index."""

    def __iter__(self) -> Any:
        for i in range(16):
            yield torch.full((4,), float(i)), torch.tensor(i // 4)


def test_mid_epoch_resume_of_a_loader_without_length_is_said(tmp_path: Path) -> None:
    """Lightning skips its check without a length: the resumed epoch 0 trained all 4 batches again, silently."""
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="s{step}")
    quiet_trainer(max_steps=8, callbacks=[saves], enable_checkpointing=True).fit(
        OneOptimizerStep(), DataLoader(Unsized(), batch_size=4))
    resumed = OneOptimizerStep()
    trainer = quiet_trainer(max_epochs=2, callbacks=[LastCheckpoint(dirpath=tmp_path / "lc")], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(resumed, DataLoader(Unsized(), batch_size=4), ckpt_path=tmp_path / "sstep=2.ckpt")
    said = [str(w.message) for w in caught if "LastCheckpoint" in str(w.message) or "resumable" in str(w.message)]
    assert resumed.batches == [0, 1, 2, 3, 0, 1, 2, 3]  # batches 0, 1 of epoch 0 twice in all
    assert len(said) == 1 and "from its first again, to its end" in said[0]


def test_resume_of_an_unsized_loader_from_a_closed_epoch_is_said(tmp_path: Path) -> None:
    quiet_trainer(max_steps=2, callbacks=[LastCheckpoint(dirpath=tmp_path)], enable_checkpointing=True).fit(
        OneOptimizerStep(), DataLoader(Unsized(), batch_size=4))
    resumed = OneOptimizerStep()
    said = fit_to_said(resumed, tmp_path)
    assert resumed.batches == [0, 1, 2, 3]  # epoch 1; epoch 0's batches 2, 3 never trained
    assert len(said) == 1 and "after 2 of its epoch's training batches" in said[0]


def fit_to_said(model: pl.LightningModule, folder: Path) -> list[str]:
    trainer = quiet_trainer(max_epochs=2, callbacks=[LastCheckpoint(dirpath=folder / "b")], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(Unsized(), batch_size=4), ckpt_path=folder / "last.ckpt")
    return [str(w.message) for w in caught if str(w.message).startswith("LastCheckpoint")]


def masked(mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.arange(10).reshape(2, 5), "attention_mask": mask} for _ in range(4)]


def fit_padding_warnings(batches: list[Any], monitor: pl.Callback | None = None) -> list[str]:
    monitor = monitor or ActivationSparsity(modules=["act"], every_n_steps=1)
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TokenNet(), DataLoader(batches, batch_size=None))
    return [str(w.message) for w in caught if "attention_mask" in str(w.message)]


def test_additive_float_mask_is_padded_only_where_very_negative() -> None:
    """An additive mask (0.0 attended, -1e9/-inf/-1e4 masked) without padding was said to be padded everywhere."""
    keep = torch.ones(2, 5)
    keep[1, 3:] = 0
    assert fit_padding_warnings(masked(torch.zeros(2, 5))) == []
    assert fit_padding_warnings(masked(torch.full((2, 5), -0.0))) == []
    for pad in (-1e9, float("-inf"), -10000.0):
        assert len(fit_padding_warnings(masked(torch.where(keep > 0, 0.0, pad)))) == 1, pad
    bf16_mask = ((1.0 - keep) * -10000.0).to(torch.bfloat16).float()  # -9984: Hugging Face's older form in bfloat16
    assert len(fit_padding_warnings(masked(bf16_mask))) == 1
    assert len(fit_padding_warnings(masked(keep))) == 1  # a float 1/0 mask, Hugging Face's convention
    assert len(fit_padding_warnings(masked(keep.bool()))) == 1  # bool: True where a token is
    assert fit_padding_warnings(masked(torch.ones(2, 5, dtype=torch.bool))) == []
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1).expand(2, 1, 5, 5)  # no padding, 4-D
    assert fit_padding_warnings(masked(causal)) == []


def test_padding_seen_by_a_probe_batch_is_said_once() -> None:
    """MassiveActivations(probe="val") measures the validation batches: their padding was never said."""
    val_mask = torch.ones(2, 5, dtype=torch.long)
    val_mask[1, 3:] = 0

    class ProbedTokenNet(TokenNet):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.embed(ids)))

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            pass

    def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"])

    monitor = MassiveActivations(modules=["act"], every_n_steps=1, probe="val", probe_batches=1, forward_fn=forward_fn)
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor], limit_val_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ProbedTokenNet(), DataLoader(masked(torch.ones(2, 5, dtype=torch.long)), batch_size=None),
                    DataLoader(masked(val_mask), batch_size=None))
    said = [str(w.message) for w in caught if "attention_mask" in str(w.message)]
    assert monitor.history
    assert len(said) == 1
    assert said[0].startswith("MassiveActivations: a probe batch holds padding (its attention_mask masks")


def test_key_of_first_versions_naming_unimportable_modules_is_skipped_without_import() -> None:
    monitor = ActivationSparsity(modules=["act1"], every_n_steps=1)
    states = {"ActivationSparsity{'modules': ['.Foo'], 'every_n_steps': 1}": {},
              "ActivationSparsity{'modules': ['..X'], 'every_n_steps': 1}": {},
              "ActivationSparsity{'modules': ['not_a_module_r27.Layer'], 'every_n_steps': 1}": {},
              "ActivationSparsity{'modules': ['act1'], 'every_n_steps': 1}": {}}
    assert monitor._saved_key_of_same_modules(states) == "ActivationSparsity{'modules': ['act1'], 'every_n_steps': 1}"
    assert "not_a_module_r27" not in sys.modules
    by_class = ActivationSparsity(modules=[nn.ReLU], every_n_steps=1)
    for spelled in ("torch.nn.ReLU", "<class 'torch.nn.modules.activation.ReLU'>", "ReLU"):
        key = f"ActivationSparsity{{'modules': [{spelled!r}], 'every_n_steps': 1}}"
        assert by_class._saved_key_of_same_modules({key: {}}) == key, spelled
    assert by_class._saved_key_of_same_modules({"ActivationSparsity{'modules': ['torch.nn.GELU']}": {}}) is None


def test_state_lightning_listed_under_a_first_versions_key_is_said_restored(tmp_path: Path) -> None:
    fit([ActivationSparsity(modules=["act1"], every_n_steps=1)], save_to=tmp_path / "part")
    old = as_first_versions(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt")
    resumed = ActivationSparsity(modules=["act1"], every_n_steps=1)
    said = fit([resumed], ckpt=old)
    old_key = "ActivationSparsity{'modules': ['act1'], 'every_n_steps': 1}"
    assert [m for m in said if "Please add the following callbacks" in m and old_key in m]  # Lightning's, first
    restored = [m for m in said if "is this monitor's" in m]
    assert len(restored) == 1 and old_key in restored[0] and "is restored for it" in restored[0]
    assert all(series.steps[0] == 0 for series in resumed.history.values())


def test_padding_on_a_rank_other_than_zero_is_said_by_that_rank(monkeypatch: Any) -> None:
    """Each rank checks its own batch: padding seen on rank 1 alone was said by no rank (rank_zero_warn)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_act.callbacks import base

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(base, "distributed_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monitor = ActivationSparsity(modules=["act"], every_n_steps=1)
    monitor._padding_warned, monitor._padding_check = set(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (0, 1):
            monitor._check_padding(masked(torch.tensor([[1, 1, 1], [1, 0, 0]]))[0], step)
            monitor._read_padding_check()
    said = [str(w.message) for w in caught]
    assert said == [said[0]] and said[0].startswith("ActivationSparsity: the training batch at step 0 of rank 1 holds")


def test_a_module_name_ending_as_this_monitors_module_is_not_taken_for_it(tmp_path: Path) -> None:
    """R7: a resumed monitor of ``act1`` took the state saved for ``blocks.act1``-style names (the last part read as
    a class name), continuing another module's histories; its key was said to be a first-versions one."""
    fit([ActivationSparsity(modules=["act1"], every_n_steps=1)], save_to=tmp_path / "part")
    checkpoint = torch.load(tmp_path / "part" / "sstep=4.ckpt", weights_only=False)
    checkpoint["callbacks"] = {key.replace("'act1'", "'body.act1'"): state for key, state in checkpoint["callbacks"].items()}
    torch.save(checkpoint, tmp_path / "other.ckpt")
    resumed = ActivationSparsity(modules=["act1"], every_n_steps=1)
    said = fit([resumed], ckpt=tmp_path / "other.ckpt")
    assert len([m for m in said if "other modules" in m]) == 1
    assert all(series.steps == [4, 5, 6, 7] for series in resumed.history.values())


def test_an_epoch_that_ended_at_its_last_batch_resumes_without_a_line(tmp_path: Path) -> None:
    """R7: after an epoch that ended normally, a resume with a loader of another length (or without one) was told
    that batches were skipped or replayed; the resumed fit trains exactly the next epoch."""
    quiet_trainer(max_epochs=1, callbacks=[LastCheckpoint(dirpath=tmp_path)], enable_checkpointing=True).fit(
        OneOptimizerStep(), DataLoader(Unsized(), batch_size=4))
    resumed = OneOptimizerStep()
    assert fit_to_said(resumed, tmp_path) == [] and resumed.batches == [0, 1, 2, 3]
    quiet_trainer(max_epochs=1, callbacks=[LastCheckpoint(dirpath=tmp_path / "sized")], enable_checkpointing=True).fit(
        OneOptimizerStep(), DataLoader(BatchIndexed(), batch_size=8))  # 2 batches of 8
    resumed = OneOptimizerStep()
    trainer = quiet_trainer(max_epochs=2, callbacks=[LastCheckpoint(dirpath=tmp_path / "c")], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(resumed, DataLoader(BatchIndexed(), batch_size=4), ckpt_path=tmp_path / "sized" / "last.ckpt")
    assert not [w for w in caught if str(w.message).startswith("LastCheckpoint")]
    assert resumed.batches == [0, 1, 2, 3]  # epoch 1 whole, in batches of 4
