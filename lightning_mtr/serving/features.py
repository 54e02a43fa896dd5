"""The feature input of an exported program: plain tensors in, PyTorch's own (ATen) operators only.

Sparse features arrive as one flat ``values`` tensor of row ids and a ``lengths [F, B]`` tensor
(ids per schema sparse feature per row, feature-major, the layout of a KeyedJaggedTensor), and with
weighted ids (``weight_column``) a ``weights [N]`` float32 tensor beside ``values`` (1 for the ids of
features without weights), the layout of TorchRec's weighted KeyedJaggedTensor. The
tables of one embedding dim are stacked into one matrix, as fbgemm's table-batched lookup does,
so a batch costs one gather and one scatter-add per dim instead of one per feature.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_mtr.nn.features import FeatureLayout
from lightning_mtr.schema import EmbeddingTable, Schema
from lightning_mtr.serving.tables import Quantize, RowStore

SparseInput = tuple[torch.Tensor, ...]  # (values [N] int64, lengths [F, B] int64[, weights [N] float32])
_NO_LIMIT = 1 << 62  # a feature without max_length keeps every id


class StackedTables(nn.Module):
    """Tables of one embedding dim in one :class:`RowStore`; ``slot[f]`` is input feature f's block
    in the output (-1: another stack's), ``row_offset[f]`` its table's first row, and
    ``block_inputs[k]`` the input feature of block k."""

    def __init__(self, schema: Schema, tables: list[EmbeddingTable], weights: dict[str, torch.Tensor],
                 quantize: Quantize):
        super().__init__()
        inputs = [f.name for f in schema.sparse]
        self.names = [name for t in tables for name in t.feature_names]
        starts = dict(zip((t.name for t in tables), torch.tensor([0] + [t.num_embeddings for t in tables]).cumsum(0)))
        table_of = {name: t for t in tables for name in t.feature_names}
        self.register_buffer("slot", torch.tensor([self.names.index(n) if n in table_of else -1 for n in inputs]))
        self.register_buffer("row_offset", torch.tensor([int(starts[table_of[n].name]) if n in table_of else 0
                                                         for n in inputs]))
        self.register_buffer("table_rows", torch.tensor([table_of[n].num_embeddings if n in table_of else 0
                                                         for n in inputs]))
        self.register_buffer("mean", torch.tensor([table_of[n].pooling == "mean" for n in self.names]))
        self.register_buffer("block_inputs", torch.tensor([inputs.index(n) for n in self.names], dtype=torch.long))
        self.rows = RowStore(torch.cat([weights[t.name] for t in tables]), quantize)

    def pooled(self, values: torch.Tensor, lengths: torch.Tensor, bag: torch.Tensor, kept: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(names), B, D]``: each feature's ``kept`` ids summed (or averaged) per row, each id's
        row times its weight when ``weights`` are given (a mean then divides by the ids, as TorchRec's)."""
        batch, blocks = lengths.shape[1], len(self.names)
        rows, slot = self._rows(values, bag, batch)
        if weights is not None:
            rows = rows * weights[:, None].to(rows.dtype)
        target = torch.where((slot >= 0) & kept, slot * batch + bag % batch, blocks * batch)  # the rest: a spare row
        summed = rows.new_zeros(blocks * batch + 1, rows.shape[1]).index_add(0, target, rows)[:-1]
        summed = summed.view(blocks, batch, -1)
        counts = lengths[self.block_inputs].clamp_min(1).to(summed.dtype)  # [blocks, B]
        return torch.where(self.mean[:, None, None], summed / counts[:, :, None], summed)

    def padded(self, values: torch.Tensor, lengths: torch.Tensor, bag: torch.Tensor, position: torch.Tensor,
               steps: list) -> list[torch.Tensor]:
        """Per feature ``[B, steps[k], D]``: its rows in order, zero past each row's length (ids
        past ``steps[k]`` are dropped, as training's truncation to ``max_length`` drops them)."""
        batch = lengths.shape[1]
        rows, slot = self._rows(values, bag, batch)
        out = []
        for k, length in enumerate(steps):
            keep = (slot == k) & (position < length)
            target = torch.where(keep, (bag % batch) * length + position, batch * length)
            padded = rows.new_zeros(batch * length + 1, rows.shape[1]).index_add(0, target, rows)[:-1]
            out.append(padded.view(batch, length, -1))
        return out

    def _rows(self, values: torch.Tensor, bag: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        feature = bag // batch
        slot = self.slot[feature]
        # stacked, an id past its table would silently read the next table's rows
        valid = (slot < 0) | ((values >= 0) & (values < self.table_rows[feature]))
        torch._assert_async(valid.all(), "an id is negative or >= its feature's num_embeddings (see manifest.json)")
        rows = self.rows.lookup(torch.where(slot >= 0, values + self.row_offset[feature], 0))
        return rows, slot


class ManagedIdRows(nn.Module):
    """Raw ids of the managed tables -> the rows training gave them (TorchRec's ``_mch_remap`` in
    ATen operators): a binary search in each table's sorted raw ids as the checkpoint left them; an
    id without a row reads the table's last row, as it does when the trained model evaluates; a
    negative one stays negative, for the table lookup to refuse as training's encoder does.
    ``forward(values [N], feature [N]) -> [N]``, other features' ids unchanged."""

    def __init__(self, schema: Schema, maps: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        tables = [t.name for t in schema.managed_tables]
        table_of = {name: k for k, t in enumerate(schema.managed_tables) for name in t.feature_names}
        self.register_buffer("table_of", torch.tensor([table_of.get(f.name, -1) for f in schema.sparse]))
        for k, name in enumerate(tables):
            self.register_buffer(f"sorted_ids_{k}", maps[name][0])
            self.register_buffer(f"rows_{k}", maps[name][1])
        self.count = len(tables)

    def forward(self, values: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        table = self.table_of[feature]
        for k in range(self.count):
            ids, rows = getattr(self, f"sorted_ids_{k}"), getattr(self, f"rows_{k}")
            index = torch.searchsorted(ids[:-1], values)  # the last slot is always free: a miss stops there
            row = torch.where(ids[index] == values, rows[index], ids.shape[0] - 1)
            values = torch.where((table == k) & (values >= 0), row, values)  # negative: refused below
        return values


class ServingFeatureInput(FeatureLayout):
    """:class:`~lightning_mtr.embeddings.FeatureInput`'s outputs from ``(values, lengths)``:
    ``forward(dense, (values, lengths)) -> [B, output_dim]`` and :meth:`sequences`. ``id_maps``:
    ``{table: (sorted raw ids, their rows)}`` of the managed tables (:class:`ManagedIdRows`)."""

    def __init__(self, schema: Schema, weights: dict[str, torch.Tensor], quantize: Quantize = "none",
                 id_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(schema)
        self.managed = ManagedIdRows(schema, id_maps or {}) if schema.managed_tables else None
        self.input_names = [f.name for f in schema.sparse]
        dims = sorted({t.embedding_dim for t in schema.pooled_tables})
        self.stacks = nn.ModuleList(StackedTables(schema, [t for t in schema.pooled_tables if t.embedding_dim == d],
                                                  weights, quantize) for d in dims)
        self.block = {name: (s, stack.names.index(name)) for s, stack in enumerate(self.stacks) for name in stack.names}
        self.sequence_stack = StackedTables(schema, schema.sequence_tables, weights, quantize) \
            if schema.sequence_tables else None
        self.max_length = {f.name: f.max_length for f in schema.sparse if f.sequence}
        self.register_buffer("limit", torch.tensor([f.max_length or _NO_LIMIT for f in schema.sparse],
                                                   dtype=torch.long))

    def forward(self, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
        if not self.feature_names:
            return dense
        values, lengths, bag, position = self._locate(sparse)
        kept = position < self.limit[bag // lengths.shape[1]]
        weights = sparse[2] if len(sparse) > 2 else None
        pooled = [stack.pooled(values, lengths, bag, kept, weights) for stack in self.stacks]
        return torch.cat([dense] + [pooled[s][b] for s, b in (self.block[n] for n in self.feature_names)], dim=1)

    def sequences(self, sparse: SparseInput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """As ``FeatureInput.sequences``: a feature with ``max_length`` is padded to it (the
        models mask the padding, so its length never changes a score, and the program stays
        free of sizes known only at run time where a recurrent layer reads it); one without it,
        to its longest sequence in the batch."""
        if self.sequence_stack is None:
            return {}
        values, lengths, bag, position = self._locate(sparse)
        names = self.sequence_stack.names
        own = lengths[self.sequence_stack.block_inputs]
        steps = [self.max_length[name] or _longest(own[k]) for k, name in enumerate(names)]
        padded = self.sequence_stack.padded(values, lengths, bag, position, steps)
        return {name: (padded[k], own[k]) for k, name in enumerate(names)}

    def _locate(self, sparse: SparseInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, lengths cut to max_length, each id's bag feature * B + row, its place in
        the bag)``: ids past a feature's ``max_length`` are dropped, as the training reader
        drops them, so a client may send whole lists."""
        values, lengths = sparse[:2]
        flat = lengths.reshape(-1)
        bag = torch.repeat_interleave(torch.arange(flat.shape[0], device=values.device), flat,
                                      output_size=values.shape[0])
        position = torch.arange(values.shape[0], device=values.device) - (torch.cumsum(flat, 0) - flat)[bag]
        if self.managed is not None:
            values = self.managed(values, bag // lengths.shape[1])
        return values, lengths.clamp_max(self.limit[:, None]), bag, position


def _longest(lengths: torch.Tensor) -> int:
    """The longest sequence in the batch, at least 1: a size known only when the program runs."""
    steps = lengths.max().clamp_min(1).item()
    torch._check(steps > 0)
    return steps
