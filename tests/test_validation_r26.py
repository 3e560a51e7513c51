"""Round 26: the tasks' and nn layers' arguments are checked at construction, each in one line (hunter F's bugs).

Each check refuses exactly the values that cannot work (NaN, out of range, bools and floats for counts) and accepts
the documented boundary values, which are shown to work against an independent computation.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_act.errors import LightningActError
from lightning_act.eval.seizure_alarms import raise_alarms
from lightning_act.models.stan import STAN
from lightning_act.nn import DopamineGate, GroupRational, PMish
from lightning_act.tasks.dopamine import DopamineFoundation, DopamineSpecialisation
from lightning_act.tasks.image_classification import ImageClassifier
from lightning_act.tasks.language_model import CausalLanguageModel
from lightning_act.tasks.modular_addition import ModularAddition
from lightning_act.tasks.seizure_forecasting import SeizureForecaster
from lightning_act.tasks.spectral_detection import SpectralTargetDetection

TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
SMALL_STAN = dict(in_chans=2, window_samples=64, segment_samples=16, embed_dim=8, depth=1, num_heads=2, critic_hidden=4,
                  n_domains=2)
TASKS = {
    "SpectralTargetDetection": lambda **kw: SpectralTargetDetection(in_bands=4, hidden_sizes=[4], **kw),
    "ModularAddition": lambda **kw: ModularAddition(p=7, dim=8, depth=1, num_heads=2, **kw),
    "CausalLanguageModel": lambda **kw: CausalLanguageModel(vocab_size=16, max_len=8, dim=8, depth=1, num_heads=2, **kw),
    "ImageClassifier": lambda **kw: ImageClassifier(num_classes=2, in_chans=1, model_kwargs=TINY_VIT, **kw),
    "DopamineFoundation": lambda **kw: DopamineFoundation(image_size=4, hidden_sizes=[4], **kw),
    "SeizureForecaster": lambda **kw: SeizureForecaster(**SMALL_STAN, **kw),
}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# 1. lr / weight_decay (a negative decay sits in a parameter group, which torch.optim.AdamW never checks)

@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize(
    "bad, name", [({"weight_decay": -1.0}, "weight_decay=-1.0"), ({"weight_decay": math.nan}, "weight_decay=nan"),
                  ({"lr": math.nan}, "lr=nan"), ({"lr": -1e-3}, "lr=-0.001"), ({"lr": True}, "lr=True")],
)
def test_tasks_refuse_an_optimizer_setting_that_cannot_train(task: str, bad: dict, name: str) -> None:
    with pytest.raises(LightningActError, match=f"^{re.escape(name)} must be a finite number >= 0") as error:
        TASKS[task](**bad)
    one_line(error)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_accept_zero_lr_and_zero_weight_decay(task: str) -> None:
    """torch.optim.AdamW's own bounds (0 <= lr, 0 <= weight_decay); DEFAULT_LR['frozen'] is 0."""
    TASKS[task](lr=0.0, weight_decay=0.0)


def test_a_negative_weight_decay_would_have_grown_the_weights() -> None:
    """Why it is refused: in a parameter group torch takes it, and a zero-gradient AdamW step multiplies the weights
    by 1 - lr * weight_decay (hand value 1.1 for lr 0.1, weight_decay -1); torch refuses it as the default."""
    weight = torch.ones(2, 2, requires_grad=True)
    optimizer = torch.optim.AdamW([{"params": [weight], "weight_decay": -1.0}], lr=0.1)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((2, 2), 1.1))
    with pytest.raises(ValueError, match="weight_decay"):
        torch.optim.AdamW([weight], lr=0.1, weight_decay=-1.0)


def test_seizure_forecaster_checks_its_critic_lr() -> None:
    with pytest.raises(LightningActError, match="^critic_lr=nan must be a finite number >= 0"):
        SeizureForecaster(**SMALL_STAN, critic_lr=math.nan)


def test_dopamine_specialisation_checks_lr_before_loading_the_foundation(tmp_path) -> None:
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(LightningActError, match="^lr=-1 must be a finite number >= 0"):
        DopamineSpecialisation(missing, method="full", lr=-1)
    with pytest.raises(LightningActError, match="^weight_decay=-0.5 must be"):
        DopamineSpecialisation(missing, weight_decay=-0.5)
    with pytest.raises(LightningActError, match="not found"):  # lr None: the method's default (0 for frozen) is fine
        DopamineSpecialisation(missing, method="frozen")


# 2. SeizureForecaster's alarm rule

@pytest.mark.parametrize(
    "bad, message",
    [({"alarm_threshold": 1.5}, "alarm_threshold=1.5 must be a probability in [0, 1]"),
     ({"alarm_threshold": -0.1}, "alarm_threshold=-0.1 must be a probability"),
     ({"alarm_threshold": math.nan}, "alarm_threshold=nan must be a probability"),
     ({"alarm_k": 6, "alarm_n": 5}, "alarm_k=6 exceeds alarm_n=5"),
     ({"alarm_k": 0}, "alarm_k=0 must be a whole number >= 1"),
     ({"alarm_k": 2.0}, "alarm_k=2.0 must be a whole number >= 1"),
     ({"alarm_n": True}, "alarm_n=True must be a whole number >= 1"),
     ({"refractory_minutes": -1.0}, "refractory_minutes=-1.0 must be a finite number >= 0"),
     ({"refractory_minutes": math.inf}, "refractory_minutes=inf must be a finite number >= 0")],
)
def test_seizure_forecaster_refuses_an_alarm_rule_that_cannot_work(bad: dict, message: str) -> None:
    with pytest.raises(LightningActError, match=re.escape(message)) as error:
        SeizureForecaster(**SMALL_STAN, **bad)
    one_line(error)


def test_seizure_forecaster_accepts_the_boundary_alarm_rules_and_they_alarm() -> None:
    """threshold 0 and 1, k = n, no refractory period: accepted, and each raises the alarms the rule says (hand
    values: windows every 5 s, p = 1 everywhere, 2 of the last 2 positive from the second window on)."""
    for threshold in (0.0, 1.0):
        task = SeizureForecaster(**SMALL_STAN, alarm_threshold=threshold, alarm_k=2, alarm_n=2, refractory_minutes=0)
        hp = task.hparams
        alarms = raise_alarms(np.arange(4) * 5.0, np.ones(4), threshold=hp.alarm_threshold, k=hp.alarm_k,
                              n=hp.alarm_n, refractory_s=hp.refractory_minutes * 60.0)
        np.testing.assert_array_equal(alarms, [5.0, 10.0, 15.0])


# 3. focal loss

@pytest.mark.parametrize(
    "bad, message",
    [({"focal_alpha": 2.0}, "focal_alpha=2.0 must be in [0, 1]"), ({"focal_alpha": -0.5}, "focal_alpha=-0.5 must be"),
     ({"focal_alpha": math.nan}, "focal_alpha=nan must be"), ({"focal_alpha": True}, "focal_alpha=True must be"),
     ({"focal_gamma": -1.0}, "focal_gamma=-1.0 must be a finite number >= 0"),
     ({"focal_gamma": math.nan}, "focal_gamma=nan must be"), ({"focal_gamma": math.inf}, "focal_gamma=inf must be")],
)
def test_focal_loss_settings_are_refused_at_construction(bad: dict, message: str) -> None:
    with pytest.raises(LightningActError, match=re.escape(message)) as error:
        SpectralTargetDetection(in_bands=4, hidden_sizes=[4], loss="focal", **bad)
    one_line(error)


@pytest.mark.parametrize("alpha, gamma", [(0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.25, 2.0)])
def test_focal_loss_boundary_settings_give_the_hand_computed_loss(alpha: float, gamma: float) -> None:
    """The focal loss, in numpy float64: alpha_t * (1 - p_t) ** gamma * BCE, alpha -1 meaning no weighting."""
    task = SpectralTargetDetection(in_bands=4, hidden_sizes=[4], loss="focal", focal_alpha=alpha, focal_gamma=gamma)
    logits, labels = np.array([2.0, -1.0, 0.5, 3.0]), np.array([1.0, 0.0, 0.0, 1.0])
    p = 1.0 / (1.0 + np.exp(-logits))
    p_t = np.where(labels == 1, p, 1 - p)
    alpha_t = 1.0 if alpha == -1 else np.where(labels == 1, alpha, 1 - alpha)
    expected = np.mean(alpha_t * (1 - p_t) ** gamma * -np.log(p_t))
    loss = task.compute_loss(torch.tensor(logits), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_focal_settings_are_not_read_by_the_bce_loss() -> None:
    SpectralTargetDetection(in_bands=4, hidden_sizes=[4], loss="bce", focal_alpha=2.0, focal_gamma=-1.0)


# 4. mixup probabilities

@pytest.mark.parametrize(
    "bad", [{"mixup_prob": 2.0}, {"mixup_prob": -1.0}, {"mixup_prob": math.nan}, {"mixup_switch_prob": 1.5}],
)
def test_mixup_probabilities_are_refused_outside_zero_one(bad: dict) -> None:
    ((name, value),) = bad.items()
    with pytest.raises(LightningActError, match=re.escape(f"{name}={value!r} must be a probability in [0, 1]")) as error:
        TASKS["ImageClassifier"](mixup_alpha=0.8, **bad)
    one_line(error)


def test_mixup_probabilities_zero_and_one_reach_timm() -> None:
    task = TASKS["ImageClassifier"](mixup_alpha=0.8, mixup_prob=0.0, mixup_switch_prob=1.0)
    assert (task.mixup.mix_prob, task.mixup.switch_prob) == (0.0, 1.0)


# 5. nn layers

@pytest.mark.parametrize(
    "args, message",
    [((0,), "num_channels=0 must be a whole number >= 1"), ((-8,), "num_channels=-8 must be"),
     ((16.0,), "num_channels=16.0 must be"), ((16, 2.0), "groups=2.0 must be"), ((16, True), "groups=True must be"),
     ((16, 0), "groups=0 must be")],
)
def test_group_rational_refuses_counts_that_are_not_positive_whole_numbers(args: tuple, message: str) -> None:
    with pytest.raises(LightningActError, match=re.escape(f"GroupRational: {message}")) as error:
        GroupRational(*args)
    one_line(error)


def test_group_rational_accepts_one_group_per_channel_and_numpy_ints() -> None:
    x = torch.randn(2, 3, 16)
    for module in (GroupRational(16, groups=16), GroupRational(np.int64(16), groups=np.int64(2))):
        torch.testing.assert_close(module(x), x)  # the identity init


@pytest.mark.parametrize("kwargs", [{"beta_init": math.inf}, {"beta_min": math.inf}, {"beta_init": math.nan},
                                    {"beta_init": True}])
def test_pmish_refuses_an_infinite_or_boolean_beta(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be > 0 and finite"):
        PMish(**kwargs)


def test_pmish_with_a_large_finite_beta_is_x_tanh_relu() -> None:
    """β → ∞ tends to x · tanh(ReLU(x)) (module docstring), computed here in float64."""
    x = torch.linspace(-3, 3, 13)
    expected = x.double() * torch.tanh(x.double().clamp_min(0))
    torch.testing.assert_close(PMish(beta_init=1e6)(x).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"slope": math.nan}, "slope must be > 0 and finite"), ({"slope": math.inf}, "slope must be > 0 and finite"),
     ({"tau_init": math.nan}, "tau_init must be a finite number"), ({"tau_init": -math.inf}, "tau_init must be"),
     ({"num_features": 16.5}, "num_features a whole number >= 1"), ({"num_features": True}, "num_features a whole")],
)
def test_dopamine_gate_refuses_arguments_that_give_nan_or_raw_errors(kwargs: dict, message: str) -> None:
    kwargs = {"num_features": 16, **kwargs}
    with pytest.raises(LightningActError, match=re.escape(message)) as error:
        DopamineGate(torch.nn.ReLU(), **kwargs)
    one_line(error)


def test_dopamine_gate_with_a_negative_threshold_starts_as_the_activation() -> None:
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(DopamineGate(torch.nn.ReLU(), 16, tau_init=-3.0)(x), torch.relu(x))


# 6. transformer sizes, the modulus, STAN's heads

@pytest.mark.parametrize(
    "kwargs, message",
    [({"depth": -1}, "depth=-1 must be a whole number >= 0"), ({"vocab_size": 0}, "vocab_size=0 must be"),
     ({"max_len": 0}, "max_len=0 must be"), ({"num_heads": 0}, "num_heads=0 must be"), ({"dim": 8.0}, "dim=8.0 must be"),
     ({"mlp_ratio": 0.0}, "mlp_ratio=0.0 must be"), ({"mlp_ratio": math.nan}, "mlp_ratio=nan must be"),
     ({"dim": 8, "mlp_ratio": 0.1}, "mlp_ratio=0.1 must be")],
)
def test_language_model_refuses_an_empty_transformer(kwargs: dict, message: str) -> None:
    arguments = {"vocab_size": 16, "max_len": 8, "dim": 8, "depth": 1, "num_heads": 2, **kwargs}
    with pytest.raises(LightningActError, match=re.escape(message)) as error:
        CausalLanguageModel(**arguments)
    one_line(error)


def test_attention_only_model_ignores_mlp_ratio_and_takes_the_smallest_modulus() -> None:
    task = ModularAddition(p=2, dim=8, depth=1, num_heads=2, mlp=False, mlp_ratio=0.0)
    assert task(torch.tensor([[0, 1, 2]])).shape == (1, 2)


@pytest.mark.parametrize("p", [1, 0, -3, True, 7.0])
def test_modular_addition_refuses_a_modulus_below_two(p: object) -> None:
    with pytest.raises(LightningActError, match=re.escape(f"p={p!r} must be a whole number >= 2")):
        ModularAddition(p=p, dim=8, depth=1, num_heads=2)


@pytest.mark.parametrize("num_heads", [3, 0])
def test_stan_refuses_heads_that_do_not_divide_the_embedding(num_heads: int) -> None:
    """nn.MultiheadAttention's bare AssertionError before (the CLI said only "Problem with given class_path")."""
    with pytest.raises(LightningActError, match=f"embed_dim=10 cannot be split into num_heads={num_heads} heads"):
        STAN(in_chans=2, window_samples=64, segment_samples=16, embed_dim=10, num_heads=num_heads)


def test_raise_alarms_refuses_a_threshold_that_is_no_probability() -> None:
    # Before: threshold=1.5 or NaN raised no alarm at all, silently (sensitivity 0)
    times, probabilities = np.arange(6.0) * 60, np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    for threshold in (1.5, -0.1, float("nan")):
        with pytest.raises(LightningActError, match="not a probability in"):
            raise_alarms(times, probabilities, threshold=threshold, k=2, n=3)
    assert raise_alarms(times, probabilities, threshold=1.0, k=2, n=3).size == 0  # the boundary: nothing reaches it
    np.testing.assert_array_equal(raise_alarms(times, probabilities, threshold=0.5, k=2, n=3), [60.0])


def test_lora_refuses_a_non_finite_alpha() -> None:
    # Before: lora_alpha=nan gave a NaN scaling, every output NaN
    from lightning_act.peft.lora import LoRALinear

    for alpha in (float("nan"), float("inf")):
        with pytest.raises(LightningActError, match="LoRA alpha must be a finite number"):
            LoRALinear(nn.Linear(4, 3), rank=2, alpha=alpha)
    assert LoRALinear(nn.Linear(4, 3), rank=2, alpha=16.0).scaling == 8.0
