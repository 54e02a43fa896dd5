"""One streaming pass over data files: what ``lightning-mtr schema infer`` learns of each column.

Memory is bounded whatever the files' size: files are read in Arrow batches, and each column
keeps counts, its range, shifted moments (for the skew of a dense value) and its distinct values as
64-bit hashes: up to ``SKETCH_SIZE`` of them, each with its count (so the values seen once tell how
fast new ids still arrive: Good-Turing), and beyond that a k-minimum-values sketch (Bar-Yossef et
al., 2002: the ``k`` smallest hashes, about ``1/sqrt(k)`` relative error on the distinct count).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from lightning_mtr.data.encode import DataError, fnv1a_64
from lightning_mtr.data.reader import TextFormat

SKETCH_SIZE = 2**14  # hashes kept per column: 128 KiB; distinct counts exact up to 16,384, else within ~1%
BATCH_ROWS = 65536


@dataclass
class ColumnProfile:
    """A column's summary. ``kind``: ``int``, ``float``, ``string``, ``list``, ``bool`` or ``other``
    (a type no feature takes, e.g. a timestamp); a column that is text in any file is ``string``."""

    name: str
    kind: str = "other"
    rows: int = 0
    nulls: int = 0  # nulls and NaNs: missing values
    count: int = 0  # non-null numeric values (list elements for a list column)
    low: float = math.inf
    high: float = -math.inf
    integral: bool = True  # every numeric value is a whole number
    max_length: int = 0  # longest list
    shift: float | None = None  # moments are of (x - shift): no cancellation for large values (timestamps)
    moments: np.ndarray = field(default_factory=lambda: np.zeros(3))
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    counts: np.ndarray | None = field(default_factory=lambda: np.zeros(0, np.int64))  # None: over SKETCH_SIZE

    @property
    def exact(self) -> bool:
        """Every distinct value is kept (with its count)."""
        return self.counts is not None

    @property
    def distinct(self) -> int:
        """Distinct non-null values: exact up to ``SKETCH_SIZE``, else the KMV estimate."""
        if self.exact:
            return len(self.hashes)
        return int((SKETCH_SIZE - 1) / ((float(self.hashes[-1]) + 1) / 2**64))

    @property
    def new_rate(self) -> float:
        """Good-Turing's chance that the next value is one not seen yet: values seen once over all
        values (1 when the values are too many to count)."""
        if not self.exact:
            return 1.0
        return float((self.counts == 1).sum()) / max(int(self.counts.sum()), 1)

    @property
    def mean(self) -> float:
        return (self.shift or 0.0) + self.moments[0] / max(self.count, 1)

    @property
    def skew(self) -> float:
        """Sample skewness (third standardised moment); 0 for a constant."""
        m1, m2, m3 = self.moments / max(self.count, 1)
        var = m2 - m1 * m1
        return 0.0 if var <= 1e-12 * max(m2, 1e-300) else (m3 - 3 * m1 * m2 + 2 * m1**3) / var**1.5

    def add(self, array: pa.Array) -> None:
        self.rows += len(array)
        self.nulls += array.null_count
        kind = _kind(array.type)
        self.kind = _join(self.kind, kind)
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if kind == "list":
            lengths = np.asarray(array.value_lengths().fill_null(0))
            self.max_length = max(self.max_length, int(lengths.max(initial=0)))
            array = array.flatten()
        array = array.drop_null()
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            self._add_hashes(*_distinct(fnv1a_64(array.cast(pa.large_string()))))
        elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type):
            self._add_numbers(np.asarray(array.to_numpy(zero_copy_only=False), np.float64))

    def merge(self, other: ColumnProfile) -> None:
        """Fold in another file's profile of the same column."""
        self.kind = _join(self.kind, other.kind)
        self.rows, self.nulls, self.count = self.rows + other.rows, self.nulls + other.nulls, self.count + other.count
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.integral, self.max_length = self.integral and other.integral, max(self.max_length, other.max_length)
        if other.count:
            if self.shift is None:
                self.shift = other.shift
            self.moments += _shifted(other.moments, other.count, other.shift - self.shift)
        self._add_hashes(other.hashes, other.counts)

    def _add_numbers(self, values: np.ndarray) -> None:
        self.nulls += int(np.isnan(values).sum())  # a NaN is missing too (pandas writes missing floats so)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.shift = float(values[0]) if self.shift is None else self.shift
        centred = values - self.shift
        self.moments += [centred.sum(), (centred**2).sum(), (centred**3).sum()]
        self.count += len(values)
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        self.integral = self.integral and bool(np.all(values == np.floor(values)))
        self._add_hashes(*_distinct(_mix64(values.view(np.uint64))))

    def _add_hashes(self, hashes: np.ndarray, counts: np.ndarray | None) -> None:
        """Fold in distinct hashes with their counts (``None``: another profile's KMV sketch); past
        ``SKETCH_SIZE`` distinct values, keep only the smallest hashes (KMV) and no counts."""
        merged = np.concatenate([self.hashes, hashes])
        if self.counts is not None and counts is not None:
            values, inverse = np.unique(merged, return_inverse=True)
            if len(values) <= SKETCH_SIZE:
                weights = np.concatenate([self.counts, counts]).astype(np.float64)
                self.hashes, self.counts = values, np.bincount(inverse, weights, len(values)).astype(np.int64)
                return
        self.counts = None
        self.hashes = np.unique(merged)[:SKETCH_SIZE]


def _distinct(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, counts = np.unique(hashes, return_counts=True)
    return values, counts.astype(np.int64)


def _shifted(moments: np.ndarray, count: int, delta: float) -> np.ndarray:
    """Sums of ``(x - a)**k`` (k = 1..3) from sums of ``(x - b)**k``, with ``delta = b - a``."""
    s1, s2, s3 = moments
    return np.array([s1 + count * delta, s2 + 2 * delta * s1 + count * delta**2,
                     s3 + 3 * delta * s2 + 3 * delta**2 * s1 + count * delta**3])


def _mix64(bits: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: well-spread 64-bit hashes of the values' bit patterns."""
    with np.errstate(over="ignore"):
        z = bits + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _join(a: str, b: str) -> str:
    """The kind of a column seen as ``a`` in some rows and ``b`` in others (an all-null block is ``other``)."""
    if "string" in (a, b):
        return "string"
    if "other" in (a, b) or a == b:
        return b if a == "other" else a
    return "float" if {a, b} == {"int", "float"} else "string"


def _kind(dtype: pa.DataType) -> str:
    if pa.types.is_dictionary(dtype):
        return _kind(dtype.value_type)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return "list"
    for kind, test in (("int", pa.types.is_integer), ("float", pa.types.is_floating), ("bool", pa.types.is_boolean),
                       ("string", pa.types.is_string), ("string", pa.types.is_large_string)):
        if test(dtype):
            return kind
    return "other"


@dataclass
class Profiles:
    """Every column's profile, and for each label ``a`` and label or integer column ``b`` the rows
    where ``b`` is 1 and ``a`` is not (how often a funnel's later step happens without the earlier)."""

    files: list[str]
    columns: dict[str, ColumnProfile]
    labels: list[str]
    outside: dict[tuple[str, str], int] = field(default_factory=dict)


def profile_files(files: Sequence[str], labels: Sequence[str], text: TextFormat = TextFormat()) -> Profiles:
    """Read every file once, batch by batch; labels must be columns of every file."""
    if not files:
        raise DataError("no data files given: pass --data FILE... (Parquet or CSV/TSV files, or directories)")
    total = Profiles(list(files), {}, list(labels))
    for path in files:
        one = _profile_file(path, labels, text)
        for name, column in one.columns.items():
            total.columns.setdefault(name, ColumnProfile(name)).merge(column)
        for pair, count in one.outside.items():
            total.outside[pair] = total.outside.get(pair, 0) + count
    return total


def _profile_file(path: str, labels: Sequence[str], text: TextFormat) -> Profiles:
    """One file's profiles. Arrow guesses a text file's column types from its first block, so a
    column numeric there and not later is read again as float64 (a ``1.5`` after integers) or text."""
    forced: dict[str, pa.DataType] = {}
    while True:
        profiles = Profiles([path], {}, list(labels))
        try:
            for batch in _read(path, text, labels, forced):
                _add_batch(profiles, batch)
            return profiles
        except pa.ArrowInvalid as error:
            found = _CONVERSION.search(str(error))
            if not found or path.endswith(".parquet"):
                raise DataError(f"{path}: unreadable file ({error})") from None
            column = text.open(path).schema.names[int(found[1])]
            if column in labels:
                raise DataError(f"{path}: label column {column!r} holds {found[3]!r}; labels must be numbers") from None
            forced[column] = pa.float64() if found[2].startswith("int") and _is_number(found[3]) else pa.string()


_CONVERSION = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to (\w+): invalid value '(.*)'")


def _add_batch(profiles: Profiles, batch: pa.RecordBatch) -> None:
    for name, array in zip(batch.schema.names, batch.columns):
        profiles.columns.setdefault(name, ColumnProfile(name)).add(array)
    later = [name for name, array in zip(batch.schema.names, batch.columns)
             if name in profiles.labels or pa.types.is_integer(array.type) or pa.types.is_boolean(array.type)]
    ones = {name: np.asarray(batch.column(name).to_numpy(zero_copy_only=False), np.float64) == 1 for name in later}
    for a in profiles.labels:
        for b in later:
            if a != b:
                profiles.outside[a, b] = profiles.outside.get((a, b), 0) + int((ones[b] & ~ones[a]).sum())


def _read(path: str, text: TextFormat, labels: Sequence[str], forced: dict[str, pa.DataType]
          ) -> Iterator[pa.RecordBatch]:
    try:
        if path.endswith(".parquet"):
            reader = pq.ParquetFile(path)
            schema = reader.schema_arrow
            batches = reader.iter_batches(BATCH_ROWS)
        else:
            reader = text.open(path, pa_csv.ConvertOptions(column_types=forced, strings_can_be_null=True))
            schema = reader.schema
            batches = iter(reader)
        _check_labels(path, schema, labels)
        yield from batches
    except (OSError, pa.ArrowException) as error:
        if isinstance(error, pa.ArrowInvalid) and "CSV conversion error" in str(error):
            raise
        raise DataError(f"{path}: unreadable file ({error})") from None


def _check_labels(path: str, schema: pa.Schema, labels: Sequence[str]) -> None:
    names = schema.names
    missing = [label for label in labels if label not in names]
    if missing:
        raise DataError(f"{path}: no label column {missing[0]!r}; its columns are {names[:12]}"
                        f"{' ...' if len(names) > 12 else ''} (--label names a column holding a task's label)")
    for label in labels:
        dtype = schema.field(label).type
        if not (pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)):
            raise DataError(f"{path}: label column {label!r} has type {dtype}; labels must be numbers "
                            "(0/1 for a binary task)")


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False
