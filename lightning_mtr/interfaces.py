"""The optional hooks a model, a block or a task weighting may implement, written once.

A model only has to be an ``nn.Module(schema, ...)`` whose ``forward(dense, sparse)`` returns
``{task: logits [B]}``. The protocols below are what the rest of the package looks for beyond
that; each docstring says who calls the hook and when. They are ``runtime_checkable``, so the
callers test for them with ``isinstance`` (which checks only that the methods exist);
``tests/test_interfaces.py`` checks that every registered model's hooks also take these
arguments.

This file lives at the package's top level, importing nothing from it, so that every layer can
name a hook: ``nn/meta.py`` and ``tasks/weighting.py`` sit below ``models/`` and could not
import from it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torchrec import KeyedJaggedTensor


@runtime_checkable
class ForwardWithLosses(Protocol):
    """A model whose losses are part of the model (ESMM's and ESM2's fused probability chain,
    AITM's calibrator). ``MultiTaskModule`` calls it instead of ``forward`` on every training,
    validation and test step."""

    def forward_with_losses(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                            labels: Mapping[str, torch.Tensor] | None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``({task: logits}, {task: per-row loss [B]} replacing the trainer's loss for those
        tasks, {name: scalar extra loss}`` added unweighted and logged as ``train/extra/{name}``)."""


@runtime_checkable
class LabelOrder(Protocol):
    """A funnel model whose later labels can never exceed earlier ones (ESMM: ctcvr <= ctr).
    ``MultiTaskModule.setup`` passes the pairs to the data module's ``require_label_order``,
    which checks every row it reads."""

    def label_order(self) -> Sequence[tuple[str, str]]:
        """``(earlier, later)`` task names."""


@runtime_checkable
class RequiredTaskWeights(Protocol):
    """A model that fixes some tasks' loss weights whatever the schema says (ESMM and ESM2: a task
    learned only through the probability chain trains with weight 0), so one schema serves it and
    MMoE on the same data. ``MultiTaskModule.__init__`` trains, weighs and reports ``val/loss``
    with these weights, and logs one line for each it changed."""

    def required_task_weights(self) -> Mapping[str, float]:
        """``{task: weight}`` for the tasks whose weight the model decides."""


@runtime_checkable
class GatedBlock(Protocol):
    """A mixture-of-experts block (``MixtureBottom``, PLE's ``CGCLayer``).
    ``training.diagnostics.GateDiagnostics`` calls it on the block's inputs during validation."""

    def gate_weights(self, inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({gate: softmax weights [B, E]}, expert outputs [B, E, D])``."""


@runtime_checkable
class Resettable(Protocol):
    """Any module that owns parameters or buffers. Models are built on the meta device;
    ``nn.meta.materialize`` allocates them where they run and calls the nearest module's
    ``reset_parameters`` (the owner's, else its closest ancestor's); buffers need their owner's."""

    def reset_parameters(self) -> None:
        """Initialise this module's own parameters and buffers in place."""


@runtime_checkable
class UserItemSplit(Protocol):
    """A model that builds a per-request representation once and scores any number of candidates
    on it (DUPN). ``serving.split``'s ``UserProgram`` calls ``user_representation`` once per
    request, its ``ItemProgram`` calls ``score`` per batch of candidates."""

    representation_dim: int

    def user_representation(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, representation_dim]`` from the request's (``side: user``) features only."""

    def score(self, representation: torch.Tensor, dense: torch.Tensor, sparse: KeyedJaggedTensor
              ) -> dict[str, torch.Tensor]:
        """``{task: logits}`` of the candidates from their ``side: item`` features, for
        ``representation`` ``[B, R]`` or ``[1, R]`` shared by all of them."""


@runtime_checkable
class WeightingHooks(Protocol):
    """A task weighting's hooks (``tasks.weighting.TaskWeighting`` gives no-op defaults)."""

    def attach(self, model: nn.Module) -> None:
        """``MultiTaskModule.on_fit_start``: the model, materialised (and sharded), for schemes
        that read its parameters (GradNorm's shared layer)."""

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """``MultiTaskModule.on_train_epoch_end``: each task's mean training loss of the epoch,
        averaged over processes (DWA, PLE's schedule)."""

