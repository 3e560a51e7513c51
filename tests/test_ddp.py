"""Monitor statistics under DDP (2 CPU processes, gloo) equal a one-process run over the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _toy import toy_dataset

SCRIPT = Path(__file__).with_name("ddp_fit.py")
MONITORS = ["ActivationStats", "ActivationSparsity", "MassiveActivations", "DimensionalCollapse", "SensitiveNeurons"]


def run(mode, out, tmp_path):
    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])  # this checkout's lightning_act
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out), *MONITORS], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    return run("single", tmp_path / "single.json", tmp_path), run("ddp", tmp_path / "ddp.json", tmp_path)


def test_ddp_statistics_equal_single_process(runs):
    single, ddp = runs
    assert set(single["history"]) == set(ddp["history"])
    for monitor in MONITORS:
        prefix = {"ActivationStats": "act", "ActivationSparsity": "sparsity", "MassiveActivations": "massive",
                  "DimensionalCollapse": "collapse", "SensitiveNeurons": "sensitive"}[monitor]
        assert any(k.startswith(prefix + "/") for k in single["history"]), f"{monitor} logged nothing"
    for key, series in single["history"].items():
        other = ddp["history"][key]
        assert series["steps"] == other["steps"], key
        np.testing.assert_allclose(other["values"], series["values"], rtol=2e-4, atol=1e-6, err_msg=key)
    counts = single["history"]["act/net.blocks.0/count"]["values"]
    assert counts == ddp["history"]["act/net.blocks.0/count"]["values"] == [16 * 4 * 16] * 2


def test_each_flush_uses_a_few_packed_collectives(runs):
    _, ddp = runs
    calls, flushes = ddp["collectives"]["calls"], ddp["collectives"]["flushes"]
    assert flushes >= 2 * 2
    # sum + max + gather per flush, plus one layout sync per monitor on its first flush
    assert calls <= 3 * flushes + len(MONITORS)


def run_script(name, tmp_path, port_offset):
    """Run ``tests/<name>`` (2 DDP processes) with its output file; its JSON."""
    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])
    port = 29500 + (os.getpid() + port_offset) % 1000
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.with_name(name)), str(out)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert out.is_file(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_taps_first_run_late_on_different_ranks_are_neither_mixed_nor_a_crash(tmp_path):
    # Before: the ranks agreed on buffer sizes at the first flush only, when neither expert had run: rank 0's `a`
    # was summed into rank 1's `b` (same size), and a tap run on one rank only aborted gloo (sizes differed).
    result = run_script("ddp_late_taps.py", tmp_path, 7)
    for name in ("a", "b"):
        history = result["history"][f"sparsity/net.{name}/zero_frac"]
        assert history["steps"] == [2, 4]
        for step, value in zip(history["steps"], history["values"]):
            zeros, total = result["zeros"][f"{name}/{step}"]
            assert value == pytest.approx(zeros / total, abs=1e-12)
    # a (B, D) tap run on rank 0 only: rank 1 read its top-k as if it had tokens (top{j}_token keys rank 0 lacks)
    on_rank_0, on_rank_1 = result["massive_keys"]
    assert on_rank_1 == on_rank_0 and "massive/net.pooled/top0_feature" in on_rank_0
    assert not any("token" in key for key in on_rank_0)


def test_sensitive_neurons_with_a_self_sharding_validation_loader(tmp_path):
    # The 13 validation examples, in order, as one process takes them. Before: 14, example 0 twice (the sampler's
    # padding). With forward_fn= the ranks' batches were not gathered: rank 0's shard (7 examples) was the set.
    result = run_script("ddp_sensitive_sharded.py", tmp_path, 13)
    expected = toy_dataset(13, seed=1).tensors[0].flatten(1).numpy()
    np.testing.assert_array_equal(np.array(result["tracking"]), expected)
    assert "gives each rank other batches" in result["forward_fn"]


def test_tracking_inputs_that_differ_between_ranks_are_one_line(tmp_path):
    # Before: rank 0's embeddings were broadcast into rank 1's buffer of other rows (gloo took a (16, D) tensor into a
    # (24, D) one silently), and a tap found routed on one rank only hung the fit.
    result = run_script("ddp_tracking_inputs.py", tmp_path, 17)
    assert "the tensor differs between the ranks" in result["error"]


def test_an_epoch_end_barrier_under_a_rank_zero_progress_bar_does_not_deadlock(tmp_path):
    """Before: the progress bar computed the epoch's torchmetrics accuracy (a collective) on rank 0 alone, which met
    the other rank's barrier (LastCheckpoint's save, the CLI's default): every DDP fit of the CLI hung at epoch 1."""
    import signal

    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + (os.getpid() + 23) % 1000))
    out = tmp_path / "ended.txt"
    proc = subprocess.Popen([sys.executable, str(SCRIPT.with_name("ddp_epoch_end.py")), str(out)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks
        _, stderr = proc.communicate()
    ended = out.read_text().splitlines() if out.is_file() else []
    assert ended == ["EpochLineProgress barrier 2", "TQDMProgressBar LastCheckpoint 2"], stderr[-3000:]


def test_a_sharded_padding_collate_gives_every_rank_the_dataset_examples_once(tmp_path):
    # Before: the ranks' inputs, padded to 9 and 8 tokens, were all-gathered as one shape: gloo aborted the fit.
    result = run_script("ddp_sensitive_padded.py", tmp_path, 29)
    first, second = result["ranks"]
    assert first == second
    # Each rank's batch of 4 kept whole with its own padding; rank 1's (1, 3, 5, then 0 again) cut before the repeat.
    assert first["shapes"] == [[4, 8], [3, 9]]
    import torch
    from ddp_sensitive_padded import sequences

    weights = {name: np.array(value) for name, value in result["weights"].items()}
    order = [0, 2, 4, 6, 1, 3, 5]  # rank 0's examples, then rank 1's: the 7 examples, each once
    expected = np.stack([weights["emb.weight"][sequences()[i].numpy()].mean(0) for i in order])
    expected = expected @ weights["pool.weight"].T + weights["pool.bias"]
    np.testing.assert_allclose(np.array(first["embedding"]), expected, rtol=1e-5, atol=1e-6)
    assert len(first["v_mean"]) == 1 and torch.isfinite(torch.tensor(first["v_mean"])).all()


def test_a_massive_probe_over_a_sharded_loader_counts_each_example_once(tmp_path):
    # Before: example 0, the DistributedSampler's padding of rank 1's shard, was probed twice: count 896, not 832.
    from ddp_probe_padding import EXAMPLES, probe_statistics

    ddp = run_script("ddp_probe_padding.py", tmp_path, 31)
    single = probe_statistics(devices=1)
    assert ddp["massive/net.blocks.0/count"] == single["massive/net.blocks.0/count"] == EXAMPLES * 4 * 16
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
