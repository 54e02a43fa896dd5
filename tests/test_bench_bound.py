"""The benchmark's bound and baseline: products recorded and counted by hand, the bound's
arithmetic, the plain-PyTorch models train, and ``--rows``/table sizes stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from lightning_mtr.benchmarks import bound, plain
from lightning_mtr.benchmarks.bound import cpu_info, gemm_bound, record_gemms
from lightning_mtr.benchmarks.train import DENSE, SPARSE, table_sizes, write_first_rows

REPO = Path(__file__).resolve().parents[1]


def _mlp_step(batch: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(batch, 5)  # needs no gradient: no product for it
    return lambda: model(x).square().sum().backward()


def test_flops_of_a_tiny_mlp_match_the_hand_count_and_the_flop_counter():
    gemms, counted, custom = record_gemms(_mlp_step())
    b = 4
    forward = 2 * b * 5 * 7 + 2 * b * 7 * 3
    backward = 2 * b * 3 * 7 + 2 * 3 * b * 7 + 2 * 7 * b * 5  # layer 2: dX, dW; layer 1: dW only
    assert sum(g.flops for g in gemms) == forward + backward == counted == 1064
    assert custom == []


def test_recording_finds_each_product_with_its_layout_and_replays_it():
    gemms, _, _ = record_gemms(_mlp_step())
    ops = [g.op for g in gemms]
    assert ops.count(torch.ops.aten.addmm.default) == 2 and ops.count(torch.ops.aten.mm.default) == 3
    first = gemms[0]  # x [4, 5] @ W1.t() [5, 7]: the weight is a transposed view
    assert first.tensors == (((7,), (1,)), ((4, 5), (5, 1)), ((5, 7), (1, 5)))
    for gemm in gemms:
        args = gemm.run_args(torch.bfloat16)
        assert all(a.dtype == torch.bfloat16 for a in args if isinstance(a, torch.Tensor))
        assert [a.stride() for a in args if isinstance(a, torch.Tensor)] == [s for _, s in filter(None, gemm.tensors)]
        assert gemm.run(args).shape[-1] == gemm.tensors[-1][0][-1]


def test_batched_products_count_every_batch():
    a, b, bias = torch.randn(3, 4, 5), torch.randn(3, 5, 6), torch.randn(3, 4, 6)
    gemms, counted, _ = record_gemms(lambda: (torch.bmm(a, b), torch.baddbmm(bias, a, b)))
    assert [g.flops for g in gemms] == [2 * 3 * 4 * 5 * 6] * 2 and counted == 2 * 2 * 3 * 4 * 5 * 6


def test_custom_ops_are_named_since_their_products_are_not_counted():
    """The fused gate mix hides its product from the recorder (and from FlopCounterMode), so the
    benchmark names it; its reference composition shows it."""
    from lightning_mtr.kernels.gate_mix import gate_mix
    experts, logits = torch.randn(2, 4, 5), torch.randn(2, 3, 4)
    gemms, _, custom = record_gemms(lambda: gate_mix(experts, logits, backend="auto"))
    assert custom == ["lightning_mtr.gate_mix"] and gemms == []
    gemms, _, custom = record_gemms(lambda: gate_mix(experts, logits, backend="torch"))
    assert custom == [] and sum(g.flops for g in gemms) == 2 * 2 * 3 * 4 * 5


def test_the_bound_is_the_batch_over_the_step_time_of_its_products(monkeypatch):
    gemms, _, _ = record_gemms(_mlp_step(batch=8))
    gemms = gemms + gemms[:1]  # one product twice: timed once, counted twice
    per_dtype = {torch.float32: 1e-3, torch.bfloat16: 2.5e-4}  # seconds per product, stood in for timing
    monkeypatch.setattr(bound, "time_gemm", lambda gemm, dtype, repeats: per_dtype[dtype])
    flops = sum(g.flops for g in gemms)
    result = gemm_bound(gemms, batch_size=8, precision="bf16-mixed")
    assert result["gemm_shapes"] == 5 and result["flops_per_sample"] == round(flops / 8)
    assert result["bound_samples_per_sec"] == pytest.approx(8 / (6 * 2.5e-4), rel=1e-3)
    assert result["gemm_gflops_fp32"] == pytest.approx(flops / 6e-3 / 1e9, abs=0.05)
    assert gemm_bound(gemms, 8, "32-true")["bound_samples_per_sec"] == pytest.approx(8 / 6e-3, rel=1e-3)
    with pytest.raises(ValueError, match="no matrix product"):
        gemm_bound([], 8, "32-true")


def test_each_product_keeps_its_fastest_round():
    """A round slowed by a neighbour's load does not lower the bound: per product, the fastest round."""
    gemms, _, _ = record_gemms(_mlp_step(batch=8))
    first, second = dict.fromkeys(gemms[:2]), dict.fromkeys(gemms[2:])
    slow_first = {name: {**{g: 2e-3 for g in first}, **{g: 1e-3 for g in second}} for name in ("fp32", "bf16")}
    slow_second = {name: {**{g: 1e-3 for g in first}, **{g: 4e-3 for g in second}} for name in ("fp32", "bf16")}
    result = gemm_bound(gemms, 8, "32-true", rounds=[slow_first, slow_second])
    assert result["gemm_rounds"] == 2
    assert result["bound_samples_per_sec"] == pytest.approx(8 / (len(gemms) * 1e-3), rel=1e-3)


def test_cpu_info_reads_the_model_and_the_flags_that_set_the_gemm_rate(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Some CPU 9000\n"
                                      "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile sse\n\n"
                                      "processor\t: 1\nmodel name\t: Another CPU\nflags\t\t: fpu\n")
    assert cpu_info(tmp_path / "cpuinfo") == {"cpu_model": "Some CPU 9000",
                                              "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile"]}
    assert cpu_info(tmp_path / "missing") == {"cpu_model": "unknown", "cpu_flags": []}


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    from lightning_mtr.data.synthetic import main as synth
    out = tmp_path_factory.mktemp("log")
    assert synth(["impressions", "--out", str(out), "--train-rows", "3000", "--val-rows", "10",
                  "--test-rows", "500"]) == 0
    return out


@pytest.mark.parametrize("model", [plain.PlainMMoE, plain.PlainESMM])
def test_the_plain_baseline_trains(model, log):
    sizes = table_sizes(log / "train.parquet")
    data = plain.read_log(log / "train.parquet", sizes, DENSE)
    torch.manual_seed(0)
    shape = {"expert": [32, 16], "tower": [8]} if model is plain.PlainMMoE else {"tower": [32, 16]}
    net = model(list(sizes.values()), len(DENSE), **shape)
    losses = [plain.train_epoch(net, data, batch_size=256, seed=epoch)[1] for epoch in range(3)]
    assert sum(losses[-1]) / len(losses[-1]) < 0.9 * sum(losses[0][:3]) / 3
    scores = plain.predict(net, data)
    assert set(scores) >= {"score_ctr", "score_ctcvr"} and len(scores["score_ctr"]) == 3000


def test_rows_and_table_sizes_stream(log, tmp_path, monkeypatch):
    """Neither reads a whole file: 10M rows x 27 id columns would be 2 GB."""
    source = pq.read_table(log / "train.parquet")
    pq.write_table(source, tmp_path / "groups.parquet", row_group_size=700)  # the copy ends inside a row group
    expected = source.slice(0, 2345)
    truth = {c: pa.compute.max(expected.column(c)).as_py() + 1 for c in SPARSE}
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole table"))
    small = write_first_rows(tmp_path / "groups.parquet", 2345, tmp_path / "head.parquet")
    assert pq.ParquetFile(small).read().equals(expected)
    assert table_sizes(small) == truth  # from the row groups' statistics
    pq.write_table(expected, tmp_path / "bare.parquet", write_statistics=False, row_group_size=1000)
    assert table_sizes(tmp_path / "bare.parquet") == truth  # no statistics: one streaming pass
    with pytest.raises(ValueError, match="--rows 3001: .* has 3000 rows"):
        write_first_rows(log / "train.parquet", 3001, tmp_path / "more.parquet")
    with pytest.raises(ValueError, match="--rows 0: "):
        write_first_rows(log / "train.parquet", 0, tmp_path / "none.parquet")


def test_the_json_reports_the_bound_the_input_pipeline_and_the_plain_baseline(log, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_train.py"), "--data", str(log),
                           "--model", "mmoe", "--batch-size", "1024", "--rows", "2048", "--baseline", "plain",
                           "--repeats", "2", "--threads", "2", "--precision", "bf16-mixed",
                           "--baseline-precision", "32-true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2048
    assert (result["precision"], result["plain_precision"]) == ("bf16-mixed", "32-true")
    assert len(result["samples_per_sec_runs"]) == len(result["plain_samples_per_sec_runs"]) == 2
    assert result["flops_per_sample"] == result["flop_counter_per_sample"] > 7e6  # MMoE 8x[256, 128]: ~7.2M
    assert result["share_of_bound"] == pytest.approx(result["samples_per_sec"] / result["bound_samples_per_sec"],
                                                     abs=1e-3)
    assert result["gemm_gflops_fp32"] > 0 and result["gemm_gflops_bf16"] > 0 and result["input_rows_per_sec"] > 0
    assert {"cpu_model", "cpu_flags", "speedup_vs_plain", "plain_auc_ctr", "plain_auc_ctcvr"} <= set(result)
