"""Where a run's logs and checkpoints land: ``runs/<name>/version_N/``, and links to the latest.

``<name>`` is ``--name`` if given, else the stem of the first ``--config`` file
(``conf/debug.yaml`` -> ``runs/debug``); ``trainer.default_root_dir`` replaces ``runs/<name>``.
Unless the config sets ``trainer.logger``, each run writes CSV (``metrics.csv``) and TensorBoard
logs, its ``config.yaml`` and ``checkpoints/`` into the next ``version_N`` there. Every
command (``fit``, ``validate``, ``test``, ``predict``) takes a new ``version_N``, so two links
name the last ones: ``latest`` (any command) and ``latest_<command>``, e.g.
``runs/debug/latest_fit/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

RUNS = "runs"
UNNAMED = "lightning_mtr"  # the name when there is neither --name nor --config


def run_name(name: str | None, configs: Sequence[Any] | None) -> str:
    """``name``, else the first config file's stem."""
    if name:
        return name
    return Path(str(configs[0])).stem if configs else UNNAMED


def default_outputs(trainer: dict[str, Any], name: str) -> dict[str, Any]:
    """The trainer arguments that put an unset ``default_root_dir`` and logger under ``runs/<name>``.
    CSV and TensorBoard share one ``version_N`` directory (the CSV logger numbers it)."""
    root = trainer.get("default_root_dir") or os.path.join(RUNS, name)
    outputs: dict[str, Any] = {"default_root_dir": root}
    if trainer.get("logger") in (None, True):  # unset, or Lightning's default asked for
        csv = CSVLogger(root, name="")
        outputs["logger"] = [csv, TensorBoardLogger(root, name="", version=csv.version)]
    return outputs


class LatestRun(L.Callback):
    """Points ``latest`` and ``latest_<command>`` beside the run's ``version_N`` at it (rank 0,
    at setup: a run that fails while training or evaluating is the latest too)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
        if not trainer.is_global_zero or log_dir is None:
            return
        run = Path(log_dir)
        run.mkdir(parents=True, exist_ok=True)
        for name in ("latest", f"latest_{trainer.state.fn.value}"):
            link_to(run, run.parent / name)


def through_links(path: str | None) -> str | None:
    """``path`` with the links among its folders followed (the file itself, e.g. a ``last.ckpt``
    link, kept). ``runs/debug/latest_fit/checkpoints/last.ckpt`` names the checkpoint of the fit
    that ``latest_fit`` points at now; a fit into ``runs/debug`` points it at its own new
    ``version_N`` when it sets up, before it loads the checkpoint."""
    folder = os.path.dirname(path) if path else ""
    if not folder or not os.path.isdir(folder):
        return path  # a plain name, "last" or "best", or a path the reader will say is missing
    real = os.path.realpath(folder)
    if real == os.path.abspath(folder):
        return path
    return os.path.join(real if os.path.isabs(folder) else os.path.relpath(real), os.path.basename(path))


def link_to(target: Path, link: Path) -> None:
    """Replace ``link`` by a relative link to ``target`` (a sibling), in one rename."""
    if link.exists() and not link.is_symlink():
        rank_zero_warn(f"{link} is not a link; left as it is (it would point at {target})")
        return
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target.name)
    staging.replace(link)
