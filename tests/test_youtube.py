"""The YouTube ranker (Zhao et al., RecSys 2019): the shallow tower feeds the engagement tasks
only, the main tower never sees position, and serving treats position (and only position) as
missing, so the device still sets a per-device bias."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_schema
from lightning_mtr.models.youtube import YouTubeRanker
from lightning_mtr.nn import MixtureBottom
from lightning_mtr.schema import Schema
from torchrec import KeyedJaggedTensor

SCHEMA = Schema.from_dict({
    "sparse": [{"name": "position", "num_embeddings": 11, "embedding_dim": 4},
               {"name": "device", "num_embeddings": 4, "embedding_dim": 3},
               {"name": "item", "num_embeddings": 30, "embedding_dim": 4}],
    "dense": [{"name": "d0"}, {"name": "d1"}],
    "tasks": [{"name": "click", "label": "click"}, {"name": "like", "label": "like"}],
})
NAMES = ["position", "device", "item"]
ROWS = 8


def _ranker(**kwargs) -> YouTubeRanker:
    torch.manual_seed(0)
    options = dict(engagement=["click"], position_features=["position"], shared=[8], num_experts=2, expert=[8],
                   tower=[4], shallow_tower=[4], position_dropout=0.0, gate_dropout=0.0)
    return YouTubeRanker(SCHEMA, **(options | kwargs))


def _inputs(position: int | torch.Tensor = 1, device: int | torch.Tensor = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """The same ROWS items and dense values, shown at ``position`` on ``device`` (a value or one per row)."""
    generator = torch.Generator().manual_seed(0)
    columns = {"position": position, "device": device, "item": torch.randint(0, 30, (ROWS,), generator=generator)}
    ids = [torch.as_tensor(columns[name]).expand(ROWS) for name in NAMES]
    lengths = torch.ones(len(NAMES) * ROWS, dtype=torch.long)
    sparse = KeyedJaggedTensor(keys=NAMES, values=torch.cat(ids), lengths=lengths)
    return torch.randn(ROWS, 2, generator=generator), sparse


def _shallow_input(model: YouTubeRanker, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
    """What the shallow tower read in one forward."""
    seen = []
    handle = model.shallow.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model(dense, sparse)
    handle.remove()
    return seen[0]


def test_shallow_tower_feeds_engagement_tasks_only():
    model = _ranker(shallow_features=["device"])
    dense, sparse = _inputs(torch.arange(1, ROWS + 1), torch.arange(ROWS) % 4)
    before = model(dense, sparse)
    with torch.no_grad():
        model.shallow[-1].bias += 1.0
    after = model(dense, sparse)
    torch.testing.assert_close(after["click"], before["click"] + 1.0)
    torch.testing.assert_close(after["like"], before["like"])


def test_position_moves_only_the_bias_in_training_and_nothing_at_serving():
    model = _ranker(shallow_features=["device"])
    devices = torch.arange(ROWS) % 4
    top, bottom = _inputs(1, devices), _inputs(9, devices)
    trained = model(*top), model(*bottom)
    assert not torch.allclose(trained[0]["click"], trained[1]["click"]), "in training the tower reads position"
    torch.testing.assert_close(trained[0]["like"], trained[1]["like"])  # the main tower never sees it
    model.eval()
    served = model(*top), model(*bottom)
    for task in ("click", "like"):
        torch.testing.assert_close(served[0][task], served[1][task])


def test_at_serving_the_bias_is_one_constant_per_device():
    """The paper's serving: position missing, device known, so the shallow tower adds a constant
    per device (the same at every position and for every item), not one global constant."""
    model = _ranker(shallow_features=["device"], shallow_in_main=False).eval()  # the device moves the bias only
    click = {}
    for device in range(4):
        with torch.no_grad():
            served = [model(*_inputs(position, device)) for position in (1, 5, 10)]
        for other in served[1:]:
            torch.testing.assert_close(other["click"], served[0]["click"])
        click[device] = served[0]["click"]
    shifts = [click[device] - click[0] for device in range(1, 4)]  # bias(device) - bias(0), row by row
    for shift in shifts:
        torch.testing.assert_close(shift, shift[:1].expand(ROWS))  # one constant for every item
    assert min(abs(float(shift[0])) for shift in shifts) > 1e-4, "each device moves the bias"
    assert len({round(float(shift[0]), 5) for shift in shifts}) == 3, "each device has its own bias"


def test_only_the_position_is_replaced_by_missing():
    model = _ranker(shallow_features=["device"], position_dropout=0.5)
    with torch.no_grad():
        model.missing_position.fill_(7.0)
    dense, sparse = _inputs(torch.arange(1, ROWS + 1).repeat(8)[:ROWS], torch.arange(ROWS) % 4)
    pooled = model.features.embeddings(sparse).to_dict()
    torch.manual_seed(3)
    trained = _shallow_input(model, dense, sparse)
    dropped = trained[:, :4].eq(7.0).all(dim=1)
    assert dropped.any() and not dropped.all(), "the draw dropped some rows' position and kept others'"
    torch.testing.assert_close(trained[~dropped, :4], pooled["position"][~dropped].detach())
    torch.testing.assert_close(trained[:, 4:], pooled["device"].detach())  # the device is never dropped
    served = _shallow_input(model.eval(), dense, sparse)
    torch.testing.assert_close(served, torch.cat([torch.full((ROWS, 4), 7.0), pooled["device"].detach()], dim=1))


def test_a_device_feature_can_feed_both_towers_or_the_shallow_one_only():
    devices = torch.arange(ROWS) % 4
    for in_main in (True, False):
        model = _ranker(shallow_features=["device"], shallow_in_main=in_main).eval()
        first, second = model(*_inputs(3, devices)), model(*_inputs(3, (devices + 1) % 4))
        assert not torch.allclose(first["click"], second["click"]), "the device moves the click bias"
        moved = not torch.allclose(first["like"], second["like"])
        assert moved == in_main, "a satisfaction task sees the device only through the main tower"
        assert model.shared[0].in_features == 2 + 4 + (3 if in_main else 0)  # dense, item, device


def test_without_the_shallow_tower_position_is_not_used_at_all():
    model = _ranker(shallow_tower=None)
    first, second = model(*_inputs(1)), model(*_inputs(9))
    for task in ("click", "like"):
        torch.testing.assert_close(first[task], second[task])


def test_position_dropout_replaces_that_share_of_rows_with_missing():
    model = _ranker(position_dropout=0.3, shallow_features=["device"])
    position, device = torch.randn(20_000, 4), torch.randn(20_000, 3)
    with torch.no_grad():
        model.missing_position.fill_(7.0)
        dropped = model.position_bias(position, device)
        model.eval()
        served = model.position_bias(position, device)
        expected = model.shallow(torch.cat([torch.full_like(position, 7.0), device], dim=1))[:, 0]
    torch.testing.assert_close(served, expected)
    share = float((dropped - served).abs().lt(1e-6).float().mean())
    assert share == pytest.approx(0.3, abs=0.02)


def test_gate_dropout_leaves_experts_out_in_training_only():
    torch.manual_seed(0)
    bottom = MixtureBottom(5, 2, num_experts=4, expert=[3], gate_dropout=0.5)
    inputs = torch.randn(64, 5)
    torch.manual_seed(1)
    mixed = torch.stack(bottom(inputs), dim=1)
    torch.manual_seed(1)
    drawn = torch.rand(64, 2, 4) < 0.5  # the mask the forward drew, one per row, gate and expert
    everything = drawn.all(dim=-1, keepdim=True)
    assert everything.any(), "some row's gate drew every expert: the case the guard handles"
    dropped = drawn & ~everything  # ... which then keeps them all
    weights = torch.softmax(bottom._gate_logits(inputs).masked_fill(dropped, float("-inf")), dim=-1)
    torch.testing.assert_close(mixed, torch.einsum("bge,bed->bgd", weights, bottom.experts(inputs)))
    assert weights[dropped].eq(0).all() and weights[~dropped].gt(0).all()
    assert not torch.allclose(bottom(inputs)[0], bottom(inputs)[0]), "training draws a new mask each time"
    bottom.eval()
    torch.testing.assert_close(bottom(inputs), bottom(inputs))
    with pytest.raises(ValueError, match="gate_dropout"):
        MixtureBottom(5, 2, gate_dropout=1.0)


def test_a_multiclass_engagement_task_is_refused():
    schema = tiny_schema(tasks=("click", {"name": "level", "label": "level", "kind": "multiclass", "num_classes": 3}))
    with pytest.raises(ValueError, match=r"engagement tasks \['level'\] have one logit per class"):
        YouTubeRanker(schema, engagement=["level"], position_features=["user"])


def test_bad_task_or_feature_names_are_refused():
    with pytest.raises(ValueError, match="engagement tasks"):
        _ranker(engagement=["watch_time"])
    with pytest.raises(ValueError, match=r"position_features \['slot'\] are not pooled sparse features.*'device'"):
        _ranker(position_features=["slot"])
    with pytest.raises(ValueError, match=r"shallow_features \['os'\] are not pooled sparse features"):
        _ranker(shallow_features=["os"])
    with pytest.raises(ValueError, match=r"needs position_features.*shallow_features"):
        _ranker(position_features=[], shallow_features=["device"])
    with pytest.raises(ValueError, match=r"\['device'\] are in both position_features .* and shallow_features"):
        _ranker(position_features=["position", "device"], shallow_features=["device"])
    with pytest.raises(ValueError, match="main tower would read no feature"):
        YouTubeRanker(Schema.from_dict({**_no_dense(), "dense": []}), engagement=["click"],
                      shallow_features=["device"], shallow_in_main=False)


def _no_dense() -> dict:
    return {"sparse": [{"name": "position", "num_embeddings": 11}, {"name": "device", "num_embeddings": 4}],
            "tasks": [{"name": "click", "label": "click"}]}


def test_builds_on_meta_and_materialises():
    from lightning_mtr.nn.meta import materialize

    with torch.device("meta"):
        model = _ranker(shallow_features=["device"])
    materialize(model, "cpu")
    assert torch.equal(model.missing_position, torch.zeros_like(model.missing_position))


def test_shallow_tower_ranks_the_position_free_truth_best(tmp_path):
    """The paper's claim, on the synthetic log where position is also set by an ad slot and its
    bias differs per device (``lightning_mtr/benchmarks/position_bias.py``): the main tower alone ranks the
    position-free click probability better than a model without position (which credits the slot
    and the device with the position's effect) and than MMoE with position as a feature scored at
    position 1 (whose scores still move with the device). On these 50k rows the main tower's lead
    over the better baseline is +0.016, +0.112, +0.012 on seeds 0-2 (+0.011 to +0.126 over seeds 0-7,
    mean +0.059; before tables were drawn by ``embeddings.init``: +0.008 to +0.121, mean +0.063),
    so one seed's lead is mostly its draw: the claim is checked on three."""
    from lightning_mtr.benchmarks.position_bias import compare

    results = [compare(rows=50_000, seed=seed, batch_size=256, cache=str(tmp_path)) for seed in range(3)]
    leads = [r["shallow_tower"] - max(r["no_position"], r["position_feature"]) for r in results]
    assert min(leads) > 0 and sum(leads) / len(leads) > 0.02, results
