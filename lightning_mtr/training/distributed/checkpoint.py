"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory: every rank writes the tensors it holds (its embedding shards,
their fused optimizer state, and, from rank 0, the replicated dense weights), so no rank
ever gathers a whole table; ``trainer.pt`` holds Lightning's loop and callback state and
the sharding plan. Loading reads only tensors (``weights_only``) and a metadata file whose
unpickler accepts DCP's own metadata classes and nothing else. DCP reshards on load, which
is how a checkpoint saved by N processes resumes on M.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

TRAINER_STATE = "trainer.pt"
PLAN_FILE = "sharding_plan.json"
# fused optimizer state cannot follow these tables to another layout (see check_reshard)
_NOT_RESHARDABLE = ("column_wise", "table_column_wise")
CHECKPOINT_FORMAT = "lightning-mtr-sharded/1"
# Everything DCP's .metadata pickle names, exactly (never a module prefix: a prefix admits any
# function that module imports, and dotted names walk attributes, e.g. "<module>.os.system")
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
     ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}
_TORCH_VALUES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "strided", "contiguous_format", "preserve_format", "channels_last"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the path and what is wrong with it."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or module == "torch" and name in _TORCH_VALUES:
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


def save(tensors: Mapping[str, Any], trainer_state: dict[str, Any], path: Path, is_global_zero: bool,
         barrier: Callable[[], None] = lambda: None) -> None:
    """Every rank writes its tensors; rank 0 also writes the trainer state (plain values only).

    Written beside ``path`` and renamed over it at the end, so a run killed while saving (the
    preemption a resume is for) leaves the previous checkpoint whole rather than mixed files.
    """
    staging = path.with_name(f"{path.name}.partial")
    if is_global_zero:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    staging.mkdir(parents=True, exist_ok=True)
    dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(staging))  # returns once every rank wrote
    if is_global_zero:
        torch.save({"format": CHECKPOINT_FORMAT, **trainer_state}, staging / TRAINER_STATE)
        previous = path.with_name(f"{path.name}.previous")
        if path.exists():
            path.rename(previous)
        staging.rename(path)
        if previous.is_dir() and not previous.is_symlink():  # a link (last.ckpt) goes, not what it links to
            shutil.rmtree(previous)
        elif previous.exists():
            previous.unlink()
    barrier()


def load_trainer_state(path: Path) -> dict[str, Any]:
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a lightning-mtr checkpoint directory (no {TRAINER_STATE})")
    state = load_file(path / TRAINER_STATE)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    try:
        _checked_reader(path)  # its tensors' metadata, vetted before anything is built on it
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: unreadable tensor metadata ({_first_line(error)})") from error
    return state


def read_state(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds besides its tensors (a directory: ``trainer.pt``; a single file:
    everything), read weights-only, every way it can be unusable raised as one
    :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        return load_trainer_state(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    state = load_file(path)
    if not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (it holds no state_dict)")
    return state


def load_file(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a file someone was handed. torch's unpickler fails in
    many ways on a damaged file (EOFError when empty, OSError when truncated, IndexError or an
    unsupported opcode on random bytes), so any failure is this file being unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (see the docstring)
        named = re.search(r"unsupported GLOBAL (\S+)", str(error))
        if named:
            raise CheckpointError(f"{path} names code ({named[1]}), which lightning-mtr checkpoints never do; "
                                  "refusing to load it") from error
        raise CheckpointError(f"{path}: not a readable checkpoint (empty, truncated or not written by torch.save: "
                              f"{_first_line(error)})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _checked_reader(path: str | Path) -> SafeFileSystemReader:
    """A reader whose metadata was vetted here, so a refusal surfaces as itself rather than
    wrapped in DCP's per-rank exception."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()
    return reader


@contextmanager
def _reading_tensors(path: str | Path) -> Iterator[None]:
    """DCP reports a damaged, truncated or foreign ``*.distcp`` file as a ``CheckpointException``
    holding every failed rank's traceback (a ``BaseException``, past the CLI's one-line errors):
    it becomes one :class:`CheckpointError` naming the directory and the first failure."""
    try:
        yield
    except CheckpointException as error:
        rank, (cause, _) = next(iter(error.failures.items()))
        first = _first_line(cause).split(". ")[0]
        raise CheckpointError(f"{path}: unreadable tensor data (a *.distcp file is damaged, truncated or not "
                              f"written by torch.distributed.checkpoint; rank {rank}: {first}): use another "
                              "checkpoint of the run (last.ckpt or an earlier one)") from None


def load(tensors: dict[str, Any], path: Path) -> None:
    """Fill ``tensors`` (this rank's live tensors and shards) in place from the checkpoint."""
    with _reading_tensors(path):
        dcp.load(tensors, storage_reader=_checked_reader(path))


def read_full(path: str | Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The tensors of a sharded checkpoint (all, or those under ``keys``), whole, in one
    process (no process group)."""
    state: dict[str, Any] = {}
    with _reading_tensors(path):
        _load_state_dict(state, storage_reader=_checked_reader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                         no_dist=True)
    return state


def consolidate(path: str | Path, output: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as one single-process Lightning checkpoint file: whole tables and
    dense weights under ``state_dict``, plus the loop, callback and data-module state (dense
    statistics), without optimizer state. It evaluates, predicts and exports on one process;
    continuing *training* resumes from the checkpoint directory."""
    if Path(output).is_dir():
        raise CheckpointError(f"{output} is a directory: consolidate writes one file "
                              f"(e.g. {Path(output) / 'single.ckpt'})")
    single = read_consolidated(path)
    torch.save(single, output)
    return single


def read_consolidated(path: str | Path) -> dict[str, Any]:
    """What :func:`consolidate` writes, in memory."""
    state = load_trainer_state(Path(path))
    merged = merge_tensors(read_full(path, keys={"model"}), state.pop("plain"))  # no optimizer state
    single = {k: v for k, v in state.items() if k not in ("format", "plan", "world_size")}
    single["state_dict"] = merged["model"]
    single["sharded_from"] = {"world_size": state["world_size"], "plan": state["plan"]}
    return single


def consolidate_main(argv: list[str]) -> int:
    """A sharded checkpoint directory as one file that one process evaluates, predicts and exports.

    ``lightning-mtr consolidate CHECKPOINT_DIR OUTPUT.ckpt``"""
    parser = argparse.ArgumentParser(prog="lightning-mtr consolidate", description=consolidate.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory (SingleProcessStrategy's or TorchRecStrategy's)")
    parser.add_argument("output", help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    try:
        single = consolidate(args.checkpoint, args.output)
    except CheckpointError as error:
        print(f"lightning-mtr consolidate: error: {error}", file=sys.stderr)
        return 2
    sizes = sum(t.numel() for t in single["state_dict"].values())
    print(f"wrote {args.output}: {len(single['state_dict'])} tensors, {sizes:,} values, "
          f"from {single['sharded_from']['world_size']} processes")
    return 0


_TENSOR = object()  # a tensor's place in the plain half: never a real value, unlike None


def split_tensors(tree: Any) -> tuple[Any, Any]:
    """Split a nested dict/list into its tensors and everything else, same structure, so DCP
    stores only tensors and the rest travels in ``trainer.pt`` (loaded weights-only)."""
    if isinstance(tree, dict | list):
        items = tree.items() if isinstance(tree, dict) else ((str(i), v) for i, v in enumerate(tree))
        pairs = {k: split_tensors(v) for k, v in items}
        tensors = {k: t for k, (t, _) in pairs.items() if t is not None} or None  # DCP keeps no empty dicts
        if isinstance(tree, list):
            return tensors, [None if p is _TENSOR else p for _, p in pairs.values()]
        return tensors, {k: p for k, (_, p) in pairs.items() if p is not _TENSOR}
    if isinstance(tree, torch.Tensor):
        return tree, _TENSOR
    return None, tree


def merge_tensors(tensors: Any, plain: Any) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(plain, list):
        return [merge_tensors((tensors or {}).get(str(i)), p) for i, p in enumerate(plain)]
    if isinstance(plain, dict) or isinstance(tensors, dict):
        plain, tensors = plain or {}, tensors or {}
        return {k: merge_tensors(tensors.get(k), plain.get(k)) for k in {**plain, **tensors}}
    return tensors if tensors is not None else plain


def saved_part(tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """The part of ``tensors`` (this rank's load targets) that the checkpoint holds: a fresh
    optimizer's state is created for every parameter, a saved one has none for a parameter that
    never had a gradient."""
    saved = set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)

    def keep(tree: Any, prefix: str) -> Any:
        if not isinstance(tree, dict):
            return tree if prefix in saved else None
        kept = {k: keep(v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    return keep(tensors, "") or {}


def saved_shapes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of each model tensor a checkpoint holds (a directory's, from its DCP metadata,
    without reading the tensors; a single file's ``state_dict``), by ``state_dict`` key."""
    if not path.is_dir():
        return {key: tuple(value.shape) for key, value in state["state_dict"].items()}
    metadata = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    return {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.items() if key.startswith("model.")}


def check_fits(module: nn.Module, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose weights are not ``module``'s (a table resized or a feature added in
    the schema since), naming them, before a load fails on the first one deep inside DCP."""
    problems = []
    for key, tensor in module.state_dict().items():
        if key not in shapes:
            problems.append(f"{key} is not in it")
        elif shapes[key] != tuple(tensor.size()):
            problems.append(f"{key} is {shapes[key]}, the model's {tuple(tensor.size())}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model ({len(problems)} tensors differ: "
                              f"{'; '.join(problems[:3])}): start from a checkpoint of this model and schema")


def copy_whole(module: nn.Module, full: Mapping[str, torch.Tensor], path: Path) -> None:
    """Whole tensors (a single-file checkpoint's ``state_dict``) into ``module``, whose tables may
    be sharded: each rank copies its shards' slices."""
    live = module.state_dict()
    missing, unexpected = sorted(set(live) - set(full)), sorted(set(full) - set(live))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, target in live.items():
            if not hasattr(target, "local_shards"):
                target.copy_(full[key])
                continue
            for shard in target.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                             shard.metadata.shard_sizes))
                shard.tensor.copy_(full[key][index])


def check_reshard(saved: dict[str, Any], current: dict[str, Any], advice: str) -> None:
    """Refuse the table moves whose optimizer state TorchRec cannot carry over.

    Supported: any table between table-wise, row-wise and table-row-wise layouts on any
    number of processes, and data-parallel to data-parallel. Not supported: a table moving
    between data-parallel (state in a torch optimizer) and a fused layout (state inside
    fbgemm), and a column-wise table whose shards change (its per-shard row-wise optimizer
    state does not reassemble). ``advice`` ends the refusal: what the running strategy offers.
    """
    problems = []
    for module, tables in current["modules"].items():
        for table, now in tables.items():
            before = saved["modules"].get(module, {}).get(table)
            if before is None:
                problems.append(f"{table}: not in the checkpoint")
                continue
            kinds = before["sharding_type"], now["sharding_type"]
            if (kinds[0] == "data_parallel") != (kinds[1] == "data_parallel"):
                problems.append(f"{table}: {kinds[0]} -> {kinds[1]} (optimizer state lives in different places)")
            elif set(kinds) & set(_NOT_RESHARDABLE) and before["shards"] != now["shards"]:
                problems.append(f"{table}: {kinds[0]} -> {kinds[1]} with different shards "
                                "(column-wise optimizer state cannot be resharded)")
    if problems:
        raise ValueError("cannot resume this checkpoint with the current sharding plan:\n  " + "\n  ".join(problems) +
                         "\n" + advice)
