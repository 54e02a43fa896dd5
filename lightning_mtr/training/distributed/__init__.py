"""Everything that knows about process groups: the TorchRec strategy, the sharding planner,
sharded checkpoints. Nothing else in the package imports ``torch.distributed`` but the tables'
own hooks for TorchRec's sharders (``lightning_mtr/embeddings/sharding.py``)."""

from lightning_mtr.training.distributed.planning import Cluster, TableConstraints
from lightning_mtr.training.distributed.strategy import TorchRecStrategy

__all__ = ["Cluster", "TableConstraints", "TorchRecStrategy"]
