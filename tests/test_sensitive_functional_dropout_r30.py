"""Round 30: SensitiveNeurons' EigenScore/EES passes apply the dropout a forward calls as a function from a module's
training flag, Hugging Face's ``F.dropout(hidden_states, p=self.dropout, training=self.training)`` (BART, Whisper,
OPT): no dropout module holds it, so before, in a model whose only dropout it was, the K passes were the deterministic
one reused and a degenerate score was logged, silently."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_eigenscore, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.stats.eigenscore import DEFAULT_ALPHA

PASSES = 5
SCORE = "sensitive/model.head-input/eigenscore"


class FunctionalDropoutNet(nn.Module):
    """Tokens (B, T, 4) → a BART-style feed-forward layer with functional dropout → token mean → head.
    ``where``: "inside" drops before the head's input, "after" only the head's output (it cannot reach the tap);
    ``module_dropout`` adds an ``nn.Dropout`` on the residual."""

    def __init__(self, p: float, where: str = "inside", module_dropout: float = 0.0) -> None:
        super().__init__()
        self.p, self.where = p, where
        self.embed = nn.Linear(4, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.residual_dropout = nn.Dropout(module_dropout)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        inner = F.gelu(self.fc1(h))
        if self.where == "inside":
            inner = F.dropout(inner, p=self.p, training=self.training)
        h = h + self.residual_dropout(self.fc2(inner))
        out = self.head(h.mean(1))
        if self.where == "after":
            out = F.dropout(out, p=self.p, training=self.training)
        return out


class Task(pl.LightningModule):
    def __init__(self, lr: float, **options: Any) -> None:
        super().__init__()
        self.model = FunctionalDropoutNet(**options)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tokens(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class EvalForwards(pl.Callback):
    """The RNG state and input of each forward of the net in eval mode (the monitor's tracking forwards)."""

    def __init__(self) -> None:
        self.forwards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.model

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not net.training:
                self.forwards.append((torch.get_rng_state(), args[0].clone()))

        net.register_forward_pre_hook(record)


def head_input(net: FunctionalDropoutNet, x: torch.Tensor) -> np.ndarray:
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0].double().numpy()


def fit(task: Task, callbacks: list[pl.Callback], max_steps: int = 2) -> list[str]:
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=1, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, tokens(16, seed=0), tokens(8, seed=1))
    return [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]


def monitor() -> SensitiveNeurons:
    return SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                            eigenscore_passes=PASSES)


@pytest.mark.parametrize("module_dropout", [0.0, 0.2])
def test_eigenscore_passes_apply_a_functional_dropout_called_with_the_modules_flag(module_dropout: float) -> None:
    torch.manual_seed(0)
    task = Task(lr=0.0, p=0.3, module_dropout=module_dropout)
    recorder, sensitive = EvalForwards(), monitor()
    assert not fit(task, [recorder, sensitive])
    logged = sensitive.history[SCORE].values
    assert len(logged) == 2
    # the fit-start check of the forward, then per checkpoint the deterministic forward and the K passes; before
    # round 30, with no dropout module, only the deterministic one and its degenerate score
    assert len(recorder.forwards) == 1 + (1 + PASSES) * len(logged)
    checkpoints = recorder.forwards[1:]
    net = task.model.eval()  # lr = 0: the weights the passes ran on
    deterministic = numpy_eigenscore(
        np.repeat(head_input(net, checkpoints[0][1])[:, :, None], PASSES, axis=-1), DEFAULT_ALPHA
    )
    net.train()  # the passes drop as training does, the functional dropout and the module alike
    for index, value in enumerate(logged):
        embeddings = []
        for state, inputs in checkpoints[(1 + PASSES) * index + 1 : (1 + PASSES) * (index + 1)]:
            torch.set_rng_state(state)
            embeddings.append(head_input(net, inputs))
        z = np.stack(embeddings, axis=-1)  # (N, D, K)
        assert np.ptp(z, axis=-1).max() > 1e-2  # the passes differ
        assert value == pytest.approx(numpy_eigenscore(z, DEFAULT_ALPHA), rel=1e-4, abs=1e-4)
        assert abs(value - deterministic) > 0.5


def test_a_functional_dropout_that_cannot_reach_the_tap_is_said_once_and_nothing_is_logged() -> None:
    torch.manual_seed(0)
    task = Task(lr=0.0, p=0.3, where="after")
    sensitive = monitor()
    said = fit(task, [sensitive], max_steps=3)
    assert SCORE not in sensitive.history and "sensitive/model.head-input/count" in sensitive.history
    assert len([m for m in said if "F.dropout calls" in m and "not logged" in m]) == 1


def test_a_model_without_dropout_runs_no_passes_and_logs_no_score() -> None:
    # p = 0 and no module dropout: nothing is stochastic, the K passes would be the deterministic one (no extra
    # forwards beside the fit-start check); round 30: their degenerate score is not logged, said once
    torch.manual_seed(0)
    task = Task(lr=0.0, p=0.0)
    recorder, sensitive = EvalForwards(), monitor()
    said = fit(task, [recorder, sensitive])
    assert len(recorder.forwards) == 3
    assert SCORE not in sensitive.history and "sensitive/model.head-input/count" in sensitive.history
    assert len(said) == 1 and "no active dropout" in said[0] and "eigenscore_passes=0" in said[0]


def test_the_fit_with_the_passes_trains_the_weights_of_the_fit_without_the_monitor() -> None:
    def trained(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        task = Task(lr=0.1, p=0.3, module_dropout=0.2)
        fit(task, callbacks, max_steps=3)
        return task.state_dict()

    with_monitor, without = trained([monitor()]), trained([])
    for name, weight in with_monitor.items():
        assert torch.equal(weight, without[name]), name


class InputDropoutNet(nn.Module):
    """An MLP dropping its input in place: ``F.dropout(..., inplace=True)``, ``nn.Dropout(inplace=True)``, a scripted
    one, or timm's ``DropBlock2d(inplace=True)`` on the input seen as a 1-channel image."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "dropblock":
            from timm.layers import DropBlock2d

            self.drop: nn.Module | None = DropBlock2d(0.3, block_size=3, inplace=True)
        elif kind != "functional":
            drop = nn.Dropout(0.3, inplace=True)
            self.drop = torch.jit.script(drop) if kind == "scripted" else drop
        self.embed, self.head = nn.Linear(20, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dropblock":
            x = self.drop(x.unsqueeze(1))
        x = x.flatten(1)  # a view of the batch
        if self.kind == "functional":
            x = F.dropout(x, p=0.3, training=self.training, inplace=True)
        elif self.kind != "dropblock":
            x = self.drop(x)
        return self.head(torch.tanh(self.embed(x)))


@pytest.mark.parametrize("kind", ["functional", "module", "scripted", "dropblock"])
def test_an_in_place_input_dropout_leaves_the_tracking_batch_as_it_was(kind: str) -> None:
    # reviews R2, R6: in training mode in the passes, an in-place dropout zeroed the batch the monitor keeps, a little
    # more at every pass: the clean embeddings of later checkpoints were those of a zeroed, rescaled tracking set
    torch.manual_seed(0)
    task = Task(lr=0.0, p=0.0)
    task.model = InputDropoutNet(kind)
    sensitive = monitor()
    fit(task, [sensitive], max_steps=3)
    x = next(iter(tokens(8, seed=1)))[0]
    expected = head_input(task.model.eval(), x)
    embeddings = sensitive.embeddings["model.head-input"]
    assert len(embeddings) == 3
    for embedding in embeddings:
        np.testing.assert_allclose(embedding.double().numpy(), expected, rtol=0, atol=1e-6)
    if kind == "module":
        assert task.model.drop.inplace  # put back after the passes


class CustomBatch:
    """A batch object of the user's, no collection (moved whole by its ``to``), as detection and graph code writes."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, *args: Any, **kwargs: Any) -> CustomBatch:
        return CustomBatch(self.x.to(*args, **kwargs), self.y.to(*args, **kwargs))


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, *args: Any, **kwargs: Any) -> FrozenBatch:
        return FrozenBatch(self.x.to(*args, **kwargs), self.y.to(*args, **kwargs))


class BatchTask(Task):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch.x), batch.y)


@pytest.mark.parametrize("kind", [CustomBatch, FrozenBatch])
def test_the_passes_copy_a_batch_object_of_the_users_too(kind: type) -> None:
    # review R7: the copy entered collections only: a batch object was not copied (a scripted in-place dropout
    # zeroed it), and a frozen dataclass stopped the fit in the passes
    def batches(n: int, seed: int) -> DataLoader:
        x, y = next(iter(tokens(n, seed)))
        return DataLoader(list(zip(x, y)), batch_size=8,
                          collate_fn=lambda items: kind(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])))

    torch.manual_seed(0)
    task = BatchTask(lr=0.0, p=0.0)
    task.model = InputDropoutNet("scripted")
    sensitive = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                                 eigenscore_passes=PASSES, forward_fn=lambda model, batch: model(batch.x))
    quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=[sensitive]).fit(task, batches(16, 0), batches(8, 1))
    expected = head_input(task.model.eval(), next(iter(tokens(8, seed=1)))[0])
    for embedding in sensitive.embeddings["model.head-input"]:
        np.testing.assert_allclose(embedding.double().numpy(), expected, rtol=0, atol=1e-6)
