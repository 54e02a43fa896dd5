"""Time update + compute of three binary AUROCs on the same scores and print one table.

    .venv/bin/python tools/bench_auc.py [--rows 2000000] [--batch-size 4096] [--thresholds 1000]

torchmetrics' ``thresholds=N`` mode costs O(rows * N) per update, so it runs
with a small N (1000 by default) to keep the script to a few minutes on CPU.
"""

import argparse
import time
from collections.abc import Callable

import torch
import torchmetrics
from torchmetrics.classification import BinaryAUROC

from lightning_mtr.metrics import BinnedBinaryAUROC


def synthetic_scores(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities whose logits shift by +1 for positives (AUC about 0.76), 10% positives."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(rows, generator=generator) < 0.1).long()
    logits = torch.randn(rows, generator=generator) + labels - 2.0
    return logits.sigmoid(), labels


def time_metric(make_metric: Callable[[], torchmetrics.Metric], scores, labels, batch_size: int) -> tuple[float, float]:
    metric = make_metric()
    start = time.perf_counter()
    for begin in range(0, len(scores), batch_size):
        metric.update(scores[begin : begin + batch_size], labels[begin : begin + batch_size])
    auc = metric.compute().item()
    return time.perf_counter() - start, auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--thresholds", type=int, default=1000, help="thresholds of torchmetrics' binned mode")
    parser.add_argument("--num-bins", type=int, default=65536, help="bins of BinnedBinaryAUROC")
    args = parser.parse_args()

    scores, labels = synthetic_scores(args.rows)
    metrics = {
        "torchmetrics BinaryAUROC exact": lambda: BinaryAUROC(thresholds=None),
        f"torchmetrics BinaryAUROC thresholds={args.thresholds}": lambda: BinaryAUROC(thresholds=args.thresholds),
        f"BinnedBinaryAUROC num_bins={args.num_bins}": lambda: BinnedBinaryAUROC(args.num_bins),
    }
    print(f"{args.rows:,} rows, {torch.get_num_threads()} torch threads")
    print(f"{'metric':<45} {'batch':>9} {'seconds':>9} {'auc':>10}")
    for name, make_metric in metrics.items():
        for batch_size in (args.batch_size, args.rows):
            seconds, auc = time_metric(make_metric, scores, labels, batch_size)
            print(f"{name:<45} {batch_size:>9} {seconds:>9.3f} {auc:>10.6f}", flush=True)


if __name__ == "__main__":
    main()
