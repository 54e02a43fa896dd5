"""Arrow type tests and chunk handling shared by the encoders (ids, weights, groups)."""

from __future__ import annotations

import pyarrow as pa


def is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)


def is_string(dtype: pa.DataType) -> bool:
    """Strings, plain or dictionary-encoded (pandas categoricals)."""
    if pa.types.is_dictionary(dtype):
        return is_string(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array, copied only when it has several chunks."""
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
