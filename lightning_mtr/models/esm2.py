"""ESM2 (Wen et al., SIGIR 2020, "Entire Space Multi-Task Modeling via Post-Click Behavior
Decomposition for Conversion Rate Prediction").

Four heads on shared embeddings: Y1 = P(click | impression), Y2 = P(DAction | click)
(add-to-cart or wishlist), Y3 = P(buy | DAction), Y4 = P(buy | OAction: a click without
DAction). Derived: pCTR = Y1, pCTAVR = Y1*Y2, pCVR = (1-Y2)*Y4 + Y2*Y3 and
pCTCVR = Y1*pCVR. The loss is a weighted sum of the BCE losses of pCTR, pCTAVR and
pCTCVR over all impressions (weights: the schema's task weights); pCVR is evaluated on
clicked rows and never trained directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.kernels.prob_chain import probability_chain
from lightning_mtr.nn import BottomFactory, FeatureInput, SharedInput, TaskTowers
from lightning_mtr.schema import Schema
from lightning_mtr.tasks.chain import chain_targets, check_chain_tasks

_HEADS = ("y1_click", "y2_daction", "y3_buy_after_daction", "y4_buy_after_oaction")


class ESM2(nn.Module):
    """``features -> bottom -> 4 heads (Y1..Y4) -> (pCTR, pCTAVR, pCTCVR, pCVR)``.

    Args:
        schema: features and the tasks ctr, ctavr, ctcvr, cvr (names configurable below).
        tower: hidden sizes of each of the four heads.
        bottom: what the heads share beyond embeddings (``SharedInput``, ``SharedMLP``,
            ``MixtureBottom``).
        dropout: dropout in the heads.
        task_names: names of the (ctr, ctavr, ctcvr, cvr) tasks in the schema.
        chain_backend: ``auto``, ``torch`` or ``triton`` for the fused chain op.
    """

    def __init__(self, schema: Schema, tower: Sequence[int] = (256, 128), bottom: BottomFactory = SharedInput,
                 dropout: float = 0.0, task_names: tuple[str, str, str, str] = ("ctr", "ctavr", "ctcvr", "cvr"),
                 chain_backend: str = "auto"):
        super().__init__()
        ctr, ctavr, ctcvr, cvr = task_names
        check_chain_tasks(schema, supervised=(ctr, ctavr, ctcvr), unsupervised=(cvr,), model="ESM2")
        self.task_names = task_names
        self.tasks = schema.task_names
        self.chain_backend = chain_backend
        self.features = FeatureInput(schema)
        self.bottom = bottom(self.features.output_dim, len(_HEADS))
        self.heads = TaskTowers(_HEADS, self.bottom.output_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.forward_with_losses(dense, sparse, None)[0]

    def forward_with_losses(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                            labels: Mapping[str, torch.Tensor] | None):
        ctr, ctavr, ctcvr, cvr = self.task_names
        shared = self.bottom(self.features(dense, sparse))  # [B, 4, D]
        heads = self.heads({name: shared[:, h] for h, name in enumerate(_HEADS)})
        head_logits = torch.stack([heads[name] for name in _HEADS], dim=1)  # [B, 4]
        targets = chain_targets(labels, (ctr, ctavr, ctcvr), head_logits)
        chain, losses = probability_chain(head_logits, targets, "esm2", backend=self.chain_backend)
        logits = {ctr: chain[:, 0], ctavr: chain[:, 1], ctcvr: chain[:, 2], cvr: chain[:, 3]}
        return logits, {ctr: losses[:, 0], ctavr: losses[:, 1], ctcvr: losses[:, 2]}
