"""Choose which modules of a model a monitor taps.

A *module spec* is one of:

- ``"@activations"``: every activation-function module (``nn.ReLU``, ``nn.GELU``, timm's activation
  layers, Hugging Face's ``transformers.activations`` layers such as BERT's ``GELUActivation`` and Llama's
  ``SiLUActivation``, and the project's ``GroupRational``/``PMish``...); classes can be added with
  :func:`register_activation_class`; the project's adapters around an activation ((IA)³'s ``IA3Scale``, a
  ``DopamineGate``) are tapped in its place, as their output is the adapted layer's activation. Functional
  activations (``F.gelu`` inside ``forward``) have no module, so for a recognised MLP without an activation module
  (timm ``Mlp``-style ``fc1/fc2``, Hugging Face ``up_proj/down_proj``, GPT-2 ``c_fc/c_proj``,
  ``nn.TransformerEncoderLayer``'s ``linear1/linear2``) the down-projection's input is tapped instead
  (``<mlp>.fc2:input``, logged as ``<mlp>.fc2-input``): the activations themselves;
- ``"@blocks"``: the repeated blocks of every block stack of the model (a timm ViT's ``blocks.0`` …
  ``blocks.11``, every ResNet stage, encoder and decoder layers, ``layers``/``h``/``blocks``
  lists), i.e. the residual stream after each block; a stack is a ``ModuleList``/``Sequential`` of
  two or more non-leaf modules of one class (or a run of three or more between a stem and a tail, as
  torchvision's MobileNet ``features``; torchvision's ``IntermediateLayerGetter``, a ``ModuleDict``, is one too), or
  one of torchvision blocks cut into bare ``Sequential`` parts (SSDLite's MobileNet), and stacks nested
  inside a chosen stack are skipped; a plain module's children are no stack (timm RegNet's ``s1.b1`` ...: select
  them by a glob), nor are a quantization fused module's (``LinearReLU``); a scripted block counts as its class;
- ``"@penultimate"``: the input of the classifier head (``model.get_classifier()`` for timm
  models, else the last ``nn.Linear`` outside frozen copies of a trained module and outside frozen networks with
  blocks whose last Linear is as wide as a trained one (a distillation teacher); a Hugging Face peft adapter layer
  wrapping one, such as LoRA's, stands for it, as its input is the layer's input while its own ``lora_A``/``lora_B``
  Linears see the bottleneck), i.e. the penultimate features, named ``<head>-input``; a last Linear inside a block of
  a stack that writes a width another layer of its block reads (a residual block's last projection) is no head (the head is then a
  parameter: tied, or CLIP's projection), and nothing is tapped, said once;
- an ``nn.Module`` subclass, or its import path as a string (``"torch.nn.GELU"``), or a bare class
  name (``"GELU"``): every module of that class (a parametrized module's by the class it was made as);
- any other string: a glob (``fnmatch``) on the qualified module name, e.g. ``"blocks.*.mlp.act"``.

The presets leave out averaged copies of the model (an EMA's ``AveragedModel``, ema-pytorch's ``EMA``),
parametrizations, the ``original_module`` that a Hugging Face peft ``ModulesToSaveWrapper`` keeps beside the copy
it trains and quantization's observers and fake-quants, which run on no activation of its forward, and the modules
that run on a fixed table, not on the batch: position-bias MLPs (Swin V2's ``cpb_mlp``) and peft's prompt encoders
(prefix and prompt tuning's ``prompt_encoder`` of a ``PeftModel``). A ``ModulesToSaveWrapper`` is a block of
``"@blocks"`` where the module it wraps is one, and the fused activations of quantization-aware training
(``torch.ao.nn.intrinsic.qat``'s ``ConvBnReLU2d``, ``LinearReLU`` ...) are activation outputs of ``"@activations"``.

A string spec may end in ``":input"`` (or ``"-input"``, the name it is logged under: :data:`INPUT_TAP_SUFFIX`) to
tap the module's first input instead of its output (the activations entering a down-projection, for example); a
module called by keyword gives the argument of its ``forward``'s first parameter.

Names are those of the user's model: the wrappers' ``_orig_mod.`` (``torch.compile``),
``_fsdp_wrapped_module.`` (FSDP) and ``_checkpoint_wrapped_module.`` (activation checkpointing)
are left out, so keys are the same however the model is wrapped.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel

from lightning_act.capture.layout import layer_features
from lightning_act.errors import ModuleSelectionError

ModuleSpec = Union[str, type]

_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.GLU, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.RReLU, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
# Class names of activation layers in timm, in Hugging Face ``transformers.activations`` (what ``ACT2FN``
# builds; ``LinearActivation`` is the identity, not one) and in this project, matched by name so that selecting
# them never imports the libraries that define them.
_ACTIVATION_CLASS_NAMES: set[str] = {
    "GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU", "Mish", "HardSwish", "HardSigmoid", "HardMish",
    "SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe",  # timm's memory-efficient ones
    "Sigmoid", "Tanh", "PReLU", "ReLU", "ReLU6", "GroupRational", "PMish", "DopamineGate",
    "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "ClippedGELUActivation",
    "AccurateGELUActivation", "PytorchGELUTanh", "SiLUActivation", "MishActivation", "LaplaceActivation",
    "ReLUSquaredActivation", "SqrtSoftplusActivation", "XIELUActivation", "BloomGelu",
}
_extra_activation_classes: list[type[nn.Module]] = []
# Averaged copies a model may keep of itself (EMA, SWA), beside torch's AveragedModel: timm's, matched by name, and
# ema-pytorch's (lucidrains), matched by name within its package, as "EMA" alone names too many classes; each along
# the class's MRO, as training code subclasses them (``class ModelEma(ModelEmaV3)`` with a legacy ``.ema`` alias).
_AVERAGED_COPY_CLASS_NAMES = {"ModelEmaV2", "ModelEmaV3"}
_EMA_PYTORCH_CLASS_NAMES = {"EMA", "KarrasEMA", "PostHocEMA", "EMAPytree"}
# Owners of modules that run on a fixed table, not on the batch, by attribute name: Swin V2's position-bias MLP, run on
# relative coordinates (timm ``cpb_mlp``, ``meta_mlp`` in ``swinv2_cr``; Hugging Face
# ``continuous_position_bias_mlp``); and by class name, timm's ``RelPosMlp`` (MaxViT, CoAtNet with MLP position bias).
# Hugging Face peft's prompt encoders (``PeftModel.prompt_encoder``: prefix tuning's ``PrefixEncoder`` MLP, p-tuning's
# ``PromptEncoder``), run on the virtual-token ids, are told by their owner (see :func:`_fixed_table_modules`), as
# other models' ``prompt_encoder`` runs on each example's prompt (Segment Anything's, on its points and masks).
_FIXED_TABLE_OWNER_NAMES = {"cpb_mlp", "meta_mlp", "continuous_position_bias_mlp"}
_FIXED_TABLE_CLASS_NAMES = {"RelPosMlp"}
_PEFT_PROMPT_ENCODER_NAME = "prompt_encoder"
# Quantization-aware training's fused layers that apply their activation inside their own forward (after
# ``fuse_modules_qat`` + ``prepare_qat``: ``ConvBnReLU2d``, ``ConvReLU2d``, ``LinearReLU`` ...), so that their output
# is the activation's: matched by package and class name. The float fused modules (``torch.ao.nn.intrinsic``'s
# ``ConvReLU2d`` ...) are Sequentials whose activation is a child, tapped as one.
_FUSED_ACTIVATION_PACKAGE = "torch.ao.nn.intrinsic.qat."
_FUSED_ACTIVATION_NAME = re.compile(r"(ReLU|Tanh)([123]d)?$")
# The fused modules of quantization (``torch.ao.nn.intrinsic``: ``LinearReLU``, ``ConvReLU2d`` ..., float and QAT) are
# Sequential subclasses that hold one layer, not a stack (see _is_stack_container); and quantization's observers and
# fake-quants (``weight_fake_quant``, ``activation_post_process``), matched by base class, which run on a weight or
# copy a layer's output: no activation of their own.
_FUSED_MODULE_PACKAGE = "torch.ao.nn.intrinsic."
_QUANTIZATION_PACKAGE = "torch.ao.quantization."
_QUANTIZATION_OBSERVER_NAMES = {"ObserverBase", "FakeQuantizeBase"}
# torchvision's ModuleDict that runs a backbone's children in order (see _is_stack_container), matched by name so
# that torchvision is never imported.
_ORDERED_DICT_CLASS_NAME = "IntermediateLayerGetter"
# The package whose blocks a model cuts into bare Sequential parts (torchvision's SSDLite cuts MobileNetV3's
# ``features`` in two; see _split_stack_members), matched by module name so that torchvision is never imported.
_SPLIT_STACK_PACKAGE = "torchvision"
# The project's base class of adapters that wrap a frozen module (see _adapts_an_activation), matched by name, as the
# module that defines it imports this one.
_ADAPTER_CLASS_NAME, _ADAPTER_MODULE = "FrozenModuleAdapter", "lightning_act.nn.dopamine"

PRESETS = ("@activations", "@blocks", "@penultimate")


def register_activation_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``"@activations"`` include ``cls`` (usable as a class decorator): an activation module of your own
    (``class SquaredReLU(nn.Module)``, a learnable Swish, a KAN layer), which the preset does not know by class."""
    _extra_activation_classes.append(cls)
    return cls


def module_class(module: nn.Module) -> type:
    """The class ``module`` was made as: ``torch.nn.utils.parametrize`` swaps the class of a module with a
    parametrized tensor (``weight_norm``, ``spectral_norm``, ``orthogonal``) for a subclass ``Parametrized<Class>``,
    which matching by class name or comparing classes would take for another kind of module."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation-function layer, a fused layer whose output is its activation's, or one of
    the project's adapters around an activation (see :func:`_adapts_an_activation`)."""
    cls = module_class(module)
    return (
        isinstance(module, _TORCH_ACTIVATIONS + tuple(_extra_activation_classes))
        or cls.__name__ in _ACTIVATION_CLASS_NAMES
        or (cls.__module__.startswith(_FUSED_ACTIVATION_PACKAGE) and bool(_FUSED_ACTIVATION_NAME.search(cls.__name__)))
        or _adapts_an_activation(module)
    )


def _adapts_an_activation(module: nn.Module) -> bool:
    """Whether ``module`` is one of the project's adapters (``FrozenModuleAdapter``: (IA)³'s ``IA3Scale``, a
    ``DopamineGate``) whose only child is an activation: the model runs the adapter in the activation's place, so its
    output is the adapted layer's activation ((IA)³ around a ``qkv`` Linear is none). Told by class name, as
    :mod:`lightning_act.nn.dopamine` imports this module."""
    if not any(c.__name__ == _ADAPTER_CLASS_NAME and c.__module__ == _ADAPTER_MODULE for c in type(module).__mro__):
        return False
    children = list(module.children())
    return len(children) == 1 and is_activation(children[0])


def saved_copy_original(module: nn.Module) -> nn.Module | None:
    """The ``original_module`` of a Hugging Face peft ``ModulesToSaveWrapper`` (which runs a trained copy of it, kept
    in ``modules_to_save``), else None. Read from the registered children, so that peft need not be imported."""
    children = dict(module.named_children())
    original, trained_copies = children.get("original_module"), children.get("modules_to_save")
    return original if isinstance(original, nn.Module) and isinstance(trained_copies, nn.ModuleDict) else None


def is_peft_adapter_holder(module: nn.Module) -> bool:
    """Whether ``module`` holds Hugging Face peft adapters (a tuner layer: LoRA, IA3 ...; a ``ModulesToSaveWrapper``),
    told by what peft reads them through, ``adapter_layer_names`` and ``active_adapters``, so that peft need not be
    imported."""
    return isinstance(getattr(module, "adapter_layer_names", None), tuple) and hasattr(module, "active_adapters")


def peft_prompt_encoder(module: nn.Module) -> nn.ModuleDict | None:
    """The ``prompt_encoder`` of a Hugging Face ``PeftModel`` (prefix or prompt tuning), told by its ``peft_config``
    (another model's ``prompt_encoder``, Segment Anything's, runs on the batch), else None."""
    encoder = getattr(module, _PEFT_PROMPT_ENCODER_NAME, None)
    return encoder if isinstance(encoder, nn.ModuleDict) and hasattr(module, "peft_config") else None


def _tuner_layer_base(module: nn.Module) -> nn.Module | None:
    """The ``base_layer`` of a Hugging Face peft tuner layer (peft's ``BaseTunerLayer``), else None: told by
    :func:`is_peft_adapter_holder` too, not by the child's name alone, which a user's own module may have."""
    base_layer = dict(module.named_children()).get("base_layer")
    return base_layer if isinstance(base_layer, nn.Module) and is_peft_adapter_holder(module) else None


def _peft_wrapped(module: nn.Module) -> nn.Module | None:
    """The module a Hugging Face peft wrapper runs in place of, else None: a tuner layer's ``base_layer`` (the
    wrapper's input is the wrapped layer's), a ``ModulesToSaveWrapper``'s ``original_module``."""
    base_layer = _tuner_layer_base(module)
    return base_layer if base_layer is not None else saved_copy_original(module)


def _innermost_wrapped(module: nn.Module) -> nn.Module:
    """The innermost module under ``module``'s peft wrappers (see :func:`_peft_wrapped`), or ``module``."""
    while (wrapped := _peft_wrapped(module)) is not None:
        module = wrapped
    return module


@dataclass(frozen=True)
class Tap:
    """One place activations are read: a module's output (or first input)."""

    name: str
    module: nn.Module
    point: Literal["output", "input"] = "output"


#: A tap of a module's input is named ``<module>-input`` in metric keys and histories. The spec's ``:input`` is no
#: name for it: ':' ends a metric's name in ModelCheckpoint's filename templates (``{sensitive/head:input/count}``
#: crashed the fit) and MLFlowLogger drops it (``head:input`` became ``headinput``); no module name registered as
#: an attribute contains '-'. A spec may end in either suffix, so a logged name selects its tap again.
INPUT_TAP_SUFFIX = "-input"
_INPUT_SPEC_SUFFIXES = (":input", INPUT_TAP_SUFFIX)

_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# (up-projection, down-projection) child names of the MLP shapes whose activation may be functional.
_MLP_SHAPES = (
    ("fc1", "fc2"), ("up_proj", "down_proj"), ("c_fc", "c_proj"), ("linear1", "linear2"), ("w1", "w2"),
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon, BLOOM
)


def clean_name(name: str) -> str:
    """A module name without the wrapper parts of compile, FSDP and checkpoint wrappers."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
        if name == part[:-1] or name.endswith("." + part[:-1]):
            name = name[: -len(part)] if name != part[:-1] else ""
    return name


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the user's names (wrappers left out), each module once."""
    by_name: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        # A wrapper and the module it wraps share a name; the wrapped module (the user's) wins.
        by_name[clean_name(name)] = module
    return list(by_name.items())


#: One child lookup of :func:`module_reads`: (parent, child key, the child found there, None where absent).
ModuleRead = tuple[nn.Module, str, nn.Module | None]
_WRAPPER_KEYS = tuple(part[:-1] for part in _WRAPPER_PARTS)


def module_at(model: nn.Module, name: str) -> nn.Module | None:
    """The module registered at ``name`` (a user's name, as :func:`named_modules` gives it) in ``model`` now, else
    None: a walk down the registered children, through the wrappers that :func:`clean_name` leaves out of names
    (a few dictionary reads, where ``named_modules`` visits the whole model)."""
    return module_reads(model, name)[0]


def module_reads(model: nn.Module, name: str) -> tuple[nn.Module | None, list[ModuleRead]]:
    """:func:`module_at`, with every child lookup it made (the wrapper keys found absent too): while
    :func:`reads_unchanged` holds for them, ``module_at(model, name)`` gives the same module, so a check at every step
    costs a few identity tests instead of a walk."""
    reads: list[ModuleRead] = []

    def unwrapped(module: nn.Module) -> nn.Module:
        while True:
            for key in _WRAPPER_KEYS:
                inner = _registered_child(module, key)
                reads.append((module, key, inner))
                if inner is not None:
                    break
            else:
                return module
            module = inner

    module = unwrapped(model)
    for part in name.split(".") if name else []:
        child = _registered_child(module, part)
        reads.append((module, part, child))
        if child is None:
            return None, reads
        module = unwrapped(child)
    return module, reads


def reads_unchanged(reads: list[ModuleRead]) -> bool:
    """Whether every lookup of :func:`module_reads` finds what it found then, by identity."""
    for parent, key, found in reads:  # a loop: ~2x faster than all() over a generator, for hundreds of reads
        children = parent._modules
        if (children.get(key) if type(children) is dict else _registered_child(parent, key)) is not found:
            return False
    return True


def _registered_child(module: nn.Module, key: str) -> nn.Module | None:
    """The child registered under ``key``, else None: a ScriptModule's ``_modules`` is torch's ``OrderedModuleDict``,
    which has no ``.get`` (a scripted block crashed DimensionalCollapse at fit start)."""
    children = module._modules
    return children[key] if key in children else None


def module_aliases(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """The modules registered under several names (one activation instance passed to every block, a default
    argument's instance), by ``id``: the module and its names (the first is the one ``named_modules`` gives)."""
    names: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        entry = names.setdefault(id(module), (module, []))
        if clean_name(name) not in entry[1]:
            entry[1].append(clean_name(name))
    return {key: entry for key, entry in names.items() if len(entry[1]) > 1}


def resolve_class(spec: str) -> type | None:
    """The ``nn.Module`` class an import path (``"torch.nn.GELU"``) names, else None."""
    if "." not in spec or any(c in spec for c in "*?[]"):
        return None
    module_path, _, attr = spec.rpartition(".")
    if not attr[:1].isupper():
        return None
    try:
        cls = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _stack_members(children: list[nn.Module]) -> list[nn.Module]:
    """The repeated blocks among a ModuleList/Sequential's children: all of them when they are >= 2 non-leaf modules
    of one class; or, between a stem and a tail of other classes (torchvision's MobileNet/EfficientNet ``features``:
    a convolution, the inverted-residual blocks, a convolution), the one run of >= 3 blocks of one class that makes up
    at least half of the children; a run of containers is left to the stacks inside them (torchvision's EfficientNet
    stages). Else none. A peft wrapper counts as the module it wraps (a block that peft trains whole, in a
    ``ModulesToSaveWrapper``, is one of the stack; LoRA-wrapped Linears are no blocks)."""
    if len(children) < 2:
        return []
    wrapped = [_innermost_wrapped(c) for c in children]
    kinds: list[type | str] = [module_class(c) for c in wrapped]
    # a scripted or traced block is of the class it was made from, which it names: one scripted block of a stack left
    # the others no stack (the presets leave out only the scripted one, see _repeated_blocks)
    eager_kinds = {kind.__name__: kind for c, kind in zip(wrapped, kinds) if not isinstance(c, torch.jit.ScriptModule)}
    kinds = [eager_kinds.get(c.original_name, kind) if isinstance(c, torch.jit.ScriptModule) else kind
             for c, kind in zip(wrapped, kinds)]
    if len(set(kinds)) == 1:
        return children if _holds_layers(wrapped[0]) else []
    runs: list[tuple[int, int]] = []  # [start, end) of each run of one class
    for i, kind in enumerate(kinds):
        if runs and kinds[runs[-1][0]] is kind:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    start, end = max(runs, key=lambda run: run[1] - run[0])
    inner = kinds[start]
    if end - start < 3 or 2 * (end - start) < len(children) or not _holds_layers(wrapped[start]):
        return []
    if isinstance(wrapped[start], (nn.ModuleList, nn.Sequential)):
        return []
    stem_kinds, tail_kinds = kinds[:start], kinds[end:]
    if inner in stem_kinds + tail_kinds or len(set(stem_kinds)) > 1 or len(set(tail_kinds)) > 1:
        return []
    return children[start:end]


def _holds_layers(module: nn.Module) -> bool:
    """Whether ``module`` has children other than quantization observers: a QAT-prepared ``nn.Linear`` holds its
    ``weight_fake_quant`` and is still one layer, no block."""
    return any(not _is_quantization_observer(child) for child in module.children())


def _is_quantization_observer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantization observer or fake-quant (see ``_QUANTIZATION_OBSERVER_NAMES``)."""
    return any(
        c.__name__ in _QUANTIZATION_OBSERVER_NAMES and c.__module__.startswith(_QUANTIZATION_PACKAGE)
        for c in type(module).__mro__
    )


def _split_stack_members(parts: list[nn.Module]) -> list[nn.Module]:
    """The blocks of one stack that torchvision cuts into bare Sequential/ModuleList parts (SSDLite cuts
    MobileNetV3's ``features`` in two at a feature map it returns): when the parts' runs between a stem and a tail
    (:func:`_stack_members`) are of one torchvision class, that class's blocks in every part, as a part's run may be
    too short to tell on its own (SSDLite's second half holds two); else none, and a run of parts each a whole stack
    stays one. Blocks of other packages are not split: hand-written stages ``Sequential(Down, Block, ...)`` stay the
    stages whatever their depth (a model's keys must not hinge on whether its stages hold two blocks or three)."""
    if not parts or any(type(part) not in (nn.Sequential, nn.ModuleList) for part in parts):
        return []
    runs = [(part, _stack_members(list(part.children()))) for part in parts]
    kinds = {module_class(_innermost_wrapped(b)) for part, run in runs if 0 < len(run) < len(part) for b in run}
    if len(kinds) != 1:
        return []
    (kind,) = kinds
    if kind.__module__.split(".")[0] != _SPLIT_STACK_PACKAGE:
        return []
    return [child for part in parts for child in part.children() if module_class(_innermost_wrapped(child)) is kind]


def _is_stack_container(module: nn.Module) -> bool:
    """Whether ``module`` runs its children in their order: a ModuleList/Sequential, or torchvision's
    ``IntermediateLayerGetter`` (a ModuleDict of a backbone's children, in LRASPP, DeepLabV3 and Faster R-CNN). Other
    ModuleDicts hold parallel branches as often (a head per task), and timm's ``features_only`` dict keeps its
    stages' own stacks. A fused module of quantization (``LinearReLU``, a Sequential) is one layer: its QAT form's
    two fake-quants were taken for a stack, and the fake-quantized weight measured as an activation."""
    if type(module).__module__.startswith(_FUSED_MODULE_PACKAGE):
        return False
    return isinstance(module, (nn.ModuleList, nn.Sequential)) or (
        isinstance(module, nn.ModuleDict) and type(module).__name__ == _ORDERED_DICT_CLASS_NAME)


def _container_blocks(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of one stack container (:func:`_is_stack_container`), under their names relative to it:
    its children's (:func:`_stack_members`) or, where it holds a stack cut into parts, its grandchildren's
    (:func:`_split_stack_members`)."""
    named_children = list(container.named_children())
    split = {id(c) for c in _split_stack_members([c for _, c in named_children])}
    if split:
        return [(f"{part_name}.{n}", c) for part_name, part in named_children for n, c in part.named_children()
                if id(c) in split]
    members = {id(c) for c in _stack_members([c for _, c in named_children])}
    return [(n, c) for n, c in named_children if id(c) in members]


def _repeated_blocks(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The repeated blocks (:func:`_container_blocks`) of every outermost stack container that has some."""
    blocks: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    by_name = dict(modules)
    for stack_name, module in modules:
        if id(module) in inside or not _is_stack_container(module):
            continue
        members = _container_blocks(module)
        # a wrapped block (checkpoint_wrapper, per-block torch.compile) is tapped as the user's block under its name
        names = [clean_name(f"{stack_name}.{n}" if stack_name else n) for n, _ in members]
        found = [(name, by_name[name]) for name in names if name in by_name]  # a preset's candidates: hookable ones
        if not found:
            continue
        blocks.extend(found)
        inside.update(id(m) for m in module.modules() if m is not module)
    return blocks


def _shadowed(modules: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of registered submodules that their owner never reaches by name: an instance attribute of the same name
    hides them (``nn.TransformerDecoderLayer.__setstate__``, run by the deep copy that builds a
    ``TransformerDecoder``, sets ``activation = F.relu`` beside a registered ``GELU``, which then never runs)."""
    by_name = dict(modules)
    hidden = set()
    for name, module in modules:
        owner_name, _, attribute = name.rpartition(".")
        owner = by_name.get(owner_name)
        if name and owner is not None and attribute in vars(owner):
            hidden.add(id(module))
    return hidden


def _functional_activation_inputs(modules: list[tuple[str, nn.Module]], shadowed: set[int]) -> list[Tap]:
    """Down-projection inputs of recognised MLPs that have no activation module it runs (see the module docstring)."""
    taps = []
    for name, module in modules:
        children = dict(module.named_children())
        for up, down in _MLP_SHAPES:
            runs_one = any(is_activation(m) and id(m) not in shadowed for m in module.modules())
            if up in children and down in children and not runs_one:
                prefix = f"{name}." if name else ""
                taps.append(Tap(f"{prefix}{down}{INPUT_TAP_SUFFIX}", children[down], "input"))
                break
    return taps


def _is_averaged_copy(module: nn.Module) -> bool:
    """Whether ``module`` is an averaged copy or a subclass of one (before round 28 a subclass of timm's
    ``ModelEmaV3`` was not, and its weights entered DimensionalCollapse's default trajectory)."""
    return isinstance(module, AveragedModel) or any(
        cls.__name__ in _AVERAGED_COPY_CLASS_NAMES
        or (cls.__name__ in _EMA_PYTORCH_CLASS_NAMES and cls.__module__.split(".")[0] == "ema_pytorch")
        for cls in type(module).__mro__
    )


def averaged_copy_modules(model: nn.Module) -> set[int]:
    """Ids of the modules of the averaged copies a model keeps of itself (torch's ``AveragedModel``, timm's
    ``ModelEmaV2``/``V3``, ema-pytorch's ``EMA``/``KarrasEMA``/``PostHocEMA``, or a subclass of one): an EMA or SWA
    kept for validation, which no training step runs or trains. A module registered also outside them is the model's:
    ema-pytorch's ``EMA`` registers the trained network itself as its ``online_model``."""
    return _only_inside(model, {id(m) for m in model.modules() if m is not model and _is_averaged_copy(m)})


def _only_inside(model: nn.Module, owners: set[int]) -> set[int]:
    """Ids of the modules inside the modules ``owners`` (ids) that ``model`` does not reach also without entering
    one of them: a module registered in two places runs from the other one."""
    inside = {id(m) for owner in model.modules() if id(owner) in owners for m in owner.modules()}
    outside: set[int] = set()
    pending = [model]
    while pending:  # the modules reached without entering an owner
        module = pending.pop()
        if id(module) in outside or (module is not model and id(module) in owners):
            continue
        outside.add(id(module))
        pending.extend(child for child in module._modules.values() if child is not None)
    return inside - outside


def _fixed_table_modules(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of the modules that run on a fixed table, not on the batch (see ``_FIXED_TABLE_OWNER_NAMES``): a
    position-bias MLP's activations are of relative coordinates, a prefix encoder's of the virtual-token ids, the
    same for every example at every step. A ``prompt_encoder`` is peft's where it is the ``ModuleDict`` of a
    ``PeftModel`` (:func:`peft_prompt_encoder`)."""
    owners = {
        id(module) for name, module in modules
        if name.rpartition(".")[2] in _FIXED_TABLE_OWNER_NAMES
        or module_class(module).__name__ in _FIXED_TABLE_CLASS_NAMES
    }
    owners |= {id(encoder) for _, module in modules if (encoder := peft_prompt_encoder(module)) is not None}
    return _only_inside(model, owners)


def _not_run_on_activations(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of the modules that the presets leave out, as they run on no activation of the model's forward: averaged
    copies of the model (:func:`averaged_copy_modules`: an EMA kept for validation, whose head was "the last
    nn.Linear" and never ran in a training step), parametrizations (``<module>.parametrizations``: functions of a
    parameter; an ``nn.Softplus`` that keeps one positive is no activation layer) and the ``original_module`` of a
    peft ``ModulesToSaveWrapper``, which runs its trained copy instead (the original only with the adapters
    disabled), and quantization's observers and fake-quants (a ``weight_fake_quant`` gives the quantized weight)."""
    left_out = averaged_copy_modules(model) | {id(m) for _, m in modules if _is_quantization_observer(m)}
    for _, module in modules:
        if parametrize.is_parametrized(module):
            left_out |= {id(m) for m in module.parametrizations.modules()}
    originals = {id(original) for _, module in modules if (original := saved_copy_original(module)) is not None}
    return left_out | _only_inside(model, originals)


def has_lazy_parameters(module: nn.Module) -> bool:
    """Whether a parameter of ``module`` is still uninitialized (a lazy module, ``nn.LazyLinear`` ..., before its first
    forward): it has no shape yet, and reading one raises."""
    return any(is_lazy(p) for p in module.parameters())


def _alike_modules(modules: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """The modules with children grouped by class and parameter names and shapes: copies of one another."""
    alike: dict[tuple[type, tuple[tuple[str, torch.Size], ...]], list[tuple[str, nn.Module]]] = {}
    for name, module in modules:
        if has_lazy_parameters(module):  # no shape to compare yet (nn.LazyLinear before its first forward)
            continue
        shapes = tuple((n, p.shape) for n, p in module.named_parameters())
        if shapes and any(True for _ in module.children()):
            alike.setdefault((module_class(module), shapes), []).append((name, module))
    return list(alike.values())


def frozen_copies(modules: list[tuple[str, nn.Module]], optimized: set[int] | None = None) -> set[int]:
    """Ids of the modules inside a frozen copy: a module with children none of whose parameters trains, beside one of
    the same class and parameter shapes whose parameters do (a hand-made EMA, a mean or self-distillation teacher).
    As of timm-style models (:func:`_head_owners`), the head of the trained one is the model's. ``optimized``: the
    ids of the parameters the fit's optimizers hold, where known (None before they exist, at setup); a parameter
    trains where it requires grad and one holds it, so a DQN target network (a copy in no optimizer that keeps
    ``requires_grad=True``, as in Lightning's example and CleanRL) is a copy too. Alike modules none of whose
    parameters an optimizer holds (FSDP's flattened ones) are told by ``requires_grad`` alone."""
    frozen: set[int] = set()
    for group in _alike_modules(modules):
        held = optimized if optimized and any(id(p) in optimized for _, m in group for p in m.parameters()) else None
        trains = [any(p.requires_grad and (held is None or id(p) in held) for p in m.parameters()) for _, m in group]
        if any(trains):
            frozen |= {id(m) for (_, copy), trained in zip(group, trains) if not trained for m in copy.modules()}
    return frozen


def copies_only_optimizers_tell(model: nn.Module) -> bool:
    """Whether ``model`` holds copies of one network that all require grad outside a stack of blocks (a DQN target
    network beside its Q-network, which no optimizer holds): which one trains, and so ``"@penultimate"``'s head,
    only the fit's optimizers tell (:func:`frozen_copies` with ``optimized``)."""
    modules = named_modules(model)
    by_name = dict(modules)
    for group in _alike_modules(modules):
        loose = [m for name, m in group if not _is_stack_container(by_name.get(name.rpartition(".")[0], model))]
        if sum(any(p.requires_grad for p in m.parameters()) for m in loose) >= 2:
            return True
    return False


def _head_owners(model: nn.Module, left_out: set[int], optimized: set[int] | None = None) -> list[nn.Module]:
    """The outermost modules with a timm-style ``get_classifier`` (outside ``left_out``); of several (a frozen teacher
    beside a student), the ones with trainable parameters (``optimized``: see :func:`frozen_copies`), or all when none
    has any."""
    owners = [m for m in model.modules() if hasattr(m, "get_classifier") and id(m) not in left_out]
    inner = {id(m) for owner in owners for m in owner.modules() if m is not owner}
    outermost = [owner for owner in owners if id(owner) not in inner]
    known = optimized and any(id(p) in optimized for owner in outermost for p in owner.parameters())
    held = optimized if known else None
    trained = [owner for owner in outermost
               if any(p.requires_grad and (held is None or id(p) in held) for p in owner.parameters())]
    return trained or outermost


def _penultimate(
    model: nn.Module, modules: list[tuple[str, nn.Module]], left_out: set[int], optimized: set[int] | None = None
) -> tuple[list[Tap], str | None]:
    """The ``"@penultimate"`` tap (see the module docstring), and why there is none where the last Linear lies inside
    a block of a stack (:func:`_repeated_blocks`): no head, but an MLP's layer of the last block (the model's head is a
    parameter, tied or a projection, which no hook sees). ``optimized``: see :func:`frozen_copies`."""
    taps: list[Tap] = []
    inside_headless: set[int] = set()
    for head_owner in _head_owners(model, left_out, optimized):
        head = head_owner.get_classifier()
        if isinstance(head, (tuple, list)):  # timm's distilled DeiT: (head, head_dist); the class token's head
            head = head[0] if head else None
        found = [
            Tap(f"{name}{INPUT_TAP_SUFFIX}", module, "input") for name, module in modules
            if module is head and isinstance(module, nn.Module) and not isinstance(module, nn.Identity)
        ]
        taps += found[:1]
        if not found and head_owner is not model:  # a headless backbone (num_classes=0): the head is outside it
            inside_headless |= {id(m) for m in head_owner.modules()}
    if taps:
        return taps, None
    # a peft wrapper of a Linear stands for it (its input is the layer's); the Linears inside it are the wrapped one
    # and the adapter's own (LoRA's lora_B sees the rank-r bottleneck)
    inside_wrappers = {id(m) for _, w in modules if _peft_wrapped(w) is not None for m in w.modules() if m is not w}
    outside = inside_headless | frozen_copies(modules, optimized) | inside_wrappers
    linears = [(n, m) for n, m in modules if isinstance(_innermost_wrapped(m), nn.Linear) and id(m) not in outside]
    # as of timm-style owners, a Linear of a trained part before one inside a frozen distillation teacher
    teachers = _frozen_teachers(modules, linears)
    linears = [(n, m) for n, m in linears if id(m) not in teachers] or linears
    if not linears:
        return [], None
    name, head = linears[-1]
    block = next((b for b, m in _repeated_blocks(modules) if name.startswith(f"{b}.") and _writes_what_it_reads(m, head)),
                 None)
    if block is None:
        return [Tap(f"{name}{INPUT_TAP_SUFFIX}", head, "input")], None
    norm = _norm_after(modules, block)
    fix = (f"modules=[{norm!r}] (the norm after the blocks)" if norm is not None
           else "modules=['<module>'] naming the module whose output is the penultimate features")
    return [], (
        f"'@penultimate' finds no head in {type(model).__name__}: its last nn.Linear, {name}, is the last projection "
        f"of the repeated block {block}, writing the width the block reads (the model's head is likely a parameter: a "
        f"tied F.linear(h, wte.weight), x @ embedding.weight.T, CLIP's x @ proj), so it taps nothing; pass {fix}, or "
        "modules=['<head>:input'] naming the head module"
    )


def _writes_what_it_reads(block: nn.Module, linear: nn.Module) -> bool:
    """Whether ``linear`` writes as many features as another layer of ``block`` reads: a residual block's last
    projection (a transformer's MLP down-projection writes the width its norm and attention read; a block that
    registers a conditioning Linear of another width first is one too), no head. An output layer inside a block (the
    last of a ModuleList of dense blocks, a head per task) writes a width no layer of its block reads and stays the
    head, whatever norms the model registers after the stack."""
    written = layer_features(_innermost_wrapped(linear))
    return written is not None and any(
        found[1] == written[2] for m in block.modules()
        if m is not linear and m is not _innermost_wrapped(linear) and (found := layer_features(m)) is not None
    )


def _norm_after(modules: list[tuple[str, nn.Module]], block: str) -> str | None:
    """The first normalization layer registered after the stack holding ``block``, at its level or above (a
    transformer's final ``ln``/``norm``/``ln_final``, whose output the head reads), else None: a suggestion only, as
    registration order need not be the order of the forward."""
    by_name = dict(modules)
    child = block.rpartition(".")[0]
    while child:
        parent, _, key = child.rpartition(".")
        owner = by_name.get(parent)
        children = [] if owner is None else [n for n, _ in owner.named_children()]
        for later in children[children.index(key) + 1:] if key in children else []:
            name = f"{parent}.{later}" if parent else later
            if name in by_name and "Norm" in module_class(by_name[name]).__name__:
                return name
        child = parent
    return None


def _frozen_teachers(modules: list[tuple[str, nn.Module]], linears: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of the modules inside a frozen parallel teacher (``linears``: the candidate heads, in order): a module none
    of whose parameters trains that holds a stack of blocks (:func:`_container_blocks`; a knowledge-distillation
    teacher, ``requires_grad_(False)``) and whose last Linear gives as many features as the student's head: the last
    Linear of a network that trains (one holding a stack of blocks and no such frozen network), frozen or not (a
    LoRA-tuned student's ``lm_head``), or the last Linear outside every frozen network where a stack of blocks
    trains (a student whose head sits beside a frozen tower of its own). A frozen network in series with the trained
    part stays (an input adapter, trained, is no student's head): its head is the model's (a LLaVA or BLIP-2 LM's
    ``lm_head`` over the vocabulary, behind a trained projector of the hidden width; a frozen classifier behind a
    trained input adapter), and so does a frozen head of a layer or a few without blocks (a LoRA-tuned causal LM's
    ``lm_head``, a masked LM's ``cls.predictions``). A teacher whose head differs from the student's (other classes,
    feature distillation) cannot be told from such a network. Decided from the names (a module's ancestors are its
    name's prefixes), in one pass over the modules."""

    def ancestors(name: str) -> list[str]:
        parts = name.split(".") if name else []
        return [".".join(parts[:i]) for i in range(len(parts))]

    holds_stack: set[str] = set()
    stacks: list[str] = []
    has_parameters: set[str] = set()
    trains: set[str] = set()
    with_children: set[str] = set()
    for name, module in modules:
        if _is_stack_container(module) and _container_blocks(module):
            holds_stack.update([name, *ancestors(name)])
            stacks.append(name)
        own = list(module.parameters(recurse=False))
        if own:
            has_parameters.update([name, *ancestors(name)])
        if any(p.requires_grad for p in own):
            trains.update([name, *ancestors(name)])
        if next(module.children(), None) is not None:
            with_children.add(name)
    frozen = [n for n, _ in modules
              if n in holds_stack and n in has_parameters and n not in trains and n in with_children]
    if not frozen:
        return set()
    around_frozen = {a for n in frozen for a in ancestors(n)}
    trained_networks = (holds_stack & trains) - around_frozen
    widths: set[int] = set()  # the student's head: not any Linear that trains (an input adapter feeds a frozen net)
    last_width: dict[str, int] = {}  # the last Linear of each network that trains, and of each frozen one
    frozen_set = set(frozen)
    for name, module in linears:
        for owner in ancestors(name):
            if owner in trained_networks or owner in frozen_set:
                last_width[owner] = _innermost_wrapped(module).out_features
    widths |= {width for owner, width in last_width.items() if owner in trained_networks}
    outside = [m for n, m in linears if not any(a in frozen_set for a in [n, *ancestors(n)])]
    if outside and any(n in trains for n in stacks):  # the model's own head, where a stack of it trains (a LoRA-tuned
        widths.add(_innermost_wrapped(outside[-1]).out_features)  # student whose head sits beside its frozen tower)
    teachers = {n for n in frozen if last_width.get(n) in widths}
    return {id(m) for n, m in modules if n in teachers or any(a in teachers for a in ancestors(n))}


def _match_one(
    model: nn.Module, spec: ModuleSpec, modules: list[tuple[str, nn.Module]] | None = None,
    optimized: set[int] | None = None,
) -> list[Tap]:
    modules = named_modules(model) if modules is None else modules
    if isinstance(spec, type):
        return [Tap(n, m) for n, m in modules if isinstance(m, spec)]
    if not isinstance(spec, str):
        raise ModuleSelectionError(
            f"module spec {spec!r} is neither a string nor a module class; use a name glob like "
            "'blocks.*.mlp.act', a class like 'torch.nn.GELU', or one of " + ", ".join(PRESETS)
        )
    point: Literal["output", "input"] = "output"
    suffix = next((end for end in _INPUT_SPEC_SUFFIXES if spec.endswith(end)), None)
    if suffix is not None:
        spec, point = spec[: -len(suffix)], "input"
    left_out: set[int] = set()
    if spec.startswith("@"):
        modules, left_out = _preset_candidates(model, modules)
    if spec == "@activations":
        shadowed = _shadowed(modules) | left_out  # nor is a parametrization's Softplus an MLP's activation module
        activations = [(n, m) for n, m in modules if n and is_activation(m) and id(m) not in shadowed]
        # the activation an adapter wraps (a DopamineGate's or IA3Scale's GELU) gives no output the model runs: the
        # adapter's is the layer's activation (an activation inside a user's own, x * self.gate(x), is tapped too)
        inside = {id(inner) for _, m in activations if _adapts_an_activation(m) for inner in m.children()}
        taps = [Tap(n, m) for n, m in activations if id(m) not in inside]
        if point == "output":
            return taps + _functional_activation_inputs(modules, shadowed)
    elif spec == "@blocks":
        taps = [Tap(n, m) for n, m in _repeated_blocks(modules)]
    elif spec == "@penultimate":
        return _penultimate(model, modules, left_out, optimized)[0]
    elif spec.startswith("@"):
        raise ModuleSelectionError(f"unknown module preset {spec!r}; use one of {', '.join(PRESETS)}")
    elif (cls := resolve_class(spec)) is not None:
        taps = [Tap(n, m) for n, m in modules if isinstance(m, cls)]
    elif spec.isidentifier() and spec[:1].isupper():
        taps = [Tap(n, m) for n, m in modules if module_class(m).__name__ == spec]
    else:  # a name glob: every name of a module registered under several (see module_aliases)
        named = modules + [(alias, m) for m, names in module_aliases(model).values() for alias in names[1:]]
        taps = [Tap(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, spec)]
    if point == "input":
        taps = [Tap(f"{t.name}{INPUT_TAP_SUFFIX}", t.module, "input") for t in taps]
    return taps


def _preset_candidates(
    model: nn.Module, modules: list[tuple[str, nn.Module]]
) -> tuple[list[tuple[str, nn.Module]], set[int]]:
    """The modules a preset picks among, those that take hooks (see :func:`select_taps`) and see activations (of the
    batch), and the ids of the ones left out for running on none."""
    left_out = _not_run_on_activations(model, modules) | _fixed_table_modules(model, modules)
    return [(n, m) for n, m in modules if not isinstance(m, torch.jit.ScriptModule) and id(m) not in left_out], left_out


def unmatched_specs(model: nn.Module, specs: ModuleSpec | Sequence[ModuleSpec]) -> list[ModuleSpec]:
    """The specs of ``specs`` that match no module of ``model`` on their own."""
    specs = [specs] if isinstance(specs, (str, type)) else list(specs)
    modules = named_modules(model)
    return [spec for spec in specs if not _match_one(model, spec, modules)]


def select_taps(
    model: nn.Module, specs: ModuleSpec | Sequence[ModuleSpec], owner: str = "monitor", warn_aliases: bool = True,
    optimized: set[int] | None = None,
) -> list[Tap]:
    """Resolve ``specs`` on ``model`` into taps, in module order, without duplicates.

    Raises :class:`ModuleSelectionError` (one line, with the fix) when nothing matches; a ``"@penultimate"`` that
    finds no head (its last Linear inside a block) says why, in that line or, beside other taps, in a warning.
    ``warn_aliases=False`` for a monitor selecting a subset of its taps again: their "registered also as" warning was
    said at their selection. ``optimized``: the ids of the parameters the fit's optimizers hold, where known (see
    :func:`frozen_copies`; at fit start, a DQN target network in no optimizer is no trained network).
    """
    if isinstance(specs, (str, type)):
        specs = [specs]
    modules = named_modules(model)
    scripted = _outermost_scripted(modules)
    if scripted and any(isinstance(spec, str) and spec.startswith("@") for spec in specs):
        warnings.warn(
            f"{owner}: {scripted[:3]} are TorchScript modules, which take no forward hooks; the presets leave them "
            "out (monitor them before torch.jit.script)",
            UserWarning,
            stacklevel=2,
        )
    taps: list[Tap] = []
    seen: set[tuple[int, str]] = set()
    headless: str | None = None
    for spec in specs:
        if spec == "@penultimate":
            matched, headless = _penultimate(model, *_preset_candidates(model, modules), optimized)
        else:
            matched = _match_one(model, spec, modules, optimized)
        for tap in matched:
            if (id(tap.module), tap.point) not in seen:
                seen.add((id(tap.module), tap.point))
                taps.append(tap)
    if headless is not None and not taps:
        raise ModuleSelectionError(f"{owner}: {headless}")
    if headless is not None:
        warnings.warn(f"{owner}: {headless}", UserWarning, stacklevel=2)
    if not taps:
        names = [n for n, _ in modules if n]
        raise ModuleSelectionError(
            f"{owner}: modules={list(specs)!r} matched no module of {type(model).__name__}; "
            f"use name globs or classes that exist (e.g. {_examples(names, specs)}) or a preset "
            f"({', '.join(PRESETS)}); functional activations (F.gelu in forward) are reached through "
            "the next layer's input, e.g. '*.fc2:input'"
            + ("; an activation module of your own joins '@activations' by "
               "lightning_act.capture.register_activation_class(cls)" if "@activations" in specs else "")
        )
    aliases = module_aliases(model) if warn_aliases else {}
    # A name inside an averaged copy is no second call place: ema-pytorch's EMA registers the trained network as its
    # online_model, which only the training forward runs, under the network's own name.
    copy_names = tuple(
        f"{clean_name(n)}." for n, m in model.named_modules(remove_duplicate=False) if n and _is_averaged_copy(m)
    )
    for tap in taps:
        if id(tap.module) in aliases:
            others = [
                n for n in aliases[id(tap.module)][1]
                if n != tap.name.removesuffix(INPUT_TAP_SUFFIX) and not n.startswith(copy_names)
            ]
            if not others:
                continue
            warnings.warn(
                f"{owner}: {tap.name} is one module object registered also as {', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}; its calls from every place are measured together under "
                f"{tap.name}: if it runs at more than one place in the forward (one activation shared by several "
                "blocks), give each place its own instance to measure them apart; if it runs at one place (a block "
                "holding it as an attribute and again in its nn.Sequential), nothing is mixed",
                UserWarning,
                stacklevel=2,
            )
    unhookable = [tap.name for tap in taps if isinstance(tap.module, torch.jit.ScriptModule)]
    if unhookable:
        raise ModuleSelectionError(
            f"{owner}: {unhookable[:3]} are TorchScript modules, which take no forward hooks; select modules that "
            "are not scripted, or monitor the model before torch.jit.script"
        )
    return taps


def _outermost_scripted(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the TorchScript modules of ``modules`` (in module order) that no other one contains."""
    names: list[str] = []
    for name, module in modules:
        if isinstance(module, torch.jit.ScriptModule) and not any(name.startswith(f"{n}.") for n in names):
            names.append(name)
    return names


def module_chain(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """``module`` and its owners in ``model``, innermost first (empty when it is not in ``model``)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            parts = name.split(".") if name else []
            chain = [model]
            for part in parts:  # by registration: an instance attribute may hide a child's name (see _shadowed)
                chain.append(chain[-1]._modules[part])
            return chain[::-1]
    return []


def _examples(names: Sequence[str], specs: Sequence[ModuleSpec], limit: int = 5) -> str:
    """Module names closest to the string specs given, else the first few names."""
    if not names:
        return "the model has no submodules"
    queries = [s.replace("*", "0") for s in specs if isinstance(s, str)]
    close = [m for q in queries for m in difflib.get_close_matches(q, names, n=limit, cutoff=0.4)]
    shown = list(dict.fromkeys(close))[:limit] or list(names[:limit])
    return ", ".join(repr(n) for n in shown)
