"""Monitor statistics under DDP (2 CPU processes, gloo) equal a one-process run over the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _toy import toy_dataset
from ddp_fit import MONITORS

SCRIPT = Path(__file__).with_name("ddp_fit.py")


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
def single(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    return run("single", tmp_path / "single.json", tmp_path)


@pytest.fixture
def runs(single, ddp_scenario):
    return single, ddp_scenario.json()


@pytest.mark.ddp_scenario("fit")
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


@pytest.mark.ddp_scenario("fit")
def test_each_flush_uses_a_few_packed_collectives(runs):
    _, ddp = runs
    calls, flushes = ddp["collectives"]["calls"], ddp["collectives"]["flushes"]
    assert flushes >= 2 * 2
    # sum + max + gather per flush, plus one layout sync per monitor on its first flush (and two for
    # DimensionalCollapse's shared reference rows)
    assert calls <= 3 * flushes + len(MONITORS) + 2


@pytest.mark.ddp_scenario("late_taps")
def test_taps_first_run_late_on_different_ranks_are_neither_mixed_nor_a_crash(ddp_scenario):
    # Before: the ranks agreed on buffer sizes at the first flush only, when neither expert had run: rank 0's `a`
    # was summed into rank 1's `b` (same size), and a tap run on one rank only aborted gloo (sizes differed).
    result = ddp_scenario.json()
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


@pytest.mark.ddp_scenario("sensitive_sharded")
def test_sensitive_neurons_with_a_self_sharding_validation_loader(ddp_scenario):
    # The 13 validation examples, in order, as one process takes them. Before: 14, example 0 twice (the sampler's
    # padding). With forward_fn= the ranks' batches were not gathered: rank 0's shard (7 examples) was the set.
    result = ddp_scenario.json()
    expected = toy_dataset(13, seed=1).tensors[0].flatten(1).numpy()
    np.testing.assert_array_equal(np.array(result["tracking"]), expected)
    assert "gives each rank other batches" in result["forward_fn"]


@pytest.mark.ddp_scenario("tracking_inputs")
def test_tracking_inputs_that_differ_between_ranks_are_one_line(ddp_scenario):
    # Before: rank 0's embeddings were broadcast into rank 1's buffer of other rows (gloo took a (16, D) tensor into a
    # (24, D) one silently), and a tap found routed on one rank only hung the fit.
    result = ddp_scenario.json()
    assert "the tensor differs between the ranks" in result["error"]


@pytest.mark.ddp_scenario("epoch_end")
def test_an_epoch_end_barrier_under_a_rank_zero_progress_bar_does_not_deadlock(ddp_scenario):
    """Before: the progress bar computed the epoch's torchmetrics accuracy (a collective) on rank 0 alone, which met
    the other rank's barrier (LastCheckpoint's save, the CLI's default): every DDP fit of the CLI hung at epoch 1."""
    out = ddp_scenario.directory / "out"
    ended = out.read_text().splitlines() if out.is_file() else []
    assert ended == ["EpochLineProgress barrier 2", "TQDMProgressBar LastCheckpoint 2"], ddp_scenario.stderr[-3000:]


@pytest.mark.ddp_scenario("sensitive_padded")
def test_a_sharded_padding_collate_gives_every_rank_the_dataset_examples_once(ddp_scenario):
    # Before: the ranks' inputs, padded to 9 and 8 tokens, were all-gathered as one shape: gloo aborted the fit.
    result = ddp_scenario.json()
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


@pytest.mark.ddp_scenario("probe_padding")
def test_a_massive_probe_over_a_sharded_loader_counts_each_example_once(ddp_scenario):
    # Before: example 0, the DistributedSampler's padding of rank 1's shard, was probed twice: count 896, not 832.
    from ddp_probe_padding import EXAMPLES, probe_statistics

    ddp = ddp_scenario.json()
    single = probe_statistics(devices=1)
    assert ddp["massive/net.blocks.0/count"] == single["massive/net.blocks.0/count"] == EXAMPLES * 4 * 16
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.ddp_scenario("eval_padding")
def test_validation_and_test_metrics_count_each_example_once_despite_the_sampler_padding(ddp_scenario):
    # Before: rank 1 evaluated example 0 again (the DistributedSampler's padding of 5 spectra, 7 digits): val/ap 0.4778
    # for 0.4167; the dopamine firing fractions (and test/gate_active_fraction) were rank 0's share of the inputs alone.
    import torch
    from ddp_eval_padding import (
        DIGIT_LABELS,
        DIGITS,
        SPECTRA,
        SPECTRA_LABELS,
        TOKENS,
        WINDOW_LABELS,
        WINDOWS,
        foundation,
        language_model,
        spectral_model,
    )

    result = ddp_scenario.json()
    metrics = result["metrics"]

    with torch.no_grad():
        logits = spectral_model().double().eval()(SPECTRA.double()).numpy()
    labels = SPECTRA_LABELS.numpy()
    positives, negatives = logits[labels == 1], logits[labels == 0]
    auroc = np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives])
    hits = labels[np.argsort(-logits, kind="stable")] == 1
    average_precision = (np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean()
    bce = np.mean(np.logaddexp(0.0, logits) - labels * logits)
    for stage in ("val", "test"):
        assert metrics[f"{stage}/auroc"] == pytest.approx(auroc, abs=1e-6)
        assert metrics[f"{stage}/ap"] == pytest.approx(average_precision, abs=1e-6)
        assert metrics[f"{stage}/loss"] == pytest.approx(bce, rel=1e-5)

    log_power = np.log((WINDOWS.double().numpy() ** 2).mean(axis=(1, 2)))  # LogPower's logit
    labels = WINDOW_LABELS.numpy()
    positives, negatives = log_power[labels == 1], log_power[labels == 0]
    auroc = np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives])
    bce = np.mean(np.logaddexp(0.0, log_power) - labels * log_power)
    for stage in ("val", "test"):
        assert metrics[f"stan_{stage}/auroc"] == pytest.approx(auroc, abs=1e-6)
        assert metrics[f"stan_{stage}/loss"] == pytest.approx(bce, rel=1e-5)

    with torch.no_grad():
        token_logits = language_model().double().eval()(TOKENS[:, :-1]).numpy()
    targets = TOKENS[:, 1:].numpy()
    log_normaliser = np.log(np.exp(token_logits - token_logits.max(-1, keepdims=True)).sum(-1)) + token_logits.max(-1)
    nats = np.mean(log_normaliser - np.take_along_axis(token_logits, targets[..., None], -1)[..., 0])
    assert metrics["lm_val/loss"] == pytest.approx(nats, rel=1e-5)  # before: sequence 0 counted twice
    assert metrics["lm_val/bits_per_token"] == pytest.approx(nats / np.log(2.0), rel=1e-5)

    weights = {key: value.double().numpy() for key, value in foundation().state_dict().items()}
    x, y = DIGITS.double().flatten(1).numpy(), DIGIT_LABELS.numpy()
    hidden = x @ weights["model.1.weight"].T + weights["model.1.bias"]
    class_logits = np.maximum(hidden, 0.0) @ weights["model.3.weight"].T + weights["model.3.bias"]
    shifted = class_logits - class_logits.max(axis=1, keepdims=True)
    cross_entropy = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
    assert metrics["foundation_test/acc"] == pytest.approx(np.mean(class_logits.argmax(axis=1) == y), abs=1e-7)
    assert metrics["foundation_test/loss"] == pytest.approx(cross_entropy.mean(), rel=1e-5)

    # the hard gates at τ = 0 (untrained) fire where the pre-activation is positive
    expected = np.stack([(hidden[y == c] > 0).mean(axis=0) for c in range(3)])
    (firing,) = result["firing"].values()
    np.testing.assert_allclose(np.array(firing), expected, atol=1e-12)
    assert metrics["dopamine_test/gate_active_fraction"] == pytest.approx(expected.mean(), abs=1e-7)


def test_a_data_error_only_rank_1_meets_is_its_one_line_and_the_next_fit_is_not_refused(tmp_path):
    # Before: rank 1 exited 2 in silence (main printed on rank 0 only) and rank 0 died in gloo's traceback or was killed
    # by Lightning's launcher; the refused run's config.yaml stayed, so the next fit was "a previous run in the way".
    import yaml
    from PIL import Image

    from lightning_act.data.images import ImageDataModule

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    data = dict(data_dir=str(tmp_path / "imgs"), image_size=8, in_chans=1, batch_size=2, val_fraction=0.2,
                test_fraction=0.0)
    module = ImageDataModule(**data)
    module.setup("fit")
    bad = Path(module.val_set.dataset.samples[module.val_set.indices[1]][0])  # validation item 1: rank 1's shard
    bad.write_bytes(b"not a png")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "csv"}}]},
        "model": {"class_path": "lightning_act.tasks.image_classification.ImageClassifier",
                  "init_args": {"model_name": "vit_tiny_patch16_224", "num_classes": 2, "in_chans": 1, "warmup_steps": 0,
                                "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1,
                                                 "num_heads": 2}}},
        "data": {"class_path": "lightning_act.data.images.ImageDataModule", "init_args": data},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + (os.getpid() + 41) % 1000))
    proc = subprocess.run([sys.executable, "-m", "lightning_act", "fit", "--config", "cfg.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lightning_act: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"lightning_act: error (rank 1): cannot read image '{bad}'")
    assert lines[0].endswith("; remove or replace the file")
    assert not list((tmp_path / "runs").rglob("config.yaml"))  # what made the next fit "a previous run in the way"


@pytest.mark.ddp_scenario("collapse_offset")
def test_collapse_sums_taken_before_the_ranks_share_a_reference_row_keep_the_spectrum_under_a_large_mean(ddp_scenario):
    # Before round 20 the sums were of the unshifted rows: under an offset of 1e6 the exact tap's erank read 13.76 for
    # 16.54 (the tail under the cut-off), and the sketched tap with two features at 1e4 was 0.45% low at step 1.
    # A NaN row in rank 0's first rows made the shared reference NaN-free but 5e5 from the data for the rest of the
    # fit (-4%), and a reference kept from the first step cost a drifting mean its tail: it now follows the mean.
    from ddp_collapse_offset import EXACT, SPOILED, WIDE

    result = ddp_scenario.json()
    assert result["sketched"] == [1]  # the wide tap takes the sketch path, the other the exact one
    assert result["history"]["collapse/spoiled/erank"]["steps"] == [1]  # step 0 held a NaN: unknown, not logged
    for name, rows, steps in (("exact", EXACT, (0, 1)), ("wide", WIDE, (0, 1)), ("spoiled", SPOILED, (1,))):
        for index, step in enumerate(steps):  # step s: global rows 32 s .. 32 s + 31 (2 ranks x 2 micro-batches of 8)
            centred = rows[32 * step : 32 * step + 32].astype(np.float64)
            centred -= centred.mean(0)
            singular = np.linalg.svd(centred, compute_uv=False)
            variances = singular**2
            singular = singular[singular > 1e-12 * singular[0]]
            p = singular / singular.sum()
            assert result["history"][f"collapse/{name}/erank"]["values"][index] == pytest.approx(
                np.exp(-(p * np.log(p)).sum()), rel=1e-8), (name, step)
            assert result["history"][f"collapse/{name}/pr"]["values"][index] == pytest.approx(
                variances.sum() ** 2 / (variances**2).sum(), rel=1e-8), (name, step)


@pytest.mark.ddp_scenario("ctrl_c_in_validation")
def test_a_ctrl_c_on_one_rank_during_validation_stops_every_rank_at_the_step_it_follows(ddp_scenario):
    # Before: under several processes the ranks agreed on the stop at the next training batch's end only, so a
    # Ctrl-C during an epoch-end validation stopped inside the next epoch (step 5), whose first batch the resume
    # replayed.
    from ddp_ctrl_c_in_validation import STEPS_PER_EPOCH

    result = ddp_scenario.json()
    assert result == {"saved_step": STEPS_PER_EPOCH, "ended": "exit 1"}
