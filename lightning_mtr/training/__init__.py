"""Training: the LightningModule and callbacks."""

from lightning_mtr.training.callbacks import ParquetPredictionWriter, TaskReport
from lightning_mtr.training.checkpointing import ModelCheckpoint
from lightning_mtr.training.module import MultiTaskModule

__all__ = ["ModelCheckpoint", "MultiTaskModule", "ParquetPredictionWriter", "TaskReport"]
