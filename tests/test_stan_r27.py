"""Round 27 (STAN): the scripts' window AUROC ranks logits, not float32 sigmoids; the test-split warning names only
what is undefined; an EDF+D file is named as discontinuous, not as corrupt."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from lightning_act.data.eeg import EEGSeizureDataModule, read_edf
from lightning_act.errors import DataFormatError
from lightning_act.tasks.seizure_forecasting import SeizureForecaster

SCRIPTS = Path(__file__).parents[1] / "scripts"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _confident(task: SeizureForecaster, scale: float) -> SeizureForecaster:
    """Logits of tens to hundreds: a float32 sigmoid is exactly 1 (or 0) for many windows of both classes."""
    with torch.no_grad():
        task.model.head.weight.mul_(scale)
        task.model.head.bias.fill_(scale)
    return task.eval()


def test_eval_script_auroc_is_that_of_the_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                 one_thread: None) -> None:
    data_args = dict(n_channels=4, sampling_rate=32.0, window_seconds=5.0, recording_minutes=40.0, n_train_recordings=2,
                     n_val_recordings=1, n_test_recordings=2, batch_size=256, seed=0)
    config = tmp_path / "stan.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": data_args}}))
    datamodule = EEGSeizureDataModule(**data_args)
    datamodule.setup()
    pl.seed_everything(0, verbose=False)
    task = _confident(SeizureForecaster(in_chans=4, window_samples=160, segment_samples=16, embed_dim=16, depth=1,
                                        num_heads=2, mlp_ratio=2.0, critic_hidden=8, n_domains=2, dropout=0.0), 40.0)
    trainer = pl.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", enable_checkpointing=False)
    trainer.fit(task, datamodule=datamodule)
    checkpoint = tmp_path / "m.ckpt"
    trainer.save_checkpoint(checkpoint)
    logits, labels = [], []
    with torch.no_grad():  # independent: sklearn on the float64 logits of the labelled test windows
        for x, y, _, _ in datamodule.test_dataloader():
            logits.append(task(x).double().numpy())
            labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    labelled = labels >= 0
    assert (torch.from_numpy(logits[labelled]).float().sigmoid() == 1).sum() > 10  # the case of the bug: ties at 1
    expected = roc_auc_score(labels[labelled], logits[labelled])

    monkeypatch.setattr(sys, "argv", ["eval_stan_alarms.py", "--ckpt", str(checkpoint), "--config", str(config)])
    _script("eval_stan_alarms").main()
    printed = float(re.search(r"window AUROC ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(expected, abs=5e-4 + 1e-9)  # printed with 3 decimals; was 0.406 for 0.3565


def test_benchmark_auroc_is_that_of_the_logits(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    benchmark = _script("stan_benchmark")
    cfg = benchmark.Config(n_train=1, n_calibration=1, n_test=1, free_minutes=5.0, seizure_recording_minutes=10.0,
                           test_hours=1.0, test_seizures=1, train_batches=1, batch_size=8)
    trained = benchmark.train_stan
    monkeypatch.setattr(benchmark, "train_stan", lambda *args: _confident(trained(*args), 1000.0))
    logits_of_calls: list[torch.Tensor] = []
    real_logits = benchmark.stan_logits

    def recorded_logits(*args) -> torch.Tensor:
        logits_of_calls.append(real_logits(*args))
        return logits_of_calls[-1]

    monkeypatch.setattr(benchmark, "stan_logits", recorded_logits)
    results = benchmark.run_seed(cfg, 0)
    labels = _evaluation_labels(benchmark, cfg)
    labelled = labels >= 0
    # calls: calibration (adversarial, no term), then the one evaluation recording (adversarial, no term)
    for name, logits in zip(benchmark.METHODS[1:], logits_of_calls[2:]):
        logits = logits.double().numpy()
        assert len(logits) == len(labels) and (torch.from_numpy(logits[labelled]).float().sigmoid() == 1).sum() > 10
        expected = roc_auc_score(labels[labelled], logits[labelled])  # independent: float64 logits
        assert results[name]["auroc"] == pytest.approx(expected, abs=1e-12)


def _evaluation_labels(benchmark: ModuleType, cfg) -> np.ndarray:
    """The labels of the quick seed's one evaluation recording, rebuilt as docs/stan.md describes the benchmark."""
    window = round(cfg.window_s * cfg.sampling_rate)
    subject = benchmark.draw_subject([0, 0, cfg.n_train + cfg.n_calibration], f"s0p{cfg.n_train + cfg.n_calibration:02d}",
                                     cfg.n_channels)
    rec = benchmark.generate_subject_recording(subject, [0, 2, 0], f"{subject.name}_test", cfg.test_hours * 60.0,
                                               benchmark.evaluation_seizures(cfg, 0, 0), cfg.sampling_rate)
    _, labels = benchmark.label_windows(rec.data.shape[1], rec.sampling_rate, window, window, rec.seizures,
                                        benchmark.HORIZON_S, benchmark.POSTICTAL_S)
    return labels[: rec.data.shape[1] // window]


def _write_edf(path: Path, seconds: int, rate: int = 32, seed: int = 0) -> None:
    import pyedflib

    signals = np.random.default_rng(seed).uniform(-100, 100, size=(3, seconds * rate))
    headers = pyedflib.highlevel.make_signal_headers(["CH0", "CH1", "CH2"], dimension="uV", sample_frequency=rate,
                                                     physical_min=-500.0, physical_max=500.0)
    pyedflib.highlevel.write_edf(str(path), signals, headers)


def _summary(seizure_starts: dict[str, int | None]) -> str:
    lines = []
    for name, start in seizure_starts.items():
        lines.append(f"File Name: {name}")
        if start is None:
            lines += ["Number of Seizures in File: 0", ""]
        else:
            lines += ["Number of Seizures in File: 1", f"Seizure Start Time: {start} seconds",
                      f"Seizure End Time: {start + 20} seconds", ""]
    return "\n".join(lines)


def test_test_split_with_only_early_seizures_warns_auroc_only(tmp_path: Path) -> None:
    subject = tmp_path / "chb90"
    subject.mkdir()
    names = [f"chb90_{i:02d}.edf" for i in range(4)]
    for i, name in enumerate(names):
        _write_edf(subject / name, 600, seed=i)
    starts: dict[str, int | None] = {names[0]: 400, names[1]: 400, names[2]: None, names[3]: None}
    (subject / "chb90-summary.txt").write_text(_summary(starts))
    args = dict(data_dir=str(tmp_path), n_channels=3, horizon_minutes=1.0, postictal_minutes=0.5, val_fraction=0.0,
                test_fraction=0.5)
    dm = EEGSeizureDataModule(**args)
    dm.setup()
    early = next(rec.name for rec in dm.recordings["test"] if rec.seizures)
    starts[next(name for name in names if name.startswith(early))] = 3  # no 5 s window ends before it
    (subject / "chb90-summary.txt").write_text(_summary(starts))
    dm = EEGSeizureDataModule(**args)  # same files, same seed: the same split
    dm.setup()
    assert [len(rec.seizures) for rec in dm.recordings["test"] if rec.seizures] == [1]
    assert not (dm.test_set.labels == 1).any()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.test_dataloader()
    said = [str(w.message) for w in caught if "hold no preictal window" in str(w.message)]
    assert len(said) == 1
    # docs/stan.md: sensitivity is predicted / seizures, logged whenever the split has a seizure; these cannot be
    # predicted by any model (no window ends before them): said as missed, not as a measurement
    assert "its 1 seizure(s) leave no labelled window before them" in said[0]
    assert "test/auroc is undefined (NaN)" in said[0] and "test/sensitivity are undefined" not in said[0]
    assert "test/sensitivity counts them as missed whatever the model" in said[0] and "\n" not in said[0]


@pytest.mark.parametrize("kind", ["EDF+D", "BDF+D"])
def test_discontinuous_edf_is_named_not_called_corrupt(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "chb91_01.edf"
    _write_edf(path, 60)
    content = bytearray(path.read_bytes())
    assert content[192:197] == b"EDF+C"  # the reserved field of an EDF+ header (EDF+ spec, 2003)
    content[192:197] = kind.encode()
    path.write_bytes(bytes(content))
    with pytest.raises(DataFormatError) as error:
        read_edf(path)
    message = str(error.value)
    assert "\n" not in message and "chb91_01.edf" in message and f"is {kind} (discontinuous" in message
    assert "export it as continuous EDF (EDF+C) or split it at the gaps" in message
    assert "corrupt" not in message and "download it again" not in message
    # a continuous EDF+ file still reads
    content[192:197] = b"EDF+C"
    path.write_bytes(bytes(content))
    assert read_edf(path)[0].shape == (3, 60 * 32)
