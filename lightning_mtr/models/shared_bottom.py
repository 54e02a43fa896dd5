"""Shared-Bottom (Caruana, "Multitask Learning", 1997): hard parameter sharing.

All tasks share the bottom layers; the network splits into one tower per task only at
its last layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import SharedMLP, TaskTowers
from lightning_mtr.schema import Schema


class SharedBottom(nn.Module):
    """``features -> MLP(bottom) -> {task: MLP(tower) -> logit}``.

    Args:
        schema: features and tasks (linked from the data module).
        bottom: hidden sizes of the shared layers.
        tower: hidden sizes of each task's own layers.
        dropout: dropout after every hidden layer.
    """

    def __init__(self, schema: Schema, bottom: Sequence[int] = (256, 128), tower: Sequence[int] = (64,),
                 dropout: float = 0.0):
        super().__init__()
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        self.bottom = SharedMLP(self.features.output_dim, len(self.tasks), bottom, dropout)
        self.towers = TaskTowers(schema.task_outputs, self.bottom.output_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.towers(dict(zip(self.tasks, self.bottom(self.features(dense, sparse)))))  # one tensor, T times
