"""``lightning-mtr daily``: train day after day, each day warm-started from the day before.

For each day of ``--from .. --to`` (the ``dt=YYYY-MM-DD`` folders of the config's training root,
:mod:`~lightning_mtr.data.days`) it runs ``lightning-mtr fit`` on that day alone, warm-started
(``--warm_start``) from the previous day's checkpoint, then ``lightning-mtr test`` of that
checkpoint on the next day, and prints (and writes as ``daily.csv`` and ``daily.png``) one row per
day of per-task AUCs. Each day lives in ``OUT/dt=YYYY-MM-DD/``: ``checkpoints/last.ckpt`` (the
day's one checkpoint), ``fit.log``, ``test.log``, ``day.json`` (written when the day's training
finished) and ``test.json`` (its test metrics).

Each step is a subprocess (``python -m lightning_mtr.cli``): a kill ends it cleanly and a config
of several devices runs as it would alone. Killed and run again, ``daily`` skips the days whose
``day.json`` exists, resumes an interrupted day from its own ``preempted.ckpt`` or ``last.ckpt``
(``--ckpt_path``), and tests what is untested. SIGTERM or SIGINT is passed to the running step
(a ``fit`` then saves ``preempted.ckpt`` and exits 75); ``daily`` then exits with 75 too.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from lightning_mtr.data import days as hive
from lightning_mtr.data.encode import DataError
from lightning_mtr.training.distributed.checkpoint import is_sharded_checkpoint
from lightning_mtr.training.preemption import CHECKPOINT_NAME, PREEMPTED_EXIT

DAY_DONE, TESTED, STARTED = "day.json", "test.json", "start.json"


@dataclass(frozen=True)
class Plan:
    """One ``daily`` run: the config arguments (``--config`` files and overrides) every step
    shares, the days, where they go, and whether each day starts from the day before."""

    config: list[str]
    days: list[dt.date]
    out: Path
    root: str  # the Hive root the days are read from
    available: frozenset[dt.date]
    warm: bool = True
    save_every_n_steps: int = 0
    warm_options: tuple[str, ...] = ()  # --warm_start_* arguments: for a warm-starting fit only
    first_warm_start: str | None = None  # the first day's, when the day before is not in ``out``

    def directory(self, day: dt.date) -> Path:
        return self.out / f"{hive.PARTITION}{day}"

    def checkpoint(self, day: dt.date) -> Path:
        return self.directory(day) / "checkpoints" / "last.ckpt"


def _overlay(plan: Plan, day: dt.date, stage: str) -> Path:
    """The per-day config laid over the user's: the day's data, its own directory, logger and
    checkpoint (``last.ckpt`` only: one per day), no validation while fitting (the next day
    is tested after)."""
    directory = plan.directory(day)
    name = "eval" if stage == "test" else "fit"
    checkpoint = {"dirpath": str(directory / "checkpoints"), "save_top_k": 0, "save_last": True}
    if plan.save_every_n_steps:
        checkpoint["every_n_train_steps"] = plan.save_every_n_steps
    trainer = {"default_root_dir": str(directory),
               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": str(directory), "name": name, "version": 0}},
               "callbacks": [{"class_path": "lightning_mtr.training.ModelCheckpoint", "init_args": checkpoint}]}
    data = {"train": plan.root, "days": str(day), "val_days": None, "test_days": None}
    if stage == "fit":
        trainer["limit_val_batches"] = 0
    else:
        data.update(test=plan.root, test_days=str(day + dt.timedelta(days=1)))
    path = directory / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": trainer, "data": data}))
    return path


STOP = (signal.SIGTERM, signal.SIGINT)


def _in_step() -> None:
    """In the step's process before it starts: the stop signals that ``daily`` holds back while
    it starts the step are let through again, and (Linux) ``daily`` dying, even by SIGKILL, sends
    SIGTERM, so the step stops as if preempted instead of training on, orphaned, beside a rerun."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _step(command: list[str], log: Path) -> int:
    """Run one ``lightning-mtr`` step, its output to ``log``; a SIGTERM or SIGINT to ``daily``
    goes to the step once, which stops cleanly (``fit``: ``preempted.ckpt``, status 75). The step
    has its own session: a Ctrl+C reaches it only through ``daily`` (twice would abort the step).
    A step that a stop signal reached counts as stopped (75) whatever its status: ``test`` ends 0
    on SIGTERM (without its metrics) and 1 on SIGINT, and ``daily`` stops to be run again."""
    child: subprocess.Popen | None = None
    stopped = False

    def forward(signum: int, frame) -> None:
        nonlocal stopped
        stopped = True
        child.send_signal(signum)

    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP)  # held until there is a step to pass them to
        previous = {s: signal.signal(s, forward) for s in STOP}
        try:
            try:
                child = subprocess.Popen([sys.executable, "-m", "lightning_mtr.cli", *command], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True, preexec_fn=_in_step)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
            code = child.wait()
            return PREEMPTED_EXIT if stopped else code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _resume_point(plan: Plan, day: dt.date) -> Path | None:
    """The day's own newest complete checkpoint (a day interrupted earlier), if any."""
    folder = plan.checkpoint(day).parent
    found = [p for p in (folder / CHECKPOINT_NAME, folder / "last.ckpt") if is_sharded_checkpoint(p)]
    return max(found, key=lambda p: (p / "trainer.pt").stat().st_mtime) if found else None


def train_day(plan: Plan, day: dt.date) -> int:
    """Fit one day (resumed, warm-started from the day before, or cold); 0 when it is done."""
    directory = plan.directory(day)
    if (directory / DAY_DONE).exists():
        return 0
    previous = plan.checkpoint(day - dt.timedelta(days=1))
    resume = _resume_point(plan, day)
    if resume is not None:  # the same run goes on: how it first started still holds
        first = json.loads((directory / STARTED).read_text())["start"] if (directory / STARTED).exists() else "?"
        start, extra = f"{first}, resumed from {resume}", ["--ckpt_path", str(resume)]
    else:
        if plan.warm and (plan.directory(day - dt.timedelta(days=1)) / DAY_DONE).exists():
            start, extra = f"warm from {previous}", ["--warm_start", str(previous), *plan.warm_options]
        elif plan.warm and day == plan.days[0] and plan.first_warm_start:
            start = f"warm from {plan.first_warm_start}"
            extra = ["--warm_start", plan.first_warm_start, *plan.warm_options]
        else:
            start, extra = "cold", []
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / STARTED, {"start": start})
    code = _step(["fit", *plan.config, "--config", str(_overlay(plan, day, "fit")), *extra], directory / "fit.log")
    if code == 0:  # the day's one checkpoint is last.ckpt: a preemption's is spent
        shutil.rmtree(plan.checkpoint(day).with_name(CHECKPOINT_NAME), ignore_errors=True)
        _write_json(directory / DAY_DONE, {"day": str(day), "start": start, "checkpoint": str(plan.checkpoint(day))})
    return code


def test_day(plan: Plan, day: dt.date, checkpoint: Path | None = None) -> dict[str, float] | int:
    """The test metrics of ``checkpoint`` (default: the day's) on the next day ({} without one)."""
    directory, following = plan.directory(day), day + dt.timedelta(days=1)
    if following not in plan.available:
        return {}
    if (directory / TESTED).exists():
        return json.loads((directory / TESTED).read_text())
    command = ["test", *plan.config, "--config", str(_overlay(plan, day, "test")),
               "--ckpt_path", str(checkpoint or plan.checkpoint(day))]
    code = _step(command, directory / "test.log")
    if code:
        return code
    with (directory / "eval" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    metrics = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}
    _write_json(directory / TESTED, metrics)
    return metrics


def _write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a kill never leaves a half-written marker."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    partial.replace(path)


def table(plan: Plan, results: dict[dt.date, dict[str, float]]) -> list[dict[str, str]]:
    """One row per day: how it started, the day it was tested on, each task's AUC there."""
    tasks = sorted({key.split("/")[1] for metrics in results.values() for key in metrics if key.endswith("/auc")})
    rows = []
    for day, metrics in results.items():
        done = plan.directory(day) / DAY_DONE
        start = json.loads(done.read_text())["start"].split(" ")[0].rstrip(",") if done.exists() else "-"
        row = {"day": str(day), "start": start, "tested_on": str(day + dt.timedelta(days=1)) if metrics else "-"}
        row.update({f"{task}_auc": f"{metrics[f'test/{task}/auc']:.4f}" if f"test/{task}/auc" in metrics else "-"
                    for task in tasks})
        rows.append(row)
    return rows


def write_report(rows: list[dict[str, str]], out: Path, title: str = "daily") -> str:
    """Print-ready text of ``rows``; also ``out/<title>.csv`` and, with matplotlib, ``out/<title>.png``."""
    columns = list(rows[0])
    with (out / f"{title}.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(values, widths))
                     for values in [columns, *([r[c] for c in columns] for r in rows)])
    try:
        import matplotlib  # optional: the table and CSV do not need it
    except ImportError:
        return text + f"\n(matplotlib is not installed: no {title}.png)"
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4))
    for column in (c for c in columns if c not in ("day", "start", "tested_on")):
        points = [(r["day"][5:], float(r[column])) for r in rows if r[column] != "-"]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=column.removesuffix("_auc"))
    axes.set(xlabel="day trained (tested on the next)", ylabel="AUC", title=title)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the lines, not on them
    figure.tight_layout()
    figure.savefig(out / f"{title}.png", dpi=100)
    pyplot.close(figure)
    return text


def make_plan(argv: list[str]) -> Plan:
    """Parse the command line; the config is parsed by the real CLI (unknown keys fail here)."""
    parser = argparse.ArgumentParser(prog="lightning-mtr daily", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments go to every step (e.g. --trainer.max_epochs 2).")
    parser.add_argument("--config", action="append", required=True, help="a run config (repeatable)")
    parser.add_argument("--from", dest="first", required=True, help="first day to train, YYYY-MM-DD")
    parser.add_argument("--to", dest="last", required=True, help="last day to train, YYYY-MM-DD")
    parser.add_argument("--out", type=Path, default=Path("runs/daily"), help="one folder per day under it")
    parser.add_argument("--cold", action="store_true", help="train each day from scratch (a baseline)")
    parser.add_argument("--save_every_n_steps", type=int, default=0,
                        help="also refresh the day's last.ckpt every N steps (resumes lose less after a SIGKILL)")
    parser.add_argument("--warm_start", help="the first day's warm start (default: the day before's checkpoint "
                        "in --out, else cold); --warm_start_* options go to every warm start")
    args, overrides = parser.parse_known_args(argv)
    days = hive.parse_days(f"{args.first}..{args.last}", "daily --from/--to")
    overrides, warm_options = _split_warm_options(overrides)
    if args.cold and (args.warm_start or warm_options):
        raise DataError("daily: --cold trains every day from scratch: --warm_start and --warm_start_* do not apply; "
                        "drop them or --cold")
    config = [a for path in args.config for a in ("--config", path)] + overrides
    root = _training_root(config)
    available = hive.partitions(Path(root)) or {}
    missing = [day for day in days if day not in available]
    if missing:
        raise DataError(f"daily: {root} has no partition for {hive.describe(missing)}; "
                        f"it has {hive.describe(sorted(available))}")
    return Plan(config, days, args.out, root, frozenset(available), warm=not args.cold,
                save_every_n_steps=args.save_every_n_steps, warm_options=warm_options,
                first_warm_start=args.warm_start)


def _split_warm_options(arguments: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(the arguments every step takes, the ``--warm_start_*`` ones with their values), since
    ``test`` and a resumed ``fit`` take no warm-start options."""
    shared, warm, rest = [], [], iter(arguments)
    for argument in rest:
        if not argument.startswith("--warm_start_"):
            shared.append(argument)
            continue
        warm.append(argument)
        if "=" not in argument:
            warm.append(next(rest, ""))
    return shared, tuple(warm)


def _training_root(config: list[str]) -> str:
    """The config's training root (its synthetic log generated if it names one)."""
    from lightning_mtr.cli import MultiTaskCLI  # the CLI imports this module for its command table

    with warnings.catch_warnings():  # that args and sys.argv both exist: daily's own argv is not the CLI's
        warnings.simplefilter("ignore", UserWarning)
        cli = MultiTaskCLI(run=False, args=[*config, "--trainer.logger", "false"])
    module = cli.datamodule
    module.prepare_data()
    module.setup("fit")
    root = module.paths["train"]
    if not isinstance(root, str) or hive.partitions(Path(root)) is None:
        raise DataError(f"daily: data.train ({root}) is not a directory of {hive.PARTITION}YYYY-MM-DD folders; "
                        "give the Hive root of the daily logs")
    return root


def _own_line(log: Path) -> str:
    """The failed step's own one-line error (``lightning-mtr: error: ...``), if it printed one."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("lightning-mtr: ")]
    return f": {lines[-1].removeprefix('lightning-mtr: ')}" if lines else ""


def run(plan: Plan) -> dict[dt.date, dict[str, float]] | int:
    """Train and test every day of the plan in order: each day's test metrics, or the status of
    the step that failed (75 when it was stopped by a signal: run again to resume)."""
    results: dict[dt.date, dict[str, float]] = {}
    for day in plan.days:
        code = train_day(plan, day)
        metrics = test_day(plan, day) if code == 0 else code
        if isinstance(metrics, int):
            step = "fit" if code else "test"
            stopped = metrics in (PREEMPTED_EXIT, -signal.SIGTERM, -signal.SIGINT)
            log = plan.directory(day) / f"{step}.log"
            print(f"lightning-mtr daily: {day}: {step} ended with status {metrics} (see {log})"
                  + ("; run the same command again to resume" if stopped else _own_line(log)), file=sys.stderr)
            return PREEMPTED_EXIT if stopped else metrics
        results[day] = metrics
    return results


def main(argv: list[str]) -> int:
    """Train day after day, each day warm-started from the day before and tested on the next.

    ``lightning-mtr daily --config C --from A --to B [--out DIR] [--cold] [overrides]``."""
    try:
        plan = make_plan(argv)
    except DataError as error:
        print(f"lightning-mtr: error: {error}", file=sys.stderr)
        return 2
    results = run(plan)
    if isinstance(results, int):
        return results
    print(write_report(table(plan, results), plan.out))
    return 0
