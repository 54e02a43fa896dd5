"""tools/bench_correlation.py runs end to end on tiny settings (its numbers are the benchmark's
job, not a test's): every model, correlation and seed is trained and reported."""

from __future__ import annotations

import json
import math

from tools.bench_correlation import CORRELATIONS, MODELS, main, parameter_counts


def test_parameter_counts_match_as_in_the_paper():
    counts = parameter_counts()
    assert max(counts.values()) / min(counts.values()) < 1.15, counts


def test_tiny_run_reports_every_model_and_correlation(tmp_path, capsys):
    assert main(["--rows", "256", "--test-rows", "128", "--epochs", "1", "--seeds", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in MODELS:
        assert name in printed
    results = json.loads((tmp_path / "results.json").read_text())
    for name in MODELS:
        for correlation in CORRELATIONS:
            losses = results["losses"][name][str(correlation)]
            assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (tmp_path / "correlation.png").stat().st_size > 1000
