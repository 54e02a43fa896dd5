"""Arrow rows -> :class:`Batch`, with every input check the schema implies.

Rows arrive as an Arrow table whose ``SOURCE_COLUMN`` holds, per row, an index into the
list of files they were read from, so a bad value is reported with the file it came from
even after the shuffle buffer has mixed several files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_mtr.data.arrow import is_list, is_string, one_chunk
from lightning_mtr.data.batch import Batch, RowSource
from lightning_mtr.data.weighted import bag_weights, is_weight_list
from lightning_mtr.derived import bucket_rows, combo_text, vocab_rows, with_quantile_boundaries
from lightning_mtr.schema import ID_SPACE, DenseFeature, Schema, SparseFeature, Task

SOURCE_COLUMN = "__source__"
ROW_COLUMN = "__row__"  # the row's number in its file (0-based)


class DataError(ValueError):
    """Bad input data, schema or data settings; the message names the file and the column (or the
    setting) and the CLI ends with it in one line."""


@dataclass(frozen=True)
class DenseStats:
    """Per dense feature mean and std of the transformed training data (for standardising), and
    per ``quantiles`` sparse feature its training quantiles (:mod:`lightning_mtr.derived`)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    boundaries: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:  # from a checkpoint's state: lists
        for key, value in (("mean", tuple(self.mean)), ("std", tuple(self.std)),
                           ("boundaries", tuple(tuple(b) for b in self.boundaries))):
            object.__setattr__(self, key, value)


class BatchEncoder:
    """Turns Arrow tables into batches for one schema; stateless apart from the dense stats.

    ``label_order``: ``(earlier, later)`` task pairs whose later label may never exceed the
    earlier one on a row both sample spaces hold (a model's conversion funnel, e.g. ESMM's
    ``("ctr", "ctcvr")``: pCTCVR = pCTR * pCVR <= pCTR, so a conversion without a click
    cannot be fit). ``dense_stats`` may be left out by an encoder that only checks columns
    (``check_columns``). ``labels=False`` reads the features and extras only, for scoring a
    log that has no labels (``predict``): its batches carry no labels, masks or groups.
    ``transform_dense=False`` leaves dense features as read (nulls filled, float64), for an
    exported program that transforms them itself.
    """

    def __init__(self, schema: Schema, dense_stats: DenseStats | None = None, extras: Sequence[str] = (),
                 label_order: Sequence[tuple[str, str]] = (), labels: bool = True, transform_dense: bool = True):
        self.schema = with_quantile_boundaries(schema, dense_stats.boundaries) if dense_stats else schema
        self.transform_dense = transform_dense
        self.dense_stats = dense_stats
        self.extras = tuple(extras)
        self._labels = [(t, t.label_expression, t.sample_space_expression) for t in schema.tasks] if labels else []
        self.label_order = checked_label_order(schema, label_order) if labels else ()
        self._label_columns = sorted(schema.label_columns) if labels else []
        self._group_columns = schema.group_columns if labels else []

    @property
    def columns(self) -> list[str]:
        """Every column the encoder reads, in a stable order without repeats."""
        wanted = self.schema.input_columns + self._label_columns + self._group_columns + list(self.extras)
        return list(dict.fromkeys(wanted))

    @property
    def string_columns(self) -> list[str]:
        """Single-valued ``hashed``, vocabulary and combo id columns and group columns (only equality
        of their ids' text matters): always read as strings from CSV, whatever one file's first block
        looks like. A column that is also read as numbers or as a plain id (row = id) keeps the type
        it has in Parquet, and hashing, vocabularies, combos and groups write its integers as decimals."""
        other = {f.source_column for f in self.schema.sparse if not (f.hashed or f.vocab_list or f.combo
                                                                     or f.bucketized)} | set(self.numeric_columns)
        texts = [c for f in self.schema.sparse if (f.hashed or f.vocab_list or f.combo) and not f.multi_valued
                 for c in f.columns]
        return [c for c in dict.fromkeys(texts + self._group_columns) if c not in other]

    @property
    def numeric_columns(self) -> list[str]:
        """Dense features, bucketed columns and label/sample-space columns: always read as float64 from CSV."""
        buckets = [f.source_column for f in self.schema.sparse if f.bucketized]
        return [f.source_column for f in self.schema.dense] + buckets + self._label_columns

    def check_columns(self, arrow_schema: pa.Schema, source: str) -> None:
        """Fail early, naming the file and column, on a missing column or a wrong type."""
        kinds = {c: ("numeric" if f.bucketized else "sparse", f) for f in self.schema.sparse for c in f.columns}
        kinds.update({f.source_column: ("numeric", f) for f in self.schema.dense})
        kinds.update({c: ("numeric", None) for c in self._label_columns})
        kinds.update({c: ("extra", None) for c in self.extras if c not in kinds})
        kinds.update({c: ("group", None) for c in self._group_columns})
        kinds.update({f.weight_column: ("weights", f) for f in self.schema.sparse if f.weight_column is not None})
        for column, (kind, feature) in kinds.items():
            if column not in arrow_schema.names:
                combo = f" (combo feature {feature.name!r} combines {list(feature.combo)}; name columns the files " \
                        "have)" if getattr(feature, "combo", None) else ""
                raise DataError(f"{source}: missing column {column!r}{combo}")
            dtype = arrow_schema.field(column).type
            if kind == "sparse":
                listed = is_list(dtype)
                ok = (feature.multi_valued or feature.sequence) if listed else not feature.multi_valued
                ok = ok and _is_id_type(dtype.value_type if listed else dtype)
                expected = ("a list of integer/string ids" if feature.multi_valued else
                            "integer or string ids, or lists of them" if feature.sequence else "integer or string ids")
            elif kind == "weights":
                ok, expected = is_weight_list(dtype), f"lists of numbers, one weight per id of {feature.name!r}"
            elif kind == "group":
                ok, expected = _is_id_type(dtype), "integer or string ids (a request or user id)"
            elif kind == "extra":
                ok = is_string(dtype) or pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or \
                    pa.types.is_boolean(dtype)
                expected = "numbers or text"
            else:
                ok = pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
                expected = "numbers"
            if not (ok or pa.types.is_null(dtype)):
                raise DataError(f"{source}: column {column!r} has type {dtype}, expected {expected}")

    def encode(self, table: pa.Table, sources: Sequence[str]) -> Batch:
        checker = RowChecker(table, sources)
        raw = {c: numeric_column(table.column(c), c, checker) for c in self._label_columns}
        labels, masks, values, row_weights = {}, {}, {}, {}
        groups = {c: group_ids(table.column(c)) for c in self._group_columns}
        for task, label, space in self._labels:
            values[task.name] = np.broadcast_to(np.asarray(label.evaluate(raw), dtype=np.float64), (table.num_rows,))
            mask = np.ones(table.num_rows, bool) if space is None else np.asarray(space.evaluate(raw), bool)
            mask = np.broadcast_to(mask, (table.num_rows,))
            _check_labels(task, values[task.name], mask, checker)
            if task.group_column is not None:
                checker.fail_if(task.group_column, mask & (groups[task.group_column] == MISSING_GROUP),
                                f"missing (null) group id inside task {task.name!r}'s sample space")
            # outside the sample space a label is never used; class 0 keeps a multiclass loss defined
            labels[task.name] = torch.from_numpy(np.where(mask, values[task.name], 0.0).astype(np.float32))
            masks[task.name] = torch.from_numpy(mask.copy())
            if task.kind == "ranking" and task.ranking_loss == "pointwise":
                row_weights[task.name] = torch.from_numpy(_pointwise_weights(task, values[task.name], mask, raw,
                                                                             checker))
        self._check_label_order(values, masks, raw, checker)
        return Batch(
            dense=self._dense(table, checker),
            sparse=self._sparse(table, checker),
            labels=labels,
            masks=masks,
            extras={c: extra_column(table.column(c), c, checker) for c in self.extras},
            groups={c: torch.from_numpy(ids) for c, ids in groups.items()},
            row_weights=row_weights,
            source=row_source(table, sources),
        )

    def _check_label_order(self, values: dict[str, np.ndarray], masks: dict[str, torch.Tensor],
                           raw: dict[str, np.ndarray], checker: RowChecker) -> None:
        """A later funnel step's label of 1 where the earlier one's is 0 stops the run, naming both tasks."""
        tasks = {task.name: task for task in self.schema.tasks}
        for earlier, later in self.label_order:
            bad = (masks[earlier] & masks[later]).numpy() & (values[later] > values[earlier])
            if not bad.any():
                continue
            first, early, late = int(np.flatnonzero(bad)[0]), tasks[earlier], tasks[later]
            columns = sorted(early.label_expression.columns | late.label_expression.columns)
            example = ", ".join(f"{c}={raw[c][first]:g}" for c in columns)
            checker.fail_rows(bad, f"task {later!r} (label {late.label!r}) is 1 where task {earlier!r} (label "
                                   f"{early.label!r}), the step before it in the model's funnel, is 0 (e.g. a row with "
                                   f"{example})", f"a later step's label must imply the earlier one's: set the label "
                                   f"of task {later!r} to {_factor(early.label)} * {_factor(late.label)}")

    def _dense(self, table: pa.Table, checker: RowChecker) -> torch.Tensor:
        if self.dense_stats is None and any(f.standardized for f in self.schema.dense) and self.transform_dense:
            raise ValueError("the schema standardises dense features, so the encoder needs dense statistics")
        dtype = np.float32 if self.transform_dense else np.float64
        columns = [numeric_column(table.column(f.source_column), f.source_column, checker, f.fill_missing)
                   for f in self.schema.dense]
        if self.transform_dense:
            columns = [transform_dense(f, values, self.dense_stats, index)
                       for index, (f, values) in enumerate(zip(self.schema.dense, columns))]
        if not columns:
            return torch.zeros(table.num_rows, 0, dtype=torch.float32 if self.transform_dense else torch.float64)
        return torch.from_numpy(np.stack(columns, axis=1).astype(dtype))

    def _sparse(self, table: pa.Table, checker: RowChecker) -> KeyedJaggedTensor:
        """The ids; with weighted features (``schema.weighted``) a weighted KJT, weight 1 where none is given."""
        values, lengths, weights = [], [], []
        for feature in self.schema.sparse:
            ids, counts = _derived_ids(table, feature) if feature.bucketized or feature.combo else \
                _feature_ids(table.column(feature.source_column), feature, checker)
            values.append(ids)
            lengths.append(counts)
            if self.schema.weighted:
                weights.append(np.ones(len(ids), np.float32) if feature.weight_column is None else
                               bag_weights(table, feature, checker))
        return KeyedJaggedTensor(
            keys=[f.name for f in self.schema.sparse],
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            weights=torch.from_numpy(np.concatenate(weights)) if self.schema.weighted else None,
            stride=table.num_rows,
        )


def _check_labels(task: Task, values: np.ndarray, mask: np.ndarray, checker: RowChecker) -> None:
    """Labels must suit the task's kind; a multiclass or ranking label only inside its sample space."""
    if task.kind == "binary":
        checker.fail_if(task.label, (values != 0) & (values != 1), "binary label outside {0, 1}", values)
    elif task.kind == "multiclass":
        bad = mask & ((values != np.round(values)) | (values < 0) | (values >= task.num_classes))
        checker.fail_if(task.label, bad, f"multiclass label outside the classes 0..{task.num_classes - 1}", values)
    elif task.kind == "ranking":
        checker.fail_if(task.label, mask & (values < 0), "negative ranking relevance", values)


def _factor(label: str) -> str:
    return label if label.isidentifier() else f"({label})"


def checked_label_order(schema: Schema, pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``pairs`` as a tuple, every task a binary schema task."""
    kinds = {task.name: task.kind for task in schema.tasks}
    for pair in pairs:
        if len(pair) != 2 or any(kinds.get(name) != "binary" for name in pair):
            raise ValueError(f"label order {tuple(pair)}: expected (earlier, later) names of binary schema tasks, "
                             f"the schema's tasks are {kinds}")
    return tuple((earlier, later) for earlier, later in pairs)


def _pointwise_weights(task: Task, values: np.ndarray, mask: np.ndarray, raw: dict[str, np.ndarray],
                       checker: RowChecker) -> np.ndarray:
    """float32 ``n_i`` of a point-wise ranking task's rows (0 outside its sample space): 1, the
    ``weight_column``, or the ``pointwise_weights`` entry of the row's relevance grade."""
    if task.weight_column is not None:
        weights = raw[task.weight_column]
        checker.fail_if(task.weight_column, mask & (weights < 0),
                        f"negative point-wise weight of task {task.name!r} (weights must be >= 0)", weights)
    elif task.pointwise_weights is not None:
        grades = np.array(sorted(task.pointwise_weights))
        slot = np.minimum(np.searchsorted(grades, values), len(grades) - 1)
        checker.fail_if(task.label, mask & (grades[slot] != values),
                        f"relevance grade not in the pointwise_weights of task {task.name!r} (grades "
                        f"{grades.tolist()}); add an entry for it", values)
        weights = np.array([task.pointwise_weights[g] for g in grades.tolist()], np.float64)[slot]
    else:
        weights = np.ones(len(values))
    return np.where(mask, weights, 0.0).astype(np.float32)


MISSING_GROUP = np.iinfo(np.int64).min


def group_ids(column: pa.ChunkedArray) -> np.ndarray:
    """int64 ids of a group column: integers as they are, strings by their 64-bit FNV-1a hash
    (two requests collide with odds ~n^2 / 2^64); a null becomes a reserved missing id."""
    array = one_chunk(column)
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if is_string(array.type):
        ids = np.zeros(len(array), np.int64)
        present = np.asarray(array.is_valid())
        ids[present] = fnv1a_64(array.drop_null().cast(pa.large_string())).view(np.int64)
    else:
        ids = np.asarray(array.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64).copy()
        present = np.asarray(array.is_valid())
    ids[~present] = MISSING_GROUP
    return ids


def pretransform_dense(feature: DenseFeature, values: np.ndarray) -> np.ndarray:
    """The part of the transform that needs no statistics (log1p)."""
    return np.log1p(np.maximum(values, 0.0)) if feature.transform.startswith("log1p") else values


def transform_dense(feature: DenseFeature, values: np.ndarray, stats: DenseStats | None, index: int) -> np.ndarray:
    """Apply the feature's transform; ``stats`` may be None only for non-standardised features."""
    values = pretransform_dense(feature, values)
    if feature.standardized:
        values = (values - stats.mean[index]) / stats.std[index]
    return values


def row_source(table: pa.Table, sources: Sequence[str]) -> RowSource | None:
    """The file of the table's first row and the range of that file's rows in the table."""
    if ROW_COLUMN not in table.column_names or table.num_rows == 0:
        return None
    files = table.column(SOURCE_COLUMN).to_numpy()
    mine = files == files[0]
    rows = table.column(ROW_COLUMN).to_numpy()[mine]
    return RowSource(sources[files[0]], int(rows.min()), int(rows.max()), len(rows), int((~mine).sum()))


class RowChecker:
    """Raises :class:`DataError` naming the file of the first offending row."""

    def __init__(self, table: pa.Table, sources: Sequence[str]):
        self.table = table
        self.sources = sources

    def fail_if(self, column: str, bad: np.ndarray, problem: str, values: np.ndarray | None = None) -> None:
        if bad.any():
            example = f" (e.g. {values[int(np.flatnonzero(bad)[0])]!r})" if values is not None else ""
            self.fail_rows(bad, f"column {column!r}: {problem}{example}")

    def fail_rows(self, bad: np.ndarray, problem: str, fix: str | None = None) -> None:
        """``{file of the first bad row}: {problem}; {count} bad row(s) in this batch[; {fix}]``."""
        if not bad.any():
            return
        row = int(np.flatnonzero(bad)[0])
        source = self.sources[self.table.column(SOURCE_COLUMN)[row].as_py()] if SOURCE_COLUMN in \
            self.table.column_names else "<input>"
        raise DataError(f"{source}: {problem}; {int(bad.sum())} bad row(s) in this batch" + (f"; {fix}" if fix else ""))


def numeric_column(column: pa.ChunkedArray, name: str, checker: RowChecker, fill: float | None = None) -> np.ndarray:
    if column.null_count:
        checker.fail_if(name, np.asarray(column.is_null()) if fill is None else np.zeros(len(column), bool),
                        "missing (null) value")
        # cast first: filling an integer column would truncate a fractional fill value
        column = column.cast(pa.float64()).fill_null(fill)
    values = column.to_numpy().astype(np.float64, copy=False)
    if fill is not None and np.isnan(values).any():  # missing as pandas writes it; the exported program fills it too
        values = np.where(np.isnan(values), fill, values)
    checker.fail_if(name, ~np.isfinite(values), "NaN or inf value", values)
    return values


def extra_column(column: pa.ChunkedArray, name: str, checker: RowChecker) -> torch.Tensor | pa.Array:
    """Text extras stay an Arrow string array, as read (nulls too); integer extras int64 (float64
    would corrupt ids above 2**53); others float64 as :func:`numeric_column`."""
    if is_string(column.type):
        array = column.combine_chunks()
        return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array
    if pa.types.is_integer(column.type) and not column.null_count:
        return torch.from_numpy(column.to_numpy().astype(np.int64))  # a copy: Arrow's buffers are read-only
    return torch.from_numpy(numeric_column(column, name, checker).copy())


def _feature_ids(column: pa.ChunkedArray, feature: SparseFeature, checker: RowChecker) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 ids and int32 per-row counts for one feature (a null row is an empty bag)."""
    array = one_chunk(column)
    if not is_list(array.type):  # single ids; a sequence column may hold them too (sequences of one)
        present = np.asarray(array.is_valid())
        ids = _ids(array.drop_null() if array.null_count else array, feature, checker, np.flatnonzero(present))
        return ids, present.astype(np.int32)
    counts = np.asarray(array.value_lengths().fill_null(0), dtype=np.int32)
    flat = array.flatten()
    row_of_id = np.repeat(np.arange(len(counts)), counts)
    if flat.null_count:
        _fail_on_ids(checker, feature.source_column, np.asarray(flat.is_null()), row_of_id, "null id inside a list")
    ids = _ids(flat, feature, checker, row_of_id)
    if feature.max_length is not None and counts.max(initial=0) > feature.max_length:
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        keep = (np.arange(len(ids)) - starts) < feature.max_length
        ids, counts = ids[keep], np.minimum(counts, feature.max_length)
    return ids, counts


def _derived_ids(table: pa.Table, feature: SparseFeature) -> tuple[np.ndarray, np.ndarray]:
    """Ids and per-row counts of a bucketed or combined feature (:mod:`lightning_mtr.derived`)."""
    if feature.combo:
        text, present = combo_text([table.column(c) for c in feature.combo])
        return _hash_strings(text, feature.num_embeddings), present.astype(np.int32)
    if feature.boundaries is None:
        raise ValueError(f"sparse feature {feature.name!r} is bucketed by quantiles, so the encoder needs the "
                         "training statistics")
    values = table.column(feature.source_column).cast(pa.float64()).fill_null(np.nan).to_numpy()
    return bucket_rows(values, feature.boundaries, feature.num_embeddings), np.ones(len(values), np.int32)


def _ids(array: pa.Array, feature: SparseFeature, checker: RowChecker, row_of_id: np.ndarray) -> np.ndarray:
    if feature.vocab_list is not None:
        return vocab_rows(array, feature.vocab_list)
    if pa.types.is_dictionary(array.type) and pa.types.is_integer(array.type.value_type):
        array = array.dictionary_decode()  # e.g. pandas categoricals of integer ids
    if feature.hashed and not is_string(array.type):
        array = array.cast(pa.string())
    managed = feature.managed_collisions is not None  # raw ids: the model's managed-collision module maps them
    if is_string(array.type):
        return _hash_strings(array, ID_SPACE if managed else feature.num_embeddings)
    ids = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)
    name = feature.source_column
    negative = ids < 0
    if negative.any():
        _fail_on_ids(checker, name, negative, row_of_id, f"negative id (e.g. {ids[negative][0]})")
    if managed:  # 2**63 - 1 itself marks a free row in TorchRec's map
        too_large = ids >= ID_SPACE
        if too_large.any():
            _fail_on_ids(checker, name, too_large, row_of_id, f"id {ID_SPACE} (int64's largest) in a managed table, "
                         "which reserves it; ids must be below it")
        return ids
    too_large = ids >= feature.num_embeddings
    if too_large.any():
        if feature.out_of_range == "modulo":
            return ids % feature.num_embeddings
        _fail_on_ids(checker, name, too_large, row_of_id,
                     f"id >= num_embeddings ({feature.num_embeddings}) (e.g. {ids[too_large][0]}); "
                     "set out_of_range: modulo to fold ids into the table, or managed_collisions to give new ids "
                     "rows of their own")
    return ids


def _fail_on_ids(checker: RowChecker, name: str, bad: np.ndarray, row_of_id: np.ndarray, problem: str) -> None:
    """Map bad flat ids back to their rows so the error names the right file."""
    bad_rows = np.zeros(checker.table.num_rows, bool)
    bad_rows[row_of_id[bad]] = True
    checker.fail_if(name, bad_rows, problem)


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _hash_strings(array: pa.Array, buckets: int) -> np.ndarray:
    """Stable (process- and platform-independent) FNV-1a 64 of each string's UTF-8 bytes, mod ``buckets``.

    Each distinct string of the batch is hashed once, vectorised over strings (one numpy pass
    per byte position), so a batch costs about as much as its longest string, not its rows.
    """
    encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
    hashed = fnv1a_64(encoded.dictionary.cast(pa.large_string())) % np.uint64(buckets)
    return hashed.astype(np.int64)[np.asarray(encoded.indices.fill_null(0), dtype=np.int64)]


def fnv1a_64(strings: pa.LargeStringArray) -> np.ndarray:
    """FNV-1a 64-bit hashes (uint64) of the strings' UTF-8 bytes."""
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    hashes = np.full(len(strings), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for position in range(int(lengths.max(initial=0))):
            active = np.flatnonzero(lengths > position)
            hashes[active] = (hashes[active] ^ data[offsets[active] + position]) * _FNV_PRIME
    return hashes





def _is_id_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_id_type(dtype.value_type)
    return pa.types.is_integer(dtype) or is_string(dtype)
