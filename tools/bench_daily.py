"""The command line of :mod:`lightning_mtr.benchmarks.daily` (its docstring says what it measures).

    python -m tools.bench_daily --out runs/bench_daily [--days 5] [--rows-per-day 30000] [--seed 0]
"""

from __future__ import annotations

from lightning_mtr.benchmarks.daily import main

if __name__ == "__main__":
    raise SystemExit(main())
