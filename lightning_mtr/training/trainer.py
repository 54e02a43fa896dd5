"""The Trainer ``lightning-mtr`` builds: Lightning's, with the process set up for training fast on CPU."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT

from lightning_mtr.training.heap import keep_freed_memory
from lightning_mtr.training.precision import resolve


class Trainer(L.Trainer):
    """Lightning's Trainer, whose ``precision`` may also be ``auto``: ``bf16-mixed`` where the device has
    bf16 units, ``32-true`` elsewhere (:func:`~lightning_mtr.training.precision.resolve`); building one keeps
    freed memory in the process for the next step (:mod:`~lightning_mtr.training.heap`)."""

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any):
        keep_freed_memory()
        super().__init__(precision=resolve(precision, kwargs.get("accelerator", "auto")), **kwargs)
