"""``lightning-mtr export`` end to end: a checkpoint of ``lightning-mtr fit`` (conf/debug.yaml on a
tiny synthetic log) becomes an int8 artifact with an AOTInductor package, checked on the run's
test split; the C++ client scores as Python does; refusals write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lightning_mtr.cli import main
from lightning_mtr.serving import export as export_module
from lightning_mtr.serving.aot import build_client, find_compiler, score_with_client
from lightning_mtr.serving.artifact import load_artifact
from lightning_mtr.schema import Schema
from lightning_mtr.serving.checkpoint import load_run
from lightning_mtr.serving.score import manifest_schema
from lightning_mtr.serving.split import select_rows
from lightning_mtr.training.distributed.checkpoint import read_consolidated

REPO = Path(__file__).resolve().parents[1]


def _has_compiler() -> bool:
    try:
        return bool(find_compiler())
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny fit, exported with --quantize int8 --aot."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(sys, "argv", ["lightning-mtr"])
        assert main(["fit", "--config", "conf/debug.yaml", "--data.synthetic.train_rows", "3000",
                     "--data.synthetic.val_rows", "500", "--data.synthetic.test_rows", "1500",
                     "--data.synthetic.cache_dir", str(root / "cache"), "--data.batch_size", "512",
                     "--model.model.init_args.expert", "[32, 16]", "--model.model.init_args.tower", "[8]",
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(root / "run")]) == 0
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(root / "artifact"), "--quantize", "int8",
                 "--aot"]) == 0
    return {"root": root, "checkpoint": checkpoint, "artifact": root / "artifact"}


def _test_batch(exported):
    """The run's test rows as the program takes them, and the trained model's probabilities."""
    run = load_run(exported["checkpoint"])
    batch, raw = next(export_module._batches(run.schema, run, run.test_files(), 700))
    inputs = (raw.dense, raw.sparse.values(), raw.sparse.lengths().view(len(run.schema.sparse), -1).long())
    with torch.no_grad():
        expected = export_module.probabilities(run.schema, run.model(batch.dense, batch.sparse))
    return inputs, expected


def test_score_reads_back_a_manifest_schema_with_pointwise_weights():
    """JSON writes a dict's integer keys as text: DUPN's ltr task's {0: 1, 1: 1, 2: 5} came back as
    {"0": 1, ...}, which the schema refuses, so `score` stopped on every DUPN artifact with
    "pointwise_weights keys are relevance grades (integers >= 0), got '0'"."""
    schema = Schema.from_yaml(REPO / "conf/schemas/dupn_synthetic.yaml")
    manifest = json.loads(json.dumps({"schema": asdict(schema)}))
    assert manifest_schema(manifest) == schema


def test_manifest_describes_inputs_hashing_outputs_and_checks(exported):
    manifest = json.loads((exported["artifact"] / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt2", "model.aoti.pt2", "user.pt2", "item.pt2"}
    assert manifest["model"]["class_path"] == "lightning_mtr.models.MMoE"
    assert manifest["model"]["init_args"]["expert"] == [32, 16]
    assert [o["name"] for o in manifest["outputs"]] == ["ctr", "cvr", "ctcvr"]
    assert manifest["quantize"] == "int8" and manifest["versions"]["torch"] == torch.__version__
    layout = manifest["inputs"]
    assert [f["name"] for f in layout["lengths"]["features"]] == [f["name"] for f in manifest["schema"]["sparse"]]
    assert layout["dense"]["dtype"] == "float64" and layout["dense"]["shape"][1] == len(manifest["schema"]["dense"])
    assert all("mean" in f and f["std"] > 0 for f in layout["dense"]["features"])  # log1p_standardize: stats inside
    vectors = {v["string"]: v for v in manifest["hashing"]["test_vectors"]}
    # FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3): "" is the basis, and
    # "a" = (basis ^ 0x61) * prime mod 2^64
    assert vectors[""]["fnv1a_64"] == "0xcbf29ce484222325"
    a = ((0xCBF29CE484222325 ^ 0x61) * 0x100000001B3) % 2**64
    assert vectors["a"]["fnv1a_64"] == f"0x{a:016x}" == "0xaf63dc4c8601ec8c"
    sizes = {f["name"]: f["num_embeddings"] for f in layout["lengths"]["features"]}
    assert vectors["a"]["rows"] == {name: a % size for name, size in sizes.items()}
    check = manifest["check"]
    assert check["rows"] == 1500 and check["fp32_max_abs_diff"] <= 1e-5 and check["aot_max_abs_diff"] <= 1e-5
    assert set(check["quality"]["int8"]) == {"ctr", "cvr", "ctcvr"} and set(check["metric"].values()) == {"AUC"}
    for task, auc in check["quality"]["none"].items():
        assert abs(check["quality"]["int8"][task] - auc) <= 0.002
    assert check["table_bytes"]["int8"] * 3 < check["table_bytes"]["none"]  # 16-d rows: 20 bytes, not 64


def test_the_artifact_has_a_user_and_an_item_program_that_score_as_model_pt2(exported):
    from lightning_mtr.serving.split import split_difference

    artifact = load_artifact(exported["artifact"])
    split = artifact.manifest["split"]
    assert split["user"]["inputs"] == {"dense": [f"I{k}" for k in range(1, 14)],
                                       "sparse": [f"C{j}" for j in range(1, 14)] + ["position"]}
    width = split["user"]["output"][1]
    assert split["item"]["inputs"] == {"user": [1, width], "dense": [], "sparse": [f"C{j}" for j in range(14, 27)]}
    user, item = (load_artifact(exported["artifact"], split[side]["file"]).program for side in ("user", "item"))
    inputs, _ = _test_batch(exported)
    assert split_difference(load_run(exported["checkpoint"]).schema, artifact.program, user, item, inputs) <= 1e-5


def test_artifact_scores_the_test_rows_as_the_trained_model(exported):
    inputs, expected = _test_batch(exported)
    artifact = load_artifact(exported["artifact"])
    scores = artifact.score(*inputs)
    assert artifact.output_names == list(expected)
    for name, value in expected.items():
        # int8 rows: each id's row is off by at most half a step of its 255 steps
        assert (scores[name] - value).abs().max() < 0.02, name
    assert any(not torch.equal(scores[n], expected[n]) for n in expected), "int8 tables are in use"


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler ($CXX, c++, g++ or clang++) to build the client")
def test_cpp_client_scores_as_the_python_program(exported, tmp_path):
    inputs, _ = _test_batch(exported)
    artifact = load_artifact(exported["artifact"])
    client = build_client(tmp_path / "client")
    for rows in (1, 700):
        batch = select_rows(inputs, range(rows))
        got, timing = score_with_client(client, exported["artifact"] / "model.aoti.pt2", batch, artifact.output_names)
        assert f"batch {rows}," in timing
        for name, value in artifact.score(*batch).items():
            assert got[name].shape == (rows,)
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)
    package = exported["artifact"] / "model.aoti.pt2"
    dense, values, lengths = inputs
    with pytest.raises(RuntimeError, match="dtype"):  # float32 raw values would lose precision: refused
        score_with_client(client, package, (dense.float(), values, lengths), artifact.output_names)
    bad = values.clone()
    bad[0] = load_run(exported["checkpoint"]).schema.sparse[0].num_embeddings  # one past the first table
    with pytest.raises(RuntimeError, match="negative or >= its feature's num_embeddings"):
        score_with_client(client, package, (dense, bad, lengths), artifact.output_names)


def test_an_auc_beyond_the_limit_is_refused_and_nothing_written(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export_module.TOLERANCE, "int4", -1.0)  # any change is too much
    out = tmp_path / "refused"
    assert main(["export", "--ckpt", str(exported["checkpoint"]), "--out", str(out), "--quantize", "int4",
                 "--check-rows", "500"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("lightning-mtr export: error: int4 tables change the AUC of ctr")
    assert not out.exists() and not out.with_name("refused.partial").exists()


def test_fp32_scores_off_the_trained_model_are_refused(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)
    assert main(["export", "--ckpt", str(exported["checkpoint"]), "--out", str(tmp_path / "x"),
                 "--check-rows", "300"]) == 2
    assert "differ from the trained model's" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_without_a_run_record_needs_the_config(exported, tmp_path, capsys):
    state = read_consolidated(exported["checkpoint"])  # the run's checkpoint directory as one file
    del state["lightning_mtr_run"]
    bare = tmp_path / "bare.ckpt"
    torch.save(state, bare)
    assert main(["export", "--ckpt", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "pass --config with the config.yaml" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_readme_python_snippet_runs_with_only_torch(exported, tmp_path):
    """README's "From Python with only torch installed" block, on this run's artifact, in a process
    where torchrec, fbgemm_gpu, lightning and lightning_mtr cannot be imported."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("**From Python with only torch installed:**", 1)[1].split("```python\n", 1)[1]
    snippet = snippet.split("```", 1)[0].replace("artifacts/debug", str(exported["artifact"]))
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torchrec', 'fbgemm_gpu', 'lightning', 'lightning_mtr'):\n"
               "            raise ImportError('blocked: ' + name)\nsys.meta_path.insert(0, Block())\n")
    printer = "\nimport json\nprint(json.dumps({k: v.tolist() for k, v in scores.items()}))"
    done = subprocess.run([sys.executable, "-c", blocker + snippet + printer],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(scores) == ["ctr", "cvr", "ctcvr"] and all(len(v) == 2 for v in scores.values())
    inputs = torch.load(tmp_path / "inputs.pt", weights_only=True)
    expected = load_artifact(exported["artifact"]).score(*inputs)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value.tolist(), abs=1e-6)


def test_a_refused_export_leaves_an_earlier_artifact_as_it_was(exported, tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "artifact"
    earlier.mkdir()
    for name in ("manifest.json", "model.pt2"):
        (earlier / name).write_bytes((exported["artifact"] / name).read_bytes())
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)
    assert main(["export", "--ckpt", str(exported["checkpoint"]), "--out", str(earlier), "--check-rows", "300"]) == 2
    for name in ("manifest.json", "model.pt2"):
        assert (earlier / name).read_bytes() == (exported["artifact"] / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no staging left


def test_export_never_replaces_a_directory_of_other_files(exported, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"the user's data")
    assert main(["export", "--ckpt", str(exported["checkpoint"]), "--out", str(data)]) == 2
    assert "holds files but no manifest.json" in capsys.readouterr().err
    assert (data / "train.parquet").read_bytes() == b"the user's data"


def test_esmm_on_mmoes_schema_exports_with_the_weights_it_trained_with(tmp_path, monkeypatch):
    """ESMM trains MMoE's schema (cvr weight 1) with cvr weight 0; its checkpoint, the rebuilt run and
    the manifest all say 0, and export rebuilds its recorded ``bottom`` (it crashed on it)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    assert main(["fit", "--config", "conf/models/esmm.yaml", "--data.schema", "conf/schemas/synthetic_impressions.yaml",
                 "--data.synthetic.train_rows", "2000", "--data.synthetic.val_rows", "500",
                 "--data.synthetic.test_rows", "500", "--data.synthetic.cache_dir", str(tmp_path / "cache"),
                 "--data.batch_size", "500", "--model.model.init_args.tower", "[8]", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "artifact")]) == 0
    weights = {"ctr": 1.0, "cvr": 0.0, "ctcvr": 1.0}
    assert load_run(checkpoint).schema.task_weights == weights
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert {t["name"]: t["weight"] for t in manifest["schema"]["tasks"]} == weights
    assert manifest["model"]["init_args"]["bottom"] == {"class_path": "lightning_mtr.nn.SharedInput"}
