"""The typed seam between the data pipeline and the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass(frozen=True)
class RowSource:
    """Where a batch's rows came from, for messages: ``rows`` of the batch's rows are rows of
    ``file`` numbered ``first..last`` (0-based, inclusive; the batch's first row among them),
    ``elsewhere`` came from other files (the shuffle buffer mixes rows and files)."""

    file: str
    first: int
    last: int
    rows: int
    elsewhere: int = 0

    def __str__(self) -> str:
        contiguous = self.rows == self.last - self.first + 1
        span = f"rows {self.first}-{self.last}" if contiguous else \
            f"{self.rows} rows between rows {self.first} and {self.last}"
        other = f" (+{self.elsewhere} rows from other files)" if self.elsewhere else ""
        return f"{self.file} {span}{other}"


@dataclass
class Batch(Pipelineable):
    """One mini-batch of B rows.

    Attributes:
        dense: ``[B, F_dense]`` float32, already transformed (log1p / standardised).
        sparse: KJT with one key per sparse feature, ``stride() == B``.
        labels: task -> ``[B]`` float32 targets (0/1 for binary tasks).
        masks: task -> ``[B]`` bool, True where the row is inside the task's sample space.
        extras: column -> ``[B]`` values carried through untouched (e.g. ids for ``predict``): a
            tensor, or for text an Arrow string array, which stays on the CPU.
        groups: column -> ``[B]`` int64 ids grouping rows for ranking losses and per-group
            metrics (a request id, a user id).
        source: the file and rows it was read from (None for batches built in memory).
        row_weights: task -> ``[B]`` float32 per-row loss weights ``n_i`` of point-wise ranking
            tasks (0 outside the task's sample space).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor | pa.Array] = field(default_factory=dict)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    row_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    source: RowSource | None = None

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on ``device``, or this batch itself when it is there already (so work started on
        its features before the move, e.g. the sharded input distribution, still finds them)."""
        target = torch.device(device)
        here = self.dense.device
        if here == target or (target.index is None and here.type == target.type):
            return self
        move = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            dense=move(self.dense),
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            labels={k: move(v) for k, v in self.labels.items()},
            masks={k: move(v) for k, v in self.masks.items()},
            extras={k: move(v) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
            groups={k: move(v) for k, v in self.groups.items()},
            row_weights={k: move(v) for k, v in self.row_weights.items()},
            source=self.source,
        )

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            masks={k: v.pin_memory() for k, v in self.masks.items()},
            extras={k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
            groups={k: v.pin_memory() for k, v in self.groups.items()},
            row_weights={k: v.pin_memory() for k, v in self.row_weights.items()},
            source=self.source,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        tensors = [v for v in self.extras.values() if isinstance(v, torch.Tensor)]
        for tensor in (self.dense, *self.labels.values(), *self.masks.values(), *tensors,
                       *self.groups.values(), *self.row_weights.values()):
            tensor.record_stream(stream)
        self.sparse.record_stream(stream)


def output_column(values: torch.Tensor | pa.Array) -> np.ndarray | pa.Array:
    """A prediction or extra as a column of an output file: tensors to numpy, Arrow arrays as they are."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
