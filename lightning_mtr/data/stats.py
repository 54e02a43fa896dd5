"""Dense-feature statistics from the training data, in one streaming pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from lightning_mtr.data.encode import DenseStats, RowChecker, numeric_column, pretransform_dense
from lightning_mtr.data.reader import Unit, read_tagged, sources_of
from lightning_mtr.derived import QuantileSample
from lightning_mtr.schema import Schema

_CHUNK_ROWS = 1 << 16


def compute_dense_stats(schema: Schema, units: Sequence[Unit]) -> DenseStats:
    """Mean and std (float64) of each dense feature after its log1p, if any.

    Chunks are merged with Chan et al.'s pairwise update of (mean, sum of squared deviations):
    ``E[x^2] - E[x]^2`` cancels catastrophically when the mean dwarfs the spread (timestamps).
    A constant feature gets std 1, so standardising leaves it at 0 instead of dividing by 0.
    ``quantiles`` sparse features get their boundaries from a sample of the same pass
    (:class:`~lightning_mtr.derived.QuantileSample`).
    """
    features = schema.dense
    mean = np.zeros(len(features))
    squares = np.zeros(len(features))  # sum of squared deviations from the mean
    rows = 0
    sources = sources_of(units)
    bucketed = {f.name: (f, QuantileSample()) for f in schema.sparse if f.quantiles}
    columns = list(dict.fromkeys([f.source_column for f in features] + [f.source_column for f, _ in bucketed.values()]))
    for table in read_tagged(units, columns, _CHUNK_ROWS, numeric=columns):
        checker = RowChecker(table, sources)
        for feature, sample in bucketed.values():
            sample.add(table.column(feature.source_column).cast(pa.float64()).fill_null(np.nan).to_numpy())
        for index, feature in enumerate(features):
            raw = numeric_column(table.column(feature.source_column), feature.source_column, checker,
                                 feature.fill_missing)
            values = pretransform_dense(feature, raw)
            if not len(values):
                continue
            count, chunk_mean = len(values), values.mean()
            delta = chunk_mean - mean[index]
            squares[index] += np.square(values - chunk_mean).sum() + delta**2 * rows * count / (rows + count)
            mean[index] += delta * count / (rows + count)
        rows += table.num_rows
    if rows == 0:
        raise ValueError("cannot compute dense statistics from zero training rows")
    std = np.sqrt(squares / rows)
    std = np.where(std > 1e-12, std, 1.0)
    return DenseStats(mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                      boundaries=tuple(sample.boundaries(f.quantiles) for f, sample in bucketed.values()))


def blend_stats(previous: DenseStats, today: DenseStats, weight: float) -> DenseStats:
    """The statistics of a mixture: ``previous``'s distribution weighted ``1 - weight`` and
    ``today``'s ``weight`` (a warm start's running blend; repeated daily, an exponential moving
    average of the days' first and second moments).

    mean = (1 - w) m0 + w m1, and the mixture's second moment gives
    var = (1 - w) s0^2 + w s1^2 + w (1 - w) (m1 - m0)^2: stds are never averaged, and the form
    avoids ``E[x^2] - mean^2``, which cancels when the mean dwarfs the spread. Quantile boundaries
    are averaged likewise, each quantile ``(1 - w) q0 + w q1`` (the mixture's quantiles only
    approximately; a feature without values on one side keeps the other's).
    """
    m0, m1, s0, s1 = (np.asarray(v, dtype=np.float64) for v in (previous.mean, today.mean, previous.std, today.std))
    mean = (1 - weight) * m0 + weight * m1
    var = (1 - weight) * s0**2 + weight * s1**2 + weight * (1 - weight) * (m1 - m0) ** 2
    boundaries = tuple(tuple(float(x) for x in (1 - weight) * np.asarray(b0) + weight * np.asarray(b1))
                       if len(b0) == len(b1) else b0 or b1 for b0, b1 in zip(previous.boundaries, today.boundaries))
    return DenseStats(mean=tuple(map(float, mean)), std=tuple(map(float, np.sqrt(var))), boundaries=boundaries)
