"""The command line of :mod:`lightning_mtr.benchmarks.esmm_vs_base` (its docstring says what it measures).

    python -m tools.esmm_vs_base --data DIR [--seeds 0 1 2] [--rows N]   (from the repo root)
"""

from __future__ import annotations

from lightning_mtr.benchmarks.esmm_vs_base import main

if __name__ == "__main__":
    raise SystemExit(main())
