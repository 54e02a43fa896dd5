"""What ``lightning-mtr`` keeps off stderr: warnings the project knows to be harmless, each by its
exact message and the reason, and tracebacks behind a one-line error. ``LMTR_DEBUG=1`` shows both.

:func:`install` runs at the start of :func:`lightning_mtr.cli.main`, so it covers every command
and every rank of a multi-process run (Lightning starts each rank with the same command line). A
warning not listed here still prints: only a message someone has read and judged goes in.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

DEBUG = "LMTR_DEBUG"

# (category, the message's start, why it is harmless); the message is matched from its start
WARNINGS = (
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated",
     "Lightning's own _pytree helper uses torch's deprecated alias; it still works on the pinned torch"),
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "the planner's default reservation on meta tensors; the sharding plan printed at start (memory.py's "
     "report) says what fits, and the offline `plan` already hides it"),
    (FutureWarning, "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead",
     "TorchRec wraps its data-parallel lookups in DDP itself; nothing of ours passes the argument"),
    (UserWarning, "Using a non-tuple sequence for multidimensional indexing is deprecated",
     "torchmetrics' gather of per-rank states; the pinned torch still indexes as before, and "
     "tests/test_metrics_distributed.py checks the gathered metrics against one process"),
    (UserWarning, "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
     "the data_parallel tables' lookup; tests/test_sharded_training.py's data_parallel case compares the "
     "updated tables with unsharded training, so its gradients are checked"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "TorchRec's sharded tables are ShardedTensors (the pinned torchrec), which DCP loads when a sharded "
     "checkpoint resumes; tests/test_sharded_training.py resumes them 1 -> 2 and 2 -> 1 processes"),
    (UserWarning, "Your `IterableDataset` has `__len__` defined",
     "Lightning's caution for any sized stream; BatchStream's length sums the shares of the DataLoader's "
     "workers (reader.py), and tests/test_data_pipeline.py checks it against what they yield"),
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to ",
     "one process saves or loads its checkpoint directory (DCP) without a process group, as intended: "
     "SingleProcessStrategy, consolidate, export; several processes always have their group first"),
)

# (logger, the message's start, why it is harmless)
LOGS = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging",
     "an advertisement for a logger lightning-mtr does not use"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both fx.symbolic_trace and torch.export",
     "a note on an API TorchRec calls; training traces nothing, and export is checked against eager"),
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor",
     "the same meta-tensor reservation as the HeuristicalStorageReservation warning above"),
    ("root", "Sharding spec not found for ",
     "TorchRec's planner, once per data_parallel table: a replicated table has no shard placement"),
    ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be ignored",
     "once per data_parallel table: a replicated table has no cache, and we set no caching params"),
)


def debugging() -> bool:
    """``LMTR_DEBUG=1``: tracebacks and every warning, for a bug report."""
    return os.environ.get(DEBUG, "") not in ("", "0")


class _Known(logging.Filter):
    """Drops a logger's records that start with one of the known messages."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install() -> None:
    """Silence :data:`WARNINGS` and :data:`LOGS` in this process, unless :func:`debugging`.
    Calling it again adds nothing."""
    if debugging():
        return
    for category, message, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)  # matched from its start
    for name in {name for name, _, _ in LOGS}:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        if not any(isinstance(f, _Known) for f in logger.filters):
            logger.addFilter(_Known(tuple(message for where, message, _ in LOGS if where == name)))
