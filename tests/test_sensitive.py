"""SensitiveNeurons: hand-checked selection, SeND dropping, no perturbation, EigenScore, CSV, resume."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import MaskedMeanNet, SquaredOutputTask
from lightning_act.callbacks.sensitive import FeatureDrop, SensitiveNeurons, per_example_embedding
from lightning_act.errors import DataFormatError, LightningActError


class ShiftNet(pl.LightningModule):
    """Penultimate features ``x @ W + shift``; the test moves ``shift`` between checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(3, 5)
        self.register_buffer("shift", torch.zeros(5))
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x) + self.shift)


def test_swinging_neuron_is_picked_and_steady_drift_ranks_below() -> None:
    model = ShiftNet()
    monitor = SensitiveNeurons(tracking_inputs=torch.randn(4, 3), window=3, top_fraction=0.2, eigenscore_passes=0)
    monitor.setup(None, model, "fit")  # type: ignore[arg-type]
    monitor.on_fit_start(None, model)  # type: ignore[arg-type]
    swing, drift = [0.0, 2.0, 0.0, 2.0], [0.0, 1.0, 2.0, 3.0]
    for t in range(4):
        model.shift = torch.tensor([0.0, drift[t], 0.0, swing[t], 0.0])
        metrics = monitor.checkpoint(None, model, step=t)  # type: ignore[arg-type]
        assert metrics["sensitive/head-input/selected"] == (1.0 if t == 3 else 0.0)
    # Hand-checked (C = 3): swing V = Var{2,0,2}·(2+2+2) = 8/9·6 = 16/3; drift V = Var{1,2,3}·3 = 2.
    assert monitor.sensitive["head-input"].tolist() == [3]
    assert metrics["sensitive/head-input/v_max"] == pytest.approx(16 / 3, rel=1e-6)
    assert metrics["sensitive/head-input/v_mean"] == pytest.approx((16 / 3 + 2) / 5, rel=1e-6)
    assert metrics["sensitive/head-input/count"] == 1.0

    wider = SensitiveNeurons(tracking_inputs=torch.randn(4, 3), window=3, top_fraction=0.4, eigenscore_passes=0)
    wider.setup(None, model, "fit")  # type: ignore[arg-type]
    wider.on_fit_start(None, model)  # type: ignore[arg-type]
    for t in range(4):
        model.shift = torch.tensor([0.0, drift[t], 0.0, swing[t], 0.0])
        wider.checkpoint(None, model, step=t)  # type: ignore[arg-type]
    assert wider.sensitive["head-input"].tolist() == [1, 3]


class Mlp(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.hidden = nn.Sequential(nn.Linear(6, 8), norm, nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    vx, vy = torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=48), DataLoader(TensorDataset(vx, vy), batch_size=16)


def fit(
    tmp_path: Path,
    model: pl.LightningModule,
    callbacks: list[Callback],
    steps: int,
    ckpt_path: str | None = None,
    **kwargs: object,
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path, name="csv"), callbacks=callbacks, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        **kwargs,  # type: ignore[arg-type]
    )
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


class HeadInputs(Callback):
    """Records the head's input of every training forward (after any pre-hook) and the sets in force."""

    def __init__(self, monitor: SensitiveNeurons) -> None:
        self.monitor = monitor
        self.inputs: dict[int, torch.Tensor] = {}
        self.sets: dict[int, list[int]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module.training:
                self.inputs[trainer.global_step] = args[0].detach().clone()

        pl_module.head.register_forward_hook(hook)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if "head-input" in self.monitor.sensitive:
            self.sets[trainer.global_step - 1] = self.monitor.sensitive["head-input"].tolist()


def test_drop_zeroes_exactly_the_sensitive_features_for_t_checkpoints_then_reselects(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = SensitiveNeurons(
        every_n_steps=1, num_samples=16, window=2, top_fraction=0.25, drop=True, drop_checkpoints=2, eigenscore_passes=0
    )
    recorder = HeadInputs(monitor)
    fit(tmp_path, Mlp(), [monitor, recorder], steps=10, limit_val_batches=0)

    selected = monitor.history["sensitive/head-input/selected"]
    # The window (C + 1 = 3 checkpoints) is full at step 2; then a new set every T = 2 checkpoints.
    assert [s for s, v in zip(selected.steps, selected.values, strict=True) if v == 1.0] == [2, 4, 6, 8]
    assert monitor.history["sensitive/head-input/dropping"].values == [0.0, 0.0] + [1.0] * 8
    for step, head_input in recorder.inputs.items():
        chosen = [s for s in (2, 4, 6, 8) if s < step]
        expected = recorder.sets[chosen[-1]] if chosen else []
        zero_columns = (head_input == 0).all(0).nonzero().reshape(-1).tolist()
        assert zero_columns == expected, f"step {step}"
        assert len(expected) in (0, 2)
    assert len(recorder.inputs) == 10
    assert sum(1 for m in monitor._drop_handles) == 0  # removed at teardown


def test_observation_does_not_change_training(tmp_path: Path) -> None:
    def train(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        model = Mlp(dropout=0.3, batchnorm=True)
        fit(tmp_path, model, callbacks, steps=6)
        return {k: v.clone() for k, v in model.state_dict().items()}

    bare = train([])
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=24, window=2, eigenscore_passes=3)
    watched = train([monitor])
    assert bare.keys() == watched.keys()
    for key in bare:
        assert torch.equal(bare[key], watched[key]), key
    assert "sensitive/head-input/ees" in monitor.history


def test_csv_columns_tracking_set_and_no_eigenscore_of_identical_passes(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Mlp()
    monitor = SensitiveNeurons(every_n_steps=2, num_samples=20, window=2, eigenscore_passes=3)
    trainer = fit(tmp_path, model, [monitor], steps=7)  # checkpoints 0, 2, 4, 6; the last one sees the final weights

    _, val = loaders()
    assert torch.equal(torch.cat(monitor._batches), val.dataset.tensors[0][:20])
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for stat in ("count", "selected", "v_mean", "v_max", "jaccard"):
        assert f"sensitive/head-input/{stat}" in rows[0], stat
    assert [int(r["step"]) for r in rows if r["sensitive/head-input/count"]] == [0, 2, 4, 6]

    # No dropout: the K = 3 passes would be identical, and their score E = (log(K‖c‖² + α) + (K − 1) log α) / K
    # tracks only the embedding norm: not logged (before round 30 it was, with no line)
    for stat in ("eigenscore", "ees"):
        assert f"sensitive/head-input/{stat}" not in rows[0] and f"sensitive/head-input/{stat}" not in monitor.history


@pytest.mark.parametrize("dropout,passes_per_checkpoint", [(0.0, 1), (0.3, 4)])
def test_identical_passes_are_not_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dropout: float, passes_per_checkpoint: int
) -> None:
    """Without an active dropout the K stochastic passes would equal the deterministic one: they are not run (nor
    scored since round 30)."""
    import lightning_act.callbacks.sensitive as sensitive

    calls = []
    original = sensitive.call_forward
    monkeypatch.setattr(sensitive, "call_forward", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(1)
    monitor = SensitiveNeurons(every_n_steps=2, num_samples=20, window=2, eigenscore_passes=3)
    fit(tmp_path, Mlp(dropout=dropout), [monitor], steps=7)  # checkpoints 0, 2, 4, 6
    assert len(calls) == 1 + 4 * passes_per_checkpoint  # one pass at fit start (the embedding check)
    scores = monitor.history.get("sensitive/head-input/eigenscore")
    assert (scores is None) if dropout == 0.0 else len(scores.values) == 4


def test_resume_restores_windows_sets_and_histories(tmp_path: Path) -> None:
    def monitor() -> SensitiveNeurons:
        return SensitiveNeurons(
            every_n_steps=1, num_samples=16, window=2, top_fraction=0.25,
            drop=True, drop_checkpoints=3, eigenscore_passes=0,
        )

    torch.manual_seed(2)
    straight = monitor()
    fit(tmp_path / "a", Mlp(), [straight], steps=8, limit_val_batches=0)

    torch.manual_seed(2)
    first = monitor()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(tmp_path / "b", Mlp(), [first, saver], steps=4, limit_val_batches=0)
    state = first.state_dict()
    assert len(state["embeddings"]["head-input"]) == 3 and state["countdown"]["head-input"] == 2

    resumed = monitor()
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, every_n_train_steps=4)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    fit(tmp_path / "c", Mlp(), [resumed, again], steps=8, ckpt_path=last, limit_val_batches=0)
    for key in ("v_mean", "selected", "dropping", "count"):
        series = f"sensitive/head-input/{key}"
        first_step = 2 if key == "v_mean" else 0  # V needs C + 1 = 3 checkpoints
        assert resumed.history[series].steps == straight.history[series].steps == list(range(first_step, 8))
        assert resumed.history[series].values == straight.history[series].values, key
    assert torch.equal(resumed.sensitive["head-input"], straight.sensitive["head-input"])
    assert resumed.countdown == straight.countdown


def test_a_resume_with_drop_false_drops_nothing_and_says_the_checkpoint_did(tmp_path: Path) -> None:
    # Before: the checkpoint's countdown re-installed the zeroing hook at fit start whatever drop was, and nothing
    # removed it: the resumed fit trained with the head's input features zeroed (weights 0.026 off).
    torch.manual_seed(2)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    dropping = SensitiveNeurons(every_n_steps=1, num_samples=16, window=2, top_fraction=0.25, drop=True,
                                drop_checkpoints=10, eigenscore_passes=0)
    fit(tmp_path / "a", Mlp(), [dropping, saver], steps=4, limit_val_batches=0)
    assert dropping.state_dict()["countdown"]["head-input"] > 0
    last = str(tmp_path / "ckpt" / "last.ckpt")

    def resume(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        model = Mlp()
        fit(tmp_path / "b", model, callbacks, steps=8, ckpt_path=last, limit_val_batches=0)
        return model.state_dict()

    bare = resume([])
    with pytest.warns(UserWarning, match="was dropping the sensitive features of head-input; this fit has drop=False"):
        watched = resume([SensitiveNeurons(every_n_steps=1, num_samples=16, window=2, top_fraction=0.25,
                                           eigenscore_passes=0)])
    for key in bare:
        assert torch.equal(bare[key], watched[key]), key


def test_the_other_monitors_on_a_dropped_tap_read_the_features_as_zeroed(tmp_path: Path) -> None:
    # Before: the zeroing hooks ran after the capture's, so ActivationSparsity logged zero_frac 0.000 on a head input
    # half of whose features the network received as zeros.
    from lightning_act.callbacks import ActivationSparsity

    torch.manual_seed(2)
    model = Mlp()
    received: list[np.ndarray] = []
    model.head.register_forward_pre_hook(  # registered first, so it runs after the prepended zeroing
        lambda m, args: received.append(args[0].detach().double().numpy().copy()) if m.training else None
    )
    send = SensitiveNeurons(every_n_steps=1, num_samples=16, window=2, top_fraction=0.5, drop=True,
                            drop_checkpoints=10, eigenscore_passes=0)
    sparsity = ActivationSparsity(modules=["head:input"], every_n_steps=1)
    fit(tmp_path, model, [send, sparsity], steps=6, limit_val_batches=0)
    logged = sparsity.history["sparsity/head-input/zero_frac"]
    expected = [float((received[step] == 0).mean()) for step in logged.steps]
    assert max(expected) >= 0.5  # half the features dropped from the first selection on
    np.testing.assert_allclose(logged.values, expected, rtol=0, atol=1e-12)


def test_embeddings_and_bad_input() -> None:
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(per_example_embedding(x), x.mean(1))
    conv = torch.arange(48.0).reshape(2, 3, 2, 4)
    torch.testing.assert_close(per_example_embedding(conv), conv.mean((2, 3)))
    with pytest.raises(DataFormatError, match="modules="):
        per_example_embedding(torch.zeros(2))
    with pytest.raises(LightningActError, match="top_fraction"):
        SensitiveNeurons(top_fraction=0.0)
    with pytest.raises(DataFormatError, match="input_key"):
        SensitiveNeurons()._batch_inputs({"image": torch.zeros(1)})


def test_a_bf16_activation_is_averaged_in_float32_at_least() -> None:
    # Under bf16 autocast a bf16 mean rounded each embedding to 8 significant bits (~4e-3), before the differences
    # between checkpoints that SeND's sensitivity is made of.
    x = torch.randn(3, 197, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) + 10.0
    want = x.double().numpy().mean(1)
    np.testing.assert_allclose(per_example_embedding(x).double().numpy(), want, rtol=1e-6)


def test_feature_drop_rebuilds_a_namedtuple_output() -> None:
    from collections import namedtuple

    BlockOutput = namedtuple("BlockOutput", ["hidden", "gate"])

    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> BlockOutput:
            return BlockOutput(x + 1.0, x.sum())

    block = Block()
    block.register_forward_hook(FeatureDrop(torch.tensor([1])).after)
    out = block(torch.ones(2, 3))  # before: TypeError from BlockOutput([...])
    assert isinstance(out, BlockOutput) and out.gate.item() == 6.0
    torch.testing.assert_close(out.hidden, torch.tensor([[2.0, 0.0, 2.0], [2.0, 0.0, 2.0]]))


def test_feature_drop_acts_only_in_training_mode_on_outputs_and_on_inputs_passed_either_way() -> None:
    conv = nn.Conv2d(2, 4, 1)
    handle = conv.register_forward_hook(FeatureDrop(torch.tensor([1, 3])).after)
    x = torch.randn(2, 2, 3, 3)
    out = conv(x)
    assert bool((out[:, [1, 3]] == 0).all()) and bool((out[:, [0, 2]] != 0).all())
    conv.eval()
    assert bool((conv(x)[:, [1, 3]] != 0).all())
    handle.remove()
    linear = nn.Linear(3, 5)
    linear.register_forward_pre_hook(FeatureDrop(torch.tensor([0]), "input").before, with_kwargs=True)
    inputs = torch.ones(4, 3)
    expected = inputs.clone()
    expected[:, 0] = 0.0
    torch.testing.assert_close(linear(inputs), nn.functional.linear(expected, linear.weight, linear.bias))
    torch.testing.assert_close(linear(input=inputs), nn.functional.linear(expected, linear.weight, linear.bias))


def _take_a_step(model: nn.Module) -> None:
    """Moves every weight a little, as a training step would: with weights that never change, every V_i is 0 and
    the top set ties, so nothing is selected (and no jaccard follows)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_on_cuda_reads_the_host_once() -> None:
    # Every tap's statistics and selected indices come back in one transfer (round 12; seven reads before).
    import warnings

    torch.manual_seed(0)
    model = Mlp(dropout=0.3).cuda()
    monitor = SensitiveNeurons(modules=["hidden", "head"], tracking_inputs=torch.randn(16, 6), window=2,
                               eigenscore_passes=3, every_n_steps=1)
    monitor.setup(None, model, "fit")  # type: ignore[arg-type]
    monitor.on_fit_start(None, model)  # type: ignore[arg-type]
    for step in range(3):  # the window fills at checkpoint 2 (the first selection); 3 has a jaccard too
        _take_a_step(model)
        monitor.checkpoint(None, model, step)
    _take_a_step(model)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            metrics = monitor.checkpoint(None, model, 3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]  # not the mode's own "prototype" note
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert {"sensitive/hidden/v_mean", "sensitive/head/eigenscore", "sensitive/hidden/jaccard"} <= set(metrics)
    assert monitor.sensitive["hidden"].device.type == "cpu"


class _InPlaceReLUNet(pl.LightningModule):
    """The tapped ``features`` output is rectified in place after the hook, as ``F.relu_`` / ``inplace=True`` do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        torch.nn.functional.relu_(h)
        return self.head(h)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_float64_embedding_is_the_tapped_value_not_one_changed_in_place_later() -> None:
    """Before: a float64 (B, D) tap was kept by reference, so the embedding held the rectified values."""
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    tracking = torch.randn(8, 6, generator=generator)
    model = _InPlaceReLUNet()
    monitor = SensitiveNeurons(modules=["features"], every_n_steps=1, tracking_inputs=tracking, num_samples=8,
                               window=2, eigenscore_passes=0, stop_after_taps=False)
    trainer = pl.Trainer(max_steps=2, callbacks=[monitor], logger=False, enable_checkpointing=False, precision="64-true",
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_size=8))
    weight, bias = model.features.weight.detach().numpy(), model.features.bias.detach().numpy()
    expected = tracking.double().numpy() @ weight.T + bias
    assert (expected < 0).any()
    np.testing.assert_allclose(monitor.embeddings["features"][-1].cpu().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_every_row_of_tracking_inputs_is_tracked() -> None:
    # Before: only tracking_inputs[:num_samples] (64 by default) went through the model, silently.
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    tracking = torch.randn(100, 6, generator=generator, dtype=torch.float64)
    model = _InPlaceReLUNet()
    monitor = SensitiveNeurons(modules=["features"], every_n_steps=1, tracking_inputs=tracking, window=2,
                               eigenscore_passes=0, stop_after_taps=False)
    trainer = pl.Trainer(max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False, precision="64-true",
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_size=8))
    weight, bias = model.features.weight.detach().numpy(), model.features.bias.detach().numpy()
    np.testing.assert_allclose(monitor.embeddings["features"][-1].cpu().numpy(), tracking.numpy() @ weight.T + bias,
                               rtol=1e-12, atol=1e-12)


def test_a_tap_without_features_is_said_once_and_a_conv3d_map_is_averaged_over_its_volume(tmp_path: Path) -> None:
    """Before: a (B,) tap raised in the tracking pass and stopped the fit, and so did a (B, C, D, H, W) map."""
    volume = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    np.testing.assert_allclose(per_example_embedding(volume).numpy(), volume.numpy().mean(axis=(2, 3, 4)))

    class Sum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(-1)

    class ScoredMlp(Mlp):
        def __init__(self) -> None:
            super().__init__()
            self.score = Sum()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.hidden(x)
            return self.head(h) + 0.0 * self.score(h)[:, None]

    monitor = SensitiveNeurons(modules=["hidden", "score"], every_n_steps=1, tracking_inputs=torch.randn(8, 6),
                               num_samples=8, window=2, eigenscore_passes=0)
    with pytest.warns(UserWarning, match="score outputs a 1-d tensor") as said:
        fit(tmp_path, ScoredMlp(), [monitor], steps=3)
    assert sum("score" in str(w.message) for w in said) == 1
    assert monitor.embeddings["hidden"] and "score" not in monitor.embeddings


def test_the_eigenscore_passes_read_the_head_input_after_its_dropout() -> None:
    # The stochastic passes are made of the dropout's noise: the head's input as the head receives it (the training
    # forwards' taps read through the head dropout, a monitor's own passes must not, or every pass would be the same).
    import timm

    pl.seed_everything(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, in_chans=1, img_size=16,
                            patch_size=4, depth=1, embed_dim=24, num_heads=2, drop_rate=0.5)
    seen: dict[int, list[np.ndarray]] = {}

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = vit

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    task = Task()

    def record(module, args):
        if not task.training and vit.head_drop.training:  # a stochastic pass: the root in eval, its dropout on
            seen.setdefault(task.trainer.global_step, []).append(args[0].detach().double().numpy().copy())

    vit.head.register_forward_pre_hook(record)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 16, 16, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=8, eigenscore_passes=4, window=2)
    trainer = pl.Trainer(max_steps=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    for step, value in zip(monitor.history["sensitive/net.head-input/eigenscore"].steps,
                           monitor.history["sensitive/net.head-input/eigenscore"].values):
        z = np.stack(seen[step + 1], axis=-1)  # (N, D, K): checkpoint of step s runs after its update, at step s + 1
        d, k = z.shape[1], z.shape[2]
        centred = z - z.mean(axis=1, keepdims=True)  # J_d Z
        scores = [np.linalg.slogdet(zn.T @ cn + 1e-3 * np.eye(k))[1] / k for zn, cn in zip(z, centred)]
        assert value == pytest.approx(np.mean(scores), rel=1e-9)


def masked_mean_pool(model: MaskedMeanNet, sequences: list[torch.Tensor]) -> np.ndarray:
    """``pool`` of each sequence by numpy: the mean of its token embeddings, then the linear layer."""
    table = model.emb.weight.detach().double().numpy()
    weight, bias = model.pool.weight.detach().double().numpy(), model.pool.bias.detach().double().numpy()
    return np.stack([table[s.numpy()].mean(0) @ weight.T + bias for s in sequences])


def test_a_padding_collate_gives_the_first_num_samples_examples_each_with_its_batch_padding() -> None:
    # Before: torch.cat of the batches' inputs (padded to 9 and 8 tokens) raised "Sizes of tensors must match".
    from torch.nn.utils.rnn import pad_sequence

    torch.manual_seed(0)
    sequences = [torch.randint(1, 20, (n,)) for n in [3, 9, 5, 2, 7, 4, 8, 6]]
    loader = DataLoader(sequences, batch_size=4, collate_fn=lambda items: (pad_sequence(items, batch_first=True),))
    model = MaskedMeanNet()
    shapes: list[tuple[int, ...]] = []
    model.pool.register_forward_hook(lambda m, a, o: None if m.training else shapes.append(tuple(a[0].shape)))
    monitor = SensitiveNeurons(modules=["pool"], every_n_steps=1, num_samples=6, eigenscore_passes=0, window=2)
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, loader, loader)
    assert [b.shape for b in monitor._batches] == [(4, 9), (2, 8)]  # the second batch's first 2, its padding kept
    assert shapes[-2:] == [(4, 8), (2, 8)]
    np.testing.assert_allclose(monitor.embeddings["pool"][-1].numpy(), masked_mean_pool(model, sequences[:6]),
                               rtol=1e-5, atol=1e-6)
    assert "sensitive/pool/v_mean" in monitor.history


class SequenceFirstLstm(SquaredOutputTask):
    """An ``nn.LSTM`` on ``(T, B, F)`` inputs (``batch_first=False``), its outputs averaged over time into a head."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(width, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0].mean(0))


@pytest.mark.parametrize(("steps", "batch", "tapped"), [(7, 3, "rnn"), (4, 8, "head:input")])
def test_sequence_first_inputs_are_cut_along_the_batch_not_time(steps: int, batch: int, tapped: str) -> None:
    # Before: (T, B, F) batches were joined and cut along axis 0, time: 3 examples of their first 6 steps. T = 4
    # dividing B = 8 was taken for flattened tokens and cut along time again.
    width = 4
    torch.manual_seed(0)
    data = torch.randn(16, steps, width)
    collate = lambda items: (torch.stack([item[0] for item in items]).transpose(0, 1),)  # noqa: E731
    loader = DataLoader(TensorDataset(data), batch_size=batch, collate_fn=collate)
    model = SequenceFirstLstm(width, 5)
    monitor = SensitiveNeurons(modules=[tapped], every_n_steps=1, num_samples=5, eigenscore_passes=0, window=2)
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, loader, loader)
    assert torch.equal(torch.cat(monitor._batches, 1), data[:5].transpose(0, 1))
    with torch.no_grad():
        expected = model.rnn(data[:5].transpose(0, 1))[0].mean(0)  # (5, H): every step of 5 examples
    name = "rnn" if tapped == "rnn" else "head-input"  # the head's input is that mean
    np.testing.assert_allclose(monitor.embeddings[name][-1].numpy(), expected.double().numpy(), rtol=1e-5, atol=1e-6)


def test_forward_fn_batches_are_counted_along_the_sample_axis_of_their_inputs() -> None:
    # Before: with forward_fn= the validation batches were counted along axis 0 of their inputs, time for an LSTM's
    # (T, B, F): one batch of T = 20 steps was taken for 20 examples, and 4 were tracked for num_samples=10.
    width, steps = 3, 20
    torch.manual_seed(0)
    data = torch.randn(16, steps, width)
    collate = lambda items: {"x": torch.stack([item[0] for item in items]).transpose(0, 1)}  # noqa: E731
    loader = DataLoader(TensorDataset(data), batch_size=4, collate_fn=collate)
    model = SequenceFirstLstm(width, 4)
    monitor = SensitiveNeurons(modules=["rnn"], every_n_steps=1, num_samples=10, eigenscore_passes=0, window=2,
                               forward_fn=lambda module, batch: module(batch["x"]))
    trainer = pl.Trainer(max_steps=2, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(data), batch_size=4, collate_fn=lambda items: collate(items)["x"]),
                loader)
    assert len(monitor._batches) == 3  # the first whole batches holding 10 examples: 12
    with torch.no_grad():
        expected = model.rnn(data[:12].transpose(0, 1))[0].mean(0)  # (12, H): every step of 12 examples
    np.testing.assert_allclose(monitor.embeddings["rnn"][-1].numpy(), expected.double().numpy(), rtol=1e-5, atol=1e-6)


class SharedRelu(pl.LightningModule):
    """One ``nn.ReLU`` called at widths 5, 5 and 7 in a forward, as torchvision's ``Bottleneck`` calls its ``relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 7)
        self.relu = nn.ReLU()
        self.head = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.c(self.relu(self.b(self.relu(self.a(x)))))))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_called_at_two_widths_tracks_the_calls_of_its_first_width_with_one_warning() -> None:
    # Before: torch.cat of (B, 5) and (B, 7) embeddings raised "Sizes of tensors must match" at the first checkpoint.
    torch.manual_seed(0)
    tracking = torch.randn(6, 3)
    model = SharedRelu()
    calls: list[np.ndarray] = []
    model.relu.register_forward_hook(
        lambda m, a, o: None if torch.is_grad_enabled() else calls.append(o.double().numpy())  # the tracking passes
    )
    monitor = SensitiveNeurons(modules=["relu"], every_n_steps=1, tracking_inputs=tracking, eigenscore_passes=0,
                               window=2)
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.warns(UserWarning, match=r"relu is called at widths \[5, 7\].*width 5") as record:
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(12, 3)), batch_size=4))
    assert sum("called at widths" in str(w.message) for w in record) == 1
    assert [c.shape[1] for c in calls[-3:]] == [5, 5, 7]  # the last checkpoint's forward
    np.testing.assert_array_equal(monitor.embeddings["relu"][-1].numpy(), np.concatenate(calls[-3:-1]))
    assert monitor.embeddings["relu"][-1].shape == (12, 5)  # 6 examples × the 2 calls of width 5
    assert len(monitor.history["sensitive/relu/v_mean"].values) == 1  # the window (C + 1 = 3) full at step 2


@pytest.mark.parametrize("validation_batch", [1, 2])
def test_single_sequence_batches_of_a_head_on_flattened_tokens_give_whole_sequences(validation_batch: int) -> None:
    # A head run on the (B*T, D) flattened tokens gives B*T embedding rows; with B = 1 that is T, and the (1, T)
    # inputs were counted along time: the tracking set was the first num_samples tokens of one sequence.
    class FlatHead(SquaredOutputTask):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(16, 6), nn.Linear(6, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            b, t = ids.shape
            return self.head(self.emb(ids).reshape(b * t, -1)).reshape(b, t, -1)

    ids = torch.randint(0, 16, (8, 5), generator=torch.Generator().manual_seed(0))
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=4, window=2, eigenscore_passes=0)
    trainer = pl.Trainer(max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(FlatHead(), DataLoader(TensorDataset(ids), batch_size=4),
                DataLoader(TensorDataset(ids), batch_size=validation_batch))
    assert torch.equal(torch.cat(monitor._batches), ids[:4])



def test_float64_tracking_inputs_on_a_float32_model_are_one_line_naming_their_dtype() -> None:
    # Before: "running the model on a probe batch failed (... Double and Float); pass forward_fn=...", the wrong fix.
    class Mlp(SquaredOutputTask):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    tracking = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 4)))  # numpy's float64
    monitor = SensitiveNeurons(modules=["net.1"], every_n_steps=1, tracking_inputs=tracking, eigenscore_passes=0)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(LightningActError, match=r"tracking_inputs, which are torch.float64 where its parameters are "
                       r"torch.float32; pass tracking_inputs=<tensor>.to\(torch.float32\)"):
        trainer.fit(Mlp(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))

    class Conv(SquaredOutputTask):  # torch says "Input type (double) and bias type (float)" here
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    monitor = SensitiveNeurons(modules=["net.1"], every_n_steps=1, tracking_inputs=torch.randn(5, 1, 4, 4).double(),
                               eigenscore_passes=0)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(LightningActError, match=r"which are torch.float64 where its parameters are torch.float32"):
        trainer.fit(Conv(), DataLoader(TensorDataset(torch.randn(8, 1, 4, 4)), batch_size=4))


def test_a_tap_run_on_other_rows_from_pass_to_pass_is_left_out_with_one_warning(tmp_path: Path) -> None:
    # Before: an expert of a mixture of experts, run on the rows routed to it, was tracked as if its rows were
    # examples: row i was another token at the next checkpoint, and v_mean mixed them silently.
    class Routed(Mlp):
        def __init__(self) -> None:
            super().__init__()
            self.expert = nn.Linear(8, 8)
            self.passes = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.hidden(x)
            # every forward counts (a probe's count is put back since round 28, training's moves it): each
            # checkpoint's tracking pass routes another number of rows to the expert
            self.passes += 1
            routed = h[: len(h) - self.passes % 2]  # 15 rows at the first checkpoint, all 16 at the second
            return self.head(torch.cat([self.expert(routed), h[len(routed):]]))

    monitor = SensitiveNeurons(modules=["expert", "head:input"], every_n_steps=1, num_samples=16, window=2,
                               eigenscore_passes=0, drop=True, drop_checkpoints=10)
    with pytest.warns(UserWarning, match=r"expert runs on other rows of the same tracking batches from pass to pass") as w:
        fit(tmp_path, Routed(), [monitor], steps=5, limit_val_batches=0)
    # nothing of it is kept that a resume would act on (its drop came back after a resume)
    assert all("expert" not in state for state in (monitor.sensitive, monitor.countdown, monitor._drop_handles))
    assert sum("other rows of the same tracking batches" in str(x.message) for x in w) == 1
    # seen at the second checkpoint: only the first one's (empty) selection was logged before
    assert {key: series.steps for key, series in monitor.history.items() if key.startswith("sensitive/expert/")} == {
        "sensitive/expert/count": [0], "sensitive/expert/selected": [0], "sensitive/expert/dropping": [0]}
    assert "expert" not in monitor.embeddings
    assert len(monitor.history["sensitive/head-input/v_mean"].values) == 3  # the other tap is tracked as before


def test_a_callback_reused_for_a_fit_with_another_tracking_set_tracks_it(tmp_path: Path) -> None:
    # Before: the call rows of the first fit's tracking set (32) were kept, and the second fit's (20) made the tap
    # look routed: it was left out, with a warning naming a mixture of experts.
    monitor = SensitiveNeurons(every_n_steps=1, window=2, eigenscore_passes=0, tracking_inputs=torch.randn(32, 6))
    fit(tmp_path / "a", Mlp(), [monitor], steps=3, limit_val_batches=0)
    monitor.tracking_inputs = torch.randn(20, 6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other rows of the same tracking batches.*")
        fit(tmp_path / "b", Mlp(), [monitor], steps=3, limit_val_batches=0)
    assert monitor.embeddings["head-input"][-1].shape == (20, 8)
    assert len(monitor.history["sensitive/head-input/v_mean"].values) == 1


class DropoutBeforeHead(Mlp):
    """``body → drop → head``: the dropout is the head's sibling, so an input tap on the head reads through it."""

    def __init__(self, keyword: bool = False, checkpointed: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.drop = nn.Dropout(0.5)
        self.keyword, self.checkpointed = keyword, checkpointed

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        dropped = self.drop(h)
        return self.head(input=dropped) if self.keyword else self.head(dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._tail, self.hidden(x), use_reentrant=False)
        return self._tail(self.hidden(x))


@pytest.mark.parametrize(("keyword", "checkpointed"), [(False, False), (True, False), (False, True)])
def test_the_dropout_read_through_of_a_tap_sends_drop_zeroes_reads_the_zeroed_dropout_input(
    tmp_path: Path, keyword: bool, checkpointed: bool
) -> None:
    # Before: the drop's pre-hook, run first, replaced the dropout's output, and the read-through no longer matched:
    # zero_frac counted the dropout's zeros too (0.64 where the dropout's input with the set zeroed has 0.5); a head
    # called by keyword (head(input=...)) the same. Under activation checkpointing the zeroed read recorded a graph
    # the recompute did not (CheckpointError: "a different number of tensors was saved").
    from lightning_act.callbacks import ActivationSparsity

    torch.manual_seed(0)
    model = DropoutBeforeHead(keyword, checkpointed)
    entering: dict[int, np.ndarray] = {}
    steps = {"now": 0}
    model.drop.register_forward_pre_hook(
        lambda m, args: entering.__setitem__(steps["now"], args[0].detach().double().numpy().copy()) if m.training else None
    )

    class Step(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            steps["now"] = trainer.global_step

    send = SensitiveNeurons(every_n_steps=1, num_samples=16, window=2, top_fraction=0.5, drop=True,
                            drop_checkpoints=10, eigenscore_passes=0)
    sparsity = ActivationSparsity(modules=["head:input"], every_n_steps=1)
    fit(tmp_path, model, [Step(), send, sparsity], steps=6, limit_val_batches=0)
    dropped = send.sensitive["head-input"].numpy()  # chosen at step 2 (window 2), dropped from step 3 on
    logged = dict(zip(sparsity.history["sparsity/head-input/zero_frac"].steps,
                      sparsity.history["sparsity/head-input/zero_frac"].values))
    for step in range(3, 6):
        expected = entering[step].copy()
        expected[:, dropped] = 0
        assert logged[step] == pytest.approx(float((expected == 0).mean()), abs=1e-12), step
    assert logged[2] == pytest.approx(float((entering[2] == 0).mean()), abs=1e-12)  # before the drop: no zeros


def test_a_float64_tracking_input_failing_for_another_reason_is_not_blamed_on_its_dtype() -> None:
    class Casting(SquaredOutputTask):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float())  # casts its inputs itself

    monitor = SensitiveNeurons(modules=["net.1"], every_n_steps=1, tracking_inputs=torch.randn(5, 3).double(),
                               eigenscore_passes=0)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(LightningActError, match=r"shapes cannot be multiplied.*forward_fn=") as caught:
        trainer.fit(Casting(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    assert "float64" not in str(caught.value)


def test_sends_drop_zeroes_the_first_field_of_a_model_output() -> None:
    class FakeModelOutput(dict):
        def to_tuple(self) -> tuple:
            return tuple(self.values())

    module = nn.Identity().train()
    hidden, pooled = torch.ones(2, 3, 4), torch.ones(2, 4)
    zeroed = FeatureDrop(torch.tensor([1, 3])).after(module, (), FakeModelOutput(last_hidden_state=hidden,
                                                                                  pooler_output=pooled))
    assert type(zeroed) is FakeModelOutput and list(zeroed) == ["last_hidden_state", "pooler_output"]
    assert zeroed["last_hidden_state"][..., [1, 3]].eq(0).all() and zeroed["last_hidden_state"][..., [0, 2]].eq(1).all()
    assert zeroed["pooler_output"] is pooled
    # an input tap of a module called with one tuple argument (x, mask): its first tensor, as the capture reads it
    pair = (torch.ones(2, 4), torch.ones(2, 4))
    args, _ = FeatureDrop(torch.tensor([0])).before(module, (pair,), {})
    dropped, mask = args[0]
    assert dropped[:, 0].eq(0).all() and dropped[:, 1:].eq(1).all() and mask is pair[1]
