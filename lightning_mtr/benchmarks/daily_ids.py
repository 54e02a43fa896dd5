"""Managed collisions against plain hashing at the same table size, on the drifting daily log.

``python -m tools.bench_daily --managed lfu`` trains the days warm (each from the day before) twice:
with the schema's ``out_of_range: modulo`` id tables (plain hashing), and with the same tables,
same sizes, given ``managed_collisions`` instead. Each day's model is tested on the next day; the
table gives each task's AUC both ways and their difference (managed - hashed), and per id feature
the collision rate on the tested day: the share of its impressions whose id has no row to itself.
Hashed, an id shares its row when another id seen up to that day falls in the same bucket
(``id mod num_embeddings``); managed, when the map left by training has no row for it (evicted or
never admitted: it reads the shared last row). ``<feature>_unseen``: the share of impressions whose
id no training day had (hashed, such an id alone in its bucket counts as no collision though its row
is untrained; managed, it always reads the shared row).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from lightning_mtr.data.days import partitions
from lightning_mtr.data.synthetic.days import START
from lightning_mtr.schema import ID_SPACE
from lightning_mtr.training import daily
from lightning_mtr.training.distributed.checkpoint import read_full

FREE = ID_SPACE  # a free slot of TorchRec's map (2**63 - 1)


def managed_schema(schema: Path, policy: str, out: Path) -> tuple[Path, dict[str, int]]:
    """``schema`` with each ``out_of_range: modulo`` table managed instead (same num_embeddings);
    also ``{feature: num_embeddings}`` of those features."""
    config = yaml.safe_load(schema.read_text())
    hashed = {}
    for feature in config["sparse"]:
        if feature.get("out_of_range") == "modulo":
            hashed[feature["name"]] = feature["num_embeddings"]
            del feature["out_of_range"]
            feature["managed_collisions"] = {"eviction_policy": policy}
    if not hashed:
        raise SystemExit(f"bench_daily --managed: {schema} has no out_of_range: modulo table to compare")
    path = out / "schema_managed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, hashed


def _ids(root: Path, day: dt.date, features: list[str]) -> dict[str, np.ndarray]:
    table = pq.read_table(partitions(root)[day], columns=features)
    return {name: table.column(name).to_numpy().astype(np.int64) for name in features}


def hashed_collisions(ids: np.ndarray, earlier: np.ndarray, rows: int) -> float:
    """Share of ``ids`` (a day's impressions) whose bucket holds another distinct id of that day or before."""
    known = np.unique(np.concatenate([earlier, ids]))
    per_bucket = np.bincount(known % rows, minlength=rows)
    return float(np.mean(per_bucket[ids % rows] > 1))


def managed_collisions(ids: np.ndarray, checkpoint: Path, feature: str) -> float:
    """Share of ``ids`` without a row in the map that ``checkpoint`` holds for ``feature``'s table."""
    key = f"model.features.managed_ids.maps.{feature}._mch_sorted_raw_ids"
    mapped = read_full(checkpoint)["model"][key].numpy()
    return float(np.mean(~np.isin(ids, mapped[mapped != FREE])))


def compare_ids(out: Path, days: int, root: Path, configs: dict[str, Path], hashed: dict[str, int]) -> str:
    """Warm daily runs of both schemas (``configs``: hashed, managed), tested day by day; the table
    (also ``out/bench_ids.csv``)."""
    last = START + dt.timedelta(days=days - 1)
    plans = {way: daily.make_plan(["--config", str(config), "--from", str(START), "--to", str(last),
                                   "--out", str(out / way)]) for way, config in configs.items()}
    results = {way: daily.run(plan) for way, plan in plans.items()}
    failed = {way: result for way, result in results.items() if isinstance(result, int)}
    if failed:
        raise SystemExit(f"bench_daily --managed: runs ended with status {failed} (their logs are named above)")
    seen = {name: np.empty(0, np.int64) for name in hashed}
    rows = []
    for day in sorted(results["hashed"]):
        row = {"day": str(day), "tested_on": str(day + dt.timedelta(days=1))}
        for task in sorted(k.split("/")[1] for k in results["hashed"][day] if k.endswith("/auc")):
            auc = {way: results[way][day][f"test/{task}/auc"] for way in ("hashed", "managed")}
            row |= {f"{task}_hashed_auc": f"{auc['hashed']:.4f}", f"{task}_managed_auc": f"{auc['managed']:.4f}",
                    f"{task}_diff": f"{auc['managed'] - auc['hashed']:+.4f}"}
        trained, test = _ids(root, day, list(hashed)), _ids(root, day + dt.timedelta(days=1), list(hashed))
        for name, size in hashed.items():
            seen[name] = np.concatenate([seen[name], trained[name]])
            row[f"{name}_unseen"] = f"{np.mean(~np.isin(test[name], seen[name])):.3f}"
            row[f"{name}_coll_hashed"] = f"{hashed_collisions(test[name], seen[name], size):.3f}"
            managed = managed_collisions(test[name], plans["managed"].checkpoint(day), name)
            row[f"{name}_coll_managed"] = f"{managed:.3f}"
        rows.append(row)
    return daily.write_report(rows, out, "bench_ids")
