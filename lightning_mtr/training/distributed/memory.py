"""Do the embedding tables fit? One estimate (weights plus fused-optimizer state, sequence
tables included) and one message (by how much, and what would fit), used by ``lightning-mtr
plan`` for any cluster and by ``fit`` on both training paths before anything is allocated:
the model is still on the meta device then, so a 2e9-row table costs nothing to refuse.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan

from lightning_mtr.embeddings.fusing import SparseOptimizer
from lightning_mtr.embeddings.managed import ManagedIds
from lightning_mtr.training.distributed.planning import GIB, Cluster, PlanReport, TableConstraints, plan_model

RESERVED = 0.15  # memory that EmbeddingShardingPlanner's default storage reservation keeps for dense parts
UVM_CACHE = 0.2  # TorchRec's default cache_load_factor: share of a fused_uvm_caching table's rows in HBM
MIN_DIM = 8
# fp32 optimizer state of each fused optimizer: (floats per row, floats per weight element)
STATE = {"sgd": (0, 0), "rowwise_adagrad": (1, 0), "adagrad": (0, 1), "adam": (0, 2)}
SPLIT = ("row_wise", "table_row_wise", "column_wise")  # the sharding types that spread one table over GPUs


class TablesDoNotFit(Exception):
    """The tables and their optimizer state exceed the memory they would live in; the message
    says by how much and what would fit (the CLI prints it and exits 2)."""


def training_cluster(world_size: int, local_world_size: int, device: torch.device, hbm_gb: float | None = None,
                     ddr_gb: float | None = None) -> Cluster:
    """The cluster a run trains on: caps not given are this machine's, not TorchRec's defaults
    (128 GiB of DDR per rank, whatever the host has): on CPU the tables live in host memory, on
    a GPU in that GPU's memory."""
    if device.type == "cuda":
        if hbm_gb is None:
            hbm_gb = torch.cuda.get_device_properties(device).total_memory / GIB
        return Cluster(world_size, local_world_size, "cuda", hbm_gb, ddr_gb)
    if ddr_gb is None:
        ddr_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Cluster(world_size, local_world_size, "cpu", hbm_gb, ddr_gb)


@dataclass
class TableMemory:
    """A model's tables (built on meta) against a cluster's memory."""

    model: nn.Module
    cluster: Cluster
    optimizer: SparseOptimizer
    constraints: dict[str, TableConstraints]
    batch_size: int

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
        """Weights plus fused-optimizer state per table (optionally at other dims), plus a managed
        table's id -> row map, whose buffers every rank holds whole (:mod:`lightning_mtr.embeddings.managed`;
        the ids kept between evictions, a few batches' worth, are not counted)."""
        per_row, per_element = STATE[self.optimizer.name]
        maps = {name: sum(b.numel() * b.element_size() for b in rows.buffers())
                for m in self.model.modules() if isinstance(m, ManagedIds) for name, rows in m.maps.items()}
        sizes = {}
        for name, (weight, _) in self.tables().items():
            rows, dim = weight.shape
            dim = (dims or {}).get(name, dim)
            sizes[name] = (rows * (dim * weight.element_size() + 4 * (per_row + per_element * dim))
                           + maps.get(name, 0) * self.cluster.world_size)
        return sizes

    def memory(self) -> tuple[str, int, int]:
        """Where sharded tables live, and its bytes per rank: each GPU's HBM, or on CPU each
        process's share of DDR; then DDR per rank (for UVM tables)."""
        storage = self.cluster.topology().devices[0].storage
        return ("HBM", storage.hbm, storage.ddr) if self.cluster.device == "cuda" else ("DDR", storage.ddr, storage.ddr)

    def check(self) -> None:
        """Raise :class:`TablesDoNotFit` when the tables' bytes alone exceed the cluster's
        memory (after the planner's reservation): a lower bound, so what passes may still find
        no placement, which the planner then reports."""
        _, cap, _ = self.memory()
        if sum(self.table_bytes().values()) > self.cluster.world_size * cap * (1 - RESERVED):
            raise TablesDoNotFit(self.shortfall())

    def plan(self, constraints: dict[str, TableConstraints]) -> tuple[ShardingPlan, PlanReport]:
        """Plan offline, without TorchRec's warnings (once per replicated table, and about dry
        runs on meta tensors): the report says what matters."""
        silenced = logging.root.manager.disable
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            logging.disable(max(silenced, logging.WARNING))
            try:
                return plan_model(self.model, self.cluster, self.batch_size, constraints)
            finally:
                logging.disable(silenced)

    def shortfall(self, error: PlannerError | None = None) -> str:
        """The bytes against the caps, and what would fit; with the planner's ``error`` when
        the bytes fit but it found no placement."""
        c, (kind, cap, ddr) = self.cluster, self.memory()
        sizes = self.table_bytes()
        total, usable = sum(sizes.values()), cap * (1 - RESERVED)
        bytes_vs_caps = (f"{total / GIB:.1f} GiB of tables and {self.optimizer.name} state vs "
                         f"{c.world_size * cap / GIB:.1f} GiB of {kind} in all ({c.world_size} x {cap / GIB:.4g} GiB; "
                         f"{c.world_size * usable / GIB:.1f} GiB after the planner's {RESERVED:.0%} reservation for "
                         f"dense parts)")
        if error is not None and total <= c.world_size * usable:
            unsplit = sorted(n for n, size in sizes.items() if size > usable and not set(SPLIT) & set(
                self.constraints.get(n, TableConstraints()).sharding_types or SPLIT))
            advice = (f"allow {'/'.join(SPLIT)} for the tables larger than one rank's {usable / GIB:.1f} GiB: "
                      f"{unsplit}" if unsplit else "loosen the constraints, or add ranks")
            last = str(error).strip().splitlines()[-1].strip()
            return (f"no plan ({error.error_type.value}) though the bytes fit: {bytes_vs_caps}.\n"
                    f"The planner: {last}\nWhat would fit: {advice}")
        nodes = math.ceil(total / usable / c.local_world_size)
        advice = [f"more {'GPUs' if kind == 'HBM' else 'processes'}: at least {nodes * c.local_world_size} of "
                  f"{cap / GIB:.4g} GiB (world size {nodes * c.local_world_size}, {nodes} nodes; a lower bound: the "
                  "table bytes alone)"]
        if kind == "HBM":  # UVM: GPU tables in host memory
            advice.append(self._uvm_advice(sizes, c.world_size * usable, c.world_size * ddr))
        advice.append(self._shrink_advice(c.world_size * usable))
        return "\n".join([f"the tables do not fit: {bytes_vs_caps}.", "What would fit:",
                          *(f"  - {line}" for line in advice)])

    def _uvm_advice(self, sizes: dict[str, int], hbm: float, ddr: float) -> str:
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
        uvm = {n: replace(self.constraints.get(n, TableConstraints()), compute_kernels=("fused_uvm_caching",))
               for n in moved}
        try:
            _, report = self.plan({**self.constraints, **uvm})
        except PlannerError as err:
            return f"UVM caching for {moved} fits the caps in total, but the planner finds no placement: {err}"
        entries = ", ".join(f"{n}: {{compute_kernels: [fused_uvm_caching]}}" for n in moved)
        return (f"UVM caching fits (the planner checked it; {max(r['perf_ms'] for r in report.ranks):.2f} ms/step "
                f"estimated): {in_ddr / GIB:.1f} GiB of tables in host DDR, with trainer.strategy.init_args."
                f"constraints {{{entries}}}")

    def _shrink_advice(self, hbm: float) -> str:
        """Halve the dim of whichever table is largest until all fit (a lower bound). The sequence
        tables share one embedding_dim (the schema requires it), so they are halved together."""
        tables = self.tables()
        dims = {name: weight.shape[1] for name, (weight, _) in tables.items()}
        sequences = tuple(name for name, (_, sequence) in tables.items() if sequence)
        groups = [(name,) for name, (_, sequence) in tables.items() if not sequence]
        groups += [sequences] if sequences else []
        shrunk, sizes = dict(dims), self.table_bytes()
        while sum(sizes.values()) > hbm:
            candidates = [group for group in groups if shrunk[group[0]] > MIN_DIM]
            if not candidates:
                return (f"smaller dims do not suffice: at embedding_dim {MIN_DIM} the tables still take "
                        f"{sum(sizes.values()) / GIB:.1f} GiB; hash ids into fewer rows (num_embeddings)")
            for name in max(candidates, key=lambda group: sum(sizes[n] for n in group)):
                shrunk[name] = max(MIN_DIM, shrunk[name] // 8 * 4)  # fbgemm wants dims divisible by 4
            sizes = self.table_bytes(shrunk)
        changes = ", ".join(f"{n} {dims[n]} -> {shrunk[n]}" for n in dims if shrunk[n] != dims[n])
        return f"smaller embedding_dim in the schema (fits in total): {changes}"
