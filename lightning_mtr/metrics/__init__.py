"""Streaming metrics keyed by task: binned AUROC, logloss from logits, and masked per-task collections."""

from lightning_mtr.metrics.binned_auc import BinnedBinaryAUROC
from lightning_mtr.metrics.task_metrics import (
    AUC_MODES,
    TASK_KINDS,
    BinaryLogLoss,
    LogitBinaryAUROC,
    MaskedTaskMetrics,
    RowCount,
    task_metrics,
)

__all__ = [
    "AUC_MODES",
    "TASK_KINDS",
    "BinaryLogLoss",
    "BinnedBinaryAUROC",
    "LogitBinaryAUROC",
    "MaskedTaskMetrics",
    "RowCount",
    "task_metrics",
]
