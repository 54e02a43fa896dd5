"""``SingleProcessStrategy``: one device, no process group, the tables fused in place.

The fast path for one device (``TorchRecStrategy`` on one process measured 5-11% slower on
``tools/bench_train.py``): pooled tables, and on CUDA sequence tables too, become TorchRec's
fused collections, updated inside backward; tables left unfused (sequence tables on CPU) are
stepped by the sparse optimizer's rule as a torch optimizer. Checkpoints, optimizer-state
layout and the fp16 guard are the ones ``TorchRecStrategy`` has (:mod:`.base`), so a run moves
between the two, and between world sizes, through its checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from lightning_mtr.embeddings.fusing import SparseOptimizer, fuse_sparse_optimizer, fused_modules, table_optimizer
from lightning_mtr.embeddings.init import init_tables, table_configs
from lightning_mtr.nn.meta import materialize
from lightning_mtr.training.distributed.base import TableStrategy
from lightning_mtr.training.distributed.memory import training_cluster
from lightning_mtr.training.distributed.planning import PLAN_FORMAT, Cluster


class SingleProcessStrategy(TableStrategy, SingleDeviceStrategy):
    """Train on one device (CPU or one GPU): what ``lightning-mtr`` picks for ``devices: 1``.

    ``Trainer(strategy=SingleProcessStrategy())`` trains on the trainer's device; for several
    devices use ``TorchRecStrategy``.

    Args:
        device: the device to train on (default: the one the trainer's ``accelerator`` and
            ``devices`` name).
    """

    strategy_name = "lightning_mtr_single"
    reshard_advice = ("Resume it with the TorchRec strategy, which keeps each table's saved layout on one process "
                      "too (--trainer.strategy lightning_mtr.training.distributed.TorchRecStrategy "
                      "--trainer.devices 1), or consolidate the checkpoint and start from its weights.")

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any):
        super().__init__(device=device or "cpu", **kwargs)
        self.device_given = device is not None
        self.parallel_devices: list[torch.device] = []  # the trainer's devices, filled in by Lightning

    @property
    def root_device(self) -> torch.device:
        return self._root_device if self.device_given or not self.parallel_devices else \
            torch.device(self.parallel_devices[0])

    def setup_environment(self) -> None:
        if len(self.parallel_devices) > 1 and not self.device_given:
            raise ValueError(f"SingleProcessStrategy trains on one device, not {len(self.parallel_devices)}: use "
                             "lightning_mtr.training.distributed.TorchRecStrategy for several")
        super().setup_environment()

    def teardown(self) -> None:
        """Lightning's, except that the module stays where it is, as under ``TorchRecStrategy``: a
        run stopped before its tables were placed (e.g. refusing a checkpoint) has them on meta."""
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def _cluster(self) -> Cluster:
        return training_cluster(1, 1, self.root_device)

    def _place_tables(self, module: nn.Module, trainer) -> None:
        place_tables(module.model, module.sparse_optimizer, self.root_device)

    def _table_optimizer(self, model: nn.Module, sparse_optimizer: SparseOptimizer) -> torch.optim.Optimizer | None:
        return table_optimizer(model, sparse_optimizer)

    def _fused_optimizer(self) -> KeyedOptimizer:
        return fused_state(self.lightning_module.model)

    def _plan(self) -> dict[str, Any]:
        return one_process_plan(self.lightning_module.model)


def place_tables(model: nn.Module, sparse_optimizer: SparseOptimizer, device: torch.device) -> None:
    """Allocate ``model`` (built on meta) on ``device``, fuse its tables and draw them
    (:func:`~lightning_mtr.embeddings.init.init_tables`); a model already placed (a second stage
    of the same run) is left as it is, trained tables included."""
    if not any(p.is_meta for p in model.parameters()):
        return
    sparse_optimizer.check_device(device)
    materialize(model, device)
    fuse_sparse_optimizer(model, sparse_optimizer, device)
    init_tables(model, device)


def fused_state(model: nn.Module) -> CombinedOptimizer:
    """The fused collections' optimizer state as ``TorchRecStrategy``'s sharded ones key it:
    the parameter's name in ``model`` -> ``{table}.momentum1`` (TorchRec's unsharded collections
    say ``{table}.weight.momentum_1``). The tensors are the live ones, so loading into them
    restores the fused kernels' state."""
    parts = []
    for path, module in fused_modules(model).items():
        fused = module.fused_optimizer()
        tables = "embedding_bags" if isinstance(module, FusedEmbeddingBagCollection) else "embeddings"
        params, state = {}, {}
        for key, weight in fused.params.items():  # key: "{table}.weight"
            table = key.removesuffix(".weight")
            params[f"{tables}.{key}"] = weight
            state[weight] = {slot.replace(f"{key}.momentum_", f"{table}.momentum"): value
                             for slot, value in fused.state[weight].items()}
        parts.append((path, KeyedOptimizer(params, state, fused.param_groups)))
    return CombinedOptimizer(parts)


def one_process_plan(model: nn.Module) -> dict[str, Any]:
    """Where one process keeps each table, as ``plan_to_json`` writes a plan: a fused table
    whole on rank 0 (``table_wise``), an unfused one, stepped by a torch optimizer like a
    replicated table, ``data_parallel``. A resume on more processes keeps these types."""
    modules = {}
    fused_ones = set(fused_modules(model).values())
    for path, module in model.named_modules():
        fused = module in fused_ones
        if not (fused or type(module) in (EmbeddingBagCollection, EmbeddingCollection)):
            continue
        modules[path] = {c.name: {
            "sharding_type": "table_wise" if fused else "data_parallel",
            "compute_kernel": "fused" if fused else "dense", "ranks": [0], "cache_load_factor": None,
            "shards": [{"offsets": [0, 0], "sizes": [c.num_embeddings, c.embedding_dim], "rank": 0}] if fused else [],
        } for c in table_configs(module)}
    return {"format": PLAN_FORMAT, "modules": modules}
