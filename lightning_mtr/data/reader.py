"""Streaming Parquet/CSV reader: files -> units of work -> shuffled, re-batched Arrow tables.

A *unit* is one Parquet row group (or one whole CSV file). Units are dealt round-robin to
the ``world_size * num_workers`` readers, so every row is read exactly once per epoch
and no reader ever holds more than its shuffle buffer in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_mtr.data.batch import Batch
from lightning_mtr.data.encode import SOURCE_COLUMN, BatchEncoder, DataError

SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class Unit:
    """One Parquet row group, or a whole CSV file (``row_group is None``)."""

    path: str
    row_group: int | None = None


def list_files(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand directories into their ``*.parquet`` / ``*.csv`` files (sorted, so ranks agree)."""
    files: list[str] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no .parquet or .csv files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DataError(f"{path}: unsupported file type; expected .parquet or .csv")
            files.append(str(path))
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def plan_units(files: Sequence[str], encoder: BatchEncoder) -> list[Unit]:
    """Open every file's metadata once: check columns and types, and split into units."""
    units: list[Unit] = []
    for path in files:
        if path.endswith(".csv"):
            with _opened(path):
                reader = pa_csv.open_csv(path)
                encoder.check_columns(reader.schema, path)
            units.append(Unit(path))
            continue
        with _opened(path):
            metadata = pq.ParquetFile(path).metadata
        if metadata.num_rows == 0:
            raise DataError(f"{path}: empty file (no rows)")
        encoder.check_columns(metadata.schema.to_arrow_schema(), path)
        units.extend(Unit(path, group) for group in range(metadata.num_row_groups)
                     if metadata.row_group(group).num_rows > 0)
    return units


def read_unit(unit: Unit, columns: Sequence[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream one unit's rows in chunks of at most ``chunk_rows``."""
    rows = 0
    with _opened(unit.path):
        if unit.row_group is None:
            # an empty CSV field is a null (a missing id), as in Parquet, for string columns too
            options = pa_csv.ConvertOptions(include_columns=list(columns), strings_can_be_null=True)
            for batch in pa_csv.open_csv(unit.path, convert_options=options):
                rows += batch.num_rows
                yield batch
        else:
            for batch in pq.ParquetFile(unit.path).iter_batches(chunk_rows, row_groups=[unit.row_group],
                                                                 columns=list(columns)):
                rows += batch.num_rows
                yield batch
    if rows == 0:
        raise DataError(f"{unit.path}: empty file (no rows)")


def read_tagged(units: Sequence[Unit], columns: Sequence[str], chunk_rows: int) -> Iterator[pa.Table]:
    """Chunks of all units, each row tagged in ``SOURCE_COLUMN`` with its file's index in
    :func:`sources_of` (units), so errors can name the file after rows are mixed."""
    index = {path: i for i, path in enumerate(sources_of(units))}
    for unit in units:
        for chunk in read_unit(unit, columns, chunk_rows):
            tag = pa.array(np.full(chunk.num_rows, index[unit.path], np.int32))
            yield pa.Table.from_batches([chunk]).append_column(SOURCE_COLUMN, tag)


def sources_of(units: Sequence[Unit]) -> list[str]:
    return sorted({unit.path for unit in units})


class _opened:
    """Turn Arrow's I/O and format errors into a DataError naming the file."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, (pa.ArrowException, OSError)) and not isinstance(error, DataError):
            raise DataError(f"{self.path}: unreadable or truncated file ({error})") from error
        return False


class BatchStream(IterableDataset):
    """Yields ready :class:`Batch` objects (use ``DataLoader(batch_size=None)``).

    Args:
        units: the work, from :func:`plan_units`.
        encoder: turns Arrow rows into batches and checks them.
        batch_size: rows per batch; the last batch of a reader may be smaller unless ``drop_last``.
        shuffle_buffer: rows held and shuffled together (0: keep file order, e.g. for predict).
        seed: with the epoch, fixes both the unit order and the in-buffer permutation.
        rank, world_size: this process's share of the units.
    """

    def __init__(self, units: Sequence[Unit], encoder: BatchEncoder, batch_size: int, shuffle_buffer: int = 0,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.units = list(units)
        self.encoder = encoder
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_units(self) -> list[Unit]:
        """This reader's units: the epoch's (seeded) unit order, dealt round-robin."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        order = list(self.units)
        if self.shuffle_buffer:
            permutation = np.random.default_rng((self.seed, self.epoch)).permutation(len(order))
            order = [order[i] for i in permutation]
        return order[self.rank * workers + worker_id::self.world_size * workers]

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, worker.id if worker else 0))
        units = self.my_units()
        sources = sources_of(units)
        buffer: list[pa.Table] = []
        buffered = 0
        target = max(self.shuffle_buffer, self.batch_size)
        for chunk in read_tagged(units, self.encoder.columns, self.batch_size):
            buffer.append(chunk)
            buffered += chunk.num_rows
            if buffered >= target:
                buffer, buffered = yield from self._drain(buffer, sources, rng, keep_tail=True)
        if buffer:
            yield from self._drain(buffer, sources, rng, keep_tail=False)

    def _drain(self, buffer: list[pa.Table], sources: list[str], rng: np.random.Generator, keep_tail: bool):
        table = pa.concat_tables(buffer, promote_options="permissive")
        if self.shuffle_buffer:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        full = table.num_rows - table.num_rows % self.batch_size
        for start in range(0, full, self.batch_size):
            yield self.encoder.encode(table.slice(start, self.batch_size), sources)
        tail = table.slice(full)
        if keep_tail:
            return ([tail], tail.num_rows) if tail.num_rows else ([], 0)
        if tail.num_rows and not self.drop_last:
            yield self.encoder.encode(tail, sources)
        return [], 0


def worker_init(worker_id: int) -> None:
    """Keep DataLoader workers single-threaded: on 2 cores the training step needs the CPUs."""
    torch.set_num_threads(1)
