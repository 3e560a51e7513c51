"""The HTML run report: a real tiny run, a crashed run, a run with some monitors, a non-run folder."""

from __future__ import annotations

import base64
import csv
import math
import os
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_act.errors import DataNotFoundError
from lightning_act.report import build_report, load_run
from lightning_act.report.html import main
from lightning_act.report.runlog import emergence_fits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects ``<img src>``, ``<h2 id>`` and ``<script>`` tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.section_ids: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        elif tag == "h2":
            self.section_ids.append(values.get("id") or "")
        elif tag == "script":
            self.scripts += 1


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def png_size(uri: str) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a base64 PNG data URI (fails if it is not one)."""
    head = "data:image/png;base64,"
    assert uri.startswith(head), uri[:40]
    data = base64.b64decode(uri[len(head):], validate=True)
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


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
    (root / "config.yaml").write_text("seed_everything: 0\ntrainer:\n  max_steps: 5\n")
    return root


def test_real_run_report(real_run: Path, tmp_path: Path) -> None:
    output = build_report(real_run, tmp_path / "report.html")
    page = parse_page(output)
    with (real_run / "csv" / "version_0" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    act_stats = {c.split("/")[-1] for c in rows[0] if c.startswith("act/")}
    assert act_stats >= {"rms", "zero_frac", "abs_max"}
    assert page.section_ids == ["training", "act", "config"]
    saved = sorted((real_run / "csv" / "version_0" / "plots").glob("*.png"))
    assert [p.name for p in saved] == ["act_rms_heatmap.png"]
    # one training figure, per statistic a curves figure and a heatmap, the monitor's own heatmap
    assert len(page.images) == 1 + 2 * len(act_stats) + len(saved)
    for uri in page.images:
        width, height = png_size(uri)
        assert width > 50 and height > 50
    text = output.read_text()
    steps = sorted({int(r["step"]) for r in rows if any(r[c] for c in r if c.startswith("act/"))})
    assert steps == [0, 2, 4]
    assert f"<td>steps logged</td><td>0 – {max(int(r['step']) for r in rows)}</td>" in text
    assert "seed_everything: 0" in text and "hparams.yaml" in text
    assert page.scripts == 0 and "http://" not in text and "https://" not in text


def test_real_run_series_match_csv(real_run: Path) -> None:
    run = load_run(real_run)
    path = real_run / "csv" / "version_0" / "metrics.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    key = next(c for c in rows[0] if c.endswith("/rms"))
    expected = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
    assert list(zip(run.series[key].steps, run.series[key].values, strict=True)) == expected
    assert run.metrics_csv == path and run.candidates == 1 and run.notes == []


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
    output = build_report(tmp_path / "kat", tmp_path / "out" / "kat.html")
    page = parse_page(output)
    assert page.section_ids == ["training", "act", "massive", "massive-fits", "config"]
    # training (loss and acc groups in one figure), act 2 stats × 2, massive 2 stats × 2, one fit figure
    assert len(page.images) == 1 + 4 + 4 + 1
    for uri in page.images:
        png_size(uri)
    text = output.read_text()
    assert "Reading problems" in text and "truncated last line" in text
    assert "no complete fit logged" in text
    assert "<td>0.97</td>" in text and "<td>0.01</td>" in text


def test_empty_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("")
    page = parse_page(build_report(tmp_path, tmp_path / "r.html"))
    assert page.images == [] and page.section_ids == ["training", "config"]
    assert "the run stopped before anything was logged" in (tmp_path / "r.html").read_text()


# ---------------------------------------------------------------- (c) only some monitors


def test_run_with_some_monitors(tmp_path: Path) -> None:
    header = ["act/blocks.0/rms", "epoch", "sensitive/model.norm/count", "sensitive/model.norm/jaccard", "step", "train/loss"]
    rows = [
        {"step": s, "act/blocks.0/rms": 1.0, "sensitive/model.norm/count": 4.0, "sensitive/model.norm/jaccard": s / 40}
        for s in (0, 10, 20, 30)
    ]
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", header, rows)
    plots = tmp_path / "csv" / "version_0" / "plots"
    plots.mkdir()
    (plots / "sensitive_jaccard.png").write_bytes(b"not a png")
    output = build_report(tmp_path, tmp_path / "r.html")
    page = parse_page(output)
    assert page.section_ids == ["training", "act", "sensitive", "config"]
    text = output.read_text()
    assert "not in this run: Activation sparsity, Massive activations, Dimensional collapse" in text
    assert "No training metrics were logged." in text
    assert "sensitive_jaccard.png is not a PNG file; skipped" in text
    # one layer per statistic: curves only (a one-row heatmap adds nothing)
    assert len(page.images) == 1 + 2
    for uri in page.images:
        png_size(uri)


# ---------------------------------------------------------------- (d) not a run; several versions


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    message = (
        f"'{tmp_path}' is not a lightning_act run directory (no metrics.csv found under it); "
        "pass the run's folder, e.g. runs/kat"
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


def test_newest_version_is_picked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = ["epoch", "step", "train/loss"]
    for version, loss in ((0, 1.0), (1, 2.0), (2, 3.0)):
        path = tmp_path / "csv" / f"version_{version}" / "metrics.csv"
        write_csv(path, header, [{"step": 0, "train/loss": loss}])
    newest = tmp_path / "csv" / "version_1" / "metrics.csv"
    os.utime(newest, (2_000_000_000, 2_000_000_000))
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"using {newest} (the newest training log of 3 metrics.csv files under {tmp_path})\n"
    assert captured.out == f"wrote {tmp_path / 'report.html'}\n"
    assert load_run(tmp_path).series["train/loss"].values == [2.0]
    assert load_run(newest.parent).candidates == 1
    assert build_report(newest) == newest.parent / "report.html"


def test_a_later_test_only_run_does_not_hide_the_fit(tmp_path: Path) -> None:
    fit_csv = tmp_path / "csv" / "version_0" / "metrics.csv"
    write_csv(fit_csv, ["epoch", "step", "train/loss", "act/blocks.0/rms"], [{"step": 0, "train/loss": 1.5}])
    test_csv = tmp_path / "csv" / "version_1" / "metrics.csv"
    write_csv(test_csv, ["epoch", "step", "test/acc"], [{"step": 40, "test/acc": 0.9}])
    os.utime(fit_csv, (1_000_000_000, 1_000_000_000))
    run = load_run(tmp_path)
    assert run.metrics_csv == fit_csv and run.candidates == 2
    assert load_run(test_csv.parent).metrics_csv == test_csv  # asked for by name, it is used


def test_layer_colours_run_from_first_to_last_layer() -> None:
    from lightning_act.report.html import layer_curves_figure
    from lightning_act.report.runlog import Series

    viridis_first, viridis_last = (0.267004, 0.004874, 0.329415), (0.993248, 0.906157, 0.143936)
    many = {f"blocks.{i}": Series([0, 10], [float(i), float(i)]) for i in range(10)}
    figure = layer_curves_figure("act", "rms", many)
    axes, colorbar = figure.axes
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == list(many)
    assert lines[0].get_color()[:3] == pytest.approx(viridis_first, abs=1e-6)
    assert lines[-1].get_color()[:3] == pytest.approx(viridis_last, abs=1e-6)
    assert axes.get_legend() is None and colorbar.get_ylabel() == "layer (module order)"
    few = layer_curves_figure("act", "rms", dict(list(many.items())[:3]))
    assert len(few.axes) == 1 and [t.get_text() for t in few.axes[0].get_legend().get_texts()] == list(many)[:3]


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_act.cli import main as cli_main

    write_csv(tmp_path / "run" / "metrics.csv", ["epoch", "step", "train/loss"], [{"step": 0, "train/loss": 1.5}])
    assert cli_main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "out.html")]) == 0
    assert parse_page(tmp_path / "out.html").section_ids == ["training", "config"]
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.endswith("does not exist; pass the run's folder, e.g. runs/kat\n")
