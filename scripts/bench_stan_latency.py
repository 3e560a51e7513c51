"""STAN size, per-window inference latency and peak memory (paper: 2.3M params, 45 ms, 180 MB).

One window = one 5 s multichannel EEG segment, batch size 1, as in continuous monitoring.
CPU: median/p90 wall time over ``--runs`` forward passes after warm-up, and the median process
CPU time per pass (less sensitive to other processes on a shared machine; the 1-minute load
average is recorded to show how shared it was); memory = process peak
RSS (``resource.getrusage``) before building the model and after inference, and their
difference.  CUDA (when available): CUDA-event timing and ``torch.cuda.max_memory_allocated``.

    python scripts/bench_stan_latency.py                      # paper-sized model, CPU (+ CUDA if present)
    python scripts/bench_stan_latency.py --model stan_tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import timm
import torch

import lightning_act.models.stan  # noqa: F401  (registers the stan_* factories with timm)


def peak_rss_mb() -> float:
    """Process high-water resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_cpu(model_name: str, runs: int, warmup: int, baseline: float) -> dict[str, float]:
    """``baseline``: the peak RSS before the process built its first model (a high-water mark read after a model
    was freed would already hold that model, and this one reuses its memory)."""
    model = timm.create_model(model_name, dropout=0.0).eval()
    x = torch.randn(1, model.in_chans, model.window_samples)
    times, cpu_times = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
            cpu_times.append((time.process_time() - cpu_start) * 1000.0)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "median_process_cpu_ms": statistics.median(cpu_times),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_model_mb": baseline,
        "rss_increase_mb": peak_rss_mb() - baseline,
        "threads": torch.get_num_threads(),
    }


def bench_cuda(model_name: str, runs: int, warmup: int) -> dict[str, float]:
    device = torch.device("cuda")
    model = timm.create_model(model_name, dropout=0.0).eval().to(device)
    x = torch.randn(1, model.in_chans, model.window_samples, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stan_base", help="timm name: stan_base (paper size) or stan_tiny")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    baseline = peak_rss_mb()
    model = timm.create_model(args.model)
    result = {
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": [1, model.in_chans, model.window_samples],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    del model
    result["cpu_bench"] = bench_cpu(args.model, args.runs, args.warmup, baseline)
    if torch.cuda.is_available():
        result["cuda_bench"] = bench_cuda(args.model, args.runs, args.warmup)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
