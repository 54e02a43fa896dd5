"""``lightning-mtr score``: a log without labels -> the artifact's scores, as ``predict`` gives them.

One tiny ``fit`` of conf/debug.yaml (2 steps, small experts) and one ``export`` are shared by the
module. The scored log is the test split without its labels or ground truth, its rows shuffled and
numbered in a ``row_id`` column, so the order of the output can be checked against the input's.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from lightning_mtr.cli import main
from lightning_mtr.schema import Schema
from lightning_mtr.serving.artifact import MANIFEST, PROGRAM
from lightning_mtr.serving.export import export

REPO = Path(__file__).resolve().parents[1]
CONFIG = "conf/debug.yaml"
SCHEMA = Schema.from_yaml(REPO / "conf" / "schemas" / "synthetic_impressions.yaml")
SCORES = ["score_ctr", "score_cvr", "score_ctcvr"]
TOLERANCE = 1e-5  # export's own fp32 parity limit


def _run_args(root: Path) -> list[str]:
    """The tiny run's arguments, shared by ``fit`` and ``predict``."""
    synthetic = {"train_rows": 3000, "val_rows": 1000, "test_rows": 1000, "seed": 0, "cache_dir": str(root / "cache")}
    return ["--config", CONFIG, "--data.synthetic", json.dumps(synthetic), "--data.batch_size", "512",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.default_root_dir", str(root / "run"),
            "--trainer.enable_progress_bar", "false", "--model.model.init_args.num_experts", "2",
            "--model.model.init_args.expert", "[16]", "--model.model.init_args.tower", "[8]"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Fit, export, and the label-free log (``log.parquet``, shuffled, with ``row_id``)."""
    root = tmp_path_factory.mktemp("score")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist
        assert main(["fit", *_run_args(root)]) == 0
    [checkpoint] = (root / "run").rglob("last.ckpt")
    export(checkpoint, root / "artifact")
    test = pq.read_table(next((root / "cache").glob("*/test.parquet")))
    order = np.random.default_rng(0).permutation(test.num_rows)
    log = test.select(SCHEMA.input_columns).take(pa.array(order)).append_column("row_id", pa.array(order))
    pq.write_table(log, root / "log.parquet")
    return {"root": root, "checkpoint": checkpoint, "artifact": root / "artifact", "log": log}


def _score(served, data: list[Path], out: Path, *extra: str, artifact: Path | None = None) -> list[pa.Table]:
    """``lightning-mtr score`` -> its part files, in order."""
    assert main(["score", "--artifact", str(artifact or served["artifact"]), "--data", *map(str, data),
                 "--out", str(out), *extra]) == 0
    return [pq.read_table(part) for part in sorted(out.glob("part-*.parquet"))]


@pytest.fixture(scope="module")
def scored(served):
    """``log.parquet`` scored once, keeping ``row_id``: one row per input row, in input order."""
    [table] = _score(served, [served["root"] / "log.parquet"], served["root"] / "scored", "--extras", "row_id")
    assert table.column_names == SCORES + ["row_id"]
    assert table["row_id"].to_pylist() == served["log"]["row_id"].to_pylist()
    return table


def _assert_same_scores(table: pa.Table, reference: pa.Table) -> None:
    assert table.column_names == reference.column_names
    assert table["row_id"].to_pylist() == reference["row_id"].to_pylist()
    for name in SCORES:
        np.testing.assert_allclose(table[name].to_numpy(), reference[name].to_numpy(), rtol=0, atol=TOLERANCE)


def test_scores_equal_predict_on_a_log_without_labels(served, scored, monkeypatch, capfd):
    root = served["root"]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    assert main(["predict", *_run_args(root), "--ckpt_path", str(served["checkpoint"]), "--data.predict",
                 str(root / "log.parquet"), "--data.extras", "[row_id]",
                 "--prediction_writer.output_dir", str(root / "predicted")]) == 0
    predicted = pq.read_table(root / "predicted" / "predictions-rank0.parquet")
    assert scored.schema == predicted.schema  # same names and types: the two outputs are interchangeable
    _assert_same_scores(scored, predicted)
    assert float(np.std(scored["score_ctr"].to_numpy())) > 0  # different rows, different scores


def test_files_in_list_order_rows_in_file_order_across_row_groups_and_batches(served, scored, tmp_path, capfd):
    """Two files (listed ``a`` before ``b``), each of several row groups, scored 128 rows per call."""
    log = served["log"]
    data = tmp_path / "logs"
    data.mkdir()
    pq.write_table(log.slice(600), data / "b.parquet", row_group_size=150)
    pq.write_table(log.slice(0, 600), data / "a.parquet", row_group_size=250)
    parts = _score(served, [data], tmp_path / "out", "--extras", "row_id", "--batch-size", "128")
    assert [p.num_rows for p in parts] == [600, 400]
    _assert_same_scores(pa.concat_tables(parts), scored)
    summary = capfd.readouterr().out
    assert "scored 1,000 rows of 2 file(s)" in summary and "rows/s" in summary


def _with_manifest(served, directory: Path, **data) -> Path:
    """The artifact with ``data`` (extras, text_format) changed in its manifest (the programs linked, not copied)."""
    directory.mkdir()
    for program in served["artifact"].glob("*.pt2"):  # model.pt2, and user.pt2 and item.pt2 of the split
        os.link(program, directory / program.name)
    manifest = json.loads((served["artifact"] / MANIFEST).read_text())
    manifest["data"].update(data)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_csv_input_scores_as_parquet(served, scored, tmp_path):
    path = tmp_path / "log.csv"
    pa_csv.write_csv(served["log"], path)
    [table] = _score(served, [path], tmp_path / "out", "--extras", "row_id")
    _assert_same_scores(table, scored)


def test_manifest_gives_default_extras_and_text_format(served, scored, tmp_path):
    """A run trained on tab-separated logs with a ``row_id`` extra: its manifest alone says so."""
    path = tmp_path / "log.tsv"
    pa_csv.write_csv(served["log"], path, pa_csv.WriteOptions(delimiter="\t"))
    artifact = _with_manifest(served, tmp_path / "artifact", extras=["row_id"],
                              text_format={"delimiter": "\t", "column_names": None})
    [table] = _score(served, [path], tmp_path / "out", artifact=artifact)
    _assert_same_scores(table, scored)
    [table] = _score(served, [path], tmp_path / "no_extras", "--extras", artifact=artifact)
    assert table.column_names == SCORES


def _set(column: str, value) -> Callable[[pa.Table], pa.Table]:
    """A change to the log: ``column`` of its last row becomes ``value`` (None: null; a string
    turns the whole column into strings)."""
    def change(table: pa.Table) -> pa.Table:
        values = table[column].to_pylist()[:-1] + [value]
        kind = table.schema.field(column).type
        if isinstance(value, str):
            values, kind = [str(v) for v in values], pa.string()
        return table.set_column(table.column_names.index(column), column, pa.array(values, kind))
    return change


BAD_LOGS = {
    "missing feature": (lambda t: t.drop_columns(["C3"]), "missing column 'C3'"),
    "missing extra": (lambda t: t.drop_columns(["row_id"]), "missing column 'row_id'"),
    "dense as strings": (_set("I2", "seven"), "column 'I2' has type string, expected numbers"),
    "id as floats": (lambda t: t.set_column(t.column_names.index("C4"), "C4", t["C4"].cast(pa.float64())),
                     "column 'C4' has type double, expected integer or string ids"),
    "null dense without fill_missing": (_set("I5", None), "column 'I5': missing (null) value"),
    "NaN dense": (_set("I6", float("nan")), "column 'I6': NaN or inf value"),
    "negative id": (_set("C7", -3), "column 'C7': negative id"),
    "id past the table": (_set("C1", 10), "column 'C1': id >= num_embeddings (10)"),
}


NOT_IN_TEXT = ("id as floats", "NaN dense")  # a CSV's ids parse as integers, and its missing values as nulls


@pytest.mark.parametrize(("suffix", "case"), [(s, c) for s in (".parquet", ".csv") for c in BAD_LOGS
                                              if s == ".parquet" or c not in NOT_IN_TEXT])
def test_bad_log_gives_one_line_naming_file_and_column(served, tmp_path, capfd, case, suffix):
    change, problem = BAD_LOGS[case]
    bad = change(served["log"].slice(0, 50))
    path = tmp_path / f"bad{suffix}"
    if suffix == ".csv":
        pa_csv.write_csv(bad, path)
    else:
        pq.write_table(bad, path)
    out = tmp_path / "out"
    status = main(["score", "--artifact", str(served["artifact"]), "--data", str(served["root"] / "log.parquet"),
                   str(path), "--out", str(out), "--extras", "row_id"])
    errors = capfd.readouterr().err
    assert status == 2
    [line] = errors.splitlines()
    assert line.startswith(f"lightning-mtr score: error: {path}: ") and problem in line, line
    assert not out.exists() and not (tmp_path / "out.partial").exists()  # nothing half-written


def _manifest_only(directory: Path, source: Path) -> None:
    """The artifact without its program (the split's programs kept, so the program is what is missing)."""
    directory.mkdir()
    (directory / MANIFEST).write_text((source / MANIFEST).read_text())
    for program in source.glob("*.pt2"):
        if program.name != PROGRAM:
            os.link(program, directory / program.name)


def test_command_line_prints_nothing_but_the_error(served, tmp_path):
    """As a user runs it, in its own process: torch's once-a-process warnings (loading a program,
    the encoder's KeyedJaggedTensor) would come before the message, and a good file before the bad one."""
    bad = tmp_path / "bad.parquet"
    pq.write_table(_set("C7", -3)(served["log"].slice(0, 50)), bad)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lightning_mtr.cli", "score", "--artifact", str(served["artifact"]),
                           "--data", str(served["root"] / "log.parquet"), str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"lightning-mtr score: error: {bad}: column 'C7': negative id (e.g. -3); "
                                        "1 bad row(s) in this batch"]


def test_csv_value_that_does_not_parse_past_the_first_block_names_its_column(served, tmp_path, capfd):
    """Column types of a text file are checked on its first block (1 MiB); a later value that is not
    a number fails in Arrow's parser, whose message gives the column's number only."""
    rows = pa.concat_tables([served["log"]] * 8)  # ~1.6 MB of CSV
    pa_csv.write_csv(_set("I3", "abc")(rows), tmp_path / "late.csv")
    status = main(["score", "--artifact", str(served["artifact"]), "--data", str(tmp_path / "late.csv"),
                   "--out", str(tmp_path / "out")])
    [line] = capfd.readouterr().err.splitlines()
    assert status == 2
    # Arrow's serial reader (one CPU thread, e.g. OMP_NUM_THREADS=1) also names the row; its threaded one cannot
    assert re.fullmatch(re.escape(f"lightning-mtr score: error: {tmp_path / 'late.csv'}: column 'I3': ")
                        + r"(Row #8001: )?CSV conversion error to double: invalid value 'abc'", line), line


ARTIFACT_DAMAGE = {
    "no manifest": (lambda d, source: d.mkdir(), f"no {MANIFEST}"),
    "program missing": (_manifest_only, f"{PROGRAM}: missing"),
    "program truncated": (lambda d, source: (_manifest_only(d, source), (d / PROGRAM).write_bytes(b"PK\x03\x04")),
                          f"{PROGRAM}: sha256 differs"),
}


@pytest.mark.parametrize("damage", list(ARTIFACT_DAMAGE))
def test_damaged_artifact_gives_one_line(served, tmp_path, capfd, damage):
    make, problem = ARTIFACT_DAMAGE[damage]
    artifact = tmp_path / "artifact"
    make(artifact, served["artifact"])
    status = main(["score", "--artifact", str(artifact), "--data", str(served["root"] / "log.parquet"),
                   "--out", str(tmp_path / "out")])
    [line] = capfd.readouterr().err.splitlines()
    assert status == 2
    assert line.startswith(f"lightning-mtr score: error: {artifact}") and problem in line, line
