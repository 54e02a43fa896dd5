"""``FeatureInput``: the schema's TorchRec tables looked up into one flat feature vector per row
(and, for sequence features, one embedding per element)."""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from lightning_mtr.embeddings.managed import ManagedIds
from lightning_mtr.embeddings.tables import embedding_configs, sequence_configs
from lightning_mtr.nn.features import FeatureLayout
from lightning_mtr.schema import Schema


class FeatureInput(FeatureLayout):
    """Pooled embeddings of every sparse feature, concatenated after the dense features.

    ``forward(dense [B, F_dense], sparse KJT) -> [B, output_dim]``. The tables live in
    ``self.embeddings``, a plain ``EmbeddingBagCollection`` that the trainer may swap for a
    fused or sharded one without changing parameter names; the tables of weighted features
    (``weight_column``) are in ``self.weighted_embeddings`` (``is_weighted=True``; ``embeddings`` is
    None when every pooled table is weighted). Sequence features are not in that
    vector: their tables live in ``self.sequence_embeddings`` (an ``EmbeddingCollection``,
    present only when the schema has sequences) and :meth:`sequences` looks them up. Tables
    with ``managed_collisions`` get their rows from ``self.managed_ids`` (:mod:`.managed`) first.
    """

    def __init__(self, schema: Schema, device: torch.device | str | None = None):
        super().__init__(schema)
        # Default: the ambient device, so `with torch.device("meta"):` builds tables without memory.
        device = torch.device(device) if device is not None else torch.get_default_device()
        unweighted = embedding_configs(schema)
        self.embeddings = EmbeddingBagCollection(tables=unweighted, device=device) \
            if unweighted or not schema.weighted else None
        # TorchRec's weighted tables are a collection of their own: fbgemm's weighted backward on CPU took
        # 2.2x the unweighted one's time (27 tables, B=4096), which the other tables should not pay
        self.weighted_embeddings = EmbeddingBagCollection(tables=embedding_configs(schema, weighted=True),
                                                          is_weighted=True, device=device) if schema.weighted else None
        # weighted tables sum (embedding_configs): these features' sums become means in forward
        self.divided = [f.name for f in schema.sparse if f.weight_column is not None and f.pooling == "mean"]
        if schema.sequence_tables:
            self.sequence_embeddings = EmbeddingCollection(tables=sequence_configs(schema), device=device)
        self.managed_ids = ManagedIds(schema.managed_tables, device=device) if schema.managed_tables else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if not self.feature_names:
            return dense
        if self.managed_ids is not None:
            sparse = self.managed_ids(sparse)
        # each collection takes its own features from the whole batch: a sharded one must see the
        # same keys every time; the unweighted one without the weights, which a sharded one would apply
        pooled = []
        if self.embeddings is not None:
            pooled.append(self.embeddings(sparse if sparse.weights_or_none() is None else KeyedJaggedTensor(
                keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(), stride=sparse.stride())))
        if self.weighted_embeddings is not None:
            pooled.append(self.weighted_embeddings(sparse))
        # a sharded collection returns its features grouped by shard, in an order that depends on
        # the plan; the layers after it must always see them in the schema's order
        if len(pooled) > 1 or pooled[0].keys() != self.feature_names:
            values = KeyedTensor.regroup(pooled, [self.feature_names])[0]
        else:
            values = pooled[0].values()
        return torch.cat([dense, self._means(values, sparse) if self.divided else values], dim=1)

    def _means(self, pooled: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Weighted sums ``[B, sum of dims]`` with the mean-pooled features' blocks divided by their bags'
        id counts: ``sum_i w_i e_i / n``, TorchRec's (fbgemm's) weighted mean; an empty bag stays zero."""
        keys, lengths = sparse.keys(), sparse.lengths().view(len(sparse.keys()), -1)
        blocks = pooled.split([self.field_dims[n] for n in self.feature_names], dim=1)
        return torch.cat([block / lengths[keys.index(name)].clamp_min(1).to(block.dtype)[:, None]
                          if name in self.divided else block for name, block in zip(self.feature_names, blocks)], dim=1)

    def sequences(self, sparse: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{feature: (embeddings [B, L, D], lengths [B])}`` for every sequence feature, zero past
        each row's length; L is the longest sequence of the batch. Empty without sequence features."""
        if not self.sequence_names:
            return {}
        looked_up = self.sequence_embeddings(sparse)
        return {name: (_padded(looked_up[name]), looked_up[name].lengths()) for name in self.sequence_names}


def _padded(jagged: JaggedTensor) -> torch.Tensor:
    """Jagged ``values [sum of lengths, D]`` as ``[B, longest, D]``, zeros after each row's end; at
    least one step, so a batch of empty sequences still has a shape.

    TorchRec's ``to_padded_dense`` (fbgemm's ``jagged_to_padded_dense``), the same values as
    indexing into zeros and faster: at B=4096, lengths 0-50, D=16 on one CPU thread, 2.7 against
    5.4 ms forward and backward, 0.56 against 3.1 ms forward only. Its CPU kernel has no float64,
    which table lookups (fp32, fp16) never return. An exported program may call ATen operators
    only, so serving pads in its own lookup (``serving/features.py``, which scatters the rows
    straight into the padded block)."""
    lengths = jagged.lengths()
    steps = max(int(lengths.max()) if lengths.numel() else 0, 1)
    return jagged.to_padded_dense(desired_length=steps)
