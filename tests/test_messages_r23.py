"""Round 23: messages that name the fix a user needs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from _toy import BlockNet, ToyData, ToyTask, quiet_trainer, toy_loader
from test_cli_files_r22 import last_error, write_config
from lightning_act.callbacks import ActivationSparsity, SensitiveNeurons
from lightning_act.cli import main
from lightning_act.errors import LightningActError, ModuleSelectionError


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


# --- ActivationSparsity: modules and cett_modules checked apart ------------------------------------------------------

def test_a_cett_modules_list_that_matches_nothing_fails_at_setup_naming_it_as_written():
    """Before: merged with the default modules into one spec list, the typo only warned ("modules
    ['block.*.fc:input'] match nothing"), and the fit ran to its end without a CETT statistic."""
    for written in (["block.*.fc"], "block.*.fc"):
        monitor = ActivationSparsity(every_n_steps=1, cett_modules=written)
        with pytest.raises(ModuleSelectionError) as error:
            quiet_trainer(max_steps=1, callbacks=[monitor]).fit(ToyTask(BlockNet()), toy_loader())
        message = str(error.value)
        assert message.startswith("ActivationSparsity: cett_modules=['block.*.fc'] matched no module of ToyTask;")
        assert "'net.blocks.0.fc'" in message and ":input" not in message and "\n" not in message


def test_a_modules_list_that_matches_nothing_fails_beside_a_matching_cett_modules():
    """Before: the fit ran without any zero_frac key, warning only."""
    monitor = ActivationSparsity(every_n_steps=1, modules=["nosuch"], cett_modules="net.blocks.*.fc")
    with pytest.raises(ModuleSelectionError, match=r"^ActivationSparsity: modules=\['nosuch'\] matched no module"):
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(ToyTask(BlockNet()), toy_loader())


def test_a_partly_matching_cett_modules_warns_naming_the_argument_and_measures_the_rest():
    monitor = ActivationSparsity(every_n_steps=1, cett_modules=["net.blocks.*.fc", "nosuch"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(ToyTask(BlockNet()), toy_loader())
    told = [str(w.message) for w in caught if "match nothing" in str(w.message)]
    assert told == ["ActivationSparsity: cett_modules ['nosuch'] match nothing in ToyTask; only the other specs are "
                    "tapped"]
    assert {key for key in monitor.history if key.endswith("/cett_ratio")} == {
        f"sparsity/net.blocks.{i}.fc-input/cett_ratio" for i in (0, 1)}
    assert any(key.endswith("/zero_frac") for key in monitor.history)  # the default modules are measured too


def test_default_modules_that_match_nothing_beside_cett_modules_warn_as_the_default():
    """A model without activation modules: the default ``@activations`` only warns (as a default does), named as
    the default (before: "modules ['@activations'] ...", as if the user had written it)."""
    monitor = ActivationSparsity(every_n_steps=1, cett_modules="net.2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(
            ToyTask(nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.Linear(16, 4))), toy_loader())
    told = [str(w.message) for w in caught if "match nothing" in str(w.message)]
    assert told == ["ActivationSparsity: its default modules ['@activations'] match nothing in ToyTask; only the other "
                    "specs are tapped (pass modules=[...] to choose)"]
    assert set(monitor.history) == {f"sparsity/net.2-input/{stat}" for stat in ("cett_ratio", "cett_eps")}


# --- a tensor argument given in YAML or on the command line ----------------------------------------------------------

TENSOR_LINE = ("lightning_act: error: trainer.callbacks (SensitiveNeurons): tracking_inputs = {}: expected Tensor or "
               "None (a tensor is given in Python; leave it null in YAML)")


@pytest.mark.parametrize("value", ["abc", {"a": 1}, [1, 2, 3]])
def test_a_tensor_argument_in_yaml_is_one_line_saying_it_is_given_in_python(tmp_path, capsys, monkeypatch, value):
    """Before: jsonargparse's import-path attempt ("Parser key ...; Expected a path but abc either not accessible"),
    and for a mapping "unknown argument 'a'" (taken as torch.Tensor's init_args)."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = [{"class_path": "lightning_act.callbacks.SensitiveNeurons",
                                         "init_args": {"tracking_inputs": value}}]
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 2
    assert last_error(capsys) == TENSOR_LINE.format(repr(str(value)))


def test_a_tensor_argument_on_the_command_line_is_the_same_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "runs")
    argv = ["fit", "--config", str(config), "--trainer.callbacks+=SensitiveNeurons",
            "--trainer.callbacks.tracking_inputs", "abc"]
    assert main(argv) == 2
    assert last_error(capsys) == TENSOR_LINE.format("'abc'")


# --- SensitiveNeurons(alpha=...) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [-1.0, 0.0, float("nan"), float("inf")])
def test_alpha_states_the_one_bound_it_is_held_to(alpha):
    """Before: alpha=-1 was told ">= 0", and alpha=0 then refused with "> 0"."""
    with pytest.raises(LightningActError) as error:
        SensitiveNeurons(alpha=alpha)
    assert str(error.value) == f"SensitiveNeurons: alpha={alpha!r} must be a finite number > 0; pass e.g. alpha=1e-3"
    assert SensitiveNeurons(alpha=1e-3).alpha == 1e-3


def test_sensitive_neurons_without_validation_data_names_tracking_inputs():
    """Before: the line named validation data only, though ``tracking_inputs=`` needs none (a GAN's natural fix)."""
    import pytest

    from lightning_act.errors import LightningActError

    trainer = quiet_trainer(max_steps=1, callbacks=[SensitiveNeurons(every_n_steps=1, num_samples=4)])
    with pytest.raises(LightningActError, match=r"val_dataloader\(\), or SensitiveNeurons\(tracking_inputs="):
        trainer.fit(WithCritic(), ToyData().train_dataloader())
