"""What a training step does with a NaN or inf loss or gradient: skip the batch or stop the run.

The check of the loss must come before backward: fbgemm's fused optimizer updates the table
rows a batch touches inside backward, so nothing after it can undo a bad batch. A skipped
batch runs no backward (``MultiTaskModule.backward``), so no parameter gets a gradient and the
torch optimizers' steps leave every weight and state as it was. On several
processes every rank must take the same decision (a backward on one rank and none on another
would wait forever in TorchRec's all-to-all and DDP's all-reduce): the flags are summed over
ranks first, one ``[world, terms]`` reduction a step.

A finite loss can still give a non-finite gradient (an op whose backward is unbounded where
its forward is not, e.g. ``sqrt`` at 0, or ``a * b * c`` with ``a * c`` finite and ``a * b``
past float32's range). The dense gradients (and those of unfused tables) are checked after
backward, before any torch optimizer steps; they are all-reduced by then, so every rank sees
the same ones and decides alike. What cannot be caught is such a gradient reaching a fused
table: its rows are updated inside backward, before anything can look. The losses
(``lightning_mtr.tasks``) are computed from logits (``binary_cross_entropy_with_logits``,
``cross_entropy``, MSE) and probability chains in log space (``kernels/prob_chain.py``), whose
gradients stay bounded where the loss is finite; a table's gradient is the first dense layer's
input gradient, so a non-finite table gradient with a finite loss would need such an unbounded
op inside a model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_mtr.data.batch import RowSource

_log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss or gradient stopped training; the message names the task (or
    parameter), the rank and the batch's file and rows."""


@dataclass(frozen=True)
class BadLossPolicy:
    """What a NaN or inf loss or gradient does (``model.bad_loss`` in YAML).

    Args:
        policy: ``stop`` ends the run with :class:`NonFiniteLoss` before the bad batch changes any
            weight, so the last checkpoint is the last good state; ``skip`` leaves the weights,
            tables and optimizer states as they were, counts the batch (logged as
            ``train/skipped_batches``) and goes on.
        max_skips: under ``skip``, the most batches a run may skip; one more stops it as ``stop``
            does (a run that keeps producing NaN has diverged).
    """

    policy: Literal["skip", "stop"] = "stop"
    max_skips: int = 10

    def __post_init__(self) -> None:
        if self.policy not in ("skip", "stop"):
            raise ValueError(f"bad_loss.policy must be 'skip' or 'stop', got {self.policy!r}")
        if self.max_skips < 0:
            raise ValueError(f"bad_loss.max_skips must be >= 0, got {self.max_skips}")

    def stop_reason(self, skipped: int) -> str | None:
        """Why one more bad batch, after ``skipped`` skipped ones, ends the run (None: skip it)."""
        if self.policy == "stop":
            return "stopped (bad_loss.policy: stop); the last checkpoint is the last good state"
        if skipped >= self.max_skips:
            return (f"stopped after {skipped} skipped batches (bad_loss.max_skips: {self.max_skips}); the last "
                    "checkpoint is the last good state")
        return None


class BadBatches:
    """The policy and the count of skipped batches (``skipped``, kept in checkpoints by the
    module, so ``max_skips`` counts over a resumed run), and the two checks of a step."""

    def __init__(self, policy: BadLossPolicy):
        self.policy = policy
        self.skipped = 0

    def loss_is_bad(self, terms: dict[str, torch.Tensor], source: RowSource | None, strategy, rank: int,
                    world_size: int) -> bool:
        """Whether any rank's ``terms`` hold a NaN or inf; every rank gets the same answer from
        ``strategy.reduce`` (Lightning's), so all skip or all stop."""
        flags = strategy.reduce(bad_terms(terms, rank, world_size), reduce_op="sum")
        if not bool(flags.any()):
            return False
        self._skip(loss_message(flags, terms, rank, source))
        return True

    def gradient_is_bad(self, parameters: Iterable[tuple[str, nn.Parameter]], source: RowSource | None) -> bool:
        bad = first_bad_gradient(parameters)
        if bad is None:
            return False
        self._skip(gradient_message(bad, source))
        return True

    def _skip(self, message: str) -> None:
        """Count the batch, or raise :class:`NonFiniteLoss` when the policy says stop."""
        stop = self.policy.stop_reason(self.skipped)
        if stop is not None:
            raise NonFiniteLoss(f"{message}; {stop}")
        self.skipped += 1
        _log.warning("skipped (bad_loss.policy: skip): %s", message)  # on every rank: the bad one names its rows


def bad_terms(terms: dict[str, torch.Tensor], rank: int, world_size: int) -> torch.Tensor:
    """``[world_size, len(terms)]`` with 1 where rank ``rank``'s term is NaN or inf; summed over
    ranks by the caller, it says which rank had which bad term."""
    flags = torch.zeros(world_size, len(terms), device=next(iter(terms.values())).device)
    flags[rank] = (~torch.stack([t.detach().float().isfinite().all() for t in terms.values()])).float()
    return flags


def loss_message(flags: torch.Tensor, terms: dict[str, torch.Tensor], rank: int, source: RowSource | None) -> str:
    """One line: the first bad term and rank, its value and the batch's rows where this rank read them."""
    bad_rank, term = (int(i) for i in flags.nonzero()[0])
    name = list(terms)[term]
    where = f"rank {bad_rank}'s batch" if flags.shape[0] > 1 else "batch"
    if bad_rank != rank:
        return f"non-finite loss of {name!r} on {where} (that rank's log names its file and rows)"
    origin = f"from {source}" if source is not None else "(built in memory: no file)"
    return f"non-finite loss of {name!r} = {terms[name].detach().float().sum().item()} on {where} {origin}"


def first_bad_gradient(parameters: Iterable[tuple[str, nn.Parameter]]) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf (one host sync). A NaN or
    inf element makes its tensor's sum non-finite: summing is 0.3 ms a step for conf/debug.yaml's
    1.2M dense parameters on one CPU thread, ``isfinite().all()`` per tensor 8-12 ms; a sum past
    float32's range with finite elements is looked at element by element."""
    named = [(name, p.grad) for name, p in parameters if p.grad is not None]
    if not named:
        return None
    sums = torch.stack([grad.sum() for _, grad in named]).cpu()
    for index in (~sums.isfinite()).nonzero().flatten().tolist():
        if not bool(named[index][1].isfinite().all()):
            return named[index][0]
    return None


def gradient_message(parameter: str, source: RowSource | None) -> str:
    where = f" from {source}" if source is not None else ""
    return (f"non-finite gradient of {parameter!r} with a finite loss, batch{where} (fused tables were already "
            "updated by this backward)")
