"""The capture core inside real Trainer.fit runs, checked against numpy on recorded activations."""

import collections
import copy
import csv
import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from _toy import BlockNet, ManualToyTask, ToyTask, forward_hook_count, quiet_trainer, tiny_mlp, toy_loader
from lightning_act.callbacks import ActivationStats
from lightning_act.callbacks.base import StagedStatistics, start_host_transfer


class Recorder(Callback):
    """Records a module's training outputs per global step with a plain hook of the test's own."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.outputs: dict[int, list[np.ndarray]] = {}
        self._step = None

    def on_fit_start(self, trainer, pl_module):
        module = dict(pl_module.named_modules())[self.module_name]
        self._handle = module.register_forward_hook(self._record)

    def _record(self, module, args, out) -> None:  # returns None: the output is left as it is
        if self._step is not None:
            self.outputs.setdefault(self._step, []).append(out.detach().double().numpy().copy())

    def on_fit_end(self, trainer, pl_module):
        self._handle.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss):
        self._step = None


def numpy_stats(arrays):
    a = np.concatenate([x.ravel() for x in arrays])
    f = a[np.isfinite(a)]
    return {
        "mean": f.mean(), "std": f.std(), "abs_max": np.abs(f).max(),
        "zero_frac": (f == 0).sum() / a.size, "nonfinite": float(a.size - f.size), "count": a.size,
    }


def fit(task, callbacks, max_steps, batch_size=8, **trainer_kwargs):
    pl.seed_everything(0)
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(task, toy_loader(batch_size=batch_size))
    return trainer


def test_logged_values_match_numpy_on_due_steps_only():
    monitor = ActivationStats(modules=["net.2", "net.4"], every_n_steps=3)
    recorder = Recorder("net.2")
    task = ToyTask(tiny_mlp())
    fit(task, [monitor, recorder], max_steps=8)
    series = monitor.history["act/net.2/mean"]
    assert series.steps == [0, 3, 6]
    for step in (0, 3, 6):
        want = numpy_stats(recorder.outputs[step])
        for stat in ("mean", "std", "abs_max", "zero_frac", "nonfinite"):
            got = monitor.history[f"act/net.2/{stat}"].values[[0, 3, 6].index(step)]
            np.testing.assert_allclose(got, want[stat], rtol=1e-5, atol=1e-7, err_msg=stat)
    assert 0.2 < monitor.history["act/net.2/zero_frac"].values[0] < 0.8  # ReLU zeros are counted
    assert forward_hook_count(task) == 0
    pickle.dumps(task.net)
    copy.deepcopy(task)


class EvenStepBranch(ToyTask):
    """A branch (``extra``) that runs at even optimizer steps only, as in early-exit or mixture-of-experts models."""

    def __init__(self):
        super().__init__(tiny_mlp())
        self.extra = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.global_step % 2 == 0:
            logits = logits + self.extra(logits)
        return nn.functional.cross_entropy(logits, y)


def test_a_tap_whose_module_skips_a_due_step_logs_nothing_at_that_step():
    from lightning_act.callbacks import ActivationSparsity, DimensionalCollapse, MassiveActivations

    monitors = [
        ActivationStats(modules=["extra.1", "net.2"], every_n_steps=1),
        ActivationSparsity(modules=["extra.1"], every_n_steps=1),
        MassiveActivations(modules=["extra"], every_n_steps=1),
        DimensionalCollapse(modules=["extra"], every_n_steps=1, param_patterns=[]),
    ]
    recorder = Recorder("extra.1")
    with pytest.warns(UserWarning, match="extra.1 produced no activation at step 1") as caught:
        fit(EvenStepBranch(), [*monitors, recorder], max_steps=5)
    assert sum("extra.1 produced no activation" in str(w.message) for w in caught) == 2  # once per monitor
    for key, series in monitors[0].history.items():
        assert series.steps == ([0, 1, 2, 3, 4] if key.startswith("act/net.2/") else [0, 2, 4]), key
    for monitor in monitors[1:]:
        assert monitor.history and all(series.steps == [0, 2, 4] for series in monitor.history.values())
    # the logged values are the branch's own, not reset buffers (top1 -inf, fractions 0) of the skipped steps
    for position, step in enumerate((0, 2, 4)):
        relu = np.concatenate([a.ravel() for a in recorder.outputs[step]])
        assert monitors[1].history["sparsity/extra.1/zero_frac"].values[position] == pytest.approx((relu == 0).mean())
        assert monitors[0].history["act/extra.1/abs_max"].values[position] == pytest.approx(np.abs(relu).max())


class Exploding(ToyTask):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_removed_when_training_raises():
    task = Exploding(tiny_mlp())
    monitor = ActivationStats(every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(task, [monitor], max_steps=5)
    assert forward_hook_count(task) == 0
    pickle.dumps(task)


def test_gradient_accumulation_counts_optimizer_steps():
    # the same starting weights for both fits, whatever ran before this test
    accumulated = ActivationStats(modules=["net.2"], every_n_steps=2)
    pl.seed_everything(0)
    fit(ToyTask(tiny_mlp()), [accumulated], max_steps=3, batch_size=8, accumulate_grad_batches=2)
    single = ActivationStats(modules=["net.2"], every_n_steps=2)
    pl.seed_everything(0)
    fit(ToyTask(tiny_mlp()), [single], max_steps=1, batch_size=16)
    assert accumulated.history["act/net.2/mean"].steps == [0, 2]
    assert accumulated.history["act/net.2/count"].values == [16 * 32, 16 * 32]
    for stat in ("mean", "std", "abs_max", "zero_frac"):
        np.testing.assert_allclose(
            accumulated.history[f"act/net.2/{stat}"].values[0], single.history[f"act/net.2/{stat}"].values[0],
            rtol=1e-6, err_msg=stat,
        )


class BackwardFlag(ToyTask):
    """Tells whether the current training batch has run its backward yet."""

    backward_done = False

    def on_train_batch_start(self, batch, batch_idx):
        self.backward_done = False

    def on_after_backward(self):
        self.backward_done = True


class StagingRecorder(ActivationStats):
    """Records when each due step's statistics were staged: before or after the batch's backward."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.staged_at = []

    def stage(self, trainer, step, with_extras):
        self.staged_at.append((step, "after backward" if trainer.lightning_module.backward_done else "before backward"))
        return super().stage(trainer, step, with_extras)


class MetricsAtBatchEnd(Callback):
    """Listed after the monitor, like ``ModelCheckpoint``: what ``callback_metrics`` holds at each batch's end."""

    def __init__(self, key):
        self.key, self.seen = key, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.key in trainer.callback_metrics:
            self.seen[trainer.global_step - 1] = float(trainer.callback_metrics[self.key])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_statistics_are_staged_before_the_backward_and_logged_at_the_end_of_their_step(accumulate):
    """Without gradient accumulation the due step's forward is complete before its backward, so the reduction and
    the host transfer start there (on a GPU the host then waits only for the statistics, not for the backward and
    optimizer step); they still reach ``callback_metrics`` by the end of that step, for the callbacks after the
    monitor. Under accumulation the statistics of all micro-batches are staged after the last backward."""
    monitor = StagingRecorder(modules=["net.2"], every_n_steps=2)
    reader = MetricsAtBatchEnd("act/net.2/mean")
    recorder = Recorder("net.2")
    fit(BackwardFlag(tiny_mlp()), [monitor, reader, recorder], max_steps=5, accumulate_grad_batches=accumulate)
    when = "before backward" if accumulate == 1 else "after backward"
    assert monitor.staged_at == [(0, when), (2, when), (4, when)]
    series = monitor.history["act/net.2/mean"]
    assert series.steps == [0, 2, 4]
    # each due step's value is in callback_metrics at the end of that same step (no lag), and it is the step's mean
    # callback_metrics hold float32 tensors; the values differ from step to step, so a lag would show
    np.testing.assert_allclose([reader.seen[step] for step in series.steps], series.values, rtol=1e-6)
    for step, value in zip(series.steps, series.values):
        np.testing.assert_allclose(value, np.concatenate([x.ravel() for x in recorder.outputs[step]]).mean(), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_reach_the_host_through_pinned_memory_without_a_host_sync():
    packed = torch.arange(5, dtype=torch.float64, device="cuda") / 3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing operation raises
    try:
        fields = start_host_transfer(packed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    staged = StagedStatistics(0, [], [], set(), **fields)
    assert staged.pinned is not None and staged.pinned.is_pinned() and staged.values is None
    np.testing.assert_array_equal(staged.host_values(), np.arange(5) / 3)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_is_not_double_counted(mode):
    plain = ActivationStats(modules=["@activations", "@blocks"], every_n_steps=1)
    pl.seed_everything(0)
    fit(ToyTask(BlockNet()), [plain], max_steps=2)
    ckpt = ActivationStats(modules=["@activations", "@blocks"], every_n_steps=1)
    pl.seed_everything(0)
    fit(ToyTask(BlockNet(checkpointing=mode)), [ckpt], max_steps=2)
    assert set(plain.history) == set(ckpt.history)
    assert [t.name for t in ckpt.taps] == ["net.blocks.0.act", "net.blocks.1.act", "net.blocks.0", "net.blocks.1"]
    assert ckpt.history["act/net.blocks.0.act/count"].values == [8 * 4 * 16, 8 * 4 * 16]
    for key in plain.history:
        np.testing.assert_allclose(ckpt.history[key].values, plain.history[key].values, rtol=1e-5, err_msg=key)


class InputGradientPenalty(ToyTask):
    """An input-gradient penalty (``autograd.grad(create_graph=True)``, as R1 or Jacobian regularisers): with
    checkpointed blocks, autograd recomputes them inside the step, while the monitors are armed."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(self(x), y)
        (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + 0.1 * gradient.pow(2).sum()


class CheckpointedMlpNet(nn.Module):
    """Tokens through two checkpointed ``x + fc2(act(fc1(x)))`` blocks: ``fc2`` saves the activation, so a
    non-reentrant recompute (which stops after the last saved tensor) reruns ``act`` but not the whole block."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed = nn.Linear(64, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(collections.OrderedDict(fc1=nn.Linear(16, 32), act=nn.GELU(), fc2=nn.Linear(32, 16)))
            for _ in range(2)
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.embed(x.reshape(x.shape[0], 4, 64))
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean(1))


@pytest.mark.parametrize(("task", "mode"), [  # reentrant checkpointing refuses autograd.grad
    (InputGradientPenalty, "non_reentrant"), (ManualToyTask, "non_reentrant"), (ManualToyTask, "reentrant"),
])
def test_a_forward_the_autograd_engine_recomputes_is_not_counted(task, mode):
    # Before: with an autograd.grad in the step, or under manual optimization, the recompute was counted: `count` of an
    # activation inside a checkpointed block was twice the training forward's (non-reentrant: only the modules inside
    # the block up to its last saved tensor rerun, so a block tap and its activation disagreed).
    recorder = Recorder("net.blocks.1.act")
    checkpointed = ActivationStats(modules=["net.blocks.1.act", "net.blocks.1.fc2"], every_n_steps=1)
    pl.seed_everything(0)
    fit(task(CheckpointedMlpNet(mode)), [checkpointed, recorder], max_steps=2)
    for step in (0, 1):
        training_forward = numpy_stats(recorder.outputs[step][:1])  # the first call of a step is its forward
        assert checkpointed.history["act/net.blocks.1.act/count"].values[step] == 8 * 4 * 32
        np.testing.assert_allclose(checkpointed.history["act/net.blocks.1.act/mean"].values[step],
                                   training_forward["mean"], rtol=1e-5)
    assert checkpointed.history["act/net.blocks.1.fc2/count"].values == [8 * 4 * 16] * 2


class PerSampleGradientNorms(ToyTask):
    """Per-sample gradient norms the torch.func way (vmap over grad of a functional_call) logged beside the loss."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        params = {name: p.detach() for name, p in self.net.named_parameters()}

        def sample_loss(p, xi, yi):
            logits = torch.func.functional_call(self.net, p, (xi[None],))
            return nn.functional.cross_entropy(logits, yi[None])

        grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
        self.log("grad_norm", torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).sum(0).mean())
        return nn.functional.cross_entropy(self(x), y)


class InferenceModeTeacher(ToyTask):
    """Targets from the model itself under ``torch.inference_mode()`` before the training forward."""

    def training_step(self, batch, batch_idx):
        with torch.inference_mode():
            targets = self(batch[0]).argmax(1)
        return nn.functional.cross_entropy(self(batch[0]), targets.clone())


def test_forwards_inside_torch_func_transforms_are_left_out_with_one_warning():
    # Before: vmap raised "Batching rule not implemented for aten::abs.out" inside the monitor's fused pass.
    recorder = Recorder("net.2")
    plain = ActivationStats(modules=["net.2"], every_n_steps=1)
    fit(ToyTask(tiny_mlp()), [plain, recorder], max_steps=2)  # the same weights: the gradient norms are only logged
    monitor = ActivationStats(modules=["net.2"], every_n_steps=1)
    with pytest.warns(UserWarning, match="inside a torch.func transform") as record:
        fit(PerSampleGradientNorms(tiny_mlp()), [monitor], max_steps=2)
    assert sum("torch.func transform" in str(w.message) for w in record) == 1
    for index, step in enumerate((0, 1)):
        expected = numpy_stats(recorder.outputs[step])
        for stat in ("mean", "count"):
            np.testing.assert_allclose(monitor.history[f"act/net.2/{stat}"].values[index], expected[stat], rtol=1e-5)


def test_a_forward_under_inference_mode_in_the_step_is_measured_without_a_crash():
    # Before: "Inplace update to inference tensor outside InferenceMode is not allowed" at the step's staging.
    recorder = Recorder("net.2")
    monitor = ActivationStats(modules=["net.2"], every_n_steps=1)
    fit(InferenceModeTeacher(tiny_mlp()), [monitor, recorder], max_steps=3)
    for index, step in enumerate((0, 1, 2)):
        np.testing.assert_allclose(monitor.history["act/net.2/mean"].values[index],
                                   numpy_stats(recorder.outputs[step])["mean"], rtol=1e-5)


def test_bf16_autocast_statistics():
    monitor = ActivationStats(modules=["net.2"], every_n_steps=1)
    recorder = Recorder("net.2")
    fit(ToyTask(tiny_mlp()), [monitor, recorder], max_steps=2, precision="bf16-mixed")
    for index, step in enumerate((0, 1)):
        assert recorder.outputs[step][0].dtype == np.float64  # recorded as float64 copies of bf16 outputs
        want = numpy_stats(recorder.outputs[step])
        np.testing.assert_allclose(monitor.history["act/net.2/mean"].values[index], want["mean"], rtol=1e-5)
        np.testing.assert_allclose(monitor.history["act/net.2/abs_max"].values[index], want["abs_max"], rtol=1e-6)


class PoisonNaN(nn.Module):
    """Replaces 3 fixed entries of each sample with NaN, +Inf and -Inf (on a detached copy)."""

    def forward(self, x):
        x = x.clone()
        x[:, 0], x[:, 1], x[:, 2] = float("nan"), float("inf"), float("-inf")
        return x


class NaNTask(ToyTask):
    def __init__(self):
        super().__init__(tiny_mlp())
        self.poison = PoisonNaN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.poison(self.net[:3](x))  # observed side branch; the loss stays finite
        return super().training_step(batch, batch_idx)


def test_nonfinite_values_are_counted_not_propagated():
    monitor = ActivationStats(modules=["poison"], every_n_steps=1)
    recorder = Recorder("poison")
    fit(NaNTask(), [monitor, recorder], max_steps=2)
    assert monitor.history["act/poison/nonfinite"].values == [8 * 3, 8 * 3]
    want = numpy_stats(recorder.outputs[1])
    np.testing.assert_allclose(monitor.history["act/poison/mean"].values[1], want["mean"], rtol=1e-6)
    assert np.isfinite(monitor.history["act/poison/abs_max"].values).all()


def test_csv_logger_gets_keys_at_the_global_step(tmp_path):
    monitor = ActivationStats(modules=["net.2"], every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    fit(ToyTask(tiny_mlp()), [monitor], max_steps=5, logger=logger)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("act/net.2/mean")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    np.testing.assert_allclose([float(r["act/net.2/mean"]) for r in rows], monitor.history["act/net.2/mean"].values)


def test_resume_restores_history(tmp_path):
    first = ActivationStats(modules=["net.2"], every_n_steps=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    fit(ToyTask(tiny_mlp()), [first, ckpt], max_steps=3, enable_checkpointing=True)
    resumed = ActivationStats(modules=["net.2"], every_n_steps=1)
    pl.seed_everything(0)
    trainer = quiet_trainer(max_steps=5, callbacks=[resumed])
    trainer.fit(ToyTask(tiny_mlp()), toy_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.history["act/net.2/mean"].steps == [0, 1, 2, 3, 4]
    assert resumed.history["act/net.2/mean"].values[:3] == first.history["act/net.2/mean"].values


def test_two_monitors_of_one_class_keep_separate_state():
    a, b = ActivationStats(modules=["net.2"]), ActivationStats(modules=["net.4"])
    assert a.state_key != b.state_key


def test_history_memory_is_bounded():
    from lightning_act.callbacks.history import BoundedSeries

    series = BoundedSeries(capacity=8)
    for step in range(1000):
        series.append(step, float(step))
    assert len(series) < 8 and series.steps[0] == 0 and series.steps[-1] >= 1000 - series.stride
    assert series.steps == sorted(series.steps) and len(set(np.diff(series.steps))) == 1


@pytest.mark.parametrize(("saved", "resumed"), [(64, 8), (64, 3), (8, 64), (8, 8)])
def test_a_history_resized_at_a_resume_keeps_what_that_size_would_have_kept(saved, resumed):
    # Before: a resume with another history_size kept the checkpoint's capacity for every restored key.
    from lightning_act.callbacks.history import BoundedSeries

    before, grown_at_new_size = BoundedSeries(capacity=saved), BoundedSeries(capacity=resumed)
    for step in range(100):
        before.append(step, float(step))
        grown_at_new_size.append(step, float(step))
    resized = BoundedSeries.from_state_dict(before.state_dict()).with_capacity(resumed)
    for step in range(100, 300):
        resized.append(step, float(step))
        grown_at_new_size.append(step, float(step))
    assert len(resized) < resumed
    if resumed <= saved:  # a larger capacity keeps the finer points the old one already had: nothing to compare
        assert resized.steps == grown_at_new_size.steps and resized.stride == grown_at_new_size.stride


def test_two_monitors_of_one_class_on_one_module_are_refused_on_different_modules_logged_apart():
    """Before: both logged their own values under the same keys at the same step (the second row won in a report)."""
    from lightning_act.errors import LightningActError

    trainer = quiet_trainer(max_steps=1, callbacks=[ActivationStats(modules=["net.2", "net.4"]), ActivationStats(modules=["net.4"])])
    with pytest.raises(LightningActError, match=r"two ActivationStats monitors tap \['net.4'\], and both would log under the same"):
        trainer.fit(ToyTask(tiny_mlp()), toy_loader())
    apart = [ActivationStats(modules=["net.2"], every_n_steps=1), ActivationStats(modules=["net.4"], every_n_steps=1)]
    trainer = quiet_trainer(max_steps=1, callbacks=apart)
    trainer.fit(ToyTask(tiny_mlp()), toy_loader())
    assert {"act/net.2/rms", "act/net.4/rms"} <= set(trainer.callback_metrics)


def test_callback_metrics_hold_the_logged_float64_values():
    # Before: put into callback_metrics as float32, so EarlyStopping/ModelCheckpoint read inf for an abs_max of 1e39
    # (finite in a "64-true" model) and 0 for values below ~1e-45, while the loggers had the float64 values.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.big, self.tiny = nn.Identity(), nn.Identity()

        def forward(self, x):
            h = self.fc(x)
            return self.big(h * 1e39) * 1e-39 + self.tiny(h * 1e-50) * 1e50

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Scaled()

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = ActivationStats(modules=["net.big", "net.tiny"], every_n_steps=1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    trainer = quiet_trainer(max_steps=1, precision="64-true", callbacks=[monitor])
    trainer.fit(Task(), torch.utils.data.DataLoader(data, batch_size=8))
    for key in ("act/net.big/abs_max", "act/net.tiny/abs_max"):
        logged = monitor.history[key].values[-1]
        assert 0 < abs(logged) < float("inf") and float(trainer.callback_metrics[key]) == logged
