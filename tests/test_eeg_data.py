"""Synthetic EEG generator, window labels, CHB-MIT-style EDF + summary loading and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_act.data.eeg import (
    EEGRecording,
    EEGSeizureDataModule,
    EEGWindows,
    channel_statistics,
    draw_subject,
    generate_subject_recording,
    generate_recording,
    generate_split,
    label_windows,
    load_chbmit_folder,
    parse_chbmit_summary,
    pink_noise,
    read_edf,
)
from lightning_act.errors import DataFormatError, DataNotFoundError

FS = 64.0


def _band_power(x: np.ndarray, low: float, high: float) -> float:
    """Mean periodogram power in [low, high] Hz over channels (numpy FFT)."""
    spectrum = np.abs(np.fft.rfft(x - x.mean(axis=1, keepdims=True), axis=1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[1], d=1.0 / FS)
    return float(spectrum[:, (freqs >= low) & (freqs <= high)].mean())


def _beta_synchrony(x: np.ndarray) -> float:
    """Mean pairwise correlation between channels after an FFT band-pass to 14-20 Hz."""
    spectrum = np.fft.rfft(x, axis=1)
    freqs = np.fft.rfftfreq(x.shape[1], d=1.0 / FS)
    spectrum[:, (freqs < 14.0) | (freqs > 20.0)] = 0.0
    corr = np.corrcoef(np.fft.irfft(spectrum, n=x.shape[1], axis=1))
    return float(corr[np.triu_indices(len(corr), k=1)].mean())


@pytest.fixture(scope="module")
def recording():
    return generate_recording(7, n_channels=6, sampling_rate=FS, duration_minutes=45.0, n_seizures=1, distractor_bursts_per_hour=0.0)


def test_generator_is_deterministic_and_sized(recording) -> None:
    again = generate_recording(7, n_channels=6, sampling_rate=FS, duration_minutes=45.0, n_seizures=1, distractor_bursts_per_hour=0.0)
    other = generate_recording(8, n_channels=6, sampling_rate=FS, duration_minutes=45.0, n_seizures=1, distractor_bursts_per_hour=0.0)
    assert recording.data.shape == (6, 45 * 60 * 64) and recording.data.dtype == np.float32
    np.testing.assert_array_equal(recording.data, again.data)
    assert recording.seizures == again.seizures
    assert not np.array_equal(recording.data, other.data)
    onset, end = recording.seizures[0]
    assert onset >= 15 * 60 + 300 and 30.0 <= end - onset <= 90.0


def test_pink_noise_has_one_over_f_spectrum() -> None:
    noise = pink_noise(np.random.default_rng(0), 16, 8192, exponent=1.0)
    power = (np.abs(np.fft.rfft(noise, axis=1)) ** 2).mean(axis=0)
    freqs = np.fft.rfftfreq(8192)
    band = (freqs > 0.005) & (freqs < 0.4)
    slope = np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.1)


def test_preictal_band_power_and_synchrony_rise_before_onset(recording) -> None:
    onset, end = recording.seizures[0]
    x = recording.data.astype(np.float64)
    late_preictal = x[:, int((onset - 240) * FS) : int(onset * FS)]  # last 4 min before onset (ramp > 0.7)
    interictal = x[:, : int(240 * FS)]  # first 4 min, far from the seizure
    assert _band_power(late_preictal, 4.0, 8.0) > 1.5 * _band_power(interictal, 4.0, 8.0)
    assert _beta_synchrony(late_preictal) > _beta_synchrony(interictal) + 0.3
    ictal = x[:, int(onset * FS) : int(end * FS)]
    assert ictal.std() > 2.0 * interictal.std()


def test_label_windows_by_hand() -> None:
    # 1 Hz, 100 samples, windows of 10, seizure [60, 65), horizon 20, post-ictal 10:
    # blocked [40, 75); preictal windows inside [40, 60): [40,50), [50,60);
    # [60,70) ictal and [70,80) post-ictal are excluded; the rest interictal.
    starts, labels = label_windows(100, 1.0, 10, 10, [(60.0, 65.0)], horizon_s=20.0, postictal_s=10.0)
    np.testing.assert_array_equal(starts, np.arange(0, 100, 10))
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, -1, -1, 0, 0])
    # horizon 25: blocked [35, 75); [30,40) straddles the preictal start -> excluded.
    _, labels = label_windows(100, 1.0, 10, 10, [(60.0, 65.0)], horizon_s=25.0, postictal_s=10.0)
    np.testing.assert_array_equal(labels, [0, 0, 0, -1, 1, 1, -1, -1, 0, 0])


def _expected(*runs: tuple[int, int]) -> np.ndarray:
    """Labels written as (label, count) runs."""
    return np.concatenate([np.full(count, label) for label, count in runs])


def test_clustered_seizures_never_label_ictal_or_postictal_windows_preictal() -> None:
    # 1 Hz, windows of 100 s, seizures [1000, 1060) and [1500, 1560), horizon 900, post-ictal 600.
    # Seizure 1: preictal [100, 1000) -> windows 100..900 (9); seizure 2's horizon [600, 1500)
    # reaches into seizure 1 and its recovery [1000, 1660): windows 1000..1400 are excluded, not
    # preictal. Blocked [100, 2160): windows 1000..2100 excluded (12); 0 and 2200..2900 interictal.
    starts, labels = label_windows(3000, 1.0, 100, 100, [(1000.0, 1060.0), (1500.0, 1560.0)], 900.0, 600.0)
    np.testing.assert_array_equal(starts, np.arange(0, 3000, 100))
    np.testing.assert_array_equal(labels, _expected((0, 1), (1, 9), (-1, 12), (0, 8)))
    # the order in which seizures are listed does not matter
    _, swapped = label_windows(3000, 1.0, 100, 100, [(1500.0, 1560.0), (1000.0, 1060.0)], 900.0, 600.0)
    np.testing.assert_array_equal(swapped, labels)


def test_leading_seizure_selection() -> None:
    # Seizures [1000, 1060) and [2600, 2660): 1540 s from the end of the first to the second onset.
    # Without selection, windows 1700..2500 (9) are preictal for seizure 2; with a 1800 s leading
    # gap seizure 2 is not leading and they are excluded; a 1500 s gap keeps it.
    seizures = [(1000.0, 1060.0), (2600.0, 2660.0)]
    every = _expected((0, 1), (1, 9), (-1, 7), (1, 9), (-1, 7), (0, 7))
    _, labels = label_windows(4000, 1.0, 100, 100, seizures, 900.0, 600.0)
    np.testing.assert_array_equal(labels, every)
    _, labels = label_windows(4000, 1.0, 100, 100, seizures, 900.0, 600.0, leading_gap_s=1800.0)
    np.testing.assert_array_equal(labels, _expected((0, 1), (1, 9), (-1, 23), (0, 7)))
    _, labels = label_windows(4000, 1.0, 100, 100, seizures, 900.0, 600.0, leading_gap_s=1500.0)
    np.testing.assert_array_equal(labels, every)


def test_interictal_distance_convention() -> None:
    # One seizure [1000, 1060), interictal at least 1000 s away: [0, 2060) blocked, so window 0 and
    # windows up to 2000 are excluded; 2100..3900 (19) interictal; preictal unchanged (100..900).
    _, labels = label_windows(4000, 1.0, 100, 100, [(1000.0, 1060.0)], 900.0, 600.0, interictal_distance_s=1000.0)
    np.testing.assert_array_equal(labels, _expected((-1, 1), (1, 9), (-1, 11), (0, 19)))


def test_splits_differ_and_cycle_seizure_counts() -> None:
    kwargs = {"n_channels": 2, "sampling_rate": 16.0, "duration_minutes": 75.0}
    train = generate_split(0, "train", 3, 2, **kwargs)
    test = generate_split(0, "test", 3, 2, **kwargs)
    assert [len(r.seizures) for r in train] == [1, 2, 0]
    assert not np.array_equal(train[0].data, test[0].data)


def test_channel_statistics_pool_all_training_samples() -> None:
    rng = np.random.default_rng(0)
    recs = [EEGRecording(str(i), rng.normal(i, i + 1, size=(3, 400 * (i + 1))).astype(np.float32), 1.0) for i in range(2)]
    pooled = np.concatenate([r.data for r in recs], axis=1).astype(np.float64)
    mean, std = channel_statistics(recs)
    np.testing.assert_allclose(mean, pooled.mean(axis=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(std, pooled.std(axis=1), rtol=1e-6)


def test_datamodule_synthetic_loaders() -> None:
    dm = EEGSeizureDataModule(
        n_channels=3, sampling_rate=16.0, recording_minutes=40.0, n_train_recordings=2, n_val_recordings=1, n_test_recordings=2, batch_size=32
    )
    dm.setup()
    x, y, domain = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 80) and set(y.unique().tolist()) <= {0.0, 1.0}
    assert set(domain.unique().tolist()) <= {0, 1}  # synthetic recordings are their own subjects
    assert set(np.unique(dm.datasets["train"].labels)) == {0, 1}
    xt, yt, rec, end = next(iter(dm.test_dataloader()))
    assert xt.shape == (32, 3, 80) and set(yt.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all(rec == 0)
    # continuous stream: consecutive windows of recording 0, 5 s apart, ending at 5, 10, ... s.
    torch.testing.assert_close(end, torch.arange(1, 33, dtype=torch.float64) * 5.0)
    assert len(dm.datasets["test"]) == 2 * (40 * 60 // 5)
    # normalisation uses training statistics: training windows have ~zero mean, ~unit std per channel.
    stacked = torch.stack([dm.datasets["train"][i][0] for i in range(0, len(dm.datasets["train"]), 7)])
    assert stacked.mean().abs() < 0.1 and (stacked.std() - 1.0).abs() < 0.15


# ---------------------------------------------------------------------------- CHB-MIT-style files

SUMMARY_PLAIN = """Data Sampling Rate: 32 Hz
*************************

Channel 1: FP1-F7
Channel 2: F7-T7
Channel 3: T7-P7

File Name: chb99_01.edf
File Start Time: 10:00:00
File End Time: 10:05:00
Number of Seizures in File: 0

File Name: chb99_02.edf
File Start Time: 10:05:00
File End Time: 10:10:00
Number of Seizures in File: 1
Seizure Start Time: 200 seconds
Seizure End Time: 230 seconds
"""

SUMMARY_NUMBERED = """File Name: chb98_01.edf
Number of Seizures in File: 2
Seizure 1 Start Time: 100 seconds
Seizure 1 End Time: 120 seconds
Seizure 2 Start Time: 250 seconds
Seizure 2 End Time: 260 seconds
"""


def _write_edf(
    path: Path, signals: np.ndarray, rate: int, labels: list[str] | None = None, dimension: str = "uV",
    physical_max: float = 500.0,
) -> None:
    import pyedflib

    headers = pyedflib.highlevel.make_signal_headers(
        labels or [f"CH{i}" for i in range(len(signals))], dimension=dimension, sample_frequency=rate,
        physical_min=-physical_max, physical_max=physical_max,
    )
    pyedflib.highlevel.write_edf(str(path), signals, headers)


@pytest.fixture()
def chb_folder(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    subject = tmp_path / "chb99"
    subject.mkdir()
    rng = np.random.default_rng(0)
    signals = [rng.uniform(-200.0, 200.0, size=(3, 300 * 32)) for _ in range(2)]
    for i, sig in enumerate(signals, start=1):
        _write_edf(subject / f"chb99_{i:02d}.edf", sig, 32)
    (subject / "chb99-summary.txt").write_text(SUMMARY_PLAIN)
    return tmp_path, signals


def test_summary_variants(tmp_path: Path) -> None:
    plain = tmp_path / "chb99-summary.txt"
    plain.write_text(SUMMARY_PLAIN)
    assert parse_chbmit_summary(plain) == {"chb99_01.edf": [], "chb99_02.edf": [(200.0, 230.0)]}
    numbered = tmp_path / "chb98-summary.txt"
    numbered.write_text(SUMMARY_NUMBERED)
    assert parse_chbmit_summary(numbered) == {"chb98_01.edf": [(100.0, 120.0), (250.0, 260.0)]}
    for unit in ("s", "secs", "seconds"):  # before: the number swallowed a unit written without a space
        glued = tmp_path / f"chb97{unit}-summary.txt"
        glued.write_text(SUMMARY_PLAIN.replace(" seconds", unit))
        assert parse_chbmit_summary(glued)["chb99_02.edf"] == [(200.0, 230.0)]


def test_edf_round_trip_and_folder_loading(chb_folder) -> None:
    folder, signals = chb_folder
    data, rate, names, units = read_edf(folder / "chb99" / "chb99_02.edf", n_channels=3)
    assert rate == 32.0 and names == ["CH0", "CH1", "CH2"] and units == ["uV"] * 3 and data.shape == (3, 9600)
    # EDF stores 16-bit integers over [-500, 500]: resolution 1000 / 65535.
    np.testing.assert_allclose(data, signals[1], atol=1000.0 / 65535.0)
    recordings = load_chbmit_folder(folder, n_channels=3)
    assert [r.name for r in recordings] == ["chb99_01", "chb99_02"]
    assert recordings[1].seizures == [(200.0, 230.0)] and recordings[1].duration_s == 300.0


def test_datamodule_reads_chbmit_folder(chb_folder) -> None:
    folder, _ = chb_folder
    dm = EEGSeizureDataModule(
        data_dir=str(folder), n_channels=3, horizon_minutes=1.0, postictal_minutes=0.5, val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    assert dm.sampling_rate == 32.0 and dm.window_samples == 160
    # seizure at 200 s, horizon 60 s: preictal windows [140,145) .. [195,200) = 12; blocked [140, 260).
    labels = dm.datasets["train"].labels
    assert (labels == 1).sum() == 12
    assert (labels == 0).sum() == 60 + (300 - 120) // 5  # seizure-free file + rest of the seizure file


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_file_errors(chb_folder, tmp_path: Path) -> None:
    folder, _ = chb_folder
    (folder / "chb99" / "chb99_02.edf").unlink()
    with pytest.raises(DataNotFoundError) as error:
        load_chbmit_folder(folder, n_channels=3)
    assert "chb99_02.edf" in _one_line(error)
    with pytest.raises(DataNotFoundError):
        parse_chbmit_summary(tmp_path / "nope-summary.txt")
    with pytest.raises(DataNotFoundError) as error:
        EEGSeizureDataModule(data_dir=str(tmp_path / "absent"))
    assert "--data.data_dir" in _one_line(error)


def test_channel_count_mismatch_error(chb_folder) -> None:
    folder, _ = chb_folder
    with pytest.raises(DataFormatError) as error:
        load_chbmit_folder(folder, n_channels=23)
    assert "has 3 channels but 23 were expected" in _one_line(error)


def _two_file_folder(tmp_path: Path, second_labels: list[str], dimension: str = "uV", scale: float = 1.0):
    """chb99_01.edf with channels FP1-F7, T8-P8, F7-T7, T8-P8 (CHB-MIT repeats T8-P8) and chb99_02.edf with
    ``second_labels``, its signals multiplied by ``scale`` and written in ``dimension``; returns both signal arrays."""
    subject = tmp_path / "chb99"
    subject.mkdir()
    rng = np.random.default_rng(1)
    first, second = (rng.uniform(-200.0, 200.0, size=(4, 300 * 32)) for _ in range(2))
    _write_edf(subject / "chb99_01.edf", first, 32, ["FP1-F7", "T8-P8", "F7-T7", "T8-P8"])
    _write_edf(subject / "chb99_02.edf", second * scale, 32, second_labels, dimension, physical_max=500.0 * scale)
    (subject / "chb99-summary.txt").write_text(SUMMARY_PLAIN)
    return first, second


def test_a_file_with_its_channels_in_another_order_is_aligned_by_name(tmp_path: Path) -> None:
    """Before: stacked by position, so row 0 was FP1-F7 in one file and F7-T7 in the other."""
    _, second = _two_file_folder(tmp_path, ["F7-T7", "T8-P8", "FP1-F7", "T8-P8"])
    recordings = load_chbmit_folder(tmp_path, n_channels=4)
    assert [r.channel_names for r in recordings] == [["FP1-F7", "T8-P8", "F7-T7", "T8-P8"]] * 2
    # by hand: FP1-F7 is row 2 of the second file, T8-P8 its rows 1 then 3 (in order), F7-T7 its row 0
    np.testing.assert_allclose(recordings[1].data, second[[2, 1, 0, 3]], atol=1000.0 / 65535.0)


def test_a_file_in_millivolts_is_read_in_microvolts_like_its_neighbours(tmp_path: Path) -> None:
    """Before: pyedflib's values in each file's own unit, the mV file 1000x smaller without a word."""
    _, second = _two_file_folder(tmp_path, ["FP1-F7", "T8-P8", "F7-T7", "T8-P8"], dimension="mV", scale=1e-3)
    recordings = load_chbmit_folder(tmp_path, n_channels=4)
    np.testing.assert_allclose(recordings[1].data, second, atol=1000.0 / 65535.0)  # written as second / 1000 mV


def test_a_file_of_another_montage_is_one_line_naming_its_channels(tmp_path: Path) -> None:
    _two_file_folder(tmp_path, ["FP1-F7", "T8-P8", "F7-T7", "P7-O1"])
    with pytest.raises(DataFormatError) as error:  # before: loaded, P7-O1 stacked under T8-P8
        load_chbmit_folder(tmp_path, n_channels=4)
    message = _one_line(error)
    assert "'chb99_02.edf' has channels ['P7-O1'] where 'chb99_01.edf' has ['T8-P8']" in message
    assert "one montage" in message


def test_a_file_in_another_non_voltage_unit_is_one_line(tmp_path: Path) -> None:
    _two_file_folder(tmp_path, ["FP1-F7", "T8-P8", "F7-T7", "T8-P8"], dimension="mmHg")
    with pytest.raises(DataFormatError) as error:  # before: read on another scale without a word
        load_chbmit_folder(tmp_path, n_channels=4)
    assert "'chb99_02.edf' has 4 channel(s) in other units than 'chb99_01.edf' (first FP1-F7: 'mmHg' where it has 'uV')" in (
        _one_line(error)
    )


def test_recordings_shorter_than_a_window_are_one_line_at_setup() -> None:
    """60-min recordings (3600 s) and 4000-s windows: before, setup passed and torch's sampler raised a ValueError."""
    dm = EEGSeizureDataModule(window_seconds=4000, recording_minutes=60, n_train_recordings=1, n_val_recordings=1,
                              n_test_recordings=1)
    with pytest.raises(DataFormatError) as error:
        dm.setup("fit")
    message = _one_line(error)
    assert "the train recordings (longest 3600 s) hold no labelled window of 4000 s" in message
    assert "lower --data.window_seconds" in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("File Name: a.edf\nNumber of Seizures in File: 2\nSeizure Start Time: 5 seconds\nSeizure End Time: 9 seconds\n", "says 2"),
        ("File Name: a.edf\nNumber of Seizures in File: 1\nSeizure Start Time: soon\nSeizure End Time: 9 seconds\n", "not a number"),
        ("File Name: a.edf\nNumber of Seizures in File: 1\nSeizure 1 Start Time: 5 seconds\n", "1 seizure start(s) but 0"),
        ("Seizure Start Time: 5 seconds\n", "before any 'File Name:'"),
        ("File Name: a.edf\nNumber of Seizures in File: 1\nSeizure Start Time: 9 seconds\nSeizure End Time: 5 seconds\n", "before it starts"),
        ("Data Sampling Rate: 256 Hz\n", "no 'File Name:'"),
    ],
)
def test_malformed_summary_errors(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "chb00-summary.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError) as error:
        parse_chbmit_summary(path)
    assert problem in _one_line(error)


def _write_edf_bytes(tmp_path: Path) -> bytes:
    _write_edf(tmp_path / "whole.edf", np.random.default_rng(0).uniform(-100, 100, size=(3, 32 * 60)), 32)
    return (tmp_path / "whole.edf").read_bytes()


@pytest.mark.parametrize("cut", ["truncated", "garbage", "header only"])
def test_corrupt_edf_is_one_line_naming_the_file(tmp_path: Path, cut: str) -> None:
    whole = _write_edf_bytes(tmp_path)
    content = {"truncated": whole[: len(whole) // 2], "garbage": b"not an edf file " * 64, "header only": whole[:300]}[cut]
    bad = tmp_path / "chb97_01.edf"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as error:
        read_edf(bad)
    message = _one_line(error)
    assert "chb97_01.edf" in message and "corrupt or truncated" in message and "download it again" in message


def test_summary_with_byte_order_mark_parses(tmp_path: Path) -> None:
    path = tmp_path / "chb98-summary.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SUMMARY_NUMBERED.encode())
    assert parse_chbmit_summary(path) == {"chb98_01.edf": [(100.0, 120.0), (250.0, 260.0)]}


def test_seizure_past_the_end_of_the_recording_is_one_clear_error(chb_folder) -> None:
    folder, _ = chb_folder
    summary = folder / "chb99" / "chb99-summary.txt"
    summary.write_text(SUMMARY_PLAIN.replace("Seizure End Time: 230 seconds", "Seizure End Time: 330 seconds"))
    with pytest.raises(DataFormatError) as error:
        load_chbmit_folder(folder, n_channels=3)
    message = _one_line(error)
    assert "chb99_02.edf" in message and "200-330 s" in message and "ends at 300 s" in message


def test_chbmit_subject_folders_are_the_domains(chb_folder) -> None:
    folder, signals = chb_folder
    other = folder / "chb98"
    other.mkdir()
    _write_edf(other / "chb98_01.edf", signals[0], 32)
    (other / "chb98-summary.txt").write_text("File Name: chb98_01.edf\nNumber of Seizures in File: 0\n")
    recordings = load_chbmit_folder(folder, n_channels=3)
    assert [r.subject for r in recordings] == ["chb98", "chb99", "chb99"]
    windows = EEGWindows(recordings, 160, 160, 60.0, 30.0, np.zeros(3), np.ones(3))
    np.testing.assert_array_equal(windows.domains, [0, 1, 1])
    assert int(windows[0][2]) == 0 and int(windows[len(windows) - 1][2]) == 1


def test_subject_generator_is_heterogeneous_and_deterministic() -> None:
    a, b = draw_subject([1, 0], "a", n_channels=4), draw_subject([1, 1], "b", n_channels=4)
    assert a.beta_band != b.beta_band and not np.array_equal(a.channel_gain, b.channel_gain)
    rec = generate_subject_recording(a, [2, 0], "r", 40.0, [(1500.0, 1560.0)], sampling_rate=FS)
    again = generate_subject_recording(a, [2, 0], "r", 40.0, [(1500.0, 1560.0)], sampling_rate=FS)
    np.testing.assert_array_equal(rec.data, again.data)
    assert rec.data.shape == (4, 40 * 60 * 64) and rec.subject == "a" and rec.seizures == [(1500.0, 1560.0)]
    x = rec.data.astype(np.float64)
    assert x[:, int(1500 * FS) : int(1560 * FS)].std() > 2.0 * x[:, : int(600 * FS)].std()


def test_summary_times_that_are_not_seconds_a_file_listed_twice_and_an_empty_split_are_one_line(chb_folder, tmp_path: Path) -> None:
    for text, problem in [
        (SUMMARY_PLAIN.replace("Seizure Start Time: 200", "Seizure Start Time: nan"), "is not a finite number of seconds"),
        (SUMMARY_PLAIN + SUMMARY_PLAIN.split("File Name: chb99_02.edf")[0], "'chb99_01.edf' is listed twice"),
    ]:
        summary = tmp_path / "chb97-summary.txt"
        summary.write_text(text)
        with pytest.raises(DataFormatError) as error:
            parse_chbmit_summary(summary)  # before: a NaN onset labelled nothing; the second entry replaced the first
        assert problem in _one_line(error)
        summary.unlink()
    folder, _ = chb_folder
    dm = EEGSeizureDataModule(data_dir=str(folder), n_channels=3, horizon_minutes=1.0, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataFormatError) as error:
        dm.setup()  # 2 recordings: 0.2 of each group rounds to none; before: a fit without validation, test() == []
    assert "no val recordings after the split of 2 recordings" in _one_line(error)


def test_seizures_of_neighbouring_files_exclude_windows_but_label_no_preictal() -> None:
    # 1 Hz, 10 s windows. The next file's seizure at 330-360 s of this file's clock, horizon 60 s: windows that end
    # after 270 s lie within the horizon; before, they were interictal.
    _, labels = label_windows(300, 1.0, 10, 10, [], horizon_s=60.0, postictal_s=30.0, nearby_seizures=[(330.0, 360.0)])
    assert labels.tolist() == [0] * 27 + [-1] * 3
    # Own seizure at 30 s, the previous file's ended 20 s before this file began (post-ictal 30 s): [0, 10) is still
    # recovery, [10, 30) preictal.
    _, labels = label_windows(120, 1.0, 10, 10, [(30.0, 40.0)], horizon_s=60.0, postictal_s=30.0, nearby_seizures=[(-50.0, -20.0)])
    assert labels[:3].tolist() == [-1, 1, 1]


def test_neighbouring_files_are_placed_by_their_clock_times_across_midnight(tmp_path: Path) -> None:
    subject = tmp_path / "chb96"
    subject.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        _write_edf(subject / f"chb96_0{i}.edf", rng.uniform(-100.0, 100.0, size=(3, 300 * 32)), 32)
    (subject / "chb96-summary.txt").write_text(
        "File Name: chb96_01.edf\nFile Start Time: 23:50:00\nNumber of Seizures in File: 0\n\n"
        "File Name: chb96_02.edf\nFile Start Time: 00:00:00\nNumber of Seizures in File: 1\n"  # the next day
        "Seizure Start Time: 30 seconds\nSeizure End Time: 60 seconds\n\n"
        "File Name: chb96_03.edf\nNumber of Seizures in File: 0\n"  # no time: right after chb96_02
    )
    first, second, third = load_chbmit_folder(tmp_path, n_channels=3)
    assert first.nearby_seizures == [(630.0, 660.0)]  # 23:50 + 600 s + 30 s
    assert second.nearby_seizures == [] and second.seizures == [(30.0, 60.0)]
    assert third.nearby_seizures == [(-270.0, -240.0)]


def test_a_leading_file_without_a_start_time_ends_where_the_next_file_starts(tmp_path: Path) -> None:
    """Before: it was put at 00:00:00, so the end of chb95_01 read as interictal although chb95_02, which starts at
    11:00:00, opens with a seizure."""
    subject = tmp_path / "chb95"
    subject.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        _write_edf(subject / f"chb95_0{i}.edf", rng.uniform(-100.0, 100.0, size=(3, 300 * 32)), 32)
    (subject / "chb95-summary.txt").write_text(
        "File Name: chb95_01.edf\nNumber of Seizures in File: 0\n\n"
        "File Name: chb95_02.edf\nFile Start Time: 11:00:00\nNumber of Seizures in File: 1\n"
        "Seizure Start Time: 30 seconds\nSeizure End Time: 60 seconds\n"
    )
    first, second = load_chbmit_folder(tmp_path, n_channels=3)
    assert first.nearby_seizures == [(330.0, 360.0)]  # chb95_01 runs 10:55-11:00; the seizure is 30 s after its end
    assert second.nearby_seizures == []


def _subject_folder(root: Path, name: str, seizure_files: int, quiet_files: int) -> None:
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(len(name) + seizure_files)
    summary = []
    for i in range(1, seizure_files + quiet_files + 1):
        _write_edf(folder / f"{name}_{i:02d}.edf", rng.uniform(-100.0, 100.0, size=(3, 300 * 32)), 32)
        seizure = "1\nSeizure Start Time: 200 seconds\nSeizure End Time: 230 seconds" if i <= seizure_files else "0"
        summary.append(f"File Name: {name}_{i:02d}.edf\nNumber of Seizures in File: {seizure}\n")
    (folder / f"{name}-summary.txt").write_text("\n".join(summary))


def test_a_subject_has_one_domain_index_in_every_split(tmp_path: Path) -> None:
    """Before: each split numbered its own subjects, so a chb99 validation window carried another subject's index."""
    _subject_folder(tmp_path, "chb98", 0, 1)
    _subject_folder(tmp_path, "chb99", 2, 2)
    dm = EEGSeizureDataModule(data_dir=str(tmp_path), n_channels=3, horizon_minutes=1.0, postictal_minutes=0.5,
                              val_fraction=0.5, test_fraction=0.0)
    dm.setup()
    index_of: dict[str, set[int]] = {}
    for split in ("train", "val"):
        windows = dm.datasets[split]
        for rec, domain in zip(windows.recordings, windows.domains):
            index_of.setdefault(rec.subject, set()).add(int(domain))
    assert {s for s in index_of if len(index_of[s]) > 1} == set()
    assert {rec.subject for rec in dm.recordings["train"]} & {rec.subject for rec in dm.recordings["val"]} == {"chb99"}
    train_subjects = sorted({rec.subject for rec in dm.recordings["train"]})
    assert [index_of[s].pop() for s in train_subjects] == list(range(len(train_subjects)))


def test_a_split_without_a_preictal_window_is_one_line(tmp_path: Path) -> None:
    """Before: a forecaster trained on one class, and validated with an AUROC of nothing, without a word."""
    dm = EEGSeizureDataModule(n_channels=2, recording_minutes=20.0, n_train_recordings=2, n_val_recordings=1,
                              n_test_recordings=1)
    with pytest.raises(DataFormatError) as error:
        dm.setup()
    assert "the train windows hold no preictal window: synthetic recordings of 20 min hold no seizure" in _one_line(error)
    _subject_folder(tmp_path, "chb99", 2, 3)
    dm = EEGSeizureDataModule(data_dir=str(tmp_path), n_channels=3, horizon_minutes=1.0, val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(DataFormatError) as error:
        dm.setup()  # of 2 seizure files, one goes to validation and one to test
    assert "no seizure file fell in it; lower --data.val_fraction" in _one_line(error)


def test_a_test_split_without_preictal_windows_warns_once_per_test_run(chb_folder) -> None:
    """A seizure-free held-out split still measures false detections, but its AUROC and sensitivity are undefined.
    Before: no word (train/val are checked at setup); the test logged test/auroc = 0.0."""
    import warnings

    folder, signals = chb_folder
    subject = folder / "chb99"
    for i in (3, 4, 5):  # three more seizure-free files: the stratified split puts round(0.3 * 4) = 1 of them in test
        _write_edf(subject / f"chb99_{i:02d}.edf", signals[0], 32)
    summary = SUMMARY_PLAIN + "".join(f"\nFile Name: chb99_{i:02d}.edf\nNumber of Seizures in File: 0\n" for i in (3, 4, 5))
    (subject / "chb99-summary.txt").write_text(summary)
    dm = EEGSeizureDataModule(data_dir=str(folder), n_channels=3, horizon_minutes=1.0, postictal_minutes=0.5,
                              val_fraction=0.0, test_fraction=0.3)
    dm.setup()  # no warning at setup: a fit does not need the test split
    assert len(dm.recordings["test"]) == 1 and dm.recordings["test"][0].seizures == []
    assert (dm.test_set.labels == 1).sum() == 0 and len(dm.test_set) == 300 // 5
    with pytest.warns(UserWarning, match=r"the test windows \(1 recording\(s\)\) hold no preictal window \(no seizure file"):
        dm.test_dataloader()
    # a test split with a seizure says nothing
    with_seizure = EEGSeizureDataModule(n_channels=2, recording_minutes=30.0, n_train_recordings=1, n_val_recordings=1,
                                        n_test_recordings=1)
    with_seizure.setup()
    assert (with_seizure.test_set.labels == 1).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_seizure.test_dataloader()
