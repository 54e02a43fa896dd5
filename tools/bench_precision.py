"""The command line of :mod:`lightning_mtr.benchmarks.precision` (its docstring says what it measures).

    python tools/bench_precision.py --data DIR --model mmoe --seeds 0 1 2 [--results FILE]
"""

from __future__ import annotations

from lightning_mtr.benchmarks.precision import main

if __name__ == "__main__":
    raise SystemExit(main())
