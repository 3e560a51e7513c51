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

from _toy import ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import DimensionalCollapse, SensitiveNeurons
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


def test_a_norm_registered_after_the_heads_leaves_a_head_per_task_the_head() -> None:
    # R7: refused once a norm was registered anywhere after the stack (it writes 3, no layer of its block reads 3)
    model = nn.Module()
    model.body = nn.Linear(4, 8)
    model.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3))
    model.norm = nn.LayerNorm(8)
    assert [tap.name for tap in select_taps(model, "@penultimate")] == ["heads.2.2-input"]


def test_a_sync_batch_norm_wrapper_keeps_its_layout_advice() -> None:
    # R7: Trainer(sync_batchnorm=True) turns SequenceWise(BatchNorm1d) into SequenceWise(SyncBatchNorm), (T, N, H)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(SequenceWise(nn.BatchNorm1d(8)))
    assert not sample_first_by_its_layers(converted, "output")


def test_activations_takes_the_shrink_activations_and_names_the_registry_for_ones_of_your_own() -> None:
    # K: nn.Hardshrink/Softshrink were missed; a model of user-defined activations got no pointer to the fix
    shrinking = nn.Sequential(nn.Linear(4, 4), nn.Hardshrink(), nn.Linear(4, 4), nn.Softshrink())
    assert [tap.name for tap in select_taps(shrinking, "@activations")] == ["1", "3"]

    class SquaredReLU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) ** 2

    with pytest.raises(ModuleSelectionError, match="register_activation_class"):
        select_taps(nn.Sequential(nn.Linear(4, 4), SquaredReLU()), "@activations")


def test_an_s4d_output_glu_on_dim_minus_2_halves_the_channels() -> None:
    # S: state-spaces' S4D ends Conv1d(H, 2H, 1), GLU(dim=-2): at L == 2H its (B, H, L) output was read along time
    output_linear = nn.Sequential(nn.Conv1d(4, 8, 1), nn.GLU(dim=-2))
    shape = tuple(output_linear(torch.randn(2, 4, 8)).shape)  # (B, H=4, L=8)
    assert feature_axis(shape, module_layout([output_linear], "output")) == 1


class DropoutNd(nn.Module):
    """A dropout of another library (state-spaces' ``DropoutNd``, simplified): a mask drawn in training mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand_like(x) < 1.0 - self.p) / (1.0 - self.p)


def test_another_librarys_dropout_module_runs_in_the_eigenscore_passes() -> None:
    # S: it stayed in eval mode, and the model was said to have no dropout module with p > 0 (no EigenScore)
    torch.manual_seed(0)
    task = ToyTask(nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), DropoutNd(0.3), nn.Linear(16, 4)))
    monitor = SensitiveNeurons(modules=["net.4:input"], every_n_steps=1, num_samples=8, batch_size=8, eigenscore_passes=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[monitor]).fit(task, toy_loader(16), toy_loader(8))
    assert not [w for w in caught if "no active dropout" in str(w.message)]
    assert len(monitor.history["sensitive/net.4-input/eigenscore"].values) == 2
