"""Benchmarks and experiment scripts (run from the repo root: python -m tools.NAME or python tools/NAME.py)."""
