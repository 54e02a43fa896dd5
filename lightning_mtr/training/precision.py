"""Which precision a run trains in, and why: does the device have bf16 units?

bf16 matrix products run on dedicated units where the hardware has them (x86: AVX-512 BF16's
``vdpbf16ps``, AMX tiles; Arm: the BF16 extension's ``bfmmla``, also under SVE; NVIDIA from
Ampere on). Elsewhere bf16 is emulated through fp32 (oneDNN on CPU): conversions around the same
fp32 math, so slower than fp32 (docs/precision.md). So ``precision: auto`` picks ``bf16-mixed`` only
where there are units, and every run's first lines say which precision runs and what the device
could do instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"
BF16 = "bf16-mixed"
DEFAULT = "32-true"
# torch.cpu.get_capabilities()'s keys (cpuinfo's; /proc/cpuinfo spells the same flags alike) -> the units' name,
# the fastest first: AMX needs both its tiles and their bf16 instructions
CPU_UNITS = ((("amx_bf16", "amx_tile"), "AMX BF16"), (("avx512_bf16",), "AVX-512 BF16"),
             (("sve_bf16",), "SVE BF16"), (("bf16",), "Arm BF16"))
CPUINFO = Path("/proc/cpuinfo")


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's own answer (cpuinfo, every architecture); the kernel's flags where torch has none."""
    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch without get_capabilities, or cpuinfo failing to start
        return dict.fromkeys(_cpuinfo_flags(), True)


def cpuinfo_fields(path: Path | None = None) -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``model name``, ``flags`` on x86, ``Features``
    on Arm, ...); empty off Linux."""
    try:
        text = (path or CPUINFO).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at its blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpuinfo_flags() -> set[str]:
    fields = cpuinfo_fields()
    return set(fields.get("flags", fields.get("Features", "")).split())


def cpu_bf16_units(capabilities: Mapping[str, Any] | None = None) -> str | None:
    """The CPU's bf16 units by name (``"AVX-512 BF16"``), or None where bf16 is emulated."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    for flags, name in CPU_UNITS:
        if all(capabilities.get(flag) for flag in flags):
            return name
    return None


def bf16_units(accelerator: str) -> str | None:
    """The run's device's bf16 units (``"AVX-512 BF16 units"``), or None: ``accelerator`` as the
    Trainer resolved it (``cpu``, ``cuda``); a GPU counts from compute capability 8.0, not emulation."""
    if accelerator == "cpu":
        units = cpu_bf16_units()
        return units and f"{units} units"
    if accelerator == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16 tensor cores"
    return None


def resolve(precision: Any, accelerator: Any) -> Any:
    """``auto``: ``bf16-mixed`` on a device with bf16 units, ``32-true`` elsewhere; any other value as
    given. ``accelerator``: the Trainer's argument (``auto`` means CUDA where torch sees a GPU)."""
    if precision != AUTO:
        return precision
    if accelerator in ("gpu", "auto"):
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return BF16 if isinstance(accelerator, str) and bf16_units(accelerator) else DEFAULT


def precision_line(asked: Any, runs: str, accelerator: str) -> str:
    """The run's first line: which precision ``runs`` (``asked``: the config's, None for the default)
    and why, naming the units that make bf16 worth it, or warning that bf16 is emulated here."""
    units = bf16_units(accelerator)
    device = "GPU" if accelerator == "cuda" else accelerator.upper()
    if asked == AUTO:
        why = f"this {device} has {units}" if units else \
            f"this {device} has no bf16 units, so bf16 would be emulated and slower"
        return f"precision {runs} (auto): {why}"
    if runs.startswith("bf16"):
        if units:
            return f"precision {runs}: this {device} has {units}"
        return (f"precision {runs}: this {device} has no bf16 units, so bf16 is emulated through fp32 "
                f"and trains slower than 32-true; running it as asked")
    reason = "the default" if asked is None else "as configured"
    hint = f"; this {device} has {units}: --trainer.precision {BF16} trains faster" if units else ""
    return f"precision {runs} ({reason}){hint}"
