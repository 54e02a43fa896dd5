"""Data: Parquet/CSV logs -> validated, shuffled :class:`Batch` streams (and synthetic logs)."""

from lightning_mtr.data.batch import Batch
from lightning_mtr.data.encode import BatchEncoder, DataError, DenseStats

__all__ = ["Batch", "BatchEncoder", "DataError", "DenseStats"]
