"""MassiveActivations over forwards whose token axes do not align in one step (round 27): a KV-cache decode step
``(B, 1, D)``, or one squeezed to ``(B, D)``, beside a whole-sequence forward. Before, the decode token's positions
were logged as token 0 (or top{j}_token was dropped or kept by whichever call came last), silently. Also decided on
every rank's grids under DDP (2 CPU processes, gloo: that fit is scenario ``rank_grids`` of ddp_scenarios.py), for
channels-last maps, for maps of one width, and without measuring a probe of stand-in weights of unmade lazy
modules."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks.massive import MassiveActivations
from lightning_act.stats.fused import fused_statistics, massive_spec, topk_positions_from
from lightning_act.stats.histogram_median import LogMagnitudeBins
from lightning_act.stats.massive import merge_topk

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
            # a 4-token forward whose first token is absolute position 4 (a chunk, not dynamic padding): its planted
            # tokens 6 and 7 are logged as indices 2 and 3 along its own token axis, the documented limit, said once
            loss = loss + self.block(2.0 * x[:, :4], start=4).square().mean()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(case: str, lengths: list[str] | None = None) -> tuple[MassiveActivations, Rollout, list[str]]:
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
    said = [str(w.message) for w in caught if "do not align in one step" in str(w.message)]
    if lengths is not None:
        lengths += [str(w.message) for w in caught if "forwards of different lengths" in str(w.message)]
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
    # Several whole-sequence forwards: positions along their token axes are logged as before. Forwards of different
    # lengths are taken to start at token 0, which their shapes cannot tell from a continuation: said once.
    lengths: list[str] = []
    monitor, model, said = fit(case, lengths)
    assert said == []
    if case == "forwards of different lengths":
        assert len(lengths) == 1 and "KV-cache continuation or a chunked decode" in lengths[0]
        assert "(on one rank, or on different ranks)" in lengths[0]  # before: "(on some rank)", wrong for DDP
    else:
        assert lengths == []
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
    else:
        assert token in (2, 3) and feature == FEATURE  # absolute positions 6, 7 of the chunk: its own indices 2, 3


def test_which_token_grids_align() -> None:
    from lightning_act.callbacks.massive import positions_align

    assert positions_align({(6,)}) and positions_align({(6,), (4,)}) and positions_align({()}) and positions_align({(1,)})
    assert not positions_align({(6,), (1,)}) and not positions_align({(6,), ()})
    assert not positions_align({(4, 4), (8, 8)})  # row * W + column with different W
    # one width: row * W + column names one pixel in both (before: not aligned); clips of different frame counts too
    assert positions_align({(3, 5), (4, 5)}) and positions_align({(8, 4, 4), (16, 4, 4)})
    assert not positions_align({(3, 5), (3, 6)}) and not positions_align({(15,), (3, 5)})


# ------------------------------------------------------------------------------------ maps of different sizes
class Maps(pl.LightningModule):
    """Two micro-batches of one step: maps of ``sizes[0]`` then ``sizes[1]``, 4 channels, channels-last when asked,
    with one large entry at channel 2, row 1, column 4 of the second."""

    def __init__(self, sizes: list[tuple[int, int]], channels_last: bool) -> None:
        super().__init__()
        self.lin, self.tap, self.sizes, self.channels_last, self.seen = nn.Linear(1, 1), nn.Identity(), sizes, channels_last, []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        height, width = self.sizes[batch_idx % 2]
        x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(batch_idx))
        x[0, 2, 1, 4] = 500.0 + 50 * (batch_idx % 2)
        self.seen.append(x.double().numpy())
        h = self.tap(x.permute(0, 2, 3, 1) if self.channels_last else x)
        return (h * self.lin.weight).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_one_step_of_two_micro_batches(model: pl.LightningModule, monitor: MassiveActivations) -> list[str]:
    """One optimizer step of two micro-batches (the model's forward sees each batch's index); what was said."""
    trainer = pl.Trainer(
        max_steps=1, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", accumulate_grad_batches=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1))
    return [str(w.message) for w in caught]


def fit_maps(sizes: list[tuple[int, int]], channels_last: bool) -> tuple[MassiveActivations, Maps, list[str]]:
    monitor = MassiveActivations(modules=["tap"], every_n_steps=1, top_k=1, feature_dim=-1 if channels_last else 1)
    model = Maps(sizes, channels_last)
    said = fit_one_step_of_two_micro_batches(model, monitor)
    return monitor, model, [message for message in said if "do not align in one step" in message]


@pytest.mark.parametrize("channels_last", [False, True])
def test_maps_of_one_width_keep_positions_and_of_other_sizes_do_not(channels_last: bool) -> None:
    # 3x5 beside 4x5: row * 5 + column names one pixel in both, logged (before: dropped, with a false warning).
    monitor, model, said = fit_maps([(3, 5), (4, 5)], channels_last)
    by_position = np.full((4, 4 * 5), -np.inf)  # (channel, row * 5 + column), numpy float64
    for x in model.seen:
        by_position[:, : x.shape[2] * 5] = np.maximum(by_position[:, : x.shape[2] * 5], np.abs(x).max(0).reshape(4, -1))
    channel, token = np.unravel_index(by_position.argmax(), by_position.shape)
    assert (channel, token) == (2, 1 * 5 + 4) and said == []
    assert monitor.history["massive/tap/top0_token"].values == [token]
    assert monitor.history["massive/tap/top0_feature"].values == [channel]
    # 3x5 beside 4x6: flat positions of two widths; channels-last maps were flattened to (B, H*W, C) before the
    # monitor saw them and read as sequences, which align (before: top0_token logged, silently)
    monitor, model, said = fit_maps([(3, 5), (4, 6)], channels_last)
    assert "massive/tap/top0_token" not in monitor.history and len(said) == 1 and "different shapes" in said[0]
    assert monitor.history["massive/tap/top0_feature"].values == [2.0]
    assert monitor.history["massive/tap/top0_value"].values == [550.0]


# ------------------------------------------------------------------------------------ an empty batch
def test_an_empty_batch_gives_no_top_k_candidates() -> None:
    # 0 samples observe no position: before, value 0 at (token 0, feature 0) ..., which filled the slots of a batch
    # with fewer positions than top_k as if measured
    spec = massive_spec(LogMagnitudeBins(), 100.0, 1000.0)
    empty = topk_positions_from(fused_statistics(torch.zeros(0, 4, 2), spec), 3)
    assert torch.isnan(empty).all()
    real = torch.tensor([[[1.0, -5.0]]])  # one sample, one token, two features: 2 positions < top_k = 3
    merged = merge_topk(torch.stack([topk_positions_from(fused_statistics(real, spec), 3), empty]), 3).reshape(3, 3)
    expected = [[5.0, 1.0, math.nan], [0.0, 0.0, math.nan], [1.0, 0.0, math.nan]]  # values, tokens, features
    np.testing.assert_array_equal(merged.numpy(), np.array(expected))


# ------------------------------------------------------------------------------------ unmade lazy modules
class LazyTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.LazyLinear(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights the first forward makes, at every step


def fit_with_a_val_probe_of_fc1(task: pl.LightningModule) -> tuple[MassiveActivations, list, float]:
    """Three steps of ``task`` (lr 0) under ``MassiveActivations(probe="val")`` on ``fc1``: the monitor, the warnings,
    and the expected ``top1`` of the probe batch, ``max |x Wᵀ + b|`` in numpy float64 from the weights after the fit."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 6, generator=generator), torch.randint(0, 2, (16,), generator=generator))
    monitor = MassiveActivations(modules=["fc1"], every_n_steps=1, probe="val")
    trainer = pl.Trainer(
        max_steps=3, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    weight, bias = (p.detach().double().numpy() for p in (task.fc1.weight, task.fc1.bias))
    return monitor, list(caught), float(np.abs(data.tensors[0][:8].double().numpy() @ weight.T + bias).max())


def test_a_probe_before_lazy_modules_are_made_measures_nothing_and_says_why() -> None:
    # Step 0's probe would run on throwaway stand-in weights (training stays bitwise): before, it was logged as the
    # step's measurement. The later steps measure the weights the first training forward made (numpy float64).
    task = LazyTask()
    monitor, caught, expected = fit_with_a_val_probe_of_fc1(task)
    said = [str(w.message) for w in caught if "measures nothing at step" in str(w.message)]
    assert len(said) == 1 and "step 0" in said[0] and "(fc1)" in said[0] and "run one batch" in said[0]
    top1 = monitor.history["massive/fc1/top1"]
    assert list(top1.steps) == [1, 2]
    assert top1.values == pytest.approx([expected] * 2, rel=1e-6)
    assert not any("produced no activation" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------ DDP: every rank's grids
class RankGrids(pl.LightningModule):
    """Per rank, what the three taps see in the one step: ``block``, a loss forward on both ranks and on rank 1 a
    one-token decode holding the step's largest entry; ``conv``, 8x8 maps on rank 0 and 6x6 on rank 1 (largest entry
    at channel 2, row 1, column 4); ``wide``, 3x5 maps on rank 0 and 4x5 on rank 1 (largest at channel 1, row 2,
    column 3: position 13 on both, logged)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.conv, self.wide, self.lin = Decoder(), nn.Identity(), nn.Identity(), nn.Linear(1, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        rank = self.global_rank
        x = torch.randn(B, P, D, generator=torch.Generator().manual_seed(rank))
        loss = self.block(x).square().mean()
        if rank == 1:
            with torch.no_grad():
                self.block(x[:, -1:], start=P)  # the decoded token at absolute position P
        maps = torch.randn(2, 4, 8 - 2 * rank, 8 - 2 * rank, generator=torch.Generator().manual_seed(10 + rank))
        maps[0, 2, 1, 4] = 900.0 * rank
        wide = torch.randn(2, 4, 3 + rank, 5, generator=torch.Generator().manual_seed(20 + rank))
        wide[1, 1, 2, 3] = 700.0 * rank
        return loss + ((self.conv(maps).sum() + self.wide(wide).sum()) * self.lin.weight).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def rank_grids(out: Path) -> None:
    monitor = MassiveActivations(modules=["block", "conv", "wide"], every_n_steps=1, top_k=1)
    trainer = pl.Trainer(
        max_steps=1, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=2, strategy="ddp",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(RankGrids(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1))
    result = {
        "history": {key: list(series.values) for key, series in monitor.history.items() if "/top0_" in key},
        "metrics": sorted(key for key in trainer.callback_metrics if "/top0_" in key),
        "said": [str(w.message) for w in caught if "do not align in one step" in str(w.message)],
    }
    (out / f"rank_grids.{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.ddp_scenario("rank_grids")
def test_under_ddp_positions_align_on_every_rank_s_grids(ddp_scenario) -> None:
    # Before, each rank decided on its own grids: rank 1 dropped block's top0_token and rank 0 logged the decoded
    # token as token 0; rank 0 logged conv's 6x6 position 10 as if on its 8-wide maps.
    rank0, rank1 = (ddp_scenario.json(f"rank_grids.{rank}.json") for rank in range(2))
    assert rank0["history"] == rank1["history"] and rank0["metrics"] == rank1["metrics"]
    history = rank0["history"]
    assert "massive/block/top0_token" not in history and "massive/conv/top0_token" not in history
    assert history["massive/block/top0_feature"] == [FEATURE] and history["massive/block/top0_value"][0] > PLANT - 10
    assert (history["massive/conv/top0_value"], history["massive/conv/top0_feature"]) == ([900.0], [2.0])
    assert (history["massive/wide/top0_token"], history["massive/wide/top0_feature"]) == ([2 * 5 + 3], [1.0])
    assert len(rank0["said"]) == 2 and rank1["said"] == []  # said once per tap, by rank 0


# ------------------------------------------------------------------------------------ review fixes (R6)
class ChannelsLastCopies(Maps):
    """The maps of :class:`Maps`, channels last, but delivered as a tensor that is no view of a ``(B, H, W, C)`` map
    the registry flattens: a crop of a wider map (the flatten copies) or one made under ``torch.inference_mode`` (no
    ``_base``). Before, the monitor told the map's spatial shape from ``_base`` and read these as sequences."""

    def __init__(self, sizes: list[tuple[int, int]], mode: str) -> None:
        super().__init__(sizes, channels_last=True)
        self.mode = mode

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        height, width = self.sizes[batch_idx % 2]
        x = torch.randn(2, 4, height, width + 1, generator=torch.Generator().manual_seed(batch_idx))
        x[0, 2, 1, 4] = 500.0 + 50 * (batch_idx % 2)
        self.seen.append(x[..., :width].double().numpy())
        cropped = x.permute(0, 2, 3, 1)[:, :, :width]
        if self.mode == "crop":
            h = self.tap(cropped)
        else:
            with torch.inference_mode():
                h = self.tap(cropped.contiguous())
            h = h.clone()
        return (h * self.lin.weight).sum()


@pytest.mark.parametrize("mode", ["crop", "infer"])
def test_channels_last_maps_whose_flatten_is_no_view_keep_their_spatial_shape(mode: str) -> None:
    monitor = MassiveActivations(modules=["tap"], every_n_steps=1, top_k=1, feature_dim=-1)
    model = ChannelsLastCopies([(3, 5), (4, 6)], mode)
    said = [m for m in fit_one_step_of_two_micro_batches(model, monitor) if "do not align" in m or "different lengths" in m]
    # 3x5 beside 4x6: row * W + column with two W (before: read as sequences of 15 and 24 tokens, top0_token logged)
    assert "massive/tap/top0_token" not in monitor.history and len(said) == 1 and "different shapes" in said[0]
    largest = np.abs(max(model.seen, key=lambda x: np.abs(x).max()))  # numpy float64, (B, C, H, W)
    channel = np.unravel_index(largest.argmax(), largest.shape)[1]
    assert monitor.history["massive/tap/top0_value"].values == [pytest.approx(largest.max(), rel=1e-6)]
    assert monitor.history["massive/tap/top0_feature"].values == [channel] == [2]


class AuxLazyTask(LazyTask):
    """:class:`LazyTask` with ``fc1`` made before the fit, and a lazy head ``aux`` that neither training nor the probe
    runs (a test-only head)."""

    def __init__(self, fc1_made: bool) -> None:
        super().__init__()
        self.aux = nn.LazyLinear(3)
        if fc1_made:
            self.fc1 = nn.Linear(6, 16)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for name, p in self.named_parameters() if not name.startswith("aux")], lr=0.0)


@pytest.mark.parametrize("fc1_made", [True, False])
def test_a_lazy_module_the_probe_does_not_run_leaves_the_probe_measuring(fc1_made: bool) -> None:
    # Before, any unmade lazy module of the model skipped every due step's probe: with aux never made, the fit
    # logged nothing. Only a probe that ran a lazy module on stand-ins (fc1 unmade, step 0) measures nothing.
    monitor, caught, expected = fit_with_a_val_probe_of_fc1(AuxLazyTask(fc1_made))
    said = [str(w.message) for w in caught if "measures nothing at step" in str(w.message)]
    top1 = monitor.history["massive/fc1/top1"]
    assert list(top1.steps) == ([0, 1, 2] if fc1_made else [1, 2])
    assert top1.values == pytest.approx([expected] * len(top1.steps), rel=1e-6)
    if fc1_made:
        assert said == []
    else:  # names the module the probe ran on stand-ins, not aux; one warning (not also probing's own)
        assert len(said) == 1 and "(fc1)" in said[0]
        assert [w for w in caught if "stand-in" in str(w.message)] == [w for w in caught if str(w.message) in said]
    assert not any("produced no activation" in str(w.message) for w in caught)


class PaddedLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.block = nn.Embedding(20, D), nn.Linear(D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.emb(ids))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).square().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("forward_fn", [None, lambda model, ids: model(ids)], ids=["default", "forward_fn"])
def test_a_probe_of_batches_padded_to_their_own_lengths_logs_positions_without_a_warning(forward_fn) -> None:
    # Every probe forward is a whole batch of the loader, starting at token 0: positions align. Before, the training
    # forwards' warning (a KV-cache continuation ..., "pass probe='val'") was said to a user of probe='val'. A
    # forward_fn may run a batch in chunks (R9: a chunked prefill's positions were logged unsaid), so with one the
    # probe's own line is said once, naming the fix.
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 20, (n,), generator=generator) for n in (5, 5, 9, 9)]
    loader = DataLoader(sequences, batch_size=2, collate_fn=lambda b: nn.utils.rnn.pad_sequence(b, batch_first=True))
    monitor = MassiveActivations(modules=["block"], every_n_steps=1, top_k=1, probe="val", probe_batches=2,
                                 forward_fn=forward_fn)
    model = PaddedLM()
    trainer = pl.Trainer(
        max_steps=1, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader, loader)
    said = [str(w.message) for w in caught if "different lengths" in str(w.message) or "do not align" in str(w.message)]
    if forward_fn is None:
        assert said == []
    else:
        assert len(said) == 1 and "of the probe's forward_fn" in said[0] and "run each batch whole" in said[0]
        assert "pass probe='val'" not in said[0]
    weight, bias = model.block.weight.detach().double().numpy(), model.block.bias.detach().double().numpy()
    table = model.emb.weight.detach().double().numpy()
    by_position = np.full((9, D), -np.inf)  # (token, feature) along each batch's own axis, numpy float64
    for ids in loader:
        h = np.abs(table[ids.numpy()] @ weight.T + bias).max(0)
        by_position[: h.shape[0]] = np.maximum(by_position[: h.shape[0]], h)
    token, feature = np.unravel_index(by_position.argmax(), by_position.shape)
    assert monitor.history["massive/block/top0_value"].values == [pytest.approx(by_position.max(), rel=1e-6)]
    assert (monitor.history["massive/block/top0_token"].values, monitor.history["massive/block/top0_feature"].values) \
        == ([token], [feature])

