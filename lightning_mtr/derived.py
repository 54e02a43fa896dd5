"""Sparse ids derived from raw values, as TorchEasyRec users know them (docs/schema-and-data.md).

- RawFeature ``boundaries``: a number ``x`` goes to bucket ``i`` with ``b[i-1] <= x < b[i]``
  (``numpy.searchsorted(b, x, side="right")``: a value equal to a boundary goes to the bucket
  above it, as TensorFlow's ``Bucketize`` that EasyRec used), ``0`` below ``b[0]``, ``len(b)`` from
  ``b[-1]`` on; a null or NaN goes to its own bucket, the last row (``len(b) + 1``).
- ``quantiles: N``: the boundaries are the training data's ``k / N`` quantiles (``k = 1..N-1``,
  numpy's default linear interpolation, nulls left out), ties merged, computed with the dense
  statistics and kept in the checkpoint; the table has ``N + 1`` rows.
- IdFeature ``vocab_list`` / ``vocab_file``: the id's text (integers as decimals) -> its place
  in the list; an id not in the list goes to the default row, the last (``len(vocab)``); a null
  is a missing id (an empty bag), as for every id feature.
- ComboFeature ``combo``: the columns' values as text joined by U+001F, hashed as string ids are
  (FNV-1a 64 mod ``num_embeddings``), so ``42`` and ``"42"`` combine alike; a row where any of the
  columns is null has no combined id (an empty bag); list columns are refused.

The schema checks declarations here (:func:`derive_rows`, :func:`validate_derived`); the encoder
computes ids with the rest.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COMBO_SEPARATOR = "\x1f"
SAMPLE_SIZE = 1 << 20  # values kept per quantile feature: a quantile's rank has standard error <= sqrt(.25 / 2**20)


def read_vocab_file(config: Any, base: Path) -> Any:
    """A sparse feature's YAML mapping with ``vocab_file`` (one value per line, relative to
    ``base``) read into ``vocab_list``, so checkpoints and artifacts carry the vocabulary itself."""
    if not isinstance(config, dict) or "vocab_file" not in config:
        return config
    where = f"sparse feature {config.get('name', '?')!r}"
    if config.get("vocab_list") is not None:
        raise ValueError(f"{where}: give vocab_list or vocab_file, not both")
    path = base / str(config["vocab_file"])
    if not path.is_file():
        raise ValueError(f"{where}: vocab_file {str(config['vocab_file'])!r} not found (looked for {path}; the path "
                         "is relative to the schema file): write one value per line there, or fix the path")
    values = [v for v in (line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")) if v]
    if not values:
        raise ValueError(f"{where}: vocab_file {str(config['vocab_file'])!r} ({path}) has no values: write one value "
                         "per line")
    return {**{k: v for k, v in config.items() if k != "vocab_file"}, "vocab_list": values}


def derive_rows(feature: Any) -> None:
    """Check and normalise a :class:`~lightning_mtr.schema.SparseFeature`'s derived-id keys
    and set its ``num_embeddings`` from them (refusing a declared size that disagrees)."""
    where = f"sparse feature {feature.name!r}"
    kinds = [k for k, on in (("boundaries/quantiles", feature.bucketized), ("vocab_list/vocab_file",
             feature.vocab_list is not None), ("combo", feature.combo is not None)) if on]
    if len(kinds) > 1:
        raise ValueError(f"{where}: {' and '.join(kinds)} each make the ids; give one of them")
    rows, what = None, ""
    if feature.bucketized:
        rows, what = _bucket_rows(feature, where)
    elif feature.vocab_list is not None:
        vocab = _names(feature.vocab_list, where, "vocab_list", "a list of ids (text or integers), e.g. [shoes, hats]")
        if len(set(vocab)) < len(vocab):
            raise ValueError(f"{where}: vocab_list repeats {sorted({v for v in vocab if vocab.count(v) > 1})[:5]}; "
                             "each id gets one row, so list it once")
        object.__setattr__(feature, "vocab_list", vocab)
        rows, what = len(vocab) + 1, f"{len(vocab)} vocabulary entries + 1 default row"
    elif feature.combo is not None:
        columns = _names(feature.combo, where, "combo", "two or more column names, e.g. [user_id, category]")
        if len(columns) < 2 or len(set(columns)) < len(columns):
            raise ValueError(f"{where}: combo combines two or more different columns, e.g. [user_id, category], "
                             f"got {list(columns)}; for one column use a plain id feature")
        if feature.column is not None:
            raise ValueError(f"{where}: a combo feature reads the columns its combo names; drop column")
        object.__setattr__(feature, "combo", columns)
    if rows is None:
        return
    if feature.num_embeddings not in (0, rows):
        raise ValueError(f"{where}: num_embeddings {feature.num_embeddings} disagrees with the {rows} rows its "
                         f"{what} make; leave num_embeddings out (it is derived)")
    object.__setattr__(feature, "num_embeddings", rows)


def _bucket_rows(feature: Any, where: str) -> tuple[int, str]:
    count = feature.quantiles
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise ValueError(f"{where}: quantiles is the number of buckets (an integer >= 2) cut at the training "
                         f"data's quantiles, got {count!r}")
    bounds = feature.boundaries
    if bounds is not None:
        numbers = isinstance(bounds, tuple) and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                    and math.isfinite(b) for b in bounds)
        if not numbers or not (bounds or count) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{where}: boundaries must be a non-empty list of finite numbers, each greater than the "
                             f"one before (e.g. [1, 10, 100]), got {list(bounds) if numbers else bounds!r}")
        if count is not None and len(bounds) >= count:
            raise ValueError(f"{where}: {len(bounds)} boundaries for quantiles: {count} (at most {count - 1}); give "
                             "boundaries or quantiles, not both")
        object.__setattr__(feature, "boundaries", tuple(float(b) for b in bounds))
    if count is not None:
        return count + 1, f"quantiles: {count} buckets + 1 null bucket"
    return len(bounds) + 2, f"{len(bounds)} boundaries (so {len(bounds) + 1} buckets + 1 null bucket)"


def _names(values: Any, where: str, key: str, expected: str) -> tuple[str, ...]:
    """``values`` as text: YAML reads ``[1, 2]`` as integers, the files' ids compare as text."""
    if not isinstance(values, tuple) or not values or any(
            isinstance(v, bool) or not isinstance(v, (str, int)) for v in values):
        raise ValueError(f"{where}: {key} must be {expected}, got {values!r}")
    return tuple(str(v) for v in values)


def validate_derived(feature: Any, where: str) -> None:
    """Refuse options that do not apply to derived ids."""
    if not (feature.bucketized or feature.vocab_list is not None or feature.combo is not None):
        return
    clashing = [key for key, on in (("hashed", feature.hashed), ("out_of_range: modulo", feature.out_of_range ==
                "modulo"), ("managed_collisions", feature.managed_collisions is not None),
                ("sequence", feature.sequence)) if on]
    if feature.multi_valued and feature.vocab_list is None:
        clashing.append("multi_valued")
    if clashing:
        raise ValueError(f"{where}: {clashing[0]} does not apply to ids made by boundaries, quantiles, vocab_list or "
                         "combo (they are rows of the table already); drop it")


def with_quantile_boundaries(schema: Any, boundaries: tuple[tuple[float, ...], ...]) -> Any:
    """``schema`` with each ``quantiles`` feature's boundaries set from the training statistics
    (one tuple per such feature, in schema order; ties merged): what export writes and score reads."""
    features = [f for f in schema.sparse if f.quantiles]
    if not boundaries or not features:
        return schema
    resolved = {f.name: tuple(np.unique(b).tolist()) for f, b in zip(features, boundaries, strict=True)}
    return dataclasses.replace(schema, sparse=tuple(
        dataclasses.replace(f, boundaries=resolved[f.name]) if f.name in resolved else f for f in schema.sparse))


def bucket_rows(values: np.ndarray, boundaries: tuple[float, ...], rows: int) -> np.ndarray:
    """int64 bucket of each float64 value (NaN: null), as the module docstring states."""
    buckets = np.searchsorted(np.asarray(boundaries, np.float64), values, side="right")
    return np.where(np.isnan(values), rows - 1, buckets).astype(np.int64)


def vocab_rows(array: pa.Array, vocab: tuple[str, ...]) -> np.ndarray:
    """int64 place of each (non-null) id's text in ``vocab``; ``len(vocab)`` when it is not there."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    texts = array.cast(pa.string()).to_pylist()
    rows, missing = _rows_by_text(vocab), len(vocab)
    return np.fromiter((rows.get(text, missing) for text in texts), np.int64, len(texts))


# id(vocabulary) -> (that vocabulary, its text -> row map); Arrow's ``index_in`` hashed the whole
# value set on every batch (24 ms a 4,096-row batch at 200,000 entries), a map built once is O(batch)
_ROW_MAPS: dict[int, tuple[tuple[str, ...], dict[str, int]]] = {}


def _rows_by_text(vocab: tuple[str, ...]) -> dict[str, int]:
    held = _ROW_MAPS.get(id(vocab))
    if held is None or held[0] is not vocab:  # an id is reused only once its tuple is gone, and this one is held
        if len(_ROW_MAPS) >= 64:
            _ROW_MAPS.clear()
        held = _ROW_MAPS[id(vocab)] = (vocab, {text: row for row, text in enumerate(vocab)})
    return held[1]


def combo_text(columns: list[pa.ChunkedArray]) -> tuple[pa.Array, np.ndarray]:
    """``(joined text of the rows where every column has a value, that row mask)``."""
    texts = []
    for column in columns:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        texts.append((array.dictionary_decode() if pa.types.is_dictionary(array.type) else array).cast(pa.string()))
    joined = pc.binary_join_element_wise(*texts, COMBO_SEPARATOR)
    present = np.asarray(joined.is_valid())
    return joined.drop_null(), present


class QuantileSample:
    """A uniform sample of at most ``SAMPLE_SIZE`` finite values of a column, streamed chunk by chunk:
    each value draws a random key and the smallest keys stay (deterministic: a fixed seed and the
    files' order). Up to ``SAMPLE_SIZE`` values the quantiles are exact."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.values = np.zeros(0)
        self.keys = np.zeros(0)

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        self.values = np.concatenate([self.values, values])
        self.keys = np.concatenate([self.keys, self.rng.random(len(values))])
        if len(self.values) > SAMPLE_SIZE:
            keep = np.argpartition(self.keys, SAMPLE_SIZE)[:SAMPLE_SIZE]
            self.values, self.keys = self.values[keep], self.keys[keep]

    def boundaries(self, buckets: int) -> tuple[float, ...]:
        """The ``k / buckets`` quantiles, ``k = 1..buckets-1`` (none without values)."""
        if not len(self.values):
            return ()
        return tuple(float(q) for q in np.quantile(self.values, np.arange(1, buckets) / buckets))
