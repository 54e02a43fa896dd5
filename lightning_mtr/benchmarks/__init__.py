"""Benchmarks behind docs/benchmarks.md's numbers, as importable code: their command lines are the thin
scripts in ``tools/`` (``python tools/bench_train.py ...``), and the tests run them on tiny settings.
They read ``conf/`` from the repository, so run them from a checkout."""
