"""Task plumbing shared by the probability-chain models (ESMM, ESM2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_mtr.schema import Schema


def check_chain_tasks(schema: Schema, supervised: Sequence[str], unsupervised: Sequence[str], model: str) -> None:
    """The schema must declare the chain's tasks as binary; derived-only tasks carry weight 0."""
    tasks = {task.name: task for task in schema.tasks}
    wanted = [*supervised, *unsupervised]
    missing = [name for name in wanted if name not in tasks]
    if missing:
        raise ValueError(f"{model} needs binary tasks {wanted}; the schema lacks {missing}")
    extra = [name for name in tasks if name not in wanted]
    if extra:
        raise ValueError(f"{model} predicts exactly the tasks {wanted}; the schema also has {extra}")
    for name in (*supervised, *unsupervised):
        if tasks[name].kind != "binary":
            raise ValueError(f"{model}: task {name!r} must be binary")
    for name in unsupervised:
        if tasks[name].weight != 0:
            raise ValueError(f"{model}: task {name!r} is learned only through the probability chain; "
                             f"set its weight to 0 (it is still evaluated on its sample space)")


def chain_targets(labels: Mapping[str, torch.Tensor] | None, names: Sequence[str], like: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` chain targets in ``names`` order; without labels (inference) zeros, whose losses are unused."""
    if labels is None:
        return like.new_zeros(like.shape[0], len(names))
    return torch.stack([labels[name].to(like.dtype) for name in names], dim=1)
