"""``fit --warm_start``: a new run from an earlier checkpoint's weights and tables (any layout,
any world size), the sparse optimizer's state kept or reset, the dense statistics kept,
recomputed or blended, and a fresh loop, dense optimizer and data position."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from helpers import run_ranks
from test_data_pipeline import BAD_SCHEMA, good_rows, write_parquet
from test_fault_corpus import MODEL
from test_sharded_training import PLANS, STEPS, _FromStep, _global_batches, _module, _start_weights, _train

from lightning_mtr.cli import main
from lightning_mtr.training.distributed import SingleProcessStrategy, TorchRecStrategy
from lightning_mtr.training.distributed.checkpoint import read_consolidated, read_full, read_state
from lightning_mtr.training.warm_start import WarmStart

TOLERANCE = {"rtol": 0, "atol": 0}  # a load copies: bit for bit


class _AtStart(L.Callback):
    """Saves a checkpoint before the first step: what the warm start loaded, as the run sees it."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(len(trainer.optimizers[0].state), self.out / f"dense-state-{trainer.global_rank}.pt")
        trainer.save_checkpoint(self.out / "at-start")  # creates the dense optimizer's state


def _warm(rank: int, world: int, source: Path, sparse_optimizer: str, out: Path, single: bool = False,
          variant: str = "pooled") -> None:
    """One step warm-started from ``source`` on ``world`` processes (``single``: the fast path),
    from a module drawn with another seed, so that nothing matches unless the warm start loads it."""
    torch.manual_seed(123)
    strategy = SingleProcessStrategy() if single else TorchRecStrategy(constraints=PLANS["table_wise"])
    strategy.warm_start = WarmStart(str(source), sparse_optimizer=sparse_optimizer)
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=out, callbacks=[_AtStart(out)], strategy=strategy)
    trainer.fit(_module(variant=variant), datamodule=_FromStep(_global_batches(1, variant), rank, world))


def _warm_two(rank: int, *args) -> None:
    _warm(rank, 2, *args)


def _flat(tree, prefix=""):
    for key, value in tree.items():
        yield from _flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]


def _assert_loaded(source: Path, at_start: Path, sparse_optimizer: str) -> None:
    """Every weight and table equals the source's; the tables' optimizer state equals it (kept) or
    is zero (reset); the dense optimizer and the loop start afresh."""
    saved, loaded = read_full(source), read_full(at_start)
    assert set(loaded["model"]) == set(saved["model"]) and any("embedding_bags" in k for k in saved["model"])
    for key, value in saved["model"].items():
        torch.testing.assert_close(loaded["model"][key], value, **TOLERANCE, msg=key)
    momenta = dict(_flat(loaded["sparse_optimizer"]))
    assert momenta and all("momentum1" in key for key in momenta)
    for key, value in dict(_flat(saved["sparse_optimizer"])).items():
        assert value.abs().sum() > 0, f"{key}: the source's tables must have been trained"
        if sparse_optimizer == "keep":
            torch.testing.assert_close(momenta[key], value, **TOLERANCE, msg=key)
        else:  # (a column-wise source keeps one accumulator per row of each column shard: another shape)
            assert not momenta[key].any(), key
    replicated, fresh = (dict(_flat(tree.get("replicated_optimizer", {}))) for tree in (saved, loaded))
    assert replicated.keys() == fresh.keys()
    for key, value in replicated.items():  # the tables no fused kernel updates (CPU sequence tables)
        if sparse_optimizer == "keep":
            torch.testing.assert_close(fresh[key], value, **TOLERANCE, msg=key)
        else:
            assert not fresh[key].any(), key
    dense_states = list(at_start.parent.glob("dense-state-*.pt"))
    assert dense_states
    for dense_state in dense_states:
        assert torch.load(dense_state) == 0, "the dense optimizer starts afresh, never stepped"
    state = read_state(at_start)
    assert (state["global_step"], state["epoch"]) == (0, 0)


@pytest.mark.parametrize("sparse_optimizer", ["keep", "reset"])
@pytest.mark.parametrize("variant", ["pooled", "sequences"])
def test_warm_start_loads_weights_and_tables_before_the_first_step(variant, sparse_optimizer, tmp_path):
    """``sequences``: DUPN, whose sequence tables one CPU process steps with a torch optimizer."""
    _train("single", _start_weights(variant), STEPS, tmp_path, None, variant)
    _warm(0, 1, tmp_path / f"after-{STEPS}", sparse_optimizer, tmp_path / "warm", single=True, variant=variant)
    _assert_loaded(tmp_path / f"after-{STEPS}", tmp_path / "warm" / "at-start", sparse_optimizer)
    replicated = dict(_flat(read_full(tmp_path / f"after-{STEPS}").get("replicated_optimizer", {})))
    assert any("hist_item" in key for key in replicated) == (variant == "sequences")



def test_warm_start_from_a_single_file_takes_its_weights(tmp_path):
    _train("single", _start_weights(), STEPS, tmp_path, None)
    single = tmp_path / "single.ckpt"
    torch.save(read_consolidated(tmp_path / f"after-{STEPS}"), single)
    _warm(0, 1, single, "reset", tmp_path / "warm", single=True)
    loaded = read_full(tmp_path / "warm" / "at-start")["model"]
    for key, value in torch.load(single, weights_only=True)["state_dict"].items():
        torch.testing.assert_close(loaded[key], value, **TOLERANCE, msg=key)


@pytest.mark.parametrize(("saved_on", "warmed_on"), [(2, "single"), ("single", 2)])
def test_warm_start_moves_between_world_sizes(saved_on, warmed_on, tmp_path):
    """A 2-process sharded checkpoint warm-starts one process, and one process's warm-starts 2
    (gloo), the tables' optimizer state kept: DCP reshards both."""
    _train(saved_on, _start_weights(), STEPS, tmp_path, None)
    source = tmp_path / f"after-{STEPS}"
    if warmed_on == "single":
        _warm(0, 1, source, "keep", tmp_path / "warm", single=True)
    else:
        run_ranks(2, _warm_two, source, "keep", tmp_path / "warm")
    _assert_loaded(source, tmp_path / "warm" / "at-start", "keep")


def _train_column_wise(rank: int, start: dict, out: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=out, strategy=TorchRecStrategy(constraints=PLANS["column_wise"]))
    trainer.fit(_module(start), datamodule=_FromStep(_global_batches(STEPS), rank, 2))
    trainer.save_checkpoint(out / f"after-{STEPS}")


def test_column_wise_weights_warm_start_one_process_unless_their_optimizer_state_is_kept(tmp_path):
    """Weights reshard from any layout; column-wise optimizer state does not (``check_reshard``),
    so keeping it is refused while a reset loads the weights."""
    run_ranks(2, _train_column_wise, _start_weights(), tmp_path)
    source = tmp_path / f"after-{STEPS}"
    tables = [t for module in read_state(source)["plan"]["modules"].values() for t in module.values()]
    assert tables and all(table["sharding_type"] == "column_wise" for table in tables)
    _warm(0, 1, source, "reset", tmp_path / "warm", single=True)
    _assert_loaded(source, tmp_path / "warm" / "at-start", "reset")
    with pytest.raises(ValueError, match="column-wise optimizer state cannot be resharded"):
        _warm(0, 1, source, "keep", tmp_path / "kept", single=True)


# ---- through the command line: a fresh loop, the dense statistics, refusals -------------------------------

DENSE = ({"name": "count", "transform": "standardize"}, {"name": "price", "transform": "log1p_standardize"})


def _day(root: Path, name: str, rows: int, seed: int, scale: float) -> tuple[str, dict[str, np.ndarray]]:
    """A day's log on BAD_SCHEMA's columns plus a price, with its dense columns."""
    generator = np.random.default_rng(seed)
    columns = good_rows(rows)
    dense = {"count": generator.normal(10 * scale, 3 * scale, rows), "price": generator.lognormal(scale, 1.0, rows)}
    columns |= {key: pa.array(values) for key, values in dense.items()}
    return write_parquet(root / f"{name}.parquet", columns), dense


def _config(root: Path, train: str) -> Path:
    schema = root / "schema.yaml"
    schema.write_text(yaml.safe_dump({**asdict(BAD_SCHEMA), "dense": list(DENSE)}))
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(root / "day1")},
              "model": {"model": MODEL},
              "data": {"schema": str(schema), "train": train, "val": train, "batch_size": 32}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def day1(tmp_path_factory):
    """One epoch (2 steps) on day 1's 64 rows: (root, config, checkpoint, day 1's and day 2's dense columns)."""
    root = tmp_path_factory.mktemp("days")
    train, dense1 = _day(root, "day1", 64, 0, 1.0)
    day2, dense2 = _day(root, "day2", 64, 1, 2.0)
    config = _config(root, train)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-mtr"])
        assert main(["fit", "--config", str(config)]) == 0
    [checkpoint] = (root / "day1" / "checkpoints").iterdir()
    return {"root": root, "config": config, "checkpoint": checkpoint, "day2": day2, "dense": (dense1, dense2)}


def _fit_day2(day1, name: str, *extra: str, source: Path | None = None) -> dict:
    """``fit`` on day 2's log warm-started from day 1 (or ``source``); the trainer state of the
    checkpoint it wrote."""
    out = day1["root"] / name
    assert main(["fit", "--config", str(day1["config"]), "--trainer.default_root_dir", str(out),
                 "--data.train", day1["day2"], "--data.val", day1["day2"],
                 "--warm_start", str(source or day1["checkpoint"]), *extra]) == 0
    [checkpoint] = (out / "checkpoints").iterdir()
    return read_state(checkpoint) | {"path": checkpoint}


def test_warm_start_trains_a_fresh_epoch_where_a_resume_trains_none(day1, monkeypatch):
    """max_epochs 1 from a 1-epoch checkpoint: ``--ckpt_path`` continues a finished run (no step),
    ``--warm_start`` trains one new epoch with a fresh dense optimizer."""
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    assert read_state(day1["checkpoint"])["global_step"] == 2
    warm = _fit_day2(day1, "warm")
    assert (warm["global_step"], warm["epoch"]) == (2, 0), "one epoch of 2 steps, counted from 0"
    steps = {int(s["step"]) for s in read_full(warm["path"], keys={"optimizers"})["optimizers"]["0"]["state"].values()}
    assert steps == {2}, "Adam's step counts this run's steps only"
    resumed = day1["root"] / "resumed"
    assert main(["fit", "--config", str(day1["config"]), "--trainer.default_root_dir", str(resumed),
                 "--ckpt_path", str(day1["checkpoint"])]) == 0
    assert not (resumed / "checkpoints").exists(), "the resumed run had nothing left to train"


def test_warm_start_from_mid_epoch_reads_its_data_from_the_start(day1, monkeypatch):
    """A checkpoint saved after 1 of an epoch's 2 batches records that position; a warm start
    trains both batches of its own epoch."""
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    mid = day1["root"] / "mid"
    assert main(["fit", "--config", str(day1["config"]), "--trainer.default_root_dir", str(mid),
                 "--trainer.max_steps", "1"]) == 0
    [checkpoint] = (mid / "checkpoints").iterdir()
    assert read_state(checkpoint)["MultiTaskDataModule"]["position"]["rows"] == 32
    assert _fit_day2(day1, "warm-mid", source=checkpoint)["global_step"] == 2


def _stats(values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of each dense feature after its transform, by numpy."""
    columns = [values["count"], np.log1p(values["price"])]
    return np.array([c.mean() for c in columns]), np.array([c.std() for c in columns])


@pytest.mark.parametrize("choice", ["keep", "recompute", "blend"])
def test_dense_statistics_kept_recomputed_or_blended(day1, choice, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    (mean1, std1), (mean2, std2) = (_stats(d) for d in day1["dense"])
    weight = 0.25
    if choice == "keep":
        mean, std = mean1, std1
    elif choice == "recompute":
        mean, std = mean2, std2
    else:  # a mixture: first and second moments weighted (1 - w, w)
        mean = (1 - weight) * mean1 + weight * mean2
        second = (1 - weight) * (std1**2 + mean1**2) + weight * (std2**2 + mean2**2)
        std = np.sqrt(second - mean**2)
    warm = _fit_day2(day1, f"stats-{choice}", "--warm_start_dense_stats", choice, "--warm_start_blend", str(weight))
    saved = warm["MultiTaskDataModule"]["dense_stats"]
    np.testing.assert_allclose(saved["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(saved["std"], std, rtol=1e-9)


def test_the_documented_yaml_options_parse(tmp_path, capsys):
    """docs/multi-gpu.md's warm-start block is a valid ``fit`` config fragment."""
    page = (Path(__file__).parents[1] / "docs" / "multi-gpu.md").read_text()
    (block,) = [body for body in re.findall(r"```yaml\n(.*?)```", page, re.S) if "warm_start:" in body]
    (tmp_path / "warm.yaml").write_text(block)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(Path(__file__).parents[1] / "conf" / "debug.yaml"),
              "--config", str(tmp_path / "warm.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {k: v for k, v in printed.items() if k.startswith("warm_start")} == yaml.safe_load(block)


def test_a_strategy_that_cannot_warm_start_is_named_with_those_that_can(day1, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    assert main(["fit", "--config", str(day1["config"]), "--trainer.default_root_dir", str(day1["root"] / "ddp"),
                 "--trainer.strategy", "ddp", "--warm_start", str(day1["checkpoint"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--warm_start needs trainer.strategy auto (the default), " \
        "lightning_mtr.training.distributed.SingleProcessStrategy or TorchRecStrategy, not DDPStrategy" in err[0], err
