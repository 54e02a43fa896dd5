"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory: every rank writes the tensors it holds (its embedding shards,
their fused optimizer state, and, from rank 0, the replicated dense weights), so no rank
ever gathers a whole table; ``trainer.pt`` holds Lightning's loop and callback state and
the sharding plan. Loading reads only tensors (``weights_only``) and a metadata file whose
unpickler accepts DCP's own metadata classes and nothing else. DCP reshards on load, which
is how a checkpoint saved by N processes resumes on M.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

TRAINER_STATE = "trainer.pt"
CHECKPOINT_FORMAT = "lightning-mtr-sharded/1"
# what DCP's .metadata pickle may name: its own dataclasses and torch's value types
_SAFE_MODULES = ("torch.distributed.checkpoint.",)
_SAFE_TORCH = {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool",
               "strided", "contiguous_format", "preserve_format", "channels_last"}


_SAFE_NAMES = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module == "torch" and name in _SAFE_TORCH or (module, name) in _SAFE_NAMES
                or module.startswith(_SAFE_MODULES)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}; refusing to load it")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader, with the ``.metadata`` pickle limited to DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} is not DCP metadata")
        if any(isinstance(item, BytesStorageMetadata) for item in metadata.state_dict_metadata.values()):
            raise ValueError(f"{self.path} holds pickled objects besides tensors; lightning-mtr never writes "
                             "those and will not load them")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TRAINER_STATE).is_file()


def save(tensors: Mapping[str, Any], trainer_state: dict[str, Any], path: Path, is_global_zero: bool) -> None:
    """Every rank writes its tensors; rank 0 also writes the trainer state (plain values only)."""
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(path))
    if is_global_zero:
        torch.save({"format": CHECKPOINT_FORMAT, **trainer_state}, path / TRAINER_STATE)


def load_trainer_state(path: Path) -> dict[str, Any]:
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a lightning-mtr sharded checkpoint (no {TRAINER_STATE})")
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def load(tensors: dict[str, Any], path: Path) -> None:
    """Fill ``tensors`` (this rank's live tensors and shards) in place from the checkpoint."""
    dcp.load(tensors, storage_reader=SafeFileSystemReader(path))


def read_full(path: str | Path) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint, whole, in one process (no process group)."""
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state
