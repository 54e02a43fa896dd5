"""The training strategies and everything that knows about process groups: the TorchRec
strategy, the single-process fast path sharing its checkpoints, the sharding planner, sharded
checkpoints. Nothing else in the package imports ``torch.distributed``."""

from lightning_mtr.training.distributed.planning import Cluster, TableConstraints
from lightning_mtr.training.distributed.single import SingleProcessStrategy
from lightning_mtr.training.distributed.strategy import TorchRecStrategy

__all__ = ["Cluster", "SingleProcessStrategy", "TableConstraints", "TorchRecStrategy"]
