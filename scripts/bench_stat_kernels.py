"""Per tapped tensor: the statistics' cost against a copy (the memory-bandwidth floor), side by side.

For a ViT-S GELU output (128, 197, 1536) and a block output (128, 197, 384), both bf16 (``--small``: a
CPU-sized (16, 65, 768) / (16, 65, 192)), and for three statistic groups, each method is timed in
interleaved rounds (every round runs every method once, ``--iters`` calls each), and the printed ratio is
the median over rounds of (method time / copy time in the same round), with the min..max over rounds, and
likewise the speed-up over the current statistics (on a CPU the statistics are compute-bound, so the copy
ratio is large whatever the method; the speed-up is the comparable figure there):

- ``moments``: what ``ActivationStats`` + ``ActivationSparsity`` read (moments, zero count, non-finite);
- ``massive``: what ``MassiveActivations`` reads (per-sample max and median, top-k positions);
- ``all``: everything at once (one tensor tapped by all of them);
- ``massive_coarse``: ``massive`` with a 1024-bin histogram (32 bins per octave) instead of 2048.

Methods: ``copy`` (``x.clone()``, the floor), ``current`` (the functions the monitors call today:
``moment_partials``, ``zero_partials``, ``block_magnitude`` + ``massive_partials_from_magnitude`` +
``topk_positions_from_magnitude``), ``fused`` (:func:`fused_statistics` eager fallback), ``compiled`` (the
fallback through ``torch.compile``; compile time excluded and printed), ``triton`` (CUDA only).

    OMP_NUM_THREADS=1 python scripts/bench_stat_kernels.py --small           # CPU
    python scripts/bench_stat_kernels.py                                     # GPU
    python scripts/bench_stat_kernels.py --check                             # GPU: fused vs float64 first
    OMP_NUM_THREADS=1 python scripts/bench_stat_kernels.py --collapse        # the 8192-wide collapse sketch

``--check`` compares every available implementation with a float64 computation on fresh random inputs
(several shapes and dtypes, NaN/inf, odd sizes) before timing, and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_act.stats.covariance_sketch import gaussian_test_matrix, sketch_partials, sketch_rank_statistics  # noqa: E402
from lightning_act.stats.fused import (  # noqa: E402
    fused_statistics,
    massive_partials_from,
    massive_spec,
    moment_partials_from,
    moment_spec,
    topk_positions_from,
    triton_available,
    zero_partials_from,
    zero_spec,
)
from lightning_act.stats.histogram_median import LogMagnitudeBins, log_magnitude_histogram  # noqa: E402
from lightning_act.stats.massive import (  # noqa: E402
    block_magnitude,
    massive_partials_from_magnitude,
    topk_positions_from_magnitude,
)
from lightning_act.stats.moments import moment_partials  # noqa: E402
from lightning_act.stats.sparsity import zero_partials  # noqa: E402

TOP_K = 3
GROUPS = {
    "moments": moment_spec(0.0).union(zero_spec(0.0)),
    "massive": massive_spec(),
}
GROUPS["all"] = GROUPS["moments"].union(GROUPS["massive"])
# The histogram's cost grows with its bins: half the bins (bound 3.1% instead of 1.6%) for comparison.
GROUPS["massive_coarse"] = massive_spec(LogMagnitudeBins(sub_bits=5, size=1024))


def current(x: torch.Tensor, group: str) -> list[torch.Tensor]:
    """The statistics the monitors compute today, with the functions they call."""
    out: list[torch.Tensor] = []
    if group in ("moments", "all"):
        out += [*moment_partials(x, 0.0), zero_partials(x, 0.0)]
    if group != "moments":
        magnitude = block_magnitude(x)
        out += [*massive_partials_from_magnitude(magnitude), topk_positions_from_magnitude(magnitude, TOP_K)]
    return out


def fused(x: torch.Tensor, group: str, implementation: str) -> list[torch.Tensor]:
    """The same partials from one fused pass."""
    stats = fused_statistics(x, GROUPS[group], implementation)
    out: list[torch.Tensor] = []
    if group in ("moments", "all"):
        out += [*moment_partials_from(stats, 0.0), zero_partials_from(stats, 0.0)]
    if group != "moments":
        out += [*massive_partials_from(stats), topk_positions_from(stats, TOP_K)]
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Mean seconds per call over ``iters`` calls (synchronised once at each end)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def methods_for(device: torch.device, with_compiled: bool) -> list[str]:
    names = ["copy", "current", "fused"]
    if with_compiled:
        names.append("compiled")
    if device.type == "cuda" and triton_available():
        names.append("triton")
    return names


def call(method: str, x: torch.Tensor, group: str) -> object:
    if method == "copy":
        return x.clone()
    if method == "current":
        return current(x, group)
    return fused(x, group, {"fused": "torch"}.get(method, method))


def bench_tensor(name: str, x: torch.Tensor, args: argparse.Namespace) -> None:
    for group in GROUPS:
        methods = methods_for(x.device, not args.no_compiled and group != "massive_coarse")
        for method in methods:  # warm-up (and compilation, timed separately)
            start = time.perf_counter()
            call(method, x, group)
            synchronize(x.device)
            if method == "compiled":
                print(f"  [{name} {group}] compile + first call {time.perf_counter() - start:.1f} s")
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                times[method].append(time_call(lambda: call(method, x, group), args.iters, x.device))
        print(f"{name} {tuple(x.shape)} {x.dtype} [{group}]")
        for method in methods:
            ratios = [t / c for t, c in zip(times[method], times["copy"])]
            speedups = [c / t for t, c in zip(times[method], times["current"])]
            print(
                f"  {method:9s} {1e3 * statistics.median(times[method]):9.3f} ms   "
                f"x copy {statistics.median(ratios):8.2f} ({min(ratios):.2f}..{max(ratios):.2f})   "
                f"speed-up over current {statistics.median(speedups):6.2f} ({min(speedups):.2f}..{max(speedups):.2f})"
            )


# --------------------------------------------------------------------------------------------- checks
def reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 statistics with plain torch ops, independent of the fused code paths."""
    v = x.double()
    rows = v.reshape(v.shape[0], -1)
    mag = rows.abs()
    finite = torch.isfinite(rows)
    clean = torch.where(finite, rows, torch.zeros_like(rows))
    ranked = torch.where(torch.isnan(mag), torch.full_like(mag, float("inf")), mag)
    return {
        "nonfinite": (~finite).sum().double(), "zeros": (finite & (mag <= 0)).sum().double(),
        "sum": clean.sum(), "sq_sum": clean.square().sum(), "abs_sum": clean.abs().sum(),
        "abs_max": torch.where(finite, mag, torch.zeros_like(mag)).max(), "magnitude_max": ranked.max(),
        "sample_max": ranked.amax(1), "column_max": ranked.amax(0),
    }


def check(device: torch.device, with_compiled: bool) -> bool:
    """Every implementation vs float64 on fresh random inputs; prints one line per case, returns success."""
    seed = int(time.time()) % 100_000
    generator = torch.Generator().manual_seed(seed)
    print(f"check: seed {seed}")
    spec = GROUPS["all"]
    implementations = ["torch"] + (["compiled"] if with_compiled else [])
    if device.type == "cuda" and triton_available():
        implementations.append("triton")
    shapes = [((128, 197, 384), torch.bfloat16), ((64, 197, 1536), torch.bfloat16), ((7, 13, 129), torch.float16),
              ((3, 1, 100_003), torch.float32), ((5, 64, 9, 9), torch.float32), ((1, 1), torch.bfloat16)]
    ok = True
    for shape, dtype in shapes:
        x = (torch.randn(shape, generator=generator) * torch.rand((), generator=generator) * 10).to(dtype)
        flat = x.view(-1)
        n = flat.numel()
        for value in (float("nan"), float("inf"), float("-inf"), 0.0, 5000.0):
            flat[int(torch.randint(n, (), generator=generator))] = value
        x = x.to(device)
        ref = reference(x)
        expected_hist = log_magnitude_histogram(x.float(), spec.histogram, dim=0)
        for implementation in implementations:
            try:
                stats = fused_statistics(x, spec, implementation)
                scale = float(ref["abs_sum"]) + 1e-30
                errors = {
                    "nonfinite": float(stats.value("nonfinite") - ref["nonfinite"]),
                    "zeros": float(stats.at_most(0.0) - ref["zeros"]),
                    "sum": float((stats.value("sum") - ref["sum"]).abs()) / scale,
                    "sq_sum": float((stats.value("sq_sum") / ref["sq_sum"].clamp_min(1e-30)) - 1),
                    "abs_sum": float((stats.value("abs_sum") / ref["abs_sum"].clamp_min(1e-30)) - 1),
                    "abs_max": float(stats.value("abs_max") - ref["abs_max"]),
                    "magnitude_max": float(stats.value("magnitude_max") != ref["magnitude_max"]),
                    "sample_max": float((stats.sample_magnitude_max != ref["sample_max"]).sum()),
                    "column_max": float((stats.column_max.double() != ref["column_max"]).sum()),
                    "histogram": float((stats.sample_histogram != expected_hist).sum()),
                }
                good = (
                    errors["nonfinite"] == errors["zeros"] == errors["abs_max"] == errors["magnitude_max"] == 0
                    and errors["sample_max"] == errors["column_max"] == errors["histogram"] == 0
                    and abs(errors["sum"]) <= 1e-6 and abs(errors["sq_sum"]) <= 1e-6 and abs(errors["abs_sum"]) <= 1e-6
                )
            except Exception as error:  # noqa: BLE001 - a check script reports every failure and goes on
                good, errors = False, {"error": repr(error)}
            ok &= good
            print(f"  {'ok ' if good else 'BAD'} {implementation:8s} {shape} {dtype}: {errors}")
    return ok


# ------------------------------------------------------------------------------------------ collapse
def bench_collapse(args: argparse.Namespace) -> None:
    """One due step of DimensionalCollapse on a wide tap with the sketch: partials of one forward + flush."""
    d, n, k = args.width, args.rows, args.rows + 16
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, n, generator=generator))[0]
    rows = ((torch.randn(n, n, generator=generator) * torch.arange(1, n + 1) ** -0.5) @ basis.T + 1.0).float()
    omega = gaussian_test_matrix(d, k, seed=0)
    a, b = torch.randn(n, d, dtype=torch.float64), torch.randn(d, k, dtype=torch.float64)
    start = time.perf_counter()
    a @ b
    gemm = time.perf_counter() - start
    print(f"collapse sketch: d={d}, rows={n}, k={k}; reference float64 {n}x{d}x{k} matmul: {gemm:.2f} s "
          f"({2 * n * d * k / gemm / 1e9:.1f} GFLOP/s on this host now)")
    del a, b
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for round_index in range(args.collapse_rounds):
        start = time.perf_counter()
        partials = sketch_partials(rows, omega)
        middle = time.perf_counter()
        stats = sketch_rank_statistics(partials, d, k)
        end = time.perf_counter()
        print(f"  round {round_index}: partials {middle - start:.2f} s + flush {end - middle:.2f} s = {end - start:.2f} s "
              f"per due step; erank {float(stats['erank']):.2f}, pr {float(stats['pr']):.2f}")
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    print(f"  peak resident memory above the inputs: {extra:.0f} MiB (the full covariance path needs a "
          f"{d * d * 8 / 2**20:.0f} MiB float64 partial alone)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized tensors (16, 65, 768) / (16, 65, 192)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=None, help="calls per method per round (default 20 GPU, 3 CPU)")
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch.compile'd fallback")
    parser.add_argument("--check", action="store_true", help="first check every implementation against float64")
    parser.add_argument("--check-only", action="store_true", help="only the check")
    parser.add_argument("--collapse", action="store_true", help="only the wide-layer DimensionalCollapse sketch")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--collapse-rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    # Every (statistic group, shape) is one compiled entry here; a monitor has a handful.
    torch._dynamo.config.recompile_limit = 64
    print(f"torch {torch.__version__}, python {platform.python_version()}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}")
    if args.collapse:
        bench_collapse(args)
        return
    if args.check or args.check_only:
        ok = check(device, not args.no_compiled)
        print("check:", "all ok" if ok else "MISMATCH")
        if args.check_only:
            sys.exit(0 if ok else 1)
    args.iters = args.iters or (20 if device.type == "cuda" else 3)
    batch, tokens, width = (16, 65, 192) if args.small else (128, 197, 384)
    generator = torch.Generator().manual_seed(0)
    for name, features in (("gelu", 4 * width), ("block", width)):
        x = torch.randn(batch, tokens, features, generator=generator).to(device=device, dtype=torch.bfloat16)
        bench_tensor(name, x, args)


if __name__ == "__main__":
    main()
