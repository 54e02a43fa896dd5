"""Per-task towers ending in their logits (one, or one per class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtr.nn.mlp import MLP


class TaskTowers(nn.Module):
    """One ``MLP(hidden) -> Linear(outputs)`` per task: ``{task: [B, in_dim]} -> {task: logits}``,
    ``[B]`` for a one-logit task, ``[B, C]`` for a multiclass one.

    ``tasks``: task names (one logit each) or ``{task: logits per row}`` (``Schema.task_outputs``).
    """

    def __init__(self, tasks: Sequence[str] | Mapping[str, int], in_dim: int, hidden: Sequence[int],
                 dropout: float = 0.0):
        super().__init__()
        outputs = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks, 1)
        self.towers = nn.ModuleDict({
            task: nn.Sequential(MLP(in_dim, hidden, dropout), nn.Linear(hidden[-1] if hidden else in_dim, width))
            for task, width in outputs.items()
        })

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = {task: tower(inputs[task]) for task, tower in self.towers.items()}
        return {task: out[:, 0] if out.shape[1] == 1 else out for task, out in logits.items()}
