"""Round 26: a probe forward's kept parameter write under DDP (2 CPU processes, gloo: every rank runs the probe
forwards, so the replicas stay equal), the probe warnings said per model or loader instead of once per process, and
the constructor checks of SensitiveNeurons' flags and input_key and of MassiveActivations' top_k. The DDP test reads
its fit, scenario ``late_writer`` of ddp_scenarios.py."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from _toy import BlockNet, ToyTask, quiet_trainer, toy_dataset
from lightning_act.callbacks import MassiveActivations, SensitiveNeurons
from lightning_act.callbacks.probe import without_sampler_padding
from lightning_act.errors import LightningActError

PROBES = 5  # due steps, one probe forward each; the write begins at the 4th, after the model's 3 quiet probes


class LateWriter(BlockNet):
    """Adds 1 to its head's bias in place in eval mode from its 4th eval forward on: the probe's trusted-quiet path
    keeps the write (documented, said once)."""

    def __init__(self) -> None:
        super().__init__()
        self.evals = [0]  # not a plain attribute, which the probe puts back with a parameter it puts back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.evals[0] += 1
            if self.evals[0] > 3:
                with torch.no_grad():
                    self.head.bias.add_(1.0)
        return super().forward(x)


@pytest.mark.ddp_scenario("late_writer")
def test_a_probe_write_that_is_kept_is_kept_on_every_ddp_rank(ddp_scenario) -> None:
    # Before: identical probe batches ran on rank 0 alone, so the write went to rank 0's head.bias alone (+2 after 5
    # probes) and the DDP replicas silently diverged.
    rank0, rank1 = (ddp_scenario.json(f"late_writer.{rank}.json") for rank in range(2))
    assert rank0["weights"] == rank1["weights"]  # DDP's invariant: every replica holds the same weights
    assert rank0["evals"] == rank1["evals"] == PROBES  # every probe forward ran on both ranks
    # the 4th probe's write is kept (the 5th's put back: the model writes, so it is watched): +1 on every logit, which
    # cross-entropy does not see, so the rest of training is the unmonitored fit's
    for name, weight in rank0["weights"].items():
        expected = np.array(rank0["unmonitored"][name]) + (name == "head.bias")
        np.testing.assert_allclose(np.array(weight), expected, rtol=0, atol=1e-6, err_msg=name)
    for result in (rank0, rank1):  # measured once, on rank 0: the one-process count of the probe batch
        assert result["count"] == [8 * 4 * 16] * PROBES  # abs/ratio thresholds 0: every entry of the (8, 4, 16) tap


def late_writer(out: Path) -> None:
    def fit(callbacks: list[pl.Callback]) -> tuple[LateWriter, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        net = LateWriter()
        trainer = quiet_trainer(max_steps=PROBES, devices=2, strategy="ddp", callbacks=callbacks)
        trainer.fit(ToyTask(net), DataLoader(toy_dataset(80), batch_size=8),
                    DataLoader(toy_dataset(8, seed=1), batch_size=8))
        return net, trainer

    plain, _ = fit([])
    massive = MassiveActivations(modules=["net.blocks.0"], every_n_steps=1, probe="val", abs_threshold=0.0,
                                 ratio_threshold=0.0)
    net, trainer = fit([massive])
    result = {
        "weights": {name: p.detach().double().tolist() for name, p in net.named_parameters()},
        "unmonitored": {name: p.detach().double().tolist() for name, p in plain.named_parameters()},
        "evals": net.evals[0],
        "count": massive.history["massive/net.blocks.0/count"].values,
    }
    (out / f"late_writer.{trainer.global_rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------ warnings said per model
class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _CountsEvals(_Net):
    """Counts its eval forwards in place in a buffer larger than the probes copy (watched by version, kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("evals", torch.zeros(20000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.evals.add_(1)
        return super().forward(x)


class _SwapsEma(_Net):
    """Evaluates with EMA weights swapped in by ``p.data`` and the training weights swapped back after."""

    def __init__(self) -> None:
        super().__init__()
        self.ema = [p.detach().clone() for p in self.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        kept = [p.data for p in self.parameters()]
        for p, ema in zip(self.parameters(), self.ema, strict=True):
            p.data = ema
        out = super().forward(x)
        for p, data in zip(self.parameters(), kept, strict=True):
            p.data = data
        return out


def _said(model: pl.LightningModule, words: str) -> int:
    """How many warnings with ``words`` a 2-step fit of ``model`` with a new probing monitor gives."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[MassiveActivations(modules=["blocks.0"], every_n_steps=1, probe="val")]
                      ).fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return sum(words in str(w.message) for w in caught)


def test_a_large_buffer_a_probe_writes_is_said_for_each_new_model() -> None:
    # Before: said once per buffer name per process: the second model's buffer kept the probe's writes unsaid.
    first, second = _CountsEvals(), _CountsEvals()
    assert [_said(first, "wrote the buffer 'evals'"), _said(second, "wrote the buffer 'evals'")] == [1, 1]
    assert float(first.evals[0]) == float(second.evals[0]) == 2.0  # each kept its 2 probe forwards' writes


def test_the_cutoff_turned_off_for_a_model_that_swaps_its_weights_is_said_for_each_new_model() -> None:
    # Before: said once per monitor class name per process: the second model's fit was not told.
    assert [_said(_SwapsEma(), "rebinds their .data"), _said(_SwapsEma(), "rebinds their .data")] == [1, 1]


class _Pairs(Sampler):
    """Batches of ``(index, size)`` pairs (a multi-scale sampler's): the probe cannot read dataset indices."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)
        for start in range(0, len(indices), 4):
            yield [(i, 2) for i in indices[start:start + 4]]

    def __len__(self) -> int:
        return 2


class _Scaled(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 13  # rank 1 of 2 gets a repeat: padding

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, size = item
        return torch.full((size, size), float(index))


def test_padding_that_cannot_be_told_by_index_is_said_for_each_new_loader() -> None:
    # Before: said once per owner name per process: a second fit's loader was measured with its repeats unsaid.
    said = []
    for _ in range(2):
        loader = DataLoader(_Scaled(), batch_sampler=_Pairs(DistributedSampler(_Scaled(), num_replicas=2, rank=1,
                                                                                 shuffle=False)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            without_sampler_padding(list(loader), loader, "MassiveActivations")
        said.append(sum("cannot be told apart" in str(w.message) for w in caught))
    assert said == [1, 1]


# ------------------------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize("name", ["drop", "cuda_graph", "stop_after_taps"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_sensitive_flags_take_bools_only(name: str, value: object) -> None:
    # Before: drop="no" and cuda_graph="no" read as True (drop="no" zeroed neurons during training)
    with pytest.raises(LightningActError, match=f"^SensitiveNeurons: {name}={value!r} must be True or False$"):
        SensitiveNeurons(**{name: value})
    for flag in (True, False):
        assert getattr(SensitiveNeurons(**{name: flag}), name) is flag


def test_sensitive_input_key_is_a_string_or_none() -> None:
    # Before: input_key=5 was accepted, though a dict batch's keys it is looked up among are strings
    with pytest.raises(LightningActError, match=r"^SensitiveNeurons: input_key=5 must be the str key"):
        SensitiveNeurons(input_key=5)
    assert SensitiveNeurons(input_key="input_ids").input_key == "input_ids"
    assert SensitiveNeurons().input_key is None


def test_an_absurd_massive_top_k_is_refused_in_one_line() -> None:
    # Before: top_k=10**9 was accepted, and the first due step asked the allocator for 48 GB (a 90-line traceback)
    with pytest.raises(LightningActError, match=r"^MassiveActivations: top_k=1000000000 is above 4096") as refused:
        MassiveActivations(top_k=10**9)
    assert "\n" not in str(refused.value)
    assert MassiveActivations(top_k=1000).top_k == 1000  # above a tap's positions: logs those it has (said once)
    assert MassiveActivations(top_k=4096).top_k == 4096


def test_massive_min_fit_points_below_six_names_its_class_and_real_bound() -> None:
    # Before: min_fit_points=5.0 said "must be a whole number >= 0", and 5 said it without the class
    for value in (5, 5.0, 6.0):
        with pytest.raises(LightningActError, match=r"^MassiveActivations: min_fit_points=.* must be a whole number >= 6$"):
            MassiveActivations(min_fit_points=value)
    assert MassiveActivations(min_fit_points=6, history_size=12).min_fit_points == 6

