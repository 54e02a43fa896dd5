"""The command line of :mod:`lightning_mtr.benchmarks.serving` (its docstring says what it measures).

    python tools/bench_serving.py [--models dupn mmoe] [--candidates 10000] [--requests 200] ...
"""

from __future__ import annotations

import sys

from lightning_mtr.benchmarks.serving import main

if __name__ == "__main__":
    main(sys.argv[1:])
