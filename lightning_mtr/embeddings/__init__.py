"""The embedding tables, one concern per file: ``tables.py`` (TorchRec configs from the schema),
``lookup.py`` (``FeatureInput``), ``fusing.py`` (the fused sparse optimizer of one process) and
``init.py`` (every table's initial values). Their sharding hooks import ``torchrec.distributed``,
so they live with the strategy (``lightning_mtr/training/distributed/sharding.py``)."""

from lightning_mtr.embeddings.fusing import SparseOptimizer
from lightning_mtr.embeddings.init import init_tables
from lightning_mtr.embeddings.lookup import FeatureInput

__all__ = ["FeatureInput", "SparseOptimizer", "init_tables"]
