"""Dopamine protocol end to end on a tiny configuration: phase 1 → checkpoint → phase 2."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_act.data.rotated_digits import RotatedDigitsDataModule
from lightning_act.errors import DataFormatError, DataNotFoundError, LightningActError
from lightning_act.nn.dopamine import DopamineGate, harden, soften
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    yield
    torch.set_num_threads(threads)


def _trainer(root: Path, epochs: int, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(scope="module")
def foundation_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("foundation")
        pl.seed_everything(0, verbose=False)
        data = RotatedDigitsDataModule("mix", "rotated", image_size=8, max_samples=200, batch_size=64)
        module = DopamineFoundation(image_size=8, hidden_sizes=[16, 12], lr=1e-2)
        trainer = _trainer(root, 2)
        trainer.fit(module, datamodule=data)
        path = root / "last.ckpt"
        trainer.save_checkpoint(path)
    finally:
        torch.set_num_threads(threads)
    return path


def _rotated() -> RotatedDigitsDataModule:
    return RotatedDigitsDataModule("rotated", "rotated", image_size=8, max_samples=200, batch_size=64)


@pytest.mark.parametrize(
    ("method", "trainable"),
    [("frozen", 0), ("full", 64 * 16 + 16 + 16 * 12 + 12 + 12 * 10 + 10), ("lora", (64 + 16) + (16 + 12) + (12 + 10)), ("ia3", 16 + 12)],
)
def test_baselines_train_and_report(foundation_ckpt: Path, tmp_path: Path, method: str, trainable: int) -> None:
    module = DopamineSpecialisation(str(foundation_ckpt), method=method)
    assert module.trainable_params == trainable
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, datamodule=_rotated())
    metrics = trainer.test(module, datamodule=_rotated(), verbose=False)[0]
    assert metrics["test/trainable_params"] == trainable
    assert 0.0 <= metrics["test/acc"] <= 1.0
    changed = {k for k, v in module.state_dict().items() if k in before and not torch.equal(v, before[k])}
    if method == "frozen":
        assert not changed
    elif method == "full":
        assert "model.1.weight" in changed
    else:
        assert changed and all(("lora_" in k) or k.endswith(".scale") for k in changed), changed


def test_dopamine_phase_two_logs_attribution(foundation_ckpt: Path, tmp_path: Path) -> None:
    foundation = DopamineFoundation.load_from_checkpoint(foundation_ckpt, map_location="cpu")
    module = DopamineSpecialisation(str(foundation_ckpt), method="dopamine", lr=5e-2)
    assert module.trainable_params == 3 * (16 + 12)
    assert DopamineSpecialisation(str(foundation_ckpt), gate_form="coupled").trainable_params == 2 * (16 + 12)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(module(x), foundation(x))  # exact identity at init, loaded from the checkpoint
    frozen = {k: v.clone() for k, v in module.state_dict().items() if not k.endswith(("tau", "gain", "leak"))}
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, 2, logger=logger)
    trainer.fit(module, datamodule=_rotated())
    metrics = trainer.test(module, datamodule=_rotated(), verbose=False)[0]
    assert 0.0 < metrics["test/gate_active_fraction"] < 1.0
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in frozen.items())
    gates = [m for m in module.modules() if isinstance(m, DopamineGate)]
    assert len(gates) == 2 and not any(g.hardened for g in gates)  # softened again after the test
    assert any(not torch.equal(g.gain, g.leak) for g in gates)  # the gates moved away from the identity
    run = Path(trainer.log_dir)
    assert (run / "dopamine_firing.png").stat().st_size > 0
    fractions = torch.load(run / "dopamine_firing.pt")
    assert {k: tuple(v.shape) for k, v in fractions.items()} == {"model.2": (10, 16), "model.4": (10, 12)}
    assert float(fractions["model.2"].nan_to_num(0.5).min()) >= 0.0


def test_dopamine_predictions_use_the_hard_gates_the_test_accuracy_is_measured_with(foundation_ckpt: Path, tmp_path: Path) -> None:
    """Before: ``trainer.predict`` ran the smooth training gate, another model than the one test/acc describes."""
    module = DopamineSpecialisation(str(foundation_ckpt), method="dopamine")
    with torch.no_grad():  # away from the identity at init, where both gates give the same output
        for gate in module.modules():
            if isinstance(gate, DopamineGate):
                gate.gain.fill_(2.0)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=3)
    predicted = torch.cat(_trainer(tmp_path, 1).predict(module, loader))
    module.eval()
    with torch.no_grad():
        smooth = module(x).softmax(-1)
        harden(module.model)
        hard = module(x).softmax(-1)
        soften(module.model)
    assert not torch.allclose(smooth, hard)
    torch.testing.assert_close(predicted, hard)
    assert not any(g.hardened for g in module.modules() if isinstance(g, DopamineGate))  # softened after predict


def test_missing_checkpoint_and_bad_method(tmp_path: Path, foundation_ckpt: Path) -> None:
    with pytest.raises(DataNotFoundError, match="dopamine_foundation.yaml"):
        DopamineSpecialisation(str(tmp_path / "missing.ckpt"))
    with pytest.raises(LightningActError, match="method 'prompt' is unknown"):
        DopamineSpecialisation(str(foundation_ckpt), method="prompt")  # type: ignore[arg-type]


class _RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(os.environ["DOPAMINE_TEST_MARKER"]),))


def test_foundation_checkpoint_is_not_unpickled_beyond_tensors(tmp_path: Path, foundation_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("DOPAMINE_TEST_MARKER", str(marker))
    checkpoint = torch.load(foundation_ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["_payload"] = _RunsCodeWhenUnpickled()
    shared = tmp_path / "shared.ckpt"
    torch.save(checkpoint, shared)
    with pytest.raises(DataFormatError, match="holds objects other than tensors and plain values"):
        DopamineSpecialisation(str(shared))
    assert not marker.exists()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(foundation_ckpt.read_bytes()[:4096])
    with pytest.raises(DataFormatError, match="is not a readable PyTorch file; pass the phase-1 last.ckpt"):
        DopamineSpecialisation(str(truncated))


def test_table_script_quick_configuration() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dopamine_table", Path(__file__).parents[1] / "scripts" / "dopamine_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main(["--quick", "--hidden-sizes", "8", "--methods", "dopamine", "dopamine-coupled", "frozen", "lora"])
    lines = report.splitlines()
    assert lines[0].startswith("Foundation (50/50 mix): upright ") and "upright − rotated" in lines[0]
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table}
    assert list(rows) == ["dopamine", "dopamine-coupled", "frozen", "lora"]
    # 8×8 inputs, one hidden layer of 8, 10 classes.
    expected = {"dopamine": 3 * 8, "dopamine-coupled": 2 * 8, "frozen": 0, "lora": (64 + 8) + (8 + 10)}
    assert {m: int(r[2].replace(",", "")) for m, r in rows.items()} == expected
    assert rows["frozen"][1] == "+0.0 [+0.0, +0.0]"
    for method, (accuracy, _, _, firing) in rows.items():
        mean, low, high = (float(v) for v in accuracy.replace("[", "").replace("]", "").replace(",", "").split())
        assert 0.0 <= mean <= 100.0 and low <= mean <= high
        assert (firing == "—") == (not method.startswith("dopamine"))
    assert any(line.startswith("Paper claim 'Dopamine beats the frozen foundation") for line in lines)


def test_a_foundation_without_hidden_layers_takes_the_methods_that_need_no_activation(tmp_path: Path) -> None:
    # Before: every method stopped with a bare StopIteration (a 40-line traceback through the CLI).
    foundation = DopamineFoundation(image_size=8, hidden_sizes=[])
    path = tmp_path / "linear.ckpt"
    torch.save({"state_dict": foundation.state_dict(), "hyper_parameters": dict(foundation.hparams)}, path)
    assert DopamineSpecialisation(str(path), method="full").trainable_params == 64 * 10 + 10
    assert DopamineSpecialisation(str(path), method="lora").trainable_params == 64 + 10
    for method in ("dopamine", "ia3"):
        with pytest.raises(LightningActError, match=rf"^the foundation has no hidden activation, so method '{method}'"):
            DopamineSpecialisation(str(path), method=method)


def test_the_gate_active_fraction_covers_the_test_batches_the_metrics_do(foundation_ckpt: Path, tmp_path: Path) -> None:
    # Before: with limit_test_batches the gate firing fractions were taken over the whole test loader anyway.
    from lightning_act.nn.dopamine import dopamine_gates, harden, soften

    module = DopamineSpecialisation(str(foundation_ckpt), method="dopamine")
    data = _rotated()
    trainer = _trainer(tmp_path, 1, limit_test_batches=1)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    x, y = next(iter(data.test_dataloader()))  # the one test batch
    fired: list[torch.Tensor] = []
    handles = [gate.register_forward_hook(lambda m, a, out: fired.append((a[0] > m.tau).double()))
               for gate in dopamine_gates(module.model).values()]
    harden(module.model)
    try:
        with torch.no_grad():
            module(x)
    finally:
        soften(module.model)
        for handle in handles:
            handle.remove()
    per_class = [torch.cat([f[y == c].mean(0) for f in fired]) for c in range(10) if (y == c).any()]
    assert metrics["test/gate_active_fraction"] == pytest.approx(float(torch.stack(per_class).mean()), abs=1e-6)
