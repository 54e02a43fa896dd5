"""What the generators share: seeded streams, a bounded-memory Parquet writer, and the
calibration of a world's intercepts."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def stream(seed: int, *tags: str | int) -> np.random.Generator:
    """A generator keyed by (seed, tags): independent streams, stable across runs."""
    keys = [t if isinstance(t, int) else zlib.crc32(t.encode()) for t in tags]
    return np.random.default_rng([seed, *keys])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def solve_intercept(mean_at: Callable[[float], float], target: float) -> float:
    """Bisection for the intercept b with mean_at(b) == target (mean_at is increasing)."""
    low, high = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if mean_at(mid) < target else (low, mid)
    return 0.5 * (low + high)


def write_chunks(
    path: Path,
    rows: int,
    row_group_rows: int,
    make_chunk: Callable[[int, int], dict[str, np.ndarray | pa.Array]],
    dictionary_columns: list[str] | bool = False
) -> Path:
    """Write make_chunk(index, n) tables, one row group each, with bounded memory.

    A chunk's columns are numpy arrays, or Arrow arrays where numpy has no type (nulls, lists).

    Dictionary-encoding only the low-cardinality columns doubles the write speed;
    on random high-cardinality columns it costs time and saves nothing.
    """
    if rows <= 0 or row_group_rows <= 0:
        raise ValueError(f"rows and row_group_rows must be positive, got {rows} and {row_group_rows}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for index, start in enumerate(range(0, rows, row_group_rows)):
            table = pa.table(make_chunk(index, min(row_group_rows, rows - start)))
            writer = writer or pq.ParquetWriter(path, table.schema, use_dictionary=dictionary_columns)
            writer.write_table(table, row_group_size=table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return path
