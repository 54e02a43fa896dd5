"""Does the venv hold the torch and fbgemm that its variant needs? tools/setup_env.sh runs
``python -m lightning_mtr.install_check cpu|cuda`` once both are installed, and stops on its
one-line error (exit status 2).

Two mistakes pip makes without a word: a local wheel cache (pip's ``find-links``) can hand a CUDA
venv torch's ``+cpu`` wheel, which then trains on the CPU only; and an fbgemm built for another
torch release fails, or worse, when its operators load. Only torch is imported here (its
``torch.version.cuda``); fbgemm is read from the installed distributions' metadata, not loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata

# fbgemm release -> the torch release it is built for: fbgemm_gpu 1.8.0's own table
# (_fbgemm_torch_compat_table in its __init__.py), from 1.4 on; setup_env.sh pins 1.8 with 2.13
TORCH_FOR_FBGEMM = {"1.8": "2.13", "1.7": "2.12", "1.6": "2.11", "1.5": "2.10", "1.4": "2.9"}
FBGEMM = {"cpu": "fbgemm-gpu-cpu", "cuda": "fbgemm-gpu"}  # the distribution each variant installs


@dataclass(frozen=True)
class Installed:
    """What the venv holds: torch's version and ``torch.version.cuda`` (None in a CPU build), and
    the fbgemm distributions installed, by name."""

    torch: str
    cuda: str | None
    fbgemm: dict[str, str] = field(default_factory=dict)


def installed() -> Installed:
    import torch

    found = {}
    for name in FBGEMM.values():
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return Installed(torch.__version__, torch.version.cuda, found)


def problems(variant: str, venv: Installed) -> list[str]:
    """What is wrong with ``venv`` for ``variant`` (``cpu`` or ``cuda``), one line each and the fix."""
    found = []
    if variant == "cuda" and venv.cuda is None:
        found.append(f"torch {venv.torch} is a CPU build (torch.version.cuda is None) in a CUDA venv: a local "
                     "wheel cache (pip's find-links, PIP_FIND_LINKS) may have supplied it; remove that torch "
                     "wheel from the cache or install without it (PyPI's Linux torch wheel is the CUDA build)")
    wanted, other = FBGEMM[variant], FBGEMM["cpu" if variant == "cuda" else "cuda"]
    if other in venv.fbgemm:
        found.append(f"{other} {venv.fbgemm[other]} is installed in a {variant} venv, which needs {wanted}: "
                     f"pip uninstall {other}")
    if wanted not in venv.fbgemm:
        found.append(f"{wanted} is not installed: the {variant} venv needs it (tools/setup_env.sh installs it)")
        return found
    fbgemm, torch = _release(venv.fbgemm[wanted]), _release(venv.torch)
    if fbgemm not in TORCH_FOR_FBGEMM:
        found.append(f"{wanted} {venv.fbgemm[wanted]} has no known torch release (known: {TORCH_FOR_FBGEMM}); "
                     "check fbgemm's compatibility table and add the pair to lightning_mtr/install_check.py")
    elif TORCH_FOR_FBGEMM[fbgemm] != torch:
        found.append(f"{wanted} {venv.fbgemm[wanted]} is built for torch {TORCH_FOR_FBGEMM[fbgemm]}, but torch "
                     f"{venv.torch} is installed: set LMTR_TORCH_VERSION and LMTR_FBGEMM_VERSION to a pair "
                     f"of {TORCH_FOR_FBGEMM}")
    return found


def _release(version: str) -> str:
    """``2.13.0+cu130`` -> ``2.13``; a version without a release number (a local build) as it is."""
    release = re.match(r"(\d+)\.(\d+)", version)
    return ".".join(release.groups()) if release else version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_mtr.install_check", description=__doc__)
    parser.add_argument("variant", choices=sorted(FBGEMM))
    variant = parser.parse_args(argv).variant
    venv = installed()
    found = problems(variant, venv)
    for line in found:
        print(f"setup_env: error: {line}", file=sys.stderr)
    if found:
        return 2
    print(f"setup_env: torch {venv.torch} ({f'CUDA {venv.cuda}' if venv.cuda else 'CPU'}) with "
          f"{FBGEMM[variant]} {venv.fbgemm[FBGEMM[variant]]}: a matching pair")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
