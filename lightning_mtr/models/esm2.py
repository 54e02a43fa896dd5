"""ESM2 (Wen et al., SIGIR 2020, "Entire Space Multi-Task Modeling via Post-Click Behavior
Decomposition for Conversion Rate Prediction").

Four heads on shared embeddings: Y1 = P(click | impression), Y2 = P(DAction | click)
(add-to-cart or wishlist), Y3 = P(buy | DAction), Y4 = P(buy | OAction: a click without
DAction). Derived: pCTR = Y1, pCTAVR = Y1*Y2, pCVR = (1-Y2)*Y4 + Y2*Y3 and
pCTCVR = Y1*pCVR. The loss is a weighted sum of the BCE losses of pCTR, pCTAVR and
pCTCVR over all impressions (weights: the schema's task weights); pCVR is evaluated on
clicked rows and never trained directly. A buy may follow a click without DAction, so
ctcvr is not bounded by ctavr: the labels checked while reading are ctavr <= ctr and
ctcvr <= ctr (``label_order``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mtr.kernels import Backend
from lightning_mtr.nn import BottomFactory, SharedInput
from lightning_mtr.models.chain import ProbabilityChainModel
from lightning_mtr.schema import Schema


class ESM2(ProbabilityChainModel):
    """``features -> bottom -> 4 heads (Y1..Y4) -> (pCTR, pCTAVR, pCTCVR, pCVR)``, as logits.

    Args:
        schema: features and the tasks ctr, ctavr, ctcvr, cvr (names configurable below).
        tower: hidden sizes of each of the four heads.
        bottom: what the heads share beyond embeddings (``SharedInput``, ``SharedMLP``,
            ``MixtureBottom``).
        dropout: dropout in the heads.
        task_names: the schema's names of the (ctr, ctavr, ctcvr, cvr) tasks.
        chain_backend: ``auto``, ``torch`` or ``triton`` for the fused chain op.
    """

    CHAIN = "esm2"
    HEADS = ("y1_click", "y2_daction", "y3_buy_after_daction", "y4_buy_after_oaction")
    OUTPUTS = ("ctr", "ctavr", "ctcvr", "cvr")
    SUPERVISED = ("ctr", "ctavr", "ctcvr")
    FUNNEL = (("ctr", "ctavr"), ("ctr", "ctcvr"))  # pCTAVR = Y1*Y2 <= Y1 and pCTCVR = Y1*pCVR <= Y1

    def __init__(self, schema: Schema, tower: Sequence[int] = (256, 128), bottom: BottomFactory = SharedInput,
                 dropout: float = 0.0, task_names: tuple[str, str, str, str] = ("ctr", "ctavr", "ctcvr", "cvr"),
                 chain_backend: Backend = "auto"):
        super().__init__(schema, tower, bottom, dropout, task_names, chain_backend)
