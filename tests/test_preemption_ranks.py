"""Preemption and stalled peers on 2 gloo processes, through the real command line.

A signal to one rank (as a scheduler may send) stops every rank at one step with one sharded
``preempted.ckpt`` and status 75, and a resume from it equals an uninterrupted run bit for bit.
A signal to the process group of a run whose second rank Lightning launched (Ctrl+C, Kubernetes),
or to that second rank alone, ends the command with 75 and the checkpoint of the same step; one in
the sanity check, with 75 and nothing to save. A peer that stops (SIGSTOP) or dies (SIGKILL) ends
the surviving rank within the collective timeout plus seconds, with one line naming it.

Elsewhere the ranks are started as ``torchrun`` or ``srun`` would (one command per rank, their
rank in the environment), so the test sees every rank's status and signals the one it chooses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from helpers import free_port
from lightning_mtr.cli import main
from lightning_mtr.data.datamodule import SyntheticLog
from lightning_mtr.training.distributed import TorchRecStrategy
from lightning_mtr.training.distributed.peers import lost_peer_line
from lightning_mtr.training.preemption import Preemption

REPO = Path(__file__).resolve().parents[1]
# 6000 rows in batches of 256 per rank: 11 steps an epoch
DATA = ["--data.synthetic.train_rows", "6000", "--data.synthetic.val_rows", "1000",
        "--data.synthetic.test_rows", "1000", "--data.batch_size", "256"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The synthetic data, written once (a rank writing it while the other waits in a collective
    would eat into the short collective timeouts below)."""
    cache = tmp_path_factory.mktemp("cache")
    SyntheticLog(cache_dir=str(cache), train_rows=6000, val_rows=1000, test_rows=1000).ensure()
    return cache


def _command(root: Path, cache: Path, *extra: str, processes: int = 2) -> list[str]:
    two = ["--config", "conf/trainer/cpu_2proc.yaml"] if processes == 2 else []
    return [sys.executable, "-m", "lightning_mtr.cli", "fit", "--config", "conf/debug.yaml", *two,
            "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--data.synthetic.cache_dir", str(cache), *DATA, "--trainer.max_epochs", "1", *extra]


def _pause(marker: Path, rank: int | None = 1) -> list[str]:
    return ["--trainer.callbacks+=helpers.PauseAtStep", "--trainer.callbacks.step=5",
            f"--trainer.callbacks.marker={marker}", f"--trainer.callbacks.rank={rank}"]


def _env(**ranks: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
            **ranks}


def _ranks(command: list[str]) -> list[subprocess.Popen]:
    """Both ranks, started as torchrun does: Lightning joins them instead of launching its own."""
    port = str(free_port())
    return [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", NODE_RANK="0"))
            for rank in range(2)]


def _wait_for(marker: Path, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            pytest.fail("the run ended or stalled before step 5: " + "\n".join(p.communicate()[1][-2000:]
                                                                                for p in processes))
        time.sleep(0.05)


def _finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()


def _weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    single = tmp_path / f"{checkpoint.parent.parent.name}.ckpt"
    assert main(["consolidate", str(checkpoint), str(single)]) == 0
    return torch.load(single, weights_only=True)["state_dict"]


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(tmp_path, cache):
    """Rank 1 alone gets SIGTERM while it trains the batch after step 5: both ranks save one
    sharded preempted.ckpt at step 6 and exit 75, rank 0 says so on one line; resuming it on 2
    processes ends with the weights of an uninterrupted 2-process run, bit for bit."""
    marker = tmp_path / "paused"
    first = _ranks(_command(tmp_path / "first", cache, *_pause(marker)))
    _wait_for(marker, first)
    first[1].send_signal(signal.SIGTERM)
    stderr = _finish(first)
    assert [p.returncode for p in first] == [75, 75], stderr[0][-3000:] + stderr[1][-3000:]
    checkpoints = tmp_path / "first" / "checkpoints"
    checkpoint = checkpoints / "preempted.ckpt"
    assert stderr[0].strip().splitlines()[-1] == (
        f"lightning-mtr: preempted by SIGTERM on rank 1 at step 6: checkpoint {checkpoint}; "
        f"resume with --ckpt_path {checkpoint}")
    assert "preempted by" not in stderr[1], "one line, from rank 0"
    assert sorted(p.name for p in checkpoints.iterdir() if "preempted" in p.name) == ["preempted.ckpt"]
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert state["global_step"] == 6 and state["world_size"] == 2
    assert {p.name for p in checkpoint.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}, "both ranks saved"

    for name, extra in (("straight", ()), ("resumed", ("--ckpt_path", str(checkpoint)))):
        run = _ranks(_command(tmp_path / name, cache, *extra))  # one after the other: each takes a free port
        stderr = _finish(run, timeout=240)
        assert [p.returncode for p in run] == [0, 0], stderr[0][-3000:]
    expected = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt", tmp_path)
    got = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt", tmp_path)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt" / "trainer.pt",
                      weights_only=True)["global_step"] == 11
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("target", ["process_group", "launched_rank"])
def test_signal_to_a_launched_run_ends_it_with_75(tmp_path, cache, target):
    """``lightning-mtr fit`` launches its second rank itself (conf/trainer/cpu_2proc.yaml): SIGTERM
    to the whole process group (Ctrl+C's or Kubernetes' way), or to the launched rank alone, ends
    the command with 75 once both ranks saved, not with a hang (before: both ranks waited in
    ``Work.wait`` for good) or with Lightning's SIGKILL of the launcher when a child exits non-zero."""
    marker = tmp_path / "paused"
    process = subprocess.Popen(_command(tmp_path, cache, *_pause(marker)), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(marker, [process])
    if target == "process_group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        (child,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGTERM)
    try:
        (stderr,) = _finish([process])
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone, unless the test failed
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 75, stderr[-3000:]
    ranks = "ranks 0, 1" if target == "process_group" else "rank 1"
    assert f"lightning-mtr: preempted by SIGTERM on {ranks} at step 6: checkpoint " in stderr.strip().splitlines()[-1]
    assert torch.load(tmp_path / "checkpoints" / "preempted.ckpt" / "trainer.pt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("processes", [1, 2])
def test_a_signal_in_the_sanity_check_exits_75_with_nothing_to_save(tmp_path, cache, processes):
    """Before any training step (the sanity check's validation batches) there is nothing to save:
    the run ends with 75 and a line saying to run the same command again (before: status 0 on
    one process, as if it had finished; a hang on two)."""
    marker = tmp_path / "paused"
    command = _command(tmp_path, cache, "--trainer.callbacks+=helpers.PauseAtStep", "--trainer.callbacks.step=0",
                       f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.stage=sanity",
                       f"--trainer.callbacks.rank={processes - 1}", processes=processes)
    ranks = _ranks(command) if processes == 2 else [
        subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    _wait_for(marker, ranks)
    ranks[-1].send_signal(signal.SIGTERM)
    stderr = _finish(ranks)
    assert [p.returncode for p in ranks] == [75] * processes, stderr[0][-3000:]
    who = "SIGTERM on rank 1" if processes == 2 else "SIGTERM"
    assert stderr[0].strip().splitlines()[-1] == (
        f"lightning-mtr: preempted by {who} in the sanity check, before training step 1: nothing new to save; "
        "run the same command again")
    assert not list(tmp_path.rglob("preempted.ckpt*"))


TIMEOUT = 6  # seconds: long enough for a rank's step to wait for the other's on 2 busy cores


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_peer_that_stops_answering_ends_the_run_with_one_line(tmp_path, cache, stop):
    """Rank 1 stops (SIGSTOP: before, rank 0 waited 10+ minutes) or dies at step 5: rank 0 ends
    with status 4 and one line naming rank 1, no traceback, within the collective timeout (set in
    YAML) plus seconds; a killed peer, within seconds."""
    marker = tmp_path / "paused"
    ranks = _ranks(_command(tmp_path, cache, *_pause(marker), "--trainer.strategy.init_args.collective_timeout",
                            str(TIMEOUT)))
    try:
        _wait_for(marker, ranks)
        ranks[1].send_signal(stop)
        start = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - start
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
    assert ranks[0].returncode == 4, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("lightning-mtr: error: rank 0 of 2: rank 1 stopped answering ("), line
    assert "collective_timeout" in line
    if stop == signal.SIGSTOP:
        assert f"Timed out waiting {TIMEOUT * 1000}ms" in line
        assert waited < TIMEOUT + 10, waited
    else:  # through its closed socket, not the collective timeout (which alone would end it in about 10 s)
        assert "Connection closed by peer" in line or "Connection reset by peer" in line, line
        assert waited < 10, waited


def _state(pid: int) -> str | None:
    """A process's state letter (``T`` stopped, ``Z`` dead, not yet reaped), ``None`` once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_stopped_launched_rank_is_killed_when_the_run_ends(tmp_path, cache):
    """``lightning-mtr fit`` launched its second rank itself (conf/trainer/cpu_2proc.yaml) and that
    rank stops (SIGSTOP): the command ends after the collective timeout with its one line and
    status 4, and kills the stopped rank on the way out (before: it stayed behind, stopped, for good)."""
    marker = tmp_path / "paused"
    process = subprocess.Popen(_command(tmp_path, cache, *_pause(marker), "--trainer.strategy.init_args."
                                        "collective_timeout", str(TIMEOUT)),
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _wait_for(marker, [process])
        (child,) = map(int, Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split())
        os.kill(child, signal.SIGSTOP)
        (stderr,) = _finish([process])
        deadline = time.monotonic() + 5
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _state(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 4, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("lightning-mtr: error: rank 0 of 2: rank 1 stopped answering")
    assert left in (None, "Z"), f"the launched rank {child} is still there, state {left}"


# each rank: rank 1 starts 4 s late, joins, then keeps rank 0 waiting 6 s in a barrier
_LATE_RANK = """
import sys, time
import torch, torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning_mtr.training.distributed import TorchRecStrategy
rank = int(sys.argv[1])
time.sleep(4 * rank)
TorchRecStrategy(collective_timeout=2, cluster_environment=LightningEnvironment(),
                 parallel_devices=[torch.device("cpu")] * 2, process_group_backend="gloo").setup_distributed()
print("joined", flush=True)
time.sleep(6 * rank)
start = time.monotonic()
try:
    dist.barrier()
except RuntimeError:
    print(f"timed out after {time.monotonic() - start:.1f} s", flush=True)
"""


def test_a_rank_that_starts_late_still_joins_and_the_collectives_keep_their_timeout():
    """The ranks meet with torch's default patience, whatever ``collective_timeout`` is (before, a
    rank starting 4 s late ended a run of ``collective_timeout: 2`` in its rendezvous: "Timed out
    after 3 seconds waiting for clients"); a collective then still waits 2 s, not more."""
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", _LATE_RANK, str(rank)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                       NODE_RANK="0"))
             for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    (out, err), _ = outputs
    assert out.splitlines()[:1] == ["joined"], err[-2000:]
    waited = float(out.splitlines()[1].split()[3])
    assert 2 <= waited < 4, out

def test_collective_timeout_must_be_positive():
    with pytest.raises(ValueError, match="collective_timeout must be a positive number of seconds, got 0"):
        TorchRecStrategy(collective_timeout=0)
    assert TorchRecStrategy(collective_timeout=2.5)._timeout.total_seconds() == 2.5


def test_other_errors_are_not_taken_for_a_lost_peer():
    """The CLI turns only a failed collective into the lost-peer line; anything else keeps its traceback."""
    assert lost_peer_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer_line(RuntimeError("Timed out waiting 5000ms for recv operation")) is None, "no process group"


def test_a_lost_peer_takes_the_launched_ranks_out_of_lightnings_watch(tmp_path):
    """On a lost peer the launcher kills the ranks it launched and empties the list Lightning's
    watcher thread polls: left there, a killed rank made the watcher SIGKILL the launcher before
    its one line (status -9 instead of 4, about one run in two)."""
    strategy = TorchRecStrategy()
    strategy._launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    strategy.launcher.procs.append(child)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        strategy.on_exception(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    finally:
        dist.destroy_process_group()
        child.kill()
    assert strategy.launcher.procs == []
    assert child.returncode == -signal.SIGKILL


def test_a_preemption_save_that_fails_gives_the_launched_ranks_back(tmp_path):
    """The preempting launcher takes its launched ranks from Lightning's list to wait for them; a
    save that fails (a peer lost in it) hands them back, so the strategy's ``on_exception`` still
    kills them (before: a stopped one stayed behind)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    launcher.procs.append(child)

    def save_checkpoint(path):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1")

    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), checkpoint_callback=None,
                              default_root_dir=str(tmp_path), save_checkpoint=save_checkpoint, global_step=6)
    try:
        with pytest.raises(RuntimeError, match="Connection closed"):
            Preemption()._stop(trainer, "SIGTERM on rank 1", save=True)
        assert launcher.procs == [child]
    finally:
        child.kill()
        child.wait()
