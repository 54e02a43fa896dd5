"""The synthetic impression log: a Criteo-like layout for the ESMM/ESM2 setting.

Impression -> click (with position bias) -> post-click action -> conversion only after a
click, with the true probabilities stored next to the labels (``gt_*`` columns), so every
model can be compared with the Bayes-optimal predictor. Written by :func:`write_impressions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_mtr.data.synthetic.common import sigmoid, solve_intercept, stream, write_chunks

GENERATOR_VERSION = 3  # bump whenever the same arguments would write different data
NUM_SPARSE = 26
NUM_DENSE = 13
SPARSE_COLUMNS = tuple(f"C{j}" for j in range(1, NUM_SPARSE + 1))
DENSE_COLUMNS = tuple(f"I{k}" for k in range(1, NUM_DENSE + 1))
NUM_POSITIONS = 10
SPLITS = ("train", "val", "test")
# C1 has ~10 ids and C26 1,000,000, log-uniformly spaced in between, as in Criteo.
VOCAB_SIZES = tuple(int(round(10 ** (1 + 5 * j / (NUM_SPARSE - 1)))) for j in range(NUM_SPARSE))


@dataclass(frozen=True)
class ImpressionSpec:
    """Every knob of the impression world, in one place.

    Structure (``r`` is the position-free click logit, ``d`` the post-click action
    logit, ``q`` the conversion logit); the funnel is ESM2's (Wen et al., SIGIR 2020)
    impression -> click -> DAction (add-to-cart, wishlist) or OAction (anything else)
    -> buy:

    * ids of each ``C`` column follow a Zipf law (``zipf_exponent``) over popularity
      ranks; a seeded permutation maps rank to id, so id 0 is not always the head.
    * ``r = b_click + sum_j e_j[id_j] + interaction + sum_k a_k * z(log1p(I_k))``: per-id
      effects from ``click_id_effects`` (effect std per column; the small and
      mid-vocabulary columns carry most of it, the long-tail columns little),
      ``interaction_scale`` times the product of the standardised effects of the two
      ``click_interaction`` columns, and a linear effect of a few standardised dense
      features.
    * An id's effect is shrunk by ``sqrt(n / (n + learnable_count))`` where ``n`` is its
      expected count in ``learnable_rows`` rows: rarely seen ids carry almost no signal,
      so a model trained on that many rows can get close to the Bayes AUC.
    * Items with a higher ``r`` are shown higher (smaller position), with noise
      (``position_noise_std``, in units of ``r``'s std): position is confounded with
      relevance. ``P(click) = sigmoid(r) * position ** -position_bias_exponent``.
    * Optionally (``device_bias_spread`` > 0) the exponent depends on the id of
      ``device_column``, as the YouTube ranker's paper observes per device (a phone shows
      one item per screen, a desktop a grid): id ``k``'s exponent is
      ``position_bias_exponent * exp(device_bias_spread * g_k)``, ``g_k ~ N(0, 1)``. Every
      device keeps factor 1 at position 1, so ``gt_ctr_no_position`` still means the click
      probability at the top; C2 (16 ids) has no click effect of its own.
    * ``q`` reuses some click effects (``conversion_shared``: column, weight) and adds
      small ones of its own (``conversion_id_effects``, ``conversion_dense_effects``), so
      clicked rows are a biased sample of impressions (the ESMM sample-selection bias).
      The shared columns are mid-vocabulary (C12: 1.6k ids, C15: 6.3k): most of their ids
      are seen often in impressions but rarely in clicks, so a CVR model trained on clicks
      alone (the ESMM paper's BASE) learns them poorly, while embeddings trained by the CTR
      task on all impressions (ESMM) carry them over: the data sparsity ESMM addresses.
    * ``d = b_daction + ...`` reuses some of the conversion's own effects
      (``daction_shared``: a column of ``conversion_id_effects``, weight) and adds its own
      (``daction_id_effects``, ``daction_dense_effects``). ``gt_dar = sigmoid(d)`` is
      P(DAction | click, features); every row draws ``gt_daction_if_clicked`` from it and
      ``daction = click * gt_daction_if_clicked``.
    * A DAction makes buying more likely: ``gt_cvr_given_daction = sigmoid(q + daction_lift)``,
      ``gt_cvr_given_oaction = sigmoid(q)``; ``gt_conv_if_clicked`` is drawn from the one
      matching the row's ``gt_daction_if_clicked`` and ``conversion = click * gt_conv_if_clicked``.
      ``gt_cvr = gt_dar * gt_cvr_given_daction + (1 - gt_dar) * gt_cvr_given_oaction`` is
      P(conversion | click, features), the marginal over the action, and
      ``gt_ctcvr = gt_ctr * gt_cvr``.
    * ``b_click``, ``b_daction`` and ``b_conversion`` are solved per world, in that order,
      so that the mean CTR is ``target_ctr``, the mean DAction rate among clicks is
      ``target_daction_given_click`` and the mean CVR among clicks is ``target_cvr_given_click``.
    """

    vocab_sizes: tuple[int, ...] = VOCAB_SIZES
    zipf_exponent: float = 1.15
    dense_log_means: tuple[float, ...] = tuple(0.5 * k for k in range(NUM_DENSE))
    dense_log_stds: tuple[float, ...] = tuple(0.5 + 0.1 * k for k in range(NUM_DENSE))
    # (effect tables are drawn in this order: reordering changes the world)
    click_id_effects: tuple[tuple[str, float], ...] = (
        ("C1", 0.6), ("C3", 0.6), ("C4", 0.5), ("C6", 0.5), ("C8", 0.4),
        ("C10", 0.35), ("C20", 0.15), ("C25", 0.1), ("C12", 0.8), ("C15", 0.8),
    )
    click_interaction: tuple[str, str] = ("C3", "C6")
    interaction_scale: float = 0.4
    click_dense_effects: tuple[tuple[str, float], ...] = (("I1", 0.3), ("I3", -0.25), ("I5", 0.2))
    conversion_shared: tuple[tuple[str, float], ...] = (("C12", 1.5), ("C15", 1.5))
    conversion_id_effects: tuple[tuple[str, float], ...] = (("C2", 0.1), ("C5", 0.1))
    conversion_dense_effects: tuple[tuple[str, float], ...] = (("I7", 0.1),)
    daction_shared: tuple[tuple[str, float], ...] = (("C2", 3.0), ("C5", 2.25))
    daction_id_effects: tuple[tuple[str, float], ...] = (("C7", 0.5), ("C11", 0.4), ("C17", 0.2))
    daction_dense_effects: tuple[tuple[str, float], ...] = (("I2", 0.3), ("I9", -0.2))
    daction_lift: float = 1.75
    position_noise_std: float = 1.0
    position_bias_exponent: float = 0.5
    # Off by default: a column whose ids also set the display position (an ad slot, a page
    # layout) without any effect on relevance, with this weight in the position score. A
    # model without position then credits that column with the position's effect.
    placement_column: str = "C9"
    placement_weight: float = 0.0
    # Off by default: the per-device position bias (class docstring).
    device_column: str = "C2"
    device_bias_spread: float = 0.0
    target_ctr: float = 0.15
    target_cvr_given_click: float = 0.2
    target_daction_given_click: float = 0.3
    learnable_rows: int = 200_000
    learnable_count: float = 30.0
    calibration_rows: int = 1 << 17


SPEC = ImpressionSpec()


def _column(name: str) -> int:
    return int(name[1:]) - 1


@dataclass
class _World:
    """Per-id effect tables and calibration constants, derived only from the seed."""

    spec: ImpressionSpec
    rank_to_id: list[np.ndarray]
    click_effects: dict[int, np.ndarray]  # column -> effect per popularity rank
    conversion_effects: dict[int, np.ndarray]
    daction_effects: dict[int, np.ndarray]
    dense_center: np.ndarray  # mean and std of log1p(I_k), for standardising
    dense_scale: np.ndarray
    position_bias: np.ndarray  # indexed by position, entry 0 unused
    placement: np.ndarray | None = None  # per rank of the placement column: its pull on position
    device_bias: np.ndarray | None = None  # replaces position_bias: [rank of the device column, position]
    click_center: float = 0.0  # mean and std of r without intercept
    click_scale: float = 1.0
    click_intercept: float = 0.0
    daction_intercept: float = 0.0
    conversion_intercept: float = 0.0


def _zipf_ranks(rng: np.random.Generator, vocab: int, exponent: float, n: int) -> np.ndarray:
    """Popularity ranks in [0, vocab): the floor of a power law on [1, vocab + 1).

    Inverse-CDF sampling, ~10x faster than searchsorted over a 1M-entry CDF.
    """
    span = (vocab + 1.0) ** (1.0 - exponent) - 1.0
    x = np.power(1.0 + rng.random(n) * span, 1.0 / (1.0 - exponent))
    return np.minimum(x.astype(np.int64) - 1, vocab - 1)


def _zipf_pmf(vocab: int, exponent: float) -> np.ndarray:
    """The probability of each rank under :func:`_zipf_ranks`."""
    edges = np.arange(1, vocab + 2, dtype=np.float64) ** (1.0 - exponent)
    return (edges[:-1] - edges[1:]) / (edges[0] - edges[-1])


def _effect_table(rng: np.random.Generator, spec: ImpressionSpec, column: int, std: float) -> np.ndarray:
    """Gaussian per-rank effects, shrunk towards 0 for ids too rare to be learned."""
    vocab = spec.vocab_sizes[column]
    expected_count = _zipf_pmf(vocab, spec.zipf_exponent) * spec.learnable_rows
    shrink = np.sqrt(expected_count / (expected_count + spec.learnable_count))
    return (std * rng.standard_normal(vocab) * shrink).astype(np.float32)


def _log1p_lognormal_moments(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of log1p(exp(mu + sigma z)), z ~ N(0, 1), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    values = np.logaddexp(0.0, mu[:, None] + sigma[:, None] * nodes[None, :])
    mean = values @ weights
    return mean, np.sqrt(((values - mean[:, None]) ** 2) @ weights)


def _build_world(seed: int, spec: ImpressionSpec = SPEC) -> _World:
    """The effect tables and intercepts every split of one seed shares."""
    rng = stream(seed, "world")
    rank_to_id = [rng.permutation(v) for v in spec.vocab_sizes]
    click = {_column(c): _effect_table(rng, spec, _column(c), s) for c, s in spec.click_id_effects}
    conversion = {_column(c): _effect_table(rng, spec, _column(c), s) for c, s in spec.conversion_id_effects}
    # Its own stream, so the click and conversion tables (and the calibration sample) stay as they were.
    daction_rng = stream(seed, "world", "daction")
    daction = {_column(c): _effect_table(daction_rng, spec, _column(c), s) for c, s in spec.daction_id_effects}
    center, scale = _log1p_lognormal_moments(np.array(spec.dense_log_means), np.array(spec.dense_log_stds))
    bias = np.ones(NUM_POSITIONS + 1)
    bias[1:] = np.arange(1, NUM_POSITIONS + 1) ** -spec.position_bias_exponent
    world = _World(spec, rank_to_id, click, conversion, daction, center.astype(np.float32),
                   scale.astype(np.float32), bias.astype(np.float32))
    if spec.placement_weight:  # its own stream: the default world does not change
        column = _column(spec.placement_column)
        world.placement = stream(seed, "world", "placement").standard_normal(spec.vocab_sizes[column]).astype(
            np.float32)
    if spec.device_bias_spread:  # its own stream too
        vocab = spec.vocab_sizes[_column(spec.device_column)]
        exponent = spec.position_bias_exponent * np.exp(
            spec.device_bias_spread * stream(seed, "world", "device").standard_normal(vocab))
        world.device_bias = np.ones((vocab, NUM_POSITIONS + 1), np.float32)
        world.device_bias[:, 1:] = np.arange(1, NUM_POSITIONS + 1) ** -exponent[:, None]
    _calibrate(world, rng)
    return world


def _position_factor(world: _World, position: np.ndarray, ranks: list[np.ndarray]) -> np.ndarray:
    """P(click) / P(click at position 1) of each row, float32 (n,)."""
    if world.device_bias is None:
        return world.position_bias[position]
    return world.device_bias[ranks[_column(world.spec.device_column)], position]


def _calibrate(world: _World, rng: np.random.Generator) -> None:
    """Standardise r for the position draw, then solve the three intercepts on a sample."""
    spec = world.spec
    ranks, dense = _draw_features(world, rng, spec.calibration_rows)
    logit = _click_logit(world, ranks, dense).astype(np.float64)
    world.click_center, world.click_scale = float(logit.mean()), float(logit.std())
    bias = _position_factor(world, _draw_positions(world, rng, logit, ranks), ranks).astype(np.float64)
    world.click_intercept = solve_intercept(lambda b: np.mean(sigmoid(logit + b) * bias), spec.target_ctr)
    ctr = sigmoid(logit + world.click_intercept) * bias
    daction_logit = _daction_logit(world, ranks, dense).astype(np.float64)
    world.daction_intercept = solve_intercept(
        lambda b: np.sum(ctr * sigmoid(daction_logit + b)) / np.sum(ctr), spec.target_daction_given_click
    )
    dar = sigmoid(daction_logit + world.daction_intercept)
    conversion_logit = _conversion_logit(world, ranks, dense).astype(np.float64)

    def cvr_given_click(b: float) -> float:
        cvr = dar * sigmoid(conversion_logit + b + spec.daction_lift) + (1 - dar) * sigmoid(conversion_logit + b)
        return np.sum(ctr * cvr) / np.sum(ctr)

    world.conversion_intercept = solve_intercept(cvr_given_click, spec.target_cvr_given_click)


def _draw_features(world: _World, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Popularity ranks per sparse column, and the logs of the dense features (13, n)."""
    spec = world.spec
    ranks = [_zipf_ranks(rng, v, spec.zipf_exponent, n) for v in spec.vocab_sizes]
    means = np.asarray(spec.dense_log_means, np.float32)[:, None]
    stds = np.asarray(spec.dense_log_stds, np.float32)[:, None]
    return ranks, means + stds * rng.standard_normal((NUM_DENSE, n), dtype=np.float32)


def _dense_feature(world: _World, log_values: np.ndarray, name: str) -> np.ndarray:
    k = _column(name)
    return (np.logaddexp(np.float32(0), log_values[k]) - world.dense_center[k]) / world.dense_scale[k]


def _click_logit(world: _World, ranks: list[np.ndarray], log_values: np.ndarray) -> np.ndarray:
    """Position-free click logit without its intercept, float32 (n,)."""
    spec = world.spec
    logit = np.zeros(log_values.shape[1], np.float32)
    for column, table in world.click_effects.items():
        logit += table[ranks[column]]
    a, b = (_column(c) for c in spec.click_interaction)
    std = dict((_column(c), s) for c, s in spec.click_id_effects)
    scale = np.float32(spec.interaction_scale / (std[a] * std[b]))
    logit += scale * world.click_effects[a][ranks[a]] * world.click_effects[b][ranks[b]]
    for name, weight in spec.click_dense_effects:
        logit += np.float32(weight) * _dense_feature(world, log_values, name)
    return logit


def _stage_logit(world: _World, ranks: list[np.ndarray], log_values: np.ndarray,
                 shared: tuple[tuple[str, float], ...], shared_effects: dict[int, np.ndarray],
                 own_effects: dict[int, np.ndarray], dense_effects: tuple[tuple[str, float], ...]) -> np.ndarray:
    """A post-click stage's logit without its intercept, float32 (n,): ``weight`` times the
    earlier stage's effects of the ``shared`` columns, plus its own id and dense effects."""
    logit = np.zeros(log_values.shape[1], np.float32)
    for name, weight in shared:
        logit += np.float32(weight) * shared_effects[_column(name)][ranks[_column(name)]]
    for column, table in own_effects.items():
        logit += table[ranks[column]]
    for name, weight in dense_effects:
        logit += np.float32(weight) * _dense_feature(world, log_values, name)
    return logit


def _conversion_logit(world: _World, ranks: list[np.ndarray], log_values: np.ndarray) -> np.ndarray:
    spec = world.spec
    return _stage_logit(world, ranks, log_values, spec.conversion_shared, world.click_effects,
                        world.conversion_effects, spec.conversion_dense_effects)


def _daction_logit(world: _World, ranks: list[np.ndarray], log_values: np.ndarray) -> np.ndarray:
    spec = world.spec
    return _stage_logit(world, ranks, log_values, spec.daction_shared, world.conversion_effects,
                        world.daction_effects, spec.daction_dense_effects)


def _draw_positions(world: _World, rng: np.random.Generator, click_logit: np.ndarray,
                    ranks: list[np.ndarray]) -> np.ndarray:
    """Positions 1..10, roughly uniform, smaller for higher relevance (plus noise, plus the
    placement column's pull when the spec sets one)."""
    spec = world.spec
    noise_std = spec.position_noise_std
    score = (click_logit - world.click_center) / world.click_scale
    score = score + noise_std * rng.standard_normal(len(score), dtype=np.float32)
    if world.placement is not None:
        score = score + spec.placement_weight * world.placement[ranks[_column(spec.placement_column)]]
    score = score / np.sqrt(1 + noise_std**2 + spec.placement_weight**2)
    quantile = sigmoid(-1.702 * score)  # ~ Phi(-score): a logistic approximation of the normal CDF
    return np.minimum(1 + (NUM_POSITIONS * quantile).astype(np.int64), NUM_POSITIONS)


def _impression_chunk(world: _World, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ranks, log_values = _draw_features(world, rng, n)
    click_logit = _click_logit(world, ranks, log_values)
    position = _draw_positions(world, rng, click_logit, ranks)
    ctr_no_position = sigmoid(click_logit + np.float32(world.click_intercept))
    ctr = ctr_no_position * _position_factor(world, position, ranks)
    dar = sigmoid(_daction_logit(world, ranks, log_values) + np.float32(world.daction_intercept))
    conversion_logit = _conversion_logit(world, ranks, log_values) + np.float32(world.conversion_intercept)
    cvr_given_daction = sigmoid(conversion_logit + np.float32(world.spec.daction_lift))
    cvr_given_oaction = sigmoid(conversion_logit)
    cvr = dar * cvr_given_daction + (1 - dar) * cvr_given_oaction
    click = (rng.random(n, dtype=np.float32) < ctr).astype(np.int64)
    conversion_draw = rng.random(n, dtype=np.float32)
    # Drawn after the click and conversion uniforms, so those (and click) are as without the DAction.
    daction_if_clicked = (rng.random(n, dtype=np.float32) < dar).astype(np.int64)
    conv_if_clicked = (conversion_draw < np.where(daction_if_clicked == 1, cvr_given_daction, cvr_given_oaction))
    conv_if_clicked = conv_if_clicked.astype(np.int64)
    columns = {name: world.rank_to_id[j][ranks[j]] for j, name in enumerate(SPARSE_COLUMNS)}
    columns.update({name: np.exp(log_values[k]) for k, name in enumerate(DENSE_COLUMNS)})
    columns.update(
        position=position, click=click, daction=click * daction_if_clicked, conversion=click * conv_if_clicked,
        gt_ctr=ctr, gt_ctr_no_position=ctr_no_position, gt_dar=dar, gt_cvr=cvr, gt_ctcvr=ctr * cvr,
        gt_cvr_given_daction=cvr_given_daction, gt_cvr_given_oaction=cvr_given_oaction,
        gt_daction_if_clicked=daction_if_clicked, gt_conv_if_clicked=conv_if_clicked,
    )
    return columns


def write_impressions(
    out_dir: str | Path,
    train_rows: int,
    val_rows: int,
    test_rows: int,
    seed: int = 0,
    row_group_rows: int = 65536,
    spec: ImpressionSpec = SPEC,
) -> dict[str, Path]:
    """Write train/val/test impression logs drawn from one seeded world (see :class:`ImpressionSpec`).

    Every split shares the world (the effect tables) and draws rows from its own
    stream keyed by (seed, split), so the same arguments give bit-identical files.
    Columns: ``C1..C26`` int64 ids, ``I1..I13`` float32, ``position`` int64 in 1..10,
    ``click``/``daction``/``conversion``/``gt_daction_if_clicked``/``gt_conv_if_clicked``
    int64 0/1 and float32 ``gt_ctr``, ``gt_ctr_no_position``, ``gt_dar``, ``gt_cvr``,
    ``gt_ctcvr``, ``gt_cvr_given_daction``, ``gt_cvr_given_oaction``.
    """
    world = _build_world(seed, spec)
    low_cardinality = [c for c, v in zip(SPARSE_COLUMNS, world.spec.vocab_sizes) if v <= 10_000]
    low_cardinality += ["position", "click", "daction", "conversion", "gt_daction_if_clicked", "gt_conv_if_clicked"]
    sizes = {"train": train_rows, "val": val_rows, "test": test_rows}
    paths = {}
    for split, rows in sizes.items():
        def chunk(index: int, n: int, split: str = split) -> dict[str, np.ndarray]:
            return _impression_chunk(world, stream(seed, split, index), n)

        path = Path(out_dir) / f"{split}.parquet"
        paths[split] = write_chunks(path, rows, row_group_rows, chunk, low_cardinality)
    return paths
