"""``lightning_mtr.embeddings``: every table gets its initial values from its TorchRec config on
every path (built on a device, one process fused or plain, sharded over 2 gloo processes), and
the sequence lookup pads like a loop over the rows."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import random_inputs, run_ranks
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor

from lightning_mtr.data.batch import Batch
from lightning_mtr.embeddings import FeatureInput, SparseOptimizer
from lightning_mtr.models import DUPN
from lightning_mtr.nn.meta import materialize
from lightning_mtr.schema import Schema
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy
from lightning_mtr.training.distributed.single import place_tables

RANGE = 0.75  # the schema's init_range of `user` and `hist_type`; the other two keep TorchRec's default
SCHEMA = Schema.from_dict({
    "sparse": [
        {"name": "user", "num_embeddings": 60, "embedding_dim": 8, "init_range": RANGE},
        {"name": "item", "num_embeddings": 40, "embedding_dim": 8},
        {"name": "hist_item", "num_embeddings": 40, "embedding_dim": 8, "sequence": True, "max_length": 3},
        {"name": "hist_type", "num_embeddings": 30, "embedding_dim": 8, "sequence": True, "max_length": 3,
         "init_range": RANGE},
    ],
    "dense": [{"name": "d0"}],
    "tasks": [{"name": "ctr", "label": "ctr"}],
})
# the bound each table's weights start within: init_range, else TorchRec's sqrt(1 / rows)
BOUNDS = {"user": RANGE, "item": (1 / 40) ** 0.5, "hist_item": (1 / 40) ** 0.5, "hist_type": RANGE}
MODEL = partial(DUPN, item_part=["hist_item"], property_part=["hist_type"], user_features=["user"], lstm_hidden=8,
                user_dim=8, attention=[4], tower=[4])
# on CPU TorchRec offers table-, column-wise and data-parallel (not for sequence tables)
PLAN = {"user": {"sharding_types": ["data_parallel"]},
        "item": {"sharding_types": ["column_wise"], "min_partition": 4},
        "hist_item": {"sharding_types": ["table_wise"]},
        "hist_type": {"sharding_types": ["column_wise"], "min_partition": 4}}


def _assert_drawn(weight: torch.Tensor, table: str) -> None:
    """Uniform within the table's bound: inside it, reaching towards it, spread like U(-b, b)
    (std b / sqrt(3); 240+ values give a sample std within ~10%), not one repeated value."""
    bound = BOUNDS[table]
    assert torch.isfinite(weight).all(), table
    assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound, (table, weight.abs().max(), bound)
    assert weight.std() == pytest.approx(bound / 3 ** 0.5, rel=0.2), (table, weight.std(), bound)
    assert weight.unique().numel() > weight.numel() // 2, table


def _tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{table: weight}`` of a model's pooled and sequence tables, plain or fused."""
    return {key.split(".")[-2]: value for key, value in model.state_dict().items()
            if "embedding_bags." in key or "sequence_embeddings." in key}


def test_materialize_leaves_every_table_on_meta():
    """The dense layers are allocated and reset; the tables wait for the collection that replaces
    them or for init_tables (a sequence table allocated here would be held whole on every rank
    before sharding)."""
    with torch.device("meta"):
        model = MODEL(SCHEMA)
    materialize(model, "cpu")
    tables = [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    assert len(tables) == 2 and all(p.is_meta for t in tables for p in t.parameters())
    outside = {id(p) for t in tables for p in t.parameters()}
    assert all(not p.is_meta for p in model.parameters() if id(p) not in outside)


def test_a_feature_input_built_on_a_device_is_drawn_from_its_configs():
    """Built outside training (tests, notebooks), TorchRec's own constructor draws from the same config."""
    torch.manual_seed(0)
    tables = _tables(FeatureInput(SCHEMA, device="cpu"))
    assert set(tables) == set(BOUNDS)
    for table, weight in tables.items():
        _assert_drawn(weight, table)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA fuses the sequence tables too"))])
def test_one_process_draws_fused_and_plain_tables_from_their_configs(accelerator):
    """``SingleProcessStrategy``'s ``place_tables``: pooled tables fused (on CUDA the sequence
    ones too), CPU sequence tables left plain; all drawn by init_tables."""
    torch.manual_seed(0)
    module = MultiTaskModule(model=MODEL, schema=SCHEMA, sparse_optimizer=SparseOptimizer())
    place_tables(module.model, module.sparse_optimizer, torch.device("cuda" if accelerator == "gpu" else "cpu"))
    assert type(module.model.features.embeddings).__name__ == "FusedEmbeddingBagCollection"
    fused_sequences = type(module.model.features.sequence_embeddings).__name__ == "FusedEmbeddingCollection"
    assert fused_sequences == (accelerator == "gpu")
    tables = _tables(module.model)
    assert set(tables) == set(BOUNDS)
    for table, weight in tables.items():
        _assert_drawn(weight.cpu(), table)


class _OneBatch(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        dense, sparse = random_inputs(SCHEMA, 4)
        batch = Batch(dense, sparse, {"ctr": torch.ones(4)}, {"ctr": torch.ones(4, dtype=torch.bool)})
        return DataLoader([batch], batch_size=None)

    val_dataloader = train_dataloader


def test_a_later_stage_keeps_the_trained_tables():
    """Lightning sets the strategy up again for every stage (validate, test or predict after
    fit, in the same process): the tables are drawn once, and the trained ones stay."""
    torch.manual_seed(0)
    module = MultiTaskModule(model=MODEL, schema=SCHEMA, sparse_optimizer=SparseOptimizer(lr=0.5))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        strategy=SingleProcessStrategy(), inference_mode=False)
    place_tables(module.model, module.sparse_optimizer, torch.device("cpu"))
    drawn = {table: weight.clone() for table, weight in _tables(module.model).items()}
    trainer.fit(module, datamodule=_OneBatch())
    trained = {table: weight.clone() for table, weight in _tables(module.model).items()}
    assert all(not torch.equal(trained[t], drawn[t]) for t in trained), "the step trained every table"
    trainer.validate(module, datamodule=_OneBatch(), verbose=False)
    for table, weight in _tables(module.model).items():
        torch.testing.assert_close(weight, trained[table], rtol=0, atol=0, msg=table)


class _SaveTables(L.Callback):
    """Each rank's part of every table at the start of fit, before any step: ``{table: [(row and
    column offsets, values)]}`` (a data-parallel table: its whole replica at offset 0, 0)."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer, module) -> None:
        parts = {}
        for key, value in module.model.state_dict().items():
            if "embedding_bags." in key or "sequence_embeddings." in key:
                sharded = hasattr(value, "local_shards")  # none on a rank that holds no part of it
                parts[key.split(".")[-2]] = [(tuple(s.metadata.shard_offsets), s.tensor.detach().clone())
                                             for s in value.local_shards()] if sharded else [((0, 0), value.clone())]
        torch.save(parts, self.path)


def _sharded_worker(rank: int, out: Path) -> None:
    from lightning_mtr.training.distributed import TorchRecStrategy

    torch.manual_seed(rank)  # every rank its own stream: a replica must still match rank 0's
    module = MultiTaskModule(model=MODEL, schema=SCHEMA, sparse_optimizer=SparseOptimizer())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TorchRecStrategy(constraints=PLAN), max_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=out,
                        callbacks=[_SaveTables(out / f"tables-{rank}.pt")])
    trainer.fit(module, datamodule=_OneBatch())


def test_sharded_tables_are_drawn_from_their_configs(tmp_path):
    """Two gloo processes: every shard of every table (column-wise, table-wise, and a
    data-parallel table identical on both ranks) starts as its config says."""
    run_ranks(2, _sharded_worker, tmp_path)
    parts = [torch.load(tmp_path / f"tables-{rank}.pt") for rank in range(2)]
    assert set(parts[0]) == set(BOUNDS)
    for table in BOUNDS:
        rows = SCHEMA.sparse[[f.name for f in SCHEMA.sparse].index(table)].num_embeddings
        full, filled = torch.zeros(rows, 8), torch.zeros(rows, 8, dtype=torch.int64)
        for rank_parts in parts:
            for (row, column), values in rank_parts[table]:
                full[row:row + values.shape[0], column:column + values.shape[1]] = values
                filled[row:row + values.shape[0], column:column + values.shape[1]] += 1
        if table == "user":  # replicated: the same draw on both ranks
            torch.testing.assert_close(parts[0][table][0][1], parts[1][table][0][1], rtol=0, atol=0)
            assert filled.eq(2).all()
        else:
            assert filled.eq(1).all(), f"{table}: every element lives on exactly one rank"
        _assert_drawn(full, table)


def _loop_padding(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The spec: row i holds its lengths[i] embeddings in order, then zeros, up to the longest row (at least 1)."""
    out = torch.zeros(len(lengths), max(lengths + [1]), values.shape[1])
    start = 0
    for row, length in enumerate(lengths):
        out[row, :length] = values[start:start + length]
        start += length
    return out


@pytest.mark.parametrize("lengths", [[2, 0, 3, 1], [0, 0, 0], [1]], ids=["mixed", "all-empty", "one"])
def test_sequences_pad_like_a_loop_over_rows(lengths):
    """Also the gradient of the sum: every element of a table row gets how often the batch holds that row."""
    schema = Schema.from_dict({"sparse": [{"name": "s", "num_embeddings": 7, "embedding_dim": 3, "sequence": True}],
                               "tasks": [{"name": "ctr", "label": "ctr"}]})
    torch.manual_seed(0)
    features = FeatureInput(schema, device="cpu")
    ids = torch.randint(0, 7, (sum(lengths),))
    sparse = KeyedJaggedTensor(keys=["s"], values=ids, lengths=torch.tensor(lengths))
    padded, got_lengths = features.sequences(sparse)["s"]
    table = features.sequence_embeddings.embeddings["s"].weight
    assert got_lengths.tolist() == lengths
    torch.testing.assert_close(padded, _loop_padding(table[ids], lengths), rtol=0, atol=0)
    padded.sum().backward()
    expected = torch.bincount(ids, minlength=7).float()[:, None].expand(7, 3)
    torch.testing.assert_close(table.grad, expected, rtol=0, atol=0)
