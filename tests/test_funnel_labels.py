"""Chain models' labels must follow their funnel: a later step's label is never 1 where the
earlier step's is 0 (pCTCVR = pCTR * pCVR can never exceed pCTR). Each model declares its
pairs; the data module checks them on every row it reads, in every stage, and stops naming
the file, the tasks and the row count."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import ESM2_TASKS, ESMM_TASKS
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.data.encode import BatchEncoder, DataError
from lightning_mtr.models import AITM, ESM2, ESMM, MODELS, build_model
from lightning_mtr.schema import Schema
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy

FEATURES = {"sparse": [{"name": "user", "num_embeddings": 20, "embedding_dim": 4}], "dense": [{"name": "d"}]}
AITM_TASKS = ({"name": "ctr", "label": "click"}, {"name": "ctcvr", "label": "click * conversion"})
# by registry name: small sizes, the tasks with nested labels, the task whose label turns into `conversion`
FUNNELS = {
    "esmm": ({"tower": [4]}, ESMM_TASKS, "ctcvr"),
    "esm2": ({"tower": [4]}, ESM2_TASKS, "ctcvr"),
    "aitm": ({"tower": [4], "ait_dim": 4}, AITM_TASKS, "ctcvr"),
}
ROWS, CONVERSIONS_WITHOUT_CLICK = 96, 5


def _schema(tasks) -> Schema:
    return Schema.from_dict({**FEATURES, "tasks": list(tasks)})


def test_every_registered_funnel_model_is_tested_here():
    """A model that declares a funnel (``label_order``) and is added to the registry needs its
    entry in FUNNELS, so the tests below run it."""
    assert set(FUNNELS) == {name for name, model in MODELS.items() if hasattr(model, "label_order")}


def test_each_model_declares_its_funnel():
    assert ESMM(_schema(ESMM_TASKS), tower=[4]).label_order() == [("ctr", "ctcvr")]
    # ESM2: a buy may follow a click without DAction, so ctcvr is bounded by ctr only, not by ctavr
    assert ESM2(_schema(ESM2_TASKS), tower=[4]).label_order() == [("ctr", "ctavr"), ("ctr", "ctcvr")]
    three = ({"name": "a", "label": "a"}, {"name": "b", "label": "b"}, {"name": "c", "label": "c"})
    assert AITM(_schema(three), tasks=["c", "a", "b"], tower=[4]).label_order() == [("c", "a"), ("a", "b")]
    renamed = [{**task, "name": f"my_{task['name']}"} for task in ESMM_TASKS]
    model = ESMM(_schema(renamed), tower=[4], task_names=("my_ctr", "my_cvr", "my_ctcvr"))
    assert model.label_order() == [("my_ctr", "my_ctcvr")]


def _table(rows: int, bad_rows: int, seed: int) -> pa.Table:
    """Funnel columns (conversion and daction only after a click), except ``bad_rows`` rows with a
    conversion and no click, placed at random."""
    rng = np.random.default_rng(seed)
    click = (rng.random(rows) < 0.5).astype(np.int64)
    conversion = click * (rng.random(rows) < 0.5)
    daction = click * (rng.random(rows) < 0.5)
    bad = rng.choice(np.flatnonzero(click == 0), bad_rows, replace=False)
    conversion[bad] = 1
    return pa.table({"user": rng.integers(0, 20, rows), "d": rng.normal(size=rows), "click": click,
                      "conversion": conversion.astype(np.int64), "daction": daction.astype(np.int64)})


def _write(table: pa.Table, path) -> str:
    if str(path).endswith(".csv"):
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return str(path)


def _run(tmp_path, model: str, later_label: str, bad_split: str | None, stage: str, suffix: str = ".parquet"):
    """``stage`` (fit/validate/test/predict) of ``model`` on tiny data whose ``bad_split`` holds
    conversions without a click; the funnel's later task reads ``later_label``."""
    kwargs, tasks, later = FUNNELS[model]
    tasks = [{**task, "label": later_label} if task["name"] == later else task for task in tasks]
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(yaml.safe_dump({**FEATURES, "tasks": tasks}))
    files = {split: _write(_table(ROWS, CONVERSIONS_WITHOUT_CLICK if split == bad_split else 0, seed),
                           tmp_path / f"{split}{suffix}") for seed, split in enumerate(("train", "val", "test"))}
    data = MultiTaskDataModule(str(schema_path), **files, predict=files["test"], batch_size=ROWS, shuffle_buffer=0)
    module = MultiTaskModule(model=partial(build_model, model, **kwargs), schema=data.schema)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy(), inference_mode=False)
    getattr(trainer, stage)(module, datamodule=data)
    return files, trainer


@pytest.mark.parametrize("model", sorted(FUNNELS))
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_conversion_without_a_click_stops_fit_naming_file_tasks_and_rows(tmp_path, model, suffix):
    """A later step's label of ``conversion`` instead of ``click * conversion`` made these rows
    positives of pCTCVR = pCTR * pCVR <= pCTR, which no chain can fit; now it stops the run."""
    with pytest.raises(DataError) as error:
        _run(tmp_path, model, "conversion", "train", "fit", suffix)
    message = str(error.value)
    assert message.startswith(str(tmp_path / f"train{suffix}") + ":"), message
    assert "task 'ctcvr' (label 'conversion') is 1 where task 'ctr' (label 'click')" in message, message
    assert f"{CONVERSIONS_WITHOUT_CLICK} bad row(s)" in message, message
    assert "click=0, conversion=1" in message and "click * conversion" in message, message


@pytest.mark.parametrize("model", sorted(FUNNELS))
def test_nested_labels_train(tmp_path, model):
    """The same files, with the conversions without a click left in, train with the product label:
    they are CTCVR negatives."""
    _, trainer = _run(tmp_path, model, "click * conversion", "train", "fit")
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["val/ctcvr/logloss"])


@pytest.mark.parametrize("stage, split", [("fit", "val"), ("validate", "val"), ("test", "test")])
def test_every_stage_that_reads_labels_checks_the_funnel(tmp_path, stage, split):
    with pytest.raises(DataError, match=f"{split}.parquet: task 'ctcvr'"):
        _run(tmp_path, "esmm", "conversion", split, stage)


def test_predict_reads_no_labels_so_a_bad_funnel_still_scores(tmp_path):
    """Scoring needs the features only (a serving log has no labels): predict never reads the
    labels, so it neither checks their funnel nor needs their columns."""
    _, trainer = _run(tmp_path, "esmm", "conversion", "test", "predict")
    assert trainer.state.finished


def test_esm2_daction_without_a_click_is_refused_too(tmp_path):
    with pytest.raises(DataError, match="task 'ctavr' \\(label 'daction'\\) is 1 where task 'ctr'"):
        schema = _schema([{**t, "label": "daction"} if t["name"] == "ctavr" else t for t in ESM2_TASKS])
        table = pa.table({"user": [1, 2], "d": [0.0, 0.0], "click": [0, 1], "conversion": [0, 0], "daction": [1, 1]})
        BatchEncoder(schema, label_order=ESM2(schema, tower=[4]).label_order()).encode(table, ["log.parquet"])


def test_only_rows_inside_both_sample_spaces_are_compared():
    """A generic pair whose later task is defined on a subset: rows outside it are not its labels."""
    schema = _schema([{"name": "ctr", "label": "click"},
                      {"name": "late", "label": "conversion", "sample_space": "shown == 1"}])
    table = pa.table({"user": [1, 2], "d": [0.0, 0.0], "click": [0, 1], "conversion": [1, 1], "shown": [0, 1]})
    batch = BatchEncoder(schema, label_order=[("ctr", "late")]).encode(table, ["log.parquet"])
    assert batch.labels["late"].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match="1 bad row"):
        BatchEncoder(schema, label_order=[("ctr", "late")]).encode(table.set_column(4, "shown", pa.array([1, 1])),
                                                                   ["log.parquet"])


def test_a_label_order_names_binary_schema_tasks(tmp_path):
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(yaml.safe_dump({**FEATURES, "tasks": list(ESMM_TASKS)}))
    data = MultiTaskDataModule(str(schema_path))
    with pytest.raises(ValueError, match="label order \\('ctr', 'ctcvt'\\)"):
        data.require_label_order([("ctr", "ctcvt")])
