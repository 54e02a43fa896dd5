"""The synthetic behaviour log of DUPN (Ni et al., KDD 2018, "Perceive Your Users in Depth").

A user's behaviour sequence is the only view of their taste, current intent and purchasing
power, and those drive every label, so a model that reads the sequence (DUPN's LSTM +
attention) can learn what one that does not cannot. Every request carries a query (a noisy
view of its search intent) that says which part of the sequence matters: what the user did in
the query's category. Four logs share one table, one per DUPN task; the ``log`` column says
which a row belongs to. Written by :func:`write_behaviour`.

Columns (``int64?`` is a nullable int64: Arrow nulls on the rows named "null")::

    log                  int64        0 CTR, 1 ranking (L2R), 2 FIFP, 3 PPP (see LOGS)
    request_id           int64        one per request; a ranking request's request_size rows share
                                      it and are contiguous; every other row has its own
    user_id              int64        [0, num_users)
    user_age             int64        [0, num_ages): only weakly related to power
    user_gender          int64        [0, num_genders): only weakly related to taste
    scene                int64        [0, len(scene_effects)): where the request came from
    query                int64        [0, num_categories): the request's query, a category (every
                                      row; the rows of a ranking request share it)
    item_id              int64?       [0, num_items); null on logs 2, 3
    item_category        int64?       [0, num_categories); null on logs 2, 3
    item_shop            int64?       [0, num_shops); null on logs 2, 3
    item_brand           int64?       [0, num_brands); null on logs 2, 3
    item_price           int64?       price level [0, NUM_LEVELS); null on logs 2, 3
    influencer_id        int64?       [0, num_influencers); null unless log 2
    influencer_category  int64?       [0, num_categories); null unless log 2
    hist_item            list<int64>  the user's behaviours, most recent first, length in
    hist_category        list<int64>    [min_history, max_history]: the item part (vocabularies
    hist_shop            list<int64>    as item_*) ...
    hist_brand           list<int64>
    hist_price           list<int64>
    hist_scene           list<int64>  ... and the property part: scene,
    hist_gap             list<int64>    time-gap bucket [0, NUM_GAP_BUCKETS), non-decreasing,
    hist_type            list<int64>    0 click / 1 add-to-cart / 2 buy (BEHAVIOUR_TYPES)
    rank_sales           float32      the L2R ranking features r_i (RANKING_FEATURES) on logs 0, 1,
    rank_price           float32        else 0: the item's sales volume (standardised log scale,
    rank_relevance       float32        a noisy view of its quality), price level / 4, query
    rank_discount        float32        relevance ([category == query] + noise) and the
                                        discount on offer (U[0, 1)); none reads a label
    click                int64        0/1 on logs 0, 1 (relevance >= 1 on log 1); else 0
    relevance            int64        0 none / 1 click / 2 buy on log 1; else 0
    follow               int64        0/1 on log 2; else 0
    power_level          int64        the user's purchasing power [0, NUM_LEVELS) on log 3; else 0
    gt_ctr               float32      true P(click) on logs 0, 1; else 0
    gt_follow            float32      true P(follow) on log 2; else 0
    gt_relevance_logit   float32      logit(E[relevance] / 2) on log 1: the Bayes ranking score; else 0

``gt_*`` columns are ground truth, never features.

What each column is worth, measured on 200k rows of seed 0 (``tests/test_synthetic_behaviour.py``
asserts looser bounds), as CTR AUC: ``item_category == query`` alone 0.769; times the
recency-weighted (0.6 ** gap) share of the history in the query's category 0.828 (a logistic
regression on the match, that share and their product: 0.842); the share in the item's category
alone 0.823, match + 2 * share 0.855; ``rank_relevance`` 0.727, ``rank_sales`` 0.533; ``gt_ctr``
(Bayes) 0.920 (0.893 before the query).
``rank_price`` ranks clicks with AUC 0.425 among users whose buys' mean price level is 0 and 0.591
where it is 4; ``rank_discount`` 0.601 and 0.500: the ranking features' best weights depend on
the user. Purchasing power from the buys' mean price: accuracy 0.672.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from lightning_mtr.data.synthetic.common import sigmoid, solve_intercept, stream, write_chunks

BEHAVIOUR_VERSION = 2  # bump whenever the same arguments would write different data
LOGS = ("ctr", "ranking", "fifp", "ppp")  # the ``log`` column holds the index
_CTR, _RANKING, _FIFP, _PPP = range(len(LOGS))
BEHAVIOUR_TYPES = ("click", "cart", "buy")  # the values of ``hist_type``
NUM_LEVELS = 5  # item price levels and user purchasing-power levels share one scale, so they can match
NUM_GAP_BUCKETS = 10
# The L2R ranking features r_i (float32 on logs 0 and 1, else 0): DUPN's score is weight(rep)^T r_i.
RANKING_FEATURES = ("rank_sales", "rank_price", "rank_relevance", "rank_discount")
HISTORY_COLUMNS = ("hist_item", "hist_category", "hist_shop", "hist_brand", "hist_price", "hist_scene",
                   "hist_gap", "hist_type")
# Dictionary-encoded in Parquet: few distinct values (a list column's leaf is "<name>.list.element").
_LOW_CARDINALITY = ["log", "user_age", "user_gender", "scene", "query", "item_category", "item_price",
                    "influencer_category", "click", "relevance", "follow", "power_level"] + [
    f"{name}.list.element" for name in ("hist_category", "hist_price", "hist_scene", "hist_gap", "hist_type")]


@dataclass(frozen=True)
class BehaviourSpec:
    """Every knob of the behaviour world, in one place.

    Users, items and histories (the world, fixed by the seed):

    * a user's taste over categories is Dirichlet(``taste_concentration``): a few
      favourites carry most of it. The current intent is one of the ``num_favourites``
      largest, uniformly, so it is often not the top favourite and only the recent
      behaviours tell which. The purchasing power ``p_u`` is uniform on 0..4.
    * ``user_age`` is ``min(p_u + 1, num_ages - 1)`` with probability ``profile_signal``,
      else uniform; ``user_gender`` is the top favourite category modulo ``num_genders``
      with that probability, else uniform: the profile says little.
    * a shop has a price tier (uniform 0..4); an item's price level is its shop's tier
      plus rounded N(0, ``price_noise_std``), clipped; its sales volume (``rank_sales``) is
      quality / ``quality_std`` + N(0, ``sales_noise_std``). Categories are spread evenly over
      items and over influencers; shops and brands are uniform.
    * a user has ``U[min_history, max_history]`` behaviours, ``hours`` ago growing by
      Exponential(``mean_gap_hours``) steps, ``hist_gap = min(floor(log2(1 + hours)), 9)``.
      A behaviour is in the intent category with probability
      ``intent_share * 0.5 ** (hours / intent_half_life_hours)``, else its category is drawn
      from the taste; its item is uniform in the category, its scene uniform. It is a buy
      with probability ``sigmoid(buy_bias + buy_price_weight * match)``, where ``match =
      -|item price level - p_u|`` is 0 when the price fits the user, else an add-to-cart
      with probability ``cart_rate``, else a click.

    Requests and labels:

    * a request (a ranking request's rows, or any other single row) has a true search intent
      ``t_r``: the user's current intent with probability ``request_intent_share``, else a draw
      from the taste. Its ``query`` is ``t_r`` with probability ``query_accuracy``, else a uniform
      category (a vague query): the query alone does not say whether it is the intent, the
      recent behaviours in its category do.
    * a candidate item's category is the query with probability ``candidate_query_share``, a draw
      from the user's taste with probability ``candidate_taste_share``, else uniform; influencers
      of FIFP rows: the taste with probability ``candidate_taste_share``, else uniform.
    * ``preference = click_taste_weight * taste_u[category] + click_intent_weight *
      [category == t_r] + click_price_weight * match + click_discount_weight * (1 - p_u / 4) *
      rank_discount + quality_item + profile[age, gender] + scene_effects[scene]`` with quality ~
      N(0, ``quality_std``) and profile effects ~ N(0, ``profile_effect_std``): a discount moves
      thrifty users only, and the price that fits depends on the power, so the best weights of
      the ranking features r_i differ per user (DUPN's weight(rep)).
    * ``rank_relevance = [category == query] + N(0, relevance_noise_std)``, ``rank_discount`` ~
      U[0, 1) per row, ``rank_price = item price level / 4``.
    * CTR: ``gt_ctr = sigmoid(b_click + preference)``.
    * ranking: clicks as in CTR (``P(relevance >= 1) = gt_ctr``); a buy also needs a price that
      fits, as in histories: ``P(relevance = 2) = sigmoid(logit(gt_ctr) - buy_threshold +
      buy_price_weight * match)``. ``gt_relevance_logit = logit(E[relevance] / 2)``: a request
      sorted by it is sorted by expected relevance.
    * FIFP: ``gt_follow = sigmoid(b_follow + follow_taste_weight * taste_u[influencer category])``.
    * PPP: ``power_level = p_u``.
    * ``b_click`` is solved per world so that the mean click rate is ``target_ctr``, ``b_follow``
      so that the follow rate is ``target_follow``.

    ``log_shares`` are the row shares of the four logs (CTR, ranking, FIFP, PPP). Users
    draw uniformly, one per CTR/FIFP/PPP row or ranking request: with the default
    ``num_users``, 200k rows give each user about two rows, too few to learn a user id's
    taste or power from its rows, so they must be read from the history.
    """

    num_users: int = 100_000
    num_items: int = 50_000
    num_categories: int = 40
    num_shops: int = 2_000
    num_brands: int = 5_000
    num_influencers: int = 2_000
    num_ages: int = 7
    num_genders: int = 3
    taste_concentration: float = 0.1
    num_favourites: int = 3
    profile_signal: float = 0.15
    price_noise_std: float = 0.6
    sales_noise_std: float = 1.0
    min_history: int = 5
    max_history: int = 50
    mean_gap_hours: float = 10.0
    intent_share: float = 0.8
    intent_half_life_hours: float = 24.0
    buy_bias: float = -0.5
    buy_price_weight: float = 1.5
    cart_rate: float = 0.15
    request_intent_share: float = 0.7
    query_accuracy: float = 0.8
    candidate_query_share: float = 0.4
    candidate_taste_share: float = 0.3
    relevance_noise_std: float = 0.5
    click_taste_weight: float = 6.0
    click_intent_weight: float = 3.5
    click_price_weight: float = 0.4
    click_discount_weight: float = 2.5
    buy_threshold: float = 2.0
    quality_std: float = 0.3
    profile_effect_std: float = 0.1
    scene_effects: tuple[float, ...] = (0.0, 0.15, -0.15, 0.3)
    follow_taste_weight: float = 6.0
    log_shares: tuple[float, float, float, float] = (0.4, 0.3, 0.15, 0.15)
    request_size: int = 10
    target_ctr: float = 0.2
    target_follow: float = 0.2
    calibration_rows: int = 1 << 16

    def vocab_sizes(self) -> dict[str, int]:
        """Ids of each id column lie in [0, size): the ``num_embeddings`` a schema needs."""
        item_parts = {"category": self.num_categories, "shop": self.num_shops, "brand": self.num_brands,
                      "price": NUM_LEVELS}
        return {
            "log": len(LOGS), "user_id": self.num_users, "user_age": self.num_ages, "user_gender": self.num_genders,
            "scene": len(self.scene_effects), "query": self.num_categories, "influencer_id": self.num_influencers,
            "influencer_category": self.num_categories, "power_level": NUM_LEVELS,
            "item_id": self.num_items, **{f"item_{part}": size for part, size in item_parts.items()},
            "hist_item": self.num_items, **{f"hist_{part}": size for part, size in item_parts.items()},
            "hist_scene": len(self.scene_effects), "hist_gap": NUM_GAP_BUCKETS, "hist_type": len(BEHAVIOUR_TYPES),
        }


SPEC = BehaviourSpec()


@dataclass
class _World:
    """Users, items, influencers and histories, derived only from the seed."""

    spec: BehaviourSpec
    taste: np.ndarray  # (users, categories), rows sum to 1
    taste_cdf: np.ndarray  # flat: u + cumsum(taste[u]) for each u, so one searchsorted draws for many users
    intent: np.ndarray  # (users,) a category
    power: np.ndarray  # (users,) 0..4
    age: np.ndarray
    gender: np.ndarray
    profile_effect: np.ndarray  # (ages, genders)
    item_category: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray
    item_quality: np.ndarray
    item_sales: np.ndarray  # the rank_sales feature: a noisy view of the quality
    items_by_category: tuple[np.ndarray, np.ndarray]  # see _group
    influencer_category: np.ndarray
    influencers_by_category: tuple[np.ndarray, np.ndarray]
    # (users + 1,): user u's behaviours are [start[u], start[u + 1]), most recent first; set by _draw_histories
    history_start: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    history: dict[str, np.ndarray] = field(default_factory=dict)  # "item", "scene", "gap", "type": per behaviour
    click_intercept: float = 0.0
    follow_intercept: float = 0.0


def _balanced(rng: np.random.Generator, n: int, groups: int) -> np.ndarray:
    """A group per entry, the groups as evenly filled as n allows, in random order."""
    return rng.permutation(np.arange(n) % groups)


def _group(labels: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(members sorted by label, start offsets (groups + 1,)): group g is members[start[g]:start[g + 1]]."""
    return np.argsort(labels, kind="stable"), np.searchsorted(np.sort(labels), np.arange(groups + 1))


def _pick(grouped: tuple[np.ndarray, np.ndarray], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform member of each entry's group."""
    members, start = grouped
    size = start[labels + 1] - start[labels]
    return members[start[labels] + (rng.random(len(labels)) * size).astype(np.int64)]


def _draw_taste(world: _World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A category per entry, drawn from that user's taste."""
    categories = world.spec.num_categories
    flat = np.searchsorted(world.taste_cdf, users + rng.random(len(users)), side="right")
    return np.minimum(flat - users * categories, categories - 1)  # the min: rounding at a row's top end


def _draw_users(world_rng: np.random.Generator, spec: BehaviourSpec) -> dict[str, np.ndarray]:
    """Taste, intent, power and profile of every user (the _World fields of the same names)."""
    n = spec.num_users
    taste = world_rng.dirichlet(np.full(spec.num_categories, spec.taste_concentration), n)
    favourites = np.argsort(-taste, axis=1)[:, :spec.num_favourites]
    intent = favourites[np.arange(n), world_rng.integers(0, spec.num_favourites, n)]
    power = world_rng.integers(0, NUM_LEVELS, n)
    age = np.where(world_rng.random(n) < spec.profile_signal, np.minimum(power + 1, spec.num_ages - 1),
                   world_rng.integers(0, spec.num_ages, n))
    gender = np.where(world_rng.random(n) < spec.profile_signal, favourites[:, 0] % spec.num_genders,
                      world_rng.integers(0, spec.num_genders, n))
    cdf = (np.cumsum(taste, axis=1) + np.arange(n)[:, None]).ravel()
    return dict(taste=taste, taste_cdf=cdf, intent=intent, power=power, age=age, gender=gender,
                profile_effect=spec.profile_effect_std * world_rng.standard_normal((spec.num_ages, spec.num_genders)))


def _draw_items(world_rng: np.random.Generator, spec: BehaviourSpec) -> dict[str, np.ndarray]:
    """Every item's category, shop, brand, price, quality and sales, and every influencer's category."""
    n = spec.num_items
    shop_tier = world_rng.integers(0, NUM_LEVELS, spec.num_shops)
    category = _balanced(world_rng, n, spec.num_categories)
    shop = world_rng.integers(0, spec.num_shops, n)
    price = shop_tier[shop] + np.rint(spec.price_noise_std * world_rng.standard_normal(n)).astype(np.int64)
    influencer_category = _balanced(world_rng, spec.num_influencers, spec.num_categories)
    quality = spec.quality_std * world_rng.standard_normal(n)
    sales = quality / spec.quality_std + spec.sales_noise_std * world_rng.standard_normal(n)
    return dict(item_category=category, item_shop=shop, item_brand=world_rng.integers(0, spec.num_brands, n),
                item_price=np.clip(price, 0, NUM_LEVELS - 1), item_quality=quality,
                item_sales=sales.astype(np.float32),
                items_by_category=_group(category, spec.num_categories), influencer_category=influencer_category,
                influencers_by_category=_group(influencer_category, spec.num_categories))


def _draw_histories(world: _World, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every user's behaviours, most recent first: recent ones mostly in the intent, buys where the price fits."""
    spec = world.spec
    lengths = rng.integers(spec.min_history, spec.max_history + 1, spec.num_users)
    start = np.concatenate([[0], np.cumsum(lengths)])
    owner = np.repeat(np.arange(spec.num_users), lengths)
    steps = rng.exponential(spec.mean_gap_hours, len(owner))
    elapsed = np.cumsum(steps)
    hours = elapsed - np.repeat(elapsed[start[:-1]] - steps[start[:-1]], lengths)
    in_intent = rng.random(len(owner)) < spec.intent_share * 0.5 ** (hours / spec.intent_half_life_hours)
    category = np.where(in_intent, world.intent[owner], _draw_taste(world, owner, rng))
    item = _pick(world.items_by_category, category, rng)
    scene = rng.integers(0, len(spec.scene_effects), len(owner))
    buy = sigmoid(spec.buy_bias + spec.buy_price_weight * _price_fit(world, owner, item))
    u = rng.random(len(owner))
    kind = np.where(u < buy, 2, (u < buy + (1 - buy) * spec.cart_rate).astype(np.int64))
    gap = np.minimum(np.floor(np.log2(1 + hours)), NUM_GAP_BUCKETS - 1).astype(np.int64)
    return start, dict(item=item, scene=scene, gap=gap, type=kind)


def _check_spec(spec: BehaviourSpec) -> None:
    """Refuse the specs that would otherwise write wrong data without a word."""
    if not 0 < spec.min_history <= spec.max_history:
        raise ValueError(f"need 0 < min_history <= max_history, got {spec.min_history}, {spec.max_history}")
    if min(spec.num_items, spec.num_influencers) < spec.num_categories:  # _pick needs no empty category
        raise ValueError("every category needs an item and an influencer: num_items and num_influencers must be "
                         f">= num_categories ({spec.num_categories})")
    if spec.candidate_query_share + spec.candidate_taste_share > 1:
        raise ValueError("candidate_query_share + candidate_taste_share, the share of candidates not drawn "
                         f"uniformly, must be <= 1, got {spec.candidate_query_share} + {spec.candidate_taste_share}")
    if not 0 < spec.num_favourites <= spec.num_categories:
        raise ValueError(f"need 0 < num_favourites <= num_categories, got {spec.num_favourites}")


def _build_world(seed: int, spec: BehaviourSpec = SPEC) -> _World:
    """The users, items and histories every split of one seed shares, and the calibrated intercepts."""
    _check_spec(spec)
    rng = stream(seed, "world")
    world = _World(spec, **_draw_users(rng, spec), **_draw_items(rng, spec))
    world.history_start, world.history = _draw_histories(world, stream(seed, "world", "histories"))
    _calibrate(world, stream(seed, "world", "calibration"))
    return world


def _requests(world: _World, users: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(true search intent, query) of each request: the intent is mostly the user's current one,
    and the query shows it, or a uniform category when the query is vague."""
    spec = world.spec
    intent = np.where(rng.random(len(users)) < spec.request_intent_share, world.intent[users],
                      _draw_taste(world, users, rng))
    query = np.where(rng.random(len(users)) < spec.query_accuracy, intent,
                     rng.integers(0, spec.num_categories, len(users)))
    return intent, query


def _candidates(world: _World, grouped: tuple[np.ndarray, np.ndarray], users: np.ndarray,
                rng: np.random.Generator, query: np.ndarray | None = None) -> np.ndarray:
    """Items (or influencers) shown to users: from the query's category (items only), a category
    of their taste, or a uniform one."""
    spec = world.spec
    u = rng.random(len(users))
    category = np.where(u < spec.candidate_taste_share, _draw_taste(world, users, rng),
                        rng.integers(0, spec.num_categories, len(users)))
    if query is not None:
        category = np.where(u >= 1 - spec.candidate_query_share, query, category)
    return _pick(grouped, category, rng)


def _price_fit(world: _World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``match``: 0 where the item's price level is the user's power, more negative the further off."""
    return -np.abs(world.item_price[items] - world.power[users])


def _preference(world: _World, users: np.ndarray, items: np.ndarray, scenes: np.ndarray, intent: np.ndarray,
                discount: np.ndarray) -> np.ndarray:
    """The click logit without its intercept (see :class:`BehaviourSpec`)."""
    spec = world.spec
    category = world.item_category[items]
    thrift = 1 - world.power[users] / (NUM_LEVELS - 1)
    return (spec.click_taste_weight * world.taste[users, category]
            + spec.click_intent_weight * (category == intent)
            + spec.click_price_weight * _price_fit(world, users, items)
            + spec.click_discount_weight * thrift * discount
            + world.item_quality[items] + world.profile_effect[world.age[users], world.gender[users]]
            + np.asarray(spec.scene_effects)[scenes])


def _follow_logit(world: _World, users: np.ndarray, influencers: np.ndarray) -> np.ndarray:
    return world.spec.follow_taste_weight * world.taste[users, world.influencer_category[influencers]]


def _calibrate(world: _World, rng: np.random.Generator) -> None:
    """Solve the two intercepts on a sample of users and candidates."""
    spec = world.spec
    users = rng.integers(0, spec.num_users, spec.calibration_rows)
    scenes = rng.integers(0, len(spec.scene_effects), spec.calibration_rows)
    intent, query = _requests(world, users, rng)
    items = _candidates(world, world.items_by_category, users, rng, query)
    influencers = _candidates(world, world.influencers_by_category, users, rng)
    discount = rng.random(spec.calibration_rows)
    for name, logit, target in (
        ("click", _preference(world, users, items, scenes, intent, discount), spec.target_ctr),
        ("follow", _follow_logit(world, users, influencers), spec.target_follow),
    ):
        setattr(world, f"{name}_intercept", solve_intercept(lambda b, x=logit: np.mean(sigmoid(x + b)), target))


def _layout(spec: BehaviourSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    """The log of each unit (a row, or a ranking request of request_size rows) of an n-row chunk, shuffled."""
    shares = np.asarray(spec.log_shares) / sum(spec.log_shares)
    requests = int(n * shares[_RANKING]) // spec.request_size
    single = n - requests * spec.request_size
    fifp, ppp = np.floor(single * shares[[_FIFP, _PPP]] / (1 - shares[_RANKING])).astype(np.int64)
    return rng.permutation(np.repeat([_CTR, _RANKING, _FIFP, _PPP], [single - fifp - ppp, requests, fifp, ppp]))


def _history_columns(world: _World, users: np.ndarray) -> dict[str, pa.Array]:
    """The users' histories as list columns, one list per row."""
    start, stop = world.history_start[users], world.history_start[users + 1]
    offsets = np.concatenate([[0], np.cumsum(stop - start)])
    index = np.arange(offsets[-1]) + np.repeat(start - offsets[:-1], stop - start)
    item = world.history["item"][index]
    values = dict(item=item, category=world.item_category[item], shop=world.item_shop[item],
                  brand=world.item_brand[item], price=world.item_price[item],
                  **{part: world.history[part][index] for part in ("scene", "gap", "type")})
    offsets = pa.array(offsets.astype(np.int32))
    return {f"hist_{part}": pa.ListArray.from_arrays(offsets, pa.array(v)) for part, v in values.items()}


def _ranking_features(world: _World, items: np.ndarray, query: np.ndarray,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The L2R features r_i of shown items (see RANKING_FEATURES); none reads a label."""
    relevance = world.item_category[items] == query
    return dict(rank_sales=world.item_sales[items], rank_price=world.item_price[items] / (NUM_LEVELS - 1),
                rank_relevance=relevance + world.spec.relevance_noise_std * rng.standard_normal(len(items)),
                rank_discount=rng.random(len(items)))


def _nullable(values: np.ndarray, present: np.ndarray) -> pa.Array:
    """An int64 column holding values on the present rows and nulls elsewhere."""
    full = np.zeros(len(present), np.int64)
    full[present] = values
    return pa.array(full, mask=~present)


def _behaviour_chunk(world: _World, rng: np.random.Generator, n: int,
                     first_request_id: int) -> dict[str, np.ndarray | pa.Array]:
    """n rows of the four logs, shuffled by request, with their labels and ground truth."""
    spec = world.spec
    units = _layout(spec, rng, n)
    unit = np.repeat(np.arange(len(units)), np.where(units == _RANKING, spec.request_size, 1))
    log = units[unit]
    unit_users = rng.integers(0, spec.num_users, len(units))
    users, scenes = unit_users[unit], rng.integers(0, len(spec.scene_effects), len(units))[unit]
    intent, query = (values[unit] for values in _requests(world, unit_users, rng))
    shown, follows, ranking = (log == _CTR) | (log == _RANKING), log == _FIFP, log == _RANKING
    items = _candidates(world, world.items_by_category, users[shown], rng, query[shown])
    influencers = _candidates(world, world.influencers_by_category, users[follows], rng)
    features = _ranking_features(world, items, query[shown], rng)
    logit = _preference(world, users[shown], items, scenes[shown], intent[shown], features["rank_discount"])
    logit += world.click_intercept
    gt_ctr, p_buy, gt_follow, gt_relevance_logit = (np.zeros(n, np.float32) for _ in range(4))
    gt_ctr[shown] = sigmoid(logit)
    buy_logit = logit - spec.buy_threshold + spec.buy_price_weight * _price_fit(world, users[shown], items)
    p_buy[ranking] = sigmoid(buy_logit[ranking[shown]])
    half_expected = (gt_ctr[ranking] + p_buy[ranking]) / 2
    gt_relevance_logit[ranking] = np.log(half_expected / (1 - half_expected))
    gt_follow[follows] = sigmoid(_follow_logit(world, users[follows], influencers) + world.follow_intercept)
    u = rng.random(n, dtype=np.float32)  # one uniform per row: a buy implies a click, as an ordinal label must
    click = (u < gt_ctr).astype(np.int64)
    bought = click * (u < p_buy)
    columns = dict(log=log, request_id=first_request_id + unit, user_id=users, user_age=world.age[users],
                   user_gender=world.gender[users], scene=scenes, query=query, item_id=_nullable(items, shown))
    for part in ("category", "shop", "brand", "price"):
        columns[f"item_{part}"] = _nullable(getattr(world, f"item_{part}")[items], shown)
    columns.update(influencer_id=_nullable(influencers, follows),
                   influencer_category=_nullable(world.influencer_category[influencers], follows))
    columns.update(_history_columns(world, users))
    for name, values in features.items():
        columns[name] = np.zeros(n, np.float32)
        columns[name][shown] = values
    return columns | dict(
        click=click, relevance=click * ranking + bought, follow=(u < gt_follow).astype(np.int64),
        power_level=np.where(log == _PPP, world.power[users], 0), gt_ctr=gt_ctr, gt_follow=gt_follow,
        gt_relevance_logit=gt_relevance_logit,
    )


def write_behaviour(
    out_dir: str | Path,
    train_rows: int,
    val_rows: int,
    test_rows: int,
    seed: int = 0,
    row_group_rows: int = 65536,
    spec: BehaviourSpec = SPEC,
) -> dict[str, Path]:
    """Write train/val/test behaviour logs of one seeded world (columns: the module docstring).

    Every split shares the world (users, histories, items) and draws rows from its own
    stream keyed by (seed, split, chunk), so the same arguments give bit-identical files.
    A row group holds whole ranking requests only; request ids of different splits lie in
    disjoint ranges.
    """
    world = _build_world(seed, spec)
    sizes = {"train": train_rows, "val": val_rows, "test": test_rows}
    paths = {}
    for split_index, (split, rows) in enumerate(sizes.items()):
        def chunk(index: int, n: int, split: str = split, split_index: int = split_index) -> dict:
            first_request_id = (split_index << 40) + index * row_group_rows
            return _behaviour_chunk(world, stream(seed, split, index), n, first_request_id)

        path = Path(out_dir) / f"{split}.parquet"
        paths[split] = write_chunks(path, rows, row_group_rows, chunk, _LOW_CARDINALITY)
    return paths
