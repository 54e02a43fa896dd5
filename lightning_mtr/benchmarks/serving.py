"""Serving latency: one user x many candidates on CPU, the monolithic program against the
user/item split (``lightning_mtr.serving.split``), fp32 and int8 tables, printed as a markdown table.

    python tools/bench_serving.py [--models dupn mmoe] [--candidates 10000] [--requests 200]
                                  [--monolithic-requests N] [--threads 1 2] [--quantize none int8]
                                  [--max-rows N] [--json FILE]

Models: DUPN (conf/models/dupn.yaml on its schema) and the default MMoE (conf/debug.yaml on
conf/schemas/synthetic_impressions.yaml), random weights. The monolithic program gets the user's
features repeated on every candidate's row, as a serving system without the split sends them; the
split runs the user program once, then the item program on the candidates. Latency is per request
(building the inputs is not timed), p50/p99 over ``--requests`` (the monolithic program over
``--monolithic-requests``, default the same: DUPN's takes seconds per request). FLOPs are counted by
``torch.utils.flop_counter``; the GEMM bound of a path is the time its matrix products take as plain
fp32 ``mm``/``bmm`` calls of the same shapes on this machine, so ``p50 / bound`` says how close the
path is to the matrix-multiply limit. ``--max-rows`` caps the tables (for a quick check).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_mtr.data.encode import DenseStats
from lightning_mtr.schema import Schema
from lightning_mtr.serving.program import ServingModel, export_program
from lightning_mtr.serving.split import ITEM, USER, broadcast_user, export_split, split_model

REPO = Path(__file__).resolve().parents[2]
SETUPS = {"dupn": ("conf/models/dupn.yaml", "conf/schemas/dupn_synthetic.yaml"),
          "mmoe": ("conf/debug.yaml", "conf/schemas/synthetic_impressions.yaml")}
_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default}


def build(name: str, max_rows: int | None) -> tuple[torch.nn.Module, Schema, DenseStats]:
    """The model of ``SETUPS[name]`` with random weights, its schema (tables capped at ``max_rows``)
    and made-up dense statistics (mean 0, std 1)."""
    config_path, schema_path = SETUPS[name]
    schema = Schema.from_yaml(REPO / schema_path)
    if max_rows:
        schema = dataclasses.replace(schema, sparse=tuple(
            dataclasses.replace(f, num_embeddings=min(f.num_embeddings, max_rows)) for f in schema.sparse))
    config = yaml.safe_load((REPO / config_path).read_text())["model"]["model"]
    module, _, cls = config["class_path"].rpartition(".")
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), cls)(schema, **config.get("init_args", {})).eval()
    return model, schema, DenseStats((0.0,) * len(schema.dense), (1.0,) * len(schema.dense))


def request(schema: Schema, candidates: int) -> tuple[tuple, tuple]:
    """One user's inputs (full behaviour sequences) and ``candidates`` candidates' inputs, random ids."""
    def side(name: str, batch: int) -> tuple:
        features = [f for f in schema.sparse if f.side == name]
        lengths = torch.tensor([[f.max_length or 1] * batch for f in features], dtype=torch.int64).view(-1, batch)
        values = torch.cat([torch.zeros(0, dtype=torch.int64)] + [
            torch.randint(0, f.num_embeddings, (int(n.sum()),)) for f, n in zip(features, lengths)])
        dense = torch.rand(batch, sum(f.side == name for f in schema.dense), dtype=torch.float64) * 10
        return dense, values, lengths
    torch.manual_seed(1)
    return side(USER, 1), side(ITEM, candidates)


class _GemmShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            operands = args[1:3] if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[:2]
            self.calls.append(tuple(tuple(t.shape) for t in operands))
        return func(*args, **(kwargs or {}))


def gemm_bound_ms(run) -> tuple[float, float]:
    """``(ms, GFLOP)`` of ``run``'s matrix products replayed as plain fp32 mm/bmm (median of 5)."""
    with torch.no_grad(), _GemmShapes() as shapes:
        run()
    total, flops = 0.0, 0.0
    for a_shape, b_shape in shapes.calls:
        a, b = torch.randn(a_shape), torch.randn(b_shape)
        product = torch.bmm if a.dim() == 3 else torch.mm
        product(a, b)
        total += statistics.median(_time(lambda: product(a, b)) for _ in range(5))
        flops += 2 * a.numel() * b_shape[-1]
    return total, flops / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def gflops(run) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    model, schema, stats = build(name, args.max_rows)
    user_in, item_in = request(schema, args.candidates)
    full = broadcast_user(schema, user_in, item_in)
    rows = []
    for quantize in args.quantize:
        monolithic = export_program(ServingModel(model, schema, stats, quantize)).module()
        user, item = (p.module() for p in export_split(*split_model(model, schema, stats, quantize)))
        paths = {"monolithic": lambda: monolithic(*full), "split": lambda: item(user(*user_in), *item_in)}
        with torch.no_grad():
            difference = max(float((a - b).abs().max()) for a, b in zip(paths["split"]().values(),
                                                                       paths["monolithic"]().values()))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for path, run in paths.items():
                with torch.no_grad():
                    for _ in range(3):
                        run()
                    count = args.requests if path == "split" else args.monolithic_requests or args.requests
                    times = sorted(_time(run) for _ in range(count))
                bound, matmul_gflop = gemm_bound_ms(run)
                rows.append({"model": name, "path": path, "tables": "fp32" if quantize == "none" else quantize,
                             "threads": threads, "candidates": args.candidates, "requests": count,
                             "p50_ms": times[len(times) // 2],
                             "p99_ms": times[min(len(times) - 1, int(len(times) * .99))],
                             "gflop": gflops(run), "matmul_gflop": matmul_gflop, "gemm_bound_ms": bound,
                             "max_abs_diff": difference})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one line per (model, tables, threads, path), with the split's speed-up."""
    p50 = {(r["model"], r["tables"], r["threads"], r["path"]): r["p50_ms"] for r in rows}
    lines = ["| model | tables | threads | path | requests | p50 ms | p99 ms | GFLOP/request | GEMM bound ms (GFLOP/s) "
             "| p50 / bound | split speed-up (p50) |", "|" + " --- |" * 11]
    for r in rows:
        key = (r["model"], r["tables"], r["threads"])
        speedup = p50.get(key + ("monolithic",), float("nan")) / r["p50_ms"] if r["path"] == "split" else None
        rate = r["matmul_gflop"] / (r["gemm_bound_ms"] / 1e3) if r["gemm_bound_ms"] else float("nan")
        lines.append(f"| {r['model']} | {r['tables']} | {r['threads']} | {r['path']} | {r['requests']} "
                     f"| {r['p50_ms']:.1f} "
                     f"| {r['p99_ms']:.1f} | {r['gflop']:.2f} | {r['gemm_bound_ms']:.1f} ({rate:.0f}) "
                     f"| {r['p50_ms'] / r['gemm_bound_ms']:.2f} | {'' if speedup is None else f'{speedup:.1f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--monolithic-requests", type=int, help="requests timed on the monolithic program")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=["none", "int8", "int4"])
    parser.add_argument("--max-rows", type=int, help="cap every table at this many rows")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in bench_model(name, args)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows
