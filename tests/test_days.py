"""Day-partitioned data (``dt=YYYY-MM-DD`` folders): selecting days for each split, the errors
for a selection the data cannot serve, and the drifting day-by-day synthetic generator."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from lightning_mtr.cli import main
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.data.encode import DataError
from lightning_mtr.data.synthetic.days import DaySpec, write_days
from lightning_mtr.training.distributed.checkpoint import load_trainer_state

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "conf" / "schemas" / "synthetic_days.yaml"
DAYS = [f"2026-11-{d}" for d in range(25, 29)]


@pytest.fixture(scope="module")
def hive(tmp_path_factory) -> Path:
    """Four days of 64 rows, 2026-11-25..2026-11-28."""
    root = tmp_path_factory.mktemp("hive") / "logs"
    write_days(root, days=4, rows_per_day=64, seed=1, spec=DaySpec(users=50, items=20))
    return root


def tiny_config(directory: Path, root: Path, **data) -> Path:
    """A few steps of a tiny MMoE on the day-partitioned log at ``root``."""
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(directory / "run")},
              "model": {"model": {"class_path": "lightning_mtr.models.MMoE",
                                  "init_args": {"num_experts": 2, "expert": [8], "tower": [4]}}},
              "data": {"schema": str(SCHEMA), "train": str(root), "val": str(root), "test": str(root),
                       "batch_size": 32, **data}}
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def files_of(hive: Path, split: str = "train", **days) -> list[str]:
    module = MultiTaskDataModule(str(SCHEMA), train=str(hive), val=str(hive), test=str(hive), **days)
    return [Path(f).parent.name for f in module._files(split)]


def test_days_select_partitions_for_each_split(hive):
    assert files_of(hive, days="2026-11-26..2026-11-27") == ["dt=2026-11-26", "dt=2026-11-27"]
    assert files_of(hive, days="2026-11-28") == ["dt=2026-11-28"]
    assert files_of(hive, days=["2026-11-28", "2026-11-25..2026-11-26"]) == \
        ["dt=2026-11-25", "dt=2026-11-26", "dt=2026-11-28"]
    assert files_of(hive, days="2026-11-27,2026-11-25") == ["dt=2026-11-25", "dt=2026-11-27"]
    assert files_of(hive, "val", val_days="2026-11-27") == ["dt=2026-11-27"]
    assert files_of(hive, "test", days="2026-11-25", test_days="2026-11-28") == ["dt=2026-11-28"]
    assert files_of(hive, "val", days="2026-11-25") == [f"dt={d}" for d in DAYS], "a root alone reads every day"


def _run(tmp_path: Path, capsys, config: Path, *args: str) -> str:
    code = main(["fit", "--config", str(config), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("args", "expected"), [
    (["--data.days", "2026-11-31"], "data.days: '2026-11-31' is not a date; write YYYY-MM-DD"),
    (["--data.val_days", "2026-11-28..2026-11-26"], "data.val_days: the range 2026-11-28..2026-11-26 ends before"),
    (["--data.days", "2026-11-27..2026-11-30"],
     "has no partition for 2026-11-29..2026-11-30 (2 days); it has 2026-11-25..2026-11-28 (4 days)"),
    (["--data.test_days", "2026-11-20", "--data.test", "FILE"], "data.test_days selects days, but data.test ("),
    (["--data.val_days", "2026-11-26", "--data.val", "null"], "data.val_days is set but data.val is not"),
    (["--data.days", "[]"], "data.days: [] selects no day; write YYYY-MM-DD, A..B or a list of them"),
])
def test_bad_day_selection_is_one_line_exit_2(hive, tmp_path, capsys, args, expected):
    some_file = next(hive.glob("dt=*/*.parquet"))
    config = tiny_config(tmp_path, hive)
    args = [str(some_file) if a == "FILE" else a for a in args]
    err = _run(tmp_path, capsys, config, "--trainer.max_steps", "1", *args)
    assert expected in err, err


def test_mixed_layouts_and_bad_partition_names_are_refused(hive, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "dt=2026-11-25").symlink_to(hive / "dt=2026-11-25", target_is_directory=True)
    (mixed / "stray.parquet").write_bytes((hive / "dt=2026-11-26" / "part-0.parquet").read_bytes())
    err = _run(tmp_path, capsys, tiny_config(tmp_path, mixed), "--data.days", "2026-11-25")
    assert "mixes dt=YYYY-MM-DD partitions with 'stray.parquet'; keep one layout" in err
    (mixed / "stray.parquet").unlink()
    (mixed / "dt=yesterday").mkdir()
    with pytest.raises(DataError, match="dt=yesterday: a partition folder whose name is not dt=YYYY-MM-DD"):
        files_of(mixed)


def test_fit_trains_on_the_selected_day_only(hive, tmp_path):
    """One epoch at batch size 32 over one 64-row day is 2 steps; over two days, 4."""
    config = tiny_config(tmp_path, hive)
    for days, steps in (("2026-11-26", 2), ("2026-11-26..2026-11-27", 4)):
        assert main(["fit", "--config", str(config), "--data.days", days, "--data.val_days", "2026-11-28"]) == 0
        [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()
        assert load_trainer_state(checkpoint)["global_step"] == steps
        shutil.rmtree(checkpoint)


def _columns(path: Path, *names: str) -> list[np.ndarray]:
    table = pq.read_table(path, columns=list(names))
    return [table.column(name).to_numpy() for name in names]


def test_generator_churns_users_and_items_and_drifts_popularity(tmp_path):
    spec = DaySpec(users=2000, items=400, user_churn=0.2, item_churn=0.1)
    paths = write_days(tmp_path, days=3, rows_per_day=40_000, seed=0, spec=spec)
    assert [p.parent.name for p in paths] == ["dt=2026-11-25", "dt=2026-11-26", "dt=2026-11-27"]
    days = [_columns(p, "user_id", "item_id", "click") for p in paths]
    users = [set(u.tolist()) for u, _, _ in days]
    # each day a fifth of the users is new (400 of 2000: nearly all active with 20 rows each)
    new_share = len(users[1] - users[0]) / len(users[1])
    assert 0.15 < new_share < 0.25, new_share
    # the oldest cohort left: 400 day-1 users gone on day 2, 800 of them by day 3
    gone = len(users[0] - users[1]) / len(users[0]), len(users[0] - users[2]) / len(users[0])
    assert 0.15 < gone[0] < 0.25 and 0.35 < gone[1] < 0.45, gone
    items = [set(i.tolist()) for _, i, _ in days]
    assert 0.05 < len(items[1] - items[0]) / len(items[1]) < 0.15
    assert min(min(u) for u in users) >= 0 and max(max(u) for u in users) > 2**40, "raw open-ended int64 ids"
    # popularity (impressions per item) of the items shown on both days: ranked alike, not the same
    shared = sorted(items[0] & items[1])
    counts = [np.array([np.sum(i == item) for item in shared]) for _, i, _ in days[:2]]
    ranks = [np.argsort(np.argsort(c)) for c in counts]
    correlation = np.corrcoef(*ranks)[0, 1]
    assert 0.3 < correlation < 0.95, correlation


def test_generator_is_seeded_and_labels_follow_their_probabilities(tmp_path):
    first = write_days(tmp_path / "a", days=2, rows_per_day=500, seed=3, spec=DaySpec(users=100, items=30))
    again = write_days(tmp_path / "b", days=2, rows_per_day=500, seed=3, spec=DaySpec(users=100, items=30))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    click, ctr, conversion = _columns(first[1], "click", "gt_ctr", "conversion")
    assert np.all(conversion <= click), "a conversion only after a click"
    assert ctr[click == 1].mean() > ctr[click == 0].mean() + 0.05
    assert dt.date.fromisoformat(first[0].parent.name[3:]) == dt.date(2026, 11, 25)


def test_what_persists_is_each_pair_s_affinity_only_popularity_moves(tmp_path):
    """The click logit is ``b + affinity <p_u, q_i> + user bias + item bias + effect * popularity_i``
    with only the popularity drifting (DaySpec): from one day to the next, a (user, item) pair's
    logit moves by ``effect * step_i``, the same for every user of item ``i``, and the items' steps
    are N(0, drift^2), so their moves have std ``effect * drift`` = 0.4 * 0.5 = 0.2."""
    paths = write_days(tmp_path, days=2, rows_per_day=5000, seed=3, spec=DaySpec(users=100, items=30))
    logits = []
    for path in paths:
        users, items, ctr = _columns(path, "user_id", "item_id", "gt_ctr")
        ctr = ctr.astype(np.float64)
        logits.append(dict(zip(zip(users.tolist(), items.tolist()), np.log(ctr / (1 - ctr)))))
    moves: dict[int, list[float]] = {}
    for pair in logits[0].keys() & logits[1].keys():
        moves.setdefault(pair[1], []).append(logits[1][pair] - logits[0][pair])
    assert sum(len(m) > 1 for m in moves.values()) > 20, "items with several returning users"
    assert max(np.ptp(m) for m in moves.values()) < 1e-4, "every user of an item moves alike (float32 probabilities)"
    assert 0.12 < np.std([m[0] for m in moves.values()]) < 0.28
