"""``lightning-mtr export``: every registered model as a torch.export program of ATen ops only that
scores as the model does, with quantised tables, dense transforms inside, a checked artifact, and
a torch-only process that loads and runs it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from helpers import ESMM_TASKS, random_inputs, tiny_schema
from test_models import SMALL, TASKS, _schema
from lightning_mtr.data.encode import DenseStats
from lightning_mtr.models import MODELS, build_model
from lightning_mtr.nn import MixtureBottom
from lightning_mtr.schema import Schema
from lightning_mtr.serving.artifact import ArtifactError, load_artifact, write_manifest
from lightning_mtr.serving.checkpoint import build_trained, load_run
from lightning_mtr.serving.features import ServingFeatureInput
from lightning_mtr.serving.program import (
    ExportError, ServingModel, export_program, foreign_operators,
)
from lightning_mtr.tasks.scores import probabilities
from lightning_mtr.serving.tables import RowStore, pack_int4, quantize_rows, unpack_int4
from lightning_mtr.training.distributed.checkpoint import CheckpointError

BLOCKED = ("torchrec", "fbgemm_gpu", "lightning", "lightning_mtr")


def _program_inputs(schema: Schema, batch: int, seed: int = 0):
    dense, sparse = random_inputs(schema, batch, seed)
    return dense, sparse, (dense.double(), sparse.values(), sparse.lengths().view(len(schema.sparse), -1).long())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every registered model, small, with random weights: (schema, model, program saved and loaded)."""
    root = tmp_path_factory.mktemp("programs")
    built = {}
    for name in sorted(MODELS):
        torch.manual_seed(0)
        schema = _schema(name)
        model = build_model(name, schema, **SMALL[name]).eval()
        program = export_program(ServingModel(model, schema, None))
        torch.export.save(program, root / f"{name}.pt2")
        built[name] = (schema, model, program, torch.export.load(root / f"{name}.pt2").module())
    return built


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("batch", [1, 7])
def test_every_model_round_trips_and_scores_as_trained(exported, name, batch):
    schema, model, program, loaded = exported[name]
    dense, sparse, inputs = _program_inputs(schema, batch, seed=batch)
    with torch.no_grad():
        expected = probabilities(schema, model(dense, sparse))
        scores = loaded(*inputs)
    assert list(scores) == list(expected)
    for output, value in expected.items():
        assert scores[output].shape == (batch,)
        torch.testing.assert_close(scores[output], value, atol=1e-6, rtol=0, msg=output)


@pytest.mark.parametrize("name", sorted(set(SMALL) - {"dupn"}))  # DUPN's schema has them already
def test_every_model_exports_beside_sequence_features(name):
    """Sequence features in the schema (looked up unpooled, padded to max_length) change nothing
    for models that do not read them, and NFwFM reads them as bags."""
    torch.manual_seed(0)
    schema = tiny_schema(tasks=TASKS.get(name, ("ctr", "cvr", "ctcvr")), sequences=True)
    model = build_model(name, schema, **SMALL[name]).eval()
    dense, sparse, inputs = _program_inputs(schema, 6, seed=4)
    with torch.no_grad():
        expected = probabilities(schema, model(dense, sparse))
        scores = export_program(ServingModel(model, schema, None)).module()(*inputs)
    for output, value in expected.items():
        torch.testing.assert_close(scores[output], value, atol=1e-6, rtol=0, msg=output)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_program_calls_aten_operators_only(exported, name):
    program = exported[name][2]
    assert foreign_operators(program) == set()
    code = program.graph_module.code
    for namespace in ("fbgemm", "torchrec", "lightning_mtr"):
        assert namespace not in code


def test_one_program_takes_batches_from_1_to_16384(exported):
    schema, model, _, loaded = exported["mmoe"]
    dense, sparse, inputs = _program_inputs(schema, 16384)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs)["ctr"], torch.sigmoid(model(dense, sparse)["ctr"]), atol=1e-6,
                                   rtol=0)


def test_an_unknown_operator_is_named():
    class Custom(torch.nn.Module):
        def forward(self, x):
            return torch.ops.lightning_mtr.gate_mix(x, x)[0]

    import lightning_mtr.kernels  # noqa: F401  (registers the op)
    program = torch.export.export(Custom(), (torch.randn(2, 3, 4),))
    assert foreign_operators(program) == {"lightning_mtr.gate_mix.default"}


def test_outputs_of_every_task_kind():
    schema = tiny_schema(tasks=({"name": "click", "label": "click"},
                                {"name": "genre", "label": "genre", "kind": "multiclass", "num_classes": 3},
                                {"name": "watch", "label": "watch", "kind": "regression"}))
    torch.manual_seed(0)
    model = build_model("mmoe", schema, **SMALL["mmoe"]).eval()
    dense, sparse, inputs = _program_inputs(schema, 5)
    scores = export_program(ServingModel(model, schema, None)).module()(*inputs)
    assert list(scores) == ["click", "genre_0", "genre_1", "genre_2", "watch"]
    with torch.no_grad():
        logits = model(dense, sparse)
    torch.testing.assert_close(scores["watch"], logits["watch"], atol=1e-6, rtol=0)  # a value, not squashed
    by_hand = torch.exp(logits["genre"]) / torch.exp(logits["genre"]).sum(dim=1, keepdim=True)
    torch.testing.assert_close(torch.stack([scores[f"genre_{c}"] for c in range(3)], 1), by_hand, atol=1e-6, rtol=0)


def test_dense_transforms_run_inside_the_program():
    """Raw values in; log1p(max(x, 0)), then (v - mean) / std, then NaN -> fill_missing, by hand."""
    schema = Schema.from_dict({
        "sparse": [{"name": "user", "num_embeddings": 5, "embedding_dim": 4}],
        "dense": [{"name": "price", "transform": "log1p_standardize"}, {"name": "age", "transform": "standardize"},
                  {"name": "views", "transform": "log1p", "fill_missing": 3.0}, {"name": "raw"}],
        "tasks": [{"name": "ctr", "label": "click"}]})
    stats = DenseStats(mean=(1.5, 40.0, 9.0, 9.0), std=(0.5, 10.0, 9.0, 9.0))
    serving = ServingModel(build_model("shared_bottom", schema, bottom=[4], tower=[4]), schema, stats)
    raw = torch.tensor([[np.e - 1, 50.0, float("nan"), -2.0], [-5.0, 20.0, 0.0, 1e9 + 0.5]], dtype=torch.float64)
    expected = torch.tensor([[(1.0 - 1.5) / 0.5, 1.0, np.log(4.0), -2.0],
                             [(0.0 - 1.5) / 0.5, -2.0, 0.0, 1e9 + 0.5]], dtype=torch.float32)
    torch.testing.assert_close(serving.transform_dense(raw), expected, atol=1e-6, rtol=1e-7)


def test_stacked_tables_equal_torchrec_lookups_for_mixed_dims_mean_pooling_empty_bags_and_max_length():
    """Raw lists in: ids past a feature's max_length are dropped by the program as the training
    reader drops them (`b` keeps 1 of up to 2 ids, `t` 1), so the expectation is TorchRec's
    lookup of the lists cut by hand."""
    schema = Schema.from_dict({
        "sparse": [{"name": "a", "num_embeddings": 7, "embedding_dim": 4, "multi_valued": True},
                   {"name": "b", "num_embeddings": 9, "embedding_dim": 8, "pooling": "mean", "multi_valued": True,
                    "max_length": 1},
                   {"name": "c", "num_embeddings": 7, "embedding_dim": 4, "table": "a", "multi_valued": True},
                   {"name": "s", "num_embeddings": 6, "embedding_dim": 4, "sequence": True},
                   {"name": "t", "num_embeddings": 6, "embedding_dim": 4, "sequence": True, "table": "s",
                    "max_length": 1}],
        "dense": [{"name": "d"}], "tasks": [{"name": "ctr", "label": "click"}]})
    from lightning_mtr.embeddings import FeatureInput
    from lightning_mtr.serving.program import table_weights
    torch.manual_seed(0)
    trained = FeatureInput(schema)
    serving = ServingFeatureInput(schema, table_weights(trained))
    dense, sparse = random_inputs(schema, 6, seed=3)
    values, lengths = sparse.values(), sparse.lengths().view(len(schema.sparse), -1).long()
    assert (lengths == 0).any() and (lengths[[1, 4]] == 2).any(), "empty bags, and lists longer than max_length"
    cut = _cut_to_max_length(schema, values, lengths)
    torch.testing.assert_close(serving(dense, (values, lengths)), trained(dense, cut), atol=1e-6, rtol=0)
    for name, (padded, own) in trained.sequences(cut).items():
        got, got_lengths = serving.sequences((values, lengths))[name]
        assert torch.equal(got_lengths, own)
        steps = padded.shape[1]
        torch.testing.assert_close(got[:, :steps], padded, atol=1e-6, rtol=0)  # t is padded to its max_length
        assert not got[:, steps:].any()


def _cut_to_max_length(schema: Schema, values: torch.Tensor, lengths: torch.Tensor):
    """The KeyedJaggedTensor of the bags' first max_length ids, bag by bag."""
    from torchrec import KeyedJaggedTensor
    bags = values.split(lengths.reshape(-1).tolist())
    limits = [f.max_length or 10**9 for f in schema.sparse for _ in range(lengths.shape[1])]
    kept = [bag[:limit] for bag, limit in zip(bags, limits)]
    return KeyedJaggedTensor(keys=[f.name for f in schema.sparse], values=torch.cat(kept),
                             lengths=torch.tensor([len(bag) for bag in kept]))


def test_int8_and_int4_rows_by_hand():
    row = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.5]])
    codes, scale_bias = quantize_rows(row, 8)
    assert scale_bias.dtype == torch.float16
    assert scale_bias[0].tolist() == [pytest.approx(3 / 255, rel=1e-3), 0.0]
    assert codes[0].tolist() == [0, 85, 170, 255, 128]  # round(x / (3 / 255)) with the fp16 scale
    codes4, _ = quantize_rows(row, 4)
    assert codes4[0].tolist() == [0, 5, 10, 15, 8]
    packed = pack_int4(codes4)
    assert packed.tolist() == [[0 | 5 << 4, 10 | 15 << 4, 8]]
    assert torch.equal(unpack_int4(packed, 5), codes4)
    weight = torch.randn(100, 16)
    for quantize, bits, size in (("int8", 8, 20), ("int4", 4, 12)):
        store = RowStore(weight, quantize)
        assert store.nbytes == 100 * size  # 16 codes of `bits`, plus an fp16 scale and bias
        error = (store.lookup(torch.arange(100)) - weight).abs()
        span = weight.max(1).values - weight.min(1).values
        assert (error <= span[:, None] / (2**bits - 1) / 2 * 1.01 + 1e-3).all()
    assert RowStore(weight).nbytes == 100 * 64


def test_youtube_position_cannot_change_a_score(exported):
    schema, _, _, loaded = exported["youtube"]  # position_features: [user]
    dense, sparse, (raw, values, lengths) = _program_inputs(schema, 9)
    moved = values.clone()
    first = int(lengths[0].sum())  # `user` is the first sparse feature: its ids come first
    moved[:first] = (moved[:first] + 7) % 50
    with torch.no_grad():
        assert not torch.equal(moved, values)
        for output, score in loaded(raw, values, lengths).items():
            torch.testing.assert_close(loaded(raw, moved, lengths)[output], score, atol=0, rtol=0)


def test_a_torch_only_process_loads_and_scores_the_program(exported, tmp_path):
    """The program runs where only torch is importable: torchrec, fbgemm_gpu, lightning and
    lightning_mtr are blocked in the fresh process's import system."""
    schema, model, program, _ = exported["dupn"]
    dense, sparse, inputs = _program_inputs(schema, 11)
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        program = torch.export.load(sys.argv[1]).module()
        with torch.no_grad():
            scores = program(*torch.load(sys.argv[2], weights_only=True))
        torch.save(scores, sys.argv[3])
        print(sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt2"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "scores.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    scores = torch.load(tmp_path / "scores.pt", weights_only=True)
    with torch.no_grad():
        for output, value in probabilities(schema, model(dense, sparse)).items():
            torch.testing.assert_close(scores[output], value, atol=1e-6, rtol=0)


def test_a_tampered_or_truncated_artifact_is_refused(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"program bytes")
    write_manifest(tmp_path, {"outputs": []})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == {"model.pt2": hashlib.sha256(b"program bytes").hexdigest()}
    assert manifest["format"] == "lightning-mtr-artifact/1"
    (tmp_path / "model.pt2").write_bytes(b"program byteZ")
    with pytest.raises(ArtifactError, match="model.pt2: sha256 differs"):
        load_artifact(tmp_path)
    (tmp_path / "model.pt2").write_bytes(b"program")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_artifact(tmp_path)
    (tmp_path / "model.pt2").unlink()
    with pytest.raises(ArtifactError, match="model.pt2: missing"):
        load_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)


def test_a_recurrent_sequence_without_max_length_is_refused_with_the_fix():
    schema = tiny_schema(tasks=("ctr",), sequences=True)
    schema = Schema(tasks=schema.tasks, dense=schema.dense,
                    sparse=tuple(replace(f, max_length=None) if f.sequence else f for f in schema.sparse))
    model = build_model("dupn", schema, **SMALL["dupn"]).eval()
    with pytest.raises(ExportError, match="needs max_length on those sequence features"):
        export_program(ServingModel(model, schema, None))


@pytest.mark.parametrize("bad", [-1, 30], ids=["negative", "past_the_table"])
def test_an_id_outside_its_table_stops_the_program(exported, bad):
    """`item` (30 rows) is stacked before `user`'s table: an id of 30 would read a `user` row."""
    schema, _, _, loaded = exported["mmoe"]
    _, _, (dense, values, lengths) = _program_inputs(schema, 4)
    item = [f.name for f in schema.sparse].index("item")
    values = values.clone()
    values[int(lengths[:item].sum())] = bad  # the first id of `item`
    with pytest.raises(RuntimeError, match="negative or >= its feature's num_embeddings"):
        loaded(dense, values, lengths)


def test_quality_of_every_task_kind_by_hand():
    """What a quantised program is held to: AUC (binary), macro AUC (multiclass), the AUC of
    relevance > 0 (ranking), R^2 (regression), each on its sample space."""
    from lightning_mtr.serving.export import _quality
    schema = Schema.from_dict({"tasks": [
        {"name": "click", "label": "click", "sample_space": "shown == 1"},
        {"name": "rank", "label": "rel", "kind": "ranking", "group": "q"},
        {"name": "watch", "label": "watch", "kind": "regression"},
        {"name": "genre", "label": "genre", "kind": "multiclass", "num_classes": 2}]})
    scores = {"click": torch.tensor([0.9, 0.2, 0.6, 0.1]), "rank": torch.tensor([3.0, 1.0, 2.0, 0.5]),
              "watch": torch.tensor([1.0, 2.0, 3.0, 5.0]), "genre_0": torch.tensor([0.8, 0.3, 0.6, 0.1]),
              "genre_1": torch.tensor([0.2, 0.7, 0.4, 0.9])}
    labels = {"click": torch.tensor([1.0, 0.0, 0.0, 1.0]), "rank": torch.tensor([2.0, 0.0, 1.0, 0.0]),
              "watch": torch.tensor([1.0, 2.0, 3.0, 4.0]), "genre": torch.tensor([0.0, 1.0, 1.0, 1.0])}
    masks = {"click": torch.tensor([True, True, True, False]), **{t: torch.ones(4, dtype=torch.bool)
                                                                   for t in ("rank", "watch", "genre")}}
    quality = _quality(schema, scores, labels, masks)
    assert quality["click"] == pytest.approx(1.0)  # rows 0-2: the one positive (0.9) above both negatives
    assert quality["rank"] == pytest.approx(1.0)  # relevant rows 0, 2 (3.0, 2.0) above 1.0 and 0.5
    # R^2 = 1 - mean((s - y)^2) / var(y) = 1 - (1 / 4) / 1.25
    assert quality["watch"] == pytest.approx(1 - 0.25 / 1.25)
    # class 0 (row 0 vs rows 1-3 on p0: 0.8 > 0.3, 0.6, 0.1) and class 1 (rows 1-3 vs row 0 on p1) both 1
    assert quality["genre"] == pytest.approx(1.0)
    scores["click"] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # the positive now below both negatives
    assert _quality(schema, scores, labels, masks)["click"] == pytest.approx(0.0)


def test_a_model_built_on_a_bottom_of_its_own_comes_back_from_its_run_record():
    """LightningCLI records ESMM's ``bottom`` as ``{class_path, init_args}``; export must build the
    same factory from it (it passed the dict on: "'dict' object is not callable")."""
    schema = tiny_schema(tasks=ESMM_TASKS)
    torch.manual_seed(0)
    trained = MODELS["esmm"](schema, tower=[4], bottom=lambda d, n: MixtureBottom(d, n, num_experts=3, expert=[6]))
    record = {"class_path": "lightning_mtr.models.ESMM", "init_args": {"tower": [4], "bottom": {
        "class_path": "lightning_mtr.nn.MixtureBottom", "init_args": {"num_experts": 3, "expert": [6]}}}}
    rebuilt = build_trained(record, schema, trained.state_dict())
    assert isinstance(rebuilt.bottom, MixtureBottom) and rebuilt.bottom.experts.num_experts == 3
    dense, sparse = random_inputs(schema, 5)
    with torch.no_grad():
        expected, got = trained.eval()(dense, sparse), rebuilt(dense, sparse)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_naming_a_bottom_outside_lightning_mtr_imports_nothing(tmp_path):
    """A checkpoint does not choose code to import, at any depth of its model's arguments."""
    path = tmp_path / "foreign.ckpt"
    record = {"class_path": "lightning_mtr.models.ESMM", "init_args": {"bottom": {"class_path": "os.system"}}}
    schema = asdict(tiny_schema(tasks=ESMM_TASKS))
    torch.save({"state_dict": {}, "lightning_mtr_run": {"model": record, "data": {}, "schema": schema}}, path)
    with pytest.raises(CheckpointError, match="builds its model with os.system, not a class of lightning_mtr"):
        load_run(path)
