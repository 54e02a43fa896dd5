"""What TorchRec needs to shard the tables: the sharders, the sparse optimizer marked on the
tables so that it runs fused inside backward, and the sharded collections they become (which
``TorchRecStrategy`` hands to :func:`~lightning_mtr.embeddings.init.init_tables`). Here, beside
the strategy and the planner, because it imports ``torchrec.distributed`` (STYLE.md section 1)."""

from __future__ import annotations

from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection

from lightning_mtr.embeddings.fusing import TORCH_CLASS, SparseOptimizer

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
