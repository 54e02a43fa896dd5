"""Dense-feature statistics from the training data, in one streaming pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mtr.data.encode import DenseStats, RowChecker, numeric_column, pretransform_dense
from lightning_mtr.data.reader import Unit, read_tagged, sources_of
from lightning_mtr.schema import Schema

_CHUNK_ROWS = 1 << 16


def compute_dense_stats(schema: Schema, units: Sequence[Unit]) -> DenseStats:
    """Mean and std (float64 accumulation) of each dense feature after its log1p, if any.

    A constant feature gets std 1, so standardising leaves it at 0 instead of dividing by 0.
    """
    features = schema.dense
    total = np.zeros(len(features))
    total_sq = np.zeros(len(features))
    rows = 0
    sources = sources_of(units)
    for table in read_tagged(units, [f.source_column for f in features], _CHUNK_ROWS):
        checker = RowChecker(table, sources)
        for index, feature in enumerate(features):
            raw = numeric_column(table.column(feature.source_column), feature.source_column, checker,
                                 feature.fill_missing)
            values = pretransform_dense(feature, raw)
            total[index] += values.sum()
            total_sq[index] += np.square(values).sum()
        rows += table.num_rows
    if rows == 0:
        raise ValueError("cannot compute dense statistics from zero training rows")
    mean = total / rows
    std = np.sqrt(np.maximum(total_sq / rows - np.square(mean), 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return DenseStats(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
