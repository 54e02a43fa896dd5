"""The command line of :mod:`lightning_mtr.benchmarks.correlation` (its docstring says what it measures).

    python -m tools.bench_correlation [--quick] [--workers 2] [--out runs/bench_correlation]   (repo root)
"""

from __future__ import annotations

from lightning_mtr.benchmarks.correlation import main

if __name__ == "__main__":
    raise SystemExit(main())
