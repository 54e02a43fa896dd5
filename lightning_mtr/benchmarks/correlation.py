"""The MMoE paper's experiment (Ma et al., KDD 2018, section 4.3, Figure 4): how each model's
loss along training depends on the correlation between two regression tasks.

Shared-Bottom, OMoE and MMoE are trained with the paper's sizes (100 inputs; 8 experts of 16
units; towers of 8; a Shared-Bottom bottom of 113 units, so the parameter counts match; Adam at
1e-2, the best of the paper's grid 1e-4, 1e-3, 1e-2 for both Shared-Bottom and MMoE) on the
controlled-correlation data (``lightning_mtr.data.synthetic.mmoe_regression``) at correlations
1.0, 0.9 and 0.5, over several seeds (each seed new task directions, rows and initial weights;
the sines' alpha, beta are the paper's given parameters, the same for every seed).

Figure 4 plots each model's loss, averaged over runs, against the training step, one panel per
correlation. So every run records, every ``--eval-every`` steps, its training loss averaged over
those steps and each task's MSE on held-out rows (targets standardised with the training
statistics: their std is 2.14-2.20 for either task at any correlation on seeds 0-2, so
about one constant rescale).
Printed: each model's held-out loss averaged over its curve (the summary fixed before any run
was looked at: the area under Figure 4's curve per step) and at its end, mean ± spread over
seeds; Shared-Bottom minus MMoE paired by seed (same data) for both and for the training curve;
that gap along the run; each task's final loss. The plot is Figure 4's three panels.

Rows are fresh, each seen once, as the paper generates them until it has enough: 40k rows seen
15 times were memorised (Shared-Bottom's held-out loss twice its training loss).
``--val-rows n`` draws n validation rows too and prints each model's test loss at its lowest
validation checkpoint (early stopping's model), for few rows seen many times, where a run that
memorises late is judged where it was best. With 2k-10k rows the gap does not grow either; below
10k rows Shared-Bottom beats MMoE at every correlation (docs/benchmarks.md).

The paper's finding, MMoE's advantage over Shared-Bottom growing as the correlation drops, is
not reproduced (docs/benchmarks.md): the paired gap in curve mean is 0.032 / 0.027 / 0.031 at 1.0 / 0.9 /
0.5 (spread 0.02, 10 seeds), as Shared-Bottom's loss does not grow as the correlation drops:
both tasks are functions of one 2-d projection of x, which its shared units (113, or even 8
with ``--bottom 8``) fit at any correlation. OMoE's curve rises as the correlation drops, as in
the paper. The paper does not give alpha, beta or c: ``--alpha-std`` (alpha ~ N(0, s^2)) and
``--scale`` (c) change them for every model alike; none tried moved Shared-Bottom (docs/benchmarks.md).

    python -m tools.bench_correlation [--quick] [--workers 2] [--out runs/bench_correlation]   (repo root)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import torch
from matplotlib.figure import Figure

from lightning_mtr.data.synthetic.mmoe_regression import mmoe_regression_arrays
from lightning_mtr.models import build_model
from lightning_mtr.schema import Schema
from torchrec import KeyedJaggedTensor

DIM = 100
BOTTOM = 113  # the paper's Shared-Bottom width: 13056 / (100 + 8 x 2), its count of expert and tower weights
SIZES = {  # the paper's three models, by registry name (lightning_mtr.models.MODELS), at its sizes
    "shared_bottom": {"bottom": [BOTTOM], "tower": [8]},
    "omoe": {"num_experts": 8, "expert": [16], "tower": [8]},
    "mmoe": {"num_experts": 8, "expert": [16], "tower": [8]},
}
CORRELATIONS = (1.0, 0.9, 0.5)
# fresh rows, each seen once, as the paper generates data "until enough": 40k rows seen 15 times
# were memorised (Shared-Bottom's held-out loss twice its training loss, docs/benchmarks.md)
FULL = {"rows": 400_000, "test_rows": 2_000, "val_rows": 0, "epochs": 1, "seeds": 10, "eval_every": 100}
QUICK = {"rows": 100_000, "test_rows": 1_000, "val_rows": 0, "epochs": 1, "seeds": 3, "eval_every": 25}
BATCH = 256
LR = 1e-2  # the paper grid-searches Adam's rate in 1e-4, 1e-3, 1e-2; 1e-2 gave the lowest curve (docs/benchmarks.md)
GAP = ("shared_bottom", "mmoe")  # the paper's comparison: Shared-Bottom's loss minus MMoE's


def schema() -> Schema:
    return Schema.from_dict({"dense": [{"name": f"x{d}"} for d in range(DIM)],
                             "tasks": [{"name": "y1", "label": "y1", "kind": "regression"},
                                       {"name": "y2", "label": "y2", "kind": "regression"}]})


def build(model_name: str, bottom: int = BOTTOM) -> torch.nn.Module:
    """One of ``SIZES``' models; ``bottom`` sets Shared-Bottom's width (the paper's 113 matches the
    others' parameters; narrower ones show what the width does, nothing else changes)."""
    if bottom < 1:
        raise ValueError(f"Shared-Bottom's bottom width must be positive, got {bottom}")
    return build_model(model_name, schema(), **{**SIZES[model_name],
                                                **({"bottom": [bottom]} if model_name == "shared_bottom" else {})})


@lru_cache(maxsize=1)
def task_pair(correlation: float, seed: int, rows: int, test_rows: int, alpha_std: float = 1.0,
              scale: float = 1.0, val_rows: int = 0) -> tuple[torch.Tensor, ...]:
    """``x, y, x_test, y_test, x_val, y_val`` of one task pair (``val_rows`` rows of their own
    stream, none by default), targets standardised with the training statistics (1 = predicting
    the mean). Kept for the next call: ``run`` trains the models of one seed one after another,
    so they share one draw (hundreds of thousands of rows)."""
    data = partial(mmoe_regression_arrays, correlation=correlation, dim=DIM, seed=seed, alpha_std=alpha_std,
                   scale=scale)
    x, y = (torch.from_numpy(a) for a in data(rows))
    x_test, y_test = (torch.from_numpy(a) for a in data(test_rows, split="test"))
    x_val, y_val = (torch.from_numpy(a) for a in data(val_rows, split="val")) if val_rows else (
        torch.empty(0, DIM), torch.empty(0, 2))
    mean, std = y.mean(0), y.std(0)
    return x, (y - mean) / std, x_test, (y_test - mean) / std, x_val, (y_val - mean) / std


def train(model_name: str, correlation: float, seed: int, rows: int, test_rows: int, epochs: int,
          eval_every: int = 100, lr: float = LR, alpha_std: float = 1.0,
          scale: float = 1.0, bottom: int = BOTTOM, val_rows: int = 0) -> dict[str, list]:
    """One model trained on one task pair, with its loss curve, as Figure 4 plots it: every
    ``eval_every`` steps, the training loss averaged over those steps (``train``) and each task's
    MSE on the held-out rows (``test_tasks``, [y1, y2]; ``test`` is their sum), at ``steps``.
    ``alpha_std`` and ``scale`` (the paper's c) shape the data, the same for every model. With
    ``val_rows``, ``val`` is the summed MSE on that many validation rows at each checkpoint: the
    checkpoint early stopping would keep is the one where it is lowest."""
    x, y, x_test, y_test, x_val, y_val = task_pair(correlation, seed, rows, test_rows, alpha_std, scale, val_rows)
    torch.manual_seed(seed)
    model = build(model_name, bottom)
    no_ids = KeyedJaggedTensor.empty()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def task_losses(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [2]: MSE of y1, y2
        out = model(inputs, no_ids)
        return torch.stack([((out[task] - targets[:, t]) ** 2).mean() for t, task in enumerate(("y1", "y2"))])

    curve: dict[str, list] = {"steps": [], "train": [], "test": [], "test_tasks": []}
    curve |= {"val": []} if val_rows else {}
    step, window = 0, 0.0  # window: the training loss summed since the last checkpoint
    for _ in range(epochs):
        for batch in torch.randperm(rows, generator=generator).split(BATCH):
            optimizer.zero_grad(set_to_none=True)
            loss = task_losses(x[batch], y[batch]).sum()
            loss.backward()
            optimizer.step()
            step, window = step + 1, window + loss.item()
            if step % eval_every == 0:
                with torch.no_grad():
                    held_out = task_losses(x_test, y_test).tolist()
                    if val_rows:
                        curve["val"].append(task_losses(x_val, y_val).sum().item())
                curve["steps"].append(step)
                curve["train"].append(window / eval_every)
                curve["test_tasks"].append(held_out)
                curve["test"].append(sum(held_out))
                window = 0.0
    return curve


def parameter_counts(bottom: int = BOTTOM) -> dict[str, int]:
    return {name: sum(p.numel() for p in build(name, bottom).parameters()) for name in SIZES}


def _train_job(job: tuple[str, float, int, dict[str, int | float]]) -> dict[str, list]:
    """``settings`` are ``train``'s keyword arguments (plus ``seeds``): a misspelt key raises."""
    name, correlation, seed, settings = job
    return train(name, correlation, seed, **{key: value for key, value in settings.items() if key != "seeds"})


def run(settings: dict[str, int | float], workers: int = 1, threads: int = 1) -> dict[str, dict[float, list[dict]]]:
    """Every (model, correlation, seed) run's curve, in ``workers`` processes of ``threads`` torch
    threads each; every run is seeded on its own, so the numbers do not depend on ``workers``."""
    steps = settings["epochs"] * -(-settings["rows"] // BATCH)
    if not 0 < settings["eval_every"] <= steps:
        raise ValueError(f"--eval-every must be in 1..{steps} (the run's steps: epochs x rows / {BATCH}), "
                         f"got {settings['eval_every']}")
    jobs = [(name, c, seed, settings) for c in CORRELATIONS for seed in range(settings["seeds"]) for name in SIZES]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            # a seed's models are consecutive jobs: one chunk, one process, one draw of rows (task_pair)
            curves = list(pool.map(_train_job, jobs, chunksize=len(SIZES)))
    else:
        curves = [_train_job(job) for job in jobs]
    results: dict[str, dict[float, list[dict]]] = {name: {c: [] for c in CORRELATIONS} for name in SIZES}
    for (name, correlation, _, _), curve in zip(jobs, curves):
        results[name][correlation].append(curve)
    return results


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], width: int = 8) -> str:
    return f"{statistics.mean(values):>{width}.4f} ± {_spread(values):<7.4f}"


def summaries(curves: list[dict], key: str = "test") -> dict[str, list[float]]:
    """Per seed: ``curve``, the mean of the loss over every checkpoint (the area under Figure 4's
    curve per step, fixed as the summary before any run was looked at), and ``final``, its last
    value."""
    return {"curve": [statistics.mean(c[key]) for c in curves], "final": [c[key][-1] for c in curves]}


def _paired(results: dict[str, dict[float, list[dict]]], correlation: float, pick) -> list[float]:
    base, other = (results[name][correlation] for name in GAP)
    return [pick(b) - pick(m) for b, m in zip(base, other)]


def table(results: dict[str, dict[float, list[dict]]]) -> str:
    """Per correlation and model: the held-out loss's curve mean and final value, mean ± spread
    (standard deviation over seeds); then Shared-Bottom minus MMoE on the same seed (same task
    pair, rows and initial seed) for both, and for the training loss's curve mean."""
    gap = f"{GAP[0]} - {GAP[1]}: curve, final, train curve"
    lines = [f"{'correlation':<12}" + "".join(f"{name + ' curve, final':>42}" for name in results) + f"   {gap}"]
    for correlation in CORRELATIONS:
        cells = []
        for name in results:
            summary = summaries(results[name][correlation])
            cells.append(f"{_cell(summary['curve'], 18)} {_cell(summary['final'])}")
        gaps = [_paired(results, correlation, lambda c: statistics.mean(c["test"])),
                _paired(results, correlation, lambda c: c["test"][-1]),
                _paired(results, correlation, lambda c: statistics.mean(c["train"]))]
        lines.append(f"{correlation:<12}" + "".join(cells) + "   " + " ".join(_cell(g) for g in gaps))
    return "\n".join(lines)


def best_validation(curve: dict) -> float:
    """The held-out (test) loss at the checkpoint of lowest validation loss: early stopping's
    model, so a run that memorises its few rows later is judged where it was best."""
    return curve["test"][min(range(len(curve["val"])), key=curve["val"].__getitem__)]


def early_stopping_table(results: dict[str, dict[float, list[dict]]]) -> str:
    """Per correlation: each model's test loss at its best validation checkpoint, mean ± spread
    over seeds (the summary fixed before any such run was looked at); Shared-Bottom minus MMoE
    paired by seed; and how that gap moves from correlation 1.0, paired by seed (same rows and
    directions u1, u2 at every correlation), with the number of seeds where it grew."""
    lines = [f"{'correlation':<12}" + "".join(f"{name:>21}" for name in results)
             + f"{GAP[0] + ' - ' + GAP[1]:>24}{'gap - gap at ' + str(CORRELATIONS[0]):>24}  grew in"]
    first = _paired(results, CORRELATIONS[0], best_validation)
    for correlation in CORRELATIONS:
        gap = _paired(results, correlation, best_validation)
        moved = [g - f for g, f in zip(gap, first)]
        lines.append(f"{correlation:<12}" + "".join(
            _cell([best_validation(c) for c in results[name][correlation]], 11) for name in results)
            + f"{_cell(gap, 14)}{_cell(moved, 14)}  {sum(m > 0 for m in moved)}/{len(moved)}")
    return "\n".join(lines)


def gap_curve(results: dict[str, dict[float, list[dict]]], points: int = 8) -> str:
    """Shared-Bottom minus MMoE's held-out loss along the run, paired by seed (mean ± spread), at
    ``points`` checkpoints spread evenly from the first to the last, one column per correlation."""
    steps = results[GAP[0]][CORRELATIONS[0]][0]["steps"]
    picks = sorted({round(i * (len(steps) - 1) / max(points - 1, 1)) for i in range(points)})
    lines = [f"{'step':>6}" + "".join(f"{f'correlation {c}':>21}" for c in CORRELATIONS)]
    for i in picks:
        lines.append(f"{steps[i]:>6}" + "".join(
            f"{_cell(_paired(results, c, lambda curve: curve['test'][i]), 11)}" for c in CORRELATIONS))
    return "\n".join(lines)


def task_table(results: dict[str, dict[float, list[dict]]]) -> str:
    """Each task's final held-out MSE, mean over seeds: does one task carry a model's loss?"""
    lines = [f"{'correlation':<12}" + "".join(f"{name + ' y1, y2':>28}" for name in results)]
    for correlation in CORRELATIONS:
        lines.append(f"{correlation:<12}" + "".join(
            "".join(f"{statistics.mean(c['test_tasks'][-1][t] for c in results[name][correlation]):>14.4f}"
                    for t in range(2)) for name in results))
    return "\n".join(lines)


def plot(results: dict[str, dict[float, list[dict]]], path: Path) -> None:
    """Figure 4's layout: one panel per correlation, each model's mean held-out loss against the
    training step, with the spread over seeds shaded."""
    figure = Figure(figsize=(13, 4), layout="constrained")
    panels = figure.subplots(1, len(CORRELATIONS), sharey=True)
    for axes, correlation in zip(panels, CORRELATIONS):
        for name, by_correlation in results.items():
            curves = by_correlation[correlation]
            steps = curves[0]["steps"]
            by_step = list(zip(*(c["test"] for c in curves)))
            means = [statistics.mean(v) for v in by_step]
            spreads = [_spread(list(v)) for v in by_step]
            axes.plot(steps, means, label=name)
            axes.fill_between(steps, [m - s for m, s in zip(means, spreads)],
                              [m + s for m, s in zip(means, spreads)], alpha=0.15)
        axes.set_title(f"correlation {correlation}")
        axes.set_xlabel("training step")
    panels[0].set_ylabel("held-out loss (MSE y1 + MSE y2)")
    panels[-1].legend()
    figure.suptitle("MMoE paper, Figure 4: loss along training per task correlation")
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows, epochs and seeds (a few minutes)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one run each at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_correlation"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these matmuls are too small to split)")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} ({QUICK[key]} quick)")
    parser.add_argument("--alpha-std", type=float, default=1.0,
                        help="alpha ~ N(0, alpha_std^2): the sines' frequency (the paper does not give alpha)")
    parser.add_argument("--scale", type=float, default=1.0, help="the paper's c: |w1| = |w2| = c")
    parser.add_argument("--lr", type=float, default=LR,
                        help=f"Adam's learning rate, default {LR}: the best of the paper's grid 1e-4, 1e-3, 1e-2")
    parser.add_argument("--bottom", type=int, default=BOTTOM,
                        help=f"Shared-Bottom's width (default the paper's {BOTTOM}; narrower to see what it does)")
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key) or (QUICK if args.quick else FULL)[key] for key in FULL}
    settings |= {"alpha_std": args.alpha_std, "scale": args.scale, "lr": args.lr, "bottom": args.bottom}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = run(settings, args.workers, args.threads)
    seconds = time.perf_counter() - started
    parameters = parameter_counts(args.bottom)
    print(f"parameters: {parameters}")
    print(f"{settings['seeds']} seeds, {settings['rows']} training rows, {settings['epochs']} epochs, "
          f"alpha_std {args.alpha_std}, c {args.scale}, lr {args.lr}, {args.workers} workers, {seconds:.0f} s\n"
          f"{table(results)}\n\n{GAP[0]} - {GAP[1]}, held-out loss along the run:\n{gap_curve(results)}\n\n"
          f"final held-out MSE per task:\n{task_table(results)}")
    if settings["val_rows"]:
        print(f"\ntest loss at the best of {settings['val_rows']} validation rows' checkpoints (early stopping):\n"
              f"{early_stopping_table(results)}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "correlation.png")
    (args.out / "results.json").write_text(json.dumps(
        {"settings": settings, "seconds": seconds, "parameters": parameters,
         "curves": {name: {str(c): v for c, v in by.items()} for name, by in results.items()}}))
    print(f"wrote {args.out / 'correlation.png'} and results.json")
    return 0
