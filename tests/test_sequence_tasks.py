"""Data and tasks of the phenomenon recipes: the stdlib byte corpus, modular addition, the two tasks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_act.data.modular_addition import ModularAdditionDataModule, modular_addition_pairs
from lightning_act.data.stdlib_text import ByteWindows, StdlibTextDataModule, stdlib_python_files
from lightning_act.errors import LightningActError
from lightning_act.tasks.language_model import CausalLanguageModel
from lightning_act.tasks.modular_addition import ModularAddition


def write_tree(root: Path) -> None:
    for name, text in {"b.py": "bb", "a.py": "a", "pkg/c.py": "ccc", "test/t.py": "skip", "d.py": "dddd"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_corpus_files_are_sorted_and_skip_test_suites(tmp_path: Path) -> None:
    write_tree(tmp_path)
    files = [p.relative_to(tmp_path).as_posix() for p in stdlib_python_files(tmp_path)]
    assert files == ["a.py", "b.py", "d.py", "pkg/c.py"]


def test_split_is_by_file_and_bytes_are_joined_in_order(tmp_path: Path) -> None:
    write_tree(tmp_path)
    data = StdlibTextDataModule(seq_len=2, batch_size=1, val_every=2, root=str(tmp_path))
    data.setup()
    # Sorted files a, b, d, pkg/c: files 0 and 2 (a, d) are validation, b and pkg/c training.
    assert bytes(data.val_set.data.tolist()) == b"a\x00dddd\x00"
    assert bytes(data.train_set.data.tolist()) == b"bb\x00ccc\x00"
    x, y = data.train_set[1]
    assert x.tolist() == list(b"\x00c") and y.tolist() == list(b"cc")
    assert data.corpus_summary["train_files"] == 2 and data.corpus_summary["val_files"] == 2


def test_stdlib_corpus_is_deterministic() -> None:
    first, second = stdlib_python_files(), stdlib_python_files()
    assert first == second and len(first) > 100
    data = StdlibTextDataModule(seq_len=64, batch_size=4, max_train_bytes=20_000, max_val_bytes=5_000)
    data.setup()
    again = StdlibTextDataModule(seq_len=64, batch_size=4, max_train_bytes=20_000, max_val_bytes=5_000)
    again.setup()
    assert torch.equal(data.train_set.data, again.train_set.data) and data.val_set.data.numel() == 5_000
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])


def test_byte_windows_refuse_a_too_short_corpus() -> None:
    with pytest.raises(FileNotFoundError, match="seq_len"):
        ByteWindows(torch.zeros(3, dtype=torch.uint8), 8)


def test_modular_addition_pairs_by_hand_and_split() -> None:
    tokens, answers = modular_addition_pairs(5)
    assert tokens.shape == (25, 3)
    assert tokens[2 * 5 + 3].tolist() == [2, 3, 5] and answers[2 * 5 + 3].item() == 0
    data = ModularAdditionDataModule(p=5, train_fraction=0.4, batch_size=4)
    data.setup()
    train = {tuple(t.tolist()) for t in data.train_set.tensors[0]}
    val = {tuple(t.tolist()) for t in data.val_set.tensors[0]}
    assert len(train) == 10 and len(val) == 15 and not train & val
    with pytest.raises(ValueError, match="train_fraction"):
        ModularAdditionDataModule(p=5, train_fraction=1.0)
    for p, fraction in ((2, 0.1), (5, 0.99)):  # round(0.4) = 0 training problems; round(24.75) = 25: no validation
        with pytest.raises(ValueError, match=rf"train_fraction={fraction} of the {p * p} problems .* leaves the"):
            ModularAdditionDataModule(p=p, train_fraction=fraction)


def test_tasks_forward_shapes_and_one_fit_step(tmp_path: Path) -> None:
    lm = CausalLanguageModel(max_len=16, dim=16, depth=2, num_heads=2)
    assert lm(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)
    task = ModularAddition(p=7, dim=16, depth=2, num_heads=2)
    assert task(torch.tensor([[1, 2, 7]])).shape == (1, 7)
    data = ModularAdditionDataModule(p=7, batch_size=8)
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
    )
    before = [p.detach().clone() for p in task.parameters()]
    trainer.fit(task, data)
    assert any(not torch.equal(b, p) for b, p in zip(before, task.parameters()))


@pytest.mark.parametrize("model_kwargs, fix", [
    ({"vocab_size": 10}, "--model.vocab_size 256"),  # before: an embedding's IndexError, mid-fit
    ({"max_len": 4}, "--model.max_len 8"),
])
def test_a_language_model_too_small_for_its_data_is_one_line(tmp_path: Path, model_kwargs: dict, fix: str) -> None:
    for i in range(3):
        (tmp_path / f"m{i}.py").write_text("x = 1\n" * 40)
    data = StdlibTextDataModule(seq_len=8, batch_size=2, val_every=2, root=str(tmp_path))
    model = CausalLanguageModel(**{"dim": 16, "depth": 1, "num_heads": 2, **model_kwargs})
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(LightningActError, match=fix):
        trainer.fit(model, data)


@pytest.mark.parametrize("data_p", [11, 5])  # larger: an embedding's IndexError mid-step; smaller: another task
def test_modular_addition_of_another_modulus_than_the_data_is_one_line(tmp_path: Path, data_p: int) -> None:
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(LightningActError, match=f"data is addition mod {data_p} but the model's is mod 7; pass "
                                                f"--model.init_args.p {data_p}"):
        trainer.fit(ModularAddition(p=7, dim=16, depth=1, num_heads=2), ModularAdditionDataModule(p=data_p, batch_size=8))


def _token_nll(model: CausalLanguageModel, inputs: torch.Tensor, targets: torch.Tensor):
    """Per-position negative log-likelihoods in float64 numpy, and which positions are scored (not -100)."""
    import numpy as np

    with torch.no_grad():
        logits = model(inputs).double().numpy()
    t = targets.numpy()
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    scored = t != -100
    return log_z - np.take_along_axis(logits, np.where(scored, t, 0)[..., None], -1)[..., 0], scored


def _validate_lm(model: CausalLanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    return trainer.validate(model, loader, verbose=False)[0]["val/loss"]


def test_language_model_losses_leave_out_padded_targets_and_keep_a_nan():
    # Round 22's per-token averaging first counted -100 targets as zero-loss tokens (1.315 for 1.973), and its
    # MeanMetric dropped NaN token losses (a finite val/loss for a model NaN on some tokens).
    pl.seed_everything(0, verbose=False)
    model = CausalLanguageModel(vocab_size=7, max_len=6, dim=8, depth=1, num_heads=2)
    tokens = torch.randint(0, 7, (4, 7), generator=torch.Generator().manual_seed(3))
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    targets[0, 3:], targets[2, 1:] = -100, -100
    nll, scored = _token_nll(model, inputs, targets)
    assert _validate_lm(model, inputs, targets) == pytest.approx(nll[scored].mean(), rel=1e-5)
    model.log = lambda *args, **kwargs: None  # training_step outside a fit
    with torch.no_grad():
        assert float(model.training_step((inputs, targets), 0)) == pytest.approx(nll[scored].mean(), rel=1e-5)
    del model.log
    with torch.no_grad():
        model.model.token_embed.weight[int(inputs[1, 0])] = float("nan")
    assert torch.isnan(torch.tensor(_validate_lm(model, inputs, targets)))


def test_a_classifier_nan_on_one_example_has_a_nan_validation_loss():
    # Before round 22 MeanMetric's default nan_strategy="warn" dropped the NaN losses: val/loss was the mean of the
    # other examples, a finite value for a diverged model.
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.tasks.classification import ClassificationTask

    class Linear(ClassificationTask):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(3, 2)
            self.init_metrics(2)

    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])
    x[2, 0] = float("nan")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(Linear(), DataLoader(TensorDataset(x, y), batch_size=2), verbose=False)[0]
    assert torch.isnan(torch.tensor(logged["val/loss"]))


def test_the_tasks_loss_mean_keeps_its_weights_and_a_nan():
    # nan_strategy="disable" (tried first) also drops MeanMetric's weights: 2.0 for the weighted 5/3.
    from lightning_act.tasks.classification import mean_loss_metric

    metric = mean_loss_metric()
    metric.update(torch.tensor(1.0), weight=2)
    metric.update(torch.tensor(3.0), weight=1)
    assert float(metric.compute()) == pytest.approx(5 / 3)
    metric.update(torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(metric.compute())
