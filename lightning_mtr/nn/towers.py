"""Per-task towers ending in one logit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtr.nn.mlp import MLP


class TaskTowers(nn.Module):
    """One ``MLP(hidden) -> Linear(1)`` per task: ``{task: [B, in_dim]} -> {task: [B]}`` logits."""

    def __init__(self, tasks: Sequence[str], in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.towers = nn.ModuleDict({
            task: nn.Sequential(MLP(in_dim, hidden, dropout), nn.Linear(hidden[-1] if hidden else in_dim, 1))
            for task in tasks
        })

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {task: tower(inputs[task])[:, 0] for task, tower in self.towers.items()}
