"""Fused softmax gate mix of MMoE-family models (Ma et al., KDD 2018, "Multi-gate Mixture-of-Experts").

``out[b, t, :] = sum_e softmax(gate_logits[b, t, :])[e] * experts[b, e, :]``, with shape letters
B batch, T gates (one per task; 1 for OMoE), E experts, D expert output dim.

The triad (STYLE.md section 7): :func:`gate_mix_reference` is the spec; the Triton kernels fuse the
softmax into the weighted sum (forward) and the softmax backward into both gradients (backward), one
program per row b, reading every input once and never materialising the ``[B, T, E, D]`` product;
``lightning_mtr::gate_mix`` is the registered op (CUDA: Triton, CPU: softmax + bmm, which is what
the CPU does best); :func:`gate_mix` picks a backend. The op has no parameters, so switching
backend never changes parameter names or checkpoints.

Saved for backward: the experts and the ``[B, T, E]`` softmax weights, which the forward writes
as a second (non-differentiable) output. That is T*E values per row next to the E*D expert values
read, the same memory eager autograd keeps, and it lets the CPU backward be exactly eager's ops
(recomputing the softmax there measured ~6% of a CPU fwd+bwd step); the Triton backward reads the
weights where it would otherwise read the logits, so the kernel's traffic is unchanged.
"""

from __future__ import annotations

import torch

from lightning_mtr.kernels.triton_support import TRITON_DTYPES, Backend, check_backend, tl, triton


def gate_mix_reference(experts: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """The spec: softmax over experts, then the weighted sum of expert outputs.

    Args:
        experts: ``[B, E, D]`` outputs of E experts for each of B rows.
        gate_logits: ``[B, T, E]`` one row of E logits per gate (T gates, one per task).

    Returns:
        ``[B, T, D]``: ``out[b, t] = sum_e softmax(gate_logits[b, t])[e] * experts[b, e]``.
    """
    weights = torch.softmax(gate_logits, dim=-1)  # [B, T, E]
    return torch.einsum("bte,bed->btd", weights, experts)


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per row b holds the [T, E] weights in registers (fp32) and walks D
# in BLOCK_D chunks, so each element of experts / grad_out is read once.
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _softmax_rows(g_ptr, stride_gt, stride_ge, T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        """fp32 softmax of one row's [T, E] logits as a [BLOCK_T, BLOCK_E] tile, zero outside [T, E]."""
        offs_t = tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E)
        mask_t = offs_t < T
        mask_e = offs_e < E
        mask = mask_t[:, None] & mask_e[None, :]
        g = tl.load(g_ptr + offs_t[:, None] * stride_gt + offs_e[None, :] * stride_ge, mask=mask, other=0.0)
        # padded experts get -inf (weight 0); padded gates keep finite zeros so their rows never hold NaN
        g = tl.where(mask_e[None, :], g.to(tl.float32), float("-inf"))
        g = g - tl.max(g, axis=1)[:, None]
        num = tl.exp(g)
        w = num / tl.sum(num, axis=1)[:, None]
        return tl.where(mask, w, 0.0)

    @triton.jit
    def _gate_mix_fwd_kernel(
        x_ptr, g_ptr, out_ptr, w_ptr,
        T, E, D,
        stride_xb, stride_xe, stride_xd,
        stride_gb, stride_gt, stride_ge,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        # int64: experts from ExpertBank are a transposed view, stride_xe = B*D, so e*stride_xe passes 2**31
        offs_e = tl.arange(0, BLOCK_E).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        w = _softmax_rows(g_ptr + b * stride_gb, stride_gt, stride_ge, T, E, BLOCK_T, BLOCK_E)
        tl.store(w_ptr + b * T * E + offs_t[:, None] * E + offs_e[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=(offs_t[:, None] < T) & (offs_e[None, :] < E))
        x_row = x_ptr + b * stride_xb
        out_row = out_ptr + b * T * D  # out is contiguous [B, T, D]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask_d = d < D
            x = tl.load(x_row + offs_e[:, None] * stride_xe + d[None, :] * stride_xd,
                        mask=(offs_e[:, None] < E) & mask_d[None, :], other=0.0).to(tl.float32)
            out = tl.sum(w[:, :, None] * x[None, :, :], axis=1)  # [BLOCK_T, BLOCK_D]
            tl.store(out_row + offs_t[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=(offs_t[:, None] < T) & mask_d[None, :])

    @triton.jit
    def _gate_mix_bwd_kernel(
        dout_ptr, x_ptr, w_ptr, dx_ptr, dg_ptr,
        T, E, D,
        stride_ob, stride_ot, stride_od,
        stride_xb, stride_xe, stride_xd,
        stride_wb, stride_wt, stride_we,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E).to(tl.int64)  # see the forward kernel
        offs_d = tl.arange(0, BLOCK_D)
        mask_t = offs_t < T
        mask_e = offs_e < E
        w = tl.load(w_ptr + b * stride_wb + offs_t[:, None] * stride_wt + offs_e[None, :] * stride_we,
                    mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # dw[t, e] = dout[t, :] . x[e, :]
        x_row = x_ptr + b * stride_xb
        dout_row = dout_ptr + b * stride_ob
        dx_row = dx_ptr + b * E * D  # dx is contiguous [B, E, D]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask_d = d < D
            x = tl.load(x_row + offs_e[:, None] * stride_xe + d[None, :] * stride_xd,
                        mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            dout = tl.load(dout_row + offs_t[:, None] * stride_ot + d[None, :] * stride_od,
                           mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            dw += tl.sum(dout[:, None, :] * x[None, :, :], axis=2)
            dx = tl.sum(w[:, :, None] * dout[:, None, :], axis=0)  # [BLOCK_E, BLOCK_D]
            tl.store(dx_row + offs_e[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask_e[:, None] & mask_d[None, :])
        dg = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # softmax backward
        tl.store(dg_ptr + b * T * E + offs_t[:, None] * E + offs_e[None, :], dg.to(dg_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_e[None, :])


def _blocks(T: int, E: int, D: int) -> tuple[int, int, int]:
    block_t, block_e = triton.next_power_of_2(T), triton.next_power_of_2(E)
    # the [BLOCK_T, BLOCK_E, BLOCK_D] products live in registers: keep them to ~4K fp32 per program
    block_d = max(8, min(triton.next_power_of_2(D), 4096 // (block_t * block_e)))
    return block_t, block_e, block_d


def _triton_forward(experts: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (B, E, D), T = experts.shape, gate_logits.shape[1]
    out, weights = experts.new_empty((B, T, D)), gate_logits.new_empty((B, T, E))
    if out.numel() == 0:
        return out, torch.softmax(gate_logits, dim=-1).contiguous()
    _gate_mix_fwd_kernel[(B,)](
        experts, gate_logits, out, weights, T, E, D, *experts.stride(), *gate_logits.stride(), *_blocks(T, E, D))
    return out, weights


def _triton_backward(grad_out: torch.Tensor, experts: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (B, E, D), T = experts.shape, weights.shape[1]
    grad_experts, grad_logits = experts.new_empty((B, E, D)), weights.new_empty((B, T, E))
    if grad_experts.numel() == 0 or grad_logits.numel() == 0:
        return grad_experts.zero_(), grad_logits.zero_()
    _gate_mix_bwd_kernel[(B,)](
        grad_out, experts, weights, grad_experts, grad_logits, T, E, D,
        *grad_out.stride(), *experts.stride(), *weights.stride(), *_blocks(T, E, D))
    return grad_experts, grad_logits


class _GateMixTriton(torch.autograd.Function):
    """The Triton kernels without the dispatcher: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    @staticmethod
    def forward(ctx, experts: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        out, weights = _triton_forward(experts, gate_logits)
        ctx.save_for_backward(experts, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_backward(grad_out, *ctx.saved_tensors)


# ----------------------------------------------------------------------------------------------
# The registered ops: lightning_mtr::gate_mix and its backward, both visible to torch.compile.
# ----------------------------------------------------------------------------------------------
def _composed_forward(experts: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.softmax(gate_logits, dim=-1).contiguous()  # [B, T, E]; softmax keeps a permuted layout
    return torch.bmm(weights, experts), weights  # one batched GEMM: what eager does best on CPU


def _composed_backward(grad_out: torch.Tensor, experts: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_experts = torch.bmm(weights.transpose(1, 2), grad_out)
    grad_weights = torch.bmm(grad_out, experts.transpose(1, 2))  # [B, T, E]
    # w * (dw - sum_e w * dw) as one fused aten kernel: ~6x faster than four elementwise ops on CPU
    return grad_experts, torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)


@torch.library.custom_op("lightning_mtr::gate_mix", mutates_args=())
def _gate_mix_op(experts: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``experts [B, E, D], gate_logits [B, T, E] -> (out [B, T, D], softmax weights [B, T, E])``."""
    return _composed_forward(experts, gate_logits)  # every device but CUDA


@_gate_mix_op.register_fake
def _(experts: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return experts.new_empty((experts.shape[0], gate_logits.shape[1], experts.shape[2])), \
        gate_logits.new_empty(gate_logits.shape)


@torch.library.custom_op("lightning_mtr::gate_mix_backward", mutates_args=())
def _gate_mix_backward_op(grad_out: torch.Tensor, experts: torch.Tensor,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out [B, T, D], experts [B, E, D], weights [B, T, E] -> (grad_experts, grad_logits)``."""
    return _composed_backward(grad_out, experts, weights)  # every device but CUDA


@_gate_mix_backward_op.register_fake
def _(grad_out: torch.Tensor, experts: torch.Tensor,
      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return experts.new_empty(experts.shape), weights.new_empty(weights.shape)


if triton is not None:

    @_gate_mix_op.register_kernel("cuda")
    def _(experts: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if experts.dtype not in TRITON_DTYPES:
            return _composed_forward(experts, gate_logits)  # fp64: the kernels accumulate in fp32
        return _triton_forward(experts, gate_logits)

    @_gate_mix_backward_op.register_kernel("cuda")
    def _(grad_out: torch.Tensor, experts: torch.Tensor,
          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if experts.dtype not in TRITON_DTYPES:
            return _composed_backward(grad_out, experts, weights)
        return _triton_backward(grad_out, experts, weights)


def _setup_context(ctx, inputs: tuple[torch.Tensor, torch.Tensor],
                   output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(inputs[0], output[1])  # experts and the [B, T, E] weights
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out: torch.Tensor, _grad_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # _grad_weights is None or zeros: the weights output is non-differentiable and never leaves gate_mix
    experts, weights = ctx.saved_tensors
    return torch.ops.lightning_mtr.gate_mix_backward(grad_out, experts, weights)


_gate_mix_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(experts: torch.Tensor, gate_logits: torch.Tensor) -> None:
    if not isinstance(experts, torch.Tensor) or not isinstance(gate_logits, torch.Tensor):
        raise ValueError("gate_mix expects tensors: experts [B, E, D] and gate_logits [B, T, E]")
    if experts.dim() != 3 or gate_logits.dim() != 3:
        raise ValueError(f"gate_mix expects experts [B, E, D] and gate_logits [B, T, E], got "
                         f"{tuple(experts.shape)} and {tuple(gate_logits.shape)}")
    if experts.shape[0] != gate_logits.shape[0] or experts.shape[1] != gate_logits.shape[2]:
        raise ValueError(f"experts [B, E, D] = {tuple(experts.shape)} and gate_logits [B, T, E] = "
                         f"{tuple(gate_logits.shape)} must agree on B and E")
    if experts.shape[1] == 0:
        raise ValueError("gate_mix needs at least one expert (E >= 1)")
    if not experts.is_floating_point() or experts.dtype != gate_logits.dtype:
        raise ValueError(f"experts and gate_logits must share one floating dtype, got {experts.dtype} "
                         f"and {gate_logits.dtype}")
    if experts.device != gate_logits.device:
        raise ValueError(f"experts and gate_logits must be on one device, got {experts.device} "
                         f"and {gate_logits.device}")


def gate_mix(experts: torch.Tensor, gate_logits: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Mix E expert outputs with T softmax gates: ``out[b, t] = sum_e softmax(gate_logits[b, t])[e] * experts[b, e]``.

    Args:
        experts: ``[B, E, D]`` outputs of E experts for each of B rows.
        gate_logits: ``[B, T, E]`` gate logits, one row per gate (T tasks in MMoE, T = 1 in OMoE);
            same dtype and device as ``experts``.
        backend: ``"auto"`` the registered op ``lightning_mtr::gate_mix`` (CUDA: Triton kernels,
            CPU: softmax + bmm); ``"torch"`` the reference composition; ``"triton"`` the Triton
            kernels directly (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before
            triton was imported).

    Returns:
        ``[B, T, D]`` in the input dtype (the Triton kernels accumulate in fp32).

    Example::

        >>> out = gate_mix(torch.randn(4, 3, 8), torch.randn(4, 2, 3))  # B=4, E=3, D=8, T=2
        >>> out.shape
        torch.Size([4, 2, 8])
    """
    check_backend("gate_mix", backend, experts)
    _check_inputs(experts, gate_logits)
    if backend == "torch":
        return gate_mix_reference(experts, gate_logits)
    if backend == "triton":
        return _GateMixTriton.apply(experts, gate_logits)
    return torch.ops.lightning_mtr.gate_mix(experts, gate_logits)[0]
