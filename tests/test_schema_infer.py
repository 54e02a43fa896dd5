"""``lightning-mtr schema infer``: on every dataset of conf/data (their samples in ../shared/data) and on
the synthetic logs, the inferred schema loads, calls the known columns what the hand-written schemas
call them, sizes tables for the validation split's ids, and trains with the dataset's own config.
Then the pieces: the distinct-count sketch, the label chain, the table sizes and dense transforms
against hand-computed values, text columns that change type mid-file, and the one-line errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import yaml

from lightning_mtr.cli import MultiTaskCLI, main
from lightning_mtr.data.infer import infer, render
from lightning_mtr.data.profile import SKETCH_SIZE, profile_files
from lightning_mtr.data.reader import TextFormat
from lightning_mtr.schema import Schema

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMOKE = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.logger", "false"]
# conf/data config -> its sample files under ../shared/data (train, val) and the label columns, funnel order
DATASETS = {
    "ali_ccp": ("ali_ccp/torch_rechub/ali_ccp_train_sample.csv", "ali_ccp/torch_rechub/ali_ccp_val_sample.csv",
                ["click", "purchase"]),
    "ali_ccp_esmm": ("ali_ccp/torch_rechub/ali_ccp_train_sample.csv", "ali_ccp/torch_rechub/ali_ccp_val_sample.csv",
                     ["click", "purchase"]),
    "aliexpress": ("aliexpress/torch_rechub/aliexpress_train_sample.csv",
                   "aliexpress/torch_rechub/aliexpress_train_sample.csv", ["click", "conversion"]),
    "byterec": ("byterec_icme2019/deepctr_torch/byterec_sample.txt",
                "byterec_icme2019/deepctr_torch/byterec_sample.txt", ["finish", "like"]),
    "census_income": ("census_income/torch_rechub/census_income_train_sample.csv",
                      "census_income/torch_rechub/census_income_val_sample.csv", ["income", "marital status"]),
    "criteo": ("criteo/torch_rechub/criteo_sample.csv", "criteo/torch_rechub/criteo_sample.csv", ["label"]),
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist


def test_every_data_config_has_its_files_here():
    """A new dataset config joins DATASETS (or the synthetic tests below), so infer is tried on it."""
    synthetic = {"mmoe_synthetic", "synthetic_days", "synthetic_features"}  # the last: the impression log
    assert {p.stem for p in (REPO / "conf" / "data").glob("*.yaml")} == set(DATASETS) | synthetic


def _infer(args: list[str], out: Path, capsys) -> Schema:
    assert main(["schema", "infer", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    return Schema.from_yaml(out)


def _text_format(config: dict) -> TextFormat:
    text = config["data"].get("text_format") or {}
    names = text.get("column_names")
    return TextFormat(text.get("delimiter", ","), tuple(names) if names else None)


def _text_args(text: TextFormat) -> list[str]:
    names = ["--column-names", ",".join(text.column_names)] if text.column_names else []
    return ["--delimiter", text.delimiter, *names]


def _read(path: str | Path, text: TextFormat) -> pa.Table:
    if str(path).endswith(".parquet"):
        return pq.read_table(path)
    with text.open(str(path)) as reader:
        return reader.read_all()


def _kinds(schema: Schema) -> dict[str, str]:
    return {**{f.source_column: "sparse" for f in schema.sparse}, **{f.source_column: "dense" for f in schema.dense}}


def _assert_like_the_hand_schema(inferred: Schema, hand: Schema) -> None:
    """Every column the hand-written schema uses is inferred the same kind; the same labels and spaces."""
    found, wanted = _kinds(inferred), _kinds(hand)
    assert {c: found.get(c) for c in wanted} == wanted
    tasks = {(t.label.replace(" ", ""), t.sample_space, t.kind) for t in inferred.tasks}
    assert {(t.label.replace(" ", ""), t.sample_space, t.kind) for t in hand.tasks} <= tasks


def _assert_tables_cover(schema: Schema, val: pa.Table) -> list[str]:
    """Ids looked up directly (``out_of_range: modulo``) of the validation split all have a row of their
    own (hashed and managed tables take any id); the names of the features checked."""
    direct = [f for f in schema.sparse if f.out_of_range == "modulo"]
    for feature in direct:
        ids = val.column(feature.source_column).drop_null().to_numpy()
        assert ids.max(initial=0) < feature.num_embeddings, feature.name
    return [f.name for f in direct]


def _assert_fits(config: list[str], schema: Path, root: Path) -> MultiTaskCLI:
    cli = MultiTaskCLI(args=["fit", *config, "--data.schema", str(schema), *SMOKE,
                             "--trainer.default_root_dir", str(root)])
    assert cli.trainer.global_step == 2
    for task in cli.datamodule.schema.tasks:
        assert math.isfinite(cli.trainer.callback_metrics[f"train/{task.name}/loss"]), task.name
    return cli


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"sample datasets not found at {SHARED} (the sibling shared/ "
                    "checkout; a plain clone has none)")
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_dataset_infers_a_schema_that_trains(name, tmp_path, capsys):
    train, val, labels = DATASETS[name]
    config = yaml.safe_load((REPO / "conf" / "data" / f"{name}.yaml").read_text())
    text = _text_format(config)
    out = tmp_path / "schema.yaml"
    inferred = _infer(["--data", str(SHARED / train), *(a for label in labels for a in ("--label", label)),
                       *_text_args(text)], out, capsys)
    _assert_like_the_hand_schema(inferred, Schema.from_yaml(REPO / config["data"]["schema"]))
    _assert_tables_cover(inferred, _read(SHARED / val, text))
    _assert_fits(["--config", f"conf/data/{name}.yaml", "--data.train", str(SHARED / train), "--data.val",
                  str(SHARED / val)], out, tmp_path / "run")


def test_synthetic_impressions_schema_trains_mmoe_and_esmm_unedited(tmp_path, capsys):
    """One inferred schema (cvr with the default weight 1) serves the default MMoE and ESMM."""
    data = tmp_path / "data"
    assert main(["synth", "impressions", "--out", str(data), "--train-rows", "4000", "--val-rows", "2000",
                 "--test-rows", "100"]) == 0
    out = tmp_path / "schema.yaml"
    inferred = _infer(["--data", str(data / "train.parquet"), "--label", "click", "--label", "conversion",
                       "--ignore", "gt_*"], out, capsys)
    hand = Schema.from_yaml(REPO / "conf" / "schemas" / "synthetic_impressions.yaml")
    _assert_like_the_hand_schema(inferred, hand)
    assert "daction" not in _kinds(inferred)  # 1 only on clicks: a funnel step, never an input
    assert "# not used:\n#   daction: 0/1 and 1 only where click is 1" in out.read_text()
    assert [t.weight for t in inferred.tasks] == [1, 1, 1]
    direct = _assert_tables_cover(inferred, pq.read_table(data / "val.parquet"))
    assert {"C1", "C2", "C3", "position"} <= set(direct)  # the small vocabularies, all seen in 4,000 rows
    files = ["--data.synthetic", "null", "--data.train", str(data / "train.parquet"), "--data.val",
             str(data / "val.parquet"), "--data.batch_size", "256"]
    _assert_fits(["--config", "conf/debug.yaml", *files], out, tmp_path / "mmoe")
    esmm = _assert_fits(["--config", "conf/models/esmm.yaml", *files], out, tmp_path / "esmm")
    assert esmm.model.schema.task_weights == {"ctr": 1, "cvr": 0, "ctcvr": 1}


def test_mmoe_synthetic_labels_are_regression_tasks(tmp_path, capsys):
    path = tmp_path / "mmoe.parquet"
    assert main(["synth", "mmoe", "--out", str(path), "--rows", "300", "--correlation", "0.5"]) == 0
    inferred = _infer(["--data", str(path), "--label", "y1", "--label", "y2"], tmp_path / "schema.yaml", capsys)
    _assert_like_the_hand_schema(inferred, Schema.from_yaml(REPO / "conf" / "schemas" / "mmoe_synthetic.yaml"))
    assert [(t.name, t.kind) for t in inferred.tasks] == [("y1", "regression"), ("y2", "regression")]


def _write_csv(path: Path, columns: dict[str, list]) -> Path:
    pa_csv.write_csv(pa.table(columns), path)
    return path


def test_sketch_is_exact_below_its_size_and_close_above(tmp_path):
    small = _write_csv(tmp_path / "small.csv", {"id": list(range(5000)) * 2, "y": [0, 1] * 5000})
    assert profile_files([str(small)], ["y"]).columns["id"].distinct == 5000
    ids = np.random.default_rng(0).integers(0, 2**40, 200_000)
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ids, "y": np.zeros(len(ids), np.int64)}), big, row_group_size=30_000)
    column = profile_files([str(big)], ["y"]).columns["id"]
    assert len(column.hashes) == SKETCH_SIZE  # bounded: the sketch, not the ids
    true = len(np.unique(ids))
    assert abs(column.distinct - true) < 4 / math.sqrt(SKETCH_SIZE) * true  # KMV's std error is 1/sqrt(k)


def test_table_sizes_and_dense_transforms_follow_the_values(tmp_path, monkeypatch):
    """12,403 open-ended ids -> 16,384 rows (12,403 * 1.3 = 16,124 rounded up to a power of two);
    ids 0..99 -> 256 rows (100 * 1.3 = 130 -> 256); text ids hashed with 4 rows per id (50 -> 256)."""
    rng = np.random.default_rng(1)
    wide = rng.permutation(np.unique(rng.integers(0, 10**12, 20_000)))[:12_403]
    rows = 12_403 * 2
    table = pa.table({
        "user": np.tile(wide, 2), "small": np.arange(rows) % 100, "city": [f"c{i % 50}" for i in range(rows)],
        "fraction": rng.random(rows), "counts": rng.pareto(1.5, rows).round() * 10,
        "temperature": rng.normal(-5, 3, rows), "same": np.full(rows, 2.5),
        "tags": [[f"t{i % 7}", f"t{i % 11}"][: i % 3] for i in range(rows)],
        "click": (np.arange(rows) % 3 == 0).astype(np.int64), "buy": (np.arange(rows) % 6 == 0).astype(np.int64)})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    features, tasks = infer(profile_files([str(path)], ["click", "buy"]))
    entries = {c.entry["name"]: (c.section, c.entry) for c in features}
    assert entries["user"] == ("sparse", {"name": "user", "num_embeddings": 16384, "embedding_dim": 64,
                                          "managed_collisions": {}})
    assert entries["small"][1]["num_embeddings"] == 256 and entries["small"][1]["out_of_range"] == "modulo"
    assert entries["city"][1]["num_embeddings"] == 256 and entries["city"][1]["hashed"] is True
    assert entries["tags"] == ("sparse", {"name": "tags", "num_embeddings": 64, "embedding_dim": 16, "hashed": True,
                                          "multi_valued": True})  # 11 tags * 4 = 44 -> 64 rows
    why = {c.entry["name"]: c.why for c in features}
    assert "hashed (text ids;" in why["tags"] and "hashed (text ids;" in why["city"]  # lists said "ids from inf"
    transforms = {name: entry.get("transform") for name, (section, entry) in entries.items() if section == "dense"}
    assert transforms == {"fraction": "none", "counts": "log1p_standardize", "temperature": "standardize",
                          "same": "none"}
    assert [t.entry for t in tasks] == [{"name": "ctr", "label": "click"},
                                        {"name": "cvr", "label": "buy", "sample_space": "click == 1"},
                                        {"name": "ctcvr", "label": "click * buy"}]
    assert "12,403 distinct in 24,806 rows -> 16,384 rows x1.3 headroom" in render(
        profile_files([str(path)], ["click", "buy"]), features, tasks)


def test_labels_that_are_not_a_chain_and_numeric_names_that_stay_text(tmp_path, capsys):
    """``buy`` is 1 on 5 unclicked rows of 20 buys (25% > 1%): no chain. Names YAML would read as numbers
    stay text: 109_14 (10914 in YAML 1.1), 0123 (octal 83), 1e5."""
    n = 400
    path = _write_csv(tmp_path / "log.csv", {
        "109_14": [i % 7 for i in range(n)], "0123": [i % 5 for i in range(n)], "1e5": [i * 0.5 for i in range(n)],
        "click": [int(i % 4 == 0) for i in range(n)],
        "buy": [int(i % 20 == 0) if i < 300 else int(i % 20 == 1) for i in range(n)],
        "watch_time": [float(i % 13) for i in range(n)]})
    out = tmp_path / "schema.yaml"
    schema = _infer(["--data", str(path), "--label", "click", "--label", "buy", "--label", "watch_time"], out, capsys)
    assert [(t.name, t.label, t.sample_space, t.kind) for t in schema.tasks] == [
        ("click", "click", None, "binary"), ("buy", "buy", None, "binary"),
        ("watch_time", "watch_time", None, "regression")]
    assert [f.name for f in schema.sparse] == ["109_14", "0123"] and [f.name for f in schema.dense] == ["1e5"]


def test_a_column_numeric_at_first_and_text_later_is_read_again(tmp_path, monkeypatch):
    """Arrow guesses CSV types from the first block; later 1.5s and words must not end the pass."""
    monkeypatch.setattr(TextFormat, "open", lambda self, path, convert=None: pa_csv.open_csv(
        path, read_options=pa_csv.ReadOptions(block_size=64), convert_options=convert))
    n = 300
    path = _write_csv(tmp_path / "log.csv", {
        "price": [str(i) for i in range(n - 1)] + ["1.5"], "shop": [str(i % 9) for i in range(n - 1)] + ["s-x"],
        "y": [i % 2 for i in range(n)]})
    columns = profile_files([str(path)], ["y"]).columns
    assert (columns["price"].kind, columns["price"].integral) == ("float", False)
    assert (columns["shop"].kind, columns["shop"].distinct) == ("string", 10)
    assert columns["y"].rows == n  # counted once, not once per attempt


@pytest.mark.parametrize("args, message", [
    (["--label", "click"], "no data files given: pass --data"),
    (["--data", "{csv}"], "name the label columns: --label click"),
    (["--data", "{csv}", "--label", "clicks"], "{csv}: no label column 'clicks'; its columns are ['id', 'click']"),
    (["--data", "{bad}", "--label", "click"], "{bad}: unreadable file"),
    (["--data", "{csv}", "--label", "id"], "{csv}: label column 'id' has type string; labels must be numbers"),
    (["--data", "{missing}", "--label", "click"], "{missing}: no such file or directory"),
    (["--data", "{csv}", "--label", "click", "--delimiter", "';'"],
     "the delimiter of text files is one character, got \"';'\"; a tab is written '\\t'"),
])
def test_errors_are_one_line_with_status_2(tmp_path, capsys, args, message):
    paths = {"csv": str(_write_csv(tmp_path / "log.csv", {"id": ["a", "b"], "click": [0, 1]})),
             "bad": str(tmp_path / "bad.parquet"), "missing": str(tmp_path / "nothing.csv")}
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert main(["schema", "infer", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-mtr schema: error: " + message.format(**paths)) and err.count("\n") == 1


def test_a_chain_tolerates_a_few_later_steps_without_the_earlier(tmp_path):
    """Ali-CCP has purchases without a click: 1 of 200 (0.5%, under 1%) keeps the chain, and is named."""
    click = np.arange(1000) % 2
    buy = np.zeros(1000, np.int64)
    buy[np.flatnonzero(click)[:199]] = 1
    buy[0] = 1  # row 0 is not clicked
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"click": click, "buy": buy}), path)
    _, tasks = infer(profile_files([str(path)], ["click", "buy"]))
    assert [t.entry["name"] for t in tasks] == ["ctr", "cvr", "ctcvr"]
    assert "1 rows have buy without click: ctcvr negatives, outside cvr's space" in tasks[1].why


def test_a_tab_written_as_backslash_t_separates_tsv_fields(tmp_path, capsys):
    """A shell passes --delimiter '\\t' (and YAML a plain \\t) as backslash and t, which pyarrow
    refused in a traceback: it is the tab, for infer and for fit's data.text_format alike."""
    path = tmp_path / "log.tsv"
    path.write_text("id\tclick\na\t0\nb\t1\n")
    schema = _infer(["--data", str(path), "--label", "click", "--delimiter", "\\t"], tmp_path / "s.yaml", capsys)
    assert [f.name for f in schema.sparse] == ["id"] and schema.tasks[0].label == "click"
    assert TextFormat("\\t").delimiter == TextFormat("tab").delimiter == "\t"


def test_a_float_column_of_whole_numbers_is_dense_even_among_text_siblings(tmp_path):
    """The encoder reads ids as integers or text, so a float column is never proposed as ids: c4
    (2.0, 5.0, ...) beside the text c1..c3 was a hashed sparse feature that fit then refused."""
    n = 60
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({**{f"c{i}": [f"v{j % 9}" for j in range(n)] for i in (1, 2, 3)},
                             "c4": np.arange(n, dtype=np.float64) % 7, "click": np.arange(n) % 2}), path)
    features, _ = infer(profile_files([str(path)], ["click"]))
    assert {c.entry["name"]: c.section for c in features} == {"c1": "sparse", "c2": "sparse", "c3": "sparse",
                                                             "c4": "dense"}


def test_nan_values_are_missing_values(tmp_path):
    """A float column with NaN (pandas' missing value) gets fill_missing, so fit takes the file as it is."""
    price = np.linspace(1.0, 50.0, 40)
    price[::8] = np.nan
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"price": price, "click": np.arange(40) % 2}), path)
    [choice], _ = infer(profile_files([str(path)], ["click"]))
    assert choice.entry == {"name": "price", "transform": "standardize", "fill_missing": 0.0}
    assert choice.why.endswith("; 5 missing (null or NaN) -> 0")
