"""A day-partitioned log that changes from day to day: what daily incremental training is for.

Each day some users join and the oldest cohort leaves, new items arrive and the oldest retire,
and every item's popularity drifts. Ids are open-ended raw int64 values (up to ``2**62``, far
beyond any table), so the schema hashes them (``out_of_range: modulo``) or manages collisions.
What persists is each user's and item's latent taste vector: the click and conversion
probabilities depend on their affinity ``<p_u, q_i>``, so yesterday's model helps today while a
model of one day sees each user only a few times. Written by :func:`write_days`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_mtr.data.synthetic.common import sigmoid, solve_intercept, stream, write_chunks

DAYS_VERSION = 1  # bump whenever the same arguments would write different data
START = dt.date(2026, 11, 25)
MAX_ID = 1 << 62


@dataclass(frozen=True)
class DaySpec:
    """Every knob of the drifting world.

    * Day 1 has ``users`` users and ``items`` items. Each later day the oldest ``user_churn``
      share of the users (by when they joined) leaves and as many new ones join; likewise
      ``item_churn`` for items. Users are drawn by a fixed log-normal activity
      (``activity_std``), items by ``exp(popularity)``.
    * An item's popularity takes a Gaussian step of std ``popularity_drift`` each day (new items
      start at the current mean plus ``new_item_boost``); it also moves its click logit with
      weight ``popularity_effect`` (trending items are clicked more), so a model left on day 1
      goes stale.
    * ``click logit = b + affinity * <p_u, q_i> + user bias + item bias + popularity_effect *
      popularity``, with ``p, q ~ N(0, I / latent_dim)`` and biases ``N(0, bias_std^2)``; the
      conversion logit reuses the affinity (``conversion_affinity``) plus an item quality.
      ``b`` and the conversion intercept are solved on day 1 for ``target_ctr`` and
      ``target_cvr`` (conversions among clicks), then kept.
    * Features: ``user_id``, ``item_id`` (raw), ``user_segment`` and ``item_category`` (the signs
      of the first ``segment_bits`` latent coordinates: coarse, shared by many ids, so new ids
      are not hopeless) and ``item_age`` (days since the item arrived).
    """

    users: int = 5_000
    items: int = 1_000
    user_churn: float = 0.15
    item_churn: float = 0.1
    activity_std: float = 0.5
    popularity_drift: float = 0.5
    new_item_boost: float = 0.5
    popularity_effect: float = 0.4
    latent_dim: int = 4
    affinity: float = 2.5
    bias_std: float = 0.6
    conversion_affinity: float = 1.0
    segment_bits: int = 1
    target_ctr: float = 0.15
    target_cvr: float = 0.25


@dataclass
class _Population:
    """Users or items alive on a day: raw ids, latent vectors, biases, weights, arrival day."""

    ids: np.ndarray
    latent: np.ndarray
    bias: np.ndarray
    weight: np.ndarray  # log activity (users) or popularity (items)
    quality: np.ndarray
    joined: np.ndarray

    def keep(self, rows: np.ndarray) -> _Population:
        return _Population(*(getattr(self, f)[rows] for f in ("ids", "latent", "bias", "weight", "quality", "joined")))

    def join(self, other: _Population) -> _Population:
        return _Population(*(np.concatenate([getattr(self, f), getattr(other, f)])
                             for f in ("ids", "latent", "bias", "weight", "quality", "joined")))


def _arrivals(rng: np.random.Generator, spec: DaySpec, n: int, day: int, weight: np.ndarray) -> _Population:
    return _Population(ids=rng.integers(1, MAX_ID, n, dtype=np.int64),
                       latent=rng.standard_normal((n, spec.latent_dim)) / np.sqrt(spec.latent_dim),
                       bias=spec.bias_std * rng.standard_normal(n), weight=weight,
                       quality=spec.bias_std * rng.standard_normal(n), joined=np.full(n, day))


def _next_day(spec: DaySpec, seed: int, day: int, users: _Population, items: _Population
              ) -> tuple[_Population, _Population]:
    """The populations of ``day`` (>= 1) from the day before: churn, arrivals, popularity drift."""
    rng = stream(seed, "days", "evolve", day)
    items.weight = items.weight + spec.popularity_drift * rng.standard_normal(len(items.ids))
    new_users, new_items = round(spec.user_churn * spec.users), round(spec.item_churn * spec.items)
    # a stable sort by arrival: the oldest cohort (day-1 users in arrival order) leaves first
    users = users.keep(np.argsort(users.joined, kind="stable")[new_users:])
    items = items.keep(np.argsort(items.joined, kind="stable")[new_items:])
    users = users.join(_arrivals(rng, spec, new_users, day, spec.activity_std * rng.standard_normal(new_users)))
    fresh = items.weight.mean() + spec.new_item_boost + rng.standard_normal(new_items)
    return users, items.join(_arrivals(rng, spec, new_items, day, fresh))


def _logits(spec: DaySpec, users: _Population, items: _Population, u: np.ndarray, i: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Click and conversion logits without their intercepts, per (user row, item row) pair."""
    affinity = np.einsum("nk,nk->n", users.latent[u], items.latent[i])
    click = spec.affinity * affinity + users.bias[u] + items.bias[i] + spec.popularity_effect * items.weight[i]
    return click, spec.conversion_affinity * affinity + items.quality[i]


def _draw(rng: np.random.Generator, users: _Population, items: _Population, n: int) -> tuple[np.ndarray, np.ndarray]:
    def pick(weight: np.ndarray) -> np.ndarray:
        p = np.exp(weight - weight.max())
        return rng.choice(len(weight), n, p=p / p.sum())
    return pick(users.weight), pick(items.weight)


def _segment(latent: np.ndarray, bits: int) -> np.ndarray:
    return ((latent[:, :bits] > 0) * (1 << np.arange(bits))).sum(axis=1).astype(np.int64)


def write_days(out_dir: str | Path, days: int, rows_per_day: int, seed: int = 0, start: dt.date = START,
               spec: DaySpec = DaySpec(), row_group_rows: int = 65536) -> list[Path]:
    """Write ``out_dir/dt=YYYY-MM-DD/part-0.parquet`` for ``days`` days from ``start``.

    Columns: ``user_id``, ``item_id`` (raw int64 ids), ``user_segment``, ``item_category`` (int64),
    ``item_age`` (float32 days), ``click``, ``conversion`` (int64 0/1; a conversion only after a
    click) and the true ``gt_ctr``, ``gt_cvr`` (float32). Same arguments, same bytes.
    """
    if days < 1 or rows_per_day < 1:
        raise ValueError(f"days and rows_per_day must be at least 1, got {days} and {rows_per_day}")
    rng = stream(seed, "days", "world")
    users = _arrivals(rng, spec, spec.users, 0, spec.activity_std * rng.standard_normal(spec.users))
    items = _arrivals(rng, spec, spec.items, 0, rng.standard_normal(spec.items))
    click, conversion = _logits(spec, users, items, *_draw(rng, users, items, 1 << 16))
    click_b = solve_intercept(lambda b: np.mean(sigmoid(click + b)), spec.target_ctr)
    conversion_b = solve_intercept(lambda b: np.average(sigmoid(conversion + b), weights=sigmoid(click + click_b)),
                                   spec.target_cvr)
    paths = []
    for day in range(days):
        if day:
            users, items = _next_day(spec, seed, day, users, items)

        def chunk(index: int, n: int, day: int = day, users: _Population = users, items: _Population = items):
            draw = stream(seed, "days", "rows", day, index)
            u, i = _draw(draw, users, items, n)
            click_logit, conversion_logit = _logits(spec, users, items, u, i)
            ctr, cvr = sigmoid(click_logit + click_b), sigmoid(conversion_logit + conversion_b)
            clicked = (draw.random(n) < ctr).astype(np.int64)
            return {"user_id": users.ids[u], "item_id": items.ids[i],
                    "user_segment": _segment(users.latent[u], spec.segment_bits),
                    "item_category": _segment(items.latent[i], spec.segment_bits),
                    "item_age": (day - items.joined[i]).astype(np.float32),
                    "click": clicked, "conversion": clicked * (draw.random(n) < cvr).astype(np.int64),
                    "gt_ctr": ctr.astype(np.float32), "gt_cvr": cvr.astype(np.float32)}

        path = Path(out_dir) / f"dt={start + dt.timedelta(days=day)}" / "part-0.parquet"
        paths.append(write_chunks(path, rows_per_day, row_group_rows, chunk,
                                  ["user_segment", "item_category", "click", "conversion"]))
    return paths
