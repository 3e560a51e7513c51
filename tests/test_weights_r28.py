"""Round 28 (B4, B5, B2b): a parametrized weight read outside the forward (ActivationSparsity's CETT,
DimensionalCollapse's parameter trajectory) takes none of the training's random draws (torch's generators, one the
parametrization holds, Python's ``random``) and puts back a parametrization buffer that the forward rebinds; a
stochastic parametrization is read as its noiseless (eval-mode) weight, or as one fixed draw when it draws in eval
mode too. Fits are compared bitwise with the fit without the monitor, values with numpy float64."""

from __future__ import annotations

import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from _toy import ToyData, ToyTask, quiet_trainer
import lightning_act.callbacks as callbacks
from lightning_act.callbacks.sparsity import down_projection_weight
from lightning_act.capture import weights
from lightning_act.capture.weights import forward_tensor


class NoisyWeight(nn.Module):
    """Weight noise in training mode."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.01 * torch.randn_like(w) if self.training else w


class DropConnect(nn.Module):
    """A Bernoulli mask over the weight in training mode, scaled to keep its mean."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * torch.bernoulli(torch.full_like(w, 0.8)) / 0.8 if self.training else w


class HeldGeneratorNoise(nn.Module):
    """Weight noise in training mode, drawn from a generator of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(5)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.01 * torch.randn(w.shape, generator=self.g) if self.training else w


class PythonRandomScale(nn.Module):
    """A random scale of the weight in training mode, drawn from Python's ``random``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (1 + 0.01 * random.gauss(0, 1)) if self.training else w


class AlwaysNoisy(nn.Module):
    """Weight noise in every mode (a Bayesian layer sampling its weight)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.01 * torch.randn_like(w)


class ReboundCount(nn.Module):
    """A step counter updated out of place in training mode, driving a scale."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.n = self.n + 1
        return w * (1 + 0.01 * self.n)


def _net(parametrization: nn.Module) -> nn.Sequential:
    linear = nn.Linear(32, 32)
    parametrize.register_parametrization(linear, "weight", parametrization)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.GELU(), nn.Sequential(linear, nn.ReLU()),
                         nn.Linear(32, 4))


def _fit(parametrization: type[nn.Module], monitor: pl.Callback | None) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    task = ToyTask(_net(parametrization()))
    quiet_trainer(max_steps=3, callbacks=[monitor] if monitor else []).fit(task, ToyData(batch_size=8))
    return task.state_dict()


MONITORS = {
    "cett": lambda: callbacks.ActivationSparsity(modules=[], cett_modules="net.3.0", every_n_steps=1),
    "trajectory": lambda: callbacks.DimensionalCollapse(modules=["net.2"], every_n_steps=1),
}


@pytest.mark.parametrize(
    "parametrization", [NoisyWeight, DropConnect, ReboundCount, HeldGeneratorNoise, PythonRandomScale]
)
@pytest.mark.parametrize("monitor", list(MONITORS))
def test_a_parametrized_weight_read_leaves_training_bitwise_identical(parametrization, monitor) -> None:
    """Before: the read drew from the training's RNG (noise, mask: weights off by 0.003; before B2b also from the
    parametrization's own generator or Python's ``random``) or kept the counter's extra step (rebound buffer: counter
    8 or 9 after 3 steps instead of 4)."""
    bare = _fit(parametrization, None)
    watched = _fit(parametrization, MONITORS[monitor]())
    assert bare.keys() == watched.keys()
    for key in bare:  # the counter included
        assert torch.equal(bare[key], watched[key]), key


def test_a_rebound_parametrization_buffer_is_put_back_bound_and_valued() -> None:
    """Before: the restore copied into the old tensor while the parametrization held a new one (counter 1 -> 2)."""
    linear = _net(ReboundCount())[3][0]
    count = linear.parametrizations.weight[0]
    counter = count.n
    expected = linear.parametrizations.weight.original.detach().double().numpy() * (1 + 0.01 * 2)  # the next forward's
    read = forward_tensor(linear, "weight")
    assert count.n is counter and count.n.item() == 1.0  # register_parametrization's check ran it once
    np.testing.assert_allclose(read.double().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("parametrization", [NoisyWeight, DropConnect, HeldGeneratorNoise, PythonRandomScale])
def test_a_parametrization_drawing_in_training_is_read_as_its_noiseless_weight(parametrization) -> None:
    """The trajectory and CETT read the eval-mode weight, the training's RNG (torch's, the parametrization's own
    generator, Python's ``random``) untouched and the mode flags kept."""
    model = _net(parametrization())
    model.train()
    linear = model[3][0]
    original = linear.parametrizations.weight.original.detach().double().numpy()
    held = getattr(linear.parametrizations.weight[0], "g", torch.Generator())
    state, held_state, python_state = torch.get_rng_state(), held.get_state(), random.getstate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the weight is well-defined
        read = forward_tensor(linear, "weight")
        cett_weight = down_projection_weight(linear)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(held.get_state(), held_state)
    assert random.getstate() == python_state
    assert all(module.training for module in model.modules())
    np.testing.assert_array_equal(read.detach().double().numpy(), original)
    np.testing.assert_array_equal(cett_weight.detach().double().numpy(), original)
    monitor = callbacks.DimensionalCollapse(projection_dim=None)
    snapshot = monitor._snapshot(monitor._chosen_weights(model, ["3.0.weight", "4.weight"])).detach().double().numpy()
    expected = np.concatenate([original.reshape(-1), model[4].weight.detach().double().numpy().reshape(-1)])
    np.testing.assert_array_equal(snapshot, expected)


def test_a_parametrization_drawing_in_eval_mode_too_is_read_as_one_fixed_draw_said_once() -> None:
    linear = _net(AlwaysNoisy())[3][0]
    original = linear.parametrizations.weight.original.detach().clone()
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(weights.READ_SEED))
    expected = original + 0.01 * noise
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="draws random numbers in eval mode too") as said:
        first = forward_tensor(linear, "weight")
        second = forward_tensor(linear, "weight")
    assert len([w for w in said if "draws random numbers" in str(w.message)]) == 1
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and torch.equal(first, expected)


class AlwaysHeldGeneratorNoise(HeldGeneratorNoise):
    """Weight noise from a generator of its own in every mode."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.01 * torch.randn(w.shape, generator=self.g)


class AlwaysPythonRandomScale(nn.Module):
    """A random scale of the weight from Python's ``random`` in every mode."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (1 + 0.01 * random.gauss(0, 1))


def test_a_parametrization_drawing_from_its_own_sources_in_eval_mode_is_read_as_one_fixed_draw() -> None:
    """Its own generator and Python's ``random`` are seeded with READ_SEED for the read and put back after it
    (before B2b: each read took the next draw of the fit's sources, no two reads alike, and nothing was said)."""
    held_linear = _net(AlwaysHeldGeneratorNoise())[3][0]
    python_linear = _net(AlwaysPythonRandomScale())[3][0]
    held = held_linear.parametrizations.weight[0].g
    held_original = held_linear.parametrizations.weight.original.detach().double().numpy()
    python_original = python_linear.parametrizations.weight.original.detach().double().numpy()
    noise = torch.randn(held_original.shape, generator=torch.Generator().manual_seed(weights.READ_SEED))
    held_expected = held_original + 0.01 * noise.double().numpy()
    python_expected = python_original * (1 + 0.01 * random.Random(weights.READ_SEED).gauss(0, 1))
    held_state, python_state = held.get_state(), random.getstate()
    with pytest.warns(UserWarning, match="draws random numbers in eval mode too"):
        held_reads = [forward_tensor(held_linear, "weight") for _ in range(2)]
        python_reads = [forward_tensor(python_linear, "weight") for _ in range(2)]
    assert torch.equal(held.get_state(), held_state) and random.getstate() == python_state
    assert torch.equal(*held_reads) and torch.equal(*python_reads)
    np.testing.assert_allclose(held_reads[0].double().numpy(), held_expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(python_reads[0].double().numpy(), python_expected, rtol=1e-6, atol=1e-7)


def _numpy_spectral_norm_forward(linear: nn.Module) -> np.ndarray:
    """``W / σ`` as a training-mode forward of ``parametrizations.spectral_norm`` computes it: one power-iteration
    step from the stored ``v`` first (float64)."""
    spectral = linear.parametrizations.weight[0]
    w = linear.parametrizations.weight.original.detach().double().numpy()
    u = w @ spectral._v.double().numpy()
    u /= max(np.linalg.norm(u), 1e-12)
    v = w.T @ u
    v /= max(np.linalg.norm(v), 1e-12)
    return w / (u @ w @ v)


def test_a_deterministic_parametrization_is_read_as_the_next_forward_uses_it() -> None:
    """Guard: ``spectral_norm`` read in training mode with its power-iteration step, its buffers unchanged, equal to
    the weight the next forward uses and to numpy; the CETT weight and the trajectory read the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6)))
    model.train()
    model(torch.randn(4, 6)).pow(2).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    linear = model[2]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    expected = _numpy_spectral_norm_forward(linear)
    read = forward_tensor(linear, "weight")
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    np.testing.assert_allclose(read.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(down_projection_weight(linear).double().numpy(), expected, rtol=1e-5, atol=1e-7)
    monitor = callbacks.DimensionalCollapse(projection_dim=None)
    snapshot = monitor._snapshot(monitor._chosen_weights(model, ["2.weight"])).double().numpy()
    np.testing.assert_allclose(snapshot, expected.reshape(-1), rtol=1e-5, atol=1e-7)
    x = torch.randn(3, 6)
    with torch.no_grad():
        used = linear(x)  # the next forward: one power-iteration step, as read
    torch.testing.assert_close(used, x @ read.t() + linear.bias, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_noisy_parametrization_on_cuda_leaves_its_generator_and_reads_without_a_host_sync() -> None:
    linear = _net(NoisyWeight())[3][0].cuda()
    original = linear.parametrizations.weight.original.detach().clone()
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    torch.cuda.set_sync_debug_mode("error")
    try:
        read = forward_tensor(linear, "weight")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert torch.equal(read, original)
