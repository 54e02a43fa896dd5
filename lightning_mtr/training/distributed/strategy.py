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

from lightning_mtr.nn.meta import materialize
from lightning_mtr.training.distributed import checkpoint as sharded
from lightning_mtr.training.distributed.planning import (
    Cluster, PlanReport, TableConstraints, load_plan, plan_model, plan_to_json, prepare_for_sharding, sharders)
from lightning_mtr.training.sparse import TORCH_CLASS

PLAN_FILE = "sharding_plan.json"
# fused optimizer state cannot follow these tables to another layout (see check_reshard)
_NOT_RESHARDABLE = ("column_wise", "table_column_wise")


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
        process_group_backend: default ``nccl`` on GPU, ``gloo`` on CPU.
        timeout: collective timeout.
        start_method: how Lightning starts local processes when it launches them itself.
    """

    strategy_name = "torchrec"
    shards_embeddings = True  # read by MultiTaskModule.configure_model: leave the tables to us

    def __init__(self, constraints: dict[str, TableConstraints] | None = None, plan: str | None = None,
                 hbm_gb: float | None = None, ddr_gb: float | None = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen", **kwargs: Any):
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **kwargs)
        self.constraints = {name: c if isinstance(c, TableConstraints) else TableConstraints(**c)
                            for name, c in (constraints or {}).items()}
        self.plan_path = plan
        self.hbm_gb = hbm_gb
        self.ddr_gb = ddr_gb
        self.dmp: DistributedModelParallel | None = None
        self.replicated_optimizer: torch.optim.Optimizer | None = None

    # ---- setup: materialise, plan, shard -------------------------------------------------------

    def setup(self, trainer) -> None:
        module = self.lightning_module
        self._shard(module.model, module.sparse_optimizer, trainer)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded_state_names(module))
        super().setup(trainer)  # moves the rest, wraps in DDP when fitting, creates the dense optimizer
        if trainer.state.fn == TrainerFn.FITTING:
            self.replicated_optimizer = self._replicated_table_optimizer(module.model, module.sparse_optimizer)

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
            plan, report = plan_model(model, cluster, batch_size, self.constraints, dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=self.root_device, plan=plan,
            sharders=sharders(), init_data_parallel=False, init_parameters=False)
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
        (directory / PLAN_FILE).write_text(json.dumps(saved, indent=1))

    @staticmethod
    def _replicated_table_optimizer(model: nn.Module, sparse_optimizer) -> torch.optim.Optimizer | None:
        """Data-parallel tables are plain replicated tensors (TorchRec all-reduces their
        gradients): they get the sparse optimizer's rule as a torch optimizer, stepped with the
        dense one, so a table's update does not depend on how it is sharded."""
        params = [p for m in model.modules() if isinstance(m, ShardedModule) for p in m.parameters()
                  if p.requires_grad and not hasattr(p, "_in_backward_optimizers") and p.numel()]
        if not params:
            return None
        return TORCH_CLASS[sparse_optimizer.name](params, **sparse_optimizer.kwargs())

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.replicated_optimizer is not None:
            self.replicated_optimizer.step()
            self.replicated_optimizer.zero_grad(set_to_none=True)
        return output

    # ---- checkpoints -------------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the sharded model, each rank its own shards

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores every optimizer itself

    def _tensor_state(self) -> dict[str, Any]:
        """Everything a resumed run needs that is a tensor, keyed by name (never by parameter id)."""
        module = self.lightning_module
        names = {id(p): name for name, p in module.named_parameters()}
        return {
            "model": module.state_dict(),
            "optimizers": [named_optimizer_state(_unwrap(o), names) for o in self.optimizers],
            "sparse_optimizer": self.dmp.fused_optimizer.state_dict(),
            "replicated_optimizer": named_optimizer_state(self.replicated_optimizer, names)
            if self.replicated_optimizer else {},
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero and path.is_file():
            path.unlink()
        self.barrier()
        tensors, plain = split_tensors(self._tensor_state())
        tensors = tensors or {}
        trainer_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        trainer_state |= {"plain": plain, "plan": plan_to_json(self.dmp.plan), "world_size": self.world_size}
        sharded.save(tensors, trainer_state, path, self.is_global_zero)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not sharded.is_sharded_checkpoint(path):
            raise ValueError(f"{path} is not a sharded checkpoint directory: the torchrec strategy resumes from "
                             "checkpoints it wrote (train single-process runs with it too, e.g. devices=1), "
                             "or start from its weights with `lightning-mtr consolidate`")
        state = sharded.load_trainer_state(path)
        check_reshard(state["plan"], plan_to_json(self.dmp.plan))
        live = self._tensor_state()
        tensors = expected_tensors(live, path)
        sharded.load(tensors, path)
        # DCP loaded the model's tensors and shards in place (state_dict() shares their storage);
        # the fused optimizer keeps this rank's own layout, torch optimizers are matched by name
        restored = merge_tensors(tensors, state.pop("plain"))
        restored["sparse_optimizer"] = merge_tensors(tensors.get("sparse_optimizer"),
                                                     split_tensors(live)[1]["sparse_optimizer"])
        names = {name: p for name, p in self.lightning_module.named_parameters()}
        for optimizer, saved in zip(self.optimizers, restored["optimizers"]):
            _unwrap(optimizer).load_state_dict(indexed_optimizer_state(saved, _unwrap(optimizer), names))
        self.dmp.fused_optimizer.load_state_dict(restored["sparse_optimizer"])
        if self.replicated_optimizer is not None and restored["replicated_optimizer"]:
            self.replicated_optimizer.load_state_dict(
                indexed_optimizer_state(restored["replicated_optimizer"], self.replicated_optimizer, names))
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # done in load_checkpoint, shard by shard

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass


def _unwrap(optimizer) -> torch.optim.Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def sharded_state_names(module: nn.Module) -> list[str]:
    """Parameters and buffers of sharded modules: DDP must leave them alone (the fused
    optimizer updates sharded tables; TorchRec all-reduces data-parallel ones itself)."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, ShardedModule):
            names += [f"{prefix}.{n}" for n, _ in sub.named_parameters()]
            names += [f"{prefix}.{n}" for n, _ in sub.named_buffers()]
    return names


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """A torch optimizer's state keyed by parameter name, so it survives a change of world size."""
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index_to_name = {i: names[id(p)] for i, p in enumerate(params)}
    return {
        "state": {index_to_name[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def indexed_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer,
                            params_by_name: dict[str, nn.Parameter]) -> dict[str, Any]:
    """The inverse of :func:`named_optimizer_state` for ``optimizer``'s current parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    name_to_index = {name: index[id(p)] for name, p in params_by_name.items() if id(p) in index}
    return {
        "state": {name_to_index[name]: value for name, value in saved["state"].items()},
        "param_groups": [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in saved["param_groups"]],
    }


def split_tensors(tree: Any) -> tuple[Any, Any]:
    """Split a nested dict/list into its tensors and everything else, same structure, so DCP
    stores only tensors and the rest travels in ``trainer.pt`` (loaded weights-only)."""
    if isinstance(tree, dict | list):
        items = tree.items() if isinstance(tree, dict) else ((str(i), v) for i, v in enumerate(tree))
        pairs = {k: split_tensors(v) for k, v in items}
        tensors = {k: t for k, (t, _) in pairs.items() if t is not None} or None  # DCP keeps no empty dicts
        if isinstance(tree, list):
            return tensors, [p for _, p in pairs.values()]
        return tensors, {k: p for k, (_, p) in pairs.items() if p is not None}
    if isinstance(tree, torch.Tensor):
        return tree, None
    return None, tree


def merge_tensors(tensors: Any, plain: Any) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(plain, list):
        return [merge_tensors((tensors or {}).get(str(i)), p) for i, p in enumerate(plain)]
    if isinstance(plain, dict) or isinstance(tensors, dict):
        plain, tensors = plain or {}, tensors or {}
        return {k: merge_tensors(tensors.get(k), plain.get(k)) for k in {**plain, **tensors}}
    return tensors if tensors is not None else plain


def expected_tensors(live: dict[str, Any], path: Path) -> dict[str, Any]:
    """This rank's targets for loading: its live tensors and shards, plus CPU tensors for
    saved optimizer state that a fresh optimizer has not created yet (e.g. Adam's moments
    before its first step)."""
    tensors = split_tensors(live)[0] or {}
    metadata = sharded.SafeFileSystemReader(path).read_metadata().state_dict_metadata
    flat = {}
    _flatten(tensors, "", flat)
    for key, meta in metadata.items():
        if key.startswith(("optimizers.", "replicated_optimizer.")) and key not in flat:
            _insert(tensors, key.split("."), torch.empty(tuple(meta.size), dtype=meta.properties.dtype))
    return tensors


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = tree


def _insert(tree: dict[str, Any], keys: list[str], value: torch.Tensor) -> None:
    # parameter names contain dots: the first two levels are fixed ("optimizers.0.state" or
    # "replicated_optimizer.state"), then a parameter name, then the state's slot name
    head = 3 if keys[0] == "optimizers" else 2
    node = tree
    for key in keys[:head]:
        node = node.setdefault(key, {})
    name, slot = ".".join(keys[head:-1]), keys[-1]
    node.setdefault(name, {})[slot] = value


def check_reshard(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse the table moves whose optimizer state TorchRec cannot carry over.

    Supported: any table between table-wise, row-wise and table-row-wise layouts on any
    number of processes, and data-parallel to data-parallel. Not supported: a table moving
    between data-parallel (state in a torch optimizer) and a fused layout (state inside
    fbgemm), and a column-wise table whose shards change (its per-shard row-wise optimizer
    state does not reassemble).
    """
    problems = []
    for module, tables in current["modules"].items():
        for table, now in tables.items():
            before = saved["modules"].get(module, {}).get(table)
            if before is None:
                problems.append(f"{table}: not in the checkpoint")
                continue
            kinds = before["sharding_type"], now["sharding_type"]
            if (kinds[0] == "data_parallel") != (kinds[1] == "data_parallel"):
                problems.append(f"{table}: {kinds[0]} -> {kinds[1]} (optimizer state lives in different places)")
            elif set(kinds) & set(_NOT_RESHARDABLE) and before["shards"] != now["shards"]:
                problems.append(f"{table}: {kinds[0]} -> {kinds[1]} with different shards "
                                "(column-wise optimizer state cannot be resharded)")
    if problems:
        raise ValueError("cannot resume this checkpoint with the current sharding plan:\n  " + "\n  ".join(problems) +
                         "\nPin the saved layout (trainer.strategy.init_args.plan: the checkpoint's "
                         f"{PLAN_FILE}, or constraints), or consolidate the checkpoint and start from its weights.")
