"""Tiny, safe column expressions for sample spaces and derived labels.

A schema says ``sample_space: "click == 1"`` or ``label: "click * conversion"``.
Both are parsed once with :mod:`ast`, checked against a whitelist of node types, and
evaluated vectorised over a dict of numpy columns. Nothing is ever ``eval``-ed. A column
whose name is not a Python identifier is written in backticks, as in pandas:
``"`marital status` == 1"`` or ``"`101` > 0"``.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
# No `&` / `|`: Python binds them tighter than `==`, so `click == 1 & x > 3` would silently
# mean `click == (1 & x) > 3`. `and` / `or` say what users mean.
_BINARY = {
    ast.Mult: operator.mul,
    ast.Add: operator.add,
    ast.Sub: operator.sub,
}


_QUOTED = re.compile(r"`([^`]+)`")
# Evaluation recurses once per level (two frames), so a label of 1,000 chained products would end
# in a RecursionError on the first batch; real labels and sample spaces are a few levels deep.
MAX_DEPTH = 64
MAX_LENGTH = 4096


@dataclass(frozen=True)
class Expression:
    """A parsed expression: ``columns`` it reads and ``evaluate(columns) -> ndarray``."""

    source: str
    columns: frozenset[str]
    _tree: ast.Expression
    _quoted: tuple[tuple[str, str], ...]  # (placeholder identifier, real column name)

    @classmethod
    def parse(cls, source: str) -> Expression:
        if len(source) > MAX_LENGTH:
            raise ValueError(f"expression {source[:40]!r}... is {len(source)} characters long; at most {MAX_LENGTH} "
                             "are accepted (derive a long label into a column of its own)")
        quoted: dict[str, str] = {}
        text = _QUOTED.sub(lambda m: quoted.setdefault(m.group(1), f"__column_{len(quoted)}__"), source)
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            raise ValueError(f"cannot parse expression {source!r}: {err.msg}; write a column name that is not "
                             "a Python identifier in backticks, e.g. `marital status`") from None
        except (RecursionError, MemoryError):  # too deep for Python's own parser
            raise _too_deep(source) from None
        if _depth(tree) > MAX_DEPTH:
            raise _too_deep(source)
        real = {placeholder: name for name, placeholder in quoted.items()}
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                names.add(real.get(node.id, node.id))
            elif not isinstance(node, _ALLOWED_NODES):
                raise ValueError(
                    f"expression {source!r} uses {type(node).__name__}; allowed: column names, "
                    "numbers, comparisons, and/or/not, * + -"
                )
        if not names:
            raise ValueError(f"expression {source!r} reads no column; a numeric column name must be written "
                             "in backticks, e.g. `101`")
        return cls(source, frozenset(names), tree, tuple(real.items()))

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._quoted:
            columns = {**columns, **{placeholder: columns[name] for placeholder, name in self._quoted}}
        return _evaluate(self._tree.body, columns)


_ALLOWED_NODES = (
    ast.Expression, ast.Name, ast.Load, ast.Constant, ast.Compare, ast.BoolOp, ast.And, ast.Or,
    ast.UnaryOp, ast.Not, ast.USub, ast.BinOp, *_COMPARE, *_BINARY,
)


def _too_deep(source: str) -> ValueError:
    return ValueError(f"expression {source[:40]!r}... nests deeper than {MAX_DEPTH} levels, the most that is "
                      f"evaluated (e.g. {MAX_DEPTH - 3} chained products); derive such a label into a column "
                      "of its own")


def _depth(tree: ast.AST) -> int:
    """Levels of nesting, counted without recursing (the point is to refuse what recursion cannot do)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _evaluate(node: ast.AST, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    recurse: Callable[[ast.AST], np.ndarray] = lambda child: _evaluate(child, columns)  # noqa: E731
    if isinstance(node, ast.Name):
        return columns[node.id]
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, bool)):
            raise ValueError(f"only numeric constants are allowed, got {node.value!r}")
        return np.asarray(node.value)
    if isinstance(node, ast.Compare):
        result, left = None, recurse(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = recurse(right_node)
            term = _COMPARE[type(op)](left, right)
            result = term if result is None else np.logical_and(result, term)
            left = right
        return result
    if isinstance(node, ast.BoolOp):
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        values = [recurse(v) for v in node.values]
        result = values[0]
        for value in values[1:]:
            result = combine(result, value)
        return result
    if isinstance(node, ast.UnaryOp):
        value = recurse(node.operand)
        return np.logical_not(value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](recurse(node.left), recurse(node.right))
    raise ValueError(f"unsupported expression node {type(node).__name__}")
