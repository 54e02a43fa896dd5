"""The matrix-multiply bound of a training step on this machine, so a samples/s figure can be read.

A step (forward and backward of batch B) runs once under :class:`GemmRecorder`, which records
every matrix product with its layout; each distinct product is then timed alone, in fp32 and in
bf16 (bf16 inputs, as autocast feeds them), on the benchmark's threads. The sum of those times is
what the step's products alone take at this machine's GEMM rate at these shapes, so
``B / that time`` is the samples/s no implementation of the same model can beat without doing
fewer or faster products. Everything else in a step (activations, losses, optimizers, input
pipeline) only moves a run further below it.

A shared machine's GEMM rate moves while a benchmark runs (a neighbour's load), so a benchmark
times the products in several rounds (after each of its epochs) and keeps each product's fastest
round: one slow round cannot lower the bound.

    gemms, _, _ = record_gemms(step)        # step: a no-argument callable running one step
    rounds = [gemm_times(gemms) for _ in range(3)]
    bound = gemm_bound(gemms, batch_size=4096, precision="32-true", rounds=rounds)
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_mtr.training.precision import cpuinfo_fields

aten = torch.ops.aten
# (op, index of the left operand): the right operand follows it; addmm's first argument is the bias
PRODUCTS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1,
            aten._addmm_activation.default: 1}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Gemm:
    """One matrix product as it ran: the op, each tensor argument's (shape, strides) and the
    other arguments, enough to run it again with the same layout (a transposed operand is a
    different kernel)."""

    op: torch._ops.OpOverload
    tensors: tuple[tuple[tuple[int, ...], tuple[int, ...]] | None, ...]  # None: not a tensor
    scalars: tuple
    kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def flops(self) -> int:
        """2 * m * n * k, times the batch count of a batched product."""
        left = PRODUCTS[self.op]
        a, b = self.tensors[left][0], self.tensors[left + 1][0]
        return 2 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]

    def run_args(self, dtype: torch.dtype) -> list:
        """Random operands of this layout in ``dtype`` (a broadcast operand, stride 0, stays one)."""
        tensors = iter(torch.empty(1 + sum((size - 1) * step for size, step in zip(shape, stride)), dtype=dtype)
                       .uniform_(-1, 1).as_strided(shape, stride) for shape, stride in filter(None, self.tensors))
        scalars = iter(self.scalars)
        return [next(tensors) if spec else next(scalars) for spec in self.tensors]

    def run(self, args: list) -> torch.Tensor:
        return self.op(*args, **dict(self.kwargs))


class GemmRecorder(TorchDispatchMode):
    """Records every matrix product (:data:`PRODUCTS`) dispatched inside it, forward and
    backward, and the names of custom ops (the project's kernels), whose products it cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[Gemm] = []
        self.custom_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            self.gemms.append(Gemm(func, tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else None
                                               for a in args),
                                   tuple(a for a in args if not isinstance(a, torch.Tensor)),
                                   tuple(sorted(kwargs.items()))))
        elif func.namespace not in ("aten", "prims", "fbgemm"):  # fbgemm's: table lookups and updates
            self.custom_ops[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)


def record_gemms(step: Callable[[], object]) -> tuple[list[Gemm], int, list[str]]:
    """``(products, FlopCounterMode's total, custom ops)`` of one call of ``step``. The FLOP
    counter's total is an independent count: it equals the products' when nothing was missed."""
    with FlopCounterMode(display=False) as counter, GemmRecorder() as recorder:
        step()
    return recorder.gemms, counter.get_total_flops(), sorted(recorder.custom_ops)


def time_gemm(gemm: Gemm, dtype: torch.dtype, repeats: int = 7, warmup: int = 3) -> float:
    """Median seconds of one product of ``gemm``'s layout in ``dtype`` on torch's current threads."""
    args = gemm.run_args(dtype)
    for _ in range(warmup):
        gemm.run(args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gemm.run(args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_times(gemms: list[Gemm], repeats: int = 7) -> dict[str, dict[Gemm, float]]:
    """One round: ``{"fp32" | "bf16": {product: median seconds}}``, each distinct product timed once."""
    return {name: {g: time_gemm(g, dtype, repeats) for g in dict.fromkeys(gemms)} for name, dtype in DTYPES.items()}


def gemm_bound(gemms: list[Gemm], batch_size: int, precision: str,
               rounds: list[dict[str, dict[Gemm, float]]] | None = None) -> dict:
    """The step's products timed alone: achieved GFLOP/s in fp32 and bf16 over them, FLOPs per
    sample, and the samples/s bound for ``precision`` (``32-true`` or ``bf16-mixed``). ``rounds``:
    :func:`gemm_times` rounds, each product's fastest kept (default: one round now)."""
    if not gemms:
        raise ValueError("the step ran no matrix product: nothing to bound (did it run under the recorder?)")
    rounds = rounds or [gemm_times(gemms)]
    counts = Counter(gemms)
    flops = sum(g.flops * n for g, n in counts.items())
    seconds = {name: sum(min(times[name][g] for times in rounds) * n for g, n in counts.items()) for name in DTYPES}
    step_seconds = seconds["bf16" if precision.startswith("bf16") else "fp32"]
    return {"flops_per_sample": round(flops / batch_size), "gemm_shapes": len(counts), "gemm_rounds": len(rounds),
            "gemm_gflops_fp32": round(flops / seconds["fp32"] / 1e9, 1),
            "gemm_gflops_bf16": round(flops / seconds["bf16"] / 1e9, 1),
            "bound_samples_per_sec": round(batch_size / step_seconds, 1)}


def cpu_info(cpuinfo: Path | None = None) -> dict:
    """The CPU model and the flags that decide the GEMM rate, from ``/proc/cpuinfo`` (Linux)."""
    fields = cpuinfo_fields(cpuinfo)
    present = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", "unknown"),
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in present]}
