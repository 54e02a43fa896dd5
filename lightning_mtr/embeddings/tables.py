"""Schema tables -> TorchRec table configs: what every collection (plain, fused, sharded) is built
from, and where each table's initial range is set (:mod:`.init` draws from it)."""

from __future__ import annotations

from torchrec import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType

from lightning_mtr.schema import EmbeddingTable, Schema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _table_arguments(table: EmbeddingTable) -> dict:
    """What every TorchRec config of ``table`` gets; an unset init range keeps TorchRec's default
    (``+-sqrt(1 / num_embeddings)``), which :func:`~lightning_mtr.embeddings.init.init_tables`
    reads from the config like a set one."""
    init = {} if table.init_range is None else {"weight_init_min": -table.init_range,
                                                 "weight_init_max": table.init_range}
    return dict(name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
                feature_names=list(table.feature_names), **init)


def embedding_configs(schema: Schema, weighted: bool = False) -> list[EmbeddingBagConfig]:
    """One TorchRec table config per pooled schema table (shared tables list all their features),
    of the unweighted tables or of the ``weighted`` ones (``weight_column``: a collection of their own).

    Weighted tables sum: PyTorch's plain ``EmbeddingBag`` has no weighted mean (fbgemm's has), so
    ``FeatureInput`` divides their mean-pooled features by the bags' id counts itself, on every
    path (plain, fused, sharded) alike."""
    return [EmbeddingBagConfig(**_table_arguments(t), pooling=_POOLING["sum" if weighted else t.pooling])
            for t in schema.pooled_tables if t.weighted == weighted]


def sequence_configs(schema: Schema) -> list[EmbeddingConfig]:
    """One TorchRec table config per table of sequence features (looked up unpooled)."""
    return [EmbeddingConfig(**_table_arguments(t)) for t in schema.sequence_tables]
