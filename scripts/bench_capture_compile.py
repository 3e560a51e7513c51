"""Cost of the capture hooks on a torch.compile'd model: bare vs hooks idle vs observing.

The capture registry keeps one hook per tapped module for the whole fit and gates it with a flag
(see lightning_act/capture/registry.py). This measures, side by side in interleaved rounds, the
training-step time (forward, backward, SGD) of

- ``bare``: the compiled model without any hook;
- ``idle``: the same weights with every block and activation tapped, not observing (the steps
  between due steps);
- ``observing``: tapped and observing, each activation reduced to moment partials (a due step).

Usage: ``python scripts/bench_capture_compile.py [--backend inductor] [--rounds 7] [--steps 10]``.
Prints the median ratios to ``bare`` and how many activations reached the sink (it stops if the observing
warm-up did not deliver one per tap and step).

``bare`` and the tapped copy are the same class, and Dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``): the compiled tapped copy would reuse the bare graph
and never run its hooks. The script turns those guards on, so each copy gets its own graph.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from lightning_act.capture import SAMPLE_FIRST, capture_registry, select_taps
from lightning_act.stats import moment_partials


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


class MomentSink:
    armed = False

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.received = 0

    def receive(self, index: int, x: torch.Tensor) -> None:
        self.received += 1
        sums, _ = moment_partials(x)
        self.sums[index] = sums if index not in self.sums else self.sums[index] + sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    bare = Net(args.width, args.depth)
    tapped = copy.deepcopy(bare)
    sink = MomentSink()
    taps = select_taps(tapped, ["@blocks", "@activations"])
    registry = capture_registry(tapped)
    registry.subscribe(sink, taps, [SAMPLE_FIRST] * len(taps))
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    models = {"bare": torch.compile(bare, backend=args.backend), "tapped": torch.compile(tapped, backend=args.backend)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
    x = torch.randn(args.batch, args.tokens, args.width)
    y = torch.randint(0, 10, (args.batch,))

    def step(name: str) -> None:
        loss = nn.functional.cross_entropy(models[name](x), y)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    def run(mode: str) -> float:
        sink.armed = mode == "observing"
        registry.refresh()
        name = "bare" if mode == "bare" else "tapped"
        start = time.perf_counter()
        for _ in range(args.steps):
            step(name)
        return (time.perf_counter() - start) / args.steps

    modes = ("bare", "idle", "observing")
    for mode in modes:  # compile every variant before timing
        run(mode)
    if sink.received != args.steps * len(taps):
        raise SystemExit(f"the observing warm-up delivered {sink.received} activations, not one per tap and step "
                         f"({args.steps * len(taps)}): the tapped graph does not run its hooks")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(run(mode))
    base = statistics.median(times["bare"])
    print(f"torch {torch.__version__}, backend={args.backend}, threads={torch.get_num_threads()}, "
          f"{len(taps)} taps, {args.rounds} interleaved rounds of {args.steps} steps, "
          f"{sink.received} activations delivered to the sink")
    for mode in modes:
        t = statistics.median(times[mode])
        print(f"{mode:>10}: {1000 * t:8.2f} ms/step  ratio {t / base:.3f}")


if __name__ == "__main__":
    main()
