"""Monitors on third-party-style training code (issue 11's table), checked against numpy on activations
the tests record with their own plain hooks."""

import copy
import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos import BoringModel
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import Block, BlockNet, ToyTask, quiet_trainer, tiny_lightning_transformer, token_data, toy_loader
from lightning_act.callbacks import (
    ActivationSparsity,
    ActivationStats,
    DimensionalCollapse,
    MassiveActivations,
    SensitiveNeurons,
)
from lightning_act.capture import select_taps
from lightning_act.errors import LightningActError, ModuleSelectionError
from lightning_act.stats.histogram_median import LogMagnitudeBins

# MassiveActivations estimates each sample's median |h| from a log-magnitude histogram (issue 17, no
# sort): median and ratio are within one bin's relative width (1.56%) of numpy's exact median, and the
# massive count is exact up to the entries near the (estimated) ratio threshold.
MEDIAN_RTOL = LogMagnitudeBins().relative_width


class Recorder(Callback):
    """Records one module's output (or input) of every training forward, per monitor step, with its own hook."""

    def __init__(self, module_name, point="output", manual=False):
        self.module_name, self.point, self.manual = module_name, point, manual
        self.seen: dict[int, list[np.ndarray]] = {}
        self.step = None

    def on_fit_start(self, trainer, pl_module):
        module = dict(pl_module.named_modules())[self.module_name]

        def keep(value):
            if self.step is not None and pl_module.training:
                value = value[0] if isinstance(value, tuple) else value
                self.seen.setdefault(self.step, []).append(value.detach().double().numpy().copy())

        if self.point == "input":
            self.handle = module.register_forward_pre_hook(lambda m, args: keep(args))
        else:
            self.handle = module.register_forward_hook(lambda m, args, out: keep(out))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.fit_loop.epoch_loop._batches_that_stepped if self.manual else trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss):
        if not self.manual:
            self.step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = None

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def massive_numpy(h):
    """Sun et al. statistics of a (B, T, D) array: mean per-sample ratio, massive count per sample, top position."""
    mag = np.abs(h).reshape(h.shape[0], -1)
    median = np.median(mag, axis=1)
    top1 = mag.max(axis=1)
    massive = ((mag > 100) & (mag >= 1000 * median[:, None])).sum()
    flat = np.abs(h).max(axis=0)
    token, feature = np.unravel_index(np.argmax(flat), flat.shape)
    return {"ratio": (top1 / median).mean(), "median": median.mean(), "count_per_sample": massive / h.shape[0],
            "top0_token": token, "top0_feature": feature, "top1": np.abs(h).max()}


def values(monitor, key):
    return monitor.history[key].values


# ---------------------------------------------------------------------------------------------- layouts
class SequenceClassifier(pl.LightningModule):
    """Cross-entropy on ``(x, y)`` batches with plain SGD: the training loop the layout tests' models share."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Encoder(SequenceClassifier):
    """PyTorch's own nn.TransformerEncoder in either order, with a token whose features are huge."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: (B, T, 4)
        h = self.embed(x)
        h[:, 0, 3] = h[:, 0, 3] * 1e4  # a massive activation at token 0, feature 3 ...
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


def sequences(n=8, tokens=6):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, tokens, 4, generator=g), torch.randint(0, 2, (n,), generator=g)), batch_size=4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_in_both_orders_is_read_sample_first(batch_first):
    pl.seed_everything(0)
    model = Encoder(batch_first)
    massive = MassiveActivations(modules=["encoder.layers.0"], every_n_steps=1, abs_threshold=1.0, ratio_threshold=5.0)
    recorder = Recorder("encoder.layers.0")
    quiet_trainer(max_steps=1, callbacks=[massive, recorder]).fit(model, sequences())
    (h,) = recorder.seen[0]
    h = h if batch_first else h.transpose(1, 0, 2)  # the test knows its own layout: (B, T, D)
    mag = np.abs(h).reshape(h.shape[0], -1)
    median = np.median(mag, axis=1)
    want = massive_numpy(h)
    key = "massive/encoder.layers.0/"
    for stat in ("ratio", "median", "top0_token", "top0_feature", "top1"):
        rtol = MEDIAN_RTOL if stat in ("ratio", "median") else 1e-5
        np.testing.assert_allclose(values(massive, key + stat)[0], want[stat], rtol=rtol, err_msg=stat)
    # The count's threshold 5 * median carries the median's error, and the histogram counts the
    # threshold's own bin by interpolation: bracket it by thresholds two bin widths either side.
    slack = 2 * MEDIAN_RTOL
    most = ((mag > 1.0) & (mag >= 5.0 * (1 - slack) * median[:, None])).sum() / h.shape[0]
    least = ((mag > 1.0) & (mag >= 5.0 * (1 + slack) * median[:, None])).sum() / h.shape[0]
    assert least <= values(massive, key + "count_per_sample")[0] <= most
    assert values(massive, key + "top0_token")[0] == 0.0


@pytest.mark.parametrize("token_dim", [0, None])
def test_a_declared_sequence_first_layout_leaves_2d_taps_alone_and_a_missing_axis_is_one_line(token_dim):
    # batch_dim=1, token_dim=0 (the override for a sequence-first model) read the head's (B, D) input as (D, B):
    # a spectrum over the samples (erank_frac over d = B). Out-of-range axes wrapped around the rank silently.
    # batch_dim=1 alone did the same until round 18.
    torch.manual_seed(0)
    recorder = Recorder("net.head", point="input")
    collapse = DimensionalCollapse(modules=["net.head:input"], every_n_steps=1, batch_dim=1, token_dim=token_dim,
                                   param_patterns=[])
    quiet_trainer(max_steps=1, callbacks=[collapse, recorder]).fit(ToyTask(BlockNet()), toy_loader(24, 12))
    x = recorder.seen[0][0]
    assert x.shape == (12, 16)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    erank = float(np.exp(-(p * np.log(p)).sum()))
    assert values(collapse, "collapse/net.head-input/erank") == [pytest.approx(erank, rel=1e-6)]
    assert values(collapse, "collapse/net.head-input/erank_frac") == [pytest.approx(erank / 16, rel=1e-6)]
    with pytest.raises(LightningActError, match=r"batch_dim=-4 is not an axis of an activation of shape \(8, 4, 16\)"):
        quiet_trainer(max_steps=1, callbacks=[MassiveActivations(every_n_steps=1, batch_dim=-4)]).fit(
            ToyTask(BlockNet()), toy_loader()
        )


def test_user_layout_overrides_and_undeclared_sequence_first_taps_warn():
    pl.seed_everything(0)
    model = Encoder(batch_first=False)
    explicit = ActivationStats(modules=["embed"], every_n_steps=1, batch_dim=0, token_dim=1)
    with pytest.warns(UserWarning, match="sequence-first"):
        quiet_trainer(max_steps=1, callbacks=[ActivationStats(modules=["embed"], every_n_steps=1)]).fit(model, sequences())
    quiet_trainer(max_steps=1, callbacks=[explicit]).fit(Encoder(batch_first=False), sequences())
    assert explicit.history["act/embed/count"].values == [4 * 6 * 8]


def numpy_erank(rows):
    """Effective rank (Roy & Vetterli) of the centred (N, d) rows: entropy of the normalised singular values."""
    lam = np.linalg.eigvalsh(np.cov(rows, rowvar=False, bias=True))
    sigma = np.sqrt(lam[lam > lam.max() * 1e-12])
    p = sigma / sigma.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


class DropoutEncoder(SequenceClassifier):
    """nn.TransformerEncoder with dropout 0.3 (its activation is functional: '@activations' taps linear2's input)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=32, dropout=0.3, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_input_taps_read_through_the_dropout_that_feeds_them():
    # Before: the taps read the dropout's output. A timm ViT with drop_rate=0.5 logged the erank of the dropped
    # features (a rank-1 feature set read as rank ~80 of 96), and the encoder layer's zero_frac counted the
    # dropout's zeros as the ReLU's sparsity.
    import timm

    pl.seed_everything(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, in_chans=1, img_size=16,
                            patch_size=4, depth=2, drop_rate=0.5)
    collapse = DimensionalCollapse(modules="@penultimate", every_n_steps=1)
    features = Recorder("net.head_drop", point="input")
    quiet_trainer(max_steps=2, callbacks=[collapse, features]).fit(ToyTask(vit), toy_loader(16, 8))
    assert [t.name for t in collapse.taps] == ["net.head-input"]
    for step in (0, 1):
        (rows,) = features.seen[step]
        assert values(collapse, "collapse/net.head-input/erank")[step] == pytest.approx(numpy_erank(rows), rel=1e-5)

    pl.seed_everything(0)
    sparsity = ActivationSparsity(modules="@activations", every_n_steps=1)
    relu = Recorder("encoder.layers.0.dropout", point="input")  # the layer runs dropout(relu(linear1(x))) into linear2
    quiet_trainer(max_steps=2, callbacks=[sparsity, relu]).fit(DropoutEncoder(), sequences(16, 6))
    assert [t.name for t in sparsity.taps] == ["encoder.layers.0.linear2-input"]
    for step in (0, 1):
        (a,) = relu.seen[step]
        assert values(sparsity, "sparsity/encoder.layers.0.linear2-input/zero_frac")[step] == pytest.approx(
            np.mean(a == 0), abs=1e-12)


class DropoutMlp(SequenceClassifier):
    """fc1 -> GELU (functional) -> dropout (in place or not) -> fc2: '@activations' taps fc2's input."""

    def __init__(self, inplace):
        super().__init__()
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(4, 16), "drop": nn.Dropout(0.5, inplace=inplace), "fc2": nn.Linear(16, 2)})

    def forward(self, x):
        return self.mlp["fc2"](self.mlp["drop"](F.gelu(self.mlp["fc1"](x)))).mean(1)


@pytest.mark.parametrize("inplace", [False, True])
def test_an_input_tap_reads_through_a_dropout_in_place_or_not(inplace):
    # In place, the dropout overwrites its input: the tap read the dropped values (dropout zeros as sparsity).
    pl.seed_everything(0)
    model = DropoutMlp(inplace)
    gelu = []
    model.mlp["fc1"].register_forward_hook(lambda m, a, out: gelu.append(F.gelu(out).detach().double().numpy().copy()))
    sparsity = ActivationSparsity(modules=["mlp.fc2:input"], every_n_steps=1, threshold=1e-3)
    quiet_trainer(max_steps=2, callbacks=[sparsity]).fit(model, sequences(16, 6))
    for step in (0, 1):
        assert values(sparsity, "sparsity/mlp.fc2-input/zero_frac")[step] == pytest.approx(
            np.mean(np.abs(gelu[step]) <= 1e-3), abs=1e-12)


class T5StyleFeedForward(SequenceClassifier):
    """Hugging Face T5's DenseReluDense attribute order: wi, wo, dropout (registered after wo, called before it)."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo, self.dropout, self.act = nn.Linear(4, 16), nn.Linear(16, 2), nn.Dropout(0.3), nn.ReLU()

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi(x)))).mean(1)


class ResidualAfterDropout(SequenceClassifier):
    """h = drop(fc(x)); h += x; norm(h): the dropout's output is changed in place before the tapped norm reads it."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.drop, self.norm = nn.Linear(4, 8), nn.Linear(8, 8), nn.Dropout(0.5), nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        h = self.drop(self.fc(x))
        h += x
        return self.head(self.norm(h).mean(1))


def test_the_read_through_finds_a_dropout_registered_after_the_tap_and_not_one_changed_in_place_since():
    # T5: the dropout is registered after wo, so the sibling just before wo (act) was no dropout and the dropout's
    # zeros were counted as sparsity. A dropout output changed in place before the tap (a residual added with +=) was
    # replaced by the dropout's input, losing the residual.
    pl.seed_everything(0)
    model = T5StyleFeedForward()
    relu = []
    model.act.register_forward_hook(lambda m, a, out: relu.append(out.detach().double().numpy().copy()))
    sparsity = ActivationSparsity(modules=["wo:input"], every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[sparsity]).fit(model, sequences(16, 6))
    for step in (0, 1):
        assert values(sparsity, "sparsity/wo-input/zero_frac")[step] == pytest.approx(np.mean(relu[step] == 0), abs=1e-12)

    pl.seed_everything(0)
    stats = ActivationStats(modules=["norm:input"], every_n_steps=1)
    received = Recorder("norm", point="input")
    quiet_trainer(max_steps=2, callbacks=[stats, received]).fit(ResidualAfterDropout(), sequences(16, 6))
    for step in (0, 1):
        (h,) = received.seen[step]
        assert values(stats, "act/norm-input/mean")[step] == pytest.approx(h.mean(), rel=1e-6)


def test_a_sparse_output_is_said_once_and_the_fit_goes_on():
    # Before: "reshape is not implemented for sparse tensors" from the statistics, mid-fit.
    class SparseCode(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return torch.relu(self.fc(x)).to_sparse()

    class Net(SequenceClassifier):
        def __init__(self):
            super().__init__()
            self.code, self.head = SparseCode(), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.code(x.mean(1)).to_dense())

    monitors = [ActivationSparsity(modules=["code"], every_n_steps=1), MassiveActivations(modules=["code"], every_n_steps=1),
                DimensionalCollapse(modules=["code"], every_n_steps=1, param_patterns=[])]
    with pytest.warns(UserWarning, match="code produced no activation at step 0 .*a sparse tensor"):
        quiet_trainer(max_steps=2, callbacks=monitors).fit(Net(), sequences(16, 6))
    assert not any(monitor.history for monitor in monitors)


class ConvNormBlock(nn.Module):
    """(B, C, L) -> (B, C, L): a Conv1d over time and a LayerNorm over channels (their axes differ)."""

    def __init__(self, channels):
        super().__init__()
        self.conv, self.norm = nn.Conv1d(channels, channels, 3, padding=1), nn.LayerNorm(channels)

    def forward(self, x):
        return x + self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2)


def test_a_map_whose_length_equals_its_width_keeps_the_feature_axis_found_before():
    # Before: at a step whose length L equalled the width C nothing decided, and the (B, C, L) map was read as
    # (B, T, D), its covariance taken over time positions, without a warning.
    class Net(SequenceClassifier):
        def __init__(self):
            super().__init__()
            self.block, self.head = ConvNormBlock(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.block(x).mean(-1))

    torch.manual_seed(0)
    scale = torch.linspace(0.1, 3, 8)[None, :, None]
    batches = [(torch.randn(16, 8, length) * scale, torch.zeros(16, dtype=torch.long)) for length in (12, 8)]
    collapse = DimensionalCollapse(modules=["block"], every_n_steps=1, param_patterns=[])
    outputs = Recorder("block")
    quiet_trainer(max_steps=2, callbacks=[collapse, outputs]).fit(Net(), DataLoader(batches, batch_size=None))
    for step in (0, 1):
        (o,) = outputs.seen[step]
        rows = o.transpose(0, 2, 1).reshape(-1, 8)  # channels are the features
        assert values(collapse, "collapse/block/erank")[step] == pytest.approx(numpy_erank(rows), rel=1e-6)


def test_a_module_run_at_two_widths_is_read_at_its_first_width_by_dimensional_collapse():
    # torchvision's Bottleneck runs one self.relu at widths 64 and 256 ('@activations' taps it). Before: the
    # covariance sums of both widths were added ("size 4161 vs 65793") and the fit crashed.
    class Shared(SequenceClassifier):
        def __init__(self):
            super().__init__()
            self.up, self.relu, self.head = nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2)

        def forward(self, x):
            h = self.relu(self.up(x.mean(1)))  # (B, 12)
            return self.head(h + self.relu(h[:, :6]).repeat(1, 2))  # and (B, 6)

    torch.manual_seed(0)
    collapse = DimensionalCollapse(modules=["relu"], every_n_steps=1, param_patterns=[])
    outputs = Recorder("relu")
    with pytest.warns(UserWarning, match=r"relu runs at widths 12 and 6 .*reads its calls of width 12 only"):
        quiet_trainer(max_steps=2, callbacks=[collapse, outputs]).fit(Shared(), sequences(16, 6))
    for step in (0, 1):
        wide, narrow = outputs.seen[step]
        assert wide.shape[1] == 12 and narrow.shape[1] == 6
        assert values(collapse, "collapse/relu/erank")[step] == pytest.approx(numpy_erank(wide), rel=1e-6)


def test_channels_last_swin_stages_are_read_with_their_channels_as_features():
    """timm's Swin stages give (B, H, W, C): the spectrum is over C and top-k features name channels."""
    import timm

    pl.seed_everything(0)
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4, in_chans=1, img_size=56,
                            embed_dim=12, depths=(1,), num_heads=(2,), window_size=7)
    collapse = DimensionalCollapse(modules=["net.layers.0"], every_n_steps=1, param_patterns=[])
    massive = MassiveActivations(modules=["net.layers.0"], every_n_steps=1)
    recorder = Recorder("net.layers.0")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 1, 56, 56, generator=g), torch.randint(0, 4, (4,), generator=g)), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[collapse, massive, recorder]).fit(ToyTask(net), data)
    assert not any("nothing in the model tells" in str(w.message) for w in caught)
    (h,) = recorder.seen[0]
    assert h.shape == (4, 14, 14, 12)
    np.testing.assert_allclose(values(collapse, "collapse/net.layers.0/erank")[0], numpy_erank(h.reshape(-1, 12)), rtol=1e-6)
    assert values(collapse, "collapse/net.layers.0/erank_frac")[0] <= 1.0
    flat = np.abs(h).max(axis=0).reshape(14 * 14, 12)  # each (token, channel) position's maximum over the samples
    token, feature = np.unravel_index(np.argmax(flat), flat.shape)
    assert (values(massive, "massive/net.layers.0/top0_token")[0], values(massive, "massive/net.layers.0/top0_feature")[0]) == (
        token, feature
    )


class Conv1dNet(SequenceClassifier):
    """A 1-D conv net (B, C=8, L=6), a parameter-free permute to (B, L, 2, 4) with no layer before it in its owner
    (so nothing tells its layout), and a head."""

    def __init__(self):
        super().__init__()
        self.to_grid = Permute()
        self.body = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.body(x)
        self.to_grid(h)
        return self.head(h.mean(2))


class Permute(nn.Module):
    def forward(self, h):  # (B, C, L) -> (B, L, 2, C / 2): channels last
        return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], 2, h.shape[1] // 2)


def test_conv1d_maps_read_channels_as_features_and_an_unknown_4d_layout_warns_once_or_takes_feature_dim():
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 6, generator=g), torch.randint(0, 2, (8,), generator=g)), batch_size=8)
    collapse = DimensionalCollapse(modules=["body", "body.1", "to_grid"], every_n_steps=1, param_patterns=[])
    sparsity = ActivationSparsity(modules=["to_grid"], every_n_steps=1)
    class ToldCollapse(DimensionalCollapse):  # keys of its own: two monitors of one kind on to_grid
        prefix = "told"

    told = ToldCollapse(modules=["to_grid"], every_n_steps=1, param_patterns=[], feature_dim=-1)
    recorders = [Recorder("body"), Recorder("body.1"), Recorder("to_grid")]
    with pytest.warns(UserWarning, match=r"DimensionalCollapse: nothing in the model tells which axis of to_grid") as caught:
        quiet_trainer(max_steps=2, callbacks=[collapse, sparsity, told, *recorders]).fit(Conv1dNet(), data)
    assert sum("nothing in the model tells" in str(w.message) for w in caught) == 1  # once, and not from the others
    for step in (0, 1):
        (body,), (gelu,), (grid,) = (r.seen[step] for r in recorders)
        for name, h in (("body", body), ("body.1", gelu)):  # (B, C, L): rows are (sample, position), features C
            rows = h.transpose(0, 2, 1).reshape(-1, 8)
            np.testing.assert_allclose(values(collapse, f"collapse/{name}/erank")[step], numpy_erank(rows), rtol=1e-6)
        # feature_dim=-1: (B, L, 2, 4) has 4 features; without it, read as (B, C=L, 2, 4) with L = 6 features
        np.testing.assert_allclose(values(told, "told/to_grid/erank")[step], numpy_erank(grid.reshape(-1, 4)), rtol=1e-6)
        as_channels_first = grid.transpose(0, 2, 3, 1).reshape(-1, 6)
        np.testing.assert_allclose(values(collapse, "collapse/to_grid/erank")[step], numpy_erank(as_channels_first), rtol=1e-6)


def test_feature_drop_zeroes_the_channels_of_a_conv1d_map_and_of_a_channels_last_map():
    from lightning_act.callbacks.sensitive import FeatureDrop
    from lightning_act.capture.layout import Layout

    conv = nn.Conv1d(2, 4, 1)
    conv.register_forward_hook(FeatureDrop(torch.tensor([1]), layout=Layout(reads_features=True, features=(4, "first"))).after)
    out = conv(torch.randn(3, 2, 4))  # (B, C=4, L=4): the channels are dim 1 although L is as long
    assert bool((out[:, 1] == 0).all()) and bool((out[:, [0, 2, 3]] != 0).all())
    linear = nn.Linear(3, 5)
    linear.register_forward_hook(FeatureDrop(torch.tensor([2]), layout=Layout(reads_features=True, features=(5, "last"))).after)
    out = linear(torch.randn(2, 5, 5, 3))  # (B, H, W, C=5)
    assert bool((out[..., 2] == 0).all()) and bool((out[..., [0, 1, 3, 4]] != 0).all())


# ---------------------------------------------------------------------------------------------- precision
class HalfNet(pl.LightningModule):
    """A bf16 activation exactly at bf16(0.01) = 0.0100098 (above the threshold 0.01 in float32)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([0.01, 0.01, 0.009, 0.0, 0.5, 0.01]))

    def forward(self, x):
        return self.act(self.lin(x).to(torch.bfloat16)).float().sum(1)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_bf16_threshold_is_compared_in_float32():
    monitor = ActivationSparsity(modules=["act"], threshold=0.01, every_n_steps=1)
    recorder = Recorder("act")
    quiet_trainer(max_steps=1, callbacks=[monitor, recorder]).fit(HalfNet(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    a = np.concatenate([x.ravel() for x in recorder.seen[0]])
    want = (np.abs(a) <= 0.01).mean()  # 0.0100098 > 0.01: only 0.009 and 0.0 count
    assert want == pytest.approx(2 / 6)
    assert values(monitor, "sparsity/act/zero_frac") == [pytest.approx(want)]


# ---------------------------------------------------------------------------------------------- manual optimization
class GAN(pl.LightningModule):
    """Two optimizers, manual optimization; the discriminator runs three times per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, z):
        return self.g(z)

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_g, opt_d = self.optimizers()
        fake = self.g(z)
        g_loss = F.softplus(-self.d(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = F.softplus(-self.d(real)).mean() + F.softplus(self.d(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.g.parameters(), lr=0.05), torch.optim.SGD(self.d.parameters(), lr=0.05)


def gan_data(n=32):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g) + 2, torch.randn(n, 4, generator=g)), batch_size=8)


def test_manual_optimization_emergence_fits_are_logged_at_the_monitors_step(tmp_path, monkeypatch):
    # Two optimizers: Lightning's global_step is 24 after 12 batches. The fits went to step 24, past the run's last
    # step (11), so W&B would then drop the test metrics Lightning logs at step 12 as out of order.
    import csv

    from lightning.pytorch.loggers import CSVLogger

    import lightning_act.callbacks.massive as massive_callback

    # The GAN's ratios are noise, which the fit skips as flat: fit a log climb on the same steps instead.
    fit = massive_callback.fit_emergence
    monkeypatch.setattr(massive_callback, "fit_emergence",
                        lambda steps, values, *args: fit(steps, 5.0 + 3.0 * np.log1p(steps / 2.0), *args))
    pl.seed_everything(0)
    monitor = MassiveActivations(modules=["d.1", "g.1"], every_n_steps=1)
    trainer = quiet_trainer(max_steps=24, callbacks=[monitor], logger=CSVLogger(tmp_path, name="run"))
    trainer.fit(GAN(), gan_data(), gan_data(8))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    fit_steps = {int(row["step"]) for row in rows if row.get("massive/d.1/fit_A")}
    assert monitor.fits and fit_steps == {12}
    assert max(int(row["step"]) for row in rows) == 12


def test_manual_optimization_observes_every_forward_of_a_due_batch():
    pl.seed_everything(0)
    stats = ActivationStats(modules=["d.1", "g.1"], every_n_steps=2)
    sensitive = SensitiveNeurons(
        modules=["d.1"], every_n_steps=2, num_samples=8, window=2, eigenscore_passes=0,
        forward_fn=lambda module, batch: module.d(batch[0]),
    )
    recorder = Recorder("d.1", manual=True)
    trainer = quiet_trainer(max_steps=8, callbacks=[stats, sensitive, recorder])
    trainer.fit(GAN(), gan_data(), gan_data(8))
    assert trainer.global_step == 8  # Lightning counts both optimizers' steps: 4 batches
    assert stats.history["act/d.1/count"].steps == [0, 2]  # a step is one training batch
    assert values(stats, "act/d.1/count") == [3 * 8 * 16] * 2  # fake, real and detached fake passes
    for i, step in enumerate([0, 2]):
        a = np.concatenate([x.ravel() for x in recorder.seen[step]])
        assert a.size == 3 * 8 * 16
        np.testing.assert_allclose(values(stats, "act/d.1/mean")[i], a.mean(), rtol=1e-6)
        np.testing.assert_allclose(values(stats, "act/d.1/std")[i], a.std(), rtol=1e-5)
    assert sensitive.history["sensitive/d.1/count"].steps == [0, 2]


# ---------------------------------------------------------------------------------------------- selection
def test_default_monitors_on_boring_model_warn_and_the_fit_finishes():
    monitors = [ActivationStats(every_n_steps=1), MassiveActivations(every_n_steps=1), ActivationSparsity(every_n_steps=1)]
    collapse = DimensionalCollapse(every_n_steps=1)
    recorder = Recorder("layer", point="input")
    with pytest.warns(UserWarning, match="stays idle") as caught:
        quiet_trainer(max_steps=2, callbacks=[*monitors, collapse, recorder]).fit(
            BoringModel(), DataLoader(RandomDataset(32, 64), batch_size=8)
        )
    messages = " ".join(str(w.message) for w in caught)
    assert "ActivationStats" in messages and "MassiveActivations" in messages and ":input" in messages
    assert all(not m.history for m in monitors)
    x = recorder.seen[0][0]
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    np.testing.assert_allclose(values(collapse, "collapse/layer-input/erank")[0], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)


class TokenDecoder(pl.LightningModule):
    """``nn.TransformerDecoder`` of a layer built with ``activation=nn.GELU()``: the decoder deep-copies the layer,
    and the copy's ``__setstate__`` sets ``activation = F.relu``, hiding the registered GELU (it never runs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerDecoderLayer(16, 2, 32, 0.0, activation=nn.GELU(), batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(16, 20)

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(self.dec(h, h))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return F.cross_entropy(self(tokens).reshape(-1, 20), tokens.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_decoder_whose_activation_module_is_hidden_is_read_where_its_activation_runs():
    # Before: every monitor died in setup ("'function' object has no attribute 'modules'"), and @activations would
    # have picked the hidden GELU, which never runs. Now the activation is read at linear2's input, as for a
    # functional one.
    torch.manual_seed(0)
    task = TokenDecoder()
    assert {t.name for t in select_taps(task, "@activations")} == {f"dec.layers.{i}.linear2-input" for i in range(2)}
    recorder = Recorder("dec.layers.0.linear2", point="input")
    stats = ActivationStats(every_n_steps=1)
    quiet_trainer(max_steps=1, callbacks=[stats, recorder]).fit(
        task, DataLoader(TensorDataset(torch.randint(0, 20, (8, 5))), batch_size=8)
    )
    seen = np.concatenate([np.ravel(x) for x in recorder.seen[0]])
    assert values(stats, "act/dec.layers.0.linear2-input/zero_frac") == [pytest.approx(float(np.mean(seen == 0)))]
    assert values(stats, "act/dec.layers.0.linear2-input/mean") == [pytest.approx(float(seen.mean()), rel=1e-6)]


def test_a_default_preset_that_matches_nothing_is_said_when_the_others_match():
    # A plain MLP (or a timm ResNet whose stages hold one block each) has activations but no repeated blocks:
    # ActivationStats used to drop its block outputs without a word.
    class MLP(ToyTask):
        def __init__(self):
            super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.GELU(), nn.Linear(16, 4)))

    stats = ActivationStats(every_n_steps=1)
    with pytest.warns(UserWarning, match=r"ActivationStats: its default modules \['@blocks'\] match nothing in MLP"):
        quiet_trainer(max_steps=1, callbacks=[stats]).fit(MLP(), toy_loader(8))
    assert {key.split("/")[1] for key in stats.history} == {"net.2"}


def test_demo_transformer_functional_relu_blocks_and_forward_fn():
    pl.seed_everything(0)
    sparsity = ActivationSparsity(every_n_steps=1)
    blocks = ActivationStats(modules="@blocks", every_n_steps=1)
    sensitive = SensitiveNeurons(
        modules="model.transformer.encoder.layers.1", every_n_steps=1, num_samples=4, window=2, eigenscore_passes=0,
        forward_fn=lambda module, batch: module(*batch),
    )
    name = "model.transformer.decoder.layers.1.linear2"
    recorder = Recorder(name, point="input")
    quiet_trainer(max_steps=3, callbacks=[sparsity, blocks, sensitive, recorder]).fit(
        tiny_lightning_transformer(), token_data(), token_data(4)
    )
    assert [t.name for t in blocks.taps] == [
        f"model.transformer.{part}.layers.{i}" for part in ("encoder", "decoder") for i in (0, 1)
    ]
    assert len(sparsity.taps) == 4  # the functional ReLU of every layer, at linear2's input
    a = np.concatenate([x.ravel() for x in recorder.seen[1]])
    np.testing.assert_allclose(values(sparsity, f"sparsity/{name}-input/zero_frac")[1], (a == 0).mean(), rtol=1e-6)
    assert 0.2 < (a == 0).mean() < 0.8
    assert "sensitive/model.transformer.encoder.layers.1/v_max" in sensitive.history


def test_forward_fn_that_does_not_fit_the_model_is_one_line_at_fit_start():
    monitor = SensitiveNeurons(modules="model.decoder:input", every_n_steps=1, num_samples=4)
    with pytest.raises(LightningActError, match="forward_fn") as error:
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(tiny_lightning_transformer(), token_data(), token_data(4))
    assert "\n" not in str(error.value)


def test_mixed_selectors_say_which_part_matched_nothing_and_user_patterns_stay_errors():
    with pytest.warns(UserWarning, match=r"\['blocks\.\*\.nothing'\] match nothing"):
        quiet_trainer(max_steps=1, callbacks=[ActivationStats(modules=["@blocks", "blocks.*.nothing"])]).fit(
            ToyTask(BlockNet()), toy_loader()
        )
    with pytest.raises(ModuleSelectionError):
        quiet_trainer(max_steps=1, callbacks=[ActivationStats(modules=["blocks.*.nothing"])]).fit(ToyTask(BlockNet()), toy_loader())


class GELUActivation(nn.Module):
    """Named like ``transformers.activations.GELUActivation`` (BERT's, through ``ACT2FN["gelu"]``)."""

    def forward(self, x):
        return F.gelu(x)


class SiLUActivation(nn.Module):
    """Named like ``transformers.activations.SiLUActivation`` (Llama's and Mistral's ``ACT2FN["silu"]``)."""

    def forward(self, x):
        return F.silu(x)


class LinearActivation(nn.Module):
    """Named like ``transformers.activations.LinearActivation``: the identity, not an activation function."""

    def forward(self, x):
        return x


class HFStyleLayer(nn.Module):
    """A Hugging Face-style layer: attention called by keyword, a BERT-style intermediate and a Llama-style gated MLP
    whose activations are ``ACT2FN``-style modules, and a tuple output."""

    def __init__(self, width=8):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.dense, self.intermediate_act_fn = nn.Linear(width, 2 * width), GELUActivation()
        self.gate_proj, self.up_proj = nn.Linear(2 * width, width), nn.Linear(2 * width, width)
        self.down_proj, self.act_fn, self.proj_act = nn.Linear(width, width), SiLUActivation(), LinearActivation()

    def forward(self, hidden_states):
        normed = self.input_layernorm(hidden_states)
        attended, _ = self.self_attn(query=normed, key=normed, value=normed, need_weights=False)
        h = self.intermediate_act_fn(self.dense(hidden_states + attended))
        return (self.proj_act(hidden_states + self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))),)


class HFStyleTask(SequenceClassifier):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([HFStyleLayer() for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            (h,) = layer(hidden_states=h)
        return self.head(h.mean(1))


def test_hugging_face_style_activation_modules_and_inputs_passed_by_keyword():
    model = HFStyleTask()
    assert [t.name for t in select_taps(model, "@activations")] == [
        f"layers.{i}.{name}" for i in (0, 1) for name in ("intermediate_act_fn", "act_fn")
    ]
    # layers.*:input and self_attn:input are passed by keyword only (hidden_states=, query=): read like positional ones
    stats = ActivationStats(modules=["layers.1:input", "layers.0.self_attn:input"], every_n_steps=1)
    recorders = [Recorder("layers.0"), Recorder("layers.0.input_layernorm")]
    quiet_trainer(max_steps=2, callbacks=[stats, *recorders]).fit(model, sequences())
    for key, recorder in zip(("act/layers.1-input", "act/layers.0.self_attn-input"), recorders, strict=True):
        for step in (0, 1):
            (h,) = recorder.seen[step]
            np.testing.assert_allclose(values(stats, f"{key}/rms")[step], np.sqrt((h**2).mean()), rtol=1e-5)
            np.testing.assert_allclose(values(stats, f"{key}/abs_max")[step], np.abs(h).max(), rtol=1e-6)


def test_blocks_cover_every_resnet_stage_and_activations_find_functional_mlps():
    import timm

    resnet = timm.create_model("resnet18", pretrained=False, num_classes=4)
    assert [t.name for t in select_taps(resnet, "@blocks")] == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    (head,) = select_taps(resnet, "@penultimate")
    assert head.name == "fc-input"

    class HFMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class GPTMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(4, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    model = nn.ModuleDict({"h": nn.ModuleList([nn.ModuleDict({"mlp": GPTMLP()}) for _ in range(2)]), "llama": HFMLP()})
    assert [t.name for t in select_taps(model, "@activations")] == [
        "h.0.mlp.c_proj-input", "h.1.mlp.c_proj-input", "llama.down_proj-input"
    ]
    assert [t.name for t in select_taps(model, "@blocks")] == ["h.0", "h.1"]


def test_resnet18_blocks_match_numpy():
    import timm

    pl.seed_everything(0)
    task = ToyTask(timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1))
    stats = ActivationStats(modules="@blocks", every_n_steps=1)
    massive = MassiveActivations(modules="net.layer3.1", every_n_steps=1)
    recorder = Recorder("net.layer3.1")
    quiet_trainer(max_steps=1, callbacks=[stats, massive, recorder]).fit(task, toy_loader(8, 4))
    assert len(stats.taps) == 8
    (h,) = recorder.seen[0]
    np.testing.assert_allclose(values(stats, "act/net.layer3.1/mean")[0], h.mean(), rtol=1e-5)
    h_btd = h.reshape(h.shape[0], h.shape[1], -1).transpose(0, 2, 1)  # (B, H*W, C)
    want = massive_numpy(h_btd)
    for stat in ("median", "top0_token", "top0_feature"):
        rtol = MEDIAN_RTOL if stat == "median" else 1e-5  # the median is a histogram estimate
        np.testing.assert_allclose(values(massive, f"massive/net.layer3.1/{stat}")[0], want[stat], rtol=rtol, err_msg=stat)
    # each BasicBlock ends in a ReLU: a sample with more than half its entries 0 has median 0, and its ratio is unknown
    if np.isfinite(want["ratio"]):
        np.testing.assert_allclose(values(massive, "massive/net.layer3.1/ratio")[0], want["ratio"], rtol=MEDIAN_RTOL)
    else:
        assert "massive/net.layer3.1/ratio" not in massive.history  # before round 30: inf, logged


# ---------------------------------------------------------------------------------------------- r90 of conv weights
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1), nn.ReLU()) for i in range(2)])
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


class Snapshots(Callback):
    def __init__(self):
        self.weights = []

    def _take(self, pl_module):
        self.weights.append(torch.cat([p.detach().reshape(-1) for n, p in pl_module.named_parameters()
                                       if n.startswith("net.blocks") and p.dim() >= 2]).double().numpy())

    def on_fit_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(pl_module)


def test_r90_covers_conv_kernels():
    pl.seed_everything(0)
    collapse = DimensionalCollapse(modules="@blocks", every_n_steps=1, projection_dim=None)
    snapshots = Snapshots()
    quiet_trainer(max_steps=4, callbacks=[collapse, snapshots]).fit(ToyTask(ConvNet()), toy_loader())
    assert collapse.param_names == ["net.blocks.0.0.weight", "net.blocks.1.0.weight"]
    x = np.stack(snapshots.weights)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    want = int(np.searchsorted(np.cumsum(s) / s.sum(), 0.9 - 1e-12) + 1)
    assert values(collapse, "collapse/params/r90")[-1] == want


# ---------------------------------------------------------------------------------------------- bad values
class Poisoned(ToyTask):
    """Weights become NaN after the second step; one validation example is NaN."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 1:
            with torch.no_grad():
                self.net.blocks[0].fc.weight[0, 0] = float("nan")


def test_nan_weights_and_nan_validation_example_do_not_kill_the_fit():
    pl.seed_everything(0)
    x = torch.randn(8, 1, 16, 16)
    x[3, 0, 0, 0] = float("nan")
    val = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=8)
    collapse = DimensionalCollapse(modules="@blocks", every_n_steps=1, param_patterns=["net.blocks.*.fc.weight"],
                                   warn_below=0.01)
    sensitive = SensitiveNeurons(every_n_steps=1, num_samples=8, window=2, eigenscore_passes=3)
    stats = ActivationStats(modules="@blocks", every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_steps=4, callbacks=[collapse, sensitive, stats])
        trainer.fit(Poisoned(BlockNet()), toy_loader(), val)
    said = " | ".join(str(w.message) for w in caught)
    assert "collapse/params/r90 is not logged from step 2: the weights it follows" in said
    # Unknown statistics are left out, with one warning per tap (before: logged as NaN, read as a measurement)
    assert "DimensionalCollapse: net.blocks.0 erank/" in said and "unknown at step 2 (the covariance is not finite" in said
    # no dropout in BlockNet: no EigenScore/EES at all (round 30), said once
    assert "SensitiveNeurons: the model has no active dropout" in said
    assert "SensitiveNeurons: net.head-input v_mean/v_max/count/selected are unknown at step 2" in said
    assert "ActivationStats: net.blocks.0 mean/" in said and "are unknown at step 3 (no finite activation" in said
    assert collapse.history["collapse/net.blocks.0/erank"].steps == [0, 1]
    assert collapse.history["collapse/net.blocks.0/collapsed"].steps == [0, 1]  # was 0.0 ("not collapsed") after
    assert np.isfinite(values(collapse, "collapse/net.blocks.0/erank")).all()
    assert collapse.history["collapse/params/r90"].steps == [0, 1]  # no share of a NaN variance
    assert stats.history["act/net.blocks.0/mean"].steps == [0, 1, 2]  # step 2: finite entries left; 3: none
    # callback_metrics say "unknown now" (EarlyStopping(check_finite=True) stops on it), not step 2's value
    for key in ("act/net.blocks.0/mean", "collapse/net.blocks.0/erank", "sensitive/net.head-input/v_mean"):
        assert np.isnan(float(trainer.callback_metrics[key])), key
    assert stats.history["act/net.blocks.0/nonfinite"].steps == [0, 1, 2, 3] and values(stats, "act/net.blocks.0/nonfinite")[-1] > 0
    assert "sensitive/net.head-input/eigenscore" not in sensitive.history  # one validation example is NaN throughout
    assert sensitive.history["sensitive/net.head-input/count"].steps == [0, 1]  # no set chosen from a NaN sensitivity


class Odd(ToyTask):
    """Runs an extra zero-size batch through the model, and puts +inf into one block output at step 1."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.net(x[:0])
        handle = self.net.blocks[1].register_forward_hook(
            lambda m, a, out: out.index_fill(2, torch.tensor([5]), float("inf")) if batch_idx == 1 else None,
            prepend=True,  # before the monitors' hook, as if the block itself had produced it
        )
        loss = F.cross_entropy(self.net(x).nan_to_num(0.0, 0.0, 0.0), y)
        handle.remove()
        return loss


def test_empty_batch_is_skipped_and_inf_is_reported_as_inf():
    pl.seed_everything(0)
    massive = MassiveActivations(every_n_steps=1)
    recorder = Recorder("net.blocks.0")
    quiet_trainer(max_steps=2, callbacks=[massive, recorder]).fit(Odd(BlockNet()), toy_loader())
    (h,) = [a for a in recorder.seen[0] if a.size]
    # The ratio's median is a histogram estimate (MEDIAN_RTOL above).
    np.testing.assert_allclose(values(massive, "massive/net.blocks.0/ratio")[0], massive_numpy(h)["ratio"], rtol=MEDIAN_RTOL)
    assert values(massive, "massive/net.blocks.1/top1")[1] == float("inf")


# ---------------------------------------------------------------------------------------------- Lightning integration
def test_early_stopping_and_model_checkpoint_can_monitor_a_statistic(tmp_path):
    pl.seed_everything(0)
    key = "massive/net.blocks.1/ratio"
    massive = MassiveActivations(every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=key, mode="max", every_n_train_steps=2, save_top_k=1)
    stopping = EarlyStopping(monitor=key, mode="max", patience=100, check_on_train_epoch_end=True)
    trainer = quiet_trainer(max_steps=12, callbacks=[massive, checkpoint, stopping], enable_checkpointing=True)
    trainer.fit(ToyTask(BlockNet()), toy_loader())
    assert float(trainer.callback_metrics[key]) == pytest.approx(values(massive, key)[-1])
    ratios = dict(zip(massive.history[key].steps, values(massive, key)))
    assert float(checkpoint.best_model_score) == pytest.approx(max(ratios.values()))


def test_logger_false_writes_nothing_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ActivationStats(every_n_steps=1), MassiveActivations(every_n_steps=1)],
    )
    trainer.fit(ToyTask(BlockNet()), toy_loader())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- arguments and resume
@pytest.mark.parametrize("monitor", [ActivationStats, ActivationSparsity, MassiveActivations, DimensionalCollapse, SensitiveNeurons])
@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"every_n_steps": -5}, {"every_n_steps": "ten"},
                                 {"every_n_steps": 2.5}, {"history_size": 1}, {"history_size": 2}])
def test_bad_monitor_arguments_are_one_line(monitor, bad):
    with pytest.raises(LightningActError) as error:
        monitor(**bad)
    message = str(error.value)
    assert "\n" not in message and monitor.__name__ in message and next(iter(bad)) in message


def test_histories_survive_a_resume_with_another_interval(tmp_path):
    pl.seed_everything(0)
    first = MassiveActivations(every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    quiet_trainer(max_steps=4, callbacks=[first, checkpoint], enable_checkpointing=True).fit(ToyTask(BlockNet()), toy_loader())
    resumed = MassiveActivations(every_n_steps=3)
    quiet_trainer(max_steps=7, callbacks=[resumed]).fit(
        ToyTask(BlockNet()), toy_loader(), ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt")
    )
    assert resumed.history["massive/net.blocks.0/ratio"].steps == [0, 2, 6]


# ---------------------------------------------------------------------------------------------- shared capture
class HookCount(Callback):
    """Counts forward hooks during the fit and copies the model while they are attached."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import copy
        import pickle

        self.hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules())
        clone = pickle.loads(pickle.dumps(pl_module))
        copy.deepcopy(pl_module)(batch[0])  # a copy runs, with inert hooks
        self.clone_hooks = sum(len(m._forward_hooks) for m in clone.modules())


def test_one_hook_per_tapped_module_shared_by_all_monitors_and_the_model_stays_picklable():
    monitors = [ActivationStats(modules="@blocks", every_n_steps=1), MassiveActivations(every_n_steps=1),
                DimensionalCollapse(modules="@blocks", every_n_steps=1, param_patterns=[])]
    counter = HookCount()
    task = ToyTask(BlockNet())
    quiet_trainer(max_steps=2, callbacks=[*monitors, counter]).fit(task, toy_loader())
    assert counter.hooks == 2  # net.blocks.0 and net.blocks.1, once each
    assert counter.clone_hooks == 2
    assert all(len(m.history["act/net.blocks.0/count" if isinstance(m, ActivationStats) else next(iter(m.history))]) == 2
               for m in monitors)
    assert sum(len(m._forward_hooks) for m in task.modules()) == 0  # removed at the end of fit


@pytest.mark.parametrize("make", [
    lambda: ActivationSparsity(threshold="0.1"), lambda: ActivationSparsity(threshold=-1.0),
    lambda: MassiveActivations(abs_threshold=None), lambda: MassiveActivations(top_k=2.5),
    lambda: MassiveActivations(abs_threshold=float("inf")), lambda: ActivationSparsity(threshold=float("nan")),
    lambda: DimensionalCollapse(max_rows="many"), lambda: ActivationStats(batch_dim="first"),
    lambda: SensitiveNeurons(forward_fn="no.such.function"), lambda: SensitiveNeurons(forward_fn=3),
    # round 15: accepted before, then NaN, wrong values or a TypeError deep in the fit
    lambda: SensitiveNeurons(alpha=0.0), lambda: SensitiveNeurons(alpha="1e-3"),
    lambda: ActivationSparsity(temporal_dim=1.5), lambda: ActivationSparsity(cett_max_tokens=2.5),
    lambda: ActivationSparsity(cett_grid_size=3.5), lambda: ActivationSparsity(cett_grid_range=(1e-6, float("inf"))),
    lambda: MassiveActivations(min_fit_points=float("nan")), lambda: MassiveActivations(history_size=6),
    lambda: DimensionalCollapse(warn_below="0.1"), lambda: DimensionalCollapse(max_snapshots=2),
    lambda: ActivationStats(token_dim=0), lambda: MassiveActivations(batch_dim=1, token_dim=1),
    # round 16: a bare ValueError or TypeError, a string read as True, an AttributeError at fit start
    lambda: ActivationSparsity(cett_grid_range=(1e-6,)), lambda: ActivationSparsity(cett_modules=5),
    lambda: DimensionalCollapse(variance_fraction="0.9"), lambda: SensitiveNeurons(stop_after_taps="no"),
    lambda: MassiveActivations(stop_after_taps="no"), lambda: SensitiveNeurons(tracking_inputs=[[0.0, 1.0]]),
])
def test_other_bad_arguments_are_one_line(make):
    with pytest.raises(LightningActError) as error:
        make()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- round 14
class Recurrent(SequenceClassifier):
    """PyTorch's recurrent layers in their default order, (T, B, H), with lr 0 so a plain pass is the reference."""

    def __init__(self, kind):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.rnn = getattr(nn, kind)(8, 8)  # batch_first=False
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: (B, T, 4)
        return self.head(self.rnn(self.embed(x).transpose(0, 1))[0].mean(0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layers_in_sequence_first_order_are_read_per_sequence(kind):
    pl.seed_everything(0)
    model = Recurrent(kind)
    massive = MassiveActivations(modules=["rnn"], every_n_steps=1)
    sensitive = SensitiveNeurons(modules=["rnn"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    data = sequences(n=8)
    quiet_trainer(max_steps=1, callbacks=[massive, sensitive]).fit(model, data, sequences(n=8))
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = model.rnn(model.embed(x).transpose(0, 1))[0].transpose(0, 1).double().numpy()  # (B, T, H)
    want = massive_numpy(np.concatenate([h[:4]]))  # the first training batch: sequences 0-3
    np.testing.assert_allclose(values(massive, "massive/rnn/median")[0], want["median"], rtol=MEDIAN_RTOL)
    assert values(massive, "massive/rnn/top0_token")[0] == want["top0_token"]
    np.testing.assert_allclose(sensitive.embeddings["rnn"][-1].numpy(), h.mean(1), rtol=1e-6)  # (B, H), per sequence


class NonTensorOutputs(SequenceClassifier):
    """A tapped module whose output is a PackedSequence, a dict or integers: none has a sample axis to read."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(4, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        if self.kind == "packed":
            packed = nn.utils.rnn.pack_padded_sequence(h, [x.shape[1]] * x.shape[0], batch_first=True)
            h = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0]
        elif self.kind == "dict":
            h = self.rnn(h)[0]
            h = self.pick({"hidden": h})["hidden"]
        else:
            h = self.rnn(h)[0] + 0 * self.pick(x.argmax(-1, keepdim=True))
        return self.head(h.mean(1))

    def pick(self, value):  # hooked through its own module below
        return self.tapped(value)


@pytest.mark.parametrize("kind", ["packed", "dict", "integers"])
def test_outputs_without_a_sample_axis_warn_once_and_log_nothing(kind):
    model = NonTensorOutputs(kind)
    model.tapped = nn.Identity()
    tapped = "rnn" if kind == "packed" else "tapped"
    monitors = [ActivationSparsity(modules=[tapped], every_n_steps=1), MassiveActivations(modules=[tapped], every_n_steps=1),
                DimensionalCollapse(modules=[tapped], every_n_steps=1, param_patterns=[]),
                SensitiveNeurons(modules=[tapped], every_n_steps=1, num_samples=8, eigenscore_passes=0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=monitors).fit(model, sequences(n=8), sequences(n=8))
    for monitor in monitors:
        assert not monitor.history, type(monitor).__name__  # before: a PackedSequence's tokens were read as samples
        said = [w for w in caught if str(w.message).startswith(f"{type(monitor).__name__}: {tapped} ")]
        assert len(said) == 1 and "not a floating-point tensor" in str(said[0].message)


class PaddedEncoder(SequenceClassifier):
    """nn.TransformerEncoder with a padding mask: in eval mode without gradients PyTorch's fast path would hand its
    layers nested tensors."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:, -2:] = True
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=pad)[:, :-2].mean(1))


def test_probes_of_a_padded_transformer_encoder_read_what_the_plain_forward_computes():
    pl.seed_everything(0)
    model = PaddedEncoder()
    before = copy.deepcopy(model)  # MassiveActivations probes before the step's update, SensitiveNeurons after it
    massive = MassiveActivations(modules=["encoder.layers.0"], every_n_steps=1, probe="val")
    sensitive = SensitiveNeurons(modules=["encoder.layers.1"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    val = sequences(n=8)
    quiet_trainer(max_steps=1, callbacks=[massive, sensitive]).fit(model, sequences(n=8, tokens=6), val)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the probes
    x = torch.cat([b[0] for b in val])

    def layer_outputs(net):
        seen = {}
        hooks = [net.encoder.layers[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (0, 1)]
        net.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():  # the plain forward, without nested tensors
                net(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
            for hook in hooks:
                hook.remove()
        return seen

    first = layer_outputs(before)[0][:4]  # the first validation batch
    np.testing.assert_allclose(values(massive, "massive/encoder.layers.0/top1")[0], first.abs().max().item(), rtol=1e-6)
    last = layer_outputs(model)[1]
    np.testing.assert_allclose(sensitive.embeddings["encoder.layers.1"][-1].numpy(), last.mean(1).double().numpy(), rtol=1e-5)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_probes_convert_their_batches_to_the_trainers_precision(precision):
    pl.seed_everything(0)
    model = Encoder(batch_first=True)
    before = copy.deepcopy(model).double()  # the probe runs before the step's update
    massive = MassiveActivations(modules=["encoder.layers.0"], every_n_steps=1, probe="val")
    sensitive = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=8, eigenscore_passes=0)
    quiet_trainer(max_steps=1, precision=precision, callbacks=[massive, sensitive]).fit(model, sequences(), sequences())
    assert massive.history and sensitive.history  # before: the probes fed float32 batches to the model and failed
    if precision == "64-true":
        x = torch.cat([b[0] for b in sequences()]).double()
        with torch.no_grad():
            h = before.embed(x)
            h[:, 0, 3] = h[:, 0, 3] * 1e4
            h = before.encoder.layers[0](h)
        np.testing.assert_allclose(values(massive, "massive/encoder.layers.0/top1")[0], h[:4].abs().max().item(), rtol=1e-12)


def test_dimensional_collapse_logs_nothing_for_one_row_or_a_tensor_without_features():
    class Net(ToyTask):
        def forward(self, x):
            return self.net(x) + 0 * self.score(x.flatten(1).mean(1))  # (B,) output of a tapped module

    for batch_size, tapped in [(1, "net.head-input"), (4, "score")]:
        model = Net(BlockNet())
        model.score = nn.Identity()
        collapse = DimensionalCollapse(modules=[tapped], every_n_steps=1, param_patterns=[], warn_below=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=2, callbacks=[collapse]).fit(model, toy_loader(8, batch_size))
        assert not collapse.history and not collapse.collapsed  # before: erank = pr = 0 and "collapsed"
        said = [str(w.message) for w in caught if str(w.message).startswith(f"DimensionalCollapse: {tapped} ")]
        assert len(said) == 1 and ("2 rows" in said[0] if batch_size == 1 else "1-d tensor" in said[0])


def test_penultimate_of_a_distilled_deit_and_of_a_headless_backbone_is_the_class_tokens_head():
    import timm

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=32,
                             patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert [t.name for t in select_taps(deit, "@penultimate")] == ["head-input"]

    class OwnHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 3)  # registered before the backbone, whose last Linear is an MLP's fc2
            self.backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                              patch_size=8, embed_dim=16, depth=1, num_heads=2)

    assert [t.name for t in select_taps(OwnHead(), "@penultimate")] == ["head-input"]

    class Distillation(nn.Module):
        """A frozen teacher registered before the student: before, the teacher's head was tapped (SensitiveNeurons
        then tracked embeddings that never change), and nothing said so."""

        def __init__(self):
            super().__init__()
            kwargs = dict(pretrained=False, num_classes=3, img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
            self.teacher = timm.create_model("vit_tiny_patch16_224", **kwargs).requires_grad_(False)
            self.student = timm.create_model("vit_tiny_patch16_224", **kwargs)

    assert [t.name for t in select_taps(Distillation(), "@penultimate")] == ["student.head-input"]
    both_trained = Distillation().requires_grad_(True)
    assert [t.name for t in select_taps(both_trained, "@penultimate")] == ["teacher.head-input", "student.head-input"]


def test_blocks_of_a_stack_between_a_stem_and_a_tail():
    import torchvision

    # torchvision's MobileNetV3 `features`: a convolution, 11 inverted-residual blocks, a convolution. Before, @blocks
    # found only the inner `block` layers of 2 of the 11 blocks; EfficientNet's stages keep their own stacks.
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=5)
    assert [t.name for t in select_taps(mobilenet, "@blocks")] == [f"features.{i}" for i in range(1, 12)]
    efficientnet = [t.name for t in select_taps(torchvision.models.efficientnet_b0(num_classes=5), "@blocks")]
    assert efficientnet[:3] == ["features.2.0", "features.2.1", "features.3.0"] and len(efficientnet) == 14
    stem_run_tail = nn.Sequential(nn.Linear(4, 4), Block(4), Block(4), Block(4), nn.Linear(4, 2))
    assert [t.name for t in select_taps(stem_run_tail, "@blocks")] == ["1", "2", "3"]
    interleaved = nn.Sequential(nn.Linear(4, 4), Block(4), nn.LayerNorm(4), Block(4), Block(4), nn.Linear(4, 2))
    with pytest.raises(ModuleSelectionError):  # no run of 3 blocks between one stem and one tail: not a stack
        select_taps(interleaved, "@blocks")


def test_a_numpy_integer_top_k_is_a_whole_number():
    import numpy as np

    assert MassiveActivations(top_k=np.int64(3)).top_k == 3  # before: refused as not a whole number


def test_a_model_with_an_ema_copy_of_its_network_is_monitored_where_it_trains():
    """The EMA pattern: ``self.ema = AveragedModel(self.net)``, updated after each step and used for validation only.
    Before, ``@penultimate`` was the copy's head, which never runs in a training forward: SensitiveNeurons logged
    nothing and DimensionalCollapse had no head input; its trajectory followed the copy's block weights too."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    class WithEMA(ToyTask):
        def __init__(self):
            super().__init__(BlockNet())
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))

        def on_train_batch_end(self, *args):
            self.ema.update_parameters(self.net)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=self.lr)

    sensitive = SensitiveNeurons(every_n_steps=1, num_samples=8, window=2, eigenscore_passes=0)
    collapse = DimensionalCollapse(every_n_steps=1)
    quiet_trainer(max_steps=2, callbacks=[sensitive, collapse]).fit(WithEMA(), toy_loader(16), toy_loader(8, seed=1))
    assert [t.name for t in sensitive.taps] == ["net.head-input"]
    assert [t.name for t in collapse.taps] == ["net.blocks.0", "net.blocks.1", "net.head-input"]
    assert collapse.param_names == ["net.blocks.0.fc.weight", "net.blocks.1.fc.weight"]
    assert any(key.startswith("sensitive/net.head-input/") for key in sensitive.history)
    assert "collapse/net.head-input/erank" in collapse.history


class GatedMlp(nn.Module):
    """A Llama-style MLP as Hugging Face registers it: ``gate_proj``, ``up_proj``, ``down_proj``, then ``act_fn``
    (a SiLU that is not ``nn.SiLU``, like transformers' ACT2FN classes)."""

    class HfSiLU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = self.HfSiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GatedMlpLm(pl.LightningModule):
    def __init__(self, hidden: int = 16, intermediate: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(200, hidden)
        self.mlp = GatedMlp(hidden, intermediate)
        self.head = nn.Linear(hidden, 200)

    def forward(self, ids):
        return self.head(self.embed(ids) + self.mlp(self.embed(ids)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]).flatten(0, 1), batch[0].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("length", [16, 10, 32])
def test_an_activation_registered_after_its_mlp_projections_is_read_along_its_own_width(length):
    # Before: the width came from down_proj, registered just before act_fn, whose output is the hidden size (16): a
    # (B, 16, 32) activation of a sequence as long as the hidden size was read with its 16 tokens as the features
    # (erank_frac 0.936 for numpy's 0.474 on a tiny Llama; SensitiveNeurons' drop zeroed token positions).
    torch.manual_seed(0)
    model = GatedMlpLm()
    seen = []
    model.mlp.act_fn.register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy().copy()))
    collapse = DimensionalCollapse(modules=["mlp.act_fn"], every_n_steps=1, param_patterns=[])
    massive = MassiveActivations(modules=["mlp.act_fn"], every_n_steps=1)
    ids = torch.randperm(200)[: 4 * length].reshape(4, length)  # no token twice: no tied largest entries
    quiet_trainer(max_steps=1, callbacks=[collapse, massive]).fit(model, DataLoader(TensorDataset(ids), batch_size=4))
    activation = seen[0]  # (4, length, 32)
    assert activation.shape == (4, length, 32)
    expected = numpy_erank(activation.reshape(-1, 32))
    assert collapse.history["collapse/mlp.act_fn/erank"].values[0] == pytest.approx(expected, rel=1e-4)
    magnitude = np.abs(activation)
    sample, token, feature = np.unravel_index(np.argmax(magnitude), magnitude.shape)
    assert massive.history["massive/mlp.act_fn/top0_token"].values[0] == token
    assert massive.history["massive/mlp.act_fn/top0_feature"].values[0] == feature


class FakeModelOutput(dict):
    """What transformers' ``ModelOutput`` is to a hook: an ordered dict of the non-None fields with ``to_tuple``."""

    def to_tuple(self):
        return tuple(self.values())


class ModelOutputEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)

    def forward(self, x):
        hidden = self.proj(x)
        return FakeModelOutput(last_hidden_state=hidden, pooler_output=hidden.mean(1))


class ModelOutputClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = ModelOutputEncoder(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x)["last_hidden_state"].mean(1))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_hugging_face_model_output_is_read_by_its_last_hidden_state():
    # Before: a tapped HF backbone's ModelOutput (a dict) gave the monitors nothing, with a warning listing causes.
    torch.manual_seed(0)
    model = ModelOutputClassifier()
    seen = []
    model.encoder.proj.register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy().copy()))
    monitor = ActivationStats(modules=["encoder"], every_n_steps=1)
    data = DataLoader(TensorDataset(torch.randn(4, 5, 4)), batch_size=4)
    quiet_trainer(max_steps=1, callbacks=[monitor]).fit(model, data)
    assert monitor.history["act/encoder/count"].values == [4 * 5 * 8]
    np.testing.assert_allclose(monitor.history["act/encoder/mean"].values, [seen[0].mean()], rtol=1e-5)
    # a model given labels puts its scalar loss first (CausalLMOutput(loss, logits)): the logits are read, not it
    from lightning_act.capture.registry import first_tensor

    logits = torch.randn(2, 3, 5)
    assert first_tensor(FakeModelOutput(loss=torch.tensor(2.5), logits=logits)) is logits


class PairInput(nn.Module):
    """A module called with one tuple argument ``(x, mask)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, pair):
        x, mask = pair
        return self.proj(x * mask)


def test_an_input_tap_of_a_module_called_with_a_tuple_reads_its_first_tensor():
    # Before: the input of a module called as module((x, mask)) was a tuple in a tuple: it gave the monitors nothing.
    class Task(ModelOutputClassifier):
        def __init__(self):
            super().__init__()
            self.pair = PairInput()

        def forward(self, x):
            return self.pair((x, torch.ones_like(x))).mean(1)

    torch.manual_seed(0)
    model = Task()
    monitor = ActivationStats(modules=["pair:input"], every_n_steps=1)
    x = torch.randn(4, 5, 4)
    quiet_trainer(max_steps=1, callbacks=[monitor]).fit(model, DataLoader(TensorDataset(x), batch_size=4))
    assert monitor.history["act/pair-input/count"].values == [4 * 5 * 4]
    np.testing.assert_allclose(monitor.history["act/pair-input/mean"].values, [x.double().mean().item()], rtol=1e-6)
