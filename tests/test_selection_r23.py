"""Round 23: the presets on lazy modules (``nn.LazyLinear``), on a frozen distillation teacher of another shape but
not on a frozen LM behind a trained projector, on torchvision's detection/segmentation backbones
(``IntermediateLayerGetter``, SSDLite's split MobileNetV3) but not on hand-written stages of bare Sequentials."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_act.callbacks import DimensionalCollapse
from lightning_act.capture import select_taps, unmatched_specs


def names(taps):
    return [t.name for t in taps]


# ---------------------------------------------------------------- lazy modules
class LazyNet(pl.LightningModule):
    """Two blocks and a head of ``nn.LazyLinear``, whose weights exist only after the first forward; ``unused`` never
    runs (``with_unused``), so its weight stays uninitialized. Records the blocks' weights before the first update
    and after each step."""

    def __init__(self, with_unused: bool = False):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LazyLinear(6), nn.GELU()) for _ in range(2)])
        if with_unused:
            self.unused = nn.LazyLinear(6)
        self.head = nn.LazyLinear(3)
        self.weights: list[np.ndarray] = []

    def forward(self, x):
        return self.head(self.blocks(x))

    def block_weights(self) -> np.ndarray:
        return np.concatenate([self.blocks[i][0].weight.detach().double().numpy().ravel() for i in range(2)])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.weights:
            self.weights.append(self.block_weights())  # as the first forward made them
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights.append(self.block_weights())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit_lazy(monitor, model, steps=4):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))


def numpy_r90(snapshots: list[np.ndarray], fraction: float = 0.9) -> int:
    """r90 of float64 snapshots: PCA of the centred snapshots through their singular values."""
    x = np.stack(snapshots)
    variance = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variance) / variance.sum(), fraction - 1e-12) + 1)


def test_presets_on_lazy_modules_before_their_first_forward():
    # Before: "Can't access the shape of an uninitialized parameter" from frozen_copies, through @penultimate.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Sequential(nn.LazyLinear(8), nn.ReLU()), nn.LazyLinear(3))
    (tap,) = select_taps(model, "@penultimate")
    assert (tap.name, tap.point, tap.module) == ("3-input", "input", model[3])


def test_trajectory_of_lazy_weights_starts_at_the_weights_the_first_forward_made():
    # Before: the fit crashed at its start (p.dim() of an uninitialized parameter in the trajectory's choice).
    torch.manual_seed(0)
    model = LazyNet()
    monitor = DimensionalCollapse(modules=["@blocks"], every_n_steps=1, projection_dim=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*uninitialized.*")
        fit_lazy(monitor, model)
    assert monitor.param_names == ["blocks.0.0.weight", "blocks.1.0.weight"]
    r90 = monitor.history["collapse/params/r90"]
    assert len(model.weights) == 5  # as made by the first forward, then after each of the 4 steps
    assert r90.steps == [0, 1, 2, 3]
    assert r90.values == [float(numpy_r90(model.weights[: k + 2])) for k in range(4)]


def test_a_lazy_weight_that_never_runs_is_left_out_of_the_trajectory_said_once():
    torch.manual_seed(0)
    model = LazyNet(with_unused=True)
    monitor = DimensionalCollapse(
        modules=["@blocks"], every_n_steps=1, projection_dim=None, param_patterns=["blocks.*.weight", "unused.*"])
    with pytest.warns(UserWarning, match=r"'unused\.weight', 'unused\.bias'\] are still uninitialized") as caught:
        fit_lazy(monitor, model)
    assert sum("uninitialized" in str(w.message) for w in caught) == 1
    assert monitor.param_names == ["blocks.0.0.weight", "blocks.1.0.weight"]
    r90 = monitor.history["collapse/params/r90"]  # chosen at step 0's end: snapshots after each step
    assert r90.steps == [1, 2, 3]
    assert r90.values == [float(numpy_r90(model.weights[1: k + 3])) for k in range(3)]


# ---------------------------------------------------------------- a frozen distillation teacher
class MLP(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(8 if i == 0 else width, width), nn.ReLU()) for i in range(depth)])
        self.head = nn.Linear(width, 3)


def test_penultimate_is_the_students_head_beside_a_frozen_teacher_of_another_shape():
    # Before: the teacher registered after the student gave teacher.head-input (the last nn.Linear): no frozen copy,
    # as its shapes differ, so SensitiveNeurons tracked a module its forward never ran.
    model = nn.Module()
    model.student = MLP(8, 2)
    model.teacher = MLP(32, 3).requires_grad_(False)
    (tap,) = select_taps(model, "@penultimate")
    assert (tap.name, tap.module) == ("student.head-input", model.student.head)
    model.student.requires_grad_(False)  # nothing trains (a frozen model evaluated): the last Linear, as before
    assert names(select_taps(model, "@penultimate")) == ["teacher.head-input"]
    # a frozen head of a trained model stays, a layer or a few without blocks (a LoRA-tuned causal LM's lm_head, a
    # masked LM's cls.predictions): it is still the head the trained features feed
    for head in [nn.Linear(8, 5), nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 5))]:
        model = nn.Module()
        model.body = MLP(8, 2)
        model.lm_head = head.requires_grad_(False)
        last_linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        assert select_taps(model, "@penultimate")[0].module is last_linear


# ---------------------------------------------------------------- torchvision detection / segmentation backbones
def inverted_residuals(model):
    from torchvision.models.mobilenetv3 import InvertedResidual

    return [n for n, m in model.named_modules() if isinstance(m, InvertedResidual)]


def test_blocks_of_mobilenet_v3_behind_an_intermediate_layer_getter():
    # Before: the Conv2dNormActivation pieces inside each block (backbone.1.block.0 ...), none of the blocks.
    from torchvision.models import detection, segmentation

    for model, prefix in [
        (segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3), "backbone."),
        (detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3),
         "backbone.body."),
    ]:
        backbone = [n for n in names(select_taps(model, "@blocks")) if n.startswith(prefix)]
        assert backbone == inverted_residuals(model) == [f"{prefix}{i}" for i in range(1, 16)]

    # unchanged: a ResNet behind the getter gives its stages' blocks; another ModuleDict is no stack (a head per
    # task); stages written as bare Sequentials, each a whole stack, stay the blocks
    resnet = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    expected = [f"backbone.layer{s}.{k}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for k in range(n)]
    assert names(select_taps(resnet, "@blocks")) == expected

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    model = nn.Module()
    model.heads = nn.ModuleDict({"a": Head(), "b": Head(), "c": Head()})
    assert unmatched_specs(model, ["@blocks"]) == ["@blocks"]
    stages = nn.Sequential(*[nn.Sequential(Head(), Head()) for _ in range(2)])
    assert names(select_taps(stages, "@blocks")) == ["0", "1"]


def test_blocks_of_ssdlites_mobilenet_v3_cut_in_two():
    # Before: backbone.features.0 and backbone.features.1, the two halves of the whole backbone.
    from torchvision.models import detection

    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    features = [n for n in names(select_taps(model, "@blocks")) if n.startswith("backbone.features.")]
    expected = [f"backbone.features.0.{i}" for i in range(1, 13)] + ["backbone.features.1.1", "backbone.features.1.2"]
    assert features == inverted_residuals(model) == expected


# ---------------------------------------------------------------- a frozen network in series with the trained part
class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)


class Tower(nn.Module):
    """A stack of two blocks, with a head of ``head`` outputs if given (an LM's ``lm_head``)."""

    def __init__(self, width, head=None):
        super().__init__()
        self.layers = nn.ModuleList([Block(width) for _ in range(2)])
        if head is not None:
            self.norm, self.lm_head = nn.LayerNorm(width), nn.Linear(width, head)


def test_penultimate_of_a_trained_part_in_front_of_a_frozen_lm_is_the_lms_head():
    # Before: projector.2-input and language_projection-input (the vision features): every frozen network with
    # blocks was left out as a distillation teacher, also the LM that holds the model's head
    llava = nn.Module()  # stage 1: only the projector trains
    llava.vision = Tower(16).requires_grad_(False)
    llava.projector = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    llava.lm = Tower(32, head=100).requires_grad_(False)
    (tap,) = select_taps(llava, "@penultimate")
    assert (tap.name, tap.module) == ("lm.lm_head-input", llava.lm.lm_head)

    blip2 = nn.Module()  # a trained Q-Former with blocks and projection between a frozen ViT and a frozen LM
    blip2.vision_model = Tower(16).requires_grad_(False)
    blip2.qformer = Tower(24)
    blip2.language_projection = nn.Linear(24, 32)
    blip2.language_model = Tower(32, head=100).requires_grad_(False)
    assert names(select_taps(blip2, "@penultimate")) == ["language_model.lm_head-input"]

    reprogrammed = nn.Module()  # a trained input adapter in front of a frozen classifier over 10 classes
    reprogrammed.adapter = nn.Linear(8, 8)
    reprogrammed.classifier = Tower(8, head=10).requires_grad_(False)
    assert names(select_taps(reprogrammed, "@penultimate")) == ["classifier.lm_head-input"]


class AdaptedBlock(Block):
    """A block whose own weights are frozen and a low-rank adapter of 3 trains (LoRA's layout)."""

    def __init__(self, width):
        super().__init__(width)
        self.requires_grad_(False)
        self.adapter_down, self.adapter_up = nn.Linear(width, 3), nn.Linear(3, width)


def test_penultimate_of_an_adapted_student_beside_a_frozen_teacher_is_the_students_head():
    # Before: teacher.lm_head-input: only the adapters train (widths 3 and the model's), so no trained Linear was
    # as wide as the teacher's head; the student's own frozen lm_head names the width a teacher shares
    model = nn.Module()
    model.student = Tower(8, head=50)
    model.student.layers = nn.ModuleList([AdaptedBlock(8) for _ in range(2)])
    model.student.lm_head.requires_grad_(False)
    model.teacher = Tower(16, head=50).requires_grad_(False)
    assert names(select_taps(model, "@penultimate")) == ["student.lm_head-input"]


def test_penultimate_of_an_adapted_student_with_a_frozen_tower_of_its_own_is_the_students_head():
    # Before: teacher.lm_head-input: the student holds a frozen vision tower, so it counted as no trained network and
    # its frozen lm_head (beside its adapted layers, as in Hugging Face's LLaVA) named no width
    model = nn.Module()
    model.student = nn.Module()
    model.student.vision = Tower(16).requires_grad_(False)
    model.student.layers = nn.ModuleList([AdaptedBlock(8) for _ in range(2)])
    model.student.lm_head = nn.Linear(8, 50).requires_grad_(False)
    model.teacher = Tower(16, head=50).requires_grad_(False)
    assert names(select_taps(model, "@penultimate")) == ["student.lm_head-input"]


def test_penultimate_of_a_frozen_network_behind_a_trained_input_adapter_of_its_width_is_its_head():
    # Before (this round's first rules): adapter-input: the adapter (a Linear that trains) is as wide as the frozen
    # forecaster's head (8 channels in, 8 out), so the forecaster was taken for a distillation teacher
    model = nn.Module()
    model.adapter = nn.Linear(5, 8)
    model.forecaster = Tower(8, head=8).requires_grad_(False)
    assert names(select_taps(model, "@penultimate")) == ["forecaster.lm_head-input"]


# ---------------------------------------------------------------- hand-written stages of bare Sequentials
class Down(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()


def test_blocks_of_hand_written_stages_are_the_stages_whatever_their_depth():
    # Before: stages of three or more blocks gave each block (0.1, 0.2, 0.3, 1.1 ...), of two the stages: the keys
    # hinged on the depth; the split-stack rule is torchvision's SSDLite's alone
    for depths in [(2, 2, 2), (3, 3, 3), (4, 4, 4), (2, 2, 6, 2)]:
        stages = nn.Sequential(*[nn.Sequential(Down(), *[ConvBlock() for _ in range(k)]) for k in depths])
        assert names(select_taps(stages, "@blocks")) == [str(i) for i in range(len(depths))], depths
