"""Scores for rank metrics (AUROC, average precision) that keep the order of a model's logits.

Why: AUROC and AP depend only on the order of the scores, but torchmetrics wants values in [0, 1] (it applies a
sigmoid to a batch with a value outside, per batch) and the sigmoid ties confident examples: in float32 it is exactly
1 from a logit of about 16.6, in bf16 (a ``bf16-mixed`` step) from about 6. Tied positives and negatives halve AP
(a perfectly ranked set read as AP 0.50, AUROC 0.75; under bf16-mixed a detector with AP 0.72 was logged as 0.53).
"""

from __future__ import annotations

import torch
import torchmetrics
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def ranking_scores(logits: torch.Tensor) -> torch.Tensor:
    """``0.5 + x / (2 (1 + |x|))`` in float64 of real-valued ``logits`` (any monotone score): in (0, 1), strictly
    increasing, so AUROC and AP equal those of the logits, with no tie up to ``|x|`` of about 1e15. ``+inf`` and
    ``-inf`` (float16 overflow, an exploding model) are the extremes 1 and 0 (the formula gives inf / inf = NaN);
    a NaN logit stays NaN: it has no rank (see :class:`NaNLogitCount`)."""
    x = logits.detach().to(torch.float64)
    return torch.where(x.isinf(), (x > 0).to(torch.float64), 0.5 + 0.5 * x / (1.0 + x.abs()))


class NaNLogitCount(torchmetrics.Metric):
    """NaN logits of an epoch, summed over ranks: a rank metric (AUROC, AP) of NaN scores is not a measurement
    (torchmetrics sorts them as distinct thresholds: the value then depends only on the data order), so the tasks log
    it as NaN when this is > 0, as they keep a NaN loss."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor) -> None:
        self.count += logits.detach().isnan().sum()

    def compute(self) -> torch.Tensor:
        return self.count

    def epoch_total(self) -> int:
        """The epoch's count over every rank (a collective: every rank must call it), reset for the next epoch."""
        if self.update_count == 0:  # no batch on this rank: an empty update, so compute() does not warn
            self.update(torch.zeros(0, device=self.count.device))
        total = int(self.compute())
        self.reset()
        return total


def warn_nan_rank_metrics(task: str, stage: str, count: int, names: str) -> None:
    """The one warning of a stage whose rank metrics are logged as NaN because of NaN logits."""
    rank_zero_warn(
        f"{task}: {count} {stage} logits are NaN (a diverged model, see {stage}/loss): {names} rank NaN scores, not "
        "the model, and are logged as NaN"
    )


def probability_of_score(scores: torch.Tensor) -> torch.Tensor:
    """The sigmoid probability of the logit a :func:`ranking_scores` value came from (float64), e.g. for the
    thresholds of a precision-recall curve computed on ranking scores."""
    u = 2.0 * scores.to(torch.float64) - 1.0
    return torch.sigmoid(u / (1.0 - u.abs()))
