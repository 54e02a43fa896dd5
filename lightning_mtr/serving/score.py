"""``lightning-mtr score``: Parquet/CSV logs -> scores, through an exported artifact alone.

No Lightning and no trained model: the rows are read and checked by the training pipeline's
reader and :class:`BatchEncoder` (the same column checks, id hashing and refusals), and scored
by the artifact's ``torch.export`` program, which applies the dense transforms itself. Labels
are never read, so a serving log scores as it is.

Output: one Parquet part per input file, ``OUT/part-{i:05d}.parquet`` for the ``i``-th file in
:func:`list_files` order, its rows in the file's order, with the columns ``score_{output}``
(the manifest's outputs, named as ``lightning-mtr predict`` names them) and then the extras.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_mtr.data.batch import output_column
from lightning_mtr.data.encode import BatchEncoder
from lightning_mtr.data.reader import TextFormat, list_files, plan_units, read_tagged, sources_of
from lightning_mtr.schema import Schema
from lightning_mtr.serving.artifact import Artifact, load_artifact, quiet_loggers, staged
from lightning_mtr.serving.program import MAX_BATCH

PART = "part-{index:05d}.parquet"


def score(artifact_dir: str | Path, data: str | Sequence[str], out: str | Path, extras: Sequence[str] | None = None,
          batch_size: int = 8192) -> dict:
    """Score every row of ``data`` (files or directories) into ``out``; ``-> {rows, files, seconds,
    load_seconds}`` (``seconds``: reading, checking, scoring and writing, after the artifact loaded).

    ``extras``: id columns copied beside the scores (default: the run's ``data.extras`` from the
    manifest). The parts are written beside ``out`` first and moved in only once every row
    scored, so a refused file leaves ``out`` as it was.
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH} (the program's batch range), got {batch_size}")
    start = time.perf_counter()
    artifact = load_artifact(artifact_dir)
    loaded = time.perf_counter()
    run = artifact.manifest.get("data") or {}  # an artifact exported before the manifest recorded it: defaults
    encoder = BatchEncoder(manifest_schema(artifact.manifest), labels=False, transform_dense=False,
                           extras=(run.get("extras") or []) if extras is None else extras)
    text = _text_format(run.get("text_format"))
    plans = [plan_units([path], encoder, text) for path in list_files(data)]  # every file checked before scoring
    out = Path(out).resolve()  # `--out .` has a parent to stage in too
    with staged(out) as staging:
        # the encoder's KeyedJaggedTensor asks torch.fx whether it is traced, which warns once a process
        with quiet_loggers("torch.fx._symbolic_trace"):
            rows = sum(_score_file(artifact, encoder, units, staging / PART.format(index=index), batch_size)
                       for index, units in enumerate(plans))
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("part-*.parquet"):
            stale.unlink()
        for part in sorted(staging.iterdir()):
            part.rename(out / part.name)
    return {"rows": rows, "files": len(plans), "seconds": time.perf_counter() - loaded, "load_seconds": loaded - start}


def _score_file(artifact: Artifact, encoder: BatchEncoder, units: list, part: Path, batch_size: int) -> int:
    """Score one file's units, in order, into ``part``; ``-> rows``."""
    sources, rows, writer = sources_of(units), 0, None
    try:
        for table in read_tagged(units, encoder.columns, batch_size, encoder.numeric_columns, encoder.string_columns):
            batch = encoder.encode(table, sources)
            sparse = batch.sparse
            scores = artifact.score(batch.dense, sparse.values(), sparse.lengths().view(len(sparse.keys()), -1).long(),
                                    sparse.weights_or_none())
            columns = {f"score_{name}": scores[name].numpy() for name in artifact.output_names}
            result = pa.table({**columns, **{name: output_column(values) for name, values in batch.extras.items()}})
            writer = writer or pq.ParquetWriter(part, result.schema)
            writer.write_table(result)
            rows += result.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def manifest_schema(manifest: dict) -> Schema:
    """The schema an artifact's manifest records; JSON wrote ``pointwise_weights``' grades as text keys."""
    config = manifest["schema"]
    tasks = [{**t, "pointwise_weights": {int(k): v for k, v in t["pointwise_weights"].items()}}
             if t.get("pointwise_weights") else t for t in config["tasks"]]
    return Schema.from_dict({**config, "tasks": tasks})


def _text_format(recorded: dict | None) -> TextFormat:
    """The run's CSV options as recorded in the manifest (``None``: comma-separated with a header)."""
    if not recorded:
        return TextFormat()
    names = recorded.get("column_names")
    return TextFormat(recorded.get("delimiter", ","), tuple(names) if names else None)


def main(argv: list[str]) -> int:
    """Score Parquet/CSV logs through an exported artifact alone (no Lightning, no labels read).

    ``lightning-mtr score --artifact DIR --data FILE_OR_DIR [...] --out DIR [--extras COL ...]``"""
    parser = argparse.ArgumentParser(prog="lightning-mtr score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, help="a directory written by `lightning-mtr export`")
    parser.add_argument("--data", required=True, nargs="+", help="Parquet/CSV files or directories to score")
    parser.add_argument("--out", required=True, help="directory for the part files (old parts are replaced)")
    parser.add_argument("--extras", nargs="*", help="columns to copy beside the scores (default: the run's extras)")
    parser.add_argument("--batch-size", type=int, default=8192, help=f"rows per program call (1..{MAX_BATCH})")
    args = parser.parse_args(argv)
    try:
        summary = score(args.artifact, args.data, args.out, args.extras, args.batch_size)
    except ValueError as error:  # ArtifactError, DataError, a bad --batch-size
        print(f"lightning-mtr score: error: {error}", file=sys.stderr)
        return 2
    rate = summary["rows"] / max(summary["seconds"], 1e-9)
    print(f"scored {summary['rows']:,} rows of {summary['files']} file(s) in {summary['seconds']:.2f} s "
          f"({rate:,.0f} rows/s; the artifact checked and loaded in {summary['load_seconds']:.2f} s) -> {args.out}")
    return 0
