"""A trained model back from its checkpoint, on one CPU process, for export."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lightning_mtr.data.datamodule import SyntheticLog
from lightning_mtr.data.encode import DenseStats
from lightning_mtr.embeddings.init import init_tables
from lightning_mtr.models import MODELS
from lightning_mtr.nn.meta import materialize
from lightning_mtr.schema import Schema
from lightning_mtr.training.distributed.checkpoint import CheckpointError, read_consolidated, read_state
from lightning_mtr.training.run_record import RUN_RECORD, run_record


@dataclass
class TrainedRun:
    """The model (evaluation mode, plain TorchRec tables on CPU) and what it was trained with."""

    model: nn.Module
    schema: Schema
    dense_stats: DenseStats | None
    model_config: dict[str, Any]  # class_path and init_args
    data_config: dict[str, Any]  # the data module's arguments

    def test_files(self) -> str | list[str]:
        """The run's test split: its ``data.test`` files, or the synthetic log's test file."""
        test = self.data_config.get("test")
        if test:
            return test
        synthetic = self.data_config.get("synthetic")
        if synthetic:
            return SyntheticLog(**synthetic).ensure()["test"]
        raise ValueError("the run has no test data (data.test); pass the files to check the export on")


def load_run(checkpoint: str | Path, config: str | Path | None = None) -> TrainedRun:
    """Rebuild the trained model from a checkpoint file or a sharded checkpoint directory.

    The model's class and arguments and the schema come from the run record that ``lightning-mtr
    fit`` writes into every checkpoint, or from ``config``, the ``config.yaml`` LightningCLI
    saves beside the logs (for a checkpoint written without the CLI's record)."""
    path = Path(checkpoint)
    state = read_consolidated(path) if path.is_dir() else read_state(path)
    record = state.get(RUN_RECORD)
    if config is not None:
        with open(config) as handle:
            loaded = yaml.safe_load(handle) or {}
        record = run_record(loaded.get("fit", loaded), None)  # a config of `fit` may nest under it
    if record is None:
        raise ValueError(f"{path} does not say which model it holds (it was not written by `lightning-mtr fit`); "
                         "pass --config with the config.yaml of the run that trained it")
    if config is None and not _registered(record["model"]["class_path"]):
        raise CheckpointError(f"{path} names the model {record['model']['class_path']}, not one of lightning-mtr's "
                              "registered models: a checkpoint does not choose code to import; for a model of your "
                              "own pass --config with the config.yaml of the run that trained it")
    foreign = [p for p in _class_paths(record["model"])[1:] if not p.startswith("lightning_mtr.")]
    if config is None and foreign:
        raise CheckpointError(f"{path} builds its model with {foreign[0]}, not a class of lightning_mtr: a checkpoint "
                              "does not choose code to import; pass --config with the config.yaml of the run that "
                              "trained it")
    schema = Schema.from_dict(record["schema"]) if record["schema"] else Schema.from_yaml(record["data"]["schema"])
    stats = (state.get("MultiTaskDataModule") or {}).get("dense_stats")
    model = build_trained(record["model"], schema, {k[len("model."):]: v for k, v in state["state_dict"].items()
                                                    if k.startswith("model.")})
    return TrainedRun(model, schema, DenseStats(**{k: tuple(v) for k, v in stats.items()}) if stats else None,
                      record["model"], record["data"])


def _factory(config: dict[str, Any]) -> Callable[..., Any]:
    """The class with its recorded arguments bound, as LightningCLI passed it: an argument that is
    itself ``{class_path, init_args}`` (ESMM's ``bottom``) becomes such a factory too."""
    module_name, _, class_name = config["class_path"].rpartition(".")
    arguments = {k: _factory(v) if isinstance(v, dict) and "class_path" in v else v
                 for k, v in (config.get("init_args") or {}).items()}
    return functools.partial(getattr(importlib.import_module(module_name), class_name), **arguments)


def _class_paths(config: dict[str, Any]) -> list[str]:
    """The model's class path and those of its arguments' ``{class_path, init_args}``, at any depth."""
    nested = [p for v in (config.get("init_args") or {}).values() if isinstance(v, dict) and "class_path" in v
              for p in _class_paths(v)]
    return [config["class_path"], *nested]


def _registered(class_path: str) -> bool:
    """Whether ``class_path`` names a class of ``MODELS``, looked up without importing anything."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module), name, None) in MODELS.values()


def build_trained(model_config: dict[str, Any], schema: Schema, weights: dict[str, torch.Tensor]) -> nn.Module:
    """``class_path(schema, **init_args)`` on CPU holding ``weights``, in evaluation mode."""
    with torch.device("meta"):
        model = _factory(model_config)(schema)
    materialize(model, "cpu")
    init_tables(model, "cpu")  # the tables, as training allocates them; the weights below replace the draw
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit {model_config['class_path']} with its recorded arguments: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()
