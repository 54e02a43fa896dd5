"""Weighted ids (TorchEasyRec's weighted IdFeature): the weights of a ``weight_column`` beside its
id lists, checked row by row, in the layout of TorchRec's weighted ``KeyedJaggedTensor``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lightning_mtr.data.arrow import is_list, one_chunk
from lightning_mtr.schema import SparseFeature


def is_weight_list(dtype: pa.DataType) -> bool:
    """A column of lists of numbers (a null or empty list is an empty bag's weights)."""
    if not is_list(dtype):
        return False
    value = dtype.value_type
    return pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_null(value)


def bag_weights(table: pa.Table, feature: SparseFeature, checker) -> np.ndarray:
    """float32 weights of the ids of ``feature`` (it has a ``weight_column``), id for id as the
    encoder keeps them (the first ``max_length`` of each row).

    Refuses, naming the file, the rows and the column: a row whose list of weights is not as long
    as its list of ids (a null list counts as empty), a null weight, a NaN or an infinite one."""
    counts = _lengths(one_chunk(table.column(feature.source_column)))
    column = feature.weight_column
    weights = one_chunk(table.column(column))
    given = _lengths(weights)
    mismatch = given != counts
    if mismatch.any():
        row = int(np.flatnonzero(mismatch)[0])
        checker.fail_rows(mismatch, f"column {column!r}: {given[row]} weight(s) for {counts[row]} id(s) of column "
                                    f"{feature.source_column!r} in {_rows(table, mismatch)}",
                          f"weight_column {column!r} needs one weight per id, row by row (sparse feature "
                          f"{feature.name!r})")
    flat = weights.flatten() if is_list(weights.type) else pa.array([], pa.float64())
    values = np.asarray(flat.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), np.float64)
    bad_ids = ~np.isfinite(values)
    if bad_ids.any():
        bad = np.zeros(table.num_rows, bool)
        bad[np.repeat(np.arange(table.num_rows), counts)[bad_ids]] = True
        first = int(np.flatnonzero(bad_ids)[0])
        example = "null" if not flat[first].is_valid else f"{values[first]:g}"
        checker.fail_rows(bad, f"column {column!r}: a null, NaN or infinite weight (e.g. {example}) in "
                               f"{_rows(table, bad)}", "weights must be finite numbers")
    if feature.max_length is not None and counts.max(initial=0) > feature.max_length:
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        values = values[(np.arange(len(values)) - starts) < feature.max_length]
    return values.astype(np.float32)




def _lengths(array: pa.Array) -> np.ndarray:
    """int64 list lengths per row; 0 for a null list, and for every row of an all-null (null-typed) column."""
    if not is_list(array.type):
        return np.zeros(len(array), np.int64)
    return np.asarray(array.value_lengths().fill_null(0), dtype=np.int64)


def _rows(table: pa.Table, bad: np.ndarray) -> str:
    """``rows F-L`` (``row F``): the bad rows' numbers in the file of the first one (0-based)."""
    from lightning_mtr.data.encode import ROW_COLUMN, SOURCE_COLUMN  # encode imports this module

    first = int(np.flatnonzero(bad)[0])
    if ROW_COLUMN not in table.column_names:
        return f"row {first} of the batch"
    files = table.column(SOURCE_COLUMN).to_numpy()
    rows = table.column(ROW_COLUMN).to_numpy()[bad & (files == files[first])]
    low, high = int(rows.min()), int(rows.max())
    return f"row {low}" if low == high else f"rows {low}-{high}"
