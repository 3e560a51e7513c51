"""Round 21: checkpoints, pickles and CSV logs of earlier versions read by this one. Each old format is built by hand
from a current one (the comment names the version that wrote it); the expected values are an uninterrupted run's
or hand-worked. Each test fails on the code before."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning.pytorch as pl
from _toy import ReluClassifier, quiet_trainer, relu_classifier_loader
from lightning_act.callbacks import ActivationStats, DimensionalCollapse, SensitiveNeurons
from lightning_act.callbacks.sensitive import FeatureDrop
from lightning_act.capture.registry import MonitorHook, register_monitor_hook
from lightning_act.report.runlog import load_run


def tracking_set(seed: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


def fit(callbacks: list[pl.Callback], tmp_path: Path, ckpt: Path | None = None, save: bool = False) -> list[str]:
    """8 steps (4 per epoch); ``save``: the checkpoint at step 4 as ``tmp_path/sstep=4.ckpt``. Returns the warnings."""
    every_4 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="s{step}")
    extra = [every_4] if save else []
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=8, callbacks=[*callbacks, *extra], enable_checkpointing=save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ReluClassifier(), relu_classifier_loader(), ckpt_path=ckpt)
    return [str(w.message) for w in caught]


def rewrite_callback_states(ckpt: Path, out: Path, change) -> Path:
    checkpoint = torch.load(ckpt, weights_only=False)
    for key, state in checkpoint["callbacks"].items():
        change(key, state)
    torch.save(checkpoint, out)
    return out


def assert_same_histories(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, series in expected.items():
        assert got[key].steps == series.steps, key
        np.testing.assert_allclose(got[key].values, series.values, rtol=1e-6, atol=1e-9, err_msg=key)


# ------------------------------------------------------------------------------------------ 1. input taps' names
def test_input_tap_state_of_62acaae_checkpoint_continues_under_the_current_name(tmp_path: Path) -> None:
    """62acaae named an input tap ``head:input`` in its checkpoint state; the resumed histories and SeND windows must
    continue under ``head-input`` as one run (they split in two, the SeND window restarted)."""

    def monitors() -> list[pl.Callback]:
        return [
            ActivationStats(modules=["head:input"], every_n_steps=1),
            SensitiveNeurons(modules=["head:input"], every_n_steps=1, tracking_inputs=tracking_set(1), window=2),
        ]

    uninterrupted = monitors()
    fit(uninterrupted, tmp_path / "full")
    fit(monitors(), tmp_path / "part", save=True)

    def as_62acaae(key: str, state: dict) -> None:  # every per-tap key as 62acaae wrote it: "head:input"
        if "history" not in state:  # ModelCheckpoint's
            return
        for part in ("history", "published", "embeddings", "sensitive", "previous", "countdown"):
            if part in state:
                state[part] = {name.replace("head-input", "head:input"): v for name, v in state[part].items()}
        assert any("head:input" in name for name in state["history"])

    old = rewrite_callback_states(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt", as_62acaae)
    resumed = monitors()
    said = fit(resumed, tmp_path / "res", ckpt=old)
    for full, res in zip(uninterrupted, resumed, strict=True):
        assert_same_histories(res.history, full.history)
    assert resumed[1].history["sensitive/head-input/jaccard"].steps == [3, 4, 5, 6, 7]
    assert not [m for m in said if "start afresh" in m]


def test_collapsed_taps_of_62acaae_state_take_the_current_input_tap_name() -> None:
    monitor = DimensionalCollapse(modules=["head:input", "act1"], warn_below=0.5)
    monitor.restore_state({"collapsed": ["head:input", "act1"]})  # 62acaae's names
    assert monitor.collapsed == {"head-input", "act1"}


# ------------------------------------------------------------------------------------------ 2. trajectory["follows"]
def test_collapse_trajectory_of_checkpoint_without_follows_continues(tmp_path: Path) -> None:
    """62acaae's DimensionalCollapse state has no ``trajectory["follows"]`` (same snapshot format): the trajectory
    continues, without the warning that the weights changed (it restarted: r90 as a new run from the resume)."""

    def monitor() -> DimensionalCollapse:
        return DimensionalCollapse(modules=["act1"], every_n_steps=1, param_patterns=["fc*.weight"], projection_dim=64)

    uninterrupted = monitor()
    fit([uninterrupted], tmp_path / "full")
    fit([monitor()], tmp_path / "part", save=True)

    def as_62acaae(key: str, state: dict) -> None:
        if key.startswith("DimensionalCollapse"):
            del state["trajectory"]["follows"]

    old = rewrite_callback_states(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt", as_62acaae)
    resumed = monitor()
    said = fit([resumed], tmp_path / "res", ckpt=old)
    assert not [m for m in said if "trajectory" in m]
    assert resumed._snapshot_steps == uninterrupted._snapshot_steps == list(range(-1, 8))
    assert_same_histories(resumed.history, uninterrupted.history)


def test_collapse_trajectory_restarted_at_a_resume_is_labelled_from_the_resumed_step(tmp_path: Path) -> None:
    """A trajectory restarted at a resume (projection_dim changed: snapshots of another length) starts with the
    weights after the checkpoint's 4 steps, step 3 as the uninterrupted run labels them (it said -1, "from step 0")."""
    fit([DimensionalCollapse(modules=["act1"], every_n_steps=1, param_patterns=["fc*.weight"], projection_dim=64)],
        tmp_path / "part", save=True)
    resumed = DimensionalCollapse(modules=["act1"], every_n_steps=1, param_patterns=["fc*.weight"], projection_dim=32)
    said = fit([resumed], tmp_path / "res", ckpt=tmp_path / "part" / "sstep=4.ckpt")
    assert [m for m in said if "params/r90 follows a new trajectory from step 4" in m]
    assert resumed._snapshot_steps == [3, 4, 5, 6, 7]


# ------------------------------------------------------------------------------------------ 3. old pickled hooks
def test_hook_pickled_without_attached_leaves_the_loaded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """c77375e pickled a ``FeatureDrop`` as its ``__dict__`` with ``replaced=None`` and no ``attached``; loaded, the
    hook acted as its monitor's (class default True) and kept zeroing features of the copy in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    drop = FeatureDrop(torch.arange(16))
    register_monitor_hook(model[1], drop.after)
    monkeypatch.setattr(MonitorHook, "__getstate__", lambda self: {**self.__dict__, "replaced": None})  # c77375e
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.undo()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).train()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first, second = loaded(x), loaded(x)
        a = model[0](x).clamp(min=0)  # the same weights without a hook, by hand
        expected = a @ model[2].weight.T + model[2].bias
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)
    assert not loaded[1]._forward_hooks


# ---------------------------------------------------------------------------------------- 4. report, val-only fit part
def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")


def test_report_keeps_values_of_a_resumed_fit_part_without_training_rows(tmp_path: Path) -> None:
    """A resumed fit shorter than log_every_n_steps writes a CSV version with validation rows only (steps past the
    earlier version's); its values were left out as a ``validate``'s. A validate at the checkpoint's step still is."""
    write_csv(tmp_path / "csv" / "version_0", "epoch,step,train/loss,val/loss", ["0,1,1.5,", "0,3,,1.25"])
    write_csv(tmp_path / "csv" / "version_1", "epoch,step,val/loss", ["1,7,0.75"])  # the resumed fit
    write_csv(tmp_path / "csv" / "version_2", "epoch,step,val/loss", ["1,7,0.5"])  # a validate of the last checkpoint
    log = load_run(tmp_path)
    assert log.series["val/loss"].steps == [3, 7]
    assert log.series["val/loss"].values == [1.25, 0.75]
    assert [p.logs_training for p in log.parts] == [True, True, False]
    assert [n for n in log.notes if "without training" in n] == [
        f"{tmp_path / 'csv' / 'version_2' / 'metrics.csv'} logs val/loss without training; the fit's curves are kept "
        "and its values are left out"
    ]


# ------------------------------------------------------------------------------------------ 5. another tracking set
def test_send_resumed_with_another_tracking_set_restarts_its_window(tmp_path: Path) -> None:
    """A fit resumed with a tracking set of the same shape but other inputs: the window of the checkpoint's set is
    not stacked with the new set's (v_mean then measured the difference of two input sets); it restarts, with a
    warning, and gives what an uninterrupted run on the new set gives once refilled (the weights do not depend on
    the tracking set without drop). A checkpoint without the fingerprint (c77375e) continues as before."""

    def monitor(seed: int) -> SensitiveNeurons:
        return SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=tracking_set(seed), window=2)

    on_a, on_b = monitor(1), monitor(2)
    fit([on_a], tmp_path / "a")
    fit([on_b], tmp_path / "b")
    fit([monitor(1)], tmp_path / "part", save=True)
    resumed = monitor(2)
    said = fit([resumed], tmp_path / "res", ckpt=tmp_path / "part" / "sstep=4.ckpt")
    assert [m for m in said if "tracking set differs" in m and "act1" in m]
    v_mean = resumed.history["sensitive/act1/v_mean"]
    expected_b = dict(zip(on_b.history["sensitive/act1/v_mean"].steps, on_b.history["sensitive/act1/v_mean"].values))
    assert v_mean.steps == [2, 3, 6, 7]  # window + 1 = 3 checkpoints of the new set from step 4
    np.testing.assert_allclose(v_mean.values[2:], [expected_b[6], expected_b[7]], rtol=1e-6)

    def as_c77375e(key: str, state: dict) -> None:
        state.pop("tracking_fingerprint", None)

    old = rewrite_callback_states(tmp_path / "part" / "sstep=4.ckpt", tmp_path / "old.ckpt", as_c77375e)
    continued = monitor(1)
    said = fit([continued], tmp_path / "res_old", ckpt=old)
    assert not [m for m in said if "start afresh" in m]
    assert_same_histories(continued.history, on_a.history)
