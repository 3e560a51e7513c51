"""Round 24: the monitors' statistics outside selective activation checkpointing's dispatch mode, the feature axis
of an activation registered before the layers around it (BART's order) or among layers that act on different axes,
and shape-only forwards. Values are checked against numpy on activations the tests record with
their own plain hooks, or against the same fit without the monitor / without checkpointing."""

import functools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.data import DataLoader, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import ActivationSparsity, ActivationStats, DimensionalCollapse, MassiveActivations


class TrainingOutputs(Callback):
    """The first training-forward output of one module, recorded by a plain hook (a float64 copy)."""

    def __init__(self, module_name):
        self.module_name = module_name
        self.seen: list[np.ndarray] = []

    def on_fit_start(self, trainer, pl_module):
        def keep(module, args, output):
            if pl_module.training and not self.seen:
                self.seen.append(output.detach().double().numpy().copy())

        dict(pl_module.named_modules())[self.module_name].register_forward_hook(keep)


def values(monitor, key):
    return monitor.history[key].values


# ------------------------------------------------------------------------------ selective activation checkpointing
def save_matmuls(ctx, op, *args, **kwargs):
    """PyTorch's documented SAC policy example: keep the matmuls, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


class MLPBlock(nn.Module):
    """A Llama-style MLP block: bias-free Linears, so each one on (B, T, d) runs an ``aten.mm``."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TwoBlocks(pl.LightningModule):
    """Two MLP blocks in one checkpointed region (selective with :func:`save_matmuls`, or not checkpointed)."""

    def __init__(self, selective):
        super().__init__()
        torch.manual_seed(0)
        self.selective = selective
        self.blocks = nn.ModuleList([MLPBlock() for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        both = lambda h: self.blocks[1](self.blocks[0](h))  # noqa: E731
        if self.selective:
            context = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
            x = checkpoint(both, x, use_reentrant=False, context_fn=context)
        else:
            x = both(x)
        return self.head(x.mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_two_blocks(selective, callbacks):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 5, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
    model = TwoBlocks(selective)
    quiet_trainer(max_steps=2, callbacks=callbacks).fit(model, DataLoader(data, batch_size=8))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("grid", [64, 2])
def test_cett_inside_selective_checkpointing_leaves_training_and_its_values_as_without_it(grid):
    # Before: SAC's caching mode counted CETT's two matmuls per tap as the region's own and handed them to the model's
    # recompute in backward: a shape error with the default grid of 64, gradients silently wrong with a grid of 2
    # (whose tail matmul has the shape of the model's fc1).
    def sparsity():
        return ActivationSparsity(modules=["@activations"], cett_modules=["*.fc2"], cett_grid_size=grid,
                                  every_n_steps=1)

    unmonitored = fit_two_blocks(True, [])
    with_sac, without_sac = sparsity(), sparsity()
    assert torch.equal(fit_two_blocks(True, [with_sac]), unmonitored)
    fit_two_blocks(False, [without_sac])
    keys = [key for key in without_sac.history if key.endswith("/cett_ratio")]
    assert len(keys) == 2
    for key in keys:
        assert values(with_sac, key) == values(without_sac, key)


def save_copies(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.clone.default else CheckpointPolicy.PREFER_RECOMPUTE


class InPlaceDropoutRegion(pl.LightningModule):
    """An in-place dropout feeding fc2 inside a checkpointed region whose policy keeps the copies (``clone``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.3, True), nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def region(self, x):
        return torch.tanh(self.fc2(self.drop(self.act(self.fc1(x)))).clone())

    def forward(self, x):
        context = functools.partial(create_selective_checkpoint_contexts, save_copies)
        return self.head(checkpoint(self.region, x, use_reentrant=False, context_fn=context))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_copy_of_an_in_place_dropouts_input_is_no_op_of_a_selective_checkpointing_region():
    # Before: the read-through's copy of the dropout's input (aten.clone), taken in the forward only, was cached as the
    # region's first clone and handed to the recompute in backward in place of the model's: a metadata error.
    def fit(callbacks):
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
        pl.seed_everything(0)
        model = InPlaceDropoutRegion()
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(model, DataLoader(data, batch_size=8))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(fit([ActivationStats(modules=["fc2:input"], every_n_steps=1)]), fit([]))


# ------------------------------------------------------------------------------ activation registered before fc1
D, D_FF, T = 16, 32, 16  # a sequence as long as the hidden size


class Attention(nn.Module):
    """Stands for BART's self-attention (q, k, v and out projections, all d -> d)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / D**0.5, -1)
        return self.out_proj(weights @ self.v_proj(x))


class BartLikeLayer(nn.Module):
    """BART's (and Whisper's, mBART's, Pegasus', Marian's) encoder layer, in its registration order: the activation
    before fc1 and fc2."""

    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.self_attn_layer_norm = nn.LayerNorm(D)
        self.activation_fn = nn.GELU()
        self.fc1 = nn.Linear(D, D_FF)
        self.fc2 = nn.Linear(D_FF, D)
        self.final_layer_norm = nn.LayerNorm(D)

    def forward(self, x):
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(self.activation_fn(self.fc1(x))))


class ClipLikeMLP(nn.Module):
    """CLIP's (and SigLIP's) MLP: activation_fn, fc1, fc2, in a layer of self_attn, layer_norm1, mlp, layer_norm2."""

    def __init__(self):
        super().__init__()
        self.activation_fn = nn.GELU()
        self.fc1 = nn.Linear(D, D_FF)
        self.fc2 = nn.Linear(D_FF, D)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class ClipLikeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.layer_norm1 = nn.LayerNorm(D)
        self.mlp = ClipLikeMLP()
        self.layer_norm2 = nn.LayerNorm(D)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TokenNet(pl.LightningModule):
    def __init__(self, layer):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, D)
        self.layer = layer
        self.head = nn.Linear(D, 2)

    def training_step(self, batch, batch_idx):
        return self.head(self.layer(self.embed(batch[0])).mean(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("layer, tap", [(BartLikeLayer, "layer.activation_fn"),
                                        (ClipLikeLayer, "layer.mlp.activation_fn")])
def test_an_activation_registered_before_fc1_is_read_along_its_d_ff_features(layer, tap):
    # Before: the activation took the width of the attention / norm registered before it (the hidden size), so with
    # T == d the tokens were read as the features (erank of 16 "features" that were tokens, top token/feature swapped).
    collapse = DimensionalCollapse(modules=[tap], every_n_steps=1, param_patterns=[])
    massive = MassiveActivations(modules=[tap], every_n_steps=1)
    recorder = TrainingOutputs(tap)
    ids = torch.randint(0, 40, (4, T), generator=torch.Generator().manual_seed(1))
    quiet_trainer(max_steps=1, callbacks=[collapse, massive, recorder]).fit(
        TokenNet(layer()), DataLoader(TensorDataset(ids), batch_size=4))
    (h,) = recorder.seen
    assert h.shape == (4, T, D_FF)
    assert values(collapse, f"collapse/{tap}/erank")[0] == pytest.approx(numpy_erank(h.reshape(-1, D_FF)), rel=1e-6)
    token, feature = np.unravel_index(np.abs(h).max(0).argmax(), h.shape[1:])
    assert (values(massive, f"massive/{tap}/top0_token")[0], values(massive, f"massive/{tap}/top0_feature")[0]) == (
        token, feature)


# ---------------------------------------- layers around an activation that act on different axes (R3, R4)
class PvtMlpNet(pl.LightningModule):
    """timm's own PVT-v2 MLP (fc1, relu, dwconv, act, drop, fc2): ``act`` runs on tokens ``(B, N, hidden)`` after a
    depthwise convolution, with N (a 4 x 4 grid) equal to the block width."""

    def __init__(self):
        super().__init__()
        from timm.models.pvt_v2 import MlpWithDepthwiseConv

        torch.manual_seed(0)
        self.embed = nn.Linear(3, 16)
        self.mlp = MlpWithDepthwiseConv(16, 48, 16)
        self.head = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        return self.head(self.mlp(self.embed(batch[0]), [4, 4]).mean(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_pvt_mlp_activation_between_a_depthwise_conv_and_linears_is_read_along_its_hidden_features():
    # A draft of this round let the depthwise convolution decide the axis ("first"): with N == width the tokens were
    # read as the features (erank 13.46 for 31.89, top token and feature swapped).
    tap = "mlp.act"
    collapse = DimensionalCollapse(modules=[tap], every_n_steps=1, param_patterns=[])
    massive = MassiveActivations(modules=[tap], every_n_steps=1)
    recorder = TrainingOutputs(tap)
    scale = torch.linspace(0.2, 3, 16)[:, None]
    tokens = torch.randn(8, 16, 3, generator=torch.Generator().manual_seed(1)) * scale
    quiet_trainer(max_steps=1, callbacks=[collapse, massive, recorder]).fit(
        PvtMlpNet(), DataLoader(TensorDataset(tokens), batch_size=8))
    (h,) = recorder.seen
    assert h.shape == (8, 16, 48)
    assert values(collapse, f"collapse/{tap}/erank")[0] == pytest.approx(numpy_erank(h.reshape(-1, 48)), rel=1e-6)
    token, feature = np.unravel_index(np.abs(h).max(0).argmax(), h.shape[1:])
    assert (values(massive, f"massive/{tap}/top0_token")[0], values(massive, f"massive/{tap}/top0_feature")[0]) == (
        token, feature)


class SharedReluCnn(pl.LightningModule):
    """A hand-written CNN whose one ``relu`` is registered last, after the Linear head, and applied to a conv map whose
    width equals its channel count."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        self.relu = nn.ReLU()

    def training_step(self, batch, batch_idx):
        return self.fc(self.pool(self.relu(self.conv(batch[0]))).flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_shared_relu_registered_after_the_head_reads_conv_maps_along_their_channels():
    # The draft let the Linear head decide ("last"): a 16 x 16 map of 16 channels was read along its image columns.
    collapse = DimensionalCollapse(modules=["relu"], every_n_steps=1, param_patterns=[], projection_dim=None)
    massive = MassiveActivations(modules=["relu"], every_n_steps=1)
    recorder = TrainingOutputs("relu")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 16)
    with pytest.warns(UserWarning, match="feature_dim"):  # nothing tells a 4-axis map's layout: said, read (B, C, H, W)
        quiet_trainer(max_steps=1, callbacks=[collapse, massive, recorder]).fit(
            SharedReluCnn(), DataLoader(TensorDataset(images), batch_size=2))
    (h,) = recorder.seen
    rows = h.transpose(0, 2, 3, 1).reshape(2, -1, 16)  # (example, position, channel)
    assert values(collapse, "collapse/relu/erank")[0] == pytest.approx(numpy_erank(rows.reshape(-1, 16)), rel=1e-6)
    assert values(massive, "massive/relu/top0_feature")[0] == np.unravel_index(np.abs(rows).max(0).argmax(), (256, 16))[1]


# ------------------------------------------------------------------------- a shape-only forward in a due step
class ShapeCheckedMlp(pl.LightningModule):
    def __init__(self, fake_forward):
        super().__init__()
        torch.manual_seed(0)
        self.fake_forward = fake_forward
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        if self.fake_forward:  # a shape check under FakeTensorMode, as shape-inference tools run it
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                assert self(mode.from_tensor(batch[0])).shape == (8, 5, 4)
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fake_tensor_forward_in_a_due_step_is_not_observed():
    # Before: the statistics ran on the fake tensors and the fit died at the first host read (a long traceback).
    def fit(fake_forward):
        monitors = [ActivationSparsity(modules=["act"], cett_modules=["fc2"], every_n_steps=1),
                    MassiveActivations(modules=["act"], every_n_steps=1)]
        data = torch.randn(16, 5, 16, generator=torch.Generator().manual_seed(0))
        quiet_trainer(max_steps=2, callbacks=monitors).fit(ShapeCheckedMlp(fake_forward), DataLoader(TensorDataset(data), batch_size=8))
        return {key: list(series.values) for monitor in monitors for key, series in monitor.history.items()}

    plain = fit(False)
    assert plain and fit(True) == plain


class Conv1dSharedRelu(pl.LightningModule):
    """A hand-written 1-D CNN (time series): conv1, bn1, conv2, bn2, one shared ``relu``, a pool and a Linear head;
    its ``(B, C, L)`` maps have as many time steps as channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, 10)

    def training_step(self, batch, batch_idx):
        h = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(batch[0]))))))
        return self.fc(self.pool(h).flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_shared_relu_between_convolutions_and_a_linear_head_reads_1d_maps_along_their_channels():
    # A draft of this round left the axis undecided where the layers around it disagree: a 3-D map was then read
    # (B, T, D), along its time steps, without a warning. The convolution registered before it decides (as before).
    collapse = DimensionalCollapse(modules=["relu"], every_n_steps=1, param_patterns=[], projection_dim=None)
    massive = MassiveActivations(modules=["relu"], every_n_steps=1)
    seen: list[np.ndarray] = []
    model = Conv1dSharedRelu()
    model.relu.register_forward_hook(lambda module, args, output: seen.append(output.detach().double().numpy()))
    series = torch.randn(4, 1, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 16)
    quiet_trainer(max_steps=1, callbacks=[collapse, massive]).fit(model, DataLoader(TensorDataset(series), batch_size=4))
    rows = np.concatenate(seen[:2]).transpose(0, 2, 1)  # both calls: (example, time step, channel)
    assert values(collapse, "collapse/relu/erank")[0] == pytest.approx(numpy_erank(rows.reshape(-1, 16)), rel=1e-6)
    token, feature = np.unravel_index(np.abs(rows).max(0).argmax(), rows.shape[1:])
    assert (values(massive, "massive/relu/top0_token")[0], values(massive, "massive/relu/top0_feature")[0]) == (
        token, feature)


class MaxVitStage(pl.LightningModule):
    """torchvision's own MaxViT window-attention layer on a 16 x 16 map of 16 channels: its ``departition_op``,
    registered before the Linear layers of its owner, gives ``(B, C, H, W)`` maps."""

    def __init__(self):
        super().__init__()
        from torchvision.models.maxvit import PartitionAttentionLayer

        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 1)
        self.stage = PartitionAttentionLayer(16, 8, 4, "window", (16, 16), 4, nn.GELU, nn.LayerNorm, 0.0, 0.0, 0.0)
        self.head = nn.Linear(16, 10)

    def training_step(self, batch, batch_idx):
        return self.head(self.stage(self.stem(batch[0])).mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_maxvits_departition_is_read_along_its_channels_where_its_owners_say_so():
    # R6: a draft took the later Linear layers' reading ("last") for a module with no layer before it, and read the
    # (B, C, H, W) map along its image columns when W == C (erank 13.42 for 5.54).
    tap = "stage.departition_op"
    collapse = DimensionalCollapse(modules=[tap], every_n_steps=1, param_patterns=[], projection_dim=None)
    recorder = TrainingOutputs(tap)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 16)
    quiet_trainer(max_steps=1, callbacks=[collapse, recorder]).fit(
        MaxVitStage(), DataLoader(TensorDataset(images), batch_size=2))
    (h,) = recorder.seen
    rows = h.reshape(2, 16, -1).transpose(0, 2, 1).reshape(-1, 16)  # (example x position, channel)
    assert values(collapse, f"collapse/{tap}/erank")[0] == pytest.approx(numpy_erank(rows), rel=1e-6)
