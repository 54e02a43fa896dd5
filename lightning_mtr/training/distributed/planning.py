"""The sharding plan: TorchRec's planner over the model's embedding tables, for a topology
that may not be this machine's, and the plan as JSON that training can pin.

Used by the training strategy (the real topology, plan agreed across ranks) and by
``lightning-mtr plan`` (any topology, offline, on a CPU-only machine).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.planner.types import (KernelConfig, PlannerError, PlannerErrorType, ShardingOption, Stats,
                                                TopologyFactory, TrainerConfig)
from torchrec.distributed.types import CacheParams, EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from lightning_mtr.training.distributed.sharding import sharders

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
COMPUTE_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching", "dense")
GIB = 1024**3
PLAN_FORMAT = "lightning-mtr-plan/1"


@dataclass(frozen=True)
class TableConstraints:
    """What the planner may choose for one table (keys are schema table names).

    Args:
        sharding_types: allowed among ``table_wise``, ``row_wise``, ``column_wise``,
            ``table_row_wise``, ``data_parallel`` (default: all).
        compute_kernels: allowed among ``fused`` (HBM on GPU), ``fused_uvm`` (host memory),
            ``fused_uvm_caching`` (host memory with an HBM cache), ``dense`` (data-parallel
            tables only). Default: all.
        min_partition: narrowest column-wise shard (a multiple of 4 that divides the dim).
        cache_load_factor: share of the table's rows cached in HBM by ``fused_uvm_caching``.
    """

    sharding_types: tuple[str, ...] | None = None
    compute_kernels: tuple[str, ...] | None = None
    min_partition: int | None = None
    cache_load_factor: float | None = None

    def __post_init__(self) -> None:
        for label, values, allowed in (("sharding type", self.sharding_types, SHARDING_TYPES),
                                       ("compute kernel", self.compute_kernels, COMPUTE_KERNELS)):
            unknown = sorted(set(values or ()) - set(allowed))
            if unknown:
                raise ValueError(f"unknown {label} {unknown}; choose from {list(allowed)}")

    def torchrec(self) -> ParameterConstraints:
        cache = CacheParams(load_factor=self.cache_load_factor) if self.cache_load_factor else None
        return ParameterConstraints(
            sharding_types=list(self.sharding_types) if self.sharding_types else None,
            compute_kernels=list(self.compute_kernels) if self.compute_kernels else None,
            min_partition=self.min_partition, cache_params=cache)


@dataclass(frozen=True)
class Cluster:
    """The devices a plan is for.

    Args:
        world_size: processes in all (one per GPU).
        local_world_size: processes per host.
        device: ``cuda`` or ``cpu``.
        hbm_gb: memory per GPU for tables (GiB); default: the planner's (or the device's).
        ddr_gb: host memory per host (GiB), where UVM tables live.
    """

    world_size: int
    local_world_size: int
    device: Literal["cpu", "cuda"] = "cuda"
    hbm_gb: float | None = None
    ddr_gb: float | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(f"world size {self.world_size} must be a positive multiple of the processes per "
                             f"host ({self.local_world_size})")

    def topology(self) -> Topology:
        # Topology takes DDR per *rank*; users think of it per host. Built by the factory:
        # TorchRec warns (on every call) that a directly constructed Topology is unvalidated.
        ddr = None if self.ddr_gb is None else int(self.ddr_gb * GIB / self.local_world_size)
        trainer = TrainerConfig(world_size=self.world_size, local_world_size=self.local_world_size,
                                hbm_cap_bytes=None if self.hbm_gb is None else int(self.hbm_gb * GIB),
                                ddr_cap_bytes=ddr)
        return TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=self.device))


class _BestPlan(Stats):
    """Keeps the planner's chosen sharding options (storage and perf per shard)."""

    def __init__(self) -> None:
        self.options: list[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time,
            best_plan, *args, **kwargs) -> None:
        self.options = list(best_plan)


@dataclass
class PlanReport:
    """One plan, readable: per table its sharding and ranks, per rank its memory and cost."""

    cluster: Cluster
    batch_size: int
    tables: list[dict[str, Any]] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_options(cls, options: list[ShardingOption], cluster: Cluster, batch_size: int) -> PlanReport:
        report = cls(cluster, batch_size)
        hbm = [0] * cluster.world_size
        ddr = [0] * cluster.world_size
        perf = [0.0] * cluster.world_size
        for option in sorted(options, key=lambda o: o.name):
            ranks = sorted({shard.rank for shard in option.shards})
            report.tables.append({
                "table": option.name, "module": option.path, "sharding_type": option.sharding_type,
                "compute_kernel": option.compute_kernel, "rows": option.tensor.shape[0],
                "dim": option.tensor.shape[1], "ranks": ranks, "num_shards": len(option.shards),
                "hbm_bytes": sum(s.storage.hbm for s in option.shards if s.storage),
                "ddr_bytes": sum(s.storage.ddr for s in option.shards if s.storage),
            })
            for shard in option.shards:
                if shard.storage:
                    hbm[shard.rank] += shard.storage.hbm
                    ddr[shard.rank] += shard.storage.ddr
                if shard.perf:
                    perf[shard.rank] += shard.perf.total
        topology = cluster.topology()
        for rank, device in enumerate(topology.devices):
            report.ranks.append({
                "rank": rank, "hbm_bytes": hbm[rank], "ddr_bytes": ddr[rank],
                "hbm_cap_bytes": device.storage.hbm, "ddr_cap_bytes": device.storage.ddr,
                "perf_ms": perf[rank],
            })
        return report

    def table_lines(self) -> list[str]:
        """The plan as aligned text, for logs and the planner tool."""
        lines = [f"{'table':<24} {'sharding':<15} {'kernel':<18} {'rows x dim':>18} {'ranks'}"]
        for t in self.tables:
            ranks = _ranks_text(t["ranks"])
            lines.append(f"{t['table']:<24} {t['sharding_type']:<15} {t['compute_kernel']:<18} "
                         f"{t['rows']:>12,} x {t['dim']:<4} {ranks}")
        lines.append("")
        lines.append(f"{'rank':<6} {'HBM GiB':>9} {'of cap':>7} {'DDR GiB':>9} {'of cap':>7} {'est. ms/step':>13}")
        for r in self.ranks:
            lines.append(f"{r['rank']:<6} {r['hbm_bytes'] / GIB:>9.2f} {_share(r['hbm_bytes'], r['hbm_cap_bytes']):>7} "
                         f"{r['ddr_bytes'] / GIB:>9.2f} {_share(r['ddr_bytes'], r['ddr_cap_bytes']):>7} "
                         f"{r['perf_ms']:>13.3f}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": asdict(self.cluster), "batch_size": self.batch_size, "tables": self.tables,
                "ranks": self.ranks}


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) > 4 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _share(used: int, cap: int) -> str:
    return f"{100 * used / cap:.0f}%" if cap else "-"


def plan_model(model: nn.Module, cluster: Cluster, batch_size: int,
               constraints: Mapping[str, TableConstraints] | None = None,
               process_group: dist.ProcessGroup | None = None) -> tuple[ShardingPlan, PlanReport | None]:
    """Run TorchRec's planner over ``model``'s tables (already marked by
    :func:`~lightning_mtr.training.distributed.sharding.prepare_for_sharding`).

    With a process group the ranks agree on one plan (rank 0 plans and broadcasts); without
    one the plan is made offline for ``cluster``. Raises ``PlannerError`` when nothing fits (on
    every rank).
    The report is None on the ranks that received the plan rather than made it.
    """
    pooled_types, sequence_types = (set(s.sharding_types(cluster.device)) for s in sharders())
    sequence_tables = set(_table_names(model, pooled=False))
    for name, constraint in (constraints or {}).items():
        available = sequence_types if name in sequence_tables else pooled_types
        if constraint.sharding_types and not set(constraint.sharding_types) & available:
            raise ValueError(f"table {name!r}: sharding types {list(constraint.sharding_types)} are not available "
                             f"on {cluster.device} (TorchRec offers {sorted(available)} there)")
    if cluster.device == "cpu":
        constraints = _no_replicated_sequences_on_cpu(model, dict(constraints or {}), sequence_types)
    stats = _BestPlan()
    planner = EmbeddingShardingPlanner(
        topology=cluster.topology(), batch_size=batch_size, stats=[stats], debug=False,
        constraints={name: c.torchrec() for name, c in (constraints or {}).items()})
    if process_group is not None:
        plan = invoke_on_rank_and_broadcast_result(process_group, 0, _plan_or_error, planner, model)
        if isinstance(plan, tuple):  # every rank raises rank 0's error, rather than waiting for its plan
            raise PlannerError(plan[0], PlannerErrorType(plan[1]))
    else:
        plan = planner.plan(model, sharders())
    unplanned = sorted(set(_table_names(model)) - {t for tables in plan.plan.values() for t in tables})
    if unplanned:
        raise ValueError(f"tables {unplanned} got no sharding on {cluster.device}: check their constraints "
                         "(sharding types and compute kernels) against what this device offers")
    # collective_plan only logs on the rank that planned; the others describe the plan they received
    report = PlanReport.from_options(stats.options, cluster, batch_size) if stats.options else None
    return plan, report


def _plan_or_error(planner: EmbeddingShardingPlanner, model: nn.Module) -> ShardingPlan | tuple[str, str]:
    """What ``collective_plan`` does on rank 0, except that a failure is broadcast as well."""
    try:
        return planner.plan(model, sharders())
    except PlannerError as error:
        return str(error), error.error_type.value


def _table_names(model: nn.Module, pooled: bool = True, unpooled: bool = True, recurse: bool = True) -> list[str]:
    """The tables the planner shards: pooled (``EmbeddingBagCollection``) and unpooled
    (``EmbeddingCollection``, sequence features), in ``model`` and, with ``recurse``, below it."""
    names = []
    for module in model.modules() if recurse else [model]:
        if pooled and isinstance(module, EmbeddingBagCollection):
            names += [c.name for c in module.embedding_bag_configs()]
        if unpooled and isinstance(module, EmbeddingCollection):
            names += [c.name for c in module.embedding_configs()]
    return names


def _no_replicated_sequences_on_cpu(model: nn.Module, constraints: dict[str, TableConstraints],
                                    available: set[str]) -> dict[str, TableConstraints]:
    """TorchRec 1.8's CPU path fails on a data-parallel unpooled (sequence) table (its output
    lengths and values disagree), so such tables may be table- or column-wise there only."""
    for name in _table_names(model, pooled=False):
        given = constraints.get(name, TableConstraints())
        offered = [t for t in SHARDING_TYPES if t in available]
        types = tuple(t for t in (given.sharding_types or offered) if t != "data_parallel")
        if not types:
            raise ValueError(f"table {name!r}: a sequence (unpooled) table cannot be data_parallel on cpu "
                             "(TorchRec fails there); use table_wise or column_wise")
        constraints[name] = replace(given, sharding_types=types)
    return constraints


def plan_to_json(plan: ShardingPlan) -> dict[str, Any]:
    """A ShardingPlan as plain JSON: per module, per table, the sharding and each shard's place."""
    modules = {}
    for path, module_plan in plan.plan.items():
        modules[path] = {}
        for table, sharding in module_plan.items():
            shards = []
            if sharding.sharding_spec is not None:
                shards = [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                           "rank": s.placement.rank()} for s in sharding.sharding_spec.shards]
            # the load factor sizes the HBM cache of a fused_uvm_caching table: without it a
            # pinned plan would train with a cache the planner did not budget for
            cache = sharding.cache_params.load_factor if sharding.cache_params else None
            modules[path][table] = {"sharding_type": sharding.sharding_type,
                                    "compute_kernel": sharding.compute_kernel,
                                    "ranks": sharding.ranks, "shards": shards, "cache_load_factor": cache}
    return {"format": PLAN_FORMAT, "modules": modules}


def plan_from_json(data: Mapping[str, Any], device: torch.device | str, local_world_size: int) -> ShardingPlan:
    """Rebuild a plan saved by :func:`plan_to_json`; shards go to ``rank:r/<device>:<r % local>``."""
    if data.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a lightning-mtr plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
    device_type = torch.device(device).type

    def placement(rank: int) -> str:
        return f"rank:{rank}/{device_type}" if device_type == "cpu" else \
            f"rank:{rank}/{device_type}:{rank % local_world_size}"

    plan = {}
    for path, tables in data["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for table, entry in tables.items():
            spec = None
            if entry["shards"]:
                spec = EnumerableShardingSpec([ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"],
                                                             placement=placement(s["rank"]))
                                               for s in entry["shards"]])
            cache = entry.get("cache_load_factor")
            module_plan[table] = ParameterSharding(sharding_type=entry["sharding_type"],
                                                   compute_kernel=entry["compute_kernel"], ranks=entry["ranks"],
                                                   sharding_spec=spec,
                                                   cache_params=CacheParams(load_factor=cache) if cache else None)
        plan[path] = module_plan
    return ShardingPlan(plan)


def load_plan(path: str | Path, model: nn.Module, world_size: int, device: torch.device | str,
              local_world_size: int) -> ShardingPlan:
    """A pinned plan, checked against this model's tables and this world size."""
    data = json.loads(Path(path).read_text())
    plan = plan_from_json(data, device, local_world_size)
    planned = {(p, t) for p, tables in plan.plan.items() for t in tables}
    present = {(p, name) for p, m in model.named_modules() for name in _table_names(m, recurse=False)}
    if planned != present:
        raise ValueError(f"plan {path} does not match the model's tables: missing {sorted(present - planned)}, "
                         f"unknown {sorted(planned - present)}")
    used = {r for tables in plan.plan.values() for s in tables.values() for r in (s.ranks or [])}
    if used and max(used) >= world_size:
        raise ValueError(f"plan {path} places shards on rank {max(used)} but the world size is {world_size}")
    return plan
