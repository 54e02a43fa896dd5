"""Masked per-task losses against hand-computed values."""

from __future__ import annotations

import math

import torch

from lightning_mtr.schema import Task
from lightning_mtr.tasks import masked_task_losses, weighted_total

TASKS = [Task("ctr", "click"), Task("cvr", "conversion", sample_space="click == 1", weight=2.0),
         Task("watch", "seconds", kind="regression", weight=0.5)]


def _bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_masked_losses_match_hand_computation():
    logits = {"ctr": torch.tensor([0.0, 2.0, -1.0]), "cvr": torch.tensor([1.0, -3.0, 0.5]),
              "watch": torch.tensor([1.0, 2.0, 3.0])}
    labels = {"ctr": torch.tensor([1.0, 0.0, 1.0]), "cvr": torch.tensor([1.0, 0.0, 0.0]),
              "watch": torch.tensor([0.0, 2.0, 5.0])}
    masks = {"ctr": torch.tensor([True, True, True]), "cvr": torch.tensor([True, False, True]),
             "watch": torch.tensor([False, True, True])}
    losses = masked_task_losses(logits, labels, masks, TASKS)
    expected_ctr = (_bce(0, 1) + _bce(2, 0) + _bce(-1, 1)) / 3
    expected_cvr = (_bce(1, 1) + _bce(0.5, 0)) / 2  # row 1 is outside click == 1
    expected_watch = (0.0 + 4.0) / 2
    assert math.isclose(losses["ctr"].item(), expected_ctr, rel_tol=1e-6)
    assert math.isclose(losses["cvr"].item(), expected_cvr, rel_tol=1e-6)
    assert math.isclose(losses["watch"].item(), expected_watch, rel_tol=1e-6)
    total = weighted_total(losses, {t.name: t.weight for t in TASKS})
    assert math.isclose(total.item(), expected_ctr + 2 * expected_cvr + 0.5 * expected_watch, rel_tol=1e-6)


def test_empty_sample_space_contributes_zero_not_nan():
    logits = {t.name: torch.tensor([0.3, -0.2], requires_grad=True) for t in TASKS}
    labels = {t.name: torch.tensor([1.0, 0.0]) for t in TASKS}
    masks = {"ctr": torch.tensor([True, True]), "cvr": torch.tensor([False, False]),
             "watch": torch.tensor([False, False])}
    losses = masked_task_losses(logits, labels, masks, TASKS)
    assert losses["cvr"].item() == 0.0 and losses["watch"].item() == 0.0
    weighted_total(losses, {t.name: t.weight for t in TASKS}).backward()
    assert torch.equal(logits["cvr"].grad, torch.zeros(2))
    assert torch.isfinite(logits["ctr"].grad).all()


def test_model_computed_row_losses_replace_the_default_and_are_still_masked():
    """ESMM-style models hand in per-row losses for some tasks; masks and means still apply."""
    logits = {t.name: torch.zeros(3) for t in TASKS}
    labels = {t.name: torch.zeros(3) for t in TASKS}
    masks = {"ctr": torch.tensor([True, True, False]), "cvr": torch.tensor([True, False, True]),
             "watch": torch.tensor([True, True, True])}
    given = {"ctr": torch.tensor([1.0, 3.0, 100.0])}
    losses = masked_task_losses(logits, labels, masks, TASKS, given)
    assert losses["ctr"].item() == 2.0  # the masked-out 100 is ignored
    assert math.isclose(losses["cvr"].item(), math.log(2), rel_tol=1e-6)  # default BCE at logit 0
    assert losses["watch"].item() == 0.0
