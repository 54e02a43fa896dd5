"""Metric collections per task kind, and the masked per-task container the training loop uses.

Every metric here takes ``update(logits, target)`` with float ``logits [B]`` (``[B, C]`` for
multiclass) and ``target [B]``; per-group metrics also take ``groups=`` ``[B]`` ids, which
``MetricCollection.update`` hands only to the metrics that accept it, so one call feeds them
all. Binary metrics receive raw logits and apply ``sigmoid`` themselves where they need
probabilities; for regression the "logits" are the predictions.
"""

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC
from torchmetrics.utilities.data import dim_zero_cat

from lightning_mtr.metrics.binned_auc import BinnedBinaryAUROC
from lightning_mtr.metrics.grouped import GroupAUC, GroupNDCG
from lightning_mtr.schema import TASK_KINDS, Task

AUC_MODES = ("exact", "binned")


class LogitBinaryAUROC(BinaryAUROC):
    """torchmetrics' exact ``BinaryAUROC`` (``thresholds=None``) fed logits.

    torchmetrics 1.0.3 applies ``sigmoid`` only to a batch that has a value
    outside [0, 1], so a batch of logits that happen to lie in [0, 1] would be
    stored unsquashed next to squashed ones. Squashing every batch here avoids
    that. float32 ``sigmoid`` rounds to 1.0 above a logit of about 17, so such
    rows tie with each other.

    With fewer than two classes seen (no rows included) the AUC is undefined and
    ``compute`` returns NaN, as ``BinnedBinaryAUROC`` does; torchmetrics 1.0.3
    would warn and return 0, which reads as a model that ranks every pair wrong.
    """

    def __init__(self, **kwargs):
        super().__init__(thresholds=None, **kwargs)

    def update(self, logits: Tensor, target: Tensor) -> None:
        super().update(logits.sigmoid(), target)

    def compute(self) -> Tensor:
        target = dim_zero_cat(self.target) if len(self.target) else torch.zeros(0)
        if not (bool((target == 1).any()) and bool((target == 0).any())):
            return torch.tensor(float("nan"), device=target.device)
        return super().compute()


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


class _MeanLoss(torchmetrics.MeanMetric):
    """Mean of per-row losses over all rows seen (NaN before any). The running sums are float64,
    so millions of rows add up without float32 round-off; torchmetrics still sums each batch's
    rows in float32."""

    higher_is_better = False

    def __init__(self, **kwargs):
        # a NaN row (a diverged model) makes the mean NaN, as in torch, instead of being dropped
        super().__init__(nan_strategy=float("nan"), **kwargs)
        self.set_dtype(torch.float64)  # torchmetrics keeps state dtypes from .to()/.half(); this changes them

    def compute(self) -> Tensor:
        return super().compute().float()


class BinaryLogLoss(_MeanLoss):
    """Mean binary cross-entropy of ``logits [B]`` against labels ``target [B]`` in [0, 1].
    From logits (``binary_cross_entropy_with_logits``), so a saturated prediction keeps a finite
    loss where ``log(sigmoid(x))`` would give ``-inf``."""

    def update(self, logits: Tensor, target: Tensor) -> None:
        super().update(F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none"))


class MulticlassLogLoss(_MeanLoss):
    """Mean softmax cross-entropy of ``logits [B, C]`` against class ``target [B]``."""

    def update(self, logits: Tensor, target: Tensor) -> None:
        super().update(F.cross_entropy(logits.double(), target.long(), reduction="none"))


class _FromLogits(torchmetrics.Metric):
    """Feeds a torchmetrics multiclass metric softmax probabilities and integer classes (so a
    batch of logits that happen to lie in [0, 1] is never taken for probabilities)."""

    full_state_update = False

    def __init__(self, metric: torchmetrics.Metric, **kwargs):
        super().__init__(**kwargs)
        self.metric = metric

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.metric.update(torch.softmax(logits.float(), dim=-1), target.long())

    def compute(self) -> Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()


class MacroAUROC(_FromLogits):
    """Macro one-vs-rest AUC of ``logits [B, C]`` over the classes whose AUC is defined: a class
    absent from the rows (or in every row) has one side empty and is left out, instead of the
    0 torchmetrics 1.0.3 averages in for it; NaN when no class is defined."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(MulticlassAUROC(num_classes, average="none", thresholds=None), **kwargs)
        self.add_state("class_rows", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        super().update(logits, target)
        self.class_rows += torch.bincount(target.long(), minlength=len(self.class_rows))

    def compute(self) -> Tensor:
        defined = (self.class_rows > 0) & (self.class_rows < self.class_rows.sum())
        if not bool(defined.any()):
            return torch.tensor(float("nan"), device=self.class_rows.device)
        with warnings.catch_warnings():  # torchmetrics' warnings on the undefined classes left out here
            warnings.filterwarnings("ignore", "No (positive|negative) samples in targets")
            return self.metric.compute()[defined].mean()


def task_metrics(task: Task, auc: str = "exact", num_bins: int = 65536) -> torchmetrics.MetricCollection:
    """The metrics of one task (every kind also counts its ``rows``).

    Args:
        task: a schema task. binary: ``auc``, ``logloss`` (and ``gauc`` with ``gauc_by``);
            regression: ``mse``; multiclass: ``accuracy``, ``auc`` (macro, one-vs-rest, over
            the classes present and not in every row), ``logloss``; ranking: ``ndcg@k`` for
            each k of ``ndcg_at`` and ``gauc`` (of
            relevance > 0, per group).
        auc: "exact" keeps every score (torchmetrics ``BinaryAUROC``);
            "binned" keeps a histogram of ``num_bins`` bins
            (``BinnedBinaryAUROC``: O(bins) memory and all-gather, AUC error
            bounded by the pairs sharing a bin). Prefer "binned" with several
            processes. Binary tasks only: the others always keep every row.
        num_bins: bins of the binned AUC.
    """
    if task.kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task.kind!r}; expected one of {TASK_KINDS}")
    if auc not in AUC_MODES:
        raise ValueError(f"unknown auc mode {auc!r}; expected one of {AUC_MODES}")
    metrics: dict[str, torchmetrics.Metric] = {"rows": RowCount()}
    if task.kind == "regression":
        metrics["mse"] = torchmetrics.MeanSquaredError()
    elif task.kind == "multiclass":
        metrics["accuracy"] = _FromLogits(MulticlassAccuracy(task.num_classes, average="micro"))
        metrics["auc"] = MacroAUROC(task.num_classes)
        metrics["logloss"] = MulticlassLogLoss()
    elif task.kind == "ranking":
        metrics.update({f"ndcg@{k}": GroupNDCG(k) for k in task.ndcg_at})
        metrics["gauc"] = GroupAUC()
    else:
        metrics["auc"] = LogitBinaryAUROC() if auc == "exact" else BinnedBinaryAUROC(num_bins, from_logits=True)
        metrics["logloss"] = BinaryLogLoss()
        if task.gauc_by is not None:
            metrics["gauc"] = GroupAUC()
    # compute_groups off: torchmetrics would otherwise merge metrics whose states look alike
    return torchmetrics.MetricCollection(metrics, compute_groups=False)


class MaskedTaskMetrics(torch.nn.Module):
    """Per-task metric collections, updated only on rows inside each task's sample space.

    A multi-task batch carries, per task, a boolean mask of the rows where the
    task's label is defined (e.g. CVR only on clicked rows). Each task's
    metrics see only those rows; a batch whose mask selects nothing leaves the
    task's states unchanged. The collections live in a ``ModuleDict`` so Lightning moves
    their states with the module.

    A task that saw no rows in the whole epoch (on all processes) reports
    ``rows`` = 0 and NaN for its other metrics instead of failing in
    ``compute()``; an AUC (or GAUC) over rows of one class is NaN too: undefined.

    Args:
        tasks: schema tasks; see ``task_metrics``.
        prefix: stage name leading every key, e.g. "val".
        auc: "exact" or "binned", see ``task_metrics``.
        num_bins: bins of the binned AUC.
    """

    def __init__(self, tasks: Sequence[Task], prefix: str, auc: str = "exact", num_bins: int = 65536):
        super().__init__()
        self.prefix = prefix
        self.group_of = {t.name: t.group_column for t in tasks}
        self.collections = torch.nn.ModuleDict({t.name: task_metrics(t, auc, num_bins) for t in tasks})

    def update(self, logits: dict[str, Tensor], labels: dict[str, Tensor], masks: dict[str, Tensor],
               groups: dict[str, Tensor] | None = None) -> None:
        """Update every task on its masked rows; each dict maps task name (``groups``: column
        name) to a ``[B]`` tensor (logits of a multiclass task: ``[B, C]``)."""
        for task, collection in self.collections.items():
            # Update even when the mask is empty: torchmetrics skips the all-gather of a list
            # state that is empty on one process, which would deadlock the others.
            mask = masks[task].bool()
            column = self.group_of[task]
            extra = {} if column is None else {"groups": groups[column][mask]}
            collection.update(logits[task][mask], labels[task][mask], **extra)

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
