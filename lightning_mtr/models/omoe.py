"""One-gate Mixture-of-Experts (OMoE), the baseline of the MMoE paper (Ma et al., KDD 2018):
a single softmax gate, shared by every task, mixes the experts."""

from __future__ import annotations

from lightning_mtr.models.mmoe import MMoE


class OMoE(MMoE):
    """MMoE with one gate for all tasks; same arguments as :class:`MMoE`."""

    one_gate = True
