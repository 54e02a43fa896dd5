"""A bank of expert MLPs run as batched matrix products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_mtr.nn.aligned import AlignedLinear


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
        self.first = AlignedLinear(in_dim, num_experts * hidden[0])
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
        first = first.view(first.shape[0], self.num_experts, -1)  # [B, E, H1]
        if not len(self.weights):
            return torch.relu(first)
        return self.later_layers(relu_swap01(first))

    def later_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layers after the first (there must be one), ``[E, B, H1]`` (ReLU applied) -> ``[B, E, D]``,
        contiguous: each a batched product whose ReLU runs in place, the last one's while reordering."""
        *middle, (weight, bias) = zip(self.weights, self.biases)
        for layer_weight, layer_bias in middle:
            hidden = torch.baddbmm(layer_bias, hidden, layer_weight).relu_()
        return relu_swap01(torch.baddbmm(bias, hidden, weight))


class _ReLUSwap01(torch.autograd.Function):
    """``relu(x).transpose(0, 1)`` written contiguous in one pass; its backward masks the gradient
    and writes it in ``x``'s layout in one pass. Where eager reorders with a separate copy, bmm and
    the bf16 GEMM copy a transposed operand themselves: those copies were 5% of the fp32 step of MMoE's
    dense layers and 29% of the bf16 one (4096 rows, 8 experts [256, 128], 2 threads)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor) -> torch.Tensor:
        out = inputs.new_empty((inputs.shape[1], inputs.shape[0], *inputs.shape[2:]))
        torch.clamp_min(inputs.transpose(0, 1), 0, out=out)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable  # the out= kernel records no graph: a second derivative fails loudly
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        grad_in = out.new_empty((out.shape[1], out.shape[0], *out.shape[2:]))
        torch.ops.aten.threshold_backward.grad_input(grad_out, out, 0, grad_input=grad_in.transpose(0, 1))
        return grad_in


def relu_swap01(inputs: torch.Tensor) -> torch.Tensor:
    """``relu(inputs)`` with dims 0 and 1 swapped, as a new contiguous tensor (``[B, E, H] <-> [E, B, H]``)."""
    if inputs.dim() < 2:
        raise ValueError(f"relu_swap01 needs at least 2 dims, got shape {tuple(inputs.shape)}")
    return _ReLUSwap01.apply(inputs)
