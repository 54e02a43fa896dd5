"""Task weighting schemes against their papers' formulas, and through the LightningModule."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import ESMM_TASKS, random_inputs, tiny_schema
from lightning_mtr.models import ESMM, MMoE, PLE, SharedBottom
from lightning_mtr.schema import Schema
from lightning_mtr.tasks import weighted_total
from lightning_mtr.tasks.weighting import (DynamicWeightAverage, GradNorm, ScheduledWeights, StaticWeights,
                                           UncertaintyWeights)
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Schema.from_dict({
    "dense": [{"name": "d0"}],
    "tasks": [{"name": "ctr", "label": "ctr"}, {"name": "time", "label": "time", "kind": "regression"},
              {"name": "cvr", "label": "cvr", "weight": 0}],
})
LOSSES = {"ctr": torch.tensor(0.4), "time": torch.tensor(2.0), "cvr": torch.tensor(9.0)}


def test_static_weights_are_the_schemas():
    torch.testing.assert_close(StaticWeights(SCHEMA)(LOSSES), weighted_total(LOSSES, SCHEMA.task_weights))


def test_uncertainty_weighting_follows_kendall_and_learns_sigma():
    weighting = UncertaintyWeights(SCHEMA)
    assert set(weighting.log_variance) == {"ctr", "time"}, "a weight-0 task gets no sigma"
    torch.testing.assert_close(weighting(LOSSES), torch.tensor(1.0 * 0.4 + 0.5 * 2.0))  # sigma = 1
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        weighting(LOSSES).backward()
        optimizer.step()
    # d/ds (c e^-s L + s/2) = 0  at  sigma^2 = e^s = 2 c L
    assert math.exp(float(weighting.log_variance["ctr"])) == pytest.approx(2 * 1.0 * 0.4, rel=1e-3)
    assert math.exp(float(weighting.log_variance["time"])) == pytest.approx(2 * 0.5 * 2.0, rel=1e-3)
    assert weighting.weights()["cvr"] == 0.0


def test_uncertainty_log_variance_stops_at_its_bound_and_leaves_it_when_the_loss_returns():
    """A zero loss drives s = log sigma^2 to -inf and the total with it; the projection holds s at
    -10, so the total stays finite: e^10 * 0 + (-10)/2 for ctr, plus time's optimum
    0.5 e^{-s} 2 + s/2 at e^s = 2 * 0.5 * 2 = 2, i.e. 0.5 + ln(2)/2."""
    weighting = UncertaintyWeights(SCHEMA)
    losses = {"ctr": torch.tensor(0.0), "time": torch.tensor(2.0), "cvr": torch.tensor(9.0)}
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    total = weighting(losses)
    assert weighting.log_variance["ctr"].item() == -10.0
    assert float(total) == pytest.approx(-5.0 + 0.5 + 0.5 * math.log(2.0), abs=1e-3)

    # at the bound, d/ds (e^{-s} L + s/2) = 1/2 - e^10 L: with L = 0 it is +1/2 (down, held by the
    # projection); with L = 1e-3 it is 1/2 - 22.03 < 0, and one SGD step of 0.01 moves s up by 0.2153
    with torch.no_grad():
        weighting.log_variance["ctr"].fill_(-30.0)  # e.g. from an unclamped checkpoint: projected on use
    weighting.zero_grad()
    total = weighting(losses)
    assert float(total) == pytest.approx(-5.0 + 0.5 * math.exp(-weighting.log_variance["time"].item()) * 2.0
                                         + 0.5 * weighting.log_variance["time"].item(), rel=1e-6)
    total.backward()
    assert weighting.log_variance["ctr"].grad.item() == pytest.approx(0.5)
    sgd = torch.optim.SGD(weighting.parameters(), lr=0.01)
    sgd.zero_grad()
    weighting({**losses, "ctr": torch.tensor(1e-3)}).backward()
    assert weighting.log_variance["ctr"].grad.item() == pytest.approx(0.5 - math.exp(10) * 1e-3, rel=1e-5)
    sgd.step()
    weighting(losses)
    assert weighting.log_variance["ctr"].item() == pytest.approx(-10.0 + 0.01 * (math.exp(10) * 1e-3 - 0.5), rel=1e-5)


def test_dynamic_weight_average_softmaxes_over_the_trained_tasks_only():
    """Liu et al.'s ``w_k = K exp(r_k / T) / sum_i exp(r_i / T)`` with K = 2 trained tasks (cvr has
    weight 0 and takes no share): ratios r = (0.5/1, 3/4) after two epochs, T = 2."""
    weighting = DynamicWeightAverage(SCHEMA, temperature=2.0)
    weighting.end_epoch({"ctr": 1.0, "time": 4.0, "cvr": 1.0})
    assert weighting.weights() == {"ctr": 1.0, "time": 1.0, "cvr": 0.0}, "weight 1 until two epochs are seen"
    weighting.end_epoch({"ctr": 0.5, "time": 3.0, "cvr": 0.1})
    current = {k: float(v) for k, v in weighting.weights().items()}
    # 2 e^0.25 / (e^0.25 + e^0.375) = 2 * 1.284025 / 2.739017 and 2 * 1.454991 / 2.739017
    assert current == pytest.approx({"ctr": 0.937581, "time": 1.062419, "cvr": 0.0}, abs=1e-6)
    assert current["ctr"] + current["time"] == pytest.approx(2.0)
    weighting.end_epoch({"ctr": 0.45, "time": 1.0, "cvr": 0.1})  # r = (0.9, 1/3): time's loss fell more
    expected = 2 * math.exp(0.9 / 2) / (math.exp(0.9 / 2) + math.exp(1 / 3 / 2))
    assert float(weighting.weights()["ctr"]) == pytest.approx(expected, rel=1e-6)
    assert float(weighting.weights()["ctr"]) > float(weighting.weights()["time"])


def test_dynamic_weight_average_on_esmm_weights_ctr_and_ctcvr_to_two():
    """The issue's case: ESMM's cvr (weight 0) counted in K and the softmax left the trained
    tasks 1.69 in all; equal ratios must give each of them exactly 1."""
    weighting = DynamicWeightAverage(tiny_schema(tasks=ESMM_TASKS))
    for losses in ({"ctr": 0.6, "cvr": 0.3, "ctcvr": 0.2}, {"ctr": 0.3, "cvr": 0.3, "ctcvr": 0.1}):
        weighting.end_epoch(losses)
    weights = {k: float(v) for k, v in weighting.weights().items()}
    assert weights == pytest.approx({"ctr": 1.0, "cvr": 0.0, "ctcvr": 1.0}, abs=1e-6)


def test_scheduled_weights_decay_per_epoch_as_in_ple():
    weighting = ScheduledWeights(SCHEMA, gamma={"time": 0.5})
    for epoch in range(3):
        assert weighting.weights() == {"ctr": 1.0, "time": 0.5**epoch, "cvr": 0.0}
        weighting.end_epoch({})
    with pytest.raises(ValueError, match="unknown tasks"):
        ScheduledWeights(SCHEMA, gamma={"watch": 0.9})


class _Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        from test_diagnostics import _batches
        self.batches = _batches(3)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_module_trains_the_weights_and_moves_them_between_epochs(tmp_path):
    schema = tiny_schema()
    kwargs = dict(model=partial(MMoE, num_experts=2, expert=[8], tower=[4]), schema=schema)
    module = MultiTaskModule(task_weighting=UncertaintyWeights, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy())
    trainer.fit(module, datamodule=_Data())
    assert all(float(s) != 0.0 for s in module.task_weighting.log_variance.values()), "the dense optimizer trains sigma"
    assert "train/ctr/weight" in trainer.callback_metrics

    module = MultiTaskModule(task_weighting=DynamicWeightAverage, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy())
    trainer.fit(module, datamodule=_Data())
    assert not torch.isnan(module.task_weighting.history).any()
    tasks = len(schema.tasks)
    assert float(module.task_weighting.current.sum()) == pytest.approx(tasks), "K times a softmax"
    assert not torch.allclose(module.task_weighting.current, torch.ones(tasks)), "DWA moved the weights"


def test_weighting_is_chosen_in_yaml(monkeypatch):
    from lightning_mtr.cli import MultiTaskCLI

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    cli = MultiTaskCLI(run=False, args=["--config", "conf/debug.yaml", "--model.task_weighting",
                                        "lightning_mtr.tasks.weighting.DynamicWeightAverage",
                                        "--model.task_weighting.temperature", "3"])
    assert isinstance(cli.model.task_weighting, DynamicWeightAverage)
    assert cli.model.task_weighting.temperature == 3.0


def test_gradnorm_balances_gradient_norms_on_the_shared_layer():
    """Two tasks on one shared layer, one with 10x the gradient: GradNorm moves weight to the
    weaker task until ``w_i n_i`` meet, and the weights always sum to the task count."""
    schema = Schema.from_dict({"dense": [{"name": "d0"}],
                               "tasks": [{"name": "a", "label": "a"}, {"name": "b", "label": "b"}]})
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"bottom": shared})
    weighting = GradNorm(schema, shared="bottom", alpha=0.0)  # alpha 0: equal norms are the target
    weighting.attach(model)
    inputs = torch.randn(32, 4)
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.01)
    for _ in range(1500):
        hidden = shared(inputs)
        losses = {"a": hidden.square().mean(), "b": 10 * hidden.square().mean()}
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    weights = weighting.weights()
    assert float(weights["a"]) + float(weights["b"]) == pytest.approx(2.0, abs=1e-5)
    # the |.| objective makes SGD hover around the balance point, within a few percent
    assert float(weights["a"]) / float(weights["b"]) == pytest.approx(10.0, rel=0.1), weights
    with pytest.raises(ValueError, match="no submodule 'towers'"):
        GradNorm(schema, shared="towers").attach(model)


def test_gradnorm_refuses_a_module_without_parameters():
    """ESMM's default bottom is the parameter-free shared input: GradNorm would balance nothing
    and leave every weight at 1; it must say so and name what would work."""
    model = ESMM(tiny_schema(tasks=ESMM_TASKS), tower=[4])
    with pytest.raises(ValueError, match=r"'bottom' \(SharedInput\) has no trainable dense parameters.*'heads'"):
        GradNorm(tiny_schema(tasks=ESMM_TASKS), shared="bottom").attach(model)
    with pytest.raises(ValueError, match=r"no submodule 'levels'.*\['heads', 'heads.towers'\]"):
        GradNorm(tiny_schema(tasks=ESMM_TASKS), shared="levels").attach(model)


def _shared_bottom():
    return SharedBottom(tiny_schema(), bottom=[8, 6], tower=[4])


@pytest.mark.parametrize("build, shared, expected", [
    # MMoE: the experts' last layer, all experts as one batched [E, in, out] weight (not the gates,
    # registered after the experts)
    (lambda: MMoE(tiny_schema(), num_experts=3, expert=[8, 6], tower=[4]), "bottom",
     lambda m: [m.bottom.experts.weights[-1]]),
    (lambda: MMoE(tiny_schema(), num_experts=3, expert=[8], tower=[4]), "bottom",
     lambda m: [m.bottom.experts.first.weight]),  # one-layer experts: the [E*H, in] first layer
    (_shared_bottom, "bottom", lambda m: [m.bottom.mlp[2].weight]),  # Linear, ReLU, Linear, ReLU
    (_shared_bottom, "bottom.mlp.0", lambda m: [m.bottom.mlp[0].weight]),  # a layer named directly
    # PLE: the last level's shared experts (its task experts reach one task each; its task gates
    # are registered last)
    (lambda: PLE(tiny_schema(), num_levels=2, expert=[8, 6], tower=[4]), "levels",
     lambda m: [m.levels[1].shared_bank.weights[-1]]),
])
def test_gradnorm_balances_on_the_last_shared_layer(build, shared, expected):
    torch.manual_seed(0)
    model = build()
    weighting = GradNorm(tiny_schema(), shared=shared, alpha=1.5)
    weighting.attach(model)
    assert [id(p) for p in weighting.shared_weights] == [id(p) for p in expected(model)]
    every = GradNorm(tiny_schema(), shared=shared.split(".")[0], layer="all")
    every.attach(model)
    assert len(every.shared_weights) == len(list(model.get_submodule(shared.split(".")[0]).parameters()))

    # the first step: L_i(0) = L_i, so r_i = 1 and the target is mean_j n_j: with w = (1, 1) the
    # GradNorm term is |n_ctr - n_cvr|, n_i = ||d L_i / d W|| on exactly W
    logits = model(*random_inputs(tiny_schema(), 32))
    losses = {task: (logits[task] - 1.0).square().mean() * scale for task, scale in (("ctr", 1.0), ("cvr", 3.0))}
    norm = _norms(losses, expected(model))
    total = weighting(losses)
    torch.testing.assert_close(total, losses["ctr"] + losses["cvr"] + (norm["ctr"] - norm["cvr"]).abs())
    assert not torch.allclose(_norms(losses, every.shared_weights)["ctr"], norm["ctr"]), "W is not the whole module"

    # a later step, losses at 0.5 and 0.9 of L(0): the paper's inverse training rates
    # r_i = (L_i(t) / L_i(0)) / mean_j = 0.5 / 0.7 and 0.9 / 0.7, and with w = (1, 1) the norms
    # G_i = 0.5 n_ctr and 0.9 n_cvr, so the term is sum_i |G_i - mean(G) r_i^1.5|
    later = {"ctr": 0.5 * losses["ctr"], "cvr": 0.9 * losses["cvr"]}
    g_ctr, g_cvr = 0.5 * norm["ctr"], 0.9 * norm["cvr"]
    mean_g = (g_ctr + g_cvr) / 2
    expected = (later["ctr"] + later["cvr"] + (g_ctr - mean_g * (0.5 / 0.7) ** 1.5).abs()
                + (g_cvr - mean_g * (0.9 / 0.7) ** 1.5).abs())
    torch.testing.assert_close(weighting(later), expected)


def _norms(losses: dict[str, torch.Tensor], parameters: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """``||d L_i / d parameters||`` per task, summed over the parameters' squares."""
    return {task: torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(loss, parameters, retain_graph=True)))
            for task, loss in losses.items()}


def test_gradnorm_trains_inside_the_module(tmp_path):
    module = MultiTaskModule(model=partial(MMoE, num_experts=2, expert=[8], tower=[4]), schema=tiny_schema(),
                             task_weighting=partial(GradNorm, shared="bottom"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy())
    trainer.fit(module, datamodule=_Data())
    assert module.task_weighting.shared_weights, "attached to the materialised bottom"
    assert not torch.allclose(module.task_weighting.logits, torch.zeros(2)), "the weights moved"


def _gradnorm_rank(rank: int, out: Path) -> None:
    from lightning_mtr.training.distributed import TorchRecStrategy

    torch.manual_seed(0)
    module = MultiTaskModule(model=partial(MMoE, num_experts=2, expert=[8], tower=[4]), schema=tiny_schema(),
                             task_weighting=partial(GradNorm, shared="bottom"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TorchRecStrategy(), max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, default_root_dir=out)
    trainer.fit(module, datamodule=_Data())
    torch.save(module.task_weighting.logits.detach().clone(), out / f"logits-{rank}.pt")


def test_gradnorm_under_the_sharded_strategy_keeps_one_set_of_weights(tmp_path):
    """With sharded tables and DDP: GradNorm's per-task gradient norms (autograd.grad, which
    fires no DDP hook) run inside the step, and the weights' gradient is all-reduced, so every
    process holds the same, moving task weights."""
    from helpers import run_ranks

    run_ranks(2, _gradnorm_rank, tmp_path)
    logits = [torch.load(tmp_path / f"logits-{rank}.pt") for rank in (0, 1)]
    assert torch.isfinite(logits[0]).all() and not torch.allclose(logits[0], torch.zeros(2)), logits
    torch.testing.assert_close(logits[0], logits[1])
