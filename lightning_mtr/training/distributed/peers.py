"""A peer that stops answering ends the run with one line per surviving rank, not a hang.

Every collective waits at most ``TorchRecStrategy(collective_timeout=...)`` seconds. gloo then
raises a ``RuntimeError`` that names no rank (``Timed out waiting 5000ms for recv operation to
complete``), and a killed peer's closed socket names only an address and port (``Connection
closed by peer [127.0.0.1]:31111``). So each surviving rank checks in on the rendezvous store
(a key of its own, which a stopped or dead rank never writes) and, after a short wait for the
other survivors, names the ranks that did not.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import torch.distributed as dist

PEER_LOST_EXIT = 4
CHECK_IN_SECONDS = 3.0  # survivors of one failed collective fail within about this of each other
# gloo's timeout and a peer's closed socket; NCCL raises DistBackendError where its watchdog does not
# tear the process down first (its default, TORCH_NCCL_ASYNC_ERROR_HANDLING=3)
_FAILURES = re.compile(r"Timed out waiting \d+ms|Connection closed by peer|Connection reset by peer")


def lost_peer_line(error: BaseException) -> str | None:
    """The line a rank ends with when ``error`` is a collective that failed for want of a peer
    (``None`` for any other error): which ranks stopped answering and what failed. The process
    group is destroyed first: one left with a dead peer aborts the interpreter at exit."""
    if not is_peer_failure(error):
        return None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    what = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])  # gloo's source position
    what = what.split(". This is typically", 1)[0]
    silent = _silent_ranks(rank, world_size)
    dist.destroy_process_group()
    if silent is None:
        who = "rank 0 stopped answering (the rendezvous store it hosts does not answer either)"
    elif silent:
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering"
    else:
        who = "every rank still answers the rendezvous store, but a collective failed"
    return (f"rank {rank} of {world_size}: {who} ({what}); the run ends. "
            "trainer.strategy.init_args.collective_timeout sets how many seconds a collective waits")


def leave_process_group() -> bool:
    """Destroys the process group of a command that ended in step with its peers (finished, or
    preempted after every rank saved); whether several processes ran. Such a rank then ends without
    the interpreter's finalization (:func:`lightning_mtr.cli.main`): a finished 2-process fit's rank
    1 aborted in it now and then ("terminate called without an active exception", SIGABRT, no
    Python frame left: a C++ thread at static destruction), in about 1 of 6 runs of
    tests/test_preemption_ranks.py's command here, with or without the group destroyed first."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    several = dist.get_world_size() > 1
    dist.destroy_process_group()
    return several


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective of this process's group that failed for want of a peer."""
    return ((isinstance(error, dist.DistBackendError) or bool(_FAILURES.search(str(error))))
            and dist.is_available() and dist.is_initialized())


def _silent_ranks(rank: int, world_size: int) -> list[int] | None:
    """The ranks that did not check in within :data:`CHECK_IN_SECONDS`; ``None`` when the store
    itself does not answer."""
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=CHECK_IN_SECONDS))
    keys = [f"lightning_mtr/answering/{r}" for r in range(world_size)]
    deadline = time.monotonic() + CHECK_IN_SECONDS
    try:
        store.set(keys[rank], "1")
        while True:
            silent = [r for r, key in enumerate(keys) if not store.check([key])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.05)
    except RuntimeError:  # the store's own timeout, or its host (rank 0's process) is gone
        return None
