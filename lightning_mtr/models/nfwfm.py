"""Neural FwFM, multi-task: a field-weighted factorisation machine (Pan et al., WWW 2018,
"Field-weighted Factorization Machines for Click-Through Rate Prediction in Display
Advertising") beside an MLP, both hard-shared across tasks (as in Shared-Bottom), with one
head per task.

Every sparse feature is a field. The FwFM scores ``w0 + sum_F <v_F, w_F> + sum_{i<j}
r_{F(i),F(j)} <v_i, v_j>`` over the features (ids) of a row: a multi-hot field enters with
each of its elements, its elements pairing with each other through a same-field weight r_FF
(``nn/fwfm.py``); a single-valued field has no same-field pair. The MLP reads the dense
features and every field's vector. Each task's head sees ``[MLP output, FwFM score]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import MLP, TaskTowers
from lightning_mtr.nn.fwfm import FieldVectors, FwFM, MultiHot, bag_vector
from lightning_mtr.schema import Schema


class NFwFM(nn.Module):
    """``features -> {MLP, FwFM} (shared) -> {task: tower([mlp, fwfm]) -> logit}``.

    The FwFM enters every head as one shared score, not as its P pair terms: a head's first
    linear layer would give each pair its own per-task weight, making r redundant. With
    ``tower: []`` each head is linear, ``logit_t = a_t * fwfm + <u_t, mlp> + b_t``: a
    DeepFM-style sum with a per-task scale on the FwFM.

    A multi-hot field's elements are needed one by one (for its same-field pairs), so under
    ``multi_hot: sum`` it is a ``sequence: true`` feature, looked up unpooled by TorchRec's
    ``EmbeddingCollection`` (sharded like the pooled tables); the pooled tables give the
    single-valued fields. Looking a pooled table up a second time, unpooled, would run its fused
    optimizer twice per step.

    Args:
        schema: features and tasks (linked from the data module); at least 2 sparse features.
        hidden: hidden sizes of the shared MLP.
        tower: hidden sizes of each task's head before its logit.
        dropout: dropout after every hidden layer.
        field_dim: None: the FwFM uses the sparse features' common ``embedding_dim`` and a
            schema whose features differ is refused; k: each feature's embedding (each element
            of a multi-hot one) is first projected to k by its own linear map.
        linear: include FwFM's bias and per-field linear terms.
        multi_hot: ``sum``: the paper's FwFM, a multi-hot field is the sum of its elements and
            its elements pair with each other (weight r_FF); ``mean``: its mean, no same-field
            pairs (a ``multi_valued`` pooled feature must then pool by mean).
    """

    def __init__(self, schema: Schema, hidden: Sequence[int] = (256, 128), tower: Sequence[int] = (64,),
                 dropout: float = 0.0, field_dim: int | None = None, linear: bool = True,
                 multi_hot: MultiHot = "sum"):
        super().__init__()
        _check_multi_hot(schema, multi_hot)
        self.tasks = schema.task_names
        self.features = FeatureInput(schema)
        self.multi_hot = multi_hot
        self.bags = list(self.features.sequence_names)
        self.fields = FieldVectors(self.features.field_dims, dict.fromkeys(self.bags, self.features.sequence_dim),
                                   field_dim, multi_hot)
        pooled = len(self.features.field_dims)
        same_field = range(pooled, pooled + len(self.bags)) if multi_hot == "sum" else ()
        self.fwfm = FwFM(pooled + len(self.bags), self.fields.dim, linear, same_field)
        self.mlp = MLP(self.features.output_dim + self.features.widths(self.bags), hidden, dropout)
        self.towers = TaskTowers(schema.task_outputs, self.mlp.output_dim + 1, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        features = self.features(dense, sparse)  # [B, dense + sum of pooled dims]
        looked_up = self.features.sequences(sparse) if self.bags else {}
        bags = [looked_up[name] for name in self.bags]  # (elements [B, L, D], lengths [B]) per multi-hot field
        score = self.fwfm(*self.fields(self.features.pooled(features), bags))  # [B]
        inputs = torch.cat([features] + [bag_vector(e, n, self.multi_hot) for e, n in bags], dim=1)
        shared = torch.cat([self.mlp(inputs), score.unsqueeze(1)], dim=1)  # [B, D + 1], the same for every task
        return self.towers({task: shared for task in self.tasks})


def _check_multi_hot(schema: Schema, multi_hot: MultiHot) -> None:
    """A pooled multi-valued feature has lost its elements: refuse what would need them."""
    pooled = [f for f in schema.sparse if f.multi_valued and not f.sequence]
    if multi_hot == "sum" and pooled:
        raise ValueError(f"NFwFM (multi_hot: sum) pairs the elements of a multi-hot field with each other (the "
                         f"paper's same-field weight), but {[f.name for f in pooled]} are multi_valued features "
                         "pooled by their tables; declare them sequence: true (looked up element by element) or "
                         "set multi_hot: mean (each field the mean of its elements, no same-field pairs)")
    summed = [f.name for f in pooled if f.pooling != "mean"]
    if multi_hot == "mean" and summed:
        raise ValueError(f"NFwFM (multi_hot: mean) reads multi-valued features as their tables pool them, but "
                         f"{summed} pool by sum; give them pooling: mean")
