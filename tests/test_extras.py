"""``data.extras``: id columns carried into ``predict``'s file, text ids as they were read; and column
names that YAML would read as numbers (``109_14`` as 10914, ``0123`` as 83), which arrive as numbers
and are refused in one line that says to quote them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_mtr.cli import main

REPO = Path(__file__).resolve().parents[1]
SCHEMA = """\
sparse:
  - {name: '109_14', num_embeddings: 8, embedding_dim: 4}
dense: [{name: price, transform: log1p}]
tasks: [{name: ctr, label: click}]
"""
REQUESTS = ["r-0001", "00123", "", None, "café ☕", "12345678901234567890"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist


def _log(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"109_14": rng.integers(0, 8, rows), "price": rng.exponential(5.0, rows),
                             "click": rng.integers(0, 2, rows),
                             "request": pa.array([REQUESTS[i % len(REQUESTS)] for i in range(rows)], pa.string())}),
                   path)
    return path


def _args(tmp_path: Path, *extra: str) -> list[str]:
    schema = tmp_path / "schema.yaml"
    schema.write_text(SCHEMA)
    log = _log(tmp_path / "log.parquet", 96)
    return ["--config", "conf/debug.yaml", "--data.synthetic", "null", "--data.schema", str(schema),
            "--data.train", str(log), "--data.val", str(log), "--data.batch_size", "32",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run"), *extra]


def test_text_extras_reach_the_predictions_file_unchanged(tmp_path):
    assert main(["fit", *_args(tmp_path), "--trainer.max_epochs", "1"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "scores"
    assert main(["predict", *_args(tmp_path), "--ckpt_path", str(checkpoint), "--data.predict",
                 str(tmp_path / "log.parquet"), "--data.extras", "[request, '109_14']",
                 "--prediction_writer.output_dir", str(out)]) == 0
    written = pq.read_table(out / "predictions-rank0.parquet")
    log = pq.read_table(tmp_path / "log.parquet")
    assert written.column("request").type == pa.string()
    assert written.column("request").to_pylist() == log.column("request").to_pylist()  # "00123", "", None too
    assert written.column("109_14").to_pylist() == log.column("109_14").to_pylist()
    assert written.column_names == ["score_ctr", "request", "109_14"]


@pytest.mark.parametrize("override", [
    ["--data.extras", "[109_14, 0123]"],
    ["--data.text_format.column_names", "[109_14, click]"],
])
def test_names_read_as_numbers_are_refused_in_one_line(tmp_path, capsys, override):
    assert main(["fit", *_args(tmp_path), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arrived as numbers, but column names are text" in err[0]
    assert "10914" in err[0] and "quote each name, e.g." in err[0] and "['109_14', '0123']" in err[0]
