"""Round 22 (fixer M): a monitored model's copies under dynamo, programs made of the model while the monitors are
armed, tapped modules wrapped or moved mid-fit, unbatched convolution maps, probe cutoffs past experts unrouted in the
first pass, and ``modules=[]``. Each test fails on the code before."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import quiet_trainer
from lightning_act.callbacks import ActivationStats, DimensionalCollapse, MassiveActivations
from lightning_act.capture.registry import ForwardCutoff, capture_registry
from lightning_act.capture.selection import Tap
from lightning_act.capture.layout import SAMPLE_FIRST
from lightning_act.errors import ModuleSelectionError


class StackNet(nn.Module):
    """``inp``, residual blocks ``Sequential(Linear, GELU)``, a head: (B, 16) rows."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(depth)])
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class StackTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = StackNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rows(n: int = 64, seed: int = 0, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch_size)


def at_step(monitor, key: str, step: int) -> float | None:
    series = monitor.history.get(key)
    return None if series is None else dict(zip(series.steps, series.values)).get(step)


# ------------------------------------------------------------------------------------- copies compiled before any call
class CopyMidFit(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            self.copy = copy.deepcopy(pl_module.model)  # an EMA / teacher made mid-fit: it carries detached hooks


def test_a_copy_made_mid_fit_compiles_with_fullgraph_and_exports_strictly():
    torch.manual_seed(0)
    copier = CopyMidFit()
    monitor = ActivationStats(modules=["model.blocks.0", "model.head:input"], every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[monitor, copier]).fit(StackTask(), rows())
    net, x = copier.copy, torch.randn(8, 16)
    with torch.no_grad():  # the reference: the copy's weights by functional ops, in float64
        w = {name: p.double() for name, p in net.named_parameters()}
        h = F.linear(x.double(), w["inp.weight"], w["inp.bias"])
        for i in range(2):
            h = h + F.gelu(F.linear(h, w[f"blocks.{i}.0.weight"], w[f"blocks.{i}.0.bias"]))
        expected = F.linear(h, w["head.weight"], w["head.bias"]).numpy()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(net, fullgraph=True, backend="eager")(x)  # was: Unsupported (a disable()d function)
    np.testing.assert_allclose(compiled.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(net, (x,), strict=True)  # was: the same error
    called = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert called == ["aten.linear.default"] + ["aten.linear.default", "aten.gelu.default", "aten.add.Tensor"] * 2 + [
        "aten.linear.default"]  # the model's ops, no monitor's
    np.testing.assert_allclose(exported.module()(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- programs made of the model while it is observed
class ProgramMidStep(Callback):
    """Listed after the monitor: traces or exports the model in its own ``on_train_batch_start`` of due step 2 (the
    monitor is armed), after computing the step's block output by functional ops (the reference)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.block_output: np.ndarray | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 2:
            return
        net = pl_module.model
        with torch.no_grad():
            h = F.linear(batch[0].double(), net.inp.weight.double(), net.inp.bias.double())
            linear = net.blocks[0][0]
            self.block_output = F.gelu(F.linear(h, linear.weight.double(), linear.bias.double())).numpy()
        example = torch.randn(2, 16)
        if self.how == "trace":
            torch.jit.trace(net, example)  # check_trace re-runs it, once not tracing
        elif self.how == "export":
            torch.export.export(net, (example,))
        else:
            torch.export.export(net, (example,), strict=True)


@pytest.mark.parametrize("how", ["trace", "export", "export_strict"])
def test_a_trace_or_export_by_a_callback_during_a_due_step_is_not_observed(how):
    torch.manual_seed(0)
    monitor, program = ActivationStats(modules=["model.blocks.0"], every_n_steps=2), ProgramMidStep(how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation
        quiet_trainer(max_steps=3, callbacks=[monitor, program]).fit(StackTask(), rows())
    assert at_step(monitor, "act/model.blocks.0/count", 2) == program.block_output.size == 16 * 32
    assert at_step(monitor, "act/model.blocks.0/mean", 2) == pytest.approx(program.block_output.mean(), abs=1e-6)


# --------------------------------------------------------------------------- tapped modules wrapped or moved mid-fit
class Rebuild(Callback):
    """At step 3 rebuilds block 1 around its modules; at even steps records the tapped Linear's output on the training
    batch by functional ops (the reference), from the Linear object the monitor chose."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.expected: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.model
        if trainer.global_step == 0:
            self.linear = net.blocks[1][0]
        if trainer.global_step == 3 and self.how == "wrap":
            net.blocks[1] = nn.Sequential(net.blocks[1], nn.Identity())  # an identity after the block
        if trainer.global_step == 3 and self.how == "move":
            net.blocks[1] = Holder(net.blocks[1])  # the block under another attribute name
        if trainer.global_step % 2 == 0:
            with torch.no_grad():
                h = F.linear(batch[0].double(), net.inp.weight.double(), net.inp.bias.double())
                first = net.blocks[0][0]
                h = h + F.gelu(F.linear(h, first.weight.double(), first.bias.double()))
                out = F.linear(h, self.linear.weight.double(), self.linear.bias.double())
            self.expected[trainer.global_step] = float(out.mean())


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("how", ["wrap", "move"])
def test_a_tapped_module_wrapped_or_moved_mid_fit_stays_observed_without_a_word(how):
    torch.manual_seed(0)
    rebuild, monitor = Rebuild(how), ActivationStats(modules=["model.blocks.1.0"], every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=7, callbacks=[rebuild, monitor]).fit(StackTask(), rows(n=7 * 16))
    said = [str(w.message) for w in caught if "model.blocks.1.0" in str(w.message)]
    assert said == []  # was: "replaced by new modules" (wrap), "is no longer a module ... nothing is logged" (move)
    for step in (0, 2, 4, 6):  # was (wrap): the old block's GELU output from step 4
        assert at_step(monitor, "act/model.blocks.1.0/mean", step) == pytest.approx(rebuild.expected[step], abs=1e-6)


# ------------------------------------------------------------------------------------ unbatched convolution outputs
class ConvPolicy(pl.LightningModule):
    """A 4-channel conv stack with a frozen head (lr 0): on one unbatched observation per step, (1, 6, 5) for Conv2d
    (an RL policy) or (1, 7) for Conv1d, or on the loader's batches of 4 (the block gives (4, 4, 7): 4 samples)."""

    def __init__(self, conv: str, batched: bool) -> None:
        super().__init__()
        layer = nn.Conv2d if conv == "2d" else nn.Conv1d
        self.batched = batched
        self.stem = layer(1, 4, 3, padding=1)
        self.block = nn.Sequential(layer(4, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.stem(x))
        return self.head(h.flatten(h.dim() - (2 if isinstance(self.stem, nn.Conv2d) else 1)).mean(-1))

    def training_step(self, batch, batch_idx):
        return self(batch[0] if self.batched else batch[0][0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def erank_np(rows: np.ndarray) -> float:
    singular = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("conv", ["2d", "1d"])
def test_an_unbatched_conv_map_is_said_once_and_not_read_as_a_batch(conv):
    shape = (1, 6, 5) if conv == "2d" else (1, 7)
    data = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))

    def fit(batched: bool):
        torch.manual_seed(0)
        model = ConvPolicy(conv, batched)
        monitors = [MassiveActivations(modules=["block"], every_n_steps=1),
                    DimensionalCollapse(modules=["block"], every_n_steps=1, param_patterns=[])]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=2, callbacks=monitors).fit(model, DataLoader(TensorDataset(data), batch_size=4))
        return model, monitors, [str(w.message) for w in caught if "block " in str(w.message)]

    _, (massive, collapse), said = fit(batched=False)
    unbatched = "(4, 6, 5)" if conv == "2d" else "(4, 7)"
    assert len(said) == 2 and all(unbatched in one and "without a batch axis" in one for one in said)
    assert massive.history.get("massive/block/ratio") is None  # was: the 4 channels read as 4 samples
    assert collapse.history.get("collapse/block/erank") is None  # was: the image's columns (or L) read as features
    if conv == "1d":  # batches of 4 samples of 4 channels: axis 1 has the width too, read as they are
        model, (_, collapse), said = fit(batched=True)
        assert said == []
        with torch.no_grad():
            x = data[:4].double()
            h = F.conv1d(x, model.stem.weight.double(), model.stem.bias.double(), padding=1)
            h = torch.tanh(F.conv1d(h, model.block[0].weight.double(), model.block[0].bias.double(), padding=1))
        expected = erank_np(h.permute(0, 2, 1).reshape(-1, 4).numpy())  # rows: (sample, position); features: channels
        assert at_step(collapse, "collapse/block/erank", 0) == pytest.approx(expected, rel=1e-5)


class FlattenEncoder(pl.LightningModule):
    """A DQN-style encoder ``Sequential(conv 2->8, ReLU, conv 8->16, ReLU, Flatten)`` with a frozen head (lr 0): a
    batch of 16 gives (16, 16*spatial) rows, whose batch is the last conv's channel count."""

    def __init__(self, conv: str) -> None:
        super().__init__()
        layer = nn.Conv2d if conv == "2d" else nn.Conv1d
        self.encoder = nn.Sequential(layer(2, 8, 3), nn.ReLU(), layer(8, 16, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(16 * (4 if conv == "2d" else 3), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("conv", ["2d", "1d"])
def test_a_batched_conv_encoder_ending_in_a_flatten_is_read_as_a_batch_of_its_channel_count(conv):
    shape = (2, 6, 6) if conv == "2d" else (2, 7)
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model, collapse = FlattenEncoder(conv), DimensionalCollapse(modules=["encoder"], every_n_steps=1, param_patterns=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[collapse]).fit(model, DataLoader(TensorDataset(data), batch_size=16))
    assert [str(w.message) for w in caught if "batch axis" in str(w.message)] == []  # was: "without a batch axis"
    conv_nd = F.conv2d if conv == "2d" else F.conv1d
    first, second = model.encoder[0], model.encoder[2]
    with torch.no_grad():
        h = F.relu(conv_nd(data.double(), first.weight.double(), first.bias.double()))
        h = F.relu(conv_nd(h, second.weight.double(), second.bias.double()))
    expected = erank_np(h.reshape(16, -1).numpy())  # rows: the 16 samples; features: the flattened maps
    assert at_step(collapse, "collapse/encoder/erank", 0) == pytest.approx(expected, rel=1e-5)  # was: nothing logged


# --------------------------------------------------------------------------- probe cutoffs and unrouted experts
class Routed(nn.Module):
    """Three experts; row ``r`` goes to expert ``route[r]``, an expert given no row is skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            if (route == i).any():
                out[route == i] = expert(x[route == i])
        return out


class Keeps:
    """A probing subscriber: keeps what each tap delivers."""

    armed = True

    def __init__(self) -> None:
        self.received: list[tuple[int, torch.Tensor]] = []

    def receive(self, tap_index: int, x: torch.Tensor) -> None:
        self.received.append((tap_index, x.clone()))


def test_a_probe_cutoff_does_not_end_forwards_before_an_expert_unrouted_in_the_first_pass():
    torch.manual_seed(0)
    model, keeps = Routed(), Keeps()
    registry = capture_registry(model)
    taps = [Tap(f"experts.{i}", expert) for i, expert in enumerate(model.experts)]
    registry.subscribe(keeps, taps, [SAMPLE_FIRST] * 3)
    cutoff = ForwardCutoff(enabled=True)
    x = torch.randn(6, 4)
    try:
        with registry.exclusive(keeps, cutoff), torch.no_grad():
            cutoff.forward(lambda: model(x, torch.tensor([0, 1, 0, 1, 0, 1])))  # the first pass: expert 2 unrouted
            cutoff.pass_complete()
            keeps.received.clear()
            cutoff.forward(lambda: model(x, torch.tensor([0, 1, 2, 2, 0, 1])))  # later, rows 2 and 3 go to expert 2
    finally:
        registry.unsubscribe(keeps)
    got = dict(keeps.received)
    assert sorted(got) == [0, 1, 2]  # was: the forward ended after expert 1, expert 2 never delivered
    weight, bias = model.experts[2].weight.detach().double().numpy(), model.experts[2].bias.detach().double().numpy()
    expected = x[2:4].double().numpy() @ weight.T + bias
    np.testing.assert_allclose(got[2].double().numpy(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- modules=[]
def test_modules_empty_is_one_line_for_a_monitor_that_logs_nothing_without_taps():
    with pytest.raises(ModuleSelectionError, match=r"modules=\[\] taps no module, and ActivationStats logs nothing"):
        quiet_trainer(max_steps=1, callbacks=[ActivationStats(modules=[])]).fit(StackTask(), rows())


class HeadWeights(Callback):
    """The head's weight at fit start and after each optimizer step (listed after the monitor)."""

    def on_fit_start(self, trainer, pl_module):
        self.snapshots = [pl_module.model.head.weight.detach().double().flatten().clone()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append(pl_module.model.head.weight.detach().double().flatten().clone())


def r90_np(snapshots: list[torch.Tensor]) -> float:
    x = torch.stack(snapshots).numpy()
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
    share = np.cumsum(singular**2) / (singular**2).sum()
    return float(np.argmax(share >= 0.9 - 1e-12) + 1)


def test_modules_empty_taps_nothing_for_a_monitor_that_logs_without_taps():
    torch.manual_seed(0)
    monitor, weights = DimensionalCollapse(modules=[], every_n_steps=1, param_patterns=["model.head.weight"]), HeadWeights()
    quiet_trainer(max_steps=6, callbacks=[monitor, weights]).fit(StackTask(), rows(n=96))  # was: "matched no module"
    assert monitor.taps == [] and monitor.param_names == ["model.head.weight"]
    for step in range(6):  # r90 1, 2, 2, 2, 3, 3
        expected = r90_np(weights.snapshots[: step + 2])
        assert at_step(monitor, "collapse/params/r90", step) == expected


# ------------------------------------------------------------------------ a replaced head kept elsewhere in the model
class ReplaceHead(Callback):
    """At step 2 the continual-learning pattern: the old head goes to ``old_heads`` (still registered, never called)
    and a new head takes its name; at every step records the head's output on the training batch by functional ops
    (the reference), from the head now at the name."""

    def __init__(self) -> None:
        self.expected: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.model
        if trainer.global_step == 2:
            net.old_heads = nn.ModuleList([net.head])
            net.head = nn.Linear(32, 4)
        with torch.no_grad():
            h = F.linear(batch[0].double(), net.inp.weight.double(), net.inp.bias.double())
            for block in net.blocks:
                h = h + F.gelu(F.linear(h, block[0].weight.double(), block[0].bias.double()))
            out = F.linear(h, net.head.weight.double(), net.head.bias.double())
        self.expected[trainer.global_step] = float(out.mean())


def test_a_tapped_head_replaced_mid_fit_is_followed_though_the_model_keeps_the_old_one():
    torch.manual_seed(0)
    replace, monitor = ReplaceHead(), ActivationStats(modules=["model.head"], every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=4, callbacks=[replace, monitor]).fit(StackTask(), rows(n=4 * 16))
    said = [str(w.message) for w in caught if "model.head" in str(w.message)]
    assert len(said) == 1 and "observes the new ones from step 2" in said[0]  # was: "produced no activation"
    for step in range(4):  # was: None from step 2 (the hook stayed on the old head, which no longer runs)
        assert at_step(monitor, "act/model.head/mean", step) == pytest.approx(replace.expected[step], abs=1e-6)


def test_a_tap_wrapped_mid_fit_as_the_unrun_original_of_a_saved_copy_follows_the_name():
    # Before: the module now at the name (a peft-style ModulesToSaveWrapper) contained the tapped module, as its
    # original_module, which no longer runs: the tap stayed on it and nothing was logged.
    from lightning_act.callbacks.base import modules_now_at_taps
    from lightning_act.capture.selection import Tap

    class SavedCopy(nn.Module):
        def __init__(self, original: nn.Module) -> None:
            super().__init__()
            self.original_module = original
            self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original)})

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    old = model[0]
    model[0] = SavedCopy(old)
    assert modules_now_at_taps(model, [Tap("0", old)]) == {0: model[0]}
    model[0] = nn.Sequential(old, nn.Identity())  # a wrapper that runs it: the tap stays on it
    assert modules_now_at_taps(model, [Tap("0", old)]) == {}
