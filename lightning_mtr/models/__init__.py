"""The model zoo: one paper per file, registered here by name.

Every model is a plain single-device ``nn.Module`` whose first argument is the
:class:`~lightning_mtr.schema.Schema` and whose ``forward(dense, sparse)`` returns
``{task: logits [B]}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mtr.models.aitm import AITM
from lightning_mtr.models.dupn import DUPN
from lightning_mtr.models.esm2 import ESM2
from lightning_mtr.models.esmm import ESMM
from lightning_mtr.models.mmoe import MMoE
from lightning_mtr.models.nfwfm import NFwFM
from lightning_mtr.models.omoe import OMoE
from lightning_mtr.models.ple import PLE
from lightning_mtr.models.shared_bottom import SharedBottom
from lightning_mtr.models.youtube import YouTubeRanker
from lightning_mtr.schema import Schema

MODELS: dict[str, type[nn.Module]] = {
    "shared_bottom": SharedBottom,
    "omoe": OMoE,
    "mmoe": MMoE,
    "ple": PLE,
    "youtube": YouTubeRanker,
    "esmm": ESMM,
    "esm2": ESM2,
    "aitm": AITM,
    "nfwfm": NFwFM,
    "dupn": DUPN,
}


def build_model(name: str, schema: Schema, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](schema, **kwargs)


__all__ = ["AITM", "DUPN", "ESM2", "ESMM", "MODELS", "MMoE", "NFwFM", "OMoE", "PLE", "SharedBottom", "YouTubeRanker",
           "build_model"]
