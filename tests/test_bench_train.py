"""The benchmark's quality keys: each AUC on the right rows and labels, and the truth's beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_mtr.models import MODELS
from lightning_mtr.benchmarks.train import SETUPS, Setup, quality_metrics

REPO = Path(__file__).resolve().parents[1]

# Six test impressions; a conversion is only logged after a click, while gt_conv_if_clicked says
# whether each row would have converted had it been clicked (rows 3 and 5 would have).
LOG = {
    "click": [1, 1, 1, 0, 0, 0], "conversion": [1, 0, 0, 0, 0, 0], "gt_conv_if_clicked": [1, 0, 0, 1, 0, 1],
    "gt_ctr": [.8, .3, .6, .5, .4, .7], "gt_cvr": [.9, .1, .35, .8, .3, .2], "gt_ctcvr": [.2, .5, .1, .3, .05, .01],
}
SCORES = {"score_ctr": [.9, .6, .4, .5, .2, .1], "score_cvr": [.7, .2, .5, .6, .1, .3],
          "score_ctcvr": [.3, .4, .1, .05, .02, .01]}


class _Predictor:
    """Stands in for the trainer: returns the scores in file order, in two batches."""

    def predict(self, module, datamodule):
        return [{key: torch.tensor(values[:4]) for key, values in SCORES.items()},
                {key: torch.tensor(values[4:]) for key, values in SCORES.items()}]


def test_quality_metrics_scores_each_task_on_its_rows_and_reports_the_truth_beside_it(tmp_path):
    pq.write_table(pa.table(LOG), tmp_path / "test.parquet")
    metrics = quality_metrics(_Predictor(), None, SimpleNamespace(paths={}), tmp_path / "test.parquet")
    # AUC = share of (positive, negative) pairs ranked right, counted by hand
    expected = {
        "auc_ctr": 8 / 9,  # clicks .9 .6 .4 over non-clicks .5 .2 .1: only .4 < .5 is wrong
        "auc_ctcvr": 4 / 5,  # the one conversion (.3) over the five others: only .4 beats it
        "auc_cvr_clicked": 1.0,  # clicked rows only: .7 (converted) over .2 and .5
        "auc_cvr_all": 8 / 9,  # every row against gt_conv_if_clicked: .7 .6 .3 over .2 .5 .1
        "truth_auc_ctr": 5 / 9,  # .8 .3 .6 over .5 .4 .7
        "truth_auc_ctcvr": 3 / 5,  # .2 over .5 .1 .3 .05 .01
        "truth_auc_cvr_clicked": 1.0,  # .9 over .1 .35
        "truth_auc_cvr_all": 7 / 9,  # .9 .8 .2 over .1 .35 .3
    }
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-5)


def test_every_setup_is_a_registered_model():
    """The benchmark's setups build models from the registry: a name it lacks is refused when defined."""
    assert {setup.registry_name for setup in SETUPS.values()} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'mmo'; registered: .*'mmoe'"):
        Setup("mmo", {}, ())


@pytest.mark.parametrize("path", ["single", "torchrec"])
def test_both_training_paths_train_one_epoch(path, tmp_path):
    """``--path torchrec`` trains through TorchRecStrategy on one process (the comparison issue 12
    asks for), ``single`` through the module's own fused tables. In a process of its own: the
    strategy starts a process group whose port a later multi-process test must not find taken."""
    from lightning_mtr.data.synthetic import main as synth
    assert synth(["impressions", "--out", str(tmp_path), "--train-rows", "3000", "--val-rows", "10",
                  "--test-rows", "200"]) == 0
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_train.py"), "--data", str(tmp_path),
                           "--model", "esmm", "--batch-size", "1024", "--path", path],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["path"] == path and result["rows"] == 3000 and 0 < result["train_seconds"] < result["fit_seconds"]
    assert result["samples_per_sec"] == pytest.approx(3000 / result["train_seconds"], rel=0.01)  # the epoch alone
    assert ("Sharding plan" in done.stderr + done.stdout) == (path == "torchrec")  # the strategy logs its plan
