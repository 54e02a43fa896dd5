"""tools/bench_correlation.py runs end to end on tiny settings (its numbers are the benchmark's
job, not a test's): every model, correlation and seed is trained and reported."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from tools.bench_correlation import CORRELATIONS, MODELS, main, parameter_counts, table


def test_parameter_counts_match_as_in_the_paper():
    counts = parameter_counts()
    assert max(counts.values()) / min(counts.values()) < 1.15, counts


def test_tiny_run_reports_every_model_and_correlation(tmp_path, capsys):
    argv = ["--rows", "256", "--test-rows", "128", "--epochs", "1", "--seeds", "2", "--workers", "1",
            "--alpha-std", "2", "--scale", "3", "--lr", "0.01"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in MODELS:
        assert name in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [results["settings"][key] for key in ("alpha_std", "scale", "lr")] == [2.0, 3.0, 0.01]
    for name in MODELS:
        for correlation in CORRELATIONS:
            losses = results["losses"][name][str(correlation)]
            assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (tmp_path / "correlation.png").stat().st_size > 1000


def test_table_prints_spread_median_and_the_gap_paired_by_seed():
    """Per correlation: each model's mean ± standard deviation and median over seeds, then
    Shared-Bottom minus MMoE seed by seed (a hard task pair raises both, not the gap)."""
    losses = {"shared_bottom": [0.5, 0.1, 0.3], "omoe": [0.2, 0.2, 0.2], "mmoe": [0.4, 0.05, 0.1]}
    results = {name: {c: [v * (1 + i) for v in values] for i, c in enumerate(CORRELATIONS)}
               for name, values in losses.items()}
    rows = table(results).splitlines()
    assert rows[0].split() == ["correlation", "shared_bottom", "omoe", "mmoe", "shared_bottom", "-", "mmoe"]
    for i, correlation in enumerate(CORRELATIONS):
        scale = 1 + i
        gap = [(b - m) * scale for b, m in zip(losses["shared_bottom"], losses["mmoe"])]  # 0.1, 0.05, 0.2
        expected = [f"{correlation}"]
        for values in losses.values():
            scaled = [v * scale for v in values]
            expected += [f"{statistics.mean(scaled):.4f}", "±", f"{statistics.stdev(scaled):.4f}", "(median",
                         f"{statistics.median(scaled):.4f})"]
        expected += [f"{sum(gap) / 3:.4f}", "±", f"{statistics.stdev(gap):.4f}"]
        assert rows[1 + i].split() == expected
    assert float(rows[-1].split()[-3]) == pytest.approx(3 * (0.1 + 0.05 + 0.2) / 3, abs=1e-4)
