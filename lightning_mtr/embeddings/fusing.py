"""The fused sparse optimizer: embedding rows are updated inside backward by fbgemm.

Only the rows a batch touched are read and written, so the cost of the update follows
the batch, not the table. Dense parameters keep a normal torch optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection, FusedEmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.fused import FusedOptimizerModule

SparseOptimizerName = Literal["sgd", "adagrad", "rowwise_adagrad", "adam"]

# fbgemm's CPU kernels implement only these; its CUDA kernels also Adam (and LAMB etc.,
# which TorchRec's single-process fused collection does not expose).
TORCH_CLASS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
                "adam": torch.optim.Adam}
SUPPORTED = {"cpu": ("sgd", "adagrad", "rowwise_adagrad"), "cuda": ("sgd", "adagrad", "rowwise_adagrad", "adam")}


@dataclass(frozen=True)
class SparseOptimizer:
    """The embedding tables' fused optimizer.

    Args:
        name: ``sgd``, ``adagrad`` or ``rowwise_adagrad`` (CPU and CUDA), ``adam`` (CUDA only).
        lr: learning rate.
        eps: numerical epsilon for the adaptive optimizers.
        weight_decay: L2 penalty applied to the touched rows (by the CPU torch optimizer of the
            sequence tables, to every row: see :func:`table_optimizer`).
    """

    name: SparseOptimizerName = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check_device(self, device: torch.device) -> None:
        kind = "cuda" if device.type == "cuda" else "cpu"
        if self.name not in SUPPORTED[kind]:
            raise ValueError(f"sparse optimizer {self.name!r} is not available on {device.type} "
                             f"(fbgemm's {kind} kernels support {list(SUPPORTED[kind])})")

    def kwargs(self) -> dict[str, float]:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name != "sgd":
            kwargs["eps"] = self.eps
        return kwargs


_FUSED = {EmbeddingBagCollection: (FusedEmbeddingBagCollection, "embedding_bag_configs"),
          EmbeddingCollection: (FusedEmbeddingCollection, "embedding_configs")}


def fuse_sparse_optimizer(module: nn.Module, optimizer: SparseOptimizer, device: torch.device) -> int:
    """Swap every ``EmbeddingBagCollection`` (and, on CUDA, ``EmbeddingCollection``: TorchRec's
    fused one has no CPU kernel, see :func:`table_optimizer`) under ``module`` for a fused one,
    in place.

    Parameter names and the weights of allocated tables are kept, so checkpoints do not depend
    on it; tables still on the meta device get theirs from
    :func:`~lightning_mtr.embeddings.init.init_tables`. Returns how many collections were swapped.
    """
    optimizer.check_device(device)
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _FUSED and (device.type == "cuda" or type(child) is EmbeddingBagCollection):
                fused_class, configs = _FUSED[type(child)]
                weighted = {"is_weighted": child.is_weighted()} if fused_class is FusedEmbeddingBagCollection else {}
                fused = fused_class(tables=getattr(child, configs)(), optimizer_type=TORCH_CLASS[optimizer.name],
                                    optimizer_kwargs=optimizer.kwargs(), device=device, **weighted)
                if not any(p.is_meta for p in child.parameters()):
                    fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                swapped += 1
    return swapped


def fused_modules(module: nn.Module) -> dict[str, FusedEmbeddingBagCollection | FusedEmbeddingCollection]:
    """The single-process fused collections (sharded ones keep their state in the strategy's checkpoints)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (FusedEmbeddingBagCollection, FusedEmbeddingCollection))}


def table_optimizer(module: nn.Module, optimizer: SparseOptimizer) -> torch.optim.Optimizer | None:
    """The sparse optimizer's rule as a torch optimizer, for the tables left unfused (sequence
    tables on CPU). Their gradients are dense, so each step costs the size of those tables, not
    of the batch: fine for the sequence tables of a CPU run, and CUDA fuses them instead."""
    return rule_optimizer([p for m in module.modules() if type(m) in _FUSED for p in m.parameters()
                           if p.requires_grad], optimizer)


def rule_optimizer(params: list[nn.Parameter], optimizer: SparseOptimizer) -> torch.optim.Optimizer | None:
    """The sparse optimizer's rule as a torch optimizer over ``params`` (None when there are none),
    for tables that get gradients instead of an update inside backward."""
    return TORCH_CLASS[optimizer.name](params, **optimizer.kwargs()) if params else None


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that the dense optimizer owns: everything outside embedding tables (fused,
    sharded, or stepped by :func:`table_optimizer`)."""
    tables = {id(p) for m in module.modules() if isinstance(m, (FusedOptimizerModule, *_FUSED)) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in tables and p.requires_grad]
