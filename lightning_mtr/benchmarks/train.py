"""Throughput and quality benchmark: one training epoch, then test metrics, as one JSON line.

    python tools/bench_train.py --data DIR --model mmoe|esmm|... [--rows N] [--profile]
        [--precision bf16-mixed] [--baseline plain --repeats 3]

``DIR/train.parquet`` and ``DIR/test.parquet`` use the synthetic impression layout
(``lightning-mtr synth impressions --out DIR ...``; extra columns are ignored). Table
sizes come from the data (max id + 1 per column, from Parquet statistics). The timed part
is the training epoch (its start to its end): input pipeline, forward, backward, fused sparse update
and dense Adam step; ``Trainer.fit``'s seconds (with setup and the tables' initialisation) beside it.
Test metrics come from ``predict`` scores against the test file.
Beside it: the step's matrix-multiply bound on this machine (:mod:`~lightning_mtr.benchmarks.bound`),
the input pipeline's rows/s alone, and with ``--baseline plain`` the plain-PyTorch model of the
same shape (:mod:`~lightning_mtr.benchmarks.plain`), interleaved with ours. docs/benchmarks.md
says what each key means.
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from lightning_mtr.benchmarks import plain
from lightning_mtr.benchmarks.bound import Gemm, cpu_info, gemm_bound, gemm_times, record_gemms
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.models import MODELS
from lightning_mtr.embeddings import SparseOptimizer
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy, TorchRecStrategy
from lightning_mtr.training.trainer import Trainer

SPARSE = [f"C{j}" for j in range(1, 27)] + ["position"]
DENSE = [f"I{k}" for k in range(1, 14)]
CTR = {"name": "ctr", "label": "click"}
CTCVR = {"name": "ctcvr", "label": "click * conversion"}
CVR_CLICKED = {"name": "cvr", "label": "conversion", "sample_space": "click == 1"}


@dataclass(frozen=True)
class Setup:
    """A benchmarked model: registry name, its arguments and the tasks it trains."""

    registry_name: str
    kwargs: dict
    tasks: tuple[dict, ...]

    def __post_init__(self) -> None:
        if self.registry_name not in MODELS:
            raise ValueError(f"benchmark setup names unknown model {self.registry_name!r}; "
                             f"registered: {sorted(MODELS)}")


SETUPS = {
    "mmoe": Setup("mmoe", {"num_experts": 8, "expert": [256, 128], "tower": [64]}, (CTR, CTCVR)),
    "omoe": Setup("omoe", {"num_experts": 8, "expert": [256, 128], "tower": [64]}, (CTR, CTCVR)),
    "shared_bottom": Setup("shared_bottom", {"bottom": [256, 128], "tower": [64]}, (CTR, CTCVR)),
    "esmm": Setup("esmm", {"tower": [256, 128]}, (CTR, {**CVR_CLICKED, "weight": 0}, CTCVR)),
    # the ESMM paper's BASE: ESMM's CVR tower alone, trained on clicked rows only
    "esmm_base": Setup("shared_bottom", {"bottom": [], "tower": [256, 128]}, (CVR_CLICKED,)),
}


def table_sizes(train: Path) -> dict[str, int]:
    """Max id + 1 of each sparse column, from the Parquet row groups' statistics where every row
    group has them, else from one streaming pass: never the whole columns in memory."""
    file = pq.ParquetFile(train)
    columns = [file.schema_arrow.names.index(c) for c in SPARSE]
    stats = [[file.metadata.row_group(g).column(i).statistics for i in columns]
             for g in range(file.metadata.num_row_groups)]
    if all(s is not None and s.has_min_max for group in stats for s in group):
        maxima = [[s.max for s in group] for group in stats]
    else:
        maxima = [[pc.max(batch.column(c)).as_py() for c in SPARSE]
                  for batch in file.iter_batches(batch_size=65536, columns=SPARSE)]
    return {column: int(max(values)) + 1 for column, values in zip(SPARSE, zip(*maxima))}


def schema_from_data(train: Path, tasks: tuple[dict, ...]) -> dict:
    """The benchmark schema, with each table sized max id + 1 from the training file."""
    sizes = table_sizes(train)
    return {
        "sparse": [{"name": c, "num_embeddings": sizes[c], "embedding_dim": 16, "out_of_range": "modulo"}
                   for c in SPARSE],
        "dense": [{"name": c, "transform": "log1p_standardize"} for c in DENSE],
        "tasks": list(tasks),
        "ground_truth": ["gt_*"],
    }


def write_first_rows(source: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` rows of ``source`` copied to ``out``, streamed batch by batch."""
    file = pq.ParquetFile(source)
    if not 0 < rows <= file.metadata.num_rows:
        raise ValueError(f"--rows {rows}: {source} has {file.metadata.num_rows} rows; ask for 1 to that many")
    with pq.ParquetWriter(out, file.schema_arrow) as writer:
        for batch in file.iter_batches(batch_size=65536):
            writer.write_batch(batch.slice(0, rows), row_group_size=65536)
            rows -= min(rows, batch.num_rows)
            if rows == 0:
                break
    return out


class EpochSeconds(NamedTuple):
    epoch: float  # the training epoch's start to its end: what the plain model's timer covers
    fit: float  # Trainer.fit: the epoch, and setup, the tables' initialisation and teardown


class EpochTimer(L.Callback):
    """Times the training epoch alone: the plain model is built, its tables initialised, before its
    timer starts, so ours is timed from the same point (every batch's reading and encoding inside)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def train_one_epoch(model: str, data_dir: Path, rows: int | None = None, batch_size: int = 4096, seed: int = 0,
                    profile: bool = False, path: str = "single", precision: str = "32-true"):
    """Fit ``model`` for one epoch on ``data_dir/train.parquet``; returns (trainer, module, data, EpochSeconds).
    ``path``: ``single`` (``SingleProcessStrategy``: the tables fused in place, no process group) or ``torchrec``
    (``TorchRecStrategy`` on one process: DMP, TorchRec's fused optimizer, sharded checkpoints);
    ``precision``: the Trainer's (``32-true`` or ``bf16-mixed``)."""
    L.seed_everything(seed, verbose=False)
    setup = SETUPS[model]
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the schema and any --rows copy
    schema_path = workdir / "schema.yaml"
    schema_path.write_text(yaml.safe_dump(schema_from_data(data_dir / "train.parquet", setup.tasks)))
    train = data_dir / "train.parquet"
    if rows:
        train = write_first_rows(data_dir / "train.parquet", rows, workdir / "train.parquet")
    data = MultiTaskDataModule(str(schema_path), train=str(train), batch_size=batch_size, eval_batch_size=16384,
                               shuffle_buffer=65536, seed=seed)
    module = MultiTaskModule(
        model=lambda schema: MODELS[setup.registry_name](schema, **setup.kwargs), schema=data.schema,
        sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.05),
    )
    strategy = TorchRecStrategy() if path == "torchrec" else SingleProcessStrategy()
    timer = EpochTimer()
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                      precision=precision, enable_checkpointing=False, callbacks=[timer],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, inference_mode=False)
    data.setup("fit")
    _ = data.encoder  # untimed: the dense-statistics pre-pass happens when the encoder is built
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    if profiler:
        profiler.start()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = EpochSeconds(timer.seconds, time.perf_counter() - start)
    if profiler:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return trainer, module, data, seconds


def quality_metrics(trainer: L.Trainer, module: MultiTaskModule, data: MultiTaskDataModule, test: Path) -> dict:
    """``mtl-bench/1`` quality keys from predicted scores on ``test`` (in file order), and the same
    AUCs of the log's true probabilities (``truth_auc_*``), the Bayes-optimal ceiling of each."""
    data.paths["predict"] = str(test)
    batches = trainer.predict(module, datamodule=data)
    return score_metrics({key: np.concatenate([b[key].numpy() for b in batches]) for key in batches[0]}, test)


def score_metrics(scores: dict[str, np.ndarray], test: Path) -> dict:
    """:func:`quality_metrics` of ``{"score_<task>": probabilities}`` in ``test``'s row order."""
    truth = {"score_ctr": "gt_ctr", "score_cvr": "gt_cvr", "score_ctcvr": "gt_ctcvr"}
    table = pq.read_table(test, columns=["click", "conversion", "gt_conv_if_clicked", *truth.values()])
    labels = {c: table.column(c).to_numpy().astype(np.float64) for c in ("click", "conversion", "gt_conv_if_clicked")}
    labels["ctcvr"] = labels["click"] * labels["conversion"]
    metrics = _aucs(scores, labels)
    metrics.update({f"truth_{key}": value for key, value in _aucs(
        {key: table.column(truth[key]).to_numpy() for key in scores if key in truth}, labels).items()})
    clicked = labels["click"] == 1
    if "score_ctr" in scores:
        metrics.update(logloss_ctr=_logloss(scores["score_ctr"], labels["click"]),
                       mean_pred_ctr=float(scores["score_ctr"].mean()))
    if "score_ctcvr" in scores:
        metrics.update(logloss_ctcvr=_logloss(scores["score_ctcvr"], labels["ctcvr"]))
    if "score_cvr" in scores:
        metrics.update(logloss_cvr_clicked=_logloss(scores["score_cvr"][clicked], labels["conversion"][clicked]))
    return {key: round(value, 5) for key, value in metrics.items()}


def step_gemms(module: MultiTaskModule, data: MultiTaskDataModule, precision: str) -> tuple[list[Gemm], int, dict]:
    """The matrix products of one training step of ``module`` (its loss, forward and backward, under
    autocast for ``bf16-mixed`` as Lightning runs it) on a training batch: ``(products, batch size,
    keys)``, the keys FlopCounterMode's count beside the recorded products' and any custom op whose
    products the bound cannot see. :func:`~lightning_mtr.benchmarks.bound.gemm_bound` times them."""
    batch = next(iter(data.train_dataloader()))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            _, losses, extra = module.outputs_and_losses(batch)
            loss = module.total_loss(losses, extra)
        loss.backward()

    gemms, counted, custom_ops = record_gemms(step)
    module.zero_grad(set_to_none=True)
    return gemms, batch.batch_size, {"flop_counter_per_sample": round(counted / batch.batch_size),
                                     "ops_outside_bound": custom_ops}


def input_rows_per_sec(data: MultiTaskDataModule) -> float:
    """Rows/s of the training loader alone (read, shuffle, hash, encode) over one epoch."""
    rows, start = 0, time.perf_counter()
    for batch in data.train_dataloader():
        rows += batch.batch_size
    return round(rows / (time.perf_counter() - start), 1)


def _aucs(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """AUCs of the scores present: CTR, CTCVR, and pCVR on clicked rows and over all impressions,
    there against ``gt_conv_if_clicked`` (would this row have converted had it been clicked)."""
    metrics = {}
    if "score_ctr" in scores:
        metrics["auc_ctr"] = _auc(scores["score_ctr"], labels["click"])
    if "score_ctcvr" in scores:
        metrics["auc_ctcvr"] = _auc(scores["score_ctcvr"], labels["ctcvr"])
    if "score_cvr" in scores:
        clicked = labels["click"] == 1
        metrics["auc_cvr_clicked"] = _auc(scores["score_cvr"][clicked], labels["conversion"][clicked])
        metrics["auc_cvr_all"] = _auc(scores["score_cvr"], labels["gt_conv_if_clicked"])
    return metrics


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float64)), torch.from_numpy(labels).long()))


def _logloss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


PLAIN = {"mmoe": plain.PlainMMoE, "esmm": plain.PlainESMM}  # the setups with a plain-PyTorch baseline


def plain_epoch(model: str, train: Path, test: Path, sizes: dict[str, int], batch_size: int, seed: int,
                precision: str, quality: bool) -> tuple[float, dict]:
    """Samples/s of one epoch of the plain-PyTorch ``model`` (:mod:`~lightning_mtr.benchmarks.plain`)
    of the setup's shape on ``train``, and its ``plain_*`` quality keys on ``test`` if ``quality``."""
    torch.manual_seed(seed)
    log = plain.read_log(train, sizes, DENSE)
    net = PLAIN[model](list(sizes.values()), len(DENSE), **SETUPS[model].kwargs)
    seconds, _ = plain.train_epoch(net, log, batch_size, seed, precision)
    speed = len(log["click"]) / seconds
    if not quality:
        return speed, {}
    metrics = score_metrics(plain.predict(net, plain.read_log(test, sizes, DENSE, log["stats"])), test)
    return speed, {f"plain_{key}": value for key, value in metrics.items() if key.startswith("auc")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(SETUPS), default="mmoe")
    parser.add_argument("--rows", type=int, default=None, help="train on the first N rows (default: all)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top ops to stderr")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--path", choices=["single", "torchrec"], default="single",
                        help="training path: SingleProcessStrategy (tables fused in place) or TorchRecStrategy")
    parser.add_argument("--baseline", choices=["none", "plain"], default="none",
                        help="plain: also train the plain-PyTorch model of the same shape, interleaved with ours")
    parser.add_argument("--repeats", type=int, default=1, help="epochs of each, interleaved: ours, plain, ours, ...")
    parser.add_argument("--baseline-precision", choices=["32-true", "bf16-mixed"], default=None,
                        help="the plain model's precision (default: --precision; peers train in 32-true)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.baseline == "plain" and args.model not in PLAIN:
        parser.error(f"--baseline plain has models {sorted(PLAIN)}, not {args.model!r}")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: run each at least once")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"schema": "mtl-bench/1", "lib": "lightning-mtr", "model": args.model, "path": args.path,
              "precision": args.precision, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              **cpu_info()}
    ours, plains, rounds = [], [], []
    baseline_precision = args.baseline_precision or args.precision
    for repeat in range(args.repeats):
        trainer, module, data, seconds = train_one_epoch(args.model, args.data, args.rows, args.batch_size,
                                                         args.seed, args.profile, args.path, args.precision)
        rows = pq.ParquetFile(data.paths["train"]).metadata.num_rows
        ours.append(rows / seconds.epoch)
        if repeat == 0:
            result.update(rows=rows, train_seconds=round(seconds.epoch, 3), fit_seconds=round(seconds.fit, 3),
                          **quality_metrics(trainer, module, data, args.data / "test.parquet"),
                          n_params=sum(p.numel() for p in module.model.parameters()),
                          input_rows_per_sec=input_rows_per_sec(data))
            gemms, batch_size, step_keys = step_gemms(module, data, args.precision)
            result.update(step_keys)
        rounds.append(gemm_times(gemms))  # after every epoch of ours: each product's fastest round counts
        if args.baseline == "plain":
            speed, metrics = plain_epoch(args.model, Path(data.paths["train"]), args.data / "test.parquet",
                                         table_sizes(args.data / "train.parquet"), args.batch_size, args.seed,
                                         baseline_precision, quality=repeat == 0)
            plains.append(speed)
            result.update(metrics)
    result.update(gemm_bound(gemms, batch_size, args.precision, rounds))
    result.update(samples_per_sec=round(statistics.median(ours), 1), samples_per_sec_runs=[round(x, 1) for x in ours])
    result["share_of_bound"] = round(result["samples_per_sec"] / result["bound_samples_per_sec"], 3)
    if plains:
        result.update(plain_precision=baseline_precision, plain_samples_per_sec=round(statistics.median(plains), 1),
                      plain_samples_per_sec_runs=[round(x, 1) for x in plains],
                      speedup_vs_plain=round(statistics.median(a / b for a, b in zip(ours, plains)), 2))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0
