"""What a checkpoint needs to be rebuilt without the command line that trained it.

LightningCLI writes its config beside the logs, but a checkpoint copied elsewhere loses it. The
CLI's config callback therefore also writes, into every checkpoint, the model's ``class_path``
and ``init_args``, the data module's arguments and the schema itself (not its path, which may
not exist where the checkpoint is exported).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback

RUN_RECORD = "lightning_mtr_run"


class RecordingSaveConfig(SaveConfigCallback):
    """LightningCLI's config callback, plus :data:`RUN_RECORD` in each checkpoint."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        checkpoint[RUN_RECORD] = run_record(config, asdict(pl_module.schema))


def run_record(config: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    """``{"model": {class_path, init_args}, "data": {...}, "schema": {...}}`` from a LightningCLI
    config (the dict of its YAML file) and a schema's fields (None: read from ``data.schema``)."""
    model = (config.get("model") or {}).get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError("the run config names no model (model.model.class_path)")
    return {"model": {"class_path": model["class_path"], "init_args": model.get("init_args") or {}},
            "data": config.get("data") or {}, "schema": schema}
