"""Round 29: SensitiveNeurons' EigenScore/EES passes apply ``nn.MultiheadAttention``'s attention dropout, a float it
applies from its own training flag (``nn.TransformerEncoderLayer``'s ``self_attn``): before, it never acted, and on a
model with no other dropout the K passes were the deterministic one, silently. The encoder layer's own dropout modules
run in the passes (PyTorch's fast path, which skips them, is off there), the modes are restored and the fit's weights
are those of the fit without the monitor."""

from __future__ import annotations

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


class AttentionNet(nn.Module):
    """Tokens (B, T, 4) → a bare attention, an encoder or a decoder layer → token mean → head; its attention's
    dropout is its only stochastic part unless ``layer_dropout`` is given."""

    def __init__(self, kind: str, batch_first: bool, attention_dropout: float, layer_dropout: float = 0.0) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.embed = nn.Linear(4, 8)
        if kind == "attention":
            self.attn: nn.Module = nn.MultiheadAttention(8, 2, dropout=attention_dropout, batch_first=batch_first)
            attentions = [self.attn]
        elif kind == "encoder":
            self.attn = nn.TransformerEncoderLayer(8, 2, 16, dropout=layer_dropout, batch_first=batch_first)
            attentions = [self.attn.self_attn]
        else:
            self.attn = nn.TransformerDecoderLayer(8, 2, 16, dropout=layer_dropout, batch_first=batch_first)
            attentions = [self.attn.self_attn, self.attn.multihead_attn]
        for attention in attentions:
            attention.dropout = attention_dropout
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        h = h if self.batch_first else h.transpose(0, 1)
        if self.kind == "attention":
            h = self.attn(h, h, h)[0]
        elif self.kind == "encoder":
            h = self.attn(h)
        else:
            h = self.attn(h, h)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class AttentionTask(pl.LightningModule):
    def __init__(self, lr: float, **options: Any) -> None:
        super().__init__()
        self.model = AttentionNet(**options)
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


def attentions(net: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]


class PassInputs(pl.Callback):
    """The RNG state and input of each forward of the net in eval mode with an attention in training mode (the
    stochastic passes), and every module's flags then."""

    def __init__(self) -> None:
        self.forwards: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.flags: list[dict[str, bool]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.model

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not net.training and any(attention.training for attention in attentions(net)):
                self.forwards.append((torch.get_rng_state(), args[0].clone()))
                self.flags.append({name: m.training for name, m in net.named_modules()})

        net.register_forward_pre_hook(record)


def head_input(net: AttentionNet, x: torch.Tensor) -> np.ndarray:
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0].double().numpy()


def fit(task: AttentionTask, callbacks: list[pl.Callback], max_steps: int = 2) -> list[str]:
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=1, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, tokens(16, seed=0), tokens(8, seed=1))
    return [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]


@pytest.mark.parametrize("kind, batch_first", [
    ("attention", True), ("attention", False), ("encoder", True), ("encoder", False), ("decoder", True),
])
@pytest.mark.parametrize("attention_dropout", [0.3, 0.0])
def test_eigenscore_passes_apply_the_attentions_own_dropout(
    kind: str, batch_first: bool, attention_dropout: float
) -> None:
    torch.manual_seed(0)
    task = AttentionTask(lr=0.0, kind=kind, batch_first=batch_first, attention_dropout=attention_dropout)
    recorder = PassInputs()
    monitor = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    said = fit(task, [recorder, monitor])
    if not attention_dropout:  # nothing stochastic: the passes would be the deterministic one (round 30: not run,
        assert not recorder.forwards  # their degenerate score not logged, said once)
        assert SCORE not in monitor.history
        assert len(said) == 1 and "no active dropout" in said[0] and "eigenscore_passes=0" in said[0]
        return
    assert not said
    logged = monitor.history[SCORE].values
    assert len(logged) == 2
    net = task.model.eval()  # lr = 0: the weights the passes ran on
    x = next(iter(tokens(8, seed=1)))[0]
    clean = head_input(net, x)
    deterministic = numpy_eigenscore(np.repeat(clean[:, :, None], PASSES, axis=-1), DEFAULT_ALPHA)
    # before round 29: no forward with the attention in training mode, and the deterministic value logged
    assert len(recorder.forwards) == PASSES * len(logged)
    for flags in recorder.flags:  # the attentions by their own flag only: out_proj and the rest in eval mode
        assert {name for name, training in flags.items() if training} == {
            name for name, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)
        }
    net.train()  # the attention dropout is the net's only stochastic part: training mode draws just it
    embeddings = []
    for state, inputs in recorder.forwards:
        torch.set_rng_state(state)
        embeddings.append(head_input(net, inputs))
    for index, value in enumerate(logged):
        z = np.stack(embeddings[PASSES * index : PASSES * (index + 1)], axis=-1)  # (N, D, K)
        assert np.ptp(z, axis=-1).max() > 1e-2  # the passes differ
        assert value == pytest.approx(numpy_eigenscore(z, DEFAULT_ALPHA), rel=1e-4, abs=1e-4)
        assert abs(value - deterministic) > 0.5


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_encoder_layers_own_dropout_modules_run_in_the_passes(batch_first: bool) -> None:
    # the fast path (torch._transformer_encoder_layer_fwd, eval mode under no_grad) would skip dropout1/dropout2
    torch.manual_seed(0)
    task = AttentionTask(lr=0.0, kind="encoder", batch_first=batch_first, attention_dropout=0.0, layer_dropout=0.3)
    ran: list[str] = []
    for name in ("dropout", "dropout1", "dropout2"):
        getattr(task.model.attn, name).register_forward_hook(
            lambda m, _in, _out, name=name: ran.append(name) if m.training and not task.model.training else None
        )
    monitor = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    assert not fit(task, [monitor], max_steps=1)
    assert sorted(set(ran)) == ["dropout", "dropout1", "dropout2"] and len(ran) == 3 * PASSES
    x = next(iter(tokens(8, seed=1)))[0]
    deterministic = numpy_eigenscore(
        np.repeat(head_input(task.model.eval(), x)[:, :, None], PASSES, axis=-1), DEFAULT_ALPHA
    )
    assert abs(monitor.history[SCORE].values[0] - deterministic) > 0.5


@pytest.mark.parametrize("kind, batch_first", [("attention", True), ("encoder", False), ("decoder", True)])
def test_the_passes_restore_every_modules_mode_and_leave_the_weights_as_without_the_monitor(
    kind: str, batch_first: bool, monkeypatch
) -> None:
    def task() -> AttentionTask:
        torch.manual_seed(0)
        made = AttentionTask(lr=0.1, kind=kind, batch_first=batch_first, attention_dropout=0.3, layer_dropout=0.2)
        made.model.embed.eval()  # a mixed mode: a frozen part in eval mode in the fit
        return made

    with_monitor = task()
    monitor = SensitiveNeurons(modules=["model.head:input"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    run_passes = monitor._run_passes
    modes: list[tuple[dict[str, bool], dict[str, bool]]] = []

    def recorded(trainer: pl.Trainer | None, pl_module: nn.Module) -> Any:
        before = {name: m.training for name, m in pl_module.named_modules()}
        result = run_passes(trainer, pl_module)
        modes.append((before, {name: m.training for name, m in pl_module.named_modules()}))
        return result

    monkeypatch.setattr(monitor, "_run_passes", recorded)
    assert not fit(with_monitor, [monitor], max_steps=3)
    assert len(monitor.history[SCORE].values) == 3 and len(modes) == 3
    for before, after in modes:
        assert before == after
        assert not before["model.embed"] and before["model.head"]
    without = task()
    fit(without, [], max_steps=3)
    plain = without.state_dict()
    for name, trained in with_monitor.state_dict().items():
        assert torch.equal(trained, plain[name]), name


def test_a_send_drop_on_a_tapped_attention_stays_off_in_the_passes_that_put_it_in_training_mode() -> None:
    # the passes set the attention's own flag for its dropout: the drop, active in training mode, zeroed the
    # sensitive features in the K stochastic passes and not in the deterministic one (the passes see all features)
    torch.manual_seed(0)
    task = AttentionTask(lr=0.1, kind="attention", batch_first=True, attention_dropout=0.3)
    zeroed_columns: dict[str, list[int]] = {"training": [], "passes": []}

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        where = "training" if task.model.training else "passes"
        zeroed_columns[where].append(int((output[0].abs().amax(dim=(0, 1)) == 0).sum()))

    monitor = SensitiveNeurons(modules=["model.attn"], every_n_steps=1, num_samples=8, batch_size=8, window=2,
                               top_fraction=0.25, drop=True, drop_checkpoints=10, eigenscore_passes=PASSES)
    task.model.attn.register_forward_hook(record)  # runs after the drop, which is put first
    fit(task, [monitor], max_steps=5)
    assert 1.0 in monitor.history["sensitive/model.attn/dropping"].values
    assert 2 in zeroed_columns["training"]  # a quarter of the 8 features zeroed in training
    assert zeroed_columns["passes"] and not any(zeroed_columns["passes"])
