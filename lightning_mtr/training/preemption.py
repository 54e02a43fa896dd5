"""Preemption on one process: SIGTERM, SIGINT or SLURM's requeue signal ends ``fit`` with a
checkpoint at the step it stopped at and exit status 75 (``EX_TEMPFAIL``: resume me).

Built on Lightning's own handling: its SIGTERM handler sets ``trainer.received_sigterm`` and
its training loop raises ``SIGTERMException`` (a ``SystemExit`` of status 0) after the batch
that was running. This callback routes SIGINT and the requeue signal (``SIGUSR1``, or
``SLURMEnvironment.requeue_signal``) to that same handler, so that no signal interrupts a
step half done (the fused tables update inside backward, the dense layers after it), writes the
checkpoint at the end of the batch, where ``ModelCheckpoint(every_n_train_steps=...)`` writes
its own (the loop and the data position resume with the next batch, weights bit for bit), or,
when Lightning stops elsewhere for the signal (in validation, at an epoch's end), where it
stopped; and it ends the run with status 75 (:func:`preempted`).

One process only: with several, a signal reaches one rank and the ranks would have to agree on
a step before a collective save; there the callback installs nothing and Lightning's behaviour
stays as it is.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run it again
CHECKPOINT_NAME = "preempted.ckpt"


def preempted(stop: SIGTERMException, checkpoint: Path, step: int, signal_name: str) -> SIGTERMException:
    """``stop`` (Lightning's ``SIGTERMException``, a ``SystemExit``) made to exit with status 75
    and to say, as its one argument, where the checkpoint is and how to resume."""
    stop.code = PREEMPTED_EXIT
    stop.args = (f"preempted by {signal_name} at step {step}: checkpoint {checkpoint}; "
                 f"resume with --ckpt_path {checkpoint}",)
    return stop


class Preemption(L.Callback):
    """Stop ``fit`` on SIGTERM, SIGINT or the requeue signal with a checkpoint at the current step.

    The checkpoint is ``preempted.ckpt`` in the checkpoint callback's directory (without one,
    ``<default_root_dir>/checkpoints``), replaced atomically by each preemption; ``last.ckpt``
    and the best checkpoints are left as they were.

    Args:
        enabled: ``false`` leaves Lightning's own handling alone (SIGTERM then ends ``fit``
            with status 0 and no checkpoint).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: str | None = None  # the name of the first signal, once one came

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning installed its SIGTERM handler (``on_fit_start`` is before), which it
        calls; Lightning's teardown restores every handler as it was before ``fit``
        (SLURM's requeue signal included: requeueing is the job script's, on status 75)."""
        self.received = None
        if not self.enabled or trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (Lightning sets none elsewhere either)
        environment = trainer._accelerator_connector.cluster_environment
        requeue = environment.requeue_signal if isinstance(environment, SLURMEnvironment) else None
        signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1} | ({requeue} if requeue else set())
        lightning_handler = signal.getsignal(signal.SIGTERM)
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
        if self.received is not None:
            raise preempted(SIGTERMException(), self._save(trainer), trainer.global_step, self.received)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning stopped for the signal elsewhere (in validation, at the epoch's end, or in a
        callback after this one): the checkpoint is written where it stopped, status 75 still."""
        if self.received is None or not isinstance(exception, SIGTERMException) or exception.code == PREEMPTED_EXIT:
            return
        preempted(exception, self._save(trainer), trainer.global_step, self.received)

    @staticmethod
    def _save(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        directory = Path(callback.dirpath) if callback and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(directory / CHECKPOINT_NAME)
        return directory / CHECKPOINT_NAME
