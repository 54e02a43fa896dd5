"""Small builders shared by the tests."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from lightning_mtr.schema import Schema


ESMM_TASKS = ({"name": "ctr", "label": "click"},
              {"name": "cvr", "label": "conversion", "sample_space": "click == 1", "weight": 0},
              {"name": "ctcvr", "label": "click * conversion"})
ESM2_TASKS = ({"name": "ctr", "label": "click"}, {"name": "ctavr", "label": "click * daction"},
              {"name": "ctcvr", "label": "click * conversion"},
              {"name": "cvr", "label": "conversion", "sample_space": "click == 1", "weight": 0})


def tiny_schema(num_dense: int = 3, tasks: tuple[str | dict, ...] = ("ctr", "cvr")) -> Schema:
    """Three sparse features (two sharing a table) and ``num_dense`` dense ones; tasks by name or full dict."""
    return Schema.from_dict({
        "sparse": [
            {"name": "user", "num_embeddings": 50, "embedding_dim": 4},
            {"name": "item", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "multi_valued": True},
            {"name": "item_last", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "table": "item"},
        ],
        "dense": [{"name": f"d{i}"} for i in range(num_dense)],
        "tasks": [task if isinstance(task, dict) else {"name": task, "label": task} for task in tasks],
    })


def random_inputs(schema: Schema, batch: int, seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(schema.sparse) * batch,), generator=generator)
    lengths[:batch] = 1
    sizes = [f.num_embeddings for f in schema.sparse for _ in range(batch)]
    values = torch.cat([torch.randint(0, size, (int(n),), generator=generator) for size, n in zip(sizes, lengths)])
    sparse = KeyedJaggedTensor(keys=[f.name for f in schema.sparse], values=values, lengths=lengths)
    return torch.randn(batch, len(schema.dense), generator=generator), sparse
