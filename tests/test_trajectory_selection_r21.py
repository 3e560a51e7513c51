"""Round 21 (E2): the weight trajectory under the hook-based norms, a BackboneFinetuning backbone and resized weights;
tapped modules replaced mid-fit; ema-pytorch's EMA and Swin V2's position-bias MLPs in the presets. Every value is
checked against numpy float64 on the tensors read independently (own hooks, own snapshots)."""

from __future__ import annotations

import copy
import tempfile
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import ActivationStats, DimensionalCollapse
from lightning_act.capture import select_taps
from lightning_act.capture.weights import forward_tensor


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def logged(self, key: str) -> dict[int, float]:
        return {step: metrics[key] for step, metrics in self.rows if key in metrics}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class Classifier(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (48,), generator=generator)), batch_size=8)


def fit(model: pl.LightningModule, callbacks: list[Callback], **kwargs) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = pl.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="lightning_act_test_"),  # the heatmaps go there (the logger has none)
        accelerator="cpu", devices=1, logger=logger, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        trainer.fit(model, loader())
    return logger


def numpy_r90(snapshots: list[np.ndarray], fraction: float = 0.9) -> int:
    centred = np.stack(snapshots) - np.stack(snapshots).mean(0)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variance) / variance.sum(), fraction - 1e-12) + 1)


class Snapshots(Callback):
    """The weights ``read(model)`` (a float64 numpy vector) at fit start and after every optimizer step."""

    def __init__(self, read) -> None:
        self.read, self.taken = read, []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.taken.append(self.read(pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.taken.append(self.read(pl_module))


# ------------------------------------------------------------------ hook-based weight_norm / spectral_norm (E3)
def _numpy_weight_norm(linear: nn.Module) -> np.ndarray:
    g, v = linear.weight_g.detach().double().numpy(), linear.weight_v.detach().double().numpy()
    return g * v / np.linalg.norm(v, axis=1, keepdims=True)


def _numpy_spectral_norm(linear: nn.Module) -> np.ndarray:
    w = linear.weight_orig.detach().double().numpy()
    u, v = linear.weight_u.detach().double().numpy(), linear.weight_v.detach().double().numpy()
    return w / (u @ w @ v)


@pytest.mark.parametrize("norm, computed", [
    (torch.nn.utils.weight_norm, _numpy_weight_norm), (torch.nn.utils.spectral_norm, _numpy_spectral_norm),
])
def test_hook_based_norms_are_followed_as_the_computed_weight(norm, computed) -> None:
    """The trajectory follows ``fc.weight`` as ``g v/||v||`` / ``W_orig/σ`` (it followed ``weight_g``+``weight_v`` /
    ``weight_orig``), read fresh after an optimizer step (the ``weight`` attribute is one update old), without a
    power iteration: ``weight_u``/``weight_v`` unchanged."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.GELU()) for _ in range(3)])
        for block in model:
            norm(block[0])
    model.train()
    model(torch.randn(4, 6)).pow(2).sum().backward()  # the pre-hooks set the weight attribute here
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    monitor = DimensionalCollapse(projection_dim=None)
    names = monitor._select_params(model)
    assert names == [f"{i}.0.weight" for i in range(3)]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    monitor.param_names = names
    snapshot = monitor._snapshot(monitor._chosen_weights(model, names)).numpy()
    expected = np.concatenate([computed(block[0]).reshape(-1) for block in model])
    np.testing.assert_allclose(snapshot, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(model[0][0].weight.detach().double().numpy(), computed(model[0][0]), atol=1e-4)  # stale
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    np.testing.assert_allclose(forward_tensor(model[1][0], "weight").double().numpy(), computed(model[1][0]),
                               rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ BackboneFinetuning backbone (E4)
class TwoStacks(Classifier):
    """A backbone and a neck of the same block class and shapes: the frozen backbone looks like a frozen copy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.backbone = nn.Sequential(Block(8), Block(8))
        self.neck = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.neck(self.backbone(self.stem(x))))


FOUR_BLOCKS = ["backbone.0.fc.weight", "backbone.1.fc.weight", "neck.0.fc.weight", "neck.1.fc.weight"]


def _block_weights(model: nn.Module) -> np.ndarray:
    params = dict(model.named_parameters())
    return np.concatenate([params[n].detach().double().numpy().reshape(-1) for n in FOUR_BLOCKS])


def test_a_backbone_finetuning_backbone_is_followed_from_fit_start() -> None:
    """BackboneFinetuning's backbone is frozen at fit start and trained from epoch 1: it is no frozen copy of the neck
    (it was left out for the whole fit). r90 equals numpy's on the four block weights' snapshots."""
    monitor, own = DimensionalCollapse(every_n_steps=1, projection_dim=None), Snapshots(_block_weights)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0,
                                    backbone_initial_ratio_lr=1.0)
    logger = fit(TwoStacks(), [finetuning, own, monitor], max_epochs=2, limit_train_batches=3)
    assert monitor.param_names == FOUR_BLOCKS
    logged = logger.logged("collapse/params/r90")
    assert [logged[step] for step in range(1, 6)] == [numpy_r90(own.taken[: step + 2]) for step in range(1, 6)]


class UnfreezeBackboneAt1(BaseFinetuning):
    """A finetuning callback of the user's own (not BackboneFinetuning): its module cannot be known in advance."""

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module, epoch, optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.5)


def test_a_frozen_copy_that_starts_training_makes_the_trajectory_choose_again() -> None:
    """Under another BaseFinetuning the frozen backbone is taken for a copy at first; when it trains, the trajectory
    says so and follows all four block weights from that step: r90 equals numpy's on the snapshots since then."""
    monitor, own = DimensionalCollapse(every_n_steps=1, projection_dim=None), Snapshots(_block_weights)
    with pytest.warns(UserWarning, match="frozen copy's trains now .* at step 3; params/r90 follows"):
        logger = fit(TwoStacks(), [UnfreezeBackboneAt1(), own, monitor], max_epochs=2, limit_train_batches=3)
    assert monitor.param_names == FOUR_BLOCKS
    logged = logger.logged("collapse/params/r90")
    # own.taken[k] is after k optimizer steps, as is the snapshot of step k - 1: the new trajectory starts at step 3
    assert [logged[step] for step in (4, 5)] == [numpy_r90(own.taken[4: step + 2]) for step in (4, 5)]


# ------------------------------------------------------------------ a followed weight resized mid-fit (E5)
class GrowingHead(Classifier):
    """Class-incremental learning: the head grows from 3 to 5 classes at epoch 1, keeping the old rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc1(x)))

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            old, self.head = self.head, nn.Linear(8, 5)
            with torch.no_grad():
                self.head.weight[:3] = old.weight
                self.head.bias[:3] = old.bias
            self.trainer.strategy.setup_optimizers(self.trainer)


def _matrices(model: nn.Module) -> np.ndarray:
    return np.concatenate([model.fc1.weight.detach().double().numpy().ravel(),
                           model.head.weight.detach().double().numpy().ravel()])


def test_a_followed_weight_that_grows_mid_fit_starts_a_new_trajectory() -> None:
    """The head's growth is said at the step it is seen, and r90 after it equals numpy's on the new-shape snapshots
    (the fit crashed: snapshots of two lengths stacked)."""
    monitor, own = DimensionalCollapse(every_n_steps=1, projection_dim=None), Snapshots(_matrices)
    with pytest.warns(UserWarning, match=r"changed shape \(head.weight: \(3, 8\) to \(5, 8\).* at step 3"):
        logger = fit(GrowingHead(), [own, monitor], max_epochs=2, limit_train_batches=3)
    logged = logger.logged("collapse/params/r90")
    assert 3 not in logged  # one snapshot of the new shape: no r90 yet
    assert [logged[step] for step in (4, 5)] == [numpy_r90(own.taken[4: step + 2]) for step in (4, 5)]


def test_a_count_sketched_trajectory_does_not_mix_layouts_of_a_resized_weight() -> None:
    """Count-sketched (more numbers than projection_dim), the snapshots keep their length when the head grows, so the
    old code stacked the two layouts in one PCA silently: now the new trajectory starts at the growth step."""
    monitor = DimensionalCollapse(every_n_steps=1, projection_dim=16)
    with pytest.warns(UserWarning, match="changed shape"):
        fit(GrowingHead(), [monitor], max_epochs=2, limit_train_batches=3)
    assert monitor._snapshot_steps == [3, 4, 5]


# ------------------------------------------------------------------ a tapped module replaced mid-fit (E7)
class ReplacesABlock(Classifier):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.blocks, self.head = nn.Linear(6, 8), nn.ModuleList([Block(8), Block(8)]), nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.blocks[1] = Block(8)


class OwnMean(Callback):
    """numpy float64 mean of whatever module is ``blocks.1`` at each step, by a hook of its own."""

    def __init__(self) -> None:
        self.means: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step

        def record(module, args, out) -> None:
            self.means.setdefault(step, float(out.detach().double().numpy().mean()))

        self.handle = pl_module.blocks[1].register_forward_hook(record)

    def on_train_batch_end(self, *args) -> None:
        self.handle.remove()


def test_a_tapped_module_replaced_mid_fit_is_observed_under_its_name() -> None:
    """``blocks[1]`` replaced at epoch 1: the monitor moves to the new module, says so once, and logs its mean
    (= numpy on the running block's output); it logged nothing from then on and blamed the module for not running."""
    own, monitor = OwnMean(), ActivationStats(every_n_steps=1, modules=["@blocks"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = fit(ReplacesABlock(), [own, monitor], max_epochs=2, limit_train_batches=3)
    logged = logger.logged("act/blocks.1/mean")
    assert sorted(logged) == list(range(6))
    np.testing.assert_allclose([logged[s] for s in range(6)], [own.means[s] for s in range(6)], rtol=1e-6)
    said = [str(w.message) for w in caught if "blocks.1" in str(w.message)]
    assert len(said) == 1 and "replaced by new modules" in said[0] and "from step 3" in said[0]


class GrowsTheStem(Classifier):
    """``stem`` (6 -> 8 features) replaced at epoch 1 by a wider one (6 -> 16), whose first 8 features feed the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x))[..., :8])

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.stem = nn.Linear(6, 16)


class OwnRows(Callback):
    """The float64 output rows of whatever module is ``stem`` at each step, by a hook of its own."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step

        def record(module, args, out) -> None:
            self.rows.setdefault(step, out.detach().double().numpy().copy())

        self.handle = pl_module.stem.register_forward_hook(record)

    def on_train_batch_end(self, *args) -> None:
        self.handle.remove()


def _numpy_erank(rows: np.ndarray) -> float:
    singular = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    p = singular[singular > 1e-12 * singular[0]] / singular[singular > 1e-12 * singular[0]].sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_collapse_follows_a_tapped_layer_grown_mid_fit() -> None:
    """``stem`` grown from 8 to 16 features at step 3: the erank of the new module's rows (numpy float64) is logged
    from then on. Before: the tap kept the fit's first width, dropped every call of the new one as "runs at widths 8
    and 16", and logged nothing for it for the rest of the fit."""
    own, monitor = OwnRows(), DimensionalCollapse(modules=["stem"], every_n_steps=1, param_patterns=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = fit(GrowsTheStem(), [own, monitor], max_epochs=2, limit_train_batches=3)
    logged = logger.logged("collapse/stem/erank")
    assert sorted(logged) == list(range(6)) and [own.rows[s].shape[1] for s in range(6)] == [8] * 3 + [16] * 3
    np.testing.assert_allclose([logged[s] for s in range(6)], [_numpy_erank(own.rows[s]) for s in range(6)], rtol=1e-6)
    assert not [w for w in caught if "runs at widths" in str(w.message) or "did not run" in str(w.message)]


class SwapsTheStemWithSend(GrowsTheStem):
    """``stem`` replaced at step 3 by one of the same width; a validation loader for SensitiveNeurons' tracking set."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.stem = nn.Linear(6, 8)

    def validation_step(self, batch, batch_idx):
        pass


def test_sensitive_neurons_follow_a_replaced_module_with_its_drop() -> None:
    """``stem`` replaced at step 3 under ``SensitiveNeurons(drop=True)``: the new module's training outputs have the
    sensitive features zeroed (what SeND drops) and the checkpoints go on logging. Before: the hooks, the drop's too,
    stayed on the old object: nothing logged after step 2, and the running layer trained without the drop."""
    from lightning_act.callbacks import SensitiveNeurons

    own = OwnRows()
    monitor = SensitiveNeurons(modules=["stem"], every_n_steps=1, window=2, num_samples=8, eigenscore_passes=2,
                               drop=True, drop_checkpoints=10)
    model = SwapsTheStemWithSend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MemoryLogger()
        trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(prefix="lightning_act_test_"), accelerator="cpu",
                             devices=1, logger=logger, callbacks=[own, monitor], max_epochs=2,
                             limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(model, loader(), loader())
    assert sorted(logger.logged("sensitive/stem/count")) == list(range(6))  # (no eigenscore: no dropout, round 30)
    dropped = monitor.sensitive["stem"].tolist()  # selected at step 2 (the window's 3rd checkpoint), held since
    assert dropped and logger.logged("sensitive/stem/selected") == {s: float(s == 2) for s in range(6)}
    for step in (3, 4, 5):  # the new module's outputs: the dropped features exactly 0, the others not
        rows = own.rows[step]
        assert not np.any(rows[:, dropped]) and np.all(np.any(rows[:, [f for f in range(8) if f not in dropped]], 0))
    assert any("replaced by new modules" in str(w.message) for w in caught)


# ------------------------------------------------------------------ ema-pytorch's EMA (E8), position-bias MLPs (B5)
class EMA(nn.Module):
    """A stand-in for ema-pytorch's ``EMA`` (same class name and package, same structure): the trained network
    registered again as ``online_model`` and a frozen deep copy as ``ema_model``."""

    __module__ = "ema_pytorch.ema_pytorch"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.online_model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False)


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Linear(6, 8), nn.ModuleList([Block(8), Block(8)]), nn.Linear(8, 3)


class WithEma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Trunk()
        self.ema = EMA(self.net)


def test_an_ema_pytorch_copy_is_left_out_of_the_presets_without_alias_warnings() -> None:
    """The presets tap the trained network only (they tapped ``ema.ema_model.*``, which never runs in training, and
    warned for every tap that ``ema.online_model.*`` aliases it); the default trajectory follows its weights."""
    model = WithEma()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        taps = select_taps(model, ["@activations", "@blocks", "@penultimate"])
    assert [t.name for t in taps] == ["net.blocks.0.act", "net.blocks.1.act", "net.blocks.0", "net.blocks.1",
                                      "net.head-input"]
    assert [t.module for t in taps][:2] == [model.net.blocks[0].act, model.net.blocks[1].act]
    assert not [str(w.message) for w in caught]
    assert DimensionalCollapse()._select_params(model) == ["net.blocks.0.fc.weight", "net.blocks.1.fc.weight"]


class RelPosMlp(nn.Module):  # timm's MaxViT/CoAtNet MLP position bias, by class name
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(2, 8), "fc2": nn.Linear(8, 2)})


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))  # timm swinv2
        self.meta_mlp = nn.ModuleDict({"fc1": nn.Linear(2, 16), "act": nn.ReLU(), "fc2": nn.Linear(16, 2)})  # cr
        self.rel_pos = RelPosMlp()


class SwinV2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(8, 16), "act": nn.GELU(), "fc2": nn.Linear(16, 8)})


def test_position_bias_mlps_are_left_out_of_activations() -> None:
    """Swin V2's ``cpb_mlp``/``meta_mlp`` and a ``RelPosMlp`` run on a coordinate table, not the batch: only the
    block MLPs' activations are ``@activations`` (the position-bias ReLUs were half of them), and a position-bias MLP
    without an activation module gives no ``fc2-input`` tap; by name they are still selectable."""
    model = nn.Sequential(SwinV2Block(), SwinV2Block())
    assert [t.name for t in select_taps(model, "@activations")] == ["0.mlp.act", "1.mlp.act"]
    assert [t.name for t in select_taps(model, "*.cpb_mlp.1")] == ["0.attn.cpb_mlp.1", "1.attn.cpb_mlp.1"]
