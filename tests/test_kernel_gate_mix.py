"""Parity of the fused softmax gate mix at three tiers (STYLE.md section 8).

Tier 1 (CPU): reference vs hand values and an independent loop formula, gradcheck in float64,
opcheck, the registered op vs the reference, torch.compile. Tier 2 (CPU): the Triton kernels
themselves under TRITON_INTERPRET=1, in a subprocess because the variable must be set before triton
is imported. Tier 3 (CUDA): forward and both gradients in fp32 and bf16 at realistic shapes.
Shape letters: B batch, T gates, E experts, D dim.
"""

from __future__ import annotations

import importlib.util
import math
import textwrap

import pytest
import torch

from triton_interpreter import run_under_triton_interpreter
from lightning_mtr.kernels import gate_mix as gm
from lightning_mtr.kernels.gate_mix import gate_mix, gate_mix_reference
from lightning_mtr.kernels.triton_support import interpreting

HAS_TRITON = importlib.util.find_spec("triton") is not None
# (B, T, E, D): single everything, E not a power of two, odd everything, D spanning several BLOCK_D chunks
SHAPES = [(1, 1, 1, 1), (1, 1, 3, 1), (5, 3, 6, 7), (2, 2, 5, 300), (64, 4, 16, 33)]


def _inputs(B, T, E, D, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    experts = torch.randn(B, E, D, dtype=dtype, device=device, generator=generator)
    gate_logits = torch.randn(B, T, E, dtype=dtype, device=device, generator=generator)
    return experts.requires_grad_(), gate_logits.requires_grad_()


def _forward_and_grads(fn, experts, gate_logits, grad_out):
    out = fn(experts, gate_logits)
    return (out, *torch.autograd.grad(out, (experts, gate_logits), grad_out))


# ---------------------------------------------------------------------------------------------
# Tier 1: CPU, always
# ---------------------------------------------------------------------------------------------
def test_reference_on_hand_values():
    experts = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # B=1, E=3, D=2
    gate_logits = torch.tensor([[[0.0, 0.0, 0.0],  # uniform: the mean expert
                                 [math.log(3.0), 0.0, 0.0],  # weights 3/5, 1/5, 1/5
                                 [100.0, 0.0, 0.0]]])  # saturated: expert 0 only, no overflow
    expected = torch.tensor([[[3.0, 4.0], [2.2, 3.2], [1.0, 2.0]]])
    torch.testing.assert_close(gate_mix_reference(experts, gate_logits), expected)


def test_reference_matches_loops():
    experts, gate_logits = _inputs(3, 2, 5, 4, dtype=torch.float64)
    expected = torch.zeros(3, 2, 4, dtype=torch.float64)
    for b in range(3):
        for t in range(2):
            exps = [math.exp(gate_logits[b, t, e].item()) for e in range(5)]
            for e in range(5):
                expected[b, t] += exps[e] / sum(exps) * experts[b, e].detach()
    torch.testing.assert_close(gate_mix_reference(experts, gate_logits), expected)


def test_gradcheck_float64():
    experts, gate_logits = _inputs(3, 2, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(gate_mix, (experts, gate_logits))  # auto: the registered op's CPU impl
    assert torch.autograd.gradcheck(gate_mix_reference, (experts, gate_logits))


def test_opcheck():
    op, backward_op = torch.ops.lightning_mtr.gate_mix.default, torch.ops.lightning_mtr.gate_mix_backward.default
    for B, T, E, D in [(1, 1, 3, 1), (5, 3, 6, 7)]:
        experts, gate_logits = _inputs(B, T, E, D)
        torch.library.opcheck(op, (experts, gate_logits))
        torch.library.opcheck(op, (experts.detach(), gate_logits.detach()))
        weights = torch.softmax(gate_logits.detach(), dim=-1)
        torch.library.opcheck(backward_op, (torch.randn(B, T, D), experts.detach(), weights))
    # dense but permuted layouts: the fakes must promise the layout the real impls return
    experts = torch.randn(4, 7, 3).transpose(1, 2)  # [B, E=3, D=7]
    gate_logits = torch.randn(4, 3, 2).transpose(1, 2)  # [B, T=2, E=3]
    torch.library.opcheck(op, (experts, gate_logits))
    torch.library.opcheck(op, (experts.requires_grad_(), gate_logits.requires_grad_()))
    torch.library.opcheck(backward_op, (torch.randn(4, 7, 2).transpose(1, 2), experts.detach(),
                                        torch.softmax(gate_logits.detach(), dim=-1).transpose(1, 2).contiguous()
                                        .transpose(1, 2)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_op_matches_reference(shape):
    experts, gate_logits = _inputs(*shape)
    grad_out = torch.randn(shape[0], shape[1], shape[3])
    got = _forward_and_grads(gate_mix, experts, gate_logits, grad_out)
    want = _forward_and_grads(gate_mix_reference, experts, gate_logits, grad_out)
    for name, g, w in zip(("out", "grad_experts", "grad_logits"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_op_saves_experts_and_weights_only():
    """Backward keeps the experts and the [B, T, E] softmax, nothing of size [B, T, E, D]."""
    experts, gate_logits = _inputs(4, 2, 3, 5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gate_mix(experts, gate_logits)
    assert len(saved) == 2 and saved[0] is experts
    torch.testing.assert_close(saved[1], torch.softmax(gate_logits, dim=-1))


def test_torch_compile_fullgraph():
    """Dynamo, AOTAutograd and Inductor see both ops end to end (fake, autograd, backward op), no graph break.

    The slowest test here: ~20 s on 2 CPU cores with a cold Inductor cache (C++ codegen), hence the tiny shape.
    """
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def mix_and_sum(experts, gate_logits):
        return gate_mix(experts, gate_logits).square().sum()

    experts, gate_logits = _inputs(2, 2, 3, 4)
    got = _forward_and_grads(mix_and_sum, experts, gate_logits, torch.tensor(1.0))
    want = _forward_and_grads(lambda x, g: gate_mix_reference(x, g).square().sum(), experts, gate_logits,
                              torch.tensor(1.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_inputs():
    experts, gate_logits = torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="one of"):
        gate_mix(experts, gate_logits, backend="cuda")
    with pytest.raises(ValueError, match="agree on B and E"):
        gate_mix(experts, torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="agree on B and E"):
        gate_mix(experts, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"\[B, E, D\]"):
        gate_mix(experts[0], gate_logits)
    with pytest.raises(ValueError, match="dtype"):
        gate_mix(experts, gate_logits.double())
    with pytest.raises(ValueError, match="dtype"):
        gate_mix(experts.long(), gate_logits.long())
    if gm.triton is None:
        with pytest.raises(RuntimeError, match="needs the triton package"):
            gate_mix(experts, gate_logits, backend="triton")
    elif not interpreting():
        with pytest.raises(ValueError, match="CUDA"):
            gate_mix(experts, gate_logits, backend="triton")


# ---------------------------------------------------------------------------------------------
# Tier 2: the Triton kernels under the interpreter, CPU, always when triton is importable
# ---------------------------------------------------------------------------------------------
INTERPRETED = textwrap.dedent("""
    import sys, torch
    from lightning_mtr.kernels import gate_mix as gm
    from lightning_mtr.kernels.triton_support import interpreting
    assert interpreting(), "TRITON_INTERPRET=1 did not reach triton"

    def check(experts, gate_logits, grad_out, tol):
        experts.requires_grad_(); gate_logits.requires_grad_()
        got = gm.gate_mix(experts, gate_logits, backend="triton")
        got = (got, *torch.autograd.grad(got, (experts, gate_logits), grad_out))
        # the reference in fp32 on the same (possibly low-precision) inputs
        x32 = experts.detach().float().requires_grad_(); g32 = gate_logits.detach().float().requires_grad_()
        want = gm.gate_mix_reference(x32, g32)
        want = (want, *torch.autograd.grad(want, (x32, g32), grad_out.float()))
        for name, g, w in zip(("out", "grad_experts", "grad_logits"), got, want):
            if g.dtype != experts.dtype or g.shape != w.shape:
                sys.exit(f"{name}: got {g.dtype} {tuple(g.shape)}, want {experts.dtype} {tuple(w.shape)}")
            err = (g.float() - w).abs().max().item()
            if not torch.allclose(g.float(), w, rtol=tol, atol=tol):
                sys.exit(f"MISMATCH {name} {experts.dtype} experts {tuple(experts.shape)} "
                         f"gates {tuple(gate_logits.shape)}: max abs err {err:.3e} > {tol}")

    torch.manual_seed(0)
    # (B, T, E, D): E=3 and 6 not powers of two; D=300 spans two BLOCK_D chunks with a tail;
    # E=33 pads to 64 and forces the smallest BLOCK_D
    for B, T, E, D in [(1, 1, 3, 1), (5, 3, 6, 7), (2, 2, 5, 300), (3, 5, 33, 9)]:
        check(torch.randn(B, E, D), torch.randn(B, T, E), torch.randn(B, T, D), tol=1e-5)
    # strided inputs: the kernels take strides instead of copying
    check(torch.randn(4, 7, 3).transpose(1, 2), torch.randn(4, 3, 2).transpose(1, 2),
          torch.randn(4, 7, 2).transpose(1, 2), tol=1e-5)
    check(torch.randn(3, 6, 5), torch.randn(3, 2, 6), torch.ones(1, 1, 1).expand(3, 2, 5), tol=1e-5)
    # low precision: fp32 inside, one rounding of each output (fp16 2^-11, bf16 2^-8 relative)
    for dtype, tol in [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)]:
        check(torch.randn(3, 5, 9).to(dtype), torch.randn(3, 2, 5).to(dtype), torch.randn(3, 2, 9).to(dtype), tol)
    print("interpreted gate_mix kernels match the reference")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    assert "match the reference" in run_under_triton_interpreter(INTERPRETED)


# ---------------------------------------------------------------------------------------------
# Tier 3: CUDA, when present
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_SHAPES = [(4096, 2, 8, 64), (16384, 4, 16, 256), (1000, 3, 6, 100)]
# fp32: both sides accumulate in fp32 in different orders; the D-long dot products behind
# grad_logits (up to 256 terms of O(1)) reach a few 1e-6 absolute, so 1e-5 leaves margin.
# bf16: kernel inputs are bf16, the reference runs in fp32 on the same values; the kernel computes
# in fp32 and rounds each output once to bf16 (8 mantissa bits, 2^-8 = 0.4% relative), so 2e-2
# relative (plus 2e-2 absolute for values near zero) bounds one rounding with room for accumulation.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_matches_reference(shape, dtype, backend):
    experts, gate_logits = _inputs(*shape, dtype=dtype, device="cuda")
    grad_out = torch.randn(shape[0], shape[1], shape[3], dtype=dtype, device="cuda")
    got = _forward_and_grads(lambda x, g: gate_mix(x, g, backend=backend), experts, gate_logits, grad_out)
    x32, g32 = experts.detach().float().requires_grad_(), gate_logits.detach().float().requires_grad_()
    want = _forward_and_grads(gate_mix_reference, x32, g32, grad_out.float())
    for name, g, w in zip(("out", "grad_experts", "grad_logits"), got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")


@cuda
def test_cuda_backends_agree():
    """gate_mix has no parameters: any backend gives the same outputs (checkpoint-independent)."""
    experts, gate_logits = _inputs(4096, 4, 16, 256, device="cuda")
    grad_out = torch.randn(4096, 4, 256, device="cuda")
    results = {backend: _forward_and_grads(lambda x, g, b=backend: gate_mix(x, g, backend=b), experts, gate_logits,
                                           grad_out) for backend in ("torch", "auto", "triton")}
    for backend in ("auto", "triton"):
        for g, w in zip(results[backend], results["torch"]):
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])
