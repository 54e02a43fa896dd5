"""``make test`` runs a pytest worker per core (pytest-xdist): each worker, and every process its
tests start, keeps to its share of the cores (tests/conftest.py), or compute-bound tests slow down
several times over as the workers' OpenMP threads wait on each other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def test_each_worker_and_its_subprocesses_take_their_share_of_the_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers == 1:
        pytest.skip("pytest runs in one process (no -n): it keeps torch's default threads")
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    assert torch.get_num_threads() == share
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) == share
