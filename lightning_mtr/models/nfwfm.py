"""Neural FwFM, multi-task: a field-weighted factorisation machine (Pan et al., WWW 2018,
"Field-weighted Factorization Machines for Click-Through Rate Prediction in Display
Advertising") beside an MLP, both hard-shared across tasks (as in Shared-Bottom), with one
head per task.

The FwFM reads the pooled embedding of every sparse feature as a field vector v_i and scores
``w0 + sum_i <v_i, w_i> + sum_{i<j} r_ij <v_i, v_j>``; the MLP reads the dense features and
all embeddings. Each task's head sees ``[MLP output, FwFM score]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.nn import MLP, FeatureInput, TaskTowers
from lightning_mtr.nn.fwfm import FieldVectors, FwFM
from lightning_mtr.schema import Schema


class NFwFM(nn.Module):
    """``features -> {MLP, FwFM} (shared) -> {task: tower([mlp, fwfm]) -> logit}``.

    The FwFM enters every head as one shared score, not as its P pair terms: a head's first
    linear layer would give each pair its own per-task weight, making r redundant. With
    ``tower: []`` each head is linear, ``logit_t = a_t * fwfm + <u_t, mlp> + b_t``: a
    DeepFM-style sum with a per-task scale on the FwFM.

    Args:
        schema: features and tasks (linked from the data module); at least 2 sparse features.
        hidden: hidden sizes of the shared MLP.
        tower: hidden sizes of each task's head before its logit.
        dropout: dropout after every hidden layer.
        field_dim: None: the FwFM uses the sparse features' common ``embedding_dim`` and a
            schema whose features differ is refused; k: each feature's embedding is first
            projected to k by its own linear map.
        linear: include FwFM's bias and per-field linear terms.
    """

    def __init__(self, schema: Schema, hidden: Sequence[int] = (256, 128), tower: Sequence[int] = (64,),
                 dropout: float = 0.0, field_dim: int | None = None, linear: bool = True):
        super().__init__()
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        self.fields = FieldVectors(self.features.field_dims, field_dim)
        self.fwfm = FwFM(len(self.features.field_dims), self.fields.dim, linear)
        self.mlp = MLP(self.features.output_dim, hidden, dropout)
        self.towers = TaskTowers(schema.task_outputs, self.mlp.output_dim + 1, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        features = self.features(dense, sparse)  # [B, dense + sum of dims]
        score = self.fwfm(self.fields(self.features.pooled(features)))  # [B]
        shared = torch.cat([self.mlp(features), score.unsqueeze(1)], dim=1)  # [B, D + 1], the same for every task
        return self.towers({task: shared for task in self.tasks})
