"""Behaviour-sequence blocks: DUPN's property-gated LSTM and its attention pooling.

Sequences arrive padded, ``[B, L, D]`` with ``lengths [B]``, most recent behaviour first (how
the schema's truncation keeps the latest ones); both blocks read them in time order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_mtr.nn.mlp import MLP


def chronological(steps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Most-recent-first ``[B, L, D]`` -> oldest first, each row's padding still at its end."""
    positions = torch.arange(steps.shape[1], device=steps.device)
    source = (lengths[:, None] - 1 - positions).clamp_min(0)
    source = torch.where(positions < lengths[:, None], source, positions)
    return torch.gather(steps, 1, source[:, :, None].expand_as(steps))


class PropertyGatedLSTM(nn.Module):
    """DUPN's property-gated LSTM (Ni et al., KDD 2018, section 4.3): the input, forget and output
    gates read the behaviour's item part ``e_t``, its property part ``p_t`` (type, scene, time
    gap) and ``h_{t-1}``; the cell candidate reads the item and ``h_{t-1}`` only:

        i_t, f_t, o_t = sigmoid(W_e e_t + W_p p_t + W_h h_{t-1} + b)
        c_t = f_t * c_{t-1} + i_t * tanh(W_ec e_t + W_hc h_{t-1} + b_c),    h_t = o_t * tanh(c_t)

    so a purchase can be let through where a passing click is forgotten. ``item_inputs`` holds
    ``W_e`` and ``W_ec`` (and ``b``, ``b_c``) in the rows i, f, cell, o; ``property_inputs``
    ``W_p`` in the rows i, f, o; ``recurrent`` ``W_h`` and ``W_hc`` in the rows i, f, cell, o.
    That is a standard LSTM over ``[e_t; p_t]`` whose cell rows have zero property weights, so it
    runs as torch's fused LSTM (a training step of conf/models/dupn.yaml took 1.7x as long with
    a Python loop over the steps, on CPU). ``forward(items [B, L, Di], properties [B, L, Dp],
    lengths [B]) -> hidden states [B, L, H]`` in time order (oldest first), zero past each
    row's length.
    """

    def __init__(self, item_dim: int, property_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.item_inputs = nn.Linear(item_dim, 4 * hidden)  # i, f, cell, o from e_t
        self.property_inputs = nn.Linear(property_dim, 3 * hidden, bias=False)  # i, f, o from p_t
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)  # i, f, cell, o from h_{t-1}

    def forward(self, items: torch.Tensor, properties: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = items.shape
        h = self.hidden
        gates = self.property_inputs.weight  # [3H, Dp]
        no_property = gates.new_zeros(h, gates.shape[1])  # the cell candidate's property weights
        input_weight = torch.cat([self.item_inputs.weight, torch.cat([gates[:2 * h], no_property, gates[2 * h:]])], 1)
        start = items.new_zeros(1, batch, h)
        weights = [input_weight, self.recurrent.weight, self.item_inputs.bias, torch.zeros_like(self.item_inputs.bias)]
        # padded, not packed: torch's packed CPU path slices its input per step, and each slice's
        # backward writes a whole [sum of lengths, 4H] gradient; steps past a row's end are masked
        states, _, _ = torch.lstm(torch.cat([items, properties], dim=2), (start, start), weights, True, 1, 0.0,
                                  self.training, False, True)
        live = torch.arange(steps, device=items.device)[None, :] < lengths[:, None]  # [B, L]
        return states * live[:, :, None]


class BehaviourAttention(nn.Module):
    """DUPN's attention net (section 4.4): each behaviour's weight comes from an MLP over its
    hidden state, its property part, the query and the user,
    ``a_t = softmax_t(MLP([h_t, p_t, q, u]))``, and the output is ``sum_t a_t h_t``; padding
    steps get no weight, and a row without behaviours gets a zero vector."""

    def __init__(self, hidden: int, property_dim: int, context_dim: int, attention: Sequence[int] = (64,)):
        super().__init__()
        mlp = MLP(hidden + property_dim + context_dim, attention)
        self.score = nn.Sequential(mlp, nn.Linear(mlp.output_dim, 1, bias=False))  # a bias cancels in the softmax

    def forward(self, states: torch.Tensor, properties: torch.Tensor, context: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``-> (pooled [B, H], weights [B, L])``."""
        steps = states.shape[1]
        inputs = torch.cat([states, properties, context[:, None].expand(-1, steps, -1)], dim=2)
        logits = self.score(inputs)[:, :, 0]
        live = torch.arange(steps, device=states.device)[None, :] < lengths[:, None]
        weights = torch.softmax(logits.masked_fill(~live, torch.finfo(logits.dtype).min), dim=1) * live
        return (weights[:, :, None] * states).sum(dim=1), weights
