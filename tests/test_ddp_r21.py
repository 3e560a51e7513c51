"""Monitors on 2 CPU processes (gloo) when the ranks do not do the same thing, and under FSDP2 / tensor parallelism.

Each test reads its case's fit, a scenario of ddp_scenarios.py (``ddp_case`` is ``r21_ddp``, ``model_parallel_case``
``model_parallel``); the ranks record their own activations, and the test checks the monitors' values against float64
numpy on the union.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

#: Calls of the looped ``block`` at each step, on rank 0 and rank 1 (a data-dependent number of iterations).
BLOCK_CALLS = {0: (2, 0), 1: (1, 2)}
MISMATCHES = ("every_n_steps", "modules", "threshold", "monitors")


def erank(rows):
    """Effective rank of the centred rows (Roy & Vetterli: exp of the entropy of the normalised singular values)."""
    centred = rows - rows.mean(0)
    singular = np.linalg.svd(centred, compute_uv=False)
    p = singular[singular > 1e-12 * singular[0]]
    p = p / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.ddp_scenario("r21_ddp")
def test_collapse_decides_widths_and_sketches_alike_on_every_rank_and_rank_dependent_monitors_are_one_line(
    ddp_scenario
):
    result = ddp_scenario.json()
    first, second = result["ranks"]
    # Before: rank 1 crashed on the wide tap `block` rank 0 alone ran at step 0 (its sketch read as a full
    # covariance); at step 1 rank 0 decided "4 rows x 2 ranks <= k + 1, exact" for the 12 rows of the union, rank 1
    # the opposite; the shared `act` ran first at width 32 on rank 0 and 16 on rank 1: sums of other sizes, gloo abort.
    assert first["history"] == second["history"]
    history = first["history"]
    seen = [{name: {int(step): [np.array(a) for a in arrays] for step, arrays in steps.items()}
             for name, steps in rank["seen"].items()} for rank in (first, second)]
    union = np.concatenate(seen[0]["block"][0])  # rank 1 did not run it at step 0
    assert union.shape == (8, 16)
    assert history["collapse/block/erank"]["steps"] == [0]  # step 1: 4 + 8 rows > k + 1 = 9 rows: not exact
    assert history["collapse/block/erank"]["values"][0] == pytest.approx(erank(union), rel=1e-5)
    # `act`: the width of rank 0's first call (32). Step 0 is unknown: rank 1 ran it first at 16 and kept none of its
    # rows of width 32 (before: step 0 logged the erank of rank 0's rows alone, unmarked); from step 1 both ranks'.
    assert history["collapse/act/erank"]["steps"] == [1]
    rows = [a for rank in seen for a in rank["act"][1] if a.shape[1] == 32]
    assert len(rows) == 2 and history["collapse/act/erank"]["values"][0] == pytest.approx(
        erank(np.concatenate(rows)), rel=1e-5)

    # A monitor built differently on each rank: one line on every rank, before any collective could mismatch (before:
    # a gloo abort for every_n_steps and the monitor count, silently mixed values for modules and the threshold).
    end = "build the callbacks the same way on every rank (not from a rank-dependent condition, config or environment)"
    expected = {
        "every_n_steps": f"ActivationSparsity: rank 1 has every_n_steps=2, rank 0 has every_n_steps=1; {end}",
        "modules": f"ActivationSparsity: rank 1 has modules=['net.3'], rank 0 has modules=['net.1']; {end}",
        "threshold": f"ActivationSparsity: rank 1 has threshold=0.5, rank 0 has threshold=0.0; {end}",
        "monitors": "rank 1 has the monitors ['ActivationSparsity', 'ActivationStats'], rank 0 has "
                    "['ActivationSparsity']; build the callbacks the same way on every rank",
    }
    assert first["errors"] == second["errors"] == expected
    # A monitor on rank 0 only: rank 1 never reaches the fingerprint exchange; rank 0 names it after the timeout (3 s
    # here, 60 s by default). Before: rank 0 waited in a collective rank 1 never joined, a hang until the process
    # group's timeout (30 min).
    assert result["no_monitor_on_rank_1"] == (
        "rank 1 has no lightning_act monitors or did not start the fit within 3 s; build the callbacks the same way "
        "on every rank"
    )


@pytest.mark.ddp_scenario("model_parallel")
def test_fsdp2_checkpoints_plain_snapshots_and_tensor_parallelism_leaves_the_monitors_idle(tmp_path, ddp_scenario):
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from _toy import BlockNet, ToyTask, toy_dataset

    result = ddp_scenario.json()
    # FSDP2: the trajectory's first snapshot is the initial weights, whole, as a plain tensor. Before: DTensors (with
    # a DeviceMesh) in the checkpoint, which a one-device fit could not load ("Callable map_location not supported").
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith("DimensionalCollapse")]
    snapshots = state["trajectory"]["snapshots"]
    assert all(type(s) is torch.Tensor for s in snapshots) and len(snapshots) == 3
    initial = np.concatenate([np.array(result["initial"][name]).reshape(-1) for name in result["followed"]])
    np.testing.assert_array_equal(snapshots[0].numpy(), initial)
    pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path).fit(
        ToyTask(BlockNet()), DataLoader(toy_dataset(32), batch_size=8), ckpt_path=result["checkpoint"])
    # Tensor parallelism: both ranks hold the same batch. Before: every sum counted it twice (act count 1024 for the
    # 8 x 4 x 16 = 512 entries of the step).
    assert result["tp_histories"] == [[], [], []]
    assert result["tp_param_names"] == []
    assert sorted(result["tp_warnings"]) == sorted(
        f"{name}: activation monitors do not support tensor parallelism (its ranks hold the same batch, and a layer's "
        "features may be split across them); use tensor_parallel_size=1 (FSDP2 or DDP) to monitor activations, so "
        "this monitor stays idle" for name in ("MassiveActivations", "ActivationStats", "DimensionalCollapse")
    )


# ---------------------------------------------------------------------------------------------------- the scripts
def ddp_case(out):
    """Both ranks: the collapse fit, then one fit per rank-dependent monitor setting; rank 0 writes both ranks'."""
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.callbacks import ActivationSparsity, ActivationStats, DimensionalCollapse
    from lightning_act.errors import LightningActError

    class Task(pl.LightningModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Loop(Task):
        """A wide `block` looped BLOCK_CALLS times and a shared `act` run at widths 32 and 16, in an order per rank."""

        def __init__(self):
            super().__init__()
            self.inp, self.block, self.up = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 32)
            self.head = nn.Linear(32, 2)
            self.act = nn.Tanh()
            self.seen = {"block": {}, "act": {}}
            for name in self.seen:
                getattr(self, name).register_forward_hook(self.recorder(name))

        def recorder(self, name):
            def hook(module, inputs, output):
                self.seen[name].setdefault(self.trainer.global_step, []).append(output.detach().double().tolist())
            return hook

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.inp(x)
            for _ in range(BLOCK_CALLS[self.global_step][self.global_rank]):
                h = torch.tanh(self.block(h))
            if self.global_rank == 0:
                a, b = self.act(self.up(h)), self.act(h)
            else:
                b, a = self.act(h), self.act(self.up(h))
            return F.cross_entropy(self.head(a + torch.cat([b, b], 1)), y)

    class Mlp(Task):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

    def fit(task, callbacks, strategy="ddp"):
        rank = int(os.environ.get("LOCAL_RANK", 0))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False, callbacks=callbacks)
        trainer.fit(task, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4))

    pl.seed_everything(0, verbose=False)
    collapse = DimensionalCollapse(modules=["block", "act"], every_n_steps=1, max_rows=4, wide_dim=8, param_patterns=[])
    loop = Loop()
    fit(loop, [collapse], strategy="ddp_find_unused_parameters_true")
    rank = dist.get_rank()
    errors = {}
    for kind in MISMATCHES:
        settings = {"modules": ["net.1", "net.3"], "every_n_steps": 1}
        if kind == "every_n_steps":
            settings["every_n_steps"] = 1 + rank
        elif kind == "modules":
            settings["modules"] = ["net.1"] if rank == 0 else ["net.3"]
        elif kind == "threshold":
            settings["threshold"] = 0.5 * rank
        monitors = [ActivationSparsity(**settings)]
        if kind == "monitors" and rank == 1:
            monitors.append(ActivationStats(modules=["net.1"], every_n_steps=1))
        try:
            fit(Mlp(), monitors)
            errors[kind] = None
        except LightningActError as error:
            errors[kind] = str(error)
    mine = {"history": {k: {"steps": list(s.steps), "values": list(s.values)} for k, s in collapse.history.items()},
            "seen": loop.seen, "errors": errors}
    ranks = [None, None]
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": ranks}))

    # Last (rank 1 trains on, blocked in DDP's gradient reduction until rank 0 exits): a monitor on rank 0 only.
    import lightning_act.callbacks.base as base

    base.FINGERPRINT_TIMEOUT_S = 3.0
    try:
        fit(Mlp(), [ActivationSparsity(modules=["net.1"], every_n_steps=1)] if rank == 0 else [])
    except LightningActError as error:
        Path(out).write_text(json.dumps({"ranks": ranks, "no_monitor_on_rank_1": str(error)}))
        os._exit(0)  # rank 1 waits in a collective this rank never joins: its gloo connection closes with this process


def model_parallel_case(out):
    """FSDP2 (fully_shard, 2 data-parallel ranks) with a full checkpoint, then tensor parallelism (2 ranks)."""
    import tempfile

    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from _toy import BlockNet, ToyTask, toy_dataset
    from lightning_act.callbacks import ActivationStats, DimensionalCollapse, MassiveActivations

    class Sharded(ToyTask):
        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    class TensorParallel(ToyTask):
        def configure_model(self):
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            for block in self.net.blocks:
                plan = {"fc": ColwiseParallel(output_layouts=Replicate())}
                parallelize_module(block, self.device_mesh["tensor_parallel"], plan)

    def trainer(strategy, callbacks, root):
        return pl.Trainer(max_steps=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=2, default_root_dir=root,
                          strategy=strategy)

    pl.seed_everything(0, verbose=False)
    task = Sharded(BlockNet())
    followed = ["net.blocks.0.fc.weight", "net.blocks.1.fc.weight"]
    initial = {name: p.detach().double().tolist() for name, p in task.named_parameters() if name in followed}
    root = tempfile.mkdtemp()
    checkpoints = ModelCheckpoint(dirpath=Path(out).parent / "checkpoints", every_n_train_steps=2)
    collapse = DimensionalCollapse(modules=["@blocks"], every_n_steps=1, param_patterns=["*.fc.weight"])
    trainer(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
            [checkpoints, collapse], root).fit(task, DataLoader(toy_dataset(32), batch_size=4))

    monitors = [MassiveActivations(modules=["@blocks"], every_n_steps=1),
                ActivationStats(modules=["@blocks"], every_n_steps=1),
                DimensionalCollapse(modules=["@blocks"], every_n_steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), list(monitors), root).fit(
            TensorParallel(BlockNet()), DataLoader(toy_dataset(64), batch_size=8))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({
            "checkpoint": str(Path(out).parent / "checkpoints" / "epoch=0-step=2.ckpt"),
            "followed": followed, "initial": initial,
            "tp_histories": [sorted(m.history) for m in monitors], "tp_param_names": monitors[2].param_names,
            "tp_warnings": [str(w.message) for w in caught if "tensor parallelism" in str(w.message)],
        }))

