"""The plain-PyTorch baseline: MMoE and ESMM written the way DeepCTR-Torch and torch-rechub write them.

One ``nn.Embedding`` per sparse feature, experts as a Python list of ``nn.Sequential``, every
parameter (tables included) in one default ``torch.optim.Adam``, BCE losses on sigmoid outputs,
the log read into tensors up front and a plain loop over shuffled mini-batches. Same shapes,
rows, batch size and threads as :mod:`lightning_mtr.benchmarks.train`'s setups, so the ratio of
the two samples/s says what the library adds over the obvious implementation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn import functional as F

EMBEDDING_DIM = 16


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


class PlainModel(nn.Module):
    """Shared embeddings and dense input; ``forward -> {task: probability [B]}``."""

    def __init__(self, table_sizes: Sequence[int], num_dense: int):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, EMBEDDING_DIM) for n in table_sizes)
        self.input_dim = len(table_sizes) * EMBEDDING_DIM + num_dense

    def inputs(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return torch.cat([table(sparse[:, i]) for i, table in enumerate(self.embeddings)] + [dense], dim=1)


class PlainMMoE(PlainModel):
    """MMoE: experts, one softmax gate per task (``ctr``, ``ctcvr``), a tower per task."""

    tasks = ("ctr", "ctcvr")

    def __init__(self, table_sizes: Sequence[int], num_dense: int, num_experts: int = 8,
                 expert: Sequence[int] = (256, 128), tower: Sequence[int] = (64,)):
        super().__init__(table_sizes, num_dense)
        self.experts = nn.ModuleList(_mlp([self.input_dim, *expert]) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(self.input_dim, num_experts, bias=False), nn.Softmax(dim=1))
                                   for _ in self.tasks)
        self.towers = nn.ModuleList(nn.Sequential(_mlp([expert[-1], *tower]), nn.Linear(tower[-1], 1))
                                    for _ in self.tasks)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.inputs(dense, sparse)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, D]
        mixed = [(gate(x).unsqueeze(-1) * experts).sum(dim=1) for gate in self.gates]
        return {task: torch.sigmoid(tower(m).squeeze(-1)) for task, tower, m in zip(self.tasks, self.towers, mixed)}


class PlainESMM(PlainModel):
    """ESMM: a CTR and a CVR tower on the shared input; pCTCVR = pCTR * pCVR."""

    def __init__(self, table_sizes: Sequence[int], num_dense: int, tower: Sequence[int] = (256, 128)):
        super().__init__(table_sizes, num_dense)
        self.ctr = nn.Sequential(_mlp([self.input_dim, *tower]), nn.Linear(tower[-1], 1))
        self.cvr = nn.Sequential(_mlp([self.input_dim, *tower]), nn.Linear(tower[-1], 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.inputs(dense, sparse)
        ctr, cvr = torch.sigmoid(self.ctr(x).squeeze(-1)), torch.sigmoid(self.cvr(x).squeeze(-1))
        return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr}


def read_log(path: Path, sizes: dict[str, int], dense: Sequence[str],
             stats: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The whole log as tensors, as those libraries read it: the ids of each ``sizes`` column
    modulo its table size (the benchmark schema's ``out_of_range: modulo``), log1p-standardised
    dense values (with ``stats``, else the file's own mean and std), ``click`` and ``ctcvr`` labels."""
    sparse = list(sizes)
    table = pq.read_table(path, columns=[*sparse, *dense, "click", "conversion"])
    values = np.log1p(np.maximum(np.stack([table.column(c).to_numpy() for c in dense], axis=1), 0.0))
    mean, std = stats if stats is not None else (values.mean(axis=0), values.std(axis=0) + 1e-12)
    click = table.column("click").to_numpy()
    ids = np.stack([table.column(c).to_numpy() % sizes[c] for c in sparse], axis=1)
    return {"sparse": torch.from_numpy(ids),
            "dense": torch.from_numpy(((values - mean) / std).astype(np.float32)),
            "click": torch.from_numpy(click.astype(np.float32)),
            "ctcvr": torch.from_numpy((click * table.column("conversion").to_numpy()).astype(np.float32)),
            "stats": (mean, std)}


def train_epoch(model: PlainModel, log: dict[str, torch.Tensor], batch_size: int, seed: int,
                precision: str = "32-true") -> tuple[float, list[float]]:
    """One shuffled epoch; returns (seconds, per-batch losses). ``bf16-mixed``: autocast, as
    those libraries' users would add it."""
    optimizer = torch.optim.Adam(model.parameters())
    order = torch.randperm(len(log["click"]), generator=torch.Generator().manual_seed(seed))
    losses = []
    model.train()
    start = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        index = order[begin:begin + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(log["dense"][index], log["sparse"][index])
        loss = (F.binary_cross_entropy(out["ctr"].float(), log["click"][index])
                + F.binary_cross_entropy(out["ctcvr"].float(), log["ctcvr"][index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - start, losses


@torch.no_grad()
def predict(model: PlainModel, log: dict[str, torch.Tensor], batch_size: int = 16384) -> dict[str, np.ndarray]:
    """``{"score_<task>": probabilities}`` in file order, the keys the benchmark's metrics read."""
    model.eval()
    batches = [model(log["dense"][i:i + batch_size], log["sparse"][i:i + batch_size])
               for i in range(0, len(log["click"]), batch_size)]
    return {f"score_{task}": torch.cat([b[task] for b in batches]).float().numpy() for task in batches[0]}
