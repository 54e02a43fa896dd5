"""``lightning-mtr plan``: how a training config's embedding tables would shard over a GPU
cluster, worked out on any machine (no GPU) before the cluster is booked.

The configured model is built on the meta device, so a 1e9-row table costs no memory, and
TorchRec's planner runs for the requested topology. Printed: per table its sharding, kernel
and ranks; per rank its HBM and DDR bytes against the caps and the planner's step-time
estimate. Written to ``--out``: ``plan.json`` (training pins it with the strategy's
``plan:``), ``report.json`` and ``memory.png``. When the tables cannot fit, it says by how
much and what would, and exits 2 (as it does on bad input).

The configs are read by the training CLI's own parser, exactly as ``fit`` reads them: repeated
``--config`` merge, defaults fill what they leave out, and any ``fit`` override
(``--data.batch_size 8192``, ``--model.model.init_args.num_experts 16``) applies after them.

    lightning-mtr plan --config conf/plan/large_ads.yaml --world-size 64 --devices-per-node 8 \\
        --hbm-gb 80 --ddr-gb 512 [--batch-size 8192] [--device cuda] [--out runs/plan] [fit overrides]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from matplotlib.figure import Figure
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan

from lightning_mtr.embeddings.fusing import SparseOptimizer
from lightning_mtr.embeddings.sharding import prepare_for_sharding
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed.planning import (GIB, Cluster, PlanReport, TableConstraints, plan_model,
                                                         plan_to_json)
from lightning_mtr.training.module import ModelFactory

RESERVED = 0.15  # HBM that EmbeddingShardingPlanner's default storage reservation keeps for dense parts
UVM_CACHE = 0.2  # TorchRec's default cache_load_factor: share of a fused_uvm_caching table's rows in HBM
MIN_DIM = 8
# fp32 optimizer state of each fused optimizer: (floats per row, floats per weight element)
STATE = {"sgd": (0, 0), "rowwise_adagrad": (1, 0), "adagrad": (0, 1), "adam": (0, 2)}
SPLIT = ("row_wise", "table_row_wise", "column_wise")  # the sharding types that spread one table over GPUs


@dataclass
class _Job:
    """Everything the config and the flags say: what to plan, for which cluster."""

    model_name: str
    model: nn.Module
    cluster: Cluster
    batch_size: int
    optimizer: SparseOptimizer
    constraints: dict[str, TableConstraints]

    def tables(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """Every table the planner shards: its weight, and whether it is a sequence (unpooled) table."""
        tables = {}
        for module in self.model.modules():
            if isinstance(module, EmbeddingBagCollection):
                tables.update({name: (bag.weight, False) for name, bag in module.embedding_bags.items()})
            if isinstance(module, EmbeddingCollection):
                tables.update({name: (table.weight, True) for name, table in module.embeddings.items()})
        return tables

    def table_bytes(self, dims: dict[str, int] | None = None) -> dict[str, int]:
        """Weights plus fused-optimizer state per table (optionally at other dims)."""
        per_row, per_element = STATE[self.optimizer.name]
        sizes = {}
        for name, (weight, _) in self.tables().items():
            rows, dim = weight.shape
            dim = (dims or {}).get(name, dim)
            sizes[name] = rows * (dim * weight.element_size() + 4 * (per_row + per_element * dim))
        return sizes

    def memory(self) -> tuple[str, int, int]:
        """Where sharded tables live, and its bytes per rank: each GPU's HBM, or on CPU each
        process's share of DDR; then DDR per rank (for UVM tables)."""
        storage = self.cluster.topology().devices[0].storage
        return ("HBM", storage.hbm, storage.ddr) if self.cluster.device == "cuda" else ("DDR", storage.ddr, storage.ddr)

    def describe(self) -> str:
        c, (kind, cap, ddr) = self.cluster, self.memory()
        sizes = self.table_bytes()
        hbm = f"HBM {cap / GIB:g} GiB each, " if kind == "HBM" else ""
        return (f"planning {self.model_name}: {len(sizes)} tables, {sum(sizes.values()) / GIB:.1f} GiB with "
                f"{self.optimizer.name} state, {len(self.constraints)} constrained; for {c.world_size} x {c.device} "
                f"({c.local_world_size} per node; {hbm}DDR {ddr * c.local_world_size / GIB:g} GiB per node), "
                f"batch {self.batch_size} per rank")


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    try:
        job = _job(args, overrides)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        print(f"lightning-mtr plan: error: {err}", file=sys.stderr)
        return 2
    print(job.describe())
    try:
        plan, report = _plan(job, job.constraints)
    except PlannerError as err:
        print(_shortfall(job, err), file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan_to_json(plan), indent=1))
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    _chart(report, out / "memory.png")
    print("\n".join(report.table_lines()))
    print(_summary(report, job.memory()[0].lower()))
    print(f"wrote {out / 'plan.json'} (train it: trainer.strategy.init_args.plan), report.json, memory.png")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-mtr plan", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are `fit`'s overrides, applied after the configs.")
    parser.add_argument("--config", action="append", required=True,
                        help="training config; repeat to merge (later ones win, as in `fit`)")
    parser.add_argument("--world-size", type=int, required=True, help="GPUs in all")
    parser.add_argument("--devices-per-node", type=int, help="GPUs per host (default: min(8, world size))")
    parser.add_argument("--hbm-gb", type=float, help="GiB of table memory per GPU (default: the strategy's "
                        "hbm_gb in the config, else TorchRec's)")
    parser.add_argument("--ddr-gb", type=float, help="GiB of host memory per node, for UVM tables (default: the "
                        "strategy's ddr_gb, else TorchRec's)")
    parser.add_argument("--batch-size", type=int, help="rows per GPU a step (default: data.batch_size)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="runs/plan", help="folder for plan.json, report.json, memory.png")
    return parser


def _job(args: argparse.Namespace, overrides: list[str]) -> _Job:
    for path in args.config:
        if not Path(path).is_file():
            raise ValueError(f"config {path} not found")
    try:
        parsed = _fit_config([arg for path in args.config for arg in ("--config", path)] + overrides)
    except argparse.ArgumentError as err:  # jsonargparse's own, a subclass
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ValueError(f"{' + '.join(args.config)} {' '.join(overrides)}".strip()
                         + f", read as `lightning-mtr fit` reads them: {message}") from None
    config = parsed.as_dict()
    schema = Schema.from_yaml(_get(config, "data.schema"))
    optimizer = SparseOptimizer(**(_get(config, "model.sparse_optimizer") or {}))
    if optimizer.name not in STATE:
        raise ValueError(f"model.sparse_optimizer: unknown name {optimizer.name!r}; choose from {list(STATE)}")
    optimizer.check_device(torch.device(args.device))
    batch_size = args.batch_size or _get(config, "data.batch_size")
    # the strategy plans with its own hbm_gb/ddr_gb when training: the same caps by default
    strategy = _get(config, "trainer.strategy.init_args") or {}
    hbm = args.hbm_gb if args.hbm_gb is not None else strategy.get("hbm_gb")
    ddr = args.ddr_gb if args.ddr_gb is not None else strategy.get("ddr_gb")
    cluster = Cluster(args.world_size, args.devices_per_node or min(8, args.world_size), args.device, hbm, ddr)
    model = _model(parsed.model.model, schema)
    prepare_for_sharding(model, optimizer)
    return _Job(parsed.model.model.class_path, model, cluster, batch_size, optimizer, _constraints(config, schema))


class _Parsed(Exception):
    """Carries the parsed config out of the CLI before it seeds or builds anything."""


def _fit_config(args: list[str]) -> Namespace:
    """The config ``lightning-mtr fit`` would run with these arguments, parsed by its own parser
    (merging, defaults, overrides and type checks as in ``fit``), nothing instantiated."""
    from lightning_mtr.cli import MultiTaskCLI  # here: the CLI imports this module for `plan`

    class ParseOnly(MultiTaskCLI):
        def parse_arguments(self, parser, args) -> None:
            raise _Parsed(parser.parse_args(args))

    try:
        ParseOnly(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError("MultiTaskCLI did not parse its arguments")


def _get(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _model(spec: Namespace, schema: Schema) -> nn.Module:
    """The configured model on the meta device, built from its ``class_path`` as ``fit`` builds it."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=ModelFactory)
    factory = parser.instantiate(Namespace(model=spec)).model
    with torch.device("meta"):
        return factory(schema)


def _constraints(config: dict[str, Any], schema: Schema) -> dict[str, TableConstraints]:
    """``trainer.strategy.init_args.constraints``: read from the YAML, so planning needs no strategy."""
    raw = _get(config, "trainer.strategy.init_args.constraints") or {}
    tables = [t.name for t in schema.tables]
    unknown = sorted(set(raw) - set(tables))
    if unknown:
        raise ValueError(f"constraints name unknown tables {unknown}; the schema's tables: {tables}")
    constraints = {}
    for table, fields in raw.items():
        try:
            constraints[table] = TableConstraints(**{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in (fields or {}).items()})
        except (TypeError, ValueError) as err:
            raise ValueError(f"constraints for table {table!r}: {err}") from None
    return constraints


def _plan(job: _Job, constraints: dict[str, TableConstraints]) -> tuple[ShardingPlan, PlanReport]:
    # TorchRec warns once per replicated table ("Sharding spec not found") and about dry runs
    # on meta tensors; the report says what matters
    silenced = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logging.disable(max(silenced, logging.WARNING))
        try:
            return plan_model(job.model, job.cluster, job.batch_size, constraints)
        finally:
            logging.disable(silenced)


def _summary(report: PlanReport, memory: str) -> str:
    slowest = max(report.ranks, key=lambda r: r["perf_ms"])
    fullest = max(report.ranks, key=lambda r: r[f"{memory}_bytes"])
    used, cap = fullest[f"{memory}_bytes"], fullest[f"{memory}_cap_bytes"]
    mean = sum(r["perf_ms"] for r in report.ranks) / len(report.ranks)
    return (f"planner estimate: {slowest['perf_ms']:.3f} ms/step on the slowest rank ({slowest['rank']}; every "
            f"step waits for it), mean {mean:.3f} ms\n"
            f"fullest {memory.upper()}: rank {fullest['rank']}, {used / GIB:.2f} of {cap / GIB:.0f} GiB "
            f"({used / cap:.0%})")


def _chart(report: PlanReport, path: Path) -> None:
    """Per rank HBM and DDR bytes as bars, the caps as lines (Figure, no pyplot: no display)."""
    figure = Figure(figsize=(max(6.0, 0.16 * len(report.ranks)), 6), layout="constrained")
    ranks = [r["rank"] for r in report.ranks]
    for axes, memory in zip(figure.subplots(2, 1, sharex=True), ("hbm", "ddr")):
        used = [r[f"{memory}_bytes"] / GIB for r in report.ranks]
        cap = max(r[f"{memory}_cap_bytes"] for r in report.ranks) / GIB
        axes.bar(ranks, used, label="tables + optimizer state")
        axes.axhline(cap, color="red", linestyle="--", label="cap")
        axes.set_ylim(0, 1.3 * max(cap, *used) or 1)  # headroom above the cap for the legend
        axes.set_ylabel(f"{memory.upper()} GiB per rank")
        axes.legend(loc="upper right")
    axes.set_xlabel("rank")
    c = report.cluster
    figure.suptitle(f"{c.world_size} x {c.device}, {c.local_world_size} per node, batch {report.batch_size}")
    figure.savefig(path, dpi=100)


def _shortfall(job: _Job, error: PlannerError) -> str:
    """The planner's failure in plain words: the bytes against the caps, and what would fit."""
    c, (kind, cap, ddr) = job.cluster, job.memory()
    sizes = job.table_bytes()
    total, usable = sum(sizes.values()), cap * (1 - RESERVED)
    bytes_vs_caps = (f"{total / GIB:.1f} GiB of tables and {job.optimizer.name} state vs "
                     f"{c.world_size * cap / GIB:.1f} GiB of {kind} in all ({c.world_size} x {cap / GIB:g} GiB; "
                     f"{c.world_size * usable / GIB:.1f} GiB after the planner's {RESERVED:.0%} reservation for "
                     f"dense parts)")
    if total <= c.world_size * usable:
        unsplit = sorted(n for n, size in sizes.items() if size > usable
                         and not set(SPLIT) & set(job.constraints.get(n, TableConstraints()).sharding_types or SPLIT))
        advice = (f"allow {'/'.join(SPLIT)} for the tables larger than one rank's {usable / GIB:.1f} GiB: {unsplit}"
                  if unsplit else "loosen the constraints, or add ranks")
        last = str(error).strip().splitlines()[-1].strip()
        return (f"lightning-mtr plan: no plan ({error.error_type.value}) though the bytes fit: {bytes_vs_caps}.\n"
                f"The planner: {last}\nWhat would fit: {advice}")
    nodes = math.ceil(total / usable / c.local_world_size)
    advice = [f"more {'GPUs' if kind == 'HBM' else 'processes'}: at least {nodes * c.local_world_size} of "
              f"{cap / GIB:g} GiB (--world-size {nodes * c.local_world_size}, {nodes} nodes; a lower bound: the "
              "table bytes alone)"]
    if kind == "HBM":  # UVM: GPU tables in host memory
        advice.append(_uvm_advice(job, sizes, c.world_size * usable, c.world_size * ddr))
    advice.append(_shrink_advice(job, c.world_size * usable))
    return "\n".join([f"lightning-mtr plan: the tables do not fit: {bytes_vs_caps}.", "What would fit:",
                      *(f"  - {line}" for line in advice)])


def _uvm_advice(job: _Job, sizes: dict[str, int], hbm: float, ddr: float) -> str:
    """Move the largest tables to host DDR (each keeps a cache of its rows in HBM) until the
    rest fits, then let the planner check it."""
    moved, resident = [], float(sum(sizes.values()))
    for name in sorted(sizes, key=sizes.get, reverse=True):
        if resident <= hbm:
            break
        moved.append(name)
        resident -= sizes[name] * (1 - UVM_CACHE)
    in_ddr = sum(sizes[n] for n in moved)
    short = []
    if in_ddr > ddr:
        short.append(f"{in_ddr / GIB:.1f} GiB of host DDR, the hosts have {ddr / GIB:.1f} (--ddr-gb per node)")
    if resident > hbm:
        short.append(f"{resident / GIB:.1f} GiB of HBM with {UVM_CACHE:.0%} of their rows cached")
    if short:
        who = "every table" if len(moved) == len(sizes) else ", ".join(moved)
        return f"UVM caching does not fit either: {who} in host DDR would need " + " and ".join(short)
    uvm = {n: replace(job.constraints.get(n, TableConstraints()), compute_kernels=("fused_uvm_caching",))
           for n in moved}
    try:
        _, report = _plan(job, {**job.constraints, **uvm})
    except PlannerError as err:
        return f"UVM caching for {moved} fits the caps in total, but the planner finds no placement: {err}"
    entries = ", ".join(f"{n}: {{compute_kernels: [fused_uvm_caching]}}" for n in moved)
    return (f"UVM caching fits (the planner checked it; {max(r['perf_ms'] for r in report.ranks):.2f} ms/step "
            f"estimated): {in_ddr / GIB:.1f} GiB of tables in host DDR, with trainer.strategy.init_args."
            f"constraints {{{entries}}}")


def _shrink_advice(job: _Job, hbm: float) -> str:
    """Halve the dim of whichever table is largest until all fit (a lower bound). The sequence
    tables share one embedding_dim (the schema requires it), so they are halved together."""
    tables = job.tables()
    dims = {name: weight.shape[1] for name, (weight, _) in tables.items()}
    sequences = tuple(name for name, (_, sequence) in tables.items() if sequence)
    groups = [(name,) for name, (_, sequence) in tables.items() if not sequence] + ([sequences] if sequences else [])
    shrunk, sizes = dict(dims), job.table_bytes()
    while sum(sizes.values()) > hbm:
        candidates = [group for group in groups if shrunk[group[0]] > MIN_DIM]
        if not candidates:
            return (f"smaller dims do not suffice: at embedding_dim {MIN_DIM} the tables still take "
                    f"{sum(sizes.values()) / GIB:.1f} GiB; hash ids into fewer rows (num_embeddings)")
        for name in max(candidates, key=lambda group: sum(sizes[n] for n in group)):
            shrunk[name] = max(MIN_DIM, shrunk[name] // 8 * 4)  # fbgemm wants dims divisible by 4
        sizes = job.table_bytes(shrunk)
    changes = ", ".join(f"{n} {dims[n]} -> {shrunk[n]}" for n in dims if shrunk[n] != dims[n])
    return f"smaller embedding_dim in the schema (fits in total): {changes}"
