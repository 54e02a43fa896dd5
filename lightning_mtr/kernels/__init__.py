"""Fused ops: each a triad of PyTorch reference, Triton kernel and one registered torch.library op."""

from lightning_mtr.kernels.triton_support import BACKENDS, Backend

__all__ = ["BACKENDS", "Backend"]
