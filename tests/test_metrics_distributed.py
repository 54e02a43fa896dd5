"""Masked per-task metrics in 2 gloo processes equal the single-process values."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port, hand_logloss

from lightning_mtr.metrics import MaskedTaskMetrics
from lightning_mtr.schema import Task

# per-group metrics (GAUC, NDCG) and multiclass ones keep rows: their groups straddle the processes
TASKS = [Task("ctr", "click", gauc_by="user"), Task("cvr", "conversion"), Task("watch", "watch", kind="regression"),
         Task("rank", "relevance", kind="ranking", group="request"),
         Task("level", "level", kind="multiclass", num_classes=5)]  # class 3 on rank 0 only, class 4 nowhere


def _data(seed: int = 0, rows: int = 400):
    generator = torch.Generator().manual_seed(seed)
    logits = {task.name: torch.randn(rows, generator=generator) for task in TASKS}
    logits["level"] = torch.randn(rows, 5, generator=generator)
    labels = {name: (torch.rand(rows, generator=generator) < 0.3).float() for name in ("ctr", "cvr")}
    labels["watch"] = torch.randn(rows, generator=generator)
    labels["rank"] = torch.randint(0, 3, (rows,), generator=generator).float()
    labels["level"] = torch.randint(0, 3, (rows,), generator=generator).float()
    labels["level"][:20] = 3.0  # defined only once both processes' class counts are summed
    masks = {"ctr": torch.ones(rows, dtype=torch.bool), "cvr": labels["ctr"].bool(),
             "watch": torch.rand(rows, generator=generator) < 0.5, "rank": torch.ones(rows, dtype=torch.bool),
             "level": torch.ones(rows, dtype=torch.bool)}
    groups = {"user": torch.randint(0, 30, (rows,), generator=generator), "request": torch.arange(rows) // 7}
    return logits, labels, masks, groups


def _shard(tensors: dict, rank: int) -> dict:
    """Rank 0 takes the first half; rank 1 the second half, but no cvr rows at all (empty space)."""
    rows = next(iter(tensors.values())).shape[0]
    half = slice(0, rows // 2) if rank == 0 else slice(rows // 2, rows)
    return {k: v[half] for k, v in tensors.items()}


def _worker(rank: int, port: int, auc: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, labels, masks, groups = _data()
    masks = dict(masks)
    if rank == 1:
        masks["cvr"] = torch.zeros_like(masks["cvr"])
    metrics = MaskedTaskMetrics(TASKS, prefix="val", auc=auc)
    shard = lambda d: _shard(d, rank)  # noqa: E731
    for start in range(0, 200, 50):  # a few batches per process
        part = lambda d: {k: v[start:start + 50] for k, v in shard(d).items()}  # noqa: E731
        metrics.update(part(logits), part(labels), part(masks), part(groups))
    results[rank] = {k: float(v) for k, v in metrics.compute().items()}
    dist.destroy_process_group()


@pytest.mark.parametrize("auc", ["exact", "binned"])
def test_two_processes_match_one(auc):
    logits, labels, masks, groups = _data()
    rows = next(iter(masks.values())).shape[0]
    masks_used = dict(masks)
    masks_used["cvr"] = masks["cvr"].clone()
    masks_used["cvr"][rows // 2:] = False  # what rank 1 contributes to cvr: nothing
    single = MaskedTaskMetrics(TASKS, prefix="val", auc=auc)
    single.update(logits, labels, masks_used, groups)
    expected = {k: float(v) for k, v in single.compute().items()}

    results = mp.Manager().dict()
    context = mp.spawn(_worker, args=(free_port(), auc, results), nprocs=2, join=False)
    for process in context.processes:
        process.join(timeout=120)
    assert all(not p.is_alive() for p in context.processes), "metric sync deadlocked"
    assert all(p.exitcode == 0 for p in context.processes)
    for rank in (0, 1):
        assert results[rank].keys() == expected.keys()
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (rank, key)
    assert expected["val/cvr/rows"] == float(masks_used["cvr"].sum())
    for task in ("ctr", "cvr"):  # and the gathered log loss is the by-hand mean over every used row
        mask = masks_used[task].numpy()
        assert results[0][f"val/{task}/logloss"] == pytest.approx(
            hand_logloss(logits[task].numpy()[mask], labels[task].numpy()[mask]), rel=1e-6)
