"""Every YAML under conf/ is documentation, so every one is tested (STYLE.md section 5).

Run configs are parsed and instantiated through the real CLI (unknown keys fail); schemas are
loaded with ``Schema.from_yaml``; the dataset configs train one short epoch. Paths inside the
configs are relative to the repository root, so every test runs from there.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_mtr.cli import MultiTaskCLI, main
from lightning_mtr.data.datamodule import MultiTaskDataModule, SyntheticLog
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed import TorchRecStrategy

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SCHEMAS = sorted((CONF / "schemas").glob("*.yaml"))
OVERLAYS = sorted((CONF / "trainer").glob("*.yaml"))  # trainer presets, added after a run config
CONFIGS = sorted(p for p in CONF.rglob("*.yaml") if p.parent not in (CONF / "schemas", CONF / "trainer"))
SHARED = REPO.parent / "shared" / "data"
# conf/data/*.yaml read data/<dataset>/ (docs/schema-and-data.md: Datasets); the sibling shared/
# checkout holds the same sample files in these folders, where the tests read them
SHARED_FOLDERS = {"ali_ccp": "ali_ccp/torch_rechub", "aliexpress": "aliexpress/torch_rechub",
                  "byterec": "byterec_icme2019/deepctr_torch", "census_income": "census_income/torch_rechub",
                  "criteo": "criteo/torch_rechub"}
SMOKE = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def test_every_checkpoint_callback_shown_is_the_projects():
    """Lightning's ModelCheckpoint(save_last=True) keeps last.ckpt at the last improvement and writes
    it as a second copy of the top-k one (two 177 MB directories in conf/data/synthetic_features.yaml's
    run): every config and documented example names lightning_mtr.training.ModelCheckpoint."""
    pages = [*CONFIGS, *OVERLAYS, REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert [_name(p) for p in pages if "lightning.pytorch.callbacks.ModelCheckpoint" in p.read_text()] == []


def test_run_configs_leave_their_logs_and_checkpoints_to_the_cli():
    """``runs/<config stem>/version_N`` with CSV, TensorBoard and the ``latest`` links comes from the
    CLI (training/runs.py): a copied logger block sent conf/data/synthetic_features.yaml's logs to
    ``csv/version_N`` and ``tensorboard/version_N``, its links and checkpoints under ``csv/``."""
    own = [_name(path) for path in CONFIGS
           if {"logger", "default_root_dir"} & set(yaml.safe_load(path.read_text()).get("trainer") or {})]
    assert own == []


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist


def _parse(*configs: Path | str) -> MultiTaskCLI:
    """Parse and instantiate (trainer, model, data module) without running anything or touching data."""
    no_data = AssertionError("instantiating a config must not prepare or generate data")
    with mock.patch.object(MultiTaskDataModule, "prepare_data", side_effect=no_data), \
         mock.patch.object(SyntheticLog, "ensure", side_effect=no_data):
        return MultiTaskCLI(run=False, args=[arg for config in configs for arg in ("--config", str(config))])


def _fit(args: list[str], root: Path) -> MultiTaskCLI:
    """One short ``fit`` in this process, with no logger, writing only under ``root``."""
    overrides = ["--trainer.logger", "false", "--trainer.default_root_dir", str(root)]
    return MultiTaskCLI(args=["fit", *args, *SMOKE, *overrides])


KIND_METRICS = {"binary": ("auc", "logloss"), "regression": ("mse",), "multiclass": ("accuracy", "auc", "logloss"),
                "ranking": ("ndcg@10", "gauc")}


def _assert_trained(cli: MultiTaskCLI, root: Path, val_rows: int | None) -> None:
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for task in cli.datamodule.schema.tasks:
        assert math.isfinite(metrics[f"train/{task.name}/loss"])
        if task.sample_space is None and val_rows is not None:
            assert metrics[f"val/{task.name}/rows"] == val_rows
        for name in KIND_METRICS[task.kind] + (("gauc",) if task.gauc_by else ()):
            assert math.isfinite(metrics[f"val/{task.name}/{name}"]), f"val/{task.name}/{name}"
    assert (root / "checkpoints" / "last.ckpt" / "trainer.pt").is_file()


def test_conf_holds_the_expected_files():
    names = {_name(p) for p in CONFIGS}
    assert {"conf/debug.yaml", "conf/models/mmoe.yaml", "conf/models/omoe.yaml", "conf/models/shared_bottom.yaml",
            "conf/data/ali_ccp.yaml", "conf/data/census_income.yaml", "conf/data/mmoe_synthetic.yaml",
            "conf/data/aliexpress.yaml", "conf/data/criteo.yaml", "conf/data/ali_ccp_esmm.yaml",
            "conf/data/byterec.yaml",
            "conf/models/esmm.yaml", "conf/models/esm2.yaml", "conf/models/esmm_base.yaml", "conf/models/dupn.yaml",
            "conf/models/dupn_no_sequence.yaml", "conf/models/dupn_shared_bottom.yaml",
            "conf/plan/large_ads.yaml"} <= names
    assert {"conf/trainer/cpu_2proc.yaml", "conf/trainer/gpu.yaml"} <= {_name(p) for p in OVERLAYS}


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_config_starts_with_its_command(config):
    lines = config.read_text().splitlines()
    assert lines[0].startswith("#"), "a config starts with a comment saying what it trains"
    header = "\n".join(lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert f"lightning-mtr fit --config {_name(config)}" in header


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_config_parses_and_instantiates(config):
    cli = _parse(config)
    schema = cli.datamodule.schema
    linked = cli.model.schema  # the data module's, or a copy with the task weights a chain model fixes
    assert linked is schema or linked == replace(schema, tasks=tuple(replace(t, weight=linked.task_weights[t.name])
                                                                     for t in schema.tasks)), \
        "the schema is linked from the data module into the model"
    assert list(cli.model.model.tasks) == schema.task_names
    assert cli.trainer.max_epochs >= 1


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_name)
def test_trainer_preset_says_how_to_add_it(overlay):
    assert overlay.read_text().startswith("#")
    assert f"--config conf/debug.yaml --config {_name(overlay)}" in overlay.read_text()


def test_cpu_preset_shards_over_two_processes():
    cli = _parse(CONF / "debug.yaml", CONF / "trainer" / "cpu_2proc.yaml")
    assert isinstance(cli.trainer.strategy, TorchRecStrategy)
    assert cli.trainer.num_devices == 2 and cli.trainer.strategy.root_device.type == "cpu"


def test_gpu_preset_parses_and_asks_for_gpus():
    """Its keys are checked by parsing; without a GPU the trainer refuses by name."""
    if torch.cuda.is_available():
        cli = _parse(CONF / "debug.yaml", CONF / "trainer" / "gpu.yaml")
        assert isinstance(cli.trainer.strategy, TorchRecStrategy)
        assert cli.trainer.num_devices == torch.cuda.device_count()
        return
    with pytest.raises(MisconfigurationException, match="(?i)gpu"):
        _parse(CONF / "debug.yaml", CONF / "trainer" / "gpu.yaml")


@pytest.mark.parametrize("schema", SCHEMAS, ids=_name)
def test_schema_loads(schema):
    assert schema.read_text().startswith("#"), "a schema starts with a comment saying what data it describes"
    loaded = Schema.from_yaml(schema)
    assert loaded.tasks


@pytest.mark.parametrize("typo", [
    ("max_epochs:", "max_epoch:"),  # a trainer argument
    ("num_experts:", "num_expert:"),  # a model's init_args, under class_path
    ("shuffle_buffer:", "shuffle_bufer:"),  # a data module argument
])
def test_unknown_keys_fail(tmp_path, capsys, typo):
    text = (CONF / "debug.yaml").read_text()
    assert typo[0] in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(typo[0], typo[1]))
    with pytest.raises(SystemExit):
        _parse(broken)
    assert typo[1].rstrip(":") in capsys.readouterr().err, "the error names the unknown key"


@pytest.mark.parametrize(("config", "key", "allowed"), [
    ("conf/debug.yaml", "gate_backend", "Literal['auto', 'torch', 'triton']"),  # MMoE
    ("conf/models/esmm.yaml", "chain_backend", "Literal['auto', 'torch', 'triton']"),
    ("conf/models/nfwfm.yaml", "multi_hot", "Literal['sum', 'mean']"),
])
def test_a_choice_typo_fails_when_parsed(tmp_path, capsys, config, key, allowed):
    """Choice arguments are Literals: a misspelt value stops the parse (before any model is built)
    and the error lists the values that would work."""
    overlay = tmp_path / "typo.yaml"
    overlay.write_text(f"model:\n  model:\n    init_args:\n      {key}: trion\n")
    with pytest.raises(SystemExit):
        _parse(config, overlay)
    err = capsys.readouterr().err
    assert key in err and "trion" in err and allowed in err


needs_shared_data = pytest.mark.skipif(
    not all((SHARED / folder).is_dir() for folder in SHARED_FOLDERS.values()),
    reason=f"sample datasets not found at {SHARED} (the sibling shared/ checkout; a plain clone has none)",
)


def _data_paths(config: Path) -> dict[str, Path]:
    """The config's data files by split."""
    data = yaml.safe_load(config.read_text())["data"]
    return {split: Path(data[split]) for split in ("train", "val", "test", "predict") if data.get(split)}


def _on_shared(config: str) -> list[str]:
    """``--config CONFIG`` with its data/<dataset>/ files read from the same files in ../shared/data."""
    moved = [(split, SHARED / SHARED_FOLDERS[path.parts[1]] / path.name)
             for split, path in _data_paths(REPO / config).items()]
    return ["--config", config, *[arg for split, path in moved for arg in (f"--data.{split}", str(path))]]


def test_dataset_configs_read_the_documented_data_folder():
    """A user has no sibling shared/ checkout: a config's data lies under data/<dataset>/ (or is
    generated under .cache/), and docs/schema-and-data.md's Datasets table says where to get it."""
    rows = [line for line in (REPO / "docs" / "schema-and-data.md").read_text().splitlines()
            if line.startswith("| `conf/data/")]
    table = {name: row for row in rows for name in re.findall(r"conf/data/[\w.]+", row.split(" | ")[0])}
    for config in sorted((CONF / "data").glob("*.yaml")):
        for split, path in _data_paths(config).items():
            assert path.parts[0] in ("data", ".cache") and ".." not in path.parts, f"{config.name}: {split}: {path}"
            if path.parts[0] == "data":
                assert path.parts[1] in SHARED_FOLDERS, f"{config.name}: {split}: {path}"
                assert f"`data/{path.parts[1]}/`" in table.get(_name(config), ""), f"{_name(config)} not in the table"


@needs_shared_data
def test_ali_ccp_trains(tmp_path):
    cli = _fit(_on_shared("conf/data/ali_ccp.yaml"), tmp_path)
    _assert_trained(cli, tmp_path, val_rows=50)  # eval_batch_size 256: one batch holds the whole val file


@needs_shared_data
def test_ali_ccp_trains_esmm(tmp_path):
    cli = _fit(_on_shared("conf/data/ali_ccp_esmm.yaml"), tmp_path)
    _assert_trained(cli, tmp_path, val_rows=50)
    assert cli.trainer.callback_metrics["val/cvr/rows"] == 3  # CVR is evaluated on the 3 clicked val rows
    assert Schema.from_yaml(REPO / "conf" / "schemas" / "ali_ccp.yaml").task_weights["cvr"] == 1  # shared with MMoE
    assert cli.model.schema.task_weights["cvr"] == 0  # ESMM has no direct CVR loss, and says so itself


@needs_shared_data
def test_census_income_trains(tmp_path):
    cli = _fit(_on_shared("conf/data/census_income.yaml"), tmp_path)
    _assert_trained(cli, tmp_path, val_rows=20)


@needs_shared_data
def test_aliexpress_trains(tmp_path):
    cli = _fit(_on_shared("conf/data/aliexpress.yaml"), tmp_path)
    _assert_trained(cli, tmp_path, val_rows=100)  # val is the 100-row training file itself
    assert cli.trainer.callback_metrics["val/cvr/rows"] == 60  # cvr's sample space: the 60 clicked rows


@needs_shared_data
@pytest.mark.parametrize("model", ["SharedBottom", "MMoE"])
def test_criteo_trains_one_task(tmp_path, model):
    """Hex-string ids hashed, empty fields as missing, one task; both models take a single task."""
    cli = _fit([*_on_shared("conf/data/criteo.yaml"), "--model.model", f"lightning_mtr.models.{model}"], tmp_path)
    assert type(cli.model.model).__name__ == model
    _assert_trained(cli, tmp_path, val_rows=87)  # val is the 87-row training file itself


@needs_shared_data
def test_byterec_trains_from_headerless_tab_separated_text(tmp_path):
    cli = _fit(_on_shared("conf/data/byterec.yaml"), tmp_path)
    _assert_trained(cli, tmp_path, val_rows=136)  # val is the 136-row training file itself


def test_mmoe_synthetic_trains(tmp_path):
    train, val = tmp_path / "p0.5.parquet", tmp_path / "p0.5-val.parquet"
    assert main(["synth", "mmoe", "--out", str(train), "--rows", "512", "--correlation", "0.5"]) == 0
    assert main(["synth", "mmoe", "--out", str(val), "--rows", "256", "--correlation", "0.5", "--split", "val"]) == 0
    # 4 batches of 128: with a streaming loader, an epoch shorter than limit_train_batches skips validation.
    cli = _fit(["--config", "conf/data/mmoe_synthetic.yaml", "--data.train", str(train), "--data.val", str(val),
                "--data.batch_size", "128"], tmp_path / "run")
    _assert_trained(cli, tmp_path / "run", val_rows=256)


def test_dupn_trains_every_task_kind_on_the_behaviour_log(tmp_path):
    """DUPN's config on a small behaviour log: CTR (with GAUC), ranking, FIFP and PPP all report."""
    # one field at a time: the config's `log: behaviour` must survive each override
    sizes = {"cache_dir": tmp_path / "data", "train_rows": 4096, "val_rows": 2048, "test_rows": 64}
    overrides = [arg for key, value in sizes.items() for arg in (f"--data.synthetic.{key}", str(value))]
    cli = _fit(["--config", "conf/models/dupn.yaml", *overrides, "--data.batch_size", "256",
                "--trainer.limit_val_batches", "2"], tmp_path / "run")
    assert cli.datamodule.synthetic.log == "behaviour"
    _assert_trained(cli, tmp_path / "run", val_rows=None)
    with pytest.raises(ValueError, match="impressions log, not the behaviour log"):
        SyntheticLog(log="behaviour", placement_weight=1.0)
