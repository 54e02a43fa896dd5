"""The DUPN behaviour log: determinism, schema, and labels that only the behaviour sequence explains.

The estimators here are plain numpy statistics of one row's history (no training): if they
separate the labels well while the profile features do not, a model that reads the
sequence has something to learn that a model without it cannot.
"""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from lightning_mtr.data.synthetic.behaviour import (
    BEHAVIOUR_TYPES, HISTORY_COLUMNS, NUM_GAP_BUCKETS, NUM_LEVELS, RANKING_FEATURES, SPEC, write_behaviour,
)

ROWS = 60_000
SMALL = dataclasses.replace(SPEC, num_users=3000, num_items=3000, num_shops=200, num_brands=300, num_influencers=200)
NULLABLE = ("item_id", "item_category", "item_shop", "item_brand", "item_price", "influencer_id",
            "influencer_category")
INT_COLUMNS = ("log", "request_id", "user_id", "user_age", "user_gender", "scene", "query", *NULLABLE, "click",
               "relevance", "follow", "power_level")
GROUND_TRUTH = ("gt_ctr", "gt_follow", "gt_relevance_logit")
CTR, RANKING, FIFP, PPP = range(4)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float64)), torch.from_numpy(labels.astype(np.int64))))


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> dict[str, np.ndarray]:
    """The train split's columns; a list column as its flat values, with ``row`` (the row of each value)."""
    paths = write_behaviour(tmp_path_factory.mktemp("behaviour"), ROWS, 500, 500, seed=0, row_group_rows=16_384)
    table = pq.read_table(paths["train"])
    columns = {name: table[name].fill_null(-1).to_numpy() for name in (*INT_COLUMNS, *RANKING_FEATURES, *GROUND_TRUTH)}
    for name in HISTORY_COLUMNS:
        columns[name] = table[name].combine_chunks().flatten().to_numpy()
    columns["row"] = np.repeat(np.arange(ROWS), pc.list_value_length(table["hist_gap"]).to_numpy())
    return columns


def _history_share(c: dict[str, np.ndarray], category: np.ndarray, decay: float = 1.0) -> np.ndarray:
    """Per row: the share of its history in ``category`` (one per row), behaviours weighted decay ** gap."""
    weight = decay ** c["hist_gap"].astype(np.float64)
    hits = np.bincount(c["row"], weight * (c["hist_category"] == category[c["row"]]), ROWS)
    return hits / np.bincount(c["row"], weight, ROWS)


def test_same_arguments_give_identical_files_and_other_seeds_differ(tmp_path):
    first = write_behaviour(tmp_path / "a", 3000, 1000, 1000, seed=3, row_group_rows=1000, spec=SMALL)
    again = write_behaviour(tmp_path / "b", 3000, 1000, 1000, seed=3, row_group_rows=1000, spec=SMALL)
    other = write_behaviour(tmp_path / "c", 3000, 1000, 1000, seed=4, row_group_rows=1000, spec=SMALL)
    for split in ("train", "val", "test"):
        assert first[split].read_bytes() == again[split].read_bytes()
        assert not pq.read_table(first[split]).equals(pq.read_table(other[split]))
    assert pq.ParquetFile(first["train"]).metadata.num_row_groups == 3
    val, test = pq.read_table(first["val"]), pq.read_table(first["test"])
    assert not np.array_equal(val["user_id"].to_numpy(), test["user_id"].to_numpy())
    assert not set(val["request_id"].to_numpy()) & set(test["request_id"].to_numpy())


@pytest.mark.parametrize("change", [dict(num_items=10), dict(num_influencers=10), dict(min_history=0),
                                    dict(min_history=9, max_history=8), dict(num_favourites=41),
                                    dict(candidate_query_share=0.6, candidate_taste_share=0.5)])
def test_specs_that_would_write_wrong_data_are_refused(tmp_path, change):
    with pytest.raises(ValueError):
        write_behaviour(tmp_path, 10, 10, 10, spec=dataclasses.replace(SMALL, **change))


def test_column_types_and_id_ranges(tmp_path):
    table = pq.read_table(write_behaviour(tmp_path, 2000, 100, 100, spec=SMALL)["train"])
    assert sorted(table.column_names) == sorted([*INT_COLUMNS, *HISTORY_COLUMNS, *RANKING_FEATURES, *GROUND_TRUTH])
    for name in INT_COLUMNS:
        assert table.schema.field(name).type == pa.int64(), name
    for name in HISTORY_COLUMNS:
        assert table.schema.field(name).type.equals(pa.list_(pa.int64()), check_metadata=False), name
    for name in (*RANKING_FEATURES, *GROUND_TRUTH):
        assert table.schema.field(name).type == pa.float32(), name
    for name, size in SMALL.vocab_sizes().items():
        values = pc.list_flatten(table[name]) if name in HISTORY_COLUMNS else table[name]
        assert 0 <= pc.min(values).as_py() and pc.max(values).as_py() < size, name


def test_nulls_and_labels_stay_on_their_own_log(log):
    c = log
    shown, follows = c["log"] <= RANKING, c["log"] == FIFP
    for name in NULLABLE:
        present = follows if name.startswith("influencer") else shown
        assert np.array_equal(c[name] >= 0, present), name
    for name, own in (("click", shown), ("gt_ctr", shown), ("relevance", c["log"] == RANKING),
                      ("gt_relevance_logit", c["log"] == RANKING), ("follow", follows), ("gt_follow", follows),
                      ("power_level", c["log"] == PPP), *((name, shown) for name in RANKING_FEATURES)):
        assert np.all(c[name][~own] == 0), name
    ranking = c["log"] == RANKING
    assert set(np.unique(c["relevance"][ranking])) == {0, 1, 2}
    assert np.array_equal(c["click"][ranking], (c["relevance"][ranking] >= 1).astype(np.int64))
    assert set(np.unique(c["power_level"][c["log"] == PPP])) == set(range(NUM_LEVELS))
    assert np.all((c["gt_ctr"][shown] > 0) & (c["gt_ctr"][shown] < 1))


def test_ranking_requests_are_contiguous_and_other_rows_have_their_own_request(log):
    c = log
    starts = np.flatnonzero(np.diff(c["request_id"], prepend=-1) != 0)
    sizes = np.diff(starts, append=ROWS)
    assert len(np.unique(c["request_id"])) == len(starts)  # a request id never comes back later
    is_request = c["log"][starts] == RANKING
    assert np.all(sizes[is_request] == SPEC.request_size) and np.all(sizes[~is_request] == 1)
    for name in ("log", "user_id", "scene", "query"):
        assert np.all(c[name] == np.repeat(c[name][starts], sizes)), name  # constant within a request


def test_shares_and_calibration(log):
    c = log
    shares = np.bincount(c["log"], minlength=4) / ROWS
    np.testing.assert_allclose(shares, SPEC.log_shares, atol=0.01)
    for kind, label, target in ((CTR, "click", SPEC.target_ctr), (RANKING, "click", SPEC.target_ctr),
                                (FIFP, "follow", SPEC.target_follow)):
        rows = c["log"] == kind
        assert abs(c[label][rows].mean() - target) < 0.015, (kind, c[label][rows].mean())


def test_histories_are_most_recent_first_and_in_range(log):
    c = log
    lengths = np.bincount(c["row"], minlength=ROWS)
    assert lengths.min() >= SPEC.min_history and lengths.max() <= SPEC.max_history
    same_row = np.diff(c["row"]) == 0
    assert np.all(np.diff(c["hist_gap"])[same_row] >= 0)
    assert c["hist_gap"].min() == 0 and c["hist_gap"].max() == NUM_GAP_BUCKETS - 1
    assert set(np.unique(c["hist_type"])) == set(range(len(BEHAVIOUR_TYPES)))


def test_query_and_history_predict_click_together_and_the_profile_does_not(log):
    c = log
    rows = c["log"] == CTR
    click = c["click"][rows]
    query = _auc((c["item_category"] == c["query"])[rows], click)
    recency = _auc(_history_share(c, c["item_category"], decay=0.6)[rows], click)
    both = _auc((c["item_category"] == c["query"])[rows] + 2 * _history_share(c, c["item_category"], 0.6)[rows], click)
    bayes = _auc(c["gt_ctr"][rows], click)
    cell = c["user_age"] * SPEC.num_genders + c["user_gender"]
    rate = np.bincount(cell[rows], click) / np.bincount(cell[rows])  # the best any profile-only model does here
    profile = _auc(rate[cell[rows]], click)
    print(f"CTR AUC: query match {query:.3f}, recency-weighted history share {recency:.3f}, both {both:.3f}, "
          f"profile {profile:.3f}, gt_ctr (Bayes) {bayes:.3f}")
    assert 0.7 < query < recency  # the query is informative, the history more so ...
    assert both > recency + 0.02  # ... and each adds to the other
    assert profile < 0.56
    assert both + 0.03 < bayes < 0.95


def _power_from_history(c: dict[str, np.ndarray]) -> np.ndarray:
    """Per row: the rounded mean price level of the user's buys (of all behaviours when none is a buy)."""
    buy = c["hist_type"] == BEHAVIOUR_TYPES.index("buy")
    buys = np.bincount(c["row"], buy, ROWS)
    spent = np.bincount(c["row"], c["hist_price"] * buy, ROWS) / np.maximum(buys, 1)
    seen = np.bincount(c["row"], c["hist_price"], ROWS) / np.bincount(c["row"], minlength=ROWS)
    return np.rint(np.where(buys > 0, spent, seen))


def test_prices_of_buys_predict_power_level(log):
    c = log
    estimate = _power_from_history(c)
    rows = c["log"] == PPP
    accuracy = np.mean(estimate[rows] == c["power_level"][rows])
    from_age = np.mean(np.minimum(c["user_age"][rows] - 1, NUM_LEVELS - 1) == c["power_level"][rows])
    print(f"PPP accuracy: rounded mean price of buys {accuracy:.3f}, age - 1 {from_age:.3f} (chance 0.2)")
    assert accuracy > 0.55 and from_age < 0.35


def test_history_share_predicts_follow_and_ranking(log):
    c = log
    follows = c["log"] == FIFP
    follow = _auc(_history_share(c, c["influencer_category"])[follows], c["follow"][follows])
    ranking = c["log"] == RANKING
    relevance = _auc(_history_share(c, c["item_category"], decay=0.6)[ranking], c["relevance"][ranking] >= 1)
    bayes = _auc(c["gt_follow"][follows], c["follow"][follows])
    print(f"FIFP AUC: history share {follow:.3f}, gt_follow (Bayes) {bayes:.3f}; "
          f"ranking relevance >= 1 AUC: history share {relevance:.3f}")
    assert follow >= 0.65 and follow < bayes
    assert relevance >= 0.7


def test_ranking_buys_need_a_price_that_fits_the_power_seen_in_history(log):
    c = log
    clicked = (c["log"] == RANKING) & (c["click"] == 1)
    fit = -np.abs(c["item_price"] - _power_from_history(c))
    buy = _auc(fit[clicked], c["relevance"][clicked] == 2)
    p_buy = 2 / (1 + np.exp(-c["gt_relevance_logit"][clicked])) - c["gt_ctr"][clicked]  # E[relevance] - P(click)
    bayes = _auc(p_buy / c["gt_ctr"][clicked], c["relevance"][clicked] == 2)  # by P(buy | click)
    print(f"ranking, buy among clicks AUC: price fit to the power seen in history {buy:.3f}, truth {bayes:.3f}")
    assert 0.6 <= buy < bayes
    ranking = c["log"] == RANKING
    mean_relevance = c["relevance"][ranking].mean()
    assert abs(mean_relevance - np.mean(2 / (1 + np.exp(-c["gt_relevance_logit"][ranking])))) < 0.02


def test_ranking_features_are_facts_of_the_item_and_request_whose_worth_depends_on_the_user(log):
    """r_i are no labels' function (an item's sales and price are the same on all its rows; the
    relevance follows the query), and how a click follows them flips with the purchasing power:
    the reason DUPN weighs them with weight(rep), not with one global vector."""
    c = log
    shown = c["log"] <= RANKING
    np.testing.assert_allclose(c["rank_price"][shown], c["item_price"][shown] / (NUM_LEVELS - 1), rtol=1e-6)
    items, first = np.unique(c["item_id"][shown], return_inverse=True)
    sales = c["rank_sales"][shown]
    assert np.array_equal(sales, sales[np.unique(first, return_index=True)[1]][first])  # one value per item
    match = c["item_category"][shown] == c["query"][shown]
    assert c["rank_relevance"][shown][match].mean() > c["rank_relevance"][shown][~match].mean() + 0.8
    assert np.all((c["rank_discount"][shown] >= 0) & (c["rank_discount"][shown] < 1))
    power = _power_from_history(c)
    worth = {}
    for level in (0, NUM_LEVELS - 1):
        rows = shown & (power == level)
        worth[level] = {name: _auc(c[name][rows], c["click"][rows]) for name in ("rank_price", "rank_discount")}
    print(f"click AUC of ranking features by the power seen in history: {worth}")
    assert worth[0]["rank_price"] < 0.47 and worth[NUM_LEVELS - 1]["rank_price"] > 0.53  # cheap vs dear
    assert worth[0]["rank_discount"] > worth[NUM_LEVELS - 1]["rank_discount"] + 0.05  # thrifty users like discounts
