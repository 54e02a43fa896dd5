"""Masked per-task losses: each task is averaged over the rows of its sample space only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_mtr.schema import Task


def row_losses(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
               tasks: Sequence[Task]) -> dict[str, torch.Tensor]:
    """``{task: [B]}`` per-row loss: BCE-with-logits for binary tasks, squared error for regression."""
    losses = {}
    for task in tasks:
        logit, label = logits[task.name], labels[task.name]
        if task.kind == "binary":
            losses[task.name] = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        else:
            losses[task.name] = F.mse_loss(logit, label, reduction="none")
    return losses


def masked_task_losses(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    given: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{task: mean loss over rows where masks[task]}``.

    ``given`` holds per-row losses a model computed itself (e.g. ESMM's fused probability
    chain); the other tasks get :func:`row_losses`. A batch with no row in a task's space
    gives that task a loss of exactly 0 (with a gradient of 0), never NaN.
    """
    given = dict(given or {})
    per_row = {**row_losses(logits, labels, [t for t in tasks if t.name not in given]), **given}
    losses = {}
    for task in tasks:
        # fp32 sums: under bf16 autocast a bf16 row count rounds (2049 rows would count as 2048)
        weight = masks[task.name].float()
        losses[task.name] = (per_row[task.name].float() * weight).sum() / weight.sum().clamp_min(1.0)
    return losses


def weighted_total(losses: Mapping[str, torch.Tensor], tasks: Sequence[Task]) -> torch.Tensor:
    return sum(task.weight * losses[task.name] for task in tasks)
