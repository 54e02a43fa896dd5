"""Every embedding table's initial values, on every training path and at export, decided here."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection, FusedEmbeddingCollection

_BAGS = (EmbeddingBagCollection, FusedEmbeddingBagCollection)
_UNPOOLED = (EmbeddingCollection, FusedEmbeddingCollection)


def init_tables(module: nn.Module, device: torch.device | str, sharded: tuple[type[nn.Module], ...] = ()) -> None:
    """Draw every embedding table under ``module`` with its TorchRec config's ``init_fn``: uniform
    in ``[weight_init_min, weight_init_max]``, the schema's ``+-init_range`` or else TorchRec's
    ``+-sqrt(1 / num_embeddings)`` (:mod:`.tables`). Plain tables still on the meta device are
    allocated on ``device`` first. Call it once, when the tables have their final form (plain,
    fused or sharded) and before a checkpoint is loaded into them. ``sharded``: the collection
    classes a strategy's sharders made (``TorchRecStrategy`` passes them: this package imports no
    ``torchrec.distributed``), each drawn by its own reset.

    Who allocates what, for a model built on the meta device:

    - every path: ``nn.meta.materialize`` allocates and resets every module but the tables;
    - one process (``SingleProcessStrategy``, ``place_tables``): ``fuse_sparse_optimizer`` replaces the
      pooled collections (on CUDA the sequence ones too) by fused ones allocated on the device;
      this allocates the tables left plain (sequence tables on CPU), then draws them all;
    - many processes (``TorchRecStrategy``): ``DistributedModelParallel`` replaces every
      collection by a sharded one holding this rank's shards (a data-parallel table whole); each
      shard is drawn here with its table's ``init_fn`` (TorchRec's sharded reset) and a
      data-parallel table is then broadcast from rank 0, so its replicas agree;
    - export (``serving.checkpoint.build_trained``): this allocates the plain tables on the CPU,
      and the checkpoint's weights then replace the draw.

    TorchRec's fused and sharded collections also draw once when built (from the same bounds);
    drawing again costs one more pass over the tables at start-up (0.18 s per 256 MB on one CPU
    thread, against 0.29 s to build the fused table) and makes the values this function's on
    every path.
    """
    with torch.no_grad():
        for collection in module.modules():
            if sharded and isinstance(collection, sharded):
                collection.reset_parameters()
            elif isinstance(collection, (*_BAGS, *_UNPOOLED)):
                if any(p.is_meta for p in collection.parameters()):
                    collection.to_empty(device=device)
                tables = collection.embedding_bags if isinstance(collection, _BAGS) else collection.embeddings
                for config in table_configs(collection):
                    config.init_fn(tables[config.name].weight)


def table_configs(collection: nn.Module) -> list[BaseEmbeddingConfig]:
    """The table configs of a plain or fused collection, pooled or not."""
    if isinstance(collection, _BAGS):
        return collection.embedding_bag_configs()
    return collection.embedding_configs()
