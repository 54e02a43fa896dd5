"""``ModelCheckpoint`` whose ``last.ckpt`` is always the state training reached."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch import callbacks
from lightning.pytorch.trainer.states import TrainerFn


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), but ``save_last`` keeps ``last.ckpt`` at
    the latest step wherever a checkpoint is considered (end of validation or of the training
    epoch, ``every_n_train_steps``, end of training).

    Lightning 2.6 rewrites ``last.ckpt`` only when a top-k checkpoint was saved at the same step
    (``save_last="link"``: links it to the latest top-k file, however old): once the monitored
    metric got worse, ``last.ckpt`` held an older step and a resume from it trained that epoch
    again. Here ``last.ckpt`` is a relative symbolic link to the top-k checkpoint of the same
    step when there is one (the same state is not written twice: 190 MB in the debug run), else
    a checkpoint of its own. Readers (resume, validate/test, consolidate, export, warm start,
    ``daily``) follow the link like a file or directory.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._top_k_step: int | None = None  # the step of the newest top-k checkpoint
        self._last_step: int | None = None  # the step last.ckpt holds
        self._writing_last = False

    # where Lightning would save top-k: after it, never before (a save at this step stops it)
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (not self.save_last or self._last_step == trainer.global_step or trainer.fast_dev_run
                or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """A link to this step's top-k checkpoint if one was written, else a checkpoint of its own."""
        if not self.save_last:
            return
        same_state = self._top_k_step == trainer.global_step
        # "link": Lightning links last.ckpt to _last_checkpoint_saved, this step's top-k file
        mode, self.save_last, self._writing_last = self.save_last, "link" if same_state else True, True
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last, self._writing_last = mode, False
        self._last_step = trainer.global_step

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._writing_last:  # last.ckpt may link to a top-k checkpoint: writing through it would replace that one
            if trainer.is_global_zero and os.path.islink(filepath):
                os.remove(filepath)
            trainer.strategy.barrier("lightning_mtr.last_checkpoint")
        super()._save_checkpoint(trainer, filepath)
        if not self._writing_last:
            self._top_k_step = trainer.global_step


def with_last_checkpoint(trainer: dict[str, Any]) -> dict[str, Any]:
    """The trainer's callbacks with a :class:`ModelCheckpoint` keeping only ``last.ckpt`` where the
    config names none: Lightning's default one keeps ``epoch=E-step=S.ckpt`` and no ``last.ckpt``,
    which README's paths and a resume expect of every run. Empty where checkpointing is off or the
    config has its own."""
    given = trainer.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    if trainer.get("enable_checkpointing") is False or any(isinstance(c, callbacks.ModelCheckpoint) for c in given):
        return {}
    return {"callbacks": [*given, ModelCheckpoint(save_top_k=0, save_last=True)]}


def check_monitors(callbacks: Sequence[L.Callback], tasks: Sequence[str]) -> None:
    """A callback monitoring ``{stage}/{task}/{metric}`` of a task the schema lacks (``conf/debug.yaml``'s
    ``val/ctr/auc`` on a schema whose task is ``click``) fails now, not after an epoch of training."""
    for callback in callbacks:
        found = re.fullmatch(r"(?:train|val|test)/([^/]+)/\w+", str(getattr(callback, "monitor", None)))
        if found and found[1] not in tasks:
            raise ValueError(f"{type(callback).__name__} monitors {callback.monitor!r}, but the schema has no task "
                             f"{found[1]!r} (its tasks: {list(tasks)}): monitor one of them, e.g. "
                             f"--trainer.callbacks.monitor val/{tasks[0]}/auc, or val/loss")
