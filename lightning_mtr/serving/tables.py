"""Embedding rows for serving: fp32, or row-wise int8 / int4 with an fp16 scale and bias per row.

A quantised row stores codes ``q`` and ``x ~= q * scale + bias`` with ``bias`` the row's minimum
and ``scale = (max - min) / (2^bits - 1)``: a 16-d row takes 16 + 4 = 20 bytes in int8 and
8 + 4 = 12 in int4, instead of 64. Lookup is a gather and a few elementwise ops, which every
PyTorch runtime (``torch.export``, AOTInductor) runs without custom operators.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Quantize = Literal["none", "int8", "int4"]
QUANTIZE = ("none", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}


class RowStore(nn.Module):
    """``lookup(ids [N]) -> [N, D]`` float32 rows of one weight matrix, stored as ``quantize`` says."""

    def __init__(self, weight: torch.Tensor, quantize: Quantize = "none"):
        super().__init__()
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
        self.quantize = quantize
        self.dim = weight.shape[1]
        weight = weight.detach().float()
        if quantize == "none":
            self.register_buffer("weight", weight.clone())
            return
        codes, scale_bias = quantize_rows(weight, _BITS[quantize])
        self.register_buffer("codes", pack_int4(codes) if quantize == "int4" else codes)
        self.register_buffer("scale_bias", scale_bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantize == "none":
            return self.weight[ids]
        codes = self.codes[ids]
        if self.quantize == "int4":
            codes = unpack_int4(codes, self.dim)
        scale_bias = self.scale_bias[ids].float()
        return codes.float() * scale_bias[:, :1] + scale_bias[:, 1:]

    @property
    def nbytes(self) -> int:
        """Bytes the rows take in the artifact."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [R, D], scale_bias fp16 [R, 2])``; codes are rounded against the fp16 scale
    and bias actually stored, so rounding them costs no second error."""
    low, high = weight.min(dim=1).values, weight.max(dim=1).values
    scale = ((high - low) / (2**bits - 1)).half()
    bias = low.half()
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(low))  # a constant row: codes 0
    codes = torch.round((weight - bias.float()[:, None]) / safe[:, None]).clamp_(0, 2**bits - 1)
    return codes.to(torch.uint8), torch.stack([scale, bias], dim=1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, low nibble first: ``[R, D] -> [R, ceil(D / 2)]``."""
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: ``[N, ceil(D / 2)] -> [N, D]``."""
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)[:, :dim]
