"""SensitiveNeurons(cuda_graph=True): the tracking pass replayed from a CUDA graph gives the eager values.

On a CPU only the replay's validity key is checked; the CUDA tests run in the GPU check (scripts/gpu_check_all.sh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.callbacks.graphed_pass import memory_key, strategy_allows_graphs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_replay_key_changes_when_a_tensor_moves_and_not_when_it_is_updated_in_place() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    inputs = [torch.randn(2, 3), {"x": torch.randn(5, 3)}]
    key = memory_key(module, inputs)
    with torch.no_grad():
        module[0].weight.add_(1.0)  # what an optimizer step does: the same memory
        module[1].running_mean.mul_(0.5)
    assert memory_key(module, inputs) == key
    module[0].weight.data = module[0].weight.data.clone()  # a swap: a replay would read the old memory
    swapped = memory_key(module, inputs)
    assert swapped != key
    inputs[1]["x"] = inputs[1]["x"].clone()
    assert memory_key(module, inputs) != swapped
    assert memory_key(module.double(), inputs) != memory_key(module.float(), inputs)
    transposed = nn.Linear(3, 3)
    before = memory_key(transposed, [])
    transposed.weight.data = transposed.weight.data.t()  # same storage, other strides
    assert memory_key(transposed, []) != before


def test_graphed_pass_runs_eagerly_first_captures_next_replays_into_copies_and_recaptures_after_a_move(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A CPU stand-in for CUDA graphs: capture records the pass; replay recomputes it into the captured outputs (what
    # a real replay does to the graph's memory). The control flow and the copies are GraphedPass's own.
    import lightning_act.callbacks.graphed_pass as graphed_pass

    module, inputs = nn.Linear(3, 2), torch.randn(4, 3)
    calls = {"eager": 0, "captured": 0}
    capturing = []

    def run() -> dict[str, torch.Tensor]:
        calls["captured" if capturing else "eager"] += 1
        with torch.no_grad():
            return {"y": module(inputs)}

    passer = graphed_pass.GraphedPass("test")

    class StandInGraph:
        def replay(self) -> None:
            with torch.no_grad():
                passer._outputs["y"].copy_(module(inputs))

    @contextlib.contextmanager
    def stand_in_capture(graph: StandInGraph, capture_error_mode: str) -> Iterator[None]:
        assert capture_error_mode == "thread_local"
        capturing.append(graph)
        try:
            yield
        finally:
            capturing.clear()

    class StandInGenerator:
        """Stands in for the default CUDA generator: which state it holds (a capture marks it capturing)."""

        def __init__(self) -> None:
            self.states_set: list[str] = []

        def clone_state(self) -> str:
            return "the state before the capture"

        def graphsafe_set_state(self, state: str) -> None:
            self.states_set.append(state)

    generator = StandInGenerator()
    streams_set = []
    monkeypatch.setattr(graphed_pass.torch.cuda, "default_generators", (generator,))
    monkeypatch.setattr(graphed_pass.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(graphed_pass.torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(graphed_pass.torch.cuda, "graph", stand_in_capture)
    monkeypatch.setattr(graphed_pass.torch.cuda, "current_stream", lambda: "the training stream")
    monkeypatch.setattr(graphed_pass.torch.cuda, "set_stream", streams_set.append)
    monkeypatch.setattr(graphed_pass.torch.cuda, "synchronize", lambda: None)

    def expected() -> torch.Tensor:
        return inputs @ module.weight.detach().T + module.bias.detach()

    first = passer(run, module, inputs)["y"]
    assert calls == {"eager": 1, "captured": 0} and passer.captures == 0
    torch.testing.assert_close(first, expected())
    with torch.no_grad():
        module.weight.add_(1.0)  # an optimizer step: the same memory, the graph stays
    second = passer(run, module, inputs)["y"]
    assert calls == {"eager": 1, "captured": 1} and (passer.captures, passer.replays) == (1, 1)
    torch.testing.assert_close(second, expected())
    with torch.no_grad():
        module.weight.add_(1.0)
    third = passer(run, module, inputs)["y"]
    torch.testing.assert_close(third, expected())
    torch.testing.assert_close(second, first + inputs.sum(1, keepdim=True))  # a copy: the replay did not overwrite it
    module.weight.data = module.weight.data.clone()  # moved: eager once, then captured again
    passer(run, module, inputs)
    assert calls == {"eager": 2, "captured": 1} and passer.captures == 1
    passer(run, module, inputs)
    assert calls == {"eager": 2, "captured": 2} and (passer.captures, passer.replays) == (2, 3)

    assert streams_set == [] and generator.states_set == []

    def fails_under_capture() -> dict[str, torch.Tensor]:
        if capturing:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return run()

    failing = graphed_pass.GraphedPass("Owner")
    failing(fails_under_capture, module, inputs)
    with pytest.warns(UserWarning, match=r"Owner: cuda_graph=True could not capture .*RuntimeError: operation not"):
        failing(fails_under_capture, module, inputs)
    assert failing.failed and failing.replays == 0
    assert streams_set == ["the training stream"]  # a failed capture leaves its capture stream current: restored
    assert generator.states_set == ["the state before the capture"]  # and the generator marked capturing: restored
    torch.testing.assert_close(failing(fails_under_capture, module, inputs)["y"], expected())


def test_graphs_are_replayed_on_one_device_or_under_ddp_only() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    assert strategy_allows_graphs(SingleDeviceStrategy(torch.device("cpu")))
    assert strategy_allows_graphs(DDPStrategy())
    assert not strategy_allows_graphs(FSDPStrategy())  # parameters gathered into new memory inside the forward


class SwapOneWeight(pl.Callback):
    """Gives one weight new memory after the step ``at`` (as weight averaging or ``.to()`` would)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            weight = pl_module.net.head.weight
            weight.data = weight.data.clone()


def _fit(cuda_graph: bool, precision: str) -> SensitiveNeurons:
    pl.seed_everything(0)
    task = ToyTask(BlockNet())
    monitor = SensitiveNeurons(
        modules=["net.blocks.0", "net.blocks.1"], every_n_steps=1, window=2, tracking_inputs=torch.randn(24, 1, 16, 16),
        batch_size=8, eigenscore_passes=3, cuda_graph=cuda_graph,
    )
    # SwapOneWeight runs before the monitor's end-of-step hook: the pass after the swap must see the new memory.
    trainer = quiet_trainer(max_steps=7, accelerator="gpu", devices=1, precision=precision,
                            callbacks=[SwapOneWeight(at=4), monitor])
    trainer.fit(task, ToyData(batch_size=8))
    return monitor


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_replayed_tracking_passes_equal_eager_ones_through_training_and_a_moved_weight(precision: str) -> None:
    eager, graphed = _fit(False, precision), _fit(True, precision)
    # Checkpoints 0..6: 0 eager, captured at 1, replayed at 1 and 2; the weight moves at the end of step 3 (global
    # step 4), so 3 is eager, 4 captures again, 4..6 are replayed.
    assert (graphed._graphed.captures, graphed._graphed.replays) == (2, 5)
    assert not graphed._graphed.failed
    assert set(graphed.history) == set(eager.history)
    for key, series in eager.history.items():
        assert graphed.history[key].steps == series.steps
        torch.testing.assert_close(
            torch.tensor(graphed.history[key].values), torch.tensor(series.values), rtol=1e-5, atol=1e-7, equal_nan=True
        )
    for name, window in eager.embeddings.items():
        for mine, theirs in zip(graphed.embeddings[name], window, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


class ReadsTheHost(nn.Module):
    """A forward with a host read (``.item()``), which a CUDA graph cannot capture, before the tapped layer (a tracking
    forward ends after its last tap, so a read after it would not be reached), and a dropout, which draws from the
    default CUDA generator in training: a failed capture must leave that generator usable and where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(256, 8)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.abs().max().item() > 1e6:
            x = x / 2
        return self.head(self.dropout(self.features(x)))


def _fit_reads_the_host(cuda_graph: bool) -> tuple[SensitiveNeurons, dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    task = ToyTask(ReadsTheHost())
    monitor = SensitiveNeurons(modules=["net.features"], every_n_steps=1, window=2,
                               tracking_inputs=torch.randn(8, 1, 16, 16), eigenscore_passes=0, cuda_graph=cuda_graph)
    quiet_trainer(max_steps=5, accelerator="gpu", devices=1, callbacks=[monitor]).fit(task, ToyData(batch_size=8))
    return monitor, {name: value.cpu() for name, value in task.state_dict().items()}


@needs_cuda
def test_a_forward_that_cannot_be_captured_warns_once_and_runs_eagerly() -> None:
    # After the failed capture the fit goes on as without the option: the same weights and values.
    eager, eager_weights = _fit_reads_the_host(False)
    with pytest.warns(UserWarning, match="could not capture") as caught:
        graphed, graphed_weights = _fit_reads_the_host(True)
    assert sum("could not capture" in str(w.message) for w in caught) == 1
    assert graphed._graphed.failed and graphed._graphed.replays == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert graphed.history["sensitive/net.features/v_mean"].steps == [2, 3, 4]
    for name, weight in eager_weights.items():
        assert torch.equal(graphed_weights[name], weight), name
    for key, series in eager.history.items():
        assert graphed.history[key].values == series.values, key
