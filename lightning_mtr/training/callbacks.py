"""Callbacks: the per-task report printed after fit/test, and the Parquet prediction writer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_mtr.data.batch import output_column


_COLUMNS = ("rows", "auc", "logloss", "mse")
_HEADER = (("task", "<16"), ("kind", "<12"), ("rows", ">12"), ("auc", ">10"), ("logloss", ">10"), ("mse", ">12"))
# NaN over rows that hold one class (in every group, for GAUC): undefined, not a bad model
_UNDEFINED = {"auc": "n/a (one class)", "gauc": "n/a (one class per group)"}


def format_report(stage: str, tasks: list[tuple[str, str]], metrics: dict[str, Any]) -> str:
    """A fixed-width table: task, kind, rows in its sample space, AUC, logloss, MSE, and the
    metrics of other kinds (accuracy, GAUC, NDCG@k) as ``name=value`` in a last column. An AUC
    that is NaN on rows that exist reads ``n/a (one class)`` (GAUC: ``n/a (one class per
    group)``); a column widens to fit it."""
    def value(task: str, name: str, fmt: str) -> str:
        found = metrics.get(f"{stage}/{task}/{name}")
        if found is None:
            return "-"
        if math.isnan(float(found)) and name in _UNDEFINED and float(metrics.get(f"{stage}/{task}/rows", 0)) > 0:
            return _UNDEFINED[name]
        return format(float(found), fmt)

    def others(task: str) -> str:
        prefix = f"{stage}/{task}/"
        names = [k[len(prefix):] for k in metrics if k.startswith(prefix) and k[len(prefix):] not in _COLUMNS]
        return "  ".join(f"{name}={value(task, name, '.4f')}" for name in sorted(names))

    rows = [[task, kind, value(task, "rows", ".0f"), value(task, "auc", ".4f"), value(task, "logloss", ".4f"),
             value(task, "mse", ".4f"), others(task)] for task, kind in tasks]
    widths = [max([int(spec[1:]), *(len(row[c]) + 2 for row in rows)]) for c, (_, spec) in enumerate(_HEADER)]

    def line(cells: list[str]) -> str:
        fixed = "".join(format(cell, f"{spec[0]}{width}") for cell, (_, spec), width in zip(cells, _HEADER, widths))
        return f"{fixed}  {cells[-1]}".rstrip()

    return "\n".join([line([name for name, _ in _HEADER] + ["other"]), *(line(row) for row in rows)])


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)  # stdout, so `lightning-mtr test ... > report.txt` keeps the table


class TaskReport(L.Callback):
    """Prints the per-task table after ``fit`` (last validation) and after ``test``."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print("val", trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print("test", trainer, pl_module)

    def _print(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if not any(key.startswith(f"{stage}/") for key in metrics):
            return
        tasks = [(t.name, t.kind) for t in pl_module.schema.tasks]
        _print(f"\nPer-task {stage} metrics\n{format_report(stage, tasks, metrics)}")


class ParquetPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` output (per-task scores and extras) to ``output_dir/predictions-rank{R}.parquet``,
    batch by batch.

    Args:
        output_dir: directory for the Parquet files (one per process).
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._writer: pq.ParquetWriter | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, torch.Tensor], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        table = pa.table({name: output_column(values) for name, values in prediction.items()})
        if self._writer is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"predictions-rank{trainer.global_rank}.parquet"
            self._writer = pq.ParquetWriter(path, table.schema)
        self._writer.write_table(table)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is not None:
            self._writer.close()
            rank_zero_info(f"predictions written to {self.output_dir}/")
            self._writer = None
