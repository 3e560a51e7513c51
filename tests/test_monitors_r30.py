"""Round 30: the r90 trajectory and the ``@penultimate`` head of a model with a DQN target network, the fit-start read of a validation stream, and
the lines of unbatched calls, of a tap too few rows reached under DDP, of unmatched ``param_patterns`` and of a complex
tap."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from _toy import numpy_erank, quiet_trainer
from lightning_act.callbacks import DimensionalCollapse, MassiveActivations, SensitiveNeurons
from lightning_act.capture.selection import copies_only_optimizers_tell


def q_network() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


class DQN(pl.LightningModule):
    """A Q-network and its target, a copy in no optimizer that keeps ``requires_grad=True`` and follows the net by
    Polyak updates (Lightning's DQN example, CleanRL)."""

    def __init__(self, target: str = "deepcopy", manual: bool = False, optimizer: bool = True) -> None:
        super().__init__()
        self.net = q_network()
        if target == "deepcopy":
            self.target = copy.deepcopy(self.net)
        else:  # Lightning's reinforce_learn_Qnet.py: a second instance loaded from the net
            self.target = q_network()
            self.target.load_state_dict(self.net.state_dict())
        self.automatic_optimization = not manual
        self.with_optimizer = optimizer
        self.states = torch.Generator().manual_seed(0)
        self.weights: list[np.ndarray] = []  # the net's weights after each step (and at fit start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        s, s2 = torch.randn(8, 4, generator=self.states), torch.randn(8, 4, generator=self.states)
        with torch.no_grad():
            y = 1.0 + 0.9 * self.target(s2).max(1).values
        loss = ((self.net(s).max(1).values - y) ** 2).mean()
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def net_weights(self) -> np.ndarray:
        return np.concatenate([self.net[i].weight.detach().double().numpy().ravel() for i in (0, 2, 4)])

    def on_fit_start(self) -> None:
        self.weights.append(self.net_weights())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.weights.append(self.net_weights())
        with torch.no_grad():  # soft (Polyak) target update
            for p, tp in zip(self.net.parameters(), self.target.parameters()):
                tp.mul_(0.9).add_(p, alpha=0.1)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        return torch.optim.SGD(self.net.parameters(), lr=0.05) if self.with_optimizer else None


def numpy_r90(snapshots: list[np.ndarray], fraction: float = 0.9) -> float:
    """r90 of a weight trajectory (Xu 2026), by numpy: PCA variances of the snapshots centred across them."""
    x = np.stack(snapshots)
    variances = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(np.argmax(np.cumsum(variances) / variances.sum() >= fraction - 1e-12) + 1)


def fit_dqn(task: DQN, steps: int = 4) -> DimensionalCollapse:
    monitor = DimensionalCollapse(modules=[], every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=steps, callbacks=[monitor]).fit(
            task, DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=1))
    return monitor


@pytest.mark.parametrize("target", ["deepcopy", "second instance"])
def test_the_trajectory_leaves_out_a_target_network_in_no_optimizer(target: str) -> None:
    # The docs: the default leaves out the copies of the model that move without being trained. Before: the target's
    # weights were followed too (trained was read from requires_grad alone).
    torch.manual_seed(0)
    task = DQN(target)
    monitor = fit_dqn(task)
    assert monitor.param_names == ["net.0.weight", "net.2.weight", "net.4.weight"]
    logged = monitor.history["collapse/params/r90"].values
    assert list(logged) == [numpy_r90(task.weights[: k + 2]) for k in range(len(logged))]
    np.testing.assert_allclose(monitor._snapshots[-1].numpy(), task.weights[-1], rtol=0, atol=1e-7)


def test_under_manual_optimization_the_optimizer_tells_the_target_too() -> None:
    torch.manual_seed(0)
    assert fit_dqn(DQN(manual=True)).param_names == ["net.0.weight", "net.2.weight", "net.4.weight"]


def test_without_an_optimizer_at_fit_start_requires_grad_still_decides() -> None:
    # configure_optimizers returned None (Lightning's mock optimizer holds none of the model's parameters): the
    # parameters that require grad are taken to train, as before round 30; the fit runs.
    torch.manual_seed(0)
    names = fit_dqn(DQN(optimizer=False), steps=2).param_names
    assert names == [f"{part}.{i}.weight" for part in ("net", "target") for i in (0, 2, 4)]


class EvaluationEpisodes(IterableDataset):
    """An RL evaluation stream: episodes played in an environment (a numpy generator the task holds) that carries on
    between passes."""

    def __init__(self, task: pl.LightningModule) -> None:
        self.task = task

    def __iter__(self):
        for _ in range(2):
            yield torch.as_tensor(self.task.environment.normal(size=(6, 4)), dtype=torch.float32)


class Policy(pl.LightningModule):
    def __init__(self, stream: bool) -> None:
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        self.environment = np.random.default_rng(7)
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pi(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.pi(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.pi(batch)

    def val_dataloader(self) -> DataLoader:
        if self.stream:
            return DataLoader(EvaluationEpisodes(self), batch_size=None)
        return DataLoader(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), batch_size=6)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("monitor, fix", [
    (lambda: SensitiveNeurons(every_n_steps=1, num_samples=4, eigenscore_passes=0), "tracking_inputs="),
    (lambda: MassiveActivations(modules=["pi.3"], probe="val", every_n_steps=1), "probe=None"),
])
def test_reading_a_validation_stream_at_fit_start_is_said_once(monitor: Any, fix: str, stream: bool) -> None:
    # The read cannot be rewound: the environment moved on, so every validation of the fit sees other episodes than
    # without the monitor. Before: nothing was said.
    task = Policy(stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, limit_val_batches=None, callbacks=[monitor()]).fit(
            task, DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))
    said = [str(w.message) for w in caught if "IterableDataset" in str(w.message)]
    if stream:
        assert len(said) == 1 and "cannot be rewound" in said[0] and fix in said[0]
    else:
        assert said == []


class Agent(pl.LightningModule):
    """Acts on one unbatched observation, then learns from a batch (the usual RL step)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        self.states = torch.Generator().manual_seed(0)
        self.batched: dict[int, list[np.ndarray]] = {}
        self.net[3].register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if output.dim() == 2:
            self.batched.setdefault(self.global_step, []).append(output.detach().double().numpy())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            action = int(self.net(torch.randn(4, generator=self.states)).argmax())
        return (self.net(torch.randn(6, 4, generator=self.states))[:, action] ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unbatched_calls_are_said_left_out_and_the_batched_ones_measured() -> None:
    # Before: "... outputs a 1-d tensor ...; nothing is logged for it (tap e.g. '@blocks')", and it was logged.
    torch.manual_seed(0)
    task = Agent()
    monitors = [MassiveActivations(every_n_steps=1, modules=["net.3"]),
                DimensionalCollapse(every_n_steps=1, modules=["net.3"], param_patterns=[])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=monitors).fit(task, DataLoader(TensorDataset(torch.zeros(4, 1))))
    for monitor in monitors:
        said = [str(w.message) for w in caught if str(w.message).startswith(f"{type(monitor).__name__}: net.3 ")]
        assert len(said) == 1 and "1-d tensor" in said[0]
        assert "left out" in said[0] and "calls with a batch axis are measured" in said[0]
        assert "nothing is logged for it (" not in said[0]
    rows = [np.concatenate(task.batched[step]) for step in range(2)]
    np.testing.assert_allclose(monitors[0].history["massive/net.3/top1"].values,
                               [np.abs(r).max() for r in rows], rtol=1e-6)
    spectra = [np.linalg.eigvalsh(np.cov(r.T)) for r in rows]
    np.testing.assert_allclose(monitors[1].history["collapse/net.3/pr"].values,
                               [lam.sum() ** 2 / (lam ** 2).sum() for lam in spectra], rtol=1e-6)


def test_under_ddp_too_few_rows_is_said_with_the_count_of_all_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # An expert of a mixture of experts got 0 rows on this rank and 1 on the other: the reduced count (1) decided.
    # Before: "gave 0 rows at step 0 on this rank ... (train with batches of 2 or more)".
    from lightning_act.callbacks import collapse

    monkeypatch.setattr(collapse, "distributed_world_size", lambda: 2)
    monitor = DimensionalCollapse(modules=["experts.3"], param_patterns=[])
    monitor.taps = [type("Tap", (), {"name": "experts.3"})()]
    monitor._step_rows = {0: 0}
    with pytest.warns(UserWarning) as caught:
        monitor._warn_unmeasured(0, {0}, {(0, "_measured"): 0.0, (0, collapse.STEP_ROWS): 1.0})
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith("DimensionalCollapse: experts.3 gave 1 row at step 0 over 2 ranks")
    assert "on this rank" not in said[0] and "routed to it" in said[0]


def test_the_row_count_behind_the_decision_is_not_logged() -> None:
    # summarize hands the reduced row count to the warning as an unlogged "_rows" (wide taps: at every step).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    task = SmallTask(net)
    monitor = DimensionalCollapse(modules=["net.1"], every_n_steps=1, param_patterns=[], wide_dim=8, max_rows=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(task, small_loader())
    assert "collapse/net.1/erank" in monitor.history
    assert not any(key.rsplit("/", 1)[1].startswith("_") for key in monitor.history)


class SmallTask(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def small_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)),
                      batch_size=4)


class MatrixFactorisation(pl.LightningModule):
    """Embeddings only: no block and no Linear head, so DimensionalCollapse's default modules match nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(50, 4), nn.Embedding(30, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.user(x[:, 0]) * self.item(x[:, 1])).sum(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def ratings() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 50, (16,), generator=g), torch.randint(0, 30, (16,), generator=g)], 1)
    return DataLoader(TensorDataset(x, torch.randn(16, generator=g)), batch_size=8)


def test_param_patterns_matching_nothing_are_not_said_to_be_logged_before_their_error() -> None:
    # Before: a warning that it "logs only its weight trajectory's params/r90", then the error that they match nothing
    # (checked at fit start: a later callback's setup may add what they name, test_review_r30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception, match=r"param_patterns=\['no_such\*'\] matched no parameter"):
            quiet_trainer(max_steps=1, callbacks=[DimensionalCollapse(param_patterns=["no_such*"])]).fit(
                MatrixFactorisation(), ratings())
    said = [str(w.message) for w in caught if str(w.message).startswith("DimensionalCollapse")]
    assert len(said) == 1 and "so it taps no activation;" in said[0] and "r90" not in said[0]


def test_default_modules_matching_nothing_name_the_trajectory_key() -> None:
    monitor = DimensionalCollapse(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(MatrixFactorisation(), ratings())
    said = [str(w.message) for w in caught if "match nothing" in str(w.message)]
    assert len(said) == 1 and "logs only its weight trajectory's collapse/params/r90;" in said[0]
    assert "collapse/params/r90" in monitor.history


class Spectrogram(nn.Module):
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.stft(wave, 16, 4, window=torch.hann_window(16), return_complex=True)  # (B, 9, T) complex64


class MaskNet(pl.LightningModule):
    """A mask-based enhancement model with an STFT front-end."""

    def __init__(self) -> None:
        super().__init__()
        self.stft = Spectrogram()
        self.mask = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 9))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        z = self.stft(batch[0])
        magnitude = z.abs() * torch.sigmoid(self.mask(z.abs().transpose(1, 2))).transpose(1, 2)
        return magnitude.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_complex_tap_is_named_with_its_fix() -> None:
    # Before: "produced no activation ... (its module did not run ..., or what it gives is not a floating-point
    # tensor: a dict, ...)": complex was not among the causes, nor its fix.
    monitors = [MassiveActivations(modules=["stft"], every_n_steps=1),
                DimensionalCollapse(modules=["stft"], every_n_steps=1, param_patterns=[])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=monitors).fit(
            MaskNet(), DataLoader(TensorDataset(torch.randn(4, 64)), batch_size=2))
    said = [str(w.message) for w in caught if " stft " in str(w.message)]
    assert len(said) == 2
    assert all("complex" in line and "torch.view_as_real" in line and ".abs()" in line for line in said)
    assert not any(key.startswith(("massive/stft", "collapse/stft")) for m in monitors for key in m.history)


@pytest.mark.parametrize("target", ["deepcopy", "second instance"])
def test_penultimate_of_a_dqn_is_the_q_networks_head_not_the_targets(target: str) -> None:
    # before: the target's head input (target.4-input) for both monitors; SensitiveNeurons logged nothing
    torch.manual_seed(0)
    task = DQN(target)
    head_inputs: list[np.ndarray] = []
    task.net[4].register_forward_pre_hook(
        lambda _m, args: head_inputs.append(args[0].detach().double().numpy()) if task.training else None)
    collapse = DimensionalCollapse(every_n_steps=1)
    sensitive = SensitiveNeurons(every_n_steps=1, tracking_inputs=torch.randn(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=3, callbacks=[collapse, sensitive]).fit(
            task, DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=1))
    assert [tap.name for tap in collapse.taps] == [tap.name for tap in sensitive.taps] == ["net.4-input"]
    assert "sensitive/net.4-input/count" in sensitive.history
    logged = collapse.history["collapse/net.4-input/erank"].values
    assert logged == pytest.approx([numpy_erank(rows) for rows in head_inputs], rel=1e-6)


def test_only_copies_outside_a_stack_that_all_require_grad_wait_for_the_optimizers() -> None:
    twins = nn.Module()
    twins.net, twins.target = q_network(), q_network()
    assert copies_only_optimizers_tell(twins)
    twins.target.requires_grad_(False)  # a frozen copy: requires_grad tells at setup
    assert not copies_only_optimizers_tell(twins)
    stack = nn.Module()
    stack.blocks = nn.ModuleList(q_network() for _ in range(3))  # blocks of one stack are no copies
    stack.head = nn.Linear(2, 2)
    assert not copies_only_optimizers_tell(stack)


class ComplexWeights(pl.LightningModule):
    """A layer with a complex weight (S4D's ``C``) moved by hand: its real part along one direction, its imaginary
    part along four."""

    def __init__(self) -> None:
        super().__init__()
        self.C = nn.Parameter(torch.randn(8, 4, dtype=torch.cfloat))
        self.lin, self.head = nn.Linear(8, 8), nn.Linear(8, 2)
        self.directions = torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(1))
        self.snapshots: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x) + (x.to(torch.cfloat) @ self.C).real.repeat(1, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def snapshot(self) -> None:
        self.snapshots.append(torch.view_as_real(self.C.detach()).reshape(-1).double().numpy().copy())

    def on_fit_start(self) -> None:
        self.snapshot()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = self.global_step
        with torch.no_grad():
            self.C.add_(torch.complex(torch.full((8, 4), 0.1), self.directions[k % 4] * (1 + k)))
        self.snapshot()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for n, p in self.named_parameters() if n != "C"], lr=0.0)


def test_the_trajectory_of_a_complex_weight_keeps_its_imaginary_part() -> None:
    # S: the cast to float64 dropped it (r90 of the real parts alone, 1, was logged), with torch's generic warning only
    torch.manual_seed(0)
    task = ComplexWeights()
    monitor = DimensionalCollapse(modules=["head:input"], every_n_steps=1, param_patterns=["C"], max_snapshots=16)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)),
                      batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=8, callbacks=[monitor]).fit(task, data)
    assert not [w for w in caught if "complex" in str(w.message).lower()]
    logged = monitor.history["collapse/params/r90"]
    assert logged.values[-1] == numpy_r90(task.snapshots[: logged.steps[-1] + 2]) > 1
