"""The command line of :mod:`lightning_mtr.benchmarks.train` (its docstring says what it measures).

    python tools/bench_train.py --data DIR --model mmoe|esmm|... [--rows N] [--profile]
"""

from __future__ import annotations

from lightning_mtr.benchmarks.train import main

if __name__ == "__main__":
    raise SystemExit(main())
