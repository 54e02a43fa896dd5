"""Mean binary cross-entropy computed from logits."""

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor


class BinaryLogLoss(torchmetrics.Metric):
    """Mean binary cross-entropy over all rows seen, from logits.

    Working from logits (``binary_cross_entropy_with_logits``) keeps the loss
    finite for saturated predictions, where ``log(sigmoid(x))`` would give
    ``-inf``. The sum is kept in float64 so millions of rows add up without
    float32 round-off. Returns NaN before any row is seen.

    Shapes: ``update(logits, target)`` takes two tensors of the same shape
    (usually ``[B]``); ``target`` holds labels in [0, 1].
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.shape != target.shape:
            raise ValueError(f"logits and target differ in shape: {tuple(logits.shape)} vs {tuple(target.shape)}")
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
        self.loss_sum += loss.double()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return (self.loss_sum / self.count).float()
