"""What TorchRec needs to shard the tables: the sharders, the sparse optimizer marked on the
tables so that it runs fused inside backward, and the sharded collections they become (which
``TorchRecStrategy`` hands to :func:`~lightning_mtr.embeddings.init.init_tables`). Here, beside
the strategy and the planner, because it imports ``torchrec.distributed`` (STYLE.md section 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection

from lightning_mtr.embeddings.fusing import TORCH_CLASS, SparseOptimizer
from lightning_mtr.embeddings.managed import ManagedIds

SHARDED = (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)  # what sharders() turns tables into


def prepare_for_sharding(model: nn.Module, optimizer: SparseOptimizer) -> None:
    """Mark every table's weight with the sparse optimizer, which makes TorchRec build fused
    (optimizer-in-backward) kernels for the sharded tables. Works on the meta device."""
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            _apply_optimizer_in_backward(TORCH_CLASS[optimizer.name], module.parameters(), optimizer.kwargs())


def sharders() -> list[EmbeddingBagCollectionSharder | EmbeddingCollectionSharder]:
    """Pooled tables, and unpooled ones (sequence features)."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def share_managed_ids(model: nn.Module) -> None:
    """Managed-collision maps are replicated (:mod:`lightning_mtr.embeddings.managed`): each rank
    updates its copy from the ids of every rank, so all copies (and one process given all the
    rows) assign the same rows."""
    for module in model.modules():
        if isinstance(module, ManagedIds):
            module.gather = gather_ids


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """``ids [N_r]`` of each rank ``r`` -> ``[sum N_r]``, in rank order, on every rank."""
    counts = [ids.new_zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, ids.new_tensor([ids.numel()]))
    longest = max(int(c) for c in counts)
    padded = torch.cat([ids, ids.new_zeros(longest - ids.numel())])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(count)] for part, count in zip(parts, counts)])
