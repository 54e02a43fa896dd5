"""Probability chain + per-row BCE for ESMM and ESM2, computed in log space.

ESMM (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018): heads (a, b) = (CTR, CVR) logits,
pCTCVR = s(a) * s(b). ESM2 (Wen et al., "Entire Space Multi-Task Modeling via Post-Click Behavior
Decomposition", SIGIR 2020): heads y1..y4, Y_i = s(y_i); pCTR = Y1, pCTAVR = Y1 * Y2,
pCVR = (1 - Y2) * Y4 + Y2 * Y3, pCTCVR = Y1 * pCVR.

Every probability p is carried as the pair (log p, log(1 - p)); each 1 - p has an identity free of
cancellation (1 - Y1 * q = (1 - Y1) + Y1 * (1 - q), and 1 - pCVR = (1 - Y2)(1 - Y4) + Y2 (1 - Y3)),
so products of tiny probabilities neither underflow nor give inf/NaN losses, and no log1mexp is
needed. Shapes: B rows, H heads, C chain outputs, K supervised outputs.

    chain   H  head columns        C  chain_logits columns       K  targets / losses columns
    esmm    2  (ctr, cvr)          3  (ctr, cvr, ctcvr)          2  (ctr, ctcvr)
    esm2    4  (y1, y2, y3, y4)    4  (ctr, ctavr, ctcvr, cvr)   3  (ctr, ctavr, ctcvr)

The triad (STYLE.md section 7): ``probability_chain_reference`` (the spec, autograd gives its
gradients), Triton forward/backward kernels (optional import), and the registered ops
``lightning_mtr::probability_chain`` / ``lightning_mtr::probability_chain_backward`` (CPU: vectorised
torch, CUDA: Triton, or the same torch code for float64 or without triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mtr.kernels.triton_support import Backend, check_backend, tl, triton

CHAINS = {"esmm": (2, 3, 2), "esm2": (4, 4, 3)}  # chain -> (H, C, K)
_CHAIN_ID = {"esmm": 0, "esm2": 1}
_BLOCK_B = 1024


def _heads(x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per head column: log s(x) and log(1 - s(x)) = log s(-x), as contiguous [B] vectors."""
    # Column by column: torch.logaddexp on strided columns is ~7x slower than on contiguous ones.
    cols = x.unbind(1)
    return [F.logsigmoid(c) for c in cols], [F.logsigmoid(-c) for c in cols]


def _chain_terms(x: Tensor, chain: str) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Chain logits, then (log p, log(1 - p)) of each supervised output, from head logits x [B, H]."""
    lp, lq = _heads(x)
    lae = torch.logaddexp
    if chain == "esmm":
        lp_ctcvr, lq_ctcvr = lp[0] + lp[1], lae(lq[0], lp[0] + lq[1])  # 1 - s(a)s(b) = (1 - s(a)) + s(a)(1 - s(b))
        return [x[:, 0], x[:, 1], lp_ctcvr - lq_ctcvr], [lp[0], lp_ctcvr], [lq[0], lq_ctcvr]
    lp_ctavr, lq_ctavr = lp[0] + lp[1], lae(lq[0], lp[0] + lq[1])
    lp_cvr, lq_cvr = lae(lq[1] + lp[3], lp[1] + lp[2]), lae(lq[1] + lq[3], lp[1] + lq[2])
    lp_ctcvr, lq_ctcvr = lp[0] + lp_cvr, lae(lq[0], lp[0] + lq_cvr)
    logits = [x[:, 0], lp_ctavr - lq_ctavr, lp_ctcvr - lq_ctcvr, lp_cvr - lq_cvr]
    return logits, [lp[0], lp_ctavr, lp_ctcvr], [lq[0], lq_ctavr, lq_ctcvr]


def _compute_dtype(head_logits: Tensor) -> torch.dtype:
    return torch.promote_types(head_logits.dtype, torch.float32)


def probability_chain_reference(head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch spec: chain logits log p - log(1 - p) and BCE -(y log p + (1 - y) log(1 - p)).

    Args: head_logits [B, H], targets [B, K] in {0, 1}. Returns (chain_logits [B, C], losses [B, K])
    in head_logits' dtype (math in at least float32). The CTR (and ESMM CVR) logit is the head logit
    itself: logit(s(a)) = a exactly.
    """
    x = head_logits.to(_compute_dtype(head_logits))
    y = targets.to(x.dtype)
    logits, log_p, log_q = _chain_terms(x, chain)
    losses = [-(y[:, k] * lp + (1 - y[:, k]) * lq) for k, (lp, lq) in enumerate(zip(log_p, log_q))]
    return torch.stack(logits, 1).to(head_logits.dtype), torch.stack(losses, 1).to(head_logits.dtype)


def _forward_torch(head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
    """The reference's math with its outputs written in place: the registered op's CPU forward."""
    x = head_logits.to(_compute_dtype(head_logits))
    y = targets.to(x.dtype)
    logits, log_p, log_q = _chain_terms(x, chain)
    z, losses = x.new_empty(x.shape[0], len(logits)), x.new_empty(y.shape)
    for i, logit in enumerate(logits):
        z[:, i] = logit
    for k, (lp, lq) in enumerate(zip(log_p, log_q)):
        torch.lerp(lq, lp, y[:, k], out=losses[:, k])  # exactly lp or lq for y in {0, 1}
    return z.to(head_logits.dtype), losses.neg_().to(head_logits.dtype)


def _backward_torch(gz: Tensor, gl: Tensor, head_logits: Tensor, targets: Tensor, chain: str) -> Tensor:
    """d head_logits [B, H] from d chain_logits [B, C] and d losses [B, K]; the Triton backward mirrors it.

    Each output's (log p, log(1 - p)) gets gp = gz - y gL and gq = -gz - (1 - y) gL. A logaddexp
    lae(u, v) passes s(u - v) to u and s(v - u) to v; log s(x) and log(1 - s(x)) have derivatives
    s(-x) and -s(x). Every weight is in [0, 1], so no term overflows for any logits. The weights'
    arguments use log s(x) - log(1 - s(x)) = x, so only log(1 - s(x)) of heads 2..H is recomputed.
    """
    x = head_logits.to(_compute_dtype(head_logits))
    y, gz, gl = targets.to(x.dtype), gz.to(x.dtype), gl.to(x.dtype)
    xs = x.unbind(1)
    m = [None] + [F.logsigmoid(-c) for c in xs[1:]]
    yg = y * gl
    gp, gq = (-yg).unbind(1), yg.sub_(gl).unbind(1)  # loss parts of gp, gq per supervised output
    sig = torch.sigmoid
    if chain == "esmm":
        gp1, gq1 = gp[1] + gz[:, 2], gq[1] - gz[:, 2]
        d = xs[0] + m[1]  # lq_ctcvr = lae(m0, l0 + m1), l0 - m0 = x0
        wb, wa = sig(d).mul_(gq1), sig(d.neg_()).mul_(gq1)
        g_l, g_m = [(gp[0] + gp1).add_(wb), gp1], [gq[0] + wa, wb]
    else:
        gp_av, gq_av = gp[1] + gz[:, 1], gq[1] - gz[:, 1]
        gp_ct, gq_ct = gp[2] + gz[:, 2], gq[2] - gz[:, 2]
        u = xs[1] + m[2]  # l1 + m2 - m1
        d_q = u - m[3]  # lq_cvr = lae(m1 + m3, l1 + m2)
        d_p = (d_q + xs[2]).sub_(xs[3])  # lp_cvr = lae(m1 + l3, l1 + l2)
        d_ct = torch.logaddexp(m[3], u).add_(m[1]).add_(xs[0])  # lq_ctcvr = lae(m0, l0 + lq_cvr)
        d_av = xs[0] + m[1]  # lq_ctavr = lae(m0, l0 + m1)
        t_av, t_ct = sig(d_av).mul_(gq_av), sig(d_ct).mul_(gq_ct)
        gp_cv, gq_cv = gp_ct + gz[:, 3], t_ct - gz[:, 3]
        g_l2, g_m2 = sig(d_p).mul_(gp_cv), sig(d_q).mul_(gq_cv)
        g_l3, g_m3 = sig(d_p.neg_()).mul_(gp_cv), sig(d_q.neg_()).mul_(gq_cv)
        g_l0 = (gp[0] + gp_av).add_(gp_ct).add_(t_av).add_(t_ct)
        g_m0 = sig(d_av.neg_()).mul_(gq_av).add_(sig(d_ct.neg_()).mul_(gq_ct)).add_(gq[0])
        g_l = [g_l0, (gp_av + g_l2).add_(g_m2), g_l2, g_l3]
        g_m = [g_m0, (t_av + g_l3).add_(g_m3), g_m2, g_m3]
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i, c in enumerate(xs):  # g_l s(-c) - g_m s(c) = g_l - (g_l + g_m) s(c): one sigmoid per head
        torch.sub(g_l[i], (g_l[i] + g_m[i]).mul_(sig(c)), out=grad[:, i])
    direct = 2 if chain == "esmm" else 1  # chain logits that are head logits themselves
    grad[:, :direct] += gz[:, :direct]
    return grad.to(head_logits.dtype)


if triton is not None:

    @triton.jit
    def _log1p(t):  # t in [0, 1]; exact-ish log1p from log (Goldberg's trick), tl has no log1p
        u = 1.0 + t
        return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))

    @triton.jit
    def _logsigmoid(x):
        return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))

    @triton.jit
    def _logaddexp(u, v):
        hi = tl.maximum(u, v)
        return hi + _log1p(tl.exp(tl.minimum(u, v) - hi))

    @triton.jit
    def _load_heads(h_ptr, rows, mask, H: tl.constexpr, i: tl.constexpr):
        x = tl.load(h_ptr + rows * H + i, mask=mask, other=0.0).to(tl.float32)
        return x, _logsigmoid(x), _logsigmoid(-x)

    @triton.jit
    def _bce(y, lp, lq):
        return -(y * lp + (1.0 - y) * lq)

    @triton.jit
    def _fwd_kernel(h_ptr, t_ptr, z_ptr, loss_ptr, B, CHAIN: tl.constexpr, H: tl.constexpr,
                    C: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < B
        y0 = tl.load(t_ptr + rows * K + 0, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(t_ptr + rows * K + 1, mask=mask, other=0.0).to(tl.float32)
        x0, l0, m0 = _load_heads(h_ptr, rows, mask, H, 0)
        x1, l1, m1 = _load_heads(h_ptr, rows, mask, H, 1)
        ty = z_ptr.dtype.element_ty
        tl.store(z_ptr + rows * C + 0, x0.to(ty), mask=mask)
        tl.store(loss_ptr + rows * K + 0, _bce(y0, l0, m0).to(ty), mask=mask)
        if CHAIN == 0:
            p, q = l0 + l1, _logaddexp(m0, l0 + m1)
            tl.store(z_ptr + rows * C + 1, x1.to(ty), mask=mask)
            tl.store(z_ptr + rows * C + 2, (p - q).to(ty), mask=mask)
            tl.store(loss_ptr + rows * K + 1, _bce(y1, p, q).to(ty), mask=mask)
        else:
            y2 = tl.load(t_ptr + rows * K + 2, mask=mask, other=0.0).to(tl.float32)
            x2, l2, m2 = _load_heads(h_ptr, rows, mask, H, 2)
            x3, l3, m3 = _load_heads(h_ptr, rows, mask, H, 3)
            p_av, q_av = l0 + l1, _logaddexp(m0, l0 + m1)
            p_cv, q_cv = _logaddexp(m1 + l3, l1 + l2), _logaddexp(m1 + m3, l1 + m2)
            p_ct, q_ct = l0 + p_cv, _logaddexp(m0, l0 + q_cv)
            tl.store(z_ptr + rows * C + 1, (p_av - q_av).to(ty), mask=mask)
            tl.store(z_ptr + rows * C + 2, (p_ct - q_ct).to(ty), mask=mask)
            tl.store(z_ptr + rows * C + 3, (p_cv - q_cv).to(ty), mask=mask)
            tl.store(loss_ptr + rows * K + 1, _bce(y1, p_av, q_av).to(ty), mask=mask)
            tl.store(loss_ptr + rows * K + 2, _bce(y2, p_ct, q_ct).to(ty), mask=mask)

    @triton.jit
    def _grad_in(g_l, g_m, x):  # through log s(x) and log(1 - s(x)): derivatives s(-x), -s(x)
        return g_l * tl.sigmoid(-x) - g_m * tl.sigmoid(x)

    @triton.jit
    def _bwd_kernel(gz_ptr, gl_ptr, h_ptr, t_ptr, gh_ptr, B, CHAIN: tl.constexpr, H: tl.constexpr,
                    C: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < B
        x0, _, _ = _load_heads(h_ptr, rows, mask, H, 0)  # unused logsigmoids are dead code to the compiler
        x1, _, m1 = _load_heads(h_ptr, rows, mask, H, 1)
        y0 = tl.load(t_ptr + rows * K + 0, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(t_ptr + rows * K + 1, mask=mask, other=0.0).to(tl.float32)
        gz0 = tl.load(gz_ptr + rows * C + 0, mask=mask, other=0.0).to(tl.float32)
        gz1 = tl.load(gz_ptr + rows * C + 1, mask=mask, other=0.0).to(tl.float32)
        gz2 = tl.load(gz_ptr + rows * C + 2, mask=mask, other=0.0).to(tl.float32)
        gL0 = tl.load(gl_ptr + rows * K + 0, mask=mask, other=0.0).to(tl.float32)
        gL1 = tl.load(gl_ptr + rows * K + 1, mask=mask, other=0.0).to(tl.float32)
        ty = gh_ptr.dtype.element_ty
        gp0, gq0 = -y0 * gL0, y0 * gL0 - gL0
        if CHAIN == 0:
            gp1, gq1 = gz2 - y1 * gL1, y1 * gL1 - gL1 - gz2
            d = x0 + m1
            wb, wa = tl.sigmoid(d) * gq1, tl.sigmoid(-d) * gq1
            tl.store(gh_ptr + rows * H + 0, (gz0 + _grad_in(gp0 + gp1 + wb, gq0 + wa, x0)).to(ty), mask=mask)
            tl.store(gh_ptr + rows * H + 1, (gz1 + _grad_in(gp1, wb, x1)).to(ty), mask=mask)
        else:
            x2, _, m2 = _load_heads(h_ptr, rows, mask, H, 2)
            x3, _, m3 = _load_heads(h_ptr, rows, mask, H, 3)
            y2 = tl.load(t_ptr + rows * K + 2, mask=mask, other=0.0).to(tl.float32)
            gz3 = tl.load(gz_ptr + rows * C + 3, mask=mask, other=0.0).to(tl.float32)
            gL2 = tl.load(gl_ptr + rows * K + 2, mask=mask, other=0.0).to(tl.float32)
            gp_av, gq_av = gz1 - y1 * gL1, y1 * gL1 - gL1 - gz1
            gp_ct, gq_ct = gz2 - y2 * gL2, y2 * gL2 - gL2 - gz2
            u = x1 + m2
            d_q = u - m3
            d_p, d_ct, d_av = d_q + x2 - x3, _logaddexp(m3, u) + m1 + x0, x0 + m1
            t_av, t_ct = tl.sigmoid(d_av) * gq_av, tl.sigmoid(d_ct) * gq_ct
            gp_cv, gq_cv = gp_ct + gz3, t_ct - gz3
            g_l2, g_m2 = tl.sigmoid(d_p) * gp_cv, tl.sigmoid(d_q) * gq_cv
            g_l3, g_m3 = tl.sigmoid(-d_p) * gp_cv, tl.sigmoid(-d_q) * gq_cv
            g_l0 = gp0 + gp_av + gp_ct + t_av + t_ct
            g_m0 = tl.sigmoid(-d_av) * gq_av + tl.sigmoid(-d_ct) * gq_ct + gq0
            tl.store(gh_ptr + rows * H + 0, (gz0 + _grad_in(g_l0, g_m0, x0)).to(ty), mask=mask)
            tl.store(gh_ptr + rows * H + 1, _grad_in(gp_av + g_l2 + g_m2, t_av + g_l3 + g_m3, x1).to(ty), mask=mask)
            tl.store(gh_ptr + rows * H + 2, _grad_in(g_l2, g_m2, x2).to(ty), mask=mask)
            tl.store(gh_ptr + rows * H + 3, _grad_in(g_l3, g_m3, x3).to(ty), mask=mask)


def _triton_forward(head_logits: Tensor, targets: Tensor, chain: str, block: int = _BLOCK_B) -> tuple[Tensor, Tensor]:
    (batch, h), (_, c, k) = head_logits.shape, CHAINS[chain]
    h_, t_ = head_logits.contiguous(), targets.contiguous()
    z = head_logits.new_empty(batch, c)
    losses = head_logits.new_empty(batch, k)
    if batch:
        _fwd_kernel[(triton.cdiv(batch, block),)](h_, t_, z, losses, batch, _CHAIN_ID[chain], h, c, k, block)
    return z, losses


def _triton_backward(gz: Tensor, gl: Tensor, head_logits: Tensor, targets: Tensor, chain: str,
                     block: int = _BLOCK_B) -> Tensor:
    (batch, h), (_, c, k) = head_logits.shape, CHAINS[chain]
    grad = torch.empty_like(head_logits, memory_format=torch.contiguous_format)
    if batch:
        _bwd_kernel[(triton.cdiv(batch, block),)](gz.contiguous(), gl.contiguous(), head_logits.contiguous(),
                                                  targets.contiguous(), grad, batch, _CHAIN_ID[chain], h, c, k, block)
    return grad


def _use_triton(t: Tensor) -> bool:  # float64 keeps its precision on the torch path
    return triton is not None and t.dtype != torch.float64


@torch.library.custom_op("lightning_mtr::probability_chain", mutates_args=(), device_types="cpu")
def _op(head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
    return _forward_torch(head_logits, targets, chain)


@_op.register_kernel("cuda")
def _op_cuda(head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
    if _use_triton(head_logits):
        return _triton_forward(head_logits, targets, chain)
    return _forward_torch(head_logits, targets, chain)


@_op.register_fake
def _op_fake(head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
    _, c, k = CHAINS[chain]
    batch = head_logits.shape[0]
    return head_logits.new_empty(batch, c), head_logits.new_empty(batch, k)


@torch.library.custom_op("lightning_mtr::probability_chain_backward", mutates_args=(), device_types="cpu")
def _op_bwd(grad_chain_logits: Tensor, grad_losses: Tensor, head_logits: Tensor, targets: Tensor, chain: str) -> Tensor:
    return _backward_torch(grad_chain_logits, grad_losses, head_logits, targets, chain)


@_op_bwd.register_kernel("cuda")
def _op_bwd_cuda(grad_chain_logits: Tensor, grad_losses: Tensor, head_logits: Tensor, targets: Tensor,
                 chain: str) -> Tensor:
    if _use_triton(head_logits):
        return _triton_backward(grad_chain_logits, grad_losses, head_logits, targets, chain)
    return _backward_torch(grad_chain_logits, grad_losses, head_logits, targets, chain)


@_op_bwd.register_fake
def _op_bwd_fake(grad_chain_logits: Tensor, grad_losses: Tensor, head_logits: Tensor, targets: Tensor,
                 chain: str) -> Tensor:
    return torch.empty_like(head_logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    head_logits, targets, ctx.chain = inputs
    ctx.save_for_backward(head_logits, targets)


def _grads_or_zeros(head_logits: Tensor, chain: str, gz: Tensor | None, gl: Tensor | None) -> tuple[Tensor, Tensor]:
    _, c, k = CHAINS[chain]
    gz = head_logits.new_zeros(head_logits.shape[0], c) if gz is None else gz
    gl = head_logits.new_zeros(head_logits.shape[0], k) if gl is None else gl
    return gz, gl


def _autograd_backward(ctx, gz: Tensor | None, gl: Tensor | None):
    head_logits, targets = ctx.saved_tensors
    gz, gl = _grads_or_zeros(head_logits, ctx.chain, gz, gl)
    return _op_bwd(gz, gl, head_logits, targets, ctx.chain), None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _TritonChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head_logits: Tensor, targets: Tensor, chain: str) -> tuple[Tensor, Tensor]:
        _setup_context(ctx, (head_logits, targets, chain), None)
        return _triton_forward(head_logits, targets, chain)

    @staticmethod
    def backward(ctx, gz: Tensor | None, gl: Tensor | None):
        head_logits, targets = ctx.saved_tensors
        gz, gl = _grads_or_zeros(head_logits, ctx.chain, gz, gl)
        return _triton_backward(gz, gl, head_logits, targets, ctx.chain), None, None


def _validate(head_logits: Tensor, targets: Tensor, chain: str, backend: str) -> None:
    if chain not in CHAINS:
        raise ValueError(f"chain must be one of {sorted(CHAINS)}, got {chain!r}")
    check_backend("probability_chain", backend, head_logits)
    h, _, k = CHAINS[chain]
    if head_logits.dim() != 2 or head_logits.shape[1] != h:
        raise ValueError(f"chain {chain!r} needs head_logits [B, {h}], got {tuple(head_logits.shape)}")
    if targets.shape != (head_logits.shape[0], k):
        raise ValueError(f"chain {chain!r} needs targets [B, {k}] = [{head_logits.shape[0]}, {k}], "
                         f"got {tuple(targets.shape)}")
    if not (head_logits.is_floating_point() and targets.is_floating_point()):
        raise ValueError(f"head_logits and targets must be floating point, got {head_logits.dtype}, {targets.dtype}")
    if targets.device != head_logits.device:
        raise ValueError(f"targets on {targets.device} but head_logits on {head_logits.device}")


def probability_chain(head_logits: Tensor, targets: Tensor, chain: str,
                      backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """ESMM / ESM2 probability chain in log space: chain logits and per-row BCE losses.

    Args:
        head_logits: [B, H] logits of the model heads (H = 2 for "esmm", 4 for "esm2"; see module doc).
        targets: [B, K] 0/1 labels of the supervised chain outputs (no gradient).
        chain: "esmm" (Ma et al., SIGIR 2018) or "esm2" (Wen et al., SIGIR 2020).
        backend: "auto" (registered op: CPU torch, CUDA Triton), "torch" (reference), "triton".

    Returns:
        chain_logits [B, C]: log p - log(1 - p); esmm (ctr, cvr, ctcvr), esm2 (ctr, ctavr, ctcvr, cvr).
        losses [B, K]: BCE of each supervised output; esmm (ctr, ctcvr), esm2 (ctr, ctavr, ctcvr).
        Both in head_logits' dtype (math in float32, or float64 for float64 inputs).

    Example:
        >>> z, loss = probability_chain(torch.zeros(5, 2), torch.ones(5, 2), "esmm")
        >>> z.shape, loss.shape
        (torch.Size([5, 3]), torch.Size([5, 2]))
    """
    _validate(head_logits, targets, chain, backend)
    if backend == "torch":
        return probability_chain_reference(head_logits, targets, chain)
    if backend == "triton":
        return _TritonChain.apply(head_logits, targets, chain)
    return _op(head_logits, targets, chain)
