"""A probe's forward pass on fixed inputs, replayed from a CUDA graph (``SensitiveNeurons(cuda_graph=True)``).

Why: a probe runs the same kernels on the same addresses at every checkpoint. Eagerly, the host launches its
operations one at a time, and on an H100 that host time was nearly all of ``SensitiveNeurons``' floor: the
tracking forward of 32 images cost 1.53x a ViT-S training step for ~2 ms of kernels (``docs/performance.md``,
round 12). Replayed from a CUDA graph, the pass is one launch.

When a replay is exact: the graph reads the parameters, buffers and inputs at the addresses they had when it was
captured. The optimizer updates parameters in place, so a replay computes with the current weights. A pass is
captured again when any of those tensors changed address, shape, stride or dtype (a ``.data`` swap, ``.to()``, a
callback swapping in averaged weights); the first pass after such a change runs eagerly, so that lazy
initialisation (library handles, kernel compilation) never happens under capture. What a graph cannot replay:
Python side effects and decisions of the forward (made once, at capture: a branch on a flag or on the epoch is
replayed as it was taken then) and host reads (they make the capture fail). A capture that fails is reported
once, leaves the device's random generator as it was, and the pass runs eagerly from then on. Only on one device
or under DDP (:func:`strategy_allows_graphs`): a sharding strategy gathers parameters into new memory inside the
forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_act.callbacks.probe import batch_tensors
from lightning_act.lightning_classes import lightning_classes

TensorKey = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


def memory_key(module: nn.Module, inputs: Any) -> tuple[TensorKey, ...]:
    """What a replay of ``module`` on ``inputs`` reads: address, shape, stride, dtype and device of every
    parameter, buffer and input tensor. Equal keys: a replay computes what an eager pass would."""
    tensors = [*module.parameters(), *module.buffers(), *batch_tensors(inputs)]
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def strategy_allows_graphs(strategy: object) -> bool:
    """Whether a replay reads the weights the strategy trains: one device, or DDP (every rank holds whole parameters).
    Sharding strategies (FSDP, DeepSpeed) gather parameters into new memory inside the forward."""
    allowed = lightning_classes("strategies.SingleDeviceStrategy") + lightning_classes("strategies.DDPStrategy")
    return isinstance(strategy, allowed)


def _autocast_without_cache() -> contextlib.AbstractContextManager[Any]:
    """The current CUDA autocast with its cast cache off: a cached cast made before the capture would be read by
    every replay as a constant, stale once the optimizer changes the weight."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


class GraphedPass:
    """Runs ``run()`` (a pass returning ``{name: tensor}``) eagerly once, then captures it in a CUDA graph and
    replays it while :func:`memory_key` of the module and inputs is unchanged; returns copies of the outputs."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Passes replayed from a graph, and graphs captured (for tests and diagnosis).
        self.replays = 0
        self.captures = 0
        self.failed = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        self._key: tuple[TensorKey, ...] | None = None

    def reset(self) -> None:
        """Drop the graph and its memory (end of fit)."""
        self._graph, self._outputs, self._key = None, {}, None

    def __call__(
        self, run: Callable[[], dict[str, torch.Tensor]], module: nn.Module, inputs: Any
    ) -> dict[str, torch.Tensor]:
        if self.failed:
            return run()
        key = memory_key(module, inputs)
        if key != self._key:  # first pass, or something the graph would read has moved: eagerly, then capture
            self.reset()
            self._key = key
            return run()
        if self._graph is None and not self._capture(run):
            return run()
        assert self._graph is not None
        self._graph.replay()
        self.replays += 1
        return {name: tensor.clone() for name, tensor in self._outputs.items()}

    def _capture(self, run: Callable[[], dict[str, torch.Tensor]]) -> bool:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        # A capture registers the device's default generator and marks it capturing until the capture ends; a failed
        # capture never ends, and every later eager draw (the model's dropout in training) would then raise "Offset
        # increment outside graph capture". A copy of its state, taken before, is put back after a failure.
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        generator_before = generator.clone_state()
        try:
            # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures
            with _autocast_without_cache(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = run()
        except Exception as error:  # the user's forward: report once, never stop the fit
            # A capture that failed leaves torch.cuda.graph's capture stream current (its exit stops at the failed
            # capture_end): training must go on on the stream it was on.
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            generator.graphsafe_set_state(generator_before)
            self.failed = True
            self.reset()
            first_line = str(error).splitlines()[0] if str(error) else ""
            rank_zero_warn(
                f"{self.owner}: cuda_graph=True could not capture the pass in a CUDA graph ({type(error).__name__}: "
                f"{first_line}); it runs eagerly from now on (the values are the same; pass cuda_graph=False to "
                "silence this)"
            )
            return False
        self._graph, self._outputs = graph, outputs
        self.captures += 1
        return True
