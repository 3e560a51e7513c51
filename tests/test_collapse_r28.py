"""Round 28: DimensionalCollapse's weight trajectory across a followed layer replaced mid-fit by a new module of the
same shape (a new trajectory, said once), and not across pruning, parametrizations or a resume; the strict readers
of a never-logged ``params/r90`` named in its "not logged" warning."""
from __future__ import annotations

import contextlib
import gc
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ModelPruning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.utils import parametrizations

from _toy import Block, BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse

R90 = "collapse/params/r90"
FRACTION = 0.99  # r90 at 0.9 of these short trajectories is mostly 1, whichever snapshots they hold


def forward_weight(fc: torch.nn.Linear) -> torch.Tensor:
    """``fc``'s weight as its next forward uses it, computed here: masked when pruned, ``g v / ||v||`` under the
    hook-based ``weight_norm``, else the attribute (a parametrization computes it)."""
    if hasattr(fc, "weight_mask"):
        return fc.weight_orig * fc.weight_mask
    if hasattr(fc, "weight_g"):
        return fc.weight_g * fc.weight_v / fc.weight_v.norm(dim=1, keepdim=True)
    return fc.weight


class Snapshots(Callback):
    """The followed weights (float64) at fit start (step -1) and after each step's update."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}

    def _take(self, pl_module, step: int) -> None:
        with torch.no_grad():
            rows = [forward_weight(block.fc).double().flatten() for block in pl_module.net.blocks]
        self.rows[step] = torch.cat(rows).numpy()

    def on_fit_start(self, trainer, pl_module):
        self._take(pl_module, -1)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._take(pl_module, trainer.global_step - 1)


class AdamTask(ToyTask):
    """``ToyTask`` with Adam, whose per-weight steps make a trajectory of several directions."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def follow_blocks() -> DimensionalCollapse:
    return DimensionalCollapse(every_n_steps=1, modules=[], param_patterns=["net.blocks.*.fc.weight"],
                               variance_fraction=FRACTION)


class AtEpoch1(Callback):
    """Changes the model at the start of epoch 1 with ``change(pl_module)``, then rebuilds the optimizer."""

    def __init__(self, change) -> None:
        self.change = change

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.change(pl_module)
            trainer.strategy.setup_optimizers(trainer)


def numpy_r90(rows: list[np.ndarray], fraction: float = FRACTION) -> int:
    x = np.stack(rows)
    x = x - x[0]
    x = x - x.mean(0)
    lam = np.linalg.svd(x, compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(lam) / lam.sum() >= fraction - 1e-12)) + 1


def logged(monitor: DimensionalCollapse) -> dict[int, float]:
    series = monitor.history[R90]
    return dict(zip(series.steps, series.values))


def trajectory_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "DimensionalCollapse" in str(w.message)
            and "trajectory" in str(w.message)]


def fit(callbacks, steps: int = 12, **trainer_options):
    """A 3-epoch (4 batches each) fit of a 2-block ``BlockNet`` under ``callbacks`` with every-step r90 on the
    blocks' weights; the monitor, the snapshots and the trajectory warnings."""
    torch.manual_seed(0)
    monitor = follow_blocks()
    snaps = Snapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = AdamTask(BlockNet(depth=2), lr=0.05)
        quiet_trainer(max_steps=steps, limit_train_batches=4, callbacks=[*callbacks, monitor, snaps],
                      **trainer_options).fit(task, ToyData(batch_size=8, n=32))
    return monitor, snaps, trajectory_warnings(caught)


def test_block_replaced_by_a_new_one_of_the_same_shape_restarts_the_trajectory_once():
    """Block 1 re-created at epoch 1 (step 4): r90 from step 5 on is numpy's r90 of the snapshots from step 4 (the
    new module's weights after its first update) on, not of the trajectory that jumps from the old module's
    weights to the new one's (the old code logged that, with no warning)."""
    monitor, snaps, said = fit([AtEpoch1(lambda m: m.net.blocks.__setitem__(1, Block(16)))])
    assert monitor.param_names == ["net.blocks.0.fc.weight", "net.blocks.1.fc.weight"]
    assert len(said) == 1 and "replaced" in said[0] and "net.blocks.1.fc.weight" in said[0] and "step 4" in said[0]
    got = logged(monitor)
    assert 4 not in got  # one snapshot of the new trajectory: no r90 yet
    for step in range(5, 12):
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(4, step + 1)]), step
    mixed = [numpy_r90([snaps.rows[s] for s in range(-1, step + 1)]) for step in range(5, 12)]
    assert mixed != [got[s] for s in range(5, 12)]  # the test tells the two trajectories apart
    for step in range(0, 4):  # before the replacement: the first trajectory
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(-1, step + 1)]), step


def _prune_blocks(pl_module) -> None:
    for block in pl_module.net.blocks:
        torch.nn.utils.prune.l1_unstructured(block.fc, "weight", amount=0.3)


def _weight_norm_blocks(pl_module) -> None:
    parametrizations.weight_norm(pl_module.net.blocks[0].fc)  # a parametrization (original0, original1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(pl_module.net.blocks[1].fc)  # the hook-based one (weight_g, weight_v)


@pytest.mark.parametrize("callbacks", [
    pytest.param(lambda: [ModelPruning("l1_unstructured", amount=0.3, apply_pruning=lambda epoch: epoch == 0,
                                       verbose=0)], id="ModelPruning"),
    pytest.param(lambda: [AtEpoch1(_prune_blocks)], id="prune"),
    pytest.param(lambda: [AtEpoch1(_weight_norm_blocks)], id="weight_norm"),
])
def test_pruning_and_parametrizations_keep_the_trajectory_silently(callbacks):
    """The module stays while its weight is re-registered (``weight_orig``, a parametrization's ``original*``,
    ``weight_g``/``weight_v``): one trajectory, no warning, r90 at every step numpy's of all the snapshots."""
    monitor, snaps, said = fit(callbacks())
    assert said == []
    got = logged(monitor)
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(-1, step + 1)]), step


def test_resume_into_a_new_model_continues_the_trajectory(tmp_path):
    """A resume rebuilds the model (new module objects): the checkpoint's trajectory continues, unsaid, and r90
    equals the uninterrupted fit's at every step."""
    whole, _, said = fit([])
    assert said == []
    torch.manual_seed(0)
    first = follow_blocks()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    quiet_trainer(max_steps=4, limit_train_batches=4, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        AdamTask(BlockNet(depth=2), lr=0.05), ToyData(batch_size=8, n=32))
    resumed = follow_blocks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=12, limit_train_batches=4, callbacks=[resumed]).fit(
            AdamTask(BlockNet(depth=2), lr=0.05), ToyData(batch_size=8, n=32),
            ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert trajectory_warnings(caught) == []
    assert logged(resumed) == logged(whole)


@pytest.mark.parametrize("strict", [True, False])
def test_not_logged_r90_names_its_strict_reader(strict):
    """Followed weights frozen since fit start: r90 is not logged, and the warning that says so names an
    ``EarlyStopping(strict=True)`` on it, whose first read ends the fit with Lightning's "not available" error (it
    named no reader before round 28)."""
    torch.manual_seed(0)
    task = AdamTask(BlockNet(depth=2), lr=0.05)
    task.net.blocks.requires_grad_(False)
    monitor = follow_blocks()
    stopping = EarlyStopping(monitor=R90, strict=strict)
    with warnings.catch_warnings(record=True) as caught, (
        pytest.raises(RuntimeError, match="not available") if strict else contextlib.nullcontext()
    ):  # EarlyStopping reads it as the fit ends
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, limit_train_batches=4, callbacks=[monitor, stopping]).fit(
            task, ToyData(batch_size=8, n=32))
    said = [str(w.message) for w in caught if f"{R90} is not logged" in str(w.message)]
    assert len(said) == 1 and R90 not in monitor.history
    named = f"EarlyStopping(monitor='{R90}') reads it" in said[0] and "strict=False" in said[0]
    assert named == strict


def _prepare_qat(pl_module) -> None:
    """``prepare_qat`` on block 1 (its ``fc`` becomes a ``torch.ao.nn.qat.Linear`` holding the same weight), with
    observers and fake quantization off, so that the forward stays as it was."""
    from torch.ao import quantization

    block = pl_module.net.blocks[1]
    block.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    quantization.prepare_qat(block, inplace=True)
    for module in block.modules():
        if isinstance(module, quantization.FakeQuantizeBase):
            module.disable_fake_quant()
            module.disable_observer()


def _swap_keeping_the_weight(pl_module) -> None:
    old = pl_module.net.blocks[1].fc
    new = torch.nn.Linear(old.in_features, old.out_features)
    new.weight, new.bias = old.weight, old.bias
    pl_module.net.blocks[1].fc = new


@pytest.mark.parametrize("swap", [_prepare_qat, _swap_keeping_the_weight], ids=["prepare_qat", "new.weight=old"])
def test_a_module_swapped_for_one_holding_the_same_weight_keeps_the_trajectory(swap):
    """A new module that holds the followed weight's object (QAT mid-fit, a wrapper swap): no jump, so one
    trajectory, no warning, r90 numpy's of all the snapshots (round 28's module check restarted it at step 4)."""
    monitor, snaps, said = fit([AtEpoch1(swap)])
    assert said == []
    got = logged(monitor)
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(-1, step + 1)]), step


def test_a_weight_re_created_in_its_module_restarts_the_trajectory_once():
    """``fc.weight = nn.Parameter(...)`` at epoch 1 (step 4): the jump to the new values is no training, so r90
    from step 5 is numpy's of the snapshots from step 4 on, said once (before: the jumping trajectory, silently)."""
    def reinitialise(pl_module):
        fc = pl_module.net.blocks[1].fc
        fc.weight = torch.nn.Parameter(torch.randn_like(fc.weight))

    monitor, snaps, said = fit([AtEpoch1(reinitialise)])
    assert len(said) == 1 and "new parameter" in said[0] and "net.blocks.1.fc.weight" in said[0] and "step 4" in said[0]
    got = logged(monitor)
    assert 4 not in got
    for step in range(5, 12):
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(4, step + 1)]), step


def _unprune_and_unnorm(pl_module) -> None:
    """Undoes pruning and the hook-based ``weight_norm`` (at epoch 2): the weight is registered as ``weight`` again
    (``prune.remove`` keeps the object, ``remove_weight_norm`` makes a new one of the same values)."""
    if pl_module.trainer.current_epoch == 2:
        torch.nn.utils.prune.remove(pl_module.net.blocks[0].fc, "weight")
        torch.nn.utils.remove_weight_norm(pl_module.net.blocks[1].fc)


class AtEpochs(Callback):
    def __init__(self, *changes) -> None:
        self.changes = changes

    def on_train_epoch_start(self, trainer, pl_module):
        if 0 < trainer.current_epoch <= len(self.changes):
            self.changes[trainer.current_epoch - 1](pl_module)
            trainer.strategy.setup_optimizers(trainer)


def _prune_and_norm(pl_module) -> None:
    torch.nn.utils.prune.l1_unstructured(pl_module.net.blocks[0].fc, "weight", amount=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(pl_module.net.blocks[1].fc)


def test_pruning_and_weight_norm_applied_then_removed_keep_the_trajectory_silently():
    """Applied at epoch 1 and removed at epoch 2: the weight moves between its names (``weight_orig``,
    ``weight_g``/``weight_v``, ``weight``) with its values: one trajectory, no warning."""
    monitor, snaps, said = fit([AtEpochs(_prune_and_norm, _unprune_and_unnorm)])
    assert said == []
    got = logged(monitor)
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == numpy_r90([snaps.rows[s] for s in range(-1, step + 1)]), step


def test_a_not_logged_r90_read_by_model_checkpoint_says_its_own_error(tmp_path):
    """Weights frozen from fit start, so r90 is never logged: the warning names ``ModelCheckpoint(monitor=...)``'s
    own error (a MisconfigurationException "could not find the monitored key" once validation ran, as the fit
    shows), not EarlyStopping's "not available", and a fix that holds for a key never logged (no "save first after
    that step")."""
    torch.manual_seed(0)
    task = AdamTask(BlockNet(depth=2), lr=0.05)
    task.net.blocks.requires_grad_(False)
    monitor = follow_blocks()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=R90)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
        MisconfigurationException, match="could not find the monitored key"
    ):
        warnings.simplefilter("always")
        quiet_trainer(max_steps=8, limit_train_batches=4, limit_val_batches=2, enable_checkpointing=True,
                      callbacks=[monitor, checkpoint]).fit(task, ToyData(batch_size=8, n=32))
    said = [str(w.message) for w in caught if f"{R90} is not logged" in str(w.message)]
    assert len(said) == 1
    assert f"ModelCheckpoint(monitor='{R90}') reads it" in said[0]
    assert "MisconfigurationException" in said[0] and "could not find the monitored key" in said[0]
    assert "not available" not in said[0] and "after that step" not in said[0] and "monitor another key" in said[0]
    # the crashed fit's teardown dropped the weak references to the model, which no pickle holds (ddp_spawn)
    pickle.dumps({k: v for k, v in vars(monitor).items() if k not in ("log", "log_dict")})


def _modules_held(value, seen: set[int]) -> list[torch.nn.Module | torch.nn.Parameter]:
    """The modules and parameters held by ``value``, through dicts, lists, tuples and sets (not weak references)."""
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, (torch.nn.Module, torch.nn.Parameter)):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _modules_held(v, seen)]
    if isinstance(value, (list, tuple, set)):
        return [x for v in value for x in _modules_held(v, seen)]
    return []


class ReplaceBlock1(Callback):
    """Replaces block 1 by a new one at epoch 1 and records whether the old ``fc`` is still alive at the next batch
    (after a ``gc.collect``)."""

    def __init__(self) -> None:
        self.old = None
        self.alive_at_next_batch = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.old = weakref.ref(pl_module.net.blocks[1].fc)
            pl_module.net.blocks[1] = Block(16)
            trainer.strategy.setup_optimizers(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.old is not None and self.alive_at_next_batch is None:
            gc.collect()
            self.alive_at_next_batch = self.old() is not None


def test_the_callback_keeps_no_module_of_the_model_alive():
    """The monitor holds none of the followed layers, neither a replaced one until its next snapshot nor the
    model's after the fit (a copy or pickle of the callback copied them; Lightning's own ``callback.log``, a
    bound method of the model, is not the monitor's)."""
    replace = ReplaceBlock1()
    monitor, _, said = fit([replace], steps=6)
    assert len(said) == 1 and replace.alive_at_next_batch is False
    state = {k: v for k, v in vars(monitor).items() if k not in ("log", "log_dict")}
    assert [type(x).__name__ for x in _modules_held(state, set())] == []
    assert isinstance(pickle.loads(pickle.dumps(state)), dict)  # a ddp_spawn fit pickles its callbacks
