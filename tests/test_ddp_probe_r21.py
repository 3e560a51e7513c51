"""Probe forwards under 2 CPU processes (gloo): a validation set pre-sharded per rank (DDP), and FSDP2
(``ModelParallelStrategy`` + ``fully_shard``), whose forward every rank must run. Each test reads its fit, a scenario
of ddp_scenarios.py (``pre_sharded``, ``fsdp2``), and checks the ranks' results against numpy float64 or against an
uninterrupted run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _toy import BlockNet, ToyTask, toy_dataset

SHARD_SIZES = (6, 10)  # the validation examples of rank 0 and rank 1 (each its own dataset)


def validation_shard(rank: int) -> torch.Tensor:
    """Rank ``rank``'s own validation inputs (8 features)."""
    return torch.randn(SHARD_SIZES[rank], 8, generator=torch.Generator().manual_seed(10 + rank)) + 10 * rank


@pytest.mark.ddp_scenario("pre_sharded")
def test_a_validation_set_pre_sharded_per_rank_is_tracked_and_probed_whole(ddp_scenario):
    # Before: both monitors took the loader's own dataset for a DistributedSampler's. SensitiveNeurons cut the union to
    # this rank's dataset size (rank 0 tracked 6 examples, rank 1 10, of 16); the probe measured 7 of its 8 examples.
    ranks = [ddp_scenario.json(f"pre_sharded.{rank}.json") for rank in range(2)]
    shards = [validation_shard(rank).double().numpy() for rank in range(2)]
    # the union in the documented order: rank r's k-th example at position k·W + r, then rank 1's remaining ones
    union = np.stack([shard[k] for k in range(max(SHARD_SIZES)) for shard in shards if k < len(shard)])
    for result in ranks:
        np.testing.assert_array_equal(np.array(result["tracking"]), union.astype(np.float32))
        weight, bias = (np.array(result["final"][name], dtype=np.float64) for name in ("net.0.weight", "net.0.bias"))
        expected = np.maximum(union @ weight.T + bias, 0.0)  # net.1 (ReLU) at the last checkpoint: the final weights
        np.testing.assert_allclose(np.array(result["last_embedding"]), expected, rtol=1e-5, atol=1e-6)
        # the probe at step 0 (before its update): each rank's first batch of 4, all 8 examples
        weight, bias = (np.array(result["initial"][name], dtype=np.float64) for name in ("net.0.weight", "net.0.bias"))
        probed = np.concatenate([shard[:4] for shard in shards]) @ weight.T + bias
        assert result["massive"]["count"] == 8 * 16
        assert result["massive"]["top1"] == pytest.approx(np.abs(probed).max(), rel=1e-5)


@pytest.fixture
def fsdp2_ranks(ddp_scenario):
    return [ddp_scenario.json(f"fsdp2.{rank}.json") for rank in range(2)]


@pytest.mark.ddp_scenario("fsdp2")
def test_fsdp2_full_checkpoint_resume_with_send_dropping_equals_the_uninterrupted_run(fsdp2_ranks):
    # Before: the fit-start tracking forward left the FSDP2 root's parameters gathered (plain tensors), and Lightning's
    # restore of the full checkpoint, after on_fit_start under ModelParallelStrategy, failed ("mixed torch.Tensor and
    # DTensor"). Restored after on_fit_start, the dropped features must also be dropped again after the restore.
    straight, resumed = (fsdp2_ranks[0]["resume"][key] for key in ("straight", "resumed"))
    for name, weight in straight["weights"].items():
        np.testing.assert_array_equal(np.array(resumed["weights"][name]), np.array(weight), err_msg=name)
    assert straight["history"]["sensitive/net.blocks.0.act/dropping"]["values"][3:] == [1.0, 1.0, 1.0]
    for key, series in straight["history"].items():
        assert resumed["history"][key] == series, key


@pytest.mark.ddp_scenario("fsdp2")
def test_fsdp2_massive_probe_of_identical_batches_runs_on_every_rank_and_counts_them_once(fsdp2_ranks):
    # Before: identical probe batches ran on rank 0 alone; an FSDP2 forward all-gathers on every rank: a hang.
    x = toy_dataset(8, seed=1).tensors[0].double().numpy().reshape(8, 4, 64)
    for result in (rank["probe"] for rank in fsdp2_ranks):
        initial = {name: np.array(value, dtype=np.float64) for name, value in result["initial"].items()}
        embedded = x @ initial["net.embed.weight"].T + initial["net.embed.bias"]
        assert result["steps"] == [0, 1]
        assert result["count"] == 8 * 4 * 16  # rank 0's measurement alone, not one per rank
        assert result["top1"] == pytest.approx(np.abs(embedded).max(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- the fits
def _trainer(**kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _full_weights(module: torch.nn.Module) -> dict[str, list]:
    """Every parameter whole (an FSDP2 shard gathered: a collective), as lists."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().tolist()
            for name, p in module.named_parameters()}


def _history(monitor) -> dict[str, dict]:
    return {key: {"steps": list(s.steps), "values": list(s.values)} for key, s in monitor.history.items()}


def pre_sharded(out: Path) -> None:
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_act.callbacks import MassiveActivations, SensitiveNeurons

    pl.seed_everything(0, verbose=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    task = ToyTask(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    initial = _full_weights(task)
    sensitive = SensitiveNeurons(modules=["net.1"], every_n_steps=1, num_samples=16, window=2, eigenscore_passes=0)
    massive = MassiveActivations(modules=["net.0"], every_n_steps=1, probe="val", abs_threshold=0.0,
                                 ratio_threshold=0.0)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(rank))
    validation = validation_shard(rank)
    trainer = _trainer(strategy="ddp", max_steps=2, enable_checkpointing=False, use_distributed_sampler=False,
                       limit_val_batches=0, callbacks=[sensitive, massive])
    trainer.fit(task, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4),
                DataLoader(TensorDataset(validation, torch.zeros(len(validation), dtype=torch.long)), batch_size=4))
    result = {
        "tracking": torch.cat(sensitive._batches).tolist(),
        "last_embedding": sensitive.embeddings["net.1"][-1].tolist(),
        "initial": initial, "final": _full_weights(task),
        "massive": {stat: massive.history[f"massive/net.0/{stat}"].values[0] for stat in ("count", "top1")},
    }
    (out / f"pre_sharded.{trainer.global_rank}.json").write_text(json.dumps(result))


class FSDP2Task(ToyTask):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _fsdp2(**kwargs) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return {"strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kwargs)}


def fsdp2(out: Path) -> None:
    result = {"resume": fsdp2_resume(out), "probe": fsdp2_probe(out)}
    (out / f"fsdp2.{int(os.environ.get('LOCAL_RANK', 0))}.json").write_text(json.dumps(result))


def fsdp2_resume(out: Path) -> dict:
    """An uninterrupted SeND run and one resumed from its full checkpoint while it drops features."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lightning_act.callbacks import SensitiveNeurons

    def fit(ckpt_path: str | None) -> dict:
        pl.seed_everything(0, verbose=False)
        task = FSDP2Task(BlockNet())
        sensitive = SensitiveNeurons(modules=["*.act"], every_n_steps=1, window=2, drop=True, drop_checkpoints=3,
                                     eigenscore_passes=0, tracking_inputs=toy_dataset(8, seed=3).tensors[0])
        saver = ModelCheckpoint(dirpath=out, every_n_train_steps=4, save_top_k=-1)
        trainer = _trainer(max_steps=6, callbacks=[sensitive, saver], default_root_dir=out,
                           **_fsdp2(save_distributed_checkpoint=False))
        trainer.fit(task, DataLoader(toy_dataset(32), batch_size=4), ckpt_path=ckpt_path)
        return {"weights": _full_weights(task), "history": _history(sensitive)}

    return {"straight": fit(None), "resumed": fit(str(out / "epoch=0-step=4.ckpt"))}


def fsdp2_probe(out: Path) -> dict:
    """MassiveActivations probing the same validation batch on both ranks."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_act.callbacks import MassiveActivations

    pl.seed_everything(0, verbose=False)
    task = FSDP2Task(BlockNet())
    initial = _full_weights(task)
    massive = MassiveActivations(modules=["net.embed"], every_n_steps=1, probe="val", abs_threshold=0.0,
                                 ratio_threshold=0.0)
    trainer = _trainer(max_steps=2, callbacks=[massive], enable_checkpointing=False, default_root_dir=out,
                       use_distributed_sampler=False, limit_val_batches=0, **_fsdp2())
    trainer.fit(task, DataLoader(toy_dataset(32), batch_size=8), DataLoader(toy_dataset(8, seed=1), batch_size=8))
    count, top1 = (massive.history[f"massive/net.embed/{stat}"] for stat in ("count", "top1"))
    return {"initial": initial, "steps": list(count.steps), "count": count.values[0], "top1": top1.values[0]}

