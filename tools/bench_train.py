"""Throughput and quality benchmark: one training epoch, then test AUCs, as one JSON line.

    python tools/bench_train.py --data DIR --model mmoe [--rows N] [--profile]

``DIR/train.parquet`` and ``DIR/test.parquet`` use the synthetic impression layout
(``lightning-mtr synth impressions --out DIR ...``; extra columns are ignored). Table
sizes come from the data (max id + 1 per column, in an untimed pre-pass). The timed part
is ``Trainer.fit`` for one epoch: input pipeline, forward, backward, fused sparse update
and dense Adam step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.models import MODELS
from lightning_mtr.training import MultiTaskModule, SparseOptimizer

SPARSE = [f"C{j}" for j in range(1, 27)] + ["position"]
DENSE = [f"I{k}" for k in range(1, 14)]
MODEL_ARGS = {
    "mmoe": {"num_experts": 8, "expert": [256, 128], "tower": [64]},
    "omoe": {"num_experts": 8, "expert": [256, 128], "tower": [64]},
    "shared_bottom": {"bottom": [256, 128], "tower": [64]},
}


def schema_from_data(train: Path) -> dict:
    """The benchmark schema, with each table sized max id + 1 from the training file."""
    table = pq.read_table(train, columns=SPARSE)
    sizes = {column: int(pc.max(table.column(column)).as_py()) + 1 for column in SPARSE}
    return {
        "sparse": [{"name": c, "num_embeddings": sizes[c], "embedding_dim": 16, "out_of_range": "modulo"}
                   for c in SPARSE],
        "dense": [{"name": c, "transform": "log1p_standardize"} for c in DENSE],
        "tasks": [{"name": "ctr", "label": "click"}, {"name": "ctcvr", "label": "click * conversion"}],
        "ground_truth": ["gt_*"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODEL_ARGS), default="mmoe")
    parser.add_argument("--rows", type=int, default=None, help="train on the first N rows (default: all)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top ops to stderr")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    schema_path = workdir / "schema.yaml"
    schema_path.write_text(yaml.safe_dump(schema_from_data(args.data / "train.parquet")))
    train = args.data / "train.parquet"
    if args.rows:
        train = workdir / "train.parquet"
        pq.write_table(pq.read_table(args.data / "train.parquet").slice(0, args.rows), train, row_group_size=65536)
    rows = pq.ParquetFile(train).metadata.num_rows
    data = MultiTaskDataModule(str(schema_path), train=str(train), test=str(args.data / "test.parquet"),
                               batch_size=args.batch_size, eval_batch_size=16384, shuffle_buffer=0)
    module = MultiTaskModule(
        model=lambda schema: MODELS[args.model](schema, **MODEL_ARGS[args.model]), schema=data.schema,
        dense_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.05),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    data.setup("fit")  # untimed: dense statistics pre-pass

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
    if profiler:
        profiler.start()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    if profiler:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)

    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    n_params = sum(p.numel() for p in module.model.parameters())
    print(json.dumps({
        "schema": "mtl-bench/1", "lib": "lightning-mtr", "model": args.model, "rows": rows,
        "batch_size": args.batch_size, "train_seconds": round(seconds, 3),
        "samples_per_sec": round(rows / seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "auc_ctr": round(float(metrics["test/ctr/auc"]), 5), "auc_ctcvr": round(float(metrics["test/ctcvr/auc"]), 5),
        "logloss_ctr": round(float(metrics["test/ctr/logloss"]), 5),
        "logloss_ctcvr": round(float(metrics["test/ctcvr/logloss"]), 5),
        "n_params": n_params, "threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
