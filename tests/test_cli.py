"""The ``lightning-mtr`` console entry, end to end: ``lightning_mtr.cli.main([...])`` with conf/debug.yaml
on a tiny built-in synthetic log (fit, then validate and test from the fitted checkpoint,
``--print_config`` round trip, ``synth impressions``).

Every file lands under a temporary directory: the data cache, and (``--trainer.default_root_dir``) the
CSV and TensorBoard logs and checkpoints that go to ``runs/<name>/version_N`` otherwise.
One ``fit`` is shared by the module (each run builds the schema's 1M-row table: a few seconds).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import sys
from pathlib import Path

import lightning as L
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_mtr import cli
from lightning_mtr.cli import MultiTaskCLI, main
from lightning_mtr.schema import Schema
from lightning_mtr.serving.checkpoint import load_run
from lightning_mtr.training.distributed import SingleProcessStrategy
from lightning_mtr.training.preemption import PREEMPTED_EXIT, preempted

REPO = Path(__file__).resolve().parents[1]
CONFIG = "conf/debug.yaml"
SCHEMA = Schema.from_yaml(REPO / "conf" / "schemas" / "synthetic_impressions.yaml")
ROWS = {"train": 3000, "val": 1000, "test": 1000}


def _args(subcommand: str, root: Path, cache: Path) -> list[str]:
    return [subcommand, "--config", CONFIG,
            "--data.synthetic.train_rows", str(ROWS["train"]), "--data.synthetic.val_rows", str(ROWS["val"]),
            "--data.synthetic.test_rows", str(ROWS["test"]), "--data.synthetic.cache_dir", str(cache),
            "--data.batch_size", "512", "--trainer.default_root_dir", str(root)]


@contextlib.contextmanager
def _output():
    """Everything a run shows: stdout (Lightning's result table and TaskReport's per-task table) and
    the ``lightning.pytorch`` log, whatever handlers pytest installed."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(text):
            yield text
    finally:
        logger.removeHandler(handler)


def _sample_space_rows(path: Path) -> dict[str, int]:
    """Rows of one split in each task's sample space, straight from the Parquet file."""
    table = pq.read_table(path)
    rows = {}
    for task in SCHEMA.tasks:
        if task.sample_space is None:
            rows[task.name] = table.num_rows
            continue
        match = re.fullmatch(r"(\w+) == (\d+)", task.sample_space)
        assert match, f"this test only knows `column == value` sample spaces, not {task.sample_space!r}"
        rows[task.name] = pc.sum(pc.equal(table[match[1]], int(match[2]))).as_py()
    return rows


def _report(text: str, stage: str) -> dict[str, int]:
    """TaskReport's table after ``Per-task {stage} metrics``: {task: rows}."""
    lines = text.split(f"Per-task {stage} metrics\n", 1)[1].splitlines()
    assert lines[0].split() == ["task", "kind", "rows", "auc", "logloss", "mse", "other"]
    found = {}
    for line in lines[1:1 + len(SCHEMA.tasks)]:
        task, kind, rows, auc, *_ = line.split()
        assert 0.0 <= float(auc) <= 1.0, line
        found[task] = int(rows)
    return found


def _printed_metric(text: str, name: str) -> float:
    """One value of Lightning's validate/test result table (rich box or plain layout)."""
    match = re.search(rf"{re.escape(name)}\W+([-+0-9.eE]+)", text)
    assert match, f"{name} not in the printed results:\n{text}"
    return float(match[1])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One ``lightning-mtr fit`` of conf/debug.yaml on the tiny synthetic log."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(sys, "argv", ["lightning-mtr"])
        with _output() as text:
            assert main(_args("fit", root / "run", root / "cache")) == 0
    splits = {split: next((root / "cache").glob(f"*/{split}.parquet")) for split in ROWS}
    return {"root": root, "output": text.getvalue(), "splits": splits}


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist


def _run_from_checkpoint(subcommand: str, fitted) -> str:
    """``lightning-mtr validate|test --ckpt_path last.ckpt``; returns what it printed."""
    root = fitted["root"]
    with _output() as text:
        assert main([*_args(subcommand, root / subcommand, root / "cache"), "--ckpt_path",
                     str(_last_checkpoint(fitted))]) == 0
    return text.getvalue()


def _last_checkpoint(fitted) -> Path:
    found = list((fitted["root"] / "run").rglob("last.ckpt"))
    assert len(found) == 1, found
    return found[0]


def test_fit_writes_csv_and_tensorboard_logs_and_reports_every_task(fitted):
    run = fitted["root"] / "run"
    [metrics_file] = run.glob("version_*/metrics.csv")
    with open(metrics_file) as handle:
        rows = list(csv.DictReader(handle))
    assert "val/ctr/auc" in rows[0]
    aucs = [float(row["val/ctr/auc"]) for row in rows if row["val/ctr/auc"]]
    assert len(aucs) == 1 and 0.0 <= aucs[0] <= 1.0  # max_epochs 1: one validation (6 steps: AUC near chance)
    assert list(run.glob("version_*/events.out.tfevents.*")), "no TensorBoard event file beside the CSV"
    assert (_last_checkpoint(fitted) / "trainer.pt").is_file(), "one format on every path: a checkpoint directory"
    assert _report(fitted["output"], "val") == _sample_space_rows(fitted["splits"]["val"])


def test_validate_from_checkpoint_prints_the_fitted_metrics(fitted, at_repo_root):
    root = fitted["root"]
    printed = _run_from_checkpoint("validate", fitted)
    expected = _sample_space_rows(fitted["splits"]["val"])
    for task, rows in expected.items():
        assert _printed_metric(printed, f"val/{task}/rows") == rows
    # the checkpoint holds the weights that produced fit's last validation
    [metrics_file] = (root / "run").glob("version_*/metrics.csv")
    with open(metrics_file) as handle:
        fitted_auc = next(float(r["val/ctr/auc"]) for r in csv.DictReader(handle) if r["val/ctr/auc"])
    assert _printed_metric(printed, "val/ctr/auc") == pytest.approx(fitted_auc, abs=1e-4)


def test_test_from_checkpoint_reports_every_task_on_its_sample_space(fitted, at_repo_root):
    printed = _run_from_checkpoint("test", fitted)
    expected = _sample_space_rows(fitted["splits"]["test"])
    assert expected["ctr"] == ROWS["test"] and 0 < expected["cvr"] < ROWS["test"]
    assert _report(printed, "test") == expected
    # one table: TaskReport's, not Lightning's result table of the same metrics besides
    assert printed.count("Per-task test metrics") == 1
    assert "Test metric" not in printed and "test/ctr/auc" not in printed, printed


def test_print_config_round_trips(tmp_path, at_repo_root, capsys):
    args = _args("fit", tmp_path / "run", tmp_path / "cache")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["model"]["class_path"] == "lightning_mtr.models.MMoE"
    assert config["data"]["synthetic"]["train_rows"] == ROWS["train"]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config
    assert not (tmp_path / "cache").exists(), "printing a config must not generate data"


def _preempted(**_) -> None:
    raise preempted(SIGTERMException(), Path("preempted.ckpt"), 6, "SIGTERM")


@pytest.mark.parametrize("ending, status", [(lambda **_: None, 0), (_preempted, PREEMPTED_EXIT)])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_command_that_ends_in_step_leaves_its_process_group(ending, status, world_size, tmp_path, monkeypatch):
    """A finished or preempted command destroys its process group, and a rank of several processes
    then ends at once with the command's status, skipping the interpreter's finalization, in which
    a finished 2-process fit's rank 1 aborted now and then (SIGABRT). One process returns as usual."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(cli, "MultiTaskCLI", ending)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: world_size)  # one process stands for a rank of two
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    assert main(["fit"]) == status
    assert not dist.is_initialized() and exits == ([status] if world_size == 2 else [])


def test_help_lists_every_command_with_a_description(at_repo_root, capsys):
    """``--help`` lists Lightning's four subcommands and, from cli.main's command table, the rest,
    each with one line saying what it does; and the debug switch."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "{fit,validate,test,predict}" in printed
    listed = dict(re.findall(r"^  (\w+) +(\S.{20,})$", printed.rsplit("other commands", 1)[1], re.MULTILINE))
    assert {"synth", "plan", "consolidate", "export", "score", "daily", "schema"} <= set(listed), printed
    assert all("``" not in line for line in listed.values()), listed  # a description, not a usage line
    assert "LMTR_DEBUG=1" in printed


def test_synth_impressions_writes_three_files(tmp_path, at_repo_root, capsys):
    out = tmp_path / "impressions"
    assert main(["synth", "impressions", "--out", str(out), "--train-rows", "300", "--val-rows", "100",
                 "--test-rows", "50"]) == 0
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["test.parquet", "train.parquet", "val.parquet"]
    assert {f.stem: pq.ParquetFile(f).metadata.num_rows for f in files} == {"train": 300, "val": 100, "test": 50}
    assert capsys.readouterr().out.count(".parquet:") == 3


def test_predict_from_checkpoint_scores_every_row(fitted, at_repo_root):
    """``lightning-mtr predict`` runs: the CLI builds its trainer with ``inference_mode=False``,
    which the fused table lookup needs."""
    root = fitted["root"]
    assert main([*_args("predict", root / "predict", root / "cache"), "--ckpt_path", str(_last_checkpoint(fitted)),
                 "--data.predict", str(fitted["splits"]["test"]),
                 "--prediction_writer.output_dir", str(root / "scores")]) == 0
    scores = pq.read_table(root / "scores" / "predictions-rank0.parquet")
    assert scores.num_rows == ROWS["test"] and "score_ctr" in scores.column_names


def test_a_trainer_of_ones_own_in_inference_mode_is_told_to_turn_it_off(fitted, at_repo_root):
    """A plain ``L.Trainer()`` (inference mode on) is stopped at setup with the fix, not patched."""
    root = fitted["root"]
    cli = MultiTaskCLI(args=_args("validate", root / "own", root / "cache")[1:], run=False)
    cli.datamodule.paths["predict"] = str(fitted["splits"]["test"])
    checkpoint = str(_last_checkpoint(fitted))
    for stage in ("validate", "test", "predict"):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            strategy=SingleProcessStrategy())
        with pytest.raises(ValueError, match=rf"cannot {stage} under torch.inference_mode.*"
                                             r"L\.Trainer\(inference_mode=False\)"):
            getattr(trainer, stage)(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, strategy=SingleProcessStrategy(),
                        inference_mode=False)
    (metrics,) = trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    assert metrics["val/ctr/rows"] == _sample_space_rows(fitted["splits"]["val"])["ctr"]


def test_bad_data_ends_with_one_line_naming_file_and_column(fitted, at_repo_root, capsys):
    """A scoring log missing a feature column: exit status 2 and the DataError's message on
    stderr, no traceback."""
    bad = fitted["root"] / "no_position.parquet"
    pq.write_table(pq.read_table(fitted["splits"]["test"]).drop_columns(["position"]), bad)
    root = fitted["root"]
    status = main([*_args("predict", root / "bad", root / "cache"), "--ckpt_path", str(_last_checkpoint(fitted)),
                   "--data.predict", str(bad), "--prediction_writer.output_dir", str(root / "bad_scores")])
    errors = capsys.readouterr().err
    assert status == 2
    assert f"lightning-mtr: error: {bad}: missing column 'position'\n" in errors
    assert "Traceback" not in errors


def test_the_debug_run_keeps_one_copy_of_its_state_and_every_reader_takes_the_link(fitted, at_repo_root, tmp_path):
    """One epoch: the best checkpoint and the last are the same state, so ``last.ckpt`` is a link
    to it (not a second 190 MB copy at full size); consolidate and export's reader follow it
    (validate, test and predict above read it too)."""
    checkpoints = fitted["root"] / "run" / "latest_fit" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (checkpoints / "epoch=0-step=6.ckpt").resolve()
    assert main(["consolidate", str(last), str(tmp_path / "single.ckpt")]) == 0
    assert load_run(last).model.state_dict().keys() == load_run(tmp_path / "single.ckpt").model.state_dict().keys()


def test_each_command_takes_a_new_version_and_latest_links_name_the_last(fitted, at_repo_root):
    """Two ``test`` runs and a ``predict`` that fails on its data, into one run directory:
    versions 0, 1, 2; ``latest`` is the failed predict, ``latest_test`` the second test (its
    metrics.csv holds the test metrics); the fit's ``latest_fit`` holds the checkpoints."""
    root, runs = fitted["root"], fitted["root"] / "commands"
    checkpoint = str(fitted["root"] / "run" / "latest_fit" / "checkpoints" / "last.ckpt")
    for _ in range(2):
        with _output():
            assert main([*_args("test", runs, root / "cache"), "--ckpt_path", checkpoint]) == 0
    bad = root / "no_position_to_predict.parquet"
    pq.write_table(pq.read_table(fitted["splits"]["test"]).drop_columns(["position"]), bad)
    assert main([*_args("predict", runs, root / "cache"), "--ckpt_path", checkpoint, "--data.predict", str(bad),
                 "--prediction_writer.output_dir", str(root / "never")]) == 2
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "latest_predict", "latest_test",
                                                      "version_0", "version_1", "version_2"]
    assert os.readlink(runs / "latest") == os.readlink(runs / "latest_predict") == "version_2"
    assert os.readlink(runs / "latest_test") == "version_1"
    with open(runs / "latest_test" / "metrics.csv") as handle:
        assert "test/ctr/auc" in next(csv.DictReader(handle))
    assert os.readlink(root / "run" / "latest_fit") == os.readlink(root / "run" / "latest") == "version_0"


def test_a_fit_resumes_through_the_latest_fit_link_it_repoints(fitted, at_repo_root, tmp_path):
    """``fit --ckpt_path runs/NAME/latest_fit/checkpoints/last.ckpt`` into the same NAME: the new
    run points ``latest_fit`` at its own ``version_1`` when it sets up, before it loads the
    checkpoint, which was then looked for in the empty ``version_1`` ("no such checkpoint", and the
    failed run left ``latest_fit`` there). The path names the checkpoint as it was when given."""
    runs = tmp_path / "runs"
    (runs / "version_0" / "checkpoints").mkdir(parents=True)
    (runs / "version_0" / "checkpoints" / "last.ckpt").symlink_to(_last_checkpoint(fitted).resolve())
    (runs / "latest_fit").symlink_to("version_0")
    args = [*_args("fit", runs, fitted["root"] / "cache"), "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false"]
    with _output() as text:
        assert main([*args, "--ckpt_path", str(runs / "latest_fit" / "checkpoints" / "last.ckpt")]) == 0
    assert "Restoring states from the checkpoint path" in text.getvalue()
    assert os.readlink(runs / "latest_fit") == "version_1"
