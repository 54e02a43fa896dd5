"""Metrics against hand-computed values and an independent rank-based AUC."""

import math
import warnings

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import hand_logloss
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.metrics import BinaryLogLoss, BinnedBinaryAUROC, MaskedTaskMetrics, task_metrics
from lightning_mtr.models import MMoE
from lightning_mtr.schema import Task
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.callbacks import format_report
from lightning_mtr.training.distributed import SingleProcessStrategy

BINARY = Task("ctr", "click")

NUM_BINS = 65536


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC from average ranks, so tied scores count as half a win."""
    _, tie_group, group_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(group_sizes) - (group_sizes - 1) / 2.0  # 1-based
    ranks = average_rank[tie_group]
    positive = labels == 1
    num_pos, num_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def binned_auc(scores: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> BinnedBinaryAUROC:
    metric = BinnedBinaryAUROC(num_bins)
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    return metric


def test_hand_computed_auc():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    metric = BinnedBinaryAUROC()
    metric.update(scores, labels)
    assert metric.compute().item() == pytest.approx(0.75)
    exact = task_metrics(BINARY, auc="exact")["auc"]
    exact.update(torch.logit(scores), labels)
    assert exact.compute().item() == pytest.approx(0.75)


@pytest.mark.parametrize("num_distinct", [50, 5000])  # many ties, few ties
def test_binned_equals_rank_auc_when_each_bin_holds_one_score(num_distinct):
    rng = np.random.default_rng(0)
    bin_centres = (rng.choice(NUM_BINS, size=num_distinct, replace=False) + 0.5) / NUM_BINS
    scores = rng.choice(bin_centres, size=20_000).astype(np.float32)
    labels = (rng.random(20_000) < scores).astype(np.int64)
    auc = binned_auc(scores, labels).compute().item()
    assert auc == pytest.approx(rank_auc(scores, labels), abs=1e-6)


def test_binned_error_within_bound_on_1m_random_scores():
    rng = np.random.default_rng(1)
    scores = rng.random(1_000_000, dtype=np.float32)
    labels = (rng.random(1_000_000) < 0.2 + 0.6 * scores).astype(np.int64)
    metric = binned_auc(scores, labels)
    error = abs(metric.compute().item() - rank_auc(scores, labels))
    pos, neg = metric.pos.double(), metric.neg.double()
    pairs_sharing_a_bin = (pos * neg).sum() / (pos.sum() * neg.sum())
    assert error <= 0.5 * pairs_sharing_a_bin.item() + 1e-7  # + float32 round-off of compute()
    assert error <= 1e-4


def test_binned_state_merges_like_two_processes():
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.random(10_000, dtype=np.float32))
    labels = torch.from_numpy((rng.random(10_000) < 0.3).astype(np.int64))
    whole = BinnedBinaryAUROC(1024)
    whole.update(scores, labels)
    halves = [BinnedBinaryAUROC(1024), BinnedBinaryAUROC(1024)]
    halves[0].update(scores[:5000], labels[:5000])
    halves[1].update(scores[5000:], labels[5000:])
    # torchmetrics 1.0.3 has no Metric.merge_state; add the "sum" states as all_reduce would.
    halves[0].pos += halves[1].pos
    halves[0].neg += halves[1].neg
    assert torch.equal(halves[0].pos, whole.pos) and torch.equal(halves[0].neg, whole.neg)
    assert halves[0].compute().item() == whole.compute().item()


@pytest.mark.parametrize("label", [0, 1])
def test_auc_over_one_class_is_undefined_not_zero(label):
    """No positive/negative pair to rank: NaN, quietly, in both modes (torchmetrics 1.0.3 warns, returns 0)."""
    binned, exact = BinnedBinaryAUROC(), task_metrics(BINARY, auc="exact")["auc"]
    binned.update(torch.tensor([0.2, 0.7]), torch.tensor([label, label]))
    exact.update(torch.tensor([-1.0, 1.0]), torch.tensor([label, label]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(binned.compute().item()) and math.isnan(exact.compute().item())


def test_multiclass_macro_auc_averages_the_classes_whose_auc_is_defined():
    """Class 3 never occurs, so its one-vs-rest AUC has no positive: left out of the mean, not
    counted as 0; all rows of one class leave no class defined: NaN."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 4)).astype(np.float32)
    target = rng.integers(0, 3, 200)
    logits[np.arange(200), target] += 1.0
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    expected = np.mean([rank_auc(probs[:, c], (target == c).astype(np.int64)) for c in range(3)])
    metric = task_metrics(Task("level", "level", kind="multiclass", num_classes=4))["auc"]
    for part in np.array_split(np.arange(200), 3):
        metric.update(torch.from_numpy(logits[part]), torch.from_numpy(target[part]).float())
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    metric.reset()
    metric.update(torch.from_numpy(logits[:5]), torch.ones(5))
    assert math.isnan(metric.compute().item())


@pytest.mark.parametrize("auc", ["exact", "binned"])
def test_masked_metrics_report_one_class_as_undefined_auc_and_gauc(auc):
    """Every user saw only clicks or only non-clicks: AUC is defined, GAUC is not; a task whose
    rows are all negative has no AUC; logloss and rows stay defined."""
    tasks = [Task("ctr", "click", gauc_by="user"), Task("buy", "buy")]
    metrics = MaskedTaskMetrics(tasks, prefix="val", auc=auc)
    logits = torch.tensor([0.5, 1.0, -1.0, -2.0])
    click = torch.tensor([1.0, 1.0, 0.0, 0.0])
    everything = torch.ones(4, dtype=torch.bool)
    metrics.update({"ctr": logits, "buy": logits}, {"ctr": click, "buy": torch.zeros(4)},
                   {"ctr": everything, "buy": everything}, {"user": torch.tensor([7, 7, 8, 8])})
    results = metrics.compute()
    assert results["val/ctr/auc"].item() == 1.0 and math.isnan(results["val/ctr/gauc"].item())
    assert math.isnan(results["val/buy/auc"].item()) and results["val/buy/rows"].item() == 4
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert results["val/buy/logloss"].item() == pytest.approx(np.mean([softplus(x) for x in logits.tolist()]))


def test_report_says_an_undefined_auc_is_not_applicable():
    nan = torch.tensor(float("nan"))
    metrics = {"val/ctr/rows": torch.tensor(4.0), "val/ctr/auc": torch.tensor(0.75), "val/ctr/gauc": nan,
               "val/buy/rows": torch.tensor(4.0), "val/buy/auc": nan, "val/buy/logloss": torch.tensor(0.5),
               "val/none/rows": torch.tensor(0.0), "val/none/auc": nan}
    lines = format_report("val", [("ctr", "binary"), ("buy", "binary"), ("none", "binary")], metrics).splitlines()
    assert lines[0].split() == ["task", "kind", "rows", "auc", "logloss", "mse", "other"]
    assert lines[1].split() == ["ctr", "binary", "4", "0.7500", "-", "-", "gauc=n/a", "(one", "class", "per", "group)"]
    assert lines[2].split() == ["buy", "binary", "4", "n/a", "(one", "class)", "0.5000", "-"]
    assert lines[3].split() == ["none", "binary", "0", "nan", "-", "-"]  # no rows at all: nothing was evaluated
    auc_end = lines[0].index(" auc ") + 4  # the auc column widened and every row stays right-aligned under it
    assert lines[1][:auc_end].endswith(" 0.7500") and lines[2][:auc_end].endswith(" n/a (one class)")


@pytest.mark.parametrize(
    ("preds", "target", "message"),
    [
        (torch.tensor([0.2, 1.5]), torch.tensor([0, 1]), r"\[0, 1\]"),
        (torch.tensor([0.2, float("nan")]), torch.tensor([0, 1]), r"\[0, 1\]"),
        (torch.tensor([0.2, 0.5]), torch.tensor([0, 2]), "0 and 1"),
        (torch.tensor([0.2, 0.5]), torch.tensor([0, 1, 1]), "differ in shape"),
    ],
)
def test_binned_rejects_bad_inputs(preds, target, message):
    with pytest.raises(ValueError, match=message):
        BinnedBinaryAUROC().update(preds, target)


def test_logloss_matches_hand_value_and_stays_finite():
    metric = BinaryLogLoss()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0]))
    expected = (math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(-1))) / 3
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)

    metric.reset()
    metric.update(torch.tensor([80.0, -80.0, 80.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert metric.compute().item() == pytest.approx(160 / 3, rel=1e-6)

    metric.update(torch.tensor([float("nan")]), torch.tensor([1.0]))  # a diverged model is not hidden
    assert math.isnan(metric.compute().item())


def test_logloss_is_the_mean_over_the_masked_rows_of_every_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(3, 500)).astype(np.float32)  # |logit| < 15: p stays below 1 in float64
    labels = (rng.random((3, 500)) < 0.3).astype(np.float32)
    masks = rng.random((3, 500)) < 0.6
    metrics = MaskedTaskMetrics([BINARY], prefix="val")
    for batch_logits, batch_labels, mask in zip(logits, labels, masks):
        metrics.update({"ctr": torch.from_numpy(batch_logits)}, {"ctr": torch.from_numpy(batch_labels)},
                       {"ctr": torch.from_numpy(mask)})
    results = metrics.compute()
    assert results["val/ctr/rows"].item() == masks.sum()
    assert results["val/ctr/logloss"].item() == pytest.approx(hand_logloss(logits[masks], labels[masks]), rel=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric RowCount was called before")
@pytest.mark.parametrize("auc", ["exact", "binned"])
def test_masked_metrics_see_only_masked_rows(auc):
    tasks = [Task("ctr", "click"), Task("watch", "seconds", kind="regression"), Task("cvr", "conversion")]
    metrics = MaskedTaskMetrics(tasks, prefix="val", auc=auc)
    # Rows 0, 2, 4 are in the ctr sample space: logits [0.5, -1, 2], labels [1, 0, 0].
    # Over all six rows the AUC would be 7/9 instead.
    ctr_logits = torch.tensor([0.5, 3.0, -1.0, -2.0, 2.0, 1.0])
    ctr_labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    ctr_mask = torch.tensor([True, False, True, False, True, False])
    watch_pred = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    watch_label = torch.tensor([1.5, 0.0, 0.0, 0.0, 0.0, 4.0])
    watch_mask = torch.tensor([1, 0, 0, 0, 0, 1])
    metrics.update(
        logits={"ctr": ctr_logits, "watch": watch_pred, "cvr": ctr_logits},
        labels={"ctr": ctr_labels, "watch": watch_label, "cvr": ctr_labels},
        masks={"ctr": ctr_mask, "watch": watch_mask, "cvr": torch.zeros(6, dtype=torch.bool)},
    )
    results = metrics.compute()

    assert results["val/ctr/auc"].item() == pytest.approx(0.5)  # the positive beats -1, loses to 2
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_logloss = (softplus(-0.5) + softplus(-1.0) + softplus(2.0)) / 3
    assert results["val/ctr/logloss"].item() == pytest.approx(expected_logloss, rel=1e-6)
    assert results["val/ctr/rows"].item() == 3
    assert results["val/watch/mse"].item() == pytest.approx((0.5**2 + 2.0**2) / 2)
    assert results["val/watch/rows"].item() == 2
    assert results["val/cvr/rows"].item() == 0
    assert math.isnan(results["val/cvr/auc"].item()) and math.isnan(results["val/cvr/logloss"].item())

    metrics.reset()
    assert metrics.compute()["val/ctr/rows"].item() == 0


def test_task_metrics_names_allowed_values():
    assert set(task_metrics(BINARY, auc="binned")) == {"auc", "logloss", "rows"}
    assert set(task_metrics(Task("watch", "seconds", kind="regression"))) == {"mse", "rows"}
    with pytest.raises(ValueError, match="binary"):
        task_metrics(Task("x", "y", kind="clustering"))
    with pytest.raises(ValueError, match="binned"):
        task_metrics(BINARY, auc="approximate")


def test_an_undefined_monitored_auc_never_wins_a_checkpoint(tmp_path):
    """Lightning 2.6's ModelCheckpoint stores a NaN monitor value as the worst score (-inf in mode
    max) and never lets it displace a kept checkpoint: an epoch whose validation AUC is undefined
    is kept only until one with a defined AUC comes (docs/schema-and-data.md, Metrics)."""
    rng = np.random.default_rng(0)
    for name, rate in (("train", 0.5), ("one_class", 0.0), ("both", 0.5)):
        pq.write_table(pa.table({"user": rng.integers(0, 20, 128), "buy": (rng.random(128) < rate).astype(np.int64)}),
                       tmp_path / f"{name}.parquet")
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({
        "sparse": [{"name": "user", "num_embeddings": 20, "embedding_dim": 4}],
        "tasks": [{"name": "buy", "label": "buy"}]}))
    data = MultiTaskDataModule(str(tmp_path / "schema.yaml"), train=str(tmp_path / "train.parquet"),
                               val=str(tmp_path / "one_class.parquet"), batch_size=64)
    seen = []

    class SecondEpochSeesBothClasses(Callback):
        def on_validation_end(self, trainer, module):
            seen.append(float(trainer.callback_metrics["val/buy/auc"]))
            data.paths["val"] = str(tmp_path / "both.parquet")

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/buy/auc", mode="max", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                        callbacks=[checkpoint, SecondEpochSeesBothClasses()], default_root_dir=tmp_path,
                        strategy=SingleProcessStrategy())
    trainer.fit(MultiTaskModule(model=lambda s: MMoE(s, num_experts=2, expert=[4], tower=[4]), schema=data.schema),
                datamodule=data)
    assert math.isnan(seen[0]) and all(math.isfinite(auc) for auc in seen[1:]), seen
    assert checkpoint.best_model_score.item() == max(seen[1:])
    assert "epoch=0" not in checkpoint.best_model_path and (tmp_path / "ckpt" / "last.ckpt").exists()
