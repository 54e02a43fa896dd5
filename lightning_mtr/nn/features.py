"""Where each feature sits in a model's flat feature vector, without any tables (the tables and
their lookup: ``lightning_mtr.embeddings``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lightning_mtr.schema import Schema


class FeatureLayout(nn.Module):
    """Where each feature sits in the flat feature vector, without any tables: what the models
    read besides ``forward`` and ``sequences``. :class:`~lightning_mtr.embeddings.FeatureInput`
    fills it from TorchRec tables for training; ``lightning_mtr.serving`` from plain tensors for an
    exported program."""

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
