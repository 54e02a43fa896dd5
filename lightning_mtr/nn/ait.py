"""AITM's two reusable pieces (Xi et al., KDD 2021, "Modeling the Sequential Dependence among
Audience Multi-step Conversions with Multi-task Learning in Targeted Display Advertising"):
the Adaptive Information Transfer step between consecutive funnel tasks, and the behavioural
expectation calibrator. Shape letters: B batch, D the AIT dim (the paper's k).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_mtr.nn.mlp import MLP


class AdaptiveInformationTransfer(nn.Module):
    """One funnel step t-1 -> t: ``(z_{t-1} [B, D], q_t [B, D]) -> z_t [B, D]``.

    ``p_{t-1} = g(z_{t-1})`` is what task t-1 passes on (the paper's Info function: Linear +
    ReLU, + dropout). Each of the two candidates ``u in {p_{t-1}, q_t}`` is scored by its own
    query-key product and the values are mixed by the softmax of the scores::

        w_u = softmax_u(<h1(u), h2(u)> / sqrt(D)),    z_t = sum_u w_u h3(u)

    with bias-free linear maps h1 (query), h2 (key), h3 (value). ``w`` says, per row, how much
    task t takes from task t-1 rather than from its own tower.

    Example::

        ait = AdaptiveInformationTransfer(32)
        z, w = ait.attend(z_prev, q)  # [B, 32], [B, 2]: (transferred, own), rows sum to 1
    """

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.transfer = MLP(dim, (dim,), dropout)  # g: p_{t-1} = ReLU(W z_{t-1} + b)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def attend(self, previous: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t [B, D], w [B, 2])``; ``w[:, 0]`` weighs the transferred ``p_{t-1}``, ``w[:, 1]`` ``q_t``."""
        candidates = torch.stack([self.transfer(previous), own], dim=1)  # [B, 2, D]
        scores = (self.query(candidates) * self.key(candidates)).sum(-1) / math.sqrt(self.dim)  # [B, 2]
        weights = torch.softmax(scores, dim=1)
        return (weights.unsqueeze(-1) * self.value(candidates)).sum(1), weights

    def forward(self, previous: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return self.attend(previous, own)[0]


def expectation_calibrator(previous_logit: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """``max(p_t - p_{t-1}, 0)`` per row ``[B]`` on probabilities: a later funnel step (conversion)
    should never be more likely than the one before it (click). Computed in fp32 (the
    difference of two probabilities near 1 is lost in bf16)."""
    return (torch.sigmoid(logit.float()) - torch.sigmoid(previous_logit.float())).clamp_min(0.0)
