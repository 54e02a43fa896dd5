"""The YouTube multitask ranker (Zhao et al., RecSys 2019, "Recommending What Video to Watch Next").

MMoE with its experts on a shared hidden layer, over every feature but the position ones;
plus a shallow tower fed by position (and, e.g., device) whose bias logit is added to the
engagement tasks' logits only. Position shows where an item was *displayed*, which raises its
click rate whatever its relevance; the shallow tower absorbs that bias so the main tower
learns relevance. At serving the position is unknown: the tower then reads a learned
"missing" input, so its term no longer depends on position (trained by dropping the position
of a share of rows, the paper's 10%).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.nn import MLP, FeatureInput, MixtureBottom, TaskTowers
from lightning_mtr.schema import Schema


class YouTubeRanker(nn.Module):
    """``features - position -> shared layer -> MMoE -> towers``, plus ``position -> shallow tower``
    added to the engagement logits.

    Args:
        schema: features and tasks (linked from the data module).
        engagement: tasks that get the shallow tower's bias (e.g. click, watch time); the others
            are satisfaction tasks (e.g. like, rating) and get none.
        position_features: sparse features that carry the display position (and device); the
            main tower never sees them.
        shared: hidden sizes of the layer the experts sit on.
        num_experts, expert: the MMoE experts.
        tower: hidden sizes of each task tower.
        shallow_tower: hidden sizes of the position tower (empty: one linear layer); ``None``
            drops the tower and with it every use of position (a baseline).
        position_dropout: share of training rows whose position is replaced by "missing".
        gate_dropout: probability that an expert is left out of a row's gate in training.
        dropout: dropout in the task towers.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix.
    """

    def __init__(self, schema: Schema, engagement: Sequence[str], position_features: Sequence[str] = ("position",),
                 shared: Sequence[int] = (256,), num_experts: int = 8, expert: Sequence[int] = (128,),
                 tower: Sequence[int] = (64,), shallow_tower: Sequence[int] | None = (16,),
                 position_dropout: float = 0.1,
                 gate_dropout: float = 0.1, dropout: float = 0.0, gate_backend: str = "auto"):
        super().__init__()
        self.tasks = schema.task_names
        unknown = sorted(set(engagement) - set(self.tasks))
        if unknown or not engagement:
            raise ValueError(f"engagement tasks {unknown or list(engagement)} must be some of the schema's tasks "
                             f"{self.tasks}")
        several = [name for name, width in schema.task_outputs.items() if name in engagement and width != 1]
        if several:
            raise ValueError(f"engagement tasks {several} have one logit per class; the shallow tower's bias is one "
                             "logit, for binary or regression engagement tasks")
        self.engagement = list(engagement)
        self.features = FeatureInput(schema)
        missing = sorted(set(position_features) - set(self.features.feature_names))
        if missing or not position_features:
            raise ValueError(f"position features {missing or list(position_features)} must be sparse features of "
                             f"the schema ({self.features.feature_names})")
        self.main_columns, self.position_columns = _split_columns(self.features, set(position_features))
        if not 0.0 <= position_dropout < 1.0:
            raise ValueError(f"position_dropout must be in [0, 1), got {position_dropout}")
        self.position_dropout = position_dropout
        self.shared = MLP(_width(self.main_columns), shared)
        self.bottom = MixtureBottom(self.shared.output_dim, len(self.tasks), num_experts, expert,
                                    gate_backend=gate_backend, gate_names=self.tasks, gate_dropout=gate_dropout)
        self.towers = TaskTowers(schema.task_outputs, self.bottom.output_dim, tower, dropout)
        position_dim = _width(self.position_columns)
        self.missing_position = nn.Parameter(torch.empty(position_dim))
        self.shallow = None if shallow_tower is None else nn.Sequential(
            MLP(position_dim, shallow_tower), nn.Linear(shallow_tower[-1] if shallow_tower else position_dim, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The "missing position" input starts at zero (the towers' layers reset themselves)."""
        nn.init.zeros_(self.missing_position)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        features = self.features(dense, sparse)
        main = torch.cat([features[:, a:b] for a, b in self.main_columns], dim=1)
        mixed = self.bottom(self.shared(main))  # [B, T, D]
        logits = self.towers({task: mixed[:, t] for t, task in enumerate(self.tasks)})
        if self.shallow is None:
            return logits
        bias = self.position_bias(torch.cat([features[:, a:b] for a, b in self.position_columns], dim=1))
        return {task: logit + bias if task in self.engagement else logit for task, logit in logits.items()}

    def position_bias(self, position: torch.Tensor) -> torch.Tensor:
        """The shallow tower's logit ``[B]``: from the position in training (dropped for a share
        of rows), from "missing" in evaluation and serving."""
        missing = self.missing_position.expand_as(position)
        if not self.training:
            position = missing
        elif self.position_dropout:
            dropped = torch.rand(position.shape[0], 1, device=position.device) < self.position_dropout
            position = torch.where(dropped, missing, position)
        return self.shallow(position)[:, 0]


def _split_columns(features: FeatureInput, position: set[str]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Column ranges of ``features``' output: (everything else, the position features)."""
    main = [(0, features.dense_dim)] if features.dense_dim else []
    main += [features.offsets[n] for n in features.feature_names if n not in position]
    return main, [features.offsets[n] for n in features.feature_names if n in position]


def _width(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)
