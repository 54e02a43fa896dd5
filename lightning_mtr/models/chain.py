"""ProbabilityChainModel, the base class of the entire-space models (ESMM, ESM2): embeddings ->
bottom -> heads -> one fused probability-chain op that returns the chain's logits and its per-row
losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.kernels import Backend
from lightning_mtr.kernels.prob_chain import probability_chain
from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn.bottoms import BottomFactory, branch_outputs
from lightning_mtr.nn.towers import TaskTowers
from lightning_mtr.schema import Schema


class ProbabilityChainModel(nn.Module):
    """Subclasses name the chain and its roles (see ``lightning_mtr.kernels.prob_chain``):

    - ``CHAIN``: the op's chain, ``esmm`` or ``esm2``.
    - ``HEADS``: one tower per head logit, in the op's head order.
    - ``OUTPUTS``: the role of each chain-logit column; ``task_names`` maps them to the
      schema's tasks, in this order.
    - ``SUPERVISED``: the roles trained by the op's losses (over all impressions); the other
      outputs are derived only: the model trains them with weight 0 (``required_task_weights``),
      whatever the schema says, and they are still evaluated on their sample space.
    - ``FUNNEL``: ``(earlier, later)`` supervised roles whose chain probability can never exceed
      the earlier one's (e.g. pCTCVR = pCTR * pCVR <= pCTR), so neither may their labels.
    """

    CHAIN: str
    HEADS: tuple[str, ...]
    OUTPUTS: tuple[str, ...]
    SUPERVISED: tuple[str, ...]
    FUNNEL: tuple[tuple[str, str], ...]

    def __init__(self, schema: Schema, tower: Sequence[int], bottom: BottomFactory, dropout: float,
                 task_names: Sequence[str], chain_backend: Backend):
        super().__init__()
        if len(task_names) != len(self.OUTPUTS):
            raise ValueError(f"{type(self).__name__}: task_names names the outputs {self.OUTPUTS}, "
                             f"got {list(task_names)}")
        self.task_of = dict(zip(self.OUTPUTS, task_names))
        self.derived = [self.task_of[r] for r in self.OUTPUTS if r not in self.SUPERVISED]
        check_chain_tasks(schema, [self.task_of[r] for r in self.SUPERVISED], self.derived, type(self).__name__)
        self.tasks = schema.task_names
        self.chain_backend = chain_backend
        self.features = FeatureInput(schema)
        self.bottom = bottom(self.features.output_dim, len(self.HEADS))
        self.heads = TaskTowers(self.HEADS, self.bottom.output_dim, tower, dropout)

    def required_task_weights(self) -> dict[str, float]:
        """The derived tasks learn only through the chain: no direct loss (weight 0)."""
        return {task: 0.0 for task in self.derived}

    def label_order(self) -> list[tuple[str, str]]:
        """``(earlier, later)`` task names: the later label must be <= the earlier on every row
        (the data module checks it while reading)."""
        return [(self.task_of[earlier], self.task_of[later]) for earlier, later in self.FUNNEL]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.forward_with_losses(dense, sparse, None)[0]

    def forward_with_losses(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                            labels: Mapping[str, torch.Tensor] | None):
        """``({task: logits [B]}, {supervised task: per-row loss [B]}, {})`` (no extra loss term);
        without labels the losses are unused."""
        shared = branch_outputs(self.bottom(self.features(dense, sparse)), len(self.HEADS), self.bottom)
        heads = self.heads(dict(zip(self.HEADS, shared)))
        head_logits = torch.stack([heads[name] for name in self.HEADS], dim=1)  # [B, H]
        supervised = [self.task_of[role] for role in self.SUPERVISED]
        targets = chain_targets(labels, supervised, head_logits)
        # in fp32 under bf16 autocast too: the chain's losses then reach the loss sum unrounded, and [B, H] is cheap
        chain, losses = probability_chain(head_logits.float(), targets, self.CHAIN, backend=self.chain_backend)
        logits = {self.task_of[role]: column for role, column in zip(self.OUTPUTS, chain.unbind(1))}
        return logits, dict(zip(supervised, losses.unbind(1))), {}


def check_chain_tasks(schema: Schema, supervised: Sequence[str], derived: Sequence[str], model: str) -> None:
    """Exactly the chain's tasks, all binary; supervised ones over all impressions."""
    tasks = {task.name: task for task in schema.tasks}
    wanted = [*supervised, *derived]
    missing = [name for name in wanted if name not in tasks]
    if missing:
        raise ValueError(f"{model} needs binary tasks {wanted}; the schema lacks {missing}")
    extra = [name for name in tasks if name not in wanted]
    if extra:
        raise ValueError(f"{model} predicts exactly the tasks {wanted}; the schema also has {extra}")
    for name in wanted:
        if tasks[name].kind != "binary":
            raise ValueError(f"{model}: task {name!r} must be binary")
    for name in supervised:
        if tasks[name].sample_space is not None:
            raise ValueError(f"{model}: task {name!r} is trained over all impressions (the entire space); "
                             f"remove its sample_space {tasks[name].sample_space!r}")


def chain_targets(labels: Mapping[str, torch.Tensor] | None, names: Sequence[str], like: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` chain targets in ``names`` order; without labels (inference) zeros."""
    if labels is None:
        return like.new_zeros(like.shape[0], len(names))
    return torch.stack([labels[name].to(like.dtype) for name in names], dim=1)
