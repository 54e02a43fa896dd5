"""A trained model as a servable program: raw inputs in, named probabilities out.

:class:`ServingModel` wraps a copy of the model in evaluation mode (dropout off, the YouTube
ranker's position replaced by its learned "missing" value), with the plain-tensor feature input
of :mod:`lightning_mtr.serving.features`, the fused kernels on their PyTorch reference path, and
the schema's dense transforms inside, so a serving system sends raw feature values.
:func:`export_program` turns it into a ``torch.export`` program of ATen operators (PyTorch's own).
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from lightning_mtr.data.encode import DenseStats
from lightning_mtr.schema import Schema
from lightning_mtr.tasks.scores import probabilities
from lightning_mtr.serving.features import ServingFeatureInput
from lightning_mtr.serving.tables import Quantize, RowStore

MAX_BATCH = 16384


class ExportError(RuntimeError):
    """A model that cannot be written as a program that scores as it does."""


class ServingModel(nn.Module):
    """``forward(dense [B, n_dense] float64 raw, values [N] int64, lengths [F, B] int64[, weights [N]
    float32]) -> {output: [B]}`` (float64 dense: a raw timestamp or price keeps the precision training
    standardised it with; ``weights`` for a schema with weighted ids only, and required there)."""

    def __init__(self, model: nn.Module, schema: Schema, dense_stats: DenseStats | None, quantize: Quantize = "none"):
        super().__init__()
        self.schema = schema
        # the trained tables are read once, below: copying them too would hold them twice more
        self.model = copy.deepcopy(model, memo={id(model.features): nn.Identity()}).eval()
        for module in self.model.modules():  # the registered kernels are lightning_mtr:: ops
            for attribute in ("gate_backend", "chain_backend"):
                if hasattr(module, attribute):
                    setattr(module, attribute, "torch")
        self.model.features = ServingFeatureInput(schema, table_weights(model.features), quantize,
                                                  id_maps(model.features))
        dense = schema.dense
        if dense_stats is None and schema.needs_dense_stats:
            raise ValueError("the schema standardises dense features: export needs the training statistics")
        mean = [dense_stats.mean[i] if f.standardized else 0.0 for i, f in enumerate(dense)]
        std = [dense_stats.std[i] if f.standardized else 1.0 for i, f in enumerate(dense)]
        self.register_buffer("log1p", torch.tensor([f.transform.startswith("log1p") for f in dense], dtype=torch.bool))
        self.register_buffer("fill", torch.tensor([float("nan") if f.fill_missing is None else f.fill_missing
                                                   for f in dense], dtype=torch.float64))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64))
        self.eval().requires_grad_(False)  # a serving process keeps no autograd graph

    @property
    def table_bytes(self) -> int:
        """Bytes of the embedding rows."""
        return sum(m.nbytes for m in self.model.features.modules() if isinstance(m, RowStore))

    def transform_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """The schema's transforms in float64, as the training data pipeline computes them; a NaN
        becomes the feature's ``fill_missing`` (and stays NaN without one)."""
        x = dense.double()
        x = torch.where(torch.isnan(x), self.fill, x)
        x = torch.where(self.log1p, torch.log1p(x.clamp_min(0.0)), x)
        return ((x - self.mean) / self.std).float()

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if (weights is None) == self.schema.weighted:
            raise ValueError("the schema's weighted ids need a weights tensor beside values (1 for unweighted ids)"
                             if self.schema.weighted else "the schema has no weighted ids: pass no weights")
        sparse = (values, lengths) if weights is None else (values, lengths, weights)
        logits = self.model(self.transform_dense(dense), sparse)
        return probabilities(self.schema, logits)


def table_weights(features: nn.Module) -> dict[str, torch.Tensor]:
    """``{table: weight}`` of a FeatureInput's tables (plain or fused collections name their
    weights ``...<table>.weight``)."""
    weights = {}
    for name, tensor in features.state_dict().items():
        parts = name.split(".")
        if parts[-1] == "weight" and parts[0] in ("embeddings", "weighted_embeddings", "sequence_embeddings"):
            weights[parts[-2]] = tensor.detach().float().cpu()
    return weights


def id_maps(features: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{table: (sorted raw ids, their rows)}`` of a FeatureInput's managed tables (empty without)."""
    managed = getattr(features, "managed_ids", None)
    if managed is None:
        return {}
    return {table: tuple(t.detach().cpu().clone() for t in rows.id_map()) for table, rows in managed.maps.items()}


def example_inputs(schema: Schema, batch: int = 3) -> tuple[torch.Tensor, ...]:
    """A small valid batch (one id per feature per row, id 0, weight 1) to trace the program with."""
    lengths = torch.ones(len(schema.sparse), batch, dtype=torch.int64)
    dense = torch.zeros(batch, len(schema.dense), dtype=torch.float64)
    weights = (torch.ones(int(lengths.sum())),) if schema.weighted else ()
    return dense, torch.zeros(int(lengths.sum()), dtype=torch.int64), lengths, *weights


def export_program(serving: ServingModel) -> torch.export.ExportedProgram:
    """A ``torch.export`` program with a dynamic batch (1 to ``MAX_BATCH``) and id count; refuses
    one that calls anything but ATen operators."""
    return export_module(serving, example_inputs(serving.schema), input_dims(serving.schema))


def input_dims(schema: Schema) -> dict[str, dict[int, torch.export.Dim] | None]:
    """The dynamic sizes of the ``(dense, values, lengths[, weights])`` inputs: the batch and the id
    count (none without sparse features: ``values`` is then always empty)."""
    batch, ids = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("ids", max=1 << 40)
    weights = {"weights": {0: ids}} if schema.weighted else {}
    return {"dense": {0: batch}, "values": {0: ids} if schema.sparse else None, "lengths": {1: batch}, **weights}


def export_module(module: nn.Module, inputs: tuple, dynamic: dict) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` (non-strict, no autograd), refused if it calls anything but
    ATen operators (no fbgemm, torchrec or lightning_mtr ops)."""
    try:
        with torch.no_grad():
            program = torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False)
    except GuardOnDataDependentSymNode as error:
        raise ExportError(f"torch.export cannot trace {type(module).__name__} where a size is known only when it runs "
                          f"({str(error).splitlines()[0]}); a layer that reads a sequence step by step (e.g. DUPN's "
                          "LSTM) needs max_length on those sequence features, so the program pads them to a fixed "
                          "length") from None
    foreign = sorted(foreign_operators(program))
    if foreign:
        raise ExportError(f"the exported program calls operators outside PyTorch's own (ATen): {foreign}")
    return program


_PYTHON_OPERATORS = {getattr(operator, name) for name in dir(operator) if not name.startswith("_")}


def foreign_operators(program: torch.export.ExportedProgram) -> set[str]:
    """Names of the called functions that are neither ATen operators nor Python's own arithmetic
    on sizes (e.g. ``fbgemm::``, ``torchrec``, ``lightning_mtr::``)."""
    found = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            continue
        if target in _PYTHON_OPERATORS or getattr(target, "__module__", None) in ("torch", "math"):
            continue
        found.add(str(target))
    return found
