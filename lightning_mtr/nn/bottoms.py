"""Bottoms: what several task branches share before their towers.

A bottom maps the feature vector ``[B, F]`` to one representation per branch: a tuple of
``branches`` tensors ``[B, D]``; towers then sit on the branches. ESMM's towers can sit on any of
them, and MMoE/OMoE are a mixture bottom with towers. Where every branch reads the same
representation, the tuple holds that one tensor ``branches`` times: autograd adds the branches'
gradients into it in place, where an expanded ``[B, branches, D]`` view would stack them into a
new ``[B, branches, D]`` tensor and sum it (ESMM's forward and backward 4-5% slower on a 445-column
feature vector at batch 4096).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_mtr.kernels import Backend
from lightning_mtr.kernels.gate_mix import gate_mix
from lightning_mtr.nn.experts import ExpertBank
from lightning_mtr.nn.mlp import MLP, last_layer_weights

BottomFactory = Callable[[int, int], nn.Module]
"""``(in_dim, branches) -> bottom``; in YAML a ``class_path`` with the remaining ``init_args``. The
bottom's ``forward(features [B, F])`` returns a tuple of ``branches`` tensors ``[B, output_dim]``."""


def branch_outputs(outputs: Sequence[torch.Tensor], branches: int, bottom: nn.Module) -> tuple[torch.Tensor, ...]:
    """``outputs`` of ``bottom``, checked to be one ``[B, D]`` tensor per branch: a bottom of the
    user's that returns ``[B, branches, D]`` would otherwise be read row by row."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) != branches:
        got = (f"a tensor of shape {tuple(outputs.shape)}" if isinstance(outputs, torch.Tensor) else
               f"{len(outputs)} of them" if isinstance(outputs, (tuple, list)) else type(outputs).__name__)
        raise TypeError(f"{type(bottom).__name__} must return a tuple of {branches} tensors [B, D], one per "
                        f"branch; got {got}")
    return tuple(outputs)


class SharedInput(nn.Module):
    """No shared layers: every branch reads the feature vector itself (only embeddings are shared)."""

    def __init__(self, in_dim: int, branches: int):
        super().__init__()
        self.branches = branches
        self.output_dim = in_dim

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (inputs,) * self.branches


class SharedMLP(nn.Module):
    """Hard sharing: one MLP whose output every branch reads (the Shared-Bottom model's bottom)."""

    def __init__(self, in_dim: int, branches: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0):
        super().__init__()
        self.branches = branches
        self.mlp = MLP(in_dim, hidden, dropout)
        self.output_dim = self.mlp.output_dim

    def last_layer_weights(self) -> list[nn.Parameter]:
        return last_layer_weights(self.mlp)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.mlp(inputs),) * self.branches


class MixtureBottom(nn.Module):
    """E expert MLPs mixed per branch by a softmax gate (MMoE); ``one_gate`` shares one gate (OMoE).

    Args:
        in_dim, branches: set by the model.
        num_experts: E.
        expert: hidden sizes of every expert MLP.
        one_gate: a single gate for all branches instead of one per branch.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix; switching it
            changes no parameter and no checkpoint.
        gate_names: what diagnostics call each gate (default ``gate0``, ``gate1``, ...).
        gate_dropout: in training, each expert is left out of each row's gate with this
            probability (the softmax renormalises over the rest), so no task leans on one
            expert alone (the YouTube ranker's gate dropout, Zhao et al. 2019: 10%).
        gate_bias: give the gates a bias, softmax(W x + b). Off by default: the MMoE paper's gate
            is g^k(x) = softmax(W_gk x), and the YouTube ranker's is the same.
    """

    def __init__(self, in_dim: int, branches: int, num_experts: int = 8, expert: Sequence[int] = (256, 128),
                 one_gate: bool = False, gate_backend: Backend = "auto", gate_names: Sequence[str] | None = None,
                 gate_dropout: float = 0.0, gate_bias: bool = False):
        super().__init__()
        if not 0.0 <= gate_dropout < 1.0:
            raise ValueError(f"gate_dropout must be in [0, 1), got {gate_dropout}")
        self.gate_dropout = gate_dropout
        self.branches = branches
        self.num_gates = 1 if one_gate else branches
        self.gate_names = list(gate_names or [f"gate{g}" for g in range(self.num_gates)])
        if len(self.gate_names) != self.num_gates:
            raise ValueError(f"{self.num_gates} gates but {len(self.gate_names)} gate names")
        self.experts = ExpertBank(in_dim, num_experts, expert)
        self.gates = nn.Linear(in_dim, self.num_gates * num_experts, bias=gate_bias)
        self.output_dim = self.experts.output_dim
        self.gate_backend = gate_backend

    def last_layer_weights(self) -> list[nn.Parameter]:
        """The experts' last layer: the gates weigh the experts, they produce no shared output."""
        return self.experts.last_layer_weights()

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.after_first(self.experts.first(inputs), self.gates(inputs))

    def after_first(self, first: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The bottom from the outputs of its two linear layers on the input on, the experts'
        first ``[B, E*H1]`` and the gates' ``[B, gates*E]`` (``lightning_mtr.serving.split``
        computes them in a user and an item half)."""
        logits = gates.view(gates.shape[0], self.num_gates, -1)  # [B, gates, E]
        if self.training and self.gate_dropout:
            dropped = torch.rand_like(logits) < self.gate_dropout
            dropped &= ~dropped.all(dim=-1, keepdim=True)  # a row never loses every expert
            logits = logits.masked_fill(dropped, torch.finfo(logits.dtype).min)
        mixed = gate_mix(self.experts.after_first(first), logits, self.gate_backend)  # [B, gates, D]
        return mixed.unbind(1) * (self.branches // self.num_gates)  # one gate: its mixture for every branch

    def _gate_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.gates(inputs).view(inputs.shape[0], self.num_gates, -1)  # [B, gates, E]

    def gate_weights(self, inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """For diagnostics: ``({gate: softmax weights [B, E]}, expert outputs [B, E, D])``."""
        weights = torch.softmax(self._gate_logits(inputs).float(), dim=-1)
        return {name: weights[:, g] for g, name in enumerate(self.gate_names)}, self.experts(inputs)
