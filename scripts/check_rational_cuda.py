"""Correctness of the GR-KAN Triton kernels on CUDA against a float64 reference, on fresh random inputs.

For each case (shape, layout, dtype, sharing, kernel configuration) the forward output and the gradients of x,
the numerator and the denominator of ``GroupRational(implementation="triton")`` are compared with autograd
through ``group_rational_reference`` in float64 on the same (dtype-rounded) inputs. Errors are relative to the
largest reference magnitude of each tensor. Coefficients are random with mixed signs (denominators too, to
exercise ``d|b|/db``). Also: bitwise determinism of the coefficient gradients over two backward passes, the
registered op under ``torch.compile(fullgraph=True)`` across widths, dtypes and batch sizes, and a CUDA-graph
capture of forward+backward. Every check prints PASS/FAIL and the script goes on; exit status 1 if any failed.

    python scripts/check_rational_cuda.py            # all cases
    python scripts/check_rational_cuda.py --quick    # fewer cases, no compile sweep
"""

from __future__ import annotations

import argparse
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
    return module.cuda()


def check_case(shape: tuple[int, ...], groups: int, channel_dim: int, dtype: torch.dtype, sharing: str,
               config: KernelConfig, config_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    module = random_module(shape[channel_dim], groups, channel_dim, sharing, config, generator)
    x = (2.0 * torch.randn(shape, generator=generator)).to("cuda", dtype).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to("cuda", dtype)
    y = module(x)
    y.backward(grad_y)
    ours = [t.detach().clone() for t in (y, x.grad, module.weight_numerator.grad, module.weight_denominator.grad)]
    module.zero_grad()
    x.grad = None
    module(x).backward(grad_y)
    second = [module.weight_numerator.grad, module.weight_denominator.grad]
    deterministic = all(torch.equal(a, b) for a, b in zip(ours[2:], second))

    x64 = x.detach().double().requires_grad_()
    numerator = module.weight_numerator.detach().double().requires_grad_()
    denominator = module.weight_denominator.detach().double().requires_grad_()
    groups_n, groups_d = numerator.expand(groups, 6), denominator.expand(groups, 4)
    y64 = group_rational_reference(x64, groups_n, groups_d, channel_dim)
    y64.backward(grad_y.double())
    expected = [y64.detach(), x64.grad, numerator.grad, denominator.grad]
    errors = [float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ours, expected)]
    bounds = [OUTPUT_BOUNDS[dtype]] * 2 + [COEFFICIENT_BOUND] * 2
    ok = all(e <= b for e, b in zip(errors, bounds)) and deterministic
    name = f"{tuple(shape)} dim={channel_dim} {str(dtype)[6:]} {sharing} {config_name}"
    report(name, ok, "rel err y {:.1e}, dx {:.1e}, da {:.1e}, db {:.1e}; deterministic {}".format(*errors, deterministic))


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
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    print(f"# check_rational_cuda seed {seed}, {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    # the configurations the benchmark's sweep may pick as the next default, checked on the big cases
    configs = {
        "default": KernelConfig(), "previous": PREVIOUS_KERNEL_CONFIG,
        "prefetch": KernelConfig(backward_prefetch=1),
        "prefetch-512x16": KernelConfig(backward_tile=512, backward_row_tiles=16, backward_prefetch=1),
        "8warps-prefetch": KernelConfig(backward_tile=2048, num_warps=8, backward_prefetch=1),
    }
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
    for index, case in enumerate(cases):
        for config_name, config in configs.items():
            if config_name != "default" and (index > 1 or args.quick and config_name != "previous"):
                continue  # other configurations: both big cases (--quick: the previous one only, for time)
            guarded(f"{case} {config_name}", lambda: check_case(*case, config, config_name, seed + index))
    guarded("CUDA graph", check_cuda_graph)
    if not args.quick:
        guarded("compile sweep", check_compile_sweep)
    print(f"# {len(FAILURES)} failed: {FAILURES}" if FAILURES else "# all checks passed", flush=True)
    raise SystemExit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
