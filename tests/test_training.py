"""Fused sparse optimizer, the LightningModule's loop, checkpoints, predict, and the golden debug run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision

from helpers import LossRecorder, random_inputs, tiny_schema
from torch.utils.data import DataLoader
from lightning_mtr.cli import MultiTaskCLI, main, trains_one_device
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.models import MMoE
from lightning_mtr.embeddings.fusing import SparseOptimizer, dense_parameters, fuse_sparse_optimizer, fused_modules
from lightning_mtr.serving.checkpoint import load_run
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy, TorchRecStrategy
from lightning_mtr.training.distributed.checkpoint import is_sharded_checkpoint, read_full
from lightning_mtr.training.distributed.single import fused_state

REPO = Path(__file__).resolve().parents[1]


def test_fused_optimizer_updates_only_touched_rows():
    schema = tiny_schema()
    torch.manual_seed(0)
    model = MMoE(schema, num_experts=2, expert=[8], tower=[4])
    names_before = list(model.state_dict())
    fuse_sparse_optimizer(model, SparseOptimizer("rowwise_adagrad", lr=0.1), torch.device("cpu"))
    assert list(model.state_dict()) == names_before  # checkpoints do not depend on fusing
    before = {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" in k}
    dense, sparse = random_inputs(schema, 8)
    sum(v.sum() for v in model(dense, sparse).values()).backward()  # the update happens inside backward
    after = model.state_dict()
    touched = {"user": set(), "item": set()}
    for key, ids in sparse.to_dict().items():
        touched["user" if key == "user" else "item"].update(ids.values().tolist())
    for table, ids in touched.items():
        key = f"features.embeddings.embedding_bags.{table}.weight"
        changed = set(torch.nonzero((after[key] != before[key]).any(dim=1)).flatten().tolist())
        assert changed and changed <= ids, f"{table}: rows {sorted(changed - ids)} changed without being looked up"


def test_dense_optimizer_never_sees_embedding_tables():
    model = MMoE(tiny_schema(), num_experts=2, expert=[8], tower=[4])
    fuse_sparse_optimizer(model, SparseOptimizer(), torch.device("cpu"))
    table_ids = {id(p) for m in fused_modules(model).values() for p in m.parameters()}
    assert table_ids and not table_ids & {id(p) for p in dense_parameters(model)}


@pytest.mark.parametrize("name", ["adam"])
def test_sparse_optimizer_unsupported_on_cpu_is_rejected_by_name(name):
    model = MMoE(tiny_schema(), num_experts=2, expert=[8], tower=[4])
    with pytest.raises(ValueError, match=rf"sparse optimizer '{name}' is not available on cpu"):
        fuse_sparse_optimizer(model, SparseOptimizer(name), torch.device("cpu"))


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "conf/debug.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false", "--data.synthetic.cache_dir", str(tmp_path / "cache"), *extra]


SMALL_DATA = ("--data.synthetic.train_rows", "6000", "--data.synthetic.val_rows", "2000",
              "--data.synthetic.test_rows", "2000", "--data.batch_size", "512")


def _cli(tmp_path: Path, *extra: str) -> MultiTaskCLI:
    return MultiTaskCLI(args=_fit_args(tmp_path, *SMALL_DATA, *extra), run=False)


def _scores(cli: MultiTaskCLI, **kwargs) -> dict[str, np.ndarray]:
    batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=True, **kwargs)
    return {key: np.concatenate([b[key].numpy() for b in batches]) for key in batches[0]}


def test_checkpoint_restores_weights_sparse_optimizer_and_statistics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    trained = _cli(tmp_path, "--trainer.max_epochs", "1", "--data.extras", "[position]")
    trained.trainer.fit(trained.model, datamodule=trained.datamodule)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    data = next((tmp_path / "cache").glob("impressions-*-6000-2000-2000"))
    trained.datamodule.paths["predict"] = str(data / "test.parquet")
    expected = _scores(trained)

    # another seed: nothing matches unless the checkpoint really restores it
    fresh = _cli(tmp_path, "--seed_everything", "123", "--data.extras", "[position]",
                 "--data.predict", str(data / "test.parquet"))
    restored = _scores(fresh, ckpt_path=str(checkpoint))
    for key, values in expected.items():
        np.testing.assert_allclose(restored[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    assert fresh.datamodule.dense_stats == trained.datamodule.dense_stats
    saved = read_full(checkpoint, keys={"sparse_optimizer"})["sparse_optimizer"]["state"]
    live = fused_state(trained.model.model).state_dict()["state"]
    assert saved.keys() == live.keys() and len(saved) == 27, "every fused table's state is saved"
    for key, slots in live.items():  # keyed by parameter name, with TorchRec's sharded slot names
        assert list(slots) == [f"{key.split('.')[-2]}.momentum1"]
        torch.testing.assert_close(saved[key], slots, msg=key)

    # the CLI's predict writes the same scores, in file order, next to the extras
    out = tmp_path / "predictions"
    main(["predict", *_fit_args(tmp_path, *SMALL_DATA), "--ckpt_path", str(checkpoint), "--data.extras", "[position]",
          "--data.predict", str(data / "test.parquet"), "--prediction_writer.output_dir", str(out)])
    written = pq.read_table(out / "predictions-rank0.parquet")
    assert written.num_rows == 2000
    np.testing.assert_allclose(written.column("score_ctr").to_numpy(), expected["score_ctr"], rtol=1e-5, atol=1e-6)
    position = pq.read_table(data / "test.parquet", columns=["position"]).column("position").to_numpy()
    np.testing.assert_array_equal(written.column("position").to_numpy(), position)

    # a serving log has no label columns: predict reads the features and extras only
    labels = sorted(trained.datamodule.schema.label_columns)
    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(pq.read_table(data / "test.parquet").drop_columns(labels), unlabelled)
    main(["predict", *_fit_args(tmp_path, *SMALL_DATA), "--ckpt_path", str(checkpoint), "--data.extras", "[position]",
          "--data.predict", str(unlabelled), "--prediction_writer.output_dir", str(tmp_path / "unlabelled_out")])
    scored = pq.read_table(tmp_path / "unlabelled_out" / "predictions-rank0.parquet")
    for key, values in expected.items():
        np.testing.assert_allclose(scored.column(key).to_numpy(), values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_one_device_trains_on_the_single_process_path_and_a_plain_trainer_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert isinstance(_cli(tmp_path).trainer.strategy, SingleProcessStrategy)
    assert isinstance(_cli(tmp_path, "--trainer.devices", "2").trainer.strategy, TorchRecStrategy)
    with pytest.raises(TypeError, match=r"not SingleDeviceStrategy: Trainer\(strategy=SingleProcessStrategy\(\)\)"):
        _fit_tiny(L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False))


def test_devices_auto_on_a_host_with_several_gpus_trains_sharded(monkeypatch):
    """``devices: auto`` is every GPU to Lightning, so the CLI must not pick the one-device path there."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert not trains_one_device({"accelerator": "auto", "devices": "auto"})
    assert not trains_one_device({"accelerator": "gpu"})
    assert trains_one_device({"accelerator": "gpu", "devices": 1})
    assert trains_one_device({"accelerator": "cpu", "devices": "auto"})
    assert not trains_one_device({"accelerator": "gpu", "devices": 1, "num_nodes": 2})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert trains_one_device({"accelerator": "auto", "devices": "auto"})


def test_precision_16_mixed_is_refused_on_one_process():
    """fp16 scales the loss; the fused and the sequence tables' optimizers would apply it unscaled."""
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        strategy=SingleProcessStrategy(),
                        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    with pytest.raises(ValueError, match="precision 16-mixed scales the loss"):
        _fit_tiny(trainer)


def _fit_tiny(trainer: L.Trainer) -> None:
    """Both refusals come before the first batch."""
    module = MultiTaskModule(model=partial(MMoE, num_experts=2, expert=[8], tower=[4]), schema=tiny_schema())
    trainer.fit(module, train_dataloaders=DataLoader([]))


def test_single_process_checkpoint_consolidates_exports_and_evaluates_but_a_file_does_not_resume(
        tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    trained = _cli(tmp_path, "--trainer.max_epochs", "1")
    trained.trainer.fit(trained.model, datamodule=trained.datamodule)
    checkpoint, single = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "single.ckpt"
    assert is_sharded_checkpoint(checkpoint)
    assert main(["consolidate", str(checkpoint), str(single)]) == 0
    expected = trained.model.model.state_dict()
    for source in (checkpoint, single):  # export's reader: the model rebuilt on CPU from its record
        weights = load_run(source).model.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, msg=f"{source.name}: {key}")
    (want,) = trained.trainer.validate(trained.model, datamodule=trained.datamodule)
    fresh = _cli(tmp_path / "fresh", "--seed_everything", "123")
    (got,) = fresh.trainer.validate(fresh.model, datamodule=fresh.datamodule, ckpt_path=str(single))
    assert got == pytest.approx(want, rel=1e-6)
    again = _cli(tmp_path / "again", "--trainer.max_epochs", "2")
    with pytest.raises(ValueError, match="single.ckpt is a single file: training resumes only from"):
        again.trainer.fit(again.model, datamodule=again.datamodule, ckpt_path=str(single))


def test_resumed_training_equals_uninterrupted_training(tmp_path, monkeypatch):
    """1 epoch, checkpoint, resume for epoch 2 == 2 epochs in one go (weights, optimizers, data order)."""
    monkeypatch.chdir(REPO)
    straight = _cli(tmp_path / "straight", "--trainer.max_epochs", "2")
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    first = _cli(tmp_path / "resumed", "--trainer.max_epochs", "1")
    first.trainer.fit(first.model, datamodule=first.datamodule)
    resumed = _cli(tmp_path / "resumed", "--trainer.max_epochs", "2", "--seed_everything", "123")
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule,
                        ckpt_path=str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resumed_mid_epoch_continues_with_the_next_batch(tmp_path, monkeypatch):
    """A checkpoint taken mid-epoch (every 5 steps) resumes with the batch after it, not the epoch's
    first: the data position travels in the checkpoint, so the weights equal an uninterrupted run."""
    monkeypatch.chdir(REPO)
    every_5 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
               "--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.save_top_k=-1",
               "--trainer.callbacks.dirpath", str(tmp_path / "mid")]
    straight = _cli(tmp_path / "straight", "--trainer.max_epochs", "1")
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    first = _cli(tmp_path / "first", "--trainer.max_steps", "5", *every_5)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    checkpoint = tmp_path / "mid" / "epoch=0-step=5.ckpt"
    position = torch.load(checkpoint / "trainer.pt", weights_only=True)["MultiTaskDataModule"]["position"]
    assert position == {"epoch": 0, "rows": 5 * 512, "batches": 5}
    resumed = _cli(tmp_path / "resumed", "--trainer.max_epochs", "1", "--seed_everything", "123")
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(checkpoint))
    assert resumed.trainer.global_step == straight.trainer.global_step == 12  # 6000 rows / 512
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


PREEMPTIONS = [(signal.SIGTERM, "train", 1, 6), (signal.SIGINT, "train", 1, 6), (signal.SIGUSR1, "train", 1, 6),
               (signal.SIGTERM, "validation", 2, 12)]


@pytest.mark.parametrize(("signum", "stage", "epochs", "stopped_at"), PREEMPTIONS,
                         ids=lambda value: getattr(value, "name", str(value)))
def test_signal_mid_epoch_saves_the_step_exits_75_and_resumes_exactly(tmp_path, monkeypatch, signum, stage, epochs,
                                                                      stopped_at):
    """A preempted ``fit`` (a CLI process, signalled while it trains the batch after step 5, or
    validates after epoch 1) writes preempted.ckpt where it stopped, with the data position, says
    so on one line and exits 75; resuming from it gives the weights of an uninterrupted run, bit
    for bit."""
    monkeypatch.chdir(REPO)
    marker = tmp_path / "paused"
    command = [sys.executable, "-m", "lightning_mtr.cli", "fit", *_fit_args(tmp_path / "first", *SMALL_DATA),
               "--trainer.max_epochs", str(epochs), "--trainer.callbacks+=helpers.PauseAtStep",
               f"--trainer.callbacks.step={stopped_at if stage == 'validation' else 5}",
               f"--trainer.callbacks.marker={marker}", f"--trainer.callbacks.stage={stage}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    checkpoint = tmp_path / "first" / "checkpoints" / "preempted.ckpt"
    assert process.returncode == 75, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"lightning-mtr: preempted by {signum.name} at step {stopped_at}: checkpoint {checkpoint}; "
        f"resume with --ckpt_path {checkpoint}")
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert state["global_step"] == stopped_at
    if stage == "train":
        assert state["MultiTaskDataModule"]["position"] == {"epoch": 0, "rows": 6 * 512, "batches": 6}

    straight = _cli(tmp_path / "straight", "--trainer.max_epochs", str(epochs))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    resumed = _cli(tmp_path / "resumed", "--trainer.max_epochs", str(epochs), "--seed_everything", "123")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(checkpoint))
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "fit leaves the signal handlers as it found them"
    assert resumed.trainer.global_step == straight.trainer.global_step == 12 * epochs
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_fit_outside_the_main_thread_trains_without_preemption_handlers(tmp_path, monkeypatch):
    """Only the main thread may set signal handlers; a fit run in another thread trains as before."""
    monkeypatch.chdir(REPO)
    cli, errors = _cli(tmp_path, "--trainer.max_steps", "2"), []

    def fit() -> None:
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except BaseException as error:  # a thread swallows its exception: hand it to the test
            errors.append(error)

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join()
    assert not errors and cli.trainer.global_step == 2


GOLDEN = Path(__file__).parent / "golden" / "debug_loss_curve.json"
# Measured on one AMD EPYC (2026-12): three runs, and 1 vs 2 threads, give the same curve bit for
# bit; torch's AVX2 or scalar kernels instead of AVX-512 (ATEN_CPU_CAPABILITY, as on another CPU)
# move single steps by up to 1.1e-7 relative. 1e-3 leaves 10^4 times that for other CPUs and BLAS
# builds, and still fails when either learning rate moves by 1% (2.9e-3 and 8.4e-3 by step 12).
GOLDEN_RTOL = 1e-3


def test_debug_config_follows_golden_loss_curve(tmp_path, monkeypatch, update_golden):
    """conf/debug.yaml's training loss, step by step, equals the committed curve (torchtitan's
    practice: a numerics change shows at the step it starts). After an intended change, rewrite
    it with ``pytest tests/test_training.py -k golden --update-golden`` and commit the JSON."""
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recorder = LossRecorder()
        cli = _cli(tmp_path)  # conf/debug.yaml on the small log: 12 steps
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch.set_num_threads(threads)
    curve = [recorder.losses[step] for step in sorted(recorder.losses)]
    if update_golden:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "what": "train/loss per step of conf/debug.yaml (seed_everything 0), one thread, with these overrides",
            "regenerate": "pytest tests/test_training.py -k golden --update-golden",
            "overrides": list(SMALL_DATA), "torch": torch.__version__, "train/loss": curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == list(SMALL_DATA), "the golden curve was recorded with other overrides"
    np.testing.assert_allclose(curve, golden["train/loss"], rtol=GOLDEN_RTOL, atol=0,
                               err_msg=f"loss curve moved; after an intended change: --update-golden ({GOLDEN})")


def _fake_trainer(fn: str, world_size: int, epoch: int, batches: int, last: bool = False) -> SimpleNamespace:
    progress = SimpleNamespace(is_last_batch=last, current=SimpleNamespace(processed=batches))
    return SimpleNamespace(state=SimpleNamespace(fn=fn), world_size=world_size, fit_loop=SimpleNamespace(
        epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=epoch)),
        epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_data_position_counts_rows_across_resumes_with_other_shapes(monkeypatch):
    """Saved in 2 processes of 100 rows, resumed in 1 of 50: the position is kept in rows, and
    the resumed run's next checkpoint adds only its own batches, in its own shape."""
    monkeypatch.chdir(REPO)
    schema = "conf/schemas/synthetic_impressions.yaml"
    first = MultiTaskDataModule(schema, batch_size=100)
    first.trainer = _fake_trainer("fit", world_size=2, epoch=3, batches=10)
    saved = first.state_dict()
    assert saved["position"] == {"epoch": 3, "rows": 2000, "batches": 10}

    resumed = MultiTaskDataModule(schema, batch_size=50)
    resumed.trainer = _fake_trainer("fit", world_size=1, epoch=3, batches=10)
    resumed.load_state_dict(saved)
    assert resumed._resume_batches(world_size=1) == (3, 40)
    resumed.trainer = _fake_trainer("fit", world_size=1, epoch=3, batches=15)  # 5 more batches of 50
    assert resumed.state_dict()["position"] == {"epoch": 3, "rows": 2250, "batches": 15}
    resumed.trainer = _fake_trainer("fit", world_size=1, epoch=3, batches=48, last=True)
    assert resumed.state_dict()["position"]["rows"] == 0, "a finished epoch leaves nothing to skip"

    evaluating = MultiTaskDataModule(schema, batch_size=50)
    evaluating.trainer = _fake_trainer("validate", world_size=1, epoch=0, batches=0)
    evaluating.load_state_dict(saved)
    assert evaluating._resume_batches(world_size=1) is None, "loading to validate sets no position for a later fit"
