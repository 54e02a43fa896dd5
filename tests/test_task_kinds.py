"""Multi-class and ranking tasks and GAUC: losses and metrics against brute-force references,
the encoder's checks, the reader keeping requests together, and learning end to end."""

from __future__ import annotations

import math
from itertools import product

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.data.encode import MISSING_GROUP, SOURCE_COLUMN, BatchEncoder, DataError
from lightning_mtr.data.reader import BatchStream, plan_units
from lightning_mtr.metrics import MaskedTaskMetrics
from lightning_mtr.models import MMoE
from lightning_mtr.schema import Schema, Task
from lightning_mtr.tasks import masked_task_losses
from lightning_mtr.tasks.ranking import listwise_softmax_loss, pairwise_logistic_loss, pointwise_logistic_loss
from lightning_mtr.embeddings import SparseOptimizer
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy


def _grouped_rows(rows: int = 60, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 9, (rows,), generator=generator) * 7 + 100  # sparse, unordered ids
    labels = torch.randint(0, 3, (rows,), generator=generator).to(dtype)
    scores = torch.randn(rows, generator=generator, dtype=dtype)
    return scores, labels, groups


def _by_group(groups: torch.Tensor) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(groups.tolist()):
        rows.setdefault(group, []).append(row)
    return rows


def test_pairwise_loss_is_ranknet_over_pairs_of_one_request():
    scores, labels, groups = _grouped_rows()
    terms = [math.log1p(math.exp(-(scores[i] - scores[j]).item()))
             for members in _by_group(groups).values() for i, j in product(members, members)
             if labels[i] > labels[j]]
    assert pairwise_logistic_loss(scores, labels, groups).item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_listwise_loss_is_softmax_cross_entropy_per_request():
    scores, labels, groups = _grouped_rows()
    losses = []
    for members in _by_group(groups).values():
        y, s = labels[members], scores[members]
        if y.sum() > 0:
            losses.append(-(y * torch.log_softmax(s, 0)).sum().item() / y.sum().item())
    assert listwise_softmax_loss(scores, labels, groups).item() == pytest.approx(np.mean(losses), rel=1e-12)


@pytest.mark.parametrize("loss", [pairwise_logistic_loss, listwise_softmax_loss])
def test_ranking_losses_have_exact_gradients_and_ignore_request_order(loss):
    scores, labels, groups = _grouped_rows(rows=25)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss(s, labels, groups), (scores,))
    shuffled = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    assert loss(scores[shuffled], labels[shuffled], groups[shuffled]).item() == pytest.approx(
        loss(scores, labels, groups).item(), rel=1e-12)
    # a request of one row, or of equal labels, has nothing to compare: zero loss, zero gradient
    flat = loss(scores[:1], torch.ones(1, dtype=scores.dtype), groups[:1])
    flat.backward()
    assert flat.item() == 0.0 and torch.isfinite(scores.grad).all()
    empty = loss(scores[:0], labels[:0], groups[:0])
    assert empty.item() == 0.0


def test_pointwise_loss_is_dupns_weighted_logistic_loss_averaged_over_rows():
    """Ni et al. (KDD 2018), section 5.2: sum_i n_i log(1 + exp(-y_i s_i)), y = +1 for relevance > 0,
    else -1; divided by the row count (4 here), computed by hand."""
    scores = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    relevance = torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    weights = torch.tensor([5.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    # y = +1, -1, +1, -1: the terms are 5 log(1 + e^-2), log(1 + e^-1), log(1 + e^-0.5), 2 log 2
    expected = (5 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))
                + 2 * math.log(2)) / 4
    assert expected == pytest.approx(0.702068, abs=1e-6)
    assert pointwise_logistic_loss(scores, relevance, weights).item() == pytest.approx(expected, rel=1e-12)
    # with every n_i = 1 it is the mean binary cross-entropy of relevance > 0
    scores, labels, _ = _grouped_rows(rows=25)
    bce = F.binary_cross_entropy_with_logits(scores, (labels > 0).double())
    assert pointwise_logistic_loss(scores, labels, torch.ones(25)).item() == pytest.approx(bce.item(), rel=1e-12)
    scores.requires_grad_(True)
    row_weights = torch.rand(25, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 4
    assert torch.autograd.gradcheck(lambda s: pointwise_logistic_loss(s, labels, row_weights), (scores,))
    empty = pointwise_logistic_loss(scores[:0], labels[:0], row_weights[:0])
    empty.backward()
    assert empty.item() == 0.0 and scores.grad.eq(0).all()


def _pointwise_schema(**weighting) -> Schema:
    return Schema.from_dict({"tasks": [{"name": "rank", "label": "relevance", "kind": "ranking", "group": "request",
                                        "sample_space": "log == 0", "ranking_loss": "pointwise", **weighting}]})


def test_pointwise_weights_come_from_the_grade_table_or_a_column_through_the_encoder():
    table = pa.table({"log": [0, 0, 1, 0, 0], "request": [7, 7, 8, 9, 9], "relevance": [2, 0, 0, 1, 0],
                      "kind": [3.0, 1.0, 9.0, 1.0, 2.0]})
    scores = torch.tensor([2.0, -1.0, 4.0, 0.5, 0.0])
    by_grade = _pointwise_schema(pointwise_weights={0: 1, 1: 1, 2: 5})
    batch = BatchEncoder(by_grade).encode(table, ["log.parquet"])
    assert batch.row_weights["rank"].tolist() == [5.0, 1.0, 0.0, 1.0, 1.0]  # 0 outside the sample space
    losses = masked_task_losses({"rank": scores}, batch.labels, batch.masks, by_grade.tasks, groups=batch.groups,
                                row_weights=batch.row_weights)
    # the four rows of log 0 (the log-1 row is outside): as in the hand computation above, n = 5, 1, 1, 1
    expected = (5 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))
                + math.log(2)) / 4
    assert losses["rank"].item() == pytest.approx(expected, rel=1e-6)
    by_column = _pointwise_schema(weight_column="kind")
    assert "kind" in by_column.label_columns  # read like a label, never a feature
    batch = BatchEncoder(by_column).encode(table, ["log.parquet"])
    assert batch.row_weights["rank"].tolist() == [3.0, 1.0, 0.0, 1.0, 2.0]
    unweighted = BatchEncoder(_pointwise_schema()).encode(table, ["log.parquet"])
    assert unweighted.row_weights["rank"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="task 'rank': ranking_loss pointwise needs its rows' weights"):
        masked_task_losses({"rank": scores}, batch.labels, batch.masks, by_column.tasks, groups=batch.groups)


def test_pointwise_weights_that_cannot_weigh_the_data_are_refused_by_name():
    table = pa.table({"log": [0, 0, 1], "request": [7, 7, 8], "relevance": [2, 0, 3], "kind": [1.0, -2.0, -1.0],
                      SOURCE_COLUMN: [1, 1, 0]})  # the rows came from the second file
    files = ["a.parquet", "b.parquet"]
    # grade 3 lies outside the sample space: only grade 2 is missing from the table
    with pytest.raises(DataError, match=r"b.parquet: column 'relevance': relevance grade not in the pointwise_weights "
                                        r"of task 'rank' \(grades \[0, 1\]\); add an entry .*2\.0.*1 bad row"):
        BatchEncoder(_pointwise_schema(pointwise_weights={0: 1, 1: 2})).encode(table, files)
    with pytest.raises(DataError, match="b.parquet: column 'kind': negative point-wise weight .* 1 bad row"):
        BatchEncoder(_pointwise_schema(weight_column="kind")).encode(table, files)
    encoder = BatchEncoder(_pointwise_schema(weight_column="behaviour_type"))
    with pytest.raises(DataError, match="log.parquet: missing column 'behaviour_type'"):
        encoder.check_columns(table.schema, "log.parquet")


@pytest.mark.parametrize("weighting, problem", [
    (dict(pointwise_weights={0: 1, 2: -5}), r"pointwise_weights\[2\] must be a finite number >= 0"),
    (dict(pointwise_weights={"buy": 5}), "keys are relevance grades"),
    (dict(pointwise_weights={}), "maps relevance grades to weights"),
    (dict(pointwise_weights={0: 1}, weight_column="kind"), "not both"),
    (dict(ranking_loss="listwise", weight_column="kind"), "weigh the rows of ranking_loss: pointwise"),
    (dict(ranking_loss="pointwize"), r"ranking_loss must be one of \['pairwise', 'listwise', 'pointwise'\]"),
])
def test_bad_pointwise_settings_are_refused_by_task(weighting, problem):
    with pytest.raises(ValueError, match=f"task 'rank': .*{problem}"):
        _pointwise_schema(**weighting)


def test_a_weight_column_cannot_also_be_a_feature():
    with pytest.raises(ValueError, match="label leakage: column 'kind'"):
        Schema.from_dict({"dense": [{"name": "kind"}], "tasks": [
            {"name": "rank", "label": "relevance", "kind": "ranking", "group": "request",
             "ranking_loss": "pointwise", "weight_column": "kind"}]})


def test_masked_losses_dispatch_multiclass_and_ranking_on_their_sample_space():
    schema = Schema.from_dict({"tasks": [
        {"name": "level", "label": "level", "kind": "multiclass", "num_classes": 3, "sample_space": "log == 1"},
        {"name": "rank", "label": "relevance", "kind": "ranking", "group": "request", "sample_space": "log == 0",
         "ranking_loss": "pairwise"}]})
    scores, relevance, groups = _grouped_rows(rows=40)
    logits = torch.randn(40, 3, dtype=torch.float64)
    level = torch.randint(0, 3, (40,)).double()
    in_rank = torch.arange(40) % 2 == 0
    losses = masked_task_losses({"level": logits, "rank": scores}, {"level": level, "rank": relevance},
                                {"level": ~in_rank, "rank": in_rank}, schema.tasks, groups={"request": groups})
    assert losses["level"].item() == pytest.approx(F.cross_entropy(logits[~in_rank], level[~in_rank].long()).item())
    assert losses["rank"].item() == pytest.approx(
        pairwise_logistic_loss(scores[in_rank], relevance[in_rank], groups[in_rank]).item())


def test_gauc_is_the_row_weighted_mean_of_per_group_aucs_with_ties_counted_half():
    scores, labels, groups = _grouped_rows(rows=300)
    scores = (scores * 2).round() / 2  # many ties inside groups
    labels = (labels > 1).double()
    total = weight = 0.0
    for members in _by_group(groups).values():
        y = labels[members]
        if 0 < y.sum() < len(members):
            total += len(members) * binary_auroc(scores[members], y.long()).item()
            weight += len(members)
    metric = Task(name="ctr", label="click", gauc_by="user")
    metrics = MaskedTaskMetrics([metric], prefix="val")
    for part in torch.arange(300).chunk(4):  # batches split the groups: the metric regroups them
        metrics.update({"ctr": scores[part]}, {"ctr": labels[part]}, {"ctr": torch.ones(len(part), dtype=bool)},
                       {"user": groups[part]})
    assert metrics.compute()["val/ctr/gauc"].item() == pytest.approx(total / weight, abs=1e-6)


def _ndcg(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    gains = lambda order: sum((2 ** labels[i].item() - 1) / math.log2(r + 2) for r, i in enumerate(order[:k]))  # noqa: E731
    ideal = gains(torch.argsort(labels, descending=True, stable=True).tolist())
    return gains(torch.argsort(scores, descending=True, stable=True).tolist()) / ideal


def test_ndcg_at_k_averages_requests_with_a_relevant_row():
    scores, labels, groups = _grouped_rows(rows=300)
    task = Task(name="rank", label="relevance", kind="ranking", group="request", ndcg_at=(1, 3, 10))
    metrics = MaskedTaskMetrics([task], prefix="val")
    metrics.update({"rank": scores}, {"rank": labels}, {"rank": torch.ones(300, dtype=bool)}, {"request": groups})
    results = metrics.compute()
    relevant = [m for m in _by_group(groups).values() if labels[m].sum() > 0]
    for k in (1, 3, 10):
        expected = np.mean([_ndcg(scores[m], labels[m], k) for m in relevant])
        assert results[f"val/rank/ndcg@{k}"].item() == pytest.approx(expected, rel=1e-5)
    perfect = MaskedTaskMetrics([task], prefix="val")
    perfect.update({"rank": labels}, {"rank": labels}, {"rank": torch.ones(300, dtype=bool)}, {"request": groups})
    assert perfect.compute()["val/rank/ndcg@10"].item() == pytest.approx(1.0)
    assert perfect.compute()["val/rank/gauc"].item() == pytest.approx(1.0)


def test_multiclass_metrics_take_logits_even_when_they_look_like_probabilities():
    task = Task(name="level", label="level", kind="multiclass", num_classes=3)
    metrics = MaskedTaskMetrics([task], prefix="val")
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.8], [0.8, 0.15, 0.05], [0.3, 0.0, 0.95],
                           [0.5, 0.45, 0.3]])
    target = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0])
    metrics.update({"level": logits}, {"level": target}, {"level": torch.ones(6, dtype=bool)})
    results = metrics.compute()
    assert results["val/level/accuracy"].item() == pytest.approx(3 / 6)
    assert results["val/level/logloss"].item() == pytest.approx(F.cross_entropy(logits, target.long()).item())
    # these logits lie in [0, 1]: taken as probabilities they would give 0.75, as logits 0.7083
    assert results["val/level/auc"].item() == pytest.approx(multiclass_auroc(
        torch.softmax(logits, -1), target.long(), 3, average="macro", thresholds=None).item())
    assert results["val/level/auc"].item() == pytest.approx(0.7083, abs=1e-4)
    assert results["val/level/rows"].item() == 6


SCHEMA = {
    "sparse": [{"name": "user", "num_embeddings": 50, "embedding_dim": 8},
               {"name": "item", "num_embeddings": 40, "embedding_dim": 8}],
    "tasks": [
        {"name": "click", "label": "click", "sample_space": "log == 0", "gauc_by": "user"},
        {"name": "level", "label": "level", "kind": "multiclass", "num_classes": 4, "sample_space": "log == 1"},
        {"name": "rank", "label": "relevance", "kind": "ranking", "group": "request", "sample_space": "log == 0"},
    ],
}


def _log(rows: int, seed: int) -> pa.Table:
    """Requests of 8 rows (log 0) whose relevance grade follows the item id (0 for even ids,
    2 for ids 1 mod 4, 1 for ids 3 mod 4), and user rows (log 1) whose level is the user id mod 4."""
    rng = np.random.default_rng(seed)
    log = (np.arange(rows) // 8 % 3 == 2).astype(np.int64)
    item = rng.integers(0, 40, rows)
    user = rng.integers(0, 50, rows)
    relevance = np.where(log == 0, (item % 2) * (1 + (item % 4 == 1)), 0)
    return pa.table({"user": user, "item": item, "log": log, "request": np.arange(rows) // 8 + seed * rows,
                     "click": (relevance > 0).astype(np.int64), "relevance": relevance,
                     "level": np.where(log == 1, user % 4, 0)})


def test_encoder_checks_labels_inside_their_sample_space_and_groups(tmp_path):
    schema = Schema.from_dict(SCHEMA)
    table = _log(64, seed=0)
    batch = BatchEncoder(schema).encode(table, ["log.parquet"])
    assert batch.groups.keys() == {"user", "request"} and batch.groups["request"].dtype == torch.int64
    assert batch.labels["level"][~batch.masks["level"]].eq(0).all()
    bad_level = table.set_column(table.column_names.index("level"), "level", pa.array(np.where(
        table.column("log").to_numpy() == 1, 4, 9)))  # 9 outside the space is ignored; 4 inside is not
    with pytest.raises(DataError, match="outside the classes 0..3"):
        BatchEncoder(schema).encode(bad_level, ["log.parquet"])
    negative = table.set_column(table.column_names.index("relevance"), "relevance",
                                pa.array(-table.column("click").to_numpy()))
    with pytest.raises(DataError, match="negative ranking relevance"):
        BatchEncoder(schema).encode(negative, ["log.parquet"])
    requests = table.column("request").to_pylist()
    missing = table.set_column(table.column_names.index("request"), "request",
                               pa.array([None if i == 3 else r for i, r in enumerate(requests)]))
    with pytest.raises(DataError, match="missing .* group id inside task 'rank'"):
        BatchEncoder(schema).encode(missing, ["log.parquet"])
    named = table.set_column(table.column_names.index("request"), "request", pa.array([f"r{r}" for r in requests]))
    ids = BatchEncoder(schema).encode(named, ["log.parquet"]).groups["request"]
    assert torch.equal(ids[:8], ids[:1].expand(8)) and ids[8] != ids[0]  # hashed strings keep requests apart


def test_shuffled_training_batches_keep_each_request_together(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(_log(960, seed=0), path, row_group_size=320)
    encoder = BatchEncoder(Schema.from_dict(SCHEMA))
    stream = BatchStream(plan_units([str(path)], encoder), encoder, batch_size=64, shuffle_buffer=320, seed=3)
    requests = torch.cat([b.groups["request"] for b in stream])
    assert sorted(requests.tolist()) == sorted(np.arange(960) // 8)  # every row once
    starts = torch.cat([torch.tensor([True]), requests[1:] != requests[:-1]])
    assert int(starts.sum()) == 120  # 120 requests, each one contiguous run
    assert not torch.equal(requests, torch.sort(requests).values)  # and the requests were shuffled


@pytest.mark.parametrize("ranking_loss", [{}, {"ranking_loss": "pointwise", "pointwise_weights": {0: 1, 1: 1, 2: 5}}])
def test_every_kind_learns_end_to_end_and_predicts_per_class_scores(tmp_path, ranking_loss):
    for split, seed in (("train", 0), ("val", 1)):
        pq.write_table(_log(4096 if split == "train" else 1024, seed), tmp_path / f"{split}.parquet")
    schema_path = tmp_path / "schema.yaml"
    import yaml
    tasks = [*SCHEMA["tasks"][:2], {**SCHEMA["tasks"][2], **ranking_loss}]
    schema_path.write_text(yaml.safe_dump({**SCHEMA, "tasks": tasks}))
    L.seed_everything(0, verbose=False)
    data = MultiTaskDataModule(str(schema_path), train=str(tmp_path / "train.parquet"),
                               val=str(tmp_path / "val.parquet"), predict=str(tmp_path / "val.parquet"),
                               batch_size=256, shuffle_buffer=1024)
    module = MultiTaskModule(model=lambda s: MMoE(s, num_experts=2, expert=[16], tower=[8]), schema=data.schema,
                             dense_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                             sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.2))
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy(), inference_mode=False)
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # the item id decides relevance, the user id the level: both learnable from the ids (grades
    # 1 and 2 are both clicks: only the ranking loss tells them apart, and NDCG needs it)
    assert metrics["val/rank/ndcg@5"] > 0.95 and metrics["val/rank/gauc"] > 0.95, metrics
    assert metrics["val/click/gauc"] > 0.95 and metrics["val/click/auc"] > 0.95, metrics
    assert metrics["val/level/accuracy"] > 0.9 and metrics["val/level/auc"] > 0.95, metrics
    scores = trainer.predict(module, datamodule=data)[0]
    per_class = torch.stack([scores[f"score_level_{c}"] for c in range(4)], dim=1)
    assert torch.allclose(per_class.sum(dim=1), torch.ones(len(per_class)))
    assert "score_rank" in scores and "score_click" in scores


def test_rows_without_a_request_are_shuffled_one_by_one_and_text_groups_read_as_strings(tmp_path):
    """Rows of other logs (no request id) must not move as one block; CSV group ids are read as
    text, so files whose ids look numeric in one and not in another still combine."""
    table = _log(960, seed=0)
    requests = table.column("request").to_numpy()
    others = (table.column("log").to_numpy() == 1)
    table = table.set_column(table.column_names.index("request"), "request",
                             pa.array([None if o else int(r) for o, r in zip(others, requests)], pa.int64()))
    table = table.take(np.argsort(others, kind="stable"))  # as if the other log were another file: one stretch
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    encoder = BatchEncoder(Schema.from_dict(SCHEMA))
    stream = BatchStream(plan_units([str(path)], encoder), encoder, batch_size=64, shuffle_buffer=960, seed=3)
    requests = torch.cat([b.groups["request"] for b in stream])
    positions = (requests == MISSING_GROUP).nonzero().flatten()  # where the request-less rows landed
    assert len(positions) == others.sum() and (positions.diff() > 1).sum() > 20, \
        "request-less rows are spread, not kept as one block"
    assert "request" in encoder.string_columns  # "user" is a plain id feature too: read as its integers


def test_a_csv_group_column_that_a_plain_id_feature_reads_keeps_its_integer_ids(tmp_path):
    """``gauc_by: user`` read user as text in CSV, so the plain id feature user hashed 5 to row 24 of
    25 instead of row 5 (Parquet's); the groups stay equal where the ids are."""
    (tmp_path / "log.csv").write_text("user,click\n5,0\n7,1\n5,1\n")
    schema = Schema.from_dict({"sparse": [{"name": "user", "num_embeddings": 25, "embedding_dim": 4}],
                               "tasks": [{"name": "ctr", "label": "click", "gauc_by": "user"}]})
    encoder = BatchEncoder(schema)
    [batch] = list(BatchStream(plan_units([str(tmp_path / "log.csv")], encoder), encoder, batch_size=8))
    assert batch.sparse.values().tolist() == [5, 7, 5]
    groups = batch.groups["user"].tolist()
    assert groups[0] == groups[2] != groups[1]
