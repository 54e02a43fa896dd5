"""Gate diagnostics: logged expert usage matches the gates, collapse and duplicate experts warn,
and a heatmap is written at the end of fit."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import random_inputs, tiny_schema
from lightning_mtr.data.batch import Batch
from lightning_mtr.models import MMoE, SharedBottom
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.diagnostics import GateDiagnostics
from lightning_mtr.training.distributed import SingleProcessStrategy

ROWS = 32


def _batches(count: int) -> list[Batch]:
    schema = tiny_schema()
    batches = []
    for seed in range(count):
        dense, sparse = random_inputs(schema, ROWS, seed)
        labels = {t: (torch.rand(ROWS, generator=torch.Generator().manual_seed(seed)) < 0.3).float()
                  for t in schema.task_names}
        batches.append(Batch(dense, sparse, labels, {t: torch.ones(ROWS, dtype=torch.bool) for t in labels}))
    return batches


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_batches(2), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_batches(3), batch_size=None)


def _fit(model, tmp_path, callback: GateDiagnostics, prepare=None) -> MultiTaskModule:
    module = MultiTaskModule(model=model, schema=tiny_schema())

    class Prepared(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            if prepare:
                prepare(pl_module.model)

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[Prepared(), callback], enable_progress_bar=False, enable_model_summary=False,
                        strategy=SingleProcessStrategy(), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_Data())
    return module


def _collapse_ctr_gate(model) -> None:
    """The ctr gate's logits: +40 on expert 1 whatever the input (through the optional gate bias)."""
    with torch.no_grad():
        model.bottom.gates.weight.zero_()
        model.bottom.gates.bias.zero_()
        model.bottom.gates.bias[1] = 40.0  # gate 0 (ctr) is rows 0..E-1 of the gate layer


def test_logged_weights_match_the_gates_and_collapse_warns(tmp_path):
    callback = GateDiagnostics()
    with pytest.warns(UserWarning, match="gate 'ctr' has collapsed onto expert 1"):
        module = _fit(partial(MMoE, num_experts=3, expert=[8], tower=[4], gate_bias=True), tmp_path, callback,
                      _collapse_ctr_gate)
    metrics = module.trainer.callback_metrics
    assert float(metrics["gates/ctr/expert1"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["gates/ctr/entropy"]) == pytest.approx(0.0, abs=1e-3)
    cvr = [float(metrics[f"gates/cvr/expert{e}"]) for e in range(3)]
    assert sum(cvr) == pytest.approx(1.0, abs=1e-5) and max(cvr) < 0.95, "the cvr gate was left alone"
    assert 0 < float(metrics["gates/cvr/entropy"]) <= torch.log(torch.tensor(3.0)) + 1e-6
    heatmap = tmp_path / "lightning_logs" / "version_0" / "gates.png"
    assert heatmap.is_file() and heatmap.stat().st_size > 1000


def test_identical_experts_warn(tmp_path):
    def duplicate_experts(model) -> None:
        with torch.no_grad():  # expert 1's first layer = expert 0's: same outputs for every row
            first = model.bottom.experts.first
            first.weight[8:16] = first.weight[0:8]
            first.bias[8:16] = first.bias[0:8]
            # and every gate weighs them alike, so their gradients match and training keeps them
            # identical (with gates that differ, they drift apart at a rate that depends on the draw)
            gates = model.bottom.gates.weight.view(-1, 2, first.weight.shape[1])  # [gates, E, in]
            gates[:, 1] = gates[:, 0]

    with pytest.warns(UserWarning, match="experts 0 and 1 of model.bottom are near-identical"):
        _fit(partial(MMoE, num_experts=2, expert=[8], tower=[4]), tmp_path, GateDiagnostics(), duplicate_experts)


def test_models_without_gates_log_nothing(tmp_path):
    module = _fit(partial(SharedBottom, bottom=[8], tower=[4]), tmp_path, GateDiagnostics())
    assert not [k for k in module.trainer.callback_metrics if k.startswith("gates/")]
    assert not (tmp_path / "lightning_logs" / "version_0" / "gates.png").exists()


def test_experts_that_are_both_zero_on_a_row_count_as_identical_there():
    """ReLU experts are often all-zero on a row; two copies of one expert are then still the same
    output there, so their mean cosine stays 1 (it read 0.91 for a draw where 9% of rows were zero)."""
    expert = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.5], [0.0, 0.0]])  # rows 1 and 3: all zero
    other = torch.tensor([[2.0, -1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])

    class Gated(torch.nn.Module):
        def gate_weights(self, inputs):
            return {"g": torch.full((4, 3), 1 / 3)}, torch.stack([expert, expert, other], dim=1)  # [B, E, D]

    callback = GateDiagnostics()
    callback._record("bottom", Gated(), (torch.zeros(4, 1),))
    total, rows = callback._cosine["bottom"]
    cosine = total / rows
    # the copies: 1 on every row; expert vs other by row: 0 (orthogonal), 1 (both zero), 0, 0 (one zero)
    torch.testing.assert_close(cosine[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(cosine[0, 2], torch.tensor(0.25))
    torch.testing.assert_close(cosine.diagonal(), torch.ones(3))
