"""Parity tests for lightning_mtr/kernels/prob_chain.py at the three tiers of STYLE.md section 8."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import run_under_triton_interpreter
from lightning_mtr.kernels.triton_support import interpreting
from lightning_mtr.kernels.prob_chain import CHAINS, probability_chain, probability_chain_reference

BOTH = ("esmm", "esm2")
OP = torch.ops.lightning_mtr.probability_chain.default
OP_BWD = torch.ops.lightning_mtr.probability_chain_backward.default


def _product_form(x: torch.Tensor, chain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The papers' formulas as plain probabilities: returns (chain p [B, C], supervised p [B, K])."""
    s = torch.sigmoid(x)
    if chain == "esmm":
        ctr, cvr = s[:, 0], s[:, 1]
        return torch.stack([ctr, cvr, ctr * cvr], 1), torch.stack([ctr, ctr * cvr], 1)
    y1, y2, y3, y4 = s.unbind(1)
    cvr = (1 - y2) * y4 + y2 * y3
    return torch.stack([y1, y1 * y2, y1 * cvr, cvr], 1), torch.stack([y1, y1 * y2, y1 * cvr], 1)


def _naive_losses(x: torch.Tensor, y: torch.Tensor, chain: str) -> torch.Tensor:
    return F.binary_cross_entropy(_product_form(x, chain)[1], y, reduction="none")


def _random(chain: str, batch: int, dtype=torch.float64, scale: float = 3.0, seed: int = 0):
    h, _, k = CHAINS[chain]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, generator=g, dtype=dtype) * scale,
            torch.randint(0, 2, (batch, k), generator=g).to(dtype))


def _extreme(chain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head at +-30 / +-80 / mixed, crossed with every label pattern, float32."""
    h, _, k = CHAINS[chain]
    rows = [[v] * h for v in (30.0, -30.0, 80.0, -80.0)]
    rows += [[(80.0 if (i >> j) & 1 else -80.0) for j in range(h)] for i in range(2**h)]
    rows += [[(30.0 if (i >> j) & 1 else -80.0) for j in range(h)] for i in range(2**h)]
    x = torch.tensor(rows).repeat_interleave(2**k, 0)
    y = torch.tensor([[(i >> j) & 1 for j in range(k)] for i in range(2**k)], dtype=torch.float32)
    return x, y.repeat(len(rows), 1)


def _fwd_and_grads(fn, x: torch.Tensor, y: torch.Tensor, chain: str, seed: int = 1):
    x = x.detach().clone().requires_grad_()
    z, loss = fn(x, y, chain)
    g = torch.Generator().manual_seed(seed)
    gz, gl = torch.randn(z.shape, generator=g), torch.randn(loss.shape, generator=g)
    torch.autograd.backward((z, loss), (gz.to(z), gl.to(loss)))  # .to: device and dtype
    return z.detach(), loss.detach(), x.grad


# ---------------------------------------------------------------- tier 1: CPU, always
@pytest.mark.parametrize("chain", BOTH)
def test_reference_matches_product_formulas(chain):
    h, _, k = CHAINS[chain]
    x = torch.tensor([[0.3, -1.2, 2.0, 0.5], [-1.5, -0.7, 0.1, 3.0], [4.0, 1.0, -2.5, -0.4]],
                     dtype=torch.float64)[:, :h]
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)[:, :k]
    p_chain, p_sup = _product_form(x, chain)
    z, loss = probability_chain_reference(x, y, chain)
    torch.testing.assert_close(z, torch.log(p_chain / (1 - p_chain)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, -(y * p_sup.log() + (1 - y) * (1 - p_sup).log()), rtol=1e-12, atol=1e-12)


def test_reference_hand_value():
    # s(0) = 1/2 for every head: esmm pCTCVR = 1/4; esm2 pCVR = 1/2, pCTAVR = pCTCVR = 1/4.
    f64 = dict(dtype=torch.float64)
    z, loss = probability_chain_reference(torch.zeros(1, 2, **f64), torch.zeros(1, 2, **f64), "esmm")
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.0, math.log(1 / 3)]], **f64))
    torch.testing.assert_close(loss, torch.tensor([[math.log(2), math.log(4 / 3)]], **f64))
    z, _ = probability_chain_reference(torch.zeros(1, 4, **f64), torch.zeros(1, 3, **f64), "esm2")
    torch.testing.assert_close(z, torch.tensor([[0.0, math.log(1 / 3), math.log(1 / 3), 0.0]], **f64))


@pytest.mark.parametrize("chain", BOTH)
def test_gradcheck(chain):
    x, y = _random(chain, 5)
    for fn in (probability_chain_reference, lambda a, b, c: OP(a, b, c)):
        assert torch.autograd.gradcheck(lambda a: fn(a, y, chain), (x.clone().requires_grad_(),))


@pytest.mark.parametrize("chain", BOTH)
def test_opcheck(chain):
    x, y = _random(chain, 6, dtype=torch.float32)
    torch.library.opcheck(OP, (x.requires_grad_(), y, chain))
    _, c, k = CHAINS[chain]
    torch.library.opcheck(OP_BWD, (torch.randn(6, c), torch.randn(6, k), x.detach(), y, chain))


@pytest.mark.parametrize("chain", BOTH)
def test_extreme_logits_stable_where_naive_fails(chain):
    x, y = _extreme(chain)
    want_z, want_loss, want_grad = _fwd_and_grads(probability_chain_reference, x.double(), y.double(), chain)
    for backend in ("auto", "torch"):
        z, loss, grad = _fwd_and_grads(lambda a, b, c: probability_chain(a, b, c, backend), x, y, chain)
        for got in (z, loss, grad):
            assert torch.isfinite(got).all()
        # float32 math on logits up to 80: errors are a few ulps of values up to ~240.
        torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)
    # The naive composition in float32: sigmoid rounds to 0 or 1 and products underflow; BCE's
    # clamp of log at -100 keeps the loss finite but wrong, and its gradient is then zero.
    xn, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    naive = _naive_losses(xn, y, chain)
    naive.sum().backward()
    true = probability_chain_reference(xr, y.double(), chain)[1]
    true.sum().backward()
    wrong_loss = ~torch.isfinite(naive) | ((naive.double() - true.detach()).abs() > 1)
    dead_grad = ~torch.isfinite(xn.grad) | ((xn.grad.abs() < 1e-6) & (xr.grad.abs() > 0.1))
    assert wrong_loss.any() and dead_grad.any(), "naive product-then-BCE unexpectedly survived extreme logits"


@pytest.mark.parametrize("chain", BOTH)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_reference(chain, dtype):
    x, y = _random(chain, 33, dtype=dtype, scale=4.0)
    want = _fwd_and_grads(probability_chain_reference, x, y, chain)
    got = _fwd_and_grads(probability_chain, x, y, chain)
    # same float math forward; the analytic backward differs from autograd's by rounding only.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    xg = x.clone().requires_grad_()
    probability_chain(xg, y, chain)[1].sum().backward()  # chain_logits unused: its grad arrives as None
    xr = x.clone().requires_grad_()
    probability_chain_reference(xr, y, chain)[1].sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=tol, atol=tol)


def test_bf16_in_bf16_out():
    x, y = _random("esm2", 9, dtype=torch.float32)
    z, loss = probability_chain(x.bfloat16(), y.bfloat16(), "esm2")
    assert z.dtype == loss.dtype == torch.bfloat16
    want_z, want_loss = probability_chain_reference(x.bfloat16().double(), y.double(), "esm2")
    # the only error is the final rounding to bf16 (8 bits of mantissa).
    torch.testing.assert_close(z.double(), want_z, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(loss.double(), want_loss, rtol=8e-3, atol=8e-3)


def test_compile_fullgraph_matches_eager():
    x, y = _random("esm2", 3, dtype=torch.float32)
    # Only the op in the graph: inductor then emits no C++ kernels and compiles in seconds on CPU.
    compiled = torch.compile(lambda a, b: probability_chain(a, b, "esm2"), fullgraph=True)
    got = _fwd_and_grads(lambda a, b, c: compiled(a, b), x, y, "esm2")
    want = _fwd_and_grads(probability_chain_reference, x, y, "esm2")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), torch.zeros(2, 2), "esmm"), r"head_logits \[B, 2\]"),
    ((torch.zeros(2, 4), torch.zeros(2, 2), "esm2"), r"targets \[B, 3\]"),
    ((torch.zeros(2, 2), torch.zeros(3, 2), "esmm"), r"targets \[B, 2\]"),
    ((torch.zeros(2, 2), torch.zeros(2, 2), "esmx"), "chain must be one of"),
    ((torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2), "esmm"), "floating point"),
])
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        probability_chain(*args)


def test_validation_backend():
    with pytest.raises(ValueError, match="unknown probability_chain backend 'cuda'"):
        probability_chain(torch.zeros(2, 2), torch.zeros(2, 2), "esmm", backend="cuda")
    if not interpreting():
        with pytest.raises((ValueError, RuntimeError), match="backend='triton'"):
            probability_chain(torch.zeros(2, 2), torch.zeros(2, 2), "esmm", backend="triton")


def test_imports_without_triton_and_torchrec():
    script = (
        "import sys\n"
        "for name in ('triton', 'torchrec', 'fbgemm_gpu'): sys.modules[name] = None  # import fails\n"
        "import torch\n"
        "from lightning_mtr.kernels.prob_chain import probability_chain\n"
        "z, loss = probability_chain(torch.zeros(3, 4, requires_grad=True), torch.ones(3, 3), 'esm2')\n"
        "loss.sum().backward()\n"
        "try:\n"
        "    probability_chain(torch.zeros(3, 2), torch.ones(3, 2), 'esmm', backend='triton')\n"
        "except RuntimeError:  # no triton package\n"
        "    sys.exit(0)\n"
        "sys.exit('backend=triton without triton did not raise')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- tier 2: Triton interpreter on CPU
_INTERPRETER_SCRIPT = r"""
import sys
import torch
from lightning_mtr.kernels import prob_chain as pc
sys.path.insert(0, sys.argv[1])
from test_kernel_prob_chain import _extreme, _fwd_and_grads, _random

from lightning_mtr.kernels.triton_support import interpreting
assert interpreting() and pc.triton is not None
failures = []
def check(name, got, want, tol):
    if not torch.allclose(got.double(), want, rtol=tol, atol=tol):
        failures.append(f"{name}: max abs err {(got.double() - want).abs().max().item():.3g}")

for chain in ("esmm", "esm2"):
    xe, ye = _extreme(chain)
    xr, yr = _random(chain, 7, dtype=torch.float32, seed=3)
    cases = {"B=1": (xe[5:6], ye[5:6]), "B=7 random": (xr, yr), "B=7 extreme": (xe[::5][:7], ye[::5][:7])}
    for case, (x, y) in cases.items():
        assert x.shape[0] in (1, 7)
        want = _fwd_and_grads(pc.probability_chain_reference, x.double(), y.double(), chain)
        public = _fwd_and_grads(lambda a, b, c: pc.probability_chain(a, b, c, "triton"), x, y, chain)
        z4, l4 = pc._triton_forward(x, y, chain, block=4)  # block 4 < B = 7: the 2nd program is masked
        g = torch.Generator().manual_seed(1)
        gz, gl = torch.randn(z4.shape, generator=g), torch.randn(l4.shape, generator=g)
        g4 = pc._triton_backward(gz, gl, x, y, chain, block=4)
        # float32 kernel math vs float64 reference on logits up to 80.
        for tag, got in (("public", public), ("block=4", (z4, l4, g4))):
            for what, a, b in zip(("chain_logits", "losses", "grad"), got, want):
                check(f"{chain} {case} {tag} {what}", a, b, 1e-5)
if failures:
    print("Triton interpreter mismatches:\n" + "\n".join(failures))
    sys.exit(1)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    run_under_triton_interpreter(_INTERPRETER_SCRIPT, str(Path(__file__).resolve().parent))


# ---------------------------------------------------------------- tier 3: GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("chain", BOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(chain, dtype):
    x, y = _random(chain, 65536, dtype=torch.float32, scale=4.0)
    x = x.to(dtype)
    want = _fwd_and_grads(probability_chain_reference, x.double(), y.double(), chain)
    got = _fwd_and_grads(probability_chain, x.cuda(), y.cuda().to(dtype), chain)
    # fp32: kernel math in fp32 on |logits| <~ 20, a few ulps of values <~ 40.
    # bf16: math is fp32, the error is the final rounding to 8 mantissa bits (rel 2^-8), plus the
    # upstream grads being rounded to bf16 before the backward.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol)
