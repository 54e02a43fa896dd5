"""The training step's fused pieces against the plain PyTorch they replace, forward and backward:
ReLU with a dim swap, the expert bank, the MLPs' in-place ReLU, the aligned linear layer, the kernels
under bf16 autocast (what Lightning's ``bf16-mixed`` runs on CPU) and the fused dense Adam.
Shape letters: B batch, E experts, H hidden, T gates, D dim.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtr.kernels.gate_mix import gate_mix, gate_mix_reference
from lightning_mtr.kernels.prob_chain import probability_chain, probability_chain_reference
from lightning_mtr.nn import MLP, ExpertBank
from lightning_mtr.nn.aligned import AlignedLinear
from lightning_mtr.nn.experts import relu_swap01
from lightning_mtr.training.module import _adam

# bf16 keeps 8 significant bits: each rounding of an input or output is off by up to 2**-8 relative,
# the products accumulate in fp32, so a few roundings in a row stay within ~2% of the fp32 result.
BF16 = {"rtol": 2e-2, "atol": 2e-2}


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 4, 6), (3, 2, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_swap01_equals_relu_then_transpose(shape, dtype):
    """Exactly equal in every dtype: both sides take the same max and the same mask, no arithmetic."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=generator).to(dtype)
    inputs.view(-1)[::3] = 0  # the kink: both sides give relu'(0) = 0
    grad_out = torch.randn((shape[1], shape[0], *shape[2:]), generator=generator).to(dtype)
    fused_in = inputs.clone().requires_grad_()
    plain_in = inputs.clone().requires_grad_()
    fused = relu_swap01(fused_in)
    plain = torch.relu(plain_in).transpose(0, 1)
    fused.backward(grad_out.transpose(0, 1).contiguous().transpose(0, 1))  # a strided gradient too
    plain.backward(grad_out)
    assert fused.is_contiguous() and fused.dtype == dtype
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    assert fused_in.grad.is_contiguous()
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=0, atol=0)


def test_relu_swap01_gradcheck_and_bad_input():
    inputs = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_swap01, (inputs,))
    with pytest.raises(ValueError, match="at least 2 dims"):
        relu_swap01(torch.randn(4))


def _independent_experts(bank: ExpertBank, inputs: torch.Tensor) -> torch.Tensor:
    """The spec: E separate MLPs, Linear + ReLU per layer, stacked to ``[B, E, D]``."""
    experts = bank.num_experts
    first_w = bank.first.weight.view(experts, -1, inputs.shape[1])
    first_b = bank.first.bias.view(experts, -1)
    outputs = []
    for e in range(experts):
        hidden = torch.relu(torch.addmm(first_b[e], inputs, first_w[e].T))  # under autocast: bf16 out
        for weight, bias in zip(bank.weights, bank.biases):
            hidden = torch.relu(torch.addmm(bias[e, 0], hidden, weight[e]))
        outputs.append(hidden)
    return torch.stack(outputs, 1)


def _out_and_grads(fn, bank: ExpertBank, inputs: torch.Tensor, grad_out: torch.Tensor):
    bank.zero_grad()
    inputs = inputs.detach().clone().requires_grad_()
    out = fn(inputs)
    out.float().backward(grad_out)
    return out, [inputs.grad, *(p.grad.clone() for p in bank.parameters())]


@pytest.mark.parametrize("hidden", [[4], [4, 3], [6, 4, 3]], ids=["one_layer", "two_layers", "three_layers"])
def test_expert_bank_forward_and_backward_equal_independent_experts(hidden):
    torch.manual_seed(0)
    bank = ExpertBank(in_dim=5, num_experts=3, hidden=hidden)
    inputs, grad_out = torch.randn(9, 5), torch.randn(9, 3, hidden[-1])
    out, grads = _out_and_grads(bank, bank, inputs, grad_out)
    expected, expected_grads = _out_and_grads(lambda x: _independent_experts(bank, x), bank, inputs, grad_out)
    assert out.is_contiguous()  # what gate_mix's batched product reads without a copy
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_expert_bank_under_bf16_autocast_equals_independent_experts_under_autocast():
    """bf16 activations out, fp32 gradients for the fp32 weights. The spec runs under autocast too: each
    side rounds the same layer outputs to bf16, so only fp32 accumulation order differs (against fp32,
    a pre-activation near 0 may flip its ReLU mask in bf16 and move a whole row of the gradient)."""
    torch.manual_seed(0)
    bank = ExpertBank(in_dim=24, num_experts=4, hidden=[32, 16])
    inputs, grad_out = torch.randn(64, 24), torch.randn(64, 4, 16)
    with _autocast():
        expected, expected_grads = _out_and_grads(lambda x: _independent_experts(bank, x), bank, inputs, grad_out)
        out, grads = _out_and_grads(bank, bank, inputs, grad_out)
    assert out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out, expected, **BF16)
    torch.testing.assert_close(out.float(), _independent_experts(bank, inputs), **BF16)  # and near fp32
    for got, want in zip(grads, expected_grads):
        scale = want.abs().max()  # a sum over 64 rows: compare against the gradient's own size
        torch.testing.assert_close(got / scale, want / scale, **BF16)


def test_mlp_relu_runs_in_place_and_equals_the_plain_composition():
    torch.manual_seed(0)
    mlp = MLP(5, [4, 3])
    assert [m.inplace for m in mlp if isinstance(m, nn.ReLU)] == [True, True]
    inputs = torch.randn(8, 5, requires_grad=True)
    out = mlp(inputs)
    plain = inputs
    for layer in (m for m in mlp if isinstance(m, nn.Linear)):  # each layer itself, then an out-of-place ReLU
        plain = torch.relu(layer(plain))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    params = [inputs, *mlp.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, grad_out), torch.autograd.grad(plain, params, grad_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("in_dim, bias", [(445, True), (13, False), (447, True), (31, True), (32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aligned_linear_trains_as_nn_linear(in_dim, bias, dtype):
    """Output and every gradient equal ``F.linear``'s; an aligned width (32) runs nn.Linear itself."""
    torch.manual_seed(0)
    layer = AlignedLinear(in_dim, 24, bias=bias).to(dtype)
    inputs = torch.randn(40, in_dim, dtype=dtype, requires_grad=True)
    out = layer(inputs)
    assert (type(out.grad_fn).__name__ == "_AugmentedLinearBackward") == (in_dim % 16 != 0)  # the path that ran
    plain = nn.functional.linear(inputs, layer.weight, layer.bias)
    torch.testing.assert_close(out, plain)
    grad_out = torch.randn_like(out)
    params = [inputs, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, grad_out), torch.autograd.grad(plain, params, grad_out)):
        torch.testing.assert_close(got, want)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(layer, (inputs,))


def test_aligned_linear_is_nn_linear_outside_fp32_training():
    """The same state dict as nn.Linear; evaluation, no_grad, bf16 autocast and 3-d inputs run nn.Linear's
    own kernel (bit-equal), so exported programs and inference see a plain linear layer."""
    torch.manual_seed(0)
    layer, reference = AlignedLinear(445, 8), nn.Linear(445, 8)
    reference.load_state_dict(layer.state_dict())
    assert {k: v.shape for k, v in layer.state_dict().items()} == {"weight": (8, 445), "bias": (8,)}
    inputs = torch.randn(6, 445)
    with torch.no_grad():
        assert not layer._augments(inputs) and torch.equal(layer(inputs), reference(inputs))
    with _autocast():
        assert not layer._augments(inputs) and torch.equal(layer(inputs), reference(inputs))
    assert not layer._augments(inputs[None]) and torch.equal(layer(inputs[None]), reference(inputs[None]))
    layer.eval()
    assert not layer._augments(inputs) and torch.equal(layer(inputs), reference(inputs))


def test_gate_mix_under_bf16_autocast_follows_the_fp32_reference():
    """Lightning's bf16-mixed hands the op bf16 experts and logits (both from autocast's GEMMs)."""
    generator = torch.Generator().manual_seed(0)
    experts = torch.randn(33, 8, 16, generator=generator).requires_grad_()
    logits = torch.randn(33, 2, 8, generator=generator).requires_grad_()
    grad_out = torch.randn(33, 2, 16, generator=generator)
    with _autocast():
        out = gate_mix(experts.bfloat16(), logits.bfloat16())
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float(), (experts, logits), grad_out)
    expected = gate_mix_reference(experts, logits)
    expected_grads = torch.autograd.grad(expected, (experts, logits), grad_out)
    torch.testing.assert_close(out.float(), expected, **BF16)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("chain", ["esmm", "esm2"])
def test_probability_chain_under_bf16_autocast_follows_the_fp32_reference(chain):
    """The chain computes in fp32 whatever it is given; only the rounding of its bf16 inputs differs."""
    heads = {"esmm": 2, "esm2": 4}[chain]
    targets_width = {"esmm": 2, "esm2": 3}[chain]
    generator = torch.Generator().manual_seed(0)
    head_logits = (3 * torch.randn(40, heads, generator=generator)).requires_grad_()
    targets = (torch.rand(40, targets_width, generator=generator) < 0.3).float()
    with _autocast():
        chain_logits, losses = probability_chain(head_logits.bfloat16(), targets, chain)
    expected_logits, expected_losses = probability_chain_reference(head_logits, targets, chain)
    torch.testing.assert_close(chain_logits.float(), expected_logits, **BF16)
    torch.testing.assert_close(losses.float(), expected_losses, **BF16)
    grad = torch.autograd.grad(losses.float().sum(), head_logits)[0]
    expected_grad = torch.autograd.grad(expected_losses.sum(), head_logits)[0]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected_grad, **BF16)


def test_default_dense_optimizer_is_fused_adam_equal_to_the_per_tensor_loop():
    """Fused Adam orders its float operations differently: equal to the loop within a few ulps."""
    torch.manual_seed(0)
    shapes = [(64, 13), (64,), (3, 16, 8), (1,)]
    fused_params = [torch.randn(shape, requires_grad=True) for shape in shapes]
    loop_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused, loop = _adam(fused_params), torch.optim.Adam(loop_params, lr=1e-3, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for got, want in zip(fused_params, loop_params):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
