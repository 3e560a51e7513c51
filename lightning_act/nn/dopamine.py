"""Dopamine / TauGate: activation-space fine-tuning with per-neuron thresholds and gains.

Ghasemlou (2026), "Dopamine" (arXiv 2602.11726): freeze every base weight and learn, at the
pre-activation ``z`` of chosen hidden layers, a threshold ``τ`` and a gain ``g`` per neuron,
``h = g ⊙ σ(s (z − τ)) ⊙ act(z)``. The gate is smooth during training (slope ``s``) and hardened to
``1[z > τ]`` at inference, which gives conditional computation and a per-neuron "which neurons
fire" read-out.

That form cannot equal the frozen model at init with a finite ``τ``: a sigmoid never reaches
exactly one, and at ``τ = −∞`` it is saturated, so ``τ`` gets no gradient. Two gate forms here
start as the exact identity:

* ``"independent"`` (default): ``h = act(z) ⊙ (leak + (gain − leak) ⊙ gate(z))``, three numbers
  per neuron (``tau``, ``gain``, ``leak``), ``gain = leak = 1`` at init. With the hard gate a
  neuron above ``τ`` is scaled by ``gain`` and one below by ``leak``, independently, so
  ``leak = 0`` is the paper's gate ``gain ⊙ σ(s(z − τ)) ⊙ act(z)`` with any gain. At init
  ``gain − leak`` is exactly 0, so ``leak + 0·gate == 1`` and ``act(z)·1 == act(z)`` in floating
  point; ``τ``'s gradient is zero until ``gain`` and ``leak`` separate (as LoRA's ``A`` waits for ``B``).
* ``"coupled"``: ``h = act(z) ⊙ (1 + swing ⊙ (2·gate(z) − 1))``, two numbers per neuron
  (``tau``, ``swing``), ``swing = 0`` at init. Above ``τ`` the scale is ``1 + swing``, below it
  ``1 − swing``: one number sets both, so "scale c above ``τ``, off below" exists only for c = 2.
"""

from __future__ import annotations

import fnmatch
import importlib
import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_act.capture.layout import declared_batch_first
from lightning_act.capture.selection import is_peft_adapter_holder, peft_prompt_encoder
from lightning_act.errors import LightningActError, ModuleSelectionError

ModulePattern = str | type
GateForm = Literal["independent", "coupled"]
GATE_FORMS: tuple[str, ...] = ("independent", "coupled")


class FrozenModuleAdapter(nn.Module):
    """A module that wraps a frozen one (:class:`DopamineGate`, LoRA, (IA)³): :func:`select_modules` never selects
    it or a module inside it, so adapting a model twice is refused instead of nesting a second adapter inside the
    first (and freezing the first one's parameters)."""


class DopamineGate(FrozenModuleAdapter):
    """Wrap an activation with a per-neuron threshold ``tau`` and gain(s) at its input ``z``.

    ``form`` picks the gate (module docstring): ``"independent"`` learns ``tau``, ``gain`` (scale
    above ``τ``) and ``leak`` (scale below ``τ``); ``"coupled"`` learns ``tau`` and ``swing``. Both
    start as the exact identity. ``feature_dim`` is the axis of ``z`` that indexes neurons (-1 for
    Linear/MLP and transformer tokens, 1 for conv feature maps). ``hardened`` switches between the
    smooth training gate and the hard inference gate; :meth:`harden` / :meth:`soften` flip it
    without touching parameters.
    """

    def __init__(
        self,
        activation: nn.Module,
        num_features: int,
        slope: float = 5.0,
        tau_init: float = 0.0,
        feature_dim: int = -1,
        form: GateForm = "independent",
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ModuleSelectionError(
                f"DopamineGate needs num_features a whole number >= 1, got {num_features!r}; pass the layer width"
            )
        # finite: a NaN slope or threshold makes every output NaN, an infinite threshold never gets a gradient
        if isinstance(slope, bool) or not (slope > 0 and math.isfinite(slope)):
            raise ModuleSelectionError(
                f"DopamineGate slope must be > 0 and finite, got {slope}; pass a positive slope such as 5.0"
            )
        if isinstance(tau_init, bool) or not math.isfinite(tau_init):
            raise ModuleSelectionError(
                f"DopamineGate tau_init must be a finite number, got {tau_init}; pass a threshold such as 0.0"
            )
        if form not in GATE_FORMS:
            raise ModuleSelectionError(f"DopamineGate form {form!r} is unknown; pass one of {list(GATE_FORMS)}")
        self.activation = activation
        self.num_features = num_features
        self.slope = float(slope)
        self.feature_dim = feature_dim
        self.form = form
        self.tau = nn.Parameter(torch.full((num_features,), float(tau_init)))
        if form == "independent":
            self.gain = nn.Parameter(torch.ones(num_features))
            self.leak = nn.Parameter(torch.ones(num_features))
        else:
            self.swing = nn.Parameter(torch.zeros(num_features))
        self.hardened = False

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, form={self.form}, slope={self.slope}, feature_dim={self.feature_dim}, "
            f"hardened={self.hardened}"
        )

    def harden(self) -> DopamineGate:
        """Use the hard gate ``1[z > τ]`` (inference / attribution)."""
        self.hardened = True
        return self

    def soften(self) -> DopamineGate:
        """Use the smooth gate ``σ(s (z − τ))`` again (training)."""
        self.hardened = False
        return self

    def _per_neuron(self, values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if z.shape[self.feature_dim] != self.num_features:
            raise ModuleSelectionError(
                f"DopamineGate expects {self.num_features} neurons on dim {self.feature_dim} but got input shape "
                f"{tuple(z.shape)}; adapt with example_input= so the width is read from a forward pass (or pass "
                "num_features/feature_dim matching the wrapped layer to DopamineGate)"
            )
        shape = [1] * z.ndim
        shape[self.feature_dim] = self.num_features
        return values.to(z.dtype).view(shape)

    def fires(self, z: torch.Tensor) -> torch.Tensor:
        """Boolean ``z > τ`` per element: the hard gate, used for attribution."""
        return z > self._per_neuron(self.tau, z)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """The gate value in [0, 1]: hard ``1[z > τ]`` or smooth ``σ(s (z − τ))``."""
        if self.hardened:
            return self.fires(z).to(z.dtype)
        return torch.sigmoid(self.slope * (z - self._per_neuron(self.tau, z)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.form == "independent":
            leak = self._per_neuron(self.leak, z)
            modulation = leak + (self._per_neuron(self.gain, z) - leak) * self.gate(z)
        else:
            modulation = 1.0 + self._per_neuron(self.swing, z) * (2.0 * self.gate(z) - 1.0)
        return self.activation(z) * modulation


def _resolve_class(path: str) -> type | None:
    if "." not in path or any(ch in path for ch in "*?["):
        return None
    module_name, _, attr = path.rpartition(".")
    try:
        candidate = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return candidate if isinstance(candidate, type) and issubclass(candidate, nn.Module) else None


def select_modules(model: nn.Module, patterns: Sequence[ModulePattern]) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` matched by any pattern, in registration order.

    A pattern is an ``nn.Module`` subclass, a dotted class path (``"torch.nn.GELU"``) or a glob
    over qualified module names (``"blocks.*.mlp.act"``). At least one pattern is needed (an empty list would adapt
    nothing and freeze everything). Every pattern must match something that is not already adapted (a
    :class:`FrozenModuleAdapter` or inside one), and a chosen module must sit at one place only: an adapter replaces
    one name, so an activation instance reused at several places (``nn.Sequential(fc, act, fc, act)``) would be
    adapted at its first place only. No chosen module may contain another: the outer adapter would replace it, and
    the inner one would hang off the outer adapter and never run. Modules inside a parametrization
    (``<module>.parametrizations``, e.g. a Softplus keeping a weight positive) are never selected: they compute a
    weight, not activations.
    """
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    if not patterns:
        raise ModuleSelectionError(
            "no module pattern given; pass at least one class, class path or name glob, e.g. modules=['torch.nn.GELU']"
        )
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            places.setdefault(id(module), []).append(name)
    computes_a_weight = {
        id(inner) for module in model.modules() if parametrize.is_parametrized(module)
        for inner in module.parametrizations.modules()
    }
    named = [(name, module) for name, module in model.named_modules() if name and id(module) not in computes_a_weight]
    adapters = [name for name, module in named if isinstance(module, FrozenModuleAdapter)]
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        cls = pattern if isinstance(pattern, type) else _resolve_class(pattern)
        if cls is not None:
            hits = [(n, m) for n, m in named if isinstance(m, cls)]
        else:
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matched no module of {type(model).__name__}; pass a name glob from "
                "model.named_modules() or an activation class such as 'torch.nn.GELU'"
            )
        fresh = [(n, m) for n, m in hits if not any(n == a or n.startswith(a + ".") for a in adapters)]
        if not fresh:
            raise ModuleSelectionError(
                f"modules {[n for n, _ in hits][:3]} matched by {pattern!r} are already adapted; pass the un-adapted model"
            )
        shared = next((places[id(m)] for _, m in fresh if len(places[id(m)]) > 1), None)
        if shared:
            raise ModuleSelectionError(
                f"one module instance sits at {shared}: adapting it would change its first place only; give each "
                "place its own module (e.g. copy.deepcopy) before adapting"
            )
        selected.update(fresh)
    nested = next(((outer, inner) for outer in selected for inner in selected if inner.startswith(outer + ".")), None)
    if nested:
        raise ModuleSelectionError(
            f"modules {nested[0]!r} and {nested[1]!r} are both selected but the first contains the second; select "
            "only one of them (e.g. the activation itself, not its block)"
        )
    order = {name: i for i, (name, _) in enumerate(named)}
    return sorted(selected.items(), key=lambda item: order[item[0]])


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``'s nested-tensor path) runs a fused
    kernel that reads its children's weights and never calls them, so an adapter there would be skipped silently
    (or crash on ``.weight``); the fused path is switched off with PyTorch's own flag, as for any other activation.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if isinstance(parent, nn.TransformerEncoderLayer):
        parent.activation_relu_or_gelu = 0
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder) and any(layer is parent for layer in module.layers):
                module.use_nested_tensor = False


def adapter_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that belong to an adapter of ``model``, not to its base: a :class:`FrozenModuleAdapter`'s
    own tensors, parametrized ones too (their ``parametrizations.<name>.original``, e.g. a gain kept positive), not
    those of the module it wraps; and those a Hugging Face ``peft`` layer declares in its ``adapter_layer_names``
    (``lora_A``/``lora_B``, ``ia3_l``, ``modules_to_save``, ...) or a ``PeftModel``'s ``prompt_encoder``, told by
    these attributes, without importing ``peft``."""
    owned: list[nn.Module | nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, FrozenModuleAdapter):
            owned.extend(module.parameters(recurse=False))
            if isinstance(getattr(module, "parametrizations", None), nn.ModuleDict):
                owned.append(module.parametrizations)
        if is_peft_adapter_holder(module):
            for name in module.adapter_layer_names:
                attribute = _dotted_attribute(module, name)
                if isinstance(attribute, (nn.Module, nn.Parameter)):
                    owned.append(attribute)
        if (encoder := peft_prompt_encoder(module)) is not None:
            owned.append(encoder)
    return {id(p) for item in owned for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())}


def _dotted_attribute(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path="a.b"``; None where an attribute is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def freeze(model: nn.Module) -> None:
    """Stop gradients to every base parameter of ``model``; an existing adapter's own parameters
    (:func:`adapter_parameters`: ``tau``, ``lora_a``, peft's ``lora_A``, ...) keep their ``requires_grad``, so
    adapters added by an earlier call (Dopamine gates next to LoRA) or by ``peft`` stay trainable. Buffers are not
    parameters: a BatchNorm in training mode still updates its running statistics (put it in eval mode to keep the
    base exactly frozen)."""
    adapters = adapter_parameters(model)
    for parameter in model.parameters():
        if id(parameter) not in adapters:
            parameter.requires_grad_(False)


def training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's train/eval flag, for :func:`restore_training_modes` (``model.train(flag)`` would reset a
    BatchNorm the user had put in eval mode inside a training model)."""
    return {module: module.training for module in model.modules()}


def restore_training_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def device_of(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer (where new adapter parameters belong)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


#: MLPs whose activation after ``fc1`` sees every output of it: timm's plain ``Mlp`` (``fc1 → act → drop → norm →
#: fc2``) and KAT's ``GRKANMlp`` (``act1 → fc1 → act2 → ...``); timm's ``GluMlp`` / ``SwiGLUPacked`` also register
#: ``fc1`` just before ``act`` but split its output in two. By name: ``nn`` imports neither timm nor the models.
_WHOLE_FC1_MLPS = {("timm.layers.mlp", "Mlp"), ("lightning_act.models.kat", "GRKANMlp")}


def _fc1_feeds_its_activation_whole(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`_WHOLE_FC1_MLPS`."""
    return (type(module).__module__, type(module).__name__) in _WHOLE_FC1_MLPS


def infer_widths(
    model: nn.Module,
    names: Sequence[str],
    example_input: Any = None,
    feature_dim: int = -1,
    at: Literal["input", "output"] = "input",
) -> dict[str, int]:
    """Width (neurons) at the input (a gate's ``z``), or with ``at="output"`` the output ((IA)³ rescales it), of each
    named module.

    With ``example_input`` (a tensor, or a dict of keyword arguments) the widths are read from one forward pass, which
    must call each module once: one adapter serving several calls would be one set of parameters for several layers
    (and :func:`firing_fractions` would see the last call only), so a module called twice is refused.
    Without it a module takes the
    ``out_features`` of the ``nn.Linear`` registered just before it in the same parent, and only where that Linear
    must feed all of its outputs to it: in an ``nn.Sequential``, or ``fc1`` before ``act`` in timm's plain ``Mlp``
    (before ``act2`` in KAT's ``GRKANMlp``).
    Registration order is not call order elsewhere (``nn.TransformerEncoderLayer`` registers ``linear2`` before
    ``activation``, Llama's MLP ``down_proj`` before ``act_fn``), and timm's ``GluMlp`` halves ``fc1``'s output
    before ``act``, so those are refused.
    """
    if example_input is not None:
        calls: dict[str, list[int]] = {name: [] for name in names}
        handles = []
        for name in names:
            target = model.get_submodule(name)
            if at == "input":
                def record_input(module: nn.Module, args: tuple, name: str = name) -> None:
                    calls[name].append(int(args[0].shape[feature_dim]))

                handles.append(target.register_forward_pre_hook(record_input))
            else:
                def record_output(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
                    calls[name].append(int(output.shape[feature_dim]))

                handles.append(target.register_forward_hook(record_output))
        modes = training_modes(model)
        try:
            model.eval()
            with torch.no_grad():
                if isinstance(example_input, dict):  # keyword arguments (a Hugging Face model's input_ids=...)
                    model(**example_input)
                else:
                    model(example_input)
        except Exception as error:
            first_line = (str(error).splitlines() or [""])[0]
            raise LightningActError(
                f"running the model on example_input failed ({type(error).__name__}: {first_line}); pass what its "
                "forward takes: a tensor, or a dict of its keyword arguments (e.g. input_ids=..., "
                "decoder_input_ids=... for an encoder-decoder)"
            ) from error
        finally:
            restore_training_modes(modes)
            for handle in handles:
                handle.remove()
        missing = [n for n in names if not calls[n]]
        if missing:
            raise ModuleSelectionError(
                f"modules {missing} were not called by the example input; select modules that run in forward()"
            )
        repeated = next(((name, widths) for name, widths in calls.items() if len(widths) > 1), None)
        if repeated:
            raise ModuleSelectionError(
                f"module {repeated[0]!r} runs {len(repeated[1])} times in one forward (widths {repeated[1]}): one "
                "adapter would serve every call; give each call its own module (e.g. copy.deepcopy) before adapting"
            )
        return {name: widths[0] for name, widths in calls.items()}
    widths: dict[str, int] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        children = list(parent.named_children())
        earlier = [module for _, module in children[: [n for n, _ in children].index(child)]]
        linears = [module for module in earlier if isinstance(module, nn.Linear)]
        feeds = bool(earlier) and isinstance(earlier[-1], nn.Linear) and (
            isinstance(parent, nn.Sequential) or (_fc1_feeds_its_activation_whole(parent) and len(linears) == 1)
        )
        if not feeds:
            raise ModuleSelectionError(
                f"cannot tell the width of {name!r} without a forward pass (no nn.Linear that must feed it whole just "
                f"before it in its {type(parent).__name__}); pass example_input= to adapt_model / apply_ia3"
            )
        widths[name] = earlier[-1].out_features
    return widths


def adapt_model(
    model: nn.Module,
    modules: Sequence[ModulePattern] = ("torch.nn.GELU",),
    slope: float = 5.0,
    tau_init: float = 0.0,
    example_input: Any = None,
    feature_dim: int = -1,
    form: GateForm = "independent",
) -> dict[str, DopamineGate]:
    """Freeze every base weight of ``model`` and wrap the chosen activations with :class:`DopamineGate`.

    ``modules`` selects the activations (classes, class paths or name globs). Adapts in place and
    returns ``{qualified name: gate}``; only the gates' parameters (``form``: see
    :class:`DopamineGate`, on the model's device) stay trainable, and the adapted model computes exactly what
    the frozen model computed. BatchNorm layers in training mode still update their running statistics
    (:func:`freeze`).
    """
    chosen = select_modules(model, modules)
    widths = infer_widths(model, [n for n, _ in chosen], example_input, feature_dim)
    freeze(model)
    device = device_of(model)
    gates: dict[str, DopamineGate] = {}
    for name, activation in chosen:
        gate = DopamineGate(activation, widths[name], slope=slope, tau_init=tau_init, feature_dim=feature_dim, form=form)
        gate.to(device)
        replace_module(model, name, gate)
        gates[name] = gate
    return gates


def dopamine_gates(model: nn.Module) -> dict[str, DopamineGate]:
    """All :class:`DopamineGate` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DopamineGate)}


def harden(model: nn.Module) -> None:
    """Switch every gate of ``model`` to the hard gate ``1[z > τ]``."""
    for gate in dopamine_gates(model).values():
        gate.harden()


def soften(model: nn.Module) -> None:
    """Switch every gate of ``model`` back to the smooth gate."""
    for gate in dopamine_gates(model).values():
        gate.soften()


@torch.no_grad()
def firing_fractions(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_groups: int,
    batch_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fraction of inputs on which each neuron fires (``z > τ``), per class or input set.

    ``batches`` yields ``(x, group)`` with integer group ids in ``[0, num_groups)`` (class labels,
    or e.g. 0 = upright and 1 = rotated). Returns ``{gate name: (num_groups, num_neurons)}`` float
    tensors; for token/spatial inputs each sample contributes its mean over positions. Each gate counts only the
    inputs of the batches it ran on, so a group it saw no sample of is NaN: a gate the forward skipped (an early
    exit) or never calls (an EMA copy kept on the model) is not measured, rather than "never fires" or credited with
    an earlier batch's firing. The model runs in eval mode and its mode is restored afterwards.

    ``batch_dim`` is the sample axis of every gate's input. By default each gate takes it from the ``batch_first``
    of its nearest enclosing PyTorch sequence module (axis 1 inside a sequence-first ``nn.TransformerEncoderLayer``),
    else axis 0, as the monitors do; averaging over the wrong axis would mix samples.
    """
    gates = dopamine_gates(model)
    if not gates:
        raise ModuleSelectionError("model has no DopamineGate; call adapt_model(model, modules=[...]) first")
    sample_axes = {name: _sample_axis(model, name) if batch_dim is None else batch_dim for name in gates}
    sums = {name: torch.zeros(num_groups, gate.num_features, dtype=torch.float64) for name, gate in gates.items()}
    counts = {name: torch.zeros(num_groups, dtype=torch.float64) for name in gates}
    current: dict[str, torch.Tensor] = {}  # the firing of the gates that ran in this batch's forward
    handles = []
    for name, gate in gates.items():
        def record(module: DopamineGate, args: tuple, name: str = name) -> None:
            active = module.fires(args[0]).to(torch.float64)
            sample, feature = sample_axes[name] % active.ndim, module.feature_dim % active.ndim
            if sample == feature:
                raise ModuleSelectionError(
                    f"gate {name!r}: batch_dim={sample_axes[name]} is its feature axis; pass the sample axis of its input"
                )
            active = active.movedim((sample, feature), (0, -1))
            current[name] = active.reshape(active.shape[0], -1, module.num_features).mean(dim=1)

        handles.append(gate.register_forward_pre_hook(record))
    modes = training_modes(model)
    model.eval()
    try:
        for x, group in batches:
            current.clear()
            model(x)
            group = torch.as_tensor(group, dtype=torch.long).cpu()
            if group.numel() and (group.min() < 0 or group.max() >= num_groups):
                raise ModuleSelectionError(f"group ids must be in [0, {num_groups}); pass num_groups covering every label")
            for name, active in current.items():
                if len(active) != len(group):
                    raise ModuleSelectionError(
                        f"gate {name!r} sees {len(active)} samples on axis {sample_axes[name]} of its input but the batch "
                        f"has {len(group)} group ids; pass batch_dim= with the sample axis of the gate input"
                    )
                sums[name].index_add_(0, group, active.cpu())
                counts[name].index_add_(0, group, torch.ones(len(group), dtype=torch.float64))
    finally:
        restore_training_modes(modes)
        for handle in handles:
            handle.remove()
    return {name: (total / counts[name][:, None]).float() for name, total in sums.items()}


def _sample_axis(model: nn.Module, name: str) -> int:
    """Sample axis at module ``name``: 1 inside a sequence-first PyTorch sequence module (the nearest one that
    declares ``batch_first`` wins), else 0."""
    owners = [name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)] + [""]
    for owner in owners:
        batch_first = declared_batch_first(model.get_submodule(owner))
        if batch_first is not None:
            return 0 if batch_first else 1
    return 0


def plot_firing_fractions(
    fractions: dict[str, torch.Tensor],
    group_names: Sequence[str] | None = None,
    title: str = "Dopamine gate firing fraction",
) -> Any:
    """Heatmap per adapted layer (groups × neurons, 0..1) as a matplotlib ``Figure``.

    Built without pyplot, so it needs no display and leaves the global backend alone; save it
    with ``figure.savefig(path)``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 1.2 + 1.8 * len(fractions)), constrained_layout=True)
    axes = figure.subplots(len(fractions), 1, squeeze=False)[:, 0]
    for ax, (name, table) in zip(axes, fractions.items()):
        image = ax.imshow(table.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("neuron")
        ax.set_ylabel("group")
        if group_names is not None:
            ax.set_yticks(range(len(group_names)), labels=list(group_names), fontsize=7)
        figure.colorbar(image, ax=ax, label="fraction firing")
    figure.suptitle(title)
    return figure
