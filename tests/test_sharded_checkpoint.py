"""Sharded checkpoint files: weights-only loading, the supported resharding moves, and the
split of a trainer state into DCP tensors and plain values (no processes needed)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_mtr.cli import main
from lightning_mtr.training.distributed.checkpoint import (
    check_reshard, merge_tensors, read_full, save, split_tensors)


def _plan(**tables: tuple[str, list[int]]) -> dict:
    """A plan JSON with one shard per rank over a 10 x 8 table (column-wise: 4 columns each)."""
    def shards(kind, ranks):
        if kind == "column_wise":
            return [{"offsets": [0, 4 * i], "sizes": [10, 4], "rank": r} for i, r in enumerate(ranks)]
        return [{"offsets": [0, 0], "sizes": [10, 8], "rank": r} for r in ranks]
    return {"format": "lightning-mtr-plan/1", "modules": {"features.embeddings": {
        name: {"sharding_type": kind, "compute_kernel": "dense" if kind == "data_parallel" else "fused",
               "ranks": ranks, "shards": shards(kind, ranks)} for name, (kind, ranks) in tables.items()}}}


@pytest.mark.parametrize(("before", "after"), [
    (("table_wise", [1]), ("table_wise", [0])),
    (("table_wise", [1]), ("row_wise", [0, 1])),
    (("row_wise", [0, 1]), ("table_wise", [0])),
    (("data_parallel", [0, 1]), ("data_parallel", [0])),
    (("column_wise", [0, 1]), ("column_wise", [0, 1])),
])
def test_supported_moves_pass(before, after):
    check_reshard(_plan(user=before), _plan(user=after), "advice")


@pytest.mark.parametrize(("before", "after", "reason"), [
    (("data_parallel", [0, 1]), ("table_wise", [0]), "optimizer state lives in different places"),
    (("table_wise", [0]), ("data_parallel", [0]), "optimizer state lives in different places"),
    (("column_wise", [0, 1]), ("table_wise", [0]), "column-wise optimizer state cannot be resharded"),
    (("column_wise", [0, 1]), ("column_wise", [1, 0]), "column-wise optimizer state cannot be resharded"),
])
def test_unsupported_moves_are_refused_by_table(before, after, reason):
    with pytest.raises(ValueError, match=reason) as error:
        check_reshard(_plan(user=before, item=("table_wise", [0])), _plan(user=after, item=("table_wise", [1])),
                      "what the strategy offers")
    assert "user:" in str(error.value) and "item:" not in str(error.value)
    assert str(error.value).endswith("\nwhat the strategy offers")


def test_split_and_merge_round_trip_keeps_only_tensors_apart():
    state = {"model": {"w": torch.ones(2)}, "optimizers": [{"state": {"w": {"step": torch.tensor(3.0)}},
                                                             "param_groups": [{"lr": 0.1, "params": ["w"],
                                                                               "foreach": None}]}],
             "empty": {}, "nested": {"none": None, "inner": {}}, "list": [torch.zeros(1), None, 2], "epoch": 4}
    tensors, plain = split_tensors(state)
    assert tensors == {"model": {"w": state["model"]["w"]},
                       "optimizers": {"0": {"state": {"w": {"step": state["optimizers"][0]["state"]["w"]["step"]}}}},
                       "list": {"0": state["list"][0]}}
    assert not any(isinstance(v, torch.Tensor) for v in _leaves(plain))
    assert merge_tensors(tensors, plain) == state


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def _checkpoint(path):
    save({"model": {"model.w": torch.arange(6.0).view(2, 3)}}, {"plain": {"model": {}}, "plan": _plan(),
                                                                  "world_size": 1, "epoch": 0}, path, True)


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    _checkpoint(tmp_path / "ckpt")
    save({"model": {"model.w": torch.ones(1)}}, {"plain": {"model": {}}, "plan": _plan(), "world_size": 1,
                                                  "epoch": 1}, tmp_path / "ckpt", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no staging or previous copy left behind"
    torch.testing.assert_close(read_full(tmp_path / "ckpt")["model"]["model.w"], torch.ones(1))


def test_checkpoint_reads_back_whole(tmp_path):
    _checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(read_full(tmp_path / "ckpt")["model"]["model.w"], torch.arange(6.0).view(2, 3))
    out = tmp_path / "single.ckpt"
    assert main(["consolidate", str(tmp_path / "ckpt"), str(out)]) == 0
    single = torch.load(out, weights_only=True)
    assert list(single["state_dict"]) == ["model.w"] and single["epoch"] == 0


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_metadata_naming_other_code_is_refused(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        read_full(tmp_path / "ckpt")
    assert main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "out.ckpt")]) == 2
    assert "refusing" in capsys.readouterr().err and not (tmp_path / "out.ckpt").exists()


def _global_call(module: str, name: str, *strings: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(*strings)`` (protocol 4 resolves dotted names)."""
    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw
    return (b"\x80\x04" + text(module) + text(name) + b"\x93" + b"(" + b"".join(map(text, strings))
            + b"tR.")


@pytest.mark.parametrize(("module", "name", "args"), [
    # a dotted name walking from an allowed DCP module to a function it imports
    ("torch.distributed.checkpoint.filesystem", "os.system", ("touch {marker}",)),
    # a plain DCP function that would torch.load(weights_only=False) a file shipped with the checkpoint
    ("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp", ("{marker}.pt", "{marker}.out")),
])
def test_metadata_gadgets_in_allowed_modules_are_refused(tmp_path, module, name, args):
    _checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(
        _global_call(module, name, *(a.format(marker=marker) for a in args)))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_full(tmp_path / "ckpt")
    assert not marker.exists() and not (tmp_path / "ran.out").exists()


def test_pickled_objects_inside_a_checkpoint_are_refused(tmp_path):
    """DCP would store a non-tensor value as a pickle and load it with weights_only=False."""
    _checkpoint(tmp_path / "ckpt")
    dcp.save({"model": {"model.w": torch.ones(1)}, "note": {"any": "object"}},
             storage_writer=dcp.FileSystemWriter(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="pickled objects"):
        read_full(tmp_path / "ckpt")


def test_consolidate_names_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["consolidate", str(tmp_path), str(tmp_path / "out.ckpt")]) == 2
    assert "not a lightning-mtr checkpoint directory" in capsys.readouterr().err
