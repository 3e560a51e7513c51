"""Which axis of a tapped activation is the sample, which the token and which the features.

The statistics read activations sample-first: ``(B, D)``, ``(B, T, D)``, ``(B, C, H, W)``. PyTorch's
own sequence modules default to sequence-first ``(T, B, D)`` (``batch_first=False``), so a tap
inside (or on) an ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``,
``nn.MultiheadAttention``, ``nn.TransformerEncoder``/``Decoder``, ``nn.Transformer`` or a recurrent
layer (``nn.RNN``/``LSTM``/``GRU``) inherits the ``batch_first`` of its nearest such owner. The user
can say it per monitor (``batch_dim=``, ``token_dim=``), which overrides the inference.

Features: a 3-D activation is read as ``(B, T, D)`` and a 4-D one as ``(B, C, H, W)``, but channels-last maps
(timm's Swin, TinyViT and MambaOut blocks give ``(B, H, W, C)``) and 1-D conv maps ``(B, C, L)`` exist too. The
tapped module's layers tell which: the features are the axis (1 or the last) whose length is the width the last
layer writes (or its half by an ``nn.GLU`` after it; the first reads, for an input tap); when both axes have that length,
the axis every layer of the module acts on (a ``Linear``, ``LayerNorm`` or recurrent layer the last, a convolution,
``BatchNorm``, ``GroupNorm`` or timm's ``LayerNorm2d`` axis 1) decides, unless they differ (ConvNeXt's blocks permute
inside). An activation module has no layers, so the layer its owner is or the layers it registers around it speak for
it. ``feature_dim=`` (1 or -1) overrides the inference; a 3-D map of 1-D convolutions whose axes have none of their
widths (their outputs joined along the channels) has its features on axis 1; where nothing tells the layout of a map
of 4 or more axes, the reading above stands, and a monitor whose statistics depend on it warns. A 2-D or 3-D
activation of such layers with their width on axis 0 only is an unbatched call (``(C, H, W)``, ``(C, L)``): it has
no sample axis, and those monitors warn and skip it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_act.errors import LightningActError


@dataclass(frozen=True)
class Layout:
    """Axis of the samples and (optionally) of the tokens; ``None``: sample-first as it comes.

    With ``reads_features`` (a monitor whose statistics depend on the feature axis) the features are moved to where
    the statistics read them (:func:`with_canonical_features`): ``feature_dim`` (1 or -1 of the sample-first
    activation) is declared by the user, ``features`` the inferred ``(width, axis, unbatched rank)`` of the layers at
    the tap (:func:`tap_features`; axis ``"first"``: axis 1, ``"last"``: the last axis, ``None``: they differ; the
    rank: :func:`unbatched_ndim`)."""

    batch_dim: int | None = None
    token_dim: int | None = None
    reads_features: bool = False
    feature_dim: int | None = None
    features: tuple[int | tuple[int, ...], str | None, int | None] | None = None

    @property
    def declared(self) -> bool:
        return self.batch_dim is not None


SAMPLE_FIRST = Layout()


def declared_batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of a PyTorch sequence module (a Transformer stack asks its first layer), else None."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return declared_batch_first(module.layers[0]) if len(module.layers) else None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)  # the layers keep the flag on their attention
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer, nn.RNNBase)):
        return bool(module.batch_first)
    return None


def is_hugging_face_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's ``c_fc``/``c_proj``): a Linear whose weight is stored ``(in, out)``, with
    ``x @ W + b`` on the last axis (recognised by name and its ``nf`` width: transformers is not a dependency)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


def conv1d_widths(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Hugging Face ``Conv1D``: ``nx`` and ``nf``, or its weight's ``(in, out)`` shape where it
    keeps no ``nx`` (older transformers and GPT-2 ports)."""
    nx = getattr(module, "nx", None)
    return int(nx) if isinstance(nx, int) else int(module.weight.shape[0]), int(module.nf)


def layer_features(layer: nn.Module) -> tuple[str, int, int] | None:
    """``(axis, input width, output width)`` of a layer that acts on one axis of its input: ``"first"`` (axis 1:
    convolutions, batch/instance/group norms, timm's ``LayerNorm2d``) or ``"last"`` (``Linear``, Hugging Face's
    ``Conv1D``, layer norms, the recurrent layers and cells, whose output (the first item of their tuple) is
    ``(B, T, features)`` once read sample-first: an LSTM took the width of the layer before it, and sequences as long
    as that width were read along their time steps)."""
    if isinstance(layer, nn.Linear):
        return "last", layer.in_features, layer.out_features
    if isinstance(layer, nn.RNNBase):
        directions = 2 if layer.bidirectional else 1
        return "last", layer.input_size, (layer.proj_size or layer.hidden_size) * directions
    if isinstance(layer, nn.RNNCellBase):
        return "last", layer.input_size, layer.hidden_size
    if is_hugging_face_conv1d(layer):
        return "last", *conv1d_widths(layer)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return "first", layer.in_channels, layer.out_channels
    if isinstance(layer, nn.modules.batchnorm._NormBase):  # batch and instance norms
        return "first", layer.num_features, layer.num_features
    if isinstance(layer, nn.GroupNorm):
        return "first", layer.num_channels, layer.num_channels
    shape = getattr(layer, "normalized_shape", None)  # nn.LayerNorm, nn.RMSNorm, timm's norms
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], int):
        return ("first" if type(layer).__name__.endswith("2d") else "last"), shape[0], shape[0]
    return None


def unbatched_ndim(layer: nn.Module) -> int | None:
    """The rank of what ``layer`` reads and writes when called on one example without a batch axis, where it takes
    such a call: a convolution's or instance norm's ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``, one axis fewer
    than its batch. ``None`` for the other layers: a batch norm takes a batch only (BatchNorm1d's ``(N, C)`` has the
    rank of an unbatched ``(C, L)``: which it is nothing tells)."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return len(layer.kernel_size) + 1
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        return layer._get_no_batch_dim()
    return None


def halves_features(module: nn.Module, axis: str, rank: int | None = None) -> bool:
    """Whether ``module`` is an ``nn.GLU`` that halves the features on ``axis`` (``"first"``: its ``dim=1``,
    ``"last"``: ``dim=-1``; or, after a layer whose unbatched call has ``rank`` axes, the same axes counted from the
    other end of a batch: S4D's ``Conv1d(H, 2H, 1), GLU(dim=-2)`` on ``(B, 2H, L)``): Demucs' blocks end
    ``Conv1d(h, 2h, 1), GLU(dim=1)``, whose ``(B, h, L)`` output has neither axis of the last convolution's width, and
    were read along their time steps."""
    if not isinstance(module, nn.GLU):
        return False
    dims = {"first": {1} | ({-rank} if rank else set()), "last": {-1} | ({rank} if rank else set())}
    return module.dim in dims.get(axis, set())


def _features_of(
    layers: list[nn.Module], point: str
) -> tuple[int | tuple[int, ...], str | None, int | None] | None:
    """``(width, axis, unbatched rank)`` from ``layers`` in module order: the width the last one writes (and its
    halves by the ``nn.GLU`` registered after it, :func:`halves_features`: registration order is not the forward's,
    a GLU registered last may run before the layer, so both are candidates; the first one reads, for an input) and
    the rank of that layer's unbatched call (:func:`unbatched_ndim`; ``None`` where an ``nn.Flatten`` follows it: a batch ``(B, C*L)`` has the rank and, with ``B == C``, the look of an unbatched
    ``(C, L)``), and the axis they all act on (``None`` when they differ: a block that permutes inside)."""
    found = [(index, f) for index, layer in enumerate(layers) if (f := layer_features(layer)) is not None]
    if not found:
        return None
    if point == "input":
        index, (_, width, _) = found[0]
        rank = unbatched_ndim(layers[index])
    else:
        index, (axis, _, width) = found[-1]
        flattened = any(isinstance(later, nn.Flatten) for later in layers[index + 1:])
        rank = None if flattened else unbatched_ndim(layers[index])
        halvings = sum(halves_features(later, axis, rank) for later in layers[index + 1:])
        if halvings:
            width = tuple(dict.fromkeys(width >> k for k in range(halvings + 1)))
    axes = {axis for _, (axis, _, _) in found}
    return width, (axes.pop() if len(axes) == 1 else None), rank


#: Norms that also take a 2-D ``(N, C)``: run on a reshaped view as often as on a batch (see sample_first_by_its_layers).
_FLAT_INPUT_NORMS = (nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm, nn.LazyBatchNorm1d, nn.LazyInstanceNorm1d,
                     nn.SyncBatchNorm)  # Trainer(sync_batchnorm=True) converts every batch norm to this one


def sample_first_by_its_layers(module: nn.Module, point: str) -> bool:
    """Whether what ``module`` gives (takes, for an input tap) is sample-first by construction: every layer it holds
    is a convolution or a batch/instance/group norm, which take their batch on axis 0 (:func:`layer_features` axis
    ``"first"``), not all norms that take a 2-D ``(N, C)`` as well. A model's sequence-first LSTM does not make its
    conv blocks' ``(B, C, L)`` maps ``(T, B, D)``: the advice to pass ``batch_dim=1`` given for them read their channels
    as samples. A ``BatchNorm1d``/``InstanceNorm1d``/``GroupNorm`` (or a ``SyncBatchNorm``, which may be any) alone is
    often run on a reshaped view
    (DeepSpeech2's ``SequenceWise(BatchNorm1d)`` takes and gives ``(T, N, H)``); a ``BatchNorm2d`` is not."""
    modules = list(module.modules())
    found = _features_of(modules, point)
    return found is not None and found[1] == "first" and not all(
        isinstance(m, _FLAT_INPUT_NORMS) for m in modules if layer_features(m) is not None)


def tap_features(
    chain: list[nn.Module], point: str
) -> tuple[int | tuple[int, ...], str | None, int | None] | None:
    """``(width, axis, unbatched rank)`` of the tapped tensor's features (:func:`_features_of`) from the tapped
    module's layers or, for a module without one (an activation), from the layer its owner is (timm's
    ``BatchNormAct2d``) or the layers its owner registers around it (:func:`_sibling_features`), going up through
    owners that have neither (timm's ``StarReLU`` holds a bare ``ReLU``)."""
    found = _features_of(list(chain[0].modules()), point)
    if found is not None:
        return found
    return _from_owners(chain)


def _from_owners(chain: list[nn.Module]) -> tuple[int | tuple[int, ...], str | None, int | None] | None:
    """:func:`tap_features` of a module without layers, from its owners (innermost first). An activation registered
    before every layer of its owner takes the later layers' reading only where its owners above agree on the axis
    (round 23's reading): CLIP's MLP registers ``activation_fn`` before ``fc1``/``fc2`` (they agree), while
    torchvision MaxViT's ``departition_op``, registered before Linear layers, gives ``(B, C, H, W)`` maps, read
    channels-first by its owners above (a draft of round 24 read them along the image columns when ``W == C``)."""
    for depth, (module, owner) in enumerate(zip(chain, chain[1:])):
        if layer_features(owner) is not None:
            return _features_of([owner], "output")
        siblings = list(owner.children())
        index = next((i for i, child in enumerate(siblings) if child is module), 0)
        before = [found for found in (_features_of(list(s.modules()), "output") for s in reversed(siblings[:index]))
                  if found]
        after = [found for s in siblings[index + 1:] for point in ("input", "output")
                 if (found := _features_of(list(s.modules()), point))]
        found = _sibling_features(before, after)
        if found is None:
            continue
        if not before:
            above = _from_owners(chain[depth + 1:])
            if above is not None and above[1] != found[1]:
                return above
        return found
    return None


def _sibling_features(
    before: list[tuple[int | tuple[int, ...], str | None, int | None]],
    after: list[tuple[int | tuple[int, ...], str | None, int | None]],
) -> tuple[int | tuple[int, ...], str | None, int | None] | None:
    """Features of an activation from those of the layers its owner registers before it (their outputs, nearest
    first) and after it (their inputs and outputs).

    The layer registered just before it speaks for it, as the order usually says what feeds it, unless layers on
    the same axis follow it: Hugging Face registers ``activation_fn`` after the attention and before ``fc1`` and
    ``fc2`` (BART, Whisper; CLIP's MLP registers it first), so the nearest earlier layer's width is the hidden size,
    not the activation's ``d_ff``, and a sequence as long as the hidden size was read along its tokens: then any of
    their widths, on that axis. An activation registered after every layer (Llama's MLP: ``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn``) takes any of their widths where they share an axis. Layers that disagree on the axis
    leave it to the nearest earlier one: a depthwise convolution before the activation and a Linear after it (PVT's
    MLP), a network's one ``relu`` registered beside convolutions and a Linear head (a round-24 draft that let the
    layers around it vote read those along their tokens or image columns)."""
    if not before:
        return _on_one_axis(after)
    return _on_one_axis([before[0], *after] if after else before) or before[0]


def _on_one_axis(
    found: list[tuple[int | tuple[int, ...], str | None, int | None]]
) -> tuple[int | tuple[int, ...], str | None, int | None] | None:
    """Any of the layers' widths on the axis they all act on (the rank of an unbatched call only where they agree on
    it); None when they act on different axes, or on none."""
    axes = {axis for _, axis, _ in found}
    if len(axes) != 1 or None in axes:
        return None
    widths = tuple(dict.fromkeys(width for width_of, _, _ in found for width in _widths(width_of)))
    ranks = {rank for _, _, rank in found}
    return (widths if len(widths) > 1 else widths[0]), axes.pop(), (ranks.pop() if len(ranks) == 1 else None)


def _widths(width: int | tuple[int, ...]) -> tuple[int, ...]:
    return width if isinstance(width, tuple) else (width,)


def module_layout(chain: list[nn.Module], point: str = "output") -> Layout:
    """Layout of a tap from its module and its owners (innermost first): the nearest ``batch_first`` declaration
    wins; the features from :func:`tap_features`."""
    features = tap_features(chain, point) if chain else None
    for module in chain:
        batch_first = declared_batch_first(module)
        if batch_first is not None:
            return Layout(0, 1, features=features) if batch_first else Layout(1, 0, features=features)
    return Layout(features=features)


def feature_axis(shape: tuple[int, ...] | torch.Size, layout: Layout) -> int | None:
    """The axis of the features of a sample-first activation of ``shape`` (3-D or more), 1 or the last: the
    declared one; else the one of the two whose length is one of the tapped layers' widths, or, when both are, the
    axis those layers act on; ``None`` where nothing tells.

    A 3-D ``(B, C, L)`` map of 1-D convolutions whose channels are none of their widths (their outputs joined or
    split after the last one) has its features on axis 1, where every such layer keeps them; it was read along its
    time steps."""
    ndim = len(shape)
    if layout.feature_dim is not None:
        return layout.feature_dim % ndim
    if layout.features is None:
        return None
    width, axis, *rank = layout.features  # a Layout made by hand may give (width, axis) only
    widths = _widths(width)
    first, last = shape[1] in widths, shape[-1] in widths
    if first and last:
        return None if axis is None else (1 if axis == "first" else ndim - 1)
    if first or last:
        return 1 if first else ndim - 1
    return 1 if ndim == 3 and axis == "first" and rank == [2] else None


def _memory_serves(shape: tuple[int, ...] | torch.Size, layout: Layout, remembered: int | None) -> bool:
    """Whether the axis found for a tap at an earlier call (``remembered``) reads a ``shape`` that does not tell: one
    whose axis 1 and last axis both have the tapped layers' width (a ``(B, C, L)`` map at ``L == C``), or neither
    (an activation module shared by layers of another width) where the remembered axis is the one the layers act on.
    Not one remembered against the layers (round 25: a batch whose tokens happened to have a wrongly inferred width
    made every later batch be read along its tokens)."""
    if layout.features is None or remembered is None:
        return False
    widths, acts_on = _widths(layout.features[0]), layout.features[1]
    first, last = shape[1] in widths, shape[-1] in widths
    if first and last:
        return True
    layers_axis = {"first": 1, "last": len(shape) - 1}.get(acts_on) if acts_on else None
    return not first and not last and remembered == layers_axis


def looks_unbatched(shape: tuple[int, ...] | torch.Size, layout: Layout) -> bool:
    """Whether an activation of ``shape`` has the width of the tapped layers, which act on axis 1 of a batch
    (convolutions), on axis 0 only, and the rank of their unbatched call (:func:`unbatched_ndim`): a module called on
    one example without a batch axis (PyTorch's convolutions take an unbatched ``(C, H, W)`` or ``(C, L)``: an RL
    policy run on one observation), whose axis 0 is its channels. Read as it comes, a ``(C, H, W)`` map was
    ``(B, T, D)`` with the image's columns as features. The rank keeps a batch that only looks so apart: a conv
    encoder ending in a flatten writes ``(B, C*H*W)``, whose batch may well be the channel count."""
    if not layout.reads_features or layout.feature_dim is not None or layout.features is None:
        return False
    width, axis, rank = layout.features
    if axis != "first" or len(shape) != rank:
        return False
    widths = _widths(width)
    return shape[0] in widths and not any(length in widths for length in shape[1:])


def to_sample_first(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A view of ``x`` with the samples on axis 0 (and the tokens on axis 1 when the layout names them).

    A declared layout leaves a 2-D ``(B, D)`` tap as it is: a sequence-first model's ``batch_dim=1`` (with or
    without ``token_dim=0``) is about its ``(T, B, D)`` taps, not the head's input (read as ``(D, B)`` before).
    An axis the tensor does not have is one line, not an axis counted modulo its rank."""
    if layout.batch_dim is None or x.dim() < 3:
        return x
    axes = {"batch_dim": layout.batch_dim, "token_dim": layout.token_dim}
    for name, axis in axes.items():
        if axis is not None and not -x.dim() <= axis < x.dim():
            raise LightningActError(
                f"{name}={axis} is not an axis of an activation of shape {tuple(x.shape)}; pass an axis in "
                f"[{-x.dim()}, {x.dim() - 1}] (or leave it unset to infer it)"
            )
    batch = layout.batch_dim % x.dim()
    if layout.token_dim is None:
        return x if batch == 0 else x.movedim(batch, 0)
    token = layout.token_dim % x.dim()
    if batch == token:
        raise LightningActError(
            f"batch_dim={layout.batch_dim} and token_dim={layout.token_dim} are the same axis of an activation of "
            f"shape {tuple(x.shape)}; pass two different axes"
        )
    if batch == 0 and token == 1:
        return x
    return x.movedim((batch, token), (0, 1))


def with_canonical_features(
    x: torch.Tensor, layout: Layout, decided: dict[Any, int] | None = None, slot: Any = None
) -> tuple[torch.Tensor, bool]:
    """The sample-first ``x`` as the statistics read it, ``(B, D)``, ``(B, T, D)`` or ``(B, C, *spatial)``, and
    whether its feature axis is known.

    Where ``layout.reads_features``: a 3-D ``(B, C, L)`` map becomes ``(B, L, C)`` and a channels-last map
    ``(B, *spatial, C)`` becomes ``(B, tokens, C)`` with the spatial positions flattened in order, which every
    statistic reads as it reads ``(B, C, *spatial)`` (a token is a flattened spatial position; a view, no copy).
    A map of 4 or more axes whose features nothing tells is returned as it is, read as ``(B, C, *spatial)``, with
    ``False``. ``decided`` keeps the axis found for ``slot`` (a tap): a later activation of it whose shape does not
    tell is read the same way (:func:`_memory_serves`).
    """
    if x.dim() < 3 or not layout.reads_features:
        return x, True
    axis = feature_axis(x.shape, layout)
    remembered = (slot, x.dim())
    if decided is not None:
        if axis is not None:
            decided[remembered] = axis
        elif _memory_serves(x.shape, layout, decided.get(remembered)):
            axis = decided.get(remembered)
    if axis is None:
        return x, x.dim() == 3
    if axis == 1:
        return (x.movedim(1, 2) if x.dim() == 3 else x), True
    return (x if x.dim() == 3 else x.flatten(1, -2)), True


def flattened_spatial_shape(sample_first: torch.Tensor, view: torch.Tensor) -> tuple[int, ...] | None:
    """The spatial shape of the channels-last map ``sample_first`` ``(B, *spatial, C)`` that
    :func:`with_canonical_features` flattened into ``view`` ``(B, tokens, C)``; None where it flattened nothing. The
    view alone cannot tell a 3x5 map from 15 tokens (its ``_base`` is gone where the flatten copies, a crop, or under
    ``torch.inference_mode``)."""
    return tuple(sample_first.shape[1:-1]) if sample_first.dim() >= 4 and view.dim() == 3 else None
