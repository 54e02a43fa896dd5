"""ESMM (Ma et al., SIGIR 2018, "Entire Space Multi-Task Model: An Effective Approach for
Estimating Post-Click Conversion Rate").

A CTR tower and a CVR tower on shared embeddings; pCTCVR = pCTR * pCVR. Both losses are
taken over all impressions, BCE(pCTR, click) + BCE(pCTCVR, click AND conversion), and
there is no direct CVR loss: pCVR is learned through the product, on the entire space,
which removes the sample-selection bias of training CVR on clicked rows only.

Schema contract (see conf/schemas/esmm_synthetic.yaml): tasks ``ctr`` (label ``click``),
``cvr`` (label ``conversion``, ``sample_space: click == 1``, ``weight: 0``: evaluated on
clicks as in the paper, never trained directly) and ``ctcvr`` (label
``click * conversion``). A row with conversion = 1 and click = 0 (real Ali-CCP has them)
is therefore a CTCVR negative and outside the CVR space: the label expression decides,
not an accident of the data.
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


class ESMM(nn.Module):
    """``features -> bottom -> {ctr, cvr} towers -> (pCTR, pCVR, pCTCVR)``.

    ``forward`` returns logits for ``ctr``, ``cvr`` and ``ctcvr`` (the last is
    ``logit(pCTR * pCVR)``, computed in log space). ``forward_with_losses`` also returns
    the per-row chain losses from the fused probability-chain op.

    Args:
        schema: features and the tasks ctr, cvr, ctcvr (names configurable below).
        tower: hidden sizes of the CTR and CVR towers (each ends in one logit).
        bottom: what the towers share beyond embeddings: ``SharedInput`` (the paper),
            ``lightning_mtr.nn.MixtureBottom`` (an MMoE bottom) or ``SharedMLP``.
        dropout: dropout in the towers.
        task_names: names of the (ctr, cvr, ctcvr) tasks in the schema.
        chain_backend: ``auto``, ``torch`` or ``triton`` for the fused chain op.
    """

    def __init__(self, schema: Schema, tower: Sequence[int] = (256, 128), bottom: BottomFactory = SharedInput,
                 dropout: float = 0.0, task_names: tuple[str, str, str] = ("ctr", "cvr", "ctcvr"),
                 chain_backend: str = "auto"):
        super().__init__()
        ctr, cvr, ctcvr = task_names
        check_chain_tasks(schema, supervised=(ctr, ctcvr), unsupervised=(cvr,), model="ESMM")
        self.task_names = task_names
        self.tasks = schema.task_names
        self.chain_backend = chain_backend
        self.features = FeatureInput(schema)
        self.bottom = bottom(self.features.output_dim, 2)
        self.towers = TaskTowers([ctr, cvr], self.bottom.output_dim, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.forward_with_losses(dense, sparse, None)[0]

    def forward_with_losses(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                            labels: Mapping[str, torch.Tensor] | None):
        ctr, cvr, ctcvr = self.task_names
        shared = self.bottom(self.features(dense, sparse))  # [B, 2, D]
        heads = self.towers({ctr: shared[:, 0], cvr: shared[:, 1]})
        head_logits = torch.stack([heads[ctr], heads[cvr]], dim=1)  # [B, 2]
        targets = chain_targets(labels, (ctr, ctcvr), head_logits)
        chain, losses = probability_chain(head_logits, targets, "esmm", backend=self.chain_backend)
        logits = {ctr: chain[:, 0], cvr: chain[:, 1], ctcvr: chain[:, 2]}
        return logits, {ctr: losses[:, 0], ctcvr: losses[:, 1]}

