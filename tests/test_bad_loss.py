"""A NaN or inf loss or gradient (issue 13): the batch changes nothing, the message names the task
and the batch's file and rows, and ``model.bad_loss`` skips (counted, up to ``max_skips``) or
stops, on one process and on two, where only one rank's batch is bad."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_ranks
from test_sharded_training import (
    PLANS, ROWS, TOLERANCE, WORLD, _batch, _Batches, _module, _slice, _start_weights)

from lightning_mtr.cli import main
from lightning_mtr.data.batch import Batch, RowSource
from lightning_mtr.data.encode import BatchEncoder
from lightning_mtr.data.reader import BatchStream, list_files, plan_units
from lightning_mtr.schema import Schema
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.bad_loss import BadLossPolicy, NonFiniteLoss, first_bad_gradient
from lightning_mtr.training.distributed import SingleProcessStrategy, TorchRecStrategy
from lightning_mtr.training.distributed.checkpoint import load_trainer_state, read_full

REPO = Path(__file__).resolve().parents[1]
BAD_SOURCE = RowSource("logs/dt=2026-11-28/part-3.parquet", 4096, 4127, 32)


# ---- the batch knows its rows ------------------------------------------------------------------

def test_batches_name_the_file_and_rows_of_their_first_row(tmp_path):
    """Oracle: each file holds its own index and row number as columns, read as extras."""
    schema = Schema.from_dict({"sparse": [{"name": "user", "num_embeddings": 100, "embedding_dim": 4}],
                               "dense": [], "tasks": [{"name": "ctr", "label": "click"}]})
    paths = []
    for index, rows in enumerate((23, 31, 9)):
        table = pa.table({"file": np.full(rows, index, np.int64), "row": np.arange(rows, dtype=np.int64),
                          "user": np.arange(rows) % 100, "click": np.arange(rows) % 2})
        if index == 1:  # a CSV file: one unit, sliced between readers
            pa_csv.write_csv(table, tmp_path / "b.csv")
            paths.append(str(tmp_path / "b.csv"))
        else:  # row groups of 5: the row numbers continue across groups
            pq.write_table(table, tmp_path / f"{'ac'[index // 2]}.parquet", row_group_size=5)
            paths.append(str(tmp_path / f"{'ac'[index // 2]}.parquet"))
    encoder = BatchEncoder(schema, extras=["file", "row"])
    units = plan_units(list_files(tmp_path), encoder)
    seen = 0
    for rank in range(2):
        for batch in BatchStream(units, encoder, batch_size=6, shuffle_buffer=12, seed=3, rank=rank, world_size=2):
            files, rows = batch.extras["file"].numpy(), batch.extras["row"].numpy()
            mine = files == files[0]
            assert batch.source == RowSource(paths[int(files[0])], int(rows[mine].min()), int(rows[mine].max()),
                                             int(mine.sum()), int((~mine).sum()))
            seen += batch.batch_size
    assert seen == 23 + 31 + 9
    assert str(BAD_SOURCE) == "logs/dt=2026-11-28/part-3.parquet rows 4096-4127"
    assert str(RowSource("a.parquet", 3, 9, 5, 4)) == \
        "a.parquet 5 rows between rows 3 and 9 (+4 rows from other files)"


# ---- one process -------------------------------------------------------------------------------

def _poisoned(batch: Batch, kind: str) -> Batch:
    """A batch whose loss is NaN: a NaN dense feature (every task) or a NaN cvr label (cvr only)."""
    if kind == "dense":
        batch.dense[3, 1] = float("nan")
    else:
        batch.labels["cvr"][5] = float("nan")
    batch.source = BAD_SOURCE
    return batch


def _fit(batches: list[Batch], start: dict, policy: BadLossPolicy, strategy=None, **trainer) -> MultiTaskModule:
    module = _module(start)
    module.bad_batches.policy = policy
    L.Trainer(accelerator="cpu", devices=trainer.pop("devices", 1), max_epochs=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, inference_mode=False, strategy=strategy or SingleProcessStrategy(),
              **trainer).fit(module, datamodule=_Batches(batches))
    return module


def _state(module: MultiTaskModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["dense", "cvr_label"])
def test_skip_leaves_tables_dense_weights_and_optimizers_as_without_the_batch(kind):
    start = _start_weights()
    good = [_batch(seed, ROWS) for seed in range(3)]
    bad = _poisoned(_batch(7, ROWS), kind)
    skipped = _fit([good[0], bad, good[1], good[2]], start, BadLossPolicy("skip", max_skips=1))
    without = _fit(good, start, BadLossPolicy("skip", max_skips=1))
    assert skipped.bad_batches.skipped == 1 and without.bad_batches.skipped == 0
    assert float(skipped.trainer.logged_metrics["train/skipped_batches"]) == 1.0
    after = _state(without)
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert any("embedding_bags" in k for k in moved) and any("towers" in k for k in moved), \
        "the good batches train tables and dense layers, so an equal state means the bad one changed nothing"
    for key, value in _state(skipped).items():
        assert torch.equal(value, after[key]), key
    adam = [skipped.optimizers().optimizer, without.optimizers().optimizer]
    steps = [[float(s["step"]) for s in o.state.values()] for o in adam]
    assert steps[0] and steps[0] == steps[1] == [3.0] * len(steps[0]), "Adam took the 3 good steps only"


@pytest.mark.parametrize(("kind", "task"), [("dense", "ctr"), ("cvr_label", "cvr")])
def test_stop_names_the_task_file_and_rows_before_anything_changes(kind, task):
    with pytest.raises(NonFiniteLoss, match=rf"non-finite loss of '{task}' = nan on batch from "
                       r"logs/dt=2026-11-28/part-3\.parquet rows 4096-4127; stopped \(bad_loss\.policy: stop\)"):
        _fit([_poisoned(_batch(7, ROWS), kind)], _start_weights(), BadLossPolicy("stop"))


def test_skip_stops_after_max_skips():
    start = _start_weights()
    batches = [_batch(0, ROWS), _poisoned(_batch(7, ROWS), "dense"), _batch(1, ROWS),
               _poisoned(_batch(8, ROWS), "cvr_label"), _poisoned(_batch(9, ROWS), "cvr_label")]
    with pytest.raises(NonFiniteLoss, match=r"'cvr'.*stopped after 2 skipped batches \(bad_loss.max_skips: 2\)"):
        _fit(batches, start, BadLossPolicy("skip", max_skips=2))


class _InfGradient(L.Callback):
    """A finite loss with a non-finite dense gradient (after backward, before any optimizer step)."""

    def on_after_backward(self, trainer, module) -> None:
        next(module.model.towers.parameters()).grad[0, 0] = float("inf")


def test_a_non_finite_dense_gradient_skips_the_dense_step_or_stops():
    start = _start_weights()
    module = _fit([_batch(0, ROWS)], start, BadLossPolicy("skip"), callbacks=[_InfGradient()])
    assert module.bad_batches.skipped == 1
    dense = [k for k in start if "embedding_bags" not in k]
    assert dense and all(torch.equal(module.state_dict()[k], start[k]) for k in dense)
    assert not module.optimizers().optimizer.state, "Adam took no step"
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient of 'model\.towers\..*' with a finite loss, batch "
                       r"from logs/.*part-3\.parquet rows 4096-4127 \(fused tables were already updated"):
        batch = _batch(0, ROWS)
        batch.source = BAD_SOURCE
        _fit([batch], start, BadLossPolicy("stop"), callbacks=[_InfGradient()])


def test_gradient_check_finds_nan_and_inf_but_not_a_large_finite_gradient():
    def named(*grads):
        params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        return [(f"p{i}", p) for i, p in enumerate(params)]

    big = 3e38  # two of them sum past float32's largest value, 3.4e38: the fast sum is inf
    assert first_bad_gradient(named([1.0, 2.0], [big, big])) is None
    assert first_bad_gradient(named([1.0, 2.0], [big, big], [0.0, float("nan")])) == "p2"
    assert first_bad_gradient(named([float("-inf"), 2.0], [0.0, float("nan")])) == "p0"


def test_policy_is_checked():
    with pytest.raises(ValueError, match="bad_loss.policy must be 'skip' or 'stop', got 'ignore'"):
        BadLossPolicy("ignore")
    with pytest.raises(ValueError, match="max_skips must be >= 0"):
        BadLossPolicy("skip", max_skips=-1)


class PoisonLabels(L.Callback):
    """Makes one task's labels NaN at one global step (a batch the reader would refuse)."""

    def __init__(self, step: int, task: str = "ctr"):
        self.step, self.task = step, task

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch.labels[self.task][:] = float("nan")


def test_cli_stop_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """6000 rows in batches of 512: 12 steps an epoch (the last one short); epoch 1 ends in
    last.ckpt at step 12, the batch of step 14 is bad."""
    monkeypatch.chdir(REPO)
    status = main(["fit", "--config", "conf/debug.yaml", "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.logger", "false", "--data.synthetic.cache_dir", str(tmp_path / "cache"),
                   "--data.synthetic.train_rows", "6000", "--data.synthetic.val_rows", "1000",
                   "--data.synthetic.test_rows", "1000", "--data.batch_size", "512", "--trainer.max_epochs", "2",
                   "--trainer.callbacks+", "test_bad_loss.PoisonLabels", "--trainer.callbacks.step", "14"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightning-mtr: error:")]
    assert status == 3 and len(errors) == 1 and "Traceback" not in err, err
    error = errors[0]
    assert error.startswith("lightning-mtr: error: non-finite loss of 'ctr' = nan on batch from ")
    assert re.search(r"/train\.parquet 512 rows between rows \d+ and \d+;", error)
    assert error.endswith("the last checkpoint is the last good state")
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints, checkpoints  # the best and last of epoch 1
    assert load_trainer_state(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert read_full(tmp_path / "checkpoints" / "last.ckpt")["model"], "the checkpoint still loads"


# ---- two processes ------------------------------------------------------------------------------

def _two_rank_worker(rank: int, policy: str, start: dict, out: Path) -> None:
    """Only rank 1's second batch is bad: both ranks must skip it (or TorchRec's all-to-all waits)
    or both stop (each writes its message: a rank left waiting would write none)."""
    batches = [_slice(_batch(seed, ROWS * WORLD), rank, WORLD) for seed in range(4)]
    if rank == 1:
        batches[1] = _poisoned(batches[1], "dense")
    try:
        module = _fit(batches, start, BadLossPolicy(policy, max_skips=1), devices=WORLD,
                      strategy=TorchRecStrategy(constraints=PLANS["table_wise"]), default_root_dir=out)
    except NonFiniteLoss as error:
        (out / f"stopped-{rank}.txt").write_text(str(error))
        return
    module.trainer.save_checkpoint(out / "sharded")
    torch.save(module.bad_batches.skipped, out / f"skipped-{rank}.pt")


@pytest.mark.multiprocess
def test_two_processes_both_skip_when_one_rank_has_a_bad_batch(tmp_path):
    start = _start_weights()
    run_ranks(WORLD, _two_rank_worker, "skip", start, tmp_path)
    assert [torch.load(tmp_path / f"skipped-{rank}.pt") for rank in range(WORLD)] == [1, 1]
    assert load_trainer_state(tmp_path / "sharded")["skipped_batches"] == 1, "a resumed run counts on"
    without = _fit([_batch(seed, ROWS * WORLD) for seed in (0, 2, 3)], start, BadLossPolicy("skip"))
    saved = read_full(tmp_path / "sharded")["model"]
    for key, value in _state(without).items():
        torch.testing.assert_close(saved[key], value, **TOLERANCE, msg=key)


@pytest.mark.multiprocess
def test_two_processes_both_stop_and_name_the_bad_rank(tmp_path):
    run_ranks(WORLD, _two_rank_worker, "stop", _start_weights(), tmp_path)
    messages = [(tmp_path / f"stopped-{rank}.txt").read_text() for rank in range(WORLD)]
    assert messages[1].startswith(f"non-finite loss of 'ctr' = nan on rank 1's batch from {BAD_SOURCE};")
    assert messages[0].startswith("non-finite loss of 'ctr' on rank 1's batch (that rank's log names its file")
    assert not (tmp_path / "sharded").exists()
