"""Memory a step frees stays in the process (lightning_mtr/training/heap.py): building the Trainer
turns glibc's mmap serving off, so a step's large activations, freed and allocated again, fault in no
new pages; ``LMTR_KEEP_FREED_MEMORY=0`` leaves malloc as it was. Each case is a fresh process, as
the setting is the process's."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")

STEPS = 10
# a step's worth of large activations (64 MiB: over glibc's largest mmap threshold, 32 MiB), written,
# freed and allocated again; prints the minor page faults of STEPS such steps after a first one
FAULTS = f"""
import resource, torch
from lightning_mtr.training.trainer import Trainer
Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
def step():
    activations = torch.ones(4096, 4096)
    del activations
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({STEPS}):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(switch: str | None) -> int:
    env = {key: value for key, value in os.environ.items() if key != "LMTR_KEEP_FREED_MEMORY"}
    if switch is not None:
        env["LMTR_KEEP_FREED_MEMORY"] = switch
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_freed_activations_are_reused_without_new_pages_unless_switched_off():
    kept, released = minor_faults(None), minor_faults("0")
    # kept: at most one block's pages over all the steps (a small allocation may take the start of the
    # freed block once, and the heap then grows by one block), and a few the interpreter's own small
    # allocations touch (16,385 in one CI run: 0 or 16,384 otherwise); released: every step faults its
    # block in again, 16,384 pages of 4 KiB, at least once per 2 MiB where transparent huge pages back it
    assert kept <= (64 << 20) // resource.getpagesize() + 64, kept
    assert released >= STEPS * (64 << 20) // (2 << 20), released
