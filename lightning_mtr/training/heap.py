"""Keep memory a training step frees in the process, for the next step, instead of handing it back
to the kernel.

glibc's malloc serves each block over its mmap threshold (32 MiB at most) with a fresh ``mmap`` and
unmaps it when freed, and trims the heap's free top back to the kernel. A training step allocates and
frees the same large activations every step (MMoE's experts at batch 4096: a [4096, 2048] fp32
block, 32 MiB), so each step faulted in, and the kernel zeroed, those pages again: 3.2M minor page
faults in a 49-step MMoE epoch, 0.3M with them kept (docs/benchmarks.md). With mmap off and the
trim threshold at its largest, freed blocks stay in malloc's heap and the next step reuses them;
the cost is that the process keeps its peak memory until it ends. jemalloc or tcmalloc (through
``LD_PRELOAD``) keep memory in the same way; off glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1  # mallopt takes a C int
SWITCH = "LMTR_KEEP_FREED_MEMORY"  # "0": malloc as the process started

@functools.cache  # once per process: the switch and the C library are read the first time only
def keep_freed_memory() -> bool:
    """Turn glibc's mmap serving and heap trimming off for this process (forked DataLoader workers
    inherit it). Returns whether it is on: False off glibc or with ``LMTR_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1  # 1: done
