"""ActivationSparsity: known-answer tests of the zero fraction, CETT and temporal sparsity."""

from __future__ import annotations

import csv
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks.sparsity import ActivationSparsity
from lightning_act.errors import LightningActError
from lightning_act.stats.sparsity import (
    cett_grid,
    cett_partials,
    cett_threshold,
    temporal_fraction,
    temporal_partials,
    zero_fraction,
    zero_partials,
)


# ------------------------------------------------------------------------------ zero fraction
def test_zero_fraction_counts_exact_zeros_threshold_and_nonfinite() -> None:
    x = torch.tensor([0.0, -0.0, 0.05, -0.2, 3.0, float("nan"), 0.0, 1.0])
    exact = zero_fraction(zero_partials(x))
    assert exact["zero_frac"].item() == 3 / 8
    assert exact["nonfinite"].item() == 1
    assert zero_fraction(zero_partials(x, threshold=0.1))["zero_frac"].item() == 4 / 8


def test_zero_fraction_adds_across_splits() -> None:
    x = torch.relu(torch.randn(12, 5, 7, generator=torch.Generator().manual_seed(0)))
    whole = zero_partials(x)
    parts = zero_partials(x[:5]) + zero_partials(x[5:])
    assert torch.equal(whole, parts)
    assert zero_fraction(whole)["zero_frac"].item() == pytest.approx(float((x.numpy() == 0).mean()), abs=1e-15)


# ------------------------------------------------------------------------------ temporal sparsity
def test_temporal_fraction_on_a_hand_built_sequence() -> None:
    sequence = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 4.0], [1.0, 5.0, 4.0], [1.0, 5.0, 4.0]]])
    # changes between consecutive steps: [0,0,1], [0,3,0], [0,0,0] -> 7 of 9 unchanged
    assert temporal_fraction(temporal_partials(sequence, dim=1, eps=0.0)).item() == pytest.approx(7 / 9, abs=1e-15)
    # with eps = 1 the change of 1 also counts as unchanged -> 8 of 9
    assert temporal_fraction(temporal_partials(sequence, dim=1, eps=1.0)).item() == pytest.approx(8 / 9, abs=1e-15)
    # along the feature axis the changes are (1,1), (1,2), (4,-1), (4,-1): none unchanged
    assert temporal_fraction(temporal_partials(sequence, dim=2, eps=0.0)).item() == 0.0


def test_a_sample_by_feature_tap_has_no_time_axis() -> None:
    # Before: temporal_dim=1 on a (B, D) tap compared neighbouring features as if they were time steps.
    from lightning_act.stats.sparsity import has_time_axis

    assert not has_time_axis(torch.zeros(8, 5), 1)
    assert has_time_axis(torch.zeros(8, 5, 3), 1) and has_time_axis(torch.zeros(8, 3, 5), 2)
    assert not has_time_axis(torch.zeros(8, 1, 3), 1)


def test_temporal_steps_are_compared_with_eps_as_real_numbers() -> None:
    # float32 0.1 is 0.10000000149..., above the real 0.1: a step of it changed at eps=0.1; a step from -1e-8 to 1
    # is 1.00000001 (its float32 difference rounds to 1.0), above eps=1. Both counted as unchanged before round 17.
    step = torch.tensor([[[0.0], [0.1]]])
    assert float(step[0, 1, 0]) > 0.1
    assert temporal_fraction(temporal_partials(step, dim=1, eps=0.1)).item() == 0.0
    assert temporal_fraction(temporal_partials(torch.tensor([[[-1e-8], [1.0]]]), dim=1, eps=1.0)).item() == 0.0
    assert temporal_fraction(temporal_partials(torch.tensor([[[0.0], [0.5]]]), dim=1, eps=0.5)).item() == 1.0


# ------------------------------------------------------------------------------ CETT
def brute_force_cett(a: np.ndarray, w: np.ndarray, target: float) -> tuple[float, float, np.ndarray]:
    """Exact threshold and activation ratio by enumerating every cut of the sorted ||n_i|| values.

    Returns ``(v, ratio, m)``: the token-averaged CETT first reaches ``target`` for any
    ``eps`` just above ``v``; ``ratio`` is the fraction of pairs with ``||n_i|| > v`` there.
    """
    m = np.abs(a) * np.linalg.norm(w, axis=0)
    full = np.linalg.norm(a @ w.T, axis=1)
    for v in np.unique(m):
        tail = m <= v
        cett = np.mean(np.linalg.norm(np.where(tail, a, 0.0) @ w.T, axis=1) / full)
        if cett >= target:
            return float(v), float(np.mean(m > v)), m
    raise AssertionError("target not reached")


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_cett_ratio_matches_float64_brute_force(target: float) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((24, 20)) * rng.gamma(0.5, 1.0, size=(24, 20))
    w = rng.standard_normal((7, 20))
    v, exact_ratio, m = brute_force_cett(a, w, target)

    grid = cett_grid(torch.from_numpy(w), size=3000, low=1e-5, high=1e2)
    sums = cett_partials(torch.from_numpy(a), torch.from_numpy(w), grid)
    result = cett_threshold(sums, grid, target)
    ratio, eps = result["cett_ratio"].item(), result["cett_eps"].item()

    # the grid points bracketing the exact threshold bound the exact ratio, and so the result
    eps_grid = grid.numpy()
    upper = int(np.searchsorted(eps_grid, v, side="right"))
    ratio_low, ratio_high = np.mean(m >= eps_grid[upper]), np.mean(m >= eps_grid[upper - 1])
    assert ratio_low <= exact_ratio <= ratio_high
    assert ratio_low - 1e-12 <= ratio <= ratio_high + 1e-12
    assert eps_grid[upper - 1] <= eps <= eps_grid[upper]
    assert ratio == pytest.approx(exact_ratio, abs=2 / m.size)


def test_cett_partials_add_across_splits_and_skip_zero_tokens() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(30, 16, generator=generator, dtype=torch.float64))
    a[4] = 0.0  # a token with no output has no CETT and must not count
    w = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    grid = cett_grid(w, size=32)
    whole = cett_partials(a, w, grid)
    split = cett_partials(a[:11], w, grid) + cett_partials(a[11:], w, grid)
    assert whole[0].item() == 29
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=1e-6)


def test_cett_target_outside_the_grid_is_nan() -> None:
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(10, 8, generator=generator)
    w = torch.randn(4, 8, generator=generator)
    grid = cett_grid(w, size=8, low=10.0, high=100.0)  # every neuron is already in the tail
    result = cett_threshold(cett_partials(a, w, grid), grid, 0.2)
    assert math.isnan(result["cett_ratio"].item()) and math.isnan(result["cett_eps"].item())


# ------------------------------------------------------------------------------ the callback in a Trainer
class QuarterGate(nn.Module):
    """Outputs ``mask * (|x| + 1)`` with a fixed mask of exactly 75% zeros: zero_frac is exactly 0.75."""

    def __init__(self, width: int) -> None:
        super().__init__()
        mask = torch.zeros(width)
        mask[: width // 4] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * (x.abs() + 1.0)


class TinySequenceMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.gate = QuarterGate(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.act(self.fc1(x)))).mean(dim=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def sequence_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 6, generator=generator)
    x[:, 2] = x[:, 1]  # one repeated time step: part of the activations does not change
    y = torch.randint(0, 3, (64,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def read_csv_columns(path: str) -> dict[str, list[float]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows if row[key] != ""] for key in rows[0]}


def test_sparsity_monitor_in_trainer_fit_logs_to_csv_and_resumes(tmp_path) -> None:
    pl.seed_everything(0)
    monitor = ActivationSparsity(
        modules=["act", "gate"], every_n_steps=2, cett_modules="fc2", temporal_dim=1,
    )
    trainer = pl.Trainer(
        max_steps=6, logger=CSVLogger(tmp_path, name="csv"), callbacks=[monitor], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    trainer.fit(TinySequenceMLP(), sequence_loader())
    columns = read_csv_columns(trainer.loggers[0].experiment.metrics_file_path)

    assert columns["sparsity/gate/zero_frac"] == [0.75, 0.75, 0.75]
    relu_zero = columns["sparsity/act/zero_frac"]
    assert len(relu_zero) == 3 and all(0.0 < v < 1.0 for v in relu_zero)
    # time step 2 repeats step 1, so at least 1 of 4 consecutive pairs is unchanged, and all of the gate's zeros
    assert all(v >= 0.25 for v in columns["sparsity/act/temporal_frac"])
    assert all(0.75 <= v <= 1.0 for v in columns["sparsity/gate/temporal_frac"])
    cett = columns["sparsity/fc2-input/cett_ratio"]
    assert len(cett) == 3 and all(0.0 < v <= 0.25 for v in cett)  # only the gate's open quarter is active
    assert all(v > 0 for v in columns["sparsity/fc2-input/cett_eps"])
    assert (tmp_path / "csv" / "version_0" / "plots" / "sparsity_zero_frac_heatmap.png").exists()

    restored = ActivationSparsity(modules=["act", "gate"], cett_modules="fc2", temporal_dim=1)
    restored.load_state_dict(monitor.state_dict())
    series = restored.series("zero_frac")["gate"]
    assert series.steps == [0, 2, 4] and series.values == [0.75, 0.75, 0.75]


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a Linear whose weight is stored ``(nx, nf)``, computing ``x @ W + b``; only
    ``nf`` is kept, as older transformers versions do (an ``nx`` read crashed every monitor)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class GPT2StyleMLP(TinySequenceMLP):
    """GPT-2's MLP shape: GELU (no ties among the ``||n_i||``) into a ``Conv1D`` down-projection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = Conv1D(3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x))).mean(dim=1)


def test_cett_of_a_gpt2_conv1d_down_projection_matches_float64_brute_force() -> None:
    pl.seed_everything(0)
    model = GPT2StyleMLP()
    seen = []
    model.fc2.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double().numpy().copy()))
    monitor = ActivationSparsity(
        modules=["fc1"], every_n_steps=1, cett_modules="fc2", cett_grid_size=4000, cett_grid_range=(1e-4, 1e2)
    )
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    weight = model.fc2.weight.detach().double().numpy().T.copy()  # (d_model, d_ff), as nn.Linear stores it
    trainer.fit(model, sequence_loader())
    a = seen[0].reshape(-1, 16)  # the step's 80 tokens (under cett_max_tokens: all of them)
    v, exact_ratio, m = brute_force_cett(a, weight, 0.2)
    grid = cett_grid(torch.from_numpy(weight), size=4000, low=1e-4, high=1e2).numpy()
    upper = int(np.searchsorted(grid, v, side="right"))
    ratio_low, ratio_high = np.mean(m >= grid[upper]), np.mean(m >= grid[upper - 1])
    ratio = monitor.history["sparsity/fc2-input/cett_ratio"].values[0]
    assert ratio_low <= exact_ratio <= ratio_high
    assert ratio_low - 1e-9 <= ratio <= ratio_high + 1e-9
    assert ratio == pytest.approx(exact_ratio, abs=2 / m.size)


def test_cett_modules_must_be_linear() -> None:
    monitor = ActivationSparsity(modules=["act"], cett_modules="act")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(LightningActError, match="down-projection"):
        monitor.setup(trainer, TinySequenceMLP(), "fit")


def test_bad_target_cett_is_a_clear_error() -> None:
    with pytest.raises(LightningActError, match="target_cett"):
        ActivationSparsity(target_cett=1.5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_zero_fractions_of_several_taps_are_each_taps_own(accumulate: int) -> None:
    # Without CETT or temporal sparsity the monitor keeps each tap's fused sums until the logging step and
    # summarises all taps at once: each value must stay its tap's, with one or two micro-batches per step.
    pl.seed_everything(0)
    task = TinySequenceMLP()
    relu_outputs: list[np.ndarray] = []
    task.act.register_forward_hook(lambda m, a, out: relu_outputs.append(out.detach().numpy().copy()))
    monitor = ActivationSparsity(modules=["gate", "act"], every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=3, logger=False, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", accumulate_grad_batches=accumulate,
    )
    trainer.fit(task, sequence_loader())
    assert monitor.history["sparsity/gate/zero_frac"].values == [0.75, 0.75, 0.75]
    assert len(relu_outputs) == 3 * accumulate
    steps = [np.concatenate(relu_outputs[i : i + accumulate]) for i in range(0, len(relu_outputs), accumulate)]
    expected = [float((out == 0).mean()) for out in steps]
    assert monitor.history["sparsity/act/zero_frac"].values == pytest.approx(expected, rel=1e-12)
    assert all(0.0 < v < 1.0 and v != 0.75 for v in expected)
    assert monitor.history["sparsity/act/nonfinite"].values == [0.0, 0.0, 0.0]


class Recorded(Callback):
    """Per training step: the down-projection's input and the weight its forward used, read by an own forward hook
    after the module ran (so after any pre-hook that recomputes the weight)."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.step = 0
        module.register_forward_hook(self.keep)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.step = trainer.global_step

    def keep(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if module.training:
            self.seen[self.step] = (args[0].detach().double().numpy().reshape(-1, 16).copy(),
                                    module.weight.detach().double().numpy().copy())


class GELUMLP(TinySequenceMLP):
    """GELU into ``fc2``: no ties among the ``||n_i||`` and no token without an output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x))).mean(dim=1)


def fit_cett(model: TinySequenceMLP, max_steps: int, *callbacks: Callback) -> tuple[ActivationSparsity, Recorded]:
    """Fit ``model`` with CETT on ``fc2`` at every step on a fine grid (1.0035x between points), recorded alike."""
    recorded = Recorded(model.fc2)
    monitor = ActivationSparsity(
        modules=["fc1"], every_n_steps=1, cett_modules="fc2", cett_grid_size=4000, cett_grid_range=(1e-4, 1e2)
    )
    trainer = pl.Trainer(max_steps=max_steps, logger=False, callbacks=[monitor, recorded, *callbacks],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu")
    trainer.fit(model, sequence_loader())
    return monitor, recorded


def assert_cett_matches_brute_force(monitor: ActivationSparsity, recorded: Recorded, steps: list[int]) -> None:
    eps = monitor.history["sparsity/fc2-input/cett_eps"]
    ratio = monitor.history["sparsity/fc2-input/cett_ratio"]
    assert eps.steps == ratio.steps == steps
    spacing = 10 ** (6 / 3999)
    for step, logged_eps, logged_ratio in zip(steps, eps.values, ratio.values):
        v, exact_ratio, m = brute_force_cett(*recorded.seen[step], 0.2)
        # the interpolation lies between the grid points that bracket the exact threshold, one spacing apart
        assert logged_eps == pytest.approx(v, rel=spacing - 1 + 1e-9), step
        assert np.mean(m >= logged_eps * spacing) <= logged_ratio <= np.mean(m >= logged_eps / spacing), step
        assert logged_ratio == pytest.approx(exact_ratio, abs=0.01), step


def test_cett_after_model_pruning_reads_the_weight_the_forward_uses() -> None:
    """``ModelPruning`` prunes at an epoch's end and adds torch's pruning pre-hook, which sets ``fc2.weight`` to
    ``weight_orig * weight_mask`` at each forward, after the monitor's input hook: before, CETT used the previous
    step's weight (at the first pruned step, the trained weights where the lottery-ticket reset had rewound them)."""
    from lightning.pytorch.callbacks import ModelPruning

    pl.seed_everything(0)
    model = GELUMLP()
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.fc2, "weight")], amount=0.5, verbose=0)
    monitor, recorded = fit_cett(model, 6, pruning)  # 4 steps an epoch: steps 4 and 5 pruned
    assert_cett_matches_brute_force(monitor, recorded, list(range(6)))
    assert (recorded.seen[5][1] == 0).mean() == 0.5


def test_cett_with_half_the_neurons_pruned_and_with_none_left() -> None:
    """Structured pruning zeroes whole columns of the down-projection: before, once half of them were zero the grid's
    scale (the median column norm) was 0, and CETT was NaN at every step, without a word. With every column zero no
    token has an output: CETT is undefined, said once, and not logged."""
    from torch.nn.utils import prune

    pl.seed_everything(0)
    model = GELUMLP()
    prune.ln_structured(model.fc2, "weight", amount=0.5, n=2, dim=1)
    monitor, recorded = fit_cett(model, 3)
    assert (np.linalg.norm(recorded.seen[0][1], axis=0) == 0).sum() == 8
    assert_cett_matches_brute_force(monitor, recorded, [0, 1, 2])

    model = TinySequenceMLP()
    prune.custom_from_mask(model.fc2, "weight", torch.zeros_like(model.fc2.weight))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, _ = fit_cett(model, 2)
    assert not [key for key in monitor.history if key.startswith("sparsity/fc2-input/")]  # before: NaN at each step
    assert monitor.history["sparsity/fc1/zero_frac"].steps == [0, 1]
    said = [str(w.message) for w in caught if str(w.message).startswith("ActivationSparsity: fc2-input ")]
    assert len(said) == 1 and "every weight column or every activation entering it was zero" in said[0]


def test_cett_tokens_are_not_one_position_when_the_batch_lines_up_with_the_sequence() -> None:
    # 256 sequences of 5 tokens, 256 tokens kept: every 5th flattened row was kept, i.e. token 0 of every sequence
    # (a 197-token ViT at batch 256 does the same), and the logged CETT described the CLS token alone.
    batch, tokens, d_ff, d_model = 256, 5, 16, 4
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(batch, tokens, d_ff, generator=generator, dtype=torch.float64).abs()
    a[:, 0] = 1e-3 * torch.rand(batch, d_ff, generator=generator, dtype=torch.float64)
    a[:, 0, :2] = 5.0  # token 0: two dominant neurons, a ratio near 2/16
    w = torch.randn(d_model, d_ff, generator=generator, dtype=torch.float64)

    class Fixed(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Identity()
            self.fc2 = nn.Linear(d_ff, d_model, bias=False, dtype=torch.float64)
            self.fc2.weight.data.copy_(w)
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

        def training_step(self, batch, batch_idx):
            return self.fc2(self.act(a * self.scale)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = ActivationSparsity(modules=[], cett_modules="fc2", every_n_steps=1, cett_grid_size=2000)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(Fixed(), DataLoader(TensorDataset(torch.zeros(1)), batch_size=1))

    # float64 bisection on eps over every token of the step: the ratio of pairs above the threshold
    flat, weight = a.reshape(-1, d_ff).numpy(), w.numpy()
    m = flat * np.linalg.norm(weight, axis=0)
    full = np.linalg.norm(flat @ weight.T, axis=1)
    low, high = 1e-12, 2 * m.max()
    for _ in range(80):
        mid = math.sqrt(low * high)
        below = np.mean(np.linalg.norm(np.where(m < mid, flat, 0.0) @ weight.T, axis=1) / full) < 0.2
        low, high = (mid, high) if below else (low, mid)
    exact = float(np.mean(m >= high))  # 0.41 over all tokens (the strided rows gave 0.10: token 0)
    assert monitor.history["sparsity/fc2-input/cett_ratio"].values[0] == pytest.approx(exact, abs=0.05)


def test_two_monitors_of_one_class_save_a_figure_each(tmp_path) -> None:
    # Before: both wrote plots/sparsity_zero_frac_heatmap.png (and the same logger key): the first one's layer was lost.
    from _toy import BlockNet, ToyTask, toy_loader

    first = ActivationSparsity(modules=["net.blocks.0.act"], every_n_steps=1)
    second = ActivationSparsity(modules=["net.blocks.1.act"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=2, logger=CSVLogger(tmp_path, name="csv"), callbacks=[first, second],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(ToyTask(BlockNet()), toy_loader())
    plots = tmp_path / "csv" / "version_0" / "plots"
    assert sorted(p.name for p in plots.glob("*.png")) == ["sparsity_zero_frac_heatmap.png", "sparsity_zero_frac_heatmap_2.png"]


def test_temporal_sums_keep_one_layout_when_the_time_axis_comes_and_goes() -> None:
    # Before: a tap with a time axis in one micro-batch (or rank) and none in another (one frame; or a (B, D) tap
    # beside it) packed 5 sums once and 3 the other time: the accumulation (or DDP's packed all_reduce) failed.
    lengths = iter([3, 1, 1, 3])  # frames per micro-batch: two accumulated steps, each with one short batch

    class Clips(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.frames, self.pool = nn.Conv1d(2, 4, 1), nn.Identity()
            self.head = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x = batch[0][:, :, : next(lengths)]  # (B, 2, L)
            return self.head(self.pool(self.frames(x).mean(-1))).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    seen: list[np.ndarray] = []
    model = Clips()
    model.frames.register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy()))
    monitor = ActivationSparsity(modules=["frames", "pool"], every_n_steps=1, temporal_dim=2, temporal_eps=0.05)
    data = TensorDataset(torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0)).round(decimals=1))
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, callbacks=[monitor],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu")
    with pytest.warns(UserWarning, match=r"ActivationSparsity: pool temporal_frac is unknown at step 0 \(no two "
                                         r"consecutive steps along temporal_dim=2"):
        trainer.fit(model, DataLoader(data, batch_size=2))
    for step, frames in enumerate((seen[0], seen[3])):  # the one micro-batch of each step with consecutive frames
        pairs = np.abs(np.diff(frames, axis=2))
        expected = np.mean(pairs <= 0.05)
        assert monitor.history["sparsity/frames/temporal_frac"].values[step] == pytest.approx(expected, abs=1e-12)
    assert "sparsity/pool/temporal_frac" not in monitor.history and "sparsity/pool/zero_frac" in monitor.history


class LoRARecorded(Recorded):
    """Per training step: the LoRA down-projection's input and its merged weight ``W + scaling · B A``, in numpy
    float64 from the parameters its forward used."""

    def keep(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if module.training:
            base = module.base.weight.detach().double().numpy()
            update = module.lora_b.detach().double().numpy() @ module.lora_a.detach().double().numpy()
            self.seen[self.step] = (args[0].detach().double().numpy().reshape(-1, 16).copy(),
                                    base + module.scaling * update)


def test_cett_of_a_lora_down_projection_uses_its_merged_weight() -> None:
    """Before: ``cett_modules="fc2"`` on a LoRA-wrapped ``fc2`` was refused ("a LoRALinear; ... pass a glob like
    '*.mlp.fc2'"), and ``"fc2.base"`` ran CETT with the frozen ``W`` alone, not the layer the model computes."""
    from lightning_act.peft.lora import apply_lora

    pl.seed_everything(0)
    model = GELUMLP()
    lora = apply_lora(model, ["fc2"], rank=2, alpha=4.0)["fc2"]
    with torch.no_grad():
        lora.lora_b.normal_(0.0, 0.2)  # B trains at lr 0.1, so the merged weight changes at every step
    recorded = LoRARecorded(model.fc2)
    monitor = ActivationSparsity(
        modules=["fc1"], every_n_steps=1, cett_modules="fc2", cett_grid_size=4000, cett_grid_range=(1e-4, 1e2)
    )
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[monitor, recorded], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, sequence_loader())
    assert not np.allclose(recorded.seen[0][1], recorded.seen[2][1])
    assert_cett_matches_brute_force(monitor, recorded, [0, 1, 2])
    _, frozen_ratio, _ = brute_force_cett(recorded.seen[0][0], model.fc2.base.weight.detach().double().numpy(), 0.2)
    # the frozen W alone gives another CETT: the test tells the two weights apart
    assert abs(monitor.history["sparsity/fc2-input/cett_ratio"].values[0] - frozen_ratio) > 0.05

    base_only = ActivationSparsity(modules=["fc1"], cett_modules="fc2.base")
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[base_only], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(LightningActError, match=r"'fc2.base-input', the frozen base of a LoRALinear: .* e.g. 'fc2'$"):
        trainer.fit(model, sequence_loader())
