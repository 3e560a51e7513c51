"""Per tapped tensor: the statistics' cost against a copy (the memory-bandwidth floor), side by side.

For a ViT-S GELU output (128, 197, 1536) and a block output (128, 197, 384), both bf16 (``--small``: a
CPU-sized (16, 65, 768) / (16, 65, 192)), and for three statistic groups, each method is timed in
interleaved rounds (every round runs every method once, ``--iters`` calls each), and the printed ratio is
the median over rounds of (method time / copy time in the same round), with the min..max over rounds, and
likewise the speed-up over the current statistics (on a CPU the statistics are compute-bound, so the copy
ratio is large whatever the method; the speed-up is the comparable figure there):

- ``moments``: what ``ActivationStats`` + ``ActivationSparsity`` read (moments, zero count, non-finite);
- ``massive``: what ``MassiveActivations`` reads (per-sample max and median, top-k positions);
- ``all``: everything at once (one tensor tapped by all of them).

Methods: ``copy`` (``x.clone()``, the floor), ``current`` (the functions the monitors call today:
``moment_partials``, ``zero_partials``, ``block_magnitude`` + ``massive_partials_from_magnitude`` +
``topk_positions_from_magnitude``), ``fused`` (:func:`fused_statistics` eager fallback), ``compiled`` (the
fallback through ``torch.compile``; compile time excluded and printed), ``triton`` (CUDA only).

    OMP_NUM_THREADS=1 python scripts/bench_stat_kernels.py --small           # CPU
    python scripts/bench_stat_kernels.py                                     # GPU
    python scripts/bench_stat_kernels.py --check                             # GPU: fused vs float64 first
    python scripts/bench_stat_kernels.py --sweep --no-compiled               # GPU: Triton launch configurations
    OMP_NUM_THREADS=1 python scripts/bench_stat_kernels.py --collapse        # the 8192-wide collapse sketch

``--check`` compares every available implementation with a float64 computation on fresh random inputs
(several shapes and dtypes, NaN/inf, odd sizes) before timing, and exits non-zero on a mismatch (without timing);
on CUDA it also runs each implementation under ``torch.cuda.set_sync_debug_mode("error")``, so a host sync inside
the statistics (which would stall the training step at every tapped tensor) fails the check. ``--sweep`` times the
Triton kernels under several launch configurations (``lightning_act.stats.triton_fused`` constants), each
checked first against the eager fallback (which ``--check`` compares with float64). ``--eigh`` times the
spectra of ``DimensionalCollapse``'s flush on the device and on the host. ``--kernels`` sets a fused pass's wall time
per call (synchronised once per ``--iters`` calls) beside each kernel's device time (a profile of ``--iters`` calls per statistic group), to
tell which kernel, or the host, makes a pass cost more than the copy.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _profiling import device_kernel_times  # noqa: E402

from lightning_act.stats.covariance_sketch import gaussian_test_matrix, sketch_partials, sketch_rank_statistics  # noqa: E402
from lightning_act.stats.fused import (  # noqa: E402
    exact_median_is_cheaper,
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
from lightning_act.stats.histogram_median import histogram_median, log_magnitude_histogram  # noqa: E402
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
        methods = methods_for(x.device, not args.no_compiled)
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


def profile_kernels(name: str, x: torch.Tensor, args: argparse.Namespace) -> None:
    """Per statistic group, the fused pass's wall time per call (synchronised once per ``--iters`` calls) beside
    the device time of each kernel it launched, from one profile of ``--iters`` calls after a warm-up call."""
    method = "triton" if "triton" in methods_for(x.device, False) else "fused"
    for group in GROUPS:
        call(method, x, group)
        synchronize(x.device)
        wall = time_call(lambda: call(method, x, group), args.iters, x.device)
        if x.device.type != "cuda":  # no kernels to profile: the pass is host work throughout
            print(f"{name} {tuple(x.shape)} {x.dtype} [{group}] {method}: wall {1e3 * wall:.3f} ms per call")
            continue
        with torch.profiler.profile() as profiler:
            for _ in range(args.iters):
                call(method, x, group)
            synchronize(x.device)
        times, launches = device_kernel_times(profiler.events())
        busy = sum(times.values()) / args.iters
        print(f"{name} {tuple(x.shape)} {x.dtype} [{group}] {method}: wall {1e3 * wall:.3f} ms per call, "
              f"device busy {busy / 1e3:.3f} ms per call (sum of kernel times)")
        for kernel, total in times.most_common(8):
            print(f"  {total / args.iters:9.1f} us  x{launches[kernel] / args.iters:.0f}  {kernel[:90]}")


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
        "sample_max": ranked.amax(1), "column_max": ranked.amax(0), "ranked": ranked,
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
        bins = spec.median
        ranked = ref["ranked"]
        histogram_estimate = histogram_median(log_magnitude_histogram(x.float(), bins, dim=0), bins)
        # numpy's median, float64: what the PyTorch fallback gives for samples narrower than half the bins (round 25)
        exact = torch.from_numpy(np.median(ranked.cpu().numpy(), axis=1)).to(device)
        abs_threshold, ratio_threshold = spec.massive
        for implementation in implementations:
            narrow = implementation != "triton" and exact_median_is_cheaper(ranked.shape[1], bins)
            expected_median = exact if narrow else histogram_estimate
            expected_count = ((ranked > abs_threshold) & (ranked >= ratio_threshold * expected_median[:, None])).sum(1)
            expected_count = torch.where(torch.isnan(expected_median), expected_median, expected_count.double())
            try:
                if device.type == "cuda":
                    fused_statistics(x, spec, implementation)  # first call: compilation and cached constants
                    torch.cuda.synchronize(device)
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    stats = fused_statistics(x, spec, implementation)
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
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
                    "median": float((~torch.isclose(stats.sample_median, expected_median, rtol=0, atol=0,
                                                    equal_nan=True)).sum()),
                    "massive_count": float((~torch.isclose(stats.sample_massive_count, expected_count, rtol=0, atol=0,
                                                           equal_nan=True)).sum()),
                }
                good = (
                    errors["nonfinite"] == errors["zeros"] == errors["abs_max"] == errors["magnitude_max"] == 0
                    and errors["sample_max"] == errors["column_max"] == errors["median"] == errors["massive_count"] == 0
                    and abs(errors["sum"]) <= 1e-6 and abs(errors["sq_sum"]) <= 1e-6 and abs(errors["abs_sum"]) <= 1e-6
                )
            except Exception as error:  # noqa: BLE001 - a check script reports every failure and goes on
                good, errors = False, {"error": repr(error)}
            ok &= good
            print(f"  {'ok ' if good else 'BAD'} {implementation:8s} {shape} {dtype}: {errors}")
    return ok


# --------------------------------------------------------------------------------------------- sweep
# (BLOCK, INNER, NUM_WARPS, COLUMN_BLOCK, ROWS_PER_PROGRAM) of lightning_act.stats.triton_fused; the first is the default.
SWEEP_NAMES = ("BLOCK", "INNER", "NUM_WARPS", "COLUMN_BLOCK", "ROWS_PER_PROGRAM")
SWEEP = [(1024, 8, 4, 1024, 8), (2048, 4, 4, 1024, 8), (1024, 8, 8, 1024, 8), (512, 16, 4, 1024, 8),
         (2048, 4, 8, 2048, 16), (4096, 2, 8, 1024, 8), (1024, 8, 4, 512, 4), (1024, 8, 4, 2048, 16)]


def same_statistics(a, b) -> bool:
    """Two FusedStats agree: sums to 1e-6 relative, every count, maximum, median and per-position maximum exactly."""
    pairs = [(a.maxima, b.maxima), (a.sample_magnitude_max, b.sample_magnitude_max), (a.sample_median, b.sample_median),
             (a.sample_massive_count, b.sample_massive_count), (a.column_max, b.column_max)]
    exact = all((x is None and y is None) or torch.equal(torch.nan_to_num(x, nan=-1.0), torch.nan_to_num(y, nan=-1.0))
                for x, y in pairs)
    return exact and bool(torch.allclose(a.sums, b.sums, rtol=1e-6, atol=0))


def sweep(args: argparse.Namespace, device: torch.device) -> None:
    """Time the Triton kernels under each launch configuration, interleaved round by round, after checking each
    configuration's statistics against the eager fallback (itself checked against float64 by ``--check``)."""
    from lightning_act.stats import triton_fused

    default = tuple(getattr(triton_fused, name) for name in SWEEP_NAMES)
    generator = torch.Generator().manual_seed(1)
    batch, tokens, width = (16, 65, 192) if args.small else (128, 197, 384)
    tensors = {name: torch.randn(batch, tokens, features, generator=generator).to(device=device, dtype=torch.bfloat16)
               for name, features in (("gelu", 4 * width), ("block", width))}
    cases = [("gelu", "moments"), ("block", "massive"), ("gelu", "all")]
    reference_stats = {case: fused_statistics(tensors[case[0]], GROUPS[case[1]], "torch") for case in cases}

    def apply(config: tuple[int, ...]) -> None:
        for name, value in zip(SWEEP_NAMES, config):
            setattr(triton_fused, name, value)

    usable = []
    for config in SWEEP:
        apply(config)
        try:
            good = all(same_statistics(fused_statistics(tensors[t], GROUPS[g], "triton"), reference_stats[(t, g)])
                       for t, g in cases)
        except Exception as error:  # noqa: BLE001 - report and skip a configuration that does not launch
            print(f"  sweep {config}: {error!r}")
            good = False
        print(f"  sweep {dict(zip(SWEEP_NAMES, config))}: {'ok' if good else 'MISMATCH (not timed)'}")
        if good:
            usable.append(config)
    times = {(config, case): [] for config in usable for case in cases}
    copies = {name: [] for name in tensors}
    for _ in range(args.rounds):
        for name, x in tensors.items():
            copies[name].append(time_call(x.clone, args.iters, device))
        for config in usable:
            apply(config)
            for t, g in cases:
                times[(config, (t, g))].append(time_call(lambda: fused(tensors[t], g, "triton"), args.iters, device))
    apply(default)
    print("Triton launch configurations (median ms per call over rounds; x copy of the same tensor):")
    print("  " + " ".join(f"{n:>16s}" for n in SWEEP_NAMES) + "".join(f"  {t + ' ' + g:>22s}" for t, g in cases))
    for config in usable:
        cells = []
        for t, g in cases:
            ms = statistics.median(times[(config, (t, g))]) * 1e3
            cells.append(f"{ms:8.3f} ms ({ms / (statistics.median(copies[t]) * 1e3):5.1f}x)")
        print("  " + " ".join(f"{v:16d}" for v in config) + "".join(f"  {c:>22s}" for c in cells))


# ----------------------------------------------------------------------------------------------- eigh
def bench_eigh(args: argparse.Namespace, device: torch.device) -> None:
    """DimensionalCollapse's flush: the spectra of ``--eigh-counts`` (d, d) float64 scatter matrices (13: a ViT-S's
    taps), one call per matrix vs one batched call on ``device``, vs the host (batched, and one thread per matrix);
    on CUDA also in float32, through MAGMA, with the Triton eigensolver (``DimensionalCollapse(eigensolver=
    "triton")``) and with ``"auto"``, whose choice (``auto_eigensolver``'s cost model) the row names: one count and
    width on each side of a predicted crossover checks that model. Each method's erank and PR are compared with the
    host float64 solver's, on a well-spread spectrum (Gaussian rows) and a collapsed one (a power law)."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_act.stats.spectrum import auto_eigensolver, rank_statistics, symmetric_eigenvalues

    if device.type == "cuda" and triton_available():
        from lightning_act.stats.triton_eigen import tridiagonal_bisection_eigenvalues

    generator = torch.Generator().manual_seed(0)
    pool = ThreadPoolExecutor(max_workers=max(args.eigh_counts))
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0

    def float32(matrices: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(matrices.float()).double()

    def magma(matrices: torch.Tensor) -> torch.Tensor:
        previous = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library("magma")
        try:
            return torch.linalg.eigvalsh(matrices)
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)

    for count, d in itertools.product(args.eigh_counts, args.eigh_widths):
        # feature variances: all equal, or falling as a power law (a collapsed layer)
        variances = {
            "spread": torch.ones(d, dtype=torch.float64),
            "collapsed": torch.arange(1, d + 1, dtype=torch.float64) ** -2.0,
        }
        auto_choice = auto_eigensolver(device.type, count, d, multiprocessors)
        for spectrum_name, variance in variances.items():
            rows = torch.randn(count, 2 * d, d, generator=generator, dtype=torch.float64) * variance.sqrt()
            host = rows.transpose(1, 2) @ rows
            matrices = host.to(device)
            methods: dict[str, Callable[[], torch.Tensor]] = {
                "device, one call per matrix": lambda: torch.stack([torch.linalg.eigvalsh(m) for m in matrices]),
                "device, one batched call": lambda: torch.linalg.eigvalsh(matrices),
            }
            if not args.eigh_device_only:
                methods["host copy + batched call"] = lambda: torch.linalg.eigvalsh(matrices.cpu())
                methods["host copy + a thread per matrix"] = lambda: torch.stack(
                    list(pool.map(torch.linalg.eigvalsh, matrices.cpu().unbind()))
                )
            if device.type == "cuda":
                if not args.eigh_device_only:
                    methods["device, batched, float32"] = lambda: float32(matrices)
                if hasattr(torch.backends.cuda, "preferred_linalg_library") and not args.eigh_device_only:
                    methods["device, batched, MAGMA"] = lambda: magma(matrices)
                if triton_available():
                    methods["device, Triton (eigensolver='triton')"] = (
                        lambda: tridiagonal_bisection_eigenvalues(matrices)
                    )
                methods[f"device, eigensolver='auto' ({auto_choice})"] = (
                    lambda: symmetric_eigenvalues(matrices, "auto")
                )
            reference = rank_statistics(torch.linalg.eigvalsh(host).clamp_min(0), d)
            errors: dict[str, tuple[float, float]] = {}
            times: dict[str, list[float]] = {name: [] for name in methods}
            for name, method in list(methods.items()):
                try:
                    ranks = rank_statistics(method().cpu().clamp_min(0), d)  # warm-up, and the accuracy
                except Exception as error:  # e.g. a build without MAGMA, or a kernel that fails to compile
                    print(f"  {name}: unavailable ({(str(error).splitlines() or [type(error).__name__])[0]})")
                    FAILED.append(name)
                    del methods[name], times[name]
                    continue
                relative = ((ranks - reference).abs() / reference.abs())[:, :2].amax(0)
                errors[name] = (float(relative[0]), float(relative[1]))
            for _ in range(args.rounds):
                for name, method in methods.items():
                    times[name].append(time_call(method, 1, device))
            print(f"eigvalsh of {count} ({d}, {d}) float64 matrices, {spectrum_name} spectrum (erank "
                  f"{float(reference[0, 0]):.1f}), on {device}, median of {args.rounds} rounds; max relative error "
                  f"of erank / PR against the host float64 solver:")
            for name in methods:
                print(f"  {name:40s} {statistics.median(times[name]) * 1e3:9.2f} ms   "
                      f"{errors[name][0]:9.2e} / {errors[name][1]:9.2e}")


# ------------------------------------------------------------------------------------------ collapse
def proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss_mib() -> float:
    """Reset the process's peak resident memory (``VmHWM``) to the current one and return it, in MiB (Linux): a peak
    read afterwards is the later code's own. ``ru_maxrss`` cannot be reset, and memory freed before it (the inputs'
    construction, the reference matmul) would hide the later code's peak in it."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return proc_status_mib("VmRSS")


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
    baseline = reset_peak_rss_mib()
    for round_index in range(args.collapse_rounds):
        start = time.perf_counter()
        partials = sketch_partials(rows, omega)
        middle = time.perf_counter()
        stats = sketch_rank_statistics(partials, d, k)
        end = time.perf_counter()
        print(f"  round {round_index}: partials {middle - start:.2f} s + flush {end - middle:.2f} s = {end - start:.2f} s "
              f"per due step; erank {float(stats['erank']):.2f}, pr {float(stats['pr']):.2f}")
    extra = proc_status_mib("VmHWM") - baseline
    print(f"  peak resident memory above the inputs: {extra:.0f} MiB (the full covariance path needs a "
          f"{d * d * 8 / 2**20:.0f} MiB float64 partial alone)")


#: The methods that could not run (the run goes on; it exits 1 at the end).
FAILED: list[str] = []


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
    parser.add_argument("--sweep", action="store_true", help="only the Triton launch-configuration sweep")
    parser.add_argument("--eigh", action="store_true", help="only the eigensolver timings of DimensionalCollapse's flush")
    parser.add_argument("--eigh-widths", type=lambda text: [int(w) for w in text.split(",")], default=[384, 1536],
                        help="matrix sizes of --eigh, comma-separated")
    parser.add_argument("--eigh-device-only", action="store_true",
                        help="--eigh: only cuSOLVER float64, the Triton solver and 'auto' (no host, float32, MAGMA)")
    parser.add_argument("--eigh-counts", type=lambda text: [int(c) for c in text.split(",")], default=[13],
                        help="matrices per solve of --eigh (13: a ViT-S's taps), comma-separated")
    parser.add_argument("--kernels", action="store_true",
                        help="only the fused pass's host and per-kernel device time per call (a profile)")
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
        if args.check_only or not ok:  # a mismatch ends the run (no timing of a wrong implementation)
            sys.exit(0 if ok else 1)
    args.iters = args.iters or (20 if device.type == "cuda" else 3)
    if args.sweep:
        sweep(args, device)
        return
    if args.eigh:
        bench_eigh(args, device)
        return
    batch, tokens, width = (16, 65, 192) if args.small else (128, 197, 384)
    generator = torch.Generator().manual_seed(0)
    for name, features in (("gelu", 4 * width), ("block", width)):
        x = torch.randn(batch, tokens, features, generator=generator).to(device=device, dtype=torch.bfloat16)
        (profile_kernels if args.kernels else bench_tensor)(name, x, args)


if __name__ == "__main__":
    main()
    if FAILED:  # the other rows were measured; the step still reads as failed
        print(f"FAILED: {', '.join(dict.fromkeys(FAILED))}", flush=True)
        sys.exit(1)
