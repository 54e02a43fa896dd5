"""Per-group metrics: GAUC (per-user AUC, impression-weighted) and NDCG@k (per request).

Both keep every row's (score, label, group) like the exact AUC does (about 20 bytes a row), are
all-gathered across processes before ``compute`` (a group split between processes is whole
again), and compute without a Python loop over groups (:mod:`lightning_mtr.groups`).
``update(logits, target, groups=...)`` takes ``[B]`` tensors; ``groups`` are int64 ids.
"""

from __future__ import annotations

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from lightning_mtr.groups import order_within_groups


class _GroupedRows(torchmetrics.Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("scores", "targets", "groups"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor, groups: Tensor) -> None:
        self.scores.append(logits.float())
        self.targets.append(target.float())
        self.groups.append(groups.long())

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every row seen (a list of batches here, one tensor once synced across processes)."""
        return tuple(dim_zero_cat(getattr(self, n)) for n in ("scores", "targets", "groups"))


class GroupAUC(_GroupedRows):
    """GAUC (Zhou et al., DIN, KDD 2018): ``sum_g n_g AUC_g / sum_g n_g`` over the groups that
    have both a positive (target > 0) and a negative row; tied scores count half. NaN when no
    group has both."""

    higher_is_better = True

    def compute(self) -> Tensor:
        scores, targets, groups = self._rows()
        grouped = order_within_groups(groups, scores)
        score, positive = scores[grouped.order], (targets[grouped.order] > 0).double()
        # average rank inside each run of tied scores of one group: tied rows count half
        _, tie, tie_sizes = torch.unique_consecutive(torch.stack([grouped.group.double(), score.double()]), dim=1,
                                                     return_inverse=True, return_counts=True)
        tie_rank = torch.zeros(len(tie_sizes), dtype=torch.float64, device=scores.device)
        tie_rank.index_add_(0, tie, grouped.position.double() + 1)
        rank = (tie_rank / tie_sizes)[tie]
        count = grouped.sizes.double()
        positives = torch.zeros_like(count).index_add_(0, grouped.group, positive)
        positive_ranks = torch.zeros_like(count).index_add_(0, grouped.group, rank * positive)
        negatives = count - positives
        both = (positives > 0) & (negatives > 0)
        auc = (positive_ranks - positives * (positives + 1) / 2) / (positives * negatives).clamp_min(1)
        return ((auc * count)[both].sum() / count[both].sum()).float()


class GroupNDCG(_GroupedRows):
    """Mean NDCG@k over groups (Jarvelin and Kekalainen, 2002) with gain ``2^rel - 1`` and discount
    ``log2(1 + rank)``; groups without a relevant row are left out; tied scores keep arrival order.
    NaN when no group has a relevant row."""

    higher_is_better = True

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def _dcg(self, groups: Tensor, key: Tensor, targets: Tensor) -> Tensor:
        grouped = order_within_groups(groups, key, descending=True)
        top = grouped.position < self.k
        gain = (torch.pow(2.0, targets[grouped.order].double()) - 1) / torch.log2(grouped.position.double() + 2)
        return torch.zeros(grouped.num_groups, dtype=torch.float64, device=key.device).index_add_(
            0, grouped.group, gain * top)

    def compute(self) -> Tensor:
        scores, targets, groups = self._rows()
        ideal = self._dcg(groups, targets, targets)
        has_relevant = ideal > 0
        return (self._dcg(groups, scores, targets) / ideal.clamp_min(1e-12))[has_relevant].mean().float()
