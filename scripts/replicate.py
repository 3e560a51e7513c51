"""Run the four phenomenon recipes and print whether each paper's claim reproduces.

    python scripts/replicate.py                 # the full recipes (ten fits; docs/replications.md has their cost)
    python scripts/replicate.py --quick         # CI-sized runs: checks the pipeline, not the science
    python scripts/replicate.py --reuse         # only read runs already under --root and print the table
    python scripts/replicate.py --only massive_lm  # train these runs only (e.g. in parallel processes), then --reuse

Each recipe's YAML is copied to ``<root>/<name>/recipe.yaml`` with its ``runs/<recipe>`` paths
pointed at ``<root>/<name>`` (and, with ``--quick``, shrunk), then trained in this process with
``lightning_act fit --config``. The logged metrics are read back from the CSV logs; the table
(paper, claim, measured, reproduced yes/no/undecided) is printed as Markdown and written with the figures
(PNG) to ``<root>/replications.md``. The claims are the papers' (see docs/replications.md); a
recipe that misses one is reported as not reproduced, with its numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_act.report.runlog import Series, load_run  # noqa: E402
from lightning_act.stats.massive import fit_emergence  # noqa: E402
from lightning_act.stats.spectrum import trajectory_r90  # noqa: E402

MASSIVE_GROWTH = 5.0
MASSIVE_R2 = 0.95
MANIFOLD_R90 = 4
MANIFOLD_EARLY = 0.3
SEND_SEEDS = (0, 1, 2)
LAZY_END_POINTS = 3
LAZY_MIN_POINTS = 2 * LAZY_END_POINTS  # the start apart from the end's points, and differences to read the noise from
LAZY_NOISE_SDS = 3.0
NORMAL_MEDIAN_ABS = 0.6744897501960817  # median of |Z| for a standard normal Z


@dataclass
class Row:
    paper: str
    claim: str
    measured: str
    reproduced: bool | None  # None: undecided (too few points to tell)


# ------------------------------------------------------------------------------------ configs
def _retarget(node: Any, old: str, new: str) -> Any:
    """Every string in ``node`` with the recipe's ``runs/<name>`` prefix pointed at ``new``."""
    if isinstance(node, dict):
        return {k: _retarget(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


def _callback(config: dict[str, Any], class_name: str) -> dict[str, Any]:
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].rsplit(".", 1)[-1] == class_name:
            return callback.setdefault("init_args", {})
    raise KeyError(f"the recipe has no {class_name} callback")


def derive_config(
    recipe: str, out_dir: Path, quick: bool, edit: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Write ``recipe`` retargeted to ``out_dir`` (shrunk when ``quick``); returns its path."""
    source = REPO / "recipes" / f"{recipe}.yaml"
    config = yaml.safe_load(source.read_text())
    config = _retarget(config, f"runs/{recipe}", str(out_dir))
    trainer = config["trainer"]
    trainer["enable_progress_bar"] = False
    trainer["logger"] = [lg for lg in trainer["logger"] if lg["class_path"].endswith("CSVLogger")]
    if quick:
        _shrink(recipe, config)
    if edit is not None:
        edit(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _shrink(recipe: str, config: dict[str, Any]) -> None:
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer.pop("max_epochs", None)
    trainer.pop("val_check_interval", None)
    trainer.pop("check_val_every_n_epoch", None)
    trainer.update(max_steps=24, log_every_n_steps=4, limit_val_batches=2)
    if recipe == "massive_lm":
        model.update(dim=32, depth=2, num_heads=2, max_len=32, warmup_steps=5)
        data.update(seq_len=32, max_train_bytes=60_000, max_val_bytes=8_000)
        _callback(config, "MassiveActivations")["every_n_steps"] = 4
    elif recipe == "lazy_neuron":
        model["model_kwargs"].update(embed_dim=48, depth=2)
        _callback(config, "ActivationSparsity")["every_n_steps"] = 4
    elif recipe == "execution_manifold":
        model.update(p=23, dim=32)
        data.update(p=23, batch_size=64)
        _callback(config, "DimensionalCollapse")["every_n_steps"] = 4
        _callback(config, "ModelCheckpoint")["every_n_train_steps"] = 4
    elif recipe == "send":
        model["model_kwargs"].update(embed_dim=48, depth=2)
        args = _callback(config, "SensitiveNeurons")
        args.update(every_n_steps=3, num_samples=16, eigenscore_passes=4)


def fit(config: Path) -> None:
    from lightning_act.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI would also parse this script's own flags
    try:
        code = main(["fit", "--config", str(config)])
    finally:
        sys.argv = argv
    if code:
        raise SystemExit(f"lightning_act fit --config {config} failed with status {code}")


# ------------------------------------------------------------------------------------ reading
def series_by_layer(run: Path, prefix: str, stat: str) -> dict[str, Series]:
    monitors = load_run(run).monitors()
    return monitors.get(prefix, {}).get(stat, {})


def _points(series: Series) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted(series.last_per_step().items())
    steps = np.array([s for s, _ in pairs], dtype=np.float64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _figure(path: Path, title: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], ylabel: str, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(6, 3.6))
    color = None
    for label, (x, y) in curves.items():
        if label.endswith(" fit"):  # drawn dashed in the colour of the series it fits
            axes.plot(x, y, "--", color=color, label=label)
        else:
            color = axes.plot(x, y, marker="." if len(x) < 60 else None, label=label)[0].get_color()
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ recipes
def massive_row(run: Path, figures: Path) -> Row:
    def _where(layer: str) -> str:
        """Where the largest entry sits at the last checkpoint (Sun et al.: the first token, fixed features)."""
        token, feature = _points(tokens.get(layer, Series()))[1], _points(features.get(layer, Series()))[1]
        return f", top at token {token[-1]:.0f}, feature {feature[-1]:.0f}" if len(token) and len(feature) else ""

    ratios = series_by_layer(run, "massive", "ratio")
    tokens, features = series_by_layer(run, "massive", "top0_token"), series_by_layer(run, "massive", "top0_feature")
    parts, growths, r2s, curves = [], [], [], {}
    for layer, series in ratios.items():
        steps, values = _points(series)
        if len(values) < 2:
            continue
        growth = float(values.max() / values[0])
        try:
            fit = fit_emergence(steps, values)
            r2, fitted = fit.r2, fit(steps)
        except ValueError as error:
            r2, fitted = math.nan, None
            print(f"massive_lm: no emergence fit for {layer}: {error}")
        growths.append(growth)
        r2s.append(r2)
        short = layer.replace("model.", "")
        parts.append(
            f"{short}: {values[0]:.1f}→max {values.max():.1f} (end {values[-1]:.1f}; ×{growth:.1f} from the start, "
            f"×{values.max() / values.min():.1f} from the minimum), R² {r2:.3f}, {len(values)} checkpoints{_where(layer)}"
        )
        curves[f"{short} ratio"] = (steps, values)
        if fitted is not None:
            curves[f"{short} fit"] = (steps, fitted)
    _figure(figures / "massive_lm_ratio.png", "max|h| / median|h| per block (residual stream)", curves, "ratio")
    good_fits = sum(r2 >= MASSIVE_R2 for r2 in r2s if not math.isnan(r2))
    reproduced = bool(growths) and max(growths) >= MASSIVE_GROWTH and good_fits >= math.ceil(len(r2s) / 2)
    configs = load_run(run).configs
    probed = any("probe: val" in text for _, text in configs.values())
    source = "fixed validation sequences" if probed else "training batches (no probe)"
    measured = (
        f"ratio on {source}: " + "; ".join(parts) + f". Layers with R² ≥ {MASSIVE_R2}: {good_fits}/{len(r2s)}"
        if parts else "no ratio logged"
    )
    return Row(
        "Hidden Dynamics of Massive Activations (2508.03616)",
        f"max/median ratio grows ≥ {MASSIVE_GROWTH:g}× in some layer; emergence fit R² ≥ {MASSIVE_R2} on ≥ half the layers",
        measured,
        reproduced,
    )


def lazy_fall(nonzero: np.ndarray) -> tuple[float, float, float] | None:
    """``(start, end, margin)`` of one layer's logged nonzero fractions; the layer falls when ``start − end > margin``.
    None for fewer than ``LAZY_MIN_POINTS`` points, too few to tell a fall from noise (with 3 the end's mean held the
    start, and no drop passed the margin).

    ``end`` is the mean of the last ``LAZY_END_POINTS`` points. The points are single training batches, so the
    fraction moves from batch to batch even when nothing trains (an lr = 0 run "fell" 0.03 points). The margin is
    ``LAZY_NOISE_SDS`` standard deviations of ``start − end`` under that noise alone, ``σ·√(1 + 1/3)``, with σ
    estimated from the successive differences Δ as ``median|Δ − median Δ| / (0.6745·√2)`` (exact for independent
    Gaussian noise). The medians ignore the few large steps of a real fall, which a mean of Δ² would count as noise,
    and the steady slope of a gradual one, which ``median|Δ|`` read as noise.
    """
    nonzero = np.asarray(nonzero, dtype=np.float64)
    if len(nonzero) < LAZY_MIN_POINTS:
        return None
    start, end = float(nonzero[0]), float(np.mean(nonzero[-LAZY_END_POINTS:]))
    steps = np.diff(nonzero)
    sigma = float(np.median(np.abs(steps - np.median(steps)))) / (NORMAL_MEDIAN_ABS * math.sqrt(2))
    return start, end, LAZY_NOISE_SDS * sigma * math.sqrt(1 + 1 / LAZY_END_POINTS)


def lazy_row(run: Path, figures: Path) -> Row:
    zero = series_by_layer(run, "sparsity", "zero_frac")
    parts, falls, curves = [], [], {}
    for layer, series in zero.items():
        steps, values = _points(series)
        if len(values) < 2:
            continue
        nonzero = 1.0 - values
        fall = lazy_fall(nonzero)
        short = layer.replace("model.", "").replace(".mlp.act", "")
        if fall is None:
            falls.append(None)
            parts.append(f"{short}: {len(values)} points, too few to tell a fall from noise (needs {LAZY_MIN_POINTS})")
        else:
            start, end, margin = fall
            falls.append(start - end > margin)
            parts.append(f"{short}: {100 * start:.1f}% → {100 * end:.1f}% (noise margin {100 * margin:.1f} points)")
        curves[short] = (steps, 100 * nonzero)
    _figure(figures / "lazy_neuron_nonzero.png", "nonzero % of ReLU MLP activations", curves, "nonzero %")
    return Row(
        "Lazy Neuron Phenomenon (Li et al. 2022)",
        f"nonzero fraction of ReLU MLP activations falls during training (every layer), by more than "
        f"{LAZY_NOISE_SDS:g} sd of its batch-to-batch noise",
        f"nonzero (start → mean of last {LAZY_END_POINTS}): " + "; ".join(parts) if parts else "no sparsity logged",
        # a layer that did not fall decides; too few points to tell are no refutation (None: undecided)
        False if not falls or False in falls else None if None in falls else True,
    )


def _r90_at(run: Path, fraction: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    series = load_run(run).series.get("collapse/params/r90", Series())
    steps, values = _points(series)
    if not len(values):
        return math.nan, math.nan, steps, values
    early = values[steps <= fraction * steps.max()]
    return float(early.max()) if len(early) else math.nan, float(values[-1]), steps, values


def initial_state(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a modular-addition recipe starts from, rebuilt from its seed.

    LightningCLI seeds every RNG before it builds the model, and building the model is the first
    draw, so these are the run's ``w_0`` (tests/test_replicate.py checks this against LightningCLI).
    """
    from lightning_act.tasks.modular_addition import ModularAddition

    torch.manual_seed(int(config["seed_everything"]))
    return ModularAddition(**config["model"]["init_args"]).state_dict()


def weight_trajectory(run: Path) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """Steps and per-matrix block weights of a run: ``w_0``, then every saved checkpoint (Xu 2026)."""
    initial = initial_state(yaml.safe_load((run / "recipe.yaml").read_text()))
    versions = sorted(run.glob("csv/version_*"), key=lambda v: int(v.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"{run} holds no csv/version_* log; train it first (without --reuse)")
    # The latest fit only: a rerun into the same folder logs a new version beside the old one.
    checkpoints = sorted(versions[-1].glob("checkpoints/step=*.ckpt"), key=lambda c: int(c.stem.split("=")[1]))
    states = [initial] + [torch.load(c, map_location="cpu", weights_only=True)["state_dict"] for c in checkpoints]
    names = [n for n, w in initial.items() if n.startswith("model.blocks.") and w.dim() >= 2]
    return [0] + [int(c.stem.split("=")[1]) for c in checkpoints], {n: [s[n] for s in states] for n in names}


def per_matrix_r90(run: Path, fraction: float) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """Per block weight matrix: (r90 over the snapshots of the first ``fraction`` of training, r90 over all)."""
    steps, weights = weight_trajectory(run)
    early = sum(step <= fraction * steps[-1] for step in steps)
    out = {}
    for name, snapshots in weights.items():
        flat = torch.stack([w.reshape(-1).to(torch.float64) for w in snapshots])
        out[name] = (float(trajectory_r90(flat[:early])), float(trajectory_r90(flat)))
    return out, steps


def _final(run: Path, key: str) -> float:
    _, values = _points(load_run(run).series.get(key, Series()))
    return float(values[-1]) if len(values) else math.nan


def manifold_row(attention: Path, with_mlp: Path, figures: Path) -> Row:
    early, final, steps, values = _r90_at(attention, MANIFOLD_EARLY)
    early_mlp, final_mlp, steps_mlp, values_mlp = _r90_at(with_mlp, MANIFOLD_EARLY)
    matrices, snapshots = per_matrix_r90(attention, MANIFOLD_EARLY)
    matrices_mlp, _ = per_matrix_r90(with_mlp, MANIFOLD_EARLY)
    _figure(
        figures / "execution_manifold_r90.png", "r90 of the parameter trajectory, all block weights (modular addition)",
        {"attention-only": (steps, values), "with MLPs": (steps_mlp, values_mlp)}, "r90",
    )

    def summary(per: dict[str, tuple[float, float]]) -> str:
        early_r = np.array([e for e, _ in per.values()])
        full_r = np.array([f for _, f in per.values()])
        return (f"per matrix ({len(per)}): first {MANIFOLD_EARLY:.0%} median {np.median(early_r):g} (max {early_r.max():g}), "
                f"whole run median {np.median(full_r):g} (max {full_r.max():g})")

    early_att = max(e for e, _ in matrices.values())
    # The MLP control must have a larger trajectory dimension on the matrices both models share.
    shared = [n for n in matrices if n in matrices_mlp]
    early_shared_mlp = max(matrices_mlp[n][0] for n in shared)
    reproduced = early <= MANIFOLD_R90 and early_att <= MANIFOLD_R90 and early_mlp > early and early_shared_mlp > early_att
    return Row(
        "Low-Dimensional Execution Manifolds (2602.10496)",
        f"attention-only: r90 ≤ {MANIFOLD_R90} in the first {MANIFOLD_EARLY:.0%} of training; with MLPs a larger r90",
        f"{len(snapshots)} snapshots (w_0, then every {snapshots[1] - snapshots[0]} steps). All block weights together: attention-only r90 (max over the "
        f"first {MANIFOLD_EARLY:.0%}) {early:g}, final {final:g}; with MLPs {early_mlp:g}, final {final_mlp:g}. "
        f"Attention-only {summary(matrices)}; with MLPs {summary(matrices_mlp)}. Validation accuracy at the end: "
        f"{_final(attention, 'val/acc'):.2f} attention-only, {_final(with_mlp, 'val/acc'):.2f} with MLPs",
        bool(reproduced),
    )


def _send_stats(run: Path) -> tuple[float, float, Series]:
    """(std of the EigenScore over checkpoints, mean sensitivity V, the EigenScore series) of one run."""
    series = load_run(run).series
    score = next((s for k, s in series.items() if k.endswith("/eigenscore")), Series())
    v_mean = next((s for k, s in series.items() if k.endswith("/v_mean")), Series())
    _, scores = _points(score)
    _, sensitivity = _points(v_mean)
    return (
        float(np.std(scores)) if len(scores) else math.nan,
        float(np.mean(sensitivity)) if len(sensitivity) else math.nan,
        score,
    )


def paired_interval(differences: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of paired differences (one per seed)."""
    from scipy import stats

    mean = float(np.mean(differences))
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(differences) - 1) * stats.sem(differences))
    return mean, mean - half, mean + half


def send_row(root: Path, seeds: list[int], figures: Path) -> Row:
    drop = [_send_stats(root / f"send_drop_s{seed}") for seed in seeds]
    keep = [_send_stats(root / f"send_keep_s{seed}") for seed in seeds]
    curves = {}
    for seed, (_, _, score_drop), (_, _, score_keep) in zip(seeds, drop, keep):
        curves[f"seed {seed} drop=True"] = _points(score_drop)
        curves[f"seed {seed} drop=False"] = _points(score_keep)
    _figure(figures / "send_eigenscore.png", "EigenScore of the tracking set (penultimate features)", curves, "EigenScore")
    std_diff = np.array([d[0] - k[0] for d, k in zip(drop, keep)])
    v_diff = np.array([d[1] - k[1] for d, k in zip(drop, keep)])
    std_mean, std_lo, std_hi = paired_interval(std_diff)
    v_mean, v_lo, v_hi = paired_interval(v_diff)
    # Reproduced only when both 95% intervals of drop − keep lie below zero.
    reproduced = std_hi < 0 and v_hi < 0
    per_seed = "; ".join(
        f"seed {s}: std {d[0]:.3f} vs {k[0]:.3f}, V {d[1]:.3g} vs {k[1]:.3g}" for s, d, k in zip(seeds, drop, keep)
    )
    return Row(
        "Hallucination Detox / SeND (2410.15460)",
        "dropping sensitive neurons lowers the sensitivity and the EigenScore's variation over training",
        f"drop − keep over {len(seeds)} seeds (mean, 95% t-interval): EigenScore std over checkpoints "
        f"{std_mean:+.3f} [{std_lo:+.3f}, {std_hi:+.3f}]; mean sensitivity V {v_mean:+.3g} [{v_lo:+.3g}, {v_hi:+.3g}] "
        f"({per_seed})",
        bool(reproduced),
    )


# ------------------------------------------------------------------------------------ main
def table(rows: list[Row]) -> str:
    lines = ["| paper | claim | measured | reproduced |", "|---|---|---|---|"]
    verdict = {True: "yes", False: "no", None: "undecided"}
    lines += [f"| {r.paper} | {r.claim} | {r.measured} | {verdict[r.reproduced]} |" for r in rows]
    return "\n".join(lines)


def plan(quick: bool) -> dict[str, tuple[str, Callable[[dict[str, Any]], None] | None]]:
    """Run name -> (recipe, edit of its config); SeND runs once per seed with and without dropping."""

    def set_model(**changes: Any) -> Callable[[dict[str, Any]], None]:
        return lambda config: config["model"]["init_args"].update(changes)

    def send(drop: bool, seed: int) -> Callable[[dict[str, Any]], None]:
        def edit(config: dict[str, Any]) -> None:
            config["seed_everything"] = seed
            _callback(config, "SensitiveNeurons")["drop"] = drop

        return edit

    runs: dict[str, tuple[str, Callable[[dict[str, Any]], None] | None]] = {
        "massive_lm": ("massive_lm", None),
        "lazy_neuron": ("lazy_neuron", None),
        "execution_manifold": ("execution_manifold", None),
        "execution_manifold_mlp": ("execution_manifold", set_model(mlp=True)),
    }
    for seed in SEND_SEEDS[: 2 if quick else None]:
        runs[f"send_drop_s{seed}"] = ("send", send(True, seed))
        runs[f"send_keep_s{seed}"] = ("send", send(False, seed))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (checks the pipeline, not the science)")
    parser.add_argument("--reuse", action="store_true", help="read existing runs under --root instead of training")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN",
                        help="train only these runs (e.g. to run them in parallel processes), then stop; --reuse prints the table")
    parser.add_argument("--root", type=Path, default=None, help="where runs go (default runs/replicate[_quick])")
    args = parser.parse_args(argv)
    root = args.root or REPO / "runs" / ("replicate_quick" if args.quick else "replicate")
    runs = plan(args.quick)
    unknown = sorted(set(args.only or ()) - set(runs))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such run; the runs are {', '.join(runs)}")
    if args.reuse and args.only is not None:
        parser.error("--reuse with --only: --only trains the named runs and stops, --reuse trains nothing and prints "
                     "the table; run them one after the other")
    # Reading a run that was never trained fails deep in the log reader, with a hint meant for `report`.
    untrained = [name for name in runs if not any((root / name).glob("csv/version_*"))] if args.reuse else []
    if untrained:
        options = (" --quick" if args.quick else "") + (f" --root {args.root}" if args.root else "")
        raise SystemExit(
            f"--reuse: {', '.join(untrained)} not trained under {root}; train them with "
            f"`python scripts/replicate.py{options} --only {' '.join(untrained)}`"
        )
    figures = root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, (recipe, edit) in runs.items():
        if args.reuse or (args.only is not None and name not in args.only):
            continue
        config = derive_config(recipe, root / name, args.quick, edit)
        print(f"== {name}: lightning_act fit --config {config}", flush=True)
        cpu, wall = time.process_time(), time.perf_counter()
        fit(config)
        cost = f"{name}: {time.process_time() - cpu:.0f} s CPU, {time.perf_counter() - wall:.0f} s wall"
        (root / name / "cost.txt").write_text(cost + "\n")
        print(f"== {cost}", flush=True)
    if args.only is not None:
        return 0

    seeds = [int(name.rsplit("_s", 1)[1]) for name in runs if name.startswith("send_drop_s")]
    rows = [
        massive_row(root / "massive_lm", figures),
        lazy_row(root / "lazy_neuron", figures),
        manifold_row(root / "execution_manifold", root / "execution_manifold_mlp", figures),
        send_row(root, seeds, figures),
    ]
    text = table(rows)
    print(text)
    (root / "replications.md").write_text(text + "\n")
    print(f"table and figures written to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
