"""Round 30: the results scripts' verdicts and summary lines, and the docs quoting the latest replication run.

- dopamine_table: one seed has no interval, so the claim is UNDECIDED, not NOT REPRODUCED;
- replicate.lazy_fall: a layer "falls" only by more than a noise margin (an untrained run does not fall);
- detectors_table: a loaded cube has no abundances, so its mixed share is unknown, not "nan%";
- README.md / docs/replications.md: the headline numbers are the latest run's (round 24), and the SeND reading no
  longer claims a direction of V that the latest run reversed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from _toy import load_script

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ dopamine verdict
def dopamine_results(dopamine: list[float], frozen: list[float]) -> dict:
    return {
        "foundation": {"upright": [0.8] * len(frozen), "rotated": frozen},
        "methods": {
            "dopamine": {"acc": dopamine, "params": [24], "active": []},
            "frozen": {"acc": frozen, "params": [0], "active": []},
            "lora": {"acc": [a + 0.05 for a in dopamine], "params": [282], "active": []},
        },
        "test_images": 629,
    }


def test_one_seed_leaves_the_dopamine_claim_undecided() -> None:
    verdicts = load_script("dopamine_table").verdicts
    line = verdicts(dopamine_results([0.90], [0.70]))[0]  # +20 points on the one seed, but no interval
    assert "NOT REPRODUCED" not in line and "REPRODUCED" not in line.replace("UNDECIDED", "")
    assert line.endswith(": UNDECIDED (+20.0 points, undecided (one seed: no interval)).")


def test_the_reason_for_no_interval_is_read_from_the_pair_decided() -> None:
    # review R3: a one-seed Dopamine run beside three frozen seeds was said "a seed without a finite accuracy"
    verdicts = load_script("dopamine_table").verdicts
    line = verdicts(dopamine_results([0.90], [0.70, 0.72, 0.71]))[0]
    assert "undecided (one seed: no interval)" in line


def test_a_seed_without_a_finite_accuracy_is_named_not_called_one_seed() -> None:
    verdicts = load_script("dopamine_table").verdicts
    line = verdicts(dopamine_results([0.90, math.nan, 0.80], [0.70, 0.70, 0.70]))[0]
    assert "UNDECIDED" in line and "a seed without a finite accuracy: no interval" in line and "one seed" not in line


def test_seeds_with_an_interval_keep_the_two_verdicts() -> None:
    verdicts = load_script("dopamine_table").verdicts
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653 -> [-0.0048, +0.0448]: includes 0
    line = verdicts(dopamine_results([0.71, 0.72, 0.73], [0.70, 0.70, 0.70]))[0]
    assert ": NOT REPRODUCED (+2.0 [-0.5, +4.5] points, not separable (interval includes 0))." in line
    # differences 0.10, 0.11, 0.12 -> [+0.075, +0.135]: above 0
    line = verdicts(dopamine_results([0.80, 0.81, 0.82], [0.70, 0.70, 0.70]))[0]
    assert ": REPRODUCED (+11.0 [+8.5, +13.5] points, yes)." in line


# ------------------------------------------------------------------------------ lazy-neuron fall
def test_lazy_fall_margin_against_a_hand_worked_series() -> None:
    lazy_fall = load_script("replicate").lazy_fall
    nonzero = np.array([0.50, 0.49, 0.51, 0.47, 0.48, 0.46])
    start, end, margin = lazy_fall(nonzero)
    # |Δ| = 0.01, 0.02, 0.04, 0.01, 0.02 -> median 0.02; σ = 0.02 / (0.674490 · √2) = 0.0209672;
    # margin = 3 σ √(4/3) = 0.0726324; end = (0.47 + 0.48 + 0.46) / 3 = 0.47; fall 0.03 < margin
    assert start == 0.50 and math.isclose(end, 0.47, rel_tol=1e-12)
    assert math.isclose(margin, 0.0726324, rel_tol=1e-5)


def test_an_untrained_run_does_not_fall_and_a_trained_one_does() -> None:
    replicate = load_script("replicate")
    # the lr = 0 run of the skeptic's check (blocks.1, seed 1): 47.27 % -> 47.24 %, batch noise only
    untrained = np.array([47.27, 47.28, 47.27, 47.24, 47.27, 47.29, 47.27, 47.26, 47.27, 47.19]) / 100
    start, end, margin = replicate.lazy_fall(untrained)
    assert end < start and not start - end > margin
    # the lazy recipe's blocks.0 (seed 0, 27 logged batches, round 24's rerun): 51.5 % -> 40.7 %
    trained = np.array([51.5, 51.0, 50.0, 45.2, 44.0, 43.1, 39.8, 41.0, 41.8, 41.5, 41.6, 41.3, 41.0, 40.4, 39.7,
                        39.2, 38.9, 39.1, 39.3, 39.4, 39.8, 40.0, 40.5, 40.7, 40.7, 40.7, 40.7]) / 100
    start, end, margin = replicate.lazy_fall(trained)
    assert start - end > margin and margin < 0.02


def test_too_few_points_are_no_verdict_and_a_gradual_fall_is_no_noise() -> None:
    # review R3: with 2-3 points the end's mean held the start and no drop passed the margin (a verdict "no"); a
    # steady fall's differences were read as noise (median|Δ| is its slope)
    lazy_fall = load_script("replicate").lazy_fall
    for short in ([0.9, 0.1], [0.9, 0.1, 0.1], [0.95, 0.5, 0.05, 0.05, 0.05]):
        assert lazy_fall(np.array(short)) is None
    steady = np.linspace(0.50, 0.45, 6)  # a noise-free fall of 5 points: Δ = -0.01 each, no spread around it
    start, end, margin = lazy_fall(steady)
    assert math.isclose(start - end, 0.04, rel_tol=1e-9) and margin == 0.0
    # a fall with noise: Δ = -0.03, -0.01, -0.02, -0.02, -0.01, -0.03 -> median -0.02, |Δ + 0.02| median 0.01
    noisy = np.array([0.60, 0.57, 0.56, 0.54, 0.52, 0.51, 0.48])
    start, end, margin = lazy_fall(noisy)
    assert math.isclose(margin, 3 * 0.01 / (0.6744897501960817 * math.sqrt(2)) * math.sqrt(4 / 3), rel_tol=1e-9)
    assert start - end > margin


def test_a_lazy_row_of_too_few_points_is_undecided_not_a_no(monkeypatch, tmp_path) -> None:
    # review R5: "too few to tell" was written beside a "no" (a refutation from data it called too few)
    replicate = load_script("replicate")
    points = {"short": np.array([0.1, 0.5, 0.9, 0.9, 0.9]), "flat": np.full(8, 0.5),
              "falls": np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])}  # zero fractions: nonzero falls 90 -> 10 %
    monkeypatch.setattr(replicate, "_figure", lambda *args, **kwargs: None)
    monkeypatch.setattr(replicate, "_points", lambda name: (np.arange(len(points[name])), points[name]))

    def verdict(*layers: str) -> str:
        monkeypatch.setattr(replicate, "series_by_layer", lambda *args: {f"model.blocks.{n}.mlp.act": n for n in layers})
        return replicate.table([replicate.lazy_row(tmp_path, tmp_path)]).splitlines()[-1].rsplit("|", 2)[-2].strip()

    assert verdict("short", "falls") == "undecided"
    assert verdict("short", "flat") == "no"  # a layer that does not fall decides
    assert verdict("falls") == "yes"


# ------------------------------------------------------------------------------ detectors' mixed share
def test_the_mixed_share_is_unknown_without_abundances() -> None:
    mixed_share = load_script("detectors_table").mixed_share
    loaded = [{"mixed_fraction": math.nan}, {"mixed_fraction": math.nan}]
    assert "nan" not in mixed_share(loaded) and "unknown" in mixed_share(loaded)
    assert mixed_share([{"mixed_fraction": 0.30}, {"mixed_fraction": 0.40}]) == "35% of them mixed (sub-pixel)"


def test_the_detectors_summary_line_of_a_loaded_cube_has_no_nan(monkeypatch) -> None:
    detectors = load_script("detectors_table")

    def loaded_cube(seeds: list[int], **kwargs) -> list[dict]:  # evaluate_seed's shape for a --path cube
        scores = {m: {"ap": 0.5 + 0.01 * i, "roc_auc": 0.9 + 0.001 * i} for i, m in enumerate(detectors.METHODS)}
        return [{"scores": scores, "positives": 100, "pixels": 4096, "mixed_fraction": math.nan, "test_scenes": 4}
                for _ in seeds]

    monkeypatch.setattr(detectors, "run_seeds", loaded_cube)
    line = next(line for line in detectors.main(["--seeds", "0", "1"]).splitlines() if line.startswith("Seeds"))
    assert "nan" not in line and "mixed (sub-pixel) unknown" in line


# ------------------------------------------------------------------------------ docs: the latest run
def test_the_readme_quotes_the_latest_replication_run() -> None:
    readme = " ".join((REPO / "README.md").read_text().split())
    replications = " ".join((REPO / "docs" / "replications.md").read_text().split())
    latest = replications[replications.index("Latest run: round 24"):]
    send_row = latest[latest.index("| SeND |"):]
    send_interval = re.search(r"EigenScore std (\S+ \[[^\]]+\])", send_row).group(1)
    good_fits = re.search(r"\((\d) of 4 layers ≥ 0\.95\)", latest).group(1)
    assert f"EigenScore spread {send_interval}" in readme
    assert f"{good_fits} of 4 layers ≥ 0.95" in readme


def test_the_send_reading_claims_no_direction_the_latest_run_reversed() -> None:
    replications = " ".join((REPO / "docs" / "replications.md").read_text().split())
    latest = replications[replications.index("Latest run: round 24"):]
    v_pairs = re.findall(r"(\d\.\d+) vs (\d\.\d+)", re.search(r"\(V ([^)]*)\)", latest.split("| SeND |")[1]).group(1))
    assert all(float(drop) > float(keep) for drop, keep in v_pairs)  # dropping raised V in every seed there
    assert "lowers their mean sensitivity V in every seed" not in replications
