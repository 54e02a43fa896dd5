"""Running a kernel test's script under Triton's interpreter. Kept apart from helpers.py (which
imports Lightning and TorchRec) so the kernel tests need nothing but torch and triton: a GPU host
with only those can run their CUDA tiers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_triton_interpreter(script: str, *args: str) -> str:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (it must be set before
    triton is imported), from the repository root with the package and tests/ importable;
    fails the calling test on a non-zero exit and returns the script's stdout."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, "TRITON_INTERPRET": "1",
                                                                      "PYTHONPATH": path},
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout
