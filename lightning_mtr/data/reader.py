"""Streaming Parquet/CSV reader: files -> units of work -> shuffled, re-batched Arrow tables.

A *unit* is one Parquet row group (or one whole CSV file). Each epoch the units are put in
a seeded order and the concatenated rows are cut into ``world_size * num_workers``
contiguous, equal ranges (to one row), one per reader: every row is read exactly once,
every process gets the same number of rows even with fewer files than processes, and no
reader ever holds more than its shuffle buffer in memory.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_mtr.data.batch import Batch
from lightning_mtr.data.days import partitions
from lightning_mtr.data.encode import MISSING_GROUP, ROW_COLUMN, SOURCE_COLUMN, BatchEncoder, DataError, group_ids

SUFFIXES = (".parquet", ".csv", ".tsv", ".txt")  # all but .parquet are text, read as TextFormat says


def text_names(names: Sequence[str | int | float], key: str) -> list[str]:
    """Column names from a config. YAML 1.1 has read an unquoted ``109_14`` as 10914 and ``0123`` as
    83 before any code sees it, so a name that arrives as a number is refused, with the fix."""
    numbers = [name for name in names if not isinstance(name, str)]
    if numbers:
        raise DataError(f"{key}: {numbers} arrived as numbers, but column names are text and YAML reads an "
                        f"unquoted 109_14 as 10914 and 0123 as 83: quote each name, e.g. {key}: ['109_14', '0123']")
    return list(names)


@dataclass(frozen=True)
class TextFormat:
    """How text files (.csv, .tsv, .txt) are parsed.

    Args:
        delimiter: the field separator, one character; ``\\t`` (or ``tab``) for tab-separated logs.
        column_names: the columns of files without a header row (then every line is data); quote
            names that look like numbers (``'109_14'``).
    """

    delimiter: str = ","
    column_names: tuple[str | int | float, ...] | None = None

    def __post_init__(self) -> None:
        # a shell or YAML's plain scalar passes '\t' as backslash and t: read it as the tab it means
        delimiter = "\t" if self.delimiter in ("\\t", "tab") else self.delimiter
        if len(delimiter) != 1:
            raise DataError(f"the delimiter of text files is one character, got {self.delimiter!r}; a tab is "
                            "written '\\t'")
        object.__setattr__(self, "delimiter", delimiter)
        if self.column_names is not None:
            object.__setattr__(self, "column_names", tuple(text_names(self.column_names, "text_format.column_names")))

    def open(self, path: str, convert: pa_csv.ConvertOptions | None = None) -> pa_csv.CSVStreamingReader:
        read = pa_csv.ReadOptions(column_names=list(self.column_names)) if self.column_names else None
        return pa_csv.open_csv(path, read_options=read, parse_options=pa_csv.ParseOptions(delimiter=self.delimiter),
                               convert_options=convert)


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of one Parquet row group, or of a whole text file (``row_group is None``,
    parsed as ``text`` says); ``offset``: the file's row number of the group's first row."""

    path: str
    row_group: int | None
    rows: int
    start: int = 0
    stop: int | None = None
    text: TextFormat = TextFormat()
    offset: int = 0

    @property
    def length(self) -> int:
        """Rows of this (possibly sliced) unit."""
        return (self.rows if self.stop is None else self.stop) - self.start

    def slice(self, start: int, stop: int) -> Unit:
        return Unit(self.path, self.row_group, self.rows, start, stop, self.text, self.offset)


def split_rows(units: Sequence[Unit], part: int, parts: int) -> list[Unit]:
    """The ``part``-th of ``parts`` contiguous, equal (to one row) ranges of the units' rows."""
    total = sum(unit.rows for unit in units)
    low, high = total * part // parts, total * (part + 1) // parts
    mine, offset = [], 0
    for unit in units:
        start, stop = max(low - offset, 0), min(high - offset, unit.rows)
        if start < stop:
            mine.append(unit.slice(start, stop))
        offset += unit.rows
    return mine


def list_files(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand directories into their ``*.parquet`` / ``*.csv`` files (sorted, so ranks agree); a
    Hive root (``dt=YYYY-MM-DD`` folders, :mod:`~lightning_mtr.data.days`) into every day's, in day order."""
    files: list[str] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        days = partitions(path)
        if days:
            files.extend(list_files([days[day] for day in sorted(days)]))
        elif path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DataError(f"{path}: unsupported file type; expected one of {SUFFIXES}")
            files.append(str(path))
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def plan_units(files: Sequence[str], encoder: BatchEncoder, text: TextFormat = TextFormat()) -> list[Unit]:
    """Open every file once: check columns and types, count rows, and split into units."""
    units: list[Unit] = []
    for path in files:
        if not path.endswith(".parquet"):
            with _opened(path, text):
                encoder.check_columns(text.open(path).schema, path)
                options = _csv_options(encoder.columns, encoder.numeric_columns, encoder.string_columns)
                rows = sum(batch.num_rows for batch in text.open(path, options))
            if rows == 0:
                raise DataError(f"{path}: empty file (no rows)")
            units.append(Unit(path, None, rows, text=text))
            continue
        with _opened(path):
            metadata = pq.ParquetFile(path).metadata
        if metadata.num_rows == 0:
            raise DataError(f"{path}: empty file (no rows)")
        encoder.check_columns(metadata.schema.to_arrow_schema(), path)
        sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
        offsets = np.cumsum([0, *sizes[:-1]])
        units.extend(Unit(path, group, rows, offset=int(offsets[group]))
                     for group, rows in enumerate(sizes) if rows > 0)
    return units


def read_unit(unit: Unit, columns: Sequence[str], chunk_rows: int, numeric: Collection[str] = (),
              strings: Collection[str] = ()) -> Iterator[pa.RecordBatch]:
    """Stream the unit's rows ``[start, stop)`` in chunks of at most ``chunk_rows``; in CSV files
    the ``numeric`` columns are read as float64 and the ``strings`` columns as strings."""
    stop = unit.rows if unit.stop is None else unit.stop
    offset = 0
    with _opened(unit.path, unit.text if unit.row_group is None else None):
        if unit.row_group is None:
            batches = unit.text.open(unit.path, _csv_options(columns, numeric, strings))
        else:
            batches = pq.ParquetFile(unit.path).iter_batches(chunk_rows, row_groups=[unit.row_group],
                                                             columns=list(columns))
        for batch in batches:
            low, high = max(unit.start - offset, 0), min(stop - offset, batch.num_rows)
            offset += batch.num_rows
            if low < high:
                yield batch.slice(low, high - low)
            if offset >= stop:
                break


def _csv_options(columns: Sequence[str], numeric: Collection[str], strings: Collection[str] = ()
                 ) -> pa_csv.ConvertOptions:
    """Numbers are float64 whatever the first block looks like (``1.5`` after many integers is
    fine), hashed ids are strings; an empty field is a null (a missing id), as in Parquet."""
    types = {**{c: pa.float64() for c in numeric}, **{c: pa.string() for c in strings}}
    return pa_csv.ConvertOptions(include_columns=list(columns), column_types=types, strings_can_be_null=True)


def read_tagged(units: Sequence[Unit], columns: Sequence[str], chunk_rows: int, numeric: Collection[str] = (),
                strings: Collection[str] = ()) -> Iterator[pa.Table]:
    """Chunks of all units, each row tagged in ``SOURCE_COLUMN`` with its file's index in
    :func:`sources_of` (units) and in ``ROW_COLUMN`` with its row number in that file, so errors
    can name the file and rows after rows are mixed."""
    index = {path: i for i, path in enumerate(sources_of(units))}
    for unit in units:
        row = unit.offset + unit.start
        for chunk in read_unit(unit, columns, chunk_rows, numeric, strings):
            tag = pa.array(np.full(chunk.num_rows, index[unit.path], np.int32))
            rows = pa.array(np.arange(row, row + chunk.num_rows, dtype=np.int64))
            row += chunk.num_rows
            yield pa.Table.from_batches([chunk]).append_column(SOURCE_COLUMN, tag).append_column(ROW_COLUMN, rows)


def sources_of(units: Sequence[Unit]) -> list[str]:
    return sorted({unit.path for unit in units})


class _opened:
    """Turn Arrow's I/O and format errors into a DataError naming the file (and, for a value of a
    text file that does not parse, the column: Arrow's message gives only its number)."""

    def __init__(self, path: str, text: TextFormat | None = None):
        self.path = path
        self.text = text

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, (pa.ArrowException, OSError)) and not isinstance(error, DataError):
            found = re.match(r"In CSV column #(\d+): (.*)", str(error), re.DOTALL) if self.text else None
            if found:
                column = self.text.open(self.path).schema.names[int(found[1])]
                raise DataError(f"{self.path}: column {column!r}: {found[2]}") from error
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
        rank, world_size: this process's share of the rows.
        even_batches: every reader yields exactly ``(total rows // readers) // batch_size``
            full batches, so all processes take the same number of steps (distributed
            training hangs otherwise); each epoch leaves out fewer than ``batch_size + 1``
            rows per reader, other ones each epoch once the order is shuffled.
        equal_batch_counts: every reader yields the same number of batches and keeps every row:
            a reader's last batch takes its leftover rows (at most ``batch_size + 1``). For
            evaluation on several processes, where a process with one batch more would wait
            forever in a collective (sharded embeddings, metric sync).
        epoch: returns the current epoch when an epoch's iterator is created (the data
            module passes the trainer's); without it, ``set_epoch`` sets it.
        resume: ``(epoch, batches)``: in that epoch each process skips its first ``batches``
            batches without encoding them (a run resumed from a mid-epoch checkpoint continues
            where it stopped; exact when processes, workers and seed are unchanged).
        loader_workers: the DataLoader's ``num_workers``, so that ``len()`` is this process's
            batches per epoch (None: no length).
    """

    def __init__(self, units: Sequence[Unit], encoder: BatchEncoder, batch_size: int, shuffle_buffer: int = 0,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 even_batches: bool = False, equal_batch_counts: bool = False,
                 epoch: Callable[[], int] | None = None, resume: tuple[int, int] | None = None,
                 loader_workers: int | None = None):
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
        self.even_batches = even_batches
        self.equal_batch_counts = equal_batch_counts
        self.resume = resume
        self.loader_workers = loader_workers
        self.epoch_source = epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def current_epoch(self) -> int:
        return self.epoch_source() if self.epoch_source is not None else self.epoch

    def __getstate__(self) -> dict:
        """Worker processes get the epoch as a number (the source may hold the trainer)."""
        state = dict(self.__dict__)
        state["epoch"], state["epoch_source"] = self.current_epoch(), None
        return state

    def _resumed(self) -> int:
        """Batches of this epoch this process already trained on (0 unless resuming into it)."""
        return self.resume[1] if self.resume is not None and self.resume[0] == self.current_epoch() else 0

    def _slot_units(self, slot: int, workers: int) -> list[Unit]:
        """Reader slot ``slot``'s rows: the epoch's (seeded) unit order, cut into equal contiguous ranges."""
        order = list(self.units)
        if self.shuffle_buffer:
            permutation = np.random.default_rng((self.seed, self.current_epoch())).permutation(len(order))
            order = [order[i] for i in permutation]
        return split_rows(order, self.rank * workers + slot, self.world_size * workers)

    def _fewest_rows(self, workers: int) -> int:
        return sum(u.rows for u in self.units) // (self.world_size * workers)  # every reader has this or one more

    def _batch_count(self, rows: int, workers: int) -> int:
        """How many batches a reader with ``rows`` rows yields."""
        if self.even_batches:
            return self._fewest_rows(workers) // self.batch_size
        if self.equal_batch_counts:
            return max(math.ceil(self._fewest_rows(workers) / self.batch_size), 1)
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __len__(self) -> int:
        """The batches this process's readers yield in a full epoch, from the units' row counts
        (Parquet metadata; a text file's rows were counted when it was planned): each reader's
        equal share of the rows, cut as :meth:`_batch_count` says. The shuffle buffer moves rows,
        never drops them, and the encoder keeps every row (a sample space is a mask), so it is
        exact: Lightning shows it as the progress bar's total and ends the epoch on it. A
        resumed epoch yields it less the batches Lightning counts as done."""
        if self.loader_workers is None:
            raise TypeError("BatchStream has no length without loader_workers")
        workers = max(self.loader_workers, 1)
        readers, total = self.world_size * workers, sum(unit.rows for unit in self.units)
        shares = [total * (r + 1) // readers - total * r // readers
                  for r in range(self.rank * workers, (self.rank + 1) * workers)]  # as split_rows cuts
        return sum(self._batch_count(rows, workers) for rows in shares)

    def _resume_position(self, workers: int) -> tuple[list[int], int]:
        """After the ``k`` batches this process trained on: how many each slot made, and the slot
        whose batch comes next. A DataLoader takes batches from its workers in turn, passing
        over exhausted ones, so the ``k`` came from the slots round robin."""
        counts = [self._batch_count(sum(u.length for u in self._slot_units(slot, workers)), workers)
                  for slot in range(workers)]
        taken, slot = [0] * workers, 0
        for _ in range(min(self._resumed(), sum(counts))):
            while taken[slot] == counts[slot]:
                slot = (slot + 1) % workers
            taken[slot] += 1
            slot = (slot + 1) % workers
        return taken, slot

    def _slot(self) -> tuple[int, int, int]:
        """``(workers, this worker's reader slot, batches of it to skip)``. A resumed DataLoader
        starts again with worker 0, so the slots rotate to make worker 0 read the slot whose
        batch comes next: the order then continues exactly where it stopped."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        if not self._resumed():
            return workers, worker_id, 0
        taken, first = self._resume_position(workers)
        slot = (worker_id + first) % workers
        return workers, slot, taken[slot]

    def my_units(self) -> list[Unit]:
        """This reader's rows."""
        workers, slot, _ = self._slot()
        return self._slot_units(slot, workers)

    def __iter__(self) -> Iterator[Batch]:
        workers, slot, skip = self._slot()
        count = self._batch_count(sum(u.length for u in self._slot_units(slot, workers)), workers)
        if self.even_batches:
            return itertools.islice(self._batches(skip=skip), max(count - skip, 0))
        if self.equal_batch_counts:
            if self._fewest_rows(workers) == 0:
                raise DataError(f"{sum(u.rows for u in self.units)} rows cannot give each of "
                                f"{self.world_size * workers} readers (processes x workers) a batch; use fewer "
                                "processes or workers")
            return self._batches(last_batch_after=count - 1, skip=skip)
        return self._batches(skip=skip)

    def _batches(self, last_batch_after: int | None = None, skip: int = 0) -> Iterator[Batch]:
        rng = np.random.default_rng((self.seed, self.current_epoch(), self.rank, self._slot()[1]))
        units = self.my_units()
        sources = sources_of(units)
        buffer: list[pa.Table] = []
        buffered = emitted = 0
        target = max(self.shuffle_buffer, self.batch_size)
        for chunk in read_tagged(units, self.encoder.columns, self.batch_size, self.encoder.numeric_columns,
                                 self.encoder.string_columns):
            buffer.append(chunk)
            buffered += chunk.num_rows
            if buffered >= target:
                buffer, buffered, emitted = yield from self._drain(buffer, sources, rng, True, emitted,
                                                                   last_batch_after, skip)
        if buffer:
            yield from self._drain(buffer, sources, rng, False, emitted, last_batch_after, skip)

    def _drain(self, buffer: list[pa.Table], sources: list[str], rng: np.random.Generator, keep_tail: bool,
               emitted: int, last_batch_after: int | None, skip: int):
        """Yield the full batches of the buffered rows (none beyond ``last_batch_after``: later
        rows all wait for the final batch; the first ``skip`` are cut but not encoded); return
        what is kept, its size and the count of batches so far."""
        table = pa.concat_tables(buffer, promote_options="permissive")
        if self.shuffle_buffer:
            table = table.take(pa.array(self._shuffled_rows(table, rng)))
        full = table.num_rows - table.num_rows % self.batch_size
        if last_batch_after is not None:
            full = min(full, max(last_batch_after - emitted, 0) * self.batch_size)
        for start in range(0, full, self.batch_size):
            if emitted >= skip:
                yield self.encoder.encode(table.slice(start, self.batch_size), sources)
            emitted += 1
        tail = table.slice(full)
        if keep_tail:
            return ([tail], tail.num_rows, emitted) if tail.num_rows else ([], 0, emitted)
        if tail.num_rows and not self.drop_last and emitted >= skip:
            yield self.encoder.encode(tail, sources)
        return [], 0, emitted


    def _shuffled_rows(self, table: pa.Table, rng: np.random.Generator) -> np.ndarray:
        """A random row order; with a ranking task, runs of rows sharing its group id (a request)
        move as blocks, so a request's rows stay together for the ranking loss."""
        column = self.encoder.schema.shuffle_group
        if column is None:
            return rng.permutation(table.num_rows)
        ids = group_ids(table.column(column))
        # a row without a group id (another log's) is a run of its own
        starts = np.flatnonzero(np.r_[True, (ids[1:] != ids[:-1]) | (ids[1:] == MISSING_GROUP)])
        sizes = np.diff(np.r_[starts, table.num_rows])
        runs = rng.permutation(len(starts))
        return np.repeat(starts[runs] - np.cumsum(np.r_[0, sizes[runs][:-1]]), sizes[runs]) + np.arange(table.num_rows)


def worker_init(worker_id: int) -> None:
    """Keep DataLoader workers single-threaded: on 2 cores the training step needs the CPUs."""
    torch.set_num_threads(1)
