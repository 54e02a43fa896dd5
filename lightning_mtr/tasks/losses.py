"""Masked per-task losses: each task is averaged over the rows of its sample space only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_mtr.schema import Task
from lightning_mtr.tasks.ranking import GROUPED_RANKING_LOSSES, pointwise_logistic_loss


def row_losses(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
               tasks: Sequence[Task]) -> dict[str, torch.Tensor]:
    """``{task: [B]}`` per-row loss: BCE-with-logits for binary tasks, squared error for
    regression, softmax cross-entropy for multiclass (ranking losses compare rows: not here)."""
    losses = {}
    for task in tasks:
        logit, label = logits[task.name], labels[task.name]
        if task.kind == "binary":
            losses[task.name] = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        elif task.kind == "multiclass":
            losses[task.name] = F.cross_entropy(logit, label.long(), reduction="none")
        elif task.kind == "regression":
            losses[task.name] = F.mse_loss(logit, label, reduction="none")
        else:
            raise ValueError(f"task {task.name!r}: {task.kind} losses are not per row")
    return losses


def masked_task_losses(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    given: Mapping[str, torch.Tensor] | None = None,
    groups: Mapping[str, torch.Tensor] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{task: mean loss over rows where masks[task]}``.

    ``given`` holds per-row losses a model computed itself (e.g. ESMM's fused probability
    chain); the other tasks get :func:`row_losses`, and ranking tasks their ranking loss over
    the masked rows: grouped by ``groups[task.group]``, or point-wise weighted by
    ``row_weights[task.name]`` (the encoder's ``n_i``). A batch with no row in a task's space
    gives that task a loss of exactly 0 (with a gradient of 0), never NaN.
    """
    given = dict(given or {})
    ranking = [t for t in tasks if t.kind == "ranking" and t.name not in given]
    per_row = {**row_losses(logits, labels, [t for t in tasks if t.name not in given and t not in ranking]), **given}
    losses = {}
    for task in tasks:
        if task in ranking:
            mask = masks[task.name].bool()
            scores, relevance = logits[task.name][mask].float(), labels[task.name][mask]
            if task.ranking_loss == "pointwise":
                if task.name not in (row_weights or {}):
                    raise ValueError(f"task {task.name!r}: ranking_loss pointwise needs its rows' weights n_i "
                                     "(row_weights, as the BatchEncoder writes them into Batch.row_weights)")
                losses[task.name] = pointwise_logistic_loss(scores, relevance, row_weights[task.name][mask])
            else:
                grouped = GROUPED_RANKING_LOSSES[task.ranking_loss]
                losses[task.name] = grouped(scores, relevance, groups[task.group][mask])
            continue
        # fp32 sums: under bf16 autocast a bf16 row count rounds (2049 rows would count as 2048)
        weight = masks[task.name].float()
        losses[task.name] = (per_row[task.name].float() * weight).sum() / weight.sum().clamp_min(1.0)
    return losses


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
    """``sum_k w_k L_k``: the training loss under any task weighting, and ``val/loss`` under the
    schema's (``Schema.task_weights``)."""
    return sum(weight * losses[name] for name, weight in weights.items())
