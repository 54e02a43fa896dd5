"""``lightning-mtr export``: checkpoint -> checked, torch-only artifact.

The export is refused, and nothing written, unless the fp32 program scores a held-out batch as
the trained model does (within ``FP32_TOLERANCE``) and a quantised one keeps every task's quality
(:data:`METRICS`: AUC, or R^2 for regression) on the test data within ``TOLERANCE`` of the fp32
program's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

import lightning_mtr
from lightning_mtr.data.encode import BatchEncoder, DataError, fnv1a_64
from lightning_mtr.data.reader import list_files, plan_units, read_tagged, sources_of
from lightning_mtr.schema import ID_SPACE, Schema, SparseFeature
from lightning_mtr.serving.artifact import AOT_PROGRAM, MANIFEST, PROGRAM, staged, write_manifest
from lightning_mtr.serving.checkpoint import TrainedRun, load_run
from lightning_mtr.serving.program import (
    MAX_BATCH, ExportError, ServingModel, export_program,
)
from lightning_mtr.serving.split import (
    ITEM_PROGRAM, USER_PROGRAM, SplitRefused, export_split, split_difference, split_manifest, split_model,
)
from lightning_mtr.serving.tables import QUANTIZE, Quantize
from lightning_mtr.tasks.scores import output_names, probabilities

FP32_TOLERANCE = 1e-5
TOLERANCE = {"int8": 0.002, "int4": 0.01}  # largest change of a task's quality (METRICS) from fp32
_CHUNK_ROWS = 8192
HASH_EXAMPLES = ("", "a", "user_42", "商品-9")


def export(checkpoint: str | Path, out: str | Path, quantize: Quantize = "none", aot: bool = False,
           config: str | Path | None = None, data: str | list[str] | None = None,
           check_rows: int = 1_000_000) -> dict:
    """Export, check, and write ``out`` (replaced only once every check passed); ``-> manifest``."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    out = Path(out).resolve()  # `--out .` has a name to stage beside
    _check_replaceable(out)
    run = load_run(checkpoint, config)
    models = {"none": ServingModel(run.model, run.schema, run.dense_stats)}
    if quantize != "none":
        models[quantize] = ServingModel(run.model, run.schema, run.dense_stats, quantize)
    programs = {k: export_program(m) for k, m in models.items()}
    check, sample = verify(run, {k: p.module() for k, p in programs.items()}, data or run.test_files(), check_rows)
    check["table_bytes"] = {k: m.table_bytes for k, m in models.items()}
    print(report(check, quantize))
    _check_quality(check, quantize)
    split_programs, split = _split(run, quantize, programs[quantize], sample)
    with staged(out) as staging:
        torch.export.save(programs[quantize], staging / PROGRAM)
        for name, program in split_programs.items():
            torch.export.save(program, staging / name)
        if aot:
            check["aot_max_abs_diff"] = _compile_checked(programs[quantize], staging / AOT_PROGRAM, sample)
            print(f"AOTInductor package vs program: max |score difference| {check['aot_max_abs_diff']:.2e}")
        manifest = build_manifest(run, quantize, check) | {"split": split}
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return manifest


def _split(run: TrainedRun, quantize: Quantize, program: torch.export.ExportedProgram, sample: tuple
           ) -> tuple[dict[str, torch.export.ExportedProgram], dict]:
    """``({file: program}, manifest entry)`` of the user/item split, refused unless it scores
    ``sample`` as ``program`` does; no programs, and the reason, for a model that does not split."""
    try:
        user, item = split_model(run.model, run.schema, run.dense_stats, quantize)
    except SplitRefused as refusal:
        print(f"no user/item split: {refusal}; writing the monolithic program only")
        return {}, {"refused": str(refusal)}
    programs = export_split(user, item)
    difference = split_difference(run.schema, program.module(), *(p.module() for p in programs), sample)
    if not difference <= FP32_TOLERANCE:
        raise ExportError(f"the user/item split's scores differ from the program's by {difference:.3g} "
                          f"(limit {FP32_TOLERANCE:g}); nothing written")
    print(f"user/item split vs program: max |score difference| {difference:.2e}")
    return dict(zip((USER_PROGRAM, ITEM_PROGRAM), programs)), split_manifest(run.schema, user.width, difference)


def _check_replaceable(out: Path) -> None:
    """``out`` is new, empty, or an earlier artifact: export replaces it whole, so it must never
    be a directory of the user's other files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the artifact")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"--out {out} holds files but no {MANIFEST}: export replaces its directory whole, so it "
                         "writes only into a new or empty directory, or over an earlier artifact")


def _compile_checked(program: torch.export.ExportedProgram, path: Path, sample: tuple) -> float:
    """The AOTInductor package, refused unless it scores ``sample`` as ``program`` does."""
    from lightning_mtr.serving.aot import compile_aot
    compile_aot(program, path)
    with torch.no_grad():
        expected = program.module()(*sample)
        compiled = torch._inductor.aoti_load_package(str(path))(*sample)
    difference = max(float((compiled[name] - value).abs().max()) for name, value in expected.items())
    if not difference <= FP32_TOLERANCE:
        raise ExportError(f"the AOTInductor package's scores differ from the program's by {difference:.3g} "
                          f"(limit {FP32_TOLERANCE:g}); nothing written")
    return difference


def _check_quality(check: dict, quantize: Quantize) -> None:
    if quantize == "none":
        return
    limit = TOLERANCE[quantize]
    quality = check["quality"]
    changed = {task: quality[quantize][task] - value for task, value in quality["none"].items()}
    over = {task: delta for task, delta in changed.items() if not abs(delta) <= limit}
    if over:
        what = ", ".join(f"the {check['metric'][t]} of {t} by {d:+.4f}" for t, d in over.items())
        raise ExportError(f"{quantize} tables change {what} (limit {limit}); nothing written: use --quantize int8 "
                          "or none")


def report(check: dict, quantize: Quantize) -> str:
    """The numbers the export was accepted on: parity, each task's quality, table bytes."""
    kinds = ["none"] + ([quantize] if quantize != "none" else [])
    quality = check["quality"]
    lines = [f"checked on {check['rows']:,} rows of {check['data']}",
             f"fp32 program vs trained model: max |score difference| {check['fp32_max_abs_diff']:.2e} "
             f"(limit {FP32_TOLERANCE:g})",
             f"{'task':<16}{'metric':<22}" + "".join(f"{'fp32' if k == 'none' else k:>10}" for k in kinds)
             + ("" if quantize == "none" else f"{'change':>10}{'limit':>8}")]
    for task, value in quality["none"].items():
        line = f"{task:<16}{check['metric'][task]:<22}" + "".join(f"{quality[k][task]:>10.4f}" for k in kinds)
        if quantize != "none":
            line += f"{quality[quantize][task] - value:>+10.4f}{TOLERANCE[quantize]:>8}"
        lines.append(line)
    sizes = check["table_bytes"]
    tables = f"embedding tables: {sizes['none']:,} bytes fp32"
    if quantize != "none":
        tables += f", {sizes[quantize]:,} bytes {quantize} ({sizes['none'] / sizes[quantize]:.2f}x smaller)"
    return "\n".join(lines + [tables])


def build_manifest(run: TrainedRun, quantize: Quantize, check: dict) -> dict:
    """Everything a client needs besides the program: inputs, hashing, outputs, provenance."""
    schema = run.schema
    stats = run.dense_stats
    dense = [{"name": f.name, "column": f.source_column, "transform": f.transform, "fill_missing": f.fill_missing,
              **({"mean": stats.mean[i], "std": stats.std[i]} if f.standardized else {})}
             for i, f in enumerate(schema.dense)]
    sparse = [{"name": f.name, "column": f.source_column, "num_embeddings": f.num_embeddings, "hashed": f.hashed,
               "out_of_range": f.out_of_range, "multi_valued": f.multi_valued, "sequence": f.sequence,
               "max_length": f.max_length, "side": f.side, "managed_collisions": f.managed_collisions is not None}
              for f in schema.sparse]
    examples = pa.array(HASH_EXAMPLES, pa.large_string())
    hashes = fnv1a_64(examples)
    return {
        "versions": {"lightning_mtr": lightning_mtr.__version__, "torch": torch.__version__},
        "model": run.model_config,
        "schema": asdict(BatchEncoder(schema, stats).schema),  # quantile boundaries filled in, for `score`
        "inputs": {
            "dense": {"dtype": "float64", "shape": ["B", len(dense)], "features": dense,
                      "note": "raw values; the program applies each transform (a NaN becomes fill_missing)"},
            "values": {"dtype": "int64", "shape": ["N"],
                       "note": "row ids of every sparse feature, feature by feature, row by row within one"},
            "lengths": {"dtype": "int64", "shape": [len(sparse), "B"], "features": sparse,
                        "note": "ids per feature (schema order) per row; a sequence keeps its first max_length"},
            **({"weights": {"dtype": "float32", "shape": ["N"], "note": "one weight per id of values; 1 for ids of "
                            "features without weight_column"}} if schema.weighted else {}),
            "batch": {"min": 1, "max": MAX_BATCH},
        },
        "hashing": {
            "algorithm": "FNV-1a 64 of the id's UTF-8 bytes, then modulo num_embeddings (a feature with "
                         "managed_collisions: modulo 2**63 - 1, a raw id that the program maps to its row)",
            "applies_to": "string ids, every id of a feature with hashed: true (written as a decimal string), and a "
                          "combo feature's values as text joined by U+001F",
            "offset_basis": "0xcbf29ce484222325", "prime": "0x100000001b3",
            "test_vectors": [{"string": text, "fnv1a_64": f"0x{int(h):016x}",
                              "rows": {f.name: int(h % np.uint64(_buckets(f))) for f in schema.sparse
                                       if not (f.bucketized or f.vocab_list)}}
                             for text, h in zip(HASH_EXAMPLES, hashes)],
        },
        "outputs": _outputs(schema),
        "data": {"extras": run.data_config.get("extras") or [], "text_format": run.data_config.get("text_format")},
        "quantize": quantize,
        "check": {**check, "data": [str(p) for p in list_files(check["data"])]},
    }


def _buckets(feature: SparseFeature) -> int:
    return ID_SPACE if feature.managed_collisions else feature.num_embeddings


def _outputs(schema: Schema) -> list[dict]:
    meaning = {"binary": "probability", "regression": "predicted value", "ranking": "ranking score"}
    outputs = []
    for task in schema.tasks:
        if task.kind == "multiclass":
            outputs += [{"name": f"{task.name}_{c}", "task": task.name, "kind": task.kind,
                         "meaning": f"probability of class {c}"} for c in range(task.num_classes)]
        else:
            outputs.append({"name": task.name, "task": task.name, "kind": task.kind, "meaning": meaning[task.kind]})
    return outputs


def verify(run: TrainedRun, programs: dict[str, torch.nn.Module], data: str | list[str], check_rows: int
           ) -> tuple[dict, tuple]:
    """Score the test rows with every program; refuse if the fp32 program's scores differ from the
    trained model's. ``-> (numbers, the first batch's program inputs)``."""
    schema = run.schema
    scores = {k: {name: [] for name in output_names(schema)} for k in programs}
    labels = {t.name: [] for t in schema.tasks}
    masks = {t.name: [] for t in schema.tasks}
    parity, sample = None, ()
    rows = 0
    for batch, raw in _batches(schema, run, data, check_rows):
        inputs = (raw.dense, raw.sparse.values(), raw.sparse.lengths().view(len(schema.sparse), -1).long(),
                  *(() if raw.sparse.weights_or_none() is None else (raw.sparse.weights(),)))
        with torch.no_grad():
            outputs = {k: program(*inputs) for k, program in programs.items()}
            if parity is None:
                sample = inputs
                reference = probabilities(schema, run.model(batch.dense, batch.sparse))
                parity = max(float((outputs["none"][n] - reference[n]).abs().max()) for n in reference)
        for k in programs:
            for name in scores[k]:
                scores[k][name].append(outputs[k][name])
        for task in schema.tasks:
            labels[task.name].append(batch.labels[task.name])
            masks[task.name].append(batch.masks[task.name])
        rows += batch.batch_size
    if parity is None:
        raise ExportError(f"no rows to check the export on in {data}")
    if not parity <= FP32_TOLERANCE:
        raise ExportError(f"the exported fp32 program's scores differ from the trained model's by {parity:.3g} "
                          f"(limit {FP32_TOLERANCE:g}); nothing written")
    quality = {k: _quality(schema, {n: torch.cat(v) for n, v in s.items()},
                     {t: torch.cat(v) for t, v in labels.items()}, {t: torch.cat(v) for t, v in masks.items()})
            for k, s in scores.items()}
    return {"rows": rows, "data": data, "fp32_max_abs_diff": parity, "quality": quality,
            "metric": {task.name: METRICS[task.kind] for task in schema.tasks}}, sample


def _batches(schema: Schema, run: TrainedRun, data: str | list[str], check_rows: int) -> Iterator:
    """``(training batch, raw-dense batch)`` of the same rows, at most ``check_rows`` of them."""
    encoder = BatchEncoder(schema, run.dense_stats)
    raw = BatchEncoder(schema, run.dense_stats, labels=False, transform_dense=False)
    units = plan_units(list_files(data), encoder)
    sources, seen = sources_of(units), 0
    for table in read_tagged(units, encoder.columns, _CHUNK_ROWS, encoder.numeric_columns, encoder.string_columns):
        table = table.slice(0, check_rows - seen)
        seen += table.num_rows
        yield encoder.encode(table, sources), raw.encode(table, sources)
        if seen >= check_rows:
            return


METRICS = {"binary": "AUC", "multiclass": "macro AUC", "ranking": "AUC of relevance > 0", "regression": "R^2"}


def _quality(schema: Schema, scores: dict, labels: dict, masks: dict) -> dict[str, float]:
    """Each task's quality on its sample space, as :data:`METRICS` names it (unitless and near
    [0, 1] for every kind, so one tolerance fits all): a quantised program is held to it."""
    quality = {}
    for task in schema.tasks:
        mask = masks[task.name]
        label = labels[task.name][mask]
        if task.kind == "multiclass":
            probs = torch.stack([scores[f"{task.name}_{c}"] for c in range(task.num_classes)], dim=1)[mask]
            quality[task.name] = float(multiclass_auroc(probs, label.long(), task.num_classes))
        elif task.kind == "regression":
            score = scores[task.name][mask].double()
            quality[task.name] = float(1 - (score - label).square().mean() / label.double().var(unbiased=False))
        else:
            quality[task.name] = float(binary_auroc(scores[task.name][mask], (label > 0).long()))
    return quality


def main(argv: list[str]) -> int:
    """A checkpoint as a checked, torch-only serving artifact (optionally quantised).

    ``lightning-mtr export --ckpt PATH --out DIR [--quantize none|int8|int4] [--aot]``"""
    parser = argparse.ArgumentParser(prog="lightning-mtr export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint file, or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="the artifact directory to write (replaced)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE, help="embedding rows: fp32, int8 or int4")
    parser.add_argument("--aot", action="store_true", help="also an AOTInductor package for C++ (model.aoti.pt2)")
    parser.add_argument("--config", help="the run's config.yaml, for a checkpoint not written by lightning-mtr fit")
    parser.add_argument("--data", nargs="+", help="labelled Parquet/CSV files to check on (default: the run's test)")
    parser.add_argument("--check-rows", type=int, default=1_000_000, help="rows of --data to check on at most")
    args = parser.parse_args(argv)
    try:
        export(args.ckpt, args.out, args.quantize, args.aot, args.config, args.data, args.check_rows)
    except (ExportError, DataError, ValueError, FileNotFoundError) as error:
        print(f"lightning-mtr export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
