"""Monitors under torch.compile: every due step observed, values equal to eager, no recompile per due step."""

import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from _toy import BlockNet, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationStats, MassiveActivations
from lightning_act.capture import SAMPLE_FIRST, capture_registry, select_taps


SLOW = pytest.mark.skipif(os.environ.get("LIGHTNING_ACT_SLOW") != "1", reason="slow (inductor compiles); LIGHTNING_ACT_SLOW=1")


def fit(wrap, backend, steps=8):
    torch._dynamo.reset()
    pl.seed_everything(0)
    net = BlockNet()
    recorded = {}
    state = {"step": None}

    @torch._dynamo.disable
    def record(module, args, out):  # the test's own hook, registered before compilation, run eagerly
        if state["step"] is not None:
            recorded.setdefault(state["step"], []).append(out.detach().double().numpy().copy())

    net.blocks[1].register_forward_hook(record)

    class Steps(pl.Callback):  # outside training_step, which Lightning compiles too
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["step"] = trainer.global_step

        def on_before_backward(self, trainer, pl_module, loss):
            state["step"] = None

    task = ToyTask(torch.compile(net, backend=backend) if wrap == "net" and backend else net)
    if wrap == "module" and backend:
        task = torch.compile(task, backend=backend)
    monitors = [
        ActivationStats(modules=["@blocks", "@activations", "@penultimate"], every_n_steps=2),  # outputs and an input
        MassiveActivations(every_n_steps=2),
    ]
    quiet_trainer(max_steps=steps, callbacks=[*monitors, Steps()]).fit(task, toy_loader(batch_size=8))
    return monitors, recorded


@pytest.fixture(scope="module")
def eager_run():
    return fit(None, None)


@pytest.mark.parametrize("wrap", ["net", "module"])
def test_compiled_model_is_observed_at_every_due_step_like_eager(eager_run, wrap):
    (eager_stats, eager_massive), recorded = eager_run
    (stats, massive), _ = fit(wrap, "eager")
    assert set(stats.history) == set(eager_stats.history) and set(massive.history) == set(eager_massive.history)
    assert not any("_orig_mod" in key for key in stats.history)
    assert stats.history["act/net.blocks.1/mean"].steps == [0, 2, 4, 6]
    for eager, compiled in ((eager_stats, stats), (eager_massive, massive)):
        for key, series in eager.history.items():
            assert compiled.history[key].steps == series.steps, key
            np.testing.assert_allclose(compiled.history[key].values, series.values, rtol=1e-5, atol=1e-6, err_msg=key)
    # and both equal numpy on the block output the test recorded itself (the old code logged -inf/0 here)
    for i, step in enumerate([0, 2, 4, 6]):
        a = np.concatenate([x.ravel() for x in recorded[step]])
        np.testing.assert_allclose(stats.history["act/net.blocks.1/mean"].values[i], a.mean(), rtol=1e-5)
        np.testing.assert_allclose(massive.history["massive/net.blocks.1/top1"].values[i], np.abs(a).max(), rtol=1e-6)


def test_observing_adds_one_variant_and_no_recompile_per_due_step():
    torch._dynamo.reset()
    net = BlockNet()

    class Sink:
        armed = False
        calls = 0

        def receive(self, index, x):
            Sink.calls += 1

    sink = Sink()
    taps = select_taps(net, ["@blocks", "@activations", "@penultimate"])  # outputs and an input
    registry = capture_registry(net)
    registry.subscribe(sink, taps, [SAMPLE_FIRST] * len(taps))
    counter = CompileCounter()
    compiled = torch.compile(net, backend=counter)
    x = torch.randn(4, 1, 16, 16)
    frames = []
    for observing in [False, True] * 6:  # six due steps, six plain ones
        sink.armed = observing
        registry.refresh()
        compiled(x)
        frames.append(counter.frame_count)
    registry.unsubscribe(sink)
    assert Sink.calls == 6 * len(taps)
    assert frames[3] == frames[-1], frames  # after one round of each variant nothing is compiled again


@SLOW
@pytest.mark.parametrize("wrap", ["net", "module"])
def test_inductor_matches_eager(eager_run, wrap):
    (eager_stats, _), _ = eager_run
    (stats, _), _ = fit(wrap, "inductor")
    for key, series in eager_stats.history.items():
        np.testing.assert_allclose(stats.history[key].values, series.values, rtol=1e-4, atol=1e-5, err_msg=key)


def test_probe_and_tracking_passes_of_a_compiled_model_equal_eager():
    from _toy import ToyData
    from lightning_act.callbacks import SensitiveNeurons

    def run(compiled):
        torch._dynamo.reset()
        pl.seed_everything(0)
        net = BlockNet()
        monitors = [
            SensitiveNeurons(modules="@blocks", every_n_steps=2, num_samples=16, window=2, eigenscore_passes=0),
            MassiveActivations(probe="val", every_n_steps=2),
        ]
        task = ToyTask(torch.compile(net, backend="eager") if compiled else net)
        quiet_trainer(max_steps=5, callbacks=monitors).fit(task, ToyData(batch_size=8))
        return monitors

    for eager, compiled in zip(run(False), run(True)):
        assert eager.history and set(compiled.history) == set(eager.history)
        assert next(iter(compiled.history.values())).steps == [0, 2, 4]
        for key, series in eager.history.items():
            assert compiled.history[key].steps == series.steps, key
            np.testing.assert_allclose(compiled.history[key].values, series.values, rtol=1e-5, atol=1e-6, err_msg=key)


def compiled(net, how):
    """``net`` compiled by ``torch.compile`` (an ``OptimizedModule`` wrapper) or in place by ``nn.Module.compile()``."""
    if how == "wrapped":
        return torch.compile(net, backend="eager")
    net.compile(backend="eager")
    return net


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_a_compiled_model_is_observed_after_a_fit_of_its_classes_without_monitors(how):
    """Dynamo guards no hooks: before, a second compiled instance reused the code compiled for the first, without the
    monitors' hooks, and nothing was logged (each tap warned it "produced no activation"); a model compiled in place
    (``net.compile()``, no wrapper) was not seen as compiled, so that stayed so for it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = ToyTask(compiled(BlockNet(), how))
    quiet_trainer(max_steps=2).fit(plain, toy_loader(32, 8))
    watched = ToyTask(compiled(BlockNet(), how))
    monitor = ActivationStats(modules=["net.blocks.0"], every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(watched, toy_loader(32, 8))
    assert monitor.history["act/net.blocks.0/count"].values == [8 * 4 * 16] * 2  # (batch, tokens, width) per step


def graph_sizes(checkpointing, monitors, steps=6):
    """The op count of each graph dynamo compiles in a fit of a compiled BlockNet (3 blocks, each called in the loop
    of its forward), in compile order."""
    torch._dynamo.reset()
    pl.seed_everything(0)
    sizes = []

    def backend(gm, inputs):
        sizes.append(sum(node.op in ("call_function", "call_method", "call_module") for node in gm.graph.nodes))
        return gm.forward

    net = torch.compile(BlockNet(depth=3, checkpointing=checkpointing), backend=backend)
    quiet_trainer(max_steps=steps, callbacks=monitors).fit(ToyTask(net), toy_loader(8 * steps, 8))
    return sizes


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant"])
def test_a_fit_due_at_step_0_compiles_the_network_as_a_fit_without_monitors(checkpointing):
    """Step 0 is always due. Before, dynamo's first trace was the observing one, whose taps (graph breaks) fall in
    the network's block loop, which dynamo cannot resume: it ran the network's forward eagerly for good, and compiled
    each block alone (3 ops; with checkpointing in the loop, nothing); the steps in between never ran the user's
    graph. Expected: the graph the same fit compiles without monitors, first; the observing variant beside it."""
    bare = graph_sizes(checkpointing, [])
    monitor = ActivationStats(modules="@blocks", every_n_steps=3)
    watched = graph_sizes(checkpointing, [monitor])
    assert len(bare) == 1 and bare[0] >= 3 * 3, bare  # the whole network in one graph: 3 blocks of 3 ops and more
    assert watched[0] == bare[0], (watched, bare)
    assert monitor.history["act/net.blocks.0/count"].steps == [0, 3]
    assert monitor.history["act/net.blocks.0/count"].values == [8 * 4 * 16] * 2  # (batch, tokens, width) per step


def test_fullgraph_names_the_monitors_and_the_fix():
    """A graph break is an error under fullgraph=True; dynamo's hint was "Remove the torch.compiler.disable call",
    about this library's own code."""
    net = torch.compile(BlockNet(), backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="compile without fullgraph=True or remove the monitors"):
        quiet_trainer(max_steps=3, callbacks=[ActivationStats(every_n_steps=1)]).fit(ToyTask(net), toy_loader(24, 8))


def test_send_drop_refuses_a_model_compiled_in_place():
    """``net.compile()`` leaves no ``OptimizedModule``; it was not seen as compiled, by the drop's refusal either."""
    from lightning_act.callbacks import SensitiveNeurons
    from lightning_act.errors import LightningActError

    monitor = SensitiveNeurons(modules="@penultimate", every_n_steps=2, num_samples=16, window=2, drop=True)
    with pytest.raises(LightningActError, match=r"drop=True\) cannot zero features of a torch.compile'd model"):
        quiet_trainer(max_steps=2, callbacks=[monitor], limit_val_batches=1).fit(
            ToyTask(compiled(BlockNet(), "in_place")), toy_loader(16, 8), toy_loader(16, 8, seed=1)
        )
