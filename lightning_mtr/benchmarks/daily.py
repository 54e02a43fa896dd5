"""Daily incremental training against its two baselines on the drifting synthetic log.

Trains ``--days`` days (of ``lightning-mtr synth days``: users and items that come and go, item
popularity that drifts) three ways and tests each day's model on the next day:

* warm: ``lightning-mtr daily``, each day warm-started from the day before;
* cold: each day trained from scratch on that day alone (``daily --cold``; day 1 is warm's);
* stale: day 1's model, never updated, tested on every later day.

It prints per-task AUCs per day and whether warm beats both from day 2 on. ``--schema`` swaps the
id tables; ``--managed POLICY`` instead compares, warm both, the schema's hashed id tables with the
same tables under managed collisions (:mod:`.daily_ids`: AUC difference and collision rates).

    python -m tools.bench_daily --out runs/bench_daily [--days 5] [--rows-per-day 50000] [--seed 0]
    python -m tools.bench_daily --out runs/bench_ids --managed lfu
"""

from __future__ import annotations

import argparse
import datetime as dt
import zlib
from dataclasses import replace
from pathlib import Path

import yaml

from lightning_mtr.benchmarks import daily_ids
from lightning_mtr.data.synthetic.days import START, DaySpec, write_days
from lightning_mtr.schema import EVICTION_POLICIES
from lightning_mtr.training import daily

SCHEMA = Path(__file__).resolve().parents[2] / "conf" / "schemas" / "synthetic_days.yaml"
WAYS = ("warm", "cold", "stale")


def write_config(out: Path, schema: Path, root: Path, seed: int, batch_size: int) -> Path:
    """The run every way shares: a small MMoE, one epoch a day."""
    config = {"seed_everything": seed,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                          "enable_model_summary": False},
              "model": {"model": {"class_path": "lightning_mtr.models.MMoE",
                                  "init_args": {"num_experts": 4, "expert": [64], "tower": [32]}},
                        "dense_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.002}},
                        "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05}},
              "data": {"schema": str(schema), "train": str(root), "batch_size": batch_size,
                       "shuffle_buffer": 1 << 16, "seed": seed}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def compare(out: Path, days: int, config: Path) -> dict[str, dict[dt.date, dict[str, float]]]:
    """Each way's test metrics per trained day (tested on the day after)."""
    last = START + dt.timedelta(days=days - 1)

    def plan(way: str, first: dt.date, *extra: str) -> daily.Plan:
        return daily.make_plan(["--config", str(config), "--from", str(first), "--to", str(last),
                                "--out", str(out / way), *extra])

    warm = plan("warm", START)
    results = {"warm": _checked(daily.run(warm))}
    cold = plan("cold", START + dt.timedelta(days=1), "--cold")
    results["cold"] = {START: results["warm"][START], **_checked(daily.run(cold))}
    stale = plan("stale", START + dt.timedelta(days=1))
    results["stale"] = {START: results["warm"][START]}
    for day in stale.days:
        results["stale"][day] = _checked(daily.test_day(stale, day, checkpoint=warm.checkpoint(START)))
    return results


def _checked(result):
    if isinstance(result, int):
        raise SystemExit(f"bench_daily: a step ended with status {result} (its log is named above)")
    return result


def report(results: dict[str, dict[dt.date, dict[str, float]]], out: Path) -> tuple[str, bool]:
    """The per-day table (also ``out/bench_daily.csv`` and ``.png``) and whether warm beat both
    other ways on every task from day 2 on."""
    days = sorted(results["warm"])
    tasks = sorted({key.split("/")[1] for key in results["warm"][days[0]] if key.endswith("/auc")})
    rows, wins = [], True
    for day in days:
        row = {"day": str(day), "tested_on": str(day + dt.timedelta(days=1))}
        for task in tasks:
            auc = {way: results[way][day][f"test/{task}/auc"] for way in WAYS}
            row.update({f"{task}_{way}": f"{auc[way]:.4f}" for way in WAYS})
            wins &= day == days[0] or auc["warm"] > max(auc["cold"], auc["stale"])
        rows.append(row)
    text = daily.write_report(rows, out, "bench_daily")
    return text + f"\nwarm beats cold and stale on every task from day 2 on: {'yes' if wins else 'NO'}", wins


def _key(*arguments) -> str:
    return f"{zlib.crc32(repr(arguments).encode()):08x}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_daily"))
    parser.add_argument("--days", type=int, default=5, help="days trained (one more is generated to test on)")
    parser.add_argument("--rows-per-day", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--schema", type=Path, default=SCHEMA,
                        help="the data schema: e.g. one with managed-collision id tables of the same size")
    parser.add_argument("--managed", choices=EVICTION_POLICIES, default=None,
                        help="compare the schema's out_of_range: modulo tables with the same tables under managed "
                             "collisions of this eviction policy (warm both), instead of warm/cold/stale")
    defaults = DaySpec()
    for knob in ("users", "items", "user_churn", "item_churn", "popularity_drift", "affinity"):
        parser.add_argument(f"--{knob.replace('_', '-')}", type=type(getattr(defaults, knob)),
                            default=getattr(defaults, knob), help=f"DaySpec.{knob}")
    args = parser.parse_args(argv)
    if args.days < 2:
        parser.error(f"--days must be at least 2, got {args.days}: cold and stale differ from warm from day 2 on")
    spec = replace(defaults, **{k: getattr(args, k) for k in ("users", "items", "user_churn", "item_churn",
                                                                "popularity_drift", "affinity")})
    schema = args.schema.resolve()
    root = args.out / f"data-{_key(spec, args.days, args.rows_per_day, args.seed)}"
    # daily skips the days a folder holds: runs of other arguments (or another schema) get their own
    out = args.out / f"runs-{_key(root.name, schema.read_text(), args.batch_size, args.managed)}"
    out.mkdir(parents=True, exist_ok=True)
    if not root.exists():
        write_days(root, args.days + 1, args.rows_per_day, seed=args.seed, spec=spec)
    if args.managed:
        managed, hashed = daily_ids.managed_schema(schema, args.managed, out)
        configs = {}
        for way, way_schema in (("hashed", schema), ("managed", managed)):
            (out / way).mkdir(exist_ok=True)
            configs[way] = write_config(out / way, way_schema, root, args.seed, args.batch_size)
        print(daily_ids.compare_ids(out, args.days, root, configs, hashed) + f"\n(runs and tables in {out})")
        return 0
    config = write_config(out, schema, root, args.seed, args.batch_size)
    text, wins = report(compare(out, args.days, config), out)
    print(text + f"\n(runs and tables in {out})")
    return 0 if wins else 1
