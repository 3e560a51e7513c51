"""The HTML run report: a real tiny run, a crashed run, the content rules on fixture runs, two runs compared."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_act.errors import DataNotFoundError
from lightning_act.report import build_report, load_run
from lightning_act.report.html import main
from lightning_act.report.runlog import emergence_fits
from lightning_act.report.skipped import SKIPPED_FILE, read_skipped, record_skipped

def figures(text: str) -> dict[str, tuple[list[dict], dict]]:
    """``{div id: (traces, layout)}`` of every ``Plotly.newPlot`` call on a page."""
    decoder = json.JSONDecoder()
    found: dict[str, tuple[list[dict], dict]] = {}
    position = 0
    while (position := text.find("Plotly.newPlot(", position)) != -1:
        values = []
        cursor = position + len("Plotly.newPlot(")
        for _ in range(3):
            while text[cursor] in " \n\t,":
                cursor += 1
            value, cursor = decoder.raw_decode(text, cursor)
            values.append(value)
        found[values[0]] = (values[1], values[2])
        position = cursor
    return found


def section_ids(text: str) -> list[str]:
    return re.findall(r"<h2 id='([^']+)'>", text)


def figure_for(text: str, prefix: str) -> tuple[list[dict], dict]:
    """The one figure whose id starts with ``fig-<prefix>-`` followed by its number."""
    matches = {k: v for k, v in figures(text).items() if re.fullmatch(f"fig-{re.escape(prefix)}-\\d+", k)}
    assert len(matches) == 1, (prefix, sorted(figures(text)))
    return next(iter(matches.values()))


def write_csv(path: Path, header: list[str], rows: list[dict[str, float]], truncated_tail: str | None = None) -> None:
    """A CSVLogger-style metrics.csv (one sparse row per logging call), optionally cut mid-line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if k not in row else repr(row[k]) if isinstance(row[k], float) else row[k]) for k in header})
        if truncated_tail is not None:
            handle.write(truncated_tail)


FIT = {"A": 2.0, "lambda": 0.5, "gamma": 0.01, "t0": 1.0, "K": 0.3}


def emergence_numpy(t: np.ndarray) -> np.ndarray:
    x = FIT["gamma"] * t + FIT["t0"]
    return FIT["A"] * np.exp(-FIT["lambda"] * x) * np.log(x) + FIT["K"]


def write_crashed_run(root: Path) -> Path:
    """A run that logged act/, massive/ (with fits) and losses, then died while writing a line."""
    layers = ["model.blocks.0", "model.blocks.1", "model.blocks.10"]
    fit_cols = [f"massive/{layer}/fit_{name}" for layer in layers[:2] for name in [*FIT, "r2", "peak_step"]]
    header = sorted(
        [f"act/{layer}/{stat}" for layer in layers for stat in ("rms", "zero_frac")]
        + [f"massive/{layer}/{stat}" for layer in layers for stat in ("ratio", "top1")]
        + fit_cols
    ) + ["epoch", "step", "train/loss", "val/acc", "val/loss"]
    rows: list[dict[str, float]] = []
    for step in range(0, 100, 10):
        monitor = {f"act/{layer}/rms": 1.0 + i + step / 100 for i, layer in enumerate(layers)}
        monitor.update({f"act/{layer}/zero_frac": 0.1 * i for i, layer in enumerate(layers)})
        monitor.update({f"massive/{layer}/ratio": float(emergence_numpy(np.array(step))) for layer in layers})
        monitor.update({f"massive/{layer}/top1": 10.0 + step for layer in layers})
        monitor["step"] = step
        rows.append(monitor)
        rows.append({"step": step, "train/loss": 2.0 - step / 100, "epoch": 0})
    rows.append({"step": 49, "val/loss": 1.5, "val/acc": 0.4, "epoch": 0})
    early = {f"massive/model.blocks.0/fit_{k}": v * 3 for k, v in FIT.items()} | {"step": 50}
    final = {f"massive/model.blocks.0/fit_{k}": v for k, v in FIT.items()} | {
        "massive/model.blocks.0/fit_r2": 0.97, "massive/model.blocks.0/fit_peak_step": 50.0, "step": 90,
    }
    failed = {f"massive/model.blocks.1/fit_{k}": math.nan for k in FIT} | {"step": 90}
    later_failed = {f"massive/model.blocks.0/fit_{k}": math.nan for k in FIT} | {"step": 95}
    rows += [early, final, failed, later_failed]
    malformed_row = "1.0,2.0\n"
    path = root / "csv" / "version_0" / "metrics.csv"
    write_csv(path, header, rows, truncated_tail=None)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    lines.insert(5, malformed_row)
    path.write_text("".join(lines) + "0.5,0.6,0.")
    return path


# ---------------------------------------------------------------- (a) a real tiny run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.callbacks import ActivationStats
    from lightning_act.tasks.image_classification import ImageClassifier

    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    model = ImageClassifier(model_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2))
    trainer = pl.Trainer(
        max_steps=5, logger=CSVLogger(save_dir=root, name="csv"), callbacks=[ActivationStats(every_n_steps=2)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=16))
    (root / "config.yaml").write_text("seed_everything: 0\ntrainer:\n  max_steps: 5\nckpt_path: null\n")
    return root


def test_real_run_report(real_run: Path, tmp_path: Path) -> None:
    import plotly.offline

    output = build_report(real_run, tmp_path / "report.html")
    text = output.read_text()
    with (real_run / "csv" / "version_0" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert section_ids(text) == ["training", "test", "act", "skipped", "config"]
    # every act statistic that varies has its curves, with exactly the CSV's values per layer
    key = next(c for c in rows[0] if c.startswith("act/") and c.endswith("/rms"))
    layer = key.split("/")[1]
    traces, layout = figure_for(text, "act-rms")
    trace = next(t for t in traces if t["name"] == layer)
    expected = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
    assert list(zip(trace["x"], trace["y"], strict=True)) == expected == [(s, v) for s, v in expected if s in (0, 2, 4)]
    assert [b["label"] for b in layout["updatemenus"][0]["buttons"]] == ["linear", "log"]
    # the ViT's activations have no NaN/inf: one line, no panel
    assert "no non-finite values (NaN/inf) in any layer at any logged step" in text
    assert not any(k.startswith("fig-act-nonfinite") for k in figures(text))
    # plotly.js embedded exactly once, nothing fetched
    assert text.count(plotly.offline.get_plotlyjs()[:300]) == 1
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    assert "seed_everything: 0" in text and "hparams.yaml" in text and "fit config" in text


def test_real_run_series_match_csv(real_run: Path) -> None:
    run = load_run(real_run)
    path = real_run / "csv" / "version_0" / "metrics.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    key = next(c for c in rows[0] if c.endswith("/rms"))
    expected = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
    assert list(zip(run.series[key].steps, run.series[key].values, strict=True)) == expected
    assert run.metrics_csv == path and len(run.parts) == 1 and run.notes == []


# ---------------------------------------------------------------- (b) a run that crashed half-way


def test_crashed_run_reads_complete_rows(tmp_path: Path) -> None:
    path = write_crashed_run(tmp_path / "kat")
    run = load_run(tmp_path / "kat")
    assert run.metrics_csv == path
    assert any("truncated last line" in n for n in run.notes)
    assert any("skipped 1 malformed row" in n for n in run.notes)
    assert run.series["train/loss"].steps == list(range(0, 100, 10))
    assert run.series["train/loss"].values == pytest.approx([2.0 - s / 100 for s in range(0, 100, 10)])
    monitors = run.monitors()
    assert list(monitors) == ["act", "massive"]
    assert list(monitors["act"]["rms"]) == ["model.blocks.0", "model.blocks.1", "model.blocks.10"]


def test_emergence_fit_is_last_complete_one(tmp_path: Path) -> None:
    write_crashed_run(tmp_path / "kat")
    fits = emergence_fits(load_run(tmp_path / "kat").monitors()["massive"])
    assert fits["model.blocks.1"] is None
    fit = fits["model.blocks.0"]
    assert fit is not None and fit.step == 90 and fit.parameters == FIT
    assert fit.r2 == 0.97 and fit.peak_step == 50.0
    # hand-worked: t = 100 → x = 0.01·100 + 1 = 2 → 2·e^(−1)·ln 2 + 0.3
    assert float(fit.curve(np.array([100.0]))[0]) == pytest.approx(2 * math.exp(-1) * math.log(2) + 0.3, rel=1e-12)
    t = np.linspace(0, 500, 11)
    np.testing.assert_allclose(fit.curve(t), emergence_numpy(t), rtol=1e-12)
    assert math.isnan(float(fit.curve(np.array([-200.0]))[0]))


def test_crashed_run_report(tmp_path: Path) -> None:
    write_crashed_run(tmp_path / "kat")
    text = build_report(tmp_path / "kat", tmp_path / "out" / "kat.html").read_text()
    assert section_ids(text) == ["training", "test", "act", "massive", "massive-fits", "skipped", "config"]
    assert "Reading problems" in text and "truncated last line" in text
    # blocks.1's fit failed (NaN parameters): listed in the fit table and among the skipped layers
    assert text.count("no complete fit logged") == 1
    assert "no complete fit in metrics.csv (the fit failed; reason not recorded)" in text
    assert "<td>0.97</td>" in text and "<td>0.01</td>" in text
    # zero_frac 0.1·i differs between layers but not over steps: kept; massive/top1 varies: kept
    figure_for(text, "act-zero-frac")
    figure_for(text, "massive-top1")


def test_empty_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("")
    text = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert figures(text) == {} and section_ids(text) == ["training", "test", "config"]
    assert "the run stopped before anything was logged" in text


# ---------------------------------------------------------------- (c) content rules, each on a fixture run


def write_content_run(root: Path) -> Path:
    """A run whose statistics break every content rule once; returns the version folder."""
    layers = ["blocks.0", "blocks.1", "blocks.2"]
    steps = list(range(0, 120, 10))
    rows: list[dict[str, float]] = []
    for step in steps:
        row: dict[str, float] = {"step": step}
        for i, layer in enumerate(layers):
            top = 5.0 + i + step / 10
            row |= {
                f"sparsity/{layer}/nonfinite": 0.0,                         # all zero → one line
                f"sparsity/{layer}/zero_frac": 0.1 * i + step / 1000,       # a real curve
                f"massive/{layer}/count": 0.0,                              # all zero → one line
                f"massive/{layer}/top1": top,                               # == top0_value → shown once
                f"massive/{layer}/top0_value": top,
                f"massive/{layer}/top0_token": float(step % 3),             # positions → table + scatter
                f"massive/{layer}/top0_feature": float(7 + i),
                f"massive/{layer}/ratio": 10.0 + i + step / 100,
                f"act/{layer}/rms": math.nan if layer == "blocks.2" else 1.0 + step / 100,
            }
        rows.append(row)
        rows.append({"step": step, "train/loss": 2.0 - step / 100})
    bad = {"A": -1500.0, "lambda": 0.3, "gamma": 0.02, "t0": 1.0, "K": 12.0}
    rows.append(
        {f"massive/blocks.0/fit_{k}": v for k, v in FIT.items()}
        | {f"massive/blocks.1/fit_{k}": v for k, v in bad.items()}
        | {"massive/blocks.0/fit_r2": 0.97, "massive/blocks.1/fit_r2": 0.017, "step": 110}
    )
    header = sorted({k for row in rows for k in row} | {"epoch"})
    version = root / "csv" / "version_0"
    write_csv(version / "metrics.csv", header, rows)
    return version


def test_constant_and_duplicate_statistics_are_one_line(tmp_path: Path) -> None:
    write_content_run(tmp_path / "run")
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    ids = set(figures(text))
    for gone in ("sparsity-nonfinite", "massive-count", "massive-top1-", "massive-top0-token", "massive-top0-feature"):
        assert not any(i.startswith("fig-" + gone) for i in ids), gone
    assert "<li>no non-finite values (NaN/inf) in any layer at any logged step</li>" in text
    assert "<li>no massive activations: the count of massive entries is 0 in every layer at every logged step</li>" in text
    assert "<li>top1 is identical to top0_value (shown once)</li>" in text
    assert "top0_value (also top1: identical)</h3>" in text
    traces, _ = figure_for(text, "massive-top0-value")
    assert [t["name"] for t in traces] == ["blocks.0", "blocks.1", "blocks.2"]


def test_positions_are_a_table_and_points(tmp_path: Path) -> None:
    write_content_run(tmp_path / "run")
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    traces, layout = figure_for(text, "massive-feature")
    assert {t["mode"] for t in traces} == {"markers"} and layout["yaxis"]["tickformat"] == "d"
    assert next(t for t in traces if t["name"] == "blocks.1")["y"] == [8.0] * 12
    tokens, _ = figure_for(text, "massive-token")
    assert next(t for t in tokens if t["name"] == "blocks.0")["y"] == [float(s % 3) for s in range(0, 120, 10)]
    # last step 110: token 110 % 3 = 2, feature 7 + i; top 0 sat at (2, 7) at 4 of the 12 steps (20, 50, 80, 110)
    assert "<td>run</td><td>blocks.0</td><td>110</td><td>(2, 7)</td><td>4 / 12</td>" in text


def test_steps_and_positions_are_printed_whole_and_compared_unrounded(tmp_path: Path) -> None:
    # before: ".4g" showed features 10000 and 10001 both as "1e+04", counted them as one position (2 / 2), and
    # printed step 12345 as "1.234e+04"
    rows = [{"step": step, "massive/blocks.0/top0_feature": feature, "massive/blocks.0/top0_value": 100.0}
            for step, feature in ((0, 10000.0), (12345, 10001.0))]
    rows.append({"step": 12345, **{f"massive/blocks.0/fit_{k}": v for k, v in FIT.items()}, "massive/blocks.0/fit_r2": 0.9,
                 "massive/blocks.0/fit_peak_step": 20000.0})
    write_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", sorted({k for r in rows for k in r} | {"epoch"}), rows)
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert "<td>run</td><td>blocks.0</td><td>12345</td><td>(10001)</td><td>1 / 2</td>" in text
    # R², peak step (a fit's prediction beyond the last step said to be one), fitted at step
    assert "<td>0.9</td><td>20000 <span class='muted'>(after the run: extrapolated)</span></td><td>12345</td>" in text
    assert "(steps 0 – 12345)" in text and "<td>0 – 12345</td>" in text
    rows[-1]["massive/blocks.0/fit_peak_step"] = 12000.0  # within the run: no note
    write_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", sorted({k for r in rows for k in r} | {"epoch"}), rows)
    assert "<td>0.9</td><td>12000</td><td>12345</td>" in build_report(tmp_path / "run", tmp_path / "r.html").read_text()


def test_failed_emergence_fit_is_hidden_and_cannot_squash_the_data(tmp_path: Path) -> None:
    write_content_run(tmp_path / "run")
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    traces, layout = figure_for(text, "massive-fits")
    fits = {t["name"]: t for t in traces if t["mode"] == "lines"}
    good, bad = fits["run · blocks.0: fit R² 0.97"], fits["run · blocks.1: fit R² 0.017 (< 0.5)"]
    assert good.get("visible", True) is True and good["line"]["dash"] == "solid"
    assert bad["visible"] == "legendonly" and bad["line"]["color"] == "#aaaaaa"
    # blocks.1 (second subplot) keeps the logged ratio's range 11 … 12.1, padded by 10 %, although f reaches ~ −1500
    low, high = layout["yaxis2"]["range"]
    assert low == pytest.approx(11.0 - 0.11) and high == pytest.approx(12.1 + 0.11)
    assert min(v for v in bad["y"] if v is not None) < -100
    assert "R² &lt; 0.5: hidden" in text and text.count("<td>drawn</td>") == 1
    # the fit curve is the paper's formula, checked against numpy at the drawn grid
    np.testing.assert_allclose(good["y"], emergence_numpy(np.array(good["x"])), rtol=1e-9)


def test_every_skipped_layer_is_listed_with_its_reason(tmp_path: Path) -> None:
    version = write_content_run(tmp_path / "run")
    record_skipped(version, "massive", "emergence fit", {"blocks.2": "5 ratio points, the fit needs at least 6"})
    record_skipped(version, "sparsity", "cett", {"blocks.9": "no down-projection input was seen"})
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert "<td>run</td><td>massive</td><td>emergence fit</td><td>blocks.2</td><td>5 ratio points, the fit needs at least 6</td>" in text
    assert "<td>run</td><td>sparsity</td><td>cett</td><td>blocks.9</td><td>no down-projection input was seen</td>" in text
    assert "<td>run</td><td>act</td><td>rms</td><td>blocks.2</td><td>unknown at every logged step (12 step(s))</td>" in text
    assert "only unknown values in: blocks.2" in text


def test_skipped_file_round_trip(tmp_path: Path) -> None:
    record_skipped(tmp_path, "massive", "emergence fit", {"a": "too few points", "b": "no convergence"})
    record_skipped(tmp_path, "collapse", "erank", {"c": "1-d output"})
    record_skipped(tmp_path, "massive", "emergence fit", {"b": "no convergence"})
    assert json.loads((tmp_path / SKIPPED_FILE).read_text()) == {
        "collapse": {"erank": {"c": "1-d output"}}, "massive": {"emergence fit": {"b": "no convergence"}},
    }
    skipped, notes = read_skipped([tmp_path])
    assert [(s.monitor, s.layer, s.reason) for s in skipped] == [("collapse", "c", "1-d output"), ("massive", "b", "no convergence")]
    assert notes == [] and not list(tmp_path.rglob("*.tmp"))
    (tmp_path / SKIPPED_FILE).write_text("{half")
    assert read_skipped([tmp_path])[1][0].startswith(f"could not read {tmp_path / SKIPPED_FILE}")


def test_resumed_run_is_merged_and_test_metrics_are_shown(tmp_path: Path) -> None:
    header = ["epoch", "step", "train/loss", "act/blocks.0/rms"]
    first = [{"step": s, "train/loss": 10.0 + s} for s in range(0, 100, 10)]      # crashed after step 90
    second = [{"step": s, "train/loss": 20.0 + s} for s in range(60, 150, 10)]    # resumed from the step-60 checkpoint
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", header, first)
    write_csv(tmp_path / "csv" / "version_1" / "metrics.csv", header, second)
    write_csv(tmp_path / "csv" / "version_2" / "metrics.csv", ["epoch", "step", "test/acc", "test/loss"],
              [{"step": 140, "test/acc": 0.875, "test/loss": 0.25}])
    run = load_run(tmp_path)
    assert run.series["train/loss"].steps == list(range(0, 150, 10))
    assert run.series["train/loss"].values == [10.0 + s for s in range(0, 60, 10)] + [20.0 + s for s in range(60, 150, 10)]
    assert run.test_metrics() == {"test/acc": 0.875, "test/loss": 0.25}
    assert "train/loss" in run.training_keys() and "test/acc" not in run.training_keys()
    assert any("version_1/metrics.csv resumes at step 60: it replaces 4 later value(s)" in n for n in run.notes)
    text = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert "<tr><td>test/acc</td><td>0.875</td></tr>" in text
    traces, _ = figure_for(text, "training-loss")
    assert [t["x"] for t in traces] == [list(range(0, 150, 10))]


def test_fit_config_is_shown_not_the_last_commands(tmp_path: Path) -> None:
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 1.0}])
    (tmp_path / "config.yaml").write_text("seed_everything: 0\nckpt_path: runs/kat/checkpoints/last.ckpt\nverbose: true\n")
    run = load_run(tmp_path)
    assert list(run.configs) == ["test or validate config"]
    assert any("saved by a later `test or validate` command" in n for n in run.notes)
    (tmp_path / "fit_config.yaml").write_text("seed_everything: 0\nckpt_path: null\ntrainer:\n  max_epochs: 3\n")
    run = load_run(tmp_path)
    assert list(run.configs) == ["fit config"] and run.configs["fit config"][0] == tmp_path / "fit_config.yaml"
    text = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert "max_epochs: 3" in text and "verbose: true" not in text


# ---------------------------------------------------------------- (d) several runs; not a run


def test_two_runs_are_overlaid_with_a_legend_by_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import plotly.offline

    write_crashed_run(tmp_path / "a" / "kat")
    write_content_run(tmp_path / "b" / "kat")
    output = tmp_path / "both.html"
    assert main([str(tmp_path / "a" / "kat"), str(tmp_path / "b" / "kat"), "-o", str(output)]) == 0
    assert capsys.readouterr().out == f"wrote {output}\n"
    text = output.read_text()
    assert output.stat().st_size < 15_000_000 and text.count(plotly.offline.get_plotlyjs()[:300]) == 1
    traces, layout = figure_for(text, "training-loss")
    assert [(t["legendgroup"], t["legendgrouptitle"]["text"], t["name"]) for t in traces] == [
        ("a/kat", "a/kat", "train/loss"), ("a/kat", "a/kat", "val/loss"), ("b/kat", "b/kat", "train/loss"),
    ]
    assert [t["line"]["dash"] for t in traces] == ["solid", "dash", "solid"]
    assert layout["legend"]["groupclick"] == "toggleitem"
    run_menu = layout["updatemenus"][1]["buttons"]
    assert [b["label"] for b in run_menu] == ["all runs", "only a/kat", "only b/kat"]
    assert run_menu[1]["args"] == [{"visible": [True, True, False]}]
    heat, heat_layout = figure_for(text, "massive-ratio-heatmap")
    assert [t["name"] for t in heat] == ["a/kat", "b/kat"] and [t["xaxis"] for t in heat] == ["x", "x2"]
    assert heat[0]["y"] == ["model.blocks.0", "model.blocks.1", "model.blocks.10"]
    assert [row[0] for row in heat[1]["z"]] == [10.0, 11.0, 12.0]
    assert heat_layout["coloraxis"]["colorscale"] == "Viridis"


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    message = (
        f"'{tmp_path}' holds no metrics.csv: the report reads the CSVLogger's metrics.csv; add "
        "lightning.pytorch.loggers.CSVLogger to the trainer's loggers and run the fit again, or pass the folder of a "
        "run that has one, e.g. runs/kat"
    )
    with pytest.raises(DataNotFoundError) as error:
        build_report(tmp_path, tmp_path / "r.html")
    assert str(error.value) == message
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"lightning_act report: error: {message}\n"
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(DataNotFoundError, match="does not exist; pass the run's folder"):
        load_run(tmp_path / "missing")


def test_a_run_logged_without_a_csv_logger_is_told_to_add_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # before: "'runs/kat' is not a lightning_act run directory ...; pass the run's folder, e.g. runs/kat" although it is
    run = tmp_path / "runs" / "kat"
    (run / "tb" / "version_0").mkdir(parents=True)
    (run / "tb" / "version_0" / "events.out.tfevents.1.host").write_bytes(b"")
    (run / "wandb" / "offline-run-x").mkdir(parents=True)
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"lightning_act report: error: '{run}' holds no metrics.csv (TensorBoard event files, a W&B run only): the "
        "report reads the CSVLogger's metrics.csv; add lightning.pytorch.loggers.CSVLogger to the trainer's loggers "
        "and run the fit again, or pass the folder of a run that has one, e.g. runs/kat\n"
    )


def test_named_versions_are_merged_in_the_order_they_were_written(tmp_path: Path) -> None:
    # a fit into CSVLogger(version="run"), resumed from its step-3 checkpoint into version="resume": by name, "resume"
    # came first and the fit, taken for a restart at step 0, replaced all of the resume's values
    header = ["epoch", "step", "train/loss"]
    fit = tmp_path / "csv" / "run" / "metrics.csv"
    resume = tmp_path / "csv" / "resume" / "metrics.csv"
    write_csv(fit, header, [{"step": s, "train/loss": 10.0 + s} for s in range(5)])
    write_csv(resume, header, [{"step": s, "train/loss": 20.0 + s} for s in range(3, 6)])
    os.utime(fit, (1_000_000_000, 1_000_000_000))
    run = load_run(tmp_path)
    assert [p.path for p in run.parts] == [fit, resume]
    assert run.series["train/loss"].last_per_step() == {0: 10.0, 1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0, 5: 25.0}
    # numbered versions keep their number order, also where a copy gave them other times
    for number, when in ((0, 3_000_000_000), (1, 2_000_000_000)):
        path = tmp_path / "copy" / "csv" / f"version_{number}" / "metrics.csv"
        write_csv(path, header, [{"step": s, "train/loss": 10.0 * (number + 1)} for s in range(2 * number, 4)])
        os.utime(path, (when, when))
    assert load_run(tmp_path / "copy").series["train/loss"].last_per_step() == {0: 10.0, 1: 10.0, 2: 20.0, 3: 20.0}


def test_a_resumed_fit_logging_unprefixed_names_replaces_the_rolled_back_steps(tmp_path: Path) -> None:
    # Lightning's usual `train_loss` (no `train/`) and no monitor step due in the resume: the resumed fit was taken
    # for a validate, its values were left out and the interrupted fit's rolled-back steps 4-7 shown instead
    header = ["epoch", "step", "train_loss", "val_loss"]
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", header,
              [{"step": s, "train_loss": 1.0 + s} for s in range(8)] + [{"step": 7, "val_loss": 0.5}])
    write_csv(tmp_path / "csv" / "version_1" / "metrics.csv", header,
              [{"step": s, "train_loss": 2.0 + s} for s in (4, 5)] + [{"step": 5, "val_loss": 0.25}])
    write_csv(tmp_path / "csv" / "version_2" / "metrics.csv", ["epoch", "step", "val_loss"], [{"step": 0, "val_loss": 0.75}])
    run = load_run(tmp_path)
    assert [part.logs_training for part in run.parts] == [True, True, False]
    assert run.series["train_loss"].last_per_step() == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 6.0, 5: 7.0}
    assert run.series["val_loss"].last_per_step() == {5: 0.25}  # the validate's step-0 value does not cut it


def test_several_logger_folders_pick_the_newest_training_one(tmp_path: Path) -> None:
    old = tmp_path / "old" / "version_0" / "metrics.csv"
    new = tmp_path / "new" / "version_0" / "metrics.csv"
    write_csv(old, ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 1.0}])
    write_csv(new, ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 2.0}])
    os.utime(old, (1_000_000_000, 1_000_000_000))
    run = load_run(tmp_path)
    assert [p.path for p in run.parts] == [new] and run.series["train/loss"].values == [2.0]
    assert run.notes == [f"{tmp_path} holds several runs; using {new.parent.parent} (newest training log), not {old.parent.parent}"]
    assert load_run(old.parent).metrics_csv == old  # asked for by name, it is used alone
    assert build_report(old) == old.parent / "report.html"


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_act.cli import main as cli_main

    write_csv(tmp_path / "run" / "metrics.csv", ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 1.5}])
    assert cli_main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "out.html")]) == 0
    assert section_ids((tmp_path / "out.html").read_text()) == ["training", "test", "config"]
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.endswith("does not exist; pass the run's folder, e.g. runs/kat\n")


def test_a_validate_run_does_not_cut_the_fits_validation_curve(tmp_path: Path) -> None:
    header = ["epoch", "step", "train/loss", "val/acc"]
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", header,
              [{"step": s, "train/loss": 1.0, "val/acc": 0.1 * s} for s in (2, 5, 8)])
    write_csv(tmp_path / "csv" / "version_1" / "metrics.csv", ["epoch", "step", "val/acc"], [{"step": 0, "val/acc": 0.5}])
    write_csv(tmp_path / "csv" / "version_2" / "metrics.csv", ["epoch", "step", "test/acc"], [{"step": 0, "test/acc": 0.75}])
    run = load_run(tmp_path)
    assert run.series["val/acc"].steps == [2, 5, 8]  # before: [0], the fit's curve cut at the validate's step 0
    assert run.test_metrics() == {"test/acc": 0.75}
    assert any("version_1/metrics.csv logs val/acc without training; the fit's curves are kept" in n for n in run.notes)


def test_report_output_is_written_whole_and_never_over_a_runs_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_act.cli import main as cli_main

    log = tmp_path / "csv" / "version_0" / "metrics.csv"
    write_csv(log, ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 2.3}, {"step": 9, "train/loss": 2.1}])
    before = log.read_text()
    assert cli_main(["report", str(tmp_path), "-o", str(log)]) == 2  # before: the log replaced by the page, rc 0
    assert log.read_text() == before and "is not an HTML page" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path), f"-o{log}"]) == 2  # before: these spellings were not checked
    assert log.read_text() == before and "is not an HTML page" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation of --output is no option at all
        cli_main(["report", str(tmp_path), "--out", str(log)])
    assert log.read_text() == before
    page = tmp_path / "r.html"
    page.write_text("the previous report")
    real_replace = os.replace

    def disk_full(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    os.replace = disk_full  # the write fails at the last moment: the previous page stays, nothing else is left
    try:
        assert cli_main(["report", str(tmp_path), "-o", str(page)]) == 2
    finally:
        os.replace = real_replace
    assert "cannot write the report to" in capsys.readouterr().err
    assert page.read_text() == "the previous report" and sorted(p.name for p in tmp_path.iterdir()) == ["csv", "r.html"]


def test_non_finite_points_are_shown_as_such(tmp_path: Path) -> None:
    # std NaN at one step (ActivationStats cannot always resolve it) and one value elsewhere was "std is 1 in every
    # layer at every logged step"; a diverged loss's curve bridged its NaN steps without a word; a NaN test metric
    # read "–", as a metric the run never logged.
    header = ["epoch", "step", "train/loss", "act/blocks.0/std", "act/blocks.1/std", "test/loss"]
    rows = [
        {"step": 10, "train/loss": 2.0, "act/blocks.0/std": math.nan, "act/blocks.1/std": 1.0},
        {"step": 20, "train/loss": math.nan, "act/blocks.0/std": 1.0, "act/blocks.1/std": 1.0},
        {"step": 30, "train/loss": math.nan, "act/blocks.0/std": 1.0, "act/blocks.1/std": 1.0},
        {"step": 30, "test/loss": math.nan},
    ]
    write_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", header, rows)
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert "std is 1 in every layer" not in text
    assert "blocks.0: std unknown at 1 of 3 logged steps, first at step 10" in text
    traces, _ = figure_for(text, "act-std")
    assert [t["y"] for t in traces if t["name"] == "blocks.0"] == [[None, 1.0, 1.0]]  # the line breaks there
    assert "train/loss: not finite (NaN/inf) at 2 of 3 logged steps, first at step 20" in text
    traces, _ = figure_for(text, "training-loss")
    assert [t["y"] for t in traces] == [[2.0, None, None]]
    assert "<td>test/loss</td><td>nan</td>" in text


def test_a_resumed_fits_skip_record_replaces_the_first_fits(tmp_path: Path) -> None:
    """Before: the versions were merged layer by layer, so a layer the resumed fit fitted stayed "skipped"."""
    first, resumed = tmp_path / "version_0", tmp_path / "version_1"
    record_skipped(first, "massive", "emergence fit", {"blocks.0": "4 ratio points, the fit needs at least 6"})
    record_skipped(first, "collapse", "erank", {"c": "1-d output"})
    record_skipped(resumed, "massive", "emergence fit", {})
    skipped, _ = read_skipped([first, resumed])
    assert [(s.monitor, s.what, s.layer) for s in skipped] == [("collapse", "erank", "c")]


# ---------------------------------------------------------------- (c) unknown statistics: gaps in metrics.csv


MOMENTS = ("mean", "std", "rms", "abs_mean", "abs_max")


def write_gapped_run(root: Path, old_nan: bool) -> Path:
    """Eight steps of monitors that left unknown statistics out (round 18), or logged NaN there (``old_nan``).

    act: ``blocks.0`` complete; ``side``'s moments unknown from step 3; ``never``'s at every step (it logs only its
    counts). massive ``zeroer``: ``ratio`` unknown at 3, 4, ``count`` at 3–5, its top-0 position at 7. sensitive
    ``enc``: ``jaccard`` only at re-selections (by design, never NaN).
    """
    unknown = math.nan if old_nan else None
    rows: list[dict[str, float]] = []
    for step in range(8):
        act: dict[str, float | None] = {"step": step}
        for layer in ("blocks.0", "side", "never"):
            act |= {f"act/{layer}/count": 64.0, f"act/{layer}/nonfinite": 64.0 if layer == "never" else 0.0,
                    f"act/{layer}/zero_frac": 0.0}
            known = layer == "blocks.0" or (layer == "side" and step < 3)
            act |= {f"act/{layer}/{m}": (1.0 + step / 10 + i if known else unknown) for i, m in enumerate(MOMENTS)}
        massive: dict[str, float | None] = {"step": step}
        for i, layer in enumerate(("blocks.0", "zeroer")):
            zeroer = layer == "zeroer"
            massive |= {
                f"massive/{layer}/median": 0.5 + i, f"massive/{layer}/top1": 5.0 + step + i,
                f"massive/{layer}/ratio": unknown if zeroer and step in (3, 4) else 10.0 + step + i,
                f"massive/{layer}/count": unknown if zeroer and step in (3, 4, 5) else 0.0,
                f"massive/{layer}/top0_token": unknown if zeroer and step == 7 else float(step % 2),
                f"massive/{layer}/top0_feature": unknown if zeroer and step == 7 else 3.0,
            }
        sensitive: dict[str, float | None] = {"step": step, "sensitive/enc/count": 4.0, "sensitive/enc/selected": 1.0}
        if step in (2, 5):
            sensitive["sensitive/enc/jaccard"] = 0.25 * step
        for row in (act, massive, sensitive, {"step": step, "train/loss": 2.0 - step / 10}):
            rows.append({k: v for k, v in row.items() if v is not None})
    header = sorted({k for row in rows for k in row} | {"epoch"})
    version = root / "csv" / "version_0"
    write_csv(version / "metrics.csv", header, rows)
    return version / "metrics.csv"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def logged_steps(rows: list[dict[str, str]], prefix: str, layer: str) -> list[int]:
    """Independently of the report: the steps where ``prefix/layer`` logged any statistic (a finite or NaN cell)."""
    return sorted({int(r["step"]) for r in rows for k, v in r.items() if k.startswith(f"{prefix}/{layer}/") and v})


def known_points(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of one column, NaN cells left out (unknown, as a gap)."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) and not math.isnan(float(r[key]))}


def page_body(text: str) -> str:
    """The page from the first section up to the configuration (no folder names, no date)."""
    return text[text.index("<section>"):text.index("<h2 id='config'>")]


def test_unknown_statistics_break_the_curves_are_noted_and_listed_as_skipped(tmp_path: Path) -> None:
    # before: gaps in metrics.csv (round 18's unknown statistics) were invisible: "No layer was skipped", no note on
    # side's moments, the ratio line joined step 2 to step 5 and "no massive activations" although count was unknown
    path = write_gapped_run(tmp_path / "gaps" / "run", old_nan=False)
    rows = read_rows(path)
    assert "act/never/mean" not in rows[0]  # never measured: no column at all
    text = build_report(tmp_path / "gaps" / "run", tmp_path / "gaps.html").read_text()

    never = logged_steps(rows, "act", "never")
    for moment in MOMENTS:
        assert (f"<td>run</td><td>act</td><td>{moment}</td><td>never</td>"
                f"<td>unknown at every logged step ({len(never)} step(s))</td>") in text
    assert "No layer was skipped" not in text
    mean_section = text[text.index("<h3 id='act-mean'>"):text.index("<h3", text.index("<h3 id='act-mean'>") + 1)]
    assert "only unknown values in: never" in mean_section
    side = logged_steps(rows, "act", "side")
    missing = [s for s in side if s not in known_points(rows, "act/side/mean")]
    assert f"side: mean unknown at {len(missing)} of {len(side)} logged steps, first at step {missing[0]}" in mean_section
    traces, _ = figure_for(text, "act-mean")
    trace = next(t for t in traces if t["name"] == "side")
    mean = known_points(rows, "act/side/mean")
    assert list(zip(trace["x"], trace["y"], strict=True)) == [(s, mean.get(s)) for s in side]

    zeroer = logged_steps(rows, "massive", "zeroer")
    ratio = known_points(rows, "massive/zeroer/ratio")
    traces, _ = figure_for(text, "massive-ratio")
    trace = next(t for t in traces if t["name"] == "zeroer")
    assert list(zip(trace["x"], trace["y"], strict=True)) == [(s, ratio.get(s)) for s in zeroer]  # None: a break
    assert None in trace["y"]
    count = known_points(rows, "massive/zeroer/count")
    unknown_count = [s for s in zeroer if s not in count]
    assert set(count.values()) == {0.0} and unknown_count
    assert "no massive activations" not in text and "count is 0 in every layer" not in text
    assert (f"zeroer: count unknown at {len(unknown_count)} of {len(zeroer)} logged steps, first at step "
            f"{unknown_count[0]}") in text
    tokens, features = known_points(rows, "massive/zeroer/top0_token"), known_points(rows, "massive/zeroer/top0_feature")
    last = max(tokens)
    held = sum(1 for s in tokens if (tokens[s], features[s]) == (tokens[last], features[last]))
    assert (f"<td>run</td><td>zeroer</td><td>{last}</td><td>({tokens[last]:.0f}, {features[last]:.0f})</td>"
            f"<td>{held} / {len(tokens)}</td>") in text

    # jaccard is logged only at re-selections: its other steps are not unknown
    traces, _ = figure_for(text, "sensitive-jaccard")
    assert traces[0]["y"] == list(known_points(rows, "sensitive/enc/jaccard").values())
    assert "jaccard unknown" not in text

    # a run of before round 18, NaN where the gaps are, reads the same
    write_gapped_run(tmp_path / "nan" / "run", old_nan=True)
    assert page_body(build_report(tmp_path / "nan" / "run", tmp_path / "nan.html").read_text()) == page_body(text)


@pytest.mark.parametrize(("prefix", "stat", "other", "claim"), [
    ("massive", "count", "top1", "no massive activations"),
    ("collapse", "collapsed", "erank", "no layer fell below the collapse threshold"),
    ("sparsity", "temporal_frac", "zero_frac", "temporal_frac is 0"),
    ("act", "nonfinite", "rms", "no non-finite values"),
])
def test_no_one_value_everywhere_claim_over_unknown_steps(tmp_path: Path, prefix: str, stat: str, other: str, claim: str) -> None:
    # before: a statistic 0 where logged and left out (unknown) at steps 3–5 of blocks.1 read "0 everywhere"
    rows = []
    for step in range(8):
        row: dict[str, float] = {"step": step}
        for i, layer in enumerate(("blocks.0", "blocks.1")):
            row[f"{prefix}/{layer}/{other}"] = 1.0 + i + step / 10
            if not (layer == "blocks.1" and 3 <= step <= 5):
                row[f"{prefix}/{layer}/{stat}"] = 0.0
        rows.append(row)
    path = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"
    write_csv(path, sorted({k for r in rows for k in r} | {"epoch"}), rows)
    text = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    csv_rows = read_rows(path)
    steps = logged_steps(csv_rows, prefix, "blocks.1")
    known = known_points(csv_rows, f"{prefix}/blocks.1/{stat}")
    missing = [s for s in steps if s not in known]
    assert claim not in text
    assert f"blocks.1: {stat} unknown at {len(missing)} of {len(steps)} logged steps, first at step {missing[0]}" in text
    traces, _ = figure_for(text, f"{prefix}-{stat}".replace("_", "-"))
    trace = next(t for t in traces if t["name"] == "blocks.1")
    assert list(zip(trace["x"], trace["y"], strict=True)) == [(s, known.get(s)) for s in steps]


def test_record_skipped_replaces_only_the_layers_it_is_given(tmp_path: Path) -> None:
    # before: each call replaced the whole (monitor, what) entry, so a second MassiveActivations cleared the first's
    record_skipped(tmp_path, "massive", "emergence fit", {"a": "3 ratio points"}, layers=["a"])
    record_skipped(tmp_path, "massive", "emergence fit", {}, layers=["b"])
    record_skipped(tmp_path, "massive", "emergence fit", {"c": "no convergence"}, layers=["c", "d"])
    assert json.loads((tmp_path / SKIPPED_FILE).read_text()) == {
        "massive": {"emergence fit": {"a": "3 ratio points", "c": "no convergence"}},
    }
    record_skipped(tmp_path, "massive", "emergence fit", {}, layers=["a"])  # a re-fit of a that succeeded
    assert [s.layer for s in read_skipped([tmp_path])[0]] == ["c"]


def test_two_massive_monitors_keep_each_others_skipped_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: the monitor that fitted last replaced the other's skipped layers: skipped.json held {} and the report
    # said "No layer was skipped"
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_act.callbacks.massive as massive_callback
    from lightning_act.callbacks import MassiveActivations

    # This toy's ratios are noise, which the fit skips as flat: b's fit is of a log climb on its steps instead.
    fit = massive_callback.fit_emergence
    monkeypatch.setattr(massive_callback, "fit_emergence",
                        lambda steps, values, *args: fit(steps, 5.0 + 3.0 * np.log1p(steps / 2.0), *args))

    class TwoLayers(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return ((self.b(self.a(batch[0])).mean((-1, -2)) - batch[1]) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 4, 8, generator=generator), torch.randn(80, generator=generator))
    sparse = MassiveActivations(modules=["a"], every_n_steps=4)  # 3 ratio points in 10 steps: its fit is skipped
    dense = MassiveActivations(modules=["b"], every_n_steps=1)  # 10 points: fitted
    trainer = pl.Trainer(max_steps=10, logger=CSVLogger(tmp_path, name="csv"), callbacks=[sparse, dense],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(TwoLayers(), train_dataloaders=DataLoader(data, batch_size=8))
    rows = read_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    points = len(known_points(rows, "massive/a/ratio"))
    reason = f"{points} ratio points, the fit needs at least 6"
    assert sparse.fit_skipped == {"a": reason} and dense.fit_skipped == {} and "massive/b/fit_A" in rows[0]
    recorded = json.loads((tmp_path / "csv" / "version_0" / SKIPPED_FILE).read_text())
    assert recorded == {"massive": {"emergence fit": {"a": reason}}}
    text = build_report(tmp_path, tmp_path / "r.html").read_text()
    assert f"<td>massive</td><td>emergence fit</td><td>a</td><td>{reason}</td>" in text
    assert "No layer was skipped" not in text


def test_late_and_per_run_unknowns_and_a_tap_without_moments_are_shown(tmp_path: Path) -> None:
    # Before: SensitiveNeurons' v_mean missing after its window was full was drawn across the gap; a run with an
    # ActivationStats tap whose moments were never known (no other layer logged them) said "No layer was skipped";
    # with two runs, "only unknown values in: side" was said of both runs and run b's note was dropped.
    write_csv(tmp_path / "a" / "csv" / "version_0" / "metrics.csv",
              ["step", "act/side/count", "act/side/zero_frac", "sensitive/h/count", "sensitive/h/v_mean"],
              [{"step": s, "act/side/count": 8.0, "act/side/zero_frac": 0.0, "sensitive/h/count": 2.0,
                **({"sensitive/h/v_mean": 0.5} if s in (2, 5) else {})} for s in range(6)])
    text = build_report(tmp_path / "a", tmp_path / "a.html").read_text()
    assert "<td>a</td><td>act</td><td>mean</td><td>side</td><td>unknown at every logged step (6 step(s))</td>" in text
    assert "No layer was skipped" not in text
    assert "h: v_mean unknown at 2 of 4 logged steps, first at step 3" in text  # from step 2, its first, on

    write_csv(tmp_path / "b" / "csv" / "version_0" / "metrics.csv", ["step", "act/side/count", "act/side/mean"],
              [{"step": s, "act/side/count": 8.0, **({} if s == 3 else {"act/side/mean": 0.25})} for s in range(6)])
    text = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "both.html").read_text()
    mean_section = text[text.index("<h3 id='act-mean'>"):text.index("<h3", text.index("<h3 id='act-mean'>") + 1)]
    assert "only unknown values in: a · side" in mean_section and "b · side" not in mean_section.split("</p>")[0]
    assert "b · side: mean unknown at 1 of 6 logged steps, first at step 3" in mean_section


def test_a_statistic_a_resume_added_is_not_unknown_before_it(tmp_path: Path) -> None:
    # Before: DimensionalCollapse resumed with warn_below (which adds `collapsed`) at step 4: the report said
    # "body: collapsed unknown at 4 of 8 logged steps, first at step 0", over steps where it was not configured.
    run = tmp_path / "run"
    first = [{"step": s, "collapse/body/erank_frac": 0.9} for s in range(4)]
    write_csv(run / "csv" / "version_0" / "metrics.csv", ["collapse/body/erank_frac", "epoch", "step"], first)
    later = [{"step": s, "collapse/body/erank_frac": 0.9, **({} if s == 6 else {"collapse/body/collapsed": 0.0})}
             for s in range(4, 8)]
    write_csv(run / "csv" / "version_1" / "metrics.csv",
              ["collapse/body/collapsed", "collapse/body/erank_frac", "epoch", "step"], later)
    os.utime(run / "csv" / "version_0" / "metrics.csv", (1, 1))  # written first
    text = build_report(run, tmp_path / "r.html").read_text()
    assert "body: collapsed unknown at 1 of 4 logged steps, first at step 6" in text  # unknown within its version
    traces, _ = figure_for(text, "collapse-collapsed")
    assert traces[0]["x"] == [4, 5, 6, 7] and traces[0]["y"] == [0.0, 0.0, None, 0.0]
    # a resume from step 2 cuts the first version's steps 2-3: a statistic only it logged is not unknown after
    write_csv(run / "csv" / "version_0" / "metrics.csv", ["collapse/body/collapsed", "collapse/body/erank_frac",
              "epoch", "step"], [{**row, "collapse/body/collapsed": 1.0} for row in first])
    write_csv(run / "csv" / "version_1" / "metrics.csv", ["collapse/body/erank_frac", "epoch", "step"],
              [{"step": s, "collapse/body/erank_frac": 0.5} for s in range(2, 8)])
    os.utime(run / "csv" / "version_0" / "metrics.csv", (1, 1))
    text = build_report(run, tmp_path / "r.html").read_text()
    assert "collapsed unknown" not in text and "unknown at" not in text


def test_a_due_step_at_which_a_layer_logged_nothing_is_unknown_on_its_own_interval(tmp_path: Path) -> None:
    # Before: a DimensionalCollapse tap whose statistics were all unknown at step 20 logged nothing then, and its
    # curve joined step 10 to step 30 with no note.
    run = tmp_path / "run"
    rows = []
    for step in range(0, 60, 10):
        if step != 20:
            rows.append({"step": step, "collapse/nan_tap/erank": 3.0 + step / 100, "collapse/nan_tap/pr": 2.0})
        if step < 30:  # NaN from step 30 to the end of this version
            rows.append({"step": step, "collapse/gone_nan/erank": 1.0})
        rows.append({"step": step, "collapse/good/erank": 5.0 + step / 100, "collapse/good/pr": 4.0})
    for step in range(0, 60, 5):  # a second DimensionalCollapse on another module, every 5 steps
        rows.append({"step": step, "collapse/fast/erank": 1.0 + step / 100, "collapse/fast/pr": 1.0})
    header = sorted({key for row in rows for key in row} | {"epoch"})
    write_csv(run / "csv" / "version_0" / "metrics.csv", header, rows)
    # a resume at step 60 adds a tap: it was not measured, nor unknown, before
    later = [{"step": step, **{f"collapse/{layer}/{stat}": 1.0 for layer in ("nan_tap", "good", "added")
                              for stat in ("erank", "pr")}} for step in range(60, 80, 10)]
    write_csv(run / "csv" / "version_1" / "metrics.csv", header + ["collapse/added/erank", "collapse/added/pr"], later)
    os.utime(run / "csv" / "version_0" / "metrics.csv", (1, 1))
    text = build_report(run, tmp_path / "r.html").read_text()
    assert "nan_tap: erank unknown at 1 of 8 logged steps, first at step 20" in text
    assert "nan_tap: pr unknown at 1 of 8 logged steps, first at step 20" in text
    traces, _ = figure_for(text, "collapse-erank")
    nan_tap = next(t for t in traces if t["name"] == "nan_tap")
    assert nan_tap["x"] == list(range(0, 80, 10)) and nan_tap["y"][2] is None and None not in nan_tap["y"][3:]
    assert "gone_nan: erank unknown at 3 of 6 logged steps, first at step 30" in text  # to the version's end
    assert "good: erank unknown" not in text and "added: erank unknown" not in text  # interval 10; from step 60 on
    assert "fast: erank unknown" not in text  # every 5 steps: not unknown at the other monitor's steps either


def test_a_resume_with_another_interval_adds_no_unknown_steps(tmp_path: Path) -> None:
    # Before: one interval over both versions (gcd of 2 and 3: 1) made net.1 unknown at step 3, where another
    # DimensionalCollapse (every 3 steps) logged and net.1 was never due.
    run = tmp_path / "run"
    rows = [{"step": s, "collapse/net.1/erank": 1.0} for s in (0, 2, 4)] + [{"step": s, "collapse/net.3/erank": 2.0} for s in (0, 3)]
    write_csv(run / "csv" / "version_0" / "metrics.csv", ["collapse/net.1/erank", "collapse/net.3/erank", "epoch", "step"], rows)
    later = [{"step": s, "collapse/net.1/erank": 1.0} for s in (6, 9)] + [{"step": s, "collapse/net.3/erank": 2.0} for s in (6, 9)]
    write_csv(run / "csv" / "version_1" / "metrics.csv", ["collapse/net.1/erank", "collapse/net.3/erank", "epoch", "step"], later)
    os.utime(run / "csv" / "version_0" / "metrics.csv", (1, 1))
    text = build_report(run, tmp_path / "r.html").read_text()
    assert "unknown at" not in text
    traces, _ = figure_for(text, "collapse-erank")
    assert next(t for t in traces if t["name"] == "net.1")["x"] == [0, 2, 4, 6, 9]


def test_a_run_given_twice_is_one_line_and_labels_have_no_doubled_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_act.report.html import run_labels

    # before: '//kat' (the root '/' joined with '/')
    assert run_labels(["/kat", "/a/kat"]) == ["kat", "a/kat"]
    run = write_crashed_run(tmp_path / "kat")
    output = tmp_path / "twice.html"
    # before: the page overlaid the run with itself as '<path>/kat #0' and '<path>/kat #1'
    assert main([str(run), f"{run}/", "-o", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"lightning_act report: error: run '{run}/' is given twice (also as '{run}'): pass each run once\n"
    )
    assert not output.exists()


def test_a_csv_logger_prefix_keeps_the_monitor_sections(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv", prefix="fold-1")  # Lightning writes 'fold-1-act/blocks.0/rms'
    rms = {(step, i): 0.5 + 0.25 * step + i for step in range(0, 8, 2) for i in range(2)}
    for step in range(0, 8, 2):
        logger.log_metrics({"train_loss": 2.0 - 0.1 * step, **{f"act/blocks.{i}/rms": rms[step, i] for i in range(2)}}, step)
    logger.save()
    header = read_rows(tmp_path / "csv" / "version_0" / "metrics.csv")[0]
    assert "fold-1-act/blocks.0/rms" in header
    run = load_run(tmp_path)
    # before: no monitors, and the statistics were drawn as training curves
    assert {prefix: {stat: list(layers) for stat, layers in stats.items()} for prefix, stats in run.monitors().items()} == {
        "act": {"rms": ["blocks.0", "blocks.1"]}
    }
    assert run.training_keys() == ["fold-1-train_loss"]
    heat, _ = figure_for(build_report(tmp_path, tmp_path / "r.html").read_text(), "act-rms-heatmap")
    assert heat[0]["x"] == [0, 2, 4, 6]
    assert heat[0]["z"] == [[rms[step, i] for step in range(0, 8, 2)] for i in range(2)]


def test_lightnings_underscore_test_metrics_are_test_metrics(tmp_path: Path) -> None:
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", ["epoch", "step", "train_loss", "val_loss"],
              [{"step": s, "train_loss": 2.0 - 0.1 * s, "val_loss": 2.5 - 0.1 * s} for s in range(0, 10, 2)])
    for version, loss in ((1, 1.375), (2, 1.40625)):  # tested twice
        write_csv(tmp_path / "csv" / f"version_{version}" / "metrics.csv", ["epoch", "step", "test_loss"],
                  [{"step": 0, "test_loss": loss}])
    run = load_run(tmp_path)
    # before: {} here, test_loss drawn as a training curve holding the first test's 1.375, the second's left out
    assert run.test_metrics() == {"test_loss": 1.40625}
    assert run.training_keys() == ["train_loss", "val_loss"]
    assert not any("without training" in note for note in run.notes)
    assert "<tr><td>test_loss</td><td>1.406</td></tr>" in build_report(tmp_path, tmp_path / "r.html").read_text()
