"""FwFM block against its formula, and the multi-task neural FwFM built on it."""

from __future__ import annotations

import pytest
import torch

from helpers import random_inputs, tiny_schema
from lightning_mtr.models.nfwfm import NFwFM
from lightning_mtr.nn.fwfm import FieldVectors, FwFM
from lightning_mtr.nn.meta import materialize
from lightning_mtr.schema import Schema

SMALL = {"hidden": [8, 6], "tower": [5]}


def _block(num_fields: int, dim: int, seed: int = 0, linear: bool = False) -> FwFM:
    torch.manual_seed(seed)
    block = FwFM(num_fields, dim, linear=linear).double()
    with torch.no_grad():
        block.pair_weights.normal_()
    return block


def test_pairwise_term_equals_the_double_loop():
    block = _block(num_fields=5, dim=3)
    fields = torch.randn(4, 5, 3, dtype=torch.float64)
    r = block.field_pair_weights()
    expected = sum(r[i, j] * (fields[:, i] * fields[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(block(fields), expected)
    assert block.pairwise(fields).shape == (4, 10)


def test_linear_terms_are_a_bias_and_one_vector_per_field():
    block = _block(num_fields=4, dim=3, linear=True)
    fields = torch.randn(6, 4, 3, dtype=torch.float64)
    w = block.linear.weight.view(4, 3)
    expected = block.pairwise(fields).sum(1) + block.linear.bias + (fields * w).sum((1, 2))
    torch.testing.assert_close(block(fields), expected)


def test_pair_weights_are_symmetric_and_permute_with_the_fields():
    block = _block(num_fields=6, dim=4, seed=1)
    r = block.field_pair_weights()
    torch.testing.assert_close(r, r.T)
    assert torch.equal(r.diagonal(), torch.zeros(6, dtype=r.dtype)), "a field is never paired with itself"
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = _block(num_fields=6, dim=4)
    rows, cols = torch.triu_indices(6, 6, offset=1)
    with torch.no_grad():
        permuted.pair_weights.copy_(r[perm][:, perm][rows, cols])
    fields = torch.randn(3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(permuted(fields[:, perm]), block(fields))
    torch.testing.assert_close(permuted.field_pair_weights(), r[perm][:, perm])


def test_unit_pair_weights_give_the_fm_pairwise_term():
    block = FwFM(num_fields=7, dim=5, linear=False).double()  # r starts at 1
    fields = torch.randn(8, 7, 5, dtype=torch.float64)
    fm = 0.5 * (fields.sum(1).square() - fields.square().sum(1)).sum(-1)
    torch.testing.assert_close(block(fields), fm)


def test_features_sharing_a_table_are_distinct_fields():
    schema = tiny_schema()  # user; item and item_last share the table "item"
    torch.manual_seed(0)
    model = NFwFM(schema, **SMALL, linear=False)
    dense, sparse = random_inputs(schema, 9)
    fields = model.fields(model.features.pooled(model.features(dense, sparse)))
    pooled = model.features.embeddings(sparse).to_dict()
    assert model.fwfm.pair_weights.numel() == 3  # (user, item), (user, item_last), (item, item_last)
    for f, name in enumerate(["user", "item", "item_last"]):
        torch.testing.assert_close(fields[:, f], pooled[name])
    same_table = (pooled["item"] * pooled["item_last"]).sum(-1)
    assert same_table.abs().sum() > 0
    torch.testing.assert_close(model.fwfm.pairwise(fields)[:, 2], model.fwfm.pair_weights[2] * same_table)


@pytest.mark.parametrize("batch", [1, 7])
def test_one_logit_per_task_and_row(batch):
    schema = tiny_schema(tasks=("ctr", "cvr", "ctcvr"))
    logits = NFwFM(schema, **SMALL)(*random_inputs(schema, batch))
    assert sorted(logits) == ["ctcvr", "ctr", "cvr"]
    for value in logits.values():
        assert value.shape == (batch,) and torch.isfinite(value).all()


@pytest.mark.parametrize("options", [{}, {"field_dim": 3}, {"tower": []}],
                         ids=["common_dim", "projected", "linear_heads"])
def test_gradient_reaches_every_parameter(options):
    torch.manual_seed(0)
    schema = tiny_schema()
    model = NFwFM(schema, **{**SMALL, **options})
    dense, sparse = random_inputs(schema, 256)
    sum(logit.square().sum() for logit in model(dense, sparse).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_builds_on_meta_and_materialises():
    schema = tiny_schema()
    with torch.device("meta"):
        model = NFwFM(schema, **SMALL, field_dim=3)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    materialize(model, "cpu")
    outside_tables = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if not n.startswith("features.embeddings.")}
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in outside_tables.values())
    rows, cols = torch.triu_indices(3, 3, offset=1)
    assert torch.equal(model.fwfm.pair_index, rows * 3 + cols)
    assert torch.equal(model.fwfm.pair_weights, torch.ones(3))
    model.features.embeddings = NFwFM(schema, **SMALL).features.embeddings  # tables are the trainer's to build
    assert all(torch.isfinite(v).all() for v in model(*random_inputs(schema, 4)).values())


def _mixed_dims() -> Schema:
    return Schema.from_dict({
        "sparse": [{"name": "user", "num_embeddings": 10, "embedding_dim": 8},
                   {"name": "item", "num_embeddings": 10, "embedding_dim": 4},
                   {"name": "shop", "num_embeddings": 10, "embedding_dim": 8}],
        "dense": [{"name": "d0"}],
        "tasks": [{"name": "ctr", "label": "click"}],
    })


def test_mismatched_embedding_dims_are_refused_by_name_or_projected():
    named = r"embedding_dim 4: \['item'\]; embedding_dim 8: \['user', 'shop'\].*field_dim"
    with pytest.raises(ValueError, match=named):
        NFwFM(_mixed_dims(), **SMALL)
    model = NFwFM(_mixed_dims(), **SMALL, field_dim=6)
    assert [p.weight.shape for p in model.fields.projections] == [(6, 8), (6, 4), (6, 8)]
    assert model(*random_inputs(_mixed_dims(), 5))["ctr"].shape == (5,)


def test_projected_fields_are_each_features_own_map():
    vectors = FieldVectors({"a": 2, "b": 3}, dim=4)
    pooled = torch.randn(5, 5)
    out = vectors(pooled)
    torch.testing.assert_close(out[:, 0], pooled[:, :2] @ vectors.projections[0].weight.T)
    torch.testing.assert_close(out[:, 1], pooled[:, 2:] @ vectors.projections[1].weight.T)


def test_needs_two_fields():
    with pytest.raises(ValueError, match="at least 2"):
        FwFM(num_fields=1, dim=4)
