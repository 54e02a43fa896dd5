"""The user/item split of a servable model (DUPN's serving trick: Ni et al., KDD 2018, section 7).

A request scores many candidates for one user. The user program reads the request's features
(``side: user``) once; the item program reads the candidates' (``side: item``) and the user
program's output ``[1, H]``, broadcast over the candidates, so the request's work is not repeated
per candidate. Each program transforms its own side's raw dense columns, and takes its side's
features in schema order (:func:`side_layout`).

* DUPN: user = its representation ``rep`` (which never reads the candidate), item = its heads.
* MMoE, OMoE, Shared-Bottom, the YouTube ranker: the layers that read the feature vector are
  linear, ``W [u; i] + b = (W_u u + b) + W_i i``; the user program computes ``W_u u + b`` of
  each (one matrix over the user vector), the item program adds ``W_i i`` and runs the rest.
  (The YouTube ranker's shallow tower reads the constant "missing position", so that part of its
  first layer goes with the user half.) Shared-Bottom splits too: its bottom MLP starts with a
  linear layer, so nothing mixes the two sides before it.

Refused, with the reason (:data:`REFUSED`): a schema without ``side: item`` features (every
candidate would score the same), and the models whose split is not written (PLE, ESMM, ESM2, AITM:
linear first layers, split like MMoE's would work) or not linear (NFwFM's FM term).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lightning_mtr.data.encode import DenseStats
from lightning_mtr.nn.features import FeatureLayout
from lightning_mtr.models import AITM, DUPN, ESM2, ESMM, NFwFM, PLE, MMoE, SharedBottom, YouTubeRanker
from lightning_mtr.schema import Schema
from lightning_mtr.serving.program import (
    ServingModel, example_inputs, export_module, input_dims,
)
from lightning_mtr.tasks.scores import probabilities
from lightning_mtr.serving.tables import Quantize

USER, ITEM = "user", "item"
USER_PROGRAM, ITEM_PROGRAM = "user.pt2", "item.pt2"
_NOT_WRITTEN = ("its towers' first layers read the feature vector and could be split as MMoE's are, but this split "
                "is not written yet")
REFUSED = {
    PLE: "PLE: the first level's task and shared expert banks and gates are linear in the features and could be "
         "split as MMoE's are, but this split is not written yet",
    ESMM: f"ESMM: {_NOT_WRITTEN}", ESM2: f"ESM2: {_NOT_WRITTEN}", AITM: f"AITM: {_NOT_WRITTEN}",
    NFwFM: "NFwFM: its field-weighted FM multiplies user and candidate embeddings pair by pair before any linear "
           "layer; W [u; i] = W_u u + W_i i does not cover that (a split would keep sum_i r_ij v_i per candidate field "
           "from the user side), and it is not written yet",
}


class SplitRefused(ValueError):
    """The model or its schema does not split into a user and an item program."""


def side_schema(schema: Schema, side: str) -> Schema:
    """The schema of one side's features (tables shared across sides appear in both)."""
    return dataclasses.replace(schema, sparse=tuple(f for f in schema.sparse if f.side == side),
                               dense=tuple(f for f in schema.dense if f.side == side))


def side_layout(schema: Schema, side: str) -> dict[str, list[str]]:
    """What one side's program reads: its dense columns and sparse features, in schema order."""
    part = side_schema(schema, side)
    return {"dense": [f.name for f in part.dense], "sparse": [f.name for f in part.sparse]}


def _side_stats(schema: Schema, stats: DenseStats | None, side: str) -> DenseStats | None:
    keep = [i for i, f in enumerate(schema.dense) if f.side == side]
    return None if stats is None else DenseStats(tuple(stats.mean[i] for i in keep), tuple(stats.std[i] for i in keep))


class UserProgram(nn.Module):
    """``forward(dense [B, user dense] raw float64, values [N], lengths [user sparse, B]) -> [B, H]``:
    DUPN's ``rep`` (:class:`~lightning_mtr.interfaces.UserItemSplit`), or ``W_u u + b`` of every
    split linear layer side by side."""

    def __init__(self, side: ServingModel, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.side = side
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @property
    def width(self) -> int:
        """H, the size of the output."""
        return self.side.model.representation_dim if self.weight is None else self.weight.shape[0]

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        dense, sparse = self.side.transform_dense(dense), (values, lengths)
        if self.weight is None:
            return self.side.model.user_representation(dense, sparse)
        return F.linear(self.side.model.features(dense, sparse), self.weight, self.bias)


class ItemProgram(nn.Module):
    """``forward(user [1, H], dense [B, item dense] raw float64, values [N], lengths [item sparse, B])
    -> {output: [B]}``, the monolithic program's outputs for B candidates of one user."""

    def __init__(self, side: ServingModel, weight: torch.Tensor | None = None, sizes: list[int] = (),
                 rest: Callable | None = None):
        super().__init__()
        self.side, self.sizes, self.rest = side, list(sizes), rest
        self.register_buffer("weight", weight)

    def forward(self, user: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        dense, sparse = self.side.transform_dense(dense), (values, lengths)
        if self.weight is None:
            logits = self.side.model.score(user, dense, sparse)
        else:
            hidden = F.linear(self.side.model.features(dense, sparse), self.weight) + user
            logits = self.rest(*hidden.split(self.sizes, dim=1))
        return probabilities(self.side.schema, logits)


def split_model(model: nn.Module, schema: Schema, dense_stats: DenseStats | None, quantize: Quantize = "none"
                ) -> tuple[UserProgram, ItemProgram]:
    """The two programs of ``model`` (eval mode, as :class:`ServingModel`); :class:`SplitRefused`
    says why a model cannot be split."""
    refused = next((reason for cls, reason in REFUSED.items() if isinstance(model, cls)), None)
    if refused:
        raise SplitRefused(refused)
    if schema.weighted:
        raise SplitRefused("the schema has weighted ids (weight_column), which the user and item programs do not "
                           "take; model.pt2 scores them")
    if not schema.features_on_side(ITEM):
        raise SplitRefused("the schema tags no feature `side: item`, so every candidate of a request would get the "
                           "same score; tag the candidate's features in the schema")
    item_columns = {c for f in schema.sparse if f.side == ITEM for c in f.columns} | \
        {f.source_column for f in schema.dense if f.side == ITEM}
    crossed = [f for f in schema.sparse if f.combo and f.side != ITEM and item_columns & set(f.combo)]
    if crossed:  # user.pt2 runs once per request: a cross with the candidate differs per candidate
        raise SplitRefused(f"combo features {[f.name for f in crossed]} read the candidate's columns "
                           f"{sorted(item_columns & {c for f in crossed for c in f.combo})} but are tagged side: user; "
                           "tag them side: item")
    if isinstance(model, DUPN) and not any(model.head_features.values()) and not model.ranking_features:
        raise SplitRefused(_reads_no_item(model, schema))
    sides = {s: ServingModel(model, side_schema(schema, s), _side_stats(schema, dense_stats, s), quantize)
             for s in (USER, ITEM)}
    if isinstance(model, DUPN):
        return UserProgram(sides[USER]), ItemProgram(sides[ITEM])
    family = next((f for cls, f in _FAMILIES.items() if isinstance(model, cls)), None)
    if family is None:
        raise SplitRefused(f"{type(model).__name__}: no user/item split is known for this model")
    full = FeatureLayout(schema)
    layers, rest = family(sides[ITEM].model, full)
    weights = {s: _side_weights(layers, full, sides[s].model.features) for s in (USER, ITEM)}
    if not weights[ITEM].any():
        raise SplitRefused(_reads_no_item(model, schema))
    bias = torch.cat([_constant_part(layer, prefix) for layer, _, prefix in layers])
    user = UserProgram(sides[USER], weights[USER], bias)
    return user, ItemProgram(sides[ITEM], weights[ITEM], [layer.out_features for layer, _, _ in layers], rest)


def _reads_no_item(model: nn.Module, schema: Schema) -> str:
    return (f"{type(model).__name__} reads none of the schema's `side: item` features {schema.features_on_side(ITEM)}, "
            "so every candidate would get the same score")


Layer = tuple[nn.Linear, list[str], torch.Tensor | None]
"""A linear layer that reads ``[prefix; the named features]`` (a constant prefix, or none)."""


def _side_weights(layers: list[Layer], full: FeatureLayout, layout: FeatureLayout) -> torch.Tensor:
    """The layers' weights on one side's feature vector, ``[sum of outputs, side width]``: each
    named feature's columns moved to where that side's vector holds it (zero where a layer does
    not read a column)."""
    blocks = []
    for layer, names, prefix in layers:
        weight = layer.weight.detach()
        block = weight.new_zeros(weight.shape[0], layout.output_dim)
        start = 0 if prefix is None else prefix.numel()
        for name in names:
            width = full.widths([name])
            if name in layout.dense_names:
                block[:, layout.dense_names.index(name)] = weight[:, start]
            elif name in layout.offsets:
                block[:, slice(*layout.offsets[name])] = weight[:, start:start + width]
            start += width
        if start != weight.shape[1]:
            raise SplitRefused(f"a layer reads {weight.shape[1]} columns but its features {names} have {start}")
        blocks.append(block)
    return torch.cat(blocks)


def _constant_part(layer: nn.Linear, prefix: torch.Tensor | None) -> torch.Tensor:
    """``b + W_prefix prefix``: what a layer adds whatever the features."""
    out = layer.bias.detach().clone() if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
    if prefix is not None:
        out += layer.weight.detach()[:, :prefix.numel()] @ prefix.detach()
    return out


def _first_linear(module: nn.Sequential) -> tuple[nn.Linear, nn.Sequential]:
    """A Sequential's (nested ones flattened) first layer, which must be linear, and the rest."""
    flat = [m for m in module.modules() if not isinstance(m, nn.Sequential)]
    if not flat or not isinstance(flat[0], nn.Linear):
        raise SplitRefused(f"{type(module).__name__} does not start with a linear layer")
    return flat[0], nn.Sequential(*flat[1:])


def _inputs(features: FeatureLayout) -> list[str]:
    """The flat feature vector's features in its order: dense columns, then pooled embeddings."""
    return features.dense_names + features.feature_names


def _towers(model: nn.Module, branches: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    return model.towers(dict(zip(model.tasks, branches)))


def _mixture(model: MMoE, full: FeatureLayout) -> tuple[list[Layer], Callable]:
    names = _inputs(full)
    layers = [(model.bottom.experts.first, names, None), (model.bottom.gates, names, None)]
    return layers, lambda first, gates: _towers(model, model.bottom.after_first(first, gates))


def _shared_bottom(model: SharedBottom, full: FeatureLayout) -> tuple[list[Layer], Callable]:
    first, after = _first_linear(model.bottom.mlp)
    return [(first, _inputs(full), None)], lambda hidden: _towers(model, (after(hidden),) * len(model.tasks))


def _youtube(model: YouTubeRanker, full: FeatureLayout) -> tuple[list[Layer], Callable]:
    first, after = _first_linear(model.shared)
    layers = [(first, full.dense_names + model.main_features, None)]
    if model.shallow is not None:  # [missing position, shallow features]: the serving input
        shallow_first, shallow_after = _first_linear(model.shallow)
        layers.append((shallow_first, model.shallow_features, model.missing_position))

    def rest(hidden: torch.Tensor, shallow: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = _towers(model, model.bottom(after(hidden)))
        if shallow is None:
            return logits
        bias = shallow_after(shallow)[:, 0]
        return {task: logit + bias if task in model.engagement else logit for task, logit in logits.items()}
    return layers, rest


_FAMILIES = {MMoE: _mixture, SharedBottom: _shared_bottom, YouTubeRanker: _youtube}  # OMoE is an MMoE


def export_split(user: UserProgram, item: ItemProgram) -> tuple[torch.export.ExportedProgram, ...]:
    """Both programs as ``torch.export`` programs; the user one takes a dynamic batch (several
    requests at once), the item one a dynamic number of candidates for one user ``[1, H]``."""
    user_program = export_module(user, example_inputs(user.side.schema), input_dims(user.side.schema))
    with torch.no_grad():
        encoded = user(*example_inputs(user.side.schema, batch=1))
    item_program = export_module(item, (encoded, *example_inputs(item.side.schema)),
                                 {"user": None, **input_dims(item.side.schema)})
    return user_program, item_program


def side_inputs(schema: Schema, side: str, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side's ``(dense, values, lengths)`` out of the monolithic program's inputs."""
    keep = [i for i, f in enumerate(schema.sparse) if f.side == side]
    pieces = values.split(lengths.sum(dim=1).tolist())
    dense_columns = [i for i, f in enumerate(schema.dense) if f.side == side]
    return dense[:, dense_columns], torch.cat([values[:0]] + [pieces[i] for i in keep]), lengths[keep]


def broadcast_user(schema: Schema, user: tuple, item: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The monolithic program's inputs for one user's request over B candidates: the user's
    features repeated on every candidate's row, as a serving system without the split sends them."""
    (user_dense, user_values, user_lengths), (item_dense, item_values, item_lengths) = user, item
    batch = item_lengths.shape[1]
    parts = {USER: user_values.split(user_lengths.sum(dim=1).tolist()),
             ITEM: item_values.split(item_lengths.sum(dim=1).tolist())}
    index = {USER: 0, ITEM: 0}
    values, lengths = [], []
    for feature in schema.sparse:
        k = index[feature.side]
        index[feature.side] += 1
        if feature.side == USER:
            values.append(parts[USER][k].repeat(batch))
            lengths.append(user_lengths[k].expand(batch))
        else:
            values.append(parts[ITEM][k])
            lengths.append(item_lengths[k])
    dense = item_dense.new_empty(batch, len(schema.dense))
    for side, columns in ((USER, user_dense.expand(batch, -1)), (ITEM, item_dense)):
        dense[:, [i for i, f in enumerate(schema.dense) if f.side == side]] = columns
    return dense, torch.cat([item_values[:0]] + values), torch.stack(lengths) if lengths else item_lengths


def split_difference(schema: Schema, monolithic: nn.Module, user: nn.Module, item: nn.Module,
                     inputs: tuple, users: int = 4, candidates: int = 1024) -> float:
    """Max |split score - monolithic score| with each of the first ``users`` rows of ``inputs``
    (monolithic layout) as the user and the first ``candidates`` rows as the candidates."""
    batch = inputs[2].shape[1]
    items = side_inputs(schema, ITEM, *select_rows(inputs, range(min(batch, candidates))))
    worst = 0.0
    with torch.no_grad():
        for row in range(min(batch, users)):
            request = side_inputs(schema, USER, *select_rows(inputs, [row]))
            expected = monolithic(*broadcast_user(schema, request, items))
            scores = item(user(*request), *items)
            worst = max([worst] + [float((scores[name] - value).abs().max()) for name, value in expected.items()])
    return worst


def select_rows(inputs: tuple, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The given rows of a program's ``(dense, values, lengths)``, in that order."""
    dense, values, lengths = inputs
    rows = list(rows)
    bags = values.split(lengths.reshape(-1).tolist())  # feature-major: bag f * B + row
    kept = [bags[f * lengths.shape[1] + r] for f in range(lengths.shape[0]) for r in rows]
    return dense[rows], torch.cat([values[:0]] + kept), lengths[:, rows]


def split_manifest(schema: Schema, width: int, difference: float) -> dict:
    """The manifest's ``split`` entry: which program reads what, and the parity it was checked at."""
    return {
        "user": {"file": USER_PROGRAM, "inputs": side_layout(schema, USER), "output": ["B", width]},
        "item": {"file": ITEM_PROGRAM, "inputs": {"user": [1, width], **side_layout(schema, ITEM)},
                 "outputs": "as model.pt2's"},
        "note": "run user.pt2 once per request on the request's features (the `user` side), then item.pt2 on the "
                "candidates' (the `item` side) with that output; each takes (dense, values, lengths) as model.pt2 "
                "does, restricted to its side's dense columns and sparse features, in the listed order",
        "max_abs_diff": difference,
    }
