"""DimensionalCollapse inside a real Trainer: values against numpy, flag and warning, r90, CSV, resume."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks.collapse import DimensionalCollapse
from lightning_act.errors import LightningActError, ModuleSelectionError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Bottleneck(nn.Module):
    """16 → 3 → 16 with no nonlinearity: its output has rank <= 3 after centring."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(16, 3)
        self.up = nn.Linear(3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.blocks = nn.Sequential(Bottleneck(), Bottleneck())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 16, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (96,), generator=generator)), batch_size=48)


class Recorder(Callback):
    """Independent record: block outputs of the first training forward, weights after each step."""

    def __init__(self) -> None:
        self.first_output: np.ndarray | None = None
        self.weights: list[np.ndarray] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights.append(self._weights(pl_module))

        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            if self.first_output is None:
                self.first_output = output.detach().double().numpy().copy()

        self.handle = pl_module.blocks[1].register_forward_hook(hook)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.weights.append(self._weights(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.handle.remove()

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> np.ndarray:
        chosen = [p for n, p in pl_module.named_parameters() if n.startswith("blocks") and p.dim() == 2]
        return np.concatenate([p.detach().double().reshape(-1).numpy() for p in chosen])


def fit(tmp_path: Path, callbacks: list[Callback], steps: int, ckpt_path: str | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path, name="csv"), callbacks=callbacks, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(Net(), loader(), ckpt_path=ckpt_path)
    return trainer


def numpy_spectrum_stats(data: np.ndarray) -> tuple[float, float]:
    lam = np.linalg.eigvalsh(np.cov(data, rowvar=False, bias=True))
    lam = lam[lam > lam.max() * 1e-12]
    sigma = np.sqrt(lam)
    p = sigma / sigma.sum()
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


def numpy_r90(snapshots: np.ndarray) -> int:
    centred = snapshots - snapshots.mean(0)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variance) / variance.sum(), 0.9 - 1e-12) + 1)


def test_collapse_in_trainer_values_flag_warning_r90_and_csv(tmp_path: Path) -> None:
    monitor = DimensionalCollapse(modules=["inp", "@blocks"], every_n_steps=1, warn_below=0.5, projection_dim=None)
    recorder = Recorder()
    with pytest.warns(UserWarning, match="blocks.1 collapsed at step 0"):
        trainer = fit(tmp_path, [monitor, recorder], steps=6)

    assert [t.name for t in monitor.taps] == ["inp", "blocks.0", "blocks.1"]
    assert recorder.first_output is not None
    erank, pr = numpy_spectrum_stats(recorder.first_output)
    assert monitor.history["collapse/blocks.1/erank"].values[0] <= 3.0 + 1e-9
    assert monitor.history["collapse/blocks.1/erank"].values[0] == pytest.approx(erank, rel=1e-8)
    assert monitor.history["collapse/blocks.1/pr"].values[0] == pytest.approx(pr, rel=1e-8)
    assert monitor.history["collapse/blocks.1/erank_frac"].values[0] == pytest.approx(erank / 16, rel=1e-8)
    assert monitor.history["collapse/blocks.1/collapsed"].values == [1.0] * 6
    assert monitor.history["collapse/inp/collapsed"].values == [0.0] * 6
    assert monitor.collapsed == {"blocks.0", "blocks.1"}

    # r90 of the weights (2-D weights inside the blocks) at fit start and after each step.
    assert monitor.param_names == [f"blocks.{i}.{p}.weight" for i in (0, 1) for p in ("down", "up")]
    r90 = monitor.history["collapse/params/r90"]
    assert r90.steps == [0, 1, 2, 3, 4, 5]
    assert r90.values == [float(numpy_r90(np.stack(recorder.weights[: k + 2]))) for k in range(6)]

    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for tap in ("inp", "blocks.0", "blocks.1"):
        for stat in ("erank", "pr", "erank_frac", "pr_frac", "collapsed"):
            assert f"collapse/{tap}/{stat}" in columns
    assert "collapse/params/r90" in columns
    logged = [row for row in rows if row["collapse/params/r90"]]
    assert [int(row["step"]) for row in logged] == list(range(6))
    assert all(row["collapse/blocks.1/erank"] for row in logged)
    assert (Path(trainer.loggers[0].log_dir) / "plots" / "collapse_erank_heatmap.png").exists()


def test_rows_are_sampled_with_a_private_generator() -> None:
    monitor = DimensionalCollapse(max_rows=10)
    tokens = torch.randn(4, 7, 5)
    before = torch.get_rng_state()
    part = monitor.partials(0, tokens)
    assert torch.equal(before, torch.get_rng_state())
    assert part.sums[0].item() == 10
    assert part.sums.numel() == 1 + 5 + 25
    conv = monitor.partials(1, torch.randn(2, 3, 2, 2))
    assert conv.sums[0].item() == 8 and conv.sums.numel() == 1 + 3 + 9


@pytest.mark.filterwarnings("ignore:DimensionalCollapse")
def test_resume_restores_histories_and_trajectory(tmp_path: Path) -> None:
    def monitor() -> DimensionalCollapse:
        # 48 rows per batch, 16 sampled: the resumed fit must sample the rows the uninterrupted one sampled.
        return DimensionalCollapse(every_n_steps=2, warn_below=0.5, projection_dim=64, max_rows=16)

    straight = monitor()
    fit(tmp_path / "straight", [straight], steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    first = monitor()
    fit(tmp_path, [first, checkpoint], steps=4)
    saved = first.state_dict()
    assert first.history["collapse/head-input/erank"].steps == [0, 2]

    resumed = monitor()
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, every_n_train_steps=4)
    fit(tmp_path, [resumed, again], steps=8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.history["collapse/head-input/erank"].steps == [0, 2, 4, 6]
    saved_values = saved["history"]["collapse/head-input/erank"]["values"]
    assert resumed.history["collapse/head-input/erank"].values[:2] == saved_values
    assert resumed.history["collapse/params/r90"].steps == [0, 2, 4, 6]
    assert len(resumed.state_dict()["trajectory"]["snapshots"]) == 5
    kept = saved["trajectory"]["snapshots"]
    for old, new in zip(kept, resumed.state_dict()["trajectory"]["snapshots"][: len(kept)], strict=True):
        assert torch.equal(old, new)
    assert resumed.collapsed == set(saved["collapsed"])
    for key, series in straight.history.items():
        assert resumed.history[key].steps == series.steps, key
        assert resumed.history[key].values == pytest.approx(series.values, rel=1e-12), key



def test_snapshots_stay_bounded_and_span_the_run() -> None:
    monitor = DimensionalCollapse(max_snapshots=4)
    for step in range(10):
        monitor._add_snapshot(step, torch.full((3,), float(step)))
    steps = monitor.state_dict()["trajectory"]["steps"]
    assert len(steps) < 4 and steps[0] == 0 and steps[-1] >= 6


def test_bad_arguments_and_patterns(tmp_path: Path) -> None:
    with pytest.raises(LightningActError, match="warn_below"):
        DimensionalCollapse(warn_below=1.5)
    with pytest.raises(LightningActError, match="max_rows"):
        DimensionalCollapse(max_rows=1)
    monitor = DimensionalCollapse(param_patterns=["nothing.*"])
    with pytest.raises(ModuleSelectionError, match="param_patterns"):  # at fit start, before any step
        fit(tmp_path, [monitor], steps=1)
    assert not monitor.history


def test_snapshot_with_the_kept_hash_equals_per_parameter_sketches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The every-step fast path (one hash for all weights, kept) gives the same sketch as drawing it per parameter."""
    from lightning_act.callbacks import collapse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    monitor = collapse.DimensionalCollapse(projection_dim=64)
    monitor.param_names = ["0.weight", "2.weight"]
    kept = monitor._snapshot(monitor._chosen_weights(model, monitor.param_names))
    assert monitor._sketch_draws is not None and monitor._sketch_draws.numel() == 40 * 30 + 30 * 20
    monkeypatch.setattr(collapse, "CACHED_HASH_POSITIONS", 0)
    drawn = monitor._snapshot(monitor._chosen_weights(model, monitor.param_names))
    expected = np.zeros(64)
    offset = 0
    for weight in (model[0].weight, model[2].weight):  # count sketch by hand: one signed bucket per position
        draws = collapse.count_sketch_draws(weight.numel(), 64, monitor.seed, offset).numpy()
        signs = np.where(draws >= 64, 1.0, -1.0)
        np.add.at(expected, draws % 64, signs * weight.detach().reshape(-1).double().numpy())
        offset += weight.numel()
    torch.testing.assert_close(kept, drawn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kept.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_snapshots_the_thinning_drops_are_not_taken_and_r90_is_unchanged() -> None:
    """Every step due: after the trajectory fills, only the snapshots it keeps are computed; r90 is that of the
    kept snapshots at every step, as before."""
    import types

    from lightning_act.callbacks.collapse import DimensionalCollapse

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    monitor = DimensionalCollapse(max_snapshots=4)
    monitor.param_names = ["weight"]
    taken: list[int] = []
    snapshot = monitor._snapshot
    monitor._snapshot = lambda module: taken.append(1) or snapshot(module)  # type: ignore[method-assign]
    trainer = types.SimpleNamespace(lightning_module=model)
    for step in range(16):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        logged = monitor.extra_statistics(trainer, step)
        expected = monitor.params_r90()
        assert (expected is None and not logged) or logged["collapse/params/r90"].item() == expected
    assert len(taken) == 8  # steps 0, 1, 2, 3, 4, 6, 8, 12: the ones the stride-doubling thinning keeps
    assert monitor._snapshot_steps == [0, 8]


class Mixed(pl.LightningModule):
    """Token taps (B, T, 8) and a pooled tap (B, 5); ``mix``'s output is changed in place after its hook ran."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.mix = nn.Linear(8, 8)
        self.pool = nn.Linear(8, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.embed(x))
        h.relu_()  # the monitor must measure what mix returned, not this
        return self.head(self.pool(h.mean(1)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepOutputs(Callback):
    """Float64 copies of each tapped module's outputs, per optimizer step, taken when the module returns."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seen: dict[int, dict[str, list[np.ndarray]]] = {}
        self.step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(name: str):
            def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
                rows = output.detach().double().reshape(-1, output.shape[-1]).cpu().numpy().copy()
                self.seen.setdefault(self.step, {}).setdefault(name, []).append(rows)
            return record

        self.handles = [getattr(pl_module, n).register_forward_hook(hook(n)) for n in self.names]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.step = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    ("accumulate", "device", "overlap"),
    [
        (1, "cpu", False), (2, "cpu", False), (1, "cpu", True),
        pytest.param(1, "cuda", False, marks=needs_cuda), pytest.param(1, "cuda", True, marks=needs_cuda),
    ],
)
def test_taps_of_several_shapes_match_numpy_with_one_or_two_forwards_per_step(
    accumulate: int, device: str, overlap: bool
) -> None:
    # The logging step sums the kept rows of all taps of one shape in one batched product: two (B, T, 8) taps
    # and one (B, 5) tap, one or two micro-batches per step, and a tap whose output is changed in place later.
    # On CUDA, with overlap_spectra the spectra are solved on a stream of their own alongside the backward (on a
    # CPU the option does nothing): the same values.
    names = ["embed", "mix", "pool"]
    eigensolver = "triton" if device == "cuda" and importlib.util.find_spec("triton") else "auto"
    monitor = DimensionalCollapse(
        modules=names, every_n_steps=1, param_patterns=[], overlap_spectra=overlap, eigensolver=eigensolver
    )
    outputs = StepOutputs(names)
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(48, 4, 6, generator=generator), torch.randint(0, 4, (48,), generator=generator)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=3, logger=False, callbacks=[monitor, outputs], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(Mixed(), DataLoader(TensorDataset(x, y), batch_size=8))
    for name in names:
        assert monitor.history[f"collapse/{name}/erank"].steps == [0, 1, 2]
        for index, step in enumerate((0, 1, 2)):
            assert len(outputs.seen[step][name]) == accumulate
            erank, pr = numpy_spectrum_stats(np.concatenate(outputs.seen[step][name]))
            assert monitor.history[f"collapse/{name}/erank"].values[index] == pytest.approx(erank, rel=1e-9)
            assert monitor.history[f"collapse/{name}/pr"].values[index] == pytest.approx(pr, rel=1e-9)


def test_taps_of_one_row_count_share_the_steps_row_choice_and_the_next_step_draws_again() -> None:
    # Row r of the first two activations is (r + 1) e_r, of the third e_r: the sums name the rows that were sampled.
    monitor = DimensionalCollapse(modules=["a", "b", "c"], max_rows=5, param_patterns=[])
    monitor.taps = [SimpleNamespace(name=name) for name in "abc"]
    monitor._reset_buffers(3)
    scale = torch.arange(1.0, 13.0)[:, None]

    def sampled(tap: int, d: int) -> list[int]:
        sums = monitor._sums[tap]
        assert sums[0].item() == 5
        # the rows are summed shifted by one of them; the centred scatter, which the shift leaves alone, has a
        # nonzero diagonal entry in the coordinate of each sampled row (rows are multiples of distinct unit vectors)
        total, squares = sums[1 : 1 + d], sums[1 + d :].reshape(d, d)
        centred = squares - torch.outer(total, total) / 5
        return sorted(torch.diagonal(centred).gt(1e-9).nonzero().flatten().tolist())

    choices = []
    for _ in range(2):
        monitor.receive(0, (scale * torch.eye(12)).reshape(3, 4, 12))
        monitor.receive(1, (2 * scale * torch.eye(12)).reshape(2, 6, 12))  # the same 12 rows in another layout
        monitor.receive(2, torch.eye(10))
        monitor.complete_partials()
        rows_a, rows_b, rows_c = sampled(0, 12), sampled(1, 12), sampled(2, 10)
        assert len(set(rows_a)) == 5 and len(rows_c) == 5
        assert rows_a == rows_b
        assert torch.equal(monitor._sums[1][1:13], 2 * monitor._sums[0][1:13])
        choices.append(rows_a)
        monitor._zero_buffers()
        monitor._observed = set()
    assert choices[0] != choices[1]


def test_a_wide_tap_is_sized_for_the_accumulation_schedule_and_logs_nothing_beyond_its_sketch() -> None:
    import warnings

    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from _toy import ToyTask, quiet_trainer, tiny_mlp, toy_loader

    class AccumulateFromEpoch1(Callback):  # a change of accumulation nothing announces at the start of fit
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.accumulate_grad_batches = 4 if trainer.current_epoch == 1 else 1

    class ExactCollapse(DimensionalCollapse):  # its own key prefix: two monitors of one kind on one module
        prefix = "exact"

    def run(extra: list[Callback]) -> tuple[DimensionalCollapse, DimensionalCollapse, list[str]]:
        torch.manual_seed(0)  # the same seed: both monitors sample the same rows of the 32-wide ReLU output
        sketch = DimensionalCollapse(modules=["net.2"], every_n_steps=1, max_rows=2, wide_dim=8, param_patterns=[])
        exact = ExactCollapse(modules=[nn.ReLU], every_n_steps=1, max_rows=2, wide_dim=None, param_patterns=[])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_epochs=2, callbacks=[sketch, exact, *extra]).fit(ToyTask(tiny_mlp()), toy_loader(32, 8))
        return sketch, exact, [str(w.message) for w in caught if str(w.message).startswith("DimensionalCollapse: net.2 ")]

    # 4 steps of 1 micro-batch, then 1 of 4: k = 2 x 4 = 8 rows, exact for every step (before: k = 2, erank too low)
    sketch, exact, said = run([GradientAccumulationScheduler(scheduling={0: 1, 1: 4})])
    assert sketch._sketch_dims and not said
    assert sketch.history["collapse/net.2/erank"].steps == exact.history["exact/net.2/erank"].steps == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sketch.history["collapse/net.2/erank"].values, exact.history["exact/net.2/erank"].values, rtol=1e-6)

    # unannounced: the sketch (k = 2) gets 8 rows at step 4, so nothing is logged for it then, with one warning
    sketch, exact, said = run([AccumulateFromEpoch1()])
    assert sketch.history["collapse/net.2/erank"].steps == [0, 1, 2, 3] and exact.history["exact/net.2/erank"].steps[-1] == 4
    np.testing.assert_allclose(sketch.history["collapse/net.2/erank"].values, exact.history["exact/net.2/erank"].values[:4], rtol=1e-6)
    assert len(said) == 1 and "got 8 rows at step 4" in said[0] and "max_rows >= 32" in said[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["a further fit", "after lr_find"])
def test_the_trajectory_of_a_backbone_frozen_at_fit_start_is_kept(how: str) -> None:
    # BackboneFinetuning freezes the blocks in on_fit_start and leaves them frozen: the weights were chosen by
    # requires_grad at each setup, so a further fit chose none (and crashed with KeyError 'collapse/params/r90'),
    # and a fit after Tuner.lr_find logged no r90 at all. The same run in one fit logs it at every due step.
    from lightning.pytorch.callbacks import BackboneFinetuning
    from lightning.pytorch.tuner import Tuner

    from _toy import BlockNet, ToyTask, quiet_trainer, toy_loader

    class FineTune(ToyTask):
        def __init__(self) -> None:
            super().__init__(BlockNet())
            self.backbone = self.net.blocks

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    torch.manual_seed(0)
    monitor = DimensionalCollapse(every_n_steps=2)
    model = FineTune()
    trainer = quiet_trainer(max_epochs=1 if how == "a further fit" else 2,
                            callbacks=[monitor, BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    if how == "after lr_find":
        Tuner(trainer).lr_find(model, toy_loader(32, 8), num_training=4, update_attr=False)
    trainer.fit(model, toy_loader(32, 8))
    if how == "a further fit":
        trainer.fit_loop.max_epochs = 2
        trainer.fit(model, toy_loader(32, 8))
    # frozen in the first epoch (steps 0-3): no share of a variance of 0 is defined, and r90 is not logged (it was 0)
    assert monitor.history["collapse/params/r90"].steps == [4, 6]
    assert any(name.startswith("net.blocks.") for name in monitor.param_names)


def test_param_patterns_as_one_string_is_one_glob() -> None:
    """Before: list("blocks.*") made one pattern per character, and "*" chose every parameter."""
    assert DimensionalCollapse(param_patterns="net.blocks.*.fc.weight").param_patterns == ["net.blocks.*.fc.weight"]


def test_a_wide_tap_with_a_mean_far_above_its_spread_logs_the_values_it_logs_without_it() -> None:
    # Before round 20 a wide tap's rows were projected unshifted, and the float32 projection rounds to ~6e-8 of its
    # values: under a common offset of 1e6 on a unit-scale spread the centred rows were lost (erank 0 was logged,
    # round 17; then nothing, "the float32 projection cannot resolve"). Shifted by one of the step's rows, the
    # offset is gone before the projection: the centred scatter, hence every value, is the offset-free one's.
    import warnings

    from _toy import ToyTask, quiet_trainer, toy_loader

    class Offset(nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = offset

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.offset

    def run(offset: float) -> tuple[DimensionalCollapse, list[str]]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), Offset(offset), nn.Linear(32, 4))
        monitor = DimensionalCollapse(modules=["net.2"], every_n_steps=1, max_rows=8, wide_dim=16, param_patterns=[])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=3, callbacks=[monitor]).fit(ToyTask(net, lr=0.0), toy_loader(32, 8))
        said = [str(w.message) for w in caught if str(w.message).startswith("DimensionalCollapse: net.2 ")]
        return monitor, said

    centred, said = run(0.0)
    assert centred._sketch_dims and not said
    assert centred.history["collapse/net.2/erank"].steps == [0, 1, 2]
    assert min(centred.history["collapse/net.2/erank"].values) > 1.0
    shifted, said = run(1e6)
    assert not said
    for stat in ("erank", "pr"):
        series = shifted.history[f"collapse/net.2/{stat}"]
        assert series.steps == [0, 1, 2]
        # the model rounds the offset rows to float32 (spacing 0.0625 at 1e6, on a spread of ~0.5): the values
        # agree to that rounding (measured: erank within 4e-4, PR within 2.4e-3)
        assert series.values == pytest.approx(centred.history[f"collapse/net.2/{stat}"].values, rel=5e-3)


class _FixedRows(pl.LightningModule):
    """Feeds one fixed (N, d) float32 matrix through an identity tap at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.tap = nn.Identity()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.tap(batch[0]).sum() * 0.0 + self.w.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)




@pytest.mark.parametrize(
    ("n", "d", "exponent", "shift", "wide_dim"),
    [
        (512, 128, 1.0, "common", None),  # before round 20: erank -68%
        (512, 256, 2.0, "massive", None),  # -0.9%
        (512, 256, 2.0, "first_row", None),  # -0.2% with round 20's first reference, the first (sampled) row
        (48, 96, 1.0, "common", 64),  # the sketch (k = 48): not logged ("cannot resolve")
        (48, 96, 2.0, "massive", 64),  # the sketch: -0.8%, logged as measured
    ],
)
def test_a_large_mean_keeps_the_spectrum_of_a_power_law_in_a_trainer(
    n: int, d: int, exponent: float, shift: str, wide_dim: int | None
) -> None:
    # The exact path's sums and the sketch's whitening floor were of the unshifted rows, whose round-off (eps times
    # N mean²) buried the tail of the spectrum; the rows are now summed shifted by their mean (not by one of them: the
    # first token carries the massive activations).
    from _toy import power_law_rows, quiet_trainer

    rows = power_law_rows(n, d, exponent, shift)
    monitor = DimensionalCollapse(
        modules=["tap"], every_n_steps=1, max_rows=n, wide_dim=wide_dim, param_patterns=[]
    )
    data = DataLoader(TensorDataset(torch.from_numpy(rows).float()), batch_size=n)
    quiet_trainer(max_steps=1, callbacks=[monitor]).fit(_FixedRows(), data)
    assert bool(monitor._sketch_dims) == (wide_dim is not None)
    centred = rows - rows.mean(0)
    sigma = np.linalg.svd(centred, compute_uv=False)
    sigma = sigma[sigma > 1e-10 * sigma[0]]
    p = sigma / sigma.sum()
    assert monitor.history["collapse/tap/erank"].values == pytest.approx([np.exp(-(p * np.log(p)).sum())], rel=1e-8)
    lam = sigma**2
    assert monitor.history["collapse/tap/pr"].values == pytest.approx([lam.sum() ** 2 / (lam**2).sum()], rel=1e-8)


def test_the_trajectory_follows_pruned_weights_as_the_forward_uses_them() -> None:
    # torch.nn.utils.prune (Lightning's ModelPruning) renames fc.weight to fc.weight_orig and makes fc.weight the
    # masked product: looked up in named_parameters, the chosen name crashed the fit at the next due step.
    from lightning.pytorch.callbacks import ModelPruning

    class RecordsWeights(Callback):
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
            # the weights the next forward uses: `weight` itself is refreshed by prune's pre-hook only at that forward
            modules = [pl_module.get_submodule(n.rpartition(".")[0]) for n in collapse.param_names]
            self.seen.append(torch.cat([(m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight)
                                        .detach().reshape(-1).double() for m in modules]))

    collapse = DimensionalCollapse(modules=["head"], every_n_steps=1, projection_dim=None, max_snapshots=64)
    recorder = RecordsWeights()
    pruning = ModelPruning("l1_unstructured", amount=0.5, use_global_unstructured=False, verbose=0)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[pruning, collapse, recorder], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Net(), loader())
    steps = trainer.global_step
    assert collapse.history["collapse/params/r90"].steps == list(range(steps))
    assert torch.equal(collapse._snapshots[-1], recorder.seen[-1])  # the masked weights, not the pre-pruning ones
    assert int((recorder.seen[-1] == 0).sum()) >= recorder.seen[-1].numel() // 2


def test_a_reused_callback_chooses_the_new_models_weights() -> None:
    # The callback kept the first model's weight names when reused in a new Trainer on another model (or for a
    # further fit with a new head) and crashed with a KeyError at fit start.
    from _toy import ToyTask, quiet_trainer, tiny_mlp, toy_loader

    monitor = DimensionalCollapse(modules=["net.2"], every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(ToyTask(tiny_mlp()), toy_loader())
    first = list(monitor.param_names)
    other = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    other.add_module("classifier", nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="cleared"):
        quiet_trainer(max_steps=3, callbacks=[monitor]).fit(ToyTask(other), toy_loader())
    assert "net.classifier.weight" in monitor.param_names and monitor.param_names != first
    assert monitor.history["collapse/params/r90"].steps == [0, 1, 2]


def test_the_default_trajectory_leaves_out_an_averaged_copy_of_the_model() -> None:
    # Without block stacks the trajectory takes every weight matrix: an EMA kept as a submodule (AveragedModel) was
    # taken too, though no step trains it.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    class WithEma(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    monitor = DimensionalCollapse()
    assert monitor._select_params(WithEma()) == ["net.0.weight", "net.2.weight"]


def test_param_patterns_takes_one_glob_from_a_config_as_from_python() -> None:
    # Python accepted param_patterns="blocks.*.weight"; YAML and the command line refused it (annotated a sequence)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DimensionalCollapse, "collapse")
    config = parser.parse_args(["--collapse.param_patterns", "blocks.*.weight"])
    monitor = parser.instantiate_classes(config).collapse
    assert monitor.param_patterns == DimensionalCollapse(param_patterns="blocks.*.weight").param_patterns == ["blocks.*.weight"]


def test_two_collapse_monitors_following_weights_are_refused_in_one_line() -> None:
    # Before: both logged their own trajectory's r90 under 'collapse/params/r90' at the same steps (two rows per step
    # in metrics.csv; callback_metrics, read by EarlyStopping/ModelCheckpoint, kept whichever ran last).
    from _toy import BlockNet, ToyTask, quiet_trainer, toy_loader
    from lightning_act.errors import LightningActError

    both = [DimensionalCollapse(modules=["net.blocks.0"], every_n_steps=1),
            DimensionalCollapse(modules=["net.blocks.1"], every_n_steps=2)]
    with pytest.raises(LightningActError, match=r"^2 DimensionalCollapse monitors follow a weight trajectory, .* "
                                                r"pass param_patterns=\[\] to all but one of them$"):
        quiet_trainer(max_steps=2, callbacks=both).fit(ToyTask(BlockNet()), toy_loader())
    one = [DimensionalCollapse(modules=["net.blocks.0"], every_n_steps=1),
           DimensionalCollapse(modules=["net.blocks.1"], every_n_steps=2, param_patterns=[])]
    quiet_trainer(max_steps=2, callbacks=one).fit(ToyTask(BlockNet()), toy_loader())
    assert one[0].history["collapse/params/r90"].steps == [0, 1] and "collapse/params/r90" not in one[1].history


# ---------------------------------------------------------------- params/r90 of the weights the forward uses (round 19)
def _numpy_r90(snapshots: list[np.ndarray], fraction: float = 0.9) -> int | None:
    """r90 of float64 snapshots, written out: PCA of the centred snapshots through their Gram matrix."""
    x = np.stack(snapshots).astype(np.float64)
    x = x - x.mean(axis=0)
    eigenvalues = np.clip(np.sort(np.linalg.eigvalsh(x @ x.T))[::-1], 0.0, None)
    if eigenvalues.sum() == 0.0:
        return None
    return int(np.searchsorted(np.cumsum(eigenvalues) / eigenvalues.sum(), fraction - 1e-12) + 1)


def _numpy_forward_weight(layer: nn.Linear) -> np.ndarray:
    """The weight ``layer``'s next forward uses, in float64 numpy from its stored tensors (no torch arithmetic)."""
    from torch.nn.utils import parametrize

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float64)

    if hasattr(layer, "weight_orig"):  # torch.nn.utils.prune
        return f64(layer.weight_orig) * f64(layer.weight_mask)
    if parametrize.is_parametrized(layer, "weight"):
        parametrization = layer.parametrizations.weight
        kind = type(parametrization[0]).__name__
        if kind == "_WeightNorm":  # g * v / ||v|| per output row
            g, v = f64(parametrization.original0), f64(parametrization.original1)
            return g * v / np.linalg.norm(v, axis=1, keepdims=True)
        assert kind == "_SpectralNorm"  # one power iteration from the held u, v (training mode), then W / sigma
        w, v = f64(parametrization.original), f64(parametrization[0]._v)
        u = w @ v
        u /= max(np.linalg.norm(u), 1e-12)
        v = w.T @ u
        v /= max(np.linalg.norm(v), 1e-12)
        return w / (u @ (w @ v))
    return f64(layer.weight)


class _Stack(pl.LightningModule):
    """Three residual Linear+GELU blocks and a head; SGD with weight decay (a pruned entry's original keeps moving)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        from torch.nn.utils import prune
        from torch.nn.utils.parametrizations import spectral_norm, weight_norm

        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])
        self.head = nn.Linear(8, 3)
        for block in self.blocks:
            if kind == "prune":
                prune.l1_unstructured(block[0], "weight", amount=0.5)
            elif kind == "weight_norm":
                weight_norm(block[0])
            elif kind == "spectral_norm":
                spectral_norm(block[0])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        for block in self.blocks:
            x = x + block(x)
        return nn.functional.cross_entropy(self.head(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0, weight_decay=0.05)


def _stack_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (32,), generator=generator)), batch_size=8)


class _RecordsForwardWeights(Callback):
    """numpy float64 snapshots of the blocks' forward weights at fit start and after each optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[np.ndarray] = []

    def take(self, pl_module: pl.LightningModule) -> None:
        self.snapshots.append(np.concatenate([_numpy_forward_weight(b[0]).reshape(-1) for b in pl_module.blocks]))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
        self.take(pl_module)


class _PrunesBeforeStep3(Callback):
    """What ModelPruning does at an epoch boundary: prune the followed weights mid-fit, before step 3's forward."""

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
        from torch.nn.utils import prune

        if trainer.global_step == 3:
            for block in pl_module.blocks:
                prune.l1_unstructured(block[0], "weight", amount=0.5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm", "pruned mid-fit"])
def test_the_trajectory_follows_the_weights_the_forward_uses(kind: str) -> None:
    # Before: a model pruned or parametrized before the fit was followed through weight_orig (unmasked: with weight
    # decay its pruned entries keep moving) or the parametrization's original(s) (weight norm's g and v), and a weight
    # pruned mid-fit was read from its `weight` attribute, which prune's pre-hook refreshes only at the next forward
    # (each snapshot was the weights one update old). Now: the forward's weights, masked or computed, after the update.
    steps = 8
    monitor = DimensionalCollapse(modules=[nn.GELU], every_n_steps=1, projection_dim=None,
                                  param_patterns="blocks.*.0.weight" if kind == "pruned mid-fit" else None)
    recorder = _RecordsForwardWeights()
    extra = [_PrunesBeforeStep3()] if kind == "pruned mid-fit" else []
    from _toy import quiet_trainer

    quiet_trainer(max_steps=steps, callbacks=[monitor, *extra, recorder]).fit(
        _Stack("plain" if kind == "pruned mid-fit" else kind), _stack_loader())
    assert monitor.param_names == ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.2.0.weight"]
    assert len(monitor._snapshots) == len(recorder.snapshots) == steps + 1
    for got, expected in zip(monitor._snapshots, recorder.snapshots):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    history = monitor.history["collapse/params/r90"]
    assert history.steps == list(range(steps))
    assert history.values == [_numpy_r90(recorder.snapshots[: step + 2]) for step in range(steps)]


def test_following_a_spectral_normed_weight_leaves_training_bitwise_unchanged() -> None:
    # spectral_norm's power iteration runs (and updates its u, v buffers) at each read of the weight in training mode:
    # the monitor's reads must not add iterations that the fit does not take.
    from _toy import quiet_trainer

    def train(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
        model = _Stack("spectral_norm")
        quiet_trainer(max_steps=5, callbacks=callbacks).fit(model, _stack_loader())
        return {k: v.clone() for k, v in model.state_dict().items()}

    bare = train([])
    monitor = DimensionalCollapse(modules=[nn.GELU], every_n_steps=1)
    watched = train([monitor])
    assert monitor.history["collapse/params/r90"].steps == [0, 1, 2, 3, 4]
    assert bare.keys() == watched.keys() and any(k.endswith("_u") for k in bare)
    for key in bare:
        assert torch.equal(bare[key], watched[key]), key


class _StudentTeacherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class _MeanTeacher(pl.LightningModule):
    """A hand-made EMA teacher (mean teacher / BYOL / DINO): a frozen deep copy of the student updated in place."""

    def __init__(self) -> None:
        super().__init__()
        import copy

        torch.manual_seed(0)
        self.student = _StudentTeacherNet()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
        out = self.student(x)
        return nn.functional.cross_entropy(out, y) + nn.functional.cross_entropy(out, target)

    def on_train_batch_end(self, *args: object) -> None:  # the EMA update, after the callbacks' hooks
        with torch.no_grad():
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
                teacher.mul_(0.5).add_(student, alpha=0.5)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


@pytest.mark.filterwarnings("ignore")
def test_the_default_trajectory_leaves_out_a_hand_made_ema_teacher() -> None:
    # Before: @blocks held both stacks and the teacher's frozen but moving weights entered r90 (as an AveragedModel's
    # copy no longer does). A frozen first block of a partly frozen stack is a layer, not a copy: it stays.
    from _toy import quiet_trainer

    class RecordsStudent(Callback):
        def __init__(self) -> None:
            self.snapshots: list[np.ndarray] = []

        def take(self, pl_module: pl.LightningModule) -> None:
            self.snapshots.append(np.concatenate([
                b[0].weight.detach().numpy().astype(np.float64).reshape(-1) for b in pl_module.student.blocks]))

        def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.take(pl_module)

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
            self.take(pl_module)

    steps = 10
    monitor = DimensionalCollapse(modules=["student.blocks.*"], every_n_steps=1, projection_dim=None)
    recorder = RecordsStudent()
    quiet_trainer(max_steps=steps, callbacks=[monitor, recorder]).fit(_MeanTeacher(), _stack_loader())
    assert monitor.param_names == [f"student.blocks.{i}.0.weight" for i in range(3)]
    for got, expected in zip(monitor._snapshots, recorder.snapshots, strict=True):
        np.testing.assert_array_equal(got.numpy(), expected)
    history = monitor.history["collapse/params/r90"]
    assert history.steps == list(range(steps))
    assert history.values == [_numpy_r90(recorder.snapshots[: step + 2]) for step in range(steps)]

    partly_frozen = _StudentTeacherNet()
    partly_frozen.blocks[0].requires_grad_(False)
    assert DimensionalCollapse()._select_params(partly_frozen) == [f"blocks.{i}.0.weight" for i in range(3)]


class _TiedLM(pl.LightningModule):
    """A GPT-2-style LM whose head is tied to its embedding: named_parameters() lists the matrix as embed.weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(batch_idx))
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.cross_entropy(self.lm_head(h).reshape(-1, 20), tokens.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.filterwarnings("ignore")
def test_param_patterns_selects_a_tied_parameter_by_its_second_name() -> None:
    # Before: param_patterns=["lm_head.weight"] stopped the fit with "matched no parameter", as named_parameters()
    # lists the shared matrix once, under embed.weight. A glob matching both names follows it once.
    from _toy import quiet_trainer

    class RecordsHead(Callback):
        def __init__(self) -> None:
            self.snapshots: list[np.ndarray] = []

        def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.snapshots.append(pl_module.lm_head.weight.detach().numpy().astype(np.float64).reshape(-1))

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
            self.on_fit_start(trainer, pl_module)

    steps = 6
    monitor = DimensionalCollapse(modules=["blocks.*"], every_n_steps=1, param_patterns=["lm_head.weight"],
                                  projection_dim=None)
    recorder = RecordsHead()
    quiet_trainer(max_steps=steps, callbacks=[monitor, recorder]).fit(_TiedLM(), _stack_loader())
    assert monitor.param_names == ["lm_head.weight"]
    for got, expected in zip(monitor._snapshots, recorder.snapshots, strict=True):
        np.testing.assert_array_equal(got.numpy(), expected)
    assert monitor.history["collapse/params/r90"].values == [
        _numpy_r90(recorder.snapshots[: step + 2]) for step in range(steps)]
    assert DimensionalCollapse(param_patterns=["*.weight"])._select_params(_TiedLM()) == [
        "embed.weight", "blocks.0.0.weight", "blocks.1.0.weight"]
