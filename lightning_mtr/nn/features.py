"""Schema -> TorchRec embedding tables -> one flat feature vector per row (and, for sequence
features, one embedding per element)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor, KeyedTensor,
)
from torchrec.modules.embedding_configs import PoolingType

from lightning_mtr.schema import EmbeddingTable, Schema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _table_arguments(table: EmbeddingTable) -> dict:
    """What every TorchRec config of ``table`` gets; an unset init range keeps TorchRec's default,
    which the fused, sharded and unpooled tables all read from the config."""
    init = {} if table.init_range is None else {"weight_init_min": -table.init_range,
                                                 "weight_init_max": table.init_range}
    return dict(name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
                feature_names=list(table.feature_names), **init)


def embedding_configs(schema: Schema) -> list[EmbeddingBagConfig]:
    """One TorchRec table config per pooled schema table (shared tables list all their features)."""
    return [EmbeddingBagConfig(**_table_arguments(t), pooling=_POOLING[t.pooling]) for t in schema.pooled_tables]


def sequence_configs(schema: Schema) -> list[EmbeddingConfig]:
    """One TorchRec table config per table of sequence features (looked up unpooled)."""
    return [EmbeddingConfig(**_table_arguments(t)) for t in schema.sequence_tables]


class FeatureLayout(nn.Module):
    """Where each feature sits in the flat feature vector, without any tables: what the models
    read besides ``forward`` and ``sequences``. :class:`FeatureInput` fills it from TorchRec
    tables for training; ``lightning_mtr.serving`` from plain tensors for an exported program."""

    def __init__(self, schema: Schema):
        super().__init__()
        tables = schema.pooled_tables
        self.output_dim = len(schema.dense) + sum(t.embedding_dim * len(t.feature_names) for t in tables)
        self.feature_names = [name for t in tables for name in t.feature_names]
        self.sequence_names = [name for t in schema.sequence_tables for name in t.feature_names]
        self.dense_dim = len(schema.dense)
        self.dense_names = [f.name for f in schema.dense]
        self.sequence_dim = schema.sequence_tables[0].embedding_dim if schema.sequence_tables else 0
        self.field_dims = {name: t.embedding_dim for t in tables for name in t.feature_names}
        stops = len(schema.dense) + np.cumsum([0] + [self.field_dims[n] for n in self.feature_names])
        # each pooled feature's columns in forward's output
        self.offsets = {name: (int(a), int(b)) for name, a, b in zip(self.feature_names, stops[:-1], stops[1:])}

    def columns(self, features: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The pooled embeddings of the named features inside ``forward``'s output, concatenated in
        the given order (``[B, sum of their dims]``)."""
        unknown = [n for n in names if n not in self.offsets]
        if unknown:
            raise ValueError(f"unknown pooled sparse features {unknown}; known: {self.feature_names}")
        return torch.cat([features[:, :0]] + [features[:, slice(*self.offsets[n])] for n in names], dim=1)

    def widths(self, names: Sequence[str]) -> int:
        """Columns of the named features in :meth:`gather`'s output."""
        known = self.dense_names + self.feature_names + self.sequence_names
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {known}")
        return sum(1 if n in self.dense_names else self.field_dims.get(n, self.sequence_dim) for n in names)

    def gather(self, features: torch.Tensor, sequences: dict[str, tuple[torch.Tensor, torch.Tensor]],
               names: Sequence[str]) -> torch.Tensor:
        """The named features side by side, ``[B, sum of widths]``, from ``forward``'s output and
        :meth:`sequences`: a dense feature is its column, a pooled one its embedding, a sequence
        one the sum of its elements' embeddings (a single id stored as a sequence of one, such as a
        candidate item sharing the history's table, is its embedding; zero when null). Callers
        check their names once, with :meth:`widths`, when they size their layers."""
        parts = [features[:, :0]]
        for name in names:
            if name in self.dense_names:
                column = self.dense_names.index(name)
                parts.append(features[:, column:column + 1])
            elif name in self.offsets:
                parts.append(features[:, slice(*self.offsets[name])])
            else:
                parts.append(sequences[name][0].sum(dim=1))
        return torch.cat(parts, dim=1)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings inside ``forward``'s output: ``[B, sum of dims]``, one block per
        feature in ``feature_names`` order, sized by ``field_dims`` (a view: no second lookup)."""
        return features[:, self.dense_dim:]


class FeatureInput(FeatureLayout):
    """Pooled embeddings of every sparse feature, concatenated after the dense features.

    ``forward(dense [B, F_dense], sparse KJT) -> [B, output_dim]``. The tables live in
    ``self.embeddings``, a plain ``EmbeddingBagCollection`` that the trainer may swap for a
    fused or sharded one without changing parameter names. Sequence features are not in that
    vector: their tables live in ``self.sequence_embeddings`` (an ``EmbeddingCollection``,
    present only when the schema has sequences) and :meth:`sequences` looks them up.
    """

    def __init__(self, schema: Schema, device: torch.device | str | None = None):
        super().__init__(schema)
        # Default: the ambient device, so `with torch.device("meta"):` builds tables without memory.
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.embeddings = EmbeddingBagCollection(tables=embedding_configs(schema), device=device)
        if schema.sequence_tables:
            self.sequence_embeddings = EmbeddingCollection(tables=sequence_configs(schema), device=device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if not self.feature_names:
            return dense
        # each collection takes its own features from the whole batch: a sharded one must see the
        # same keys every time, including when its input distribution is started early
        pooled = self.embeddings(sparse)
        # a sharded collection returns its features grouped by shard, in an order that depends on
        # the plan; the layers after it must always see them in the schema's order
        if pooled.keys() != self.feature_names:
            return torch.cat([dense, KeyedTensor.regroup([pooled], [self.feature_names])[0]], dim=1)
        return torch.cat([dense, pooled.values()], dim=1)

    def sequences(self, sparse: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{feature: (embeddings [B, L, D], lengths [B])}`` for every sequence feature, zero past
        each row's length; L is the longest sequence of the batch. Empty without sequence features."""
        if not self.sequence_names:
            return {}
        looked_up = self.sequence_embeddings(sparse)
        return {name: _padded(looked_up[name].values(), looked_up[name].lengths()) for name in self.sequence_names}


def _padded(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``values [sum of lengths, D]`` as ``[B, longest, D]`` (zeros after each row's end;
    at least one step, so a batch of empty sequences still has a shape)."""
    lengths = lengths.long()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(values.shape[0], device=values.device) - starts[rows]
    out = values.new_zeros(lengths.numel(), max(int(lengths.max()) if lengths.numel() else 0, 1), values.shape[1])
    out[rows, positions] = values
    return out, lengths
