"""Round 26: a probe walks the model once (its keepers share the walk) and restores each module's own train flag, as
Lightning's validation loop does; the weights an ``nn.Embedding(max_norm=...)`` renormalises are not taken for a
forward's writes (see also tests/test_padding_r23.py)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_act.callbacks.probe import _ModelParts, probing


class TiedLanguageModel(nn.Module):
    """Tied input/output embeddings (one parameter in two modules), an embedding that renormalises its rows
    (``max_norm``), a block used twice and a norm the user froze in eval mode inside a model in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 8)
        self.positions = nn.Embedding(6, 8, max_norm=1.0)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.again = self.block
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.tokens(x) + self.positions(torch.arange(x.shape[1]))).mean(1)
        return self.head(self.again(self.block(h)))


def test_the_parts_a_probe_guards_are_the_models_parameters_but_the_renormalised_weights() -> None:
    model = TiedLanguageModel()
    parts = _ModelParts.of(model)
    expected = [p for p in model.parameters() if p is not model.positions.weight]  # torch's own walk, each once
    assert [id(p) for p in parts.guarded] == [id(p) for p in expected]
    assert [id(w) for w in parts.renormed] == [id(model.positions.weight)]
    assert [(name, id(m)) for name, m in parts.modules] == [(name, id(m)) for name, m in model.named_modules()]


def test_a_probe_restores_each_modules_own_flag_and_runs_in_eval_mode() -> None:
    model = TiedLanguageModel()
    model.train()
    model.block[1].eval()  # a frozen norm: it must stay in eval mode after the probe, the rest in training mode
    before = {name: module.training for name, module in model.named_modules()}
    seen: dict[str, bool] = {}
    with probing(None, model, torch.device("cpu")):
        seen = {name: module.training for name, module in model.named_modules()}
        model(torch.randint(0, 20, (4, 6)))
    assert not any(seen.values())
    assert {name: module.training for name, module in model.named_modules()} == before
    assert before["block.1"] is False and before["head"] is True
