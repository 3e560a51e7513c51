"""Monitors under Lightning's FSDP strategy (Lightning allows FSDP only on CUDA: skipped on CPU machines).

Run on a GPU machine with ``pytest tests/test_capture_fsdp.py`` (scripts/gpu_capture_checks.sh does).
"""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from _toy import Block, BlockNet, ToyTask, quiet_trainer, toy_loader
from lightning_act.callbacks import ActivationStats, DimensionalCollapse, MassiveActivations
from lightning_act.capture import clean_name




def test_wrapper_parts_are_left_out_of_names():
    assert clean_name("net._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.fc") == "net.blocks.0.fc"
    assert clean_name("net._orig_mod") == "net"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP strategy needs CUDA")


def fit(strategy):
    from lightning.pytorch.strategies import FSDPStrategy

    pl.seed_everything(0)
    monitors = [
        ActivationStats(modules=["@blocks", "@activations"], every_n_steps=2),
        MassiveActivations(every_n_steps=2),
        DimensionalCollapse(every_n_steps=2),
    ]
    kwargs = dict(accelerator="cuda", devices=1)
    if strategy == "fsdp":
        kwargs["strategy"] = FSDPStrategy(auto_wrap_policy={Block})
    quiet_trainer(max_steps=4, callbacks=monitors, **kwargs).fit(ToyTask(BlockNet()), toy_loader())
    return monitors


@needs_cuda
def test_fsdp_statistics_equal_the_plain_run():
    plain = fit("auto")
    with pytest.warns(UserWarning, match="sharded"):
        sharded = fit("fsdp")
    for a, b in zip(plain, sharded):
        keys = [k for k in a.history if "params/r90" not in k]
        assert keys and all(k in b.history for k in keys), sorted(b.history)[:5]
        assert not any("_fsdp_wrapped_module" in k for k in b.history)
        for key in keys:
            np.testing.assert_allclose(b.history[key].values, a.history[key].values, rtol=1e-4, atol=1e-5, err_msg=key)
