"""The command line of :mod:`lightning_mtr.benchmarks.position_bias` (its docstring says what it measures).

    python -m tools.position_bias [--rows 200000] [--seeds 0 1] [--device-spread 1]   (from the repo root)
"""

from __future__ import annotations

from lightning_mtr.benchmarks.position_bias import main

if __name__ == "__main__":
    raise SystemExit(main())
