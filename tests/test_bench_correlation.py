"""lightning_mtr.benchmarks.correlation (tools/bench_correlation.py) runs end to end on tiny
settings (its numbers are the benchmark's job, not a test's): every model, correlation and seed
is trained, its loss curve recorded as the MMoE paper's Figure 4 plots it (loss against training
step), and reported."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from lightning_mtr.benchmarks.correlation import (
    BATCH, CORRELATIONS, FULL, QUICK, SIZES, best_validation, early_stopping_table, gap_curve, main, parameter_counts,
    run, table, task_pair, task_table, train,
)


def test_parameter_counts_match_as_in_the_paper():
    counts = parameter_counts()
    assert max(counts.values()) / min(counts.values()) < 1.15, counts


def test_bottom_sets_only_shared_bottoms_width():
    """--bottom 8: Shared-Bottom is 100 -> 8 shared, then per task 8 -> 8 -> 1 (weights and biases);
    the paper's 113 gives about as many parameters as MMoE's experts, gates and towers."""
    narrow, paper = parameter_counts(bottom=8), parameter_counts()
    assert narrow["shared_bottom"] == (100 * 8 + 8) + 2 * (8 * 8 + 8 + 8 + 1)
    assert paper["shared_bottom"] == (100 * 113 + 113) + 2 * (113 * 8 + 8 + 8 + 1)
    assert {name: narrow[name] for name in ("omoe", "mmoe")} == {name: paper[name] for name in ("omoe", "mmoe")}
    with pytest.raises(ValueError, match="bottom width must be positive"):
        parameter_counts(bottom=0)


def test_train_records_the_curve_every_eval_every_steps():
    """600 rows in batches of 256 are 3 steps an epoch, 6 in 2 epochs: checkpoints at steps 2, 4,
    6, each with the mean training loss of its 2 steps and each task's held-out MSE."""
    curve = train("mmoe", 0.5, seed=0, rows=600, test_rows=64, epochs=2, eval_every=2)
    assert curve["steps"] == [2, 4, 6]
    assert len(curve["train"]) == len(curve["test_tasks"]) == 3
    assert all(len(tasks) == 2 and min(tasks) > 0 for tasks in curve["test_tasks"])
    assert curve["test"] == pytest.approx([sum(tasks) for tasks in curve["test_tasks"]])
    assert all(math.isfinite(v) and v > 0 for v in curve["train"])


def test_eval_every_longer_than_the_run_is_refused():
    settings = {"rows": 512, "test_rows": 64, "epochs": 1, "seeds": 1, "eval_every": 3}
    with pytest.raises(ValueError, match="--eval-every must be in 1..2"):
        run(settings)


def test_tiny_run_reports_every_model_and_correlation(tmp_path, capsys):
    argv = ["--rows", "256", "--test-rows", "128", "--epochs", "2", "--seeds", "2", "--eval-every", "1",
            "--workers", "2", "--alpha-std", "2", "--scale", "3", "--lr", "0.02", "--bottom", "8"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in SIZES:
        assert name in printed
    assert "held-out loss along the run" in printed and "final held-out MSE per task" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [results["settings"][key] for key in ("alpha_std", "scale", "lr", "eval_every", "bottom")] == [
        2.0, 3.0, 0.02, 1, 8]
    assert results["parameters"]["shared_bottom"] == 970
    for name in SIZES:
        for correlation in CORRELATIONS:
            curves = results["curves"][name][str(correlation)]
            assert len(curves) == 2 and all(curve["steps"] == [1, 2] for curve in curves)
            assert all(math.isfinite(v) and v > 0 for curve in curves for v in curve["test"])
    # the worker processes ran exactly what one process runs, with every flag reaching train
    alone = train("shared_bottom", 0.5, seed=1, rows=256, test_rows=128, epochs=2, eval_every=1, lr=0.02,
                  alpha_std=2.0, scale=3.0, bottom=8)
    assert results["curves"]["shared_bottom"]["0.5"][1] == alone
    assert (tmp_path / "correlation.png").stat().st_size > 1000


def test_full_and_quick_runs_see_every_training_row_once():
    """As the paper generates rows until it has enough: 40k rows seen 15 times were memorised
    (Shared-Bottom's held-out loss twice its training loss), which hid the curves' shape."""
    for settings in (FULL, QUICK):
        assert settings["epochs"] == 1 and settings["rows"] >= 100_000
        assert settings["rows"] // BATCH >= 10 * settings["eval_every"]  # at least 10 points a curve


def test_the_models_of_one_seed_share_one_draw_of_rows():
    first = task_pair(0.5, 0, 300, 50)
    assert task_pair(0.5, 0, 300, 50) is first
    x, y, *_ = first
    assert x.shape == (300, 100) and y.mean(0).abs().max() < 1e-5 and (y.std(0) - 1).abs().max() < 1e-5


def _curves() -> dict:
    """Three seeds of two-checkpoint curves; every loss scales with the correlation's index."""
    tests = {"shared_bottom": [[0.9, 0.5], [0.3, 0.1], [0.6, 0.3]], "omoe": [[0.4, 0.2], [0.4, 0.2], [0.4, 0.2]],
             "mmoe": [[0.5, 0.4], [0.2, 0.05], [0.3, 0.1]]}
    trains = {"shared_bottom": [1.0, 0.2], "omoe": [0.5, 0.5], "mmoe": [0.6, 0.3]}
    return {name: {c: [{"steps": [10, 20], "train": [v * (1 + i) for v in trains[name]],
                        "test": [v * (1 + i) for v in curve],
                        "test_tasks": [[0.25 * v * (1 + i), 0.75 * v * (1 + i)] for v in curve]}
                       for curve in tests[name]]
                   for i, c in enumerate(CORRELATIONS)}
            for name in tests}


def test_table_prints_curve_mean_final_and_the_gaps_paired_by_seed():
    """Per correlation: each model's held-out loss averaged over its curve and at its end, mean ±
    standard deviation over seeds, then Shared-Bottom minus MMoE seed by seed (a hard task pair
    raises both, not the gap) for both, and for the training loss's curve mean."""
    rows = table(_curves()).splitlines()
    # by hand, correlation 1.0: Shared-Bottom's curve means 0.7, 0.2, 0.45 and finals 0.5, 0.1, 0.3;
    # MMoE's 0.45, 0.125, 0.2 and 0.4, 0.05, 0.1; training curve means 0.6 and 0.45 on every seed
    sb_curve, sb_final = [0.7, 0.2, 0.45], [0.5, 0.1, 0.3]
    mmoe_curve, mmoe_final = [0.45, 0.125, 0.2], [0.4, 0.05, 0.1]
    omoe = [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]
    gaps = ([0.25, 0.075, 0.25], [0.1, 0.05, 0.2], [0.15, 0.15, 0.15])
    for i, correlation in enumerate(CORRELATIONS):
        scale = 1 + i
        expected = [f"{correlation}"]
        for values in (sb_curve, sb_final, *omoe, mmoe_curve, mmoe_final, *gaps):
            scaled = [v * scale for v in values]
            expected += [f"{statistics.mean(scaled):.4f}", "±", f"{statistics.stdev(scaled):.4f}"]
        assert rows[1 + i].split() == expected
    assert float(rows[3].split()[-9]) == pytest.approx(3 * (0.25 + 0.075 + 0.25) / 3, abs=1e-4)


def test_gap_curve_prints_the_paired_gap_at_every_checkpoint():
    rows = gap_curve(_curves()).splitlines()
    assert rows[0].split() == ["step", "correlation", "1.0", "correlation", "0.9", "correlation", "0.5"]
    by_step = {10: [0.4, 0.1, 0.3], 20: [0.1, 0.05, 0.2]}  # Shared-Bottom minus MMoE, seed by seed
    for row, (step, gap) in zip(rows[1:], by_step.items()):
        expected = [str(step)]
        for scale in (1, 2, 3):
            expected += [f"{statistics.mean(gap) * scale:.4f}", "±", f"{statistics.stdev(gap) * scale:.4f}"]
        assert row.split() == expected
    assert len(rows) == 3


def test_task_table_prints_each_tasks_final_loss():
    rows = task_table(_curves()).splitlines()
    # correlation 0.5 (x3): Shared-Bottom's finals 0.5, 0.1, 0.3 split 1:3 between y1 and y2
    assert rows[3].split()[:3] == ["0.5", f"{0.25 * 0.3 * 3:.4f}", f"{0.75 * 0.3 * 3:.4f}"]


def test_validation_rows_are_their_own_stream_and_recorded_at_every_checkpoint():
    """--val-rows: rows drawn from their own stream (neither training nor test rows), standardised
    with the training statistics, and their summed MSE at every checkpoint beside the test loss."""
    x, y, x_test, _, x_val, y_val = task_pair(0.5, 0, 300, 50, val_rows=40)
    assert x_val.shape == (40, 100) and y_val.shape == (40, 2)
    assert not torch.equal(x_val, x_test[:40]) and not torch.equal(x_val, x[:40])
    curve = train("shared_bottom", 0.5, seed=0, rows=600, test_rows=64, epochs=2, eval_every=2, val_rows=40)
    assert len(curve["val"]) == len(curve["steps"]) == 3 and all(math.isfinite(v) and v > 0 for v in curve["val"])
    assert "val" not in train("shared_bottom", 0.5, seed=0, rows=600, test_rows=64, epochs=1, eval_every=3)


def test_best_validation_is_the_test_loss_where_validation_is_lowest():
    curve = {"steps": [10, 20, 30], "val": [0.9, 0.4, 0.6], "test": [1.0, 0.5, 0.3]}
    assert best_validation(curve) == 0.5  # not the last (0.3) nor the lowest test loss


def test_early_stopping_table_pairs_the_gap_by_seed_and_across_correlations():
    """Two seeds; Shared-Bottom's loss at its best validation checkpoint is 0.5, 0.6 at every
    correlation, MMoE's is 0.4, 0.6 at 1.0 and falls with the correlation's index i by 0.1 i on
    seed 0 and 0.05 i on seed 1, so the paired gap is [0.1, 0.0], [0.2, 0.05], [0.3, 0.1]."""
    def run_of(test: float) -> dict:  # the second checkpoint is the best on validation
        return {"steps": [1, 2], "val": [1.0, 0.5], "test": [9.0, test]}
    results = {"shared_bottom": {c: [run_of(0.5), run_of(0.6)] for c in CORRELATIONS},
               "omoe": {c: [run_of(0.7), run_of(0.7)] for c in CORRELATIONS},
               "mmoe": {c: [run_of(0.4 - 0.1 * i), run_of(0.6 - 0.05 * i)] for i, c in enumerate(CORRELATIONS)}}
    rows = early_stopping_table(results).splitlines()
    for i, (correlation, moved) in enumerate(zip(CORRELATIONS, ([0.0, 0.0], [0.1, 0.05], [0.2, 0.1]))):
        mmoe = [0.4 - 0.1 * i, 0.6 - 0.05 * i]
        gap = [0.5 - mmoe[0], 0.6 - mmoe[1]]
        expected = [str(correlation)]
        for values in ([0.5, 0.6], [0.7, 0.7], mmoe, gap, moved):
            expected += [f"{statistics.mean(values):.4f}", "±", f"{statistics.stdev(values):.4f}"]
        assert rows[1 + i].split() == [*expected, f"{sum(m > 0 for m in moved)}/2"]
    assert rows[3].split()[-1] == "2/2" and rows[1].split()[-1] == "0/2"


def test_val_rows_prints_the_early_stopping_table(tmp_path, capsys):
    argv = ["--rows", "256", "--test-rows", "64", "--val-rows", "32", "--epochs", "2", "--seeds", "2",
            "--eval-every", "1", "--workers", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test loss at the best of 32 validation rows' checkpoints" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["val_rows"] == 32
    assert all(len(curve["val"]) == 2 for curve in results["curves"]["mmoe"]["0.5"])
