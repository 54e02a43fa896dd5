"""ESMM (Ma et al., SIGIR 2018, "Entire Space Multi-Task Model: An Effective Approach for
Estimating Post-Click Conversion Rate").

A CTR tower and a CVR tower on shared embeddings; pCTCVR = pCTR * pCVR. Both losses are
taken over all impressions, BCE(pCTR, click) + BCE(pCTCVR, click AND conversion), and
there is no direct CVR loss: pCVR is learned through the product, on the entire space,
which removes the sample-selection bias of training CVR on clicked rows only.

Schema contract (see conf/schemas/esmm_synthetic.yaml): tasks ``ctr`` (label ``click``),
``cvr`` (label ``conversion``, ``sample_space: click == 1``: evaluated on clicks as in the
paper, never trained directly: the model sets its weight to 0, so MMoE's schema serves) and ``ctcvr`` (label
``click * conversion``). A row with conversion = 1 and click = 0 (real Ali-CCP has them)
is therefore a CTCVR negative and outside the CVR space: the label expression decides,
not an accident of the data. A ctcvr label above the ctr label (e.g. ``label: conversion``)
stops the run while the data is read (``label_order``): pCTCVR <= pCTR could never fit it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mtr.kernels import Backend
from lightning_mtr.nn import BottomFactory, SharedInput
from lightning_mtr.models.chain import ProbabilityChainModel
from lightning_mtr.schema import Schema


class ESMM(ProbabilityChainModel):
    """``features -> bottom -> {ctr, cvr} towers -> (pCTR, pCVR, pCTCVR)``, as logits.

    Args:
        schema: features and the tasks ctr, cvr, ctcvr (names configurable below).
        tower: hidden sizes of the CTR and CVR towers (each ends in one logit).
        bottom: what the towers share beyond embeddings: ``SharedInput`` (the paper),
            ``lightning_mtr.nn.MixtureBottom`` (an MMoE bottom) or ``SharedMLP``.
        dropout: dropout in the towers.
        task_names: the schema's names of the (ctr, cvr, ctcvr) tasks.
        chain_backend: ``auto``, ``torch`` or ``triton`` for the fused chain op.
    """

    CHAIN = "esmm"
    HEADS = ("ctr", "cvr")
    OUTPUTS = ("ctr", "cvr", "ctcvr")
    SUPERVISED = ("ctr", "ctcvr")
    FUNNEL = (("ctr", "ctcvr"),)

    def __init__(self, schema: Schema, tower: Sequence[int] = (256, 128), bottom: BottomFactory = SharedInput,
                 dropout: float = 0.0, task_names: tuple[str, str, str] = ("ctr", "cvr", "ctcvr"),
                 chain_backend: Backend = "auto"):
        super().__init__(schema, tower, bottom, dropout, task_names, chain_backend)
