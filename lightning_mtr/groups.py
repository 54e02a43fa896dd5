"""Rows grouped by a key (a request id, a user id): the one place that orders rows within groups.

Ranking losses and per-group metrics (NDCG@k, GAUC) all need, for each row, its group and its
place in that group under some order. :func:`order_within_groups` does it with two stable sorts,
vectorised (no Python loop over groups), and :func:`padded` lays the groups out as a
``[groups, longest group]`` matrix for the pairwise and listwise losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupOrder:
    """Rows sorted by group, then by a key inside each group.

    Attributes:
        order: the row permutation ``[N]``.
        group: compact group index ``[N]`` (0..groups-1) of each sorted row.
        position: 0-based place of each sorted row inside its group.
        sizes: rows per group ``[groups]``.
    """

    order: torch.Tensor
    group: torch.Tensor
    position: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.sizes.numel()


def order_within_groups(groups: torch.Tensor, key: torch.Tensor, descending: bool = False) -> GroupOrder:
    """Sort rows by ``groups``, and within a group by ``key`` (ties keep row order)."""
    by_key = torch.sort(key, stable=True, descending=descending).indices
    order = by_key[torch.sort(groups[by_key], stable=True).indices]
    _, group, sizes = torch.unique_consecutive(groups[order], return_inverse=True, return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(order.numel(), device=order.device) - starts[group]
    return GroupOrder(order, group, position, sizes)


def padded(groups: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``values [N]`` as ``[groups, longest group]`` (rows in their original order inside a
    group, zeros after), then the mask of real entries; the groups are ordered once for all.
    Cost follows groups x longest group, so one huge group costs as if every group were that large."""
    grouped = order_within_groups(groups, torch.arange(groups.numel(), device=groups.device))
    width = int(grouped.sizes.max()) if grouped.num_groups else 0
    mask = torch.zeros(grouped.num_groups, width, dtype=torch.bool, device=groups.device)
    mask[grouped.group, grouped.position] = True
    layouts = []
    for value in values:
        out = value.new_zeros(grouped.num_groups, width)
        out[grouped.group, grouped.position] = value[grouped.order]
        layouts.append(out)
    return (*layouts, mask)
