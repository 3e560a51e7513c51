"""Round 30's reviews (R1, R3) of its own fixes: a GLU registered after a layer it runs before; a norm-only wrapper on
a reshaped sequence-first view; output layers inside repeated blocks stay ``@penultimate``'s head; a tuple of
feature-pyramid levels; ``param_patterns`` naming weights a later callback adds in its ``setup``."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import quiet_trainer
from lightning_act.callbacks import DimensionalCollapse
from lightning_act.capture.layout import feature_axis, module_layout, sample_first_by_its_layers
from lightning_act.capture.registry import is_tensor_list
from lightning_act.capture.selection import select_taps
from lightning_act.errors import ModuleSelectionError


class GatedFeedForward(nn.Module):
    """``proj_out(glu(proj_in(x)))`` with the GLU registered last: registration order is not the forward's."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.proj_out, self.act = nn.Linear(16, 64), nn.Linear(32, 16), nn.GLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(x)))


def test_a_glu_registered_after_the_layer_it_runs_before_leaves_the_features_last() -> None:
    # R1: the GLU halved proj_out's 16 to 8, so a (B, 8, 16) output was read along its 8 tokens
    ffn = GatedFeedForward()
    shape = tuple(ffn(torch.randn(2, 8, 16)).shape)
    assert feature_axis(shape, module_layout([ffn], "output")) == 2


class SequenceWise(nn.Module):
    """DeepSpeech2's wrapper: a module run on ``(T·N, H)`` of a ``(T, N, H)`` sequence-first input."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n = x.shape[:2]
        return self.module(x.reshape(t * n, -1)).reshape(t, n, -1)


def test_a_norm_on_a_reshaped_view_is_not_sample_first_by_its_layers_a_conv_block_is() -> None:
    # R1: SequenceWise(BatchNorm1d) takes and gives (T, N, H); read as sample-first, its time steps were samples
    assert not sample_first_by_its_layers(SequenceWise(nn.BatchNorm1d(8)), "output")
    assert sample_first_by_its_layers(nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)), "output")
    assert sample_first_by_its_layers(nn.BatchNorm2d(8), "output")  # R5: takes 4-D batches only (a CRNN's)


class DenseBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width_in, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def test_an_output_layer_inside_a_repeated_block_stays_the_head() -> None:
    # R1: refused since a Linear inside a block was taken for a residual projection; only one writing the width its
    # block reads is (a transformer MLP's down-projection)
    dense = nn.Module()
    dense.layers = nn.ModuleList([DenseBlock(4, 16), DenseBlock(16, 16), DenseBlock(16, 16), DenseBlock(16, 3)])
    assert [tap.name for tap in select_taps(dense, "@penultimate")] == ["layers.3.lin-input"]
    multi_task = nn.Module()
    multi_task.body = nn.Linear(4, 8)
    multi_task.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3))
    assert [tap.name for tap in select_taps(multi_task, "@penultimate")] == ["heads.2.2-input"]


def test_a_list_of_levels_is_no_activation_a_tuple_of_maps_is_read_by_its_first() -> None:
    # R5: a shape rule for tuples of pyramid levels (R1) took a U-Net block's (skip, pooled) for levels, and logged
    # nothing where d2a53b4 read the skip
    sizes = (torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4))
    assert is_tensor_list(list(sizes))  # torchvision's per-level lists
    assert not is_tensor_list(sizes[:2])  # (skip, pool(skip)); MMDetection's tuple(outs) alike: read by level 0
    assert not is_tensor_list((torch.randn(2, 5, 8), torch.randn(2, 5, 5)))  # nn.MultiheadAttention's output, weights


class ConditionedBlock(nn.Module):
    """A tied LM's block that registers a conditioning Linear of another width first (R5), then its MLP."""

    def __init__(self, width: int, condition: int) -> None:
        super().__init__()
        self.modulation = nn.Linear(condition, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(c).chunk(2, -1)
        return x + self.fc2(torch.relu(self.fc1(x * (1 + scale) + shift)))


def test_a_tied_lm_whose_blocks_register_a_conditioning_linear_first_has_no_head() -> None:
    # R5: the block's first layer reads the conditioning width, so its MLP down-projection did not "write what the
    # block reads", and @penultimate took the last block's fc2 input again; the final norm tells a tied LM
    model = nn.Module()
    model.embed = nn.Embedding(50, 8)
    model.blocks = nn.ModuleList(ConditionedBlock(8, 4) for _ in range(3))
    model.norm = nn.LayerNorm(8)
    with pytest.raises(ModuleSelectionError, match=r"blocks\.2\.fc2, is the last projection .* modules=\['norm'\]"):
        select_taps(model, "@penultimate")


class AddsAdapter(pl.Callback):
    """A callback adding the weights the trajectory follows in its own ``setup`` (an adapter injector)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "adapter"):
            pl_module.adapter = nn.Linear(8, 8)


class Adapted(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.adapter(h) if hasattr(self, "adapter") else h

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_param_patterns_of_weights_a_later_callback_adds_are_followed() -> None:
    # R3: checked in the monitor's own setup, before the adapter's callback ran, they stopped the fit
    torch.manual_seed(0)
    monitor = DimensionalCollapse(modules=["fc"], param_patterns=["adapter.*"], every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=3, callbacks=[monitor, AddsAdapter()]).fit(
            Adapted(), DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=8))
    assert list(monitor.param_names) == ["adapter.weight", "adapter.bias"]
    assert monitor.history["collapse/params/r90"].steps
