"""Round 30 fixes of SensitiveNeurons: SeND's input pre-hook called without kwargs (torch's quantization
``swap_module`` copies it so, ``prepare_qat`` mid-fit); EigenScore/EES of a model without dropout not logged, said
once (before, the degenerate rank-1 value was, silently); a scripted ``nn.MultiheadAttention``'s dropout applied in
the passes; the "none ran" line naming multi-layer RNNs; an audio batch's ``(B, T)`` mask of ``(B, n_mels, T)``
features applied; a complex tap named as such."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_eigenscore, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.callbacks.sensitive import FeatureDrop
from lightning_act.capture.registry import register_monitor_hook
from lightning_act.stats.eigenscore import DEFAULT_ALPHA

PASSES = 4


class Task(pl.LightningModule):
    """Mean squared error of ``model`` on ``(x, y)`` batches, SGD at ``lr`` (0: the weights the passes ran on stay)."""

    def __init__(self, model: nn.Module, lr: float = 0.0) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def series(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 6, 3, generator=g), torch.randn(n, 3, generator=g)), batch_size=8)


def fit(task: pl.LightningModule, callbacks: list[pl.Callback], train: DataLoader, val: DataLoader,
        max_steps: int = 2) -> list[str]:
    """The SensitiveNeurons lines of a fit."""
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=1, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, train, val)
    return [str(w.message) for w in caught if str(w.message).startswith("SensitiveNeurons")]


def monitor(tap: str, **options: Any) -> SensitiveNeurons:
    return SensitiveNeurons(modules=[tap], **{"every_n_steps": 1, "num_samples": 8, "batch_size": 8, **options})


# ---------------------------------------------------------------- 1. SeND's pre-hook copied by swap_module


def test_the_drop_pre_hook_copied_by_prepare_qat_zeroes_the_features_of_the_qat_module() -> None:
    # prepare_qat's swap_module registers the old module's pre-hooks on the new one without with_kwargs=True:
    # before round 30 the call (module, args) failed with "missing 1 required positional argument: 'kwargs'"
    net = nn.Sequential(nn.Linear(6, 5))
    drop = FeatureDrop(torch.tensor([1, 4]))
    register_monitor_hook(net[0], drop.before, pre=True, with_kwargs=True, prepend=True)
    net.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(net, inplace=True)
    assert type(net[0]).__module__.startswith("torch.ao.nn.qat")
    seen: list[torch.Tensor] = []
    net[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    x = torch.randn(3, 6)
    net.train()(x)
    expected = x.numpy().copy()
    expected[:, [1, 4]] = 0.0
    np.testing.assert_array_equal(seen[0].numpy(), expected)
    net.eval()(x)  # like dropout, only in training mode
    np.testing.assert_array_equal(seen[1].numpy(), x.numpy())


def test_the_drop_pre_hook_with_kwargs_still_gives_args_and_kwargs() -> None:
    drop = FeatureDrop(torch.tensor([0]))
    linear = nn.Linear(2, 2).train()
    x = torch.ones(1, 2)
    args, kwargs = drop.before(linear, (x,), {"extra": 1})
    assert kwargs == {"extra": 1} and args[0].tolist() == [[0.0, 1.0]]
    zeroed = drop.before(linear, (x,))  # swap_module's call: the new arguments alone
    assert isinstance(zeroed, tuple) and len(zeroed) == 1 and zeroed[0].tolist() == [[0.0, 1.0]]


# ---------------------------------------------------------------- 2. no dropout: not logged, said once


class Plain(nn.Module):
    """No dropout anywhere (a Llama-style configuration's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(s)).mean(1))


class EvalForwards(pl.Callback):
    """Counts the model's forwards in eval mode (the monitor's tracking forwards)."""

    def __init__(self) -> None:
        self.count = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def count(module: nn.Module, _args: Any) -> None:
            self.count += not module.training

        pl_module.model.register_forward_pre_hook(count)


def test_a_model_without_dropout_logs_no_eigenscore_and_says_so_once_without_rerunning_the_pass() -> None:
    torch.manual_seed(0)
    recorder, sensitive = EvalForwards(), monitor("model.head:input")  # eigenscore_passes: the default, 8
    said = fit(Task(Plain()), [recorder, sensitive], series(16, 0), series(8, 1), max_steps=3)
    keys = set(sensitive.history)
    assert not {k for k in keys if k.endswith(("/eigenscore", "/ees"))}  # before: the rank-1 value at every step
    assert "sensitive/model.head-input/count" in keys  # the rest is measured
    lines = [m for m in said if "no active dropout" in m]
    assert len(lines) == 1 and "eigenscore_passes=0" in lines[0] and "not logged" in lines[0]
    assert recorder.count == 1 + 3  # the fit-start check, then one deterministic pass per checkpoint, not 1 + 8


def test_eigenscore_passes_0_says_nothing_of_dropout() -> None:
    torch.manual_seed(0)
    sensitive = monitor("model.head:input", eigenscore_passes=0)
    said = fit(Task(Plain()), [sensitive], series(16, 0), series(8, 1))
    assert not [m for m in said if "dropout" in m]


# ---------------------------------------------------------------- 3. a scripted attention's dropout


class AttentionNet(nn.Module):
    """Linear → ``nn.MultiheadAttention(dropout=p)`` (scripted or not) → head on the last token."""

    def __init__(self, p: float, scripted: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        attention = nn.MultiheadAttention(8, 2, dropout=p, batch_first=True)
        self.attn = torch.jit.script(attention) if scripted else attention
        self.head = nn.Linear(8, 3)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = self.inp(s)
        return self.head(self.attn(h, h, h)[0][:, -1])


def attention_score(scripted: bool, p: float = 0.5) -> tuple[list[float], list[str], AttentionNet]:
    torch.manual_seed(0)
    net = AttentionNet(p, scripted)
    sensitive = monitor("model.head:input", eigenscore_passes=PASSES)
    said = fit(Task(net), [sensitive], series(16, 0), series(8, 1), max_steps=1)
    return sensitive.history["sensitive/model.head-input/eigenscore"].values, said, net


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_a_scripted_attentions_dropout_acts_in_the_passes_as_the_eager_ones_does() -> None:
    scripted, said, net = attention_score(scripted=True)
    eager, _, _ = attention_score(scripted=False)  # the same weights (seed 0), its dropout applied since round 29
    assert not [m for m in said if "dropout" in m]
    assert scripted == pytest.approx(eager, rel=1e-5, abs=1e-5)
    # and not the degenerate value of K copies of the deterministic pass (before round 30 it was logged)
    net.eval()
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        net(next(iter(series(8, 1)))[0])
    handle.remove()
    clean = seen[0].double().numpy()
    degenerate = numpy_eigenscore(np.repeat(clean[:, :, None], PASSES, axis=-1), DEFAULT_ALPHA)
    assert abs(scripted[0] - degenerate) > 0.5


# ---------------------------------------------------------------- 4. the "none ran" line names RNNs


class RecurrentAfterTap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.rnn = nn.GRU(8, 8, num_layers=2, dropout=0.5, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.inp(s))[0][:, -1])


def test_the_none_ran_line_names_a_multi_layer_rnn_and_a_fix_for_it() -> None:
    torch.manual_seed(0)
    sensitive = monitor("model.inp", eigenscore_passes=PASSES)
    said = fit(Task(RecurrentAfterTap()), [sensitive], series(16, 0), series(8, 1))
    lines = [m for m in said if "ran in the EigenScore/EES stochastic passes" in m]
    assert len(lines) == 1 and "model.rnn" in lines[0]
    assert "multi-layer RNNs with dropout > 0" in lines[0] and "between its layers" in lines[0]
    assert "sensitive/model.inp/eigenscore" not in sensitive.history


# ---------------------------------------------------------------- 5. an audio batch's mask


class FrameCNN(nn.Module):
    """(B, n_mels, T) features → conv → ReLU (the tap, (B, C, T)) → per-frame outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.out = nn.Conv1d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv1d(12, 6, 1)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.act(self.conv(input_features))).transpose(1, 2)


class AudioTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = FrameCNN()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch["input_features"], batch.get("attention_mask"))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(**batch).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def audio(seed: int) -> DataLoader:
    """Hugging Face's speech feature-extractor batches: ``input_features`` (B, n_mels, T) padded to T = 16 and a
    ``(B, T)`` ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    items = [torch.randn(8, length, generator=g) for length in (16, 10, 12, 7)]

    def collate(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_features": torch.stack([F.pad(x, (0, 16 - x.shape[1])) for x in batch]),
                "attention_mask": torch.stack([(torch.arange(16) < x.shape[1]).long() for x in batch])}

    return DataLoader(items, batch_size=4, collate_fn=collate)


def test_an_audio_batchs_mask_of_channels_first_features_averages_the_real_frames_only() -> None:
    torch.manual_seed(0)
    task = AudioTask()
    sensitive = SensitiveNeurons(modules=["net.act"], every_n_steps=1, num_samples=4, eigenscore_passes=0,
                                 forward_fn=lambda m, b: m(**b))
    said = fit(task, [sensitive], audio(0), audio(1), max_steps=1)
    assert not [m for m in said if "mask" in m or "pad" in m]
    batch = next(iter(audio(1)))
    seen: list[torch.Tensor] = []
    task.net.act.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        task.eval()(**batch)
    frames, mask = seen[0].double().numpy(), batch["attention_mask"].double().numpy()  # (B, C, T), (B, T)
    expected = (frames * mask[:, None]).sum(2) / mask.sum(1, keepdims=True)
    got = sensitive.embeddings["net.act"][-1].cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(frames.mean(2) - expected).max() > 1e-2  # the pads averaged in (before) differ


# ---------------------------------------------------------------- 6. a complex tap


class STFTNet(nn.Module):
    """A mask-based enhancement front-end: the complex STFT (the tap), a mask from its magnitude, the inverse."""

    def __init__(self) -> None:
        super().__init__()
        self.stft = STFT()
        self.mask = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 9))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        z = self.stft(wav)
        m = torch.sigmoid(self.mask(z.abs().transpose(1, 2))).transpose(1, 2)
        return torch.istft(z * m, 16, 4, window=self.stft.window, length=wav.shape[-1])


class STFT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(16))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.stft(wav, 16, 4, window=self.window, return_complex=True)  # (B, 9, T) complex64


def test_a_complex_tap_is_named_complex_with_its_fix() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)), batch_size=4)
    sensitive = monitor("model.stft", num_samples=4)
    said = fit(Task(STFTNet()), [sensitive], data, data)
    lines = [m for m in said if "model.stft" in m]
    assert len(lines) == 1  # once, though every checkpoint gives nothing
    assert "complex64" in lines[0] and "view_as_real" in lines[0] and ".abs()" in lines[0]
    assert not [key for key in sensitive.history if "model.stft" in key]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_the_passes_with_a_scripted_attention_leave_training_as_without_the_monitor() -> None:
    def trained(callbacks: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], bool]:
        torch.manual_seed(0)
        task = Task(AttentionNet(0.5, scripted=True), lr=0.1)
        flags: list[bool] = []  # the attention's flag in the training forwards: restored after the passes

        def note(module: nn.Module, _args: Any, _out: Any) -> None:
            if module.training:
                flags.append(task.model.attn.training)

        task.model.inp.register_forward_hook(note)
        fit(task, callbacks, series(16, 0), series(8, 1), max_steps=3)
        return task.state_dict(), all(flags) and len(flags) == 3

    with_monitor, flags_kept = trained([monitor("model.head:input", eigenscore_passes=PASSES)])
    without, _ = trained([])
    assert flags_kept
    for name, weight in with_monitor.items():
        assert torch.equal(weight, without[name]), name


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_scripted_attention_after_the_tap_is_said_not_to_act_and_nothing_is_logged() -> None:
    # no hook reaches a scripted module: the passes, equal to the deterministic one, tell that its dropout never acted
    torch.manual_seed(0)
    sensitive = monitor("model.inp", eigenscore_passes=PASSES)
    said = fit(Task(AttentionNet(0.5, scripted=True)), [sensitive], series(16, 0), series(8, 1))
    assert "sensitive/model.inp/eigenscore" not in sensitive.history
    assert "sensitive/model.inp/count" in sensitive.history
    lines = [m for m in said if "ran in the EigenScore/EES stochastic passes" in m]
    assert len(lines) == 1 and "model.attn" in lines[0]
