"""Round 28: a probe puts back the state a forward carries outside the buffers and the global RNG: a buffer registered
as ``None`` that the forward fills, a ``torch.Generator`` a module holds and Python's ``random``, a module's tensor
and container attributes (TBPTT's ``self.h = out.detach()``, a KV cache in a list). Each fit with a probing monitor
is compared bitwise with the same fit without it."""

from __future__ import annotations

import collections
import random
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from _toy import ToyData, ToyTask, quiet_trainer
from torch import nn

from lightning_act.callbacks import MassiveActivations, SensitiveNeurons
from lightning_act.callbacks.probe import COPIED_BUFFER_BYTES, call_forward, default_forward, probing


class BufferCarry(nn.Module):
    """A hidden state carried across batches in a buffer registered as ``None``, made by the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.register_buffer("h", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x) if self.h is None or self.h.shape != x.shape else self.h
        out = torch.tanh(self.fc(x) + h)
        self.h = out.detach()
        return out


class AttributeCarry(BufferCarry):
    """The same state in a plain attribute (TBPTT style), ``None`` until the first forward."""

    def __init__(self) -> None:
        super().__init__()
        del self.h
        self.h = None


class GeneratorNoise(nn.Module):
    """Noise in every mode from a generator of the module's own (VAE-style sampling)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn(x.shape, generator=self.g)


class PythonNoise(nn.Module):
    """A draw of Python's ``random`` in every mode (an older Hugging Face LayerDrop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.1 * random.gauss(0, 1))


class ListCache(nn.Module):
    """A cache kept in a list attribute, appended at every forward and read back (its mean is added)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + (torch.stack(self.cache).mean() if self.cache else 0.0)
        self.cache.append(x.detach().mean())
        return out


def _fit(middle: Callable[[], nn.Module], monitor: pl.Callback | None) -> tuple[dict[str, torch.Tensor], nn.Module]:
    pl.seed_everything(0, verbose=False)
    random.seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.GELU(), middle(), nn.Linear(32, 4))
    task = ToyTask(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=3, callbacks=[monitor] if monitor else [], limit_val_batches=1).fit(
            task, ToyData(batch_size=8)
        )
    return task.state_dict(), net[3]


MONITORS = {
    "sensitive": lambda: SensitiveNeurons(every_n_steps=1, num_samples=8, batch_size=8),
    "massive_val_probe": lambda: MassiveActivations(modules=["net.2"], every_n_steps=1, probe="val"),
}


def _assert_same_fit(middle: Callable[[], nn.Module], monitor: str) -> tuple[nn.Module, nn.Module]:
    bare, bare_middle = _fit(middle, None)
    monitored, monitored_middle = _fit(middle, MONITORS[monitor]())
    assert bare.keys() == monitored.keys()
    for name in bare:
        assert torch.equal(bare[name], monitored[name]), name
    return bare_middle, monitored_middle


@pytest.mark.parametrize("monitor", sorted(MONITORS))
def test_a_buffer_registered_as_none_is_none_again_after_a_probe(monitor: str) -> None:
    model = nn.Sequential(nn.Linear(32, 32), BufferCarry())
    with probing(None, model, torch.device("cpu")):
        model(torch.randn(8, 32))
        assert model[1].h is not None  # filled inside
    assert model[1].h is None and "h" in model[1]._buffers
    bare, monitored = _assert_same_fit(BufferCarry, monitor)
    assert torch.equal(bare.h, monitored.h)


@pytest.mark.parametrize("monitor", sorted(MONITORS))
def test_a_tensor_attribute_a_probe_rebinds_gets_its_object_back(monitor: str) -> None:
    bare, monitored = _assert_same_fit(AttributeCarry, monitor)
    assert torch.equal(bare.h, monitored.h)


def test_a_list_attribute_a_probe_appends_to_holds_its_items_again() -> None:
    bare, monitored = _assert_same_fit(ListCache, "sensitive")
    assert len(bare.cache) == len(monitored.cache) == 3  # one per training step, none of the probe's
    model = ListCache()
    model.cache.append(torch.tensor(1.0))
    cache, first = model.cache, model.cache[0]
    with probing(None, model, torch.device("cpu")):
        model(torch.randn(4))
    assert model.cache is cache and len(cache) == 1 and cache[0] is first
    counted = nn.Sequential(Counted())
    with probing(None, counted, torch.device("cpu")):
        counted(torch.randn(4))
    assert counted[0].calls == [1]  # a list of numbers, not of tensors: left as the plain attributes are


class Counted(nn.Module):
    """Counts its forwards in a list of numbers (as tests/test_probe_ddp_r26.py's LateWriter does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[0] += 1
        return x


def test_a_small_tensor_attribute_written_in_place_is_put_back_and_a_large_one_is_said() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = torch.zeros(4)
            self.large = torch.zeros(COPIED_BUFFER_BYTES // 4 + 1)  # float32: one element over the copied size
            self.table = {"kv": torch.zeros(3)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.small.add_(1)
            self.large.add_(1)
            self.table["kv"].fill_(2)
            return x

    model = nn.Sequential(InPlace())
    small, large, kv = model[0].small, model[0].large, model[0].table["kv"]
    for _ in range(2):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with probing(None, model, torch.device("cpu")):
                model(torch.randn(2))
        assert model[0].small is small and torch.equal(small, torch.zeros(4))
        assert model[0].table["kv"] is kv and torch.equal(kv, torch.zeros(3))
        assert model[0].large is large  # kept: too large to copy at every probe
    assert torch.equal(large, torch.full_like(large, 2.0))
    # said once per model, by name (the second probe said nothing)
    assert not [w for w in said if "0.large" in str(w.message)]
    model = nn.Sequential(InPlace())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with probing(None, model, torch.device("cpu")):
            model(torch.randn(2))
    assert len([w for w in said if "'0.large'" in str(w.message)]) == 1


@pytest.mark.parametrize("monitor", sorted(MONITORS))
def test_a_generator_a_module_holds_is_forked_around_a_probe(monitor: str) -> None:
    _assert_same_fit(GeneratorNoise, monitor)


def test_pythons_random_is_forked_around_a_probe() -> None:
    _assert_same_fit(PythonNoise, "sensitive")


def test_a_probe_forward_draws_the_same_noise_whatever_the_training_left_the_generators_at() -> None:
    noise, scale = GeneratorNoise(), PythonNoise()
    model = nn.Sequential(noise, scale)
    x = torch.zeros(3, 5)
    outputs = []
    for training_draws in (0, 7):
        torch.randn(training_draws, generator=noise.g)
        random.random()
        noise_state, python_state = noise.g.get_state(), random.getstate()
        with probing(None, model, torch.device("cpu")):
            outputs.append(call_forward("test", default_forward, model, x))
        assert torch.equal(noise.g.get_state(), noise_state) and random.getstate() == python_state
    assert torch.equal(outputs[0], outputs[1])
    # seeded as torch's generator is: forward 0 of a probe draws from seed 0
    expected = 0.1 * torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    random.seed(0)
    assert torch.equal(outputs[0], expected * (1 + 0.1 * random.gauss(0, 1)))


def test_an_ordinary_models_probe_is_unchanged() -> None:
    """A model carrying no state: the probe's output is the eval-mode forward's, and every attribute of every module
    is the very object it was, tuples and lists included; an attribute changed between probes is not undone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(8, 3))
    model.names = ["conv", "norm"]
    x = torch.randn(4, 1, 4, 4)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    attributes = {(name, key): value for name, module in model.named_modules() for key, value in vars(module).items()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with probing(None, model, torch.device("cpu")):
            out = call_forward("test", default_forward, model, x)
    assert torch.equal(out, expected)
    after = {(name, key): value for name, module in model.named_modules() for key, value in vars(module).items()}
    assert after.keys() == attributes.keys() and all(after[key] is value for key, value in attributes.items())
    assert model.names == ["conv", "norm"] and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.names.append("head")  # the user's change between probes stays
    model[0].padding = (1, 1)
    with probing(None, model, torch.device("cpu")):
        pass
    assert model.names == ["conv", "norm", "head"] and model[0].padding == (1, 1)


class PairCache(nn.Module):
    """A rolling cache of ``(k, v)`` pairs in a list, as Hugging Face's legacy ``past_key_values``, read back."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + (sum(k.mean() * v.mean() for k, v in self.cache) if self.cache else 0.0)
        self.cache.append((x.detach().mean(0), x.detach().std(0)))
        del self.cache[:-2]
        return out


def test_a_cache_of_pairs_in_a_list_holds_its_items_again() -> None:
    # Before: only a list whose own items were tensors was put back; the probe's pair stayed and the fit differed
    bare, monitored = _assert_same_fit(PairCache, "sensitive")
    assert len(bare.cache) == len(monitored.cache) == 2
    assert all(torch.equal(a, b) for pair, other in zip(bare.cache, monitored.cache) for a, b in zip(pair, other))


def test_nested_containers_get_their_items_and_values_back() -> None:
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.recent = collections.deque([torch.zeros(2)], maxlen=2)
            self.table = collections.defaultdict(list, {"k": [torch.zeros(1)]})
            self.layers = [[torch.zeros(3)], ({"v": torch.zeros(2)},)]
            self.noise = [torch.Generator().manual_seed(3)]
            self.calls = {"n": [0]}  # numbers only: a count of the forwards, left as the plain attributes are

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.recent.append(x.mean())
            self.table["k"].append(x.mean())
            self.table["new"].append(x.mean())
            self.layers[0][0].add_(1)
            self.layers[1][0]["v"].fill_(5)
            self.calls["n"][0] += 1
            return x + torch.randn(x.shape, generator=self.noise[0])

    model = Nested()
    recent, first, k_list, inner = list(model.recent), model.recent[0], model.table["k"], model.layers[0][0]
    noise_state = model.noise[0].get_state()
    with probing(None, model, torch.device("cpu")):
        out = call_forward("test", default_forward, model, torch.zeros(4))
    assert [id(t) for t in model.recent] == [id(t) for t in recent] and model.recent[0] is first
    assert model.recent.maxlen == 2
    assert model.table["k"] is k_list and len(k_list) == 1 and dict(model.table).keys() == {"k"}
    assert torch.equal(inner, torch.zeros(3)) and model.layers[0][0] is inner
    assert torch.equal(model.layers[1][0]["v"], torch.zeros(2))
    assert torch.equal(model.noise[0].get_state(), noise_state)  # forked, and seeded as torch's generator: seed 0
    assert torch.equal(out, torch.randn(4, generator=torch.Generator().manual_seed(0)))
    assert model.calls == {"n": [1]}


def test_an_attribute_a_probe_forward_adds_is_removed() -> None:
    class Lazy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = getattr(self, "h", None)
            self.h = x.detach() if h is None else h + x.detach()
            self.seen = getattr(self, "seen", 0) + 1  # a number: left, as the plain attributes are
            return x

    model = nn.Sequential(Lazy())
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert not hasattr(model[0], "h") and model[0].seen == 1
    model[0].h = torch.zeros(2)  # made by training: a probe's rebinding is undone
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert torch.equal(model[0].h, torch.zeros(2))


def test_a_name_holding_a_number_at_one_probe_and_a_tensor_at_the_next_is_put_back() -> None:
    """Guard for the cached attribute names: each probe reads every value, and a name deleted and another added
    between probes (same count) is seen."""

    class Carry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = 0.0
            self.other = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.h = self.h + x.detach()
            if hasattr(self, "g"):
                self.g = self.g + 1
            return x

    model = Carry()
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    model.h = torch.zeros(2)  # training made it a tensor
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert torch.equal(model.h, torch.zeros(2))
    del model.other
    model.g = torch.zeros(1)  # as many attributes as before
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert torch.equal(model.g, torch.zeros(1))


def test_a_large_tensor_attribute_aliasing_a_weight_put_back_is_not_said_to_keep_the_probes_write() -> None:
    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(200, 100, max_norm=1.0)  # 80 KB: more than the probes copy
            self.head_weight = self.embed.weight.detach()  # a tied head kept as a plain attribute

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids) @ self.head_weight.T

    torch.manual_seed(0)
    model = TiedHead()
    before = model.embed.weight.detach().clone()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with probing(None, model, torch.device("cpu")):
            model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(model.embed.weight, before) and torch.equal(model.head_weight, before)  # put back
    assert not [w for w in said if "keeps what the probe wrote" in str(w.message)]


def test_names_deleted_and_as_many_added_with_the_last_re_added_are_read_anew() -> None:
    # Before: the cached names (same count, same last name) still held "a": the probe died with KeyError 'a'
    class Carry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.zeros(2)
            self.h = torch.zeros(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.h = self.h + x
            if hasattr(self, "b"):
                self.b = self.b + x
            return x

    model = Carry()
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    del model.a, model.h
    model.b = torch.zeros(2)
    model.h = torch.zeros(2)  # re-made last: as many names as before, the same last one
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert torch.equal(model.h, torch.zeros(2)) and torch.equal(model.b, torch.zeros(2))


class NumberCarry(nn.Module):
    """A state started at ``0.0`` and a warm-up counter of the forwards, both scaling the output."""

    def __init__(self) -> None:
        super().__init__()
        self.h = 0.0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.h = 0.5 * self.h + 0.5 * x.detach().mean(0)
        self.calls += 1
        return x * min(self.calls, 4) / 4 + self.h


def test_a_number_attribute_a_probe_rebinds_gets_its_object_back() -> None:
    # Before: numbers were left as the probe left them: h a tensor of the probe's inputs, calls one more
    model = NumberCarry()
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(3, 2))
    assert model.h == 0.0 and type(model.h) is float and model.calls == 0


def test_a_fit_with_a_number_state_and_a_counter_is_the_fit_without_the_monitor() -> None:
    bare, monitored = _assert_same_fit(NumberCarry, "sensitive")
    assert bare.calls == monitored.calls == 3 and torch.equal(bare.h, monitored.h)


def test_a_large_container_of_numbers_is_not_copied_but_loses_a_tensor_a_probe_appends() -> None:
    from lightning_act.callbacks.probe import _ModelParts

    class History(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.losses = [float(i) for i in range(1000)]
            self.vocab = {f"w{i}": i for i in range(1000)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.losses.append(x.mean())
            self.vocab["new"] = x.mean()
            return x

    model = History()
    parts = _ModelParts.of(model)
    assert not [entry for entry in parts.held if entry[0] is model.losses or entry[0] is model.vocab]  # not copied
    with probing(None, model, torch.device("cpu")):
        model(torch.ones(2))
    assert model.losses == [float(i) for i in range(1000)] and model.vocab == {f"w{i}": i for i in range(1000)}


def test_a_tensor_in_place_in_a_long_list_of_outputs_is_said_once_by_name() -> None:
    # Lightning's documented training_step_outputs: 1000 tensors, not copied at each probe (~7.6 ms before)
    class Outputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step_outputs = [torch.zeros(2) for _ in range(1000)]
            self.few = [torch.zeros(2) for _ in range(3)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for t in (*self.step_outputs[:5], *self.few):
                t.add_(1)
            return x

    model = Outputs()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with probing(None, model, torch.device("cpu")):
            model(torch.ones(2))
    kept = [str(w.message) for w in said if "keeps what the probe wrote" in str(w.message)]
    assert len(kept) == 1 and "'step_outputs'" in kept[0] and "more than the 64 items" in kept[0]
    assert all(torch.equal(t, torch.zeros(2)) for t in model.few)  # a short list: put back


def test_records_past_the_walks_budget_are_put_back_and_the_cut_is_said() -> None:
    # Before: the budget ran out on the outer list, "no tensors" was read, and the probe's record stayed
    class Records(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.records = [(step, torch.zeros(1)) for step in range(1100)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.records.append((len(self.records), x.mean()))
            return x

    model = Records()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(2):
            with probing(None, model, torch.device("cpu")):
                model(torch.ones(2))
    assert len(model.records) == 1100
    cut = [str(w.message) for w in said if "looks into" in str(w.message)]
    assert len(cut) == 1 and "'records'" in cut[0]
