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

from helpers import tiny_schema
from lightning_mtr.models import MMoE
from lightning_mtr.schema import Schema
from lightning_mtr.tasks import weighted_total
from lightning_mtr.tasks.weighting import (DynamicWeightAverage, GradNorm, ScheduledWeights, StaticWeights,
                                           UncertaintyWeights)
from lightning_mtr.training import MultiTaskModule

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


def test_dynamic_weight_average_uses_the_last_two_epochs():
    weighting = DynamicWeightAverage(SCHEMA, temperature=2.0)
    epochs = [{"ctr": 1.0, "time": 4.0, "cvr": 1.0}, {"ctr": 0.5, "time": 3.0, "cvr": 1.0},
              {"ctr": 0.45, "time": 1.0, "cvr": 1.0}]
    for seen, losses in enumerate(epochs, start=1):
        weighting.end_epoch(losses)
        current = weighting.weights()
        if seen < 2:
            assert current == {"ctr": 1.0, "time": 1.0, "cvr": 0.0}
            continue
        previous, last = epochs[seen - 2], losses
        ratios = {k: last[k] / previous[k] for k in ("ctr", "time", "cvr")}
        normaliser = sum(math.exp(r / 2.0) for r in ratios.values())
        for task in ("ctr", "time"):
            assert float(current[task]) == pytest.approx(3 * math.exp(ratios[task] / 2.0) / normaliser, rel=1e-5)
    assert float(current["ctr"]) > float(current["time"]), "the task whose loss fell less gets more weight"


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
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_Data())
    assert all(float(s) != 0.0 for s in module.task_weighting.log_variance.values()), "the dense optimizer trains sigma"
    assert "train/ctr/weight" in trainer.callback_metrics

    module = MultiTaskModule(task_weighting=DynamicWeightAverage, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
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


def test_gradnorm_trains_inside_the_module(tmp_path):
    module = MultiTaskModule(model=partial(MMoE, num_experts=2, expert=[8], tower=[4]), schema=tiny_schema(),
                             task_weighting=partial(GradNorm, shared="bottom"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_Data())
    assert module.task_weighting._parameters_of, "attached to the materialised bottom"
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
