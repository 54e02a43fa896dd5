"""Ids derived from raw values (lightning_mtr/derived.py): RawFeature ``boundaries`` and
``quantiles``, IdFeature ``vocab_list`` / ``vocab_file``, ComboFeature ``combo``. Every expected id
below is worked out by hand from the rules docs/schema-and-data.md states; the CLI run trains
conf/data/synthetic_features.yaml on a tiny log and checks that export and score give the model's
scores on the same rows."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_mtr.cli import main
from lightning_mtr.data.encode import BatchEncoder, DenseStats
from lightning_mtr.data.reader import list_files, plan_units
from lightning_mtr.data.stats import blend_stats, compute_dense_stats
from lightning_mtr.schema import Schema
from lightning_mtr.serving.checkpoint import load_run
from lightning_mtr.tasks.scores import probabilities
from test_data_pipeline import read_batches, stable_hash, write_parquet

REPO = Path(__file__).resolve().parents[1]
TASKS = [{"name": "ctr", "label": "click"}]


def _encode(sparse: list[dict], columns: dict, stats: DenseStats | None = None) -> dict[str, tuple[list, list]]:
    """``{feature: (ids, per-row counts)}`` of one batch of ``columns``."""
    schema = Schema.from_dict({"sparse": sparse, "tasks": TASKS})
    rows = len(next(iter(columns.values())))
    table = pa.table({**columns, "click": pa.array([0] * rows, pa.int64())})
    kjt = BatchEncoder(schema, stats).encode(table, ["<test>"]).sparse.to_dict()
    return {name: (jt.values().tolist(), jt.lengths().tolist()) for name, jt in kjt.items()}


def test_boundaries_bucket_a_value_equal_to_a_boundary_upwards_and_nulls_into_the_last_row():
    # boundaries [1, 10, 100]: buckets (-inf, 1) [1, 10) [10, 100) [100, inf), then the null row: 5 rows
    values = pa.array([0.5, 1.0, 5.0, 10.0, 99.9, 100.0, 1e9, None, float("nan"), -float("inf")])
    ids = _encode([{"name": "price", "boundaries": [1, 10, 100], "embedding_dim": 4}], {"price": values})
    assert ids["price"] == ([0, 1, 1, 2, 2, 3, 3, 4, 4, 0], [1] * 10)
    schema = Schema.from_dict({"sparse": [{"name": "price", "boundaries": [1, 10, 100]}], "tasks": TASKS})
    assert schema.sparse[0].num_embeddings == 5
    # an integer column buckets the same way
    assert _encode([{"name": "n", "boundaries": [1, 10]}], {"n": pa.array([0, 1, 10, None])})["n"][0] == [0, 1, 2, 3]


def test_quantile_boundaries_come_from_the_training_rows_and_travel_in_the_stats(tmp_path):
    """Training values 1..10 (and a null, left out), 4 buckets: numpy's linear quantiles at 1/4, 2/4,
    3/4 sit at positions 2.25, 4.5, 6.75 of the sorted values, i.e. 3.25, 5.5 and 7.75."""
    schema = Schema.from_dict({"sparse": [{"name": "q", "quantiles": 4}], "tasks": TASKS})
    assert schema.sparse[0].num_embeddings == 5 and schema.needs_dense_stats
    write_parquet(tmp_path / "a.parquet", {"q": pa.array([7.0, 1.0, 10.0, None, 3.0]), "click": [0] * 5})
    write_parquet(tmp_path / "b.parquet", {"q": pa.array([2.0, 9.0, 4.0, 8.0, 6.0, 5.0]), "click": [0] * 6})
    stats = compute_dense_stats(schema, plan_units(list_files(tmp_path), BatchEncoder(schema)))
    assert stats.boundaries == ((3.25, 5.5, 7.75),)
    reloaded = DenseStats(**json.loads(json.dumps({"mean": [], "std": [], "boundaries": [[3.25, 5.5, 7.75]]})))
    assert reloaded == stats  # as a checkpoint's state dict brings them back
    ids = _encode([{"name": "q", "quantiles": 4}], {"q": pa.array([3.0, 3.25, 5.5, 8.0, None])}, stats)
    assert ids["q"] == ([0, 1, 2, 3, 4], [1] * 5)
    with pytest.raises(ValueError, match="'q' is bucketed by quantiles, so the encoder needs the training"):
        _encode([{"name": "q", "quantiles": 4}], {"q": pa.array([1.0])})


def test_tied_quantiles_merge_and_a_warm_start_blend_mixes_each_quantile():
    # half the rows 0: the 1/4 and 2/4 quantiles are both 0, merged into one boundary
    stats = DenseStats((), (), boundaries=((0.0, 0.0, 2.5),))
    assert _encode([{"name": "q", "quantiles": 4}], {"q": pa.array([0.0, 1.0, 3.0])}, stats)["q"][0] == [1, 1, 2]
    blended = blend_stats(DenseStats((), (), ((1.0, 2.0, 3.0),)), DenseStats((), (), ((3.0, 4.0, 5.0),)), 0.25)
    assert blended.boundaries == ((1.5, 2.5, 3.5),)  # 0.75 * old + 0.25 * new


def test_vocab_list_maps_text_ids_to_their_place_and_unknowns_to_the_default_row():
    vocab = [{"name": "cat", "vocab_list": ["shoes", "hats"], "embedding_dim": 4}]
    ids = _encode(vocab, {"cat": pa.array(["hats", "shoes", "caps", None])})
    assert ids["cat"] == ([1, 0, 2], [1, 1, 1, 0])  # caps: not listed -> row 2; null: a missing id
    # YAML reads [1, 2] as integers; integer and text ids both compare as text
    ints = [{"name": "n", "vocab_list": [1, 2]}]
    assert _encode(ints, {"n": pa.array([2, 7, 1], pa.int64())})["n"][0] == [1, 2, 0]
    assert _encode(ints, {"n": pa.array(["2", "7"])})["n"][0] == [1, 2]
    tags = [{"name": "tags", "vocab_list": ["a", "b", "c"], "multi_valued": True}]
    lists = pa.array([["c", "a", "zz"], [], None, ["b"]], pa.list_(pa.string()))
    assert _encode(tags, {"tags": lists})["tags"] == ([2, 0, 3, 1], [3, 0, 0, 1])
    assert Schema.from_dict({"sparse": vocab, "tasks": TASKS}).sparse[0].num_embeddings == 3


def test_csv_vocabulary_and_combo_columns_are_read_as_text_and_bucketed_columns_as_numbers(tmp_path):
    """``0042`` is an id in the vocabulary only as text: read as an integer it would be 42."""
    (tmp_path / "log.csv").write_text("code,shop,price,click\n0042,7,5,0\n42,7,,1\n")
    schema = Schema.from_dict({"sparse": [{"name": "code", "vocab_list": ["0042"]},
                                          {"name": "c_x_s", "combo": ["code", "shop"], "num_embeddings": 97},
                                          {"name": "price", "boundaries": [1, 10]}], "tasks": TASKS})
    [batch] = read_batches(schema, tmp_path / "log.csv")
    ids = {name: jt.values().tolist() for name, jt in batch.sparse.to_dict().items()}
    assert ids == {"code": [0, 1], "c_x_s": [stable_hash("0042\x1f7", 97), stable_hash("42\x1f7", 97)],
                   "price": [1, 3]}


def test_a_csv_column_that_a_plain_id_feature_also_reads_keeps_its_integer_ids(tmp_path):
    """conf/schemas/synthetic_features.yaml reads C3 as a plain id (row = id) and in the combo C3 x C6:
    read as text for the combo, a CSV's C3 was hashed for the plain feature too (5 -> row 24 of 25),
    unlike the same rows in Parquet. The combo and the vocabulary write the integers as decimals."""
    (tmp_path / "log.csv").write_text("C3,C6,click\n5,1,0\n7,2,1\n")
    schema = Schema.from_dict({"sparse": [{"name": "C3", "num_embeddings": 25},
                                          {"name": "C3_x_C6", "combo": ["C3", "C6"], "num_embeddings": 97},
                                          {"name": "C3_vocab", "column": "C3", "vocab_list": [7]}], "tasks": TASKS})
    [batch] = read_batches(schema, tmp_path / "log.csv")
    ids = {name: jt.values().tolist() for name, jt in batch.sparse.to_dict().items()}
    assert ids == {"C3": [5, 7], "C3_x_C6": [stable_hash("5\x1f1", 97), stable_hash("7\x1f2", 97)], "C3_vocab": [1, 0]}


def test_vocab_file_is_read_relative_to_the_schema_file(tmp_path):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "brands.txt").write_text("acme\nglobex\r\n\ninitech\n")  # a blank line is no entry
    (tmp_path / "schema.yaml").write_text("sparse:\n  - {name: brand, vocab_file: vocab/brands.txt}\n"
                                          "tasks:\n  - {name: ctr, label: click}\n")
    feature = Schema.from_yaml(tmp_path / "schema.yaml").sparse[0]
    assert feature.vocab_list == ("acme", "globex", "initech") and feature.num_embeddings == 4


def test_combo_hashes_the_values_joined_by_unit_separator_and_nulls_make_no_id():
    combo = [{"name": "u_x_c", "combo": ["user", "cat"], "num_embeddings": 1000, "embedding_dim": 4}]
    columns = {"user": pa.array([42, None, 7, 42], pa.int64()), "cat": pa.array(["a", "b", None, "b"])}
    expected = [stable_hash("42\x1fa", 1000), stable_hash("42\x1fb", 1000)]
    assert _encode(combo, columns)["u_x_c"] == (expected, [1, 0, 0, 1])
    as_text = {"user": pa.array(["42", None, "7", "42"]), "cat": columns["cat"]}  # the same ids as text
    assert _encode(combo, as_text)["u_x_c"][0] == expected
    categorical = {"user": columns["user"], "cat": columns["cat"].dictionary_encode()}  # pandas categoricals
    assert _encode(combo, categorical)["u_x_c"][0] == expected


@pytest.mark.parametrize("feature, words", [
    ({"name": "p", "boundaries": [1, 5, 5]}, "boundaries must be a non-empty list of finite numbers, each greater"),
    ({"name": "p", "boundaries": [10, 1]}, "each greater than the one before (e.g. [1, 10, 100]), got [10, 1]"),
    ({"name": "p", "boundaries": []}, "boundaries must be a non-empty list"),
    ({"name": "p", "boundaries": [1, 2], "num_embeddings": 3}, "num_embeddings 3 disagrees with the 4 rows"),
    ({"name": "p", "quantiles": 1}, "quantiles is the number of buckets (an integer >= 2)"),
    ({"name": "p", "boundaries": [1], "multi_valued": True}, "multi_valued does not apply"),
    ({"name": "v", "vocab_list": []}, "vocab_list must be a list of ids"),
    ({"name": "v", "vocab_list": ["a", "b", "a"]}, "vocab_list repeats ['a']"),
    ({"name": "v", "vocab_list": ["a"], "hashed": True}, "hashed does not apply"),
    ({"name": "v", "vocab_list": ["a"], "boundaries": [1]}, "boundaries/quantiles and vocab_list/vocab_file"),
    ({"name": "c", "combo": ["user"], "num_embeddings": 10}, "combo combines two or more different columns"),
    ({"name": "c", "combo": ["user", "cat"]}, "num_embeddings and embedding_dim must be >= 1"),
])
def test_bad_declarations_name_the_feature_and_the_fix(feature, words):
    with pytest.raises(ValueError, match=f"sparse feature '{feature['name']}'") as error:
        Schema.from_dict({"sparse": [feature], "tasks": TASKS})
    assert words in str(error.value)


def test_a_missing_vocab_file_names_the_path_it_looked_for(tmp_path):
    (tmp_path / "schema.yaml").write_text("sparse:\n  - {name: brand, vocab_file: brands.txt}\n"
                                          "tasks:\n  - {name: ctr, label: click}\n")
    with pytest.raises(ValueError, match=f"sparse feature 'brand': vocab_file 'brands.txt' not found \\(looked for "
                                         f"{tmp_path / 'brands.txt'}"):
        Schema.from_yaml(tmp_path / "schema.yaml")


def test_an_empty_vocab_file_is_named_as_the_file_not_as_a_vocab_list(tmp_path):
    """The schema says vocab_file: the error said 'vocab_list must be a list of ids ..., got ()'."""
    (tmp_path / "brands.txt").write_text("\n\n")
    (tmp_path / "schema.yaml").write_text("sparse:\n  - {name: brand, vocab_file: brands.txt}\n"
                                          "tasks:\n  - {name: ctr, label: click}\n")
    words = f"sparse feature 'brand': vocab_file 'brands.txt' ({tmp_path / 'brands.txt'}) has no values: write one"
    with pytest.raises(ValueError, match=re.escape(words)):
        Schema.from_yaml(tmp_path / "schema.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """conf/data/synthetic_features.yaml, one tiny epoch through the CLI, exported and scored."""
    root = tmp_path_factory.mktemp("derived")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(sys, "argv", ["lightning-mtr"])
        assert main(["fit", "--config", "conf/data/synthetic_features.yaml", "--data.synthetic.train_rows", "2000",
                     "--data.synthetic.val_rows", "300", "--data.synthetic.test_rows", "600",
                     "--data.synthetic.cache_dir", str(root / "cache"), "--data.batch_size", "256",
                     "--model.model.init_args.num_experts", "2", "--model.model.init_args.expert", "[16]",
                     "--model.model.init_args.tower", "[8]", "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "run")]) == 0
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(root / "artifact")]) == 0
    [test] = (root / "cache").glob("impressions-*/test.parquet")
    scores = ["score", "--artifact", str(root / "artifact"), "--data", str(test), "--out", str(root / "scores")]
    assert main(scores) == 0
    return {"checkpoint": checkpoint, "test": test, "scores": root / "scores", "train": test.with_name("train.parquet"),
            "manifest": json.loads((root / "artifact" / "manifest.json").read_text())}


def test_the_cli_trains_every_derived_feature_and_keeps_the_quantiles(trained):
    run = load_run(trained["checkpoint"])
    kinds = {f.name: f for f in run.schema.sparse}
    assert kinds["C1"].vocab_list and kinds["C2"].num_embeddings == 13 and kinds["I1_bucket"].num_embeddings == 6
    assert kinds["C3_x_C6"].combo == ("C3", "C6") and kinds["I3_quantile"].num_embeddings == 17
    train = pq.read_table(trained["train"], columns=["I3"]).column("I3").to_numpy()
    (boundaries,) = run.dense_stats.boundaries  # fewer rows than the sample: exact quantiles
    np.testing.assert_allclose(boundaries, np.quantile(train, np.arange(1, 16) / 16), rtol=1e-12)
    # score reads no checkpoint: the manifest's schema carries them (continuous values: no ties to merge)
    [written] = [f for f in trained["manifest"]["schema"]["sparse"] if f["name"] == "I3_quantile"]
    assert written["quantiles"] == 16 and written["boundaries"] == list(boundaries)


def test_export_and_score_give_the_models_scores_on_the_same_rows(trained):
    run = load_run(trained["checkpoint"])
    encoder = BatchEncoder(run.schema, run.dense_stats)
    batch = encoder.encode(pq.read_table(trained["test"]), [str(trained["test"])])
    lengths = batch.sparse.lengths().view(len(run.schema.sparse), -1)
    assert (lengths[[f.name for f in run.schema.sparse].index("C3_x_C6")] == 1).all()
    with torch.no_grad():
        expected = probabilities(run.schema, run.model(batch.dense, batch.sparse))
    scored = pq.read_table(trained["scores"])
    assert scored.num_rows == batch.batch_size == 600
    for name, value in expected.items():
        np.testing.assert_allclose(scored.column(f"score_{name}").to_numpy(), value.numpy(), rtol=0, atol=1e-5)
