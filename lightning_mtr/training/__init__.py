"""Training: the LightningModule, the fused sparse optimizer and callbacks."""

from lightning_mtr.training.callbacks import ParquetPredictionWriter, TaskReport
from lightning_mtr.training.module import MultiTaskModule
from lightning_mtr.training.sparse import SparseOptimizer

__all__ = ["MultiTaskModule", "ParquetPredictionWriter", "SparseOptimizer", "TaskReport"]
