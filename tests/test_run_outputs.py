"""Where a run's outputs land and what they hold: ``last.ckpt`` is the last state (a link when a
top-k checkpoint holds the same one), logs under ``runs/<name>/version_N``, progress bars with a
total (the CLI runs themselves, ``latest`` links and the one result table: test_cli.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch import callbacks

from lightning_mtr.cli import MultiTaskCLI
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.models import MMoE
from lightning_mtr.training import ModelCheckpoint, MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy
from lightning_mtr.training.distributed.checkpoint import TRAINER_STATE, save
from lightning_mtr.training.warm_start import WarmStart

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_data(tmp_path) -> MultiTaskDataModule:
    """160 training rows in batches of 64: 3 steps an epoch (the last one 32 rows)."""
    rng = np.random.default_rng(0)
    for name, rows in (("train", 160), ("val", 64)):
        pq.write_table(pa.table({"user": rng.integers(0, 20, rows), "buy": rng.integers(0, 2, rows)}),
                       tmp_path / f"{name}.parquet")
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({
        "sparse": [{"name": "user", "num_embeddings": 20, "embedding_dim": 4}],
        "tasks": [{"name": "buy", "label": "buy"}]}))
    return MultiTaskDataModule(str(tmp_path / "schema.yaml"), train=str(tmp_path / "train.parquet"),
                               val=str(tmp_path / "val.parquet"), batch_size=64)


def _fit(data: MultiTaskDataModule, checkpoint: L.Callback, epochs: int, ckpt_path: str | None = None,
         **trainer: object) -> L.Trainer:
    trainer = L.Trainer(**{"accelerator": "cpu", "max_epochs": epochs, "logger": False, "enable_progress_bar": False,
                           "enable_model_summary": False, "num_sanity_val_steps": 0, "callbacks": [checkpoint],
                           "strategy": SingleProcessStrategy(), **trainer})
    module = MultiTaskModule(model=lambda s: MMoE(s, num_experts=2, expert=[4], tower=[4]), schema=data.schema)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint / TRAINER_STATE, weights_only=True)["global_step"]


def _worse_every_epoch(kind: type[callbacks.ModelCheckpoint], directory: Path) -> callbacks.ModelCheckpoint:
    """``step`` in mode ``min``: the first epoch is the best, each later one is worse."""
    return kind(dirpath=directory, monitor="step", mode="min", save_last=True)


def test_lightning_keeps_last_ckpt_at_the_best_step(tiny_data, tmp_path):
    """What this project's ModelCheckpoint fixes (Lightning 2.6): 3 epochs, a metric that gets
    worse, and ``last.ckpt`` holds step 3 while training ended at step 9. (Failing here means
    Lightning fixed it, and lightning_mtr.training.ModelCheckpoint can go.)"""
    trainer = _fit(tiny_data, _worse_every_epoch(callbacks.ModelCheckpoint, tmp_path / "lightning"), epochs=3)
    assert trainer.global_step == 9 and _step(tmp_path / "lightning" / "last.ckpt") == 3


def test_last_ckpt_is_the_last_state_and_a_resume_from_it_trains_nothing(tiny_data, tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint = _worse_every_epoch(ModelCheckpoint, directory)
    trainer = _fit(tiny_data, checkpoint, epochs=3)
    last = directory / "last.ckpt"
    assert trainer.global_step == 9 and _step(last) == 9
    assert not last.is_symlink(), "no top-k checkpoint holds step 9: last.ckpt is one of its own"
    assert _step(directory / "epoch=0-step=3.ckpt") == 3, "the best one was not written over"
    assert checkpoint.best_model_path == str(directory / "epoch=0-step=3.ckpt")
    weights = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}

    resumed = _fit(tiny_data, _worse_every_epoch(ModelCheckpoint, tmp_path / "again"), epochs=3, ckpt_path=str(last))
    assert resumed.global_step == 9, "resumed at the end of training: nothing left to train"
    for key, value in resumed.lightning_module.state_dict().items():
        torch.testing.assert_close(value, weights[key], msg=key)


def test_last_ckpt_links_to_the_top_k_checkpoint_of_the_same_step(tiny_data, tmp_path):
    """Each epoch better (``step`` in mode ``max``): ``last.ckpt`` is a relative link to the
    newest top-k checkpoint, never a second copy; the previous best is deleted, not linked."""
    directory = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="step", mode="max", save_last=True)
    trained = _fit(tiny_data, checkpoint, epochs=2).lightning_module.state_dict()
    last = directory / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=1-step=6.ckpt"
    assert sorted(p.name for p in directory.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert _step(last) == 6
    assert _fit(tiny_data, ModelCheckpoint(dirpath=tmp_path / "resumed"), epochs=2,
                ckpt_path=str(last)).global_step == 6, "a resume from the link: nothing left to train"

    class Start(L.Callback):  # a warm start from the link begins with the linked weights
        def on_train_start(self, trainer, module):
            for key, value in module.state_dict().items():
                torch.testing.assert_close(value, trained[key], msg=key)
            trainer.should_stop = True

    warm = SingleProcessStrategy()
    warm.warm_start = WarmStart(str(last))
    _fit(tiny_data, Start(), epochs=1, strategy=warm)


def test_last_ckpt_follows_every_n_train_steps_to_the_final_step(tiny_data, tmp_path):
    """``daily``'s checkpoint: no top-k, ``last.ckpt`` every 2 steps. Lightning's stays at step 8
    of 9 (its end-of-training save runs only when nothing was saved before)."""
    settings = {"save_top_k": 0, "save_last": True, "every_n_train_steps": 2}
    for kind, name, step in ((callbacks.ModelCheckpoint, "lightning", 8), (ModelCheckpoint, "ours", 9)):
        _fit(tiny_data, kind(dirpath=tmp_path / name, **settings), epochs=3, limit_val_batches=0)
        assert _step(tmp_path / name / "last.ckpt") == step, name


def test_a_checkpoint_saved_over_a_link_replaces_the_link_not_its_target(tmp_path):
    """The strategies' writer (every checkpoint is a directory) renames the old one aside and
    deletes it: a ``last.ckpt`` link goes, the top-k checkpoint it linked to stays."""
    best, last = tmp_path / "epoch=0-step=3.ckpt", tmp_path / "last.ckpt"
    save({"w": torch.zeros(2)}, {"global_step": 3}, best, is_global_zero=True)
    last.symlink_to(best.name)
    save({"w": torch.ones(2)}, {"global_step": 6}, last, is_global_zero=True)
    assert not last.is_symlink() and _step(last) == 6 and _step(best) == 3


@pytest.fixture
def my_experiment(tiny_data, tmp_path, monkeypatch) -> Path:
    """conf/debug.yaml copied as ``my_experiment.yaml`` (its name), on the tiny schema; the
    working directory is ``tmp_path``, so ``runs/`` is created there."""
    config = yaml.safe_load((REPO / "conf" / "debug.yaml").read_text())
    config["data"] = {"schema": str(tmp_path / "schema.yaml"), "train": str(tmp_path / "train.parquet")}
    config["trainer"]["callbacks"] = []
    path = tmp_path / "conf" / "my_experiment.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    return path


def _outputs(*args: str) -> tuple[str, list[tuple[str, str]]]:
    trainer = MultiTaskCLI(args=list(args), run=False).trainer
    return trainer.default_root_dir, [(type(logger).__name__, logger.log_dir) for logger in trainer.loggers]


def test_logs_go_to_runs_named_after_the_config_or_name_unless_the_config_says(my_experiment, tmp_path):
    """No logger in the config: CSV and TensorBoard, both in ``runs/<config stem>/version_N``
    (the next free N); ``--name`` renames it, ``default_root_dir`` replaces ``runs/<name>``, a
    logger of the config's own (here none) is kept."""
    (tmp_path / "runs" / "my_experiment" / "version_0").mkdir(parents=True)  # an earlier run
    root = "runs/my_experiment"  # relative to the working directory, as given
    assert _outputs("--config", str(my_experiment)) == (root, [
        ("CSVLogger", f"{root}/version_1"), ("TensorBoardLogger", f"{root}/version_1")])
    other = "runs/other"
    assert _outputs("--config", str(my_experiment), "--name", "other")[1] == [
        ("CSVLogger", f"{other}/version_0"), ("TensorBoardLogger", f"{other}/version_0")]
    mine = str(tmp_path / "mine")
    assert _outputs("--config", str(my_experiment), "--trainer.default_root_dir", mine)[1][0] == (
        "CSVLogger", f"{mine}/version_0")
    assert _outputs("--config", str(my_experiment), "--trainer.logger", "false") == (root, [])


def test_a_config_without_a_checkpoint_callback_still_keeps_last_ckpt(my_experiment, tmp_path):
    """Lightning's default checkpoint writes no ``last.ckpt``; the CLI gives such a config the
    project's, so ``runs/<name>/latest_fit/checkpoints/last.ckpt`` holds the last step (2 epochs of 3
    steps), and nothing else; ``enable_checkpointing false`` still writes nothing."""
    args = ["fit", "--config", str(my_experiment), "--data.val", str(tmp_path / "val.parquet"),
            "--data.batch_size", "64", "--trainer.max_epochs", "2"]
    MultiTaskCLI(args=args)
    checkpoints = tmp_path / "runs" / "my_experiment" / "latest_fit" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"] and _step(checkpoints / "last.ckpt") == 6
    MultiTaskCLI(args=[*args, "--trainer.enable_checkpointing", "false"])
    assert not (tmp_path / "runs" / "my_experiment" / "latest_fit" / "checkpoints").exists()


def test_the_progress_bar_has_a_total_and_each_epoch_still_ends_with_validation(tiny_data):
    """160 rows in batches of 64: a total of 3 (was ``3/?``), 2 epochs of 3 steps, one
    validation at the end of each (Lightning then validates on the count, not on the loader's end)."""
    seen = []

    class Totals(L.Callback):
        def on_validation_end(self, trainer, module):
            seen.append((trainer.global_step, trainer.progress_bar_callback.train_progress_bar.total,
                         trainer.num_val_batches))

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Totals()],
                        strategy=SingleProcessStrategy())
    module = MultiTaskModule(model=lambda s: MMoE(s, num_experts=2, expert=[4], tower=[4]), schema=tiny_data.schema)
    trainer.fit(module, datamodule=tiny_data)
    assert seen == [(3, 3, [1]), (6, 3, [1])]


@pytest.mark.parametrize(("saved_batches", "length"), [(2, 3), (1, None)])
def test_a_resume_in_another_batch_shape_has_no_total(tiny_data, saved_batches, length):
    """128 rows done: 2 batches of 64 here; a checkpoint that counted them as 1 batch (of 128, or
    on 2 processes) resumes 2 batches on while Lightning counts from 1, so no length is given."""
    tiny_data.setup("fit")
    tiny_data.resume_position = {"epoch": 0, "rows": 128, "batches": saved_batches}
    assert sized_len(tiny_data.train_dataloader()) == length
