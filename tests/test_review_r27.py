"""Round 27's last review fixes outside the monitors' own test files: an activation inside a user's own activation
module stays tapped (only the project's adapters stand for the activation they wrap), and a small ridge that leaves the
background singular is told to grow, not to be "> 0"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_act.capture import selection
from lightning_act.capture.selection import register_activation_class, select_taps
from lightning_act.models.hsi_detectors import ClassicalDetectors


class SigmoidGated(nn.Module):
    """A user's activation computing with another activation module: ``x * sigmoid(x)`` by a child ``nn.Sigmoid``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def test_an_activation_inside_a_users_activation_module_stays_tapped(monkeypatch: pytest.MonkeyPatch) -> None:
    # R8: the first version left out every activation inside another; the gate runs on the batch with its own output
    monkeypatch.setattr(selection, "_extra_activation_classes", [])
    register_activation_class(SigmoidGated)
    model = nn.Sequential(nn.Linear(4, 8), SigmoidGated(), nn.Linear(8, 2))
    ran: list[str] = []
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda *_, name=name: ran.append(name))
    model(torch.randn(3, 4))
    taps = sorted(t.name for t in select_taps(model, "@activations"))
    assert taps == ["1", "1.gate"] == sorted(set(ran) & {"1", "1.gate"})


def test_a_small_ridge_leaving_the_background_singular_asks_for_a_larger_one() -> None:
    # R8: 50 pixels of 200 bands, ridge 1e-12: numpy's rank of the centred pixels is 49; the line said "pass ridge > 0"
    rng = np.random.default_rng(0)
    background, target = rng.uniform(0.1, 0.5, (50, 200)), rng.uniform(0.1, 0.5, 200)
    assert np.linalg.matrix_rank(background - background.mean(0)) == 49
    singular = r"^the background (covariance Σ|autocorrelation R) is singular .*pass a larger ridge"
    with pytest.raises(ValueError, match=singular) as raised:
        ClassicalDetectors(ridge=1e-12).fit(torch.tensor(background), torch.tensor(target))
    assert "ridge > 0" not in str(raised.value) and "\n" not in str(raised.value)
