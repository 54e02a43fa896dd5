"""Metric collections per task kind, and the masked per-task container the training loop uses.

Every metric here takes the same ``update(logits, target)`` with float
``logits [B]`` and ``target [B]``, so one ``MetricCollection.update`` call
feeds them all. Binary metrics receive raw logits and apply ``sigmoid``
themselves where they need probabilities; for regression the "logits" are the
predictions.
"""

from collections.abc import Sequence

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.classification import BinaryAUROC

from lightning_mtr.metrics.binned_auc import BinnedBinaryAUROC
from lightning_mtr.metrics.logloss import BinaryLogLoss

TASK_KINDS = ("binary", "regression")
AUC_MODES = ("exact", "binned")


class LogitBinaryAUROC(BinaryAUROC):
    """torchmetrics' exact ``BinaryAUROC`` (``thresholds=None``) fed logits.

    torchmetrics 1.0.3 applies ``sigmoid`` only to a batch that has a value
    outside [0, 1], so a batch of logits that happen to lie in [0, 1] would be
    stored unsquashed next to squashed ones. Squashing every batch here avoids
    that. float32 ``sigmoid`` rounds to 1.0 above a logit of about 17, so such
    rows tie with each other.

    With fewer than two classes seen it warns and returns 0 (torchmetrics'
    convention, which ``BinnedBinaryAUROC`` follows); with no rows at all it
    raises ``ValueError``.
    """

    def __init__(self, **kwargs):
        super().__init__(thresholds=None, **kwargs)

    def update(self, logits: Tensor, target: Tensor) -> None:
        super().update(logits.sigmoid(), target)


class RowCount(torchmetrics.Metric):
    """Number of rows seen; tells how much data stands behind the other metrics of a task."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("rows", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.rows += target.numel()

    def compute(self) -> Tensor:
        # Lightning warns on and converts integer values it logs; float64 is exact up to 2**53 rows.
        return self.rows.double()


def task_metrics(kind: str, auc: str = "exact", num_bins: int = 65536) -> torchmetrics.MetricCollection:
    """The metrics of one task.

    Args:
        kind: "binary" gives ``auc``, ``logloss`` and ``rows``; "regression"
            gives ``mse`` and ``rows``.
        auc: "exact" keeps every score (torchmetrics ``BinaryAUROC``);
            "binned" keeps a histogram of ``num_bins`` bins
            (``BinnedBinaryAUROC``: O(bins) memory and all-gather, AUC error
            bounded by the pairs sharing a bin). Prefer "binned" with several
            processes.
        num_bins: bins of the binned AUC.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    if auc not in AUC_MODES:
        raise ValueError(f"unknown auc mode {auc!r}; expected one of {AUC_MODES}")
    if kind == "regression":
        return torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError(), "rows": RowCount()})
    auc_metric = LogitBinaryAUROC() if auc == "exact" else BinnedBinaryAUROC(num_bins, from_logits=True)
    return torchmetrics.MetricCollection({"auc": auc_metric, "logloss": BinaryLogLoss(), "rows": RowCount()})


class MaskedTaskMetrics(torch.nn.Module):
    """Per-task metric collections, updated only on rows inside each task's sample space.

    A multi-task batch carries, per task, a boolean mask of the rows where the
    task's label is defined (e.g. CVR only on clicked rows). Each task's
    metrics see only those rows; a batch whose mask selects nothing leaves the
    task's states unchanged. The collections live in a ``ModuleDict`` so Lightning moves
    their states with the module.

    A task that saw no rows in the whole epoch (on all processes) reports
    ``rows`` = 0 and NaN for its other metrics instead of failing in
    ``compute()``.

    Args:
        tasks: ``(name, kind)`` pairs; kind as in ``task_metrics``.
        prefix: stage name leading every key, e.g. "val".
        auc: "exact" or "binned", see ``task_metrics``.
        num_bins: bins of the binned AUC.
    """

    def __init__(self, tasks: Sequence[tuple[str, str]], prefix: str, auc: str = "exact", num_bins: int = 65536):
        super().__init__()
        self.prefix = prefix
        self.collections = torch.nn.ModuleDict({name: task_metrics(kind, auc, num_bins) for name, kind in tasks})

    def update(self, logits: dict[str, Tensor], labels: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
        """Update every task on its masked rows; each dict maps task name to a ``[B]`` tensor."""
        for task, collection in self.collections.items():
            # Update even when the mask is empty: torchmetrics skips the all-gather of a list
            # state that is empty on one process, which would deadlock the others.
            mask = masks[task].bool()
            collection.update(logits[task][mask], labels[task][mask])

    def compute(self) -> dict[str, Tensor]:
        """Metrics keyed ``"{prefix}/{task}/{metric}"``, e.g. ``"val/ctr/auc"``."""
        results = {}
        for task, collection in self.collections.items():
            rows = collection["rows"].compute()  # summed over processes, so every process takes the same branch
            if rows == 0:
                values = {name: torch.full_like(rows, float("nan")) for name in collection}
                values["rows"] = rows
            else:
                values = collection.compute()
            results.update({f"{self.prefix}/{task}/{name}": value for name, value in values.items()})
        return results

    def reset(self) -> None:
        for collection in self.collections.values():
            collection.reset()
