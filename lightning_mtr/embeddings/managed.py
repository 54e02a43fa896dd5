"""Managed collisions: raw ids of open-ended id spaces given rows of their own by TorchRec's
``MCHManagedCollisionModule`` (zero-collision hashing with eviction), in front of the tables.

Why not TorchRec's ``ManagedCollisionEmbeddingBagCollection``: it cannot wrap the fused
collection of the one-process path (it asks a ``FusedEmbeddingBagCollection`` for
``embedding_configs``), and its sharder shards the map row-wise only, which TorchRec offers on
GPUs alone (``ManagedCollisionEmbeddingBagCollectionSharder().sharding_types("cpu") == []``),
with one map per shard that fills and evicts apart from the others. Here the map is replicated:
every process holds the whole id -> row map and updates it from the ids of the *global* batch
(``gather``, set by the distributed strategy), so every rank, and one process taking all the
ranks' rows, assigns the same rows; the table behind it is fused or sharded like any other.
The map is a set of buffers, so checkpoints carry it with the model's weights.

A row taken from an evicted id starts afresh for the id that takes it: zero weights and zero
optimizer state, reset through ``reset`` by whoever holds the tables (the training strategy: fused
or sharded, each process its own shard). Zeros, as fbgemm's ``reset_embedding_weight_momentum``
(which TorchRec's sharded managed-collision module calls) writes them, and not a fresh draw: a
draw from the process's random stream would differ between one process and a sharded layout.
Free rows given to new ids keep their initial draw: no id ever read them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, LFU_EvictionPolicy, LRU_EvictionPolicy,
                                         MCHEvictionPolicy, MCHManagedCollisionModule)
from torchrec.sparse.jagged_tensor import JaggedTensor

from lightning_mtr.schema import ID_SPACE, EmbeddingTable, ManagedCollisions


def _policy(config: ManagedCollisions) -> MCHEvictionPolicy:
    if config.eviction_policy == "distance_lfu":
        return DistanceLFU_EvictionPolicy(decay_exponent=config.decay_exponent)
    return {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}[config.eviction_policy]()


class ManagedRows(MCHManagedCollisionModule):
    """One table's id -> row map, buildable on the meta device: ``reset_parameters`` fills the
    buffers TorchRec's constructor filled (every row free, row ``r`` at slot ``r``), and the
    tensors TorchRec keeps beside its buffers follow them when the module moves."""

    def __init__(self, table: EmbeddingTable, device: torch.device):
        config = table.managed_collisions
        super().__init__(zch_size=table.num_embeddings, device=device, eviction_policy=_policy(config),
                         eviction_interval=config.eviction_interval, name=table.name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self._mch_sorted_raw_ids.fill_(ID_SPACE)
        self._mch_remapped_ids_mapping.copy_(torch.arange(self._zch_size, device=self._mch_sorted_raw_ids.device))
        for name in self._mch_metadata:
            getattr(self, f"_mch_{name}").zero_()
        self._mch_slots.fill_(self._zch_size - 1)
        self._delimiter.fill_(ID_SPACE)
        self._output_segments_tensor.fill_(-1)
        self._output_segments_tensor[:2] = torch.tensor([0, self._zch_size])
        self._current_iter_tensor.zero_()
        self._relink()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._relink()
        return module

    def _relink(self) -> None:
        """TorchRec keeps the eviction metadata and the initial output segments in attributes that
        alias its buffers; a move or ``to_empty`` replaces the buffers, so point them again."""
        self._device = self._mch_sorted_raw_ids.device
        self._init_output_segments_tensor = self._output_segments_tensor
        self._mch_metadata = {name: getattr(self, f"_mch_{name}") for name in self._mch_metadata}
        self._input_history_buffer_size = -1  # the history buffers are rebuilt on the new device
        self._current_history_buffer_offset = 0

    def profile(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """TorchRec's, except that its history buffer grows to take every id: TorchRec sizes it once,
        from the first batch, and drops the ids of a later, larger batch without a word (a
        multi-valued feature's ids per batch vary), so they would never get a row."""
        incoming = sum(feature.values().numel() for feature in features.values())
        needed = self._current_history_buffer_offset + incoming
        if self.training and -1 < self._input_history_buffer_size < needed:
            self._grow_history(max(needed, 2 * self._input_history_buffer_size))
        return super().profile(features)

    def _grow_history(self, size: int) -> None:
        """History buffers of ``size`` ids (at least doubled, so a few copies in all), keeping those
        recorded since the last eviction."""
        kept = self._current_history_buffer_offset
        grown = torch.empty(size, dtype=torch.int64, device=self._history_accumulator.device)
        grown[:kept] = self._history_accumulator[:kept]
        self._history_accumulator = grown
        for name, buffer in self._history_metadata.items():
            grown = torch.zeros(size, dtype=buffer.dtype, device=buffer.device)
            grown[:kept] = buffer[:kept]
            setattr(self, f"_history_{name}", grown)
            self._history_metadata[name] = grown
        self._input_history_buffer_size = size

    def id_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw ids [N] sorted, free slots last as 2**63 - 1; the row of each [N])``: the whole map."""
        return self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping

    def rows_in_use(self) -> int:
        return self._zch_size - 1 - int(self.open_slots())


class ManagedIds(nn.Module):
    """``forward(sparse KJT) -> KJT``: the managed tables' features with raw ids replaced by rows
    (an id without a row, e.g. unseen at evaluation, gets the table's last row); other features
    pass unchanged. Training steps update the maps first, from the global batch's ids.

    ``gather``: ``local ids [N] -> every process's ids, concatenated``; None on one process.
    ``reset``: ``(table, rows [K]) -> None``, zeroes the rows' weights and optimizer state;
    called during the forward that evicts, before the lookup. None: nothing to reset (e.g. tables
    that no optimizer updates, as at export).
    ``evicted``: per table, ids that lost their row since :meth:`take_report` last ran.
    """

    def __init__(self, tables: list[EmbeddingTable], device: torch.device | None = None):
        super().__init__()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.maps = nn.ModuleDict({t.name: ManagedRows(t, device) for t in tables})
        self.features = {t.name: list(t.feature_names) for t in tables}
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reset: Callable[[str, torch.Tensor], None] | None = None
        self.evicted = {t.name: 0 for t in tables}

    def reset_parameters(self) -> None:
        for rows in self.maps.values():
            rows.reset_parameters()

    def forward(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = sparse.keys()
        offsets = sparse.offset_per_key()
        values = sparse.values().clone()
        for table, rows in self.maps.items():
            spans = [(offsets[keys.index(f)], offsets[keys.index(f) + 1]) for f in self.features[table]]
            ids = torch.cat([values[start:end] for start, end in spans])
            if self.training:
                self._update(table, rows, ids)
            remapped = rows.remap({table: JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))})
            values[torch.cat([torch.arange(start, end, device=values.device) for start, end in spans])] = \
                remapped[table].values()
        return KeyedJaggedTensor(keys=keys, values=values, lengths=sparse.lengths(),
                                 weights=sparse.weights_or_none(), stride=sparse.stride())

    def _update(self, table: str, rows: ManagedRows, ids: torch.Tensor) -> None:
        """Record the global batch's ids; on an eviction step TorchRec hands back the rows given
        to new ids, of which those that held an id before were taken from it: those are reset."""
        seen = self.gather(ids) if self.gather is not None else ids
        row_of = rows.id_map()[1]  # sorted by raw id: the free slots (2**63 - 1) last, the shared row among them
        free = row_of[row_of.numel() - 1 - int(rows.open_slots()):].clone()
        rows.profile({table: JaggedTensor(values=seen, lengths=seen.new_tensor([seen.numel()]))})
        given = rows.evict()
        if given is None:
            return
        evicted = given[~torch.isin(given, free)]
        self.evicted[table] += evicted.numel()
        if self.reset is not None and evicted.numel():
            with torch.no_grad():
                self.reset(table, evicted)

    def take_report(self) -> dict[str, int]:
        """``{mch/<table>/evicted, mch/<table>/rows_in_use}``, and the eviction counts start again."""
        report = {}
        for table, rows in self.maps.items():
            report[f"mch/{table}/evicted"] = self.evicted[table]
            report[f"mch/{table}/rows_in_use"] = rows.rows_in_use()
            self.evicted[table] = 0
        return report
