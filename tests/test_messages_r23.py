"""Round 23: messages that name the fix a user needs."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons


class WithCritic(ToyTask):
    """A GAN-style module: ``critic`` trains in the step but the module's ``forward`` never runs it."""

    def __init__(self) -> None:
        super().__init__(BlockNet())
        self.critic = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        return F.cross_entropy(logits, batch[1]) + self.critic(logits).mean()


def test_a_tracked_module_the_forward_never_runs_is_told_with_modules_and_forward_fn():
    """Before: the warning suggested a non-tensor output (a dict, a PackedSequence) as the cause, not that the
    model's ``forward`` does not run the module (a GAN's discriminator, a BYOL predictor)."""
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=2,
                            callbacks=[SensitiveNeurons(modules=["critic.2:input"], every_n_steps=1, num_samples=8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(WithCritic(), ToyData())
    told = [str(w.message) for w in caught if "gave no activation in the tracking pass" in str(w.message)]
    assert len(told) == 1 and "critic.2-input" in told[0]
    assert "pass modules= with one it runs, or forward_fn= to run it" in told[0]
