"""DDP on 2 CPU processes: two adversarial training steps of ``SeizureForecaster``, then its test on a continuous test
stream of 4 synthetic recordings with a fixed per-window score (the log power of the window), so every rank scores
every window alike. Dumps the fit's step count and the logged test metrics.

Run by tests/test_seizure_task.py as scenario ``stan_alarms`` of ddp_scenarios.py; ``python ddp_stan_alarms.py
OUT.json`` runs it alone.
"""

import json
import sys

import torch

from _toy import quiet_trainer
from lightning_act.data.eeg import EEGSeizureDataModule
from lightning_act.tasks.seizure_forecasting import SeizureForecaster

DATA = dict(n_channels=2, sampling_rate=16.0, window_seconds=4.0, recording_minutes=60.0, n_train_recordings=1,
            n_val_recordings=1, n_test_recordings=4, batch_size=64, seed=3)
MODEL = dict(in_chans=2, window_samples=64, segment_samples=16, embed_dim=8, depth=1, num_heads=2, n_domains=2)


class LogPower(SeizureForecaster):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).mean(dim=(1, 2)).log()


def main(out_path: str) -> None:
    # two training recordings, two domains: each step runs the critic's backward and the encoder's
    fitted = quiet_trainer(devices=2, strategy="ddp", max_steps=2)
    fitted.fit(SeizureForecaster(**MODEL), datamodule=EEGSeizureDataModule(**{**DATA, "n_train_recordings": 2}))
    trainer = quiet_trainer(devices=2, strategy="ddp")
    metrics = trainer.test(LogPower(**MODEL), datamodule=EEGSeizureDataModule(**DATA), verbose=False)[0]
    if trainer.is_global_zero:
        with open(out_path, "w") as handle:
            json.dump({"fit_steps": fitted.global_step, **{key: float(value) for key, value in metrics.items()}}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
