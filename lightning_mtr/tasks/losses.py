"""Masked per-task losses: each task is averaged over the rows of its sample space only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_mtr.schema import Task


def masked_task_losses(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
) -> dict[str, torch.Tensor]:
    """``{task: mean loss over rows where masks[task]}``: BCE-with-logits or MSE.

    A batch with no row in a task's space gives that task a loss of exactly 0 (with a
    gradient of 0), never NaN.
    """
    losses = {}
    for task in tasks:
        logit, label, mask = logits[task.name], labels[task.name], masks[task.name]
        if task.kind == "binary":
            per_row = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        else:
            per_row = F.mse_loss(logit, label, reduction="none")
        weight = mask.to(per_row.dtype)
        losses[task.name] = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
    return losses


def weighted_total(losses: Mapping[str, torch.Tensor], tasks: Sequence[Task]) -> torch.Tensor:
    return sum(task.weight * losses[task.name] for task in tasks)
