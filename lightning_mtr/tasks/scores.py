"""Logits -> the scores a user reads: what ``predict`` writes and an exported program returns."""

from __future__ import annotations

import torch

from lightning_mtr.schema import Schema


def output_names(schema: Schema) -> list[str]:
    """The scores in order: a binary task's probability, a multiclass task's one per class
    (``{task}_{class}``), a regression or ranking task's value."""
    return [name for t in schema.tasks
            for name in ([f"{t.name}_{c}" for c in range(t.num_classes)] if t.kind == "multiclass" else [t.name])]


def probabilities(schema: Schema, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{output: [B]}`` float32, in :func:`output_names` order."""
    scores = {}
    for task in schema.tasks:
        logit = logits[task.name].float()
        if task.kind == "multiclass":
            scores.update({f"{task.name}_{c}": p for c, p in enumerate(torch.softmax(logit, -1).unbind(-1))})
        else:
            scores[task.name] = torch.sigmoid(logit) if task.kind == "binary" else logit
    return scores
