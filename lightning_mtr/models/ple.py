"""PLE (Tang et al., RecSys 2020, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations").

Stacked CGC layers (extraction networks): at level j each task k has m_k private experts and the
level has m_s shared ones; task k's gate mixes its own and the shared experts, and every level but
the last also has a shared gate over all experts. Level j+1's task-k input is level j's task-k
output and its shared input level j's shared output; level 1 reads the feature vector everywhere.
Task k's tower sits on its output of the last level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.kernels import Backend
from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import TaskTowers
from lightning_mtr.nn.cgc import CGC
from lightning_mtr.schema import Schema


class PLE(nn.Module):
    """``features -> num_levels CGC layers -> {task: tower(task output of the last level) -> logit}``.

    Shapes: the feature vector ``[B, F]`` feeds level 1; a non-final level outputs
    ``[B, T+1, D_j]`` (T task representations, then the shared one), the last ``[B, T, D]``.

    Args:
        schema: features and tasks (linked from the data module).
        num_levels: number of CGC layers; 1 is the paper's single-level CGC model.
        task_experts: m_k, private experts per task at every level.
        shared_experts: m_s, shared experts at every level.
        expert: hidden sizes of every expert MLP, the same at every level (``[256, 128]``), or one
            list per level (``[[256], [128]]``, as many lists as ``num_levels``).
        tower: hidden sizes of each task tower.
        dropout: dropout in the towers.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix (no effect on
            parameters or checkpoints).
        gate_bias: softmax(W x + b) gates instead of the paper's softmax(W x).
    """

    def __init__(self, schema: Schema, num_levels: int = 2, task_experts: int = 1, shared_experts: int = 1,
                 expert: Sequence[int] | Sequence[Sequence[int]] = (256, 128), tower: Sequence[int] = (64,),
                 dropout: float = 0.0, gate_backend: Backend = "auto", gate_bias: bool = False):
        super().__init__()
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        per_level = _per_level(expert, num_levels)
        levels, in_dim = [], self.features.output_dim
        for level, hidden in enumerate(per_level, start=1):
            shared_gate = level < num_levels
            names = [f"L{level}/{gate}" for gate in [*self.tasks, *(["shared"] if shared_gate else [])]]
            levels.append(CGC(in_dim, len(self.tasks), task_experts, shared_experts, hidden, shared_gate,
                              gate_backend, gate_names=names, gate_bias=gate_bias))
            in_dim = levels[-1].output_dim
        self.levels = nn.Sequential(*levels)
        self.towers = TaskTowers(schema.task_outputs, in_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        mixed = self.levels(self.features(dense, sparse))  # [B, T, D]
        return self.towers(dict(zip(self.tasks, mixed.unbind(1))))


def _per_level(expert: Sequence[int] | Sequence[Sequence[int]], num_levels: int) -> list[list[int]]:
    if num_levels < 1:
        raise ValueError(f"PLE needs num_levels >= 1, got {num_levels}")
    if all(isinstance(width, int) for width in expert):
        return [list(expert)] * num_levels
    if len(expert) != num_levels:
        raise ValueError(f"expert gives sizes for {len(expert)} levels, but num_levels is {num_levels}")
    return [list(hidden) for hidden in expert]
