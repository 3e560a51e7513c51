"""Round 26: features tested on the CPU only until now, each test parametrized over the device.

Why: these features have device-specific code that the CPU tests never run: the CUDA generator's state in
``LastCheckpoint``'s checkpoints, the covariance sketch's float32 projection and SVD on the GPU, a probe replayed from
a CUDA graph over a forward that writes its parameters, the Triton fused-statistics kernel's float64 sums, and the
GroupRational Triton backward handed autograd's batched gradients. The CUDA cases are owed checks: the GPU session runs
them with ``pytest -k "cuda or CUDA"`` (``scripts/gpu_check_monitors.sh`` step 1b); here in CI the CPU cases run the
same test logic. Every test compares with an independent computation: the uninterrupted fit, the fit without the
monitor, numpy float64, or the float64 PyTorch reference.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import RescalingTask, StateAtBatchEnd, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse, SensitiveNeurons
from lightning_act.checkpointing import AtomicCheckpointIO, LastCheckpoint
from lightning_act.nn.group_rational import GroupRational, group_rational_reference
from lightning_act.stats.fused import fused_statistics, moment_partials_from, moment_spec, triton_available
from lightning_act.stats.moments import summarize_moments

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def accelerator(device: str) -> str:
    """The Trainer's ``accelerator`` for ``device``."""
    return "gpu" if device == "cuda" else "cpu"


# ---------------------------------------------------------------- LastCheckpoint: random-number states on a resume
EPOCH = 8  # ToyData: 64 samples in batches of 8
MAX_STEPS = 2 * EPOCH


class DrawingTask(ToyTask):
    """Dropout (the device's generator) and a loss scale drawn from numpy's and Python's: every stream steers the
    weights."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.trained_on = self.device.type  # Lightning's teardown moves the module back to the CPU after the fit
        scale = 1.0 + 0.5 * float(np.random.rand()) + 0.5 * random.random()
        return scale * super().training_step(batch, batch_idx)


def drawing_fit(root: Path, device: str, max_steps: int, seed: int, ckpt_path: str | None = None) -> DrawingTask:
    """A fit of :class:`DrawingTask` on ``device`` with ``LastCheckpoint`` in ``root/ck``, seeded with ``seed``."""
    pl.seed_everything(seed, verbose=False)  # a resume's own seed: the checkpoint's states must replace it
    task = DrawingTask()
    trainer = pl.Trainer(default_root_dir=root, accelerator=accelerator(device), devices=1, max_steps=max_steps,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=2, callbacks=[LastCheckpoint(dirpath=str(root / "ck"))],
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(task, ToyData(), ckpt_path=ckpt_path)
    return task


@pytest.mark.parametrize("device", DEVICES)
def test_a_fit_with_dropout_resumed_from_an_epoch_end_checkpoint_equals_the_uninterrupted_fit_bitwise(
    tmp_path: Path, device: str
) -> None:
    """The checkpoint holds torch's, numpy's, Python's and (on a GPU) the CUDA generator's states, and the resumed fit
    (another seed) sets them back: its dropout masks and draws, hence its weights, are the uninterrupted fit's."""
    uninterrupted = drawing_fit(tmp_path / "uninterrupted", device, MAX_STEPS, seed=0).state_dict()
    drawing_fit(tmp_path / "stopped", device, EPOCH, seed=0)
    last = tmp_path / "stopped" / "ck" / "last.ckpt"
    (states,) = torch.load(last, map_location="cpu", weights_only=True)["lightning_act_rng_states"]
    assert set(states) == {"torch", "numpy", "python"} | ({"cuda"} if device == "cuda" else set())
    resumed = drawing_fit(tmp_path / "stopped", device, MAX_STEPS, seed=123, ckpt_path=str(last))
    assert resumed.trainer.global_step == MAX_STEPS
    assert resumed.trained_on == device
    assert resumed.state_dict().keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ----------------------------------------------------------- DimensionalCollapse: the covariance sketch of a wide tap
WIDE = 96  # features of the tap, above WIDE_DIM: the sketch path
WIDE_DIM = 64
ROWS = 48  # rows per step, all sampled (max_rows): k = 48 < WIDE, and the centred rows' rank 47 <= k


class WideTapTask(pl.LightningModule):
    """Gaussian inputs through a 128 -> 96 linear layer into an identity tap: a flat spectrum of rank ``ROWS - 1``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, WIDE)
        self.tap = nn.Identity()
        self.head = nn.Linear(WIDE, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head(self.tap(self.proj(batch[0]))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def numpy_erank_and_pr(rows: np.ndarray) -> tuple[float, float]:
    """Effective rank (Roy & Vetterli: entropy of the normalised singular values) and participation ratio of the
    centred ``rows``, float64, over the singular values above round-off."""
    sigma = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    sigma = sigma[sigma > 1e-10 * sigma[0]]
    p = sigma / sigma.sum()
    lam = sigma**2
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_a_wide_taps_sketched_erank_and_pr_equal_numpy_float64_of_the_same_activations(device: str) -> None:
    """With the centred rows' rank <= k the sketch's erank and PR are the centred scatter's up to float64 round-off
    (``lightning_act.stats.covariance_sketch``, "Error"; the erank bias of up to +0.6% is for steep spectra, not this flat one;
    measured on the CPU: 1e-14 relative, where a float32 ``XᵀZ`` is 2e-8 off)."""
    torch.manual_seed(0)
    task = WideTapTask()
    seen: list[np.ndarray] = []
    task.tap.register_forward_hook(lambda module, args, output: seen.append(output.detach().double().cpu().numpy()))
    monitor = DimensionalCollapse(modules=["tap"], every_n_steps=1, max_rows=ROWS, wide_dim=WIDE_DIM, param_patterns=[])
    data = DataLoader(TensorDataset(torch.randn(3 * ROWS, 128)), batch_size=ROWS)
    quiet_trainer(max_steps=3, accelerator=accelerator(device), callbacks=[monitor]).fit(task, data)
    assert monitor._sketch_dims  # the tap summed the sketch, not the full covariance
    assert len(seen) == 3 and all(rows.shape == (ROWS, WIDE) for rows in seen)  # one forward per step
    assert monitor.history["collapse/tap/erank"].steps == monitor.history["collapse/tap/pr"].steps == [0, 1, 2]
    for step, rows in enumerate(seen):
        erank, pr = numpy_erank_and_pr(rows)
        assert erank > 40  # flat: nowhere near the steep spectra the whitening floor biases
        assert monitor.history["collapse/tap/erank"].values[step] == pytest.approx(erank, rel=1e-10), step
        assert monitor.history["collapse/tap/pr"].values[step] == pytest.approx(pr, rel=1e-10), step


# --------------------------------------------------------- SensitiveNeurons: a probe of a forward writing its weights
def rescaling_fit(device: str, monitor: SensitiveNeurons | None) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """Four steps of :class:`RescalingTask` on ``device`` with ``monitor`` (if any) before the recorder."""
    torch.manual_seed(0)
    task = RescalingTask()
    data = DataLoader(TensorDataset(torch.randn(32, 6)), batch_size=8)
    recorder = StateAtBatchEnd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's "runs whole" line and Lightning's deprecation notes
        quiet_trainer(max_steps=4, accelerator=accelerator(device),
                      callbacks=[*([monitor] if monitor else []), recorder]).fit(task, data)
    return recorder.states


@pytest.mark.parametrize(
    ("device", "cuda_graph"),
    [("cpu", False), pytest.param("cuda", False, marks=needs_cuda), pytest.param("cuda", True, marks=needs_cuda)],
    ids=["cpu", "cuda", "cuda-cuda_graph"],  # cuda_graph=True does nothing on a CPU
)
def test_parameters_at_every_batch_end_equal_the_unmonitored_fits_bitwise_under_an_in_place_probe(
    device: str, cuda_graph: bool
) -> None:
    """A probe at every step, whose eval-mode forward divides the weights in place, puts them and the flag back: what
    a later callback reads is the fit without the monitor's, bit for bit. With ``cuda_graph=True`` no graph is
    replayed once the first probe found the writes: a replay would repeat them as kernels of the graph, where no
    torch function is called and no version counter moves, and leave the weights divided from the third probe on
    (the code before round 26's fix)."""
    monitor = SensitiveNeurons(modules=["net.blocks.1"], every_n_steps=1, eigenscore_passes=0,
                               tracking_inputs=torch.randn(8, 6, generator=torch.Generator().manual_seed(1)),
                               window=2, cuda_graph=cuda_graph)
    plain, monitored = rescaling_fit(device, None), rescaling_fit(device, monitor)
    assert monitor.checkpoints == 4  # a probe at every step
    if cuda_graph:  # refused after the first probe (said once): every probe ran eagerly
        assert not monitor._graph_this_fit and monitor._graphed.replays == 0
    assert len(plain) == len(monitored) == 4
    for step, ((plain_params, plain_flag), (params, flag)) in enumerate(zip(plain, monitored, strict=True)):
        assert flag is plain_flag is False, step
        for name, p in plain_params.items():
            assert p.device.type == device
            assert torch.equal(params[name], p), (step, name)


# ---------------------------------------------------------------- fused statistics: float64 sums far from zero
@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_std_of_millions_of_entries_at_mean_3e4_std_equals_numpy_float64(device: str) -> None:
    """Two values 1 ± 1/3e4 over 4M entries: float32 sums of squares lose the std (|mean| = 3e4 std); the fused pass
    of the device's default implementation (Triton on a GPU that has it) sums x and x² in float64."""
    implementation = "triton" if device == "cuda" and triton_available() else "torch"
    rng = np.random.default_rng(0)
    values = np.where(rng.random(1 << 22) < 0.5, 1.0 - 1.0 / 3e4, 1.0 + 1.0 / 3e4).astype(np.float32)
    x = torch.from_numpy(values).view(64, -1).to(device)
    stats = summarize_moments(*moment_partials_from(fused_statistics(x, moment_spec(), implementation)))
    exact = values.astype(np.float64)
    assert stats["std"].item() == pytest.approx(exact.std(), rel=1e-5)  # the tolerance of the CPU test of round 25


# ---------------------------------------------------------------- GroupRational: autograd's batched gradients
def reference_gradients(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, cotangents: torch.Tensor
) -> list[torch.Tensor]:
    """Per cotangent, d<v, F(x)>/d(x, numerator, denominator) of the float64 PyTorch reference, one plain backward
    each (no batching), stacked: the (cotangents, ...) layout of ``is_grads_batched``."""
    inputs = [t.detach().double().cpu().requires_grad_() for t in (x, numerator, denominator)]
    y = group_rational_reference(*inputs)
    rows = [torch.autograd.grad(y, inputs, v.double().cpu(), retain_graph=True) for v in cotangents]
    return [torch.stack(parts) for parts in zip(*rows, strict=True)]


@pytest.mark.parametrize("device", DEVICES)
def test_group_rational_batched_gradients_equal_the_float64_reference(device: str) -> None:
    """``torch.autograd.grad(..., is_grads_batched=True)`` hands the op's backward a legacy-vmap BatchedTensor (no
    storage for a Triton kernel to read): the op path (the kernels on a GPU, their PyTorch formula on a CPU) gives
    the float64 reference's gradients for the input and both coefficient sets."""
    if device == "cuda":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(0)
    module = GroupRational(8, groups=2, implementation="triton").to(device)
    with torch.no_grad():
        module.weight_numerator.copy_(0.5 * torch.randn(module.weight_numerator.shape, generator=generator))
        module.weight_denominator.copy_(torch.randn(module.weight_denominator.shape, generator=generator))
    x = torch.randn(3, 8, generator=generator).to(device).requires_grad_()
    cotangents = torch.randn(5, 3, 8, generator=generator).to(device)
    assert module.resolved_implementation(x) == "triton"
    coefficients = [module.weight_numerator, module.weight_denominator]
    batched = torch.autograd.grad(module(x), [x, *coefficients], cotangents, is_grads_batched=True)
    expected = reference_gradients(x, *coefficients, cotangents)
    for name, got, want in zip(("x", "numerator", "denominator"), batched, expected, strict=True):
        assert got.device.type == device and got.shape == want.shape, name
        np.testing.assert_allclose(got.double().cpu().numpy(), want.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
