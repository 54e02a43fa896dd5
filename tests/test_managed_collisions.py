"""Ids never seen before: tables with ``managed_collisions`` take raw ids of any size, keep the
rows of ids seen on an earlier day through a checkpoint, give new ids free rows, and report the
ids that lost theirs. (2 processes against one: ``test_sharded_training.py``'s ``managed`` case.)"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec import KeyedJaggedTensor

from lightning_mtr.data.batch import Batch
from lightning_mtr.data.encode import BatchEncoder
from lightning_mtr.embeddings import SparseOptimizer
from lightning_mtr.embeddings.managed import ManagedIds
from lightning_mtr.models import MMoE
from lightning_mtr.schema import Schema
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy
from lightning_mtr.training.warm_start import WarmStart

# capacity 3: a managed table keeps its last row for ids without a row of their own
USER = {"name": "user", "num_embeddings": 4, "embedding_dim": 4, "managed_collisions": {"eviction_policy": "lfu"}}
SCHEMA = {"sparse": [USER, {"name": "item", "num_embeddings": 10, "embedding_dim": 4}],
          "dense": [{"name": "d0"}], "tasks": [{"name": "ctr", "label": "click"}]}
MISS_ROW = 3


def _schema(**user) -> Schema:
    return Schema.from_dict({**SCHEMA, "sparse": [{**USER, **user}, SCHEMA["sparse"][1]]})


@pytest.mark.parametrize(("user", "message"), [
    ({"out_of_range": "modulo"}, "managed_collisions gives every id its own row; out_of_range: modulo"),
    ({"managed_collisions": {"eviction_policy": "fifo"}}, "eviction_policy must be one of"),
    ({"managed_collisions": {"eviction_interval": 0}}, "eviction_interval must be an integer >= 1"),
    ({"managed_collisions": {"decay_exponent": "fast"}}, "decay_exponent must be a number >= 0"),
    ({"managed_collisions": {"decay_exponent": -1}}, "decay_exponent must be a number >= 0"),
    ({"managed_collisions": {"policy": "lfu"}}, r"managed_collisions: unknown keys \['policy'\]"),
    ({"managed_collisions": True}, "managed_collisions must be a mapping"),
    ({"sequence": True}, "managed_collisions is for pooled tables"),
])
def test_a_bad_managed_table_is_refused_in_one_line(user, message):
    with pytest.raises(ValueError, match=message) as error:
        _schema(**user)
    assert "\n" not in str(error.value) and "'user'" in str(error.value)


def test_features_sharing_a_managed_table_must_agree():
    other = {"name": "user_last", "num_embeddings": 4, "embedding_dim": 4, "table": "user"}
    with pytest.raises(ValueError, match="share table 'user' but disagree on managed_collisions"):
        Schema.from_dict({**SCHEMA, "sparse": [USER, other]})


def test_ids_far_beyond_the_table_reach_the_model_unreduced(tmp_path):
    """A plain table refuses an id >= num_embeddings; a managed one passes raw ids (and hashes
    strings into 63 bits, not into num_embeddings buckets)."""
    table = pa.table({"user": pa.array([10**12, 5, 2**62], pa.int64()), "item": pa.array([1, 2, 3], pa.int64()),
                      "d0": pa.array([0.0, 1.0, 2.0]), "click": pa.array([0, 1, 0], pa.int8())})
    pq.write_table(table, tmp_path / "day.parquet")
    batch = BatchEncoder(_schema()).encode(table, [str(tmp_path / "day.parquet")])
    assert batch.sparse["user"].values().tolist() == [10**12, 5, 2**62]
    strings = table.set_column(0, "user", pa.array(["a", "b", "a"]))
    hashed = BatchEncoder(_schema()).encode(strings, ["strings"]).sparse["user"].values()
    assert hashed[0] == hashed[2] != hashed[1] and int(hashed.max()) >= 4  # not folded into 4 rows


def _batch(users: list[int]) -> Batch:
    rows = len(users)
    generator = torch.Generator().manual_seed(rows)
    sparse = KeyedJaggedTensor(keys=["user", "item"], values=torch.tensor(users + list(range(rows))),
                               lengths=torch.ones(2 * rows, dtype=torch.int64))
    labels = {"ctr": (torch.rand(rows, generator=generator) < 0.5).float()}
    return Batch(torch.randn(rows, 1, generator=generator), sparse, labels, {"ctr": torch.ones(rows, dtype=torch.bool)})


class _Day(L.LightningDataModule):
    def __init__(self, batch: Batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch], batch_size=None)


def _train_day(users: list[int], epochs: int, root, resume=None, warm=None) -> tuple[MultiTaskModule, dict[str, float]]:
    """One training step per day: each day an epoch of the same run, resumed from the day before
    (``resume``), or a new run warm-started from it (``warm``, as ``lightning-mtr daily`` does)."""
    module = MultiTaskModule(model=partial(MMoE, num_experts=2, expert=[4], tower=[4]),
                             schema=_schema(), sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.1))
    strategy = SingleProcessStrategy()
    strategy.warm_start = WarmStart(str(warm)) if warm else None
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        strategy=strategy)
    trainer.fit(module, datamodule=_Day(_batch(users)), ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(root / f"day-{epochs}")
    return module, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mch/")}


def _rows(managed: ManagedIds, users: list[int]) -> list[int]:
    managed.eval()
    sparse = KeyedJaggedTensor(keys=["user", "item"], values=torch.tensor(users + [0] * len(users)),
                               lengths=torch.ones(2 * len(users), dtype=torch.int64))
    return managed(sparse)["user"].values().tolist()


@pytest.mark.parametrize("start", ["resume", "warm_start"])
def test_day_one_ids_keep_their_rows_through_a_checkpoint_and_evictions_are_counted(start, tmp_path):
    """LFU over 3 rows, counted by hand. Day 1: 100 x4, 200 x3, 300 x1: three free rows, three ids.
    Day 2 (resumed from day 1's checkpoint): 100 x1, 400 x2, 500 x5. Counts since entering: 100: 5,
    200: 3, 300: 1, and the newcomers 400: 2, 500: 5; the three most frequent (100, 500, 200) hold
    the rows: 300 is evicted (one eviction) and 500 takes its row; 400 has none and shares the last."""
    day1 = [100] * 4 + [200] * 3 + [300]
    module, report = _train_day(day1, 1, tmp_path)
    rows1 = dict(zip([100, 200, 300], _rows(module.model.features.managed_ids, [100, 200, 300])))
    assert sorted(rows1.values()) == [0, 1, 2]  # three distinct rows, none of them the shared last row
    assert report == {"mch/user/evicted": 0.0, "mch/user/rows_in_use": 3.0}

    day2 = [100] + [400] * 2 + [500] * 5
    if start == "resume":
        module, report = _train_day(day2, 2, tmp_path, resume=tmp_path / "day-1")
    else:
        module, report = _train_day(day2, 1, tmp_path / "warm", warm=tmp_path / "day-1")
    rows2 = dict(zip([100, 200, 300, 400, 500], _rows(module.model.features.managed_ids, [100, 200, 300, 400, 500])))
    assert rows2[100] == rows1[100] and rows2[200] == rows1[200], "ids seen on day 1 keep their rows on day 2"
    assert rows2[500] == rows1[300] and rows2[300] == MISS_ROW == rows2[400]
    assert report == {"mch/user/evicted": 1.0, "mch/user/rows_in_use": 3.0}


def test_an_evicted_row_starts_afresh_for_its_new_id(tmp_path):
    """The LFU case above, stopped in day 2's forward, after the map has evicted 300 for 500 and
    before the lookup: 500 must not inherit 300's trained row. Its weights and row-wise Adagrad
    accumulator are zero, the reset (docs/schema-and-data.md), while every other row, the free
    and the shared last one included, keeps what day 1 left."""
    torch.manual_seed(0)  # a draw where 300's only row of day 1 passes a gradient through the tiny experts' ReLUs
    module, _ = _train_day([100] * 4 + [200] * 3 + [300], 1, tmp_path)
    managed = module.model.features.managed_ids
    row = dict(zip([100, 200, 300], _rows(managed, [100, 200, 300])))[300]
    fused = module.trainer.strategy._fused_optimizer()
    weight = fused.params["features.embeddings.embedding_bags.user.weight"]
    momentum = fused.state[weight]["user.momentum1"]
    before = weight.detach().clone(), momentum.clone()
    assert before[0][row].abs().sum() > 0 and before[1][row] > 0, "day 1 trained 300's row"

    managed.train()(KeyedJaggedTensor(keys=["user"], values=torch.tensor([100] + [400] * 2 + [500] * 5),
                                      lengths=torch.ones(8, dtype=torch.int64)))
    assert _rows(managed, [300, 500]) == [MISS_ROW, row], "500 took 300's row"
    others = torch.arange(weight.shape[0]) != row
    assert torch.equal(weight[row], torch.zeros(4)) and momentum[row] == 0
    assert torch.equal(weight[others], before[0][others]) and torch.equal(momentum[others], before[1][others])
    looked_up = module.model.features.embeddings(KeyedJaggedTensor(
        keys=["user", "item"], values=torch.tensor([row, 0]), lengths=torch.ones(2, dtype=torch.int64)))
    assert torch.equal(looked_up["user"], torch.zeros(1, 4)), "the fused kernel reads the reset row"


def test_without_a_resume_day_two_starts_from_an_empty_map(tmp_path):
    """The map is state: a fresh run gives day 2's ids the rows in order of frequency, so the
    check above means the checkpoint carried it."""
    module, report = _train_day([100] + [400] * 2 + [500] * 5, 1, tmp_path)
    assert set(_rows(module.model.features.managed_ids, [100, 400, 500])) == {0, 1, 2}
    assert report == {"mch/user/evicted": 0.0, "mch/user/rows_in_use": 3.0}


@pytest.mark.parametrize("policy", ["lru", "distance_lfu"])
def test_the_oldest_id_gives_up_its_row(policy):
    """One id per step, 100, 200, 300 fill the 3 rows; then 400 twice. LRU evicts the id seen
    longest ago; distance-LFU too (all counts 1, 100's the oldest): 100's row goes to 400."""
    table = _schema(managed_collisions={"eviction_policy": policy}).managed_tables[0]
    managed = ManagedIds([table]).train()
    for users in ([100], [200], [300]):
        managed(KeyedJaggedTensor(keys=["user"], values=torch.tensor(users), lengths=torch.ones(len(users)).long()))
    (row_of_100,) = _rows(managed, [100])
    managed.train()(KeyedJaggedTensor(keys=["user"], values=torch.tensor([400, 400]), lengths=torch.ones(2).long()))
    rows = _rows(managed, [100, 200, 300, 400])
    assert rows[0] == MISS_ROW and rows[3] == row_of_100 and len(set(rows[1:])) == 3
    assert managed.take_report() == {"mch/user/evicted": 1, "mch/user/rows_in_use": 3}


def test_a_batch_with_more_ids_than_the_first_gives_each_of_them_a_row():
    """TorchRec sizes its record of the ids seen from the first training batch (1 id here); the
    next batch's 3 new ids all get rows while 6 of the 7 are free, as does a third, larger one."""
    table = _schema(managed_collisions={}).managed_tables[0]
    managed = ManagedIds([replace(table, num_embeddings=8)]).train()
    for users in ([100], [200, 300, 400], [500] * 3 + [600] * 5):
        managed(KeyedJaggedTensor(keys=["user"], values=torch.tensor(users), lengths=torch.ones(len(users)).long()))
    rows = _rows(managed, [100, 200, 300, 400, 500, 600])
    assert 7 not in rows and len(set(rows)) == 6  # row 7 (num_embeddings - 1) is the shared one
    assert managed.take_report() == {"mch/user/evicted": 0, "mch/user/rows_in_use": 6}


def test_the_exported_program_carries_the_id_map_and_scores_as_the_model():
    """Export keeps the id -> row map (2 int64 per row: the sorted raw ids and their rows, looked up
    with ATen's searchsorted): raw ids seen in training, and unseen ones (the shared last row), score
    as the trained model scores them."""
    from lightning_mtr.serving.program import ServingModel, export_program, foreign_operators
    from lightning_mtr.tasks.scores import probabilities

    torch.manual_seed(0)
    schema = _schema()
    model = MMoE(schema, num_experts=2, expert=[4], tower=[4])
    model.train()(torch.zeros(8, 1), _batch([100] * 4 + [200] * 3 + [300]).sparse)  # fills the map
    model.eval()
    batch = _batch([100, 200, 300, 10**15, 7, 100])
    with torch.no_grad():
        expected = probabilities(schema, model(batch.dense, batch.sparse))
        program = export_program(ServingModel(model, schema, None))
        scores = program.module()(batch.dense.double(), batch.sparse.values(),
                                  batch.sparse.lengths().view(2, -1))
    assert foreign_operators(program) == set()
    torch.testing.assert_close(scores["ctr"], expected["ctr"], atol=1e-6, rtol=0)
    seen, unseen, small = _rows(model.features.managed_ids, [100, 10**15, 7])
    assert seen != MISS_ROW and unseen == small == MISS_ROW  # 7 is an unseen raw id, not row 7
    negative = batch.sparse.values().clone()
    negative[1] = -5  # the encoder refuses a negative id in training: the program refuses it too, not a miss
    with pytest.raises(RuntimeError, match="an id is negative"):
        program.module()(batch.dense.double(), negative, batch.sparse.lengths().view(2, -1))



def test_the_benchmarks_collision_rates_by_hand(tmp_path):
    """Hashed into 10 rows, ids 1, 11 and 21 (seen a day earlier) share bucket 1, 2 is alone:
    2 of the 3 impressions collide. The managed schema swaps modulo for managed collisions only."""
    import numpy as np
    import yaml

    from lightning_mtr.benchmarks.daily_ids import hashed_collisions, managed_schema

    assert hashed_collisions(np.array([1, 11, 2]), np.array([21]), 10) == pytest.approx(2 / 3)
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump({**SCHEMA, "sparse": [{"name": "user", "num_embeddings": 4,
                                                            "out_of_range": "modulo"}, SCHEMA["sparse"][1]]}))
    path, hashed = managed_schema(schema, "lru", tmp_path)
    assert hashed == {"user": 4}
    assert Schema.from_yaml(path).managed_tables[0].managed_collisions.eviction_policy == "lru"
