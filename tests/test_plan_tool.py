"""``lightning-mtr plan`` end to end, through ``lightning_mtr.cli.main``: a 64-GPU plan of the
1e9-row config (built on the meta device, planned offline on this CPU machine), a cluster too
small for it, bad input, and a constraint the plan must honour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mtr.cli import main
from lightning_mtr.models import DUPN, MMoE
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed.planning import GIB, load_plan, plan_from_json

REPO = Path(__file__).resolve().parents[1]
LARGE = "conf/plan/large_ads.yaml"
CLUSTER_64 = ["--world-size", "64", "--devices-per-node", "8", "--hbm-gb", "80", "--ddr-gb", "512",
              "--batch-size", "8192"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths (and the schema paths inside them) are relative to the root


def _strategy(constraints: dict) -> dict:
    """TorchRecStrategy with these constraints (named: `fit` takes no init_args without a class)."""
    return {"class_path": "lightning_mtr.training.distributed.TorchRecStrategy",
            "init_args": {"constraints": constraints}}


def _overlay(tmp_path: Path, constraints: dict) -> str:
    """A second --config that adds strategy constraints, merged over the first as `fit` would."""
    path = tmp_path / "constraints.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"strategy": _strategy(constraints)}}))
    return str(path)


def _tables(plan) -> set[tuple[str, str]]:
    return {(path, table) for path, tables in plan.plan.items() for table in tables}


def test_large_config_on_64_gpus(tmp_path, capsys):
    assert main(["plan", "--config", LARGE, *CLUSTER_64, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    schema = Schema.from_yaml(REPO / "conf" / "schemas" / "large_ads.yaml")
    assert {t["table"] for t in report["tables"]} == {t.name for t in schema.tables}  # every table planned
    assert len(report["ranks"]) == 64
    for rank in report["ranks"]:
        assert 0 < rank["hbm_bytes"] < rank["hbm_cap_bytes"] == 80 * GIB

    # the JSON is what training pins: it reloads, for the same model's tables, within the world size
    saved = json.loads((tmp_path / "plan.json").read_text())
    plan = plan_from_json(saved, "cuda", local_world_size=8)
    with torch.device("meta"):
        model = MMoE(schema, num_experts=8, expert=[1024, 512], tower=[256])
    assert _tables(load_plan(tmp_path / "plan.json", model, 64, "cuda", 8)) == _tables(plan)
    assert {table for _, table in _tables(plan)} == {t.name for t in schema.tables}

    user = plan.plan["features.embeddings"]["user_id"]  # 1e9 x 128: 480 GiB cannot sit on one GPU
    assert user.sharding_type in ("row_wise", "table_row_wise") and len(user.ranks) >= 8
    assert sum(s.shard_sizes[0] for s in user.sharding_spec.shards) == 1_000_000_000
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "user_id" in out and "1,000,000,000 x 128" in out
    assert "planner estimate:" in out and "fullest HBM" in out


def test_cluster_too_small_says_what_would_fit(tmp_path, capsys):
    args = ["plan", "--config", LARGE, "--world-size", "2", "--hbm-gb", "16", "--ddr-gb", "512", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the tables do not fit: 729.8 GiB" in err and "32.0 GiB of HBM in all" in err  # the shortfall
    assert "more GPUs: at least 54" in err  # 729.8 GiB / (16 GiB less the 15% reservation)
    assert "UVM caching does not fit either" in err and "512.0" in err  # the DDR cap is too small too
    assert not (tmp_path / "plan.json").exists()


def test_uvm_caching_advice_is_checked_by_the_planner(tmp_path, capsys):
    """8 x 80 GiB hold the tables only with a large one in host DDR, which constraints here forbid
    for the two largest (the planner would otherwise choose UVM for one of them itself)."""
    fused = _overlay(tmp_path, {"user_id": {"compute_kernels": ["fused"]}, "ad_id": {"compute_kernels": ["fused"]}})
    args = ["plan", "--config", LARGE, "--config", fused, "--world-size", "8", "--hbm-gb", "80", "--ddr-gb", "2048",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "UVM caching fits (the planner checked it" in err
    assert "user_id: {compute_kernels: [fused_uvm_caching]}" in err
    assert "user_id 128 -> 64" in err  # or halve its dim


@pytest.mark.parametrize(("args", "constraints", "message"), [
    (["--config", "conf/missing.yaml", "--world-size", "8"], None, "config conf/missing.yaml not found"),
    (["--config", LARGE, "--world-size", "12", "--devices-per-node", "8"], None,
     "world size 12 must be a positive multiple"),
    (["--config", LARGE, "--world-size", "8"], {"no_such_table": {}},
     "constraints name unknown tables ['no_such_table']"),
    (["--config", LARGE, "--world-size", "8"], {"gender": {"sharding_types": ["diagonal"]}},
     "unknown sharding type ['diagonal']"),
    (["--config", "conf/schemas/large_ads.yaml", "--world-size", "8"], None,  # a schema, not a training config
     "conf/schemas/large_ads.yaml, read as `lightning-mtr fit` reads them: Option 'sparse' is not accepted"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, constraints, message):
    if constraints is not None:
        args = [*args, "--config", _overlay(tmp_path, constraints)]
    assert main(["plan", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_constraint_is_honoured(tmp_path, capsys):
    constraints = {"C26": {"sharding_types": ["column_wise"], "min_partition": 4},
                   "C25": {"compute_kernels": ["fused_uvm_caching"], "cache_load_factor": 0.5}}
    args = ["plan", "--config", "conf/debug.yaml", "--config", _overlay(tmp_path, constraints), "--world-size", "4",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "2 constrained" in capsys.readouterr().out
    plan = plan_from_json(json.loads((tmp_path / "out" / "plan.json").read_text()), "cuda", local_world_size=4)
    tables = plan.plan["features.embeddings"]
    assert tables["C26"].sharding_type == "column_wise"
    assert [s.shard_sizes for s in tables["C26"].sharding_spec.shards] == [[1_000_000, 4]] * 4  # 16 dims over 4 GPUs
    assert tables["C25"].compute_kernel == "fused_uvm_caching"
    assert tables["C25"].cache_params.load_factor == 0.5  # survives the JSON: it sizes the HBM cache


def test_tools_entry_point():
    result = subprocess.run([sys.executable, "tools/plan.py", "--config", "conf/missing.yaml", "--world-size", "8"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "config conf/missing.yaml not found" in result.stderr


def test_a_dupn_plan_pins_its_sequence_tables(tmp_path, capsys):
    """DUPN's behaviour sequence lives in unpooled tables (features.sequence_embeddings): the
    plan covers them, and training can pin it."""
    config = "conf/models/dupn.yaml"
    assert main(["plan", "--config", config, "--world-size", "2", "--out", str(tmp_path)]) == 0
    schema = Schema.from_yaml(REPO / "conf" / "schemas" / "dupn_synthetic.yaml")
    assert f"{len(schema.tables)} tables" in capsys.readouterr().out  # pooled and sequence tables counted
    with torch.device("meta"):
        model = DUPN(schema, **yaml.safe_load((REPO / config).read_text())["model"]["model"]["init_args"])
    pinned = _tables(load_plan(tmp_path / "plan.json", model, 2, "cuda", 2))
    assert {table for _, table in pinned} == {t.name for t in schema.tables}
    assert ("features.sequence_embeddings", "item") in pinned and ("features.embeddings", "user_age") in pinned


def test_sequence_tables_count_in_the_estimate_and_the_advice(tmp_path, capsys):
    """A 2e8-row sequence table is most of the bytes: the shortfall counts it, and the advice
    halves the dim the sequence tables share (the schema requires one)."""
    schema = {"sparse": [{"name": "user", "num_embeddings": 1_000_000, "embedding_dim": 16},
                         {"name": "hist_item", "num_embeddings": 200_000_000, "embedding_dim": 64, "sequence": True,
                          "max_length": 5},
                         {"name": "hist_type", "num_embeddings": 10, "embedding_dim": 64, "sequence": True,
                          "max_length": 5}],
              "tasks": [{"name": "ctr", "label": "ctr"}]}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    config = {"model": {"model": {"class_path": "lightning_mtr.models.DUPN", "init_args": {
                  "item_part": ["hist_item"], "property_part": ["hist_type"], "user_features": ["user"]}},
                        "sparse_optimizer": {"name": "rowwise_adagrad"}},
              "data": {"schema": str(tmp_path / "schema.yaml"), "batch_size": 512},
              # in HBM: the planner would otherwise move it to host memory itself
              "trainer": {"strategy": _strategy({"hist_item": {"compute_kernels": ["fused"]}})}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["plan", "--config", str(tmp_path / "config.yaml"), "--world-size", "2", "--hbm-gb", "16",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    captured = capsys.readouterr()
    # fp32 weights (dim x 4 bytes a row) and row-wise Adagrad's one fp32 accumulator a row:
    # user 1e6 x (16 x 4 + 4), hist_item 2e8 x (64 x 4 + 4), hist_type 10 x (64 x 4 + 4)
    total = 1_000_000 * 68 + 200_000_000 * 260 + 10 * 260
    assert f"3 tables, {total / GIB:.1f} GiB with rowwise_adagrad state, 1 constrained" in captured.out
    assert f"the tables do not fit: {total / GIB:.1f} GiB" in captured.err  # 48.5 GiB vs 2 x 16 GiB
    # at dim 32: 1e6 x 68 + 2e8 x 132 + 10 x 132 bytes = 24.7 GiB, under 2 x 16 GiB less 15% = 27.2 GiB
    assert "smaller embedding_dim in the schema (fits in total): hist_item 64 -> 32, hist_type 64 -> 32" \
        in captured.err


def test_fit_overrides_apply_after_the_configs(tmp_path, capsys):
    """`plan` takes `fit`'s overrides, as `fit` reads them (the hand-written parser refused them)."""
    args = ["plan", "--config", "conf/debug.yaml", "--world-size", "2", "--out", str(tmp_path),
            "--data.batch_size", "64", "--model.sparse_optimizer.name", "adam"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "with adam state" in out and "batch 64 per rank" in out


def test_configs_merge_as_fit_merges_them(tmp_path, capsys):
    """A model named by its class path alone, its init_args in a second config: `fit` merges them;
    the hand-written merge replaced the name by the init_args and found no model."""
    base = yaml.safe_load((REPO / "conf" / "debug.yaml").read_text())
    base["model"]["model"] = "lightning_mtr.models.MMoE"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sizes.yaml").write_text(yaml.safe_dump({"model": {"model": {"init_args": {"num_experts": 3}}}}))
    configs = ["--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "sizes.yaml")]
    assert main(["plan", *configs, "--world-size", "2", "--out", str(tmp_path / "out")]) == 0
    assert "planning lightning_mtr.models.MMoE" in capsys.readouterr().out

    from lightning_mtr.training.distributed.plan_tool import _fit_config
    assert _fit_config(configs).model.model.init_args.num_experts == 3


def test_a_config_fit_refuses_is_refused(tmp_path, capsys):
    """Strategy init_args over a config without that strategy: `fit` cannot tell which class they
    belong to; the hand-written merge planned with them anyway."""
    (tmp_path / "caps.yaml").write_text(yaml.safe_dump({"trainer": {"strategy": {"init_args": {"hbm_gb": 40}}}}))
    args = ["plan", "--config", "conf/debug.yaml", "--config", str(tmp_path / "caps.yaml"), "--world-size", "2",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "read as `lightning-mtr fit` reads them: Parser key \"trainer.strategy\"" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
