"""A bank of expert MLPs run as batched matrix products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ExpertBank(nn.Module):
    """E experts, each ``MLP(in_dim -> hidden...)`` with ReLU: ``[B, in_dim] -> [B, E, hidden[-1]]``.

    The first layers of all experts are one ``[in_dim, E*H1]`` matrix product and each
    later layer one batched product over experts, instead of E small products: on CPU
    this is what keeps the experts near the machine's GEMM rate.
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: Sequence[int]):
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError("an expert bank needs num_experts >= 1 and at least one hidden size")
        self.num_experts = num_experts
        self.output_dim = hidden[-1]
        self.first = nn.Linear(in_dim, num_experts * hidden[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(hidden[:-1], hidden[1:]):
            self.weights.append(nn.Parameter(torch.empty(num_experts, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, fan_out)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (also what materialising from meta calls)."""
        self.first.reset_parameters()
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)

    def last_layer_weights(self) -> list[nn.Parameter]:
        """Every expert's last layer as one tensor: the batched ``[E, in, out]`` weight, or the
        first layer's ``[E*H, in]`` when the experts have one layer."""
        return [self.weights[-1] if len(self.weights) else self.first.weight]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.after_first(self.first(inputs))

    def after_first(self, first: torch.Tensor) -> torch.Tensor:
        """The bank from the first layer's output ``[B, E*H1]`` on (the user/item split of
        ``lightning_mtr.serving.split`` computes that layer in two halves)."""
        batch = first.shape[0]
        hidden = torch.relu(first).view(batch, self.num_experts, -1).transpose(0, 1)  # [E, B, H]
        for weight, bias in zip(self.weights, self.biases):
            hidden = torch.relu(torch.baddbmm(bias, hidden, weight))
        return hidden.transpose(0, 1)  # [B, E, D]
