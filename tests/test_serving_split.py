"""The user/item split: for one user and many candidates, the user program once plus the item
program score as the monolithic program does on the user's features repeated per candidate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import ESM2_TASKS, ESMM_TASKS, random_inputs
from test_models import SMALL
from lightning_mtr.data.encode import DenseStats
from lightning_mtr.models import build_model
from lightning_mtr.schema import Schema
from lightning_mtr.serving.program import ServingModel
from lightning_mtr.serving.split import (
    SplitRefused, broadcast_user, export_split, side_inputs, side_layout, split_model,
)

# tiny_schema's features with sides: the candidate's item bag, its id in the history's table (a
# sequence of one) and two dense columns; the user's last item shares the candidate's table
SCHEMA = Schema.from_dict({
    "sparse": [
        {"name": "user", "num_embeddings": 50, "embedding_dim": 4},
        {"name": "item", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "multi_valued": True,
         "side": "item"},
        {"name": "item_last", "num_embeddings": 30, "embedding_dim": 4, "pooling": "mean", "table": "item"},
        {"name": "hist_item", "num_embeddings": 30, "embedding_dim": 4, "sequence": True, "max_length": 3},
        {"name": "hist_type", "num_embeddings": 3, "embedding_dim": 4, "sequence": True, "max_length": 3},
        {"name": "candidate", "table": "hist_item", "num_embeddings": 30, "embedding_dim": 4, "sequence": True,
         "side": "item"},
    ],
    "dense": [{"name": "d0", "transform": "log1p_standardize"},
              {"name": "d1", "transform": "standardize", "side": "item"}, {"name": "d2", "side": "item"}],
    "tasks": [{"name": t, "label": t} for t in ("ctr", "cvr", "ctcvr")],
})
STATS = DenseStats(mean=(0.3, -1.0, 0.0), std=(2.0, 0.5, 1.0))
SPLITS = {
    **{name: SMALL[name] for name in ("mmoe", "omoe", "shared_bottom", "youtube")},
    "mmoe_gate_bias": {**SMALL["mmoe"], "gate_bias": True},
    # the shallow tower reads a candidate feature beside the (missing) position
    "youtube_shallow": {**SMALL["youtube"], "shallow_features": ["item"]},
    "dupn": {**SMALL["dupn"], "heads": {"ctr": ["item", "candidate", "d2"]}, "ranking_features": {"cvr": ["d1", "d2"]}},
}
REGISTRY = {"mmoe_gate_bias": "mmoe", "youtube_shallow": "youtube"}


def _model(name: str):
    torch.manual_seed(0)
    model = build_model(REGISTRY.get(name, name), SCHEMA, **SPLITS[name]).eval()
    with torch.no_grad():  # large weights: scores that differ clearly between candidates
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.7)
    return model


def _request(candidates: int = 9):
    """One user's inputs (batch 1) and ``candidates`` candidates' inputs, as the programs take them."""
    def raw(batch, seed):
        dense, sparse = random_inputs(SCHEMA, batch, seed)
        return dense.double(), sparse.values(), sparse.lengths().view(len(SCHEMA.sparse), -1).long()
    return side_inputs(SCHEMA, "user", *raw(1, 1)), side_inputs(SCHEMA, "item", *raw(candidates, 2))


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split_scores_equal_the_monolithic_program(name, tmp_path):
    model = _model(name)
    monolithic = ServingModel(model, SCHEMA, STATS)
    user, item = split_model(model, SCHEMA, STATS)
    requests = [_request(9), _request(1)]  # the item program takes any number of candidates
    with torch.no_grad():
        expected = [monolithic(*broadcast_user(SCHEMA, *request)) for request in requests]
        eager = [item(user(*user_in), *item_in) for user_in, item_in in requests]
    # the heads read the candidate: a split that lost an item feature would fail by far more than 1e-5
    assert all(float(v.std()) > 1e-3 for k, v in expected[0].items() if (name, k) != ("dupn", "ctcvr"))
    for scores, reference in zip(eager, expected):
        assert _max_diff(scores, reference) <= 1e-5
    for program, path in zip(export_split(user, item), ("user.pt2", "item.pt2")):
        torch.export.save(program, tmp_path / path)
    user_program, item_program = (torch.export.load(tmp_path / p).module() for p in ("user.pt2", "item.pt2"))
    for (user_in, item_in), reference in zip(requests, expected):
        with torch.no_grad():
            assert _max_diff(item_program(user_program(*user_in), *item_in), reference) <= 1e-5


def test_the_programs_read_their_sides_in_schema_order():
    assert side_layout(SCHEMA, "user") == {"dense": ["d0"],
                                           "sparse": ["user", "item_last", "hist_item", "hist_type"]}
    assert side_layout(SCHEMA, "item") == {"dense": ["d1", "d2"], "sparse": ["item", "candidate"]}


@pytest.mark.parametrize("name, message", [
    ("nfwfm", "NFwFM: its field-weighted FM multiplies user and candidate embeddings pair by pair"),
    ("ple", "PLE: .* not written yet"),
    ("aitm", "AITM: .* not written yet"),
    ("esmm", "ESMM: .* not written yet"),
    ("esm2", "ESM2: .* not written yet"),
])
def test_a_model_that_does_not_split_says_why(name, message):
    tasks = {"esmm": ESMM_TASKS, "esm2": ESM2_TASKS}.get(name)
    schema = SCHEMA if tasks is None else dataclasses.replace(SCHEMA, tasks=Schema.from_dict(
        {"tasks": list(tasks)}).tasks)
    model = build_model(name, schema, **SMALL[name])
    with pytest.raises(SplitRefused, match=message):
        split_model(model, schema, STATS)


def test_an_item_side_of_dense_features_only_splits():
    """No sparse feature on the item side: its program takes an empty values tensor."""
    schema = Schema.from_dict({
        "sparse": [{"name": "user", "num_embeddings": 50, "embedding_dim": 4},
                   {"name": "context", "num_embeddings": 30, "embedding_dim": 4}],
        "dense": [{"name": "d0"}, {"name": "price", "side": "item", "transform": "log1p"}],
        "tasks": [{"name": "ctr", "label": "click"}]})
    torch.manual_seed(0)
    model = build_model("mmoe", schema, **SMALL["mmoe"]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    user, item = export_split(*split_model(model, schema, None))

    def raw(batch, seed):
        dense, sparse = random_inputs(schema, batch, seed)
        return dense.double().abs(), sparse.values(), sparse.lengths().view(2, -1).long()
    request = side_inputs(schema, "user", *raw(1, 1)), side_inputs(schema, "item", *raw(9, 2))
    assert request[1][1].numel() == 0 and request[1][2].shape == (0, 9)
    with torch.no_grad():
        expected = ServingModel(model, schema, None)(*broadcast_user(schema, *request))
        scores = item.module()(user.module()(*request[0]), *request[1])
    assert float(expected["ctr"].std()) > 1e-3 and _max_diff(scores, expected) <= 1e-5


def test_a_schema_without_item_features_is_refused():
    schema = Schema.from_dict({"sparse": [{"name": "user", "num_embeddings": 5, "embedding_dim": 4}],
                               "dense": [{"name": "d0"}], "tasks": [{"name": "ctr", "label": "click"}]})
    with pytest.raises(SplitRefused, match="tags no feature `side: item`"):
        split_model(build_model("mmoe", schema, **SMALL["mmoe"]), schema, None)


def test_a_user_side_combo_of_a_candidates_column_is_refused():
    """A combo of the user's and the candidate's columns (docs: user_id x category) differs per
    candidate; left on the default side, user.pt2 would compute it once per request. The export
    check feeds every row its own features, so the split scored equal and was written."""
    sparse = [{"name": "user", "num_embeddings": 5, "embedding_dim": 4},
              {"name": "category", "num_embeddings": 7, "embedding_dim": 4, "side": "item"},
              {"name": "user_x_category", "combo": ["user", "category"], "num_embeddings": 11, "embedding_dim": 4}]
    schema = Schema.from_dict({"sparse": sparse, "tasks": [{"name": "ctr", "label": "click"}]})
    with pytest.raises(SplitRefused, match=r"combo features \['user_x_category'\] read the candidate's column"
                                           r"s \['category'\] but are tagged side: user; tag them side: item"):
        split_model(build_model("mmoe", schema, **SMALL["mmoe"]), schema, None)
    tagged = Schema.from_dict({"sparse": [*sparse[:2], {**sparse[2], "side": "item"}],
                               "tasks": [{"name": "ctr", "label": "click"}]})
    split_model(build_model("mmoe", tagged, **SMALL["mmoe"]), tagged, None)


def test_a_model_that_reads_no_item_feature_is_refused():
    # the YouTube ranker's position feature is the only candidate feature: the main tower never reads it
    schema = Schema.from_dict({"sparse": [{"name": "user", "num_embeddings": 5, "embedding_dim": 4},
                                          {"name": "position", "num_embeddings": 5, "embedding_dim": 4,
                                           "side": "item"}],
                               "dense": [{"name": "d0"}], "tasks": [{"name": "ctr", "label": "click"}]})
    model = build_model("youtube", schema, **{**SMALL["youtube"], "position_features": ["position"]})
    with pytest.raises(SplitRefused, match=r"reads none of the schema's `side: item` features \['position'\]"):
        split_model(model, schema, None)


def test_export_writes_the_monolithic_program_only_and_says_why(capsys):
    from types import SimpleNamespace

    from lightning_mtr.serving.export import _split

    run = SimpleNamespace(model=build_model("nfwfm", SCHEMA, **SMALL["nfwfm"]), schema=SCHEMA, dense_stats=STATS)
    programs, entry = _split(run, "none", None, ())
    assert programs == {} and entry["refused"].startswith("NFwFM: its field-weighted FM multiplies")
    assert capsys.readouterr().out == f"no user/item split: {entry['refused']}; writing the monolithic program only\n"


def test_dupn_whose_heads_read_no_candidate_feature_is_refused():
    model = build_model("dupn", SCHEMA, **SMALL["dupn"])  # every head on rep alone
    with pytest.raises(SplitRefused, match=r"DUPN reads none of the schema's `side: item` features \['item', "):
        split_model(model, SCHEMA, STATS)
