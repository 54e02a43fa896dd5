"""Multi-layer perceptron with ReLU after every layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_mtr.nn.aligned import AlignedLinear


class MLP(nn.Sequential):
    """``[B, in_dim] -> [B, hidden[-1]]``: Linear + ReLU (+ dropout) per hidden size (``AlignedLinear``:
    a feature vector of any width trains at the aligned products' speed).

    The ReLU runs in place on the Linear's output: no second ``[B, width]`` buffer per layer, in
    either precision (autograd's ReLU backward reads the output, which is all it keeps)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [AlignedLinear(in_dim, width), nn.ReLU(inplace=True)]  # on the Linear's own output
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        super().__init__(*layers)
        self.output_dim = in_dim

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs)


def last_layer_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the layer that produces ``module``'s output (GradNorm's ``W``), by its
    structure, never by the order of registration: a Linear's weight; a block's own
    ``last_layer_weights()`` (expert banks, bottoms, CGC); a Sequential's (``MLP``, PLE's
    ``levels``) last child that has trainable parameters. Biases are left out, as the paper's W."""
    if isinstance(module, nn.Linear):
        return [module.weight]
    own = getattr(module, "last_layer_weights", None)
    if own is not None:
        return own()
    if isinstance(module, nn.Sequential):
        for child in reversed(module):
            if any(p.requires_grad for p in child.parameters()):
                return last_layer_weights(child)
    raise ValueError(f"no rule for the last layer of a {type(module).__name__}")
