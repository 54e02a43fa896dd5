"""Tables too large for the run's memory are refused before anything is allocated, on one
process and on two, with ``lightning-mtr plan``'s message (by how much, and what would fit)
and exit status 2: no allocator traceback, no process left waiting for a plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_schema
from lightning_mtr.cli import main
from lightning_mtr.embeddings.fusing import SparseOptimizer
from lightning_mtr.models import MMoE
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed.memory import TableMemory, TablesDoNotFit
from lightning_mtr.training.distributed.planning import GIB, Cluster

REPO = Path(__file__).resolve().parents[1]
HOST_GIB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
ROWS = ["--data.synthetic.train_rows", "4000", "--data.synthetic.val_rows", "2000",
        "--data.synthetic.test_rows", "2000"]


def _schema(tmp_path: Path, rows: int, dim: int) -> str:
    """The debug schema with its largest table (C26, 1e6 x 16) at ``rows`` x ``dim``: the synthetic
    log's ids still fit it, so only the table's size changes."""
    schema = yaml.safe_load((REPO / "conf" / "schemas" / "synthetic_impressions.yaml").read_text())
    (c26,) = [f for f in schema["sparse"] if f["name"] == "C26"]
    c26.update(num_embeddings=rows, embedding_dim=dim)
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    return str(path)


def _fit_args(tmp_path: Path, schema: str) -> list[str]:
    return ["--config", "conf/debug.yaml", "--data.schema", schema, "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
            "--data.synthetic.cache_dir", str(tmp_path / "cache"), *ROWS]


def _check_no_crash(err: str) -> None:
    assert "Traceback" not in err and "tried to allocate" not in err and "Connection closed" not in err, err[-3000:]


def test_the_estimate_is_weights_and_optimizer_state_by_hand():
    """rowwise_adagrad keeps one fp32 per row: user 50 x 4 and item 30 x 4 (item_last shares it)
    take 50 * (4 * 4 + 4) + 30 * (4 * 4 + 4) = 1600 bytes; with the planner's 15% reservation
    they fit in 2000 bytes (1700 usable), not in 1800 (1530)."""
    with torch.device("meta"):
        model = MMoE(tiny_schema(), num_experts=2, expert=[8], tower=[4])
    memory = TableMemory(model, Cluster(1, 1, "cpu", ddr_gb=2000 / GIB), SparseOptimizer("rowwise_adagrad"), {}, 8)
    assert memory.table_bytes() == {"user": 1000, "item": 600}
    memory.check()
    memory.cluster = Cluster(1, 1, "cpu", ddr_gb=1800 / GIB)
    with pytest.raises(TablesDoNotFit, match=r"the tables do not fit: 0.0 GiB of tables and rowwise_adagrad state"):
        memory.check()


def test_a_managed_tables_map_is_counted_on_every_rank():
    """With managed collisions, user's 50 rows also need TorchRec's map on each of the 2 ranks:
    distance-LFU (the default) keeps 4 int64 per row (raw id, row, count, last step seen) plus 1025
    int64 of output segments and three scalars (step, free-slot count, the empty-slot marker):
    2 * (50 * 4 * 8 + 1025 * 8 + 3 * 8) = 19648 bytes more than the table's 1000."""
    schema = Schema.from_dict({
        "sparse": [{"name": "user", "num_embeddings": 50, "embedding_dim": 4, "managed_collisions": {}},
                   {"name": "item", "num_embeddings": 30, "embedding_dim": 4}],
        "tasks": [{"name": "ctr", "label": "ctr"}]})
    with torch.device("meta"):
        model = MMoE(schema, num_experts=2, expert=[8], tower=[4])
    memory = TableMemory(model, Cluster(2, 2, "cpu", ddr_gb=1.0), SparseOptimizer("rowwise_adagrad"), {}, 8)
    assert memory.table_bytes() == {"user": 1000 + 19648, "item": 600}


def test_one_process_refuses_a_table_larger_than_the_host_with_the_plans_message(tmp_path, monkeypatch, capsys):
    """2e9 x 128 (961 GiB with its state) on CPU: the host's memory is the cap, as for `plan`
    given the same memory; before, fbgemm tried to allocate 1 TB and failed with a traceback."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    schema = _schema(tmp_path, 2_000_000_000, 128)
    assert main(["fit", *_fit_args(tmp_path, schema)]) == 2
    err = capsys.readouterr().err
    _check_no_crash(err)
    message = err[err.index("lightning-mtr: error: "):].removeprefix("lightning-mtr: error: ")
    assert message.startswith("the tables do not fit: 961.2 GiB of tables and rowwise_adagrad state vs")
    assert f"(1 x {HOST_GIB:.4g} GiB;" in message and "What would fit:" in message

    plan = ["plan", "--config", "conf/debug.yaml", "--data.schema", schema, "--world-size", "1", "--device", "cpu",
            "--ddr-gb", repr(HOST_GIB), "--out", str(tmp_path / "plan")]
    assert main(plan) == 2
    assert capsys.readouterr().err.removeprefix("lightning-mtr plan: ") == message  # one check, one message


@pytest.mark.parametrize(("rows", "dim", "extra", "expected"), [
    # 961 GiB against this host's memory: every rank refuses it before planning
    (2_000_000_000, 128, [], "the tables do not fit: 961.2 GiB"),
    # 0.7 GiB (C26: 0.6) fits 2 x 0.5 GiB in total, but not on one rank, and table_wise may not split it: the
    # planner fails on rank 0, and rank 1, waiting for the plan, receives the failure
    (1_250_000, 128, ["--trainer.strategy.init_args.ddr_gb", "1",
                      "--trainer.strategy.init_args.constraints", "{C26: {sharding_types: [table_wise]}}"],
     "no plan (strict_constraints) though the bytes fit: 0.7 GiB"),
])
def test_two_processes_stop_with_the_plans_message(tmp_path, rows, dim, extra, expected):
    command = [sys.executable, "-m", "lightning_mtr.cli", "fit", *_fit_args(tmp_path, _schema(tmp_path, rows, dim)),
               "--config", "conf/trainer/cpu_2proc.yaml", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    _check_no_crash(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("lightning-mtr: error: ") == 1  # rank 0 says it; every rank stops
    assert f"lightning-mtr: error: {expected}" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_table_that_fits_still_trains(tmp_path, monkeypatch):
    """The same check passes the debug config's tables (55 MiB with their state) on this host."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    schema = _schema(tmp_path, 1_000_000, 16)
    assert main(["fit", *_fit_args(tmp_path, schema), "--trainer.max_steps", "2", "--trainer.limit_val_batches",
                 "1"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_dir()
