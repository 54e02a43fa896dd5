"""Customized Gate Control (CGC), the layer of PLE (Tang et al., RecSys 2020, "Progressive Layered
Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations").

Shape letters: B batch, T tasks, E experts of one level (T*m_k task experts, then m_s shared ones),
F input dim, D expert output dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_mtr.kernels import Backend
from lightning_mtr.kernels.gate_mix import gate_mix
from lightning_mtr.nn.experts import ExpertBank


def grouped_linear(linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """``linear``'s output rows split into G equal blocks, block g reading input g:
    ``[B, G, in] -> [B, G, out / G]``, as one batched product (one small GEMM per group otherwise)."""
    groups, in_dim = inputs.shape[1], inputs.shape[2]
    weight = linear.weight.view(groups, -1, in_dim)  # [G, out/G, in]
    if linear.bias is None:
        out = torch.bmm(inputs.transpose(0, 1), weight.transpose(1, 2))
    else:
        out = torch.baddbmm(linear.bias.view(groups, 1, -1), inputs.transpose(0, 1), weight.transpose(1, 2))
    return out.transpose(0, 1)  # [B, G, out/G]


class GroupedExpertBank(ExpertBank):
    """G groups of m experts where group g reads its own input: ``[B, G, in] -> [B, G*m, D]``
    (expert ``g*m + i`` is group g's i-th). Given ``[B, in]``, every group reads it: the plain
    :class:`ExpertBank`, whose parameters and expert order these are.
    """

    def __init__(self, in_dim: int, groups: int, experts_per_group: int, hidden: Sequence[int]):
        super().__init__(in_dim, groups * experts_per_group, hidden)
        self.groups = groups

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 2:
            return super().forward(inputs)
        groups, batch = self.groups, inputs.shape[0]
        first = torch.relu(grouped_linear(self.first, inputs).transpose(0, 1))  # [G, B, m*H1], contiguous
        hidden = first.view(groups, batch, self.num_experts // groups, -1).transpose(1, 2)  # [G, m, B, H1]
        hidden = hidden.reshape(self.num_experts, batch, -1)  # [E, B, H1]; a view when m == 1
        return self.later_layers(hidden) if len(self.weights) else hidden.transpose(0, 1)  # [B, E, D]


class CGC(nn.Module):
    """One CGC layer (an extraction network of PLE when ``shared_gate``).

    Each task k owns m_k experts; m_s experts are shared. Task k's gate is a softmax over its own
    and the shared experts, computed from task k's input; the shared gate (at every level of PLE
    but the last) is a softmax over all T*m_k + m_s experts, computed from the shared input.
    Task experts read their task's input, shared experts the shared input.

    All task experts run as one :class:`GroupedExpertBank` and the shared ones as one
    :class:`ExpertBank`; every gate (task gates and the shared gate) is one row of a single fused
    :func:`gate_mix` over all E experts, where a task gate's logits are -inf outside its own and the
    shared experts, so those get softmax weight exactly 0 (and no gradient).

    Args:
        in_dim: F.
        tasks: T.
        task_experts: m_k, experts per task.
        shared_experts: m_s.
        expert: hidden sizes of every expert MLP.
        shared_gate: add the shared gate and output the shared representation.
        gate_backend: ``auto``, ``torch`` or ``triton`` for the fused gate mix.
        gate_names: what diagnostics call the task gates, then the shared gate if any (default
            ``task0``, ``task1``, ..., ``shared``).
        gate_bias: give the gates a bias, softmax(W x + b). Off by default: PLE's gate is
            g^k(x) = softmax(W_g^k x).

    Shapes:
        ``[B, F]`` (every expert and gate reads it: PLE's first level) or ``[B, T+1, F]`` (task
        inputs, then the shared input) -> ``[B, T+1, D]`` with ``shared_gate``, else ``[B, T, D]``.
    """

    def __init__(self, in_dim: int, tasks: int, task_experts: int = 1, shared_experts: int = 1,
                 expert: Sequence[int] = (256, 128), shared_gate: bool = True, gate_backend: Backend = "auto",
                 gate_names: Sequence[str] | None = None, gate_bias: bool = False):
        super().__init__()
        if tasks < 1 or task_experts < 1 or shared_experts < 1:
            raise ValueError(f"CGC needs tasks, task_experts and shared_experts >= 1, got {tasks}, {task_experts}, "
                             f"{shared_experts}")
        self.tasks, self.task_experts, self.shared_experts = tasks, task_experts, shared_experts
        self.num_experts = tasks * task_experts + shared_experts
        self.task_bank = GroupedExpertBank(in_dim, tasks, task_experts, expert)
        self.shared_bank = ExpertBank(in_dim, shared_experts, expert)
        # T blocks of m_k + m_s
        self.task_gates = nn.Linear(in_dim, tasks * (task_experts + shared_experts), bias=gate_bias)
        self.shared_gate = nn.Linear(in_dim, self.num_experts, bias=gate_bias) if shared_gate else None
        self.output_dim = self.task_bank.output_dim
        self.gate_backend = gate_backend
        default_names = [f"task{k}" for k in range(tasks)] + (["shared"] if shared_gate else [])
        self.gate_names = list(gate_names) if gate_names is not None else default_names
        if len(self.gate_names) != len(default_names):
            raise ValueError(f"{len(default_names)} gates but {len(self.gate_names)} gate names")
        # [1, T, m_k + m_s]: the experts task k's gate mixes, its own then the shared ones; rebuilt, never saved
        self.register_buffer("gate_experts", torch.empty(1, tasks, task_experts + shared_experts, dtype=torch.long),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate-to-expert index (also what materialising from meta calls; the layers reset themselves)."""
        device = self.gate_experts.device
        own = torch.arange(self.tasks * self.task_experts, device=device).view(self.tasks, self.task_experts)
        shared = torch.arange(self.tasks * self.task_experts, self.num_experts, device=device)
        self.gate_experts.copy_(torch.cat([own, shared.expand(self.tasks, -1)], dim=1).unsqueeze(0))

    def last_layer_weights(self) -> list[nn.Parameter]:
        """The shared experts' last layer: a level's task experts reach one task only."""
        return self.shared_bank.last_layer_weights()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return gate_mix(*self._experts_and_logits(inputs), self.gate_backend)

    def gate_weights(self, inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """For diagnostics: ``({gate: softmax weights [B, E]}, expert outputs [B, E, D])``; a task
        gate's weights are 0 on other tasks' experts."""
        experts, logits = self._experts_and_logits(inputs)
        weights = torch.softmax(logits.float(), dim=-1)
        return {name: weights[:, g] for g, name in enumerate(self.gate_names)}, experts

    def _experts_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts [B, E, D], gate logits [B, T(+1), E])``."""
        if inputs.dim() == 2:
            task_inputs = shared_input = inputs
            task_logits = self.task_gates(inputs).view(inputs.shape[0], self.tasks, -1)
        else:
            task_inputs, shared_input = inputs[:, :self.tasks], inputs[:, self.tasks]
            task_logits = grouped_linear(self.task_gates, task_inputs)  # [B, T, m_k + m_s]
        experts = torch.cat([self.task_bank(task_inputs), self.shared_bank(shared_input)], dim=1)  # [B, E, D]
        logits = task_logits.new_full((inputs.shape[0], self.tasks, self.num_experts), float("-inf"))
        logits = logits.scatter(2, self.gate_experts.expand_as(task_logits), task_logits)
        if self.shared_gate is not None:
            logits = torch.cat([logits, self.shared_gate(shared_input).unsqueeze(1)], dim=1)  # [B, T+1, E]
        return experts, logits
