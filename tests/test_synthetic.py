"""The synthetic generators: determinism, schema, and the structure the labels are built to have."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_mtr.data import synthetic
from lightning_mtr.data.synthetic import impressions as impression_log
from lightning_mtr.data.synthetic.common import stream
from lightning_mtr.data.synthetic import (
    DENSE_COLUMNS,
    SPARSE_COLUMNS,
    VOCAB_SIZES,
    main,
    mmoe_task_weights,
    write_impressions,
    write_mmoe_regression,
)

TRAIN_ROWS = 60_000
INT_LABELS = ("position", "click", "daction", "conversion", "gt_daction_if_clicked", "gt_conv_if_clicked")
GROUND_TRUTH = ("gt_ctr", "gt_ctr_no_position", "gt_dar", "gt_cvr", "gt_ctcvr", "gt_cvr_given_daction",
                "gt_cvr_given_oaction")


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@pytest.fixture(scope="module")
def impressions(tmp_path_factory) -> tuple[pa.Table, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("impressions")
    paths = write_impressions(out, TRAIN_ROWS, 500, 500, seed=0, row_group_rows=16_384)
    table = pq.read_table(paths["train"])
    return table, {name: table[name].to_numpy() for name in table.column_names}


def test_same_arguments_give_identical_files_and_other_seeds_differ(tmp_path):
    first = write_impressions(tmp_path / "a", 3000, 1000, 1000, seed=3, row_group_rows=1000)
    again = write_impressions(tmp_path / "b", 3000, 1000, 1000, seed=3, row_group_rows=1000)
    other = write_impressions(tmp_path / "c", 3000, 1000, 1000, seed=4, row_group_rows=1000)
    for split in ("train", "val", "test"):
        assert first[split].read_bytes() == again[split].read_bytes()
        assert not pq.read_table(first[split]).equals(pq.read_table(other[split]))
    assert pq.ParquetFile(first["train"]).metadata.num_row_groups == 3
    # Each split has its own stream: val is not the first rows of test.
    val, test = pq.read_table(first["val"]), pq.read_table(first["test"])
    assert not np.array_equal(val["C26"].to_numpy(), test["C26"].to_numpy())


def test_schema_dtypes_and_ranges(impressions):
    table, columns = impressions
    expected = [*SPARSE_COLUMNS, *DENSE_COLUMNS, *INT_LABELS, *GROUND_TRUTH]
    assert sorted(table.column_names) == sorted(expected)
    assert table.num_rows == TRAIN_ROWS
    for name in (*SPARSE_COLUMNS, *INT_LABELS):
        assert table.schema.field(name).type == pa.int64(), name
    for name in (*DENSE_COLUMNS, *GROUND_TRUTH):
        assert table.schema.field(name).type == pa.float32(), name
    for name, vocab in zip(SPARSE_COLUMNS, VOCAB_SIZES):
        assert 0 <= columns[name].min() and columns[name].max() < vocab, name
    for name in DENSE_COLUMNS:
        assert np.all(columns[name] >= 0) and np.all(np.isfinite(columns[name])), name
    scales = [np.median(columns[name]) for name in DENSE_COLUMNS]
    assert max(scales) / min(scales) > 100  # each dense column has its own scale
    assert set(np.unique(columns["position"])) == set(range(1, 11))
    for name in ("click", "daction", "conversion", "gt_daction_if_clicked", "gt_conv_if_clicked"):
        assert set(np.unique(columns[name])) == {0, 1}, name
    for name in GROUND_TRUTH:
        assert np.all((columns[name] >= 0) & (columns[name] <= 1)), name


def test_vocabularies_span_criteo_sizes_and_ids_are_zipf_like(impressions):
    _, columns = impressions
    assert len(VOCAB_SIZES) == 26 and VOCAB_SIZES[0] == 10 and VOCAB_SIZES[-1] == 1_000_000
    assert all(a < b for a, b in zip(VOCAB_SIZES, VOCAB_SIZES[1:]))
    counts = np.bincount(columns["C16"], minlength=VOCAB_SIZES[15])  # 10,000 ids
    assert counts.max() > 0.05 * TRAIN_ROWS
    assert counts.max() > 100 * max(np.median(counts), 1)
    assert np.bincount(columns["C26"]).max() > 0.05 * TRAIN_ROWS
    # A seeded permutation maps popularity to ids, so the head is not always id 0.
    heads = [np.bincount(columns[name]).argmax() for name in SPARSE_COLUMNS]
    assert sum(head != 0 for head in heads) > 20


def test_conversion_follows_click_and_probabilities_multiply(impressions):
    _, c = impressions
    assert np.all(c["conversion"] <= c["click"])
    np.testing.assert_array_equal(c["conversion"], c["click"] * c["gt_conv_if_clicked"])
    np.testing.assert_array_equal(c["gt_ctcvr"], c["gt_ctr"] * c["gt_cvr"])


def test_daction_follows_click_and_conversion_keeps_its_contract(impressions):
    _, c = impressions
    assert np.all(c["daction"] <= c["click"])
    np.testing.assert_array_equal(c["daction"], c["click"] * c["gt_daction_if_clicked"])
    np.testing.assert_array_equal(c["conversion"], c["click"] * c["gt_conv_if_clicked"])
    oaction = (c["click"] == 1) & (c["daction"] == 0)
    assert c["conversion"][c["daction"] == 1].sum() > 0 and c["conversion"][oaction].sum() > 0  # both paths buy


def test_cvr_is_the_mixture_over_the_post_click_action(impressions):
    _, c = impressions
    dar, given_d, given_o = (c[name].astype(np.float64) for name in
                             ("gt_dar", "gt_cvr_given_daction", "gt_cvr_given_oaction"))
    np.testing.assert_allclose(c["gt_cvr"], dar * given_d + (1 - dar) * given_o, rtol=0, atol=1e-6)
    assert np.all(given_d > given_o)
    # The lift is a constant shift of the conversion logit (checked where float32 keeps the logit precise).
    moderate = (given_d > 0.01) & (given_d < 0.99) & (given_o > 0.01) & (given_o < 0.99)
    lift = np.log(given_d / (1 - given_d)) - np.log(given_o / (1 - given_o))
    np.testing.assert_allclose(lift[moderate], synthetic.SPEC.daction_lift, atol=1e-3)
    assert moderate.sum() > 10_000, "the lift check must cover many rows"


def _within_sampling_error(labels: np.ndarray, probabilities: np.ndarray, sigmas: float = 4.0) -> None:
    """The mean of Bernoulli(p_i) draws is mean(p) to within `sigmas` of its exact standard error."""
    probabilities = probabilities.astype(np.float64)
    standard_error = np.sqrt(np.sum(probabilities * (1 - probabilities))) / len(labels)
    assert abs(labels.mean() - probabilities.mean()) < sigmas * standard_error


def test_buying_is_more_likely_after_a_daction(impressions):
    _, c = impressions
    clicked = c["click"] == 1
    daction, oaction = clicked & (c["daction"] == 1), clicked & (c["daction"] == 0)
    assert daction.sum() > 1000 and oaction.sum() > 1000
    buy_after_daction, buy_after_oaction = c["conversion"][daction].mean(), c["conversion"][oaction].mean()
    assert buy_after_daction > 2 * buy_after_oaction
    _within_sampling_error(c["conversion"][daction], c["gt_cvr_given_daction"][daction])
    _within_sampling_error(c["conversion"][oaction], c["gt_cvr_given_oaction"][oaction])
    _within_sampling_error(c["conversion"][clicked], c["gt_cvr"][clicked])


def test_daction_rate_is_calibrated_and_depends_on_features(impressions):
    _, c = impressions
    clicked = c["click"] == 1
    assert 0.25 <= c["daction"][clicked].mean() <= 0.35
    _within_sampling_error(c["daction"][clicked], c["gt_dar"][clicked])
    _within_sampling_error(c["gt_daction_if_clicked"], c["gt_dar"])  # drawn for every row, clicked or not
    assert 0.6 <= _rank_auc(c["gt_dar"][clicked], c["daction"][clicked])


def test_daction_knobs_leave_clicks_untouched():
    spec = dataclasses.replace(synthetic.SPEC, daction_lift=0.5, target_daction_given_click=0.6,
                               daction_id_effects=(("C13", 0.8),))
    base, other = impression_log._build_world(5), impression_log._build_world(5, spec)
    first = impression_log._impression_chunk(base, stream(5, "train", 0), 4000)
    second = impression_log._impression_chunk(other, stream(5, "train", 0), 4000)
    for name in ("position", "click", "gt_ctr", "C26", "I13"):
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first["gt_dar"], second["gt_dar"])
    assert other.conversion_intercept != base.conversion_intercept  # recalibrated for the new mixture
    for chunk in (first, second):
        cvr_given_click = np.sum(chunk["gt_ctr"] * chunk["gt_cvr"]) / np.sum(chunk["gt_ctr"])
        assert cvr_given_click == pytest.approx(synthetic.SPEC.target_cvr_given_click, abs=0.02)
    dar_given_click = np.sum(second["gt_ctr"] * second["gt_dar"]) / np.sum(second["gt_ctr"])
    assert dar_given_click == pytest.approx(0.6, abs=0.02)


def test_calibration_and_bayes_auc(impressions):
    _, c = impressions
    clicked = c["click"] == 1
    assert 0.10 <= c["click"].mean() <= 0.25
    assert 0.10 <= c["conversion"][clicked].mean() <= 0.30
    assert 0.25 <= c["daction"][clicked].mean() <= 0.35
    assert 0.7 <= _rank_auc(c["gt_ctr"][:50_000], c["click"][:50_000]) <= 0.9


def test_click_carries_position_bias_and_position_is_confounded(impressions):
    _, c = impressions
    positions = range(1, 11)
    by_position = [c["position"] == p for p in positions]
    empirical_ctr = np.array([c["click"][rows].mean() for rows in by_position])
    assert np.all(np.diff(empirical_ctr) < 0)
    bias = c["gt_ctr"] / c["gt_ctr_no_position"]
    bias_by_position = np.array([bias[rows].mean() for rows in by_position])
    np.testing.assert_allclose([bias[rows].std() for rows in by_position], 0, atol=1e-5)
    assert bias_by_position[0] == pytest.approx(1, abs=1e-5) and np.all(np.diff(bias_by_position) < 0)
    relevance = [c["gt_ctr_no_position"][rows].mean() for rows in by_position]
    assert relevance[0] > relevance[-1] + 0.1


def test_clicked_rows_are_a_biased_sample_for_conversion(impressions):
    _, c = impressions
    clicked = c["click"] == 1
    assert abs(c["gt_cvr"][clicked].mean() - c["gt_cvr"].mean()) > 0.01


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 1.0, -0.5])
def test_mmoe_task_weights_have_the_requested_cosine(correlation):
    w1, w2 = mmoe_task_weights(dim=100, correlation=correlation, seed=7)
    cosine = w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2))
    assert cosine == pytest.approx(correlation, abs=1e-6)
    assert np.linalg.norm(w1) == pytest.approx(1.0) and np.linalg.norm(w2) == pytest.approx(1.0)


def test_mmoe_label_correlation_grows_with_task_correlation(tmp_path):
    label_correlation = {}
    for p in (0.1, 0.9):
        path = write_mmoe_regression(tmp_path / f"mmoe_{p}.parquet", rows=20_000, correlation=p, seed=1)
        table = pq.read_table(path)
        assert table.column_names == [f"x{d}" for d in range(100)] + ["y1", "y2"]
        assert all(field.type == pa.float32() for field in table.schema)
        label_correlation[p] = np.corrcoef(table["y1"].to_numpy(), table["y2"].to_numpy())[0, 1]
    assert label_correlation[0.9] > label_correlation[0.1] + 0.4


@pytest.mark.parametrize(
    "arguments",
    [dict(correlation=1.5), dict(correlation=-1.01), dict(rows=0), dict(dim=1), dict(noise_std=-0.1)],
)
def test_mmoe_rejects_bad_arguments(tmp_path, arguments):
    kwargs = dict(rows=10, correlation=0.5, dim=4) | arguments
    with pytest.raises(ValueError):
        write_mmoe_regression(tmp_path / "bad.parquet", **kwargs)


def test_main_writes_both_kinds_of_data(tmp_path, capsys):
    argv = ["impressions", "--out", str(tmp_path), "--train-rows", "300", "--val-rows", "100", "--test-rows", "100"]
    assert main([*argv, "--seed", "2"]) == 0
    for split, rows in (("train", 300), ("val", 100), ("test", 100)):
        assert pq.ParquetFile(tmp_path / f"{split}.parquet").metadata.num_rows == rows
    mmoe_path = tmp_path / "mmoe.parquet"
    assert main(["mmoe", "--out", str(mmoe_path), "--rows", "50", "--correlation", "0.3", "--dim", "8"]) == 0
    assert pq.read_table(mmoe_path).num_columns == 10
    printed = capsys.readouterr().out
    assert "train.parquet: 300 rows" in printed and "mmoe.parquet: 50 rows" in printed


def test_spec_keeps_large_effects_off_the_long_tail():
    spec = synthetic.SPEC
    effects = dict(spec.click_id_effects)
    large_vocab = [s for name, s in effects.items() if VOCAB_SIZES[int(name[1:]) - 1] >= 100_000]
    small_vocab = [s for name, s in effects.items() if VOCAB_SIZES[int(name[1:]) - 1] <= 1_000]
    assert max(large_vocab) < min(small_vocab)


def test_mmoe_split_is_held_out_sample_of_the_same_tasks(tmp_path):
    train = pq.read_table(write_mmoe_regression(tmp_path / "a.parquet", 2000, 0.7, dim=8, seed=3))
    val = pq.read_table(write_mmoe_regression(tmp_path / "b.parquet", 2000, 0.7, dim=8, seed=3, split="val"))
    assert not np.array_equal(train.column("x0").to_numpy(), val.column("x0").to_numpy())
    w1, _ = mmoe_task_weights(8, 0.7, seed=3)

    def projection_and_residual(table):
        x = np.stack([table.column(f"x{d}").to_numpy() for d in range(8)], axis=1).astype(np.float64)
        projection = x @ w1
        return projection, table.column("y1").to_numpy() - projection  # = sum of sines of w1.x, plus noise

    train_p, train_r = projection_and_residual(train)
    val_p, val_r = projection_and_residual(val)
    order = np.argsort(train_p)
    # same task pair: the val residual is the train residual's function of w1.x, up to noise (std 0.1 each)
    inside = (val_p > train_p.min()) & (val_p < train_p.max())
    predicted = np.interp(val_p[inside], train_p[order], train_r[order])
    assert np.std(val_r[inside] - predicted) < 0.3
    other = pq.read_table(write_mmoe_regression(tmp_path / "c.parquet", 2000, 0.7, dim=8, seed=4, split="val"))
    assert not np.allclose(other.column("y1").to_numpy(), val.column("y1").to_numpy())


def test_mmoe_sine_shape_is_the_same_for_every_seed():
    """The paper's alpha, beta are given parameters: every seed's task pair has the same sines
    g(z) = sum_k sin(alpha_k z + beta_k) of its own projection z = w1.x (seeds differ in w and
    rows); another ``shape_seed`` gives other sines. Checked without noise: y1 - z is g(z) exactly."""
    from lightning_mtr.data.synthetic.mmoe_regression import mmoe_regression_arrays

    def residual(seed: int, shape_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        x, y = mmoe_regression_arrays(500, 0.7, dim=8, noise_std=0.0, seed=seed, shape_seed=shape_seed)
        z = x.astype(np.float64) @ mmoe_task_weights(8, 0.7, seed=seed)[0]
        return z, y[:, 0] - z

    z3, g3 = residual(3)
    z4, g4 = residual(4)
    assert not np.allclose(z3, z4)
    rng = stream(0, "mmoe-sin")  # the paper's formula with shape_seed 0's draw, by hand
    alpha, beta = rng.standard_normal(10), rng.standard_normal(10)
    for z, g in ((z3, g3), (z4, g4)):
        np.testing.assert_allclose(g, np.sin(z[:, None] * alpha + beta).sum(-1), atol=1e-4)
    z, other = residual(3, shape_seed=1)
    assert np.abs(other - np.sin(z[:, None] * alpha + beta).sum(-1)).max() > 1.0


def test_mmoe_alpha_std_and_scale_are_the_sines_frequency_and_the_papers_c():
    """alpha ~ N(0, alpha_std^2) (the paper leaves alpha open) and w_i = c u_i: with c = 2 and
    alpha_std = 3, y1 = 2 u1.x + sum_k sin(3 a_k (2 u1.x) + b_k), a, b shape_seed 0's N(0, 1) draw."""
    from lightning_mtr.data.synthetic.mmoe_regression import mmoe_regression_arrays

    x, y = mmoe_regression_arrays(500, 0.7, dim=8, noise_std=0.0, seed=3, alpha_std=3.0, scale=2.0)
    u1 = mmoe_task_weights(8, 0.7, seed=3)[0]  # unit length
    z = 2.0 * (x.astype(np.float64) @ u1)
    rng = stream(0, "mmoe-sin")
    alpha, beta = rng.standard_normal(10), rng.standard_normal(10)
    np.testing.assert_allclose(y[:, 0], z + np.sin(z[:, None] * 3.0 * alpha + beta).sum(-1), atol=1e-4)


def test_placement_column_sets_position_only_when_asked(tmp_path):
    """With a placement weight, C9's ids (no effect on relevance) pull their rows up or down the
    page; without one, C9 says nothing about position (and the default log is unchanged)."""
    from lightning_mtr.data.synthetic import ImpressionSpec, write_impressions

    spreads = {}
    for weight in (0.0, 2.0):
        paths = write_impressions(tmp_path / str(weight), 20_000, 100, 100, seed=1,
                                  spec=ImpressionSpec(placement_weight=weight))
        table = pq.read_table(paths["train"], columns=["C9", "position"])
        ids, positions = table["C9"].to_numpy(), table["position"].to_numpy().astype(np.float64)
        counts = np.bincount(ids)
        means = np.bincount(ids, weights=positions) / np.maximum(counts, 1)
        spreads[weight] = float(means[counts >= 30].std())
    assert spreads[2.0] > 2 * spreads[0.0], spreads
    default = pq.read_table(write_impressions(tmp_path / "default", 20_000, 100, 100, seed=1)["train"])
    assert default.equals(pq.read_table(tmp_path / "0.0" / "train.parquet")), "weight 0 is the default log"


def test_device_column_sets_how_fast_clicks_fall_with_position(tmp_path):
    """With a device spread, the click factor of a position depends on C2's id (the YouTube
    ranker's position x device bias), every device keeping factor 1 at position 1."""
    from lightning_mtr.data.synthetic import ImpressionSpec

    paths = write_impressions(tmp_path, 20_000, 100, 100, seed=1, spec=ImpressionSpec(device_bias_spread=1.0))
    table = pq.read_table(paths["train"], columns=["C2", "position", "gt_ctr", "gt_ctr_no_position"])
    device, position = table["C2"].to_numpy(), table["position"].to_numpy()
    factor = table["gt_ctr"].to_numpy() / table["gt_ctr_no_position"].to_numpy()
    np.testing.assert_allclose(factor[position == 1], 1, atol=1e-5)
    bottom = [factor[(position == 10) & (device == d)] for d in np.unique(device[position == 10])]
    np.testing.assert_allclose([f.std() for f in bottom], 0, atol=1e-5)  # one factor per device and position
    assert max(f[0] for f in bottom) > 3 * min(f[0] for f in bottom)


def test_mmoe_writer_writes_the_in_memory_rows_for_every_shape_option(tmp_path):
    """``write_mmoe_regression`` and ``mmoe_regression_arrays`` give the same rows, the sines'
    alpha spread and the scale c included."""
    from lightning_mtr.data.synthetic.mmoe_regression import mmoe_regression_arrays

    options = dict(dim=4, seed=2, shape_seed=5, alpha_std=2.0, scale=3.0)
    written = pq.read_table(write_mmoe_regression(tmp_path / "m.parquet", 300, 0.5, **options))
    x, y = mmoe_regression_arrays(300, 0.5, **options)
    np.testing.assert_array_equal(np.stack([written.column(f"x{d}").to_numpy() for d in range(4)], axis=1), x)
    np.testing.assert_array_equal(np.stack([written.column("y1").to_numpy(), written.column("y2").to_numpy()], 1), y)
    assert not np.allclose(y, mmoe_regression_arrays(300, 0.5, dim=4, seed=2, shape_seed=5)[1])
