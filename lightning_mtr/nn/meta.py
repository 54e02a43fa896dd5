"""Models are built on the meta device (no memory, even for billion-row tables) and
materialised where they will run."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection


def _own_meta(module: nn.Module) -> bool:
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return any(t is not None and t.is_meta for t in tensors)


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Allocate every meta tensor on ``device`` and initialise it with ``reset_parameters``.

    Embedding tables stay on meta: the fused or sharded collection that replaces them builds
    and initialises its own (TorchRec's reset of a collection built on meta is a no-op, so
    materialising them here would leave uninitialised memory). Any other module that owns
    parameters must have ``reset_parameters``, or an ancestor that has one must cover it.
    """
    skipped = {id(m) for kept in module.modules() if isinstance(kept, EmbeddingBagCollection) for m in kept.modules()}
    owners = [(name, m) for name, m in module.named_modules() if id(m) not in skipped and _own_meta(m)]
    if not owners:
        return
    for _, owner in owners:
        owner.to_empty(device=device, recurse=False)
    covered: set[int] = set()
    for _, candidate in module.named_modules():
        if id(candidate) in skipped or id(candidate) in covered or not hasattr(candidate, "reset_parameters"):
            continue
        subtree = {id(m) for m in candidate.modules()}
        if any(id(owner) in subtree for _, owner in owners):
            candidate.reset_parameters()
            covered |= subtree
    uninitialised = [name or type(owner).__name__ for name, owner in owners if id(owner) not in covered]
    if uninitialised:
        raise TypeError(f"cannot initialise {uninitialised} after building on the meta device: give the module "
                        "(or a parent) a reset_parameters() method")
