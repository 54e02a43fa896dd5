"""Weighted multi-valued ids (TorchEasyRec's weighted IdFeature, TorchRec's weighted KJT): a bag
pools to ``sum_i w_i e_i`` (``pooling: mean``: ``/ n``, TorchRec's definition), computed here by
hand from the table rows, on the plain, fused and exported lookups; the rows' updates scale with
the weights; and a run on a Parquet log goes through ``fit``, ``export`` and ``score``.
(2 processes against one, and checkpoints between them: tests/test_sharded_training.py, the
``weighted`` cases; bad weight columns through the CLI: tests/test_fault_corpus.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from test_data_pipeline import read_batches
from lightning_mtr.cli import main
from lightning_mtr.data.encode import BatchEncoder
from lightning_mtr.embeddings import FeatureInput, SparseOptimizer
from lightning_mtr.embeddings.fusing import fuse_sparse_optimizer
from lightning_mtr.embeddings.init import init_tables
from lightning_mtr.schema import Schema
from lightning_mtr.serving.checkpoint import load_run
from lightning_mtr.serving.features import ServingFeatureInput
from lightning_mtr.serving.program import table_weights
from lightning_mtr.tasks.scores import probabilities

REPO = Path(__file__).resolve().parents[1]
LIST = pa.list_(pa.int64())
SCHEMA = {
    "sparse": [{"name": "user", "num_embeddings": 10, "embedding_dim": 4, "pooling": "mean"},  # unweighted
               {"name": "tags", "num_embeddings": 20, "embedding_dim": 4, "multi_valued": True,
                "weight_column": "tag_weights"},
               {"name": "cats", "num_embeddings": 20, "embedding_dim": 4, "multi_valued": True, "pooling": "mean",
                "max_length": 2, "weight_column": "cat_weights"}],
    "tasks": [{"name": "ctr", "label": "click"}],
}
ROWS = {  # row 0: two tags, three cats of which max_length keeps two; row 1: empty tags; row 2: null cats
    "user": pa.array([1, 2, 3], pa.int64()),
    "tags": pa.array([[1, 2], [], [3]], LIST),
    "tag_weights": pa.array([[0.5, 2.0], [], [3.0]], pa.list_(pa.float32())),
    "cats": pa.array([[4, 5, 6], [7], None], LIST),
    "cat_weights": pa.array([[1.0, -2.0, 9.0], [0.25], None], pa.list_(pa.float64())),
    "click": pa.array([0, 1, 0], pa.int64()),
}


def _by_hand(table: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[3, 12]``: user's row; sum_i w_i e_i of tags; sum_i w_i e_i / n of the kept cats (0 for an empty bag)."""
    user, tags, cats, zero = table["user"], table["tags"], table["cats"], torch.zeros(4)
    return torch.stack([torch.cat([user[1], 0.5 * tags[1] + 2.0 * tags[2], (1.0 * cats[4] - 2.0 * cats[5]) / 2]),
                        torch.cat([user[2], zero, 0.25 * cats[7] / 1]),
                        torch.cat([user[3], 3.0 * tags[3], zero])])


def _batch(tmp_path: Path):
    pq.write_table(pa.table(ROWS), tmp_path / "w.parquet")
    [batch] = read_batches(Schema.from_dict(SCHEMA), tmp_path / "w.parquet")
    return batch


def _features(fused: bool, schema: dict = SCHEMA) -> FeatureInput:
    torch.manual_seed(0)
    features = FeatureInput(Schema.from_dict(schema), device="cpu")
    init_tables(features, "cpu")
    if fused:
        fuse_sparse_optimizer(features, SparseOptimizer("sgd", lr=1.0), torch.device("cpu"))
    return features


@pytest.mark.parametrize("lookup", ["plain", "fused", "exported"])
def test_a_bag_pools_to_the_weighted_sum_of_its_rows(lookup, tmp_path):
    """The encoder's weighted KJT through TorchRec's plain collection, fbgemm's fused one (the
    one-process path) and the exported program's own ATen lookup, against the rows by hand."""
    batch = _batch(tmp_path)
    assert batch.sparse["cats"].weights().tolist() == [1.0, -2.0, 0.25]  # max_length cut the weights too
    assert batch.sparse["user"].weights().tolist() == [1.0, 1.0, 1.0]
    features = _features(lookup == "fused")
    expected = _by_hand(table_weights(features))
    if lookup == "exported":
        serving = ServingFeatureInput(Schema.from_dict(SCHEMA), table_weights(features))
        sparse = batch.sparse
        got = serving(batch.dense, (sparse.values(), sparse.lengths().view(3, -1).long(), sparse.weights()))
    else:
        got = features(batch.dense, batch.sparse)
    torch.testing.assert_close(got, expected)
    if lookup != "exported":  # the weighted tables are a collection of their own: the others keep unweighted kernels
        assert [c.name for c in features.weighted_embeddings.embedding_bag_configs()] == ["tags", "cats"]
        assert features.weighted_embeddings.is_weighted() and not features.embeddings.is_weighted()


def test_a_schema_whose_pooled_tables_are_all_weighted_has_one_collection(tmp_path):
    only = {**SCHEMA, "sparse": SCHEMA["sparse"][1:]}
    features = _features(fused=True, schema=only)
    assert features.embeddings is None
    batch = _batch(tmp_path)
    torch.testing.assert_close(features(batch.dense, batch.sparse),
                               _by_hand({"user": torch.zeros(10, 4), **table_weights(features)})[:, 4:])


def test_a_file_whose_ids_and_weights_are_all_null_has_empty_bags(tmp_path):
    """Parquet types a column of nulls only as ``null``, not as a list: its rows are empty bags."""
    pq.write_table(pa.table({**ROWS, "tags": pa.nulls(3), "tag_weights": pa.nulls(3)}), tmp_path / "n.parquet")
    [batch] = read_batches(Schema.from_dict(SCHEMA), tmp_path / "n.parquet")
    assert batch.sparse["tags"].lengths().tolist() == [0, 0, 0] and batch.sparse["tags"].weights().numel() == 0
    assert batch.sparse["cats"].weights().tolist() == [1.0, -2.0, 0.25]


def test_the_rows_updates_scale_with_their_weights(tmp_path):
    """Fused SGD (lr 1) on ``loss = sum(pooled * c)``: the gradient of a bag is ``c``, so each row
    of it moves by ``-w_i c`` (``-w_i c / n`` in a mean bag), within the same backward."""
    batch = _batch(tmp_path)
    features = _features(fused=True)
    before = {k: v.clone() for k, v in table_weights(features).items()}
    c = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    (features(batch.dense, batch.sparse) * c).sum().backward()
    after = table_weights(features)
    tags, cats = c[:, 4:8], c[:, 8:12]
    moved = {("tags", 1): -0.5 * tags[0], ("tags", 2): -2.0 * tags[0], ("tags", 3): -3.0 * tags[2],
             ("cats", 4): -1.0 * cats[0] / 2, ("cats", 5): 2.0 * cats[0] / 2, ("cats", 7): -0.25 * cats[1]}
    for (table, row), delta in moved.items():
        torch.testing.assert_close(after[table][row] - before[table][row], delta, msg=f"{table} row {row}")
    untouched = [r for r in range(20) if ("cats", r) not in moved]  # row 6: cut by max_length
    torch.testing.assert_close(after["cats"][untouched], before["cats"][untouched])


@pytest.mark.parametrize(("change", "words"), [
    ({"sequence": True, "max_length": 3}, "a sequence is read unpooled"),
    ({"multi_valued": False}, "set multi_valued: true"),
    ({"weight_column": "tags"}, "is the id column itself"),
    ({"table": "user_table"}, "only some have a weight_column"),
    ({"managed_collisions": {}}, "weight_column and managed_collisions together are not supported"),
])
def test_a_weight_column_that_cannot_weigh_a_bag_is_refused(change, words):
    sparse = [{"name": "user", "num_embeddings": 10, "embedding_dim": 4, "table": "user_table", "multi_valued": True},
              {**SCHEMA["sparse"][1], "num_embeddings": 10, **change}]
    with pytest.raises(ValueError, match=words):
        Schema.from_dict({**SCHEMA, "sparse": sparse})


def test_the_weight_column_is_an_input_and_cannot_be_a_label():
    schema = Schema.from_dict(SCHEMA)
    assert {"tag_weights", "cat_weights"} <= set(BatchEncoder(schema).columns)
    with pytest.raises(ValueError, match="label leakage: column 'tag_weights'"):
        Schema.from_dict({**SCHEMA, "tasks": [{"name": "ctr", "label": "click"},
                                              {"name": "w", "label": "tag_weights"}]})


def _log(path: Path, rows: int, seed: int) -> str:
    """Clicks driven by the weighted tags: ``logit = 2 * sum_i w_i effect[tag_i] - 1``."""
    rng = np.random.default_rng(seed)
    effect = np.random.default_rng(0).normal(size=20)
    counts = rng.integers(0, 4, rows)
    tags = [rng.integers(0, 20, n) for n in counts]
    weights = [rng.uniform(0, 2, n).astype(np.float32) for n in counts]
    logit = np.array([2 * float((w * effect[t]).sum()) - 1 for t, w in zip(tags, weights)])
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    pq.write_table(pa.table({"user": rng.integers(0, 10, rows), "tags": pa.array([t.tolist() for t in tags], LIST),
                             "tag_weights": pa.array([w.tolist() for w in weights], pa.list_(pa.float32())),
                             "cats": pa.array([t[:1].tolist() for t in tags], LIST),
                             "cat_weights": pa.array([w[:1].tolist() for w in weights], pa.list_(pa.float32())),
                             "click": click}), path)
    return str(path)


def test_fit_export_and_score_a_weighted_log_through_the_cli(tmp_path, monkeypatch):
    """conf/debug.yaml's MMoE on a Parquet log with weighted tags; the artifact's scores of the test
    file equal the trained model's probabilities on the same rows (weights included)."""
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(SCHEMA))
    train, test = _log(tmp_path / "train.parquet", 2048, 1), _log(tmp_path / "test.parquet", 512, 2)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    assert main(["fit", "--config", "conf/debug.yaml", "--data.synthetic", "null", "--data.schema", str(schema),
                 "--data.train", train, "--data.val", test, "--data.test", test, "--data.batch_size", "256",
                 "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks", "[]",
                 "--model.model.init_args.num_experts", "2", "--model.model.init_args.expert", "[16]",
                 "--model.model.init_args.tower", "[8]"]) == 0
    [checkpoint] = (tmp_path / "run").rglob("*.ckpt")
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "artifact")]) == 0
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["inputs"]["weights"]["shape"] == ["N"] and "weighted ids" in manifest["split"]["refused"]
    assert main(["score", "--artifact", str(tmp_path / "artifact"), "--data", test,
                 "--out", str(tmp_path / "scores")]) == 0
    scores = pq.read_table(tmp_path / "scores" / "part-00000.parquet")["score_ctr"].to_numpy()

    run = load_run(checkpoint)
    [batch] = read_batches(run.schema, test, batch_size=512)
    with torch.no_grad():
        expected = probabilities(run.schema, run.model(batch.dense, batch.sparse))["ctr"].numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    unweighted = {"values": batch.sparse.values(), "lengths": batch.sparse.lengths()}
    with torch.no_grad():  # the weights reach the scores: without them (all 1) the model scores otherwise
        ones = probabilities(run.schema, run.model(batch.dense, type(batch.sparse)(
            keys=batch.sparse.keys(), weights=torch.ones_like(batch.sparse.weights()), **unweighted)))["ctr"].numpy()
    assert np.abs(ones - expected).max() > 1e-3
