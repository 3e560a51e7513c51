"""Round 30: MassiveActivations at a median of 0 and at top-k slots of value 0.

A sample with more than half its entries exactly zero (a ReLU's output) has median 0, and its ratio ``max / 0`` was
logged as ``inf`` with no warning on every post-ReLU tap; a closed gate's all-zero output (or fewer than ``top_k``
nonzero positions) logged the arbitrary positions ``torch.topk`` names among equal zeros as ``top{j}_token/feature``.
Every path is checked against numpy float64 on the same tensors: the exact stats functions, the fused eager pass
(exact and histogram medians), the compiled pass (slow) and the Triton kernel under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _interpreter import run_interpreted
from lightning_act.callbacks.massive import MassiveActivations
from lightning_act.stats.fused import (
    FusedStats,
    fused_statistics,
    massive_partials_from,
    massive_spec,
    topk_positions_from,
)
from lightning_act.stats.massive import massive_partials, merge_topk, summarize_massive, topk_positions, topk_stats

K = 4
SPEC = massive_spec()


def zero_median_inputs() -> list[torch.Tensor]:
    """Post-ReLU tensors, one sample of each with more than half its entries exactly zero (median 0): narrow
    samples (exact medians on the eager path) and wide ones (histogram medians); a 4-D conv map; a sample with exactly
    half zeros (even count: median = half the next value, > 0, a defined ratio) as a control."""
    generator = torch.Generator().manual_seed(30)
    narrow = torch.relu(torch.randn(4, 6, 8, generator=generator) + 0.5)
    narrow[1, :4] = 0.0  # 32 of 48 entries
    wide = torch.relu(torch.randn(3, 4, 600, generator=generator) + 0.5)
    wide[0, :3] = 0.0  # 1800 of 2400
    conv = torch.relu(torch.randn(2, 3, 4, 4, generator=generator) + 0.5)
    conv[0, :2] = 0.0  # 32 of 48
    half = torch.rand(2, 2, 4, generator=generator) + 0.1
    half[0, 0] = 0.0  # 4 of 8: defined
    return [narrow, wide, conv, half]


def zero_slot_inputs() -> list[torch.Tensor]:
    """All-zero outputs (a closed gate) and outputs with fewer nonzero positions than ``K``."""
    sparse = torch.zeros(3, 4, 5)
    sparse[1, 2, 3] = 7.0
    sparse[2, 0, 1] = -2.5
    conv = torch.zeros(2, 3, 2, 2)
    conv[1, 2, 1, 0] = 4.0
    return [torch.zeros(2, 5, 4), torch.zeros(2, 3, 2, 2), sparse, conv]


def numpy_layout(x: torch.Tensor) -> np.ndarray:
    """``|x|`` as float64 ``(B, tokens, features)``: features the last axis of ``(B, T, D)``, the channels of
    ``(B, C, *spatial)`` (tokens the flattened spatial positions)."""
    a = np.abs(x.double().numpy())
    if a.ndim > 3:
        a = a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 2, 1)
    return a


def numpy_massive(x: torch.Tensor) -> dict[str, float]:
    """``top1``, ``median`` and ``ratio`` (means over samples; NaN where a sample's ratio is undefined)."""
    rows = numpy_layout(x).reshape(x.shape[0], -1)
    medians = np.median(rows, 1)
    tops = rows.max(1)
    ratio = float(np.mean(tops / medians)) if (medians > 0).all() else math.nan
    return {"top1": float(tops.max()), "median": float(medians.mean()), "ratio": ratio}


def numpy_topk(x: torch.Tensor, k: int) -> np.ndarray:
    """``[values, tokens, features]`` (3k) of the ``k`` largest per-position maxima; no position where the value is
    0 (every position of value 0 ties with every other)."""
    column = numpy_layout(x).max(0)
    features = column.shape[1]
    flat = column.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    out = np.full((3, k), np.nan)
    out[0, : order.size] = flat[order]
    placed = flat[order] > 0
    out[1, : order.size] = np.where(placed, order // features, np.nan)
    out[2, : order.size] = np.where(placed, order % features, np.nan)
    return out.reshape(-1)


def assert_massive_matches(x: torch.Tensor, sums: torch.Tensor, maxima: torch.Tensor, rel: float, path: str) -> None:
    got = {name: value.item() for name, value in summarize_massive(sums, maxima).items()}
    expected = numpy_massive(x)
    assert got["top1"] == expected["top1"], path
    assert got["median"] == pytest.approx(expected["median"], rel=rel), path
    if math.isnan(expected["ratio"]):
        assert math.isnan(got["ratio"]), (path, got["ratio"])  # before: inf
    else:
        assert got["ratio"] == pytest.approx(expected["ratio"], rel=rel), path


def assert_topk_matches(x: torch.Tensor, buffer: torch.Tensor, path: str) -> None:
    """The top-k statistics the monitor logs from ``buffer`` (:func:`topk_stats`) against numpy's."""
    expected = numpy_topk(x, K)
    stats = topk_stats(buffer, K)
    got = np.array([float(stats[f"top{j}_{field}"]) for field in ("value", "token", "feature") for j in range(K)])
    values, positions = expected[:K], expected[K:]
    assert np.array_equal(got[:K], values.astype(np.float32).astype(np.float64), equal_nan=True), (path, got)
    assert np.array_equal(got[K:], positions, equal_nan=True), (path, got)  # before: topk's picks among zeros


@pytest.mark.parametrize("index", range(4))
def test_a_zero_median_leaves_the_ratio_unknown_on_the_stats_and_eager_paths(index: int) -> None:
    x = zero_median_inputs()[index]
    # exact medians of float32 magnitudes are float32 (1e-7 apart from numpy's float64 mean of the middle two)
    assert_massive_matches(x, *massive_partials(x), rel=1e-6, path="massive_partials")
    rel = 1e-12 if x[0].numel() < 1024 else SPEC.median.relative_width  # type: ignore[union-attr]
    assert_massive_matches(x, *massive_partials_from(fused_statistics(x, SPEC, "torch")), rel=rel, path="torch")


@pytest.mark.parametrize("index", range(4))
def test_zero_valued_top_k_slots_have_no_position_on_the_stats_and_eager_paths(index: int) -> None:
    x = zero_slot_inputs()[index]
    assert_topk_matches(x, topk_positions(x, K), "topk_positions")
    assert_topk_matches(x, topk_positions_from(fused_statistics(x, SPEC, "torch"), K), "torch")


@pytest.mark.slow
def test_the_compiled_pass_agrees() -> None:
    for x in zero_median_inputs():
        rel = 1e-12 if x[0].numel() < 1024 else SPEC.median.relative_width  # type: ignore[union-attr]
        partials = massive_partials_from(fused_statistics(x, SPEC, "compiled"))
        assert_massive_matches(x, *partials, rel=rel, path="compiled")
    for x in zero_slot_inputs():
        assert_topk_matches(x, topk_positions_from(fused_statistics(x, SPEC, "compiled"), K), "compiled")


TRITON_CHECKER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_massive_r30 import SPEC, zero_median_inputs, zero_slot_inputs
from lightning_act.stats.fused import fused_statistics
out = []
for x in zero_median_inputs() + zero_slot_inputs():
    s = fused_statistics(x, SPEC, "triton")
    out.append((x, [t.clone() for t in (s.sums, s.maxima, s.sample_magnitude_max, s.sample_median,
                                         s.sample_massive_count, s.column_max)]))
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_kernel_agrees_under_the_interpreter(tmp_path: Path) -> None:
    output = tmp_path / "massive.pt"
    run_interpreted(TRITON_CHECKER, output)
    results = torch.load(output)
    assert len(results) == len(zero_median_inputs()) + len(zero_slot_inputs())
    for x, fields in results[: len(zero_median_inputs())]:
        stats = FusedStats(SPEC, tuple(x.shape), *fields)
        rel = SPEC.median.relative_width  # type: ignore[union-attr]
        assert_massive_matches(x, *massive_partials_from(stats), rel=rel, path="triton")
    for x, fields in results[len(zero_median_inputs()):]:
        assert_topk_matches(x, topk_positions_from(FusedStats(SPEC, tuple(x.shape), *fields), K), "triton")


def test_split_batches_merge_to_the_whole_batchs_statistics() -> None:
    # What DDP ranks (or micro-batches) add and merge equals the one-process computation: an all-zero half (zero-
    # valued slots of no position) beside a half with two nonzero positions; a zero-median half beside a defined one.
    x = zero_slot_inputs()[2]
    halves = [x[:1], x[1:]]
    merged = merge_topk(torch.stack([topk_positions_from(fused_statistics(h, SPEC, "torch"), K) for h in halves]), K)
    assert_topk_matches(x, merged, "merged")
    narrow = zero_median_inputs()[0]
    for split in ([narrow[:1], narrow[1:]], [narrow[:2], narrow[2:]]):  # the zero-median sample 1 in either part
        parts = [massive_partials_from(fused_statistics(part, SPEC, "torch")) for part in split]
        sums = sum(part[0] for part in parts)
        maxima = torch.stack([part[1] for part in parts]).amax(0)
        assert_massive_matches(narrow, sums, maxima, rel=1e-12, path="split")  # type: ignore[arg-type]


def test_zero_slots_of_a_tap_with_fewer_positions_than_k_merge_as_one_process() -> None:
    # review R4: positions cleared before the merge were each a position of their own: the zero slots of two ranks
    # did not merge, and a tap of 2 positions logged [5, 3, 0, 0] where one process (numpy) gives [5, 3, NaN, NaN]
    x = torch.tensor([[[5.0, 0.0]], [[0.0, 3.0]]])  # (B, T=1, D=2): 2 positions, k = 4
    for split in ([x[:1], x[1:]], [x, x[:0]]):
        parts = [topk_positions(part, K) for part in split if len(part)]
        assert_topk_matches(x, merge_topk(torch.stack(parts), K), "merged")


class Recorder(Logger):
    """Every logged metric, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))

    def logged(self, key: str) -> list[float]:
        return [metrics[key] for _, metrics in self.rows if key in metrics]


class ConvReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation shape: about half of every sample's entries are zero after it."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


class ReluNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ConvReLU(8), ConvReLU(8))
        self.head = nn.Conv2d(8, 2, 1)
        self.seen: list[torch.Tensor] = []
        self.blocks[1].register_forward_hook(lambda module, args, out: self.seen.append(out.detach().clone()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.blocks(self.stem(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(
    model: pl.LightningModule, monitor: MassiveActivations, data: DataLoader, steps: int
) -> tuple[Recorder, list[str]]:
    """The metrics the fit logged, and the monitor's warnings."""
    logger = Recorder()
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor], logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", log_every_n_steps=1,
                         default_root_dir=tempfile.mkdtemp(prefix="lightning_act_test_"))  # its skipped.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    return logger, [str(w.message) for w in caught if str(w.message).startswith("MassiveActivations")]


def test_a_post_relu_block_logs_no_ratio_says_why_once_and_logs_the_rest() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8, generator=generator),
                                    torch.randint(0, 2, (8, 8, 8), generator=generator)), batch_size=4)
    model = ReluNet()
    monitor = MassiveActivations(modules=["blocks.1"], every_n_steps=1, min_fit_points=6, history_size=12)
    logger, said = fit(model, monitor, data, steps=2)
    expected = [numpy_massive(seen) for seen in model.seen]
    assert all(math.isnan(e["ratio"]) for e in expected)  # BN + ReLU: some sample has median 0 at each step
    assert logger.logged("massive/blocks.1/ratio") == []  # before: [inf, inf], unsaid
    assert logger.logged("massive/blocks.1/median") == pytest.approx([e["median"] for e in expected], rel=1e-12)
    assert logger.logged("massive/blocks.1/top1") == [e["top1"] for e in expected]
    about_ratio = [message for message in said if "ratio" in message]
    assert len(about_ratio) == 1 and "more than half of a sample's entries are exactly zero" in about_ratio[0]
    assert "no ratio point" in monitor.fit_skipped["blocks.1"]  # the emergence fit says it has nothing to fit


class TanhGate(nn.Module):
    """A Flamingo gate initialised closed: its output is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate.tanh()


class GatedLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.ff = nn.Linear(16, 16)
        self.ff_gate = TanhGate()
        self.head = nn.Linear(16, 32)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        h = self.embed(batch[0])
        h = h + self.ff_gate(self.ff(h))
        return F.cross_entropy(self.head(h).reshape(-1, 32), batch[0].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_closed_gate_logs_its_top_k_values_but_no_positions() -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(1))),
                      batch_size=4)
    logger, said = fit(GatedLM(), MassiveActivations(modules=["ff_gate"], every_n_steps=1, top_k=3), data, steps=1)
    metrics = {key.split("/")[-1]: value for _, row in logger.rows for key, value in row.items() if "ff_gate" in key}
    assert [metrics.get(f"top{j}_value") for j in range(3)] == [0.0, 0.0, 0.0]
    assert not [key for key in metrics if key.endswith(("_token", "_feature"))]  # before: top0 at (3, 15) ...
    assert metrics["top1"] == 0.0 and metrics["median"] == 0.0
    assert any("a top-k slot of value 0 has no position" in message for message in said)
