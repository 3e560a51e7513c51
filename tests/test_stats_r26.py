"""Round 26: an infinite sample median is unknown for the massive median, ratio and count on every path;
CompactWandbLogger keeps infinite layer values in its reductions; ActivationSparsity refuses temporal_dim=0 and leaves
temporal_frac unknown (said once) where temporal_dim is a tap's sample axis or no axis; the target_cett refusal names
its class."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from _interpreter import run_interpreted
from _toy import ToyData, ToyTask, quiet_trainer
from torch import nn

from lightning_act.callbacks import ActivationSparsity
from lightning_act.errors import LightningActError
from lightning_act.loggers import compact_metrics
from lightning_act.stats.fused import fused_statistics, massive_partials_from, massive_spec
from lightning_act.stats.massive import massive_partials, summarize_massive

NAN, INF = math.nan, math.inf


def massive_cases() -> list[tuple[torch.Tensor, dict[str, float]]]:
    """Inputs and their hand-worked statistics (NaN: unknown). NaN entries rank as +inf; a sample whose two middle
    magnitudes are not both finite has median inf, where |a| / median >= 1000 is inf / inf: median, ratio and count
    are unknown, top1 is inf. Narrow samples (the fallback's exact median) and 1,100-entry ones (its histogram)."""
    all_nan = torch.full((2, 4, 3), NAN)  # the hunter's case: count was every entry (24), median inf
    half_nan = torch.tensor([[NAN, INF, 1.0, 2.0]])  # middle ranks 2 and inf: median inf
    one_inf = torch.tensor([[INF, 1.0, 2.0, 3.0]])  # median 2.5: one massive entry, ratio inf (unchanged)
    wide_half_nan = torch.ones(2, 1100)
    wide_half_nan[:, :600] = NAN  # ranks 550 and 551 are both NaN (inf)
    wide_one_inf = torch.ones(1, 1100)
    wide_one_inf[0, 7] = INF  # median 1 (one bin's estimate), one massive entry
    unknown = {"top1": INF, "median": NAN, "ratio": NAN, "count": NAN, "count_per_sample": NAN}
    return [
        (all_nan, unknown),
        (half_nan, unknown),
        (one_inf, {"top1": INF, "median": 2.5, "ratio": INF, "count": 1.0, "count_per_sample": 1.0}),
        (wide_half_nan, unknown),
        (wide_one_inf, {"top1": INF, "median": 1.0, "ratio": INF, "count": 1.0, "count_per_sample": 1.0}),
    ]


def fused_massive(x: torch.Tensor, implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return massive_partials_from(fused_statistics(x, massive_spec(), implementation))


def assert_hand_worked(partials: tuple[torch.Tensor, torch.Tensor], expected: dict[str, float], path: str) -> None:
    got = {name: value.item() for name, value in summarize_massive(*partials).items()}
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), (path, name, got)
        else:  # a histogram median is within one bin (1.56%) of the exact one
            assert got[name] == pytest.approx(value, rel=0.0157), (path, name, got)


@pytest.mark.parametrize("case", range(len(massive_cases())))
def test_an_infinite_sample_median_leaves_median_ratio_and_count_unknown(case: int) -> None:
    x, expected = massive_cases()[case]
    assert_hand_worked(massive_partials(x), expected, "massive_partials")
    assert_hand_worked(fused_massive(x, "torch"), expected, "fused torch")


# the inputs come as a file: importing this module would import Lightning into the interpreter's process too
TRITON_MASSIVE = """
import sys, pathlib, torch
from lightning_act.stats.fused import fused_statistics, massive_partials_from, massive_spec
inputs = torch.load(pathlib.Path(sys.argv[2]).with_name("inputs.pt"))
torch.save([massive_partials_from(fused_statistics(x, massive_spec(), "triton")) for x in inputs], sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_pass_leaves_an_infinite_median_unknown_as_the_fallback_does(tmp_path: Path) -> None:
    torch.save([x for x, _ in massive_cases()], tmp_path / "inputs.pt")
    run_interpreted(TRITON_MASSIVE, tmp_path / "massive.pt")
    for (_, expected), partials in zip(massive_cases(), torch.load(tmp_path / "massive.pt"), strict=True):
        assert_hand_worked(partials, expected, "triton")


def test_compact_reductions_keep_infinite_layer_values_and_leave_out_nan() -> None:
    kept, _ = compact_metrics({
        "massive/blocks.0/top1": INF, "massive/blocks.1/top1": 3.0,  # block 0 blew up: the max is inf
        "massive/blocks.0/ratio": NAN, "massive/blocks.1/ratio": 2.0,  # NaN is unknown: left out
        "massive/blocks.0/median": INF, "massive/blocks.1/median": INF,  # every layer inf: still a value
        "sparsity/blocks.0/zero_frac": INF, "sparsity/blocks.1/zero_frac": 1.0,  # mean with inf: inf
        "act/blocks.0/mean": INF, "act/blocks.1/mean": -INF,  # inf - inf: undefined, not logged
        "collapse/blocks.0/erank_frac": -INF, "collapse/blocks.1/erank_frac": 0.5,
    })
    assert kept == {"massive/max/top1": INF, "massive/max/ratio": 2.0, "massive/max/median": INF,
                    "sparsity/mean/zero_frac": INF, "collapse/min/erank_frac": -INF}


class SameSequences(nn.Module):
    """A ``(B, T=4, D=8)`` tap that is the same for every example and changes at every step of T."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.arange(32.0).reshape(4, 8))
        self.act = nn.Identity()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.table.expand(x.shape[0], 4, 8) + 0 * x.flatten(1)[:, :1, None])
        return self.head(h.mean(1))


def temporal_fit(temporal_dim: int, modules: list[str], said: list[str] | None = None) -> ActivationSparsity:
    """The monitor after two logged steps on :class:`SameSequences` (its warnings appended to ``said``)."""
    torch.manual_seed(0)
    monitor = ActivationSparsity(modules=modules, temporal_dim=temporal_dim, every_n_steps=1)
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyTask(SameSequences()), ToyData(n=8))
    if said is not None:
        said.extend(str(w.message) for w in caught if str(w.message).startswith("ActivationSparsity:"))
    return monitor


def test_temporal_dim_on_the_time_axis_measures_change_along_it() -> None:
    # every step of T differs from the previous one: nothing unchanged (by hand)
    assert temporal_fit(1, ["net.act"]).history["sparsity/net.act/temporal_frac"].values[-1] == 0.0


def test_temporal_dim_zero_is_refused_as_the_sample_axis() -> None:
    # before: accepted, and temporal_frac = 1.0 (the examples of the batch are equal) instead of 0.0
    with pytest.raises(LightningActError, match=r"^ActivationSparsity: temporal_dim=0 is the sample axis .*; pass"):
        ActivationSparsity(temporal_dim=0)


@pytest.mark.parametrize("temporal_dim", [-3, 9])
def test_a_temporal_dim_that_is_the_sample_axis_or_no_axis_of_a_tap_is_unknown_and_said_once(temporal_dim: int) -> None:
    # before: -3 measured change across examples (1.0 where the time axis gives 0.0); a refusal in the forward hook
    # (this round's first fix) ended a fit whose tap first ran after training had begun
    said: list[str] = []
    monitor = temporal_fit(temporal_dim, ["net.act"], said)
    assert monitor.history["sparsity/net.act/zero_frac"].steps == [0, 1]  # the fit ran on, the rest was measured
    assert "sparsity/net.act/temporal_frac" not in monitor.history
    causes = [line for line in said if "temporal_frac" in line]
    assert len(causes) == 1 and f"temporal_dim={temporal_dim}" in causes[0] and "sample axis" in causes[0]


def test_a_two_axis_tap_has_no_time_axis_and_is_not_refused() -> None:
    # (B, D) taps are read as they are, as a declared batch_dim leaves them: temporal_frac unknown, not logged
    history = temporal_fit(9, ["net.head"]).history
    assert "sparsity/net.head/zero_frac" in history and "sparsity/net.head/temporal_frac" not in history


def test_the_target_cett_refusal_names_its_class() -> None:
    with pytest.raises(LightningActError, match=r"^ActivationSparsity: target_cett=1 is outside \(0, 1\)"):
        ActivationSparsity(target_cett=1)
