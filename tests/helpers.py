"""Small builders shared by the tests."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from lightning_mtr.models import MMoE
from lightning_mtr.schema import Schema
from lightning_mtr.training.preemption import Preemption


ESMM_TASKS = ({"name": "ctr", "label": "click"},
              {"name": "cvr", "label": "conversion", "sample_space": "click == 1", "weight": 0},
              {"name": "ctcvr", "label": "click * conversion"})
ESM2_TASKS = ({"name": "ctr", "label": "click"}, {"name": "ctavr", "label": "click * daction"},
              {"name": "ctcvr", "label": "click * conversion"},
              {"name": "cvr", "label": "conversion", "sample_space": "click == 1", "weight": 0})


SEQUENCES = ({"name": "hist_item", "num_embeddings": 30, "embedding_dim": 4, "sequence": True, "max_length": 3},
             {"name": "hist_type", "num_embeddings": 3, "embedding_dim": 4, "sequence": True, "max_length": 3})


def tiny_schema(num_dense: int = 3, tasks: tuple[str | dict, ...] = ("ctr", "cvr"), sequences: bool = False) -> Schema:
    """Three sparse features (two sharing a table) and ``num_dense`` dense ones; tasks by name or
    full dict; with ``sequences``, a behaviour sequence too (``hist_item``, ``hist_type``)."""
    return Schema.from_dict({
        "sparse": [
            {"name": "user", "num_embeddings": 50, "embedding_dim": 4},
            {"name": "item", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "multi_valued": True},
            {"name": "item_last", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "table": "item"},
            *(SEQUENCES if sequences else ()),
        ],
        "dense": [{"name": f"d{i}"} for i in range(num_dense)],
        "tasks": [task if isinstance(task, dict) else {"name": task, "label": task} for task in tasks],
    })


def hand_logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of -[y log p + (1 - y) log(1 - p)], p = 1 / (1 + exp(-logit)), in float64."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))


def random_inputs(schema: Schema, batch: int, seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Random rows; every sequence feature of a row has one length (they describe the same behaviours)."""
    generator = torch.Generator().manual_seed(seed)
    features = schema.sparse
    lengths = torch.randint(0, 3, (len(features) * batch,), generator=generator)
    lengths[:batch] = 1
    sequences = [i for i, f in enumerate(features) if f.sequence]
    for i in sequences[1:]:
        lengths[i * batch:(i + 1) * batch] = lengths[sequences[0] * batch:(sequences[0] + 1) * batch]
    sizes = [f.num_embeddings for f in features for _ in range(batch)]
    values = torch.cat([torch.randint(0, size, (int(n),), generator=generator) for size, n in zip(sizes, lengths)])
    sparse = KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)
    return torch.randn(batch, len(schema.dense), generator=generator), sparse


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, function, args) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), NODE_RANK="0")
    torch.set_num_threads(1)
    function(rank, *args)
    import sys

    import torch.distributed as dist

    if dist.is_initialized():  # an orderly exit: gloo can abort a process that leaves a live group behind
        dist.barrier()
        dist.destroy_process_group()
    # A finished rank ends without the interpreter's finalization, where a C++ thread now and then
    # aborted it after a good run (SIGABRT; see peers.leave_process_group): its results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world_size: int, function, *args) -> None:
    """Run ``function(rank, *args)`` in ``world_size`` processes set up like ``torchrun`` does
    (Lightning then joins them instead of launching its own); ``function`` must be importable."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world_size, free_port(), function, args), nprocs=world_size, join=True)


class LossRecorder(L.Callback):
    """Each training step's returned loss, by global step (1 after the first optimizer step)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class PauseAtStep(L.Callback):
    """Holds the batch after ``step`` steps (``stage`` ``train``: the next training batch;
    ``validation``: the first validation batch; ``sanity``: the sanity check's first batch, with
    ``step`` 0) until a signal reached the process (at most
    ``timeout`` seconds), having written ``marker``: a test sends the signal when the marker
    appears, so the run stops at a known place whatever the machine's speed. With ``rank``, only
    that rank holds (the others wait for it in their next collective)."""

    def __init__(self, step: int, marker: str, stage: str = "train", timeout: float = 60.0,
                 rank: int | None = None) -> None:
        self.step, self.marker, self.stage, self.timeout, self.rank = step, marker, stage, timeout, rank

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self.stage == "train":
            self._pause(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self.stage == ("sanity" if trainer.sanity_checking else "validation"):
            self._pause(trainer)

    def _pause(self, trainer: L.Trainer) -> None:
        if self.rank not in (None, trainer.global_rank):
            return
        if trainer.global_step != self.step or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not self._signalled(trainer) and time.monotonic() < deadline:
            time.sleep(0.02)

    @staticmethod
    def _signalled(trainer: L.Trainer) -> bool:
        """Lightning's flag (one process) or the preemption callback's (several: Lightning's
        handler is not called there)."""
        return trainer.received_sigterm or any(c.received for c in trainer.callbacks if isinstance(c, Preemption))


class TextWeightMMoE(MMoE):
    """An MMoE whose required task weight is text, a bug inside a model (tests/test_quiet.py). A
    subclass of its own: ``isinstance`` against a Protocol caches its answer per class, so patching
    MMoE itself would make every later MMoE look like a ``RequiredTaskWeights``."""

    def required_task_weights(self) -> dict[str, str]:
        return {"ctr": "0"}
