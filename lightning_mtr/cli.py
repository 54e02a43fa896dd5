"""``lightning-mtr``: LightningCLI for fit/validate/test/predict, plus ``synth`` for data, ``plan``
for a sharding plan, ``consolidate`` for a sharded checkpoint, ``export`` and ``score`` for serving,
``daily`` for day-after-day training."""

from __future__ import annotations

import os
import sys
import traceback
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from jsonargparse import DefaultHelpFormatter

from lightning_mtr import quiet
from lightning_mtr.data import infer, synthetic
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.data.encode import DataError
from lightning_mtr.serving import export, score
from lightning_mtr.training import MultiTaskModule, ParquetPredictionWriter, TaskReport, daily, runs, warm_start
from lightning_mtr.training.bad_loss import NonFiniteLoss
from lightning_mtr.training.checkpointing import check_monitors, with_last_checkpoint
from lightning_mtr.training.diagnostics import GateDiagnostics
from lightning_mtr.training.precision import precision_line
from lightning_mtr.training.preemption import PREEMPTED_EXIT, Preemption
from lightning_mtr.training.run_record import RecordingSaveConfig
from lightning_mtr.training.trainer import Trainer
from lightning_mtr.training.distributed import SingleProcessStrategy, TorchRecStrategy, checkpoint, plan_tool
from lightning_mtr.training.distributed.checkpoint import CheckpointError
from lightning_mtr.training.distributed.memory import TablesDoNotFit
from lightning_mtr.training.distributed.peers import PEER_LOST_EXIT, leave_process_group, lost_peer_line

PACKAGE = Path(__file__).parent  # where a ValueError must be raised to be a message to the user


class ConfigError(ValueError):
    """The config's classes cannot be built as given (a schema the model cannot train, an
    argument out of range): the user's to fix, so one line, not a traceback."""


class MultiTaskCLI(LightningCLI):
    """The schema is read once, by the data module, and linked into the model."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RecordingSaveConfig)  # and the run into each checkpoint
        # the module configures its own optimizers: a top-level `optimizer:` would hand the
        # embedding tables to the dense optimizer
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_class", Trainer)  # precision may be `auto`
        # validate/test/predict under no_grad: fbgemm's fused CPU lookup fails on inference tensors
        kwargs["trainer_defaults"] = {"inference_mode": False, **kwargs.get("trainer_defaults", {})}
        super().__init__(MultiTaskModule, MultiTaskDataModule, **kwargs)

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path`` and ``--warm_start`` read through the ``latest`` links as they are now."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        for key in ("ckpt_path", "warm_start"):
            if isinstance(config.get(key), str):
                config[key] = runs.through_links(config[key])

    def instantiate_classes(self) -> None:
        """A ValueError that lightning-mtr's own checks raise (a ``raise`` statement in the package)
        while the config's classes are built becomes a :class:`ConfigError` naming the config
        files; one raised by a library, or by Python inside our code (an unpacking, ``int()``, a
        format spec: a bug of ours), keeps its traceback."""
        try:
            super().instantiate_classes()
            if self.subcommand == "fit":
                check_monitors(self.trainer.callbacks, self.model.schema.task_names)
        except (DataError, CheckpointError):
            raise
        except ValueError as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            if not (Path(where.filename).is_relative_to(PACKAGE) and (where.line or "").startswith("raise")):
                raise
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            files = " + ".join(str(path) for path in config.get("config") or ()) or "the command line"
            raise ConfigError(f"{files} (data.schema {config.get('data.schema')}): {error}") from error

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """``strategy: auto`` (the default) trains one device on the fast path and several with TorchRec;
        outputs go under ``runs/<name>`` and every run keeps a ``last.ckpt``, whatever its config says. Its
        first line says which precision runs, and why (:func:`~lightning_mtr.training.precision.precision_line`)."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("strategy", "auto") == "auto" and "strategy" not in kwargs:
            kwargs["strategy"] = SingleProcessStrategy() if trains_one_device(config) else TorchRecStrategy()
        name = runs.run_name(self._get(self.config_init, "name"), self._get(self.config_init, "config"))
        trainer = super().instantiate_trainer(**{**runs.default_outputs(config, name), **with_last_checkpoint(config),
                                                 **kwargs})
        line = precision_line(config.get("precision"), trainer.precision, trainer.strategy.root_device.type)
        rank_zero_info(f"lightning-mtr: {line}")
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would merge a checkpoint's ``hyper_parameters`` into the config, so a file
        someone was handed could choose the model's class. The config decides; the strategy refuses
        a checkpoint of another model when it loads it."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        """``fit`` also takes ``--warm_start PATH`` and its choices; ``test`` prints TaskReport's
        table only (Lightning's own, the same metrics again, with ``--verbose true``)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            warm_start.add_arguments(parser)
        if subcommand == "test":
            parser.set_defaults(verbose=False)
        return parser

    def before_fit(self) -> None:
        warm_start.hand_to_strategy(self.config_init["fit"], self.trainer.strategy)

    def predict(self, **kwargs) -> None:
        """``lightning-mtr predict``: scores go to Parquet (the writer), so by default the trainer
        keeps none in memory; ``--return_predictions true`` keeps them too."""
        kwargs["return_predictions"] = bool(kwargs.get("return_predictions"))
        self.trainer.predict(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="logs and checkpoints go to runs/NAME/version_N (default: the first --config's stem)")
        parser.add_lightning_class_args(runs.LatestRun, "latest")
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")
        parser.add_lightning_class_args(TaskReport, "report")
        parser.add_lightning_class_args(ParquetPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(GateDiagnostics, "gates")
        parser.add_lightning_class_args(Preemption, "preemption")


def trains_one_device(trainer: dict[str, Any]) -> bool:
    """Whether Lightning will run the trainer's config as one process: ``devices: auto`` means
    every GPU of the host on a GPU (or auto) accelerator, one device on the CPU."""
    if trainer.get("num_nodes", 1) != 1:
        return False
    devices = str(trainer.get("devices", "auto"))
    if devices == "auto":
        return trainer.get("accelerator", "auto") == "cpu" or torch.cuda.device_count() <= 1
    return devices in ("1", "[0]")


def main(argv: list[str] | None = None) -> int:
    """``argv`` defaults to the command line (LightningCLI then reads ``sys.argv`` itself).
    Bad input data, a config whose classes cannot be built or an unusable checkpoint ends the run
    with its message (the file, the column or what is wrong, the fix) on one line of stderr and
    exit status 2, not a traceback through Lightning's loops and jsonargparse; so do tables too
    large for the run's memory (``lightning-mtr plan``'s message: by how much, and what would fit).
    A NaN or inf loss that stops training (``model.bad_loss``) likewise, with exit status 3.
    ``LMTR_DEBUG=1`` shows these errors' tracebacks (and the warnings :mod:`~lightning_mtr.quiet`
    hides). SIGTERM, SIGINT or SLURM's requeue signal
    to any rank ends ``fit`` on every rank with a checkpoint at the current step, one line naming it
    (rank 0's) and exit status 75 (:mod:`~lightning_mtr.training.preemption`); a peer that stops
    answering, with a line naming it from each surviving rank and status 4
    (:mod:`~lightning_mtr.training.distributed.peers`)."""
    quiet.install()
    args = sys.argv[1:] if argv is None else argv
    commands = {"synth": synthetic.main, "plan": plan_tool.main, "consolidate": checkpoint.consolidate_main,
                "export": export.main, "score": score.main, "daily": daily.main,
                "schema": infer.main}
    if args[:1] and args[0] in commands:
        return commands[args[0]](args[1:])
    try:
        MultiTaskCLI(args=argv, parser_kwargs=help_kwargs(commands))
        if leave_process_group():
            _exit_now(0)
    except (DataError, CheckpointError, TablesDoNotFit, ConfigError, NonFiniteLoss) as error:
        if quiet.debugging():
            raise
        if rank_zero_only.rank == 0 or not isinstance(error, TablesDoNotFit):  # every rank finds the same shortfall
            print(f"lightning-mtr: error: {error}", file=sys.stderr)
        return 3 if isinstance(error, NonFiniteLoss) else 2
    except SIGTERMException as stop:
        if stop.code != PREEMPTED_EXIT:
            raise
        several = leave_process_group()
        if rank_zero_only.rank == 0:
            print(f"lightning-mtr: {stop.args[0]}", file=sys.stderr)
        if several:
            _exit_now(PREEMPTED_EXIT)
        return PREEMPTED_EXIT
    except RuntimeError as error:
        line = lost_peer_line(error)
        if line is None or quiet.debugging():
            raise
        print(f"lightning-mtr: error: {line}", file=sys.stderr)
        return PEER_LOST_EXIT
    return 0


def _exit_now(status: int) -> None:
    """Ends a rank of a finished multi-process command here, without the interpreter's finalization,
    in which a C++ thread now and then aborted it after a good run
    (:func:`~lightning_mtr.training.distributed.peers.leave_process_group`). Everything is
    written by then: the trainer's teardown finalized the loggers and the checkpoints."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def help_kwargs(commands: dict[str, Any]) -> dict[str, Any]:
    """``--help``'s parser: LightningCLI lists fit, validate, test and predict; the other
    ``commands`` are listed here, each with its ``main``'s first docstring line."""
    summaries = {name: (run.__doc__ or "").strip().split("\n")[0] for name, run in commands.items()}
    width = max(map(len, commands))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in summaries.items()]
    return {"prog": "lightning-mtr", "formatter_class": _Help,
            "description": "Multi-task recommendation ranking on TorchRec tables and Lightning.",
            "epilog": "\n".join(["other commands (`lightning-mtr COMMAND --help` for each):", *lines, "",
                                 "Errors in the data, the schema, the config or a checkpoint print one line (exit "
                                 "status 2);", f"{quiet.DEBUG}=1 prints their traceback, and the warnings "
                                 "lightning_mtr/quiet.py hides."])}


class _Help(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's command list kept one per line."""


if __name__ == "__main__":
    raise SystemExit(main())
