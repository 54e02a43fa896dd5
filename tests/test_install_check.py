"""tools/setup_env.sh's check of the venv (lightning_mtr/install_check.py): a CPU torch in a CUDA
venv, the other variant's fbgemm, or an fbgemm built for another torch release each stop the setup
with a line saying what to do. Fakes stand in for a CUDA venv (this machine has none); the real
venv must pass its own variant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_mtr.install_check import Installed, installed, problems

REPO = Path(__file__).resolve().parents[1]
CUDA = Installed("2.13.0", "13.0", {"fbgemm-gpu": "1.8.0"})  # what PyPI's pinned pair reports
CPU = Installed("2.13.0+cpu", None, {"fbgemm-gpu-cpu": "1.8.0"})


@pytest.mark.parametrize("variant, venv", [("cuda", CUDA), ("cpu", CPU),
                                           ("cuda", Installed("2.13.1+cu130", "13.0", {"fbgemm-gpu": "1.8.0"})),
                                           ("cuda", Installed("2.12.0", "12.9", {"fbgemm-gpu": "1.7.0"}))])
def test_the_pinned_pairs_pass(variant, venv):
    assert problems(variant, venv) == []


def test_a_cpu_torch_in_a_cuda_venv_is_refused():
    """What a local wheel cache did: ``+cpu`` torch beside the CUDA fbgemm."""
    [line] = problems("cuda", Installed("2.13.0+cpu", None, {"fbgemm-gpu": "1.8.0"}))
    assert "torch 2.13.0+cpu is a CPU build" in line and "CUDA venv" in line and "find-links" in line


@pytest.mark.parametrize("venv, words", [
    (Installed("2.12.0", "13.0", {"fbgemm-gpu": "1.8.0"}), ["fbgemm-gpu 1.8.0 is built for torch 2.13",
                                                            "torch 2.12.0 is installed", "LMTR_FBGEMM_VERSION"]),
    (Installed("2.13.0", "13.0", {"fbgemm-gpu": "1.3.0"}), ["fbgemm-gpu 1.3.0 has no known torch release"]),
    (Installed("2.13.0", "13.0", {}), ["fbgemm-gpu is not installed"]),
    (Installed("2.13.0", "13.0", {"fbgemm-gpu": "INTERNAL"}), ["fbgemm-gpu INTERNAL has no known torch release"]),
    (Installed("2.13.0", "13.0", {"fbgemm-gpu": "1.8.0", "fbgemm-gpu-cpu": "1.8.0"}),
     ["fbgemm-gpu-cpu 1.8.0 is installed in a cuda venv", "pip uninstall fbgemm-gpu-cpu"]),
])
def test_a_mismatched_fbgemm_is_refused(venv, words):
    [line] = problems("cuda", venv)
    assert all(word in line for word in words), line


def test_a_cpu_venv_refuses_the_cuda_fbgemm():
    [line] = problems("cpu", Installed("2.13.0+cpu", None, {"fbgemm-gpu-cpu": "1.8.0", "fbgemm-gpu": "1.8.0"}))
    assert "fbgemm-gpu 1.8.0 is installed in a cpu venv" in line


def test_this_venv_passes_its_own_variant_and_setup_env_runs_the_check():
    variant = "cpu" if torch.version.cuda is None else "cuda"
    assert problems(variant, installed()) == []
    done = subprocess.run([sys.executable, "-m", "lightning_mtr.install_check", variant], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "a matching pair" in done.stdout, done.stderr
    assert '-m lightning_mtr.install_check "$LMTR_VARIANT"' in (REPO / "tools" / "setup_env.sh").read_text()
