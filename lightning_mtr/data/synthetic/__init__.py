"""Seeded synthetic data whose labels have known structure, so a metric means something.

Three generators, all written to Parquet:

* :func:`write_impressions` (``impressions.py``): a Criteo-like impression log for the
  ESMM/ESM2 setting, with the true probabilities in ``gt_*`` columns.
* :func:`write_mmoe_regression` (``mmoe_regression.py``): the two-task regression of the
  MMoE paper (Ma et al., KDD 2018, section 4), whose task correlation is set by one number.
* :func:`write_behaviour` (``behaviour.py``): DUPN's four logs (CTR, ranking requests,
  influencer follows, purchasing power) driven by each user's behaviour sequence.
* :func:`write_days` (``days.py``): a day-partitioned log (``dt=YYYY-MM-DD/``) whose users,
  items and item popularity change from day to day, for daily incremental training.

Run them as ``lightning-mtr synth impressions|behaviour|mmoe|days ...`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq

from lightning_mtr.data.synthetic.impressions import (
    DENSE_COLUMNS, GENERATOR_VERSION, SPARSE_COLUMNS, SPEC, SPLITS, VOCAB_SIZES, ImpressionSpec, write_impressions,
)
from lightning_mtr.data.synthetic.behaviour import write_behaviour
from lightning_mtr.data.synthetic.days import START, DaySpec, write_days
from lightning_mtr.data.synthetic.mmoe_regression import mmoe_task_weights, write_mmoe_regression

__all__ = ["DENSE_COLUMNS", "GENERATOR_VERSION", "SPARSE_COLUMNS", "SPEC", "SPLITS", "VOCAB_SIZES", "DaySpec",
           "ImpressionSpec", "main", "mmoe_task_weights", "write_behaviour", "write_days", "write_impressions",
           "write_mmoe_regression"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-mtr synth", description="Write seeded synthetic Parquet data.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (("impressions", "Criteo-like click/conversion log (train/val/test)"),
                        ("behaviour", "DUPN's behaviour-sequence logs: CTR, ranking, FIFP, PPP (train/val/test)")):
        command = commands.add_parser(name, help=about)
        command.add_argument("--out", required=True, type=Path, help="output directory")
        for split in SPLITS:
            command.add_argument(f"--{split}-rows", required=True, type=int)
        command.add_argument("--seed", type=int, default=0)
    mmoe = commands.add_parser("mmoe", help="MMoE paper two-task regression with a set task correlation")
    mmoe.add_argument("--out", required=True, type=Path, help="output Parquet file")
    mmoe.add_argument("--rows", required=True, type=int)
    mmoe.add_argument("--correlation", required=True, type=float)
    mmoe.add_argument("--dim", type=int, default=100)
    mmoe.add_argument("--seed", type=int, default=0)
    mmoe.add_argument("--noise-std", type=float, default=0.1)
    mmoe.add_argument("--split", default="train", help="row stream; e.g. val for a held-out file of the same tasks")
    days = commands.add_parser("days", help="days of a drifting log: OUT/dt=YYYY-MM-DD/part-0.parquet")
    days.add_argument("--out", required=True, type=Path, help="output directory (the Hive root)")
    days.add_argument("--days", required=True, type=int)
    days.add_argument("--rows-per-day", required=True, type=int)
    days.add_argument("--start", type=dt.date.fromisoformat, default=START, help=f"first day (default {START})")
    days.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write a seeded synthetic log whose labels have known structure, and say where.

    ``lightning-mtr synth {impressions,behaviour,mmoe,days} ...``"""
    args = _parser().parse_args(argv)
    if args.command == "days":
        for path in write_days(args.out, args.days, args.rows_per_day, seed=args.seed, start=args.start):
            print(f"{path}: {pq.ParquetFile(path).metadata.num_rows} rows")
    elif args.command in ("impressions", "behaviour"):
        write = write_impressions if args.command == "impressions" else write_behaviour
        paths = write(args.out, args.train_rows, args.val_rows, args.test_rows, seed=args.seed)
        for split, path in paths.items():
            print(f"{path}: {pq.ParquetFile(path).metadata.num_rows} rows ({split})")
    else:
        path = write_mmoe_regression(
            args.out, args.rows, args.correlation, dim=args.dim, noise_std=args.noise_std, seed=args.seed,
            split=args.split,
        )
        print(f"{path}: {args.rows} rows (mmoe {args.split}, correlation={args.correlation})")
    return 0
