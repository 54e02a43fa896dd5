"""``TorchRecStrategy``: Lightning's DDP with the embedding tables sharded by TorchRec.

Everything distributed lives here (../shared/STYLE.md section 1): the model stays the plain
single-device module the LightningModule built on the meta device. At setup the strategy
materialises its dense layers on the device, plans the tables for the real topology (the
ranks agree on one plan, or a pinned plan from ``lightning-mtr plan`` is used), and shards
them in place with ``DistributedModelParallel``; Lightning's DDP then wraps the module for
the dense layers and ignores the sharded tables, whose fused optimizer updates them inside
backward. Checkpoints are sharded directories (:mod:`.checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule, ShardingEnv, ShardingPlan

from lightning_mtr.data.batch import Batch
from lightning_mtr.embeddings.fusing import rule_optimizer
from lightning_mtr.embeddings.init import init_tables
from lightning_mtr.embeddings.sharding import prepare_for_sharding, sharders
from lightning_mtr.nn.meta import materialize
from lightning_mtr.training.distributed import checkpoint as sharded
from lightning_mtr.training.distributed.planning import (
    Cluster, PlanReport, TableConstraints, load_plan, plan_model, plan_to_json)


class TorchRecStrategy(DDPStrategy):
    """Shard embedding tables across processes (TorchRec); dense layers are data-parallel.

    Use it like any strategy: ``Trainer(strategy=TorchRecStrategy(), devices=8, num_nodes=2)``
    under Lightning's launcher, ``torchrun`` or SLURM; NCCL on GPU, gloo on CPU. Presets:
    ``conf/trainer/``.

    Args:
        constraints: per-table planner constraints, keyed by schema table name, e.g.
            ``{user_id: {sharding_types: [row_wise]}}``.
        plan: a plan JSON written by ``lightning-mtr plan`` (or by an earlier run) to use
            instead of planning; it must match the model's tables and this world size.
        hbm_gb: GPU memory per device the planner may fill (default: the planner's).
        ddr_gb: host memory per host the planner may fill (UVM tables, CPU training).
        prefetch_input_dist: start each batch's input distribution (the all-to-all of its ids)
            as soon as Lightning fetches it, one batch ahead for streaming data, so it overlaps
            the previous batch's compute (TorchRec's sparse-dist pipeline, inside Lightning's
            loop); ``false`` distributes each batch when its forward starts.
        process_group_backend: default ``nccl`` on GPU, ``gloo`` on CPU.
        timeout: collective timeout.
        start_method: how Lightning starts local processes when it launches them itself.
    """

    strategy_name = "torchrec"
    shards_embeddings = True  # read by MultiTaskModule.configure_model: leave the tables to us

    def __init__(self, constraints: dict[str, TableConstraints] | None = None, plan: str | None = None,
                 hbm_gb: float | None = None, ddr_gb: float | None = None, prefetch_input_dist: bool = True,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen", **kwargs: Any):
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **kwargs)
        self.constraints = {name: c if isinstance(c, TableConstraints) else TableConstraints(**c)
                            for name, c in (constraints or {}).items()}
        self.plan_path = plan
        self.hbm_gb = hbm_gb
        self.ddr_gb = ddr_gb
        self.prefetch_input_dist = prefetch_input_dist
        self.prefetched: list[PrefetchedForward] = []
        self.dmp: DistributedModelParallel | None = None
        self.replicated_optimizer: torch.optim.Optimizer | None = None
        self.resuming: tuple[Path, dict[str, Any]] | None = None  # (checkpoint, its trainer state)

    # ---- setup: materialise, plan, shard -------------------------------------------------------

    def setup(self, trainer) -> None:
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError("precision 16-mixed scales the loss, which the fused and replicated table optimizers "
                             "would apply unscaled; use bf16-mixed or 32")
        module = self.lightning_module
        self._shard(module.model, module.sparse_optimizer, trainer)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded_state_names(module))
        super().setup(trainer)  # moves the rest, wraps in DDP when fitting, creates the dense optimizer
        if trainer.state.fn == TrainerFn.FITTING:
            self.replicated_optimizer = self._replicated_table_optimizer(module.model, module.sparse_optimizer)
        if self.resuming is not None:
            self._load_tensors(*self.resuming)
            self.resuming = None

    def _shard(self, model: nn.Module, sparse_optimizer, trainer) -> None:
        if self.dmp is not None:  # fit, then test in the same trainer: already sharded
            return
        sparse_optimizer.check_device(self.root_device)
        materialize(model, self.root_device)
        prepare_for_sharding(model, sparse_optimizer)
        cluster = Cluster(world_size=self.world_size, local_world_size=self.num_processes,
                          device="cuda" if self.root_device.type == "cuda" else "cpu", hbm_gb=self.hbm_gb,
                          ddr_gb=self.ddr_gb)
        report = None
        if self.plan_path:
            plan = load_plan(self.plan_path, model, self.world_size, self.root_device, self.num_processes)
        else:
            batch_size = getattr(trainer.datamodule, "batch_size", None)
            saved_types = resumed_sharding_types(self.resuming[1]["plan"]) if self.resuming else {}
            constraints = {**saved_types, **self.constraints}
            plan, report = plan_model(model, cluster, batch_size, constraints, dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=self.root_device, plan=plan,
            sharders=sharders(), init_data_parallel=False, init_parameters=False)
        init_tables(model, self.root_device)
        if self.prefetch_input_dist:
            self.prefetched = [PrefetchedForward(m) for m in model.modules() if isinstance(m, ShardedModule)]
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
    def _replicated_table_optimizer(model: nn.Module, sparse_optimizer) -> torch.optim.Optimizer | None:
        """Data-parallel tables are plain replicated tensors (TorchRec all-reduces their
        gradients): they get the sparse optimizer's rule as a torch optimizer, stepped with the
        dense one, so a table's update does not depend on how it is sharded."""
        return rule_optimizer([p for m in model.modules() if isinstance(m, ShardedModule) for p in m.parameters()
                               if p.requires_grad and not hasattr(p, "_in_backward_optimizers") and p.numel()],
                              sparse_optimizer)

    def process_dataloader(self, dataloader: Any) -> Any:
        return InputDistPrefetch(dataloader, self.root_device, self.prefetched) if self.prefetched else dataloader

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.replicated_optimizer is not None:
            self.replicated_optimizer.step()
            self.replicated_optimizer.zero_grad(set_to_none=True)
        return output

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

    # ---- checkpoints -------------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return False  # load_checkpoint runs before setup, so the saved plan can shape the new one

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores every optimizer itself

    def _tensor_state(self) -> dict[str, Any]:
        """Everything a resumed run needs that is a tensor, keyed by name (never by parameter id)."""
        module = self.lightning_module
        names = {id(p): name for name, p in module.named_parameters()}
        return {
            "model": module.state_dict(),
            "optimizers": [sharded.named_optimizer_state(_unwrap(o), names) for o in self.optimizers],
            "sparse_optimizer": self.dmp.fused_optimizer.state_dict(),
            "replicated_optimizer": sharded.named_optimizer_state(self.replicated_optimizer, names)
            if self.replicated_optimizer else {},
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tensors, plain = sharded.split_tensors(self._tensor_state())
        tensors = tensors or {}
        trainer_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        trainer_state |= {"plain": plain, "plan": plan_to_json(self.dmp.plan), "world_size": self.world_size}
        sharded.save(tensors, trainer_state, path, self.is_global_zero, self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Runs before setup: returns the trainer state (loops, callbacks, data module) and keeps
        the saved plan for planning; the tensors load into the shards at the end of setup."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not sharded.is_sharded_checkpoint(path):
            raise ValueError(f"{path} is not a sharded checkpoint directory: the torchrec strategy resumes from "
                             "checkpoints it wrote (train single-process runs with it too, e.g. devices=1), "
                             "or start from its weights with `lightning-mtr consolidate`")
        state = sharded.load_trainer_state(path)
        self.resuming = (path, state)
        return {k: v for k, v in state.items() if k != "plain"}

    def _load_tensors(self, path: Path, state: dict[str, Any]) -> None:
        sharded.check_reshard(state["plan"], plan_to_json(self.dmp.plan))
        live = self._tensor_state()
        tensors = sharded.expected_tensors(live, path)
        sharded.load(tensors, path)
        # DCP loaded the model's tensors and shards in place (state_dict() shares their storage);
        # the fused optimizer keeps this rank's own layout, torch optimizers are matched by name
        restored = sharded.merge_tensors(tensors, state["plain"])
        restored["sparse_optimizer"] = sharded.merge_tensors(tensors.get("sparse_optimizer"),
                                                             sharded.split_tensors(live)[1]["sparse_optimizer"])
        names = dict(self.lightning_module.named_parameters())
        for optimizer, saved in zip(self.optimizers, restored["optimizers"]):
            _unwrap(optimizer).load_state_dict(sharded.indexed_optimizer_state(saved, _unwrap(optimizer), names))
        self.dmp.fused_optimizer.load_state_dict(restored["sparse_optimizer"])
        if self.replicated_optimizer is not None and restored["replicated_optimizer"]:
            self.replicated_optimizer.load_state_dict(
                sharded.indexed_optimizer_state(restored["replicated_optimizer"], self.replicated_optimizer, names))

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # done at the end of setup, shard by shard

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass


class PrefetchedForward:
    """A sharded collection's forward that uses the input distribution already started for
    these features (by :class:`InputDistPrefetch`), or runs all three steps itself (e.g. a
    call outside the loop; the same on every rank, so the collectives still match)."""

    def __init__(self, module: ShardedModule):
        self.module = module
        self.pending: dict[int, tuple[Any, Any, Any]] = {}  # id(features) -> (features, context, awaitable)
        self.hits = self.misses = 0
        module.forward = self

    def start(self, features: Any) -> int:
        context = self.module.create_context()
        self.pending[id(features)] = (features, context, self.module.input_dist(context, features))
        return id(features)

    def discard(self, keys: set[int]) -> None:
        for key in keys:
            self.pending.pop(key, None)

    def __call__(self, features: Any) -> Any:
        entry = self.pending.pop(id(features), None)  # the entry holds the features: its id is not reused
        if entry is None:
            self.misses += 1
            return ShardedModule.forward(self.module, features)
        _, context, distributing = entry
        self.hits += 1
        return self.module.compute_and_output_dist(context, distributing.wait().wait())


class InputDistPrefetch:
    """Iterates a data loader and starts each batch's sharded input distribution (the
    all-to-all of its ids) the moment the batch is fetched. For streaming loaders (no length)
    Lightning fetches one batch ahead, so batch i+1's ids travel while batch i computes. Every
    process fetches the same batches in the same order, so the collectives stay matched."""

    def __init__(self, loader: Any, device: torch.device, forwards: list[PrefetchedForward]):
        self.loader = loader
        self.device = device
        self.forwards = forwards

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)  # Lightning reads the sampler (set_epoch), workers, ...

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        started: set[int] = set()
        try:
            for batch in self.loader:
                if isinstance(batch, Batch):
                    batch = batch.to(self.device, non_blocking=True)
                    started |= {forward.start(batch.sparse) for forward in self.forwards}
                yield batch
        except GeneratorExit:  # the loop stopped early (max_steps): its fetched-ahead batch never runs
            for forward in self.forwards:
                forward.discard(started)
            raise


def resumed_sharding_types(plan: dict[str, Any]) -> dict[str, TableConstraints]:
    """Resuming keeps each table's sharding type, so the optimizer state has somewhere to go
    (see :func:`checkpoint.check_reshard`); the planner still picks ranks for this topology."""
    return {table: TableConstraints(sharding_types=(entry["sharding_type"],))
            for tables in plan["modules"].values() for table, entry in tables.items()}


def _unwrap(optimizer) -> torch.optim.Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def sharded_state_names(module: nn.Module) -> list[str]:
    """Parameters and buffers of sharded modules: DDP must leave them alone (the fused
    optimizer updates sharded tables; TorchRec all-reduces data-parallel ones itself)."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, ShardedModule):
            owned = [n for n, _ in sub.named_parameters()] + [n for n, _ in sub.named_buffers()]
            names += [f"{prefix}.{n}" if prefix else n for n in owned]
    return names
