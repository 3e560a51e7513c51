"""Round 16's fixes of the benchmark and GPU-check scripts, each checked on the CPU in a few seconds."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def script(monkeypatch):
    """Import a script of ``scripts/`` by name (they import their siblings, so the folder goes on the path)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module


def test_capture_compile_bench_runs_the_hooks_of_the_tapped_model(script, monkeypatch, capsys):
    bench = script("bench_capture_compile")
    received = []
    receive = bench.MomentSink.receive
    monkeypatch.setattr(bench.MomentSink, "receive", lambda self, index, x: (received.append(index), receive(self, index, x)))
    monkeypatch.setattr(sys, "argv", ["bench_capture_compile.py", "--backend", "eager", "--rounds", "1", "--steps", "2",
                                      "--width", "16", "--depth", "2", "--batch", "2", "--tokens", "4"])
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default; the script turns it off
            bench.main()
    finally:
        torch._dynamo.reset()
    # observing: a warm-up and one round of 2 steps, 4 taps (2 blocks, 2 activations) each
    assert len(received) == 16
    assert "16 activations delivered to the sink" in capsys.readouterr().out


def test_rational_check_hears_the_mutation_warning(script, monkeypatch):
    check = script("check_rational_cuda")
    from torch._higher_order_ops import triton_kernel_wrap
    import torch._inductor.utils

    class StandIn(nn.Module):  # no kernel: the check's bookkeeping is under test
        def __init__(self, channels, groups, activation, implementation):
            super().__init__()
            self.weight_numerator, self.weight_denominator = nn.Parameter(torch.ones(6)), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight_numerator.sum() + self.weight_denominator.sum()

    def run_and_get_code(step, compiled, *args):  # what Inductor does when it cannot tell which arguments a kernel writes
        triton_kernel_wrap.log.warning("Encountered an exception in identify_accessed_tensors, assuming every input is mutated")
        return step(compiled._orig_mod, *args), []

    monkeypatch.setattr(check, "GroupRational", StandIn)
    monkeypatch.setattr(torch._inductor.utils, "run_and_get_code", run_and_get_code)
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "FAILURES", [])
    handlers = list(triton_kernel_wrap.log.handlers)
    check.check_compiled_launches((2,))
    assert check.FAILURES == ["kernels' written arguments identified (no defensive input copies)"]
    assert triton_kernel_wrap.log.handlers == handlers


def run_kat_check(tmp_path: Path, stand_in: str) -> subprocess.CompletedProcess:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "gpu_check_kat.sh", tmp_path / "scripts")
    python = tmp_path / "python"
    python.write_text(f"#!/usr/bin/env bash\n{stand_in}\n")
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)}
    return subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check_kat.sh"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_gpu_check_kat_exit_status_tells_a_failed_step(tmp_path):
    failing = run_kat_check(tmp_path, 'case "$*" in *check_rational_cuda.py\\ --quick*) exit 1 ;; esac; exit 0')
    assert "-- correctness: FAILED" in failing.stdout
    assert failing.returncode == 1


def test_gpu_check_kat_exit_status_zero_when_every_step_passes(tmp_path):
    passing = run_kat_check(tmp_path, "exit 0")
    assert passing.returncode == 0, passing.stdout


def test_alternate_with_an_odd_warmup_times_every_pair(script, monkeypatch, capsys):
    bench = script("bench_monitor_overhead")

    class Trainer:  # batch starts only: the pairs are counted from the timer's intervals
        def __init__(self, max_steps, callbacks, **kwargs):
            self.max_steps, self.callbacks = max_steps, callbacks

        def fit(self, module, *loaders):
            timers = [c for c in self.callbacks if isinstance(c, bench.StepTimer)]
            for index in range(self.max_steps):
                for timer in timers:
                    timer.on_train_batch_start(self, module, None, index)

    monkeypatch.setattr(bench.pl, "Trainer", Trainer)
    monkeypatch.setattr(sys, "argv", ["bench_monitor_overhead.py", "--small", "--alternate", "--only",
                                      "all but SensitiveNeurons", "--pairs", "3", "--warmup", "3", "--rounds", "1"])
    bench.main()
    assert "(3 pairs" in capsys.readouterr().out


def test_rational_sweep_and_full_check_cover_the_default(script, monkeypatch):
    bench, check = script("bench_rational"), script("check_rational_cuda")
    from lightning_act.nn.group_rational import PREVIOUS_KERNEL_CONFIG, KernelConfig

    assert tuple(KernelConfig()) in bench.SWEEP_CONFIGS and tuple(PREVIOUS_KERNEL_CONFIG) in bench.SWEEP_CONFIGS
    checked = []
    monkeypatch.setattr(check, "check_case", lambda *case: checked.append(case[5]))
    monkeypatch.setattr(check, "check_compiled_launches", lambda batches: None)
    monkeypatch.setattr(check, "DEVICE", "cuda")
    monkeypatch.setattr(check, "FAILURES", [])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "argv", ["check_rational_cuda.py", "--cpu-dry-run", "--seed", "0"])
    with pytest.raises(SystemExit):
        check.main()
    configs = list(checked[0].values())  # the full mode's big case
    assert {tuple(config) for config in configs} >= set(bench.SWEEP_CONFIGS)
    assert len(set(configs)) == len(configs)


def test_measure_enters_a_context_once_per_sample_outside_the_timed_calls(script):
    bench = script("bench_rational")
    state = {"inside": False, "entered": 0, "calls": [], }

    @contextlib.contextmanager
    def context():
        state["entered"] += 1
        state["inside"] = True
        yield
        state["inside"] = False

    times = bench.measure({"plain": lambda: None, "stubbed": lambda: state["calls"].append(state["inside"])}, 3, 5,
                          torch.device("cpu"), around={"stubbed": context})
    assert set(times) == {"plain", "stubbed"}
    assert state["entered"] == 1 + 3  # the warm-up, then once per sample
    assert len(state["calls"]) == 2 + 3 * 5 and all(state["calls"])


def test_stan_latency_rss_baseline_precedes_every_model(script, monkeypatch, tmp_path):
    bench = script("bench_stan_latency")
    built = []
    create_model = bench.timm.create_model
    monkeypatch.setattr(bench.timm, "create_model", lambda *args, **kwargs: (built.append(1), create_model(*args, **kwargs))[1])
    monkeypatch.setattr(bench, "peak_rss_mb", lambda: float(len(built)))  # "memory" = models built so far
    out = tmp_path / "stan.json"
    monkeypatch.setattr(sys, "argv", ["bench_stan_latency.py", "--model", "stan_tiny", "--runs", "1", "--warmup", "0",
                                      "--json", str(out)])
    bench.main()
    assert json.loads(out.read_text())["cpu_bench"]["rss_before_model_mb"] == 0.0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_collapse_peak_memory_is_not_hidden_by_memory_freed_before(script, monkeypatch, capsys):
    bench = script("bench_stat_kernels")
    test_matrix = bench.gaussian_test_matrix
    sketch_partials = bench.sketch_partials

    def freed_before(*args, **kwargs):  # 128 MiB touched and freed before the baseline
        torch.ones(2**24, dtype=torch.float64)
        return test_matrix(*args, **kwargs)

    def allocating(*args, **kwargs):  # 64 MiB touched by the measured code
        torch.ones(2**23, dtype=torch.float64)
        return sketch_partials(*args, **kwargs)

    monkeypatch.setattr(bench, "gaussian_test_matrix", freed_before)
    monkeypatch.setattr(bench, "sketch_partials", allocating)
    monkeypatch.setattr(sys, "argv", ["bench_stat_kernels.py", "--collapse", "--width", "64", "--rows", "8",
                                      "--collapse-rounds", "1"])
    bench.main()
    extra = float(capsys.readouterr().out.split("peak resident memory above the inputs: ")[1].split()[0])
    assert extra >= 60


def test_stat_kernels_check_mismatch_exits_non_zero(script, monkeypatch):
    bench = script("bench_stat_kernels")
    monkeypatch.setattr(bench, "check", lambda device, compiled: False)
    monkeypatch.setattr(sys, "argv", ["bench_stat_kernels.py", "--check", "--small", "--rounds", "1", "--iters", "1",
                                      "--no-compiled", "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == 1


def test_soak_with_fewer_steps_than_the_sampling_interval_reports(script, monkeypatch, capsys):
    soak = script("soak_monitors")
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(sys, "argv", ["soak_monitors.py", "--steps", "2", "--sample_every", "10", "--monitors",
                                      "ActivationSparsity"])
    assert soak.main() == 0
    assert "RSS growth: not measured (0 samples" in capsys.readouterr().out
