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
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mtr.cli import main
from lightning_mtr.data.synthetic.days import DaySpec, write_days
from lightning_mtr.training.daily import _split_warm_options, _step
from lightning_mtr.training.distributed.checkpoint import read_full
from lightning_mtr.training.preemption import PREEMPTED_EXIT
from test_days import REPO, tiny_config


def _setup(tmp_path: Path, rows_per_day: int) -> tuple[Path, Path]:
    """(config, output folder) over three days, 2026-11-25..2026-11-27."""
    root = tmp_path / "logs"
    write_days(root, days=3, rows_per_day=rows_per_day, seed=1, spec=DaySpec(users=50, items=20))
    return tiny_config(tmp_path, root), tmp_path / "daily"


@pytest.fixture
def setup(tmp_path) -> tuple[Path, Path]:
    return _setup(tmp_path, rows_per_day=64)


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


def _children(pid: int) -> list[int]:
    """(Linux) the processes ``pid`` started."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_daily_resumes_after_a_kill_without_retraining_finished_days(tmp_path, kill):
    """Killed while day 2 trains (31 steps of 32 rows, a checkpoint after each), by SIGTERM
    (passed on to the step: exit 75) or SIGKILL (the step gets SIGTERM), then run again: day 1 is
    neither trained nor tested again, day 2 goes on from the step's preempted.ckpt."""
    config, out = _setup(tmp_path, rows_per_day=1000)
    every_step = ("--save_every_n_steps", "1")
    first = _daily(config, out, "2026-11-25", "2026-11-26", *every_step)
    day_two = out / "dt=2026-11-26"
    deadline = time.monotonic() + 240
    while not (day_two / "checkpoints" / "last.ckpt").exists():  # day 2 is training
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.02)
    [step] = _children(first.pid)
    first.send_signal(kill)
    _, err = first.communicate(timeout=120)
    while not _gone(step):  # the step stops too, whichever signal ended daily
        assert time.monotonic() < deadline, "the fit step outlived daily"
        time.sleep(0.1)
    if kill == signal.SIGTERM:
        assert first.returncode == 75, err[-3000:]
        assert "2026-11-26: fit ended" in err and "run the same command again to resume" in err
    else:
        assert first.returncode == -signal.SIGKILL
    assert (day_two / "checkpoints" / "preempted.ckpt" / "trainer.pt").is_file(), "the step saved where it stopped"
    assert not (day_two / "day.json").exists()
    day_one = _mtime(out, "2026-11-25")

    printed = _finish(_daily(config, out, "2026-11-25", "2026-11-26", *every_step))
    assert _mtime(out, "2026-11-25") == day_one, "a finished day is not trained again"
    assert (out / "dt=2026-11-25" / "fit.log").read_text().count("$ fit") == 1
    assert (out / "dt=2026-11-25" / "test.log").read_text().count("$ test") == 1, "nor tested again"
    for day in ("2026-11-25", "2026-11-26"):
        assert [p.name for p in (out / f"dt={day}" / "checkpoints").iterdir()] == ["last.ckpt"], "one per day"
    with (out / "daily.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["day"], r["tested_on"]) for r in rows] == [("2026-11-25", "2026-11-26"), ("2026-11-26", "2026-11-27")]
    for day, next_day in (("2026-11-25", "2026-11-26"), ("2026-11-26", "2026-11-27")):  # what each test step read
        overlay = out / f"dt={day}" / "eval.yaml"
        assert f"--config {overlay}" in (out / f"dt={day}" / "test.log").read_text()
        assert yaml.safe_load(overlay.read_text())["data"]["test_days"] == next_day
    for row in rows:
        assert {"ctr_auc", "cvr_auc", "ctcvr_auc"} <= set(row)
        assert all(0.0 <= float(row[f"{t}_auc"]) <= 1.0 for t in ("ctr", "cvr", "ctcvr"))
    assert rows[0]["start"] == "cold" and rows[1]["start"] == "warm"
    assert "2026-11-26  warm" in printed
    assert (out / "daily.png").stat().st_size > 0
    start = json.loads((day_two / "day.json").read_text())["start"]
    checkpoints = out / "dt=2026-11-25" / "checkpoints", day_two / "checkpoints"
    assert start == f"warm from {checkpoints[0] / 'last.ckpt'}, resumed from {checkpoints[1] / 'preempted.ckpt'}"
    commands = [line for line in (day_two / "fit.log").read_text().splitlines() if line.startswith("$ fit")]
    assert len(commands) == 2 and commands[1].endswith(f"--ckpt_path {checkpoints[1] / 'preempted.ckpt'}")


def test_a_warm_day_starts_from_the_previous_days_weights(setup):
    """Day 2 trained with zero learning rates keeps exactly day 1's weights: it started from them
    (a cold start would keep the seeded initial weights, which day 1's training moved)."""
    config, out = setup
    _finish(_daily(config, out, "2026-11-25", "2026-11-25"))
    frozen = ["--model.dense_optimizer", "torch.optim.SGD", "--model.dense_optimizer.lr", "0",
              "--model.sparse_optimizer.lr", "0", "--warm_start_sparse_optimizer", "keep"]
    _finish(_daily(config, out, "2026-11-26", "2026-11-26", *frozen))
    # a new --out: the first day warm-starts from the checkpoint given
    day_one = out / "dt=2026-11-25" / "checkpoints" / "last.ckpt"
    _finish(_daily(config, out.with_name("given"), "2026-11-26", "2026-11-26", "--warm_start", str(day_one), *frozen))
    before = read_full(day_one, keys={"model"})["model"]
    assert len(before) > 4
    for later in (out, out.with_name("given")):
        after = read_full(later / "dt=2026-11-26" / "checkpoints" / "last.ckpt", keys={"model"})["model"]
        assert before.keys() == after.keys()
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
        command = (later / "dt=2026-11-26" / "fit.log").read_text().splitlines()[0]
        assert command.endswith(f"--warm_start {day_one} --warm_start_sparse_optimizer keep")


def test_warm_start_options_go_only_to_warm_starting_fits():
    """``test`` and a resumed ``fit`` refuse them; every other argument goes to every step."""
    shared, warm = _split_warm_options(["--trainer.max_epochs", "2", "--warm_start_sparse_optimizer", "keep",
                                        "--warm_start_blend=0.3", "--data.batch_size", "64"])
    assert shared == ["--trainer.max_epochs", "2", "--data.batch_size", "64"]
    assert warm == ("--warm_start_sparse_optimizer", "keep", "--warm_start_blend=0.3")


@pytest.mark.parametrize(("args", "expected"), [
    (["--from", "2026-11-26", "--to", "2026-11-29"],
     "daily: {root} has no partition for 2026-11-28..2026-11-29 (2 days); it has 2026-11-25..2026-11-27 (3 days)"),
    (["--from", "2026-11-26", "--to", "2026-11-25"], "the range 2026-11-26..2026-11-25 ends before it starts"),
    (["--from", "2026-11-26", "--to", "2026-11-26", "--data.train", "{file}"], "is not a directory of dt=YYYY-MM-DD"),
    (["--from", "2026-11-26", "--to", "2026-11-26", "--cold", "--warm_start", "{file}"],
     "daily: --cold trains every day from scratch: --warm_start and --warm_start_* do not apply"),
    (["--from", "2026-11-26", "--to", "2026-11-26", "--cold", "--warm_start_dense_stats", "blend"],
     "daily: --cold trains every day from scratch: --warm_start and --warm_start_* do not apply"),
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


def test_bench_daily_keeps_each_arguments_runs_apart(tmp_path, monkeypatch):
    """``daily`` skips the days an ``--out`` already holds, so a second benchmark into the same
    ``--out`` with another seed must train in folders of its own (it used to print the first
    seed's AUCs again: every day was found done and tested)."""
    from lightning_mtr.benchmarks import daily as bench

    folders = []
    monkeypatch.setattr(bench, "compare", lambda out, days, config: folders.append(out) or {})
    monkeypatch.setattr(bench, "report", lambda results, out: ("", True))
    tiny = ["--out", str(tmp_path), "--days", "2", "--rows-per-day", "16", "--users", "10", "--items", "5"]
    for seed in ("0", "1", "0"):
        assert bench.main([*tiny, "--seed", seed]) == 0
    assert folders[0] != folders[1] and folders[0] == folders[2], folders
    assert all(folder.parent == tmp_path for folder in folders)


def test_bench_daily_needs_two_days(tmp_path, capsys):
    """Cold and stale start on day 2: with one day there is nothing to compare (it used to train
    day 1, then end in a DataError traceback about a range that ends before it starts)."""
    from lightning_mtr.benchmarks import daily as bench

    with pytest.raises(SystemExit) as done:
        bench.main(["--out", str(tmp_path), "--days", "1", "--rows-per-day", "16", "--users", "10", "--items", "5"])
    assert done.value.code == 2
    assert "--days must be at least 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing generated or trained"


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 1)], ids=["SIGTERM", "SIGINT"])
def test_a_step_stopped_by_a_signal_counts_as_stopped_whatever_its_status(tmp_path, monkeypatch, stop, status):
    """``lightning-mtr test`` ends with status 0 when SIGTERM comes mid-test (Lightning's
    evaluation loop stops on it as on success and writes no metrics: measured) and with 1 on
    SIGINT (Lightning's KeyboardInterrupt handling), so ``daily`` took a test it had stopped for a
    finished one and read metrics that were not there (a traceback, status 1), or ended 1 without
    saying to run it again, where it promises 75. A step that a stop signal reached counts as
    stopped (75). The step here is a stand-in that ends as that test does."""
    ready, fake = tmp_path / "ready", tmp_path / "python"
    trap = f"trap 'exit {status}' {stop.name.removeprefix('SIG')}"
    fake.write_text(f"#!/bin/sh\n{trap}\ntouch {ready}\nwhile :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))

    def stop_daily() -> None:
        while not ready.exists():
            time.sleep(0.02)
        os.kill(os.getpid(), stop)  # daily's handler passes it on to the step

    before = signal.getsignal(stop)
    threading.Thread(target=stop_daily, daemon=True).start()
    assert _step(["test"], tmp_path / "test.log") == PREEMPTED_EXIT
    assert signal.getsignal(stop) is before, "daily's own handling is back once the step ended"


def test_a_failed_step_s_own_line_is_shown(setup, capsys, monkeypatch):
    """A step that fails on bad input: daily's one line carries the step's own (the fix), not only
    where its log is."""
    config, out = setup
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    missing = out.parent / "no-such.ckpt"
    code = main(["daily", "--config", str(config), "--out", str(out), "--from", "2026-11-25", "--to", "2026-11-25",
                 "--warm_start", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lightning-mtr daily: 2026-11-25: fit ended with status 2 (see ")
    assert err[0].endswith(f"): error: {missing}: no such checkpoint"), err
