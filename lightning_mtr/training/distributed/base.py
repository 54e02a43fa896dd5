"""What both training paths share: the single-process fast path (:mod:`.single`) and
``TorchRecStrategy`` (:mod:`.strategy`) differ only in where they put the embedding tables.

Both refuse ``16-mixed``, step the tables that no fused kernel updates with the sparse
optimizer's rule as a torch optimizer, and read and write one checkpoint format: a DCP
directory (:mod:`.checkpoint`) whose optimizer state is keyed by parameter name with
TorchRec's slot names, and whose plan says where each table was. DCP moves every tensor
between layouts, so a checkpoint of either path resumes on the other, on any world size.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torchrec.optim.keyed import KeyedOptimizer

from lightning_mtr.embeddings.managed import ManagedIds
from lightning_mtr.training.distributed import checkpoint as sharded
from lightning_mtr.training.distributed.memory import TableMemory
from lightning_mtr.training.distributed.planning import Cluster, TableConstraints
from lightning_mtr.training.run_record import RUN_RECORD
from lightning_mtr.training.warm_start import WarmStart, saved_dense_stats


class TableStrategy(ABC):
    """Mixed into a Lightning strategy (before it in the bases). A subclass says on which
    devices the tables live (:meth:`_cluster`: refused before allocation if they cannot fit),
    where they go (:meth:`_place_tables`), the torch optimizer of the tables no fused kernel
    updates (:meth:`_table_optimizer`), which fused optimizer holds the rest's state
    (:meth:`_fused_optimizer`, keyed like TorchRec's sharded collections) and the layout as a
    plan (:meth:`_plan`)."""

    reshard_advice = (f"Pin the saved layout (trainer.strategy.init_args.plan: the checkpoint's {sharded.PLAN_FILE}, "
                      "or constraints), or consolidate the checkpoint and start from its weights.")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table_optimizer: torch.optim.Optimizer | None = None
        self.resuming: tuple[Path, dict[str, Any]] | None = None  # (checkpoint, what load_checkpoint read)
        self.warm_start: WarmStart | None = None  # set before fit (the CLI's --warm_start)
        self.warm_from: tuple[Path, dict[str, Any]] | None = None  # (checkpoint, its trainer state) during setup
        self.constraints: dict[str, TableConstraints] = {}  # the planner's, per table (TorchRecStrategy's)

    @abstractmethod
    def _cluster(self) -> Cluster:
        raise NotImplementedError

    @abstractmethod
    def _place_tables(self, module: nn.Module, trainer) -> None:
        raise NotImplementedError

    @abstractmethod
    def _table_optimizer(self, model: nn.Module, sparse_optimizer) -> torch.optim.Optimizer | None:
        raise NotImplementedError

    @abstractmethod
    def _fused_optimizer(self) -> KeyedOptimizer:
        raise NotImplementedError

    @abstractmethod
    def _plan(self) -> dict[str, Any]:
        raise NotImplementedError

    def setup(self, trainer) -> None:
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError("precision 16-mixed scales the loss, which the fused and replicated table optimizers "
                             "would apply unscaled; use bf16-mixed or 32")
        module = self.lightning_module
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.warm_start is not None and fitting:  # read (and refused) before anything is allocated
            self.warm_from = (Path(self.warm_start.path), self._read_warm_start(trainer))
        self._table_memory(trainer).check()  # before anything is allocated: the tables are still on meta
        self._place_tables(module, trainer)
        super().setup(trainer)  # moves the rest, wraps it when fitting, creates the dense optimizer
        if fitting:
            self.table_optimizer = self._table_optimizer(module.model, module.sparse_optimizer)
        for path, managed in module.model.named_modules():
            if isinstance(managed, ManagedIds):  # its tables: the sibling collection (FeatureInput's `embeddings`)
                tables = f"{path.rpartition('.')[0]}.embeddings.embedding_bags.".lstrip(".")
                managed.reset = partial(self._reset_rows, tables)
        if self.resuming is not None:
            self._restore(*self.resuming, fitting=fitting)
            self.resuming = None
        if self.warm_from is not None:
            self._warm_start(*self.warm_from)
            self.warm_start = self.warm_from = None  # a later stage of this trainer keeps what it trained

    def _reset_rows(self, tables: str, table: str, rows: torch.Tensor) -> None:
        """Zero rows ``rows`` of ``table`` (in the collection at ``tables``, relative to the model)
        and of its optimizer state, where this process holds them: the fused optimizer's (one
        process, or this rank's shards), or a data-parallel table's torch optimizer's (every rank,
        the whole table)."""
        name = f"{tables}{table}.weight"
        fused = self._fused_optimizer()
        if name in fused.params:
            weight = fused.params[name]
            state = fused.state.get(weight, {})
        else:
            weight = self.lightning_module.model.get_parameter(name)
            state = self.table_optimizer.state.get(weight, {}) if self.table_optimizer is not None else {}
        for tensor in (weight, *state.values()):
            zero_rows(tensor, rows, weight.size(0))

    def _table_memory(self, trainer) -> TableMemory:
        """The model's tables against this run's devices, as ``lightning-mtr plan`` sizes them."""
        module = self.lightning_module
        return TableMemory(module.model, self._cluster(), module.sparse_optimizer, self.constraints,
                           getattr(trainer.datamodule, "batch_size", None))

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.table_optimizer is not None:
            self.table_optimizer.step()
            self.table_optimizer.zero_grad(set_to_none=True)
        return output

    # ---- checkpoints -------------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return False  # load_checkpoint runs before setup, so the saved plan can shape the new one

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # setup restores every optimizer itself

    def _tensor_state(self, parts: tuple[str, ...] = ("model", "optimizers", "sparse_optimizer",
                                                      "replicated_optimizer")) -> dict[str, Any]:
        """Everything a resumed run needs that is a tensor (or ``parts`` of it), keyed by name (never
        by parameter id): torch optimizers by DCP's ``get_optimizer_state_dict``, the fused tables'
        by TorchRec's. (DCP creates a never-stepped optimizer's state by stepping it once with lr 0:
        a part not asked for is not touched.)"""
        module = self.lightning_module
        state = {
            "model": lambda: module.state_dict(),
            "optimizers": lambda: [get_optimizer_state_dict(module, _unwrap(o)) for o in self.optimizers],
            "sparse_optimizer": lambda: self._fused_optimizer().state_dict(),
            "replicated_optimizer": lambda: get_optimizer_state_dict(module, self.table_optimizer)
            if self.table_optimizer else {},
        }
        return {part: state[part]() for part in parts}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tensors, plain = sharded.split_tensors(self._tensor_state())
        trainer_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        trainer_state |= {"plain": plain, "plan": self._plan(), "world_size": self.world_size}
        sharded.save(tensors or {}, trainer_state, path, self.is_global_zero, self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Runs before setup: returns the trainer state (loops, callbacks, data module) and keeps
        the saved plan for planning; the tensors load into the tables at the end of setup. A
        single file (``consolidate``'s, or one written before this format) holds weights only:
        it validates, tests and predicts, but training cannot resume from it."""
        path = Path(self.broadcast(str(checkpoint_path)))
        state = sharded.read_state(path)
        check_recorded_model(state, self.lightning_module, path)
        self.resuming = (path, state)
        if path.is_dir():
            return {k: v for k, v in state.items() if k != "plain"}
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            raise sharded.CheckpointError(
                f"{path} is a single file: training resumes only from the checkpoint directories lightning-mtr "
                "writes (a single file, consolidated or written before that format, holds no optimizer state); "
                "validate, test, predict and export read it")
        return {k: v for k, v in state.items() if k != "state_dict"}

    def _restore(self, path: Path, state: dict[str, Any], fitting: bool) -> None:
        module = self.lightning_module
        if not sharded.is_sharded_checkpoint(path):
            sharded.copy_whole(module, state["state_dict"], path)
            return
        if not fitting:  # weights only: evaluating needs no optimizer state, whatever the layout
            sharded.load({"model": module.state_dict()}, path)
            return
        sharded.check_reshard(state["plan"], self._plan(), self.reshard_advice)
        tensors, live_plain = self._load_tensors(path, ("model", "optimizers", "sparse_optimizer",
                                                        "replicated_optimizer"))
        restored = sharded.merge_tensors(tensors, state["plain"])
        for optimizer, saved in zip(self.optimizers, restored["optimizers"]):
            set_optimizer_state_dict(module, _unwrap(optimizer), saved)
        self._set_table_optimizers(tensors, live_plain, restored["replicated_optimizer"])

    def _load_tensors(self, path: Path, parts: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load ``parts`` of :meth:`_tensor_state` from a checkpoint directory in place (the live
        tensors share storage with the weights and the optimizers' states); returns the loaded
        tensors and the live plain values (hyperparameters) beside them."""
        live_tensors, live_plain = sharded.split_tensors(self._tensor_state(parts))
        tensors = sharded.saved_part(live_tensors, path)
        sharded.load(tensors, path)
        return tensors, live_plain

    def _set_table_optimizers(self, tensors: dict[str, Any], live_plain: dict[str, Any],
                              replicated: dict[str, Any]) -> None:
        """The tables' optimizer state from loaded tensors: the fused optimizer keeps this rank's own
        layout and the config's hyperparameters; ``replicated`` is the torch optimizer's whole state."""
        self._fused_optimizer().load_state_dict(
            sharded.merge_tensors(tensors.get("sparse_optimizer"), live_plain["sparse_optimizer"]))
        if self.table_optimizer is not None and replicated:
            set_optimizer_state_dict(self.lightning_module, self.table_optimizer, replicated)

    def _read_warm_start(self, trainer) -> dict[str, Any]:
        """The warm start's checkpoint state, refused before anything is built on it if it is not a
        checkpoint, holds another model, or lacks the optimizer state asked for; the data module
        gets its dense statistics."""
        warm, path = self.warm_start, Path(self.warm_start.path)
        state = sharded.read_state(path)
        check_recorded_model(state, self.lightning_module, path)
        sharded.check_fits(self.lightning_module, path, sharded.saved_shapes(path, state))  # on meta: shapes only
        if warm.sparse_optimizer == "keep" and not path.is_dir():
            raise sharded.CheckpointError(
                f"{path} is a single file, which holds no optimizer state: warm-start from the checkpoint directory "
                "to keep the sparse optimizer's state, or with --warm_start_sparse_optimizer reset")
        if hasattr(trainer.datamodule, "warm_start_stats"):
            trainer.datamodule.warm_start_stats(saved_dense_stats(state, trainer.datamodule), warm.todays_weight)
        return state

    def _warm_start(self, path: Path, state: dict[str, Any]) -> None:
        """The checkpoint's weights and tables (DCP reshards them from any layout), and its sparse
        optimizer's state if kept, into a run whose loop, dense optimizer and schedule are fresh."""
        if not path.is_dir() or self.warm_start.sparse_optimizer == "reset":
            self._restore(path, state, fitting=False)  # weights and tables only, from any layout
            return
        sharded.check_reshard(state["plan"], self._plan(), self.reshard_advice)
        tensors, live_plain = self._load_tensors(path, ("model", "sparse_optimizer", "replicated_optimizer"))
        # the replicated tables' hyperparameters come from the config too, as the fused ones' do
        self._set_table_optimizers(tensors, live_plain, sharded.merge_tensors(
            tensors.get("replicated_optimizer"), live_plain["replicated_optimizer"]))

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Lightning's hook, left empty: the weights load at the end of setup, table by table."""
        return None

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Lightning's hook, left empty: setup restores every optimizer itself."""
        return None


def check_recorded_model(state: dict[str, Any], module: nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose recorded model is not the one the config built.

    The config decides the code that runs; a checkpoint only fills it (the CLI never merges a
    checkpoint's ``hyper_parameters`` into the config). What a checkpoint says it holds (the run
    record's ``class_path``, and any Lightning ``hyper_parameters`` naming a model or module
    class) must name the classes built, whatever the weights' shapes happen to be."""
    hyper = state.get("hyper_parameters") or {}
    claims = [((state.get(RUN_RECORD) or {}).get("model") or {}, module.model),
              (hyper.get("model") if isinstance(hyper.get("model"), dict) else {}, module.model),
              ({"class_path": hyper.get("_class_path")}, module)]
    for recorded, built in ((claim.get("class_path"), built) for claim, built in claims):
        if recorded is not None and not _names(recorded, type(built)):
            configured = f"{type(built).__module__}.{type(built).__qualname__}"
            raise sharded.CheckpointError(
                f"{path} holds a {recorded} but the config builds {configured}: the config decides the model; "
                "pass the config the checkpoint was trained with (its run's config.yaml) or a checkpoint of this model")


def zero_rows(tensor: torch.Tensor, rows: torch.Tensor, num_rows: int) -> None:
    """Zero rows ``rows`` of a table of ``num_rows`` rows in this process's part of ``tensor``: a
    plain tensor, or a sharded one's local shards, each holding the rows from its offset on. Entry
    ``i`` is row ``i mod num_rows``: a column-wise table's row-wise Adagrad state stacks one
    ``[num_rows]`` accumulator per column shard. Scalars (an optimizer's step count) and empty parts are left alone."""
    parts = ([(s.tensor, s.metadata.shard_offsets[0]) for s in tensor.local_shards()]
             if hasattr(tensor, "local_shards") else [(tensor, 0)])
    with torch.no_grad():
        for local, first in parts:
            if local.dim() == 0 or local.shape[0] == 0:  # a step count, or no rows of the table here
                continue
            # the evicted rows' entries in each stacked block, kept where this part holds them: a few
            # indices per eviction, never a pass over every row of the table
            blocks = -(-(first + local.shape[0]) // num_rows)
            entries = (rows.to(local.device)[:, None] + num_rows * torch.arange(blocks, device=local.device)).ravel()
            held = entries[(entries >= first) & (entries < first + local.shape[0])]
            local[held - first] = 0


def _names(class_path: Any, cls: type) -> bool:
    """Whether ``class_path`` (as a config writes it: the defining module, or a package that
    re-exports the class) names ``cls``, looked up among the modules already imported: reading a
    checkpoint imports nothing."""
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module), name, None) is cls


def _unwrap(optimizer) -> torch.optim.Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
