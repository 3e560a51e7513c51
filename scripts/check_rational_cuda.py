"""Correctness of the GR-KAN Triton kernels on CUDA against a float64 reference, on fresh random inputs.

For each case (shape, layout, dtype, sharing, kernel configuration) the forward output and the gradients of x,
the numerator and the denominator of ``GroupRational(implementation="triton")`` are compared with autograd
through ``group_rational_reference`` in float64 on the same (dtype-rounded) inputs. Errors are relative to the
largest reference magnitude of each tensor. Coefficients are random with mixed signs (denominators too, to
exercise ``d|b|/db``). Every case runs the default ``KernelConfig`` (the best configuration of H100 run 3) and
``CANDIDATE_CONFIGS`` (the round-2 default, for the A/B); in the full mode the big cases also
``PREVIOUS_KERNEL_CONFIG``, two backward-prefetch variants and every configuration of ``bench_rational.py``'s
sweep. Also: bitwise determinism of the coefficient gradients over two backward passes; ``torch.compile`` of a
forward+backward, whose Inductor code must launch the three Triton kernels itself (the op is a ``triton_op``) with
no input copies, equal to eager; a CUDA-graph capture of forward+backward; (full mode) the op under ``torch.compile(fullgraph=True)``
across widths, dtypes and batch sizes. Every check prints PASS/FAIL and the script goes on; exit status 1 if any
failed.

    python scripts/check_rational_cuda.py            # all cases
    python scripts/check_rational_cuda.py --quick    # fewer cases and configurations, no compile checks
    python scripts/check_rational_cuda.py --compiled-launches-only   # only the torch.compile launch check
    TRITON_INTERPRET=1 python scripts/check_rational_cuda.py --quick --cpu-dry-run   # the script's logic on CPU
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable

import torch

from lightning_act.nn.group_rational import (
    PREVIOUS_KERNEL_CONFIG,
    GroupRational,
    KernelConfig,
    group_rational_reference,
)

# relative error bounds for y and grad_x by dtype (one rounding of the output dominates), and for the fp32
# coefficient-gradient sums (reduction order differs from the float64 reference)
OUTPUT_BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
COEFFICIENT_BOUND = 1e-4
FAILURES: list[str] = []
DEVICE = "cuda"  # "cpu" for --cpu-dry-run (Triton interpreter, small shapes)
# the best forward and backward launch configurations of the sweep in H100 run 2 (docs/kat_kernel.md), and both
CANDIDATE_CONFIGS = {
    "round-2 default": KernelConfig(backward_tile=1024, backward_row_tiles=8, interleave_groups=0),
}


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def guarded(name: str, check: Callable[[], None]) -> None:
    try:
        check()
    except Exception:  # noqa: BLE001  (print and go on to the next check)
        report(name, False, traceback.format_exc()[-1500:])


def random_module(channels: int, groups: int, channel_dim: int, sharing: str, config: KernelConfig,
                  generator: torch.Generator) -> GroupRational:
    module = GroupRational(channels, groups, "gelu", channel_dim, "triton", sharing=sharing, kernel_config=config)
    with torch.no_grad():
        module.weight_numerator.copy_(0.5 * torch.randn(module.weight_numerator.shape, generator=generator))
        module.weight_denominator.copy_(torch.randn(module.weight_denominator.shape, generator=generator))
    return module.to(DEVICE)


def check_case(shape: tuple[int, ...], groups: int, channel_dim: int, dtype: torch.dtype, sharing: str,
               configs: dict[str, KernelConfig], seed: int) -> None:
    """One input case for each of ``configs``: every configuration against one float64 reference."""
    generator = torch.Generator().manual_seed(seed)
    module = random_module(shape[channel_dim], groups, channel_dim, sharing, KernelConfig(), generator)
    x = (2.0 * torch.randn(shape, generator=generator)).to(DEVICE, dtype).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    x64 = x.detach().double().requires_grad_()
    numerator = module.weight_numerator.detach().double().requires_grad_()
    denominator = module.weight_denominator.detach().double().requires_grad_()
    y64 = group_rational_reference(x64, numerator.expand(groups, 6), denominator.expand(groups, 4), channel_dim)
    y64.backward(grad_y.double())
    expected = [y64.detach(), x64.grad, numerator.grad, denominator.grad]
    del y64, x64
    bounds = [OUTPUT_BOUNDS[dtype]] * 2 + [COEFFICIENT_BOUND] * 2
    for config_name, config in configs.items():
        name = f"{tuple(shape)} dim={channel_dim} {str(dtype)[6:]} {sharing} {config_name}"
        guarded(name, lambda: check_config(module, config, x, grad_y, expected, bounds, name))


def check_config(module: GroupRational, config: KernelConfig, x: torch.Tensor, grad_y: torch.Tensor,
                 expected: list[torch.Tensor], bounds: list[float], name: str) -> None:
    module.kernel_config = config
    module.zero_grad(set_to_none=True)
    x.grad = None
    y = module(x)
    y.backward(grad_y)
    ours = [t.detach().clone() for t in (y, x.grad, module.weight_numerator.grad, module.weight_denominator.grad)]
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_y)
    second = [module.weight_numerator.grad, module.weight_denominator.grad]
    deterministic = all(torch.equal(a, b) for a, b in zip(ours[2:], second))
    errors = [float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ours, expected)]
    ok = all(e <= b for e, b in zip(errors, bounds)) and deterministic
    report(name, ok, "rel err y {:.1e}, dx {:.1e}, da {:.1e}, db {:.1e}; deterministic {}".format(*errors, deterministic))


def check_compiled_launches(batches: tuple[int, ...]) -> None:
    """``torch.compile`` of a GroupRational forward+backward: Inductor's generated code launches the three Triton
    kernels itself (the op is a ``triton_op``: no call of ``torch.ops.lightning_act`` is left, so no dispatcher
    round trip per call), PyTorch found which arguments each kernel writes (else it copies every input before each
    launch), and the values equal the eager path's. A second batch size recompiles (the launch plan specialises).
    The warning is listened for on the logger ``triton_kernel_wrap`` emits it through (``torch._dynamo``, not the
    module's own name: records reach only ancestor loggers)."""
    import logging

    from torch._higher_order_ops import triton_kernel_wrap

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Keep(logging.WARNING)
    triton_kernel_wrap.log.addHandler(handler)
    try:
        compiled_launches(batches, warnings)
    finally:
        triton_kernel_wrap.log.removeHandler(handler)


def compiled_launches(batches: tuple[int, ...], warnings: list[str]) -> None:
    """The body of :func:`check_compiled_launches`, with ``warnings`` filled by its log handler."""
    from torch._inductor.utils import run_and_get_code

    channels, tokens = (768, 197) if DEVICE == "cuda" else (64, 5)
    module = GroupRational(channels, 8, "swish", implementation="triton").to(DEVICE)
    compiled = torch.compile(module, fullgraph=True)

    def step(net: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_()
        y = net(leaf)
        y.backward(grad_y)
        return [y.detach(), leaf.grad, module.weight_numerator.grad.clone(), module.weight_denominator.grad.clone()]

    for index, batch in enumerate(batches):
        x = torch.randn(batch, tokens, channels, device=DEVICE, dtype=torch.bfloat16)
        grad_y = torch.randn_like(x)
        ours, code = run_and_get_code(step, compiled, x, grad_y)
        expected = step(module, x, grad_y)
        errors = [float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(ours, expected)]
        ok = all(e <= b for e, b in zip(errors, [OUTPUT_BOUNDS[torch.bfloat16]] * 2 + [COEFFICIENT_BOUND] * 2))
        report(f"compiled fwd+bwd batch {batch} vs eager", ok,
               "rel err y {:.1e}, dx {:.1e}, da {:.1e}, db {:.1e}".format(*errors))
        if index or DEVICE != "cuda":  # on CPU Inductor traces the op's PyTorch formula: nothing to look for
            continue
        source = "\n".join(code)
        kernels = ("_group_rational_forward_kernel", "_group_rational_backward_kernel", "_coefficient_gradient_kernel")
        launches = {name: source.count(name) for name in kernels}
        opaque = source.count("torch.ops.lightning_act")
        report("compiled graph launches the Triton kernels directly", all(launches.values()) and not opaque,
               f"kernel name occurrences in Inductor's code {launches}; torch.ops.lightning_act calls {opaque}; "
               f"{len(code)} code module(s)")
    mutation_warnings = [w for w in warnings if "assuming every input is mutated" in w]
    report("kernels' written arguments identified (no defensive input copies)", not mutation_warnings,
           f"{len(mutation_warnings)} 'assuming every input is mutated' warnings")


def check_compile_sweep() -> None:
    """The op under torch.compile(fullgraph=True): new widths, dtypes and batch sizes recompile without error."""
    for channels, dtype, batch in ((64, torch.float32, 8), (64, torch.float32, 5), (96, torch.bfloat16, 8),
                                   (3072, torch.bfloat16, 3), (3072, torch.float16, 7)):
        module = GroupRational(channels, 8, "swish", implementation="triton").cuda()
        compiled = torch.compile(module, fullgraph=True)
        x = torch.randn(batch, 17, channels, device="cuda", dtype=dtype, requires_grad=True)
        y = compiled(x)
        y.float().sum().backward()
        expected = module(x.detach())
        error = float((y.detach().float() - expected.float()).abs().max())
        report(f"compile fullgraph C={channels} {str(dtype)[6:]} batch {batch}", error == 0.0, f"max |compiled - eager| = {error:.1e}")


def check_cuda_graph() -> None:
    """Forward+backward of a GroupRational captured in one CUDA graph and replayed on new data."""
    module = GroupRational(768, 8, "swish", implementation="triton").cuda()
    static_x = torch.randn(64, 768, device="cuda", requires_grad=True)
    static_grad = torch.randn(64, 768, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            module.zero_grad(set_to_none=False)
            static_x.grad = None
            module(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=False)
    static_x.grad = torch.zeros_like(static_x)
    with torch.cuda.graph(graph):
        static_y = module(static_x)
        static_y.backward(static_grad)
    new_x = torch.randn(64, 768, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    module.weight_numerator.grad.zero_()
    static_x.grad.zero_()
    graph.replay()
    expected = module(new_x)
    error = float((static_y - expected).abs().max())
    report("CUDA graph capture fwd+bwd, replay on new input", error == 0.0, f"max |replayed - eager| = {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    parser.add_argument("--compiled-launches-only", action="store_true", help="only check_compiled_launches")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the checks' code on CPU under TRITON_INTERPRET=1 with small shapes (no GPU checks)")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        DEVICE = "cpu"
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run (Triton interpreter)"
    print(f"# check_rational_cuda seed {seed}, {device_name}, torch {torch.__version__}", flush=True)
    if args.compiled_launches_only:
        guarded("compiled launches", lambda: check_compiled_launches((4, 3)))
        finish()
    # the configurations the benchmark compares with the default, checked on the big cases; --quick checks the
    # default (run 3's best) and the round-2 default
    configs = {"default": KernelConfig(), **CANDIDATE_CONFIGS}
    if not args.quick:
        configs.update({
            "previous": PREVIOUS_KERNEL_CONFIG,
            "prefetch": KernelConfig(backward_prefetch=1),
            "8warps-prefetch": KernelConfig(backward_tile=2048, num_warps=8, backward_prefetch=1),
        })
        configs = with_swept_configs(configs)
    cases = [
        ((128, 197, 3072), 8, -1, torch.bfloat16, "per_group"),
        ((128, 197, 3072), 8, -1, torch.float32, "per_group"),
        ((3, 7, 40), 8, -1, torch.float32, "shared_numerator"),
        ((2, 256, 14, 14), 8, 1, torch.float16, "shared_numerator"),
        ((5, 13, 24), 8, -1, torch.bfloat16, "shared_denominator"),
        ((2, 48, 7, 9), 4, 1, torch.float32, "per_group"),
        ((1000, 96), 8, -1, torch.bfloat16, "per_group"),
    ]
    if args.quick:
        cases = cases[:5]
    if DEVICE == "cpu":  # the interpreter runs every program in numpy: the big cases become small ones
        cases = [((2, 5, 3072), *case[1:]) if case[0] == (128, 197, 3072) else case for case in cases]
    for index, case in enumerate(cases):
        # every configuration on the big bfloat16 case (and the float32 one in the full mode); the others (float32,
        # masking, sharing, layouts) with the default and the round-2 default
        case_configs = configs if index == 0 or not args.quick and index == 1 else {
            name: configs[name] for name in ("default", "round-2 default")
        }
        guarded(f"{case}", lambda: check_case(*case, case_configs, seed + index))
    if DEVICE == "cuda":
        guarded("CUDA graph", check_cuda_graph)
    if not args.quick or DEVICE == "cpu":  # --quick on a GPU: the benchmark's profiled compiled step shows the launches
        guarded("compiled launches", lambda: check_compiled_launches((4, 3)))
    if not args.quick and DEVICE == "cuda":
        guarded("compile sweep", check_compile_sweep)
    finish()


def with_swept_configs(configs: dict[str, KernelConfig]) -> dict[str, KernelConfig]:
    """``configs`` plus every configuration of ``bench_rational.py``'s sweep, each configuration checked once: the
    sweep picks the next default, and only a configuration checked against float64 may become it."""
    from bench_rational import SWEEP_CONFIGS

    swept = {",".join(map(str, values)): KernelConfig(*values) for values in SWEEP_CONFIGS}
    return configs | {name: config for name, config in swept.items() if config not in configs.values()}


def finish() -> None:
    print(f"# {len(FAILURES)} failed: {FAILURES}" if FAILURES else "# all checks passed", flush=True)
    raise SystemExit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
