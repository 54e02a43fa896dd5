"""Preemption: SIGTERM, SIGINT or SLURM's requeue signal, on one process or several, ends ``fit``
with a checkpoint at the step it stopped at and exit status 75 (``EX_TEMPFAIL``: resume me).

A signal only marks the process that got it (no signal interrupts a step half done: the fused
tables update inside backward, the dense layers after it). At the end of each training batch the
ranks agree, with one small sum over the ranks, whether any of them was signalled (a scheduler
may signal one rank, or all of them at slightly different steps); then all of them save
``preempted.ckpt`` together, at the same step, and exit 75. The checkpoint is written where
``ModelCheckpoint(every_n_train_steps=...)`` writes its own: the loop and the data position
resume with the next batch, weights bit for bit.

On one process this builds on Lightning's own handling, which also stops in validation or at an
epoch's end (its SIGTERM handler sets ``trainer.received_sigterm``; its loops then raise
``SIGTERMException``, a ``SystemExit`` of status 0): there the checkpoint is written where
Lightning stopped. With several processes Lightning's handler is not called: it runs a collective
inside the signal handler, which the other ranks never match (both ranks then wait in
``Work.wait`` forever), and its loops would stop the signalled rank alone. A signal during
validation is then acted on at the next training batch's end. A signal in the sanity check, before
any training step, leaves nothing to save: status 75 all the same, without a checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run it again
CHECKPOINT_NAME = "preempted.ckpt"


def preempted(stop: SIGTERMException, checkpoint: Path | None, step: int, signal_name: str) -> SIGTERMException:
    """``stop`` (Lightning's ``SIGTERMException``, a ``SystemExit``) made to exit with status 75
    and to say, as its one argument, where the checkpoint is and how to resume; without one (the
    signal came in the sanity check, before any training step), that the same command runs again."""
    stop.code = PREEMPTED_EXIT
    if checkpoint is None:
        stop.args = (f"preempted by {signal_name} in the sanity check, before training step {step + 1}: "
                     "nothing new to save; run the same command again",)
    else:
        stop.args = (f"preempted by {signal_name} at step {step}: checkpoint {checkpoint}; "
                     f"resume with --ckpt_path {checkpoint}",)
    return stop


class Preemption(L.Callback):
    """Stop ``fit`` on SIGTERM, SIGINT or the requeue signal with a checkpoint at the current step.

    The checkpoint is ``preempted.ckpt`` in the checkpoint callback's directory (without one,
    ``<default_root_dir>/checkpoints``), replaced atomically by each preemption; ``last.ckpt``
    and the best checkpoints are left as they were.

    Args:
        enabled: ``false`` leaves Lightning's own handling alone (SIGTERM then ends ``fit`` on one
            process with status 0 and no checkpoint) and skips the ranks' agreement.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: str | None = None  # the name of this process's first signal, once one came
        self._installed = False
        self._children: list[subprocess.Popen] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._installed = None, False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal in the sanity check (several processes; one process stops in it) ends the run
        before any training step, with nothing to save."""
        received = self._agreed(trainer) if self.enabled else None
        if received is not None:
            self._stop(trainer, received, save=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def _install(self, trainer: L.Trainer) -> None:
        """Once per ``fit``, after Lightning installed its SIGTERM handler (``on_fit_start`` is
        before); Lightning's teardown restores every handler as it was before ``fit`` (SLURM's
        requeue signal included: requeueing is the job script's, on status 75)."""
        if self._installed or not self.enabled or threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (Lightning sets none elsewhere either)
        self._installed = True
        environment = trainer._accelerator_connector.cluster_environment
        requeue = environment.requeue_signal if isinstance(environment, SLURMEnvironment) else None
        signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1} | ({requeue} if requeue else set())
        lightning_handler = signal.getsignal(signal.SIGTERM) if trainer.world_size == 1 else None
        for signum in signals:
            signal.signal(signum, lambda number, frame: self._on_signal(number, frame, lightning_handler))

    def _on_signal(self, signum: int, frame, lightning_handler) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C does not wait for the batch to end
        self.received = self.received or signal.Signals(signum).name
        if callable(lightning_handler):
            lightning_handler(signum, frame)  # sets trainer.received_sigterm

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        received = self._agreed(trainer) if self.enabled else None
        if received is not None:
            self._stop(trainer, received, save=True)

    def _stop(self, trainer: L.Trainer, received: str, save: bool) -> NoReturn:
        self._adopt_children(trainer)
        try:
            checkpoint = self._save(trainer) if save else None
        except BaseException:  # a save that failed (a peer lost in it): the launcher's again, to kill
            if self._children:
                trainer.strategy.launcher.procs.extend(self._children)
                self._children = []
            raise
        self._wait_for_children()
        raise preempted(SIGTERMException(), checkpoint, trainer.global_step, received)

    def _agreed(self, trainer: L.Trainer) -> str | None:
        """Whether any rank was signalled, the same answer on every rank: each adds its signal's
        number at its own index of a zero vector, summed over the ranks (on 2 gloo processes
        a median 0.55 ms a batch, docs/multi-gpu.md). Named as ``SIGTERM on rank 1`` when several train."""
        if trainer.world_size == 1:
            return self.received
        numbers = torch.zeros(trainer.world_size, dtype=torch.int64, device=trainer.strategy.root_device)
        numbers[trainer.global_rank] = signal.Signals[self.received].value if self.received else 0
        numbers = trainer.strategy.reduce(numbers, reduce_op="sum").tolist()
        by_signal: dict[str, list[str]] = {}
        for rank, number in enumerate(numbers):
            if number:
                by_signal.setdefault(signal.Signals(number).name, []).append(str(rank))
        return "; ".join(f"{name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
                         for name, ranks in by_signal.items()) or None

    def _adopt_children(self, trainer: L.Trainer) -> None:
        """Where Lightning launched the other ranks from this one, its watcher thread kills this
        process (SIGKILL) as soon as one of them exits non-zero, which each does here, with 75.
        This process takes them over instead: the watcher's list (the launcher's, the same list)
        is emptied and the children are waited for after the save, so the command that was run
        ends last, with 75."""
        procs = getattr(trainer.strategy.launcher, "procs", None)
        if procs:
            self._children = list(procs)
            procs.clear()

    def _wait_for_children(self, timeout: float = 60.0) -> None:
        for child in self._children:
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()  # it saved with the others; whatever holds it now is not worth a hang
        self._children = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning stopped for the signal elsewhere (one process: in validation, at the epoch's
        end, or in a callback after this one): the checkpoint is written where it stopped (in the
        sanity check: none), status 75 still. With several processes only the ranks' agreement
        stops for a signal."""
        if self.received is None or not isinstance(exception, SIGTERMException) or exception.code == PREEMPTED_EXIT:
            return
        checkpoint = None if trainer.sanity_checking else self._save(trainer)
        preempted(exception, checkpoint, trainer.global_step, self.received)

    @staticmethod
    def _save(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        directory = Path(callback.dirpath) if callback and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(directory / CHECKPOINT_NAME)
        return directory / CHECKPOINT_NAME
