"""Round 21: the monitored model's copies and TorchScript, probes that must not move buffers, and tapped tensors the
monitors could not read (float8, the meta device, window-partitioned rows). Each test fails on the code before."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from _toy import Block, BlockNet, ToyData, ToyTask, forward_hook_count, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationStats, DimensionalCollapse, MassiveActivations, SensitiveNeurons


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []


# ------------------------------------------------------------------------------------------------ TorchScript, copies
class ScriptableNet(nn.Module):
    """Residual blocks on flattened images, a forward TorchScript compiles."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(256, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ExportMidFit(Callback):
    """``pl_module.to_torchscript()`` at one step (a callback exporting a deployable model), its output checked."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.scripted_error: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            scripted = pl_module.to_torchscript()
            pl_module.eval()  # SeND's drop zeroes features in training mode only
            with torch.no_grad():
                self.scripted_error = float((scripted(batch[0]) - pl_module(batch[0])).abs().max())
            pl_module.train()


def test_to_torchscript_inside_a_fit_works_and_the_fit_stays_observed() -> None:
    # Before: AttributeError: '_CaptureHook' object has no attribute '__name__' (TorchScript compiles every hook).
    def run(export: bool) -> tuple[dict, dict[str, torch.Tensor], ExportMidFit]:
        torch.manual_seed(0)
        task = ToyTask(ScriptableNet())
        monitors = [ActivationStats(modules="@blocks", every_n_steps=1),
                    SensitiveNeurons(modules=["net.head:input"], every_n_steps=1, window=2, drop=True,
                                     top_fraction=0.5, eigenscore_passes=0, tracking_inputs=torch.randn(8, 1, 16, 16))]
        exporter = ExportMidFit(at_step=3)
        quiet_trainer(max_steps=6, callbacks=[*monitors, *([exporter] if export else [])]).fit(task, toy_loader())
        histories = {key: series.values for monitor in monitors for key, series in monitor.history.items()}
        return histories, weights(task), exporter

    plain_histories, plain_weights, _ = run(export=False)
    histories, final, exporter = run(export=True)
    assert exporter.scripted_error is not None and exporter.scripted_error < 1e-6  # TorchScript may fuse
    # The monitor hooks came back after the scripting, SeND's drop before the capture as before: the fit with the
    # export trains and observes exactly as the fit without it (SeND drops from step 2 on).
    assert histories["sensitive/net.head-input/dropping"][3:] == [1.0, 1.0, 1.0]
    assert histories == plain_histories
    assert_bitwise_equal(final, plain_weights)


class CopyMidFit(Callback):
    """Copies of the model made while the monitors' hooks are on it: deep-copied and pickled (torch.save)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.copies: dict[str, ToyTask] = {}
        self.dropping_then: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.copies["deepcopy"] = copy.deepcopy(pl_module)
            buffer = io.BytesIO()
            torch.save(pl_module, buffer)
            buffer.seek(0)
            self.copies["torch.save"] = torch.load(buffer, weights_only=False)
            self.dropping_then = trainer.callback_metrics.get("sensitive/net.head-input/dropping")


def test_copies_made_mid_fit_script_and_compute_what_their_weights_compute() -> None:
    # Before: a copy kept the monitors' hooks for good: torch.jit.script of it failed, and SeND's FeatureDrop zeroed the
    # head's input features in every training-mode forward of the copy (max|diff| 0.74 against the same weights).
    torch.manual_seed(0)
    task = ToyTask(ScriptableNet())
    monitors = [ActivationStats(modules="@blocks", every_n_steps=1),
                SensitiveNeurons(modules=["net.head:input"], every_n_steps=1, window=2, drop=True, top_fraction=0.5,
                                 eigenscore_passes=0, tracking_inputs=torch.randn(8, 1, 16, 16))]
    copier = CopyMidFit(at_step=4)
    quiet_trainer(max_steps=5, callbacks=[*monitors, copier]).fit(task, toy_loader())
    assert float(copier.dropping_then) == 1.0
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    for kind, copied in copier.copies.items():
        never_run = copy.deepcopy(copied.net)  # a copy of the copy, whose hooks were never called
        clean = ScriptableNet()
        clean.load_state_dict(copied.net.state_dict())
        copied.train(), clean.train()
        with torch.no_grad():
            assert torch.equal(copied(x), clean(x)), kind
        assert forward_hook_count(copied) == 0, kind  # the detached hooks left at the first forward
        assert forward_hook_count(never_run) > 0
        scripted = torch.jit.script(never_run.eval())
        with torch.no_grad():
            assert torch.allclose(scripted(x), clean.eval()(x), rtol=0, atol=1e-6), kind


# ------------------------------------------------------------------------------------------ probes and QAT observers
def qat_task() -> ToyTask:
    import torch.ao.quantization as quantization

    torch.manual_seed(0)
    task = ToyTask(BlockNet())
    task.net.qconfig = quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        quantization.prepare_qat(task.net, inplace=True)
    return task


@pytest.mark.parametrize("make", [
    lambda: MassiveActivations(every_n_steps=1, probe="val"),
    lambda: SensitiveNeurons(every_n_steps=1, window=2, eigenscore_passes=0, tracking_inputs=5 * torch.randn(
        16, 1, 16, 16, generator=torch.Generator().manual_seed(5))),
], ids=["massive-probe", "sensitive"])
def test_probe_passes_leave_a_qat_models_observers_as_they_were(make) -> None:
    # Before: the probes' eval-mode forwards updated the fake-quant observers (min/max, scale, zero point), which the
    # next training forward uses: 30+ tensors of the final state differed from the fit without the monitor.
    def run(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
        task = qat_task()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=callbacks).fit(task, datamodule=ToyData())
        return weights(task)

    assert_bitwise_equal(run([make()]), run([]))


# ------------------------------------------------------------------------------------------------ unusual tensors
class Float8Task(ToyTask):
    """A float8 fake-quant of activations (``q``), read back as float32 by the model."""

    class Quantize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float8_e4m3fn)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.q, self.head = nn.Linear(256, 8), Float8Task.Quantize(), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.q(self.fc(x.flatten(1))).float())

    def __init__(self) -> None:
        super().__init__(Float8Task.Net(), lr=0.0)  # lr 0: every step sees the weights numpy sees


def test_float8_activations_are_read_by_every_monitor() -> None:
    # Before: DimensionalCollapse crashed ("Promotion for Float8 Types is not supported"), SensitiveNeurons reported
    # its own failure as the model's ("running the model on a probe batch failed ...; pass forward_fn=").
    torch.manual_seed(0)
    task = Float8Task()
    tracking = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    stats = ActivationStats(modules=["net.q"], every_n_steps=1)
    collapse = DimensionalCollapse(modules=["net.q"], every_n_steps=1, param_patterns=[])
    sensitive = SensitiveNeurons(modules=["net.q"], every_n_steps=1, window=2, eigenscore_passes=0,
                                 tracking_inputs=tracking)
    quiet_trainer(max_steps=1, callbacks=[stats, collapse, sensitive]).fit(task, toy_loader(8))
    x = toy_loader(8).dataset.tensors[0]
    with torch.no_grad():
        rows = task.net.q(task.net.fc(x.flatten(1))).to(torch.float64).numpy()  # float8 values, exactly
        tracked = task.net.q(task.net.fc(tracking.flatten(1))).to(torch.float64).numpy()
    assert stats.history["act/net.q/mean"].values == [pytest.approx(rows.mean(), rel=1e-6)]
    centred = rows - rows.mean(0)
    singular = np.sqrt(np.clip(np.linalg.eigvalsh(centred.T @ centred / len(rows)), 0, None))
    p = singular[singular > singular.max() * 1e-6] / singular.sum()
    assert collapse.history["collapse/net.q/erank"].values == [pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)]
    np.testing.assert_array_equal(sensitive.embeddings["net.q"][-1].numpy(), tracked)


class MetaBranchTask(ToyTask):
    """A branch whose output is on the meta device (left unmaterialised, unused by the model)."""

    class Unmaterialised(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x, device="meta")

    def __init__(self) -> None:
        super().__init__(BlockNet())
        self.branch = MetaBranchTask.Unmaterialised()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.branch(x)
        return self.net(x)


def test_a_tap_on_the_meta_device_warns_once_and_logs_nothing() -> None:
    # Before: NotImplementedError "Cannot copy out of meta tensor; no data!" from the monitors' host transfer.
    monitors = [ActivationStats(modules=["branch", "net.blocks.0"], every_n_steps=1),
                MassiveActivations(modules=["branch", "net.blocks.0"], every_n_steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=monitors).fit(MetaBranchTask(), toy_loader())
    said = [str(w.message) for w in caught if "branch" in str(w.message)]
    assert len(said) == len(monitors) and all("produced no activation" in line for line in said)
    for monitor in monitors:
        assert not [key for key in monitor.history if "/branch/" in key]
        assert [key for key in monitor.history if "/net.blocks.0/" in key]


class Windowed(nn.Module):
    """Attention inside windows, as Swin's: the (B, 16, D) tokens as (B·4, 4, D) windows, one row per window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 4, x.shape[-1]).softmax(-1)


class WindowNet(BlockNet):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Windowed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 4, 64))
        for block in self.blocks:
            h = block(h)
        h = h + self.attn(h.repeat(1, 4, 1)).reshape(x.shape[0], 16, -1)[:, :4]
        return self.head(h.mean(1))


def test_sensitive_neurons_leave_out_a_tap_with_one_row_per_window() -> None:
    # Before: the 4 windows of each example were tracked as 4 examples (embeddings of 4·N rows), without a word.
    tracking = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    monitor = SensitiveNeurons(modules=["net.attn", "net.blocks.1", "net.head:input"], every_n_steps=1, window=2,
                               eigenscore_passes=0, tracking_inputs=tracking, batch_size=4)
    task = ToyTask(WindowNet())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, callbacks=[monitor]).fit(task, toy_loader())
    said = [str(w.message) for w in caught if "rows" in str(w.message)]
    assert len(said) == 1 and "net.attn gives 16 rows for a tracking batch of 4 examples" in said[0]
    assert "net.attn" not in monitor.embeddings
    assert not [key for key in monitor.history if "/net.attn/" in key]
    # the (B, T, D) block and the (B, D) head input are tracked per example: 6 rows, as numpy means over tokens
    assert [window[-1].shape[0] for name, window in sorted(monitor.embeddings.items())] == [6, 6]
    recorded: list[torch.Tensor] = []  # the last checkpoint ran after the last update: the final weights
    handle = task.net.blocks[1].register_forward_hook(lambda module, args, output: recorded.append(output.detach()))
    with torch.no_grad():
        task.net.eval()(tracking)
    handle.remove()
    np.testing.assert_allclose(monitor.embeddings["net.blocks.1"][-1].numpy(),
                               recorded[0].double().numpy().mean(1), rtol=1e-5, atol=1e-7)  # a float32 mean


# ------------------------------------------------------------------ TorchScript again, and right before a due step
class ScriptTwiceEachTime(Callback):
    """``torch.jit.script`` of the trunk twice in a row (no forward between: two export targets) at ``at_steps``."""

    def __init__(self, at_steps: tuple[int, ...]) -> None:
        self.at_steps = at_steps
        self.errors: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.at_steps:
            both = [torch.jit.script(pl_module.net) for _ in range(2)]  # any forward puts the hooks back
            clean = ScriptableNet()  # the same weights without any hook
            clean.load_state_dict(pl_module.net.state_dict())
            with torch.no_grad():
                self.errors += [float((scripted(batch[0]) - clean(batch[0])).abs().max()) for scripted in both]


def test_scripting_twice_without_a_forward_between_then_again_works() -> None:
    # Before: the second scripting found the hooks already off and dropped the modules' __prepare_scriptable__; the
    # hooks came back without it, and the next scripting failed (AttributeError: '_CaptureHook' object has no
    # attribute '__name__').
    def run(export: bool) -> tuple[dict, ScriptTwiceEachTime]:
        torch.manual_seed(0)
        monitor = ActivationStats(modules="@blocks", every_n_steps=1)
        exporter = ScriptTwiceEachTime(at_steps=(2, 4))
        quiet_trainer(max_steps=5, callbacks=[monitor, *([exporter] if export else [])]).fit(
            ToyTask(ScriptableNet()), toy_loader())
        return {key: series.values for key, series in monitor.history.items()}, exporter

    plain, _ = run(export=False)
    histories, exporter = run(export=True)
    assert len(exporter.errors) == 4 and max(exporter.errors) < 1e-6
    assert histories == plain and len(plain["act/net.blocks.0/mean"]) == 5


class DirectCallTask(ToyTask):
    """A training step that calls the net's first module itself (no module call before it)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net.embed(x.flatten(1))
        for block in self.net.blocks:
            h = block(h)
        return nn.functional.cross_entropy(self.net.head(h), y)


class ScriptEmbedAfter(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            torch.jit.script(pl_module.net.embed)


def test_an_input_tap_on_the_first_module_called_sees_the_step_after_a_scripting() -> None:
    # Before: the hooks came back at that module's own call, after torch had listed its pre-hooks: the input tap
    # missed step 3 (5 of 6 values).
    monitor = ActivationStats(modules=["net.embed:input"], every_n_steps=1)
    quiet_trainer(max_steps=6, callbacks=[monitor, ScriptEmbedAfter(at_step=3)]).fit(
        DirectCallTask(ScriptableNet()), toy_loader())
    batches = toy_loader().dataset.tensors[0].double().numpy().reshape(8, 8, -1)
    assert monitor.history["act/net.embed-input/mean"].values == pytest.approx(
        [batch.mean() for batch in batches[:6]], rel=1e-6)


# ------------------------------------------------------------------------------------ buffers around probe passes
class GridModel(nn.Module):
    """A coordinate grid expanded without a copy (elements share memory), a call counter, and a 4 MB table it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", (torch.arange(8.0) / 4 - 1).expand(8, 8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("table", torch.zeros(1 << 20))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x @ self.grid) + self.table[0]


def test_probe_passes_keep_an_expanded_buffer_and_a_counter_without_copying_a_large_buffer() -> None:
    # Before: the expanded grid crashed the probe (copy_ into overlapping memory), and every buffer was cloned at every
    # probe (the 4 MB table read by no op: 164 ms per probe with 256 MB).
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_act.callbacks.probe import probing

    class LargestOutputs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel())
            return out

    model = GridModel()
    grid, calls, table = model.grid, model.calls, model.table
    with LargestOutputs() as mode, probing(None, model, torch.device("cpu")):
        model(torch.ones(2, 8))
    assert model.grid is grid and model.calls is calls and model.table is table
    np.testing.assert_array_equal(model.grid.numpy(), np.broadcast_to(np.arange(8) / 4 - 1, (8, 8)))
    assert int(model.calls) == 0
    assert mode.largest < table.numel()  # nothing the size of the table was made: it was not copied


class TableWriter(nn.Module):
    """Writes the start of a 4 MB table in every forward, eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(1 << 20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table[:8] += 1
        return x


def test_a_probe_writing_a_large_buffer_is_said_once_by_name() -> None:
    # Before: nothing said (the whole table was copied back at every probe instead).
    from lightning_act.callbacks.probe import probing

    model = nn.Sequential(TableWriter())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with probing(None, model, torch.device("cpu")):
                model(torch.ones(2, 8))
    said = [str(w.message) for w in caught if "'0.table'" in str(w.message)]
    assert len(said) == 1 and "write it in training mode only" in said[0]
    assert model[0].table[:8].tolist() == [2.0] * 8
