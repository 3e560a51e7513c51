"""The W&B workspace layout, built and checked offline (nothing is sent to W&B)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_act.report.wandb_dashboard import (
    PanelSpec,
    SectionSpec,
    dashboard_spec,
    keys_from_run_dir,
    main,
)

LAYERS = ["model.blocks.0", "model.blocks.1", "model.blocks.11.mlp.fc2-input"]
KEYS = (
    ["epoch", "step", "trainer/global_step", "train/loss", "val/loss", "val/acc", "lr-AdamW", "_runtime"]
    + [f"sparsity/{layer}/{stat}" for layer in LAYERS for stat in ("zero_frac", "cett")]
    + [f"massive/{layer}/{stat}" for layer in LAYERS for stat in ("ratio", "top1", "fit_r2", "top0_token", "top0_feature")]
    + [f"act/{layer}/rms" for layer in LAYERS]
    + ["plots/massive_ratio_heatmap", "plots/sparsity_zero_frac_heatmap", "plots/act_rms_heatmap", "plots/custom"]
)


def line_panels(section: SectionSpec) -> list[PanelSpec]:
    return [p for p in section.panels if p.kind == "line"]


def test_one_section_per_monitor_in_order() -> None:
    sections = dashboard_spec(KEYS)
    assert [s.name for s in sections] == [
        "training", "act: activation statistics", "sparsity: activation sparsity", "massive: massive activations", "plots",
    ]
    massive = sections[3]
    assert [p.title for p in massive.panels] == [
        "massive/*/ratio", "massive/*/top1", "massive/*/fit_r2", "massive plots",
    ]
    assert massive.panels[-1] == PanelSpec(kind="media", title="massive plots", media_keys=("plots/massive_ratio_heatmap",))
    assert sections[-1].panels == (PanelSpec(kind="media", title="plots", media_keys=("plots/custom",)),)


def test_each_metric_key_is_drawn_by_exactly_the_expected_panel() -> None:
    sections = dashboard_spec(KEYS)
    panels = [(s.name, p) for s in sections for p in line_panels(s)]
    index_keys = ("epoch", "step", "trainer/global_step", "_runtime")
    metric_keys = [k for k in KEYS if k not in index_keys and not k.startswith("plots/") and "/top0_" not in k]
    for key in metric_keys:
        matching = [(name, p.title) for name, p in panels if re.search(p.metric_regex or "(?!)", key)]
        parts = key.split("/")
        if len(parts) == 3:
            expected_section = {"act": "act: activation statistics", "sparsity": "sparsity: activation sparsity",
                                "massive": "massive: massive activations"}[parts[0]]
            assert matching == [(expected_section, f"{parts[0]}/*/{parts[2]}")], key
        else:
            assert matching == [("training", parts[-1])], key
    assert {p.x for _, p in panels} == {"trainer/global_step"}
    # the loss panel overlays train and val; a per-stat regex does not leak into another stat or monitor
    loss = next(p for _, p in panels if p.title == "loss")
    assert re.search(loss.metric_regex or "", "train/loss") and re.search(loss.metric_regex or "", "val/loss")
    ratio = next(p for _, p in panels if p.title == "massive/*/ratio")
    for other in ("massive/model.blocks.0/ratio_sum", "sparsity/model.blocks.0/ratio", "massive/a/b/ratio"):
        assert not re.search(ratio.metric_regex or "", other)


def test_no_monitor_keys_gives_only_training() -> None:
    assert [s.name for s in dashboard_spec(["train/loss", "step"])] == ["training"]
    assert dashboard_spec([]) == []


def test_spec_from_local_run_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = tmp_path / "csv" / "version_0"
    (version / "plots").mkdir(parents=True)
    (version / "metrics.csv").write_text("collapse/model.norm/erank,epoch,step,train/loss\n3.5,,0,\n,0,0,2.3\n")
    (version / "plots" / "collapse_erank_heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert keys_from_run_dir(tmp_path) == ["collapse/model.norm/erank", "train/loss", "plots/collapse_erank_heatmap"]
    assert main(["--project", "p", "--run-dir", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        "project: p\n"
        "training\n"
        "  line  loss: ^(train/loss)$\n"
        "collapse: dimensional collapse\n"
        "  line  collapse/*/erank: ^(?:[^/]*-)?collapse/[^/]+/erank$\n"
        "  media collapse plots: plots/collapse_erank_heatmap\n"
    )


def test_run_without_monitors_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,0,2.3\n")
    assert main(["--project", "p", "--run-dir", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "lightning_act wandb-dashboard: error: no monitor keys (act/, sparsity/, massive/, collapse/, sensitive/) "
        f"found in {tmp_path}; log a run with the monitors attached first\n"
    )


def test_workspace_objects_carry_the_spec() -> None:
    pytest.importorskip("wandb_workspaces", reason="wandb-workspaces is not installed (pip install wandb-workspaces)")
    import wandb_workspaces.reports.v2 as wr

    from lightning_act.report.wandb_dashboard import build_workspace

    sections = dashboard_spec(KEYS)
    workspace = build_workspace(sections, entity="someone", project="lightning_act", name="monitors")
    assert (workspace.entity, workspace.project, workspace.name) == ("someone", "lightning_act", "monitors")
    assert [s.name for s in workspace.sections] == [s.name for s in sections]
    for built, spec in zip(workspace.sections, sections, strict=True):
        assert built.is_open
        for panel, panel_spec in zip(built.panels, spec.panels, strict=True):
            if panel_spec.kind == "line":
                assert isinstance(panel, wr.LinePlot) and panel.metric_regex == panel_spec.metric_regex
                assert panel.title == panel_spec.title and panel.x == "trainer/global_step"
            else:
                assert isinstance(panel, wr.MediaBrowser) and panel.media_keys == list(panel_spec.media_keys)


def test_positions_get_no_line_plot_and_compact_keys_share_the_panels() -> None:
    from lightning_act.loggers import compact_metrics

    sections = dashboard_spec(KEYS)
    titles = [p.title for s in sections for p in s.panels]
    assert not any("top0_token" in t or "top0_feature" in t for t in titles)
    compact, _ = compact_metrics(dict.fromkeys(KEYS, 1.0))
    assert [[p.title for p in s.panels] for s in dashboard_spec(compact)] == [[p.title for p in s.panels] for s in sections]
    ratio = next(p for s in sections for p in s.panels if p.title == "massive/*/ratio")
    assert re.search(ratio.metric_regex or "", "massive/max/ratio")


def write_run_with_config(root: Path, logger_class: str = "lightning.pytorch.loggers.WandbLogger") -> Path:
    version = root / "csv" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("massive/model.blocks.0/ratio,epoch,step,train/loss\n3.5,,0,\n,0,0,2.3\n")
    (root / "config.yaml").write_text(
        "seed_everything: 0\ntrainer:\n  logger:\n"
        f"    - class_path: {logger_class}\n      init_args: {{project: my-proj, name: kat, save_dir: runs/kat}}\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {save_dir: runs/kat, name: csv}\n"
        "ckpt_path: null\n"
    )
    return root


def test_project_defaults_from_the_run_and_dry_run_needs_no_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_act.report.wandb_dashboard import project_from_run

    run = write_run_with_config(tmp_path / "kat", "lightning_act.loggers.CompactWandbLogger")
    assert project_from_run(run) == "my-proj"
    assert main(["--run-dir", str(run), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["project: my-proj", "training"]
    (run / "config.yaml").write_text("trainer:\n  max_epochs: 1\n")
    assert project_from_run(run) is None
    assert main(["--run-dir", str(run), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "project: (none: pass --project to save)"
    assert main(["--run-dir", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"lightning_act wandb-dashboard: error: no W&B logger with a project in the config of {run}; pass --project P\n"
    )
    assert main([]) == 2
    assert capsys.readouterr().err.endswith("pass --run-dir RUN (a local run, e.g. runs/kat) or --project P (a W&B project)\n")


def test_no_login_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The real wandb client without any API key: one line, no traceback, nothing saved."""
    pytest.importorskip("wandb_workspaces", reason="wandb-workspaces is not installed (pip install wandb-workspaces)")
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run = write_run_with_config(tmp_path / "kat")
    assert main(["--run-dir", str(run)]) == 2
    assert capsys.readouterr().err == (
        "lightning_act wandb-dashboard: error: not logged in to W&B; run `wandb login` (or set WANDB_API_KEY) and "
        "try again, or add --dry-run to print the layout offline\n"
    )


def test_no_network_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import wandb

    def unreachable(*args: object, **kwargs: object) -> None:
        raise wandb.errors.CommError("Failed to execute API request: connection refused\nTraceback (most recent call last): ...")

    monkeypatch.setattr(wandb, "Api", unreachable)
    assert main(["--project", "p"]) == 2
    assert capsys.readouterr().err == (
        "lightning_act wandb-dashboard: error: could not reach W&B (Failed to execute API request: connection refused); "
        "check the network and your login, or add --dry-run to print the layout offline\n"
    )


@pytest.mark.parametrize(("logger_class", "per_layer", "panels"), [
    ("lightning.pytorch.loggers.WandbLogger", False, True),
    ("lightning_act.loggers.CompactWandbLogger", False, False),
    ("lightning_act.loggers.CompactWandbLogger", True, True),
])
def test_top_k_value_panels_only_where_the_logger_logs_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], logger_class: str, per_layer: bool, panels: bool
) -> None:
    # Before: a CompactWandbLogger run got top{j}_value line panels that stayed empty (the values are in its table).
    run = write_run_with_config(tmp_path / "kat", logger_class)
    version = run / "csv" / "version_0"
    (version / "metrics.csv").write_text(
        "massive/model.blocks.0/ratio,massive/model.blocks.0/top1_value,massive/model.blocks.0/top1_token,step\n"
        "3.5,40.0,0,0\n"
    )
    if per_layer:
        config = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(config.replace("init_args: {project", "init_args: {per_layer: true, project"))
    assert main(["--run-dir", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "massive/*/ratio" in out and "top1_token" not in out
    assert ("massive/*/top1_value" in out) == panels


def test_a_compact_project_is_told_by_its_keys() -> None:
    from lightning_act.loggers import compact_metrics
    from lightning_act.report.wandb_dashboard import compact_from_keys

    per_layer = KEYS + ["massive/model.blocks.0/top1_value"]
    assert not compact_from_keys(per_layer)
    logged, _ = compact_metrics(dict.fromkeys(per_layer, 1.0))
    summary = list(logged) + per_layer  # the run summary also holds the last per-layer values
    assert compact_from_keys(summary)
    assert compact_from_keys(["massive/per_layer", "train/loss"])
    titles = [p.title for s in dashboard_spec(summary, compact=True) for p in s.panels]
    assert "massive/*/top1_value" not in titles and "massive/*/ratio" in titles


def test_a_project_keeps_the_top_k_panels_while_one_of_its_runs_logged_the_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the project's keys were pooled, and one CompactWandbLogger run hid the top-k panels of every run.
    import wandb

    from lightning_act.loggers import compact_metrics
    from lightning_act.report.wandb_dashboard import keys_from_project

    per_layer = KEYS + ["massive/model.blocks.0/top1_value"]
    compact, _ = compact_metrics(dict.fromkeys(per_layer, 1.0))

    class Run:
        def __init__(self, keys: list[str]) -> None:
            self.summary = dict.fromkeys(keys, 1.0)

    def api(runs: list[Run]) -> object:
        return type("Api", (), {"default_entity": "me", "runs": lambda self, path: runs})()

    monkeypatch.setattr(wandb, "Api", lambda: api([Run(list(compact) + per_layer), Run(per_layer)]))
    keys, is_compact = keys_from_project(None, "p")
    assert not is_compact and "massive/*/top1_value" in [p.title for s in dashboard_spec(keys, is_compact) for p in s.panels]
    monkeypatch.setattr(wandb, "Api", lambda: api([Run(list(compact) + per_layer)]))
    assert keys_from_project(None, "p")[1]
    monkeypatch.setattr(wandb, "Api", lambda: api([Run(list(compact) + per_layer), Run(["train/loss"])]))
    assert keys_from_project(None, "p")[1]  # a run without monitors (a baseline) does not bring the panels back


def test_keys_behind_a_logger_prefix_share_the_monitor_panels() -> None:
    # Before: WandbLogger(prefix="fold1") logs "fold1-massive/<layer>/ratio"; the dashboard gave it no monitor section
    # and drew it in a "training" panel of its own, one per layer and statistic.
    from lightning_act.report.wandb_dashboard import compact_from_keys

    keys = ["fold1-epoch", "fold1-train/loss", "fold1-massive/model.blocks.0/ratio", "fold2-massive/model.blocks.0/ratio",
            "massive/model.blocks.1/ratio", "fold-a-sparsity/model.blocks.0/zero_frac"]
    sections = {s.name: s for s in dashboard_spec(keys)}
    assert sorted(sections) == ["massive: massive activations", "sparsity: activation sparsity", "training"]
    ratio = sections["massive: massive activations"].panels[0]
    assert [k for k in keys if re.search(ratio.metric_regex or "(?!)", k)] == keys[2:5]
    zero_frac = sections["sparsity: activation sparsity"].panels[0]
    assert [k for k in keys if re.search(zero_frac.metric_regex or "(?!)", k)] == keys[5:]
    assert [p.title for p in sections["training"].panels] == ["loss"]
    assert compact_from_keys(["fold1-massive/per_layer"]) and not compact_from_keys(["fold1-train/per_layer"])


def test_metrics_ending_in_epoch_or_step_are_metrics_unless_a_logger_prefixed_the_epoch() -> None:
    # Round 22's first prefix rule took "seconds-per-epoch" and "tokens-per-step" for index columns and dropped them.
    from lightning_act.report.runlog import is_index_column

    keys = ["epoch", "seconds-per-epoch", "tokens-per-step", "train/loss"]
    assert [k for k in keys if is_index_column(k, keys)] == ["epoch"]
    titles = [p.title for s in dashboard_spec(keys) for p in s.panels]
    assert titles == ["loss", "seconds-per-epoch", "tokens-per-step"]
    # behind a logger prefix, Lightning's epoch column is the prefixed one, whatever the metrics are called
    prefixed = ["fold1-epoch", "fold1-loss", "fold1-lr-SGD"]
    assert [k for k in prefixed if is_index_column(k, prefixed)] == ["fold1-epoch"]
