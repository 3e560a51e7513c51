"""MassiveActivations over forwards whose token axes do not align in one step (round 27): a KV-cache decode step
``(B, 1, D)``, or one squeezed to ``(B, D)``, beside a whole-sequence forward. Before, the decode token's positions
were logged as token 0 (or top{j}_token was dropped or kept by whichever call came last), silently."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks.massive import MassiveActivations

B, P, D, PLANT, FEATURE = 4, 6, 16, 5000.0, 3


class Decoder(nn.Module):
    """A block whose output carries ``PLANT`` at feature 3 of every token at absolute position >= P (the generated
    tokens), given the absolute position ``start`` of the input's first token."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        h = self.proj(x)
        planted = PLANT * nn.functional.one_hot(torch.tensor(FEATURE), D).to(h.dtype)
        if h.dim() == 2:  # a squeezed decode step: its one token sits at `start`
            return h + float(start >= P) * planted
        positions = torch.arange(start, start + h.shape[1])
        return h + (positions >= P).to(h.dtype)[None, :, None] * planted


class Rollout(pl.LightningModule):
    """A training step with the forwards of ``case``: a loss forward over the prompt and a greedy-style decode of three
    tokens (one-token forwards, or squeezed ``(B, D)``), or several whole-sequence forwards."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case, self.block, self.seen = case, Decoder(), {}
        self.block.register_forward_hook(
            lambda m, a, out: self.seen.setdefault(self.global_step, []).append(out.detach().double().numpy().copy())
        )

    def decode(self, x: torch.Tensor, squeezed: bool) -> None:
        with torch.no_grad():
            for t in range(3):
                self.block(x[:, -1] if squeezed else x[:, -1:], start=P + t)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        if self.case == "squeezed decode, then loss forward":
            self.decode(x, squeezed=True)
        loss = self.block(x).square().mean()
        if self.case == "one-token decode after the loss forward":
            self.decode(x, squeezed=False)
        elif self.case == "loss forward, then squeezed decode":
            self.decode(x, squeezed=True)
        elif self.case == "two forwards of equal length":
            loss = loss + self.block(3.0 * x, start=1).square().mean()  # its token 5 is absolute position 6: planted
        elif self.case == "forwards of different lengths":
            loss = loss + self.block(2.0 * x[:, :4], start=4).square().mean()  # dynamic padding: both start at token 0
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(case: str) -> tuple[MassiveActivations, Rollout, list[str]]:
    monitor = MassiveActivations(modules=["block"], every_n_steps=1, top_k=1)
    model = Rollout(case)
    data = TensorDataset(torch.randn(2 * B, P, D, generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        max_steps=2, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(data, batch_size=B))
    said = [str(w.message) for w in caught if "do not align" in str(w.message)]
    return monitor, model, said


def logged(monitor: MassiveActivations, stat: str, step: int) -> float:
    return monitor.history[f"massive/block/{stat}"].values[step]


@pytest.mark.parametrize(
    "case", ["one-token decode after the loss forward", "loss forward, then squeezed decode",
             "squeezed decode, then loss forward"],
)
def test_decode_steps_log_no_token_position_and_say_why_once(case: str) -> None:
    monitor, model, said = fit(case)
    assert "massive/block/top0_token" not in monitor.history  # unknown: before, 0 (or dropped, silently)
    assert len(said) == 1 and "KV-cache decode" in said[0] and "probe='val'" in said[0]
    assert "samples of median, ratio and count_per_sample" in said[0]
    tolerance = monitor.bins.relative_width
    for step in range(2):
        outputs = model.seen[step]
        assert len(outputs) == 4
        # every forward's rows are samples (documented): per-row statistics over all of them, numpy float64
        rows = [np.abs(h).reshape(h.shape[0], -1) for h in outputs]  # rows of P * D entries, or of D (decoded)
        medians = [np.median(r, axis=1) for r in rows]
        maxima = np.concatenate([r.max(1) for r in rows])
        assert logged(monitor, "top1", step) == pytest.approx(maxima.max(), rel=1e-6)
        assert abs(logged(monitor, "ratio", step) / np.mean(maxima / np.concatenate(medians)) - 1) <= tolerance
        count = sum(((r > 100.0) & (r >= 1000.0 * m[:, None])).sum() for r, m in zip(rows, medians))
        assert count == 3 * B  # the planted entry of each decoded token
        assert logged(monitor, "count_per_sample", step) == pytest.approx(count / (4 * B))
        # the largest entry is a generated token's planted feature: its value and feature are still logged
        largest = max(np.abs(h).max() for h in outputs)
        assert logged(monitor, "top0_value", step) == pytest.approx(largest, rel=1e-6)
        assert logged(monitor, "top0_feature", step) == FEATURE


@pytest.mark.parametrize("case", ["two forwards of equal length", "forwards of different lengths"])
def test_whole_sequence_forwards_still_log_their_positions(case: str) -> None:
    # Several forwards over sequences that all start at token 0 (two views, gradient accumulation, dynamic padding):
    # positions along their token axes name the same tokens, and are logged as before, without a warning.
    monitor, model, said = fit(case)
    assert said == []
    for step in range(2):
        outputs = model.seen[step]
        assert len(outputs) == 2
        by_position = np.full((P, D), -np.inf)
        for h in outputs:
            by_position[: h.shape[1]] = np.maximum(by_position[: h.shape[1]], np.abs(h).max(0))
        token, feature = np.unravel_index(by_position.argmax(), by_position.shape)
        assert logged(monitor, "top0_value", step) == pytest.approx(by_position.max(), rel=1e-6)
        assert (logged(monitor, "top0_token", step), logged(monitor, "top0_feature", step)) == (token, feature)
    if case == "two forwards of equal length":
        assert (token, feature) == (P - 1, FEATURE)  # the second forward's planted last token


def test_which_token_grids_align() -> None:
    from lightning_act.callbacks.massive import positions_align

    assert positions_align({(6,)}) and positions_align({(6,), (4,)}) and positions_align({()}) and positions_align({(1,)})
    assert not positions_align({(6,), (1,)}) and not positions_align({(6,), ()})
    assert not positions_align({(4, 4), (8, 8)})  # row * W + column with different W
