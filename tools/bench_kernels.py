"""Time the fused ops against their eager PyTorch compositions and print one table.

    .venv/bin/python tools/bench_kernels.py [--quick] [--ops gate_mix] [--devices cpu cuda] [--json out.json]

Each op registers one bench function in ``BENCHES`` (one section per op below); a bench function
returns rows ``{op, device, shape, impl, pass, ms, peak_mb, saved_mb}``. Times are medians after
warmup (CUDA: ``triton.testing.do_bench`` or CUDA events). ``peak_mb`` is the peak allocated above
what the inputs already hold: the CUDA allocator's counter, or on CPU (which has none) the
profiler's allocation and free events replayed in order. ``saved_mb`` is what autograd keeps for
backward beyond the inputs themselves, measured with saved-tensor hooks on every device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch

BENCHES: dict[str, Callable[[argparse.Namespace, torch.device], list[dict]]] = {}


def register(name: str):
    def add(fn):
        BENCHES[name] = fn
        return fn
    return add


# ---------------------------------------------------------------------------------------------
# Shared measurement helpers
# ---------------------------------------------------------------------------------------------
def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2,
              grad_to_none: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Median milliseconds of each fn. Off CUDA the fns take turns, so load from other processes
    (a shared CPU drifts a lot) falls on all of them alike instead of on whichever ran last."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return {name: do_bench(fn, grad_to_none=grad_to_none, return_mode="median") for name, fn in fns.items()}
        except ImportError:
            pass
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            for t in grad_to_none or ():
                t.grad = None
            elapsed = _once_ms(fn, device)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_mb(fn: Callable[[], object], device: torch.device,
            grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Peak MB allocated by ``fn`` above what existed before it."""
    for t in grad_to_none or ():
        t.grad = None
    if device.type != "cuda":
        return _cpu_peak_mb(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _cpu_peak_mb(fn: Callable[[], object]) -> float:
    """CPU has no allocator counter: replay the profiler's allocation and free events in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def saved_mb(fn: Callable[[], object], inputs: tuple[torch.Tensor, ...]) -> float:
    """MB autograd keeps for backward beyond the storages of ``inputs`` (which are alive anyway)."""
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values()) / 2**20


# ---------------------------------------------------------------------------------------------
# gate_mix: out[B, T, D] = softmax(gate_logits[B, T, E]) @ experts[B, E, D]
# ---------------------------------------------------------------------------------------------
from lightning_mtr.kernels.gate_mix import gate_mix, gate_mix_reference  # noqa: E402

GATE_MIX_GRID = {"B": (4096, 16384, 65536), "E": (8, 16), "T": (2, 4), "D": (64, 256)}
GATE_MIX_QUICK = {"B": (4096, 16384), "E": (8, 16), "T": (4,), "D": (64, 256)}


def _broadcast_mix(experts: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    # the composition many MMoE implementations write: materialises [B, T, E, D]
    return (torch.softmax(gate_logits, dim=-1).unsqueeze(-1) * experts.unsqueeze(1)).sum(dim=2)


@register("gate_mix")
def bench_gate_mix(args: argparse.Namespace, device: torch.device) -> list[dict]:
    impls = {"eager einsum (reference)": gate_mix_reference, "op (auto)": gate_mix}
    if args.broadcast:
        impls["eager broadcast-sum"] = _broadcast_mix
    grid = GATE_MIX_QUICK if args.quick else GATE_MIX_GRID
    rows = []
    for B, E, T, D in itertools.product(grid["B"], grid["E"], grid["T"], grid["D"]):
        generator = torch.Generator(device=device).manual_seed(0)
        experts = torch.randn(B, E, D, device=device, generator=generator, requires_grad=True)
        gate_logits = torch.randn(B, T, E, device=device, generator=generator, requires_grad=True)
        grad_out = torch.randn(B, T, D, device=device, generator=generator)

        def forward(mix):
            with torch.no_grad():
                return mix(experts, gate_logits)

        def forward_backward(mix):
            mix(experts, gate_logits).backward(grad_out)

        for pass_name, run in (("fwd", forward), ("fwd+bwd", forward_backward)):
            fns = {name: (lambda mix=mix, run=run: run(mix)) for name, mix in impls.items()}
            ms = median_ms(fns, device, args.reps, grad_to_none=[experts, gate_logits])
            for name, mix in impls.items():
                rows.append({
                    "op": "gate_mix", "device": device.type, "shape": f"B={B} T={T} E={E} D={D}", "impl": name,
                    "pass": pass_name, "ms": ms[name], "peak_mb": peak_mb(fns[name], device, [experts, gate_logits]),
                    "saved_mb": saved_mb(lambda: mix(experts, gate_logits), (experts, gate_logits))
                    if pass_name == "fwd+bwd" else 0.0,
                })
                print(_format(rows[-1]), flush=True)
        experts.grad = gate_logits.grad = None
    return rows


# ---------------------------------------------------------------------------------------------
# prob_chain: ESMM / ESM2 chain logits [B, C] and per-row BCE [B, K] from head logits [B, H]
# ---------------------------------------------------------------------------------------------
from lightning_mtr.kernels.prob_chain import CHAINS, probability_chain, probability_chain_reference  # noqa: E402

PROB_CHAIN_B = (4096, 16384, 65536)
PROB_CHAIN_QUICK_B = (4096, 16384)


@register("prob_chain")
def bench_prob_chain(args: argparse.Namespace, device: torch.device) -> list[dict]:
    impls = {"eager (reference)": probability_chain_reference, "op (auto)": probability_chain}
    rows = []
    for chain, B in itertools.product(CHAINS, PROB_CHAIN_QUICK_B if args.quick else PROB_CHAIN_B):
        H, C, K = CHAINS[chain]
        generator = torch.Generator(device=device).manual_seed(0)
        head_logits = (4 * torch.randn(B, H, device=device, generator=generator)).requires_grad_()
        targets = torch.randint(0, 2, (B, K), device=device, generator=generator).float()
        grads = (torch.randn(B, C, device=device, generator=generator),
                 torch.randn(B, K, device=device, generator=generator))

        def forward(chain_fn):
            with torch.no_grad():
                return chain_fn(head_logits, targets, chain)

        def forward_backward(chain_fn):
            torch.autograd.backward(chain_fn(head_logits, targets, chain), grads)

        for pass_name, run in (("fwd", forward), ("fwd+bwd", forward_backward)):
            fns = {name: (lambda chain_fn=chain_fn, run=run: run(chain_fn)) for name, chain_fn in impls.items()}
            ms = median_ms(fns, device, args.reps, grad_to_none=[head_logits])
            for name, chain_fn in impls.items():
                rows.append({
                    "op": "prob_chain", "device": device.type, "shape": f"{chain} B={B}", "impl": name,
                    "pass": pass_name, "ms": ms[name], "peak_mb": peak_mb(fns[name], device, [head_logits]),
                    "saved_mb": saved_mb(lambda chain_fn=chain_fn: chain_fn(head_logits, targets, chain),
                                         (head_logits, targets)) if pass_name == "fwd+bwd" else 0.0,
                })
                print(_format(rows[-1]), flush=True)
        head_logits.grad = None
    return rows


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
HEADER = f"{'op':<10} {'device':<6} {'shape':<28} {'impl':<26} {'pass':<8} {'ms':>9} {'peak MB':>9} {'saved MB':>9}"


def _format(row: dict) -> str:
    peak = f"{row['peak_mb']:.1f}"
    return (f"{row['op']:<10} {row['device']:<6} {row['shape']:<28} {row['impl']:<26} {row['pass']:<8} "
            f"{row['ms']:>9.3f} {peak:>9} {row['saved_mb']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"),
                        default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--quick", action="store_true", help="a small subset of shapes")
    parser.add_argument("--broadcast", action="store_true",
                        help="gate_mix: also time the composition that materialises [B, T, E, D] (slow, memory-hungry)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per row on CPU (CUDA: do_bench decides)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in args.devices else ""))
    print("fwd runs under no_grad; saved MB = tensors kept for backward beyond the inputs; "
          "peak MB is CUDA only (no allocator counter for CPU tensors)")
    print(HEADER, flush=True)
    rows = []
    for op in args.ops:
        for device in args.devices:
            rows += BENCHES[op](args, torch.device(device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
