"""Fused sparse optimizer, the LightningModule's loop, checkpoints, predict, and the golden debug run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from helpers import random_inputs, tiny_schema
from lightning_mtr.cli import MultiTaskCLI, main
from lightning_mtr.models import MMoE
from lightning_mtr.training import SparseOptimizer
from lightning_mtr.training.sparse import dense_parameters, fuse_sparse_optimizer, fused_modules

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


def test_checkpoint_round_trip_and_predict_to_parquet(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    main(["fit", *_fit_args(tmp_path, *SMALL_DATA, "--trainer.max_epochs", "1")])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["sparse_optimizer_states"], "fused optimizer state must be saved"
    assert state["MultiTaskDataModule"]["dense_stats"]["mean"], "dense statistics travel with the checkpoint"
    out = tmp_path / "predictions"
    data = tmp_path / "cache" / "impressions-s0-6000-2000-2000"
    main(["predict", *_fit_args(tmp_path, *SMALL_DATA), "--ckpt_path", str(checkpoint),
          "--data.predict", str(data / "test.parquet"), "--prediction_writer.output_dir", str(out)])
    scores = pq.read_table(out / "predictions-rank0.parquet")
    assert scores.num_rows == 2000
    assert {"score_ctr", "score_cvr", "score_ctcvr"} <= set(scores.column_names)
    ctr = torch.tensor(scores.column("score_ctr").to_numpy())
    assert ((ctr > 0) & (ctr < 1)).all()
    # the same checkpoint validated twice gives the same metrics: weights and stats were restored
    first = _validate(tmp_path, checkpoint)
    assert first == _validate(tmp_path, checkpoint)


def _validate(tmp_path: Path, checkpoint: Path) -> dict[str, float]:
    cli = MultiTaskCLI(args=_fit_args(tmp_path, *SMALL_DATA), run=False)
    result = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint), verbose=False)
    return {k: round(v, 6) for k, v in result[0].items()}


@pytest.mark.skipif(os.environ.get("LMTR_SKIP_GOLDEN") == "1", reason="LMTR_SKIP_GOLDEN=1")
def test_debug_config_reaches_bayes_auc(tmp_path, monkeypatch):
    """The default config, seeded, gets within 0.05 of the best AUC the synthetic data allows."""
    monkeypatch.chdir(REPO)
    cli = MultiTaskCLI(args=["--config", "conf/debug.yaml", "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.logger", "false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    val = pq.read_table(cli.datamodule.paths["val"], columns=["gt_ctr", "click"])
    bayes = binary_auroc(torch.tensor(val.column("gt_ctr").to_numpy()),
                         torch.tensor(val.column("click").to_numpy())).item()
    reached = cli.trainer.callback_metrics["val/ctr/auc"].item()
    assert bayes - 0.05 <= reached <= bayes + 0.01, f"click AUC {reached:.4f} vs Bayes {bayes:.4f}"
    assert cli.trainer.callback_metrics["val/cvr/rows"].item() < cli.trainer.callback_metrics["val/ctr/rows"].item()
