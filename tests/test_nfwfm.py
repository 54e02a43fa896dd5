"""FwFM block against its formula, and the multi-task neural FwFM built on it: pairs over the
features of a row (the elements of multi-hot fields), as Pan et al. (WWW 2018) define it."""

from __future__ import annotations

import pytest
import torch

from helpers import random_inputs, tiny_schema
from lightning_mtr.models.nfwfm import NFwFM
from lightning_mtr.nn.fwfm import FieldVectors, FwFM
from lightning_mtr.embeddings import init_tables
from lightning_mtr.nn.meta import materialize
from lightning_mtr.schema import Schema
from torchrec import KeyedJaggedTensor

SMALL = {"hidden": [8, 6], "tower": [5]}
# two single-valued fields (pooled tables) and two multi-hot ones (looked up element by element)
MULTI_HOT = Schema.from_dict({
    "sparse": [{"name": "user", "num_embeddings": 10, "embedding_dim": 4},
               {"name": "shop", "num_embeddings": 10, "embedding_dim": 4},
               {"name": "tags", "num_embeddings": 20, "embedding_dim": 4, "sequence": True, "max_length": 5},
               {"name": "cats", "num_embeddings": 15, "embedding_dim": 4, "sequence": True, "max_length": 5}],
    "dense": [{"name": "d0"}],
    "tasks": [{"name": "ctr", "label": "click"}, {"name": "cvr", "label": "conversion"}],
})
FIELDS = ["user", "shop", "tags", "cats"]  # the model's field order: pooled features, then multi-hot ones
# each row's ids per field: a bag of three, one, none and two; an empty shop; one row without cats
ROWS = {"user": [[1], [2], [3], [4]], "shop": [[5], [6], [], [7]],
        "tags": [[3, 8, 8], [1], [], [19, 0]], "cats": [[2, 4], [14, 7], [9], []]}


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
    model = NFwFM(schema, **SMALL, linear=False, multi_hot="mean")  # the item bag is pooled by its table
    dense, sparse = random_inputs(schema, 9)
    fields, _ = model.fields(model.features.pooled(model.features(dense, sparse)))
    pooled = model.features.embeddings(sparse).to_dict()
    assert model.fwfm.pair_weights.numel() == 3  # (user, item), (user, item_last), (item, item_last)
    for f, name in enumerate(["user", "item", "item_last"]):
        torch.testing.assert_close(fields[:, f], pooled[name])
    same_table = (pooled["item"] * pooled["item_last"]).sum(-1)
    assert same_table.abs().sum() > 0
    torch.testing.assert_close(model.fwfm.pairwise(fields)[:, 2], model.fwfm.pair_weights[2] * same_table)


def _sparse() -> KeyedJaggedTensor:
    lengths = torch.tensor([len(ids) for name in FIELDS for ids in ROWS[name]])
    values = torch.tensor([i for name in FIELDS for ids in ROWS[name] for i in ids])
    return KeyedJaggedTensor(keys=FIELDS, values=values, lengths=lengths)


def _model_with_weights(r: torch.Tensor, **options) -> NFwFM:
    """NFwFM on MULTI_HOT whose field weights are the symmetric ``r`` (same-field weights on its diagonal)."""
    torch.manual_seed(0)
    model = NFwFM(MULTI_HOT, **SMALL, **options)
    rows, cols = torch.triu_indices(4, 4, offset=1)
    with torch.no_grad():
        model.fwfm.pair_weights.copy_(r[rows, cols])
        if model.fwfm.same_field_weights is not None:
            model.fwfm.same_field_weights.copy_(r.diagonal()[2:])
    return model


def _elements(model: NFwFM, row: int) -> list[tuple[int, torch.Tensor]]:
    """Every feature (id) of a row as (field, vector), read from the tables themselves, projected
    to k when the model projects."""
    tables = {**model.features.embeddings.embedding_bags, **model.features.sequence_embeddings.embeddings}
    out = []
    for f, name in enumerate(FIELDS):
        for i in ROWS[name][row]:
            vector = tables[name].weight[i]
            out.append((f, vector if model.fields.projections is None else model.fields.projections[f](vector)))
    return out


def _score(model: NFwFM) -> torch.Tensor:
    """The FwFM score of a real forward over the rows."""
    seen = []
    handle = model.fwfm.register_forward_hook(lambda module, args, out: seen.append(out))
    model(torch.tensor([[0.7], [-1.3], [2.1], [0.4]]), _sparse())  # dense values: they must not reach the FwFM
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("field_dim", [None, 3])
def test_multi_hot_fields_pair_every_element_as_the_paper_defines(field_dim):
    """sum_{i<j} r_{F(i),F(j)} <v_i, v_j> over the row's features, plus the FiLV linear terms
    w0 + sum_i <v_i, w_F(i)>: a naive double loop over the elements. Catches a mean-pooled
    field (each cross term divided by the bag sizes) and a missing same-field pair term."""
    torch.manual_seed(1)
    r = torch.randn(4, 4)
    r = r + r.T
    model = _model_with_weights(r, field_dim=field_dim)
    k = model.fields.dim
    w = model.fwfm.linear.weight.view(4, k)
    expected = []
    for row in range(4):
        features = _elements(model, row)
        total = model.fwfm.linear.bias[0] + sum((v * w[f]).sum() for f, v in features)
        for a in range(len(features)):
            for b in range(a + 1, len(features)):
                (f, u), (g, v) = features[a], features[b]
                total = total + r[f, g] * (u * v).sum()
        expected.append(total)
    torch.testing.assert_close(_score(model), torch.stack(expected))


def test_mean_option_averages_each_bag_and_has_no_same_field_pairs():
    torch.manual_seed(2)
    r = torch.randn(4, 4)
    r = r + r.T
    model = _model_with_weights(r, multi_hot="mean", linear=False)
    assert model.fwfm.same_field_weights is None
    expected = []
    for row in range(4):
        features = _elements(model, row)
        means = [torch.stack([v for f, v in features if f == g]).mean(0) if any(f == g for f, _ in features)
                 else torch.zeros(4) for g in range(4)]
        expected.append(sum(r[f, g] * (means[f] * means[g]).sum() for f in range(4) for g in range(f + 1, 4)))
    torch.testing.assert_close(_score(model), torch.stack(expected))


def test_unit_weights_give_the_fm_over_every_element():
    """r = 1 everywhere (the start): the FM's 0.5 (||sum_i v_i||^2 - sum_i ||v_i||^2) over all the
    row's features, whichever field they belong to."""
    model = NFwFM(MULTI_HOT, **SMALL, linear=False)
    expected = []
    for row in range(4):
        vectors = torch.stack([v for _, v in _elements(model, row)])
        expected.append(0.5 * (vectors.sum(0).square().sum() - vectors.square().sum()))
    torch.testing.assert_close(_score(model), torch.stack(expected))


def test_pooled_multi_valued_features_are_refused_where_their_elements_are_needed():
    pooled_bag = r"\['item'\] are multi_valued features pooled by their tables.*sequence: true"
    with pytest.raises(ValueError, match=pooled_bag):
        NFwFM(tiny_schema(), **SMALL)
    summed = Schema.from_dict({"sparse": [{"name": "user", "num_embeddings": 5},
                                          {"name": "tags", "num_embeddings": 5, "multi_valued": True}],
                               "tasks": [{"name": "ctr", "label": "click"}]})
    with pytest.raises(ValueError, match=r"\['tags'\] pool by sum; give them pooling: mean"):
        NFwFM(summed, **SMALL, multi_hot="mean")
    with pytest.raises(ValueError, match="multi_hot must be 'sum'"):
        NFwFM(MULTI_HOT, **SMALL, multi_hot="max")


@pytest.mark.parametrize("batch", [1, 7])
def test_one_logit_per_task_and_row(batch):
    logits = NFwFM(MULTI_HOT, **SMALL)(*random_inputs(MULTI_HOT, batch))
    assert sorted(logits) == ["ctr", "cvr"]
    for value in logits.values():
        assert value.shape == (batch,) and torch.isfinite(value).all()


@pytest.mark.parametrize("options", [{}, {"field_dim": 3}, {"tower": []}, {"multi_hot": "mean"}],
                         ids=["common_dim", "projected", "linear_heads", "mean"])
def test_gradient_reaches_every_parameter(options):
    torch.manual_seed(0)
    model = NFwFM(MULTI_HOT, **{**SMALL, **options})
    dense, sparse = random_inputs(MULTI_HOT, 256)
    sum(logit.square().sum() for logit in model(dense, sparse).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_builds_on_meta_and_materialises():
    with torch.device("meta"):
        model = NFwFM(MULTI_HOT, **SMALL, field_dim=3)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    materialize(model, "cpu")
    outside_tables = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if not n.startswith(("features.embeddings.", "features.sequence_embeddings."))}
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in outside_tables.values())
    rows, cols = torch.triu_indices(4, 4, offset=1)
    assert torch.equal(model.fwfm.pair_index, rows * 4 + cols)
    assert torch.equal(model.fwfm.pair_weights, torch.ones(6))
    assert torch.equal(model.fwfm.same_field_weights, torch.ones(2))
    init_tables(model, "cpu")  # the tables: the trainer's to build
    assert all(torch.isfinite(v).all() for v in model(*random_inputs(MULTI_HOT, 4)).values())


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
    out, square_norms = vectors(pooled)
    assert square_norms.shape == (5, 0)  # no multi-hot field
    torch.testing.assert_close(out[:, 0], pooled[:, :2] @ vectors.projections[0].weight.T)
    torch.testing.assert_close(out[:, 1], pooled[:, 2:] @ vectors.projections[1].weight.T)


def test_needs_two_fields():
    with pytest.raises(ValueError, match="at least 2"):
        FwFM(num_fields=1, dim=4)

