"""``TorchRecStrategy``: Lightning's DDP with the embedding tables sharded by TorchRec.

Everything distributed lives here (../shared/STYLE.md section 1): the model stays the plain
single-device module the LightningModule built on the meta device. At setup the strategy
materialises its dense layers on the device, plans the tables for the real topology (the
ranks agree on one plan, or a pinned plan from ``lightning-mtr plan`` is used), and shards
them in place with ``DistributedModelParallel``; Lightning's DDP then wraps the module for
the dense layers and ignores the sharded tables, whose fused optimizer updates them inside
backward. Checkpoints, the fp16 guard and the replicated tables' optimizer are shared with the
single-process fast path (:mod:`.base`).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardedModule, ShardingEnv, ShardingPlan

from lightning_mtr.embeddings.fusing import rule_optimizer
from lightning_mtr.embeddings.init import init_tables
from lightning_mtr.training.distributed.sharding import SHARDED, prepare_for_sharding, share_managed_ids, sharders
from lightning_mtr.nn.meta import materialize
from lightning_mtr.training.distributed import checkpoint as sharded
from lightning_mtr.training.distributed.base import TableStrategy
from lightning_mtr.training.distributed.memory import TablesDoNotFit, training_cluster
from lightning_mtr.training.distributed.peers import is_peer_failure
from lightning_mtr.training.distributed.planning import (
    Cluster, PlanReport, TableConstraints, load_plan, plan_model, plan_to_json)


class TorchRecStrategy(TableStrategy, DDPStrategy):
    """Shard embedding tables across processes (TorchRec); dense layers are data-parallel.

    Use it like any strategy: ``Trainer(strategy=TorchRecStrategy(), devices=8, num_nodes=2)``
    under Lightning's launcher, ``torchrun`` or SLURM; NCCL on GPU, gloo on CPU. Presets:
    ``conf/trainer/``.

    Args:
        constraints: per-table planner constraints, keyed by schema table name, e.g.
            ``{user_id: {sharding_types: [row_wise]}}``.
        plan: a plan JSON written by ``lightning-mtr plan`` (or by an earlier run) to use
            instead of planning; it must match the model's tables and this world size.
        hbm_gb: GPU memory per device the planner may fill (default: the device's).
        ddr_gb: host memory per host the planner may fill (UVM tables, CPU training); on CPU
            the default is this host's memory.
        process_group_backend: default ``nccl`` on GPU, ``gloo`` on CPU.
        collective_timeout: seconds any collective may wait for the other ranks before the run
            ends (a stopped or hung peer): each surviving rank then stops with one line naming
            the ranks that stopped answering and exit status 4 (:mod:`.peers`). Long enough for
            the slowest rank's save or validation to catch up. The ranks' first meeting (the
            rendezvous) waits at least torch's default, 30 minutes.
        start_method: how Lightning starts local processes when it launches them itself.
    """

    strategy_name = "torchrec"

    def __init__(self, constraints: dict[str, TableConstraints] | None = None, plan: str | None = None,
                 hbm_gb: float | None = None, ddr_gb: float | None = None,
                 process_group_backend: str | None = None,
                 collective_timeout: float = 600.0,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen", **kwargs: Any):
        if not collective_timeout > 0:
            raise ValueError(f"TorchRecStrategy: collective_timeout must be a positive number of seconds, "
                             f"got {collective_timeout}")
        super().__init__(process_group_backend=process_group_backend, timeout=timedelta(seconds=collective_timeout),
                         start_method=start_method, **kwargs)
        self.constraints = {name: c if isinstance(c, TableConstraints) else TableConstraints(**c)
                            for name, c in (constraints or {}).items()}
        self.plan_path = plan
        self.hbm_gb = hbm_gb
        self.ddr_gb = ddr_gb
        self.dmp: DistributedModelParallel | None = None

    # ---- setup: materialise, plan, shard -------------------------------------------------------

    def _cluster(self) -> Cluster:
        return training_cluster(self.world_size, self.num_processes, self.root_device, self.hbm_gb, self.ddr_gb)

    def _place_tables(self, module: nn.Module, trainer) -> None:
        self._shard(module.model, module.sparse_optimizer, trainer)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded_state_names(module))

    def _shard(self, model: nn.Module, sparse_optimizer, trainer) -> None:
        if self.dmp is not None:  # fit, then test in the same trainer: already sharded
            return
        sparse_optimizer.check_device(self.root_device)
        materialize(model, self.root_device)
        prepare_for_sharding(model, sparse_optimizer)
        cluster = self._cluster()
        report = None
        if self.plan_path:
            plan = load_plan(self.plan_path, model, self.world_size, self.root_device, self.num_processes)
        else:
            batch_size = getattr(trainer.datamodule, "batch_size", None)
            kept = self._kept_plan()
            saved_types = resumed_sharding_types(kept[1]) if kept else {}
            try:
                plan, report = plan_model(model, cluster, batch_size, {**saved_types, **self.constraints},
                                          dist.GroupMember.WORLD)
            except PlannerError as error:
                raise TablesDoNotFit(self._table_memory(trainer).shortfall(error)) from error
            except ValueError as error:
                if not saved_types:
                    raise
                how = "resuming" if self.resuming is not None else "warm-starting from"
                raise ValueError(f"{how} {kept[0]}, whose tables keep their saved sharding types: "
                                 f"{error}") from error
        self.dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=self.root_device, plan=plan,
            sharders=sharders(), init_data_parallel=False, init_parameters=False)
        init_tables(model, self.root_device, SHARDED)
        share_managed_ids(model)
        self._announce(plan, report, trainer)

    def _announce(self, plan: ShardingPlan, report: PlanReport | None, trainer) -> None:
        """Log the plan at start and keep it next to the checkpoints."""
        if not self.is_global_zero:
            return
        lines = report.table_lines() if report else [str(plan)]
        rank_zero_info("Sharding plan (%d processes):\n%s", self.world_size, "\n".join(lines))
        callback = trainer.checkpoint_callback
        directory = Path(callback.dirpath if callback is not None and callback.dirpath else trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        saved = plan_to_json(plan) | ({"report": report.to_dict()} if report else {})
        (directory / sharded.PLAN_FILE).write_text(json.dumps(saved, indent=1))

    @staticmethod
    def _table_optimizer(model: nn.Module, sparse_optimizer) -> torch.optim.Optimizer | None:
        """Data-parallel tables are plain replicated tensors (TorchRec all-reduces their
        gradients): they get the sparse optimizer's rule as a torch optimizer, stepped with the
        dense one, so a table's update does not depend on how it is sharded."""
        return rule_optimizer([p for m in model.modules() if isinstance(m, ShardedModule) for p in m.parameters()
                               if p.requires_grad and not hasattr(p, "_in_backward_optimizers") and p.numel()],
                              sparse_optimizer)

    def _fused_optimizer(self):
        return self.dmp.fused_optimizer

    def _plan(self) -> dict[str, Any]:
        return plan_to_json(self.dmp.plan)

    def _kept_plan(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint (and its plan) whose table optimizer state this run takes over: a resumed
        directory, or a warm start keeping the sparse optimizer's state."""
        for source, kept in ((self.resuming, True), (self.warm_from, self.warm_start and
                                                      self.warm_start.sparse_optimizer == "keep")):
            if source is not None and kept and sharded.is_sharded_checkpoint(source[0]):
                return source[0], source[1]["plan"]
        return None

    def setup_distributed(self) -> None:
        """The ranks meet with torch's default patience (a rank may start minutes after another:
        a slow node, an image still pulling), then ``collective_timeout`` bounds every collective:
        a short one no longer ends the rendezvous of a rank that starts late."""
        collective, self._timeout = self._timeout, max(self._timeout, default_pg_timeout)
        try:
            super().setup_distributed()
        finally:
            self._timeout = collective
        dist.distributed_c10d._set_pg_timeout(collective)

    def on_exception(self, exception: BaseException) -> None:
        """A peer lost mid-run: the ranks this process launched (Lightning's launcher) are killed,
        so that a stopped one (SIGSTOP) does not stay behind when this one ends; Lightning kills
        them only on a KeyboardInterrupt. They leave the launcher's list first: Lightning's watcher
        thread, seeing one of them dead, would SIGKILL this process too, before its one line."""
        super().on_exception(exception)
        if is_peer_failure(exception) and isinstance(self.launcher, _SubprocessScriptLauncher):
            children = list(self.launcher.procs)
            self.launcher.procs.clear()  # the watcher's list: empty, it stops watching
            for child in children:
                child.kill()
                child.wait()

    def teardown(self) -> None:
        """Lightning's DDP teardown, except that the module stays where it is: moving it to the
        CPU would copy every shard to host memory (and UVM tables into device memory on the
        way back for a later test), and a run that failed during setup still has it on meta."""
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def resumed_sharding_types(plan: dict[str, Any]) -> dict[str, TableConstraints]:
    """Resuming keeps each table's sharding type, so the optimizer state has somewhere to go
    (see :func:`checkpoint.check_reshard`); the planner still picks ranks for this topology."""
    return {table: TableConstraints(sharding_types=(entry["sharding_type"],))
            for tables in plan["modules"].values() for table, entry in tables.items()}


def sharded_state_names(module: nn.Module) -> list[str]:
    """Parameters and buffers of sharded modules: DDP must leave them alone (the fused
    optimizer updates sharded tables; TorchRec all-reduces data-parallel ones itself)."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, ShardedModule):
            owned = [n for n, _ in sub.named_parameters()] + [n for n, _ in sub.named_buffers()]
            names += [f"{prefix}.{n}" if prefix else n for n in owned]
    return names
