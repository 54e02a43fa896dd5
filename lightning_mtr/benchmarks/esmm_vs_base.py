"""ESMM's central claim on our data: pCVR over ALL impressions beats the paper's BASE.

BASE is a CVR model (ESMM's CVR tower alone) trained on clicked impressions only, the
biased sample space; ESMM learns pCVR through pCTCVR = pCTR * pCVR over all impressions.
Both train one epoch on the same data with the same seed and batch size; both are scored
on every test impression against ``gt_conv_if_clicked`` (would this user have converted
had they clicked?) and, as in the paper's protocol, on clicked test rows.

    python -m tools.esmm_vs_base --data DIR [--seeds 0 1 2] [--rows N]   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_mtr.benchmarks.train import quality_metrics, train_one_epoch


def compare(data: Path, seed: int, rows: int | None = None, batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """``{model: {auc_cvr_all, auc_cvr_clicked}}`` for ESMM, BASE and the true probabilities at one seed."""
    results = {}
    keys = ("auc_cvr_all", "auc_cvr_clicked")
    for model in ("esmm", "esmm_base"):
        trainer, module, datamodule, _ = train_one_epoch(model, data, rows, batch_size, seed)
        metrics = quality_metrics(trainer, module, datamodule, data / "test.parquet")
        results[model] = {key: metrics[key] for key in keys}
    results["truth"] = {key: metrics[f"truth_{key}"] for key in keys}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.parquet and test.parquet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=None, help="train on the first N rows (default: all)")
    args = parser.parse_args(argv)
    margins = []
    for seed in args.seeds:
        result = compare(args.data, seed, args.rows)
        margin = result["esmm"]["auc_cvr_all"] - result["esmm_base"]["auc_cvr_all"]
        margins.append(margin)
        print(json.dumps({"seed": seed, **result, "margin_auc_cvr_all": round(margin, 5)}))
    print(f"ESMM - BASE, AUC of pCVR over all impressions: mean {sum(margins) / len(margins):+.4f}, "
          f"min {min(margins):+.4f} over {len(margins)} seeds")
    return 0
