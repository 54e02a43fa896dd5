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

from lightning_mtr.kernels import Backend
from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import MixtureBottom, TaskTowers
from lightning_mtr.schema import Schema


class MMoE(nn.Module):
    """``features -> E experts -> per-task softmax gate mix -> {task: tower -> logit}``.

    Args:
        schema: features and tasks (linked from the data module).
        num_experts: E.
        expert: hidden sizes of every expert MLP.
        tower: hidden sizes of each task tower.
        dropout: dropout in the towers.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix (no effect on
            parameters or checkpoints).
        gate_bias: softmax(W_k x + b_k) gates instead of the paper's softmax(W_k x).
    """

    one_gate = False  # OMoE sets True: one gate shared by every task

    def __init__(self, schema: Schema, num_experts: int = 8, expert: Sequence[int] = (256, 128),
                 tower: Sequence[int] = (64,), dropout: float = 0.0, gate_backend: Backend = "auto",
                 gate_bias: bool = False):
        super().__init__()
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        self.bottom = MixtureBottom(self.features.output_dim, len(self.tasks), num_experts, expert, self.one_gate,
                                    gate_backend, gate_names=["shared"] if self.one_gate else self.tasks,
                                    gate_bias=gate_bias)
        self.towers = TaskTowers(schema.task_outputs, self.bottom.output_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.towers(dict(zip(self.tasks, self.bottom(self.features(dense, sparse)))))
