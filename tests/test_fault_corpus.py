"""Every bad input and damaged checkpoint through the ``lightning-mtr`` command line, each in its
own process: each must end with exit status 2 and one line on stderr naming the file and what is
wrong, never a traceback.

The malformed rows and files are the ones tests/test_data_pipeline.py checks at the reader
(reused from there); the checkpoints are cut from one tiny ``fit``. The processes are forked by
tests/fault_driver.py after one import of the CLI, two at a time, so the corpus costs seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from lightning_mtr.cli import main
from test_data_pipeline import BAD_SCHEMA, BAD_TYPES, BAD_VALUES, MISSING, corrupt_files, good_rows, write_parquet
from test_sharded_checkpoint import _Exploit

DRIVER = Path(__file__).with_name("fault_driver.py")
MODEL = {"class_path": "lightning_mtr.models.MMoE", "init_args": {"num_experts": 2, "expert": [8], "tower": [4]}}
UNREADABLE = "not a readable checkpoint"


def _config(root: Path, model: dict) -> Path:
    """A run of a few steps of a tiny MMoE on BAD_SCHEMA's columns: the corpus's base command."""
    schema = root / "schema.yaml"
    schema.write_text(yaml.safe_dump(asdict(BAD_SCHEMA)))
    good = write_parquet(root / "good.parquet", good_rows(64))
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(root / "run")},
              "model": {"model": model},
              "data": {"schema": str(schema), "train": good, "val": good, "test": good, "batch_size": 32}}
    path = root / f"{model['class_path'].rpartition('.')[2]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(root: Path, model: dict) -> tuple[Path, Path, Path]:
    """(config, checkpoint directory, the same consolidated into one file)."""
    root.mkdir()
    config = _config(root, model)
    assert main(["fit", "--config", str(config)]) == 0
    [directory] = (root / "run" / "checkpoints").iterdir()
    assert main(["consolidate", str(directory), str(root / "single.ckpt")]) == 0
    return config, directory, root / "single.ckpt"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-mtr"])
        mmoe = _fit(root / "mmoe", MODEL)
        omoe = _fit(root / "omoe", {**MODEL, "class_path": "lightning_mtr.models.OMoE"})
    return {"root": root, "mmoe": mmoe, "omoe": omoe}


def _data_cases(root: Path, config: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """``fit`` on each malformed file of tests/test_data_pipeline.py: {name: (argv, path, words)}."""
    cases = {}
    for name, (rows, column, problem) in {**BAD_VALUES, **BAD_TYPES, **MISSING}.items():
        path = write_parquet(root / f"{name.replace(' ', '_').replace('>=', 'ge')}.parquet", rows)
        cases[name] = (["--data.train", path, "--data.val", path], path, [repr(column), problem])
    (root / "files").mkdir()
    for name, path in corrupt_files(root / "files").items():
        problem = "empty file" if name in ("empty", "header-only csv") else "unreadable"
        cases[f"{name} file"] = (["--data.train", path, "--data.val", path], path, [problem])
    leaking = root / "leaking_schema.yaml"  # test_label_leakage_is_rejected's first case
    leaking.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "sparse": [
        {"name": "c", "column": "click", "num_embeddings": 2}]}))
    cases["label used as a feature"] = (["--data.schema", str(leaking)], str(leaking), ["label leakage", "'click'"])
    deep = root / "deep_schema.yaml"  # as in tests/test_schema.py: 1,000 chained products
    deep.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "tasks": [{"name": "ctr", "label": "*".join(["c"] * 1001)}]}))
    cases["label of 1,000 chained products"] = (["--data.schema", str(deep)], str(deep),
                                                ["task 'ctr'", "deeper than 64 levels"])
    cases.update(_derived_feature_cases(root))
    for name, value in (("eval_batch_size", "0"), ("shuffle_buffer", "-1")):
        cases[f"{name} {value}"] = ([f"--data.{name}", value], f"data.{name} is {value}", ["must be at least"])
    cases.update(_schema_and_config_cases(root, config))
    return {name: (["fit", "--config", str(config), *args], path, words) for name, (args, path, words) in cases.items()}


def _derived_feature_cases(root: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """Bad boundaries, vocabularies and combos (lightning_mtr/derived.py): each names the feature and the fix."""
    features = {
        "boundaries not increasing": ({"name": "count_bucket", "column": "count", "boundaries": [5, 1]},
                                      ["each greater than the one before (e.g. [1, 10, 100]), got [5, 1]"]),
        "empty vocab_list": ({"name": "city_vocab", "column": "city", "vocab_list": []},
                             ["vocab_list must be a list of ids"]),
        "missing vocab_file": ({"name": "city_vocab", "column": "city", "vocab_file": "cities.txt"},
                               ["vocab_file 'cities.txt' not found", "relative to the schema file"]),
        "combo of one column": ({"name": "u_x_c", "combo": ["user"], "num_embeddings": 100},
                                ["combo combines two or more different columns", "use a plain id feature"]),
        "combo naming an unknown column": ({"name": "u_x_c", "combo": ["user", "town"], "num_embeddings": 100},
                                           ["missing column 'town'", "name columns the files have"]),
    }
    good = write_parquet(root / "good_for_derived.parquet", good_rows(8))
    cases = {}
    for name, (feature, words) in features.items():
        schema = root / f"{name.replace(' ', '_')}.yaml"
        schema.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "sparse": [*asdict(BAD_SCHEMA)["sparse"], feature]}))
        path = good if name.startswith("combo naming") else str(schema)
        cases[name] = (["--data.schema", str(schema), "--data.train", good, "--data.val", good], path,
                       [f"sparse feature {feature['name']!r}" if path == str(schema) else
                        f"combo feature {feature['name']!r}", *words])
    return cases


def _weighted_cases(root: Path, config: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """``fit`` with BAD_SCHEMA's tags weighed by a ``tag_weights`` column (tests/test_weighted_ids.py),
    on a bad weight column or a schema whose weights cannot apply: {name: (argv, path, words)}."""
    weighted = {**asdict(BAD_SCHEMA), "sparse": [{**f, "weight_column": "tag_weights"} if f["name"] == "tags" else f
                                                 for f in asdict(BAD_SCHEMA)["sparse"]]}
    schema = root / "weighted_schema.yaml"
    schema.write_text(yaml.safe_dump(weighted))
    good = [[0.5, 2.0]] * 6  # good_rows has two tags per row
    lists = pa.list_(pa.float64())
    files = {  # name: (tag_weights, words)
        "weights shorter than ids": (pa.array(good[:3] + [[1.0], [1.0]] + good[5:], lists),
                                     ["1 weight(s) for 2 id(s)", "'tags'", "rows 3-4"]),
        "nan weight": (pa.array(good[:3] + [[1.0, float("nan")]] + good[4:], lists), ["NaN or infinite", "row 3"]),
        "null weight": (pa.array(good[:3] + [[None, 1.0]] + good[4:], lists), ["null", "row 3"]),
        "weights as strings": (pa.array([["1"]] * 6, pa.list_(pa.string())), ["expected lists of numbers"]),
        "missing weight column": (None, ["missing column"]),
    }
    cases = {}
    for name, (weights, words) in files.items():
        rows = good_rows() if weights is None else {**good_rows(), "tag_weights": weights}
        path = write_parquet(root / f"{name.replace(' ', '_')}.parquet", rows)
        cases[name] = (["--data.schema", str(schema), "--data.train", path, "--data.val", path], path,
                       ["'tag_weights'", *words])
    sequence = root / "weighted_sequence_schema.yaml"
    sequence.write_text(yaml.safe_dump({**weighted, "sparse": [{**f, "sequence": True, "multi_valued": False}
                                                              if f["name"] == "tags" else f
                                                              for f in weighted["sparse"]]}))
    cases["weights on a sequence"] = (["--data.schema", str(sequence)], str(sequence),
                                      ["sparse feature 'tags'", "a sequence is read unpooled"])
    return {name: (["fit", "--config", str(config), *args], path, words) for name, (args, path, words) in cases.items()}


def _schema_and_config_cases(root: Path, config: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """A schema file that is missing or not YAML, a schema a model cannot train, a model argument
    out of range: jsonargparse instantiates the data module and the model inside Lightning, so
    these were tracebacks through both, ending in the message."""
    missing, broken = root / "no_such_schema.yaml", root / "broken_schema.yaml"
    broken.write_text("tasks: [\n  - {name: ctr\n")
    unknown_kind = root / "unknown_kind_schema.yaml"
    unknown_kind.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "tasks": [{"name": "ctr", "label": "click",
                                                                              "kind": "binary_classification"}]}))
    chain = root / "esmm_schema.yaml"  # ESMM's tasks but ctcvr
    chain.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "tasks": [
        {"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion", "sample_space": "click == 1"}]}))
    esmm = root / "esmm.yaml"  # a second --config: the model becomes ESMM
    esmm.write_text(yaml.safe_dump({"model": {"model": {"class_path": "lightning_mtr.models.ESMM",
                                                        "init_args": {"tower": [4]}}}}))
    return {
        "missing schema file": (["--data.schema", str(missing)], str(missing), ["cannot read schema file",
                                                                                 "No such file"]),
        "schema file that is not YAML": (["--data.schema", str(broken)], str(broken), ["not valid YAML", "line 2"]),
        "unknown task kind": (["--data.schema", str(unknown_kind)], str(unknown_kind),
                              ["kind must be one of", "'binary_classification'"]),
        "ESMM without its ctcvr task": (["--config", str(esmm), "--data.schema", str(chain)], str(chain),
                                        ["ESMM needs binary tasks", "lacks ['ctcvr']", str(esmm)]),
        "model argument out of range": (["--model.model.init_args.num_experts", "0"], str(config),
                                        ["num_experts >= 1"]),
        "a callback monitoring a task the schema lacks": (  # failed after an epoch, in a traceback
            ["--trainer.callbacks+", "EarlyStopping", "--trainer.callbacks.monitor", "val/ctcvr/auc"], str(config),
            ["EarlyStopping monitors 'val/ctcvr/auc'", "no task 'ctcvr'", "['ctr', 'cvr']", "val/loss"]),
        "no validation data": (["--data.val", "null"], "data.val", ["no val data", "limit_val_batches 0"]),
    }


def _damaged(root: Path, directory: Path, single: Path) -> dict[str, Path]:
    data = single.read_bytes()
    damaged = {name: root / f"{name}.ckpt" for name in ("truncated", "random", "empty", "tampered")}
    damaged["truncated"].write_bytes(data[: len(data) // 2])
    damaged["random"].write_bytes(np.random.default_rng(0).bytes(len(data)))
    damaged["empty"].write_bytes(b"")
    torch.save({**torch.load(single, weights_only=True), "callbacks": _Exploit()}, damaged["tampered"])
    for name in ("tampered directory", "truncated trainer.pt", "truncated tensor file", "random tensor file"):
        damaged[name] = shutil.copytree(directory, root / name.replace(" ", "_"))
    (damaged["tampered directory"] / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    trainer = damaged["truncated trainer.pt"] / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    (tensors,) = damaged["truncated tensor file"].glob("*.distcp")
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    (tensors,) = damaged["random tensor file"].glob("*.distcp")
    tensors.write_bytes(np.random.default_rng(1).bytes(tensors.stat().st_size))
    damaged["not a checkpoint directory"] = directory.parent  # the run's checkpoints/ folder
    return damaged


def _checkpoint_cases(root: Path, fitted) -> dict[str, tuple[list[str], str, list[str]]]:
    config, directory, single = fitted["mmoe"]
    damaged = _damaged(root, directory, single)
    validate = ["validate", "--config", str(config), "--ckpt_path"]
    cases = {f"{name} checkpoint": ([*validate, str(path)], str(path), [UNREADABLE])
             for name, path in damaged.items() if name in ("truncated", "random", "empty", "truncated trainer.pt")}
    cases["tampered checkpoint"] = ([*validate, str(damaged["tampered"])], str(damaged["tampered"]),
                                    ["names code", "posix.system", "refusing"])
    cases["tampered directory"] = ([*validate, str(damaged["tampered directory"])],
                                   str(damaged["tampered directory"]), ["metadata", "refusing"])
    for name in ("truncated tensor file", "random tensor file"):  # DCP's CheckpointException, a traceback before
        path = str(damaged[name])
        words = ["unreadable tensor data", "use another checkpoint"]
        cases[f"{name} (validate)"] = ([*validate, path], path, [*words, "rank 0"])
        cases[f"{name} (fit)"] = (["fit", "--config", str(config), "--ckpt_path", path], path, words)
        cases[f"{name} (consolidate)"] = (["consolidate", path, str(root / "out.ckpt")], path, words)
    folder = str(damaged["not a checkpoint directory"])
    cases["directory that is not a checkpoint"] = ([*validate, folder], folder, ["no trainer.pt"])
    cases["file where a directory is expected (fit)"] = (
        ["fit", "--config", str(config), "--ckpt_path", str(single)], str(single), ["single file", "resumes only"])
    cases["file where a directory is expected (consolidate)"] = (
        ["consolidate", str(single), str(root / "out.ckpt")], str(single), ["not a lightning-mtr checkpoint directory"])
    cases["directory where a file is expected (consolidate)"] = (
        ["consolidate", str(directory), str(root)], str(root), ["is a directory", "one file"])
    cases["random bytes to export"] = (["export", "--ckpt", str(damaged["random"]), "--out", str(root / "art")],
                                       str(damaged["random"]), [UNREADABLE])
    # a checkpoint naming a class outside MODELS, whose module would leave a mark if imported
    (root / "fault_marker_model.py").write_text(f"open({str(root / 'imported')!r}, 'w').close()\nModel = None\n")
    state = torch.load(single, weights_only=True)
    state["lightning_mtr_run"]["model"]["class_path"] = "fault_marker_model.Model"
    torch.save(state, root / "foreign.ckpt")
    cases["checkpoint naming code to export"] = (
        ["export", "--ckpt", str(root / "foreign.ckpt"), "--out", str(root / "art")], str(root / "foreign.ckpt"),
        ["fault_marker_model.Model", "not one of lightning-mtr's registered models"])
    _, _, omoe_single = fitted["omoe"]
    cases["checkpoint of another model"] = ([*validate, str(omoe_single)], str(omoe_single),
                                            ["lightning_mtr.models.OMoE", "lightning_mtr.models.mmoe.MMoE"])
    cases.update(_warm_start_cases(root, fitted, damaged))
    return cases


def _warm_start_cases(root: Path, fitted, damaged: dict[str, Path]) -> dict[str, tuple[list[str], str, list[str]]]:
    """``fit --warm_start`` from what is not a usable checkpoint for it."""
    config, directory, single = fitted["mmoe"]
    _, omoe_directory, _ = fitted["omoe"]
    fit = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root / "warm"), "--warm_start"]
    missing, folder = root / "no_such_day", damaged["not a checkpoint directory"]
    resized = asdict(BAD_SCHEMA)
    resized["sparse"][0]["num_embeddings"] *= 2
    (root / "resized_schema.yaml").write_text(yaml.safe_dump(resized))
    return {
        "warm start from a checkpoint of a resized table": (
            [*fit, str(directory), "--data.schema", str(root / "resized_schema.yaml")], str(directory),
            ["does not fit this model", "user.weight is (100, 16), the model's (200, 16)"]),
        "warm start with --ckpt_path": ([*fit, str(directory), "--ckpt_path", str(directory)], str(directory),
                                        ["--warm_start", "--ckpt_path", "pass one of them"]),
        "warm start from a missing path": ([*fit, str(missing)], str(missing), ["no such checkpoint"]),
        "warm start from a directory that is not a checkpoint": ([*fit, str(folder)], str(folder), ["no trainer.pt"]),
        "warm start from random bytes": ([*fit, str(damaged["random"])], str(damaged["random"]), [UNREADABLE]),
        "warm start from another model's checkpoint": (
            [*fit, str(omoe_directory)], str(omoe_directory),
            ["lightning_mtr.models.OMoE", "lightning_mtr.models.mmoe.MMoE"]),
        "warm start keeping optimizer state from a single file": (
            [*fit, str(single), "--warm_start_sparse_optimizer", "keep"], str(single),
            ["single file", "no optimizer state"]),
    }


def test_every_fault_ends_in_one_line_and_status_2(fitted, tmp_path):
    cases = {**_data_cases(tmp_path, fitted["mmoe"][0]), **_weighted_cases(tmp_path, fitted["mmoe"][0]),
             **_checkpoint_cases(tmp_path, fitted)}
    (tmp_path / "cases.json").write_text(json.dumps({name: argv for name, (argv, _, _) in cases.items()}))
    path = [str(DRIVER.parents[1]), str(tmp_path), os.environ.get("PYTHONPATH", "")]  # tmp_path: the marker module
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "cases.json")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    failures = []
    for name, (_, path, words) in cases.items():
        status, stderr = results[name]["status"], results[name]["stderr"]
        # the error lines (`lightning-mtr[ COMMAND]: error: ...`); info lines such as the precision one may precede
        errors = [line for line in stderr.splitlines() if re.match(r"lightning-mtr( [a-z]+)?: error: ", line)]
        line = errors[-1] if errors else ""
        if (status != 2 or "Traceback" in stderr or len(errors) != 1 or path not in line
                or not all(word in line for word in words)):
            failures.append(f"{name}: status {status}, {stderr.strip().splitlines()[-1:]}")
    print(f"{len(cases)} fault cases, each through the CLI in its own process")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "imported").exists(), "a checkpoint chose a module to import"


def test_the_config_decides_the_model_not_the_checkpoint(fitted, monkeypatch, capsys):
    """An OMoE checkpoint whose Lightning ``hyper_parameters`` name OMoE, passed to an MMoE config:
    LightningCLI used to merge them, so the run validated an OMoE without a word."""
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    config, _, _ = fitted["mmoe"]
    _, _, omoe = fitted["omoe"]
    state = torch.load(omoe, weights_only=True)
    state["hyper_parameters"] = {"model": state["lightning_mtr_run"]["model"]}
    forged = fitted["root"] / "hyper.ckpt"
    torch.save(state, forged)
    assert main(["validate", "--config", str(config), "--ckpt_path", str(forged)]) == 2
    assert (f"lightning-mtr: error: {forged} holds a lightning_mtr.models.OMoE but the config builds "
            "lightning_mtr.models.mmoe.MMoE") in capsys.readouterr().err
