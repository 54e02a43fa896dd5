"""Models are built on the meta device (no memory, even for billion-row tables) and
materialised where they will run."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from lightning_mtr.interfaces import Resettable


def _own_meta(module: nn.Module) -> bool:
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return any(t is not None and t.is_meta for t in tensors)


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Allocate every meta tensor outside the embedding tables on ``device`` and initialise it with
    ``reset_parameters`` (:class:`~lightning_mtr.interfaces.Resettable`).

    Embedding tables stay on meta: the fused or sharded collection that replaces them allocates
    its own, and ``lightning_mtr.embeddings.init.init_tables`` allocates the ones left plain and
    draws them all (an ``nn.Embedding``'s own reset would draw N(0, 1), hundreds of times too
    large; allocated here, a sequence table was held whole on every rank before sharding). Every
    other module that owns parameters is reset by its own ``reset_parameters`` or, lacking one,
    by its nearest ancestor's (e.g. a ``ParameterList`` inside an expert bank). Buffers must be
    refilled by their owner's own ``reset_parameters``.
    """
    tables = [m for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    skipped = {id(m) for table in tables for m in table.modules()}
    named = dict(module.named_modules())
    owners = {name: m for name, m in named.items() if id(m) not in skipped and _own_meta(m)}
    buffers = [name for name, m in owners.items()
               if any(b is not None and b.is_meta for b in m._buffers.values()) and not isinstance(m, Resettable)]
    if buffers:
        raise TypeError(f"cannot refill the buffers of {buffers} after building on the meta device: give the module "
                        "a reset_parameters() method")
    resets: dict[str, nn.Module] = {}
    for name, owner in owners.items():
        owner.to_empty(device=device, recurse=False)
        resetter = _nearest_resetter(name, named)
        if resetter is None:
            raise TypeError(f"cannot initialise {name or type(owner).__name__!r} after building on the meta device: "
                            "give the module (or a parent) a reset_parameters() method")
        resets[resetter] = named[resetter]
    for resetter in resets.values():
        resetter.reset_parameters()


def _nearest_resetter(name: str, named: dict[str, nn.Module]) -> str | None:
    """``name`` itself or its closest ancestor with ``reset_parameters``."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        candidate = ".".join(parts[:depth])
        if isinstance(named[candidate], Resettable):
            return candidate
    return None
