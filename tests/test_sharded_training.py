"""Sharded equals unsharded (../shared/STYLE.md section 9): the same model, start weights and
data trained in 2 gloo processes under ``TorchRecStrategy`` and in one plain process give the
same tables, dense weights and predictions; sharded checkpoints resume on another world size."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import LossRecorder, random_inputs, run_ranks
from torch.utils.data import DataLoader, IterableDataset
from torchrec import KeyedJaggedTensor

from lightning_mtr.data.batch import Batch
from lightning_mtr.models import DUPN, MMoE, NFwFM
from lightning_mtr.schema import Schema
from lightning_mtr.embeddings import SparseOptimizer
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed.checkpoint import read_consolidated, read_full
from lightning_mtr.training.distributed import SingleProcessStrategy, TableConstraints, TorchRecStrategy
from lightning_mtr.training.distributed.single import place_tables

WORLD = 2
ROWS = 16  # per rank and step; one process takes both ranks' rows at once
STEPS = 4
SCHEMA = {
    "sparse": [
        {"name": "user", "num_embeddings": 60, "embedding_dim": 8},
        {"name": "item", "num_embeddings": 40, "embedding_dim": 8, "pooling": "mean", "multi_valued": True},
        {"name": "item_last", "num_embeddings": 40, "embedding_dim": 8, "pooling": "mean", "table": "item"},
    ],
    "dense": [{"name": "d0"}, {"name": "d1"}],
    "tasks": [{"name": "ctr", "label": "ctr"}, {"name": "cvr", "label": "cvr"}],
}
# DUPN's behaviour sequence: unpooled tables (an EmbeddingCollection), sharded too
SEQUENCES = [{"name": "hist_item", "num_embeddings": 40, "embedding_dim": 8, "sequence": True, "max_length": 3},
             {"name": "hist_type", "num_embeddings": 3, "embedding_dim": 8, "sequence": True, "max_length": 3}]
# by case: the sequence cases add SEQUENCES, read by DUPN as its behaviours and by NFwFM as two
# multi-hot fields (summed, their elements paired through r_FF; its pooled fields single-valued)
MODELS = {"pooled": partial(MMoE, num_experts=2, expert=[8], tower=[4]),
          "sequences": partial(DUPN, item_part=["hist_item"], property_part=["hist_type"], user_features=["user"],
                               lstm_hidden=8, user_dim=8, attention=[4], tower=[4]),
          "fwfm": partial(NFwFM, hidden=[8], tower=[4])}
# the user table with managed collisions: 23 rows for 60 raw ids far beyond them, so the replicated
# id -> row maps fill and must choose the same ids on 2 processes as on one
MODELS["managed"] = MODELS["pooled"]
MANAGED_USER = {"num_embeddings": 24, "managed_collisions": {}}  # the default policy, distance_lfu
MANAGED_MAP = "model.features.managed_ids.maps.user._mch_sorted_raw_ids"
# weighted ids (a weighted KJT, one collection with is_weighted=True): item's bags weighed by item_w,
# mean-pooled; item_last, unweighted in its own table, still a mean of its bag, user still a sum
MODELS["weighted"] = MODELS["pooled"]
WEIGHTED = [SCHEMA["sparse"][0], {**SCHEMA["sparse"][1], "weight_column": "item_w"},
            {**SCHEMA["sparse"][2], "table": "item_last"}]
PLANS = {
    "table_wise": {"user": {"sharding_types": ["table_wise"]}, "item": {"sharding_types": ["table_wise"]}},
    # TorchRec shards row-wise only on GPUs (its CPU sharder offers table-, column-wise and data-parallel)
    "row_wise": {"user": {"sharding_types": ["row_wise"]}, "item": {"sharding_types": ["row_wise"]}},
    "table_row_wise": {"user": {"sharding_types": ["table_row_wise"]}, "item": {"sharding_types": ["table_wise"]}},
    "column_wise": {"user": {"sharding_types": ["column_wise"], "min_partition": 4},
                    "item": {"sharding_types": ["column_wise"], "min_partition": 4}},
    # the data-parallel table comes first in the sharded output, unlike in the schema: checks the order
    "data_parallel": {"user": {"sharding_types": ["table_wise"]}, "item": {"sharding_types": ["data_parallel"]}},
    # hist_type is left to the planner, which on CPU may not replicate a sequence table (see below)
    "sequences": {"user": {"sharding_types": ["table_wise"]}, "item": {"sharding_types": ["table_wise"]},
                  "hist_item": {"sharding_types": ["table_wise"]}},
}
PLANS["fwfm"] = PLANS["sequences"]
PLANS["managed"] = PLANS["table_wise"]
PLANS["managed_column_wise"] = PLANS["column_wise"]
PLANS["managed_data_parallel"] = {"user": {"sharding_types": ["data_parallel"]},
                                  "item": {"sharding_types": ["table_wise"]}}
PLANS["weighted"] = {**PLANS["table_wise"], "item_last": {"sharding_types": ["table_wise"]}}
PLANS["weighted_column_wise"] = {**PLANS["column_wise"], "item_last": {"sharding_types": ["table_wise"]}}
PLANS["weighted_data_parallel"] = {**PLANS["data_parallel"], "item_last": {"sharding_types": ["data_parallel"]}}
# Row-wise Adagrad keeps one accumulator per row *of each column shard*, so a column-wise table
# legitimately updates differently from an unsharded one: it is checked with element-wise Adagrad.
# A pinned plan (the JSON `lightning-mtr plan` writes) with the first schema table on the last rank:
# TorchRec's pooled output then lists it last, and the model must still see its features in order.
PINNED = {"format": "lightning-mtr-plan/1", "modules": {"features.embeddings": {
    name: {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [rank],
           "shards": [{"offsets": [0, 0], "sizes": [rows, 8], "rank": rank}]}
    for name, rows, rank in (("user", 60, 1), ("item", 40, 0))}}}
CASES = [("table_wise", "rowwise_adagrad"), ("data_parallel", "rowwise_adagrad"), ("column_wise", "adagrad"),
         ("table_wise", "sgd"), ("pinned", "rowwise_adagrad"),
         ("sequences", "rowwise_adagrad"), ("fwfm", "rowwise_adagrad"), ("managed", "rowwise_adagrad"),
         ("managed_column_wise", "adagrad"), ("managed_data_parallel", "rowwise_adagrad"),  # rows reset per layout
         ("weighted", "rowwise_adagrad"), ("weighted_column_wise", "adagrad"),
         ("weighted_data_parallel", "rowwise_adagrad")]
GPU_ONLY = [("row_wise", "rowwise_adagrad"), ("table_row_wise", "rowwise_adagrad")]
# fp32 sums in another order (all-to-all, all-reduce of the mean gradient) after STEPS steps of
# Adam and row-wise Adagrad; a wrong update (e.g. a gradient not averaged over ranks) is off by >1e-2
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _variant(plan: str) -> str:
    """The model a case trains: its own for the sequence cases, MMoE for every other plan."""
    prefix = plan.split("_")[0]
    return prefix if prefix in ("managed", "weighted") else plan if plan in MODELS else "pooled"


def _schema(variant: str = "pooled") -> Schema:
    pooled = [{**f, "multi_valued": False} for f in SCHEMA["sparse"]] if variant == "fwfm" else SCHEMA["sparse"]
    if variant == "managed":
        return Schema.from_dict({**SCHEMA, "sparse": [{**pooled[0], **MANAGED_USER}, *pooled[1:]]})
    if variant == "weighted":
        return Schema.from_dict({**SCHEMA, "sparse": WEIGHTED})
    return Schema.from_dict({**SCHEMA, "sparse": pooled + (SEQUENCES if variant != "pooled" else [])})


def _batch(seed: int, rows: int, variant: str = "pooled") -> Batch:
    schema = _schema("pooled" if variant == "managed" else variant)
    dense, sparse = random_inputs(schema, rows, seed)
    if variant == "weighted":  # item's ids weighed in [-0.5, 2), every other id by 1
        weights = torch.ones(sparse.values().numel())
        start, stop = sparse.offset_per_key()[1:3]
        weights[start:stop] = torch.rand(stop - start, generator=torch.Generator().manual_seed(seed)) * 2.5 - 0.5
        sparse = KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                   weights=weights)
    if variant == "managed":  # the user ids (one per row, the first key) become raw ids of an open-ended space
        values = sparse.values().clone()
        values[:rows] = 10**12 + 7919 * values[:rows]
        sparse = KeyedJaggedTensor(keys=sparse.keys(), values=values, lengths=sparse.lengths())
    generator = torch.Generator().manual_seed(seed + 1000)
    labels = {t: (torch.rand(rows, generator=generator) < 0.4).float() for t in ("ctr", "cvr")}
    return Batch(dense, sparse, labels, {t: torch.ones(rows, dtype=torch.bool) for t in labels})


def _slice(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s rows of a global batch (what a data loader would hand it)."""
    rows = batch.batch_size // world
    keep = slice(rank * rows, (rank + 1) * rows)
    sparse = batch.sparse.to_dict()
    lengths = {k: v.lengths()[keep] for k, v in sparse.items()}
    ids = {k: slice(v.offsets()[keep.start], v.offsets()[keep.stop]) for k, v in sparse.items()}
    keys = list(sparse)
    weighted = batch.sparse.weights_or_none() is not None
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat([sparse[k].values()[ids[k]] for k in keys]),
                            lengths=torch.cat([lengths[k] for k in keys]),
                            weights=torch.cat([sparse[k].weights()[ids[k]] for k in keys]) if weighted else None)
    return Batch(batch.dense[keep], kjt, {k: v[keep] for k, v in batch.labels.items()},
                 {k: v[keep] for k, v in batch.masks.items()})


class _Stream(IterableDataset):
    """Streams fixed batches with no length, like the real data (Lightning then fetches one batch ahead)."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class _Batches(L.LightningDataModule):
    def __init__(self, batches: list[Batch], val: list[Batch] | None = None):
        super().__init__()
        self.batches = batches
        self.val = val

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.val or []), batch_size=None)


class _FromWeights(MultiTaskModule):
    """Starts from given weights, so both runs begin identical however their RNGs were used."""

    def __init__(self, start: dict[str, torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self.start = start

    def on_fit_start(self) -> None:
        copy_full_state(self, self.start)


def copy_full_state(module: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Write whole tensors into a possibly sharded module: each rank copies its shards' slices."""
    with torch.no_grad():
        for key, target in module.state_dict().items():
            if key not in full:
                continue
            if hasattr(target, "local_shards"):
                for shard in target.local_shards():
                    index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                                 shard.metadata.shard_sizes))
                    shard.tensor.copy_(full[key][index])
            else:
                target.copy_(full[key])


def _module(start: dict | None = None, sparse_optimizer: str = "rowwise_adagrad",
            variant: str = "pooled") -> MultiTaskModule:
    kwargs = dict(model=MODELS[variant], schema=_schema(variant),
                  sparse_optimizer=SparseOptimizer(sparse_optimizer, lr=0.1))
    return _FromWeights(start, **kwargs) if start is not None else MultiTaskModule(**kwargs)


def _start_weights(variant: str = "pooled") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = _module(variant=variant)
    place_tables(module.model, module.sparse_optimizer, torch.device("cpu"))
    return {k: v.clone() for k, v in module.state_dict().items()}


def _trainer(accelerator: str = "cpu", **kwargs) -> L.Trainer:
    return L.Trainer(accelerator=accelerator, max_steps=STEPS, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     inference_mode=False, **kwargs)


def _global_batches(steps_total: int = STEPS, variant: str = "pooled") -> list[Batch]:
    return [_batch(step, ROWS * WORLD, variant) for step in range(steps_total)]


def _strategy(plan: str, out: Path) -> TorchRecStrategy:
    if plan == "pinned":
        (out / "pinned.json").write_text(json.dumps(PINNED))
        return TorchRecStrategy(plan=str(out / "pinned.json"))
    return TorchRecStrategy(constraints=PLANS[plan])


def _predict(module: MultiTaskModule, batch: Batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {task: logits.cpu() for task, logits in module(batch.to(module.device)).items()}


def _evict(module: MultiTaskModule, trainer: L.Trainer, rank: int, world: int, out: Path) -> None:
    """After training, one more training-mode lookup of ids never seen, each twice: the maps
    evict for them; the state is saved right after, before any update can touch the rows."""
    users = torch.arange(16).repeat_interleave(2) + 10**13
    mine = users.view(world, -1)[rank]
    module.train()
    module.model.features.managed_ids(KeyedJaggedTensor(keys=["user"], values=mine,
                                                        lengths=torch.ones(mine.numel(), dtype=torch.int64)))
    trainer.save_checkpoint(out / "evicted")


def _sharded_worker(rank: int, plan: str, optimizer: str, accelerator: str, start: dict, out: Path) -> None:
    """Trains with validation every 2 steps, so training and validation batches interleave."""
    variant = _variant(plan)
    module = _module(start, optimizer, variant)
    trainer = _trainer(accelerator, devices=WORLD, strategy=_strategy(plan, out), default_root_dir=out,
                       val_check_interval=2)
    val = [_slice(_batch(50 + i, ROWS * WORLD, variant), rank, WORLD) for i in range(2)]
    trainer.fit(module, datamodule=_Batches([_slice(b, rank, WORLD) for b in _global_batches(STEPS, variant)], val))
    trainer.save_checkpoint(out / "sharded")
    torch.save(_predict(module, _slice(_batch(99, ROWS * WORLD, variant), rank, WORLD)), out / f"logits-{rank}.pt")
    if variant == "managed":
        _evict(module, trainer, rank, WORLD, out)


def _unsharded(start: dict, optimizer: str, accelerator: str, out: Path, variant: str = "pooled") -> tuple[dict, dict]:
    module = _module(start, optimizer, variant)
    trainer = _trainer(accelerator, devices=1, default_root_dir=out, strategy=SingleProcessStrategy())
    trainer.fit(module, datamodule=_Batches(_global_batches(STEPS, variant)))
    # copied before predicting: a forward in training mode also updates a managed table's id -> row map
    state = {k: v.cpu().clone() for k, v in module.state_dict().items()}
    logits = _predict(module, _batch(99, ROWS * WORLD, variant))
    if variant == "managed":
        trainer.save_checkpoint(out / "trained-single")
        _evict(module, trainer, 0, 1, out / "single")
    return state, logits


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL tier needs 2 GPUs")
ON_DEVICES = ([pytest.param(*case, "cpu", id=f"cpu-{case[0]}-{case[1]}") for case in CASES]
              + [pytest.param(*case, "gpu", id=f"gpu-{case[0]}-{case[1]}", marks=two_gpus)
                 for case in CASES + GPU_ONLY])


@pytest.mark.parametrize(("plan", "optimizer", "accelerator"), ON_DEVICES)
def test_sharded_training_equals_one_process(plan, optimizer, accelerator, tmp_path):
    """The same test on CPU (gloo) and on GPUs (NCCL, where row-wise layouts exist too). The
    ``sequences`` case is DUPN, whose unpooled tables are an EmbeddingCollection: sharded and
    fused there, stepped by a torch optimizer of the same rule in one CPU process; the ``fwfm``
    case is NFwFM on the same tables, its multi-hot fields' elements paired through r_FF."""
    variant = _variant(plan)
    sequences = variant in ("sequences", "fwfm")
    start = _start_weights(variant)
    run_ranks(WORLD, _sharded_worker, plan, optimizer, accelerator, start, tmp_path)
    expected_state, expected_logits = _unsharded(start, optimizer, accelerator, tmp_path, variant)

    saved = read_full(tmp_path / "sharded")["model"]
    for key, value in expected_state.items():
        torch.testing.assert_close(saved[key], value, **TOLERANCE, msg=f"{plan}: {key}")
    moved = [k for k in start if not torch.allclose(start[k], expected_state[k])]
    assert any("embedding_bags" in k for k in moved) and any("towers" in k for k in moved), \
        "the run must update both tables and dense layers for the comparison to mean anything"
    assert not sequences or {"model.features.sequence_embeddings.embeddings.hist_item.weight",
                             "model.features.sequence_embeddings.embeddings.hist_type.weight"} <= set(moved)
    assert variant != "fwfm" or "model.fwfm.same_field_weights" in moved, "r_FF trains, so the comparison covers it"
    if variant == "managed":
        users = torch.cat([b.sparse["user"].values() for b in _global_batches(STEPS, variant)]).unique()
        assert users.numel() > 23 and int((expected_state[MANAGED_MAP] < 2**63 - 1).sum()) == 23, \
            f"more raw ids ({users.numel()}) than rows (23): the maps had to choose"
    logits = [torch.load(tmp_path / f"logits-{rank}.pt") for rank in range(WORLD)]
    for task, value in expected_logits.items():
        torch.testing.assert_close(torch.cat([part[task] for part in logits]), value, **TOLERANCE, msg=task)
    if variant == "managed":  # a last training-mode lookup of new ids evicted: each path resets the same rows
        _assert_evicted_rows_start_afresh(tmp_path / "trained-single", tmp_path / "single" / "evicted")
        _assert_evicted_rows_start_afresh(tmp_path / "sharded", tmp_path / "evicted")
        expected_state = read_full(tmp_path / "single" / "evicted")["model"]
        saved = read_full(tmp_path / "evicted")["model"]
        for key, value in expected_state.items():
            torch.testing.assert_close(saved[key], value, **TOLERANCE, msg=f"{plan}, evicted: {key}")


def _assert_evicted_rows_start_afresh(trained: Path, evicted: Path) -> None:
    """The rows whose id the map replaced (read from the two maps) hold zeros, the reset value, in
    the weights and in every optimizer state of the table (fused, or a replicated table's torch
    optimizer's); every other row is as training left it."""
    def flat(path):
        state = read_full(path)
        return {f"model/{k}": v for k, v in state["model"].items()} | dict(_leaves(
            {part: state[part]["state"] for part in ("sparse_optimizer", "replicated_optimizer") if state.get(part)}))
    before, after = flat(trained), flat(evicted)
    row_map = MANAGED_MAP.replace("sorted_raw_ids", "remapped_ids_mapping")
    holders = [{int(row): int(raw) for raw, row in zip(state[f"model/{MANAGED_MAP}"], state[f"model/{row_map}"])}
               for state in (before, after)]
    rows = torch.tensor([row for row, raw in holders[0].items() if raw < 2**63 - 1 and holders[1][row] != raw])
    assert rows.numel() >= 8, f"the new ids evicted trained ids ({rows.tolist()})"
    keys = [k for k, v in before.items() if "embedding_bags.user.weight" in k and v.dim()]  # not a step count
    assert len(keys) == 2, f"the user table's weights and optimizer state: {keys}"
    others = torch.ones(24, dtype=torch.bool).index_fill(0, rows, False)
    for key in keys:
        assert before[key][rows].any(), f"{key}: the evicted ids had trained their rows"
        assert not after[key][rows].any(), f"{key}: evicted rows {rows.tolist()} are not reset"
        assert torch.equal(after[key][others], before[key][others]), f"{key}: a row that kept its id changed"


def _leaves(tree: dict, prefix: str = ""):
    """``(path/to/leaf, tensor)`` of a nested state dict."""
    for key, value in tree.items():
        yield from _leaves(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]


def test_each_shard_zeroes_the_evicted_rows_it_holds():
    """``zero_rows`` on shards laid out as TorchRec lays them out, for a table of 4 rows whose rows 1
    and 3 were evicted: a column-wise weight (columns 0-2 and 3-5, every row in each), its row-wise
    Adagrad state (one accumulator per row of each column shard, stacked: entries 4-7 are rows 0-3
    again; ``[48]`` for the 24-row ``managed`` table above), and row-wise shards of rows 0-1 and 2-3.
    (One process holds every shard here: a ShardedTensor must cover its whole size.)"""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    from lightning_mtr.training.distributed.base import zero_rows

    def sharded(pieces, *size):
        return ShardedTensor._init_from_local_shards(
            [Shard(value, ShardMetadata(offsets, list(value.shape), "rank:0/cpu")) for offsets, value in pieces], *size)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        columns = sharded([([0, 0], torch.ones(4, 3)), ([0, 3], torch.ones(4, 3))], 4, 6)
        accumulators = sharded([([0], torch.ones(4)), ([4], torch.ones(4))], 8)
        row_wise = sharded([([0, 0], torch.ones(2, 6)), ([2, 0], torch.ones(2, 6))], 4, 6)
        for tensor in (columns, accumulators, row_wise):
            zero_rows(tensor, torch.tensor([1, 3]), 4)
        kept = torch.tensor([1.0, 0.0, 1.0, 0.0])
        assert all(torch.equal(s.tensor, kept[:, None].expand(4, 3)) for s in columns.local_shards())
        assert all(torch.equal(s.tensor, kept) for s in accumulators.local_shards())
        assert all(torch.equal(s.tensor, torch.tensor([[1.0] * 6, [0.0] * 6])) for s in row_wise.local_shards())
    finally:
        dist.destroy_process_group()


def test_sequence_tables_are_not_replicated_on_cpu():
    """TorchRec's CPU path fails on a data-parallel EmbeddingCollection table: the planner is kept
    from choosing it, and asking for it is refused by name."""
    from lightning_mtr.training.distributed.sharding import prepare_for_sharding
    from lightning_mtr.training.distributed.planning import Cluster, plan_model

    with torch.device("meta"):
        model = MODELS["sequences"](_schema("sequences"))
    prepare_for_sharding(model, SparseOptimizer())
    plan, _ = plan_model(model, Cluster(world_size=2, local_world_size=2, device="cpu"), batch_size=16)
    sequences = plan.plan["features.sequence_embeddings"]
    assert set(sequences) == {"hist_item", "hist_type"}
    assert all(p.sharding_type != "data_parallel" for p in sequences.values())
    with pytest.raises(ValueError, match="'hist_type'.*cannot be data_parallel on cpu"):
        plan_model(model, Cluster(world_size=2, local_world_size=2, device="cpu"), batch_size=16,
                   constraints={"hist_type": TableConstraints(sharding_types=("data_parallel",))})


@pytest.mark.parametrize("plan", [p for p, _ in GPU_ONLY])
def test_a_layout_the_device_lacks_is_refused_by_table(plan):
    from lightning_mtr.training.distributed.sharding import prepare_for_sharding
    from lightning_mtr.training.distributed.planning import Cluster, plan_model

    with torch.device("meta"):
        model = MMoE(_schema(), num_experts=2, expert=[8], tower=[4])
    prepare_for_sharding(model, SparseOptimizer())
    constraints = {name: TableConstraints(**c) for name, c in PLANS[plan].items()}
    with pytest.raises(ValueError, match=r"table 'user'.*not available on cpu"):
        plan_model(model, Cluster(world_size=2, local_world_size=2, device="cpu"), ROWS, constraints)


class _FromStep(_Batches):
    """Hands out the global batches from the trainer's step on, so a resumed run continues
    with the batch the uninterrupted run took next (the data module's own position is tested
    in test_training.py)."""

    def __init__(self, batches: list[Batch], rank: int, world: int):
        super().__init__(batches)
        self.rank, self.world = rank, world

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step
        return DataLoader([_slice(b, self.rank, self.world) for b in self.batches[start:]], batch_size=None)


def _train_and_save(rank: int, world: int, accelerator: str, start: dict, steps: int, out: Path,
                    resume: Path | None, single: bool = False, variant: str = "pooled") -> None:
    """``steps`` steps with TorchRecStrategy on ``world`` processes (or, ``single``, on the
    single-process path), optionally resumed; saves the checkpoint and each step's loss,
    averaged over ranks (equal rows per rank: the global loss)."""
    module = _module(None if resume else start, variant=variant)
    losses = LossRecorder()
    strategy = SingleProcessStrategy() if single else TorchRecStrategy(constraints=PLANS["table_wise"])
    trainer = L.Trainer(accelerator=accelerator, devices=world, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, default_root_dir=out, callbacks=[losses], strategy=strategy)
    trainer.fit(module, datamodule=_FromStep(_global_batches(steps, variant), rank, world),
                ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(out / f"after-{steps}")
    torch.save(losses.losses, out / f"losses-{world}-{rank}.pt")


def _world_losses(out: Path, world: int) -> dict[int, float]:
    per_rank = [torch.load(out / f"losses-{world}-{rank}.pt") for rank in range(world)]
    return {step: sum(r[step] for r in per_rank) / world for step in per_rank[0]}


def _train_one(rank: int, *args) -> None:
    _train_and_save(rank, 1, *args)


def _train_two(rank: int, *args) -> None:
    _train_and_save(rank, 2, *args)


@pytest.mark.parametrize(("saved_on", "resumed_on", "accelerator"), [
    (2, 1, "cpu"), (1, 2, "cpu"),
    pytest.param(2, 1, "gpu", marks=two_gpus), pytest.param(1, 2, "gpu", marks=two_gpus)])
def test_sharded_checkpoint_resumes_on_another_world_size(saved_on, resumed_on, accelerator, tmp_path):
    start = _start_weights()
    train = {1: _train_one, 2: _train_two}
    uninterrupted, interrupted, resumed = tmp_path / "uninterrupted", tmp_path / "interrupted", tmp_path / "resumed"
    run_ranks(saved_on, train[saved_on], accelerator, start, STEPS + 1, uninterrupted, None)
    run_ranks(saved_on, train[saved_on], accelerator, start, STEPS, interrupted, None)
    run_ranks(resumed_on, train[resumed_on], accelerator, start, STEPS + 1, resumed, interrupted / f"after-{STEPS}")

    expected = _world_losses(uninterrupted, saved_on)
    got = _world_losses(resumed, resumed_on)
    assert list(got) == [STEPS + 1], "the resumed run takes exactly the one remaining step"
    assert got[STEPS + 1] == pytest.approx(expected[STEPS + 1], rel=1e-5)
    assert expected[STEPS + 1] != pytest.approx(expected[1], rel=1e-3), "training must have moved the loss"
    final_expected = read_full(uninterrupted / f"after-{STEPS + 1}")["model"]
    final_got = read_full(resumed / f"after-{STEPS + 1}")["model"]
    for key, value in final_expected.items():
        torch.testing.assert_close(final_got[key], value, **TOLERANCE, msg=key)


def _train(where: int | str, start: dict, steps: int, out: Path, resume: Path | None, variant: str = "pooled") -> None:
    """On ``single`` (the fast path, in this process) or on that many TorchRec processes."""
    if where == "single":
        _train_and_save(0, 1, "cpu", start, steps, out, resume, True, variant)
    else:
        run_ranks(where, {1: _train_one, 2: _train_two}[where], "cpu", start, steps, out, resume, False, variant)


def _assert_same_checkpoints(expected: Path, got: Path) -> None:
    """Weights and every optimizer's state, key by key: both paths write one layout."""
    want, have = dict(_leaves(read_full(expected))), dict(_leaves(read_full(got)))
    assert set(have) == set(want)
    assert any("sparse_optimizer/" in k and "momentum1" in k for k in want), "the fused tables' state is compared"
    for key, value in want.items():
        torch.testing.assert_close(have[key], value, **TOLERANCE, msg=key)


def _resume_equals_uninterrupted(saved_on: int | str, resumed_on: int | str, out: Path, variant: str = "pooled"):
    start = _start_weights(variant)
    uninterrupted, interrupted, resumed = out / "uninterrupted", out / "interrupted", out / "resumed"
    _train(saved_on, start, STEPS + 1, uninterrupted, None, variant)
    _train(saved_on, start, STEPS, interrupted, None, variant)
    _train(resumed_on, start, STEPS + 1, resumed, interrupted / f"after-{STEPS}", variant)
    world = {"single": 1, 1: 1, 2: 2}
    expected, got = _world_losses(uninterrupted, world[saved_on]), _world_losses(resumed, world[resumed_on])
    assert list(got) == [STEPS + 1], "the resumed run takes exactly the one remaining step"
    assert got[STEPS + 1] == pytest.approx(expected[STEPS + 1], rel=1e-5)
    _assert_same_checkpoints(uninterrupted / f"after-{STEPS + 1}", resumed / f"after-{STEPS + 1}")


@pytest.mark.parametrize("variant", ["pooled", "sequences"])
def test_single_process_resume_equals_uninterrupted(variant, tmp_path):
    """The fast path's checkpoint keeps the fused tables' state, the dense optimizer's and, for
    DUPN's sequence tables (unfused on CPU), their torch optimizer's."""
    _resume_equals_uninterrupted("single", "single", tmp_path, variant)
    if variant == "sequences":
        saved = read_full(tmp_path / "resumed" / f"after-{STEPS + 1}")["replicated_optimizer"]["state"]
        assert {k.rsplit(".", 2)[-2] for k in saved} == {"hist_item", "hist_type"}


@pytest.mark.parametrize(("saved_on", "resumed_on", "variant"),
                         [("single", 2, "pooled"), (2, "single", "pooled"), (2, "single", "managed"),
                          ("single", 2, "weighted")])
def test_checkpoint_moves_between_the_single_process_path_and_two_processes(saved_on, resumed_on, variant, tmp_path):
    """``managed``: the id -> row map saved by 2 processes resumes on one, which then assigns rows as the
    2 processes would have; ``weighted``: the weighted collection's tables resume sharded."""
    _resume_equals_uninterrupted(saved_on, resumed_on, tmp_path, variant)


# TorchRecStrategy's directory as it was written before both paths shared one format: commit
# cfddff0's _train_one, 1 process, STEPS steps from the weights committed beside it (the start is
# fixed there, not drawn, so a later change of how tables are drawn leaves the comparison valid).
BEFORE_ONE_FORMAT = Path(__file__).parent / "golden" / "checkpoint-before-one-format"
BEFORE_ONE_FORMAT_START = Path(__file__).parent / "golden" / "checkpoint-before-one-format-start.pt"


def test_a_checkpoint_from_before_the_one_format_resumes_on_the_single_process_path(tmp_path):
    start = torch.load(BEFORE_ONE_FORMAT_START, weights_only=True)
    _train("single", start, STEPS + 1, tmp_path / "uninterrupted", None)
    _train("single", start, STEPS + 1, tmp_path / "resumed", BEFORE_ONE_FORMAT)
    expected, got = _world_losses(tmp_path / "uninterrupted", 1), _world_losses(tmp_path / "resumed", 1)
    assert list(got) == [STEPS + 1] and got[STEPS + 1] == pytest.approx(expected[STEPS + 1], rel=1e-5)
    _assert_same_checkpoints(*(tmp_path / run / f"after-{STEPS + 1}" for run in ("uninterrupted", "resumed")))


def test_single_process_sequence_tables_do_not_resume_on_two_cpu_processes(tmp_path):
    """One CPU process steps sequence tables with a torch optimizer (``data_parallel`` in its
    plan); TorchRec cannot replicate them on CPU, so 2 processes refuse, naming the table."""
    start = _start_weights("sequences")
    _train("single", start, 2, tmp_path, None, "sequences")
    with pytest.raises(Exception, match=r"(?s)resuming .*after-2, whose tables keep their saved sharding types: "
                                        r"table 'hist_item'.*cannot be data_parallel on cpu"):
        _train(2, start, 3, tmp_path / "resumed", tmp_path / "after-2", "sequences")


def _predict_from_file(rank: int, checkpoint: Path, out: Path) -> None:
    trainer = _trainer(devices=WORLD, strategy=TorchRecStrategy(constraints=PLANS["table_wise"]), default_root_dir=out)
    batch = _slice(_batch(99, ROWS * WORLD), rank, WORLD)
    (scores,) = trainer.predict(_module(), DataLoader([batch], batch_size=None), ckpt_path=str(checkpoint))
    torch.save(scores, out / f"scores-{rank}.pt")


def test_two_processes_predict_from_a_single_file(tmp_path):
    """A consolidated file (whole tables) loads into the shards of each process."""
    _train("single", _start_weights(), STEPS, tmp_path, None)
    single = tmp_path / "single.ckpt"
    torch.save(read_consolidated(tmp_path / f"after-{STEPS}"), single)
    trainer = _trainer(devices=1, strategy=SingleProcessStrategy(), default_root_dir=tmp_path)
    (expected,) = trainer.predict(_module(), DataLoader([_batch(99, ROWS * WORLD)], batch_size=None),
                                  ckpt_path=str(single))
    run_ranks(WORLD, _predict_from_file, single, tmp_path)
    parts = [torch.load(tmp_path / f"scores-{rank}.pt") for rank in range(WORLD)]
    for key, value in expected.items():
        torch.testing.assert_close(torch.cat([part[key] for part in parts]), value, **TOLERANCE, msg=key)
