"""PLE (Tang et al., RecSys 2020): the CGC layer's routing (task gates see their own and the shared
experts, the shared gate sees all) and the model's progressive structure.

Shape letters: B batch, T tasks, m_k experts per task, m_s shared experts, E = T*m_k + m_s, F input.
T=3, m_k=2, m_s=3 throughout: unequal group sizes catch an expert index off by one group.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from helpers import random_inputs, tiny_schema
from triton_interpreter import run_under_triton_interpreter
from lightning_mtr.models.ple import PLE
from lightning_mtr.nn.cgc import CGC, GroupedExpertBank
from lightning_mtr.nn.meta import materialize

T, M_K, M_S, F = 3, 2, 3, 5
E = T * M_K + M_S
SMALL = {"task_experts": M_K, "shared_experts": M_S, "expert": [8, 6], "tower": [4]}


def _level(shared_gate: bool = True, seed: int = 0) -> CGC:
    torch.manual_seed(seed)
    return CGC(F, T, M_K, M_S, expert=[8, 6], shared_gate=shared_gate)


def _inputs(grouped: bool, batch: int = 16) -> torch.Tensor:
    """Level 1's ``[B, F]`` (read by every expert and gate) or a later level's ``[B, T+1, F]``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, T + 1, F, generator=generator) if grouped else torch.randn(batch, F, generator=generator)


def _expert(bank, e: int, inputs: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of an ExpertBank as an independent MLP: ``[B, F] -> [B, D]``."""
    first_w = bank.first.weight.view(bank.num_experts, -1, bank.first.in_features)[e]
    hidden = torch.relu(inputs @ first_w.T + bank.first.bias.view(bank.num_experts, -1)[e])
    for weight, bias in zip(bank.weights, bank.biases):
        hidden = torch.relu(hidden @ weight[e] + bias[e, 0])
    return hidden


@torch.no_grad()
def _perturb_experts(bank, experts: range) -> None:
    bank.first.weight.view(bank.num_experts, -1, bank.first.in_features)[experts.start:experts.stop].add_(1.0)
    for weight in bank.weights:
        weight[experts.start:experts.stop].add_(torch.randn_like(weight[experts.start:experts.stop]))


def _changed(before: torch.Tensor, after: torch.Tensor) -> bool:
    return not torch.allclose(before, after)


# ---------------------------------------------------------------------------------------------
# One CGC layer
# ---------------------------------------------------------------------------------------------
def test_grouped_expert_bank_equals_independent_experts():
    """Group g's experts read input g; given one [B, F] input it is exactly the plain ExpertBank."""
    torch.manual_seed(0)
    bank = GroupedExpertBank(F, groups=T, experts_per_group=M_K, hidden=[4, 3])
    grouped = torch.randn(7, T, F)
    out = bank(grouped)
    assert out.shape == (7, T * M_K, 3)
    for e in range(T * M_K):
        torch.testing.assert_close(out[:, e], _expert(bank, e, grouped[:, e // M_K]))
    flat = grouped[:, 0]
    torch.testing.assert_close(bank(flat), torch.stack([_expert(bank, e, flat) for e in range(T * M_K)], 1))


@pytest.mark.parametrize("gate_bias", [False, True], ids=["paper", "gate_bias"])
@pytest.mark.parametrize("grouped", [False, True], ids=["level1", "later_level"])
def test_gates_are_softmax_over_their_experts(grouped, gate_bias):
    """Task k's output is softmax(W_k x_k) over [task k's m_k experts, the m_s shared ones] and the
    shared output softmax(W_s x_s) over all E experts (PLE's g^k(x) = softmax(W_g^k x): no bias
    unless ``gate_bias``), recomputed here from the weights."""
    torch.manual_seed(0)
    level = CGC(F, T, M_K, M_S, expert=[8, 6], gate_bias=gate_bias)
    assert (level.task_gates.bias is not None) == gate_bias and (level.shared_gate.bias is not None) == gate_bias
    with torch.no_grad():  # hand-set, far from uniform gates
        level.task_gates.weight.copy_(3 * torch.randn_like(level.task_gates.weight))
        level.shared_gate.weight.copy_(3 * torch.randn_like(level.shared_gate.weight))
        for bias in (level.task_gates.bias, level.shared_gate.bias) if gate_bias else ():
            bias.copy_(3 * torch.randn_like(bias))
    inputs = _inputs(grouped)
    task_in = [inputs[:, k] if grouped else inputs for k in range(T)]
    shared_in = inputs[:, T] if grouped else inputs
    task_experts = [_expert(level.task_bank, e, task_in[e // M_K]) for e in range(T * M_K)]
    shared_experts = [_expert(level.shared_bank, e, shared_in) for e in range(M_S)]
    gate_w = level.task_gates.weight.view(T, M_K + M_S, F)
    gate_b = level.task_gates.bias.view(T, M_K + M_S) if gate_bias else torch.zeros(T, M_K + M_S)
    out = level(inputs)
    assert out.shape == (inputs.shape[0], T + 1, 6)
    for k in range(T):
        visible = torch.stack(task_experts[k * M_K:(k + 1) * M_K] + shared_experts, 1)  # [B, m_k + m_s, D]
        weights = torch.softmax(task_in[k] @ gate_w[k].T + gate_b[k], -1)
        torch.testing.assert_close(out[:, k], torch.einsum("be,bed->bd", weights, visible))
    shared_b = level.shared_gate.bias if gate_bias else torch.zeros(E)
    weights = torch.softmax(shared_in @ level.shared_gate.weight.T + shared_b, -1)
    every = torch.stack(task_experts + shared_experts, 1)  # [B, E, D]
    torch.testing.assert_close(out[:, T], torch.einsum("be,bed->bd", weights, every))


def test_ple_gates_have_no_bias_by_default():
    schema = tiny_schema(tasks=("a", "b", "c"))
    for gate_bias in (False, True):
        for level in PLE(schema, **SMALL, gate_bias=gate_bias).levels:
            gates = [level.task_gates] + ([level.shared_gate] if level.shared_gate is not None else [])
            assert all((gate.bias is not None) == gate_bias for gate in gates)


@pytest.mark.parametrize("grouped", [False, True], ids=["level1", "later_level"])
def test_task_output_ignores_other_tasks_experts_but_not_shared_ones(grouped):
    level = _level().eval()
    inputs = _inputs(grouped)
    before = level(inputs)
    _perturb_experts(level.task_bank, range(1 * M_K, 2 * M_K))  # task 1's private experts
    after = level(inputs)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)  # weight exactly 0: bit-identical
    torch.testing.assert_close(after[:, 2], before[:, 2], rtol=0, atol=0)
    assert _changed(before[:, 1], after[:, 1])
    assert _changed(before[:, T], after[:, T]), "the shared gate mixes every task's experts"
    _perturb_experts(level.shared_bank, range(M_S))
    moved = level(inputs)
    assert all(_changed(after[:, g], moved[:, g]) for g in range(T + 1)), "every gate mixes the shared experts"


def test_task_experts_and_gate_read_their_own_task_input():
    level = _level().eval()
    inputs = _inputs(grouped=True)
    before = level(inputs)
    after = level(inputs + torch.nn.functional.one_hot(torch.tensor(1), T + 1)[None, :, None])  # task 1's input
    for k in (0, 2):
        torch.testing.assert_close(after[:, k], before[:, k], rtol=0, atol=0)
    assert _changed(before[:, 1], after[:, 1]) and _changed(before[:, T], after[:, T])
    moved = level(inputs + torch.nn.functional.one_hot(torch.tensor(T), T + 1)[None, :, None])  # the shared input
    assert all(_changed(before[:, g], moved[:, g]) for g in range(T + 1))


def test_gate_sizes_and_the_final_level_has_no_shared_gate():
    model = PLE(tiny_schema(tasks=("a", "b", "c")), num_levels=3, **SMALL)
    *extraction, last = model.levels
    hidden = torch.randn(4, model.features.output_dim)
    for level in extraction:
        assert level.shared_gate.out_features == T * M_K + M_S  # mixes all experts of the level
        assert level.task_gates.out_features == T * (M_K + M_S)  # each task: its own + the shared
        hidden = level(hidden)
        assert hidden.shape == (4, T + 1, 6)  # T task outputs, then the shared one
    assert last.shared_gate is None
    assert last.task_gates.out_features == T * (M_K + M_S)
    assert last(hidden).shape == (4, T, 6)
    assert extraction[0].gate_names == ["L1/a", "L1/b", "L1/c", "L1/shared"]
    assert last.gate_names == ["L3/a", "L3/b", "L3/c"]


def test_gate_weights_for_diagnostics_are_zero_outside_a_tasks_experts():
    level = _level()
    weights, experts = level.gate_weights(_inputs(grouped=False))
    assert list(weights) == ["task0", "task1", "task2", "shared"] and experts.shape == (16, E, 6)
    for k in range(T):
        hidden = [e for e in range(T * M_K) if e // M_K != k]
        assert torch.all(weights[f"task{k}"][:, hidden] == 0)
        torch.testing.assert_close(weights[f"task{k}"].sum(-1), torch.ones(16))
    assert torch.all(weights["shared"] > 0)


def test_backends_agree():
    """gate_backend changes no parameter and no result."""
    level, inputs = _level(), _inputs(grouped=True).requires_grad_()
    results = []
    for backend in ("torch", "auto"):
        level.gate_backend = backend
        out = level(inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), (inputs, level.task_gates.weight))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shared_experts"):
        CGC(F, T, M_K, 0, expert=[4])
    with pytest.raises(ValueError, match="num_levels is 3"):
        PLE(tiny_schema(), num_levels=3, expert=[[8], [6]])
    with pytest.raises(ValueError, match="num_levels >= 1"):
        PLE(tiny_schema(), num_levels=0)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def _model(num_levels: int = 2, **kwargs) -> PLE:
    torch.manual_seed(0)
    return PLE(tiny_schema(tasks=("a", "b", "c")), num_levels=num_levels, **{**SMALL, **kwargs}).eval()


def test_progressive_extraction():
    """Task b's private experts reach the other tasks only through a shared gate: at the last level
    they move b's logit alone, at level 1 (through the shared output into level 2) every logit."""
    model = _model(num_levels=2)
    inputs = random_inputs(tiny_schema(tasks=("a", "b", "c")), 32)
    before = model(*inputs)
    _perturb_experts(model.levels[1].task_bank, range(1 * M_K, 2 * M_K))
    after = model(*inputs)
    torch.testing.assert_close(after["a"], before["a"], rtol=0, atol=0)
    torch.testing.assert_close(after["c"], before["c"], rtol=0, atol=0)
    assert _changed(before["b"], after["b"])
    _perturb_experts(model.levels[0].task_bank, range(1 * M_K, 2 * M_K))
    moved = model(*inputs)
    assert all(_changed(after[t], moved[t]) for t in "abc")


def test_one_level_is_cgc_with_fully_separate_private_paths():
    model = _model(num_levels=1)
    inputs = random_inputs(tiny_schema(tasks=("a", "b", "c")), 32)
    before = model(*inputs)
    _perturb_experts(model.levels[0].task_bank, range(0, M_K))  # task a's experts
    after = model(*inputs)
    assert _changed(before["a"], after["a"])
    torch.testing.assert_close(after["b"], before["b"], rtol=0, atol=0)
    torch.testing.assert_close(after["c"], before["c"], rtol=0, atol=0)


def test_per_level_expert_sizes():
    model = _model(num_levels=2, expert=[[8], [6, 5]])
    assert [level.output_dim for level in model.levels] == [8, 5]
    assert model.levels[1].task_bank.first.in_features == 8
    assert model.levels[1].shared_bank.first.in_features == 8


@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_are_one_logit_per_task_and_row(batch):
    schema = tiny_schema(tasks=("a", "b", "c"))
    logits = _model()(*random_inputs(schema, batch))
    assert sorted(logits) == ["a", "b", "c"]
    for value in logits.values():
        assert value.shape == (batch,) and torch.isfinite(value).all()


@pytest.mark.parametrize("num_levels", [1, 3])
def test_gradient_reaches_every_parameter(num_levels):
    model = _model(num_levels=num_levels).train()
    dense, sparse = random_inputs(tiny_schema(tasks=("a", "b", "c")), 256)  # no small ReLU layer starts all dead
    sum(logit.square().sum() for logit in model(dense, sparse).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_builds_on_meta_and_materializes():
    with torch.device("meta"):
        model = PLE(tiny_schema(tasks=("a", "b", "c")), num_levels=3, **SMALL)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    materialize(model, "cpu")
    dense = {n: p for n, p in model.named_parameters() if not n.startswith("features.")}  # tables stay on meta
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in dense.values())
    assert any(p.abs().sum() > 0 for p in dense.values())
    mixed = model.levels(torch.randn(5, model.features.output_dim))
    logits = model.towers({t: mixed[:, k] for k, t in enumerate(model.tasks)})
    assert all(v.shape == (5,) and torch.isfinite(v).all() for v in logits.values())


# ---------------------------------------------------------------------------------------------
# The Triton gate mix on -inf-masked task gates: under the interpreter (CPU), and on CUDA
# ---------------------------------------------------------------------------------------------
INTERPRETED = textwrap.dedent("""
    import torch
    from lightning_mtr.kernels.triton_support import interpreting
    from lightning_mtr.nn.cgc import CGC
    assert interpreting(), "TRITON_INTERPRET=1 did not reach triton"
    torch.manual_seed(0)
    level = CGC(5, 3, 2, 3, expert=[8, 6])
    inputs = torch.randn(4, 4, 5, requires_grad=True)
    results = []
    for backend in ("torch", "triton"):
        level.gate_backend = backend
        out = level(inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), (inputs, *level.parameters()))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("masked gates match")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_gate_mix_on_masked_gates_under_interpreter():
    assert "masked gates match" in run_under_triton_interpreter(INTERPRETED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_backends_agree_on_masked_gates(dtype):
    # bf16: each side rounds its outputs once to bf16 (2^-8 relative); fp32: accumulation order only
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.manual_seed(0)
    level = CGC(64, 3, 2, 3, expert=[128, 64]).cuda().to(dtype)
    inputs = torch.randn(4096, 4, 64, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for backend in ("torch", "triton"):
        level.gate_backend = backend
        out = level(inputs)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (inputs, level.task_gates.weight,
                                                                               level.shared_gate.weight))))
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
