"""MMoE (Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts").

Experts are shared; each task k has its own softmax gate g^k(x) = softmax(W_k x) over the
experts and a tower on f^k(x) = sum_e g^k(x)_e f_e(x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.nn import ExpertBank, FeatureInput, TaskTowers, mix_experts
from lightning_mtr.schema import Schema


class MMoE(nn.Module):
    """``features -> E experts -> per-task softmax gate mix -> {task: tower -> logit}``.

    Args:
        schema: features and tasks (linked from the data module).
        num_experts: E.
        expert: hidden sizes of every expert MLP.
        tower: hidden sizes of each task tower.
        dropout: dropout in the towers.
    """

    one_gate = False  # OMoE sets True: one gate shared by every task

    def __init__(self, schema: Schema, num_experts: int = 8, expert: Sequence[int] = (256, 128),
                 tower: Sequence[int] = (64,), dropout: float = 0.0):
        super().__init__()
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        self.experts = ExpertBank(self.features.output_dim, num_experts, expert)
        self.num_gates = 1 if self.one_gate else len(self.tasks)
        self.gates = nn.Linear(self.features.output_dim, self.num_gates * num_experts)
        self.towers = TaskTowers(self.tasks, self.experts.output_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        inputs = self.features(dense, sparse)
        gate_logits = self.gates(inputs).view(inputs.shape[0], self.num_gates, -1)  # [B, T or 1, E]
        mixed = mix_experts(self.experts(inputs), gate_logits)  # [B, T or 1, D]
        return self.towers({task: mixed[:, 0 if self.one_gate else t] for t, task in enumerate(self.tasks)})
