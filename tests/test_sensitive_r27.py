"""Round 27: SensitiveNeurons on padded dict batches (the token mean over real tokens only), the example axis of
``(B, T)`` inputs under a forward that repeats each example, and the line for an unknown EigenScore. Values are checked
against numpy float64 or the documented behaviour."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _toy import SquaredOutputTask, quiet_trainer
from lightning_act.callbacks import SensitiveNeurons
from lightning_act.callbacks.sensitive import per_example_embedding

VOCAB, WIDTH = 12, 5
LENGTHS = [6, 2, 4, 1]  # of 4 sequences padded to 6 tokens


def padded_batch(lengths: list[int] = LENGTHS, tokens: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (len(lengths), tokens), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(tokens) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


class TokenHead(SquaredOutputTask):
    """Token ids → embedding → ``body`` → a head on every token: the head's input is (B, T, D), pads included."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.body, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(self.emb(input_ids)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights of the checkpoint are the initial ones


def numpy_head_inputs(model: TokenHead, ids: torch.Tensor) -> np.ndarray:
    """``body(emb(ids))`` (B, T, D) by numpy float64."""
    table = model.emb.weight.detach().double().numpy()
    weight, bias = model.body.weight.detach().double().numpy(), model.body.bias.detach().double().numpy()
    return table[ids.numpy()] @ weight.T + bias


def fit_on(batch: Any, **options: Any) -> tuple[TokenHead, SensitiveNeurons, list[str]]:
    model = TokenHead()
    monitor = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=4, eigenscore_passes=0,
                               window=2, **options)
    loader = DataLoader([batch], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(model, loader, loader)
    return model, monitor, [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]


def test_a_masked_token_mean_is_the_mean_over_each_examples_real_tokens() -> None:
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    want = np.stack([x[b].double().numpy()[mask[b].bool().numpy()].mean(0) for b in range(3)])
    np.testing.assert_allclose(per_example_embedding(x, mask).double().numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(per_example_embedding(x, mask.bool()).double().numpy(), want, rtol=1e-6)
    # a mask that is not the activation's (B, T): the plain token mean, pads included, which the callback says once
    # per tap (test_a_tap_whose_token_axis_is_not_the_masks_is_said_to_average_the_pads)
    assert torch.equal(per_example_embedding(x, mask[:2]), x.mean(1))


@pytest.mark.parametrize("how", ["input_key", "forward_fn"])
def test_padded_dict_batches_embed_each_example_by_its_real_tokens(how: str) -> None:
    # Before: the head's input was averaged over all 6 positions, pads included, silently; with input_key the model
    # is run without the attention_mask, which is now said once, naming forward_fn.
    batch = padded_batch()
    options = {"input_key": "input_ids"} if how == "input_key" else {"forward_fn": lambda m, b: m(**b)}
    model, monitor, said = fit_on(batch, **options)
    hidden = numpy_head_inputs(model, batch["input_ids"])
    want = np.stack([hidden[b, :n].mean(0) for b, n in enumerate(LENGTHS)])
    np.testing.assert_allclose(monitor.embeddings["head-input"][-1].numpy(), want, rtol=1e-5, atol=1e-7)
    about_mask = [line for line in said if "attention_mask" in line]
    if how == "input_key":
        assert len(about_mask) == 1 and "forward_fn=lambda m, b: m(**b)" in about_mask[0]
    else:
        assert about_mask == []


def test_unpadded_dict_batches_give_the_plain_token_mean_bit_for_bit() -> None:
    # An all-ones mask changes nothing: the same bits as the batch without it, and nothing said about the mask.
    batch = padded_batch(lengths=[6, 6, 6, 6])
    _, with_mask, said = fit_on(batch, input_key="input_ids")
    _, without, _ = fit_on({"input_ids": batch["input_ids"]}, input_key="input_ids")
    assert torch.equal(with_mask.embeddings["head-input"][-1], without.embeddings["head-input"][-1])
    assert not any("attention_mask" in line for line in said)


class TwoViews(SquaredOutputTask):
    """Runs each sequence twice (itself and reversed): 2B rows reach the head, and 2B == T here."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(torch.cat([h, h.flip(1)]).mean(1))


@pytest.mark.parametrize("custom_forward", [False, True])
def test_a_forward_repeating_each_example_keeps_the_examples_on_axis_0(custom_forward: bool) -> None:
    # Before: the 8 head rows of 4 sequences of 8 tokens took axis 1 (tokens) for the examples: the default forward
    # cut the sequences to 6 tokens and blamed a mixture-of-experts expert; forward_fn tracked 8 "examples" silently.
    ids = torch.randint(0, VOCAB, (12, 8), generator=torch.Generator().manual_seed(0))
    options = {"forward_fn": lambda m, b: m(b[0])} if custom_forward else {}
    monitor = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=6, eigenscore_passes=0, window=2,
                               **options)
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(TwoViews(), loader, loader)
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    assert monitor._input_axis == 0
    tracked = torch.cat([batch[0] if custom_forward else batch for batch in monitor._batches])
    assert torch.equal(tracked, ids[:8] if custom_forward else ids[:6])  # whole sequences: whole batches, or cut at 6
    left_out = [line for line in said if "head-input gives" in line]
    assert len(left_out) == 1 and "several rows per example" in left_out[0] and "views, beams" in left_out[0]
    assert "head-input" not in monitor.embeddings


def test_an_unknown_eigenscore_names_a_spread_too_large_besides_non_finite_embeddings() -> None:
    # Before: "NaN or inf in the model" alone, where finite embeddings spread too far for the log-det give NaN too.
    monitor = SensitiveNeurons(alpha=1e-3)
    with pytest.warns(UserWarning) as record:
        monitor._warn_unknown("head-input", ["eigenscore", "ees"], 4)
        monitor._warn_unknown("head-input", ["v_mean"], 4)
    scores, sensitivity = (str(w.message) for w in record)
    assert "eigenscore/ees are unknown at step 4" in scores
    assert "NaN or inf in the model" in scores and "spread over the passes is too large" in scores
    assert "NaN or inf in the model" in sensitivity and "spread" not in sensitivity


class PrependedCls(TokenHead):
    """Prepends a learned CLS token: the head's input is (B, T + 1, D), whose positions the (B, T) mask does not fit."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH, generator=torch.Generator().manual_seed(2)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.head(self.body(torch.cat([self.cls.expand(h.shape[0], 1, WIDTH), h], 1)))


def test_a_tap_whose_token_axis_is_not_the_masks_is_said_to_average_the_pads() -> None:
    # Before: the mask was dropped at the (B, T + 1, D) tap with no line, while the fit-start line said the
    # embeddings average each example's real tokens only. Now: the plain mean over all 7 positions, said once per tap.
    batch = padded_batch()
    model = PrependedCls()
    monitor = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=4, eigenscore_passes=0,
                               window=2, input_key="input_ids")
    loader = DataLoader([batch], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(model, loader, loader)
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    table = model.emb.weight.detach().double().numpy()[batch["input_ids"].numpy()]
    tokens = np.concatenate([np.broadcast_to(model.cls.detach().double().numpy(), (4, 1, WIDTH)), table], 1)
    hidden = tokens @ model.body.weight.detach().double().numpy().T + model.body.bias.detach().double().numpy()
    np.testing.assert_allclose(monitor.embeddings["head-input"][-1].numpy(), hidden.mean(1), rtol=1e-5, atol=1e-7)
    unmatched = [line for line in said if "pads included" in line]
    assert len(unmatched) == 1 and "head-input" in unmatched[0] and "7 token positions" in unmatched[0]
    assert "attention_mask has 6" in unmatched[0]
    fit_start = [line for line in said if "beside input_key" in line]
    assert len(fit_start) == 1 and "taps with the mask's token positions" in fit_start[0]


class TwoViewsEncoded(TwoViews):
    """TwoViews with a default (sequence-first) transformer layer the forward feeds ``(T, B, D)`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 1, 8, dropout=0.0)  # batch_first=False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids).transpose(0, 1)).transpose(0, 1)
        return self.head(torch.cat([h, h.flip(1)]).mean(1))


class TwoViewsEncodedMasked(TwoViewsEncoded):
    """With the usual ``src_key_padding_mask``, ``(B, T)`` like the ids whatever the layout."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids).transpose(0, 1), src_key_padding_mask=ids == -1).transpose(0, 1)
        return self.head(torch.cat([h, h.flip(1)]).mean(1))


@pytest.mark.parametrize("model_class", [TwoViewsEncoded, TwoViewsEncodedMasked])
def test_a_module_declaring_batch_first_false_does_not_move_the_example_axis_of_the_inputs(model_class: type) -> None:
    # Before: any module declaring batch_first=False made the (B, T) ids' axis 1 (2B == T rows) the examples: cut to
    # 4 sequences of 6 tokens, and the head blamed on a mixture-of-experts expert. Now axis 0, said once with batch_dim=.
    # R7: the padding mask, shaped like the ids, was taken for the inputs reaching the layer (axis 1 again).
    ids = torch.randint(0, VOCAB, (12, 8), generator=torch.Generator().manual_seed(0))
    monitor = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=6, eigenscore_passes=0, window=2)
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[monitor]).fit(model_class(), loader, loader)
    said = [str(w.message) for w in caught if "SensitiveNeurons" in str(w.message)]
    assert monitor._input_axis == 0 and torch.equal(torch.cat(list(monitor._batches)), ids[:6])
    axis_lines = [line for line in said if "taken along axis 0" in line]
    assert len(axis_lines) == 1 and "batch_dim=1" in axis_lines[0] and "sequence-first" in axis_lines[0]
    assert not any("mixture-of-experts" in line for line in said)


class SequenceFirstTokens(SquaredOutputTask):
    """A language model on ``(T, B)`` token ids, the PyTorch tutorial's layout: embedding, a sequence-first layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, 2)
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 1, 8, dropout=0.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(ids)).mean(0))


@pytest.mark.parametrize("batch_dim", [None, 1])
def test_sequence_first_token_ids_take_axis_1_where_batch_dim_declares_it(batch_dim: int | None) -> None:
    # The ids do not reach the layer as they are, so nothing about them says (T, B): axis 0 and the line naming
    # batch_dim=1 without it; with batch_dim=1 the 5 whole sequences (columns) of 7 tokens.
    ids = torch.randint(0, VOCAB, (16, 7), generator=torch.Generator().manual_seed(0))
    collate = lambda items: torch.stack([item[0] for item in items]).T  # noqa: E731  (T, B)
    loader = DataLoader(TensorDataset(ids), batch_size=4, collate_fn=collate)
    monitor = SensitiveNeurons(modules=["head:input"], every_n_steps=1, num_samples=5, eigenscore_passes=0, window=2,
                               batch_dim=batch_dim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(SequenceFirstTokens(), loader, loader)
    said = [line for line in (str(w.message) for w in caught) if "taken along axis 0" in line]
    if batch_dim is None:
        assert monitor._input_axis == 0 and len(said) == 1 and "batch_dim=1" in said[0]
    else:
        assert monitor._input_axis == 1 and said == []
        assert torch.equal(torch.cat(list(monitor._batches), 1), ids[:5].T)
