"""Scores for rank metrics (AUROC, average precision) that keep the order of a model's logits.

Why: AUROC and AP depend only on the order of the scores, but torchmetrics wants values in [0, 1] (it applies a
sigmoid to a batch with a value outside, per batch) and the sigmoid ties confident examples: in float32 it is exactly
1 from a logit of about 16.6, in bf16 (a ``bf16-mixed`` step) from about 6. Tied positives and negatives halve AP
(a perfectly ranked set read as AP 0.50, AUROC 0.75; under bf16-mixed a detector with AP 0.72 was logged as 0.53).
"""

from __future__ import annotations

import torch


def ranking_scores(logits: torch.Tensor) -> torch.Tensor:
    """``0.5 + x / (2 (1 + |x|))`` in float64 of real-valued ``logits`` (any monotone score): in (0, 1), strictly
    increasing, so AUROC and AP equal those of the logits, with no tie up to ``|x|`` of about 1e15."""
    x = logits.detach().to(torch.float64)
    return 0.5 + 0.5 * x / (1.0 + x.abs())


def probability_of_score(scores: torch.Tensor) -> torch.Tensor:
    """The sigmoid probability of the logit a :func:`ranking_scores` value came from (float64), e.g. for the
    thresholds of a precision-recall curve computed on ranking scores."""
    u = 2.0 * scores.to(torch.float64) - 1.0
    return torch.sigmoid(u / (1.0 - u.abs()))
