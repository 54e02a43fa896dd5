"""LightningDataModule over Parquet/CSV logs (or the built-in synthetic log)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from lightning_mtr.data import days as hive
from lightning_mtr.data.encode import BatchEncoder, DataError, DenseStats, checked_label_order
from lightning_mtr.data.reader import BatchStream, TextFormat, list_files, plan_units, text_names, worker_init
from lightning_mtr.data.stats import blend_stats, compute_dense_stats
from lightning_mtr.data.synthetic import GENERATOR_VERSION, ImpressionSpec, write_impressions
from lightning_mtr.data.synthetic.days import DAYS_VERSION, write_days
from lightning_mtr.data.synthetic.behaviour import BEHAVIOUR_VERSION, write_behaviour
from lightning_mtr.schema import Schema

Files = str | list[str] | None


@dataclass(frozen=True)
class SyntheticLog:
    """Generate a built-in synthetic log into ``cache_dir`` on first use.

    ``log``: ``impressions`` (the Criteo-like click/conversion log with position bias,
    ``conf/schemas/synthetic_impressions.yaml``) or ``behaviour`` (DUPN's four logs driven by
    behaviour sequences, ``conf/schemas/dupn_synthetic.yaml``) or ``days`` (``days`` days of
    ``rows_per_day`` rows from 2026-11-25 in ``dt=YYYY-MM-DD`` folders, with churn and drift,
    ``conf/schemas/synthetic_days.yaml``; every split is that Hive root, so ``data.days``,
    ``data.val_days`` and ``data.test_days`` choose the days). The directory name includes
    every argument and the generator's version, so changing either never reuses stale files.
    Impressions only: ``placement_weight`` (default 0: off) lets the ids of a column with no
    effect on relevance also set the display position; ``device_bias_spread`` (default 0: off)
    makes the position bias differ per id of a device-like column (see ``ImpressionSpec``).
    """

    log: Literal["impressions", "behaviour", "days"] = "impressions"
    cache_dir: str = ".cache/synthetic"
    train_rows: int = 200_000
    val_rows: int = 50_000
    test_rows: int = 50_000
    seed: int = 0
    placement_weight: float = 0.0
    device_bias_spread: float = 0.0
    days: int = 6
    rows_per_day: int = 30_000

    def __post_init__(self) -> None:
        if self.log != "impressions" and (self.placement_weight or self.device_bias_spread):
            raise ValueError("placement_weight and device_bias_spread shape the impressions log, "
                             f"not the {self.log} log")

    @property
    def directory(self) -> Path:
        if self.log == "days":
            return Path(self.cache_dir) / f"days-v{DAYS_VERSION}-s{self.seed}-{self.days}x{self.rows_per_day}"
        sizes = f"s{self.seed}-{self.train_rows}-{self.val_rows}-{self.test_rows}"
        if self.log == "behaviour":
            return Path(self.cache_dir) / f"behaviour-v{BEHAVIOUR_VERSION}-{sizes}"
        placement = f"-placement{self.placement_weight:g}" if self.placement_weight else ""
        device = f"-device{self.device_bias_spread:g}" if self.device_bias_spread else ""
        return Path(self.cache_dir) / f"impressions-v{GENERATOR_VERSION}-{sizes}{placement}{device}"

    def ensure(self) -> dict[str, str]:
        """The split files (the Hive root for ``days``), generated once."""
        if self.log == "days":
            generate_once(self.directory, lambda out: write_days(out, self.days, self.rows_per_day, seed=self.seed))
            return {split: str(self.directory) for split in ("train", "val", "test")}
        if self.log == "behaviour":
            return generate_once(self.directory, lambda out: write_behaviour(
                out, self.train_rows, self.val_rows, self.test_rows, seed=self.seed))
        spec = ImpressionSpec(placement_weight=self.placement_weight, device_bias_spread=self.device_bias_spread)
        return generate_once(self.directory, lambda out: write_impressions(
            out, self.train_rows, self.val_rows, self.test_rows, seed=self.seed, spec=spec))


def generate_once(directory: Path, write: Callable[[Path], Any]) -> dict[str, str]:
    """Run ``write`` into a temporary folder renamed to ``directory`` when done, so an
    interrupted run never leaves files that a later run would take as complete; the split files."""
    if not directory.exists():
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        try:
            partial.rename(directory)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return {split: str(directory / f"{split}.parquet") for split in ("train", "val", "test")}


def _check_sizes(**sizes: int | None) -> None:
    """Batch sizes of at least 1 (``eval_batch_size`` None: ``batch_size``); a shuffle buffer and
    worker count of 0 or more. A 0 or negative value would otherwise be taken silently (a negative
    buffer as no shuffling, an ``eval_batch_size`` of 0 as ``batch_size``)."""
    for name, value in sizes.items():
        least = 0 if name in ("shuffle_buffer", "num_workers") else 1
        if value is not None and value < least:
            raise DataError(f"data.{name} is {value}; it must be at least {least}"
                            + (" (0: no shuffling)" if name == "shuffle_buffer" else ""))


def _days_setting(split: str) -> str:
    return "data.days" if split == "train" else f"data.{split}_days"


class MultiTaskDataModule(L.LightningDataModule):
    """Streams batches for the schema's features and tasks.

    Args:
        schema: path of the schema YAML (features, tasks, sample spaces).
        train, val, test, predict: a file, a directory, or a list of them (Parquet, or text:
            .csv, .tsv, .txt); a directory of ``dt=YYYY-MM-DD`` folders (the Hive layout) reads
            every day, or the days that ``days``, ``val_days`` and ``test_days`` select.
        days, val_days, test_days: the days of the train, val and test roots to read: a range
            ``2026-11-26..2026-11-28`` (both ends included), one day, or a list of them.
        text_format: how text files are parsed (delimiter; column names when there is no header).
        synthetic: generate a built-in synthetic log (``log: impressions``, the default,
            ``log: behaviour`` or ``log: days``) and use it for any split left empty.
        batch_size: training rows per batch.
        eval_batch_size: rows per batch for validation, test and predict (default: batch_size).
        shuffle_buffer: rows shuffled together during training (0 disables shuffling).
        num_workers: DataLoader worker processes per rank (0 reads in the training process).
        extras: columns carried through to ``predict`` output as they are (ids, request ids: numbers or
            text); quote names that look like numbers (``'109_14'``).
        seed: shuffling seed.
    """

    def __init__(self, schema: str, train: Files = None, val: Files = None, test: Files = None,
                 predict: Files = None, synthetic: SyntheticLog | None = None, batch_size: int = 4096,
                 eval_batch_size: int | None = None, shuffle_buffer: int = 65536, num_workers: int = 0,
                 extras: list[str | int | float] | None = None, seed: int = 0, text_format: TextFormat = TextFormat(),
                 days: hive.Days = None, val_days: hive.Days = None, test_days: hive.Days = None):
        super().__init__()
        _check_sizes(batch_size=batch_size, eval_batch_size=eval_batch_size, shuffle_buffer=shuffle_buffer,
                     num_workers=num_workers)
        try:
            self.schema = Schema.from_yaml(schema)
        except ValueError as err:  # the message names the file; a DataError ends the CLI with it, in one line
            raise DataError(str(err)) from err  # one line; LMTR_DEBUG=1 shows the schema's own traceback
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        self.days = {"train": days, "val": val_days, "test": test_days}
        for split, selection in self.days.items():  # a malformed day fails now, before any data is read
            if hive.parse_days(selection, _days_setting(split)) and synthetic is None:
                hive.require_root(self.paths[split], split, _days_setting(split))
        self.synthetic = synthetic
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.extras = text_names(extras or [], "data.extras")
        self.seed = seed
        self.text_format = text_format
        self.dense_stats: DenseStats | None = None
        self.previous_stats: tuple[DenseStats, float] | None = None  # a warm start's blend (see warm_start_stats)
        self.resume_position: dict[str, int] | None = None
        self.label_order: tuple[tuple[str, str], ...] = ()
        self._encoders: dict[bool, BatchEncoder] = {}  # by whether it reads labels

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.ensure()

    def setup(self, stage: str) -> None:
        if self.synthetic is not None:
            for split, path in self.synthetic.ensure().items():
                self.paths[split] = self.paths[split] or path
        for split, days in self.days.items():  # a day the data lacks fails now, not after training
            if days is not None:
                hive.select(self.paths[split], days, split, _days_setting(split))

    def require_label_order(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Check on every row read, in every stage, that each ``(earlier, later)`` pair's later
        label is at most the earlier one (see ``BatchEncoder``). A chain model's funnel reaches
        the data this way: ``MultiTaskModule.setup`` passes ``model.label_order()``, since the
        data module is built before, and apart from, the model."""
        order = checked_label_order(self.schema, pairs)
        if order != self.label_order:
            self.label_order, self._encoders = order, {}

    @property
    def encoder(self) -> BatchEncoder:
        """Built on first use: after a checkpoint restore, whose dense statistics it then uses
        (Lightning restores after ``setup``), so validate/test/predict need no training data."""
        return self._encoder_for(labels=True)

    def _encoder_for(self, labels: bool) -> BatchEncoder:
        """``labels=False``: predict's, which reads features and extras only, so a serving log
        without label columns scores."""
        if labels not in self._encoders:
            if self.dense_stats is None and self.schema.needs_dense_stats:
                self.dense_stats = self._training_stats()
            self._encoders[labels] = BatchEncoder(self.schema, self.dense_stats, self.extras, self.label_order,
                                                  labels=labels)
        return self._encoders[labels]

    def _training_stats(self) -> DenseStats:
        if not self.paths["train"]:
            raise DataError("standardised dense features and quantile buckets need training data (data.train) for "
                            "their statistics, or a checkpoint that carries them (--ckpt_path)")
        units = plan_units(self._files("train"), BatchEncoder(self.schema), self.text_format)
        stats = compute_dense_stats(self.schema, units)
        return blend_stats(self.previous_stats[0], stats, self.previous_stats[1]) if self.previous_stats else stats

    def warm_start_stats(self, previous: DenseStats | None, todays_weight: float) -> None:
        """A warm start's dense statistics: ``previous`` (the checkpoint's) kept (weight 0), this
        run's training data's (weight 1), or the two blended (:func:`~lightning_mtr.data.stats.blend_stats`),
        computed when the first batch is encoded. (The strategy has checked that the checkpoint's
        weights fit this model, so its statistics are for this schema's dense features.)"""
        keep = previous is not None and todays_weight == 0
        self.dense_stats = previous if keep else None
        self.previous_stats = (previous, todays_weight) if previous is not None and 0 < todays_weight < 1 else None
        self._encoders = {}

    def _files(self, split: str) -> list[str]:
        """The split's files: of the selected days when ``days``/``val_days``/``test_days`` is set."""
        if self.days.get(split) is None:
            return list_files(self.paths[split])
        return list_files(hive.select(self.paths[split], self.days[split], split, _days_setting(split)))

    def _loader(self, split: str, training: bool) -> DataLoader:
        if not self.paths[split]:
            without = " (or --trainer.limit_val_batches 0 to fit without validation)" if split == "val" else ""
            raise DataError(f"no {split} data configured: set data.{split} to its files{without}")
        encoder = self._encoder_for(labels=split != "predict")
        units = plan_units(self._files(split), encoder, self.text_format)
        trainer = self.trainer
        resume = self._resume_batches(trainer.world_size if trainer else 1) if training else None
        # Lightning counts a resumed epoch's batches on from the saved count: a length holds when
        # the stream skips as many (same processes and batch size), else the bar has no total
        sized = resume is None or resume[1] == self.resume_position["batches"]
        stream = BatchStream(
            units, encoder, self.batch_size if training else self.eval_batch_size,
            shuffle_buffer=self.shuffle_buffer if training else 0, seed=self.seed,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
            even_batches=training and trainer is not None and trainer.world_size > 1,
            equal_batch_counts=not training and trainer is not None and trainer.world_size > 1,
            # the epoch Lightning hands samplers: unlike current_epoch it is already right
            # when a resumed run creates its first iterator
            epoch=(lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer else None,
            resume=resume, loader_workers=self.num_workers if sized else None,
        )
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=worker_init,
                          pin_memory=on_gpu)  # Batch.pin_memory: faster, asynchronous copies to the GPU

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", training=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", training=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", training=False)

    def _resume_batches(self, world_size: int) -> tuple[int, int] | None:
        """The saved position in this run's batches: the same number of rows once other
        processes or batch sizes share them (then approximate: each process reads its own range)."""
        if not self.resume_position or not self.resume_position["rows"]:
            return None
        batches = round(self.resume_position["rows"] / (self.batch_size * world_size))
        return self.resume_position["epoch"], batches

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the training statistics (serving and resumed runs standardise
        with them) and, while fitting, how many rows of the current epoch were trained on."""
        state: dict[str, Any] = {"dense_stats": asdict(self.dense_stats) if self.dense_stats else None}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            progress = trainer.fit_loop.epoch_loop.batch_progress
            epoch, batches = trainer.fit_loop.epoch_progress.current.processed, progress.current.processed
            # a resumed run keeps counting its batches from the saved count, in the old batch shape
            resumed = self.resume_position if self.resume_position and self.resume_position["epoch"] == epoch else None
            done = (resumed["rows"], resumed["batches"]) if resumed else (0, 0)
            rows = done[0] + (batches - done[1]) * self.batch_size * trainer.world_size
            state["position"] = {"epoch": epoch, "rows": 0 if progress.is_last_batch else rows, "batches": batches}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dense_stats"):
            self.dense_stats = DenseStats(**{k: tuple(v) for k, v in state["dense_stats"].items()})
            self._encoders = {}
        # only a resumed fit continues mid-epoch (a checkpoint loaded to validate says nothing
        # about where a later fit starts)
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        self.resume_position = state.get("position") if fitting else None
