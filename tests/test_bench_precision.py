"""bench_precision's table: the per-seed differences, their mean and the verdict, from hand-made runs."""

from __future__ import annotations

import json

import pytest

from lightning_mtr.benchmarks.precision import main, table


def _run(seed: int, precision: str, ctr: float, ctcvr: float, model: str = "mmoe") -> dict:
    return {"model": model, "seed": seed, "precision": precision, "aucs": {"ctr": ctr, "ctcvr": ctcvr}}


RUNS = [_run(0, "32-true", 0.8500, 0.9200), _run(0, "bf16-mixed", 0.8490, 0.9230),
        _run(1, "bf16-mixed", 0.8600, 0.9100), _run(1, "32-true", 0.8620, 0.9100),
        _run(2, "32-true", 0.5, 0.5)]  # seed 2 has no bf16 run: left out


def test_differences_mean_and_verdict_per_task():
    text, within = table(RUNS, tolerance=0.002)
    lines = text.splitlines()
    assert lines[0] == "mmoe: test AUC, bf16-mixed - 32-true over seeds [0, 1] (tolerance 0.002)"
    assert lines[2].split() == ["ctr", "0", "0.85000", "0.84900", "-0.00100"]
    assert lines[3].split() == ["ctr", "1", "0.86200", "0.86000", "-0.00200"]
    assert lines[4].split() == ["ctr", "mean", "-0.00150", "within", "0.002"]
    assert lines[5].split() == ["ctcvr", "0", "0.92000", "0.92300", "+0.00300"]
    assert lines[7].split() == ["ctcvr", "mean", "+0.00150", "NOT", "within", "0.002"]  # seed 0 is off by 0.003
    assert lines[-1] == "every task within 0.002 of fp32: NO" and not within
    assert table(RUNS, tolerance=0.003)[1]


def test_the_table_of_a_results_file_and_its_exit_status(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(run) + "\n" for run in RUNS))
    assert main(["--table", str(results), "--tolerance", "0.003"]) == 0
    assert capsys.readouterr().out.endswith("every task within 0.003 of fp32: yes\n")
    assert main(["--table", str(results)]) == 1


def test_a_model_without_both_runs_of_any_seed_is_refused():
    with pytest.raises(ValueError, match="esmm: no seed has both a 32-true and a bf16-mixed run"):
        table([*RUNS, _run(0, "32-true", 0.8, 0.9, model="esmm")])
