"""The YouTube ranker's shallow tower against position bias, on the synthetic impression log.

In that log the display position multiplies the click probability and is confounded with
relevance (better items are shown higher); ``gt_ctr_no_position`` is the click probability
at position 1, i.e. without the position effect. Two opt-in knobs of ``ImpressionSpec`` make
each baseline wrong for a reason of its own:

- ``--placement-weight``: a column with no effect on relevance (an ad slot, C9) also sets the
  position, so a model that cannot see position credits that column with the position's effect;
- ``--device-spread``: how fast clicks fall with position depends on a device-like column (C2,
  no click effect), the paper's reason to feed the shallow tower position *and* device. A deep
  model with position as an ordinary feature then learns position x device interactions; scored
  at position 1, where every device has factor 1, its scores still move with the device (by
  about a logit between steep and flat devices, measured on 50k rows), though it ranks items
  within each device as well as the others do.

Three models train one epoch on the same rows and are scored by how well their click scores
rank that truth on test (Spearman correlation):

- ``no_position``: the ranker without its shallow tower, which never sees position;
- ``position_feature``: MMoE with position as an ordinary feature, scored at position 1;
- ``shallow_tower``: the YouTube ranker, its shallow tower fed position (missing at serving) and
  device (kept), scored by its main tower alone: at serving the shallow tower adds a constant per
  device, which orders nothing within a request (one device) but would reorder this test set's
  mixed devices.

All three share MMoE's main network (same experts and towers; no shared layer or gate dropout,
which cost the rankers about 0.02 against MMoE on seed 0), so only the use of position (and, for
the ranker, of the device) differs. The device feeds the ranker's shallow tower only
(``shallow_in_main`` off): with it in the main tower too, that tower learns part of the device's
position bias and ranks the truth at 0.800 instead of 0.841 (50k rows, batch 256, seed 0).
Each knob matters: with the placement alone the shallow tower leads by about 0.01 on 200k rows,
not reliably on 50k; with neither, no_position wins (position then only amplifies relevance, and
the position-aware models give part of it to position).

    python -m tools.position_bias [--rows 200000] [--seeds 0 1] [--device-spread 1]   (from the repo root)
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lightning_mtr.data.datamodule import MultiTaskDataModule, SyntheticLog
from lightning_mtr.data.synthetic import SPEC
from lightning_mtr.models import build_model
from lightning_mtr.embeddings import SparseOptimizer
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import SingleProcessStrategy

SCHEMA = "conf/schemas/synthetic_impressions.yaml"
SIZES = {"num_experts": 4, "expert": [64], "tower": [32]}
RANKER = {"engagement": ["ctr"], "shared": [], "gate_dropout": 0.0, **SIZES}  # MMoE's main network
# the compared models: each a registry name (lightning_mtr.models.MODELS) and its arguments
ARMS = {
    "no_position": ("youtube", {**RANKER, "shallow_tower": None}),
    "position_feature": ("mmoe", SIZES),
    "shallow_tower": ("youtube", {**RANKER, "shallow_tower": [16], "shallow_features": [SPEC.device_column]}),
}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (continuous scores: ties are negligible)."""
    ranks = [np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def at_position_one(test: str, directory: Path) -> str:
    """The test file with every row displayed at position 1."""
    table = pq.read_table(test)
    column = table.schema.get_field_index("position")
    table = table.set_column(column, "position", pa.array(np.ones(table.num_rows, dtype=np.int64)))
    path = directory / "test-position-1.parquet"
    pq.write_table(table, path)
    return str(path)


def click_scores(name: str, files: dict[str, str], seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Train ``name`` one epoch; its click scores on test and the position-free truth."""
    L.seed_everything(seed, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        test = at_position_one(files["test"], Path(scratch)) if name == "position_feature" else files["test"]
        data = MultiTaskDataModule(SCHEMA, train=files["train"], predict=test, batch_size=batch_size,
                                   eval_batch_size=8192, extras=["gt_ctr_no_position"], seed=seed)
        registry_name, kwargs = ARMS[name]
        module = MultiTaskModule(model=partial(build_model, registry_name, **kwargs), schema=data.schema,
                                 dense_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
                                 sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.05))
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            strategy=SingleProcessStrategy(), default_root_dir=scratch, inference_mode=False)
        trainer.fit(module, datamodule=data)
        if name == "shallow_tower":
            # the main tower alone: the serving bias is a constant per device, so it orders nothing
            # within a request (one device), but it would reorder this test set's mixed devices
            module.model.shallow = None
        batches = trainer.predict(module, datamodule=data)
    scores = np.concatenate([b["score_ctr"].numpy() for b in batches])
    truth = np.concatenate([b["gt_ctr_no_position"].numpy() for b in batches])
    return scores, truth


def compare(rows: int, seed: int, placement_weight: float = 2.0, device_spread: float = 1.0,
            batch_size: int = 1024, cache: str = ".cache/synthetic") -> dict[str, float]:
    """``{model: Spearman(click score, gt_ctr_no_position)}`` on the test rows."""
    files = SyntheticLog(cache_dir=cache, train_rows=rows, val_rows=1000, test_rows=max(rows // 4, 1000), seed=seed,
                                 placement_weight=placement_weight, device_bias_spread=device_spread).ensure()
    return {name: spearman(*click_scores(name, files, seed, batch_size)) for name in ARMS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="training rows (test: a quarter of it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--placement-weight", type=float, default=2.0, help="0: position follows relevance only")
    parser.add_argument("--device-spread", type=float, default=1.0, help="0: one position bias for every device")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    print(f"{'seed':<6}" + "".join(f"{name:>18}" for name in ARMS))
    for seed in args.seeds:
        result = compare(args.rows, seed, args.placement_weight, args.device_spread, args.batch_size)
        print(f"{seed:<6}" + "".join(f"{result[name]:>18.4f}" for name in ARMS))
    return 0
