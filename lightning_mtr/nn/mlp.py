"""Multi-layer perceptron with ReLU after every layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """``[B, in_dim] -> [B, hidden[-1]]``: Linear + ReLU (+ dropout) per hidden size."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        super().__init__(*layers)
        self.output_dim = in_dim

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs)
