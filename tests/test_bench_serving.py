"""lightning_mtr.benchmarks.serving (tools/bench_serving.py) on tiny sizes: every path runs, the
split scores as the monolithic program, and the table has a line per model, tables, threads and path."""

from __future__ import annotations

from lightning_mtr.benchmarks.serving import main


def test_bench_serving_runs_every_path_and_the_split_matches(capsys):
    rows = main(["--candidates", "8", "--requests", "3", "--monolithic-requests", "2", "--threads", "1",
                 "--quantize", "int8", "--max-rows", "50"])
    assert {(r["model"], r["tables"], r["path"]) for r in rows} == {
        (m, t, p) for m in ("dupn", "mmoe") for t in ("int8",) for p in ("monolithic", "split")}
    for row in rows:
        assert row["max_abs_diff"] <= 1e-5
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["gemm_bound_ms"] > 0 and row["gflop"] > 0
        assert row["requests"] == (3 if row["path"] == "split" else 2)
    # the split does the user's work once: fewer FLOPs than repeating it on every candidate
    flops = {(r["model"], r["tables"], r["path"]): r["gflop"] for r in rows}
    assert all(flops[(m, t, "split")] < flops[(m, t, "monolithic")] for m in ("dupn", "mmoe") for t in ("int8",))
    table = capsys.readouterr().out
    assert table.count("| split |") == 2 and table.count("| monolithic |") == 2
