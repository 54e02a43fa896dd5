"""AITM (Xi et al., KDD 2021, "Modeling the Sequential Dependence among Audience Multi-step
Conversions with Multi-task Learning in Targeted Display Advertising").

Tasks are the steps of a conversion funnel (impression -> click -> conversion), trained over
all impressions: a conversion task's label is ``click * conversion``. Embeddings are shared;
each task t has its own tower ``q_t``; the first task uses ``z_1 = q_1`` and every later one
``z_t = AIT(g(z_{t-1}), q_t)`` (``lightning_mtr.nn.ait``), so information flows only down the
funnel. Each task's head sits on ``z_t``. The paper's loss is ``L_ce + alpha L_lc``: each
task's BCE plus the behavioural expectation calibrator
``L_lc = 1/N sum_rows sum_{t>=2} max(p_t - p_{t-1}, 0)``.

The BCEs are ordinary task losses (the trainer computes them, and any task weighting scales
them); the calibrator is returned by ``forward_with_losses`` as an extra loss term that the
trainer adds as it is, outside task weighting, so it stays ``alpha L_lc`` under learned
weights too. It is a mean over rows, as the paper's 1/N (the reference implementation sums
it over the batch, which ties alpha to the batch size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import MLP, TaskTowers
from lightning_mtr.nn.ait import AdaptiveInformationTransfer, expectation_calibrator
from lightning_mtr.schema import Schema


class AITM(nn.Module):
    """``features -> tower q_t per task -> z_1 = q_1, z_t = AIT(g(z_{t-1}), q_t) -> {task: logit}``.

    Args:
        schema: features and tasks (linked from the data module); every task is a funnel step.
        tasks: the schema's tasks in funnel order (earliest step first); default the schema's order.
        tower: hidden sizes of each task's tower, before its last layer of width ``ait_dim``.
        ait_dim: D, the width of ``q_t``, ``p_t``, ``z_t`` and the attention (the paper's 32).
        head: hidden sizes of each task's output MLP on ``z_t`` before its logit (the paper: none).
        alpha: weight of the behavioural expectation calibrator (the paper's 0.6).
        dropout: dropout in the towers, the transfers and the heads.
    """

    def __init__(self, schema: Schema, tasks: Sequence[str] | None = None, tower: Sequence[int] = (128, 64),
                 ait_dim: int = 32, head: Sequence[int] = (), alpha: float = 0.6, dropout: float = 0.0):
        super().__init__()
        self.funnel = funnel_tasks(schema, schema.task_names if tasks is None else tasks)
        if ait_dim < 1 or alpha < 0:
            raise ValueError(f"AITM: ait_dim must be >= 1 and alpha >= 0, got ait_dim={ait_dim}, alpha={alpha}")
        self.tasks = schema.task_names
        self.alpha = alpha
        self.features = FeatureInput(schema)
        self.towers = nn.ModuleDict({
            task: MLP(self.features.output_dim, (*tower, ait_dim), dropout) for task in self.funnel
        })
        self.transfers = nn.ModuleDict({  # keyed by the receiving task t >= 2
            task: AdaptiveInformationTransfer(ait_dim, dropout) for task in self.funnel[1:]
        })
        self.heads = TaskTowers(self.funnel, ait_dim, head, dropout)

    def label_order(self) -> list[tuple[str, str]]:
        """Each funnel step's label is at most the step before's (the data module checks it)."""
        return list(zip(self.funnel, self.funnel[1:]))

    def representations(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``{task: z_t [B, D]}`` in funnel order."""
        inputs = self.features(dense, sparse)
        z: dict[str, torch.Tensor] = {}
        for previous, task in zip([None, *self.funnel], self.funnel):
            own = self.towers[task](inputs)
            z[task] = own if previous is None else self.transfers[task](z[previous], own)
        return z

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.heads(self.representations(dense, sparse))

    def forward_with_losses(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                            labels: Mapping[str, torch.Tensor] | None):
        """``({task: logits [B]}, {}, {"calibrator": alpha * L_lc})``: no per-row task losses of
        its own (the trainer's BCE is the paper's), and the calibrator as an extra loss term,
        which needs no labels."""
        logits = self(dense, sparse)
        return logits, {}, {"calibrator": self.alpha * calibrator_loss(logits, self.funnel)}


def calibrator_loss(logits: Mapping[str, torch.Tensor], funnel: Sequence[str]) -> torch.Tensor:
    """The paper's ``L_lc = 1/N sum_rows sum_{t>=2} max(p_t - p_{t-1}, 0)``, a scalar."""
    steps = [expectation_calibrator(logits[previous], logits[task]) for previous, task in zip(funnel, funnel[1:])]
    return torch.stack(steps, dim=1).sum(1).mean()


def funnel_tasks(schema: Schema, tasks: Sequence[str]) -> list[str]:
    """The funnel, checked: every schema task exactly once, binary, trained over all impressions."""
    funnel, known = list(tasks), {task.name: task for task in schema.tasks}
    if len(funnel) < 2 or len(set(funnel)) != len(funnel):
        raise ValueError(f"AITM needs a funnel of two or more distinct tasks (earliest step first), got {funnel}")
    missing = [name for name in funnel if name not in known]
    if missing:
        raise ValueError(f"AITM: funnel tasks {missing} are not in the schema, whose tasks are {list(known)}")
    extra = [name for name in known if name not in funnel]
    if extra:
        raise ValueError(f"AITM predicts exactly its funnel {funnel}; the schema also has {extra}: add them to "
                         "the funnel or remove them from the schema")
    for name in funnel:
        task = known[name]
        if task.kind != "binary":
            raise ValueError(f"AITM: funnel task {name!r} must be binary, got {task.kind!r}")
        if task.sample_space is not None:
            raise ValueError(f"AITM trains every funnel step over all impressions; remove task {name!r}'s "
                             f"sample_space {task.sample_space!r} (a later step's label is e.g. click * conversion)")
        if task.weight == 0:
            raise ValueError(f"AITM: funnel task {name!r} has weight 0, which would drop its BCE loss; "
                             "AITM trains every funnel step")
    return funnel
