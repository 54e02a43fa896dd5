"""bf16-mixed against fp32: per-task test AUC of the same model, data and seed in both precisions.

    python tools/bench_precision.py --data DIR --model mmoe --seeds 0 1 2 [--rows N] [--results FILE]
    python tools/bench_precision.py --table FILE      # the table of runs appended to FILE before

Each seed trains one epoch in ``32-true``, then in ``bf16-mixed`` (:func:`train_one_epoch`), and
scores the test file (:func:`quality_metrics`); one JSON line per run is appended to ``--results``,
so seeds can run as separate commands. The table gives every task's AUC per seed and precision,
the bf16 - fp32 difference per seed and its mean, and whether every task of every seed is within
``--tolerance`` (0.002) of fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_mtr.benchmarks.train import SETUPS, quality_metrics, train_one_epoch
from lightning_mtr.training.precision import cpu_bf16_units, cpu_capabilities

PRECISIONS = ("32-true", "bf16-mixed")


def run_seed(model: str, data_dir: Path, seed: int, rows: int | None, batch_size: int) -> list[dict]:
    """One epoch in each precision, fp32 first; a result per run: AUCs and training seconds."""
    results = []
    for precision in PRECISIONS:
        trainer, module, data, seconds = train_one_epoch(model, data_dir, rows, batch_size, seed,
                                                         precision=precision)
        metrics = quality_metrics(trainer, module, data, data_dir / "test.parquet")
        results.append({"model": model, "seed": seed, "precision": precision, "rows": rows, "batch_size": batch_size,
                        "train_seconds": round(seconds.epoch, 2), "cpu": cpu_capabilities().get("cpu_name"),
                        "bf16_units": cpu_bf16_units(), "threads": torch.get_num_threads(),
                        "aucs": {k.removeprefix("auc_"): v for k, v in metrics.items() if k.startswith("auc_")}})
    return results


def table(results: list[dict], tolerance: float = 0.002) -> tuple[str, bool]:
    """``(text, within)``: per model, task and seed the fp32 and bf16 AUCs and their difference, the
    mean difference, and whether every difference is within ``tolerance``. A seed needs both runs."""
    lines, within = [], True
    for model in sorted({r["model"] for r in results}):
        runs = {(r["seed"], r["precision"]): r["aucs"] for r in results if r["model"] == model}
        seeds = sorted(s for s in {s for s, _ in runs} if all((s, p) in runs for p in PRECISIONS))
        if not seeds:
            raise ValueError(f"{model}: no seed has both a 32-true and a bf16-mixed run")
        lines += [f"{model}: test AUC, bf16-mixed - 32-true over seeds {seeds} (tolerance {tolerance})",
                  f"{'task':<12}{'seed':>6}{'32-true':>10}{'bf16-mixed':>12}{'diff':>10}"]
        for task in runs[seeds[0], PRECISIONS[0]]:
            diffs = []
            for seed in seeds:
                fp32, bf16 = runs[seed, "32-true"][task], runs[seed, "bf16-mixed"][task]
                diffs.append(round(bf16 - fp32, 6))  # AUCs have 5 decimals: 0.923 - 0.920 is 0.003, not 0.0030...03
                lines.append(f"{task:<12}{seed:>6}{fp32:>10.5f}{bf16:>12.5f}{diffs[-1]:>+10.5f}")
            ok = all(abs(d) <= tolerance for d in diffs)
            within &= ok
            lines.append(f"{task:<12}{'mean':>6}{'':>10}{'':>12}{sum(diffs) / len(diffs):>+10.5f}  "
                         f"{'within' if ok else 'NOT within'} {tolerance}")
    lines.append(f"every task within {tolerance} of fp32: {'yes' if within else 'NO'}")
    return "\n".join(lines), within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="train.parquet and test.parquet in the impression layout")
    parser.add_argument("--model", choices=sorted(SETUPS), default="mmoe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=None, help="train on the first N rows (default: all)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=None, help="append each run's JSON line to this file")
    parser.add_argument("--table", type=Path, default=None, help="print the table of a --results file; train nothing")
    parser.add_argument("--tolerance", type=float, default=0.002)
    args = parser.parse_args(argv)
    if args.table is not None:
        results = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
    else:
        if args.data is None:
            parser.error("--data is required unless --table is given")
        if args.threads:
            torch.set_num_threads(args.threads)
        results = []
        for seed in args.seeds:
            start = time.perf_counter()
            for result in run_seed(args.model, args.data, seed, args.rows, args.batch_size):
                print(json.dumps(result), flush=True)
                results.append(result)
                if args.results is not None:
                    with args.results.open("a") as file:
                        file.write(json.dumps(result) + "\n")
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    text, within = table(results, args.tolerance)
    print(text)
    return 0 if within else 1
