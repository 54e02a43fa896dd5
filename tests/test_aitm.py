"""AITM against its paper: information flows only down the funnel, the AIT attention is a softmax
over exactly (transferred, own), and the loss is ``L_ce + alpha L_lc`` under any task weighting."""

from __future__ import annotations

import math

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagCollection

from helpers import random_inputs, tiny_schema
from lightning_mtr.data.batch import Batch
from lightning_mtr.models.aitm import AITM
from lightning_mtr.nn.ait import AdaptiveInformationTransfer
from lightning_mtr.nn.meta import materialize
from lightning_mtr.schema import Schema
from lightning_mtr.tasks.weighting import UncertaintyWeights
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy

FUNNEL = ("ctr", "ctcvr", "ctpay")  # three steps, so z_3 reads z_2, which itself read z_1


def _model(funnel=FUNNEL, **kwargs) -> tuple[Schema, AITM]:
    torch.manual_seed(0)
    schema = tiny_schema(tasks=funnel)
    return schema, AITM(schema, **{"tower": [8], "ait_dim": 4, **kwargs}).eval()


def _perturb(*modules) -> None:
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))


def _labels(rows: int, funnel=FUNNEL) -> dict[str, torch.Tensor]:
    """Nested funnel labels: each step can only be 1 where the step before it is."""
    generator = torch.Generator().manual_seed(1)
    labels, previous = {}, torch.ones(rows)
    for task in funnel:
        previous = labels[task] = previous * (torch.rand(rows, generator=generator) < 0.5).float()
    return labels


@pytest.mark.parametrize("batch", [1, 7])
def test_one_logit_per_task_and_row(batch):
    schema, model = _model()
    dense, sparse = random_inputs(schema, batch)
    logits, given, extra = model.forward_with_losses(dense, sparse, _labels(batch))
    assert list(logits) == list(FUNNEL) and given == {} and list(extra) == ["calibrator"]
    for task in FUNNEL:
        assert logits[task].shape == (batch,) and torch.isfinite(logits[task]).all()
    assert extra["calibrator"].shape == () and torch.isfinite(extra["calibrator"])
    torch.testing.assert_close(model.forward_with_losses(dense, sparse, None)[2], extra, msg="needs no labels")


def test_first_task_ignores_every_later_task():
    schema, model = _model()
    inputs = random_inputs(schema, 16)
    before = model(*inputs)
    _perturb(*(part[task] for task in FUNNEL[1:] for part in (model.towers, model.transfers, model.heads.towers)))
    after = model(*inputs)
    torch.testing.assert_close(after["ctr"], before["ctr"], rtol=0, atol=0)
    assert not torch.allclose(after["ctcvr"], before["ctcvr"])


def test_each_task_reads_the_task_before_it_and_nothing_after():
    schema, model = _model()
    inputs = random_inputs(schema, 16)
    before = model(*inputs)
    _perturb(model.towers["ctr"])  # q_1 -> z_1 -> p_1 -> z_2 -> p_2 -> z_3
    after = model(*inputs)
    for task in FUNNEL:
        assert not torch.allclose(after[task], before[task]), task
    # z_3 reads z_2 = AIT(p_1, q_2), not task 2's tower q_2 alone: step 2's attention moves task 3
    _perturb(model.transfers["ctcvr"])
    moved = model(*inputs)
    torch.testing.assert_close(moved["ctr"], after["ctr"], rtol=0, atol=0)
    assert not torch.allclose(moved["ctpay"], after["ctpay"])
    _perturb(model.towers["ctpay"], model.transfers["ctpay"], model.heads.towers["ctpay"])
    last = model(*inputs)
    for task in FUNNEL[:2]:
        torch.testing.assert_close(last[task], moved[task], rtol=0, atol=0)


def test_funnel_order_is_the_constructor_argument():
    """``tasks`` decides who reads whom: reversed, ctcvr is first and ignores ctr."""
    schema, model = _model(funnel=("ctr", "ctcvr"), tasks=["ctcvr", "ctr"])
    assert model.funnel == ["ctcvr", "ctr"] and list(model.transfers) == ["ctr"]
    assert model.tasks == ["ctr", "ctcvr"], "the schema's task list, as the trainer expects"
    inputs = random_inputs(schema, 8)
    before = model(*inputs)
    _perturb(model.towers["ctr"])
    torch.testing.assert_close(model(*inputs)["ctcvr"], before["ctcvr"], rtol=0, atol=0)


def test_ait_weights_are_a_softmax_over_transferred_and_own_by_hand():
    ait = AdaptiveInformationTransfer(2)
    with torch.no_grad():
        ait.transfer[0].weight.copy_(torch.eye(2))  # g(z) = relu(z)
        ait.transfer[0].bias.zero_()
        ait.query.weight.copy_(torch.eye(2))
        ait.key.weight.copy_(torch.eye(2))  # score(u) = |u|^2 / sqrt(2)
        ait.value.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    previous = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    own = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    z, w = ait.attend(previous, own)
    assert w.shape == (2, 2)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    # row 0: p = (1, 2), |p|^2 = 5; q = (3, 0), |q|^2 = 9
    w_p = 1 / (1 + math.exp((9 - 5) / math.sqrt(2)))
    # row 1: p = relu(-1, 3) = (0, 3), |p|^2 = 9; q = (0, 1), |q|^2 = 1
    w_p1 = 1 / (1 + math.exp((1 - 9) / math.sqrt(2)))
    torch.testing.assert_close(w, torch.tensor([[w_p, 1 - w_p], [w_p1, 1 - w_p1]]))
    expected = torch.tensor([[w_p * 1 + (1 - w_p) * 3, w_p * 4 + (1 - w_p) * 0],  # h3(p) = (1, 4), h3(q) = (3, 0)
                             [0.0, w_p1 * 6 + (1 - w_p1) * 2]])  # h3(p) = (0, 6), h3(q) = (0, 2)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(ait(previous, own), z)


def _set_logits(model: AITM, values: dict[str, float | list[float]]) -> None:
    """Zero output weights, so the logits are exactly these: one number for every row (the bias),
    or one per row (a zero bias plus a forward hook adding the rows' logits, so gradients still
    reach the bias). Replaces any per-row logits set before."""
    with torch.no_grad():
        for task, value in values.items():
            layer = model.heads.towers[task][-1]
            if getattr(layer, "_row_logits", None) is not None:
                layer._row_logits.remove()
            layer._row_logits = None
            layer.weight.zero_()
            if isinstance(value, (int, float)):
                layer.bias.fill_(value)
            else:
                layer.bias.zero_()
                rows = torch.tensor(value, dtype=torch.float64)
                layer._row_logits = layer.register_forward_hook(
                    lambda module, args, output, rows=rows: output + rows.to(output)[:, None])


def test_calibrator_is_alpha_times_the_excess_over_the_step_before():
    """``alpha L_lc = alpha / N sum_rows sum_{t>=2} max(p_t - p_{t-1}, 0)``: the max per row, then
    the mean over rows (not the max of the mean difference, which rows that differ tell apart)."""
    schema, model = _model(alpha=0.6)
    inputs = random_inputs(schema, 6)
    # p = 0.5, 0.75, 0.25: ctcvr exceeds ctr by 0.25 on every row, ctpay is below ctcvr
    _set_logits(model, {"ctr": 0.0, "ctcvr": math.log(3), "ctpay": -math.log(3)})
    _, given, extra = model.forward_with_losses(*inputs, _labels(6))
    assert given == {}, "the task losses are the trainer's BCE"
    torch.testing.assert_close(extra["calibrator"], torch.tensor(0.6 * 0.25))
    _set_logits(model, {"ctr": 1.0, "ctcvr": 1.0, "ctpay": 1.0})  # equal probabilities: none
    assert model.forward_with_losses(*inputs, _labels(6))[2]["calibrator"].item() == 0.0
    # p = 0.5, 0.75, 0.9: both later steps exceed the one before, by 0.25 and 0.15
    _set_logits(model, {"ctr": 0.0, "ctcvr": math.log(3), "ctpay": math.log(9)})
    torch.testing.assert_close(model.forward_with_losses(*inputs, _labels(6))[2]["calibrator"],
                               torch.tensor(0.6 * (0.25 + 0.15)))
    # Rows that differ. p_ctr = 0.5; p_ctcvr = 0.7 on rows 0-2 and 0.3 on rows 3-5, so
    # p_ctcvr - p_ctr = +0.2, +0.2, +0.2, -0.2, -0.2, -0.2; p_ctpay = 0.1, below ctcvr on every row
    # (-0.6 or -0.2). Per row: (3 * 0.2 + 3 * 0 + 0) / 6 = 0.1, so alpha L_lc = 0.6 * 0.1 = 0.06;
    # the max of the mean difference would be 0.6 * (max(0, 0) + max(-0.4, 0)) = 0.
    odds = math.log(0.7 / 0.3)
    _set_logits(model, {"ctr": 0.0, "ctcvr": [odds] * 3 + [-odds] * 3, "ctpay": -math.log(9)})
    torch.testing.assert_close(model.forward_with_losses(*inputs, _labels(6))[2]["calibrator"],
                               torch.tensor(0.6 * 0.1))
    # Rows that differ on every step. p_ctr = 0.5; p_ctcvr = 0.75 on rows 0-3 and 0.25 on rows 4-5
    # (+0.25 x4, -0.25 x2); p_ctpay = 0.9 on row 0 and 0.1 elsewhere (+0.15; -0.65 x3; -0.15 x2).
    # Per row: 4 * 0.25 / 6 + 0.15 / 6 = 1/6 + 0.025, so alpha L_lc = 0.6 * (1/6 + 0.025) = 0.115;
    # the max of the mean would be 0.6 * (max(0.5 / 6, 0) + max(-2.1 / 6, 0)) = 0.6 / 12 = 0.05.
    _set_logits(model, {"ctr": 0.0, "ctcvr": [math.log(3)] * 4 + [-math.log(3)] * 2,
                        "ctpay": [math.log(9)] + [-math.log(9)] * 5})
    torch.testing.assert_close(model.forward_with_losses(*inputs, _labels(6))[2]["calibrator"],
                               torch.tensor(0.6 * (1 / 6 + 0.025)))


def test_calibrator_pushes_the_later_step_down_and_the_earlier_up():
    schema, model = _model(funnel=("ctr", "ctcvr"), alpha=1.0)
    _set_logits(model, {"ctr": -1.0, "ctcvr": 1.0})
    _, _, extra = model.forward_with_losses(*random_inputs(schema, 4), _labels(4, ("ctr", "ctcvr")))
    extra["calibrator"].backward()
    assert model.heads.towers["ctcvr"][-1].bias.grad > 0
    assert model.heads.towers["ctr"][-1].bias.grad < 0


def test_gradient_reaches_every_parameter():
    schema, model = _model()
    model.train()
    dense, sparse = random_inputs(schema, 256)  # enough rows that no small ReLU layer starts all dead
    labels = _labels(256)
    logits, _, extra = model.forward_with_losses(dense, sparse, labels)
    (sum(F.binary_cross_entropy_with_logits(logits[t], labels[t]) for t in FUNNEL) + extra["calibrator"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


class _Batches(L.LightningDataModule):
    def __init__(self, batch: Batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        return DataLoader([self.batch], batch_size=None)


class _FirstStep(L.Callback):
    """Sets the head logits (p_ctr = 0.5 on every row, p_ctcvr = 0.7, 0.3, 0.7, 0.3) and s = 1 for
    uncertainty weighting once the model is materialised; keeps the first step's loss."""

    def on_fit_start(self, trainer, module):
        odds = math.log(0.7 / 0.3)
        _set_logits(module.model, {"ctr": 0.0, "ctcvr": [odds, -odds, odds, -odds]})
        with torch.no_grad():
            for value in getattr(module.task_weighting, "log_variance", {}).values():
                value.fill_(1.0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss = float(outputs["loss"])


@pytest.mark.parametrize("weighting", [None, UncertaintyWeights])
def test_training_loss_is_weighted_ce_plus_alpha_times_the_violation(weighting, tmp_path):
    """The paper's ``L_ce + alpha L_lc``: task weighting scales the BCEs only. Labels ctr = (1, 1, 0, 0),
    ctcvr = (1, 0, 0, 0); p_ctr = 0.5, p_ctcvr = (0.7, 0.3, 0.7, 0.3), so p_ctcvr - p_ctr = +0.2, -0.2,
    +0.2, -0.2 and alpha L_lc = 0.6 * (0.2 + 0 + 0.2 + 0) / 4 = 0.06 (the max of the mean difference
    would give 0; under s = 1 it used to enter as e^-1 * 0.06 = 0.022)."""
    schema = tiny_schema(tasks=("ctr", "ctcvr"))
    dense, sparse = random_inputs(schema, 4)
    labels = {"ctr": torch.tensor([1.0, 1.0, 0.0, 0.0]), "ctcvr": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    batch = Batch(dense, sparse, labels, {task: torch.ones(4, dtype=torch.bool) for task in labels})
    module = MultiTaskModule(model=partial(AITM, tower=[8], ait_dim=4, alpha=0.6), schema=schema,
                             task_weighting=weighting)
    step = _FirstStep()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[step],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy())
    trainer.fit(module, datamodule=_Batches(batch))
    ce_ctr = math.log(2)  # -ln 0.5 on every row
    ce_ctcvr = (-3 * math.log(0.7) - math.log(0.3)) / 4  # rows: -ln 0.7, -ln(1 - 0.3), -ln(1 - 0.7), -ln(1 - 0.3)
    if weighting is None:  # the schema's weights, 1 and 1
        expected = ce_ctr + ce_ctcvr + 0.06
    else:  # Kendall: e^{-s} L_k + s/2 per task at s = 1
        expected = math.exp(-1) * (ce_ctr + ce_ctcvr) + 2 * 0.5 + 0.06
    assert step.loss == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["train/extra/calibrator"]) == pytest.approx(0.06, rel=1e-5)


def test_builds_on_meta_and_materializes():
    schema = tiny_schema(tasks=FUNNEL)
    with torch.device("meta"):
        model = AITM(schema, tower=[8], ait_dim=4)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    materialize(model, "cpu")
    tables = {id(p) for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()}
    dense = [(n, p) for n, p in model.named_parameters() if id(p) not in tables]
    assert dense and all(p.device.type == "cpu" and torch.isfinite(p).all() for _, p in dense)
    assert model.transfers["ctpay"].query.weight.abs().sum() > 0  # reset, not left as empty memory


@pytest.mark.parametrize("tasks, kwargs, error", [
    (["ctr", {"name": "ctcvr", "label": "ctcvr", "kind": "regression"}], {}, "'ctcvr' must be binary"),
    (["ctr", "ctcvr"], {"tasks": ["ctr", "buy"]}, r"\['buy'\] are not in the schema"),
    (["ctr", "ctcvr", "cvr"], {"tasks": ["ctr", "ctcvr"]}, r"also has \['cvr'\]"),
    (["ctr", {"name": "ctcvr", "label": "ctcvr", "sample_space": "ctr == 1"}], {}, "over all impressions"),
    (["ctr", {"name": "ctcvr", "label": "ctcvr", "weight": 0}], {}, "weight 0"),
    (["ctr"], {}, "two or more distinct tasks"),
    (["ctr", "ctcvr"], {"tasks": ["ctr", "ctr"]}, "two or more distinct tasks"),
])
def test_rejects_what_is_not_a_funnel(tasks, kwargs, error):
    with pytest.raises(ValueError, match=error):
        AITM(tiny_schema(tasks=tuple(tasks)), **kwargs)
