"""Schema parsing and the expression language of labels and sample spaces."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_mtr.expressions import Expression
from lightning_mtr.schema import Schema


def test_expression_reads_columns_and_evaluates_vectorised():
    expression = Expression.parse("click == 1 and not (price < 2.5)")
    assert expression.columns == {"click", "price"}
    result = expression.evaluate({"click": np.array([1, 1, 0]), "price": np.array([3.0, 1.0, 9.0])})
    assert result.tolist() == [True, False, False]
    product = Expression.parse("click * conversion").evaluate({"click": np.array([1, 1, 0]),
                                                                "conversion": np.array([1, 0, 1])})
    assert product.tolist() == [1, 0, 0]


def test_backticks_quote_column_names_that_are_not_identifiers():
    expression = Expression.parse("`marital status` == 1 and `101` > 0")
    assert expression.columns == {"marital status", "101"}
    columns = {"marital status": np.array([1, 1, 0]), "101": np.array([5, 0, 5])}
    assert expression.evaluate(columns).tolist() == [True, False, False]


@pytest.mark.parametrize("source, message", [
    ("__import__('os')", "uses Call"),
    ("click.real", "uses Attribute"),
    ("click ==", "cannot parse"),
    ("101 == 1", "reads no column"),
    ("'a' == click", "numeric constants"),
    ("click == 1 & price > 3", "uses BitAnd"),  # precedence trap: & binds tighter than ==
    ("click == 1 | price > 3", "uses BitOr"),
])
def test_bad_expressions_are_rejected(source, message):
    with pytest.raises(ValueError, match=message):
        Expression.parse(source).evaluate({"click": np.array([1])})


def test_numeric_yaml_names_become_strings():
    schema = Schema.from_dict({"sparse": [{"name": 101, "num_embeddings": 4}],
                               "tasks": [{"name": "ctr", "label": "click"}]})
    assert schema.sparse[0].name == "101" and schema.tables[0].name == "101"


def test_tables_group_shared_features_and_label_columns_cover_sample_spaces():
    schema = Schema.from_dict({
        "sparse": [{"name": "a", "num_embeddings": 4, "table": "t"}, {"name": "b", "num_embeddings": 4, "table": "t"},
                   {"name": "c", "num_embeddings": 9, "embedding_dim": 8}],
        "tasks": [{"name": "cvr", "label": "conversion", "sample_space": "click == 1"}],
    })
    assert [(t.name, t.feature_names) for t in schema.tables] == [("t", ("a", "b")), ("c", ("c",))]
    assert schema.label_columns == {"conversion", "click"}


@pytest.mark.parametrize("change, message", [
    ({"tasks": []}, "at least one task"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "ordinal"}]}, "kind must be"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "ranking"}]}, "group .* is required for kind ranking"),
    ({"tasks": [{"name": "x", "label": "y", "group": "request"}]}, "group .* is required for kind ranking"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "multiclass"}]}, "num_classes is required"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "multiclass", "num_classes": 1}]}, "num_classes must be >= 2"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "ranking", "group": "r", "ranking_loss": "lambdarank"}]},
     "ranking_loss must be"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "ranking", "group": "r", "ndcg_at": [0]}]}, "ndcg_at"),
    ({"tasks": [{"name": "x", "label": "y", "kind": "regression", "gauc_by": "user"}]}, "gauc_by is for binary"),
    ({"tasks": [{"name": "a", "label": "y", "kind": "ranking", "group": "r1"},
                {"name": "b", "label": "z", "kind": "ranking", "group": "r2"}]}, "different columns"),
    ({"sparse": [{"name": "a", "num_embeddings": 0}]}, "must be >= 1"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "pooling": "max"}]}, "pooling must be"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "max_length": 2}]}, "max_length needs multi_valued"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "init_range": 0}]}, "init_range must be a positive number"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "init_range": "wide"}]}, "init_range must be a positive number"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "init_range": True}]}, "init_range must be a positive number"),
    ({"sparse": [{"name": "a", "num_embeddings": 3, "table": "t", "init_range": 0.5},
                 {"name": "b", "num_embeddings": 3, "table": "t"}]}, r"share table 't' but disagree on init_range"),
    ({"dense": [{"name": "d", "transform": "sqrt"}]}, "unknown transform"),
    ({"dense": [{"name": "d"}, {"name": "d"}]}, "duplicate feature names"),
])
def test_invalid_schemas_explain_themselves(change, message):
    config = {"tasks": [{"name": "ctr", "label": "click"}], **change}
    with pytest.raises(ValueError, match=message):
        Schema.from_dict(config)


@pytest.mark.parametrize("key, source, limit", [
    ("label", "*".join(["c"] * 1001), "deeper than 64 levels"),  # 1,000 chained products
    ("sample_space", "not " * 1000 + "c == 1", "deeper than 64 levels"),
    ("label", " + ".join(f"`col {i}`" for i in range(600)), "4096"),
])
def test_expressions_too_deep_or_long_to_evaluate_are_refused_when_the_schema_loads(key, source, limit):
    task = {"name": "ctr", "label": "c", key: source}
    with pytest.raises(ValueError, match=f"task 'ctr': {key}: .*{limit}"):
        Schema.from_dict({"tasks": [task]})


def test_the_deepest_accepted_expression_evaluates():
    """61 chained products (62 factors): 64 levels with the root and a column's two leaf nodes, the limit."""
    expression = Expression.parse("*".join(["c"] * 62))
    assert expression.evaluate({"c": np.array([2], dtype=np.int64)}).tolist() == [2**62]


def test_numeric_looking_names_keep_their_text_quoted_or_not(tmp_path):
    """YAML 1.1 reads 109_14 as 10914 and 0123 as 83 (octal); Ali-CCP's columns are named so."""
    path = tmp_path / "schema.yaml"
    path.write_text("sparse:\n"
                    "  - {name: 109_14, num_embeddings: 4}\n"
                    "  - {name: 0123, column: '0123', num_embeddings: 4}\n"
                    "  - {name: 1e5, column: 110_14, num_embeddings: 4}\n"
                    "  - {name: cross, combo: [109_14, 0123], num_embeddings: 8}\n"
                    "  - {name: shop, column: shop, vocab_list: [0042, 7_7, 1e3]}\n"
                    "dense: [{name: 0x1F}, {name: yes}]\n"
                    "tasks: [{name: 301, label: click, sample_space: '`127_14` == 1'}]\n"
                    "ground_truth: [150_14]\n")
    schema = Schema.from_yaml(path)
    assert [f.source_column for f in schema.sparse[:3] + schema.dense] == ["109_14", "0123", "110_14", "0x1F", "yes"]
    assert [f.name for f in schema.sparse] == ["109_14", "0123", "1e5", "cross", "shop"]
    assert (schema.sparse[3].combo, schema.sparse[4].vocab_list) == (("109_14", "0123"), ("0042", "7_7", "1e3"))
    assert (schema.tasks[0].name, schema.ground_truth) == ("301", ("150_14",))
