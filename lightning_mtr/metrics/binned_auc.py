"""Streaming binary AUROC over a fixed histogram of scores: O(rows) time, O(bins) memory."""

import torch
import torchmetrics
from torch import Tensor


class BinnedBinaryAUROC(torchmetrics.Metric):
    """Binary AUROC from per-class histograms of the predicted probability.

    torchmetrics' exact ``BinaryAUROC`` keeps every score (memory and all-gather
    grow with the rows of an epoch); its ``thresholds=N`` mode costs O(rows * N).
    This metric drops each score into one of ``num_bins`` uniform bins over
    [0, 1] and keeps two int64 histograms, ``pos`` and ``neg``, summed across
    processes by torchmetrics. Bin ``i`` holds scores in ``[i / B, (i + 1) / B)``
    and the last bin also holds 1.0.

    ``compute()`` is the Mann-Whitney statistic over the bins: a positive beats
    every negative in a lower bin and half of each negative in its own bin
    (the trapezoid rule). Bin order is score order, so only the pairs that share
    a bin can be miscounted, each by at most 1/2:

        |AUC_binned - AUC_exact| <= 0.5 * sum_i pos[i] * neg[i] / (P * N)

    It is exact when each bin holds one distinct score. With 65536 bins and 1M
    uniform scores the bound is about 1e-5 (tests/test_metrics.py checks it).
    Scores crowded in a narrow range (say CTR predictions around 0.02) share
    bins more often; the bound above tells how much that costs.

    With fewer than two classes seen the AUC is undefined: ``compute()``
    returns NaN, as the exact ``LogitBinaryAUROC`` does, so both AUC modes agree.

    Args:
        num_bins: number of uniform bins over [0, 1].
        from_logits: inputs are logits; apply ``sigmoid`` before binning.
            Otherwise they must be probabilities in [0, 1].
        validate_args: check the probability range and that targets are 0/1.
            Each check synchronises with the GPU, like torchmetrics' own.

    Shapes: ``update(preds, target)`` takes two tensors of the same shape
    (usually ``[B]``); ``target`` holds 0/1 as bool, int or float.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_bins: int = 65536, from_logits: bool = False, validate_args: bool = True, **kwargs):
        super().__init__(**kwargs)
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.from_logits = from_logits
        self.validate_args = validate_args
        self.add_state("pos", torch.zeros(num_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("neg", torch.zeros(num_bins, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds and target differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
        if not preds.is_floating_point():
            raise ValueError(f"preds must be a floating point tensor, got {preds.dtype}")
        if preds.numel() == 0:
            return
        probs = preds.flatten().float()
        if self.from_logits:
            probs = probs.sigmoid()
        target = target.flatten()
        if self.validate_args:
            self._check_values(probs, target)
        # Integer scaling + index_add_ measured 4x faster than bucketize + bincount on
        # 4096-row CPU batches (no per-batch histogram allocation), and equal at 2M rows.
        bins = (probs * self.num_bins).long().clamp_(max=self.num_bins - 1)
        is_positive = target.long()
        self.pos.index_add_(0, bins, is_positive)
        self.neg.index_add_(0, bins, 1 - is_positive)

    @staticmethod
    def _check_values(probs: Tensor, target: Tensor) -> None:
        lowest, highest = torch.aminmax(probs)
        if not bool((lowest >= 0) & (highest <= 1)):  # NaN fails this too
            raise ValueError(
                f"preds must be probabilities in [0, 1] (pass from_logits=True for logits), "
                f"got values in [{lowest.item()}, {highest.item()}]"
            )
        if not bool(((target == 0) | (target == 1)).all()):
            raise ValueError("target must hold only 0 and 1")

    def compute(self) -> Tensor:
        pos, neg = self.pos.double(), self.neg.double()
        num_pos, num_neg = pos.sum(), neg.sum()
        if num_pos == 0 or num_neg == 0:
            return torch.full((), float("nan"), dtype=torch.float32, device=pos.device)
        neg_in_lower_bins = torch.cumsum(neg, 0) - neg
        wins = (pos * (neg_in_lower_bins + 0.5 * neg)).sum()
        return (wins / (num_pos * num_neg)).float()
