"""Round 22: probes and tracking sets whose rows are not one example each (graph batches, a mixture-of-experts expert),
and SeND's tracking-set fingerprint and selection. Values are checked against numpy float64 or hand-worked counts."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from _toy import ReluClassifier, quiet_trainer
from test_compat_r21 import fit
from lightning_act.callbacks import MassiveActivations, SensitiveNeurons
from lightning_act.callbacks import massive as massive_module
from lightning_act.callbacks import sensitive as sensitive_module
from lightning_act.callbacks.probe import without_sampler_padding
from lightning_act.callbacks.sensitive import _same_fingerprint, _tracking_fingerprint

# ------------------------------------------------------------------------------------------ graphs
GRAPH_SIZES = (3, 5, 2, 4, 6, 3, 2, 5, 4, 3, 6, 2, 4)  # nodes of each of 13 graphs


class Graphs(Dataset):
    """Graph i: ``GRAPH_SIZES[i]`` nodes of 5 features, a ring of edges, a label."""

    def __init__(self, count: int = len(GRAPH_SIZES), seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for nodes in GRAPH_SIZES[:count]:
            ring = torch.stack([torch.arange(nodes), (torch.arange(nodes) + 1) % nodes])
            self.items.append((torch.randn(nodes, 5, generator=generator), ring, int(nodes % 3)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.items[index]


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyG-style: node rows of every graph stacked, edges offset, a node-to-graph vector, one label per graph."""
    nodes, edges, owner, offset = [], [], [], 0
    for graph, (x, ring, _) in enumerate(items):
        nodes.append(x)
        edges.append(ring + offset)
        owner.append(torch.full((len(x),), graph))
        offset += len(x)
    return torch.cat(nodes), torch.cat(edges, 1), torch.cat(owner), torch.tensor([label for *_, label in items])


class GraphNet(pl.LightningModule):
    """Node features → ReLU(Linear) summed over in-edges → mean per graph (the head's input) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.node = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, edges: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.node(x))
        h = h + torch.zeros_like(h).index_add_(0, edges[1], h[edges[0]])
        graphs = int(owner.max()) + 1
        sizes = torch.bincount(owner, minlength=graphs)[:, None]
        pooled = torch.zeros(graphs, h.shape[1]).index_add_(0, owner, h) / sizes
        return self.head(pooled)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(*batch[:3]), batch[3])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def graph_forward(pl_module: nn.Module, batch: tuple) -> torch.Tensor:
    return pl_module(*batch[:3])


def numpy_pooled(model: GraphNet, graphs: list) -> np.ndarray:
    """The head's input of each graph in float64 numpy, graph by graph."""
    weight, bias = (p.detach().double().numpy() for p in (model.node.weight, model.node.bias))
    rows = []
    for x, ring, _ in graphs:
        h = np.maximum(x.double().numpy() @ weight.T + bias, 0.0)
        summed = h.copy()
        np.add.at(summed, ring[1].numpy(), h[ring[0].numpy()])
        rows.append(summed.mean(0))
    return np.stack(rows)


def test_a_sharded_graph_probe_keeps_whole_graphs_and_says_once_it_keeps_a_repeat(monkeypatch) -> None:
    # Before: a batch's examples were counted as its node rows, so rank 1's first batch of 4 graphs (17 nodes) was cut
    # to its first 6 node rows while its edges named nodes up to 17: the probe forward failed at fit start.
    dataset = Graphs()
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)  # graphs 1, 3, ..., 11, then 0 again
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate)
    batches = list(loader)
    monkeypatch.setattr(massive_module, "distributed_world_size", lambda: 2)
    monkeypatch.setattr(massive_module, "same_on_every_rank", lambda batches, device: False)
    probe = MassiveActivations(probe="val", forward_fn=graph_forward)
    repeat = r"rank 1's probe batch of 3 examples holds 1 the DistributedSampler repeats"
    with pytest.warns(UserWarning, match=repeat) as said:
        plan = probe._plan_probe(GraphNet(), batches, loader)
    assert sum("DistributedSampler repeats" in str(w.message) for w in said) == 1
    # both batches whole: graphs 1, 3, 5, 7 of 5+4+3+5 = 17 nodes, then graphs 9, 11 and the repeated 0: 3+2+3 = 8 nodes
    assert [(len(batch[0]), measured) for batch, measured in plan] == [(17, True), (8, True)]
    assert [int(batch[2].max()) + 1 for batch, _ in plan] == [4, 3]
    # a batch of plain tensors, whose rows are its examples, still has the repeat cut out, silently
    x = torch.arange(13.0).reshape(13, 1).repeat(1, 3)
    sampler = DistributedSampler(TensorDataset(x), num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(TensorDataset(x), batch_size=4, sampler=sampler)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*DistributedSampler repeats.*")
        plan = probe._plan_probe(GraphNet(), list(loader), loader)
    kept = torch.cat([batch[0] for batch, _ in plan])[:, 0].tolist()
    assert kept == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]  # rank 1's examples, the repeat of example 0 left out


class Buckets(Sampler):
    """Batches of the sampler's indices of sizes 2, 3 and 2 under a ``batch_size`` of 4, as a length-bucketing batch
    sampler gives."""

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        yield from (indices[:2], indices[2:5], indices[5:])

    def __len__(self) -> int:
        return 3


def test_a_sharded_probe_counts_the_rows_of_a_batch_sampler_that_fills_its_batches_as_it_likes() -> None:
    # Before: every batch was counted as batch_size=4 examples: rank 1 kept [1, 3, 5, 7], examples 9 and 11 lost.
    dataset = TensorDataset(torch.arange(13.0)[:, None])
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)  # 1, 3, ..., 11, then 0 again
    loader = DataLoader(dataset, batch_sampler=Buckets(sampler, batch_size=4))
    kept = torch.cat([batch[0] for batch in without_sampler_padding(list(loader), loader, "probe")])[:, 0]
    assert kept.tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]  # rank 1's examples, the repeat of example 0 left out


def test_send_with_forward_fn_on_graphs_tracks_num_samples_graphs(tmp_path: Path) -> None:
    # Before: num_samples counted node rows: the first batch of 4 graphs (14 nodes) "held 8 examples", 4 were tracked.
    torch.manual_seed(0)
    model = GraphNet()
    validation = Graphs(12, seed=1)
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=8, forward_fn=graph_forward, eigenscore_passes=0, window=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SensitiveNeurons.*")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
            model, DataLoader(Graphs(8, seed=2), batch_size=4, collate_fn=collate),
            DataLoader(validation, batch_size=4, collate_fn=collate),
        )
    embedding = monitor.embeddings["head-input"][-1]  # the last checkpoint: after the last update, the final weights
    np.testing.assert_allclose(embedding.numpy(), numpy_pooled(model, validation.items[:8]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ an expert's rows
class RoutedTokens(pl.LightningModule):
    """(B, T, 4) tokens → ``mix`` → an expert on the first ``routed`` of the flattened tokens → mean → head."""

    def __init__(self, routed: int, first_pass: int = 0) -> None:
        super().__init__()
        self.mix, self.expert, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.routed, self.first_pass, self.passes = routed, first_pass, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(x)
        # every forward counts: a probe's count is put back since round 28, training's moves it
        self.passes += 1
        if self.training or self.passes > self.first_pass:  # an expert unrouted in the first passes
            flat = h.reshape(-1, 4)
            routed = flat[: self.routed] + self.expert(flat[: self.routed])
            h = torch.cat([routed, flat[self.routed :]]).reshape(h.shape)
        return self.head(h.mean(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("first_pass", [0, 3], ids=["routed-at-first", "routed-from-the-third-pass"])
def test_an_expert_given_rows_that_are_not_examples_is_left_out_with_one_warning(first_pass: int) -> None:
    # Before: 4 tracking examples of 3 tokens (12) gave the expert 5 rows, tracked as 5 examples at every checkpoint
    # (the count held), v_mean logged, no warning; an expert first routed later was tracked from then on alike.
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    monitor = SensitiveNeurons(modules=["expert", "head:input"], every_n_steps=1, eigenscore_passes=0, window=2,
                               tracking_inputs=torch.randn(4, 3, 4, generator=g))
    with pytest.warns(UserWarning, match=r"expert gives 5 rows for a tracking batch of 4 examples") as said:
        quiet_trainer(max_steps=5, callbacks=[monitor]).fit(RoutedTokens(routed=5, first_pass=first_pass),
                                                            DataLoader(data, batch_size=4))
    assert sum("expert gives 5 rows" in str(w.message) for w in said) == 1
    assert "expert" not in monitor.embeddings
    assert not [key for key in monitor.history if key.startswith("sensitive/expert/v_")]
    assert len(monitor.history["sensitive/head-input/v_mean"].values) == 3  # 5 checkpoints, a window of 3


def numpy_head_inputs(model: RoutedTokens, batches: list[torch.Tensor]) -> np.ndarray:
    """The head's input of each example in float64 numpy, batch by batch (each batch routes its own first tokens)."""
    mix_w, mix_b, expert_w, expert_b = (
        p.detach().double().numpy() for p in (model.mix.weight, model.mix.bias, model.expert.weight, model.expert.bias)
    )
    rows = []
    for x in batches:
        flat = (x.double().numpy() @ mix_w.T + mix_b).reshape(-1, 4)
        flat[: model.routed] += flat[: model.routed] @ expert_w.T + expert_b
        rows.append(flat.reshape(x.shape).mean(1))
    return np.concatenate(rows)


@pytest.mark.parametrize("returns", ["logits", "a-tuple"])
def test_send_with_forward_fn_tracks_the_head_when_an_expert_is_tapped_first(returns: str) -> None:
    # Before: the first tap's rows decided "graph batch": the expert's 2 routed rows of each (4, 3, 4) batch were taken
    # for its examples, 4 batches (16 examples) tracked as 8, the expert tracked and head-input left out.
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 4, generator=g), torch.randint(0, 3, (16,), generator=g))

    def forward(pl_module: nn.Module, batch: list[torch.Tensor]) -> Any:
        logits = pl_module(batch[0])
        return logits if returns == "logits" else (logits, None)  # no tensor: the labels' length tells the examples

    monitor = SensitiveNeurons(modules=["expert", "head:input"], every_n_steps=1, eigenscore_passes=0, window=2,
                               num_samples=8, forward_fn=forward)
    torch.manual_seed(0)
    model = RoutedTokens(routed=2)
    with pytest.warns(UserWarning, match=r"expert gives 2 rows for a tracking batch of 4 examples") as said:
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
            model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4)
        )
    assert not [w for w in said if "head-input gives" in str(w.message)]
    assert "expert" not in monitor.embeddings
    assert [len(batch[0]) for batch in monitor._batches] == [4, 4]  # the first 8 examples
    embedding = monitor.embeddings["head-input"][-1]  # the last checkpoint: after the last update, the final weights
    expected = numpy_head_inputs(model, [data.tensors[0][:4], data.tensors[0][4:8]])
    np.testing.assert_allclose(embedding.numpy(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the fingerprint
def test_the_fingerprint_tells_the_same_examples_in_another_order() -> None:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    permuted = x[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    flat = x.double().numpy().reshape(-1)
    expected = [flat.size, flat.sum(), (flat**2).sum(), (np.arange(1, flat.size + 1) * flat).sum()]
    np.testing.assert_allclose(_tracking_fingerprint(list(x.split(5))), expected, rtol=1e-12)
    assert _same_fingerprint(_tracking_fingerprint([x]), _tracking_fingerprint(list(x.split(5))))  # other batches
    assert not _same_fingerprint(_tracking_fingerprint([x]), _tracking_fingerprint([permuted]))
    # a checkpoint of round 21 holds count, sum and sum of squares alone: compared on those
    assert _same_fingerprint(expected[:3], _tracking_fingerprint([permuted]))
    assert not _same_fingerprint(expected[:3], _tracking_fingerprint([x + 1]))


def test_the_fingerprint_of_the_same_ordered_examples_does_not_depend_on_their_batches(monkeypatch) -> None:
    # Before: positions ran over x1, y1, x2, y2, ...: the same 8 (x, y) examples in one batch of 8 instead of two of
    # 4 gave another weighted sum (2206.86 vs 1761.98), a "tracking set differs" warning and restarted windows.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
    flat_x, flat_y = x.double().numpy().reshape(-1), y.double().numpy()
    expected = [
        flat_x.size + flat_y.size, flat_x.sum() + flat_y.sum(), (flat_x**2).sum() + (flat_y**2).sum(),
        (np.arange(1, flat_x.size + 1) * flat_x).sum() + (np.arange(1, flat_y.size + 1) * flat_y).sum(),
    ]
    monkeypatch.setattr(sensitive_module, "_FINGERPRINT_CHUNK", 5, raising=False)  # chunks across examples
    for batching in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])], [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]):
        np.testing.assert_allclose(_tracking_fingerprint(batching), expected, rtol=1e-12)
    # the same examples in another order still differ
    order = [1, 0, 2, 3, 4, 5, 6, 7]
    assert not _same_fingerprint(expected, _tracking_fingerprint([(x[order], y[order])]))


def test_send_resumed_with_its_tracking_set_reordered_restarts_its_window(tmp_path: Path) -> None:
    # Before: the fingerprint (count, sum, sum of squares) ignored order: the windows went on, V_i compared example k
    # before the resume with another example after it (v_mean ~750 times the same resume's in the original order).
    tracking = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    permuted = tracking[[3, 0, 7, 1, 6, 2, 5, 4]]

    def monitor(inputs: torch.Tensor) -> SensitiveNeurons:
        return SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=inputs, window=2,
                                eigenscore_passes=0)

    fit([monitor(tracking)], tmp_path / "part", save=True)
    resumed = monitor(permuted)
    said = fit([resumed], tmp_path / "res", ckpt=tmp_path / "part" / "sstep=4.ckpt")
    assert len([m for m in said if "tracking set differs" in m and "act1" in m]) == 1
    assert resumed.history["sensitive/act1/v_mean"].steps == [2, 3, 6, 7]  # refilled from step 4: 3 checkpoints

    # a round-21 checkpoint (no weighted sum) resumed with the same set in the same order continues its windows
    checkpoint = torch.load(tmp_path / "part" / "sstep=4.ckpt", weights_only=False)
    for state in checkpoint["callbacks"].values():
        if "tracking_fingerprint" in state:
            state["tracking_fingerprint"] = state["tracking_fingerprint"][:3]
    torch.save(checkpoint, tmp_path / "r21.ckpt")
    continued = monitor(tracking)
    said = fit([continued], tmp_path / "res21", ckpt=tmp_path / "r21.ckpt")
    assert not [m for m in said if "tracking set differs" in m]
    assert continued.history["sensitive/act1/v_mean"].steps == [2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------------------------------ a non-finite sensitivity
def test_no_set_is_selected_or_dropped_from_a_sensitivity_that_is_not_finite() -> None:
    # Before: one NaN tracking example made every V_i NaN, and top_fraction_indices still picked features 0..6 (NaN
    # sorts first): count 7 and selected 1 logged, jaccard 1.0 later, and drop=True zeroed those 7 features in training.
    tracking = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    tracking[2, 5] = math.nan
    monitor = SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=tracking, window=2, drop=True,
                               eigenscore_passes=0)
    pl.seed_everything(0, verbose=False)
    plain, dropped = ReluClassifier(), ReluClassifier()
    dropped.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
    with pytest.warns(UserWarning, match=r"act1 v_mean/v_max/count/selected are unknown at step 2"):
        quiet_trainer(max_steps=6, callbacks=[monitor]).fit(dropped, DataLoader(data, batch_size=8))
    quiet_trainer(max_steps=6).fit(plain, DataLoader(data, batch_size=8))
    assert monitor.sensitive == {}
    assert monitor.history["sensitive/act1/count"].steps == [0, 1]  # before the window was full: no set, 0
    assert monitor.history["sensitive/act1/selected"].steps == [0, 1]
    assert "sensitive/act1/jaccard" not in monitor.history
    assert monitor.history["sensitive/act1/dropping"].values == [0.0] * 6
    for name, value in plain.state_dict().items():  # nothing dropped: the training of a fit without the monitor
        torch.testing.assert_close(dropped.state_dict()[name], value, rtol=0, atol=0)


def test_a_set_selected_before_the_sensitivity_turned_non_finite_is_kept_with_its_drop() -> None:
    monitor = SensitiveNeurons(modules=["act1"], every_n_steps=1, tracking_inputs=torch.randn(4, 16), drop=True,
                               drop_checkpoints=2)
    model = ReluClassifier()
    monitor.setup(quiet_trainer(), model, "fit")
    tap = monitor.taps[0]
    finite = {"v_mean": 1.0, "v_max": 2.0, "finite": 1.0}
    first = monitor._update_selection(tap, {**finite, "indices": torch.tensor([4, 9])})
    assert (first["count"], first["selected"], first["dropping"]) == (2.0, 1.0, 1.0)
    monitor._update_selection(tap, {"v_mean": 1.0, "v_max": 2.0})  # the set's second checkpoint dropped
    stats = monitor._update_selection(
        tap, {"v_mean": math.nan, "v_max": math.nan, "indices": torch.tensor([0, 1]), "finite": 0.0}
    )
    assert monitor.sensitive["act1"].tolist() == [4, 9] and "act1" not in monitor.previous
    assert math.isnan(stats["count"]) and math.isnan(stats["selected"]) and "jaccard" not in stats
    assert stats["dropping"] == 1.0  # still the set selected from finite values
    again = monitor._update_selection(tap, {**finite, "indices": torch.tensor([9, 11])})
    assert again["jaccard"] == pytest.approx(1 / 3) and monitor.sensitive["act1"].tolist() == [9, 11]
    monitor.teardown(None, model, "fit")


class UnlabelledGraphNet(GraphNet):
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return self(*batch[:3]).pow(2).mean()


def test_send_with_forward_fn_returning_a_dict_tracks_unlabelled_graphs(tmp_path: Path) -> None:
    # Before: only an output tensor confirmed the graph tap; a dict output and no per-graph labels tracked 2 graphs
    # (14 node rows) and left head-input out as an expert's.
    torch.manual_seed(0)
    model, validation = UnlabelledGraphNet(), Graphs(12, seed=1)
    monitor = SensitiveNeurons(every_n_steps=1, num_samples=8, eigenscore_passes=0, window=2,
                               forward_fn=lambda module, batch: {"logits": module(*batch[:3])})
    unlabelled = lambda items: collate(items)[:3]  # noqa: E731
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(
        model, DataLoader(Graphs(8, seed=2), batch_size=4, collate_fn=unlabelled),
        DataLoader(validation, batch_size=4, collate_fn=unlabelled),
    )
    embedding = monitor.embeddings["head-input"][-1]
    np.testing.assert_allclose(embedding.numpy(), numpy_pooled(model, validation.items[:8]), rtol=1e-5, atol=1e-6)


def test_a_sharded_probe_counts_a_batch_sampler_subclass_by_its_own_batches() -> None:
    # Round 22's first count took batch_size for torch's BatchSampler only: a subclass was counted by node rows again
    # and its graph batches cut through their edges.
    class Subclass(BatchSampler):
        pass

    dataset = Graphs(7, seed=3)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)  # rank 1: graphs 1, 3, 5, 0 again
    loader = DataLoader(dataset, batch_sampler=Subclass(sampler, batch_size=2, drop_last=False), collate_fn=collate)
    with pytest.warns(UserWarning, match="measured whole"):  # the repeat of graph 0 cannot be cut from node rows
        kept = without_sampler_padding(list(loader), loader, "probe")
    assert [len(batch[0]) for batch in kept] == [GRAPH_SIZES[1] + GRAPH_SIZES[3], GRAPH_SIZES[5] + GRAPH_SIZES[0]]
