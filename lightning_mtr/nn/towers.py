"""Per-task towers ending in their logits (one, or one per class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_mtr.nn.mlp import MLP


class TaskTowers(nn.Module):
    """One ``MLP(hidden) -> Linear(outputs)`` per task: ``{task: [B, in_dim]} -> {task: logits}``,
    ``[B]`` for a one-logit task, ``[B, C]`` for a multiclass one.

    ``tasks``: task names (one logit each) or ``{task: logits per row}`` (``Schema.task_outputs``);
    ``in_dim``: one input size for every task, or ``{task: input size}`` where they differ.
    """

    def __init__(self, tasks: Sequence[str] | Mapping[str, int], in_dim: int | Mapping[str, int],
                 hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        outputs = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks, 1)
        sizes = in_dim if isinstance(in_dim, Mapping) else dict.fromkeys(outputs, in_dim)
        self.towers = nn.ModuleDict({
            task: nn.Sequential(MLP(sizes[task], hidden, dropout),
                                nn.Linear(hidden[-1] if hidden else sizes[task], width))
            for task, width in outputs.items()
        })

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = {task: tower(inputs[task]) for task, tower in self.towers.items()}
        return {task: out[:, 0] if out.shape[1] == 1 else out for task, out in logits.items()}


class FeatureWeightedScore(nn.Module):
    """A score linear in given features with weights computed from a context (DUPN's learning to
    rank, Ni et al., KDD 2018, section 5.2: ``score_i = weight(rep)^T r_i`` over the candidate's
    ranking features ``r_i``): ``forward(context [B, C], features [B, R]) -> [B]``, where
    ``weight`` is ``MLP(hidden) -> Linear(R)``, so each user weighs the same features their own way.
    """

    def __init__(self, context_dim: int, num_features: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        mlp = MLP(context_dim, hidden, dropout)
        self.weight = nn.Sequential(mlp, nn.Linear(mlp.output_dim, num_features))

    def forward(self, context: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return (self.weight(context) * features).sum(dim=1)
