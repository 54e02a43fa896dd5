"""The one LightningModule: any registered model, masked per-task losses and metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_mtr.data.batch import Batch
from lightning_mtr.embeddings.fusing import SparseOptimizer, dense_parameters
from lightning_mtr.embeddings.managed import ManagedIds
from lightning_mtr.interfaces import ForwardWithLosses, LabelOrder, RequiredTaskWeights
from lightning_mtr.metrics import MaskedTaskMetrics
from lightning_mtr.schema import Schema
from lightning_mtr.tasks import masked_task_losses, weighted_total
from lightning_mtr.tasks.scores import probabilities
from lightning_mtr.tasks.weighting import StaticWeights, TaskWeighting
from lightning_mtr.training.bad_loss import BadBatches, BadLossPolicy
from lightning_mtr.training.distributed.base import TableStrategy

ModelFactory = Callable[[Schema], nn.Module]
WeightingFactory = Callable[[Schema], TaskWeighting]


def with_required_weights(schema: Schema, model: nn.Module) -> Schema:
    """The schema with the task weights the model fixes (:class:`RequiredTaskWeights`), one info line per change."""
    if not isinstance(model, RequiredTaskWeights):
        return schema
    required = model.required_task_weights()
    changed = [t for t in schema.tasks if t.name in required and t.weight != required[t.name]]
    for task in changed:
        rank_zero_info(f"{type(model).__name__} trains task {task.name!r} with weight {required[task.name]:g} "
                       f"(the schema says {task.weight:g}): it is learned through the model's own losses")
    if not changed:
        return schema  # the very object the data module holds
    return replace(schema, tasks=tuple(replace(t, weight=required.get(t.name, t.weight)) for t in schema.tasks))


def _adam(params) -> torch.optim.Optimizer:
    """Adam with its fused kernel (CPU and CUDA): one pass over all dense weights instead of ~10
    elementwise ops per tensor, about 0.4 ms against 1.5-4.4 ms a step for MMoE's 1.2M weights on
    2 cores; the weights it writes equal the per-tensor loop's within float rounding."""
    return torch.optim.Adam(params, lr=1e-3, fused=True)


class MultiTaskModule(L.LightningModule):
    """Trains a multi-task model: ``{task: logits}`` -> masked losses -> weighted sum.

    Args:
        model: builds the network from the schema (``class_path`` + ``init_args`` in YAML,
            e.g. ``lightning_mtr.models.MMoE``); the schema itself is linked from the data.
        schema: features and tasks; normally linked from ``data.schema``.
        dense_optimizer: torch optimizer for every non-embedding parameter.
        sparse_optimizer: fbgemm fused optimizer for the embedding tables.
        lr_scheduler: optional scheduler for the dense optimizer.
        auc: ``exact`` keeps every score (about 12 bytes a row); ``binned`` is a streaming
            histogram AUC with constant memory for very large evaluation sets.
        auc_bins: histogram bins of the binned AUC.
        task_weighting: how the per-task losses become the training loss
            (``lightning_mtr.tasks.weighting``: static schema weights by default, uncertainty,
            DWA, PLE's schedule, GradNorm); its current weights are logged as
            ``train/{task}/weight``. A model's extra loss terms are never weighted. Validation's
            ``val/loss`` always uses the schema's weights, so runs compare.
        bad_loss: what a NaN or inf loss or gradient does: stop the run before the batch changes
            anything, or skip it (``{policy: skip, max_skips: N}``); see
            :mod:`lightning_mtr.training.bad_loss`.
    """

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema,
        dense_optimizer: OptimizerCallable = _adam,
        sparse_optimizer: SparseOptimizer = SparseOptimizer(),
        lr_scheduler: LRSchedulerCallable | None = None,
        auc: Literal["exact", "binned"] = "exact",
        auc_bins: int = 65536,
        task_weighting: WeightingFactory | None = None,
        bad_loss: BadLossPolicy = BadLossPolicy(),
    ):
        super().__init__()
        with torch.device("meta"):  # the strategy places it where it will run: fused, or sharded
            self.model = model(schema)
        schema = with_required_weights(schema, self.model)
        self.schema = schema
        self.dense_optimizer = dense_optimizer
        self.sparse_optimizer = sparse_optimizer
        self.lr_scheduler = lr_scheduler
        self.task_weighting = (task_weighting or StaticWeights)(schema)
        self.bad_batches = BadBatches(bad_loss)
        self._source = None  # the current batch's RowSource, for a gradient found bad after backward
        self._skipping = False  # this step's loss is bad on some rank: every rank skips backward
        self._epoch_losses: dict[str, list] = {}  # task -> [sum of step losses, steps], this epoch
        self.metrics = nn.ModuleDict({stage: MaskedTaskMetrics(schema.tasks, prefix=stage, auc=auc, num_bins=auc_bins)
                                      for stage in ("val", "test")})

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if not isinstance(trainer.strategy, TableStrategy):
            trainer.strategy.connect(None)  # its teardown would move the model, still on meta, to the CPU
            raise TypeError(f"MultiTaskModule trains under a strategy that places its embedding tables, not "
                            f"{type(trainer.strategy).__name__}: Trainer(strategy=SingleProcessStrategy()) on one "
                            "device, TorchRecStrategy() on any number (lightning_mtr.training.distributed; "
                            "lightning-mtr picks one itself)")
        # fbgemm's fused CPU lookup has no kernel for tensors created under torch.inference_mode
        # ("Could not run ... with arguments from the 'CPU' backend"); fit validates under no_grad
        loops = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}
        loop = loops.get(stage)
        if loop is not None and loop.inference_mode:
            trainer.strategy.connect(None)  # its teardown would move the model, still on meta, to the CPU
            raise ValueError(f"MultiTaskModule cannot {trainer.state.fn.value} under torch.inference_mode (fbgemm's "
                             "fused embedding lookup has no kernel for inference tensors): build the trainer with "
                             "L.Trainer(inference_mode=False), as `lightning-mtr` does")
        # a funnel model's label order (ESMM: ctcvr <= ctr) is checked on every row our data module
        # reads; a data module of the user's own (or plain dataloaders) checks its labels itself
        require = getattr(trainer.datamodule, "require_label_order", None)
        if isinstance(self.model, LabelOrder) and require is not None:
            require(self.model.label_order())

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch.dense, batch.sparse)

    def outputs_and_losses(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor]]:
        """``(logits, {task: loss}, {name: extra loss})``. Models whose losses are part of the
        model implement :class:`~lightning_mtr.interfaces.ForwardWithLosses`: ESMM's probability
        chain gives per-row losses and no extra term, AITM no per-row losses and its calibrator as
        an extra term; extra terms are added
        to the loss as they are, outside any task weighting, and logged as ``train/extra/{name}``."""
        if isinstance(self.model, ForwardWithLosses):
            logits, given, extra = self.model.forward_with_losses(batch.dense, batch.sparse, batch.labels)
        else:
            logits, given, extra = self(batch), {}, {}
        losses = masked_task_losses(logits, batch.labels, batch.masks, self.schema.tasks, given, batch.groups,
                                    batch.row_weights)
        return logits, losses, extra

    def total_loss(self, losses: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """What training minimises: the task weighting's sum of ``losses``, plus the extra terms as they are."""
        return self.task_weighting(losses) + sum(extra.values())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        _, losses, extra = self.outputs_and_losses(batch)
        loss = self.total_loss(losses, extra)
        self._source = batch.source
        terms = {**losses, **{f"extra/{k}": v for k, v in extra.items()}, "loss": loss}
        self._skipping = self.bad_batches.loss_is_bad(terms, batch.source, self.trainer.strategy, self.global_rank,
                                                      self.trainer.world_size)
        if self._skipping:
            self.log("train/skipped_batches", float(self.bad_batches.skipped))
            return loss  # backward() runs nothing: no gradient, no table update, no optimizer moves
        self.log_dict({f"train/{task}/loss": value.detach() for task, value in losses.items()},
                      batch_size=batch.batch_size)
        self.log_dict({f"train/extra/{name}": value.detach() for name, value in extra.items()},
                      batch_size=batch.batch_size)
        # tensors, not floats: a float() of a learned weight would wait for the GPU every step
        self.log_dict({f"train/{task}/weight": weight.detach() if isinstance(weight, torch.Tensor) else weight
                       for task, weight in self.task_weighting.weights().items()}, batch_size=batch.batch_size)
        for task, value in losses.items():
            entry = self._epoch_losses.setdefault(task, [0.0, 0])
            entry[0] += value.detach()
            entry[1] += 1
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch.batch_size)
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Nothing for a skipped batch (Lightning refuses a ``None`` loss on several processes)."""
        if not self._skipping:
            super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss whose gradient is not: no torch optimizer steps (gradients are all-reduced
        by now, so ranks agree without a collective); fused tables already took this backward."""
        if not self.bad_batches.gradient_is_bad(self.named_parameters(), self._source):
            return
        self.log("train/skipped_batches", float(self.bad_batches.skipped))
        for parameter in self.parameters():
            parameter.grad = None  # torch optimizers step no parameter without a gradient

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_batches"] = self.bad_batches.skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bad_batches.skipped = checkpoint.get("skipped_batches", 0)

    def on_fit_start(self) -> None:
        self.task_weighting.attach(self.model)  # materialised (and sharded) by now, on one process or many

    def on_train_epoch_end(self) -> None:
        """Schemes that move between epochs (DWA, PLE's schedule) see each task's mean training
        loss of the epoch, averaged over processes so every rank weights alike. Managed tables
        report their evicted ids and rows in use (``mch/<table>/...``)."""
        if self._epoch_losses:  # one reduction and one copy to the host for every task
            tasks = list(self._epoch_losses)
            means = torch.stack([torch.as_tensor(total / max(steps, 1), device=self.device, dtype=torch.float32)
                                 for total, steps in self._epoch_losses.values()])
            means = self.trainer.strategy.reduce(means, reduce_op="mean").tolist()
            self.task_weighting.end_epoch(dict(zip(tasks, means)))
        self._epoch_losses = {}
        for managed in (m for m in self.model.modules() if isinstance(m, ManagedIds)):  # alike on every rank
            self.log_dict({name: float(count) for name, count in managed.take_report().items()}, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: Batch) -> None:
        logits, losses, extra = self.outputs_and_losses(batch)
        self.log(f"{stage}/loss", weighted_total(losses, self.schema.task_weights) + sum(extra.values()),
                 batch_size=batch.batch_size, sync_dist=True)
        self.metrics[stage].update({k: v.float() for k, v in logits.items()}, batch.labels, batch.masks, batch.groups)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        values = self.metrics[stage].compute()  # already gathered over processes by torchmetrics
        self.log_dict(values, prog_bar=False, sync_dist=True)  # a no-op mean of equal values; no warning
        self.metrics[stage].reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-task scores: probabilities for binary tasks, one probability per class for
        multiclass (``score_{task}_{class}``), raw predictions for regression and ranking."""
        scores = probabilities(self.schema, self(batch))  # as an exported program scores them
        return {**{f"score_{name}": value for name, value in scores.items()}, **batch.extras}

    def configure_optimizers(self) -> Any:
        optimizer = self.dense_optimizer(dense_parameters(self.model) + list(self.task_weighting.parameters()))
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}
