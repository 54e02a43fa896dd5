"""Ranking losses: pairwise and listwise over rows grouped by request (only rows of the same
request are compared), and DUPN's point-wise loss over single rows.

Each takes the scores and relevance labels (>= 0, graded or 0/1) of the rows in a task's sample
space, the grouped ones the rows' request ids, the point-wise one the rows' weights; each returns
one scalar. A batch with nothing to compare (no request with two different labels, no relevant
row, no row at all) gives exactly 0 with a zero gradient, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_mtr.groups import padded


def pairwise_logistic_loss(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RankNet (Burges et al., 2005): ``mean over pairs (i, j) of one request with y_i > y_j of
    log(1 + exp(-(s_i - s_j)))``."""
    score, label, mask = padded(groups, scores, labels)
    ordered = (label[:, :, None] > label[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    losses = F.softplus(score[:, None, :] - score[:, :, None])  # [G, i, j]: -log sigmoid(s_i - s_j)
    return (losses * ordered).sum() / ordered.sum().clamp_min(1)


def listwise_softmax_loss(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each request (ListNet's top-one form, Cao et al., 2007):
    ``-sum_i y_i log softmax(s)_i / sum_i y_i``, averaged over requests with a relevant row."""
    score, label, mask = padded(groups, scores, labels)
    log_probs = torch.log_softmax(score.masked_fill(~mask, float("-inf")), dim=1).masked_fill(~mask, 0.0)
    relevance = label.sum(dim=1)
    per_request = -(label * log_probs).sum(dim=1) / relevance.clamp_min(1e-12)
    has_relevant = relevance > 0
    return (per_request * has_relevant).sum() / has_relevant.sum().clamp_min(1)


def pointwise_logistic_loss(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """DUPN's L2R loss (Ni et al., KDD 2018, section 5.2): ``sum_i n_i log(1 + exp(-y_i s_i))`` with
    ``y_i = +1`` where the relevance is > 0, else -1, and ``n_i`` the row's weight (by behaviour
    type), divided by the number of rows.

    Dividing by the row count, not by ``sum_i n_i``, keeps a row of weight n worth exactly n
    copies of it whatever else shares its batch, and makes the loss with every ``n_i = 1`` the
    binary cross-entropy of ``relevance > 0`` averaged as every other task's loss is.
    """
    signs = torch.where(labels > 0, 1.0, -1.0).to(scores.dtype)
    return (weights.to(scores.dtype) * F.softplus(-signs * scores)).sum() / max(scores.numel(), 1)


GROUPED_RANKING_LOSSES = {"pairwise": pairwise_logistic_loss, "listwise": listwise_softmax_loss}
