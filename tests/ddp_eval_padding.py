"""DDP on 2 CPU processes: validation and test metrics over odd example counts, which Lightning's
``DistributedSampler`` pads with the first examples again (5 spectra: rank 1 gets examples 1, 3 and 0 again; 7 digits:
rank 1 gets 1, 3, 5 and 0 again).

* ``SpectralTargetDetection`` (lr 0: its initial weights) fit for one step with the 5 spectra as validation set (batches
  of 2), then tested on them: ``val/*`` and ``test/*``.
* ``DopamineFoundation`` (a ReLU MLP, ``ClassificationTask``) tested on 7 inputs of 3 classes (batches of 2):
  ``test/acc``, ``test/loss``.
* ``DopamineSpecialisation(method="dopamine")`` on that foundation, tested on the same 7 inputs with a CSV logger:
  ``test/gate_active_fraction`` and the ``dopamine_firing.pt`` rank 0 wrote.
* ``SeizureForecaster`` scoring a window by its log power (``ddp_stan_alarms.LogPower``), validated and tested on 7
  windows (batches of 2): ``val/loss``, ``val/auroc``, ``test/loss``, ``test/auroc``.
* ``CausalLanguageModel`` validated on 5 token sequences (batches of 2): ``val/loss``, ``val/bits_per_token``.

Dumps the logged metrics and the firing tensor; tests/test_ddp.py compares them with numpy over the whole sets.
Run as scenario ``eval_padding`` of ddp_scenarios.py, or alone as ``python ddp_eval_padding.py OUT.json`` (the
foundation checkpoint goes next to ``OUT``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from _toy import quiet_trainer

SPECTRA = torch.tensor([[0.3, -0.2, 0.1, 0.5], [1.0, 0.4, -0.3, 0.2], [-0.5, 0.9, 0.2, -0.1],
                        [0.2, 0.1, 0.8, -0.6], [-0.9, -0.4, 0.3, 0.7]])
SPECTRA_LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])  # example 0, the one the sampler repeats, is a positive
DIGITS = torch.randn(7, 4, 4, generator=torch.Generator().manual_seed(5))
DIGIT_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 1])
WINDOWS = torch.randn(7, 2, 64, generator=torch.Generator().manual_seed(6)) * torch.linspace(0.5, 2.0, 7)[:, None, None]
WINDOW_LABELS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
TOKENS = torch.randint(0, 7, (5, 7), generator=torch.Generator().manual_seed(7))  # inputs [:, :-1], targets [:, 1:]


def spectral_model() -> pl.LightningModule:
    from lightning_act.tasks.spectral_detection import SpectralTargetDetection

    pl.seed_everything(0, verbose=False)
    return SpectralTargetDetection(in_bands=4, hidden_sizes=[8], dropout=0.0, pos_weight=1.0, lr=0.0, weight_decay=0.0)


def foundation() -> pl.LightningModule:
    from lightning_act.tasks.dopamine import DopamineFoundation

    pl.seed_everything(1, verbose=False)
    return DopamineFoundation(image_size=4, hidden_sizes=[6], num_classes=3, activation="relu")


def language_model() -> pl.LightningModule:
    from lightning_act.tasks.language_model import CausalLanguageModel

    pl.seed_everything(2, verbose=False)
    return CausalLanguageModel(vocab_size=7, max_len=6, dim=8, depth=1, num_heads=2)


def save_foundation(path: Path) -> None:
    module = foundation()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)


def main(out_path: str) -> None:
    from lightning_act.tasks.dopamine import DopamineSpecialisation

    out = Path(out_path)
    checkpoint = out.with_name("foundation.ckpt")
    if "LOCAL_RANK" not in os.environ:  # the launching process, rank 0, before Lightning starts rank 1
        save_foundation(checkpoint)
    spectra = DataLoader(TensorDataset(SPECTRA, SPECTRA_LABELS), batch_size=2)
    digits = DataLoader(TensorDataset(DIGITS, DIGIT_LABELS), batch_size=2)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=1, limit_train_batches=1, limit_val_batches=None)
    model = spectral_model()
    trainer.fit(model, spectra, spectra)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    metrics.update(trainer.test(model, spectra, verbose=False)[0])
    metrics.update({f"foundation_{key}": value for key, value in
                    quiet_trainer(devices=2, strategy="ddp").test(foundation(), digits, verbose=False)[0].items()})
    run = out.parent / "dopamine_run"
    tester = quiet_trainer(devices=2, strategy="ddp", logger=CSVLogger(run, name="", version=0))
    specialised = DopamineSpecialisation(str(checkpoint), method="dopamine")
    metrics.update({f"dopamine_{key}": value for key, value in tester.test(specialised, digits, verbose=False)[0].items()})
    from ddp_stan_alarms import MODEL, LogPower

    windows = DataLoader(TensorDataset(WINDOWS, WINDOW_LABELS), batch_size=2)
    stan, evaluator = LogPower(**MODEL), quiet_trainer(devices=2, strategy="ddp", limit_val_batches=None)
    metrics.update({f"stan_{key}": value for key, value in evaluator.validate(stan, windows, verbose=False)[0].items()})
    metrics.update({f"stan_{key}": value for key, value in evaluator.test(stan, windows, verbose=False)[0].items()})
    sequences = DataLoader(TensorDataset(TOKENS[:, :-1], TOKENS[:, 1:]), batch_size=2)
    validated = quiet_trainer(devices=2, strategy="ddp", limit_val_batches=None).validate(
        language_model(), sequences, verbose=False)
    metrics.update({f"lm_{key}": value for key, value in validated[0].items()})
    if tester.is_global_zero:
        firing = torch.load(run / "version_0" / "dopamine_firing.pt")
        result = {"metrics": metrics, "firing": {name: value.tolist() for name, value in firing.items()}}
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
