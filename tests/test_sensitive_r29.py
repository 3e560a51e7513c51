"""Round 29: SensitiveNeurons' EigenScore/EES passes of a model whose forward draws its own noise (a VAE's
reparameterisation) are run, not the deterministic pass copied K times; a window attention with as many windows per
image as input channels is left out as several rows per example, not taken for a head on flattened tokens; and
validation data shorter than ``num_samples`` (SensitiveNeurons) or ``probe_batches`` (MassiveActivations) is said."""

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
from lightning_act.callbacks import MassiveActivations, SensitiveNeurons
from lightning_act.stats.eigenscore import DEFAULT_ALPHA

PASSES = 4


class Vae(pl.LightningModule):
    """Its forward samples the latent with ``torch.randn_like`` (no dropout module): every forward draws noise."""

    def __init__(self, samples: bool = True) -> None:
        super().__init__()
        self.samples = samples
        self.enc = nn.Sequential(nn.Linear(16, 12), nn.ReLU())
        self.mu, self.logvar = nn.Linear(12, 4), nn.Linear(12, 4)
        self.dec = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        mu, logvar = self.mu(e), self.logvar(e)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.samples else mu
        return self.dec(z)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr = 0: the passes' weights are the model's after the fit


def decoder_hidden(model: Vae, x: torch.Tensor) -> np.ndarray:
    seen: list[torch.Tensor] = []
    handle = model.dec[1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].double().numpy()


@pytest.mark.parametrize("samples", [True, False])
def test_eigenscore_of_a_forward_drawing_noise_is_over_its_real_passes(samples: bool) -> None:
    # Before: no dropout module, so the deterministic pass was reused K times and the rank-1 one-pass value logged
    # (-4.97 where K real passes give -1.30 in the hunter's repro).
    torch.manual_seed(0)
    model = Vae(samples)
    forwards: list[tuple[torch.Tensor, torch.Tensor]] = []  # the RNG state and input of each probe forward
    model.register_forward_pre_hook(
        lambda _m, args: None if torch.is_grad_enabled() else forwards.append((torch.get_rng_state(), args[0].clone()))
    )
    monitor = SensitiveNeurons(modules=["dec.1"], every_n_steps=1, num_samples=8, batch_size=8,
                               eigenscore_passes=PASSES)
    data = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
            model, DataLoader(TensorDataset(data), batch_size=4), DataLoader(TensorDataset(data), batch_size=8)
        )
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    if not samples:  # nothing random: the passes would be the deterministic one, not rerun (round 30: not scored,
        assert len(forwards) == 1 + 2  # said once); the fit start's first forward, then one per checkpoint
        assert "sensitive/dec.1/eigenscore" not in monitor.history
        assert len(said) == 1 and "no active dropout" in said[0]
        return
    assert not said
    logged = monitor.history["sensitive/dec.1/eigenscore"].values
    assert len(logged) == 2
    model.eval()
    assert len(forwards) == 1 + len(logged) * (1 + PASSES)  # per checkpoint: the clean pass and the K passes
    for index, value in enumerate(logged):
        first = 1 + index * (1 + PASSES) + 1
        embeddings = []
        for state, inputs in forwards[first : first + PASSES]:
            assert torch.equal(inputs, data[:8])
            torch.set_rng_state(state)
            embeddings.append(decoder_hidden(model, inputs))
        z = np.stack(embeddings, axis=-1)  # (N, D, K)
        assert np.ptp(z, axis=-1).max() > 1e-2  # the passes differ
        assert value == pytest.approx(numpy_eigenscore(z, DEFAULT_ALPHA), rel=1e-6, abs=1e-6)


class WindowAttention(nn.Module):
    """Stands for timm Swin's ``*.attn``: it runs on (B * windows, tokens per window, C)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.proj(windows)


class Windowed(pl.LightningModule):
    """(B, channels, 8, 8) images → 1×1 conv → 2 × 2 windows of 4 × 4 → window attention → mean → head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, 6, 1)
        self.attn = WindowAttention(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).permute(0, 2, 3, 1)
        b = h.shape[0]
        windows = h.reshape(b, 2, 4, 2, 4, 6).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 16, 6)
        return self.head(self.attn(windows).reshape(b, 64, 6).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Swin(Windowed):
    def __init__(self, channels: int) -> None:
        pl.LightningModule.__init__(self)
        timm = pytest.importorskip("timm")
        self.model = timm.models.swin_transformer.SwinTransformer(
            img_size=56, patch_size=4, in_chans=channels, embed_dim=16, depths=(2,), num_heads=(2,), window_size=7,
            num_classes=2,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def tracked_windows(model: pl.LightningModule, tap: str, images: torch.Tensor) -> tuple[list[str], SensitiveNeurons]:
    monitor = SensitiveNeurons(modules=[tap], every_n_steps=1, num_samples=4, eigenscore_passes=0, window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
            model, DataLoader(TensorDataset(images), batch_size=4), DataLoader(TensorDataset(images), batch_size=4)
        )
    return [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)], monitor


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("kind", ["windowed", "swin"])
def test_window_attention_with_as_many_windows_as_channels_is_left_out_with_one_warning(
    kind: str, channels: int
) -> None:
    # Before: at 4 channels (4 windows per image) the 4·B rows passed for the B·C "tokens" of a head on flattened
    # tokens, and the windows were tracked as examples, silently; at 3 channels the tap was left out, as documented.
    torch.manual_seed(0)
    if kind == "swin":
        model, tap, images = Swin(channels), "model.layers.0.blocks.0.attn", torch.randn(8, channels, 56, 56)
    else:
        model, tap, images = Windowed(channels), "attn", torch.randn(8, channels, 8, 8)
    said, monitor = tracked_windows(model, tap, images)
    assert sum("several rows per example" in message for message in said) == 1
    assert tap not in monitor.embeddings
    assert not [key for key in monitor.history if key.startswith(f"sensitive/{tap}/")]


def test_a_head_on_the_flattened_tokens_of_a_float_sequence_is_still_tracked() -> None:
    class FlatHead(Windowed):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.proj, self.head = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 3) → a head on the (B·T, 6) tokens
            b, t, _ = x.shape
            return self.head(self.proj(x).reshape(b * t, -1)).reshape(b, t, -1)

    torch.manual_seed(0)
    sequences = torch.randn(8, 5, 3)
    model = FlatHead()
    said, monitor = tracked_windows(model, "head:input", sequences)
    assert not [message for message in said if "rows" in message]
    with torch.no_grad():  # one row per token of the 4 tracking sequences, at the last checkpoint's weights
        expected = model.proj(sequences[:4]).reshape(20, 6).double().numpy()
    np.testing.assert_allclose(monitor.embeddings["head-input"][-1].numpy(), expected, rtol=1e-6, atol=1e-7)


class Blocks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(self.embed(x))).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def sequences(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, 8, generator=g), torch.randint(0, 2, (n,), generator=g)),
                      batch_size=4)


@pytest.mark.parametrize("validation_examples", [12, 36])
def test_validation_data_shorter_than_asked_is_said_once(validation_examples: int) -> None:
    # Before: num_samples=32 on 12 validation examples tracked 12, and probe_batches=9 on 3 batches probed 3, silently.
    torch.manual_seed(0)
    sensitive = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=32, eigenscore_passes=0)
    massive = MassiveActivations(modules=["block"], every_n_steps=1, probe="val", probe_batches=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[sensitive, massive]).fit(
            Blocks(), sequences(32, 0), sequences(validation_examples, 1)
        )
    said = [str(w.message) for w in caught if "fewer than" in str(w.message)]
    batches = -(-validation_examples // 4)
    assert sum(sensitive._batch_examples) == min(validation_examples, 32)
    assert len(massive._probe_plan) == min(batches, 9)
    if validation_examples >= 36:
        assert not said
        return
    assert said == [
        "SensitiveNeurons: the validation data holds 12 example(s), fewer than num_samples=32; the tracking set and "
        "its statistics are of those 12 (pass num_samples=12 or tracking_inputs= to silence this)",
        "MassiveActivations: the validation data holds 3 batch(es), fewer than probe_batches=9; the probe and its "
        "statistics are of those 3 (pass probe_batches=3 to silence this)",
    ]
