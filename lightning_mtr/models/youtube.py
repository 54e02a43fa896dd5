"""The YouTube multitask ranker (Zhao et al., RecSys 2019, "Recommending What Video to Watch Next").

MMoE with its experts on a shared hidden layer, over every feature but the position (and
shallow-only) ones; plus a shallow tower fed by the position and by features that change how
much position matters (e.g. the device), whose bias logit is added to the engagement tasks'
logits only.
Position shows where an item was *displayed*, which raises its click rate whatever its
relevance; the shallow tower absorbs that bias so the main tower learns relevance. At serving
the position is unknown: the tower then reads a learned "missing" input in its place (trained
by dropping the position of a share of rows, the paper's 10%) while the device still reaches
it, so the bias is a constant per device, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.kernels import Backend
from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import MLP, MixtureBottom, TaskTowers
from lightning_mtr.schema import Schema


class YouTubeRanker(nn.Module):
    """``features - position (- shallow features) -> shared layer -> MMoE -> towers``, plus
    ``[position, shallow features] -> shallow tower`` added to the engagement logits.

    Args:
        schema: features and tasks (linked from the data module).
        engagement: tasks that get the shallow tower's bias (e.g. click, watch time); the others
            are satisfaction tasks (e.g. like, rating) and get none.
        position_features: sparse features that carry the display position: dropped out in
            training, "missing" at serving, never in the main tower.
        shallow_features: sparse features the shallow tower reads beside the position and keeps
            at serving (e.g. the device, whose position bias differs).
        shallow_in_main: the shallow features also feed the main tower (where a device matters
            to relevance too). Off by default: a main tower that sees the device learns part of
            its position bias, which then stays in the served scores (tools/position_bias.py).
        shared: hidden sizes of the layer the experts sit on.
        num_experts, expert: the MMoE experts.
        tower: hidden sizes of each task tower.
        shallow_tower: hidden sizes of the shallow tower (empty: one linear layer); ``None``
            drops the tower and with it every use of position (a baseline).
        position_dropout: share of training rows whose position is replaced by "missing".
        gate_dropout: probability that an expert is left out of a row's gate in training.
        dropout: dropout in the task towers.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix.
    """

    def __init__(self, schema: Schema, engagement: Sequence[str], position_features: Sequence[str] = ("position",),
                 shallow_features: Sequence[str] = (), shallow_in_main: bool = False,
                 shared: Sequence[int] = (256,), num_experts: int = 8, expert: Sequence[int] = (128,),
                 tower: Sequence[int] = (64,), shallow_tower: Sequence[int] | None = (16,),
                 position_dropout: float = 0.1,
                 gate_dropout: float = 0.1, dropout: float = 0.0, gate_backend: Backend = "auto"):
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
        _check_features(self.features, position_features, shallow_features)
        if not 0.0 <= position_dropout < 1.0:
            raise ValueError(f"position_dropout must be in [0, 1), got {position_dropout}")
        self.position_dropout = position_dropout
        left_out = set(position_features) | (set() if shallow_in_main else set(shallow_features))
        self.main_features = [n for n in self.features.feature_names if n not in left_out]
        self.position_features, self.shallow_features = list(position_features), list(shallow_features)
        if not self.features.dense_dim + self.features.widths(self.main_features):
            raise ValueError("YouTubeRanker: the main tower would read no feature (no dense features, and every sparse "
                             "one is a position or shallow-only feature); set shallow_in_main: true or add features")
        self.shared = MLP(self.features.dense_dim + self.features.widths(self.main_features), shared)
        self.bottom = MixtureBottom(self.shared.output_dim, len(self.tasks), num_experts, expert,
                                    gate_backend=gate_backend, gate_names=self.tasks, gate_dropout=gate_dropout)
        self.towers = TaskTowers(schema.task_outputs, self.bottom.output_dim, tower, dropout)
        self.missing_position = nn.Parameter(torch.empty(self.features.widths(self.position_features)))
        shallow_dim = self.features.widths(self.position_features) + self.features.widths(self.shallow_features)
        self.shallow = None if shallow_tower is None else nn.Sequential(
            MLP(shallow_dim, shallow_tower), nn.Linear(shallow_tower[-1] if shallow_tower else shallow_dim, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The "missing position" input starts at zero (the towers' layers reset themselves)."""
        nn.init.zeros_(self.missing_position)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        features = self.features(dense, sparse)
        dense_part = features[:, :self.features.dense_dim]
        main = torch.cat([dense_part, self.features.columns(features, self.main_features)], dim=1)
        logits = self.towers(dict(zip(self.tasks, self.bottom(self.shared(main)))))
        if self.shallow is None:
            return logits
        bias = self.position_bias(self.features.columns(features, self.position_features),
                                  self.features.columns(features, self.shallow_features))
        return {task: logit + bias if task in self.engagement else logit for task, logit in logits.items()}

    def position_bias(self, position: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The shallow tower's logit ``[B]`` on ``[position, kept]``: the position is read in
        training (dropped for a share of rows) and replaced by "missing" in evaluation and
        serving; the ``kept`` shallow features always reach the tower."""
        missing = self.missing_position.expand_as(position)
        if not self.training:
            position = missing
        elif self.position_dropout:
            dropped = torch.rand(position.shape[0], 1, device=position.device) < self.position_dropout
            position = torch.where(dropped, missing, position)
        return self.shallow(torch.cat([position, kept], dim=1))[:, 0]


def _check_features(features: FeatureInput, position: Sequence[str], shallow: Sequence[str]) -> None:
    """Position and shallow features must be pooled sparse features, and each feature one or the other."""
    known = features.feature_names
    for what, names in (("position_features", position), ("shallow_features", shallow)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"YouTubeRanker {what} {unknown} are not pooled sparse features of the schema; known: "
                             f"{known}")
    if not position:
        raise ValueError("YouTubeRanker needs position_features (e.g. [position]); a feature the shallow tower "
                         "should keep at serving goes in shallow_features")
    both = sorted(set(position) & set(shallow))
    if both:
        raise ValueError(f"YouTubeRanker: {both} are in both position_features (dropped, missing at serving) and "
                         "shallow_features (kept at serving); list each feature in one of them")

