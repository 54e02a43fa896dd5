"""What every fused op shares: the optional Triton import and the backend switch.

Without triton the package still imports and every op runs its PyTorch paths. Triton's
kernels take CUDA tensors, or CPU tensors under its interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the tier-2 tests run the kernels themselves on CPU.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

# a Literal, so a config naming another backend fails when it is parsed
Backend = Literal["auto", "torch", "triton"]
BACKENDS = get_args(Backend)
# The kernels accumulate in fp32; fp64 stays on the PyTorch paths.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when ``triton.jit`` builds interpreter functions, which run on CPU tensors."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_backend(op: str, backend: str, tensor: torch.Tensor) -> None:
    """Reject an unknown backend, and ``triton`` where its kernels cannot run ``tensor``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; choose one of {BACKENDS}")
    if backend != "triton":
        return
    if triton is None:
        raise RuntimeError(f"{op} backend='triton' needs the triton package; use backend='auto' or 'torch'")
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(f"{op} backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 "
                         f"set before triton is imported), got {tensor.device}")
    if tensor.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op} backend='triton' supports {TRITON_DTYPES}, got {tensor.dtype}")
