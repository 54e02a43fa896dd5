"""``lightning-mtr daily``: one checkpoint and one table row per day, each day after the first
warm-started from the day before, and a run killed mid-day resumed without retraining the days
already done."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_mtr.cli import main
from lightning_mtr.data.synthetic.days import DaySpec, write_days
from lightning_mtr.training.distributed.checkpoint import read_full
from test_days import REPO, tiny_config


@pytest.fixture
def setup(tmp_path) -> tuple[Path, Path]:
    """(config, output folder) over three 64-row days, 2026-11-25..2026-11-27."""
    root = tmp_path / "logs"
    write_days(root, days=3, rows_per_day=64, seed=1, spec=DaySpec(users=50, items=20))
    return tiny_config(tmp_path, root), tmp_path / "daily"


def _daily(config: Path, out: Path, first: str, last: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lightning_mtr.cli", "daily", "--config", str(config), "--from", first,
               "--to", last, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def _mtime(out: Path, day: str) -> int:
    return (out / f"dt={day}" / "checkpoints" / "last.ckpt" / "trainer.pt").stat().st_mtime_ns


def test_daily_resumes_after_a_kill_without_retraining_finished_days(setup):
    config, out = setup
    first = _daily(config, out, "2026-11-25", "2026-11-26")
    deadline = time.monotonic() + 240
    while not (out / "dt=2026-11-26" / "fit.log").exists():  # day 1 done, day 2's fit started
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-3000:]
    assert "2026-11-26: fit ended" in err and "run the same command again to resume" in err
    assert not (out / "dt=2026-11-26" / "day.json").exists()
    day_one = _mtime(out, "2026-11-25")

    printed = _finish(_daily(config, out, "2026-11-25", "2026-11-26"))
    assert _mtime(out, "2026-11-25") == day_one, "a finished day is not trained again"
    assert (out / "dt=2026-11-25" / "fit.log").read_text().count("$ fit") == 1
    assert (out / "dt=2026-11-25" / "test.log").read_text().count("$ test") == 1, "nor tested again"
    for day in ("2026-11-25", "2026-11-26"):
        assert [p.name for p in (out / f"dt={day}" / "checkpoints").iterdir()] in (["last.ckpt"],
                                                                                   ["last.ckpt", "preempted.ckpt"])
    with (out / "daily.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["day"], r["tested_on"]) for r in rows] == [("2026-11-25", "2026-11-26"), ("2026-11-26", "2026-11-27")]
    for row in rows:
        assert {"ctr_auc", "cvr_auc", "ctcvr_auc"} <= set(row)
        assert all(0.0 <= float(row[f"{t}_auc"]) <= 1.0 for t in ("ctr", "cvr", "ctcvr"))
    assert rows[0]["start"] == "cold" and rows[1]["start"] == "warm"
    assert "2026-11-26  warm" in printed
    assert (out / "daily.png").stat().st_size > 0
    warm = json.loads((out / "dt=2026-11-26" / "day.json").read_text())["start"]
    assert warm == f"warm from {out / 'dt=2026-11-25' / 'checkpoints' / 'last.ckpt'}"


def test_a_warm_day_starts_from_the_previous_days_weights(setup):
    """Day 2 trained with zero learning rates keeps exactly day 1's weights: it started from them
    (a cold start would keep the seeded initial weights, which day 1's training moved)."""
    config, out = setup
    _finish(_daily(config, out, "2026-11-25", "2026-11-25"))
    frozen = ["--model.dense_optimizer", "torch.optim.SGD", "--model.dense_optimizer.lr", "0",
              "--model.sparse_optimizer.lr", "0"]
    _finish(_daily(config, out, "2026-11-26", "2026-11-26", *frozen))
    before, after = (read_full(out / f"dt={day}" / "checkpoints" / "last.ckpt", keys={"model"})["model"]
                     for day in ("2026-11-25", "2026-11-26"))
    assert before.keys() == after.keys() and len(before) > 4
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    cold = read_full(out / "dt=2026-11-25" / "checkpoints" / "last.ckpt", keys={"model"})["model"]
    assert any(name.endswith("weight") for name in cold)


@pytest.mark.parametrize(("args", "expected"), [
    (["--from", "2026-11-26", "--to", "2026-11-29"],
     "daily: {root} has no partition for 2026-11-28..2026-11-29 (2 days); it has 2026-11-25..2026-11-27 (3 days)"),
    (["--from", "2026-11-26", "--to", "2026-11-25"], "the range 2026-11-26..2026-11-25 ends before it starts"),
    (["--from", "2026-11-26", "--to", "2026-11-26", "--data.train", "{file}"], "is not a directory of dt=YYYY-MM-DD"),
])
def test_daily_refuses_days_the_data_lacks_in_one_line(setup, capsys, monkeypatch, args, expected):
    config, out = setup
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    root = config.parent / "logs"
    file = str(next(root.glob("dt=*/*.parquet")))
    code = main(["daily", "--config", str(config), "--out", str(out), *(a.format(file=file) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert expected.format(root=root) in err[0]
    assert not out.exists(), "nothing trained"
