"""Benchmark GroupRational (GR-KAN) against GELU: host overhead, activation, ViT-B MLP block, KAT-S vs ViT-S step.

Issue 13. Every comparison is measured side by side in one run: candidates are interleaved (rotating order
each round), each sample times ``--inner`` back-to-back calls between device syncs, and the median sample is
reported. Each section (and each candidate) is guarded: a failure is printed and the run goes on.

Sections (``--sections``, comma separated):

host        Per-call host time of a forward+backward on a tiny tensor (4 x 64, 8 groups), where the host
            dominates: the eager path (``GroupRationalFunction``), the registered op through the dispatcher,
            and the reference. On CPU the Triton launches are replaced by no-ops (``--stub-kernels``, default
            on CPU), so the number is the Python/PyTorch work around the kernels; ``--standin-driver`` instead
            runs Triton's real launch path with a driver that compiles for sm_90 and launches nothing. With real
            launches (or the stand-in), a row with the launches stubbed splits off what Triton's launch path costs.
activation  ``(128, 197, 3072)`` in bfloat16 and float32: forward and forward+backward of ``F.gelu`` and of
            ``GroupRational`` (8 groups): Triton with the current kernel configuration, with the previous one
            (``PREVIOUS_KERNEL_CONFIG``, for the A/B) and any ``--configs``, and the reference compiled by
            Inductor; achieved bandwidth (forward 2 N element-bytes, forward+backward 5 N) as % of the measured
            copy bandwidth (``dst.copy_(src)``, 2 N). On CUDA each sample replays a CUDA graph of ``--inner``
            calls, so these are the kernels' times: a forward+backward call takes 0.2-0.5 ms of host time, as
            long as its kernels, and timing eager calls measured the host (runs 3-6 of ``docs/kat_kernel.md``
            disagreed 0.44-0.70 ms on the same kernels with hosts 2x apart). ``--eager-timing`` times eager calls.
mlp         ViT-B MLP block (768 -> 3072 -> 768 on 128 x 197 tokens), forward+backward under bf16 autocast:
            fc1-GELU-fc2 vs GR(identity)-fc1-GR(swish)-fc2, eager and ``torch.compile``-d; on CUDA also each
            eager block replayed from a CUDA graph (its kernels' time, the host left out).
sweep       Forward and forward+backward of each of ``SWEEP_CONFIGS`` (9 KernelConfigs) at the activation shape
            in bfloat16, as % of copy bandwidth: which configuration to make the default (only in --sections).
step        Training step (forward, backward, AdamW, bf16 autocast) of ``kat_small_patch16_224`` vs
            ``vit_small_patch16_224`` at batch 128, eager (plus KAT with each ``--configs`` configuration).
step_compiled  The same with both models ``torch.compile``-d (KAT with ``fullgraph=True``), with the default mode
            and (CUDA) ``mode="reduce-overhead"`` (CUDA graphs: no host work per step); on CUDA one profiled step
            per model of the default mode: wall vs GPU busy time, calls of the registered op and host time per
            call (none when Inductor launches the Triton kernels itself), rational kernel launches, top kernels.

``--small`` shrinks every shape to run on a CPU in a few minutes. Usage::

    python scripts/bench_rational.py                               # on a GPU machine, every section
    python scripts/bench_rational.py --sections host               # CPU: host overhead per call
    python scripts/bench_rational.py --small --sections activation,mlp
    python scripts/bench_rational.py --configs 0,4096,2048,4,8     # add a KernelConfig to the A/B
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from _profiling import device_kernel_times

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure(
    candidates: dict[str, Callable[[], object]], rounds: int, inner: int, device: torch.device,
    statistic: Callable[[list[float]], float] = statistics.median,
    around: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] | None = None,
) -> dict[str, float]:
    """Seconds per call of each candidate (median sample by default), interleaved round by round; a failing
    candidate is dropped. ``around`` names candidates whose calls run inside a context, entered once per sample
    outside the timing (so that its own cost is not timed)."""
    sync = synchronizer(device)
    contexts = around or {}
    for name, run in list(candidates.items()):
        try:
            with contexts.get(name, contextlib.nullcontext)():
                run()
                run()
                sync()
        except Exception as error:  # noqa: BLE001  (report and go on: the other candidates still compare)
            print(f"<!-- {name} failed and is left out: {type(error).__name__}: {str(error)[:300]} -->")
            del candidates[name]
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(rounds):
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            run = candidates[name]
            with contexts.get(name, contextlib.nullcontext)():
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    run()
                sync()
                samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistic(values) for name, values in samples.items()}


def graph_replays(
    candidates: dict[str, Callable[[], object]], inner: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    """Each candidate as the replay of a CUDA graph of ``inner`` calls: timed, it gives the kernels' time with no host
    work between them. A candidate that cannot be captured is left out with a comment."""
    replays: dict[str, Callable[[], object]] = {}
    for name, run in candidates.items():
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
                for _ in range(3):
                    run()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(inner):
                    run()
            replays[name] = graph.replay
        except Exception as error:  # noqa: BLE001  (report and go on: the other candidates still compare)
            print(f"<!-- {name}: no CUDA graph, left out: {type(error).__name__}: {str(error)[:300]} -->")
    return replays


def kernel_times(
    candidates: dict[str, Callable[[], object]], args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """Seconds per call of each candidate's kernels: CUDA-graph replays on CUDA (``--eager-timing``: eager calls, the
    host included), eager calls elsewhere."""
    if device.type != "cuda" or args.eager_timing:
        return measure(candidates, args.rounds, args.inner, device)
    per_replay = measure(graph_replays(candidates, args.inner, device), args.rounds, 1, device)
    return {name: seconds / args.inner for name, seconds in per_replay.items()}


def extra_kernel_configs(args: argparse.Namespace) -> dict[str, object]:
    """``--configs`` as named KernelConfigs."""
    from lightning_act.nn.group_rational import KernelConfig

    return {f"triton{text}": KernelConfig(*(int(v) for v in text.split(","))) for text in args.configs}


def kernel_configs(args: argparse.Namespace) -> dict[str, object]:
    """The Triton configurations to compare: current default, the previous kernel, and ``--configs``."""
    from lightning_act.nn.group_rational import PREVIOUS_KERNEL_CONFIG, KernelConfig

    return {"triton": KernelConfig(), "triton-previous": PREVIOUS_KERNEL_CONFIG, **extra_kernel_configs(args)}


def triton_runs(device: torch.device) -> bool:
    from lightning_act.nn.group_rational import triton_available

    return device.type == "cuda" and triton_available()


@contextlib.contextmanager
def triton_launches_stubbed() -> Iterator[None]:
    """Every Triton kernel of ``triton_rational`` launches nothing inside this block (host-overhead measurement
    only). The kernel objects stay (``torch.library.wrap_triton`` accepts only Triton kernels); their ``run``
    becomes a no-op, and is restored on exit."""
    import triton.runtime.jit

    import lightning_act.nn.triton_rational as kernels

    stubbed = [value for value in vars(kernels).values() if isinstance(value, triton.runtime.jit.KernelInterface)]
    for kernel in stubbed:
        kernel.run = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for kernel in stubbed:
            del kernel.run  # the class's run again


def bench_host(args: argparse.Namespace, device: torch.device) -> None:
    if args.standin_driver:
        if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("bench_rational: --standin-driver runs on a CPU without TRITON_INTERPRET=1")
        import _triton_standin

        from lightning_act.nn import group_rational

        _triton_standin.install()
        group_rational._runs_triton = lambda x, *coefficients: True  # CPU tensors take the Triton path; the stand-in launches nothing
        host_table(args, device, stub=False)
        return
    stub = args.stub_kernels if args.stub_kernels is not None else device.type == "cpu"
    if stub:
        os.environ["TRITON_INTERPRET"] = "1"  # lets the Triton path take CPU tensors; every launch is a no-op
        with triton_launches_stubbed():
            host_table(args, device, stub)
    else:
        host_table(args, device, stub)


def host_table(args: argparse.Namespace, device: torch.device, stub: bool) -> None:
    """The host-time table of :func:`bench_host`; with real launches it has a row without them, whose difference
    to the eager row is what Triton's own launcher costs per forward+backward call (three launches)."""
    from lightning_act.nn import group_rational as gr

    print(f"\n## Host time per forward+backward call, (4, 64) input, 8 groups"
          f"{' (Triton launches stubbed: host work only)' if stub else ''} (fastest of {args.rounds} rounds x 200 calls)")
    x = torch.randn(4, 64, device=device, requires_grad=True)
    grad_y = torch.randn_like(x)
    modules = {name: gr.GroupRational(64, 8, "gelu", implementation=name).to(device) for name in ("triton", "reference")}

    def module_step(module: nn.Module) -> Callable[[], object]:
        params = list(module.parameters())
        return lambda: torch.autograd.grad(module(x), [x, *params], grad_y)

    class AllocateOnly(torch.autograd.Function):
        """The floor: an autograd.Function that only allocates its outputs (what any custom kernel must pay)."""

        @staticmethod
        def forward(ctx: object, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx: object, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.empty_like(grad_y), torch.empty(8, 6, device=device), torch.empty(8, 4, device=device)

    floor_params = [torch.zeros(8, 6, device=device, requires_grad=True), torch.zeros(8, 4, device=device, requires_grad=True)]
    candidates = {
        "floor (allocate-only autograd.Function)": lambda: torch.autograd.grad(
            AllocateOnly.apply(x, *floor_params), [x, *floor_params], grad_y
        ),
        "eager path (autograd.Function)": module_step(modules["triton"]),
        "reference": module_step(modules["reference"]),
    }
    around: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {}
    if not stub:  # stubbed once per sample, outside the timing: the stubbing's own cost is no launch cost
        candidates["eager path, Triton launches stubbed"] = module_step(modules["triton"])
        around["eager path, Triton launches stubbed"] = triton_launches_stubbed
    op = getattr(gr, "group_rational_op", None)
    if op is not None:
        module = modules["triton"]
        params = [module.weight_numerator, module.weight_denominator]
        config = list(module.kernel_config)
        candidates["registered op via dispatcher"] = lambda: torch.autograd.grad(
            op(x.view(4, 8, 8), *params, config), [x, *params], grad_y.view(4, 8, 8)
        )
    # the minimum sample: host work is deterministic, and on a shared CPU every other sample is inflated by load
    times = measure(candidates, args.rounds, 200, device, statistic=min, around=around)
    floor = times.get("floor (allocate-only autograd.Function)", math.nan)
    print("| path | us / call | / floor | above floor (us) |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e6:.1f} | {seconds / floor:.2f}x | {(seconds - floor) * 1e6:.1f} |")
    if "eager path, Triton launches stubbed" in times:
        launcher = times["eager path (autograd.Function)"] - times["eager path, Triton launches stubbed"]
        print(f"# Triton's launch path: {launcher * 1e6:.1f} us per forward+backward call (3 launches)")
        launch_table(args, x.detach().view(4, 8, 8), modules["triton"], device)
    if args.profile_host:
        profile_calls(candidates["eager path (autograd.Function)"], calls=2000)


def launch_table(args: argparse.Namespace, x3: torch.Tensor, module: nn.Module, device: torch.device) -> None:
    """Host time of one launch of each of the three kernels of a forward+backward call through Triton's
    ``kernel[grid](...)``, and of the forward's compiled kernel that call returned (``CompiledKernel[grid](*args)``,
    every parameter in order, constexpr values included: what Triton's launcher is handed). The forward's two rows
    differ by the most a cache of compiled kernels could save per launch; the three ``kernel[grid]`` rows tell
    whether one kernel's launch costs more than the others (their sum is what three launches should cost)."""
    from lightning_act.nn import triton_rational as kernels

    numerator, denominator = module.weight_numerator.detach(), module.weight_denominator.detach()
    rows = x3.shape[0]
    y, grad_x = torch.empty_like(x3), torch.empty_like(x3)
    plan = kernels.launch_plan(*x3.shape, numerator.shape[0], denominator.shape[0], tuple(module.kernel_config))
    partials = x3.new_empty(plan.partials_shape, dtype=torch.float32)
    grad_numerator, grad_denominator = torch.empty_like(numerator), torch.empty_like(denominator)
    forward, backward = kernels._group_rational_forward_kernel, kernels._group_rational_backward_kernel
    finish = kernels._coefficient_gradient_kernel
    runtime = (x3, y, numerator, denominator, rows)
    backward_args = (x3, torch.ones_like(x3), grad_x, partials, numerator, denominator, rows)
    finish_args = (partials, grad_numerator, grad_denominator, denominator, plan.backward_programs)
    try:
        compiled = forward[plan.forward_grid](*runtime, **plan.forward_meta)
        every = [*runtime, *(plan.forward_meta[name] for name in forward.arg_names[len(runtime):])]
        grid = (*plan.forward_grid, 1, 1)[:3]
        times = measure({
            "forward: kernel[grid](...) (Triton's launch path)": lambda: forward[plan.forward_grid](*runtime, **plan.forward_meta),
            "forward: CompiledKernel[grid](*args)": lambda: compiled[grid](*every),
            "backward: kernel[grid](...)": lambda: backward[plan.backward_grid](*backward_args, **plan.backward_meta),
            "coefficient gradients (finish): kernel[grid](...)": lambda: finish[plan.finish_grid](*finish_args, **plan.finish_meta),
        }, args.rounds, 1000, device, statistic=min)
    except Exception as error:  # noqa: BLE001  (Triton internals of another version: the host table stands)
        print(f"<!-- launch table failed: {type(error).__name__}: {str(error)[:300]} -->")
        return
    print("\n| one kernel launch | us |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e6:.2f} |")


def profile_calls(call: Callable[[], object], calls: int) -> None:
    """Where the host time of ``calls`` calls goes: cProfile's 30 functions with the most time of their own (the
    profiler inflates every function call, so compare the rows with each other, not with the timings above)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    print(f"\n# cProfile of {calls} eager forward+backward calls, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def bench_activation(args: argparse.Namespace, device: torch.device) -> None:
    shape = (4, 64, 768) if args.small else (128, 197, 3072)
    timing = "eager calls" if device.type != "cuda" or args.eager_timing else "CUDA-graph replays: kernel time"
    print(f"\n## Activation {shape}, 8 groups (median of {args.rounds} rounds x {args.inner} calls; {timing})")
    print("| dtype | op | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % copy | fwd+bwd / GELU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        guarded(f"activation {dtype_name}", lambda: bench_activation_dtype(args, device, shape, dtype_name))


def rational_candidates(args: argparse.Namespace, device: torch.device, channels: int) -> dict[str, nn.Module]:
    """GroupRational modules to compare: each Triton configuration (on CUDA) and the Inductor-compiled reference."""
    from lightning_act.nn.group_rational import GroupRational

    modules: dict[str, nn.Module] = {}
    if triton_runs(device):
        for name, config in kernel_configs(args).items():
            modules[name] = GroupRational(channels, 8, "gelu", implementation="triton", kernel_config=config).to(device)
    if args.compile:
        reference = GroupRational(channels, 8, "gelu", implementation="reference").to(device)
        modules["reference+compile"] = torch.compile(reference, dynamic=False)
    modules["reference"] = GroupRational(channels, 8, "gelu", implementation="reference").to(device)
    return modules


def bench_activation_dtype(args: argparse.Namespace, device: torch.device, shape: tuple[int, ...], dtype_name: str) -> None:
    """One dtype's rows of the activation table."""
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    element_bytes = torch.finfo(dtype).bits // 8
    x = torch.randn(shape, device=device, dtype=dtype)
    grad_y = torch.randn_like(x)
    copy_target = torch.empty_like(x)
    x_grad = x.detach().requires_grad_()
    modules = rational_candidates(args, device, shape[-1])
    with torch.no_grad():
        expected = modules["reference"](x).float()
        for name, module in modules.items():
            error = float((module(x).float() - expected).abs().max())
            print(f"<!-- {dtype_name} {name}: max |y - reference| = {error:.2e} -->")
    if not args.small:
        del modules["reference"]  # timing the eager reference at this size (~20 passes over 77M elements) tells nothing

    def forward(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return op(x)

        return run

    def forward_backward(op: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(op(x_grad), [x_grad, *params], grad_y)

    forward_runs: dict[str, Callable[[], object]] = {"copy": lambda: copy_target.copy_(x), "gelu": forward(F.gelu)}
    backward_runs: dict[str, Callable[[], object]] = {"gelu": forward_backward(F.gelu, [])}
    for name, module in modules.items():
        forward_runs[f"rational[{name}]"] = forward(module)
        backward_runs[f"rational[{name}]"] = forward_backward(module, list(module.parameters()))
    forward_times = kernel_times(forward_runs, args, device)
    backward_times = kernel_times(backward_runs, args, device)
    copy_bandwidth = 2 * numel * element_bytes / forward_times["copy"]
    print(f"| {dtype_name} | copy | {forward_times['copy'] * 1e3:.3f} | {copy_bandwidth / 1e9:.0f} | 100% | | | | |")
    for name in backward_runs:
        cells = [dtype_name, name]
        if name in forward_times:
            bandwidth = 2 * numel * element_bytes / forward_times[name]
            cells += [f"{forward_times[name] * 1e3:.3f}", f"{bandwidth / 1e9:.0f}", f"{100 * bandwidth / copy_bandwidth:.0f}%"]
        else:
            cells += ["failed"] * 3
        if name in backward_times:
            bandwidth = 5 * numel * element_bytes / backward_times[name]
            ratio = backward_times[name] / backward_times["gelu"] if "gelu" in backward_times else math.nan
            cells += [f"{backward_times[name] * 1e3:.3f}", f"{bandwidth / 1e9:.0f}", f"{100 * bandwidth / copy_bandwidth:.0f}%",
                      f"{ratio:.2f}x"]
        else:
            cells += ["failed"] * 4
        print("| " + " | ".join(cells) + " |")


# Candidate launch configurations for the sweep (block_k, forward_tile, backward_tile, backward_row_tiles,
# num_warps, interleave_groups, backward_prefetch): the default, the previous kernel, one change each around them.
SWEEP_CONFIGS = (
    (0, 4096, 512, 16, 4, 1, 0),   # default (KernelConfig(): H100 run 3's best)
    (0, 4096, 1024, 8, 4, 0, 0),   # round-2 default
    (0, 4096, 4096, 1, 4, 0, 0),   # previous kernel (PREVIOUS_KERNEL_CONFIG)
    (0, 4096, 1024, 8, 4, 1, 0),   # first issue-13 default (group-fastest numbering)
    (0, 4096, 1024, 8, 4, 0, 1),   # backward prefetch
    (0, 4096, 512, 16, 4, 0, 1),   # backward prefetch, half the accumulator registers
    (0, 4096, 512, 16, 4, 0, 0),   # half the accumulator registers
    (0, 8192, 2048, 8, 8, 0, 0),   # 8 warps, twice the tiles
    (0, 4096, 2048, 8, 8, 0, 1),   # 8 warps, backward prefetch
)


def bench_sweep(args: argparse.Namespace, device: torch.device) -> None:
    """Forward and forward+backward time of each ``SWEEP_CONFIGS`` entry at the activation shape (bf16), with copy
    as the bandwidth yardstick: tells the next GPU run which ``KernelConfig`` to make the default."""
    from lightning_act.nn.group_rational import GroupRational, KernelConfig

    if not triton_runs(device):
        print("\n## Sweep: skipped (needs CUDA and triton)")
        return
    shape = (4, 64, 768) if args.small else (128, 197, 3072)
    numel = math.prod(shape)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    x_grad = x.detach().requires_grad_()
    grad_y = torch.randn_like(x)
    copy_target = torch.empty_like(x)
    modules = {
        config: GroupRational(shape[-1], 8, "gelu", implementation="triton", kernel_config=KernelConfig(*config)).to(device)
        for config in SWEEP_CONFIGS
    }

    def forward(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    forward_runs: dict[str, Callable[[], object]] = {"copy": lambda: copy_target.copy_(x)}
    backward_runs: dict[str, Callable[[], object]] = {}
    for config, module in modules.items():
        name = ",".join(map(str, config))
        forward_runs[name] = forward(module)
        params = list(module.parameters())
        backward_runs[name] = lambda module=module, params=params: torch.autograd.grad(
            module(x_grad), [x_grad, *params], grad_y
        )
    forward_times = kernel_times(forward_runs, args, device)
    backward_times = kernel_times(backward_runs, args, device)
    copy_bandwidth = 2 * numel * 2 / forward_times["copy"]
    print(f"\n## Sweep of KernelConfig at {shape} bf16 (block_k, forward_tile, backward_tile, backward_row_tiles, "
          f"num_warps, interleave_groups, backward_prefetch); copy {forward_times['copy'] * 1e3:.3f} ms")
    print("| config | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy |")
    print("|---|---|---|---|---|")
    for name in backward_runs:
        cells = [name]
        if name in forward_times:
            cells += [f"{forward_times[name] * 1e3:.3f}", f"{100 * 2 * numel * 2 / forward_times[name] / copy_bandwidth:.0f}%"]
        else:
            cells += ["failed"] * 2
        if name in backward_times:
            cells += [f"{backward_times[name] * 1e3:.3f}", f"{100 * 5 * numel * 2 / backward_times[name] / copy_bandwidth:.0f}%"]
        else:
            cells += ["failed"] * 2
        print("| " + " | ".join(cells) + " |")


class KANMLP(nn.Module):
    """GR-KAN MLP of KAT (Yang & Wang 2024): GR(identity) -> fc1 -> GR(swish) -> fc2."""

    def __init__(self, dim: int, hidden: int, implementation: str, config: object) -> None:
        super().__init__()
        from lightning_act.nn.group_rational import GroupRational

        self.act1 = GroupRational(dim, 8, "identity", implementation=implementation, kernel_config=config)
        self.fc1 = nn.Linear(dim, hidden)
        self.act2 = GroupRational(hidden, 8, "swish", implementation=implementation, kernel_config=config)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act2(self.fc1(self.act1(x))))


def bench_mlp_block(args: argparse.Namespace, device: torch.device) -> None:
    from lightning_act.nn.group_rational import KernelConfig

    batch, tokens, dim = (4, 64, 192) if args.small else (128, 197, 768)
    hidden = 4 * dim
    print(f"\n## MLP block {dim} -> {hidden} -> {dim} on ({batch}, {tokens}) tokens, fwd+bwd, bf16 autocast")
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    blocks: dict[str, nn.Module] = {"gelu": nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))}
    if triton_runs(device):
        for name, config in kernel_configs(args).items():
            blocks[f"gr-kan[{name}]"] = KANMLP(dim, hidden, "triton", config)
    else:
        blocks["gr-kan[reference]"] = KANMLP(dim, hidden, "reference", KernelConfig())
    if args.compile:
        gr_kan = next(name for name in blocks if name.startswith("gr-kan"))
        blocks["gelu+compile"] = torch.compile(blocks["gelu"], dynamic=False)
        blocks[f"{gr_kan}+compile"] = torch.compile(blocks[gr_kan], dynamic=False, fullgraph=True)
    for block in blocks.values():
        block.to(device)

    def step(block: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = block(x)
            out.float().square().mean().backward()
            return out

        return run

    steps = {name: step(block) for name, block in blocks.items()}
    times = measure(dict(steps), args.rounds, args.inner, device)
    if device.type == "cuda" and not args.eager_timing:  # the eager blocks' kernels alone: CUDA-graph replays
        eager = {f"{name}+graph": run for name, run in steps.items() if not name.endswith("+compile")}
        times |= kernel_times(eager, args, device)
    print("| block | ms | / GELU (eager) | / GELU (same mode) |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        same_mode = "gelu+compile" if name.endswith("+compile") else "gelu+graph" if name.endswith("+graph") else "gelu"
        print(f"| {name} | {seconds * 1e3:.3f} | {seconds / times.get('gelu', math.nan):.2f}x | "
              f"{seconds / times.get(same_mode, math.nan):.2f}x |")


def bench_training_step(args: argparse.Namespace, device: torch.device, compiled: bool = False) -> None:
    """KAT vs ViT training step, eager models or (``compiled``) ``torch.compile``-d ones (KAT with fullgraph)."""
    import timm

    import lightning_act.models.kat  # noqa: F401  (registers the kat_* models with timm)

    size = "tiny" if args.small else "small"
    batch = 2 if args.small else args.batch
    mode = "torch.compile" if compiled else "eager"
    print(f"\n## Training step kat_{size} vs vit_{size} (patch16_224), batch {batch}, bf16 autocast, AdamW, {mode}")
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], object]:
        def run() -> object:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss

        return run

    modes = ("default", "reduce-overhead") if compiled and device.type == "cuda" else ("default",)
    for mode_name in modes:  # reduce-overhead: CUDA graphs replay the compiled forward and backward (no host work)
        # one table per mode, printed as soon as it is measured (a time limit during the next mode keeps it)
        suffix = ("+compile" + ("" if mode_name == "default" else f"[{mode_name}]")) if compiled else ""
        candidates: dict[str, Callable[[], object]] = {}
        for family in ("vit", "kat"):
            model = timm.create_model(f"{family}_{size}_patch16_224").to(device)
            optimizer = torch.optim.AdamW(model.parameters())
            if compiled:
                model = torch.compile(model, dynamic=False, fullgraph=family == "kat", mode=mode_name)
            candidates[f"{family}_{size}{suffix}"] = step(model, optimizer)
        if not compiled and triton_runs(device):  # eager KAT with each --configs launch configuration
            for config_name, config in extra_kernel_configs(args).items():
                model = with_kernel_config(timm.create_model(f"kat_{size}_patch16_224").to(device), config)
                candidates[f"kat_{size}[{config_name}]"] = step(model, torch.optim.AdamW(model.parameters()))
        rounds = max(3, args.rounds // 2)
        times = measure(candidates, rounds, 1 if args.small else max(1, args.inner // 2), device)
        print("| model | ms / step | KAT / ViT (same mode) |")
        print("|---|---|---|")
        for name, seconds in times.items():
            vit = name.replace("kat_", "vit_").split("[triton")[0]
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / times.get(vit, math.nan):.2f}x |")
        sys.stdout.flush()
        if device.type == "cuda" and mode_name == "default":
            guarded(f"profile {mode}", lambda: profile_steps(candidates))


def with_kernel_config(model: nn.Module, config: object) -> nn.Module:
    """``model`` with every GroupRational launching its kernels with ``config``."""
    from lightning_act.nn.group_rational import GroupRational

    for module in model.modules():
        if isinstance(module, GroupRational):
            module.kernel_config = config
    return model


def profile_steps(candidates: dict[str, Callable[[], object]]) -> None:
    """One profiled step per model: wall time vs GPU busy time (host-bound when the GPU idles), the rational ops'
    host time per call, and the largest GPU kernels. Profiler overhead inflates the wall time somewhat."""
    from torch.profiler import ProfilerActivity, profile

    print("| model (1 profiled step) | wall ms | GPU busy ms | registered-op calls | host us / op call | rational kernel "
          "launches | top GPU kernels (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in candidates.items():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        kernel_us, kernel_launches = device_kernel_times(profiler.events())
        busy = sum(kernel_us.values()) / 1e3
        ops = [e for e in profiler.key_averages() if e.key.startswith("lightning_act::")]
        calls = sum(e.count for e in ops)  # 0 when Inductor launches the kernels itself (triton_op)
        host = f"{sum(e.cpu_time_total for e in ops) / calls:.0f}" if calls else "-"
        launches = sum(n for k, n in kernel_launches.items() if "group_rational" in k or "coefficient_gradient" in k)
        kernels = "; ".join(f"{key[:40]} {us / 1e3:.2f}" for key, us in kernel_us.most_common(5))
        print(f"| {name} | {wall * 1e3:.1f} | {busy:.1f} | {calls} | {host} | {launches} | {kernels} |")


#: The sections that failed (the run goes on; it exits 1 at the end).
FAILED: list[str] = []


def guarded(what: str, run: Callable[[], None]) -> None:
    """Run one section; a failure is printed (with its traceback) and the script goes on."""
    try:
        run()
    except Exception:  # noqa: BLE001
        print(f"\n<!-- {what} FAILED:\n{traceback.format_exc()[-3000:]}-->")
        FAILED.append(what)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes for a CPU run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20, --small 5)")
    parser.add_argument("--inner", type=int, default=None, help="calls per timed sample (default 10, --small 2)")
    parser.add_argument("--sections", default="host,activation,mlp,step,step_compiled",
                        help="comma list of host,activation,sweep,mlp,step,step_compiled")
    parser.add_argument("--dtypes", default="bf16,fp32", help="activation dtypes, comma list of bf16,fp32")
    parser.add_argument("--batch", type=int, default=128, help="training-step batch size")
    parser.add_argument("--configs", nargs="*", default=[], help="extra KernelConfig tuples, e.g. 0,4096,2048,4,8")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile candidates")
    parser.add_argument("--eager-timing", action="store_true",
                        help="activation and mlp on CUDA: time eager calls (host included), not CUDA-graph replays")
    parser.add_argument("--profile-host", action="store_true",
                        help="with the host section: a cProfile of the eager path's forward+backward calls")
    parser.add_argument("--stub-kernels", dest="stub_kernels", action="store_true", default=None,
                        help="host section: replace Triton launches by no-ops (default on CPU)")
    parser.add_argument("--standin-driver", action="store_true",
                        help="host section on a CPU through Triton's real launch path: a stand-in driver compiles "
                             "the kernels for sm_90 and launches nothing (scripts/_triton_standin.py)")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.small else 20)
    args.inner = args.inner or (2 if args.small else 10)
    args.dtypes = args.dtypes.split(",")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"# bench_rational: {' '.join(sys.argv)}")
    print(f"device {device} ({device_name}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"triton {triton_version}, python {platform.python_version()}")
    if not triton_runs(device):
        print("Triton candidates skipped: they need a CUDA device with triton (the CPU interpreter is for testing)")
    sections = {
        "host": bench_host, "activation": bench_activation, "sweep": bench_sweep, "mlp": bench_mlp_block,
        "step": bench_training_step,
        "step_compiled": lambda args, device: bench_training_step(args, device, compiled=True),
    }
    for name in args.sections.split(","):
        guarded(name, lambda name=name: sections[name](args, device))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
    if FAILED:  # the other sections were measured; the step still reads as failed
        print(f"FAILED sections: {', '.join(FAILED)}", flush=True)
        sys.exit(1)
