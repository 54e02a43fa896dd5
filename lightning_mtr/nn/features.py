"""Schema -> TorchRec embedding tables -> one flat feature vector per row."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from lightning_mtr.schema import Schema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_configs(schema: Schema) -> list[EmbeddingBagConfig]:
    """One TorchRec table config per schema table (shared tables list all their features)."""
    return [
        EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                           feature_names=list(t.feature_names), pooling=_POOLING[t.pooling])
        for t in schema.tables
    ]


class FeatureInput(nn.Module):
    """Pooled embeddings of every sparse feature, concatenated after the dense features.

    ``forward(dense [B, F_dense], sparse KJT) -> [B, output_dim]``. The tables live in
    ``self.embeddings``, a plain ``EmbeddingBagCollection`` that the trainer may swap for a
    fused or sharded one without changing parameter names.
    """

    def __init__(self, schema: Schema, device: torch.device | str | None = None):
        super().__init__()
        # Default: the ambient device, so `with torch.device("meta"):` builds tables without memory.
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.embeddings = EmbeddingBagCollection(tables=embedding_configs(schema), device=device)
        self.output_dim = len(schema.dense) + sum(t.embedding_dim * len(t.feature_names) for t in schema.tables)
        self.feature_names = [name for t in schema.tables for name in t.feature_names]
        self.dense_dim = len(schema.dense)
        self.field_dims = {name: t.embedding_dim for t in schema.tables for name in t.feature_names}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if not self.feature_names:
            return dense
        pooled = self.embeddings(sparse)
        # a sharded collection returns its features grouped by shard, in an order that depends on
        # the plan; the layers after it must always see them in the schema's order
        if pooled.keys() != self.feature_names:
            return torch.cat([dense, KeyedTensor.regroup([pooled], [self.feature_names])[0]], dim=1)
        return torch.cat([dense, pooled.values()], dim=1)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings inside ``forward``'s output: ``[B, sum of dims]``, one block per
        feature in ``feature_names`` order, sized by ``field_dims`` (a view: no second lookup)."""
        return features[:, self.dense_dim:]
