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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from matplotlib.figure import Figure
from torch import nn
from torchrec.distributed.planner.types import PlannerError

from lightning_mtr.embeddings.fusing import SparseOptimizer
from lightning_mtr.training.distributed.sharding import prepare_for_sharding
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed.memory import STATE, TableMemory
from lightning_mtr.training.distributed.planning import GIB, Cluster, PlanReport, TableConstraints, plan_to_json
from lightning_mtr.training.module import ModelFactory


@dataclass
class _Job(TableMemory):
    """Everything the config and the flags say: what to plan, for which cluster."""

    model_name: str = ""

    def describe(self) -> str:
        c, (kind, cap, ddr) = self.cluster, self.memory()
        sizes = self.table_bytes()
        hbm = f"HBM {cap / GIB:g} GiB each, " if kind == "HBM" else ""
        return (f"planning {self.model_name}: {len(sizes)} tables, {sum(sizes.values()) / GIB:.1f} GiB with "
                f"{self.optimizer.name} state, {len(self.constraints)} constrained; for {c.world_size} x {c.device} "
                f"({c.local_world_size} per node; {hbm}DDR {ddr * c.local_world_size / GIB:g} GiB per node), "
                f"batch {self.batch_size} per rank")


def main(argv: list[str] | None = None) -> int:
    """How a config's embedding tables would shard over a GPU cluster, worked out on any machine."""
    args, overrides = _parser().parse_known_args(argv)
    try:
        job = _job(args, overrides)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        print(f"lightning-mtr plan: error: {err}", file=sys.stderr)
        return 2
    print(job.describe())
    try:
        plan, report = job.plan(job.constraints)
    except PlannerError as err:
        print(f"lightning-mtr plan: {job.shortfall(err)}", file=sys.stderr)
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
    return _Job(model, cluster, optimizer, _constraints(config, schema), batch_size,
                model_name=parsed.model.model.class_path)


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
