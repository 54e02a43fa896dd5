"""The data pipeline end to end: Parquet/CSV files -> units -> BatchStream -> Batch.

Exact KJT/dense/label contents for hand-written rows, every bad input raising an error that
names the file and the column, exactly-once reading across ranks and DataLoader workers,
and the dense statistics against numpy.
"""

import math
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.fabric.utilities.data import sized_len
from torch.utils.data import DataLoader

from lightning_mtr.data import reader
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.data.batch import Batch
from lightning_mtr.data.encode import BatchEncoder, DataError, DenseStats, _hash_strings
from lightning_mtr.data.reader import BatchStream, list_files, plan_units, worker_init
from lightning_mtr.data.stats import compute_dense_stats
from lightning_mtr.schema import Schema

INT_LIST = pa.list_(pa.int64())


def write_parquet(path, columns: dict, row_group_size: int | None = None) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def read_batches(schema: Schema, paths, stats: DenseStats | None = None, extras=(), batch_size: int = 1024,
                 **stream_options) -> list[Batch]:
    encoder = BatchEncoder(schema, stats, extras)
    units = plan_units(list_files(paths), encoder)
    return list(BatchStream(units, encoder, batch_size, **stream_options))


def stable_hash(text: str, buckets: int) -> int:
    """Independent statement of the documented hash: FNV-1a 64 of the UTF-8 bytes, mod buckets."""
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) % 2**64
    return value % buckets


def assert_batches_equal(a: Batch, b: Batch) -> None:
    torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert a.sparse.stride() == b.sparse.stride()
    for mine, theirs in ((a.labels, b.labels), (a.masks, b.masks), (a.extras, b.extras), (a.groups, b.groups),
                         (a.row_weights, b.row_weights)):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key


# --------------------------------------------------------------------------- 1. exact contents

EXACT_SCHEMA = Schema.from_dict({
    "sparse": [
        {"name": "user", "num_embeddings": 100},
        {"name": "tags", "num_embeddings": 50, "multi_valued": True},
        {"name": "city", "num_embeddings": 1000},
        {"name": "history", "num_embeddings": 50, "multi_valued": True, "max_length": 2},
        {"name": "item", "num_embeddings": 10, "out_of_range": "modulo"},
    ],
    "dense": [
        {"name": "count", "transform": "log1p_standardize"},
        {"name": "price"},
    ],
    "tasks": [
        {"name": "ctr", "label": "click"},
        {"name": "ctcvr", "label": "click * conversion"},
        {"name": "cvr", "label": "conversion", "sample_space": "click == 1"},
    ],
})
EXACT_STATS = DenseStats(mean=(0.5, 123.0), std=(2.0, 7.0))  # price has no transform: its stats are unused


def exact_rows() -> dict:
    return {
        "user": pa.array([3, None, 0, 99], pa.int64()),
        "tags": pa.array([[1, 2], [], None, [7]], INT_LIST),
        "city": pa.array(["paris", "tokyo", "paris", None]),
        "history": pa.array([[5, 6, 7], [8], [9, 10, 11, 12], None], INT_LIST),
        "item": pa.array([3, 13, 25, 9], pa.int32()),
        "count": pa.array([0.0, 1.0, -5.0, 10.0]),
        "price": pa.array([1.5, -2.0, 0.0, 3.25]),
        "click": pa.array([1, 0, 1, 1], pa.int8()),
        "conversion": pa.array([1, 0, 0, 1], pa.int64()),
    }


def test_exact_sparse_dense_labels_and_masks(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", exact_rows())
    [batch] = read_batches(EXACT_SCHEMA, path, EXACT_STATS)
    paris, tokyo = stable_hash("paris", 1000), stable_hash("tokyo", 1000)

    kjt = batch.sparse
    assert kjt.keys() == ["user", "tags", "city", "history", "item"]
    assert kjt.stride() == 4 and batch.batch_size == 4
    assert kjt.lengths().tolist() == [
        1, 0, 1, 1,  # user: a null single id is an empty bag
        2, 0, 0, 1,  # tags: [] and null both have length 0
        1, 1, 1, 0,  # city
        2, 1, 2, 0,  # history: max_length 2
        1, 1, 1, 1,  # item
    ]
    assert kjt.values().tolist() == [
        3, 0, 99,
        1, 2, 7,
        paris, tokyo, paris,
        5, 6, 8, 9, 10,  # truncation keeps the first ids
        3, 3, 5, 9,      # 13 % 10, 25 % 10
    ]
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
    assert kjt["city"].values().tolist() == [paris, tokyo, paris]

    count = [(math.log1p(x) - 0.5) / 2.0 for x in (0.0, 1.0, 0.0, 10.0)]  # log1p(max(x, 0))
    expected_dense = torch.tensor([count, [1.5, -2.0, 0.0, 3.25]], dtype=torch.float32).T
    assert batch.dense.dtype == torch.float32
    torch.testing.assert_close(batch.dense, expected_dense)

    assert {k: v.tolist() for k, v in batch.labels.items()} == {
        "ctr": [1.0, 0.0, 1.0, 1.0], "ctcvr": [1.0, 0.0, 0.0, 1.0], "cvr": [1.0, 0.0, 0.0, 1.0]}
    assert all(v.dtype == torch.float32 for v in batch.labels.values())
    assert {k: v.tolist() for k, v in batch.masks.items()} == {
        "ctr": [True] * 4, "ctcvr": [True] * 4, "cvr": [True, False, True, True]}
    assert all(v.dtype == torch.bool for v in batch.masks.values())


def test_string_hash_is_stable_across_calls(tmp_path):
    first = write_parquet(tmp_path / "a.parquet", exact_rows())
    rows = exact_rows()
    rows["city"] = pa.array(["berlin", "tokyo", None, "paris"])  # other strings, other order
    second = write_parquet(tmp_path / "b.parquet", rows)
    [a] = read_batches(EXACT_SCHEMA, first, EXACT_STATS)
    [b] = read_batches(EXACT_SCHEMA, second, EXACT_STATS)
    a_ids, b_ids = a.sparse["city"].values().tolist(), b.sparse["city"].values().tolist()
    assert a_ids[1] == b_ids[1] == stable_hash("tokyo", 1000)
    assert a_ids[0] == b_ids[2] == stable_hash("paris", 1000)
    assert b_ids[0] == stable_hash("berlin", 1000)
    strings = pa.array(["paris", "tokyo", "paris", "x"])
    assert _hash_strings(strings, 7).tolist() == [stable_hash(s, 7) for s in strings.to_pylist()]


def test_extras_keep_exact_integer_ids(tmp_path):
    big = 2**60 + 1  # not representable in float64
    rows = exact_rows()
    rows["request_id"] = pa.array([big, 1, 2, 3], pa.int64())
    path = write_parquet(tmp_path / "rows.parquet", rows)
    [batch] = read_batches(EXACT_SCHEMA, path, EXACT_STATS, extras=["request_id"])
    assert batch.extras["request_id"].tolist() == [big, 1, 2, 3]


# --------------------------------------------------------------------------- 2. bad inputs

BAD_SCHEMA = Schema.from_dict({
    "sparse": [
        {"name": "user", "num_embeddings": 100},
        {"name": "tags", "num_embeddings": 50, "multi_valued": True},
        {"name": "city", "num_embeddings": 1000},
    ],
    "dense": [{"name": "count"}],
    "tasks": [
        {"name": "ctr", "label": "click"},
        {"name": "cvr", "label": "conversion", "sample_space": "click == 1"},
    ],
})
NAN, INF = float("nan"), float("inf")


def good_rows(n: int = 6) -> dict:
    return {
        "user": pa.array(range(n), pa.int64()),
        "tags": pa.array([[i % 50, (i + 1) % 50] for i in range(n)], INT_LIST),
        "city": pa.array([f"c{i}" for i in range(n)]),
        "count": pa.array([float(i) for i in range(n)]),
        "click": pa.array([i % 2 for i in range(n)], pa.int64()),
        "conversion": pa.array([0] * n, pa.int64()),
    }


def with_value(column: str, value, dtype: pa.DataType | None = None, row: int = 3) -> dict:
    rows = good_rows()
    column_type = dtype or rows[column].type
    values = rows[column].cast(column_type).to_pylist()
    values[row] = value
    rows[column] = pa.array(values, column_type)
    return rows


BAD_VALUES = {
    "nan dense": (with_value("count", NAN), "count", "NaN or inf"),
    "inf dense": (with_value("count", -INF), "count", "NaN or inf"),
    "null dense": (with_value("count", None), "count", "missing (null)"),
    "nan label": (with_value("click", NAN, pa.float64()), "click", "NaN or inf"),
    "null label": (with_value("click", None), "click", "missing (null)"),
    "label 2": (with_value("click", 2), "click", "outside {0, 1}"),
    "negative id": (with_value("user", -1), "user", "negative id"),
    "id >= vocabulary": (with_value("user", 100), "user", "num_embeddings (100)"),
    "negative id in list": (with_value("tags", [1, -3]), "tags", "negative id"),
    "id >= vocabulary in list": (with_value("tags", [50]), "tags", "num_embeddings (50)"),
    "null id in list": (with_value("tags", [1, None]), "tags", "null id inside a list"),
}
BAD_TYPES = {
    "float sparse id": (with_value("user", 1.0, pa.float64()), "user", "has type double"),
    "string dense": (with_value("count", "1.0", pa.string()), "count", "has type string"),
    "string label": (with_value("click", "1", pa.string()), "click", "has type string"),
    "list for single-valued": ({**good_rows(), "user": pa.array([[1]] * 6, INT_LIST)}, "user", "has type list"),
    "scalar for multi-valued": ({**good_rows(), "tags": pa.array([1] * 6)}, "tags", "has type int64"),
    "list of floats": (with_value("tags", [1.0], pa.list_(pa.float64())), "tags", "expected a list of integer"),
}
MISSING = {
    f"missing {column}": ({k: v for k, v in good_rows().items() if k != column}, column, "missing column")
    for column in ("user", "tags", "count", "click", "conversion")
}


@pytest.mark.parametrize("rows, column, problem", [*BAD_VALUES.values(), *BAD_TYPES.values(), *MISSING.values()],
                         ids=[*BAD_VALUES, *BAD_TYPES, *MISSING])
def test_bad_input_names_file_and_column(tmp_path, rows, column, problem):
    path = write_parquet(tmp_path / "part-bad.parquet", rows)
    with pytest.raises(DataError) as error:
        read_batches(BAD_SCHEMA, tmp_path, batch_size=4, shuffle_buffer=16)
    message = str(error.value)
    assert path in message and repr(column) in message and problem in message, message


def test_extras_are_checked(tmp_path):
    rows = good_rows()
    rows["row_id"] = pa.array([[1, 2]] * 6)  # text ids are fine extras (tests/test_extras.py); lists are not
    path = write_parquet(tmp_path / "rows.parquet", rows)
    with pytest.raises(DataError, match="'row_id' has type list<element: int64>, expected numbers or text") as error:
        read_batches(BAD_SCHEMA, path, extras=["row_id"])
    assert path in str(error.value)
    with pytest.raises(DataError, match="missing column 'request_id'"):
        read_batches(BAD_SCHEMA, path, extras=["request_id"])


def corrupt_files(tmp_path) -> dict:
    good = tmp_path / "good.parquet"
    write_parquet(good, good_rows(200))
    data = good.read_bytes()
    files = {
        "empty": write_parquet(tmp_path / "empty.parquet", {k: v[:0] for k, v in good_rows().items()}),
        "random": tmp_path / "random.parquet",
        "truncated": tmp_path / "truncated.parquet",
        "header-only csv": tmp_path / "header.csv",
        "empty csv": tmp_path / "empty.csv",
    }
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["header-only csv"].write_text(",".join(good_rows()) + "\n")
    files["empty csv"].write_bytes(b"")
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize("name, problem", [
    ("empty", "empty file"), ("random", "unreadable"), ("truncated", "unreadable"),
    ("header-only csv", "empty file"), ("empty csv", "unreadable"),
])
def test_unusable_file_is_named(tmp_path, name, problem):
    path = corrupt_files(tmp_path)[name]
    with pytest.raises(DataError) as error:
        read_batches(BAD_SCHEMA, path)
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value), str(error.value)


def test_bad_paths(tmp_path):
    (tmp_path / "notes.md").write_text("not data")
    with pytest.raises(DataError, match="no .parquet/.csv/.tsv/.txt files") as error:
        list_files(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(DataError, match="unsupported file type"):
        list_files(tmp_path / "notes.md")
    with pytest.raises(DataError, match="no such file"):
        list_files(tmp_path / "missing.parquet")


@pytest.mark.parametrize("dtype", [pa.float64(), pa.int64()])
def test_fill_missing_replaces_nulls(tmp_path, dtype):
    schema = Schema.from_dict({
        "dense": [
            {"name": "count", "fill_missing": 0.5},
            {"name": "other", "column": "count", "transform": "log1p", "fill_missing": 3.0},
        ],
        "tasks": [{"name": "ctr", "label": "click"}],
    })
    rows = {"count": pa.array([2, None, 1, None], dtype), "click": pa.array([0, 1, 0, 1])}
    [batch] = read_batches(schema, write_parquet(tmp_path / "rows.parquet", rows))
    expected = [[2.0, math.log1p(2.0)], [0.5, math.log1p(3.0)], [1.0, math.log1p(1.0)], [0.5, math.log1p(3.0)]]
    torch.testing.assert_close(batch.dense, torch.tensor(expected, dtype=torch.float32))


def test_fill_missing_fills_a_nan_as_the_exported_program_does(tmp_path):
    """pandas writes a missing float as NaN, not null; with fill_missing it is missing, not bad input."""
    schema = Schema.from_dict({"dense": [{"name": "count", "transform": "log1p", "fill_missing": 3.0}],
                               "tasks": [{"name": "ctr", "label": "click"}]})
    rows = {"count": pa.array([2.0, NAN, None]), "click": pa.array([0, 1, 0])}
    [batch] = read_batches(schema, write_parquet(tmp_path / "rows.parquet", rows))
    expected = [[math.log1p(2.0)], [math.log1p(3.0)], [math.log1p(3.0)]]
    torch.testing.assert_close(batch.dense, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("bad", ["a", "b"])
def test_shuffled_error_names_the_bad_file(tmp_path, bad):
    paths = {}
    for name in "ab":
        rows = with_value("count", NAN, row=4) if name == bad else good_rows()
        paths[name] = write_parquet(tmp_path / f"{name}.parquet", rows, row_group_size=3)
    with pytest.raises(DataError) as error:  # one batch of 12 rows from both files, shuffled together
        read_batches(BAD_SCHEMA, tmp_path, batch_size=12, shuffle_buffer=64)
    message = str(error.value)
    good = paths["b" if bad == "a" else "a"]
    assert paths[bad] in message and good not in message and "'count'" in message, message


TASKS = [{"name": "ctr", "label": "click"}, {"name": "ctcvr", "label": "click * conversion"},
         {"name": "cvr", "label": "conversion", "sample_space": "click == 1 and position < 3"}]


@pytest.mark.parametrize("config, column", [
    ({"sparse": [{"name": "c", "column": "click", "num_embeddings": 2}]}, "click"),
    ({"dense": [{"name": "conversion"}]}, "conversion"),  # read only through an expression label
    ({"sparse": [{"name": "position", "num_embeddings": 10}]}, "position"),  # a sample-space column
    ({"dense": [{"name": "ctr_truth", "column": "gt_ctr"}], "ground_truth": ["gt_*"]}, "gt_ctr"),
    ({"sparse": [{"name": "gt_cvr", "num_embeddings": 5}], "ground_truth": ["x", "gt_*"]}, "gt_cvr"),
])
def test_label_leakage_is_rejected(config, column):
    with pytest.raises(ValueError, match="label leakage") as error:
        Schema.from_dict({"tasks": TASKS, **config})
    assert repr(column) in str(error.value)


def test_schema_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown schema keys \['features'\]"):
        Schema.from_dict({"tasks": TASKS, "features": []})
    with pytest.raises(ValueError, match=r"'user'.*unknown keys \['vocab'\]"):
        Schema.from_dict({"tasks": TASKS, "sparse": [{"name": "user", "num_embeddings": 5, "vocab": 5}]})
    shared = [{"name": "a", "table": "ids", "num_embeddings": 10}, {"name": "b", "table": "ids", "num_embeddings": 20}]
    with pytest.raises(ValueError, match="share table 'ids'"):
        Schema.from_dict({"tasks": TASKS, "sparse": shared})
    yaml_path = tmp_path / "schema.yaml"
    yaml_path.write_text("tasks: [{name: ctr, label: click}]\nlabels: []\n")
    with pytest.raises(ValueError, match="unknown schema keys") as error:
        Schema.from_yaml(yaml_path)
    assert str(yaml_path) in str(error.value)


def test_shared_table_that_agrees_is_one_table():
    shared = [{"name": "a", "table": "ids", "num_embeddings": 10}, {"name": "b", "table": "ids", "num_embeddings": 10},
              {"name": "c", "num_embeddings": 3}]
    schema = Schema.from_dict({"tasks": TASKS, "sparse": shared})
    assert [(t.name, t.feature_names) for t in schema.tables] == [("ids", ("a", "b")), ("c", ("c",))]


# --------------------------------------------------------------------------- 3. reader

READER_SCHEMA = Schema.from_dict({
    "sparse": [{"name": "user", "num_embeddings": 1000}],
    "dense": [{"name": "count"}],
    "tasks": [{"name": "ctr", "label": "click"}],
})
FILE_ROWS = (29, 40, 17)  # row groups of 10: 3 + 4 + 2 units, uneven across 2 ranks x 2 workers


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    """Three Parquet files with several row groups; row_id is unique and shuffled within each file."""
    directory = tmp_path_factory.mktemp("log")
    rng = np.random.default_rng(0)
    start = 0
    for index, rows in enumerate(FILE_ROWS):
        row_id = start + rng.permutation(rows)
        write_parquet(directory / f"part-{index}.parquet", {
            "row_id": pa.array(row_id, pa.int64()),
            "user": pa.array(row_id % 1000, pa.int64()),
            "count": pa.array(row_id * 0.5),
            "click": pa.array(row_id % 2, pa.int8()),
        }, row_group_size=10)
        start += rows
    return directory


def stream(log_dir, batch_size=8, **options) -> BatchStream:
    encoder = BatchEncoder(READER_SCHEMA, extras=["row_id"])
    units = plan_units(list_files(log_dir), encoder)
    assert len(units) == 9
    return BatchStream(units, encoder, batch_size, **options)


def row_ids(batches) -> list[int]:
    ids = []
    for batch in batches:
        ids.extend(batch.extras["row_id"].tolist())
        # the row travels intact: every column of a row agrees with its row_id
        assert batch.sparse.values().tolist() == [i % 1000 for i in batch.extras["row_id"].tolist()]
        assert batch.dense[:, 0].tolist() == [i * 0.5 for i in batch.extras["row_id"].tolist()]
    return ids


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle_buffer, epoch", [(0, 0), (16, 0), (16, 1)])
def test_every_row_once_across_ranks_and_workers(log_dir, num_workers, shuffle_buffer, epoch):
    seen = []
    for rank in (0, 1):
        data = stream(log_dir, shuffle_buffer=shuffle_buffer, rank=rank, world_size=2)
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=None, num_workers=num_workers, worker_init_fn=worker_init)
        ids = row_ids(loader)
        assert ids, f"rank {rank} read nothing"
        seen.extend(ids)
    assert sorted(seen) == list(range(sum(FILE_ROWS)))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle_buffer", [0, 20])
def test_batches_full_except_each_readers_last(log_dir, monkeypatch, drop_last, shuffle_buffer):
    """Each of the 2 ranks x 2 workers readers, checked on its own (worker info faked in-process)."""
    total, reader_rows = [], []
    for rank in (0, 1):
        for worker in (0, 1):
            monkeypatch.setattr(reader, "get_worker_info", lambda w=worker: SimpleNamespace(num_workers=2, id=w))
            data = stream(log_dir, batch_size=8, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                          rank=rank, world_size=2)
            units = data.my_units()
            rows = sum(u.stop - u.start for u in units)
            reader_rows.append(rows)
            batches = list(data)
            sizes = [b.batch_size for b in batches]
            assert all(s == 8 for s in sizes[:-1])
            assert sizes == [8] * (rows // 8) + ([] if drop_last or rows % 8 == 0 else [rows % 8])
            for batch in batches:
                assert batch.sparse.stride() == batch.batch_size == len(batch.labels["ctr"])
            total.extend(row_ids(batches))
    assert len(set(total)) == len(total)
    assert max(reader_rows) - min(reader_rows) <= 1, f"readers must get equal rows, got {reader_rows}"
    if not drop_last:
        assert sorted(total) == list(range(sum(FILE_ROWS)))


def test_shuffle_changes_order_between_epochs_not_the_rows(log_dir):
    data = stream(log_dir, shuffle_buffer=16, seed=3)
    orders = {}
    for epoch in (0, 1, 0):
        data.set_epoch(epoch)
        orders.setdefault(epoch, []).append(row_ids(data))
    assert orders[0][0] == orders[0][1], "the same seed and epoch must give the same order"
    assert orders[0][0] != orders[1][0]
    assert sorted(orders[0][0]) == sorted(orders[1][0]) == list(range(sum(FILE_ROWS)))
    assert orders[0][0] != sorted(orders[0][0])


def test_no_shuffle_keeps_file_order(log_dir):
    expected = [i for path in list_files(log_dir) for i in pq.read_table(path)["row_id"].to_pylist()]
    data = stream(log_dir, shuffle_buffer=0)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        assert row_ids(data) == expected


CSV_SCHEMA = Schema.from_dict({
    "sparse": [{"name": "user", "num_embeddings": 10}, {"name": "city", "num_embeddings": 100}],
    "dense": [{"name": "count", "transform": "log1p"}],
    "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "sample_space": "click == 1"}],
})


def test_csv_gives_the_same_batch_as_parquet(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "rows.csv").write_text(
        "row_id,user,city,count,click,conversion,unused\n"
        "0,3,paris,1.5,1,0,x\n"
        "1,7,,2.0,0,0,y\n"   # an empty categorical is missing (an empty bag), as a Parquet null
        "2,3,tokyo,0.25,1,1,z\n"
        "3,0,paris,4,0,0,w\n"
    )
    write_parquet(tmp_path / "rows.parquet", {
        "row_id": pa.array([0, 1, 2, 3], pa.int64()),
        "user": pa.array([3, 7, 3, 0], pa.int64()),
        "city": pa.array(["paris", None, "tokyo", "paris"]),
        "count": pa.array([1.5, 2.0, 0.25, 4.0]),
        "click": pa.array([1, 0, 1, 0], pa.int64()),
        "conversion": pa.array([0, 0, 1, 0], pa.int64()),
    })
    [from_csv] = read_batches(CSV_SCHEMA, tmp_path / "csv", extras=["row_id"])
    [from_parquet] = read_batches(CSV_SCHEMA, tmp_path / "rows.parquet", extras=["row_id"])
    assert_batches_equal(from_csv, from_parquet)
    assert from_csv.sparse["city"].lengths().tolist() == [1, 0, 1, 1]
    assert from_csv.sparse["city"].values().tolist() == [stable_hash(s, 100) for s in ("paris", "tokyo", "paris")]


def test_csv_errors_name_file_and_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("user,city,count,click,conversion\n3,paris,1.5,2,0\n")
    with pytest.raises(DataError, match="'click': binary label outside") as error:
        read_batches(CSV_SCHEMA, path)
    assert str(path) in str(error.value)
    path.write_text("user,city,count,click\n3,paris,1.5,1\n")
    with pytest.raises(DataError, match="missing column 'conversion'") as error:
        read_batches(CSV_SCHEMA, path)
    assert str(path) in str(error.value)


# --------------------------------------------------------------------------- 4. moving batches

def read_exact_batch(path) -> Batch:
    rows = {**exact_rows(), "row_id": pa.array([10, 11, 12, 13], pa.int64())}
    [batch] = read_batches(EXACT_SCHEMA, write_parquet(path, rows), EXACT_STATS, extras=["row_id"])
    return batch


@pytest.fixture
def exact_batch(tmp_path) -> Batch:
    return read_exact_batch(tmp_path / "rows.parquet")


def test_batch_to_its_own_device_is_the_batch_itself(exact_batch):
    """No copy where it is already: work started on its features before the move (the sharded
    input distribution) must still find them."""
    for device in ("cpu", torch.device("cpu")):
        assert exact_batch.to(device) is exact_batch


def test_batch_to_another_device_moves_every_field(exact_batch):
    """The meta device stands in for a GPU on this machine: every field moves, with its keys,
    shapes and dtypes (the contents are checked on CUDA below)."""
    batch = replace(exact_batch, groups={"request_id": torch.tensor([7, 7, 8, 8])},
                    row_weights={"ctr": torch.tensor([1.0, 5.0, 1.0, 1.0])})
    moved = batch.to("meta")
    assert moved.sparse.values().device.type == moved.sparse.lengths().device.type == "meta"
    assert moved.sparse.keys() == batch.sparse.keys() and moved.sparse.lengths().shape == batch.sparse.lengths().shape
    for name in ("dense", "labels", "masks", "extras", "groups", "row_weights"):
        mine, theirs = getattr(moved, name), getattr(batch, name)
        mine, theirs = (mine, theirs) if isinstance(theirs, dict) else ({name: mine}, {name: theirs})
        assert mine.keys() == theirs.keys() and theirs, name
        for key, tensor in mine.items():
            assert tensor.device.type == "meta", (name, key)
            assert (tensor.shape, tensor.dtype) == (theirs[key].shape, theirs[key].dtype), (name, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory needs a CUDA device")
def test_pin_memory_and_cuda_keep_contents(exact_batch, tmp_path):
    pinned = exact_batch.pin_memory()
    assert pinned.dense.is_pinned() and pinned.sparse.values().is_pinned()
    assert_batches_equal(pinned, exact_batch)
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert on_gpu.dense.is_cuda and on_gpu.sparse.values().is_cuda
    # read again: an object the moves never touched
    assert_batches_equal(on_gpu.to("cpu"), read_exact_batch(tmp_path / "again.parquet"))


# --------------------------------------------------------------------------- 5. dense statistics

def test_dense_stats_match_numpy(tmp_path):
    schema = Schema.from_dict({
        "dense": [
            {"name": "x", "transform": "log1p_standardize"},
            {"name": "y", "transform": "standardize"},
            {"name": "z", "transform": "log1p", "fill_missing": 2.0},
            {"name": "flat", "transform": "standardize"},
        ],
        "tasks": [{"name": "ctr", "label": "click"}],
    })
    rng = np.random.default_rng(1)
    parts = []
    for index, rows in enumerate((50, 120, 7)):
        z = rng.exponential(3.0, rows)
        z_nulls = rng.random(rows) < 0.2
        part = {
            "x": rng.lognormal(1.0, 2.0, rows) * rng.choice([-1, 0, 1], rows),  # negatives and zeros clip to 0
            "y": 1e9 + rng.normal(0.0, 1.0, rows),  # large offset, unit spread (e.g. a timestamp)
            "z": pa.array(z, mask=z_nulls),
            "flat": np.full(rows, 4.0),
            "click": rng.integers(0, 2, rows),
        }
        write_parquet(tmp_path / f"part-{index}.parquet", part, row_group_size=32)
        parts.append({**part, "z": np.where(z_nulls, 2.0, z)})
    probe = BatchEncoder(schema, DenseStats((0.0,) * 4, (1.0,) * 4))
    stats = compute_dense_stats(schema, plan_units(list_files(tmp_path), probe))
    columns = {name: np.concatenate([p[name] for p in parts]) for name in ("x", "y", "z", "flat")}
    transformed = [np.log1p(np.maximum(columns["x"], 0)), columns["y"], np.log1p(columns["z"]), columns["flat"]]
    np.testing.assert_allclose(stats.mean, [v.mean() for v in transformed], rtol=1e-12)
    np.testing.assert_allclose(stats.std[:3], [v.std() for v in transformed[:3]], rtol=1e-6)
    assert stats.std[3] == 1.0, "a constant feature gets std 1, not 0"


def test_fnv1a_matches_published_test_vectors():
    from lightning_mtr.data.encode import fnv1a_64

    # FNV-1a 64 reference values (Fowler/Noll/Vo test suite): "", "a", "foobar"
    hashes = fnv1a_64(pa.array(["", "a", "foobar", "é"], pa.large_string()))
    assert hashes[:3].tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert int(hashes[3]) == stable_hash("é", 2**64)  # multi-byte UTF-8


def test_dictionary_columns_are_accepted(tmp_path):
    """pandas categoricals arrive as dictionary<string> / dictionary<int> columns."""
    strings = pa.array(["paris", "tokyo", "paris"]).dictionary_encode()
    ints = pa.array([3, 1, 3]).dictionary_encode()
    schema = Schema.from_dict({
        "sparse": [{"name": "city", "num_embeddings": 1000}, {"name": "shop", "num_embeddings": 10}],
        "tasks": [{"name": "ctr", "label": "click"}],
    })
    table = pa.table({"city": strings, "shop": ints, "click": [0, 1, 0]})
    encoder = BatchEncoder(schema)
    encoder.check_columns(table.schema, "cats.parquet")
    batch = encoder.encode(table, ["cats.parquet"])
    values = batch.sparse.to_dict()
    assert values["city"].values().tolist() == [stable_hash("paris", 1000), stable_hash("tokyo", 1000),
                                                stable_hash("paris", 1000)]
    assert values["shop"].values().tolist() == [3, 1, 3]


def test_hashed_ids_are_strings_whatever_the_csv_reader_would_guess(tmp_path):
    """A hex id column that happens to hold only digits in one file must hash like in the others."""
    schema = Schema.from_dict({"sparse": [{"name": "C1", "num_embeddings": 1000, "hashed": True}],
                               "tasks": [{"name": "ctr", "label": "label"}]})
    (tmp_path / "a.csv").write_text("C1,label\n12345678,1\n00000042,0\n")
    (tmp_path / "b.csv").write_text("C1,label\n05db9164,1\n12345678,0\n")
    encoder = BatchEncoder(schema)
    ids = {}
    for name in ("a.csv", "b.csv"):
        units = plan_units([str(tmp_path / name)], encoder)
        (batch,) = BatchStream(units, encoder, batch_size=8)
        ids[name] = batch.sparse.to_dict()["C1"].values().tolist()
    assert ids["a.csv"] == [stable_hash("12345678", 1000), stable_hash("00000042", 1000)]
    assert ids["b.csv"] == [stable_hash("05db9164", 1000), stable_hash("12345678", 1000)]
    integers = pa.table({"C1": [7], "label": [1]})  # Parquet ints of a hashed feature hash as text
    assert BatchEncoder(schema).encode(integers, ["x"]).sparse.values().tolist() == [stable_hash("7", 1000)]


def test_even_batches_give_every_process_the_same_number_of_steps(log_dir, monkeypatch):
    """Distributed training needs equal step counts even when the rows do not divide evenly."""
    total_rows = sum(FILE_ROWS)
    counts, seen = {}, []
    for rank in (0, 1):
        steps = 0
        for worker in (0, 1):
            monkeypatch.setattr(reader, "get_worker_info", lambda w=worker: SimpleNamespace(num_workers=2, id=w))
            data = stream(log_dir, batch_size=8, shuffle_buffer=20, rank=rank, world_size=2)
            data.even_batches = True
            batches = list(data)
            assert all(b.batch_size == 8 for b in batches)
            steps += len(batches)
            seen.extend(row_ids(batches))
        counts[rank] = steps
    assert counts[0] == counts[1] == 2 * (total_rows // 4 // 8), counts
    assert len(set(seen)) == len(seen), "no row twice"


@pytest.mark.parametrize("batch_size", [5, 7, 8, 14, 23, 1000])  # 86 rows: 14 or 15 per reader
def test_evaluation_gives_every_process_the_same_number_of_batches_and_every_row(log_dir, monkeypatch, batch_size):
    """Evaluation keeps every row, yet a process with one batch more than another would wait
    forever in the sharded lookup; the leftover rows join each reader's last batch."""
    readers = {}
    for rank in (0, 1, 2):
        for worker in (0, 1):
            monkeypatch.setattr(reader, "get_worker_info", lambda w=worker: SimpleNamespace(num_workers=2, id=w))
            data = stream(log_dir, batch_size=batch_size, rank=rank, world_size=3)
            data.equal_batch_counts = True
            readers[rank, worker] = list(data)
    counts = {len(batches) for batches in readers.values()}
    assert len(counts) == 1, counts
    seen = [i for batches in readers.values() for i in row_ids(batches)]
    assert sorted(seen) == list(range(sum(FILE_ROWS))), "every row once"
    assert all(b.batch_size <= batch_size + 1 for batches in readers.values() for b in batches)
    plain = stream(log_dir, batch_size=batch_size, rank=0, world_size=3)
    assert all(b.batch_size <= batch_size for b in plain), "without the option batches never exceed batch_size"


def _round_robin(per_worker: list[list]) -> list:
    """What a DataLoader yields from its workers: in turn, passing over exhausted ones."""
    queues, merged, worker = [list(q) for q in per_worker], [], 0
    while any(queues):
        if queues[worker]:
            merged.append(queues[worker].pop(0))
        worker = (worker + 1) % len(queues)
    return merged


@pytest.mark.parametrize(("world_size", "workers", "even"), [(2, 2, True), (1, 3, False)])
def test_resume_skips_the_batches_already_trained_on(log_dir, monkeypatch, world_size, workers, even):
    """Skipping ``done`` batches leaves exactly the rest of the epoch, in order, also when the
    workers' batch counts differ (86 rows over 3 workers: 8, 8 and 7 batches of 4), and only in
    the epoch the checkpoint was taken in."""
    def epoch(resume, epoch=0):
        per_worker = []
        for worker in range(workers):
            monkeypatch.setattr(reader, "get_worker_info", lambda w=worker: SimpleNamespace(num_workers=workers, id=w))
            data = stream(log_dir, batch_size=4, shuffle_buffer=20, rank=world_size - 1, world_size=world_size,
                          even_batches=even, resume=resume)
            data.set_epoch(epoch)
            per_worker.append([row_ids([b]) for b in data])
        return _round_robin(per_worker)

    full = epoch(None)
    assert len({len(b) for b in full}) > 1 or even, "the uneven case must have a short batch"
    for done in range(len(full) + 1):
        assert epoch((0, done)) == full[done:], done
    assert epoch((0, 3), epoch=1) == epoch(None, epoch=1), "other epochs are whole"


def test_headerless_tab_separated_text(tmp_path):
    """Logs such as ByteRec's: tab-separated .txt without a header; column names come from the config."""
    from lightning_mtr.data.reader import TextFormat

    (tmp_path / "log.txt").write_text("7\t-1\t1\t0.5\n3\t42\t0\t1.5\n")
    schema = Schema.from_dict({
        "sparse": [{"name": "uid", "num_embeddings": 10}, {"name": "music", "num_embeddings": 100, "hashed": True}],
        "dense": [{"name": "duration"}],
        "tasks": [{"name": "finish", "label": "finish"}],
    })
    encoder = BatchEncoder(schema)
    text = TextFormat(delimiter="\t", column_names=("uid", "music", "finish", "duration"))
    (batch,) = BatchStream(plan_units(list_files(tmp_path), encoder, text), encoder, batch_size=8)
    features = batch.sparse.to_dict()
    assert features["uid"].values().tolist() == [7, 3]
    assert features["music"].values().tolist() == [stable_hash("-1", 100), stable_hash("42", 100)]
    assert batch.labels["finish"].tolist() == [1.0, 0.0]
    assert batch.dense[:, 0].tolist() == [0.5, 1.5]


def test_standardised_features_cannot_be_encoded_without_statistics():
    schema = Schema.from_dict({"dense": [{"name": "x", "transform": "log1p_standardize"}],
                               "tasks": [{"name": "ctr", "label": "click"}]})
    encoder = BatchEncoder(schema)  # enough for checking columns
    encoder.check_columns(pa.schema([("x", pa.float64()), ("click", pa.int64())]), "a.parquet")
    with pytest.raises(ValueError, match="needs dense statistics"):
        encoder.encode(pa.table({"x": [1.0], "click": [1]}), ["a.parquet"])


def test_a_missing_split_or_training_statistics_is_a_data_error(tmp_path):
    """What the CLI prints in one line (the data module's ValueError was a 50-line traceback): a
    split without files, standardised features without training data for their statistics."""
    schema = tmp_path / "schema.yaml"
    schema.write_text("dense: [{name: x, transform: standardize}]\ntasks: [{name: ctr, label: click}]\n")
    data = MultiTaskDataModule(str(schema), test=write_parquet(tmp_path / "t.parquet", {"x": [1.0], "click": [1]}))
    with pytest.raises(DataError, match=r"no val data configured: set data.val .*limit_val_batches 0"):
        data.val_dataloader()
    with pytest.raises(DataError, match=r"need training data \(data.train\)"):
        data.test_dataloader()


def test_an_encoder_without_labels_reads_features_and_extras_only(tmp_path):
    """``labels=False`` (predict): no label, sample-space, weight or group column is needed, from
    Parquet or CSV, and the batches carry none; the features encode as with labels."""
    schema = Schema.from_dict({
        "sparse": [{"name": "shop", "num_embeddings": 10}], "dense": [{"name": "price"}],
        "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "buy", "sample_space": "click == 1"},
                  {"name": "rank", "label": "grade", "kind": "ranking", "group": "request",
                   "ranking_loss": "pointwise", "weight_column": "n"}],
    })
    labelled = pa.table({"shop": [3, 1], "price": [0.5, 2.0], "click": [1, 0], "buy": [1, 0], "grade": [2, 0],
                         "n": [1.0, 1.0], "request": [7, 7], "row_id": [11, 12]})
    unlabelled = labelled.select(["shop", "price", "row_id"])
    encoder = BatchEncoder(schema, extras=["row_id"], labels=False)
    assert encoder.columns == ["shop", "price", "row_id"] and encoder.numeric_columns == ["price"]
    (tmp_path / "log.csv").write_text("shop,price,row_id\n3,0.5,11\n1,2.0,12\n")
    for path in (write_parquet(tmp_path / "log.parquet", unlabelled.to_pydict()), str(tmp_path / "log.csv")):
        (batch,) = BatchStream(plan_units([path], encoder), encoder, batch_size=8)
        assert batch.labels == {} and batch.masks == {} and batch.groups == {} and batch.row_weights == {}
        assert batch.extras["row_id"].tolist() == [11, 12]
        expected = BatchEncoder(schema, extras=["row_id"]).encode(labelled, ["log.parquet"])
        torch.testing.assert_close(batch.dense, expected.dense)
        assert torch.equal(batch.sparse.values(), expected.sparse.values())
    with pytest.raises(DataError, match=r"log.parquet: missing column 'buy'"):
        BatchEncoder(schema).check_columns(unlabelled.schema, "log.parquet")


SCHEMA_FILE = str(Path(__file__).resolve().parents[1] / "conf" / "schemas" / "synthetic_impressions.yaml")


@pytest.mark.parametrize("sizes, message", [
    ({"eval_batch_size": 0}, "data.eval_batch_size is 0; it must be at least 1"),
    ({"shuffle_buffer": -1}, r"data.shuffle_buffer is -1; it must be at least 0 \(0: no shuffling\)"),
    ({"batch_size": 0}, "data.batch_size is 0; it must be at least 1"),
])
def test_sizes_that_would_be_taken_silently_are_refused(sizes, message):
    with pytest.raises(DataError, match=message):
        MultiTaskDataModule(SCHEMA_FILE, **sizes)


def test_no_eval_batch_size_means_the_training_batch_size():
    data = MultiTaskDataModule(SCHEMA_FILE, batch_size=7, shuffle_buffer=0)
    assert (data.eval_batch_size, data.shuffle_buffer) == (7, 0)


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("mode", [{}, {"drop_last": True}, {"even_batches": True}, {"equal_batch_counts": True}])
def test_length_is_the_batches_each_process_yields(log_dir, monkeypatch, world_size, workers, mode):
    """``len()`` (the progress bar's total, Lightning's end of epoch) from the row counts alone
    equals the batches each process's readers yield, shuffled, whatever the shares."""
    for rank in range(world_size):
        yielded = 0
        for worker in range(max(workers, 1)):
            if workers:
                monkeypatch.setattr(reader, "get_worker_info",
                                    lambda w=worker: SimpleNamespace(num_workers=workers, id=w))
            data = stream(log_dir, batch_size=7, shuffle_buffer=20, rank=rank, world_size=world_size,
                          loader_workers=workers, **mode)
            yielded += len(list(data))
        assert len(data) == yielded, (rank, mode)


def test_a_data_loader_takes_the_length_and_none_without_its_worker_count(log_dir):
    loader = DataLoader(stream(log_dir, batch_size=8, loader_workers=2), batch_size=None, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a loader yields more than its length
        assert len(loader) == len(list(loader)) == 2 * math.ceil(43 / 8)  # 86 rows, 43 per worker
    assert sized_len(DataLoader(stream(log_dir), batch_size=None)) is None
